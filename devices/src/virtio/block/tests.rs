//! Request-engine and device tests: a mock driver puts chains in a split queue in real guest
//! memory (`GuestMemoryMmap`), the disk is a temporary file.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::MetadataExt;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_DISCARD,
    VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
    VIRTIO_BLK_T_WRITE_ZEROES,
};
use virtio_bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::split::Descriptor as SplitDescriptor;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::config::*;
use super::*;
use crate::virtio::{ActivatedQueue, VirtioDevice, VirtioInterrupt};

const QUEUE_SIZE: u16 = 16;
const DISK_SECTORS: u64 = 256;
/// Guest memory is two adjacent regions; buffers may straddle the boundary.
const REGION_SIZE: u64 = 0x80_0000;
const HDR: u64 = 0x10_0000;
const DATA: u64 = 0x20_0000;
const STATUS: u64 = 0x30_0000;
const INDIRECT: u64 = 0x40_0000;
const OUTSIDE: u64 = 0x4000_0000;
const UNTOUCHED: u8 = 0xee;

fn guest_memory() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[
        (GuestAddress(0), REGION_SIZE as usize),
        (GuestAddress(REGION_SIZE), REGION_SIZE as usize),
    ])
    .unwrap()
}

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len).map(|i| (i as u8).wrapping_mul(7) ^ seed).collect()
}

/// A disk image filled with a pattern (so it is allocated and non-zero).
fn image() -> tempfile::NamedTempFile {
    let mut tmp = tempfile::NamedTempFile::new().unwrap();
    tmp.write_all(&pattern(0x5a, (DISK_SECTORS * 512) as usize))
        .unwrap();
    tmp.as_file().sync_all().unwrap();
    tmp
}

fn file_contents(tmp: &tempfile::NamedTempFile) -> Vec<u8> {
    let mut f = tmp.reopen().unwrap();
    let mut v = Vec::new();
    f.seek(SeekFrom::Start(0)).unwrap();
    f.read_to_end(&mut v).unwrap();
    v
}

fn handler_for(tmp: &tempfile::NamedTempFile, read_only: bool) -> RequestHandler {
    let file = if read_only {
        File::open(tmp.path()).unwrap()
    } else {
        tmp.reopen().unwrap()
    };
    let disk = Disk::new(file, !read_only, false).unwrap();
    RequestHandler::new("blk-test".into(), disk, read_only, Some("serial-0123")).unwrap()
}

/// One descriptor as the driver means it.
#[derive(Clone, Copy)]
struct D {
    addr: u64,
    len: u32,
    write: bool,
}

fn r(addr: u64, len: u32) -> D {
    D {
        addr,
        len,
        write: false,
    }
}

fn w(addr: u64, len: u32) -> D {
    D {
        addr,
        len,
        write: true,
    }
}

/// The driver side of a split queue. (`MockSplitQueue` is not used: in virtio-queue 0.18 it
/// places the used ring over the available ring's entries and `used_event`.)
struct Driver<'a> {
    mem: &'a GuestMemoryMmap,
    desc_table: u64,
    avail_ring: u64,
    used_ring: u64,
    next_desc: u16,
    avail: u16,
}

impl<'a> Driver<'a> {
    fn new(mem: &'a GuestMemoryMmap) -> Self {
        Self::at(mem, GuestAddress(0))
    }

    fn at(mem: &'a GuestMemoryMmap, start: GuestAddress) -> Self {
        let size = u64::from(QUEUE_SIZE);
        let desc_table = start.0;
        let avail_ring = desc_table + 16 * size;
        let used_ring = (avail_ring + 6 + 2 * size).next_multiple_of(4);
        // Zero the rings (flags, indices, events).
        let end = used_ring + 6 + 8 * size;
        mem.write_slice(&vec![0u8; (end - start.0) as usize], start)
            .unwrap();
        Driver {
            mem,
            desc_table,
            avail_ring,
            used_ring,
            next_desc: 0,
            avail: 0,
        }
    }

    fn queue(&self) -> Queue {
        let mut q = Queue::new(QUEUE_SIZE).unwrap();
        q.set_size(QUEUE_SIZE);
        q.set_desc_table_address(
            Some(self.desc_table as u32),
            Some((self.desc_table >> 32) as u32),
        );
        q.set_avail_ring_address(
            Some(self.avail_ring as u32),
            Some((self.avail_ring >> 32) as u32),
        );
        q.set_used_ring_address(
            Some(self.used_ring as u32),
            Some((self.used_ring >> 32) as u32),
        );
        q.set_ready(true);
        q
    }

    fn store(&self, index: u16, addr: u64, len: u32, flags: u32, next: u16) {
        let desc = SplitDescriptor::new(addr, len, flags as u16, next);
        let at = self.desc_table + 16 * u64::from(index);
        self.mem.write_obj(desc, GuestAddress(at)).unwrap();
    }

    /// Writes the chain in the next free descriptors and makes it available.
    fn submit(&mut self, descs: &[D]) -> u16 {
        let head = self.next_desc;
        for (i, d) in descs.iter().enumerate() {
            let index = (head + i as u16) % QUEUE_SIZE;
            let next = (index + 1) % QUEUE_SIZE;
            let mut flags = if d.write { VRING_DESC_F_WRITE } else { 0 };
            if i + 1 < descs.len() {
                flags |= VRING_DESC_F_NEXT;
            }
            self.store(index, d.addr, d.len, flags, next);
        }
        self.next_desc = (head + descs.len() as u16) % QUEUE_SIZE;
        self.make_available(head);
        head
    }

