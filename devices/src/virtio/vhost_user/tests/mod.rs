mod backend;
mod util;
mod virtiofsd;

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost::vhost_user::VhostUserVirtioFeatures;
use virtio_bindings::virtio_blk;
use vm_memory::{GuestAddress, GuestMemoryMmap};

use super::{Error, VhostUserDevice, VhostUserKind};
use crate::virtio::{
    VirtioDevice, VirtioInterrupt, TYPE_BLOCK, TYPE_FS, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX,
};
use backend::{BackendConfig, BackendProcess};
use util::{shared_memory, wait_until, MockInterrupt, Ring, QSIZE, REGIONS, REGION_SIZE};

const PROTOCOL_BIT: u64 = VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
const SECOND: Duration = Duration::from_secs(1);
const LONG: Duration = Duration::from_secs(10);

fn fs(tag: &str) -> VhostUserKind {
    VhostUserKind::Fs { tag: tag.into() }
}

fn socket(dir: &tempfile::TempDir) -> PathBuf {
    dir.path().join("backend.sock")
}

fn new_fs(path: &Path) -> VhostUserDevice {
    VhostUserDevice::new(path.into(), fs("share"), 256, None, SECOND).unwrap()
}

/// Activates `device` with rings 0..n in fresh shared memory.
fn activate(
    device: &mut VhostUserDevice,
    n: u16,
) -> (GuestMemoryMmap, Arc<MockInterrupt>, Vec<Ring>) {
    let mem = shared_memory();
    let interrupt = MockInterrupt::new();
    let rings: Vec<Ring> = (0..n).map(|i| Ring::new(&mem, i)).collect();
    // The test driver does not maintain used_event: no EVENT_IDX.
    device.ack_features(device.features() & !VIRTIO_RING_F_EVENT_IDX);
    let irq: Arc<dyn VirtioInterrupt> = interrupt.clone();
    device
        .activate(
            mem.clone(),
            irq,
            rings.iter().map(Ring::activated).collect(),
        )
        .unwrap();
    (mem, interrupt, rings)
}

/// Sends one request on `ring` and waits for the backend's answer.
fn round_trip(ring: &mut Ring, interrupt: &MockInterrupt) -> Vec<u8> {
    let before = ring.used_idx();
    let reply = ring.push(b"request", 64);
    ring.kick();
    assert!(
        interrupt.wait_call(LONG),
        "the backend did not signal VRING_CALL"
    );
    assert_eq!(ring.used_idx(), before.wrapping_add(1));
    let (_, len) = ring.used_elem(before);
    ring.read(reply, len as usize)
}

#[test]
fn bad_parameters_are_rejected_before_connecting() {
    let path = PathBuf::from("/nonexistent/backend.sock");
    for (kind, size) in [
        (fs(""), 256),
        (fs(&"x".repeat(37)), 256),
        (fs("a\0b"), 256),
        (fs("ok"), 100),
        (fs("ok"), 2048),
        (fs("ok"), 0),
    ] {
        let err = VhostUserDevice::new(path.clone(), kind, size, None, SECOND).unwrap_err();
        assert!(
            matches!(err, Error::FsTag(_) | Error::QueueSize(_)),
            "{err}"
        );
    }
}

#[test]
fn socket_timeout_names_the_path() {
    let dir = tempfile::tempdir().unwrap();
    let path = socket(&dir);
    let started = Instant::now();
    let timeout = Duration::from_millis(200);
    let err = VhostUserDevice::new(path.clone(), fs("share"), 256, None, timeout).unwrap_err();
    let elapsed = started.elapsed();
    assert!(matches!(err, Error::SocketTimeout { .. }), "{err}");
    assert!(
        err.to_string().contains(&path.display().to_string()),
        "{err}"
    );
    assert!(
        elapsed >= timeout && elapsed < Duration::from_secs(2),
        "{elapsed:?}"
    );
}

#[test]
fn a_socket_that_appears_within_the_timeout_is_used() {
    let dir = tempfile::tempdir().unwrap();
    let path = socket(&dir);
    let late = path.clone();
    let starter = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(300));
        BackendProcess::spawn(&late, BackendConfig::fs())
    });
    let started = Instant::now();
    let device = VhostUserDevice::new(path, fs("share"), 256, None, Duration::from_secs(5));
    let elapsed = started.elapsed();
    let backend = starter.join().unwrap();
    let device = device.unwrap();
    assert!(elapsed >= Duration::from_millis(250), "{elapsed:?}");
    drop(device);
    backend.join();
}

