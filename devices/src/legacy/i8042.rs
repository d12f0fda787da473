//! A minimal i8042 keyboard controller: enough for Linux's probe, its CPU reset line, and a
//! Ctrl-Alt-Del key press.
//!
//! The "pulse reset line" command (0xFE written to the command port), which Linux uses with
//! `reboot=k`, signals `reset_evt` so the VMM ends the VM. Without ACPI, the VMM asks the guest
//! to shut down by typing Ctrl-Alt-Del ([`I8042Device::trigger_ctrl_alt_del`]): Linux reboots on
//! it, and the reboot comes back through the reset line. Controller self-tests and the
//! configuration byte answer like real hardware so that drivers probing the controller do not
//! time out.

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

/// Configuration byte bits: keyboard interrupt enabled, scancode translation to set 1.
const CONFIG_KBD_INT: u8 = 0x01;
const CONFIG_TRANSLATE: u8 = 0x40;

const STATUS_OUTPUT_FULL: u8 = 0x01;
const STATUS_SYSTEM_FLAG: u8 = 0x04;
const STATUS_LAST_WAS_COMMAND: u8 = 0x08;

const SELF_TEST_OK: u8 = 0x55;
const PORT_TEST_OK: u8 = 0x00;
/// Keyboard and mouse commands are acknowledged but not emulated.
const DEVICE_ACK: u8 = 0xfa;

/// The output queue's bound: real controllers hold one byte; a short queue keeps the probe
/// sequence simple and fits a whole key sequence.
const OUTPUT_CAPACITY: usize = 16;

/// Ctrl, Alt and Delete pressed, then released, in scancode set 1 (what the guest reads when
/// the controller translates, the PC default) and set 2 (translation off).
const CTRL_ALT_DEL_SET1: &[u8] = &[0x1d, 0x38, 0xe0, 0x53, 0xe0, 0xd3, 0xb8, 0x9d];
const CTRL_ALT_DEL_SET2: &[u8] = &[
    0x14, 0x11, 0xe0, 0x71, 0xe0, 0xf0, 0x71, 0xf0, 0x11, 0xf0, 0x14,
];

#[derive(Debug, thiserror::Error)]
pub enum I8042Error {
    #[error("the guest has not read the keyboard's earlier output; no room for the key sequence")]
    OutputFull,
    #[error("cannot raise the keyboard interrupt: {0}")]
    Interrupt(std::io::Error),
}

/// One byte waiting in the output buffer, and whether it came from the keyboard (key bytes
/// raise IRQ 1; command replies are polled by the driver).
#[derive(Clone, Copy)]
struct OutputByte {
    value: u8,
    key: bool,
}

pub struct I8042Device {
    reset_evt: EventFd,
    /// Registered with KVM as an irqfd on IRQ 1, if the VMM wired one.
    irq: Option<EventFd>,
    config: u8,
    status: u8,
    output: VecDeque<OutputByte>,
    /// A command that takes a data byte on port 0x60 next.
    pending: Option<u8>,
}

impl I8042Device {
    pub fn new(reset_evt: EventFd) -> Self {
        Self {
            reset_evt,
            irq: None,
            // Keyboard interrupt enabled, system flag set, translation on: a firmware's default.
            config: 0x45,
            status: STATUS_SYSTEM_FLAG,
            output: VecDeque::new(),
            pending: None,
        }
    }

    /// Wires the keyboard interrupt (IRQ 1), needed for injected key presses.
    pub fn with_interrupt(mut self, irq: EventFd) -> Self {
        self.irq = Some(irq);
        self
    }

    /// Types Ctrl-Alt-Del (press and release) and raises the keyboard interrupt.
    pub fn trigger_ctrl_alt_del(&mut self) -> Result<(), I8042Error> {
        let keys = if self.config & CONFIG_TRANSLATE != 0 {
            CTRL_ALT_DEL_SET1
        } else {
            CTRL_ALT_DEL_SET2
        };
        if OUTPUT_CAPACITY - self.output.len() < keys.len() {
            return Err(I8042Error::OutputFull);
        }
        let was_empty = self.output.is_empty();
        self.output
            .extend(keys.iter().map(|&value| OutputByte { value, key: true }));
        // With bytes already waiting, the interrupt comes when the guest reaches the keys.
        if was_empty {
            self.key_interrupt()?;
        }
        Ok(())
    }

