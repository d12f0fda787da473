//! Pausing and resuming the vCPUs (the control socket's `pause`/`resume`).
//!
//! A vCPU thread checks the pause request before every `KVM_RUN`. To get a thread that is
//! inside `KVM_RUN` (running guest code, or halted in the kernel) out of it, the event loop sends
//! it a real-time signal whose handler sets the vCPU's `kvm_run.immediate_exit`: whether the
//! signal lands before the ioctl or during it, `KVM_RUN` returns EINTR, the thread sees the
//! request and parks on a condition variable until `resume`. The in-kernel irqchip keeps
//! collecting interrupts meanwhile (irqfds still fire), so nothing is lost: they are delivered
//! when the vCPU runs again.

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard, Once};
use std::time::{Duration, Instant};

use kvm_bindings::kvm_run;

/// How often a pause request re-sends the kick while it waits (the first kick is enough; this
/// only bounds the wait if a signal were ever lost).
const KICK_INTERVAL: Duration = Duration::from_millis(10);

#[derive(Debug, thiserror::Error)]
pub enum PauseError {
    #[error("vCPU {0} did not stop within {1:?} (busy in a device?); the VM keeps running")]
    Timeout(usize, Duration),
    #[error("cannot install the vCPU kick signal handler: {0}")]
    Handler(std::io::Error),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Slot {
    /// The thread has not reached its run loop; it checks the request before its first entry.
    NotStarted,
    Running(libc::pthread_t),
    Parked,
    Exited,
}

/// Shared by the event loop (which pauses and resumes) and every vCPU thread.
pub struct VcpuPause {
    requested: AtomicBool,
    slots: Mutex<Vec<Slot>>,
    changed: Condvar,
}

thread_local! {
    /// This thread's `kvm_run`, for the kick handler. Const-initialised: no lazy setup runs
    /// inside the signal handler.
    static KVM_RUN: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

/// The signal that kicks a vCPU out of `KVM_RUN`.
fn kick_signal() -> libc::c_int {
    libc::SIGRTMIN()
}

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    let run = KVM_RUN.with(Cell::get);
    if !run.is_null() {
        // SAFETY: the pointer is this thread's own kvm_run mapping, set by `enter` and valid
        // while the vCPU fd lives (for the whole thread). A volatile byte store is what
        // KVM_CAP_IMMEDIATE_EXIT asks for and is async-signal-safe.
        unsafe { std::ptr::addr_of_mut!((*run).immediate_exit).write_volatile(1) };
    }
}

/// Installs the kick handler once per process. SA_RESTART keeps the signal from failing
/// ordinary blocking calls a vCPU thread makes in device code; KVM_RUN is never restarted.
fn install_handler() -> Result<(), PauseError> {
    static ONCE: Once = Once::new();
    let mut result = Ok(());
    ONCE.call_once(|| {
        // SAFETY: sigaction is plain data; zeroed is a valid empty action we then fill.
        let mut action = unsafe { std::mem::zeroed::<libc::sigaction>() };
        action.sa_sigaction = kick_handler as *const () as usize;
        action.sa_flags = libc::SA_SIGINFO | libc::SA_RESTART;
        // SAFETY: `action` is fully initialised, the handler only does a volatile store, and
        // the old action is not needed.
        let rc = unsafe {
            libc::sigemptyset(&mut action.sa_mask);
            libc::sigaction(kick_signal(), &action, std::ptr::null_mut())
        };
        if rc != 0 {
            result = Err(PauseError::Handler(std::io::Error::last_os_error()));
        }
    });
    result
}

impl VcpuPause {
    pub fn new(vcpus: usize) -> Result<Self, PauseError> {
        install_handler()?;
        Ok(Self {
            requested: AtomicBool::new(false),
            slots: Mutex::new(vec![Slot::NotStarted; vcpus]),
            changed: Condvar::new(),
        })
    }

    fn slots(&self) -> MutexGuard<'_, Vec<Slot>> {
        self.slots.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Called by vCPU thread `index` before its run loop, with its `kvm_run` mapping.
    pub fn enter(&self, index: usize, run: *mut kvm_run) {
        KVM_RUN.with(|p| p.set(run));
        // SAFETY: pthread_self has no preconditions.
        let tid = unsafe { libc::pthread_self() };
        if let Some(slot) = self.slots().get_mut(index) {
            *slot = Slot::Running(tid);
        }
    }

    /// Called by vCPU thread `index` when it stops for good: it is never kicked again.
    pub fn exit(&self, index: usize) {
        KVM_RUN.with(|p| p.set(std::ptr::null_mut()));
        if let Some(slot) = self.slots().get_mut(index) {
            *slot = Slot::Exited;
        }
        self.changed.notify_all();
    }

    /// Called by vCPU thread `index` before each KVM_RUN: parks while a pause is requested.
    pub fn park_if_requested(&self, index: usize) {
        if !self.requested.load(Ordering::SeqCst) {
            return;
        }
        let mut slots = self.slots();
        let Some(running) = slots.get(index).copied() else {
            return;
        };
        while self.requested.load(Ordering::SeqCst) {
            slots[index] = Slot::Parked;
            self.changed.notify_all();
            slots = self.changed.wait(slots).unwrap_or_else(|p| p.into_inner());
        }
        slots[index] = running;
    }

