//! `NetDevice` served to an in-process frontend, over a real tap watched through a packet
//! socket (skipped without /dev/net/tun).

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use virtio_bindings::virtio_net::{VIRTIO_NET_F_MAC, VIRTIO_NET_F_MRG_RXBUF};
use vm_memory::{Bytes, GuestAddress};

use super::{Driver, Served, Start, DATA};
use crate::backend::{BackendError, NetDevice};
use crate::virtio::net::testutil::{eth_frame, tun_available, with_hdr, TestTap};
use crate::virtio::net::{Tap, CONFIG_LEN};
use crate::virtio::VIRTIO_RING_F_EVENT_IDX;

const MAC: [u8; 6] = [0x02, 0, 0, 0xab, 0xcd, 0xef];
const RX: usize = 0;
const TX: usize = 1;
const TX_BUF: u64 = DATA;
const RX_BUF: u64 = DATA + 0x10_0000;

fn device(t: &TestTap, mac: Option<[u8; 6]>) -> NetDevice {
    NetDevice::new(Tap::from_fd(t.tap_fd_dup()).unwrap(), mac).unwrap()
}

fn moves_frames_both_ways(wanted: u64, enable_early: bool) {
    let t = TestTap::new();
    let served = Served::start(device(&t, Some(MAC)), 1);
    let start = Start {
        enable_early,
        ..Start::default()
    };
    let mut d = Driver::connect_with(&served.socket, 2, wanted, start);
    let config = d.config(CONFIG_LEN as u32);
    assert_eq!(config[..6], MAC);
    assert_eq!(config[6..8], [1, 0]); // link up

    // Transmit: the frame shows up on the interface, the driver gets an interrupt.
    let frame = eth_frame(400, 1);
    d.mem
        .write_slice(&with_hdr(&frame), GuestAddress(TX_BUF))
        .unwrap();
    d.rings[TX].add(&[(TX_BUF, 412, false)]);
    d.rings[TX].kick();
    d.rings[TX].wait_used(1);
    assert_eq!(d.rings[TX].used(0).1, 0);
    assert_eq!(t.recv_test_frame(), Some(frame));

    // Receive: buffers first, then a frame from the host side.
    d.rings[RX].add(&[(RX_BUF, 1526, true)]);
    d.rings[RX].kick();
    let frame = eth_frame(900, 2);
    // The backend may still be arming the tap: the frame waits in the tap queue anyway.
    t.inject(&frame);
    d.rings[RX].wait_used(1);
    assert_eq!(d.rings[RX].used(0), (0, 912));
    let mut got = vec![0u8; 900];
    d.mem
        .read_slice(&mut got, GuestAddress(RX_BUF + 12))
        .unwrap();
    assert_eq!(got, frame);
    if d.features & (1 << VIRTIO_NET_F_MRG_RXBUF) != 0 {
        // num_buffers
        assert_eq!(d.mem.read_obj::<u16>(GuestAddress(RX_BUF + 10)).unwrap(), 1);
    }

    drop(d);
    let (server, results) = served.finish();
    assert!(matches!(results[..], [Ok(())]), "{results:?}");
    let c = server.into_device().unwrap().counters();
    assert_eq!(c.tx_frames.load(Ordering::Relaxed), 1);
    assert_eq!(c.rx_frames.load(Ordering::Relaxed), 1);
    assert_eq!(c.rx_bytes.load(Ordering::Relaxed), 900);
}

#[test]
fn frames_move_both_ways() {
    if tun_available() {
        moves_frames_both_ways(u64::MAX, false);
    }
}

/// QEMU's order: both rings enabled before SET_FEATURES, and not again afterwards.
#[test]
fn frames_move_both_ways_with_rings_enabled_before_the_features() {
    if tun_available() {
        moves_frames_both_ways(u64::MAX, true);
    }
}

#[test]
fn frames_move_both_ways_without_event_idx_or_mergeable_buffers() {
    if tun_available() {
        moves_frames_both_ways(
            !(VIRTIO_RING_F_EVENT_IDX | 1 << VIRTIO_NET_F_MRG_RXBUF),
            false,
        );
    }
}

