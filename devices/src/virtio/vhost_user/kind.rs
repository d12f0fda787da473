//! The personalities of a vhost-user device: what the guest sees besides the queues.
//!
//! A kind decides the virtio device ID, which of the backend's feature bits reach the guest, how
//! many queues there are, and where the configuration space comes from.

use std::path::Path;

use virtio_bindings::virtio_blk;

use super::Error;
use crate::virtio::block::CONFIG_SPACE_SIZE as BLK_CONFIG_SIZE;
use crate::virtio::{
    TYPE_BLOCK, TYPE_FS, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC,
};

/// The longest virtio-fs tag (virtio 1.2, 5.11.4).
pub const FS_TAG_MAX_LEN: usize = 36;
/// virtio-fs configuration space: `tag[36]` and `num_request_queues` (le32).
const FS_CONFIG_SIZE: usize = FS_TAG_MAX_LEN + 4;
/// Offset of `num_queues` (le16) in virtio-blk's configuration space.
const BLK_NUM_QUEUES_OFFSET: usize = 34;

/// Transport-level feature bits any vhost-user backend may offer the guest. Packed rings,
/// NOTIFICATION_DATA and the like are left out: the transport and the ioeventfds do not
/// support them.
const TRANSPORT_FEATURES: u64 =
    VIRTIO_F_VERSION_1 | VIRTIO_RING_F_INDIRECT_DESC | VIRTIO_RING_F_EVENT_IDX;

/// virtio-blk device features a backend may offer. CONFIG_WCE is left out (writes to the
/// configuration space are not forwarded), and so is ZONED.
const BLK_FEATURES: u64 = (1 << virtio_blk::VIRTIO_BLK_F_SIZE_MAX)
    | (1 << virtio_blk::VIRTIO_BLK_F_SEG_MAX)
    | (1 << virtio_blk::VIRTIO_BLK_F_GEOMETRY)
    | (1 << virtio_blk::VIRTIO_BLK_F_RO)
    | (1 << virtio_blk::VIRTIO_BLK_F_BLK_SIZE)
    | (1 << virtio_blk::VIRTIO_BLK_F_FLUSH)
    | (1 << virtio_blk::VIRTIO_BLK_F_TOPOLOGY)
    | (1 << virtio_blk::VIRTIO_BLK_F_MQ)
    | (1 << virtio_blk::VIRTIO_BLK_F_DISCARD)
    | (1 << virtio_blk::VIRTIO_BLK_F_WRITE_ZEROES);
const BLK_F_MQ: u64 = 1 << virtio_blk::VIRTIO_BLK_F_MQ;

/// What the backend behind the socket implements.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VhostUserKind {
    /// virtio-fs (e.g. virtiofsd): one high-priority queue plus the request queues. `tag` is
    /// the name the guest mounts, at most 36 bytes.
    Fs { tag: String },
    /// virtio-blk: the backend provides the configuration space (capacity, block size...).
    Block,
}

impl VhostUserKind {
    pub fn device_type(&self) -> u32 {
        match self {
            VhostUserKind::Fs { .. } => TYPE_FS,
            VhostUserKind::Block => TYPE_BLOCK,
        }
    }

    /// A short label for log lines and thread names.
    pub(super) fn label(&self, socket: &Path) -> String {
        match self {
            VhostUserKind::Fs { tag } => tag.clone(),
            VhostUserKind::Block => socket
                .file_name()
                .map_or_else(|| "blk".into(), |n| n.to_string_lossy().into_owned()),
        }
    }

    pub(super) fn validate(&self) -> Result<(), Error> {
        match self {
            VhostUserKind::Fs { tag } if tag.is_empty() || tag.len() > FS_TAG_MAX_LEN => {
                Err(Error::FsTag(tag.clone()))
            }
            VhostUserKind::Fs { tag } if tag.contains('\0') => Err(Error::FsTag(tag.clone())),
            _ => Ok(()),
        }
    }

    /// Device feature bits (0-23) and transport bits the guest may see.
    fn feature_mask(&self) -> u64 {
        match self {
            // VIRTIO_FS_F_NOTIFICATION needs a notification queue, which the device lacks.
            VhostUserKind::Fs { .. } => TRANSPORT_FEATURES,
            VhostUserKind::Block => TRANSPORT_FEATURES | BLK_FEATURES,
        }
    }

