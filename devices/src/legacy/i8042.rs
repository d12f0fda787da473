//! A minimal i8042 keyboard controller: enough for Linux's probe, and its CPU reset line.
//!
//! The only behaviour that matters to a microVM is the "pulse reset line" command (0xFE written
//! to the command port), which Linux uses with `reboot=k`: it signals `reset_evt` so the VMM ends
//! the VM. Controller self-tests and the configuration byte answer like real hardware so that
//! drivers probing the controller do not time out.

use std::collections::VecDeque;

use vmm_sys_util::eventfd::EventFd;

use crate::bus::BusDevice;

/// Offsets within the device's two-port window: data at 0x60, command/status at 0x64.
pub const DATA_OFFSET: u64 = 0;
pub const COMMAND_OFFSET: u64 = 4;

const CMD_READ_CONFIG: u8 = 0x20;
const CMD_WRITE_CONFIG: u8 = 0x60;
const CMD_DISABLE_AUX: u8 = 0xa7;
const CMD_ENABLE_AUX: u8 = 0xa8;
const CMD_TEST_AUX: u8 = 0xa9;
const CMD_SELF_TEST: u8 = 0xaa;
const CMD_TEST_KBD: u8 = 0xab;
const CMD_DISABLE_KBD: u8 = 0xad;
const CMD_ENABLE_KBD: u8 = 0xae;
const CMD_READ_OUTPUT_PORT: u8 = 0xd0;
const CMD_WRITE_AUX: u8 = 0xd4;
const CMD_PULSE_RESET: u8 = 0xfe;

const STATUS_OUTPUT_FULL: u8 = 0x01;
const STATUS_SYSTEM_FLAG: u8 = 0x04;
const STATUS_LAST_WAS_COMMAND: u8 = 0x08;

const SELF_TEST_OK: u8 = 0x55;
const PORT_TEST_OK: u8 = 0x00;
/// Keyboard and mouse commands are acknowledged but not emulated.
const DEVICE_ACK: u8 = 0xfa;

pub struct I8042Device {
    reset_evt: EventFd,
    config: u8,
    status: u8,
    output: VecDeque<u8>,
    /// A command that takes a data byte on port 0x60 next.
    pending: Option<u8>,
}

impl I8042Device {
    pub fn new(reset_evt: EventFd) -> Self {
        Self {
            reset_evt,
            // Keyboard interrupt enabled, system flag set, translation on: a firmware's default.
            config: 0x45,
            status: STATUS_SYSTEM_FLAG,
            output: VecDeque::new(),
            pending: None,
        }
    }

    fn push_output(&mut self, byte: u8) {
        // Real controllers hold one byte; a short queue keeps the probe sequence simple.
        if self.output.len() < 16 {
            self.output.push_back(byte);
        }
    }

    fn command(&mut self, cmd: u8) {
        match cmd {
            CMD_READ_CONFIG => self.push_output(self.config),
            CMD_WRITE_CONFIG | CMD_WRITE_AUX => self.pending = Some(cmd),
            CMD_SELF_TEST => self.push_output(SELF_TEST_OK),
            CMD_TEST_KBD | CMD_TEST_AUX => self.push_output(PORT_TEST_OK),
            CMD_READ_OUTPUT_PORT => self.push_output(0x01),
            CMD_DISABLE_AUX | CMD_ENABLE_AUX | CMD_DISABLE_KBD | CMD_ENABLE_KBD => {}
            CMD_PULSE_RESET => {
                if let Err(e) = self.reset_evt.write(1) {
                    log::error!("i8042: cannot signal the reset request: {e}");
                }
            }
            other => log::debug!("i8042: ignoring command {other:#x}"),
        }
    }

    fn data(&mut self, value: u8) {
        match self.pending.take() {
            Some(CMD_WRITE_CONFIG) => self.config = value,
            // Bytes for the mouse or the keyboard get an acknowledgement and nothing else.
            _ => self.push_output(DEVICE_ACK),
        }
    }
}

impl BusDevice for I8042Device {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let value = match offset {
            DATA_OFFSET => self.output.pop_front().unwrap_or(0),
            COMMAND_OFFSET => {
                let full = if self.output.is_empty() {
                    0
                } else {
                    STATUS_OUTPUT_FULL
                };
                self.status | full
            }
            _ => 0xff,
        };
        data.fill(0);
        if let Some(first) = data.first_mut() {
            *first = value;
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Some(&value) = data.first() else { return };
        match offset {
            DATA_OFFSET => {
                self.status &= !STATUS_LAST_WAS_COMMAND;
                self.data(value);
            }
            COMMAND_OFFSET => {
                self.status |= STATUS_LAST_WAS_COMMAND;
                self.command(value);
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn device() -> (I8042Device, EventFd) {
        let evt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        (I8042Device::new(evt.try_clone().unwrap()), evt)
    }

    fn read(dev: &mut I8042Device, offset: u64) -> u8 {
        let mut b = [0u8];
        dev.read(offset, &mut b);
        b[0]
    }

    #[test]
    fn pulse_reset_signals_the_vmm() {
        let (mut dev, evt) = device();
        assert!(evt.read().is_err(), "nothing signalled yet");
        dev.write(COMMAND_OFFSET, &[CMD_PULSE_RESET]);
        assert_eq!(evt.read().unwrap(), 1);
    }

    #[test]
    fn answers_the_linux_probe_sequence() {
        let (mut dev, _evt) = device();
        assert_eq!(read(&mut dev, COMMAND_OFFSET) & STATUS_OUTPUT_FULL, 0);
        dev.write(COMMAND_OFFSET, &[CMD_READ_CONFIG]);
        assert_eq!(read(&mut dev, COMMAND_OFFSET) & STATUS_OUTPUT_FULL, 1);
        assert_eq!(read(&mut dev, DATA_OFFSET), 0x45);
        dev.write(COMMAND_OFFSET, &[CMD_WRITE_CONFIG]);
        dev.write(DATA_OFFSET, &[0x47]);
        dev.write(COMMAND_OFFSET, &[CMD_READ_CONFIG]);
        assert_eq!(read(&mut dev, DATA_OFFSET), 0x47);
        dev.write(COMMAND_OFFSET, &[CMD_SELF_TEST]);
        assert_eq!(read(&mut dev, DATA_OFFSET), SELF_TEST_OK);
        dev.write(DATA_OFFSET, &[0xff]);
        assert_eq!(read(&mut dev, DATA_OFFSET), DEVICE_ACK);
    }

    #[test]
    fn output_queue_is_bounded() {
        let (mut dev, _evt) = device();
        for _ in 0..1000 {
            dev.write(COMMAND_OFFSET, &[CMD_SELF_TEST]);
        }
        let mut n = 0;
        while read(&mut dev, COMMAND_OFFSET) & STATUS_OUTPUT_FULL != 0 {
            read(&mut dev, DATA_OFFSET);
            n += 1;
        }
        assert_eq!(n, 16);
    }
}
