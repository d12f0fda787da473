//! `BlkDevice` served to an in-process frontend.

use std::io::{Read, Seek, SeekFrom, Write};
use std::time::{Duration, Instant};

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT,
};
use vm_memory::{Bytes, GuestAddress};

use std::os::fd::AsRawFd;

use super::{poll_in, Driver, Ring, Served, Start, DATA};
use crate::backend::{BackendError, BlkConfig, BlkDevice};
use crate::virtio::block::config::{VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO};
use crate::virtio::block::CONFIG_SPACE_SIZE;
use crate::virtio::{VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX};

const SECTORS: u64 = 64;
const OK: u8 = VIRTIO_BLK_S_OK as u8;
const IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;

/// A disk image of `SECTORS` sectors, each filled with its number.
fn image() -> std::fs::File {
    let mut file = tempfile::tempfile().unwrap();
    for s in 0..SECTORS {
        file.write_all(&[s as u8; 512]).unwrap();
    }
    file
}

fn device(file: &std::fs::File, read_only: bool, serial: Option<&str>) -> BlkDevice {
    BlkDevice::new(BlkConfig {
        file: file.try_clone().unwrap(),
        read_only,
        serial: serial.map(str::to_string),
        direct: false,
    })
    .unwrap()
}

/// The test driver's buffers for one request: header, data, status.
const HEADER: u64 = DATA;
const BUF: u64 = DATA + 0x1000;
const STATUS: u64 = DATA + 0x10_0000;

/// Sends one request on queue 0 and waits for it; returns (status, used length).
fn request(d: &mut Driver, kind: u32, sector: u64, data: Option<(u32, bool)>) -> (u8, u32) {
    let mut header = [0u8; 16];
    header[..4].copy_from_slice(&kind.to_le_bytes());
    header[8..].copy_from_slice(&sector.to_le_bytes());
    d.mem.write_slice(&header, GuestAddress(HEADER)).unwrap();
    d.mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
    let mut chain = vec![(HEADER, 16, false)];
    if let Some((len, writable)) = data {
        chain.push((BUF, len, writable));
    }
    chain.push((STATUS, 1, true));
    let ring = &mut d.rings[0];
    let before = ring.used_idx();
    let head = ring.add(&chain);
    ring.kick();
    ring.wait_used(before.wrapping_add(1));
    let (id, len) = ring.used(before);
    assert_eq!(id, u32::from(head));
    (d.mem.read_obj(GuestAddress(STATUS)).unwrap(), len)
}

#[test]
fn write_read_flush_and_id() {
    let mut file = image();
    let served = Served::start(device(&file, false, Some("disk-7")), 1);
    let mut d = Driver::connect(&served.socket, 1, u64::MAX);
    assert_ne!(d.features & VIRTIO_RING_F_EVENT_IDX, 0);
    assert_ne!(d.features & VIRTIO_BLK_F_FLUSH, 0);
    assert_ne!(d.features & VIRTIO_F_VERSION_1, 0);
    assert_eq!(d.features & VIRTIO_BLK_F_RO, 0);

    let config = d.config(CONFIG_SPACE_SIZE as u32);
    assert_eq!(u64::from_le_bytes(config[..8].try_into().unwrap()), SECTORS);
    // seg_max as for the in-VMM device's largest (256-entry) queue.
    assert_eq!(u32::from_le_bytes(config[12..16].try_into().unwrap()), 254);

    // Write two sectors, then read three back.
    let pattern: Vec<u8> = (0..1024u32).map(|i| (i * 7 + 3) as u8).collect();
    d.mem.write_slice(&pattern, GuestAddress(BUF)).unwrap();
    assert_eq!(
        request(&mut d, VIRTIO_BLK_T_OUT, 5, Some((1024, false))),
        (OK, 1)
    );
    d.mem.write_slice(&[0u8; 1536], GuestAddress(BUF)).unwrap();
    assert_eq!(
        request(&mut d, VIRTIO_BLK_T_IN, 4, Some((1536, true))),
        (OK, 1537)
    );
    let mut got = vec![0u8; 1536];
    d.mem.read_slice(&mut got, GuestAddress(BUF)).unwrap();
    assert_eq!(got[..512], [4u8; 512]);
    assert_eq!(got[512..], pattern[..]);

    assert_eq!(request(&mut d, VIRTIO_BLK_T_FLUSH, 0, None), (OK, 1));
    let mut on_disk = vec![0u8; 1024];
    file.seek(SeekFrom::Start(5 * 512)).unwrap();
    file.read_exact(&mut on_disk).unwrap();
    assert_eq!(on_disk, pattern);

    assert_eq!(
        request(&mut d, VIRTIO_BLK_T_GET_ID, 0, Some((20, true))),
        (OK, 21)
    );
    let mut id = [0u8; 20];
    d.mem.read_slice(&mut id, GuestAddress(BUF)).unwrap();
    assert_eq!(&id[..6], b"disk-7");
    assert!(id[6..].iter().all(|&b| b == 0));

    // Past the end: an error status, and the backend keeps serving.
    assert_eq!(
        request(&mut d, VIRTIO_BLK_T_IN, SECTORS, Some((512, true))),
        (IOERR, 1)
    );
    assert_eq!(request(&mut d, VIRTIO_BLK_T_IN, 0, Some((512, true))).0, OK);

    let counters = {
        drop(d);
        let (server, results) = served.finish();
        assert!(matches!(results[..], [Ok(())]), "{results:?}");
        server.into_device().unwrap().counters()
    };
    use std::sync::atomic::Ordering::Relaxed;
    assert_eq!(counters.writes.load(Relaxed), 1);
    assert_eq!(counters.reads.load(Relaxed), 2);
    assert_eq!(counters.errors.load(Relaxed), 1);
    assert_eq!(counters.flushes.load(Relaxed), 1);
}

