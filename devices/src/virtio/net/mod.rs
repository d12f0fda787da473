//! virtio-net over a tap device (virtio 1.2, 5.1): one receive and one transmit queue.
//!
//! The guest's 12-byte `virtio_net_hdr_v1` passes unchanged between the guest and the tap
//! (configured for that header size), so checksum and segmentation offloads cost nothing here.
//! Frames move with one readv/writev between the tap and guest memory; only the part of a
//! received frame that does not fit the first receive buffer is copied.
//!
//! [`RxPath`] and [`TxPath`] hold the transport-independent queue processing (no threads, no
//! eventfds) that a vhost-user backend can reuse; [`Net`] wraps them in a [`VirtioDevice`]
//! served by one worker thread.

mod chain;
mod rx;
mod tap;
#[cfg(test)]
pub(crate) mod testutil;
mod tx;
mod worker;

use std::io;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use virtio_bindings::virtio_net::*;
use virtio_queue::QueueT;
use vm_memory::GuestMemoryMmap;

pub(crate) use chain::request_notification;
pub use chain::{FrameIo, MAX_IOVECS};
pub use rx::{RxOutcome, RxPath, RxStop};
pub use tap::{Tap, TapError};
pub use tx::{TxOutcome, TxPath, TxStop};

use super::{
    ActivateError, ActivatedQueue, VirtioDevice, VirtioInterrupt, TYPE_NET, VIRTIO_F_VERSION_1,
    VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC,
};
use worker::{WorkerHandle, WorkerParts};

/// Size of `virtio_net_hdr_v1`, which precedes every frame (with VIRTIO_F_VERSION_1 the
/// header always has `num_buffers`).
pub const VNET_HDR_LEN: usize = 12;
/// The largest frame: a 64 KiB (GSO) IP packet with its Ethernet and VLAN headers.
pub const MAX_FRAME_LEN: usize = 65550;
/// The largest header plus frame (the receive buffer size virtio 1.2, 5.1.6.3.1 asks of
/// drivers without VIRTIO_NET_F_MRG_RXBUF).
pub const MAX_PACKET_LEN: usize = VNET_HDR_LEN + MAX_FRAME_LEN;
/// The largest queue size offered.
pub const MAX_QUEUE_SIZE: u16 = 256;

const RX_QUEUE: u16 = 0;
const TX_QUEUE: u16 = 1;
const NUM_QUEUES: usize = 2;

const fn bit(feature: u32) -> u64 {
    1 << feature
}

/// Features offered regardless of configuration (VIRTIO_NET_F_MTU is added when an MTU is set).
pub const BASE_FEATURES: u64 = VIRTIO_F_VERSION_1
    | VIRTIO_RING_F_EVENT_IDX
    | VIRTIO_RING_F_INDIRECT_DESC
    | bit(VIRTIO_NET_F_MAC)
    | bit(VIRTIO_NET_F_STATUS)
    | bit(VIRTIO_NET_F_MRG_RXBUF)
    | bit(VIRTIO_NET_F_CSUM)
    | bit(VIRTIO_NET_F_GUEST_CSUM)
    | bit(VIRTIO_NET_F_GUEST_TSO4)
    | bit(VIRTIO_NET_F_GUEST_TSO6)
    | bit(VIRTIO_NET_F_GUEST_ECN)
    | bit(VIRTIO_NET_F_GUEST_UFO)
    | bit(VIRTIO_NET_F_HOST_TSO4)
    | bit(VIRTIO_NET_F_HOST_TSO6)
    | bit(VIRTIO_NET_F_HOST_ECN)
    | bit(VIRTIO_NET_F_HOST_UFO);

