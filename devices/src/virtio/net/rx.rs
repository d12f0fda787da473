//! Receive path: frames from the tap into the guest's receive buffers (virtio 1.2, 5.1.6.4).
//!
//! A frame is read with one readv straight into the first available chain, followed by a
//! device-side spill buffer for whatever does not fit. With VIRTIO_NET_F_MRG_RXBUF the spilled
//! tail is copied into further chains and `num_buffers` says how many; without it a frame that
//! does not fit one chain is dropped. The tap is only read when the guest has a buffer, so
//! frames wait in the tap's kernel queue while the guest is not taking them; a frame already
//! read that needs more buffers than are available is kept (the one pending frame) until the
//! guest adds buffers.
//!
//! Nothing here blocks, spawns or polls: the worker (or a vhost-user backend) decides when to
//! call [`RxPath::process`].

use std::io;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemory;

use super::chain::{
    append_iovecs, collect_segs, mark_dirty, needs_notification, publish_used, read_segs,
    write_segs, FrameIo, IovecBuf, Seg,
};
use super::{NetCounters, NetError, MAX_PACKET_LEN, VNET_HDR_LEN};

/// Offset of `num_buffers` in `virtio_net_hdr_v1`.
const NUM_BUFFERS_OFFSET: usize = 10;
/// Frames handled per call, so a busy receive path cannot starve transmit.
const RX_BUDGET: usize = 64;
/// Room offered to each read: one byte more than the largest packet, because tun returns
/// only the bytes it copied when a frame does not fit, and a full read must be told apart
/// from a truncated one.
const READ_LEN: usize = MAX_PACKET_LEN + 1;

/// Why [`RxPath::process`] stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RxStop {
    /// The tap has no more frames: wait for it to become readable.
    TapEmpty,
    /// The guest has no (or not enough) receive buffers: stop polling the tap and wait for the
    /// receive queue to be kicked. Buffers may remain available (too few for a pending
    /// frame), so ask for that kick relative to the current available index, not
    /// `next_avail`.
    NoBuffers,
    /// The per-call budget ran out with work left: call again soon.
    Budget,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RxOutcome {
    pub stop: RxStop,
    /// The driver asked for an interrupt for the buffers used in this call.
    pub notify: bool,
}

enum Step {
    Delivered,
    Dropped,
    NoBuffers,
    TapEmpty,
}

/// Receive-queue state: the spill/pending frame buffer and scratch space.
pub struct RxPath {
    mrg_rxbuf: bool,
    counters: Arc<NetCounters>,
    /// Tail of the frame being read; the whole frame while `pending` is set. READ_LEN bytes.
    spill: Box<[u8]>,
    /// Length of a frame waiting in `spill` for buffers, or 0.
    pending: usize,
    /// Buffers of the chain holding the current frame's header.
    first: Vec<Seg>,
    segs: Vec<Seg>,
    iovs: IovecBuf,
    /// Used entries to publish at the end of the call.
    batch: Vec<(u16, u32)>,
    /// The current frame's entries, kept together so they are consecutive in the used ring.
    frame: Vec<(u16, u32)>,
}

impl RxPath {
    /// `mrg_rxbuf`: whether the driver accepted VIRTIO_NET_F_MRG_RXBUF.
    pub fn new(mrg_rxbuf: bool, counters: Arc<NetCounters>) -> RxPath {
        RxPath {
            mrg_rxbuf,
            counters,
            spill: vec![0u8; READ_LEN].into_boxed_slice(),
            pending: 0,
            first: Vec::new(),
            segs: Vec::new(),
            iovs: IovecBuf::default(),
            batch: Vec::new(),
            frame: Vec::new(),
        }
    }

    /// Whether a frame read from the tap waits for receive buffers.
    pub fn has_pending(&self) -> bool {
        self.pending > 0
    }

