//! virtio-blk feature bits and configuration space (virtio 1.2, 5.2.3 and 5.2.4), shared by the
//! in-VMM device and a vhost-user backend.

use std::mem::offset_of;

use virtio_bindings::virtio_blk::virtio_blk_config;

use super::disk::Disk;
use crate::virtio::{VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};

pub const VIRTIO_BLK_F_SEG_MAX: u64 = 1 << virtio_bindings::virtio_blk::VIRTIO_BLK_F_SEG_MAX;
pub const VIRTIO_BLK_F_RO: u64 = 1 << virtio_bindings::virtio_blk::VIRTIO_BLK_F_RO;
pub const VIRTIO_BLK_F_BLK_SIZE: u64 = 1 << virtio_bindings::virtio_blk::VIRTIO_BLK_F_BLK_SIZE;
pub const VIRTIO_BLK_F_FLUSH: u64 = 1 << virtio_bindings::virtio_blk::VIRTIO_BLK_F_FLUSH;
pub const VIRTIO_BLK_F_DISCARD: u64 = 1 << virtio_bindings::virtio_blk::VIRTIO_BLK_F_DISCARD;
pub const VIRTIO_BLK_F_WRITE_ZEROES: u64 =
    1 << virtio_bindings::virtio_blk::VIRTIO_BLK_F_WRITE_ZEROES;

/// The block size the guest sees; requests are always in 512-byte sectors anyway.
pub const BLK_SIZE: u32 = 512;
/// Per-request limits. Hole punching is cheap, so discards may be large; zeroing can fall back
/// to writing zeroes, so keep one request short enough not to stall the disk's queue for long.
pub const MAX_DISCARD_SECTORS: u32 = 1 << 21; // 1 GiB
pub const MAX_WRITE_ZEROES_SECTORS: u32 = 1 << 17; // 64 MiB
/// One range per discard / write-zeroes request: Linux needs no more, and it bounds the work.
pub const MAX_DISCARD_SEG: u32 = 1;
pub const MAX_WRITE_ZEROES_SEG: u32 = 1;

/// Bytes of configuration space we expose: up to `write_zeroes_may_unmap` and its padding
/// (secure erase and zoned fields follow, for features we do not offer).
pub const CONFIG_SPACE_SIZE: usize = offset_of!(virtio_blk_config, max_secure_erase_sectors);

/// Whether the disk can serve discard and write-zeroes requests.
pub fn supports_discard(disk: &Disk, read_only: bool) -> bool {
    !read_only && disk.supports_discard()
}

/// Write zeroes always works on a writable disk: it falls back to writing zero buffers.
pub fn supports_write_zeroes(read_only: bool) -> bool {
    !read_only
}

/// The features the device offers.
pub fn device_features(disk: &Disk, read_only: bool) -> u64 {
    let mut features = VIRTIO_F_VERSION_1
        | VIRTIO_RING_F_EVENT_IDX
        | VIRTIO_RING_F_INDIRECT_DESC
        | VIRTIO_BLK_F_FLUSH
        | VIRTIO_BLK_F_SEG_MAX
        | VIRTIO_BLK_F_BLK_SIZE;
    if read_only {
        features |= VIRTIO_BLK_F_RO;
    }
    if supports_discard(disk, read_only) {
        features |= VIRTIO_BLK_F_DISCARD;
    }
    if supports_write_zeroes(read_only) {
        features |= VIRTIO_BLK_F_WRITE_ZEROES;
    }
    features
}

