//! The transport-independent virtio-blk request engine: parses descriptor chains, executes
//! them on a [`Disk`] and completes them in the used ring. It owns no thread or eventfd, so
//! the in-VMM device and a vhost-user backend drive the same code.
//!
//! Every request is a device-readable byte stream (16-byte header, then OUT data or discard
//! segments) followed by a device-writable one (IN data or ID bytes, then the status byte, its
//! last byte). Descriptor boundaries carry no meaning (virtio 1.x has no fixed layout). Chains
//! the driver got wrong are the normal case for a device: they complete with
//! `VIRTIO_BLK_S_IOERR` when a status byte can be located, and otherwise are returned to the
//! driver with a used length of 0, untouched.

use std::fmt;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_DISCARD,
    VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
    VIRTIO_BLK_T_WRITE_ZEROES, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
};
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::bitmap::BS;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemory, Permissions, VolatileSlice};

use super::config::{self, MAX_DISCARD_SECTORS, MAX_WRITE_ZEROES_SECTORS};
use super::disk::{Disk, DiskError, SECTOR_SHIFT, SECTOR_SIZE};
use super::ratelimit::LogLimiter;
use super::{BlockCounters, BlockError};

/// Length of the GET_ID answer (the serial, zero padded).
pub const VIRTIO_BLK_ID_BYTES: usize = virtio_bindings::virtio_blk::VIRTIO_BLK_ID_BYTES as usize;
/// `struct virtio_blk_outhdr`: le32 type, le32 reserved, le64 sector.
const HEADER_LEN: u64 = 16;
/// `struct virtio_blk_discard_write_zeroes`: le64 sector, le32 num_sectors, le32 flags.
const SEGMENT_LEN: u64 = 16;

