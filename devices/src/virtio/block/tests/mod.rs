//! Request-engine and device tests: a mock driver puts chains in a split queue in real guest
//! memory (`GuestMemoryMmap`), the disk is a temporary file. Shared helpers live here; the
//! tests are split by topic.

mod device;
mod malformed;
mod requests;

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
