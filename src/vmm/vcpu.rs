//! vCPU threads: configure the boot state, then run KVM_RUN and dispatch exits to the buses.

use std::sync::mpsc::Sender;
use std::sync::Arc;
use std::thread::JoinHandle;

use devices::Bus;
use kvm_bindings::{KVM_EXIT_INTERNAL_ERROR, KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN};
use kvm_ioctls::{VcpuExit, VcpuFd};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use super::pause::VcpuPause;
use super::vm::Vm;
use crate::arch::{cpuid, regs};

#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    #[error("KVM failed to create vCPU {index}: {source}")]
    Create {
        index: u8,
        source: kvm_ioctls::Error,
    },
    #[error("cannot set up vCPU {index}'s CPUID: {source}")]
    Cpuid {
        index: u8,
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("cannot set up vCPU {index}'s registers: {source}")]
    Regs { index: u8, source: regs::RegsError },
    #[error("cannot start the thread for vCPU {index}: {source}")]
    Spawn { index: u8, source: std::io::Error },
}

/// Why a vCPU stopped running. Sent to the event loop, which ends the VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VcpuStop {
    /// The guest asked for a reset (KVM system event).
    Reset,
    /// The guest asked to power off (KVM system event).
    Poweroff,
    /// KVM_EXIT_SHUTDOWN: a triple fault.
    TripleFault { rip: u64 },
    /// KVM could not emulate an instruction (or another internal error).
    InternalError { suberror: u32, rip: u64 },
    /// VM entry failed with a hardware reason.
    FailEntry { reason: u64, rip: u64 },
    /// KVM_RUN failed or returned an exit we do not handle.
    Error(String),
}

/// Where vCPU threads report their end: a channel, plus an eventfd that wakes the event loop;
/// and the pause control they obey.
#[derive(Clone)]
pub struct VcpuStopNotifier {
    pub sender: Sender<(u8, VcpuStop)>,
    pub wakeup: Arc<EventFd>,
    pub pause: Arc<VcpuPause>,
}

pub struct Vcpu {
    index: u8,
    fd: VcpuFd,
    pio: Arc<Bus>,
    mmio: Arc<Bus>,
}

impl Vcpu {
    pub fn new(vm: &Vm, index: u8, pio: Arc<Bus>, mmio: Arc<Bus>) -> Result<Self, VcpuError> {
        let fd = vm
            .fd()
            .create_vcpu(u64::from(index))
            .map_err(|source| VcpuError::Create { index, source })?;
        Ok(Self {
            index,
            fd,
            pio,
            mmio,
        })
    }

    /// Sets CPUID (first: PVM needs it before long mode), MSRs, FPU, LAPIC and the entry state.
    pub fn configure(
        &self,
        vm: &Vm,
        mem: &GuestMemoryMmap,
        vcpu_count: u8,
        entry: regs::BootEntry,
    ) -> Result<(), VcpuError> {
        let index = self.index;
        let cpuid_err =
            |source: Box<dyn std::error::Error + Send + Sync>| VcpuError::Cpuid { index, source };
        let mut cpuid = vm.supported_cpuid().map_err(|e| cpuid_err(e.into()))?;
        cpuid::filter_cpuid(&mut cpuid, index, vcpu_count).map_err(|e| cpuid_err(e.into()))?;
        self.fd
            .set_cpuid2(&cpuid)
            .map_err(|e| cpuid_err(e.into()))?;
        let regs_err = |source| VcpuError::Regs { index, source };
        regs::setup_msrs(&self.fd).map_err(regs_err)?;
        regs::setup_fpu(&self.fd).map_err(regs_err)?;
        regs::setup_lint(&self.fd).map_err(regs_err)?;
        // Only the boot processor starts at the entry point; the others wait for INIT/SIPI in
        // the in-kernel LAPIC. Setting their registers anyway keeps them in a sane state.
        regs::setup_regs(&self.fd, entry).map_err(regs_err)?;
        regs::setup_sregs(mem, &self.fd, entry).map_err(regs_err)
    }

