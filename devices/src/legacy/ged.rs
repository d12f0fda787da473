//! The event register of an ACPI Generic Event Device (GED, `ACPI0013`): how the VMM presses
//! the guest's power button on a hardware-reduced ACPI machine.
//!
//! The DSDT gives the GED one edge-triggered interrupt and an `_EVT` method. On that interrupt
//! Linux's evged driver runs `_EVT`, which reads this register through an OperationRegion and
//! `Notify`s the power button device (`PNP0C0C`) for each bit set; the ACPI button driver turns
//! that into a KEY_POWER press, and systemd-logind powers the guest off.
//!
//! Register layout (one byte, read-only): bit 0 = the power button was pressed. Reading returns
//! the events pending since the last read and clears them, so each press is reported once.
//! Guests without an ACPI interpreter (the test guest) can poll it the same way.

use vmm_sys_util::eventfd::EventFd;

use crate::bus::BusDevice;

/// Register bit: the power button was pressed.
pub const GED_EVENT_POWER_BUTTON: u8 = 1 << 0;
/// Size of the register window.
pub const GED_REGISTER_LEN: u64 = 1;

pub struct GedDevice {
    /// Registered with KVM as an irqfd on the GED's interrupt line.
    irq: EventFd,
    pending: u8,
}

impl GedDevice {
    pub fn new(irq: EventFd) -> Self {
        Self { irq, pending: 0 }
    }

    /// Latches a power button press and interrupts the guest.
    pub fn press_power_button(&mut self) -> std::io::Result<()> {
        self.pending |= GED_EVENT_POWER_BUTTON;
        self.irq.write(1)
    }

    /// Events latched and not yet read by the guest.
    pub fn pending(&self) -> u8 {
        self.pending
    }
}

impl BusDevice for GedDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if offset != 0 {
            return;
        }
        if let Some(first) = data.first_mut() {
            *first = std::mem::take(&mut self.pending);
        }
    }

    fn write(&mut self, _offset: u64, _data: &[u8]) {
        // Read-only: AML and guests only read it.
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(dev: &mut GedDevice, offset: u64) -> u8 {
        let mut b = [0xffu8; 4];
        dev.read(offset, &mut b);
        assert_eq!(b[1..], [0, 0, 0], "upper bytes read as zero");
        b[0]
    }

    #[test]
    fn press_interrupts_and_is_reported_once() {
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut dev = GedDevice::new(irq.try_clone().unwrap());
        assert_eq!(read(&mut dev, 0), 0);
        assert!(irq.read().is_err(), "no interrupt before a press");

        dev.press_power_button().unwrap();
        assert_eq!(irq.read().unwrap(), 1);
        assert_eq!(dev.pending(), GED_EVENT_POWER_BUTTON);
        assert_eq!(read(&mut dev, 0), GED_EVENT_POWER_BUTTON);
        assert_eq!(read(&mut dev, 0), 0, "reading clears the event");

        // Two presses before the guest looks are one event; writes change nothing.
        dev.press_power_button().unwrap();
        dev.press_power_button().unwrap();
        dev.write(0, &[0]);
        assert_eq!(read(&mut dev, 1), 0, "only offset 0 is the register");
        assert_eq!(read(&mut dev, 0), GED_EVENT_POWER_BUTTON);
        assert_eq!(irq.read().unwrap(), 2);
    }
}