    /// Puts `descs` in an indirect table at INDIRECT and submits one descriptor pointing to it.
    fn submit_indirect(&mut self, descs: &[D]) -> u16 {
        for (i, d) in descs.iter().enumerate() {
            let mut flags = if d.write { VRING_DESC_F_WRITE } else { 0 };
            if i + 1 < descs.len() {
                flags |= VRING_DESC_F_NEXT;
            }
            let desc = SplitDescriptor::new(d.addr, d.len, flags as u16, i as u16 + 1);
            self.mem
                .write_obj(desc, GuestAddress(INDIRECT + 16 * i as u64))
                .unwrap();
        }
        let head = self.next_desc;
        let len = 16 * descs.len() as u32;
        self.store(head, INDIRECT, len, VRING_DESC_F_INDIRECT, 0);
        self.next_desc = (head + 1) % QUEUE_SIZE;
        self.make_available(head);
        head
    }

    fn make_available(&mut self, head: u16) {
        let slot = u64::from(self.avail % QUEUE_SIZE);
        self.mem
            .write_obj(head, GuestAddress(self.avail_ring + 4 + 2 * slot))
            .unwrap();
        self.avail = self.avail.wrapping_add(1);
        self.set_avail_idx(self.avail);
    }

    fn set_avail_idx(&self, idx: u16) {
        self.mem
            .write_obj(idx, GuestAddress(self.avail_ring + 2))
            .unwrap();
    }

    /// (descriptor id, length) of used entry `n`.
    fn used(&self, n: u16) -> (u32, u32) {
        let at = self.used_ring + 4 + 8 * u64::from(n % QUEUE_SIZE);
        let id: u32 = self.mem.read_obj(GuestAddress(at)).unwrap();
        let len: u32 = self.mem.read_obj(GuestAddress(at + 4)).unwrap();
        (id, len)
    }

    fn used_idx(&self) -> u16 {
        self.mem.read_obj(GuestAddress(self.used_ring + 2)).unwrap()
    }

    /// `used_event` sits after the available ring's entries.
    fn set_used_event(&self, value: u16) {
        let at = self.avail_ring + 4 + 2 * u64::from(QUEUE_SIZE);
        self.mem.write_obj(value, GuestAddress(at)).unwrap();
    }
}

fn write_header(mem: &GuestMemoryMmap, slot: u64, request_type: u32, sector: u64) -> u64 {
    let addr = HDR + 16 * slot;
    let mut h = [0u8; 16];
    h[0..4].copy_from_slice(&request_type.to_le_bytes());
    h[8..16].copy_from_slice(&sector.to_le_bytes());
    mem.write_slice(&h, GuestAddress(addr)).unwrap();
    addr
}

fn status_at(mem: &GuestMemoryMmap, slot: u64) -> u64 {
    let addr = STATUS + slot;
    mem.write_obj(UNTOUCHED, GuestAddress(addr)).unwrap();
    addr
}

fn status(mem: &GuestMemoryMmap, addr: u64) -> u8 {
    mem.read_obj(GuestAddress(addr)).unwrap()
}

/// Submits header + `data` + status; returns the status address.
fn submit(drv: &mut Driver, slot: u64, request_type: u32, sector: u64, data: &[D]) -> u64 {
    let hdr = write_header(drv.mem, slot, request_type, sector);
    let st = status_at(drv.mem, slot);
    let mut descs = vec![r(hdr, 16)];
    descs.extend_from_slice(data);
    descs.push(w(st, 1));
    drv.submit(&descs);
    st
}

fn process(h: &mut RequestHandler, mem: &GuestMemoryMmap, q: &mut Queue) -> bool {
    h.process_queue(mem, q).unwrap()
}

fn read_guest(mem: &GuestMemoryMmap, addr: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
    v
}

const OK: u8 = VIRTIO_BLK_S_OK as u8;
const IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;
const UNSUPP: u8 = VIRTIO_BLK_S_UNSUPP as u8;

#[test]
fn write_then_read_back() {
    let tmp = image();
    let mem = guest_memory();
    let mut drv = Driver::new(&mem);
    let mut q = drv.queue();
    let mut h = handler_for(&tmp, false);

    let data = pattern(1, 1024);
    mem.write_slice(&data, GuestAddress(DATA)).unwrap();
    let st = submit(&mut drv, 0, VIRTIO_BLK_T_OUT, 3, &[r(DATA, 1024)]);
    assert!(process(&mut h, &mem, &mut q));
    assert_eq!(status(&mem, st), OK);
    assert_eq!(drv.used(0), (0, 1), "OUT writes only the status byte");
    assert_eq!(&file_contents(&tmp)[3 * 512..5 * 512], &data[..]);

    let st = submit(&mut drv, 1, VIRTIO_BLK_T_IN, 3, &[w(DATA + 0x10000, 1024)]);
    assert!(process(&mut h, &mem, &mut q));
    assert_eq!(status(&mem, st), OK);
    assert_eq!(
        drv.used(1).1,
        1025,
        "IN writes the data and the status byte"
    );
    assert_eq!(read_guest(&mem, DATA + 0x10000, 1024), data);

    let c = h.counters();
    assert_eq!(c.writes.load(Ordering::Relaxed), 1);
    assert_eq!(c.reads.load(Ordering::Relaxed), 1);
    assert_eq!(c.write_bytes.load(Ordering::Relaxed), 1024);
    assert_eq!(c.read_bytes.load(Ordering::Relaxed), 1024);
    assert_eq!(c.errors.load(Ordering::Relaxed), 0);
}

