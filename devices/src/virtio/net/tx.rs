//! Transmit path: frames from the guest's transmit chains to the tap (virtio 1.2, 5.1.6.2).
//!
//! Each chain (12-byte header, then the frame) is handed to the tap with one writev gathering
//! straight from guest memory. Nothing here blocks, spawns or polls.

use std::io;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use virtio_queue::{DescriptorChain, Queue, QueueT};
use vm_memory::GuestMemory;

use super::chain::{
    append_iovecs, collect_segs, needs_notification, publish_used, FrameIo, IovecBuf, Seg,
};
use super::{NetCounters, NetError, MAX_PACKET_LEN, VNET_HDR_LEN};

/// Frames sent per call, so a busy transmit path cannot starve receive.
const TX_BUDGET: usize = 256;

/// Why [`TxPath::process`] stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TxStop {
    /// The guest has nothing more to send: wait for a kick.
    Empty,
    /// The tap cannot take more now: wait for it to become writable.
    TapFull,
    /// The per-call budget ran out with work left: call again soon.
    Budget,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TxOutcome {
    pub stop: TxStop,
    /// The driver asked for an interrupt for the chains completed in this call.
    pub notify: bool,
}

/// Transmit-queue scratch state.
pub struct TxPath {
    counters: Arc<NetCounters>,
    segs: Vec<Seg>,
    iovs: IovecBuf,
    batch: Vec<(u16, u32)>,
}

impl TxPath {
    pub fn new(counters: Arc<NetCounters>) -> TxPath {
        TxPath {
            counters,
            segs: Vec::new(),
            iovs: IovecBuf::default(),
            batch: Vec::new(),
        }
    }

    /// Sends the guest's pending frames to `tap`. Malformed chains (device-writable
    /// descriptors, outside guest memory, shorter than the header, longer than a frame) are
    /// completed without being sent. Errors mean the rings are unusable.
    pub fn process<M: GuestMemory, T: FrameIo + ?Sized>(
        &mut self,
        mem: &M,
        queue: &mut Queue,
        tap: &T,
    ) -> Result<TxOutcome, NetError> {
        let old_used = queue.next_used();
        self.batch.clear();
        let mut stop = TxStop::Budget;
        for _ in 0..TX_BUDGET {
            let start = queue.next_avail();
            let Some(chain) = queue.pop_descriptor_chain(mem) else {
                stop = TxStop::Empty;
                break;
            };
            let head = chain.head_index();
            if !self.send(mem, chain, tap) {
                // Retry this chain once the tap is writable.
                queue.set_next_avail(start);
                stop = TxStop::TapFull;
                break;
            }
            // The device writes nothing into transmit buffers: used length 0.
            self.batch.push((head, 0));
        }
        publish_used(mem, queue, &self.batch)?;
        self.batch.clear();
        let notify = needs_notification(mem, queue, old_used)?;
        Ok(TxOutcome { stop, notify })
    }