    /// The number of queues, from the configured count (`None` for the default) and the
    /// backend's maximum (`None` when it has no MQ protocol feature).
    pub(super) fn queue_count(
        &self,
        configured: Option<u16>,
        backend_max: Option<u64>,
        socket: &Path,
    ) -> Result<usize, Error> {
        let (wanted, what) = match self {
            VhostUserKind::Fs { .. } => {
                let requests = configured.unwrap_or(1);
                if requests == 0 {
                    return Err(Error::QueueCount {
                        what: "virtio-fs request queues",
                        count: 0,
                    });
                }
                (
                    1 + usize::from(requests),
                    "virtio-fs queues (1 + request queues)",
                )
            }
            VhostUserKind::Block => {
                let default = backend_max.map_or(1, |max| max.max(1) as usize);
                let queues = configured.map_or(default, usize::from);
                if queues == 0 {
                    return Err(Error::QueueCount {
                        what: "virtio-blk queues",
                        count: 0,
                    });
                }
                (queues, "virtio-blk queues")
            }
        };
        match backend_max {
            Some(max) if wanted as u64 > max => Err(Error::BackendQueues {
                path: socket.to_path_buf(),
                what,
                wanted,
                max,
            }),
            _ => Ok(wanted),
        }
    }

    /// The features offered to the guest, from the backend's.
    pub(super) fn offered_features(&self, backend: u64, queues: usize) -> u64 {
        let mut features = backend & self.feature_mask();
        if matches!(self, VhostUserKind::Block) && queues <= 1 {
            features &= !BLK_F_MQ;
        }
        features | VIRTIO_F_VERSION_1
    }

    /// The size of the configuration space to ask the backend for.
    pub(super) fn config_size(&self) -> usize {
        match self {
            VhostUserKind::Fs { .. } => FS_CONFIG_SIZE,
            VhostUserKind::Block => BLK_CONFIG_SIZE,
        }
    }

    /// The configuration space: `backend` is the backend's (GET_CONFIG), when it gave one.
    pub(super) fn config_space(
        &self,
        backend: Option<Vec<u8>>,
        queues: usize,
        features: u64,
        socket: &Path,
    ) -> Result<Vec<u8>, Error> {
        match self {
            VhostUserKind::Fs { tag } => {
                let request_queues = u32::try_from(queues.saturating_sub(1)).unwrap_or(u32::MAX);
                let mut config = match backend {
                    Some(config) if config.len() == FS_CONFIG_SIZE => {
                        let theirs = &config[..FS_TAG_MAX_LEN];
                        let theirs =
                            &theirs[..theirs.iter().position(|&b| b == 0).unwrap_or(theirs.len())];
                        if theirs != tag.as_bytes() {
                            log::warn!(
                                "vhost-user-fs {}: the backend calls the file system {:?}, the guest sees that tag instead of {tag:?}",
                                socket.display(),
                                String::from_utf8_lossy(theirs)
                            );
                        }
                        config
                    }
                    _ => {
                        let mut config = vec![0u8; FS_CONFIG_SIZE];
                        config[..tag.len()].copy_from_slice(tag.as_bytes());
                        config
                    }
                };
                // The guest must not look for more queues than the transport has.
                config[FS_TAG_MAX_LEN..].copy_from_slice(&request_queues.to_le_bytes());
                Ok(config)
            }
            VhostUserKind::Block => {
                let mut config = backend.ok_or_else(|| Error::NoBackendConfig {
                    path: socket.to_path_buf(),
                })?;
                if features & BLK_F_MQ != 0 && config.len() >= BLK_NUM_QUEUES_OFFSET + 2 {
                    let queues = u16::try_from(queues).unwrap_or(u16::MAX);
                    config[BLK_NUM_QUEUES_OFFSET..BLK_NUM_QUEUES_OFFSET + 2]
                        .copy_from_slice(&queues.to_le_bytes());
                }
                Ok(config)
            }
        }
    }

    /// Checks that the backend can serve `queues` queues with the guest's features.
    pub(super) fn check_backend(
        &self,
        backend_features: u64,
        queues: usize,
        socket: &Path,
    ) -> Result<(), Error> {
        if matches!(self, VhostUserKind::Block) && queues > 1 && backend_features & BLK_F_MQ == 0 {
            return Err(Error::BackendQueues {
                path: socket.to_path_buf(),
                what: "virtio-blk queues (the backend lacks VIRTIO_BLK_F_MQ)",
                wanted: queues,
                max: 1,
            });
        }
        Ok(())
    }
}