#[test]
fn multi_segment_io_across_regions() {
    let tmp = image();
    let mem = guest_memory();
    let mut drv = Driver::new(&mem);
    let mut q = drv.queue();
    let mut h = handler_for(&tmp, false);

    // The second segment straddles the boundary between the two memory regions.
    let straddle = REGION_SIZE - 300;
    let segs = [(DATA, 512u32), (straddle, 1024), (DATA + 0x8000, 1536)];
    let data = pattern(9, 3072);
    let mut off = 0;
    for (addr, len) in segs {
        mem.write_slice(&data[off..off + len as usize], GuestAddress(addr))
            .unwrap();
        off += len as usize;
    }
    let descs: Vec<D> = segs.iter().map(|&(a, l)| r(a, l)).collect();
    let st = submit(&mut drv, 0, VIRTIO_BLK_T_OUT, 10, &descs);
    process(&mut h, &mem, &mut q);
    assert_eq!(status(&mem, st), OK);
    assert_eq!(&file_contents(&tmp)[10 * 512..16 * 512], &data[..]);

    // Read it back into four differently sized buffers, one straddling again.
    let bufs = [
        (DATA + 0x20000, 100u32),
        (straddle, 1948),
        (DATA + 0x30000, 1000),
        (DATA + 0x40000, 24),
    ];
    let descs: Vec<D> = bufs.iter().map(|&(a, l)| w(a, l)).collect();
    let st = submit(&mut drv, 1, VIRTIO_BLK_T_IN, 10, &descs);
    process(&mut h, &mem, &mut q);
    assert_eq!(status(&mem, st), OK);
    assert_eq!(drv.used(1).1, 3073);
    let mut back = Vec::new();
    for (addr, len) in bufs {
        back.extend(read_guest(&mem, addr, len as usize));
    }
    assert_eq!(back, data);
}

#[test]
fn header_and_status_may_share_descriptors_with_data() {
    // virtio 1.x has no fixed layout: header+data in one buffer, data+status in another.
    let tmp = image();
    let mem = guest_memory();
    let mut drv = Driver::new(&mem);
    let mut q = drv.queue();
    let mut h = handler_for(&tmp, false);

    let data = pattern(3, 512);
    write_header(&mem, 0, VIRTIO_BLK_T_OUT, 1);
    mem.write_slice(&data, GuestAddress(HDR + 16)).unwrap();
    let st = status_at(&mem, 0);
    drv.submit(&[r(HDR, 16 + 512), w(st, 1)]);
    process(&mut h, &mem, &mut q);
    assert_eq!(status(&mem, st), OK);
    assert_eq!(&file_contents(&tmp)[512..1024], &data[..]);

    write_header(&mem, 1, VIRTIO_BLK_T_IN, 1);
    mem.write_obj(UNTOUCHED, GuestAddress(DATA + 512)).unwrap();
    drv.submit(&[r(HDR + 16, 16), w(DATA, 513)]);
    process(&mut h, &mem, &mut q);
    assert_eq!(status(&mem, DATA + 512), OK);
    assert_eq!(read_guest(&mem, DATA, 512), data);
}

#[test]
fn indirect_chain() {
    let tmp = image();
    let mem = guest_memory();
    let mut drv = Driver::new(&mem);
    let mut q = drv.queue();
    let mut h = handler_for(&tmp, false);

    let hdr = write_header(&mem, 0, VIRTIO_BLK_T_IN, 0);
    let st = status_at(&mem, 0);
    drv.submit_indirect(&[r(hdr, 16), w(DATA, 512), w(DATA + 4096, 512), w(st, 1)]);
    process(&mut h, &mem, &mut q);
    assert_eq!(status(&mem, st), OK);
    let disk = file_contents(&tmp);
    assert_eq!(read_guest(&mem, DATA, 512), &disk[..512]);
    assert_eq!(read_guest(&mem, DATA + 4096, 512), &disk[512..1024]);
}

#[test]
fn flush_syncs_before_writing_the_status() {
    let tmp = image();
    let mem = guest_memory();
    let mut drv = Driver::new(&mem);
    let mut q = drv.queue();
    let mut h = handler_for(&tmp, false);

    // The hook runs right after fdatasync returns: the status must still be untouched then.
    let seen = Arc::new(Mutex::new(Vec::new()));
    let (seen2, mem2) = (seen.clone(), mem.clone());
    let st_addr = STATUS;
    h.disk_mut().sync_hook = Some(Box::new(move || {
        let s: u8 = mem2.read_obj(GuestAddress(st_addr)).unwrap();
        seen2.lock().unwrap().push(s);
    }));
    let st = submit(&mut drv, 0, VIRTIO_BLK_T_FLUSH, 0, &[]);
    assert_eq!(st, st_addr);
    process(&mut h, &mem, &mut q);
    assert_eq!(*seen.lock().unwrap(), vec![UNTOUCHED]);
    assert_eq!(status(&mem, st), OK);
    assert_eq!(h.counters().flushes.load(Ordering::Relaxed), 1);
}

#[test]
fn writethrough_syncs_every_write() {
    let tmp = image();
    let mem = guest_memory();
    let mut drv = Driver::new(&mem);
    let mut q = drv.queue();
    let mut h = handler_for(&tmp, false);
    let syncs = Arc::new(Mutex::new(0));
    let syncs2 = syncs.clone();
    h.disk_mut().sync_hook = Some(Box::new(move || *syncs2.lock().unwrap() += 1));

    submit(&mut drv, 0, VIRTIO_BLK_T_OUT, 0, &[r(DATA, 512)]);
    process(&mut h, &mem, &mut q);
    assert_eq!(*syncs.lock().unwrap(), 0, "write-back by default");

    h.set_writethrough(true);
    let st = submit(&mut drv, 1, VIRTIO_BLK_T_OUT, 0, &[r(DATA, 512)]);
    process(&mut h, &mem, &mut q);
    assert_eq!(status(&mem, st), OK);
    assert_eq!(*syncs.lock().unwrap(), 1);
}

