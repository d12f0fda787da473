//! The guest's virtio-fs driver for `fs_path`: guest memory in a memfd, the hiprio and request
//! queues, and FUSE requests (INIT, LOOKUP, OPEN, READ, RELEASE) on the request queue.

use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::Instant;

use devices::virtio::vhost_user::VhostUserDevice;
use devices::virtio::{VirtioDevice, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use super::common::die;
use super::common::ring::{guest_memory, wait_readable, CallInterrupt, Desc, Layout, Ram, Vq};
use super::{Options, TIMEOUT};

// ---- Guest memory layout -------------------------------------------------------------------

/// Queue `i` lives at `i * RING_STRIDE`: descriptor table, then the available ring at +0x4000,
/// the used ring at +0x5000 (room for 1024 entries each).
const RING_STRIDE: u64 = 0x8000;
const AVAIL_OFF: u64 = 0x4000;
const USED_OFF: u64 = 0x5000;
/// FUSE requests (in header + body), one 256-byte slot per request.
const REQUESTS: u64 = 0x1_0000;
const REQUEST_SLOT: u64 = 256;
/// FUSE out headers, one 64-byte slot per request.
const OUT_HEADERS: u64 = 0x3_0000;
const OUT_SLOT: u64 = 64;
/// Reply data buffers, one page-aligned buffer per request.
const DATA: u64 = 0x10_0000;

const HIPRIO_QUEUE: u16 = 0;
const REQUEST_QUEUE: u16 = 1;

// ---- FUSE constants (virtio 1.2 5.11; include/uapi/linux/fuse.h) -----------

const FUSE_LOOKUP: u32 = 1;
const FUSE_OPEN: u32 = 14;
const FUSE_READ: u32 = 15;
const FUSE_RELEASE: u32 = 18;
const FUSE_INIT: u32 = 26;
const FUSE_ROOT_ID: u64 = 1;
const FUSE_KERNEL_MINOR: u32 = 38;
const FUSE_ASYNC_READ: u32 = 1 << 0;
const FUSE_BIG_WRITES: u32 = 1 << 5;
const FUSE_PARALLEL_DIROPS: u32 = 1 << 18;
pub const FUSE_MAX_PAGES: u32 = 1 << 22;
const FUSE_SUBMOUNTS: u32 = 1 << 27;
const FUSE_INIT_EXT: u32 = 1 << 30;
pub const FOPEN_DIRECT_IO: u32 = 1 << 0;
pub const FOPEN_KEEP_CACHE: u32 = 1 << 1;
const IN_HEADER: usize = 40;
const OUT_HEADER: u32 = 16;
pub const PAGE: u64 = 4096;

// ---- The FUSE driver -----------------------------------------------------------------------

fn fuse_request(opcode: u32, unique: u64, nodeid: u64, body: &[u8]) -> Vec<u8> {
    let mut req = Vec::with_capacity(IN_HEADER + body.len());
    req.extend_from_slice(&((IN_HEADER + body.len()) as u32).to_le_bytes());
    req.extend_from_slice(&opcode.to_le_bytes());
    req.extend_from_slice(&unique.to_le_bytes());
    req.extend_from_slice(&nodeid.to_le_bytes());
    req.extend_from_slice(&[0u8; 16]); // uid, gid, pid (root), total_extlen, padding
    req.extend_from_slice(body);
    req
}

fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}

fn le64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
}

/// What FUSE_INIT negotiated.
pub struct Init {
    pub minor: u32,
    pub flags: u64,
    pub max_write: u32,
    pub max_pages: u16,
}

/// Counters of one READ pass.
#[derive(Default)]
pub struct Pass {
    pub bytes: u64,
    pub requests: u64,
    pub kicks: u64,
    pub wakeups: u64,
    pub seconds: f64,
}

/// Where queue `index` lives (see `RING_STRIDE`).
fn layout(index: u16) -> Layout {
    let base = RING_STRIDE * u64::from(index);
    Layout {
        desc: base,
        avail: base + AVAIL_OFF,
        used: base + USED_OFF,
    }
}

