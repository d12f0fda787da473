//! `vm.json`: the VM's configuration, parsed strictly and validated before anything starts.
//!
//! The schema is documented in `resources/schema/vm.schema.json`. Relative paths are resolved
//! against the directory of the config file, so a config works whatever the caller's cwd is.

mod devices;
mod error;
mod fd;
mod jail;
mod validate;
mod virtiofsd;

use std::path::{Path, PathBuf};

use serde::Deserialize;

pub use devices::{
    parse_mac, DiskConfig, NetConfig, ShareConfig, DEFAULT_CONNECT_TIMEOUT_SECS, MAX_QUEUE_SIZE,
};
pub use error::ConfigError;
pub use fd::{parse_fd, FD_PREFIX};
pub use jail::JailConfig;
pub use virtiofsd::VirtiofsdOptions;

/// The whole VM description.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmConfig {
    pub kernel: KernelConfig,
    pub machine: MachineConfig,
    #[serde(default)]
    pub serial: SerialConfig,
    /// virtio-blk disks, in guest order: the first is /dev/vda (the /nix/store image).
    #[serde(default)]
    pub disks: Vec<DiskConfig>,
    /// virtio-net interfaces, after the disks.
    #[serde(default)]
    pub net: Vec<NetConfig>,
    /// virtio-fs shares through vhost-user backends, after the interfaces.
    #[serde(default)]
    pub shares: Vec<ShareConfig>,
    /// The guest's machine id (32 hex digits, as in /etc/machine-id), given to the guest as
    /// its SMBIOS system UUID.
    pub machine_id: Option<String>,
    /// The KVM device: a path (default /dev/kvm) or `fd:N`, an inherited descriptor.
    pub kvm: Option<PathBuf>,
    /// The control socket (JSON lines: status, shutdown, pause, resume), if any.
    pub api_socket: Option<PathBuf>,
    /// Confinement mvmm applies to itself (chroot, namespaces, setuid, rlimits).
    pub jail: Option<JailConfig>,
}

/// Where KVM is opened when the config does not say.
pub const DEFAULT_KVM_PATH: &str = "/dev/kvm";

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KernelConfig {
    /// A bzImage or an ELF vmlinux (PVH note or 64-bit entry).
    pub path: PathBuf,
    pub initrd: Option<PathBuf>,
    /// Passed to the kernel as is; defaults to `DEFAULT_CMDLINE`.
    pub cmdline: Option<String>,
}

/// Used when the config gives no command line: a serial console and a reboot the VMM sees.
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 reboot=k panic=1";

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MachineConfig {
    pub vcpus: u32,
    pub memory_mib: u64,
    /// Describe the machine with ACPI tables (otherwise an MP table).
    #[serde(default = "default_true")]
    pub acpi: bool,
    /// How long the guest gets to shut down after the power button (SIGTERM or the control
    /// socket's `shutdown`) before mvmm stops it; 0 stops it at once.
    #[serde(default = "default_shutdown_timeout")]
    pub shutdown_timeout_secs: u32,
}

/// The default grace period: what systemd gives a service to stop, and enough for a guest's
/// own systemd to stop its units.
pub const DEFAULT_SHUTDOWN_TIMEOUT_SECS: u32 = 30;

fn default_shutdown_timeout() -> u32 {
    DEFAULT_SHUTDOWN_TIMEOUT_SECS
}

fn default_true() -> bool {
    true
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SerialMode {
    #[default]
    Stdout,
    File,
    Off,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SerialConfig {
    #[serde(default)]
    pub mode: SerialMode,
    /// Output file for `mode: "file"` (created or truncated).
    pub path: Option<PathBuf>,
}

impl VmConfig {
    /// Reads, parses and validates a config file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let base_dir = path.parent().unwrap_or(Path::new("."));
        Self::from_json(&text, base_dir)
    }

    /// Parses and validates config text; relative paths are taken from `base_dir`.
    pub fn from_json(text: &str, base_dir: &Path) -> Result<Self, ConfigError> {
        let deserializer = &mut serde_json::Deserializer::from_str(text);
        let mut config: VmConfig = serde_path_to_error::deserialize(deserializer)
            .map_err(|e| error::describe_parse_error(&e))?;
        config.resolve_paths(base_dir);
        validate::validate(&config, &validate::HostLimits::read())?;
        Ok(config)
    }

    fn resolve_paths(&mut self, base_dir: &Path) {
        let resolve = |p: &mut PathBuf| {
            // `fd:N` names an inherited descriptor, not a file in the config's directory.
            if p.is_relative() && !fd::is_fd_path(p) {
                *p = base_dir.join(&*p);
            }
        };
        resolve(&mut self.kernel.path);
        if let Some(p) = self.kvm.as_mut() {
            resolve(p);
        }
        if let Some(p) = self.kernel.initrd.as_mut() {
            resolve(p);
        }
        if let Some(p) = self.serial.path.as_mut() {
            resolve(p);
        }
        if let Some(p) = self.api_socket.as_mut() {
            resolve(p);
        }
        if let Some(jail) = self.jail.as_mut() {
            resolve(&mut jail.root);
        }
        for disk in &mut self.disks {
            disk.path
                .iter_mut()
                .chain(disk.socket.iter_mut())
                .for_each(resolve);
        }
        for share in &mut self.shares {
            resolve(&mut share.socket);
        }
    }

    /// vhost-user backends map guest memory, which must then be shared.
    pub fn needs_shared_memory(&self) -> bool {
        !self.shares.is_empty() || self.disks.iter().any(|d| d.socket.is_some())
    }

    /// Directories holding sockets mvmm may connect to (or remove) after it is jailed.
    pub fn socket_dirs(&self) -> Vec<PathBuf> {
        let sockets = self
            .shares
            .iter()
            .map(|s| &s.socket)
            .chain(self.disks.iter().filter_map(|d| d.socket.as_ref()))
            .chain(self.api_socket.as_ref());
        let mut dirs: Vec<PathBuf> = sockets
            .filter_map(|s| s.parent().map(Path::to_path_buf))
            .collect();
        dirs.sort();
        dirs.dedup();
        dirs
    }

    /// The KVM device to open, or `fd:N`.
    pub fn kvm_path(&self) -> &Path {
        self.kvm.as_deref().unwrap_or(Path::new(DEFAULT_KVM_PATH))
    }

    /// The command line the guest gets, before the VMM appends device parameters.
    pub fn cmdline(&self) -> &str {
        self.kernel.cmdline.as_deref().unwrap_or(DEFAULT_CMDLINE)
    }
}

#[cfg(test)]
mod tests;
