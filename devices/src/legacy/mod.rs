//! Legacy PC devices: the 8250 UART, the i8042 reset line and the ACPI sleep register.

mod acpi_sleep;
mod i8042;
mod serial;

pub use acpi_sleep::AcpiSleepControl;
pub use i8042::I8042Device;
pub use serial::{EventFdTrigger, SerialDevice};
