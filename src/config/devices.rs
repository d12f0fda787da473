//! Config sections for virtio devices: `disks[]` and `net[]`.

use std::path::PathBuf;

use serde::Deserialize;

use super::ConfigError;

/// Largest virtio queue we offer (and the default).
pub const MAX_QUEUE_SIZE: u16 = 256;
/// The virtio-blk ID string the guest sees in /dev/disk/by-id.
pub const MAX_SERIAL_LEN: usize = 20;
/// Interface names are at most IFNAMSIZ - 1 bytes.
const MAX_IFNAME_LEN: usize = 15;
/// virtio-mmio devices share IRQs 5..=23.
pub const MAX_VIRTIO_DEVICES: usize = 19;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskConfig {
    /// A regular file or a block device. The first disk is /dev/vda.
    pub path: Option<PathBuf>,
    /// Instead of `path`: a vhost-user-blk backend's socket (e.g. `mvmm backend blk`).
    pub socket: Option<PathBuf>,
    /// With `socket`: how long to wait for it at start, in seconds (default 30).
    pub connect_timeout_secs: Option<u32>,
    #[serde(default)]
    pub read_only: bool,
    /// The disk's ID (at most 20 bytes), shown in /dev/disk/by-id/virtio-<serial>.
    pub serial: Option<String>,
    /// Open with O_DIRECT: bypass the host page cache.
    #[serde(default)]
    pub direct: bool,
    pub queue_size: Option<u16>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetConfig {
    /// A tap interface to open (created if missing and permitted).
    pub tap: Option<String>,
    /// An inherited tap or macvtap file descriptor, instead of `tap`.
    pub fd: Option<i32>,
    /// The guest's MAC address, `xx:xx:xx:xx:xx:xx`.
    pub mac: String,
    pub mtu: Option<u16>,
    pub queue_size: Option<u16>,
}

/// A virtio-fs share served by a vhost-user backend (virtiofsd) on a unix socket.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShareConfig {
    /// The name the guest mounts (`mount -t virtiofs <tag> /mnt`), at most 36 bytes.
    pub tag: String,
    /// virtiofsd's vhost-user socket.
    pub socket: PathBuf,
    pub queue_size: Option<u16>,
    /// Request queues (besides the high-priority queue); default 1.
    pub num_queues: Option<u16>,
    /// How long to wait for the socket to appear at start, in seconds (default 30).
    pub connect_timeout_secs: Option<u32>,
    /// The host directory to export: `mvmm supervise` starts virtiofsd for it (mvmm ignores it).
    pub source: Option<PathBuf>,
    /// Options for that virtiofsd (supervisor only).
    pub virtiofsd: Option<super::VirtiofsdOptions>,
}

/// virtio-fs tags are at most 36 bytes (the config space field).
pub const MAX_TAG_LEN: usize = 36;
/// virtio-fs queues may be larger than other devices' (virtiofsd accepts up to 1024).
pub const MAX_FS_QUEUE_SIZE: u16 = 1024;
pub const DEFAULT_CONNECT_TIMEOUT_SECS: u32 = 30;

pub fn validate_shares(shares: &[ShareConfig]) -> Result<(), ConfigError> {
    for (i, share) in shares.iter().enumerate() {
        let field = |name: &str| format!("shares[{i}].{name}");
        if share.socket.as_os_str().is_empty() {
            return Err(ConfigError::invalid(
                field("socket"),
                "is empty; give virtiofsd's socket path",
            ));
        }
        if share.tag.is_empty() || share.tag.len() > MAX_TAG_LEN || share.tag.contains('\0') {
            return Err(ConfigError::invalid(
                field("tag"),
                format!("{:?} must be 1 to {MAX_TAG_LEN} bytes", share.tag),
            ));
        }
        if shares[..i].iter().any(|other| other.tag == share.tag) {
            return Err(ConfigError::invalid(
                field("tag"),
                format!(
                    "{:?} is used by another share; tags must be unique",
                    share.tag
                ),
            ));
        }
        if let Some(n) = share.queue_size {
            if !(2..=MAX_FS_QUEUE_SIZE).contains(&n) || !n.is_power_of_two() {
                return Err(ConfigError::invalid(
                    field("queue_size"),
                    format!("{n} is not a power of two from 2 to {MAX_FS_QUEUE_SIZE}"),
                ));
            }
        }
        if share.num_queues == Some(0) {
            return Err(ConfigError::invalid(
                field("num_queues"),
                "must be at least 1",
            ));
        }
    }
    Ok(())
}

impl ShareConfig {
    pub fn connect_timeout(&self) -> std::time::Duration {
        let secs = self
            .connect_timeout_secs
            .unwrap_or(DEFAULT_CONNECT_TIMEOUT_SECS);
        std::time::Duration::from_secs(secs.into())
    }
}

impl NetConfig {
    /// The MAC as bytes; valid after validation.
    pub fn mac_bytes(&self) -> [u8; 6] {
        parse_mac(&self.mac).unwrap_or_default()
    }
}

