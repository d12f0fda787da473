//! The boot flow, top-down: memory → KVM VM → devices → firmware tables → kernel → vCPUs.

use std::fs::File;
use std::io::Write;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use devices::legacy::{AcpiSleepControl, I8042Device, SerialDevice};
use devices::Bus;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use super::memory::{self, MemoryError};
use super::mmio_devices::{self, MmioDevices, MmioDevicesError};
use super::vcpu::{Vcpu, VcpuError};
use super::virtio_devices::{self, VirtioDeviceError};
use super::vm::{Vm, VmError};
use crate::arch::boot_info::{self, BootInfo, BootInfoError};
use crate::arch::regs::BootEntry;
use crate::arch::{acpi, layout, mptable, smbios};
use crate::config::{SerialConfig, SerialMode, VmConfig};
use crate::loader::{self, LoaderError};

const SERIAL_PORT_BASE: u64 = 0x3f8;
const SERIAL_PORT_LEN: u64 = 8;
const I8042_PORT_BASE: u64 = 0x60;
const I8042_PORT_LEN: u64 = 5;

#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error(transparent)]
    Memory(#[from] MemoryError),
    #[error(transparent)]
    Vm(#[from] VmError),
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    #[error("kernel: {0}")]
    Loader(#[from] LoaderError),
    #[error("boot information: {0}")]
    BootInfo(#[from] BootInfoError),
    #[error("ACPI tables: {0}")]
    Acpi(#[from] acpi::AcpiError),
    #[error("MP table: {0}")]
    Mptable(#[from] mptable::MptableError),
    #[error("SMBIOS tables: {0}")]
    Smbios(#[from] smbios::SmbiosError),
    #[error("config field `serial.path`: cannot create {}: {source}", path.display())]
    SerialOutput {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot create an eventfd: {0}")]
    EventFd(std::io::Error),
    #[error("cannot place a device on the bus: {0}")]
    Bus(#[from] devices::BusError),
    #[error(transparent)]
    VirtioDevice(#[from] VirtioDeviceError),
    #[error("virtio devices: {0}")]
    MmioDevices(#[from] MmioDevicesError),
    #[error("config field `kernel.cmdline`: with the virtio device parameters appended the command line is {0} bytes; the limit is {max}", max = layout::CMDLINE_MAX_SIZE - 1)]
    CmdlineTooLong(usize),
}

impl BuildError {
    /// Problems with the files the config names are the user's to fix (2); the rest are ours (1).
    pub fn exit_code(&self) -> i32 {
        match self {
            BuildError::Loader(_)
            | BuildError::SerialOutput { .. }
            | BuildError::CmdlineTooLong(_) => crate::EXIT_USAGE,
            BuildError::VirtioDevice(e) if e.is_user_error() => crate::EXIT_USAGE,
            BuildError::Vm(VmError::TooManyVcpus { .. }) => crate::EXIT_USAGE,
            _ => crate::EXIT_FAILURE,
        }
    }
}

/// Eventfds through which devices ask the VMM to end the VM.
pub struct ExitEvents {
    pub reset: EventFd,
    pub poweroff: EventFd,
}

/// A VM ready to run: its vCPUs are configured but not started.
pub struct BuiltVm {
    /// Not used after the build, but owned here so the VM lives as long as its vCPUs.
    #[allow(dead_code)]
    pub vm: Vm,
    pub mem: GuestMemoryMmap,
    pub vcpus: Vec<Vcpu>,
    pub serial: Arc<Mutex<SerialDevice>>,
    pub exit_events: ExitEvents,
}

fn eventfd() -> Result<EventFd, BuildError> {
    EventFd::new(libc::EFD_NONBLOCK).map_err(BuildError::EventFd)
}

pub fn build(config: &VmConfig) -> Result<BuiltVm, BuildError> {
    let machine = &config.machine;
    let vcpu_count = machine.vcpus as u8;

    // Memory and the VM.
    let mem = memory::create_guest_memory(machine.memory_mib, config.needs_shared_memory())?;
    let vm = Vm::new(machine.vcpus)?;
    vm.register_memory(&mem)?;

    // Devices.
    let exit_events = ExitEvents {
        reset: eventfd()?,
        poweroff: eventfd()?,
    };
    let serial = create_serial(&vm, &config.serial)?;
    let pio_bus = legacy_port_bus(&serial, &exit_events)?;
    let mut virtio = MmioDevices::default();
    for (index, disk) in config.disks.iter().enumerate() {
        virtio.add(&vm, &mem, virtio_devices::create_disk(index, disk)?)?;
    }
    for (index, net) in config.net.iter().enumerate() {
        let net = virtio_devices::create_net(index, net)?;
        virtio.add(&vm, &mem, Arc::new(Mutex::new(net)))?;
    }
    for (index, share) in config.shares.iter().enumerate() {
        let share = virtio_devices::create_share(index, share)?;
        virtio.add(&vm, &mem, Arc::new(Mutex::new(share)))?;
    }
    let slots = virtio.slots().to_vec();
    let mmio_bus = virtio.into_bus();

    // Firmware tables describing CPUs and devices.
    let rsdp = if machine.acpi {
        Some(acpi::create_acpi_tables(&mem, vcpu_count, &slots)?)
    } else {
        mptable::setup_mptable(&mem, vcpu_count)?;
        None
    };
    let uuid = config
        .machine_id
        .as_deref()
        .and_then(smbios::parse_machine_id);
    smbios::setup_smbios(&mem, uuid)?;

    // Kernel, initrd, command line, boot information.
    let kernel = loader::load_kernel(&mem, &config.kernel.path)?;
    let initrd = match &config.kernel.initrd {
        Some(path) => Some(loader::load_initrd(&mem, path, &kernel)?),
        None => None,
    };
    // Kernels without ACPI (or with it off) find virtio-mmio devices on their command line.
    let cmdline = format!(
        "{}{}",
        config.cmdline(),
        mmio_devices::cmdline_params(&slots)
    );
    if cmdline.len() >= layout::CMDLINE_MAX_SIZE {
        return Err(BuildError::CmdlineTooLong(cmdline.len()));
    }
    let cmdline_addr = loader::load_cmdline(&mem, &cmdline)?;
    let e820 = boot_info::e820_map(&memory::ram_regions(machine.memory_mib << 20))?;
    let info = BootInfo {
        e820: &e820,
        cmdline_addr,
        cmdline_len: cmdline.len(),
        initrd,
        rsdp,
    };
    match kernel.entry {
        BootEntry::Pvh { .. } => boot_info::write_pvh_start_info(&mem, &info)?,
        BootEntry::Linux64 { .. } => boot_info::write_zero_page(&mem, kernel.setup_header, &info)?,
    }

    log::info!(
        "booting {} as {} ({} vCPUs, {} MiB)",
        config.kernel.path.display(),
        kernel.format,
        machine.vcpus,
        machine.memory_mib
    );

    // vCPUs, configured for the kernel's entry protocol.
    let pio_bus = Arc::new(pio_bus);
    let mmio_bus = Arc::new(mmio_bus);
    let mut vcpus = Vec::with_capacity(vcpu_count.into());
    for index in 0..vcpu_count {
        let vcpu = Vcpu::new(&vm, index, pio_bus.clone(), mmio_bus.clone())?;
        vcpu.configure(&vm, &mem, vcpu_count, kernel.entry)?;
        vcpus.push(vcpu);
    }

    Ok(BuiltVm {
        vm,
        mem,
        vcpus,
        serial,
        exit_events,
    })
}

/// The UART, its interrupt wired through an irqfd, its output where the config says.
fn create_serial(vm: &Vm, config: &SerialConfig) -> Result<Arc<Mutex<SerialDevice>>, BuildError> {
    let out: Box<dyn Write + Send> = match (config.mode, &config.path) {
        (SerialMode::Stdout, _) => stdout_unbuffered(),
        (SerialMode::File, Some(path)) => {
            Box::new(
                File::create(path).map_err(|source| BuildError::SerialOutput {
                    path: path.clone(),
                    source,
                })?,
            )
        }
        _ => Box::new(std::io::sink()),
    };
    let irq = eventfd()?;
    vm.register_irqfd(&irq, layout::SERIAL_IRQ)?;
    Ok(Arc::new(Mutex::new(SerialDevice::new(irq, out))))
}

/// Guest console bytes go straight to fd 1, unbuffered, so nothing is lost at exit.
fn stdout_unbuffered() -> Box<dyn Write + Send> {
    use std::os::fd::AsFd;
    match std::io::stdout().as_fd().try_clone_to_owned() {
        Ok(fd) => Box::new(File::from(fd)),
        Err(e) => {
            log::warn!("cannot duplicate stdout ({e}); guest console output is dropped");
            Box::new(std::io::sink())
        }
    }
}

/// The port I/O bus: UART, i8042, ACPI sleep register.
fn legacy_port_bus(
    serial: &Arc<Mutex<SerialDevice>>,
    exit_events: &ExitEvents,
) -> Result<Bus, BuildError> {
    let mut bus = Bus::new();
    bus.insert(serial.clone(), SERIAL_PORT_BASE, SERIAL_PORT_LEN)?;
    let reset = exit_events.reset.try_clone().map_err(BuildError::EventFd)?;
    bus.insert(
        Arc::new(Mutex::new(I8042Device::new(reset))),
        I8042_PORT_BASE,
        I8042_PORT_LEN,
    )?;
    let poweroff = exit_events
        .poweroff
        .try_clone()
        .map_err(BuildError::EventFd)?;
    bus.insert(
        Arc::new(Mutex::new(AcpiSleepControl::new(poweroff))),
        u64::from(layout::ACPI_SLEEP_PORT),
        1,
    )?;
    Ok(bus)
}