#[test]
fn get_id() {
    let tmp = image();
    let mem = guest_memory();
    let mut drv = Driver::new(&mem);
    let mut q = drv.queue();
    let mut h = handler_for(&tmp, false);

    mem.write_slice(&[0xffu8; 20], GuestAddress(DATA)).unwrap();
    let st = submit(&mut drv, 0, VIRTIO_BLK_T_GET_ID, 0, &[w(DATA, 20)]);
    process(&mut h, &mem, &mut q);
    assert_eq!(status(&mem, st), OK);
    let mut expected = [0u8; 20];
    expected[..11].copy_from_slice(b"serial-0123");
    assert_eq!(read_guest(&mem, DATA, 20), expected);
    assert_eq!(drv.used(0).1, 21);

    // A short buffer gets a truncated ID.
    mem.write_slice(&[0xffu8; 8], GuestAddress(DATA + 64))
        .unwrap();
    let st = submit(&mut drv, 1, VIRTIO_BLK_T_GET_ID, 0, &[w(DATA + 64, 4)]);
    process(&mut h, &mem, &mut q);
    assert_eq!(status(&mem, st), OK);
    assert_eq!(read_guest(&mem, DATA + 64, 8), b"seri\xff\xff\xff\xff");
    assert_eq!(drv.used(1).1, 5);

    assert!(matches!(
        RequestHandler::new(
            "x".into(),
            Disk::new(tmp.reopen().unwrap(), true, false).unwrap(),
            false,
            Some("a-serial-longer-than-20")
        ),
        Err(BlockError::SerialTooLong(23))
    ));
}

/// Sends one DISCARD / WRITE_ZEROES segment.
fn submit_range(
    drv: &mut Driver,
    slot: u64,
    kind: u32,
    sector: u64,
    count: u32,
    flags: u32,
) -> u64 {
    let seg_addr = DATA + 0x1000 * slot;
    let mut seg = [0u8; 16];
    seg[0..8].copy_from_slice(&sector.to_le_bytes());
    seg[8..12].copy_from_slice(&count.to_le_bytes());
    seg[12..16].copy_from_slice(&flags.to_le_bytes());
    drv.mem.write_slice(&seg, GuestAddress(seg_addr)).unwrap();
    submit(drv, slot, kind, 0, &[r(seg_addr, 16)])
}

#[test]
fn discard_punches_a_hole() {
    let tmp = image();
    let mem = guest_memory();
    let mut drv = Driver::new(&mem);
    let mut q = drv.queue();
    let mut h = handler_for(&tmp, false);
    if !h.disk().supports_discard() {
        eprintln!("skipped: the temp directory's filesystem cannot punch holes");
        return;
    }
    let blocks_before = tmp.as_file().metadata().unwrap().blocks();
    let st = submit_range(&mut drv, 0, VIRTIO_BLK_T_DISCARD, 64, 128, 0);
    process(&mut h, &mem, &mut q);
    assert_eq!(status(&mem, st), OK);
    let blocks_after = tmp.as_file().metadata().unwrap().blocks();
    assert!(
        blocks_after < blocks_before,
        "{blocks_after} >= {blocks_before}"
    );
    let disk = file_contents(&tmp);
    assert!(disk[64 * 512..192 * 512].iter().all(|&b| b == 0));
    assert_eq!(disk[..64 * 512], pattern(0x5a, 64 * 512)[..]);
    assert_eq!(disk.len() as u64, DISK_SECTORS * 512, "size kept");

    // Past the end, too big, flags, several segments.
    let st = submit_range(&mut drv, 1, VIRTIO_BLK_T_DISCARD, DISK_SECTORS - 1, 2, 0);
    process(&mut h, &mem, &mut q);
    assert_eq!(status(&mem, st), IOERR);
    let st = submit_range(
        &mut drv,
        2,
        VIRTIO_BLK_T_DISCARD,
        0,
        MAX_DISCARD_SECTORS + 1,
        0,
    );
    process(&mut h, &mem, &mut q);
    assert_eq!(status(&mem, st), IOERR);
    let st = submit_range(&mut drv, 3, VIRTIO_BLK_T_DISCARD, 0, 1, 1);
    process(&mut h, &mem, &mut q);
    assert_eq!(status(&mem, st), UNSUPP, "UNMAP is not a discard flag");
    let st = submit(&mut drv, 4, VIRTIO_BLK_T_DISCARD, 0, &[r(DATA, 32)]);
    process(&mut h, &mem, &mut q);
    assert_eq!(status(&mem, st), UNSUPP, "one segment at most");
    let st = submit(&mut drv, 5, VIRTIO_BLK_T_DISCARD, 0, &[r(DATA, 10)]);
    process(&mut h, &mem, &mut q);
    assert_eq!(status(&mem, st), IOERR, "partial segment");
}

#[test]
fn discard_unsupported_without_hole_punching() {
    let tmp = image();
    let mem = guest_memory();
    let mut drv = Driver::new(&mem);
    let mut q = drv.queue();
    let mut h = handler_for(&tmp, false);
    h.disk_mut().set_discard(false);
    let st = submit_range(&mut drv, 0, VIRTIO_BLK_T_DISCARD, 0, 8, 0);
    process(&mut h, &mem, &mut q);
    assert_eq!(status(&mem, st), UNSUPP);
    assert_eq!(
        file_contents(&tmp),
        pattern(0x5a, (DISK_SECTORS * 512) as usize)
    );
}

