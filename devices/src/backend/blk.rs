//! virtio-blk as a vhost-user backend: one queue served by the device model's
//! [`RequestHandler`], on the daemon's vring worker thread.
//!
//! System calls of the vring worker thread (for its seccomp filter), besides the daemon's own
//! (`epoll_wait`, `read` of the kick eventfd): `preadv`/`pwritev` between the disk and guest
//! memory, `fdatasync` (FLUSH, and every write when the driver did not negotiate FLUSH),
//! `fallocate` (DISCARD / WRITE_ZEROES on files), `ioctl(BLKDISCARD | BLKZEROOUT)` (on block
//! devices), `write` to the call eventfd, `write` to stderr for log lines, and `futex`,
//! `mmap`/`munmap`/`madvise`/`brk` from the allocator.

use std::fs::File;
use std::io;
use std::num::Wrapping;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::{VhostUserBackendMut, VringT};
use virtio_queue::QueueT;
use vm_memory::GuestAddressSpace;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{EventConsumer, EventNotifier};

use super::{
    config_slice, BackendError, BackendMemory, BackendVring, Device, Exclusive, ExitEvent,
    QueueWarnings, MAX_QUEUE_SIZE,
};
use crate::virtio::block::config::{self, VIRTIO_BLK_F_FLUSH};
use crate::virtio::block::{self, BlockCounters, Disk, RequestHandler, CONFIG_SPACE_SIZE};

const KIND: &str = "blk";
/// The request queue's index, and its event id in the daemon's epoll.
const REQUEST_QUEUE: u16 = 0;

/// What `mvmm backend blk` serves.
pub struct BlkConfig {
    /// The disk image (regular file or block device), opened read-write unless `read_only`.
    pub file: File,
    pub read_only: bool,
    /// The ID the guest sees (GET_ID), at most 20 bytes.
    pub serial: Option<String>,
    /// The caller opened `file` with O_DIRECT.
    pub direct: bool,
}

/// A disk, with what the driver sees of it; it outlives the connections.
pub struct BlkDevice {
    handler: Exclusive<RequestHandler>,
    counters: Arc<BlockCounters>,
    features: u64,
    config: [u8; CONFIG_SPACE_SIZE],
    /// How long the worker watches the ring for new requests before sleeping (0: not at all).
    poll: Duration,
}

impl BlkDevice {
    pub fn new(config: BlkConfig) -> Result<BlkDevice, BackendError> {
        let BlkConfig {
            file,
            read_only,
            serial,
            direct,
        } = config;
        let disk =
            Disk::new(file, !read_only, direct).map_err(|e| BackendError::Block(e.into()))?;
        let features = config::device_features(&disk, read_only)
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        // seg_max as for the in-VMM device's largest queue: whatever queue size the frontend
        // picks, chains stay within the backend's maximum.
        let config_space = config::config_space(&disk, read_only, block::MAX_QUEUE_SIZE);
        let name = match serial.as_deref() {
            Some(s) if !s.is_empty() => format!("vhost-user-blk {s}"),
            _ => "vhost-user-blk".to_string(),
        };
        let handler = RequestHandler::new(name, disk, read_only, serial.as_deref())?;
        Ok(BlkDevice {
            counters: handler.counters(),
            handler: Exclusive(handler),
            features,
            config: config_space,
            poll: Duration::ZERO,
        })
    }

    /// After serving the queue, keep watching it this long (with notifications off) before
    /// sleeping: a driver that submits its next request within that time neither kicks nor
    /// waits for a wake-up, which is what a queue-depth-1 workload pays most for. QEMU's
    /// iothreads poll the same way (adaptively, up to 32 µs by default).
    pub fn with_poll(mut self, poll: Duration) -> BlkDevice {
        self.poll = poll;
        self
    }

    /// Request statistics, across all connections.
    pub fn counters(&self) -> Arc<BlockCounters> {
        self.counters.clone()
    }

    /// The features offered to the frontend (virtio and vhost-user).
    pub fn features(&self) -> u64 {
        self.features
    }
}

impl Device for BlkDevice {
    type Backend = BlkBackend;
    const KIND: &'static str = KIND;

    fn into_backend(mut self, exit: ExitEvent) -> BlkBackend {
        // Until the driver negotiates FLUSH, every write is made stable before it completes.
        self.handler.get_mut().set_writethrough(true);
        BlkBackend {
            device: self,
            mem: BackendMemory::new(vm_memory::GuestMemoryMmap::new()),
            exit,
            warnings: QueueWarnings::default(),
        }
    }

