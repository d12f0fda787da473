//! The VMM: build the VM from its config, run its vCPUs and event loop, report how it ended.

mod builder;
mod event_loop;
mod memory;
mod mmio_devices;
mod pause;
mod signals;
mod vcpu;
mod virtio_devices;
mod vm;

use std::os::fd::AsRawFd;
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};
use vmm_sys_util::eventfd::EventFd;

pub use builder::BuildError;
pub use event_loop::VmExit;

use crate::config::{SerialMode, VmConfig};
use event_loop::{ConsoleInput, Lifecycle, LifecycleParts};
use vcpu::VcpuStopNotifier;

#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    #[error(transparent)]
    Build(#[from] BuildError),
    #[error("cannot set up stop-signal handling: {0}")]
    Signals(std::io::Error),
    #[error("cannot create an eventfd: {0}")]
    EventFd(std::io::Error),
    #[error("event loop failed: {0:?}")]
    EventLoop(event_manager::Error),
    #[error(transparent)]
    Vcpu(#[from] vcpu::VcpuError),
    #[error(transparent)]
    Pause(#[from] pause::PauseError),
    #[error("cannot create the shutdown timer: {0}")]
    Timer(std::io::Error),
    #[error(transparent)]
    Api(#[from] crate::api::ApiError),
    #[error(transparent)]
    Seccomp(#[from] crate::seccomp::SeccompError),
    #[error(transparent)]
    Jail(#[from] crate::jail::JailError),
}

impl VmmError {
    /// 2 when the user must fix the config or the files it names, 1 otherwise.
    pub fn exit_code(&self) -> i32 {
        match self {
            VmmError::Build(e) => e.exit_code(),
            VmmError::Api(_) => crate::EXIT_USAGE,
            VmmError::Jail(e) => e.exit_code(),
            _ => crate::EXIT_FAILURE,
        }
    }
}

type Subscriber = Arc<Mutex<dyn MutEventSubscriber + Send>>;

/// Boots the VM described by `config` and runs it until it ends.
pub fn run(config: &VmConfig) -> Result<VmExit, VmmError> {
    // Before any thread exists, so every thread inherits the blocked stop signals.
    let signals = signals::StopSignals::new().map_err(VmmError::Signals)?;
    let built = builder::build(config)?;

    let mut events: EventManager<Subscriber> = EventManager::new().map_err(VmmError::EventLoop)?;
    let (sender, receiver) = mpsc::channel();
    let wakeup = Arc::new(EventFd::new(libc::EFD_NONBLOCK).map_err(VmmError::EventFd)?);
    let pause = Arc::new(pause::VcpuPause::new(built.vcpus.len())?);
    let mut built = built;
    let lifecycle = Arc::new(Mutex::new(
        Lifecycle::new(LifecycleParts {
            reset_evt: built
                .exit_events
                .reset
                .try_clone()
                .map_err(VmmError::EventFd)?,
            poweroff_evt: built
                .exit_events
                .poweroff
                .try_clone()
                .map_err(VmmError::EventFd)?,
            vcpu_wakeup: wakeup.clone(),
            vcpu_stops: receiver,
            signals,
            pause: pause.clone(),
            power_button: built.power_button.clone(),
            shutdown_timeout: Duration::from_secs(config.machine.shutdown_timeout_secs.into()),
        })
        .map_err(VmmError::Timer)?,
    ));
    events.add_subscriber(lifecycle.clone());
    // Bound before the vCPUs start, so a client that sees the socket sees a running VM.
    if let Some(path) = &config.api_socket {
        let info = crate::api::StatusInfo {
            started: Instant::now(),
            vcpus: config.machine.vcpus,
            devices: std::mem::take(&mut built.devices),
        };
        let server = crate::api::ApiServer::bind(path, lifecycle.clone(), info)?;
        events.add_subscriber(Arc::new(Mutex::new(server)));
    }
    if config.serial.mode == SerialMode::Stdout && stdin_is_terminal() {
        crate::terminal::enter_raw_mode();
        events.add_subscriber(Arc::new(Mutex::new(ConsoleInput::new(
            built.serial.clone(),
        ))));
    }

    // For the exit report of guest memory use (debug), opened while we still may.
    let smaps = log::log_enabled!(log::Level::Debug)
        .then(|| std::fs::File::open("/proc/self/smaps").ok())
        .flatten();
    // Everything is open and no other thread exists yet: the moment to confine ourselves.
    if let Some(jail) = &config.jail {
        crate::jail::confine(jail, &config.socket_dirs())?;
    }
    // Device threads start when the guest activates a device; they come from this starter.
    crate::seccomp::start_thread_starter()?;
    let notifier = VcpuStopNotifier {
        sender,
        wakeup,
        pause,
    };
    for vcpu in built.vcpus.drain(..) {
        vcpu.start(notifier.clone())?;
    }
    log::debug!("VM running");
    // Everything the main thread opens before the loop is open; from here it only serves it.
    crate::seccomp::install(crate::seccomp::ThreadKind::Main)?;

    let exit = loop {
        events.run().map_err(VmmError::EventLoop)?;
        let outcome = lifecycle
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .outcome()
            .cloned();
        if let Some(exit) = outcome {
            break exit;
        }
    };
    if let Some(smaps) = smaps {
        if let Some(bytes) = memory::resident_guest_bytes(&built.mem, smaps) {
            log::debug!("guest memory resident: {} KiB", bytes / 1024);
        }
    }
    // Keep the VM and its memory alive until the process exits (vCPU threads may still be in
    // KVM_RUN); the kernel's teardown at exit is faster than closing the VM fd ourselves.
    std::mem::forget(built);
    Ok(exit)
}

fn stdin_is_terminal() -> bool {
    // SAFETY: isatty only inspects the descriptor.
    unsafe { libc::isatty(std::io::stdin().as_raw_fd()) == 1 }
}
