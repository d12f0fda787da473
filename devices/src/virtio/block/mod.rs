//! virtio-blk (virtio 1.2, 5.2): a raw disk image or host block device for the guest.
//!
//! Layout:
//! - [`disk`]: the backing file, its size and capabilities, positional vectored I/O;
//! - [`request`]: the transport-independent request engine ([`RequestHandler`]), which a
//!   vhost-user backend reuses as is;
//! - [`config`]: feature bits and configuration space;
//! - `worker`: the device's I/O thread.
//!
//! I/O model: each disk gets ONE worker thread, started at activation, that waits on the
//! queue's kick eventfd and performs synchronous `preadv`/`pwritev`/`fdatasync` on the file,
//! straight into and out of guest memory. A thread per disk keeps slow or blocked disk I/O away
//! from the VMM's event loop, the vCPUs and the other devices; it needs no io_uring (often
//! disabled by sandboxes and seccomp policies) and no AIO completion plumbing; and it scales
//! with the number of disks, while the guest keeps its own request queue deep. Requests on one
//! disk are handled one after the other, which the page cache (or the device, with O_DIRECT)
//! makes fast enough for a microVM's root and data disks.

pub mod config;
pub mod disk;
mod ratelimit;
pub mod request;
mod worker;

#[cfg(test)]
mod tests;

use std::fs::File;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use virtio_queue::QueueT;
use vm_memory::GuestMemoryMmap;

pub use config::CONFIG_SPACE_SIZE;
pub use disk::{Disk, DiskError};
pub use request::{RequestHandler, VIRTIO_BLK_ID_BYTES};

use super::{
    ActivateError, ActivatedQueue, VirtioDevice, VirtioInterrupt, TYPE_BLOCK,
    VIRTIO_RING_F_EVENT_IDX,
};
use config::VIRTIO_BLK_F_FLUSH;
use worker::{SpawnError, Worker};

/// Largest queue the device offers; `seg_max` is derived from it.
pub const MAX_QUEUE_SIZE: u16 = 256;
const MIN_QUEUE_SIZE: u16 = 4;

/// What the VMM configures for one disk.
pub struct BlockConfig {
    /// The disk image (regular file or block device), opened read-write unless `read_only`.
    pub file: File,
    pub read_only: bool,
    /// The ID the guest sees (GET_ID), at most 20 bytes.
    pub serial: Option<String>,
    /// The caller opened `file` with O_DIRECT.
    pub direct: bool,
    /// Maximum queue size: a power of two from 4 to 256.
    pub queue_size: u16,
}

#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    #[error("disk image: {0}")]
    Disk(#[from] DiskError),
    #[error("the disk serial is {0} bytes; the guest reads at most 20, use a shorter one")]
    SerialTooLong(usize),
    #[error("queue size {0} is invalid; use a power of two from 4 to 256")]
    QueueSize(u16),
    #[error("the virtio queue is unusable: {0}")]
    Queue(virtio_queue::Error),
}

/// Statistics for a status API. Errors count every request that did not complete with OK.
#[derive(Debug, Default)]
pub struct BlockCounters {
    pub reads: AtomicU64,
    pub writes: AtomicU64,
    pub flushes: AtomicU64,
    pub read_bytes: AtomicU64,
    pub write_bytes: AtomicU64,
    pub errors: AtomicU64,
}

/// Numbers disks without a serial, for their thread names.
static NEXT_INDEX: AtomicUsize = AtomicUsize::new(0);

/// A virtio-blk device.
pub struct Block {
    name: String,
    queue_size: u16,
    features: u64,
    acked_features: u64,
    config_space: [u8; CONFIG_SPACE_SIZE],
    counters: Arc<BlockCounters>,
    /// The engine, here while the device is inactive and on the worker thread while it runs.
    handler: Option<RequestHandler>,
    worker: Option<Worker>,
}

