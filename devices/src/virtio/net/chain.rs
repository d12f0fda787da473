//! Descriptor chains turned into host buffers, the used ring, and the frame I/O interface the
//! rx/tx paths drive (a tap in the VMM, a fake in tests).

use std::io;
use std::num::Wrapping;
use std::sync::atomic::{fence, Ordering};

use virtio_bindings::virtio_ring::VRING_AVAIL_F_NO_INTERRUPT;
use virtio_queue::{DescriptorChain, Queue, QueueT};
use vm_memory::bitmap::Bitmap;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemory, GuestMemoryError, Permissions};

use super::NetError;

/// The most iovecs one readv/writev accepts (UIO_MAXIOV).
pub const MAX_IOVECS: usize = 1024;

/// Moves whole frames (a 12-byte virtio-net header, then the Ethernet frame) in and out.
pub trait FrameIo {
    /// Reads one frame into `iovs` and returns the bytes read. A frame longer than the
    /// iovecs loses its tail; the result is then their total (tun) or the frame's full
    /// length. Fails with `WouldBlock` when no frame is queued.
    ///
    /// # Safety
    /// Every iovec must describe memory that is valid for writes for the whole call.
    unsafe fn read_frame(&self, iovs: &[libc::iovec]) -> io::Result<usize>;

    /// Writes one frame gathered from `iovs`. Fails with `WouldBlock` if it cannot be queued
    /// now.
    ///
    /// # Safety
    /// Every iovec must describe memory that is valid for reads for the whole call.
    unsafe fn write_frame(&self, iovs: &[libc::iovec]) -> io::Result<usize>;
}

/// A guest-physical range: one descriptor, or the part of it in use.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Seg {
    pub addr: GuestAddress,
    pub len: usize,
}

/// Why a chain was refused.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum BadChain {
    /// A descriptor points the wrong way (writable on TX, read-only on RX).
    Direction,
    /// More bytes than a frame can have.
    TooLong,
    /// More pieces than one readv/writev takes.
    TooManyBuffers,
    /// A descriptor lies outside guest memory.
    Address,
}

/// Host iovecs for one readv/writev. They point into guest memory (or a device buffer) only
/// between being filled and the I/O call, within one processing call.
#[derive(Default)]
pub(crate) struct IovecBuf(pub Vec<libc::iovec>);

// SAFETY: the raw pointers are only dereferenced (by the kernel) during the processing call that
// filled them, on the thread that filled them; every user clears the buffer before filling it, so
// stale pointers left behind are never used after the buffer moves to another thread.
unsafe impl Send for IovecBuf {}

/// Walks `chain` and records its descriptors in `segs` (cleared first). Every descriptor must
/// be device-writable if `writable`, device-readable otherwise, and lie in guest memory.
/// Chains longer than `limit` bytes are refused when `strict`; otherwise only their first
/// `limit` bytes are recorded. Returns the bytes recorded.
pub(crate) fn collect_segs<M: GuestMemory>(
    mem: &M,
    chain: DescriptorChain<&M>,
    writable: bool,
    limit: usize,
    strict: bool,
    segs: &mut Vec<Seg>,
) -> Result<usize, BadChain> {
    let access = if writable {
        Permissions::Write
    } else {
        Permissions::Read
    };
    segs.clear();
    let mut total = 0usize;
    // The chain iterator stops at loops (after queue-size descriptors), bad indices and
    // unreadable tables, and at 4 GiB in total; we only add the direction/range/size checks.
    for desc in chain {
        if desc.is_write_only() != writable {
            return Err(BadChain::Direction);
        }
        let len = desc.len() as usize;
        let take = if strict {
            if len > limit - total {
                return Err(BadChain::TooLong);
            }
            len
        } else {
            len.min(limit - total)
        };
        if take == 0 {
            continue;
        }
        if segs.len() >= MAX_IOVECS {
            return Err(BadChain::TooManyBuffers);
        }
        if !mem.check_range(desc.addr(), take, access) {
            return Err(BadChain::Address);
        }
        segs.push(Seg {
            addr: desc.addr(),
            len: take,
        });
        total += take;
    }
    Ok(total)
}