/// The guest side of a virtio-fs device: guest memory, the request queue, the interrupt.
pub struct Driver {
    ram: Ram,
    mem: GuestMemoryMmap,
    hiprio: Vq,
    req: Vq,
    call: EventFd,
    stride: u64,
    slots: usize,
    unique: u64,
}

impl Driver {
    pub fn new(o: &Options, slots: usize, buf: u64) -> Driver {
        let stride = buf.max(PAGE).div_ceil(PAGE) * PAGE;
        let size = (DATA + slots as u64 * stride).div_ceil(2 << 20) * (2 << 20);
        let mem = guest_memory(size, true);
        let ram = Ram::new(&mem, size);
        Driver {
            ram,
            hiprio: Vq::new(ram, layout(HIPRIO_QUEUE), o.queue_size, o.event_idx),
            req: Vq::new(ram, layout(REQUEST_QUEUE), o.queue_size, o.event_idx),
            mem,
            call: EventFd::new(0).unwrap_or_else(|e| die(&format!("eventfd: {e}"))),
            stride,
            slots,
            unique: 0,
        }
    }

    /// Makes every data page exist in the memfd (what a booted guest's RAM would be like).
    pub fn touch_buffers(&self) {
        for gpa in (DATA..DATA + self.slots as u64 * self.stride).step_by(PAGE as usize) {
            self.ram.write(gpa, &[0]);
        }
    }

    pub fn activate(&self, device: &mut VhostUserDevice) {
        let mut features = VIRTIO_F_VERSION_1;
        if self.req.event_idx {
            if device.features() & VIRTIO_RING_F_EVENT_IDX == 0 {
                die("virtiofsd does not offer EVENT_IDX (use --event-idx off)");
            }
            features |= VIRTIO_RING_F_EVENT_IDX;
        }
        device.ack_features(features);
        let interrupt = Arc::new(CallInterrupt {
            call: self
                .call
                .try_clone()
                .unwrap_or_else(|e| die(&format!("eventfd clone: {e}"))),
        });
        let queues = vec![
            self.hiprio.activated(&self.mem, HIPRIO_QUEUE),
            self.req.activated(&self.mem, REQUEST_QUEUE),
        ];
        device
            .activate(self.mem.clone(), interrupt, queues)
            .unwrap_or_else(|e| die(&format!("activation failed: {e}")));
    }

    fn data_addr(&self, slot: usize) -> u64 {
        DATA + slot as u64 * self.stride
    }

    /// Queues one request in `slot`: request (readable), out header and `reply_len` bytes of
    /// data (writable). Not published.
    fn submit(&mut self, slot: usize, request: &[u8], reply_len: u32) {
        assert!(request.len() as u64 <= REQUEST_SLOT && u64::from(reply_len) <= self.stride);
        let req_addr = REQUESTS + slot as u64 * REQUEST_SLOT;
        let out_addr = OUT_HEADERS + slot as u64 * OUT_SLOT;
        self.ram.write(req_addr, request);
        self.ram.write(out_addr, &[0u8; OUT_HEADER as usize]);
        let chain = [
            Desc {
                addr: req_addr,
                len: request.len() as u32,
                write: false,
            },
            Desc {
                addr: out_addr,
                len: OUT_HEADER,
                write: true,
            },
            Desc {
                addr: self.data_addr(slot),
                len: reply_len,
                write: true,
            },
        ];
        self.req.add((slot * 3) as u16, &chain);
    }

    /// Blocks until virtiofsd signals the call eventfd.
    fn wait_call(&self) {
        if !wait_readable(self.call.as_raw_fd(), TIMEOUT) {
            die(&format!("no interrupt from virtiofsd within {TIMEOUT:?}"));
        }
        self.call
            .read()
            .unwrap_or_else(|e| die(&format!("call eventfd: {e}")));
    }

