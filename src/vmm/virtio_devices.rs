//! Creates the virtio device models the config asks for: opens disk files and taps.
//! Everything here fails with the config field to fix.

use std::fs::OpenOptions;
use std::os::unix::fs::OpenOptionsExt;

use std::os::fd::{FromRawFd, OwnedFd};
use std::sync::{Arc, Mutex};

use devices::virtio::block::{Block, BlockConfig};
use devices::virtio::net::{Net, NetConfig as NetDeviceConfig, Tap, TapError};
use devices::virtio::vhost_user::{self, VhostUserDevice, VhostUserKind};
use devices::virtio::VirtioDevice;

use crate::config::{
    DiskConfig, NetConfig, ShareConfig, DEFAULT_CONNECT_TIMEOUT_SECS, MAX_QUEUE_SIZE,
};

#[derive(Debug, thiserror::Error)]
pub enum VirtioDeviceError {
    #[error("config field `disks[{index}].path`: cannot open {path}: {source}")]
    OpenDisk {
        index: usize,
        path: String,
        source: std::io::Error,
    },
    #[error("config field `disks[{index}]`: {source}")]
    Block {
        index: usize,
        source: devices::virtio::block::BlockError,
    },
    #[error("config field `net[{index}]`: {source}")]
    Tap { index: usize, source: TapError },
    #[error("config field `net[{index}]`: {source}")]
    Net {
        index: usize,
        source: devices::virtio::net::NetError,
    },
    #[error("config field `net[{index}].fd`: descriptor {fd} is not open; the process that starts mvmm must pass it")]
    FdNotOpen { index: usize, fd: i32 },
    #[error("config field `{field}`: {source}")]
    VhostUser {
        field: String,
        source: vhost_user::Error,
    },
}

impl VirtioDeviceError {
    /// A backend that never showed up is a setup problem (2); a broken one is a failure (1).
    pub fn is_user_error(&self) -> bool {
        match self {
            VirtioDeviceError::VhostUser { source, .. } => {
                matches!(
                    source,
                    vhost_user::Error::SocketTimeout { .. }
                        | vhost_user::Error::BackendQueues { .. }
                        | vhost_user::Error::QueueCount { .. }
                        | vhost_user::Error::FsTag(_)
                        | vhost_user::Error::QueueSize(_)
                )
            }
            _ => true,
        }
    }
}

/// Builds disk `index`: a virtio-blk device on its file, or a vhost-user-blk frontend.
pub fn create_disk(
    index: usize,
    disk: &DiskConfig,
) -> Result<Arc<Mutex<dyn VirtioDevice>>, VirtioDeviceError> {
    let (Some(path), None) = (&disk.path, &disk.socket) else {
        let socket = disk.socket.clone().unwrap_or_default();
        let device = VhostUserDevice::new(
            socket,
            VhostUserKind::Block,
            disk.queue_size.unwrap_or(MAX_QUEUE_SIZE),
            None,
            std::time::Duration::from_secs(
                disk.connect_timeout_secs
                    .unwrap_or(DEFAULT_CONNECT_TIMEOUT_SECS)
                    .into(),
            ),
        )
        .map_err(|source| VirtioDeviceError::VhostUser {
            field: format!("disks[{index}].socket"),
            source,
        })?;
        return Ok(Arc::new(Mutex::new(device)));
    };
    Ok(Arc::new(Mutex::new(create_block(index, path, disk)?)))
}

/// A disk's device, and its request counters when mvmm serves it itself.
pub type DiskWithCounters = (
    Arc<Mutex<dyn VirtioDevice>>,
    Option<Arc<devices::virtio::block::BlockCounters>>,
);

/// Like [`create_disk`], with the disk's request counters when mvmm serves it itself (a
/// vhost-user backend keeps its own), for the control socket's status.
pub fn create_disk_with_counters(
    index: usize,
    disk: &DiskConfig,
) -> Result<DiskWithCounters, VirtioDeviceError> {
    match (&disk.path, &disk.socket) {
        (Some(path), None) => {
            let block = create_block(index, path, disk)?;
            let counters = block.counters();
            Ok((Arc::new(Mutex::new(block)), Some(counters)))
        }
        _ => Ok((create_disk(index, disk)?, None)),
    }
}