/// Appends host iovecs for `segs` to `iovs` (a range may span several memory regions).
pub(crate) fn append_iovecs<M: GuestMemory>(
    mem: &M,
    segs: &[Seg],
    writable: bool,
    iovs: &mut IovecBuf,
) -> Result<(), BadChain> {
    let access = if writable {
        Permissions::Write
    } else {
        Permissions::Read
    };
    for seg in segs {
        let slices = mem
            .get_slices(seg.addr, seg.len, access)
            .map_err(|_| BadChain::Address)?;
        for slice in slices {
            let slice = slice.map_err(|_| BadChain::Address)?;
            if iovs.0.len() >= MAX_IOVECS {
                return Err(BadChain::TooManyBuffers);
            }
            // Without vm-memory's "xen" feature the pointer guard maps nothing: the pointer
            // stays valid as long as the guest memory, which outlives the processing call.
            iovs.0.push(libc::iovec {
                iov_base: slice.ptr_guard_mut().as_ptr().cast(),
                iov_len: slice.len(),
            });
        }
    }
    Ok(())
}

/// Copies `data` into the buffer `segs` describes, starting `offset` bytes in; returns the
/// bytes copied (less than `data.len()` if the buffer is too short).
pub(crate) fn write_segs<M: GuestMemory>(
    mem: &M,
    segs: &[Seg],
    mut offset: usize,
    data: &[u8],
) -> Result<usize, GuestMemoryError> {
    let mut done = 0;
    for seg in segs {
        if done == data.len() {
            break;
        }
        if offset >= seg.len {
            offset -= seg.len;
            continue;
        }
        let n = (seg.len - offset).min(data.len() - done);
        mem.write_slice(&data[done..done + n], seg.addr.unchecked_add(offset as u64))?;
        done += n;
        offset = 0;
    }
    Ok(done)
}

/// Fills `buf` from the start of the buffer `segs` describes.
pub(crate) fn read_segs<M: GuestMemory>(
    mem: &M,
    segs: &[Seg],
    buf: &mut [u8],
) -> Result<(), GuestMemoryError> {
    let mut done = 0;
    for seg in segs {
        let n = seg.len.min(buf.len() - done);
        mem.read_slice(&mut buf[done..done + n], seg.addr)?;
        done += n;
    }
    Ok(())
}

/// Records in the dirty bitmap the first `len` bytes of `segs`, written behind vm-memory's
/// back (by readv).
pub(crate) fn mark_dirty<M: GuestMemory>(mem: &M, segs: &[Seg], mut len: usize) {
    for seg in segs {
        if len == 0 {
            break;
        }
        let n = seg.len.min(len);
        if let Ok(slices) = mem.get_slices(seg.addr, n, Permissions::Write) {
            for slice in slices.flatten() {
                slice.bitmap().mark_dirty(0, slice.len());
            }
        }
        len -= n;
    }
}

/// Puts `elems` (head index, bytes written) in the used ring and publishes them with a single
/// index update, so the driver never sees part of a packet spread over several buffers.
pub(crate) fn publish_used<M: GuestMemory>(
    mem: &M,
    queue: &mut Queue,
    elems: &[(u16, u32)],
) -> Result<(), NetError> {
    let size = queue.size();
    if elems.is_empty() || size == 0 {
        return Ok(());
    }
    let ring = GuestAddress(queue.used_ring());
    let mut idx = Wrapping(queue.next_used());
    for &(head, len) in elems {
        // The chain iterator yields nothing for such a head; it is no chain to give back.
        if head >= size {
            log::debug!("virtio-net: ignoring out-of-range descriptor head {head}");
            continue;
        }
        let mut elem = [0u8; 8];
        elem[..4].copy_from_slice(&u32::from(head).to_le_bytes());
        elem[4..].copy_from_slice(&len.to_le_bytes());
        let addr = ring
            .checked_add(4 + 8 * u64::from(idx.0 % size))
            .ok_or(NetError::RingAddress)?;
        mem.write_slice(&elem, addr).map_err(NetError::Ring)?;
        idx += Wrapping(1);
    }
    let addr = ring.checked_add(2).ok_or(NetError::RingAddress)?;
    // Release: the elements above become visible no later than the index.
    mem.store(idx.0.to_le(), addr, Ordering::Release)
        .map_err(NetError::Ring)?;
    queue.set_next_used(idx.0);
    Ok(())
}