    /// Checks a completed request's out header; returns (slot, error, reply body length).
    fn complete(&self, id: u32, written: u32, unique: impl Fn(usize) -> u64) -> (usize, i32, u32) {
        if id % 3 != 0 || id as usize / 3 >= self.slots {
            die(&format!(
                "virtiofsd returned descriptor {id}, not a request head"
            ));
        }
        let slot = id as usize / 3;
        let out = self.ram.read(OUT_HEADERS + slot as u64 * OUT_SLOT, 16);
        let (len, error, uniq) = (le32(&out, 0), le32(&out, 4) as i32, le64(&out, 8));
        if written < OUT_HEADER || len != written {
            die(&format!(
                "slot {slot}: used length {written}, out header length {len}"
            ));
        }
        if uniq != unique(slot) {
            die(&format!(
                "slot {slot}: reply to request {uniq}, expected {}",
                unique(slot)
            ));
        }
        (slot, error, written - OUT_HEADER)
    }

    /// One synchronous FUSE request; returns (error, reply body).
    fn call(&mut self, opcode: u32, nodeid: u64, body: &[u8]) -> (i32, Vec<u8>) {
        self.unique += 1;
        let unique = self.unique;
        let reply_len = self.stride.min(PAGE) as u32;
        self.submit(0, &fuse_request(opcode, unique, nodeid, body), reply_len);
        self.req.publish();
        loop {
            self.wait_call();
            if let Some((id, written)) = self.req.next_used() {
                self.req.arm();
                let (slot, error, len) = self.complete(id, written, |_| unique);
                return (error, self.ram.read(self.data_addr(slot), len as usize));
            }
            self.req.arm();
        }
    }

    pub fn init(&mut self) -> Init {
        let mut body = Vec::new();
        let flags = FUSE_ASYNC_READ
            | FUSE_BIG_WRITES
            | FUSE_PARALLEL_DIROPS
            | FUSE_MAX_PAGES
            | FUSE_SUBMOUNTS
            | FUSE_INIT_EXT;
        // major, minor, max_readahead, flags, flags2, unused[11]
        for v in [7, FUSE_KERNEL_MINOR, 1 << 20, flags, 0] {
            body.extend_from_slice(&u32::to_le_bytes(v));
        }
        body.extend_from_slice(&[0u8; 44]);
        let (error, out) = self.call(FUSE_INIT, 0, &body);
        if error != 0 || out.len() < 40 {
            die(&format!(
                "FUSE_INIT failed: error {error}, {} bytes",
                out.len()
            ));
        }
        // major, minor, max_readahead, flags, max_background u16, congestion u16, max_write,
        // time_gran, max_pages u16, map_alignment u16, flags2
        if le32(&out, 0) != 7 {
            die(&format!("FUSE major version {}", le32(&out, 0)));
        }
        Init {
            minor: le32(&out, 4),
            flags: u64::from(le32(&out, 12)) | u64::from(le32(&out, 36)) << 32,
            max_write: le32(&out, 20),
            max_pages: u16::from_le_bytes([out[28], out[29]]),
        }
    }

    /// LOOKUP in the root directory: (node id, size).
    pub fn lookup(&mut self, name: &str) -> (u64, u64) {
        let mut body = name.as_bytes().to_vec();
        body.push(0);
        let (error, entry) = self.call(FUSE_LOOKUP, FUSE_ROOT_ID, &body);
        if error != 0 || entry.len() < 56 {
            die(&format!("LOOKUP {name} failed: error {error}"));
        }
        // fuse_entry_out: nodeid, generation, entry_valid, attr_valid, 2 x nsec, fuse_attr
        // (ino, size, ...).
        (le64(&entry, 0), le64(&entry, 48))
    }

    /// OPEN read-only: (file handle, open flags).
    pub fn open(&mut self, nodeid: u64) -> (u64, u32) {
        let mut body = (libc::O_RDONLY as u32).to_le_bytes().to_vec();
        body.extend_from_slice(&[0u8; 4]);
        let (error, out) = self.call(FUSE_OPEN, nodeid, &body);
        if error != 0 || out.len() < 12 {
            die(&format!("OPEN failed: error {error}"));
        }
        (le64(&out, 0), le32(&out, 8))
    }

