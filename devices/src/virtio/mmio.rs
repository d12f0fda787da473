//! The virtio-mmio transport (virtio 1.2, 4.2), modern register layout only (version 2).
//!
//! One 4 KiB window per device. Queue notifications are ioeventfds (the VMM registers
//! [`MmioTransport::queue_kicks`] at `base + NOTIFY_OFFSET`, matched on the queue index), and
//! interrupts an irqfd, so the data path never exits to this code: it handles only the
//! driver's setup and teardown.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use super::{ActivatedQueue, VirtioDevice, VirtioInterrupt};
use crate::bus::BusDevice;

pub const WINDOW_SIZE: u64 = 0x1000;
/// Offset of QueueNotify, where the VMM registers the queues' ioeventfds.
pub const NOTIFY_OFFSET: u64 = 0x50;

const MAGIC_VALUE: u32 = 0x7472_6976; // "virt"
const VERSION_MODERN: u32 = 2;
const VENDOR_ID: u32 = 0x4d56_4d4d; // "MVMM"
const CONFIG_SPACE_OFFSET: u64 = 0x100;

mod reg {
    pub const MAGIC: u64 = 0x000;
    pub const VERSION: u64 = 0x004;
    pub const DEVICE_ID: u64 = 0x008;
    pub const VENDOR_ID: u64 = 0x00c;
    pub const DEVICE_FEATURES: u64 = 0x010;
    pub const DEVICE_FEATURES_SEL: u64 = 0x014;
    pub const DRIVER_FEATURES: u64 = 0x020;
    pub const DRIVER_FEATURES_SEL: u64 = 0x024;
    pub const QUEUE_SEL: u64 = 0x030;
    pub const QUEUE_NUM_MAX: u64 = 0x034;
    pub const QUEUE_NUM: u64 = 0x038;
    pub const QUEUE_READY: u64 = 0x044;
    pub const QUEUE_NOTIFY: u64 = 0x050;
    pub const INTERRUPT_STATUS: u64 = 0x060;
    pub const INTERRUPT_ACK: u64 = 0x064;
    pub const STATUS: u64 = 0x070;
    pub const QUEUE_DESC_LOW: u64 = 0x080;
    pub const QUEUE_DESC_HIGH: u64 = 0x084;
    pub const QUEUE_DRIVER_LOW: u64 = 0x090;
    pub const QUEUE_DRIVER_HIGH: u64 = 0x094;
    pub const QUEUE_DEVICE_LOW: u64 = 0x0a0;
    pub const QUEUE_DEVICE_HIGH: u64 = 0x0a4;
    pub const SHM_LEN_LOW: u64 = 0x0b0;
    pub const SHM_LEN_HIGH: u64 = 0x0b4;
    pub const CONFIG_GENERATION: u64 = 0x0fc;
}

/// Device status bits (virtio 1.2, 2.1).
pub mod status {
    pub const ACKNOWLEDGE: u32 = 1;
    pub const DRIVER: u32 = 2;
    pub const DRIVER_OK: u32 = 4;
    pub const FEATURES_OK: u32 = 8;
    pub const DEVICE_NEEDS_RESET: u32 = 0x40;
    pub const FAILED: u32 = 0x80;
}

/// InterruptStatus bits.
pub const INT_USED_RING: u32 = 1;
pub const INT_CONFIG_CHANGE: u32 = 2;

/// Raises the device's interrupt: sets InterruptStatus, then writes the irqfd.
pub struct MmioInterrupt {
    status: AtomicU32,
    irqfd: EventFd,
    /// A backend signals the irqfd itself (see `VirtioInterrupt::direct_notifier`).
    direct: AtomicBool,
    /// The device asked for a reset (`VirtioInterrupt::signal_needs_reset`).
    needs_reset: AtomicBool,
    config_generation: AtomicU32,
}

impl MmioInterrupt {
    fn status(&self) -> u32 {
        let direct = if self.direct.load(Ordering::SeqCst) {
            INT_USED_RING
        } else {
            0
        };
        self.status.load(Ordering::SeqCst) | direct
    }

    fn raise(&self, bit: u32) -> std::io::Result<()> {
        self.status.fetch_or(bit, Ordering::SeqCst);
        self.irqfd.write(1)
    }
}