pub fn parse_mac(text: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = text.split(':');
    for byte in &mut mac {
        let part = parts.next()?;
        if part.len() != 2 {
            return None;
        }
        *byte = u8::from_str_radix(part, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

fn validate_queue_size(field: String, size: Option<u16>, min: u16) -> Result<(), ConfigError> {
    match size {
        Some(n) if !(min..=MAX_QUEUE_SIZE).contains(&n) || !n.is_power_of_two() => {
            Err(ConfigError::invalid(
                field,
                format!("{n} is not a power of two from {min} to {MAX_QUEUE_SIZE}"),
            ))
        }
        _ => Ok(()),
    }
}

/// A block request takes three descriptors at least (header, data, status).
const MIN_DISK_QUEUE_SIZE: u16 = 4;
const MIN_NET_QUEUE_SIZE: u16 = 2;

pub fn validate_disks(disks: &[DiskConfig]) -> Result<(), ConfigError> {
    for (i, disk) in disks.iter().enumerate() {
        let field = |name: &str| format!("disks[{i}].{name}");
        let path = match (&disk.path, &disk.socket) {
            (Some(path), None) => path,
            (None, Some(socket)) => {
                if socket.as_os_str().is_empty() {
                    return Err(ConfigError::invalid(field("socket"), "is empty; give the backend's socket path"));
                }
                if disk.read_only || disk.serial.is_some() || disk.direct {
                    return Err(ConfigError::invalid(
                        format!("disks[{i}]"),
                        "read_only, serial and direct belong to the vhost-user backend when `socket` is given; set them there",
                    ));
                }
                validate_queue_size(field("queue_size"), disk.queue_size, MIN_DISK_QUEUE_SIZE)?;
                continue;
            }
            _ => {
                return Err(ConfigError::invalid(
                    format!("disks[{i}]"),
                    "give exactly one of `path` (a disk image or block device) or `socket` (a vhost-user-blk backend)",
                ))
            }
        };
        match std::fs::metadata(path) {
            // An inherited descriptor: checked with the others (fd.rs).
            _ if super::fd::is_fd_path(path) => {}
            Ok(meta) if meta.is_file() || is_block_device(&meta) => {}
            Ok(_) => {
                return Err(ConfigError::invalid(
                    field("path"),
                    format!(
                        "{} is neither a regular file nor a block device",
                        path.display()
                    ),
                ))
            }
            Err(e) => {
                return Err(ConfigError::invalid(
                    field("path"),
                    format!("cannot open {}: {e}", path.display()),
                ))
            }
        }
        if let Some(serial) = &disk.serial {
            if serial.len() > MAX_SERIAL_LEN || !serial.bytes().all(|b| b.is_ascii_graphic()) {
                return Err(ConfigError::invalid(
                    field("serial"),
                    format!("{serial:?} must be at most {MAX_SERIAL_LEN} printable ASCII characters without spaces"),
                ));
            }
        }
        validate_queue_size(field("queue_size"), disk.queue_size, MIN_DISK_QUEUE_SIZE)?;
    }
    Ok(())
}

fn is_block_device(meta: &std::fs::Metadata) -> bool {
    use std::os::unix::fs::FileTypeExt;
    meta.file_type().is_block_device()
}

pub fn validate_net(nets: &[NetConfig]) -> Result<(), ConfigError> {
    for (i, net) in nets.iter().enumerate() {
        let field = |name: &str| format!("net[{i}].{name}");
        match (&net.tap, net.fd) {
            (Some(_), Some(_)) | (None, None) => {
                return Err(ConfigError::invalid(
                    format!("net[{i}]"),
                    "give exactly one of `tap` (an interface name) or `fd` (an inherited descriptor)",
                ))
            }
            (Some(name), None) if name.is_empty() || name.len() > MAX_IFNAME_LEN || name.contains(['/', ' ']) => {
                return Err(ConfigError::invalid(
                    field("tap"),
                    format!("{name:?} is not an interface name (1 to {MAX_IFNAME_LEN} bytes, no '/' or spaces)"),
                ))
            }
            (None, Some(fd)) if fd < 3 => {
                return Err(ConfigError::invalid(
                    field("fd"),
                    format!("{fd} is not an inherited descriptor: stdin, stdout and stderr are 0 to 2, tap fds start at 3"),
                ))
            }
            _ => {}
        }
        match parse_mac(&net.mac) {
            None => {
                return Err(ConfigError::invalid(
                    field("mac"),
                    format!("{:?} is not a MAC address like 52:54:00:12:34:56", net.mac),
                ))
            }
            Some(mac) if mac[0] & 1 != 0 => {
                return Err(ConfigError::invalid(
                    field("mac"),
                    format!(
                        "{} is a multicast address; the first byte must be even",
                        net.mac
                    ),
                ))
            }
            _ => {}
        }
        if let Some(mtu) = net.mtu {
            if mtu < 68 {
                return Err(ConfigError::invalid(
                    field("mtu"),
                    format!("{mtu} is below 68, the IPv4 minimum"),
                ));
            }
        }
        validate_queue_size(field("queue_size"), net.queue_size, MIN_NET_QUEUE_SIZE)?;
    }
    Ok(())
}

pub fn validate_device_count(disks: usize, nets: usize, shares: usize) -> Result<(), ConfigError> {
    if disks + nets + shares > MAX_VIRTIO_DEVICES {
        return Err(ConfigError::invalid(
            "disks",
            format!("{disks} disks, {nets} network interfaces and {shares} shares are more than the {MAX_VIRTIO_DEVICES} virtio devices a VM can have"),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn share(tag: &str) -> ShareConfig {
        ShareConfig {
            tag: tag.to_owned(),
            socket: "/run/fs.sock".into(),
            queue_size: None,
            num_queues: None,
            connect_timeout_secs: None,
            source: None,
            virtiofsd: None,
        }
    }

    #[test]
    fn share_tags_are_short_and_unique() {
        assert!(validate_shares(&[share("nix-store"), share("journal")]).is_ok());
        assert_eq!(field_of(validate_shares(&[share("")])), "shares[0].tag");
        assert_eq!(
            field_of(validate_shares(&[share(&"t".repeat(37))])),
            "shares[0].tag"
        );
        assert_eq!(
            field_of(validate_shares(&[share("a"), share("a")])),
            "shares[1].tag"
        );
        let mut big = share("a");
        big.queue_size = Some(2048);
        assert_eq!(field_of(validate_shares(&[big])), "shares[0].queue_size");
    }

    #[test]
    fn macs_parse_strictly() {
        assert_eq!(
            parse_mac("52:54:00:12:34:5f"),
            Some([0x52, 0x54, 0, 0x12, 0x34, 0x5f])
        );
        for bad in [
            "52:54:00:12:34",
            "52:54:00:12:34:56:78",
            "52:54:00:12:34:5f:00",
            "5:54:00:12:34:56",
            "zz:54:00:12:34:56",
            "",
        ] {
            assert_eq!(parse_mac(bad), None, "{bad}");
        }
    }

    fn net(tap: Option<&str>, fd: Option<i32>, mac: &str) -> NetConfig {
        NetConfig {
            tap: tap.map(str::to_owned),
            fd,
            mac: mac.to_owned(),
            mtu: None,
            queue_size: None,
        }
    }

    fn field_of(r: Result<(), ConfigError>) -> String {
        match r {
            Err(ConfigError::Invalid { field, .. }) => field,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn nets_need_one_backend_and_a_unicast_mac() {
        assert!(validate_net(&[net(Some("tap0"), None, "52:54:00:00:00:01")]).is_ok());
        assert!(validate_net(&[net(None, Some(5), "52:54:00:00:00:01")]).is_ok());
        assert_eq!(
            field_of(validate_net(&[net(None, None, "52:54:00:00:00:01")])),
            "net[0]"
        );
        assert_eq!(
            field_of(validate_net(&[net(
                Some("t"),
                Some(5),
                "52:54:00:00:00:01"
            )])),
            "net[0]"
        );
        assert_eq!(
            field_of(validate_net(&[net(
                Some("a-very-long-tap-name"),
                None,
                "52:54:00:00:00:01"
            )])),
            "net[0].tap"
        );
        assert_eq!(
            field_of(validate_net(&[net(None, Some(1), "52:54:00:00:00:01")])),
            "net[0].fd"
        );
        assert_eq!(
            field_of(validate_net(&[net(Some("t"), None, "01:00:5e:00:00:01")])),
            "net[0].mac"
        );
    }

    #[test]
    fn disks_check_path_serial_and_queue_size() {
        let file = tempfile::NamedTempFile::new().unwrap();
        let disk = |serial: Option<&str>, queue_size| DiskConfig {
            path: Some(file.path().to_owned()),
            socket: None,
            connect_timeout_secs: None,
            read_only: false,
            serial: serial.map(str::to_owned),
            direct: false,
            queue_size,
        };
        assert!(validate_disks(&[disk(Some("nix-store"), Some(128))]).is_ok());
        assert_eq!(
            field_of(validate_disks(&[disk(Some("x".repeat(21).as_str()), None)])),
            "disks[0].serial"
        );
        assert_eq!(
            field_of(validate_disks(&[disk(Some("has space"), None)])),
            "disks[0].serial"
        );
        assert_eq!(
            field_of(validate_disks(&[disk(None, Some(100))])),
            "disks[0].queue_size"
        );
        assert_eq!(
            field_of(validate_disks(&[disk(None, Some(512))])),
            "disks[0].queue_size"
        );
        let mut dir = disk(None, None);
        dir.path = Some(std::env::temp_dir());
        assert_eq!(field_of(validate_disks(&[dir])), "disks[0].path");
        let mut both = disk(None, None);
        both.socket = Some("/run/blk.sock".into());
        assert_eq!(field_of(validate_disks(&[both])), "disks[0]");
        let mut remote = disk(Some("x"), None);
        remote.path = None;
        remote.socket = Some("/run/blk.sock".into());
        assert_eq!(
            field_of(validate_disks(&[remote])),
            "disks[0]",
            "serial is the backend's"
        );
    }
}
