//! The VMM: build the VM from its config, run its vCPUs and event loop, report how it ended.

mod builder;
mod event_loop;
mod memory;
mod mmio_devices;
mod signals;
mod vcpu;
mod virtio_devices;
mod vm;

use std::os::fd::AsRawFd;
use std::sync::{mpsc, Arc, Mutex};

use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};
use vmm_sys_util::eventfd::EventFd;

pub use builder::BuildError;
pub use event_loop::VmExit;

use crate::config::{SerialMode, VmConfig};
use event_loop::{ConsoleInput, Lifecycle};
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
}

impl VmmError {
    /// 2 when the user must fix the config or the files it names, 1 otherwise.
    pub fn exit_code(&self) -> i32 {
        match self {
            VmmError::Build(e) => e.exit_code(),
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
    let lifecycle = Arc::new(Mutex::new(Lifecycle::new(
        built
            .exit_events
            .reset
            .try_clone()
            .map_err(VmmError::EventFd)?,
        built
            .exit_events
            .poweroff
            .try_clone()
            .map_err(VmmError::EventFd)?,
        wakeup.clone(),
        receiver,
        signals,
    )));
    events.add_subscriber(lifecycle.clone());
    if config.serial.mode == SerialMode::Stdout && stdin_is_terminal() {
        crate::terminal::enter_raw_mode();
        events.add_subscriber(Arc::new(Mutex::new(ConsoleInput::new(
            built.serial.clone(),
        ))));
    }

    let notifier = VcpuStopNotifier { sender, wakeup };
    let mut built = built;
    for vcpu in built.vcpus.drain(..) {
        vcpu.start(notifier.clone())?;
    }
    log::debug!("VM running");

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
    if log::log_enabled!(log::Level::Debug) {
        if let Some(bytes) = memory::resident_guest_bytes(&built.mem) {
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