#[test]
fn fs_handshake_activation_and_data_path() {
    let dir = tempfile::tempdir().unwrap();
    let path = socket(&dir);
    let backend = BackendProcess::spawn(&path, BackendConfig::fs());
    let started = Instant::now();
    let mut device = new_fs(&path);

    // Negotiation: the backend's features minus PROTOCOL_FEATURES, masked; the protocol
    // features both want.
    assert_eq!(device.device_type(), TYPE_FS);
    assert_eq!(device.features(), VIRTIO_F_VERSION_1);
    assert_eq!(
        device.protocol_features(),
        (VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS)
            .bits()
    );
    assert_eq!(device.queue_max_sizes(), vec![256, 256]);
    let mut config = [0xffu8; 40];
    device.read_config(0, &mut config);
    assert_eq!(&config[..5], b"share");
    assert!(config[5..36].iter().all(|&b| b == 0));
    assert_eq!(config[36..], 1u32.to_le_bytes());
    let mut past_end = [0xffu8; 8];
    device.read_config(40, &mut past_end);
    assert_eq!(past_end, [0; 8]);

    let (mem, interrupt, mut rings) = activate(&mut device, 2);
    eprintln!(
        "in-process backend: connect -> activated in {:?}",
        started.elapsed()
    );
    {
        let record = backend.record.lock().unwrap();
        assert_eq!(
            record.acked_features,
            vec![VIRTIO_F_VERSION_1 | PROTOCOL_BIT]
        );
        // The memory table is the memfd's regions, at their offsets, the same file.
        let memfd = mem_file_id(&mem);
        let regions: Vec<_> = record
            .regions
            .iter()
            .map(|r| (r.gpa, r.size, r.file_offset, r.file))
            .collect();
        let expected: Vec<_> = REGIONS
            .iter()
            .map(|&(gpa, offset)| (gpa, REGION_SIZE as u64, offset, memfd))
            .collect();
        assert_eq!(regions, expected);
    }

    // Each queue: VRING_NUM, VRING_ADDR (host addresses the backend translated back through
    // the table), VRING_BASE 0, KICK (a kick reaches it), CALL, ENABLE.
    for ring in &rings {
        ring.kick();
    }
    assert!(wait_until(LONG, || backend
        .record
        .lock()
        .unwrap()
        .events
        .len()
        >= 2));
    let mut events = backend.record.lock().unwrap().events.clone();
    events.sort_by_key(|e| e.queue);
    events.dedup_by_key(|e| e.queue);
    assert_eq!(events.len(), 2);
    for (event, ring) in events.iter().zip(&rings) {
        assert_eq!(event.queue, ring.index);
        assert_eq!(event.size, QSIZE);
        assert_eq!(event.addresses, ring.addresses());
        assert_eq!(event.next_avail, 0);
        assert!(event.enabled && event.has_call, "{event:?}");
    }

    // The data path: the request goes through shared memory and the eventfds only; the
    // device is locked away meanwhile, and never signals an interrupt itself.
    let device = Arc::new(Mutex::new(device));
    {
        let _locked = device.lock().unwrap();
        let reply = round_trip(&mut rings[1], &interrupt);
        assert_eq!(reply, b"fixed reply from the test backend");
        assert_eq!(backend.record.lock().unwrap().served, 1);
    }
    assert_eq!(interrupt.used_signals.load(Ordering::SeqCst), 0);

    // A driver reset stops the queues (GET_VRING_BASE); activating again works.
    let mut device = Arc::into_inner(device).unwrap().into_inner().unwrap();
    assert!(device.reset());
    let mut stopped = backend.record.lock().unwrap().stopped.clone();
    stopped.sort();
    assert_eq!(stopped, vec![0, 1]);
    let (_mem, interrupt, mut rings) = activate(&mut device, 2);
    assert_eq!(round_trip(&mut rings[1], &interrupt).len(), 33);
    assert!(!device.needs_reset());

    drop(device);
    backend.join();
}

fn mem_file_id(mem: &GuestMemoryMmap) -> (u64, u64) {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::MetadataExt;
    use vm_memory::GuestMemoryBackend;
    let region = mem.iter().next().unwrap();
    let fd = region.file_offset().unwrap().file().as_raw_fd();
    let meta = std::fs::metadata(format!("/proc/self/fd/{fd}")).unwrap();
    (meta.dev(), meta.ino())
}