/// Why a request failed.
#[derive(Debug, thiserror::Error)]
enum RequestError {
    // The chain itself is unusable: no status byte can be trusted.
    #[error("the descriptor chain is cut short (a loop, a bad next index or indirect table, an unreadable descriptor, or over 4 GiB)")]
    BrokenChain,
    #[error("the descriptor chain has more than {0} descriptors")]
    ChainTooLong(u16),
    #[error("a device-readable descriptor follows a device-writable one")]
    ReadableAfterWritable,
    #[error("the chain has no device-writable status byte")]
    NoStatus,
    #[error("the status byte at {0:#x} is not in guest memory")]
    StatusOutsideMemory(u64),
    // The request is wrong or failed: the status byte says so.
    #[error("the request header needs {HEADER_LEN} device-readable bytes, the chain has {0}")]
    ShortHeader(u64),
    #[error("the chain has {0} bytes where the request needs {1}")]
    ShortBuffer(u64, u64),
    #[error("buffer {addr:#x}+{len:#x} is not in guest memory")]
    GuestMemory { addr: u64, len: u64 },
    #[error("{0} request with device-{1} data buffers")]
    WrongDirection(&'static str, &'static str),
    #[error("data length {0} is not a multiple of 512")]
    UnalignedLength(u64),
    #[error("sectors {sector}+{count} are past the end of the disk ({capacity} sectors)")]
    OutOfRange {
        sector: u64,
        count: u64,
        capacity: u64,
    },
    #[error("write to a read-only disk")]
    ReadOnly,
    #[error("discard/write-zeroes payload of {0} bytes is not whole 16-byte segments")]
    BadSegments(u64),
    #[error("{0} sectors exceed the limit of {1} per request")]
    TooManySectors(u32, u32),
    #[error("unknown request type {0}")]
    UnknownType(u32),
    #[error("unsupported request: {0}")]
    Unsupported(&'static str),
    #[error("host I/O error: {0}")]
    Disk(#[from] DiskError),
}

impl RequestError {
    /// The status for the guest, or None if the chain cannot be completed with one.
    fn status(&self) -> Option<u8> {
        match self {
            Self::BrokenChain
            | Self::ChainTooLong(_)
            | Self::ReadableAfterWritable
            | Self::NoStatus
            | Self::StatusOutsideMemory(_) => None,
            Self::UnknownType(_) | Self::Unsupported(_) => Some(VIRTIO_BLK_S_UNSUPP as u8),
            _ => Some(VIRTIO_BLK_S_IOERR as u8),
        }
    }
}

/// A guest buffer as a descriptor gave it (not yet checked against guest memory).
#[derive(Clone, Copy, Debug)]
struct Range {
    addr: GuestAddress,
    len: u64,
}

/// The buffers of one chain, split by direction.
#[derive(Default)]
struct Buffers {
    readable: Vec<Range>,
    writable: Vec<Range>,
    readable_len: u64,
    writable_len: u64,
}

impl Buffers {
    /// Walks the chain. The queue code stops iterating on loops, bad indices, unreadable or
    /// nested indirect tables and chains over 4 GiB; a chain that stops on a descriptor still
    /// flagged NEXT was therefore cut short.
    fn collect<M: GuestMemory>(
        chain: DescriptorChain<&M>,
        max_len: u16,
    ) -> Result<Self, RequestError> {
        let mut buffers = Buffers::default();
        let mut count = 0u32;
        let mut cut_short = true; // An empty chain is broken too.
        for desc in chain {
            count += 1;
            if count > u32::from(max_len) {
                return Err(RequestError::ChainTooLong(max_len));
            }
            cut_short = desc.has_next();
            let range = Range {
                addr: desc.addr(),
                len: u64::from(desc.len()),
            };
            if desc.is_write_only() {
                buffers.writable.push(range);
                buffers.writable_len += range.len;
            } else if buffers.writable.is_empty() {
                buffers.readable.push(range);
                buffers.readable_len += range.len;
            } else {
                return Err(RequestError::ReadableAfterWritable);
            }
        }
        if cut_short {
            return Err(RequestError::BrokenChain);
        }
        Ok(buffers)
    }

    /// The status byte: the last device-writable byte, checked to be in guest memory.
    fn status_addr<M: GuestMemory>(&self, mem: &M) -> Result<GuestAddress, RequestError> {
        let last = self
            .writable
            .iter()
            .rev()
            .find(|r| r.len > 0)
            .ok_or(RequestError::NoStatus)?;
        let addr = last
            .addr
            .checked_add(last.len - 1)
            .ok_or(RequestError::StatusOutsideMemory(last.addr.0))?;
        if !mem.check_range(addr, 1, Permissions::Write) {
            return Err(RequestError::StatusOutsideMemory(addr.0));
        }
        Ok(addr)
    }
}

/// The part of a byte stream made of `ranges` that starts at `skip` and is `len` long.
fn section(ranges: &[Range], mut skip: u64, mut len: u64) -> Vec<Range> {
    let mut out = Vec::with_capacity(ranges.len());
    for r in ranges {
        if len == 0 {
            break;
        }
        if skip >= r.len {
            skip -= r.len;
            continue;
        }
        let n = (r.len - skip).min(len);
        // An address that wraps is kept as is: guest memory lookups reject it later.
        out.push(Range {
            addr: GuestAddress(r.addr.0.wrapping_add(skip)),
            len: n,
        });
        len -= n;
        skip = 0;
    }
    out
}

/// Host views of guest buffers, bounds-checked by vm-memory (a range may span regions).
fn guest_slices<'m, M: GuestMemory>(
    mem: &'m M,
    ranges: &[Range],
    access: Permissions,
) -> Result<Vec<VolatileSlice<'m, BS<'m, M::Bitmap>>>, RequestError> {
    let mut slices = Vec::with_capacity(ranges.len());
    for r in ranges {
        let bad = || RequestError::GuestMemory {
            addr: r.addr.0,
            len: r.len,
        };
        let len = usize::try_from(r.len).map_err(|_| bad())?;
        if r.addr.0.checked_add(r.len).is_none() {
            return Err(bad());
        }
        for slice in mem.get_slices(r.addr, len, access).map_err(|_| bad())? {
            slices.push(slice.map_err(|_| bad())?);
        }
    }
    Ok(slices)
}

/// Copies the start of the stream `ranges` (from `skip` on) into `out`.
fn read_guest<M: GuestMemory>(
    mem: &M,
    ranges: &[Range],
    skip: u64,
    out: &mut [u8],
) -> Result<(), RequestError> {
    let mut done = 0;
    for r in section(ranges, skip, out.len() as u64) {
        let n = r.len as usize; // At most out.len().
        mem.read_slice(&mut out[done..done + n], r.addr)
            .map_err(|_| RequestError::GuestMemory {
                addr: r.addr.0,
                len: r.len,
            })?;
        done += n;
    }
    if done != out.len() {
        return Err(RequestError::ShortBuffer(done as u64, out.len() as u64));
    }
    Ok(())
}

/// Copies `data` to the start of the stream `ranges`.
fn write_guest<M: GuestMemory>(mem: &M, ranges: &[Range], data: &[u8]) -> Result<(), RequestError> {
    let mut done = 0;
    for r in section(ranges, 0, data.len() as u64) {
        let n = r.len as usize; // At most data.len().
        mem.write_slice(&data[done..done + n], r.addr)
            .map_err(|_| RequestError::GuestMemory {
                addr: r.addr.0,
                len: r.len,
            })?;
        done += n;
    }
    if done != data.len() {
        return Err(RequestError::ShortBuffer(done as u64, data.len() as u64));
    }
    Ok(())
}

/// Executes virtio-blk requests on one disk.
pub struct RequestHandler {
    name: String,
    disk: Disk,
    read_only: bool,
    serial: [u8; VIRTIO_BLK_ID_BYTES],
    /// Sync after every write: the driver did not negotiate FLUSH, so completed writes must be
    /// stable (virtio 1.2, 5.2.6.2).
    writethrough: bool,
    counters: Arc<BlockCounters>,
    /// Separate limits, so a guest sending garbage cannot hide host disk errors.
    guest_log: LogLimiter,
    host_log: LogLimiter,
}

impl RequestHandler {
    /// `name` prefixes log lines; `serial` (at most 20 bytes) is the ID the guest reads.
    pub fn new(
        name: String,
        disk: Disk,
        read_only: bool,
        serial: Option<&str>,
    ) -> Result<Self, BlockError> {
        let mut id = [0u8; VIRTIO_BLK_ID_BYTES];
        if let Some(serial) = serial {
            let bytes = serial.as_bytes();
            if bytes.len() > VIRTIO_BLK_ID_BYTES {
                return Err(BlockError::SerialTooLong(bytes.len()));
            }
            id[..bytes.len()].copy_from_slice(bytes);
        }
        Ok(Self {
            name,
            disk,
            read_only,
            serial: id,
            writethrough: false,
            counters: Arc::new(BlockCounters::default()),
            guest_log: LogLimiter::new(),
            host_log: LogLimiter::new(),
        })
    }