#[test]
fn write_zeroes_all_paths() {
    let tmp = image();
    let mem = guest_memory();
    let mut drv = Driver::new(&mem);
    let mut q = drv.queue();
    let mut h = handler_for(&tmp, false);
    let zeroed = |tmp: &tempfile::NamedTempFile, from: u64, count: u64| {
        let d = file_contents(tmp);
        d[(from * 512) as usize..((from + count) * 512) as usize]
            .iter()
            .all(|&b| b == 0)
    };

    // ZERO_RANGE (or the fallback when the filesystem lacks it).
    let st = submit_range(&mut drv, 0, VIRTIO_BLK_T_WRITE_ZEROES, 1, 3, 0);
    process(&mut h, &mem, &mut q);
    assert_eq!(status(&mem, st), OK);
    assert!(zeroed(&tmp, 1, 3));
    assert!(!zeroed(&tmp, 0, 1) && !zeroed(&tmp, 4, 1));

    // UNMAP: punch a hole when possible.
    let st = submit_range(&mut drv, 1, VIRTIO_BLK_T_WRITE_ZEROES, 16, 16, 1);
    process(&mut h, &mem, &mut q);
    assert_eq!(status(&mem, st), OK);
    assert!(zeroed(&tmp, 16, 16));

    // Writing zero buffers.
    h.disk_mut().set_zero_range(false);
    h.disk_mut().set_discard(false);
    let st = submit_range(&mut drv, 2, VIRTIO_BLK_T_WRITE_ZEROES, 100, 50, 1);
    process(&mut h, &mem, &mut q);
    assert_eq!(status(&mem, st), OK);
    assert!(zeroed(&tmp, 100, 50));
    assert!(!zeroed(&tmp, 99, 1) && !zeroed(&tmp, 150, 1));

    let st = submit_range(&mut drv, 3, VIRTIO_BLK_T_WRITE_ZEROES, 0, 1, 2);
    process(&mut h, &mem, &mut q);
    assert_eq!(status(&mem, st), UNSUPP, "unknown flag");
    let st = submit_range(&mut drv, 4, VIRTIO_BLK_T_WRITE_ZEROES, u64::MAX, 2, 0);
    process(&mut h, &mem, &mut q);
    assert_eq!(status(&mem, st), IOERR, "sector overflow");
}

#[test]
fn read_only_disk() {
    let tmp = image();
    let before = file_contents(&tmp);
    let mem = guest_memory();
    let mut drv = Driver::new(&mem);
    let mut q = drv.queue();
    let mut h = handler_for(&tmp, true);

    let st = submit(&mut drv, 0, VIRTIO_BLK_T_OUT, 0, &[r(DATA, 512)]);
    process(&mut h, &mem, &mut q);
    assert_eq!(status(&mem, st), IOERR);
    let st = submit_range(&mut drv, 1, VIRTIO_BLK_T_DISCARD, 0, 8, 0);
    process(&mut h, &mem, &mut q);
    assert_eq!(status(&mem, st), IOERR);
    let st = submit_range(&mut drv, 2, VIRTIO_BLK_T_WRITE_ZEROES, 0, 8, 0);
    process(&mut h, &mem, &mut q);
    assert_eq!(status(&mem, st), IOERR);
    assert_eq!(file_contents(&tmp), before);

    // Reads and flushes still work.
    let st = submit(&mut drv, 3, VIRTIO_BLK_T_IN, 0, &[w(DATA, 512)]);
    process(&mut h, &mem, &mut q);
    assert_eq!(status(&mem, st), OK);
    let st = submit(&mut drv, 4, VIRTIO_BLK_T_FLUSH, 0, &[]);
    process(&mut h, &mem, &mut q);
    assert_eq!(status(&mem, st), OK);
    assert_eq!(h.counters().errors.load(Ordering::Relaxed), 3);

    let f = config::device_features(h.disk(), true);
    assert_ne!(f & VIRTIO_BLK_F_RO, 0);
    assert_eq!(f & (VIRTIO_BLK_F_DISCARD | VIRTIO_BLK_F_WRITE_ZEROES), 0);
}

#[test]
fn unknown_request_type_is_unsupported() {
    let tmp = image();
    let mem = guest_memory();
    let mut drv = Driver::new(&mem);
    let mut q = drv.queue();
    let mut h = handler_for(&tmp, false);
    for (slot, t) in [(0, 2u32), (1, 14), (2, 0xdead_beef)] {
        let st = submit(&mut drv, slot, t, 0, &[w(DATA, 512)]);
        process(&mut h, &mem, &mut q);
        assert_eq!(status(&mem, st), UNSUPP, "type {t}");
        assert_eq!(drv.used(slot as u16).1, 1);
    }
}

#[test]
fn malformed_requests_fail_with_ioerr() {
    let out = HDR;
    let cases: Vec<(&str, Vec<D>)> = vec![
        (
            "data outside guest memory",
            vec![r(out, 16), r(OUTSIDE, 512), w(STATUS, 1)],
        ),
        (
            "data running off the end of memory",
            vec![r(out, 16), r(2 * REGION_SIZE - 256, 512), w(STATUS, 1)],
        ),
        (
            "address + length overflows",
            vec![r(out, 16), r(u64::MAX - 100, 512), w(STATUS, 1)],
        ),
        (
            "OUT data device-writable",
            vec![r(out, 16), w(DATA, 512), w(STATUS, 1)],
        ),
        (
            "OUT length not whole sectors",
            vec![r(out, 16), r(DATA, 100), w(STATUS, 1)],
        ),
        ("short header", vec![r(out, 8), w(STATUS, 1)]),
        (
            "header outside guest memory",
            vec![r(OUTSIDE, 16), w(STATUS, 1)],
        ),
    ];
    for (name, descs) in cases {
        eprintln!("case: {name}");
        expect_ioerr_with_header(&descs, VIRTIO_BLK_T_OUT, 0);
    }
    let cases: Vec<(&str, u64, Vec<D>)> = vec![
        (
            "IN data device-readable",
            0,
            vec![r(DATA, 512), w(STATUS, 1)],
        ),
        (
            "IN length not whole sectors",
            0,
            vec![w(DATA, 700), w(STATUS, 1)],
        ),
        (
            "IN past the end",
            DISK_SECTORS - 1,
            vec![w(DATA, 1024), w(STATUS, 1)],
        ),
        (
            "IN sector overflow",
            u64::MAX,
            vec![w(DATA, 512), w(STATUS, 1)],
        ),
        (
            "IN sector far past the end",
            1 << 60,
            vec![w(DATA, 512), w(STATUS, 1)],
        ),
        (
            "IN data outside guest memory",
            0,
            vec![w(OUTSIDE, 512), w(STATUS, 1)],
        ),
    ];
    for (name, sector, mut descs) in cases {
        eprintln!("case: {name}");
        descs.insert(0, r(HDR, 16));
        expect_ioerr_with_header(&descs, VIRTIO_BLK_T_IN, sector);
    }
}