    /// Moves frames from `tap` into `queue` until the tap is empty, the guest runs out of
    /// buffers, or the budget is spent. Malformed chains are returned with length 0. Errors
    /// mean the rings or the tap are unusable.
    pub fn process<M: GuestMemory, T: FrameIo + ?Sized>(
        &mut self,
        mem: &M,
        queue: &mut Queue,
        tap: &T,
    ) -> Result<RxOutcome, NetError> {
        let old_used = queue.next_used();
        self.batch.clear();
        let mut stop = RxStop::Budget;
        let mut result = Ok(());
        for _ in 0..RX_BUDGET {
            let step = if self.pending > 0 {
                self.deliver_pending(mem, queue)
            } else {
                self.receive(mem, queue, tap)
            };
            match step {
                Ok(Step::Delivered | Step::Dropped) => {}
                Ok(Step::NoBuffers) => {
                    stop = RxStop::NoBuffers;
                    break;
                }
                Ok(Step::TapEmpty) => {
                    stop = RxStop::TapEmpty;
                    break;
                }
                Err(e) => {
                    result = Err(e);
                    break;
                }
            }
        }
        // Give back what was filled even if a step failed.
        publish_used(mem, queue, &self.batch)?;
        self.batch.clear();
        result?;
        let notify = needs_notification(mem, queue, old_used)?;
        Ok(RxOutcome { stop, notify })
    }