/// Length of the configuration space we expose: mac, status, max_virtqueue_pairs, mtu.
pub const CONFIG_LEN: usize = 12;

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("virtio-net queue size {0} is invalid: use a power of two from 2 to 256")]
    QueueSize(u16),
    #[error("virtio-net MTU {0} is invalid: use at least 68 (the IPv4 minimum)")]
    Mtu(u16),
    #[error(
        "MAC address {0} is a multicast address: clear the lowest bit of the first byte \
         (e.g. use 02:xx:xx:xx:xx:xx)"
    )]
    MulticastMac(String),
    #[error(transparent)]
    Tap(#[from] TapError),
    #[error("cannot access a virtio-net ring in guest memory: {0} (the driver set up bad rings)")]
    Ring(vm_memory::GuestMemoryError),
    #[error("a virtio-net ring address overflows (the driver set up bad rings)")]
    RingAddress,
    #[error("virtio-net queue error: {0} (the driver set up bad rings)")]
    Queue(virtio_queue::Error),
    #[error("cannot read from the tap: {0}")]
    TapRead(io::Error),
    #[error("virtio-net worker epoll failed: {0}")]
    Epoll(io::Error),
}

/// Traffic counters, updated by the worker with relaxed atomics.
#[derive(Debug, Default)]
pub struct NetCounters {
    /// Frames delivered to the guest, and their bytes (without the virtio-net header).
    pub rx_frames: AtomicU64,
    pub rx_bytes: AtomicU64,
    /// Frames from the tap that were lost: too large for the guest's buffers or for a frame.
    pub rx_dropped: AtomicU64,
    /// Frames sent to the tap, and their bytes (without the virtio-net header).
    pub tx_frames: AtomicU64,
    pub tx_bytes: AtomicU64,
    /// Guest frames not sent: malformed chains, or refused by the tap.
    pub tx_dropped: AtomicU64,
    /// Malformed descriptor chains (either queue), returned to the guest unused.
    pub bad_chains: AtomicU64,
}

/// What the VMM configures for one network device.
pub struct NetConfig {
    pub tap: Tap,
    pub mac: [u8; 6],
    pub mtu: Option<u16>,
    /// Size of each queue: a power of two, at most [`MAX_QUEUE_SIZE`].
    pub queue_size: u16,
}

/// A virtio-net device backed by a tap.
pub struct Net {
    tap: Arc<Tap>,
    mac: [u8; 6],
    mtu: Option<u16>,
    queue_size: u16,
    avail_features: u64,
    acked_features: u64,
    counters: Arc<NetCounters>,
    worker: Option<WorkerHandle>,
}

impl Net {
    pub fn new(config: NetConfig) -> Result<Net, NetError> {
        let NetConfig {
            tap,
            mac,
            mtu,
            queue_size,
        } = config;
        if !(2..=MAX_QUEUE_SIZE).contains(&queue_size) || !queue_size.is_power_of_two() {
            return Err(NetError::QueueSize(queue_size));
        }
        if let Some(m) = mtu.filter(|&m| m < 68) {
            return Err(NetError::Mtu(m));
        }
        if mac[0] & 1 != 0 {
            return Err(NetError::MulticastMac(format_mac(&mac)));
        }
        let mut avail_features = BASE_FEATURES;
        if mtu.is_some() {
            avail_features |= bit(VIRTIO_NET_F_MTU);
        }
        Ok(Net {
            tap: Arc::new(tap),
            mac,
            mtu,
            queue_size,
            avail_features,
            acked_features: 0,
            counters: Arc::new(NetCounters::default()),
            worker: None,
        })
    }

    pub fn counters(&self) -> Arc<NetCounters> {
        self.counters.clone()
    }

    fn config_space(&self) -> [u8; CONFIG_LEN] {
        config_space(&self.mac, self.mtu)
    }
}

/// The little-endian configuration space: `mac`, link up, one queue pair, `mtu` (0 if none).
pub fn config_space(mac: &[u8; 6], mtu: Option<u16>) -> [u8; CONFIG_LEN] {
    let mut cfg = [0u8; CONFIG_LEN];
    cfg[..6].copy_from_slice(mac);
    cfg[6..8].copy_from_slice(&(VIRTIO_NET_S_LINK_UP as u16).to_le_bytes());
    cfg[8..10].copy_from_slice(&1u16.to_le_bytes());
    cfg[10..12].copy_from_slice(&mtu.unwrap_or(0).to_le_bytes());
    cfg
}

