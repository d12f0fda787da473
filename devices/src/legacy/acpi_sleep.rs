//! The hardware-reduced ACPI sleep control/status register pair, one I/O port.
//!
//! The FADT points SLEEP_CONTROL_REG and SLEEP_STATUS_REG here. Linux powers off by writing
//! SLP_EN with the `_S5_` sleep type; we turn that into a poweroff request for the VMM.

use vmm_sys_util::eventfd::EventFd;

use crate::bus::BusDevice;

/// Sleep type value the DSDT's `_S5_` object advertises.
pub const S5_SLEEP_TYPE: u8 = 5;
const SLP_EN: u8 = 1 << 5;
const SLP_TYP_SHIFT: u8 = 2;
const SLP_TYP_MASK: u8 = 0b111;

pub struct AcpiSleepControl {
    poweroff_evt: EventFd,
}

impl AcpiSleepControl {
    pub fn new(poweroff_evt: EventFd) -> Self {
        Self { poweroff_evt }
    }
}

impl BusDevice for AcpiSleepControl {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        // Status: never asleep, nothing to report.
        data.fill(0);
    }

    fn write(&mut self, _offset: u64, data: &[u8]) {
        let Some(&value) = data.first() else { return };
        let sleep_type = (value >> SLP_TYP_SHIFT) & SLP_TYP_MASK;
        if value & SLP_EN != 0 && sleep_type == S5_SLEEP_TYPE {
            if let Err(e) = self.poweroff_evt.write(1) {
                log::error!("acpi: cannot signal the poweroff request: {e}");
            }
        } else if value & SLP_EN != 0 {
            log::warn!("acpi: guest asked for unsupported sleep state S{sleep_type}; ignored");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn s5_requests_poweroff_other_states_do_not() {
        let evt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut dev = AcpiSleepControl::new(evt.try_clone().unwrap());
        dev.write(0, &[SLP_EN | (3 << SLP_TYP_SHIFT)]);
        dev.write(0, &[S5_SLEEP_TYPE << SLP_TYP_SHIFT]);
        assert!(evt.read().is_err());
        dev.write(0, &[SLP_EN | (S5_SLEEP_TYPE << SLP_TYP_SHIFT)]);
        assert_eq!(evt.read().unwrap(), 1);
    }
}