/// Submits `descs` as they are, with a header of `request_type` at HDR, and checks the request
/// failed with IOERR without touching the disk.
fn expect_ioerr_with_header(descs: &[D], request_type: u32, sector: u64) {
    let tmp = image();
    let before = file_contents(&tmp);
    let mem = guest_memory();
    write_header(&mem, 0, request_type, sector);
    let st = descs.last().unwrap().addr;
    mem.write_obj(UNTOUCHED, GuestAddress(st)).unwrap();
    let mut drv = Driver::new(&mem);
    let mut q = drv.queue();
    let mut h = handler_for(&tmp, false);
    drv.submit(descs);
    process(&mut h, &mem, &mut q);
    assert_eq!(status(&mem, st), IOERR);
    assert_eq!(drv.used_idx(), 1);
    assert_eq!(drv.used(0).1, 1);
    assert_eq!(file_contents(&tmp), before, "nothing written");
    assert_eq!(h.counters().errors.load(Ordering::Relaxed), 1);
}

/// Chains that cannot carry a status come back with used length 0, status untouched.
fn expect_dropped(setup: impl FnOnce(&mut Driver)) {
    let tmp = image();
    let before = file_contents(&tmp);
    let mem = guest_memory();
    write_header(&mem, 0, VIRTIO_BLK_T_OUT, 0);
    mem.write_obj(UNTOUCHED, GuestAddress(STATUS)).unwrap();
    let mut drv = Driver::new(&mem);
    let mut q = drv.queue();
    let mut h = handler_for(&tmp, false);
    setup(&mut drv);
    process(&mut h, &mem, &mut q);
    assert_eq!(drv.used_idx(), 1, "the chain is returned to the driver");
    assert_eq!(drv.used(0).1, 0);
    assert_eq!(status(&mem, STATUS), UNTOUCHED);
    assert_eq!(file_contents(&tmp), before);
    assert_eq!(h.counters().errors.load(Ordering::Relaxed), 1);
}

#[test]
fn broken_chains_are_dropped() {
    eprintln!("case: no status descriptor");
    expect_dropped(|d| {
        d.submit(&[r(HDR, 16), r(DATA, 512)]);
    });
    eprintln!("case: status descriptor not writable");
    expect_dropped(|d| {
        d.submit(&[r(HDR, 16), r(DATA, 512), r(STATUS, 1)]);
    });
    eprintln!("case: readable after writable");
    expect_dropped(|d| {
        d.submit(&[r(HDR, 16), w(STATUS, 1), r(DATA, 512)]);
    });
    eprintln!("case: status outside guest memory");
    expect_dropped(|d| {
        d.submit(&[r(HDR, 16), r(DATA, 512), w(OUTSIDE, 1)]);
    });
    eprintln!("case: descriptor loop");
    expect_dropped(|d| {
        d.store(0, HDR, 16, VRING_DESC_F_NEXT, 1);
        d.store(1, DATA, 512, VRING_DESC_F_NEXT, 0);
        d.make_available(0);
    });
    eprintln!("case: next index beyond the table");
    expect_dropped(|d| {
        d.store(0, HDR, 16, VRING_DESC_F_NEXT, 200);
        d.make_available(0);
    });
    eprintln!("case: chain longer than 4 GiB");
    expect_dropped(|d| {
        d.submit(&[r(HDR, 16), r(DATA, u32::MAX - 8), w(STATUS, 1)]);
    });
    eprintln!("case: indirect chain longer than the queue");
    expect_dropped(|d| {
        let mut descs = vec![r(HDR, 16)];
        descs.extend((0..QUEUE_SIZE).map(|i| r(DATA + 512 * u64::from(i), 512)));
        descs.push(w(STATUS, 1));
        d.submit_indirect(&descs);
    });
    eprintln!("case: indirect table outside guest memory");
    expect_dropped(|d| {
        d.store(0, OUTSIDE, 48, VRING_DESC_F_INDIRECT, 0);
        d.make_available(0);
    });
    eprintln!("case: indirect table length not whole descriptors");
    expect_dropped(|d| {
        d.submit_indirect(&[r(HDR, 16), w(STATUS, 1)]);
        d.store(0, INDIRECT, 20, VRING_DESC_F_INDIRECT, 0);
    });
    eprintln!("case: nested indirect table");
    expect_dropped(|d| {
        d.submit_indirect(&[r(HDR, 16), w(STATUS, 1)]);
        let nested = SplitDescriptor::new(INDIRECT, 32, VRING_DESC_F_INDIRECT as u16, 0);
        d.mem.write_obj(nested, GuestAddress(INDIRECT)).unwrap();
    });
    eprintln!("case: empty indirect table");
    expect_dropped(|d| {
        d.store(0, INDIRECT, 0, VRING_DESC_F_INDIRECT, 0);
        d.make_available(0);
    });
}

#[test]
fn bogus_available_ring_does_not_panic() {
    let tmp = image();
    let mem = guest_memory();
    let mut drv = Driver::new(&mem);
    let mut q = drv.queue();
    let mut h = handler_for(&tmp, false);

    // A head index beyond the queue: skipped, and the next chain is still served.
    drv.make_available(QUEUE_SIZE + 3);
    let st = submit(&mut drv, 0, VIRTIO_BLK_T_IN, 0, &[w(DATA, 512)]);
    assert!(process(&mut h, &mem, &mut q));
    assert_eq!(status(&mem, st), OK);
    assert_eq!(drv.used_idx(), 1);

    // An available index running more than a queue ahead: the queue is unusable.
    drv.set_avail_idx(drv.avail.wrapping_add(QUEUE_SIZE + 1));
    assert!(matches!(
        h.process_queue(&mem, &mut q),
        Err(BlockError::Queue(_))
    ));
}