    pub fn release(&mut self, nodeid: u64, fh: u64) {
        let mut body = fh.to_le_bytes().to_vec();
        body.extend_from_slice(&(libc::O_RDONLY as u32).to_le_bytes());
        body.extend_from_slice(&[0u8; 12]);
        let (error, _) = self.call(FUSE_RELEASE, nodeid, &body);
        if error != 0 {
            die(&format!("RELEASE failed: error {error}"));
        }
    }

    /// Reads the whole file with `bs`-byte READs, `qd` in flight. Checks every reply; with
    /// `full`, every u64 of the data, otherwise three per reply.
    pub fn read_file(
        &mut self,
        nodeid: u64,
        fh: u64,
        size: u64,
        bs: u64,
        qd: usize,
        full: bool,
    ) -> Pass {
        let mut pass = Pass::default();
        let kicks = self.req.kicks;
        let mut in_flight: Vec<Option<(u64, u64, u64)>> = vec![None; qd]; // offset, len, unique
        let mut free: Vec<usize> = (0..qd).rev().collect();
        let mut next = 0u64;
        let mut active = 0usize;
        let start = Instant::now();
        loop {
            // Fill every free slot.
            let mut added = false;
            while next < size {
                let Some(slot) = free.pop() else { break };
                let len = bs.min(size - next);
                self.unique += 1;
                let mut body = Vec::with_capacity(40);
                body.extend_from_slice(&fh.to_le_bytes());
                body.extend_from_slice(&next.to_le_bytes());
                body.extend_from_slice(&(len as u32).to_le_bytes());
                body.extend_from_slice(&0u32.to_le_bytes()); // read_flags
                body.extend_from_slice(&0u64.to_le_bytes()); // lock_owner
                body.extend_from_slice(&(libc::O_RDONLY as u32).to_le_bytes());
                body.extend_from_slice(&0u32.to_le_bytes());
                let req = fuse_request(FUSE_READ, self.unique, nodeid, &body);
                self.submit(slot, &req, len as u32);
                in_flight[slot] = Some((next, len, self.unique));
                next += len;
                active += 1;
                added = true;
            }
            if added {
                self.req.publish();
            }
            if active == 0 {
                break;
            }
            self.wait_call();
            pass.wakeups += 1;
            loop {
                while let Some((id, written)) = self.req.next_used() {
                    let (slot, error, got) = self.complete(id, written, |s| {
                        in_flight[s].map_or(u64::MAX, |(_, _, u)| u)
                    });
                    let (offset, len, _) = in_flight[slot].take().unwrap();
                    if error != 0 {
                        die(&format!("READ at {offset} failed: error {error}"));
                    }
                    if u64::from(got) != len {
                        die(&format!("READ at {offset}: {got} bytes, asked for {len}"));
                    }
                    self.check_data(slot, offset, len, full);
                    pass.bytes += len;
                    pass.requests += 1;
                    active -= 1;
                    free.push(slot);
                }
                if !self.req.arm() {
                    break;
                }
            }
        }
        pass.seconds = start.elapsed().as_secs_f64();
        pass.kicks = self.req.kicks - kicks;
        pass
    }

    /// The file holds its own offsets: the u64 at byte offset o is o.
    fn check_data(&self, slot: usize, offset: u64, len: u64, full: bool) {
        let base = self.data_addr(slot);
        let check = |at: u64| {
            let got = self.ram.read_u64(base + at);
            if got != offset + at {
                die(&format!(
                    "data mismatch at file offset {}: read {got:#x} (the file must hold its own offsets)",
                    offset + at
                ));
            }
        };
        if full {
            (0..len).step_by(8).for_each(check);
        } else {
            check(0);
            check(len / 2 / 8 * 8);
            check(len - 8);
        }
    }
}
