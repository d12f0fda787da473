//! Legacy PC devices: the 8250 UART, the i8042 reset line and keyboard, the ACPI sleep
//! register and the ACPI Generic Event Device's register (the power button).

mod acpi_sleep;
mod ged;
mod i8042;
mod serial;

pub use acpi_sleep::AcpiSleepControl;
pub use ged::{GedDevice, GED_EVENT_POWER_BUTTON, GED_REGISTER_LEN};
pub use i8042::{I8042Device, I8042Error};
pub use serial::{EventFdTrigger, SerialDevice};