    /// Reads one frame from the tap into the next chain (and the spill buffer).
    fn receive<M: GuestMemory, T: FrameIo + ?Sized>(
        &mut self,
        mem: &M,
        queue: &mut Queue,
        tap: &T,
    ) -> Result<Step, NetError> {
        let start = queue.next_avail();
        let Some(chain) = queue.pop_descriptor_chain(mem) else {
            return Ok(Step::NoBuffers);
        };
        let head = chain.head_index();
        let cap = match collect_segs(mem, chain, true, MAX_PACKET_LEN, false, &mut self.first) {
            Ok(cap) if cap >= VNET_HDR_LEN => cap,
            _ => return Ok(self.reject(head)),
        };
        self.iovs.0.clear();
        if append_iovecs(mem, &self.first, true, &mut self.iovs).is_err() {
            self.iovs.0.clear();
            return Ok(self.reject(head));
        }
        // `cap` is at most MAX_PACKET_LEN, so there is always a spill iovec.
        let spill_len = READ_LEN - cap;
        self.iovs.0.push(libc::iovec {
            iov_base: self.spill.as_mut_ptr().cast(),
            iov_len: spill_len,
        });
        // SAFETY: the guest iovecs were built by `append_iovecs` from ranges checked to lie in
        // `mem`, which stays borrowed (so mapped) for the call; the last iovec covers the
        // first `spill_len` bytes of `self.spill`, which nothing else touches during the call.
        let read = unsafe { tap.read_frame(&self.iovs.0) };
        self.iovs.0.clear();
        let n = match read {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                queue.set_next_avail(start);
                return Ok(Step::TapEmpty);
            }
            // macvtap fails a read that does not fit; the frame is gone either way.
            Err(e) if matches!(e.raw_os_error(), Some(libc::EFAULT | libc::EMSGSIZE)) => 0,
            Err(e) => {
                queue.set_next_avail(start);
                return Err(NetError::TapRead(e));
            }
        };
        // Too long: truncated by the kernel (or reported at full length by other devices).
        if !(VNET_HDR_LEN..=MAX_PACKET_LEN).contains(&n) {
            queue.set_next_avail(start);
            return Ok(self.drop_frame());
        }
        if n <= cap {
            mark_dirty(mem, &self.first, n);
            self.frame.clear();
            self.frame.push((head, n as u32));
            return Ok(self.complete(mem, n));
        }
        // The frame continues in the spill buffer.
        let rest = n - cap;
        if !self.mrg_rxbuf {
            // One chain per frame: the guest's buffers are too small for it.
            queue.set_next_avail(start);
            return Ok(self.drop_frame());
        }
        if !self.enough_buffers(mem, queue, rest) {
            // Keep the whole frame in `spill` until the guest adds buffers; give the first
            // chain back (next_avail rewinds over it).
            self.spill.copy_within(0..rest, cap);
            queue.set_next_avail(start);
            if read_segs(mem, &self.first, &mut self.spill[..cap]).is_err() {
                return Ok(self.drop_frame());
            }
            self.pending = n;
            return Ok(Step::NoBuffers);
        }
        mark_dirty(mem, &self.first, cap);
        self.frame.clear();
        self.frame.push((head, cap as u32));
        self.fill(mem, queue, 0, rest);
        Ok(self.complete(mem, n))
    }

    /// Delivers the pending frame from `spill`, if the guest now has room for it.
    fn deliver_pending<M: GuestMemory>(
        &mut self,
        mem: &M,
        queue: &mut Queue,
    ) -> Result<Step, NetError> {
        let n = self.pending;
        if !self.enough_buffers(mem, queue, n) {
            return Ok(Step::NoBuffers);
        }
        self.pending = 0;
        self.frame.clear();
        self.fill(mem, queue, 0, n);
        if self.frame.is_empty() {
            // The guest took its buffers back between our two walks of the ring.
            return Ok(self.drop_frame());
        }
        Ok(self.complete(mem, n))
    }

    /// Whether chains holding `need` more bytes are available, without consuming any.
    fn enough_buffers<M: GuestMemory>(&mut self, mem: &M, queue: &mut Queue, need: usize) -> bool {
        if !self.mrg_rxbuf {
            // Without merging a frame needs one chain; only a pending frame gets here and
            // pending frames only exist with merging.
            return false;
        }
        let start = queue.next_avail();
        let mut have = 0usize;
        while let Some(chain) = queue.pop_descriptor_chain(mem) {
            match collect_segs(mem, chain, true, MAX_PACKET_LEN, false, &mut self.segs) {
                Ok(cap) if cap >= VNET_HDR_LEN => have += cap,
                _ => {}
            }
            if have >= need {
                break;
            }
        }
        queue.set_next_avail(start);
        have >= need
    }

    /// Copies `spill[from..to]` into the next chains, recording them in `frame` (the first one
    /// recorded becomes the header chain). Malformed chains go straight to the batch.
    fn fill<M: GuestMemory>(&mut self, mem: &M, queue: &mut Queue, from: usize, to: usize) {
        let mut at = from;
        while at < to {
            let Some(chain) = queue.pop_descriptor_chain(mem) else {
                break;
            };
            let head = chain.head_index();
            match collect_segs(mem, chain, true, MAX_PACKET_LEN, false, &mut self.segs) {
                Ok(cap) if cap >= VNET_HDR_LEN => {}
                _ => {
                    self.reject(head);
                    continue;
                }
            }
            match write_segs(mem, &self.segs, 0, &self.spill[at..to]) {
                Ok(written) => {
                    if self.frame.is_empty() {
                        std::mem::swap(&mut self.first, &mut self.segs);
                    }
                    self.frame.push((head, written as u32));
                    at += written;
                }
                Err(_) => {
                    self.reject(head);
                }
            }
        }
    }

    /// Sets `num_buffers` and queues the frame's used entries.
    fn complete<M: GuestMemory>(&mut self, mem: &M, len: usize) -> Step {
        // At most one entry per chain of a queue, so it fits.
        let count = u16::try_from(self.frame.len()).unwrap_or(u16::MAX);
        if write_segs(mem, &self.first, NUM_BUFFERS_OFFSET, &count.to_le_bytes()).is_err() {
            // The header chain was checked to be in memory; treat a failure as malformed.
            for &(head, _) in &self.frame {
                self.batch.push((head, 0));
            }
            self.frame.clear();
            return self.drop_frame();
        }
        self.batch.append(&mut self.frame);
        self.counters.rx_frames.fetch_add(1, Ordering::Relaxed);
        self.counters
            .rx_bytes
            .fetch_add((len - VNET_HDR_LEN) as u64, Ordering::Relaxed);
        Step::Delivered
    }

    /// Returns a malformed chain unused.
    fn reject(&mut self, head: u16) -> Step {
        self.batch.push((head, 0));
        self.counters.bad_chains.fetch_add(1, Ordering::Relaxed);
        Step::Dropped
    }

    fn drop_frame(&mut self) -> Step {
        self.counters.rx_dropped.fetch_add(1, Ordering::Relaxed);
        Step::Dropped
    }
}