/// The little-endian configuration space. `queue_size` is the queue's maximum size: a request
/// needs a header and a status descriptor besides its data segments.
pub fn config_space(disk: &Disk, read_only: bool, queue_size: u16) -> [u8; CONFIG_SPACE_SIZE] {
    let mut config = [0u8; CONFIG_SPACE_SIZE];
    let mut put = |offset: usize, bytes: &[u8]| {
        config[offset..offset + bytes.len()].copy_from_slice(bytes);
    };
    put(
        offset_of!(virtio_blk_config, capacity),
        &disk.capacity().to_le_bytes(),
    );
    let seg_max = u32::from(queue_size.saturating_sub(2)).max(1);
    put(
        offset_of!(virtio_blk_config, seg_max),
        &seg_max.to_le_bytes(),
    );
    put(
        offset_of!(virtio_blk_config, blk_size),
        &BLK_SIZE.to_le_bytes(),
    );
    if supports_discard(disk, read_only) {
        put(
            offset_of!(virtio_blk_config, max_discard_sectors),
            &MAX_DISCARD_SECTORS.to_le_bytes(),
        );
        put(
            offset_of!(virtio_blk_config, max_discard_seg),
            &MAX_DISCARD_SEG.to_le_bytes(),
        );
        put(
            offset_of!(virtio_blk_config, discard_sector_alignment),
            &disk.discard_alignment().to_le_bytes(),
        );
    }
    if supports_write_zeroes(read_only) {
        put(
            offset_of!(virtio_blk_config, max_write_zeroes_sectors),
            &MAX_WRITE_ZEROES_SECTORS.to_le_bytes(),
        );
        put(
            offset_of!(virtio_blk_config, max_write_zeroes_seg),
            &MAX_WRITE_ZEROES_SEG.to_le_bytes(),
        );
        // With UNMAP set, zeroing punches a hole when the disk can.
        put(
            offset_of!(virtio_blk_config, write_zeroes_may_unmap),
            &[u8::from(disk.supports_discard())],
        );
    }
    config
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn disk(sectors: u64, writable: bool) -> Disk {
        let mut tmp = tempfile::tempfile().unwrap();
        tmp.write_all(&vec![1u8; (sectors * 512) as usize]).unwrap();
        Disk::new(tmp, writable, false).unwrap()
    }

    fn le32(config: &[u8], offset: usize) -> u32 {
        u32::from_le_bytes(config[offset..offset + 4].try_into().unwrap())
    }

    #[test]
    fn layout_matches_the_spec() {
        // Offsets from virtio 1.2, 5.2.4.
        assert_eq!(offset_of!(virtio_blk_config, seg_max), 12);
        assert_eq!(offset_of!(virtio_blk_config, blk_size), 20);
        assert_eq!(offset_of!(virtio_blk_config, max_discard_sectors), 36);
        assert_eq!(offset_of!(virtio_blk_config, max_write_zeroes_sectors), 48);
        assert_eq!(offset_of!(virtio_blk_config, write_zeroes_may_unmap), 56);
        assert_eq!(CONFIG_SPACE_SIZE, 60);
    }

    #[test]
    fn writable_config() {
        let d = disk(16, true);
        let c = config_space(&d, false, 256);
        assert_eq!(u64::from_le_bytes(c[0..8].try_into().unwrap()), 16);
        assert_eq!(le32(&c, 12), 254);
        assert_eq!(le32(&c, 20), 512);
        assert_eq!(le32(&c, 48), MAX_WRITE_ZEROES_SECTORS);
        assert_eq!(le32(&c, 52), 1);
        if d.supports_discard() {
            assert_eq!(le32(&c, 36), MAX_DISCARD_SECTORS);
            assert_eq!(le32(&c, 40), 1);
            assert!(le32(&c, 44) >= 1);
            assert_eq!(c[56], 1);
        }
        let f = device_features(&d, false);
        assert_ne!(f & VIRTIO_F_VERSION_1, 0);
        assert_ne!(f & VIRTIO_RING_F_EVENT_IDX, 0);
        assert_ne!(f & VIRTIO_RING_F_INDIRECT_DESC, 0);
        assert_ne!(f & VIRTIO_BLK_F_FLUSH, 0);
        assert_ne!(f & VIRTIO_BLK_F_SEG_MAX, 0);
        assert_ne!(f & VIRTIO_BLK_F_BLK_SIZE, 0);
        assert_ne!(f & VIRTIO_BLK_F_WRITE_ZEROES, 0);
        assert_eq!(f & VIRTIO_BLK_F_RO, 0);
        assert_eq!(f & VIRTIO_BLK_F_DISCARD != 0, d.supports_discard());
    }

    #[test]
    fn read_only_config() {
        let d = disk(4, false);
        let c = config_space(&d, true, 128);
        assert_eq!(le32(&c, 12), 126);
        assert!(c[36..60].iter().all(|&b| b == 0));
        let f = device_features(&d, true);
        assert_ne!(f & VIRTIO_BLK_F_RO, 0);
        assert_eq!(f & (VIRTIO_BLK_F_DISCARD | VIRTIO_BLK_F_WRITE_ZEROES), 0);
    }
}
