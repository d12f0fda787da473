//! The event loop's subscribers: VM lifecycle events (reset, poweroff, vCPU stops, signals)
//! and console input.

use std::io::Read;
use std::os::fd::AsRawFd;
use std::sync::mpsc::Receiver;
use std::sync::{Arc, Mutex};

use devices::legacy::SerialDevice;
use event_manager::{EventOps, Events, MutEventSubscriber};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use super::signals::{signal_name, StopSignals};
use super::vcpu::VcpuStop;

/// How the VM ended, decided by the first event that ends it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmExit {
    /// The guest reset the machine (i8042, KVM reset event).
    Reset,
    /// The guest powered off (ACPI S5, KVM shutdown event).
    Poweroff,
    /// SIGTERM or SIGINT.
    Signal(libc::c_int),
    /// A vCPU stopped for another reason: a guest crash or a KVM error.
    Vcpu(u8, VcpuStop),
}

impl VmExit {
    /// 0 for a clean end, 1 for a crash or a VMM error (see README, "Exit codes").
    pub fn exit_code(&self) -> i32 {
        match self {
            VmExit::Reset | VmExit::Poweroff | VmExit::Signal(_) => 0,
            VmExit::Vcpu(_, VcpuStop::Reset | VcpuStop::Poweroff) => 0,
            VmExit::Vcpu(..) => 1,
        }
    }

    pub fn describe(&self) -> String {
        match self {
            VmExit::Reset => "guest requested a reset; VM stopped".into(),
            VmExit::Poweroff => "guest powered off".into(),
            VmExit::Signal(sig) => format!("stopped by {}", signal_name(*sig)),
            VmExit::Vcpu(i, stop) => match stop {
                VcpuStop::Reset => format!("vCPU {i}: guest requested a reset; VM stopped"),
                VcpuStop::Poweroff => format!("vCPU {i}: guest powered off"),
                VcpuStop::TripleFault { rip } => {
                    format!("vCPU {i}: guest crashed: triple fault (KVM_EXIT_SHUTDOWN) at rip={rip:#x}")
                }
                VcpuStop::InternalError { suberror, rip } => format!(
                    "vCPU {i}: guest crashed: KVM internal error (KVM_EXIT_INTERNAL_ERROR, suberror {suberror}{}) at rip={rip:#x}",
                    if *suberror == 1 { ": instruction emulation failed" } else { "" }
                ),
                VcpuStop::FailEntry { reason, rip } => format!(
                    "vCPU {i}: VM entry failed (KVM_EXIT_FAIL_ENTRY, hardware reason {reason:#x}) at rip={rip:#x}"
                ),
                VcpuStop::Error(msg) => format!("vCPU {i}: {msg}"),
            },
        }
    }
}

/// Watches everything that can end the VM.
pub struct Lifecycle {
    reset_evt: EventFd,
    poweroff_evt: EventFd,
    vcpu_wakeup: Arc<EventFd>,
    vcpu_stops: Receiver<(u8, VcpuStop)>,
    signals: StopSignals,
    outcome: Option<VmExit>,
}

impl Lifecycle {
    pub fn new(
        reset_evt: EventFd,
        poweroff_evt: EventFd,
        vcpu_wakeup: Arc<EventFd>,
        vcpu_stops: Receiver<(u8, VcpuStop)>,
        signals: StopSignals,
    ) -> Self {
        Self {
            reset_evt,
            poweroff_evt,
            vcpu_wakeup,
            vcpu_stops,
            signals,
            outcome: None,
        }
    }

    pub fn outcome(&self) -> Option<&VmExit> {
        self.outcome.as_ref()
    }

    fn finish(&mut self, exit: VmExit) {
        // The first cause wins; later ones (other vCPUs stopping) are consequences.
        if self.outcome.is_none() {
            self.outcome = Some(exit);
        }
    }
}

impl MutEventSubscriber for Lifecycle {
    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        let fd = events.fd();
        if fd == self.reset_evt.as_raw_fd() {
            let _ = self.reset_evt.read();
            self.finish(VmExit::Reset);
        } else if fd == self.poweroff_evt.as_raw_fd() {
            let _ = self.poweroff_evt.read();
            self.finish(VmExit::Poweroff);
        } else if fd == self.vcpu_wakeup.as_raw_fd() {
            let _ = self.vcpu_wakeup.read();
            while let Ok((index, stop)) = self.vcpu_stops.try_recv() {
                self.finish(VmExit::Vcpu(index, stop));
            }
        } else if fd == self.signals.as_raw_fd() {
            if let Some(sig) = self.signals.read() {
                self.finish(VmExit::Signal(sig));
            }
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        let fds = [
            self.reset_evt.as_raw_fd(),
            self.poweroff_evt.as_raw_fd(),
            self.vcpu_wakeup.as_raw_fd(),
            self.signals.as_raw_fd(),
        ];
        for fd in fds {
            if let Err(e) = ops.add(Events::new_raw(fd, EventSet::IN)) {
                log::error!("event loop: cannot watch lifecycle fd {fd}: {e:?}");
            }
        }
    }
}

/// Feeds the host terminal's input to the UART.
pub struct ConsoleInput {
    stdin: std::io::Stdin,
    serial: Arc<Mutex<SerialDevice>>,
}

impl ConsoleInput {
    pub fn new(serial: Arc<Mutex<SerialDevice>>) -> Self {
        Self {
            stdin: std::io::stdin(),
            serial,
        }
    }
}

impl MutEventSubscriber for ConsoleInput {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let mut buf = [0u8; 64];
        let n = match self.stdin.lock().read(&mut buf) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => return,
            Err(e) => {
                log::warn!("console: cannot read stdin: {e}; console input disabled");
                0
            }
        };
        if n == 0 {
            // End of input: stop watching, or epoll would report it forever.
            let _ = ops.remove(events);
            return;
        }
        let mut serial = self.serial.lock().unwrap_or_else(|p| p.into_inner());
        let taken = serial.enqueue_input(&buf[..n]);
        if taken < n {
            log::debug!(
                "console: guest is not reading input; dropped {} bytes",
                n - taken
            );
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        let fd = std::io::stdin().as_raw_fd();
        if let Err(e) = ops.add(Events::new_raw(fd, EventSet::IN)) {
            log::warn!("console: cannot watch stdin: {e:?}");
        }
    }
}
