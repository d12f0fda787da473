//! The control socket (`api_socket` in the config): JSON lines over a Unix stream socket,
//! served from the main event loop. `mvmm ctl` (src/ctl.rs) is its client.

mod protocol;
mod server;
mod status;

pub use protocol::{Request, VmState};
pub use server::{ApiError, ApiServer, StatusInfo, VmControl};
pub use status::{DeviceReport, DeviceSource};

#[cfg(test)]
mod tests;