#[test]
fn without_event_idx_every_request_interrupts() {
    let file = image();
    let served = Served::start(device(&file, false, None), 1);
    let mut d = Driver::connect(&served.socket, 1, !VIRTIO_RING_F_EVENT_IDX);
    assert_eq!(d.features & VIRTIO_RING_F_EVENT_IDX, 0);
    for sector in 0..20 {
        // More requests than the queue has entries: the ring wraps.
        let (status, len) = request(&mut d, VIRTIO_BLK_T_IN, sector, Some((512, true)));
        assert_eq!((status, len), (OK, 513));
        assert_eq!(
            d.mem.read_obj::<u8>(GuestAddress(BUF)).unwrap(),
            sector as u8
        );
    }
    drop(d);
    served.finish();
}

#[test]
fn read_only_disk_refuses_writes() {
    let mut file = image();
    let served = Served::start(device(&file, true, None), 1);
    let mut d = Driver::connect(&served.socket, 1, u64::MAX);
    assert_ne!(d.features & VIRTIO_BLK_F_RO, 0);
    d.mem.write_slice(&[0xaa; 512], GuestAddress(BUF)).unwrap();
    assert_eq!(
        request(&mut d, VIRTIO_BLK_T_OUT, 1, Some((512, false))),
        (IOERR, 1)
    );
    let mut sector = [0u8; 512];
    file.seek(SeekFrom::Start(512)).unwrap();
    file.read_exact(&mut sector).unwrap();
    assert_eq!(sector, [1u8; 512]);
    assert_eq!(request(&mut d, VIRTIO_BLK_T_IN, 1, Some((512, true))).0, OK);
    drop(d);
    served.finish();
}

#[test]
fn disconnect_ends_the_connection_and_a_new_frontend_starts_fresh() {
    let file = image();
    let served = Served::start(device(&file, false, None), 2);
    // The first frontend takes everything, the second no EVENT_IDX: nothing carries over.
    for wanted in [u64::MAX, !VIRTIO_RING_F_EVENT_IDX] {
        let mut d = Driver::connect(&served.socket, 1, wanted);
        assert_eq!(
            d.features & VIRTIO_RING_F_EVENT_IDX,
            wanted & VIRTIO_RING_F_EVENT_IDX
        );
        d.mem.write_slice(&[0x5a; 512], GuestAddress(BUF)).unwrap();
        assert_eq!(
            request(&mut d, VIRTIO_BLK_T_OUT, 9, Some((512, false))).0,
            OK
        );
        assert_eq!(request(&mut d, VIRTIO_BLK_T_IN, 9, Some((512, true))).0, OK);
        assert_eq!(d.rings[0].used_idx(), 2);
    }
    let (_, results) = served.finish();
    assert!(matches!(results[..], [Ok(()), Ok(())]), "{results:?}");
}

#[test]
fn a_frontend_that_leaves_before_negotiating_is_a_clean_disconnect() {
    let file = image();
    let served = Served::start(device(&file, false, None), 1);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    let stream = loop {
        match std::os::unix::net::UnixStream::connect(&served.socket) {
            Ok(s) => break s,
            Err(_) if std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(10))
            }
            Err(e) => panic!("{e}"),
        }
    };
    drop(stream);
    let (server, results) = served.finish();
    assert!(matches!(results[..], [Ok(())]), "{results:?}");
    assert!(server.into_device().is_some());
}

#[test]
fn bad_configurations_are_refused() {
    let file = image();
    let long = BlkDevice::new(BlkConfig {
        file: file.try_clone().unwrap(),
        read_only: false,
        serial: Some("x".repeat(21)),
        direct: false,
    });
    assert!(matches!(long, Err(BackendError::Block(_))));
    // A read-only descriptor for a writable disk.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("disk");
    std::fs::write(&path, [0u8; 4096]).unwrap();
    let ro = std::fs::File::open(&path).unwrap();
    let err = BlkDevice::new(BlkConfig {
        file: ro,
        read_only: false,
        serial: None,
        direct: false,
    })
    .err()
    .unwrap();
    assert!(err.to_string().contains("read-only"), "{err}");
}

