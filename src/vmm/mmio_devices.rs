//! Places virtio devices on the MMIO bus: one 4 KiB window and one IRQ each, in config order,
//! with their queue ioeventfds and interrupt irqfd registered with KVM.

use std::sync::{Arc, Mutex};

use devices::virtio::mmio::{MmioTransport, NOTIFY_OFFSET, WINDOW_SIZE};
use devices::virtio::VirtioDevice;
use devices::Bus;
use kvm_ioctls::IoEventAddress;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use super::vm::Vm;
use crate::arch::acpi::MmioDeviceInfo;
use crate::arch::layout;

#[derive(Debug, thiserror::Error)]
pub enum MmioDevicesError {
    #[error("too many virtio devices: at most {} fit the interrupt lines", layout::VIRTIO_IRQ_LAST - layout::VIRTIO_IRQ_FIRST + 1)]
    TooMany,
    #[error("cannot create the virtio-mmio transport: {0}")]
    Transport(std::io::Error),
    #[error("cannot create an eventfd: {0}")]
    EventFd(std::io::Error),
    #[error("KVM refused the interrupt eventfd: {0}")]
    Irqfd(#[from] super::vm::VmError),
    #[error("KVM refused a queue notification eventfd: {0}")]
    Ioeventfd(kvm_ioctls::Error),
    #[error(transparent)]
    Bus(#[from] devices::BusError),
}

/// The virtio-mmio devices of a VM, as placed so far.
#[derive(Default)]
pub struct MmioDevices {
    bus: Bus,
    slots: Vec<MmioDeviceInfo>,
    transports: Vec<Arc<Mutex<MmioTransport>>>,
}

impl MmioDevices {
    /// Adds `device` in the next window; returns where it went.
    pub fn add(
        &mut self,
        vm: &Vm,
        mem: &GuestMemoryMmap,
        device: Arc<Mutex<dyn VirtioDevice>>,
    ) -> Result<MmioDeviceInfo, MmioDevicesError> {
        let index = self.slots.len() as u32;
        let irq = layout::VIRTIO_IRQ_FIRST + index;
        if irq > layout::VIRTIO_IRQ_LAST {
            return Err(MmioDevicesError::TooMany);
        }
        let base = layout::VIRTIO_MMIO_START + u64::from(index) * layout::VIRTIO_MMIO_WINDOW_SIZE;
        let irqfd = EventFd::new(libc::EFD_NONBLOCK).map_err(MmioDevicesError::EventFd)?;
        vm.register_irqfd(&irqfd, irq)?;
        let transport =
            MmioTransport::new(device, mem.clone(), irqfd).map_err(MmioDevicesError::Transport)?;
        let notify = IoEventAddress::Mmio(base + NOTIFY_OFFSET);
        for (queue, kick) in transport.queue_kicks().iter().enumerate() {
            vm.fd()
                .register_ioevent(kick, &notify, queue as u32)
                .map_err(MmioDevicesError::Ioeventfd)?;
        }
        let transport = Arc::new(Mutex::new(transport));
        self.bus.insert(transport.clone(), base, WINDOW_SIZE)?;
        self.transports.push(transport);
        let info = MmioDeviceInfo {
            base,
            size: WINDOW_SIZE,
            irq,
        };
        self.slots.push(info);
        Ok(info)
    }

    /// Every device window, in the order the guest will number them.
    pub fn slots(&self) -> &[MmioDeviceInfo] {
        &self.slots
    }

    pub fn into_bus(self) -> Bus {
        self.bus
    }
}

/// `virtio_mmio.device=` parameters for kernels that find devices on their command line.
pub fn cmdline_params(slots: &[MmioDeviceInfo]) -> String {
    slots
        .iter()
        .map(|s| {
            format!(
                " virtio_mmio.device={}K@{:#x}:{}",
                s.size / 1024,
                s.base,
                s.irq
            )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cmdline_params_name_window_and_irq() {
        let slots = [
            MmioDeviceInfo {
                base: 0xd000_0000,
                size: 0x1000,
                irq: 5,
            },
            MmioDeviceInfo {
                base: 0xd000_1000,
                size: 0x1000,
                irq: 6,
            },
        ];
        assert_eq!(
            cmdline_params(&slots),
            " virtio_mmio.device=4K@0xd0000000:5 virtio_mmio.device=4K@0xd0001000:6"
        );
        assert_eq!(cmdline_params(&[]), "");
    }
}