    /// Raises IRQ 1 when a key byte is next in the output buffer and the guest enabled the
    /// keyboard interrupt. Linux reads one byte per interrupt, so this runs again after each.
    fn key_interrupt(&self) -> Result<(), I8042Error> {
        let next_is_key = self.output.front().is_some_and(|b| b.key);
        match &self.irq {
            Some(irq) if next_is_key && self.config & CONFIG_KBD_INT != 0 => {
                irq.write(1).map_err(I8042Error::Interrupt)
            }
            _ => Ok(()),
        }
    }

    fn push_output(&mut self, byte: u8) {
        if self.output.len() < OUTPUT_CAPACITY {
            self.output.push_back(OutputByte {
                value: byte,
                key: false,
            });
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
            DATA_OFFSET => {
                let byte = self.output.pop_front().map_or(0, |b| b.value);
                if let Err(e) = self.key_interrupt() {
                    log::warn!("i8042: {e}");
                }
                byte
            }
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

    fn drain(dev: &mut I8042Device) -> Vec<u8> {
        let mut bytes = Vec::new();
        while read(dev, COMMAND_OFFSET) & STATUS_OUTPUT_FULL != 0 {
            bytes.push(read(dev, DATA_OFFSET));
        }
        bytes
    }

    #[test]
    fn ctrl_alt_del_is_typed_with_one_interrupt_per_byte() {
        let (dev, _reset) = device();
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut dev = dev.with_interrupt(irq.try_clone().unwrap());
        dev.trigger_ctrl_alt_del().unwrap();
        let mut bytes = Vec::new();
        // The guest reads one byte per interrupt, as Linux's i8042 driver does.
        while irq.read().is_ok() {
            bytes.push(read(&mut dev, DATA_OFFSET));
        }
        assert_eq!(bytes, CTRL_ALT_DEL_SET1, "translated (set 1) by default");
        assert_eq!(read(&mut dev, COMMAND_OFFSET) & STATUS_OUTPUT_FULL, 0);

        // Translation off: set 2 codes. Interrupts off: the bytes wait for a poll.
        dev.write(COMMAND_OFFSET, &[CMD_WRITE_CONFIG]);
        dev.write(DATA_OFFSET, &[0x04]);
        dev.trigger_ctrl_alt_del().unwrap();
        assert!(irq.read().is_err(), "keyboard interrupt disabled");
        assert_eq!(drain(&mut dev), CTRL_ALT_DEL_SET2);
    }

    #[test]
    fn key_bytes_queue_behind_a_command_reply() {
        let (dev, _reset) = device();
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut dev = dev.with_interrupt(irq.try_clone().unwrap());
        dev.write(COMMAND_OFFSET, &[CMD_SELF_TEST]);
        dev.trigger_ctrl_alt_del().unwrap();
        assert!(irq.read().is_err(), "the reply is polled, not interrupted");
        assert_eq!(read(&mut dev, DATA_OFFSET), SELF_TEST_OK);
        assert_eq!(irq.read().unwrap(), 1, "the first key byte is next");
        assert_eq!(drain(&mut dev), CTRL_ALT_DEL_SET1);
    }

    #[test]
    fn a_guest_that_never_reads_fills_up_without_panicking() {
        let (mut dev, _reset) = device();
        dev.trigger_ctrl_alt_del().unwrap();
        dev.trigger_ctrl_alt_del().unwrap();
        assert!(matches!(
            dev.trigger_ctrl_alt_del(),
            Err(I8042Error::OutputFull)
        ));
        assert_eq!(drain(&mut dev), CTRL_ALT_DEL_SET1.repeat(2));
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