    /// Stops every vCPU and returns once none runs guest code. On timeout the VM is resumed.
    pub fn pause(&self, timeout: Duration) -> Result<(), PauseError> {
        self.requested.store(true, Ordering::SeqCst);
        let deadline = Instant::now() + timeout;
        let mut slots = self.slots();
        loop {
            let running: Vec<(usize, libc::pthread_t)> = slots
                .iter()
                .enumerate()
                .filter_map(|(i, s)| match s {
                    Slot::Running(tid) => Some((i, *tid)),
                    _ => None,
                })
                .collect();
            let Some(&(first, _)) = running.first() else {
                return Ok(());
            };
            for (_, tid) in &running {
                // SAFETY: the slot says the thread is alive, and it cannot exit while we hold
                // the lock (`exit` takes it first), so `tid` names a live thread.
                unsafe { libc::pthread_kill(*tid, kick_signal()) };
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                drop(slots);
                self.resume();
                return Err(PauseError::Timeout(first, timeout));
            }
            slots = self
                .changed
                .wait_timeout(slots, left.min(KICK_INTERVAL))
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// Lets parked vCPUs run again.
    pub fn resume(&self) {
        self.requested.store(false, Ordering::SeqCst);
        let _slots = self.slots();
        self.changed.notify_all();
    }

    pub fn is_paused(&self) -> bool {
        self.requested.load(Ordering::SeqCst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU64;
    use std::sync::Arc;

    /// A stand-in vCPU: counts loop iterations, blocks in a long sleep as if in KVM_RUN, and
    /// treats the kick as KVM does (`immediate_exit` makes the next "entry" return at once).
    fn fake_vcpu(
        pause: Arc<VcpuPause>,
        index: usize,
        progress: Arc<AtomicU64>,
        stop: Arc<AtomicBool>,
    ) -> std::thread::JoinHandle<()> {
        std::thread::spawn(move || {
            // SAFETY: kvm_run is plain data; an all-zero one is valid.
            let mut run: Box<kvm_run> = Box::new(unsafe { std::mem::zeroed() });
            let ptr: *mut kvm_run = &mut *run;
            pause.enter(index, ptr);
            while !stop.load(Ordering::SeqCst) {
                // SAFETY: `ptr` points at `run`, alive for the whole thread.
                unsafe { std::ptr::addr_of_mut!((*ptr).immediate_exit).write_volatile(0) };
                std::sync::atomic::compiler_fence(Ordering::SeqCst);
                pause.park_if_requested(index);
                progress.fetch_add(1, Ordering::SeqCst);
                // SAFETY: as above.
                while unsafe { std::ptr::addr_of!((*ptr).immediate_exit).read_volatile() } == 0
                    && !stop.load(Ordering::SeqCst)
                {
                    // "In the guest": only the kick (or the end of the test) gets us out.
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
            pause.exit(index);
        })
    }

    #[test]
    fn pause_stops_every_vcpu_until_resume() {
        let pause = Arc::new(VcpuPause::new(3).unwrap());
        let stop = Arc::new(AtomicBool::new(false));
        let counters: Vec<Arc<AtomicU64>> = (0..3).map(|_| Arc::default()).collect();
        // Two threads run; the third never starts, which must not block the pause.
        let threads: Vec<_> = (0..2)
            .map(|i| fake_vcpu(pause.clone(), i, counters[i].clone(), stop.clone()))
            .collect();
        while counters[..2].iter().any(|c| c.load(Ordering::SeqCst) == 0) {
            std::thread::yield_now();
        }

        pause.pause(Duration::from_secs(5)).unwrap();
        assert!(pause.is_paused());
        let frozen: Vec<u64> = counters.iter().map(|c| c.load(Ordering::SeqCst)).collect();
        std::thread::sleep(Duration::from_millis(50));
        let later: Vec<u64> = counters.iter().map(|c| c.load(Ordering::SeqCst)).collect();
        assert_eq!(frozen, later, "a paused vCPU made progress");

        // Pausing again is harmless; resume lets them run (each is kicked once more to loop).
        pause.pause(Duration::from_secs(5)).unwrap();
        pause.resume();
        assert!(!pause.is_paused());
        // Woken vCPUs make progress again (how soon depends on the scheduler).
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while (0..2).any(|i| counters[i].load(Ordering::SeqCst) <= later[i]) {
            assert!(
                std::time::Instant::now() < deadline,
                "no progress after resume"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        pause.pause(Duration::from_secs(5)).unwrap();
        let after: Vec<u64> = counters.iter().map(|c| c.load(Ordering::SeqCst)).collect();
        assert!(
            after[0] > later[0] && after[1] > later[1],
            "{after:?} vs {later:?}"
        );
        pause.resume();

        stop.store(true, Ordering::SeqCst);
        for t in threads {
            t.join().unwrap();
        }
        // Exited threads are not waited for.
        pause.pause(Duration::from_millis(100)).unwrap();
    }

    #[test]
    fn a_vcpu_that_never_stops_times_out_and_the_vm_resumes() {
        let pause = VcpuPause::new(1).unwrap();
        // Registered as running, but nothing ever parks (no run loop behind it): a thread that
        // is stuck in a device.
        let run = Box::into_raw(Box::new(
            // SAFETY: kvm_run is plain data; an all-zero one is valid.
            unsafe { std::mem::zeroed::<kvm_run>() },
        ));
        pause.enter(0, run);
        let err = pause.pause(Duration::from_millis(50)).unwrap_err();
        assert!(matches!(err, PauseError::Timeout(0, _)), "{err}");
        assert!(!pause.is_paused(), "a failed pause leaves the VM running");
        // The kick reached this thread's handler.
        // SAFETY: `run` came from Box::into_raw above and is still owned here.
        let run = unsafe { Box::from_raw(run) };
        assert_eq!(run.immediate_exit, 1);
        pause.exit(0);
    }
}
