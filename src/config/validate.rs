//! Semantic checks that serde cannot express: ranges, files that must exist, host limits.

use std::path::Path;

use super::{ConfigError, SerialMode, VmConfig};
use crate::arch::layout::CMDLINE_MAX_SIZE;

/// xAPIC IDs are 8 bits and the IOAPIC takes one: 254 vCPUs at most.
pub const MAX_VCPUS: u32 = 254;
/// Below this no Linux kernel gets anywhere.
pub const MIN_MEMORY_MIB: u64 = 8;
/// 64 TiB: far beyond any host, and keeps byte sizes well inside u64 even when the host's
/// limit cannot be read.
pub const MAX_MEMORY_MIB: u64 = 64 << 20;

/// What the host can give, read once per validation.
pub struct HostLimits {
    /// RAM plus swap, in MiB; `None` if /proc/meminfo is unreadable (then nothing is enforced).
    pub memory_mib: Option<u64>,
}

impl HostLimits {
    pub fn read() -> Self {
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let field_kib = |name: &str| -> Option<u64> {
            let line = meminfo.lines().find(|l| l.starts_with(name))?;
            line.split_whitespace().nth(1)?.parse().ok()
        };
        let memory_mib =
            field_kib("MemTotal:").map(|ram| (ram + field_kib("SwapTotal:").unwrap_or(0)) / 1024);
        Self { memory_mib }
    }
}

pub fn validate(config: &VmConfig, host: &HostLimits) -> Result<(), ConfigError> {
    validate_machine(config, host)?;
    require_file(
        "kernel.path",
        &config.kernel.path,
        "a bzImage or an ELF vmlinux",
    )?;
    if let Some(initrd) = &config.kernel.initrd {
        require_file("kernel.initrd", initrd, "an initramfs archive")?;
    }
    validate_cmdline(config.cmdline())?;
    validate_serial(config)?;
    super::fd::validate_fds(config)?;
    validate_machine_id(config)?;
    validate_api_socket(config)?;
    super::devices::validate_disks(&config.disks)?;
    super::devices::validate_net(&config.net)?;
    super::devices::validate_shares(&config.shares)?;
    super::devices::validate_device_count(config.disks.len(), config.net.len(), config.shares.len())
}

/// Longest path a Unix socket address holds (sun_path is 108 bytes with the NUL).
const MAX_SOCKET_PATH: usize = 107;
/// An hour: far beyond any guest's shutdown, small enough to catch a unit mix-up (ms for s).
pub const MAX_SHUTDOWN_TIMEOUT_SECS: u32 = 3600;

fn validate_api_socket(config: &VmConfig) -> Result<(), ConfigError> {
    let Some(path) = &config.api_socket else {
        return Ok(());
    };
    let len = path.as_os_str().len();
    if len == 0 || len > MAX_SOCKET_PATH {
        return Err(ConfigError::invalid(
            "api_socket",
            format!(
                "{:?} is {len} bytes; a socket path must be 1 to {MAX_SOCKET_PATH} bytes, use a shorter one",
                path.display().to_string()
            ),
        ));
    }
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty());
    if let Some(dir) = dir {
        if !dir.is_dir() {
            return Err(ConfigError::invalid(
                "api_socket",
                format!(
                    "the directory {} does not exist; create it or choose another path",
                    dir.display()
                ),
            ));
        }
    }
    if std::fs::symlink_metadata(path).is_ok_and(|m| m.is_dir()) {
        return Err(ConfigError::invalid(
            "api_socket",
            format!("{} is a directory; name a socket file", path.display()),
        ));
    }
    Ok(())
}

fn validate_machine_id(config: &VmConfig) -> Result<(), ConfigError> {
    match &config.machine_id {
        Some(id) if crate::arch::smbios::parse_machine_id(id).is_none() => {
            Err(ConfigError::invalid(
                "machine_id",
                format!("{id:?} is not 32 hex digits (the format of /etc/machine-id)"),
            ))
        }
        _ => Ok(()),
    }
}

