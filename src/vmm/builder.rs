//! The boot flow, top-down: memory → KVM VM → devices → firmware tables → kernel → vCPUs.

use std::fs::File;
use std::io::Write;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use devices::legacy::{AcpiSleepControl, GedDevice, I8042Device, SerialDevice, GED_REGISTER_LEN};
use devices::Bus;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use super::event_loop::PowerButton;
use super::memory::{self, MemoryError};
use super::mmio_devices::{self, MmioDevices, MmioDevicesError};
use super::vcpu::{Vcpu, VcpuError};
use super::virtio_devices::{self, VirtioDeviceError};
use super::vm::{Vm, VmError};
use crate::api::{DeviceReport, DeviceSource};
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
            BuildError::Vm(e) if e.is_user_error() => crate::EXIT_USAGE,
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
    /// How a shutdown request reaches the guest.
    pub power_button: PowerButton,
    /// The virtio devices, for the control socket's status.
    pub devices: Vec<DeviceReport>,
}

fn eventfd() -> Result<EventFd, BuildError> {
    EventFd::new(libc::EFD_NONBLOCK).map_err(BuildError::EventFd)
}

pub fn build(config: &VmConfig) -> Result<BuiltVm, BuildError> {
    let machine = &config.machine;
    let vcpu_count = machine.vcpus as u8;

    // Memory and the VM.
    let mem = memory::create_guest_memory(machine.memory_mib, config.needs_shared_memory())?;
    let vm = Vm::new(machine.vcpus, config.kvm_path())?;
    vm.register_memory(&mem)?;

    // Devices.
    let exit_events = ExitEvents {
        reset: eventfd()?,
        poweroff: eventfd()?,
    };
    let serial = create_serial(&vm, &config.serial)?;
    let (pio_bus, power_button) = legacy_port_bus(&vm, machine.acpi, &serial, &exit_events)?;
    let mut virtio = MmioDevices::default();
    let mut devices = Vec::new();
    let report = |id: String, source| DeviceReport { id, source };
    for (index, disk) in config.disks.iter().enumerate() {
        let (disk, counters) = virtio_devices::create_disk_with_counters(index, disk)?;
        virtio.add(&vm, &mem, disk)?;
        let source = counters.map_or(DeviceSource::VhostUserBlock, DeviceSource::Block);
        devices.push(report(format!("disks[{index}]"), source));
    }
    for (index, net) in config.net.iter().enumerate() {
        let net = virtio_devices::create_net(index, net)?;
        let source = DeviceSource::Net(net.counters());
        virtio.add(&vm, &mem, Arc::new(Mutex::new(net)))?;
        devices.push(report(format!("net[{index}]"), source));
    }
    for (index, share) in config.shares.iter().enumerate() {
        let tag = share.tag.clone();
        let device = Arc::new(Mutex::new(virtio_devices::create_share(index, share)?));
        virtio.add(&vm, &mem, device.clone())?;
        devices.push(report(
            format!("shares[{index}]"),
            DeviceSource::Fs { tag, device },
        ));
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
        power_button,
        devices,
    })
}

/// The UART, its interrupt wired through an irqfd, its output where the config says.
fn create_serial(vm: &Vm, config: &SerialConfig) -> Result<Arc<Mutex<SerialDevice>>, BuildError> {
    let out: Box<dyn Write + Send> = match (config.mode, &config.path) {
        (SerialMode::Stdout, _) => stdout_unbuffered(),
        (SerialMode::File, Some(path)) => Box::new(open_serial_output(path)?),
        _ => Box::new(std::io::sink()),
    };
    let irq = eventfd()?;
    vm.register_irqfd(&irq, layout::SERIAL_IRQ)?;
    Ok(Arc::new(Mutex::new(SerialDevice::new(irq, out))))
}

/// The console output file, created or truncated, or the inherited descriptor `fd:N`.
fn open_serial_output(path: &std::path::Path) -> Result<File, BuildError> {
    let err = |source| BuildError::SerialOutput {
        path: path.to_owned(),
        source,
    };
    // Validation refused malformed `fd:` paths.
    match crate::config::parse_fd("serial.path", path).ok().flatten() {
        // SAFETY: validation checked the descriptor is open for writing and named once in the
        // config, which hands it to mvmm: the File may own it.
        Some(fd) => Ok(unsafe { <File as std::os::fd::FromRawFd>::from_raw_fd(fd) }),
        None => File::create(path).map_err(err),
    }
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

/// The port I/O bus: UART, i8042, ACPI sleep register, and with ACPI the GED's register.
/// Returns the bus and the power button: the GED with ACPI, else the i8042's Ctrl-Alt-Del.
fn legacy_port_bus(
    vm: &Vm,
    acpi: bool,
    serial: &Arc<Mutex<SerialDevice>>,
    exit_events: &ExitEvents,
) -> Result<(Bus, PowerButton), BuildError> {
    let mut bus = Bus::new();
    bus.insert(serial.clone(), SERIAL_PORT_BASE, SERIAL_PORT_LEN)?;
    let reset = exit_events.reset.try_clone().map_err(BuildError::EventFd)?;
    let kbd_irq = eventfd()?;
    vm.register_irqfd(&kbd_irq, layout::I8042_KBD_IRQ)?;
    let i8042 = Arc::new(Mutex::new(I8042Device::new(reset).with_interrupt(kbd_irq)));
    bus.insert(i8042.clone(), I8042_PORT_BASE, I8042_PORT_LEN)?;
    let mut power_button = PowerButton::CtrlAltDel(i8042);
    if acpi {
        let ged_irq = eventfd()?;
        vm.register_irqfd(&ged_irq, layout::GED_IRQ)?;
        let ged = Arc::new(Mutex::new(GedDevice::new(ged_irq)));
        bus.insert(ged.clone(), u64::from(layout::GED_PORT), GED_REGISTER_LEN)?;
        power_button = PowerButton::Acpi(ged);
    }
    let poweroff = exit_events
        .poweroff
        .try_clone()
        .map_err(BuildError::EventFd)?;
    bus.insert(
        Arc::new(Mutex::new(AcpiSleepControl::new(poweroff))),
        u64::from(layout::ACPI_SLEEP_PORT),
        1,
    )?;
    Ok((bus, power_button))
}