/// Waits until the backend has not been woken for 300 ms in a row, at most 3 s.
fn wait_idle(wakeups: &std::sync::atomic::AtomicU64) {
    let deadline = Instant::now() + Duration::from_secs(3);
    let mut last = wakeups.load(Ordering::SeqCst);
    loop {
        std::thread::sleep(Duration::from_millis(300));
        let now = wakeups.load(Ordering::SeqCst);
        if now == last {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the backend keeps waking up: {now} events"
        );
        last = now;
    }
}

#[test]
fn receive_waits_for_buffers_without_losing_or_spinning() {
    if !tun_available() {
        return;
    }
    let t = TestTap::new();
    let dev = device(&t, None);
    let wakeups = dev.wakeups.clone();
    let served = Served::start(dev, 1);
    let mut d = Driver::connect(&served.socket, 2, u64::MAX);
    assert_eq!(d.features & (1 << VIRTIO_NET_F_MAC), 0);

    // No receive buffers: the frames stay in the tap, and the backend sleeps.
    let frames = [eth_frame(200, 3), eth_frame(300, 4)];
    for f in &frames {
        t.inject(f);
    }
    wait_idle(&wakeups);
    let before = wakeups.load(Ordering::SeqCst);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        wakeups.load(Ordering::SeqCst),
        before,
        "busy loop while starved"
    );
    assert!(t.tap_readable());
    assert_eq!(d.rings[RX].used_idx(), 0);

    // One buffer: the first frame arrives, the second waits for the next buffer.
    d.rings[RX].add(&[(RX_BUF, 1526, true)]);
    d.rings[RX].kick();
    d.rings[RX].wait_used(1);
    wait_idle(&wakeups);
    assert_eq!(d.rings[RX].used_idx(), 1);
    assert!(t.tap_readable());

    // The kick for the next buffer resumes receiving.
    d.rings[RX].add(&[(RX_BUF + 0x1000, 1526, true)]);
    d.rings[RX].kick();
    d.rings[RX].wait_used(2);
    for (i, f) in frames.iter().enumerate() {
        let (head, len) = d.rings[RX].used(i as u16);
        assert_eq!(len as usize, 12 + f.len());
        let mut got = vec![0u8; f.len()];
        let at = RX_BUF + u64::from(head) * 0x1000 + 12;
        d.mem.read_slice(&mut got, GuestAddress(at)).unwrap();
        assert_eq!(&got, f);
    }
    assert!(!t.tap_readable());

    // With buffers left the tap is polled: a new frame arrives without a kick.
    d.rings[RX].add(&[(RX_BUF + 0x2000, 1526, true)]);
    d.rings[RX].kick();
    wait_idle(&wakeups);
    d.rings[RX].want_interrupt();
    let frame = eth_frame(100, 5);
    t.inject(&frame);
    d.rings[RX].wait_used(3);
    assert_eq!(d.rings[RX].used(2).1 as usize, 12 + frame.len());
    drop(d);
    served.finish();
}

#[test]
fn a_second_frontend_gets_a_fresh_connection() {
    if !tun_available() {
        return;
    }
    let t = TestTap::new();
    let served = Served::start(device(&t, Some(MAC)), 2);
    for seed in [10u8, 20] {
        let mut d = Driver::connect(&served.socket, 2, u64::MAX);
        let frame = eth_frame(64, seed);
        d.mem
            .write_slice(&with_hdr(&frame), GuestAddress(TX_BUF))
            .unwrap();
        d.rings[TX].add(&[(TX_BUF, 76, false)]);
        d.rings[TX].kick();
        d.rings[TX].wait_used(1);
        assert_eq!(t.recv_test_frame(), Some(frame));
    }
    let (_, results) = served.finish();
    assert!(matches!(results[..], [Ok(()), Ok(())]), "{results:?}");
}

#[test]
fn multicast_macs_are_refused() {
    if !tun_available() {
        return;
    }
    let t = TestTap::new();
    let tap = Tap::from_fd(t.tap_fd_dup()).unwrap();
    let err = NetDevice::new(tap, Some([1, 0, 0, 0, 0, 1])).err().unwrap();
    assert!(matches!(err, BackendError::MulticastMac(_)));
    assert!(err.to_string().contains("01:00:00:00:00:01"), "{err}");
}
