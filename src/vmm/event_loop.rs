//! The event loop's subscribers: VM lifecycle events (reset, poweroff, vCPU stops, stop
//! signals, the shutdown grace timer) and console input.
//!
//! Graceful shutdown: the first SIGTERM or SIGINT (or the control socket's `shutdown`) presses
//! the guest's power button — the ACPI GED button, or Ctrl-Alt-Del on the i8042 without ACPI —
//! and arms a timer for `machine.shutdown_timeout_secs`. The guest's poweroff or reset then
//! ends the VM cleanly (exit 0); the timer, or a second stop signal, forces the stop (exit 1).
//! A grace period of 0 stops the VM at once (exit 0), without asking the guest.

use std::io::Read;
use std::os::fd::AsRawFd;
use std::sync::mpsc::Receiver;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use devices::legacy::{GedDevice, I8042Device, SerialDevice};
use event_manager::{EventOps, Events, MutEventSubscriber};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::timerfd::TimerFd;

use super::pause::VcpuPause;
use super::signals::{signal_name, StopSignals};
use super::vcpu::VcpuStop;
use crate::api::{VmControl, VmState};

/// How long `pause` waits for every vCPU to leave guest mode.
const PAUSE_TIMEOUT: Duration = Duration::from_secs(2);

/// How the VM ended, decided by the first event that ends it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmExit {
    /// The guest reset the machine (i8042, KVM reset event).
    Reset,
    /// The guest powered off (ACPI S5, KVM shutdown event).
    Poweroff,
    /// Stopped at once on request (SIGTERM, SIGINT or the control socket, named here) because
    /// the grace period is 0.
    Stopped(String),
    /// Stopped without the guest's consent after a shutdown request: the message says why.
    Forced(String),
    /// A vCPU stopped for another reason: a guest crash or a KVM error.
    Vcpu(u8, VcpuStop),
}

impl VmExit {
    /// 0 for a clean end, 1 for a crash or a VMM error (see README, "Exit codes").
    pub fn exit_code(&self) -> i32 {
        match self {
            VmExit::Reset | VmExit::Poweroff | VmExit::Stopped(_) => 0,
            VmExit::Forced(_) => 1,
            VmExit::Vcpu(_, VcpuStop::Reset | VcpuStop::Poweroff) => 0,
            VmExit::Vcpu(..) => 1,
        }
    }