fn validate_machine(config: &VmConfig, host: &HostLimits) -> Result<(), ConfigError> {
    let machine = &config.machine;
    if machine.vcpus == 0 || machine.vcpus > MAX_VCPUS {
        return Err(ConfigError::invalid(
            "machine.vcpus",
            format!("{} is out of range; use 1 to {MAX_VCPUS}", machine.vcpus),
        ));
    }
    let mptable_max = u32::from(crate::arch::mptable::MAX_VCPUS);
    if !machine.acpi && machine.vcpus > mptable_max {
        return Err(ConfigError::invalid(
            "machine.vcpus",
            format!(
                "{} vCPUs do not fit in an MP table (at most {mptable_max}); enable machine.acpi or use fewer",
                machine.vcpus
            ),
        ));
    }
    if machine.shutdown_timeout_secs > MAX_SHUTDOWN_TIMEOUT_SECS {
        return Err(ConfigError::invalid(
            "machine.shutdown_timeout_secs",
            format!(
                "{} s is out of range; use 0 (stop at once) to {MAX_SHUTDOWN_TIMEOUT_SECS}",
                machine.shutdown_timeout_secs
            ),
        ));
    }
    if machine.memory_mib < MIN_MEMORY_MIB {
        return Err(ConfigError::invalid(
            "machine.memory_mib",
            format!(
                "{} MiB is too little to boot a kernel; use at least {MIN_MEMORY_MIB}",
                machine.memory_mib
            ),
        ));
    }
    if machine.memory_mib > MAX_MEMORY_MIB {
        return Err(ConfigError::invalid(
            "machine.memory_mib",
            format!(
                "{} MiB is above mvmm's limit of {MAX_MEMORY_MIB} MiB",
                machine.memory_mib
            ),
        ));
    }
    if let Some(limit) = host.memory_mib {
        if machine.memory_mib > limit {
            return Err(ConfigError::invalid(
                "machine.memory_mib",
                format!(
                    "{} MiB is more than this host has ({limit} MiB of RAM and swap); lower it",
                    machine.memory_mib
                ),
            ));
        }
    }
    Ok(())
}

fn require_file(field: &str, path: &Path, what: &str) -> Result<(), ConfigError> {
    match std::fs::metadata(path) {
        Ok(meta) if meta.is_file() => Ok(()),
        Ok(_) => Err(ConfigError::invalid(
            field,
            format!(
                "{} is not a regular file; point it at {what}",
                path.display()
            ),
        )),
        Err(e) => Err(ConfigError::invalid(
            field,
            format!("cannot open {}: {e}; point it at {what}", path.display()),
        )),
    }
}

fn validate_cmdline(cmdline: &str) -> Result<(), ConfigError> {
    if cmdline.contains('\0') {
        return Err(ConfigError::invalid(
            "kernel.cmdline",
            "contains a NUL byte; remove it",
        ));
    }
    // The kernel also needs room for the NUL terminator.
    if cmdline.len() >= CMDLINE_MAX_SIZE {
        return Err(ConfigError::invalid(
            "kernel.cmdline",
            format!(
                "is {} bytes long; the limit is {} bytes",
                cmdline.len(),
                CMDLINE_MAX_SIZE - 1
            ),
        ));
    }
    Ok(())
}

fn validate_serial(config: &VmConfig) -> Result<(), ConfigError> {
    match (config.serial.mode, &config.serial.path) {
        (SerialMode::File, None) => Err(ConfigError::invalid(
            "serial.path",
            "is required when serial.mode is \"file\"; give the output file's path",
        )),
        (SerialMode::Stdout | SerialMode::Off, Some(_)) => Err(ConfigError::invalid(
            "serial.path",
            "is only used with serial.mode \"file\"; remove it or set the mode",
        )),
        _ => Ok(()),
    }
}