    pub fn disk(&self) -> &Disk {
        &self.disk
    }

    #[cfg(test)]
    pub(crate) fn disk_mut(&mut self) -> &mut Disk {
        &mut self.disk
    }

    pub fn read_only(&self) -> bool {
        self.read_only
    }

    pub fn counters(&self) -> Arc<BlockCounters> {
        self.counters.clone()
    }

    /// Call with `true` when the driver did not accept VIRTIO_BLK_F_FLUSH.
    pub fn set_writethrough(&mut self, writethrough: bool) {
        self.writethrough = writethrough;
    }

    /// Pops the available chains, executes them and adds them to the used ring. Returns whether
    /// the driver must be notified (honouring EVENT_IDX through `needs_notification`).
    ///
    /// Handles at most one queue's worth of chains per call, so a driver that keeps adding
    /// requests cannot hold the caller (and a pending stop) forever: callers re-enable
    /// notifications and call again while `enable_notification` reports more work. An error
    /// means the queue itself is unusable (rings outside guest memory, a corrupt available
    /// index); chains may have been completed before it, so notify the driver anyway.
    pub fn process_queue<M: GuestMemory>(
        &mut self,
        mem: &M,
        queue: &mut Queue,
    ) -> Result<bool, BlockError> {
        let max_chain = queue.max_size();
        let mut added = false;
        for _ in 0..queue.size() {
            let Some(chain) = queue.iter(mem).map_err(BlockError::Queue)?.next() else {
                break;
            };
            let head = chain.head_index();
            let used_len = self.handle_chain(mem, chain, max_chain);
            match queue.add_used(mem, head, used_len) {
                Ok(()) => added = true,
                // The driver put a bogus head index in the available ring: nothing to return.
                Err(virtio_queue::Error::InvalidDescriptorIndex) => {
                    self.counters.errors.fetch_add(1, Ordering::Relaxed);
                    self.warn(format_args!(
                        "available ring entry {head} is not a descriptor"
                    ));
                }
                Err(e) => return Err(BlockError::Queue(e)),
            }
        }
        if !added {
            return Ok(false);
        }
        queue.needs_notification(mem).map_err(BlockError::Queue)
    }

