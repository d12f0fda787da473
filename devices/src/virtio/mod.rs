//! virtio devices, independent of their transport.
//!
//! A device model implements [`VirtioDevice`]; the virtio-mmio transport (`mmio`) drives it for
//! an in-VMM device, and a vhost-user backend can drive the same request-handling code. Once
//! activated, a device serves its queues on its own worker thread, woken by the queues' kick
//! eventfds (ioeventfds registered by the transport), and raises interrupts through a
//! [`VirtioInterrupt`]: the guest's notifications and interrupts never pass through the VMM's
//! event loop.

pub mod block;
pub mod mmio;
pub mod net;
pub mod vhost_user;

use std::sync::Arc;

use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

/// Device IDs (virtio 1.2, 5).
pub const TYPE_NET: u32 = 1;
pub const TYPE_BLOCK: u32 = 2;
pub const TYPE_FS: u32 = 26;

/// Feature bits every device handles in the transport or the queue code.
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;
pub const VIRTIO_RING_F_INDIRECT_DESC: u64 = 1 << 28;
pub const VIRTIO_RING_F_EVENT_IDX: u64 = 1 << 29;

/// How a device tells the driver that something happened.
pub trait VirtioInterrupt: Send + Sync {
    /// Used buffers were added to queue `queue_index`.
    fn signal_used_queue(&self, queue_index: u16) -> std::io::Result<()>;
    /// The device's configuration space changed.
    fn signal_config_change(&self) -> std::io::Result<()>;
    /// The device cannot go on until the driver resets it (virtio 1.2, 2.1.2): the transport
    /// shows DEVICE_NEEDS_RESET in the status and raises a configuration-change interrupt.
    fn signal_needs_reset(&self) -> std::io::Result<()> {
        self.signal_config_change()
    }
    /// An eventfd that raises the device's interrupt when written, for an external backend
    /// (vhost-user's VRING_CALL) to interrupt the guest directly, with no VMM on the path.
    /// Once a device asked for it, the transport reports a used-buffer interrupt in every
    /// interrupt status read, since it never sees those interrupts itself.
    fn direct_notifier(&self) -> Option<EventFd> {
        None
    }
}

/// A queue the driver set up, handed to the device at activation.
pub struct ActivatedQueue {
    pub index: u16,
    pub queue: Queue,
    /// Signalled when the driver notifies this queue.
    pub kick: EventFd,
}

#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    #[error("the driver set up {got} queues, the device needs {want}")]
    QueueCount { got: usize, want: usize },
    #[error("cannot start the device worker: {0}")]
    Worker(std::io::Error),
    #[error("device activation failed: {0}")]
    Other(String),
}

/// A virtio device model.
pub trait VirtioDevice: Send {
    /// The virtio device ID (`TYPE_*`).
    fn device_type(&self) -> u32;
    /// Maximum size of each queue; the length is the number of queues.
    fn queue_max_sizes(&self) -> Vec<u16>;
    /// Feature bits the device offers (including the transport-level ones it supports).
    fn features(&self) -> u64;
    /// The features the driver accepted (a subset of `features()`), before activation.
    fn ack_features(&mut self, features: u64);
    /// Reads the device-specific configuration space. Out-of-range bytes read as zero.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes the device-specific configuration space (most devices ignore writes).
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
    /// Starts serving the queues. Called once the driver sets DRIVER_OK.
    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        interrupt: Arc<dyn VirtioInterrupt>,
        queues: Vec<ActivatedQueue>,
    ) -> Result<(), ActivateError>;
    /// Stops serving the queues (driver reset). Returns false if the device cannot be reset,
    /// in which case the transport marks it as needing a reset.
    fn reset(&mut self) -> bool;
}