/// The tap offloads (TUN_F_*) matching what the driver accepted to receive: the kernel may
/// then hand us only frames the guest can take. TSO/UFO need checksum offload in both.
pub fn tap_offloads(acked_features: u64) -> u32 {
    let has = |f: u32| acked_features & bit(f) != 0;
    if !has(VIRTIO_NET_F_GUEST_CSUM) {
        return 0;
    }
    let mut flags = libc::TUN_F_CSUM;
    if has(VIRTIO_NET_F_GUEST_TSO4) {
        flags |= libc::TUN_F_TSO4;
    }
    if has(VIRTIO_NET_F_GUEST_TSO6) {
        flags |= libc::TUN_F_TSO6;
    }
    if has(VIRTIO_NET_F_GUEST_ECN) && flags & (libc::TUN_F_TSO4 | libc::TUN_F_TSO6) != 0 {
        flags |= libc::TUN_F_TSO_ECN;
    }
    if has(VIRTIO_NET_F_GUEST_UFO) {
        flags |= libc::TUN_F_UFO;
    }
    flags
}

fn format_mac(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        TYPE_NET
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![self.queue_size; NUM_QUEUES]
    }

    fn features(&self) -> u64 {
        self.avail_features
    }

    fn ack_features(&mut self, features: u64) {
        self.acked_features = features & self.avail_features;
        if let Err(e) = self.tap.set_offload(tap_offloads(self.acked_features)) {
            // The guest still works; the kernel just cannot pass it offloaded frames.
            log::warn!("virtio-net: {e}");
        }
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let cfg = self.config_space();
        for (i, byte) in data.iter_mut().enumerate() {
            *byte = usize::try_from(offset)
                .ok()
                .and_then(|o| o.checked_add(i))
                .and_then(|o| cfg.get(o).copied())
                .unwrap_or(0);
        }
    }

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        interrupt: Arc<dyn VirtioInterrupt>,
        queues: Vec<ActivatedQueue>,
    ) -> Result<(), ActivateError> {
        if self.worker.is_some() {
            return Err(ActivateError::Other(
                "virtio-net is already active: reset it first".to_string(),
            ));
        }
        if queues.len() != NUM_QUEUES {
            return Err(ActivateError::QueueCount {
                got: queues.len(),
                want: NUM_QUEUES,
            });
        }
        let mut rx = None;
        let mut tx = None;
        for q in queues {
            match q.index {
                RX_QUEUE => rx = Some(q),
                TX_QUEUE => tx = Some(q),
                i => {
                    return Err(ActivateError::Other(format!(
                        "virtio-net has queues 0 and 1, got queue {i}"
                    )))
                }
            }
        }
        let (Some(mut rx), Some(mut tx)) = (rx, tx) else {
            return Err(ActivateError::Other(
                "virtio-net needs both queue 0 (receive) and queue 1 (transmit)".to_string(),
            ));
        };
        let event_idx = self.acked_features & VIRTIO_RING_F_EVENT_IDX != 0;
        rx.queue.set_event_idx(event_idx);
        tx.queue.set_event_idx(event_idx);
        let parts = WorkerParts {
            mem,
            interrupt,
            rx_queue: rx.queue,
            rx_kick: rx.kick,
            tx_queue: tx.queue,
            tx_kick: tx.kick,
            tap: self.tap.clone(),
            mrg_rxbuf: self.acked_features & bit(VIRTIO_NET_F_MRG_RXBUF) != 0,
            counters: self.counters.clone(),
        };
        let name = format!("net-{}", self.tap.if_name());
        self.worker = Some(worker::spawn(name, parts).map_err(ActivateError::Worker)?);
        Ok(())
    }

    fn reset(&mut self) -> bool {
        // Dropping the handle stops the worker and waits for it; a frame it held is lost,
        // as on real hardware.
        self.worker = None;
        self.acked_features = 0;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::testutil::{
        desc, eth_frame, mem, tun_available, with_hdr, TestInterrupt, TestQueue, TestTap,
    };
    use super::*;
    use std::sync::atomic::Ordering;
    use std::time::{Duration, Instant};
    use virtio_bindings::virtio_ring::VRING_USED_F_NO_NOTIFY;
    use vm_memory::{Bytes, GuestAddress};
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

    const MAC: [u8; 6] = [0x02, 0x00, 0x00, 0x12, 0x34, 0x56];

    fn net(tap: Tap, mtu: Option<u16>) -> Net {
        Net::new(NetConfig {
            tap,
            mac: MAC,
            mtu,
            queue_size: 256,
        })
        .unwrap()
    }

    #[test]
    fn new_validates_the_config() {
        if !tun_available() {
            return;
        }
        let t = TestTap::new();
        let config = |queue_size, mtu, mac| NetConfig {
            tap: Tap::from_fd(t.tap_fd_dup()).unwrap(),
            mac,
            mtu,
            queue_size,
        };
        for size in [0, 1, 3, 100, 512] {
            assert!(matches!(
                Net::new(config(size, None, MAC)),
                Err(NetError::QueueSize(_))
            ));
        }
        assert!(matches!(
            Net::new(config(256, Some(67), MAC)),
            Err(NetError::Mtu(67))
        ));
        let err = Net::new(config(256, None, [1, 0, 0, 0, 0, 1]))
            .err()
            .unwrap();
        assert!(err.to_string().contains("01:00:00:00:00:01"), "{err}");
        assert!(Net::new(config(2, Some(68), MAC)).is_ok());
    }

    #[test]
    fn features_and_config_space() {
        if !tun_available() {
            return;
        }
        let t = TestTap::new();
        let n = net(Tap::from_fd(t.tap_fd_dup()).unwrap(), None);
        assert_eq!(n.device_type(), TYPE_NET);
        assert_eq!(n.queue_max_sizes(), vec![256, 256]);
        let f = n.features();
        for bit_set in [
            VIRTIO_F_VERSION_1,
            VIRTIO_RING_F_EVENT_IDX,
            VIRTIO_RING_F_INDIRECT_DESC,
            bit(VIRTIO_NET_F_MAC),
            bit(VIRTIO_NET_F_STATUS),
            bit(VIRTIO_NET_F_MRG_RXBUF),
            bit(VIRTIO_NET_F_CSUM),
            bit(VIRTIO_NET_F_GUEST_CSUM),
            bit(VIRTIO_NET_F_GUEST_TSO4),
            bit(VIRTIO_NET_F_GUEST_TSO6),
            bit(VIRTIO_NET_F_GUEST_ECN),
            bit(VIRTIO_NET_F_GUEST_UFO),
            bit(VIRTIO_NET_F_HOST_TSO4),
            bit(VIRTIO_NET_F_HOST_TSO6),
            bit(VIRTIO_NET_F_HOST_ECN),
            bit(VIRTIO_NET_F_HOST_UFO),
        ] {
            assert_ne!(f & bit_set, 0, "{bit_set:#x}");
        }
        assert_eq!(f & bit(VIRTIO_NET_F_MTU), 0);
        assert_eq!(f & bit(VIRTIO_NET_F_CTRL_VQ), 0);

        let mut cfg = [0xffu8; 16];
        n.read_config(0, &mut cfg);
        assert_eq!(cfg[..6], MAC);
        assert_eq!(cfg[6..8], [1, 0]); // VIRTIO_NET_S_LINK_UP
        assert_eq!(cfg[8..10], [1, 0]); // max_virtqueue_pairs
        assert_eq!(cfg[10..], [0; 6]); // no MTU, then out of range

        let n = net(Tap::from_fd(t.tap_fd_dup()).unwrap(), Some(9000));
        assert_ne!(n.features() & bit(VIRTIO_NET_F_MTU), 0);
        let mut mtu = [0u8; 2];
        n.read_config(10, &mut mtu);
        assert_eq!(u16::from_le_bytes(mtu), 9000);
        let mut one = [0u8; 1];
        n.read_config(4, &mut one);
        assert_eq!(one[0], 0x34);
        n.read_config(u64::MAX, &mut cfg);
        assert_eq!(cfg, [0; 16]);
    }

    #[test]
    fn offloads_follow_what_the_guest_receives() {
        let f = |bits: &[u32]| bits.iter().fold(0u64, |acc, &b| acc | bit(b));
        assert_eq!(tap_offloads(0), 0);
        // Host-side (guest transmit) offloads do not matter.
        assert_eq!(
            tap_offloads(f(&[VIRTIO_NET_F_CSUM, VIRTIO_NET_F_HOST_TSO4])),
            0
        );
        // TSO without checksum offload is not possible.
        assert_eq!(tap_offloads(f(&[VIRTIO_NET_F_GUEST_TSO4])), 0);
        assert_eq!(
            tap_offloads(f(&[VIRTIO_NET_F_GUEST_CSUM])),
            libc::TUN_F_CSUM
        );
        assert_eq!(
            tap_offloads(f(&[VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_ECN])),
            libc::TUN_F_CSUM
        );
        assert_eq!(
            tap_offloads(f(&[
                VIRTIO_NET_F_GUEST_CSUM,
                VIRTIO_NET_F_GUEST_TSO4,
                VIRTIO_NET_F_GUEST_TSO6,
                VIRTIO_NET_F_GUEST_ECN,
                VIRTIO_NET_F_GUEST_UFO,
            ])),
            libc::TUN_F_CSUM
                | libc::TUN_F_TSO4
                | libc::TUN_F_TSO6
                | libc::TUN_F_TSO_ECN
                | libc::TUN_F_UFO
        );
        // Everything we offer is accepted by the kernel.
        if tun_available() {
            let t = TestTap::new();
            t.tap.set_offload(tap_offloads(BASE_FEATURES)).unwrap();
        }
    }

    /// A device with its queues in `m`: rx rings at 0, tx rings at 0x10000.
    struct Rig<'m> {
        rxq: TestQueue<'m>,
        txq: TestQueue<'m>,
        rx_kick: EventFd,
        tx_kick: EventFd,
        irq: Arc<TestInterrupt>,
    }

    impl<'m> Rig<'m> {
        fn activate(n: &mut Net, m: &'m GuestMemoryMmap) -> Rig<'m> {
            let rxq = TestQueue::new(m, 0, 16);
            let txq = TestQueue::new(m, 0x1_0000, 16);
            let rx_kick = EventFd::new(EFD_NONBLOCK).unwrap();
            let tx_kick = EventFd::new(EFD_NONBLOCK).unwrap();
            let irq = Arc::new(TestInterrupt::default());
            let queues = vec![
                ActivatedQueue {
                    index: TX_QUEUE,
                    queue: txq.create_queue(),
                    kick: tx_kick.try_clone().unwrap(),
                },
                ActivatedQueue {
                    index: RX_QUEUE,
                    queue: rxq.create_queue(),
                    kick: rx_kick.try_clone().unwrap(),
                },
            ];
            n.activate(m.clone(), irq.clone(), queues).unwrap();
            Rig {
                rxq,
                txq,
                rx_kick,
                tx_kick,
                irq,
            }
        }
    }

    /// All offered features but EVENT_IDX (so every used buffer interrupts).
    fn ack(n: &mut Net) {
        n.ack_features(n.features() & !VIRTIO_RING_F_EVENT_IDX);
    }

    #[test]
    fn activation_checks_the_queues() {
        if !tun_available() {
            return;
        }
        let t = TestTap::new();
        let mut n = net(Tap::from_fd(t.tap_fd_dup()).unwrap(), None);
        let m = mem();
        let tq = TestQueue::new(&m, 0, 16);
        let q = |index| ActivatedQueue {
            index,
            queue: tq.create_queue(),
            kick: EventFd::new(EFD_NONBLOCK).unwrap(),
        };
        let irq = Arc::new(TestInterrupt::default());
        assert!(matches!(
            n.activate(m.clone(), irq.clone(), vec![q(0)]),
            Err(ActivateError::QueueCount { got: 1, want: 2 })
        ));
        assert!(matches!(
            n.activate(m.clone(), irq.clone(), vec![q(0), q(0)]),
            Err(ActivateError::Other(_))
        ));
        assert!(matches!(
            n.activate(m.clone(), irq, vec![q(0), q(2)]),
            Err(ActivateError::Other(_))
        ));
    }

    #[test]
    fn worker_moves_frames_both_ways() {
        if !tun_available() {
            return;
        }
        let t = TestTap::new();
        let mut n = net(Tap::from_fd(t.tap_fd_dup()).unwrap(), Some(1500));
        ack(&mut n);
        let m = mem();
        let rig = Rig::activate(&mut n, &m);
        assert!(
            wait_for_worker(&t.name).is_some(),
            "worker thread not found"
        );

        // Transmit: the frame shows up on the interface, the guest gets an interrupt.
        let frame = eth_frame(300, 1);
        m.write_slice(&with_hdr(&frame), GuestAddress(0x10_0000))
            .unwrap();
        rig.txq.add(&[desc(0x10_0000, 312, false)]);
        rig.tx_kick.write(1).unwrap();
        assert!(rig.irq.wait(1, 0), "no transmit interrupt");
        assert_eq!(t.recv_test_frame(), Some(frame));
        assert_eq!(rig.txq.used_idx(), 1);

        // Receive: buffers first, then a frame from the host side.
        rig.rxq.add(&[desc(0x20_0000, 1526, true)]);
        rig.rx_kick.write(1).unwrap();
        let frame = eth_frame(700, 2);
        t.inject(&frame);
        assert!(rig.irq.wait(0, 0), "no receive interrupt");
        assert_eq!(rig.rxq.used(0), (0, 712));
        let mut got = vec![0u8; 700];
        m.read_slice(&mut got, GuestAddress(0x20_0000 + 12))
            .unwrap();
        assert_eq!(got, frame);

        let c = n.counters();
        assert_eq!(c.tx_frames.load(Ordering::Relaxed), 1);
        assert_eq!(c.tx_bytes.load(Ordering::Relaxed), 300);
        assert_eq!(c.rx_frames.load(Ordering::Relaxed), 1);
        assert_eq!(c.rx_bytes.load(Ordering::Relaxed), 700);
    }

    /// Asserts the worker stays idle for 300 ms.
    fn assert_idle(ifname: &str) {
        let start = wait_for_worker(ifname).expect("worker thread not found");
        std::thread::sleep(Duration::from_millis(300));
        let spent = worker_cpu_ticks(ifname).unwrap() - start;
        assert!(spent <= 3, "worker used {spent} ticks while starved");
    }

    fn wait_used(q: &TestQueue, n: u16) {
        let deadline = Instant::now() + Duration::from_secs(2);
        while q.used_idx() < n && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(2));
        }
        assert_eq!(q.used_idx(), n);
    }

    fn starve_then_deliver(event_idx: bool) {
        let t = TestTap::new();
        let mut n = net(Tap::from_fd(t.tap_fd_dup()).unwrap(), None);
        let mut features = n.features();
        if !event_idx {
            features &= !VIRTIO_RING_F_EVENT_IDX;
        }
        n.ack_features(features);
        let m = mem();
        let rig = Rig::activate(&mut n, &m);
        let frame = eth_frame(1000, 3);
        t.inject(&frame);
        // No buffers: the frame stays in the tap and the worker sleeps.
        assert_idle(&t.name);
        assert!(t.tap_readable());
        assert_eq!(rig.irq.used[0].load(Ordering::SeqCst), 0);

        // Two 112-byte mergeable buffers: too few for the frame (1012 bytes). The worker
        // takes it from the tap into its pending buffer and waits for more.
        let buffer = |i: u64| desc(0x20_0000 + i * 0x1000, 112, true);
        rig.rxq.add(&[buffer(0)]);
        rig.rxq.add(&[buffer(1)]);
        rig.rx_kick.write(1).unwrap();
        let deadline = Instant::now() + Duration::from_secs(2);
        while t.tap_readable() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(2));
        }
        assert!(!t.tap_readable());
        assert_idle(&t.name);
        assert_eq!(rig.rxq.used_idx(), 0);
        if event_idx {
            // Kick wanted as soon as the guest adds past the 2 entries it has.
            assert_eq!(rig.rxq.avail_event(), 2);
        } else {
            assert_eq!(rig.rxq.used_flags(), 0);
        }

        // Enough buffers, then a kick: the frame is delivered over 10 of them.
        for i in 2..12 {
            rig.rxq.add(&[buffer(i)]);
        }
        rig.rx_kick.write(1).unwrap();
        assert!(rig.irq.wait(0, 0), "no receive interrupt");
        wait_used(&rig.rxq, 10);
        if !event_idx {
            // Buffers left: the worker polls the tap and no longer wants kicks.
            assert_eq!(rig.rxq.used_flags(), VRING_USED_F_NO_NOTIFY as u16);
        }
        let mut got = Vec::new();
        for i in 0..10u16 {
            let (head, len) = rig.rxq.used(i);
            let mut part = vec![0u8; len as usize];
            let at = GuestAddress(0x20_0000 + u64::from(head) * 0x1000);
            m.read_slice(&mut part, at).unwrap();
            got.extend(part);
        }
        assert_eq!(got[10..12], [10, 0]); // num_buffers
        assert_eq!(got[12..], frame);
        assert_eq!(n.counters().rx_dropped.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn worker_waits_for_buffers_without_spinning() {
        if tun_available() {
            starve_then_deliver(false);
        }
    }

    #[test]
    fn worker_waits_for_buffers_without_spinning_event_idx() {
        if tun_available() {
            starve_then_deliver(true);
        }
    }

    #[test]
    fn worker_reset_and_reactivate() {
        if !tun_available() {
            return;
        }
        let t = TestTap::new();
        let mut n = net(Tap::from_fd(t.tap_fd_dup()).unwrap(), None);
        ack(&mut n);
        let m = mem();
        let rig = Rig::activate(&mut n, &m);
        assert!(wait_for_worker(&t.name).is_some());
        assert!(n.reset());
        assert!(worker_cpu_ticks(&t.name).is_none(), "worker still running");
        drop(rig);

        let m = mem();
        ack(&mut n);
        let rig = Rig::activate(&mut n, &m);
        let frame = eth_frame(60, 4);
        m.write_slice(&with_hdr(&frame), GuestAddress(0x10_0000))
            .unwrap();
        rig.txq.add(&[desc(0x10_0000, 72, false)]);
        rig.tx_kick.write(1).unwrap();
        assert!(rig.irq.wait(1, 0));
        assert_eq!(t.recv_test_frame(), Some(frame));
        drop(n);
        assert!(
            worker_cpu_ticks(&t.name).is_none(),
            "worker outlived the device"
        );
    }

    /// Waits up to 2 s for the worker thread to have its name (set as it starts).
    fn wait_for_worker(ifname: &str) -> Option<u64> {
        let deadline = Instant::now() + Duration::from_secs(2);
        loop {
            let ticks = worker_cpu_ticks(ifname);
            if ticks.is_some() || Instant::now() > deadline {
                return ticks;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// CPU time (clock ticks) of this process's thread `net-<ifname>`, if it exists.
    fn worker_cpu_ticks(ifname: &str) -> Option<u64> {
        let mut want = format!("net-{ifname}");
        want.truncate(15); // the kernel keeps 15 bytes of a thread name

        for task in std::fs::read_dir("/proc/self/task").ok()?.flatten() {
            let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
            if comm.trim_end() != want {
                continue;
            }
            let stat = std::fs::read_to_string(task.path().join("stat")).ok()?;
            // Fields after the parenthesised name; utime and stime are fields 14 and 15.
            let rest = &stat[stat.rfind(')')? + 2..];
            let fields: Vec<&str> = rest.split(' ').collect();
            let utime: u64 = fields[11].parse().ok()?;
            let stime: u64 = fields[12].parse().ok()?;
            return Some(utime + stime);
        }
        None
    }
}