    /// Executes one chain and writes its status; returns the used length (bytes written).
    fn handle_chain<M: GuestMemory>(
        &mut self,
        mem: &M,
        chain: DescriptorChain<&M>,
        max_chain: u16,
    ) -> u32 {
        let located = Buffers::collect(chain, max_chain)
            .and_then(|buffers| buffers.status_addr(mem).map(|addr| (buffers, addr)));
        let (buffers, status_addr) = match located {
            Ok(located) => located,
            Err(e) => {
                self.failed(&e);
                return 0;
            }
        };
        let (status, written) = match self.execute(mem, &buffers) {
            Ok(written) => (VIRTIO_BLK_S_OK as u8, written),
            Err(e) => {
                self.failed(&e);
                (e.status().unwrap_or(VIRTIO_BLK_S_IOERR as u8), 0)
            }
        };
        // The address was checked, so this can only fail if memory was unplugged meanwhile.
        if mem.write_slice(&[status], status_addr).is_err() {
            self.failed(&RequestError::StatusOutsideMemory(status_addr.0));
            return 0;
        }
        u32::try_from(written + 1).unwrap_or(u32::MAX)
    }

    /// Runs the request; returns the data bytes written to guest memory (status excluded).
    fn execute<M: GuestMemory>(&mut self, mem: &M, b: &Buffers) -> Result<u64, RequestError> {
        if b.readable_len < HEADER_LEN {
            return Err(RequestError::ShortHeader(b.readable_len));
        }
        let mut header = [0u8; HEADER_LEN as usize];
        read_guest(mem, &b.readable, 0, &mut header)?;
        let request_type = le32(&header[0..4]);
        let sector = le64(&header[8..16]);
        match request_type {
            VIRTIO_BLK_T_IN => self.read(mem, b, sector),
            VIRTIO_BLK_T_OUT => self.write(mem, b, sector),
            VIRTIO_BLK_T_FLUSH => self.flush(),
            VIRTIO_BLK_T_GET_ID => self.get_id(mem, b),
            VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES => {
                self.discard_or_zero(mem, b, request_type == VIRTIO_BLK_T_DISCARD)
            }
            other => Err(RequestError::UnknownType(other)),
        }
    }

    fn read<M: GuestMemory>(
        &mut self,
        mem: &M,
        b: &Buffers,
        sector: u64,
    ) -> Result<u64, RequestError> {
        if b.readable_len != HEADER_LEN {
            return Err(RequestError::WrongDirection("read", "readable"));
        }
        let len = b.writable_len - 1; // The status byte exists, so this does not underflow.
        let offset = self.check_data(sector, len)?;
        let bufs = guest_slices(mem, &section(&b.writable, 0, len), Permissions::Write)?;
        self.disk.read_at(offset, &bufs)?;
        self.counters.reads.fetch_add(1, Ordering::Relaxed);
        self.counters.read_bytes.fetch_add(len, Ordering::Relaxed);
        Ok(len)
    }

    fn write<M: GuestMemory>(
        &mut self,
        mem: &M,
        b: &Buffers,
        sector: u64,
    ) -> Result<u64, RequestError> {
        if self.read_only {
            return Err(RequestError::ReadOnly);
        }
        if b.writable_len != 1 {
            return Err(RequestError::WrongDirection("write", "writable"));
        }
        let len = b.readable_len - HEADER_LEN;
        let offset = self.check_data(sector, len)?;
        let bufs = guest_slices(
            mem,
            &section(&b.readable, HEADER_LEN, len),
            Permissions::Read,
        )?;
        self.disk.write_at(offset, &bufs)?;
        if self.writethrough {
            self.disk.sync()?;
        }
        self.counters.writes.fetch_add(1, Ordering::Relaxed);
        self.counters.write_bytes.fetch_add(len, Ordering::Relaxed);
        Ok(0)
    }

    /// Completes only once the data is durable: the status byte is written after fdatasync.
    fn flush(&mut self) -> Result<u64, RequestError> {
        if !self.read_only {
            self.disk.sync()?;
        }
        self.counters.flushes.fetch_add(1, Ordering::Relaxed);
        Ok(0)
    }

    fn get_id<M: GuestMemory>(&mut self, mem: &M, b: &Buffers) -> Result<u64, RequestError> {
        let room = usize::try_from(b.writable_len - 1).unwrap_or(usize::MAX);
        let id = &self.serial[..room.min(VIRTIO_BLK_ID_BYTES)];
        write_guest(mem, &b.writable, id)?;
        Ok(id.len() as u64)
    }