impl Block {
    pub fn new(config: BlockConfig) -> Result<Block, BlockError> {
        let BlockConfig {
            file,
            read_only,
            serial,
            direct,
            queue_size,
        } = config;
        if !queue_size.is_power_of_two() || !(MIN_QUEUE_SIZE..=MAX_QUEUE_SIZE).contains(&queue_size)
        {
            return Err(BlockError::QueueSize(queue_size));
        }
        let name = thread_name(serial.as_deref());
        let disk = Disk::new(file, !read_only, direct)?;
        let features = config::device_features(&disk, read_only);
        let config_space = config::config_space(&disk, read_only, queue_size);
        let handler = RequestHandler::new(name.clone(), disk, read_only, serial.as_deref())?;
        Ok(Block {
            name,
            queue_size,
            features,
            acked_features: 0,
            config_space,
            counters: handler.counters(),
            handler: Some(handler),
            worker: None,
        })
    }

    pub fn counters(&self) -> Arc<BlockCounters> {
        self.counters.clone()
    }

    fn stop_worker(&mut self) -> bool {
        let Some(worker) = self.worker.take() else {
            return true;
        };
        match worker.stop() {
            Some(handler) => {
                self.handler = Some(handler);
                true
            }
            None => {
                log::error!(
                    "{}: the I/O worker crashed; the disk is unusable",
                    self.name
                );
                false
            }
        }
    }
}

/// `blk-<serial>` (sanitised: thread names cannot hold NUL) or `blk-<n>`.
fn thread_name(serial: Option<&str>) -> String {
    let clean: String = serial
        .unwrap_or("")
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        .collect();
    if clean.is_empty() {
        format!("blk-{}", NEXT_INDEX.fetch_add(1, Ordering::Relaxed))
    } else {
        format!("blk-{clean}")
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        TYPE_BLOCK
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![self.queue_size]
    }

    fn features(&self) -> u64 {
        self.features
    }

    fn ack_features(&mut self, features: u64) {
        self.acked_features = features & self.features;
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let Some(start) = usize::try_from(offset)
            .ok()
            .filter(|&s| s < CONFIG_SPACE_SIZE)
        else {
            return;
        };
        let end = CONFIG_SPACE_SIZE.min(start.saturating_add(data.len()));
        data[..end - start].copy_from_slice(&self.config_space[start..end]);
    }

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        interrupt: Arc<dyn VirtioInterrupt>,
        mut queues: Vec<ActivatedQueue>,
    ) -> Result<(), ActivateError> {
        if self.worker.is_some() {
            return Err(ActivateError::Other(format!(
                "{} is already active; reset it first",
                self.name
            )));
        }
        if queues.len() != 1 {
            return Err(ActivateError::QueueCount {
                got: queues.len(),
                want: 1,
            });
        }
        let Some(ActivatedQueue {
            index,
            mut queue,
            kick,
        }) = queues.pop()
        else {
            return Err(ActivateError::QueueCount { got: 0, want: 1 });
        };
        if !queue.is_valid(&mem) {
            return Err(ActivateError::Other(format!(
                "{}: the queue is not ready or its rings are outside guest memory",
                self.name
            )));
        }
        let Some(mut handler) = self.handler.take() else {
            return Err(ActivateError::Other(format!(
                "{}: the disk was lost when the I/O worker crashed; restart the VM",
                self.name
            )));
        };
        queue.set_event_idx(self.acked_features & VIRTIO_RING_F_EVENT_IDX != 0);
        handler.set_writethrough(self.acked_features & VIRTIO_BLK_F_FLUSH == 0);
        match Worker::spawn(
            self.name.clone(),
            handler,
            mem,
            queue,
            index,
            kick,
            interrupt,
        ) {
            Ok(worker) => {
                self.worker = Some(worker);
                Ok(())
            }
            Err(SpawnError { error, handler }) => {
                self.handler = Some(*handler);
                Err(ActivateError::Worker(error))
            }
        }
    }

    fn reset(&mut self) -> bool {
        self.acked_features = 0;
        self.stop_worker()
    }
}

impl Drop for Block {
    fn drop(&mut self) {
        self.stop_worker();
    }
}