#[test]
fn fs_config_comes_from_a_backend_that_has_one() {
    let dir = tempfile::tempdir().unwrap();
    let path = socket(&dir);
    let mut cfg = BackendConfig::fs();
    cfg.protocol |= VhostUserProtocolFeatures::CONFIG;
    cfg.config = b"theirs".to_vec();
    cfg.config.resize(36, 0);
    cfg.config.extend_from_slice(&7u32.to_le_bytes());
    let backend = BackendProcess::spawn(&path, cfg.clone());
    let device = new_fs(&path);
    let mut config = [0u8; 40];
    device.read_config(0, &mut config);
    assert_eq!(&config[..7], b"theirs\0");
    // Never more request queues than the device has.
    assert_eq!(config[36..], 1u32.to_le_bytes());
    drop(device);
    backend.join();

    // A backend that fails GET_CONFIG: the local configuration.
    cfg.config.clear();
    let backend = BackendProcess::spawn(&path, cfg);
    let device = new_fs(&path);
    device.read_config(0, &mut config);
    assert_eq!(&config[..6], b"share\0");
    drop(device);
    backend.join();
}

fn blk_backend() -> BackendConfig {
    let bit = |b: u32| 1u64 << b;
    let mut config = vec![0u8; 60];
    config[..8].copy_from_slice(&2048u64.to_le_bytes());
    config[20..24].copy_from_slice(&4096u32.to_le_bytes());
    config[34..36].copy_from_slice(&4u16.to_le_bytes());
    BackendConfig {
        num_queues: 4,
        features: VIRTIO_F_VERSION_1
            | PROTOCOL_BIT
            | bit(virtio_blk::VIRTIO_BLK_F_FLUSH)
            | bit(virtio_blk::VIRTIO_BLK_F_BLK_SIZE)
            | bit(virtio_blk::VIRTIO_BLK_F_MQ)
            | bit(virtio_blk::VIRTIO_BLK_F_CONFIG_WCE)
            | bit(virtio_blk::VIRTIO_BLK_F_ZONED),
        protocol: BackendConfig::fs().protocol | VhostUserProtocolFeatures::CONFIG,
        config,
        ..BackendConfig::fs()
    }
}

#[test]
fn blk_takes_its_config_and_queues_from_the_backend() {
    let dir = tempfile::tempdir().unwrap();
    let path = socket(&dir);
    let bit = |b: u32| 1u64 << b;

    let backend = BackendProcess::spawn(&path, blk_backend());
    let new = |n| VhostUserDevice::new(path.clone(), VhostUserKind::Block, 128, n, SECOND);
    let device = new(Some(2)).unwrap();
    assert_eq!(device.device_type(), TYPE_BLOCK);
    assert_eq!(device.queue_max_sizes(), vec![128, 128]);
    assert_eq!(
        device.features(),
        VIRTIO_F_VERSION_1
            | bit(virtio_blk::VIRTIO_BLK_F_FLUSH)
            | bit(virtio_blk::VIRTIO_BLK_F_BLK_SIZE)
            | bit(virtio_blk::VIRTIO_BLK_F_MQ)
    );
    let mut config = [0u8; 60];
    device.read_config(0, &mut config);
    assert_eq!(config[..8], 2048u64.to_le_bytes());
    assert_eq!(config[20..24], 4096u32.to_le_bytes());
    assert_eq!(
        config[34..36],
        2u16.to_le_bytes(),
        "num_queues is the device's"
    );
    drop(device);
    backend.join();

    // The default queue count is the backend's.
    let backend = BackendProcess::spawn(&path, blk_backend());
    let device = new(None).unwrap();
    assert_eq!(device.queue_max_sizes().len(), 4);
    drop(device);
    backend.join();

    // More queues than the backend serves.
    let backend = BackendProcess::spawn(&path, blk_backend());
    let err = new(Some(8)).err().unwrap();
    assert!(
        matches!(
            err,
            Error::BackendQueues {
                wanted: 8,
                max: 4,
                ..
            }
        ),
        "{err}"
    );
    backend.join();

    // No configuration space from the backend.
    let mut cfg = blk_backend();
    cfg.protocol.remove(VhostUserProtocolFeatures::CONFIG);
    let backend = BackendProcess::spawn(&path, cfg);
    let err = new(None).err().unwrap();
    assert!(matches!(err, Error::NoBackendConfig { .. }), "{err}");
    assert!(err.to_string().contains(&path.display().to_string()));
    backend.join();
}