#[cfg(test)]
mod tests {
    use super::super::testutil::{
        desc, eth_frame, mem, tun_available, with_hdr, FakeTap, TestQueue, TestTap,
    };
    use super::super::MAX_FRAME_LEN;
    use super::*;
    use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

    const BUF: u64 = 0x10_0000;

    /// Buffer address of single-descriptor chain `i`.
    fn buf(i: u64) -> u64 {
        BUF + i * 0x1_0000
    }

    fn read(m: &GuestMemoryMmap, addr: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        m.read_slice(&mut v, GuestAddress(addr)).unwrap();
        v
    }

    fn num_buffers(m: &GuestMemoryMmap, addr: u64) -> u16 {
        u16::from_le_bytes(read(m, addr + 10, 2).try_into().unwrap())
    }

    fn path(mrg: bool) -> (RxPath, Arc<NetCounters>) {
        let c = Arc::new(NetCounters::default());
        (RxPath::new(mrg, c.clone()), c)
    }

    fn count(c: &std::sync::atomic::AtomicU64) -> u64 {
        c.load(Ordering::Relaxed)
    }

    #[test]
    fn frame_fits_one_chain() {
        let m = mem();
        let tq = TestQueue::new(&m, 0, 16);
        let mut q = tq.create_queue();
        // Header and frame split over two descriptors.
        tq.add(&[desc(buf(0), 20, true), desc(buf(1), 2000, true)]);
        // Garbage where num_buffers goes: the device must overwrite it.
        m.write_slice(&[0xff; 12], GuestAddress(buf(0))).unwrap();
        let tap = FakeTap::default();
        let frame = eth_frame(100, 1);
        tap.rx.borrow_mut().push_back(with_hdr(&frame));
        let (mut rx, c) = path(false);
        let out = rx.process(&m, &mut q, &tap).unwrap();
        // The only chain was used: the path stops for lack of buffers before trying the tap.
        assert_eq!(
            out,
            RxOutcome {
                stop: RxStop::NoBuffers,
                notify: true
            }
        );
        assert_eq!(tq.used_idx(), 1);
        assert_eq!(tq.used(0), (0, 112));
        assert_eq!(num_buffers(&m, buf(0)), 1);
        let mut got = read(&m, buf(0) + 12, 8);
        got.extend(read(&m, buf(1), 92));
        assert_eq!(got, frame);
        assert_eq!(count(&c.rx_frames), 1);
        assert_eq!(count(&c.rx_bytes), 100);
        assert_eq!(q.next_avail(), 1);
    }

    #[test]
    fn without_mrg_a_frame_too_big_for_a_chain_is_dropped() {
        let m = mem();
        let tq = TestQueue::new(&m, 0, 16);
        let mut q = tq.create_queue();
        tq.add(&[desc(buf(0), 12 + 100, true)]);
        let tap = FakeTap::default();
        tap.rx.borrow_mut().push_back(with_hdr(&eth_frame(101, 0)));
        tap.rx.borrow_mut().push_back(with_hdr(&eth_frame(100, 2)));
        let (mut rx, c) = path(false);
        rx.process(&m, &mut q, &tap).unwrap();
        assert_eq!(count(&c.rx_dropped), 1);
        // The chain was kept for the second frame, which fits.
        assert_eq!(tq.used_idx(), 1);
        assert_eq!(tq.used(0), (0, 112));
        assert_eq!(read(&m, buf(0) + 12, 100), eth_frame(100, 2));
    }

    /// Adds `n` single-buffer chains of `len` bytes, chain i at buf(i).
    fn add_chains(tq: &TestQueue, first: u16, n: u16, len: u32) {
        for i in first..first + n {
            assert_eq!(tq.add(&[desc(buf(u64::from(i)), len, true)]), i);
        }
    }

    /// Reassembles a frame spread over the used entries `from..from+k` (single-buffer chains).
    fn gather(m: &GuestMemoryMmap, tq: &TestQueue, from: u16) -> Vec<u8> {
        let (head, _) = tq.used(from);
        let k = num_buffers(m, buf(u64::from(head)));
        let mut data = Vec::new();
        for i in from..from + k {
            let (head, len) = tq.used(i);
            data.extend(read(m, buf(u64::from(head)), len as usize));
        }
        data.split_off(VNET_HDR_LEN)
    }