    fn discard_or_zero<M: GuestMemory>(
        &mut self,
        mem: &M,
        b: &Buffers,
        discard: bool,
    ) -> Result<u64, RequestError> {
        if self.read_only {
            return Err(RequestError::ReadOnly);
        }
        if discard && !config::supports_discard(&self.disk, self.read_only) {
            return Err(RequestError::Unsupported(
                "discard on a disk that cannot punch holes",
            ));
        }
        let payload = b.readable_len - HEADER_LEN;
        if payload == 0 || payload % SEGMENT_LEN != 0 {
            return Err(RequestError::BadSegments(payload));
        }
        if payload > SEGMENT_LEN {
            return Err(RequestError::Unsupported(
                "more than one discard/write-zeroes segment",
            ));
        }
        let mut segment = [0u8; SEGMENT_LEN as usize];
        read_guest(mem, &b.readable, HEADER_LEN, &mut segment)?;
        let sector = le64(&segment[0..8]);
        let count = le32(&segment[8..12]);
        let flags = le32(&segment[12..16]);
        let (allowed_flags, max) = if discard {
            (0, MAX_DISCARD_SECTORS)
        } else {
            (VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP, MAX_WRITE_ZEROES_SECTORS)
        };
        if flags & !allowed_flags != 0 {
            return Err(RequestError::Unsupported(
                "unknown discard/write-zeroes flags",
            ));
        }
        if count > max {
            return Err(RequestError::TooManySectors(count, max));
        }
        let offset = self.check_range(sector, u64::from(count))?;
        let len = u64::from(count) << SECTOR_SHIFT;
        if len > 0 {
            if discard {
                self.disk.discard(offset, len)?;
            } else {
                let unmap = flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0;
                self.disk.write_zeroes(offset, len, unmap)?;
            }
        }
        Ok(0)
    }

    /// Checks a data length and the sectors it covers; returns the byte offset.
    fn check_data(&self, sector: u64, len: u64) -> Result<u64, RequestError> {
        if len % SECTOR_SIZE != 0 {
            return Err(RequestError::UnalignedLength(len));
        }
        self.check_range(sector, len >> SECTOR_SHIFT)
    }

    fn check_range(&self, sector: u64, count: u64) -> Result<u64, RequestError> {
        let capacity = self.disk.capacity();
        match sector.checked_add(count) {
            // capacity < 2^55, so the shift cannot overflow.
            Some(end) if end <= capacity => Ok(sector << SECTOR_SHIFT),
            _ => Err(RequestError::OutOfRange {
                sector,
                count,
                capacity,
            }),
        }
    }

    fn failed(&mut self, e: &RequestError) {
        self.counters.errors.fetch_add(1, Ordering::Relaxed);
        if let RequestError::Disk(e) = e {
            self.host_log
                .warn(&self.name, format_args!("disk I/O failed: {e}"));
        } else {
            self.warn(format_args!("bad request from the driver: {e}"));
        }
    }

    fn warn(&mut self, message: fmt::Arguments) {
        self.guest_log.warn(&self.name, message);
    }
}

fn le32(bytes: &[u8]) -> u32 {
    let mut b = [0u8; 4];
    b.copy_from_slice(&bytes[..4]);
    u32::from_le_bytes(b)
}

fn le64(bytes: &[u8]) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&bytes[..8]);
    u64::from_le_bytes(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(addr: u64, len: u64) -> Range {
        Range {
            addr: GuestAddress(addr),
            len,
        }
    }

    #[test]
    fn section_skips_and_truncates() {
        let ranges = [r(0x1000, 10), r(0x2000, 6), r(0x3000, 100)];
        let s = section(&ranges, 12, 20);
        assert_eq!(s.len(), 2);
        assert_eq!((s[0].addr.0, s[0].len), (0x2002, 4));
        assert_eq!((s[1].addr.0, s[1].len), (0x3000, 16));
        assert!(section(&ranges, 116, 5).is_empty());
        assert!(section(&ranges, 0, 0).is_empty());
    }

    #[test]
    fn error_statuses() {
        assert_eq!(RequestError::BrokenChain.status(), None);
        assert_eq!(RequestError::NoStatus.status(), None);
        assert_eq!(
            RequestError::UnknownType(99).status(),
            Some(VIRTIO_BLK_S_UNSUPP as u8)
        );
        assert_eq!(
            RequestError::UnalignedLength(3).status(),
            Some(VIRTIO_BLK_S_IOERR as u8)
        );
    }
}
