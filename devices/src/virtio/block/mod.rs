//! virtio-blk (being written).