    #[test]
    fn mrg_spreads_a_frame_over_chains() {
        let m = mem();
        let tq = TestQueue::new(&m, 0, 16);
        let mut q = tq.create_queue();
        add_chains(&tq, 0, 6, 112);
        let tap = FakeTap::default();
        let frame = eth_frame(400, 3);
        tap.rx.borrow_mut().push_back(with_hdr(&frame));
        tap.rx.borrow_mut().push_back(with_hdr(&eth_frame(50, 4)));
        let (mut rx, c) = path(true);
        let out = rx.process(&m, &mut q, &tap).unwrap();
        assert_eq!(out.stop, RxStop::TapEmpty);
        // 412 bytes: 112 + 112 + 112 + 76, then the second frame in chain 4.
        assert_eq!(tq.used_idx(), 5);
        let lens: Vec<u32> = (0..5).map(|i| tq.used(i).1).collect();
        assert_eq!(lens, [112, 112, 112, 76, 62]);
        assert_eq!(num_buffers(&m, buf(0)), 4);
        assert_eq!(gather(&m, &tq, 0), frame);
        assert_eq!(num_buffers(&m, buf(4)), 1);
        assert_eq!(gather(&m, &tq, 4), eth_frame(50, 4));
        assert_eq!(count(&c.rx_frames), 2);
    }

    #[test]
    fn mrg_keeps_a_frame_until_enough_buffers_arrive() {
        let m = mem();
        let tq = TestQueue::new(&m, 0, 16);
        let mut q = tq.create_queue();
        add_chains(&tq, 0, 2, 112);
        let tap = FakeTap::default();
        let frame = eth_frame(400, 5);
        tap.rx.borrow_mut().push_back(with_hdr(&frame));
        let (mut rx, c) = path(true);
        let out = rx.process(&m, &mut q, &tap).unwrap();
        assert_eq!(out.stop, RxStop::NoBuffers);
        assert!(!out.notify);
        assert!(rx.has_pending());
        assert_eq!(tq.used_idx(), 0);
        assert_eq!(q.next_avail(), 0);
        // Scribble over the first chain: the pending copy must not depend on it.
        m.write_slice(&[0xaa; 112], GuestAddress(buf(0))).unwrap();
        // Still not enough.
        assert_eq!(
            rx.process(&m, &mut q, &tap).unwrap().stop,
            RxStop::NoBuffers
        );
        add_chains(&tq, 2, 2, 112);
        let out = rx.process(&m, &mut q, &tap).unwrap();
        assert_eq!(out.stop, RxStop::NoBuffers);
        assert!(out.notify);
        assert!(!rx.has_pending());
        assert_eq!(tq.used_idx(), 4);
        assert_eq!(gather(&m, &tq, 0), frame);
        assert_eq!(count(&c.rx_dropped), 0);
    }

    #[test]
    fn no_buffers_leaves_the_tap_alone() {
        let m = mem();
        let tq = TestQueue::new(&m, 0, 16);
        let mut q = tq.create_queue();
        let tap = FakeTap::default();
        tap.rx.borrow_mut().push_back(with_hdr(&eth_frame(60, 0)));
        let (mut rx, _) = path(true);
        let out = rx.process(&m, &mut q, &tap).unwrap();
        assert_eq!(out.stop, RxStop::NoBuffers);
        assert_eq!(tap.rx.borrow().len(), 1);
        assert!(!rx.has_pending());
    }

    #[test]
    fn malformed_chains_are_returned_empty() {
        let m = mem();
        let tq = TestQueue::new(&m, 0, 16);
        let mut q = tq.create_queue();
        tq.add(&[desc(buf(0), 1000, false)]); // read-only
        tq.add(&[desc(buf(1), 8, true)]); // shorter than the header
        tq.add(&[desc(0xffff_f000, 0x2000, true)]); // outside memory
        tq.add(&[desc(buf(3), 1000, true), desc(buf(4), 10, false)]); // mixed
        tq.add(&[desc(buf(5), 1000, true)]);
        let tap = FakeTap::default();
        tap.rx.borrow_mut().push_back(with_hdr(&eth_frame(60, 6)));
        let (mut rx, c) = path(false);
        rx.process(&m, &mut q, &tap).unwrap();
        assert_eq!(tq.used_idx(), 5);
        for i in 0..4 {
            assert_eq!(tq.used(i).1, 0);
        }
        assert_eq!(tq.used(4), (5, 72));
        assert_eq!(read(&m, buf(5) + 12, 60), eth_frame(60, 6));
        assert_eq!(count(&c.bad_chains), 4);
    }