    pub fn describe(&self) -> String {
        match self {
            VmExit::Reset => "guest requested a reset; VM stopped".into(),
            VmExit::Poweroff => "guest powered off".into(),
            VmExit::Stopped(cause) => format!("stopped by {cause}"),
            VmExit::Forced(why) => format!("forced stop: {why}"),
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

/// How the VMM asks the guest to shut down.
#[derive(Clone)]
pub enum PowerButton {
    /// The ACPI power button, pressed through the Generic Event Device.
    Acpi(Arc<Mutex<GedDevice>>),
    /// Ctrl-Alt-Del typed on the i8042 keyboard (machines without ACPI): Linux reboots, and
    /// the reboot's i8042 reset ends the VM.
    CtrlAltDel(Arc<Mutex<I8042Device>>),
}

impl PowerButton {
    fn press(&self) -> Result<(), String> {
        match self {
            PowerButton::Acpi(ged) => ged
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .press_power_button()
                .map_err(|e| format!("cannot raise the GED interrupt: {e}")),
            PowerButton::CtrlAltDel(i8042) => i8042
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .trigger_ctrl_alt_del()
                .map_err(|e| e.to_string()),
        }
    }

    fn name(&self) -> &'static str {
        match self {
            PowerButton::Acpi(_) => "the ACPI power button",
            PowerButton::CtrlAltDel(_) => "Ctrl-Alt-Del",
        }
    }
}

/// What the lifecycle watches and controls.
pub struct LifecycleParts {
    pub reset_evt: EventFd,
    pub poweroff_evt: EventFd,
    pub vcpu_wakeup: Arc<EventFd>,
    pub vcpu_stops: Receiver<(u8, VcpuStop)>,
    pub signals: StopSignals,
    pub pause: Arc<VcpuPause>,
    pub power_button: PowerButton,
    /// `machine.shutdown_timeout_secs`.
    pub shutdown_timeout: Duration,
}

/// A shutdown in progress: who asked, and when.
struct Shutdown {
    cause: String,
    started: Instant,
}

/// Watches everything that can end the VM, and runs the graceful shutdown.
pub struct Lifecycle {
    parts: LifecycleParts,
    /// The grace period's timer, armed by a shutdown request.
    timer: TimerFd,
    shutdown: Option<Shutdown>,
    outcome: Option<VmExit>,
}

impl Lifecycle {
    pub fn new(parts: LifecycleParts) -> std::io::Result<Self> {
        Ok(Self {
            parts,
            timer: TimerFd::new()?,
            shutdown: None,
            outcome: None,
        })
    }

    pub fn outcome(&self) -> Option<&VmExit> {
        self.outcome.as_ref()
    }

    fn finish(&mut self, exit: VmExit) {
        // The first cause wins; later ones (other vCPUs stopping) are consequences.
        if self.outcome.is_some() {
            return;
        }
        if let (Some(shutdown), 0) = (&self.shutdown, exit.exit_code()) {
            log::info!(
                "guest shut down {:.1} ms after {}",
                shutdown.started.elapsed().as_secs_f64() * 1000.0,
                shutdown.cause
            );
        }
        self.outcome = Some(exit);
    }

    pub fn state(&self) -> VmState {
        if self.shutdown.is_some() || self.outcome.is_some() {
            VmState::ShuttingDown
        } else if self.parts.pause.is_paused() {
            VmState::Paused
        } else {
            VmState::Running
        }
    }

    /// Asks the guest to shut down (`cause` names who asked, for the log). Repeated requests
    /// change nothing: the first grace period runs on.
    pub fn request_shutdown(&mut self, cause: &str) {
        if self.outcome.is_some() || self.shutdown.is_some() {
            return;
        }
        let grace = self.parts.shutdown_timeout;
        if grace.is_zero() {
            self.finish(VmExit::Stopped(cause.to_owned()));
            return;
        }
        if self.parts.pause.is_paused() {
            // A paused guest cannot see the button: let it run for its grace period.
            self.parts.pause.resume();
            log::info!("{cause}: resuming the paused VM so the guest can shut down");
        }
        let button = self.parts.power_button.name();
        match self.parts.power_button.press() {
            Ok(()) => log::info!(
                "{cause}: pressed {button}; the guest has {} s to shut down",
                grace.as_secs()
            ),
            Err(e) => log::warn!(
                "{cause}: cannot press {button} ({e}); the VM stops after {} s",
                grace.as_secs()
            ),
        }
        if let Err(e) = self.timer.reset(grace, None) {
            // Without the timer nothing would end a guest that ignores the button.
            self.finish(VmExit::Forced(format!(
                "cannot arm the shutdown timer ({e}); stopped at once"
            )));
            return;
        }
        self.shutdown = Some(Shutdown {
            cause: cause.to_owned(),
            started: Instant::now(),
        });
    }

    fn on_signal(&mut self, sig: libc::c_int) {
        let name = signal_name(sig);
        if self.shutdown.is_some() {
            self.finish(VmExit::Forced(format!(
                "{name} during the shutdown grace period"
            )));
        } else {
            self.request_shutdown(name);
        }
    }

    fn on_grace_timeout(&mut self) {
        if let Some(shutdown) = &self.shutdown {
            let why = format!(
                "the guest did not shut down within {} s of {} ({})",
                self.parts.shutdown_timeout.as_secs(),
                self.parts.power_button.name(),
                shutdown.cause
            );
            self.finish(VmExit::Forced(why));
        }
    }

    pub fn pause(&mut self) -> Result<(), String> {
        if self.state() == VmState::ShuttingDown {
            return Err("the VM is shutting down; it cannot be paused".into());
        }
        self.parts
            .pause
            .pause(PAUSE_TIMEOUT)
            .map_err(|e| e.to_string())?;
        log::info!("VM paused");
        Ok(())
    }

    pub fn resume(&mut self) -> Result<(), String> {
        if self.parts.pause.is_paused() {
            self.parts.pause.resume();
            log::info!("VM resumed");
        }
        Ok(())
    }
}

/// The control socket's view of the lifecycle.
impl VmControl for Mutex<Lifecycle> {
    fn state(&self) -> VmState {
        self.lock().unwrap_or_else(|p| p.into_inner()).state()
    }

    fn shutdown(&self) -> Result<(), String> {
        let mut lifecycle = self.lock().unwrap_or_else(|p| p.into_inner());
        lifecycle.request_shutdown("a control-socket request");
        Ok(())
    }

    fn pause(&self) -> Result<(), String> {
        self.lock().unwrap_or_else(|p| p.into_inner()).pause()
    }

    fn resume(&self) -> Result<(), String> {
        self.lock().unwrap_or_else(|p| p.into_inner()).resume()
    }
}

impl MutEventSubscriber for Lifecycle {
    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        let fd = events.fd();
        if fd == self.parts.reset_evt.as_raw_fd() {
            let _ = self.parts.reset_evt.read();
            self.finish(VmExit::Reset);
        } else if fd == self.parts.poweroff_evt.as_raw_fd() {
            let _ = self.parts.poweroff_evt.read();
            self.finish(VmExit::Poweroff);
        } else if fd == self.parts.vcpu_wakeup.as_raw_fd() {
            let _ = self.parts.vcpu_wakeup.read();
            while let Ok((index, stop)) = self.parts.vcpu_stops.try_recv() {
                self.finish(VmExit::Vcpu(index, stop));
            }
        } else if fd == self.parts.signals.as_raw_fd() {
            while let Some(sig) = self.parts.signals.read() {
                self.on_signal(sig);
            }
        } else if fd == self.timer.as_raw_fd() {
            // Readable means expired, so this read does not block.
            let _ = self.timer.wait();
            self.on_grace_timeout();
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        let fds = [
            self.parts.reset_evt.as_raw_fd(),
            self.parts.poweroff_evt.as_raw_fd(),
            self.parts.vcpu_wakeup.as_raw_fd(),
            self.parts.signals.as_raw_fd(),
            self.timer.as_raw_fd(),
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

#[cfg(test)]
mod tests {
    use super::*;
    use event_manager::{EventManager, SubscriberOps};

    struct Rig {
        lifecycle: Arc<Mutex<Lifecycle>>,
        events: EventManager<Arc<Mutex<Lifecycle>>>,
        ged: Arc<Mutex<GedDevice>>,
        ged_irq: EventFd,
        poweroff: EventFd,
        pause: Arc<VcpuPause>,
    }

    fn evt() -> EventFd {
        EventFd::new(libc::EFD_NONBLOCK).unwrap()
    }

    fn rig(grace: Duration) -> Rig {
        let ged_irq = evt();
        let ged = Arc::new(Mutex::new(GedDevice::new(ged_irq.try_clone().unwrap())));
        let poweroff = evt();
        let pause = Arc::new(VcpuPause::new(0).unwrap());
        let (_sender, vcpu_stops) = std::sync::mpsc::channel();
        let lifecycle = Lifecycle::new(LifecycleParts {
            reset_evt: evt(),
            poweroff_evt: poweroff.try_clone().unwrap(),
            vcpu_wakeup: Arc::new(evt()),
            vcpu_stops,
            signals: StopSignals::new().unwrap(),
            pause: pause.clone(),
            power_button: PowerButton::Acpi(ged.clone()),
            shutdown_timeout: grace,
        })
        .unwrap();
        let lifecycle = Arc::new(Mutex::new(lifecycle));
        let mut events = EventManager::new().unwrap();
        events.add_subscriber(lifecycle.clone());
        Rig {
            lifecycle,
            events,
            ged,
            ged_irq,
            poweroff,
            pause,
        }
    }

    impl Rig {
        /// Runs the loop until the VM has an outcome (or `limit` passes).
        fn run_until_outcome(&mut self, limit: Duration) -> Option<VmExit> {
            let deadline = Instant::now() + limit;
            while Instant::now() < deadline {
                self.events.run_with_timeout(10).unwrap();
                if let Some(exit) = self.lifecycle.lock().unwrap().outcome() {
                    return Some(exit.clone());
                }
            }
            None
        }
    }

    #[test]
    fn shutdown_presses_the_button_and_the_guest_poweroff_ends_the_vm_cleanly() {
        let mut rig = rig(Duration::from_secs(30));
        assert_eq!(rig.lifecycle.state(), VmState::Running);
        rig.lifecycle.shutdown().unwrap();
        assert_eq!(rig.lifecycle.state(), VmState::ShuttingDown);
        assert_eq!(rig.ged.lock().unwrap().pending(), 1, "button latched");
        assert_eq!(rig.ged_irq.read().unwrap(), 1, "GED interrupt raised");
        // Asking again does not press again.
        rig.lifecycle.shutdown().unwrap();
        assert!(rig.ged_irq.read().is_err());
        assert!(rig.run_until_outcome(Duration::from_millis(50)).is_none());

        rig.poweroff.write(1).unwrap();
        let exit = rig.run_until_outcome(Duration::from_secs(5)).unwrap();
        assert_eq!(exit, VmExit::Poweroff);
        assert_eq!(exit.exit_code(), 0);
    }

    #[test]
    fn a_guest_that_ignores_the_button_is_stopped_after_the_grace_period() {
        let mut rig = rig(Duration::from_millis(200));
        let start = Instant::now();
        rig.lifecycle.lock().unwrap().request_shutdown("SIGTERM");
        let exit = rig.run_until_outcome(Duration::from_secs(5)).unwrap();
        assert!(
            start.elapsed() >= Duration::from_millis(200),
            "{:?}",
            start.elapsed()
        );
        assert_eq!(exit.exit_code(), 1);
        let line = exit.describe();
        assert!(
            line.starts_with("forced stop: the guest did not shut down"),
            "{line}"
        );
        assert!(line.contains("the ACPI power button (SIGTERM)"), "{line}");
    }

    #[test]
    fn a_second_stop_signal_forces_the_stop() {
        let rig = rig(Duration::from_secs(30));
        let mut lifecycle = rig.lifecycle.lock().unwrap();
        lifecycle.on_signal(libc::SIGTERM);
        assert!(lifecycle.outcome().is_none());
        lifecycle.on_signal(libc::SIGINT);
        let exit = lifecycle.outcome().unwrap();
        assert_eq!(exit.exit_code(), 1);
        assert_eq!(
            exit.describe(),
            "forced stop: SIGINT during the shutdown grace period"
        );
    }

    #[test]
    fn no_grace_period_stops_at_once_without_the_button() {
        let rig = rig(Duration::ZERO);
        let mut lifecycle = rig.lifecycle.lock().unwrap();
        lifecycle.on_signal(libc::SIGTERM);
        let exit = lifecycle.outcome().unwrap();
        assert_eq!(exit.exit_code(), 0);
        assert_eq!(exit.describe(), "stopped by SIGTERM");
        assert_eq!(rig.ged.lock().unwrap().pending(), 0);
    }

    #[test]
    fn shutdown_resumes_a_paused_vm_and_forbids_pausing_it() {
        let rig = rig(Duration::from_secs(30));
        rig.lifecycle.pause().unwrap();
        assert_eq!(rig.lifecycle.state(), VmState::Paused);
        rig.lifecycle.shutdown().unwrap();
        assert!(
            !rig.pause.is_paused(),
            "the guest must run to see the button"
        );
        assert_eq!(rig.lifecycle.state(), VmState::ShuttingDown);
        let err = rig.lifecycle.pause().unwrap_err();
        assert!(err.contains("shutting down"), "{err}");
        rig.lifecycle.resume().unwrap();
    }

    #[test]
    fn ctrl_alt_del_is_the_button_without_acpi() {
        let i8042 = Arc::new(Mutex::new(I8042Device::new(evt())));
        let button = PowerButton::CtrlAltDel(i8042.clone());
        button.press().unwrap();
        assert_eq!(button.name(), "Ctrl-Alt-Del");
        let mut status = [0u8];
        use devices::BusDevice;
        i8042.lock().unwrap().read(4, &mut status);
        assert_eq!(status[0] & 1, 1, "key bytes waiting for the guest");
    }
}