/// Writes a request header for `kind` at `sector` into guest memory at `at`.
fn header(d: &Ring, at: u64, kind: u32, sector: u64) {
    let mut header = [0u8; 16];
    header[..4].copy_from_slice(&kind.to_le_bytes());
    header[8..].copy_from_slice(&sector.to_le_bytes());
    d.mem.write_slice(&header, GuestAddress(at)).unwrap();
}

/// A backend that starts on a ring a killed backend left behind (the frontend resumes from the
/// used index): it must announce the completions the dead one put in the used ring (the driver
/// may be waiting for their interrupt), and serve a request the dead one had taken but not
/// completed without a kick (the driver will not kick again for it).
#[test]
fn a_restarted_backend_announces_old_completions_and_serves_taken_requests() {
    let mut file = image();
    let served = Served::start(device(&file, false, None), 2);

    // Everything was completed, nothing announced.
    let completed = |ring: &mut Ring| {
        header(ring, HEADER, VIRTIO_BLK_T_FLUSH, 0);
        let head = ring.add(&[(HEADER, 16, false), (STATUS, 1, true)]);
        ring.want_interrupt();
        ring.complete(head, 1);
        1
    };
    let start = Start {
        prepare: Some(&completed),
        ..Start::default()
    };
    let d = Driver::connect_with(&served.socket, 1, u64::MAX, start);
    assert!(
        poll_in(d.rings[0].call.as_raw_fd(), 5000),
        "no interrupt for the completion the dead backend left"
    );
    assert_eq!(d.rings[0].used_idx(), 1);
    drop(d);

    // One completed, then a write of sector 5 taken but not completed.
    let taken = |ring: &mut Ring| {
        header(ring, HEADER, VIRTIO_BLK_T_FLUSH, 0);
        let head = ring.add(&[(HEADER, 16, false), (STATUS, 1, true)]);
        ring.complete(head, 1);
        header(ring, HEADER + 0x100, VIRTIO_BLK_T_OUT, 5);
        ring.mem
            .write_slice(&[0x77; 512], GuestAddress(BUF))
            .unwrap();
        ring.mem
            .write_obj(0xffu8, GuestAddress(STATUS + 1))
            .unwrap();
        ring.add(&[
            (HEADER + 0x100, 16, false),
            (BUF, 512, false),
            (STATUS + 1, 1, true),
        ]);
        ring.want_interrupt();
        1
    };
    let start = Start {
        prepare: Some(&taken),
        ..Start::default()
    };
    let d = Driver::connect_with(&served.socket, 1, u64::MAX, start);
    d.rings[0].wait_used(2);
    // The taken request: its chain starts at descriptor 2, after the completed one.
    assert_eq!(d.rings[0].used(1).0, 2);
    assert_eq!(d.mem.read_obj::<u8>(GuestAddress(STATUS + 1)).unwrap(), OK);
    let mut sector = [0u8; 512];
    file.seek(SeekFrom::Start(5 * 512)).unwrap();
    file.read_exact(&mut sector).unwrap();
    assert_eq!(sector, [0x77; 512]);
    drop(d);
    let (_, results) = served.finish();
    assert!(matches!(results[..], [Ok(()), Ok(())]), "{results:?}");
}

/// Makes one GET_ID request available without kicking; true if the backend completes it
/// within `wait`.
fn served_without_a_kick(d: &mut Driver, wait: Duration) -> bool {
    let mut header = [0u8; 16];
    header[..4].copy_from_slice(&VIRTIO_BLK_T_GET_ID.to_le_bytes());
    d.mem.write_slice(&header, GuestAddress(HEADER)).unwrap();
    let ring = &mut d.rings[0];
    let before = ring.used_idx();
    ring.want_interrupt();
    ring.add(&[(HEADER, 16, false), (BUF, 20, true), (STATUS, 1, true)]);
    let deadline = Instant::now() + wait;
    while Instant::now() < deadline {
        if ring.used_idx() != before {
            return true;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    false
}

#[test]
fn a_polling_backend_serves_the_next_request_without_a_kick() {
    let file = image();
    // Polls long enough that the test's request surely lands inside the window.
    let served = Served::start(
        device(&file, false, None).with_poll(Duration::from_millis(500)),
        1,
    );
    let mut d = Driver::connect(&served.socket, 1, u64::MAX);
    assert_eq!(request(&mut d, VIRTIO_BLK_T_IN, 0, Some((512, true))).0, OK);
    assert!(served_without_a_kick(&mut d, Duration::from_millis(400)));
    drop(d);
    served.finish();

    // Without polling, the same request waits for its kick.
    let served = Served::start(device(&file, false, None), 1);
    let mut d = Driver::connect(&served.socket, 1, u64::MAX);
    assert_eq!(request(&mut d, VIRTIO_BLK_T_IN, 0, Some((512, true))).0, OK);
    assert!(!served_without_a_kick(&mut d, Duration::from_millis(300)));
    let before = d.rings[0].used_idx();
    d.rings[0].kick();
    d.rings[0].wait_used(before.wrapping_add(1));
    drop(d);
    served.finish();
}