    #[test]
    fn bad_chains_never_split_a_merged_frame() {
        let m = mem();
        let tq = TestQueue::new(&m, 0, 16);
        let mut q = tq.create_queue();
        tq.add(&[desc(buf(0), 112, true)]);
        tq.add(&[desc(buf(1), 112, false)]);
        tq.add(&[desc(buf(2), 112, true)]);
        tq.add(&[desc(buf(3), 112, true)]);
        let tap = FakeTap::default();
        let frame = eth_frame(250, 7);
        tap.rx.borrow_mut().push_back(with_hdr(&frame));
        let (mut rx, _) = path(true);
        rx.process(&m, &mut q, &tap).unwrap();
        assert_eq!(tq.used_idx(), 4);
        assert_eq!(tq.used(0), (1, 0));
        let heads: Vec<u32> = (1..4).map(|i| tq.used(i).0).collect();
        assert_eq!(heads, [0, 2, 3]);
        assert_eq!(gather(&m, &tq, 1), frame);
    }

    #[test]
    fn oversized_and_failed_reads() {
        let m = mem();
        let tq = TestQueue::new(&m, 0, 16);
        let mut q = tq.create_queue();
        add_chains(&tq, 0, 2, 2000);
        let tap = FakeTap::default();
        tap.rx.borrow_mut().push_back(vec![0u8; MAX_PACKET_LEN + 1]);
        tap.rx.borrow_mut().push_back(vec![0u8; 5]);
        let (mut rx, c) = path(true);
        assert_eq!(rx.process(&m, &mut q, &tap).unwrap().stop, RxStop::TapEmpty);
        assert_eq!(count(&c.rx_dropped), 2);
        // Truncation reported as the bytes copied, like tun does.
        tap.report_copied.set(true);
        tap.rx
            .borrow_mut()
            .push_back(vec![0u8; MAX_PACKET_LEN + 100]);
        assert_eq!(rx.process(&m, &mut q, &tap).unwrap().stop, RxStop::TapEmpty);
        assert_eq!(count(&c.rx_dropped), 3);
        tap.report_copied.set(false);
        assert_eq!(tq.used_idx(), 0);
        assert_eq!(q.next_avail(), 0);

        tap.rx_error.set(Some(libc::EFAULT));
        assert_eq!(rx.process(&m, &mut q, &tap).unwrap().stop, RxStop::TapEmpty);
        assert_eq!(count(&c.rx_dropped), 4);
        tap.rx_error.set(Some(libc::EBADFD));
        assert!(matches!(
            rx.process(&m, &mut q, &tap),
            Err(NetError::TapRead(_))
        ));
        assert_eq!(q.next_avail(), 0);
    }

    #[test]
    fn a_full_size_frame_spans_many_buffers() {
        let m = mem();
        let tq = TestQueue::new(&m, 0, 64);
        let mut q = tq.create_queue();
        add_chains(&tq, 0, 64, 1526);
        let tap = FakeTap::default();
        let frame = eth_frame(MAX_FRAME_LEN, 8);
        tap.rx.borrow_mut().push_back(with_hdr(&frame));
        let (mut rx, c) = path(true);
        rx.process(&m, &mut q, &tap).unwrap();
        let k = usize::from(tq.used_idx());
        assert_eq!(k, MAX_PACKET_LEN.div_ceil(1526));
        assert_eq!(num_buffers(&m, buf(0)), k as u16);
        assert_eq!(gather(&m, &tq, 0), frame);
        assert_eq!(count(&c.rx_bytes), MAX_FRAME_LEN as u64);
    }

