//! The disk image behind a virtio-blk device: a raw regular file or a host block device.
//!
//! All data moves with positional vectored I/O (`preadv`/`pwritev`) straight between the file
//! and guest memory; a bounce buffer is only used when the file was opened with `O_DIRECT` and
//! the guest's buffers are not sector aligned. Nothing here keeps a file position, so requests
//! need no seek and the code is the same for files and block devices.

use std::fs::File;
use std::io;
use std::os::raw::c_ulong;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::io::AsRawFd;

use vm_memory::bitmap::BitmapSlice;
use vm_memory::VolatileSlice;
use vmm_sys_util::ioctl::{ioctl_expr, ioctl_with_mut_ref, ioctl_with_ref, _IOC_NONE, _IOC_READ};

/// virtio-blk sectors are always 512 bytes, whatever the device's block size.
pub const SECTOR_SIZE: u64 = 512;
pub const SECTOR_SHIFT: u32 = 9;

/// Buffer alignment `O_DIRECT` needs (the host's logical block size is assumed to be 512).
const DIRECT_ALIGN: usize = 512;
/// Size of the bounce and zero buffers: bounds the memory a request costs, whatever its size.
const CHUNK: usize = 1 << 20;
/// Linux rejects `preadv`/`pwritev` with more iovecs than this.
const IOV_MAX: usize = 1024;

// Block device ioctls from <linux/fs.h>.
const BLK_IOCTL_TYPE: u32 = 0x12;
const BLKGETSIZE64: c_ulong = ioctl_expr(_IOC_READ, BLK_IOCTL_TYPE, 114, 8);
const BLKDISCARD: c_ulong = ioctl_expr(_IOC_NONE, BLK_IOCTL_TYPE, 119, 0);
const BLKZEROOUT: c_ulong = ioctl_expr(_IOC_NONE, BLK_IOCTL_TYPE, 127, 0);