    fn from_backend(backend: BlkBackend) -> (BlkDevice, ExitEvent) {
        (backend.device, backend.exit)
    }
}

/// One frontend's connection to a [`BlkDevice`].
pub struct BlkBackend {
    device: BlkDevice,
    mem: BackendMemory,
    exit: ExitEvent,
    warnings: QueueWarnings,
}

impl BlkBackend {
    /// Serves the request queue until it is empty: notifications off, a queue's worth of
    /// requests, notifications back on, again while requests arrived meanwhile.
    fn serve_queue(&mut self, vring: &BackendVring) {
        let mem = self.mem.memory();
        loop {
            // The vring lock is taken per round, so the protocol thread can stop the ring
            // between rounds.
            let mut state = vring.get_mut();
            if !state.is_enabled() || !state.get_queue().ready() {
                return;
            }
            let queue = state.get_queue_mut();
            if let Err(e) = queue.disable_notification(&*mem) {
                self.warnings
                    .warn(KIND, format_args!("cannot disable notifications: {e}"));
            }
            let notify = match self.device.handler.get_mut().process_queue(&*mem, queue) {
                Ok(notify) => notify,
                Err(e) => {
                    // Wait for the next kick (likely after a reset) rather than spin on it.
                    self.warnings
                        .warn(KIND, format_args!("the queue is unusable: {e}"));
                    if let Err(e) = queue.enable_notification(&*mem) {
                        self.warnings
                            .warn(KIND, format_args!("cannot enable notifications: {e}"));
                    }
                    let _ = state.signal_used_queue();
                    return;
                }
            };
            if notify {
                if let Err(e) = state.signal_used_queue() {
                    self.warnings
                        .warn(KIND, format_args!("cannot signal the used queue: {e}"));
                }
            }
            // Completions are out; the driver's next request may be on its way.
            if !self.device.poll.is_zero()
                && request_within(state.get_queue(), &*mem, self.device.poll)
            {
                continue;
            }
            match state.get_queue_mut().enable_notification(&*mem) {
                Ok(true) => continue,
                Ok(false) => return,
                Err(e) => {
                    self.warnings
                        .warn(KIND, format_args!("cannot enable notifications: {e}"));
                    return;
                }
            }
        }
    }
}

/// Watches the available ring for up to `poll`; true as soon as a new request is there.
fn request_within<Q: QueueT, M: vm_memory::GuestMemory>(
    queue: &Q,
    mem: &M,
    poll: Duration,
) -> bool {
    let start = Instant::now();
    loop {
        match queue.avail_idx(mem, Ordering::Acquire) {
            Ok(idx) if idx != Wrapping(queue.next_avail()) => return true,
            Ok(_) => {}
            Err(_) => return false,
        }
        if start.elapsed() >= poll {
            return false;
        }
        std::hint::spin_loop();
    }
}

impl VhostUserBackendMut for BlkBackend {
    type Bitmap = ();
    type Vring = BackendVring;

    fn num_queues(&self) -> usize {
        1
    }

    fn max_queue_size(&self) -> usize {
        usize::from(MAX_QUEUE_SIZE)
    }

    fn features(&self) -> u64 {
        self.device.features
    }

    fn acked_features(&mut self, features: u64) {
        self.device
            .handler
            .get_mut()
            .set_writethrough(features & VIRTIO_BLK_F_FLUSH == 0);
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
    }

    fn reset_device(&mut self) {
        self.device.handler.get_mut().set_writethrough(true);
    }

    fn set_event_idx(&mut self, _enabled: bool) {
        // The daemon sets it on the queue itself, which is all the request engine looks at.
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        config_slice(&self.device.config, offset, size)
    }

    fn update_memory(&mut self, mem: BackendMemory) -> io::Result<()> {
        self.mem = mem;
        Ok(())
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        self.exit.hand_out()
    }

    fn handle_event(
        &mut self,
        device_event: u16,
        _evset: EventSet,
        vrings: &[BackendVring],
        _thread_id: usize,
    ) -> io::Result<()> {
        match (device_event, vrings.first()) {
            (REQUEST_QUEUE, Some(vring)) => self.serve_queue(vring),
            _ => log::debug!("vhost-user-blk: ignoring event {device_event}"),
        }
        Ok(())
    }
}