/// Opens disk `index` as the config describes and builds its virtio-blk device.
fn create_block(
    index: usize,
    path: &std::path::Path,
    disk: &DiskConfig,
) -> Result<Block, VirtioDeviceError> {
    let open_err = |source| VirtioDeviceError::OpenDisk {
        index,
        path: path.display().to_string(),
        source,
    };
    // Validation refused malformed `fd:` paths.
    let file = match crate::config::parse_fd("disks[].path", path).ok().flatten() {
        Some(fd) => {
            // SAFETY: validation checked the descriptor is an open disk image with the access
            // mode `read_only` needs, named once in the config, which hands it to mvmm.
            let file = unsafe { std::fs::File::from_raw_fd(fd) };
            if disk.direct {
                set_direct(&file).map_err(open_err)?;
            }
            file
        }
        None => {
            let mut options = OpenOptions::new();
            options.read(true).write(!disk.read_only);
            if disk.direct {
                options.custom_flags(libc::O_DIRECT);
            }
            options.open(path).map_err(open_err)?
        }
    };
    Block::new(BlockConfig {
        file,
        read_only: disk.read_only,
        serial: disk.serial.clone(),
        direct: disk.direct,
        queue_size: disk.queue_size.unwrap_or(MAX_QUEUE_SIZE),
    })
    .map_err(|source| VirtioDeviceError::Block { index, source })
}

/// Turns on O_DIRECT for an inherited disk descriptor opened without it.
fn set_direct(file: &std::fs::File) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: F_GETFL on a descriptor we own; the result is checked.
    let flags = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GETFL) };
    if flags < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: F_SETFL on the same descriptor; O_DIRECT is one of the flags it may change.
    let rc = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_SETFL, flags | libc::O_DIRECT) };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Opens interface `index`'s tap (by name, or the inherited fd) and builds its virtio-net device.
pub fn create_net(index: usize, net: &NetConfig) -> Result<Net, VirtioDeviceError> {
    let tap_err = |source| VirtioDeviceError::Tap { index, source };
    let tap = match (&net.tap, net.fd) {
        (Some(name), _) => Tap::open_named(name).map_err(tap_err)?,
        (None, Some(fd)) => {
            // SAFETY: fcntl(F_GETFD) only checks that the descriptor is open.
            if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
                return Err(VirtioDeviceError::FdNotOpen { index, fd });
            }
            // SAFETY: the config hands this inherited descriptor to mvmm; nothing else in the
            // process uses it, so the device may own (and eventually close) it.
            let owned = unsafe { OwnedFd::from_raw_fd(fd) };
            Tap::from_fd(owned).map_err(tap_err)?
        }
        (None, None) => unreachable!("validated: one of tap or fd"),
    };
    Net::new(NetDeviceConfig {
        tap,
        mac: net.mac_bytes(),
        mtu: net.mtu,
        queue_size: net.queue_size.unwrap_or(MAX_QUEUE_SIZE),
    })
    .map_err(|source| VirtioDeviceError::Net { index, source })
}

/// Connects to share `index`'s virtiofsd (waiting for its socket) and builds the virtio-fs
/// frontend.
pub fn create_share(
    index: usize,
    share: &ShareConfig,
) -> Result<VhostUserDevice, VirtioDeviceError> {
    VhostUserDevice::new(
        share.socket.clone(),
        VhostUserKind::Fs {
            tag: share.tag.clone(),
        },
        share.queue_size.unwrap_or(vhost_user::DEFAULT_QUEUE_SIZE),
        share.num_queues,
        share.connect_timeout(),
    )
    .map_err(|source| VirtioDeviceError::VhostUser {
        field: format!("shares[{index}].socket"),
        source,
    })
}