#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    #[error("cannot inspect the disk image: {0}")]
    Metadata(#[source] io::Error),
    #[error("the disk image must be a regular file or a block device")]
    UnsupportedType,
    #[error("cannot get the size of the block device (BLKGETSIZE64): {0}")]
    DeviceSize(#[source] io::Error),
    #[error("the disk image is open read-only; open it read-write or make the disk read-only")]
    NotWritable,
    #[error("reading {len} bytes at offset {offset} failed: {source}")]
    Read {
        offset: u64,
        len: u64,
        #[source]
        source: io::Error,
    },
    #[error("writing {len} bytes at offset {offset} failed: {source}")]
    Write {
        offset: u64,
        len: u64,
        #[source]
        source: io::Error,
    },
    #[error("fdatasync failed: {0}")]
    Sync(#[source] io::Error),
    #[error("discarding {len} bytes at offset {offset} failed: {source}")]
    Discard {
        offset: u64,
        len: u64,
        #[source]
        source: io::Error,
    },
    #[error("zeroing {len} bytes at offset {offset} failed: {source}")]
    WriteZeroes {
        offset: u64,
        len: u64,
        #[source]
        source: io::Error,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    RegularFile,
    BlockDevice,
}

/// A buffer aligned for `O_DIRECT`, carved out of a plain `Vec` (no allocator tricks needed).
struct AlignedBuf {
    storage: Vec<u8>,
    start: usize,
}

impl AlignedBuf {
    fn new(len: usize) -> Self {
        let storage = vec![0u8; len + DIRECT_ALIGN];
        let misalign = storage.as_ptr() as usize % DIRECT_ALIGN;
        let start = (DIRECT_ALIGN - misalign) % DIRECT_ALIGN;
        Self { storage, start }
    }

    fn get(&mut self, len: usize) -> &mut [u8] {
        &mut self.storage[self.start..self.start + len]
    }
}

/// An open disk image with its size and what it can do.
pub struct Disk {
    file: File,
    kind: Kind,
    /// Size in 512-byte sectors (a trailing partial sector is not exposed).
    capacity: u64,
    direct: bool,
    /// Discard (hole punching / BLKDISCARD) works on this file.
    discard: bool,
    /// `FALLOC_FL_ZERO_RANGE` is worth trying; cleared once the filesystem says it is unsupported.
    zero_range: bool,
    /// Preferred discard granularity in sectors (the filesystem block size).
    discard_alignment: u32,
    bounce: Option<AlignedBuf>,
    zeroes: Option<AlignedBuf>,
    /// Called after every successful fdatasync, so tests can check what the guest saw by then.
    #[cfg(test)]
    pub(crate) sync_hook: Option<Box<dyn FnMut() + Send>>,
}

impl Disk {
    /// Takes over `file`. `writable` probes discard support and checks the file was opened for
    /// writing; `direct` says the caller opened it with `O_DIRECT`.
    pub fn new(file: File, writable: bool, direct: bool) -> Result<Disk, DiskError> {
        let meta = file.metadata().map_err(DiskError::Metadata)?;
        let file_type = meta.file_type();
        let (kind, size) = if file_type.is_file() {
            (Kind::RegularFile, meta.len())
        } else if file_type.is_block_device() {
            (Kind::BlockDevice, block_device_size(&file)?)
        } else {
            return Err(DiskError::UnsupportedType);
        };
        if writable && !open_for_writing(&file)? {
            return Err(DiskError::NotWritable);
        }
        if size % SECTOR_SIZE != 0 {
            log::warn!(
                "virtio-blk: disk image size {size} is not a multiple of {SECTOR_SIZE}; the last {} bytes are not visible to the guest",
                size % SECTOR_SIZE
            );
        }
        let discard = writable
            && match kind {
                Kind::RegularFile => probe_punch_hole(&file, size),
                Kind::BlockDevice => block_device_discards(meta.rdev()),
            };
        let blksize = u32::try_from(meta.blksize()).unwrap_or(0);
        Ok(Disk {
            file,
            kind,
            capacity: size >> SECTOR_SHIFT,
            direct,
            discard,
            zero_range: kind == Kind::RegularFile,
            discard_alignment: (blksize >> SECTOR_SHIFT).max(1),
            bounce: None,
            zeroes: None,
            #[cfg(test)]
            sync_hook: None,
        })
    }

    /// Size in 512-byte sectors.
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// Whether discard requests can deallocate space (and read back as zeroes afterwards).
    pub fn supports_discard(&self) -> bool {
        self.discard
    }

    /// Discard granularity in sectors.
    pub fn discard_alignment(&self) -> u32 {
        self.discard_alignment
    }

    /// Fills `bufs` (guest memory) from the disk at byte `offset`.
    pub fn read_at<B: BitmapSlice>(
        &mut self,
        offset: u64,
        bufs: &[VolatileSlice<B>],
    ) -> Result<(), DiskError> {
        let len = total_len(bufs);
        let result = if self.direct && !direct_aligned(bufs) {
            self.bounce_read(offset, bufs)
        } else {
            let guards: Vec<_> = bufs.iter().map(|b| b.ptr_guard_mut()).collect();
            let mut iovs: Vec<libc::iovec> = guards
                .iter()
                .map(|g| libc::iovec {
                    iov_base: g.as_ptr().cast(),
                    iov_len: g.len(),
                })
                .collect();
            let result = rw_vectored(&self.file, &mut iovs, offset, Direction::Read);
            // The kernel wrote guest memory behind vm-memory's back: record it for dirty-page
            // tracking (live migration), whether or not the whole read succeeded.
            for buf in bufs {
                buf.bitmap().mark_dirty(0, buf.len());
            }
            result
        };
        result.map_err(|source| DiskError::Read {
            offset,
            len,
            source,
        })
    }

    /// Writes `bufs` (guest memory) to the disk at byte `offset`.
    pub fn write_at<B: BitmapSlice>(
        &mut self,
        offset: u64,
        bufs: &[VolatileSlice<B>],
    ) -> Result<(), DiskError> {
        let len = total_len(bufs);
        let result = if self.direct && !direct_aligned(bufs) {
            self.bounce_write(offset, bufs)
        } else {
            let guards: Vec<_> = bufs.iter().map(|b| b.ptr_guard()).collect();
            let mut iovs: Vec<libc::iovec> = guards
                .iter()
                .map(|g| libc::iovec {
                    iov_base: g.as_ptr().cast_mut().cast(),
                    iov_len: g.len(),
                })
                .collect();
            rw_vectored(&self.file, &mut iovs, offset, Direction::Write)
        };
        result.map_err(|source| DiskError::Write {
            offset,
            len,
            source,
        })
    }

    /// Makes every completed write durable (fdatasync).
    pub fn sync(&mut self) -> Result<(), DiskError> {
        self.file.sync_data().map_err(DiskError::Sync)?;
        #[cfg(test)]
        if let Some(hook) = self.sync_hook.as_mut() {
            hook();
        }
        Ok(())
    }

    /// Deallocates `len` bytes at `offset`; they read back as zeroes afterwards.
    pub fn discard(&mut self, offset: u64, len: u64) -> Result<(), DiskError> {
        let result = match self.kind {
            Kind::RegularFile => fallocate(&self.file, PUNCH_HOLE, offset, len),
            Kind::BlockDevice => block_range_ioctl(&self.file, BLKDISCARD, offset, len),
        };
        result.map_err(|source| DiskError::Discard {
            offset,
            len,
            source,
        })
    }

    /// Makes `len` bytes at `offset` read as zeroes; `unmap` allows deallocating them.
    pub fn write_zeroes(&mut self, offset: u64, len: u64, unmap: bool) -> Result<(), DiskError> {
        let result = match self.kind {
            Kind::BlockDevice => block_range_ioctl(&self.file, BLKZEROOUT, offset, len),
            Kind::RegularFile if unmap && self.discard => {
                fallocate(&self.file, PUNCH_HOLE, offset, len)
            }
            Kind::RegularFile => self.zero_file_range(offset, len),
        };
        result.map_err(|source| DiskError::WriteZeroes {
            offset,
            len,
            source,
        })
    }

    fn zero_file_range(&mut self, offset: u64, len: u64) -> io::Result<()> {
        if self.zero_range {
            let mode = libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE;
            match fallocate(&self.file, mode, offset, len) {
                Ok(()) => return Ok(()),
                Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => {
                    log::info!("virtio-blk: the filesystem cannot zero ranges; writing zeroes");
                    self.zero_range = false;
                }
                Err(e) => return Err(e),
            }
        }
        let zeroes = self.zeroes.get_or_insert_with(|| AlignedBuf::new(CHUNK));
        let mut done = 0;
        while done < len {
            let n = chunk_len(len - done);
            let buf = zeroes.get(n);
            let mut iov = [libc::iovec {
                iov_base: buf.as_mut_ptr().cast(),
                iov_len: n,
            }];
            rw_vectored(&self.file, &mut iov, offset + done, Direction::Write)?;
            done += n as u64;
        }
        Ok(())
    }

    fn bounce_read<B: BitmapSlice>(
        &mut self,
        offset: u64,
        bufs: &[VolatileSlice<B>],
    ) -> io::Result<()> {
        let bounce = self.bounce.get_or_insert_with(|| AlignedBuf::new(CHUNK));
        let mut cursor = Cursor::default();
        let total = total_len(bufs);
        let mut done = 0;
        while done < total {
            let n = chunk_len(total - done);
            let buf = bounce.get(n);
            let mut iov = [libc::iovec {
                iov_base: buf.as_mut_ptr().cast(),
                iov_len: n,
            }];
            rw_vectored(&self.file, &mut iov, offset + done, Direction::Read)?;
            cursor.scatter(bufs, buf);
            done += n as u64;
        }
        Ok(())
    }

    fn bounce_write<B: BitmapSlice>(
        &mut self,
        offset: u64,
        bufs: &[VolatileSlice<B>],
    ) -> io::Result<()> {
        let bounce = self.bounce.get_or_insert_with(|| AlignedBuf::new(CHUNK));
        let mut cursor = Cursor::default();
        let total = total_len(bufs);
        let mut done = 0;
        while done < total {
            let n = chunk_len(total - done);
            let buf = bounce.get(n);
            cursor.gather(bufs, buf);
            let mut iov = [libc::iovec {
                iov_base: buf.as_mut_ptr().cast(),
                iov_len: n,
            }];
            rw_vectored(&self.file, &mut iov, offset + done, Direction::Write)?;
            done += n as u64;
        }
        Ok(())
    }

    #[cfg(test)]
    pub(crate) fn set_zero_range(&mut self, enabled: bool) {
        self.zero_range = enabled;
    }

    #[cfg(test)]
    pub(crate) fn set_discard(&mut self, enabled: bool) {
        self.discard = enabled;
    }
}

const PUNCH_HOLE: libc::c_int = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;

fn chunk_len(remaining: u64) -> usize {
    usize::try_from(remaining).map_or(CHUNK, |r| r.min(CHUNK))
}

fn total_len<B: BitmapSlice>(bufs: &[VolatileSlice<B>]) -> u64 {
    bufs.iter().map(|b| b.len() as u64).sum()
}

/// Whether `O_DIRECT` accepts these buffers as they are.
fn direct_aligned<B: BitmapSlice>(bufs: &[VolatileSlice<B>]) -> bool {
    bufs.iter().all(|b| {
        (b.ptr_guard().as_ptr() as usize) % DIRECT_ALIGN == 0 && b.len() % DIRECT_ALIGN == 0
    })
}

/// A position in a list of guest buffers, for copying through the bounce buffer chunk by chunk.
#[derive(Default)]
struct Cursor {
    index: usize,
    offset: usize,
}

impl Cursor {
    /// Copies `data` into the buffers from the cursor on.
    fn scatter<B: BitmapSlice>(&mut self, bufs: &[VolatileSlice<B>], mut data: &[u8]) {
        while let (false, Some(buf)) = (data.is_empty(), bufs.get(self.index)) {
            // `offset` is always below the buffer's length, so `offset()` cannot fail.
            let n = buf.offset(self.offset).map_or(0, |rest| {
                rest.copy_from(data);
                rest.len().min(data.len())
            });
            data = &data[n..];
            self.advance(buf.len(), n);
        }
    }

    /// Fills `data` from the buffers from the cursor on.
    fn gather<B: BitmapSlice>(&mut self, bufs: &[VolatileSlice<B>], mut data: &mut [u8]) {
        while let (false, Some(buf)) = (data.is_empty(), bufs.get(self.index)) {
            let n = buf
                .offset(self.offset)
                .map_or(0, |rest| rest.copy_to(&mut data[..]));
            data = &mut data[n..];
            self.advance(buf.len(), n);
        }
    }

    fn advance(&mut self, buf_len: usize, n: usize) {
        self.offset += n;
        if self.offset >= buf_len {
            self.index += 1;
            self.offset = 0;
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Direction {
    Read,
    Write,
}

/// Transfers every byte the iovecs describe at `offset`, retrying short transfers and EINTR.
fn rw_vectored(
    file: &File,
    iovs: &mut [libc::iovec],
    mut offset: u64,
    dir: Direction,
) -> io::Result<()> {
    let mut first = 0;
    loop {
        while first < iovs.len() && iovs[first].iov_len == 0 {
            first += 1;
        }
        if first == iovs.len() {
            return Ok(());
        }
        let batch = &iovs[first..iovs.len().min(first + IOV_MAX)];
        let off = libc::off_t::try_from(offset)
            .map_err(|_| io::Error::from_raw_os_error(libc::EOVERFLOW))?;
        // `batch.len()` is at most IOV_MAX, so it fits in a c_int.
        let count = batch.len() as libc::c_int;
        let ret = match dir {
            // SAFETY: every iovec describes memory that stays valid and mapped for the call:
            // guest memory checked by vm-memory (kept mapped by the caller's slice guards) or a
            // buffer owned by the caller. The kernel only writes within those lengths.
            Direction::Read => unsafe {
                libc::preadv(file.as_raw_fd(), batch.as_ptr(), count, off)
            },
            // SAFETY: as above; pwritev only reads the described memory.
            Direction::Write => unsafe {
                libc::pwritev(file.as_raw_fd(), batch.as_ptr(), count, off)
            },
        };
        if ret < 0 {
            let err = io::Error::last_os_error();
            if err.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(err);
        }
        if ret == 0 {
            // A file that shrank under us (read) or a device that refuses more data (write).
            return Err(match dir {
                Direction::Read => io::Error::from(io::ErrorKind::UnexpectedEof),
                Direction::Write => io::Error::from(io::ErrorKind::WriteZero),
            });
        }
        let mut n = ret as usize;
        offset += n as u64;
        // The kernel never transfers more than the batch holds, so `first` stays in bounds.
        while let (true, Some(iov)) = (n > 0, iovs.get_mut(first)) {
            if n >= iov.iov_len {
                n -= iov.iov_len;
                iov.iov_len = 0;
                first += 1;
            } else {
                // Still inside the same buffer: the pointer arithmetic stays in bounds.
                iov.iov_base = iov.iov_base.cast::<u8>().wrapping_add(n).cast();
                iov.iov_len -= n;
                n = 0;
            }
        }
    }
}

fn fallocate(file: &File, mode: libc::c_int, offset: u64, len: u64) -> io::Result<()> {
    let off =
        libc::off_t::try_from(offset).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput));
    let len = libc::off_t::try_from(len).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput));
    let (off, len) = (off?, len?);
    loop {
        // SAFETY: fallocate takes no pointers; a bad range only makes it fail.
        let ret = unsafe { libc::fallocate(file.as_raw_fd(), mode, off, len) };
        if ret == 0 {
            return Ok(());
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
}

fn block_range_ioctl(file: &File, request: c_ulong, offset: u64, len: u64) -> io::Result<()> {
    let range: [u64; 2] = [offset, len];
    loop {
        // SAFETY: BLKDISCARD and BLKZEROOUT read two u64 (start, length) from the pointer, which
        // points to `range`, alive for the call.
        let ret = unsafe { ioctl_with_ref(file, request, &range) };
        if ret == 0 {
            return Ok(());
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
}

fn block_device_size(file: &File) -> Result<u64, DiskError> {
    let mut size: u64 = 0;
    // SAFETY: BLKGETSIZE64 writes one u64 through the pointer, which points to `size`.
    let ret = unsafe { ioctl_with_mut_ref(file, BLKGETSIZE64, &mut size) };
    if ret < 0 {
        return Err(DiskError::DeviceSize(io::Error::last_os_error()));
    }
    Ok(size)
}

fn open_for_writing(file: &File) -> Result<bool, DiskError> {
    // SAFETY: F_GETFL takes no argument and only reads the descriptor's flags.
    let flags = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GETFL) };
    if flags < 0 {
        return Err(DiskError::Metadata(io::Error::last_os_error()));
    }
    Ok(flags & libc::O_ACCMODE != libc::O_RDONLY)
}

/// Punching a hole past the end of the file changes no data (and KEEP_SIZE keeps the size), but
/// the filesystem still answers EOPNOTSUPP if it cannot punch holes at all.
fn probe_punch_hole(file: &File, size: u64) -> bool {
    const PROBE_LEN: u64 = 4096;
    let Some(offset) = size.checked_next_multiple_of(PROBE_LEN) else {
        return false;
    };
    fallocate(file, PUNCH_HOLE, offset, PROBE_LEN).is_ok()
}

/// A BLKDISCARD probe would have to discard something, so ask sysfs instead.
fn block_device_discards(rdev: u64) -> bool {
    let major = ((rdev >> 8) & 0xfff) | ((rdev >> 32) & !0xfff);
    let minor = (rdev & 0xff) | ((rdev >> 12) & !0xff);
    let path = format!("/sys/dev/block/{major}:{minor}/queue/discard_max_bytes");
    std::fs::read_to_string(path)
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .is_some_and(|max| max > 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Seek, SeekFrom, Write};
    use std::os::unix::fs::OpenOptionsExt;

    fn image(len: usize) -> (tempfile::NamedTempFile, File) {
        let mut tmp = tempfile::NamedTempFile::new().unwrap();
        let data: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
        tmp.write_all(&data).unwrap();
        let file = tmp.reopen().unwrap();
        (tmp, file)
    }

    fn contents(tmp: &tempfile::NamedTempFile) -> Vec<u8> {
        let mut v = Vec::new();
        let mut f = tmp.reopen().unwrap();
        f.seek(SeekFrom::Start(0)).unwrap();
        f.read_to_end(&mut v).unwrap();
        v
    }

    #[test]
    fn capacity_ignores_partial_sector() {
        let (_tmp, file) = image(4096 + 100);
        let disk = Disk::new(file, true, false).unwrap();
        assert_eq!(disk.capacity(), 8);
        assert!(disk.discard_alignment() >= 1);
    }

    #[test]
    fn rejects_read_only_fd_for_writable_disk() {
        let (tmp, _) = image(4096);
        let ro = File::open(tmp.path()).unwrap();
        assert!(matches!(
            Disk::new(ro, true, false),
            Err(DiskError::NotWritable)
        ));
        let ro = File::open(tmp.path()).unwrap();
        let disk = Disk::new(ro, false, false).unwrap();
        assert!(!disk.supports_discard());
    }

    #[test]
    fn rejects_character_devices() {
        let null = File::open("/dev/null").unwrap();
        assert!(matches!(
            Disk::new(null, false, false),
            Err(DiskError::UnsupportedType)
        ));
    }

    #[test]
    fn probe_does_not_change_the_file() {
        let (tmp, file) = image(10_000);
        let before = contents(&tmp);
        let _disk = Disk::new(file, true, false).unwrap();
        assert_eq!(contents(&tmp), before);
    }

    #[test]
    fn vectored_read_write_many_iovecs() {
        // More buffers than IOV_MAX exercises the batching.
        let (tmp, file) = image(2048 * 512);
        let mut disk = Disk::new(file, true, false).unwrap();
        let mut mem = vec![0u8; 2048 * 512];
        let bufs: Vec<VolatileSlice> = mem
            .chunks_mut(512)
            .map(VolatileSlice::from)
            .collect::<Vec<_>>();
        disk.read_at(0, &bufs).unwrap();
        drop(bufs);
        assert_eq!(mem, contents(&tmp));

        mem.iter_mut().for_each(|b| *b = 0xab);
        let bufs: Vec<VolatileSlice> = mem.chunks_mut(512).map(VolatileSlice::from).collect();
        disk.write_at(0, &bufs).unwrap();
        assert!(contents(&tmp).iter().all(|&b| b == 0xab));
    }

    #[test]
    fn read_past_end_of_file_fails() {
        let (_tmp, file) = image(1024);
        let mut disk = Disk::new(file, true, false).unwrap();
        let mut mem = vec![0u8; 1024];
        let bufs = [VolatileSlice::from(&mut mem[..])];
        assert!(matches!(
            disk.read_at(512, &bufs),
            Err(DiskError::Read { .. })
        ));
    }

    #[test]
    fn direct_io_bounces_unaligned_buffers() {
        let (tmp, _) = image(64 * 1024);
        let Ok(file) = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open(tmp.path())
        else {
            eprintln!("skipped: this filesystem does not support O_DIRECT");
            return;
        };
        let mut disk = Disk::new(file, true, true).unwrap();
        let expected = contents(&tmp);
        // Buffers at odd addresses and lengths that only add up to whole sectors.
        let mut mem = vec![0u8; 4096 + 1];
        let (a, b) = mem[1..].split_at_mut(1000);
        let bufs = [VolatileSlice::from(a), VolatileSlice::from(b)];
        disk.read_at(8192, &bufs).unwrap();
        assert_eq!(&mem[1..], &expected[8192..8192 + 4096]);

        let mut mem = vec![0x5au8; 1024 + 3];
        let (a, b) = mem[3..].split_at_mut(7);
        let bufs = [VolatileSlice::from(a), VolatileSlice::from(b)];
        disk.write_at(512, &bufs).unwrap();
        let after = contents(&tmp);
        assert!(after[512..1536].iter().all(|&b| b == 0x5a));
        assert_eq!(after[..512], expected[..512]);
        assert_eq!(after[1536..], expected[1536..]);
    }

    #[test]
    fn zero_fallback_writes_zeroes() {
        let (tmp, file) = image(3 * CHUNK);
        let mut disk = Disk::new(file, true, false).unwrap();
        disk.set_zero_range(false);
        disk.set_discard(false);
        disk.write_zeroes(512, 2 * CHUNK as u64 + 512, true)
            .unwrap();
        let after = contents(&tmp);
        assert!(after[512..2 * CHUNK + 1024].iter().all(|&b| b == 0));
        assert_ne!(after[..512], [0u8; 512]);
        assert_ne!(after[2 * CHUNK + 1024..], vec![0u8; CHUNK - 1024]);
    }

    #[test]
    fn aligned_buf_is_aligned() {
        for len in [1, 512, 4096] {
            let mut b = AlignedBuf::new(len);
            assert_eq!(b.get(len).as_ptr() as usize % DIRECT_ALIGN, 0);
            assert_eq!(b.get(len).len(), len);
        }
    }

    #[test]
    #[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
    fn ioctl_numbers_match_linux() {
        // Values from <linux/fs.h> on the generic ioctl encoding (x86_64, aarch64).
        assert_eq!(BLKGETSIZE64, 0x8008_1272);
        assert_eq!(BLKDISCARD, 0x1277);
        assert_eq!(BLKZEROOUT, 0x127f);
    }
}