#[test]
fn host_io_errors_become_ioerr() {
    let tmp = image();
    let mem = guest_memory();
    let mut drv = Driver::new(&mem);
    let mut q = drv.queue();
    let mut h = handler_for(&tmp, false);
    // The image shrinks behind the device's back: reads past the new end hit EOF.
    tmp.as_file().set_len(512).unwrap();
    let st = submit(&mut drv, 0, VIRTIO_BLK_T_IN, 8, &[w(DATA, 512)]);
    process(&mut h, &mem, &mut q);
    assert_eq!(status(&mem, st), IOERR);
    assert_eq!(drv.used(0).1, 1);
}

#[test]
fn event_idx_suppresses_notifications() {
    let tmp = image();
    let mem = guest_memory();
    let mut drv = Driver::new(&mem);
    let mut q = drv.queue();
    q.set_event_idx(true);
    let mut h = handler_for(&tmp, false);

    // The driver wants an interrupt once used index passes 0: three at once give one.
    drv.set_used_event(0);
    for slot in 0..3 {
        submit(&mut drv, slot, VIRTIO_BLK_T_IN, 0, &[w(DATA, 512)]);
    }
    assert!(process(&mut h, &mem, &mut q));
    assert_eq!(drv.used_idx(), 3);

    // Still asking about index 0: no interrupt for the fourth.
    submit(&mut drv, 3, VIRTIO_BLK_T_IN, 0, &[w(DATA, 512)]);
    assert!(!process(&mut h, &mem, &mut q));
    assert_eq!(drv.used_idx(), 4);

    // Now the driver asks to hear about the fifth.
    drv.set_used_event(4);
    submit(&mut drv, 4, VIRTIO_BLK_T_IN, 0, &[w(DATA, 512)]);
    assert!(process(&mut h, &mem, &mut q));

    // Nothing processed, nothing to say.
    assert!(!process(&mut h, &mem, &mut q));
}

#[test]
fn one_call_handles_at_most_a_queue_worth() {
    let tmp = image();
    let mem = guest_memory();
    let mut drv = Driver::new(&mem);
    let mut q = drv.queue();
    let mut h = handler_for(&tmp, false);

    // A driver that makes the flush available again each time it completes.
    let st = submit(&mut drv, 0, VIRTIO_BLK_T_FLUSH, 0, &[]);
    let (mem2, avail_ring) = (mem.clone(), drv.avail_ring);
    h.disk_mut().sync_hook = Some(Box::new(move || {
        let idx: u16 = mem2.read_obj(GuestAddress(avail_ring + 2)).unwrap();
        let slot = u64::from(idx % QUEUE_SIZE);
        mem2.write_obj(0u16, GuestAddress(avail_ring + 4 + 2 * slot))
            .unwrap();
        mem2.write_obj(idx.wrapping_add(1), GuestAddress(avail_ring + 2))
            .unwrap();
    }));
    process(&mut h, &mem, &mut q);
    assert_eq!(
        drv.used_idx(),
        QUEUE_SIZE,
        "the call returned after a queue's worth"
    );
    assert_eq!(status(&mem, st), OK);

    h.disk_mut().sync_hook = None;
    process(&mut h, &mem, &mut q);
    assert_eq!(drv.used_idx(), QUEUE_SIZE + 1);
}

/// Records interrupts and lets a test wait for them.
#[derive(Default)]
struct MockInterrupt {
    count: Mutex<u32>,
    cond: Condvar,
}

impl MockInterrupt {
    fn wait_for(&self, n: u32) -> bool {
        let guard = self.count.lock().unwrap();
        let (guard, _) = self
            .cond
            .wait_timeout_while(guard, Duration::from_secs(10), |c| *c < n)
            .unwrap();
        *guard >= n
    }

    fn count(&self) -> u32 {
        *self.count.lock().unwrap()
    }
}

impl VirtioInterrupt for MockInterrupt {
    fn signal_used_queue(&self, queue_index: u16) -> std::io::Result<()> {
        assert_eq!(queue_index, 0);
        *self.count.lock().unwrap() += 1;
        self.cond.notify_all();
        Ok(())
    }

    fn signal_config_change(&self) -> std::io::Result<()> {
        Ok(())
    }
}

fn block_for(tmp: &tempfile::NamedTempFile) -> Block {
    Block::new(BlockConfig {
        file: tmp.reopen().unwrap(),
        read_only: false,
        serial: Some("worker\0disk".into()),
        direct: false,
        queue_size: QUEUE_SIZE,
    })
    .unwrap()
}

fn activate(
    block: &mut Block,
    mem: &GuestMemoryMmap,
    drv: &Driver,
    irq: &Arc<MockInterrupt>,
) -> EventFd {
    let kick = EventFd::new(EFD_NONBLOCK).unwrap();
    let queue = ActivatedQueue {
        index: 0,
        queue: drv.queue(),
        kick: kick.try_clone().unwrap(),
    };
    block
        .activate(mem.clone(), irq.clone(), vec![queue])
        .unwrap();
    kick
}