/// Whether the driver wants an interrupt now that the used index moved from `old_used` to
/// the queue's current one (virtio 1.2, 2.7.10: used_event with EVENT_IDX, else the
/// NO_INTERRUPT flag).
pub(crate) fn needs_notification<M: GuestMemory>(
    mem: &M,
    queue: &Queue,
    old_used: u16,
) -> Result<bool, NetError> {
    let new = Wrapping(queue.next_used());
    let old = Wrapping(old_used);
    if new == old {
        return Ok(false);
    }
    // Our used index store must be visible before we read the driver's suppression state.
    fence(Ordering::SeqCst);
    let avail = GuestAddress(queue.avail_ring());
    if queue.event_idx_enabled() {
        let addr = avail
            .checked_add(4 + 2 * u64::from(queue.size()))
            .ok_or(NetError::RingAddress)?;
        let event = Wrapping(u16::from_le(
            mem.load(addr, Ordering::Relaxed).map_err(NetError::Ring)?,
        ));
        Ok(new - event - Wrapping(1) < new - old)
    } else {
        let flags = u16::from_le(mem.load(avail, Ordering::Relaxed).map_err(NetError::Ring)?);
        Ok(flags & VRING_AVAIL_F_NO_INTERRUPT as u16 == 0)
    }
}