    /// Runs the vCPU on its own thread until it stops, then reports why.
    pub fn start(self, notifier: VcpuStopNotifier) -> Result<JoinHandle<()>, VcpuError> {
        let index = self.index;
        std::thread::Builder::new()
            .name(format!("vcpu{index}"))
            .spawn(move || {
                let mut vcpu = self;
                // Before the first KVM_RUN: from then on the guest drives this thread.
                let stop = match crate::seccomp::install(crate::seccomp::ThreadKind::Vcpu) {
                    Ok(()) => vcpu.run(&notifier.pause),
                    Err(e) => VcpuStop::Error(e.to_string()),
                };
                // The receiver lives as long as the event loop; if it is gone we are exiting.
                let _ = notifier.sender.send((vcpu.index, stop));
                let _ = notifier.wakeup.write(1);
            })
            .map_err(|source| VcpuError::Spawn { index, source })
    }

    fn run(&mut self, pause: &VcpuPause) -> VcpuStop {
        let index = usize::from(self.index);
        pause.enter(index, self.fd.get_kvm_run());
        let stop = self.run_loop(pause);
        pause.exit(index);
        stop
    }

    fn run_loop(&mut self, pause: &VcpuPause) -> VcpuStop {
        let index = usize::from(self.index);
        loop {
            pause.park_if_requested(index);
            let stop = match self.fd.run() {
                Ok(VcpuExit::IoIn(port, data)) => {
                    self.pio.read(u64::from(port), data);
                    continue;
                }
                Ok(VcpuExit::IoOut(port, data)) => {
                    self.pio.write(u64::from(port), data);
                    continue;
                }
                Ok(VcpuExit::MmioRead(addr, data)) => {
                    self.mmio.read(addr, data);
                    continue;
                }
                Ok(VcpuExit::MmioWrite(addr, data)) => {
                    self.mmio.write(addr, data);
                    continue;
                }
                // With the in-kernel LAPIC, HLT stays in the kernel; if it ever gets here the
                // next KVM_RUN resumes the halted vCPU.
                Ok(VcpuExit::Hlt) | Ok(VcpuExit::IrqWindowOpen) | Ok(VcpuExit::Intr) => continue,
                Ok(VcpuExit::Shutdown) => VcpuStop::TripleFault { rip: 0 },
                Ok(VcpuExit::SystemEvent(KVM_SYSTEM_EVENT_RESET, _)) => VcpuStop::Reset,
                Ok(VcpuExit::SystemEvent(KVM_SYSTEM_EVENT_SHUTDOWN, _)) => VcpuStop::Poweroff,
                Ok(VcpuExit::SystemEvent(kind, _)) => {
                    VcpuStop::Error(format!("unhandled system event {kind}"))
                }
                Ok(VcpuExit::InternalError) => VcpuStop::InternalError {
                    suberror: self.internal_error_suberror(),
                    rip: 0,
                },
                Ok(VcpuExit::FailEntry(reason, _)) => VcpuStop::FailEntry { reason, rip: 0 },
                Ok(other) => VcpuStop::Error(format!("unhandled exit {other:?}")),
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                    // A kick (pause) set immediate_exit; clear it before the pause check so a
                    // kick that lands after the check still stops the next entry.
                    self.fd.set_kvm_immediate_exit(0);
                    std::sync::atomic::compiler_fence(std::sync::atomic::Ordering::SeqCst);
                    continue;
                }
                Err(e) => VcpuStop::Error(format!("KVM_RUN failed: {e}")),
            };
            return self.with_rip(stop);
        }
    }

    fn internal_error_suberror(&mut self) -> u32 {
        let run = self.fd.get_kvm_run();
        if run.exit_reason != KVM_EXIT_INTERNAL_ERROR {
            return 0;
        }
        // SAFETY: exit_reason says the `internal` member of the union is the one KVM filled.
        unsafe { run.__bindgen_anon_1.internal.suberror }
    }

    /// Fills in the instruction pointer where the guest stopped, for the log line.
    fn with_rip(&self, stop: VcpuStop) -> VcpuStop {
        let rip = self.fd.get_regs().map(|r| r.rip).unwrap_or(0);
        match stop {
            VcpuStop::TripleFault { .. } => VcpuStop::TripleFault { rip },
            VcpuStop::InternalError { suberror, .. } => VcpuStop::InternalError { suberror, rip },
            VcpuStop::FailEntry { reason, .. } => VcpuStop::FailEntry { reason, rip },
            other => other,
        }
    }
}