#[test]
fn worker_serves_kicks_and_stops_on_reset() {
    let tmp = image();
    let mem = guest_memory();
    let mut drv = Driver::new(&mem);
    let mut block = block_for(&tmp);
    block.ack_features(block.features());
    let irq = Arc::new(MockInterrupt::default());
    let kick = activate(&mut block, &mem, &drv, &irq);

    let data = pattern(42, 1024);
    mem.write_slice(&data, GuestAddress(DATA)).unwrap();
    drv.set_used_event(0);
    let st = submit(&mut drv, 0, VIRTIO_BLK_T_OUT, 20, &[r(DATA, 1024)]);
    kick.write(1).unwrap();
    assert!(irq.wait_for(1), "no interrupt after the kick");
    assert_eq!(drv.used_idx(), 1);
    assert_eq!(drv.used(0), (0, 1));
    assert_eq!(status(&mem, st), OK);
    assert_eq!(&file_contents(&tmp)[20 * 512..22 * 512], &data[..]);
    assert_eq!(block.counters().writes.load(Ordering::Relaxed), 1);

    drv.set_used_event(1);
    let st = submit(&mut drv, 1, VIRTIO_BLK_T_IN, 20, &[w(DATA + 0x1000, 1024)]);
    kick.write(1).unwrap();
    assert!(irq.wait_for(2));
    assert_eq!(status(&mem, st), OK);
    assert_eq!(read_guest(&mem, DATA + 0x1000, 1024), data);

    // Reset joins the worker: later kicks are not served.
    assert!(block.reset());
    let st = submit(&mut drv, 2, VIRTIO_BLK_T_FLUSH, 0, &[]);
    kick.write(1).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(status(&mem, st), UNTOUCHED);
    assert_eq!(drv.used_idx(), 2);
    assert_eq!(irq.count(), 2);
    assert!(block.reset(), "reset of an inactive device");

    // The disk survives the reset: a fresh queue works again.
    let mut drv2 = Driver::at(&mem, GuestAddress(0x8000));
    block.ack_features(block.features());
    let kick = activate(&mut block, &mem, &drv2, &irq);
    let st = submit(&mut drv2, 3, VIRTIO_BLK_T_FLUSH, 0, &[]);
    kick.write(1).unwrap();
    assert!(irq.wait_for(3));
    assert_eq!(status(&mem, st), OK);
    drop(block); // Stops the worker too.
}

#[test]
fn worker_serves_requests_made_before_the_first_kick() {
    let tmp = image();
    let mem = guest_memory();
    let mut drv = Driver::new(&mem);
    let mut block = block_for(&tmp);
    block.ack_features(block.features());
    let st = submit(&mut drv, 0, VIRTIO_BLK_T_FLUSH, 0, &[]);
    let irq = Arc::new(MockInterrupt::default());
    let _kick = activate(&mut block, &mem, &drv, &irq);
    assert!(irq.wait_for(1));
    assert_eq!(status(&mem, st), OK);
    assert!(block.reset());
}

#[test]
fn activation_errors() {
    let tmp = image();
    let mem = guest_memory();
    let drv = Driver::new(&mem);
    let mut block = block_for(&tmp);
    let irq: Arc<dyn VirtioInterrupt> = Arc::new(MockInterrupt::default());
    assert!(matches!(
        block.activate(mem.clone(), irq.clone(), vec![]),
        Err(ActivateError::QueueCount { got: 0, want: 1 })
    ));
    let mut not_ready = drv.queue();
    not_ready.set_ready(false);
    let queue = ActivatedQueue {
        index: 0,
        queue: not_ready,
        kick: EventFd::new(EFD_NONBLOCK).unwrap(),
    };
    assert!(block
        .activate(mem.clone(), irq.clone(), vec![queue])
        .is_err());

    let irq2 = Arc::new(MockInterrupt::default());
    let _kick = activate(&mut block, &mem, &drv, &irq2);
    let queue = ActivatedQueue {
        index: 0,
        queue: drv.queue(),
        kick: EventFd::new(EFD_NONBLOCK).unwrap(),
    };
    assert!(matches!(
        block.activate(mem.clone(), irq, vec![queue]),
        Err(ActivateError::Other(_))
    ));
    assert!(block.reset());
}

#[test]
fn device_identity_and_config() {
    let tmp = image();
    let block = block_for(&tmp);
    assert_eq!(block.device_type(), crate::virtio::TYPE_BLOCK);
    assert_eq!(block.queue_max_sizes(), vec![QUEUE_SIZE]);
    assert_eq!(
        block.name, "blk-workerdisk",
        "NUL removed from the thread name"
    );

    let mut capacity = [0u8; 8];
    block.read_config(0, &mut capacity);
    assert_eq!(u64::from_le_bytes(capacity), DISK_SECTORS);
    let mut seg_max = [0u8; 4];
    block.read_config(12, &mut seg_max);
    assert_eq!(u32::from_le_bytes(seg_max), u32::from(QUEUE_SIZE) - 2);
    // Reads straddling or past the end are zero filled.
    let mut tail = [0xffu8; 8];
    block.read_config(CONFIG_SPACE_SIZE as u64 - 2, &mut tail);
    assert_eq!(tail[2..], [0u8; 6]);
    let mut far = [0xffu8; 4];
    block.read_config(u64::MAX, &mut far);
    assert_eq!(far, [0; 4]);

    let mut b2 = block_for(&tmp);
    b2.ack_features(VIRTIO_BLK_F_FLUSH | (1 << 63));
    assert_eq!(
        b2.acked_features, VIRTIO_BLK_F_FLUSH,
        "unknown bits ignored"
    );
}

#[test]
fn block_new_validates_its_config() {
    let tmp = image();
    for queue_size in [0, 2, 3, 100, 512] {
        let r = Block::new(BlockConfig {
            file: tmp.reopen().unwrap(),
            read_only: false,
            serial: None,
            direct: false,
            queue_size,
        });
        assert!(matches!(r, Err(BlockError::QueueSize(q)) if q == queue_size));
    }
    let r = Block::new(BlockConfig {
        file: File::open(tmp.path()).unwrap(),
        read_only: false,
        serial: None,
        direct: false,
        queue_size: 256,
    });
    assert!(matches!(r, Err(BlockError::Disk(DiskError::NotWritable))));
    let r = Block::new(BlockConfig {
        file: tmp.reopen().unwrap(),
        read_only: false,
        serial: Some("x".repeat(21)),
        direct: false,
        queue_size: 256,
    });
    assert!(matches!(r, Err(BlockError::SerialTooLong(21))));
}