#[test]
fn activation_needs_shared_memory() {
    let dir = tempfile::tempdir().unwrap();
    let path = socket(&dir);
    let backend = BackendProcess::spawn(&path, BackendConfig::fs());
    let mut device = new_fs(&path);
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), REGION_SIZE)]).unwrap();
    let rings: Vec<Ring> = (0..2).map(|i| Ring::new(&mem, i)).collect();
    let err = device
        .activate(
            mem,
            MockInterrupt::new(),
            rings.iter().map(Ring::activated).collect(),
        )
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("vhost-user needs shared guest memory"),
        "{err}"
    );
    drop(device);
    backend.join();
}

#[test]
fn a_backend_rejecting_a_message_fails_activation() {
    let dir = tempfile::tempdir().unwrap();
    let path = socket(&dir);
    let mut cfg = BackendConfig::fs();
    cfg.max_queue_size = QSIZE as usize / 2;
    let backend = BackendProcess::spawn(&path, cfg);
    let mut device = new_fs(&path);
    let mem = shared_memory();
    let rings: Vec<Ring> = (0..2).map(|i| Ring::new(&mem, i)).collect();
    let err = device
        .activate(
            mem,
            MockInterrupt::new(),
            rings.iter().map(Ring::activated).collect(),
        )
        .unwrap_err();
    assert!(err.to_string().contains("SET_VRING_NUM"), "{err}");
    drop(device);
    backend.join();
}

#[test]
fn a_dead_backend_is_replaced_and_in_flight_requests_replayed() {
    let dir = tempfile::tempdir().unwrap();
    let path = socket(&dir);
    let first = BackendProcess::spawn(&path, BackendConfig::fs());
    let mut device = new_fs(&path);
    let (_mem, interrupt, mut rings) = activate(&mut device, 2);
    round_trip(&mut rings[1], &interrupt);

    // The backend takes a request, then dies before completing it.
    first.swallow.store(true, Ordering::SeqCst);
    let reply = rings[1].push(b"in flight", 64);
    rings[1].kick();
    assert!(wait_until(LONG, || first.record.lock().unwrap().swallowed == 1));
    first.kill();
    assert!(wait_until(LONG, || device.needs_reset()));
    assert!(!device.backend_connected());
    assert_eq!(interrupt.config_changes.load(Ordering::SeqCst), 1);
    assert_eq!(rings[1].used_idx(), 1);

    // A new backend on the same path gets the whole setup again, the request queue based at
    // the used index, and serves the request the first one dropped.
    let second = BackendProcess::spawn(&path, BackendConfig::fs());
    assert!(
        interrupt.wait_call(LONG),
        "the replayed request was not answered"
    );
    assert!(wait_until(LONG, || device.backend_connected()));
    assert_eq!(rings[1].used_idx(), 2);
    let (_, len) = rings[1].used_elem(1);
    assert_eq!(
        rings[1].read(reply, len as usize),
        b"fixed reply from the test backend"
    );
    {
        let record = second.record.lock().unwrap();
        assert_eq!(
            record.acked_features,
            vec![VIRTIO_F_VERSION_1 | PROTOCOL_BIT]
        );
        assert_eq!(record.regions.len(), REGIONS.len());
        let request_queue = record.events.iter().find(|e| e.queue == 1).unwrap();
        assert_eq!(request_queue.next_avail, 1, "vring base = used index");
        assert_eq!(request_queue.addresses, rings[1].addresses());
        assert!(request_queue.enabled && request_queue.has_call);
    }
    // Still usable, and a driver reset clears the flag.
    round_trip(&mut rings[1], &interrupt);
    assert!(device.needs_reset());
    assert!(device.reset());
    assert!(!device.needs_reset());
    drop(device);
    second.join();
}

#[test]
fn activation_without_a_backend_waits_for_one() {
    let dir = tempfile::tempdir().unwrap();
    let path = socket(&dir);
    let first = BackendProcess::spawn(&path, BackendConfig::fs());
    let mut device = new_fs(&path);
    first.kill();
    let (_mem, interrupt, mut rings) = activate(&mut device, 2);
    assert!(wait_until(SECOND, || !device.backend_connected()));
    let reply = rings[1].push(b"early", 64);
    rings[1].kick();

    let second = BackendProcess::spawn(&path, BackendConfig::fs());
    assert!(
        interrupt.wait_call(LONG),
        "the early request was not answered"
    );
    assert_eq!(rings[1].used_idx(), 1);
    assert_eq!(&rings[1].read(reply, 5), b"fixed");
    // Not a death while running: no reset needed.
    assert!(!device.needs_reset());
    drop(device);
    second.join();
}