/// Asks the driver to notify the device once it makes available more than `avail_idx`
/// entries: avail_event = `avail_idx` with EVENT_IDX, else clears VRING_USED_F_NO_NOTIFY.
///
/// Unlike `Queue::enable_notification` (which uses `next_avail`), this works while entries
/// stay available but unused, as when a pending frame needs more receive buffers than there
/// are. Callers must look at the ring again afterwards, for entries that raced in.
pub(crate) fn request_notification<M: GuestMemory>(
    mem: &M,
    queue: &Queue,
    avail_idx: u16,
) -> Result<(), NetError> {
    let used = GuestAddress(queue.used_ring());
    let (addr, val) = if queue.event_idx_enabled() {
        let at = used
            .checked_add(4 + 8 * u64::from(queue.size()))
            .ok_or(NetError::RingAddress)?;
        (at, avail_idx)
    } else {
        (used, 0)
    };
    mem.store(val.to_le(), addr, Ordering::Relaxed)
        .map_err(NetError::Ring)?;
    // The store must be visible before we look at the available index again.
    fence(Ordering::SeqCst);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::testutil::{desc, mem, TestQueue};
    use super::*;
    use virtio_bindings::virtio_ring::VRING_DESC_F_NEXT;
    use vm_memory::GuestMemoryMmap;

    #[test]
    fn collect_checks_direction_range_and_length() {
        let m = mem();
        let tq = TestQueue::new(&m, 0, 16);
        let mut q = tq.create_queue();
        let mut segs = Vec::new();
        tq.add(&[desc(0x10000, 100, false), desc(0x20000, 50, false)]);
        tq.add(&[desc(0x10000, 100, false), desc(0x20000, 50, true)]);
        tq.add(&[desc(0xffff_0000, 100, false)]);
        tq.add(&[desc(0x10000, 100, true), desc(0x20000, 100, true)]);

        let c = q.pop_descriptor_chain(&m).unwrap();
        assert_eq!(collect_segs(&m, c, false, 1000, true, &mut segs), Ok(150));
        assert_eq!(segs.len(), 2);
        let c = q.pop_descriptor_chain(&m).unwrap();
        assert_eq!(
            collect_segs(&m, c, false, 1000, true, &mut segs),
            Err(BadChain::Direction)
        );
        let c = q.pop_descriptor_chain(&m).unwrap();
        assert_eq!(
            collect_segs(&m, c, false, 1000, true, &mut segs),
            Err(BadChain::Address)
        );
        let c = q.pop_descriptor_chain(&m).unwrap();
        // Lenient: capped at the limit, the rest ignored.
        assert_eq!(
            collect_segs(&m, c.clone(), true, 150, false, &mut segs),
            Ok(150)
        );
        assert_eq!(segs[1].len, 50);
        assert_eq!(
            collect_segs(&m, c, true, 150, true, &mut segs),
            Err(BadChain::TooLong)
        );
    }

    #[test]
    fn collect_survives_loops_and_huge_lengths() {
        let m = mem();
        let tq = TestQueue::new(&m, 0, 16);
        let mut q = tq.create_queue();
        let next = VRING_DESC_F_NEXT as u16;
        // Descriptor 0 -> 1 -> 0 -> ...: the iterator stops after queue-size steps.
        tq.write_desc(0, 0x10000, 10, next, 1);
        tq.write_desc(1, 0x10000, 10, next, 0);
        tq.push_avail(0);
        let c = q.pop_descriptor_chain(&m).unwrap();
        let mut segs = Vec::new();
        assert_eq!(collect_segs(&m, c, false, 1000, true, &mut segs), Ok(160));

        tq.skip_descs(2);
        tq.add(&[desc(0x10000, u32::MAX, true), desc(0x10000, u32::MAX, true)]);
        let c = q.pop_descriptor_chain(&m).unwrap();
        assert_eq!(
            collect_segs(&m, c.clone(), true, 1000, true, &mut segs),
            Err(BadChain::TooLong)
        );
        // Lenient mode only looks at the first `limit` bytes, which are in memory.
        assert_eq!(collect_segs(&m, c, true, 1000, false, &mut segs), Ok(1000));

        // A head index beyond the table yields an empty chain.
        tq.push_avail(40);
        let c = q.pop_descriptor_chain(&m).unwrap();
        assert_eq!(collect_segs(&m, c, true, 1000, false, &mut segs), Ok(0));
    }

    #[test]
    fn too_many_pieces_are_refused() {
        let m = mem();
        let tq = TestQueue::new(&m, 0, 256);
        let mut q = tq.create_queue();
        // An indirect table of 2000 one-byte descriptors.
        let table = 0x10_0000u64;
        for i in 0..2000u64 {
            let mut raw = [0u8; 16];
            raw[..8].copy_from_slice(&(0x20_0000 + i).to_le_bytes());
            raw[8..12].copy_from_slice(&1u32.to_le_bytes());
            let flags = if i < 1999 {
                VRING_DESC_F_NEXT as u16
            } else {
                0
            };
            raw[12..14].copy_from_slice(&flags.to_le_bytes());
            raw[14..].copy_from_slice(&(i as u16 + 1).to_le_bytes());
            m.write_slice(&raw, GuestAddress(table + 16 * i)).unwrap();
        }
        let indirect = virtio_bindings::virtio_ring::VRING_DESC_F_INDIRECT as u16;
        tq.write_desc(0, table, 2000 * 16, indirect, 0);
        tq.push_avail(0);
        let c = q.pop_descriptor_chain(&m).unwrap();
        let mut segs = Vec::new();
        assert_eq!(
            collect_segs(&m, c, false, 100_000, true, &mut segs),
            Err(BadChain::TooManyBuffers)
        );
    }

    #[test]
    fn iovecs_cover_the_segments() {
        let m = GuestMemoryMmap::<()>::from_ranges(&[
            (GuestAddress(0), 0x10000),
            (GuestAddress(0x10000), 0x10000),
        ])
        .unwrap();
        let mut iovs = IovecBuf::default();
        // One range across the two regions.
        let segs = [Seg {
            addr: GuestAddress(0xff00),
            len: 0x200,
        }];
        append_iovecs(&m, &segs, true, &mut iovs).unwrap();
        assert_eq!(iovs.0.len(), 2);
        assert_eq!(iovs.0[0].iov_len + iovs.0[1].iov_len, 0x200);
        let segs = [Seg {
            addr: GuestAddress(0x1ff00),
            len: 0x200,
        }];
        assert_eq!(
            append_iovecs(&m, &segs, true, &mut iovs),
            Err(BadChain::Address)
        );
    }

    #[test]
    fn seg_copies_cross_descriptors() {
        let m = mem();
        let segs = [
            Seg {
                addr: GuestAddress(0x10000),
                len: 3,
            },
            Seg {
                addr: GuestAddress(0x20000),
                len: 5,
            },
        ];
        assert_eq!(write_segs(&m, &segs, 2, &[1, 2, 3, 4, 5, 6, 7]).unwrap(), 6);
        let mut back = [0u8; 8];
        read_segs(&m, &segs, &mut back).unwrap();
        assert_eq!(back, [0, 0, 1, 2, 3, 4, 5, 6]);
    }

    #[test]
    fn publish_and_notify() {
        let m = mem();
        let tq = TestQueue::new(&m, 0, 16);
        let mut q = tq.create_queue();
        publish_used(&m, &mut q, &[(3, 10), (99, 1), (4, 20)]).unwrap();
        assert_eq!(tq.used_idx(), 2);
        assert_eq!(tq.used(1), (4, 20));
        assert!(needs_notification(&m, &q, 0).unwrap());
        assert!(!needs_notification(&m, &q, 2).unwrap());
        tq.set_avail_flags(VRING_AVAIL_F_NO_INTERRUPT as u16);
        assert!(!needs_notification(&m, &q, 0).unwrap());
        // EVENT_IDX: used_event = 0 -> notify when crossing index 1.
        q.set_event_idx(true);
        tq.set_used_event(0);
        assert!(needs_notification(&m, &q, 0).unwrap());
        tq.set_used_event(5);
        assert!(!needs_notification(&m, &q, 0).unwrap());
        // Wrap-around of the 16-bit indices.
        q.set_next_used(3);
        tq.set_used_event(u16::MAX);
        assert!(needs_notification(&m, &q, u16::MAX - 1).unwrap());
    }
}