    /// Sends one chain; false if the tap is full and the chain must be retried.
    fn send<M: GuestMemory, T: FrameIo + ?Sized>(
        &mut self,
        mem: &M,
        chain: DescriptorChain<&M>,
        tap: &T,
    ) -> bool {
        let len = match collect_segs(mem, chain, false, MAX_PACKET_LEN, true, &mut self.segs) {
            Ok(len) if len >= VNET_HDR_LEN => len,
            _ => {
                self.bad_chain();
                return true;
            }
        };
        self.iovs.0.clear();
        if append_iovecs(mem, &self.segs, false, &mut self.iovs).is_err() {
            self.iovs.0.clear();
            self.bad_chain();
            return true;
        }
        // SAFETY: the iovecs were built by `append_iovecs` from ranges checked to lie in `mem`,
        // which stays borrowed (so mapped) for the call.
        let res = unsafe { tap.write_frame(&self.iovs.0) };
        self.iovs.0.clear();
        match res {
            Ok(_) => {
                self.counters.tx_frames.fetch_add(1, Ordering::Relaxed);
                self.counters
                    .tx_bytes
                    .fetch_add((len - VNET_HDR_LEN) as u64, Ordering::Relaxed);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return false,
            Err(e) => {
                // The kernel refuses e.g. bad headers or runts; the frame is lost.
                log::debug!("virtio-net: tap refused a {len}-byte frame: {e}");
                self.counters.tx_dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
        true
    }

    fn bad_chain(&self) {
        self.counters.bad_chains.fetch_add(1, Ordering::Relaxed);
        self.counters.tx_dropped.fetch_add(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::super::testutil::{
        desc, eth_frame, mem, tun_available, with_hdr, FakeTap, TestQueue, TestTap,
    };
    use super::*;
    use std::sync::atomic::AtomicU64;
    use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

    const BUF: u64 = 0x10_0000;

    fn count(c: &AtomicU64) -> u64 {
        c.load(Ordering::Relaxed)
    }

    fn path() -> (TxPath, Arc<NetCounters>) {
        let c = Arc::new(NetCounters::default());
        (TxPath::new(c.clone()), c)
    }

    fn put(m: &GuestMemoryMmap, addr: u64, data: &[u8]) {
        m.write_slice(data, GuestAddress(addr)).unwrap();
    }

    #[test]
    fn sends_header_and_frame_in_one_write() {
        let m = mem();
        let tq = TestQueue::new(&m, 0, 16);
        let mut q = tq.create_queue();
        let frame = eth_frame(200, 1);
        let packet = with_hdr(&frame);
        // Header and frame in separate descriptors, the frame split once more.
        put(&m, BUF, &packet[..12]);
        put(&m, BUF + 0x1000, &packet[12..100]);
        put(&m, BUF + 0x2000, &packet[100..]);
        tq.add(&[
            desc(BUF, 12, false),
            desc(BUF + 0x1000, 88, false),
            desc(BUF + 0x2000, 112, false),
        ]);
        let tap = FakeTap::default();
        let (mut tx, c) = path();
        let out = tx.process(&m, &mut q, &tap).unwrap();
        assert_eq!(
            out,
            TxOutcome {
                stop: TxStop::Empty,
                notify: true
            }
        );
        assert_eq!(*tap.tx.borrow(), vec![packet]);
        assert_eq!(tq.used_idx(), 1);
        assert_eq!(tq.used(0), (0, 0));
        assert_eq!(count(&c.tx_frames), 1);
        assert_eq!(count(&c.tx_bytes), 200);
    }

    #[test]
    fn malformed_chains_are_completed_unsent() {
        let m = mem();
        let tq = TestQueue::new(&m, 0, 16);
        let mut q = tq.create_queue();
        tq.add(&[desc(BUF, 12, false), desc(BUF + 0x1000, 60, true)]); // writable
        tq.add(&[desc(BUF, 11, false)]); // shorter than the header
        tq.add(&[desc(BUF, MAX_PACKET_LEN as u32 + 1, false)]); // too long
        tq.add(&[desc(BUF, 12, false), desc(0xfff_ff00, 0x1000, false)]); // outside memory
        tq.add(&[desc(BUF, u32::MAX, false), desc(BUF, u32::MAX, false)]); // overflowing
        put(&m, BUF + 0x3000, &with_hdr(&eth_frame(60, 2)));
        tq.add(&[desc(BUF + 0x3000, 72, false)]);
        let tap = FakeTap::default();
        let (mut tx, c) = path();
        tx.process(&m, &mut q, &tap).unwrap();
        assert_eq!(tq.used_idx(), 6);
        assert_eq!(tap.tx.borrow().len(), 1);
        assert_eq!(tap.tx.borrow()[0], with_hdr(&eth_frame(60, 2)));
        assert_eq!(count(&c.bad_chains), 5);
        assert_eq!(count(&c.tx_dropped), 5);
        assert_eq!(count(&c.tx_frames), 1);
    }

    #[test]
    fn a_full_tap_keeps_the_chain() {
        let m = mem();
        let tq = TestQueue::new(&m, 0, 16);
        let mut q = tq.create_queue();
        put(&m, BUF, &with_hdr(&eth_frame(60, 3)));
        tq.add(&[desc(BUF, 72, false)]);
        let tap = FakeTap::default();
        tap.tx_full.set(true);
        let (mut tx, _) = path();
        let out = tx.process(&m, &mut q, &tap).unwrap();
        assert_eq!(
            out,
            TxOutcome {
                stop: TxStop::TapFull,
                notify: false
            }
        );
        assert_eq!(tq.used_idx(), 0);
        assert_eq!(q.next_avail(), 0);
        tap.tx_full.set(false);
        assert_eq!(tx.process(&m, &mut q, &tap).unwrap().stop, TxStop::Empty);
        assert_eq!(tap.tx.borrow().len(), 1);
        assert_eq!(tq.used_idx(), 1);
    }

    #[test]
    fn refused_frames_are_counted() {
        let m = mem();
        let tq = TestQueue::new(&m, 0, 16);
        let mut q = tq.create_queue();
        tq.add(&[desc(BUF, 72, false)]);
        let tap = FakeTap::default();
        tap.tx_error.set(Some(libc::EINVAL));
        let (mut tx, c) = path();
        assert_eq!(tx.process(&m, &mut q, &tap).unwrap().stop, TxStop::Empty);
        assert_eq!(tq.used_idx(), 1);
        assert_eq!(count(&c.tx_dropped), 1);
        assert_eq!(count(&c.bad_chains), 0);
    }

    #[test]
    fn indirect_chains() {
        let m = mem();
        let tq = TestQueue::new(&m, 0, 16);
        let mut q = tq.create_queue();
        let packet = with_hdr(&eth_frame(100, 4));
        put(&m, BUF, &packet[..50]);
        put(&m, BUF + 0x1000, &packet[50..]);
        // A two-entry indirect table at 0x80000.
        let mut table = [0u8; 32];
        table[..8].copy_from_slice(&BUF.to_le_bytes());
        table[8..12].copy_from_slice(&50u32.to_le_bytes());
        table[12..14].copy_from_slice(&1u16.to_le_bytes()); // NEXT
        table[14..16].copy_from_slice(&1u16.to_le_bytes());
        table[16..24].copy_from_slice(&(BUF + 0x1000).to_le_bytes());
        table[24..28].copy_from_slice(&62u32.to_le_bytes());
        put(&m, 0x8_0000, &table);
        let indirect = virtio_bindings::virtio_ring::VRING_DESC_F_INDIRECT as u16;
        tq.write_desc(0, 0x8_0000, 32, indirect, 0);
        tq.push_avail(0);
        let tap = FakeTap::default();
        let (mut tx, _) = path();
        tx.process(&m, &mut q, &tap).unwrap();
        assert_eq!(*tap.tx.borrow(), vec![packet]);
    }

    #[test]
    fn budget_bounds_one_call() {
        let m = mem();
        let tq = TestQueue::new(&m, 0, 256);
        let mut q = tq.create_queue();
        for _ in 0..256 {
            tq.add(&[desc(BUF, 72, false)]);
        }
        let tap = FakeTap::default();
        let (mut tx, _) = path();
        assert_eq!(tx.process(&m, &mut q, &tap).unwrap().stop, TxStop::Budget);
        assert_eq!(tap.tx.borrow().len(), TX_BUDGET);
        assert_eq!(tx.process(&m, &mut q, &tap).unwrap().stop, TxStop::Empty);
    }

    #[test]
    fn real_tap_strips_the_header() {
        if !tun_available() {
            return;
        }
        let t = TestTap::new();
        let m = mem();
        let tq = TestQueue::new(&m, 0, 16);
        let mut q = tq.create_queue();
        let frame = eth_frame(500, 5);
        put(&m, BUF, &with_hdr(&frame));
        tq.add(&[desc(BUF, 512, false)]);
        let (mut tx, c) = path();
        assert_eq!(tx.process(&m, &mut q, &t.tap).unwrap().stop, TxStop::Empty);
        assert_eq!(count(&c.tx_frames), 1);
        assert_eq!(t.recv_test_frame(), Some(frame));
    }
}