impl VirtioInterrupt for MmioInterrupt {
    fn signal_used_queue(&self, _queue_index: u16) -> std::io::Result<()> {
        self.raise(INT_USED_RING)
    }

    fn signal_config_change(&self) -> std::io::Result<()> {
        self.raise(INT_CONFIG_CHANGE)
    }

    fn signal_needs_reset(&self) -> std::io::Result<()> {
        self.needs_reset.store(true, Ordering::SeqCst);
        self.config_generation.fetch_add(1, Ordering::SeqCst);
        self.raise(INT_CONFIG_CHANGE)
    }

    fn direct_notifier(&self) -> Option<EventFd> {
        let notifier = self.irqfd.try_clone().ok()?;
        self.direct.store(true, Ordering::SeqCst);
        Some(notifier)
    }
}

/// The driver-visible state of one device behind a virtio-mmio window.
pub struct MmioTransport {
    device: Arc<Mutex<dyn VirtioDevice>>,
    mem: GuestMemoryMmap,
    interrupt: Arc<MmioInterrupt>,
    queues: Vec<Queue>,
    /// QueueNum as the driver wrote it: virtio-queue ignores sizes it considers invalid, and a
    /// driver and device that disagree on a ring's size must not run.
    requested_sizes: Vec<u16>,
    kicks: Vec<EventFd>,
    status: u32,
    activated: bool,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    queue_sel: u32,
}

fn lock(device: &Mutex<dyn VirtioDevice>) -> std::sync::MutexGuard<'_, dyn VirtioDevice + 'static> {
    device.lock().unwrap_or_else(|p| p.into_inner())
}

