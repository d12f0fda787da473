//! Creates the virtio device models the config asks for: opens disk files and taps.
//! Everything here fails with the config field to fix.

use std::fs::OpenOptions;
use std::os::unix::fs::OpenOptionsExt;

use devices::virtio::block::{Block, BlockConfig};

use crate::config::{DiskConfig, MAX_QUEUE_SIZE};

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
}

/// Opens disk `index` as the config describes and builds its virtio-blk device.
pub fn create_block(index: usize, disk: &DiskConfig) -> Result<Block, VirtioDeviceError> {
    let mut options = OpenOptions::new();
    options.read(true).write(!disk.read_only);
    if disk.direct {
        options.custom_flags(libc::O_DIRECT);
    }
    let file = options
        .open(&disk.path)
        .map_err(|source| VirtioDeviceError::OpenDisk {
            index,
            path: disk.path.display().to_string(),
            source,
        })?;
    Block::new(BlockConfig {
        file,
        read_only: disk.read_only,
        serial: disk.serial.clone(),
        direct: disk.direct,
        queue_size: disk.queue_size.unwrap_or(MAX_QUEUE_SIZE),
    })
    .map_err(|source| VirtioDeviceError::Block { index, source })
}
