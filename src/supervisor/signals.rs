//! The supervisor's signals: SIGTERM/SIGINT (stop), SIGCHLD (a child exited) and SIGHUP
//! (ignored) are blocked and taken synchronously with sigtimedwait, so the main loop has no
//! signal handlers and no races. Children start with an empty mask (std resets it at spawn).

use std::io;
use std::time::Duration;

/// What woke the main loop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wake {
    /// SIGTERM or SIGINT: the signal number, to forward.
    Stop(i32),
    /// A child changed state, or the timeout passed: look around.
    Tick,
}

pub struct Signals {
    set: libc::sigset_t,
}

impl Signals {
    /// Blocks the signals in the calling thread (the supervisor has no other threads).
    pub fn block() -> io::Result<Self> {
        // SAFETY: sigset_t is plain data, initialised by sigemptyset before any other use.
        let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
        // SAFETY: sigemptyset/sigaddset write the set we own; the signal numbers are valid.
        unsafe {
            libc::sigemptyset(&mut set);
            for sig in [libc::SIGTERM, libc::SIGINT, libc::SIGCHLD, libc::SIGHUP] {
                libc::sigaddset(&mut set, sig);
            }
        }
        // SAFETY: pthread_sigmask reads the set we own; the old mask is not wanted.
        let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
        if rc != 0 {
            return Err(io::Error::from_raw_os_error(rc));
        }
        Ok(Self { set })
    }

    /// Waits up to `timeout` for one of the blocked signals.
    pub fn wait(&self, timeout: Duration) -> Wake {
        let ts = libc::timespec {
            tv_sec: timeout.as_secs() as libc::time_t,
            tv_nsec: timeout.subsec_nanos() as libc::c_long,
        };
        // SAFETY: sigtimedwait reads our set and timespec; no siginfo is requested.
        let sig = unsafe { libc::sigtimedwait(&self.set, std::ptr::null_mut(), &ts) };
        match sig {
            libc::SIGTERM | libc::SIGINT => Wake::Stop(sig),
            libc::SIGHUP => {
                log::info!("SIGHUP ignored: restart the service to apply a new configuration");
                Wake::Tick
            }
            _ => Wake::Tick,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_blocked_signal_is_taken_synchronously() {
        // Only this thread blocks the signals, so a thread-directed signal must land here.
        let signals = Signals::block().unwrap();
        assert_eq!(signals.wait(Duration::from_millis(1)), Wake::Tick);
        // SAFETY: sending a blocked signal to our own thread; it stays pending until taken.
        unsafe { libc::pthread_kill(libc::pthread_self(), libc::SIGTERM) };
        assert_eq!(
            signals.wait(Duration::from_secs(5)),
            Wake::Stop(libc::SIGTERM)
        );
    }
}