    #[test]
    fn budget_bounds_one_call() {
        let m = mem();
        let tq = TestQueue::new(&m, 0, 128);
        let mut q = tq.create_queue();
        for i in 0..100u64 {
            tq.add(&[desc(BUF + i * 0x100, 0x100, true)]);
        }
        let tap = FakeTap::default();
        for _ in 0..100 {
            tap.rx.borrow_mut().push_back(with_hdr(&eth_frame(60, 0)));
        }
        let (mut rx, _) = path(false);
        assert_eq!(rx.process(&m, &mut q, &tap).unwrap().stop, RxStop::Budget);
        assert_eq!(usize::from(tq.used_idx()), RX_BUDGET);
        assert_eq!(
            rx.process(&m, &mut q, &tap).unwrap().stop,
            RxStop::NoBuffers
        );
        assert_eq!(tq.used_idx(), 100);
    }

    #[test]
    fn event_idx_suppresses_interrupts() {
        let m = mem();
        let tq = TestQueue::new(&m, 0, 16);
        let mut q = tq.create_queue();
        q.set_event_idx(true);
        // used_event = 5: the driver wants an interrupt only past used index 5.
        tq.set_used_event(5);
        add_chains(&tq, 0, 8, 200);
        let tap = FakeTap::default();
        tap.rx.borrow_mut().push_back(with_hdr(&eth_frame(60, 0)));
        let (mut rx, _) = path(false);
        assert!(!rx.process(&m, &mut q, &tap).unwrap().notify);
        for _ in 0..6 {
            tap.rx.borrow_mut().push_back(with_hdr(&eth_frame(60, 0)));
        }
        let out = rx.process(&m, &mut q, &tap).unwrap();
        assert_eq!(tq.used_idx(), 7);
        assert!(out.notify, "{out:?}");
    }

    #[test]
    fn real_tap_frames_land_in_guest_buffers() {
        if !tun_available() {
            return;
        }
        let t = TestTap::new();
        let m = mem();
        let tq = TestQueue::new(&m, 0, 16);
        let mut q = tq.create_queue();
        add_chains(&tq, 0, 1, 1526);
        let (mut rx, _) = path(false);
        let frame = eth_frame(300, 9);
        t.inject(&frame);
        rx.process(&m, &mut q, &t.tap).unwrap();
        assert_eq!(tq.used_idx(), 1);
        assert_eq!(tq.used(0), (0, 312));
        assert_eq!(read(&m, buf(0) + 12, 300), frame);
        assert_eq!(num_buffers(&m, buf(0)), 1);
    }

    #[test]
    fn real_tap_mrg_and_no_buffers() {
        if !tun_available() {
            return;
        }
        let t = TestTap::new();
        let m = mem();
        let tq = TestQueue::new(&m, 0, 32);
        let mut q = tq.create_queue();
        let (mut rx, _) = path(true);
        let frame = eth_frame(1000, 10);
        t.inject(&frame);
        // No buffers: the frame stays in the tap.
        assert_eq!(
            rx.process(&m, &mut q, &t.tap).unwrap().stop,
            RxStop::NoBuffers
        );
        assert!(t.tap_readable());
        assert!(!rx.has_pending());
        // Buffers of 112 bytes: the frame needs 10 of them (1012 bytes).
        add_chains(&tq, 0, 12, 112);
        let out = rx.process(&m, &mut q, &t.tap).unwrap();
        assert_eq!(out.stop, RxStop::TapEmpty);
        assert!(!t.tap_readable());
        assert_eq!(tq.used_idx(), 10);
        assert_eq!(num_buffers(&m, buf(0)), 10);
        assert_eq!(gather(&m, &tq, 0), frame);
        // Two buffers left, not enough for the next frame: it waits in the pending buffer.
        t.inject(&frame);
        assert_eq!(
            rx.process(&m, &mut q, &t.tap).unwrap().stop,
            RxStop::NoBuffers
        );
        assert!(rx.has_pending());
        add_chains(&tq, 12, 8, 112);
        rx.process(&m, &mut q, &t.tap).unwrap();
        assert_eq!(tq.used_idx(), 20);
        assert_eq!(gather(&m, &tq, 10), frame);
    }
}