impl MmioTransport {
    /// `irqfd` must be registered with KVM for the window's interrupt line.
    pub fn new(
        device: Arc<Mutex<dyn VirtioDevice>>,
        mem: GuestMemoryMmap,
        irqfd: EventFd,
    ) -> std::io::Result<Self> {
        let max_sizes = lock(&device).queue_max_sizes();
        let mut queues = Vec::with_capacity(max_sizes.len());
        let mut kicks = Vec::with_capacity(max_sizes.len());
        for max in max_sizes {
            // A max size that virtio-queue rejects (0, not a power of two) is a device bug.
            let queue = Queue::new(max).map_err(|e| {
                std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("{e:?}"))
            })?;
            queues.push(queue);
            kicks.push(EventFd::new(libc::EFD_NONBLOCK)?);
        }
        Ok(Self {
            device,
            mem,
            interrupt: Arc::new(MmioInterrupt {
                status: AtomicU32::new(0),
                irqfd,
                direct: AtomicBool::new(false),
                needs_reset: AtomicBool::new(false),
                config_generation: AtomicU32::new(0),
            }),
            requested_sizes: queues.iter().map(|q| q.max_size()).collect(),
            queues,
            kicks,
            status: 0,
            activated: false,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            queue_sel: 0,
        })
    }

    /// The queues' notification eventfds, by queue index, for ioeventfd registration.
    pub fn queue_kicks(&self) -> &[EventFd] {
        &self.kicks
    }

    pub fn device(&self) -> &Arc<Mutex<dyn VirtioDevice>> {
        &self.device
    }

    fn selected_queue(&mut self) -> Option<&mut Queue> {
        // Queue registers are read-only once the device runs.
        if self.status & status::DRIVER_OK != 0 {
            return None;
        }
        self.queues.get_mut(self.queue_sel as usize)
    }

    fn device_features_word(&self) -> u32 {
        let features = lock(&self.device).features();
        match self.device_features_sel {
            0 => features as u32,
            1 => (features >> 32) as u32,
            _ => 0,
        }
    }

    fn read_register(&self, offset: u64) -> u32 {
        match offset {
            reg::MAGIC => MAGIC_VALUE,
            reg::VERSION => VERSION_MODERN,
            reg::DEVICE_ID => lock(&self.device).device_type(),
            reg::VENDOR_ID => VENDOR_ID,
            reg::DEVICE_FEATURES => self.device_features_word(),
            reg::QUEUE_NUM_MAX => self
                .queues
                .get(self.queue_sel as usize)
                .map_or(0, |q| u32::from(q.max_size())),
            reg::QUEUE_READY => self
                .queues
                .get(self.queue_sel as usize)
                .map_or(0, |q| u32::from(q.ready())),
            reg::INTERRUPT_STATUS => self.interrupt.status(),
            reg::STATUS => {
                let needs_reset = if self.interrupt.needs_reset.load(Ordering::SeqCst) {
                    status::DEVICE_NEEDS_RESET
                } else {
                    0
                };
                self.status | needs_reset
            }
            // No shared memory regions: length all ones means "does not exist".
            reg::SHM_LEN_LOW | reg::SHM_LEN_HIGH => u32::MAX,
            reg::CONFIG_GENERATION => self.interrupt.config_generation.load(Ordering::SeqCst),
            _ => 0,
        }
    }

    fn write_register(&mut self, offset: u64, value: u32) {
        let set_low = |old: u64| (old & !0xffff_ffff) | u64::from(value);
        let set_high = |old: u64| (old & 0xffff_ffff) | (u64::from(value) << 32);
        match offset {
            reg::DEVICE_FEATURES_SEL => self.device_features_sel = value,
            reg::DRIVER_FEATURES_SEL => self.driver_features_sel = value,
            reg::DRIVER_FEATURES if self.status & status::FEATURES_OK == 0 => {
                match self.driver_features_sel {
                    0 => self.driver_features = set_low(self.driver_features),
                    1 => self.driver_features = set_high(self.driver_features),
                    _ => {}
                }
            }
            reg::QUEUE_SEL => self.queue_sel = value,
            reg::QUEUE_NUM => {
                let index = self.queue_sel as usize;
                let size = value.try_into().unwrap_or(0);
                if let Some(q) = self.selected_queue() {
                    q.set_size(size);
                    self.requested_sizes[index] = size;
                }
            }
            reg::QUEUE_READY => {
                if let Some(q) = self.selected_queue() {
                    q.set_ready(value == 1);
                }
            }
            reg::QUEUE_DESC_LOW | reg::QUEUE_DESC_HIGH => {
                let (low, high) = split(offset == reg::QUEUE_DESC_LOW, value);
                if let Some(q) = self.selected_queue() {
                    q.set_desc_table_address(low, high);
                }
            }
            reg::QUEUE_DRIVER_LOW | reg::QUEUE_DRIVER_HIGH => {
                let (low, high) = split(offset == reg::QUEUE_DRIVER_LOW, value);
                if let Some(q) = self.selected_queue() {
                    q.set_avail_ring_address(low, high);
                }
            }
            reg::QUEUE_DEVICE_LOW | reg::QUEUE_DEVICE_HIGH => {
                let (low, high) = split(offset == reg::QUEUE_DEVICE_LOW, value);
                if let Some(q) = self.selected_queue() {
                    q.set_used_ring_address(low, high);
                }
            }
            // Normally an ioeventfd catches these; without one (or for an unregistered index)
            // forward the kick by hand.
            reg::QUEUE_NOTIFY => {
                if let Some(kick) = self.kicks.get(value as usize) {
                    let _ = kick.write(1);
                }
            }
            reg::INTERRUPT_ACK => {
                self.interrupt.status.fetch_and(!value, Ordering::SeqCst);
            }
            reg::STATUS => self.write_status(value),
            _ => log::debug!("virtio-mmio: ignoring write of {value:#x} to {offset:#x}"),
        }
    }

    fn write_status(&mut self, value: u32) {
        // DEVICE_NEEDS_RESET is the device's to set; a driver echoing it back changes nothing.
        let value = value & !status::DEVICE_NEEDS_RESET;
        if value == 0 {
            self.reset();
            return;
        }
        let newly_set = value & !self.status;
        // The driver may only add bits (virtio 1.2, 2.1.1), FAILED aside.
        if self.status & !value != 0 {
            log::warn!(
                "virtio-mmio: driver cleared status bits ({:#x} -> {value:#x}); ignored",
                self.status
            );
            return;
        }
        if newly_set & status::FEATURES_OK != 0 && !self.accept_features() {
            self.status = value & !status::FEATURES_OK;
            return;
        }
        self.status = value;
        if newly_set & status::DRIVER_OK != 0 && self.status & status::FEATURES_OK != 0 {
            self.activate();
        }
    }

    /// FEATURES_OK sticks only if the driver accepted a subset of what we offer, incl. VERSION_1.
    fn accept_features(&mut self) -> bool {
        let offered = lock(&self.device).features();
        let acked = self.driver_features;
        if acked & !offered != 0 || acked & super::VIRTIO_F_VERSION_1 == 0 {
            log::warn!(
                "virtio-mmio: driver features {acked:#x} are not a subset of {offered:#x} with VERSION_1"
            );
            return false;
        }
        lock(&self.device).ack_features(acked);
        let event_idx = acked & super::VIRTIO_RING_F_EVENT_IDX != 0;
        for q in &mut self.queues {
            q.set_event_idx(event_idx);
        }
        true
    }

    fn activate(&mut self) {
        let mut activated = Vec::new();
        for (index, (queue, kick)) in self.queues.iter().zip(&self.kicks).enumerate() {
            if !queue.ready() {
                continue;
            }
            if !queue.is_valid(&self.mem) || queue.size() != self.requested_sizes[index] {
                log::warn!(
                    "virtio-mmio: queue {index} is set up outside guest memory or with a bad size"
                );
                self.needs_reset();
                return;
            }
            let kick = match kick.try_clone() {
                Ok(kick) => kick,
                Err(e) => {
                    log::error!("virtio-mmio: cannot clone a queue eventfd: {e}");
                    self.needs_reset();
                    return;
                }
            };
            // The device gets its own copy; ours keeps answering register reads.
            let Ok(device_queue) = Queue::try_from(queue.state()) else {
                self.needs_reset();
                return;
            };
            activated.push(ActivatedQueue {
                index: index as u16,
                queue: device_queue,
                kick,
            });
        }
        let interrupt: Arc<dyn VirtioInterrupt> = self.interrupt.clone();
        let result = lock(&self.device).activate(self.mem.clone(), interrupt, activated);
        match result {
            Ok(()) => self.activated = true,
            Err(e) => {
                log::error!("virtio-mmio: {e}");
                self.needs_reset();
            }
        }
    }

    /// Tells the driver the device is broken until it resets it.
    fn needs_reset(&mut self) {
        if let Err(e) = self.interrupt.signal_needs_reset() {
            log::error!("virtio-mmio: cannot raise the config-change interrupt: {e}");
        }
    }

    fn reset(&mut self) {
        if self.activated && !lock(&self.device).reset() {
            // The device keeps running; the driver has to try again.
            self.needs_reset();
            return;
        }
        self.activated = false;
        self.status = 0;
        self.driver_features = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.queue_sel = 0;
        self.interrupt.status.store(0, Ordering::SeqCst);
        self.interrupt.direct.store(false, Ordering::SeqCst);
        self.interrupt.needs_reset.store(false, Ordering::SeqCst);
        for (q, size) in self.queues.iter_mut().zip(&mut self.requested_sizes) {
            q.reset();
            *size = q.max_size();
        }
    }
}

/// Which half of a 64-bit queue address a register write sets.
fn split(low: bool, value: u32) -> (Option<u32>, Option<u32>) {
    if low {
        (Some(value), None)
    } else {
        (None, Some(value))
    }
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= CONFIG_SPACE_OFFSET {
            lock(&self.device).read_config(offset - CONFIG_SPACE_OFFSET, data);
            return;
        }
        // Registers are 32-bit; other widths read as zero (virtio 1.2, 4.2.2.2).
        let value = if data.len() == 4 && offset % 4 == 0 {
            self.read_register(offset)
        } else {
            0
        };
        data.fill(0);
        let n = data.len().min(4);
        data[..n].copy_from_slice(&value.to_le_bytes()[..n]);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= CONFIG_SPACE_OFFSET {
            lock(&self.device).write_config(offset - CONFIG_SPACE_OFFSET, data);
            return;
        }
        match <[u8; 4]>::try_from(data) {
            Ok(bytes) if offset % 4 == 0 => self.write_register(offset, u32::from_le_bytes(bytes)),
            _ => log::debug!(
                "virtio-mmio: ignoring {}-byte write at {offset:#x}",
                data.len()
            ),
        }
    }
}

#[cfg(test)]
mod tests;
