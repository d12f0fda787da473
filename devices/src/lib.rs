//! Device models for mvmm: legacy PC devices and (later) virtio devices.
//!
//! Devices know nothing about the VMM's configuration: they take plain parameters (fds, sizes,
//! eventfds, guest memory), so the VMM, a vhost-user backend or a test harness can drive them.

pub mod backend;
pub mod bus;
pub mod legacy;
pub mod threads;
pub mod virtio;

pub use bus::{Bus, BusDevice, BusError};
