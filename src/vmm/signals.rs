//! SIGTERM/SIGINT as events: blocked in every thread and read from a signalfd by the event loop.

use std::fs::File;
use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd, RawFd};

pub const STOP_SIGNALS: [libc::c_int; 2] = [libc::SIGTERM, libc::SIGINT];

/// A signalfd for the stop signals. Create it before spawning threads: the blocked mask is
/// inherited, so no thread is interrupted by these signals.
pub struct StopSignals {
    file: File,
}

fn signal_set() -> libc::sigset_t {
    // SAFETY: sigemptyset initialises the set; sigaddset only writes into it.
    unsafe {
        let mut set = std::mem::zeroed::<libc::sigset_t>();
        libc::sigemptyset(&mut set);
        for sig in STOP_SIGNALS {
            libc::sigaddset(&mut set, sig);
        }
        set
    }
}

impl StopSignals {
    pub fn new() -> std::io::Result<Self> {
        let set = signal_set();
        // SAFETY: `set` is a valid, initialised signal set; the old mask is not needed.
        let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
        if rc != 0 {
            return Err(std::io::Error::from_raw_os_error(rc));
        }
        // SAFETY: `set` is valid; -1 asks for a new descriptor, which we own from here on.
        let fd = unsafe { libc::signalfd(-1, &set, libc::SFD_CLOEXEC | libc::SFD_NONBLOCK) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `fd` was just returned by signalfd and is owned by nobody else.
        let file = unsafe { File::from_raw_fd(fd) };
        Ok(Self { file })
    }

    /// Returns the pending stop signal, if any.
    pub fn read(&mut self) -> Option<libc::c_int> {
        let mut info = [0u8; std::mem::size_of::<libc::signalfd_siginfo>()];
        match self.file.read(&mut info) {
            Ok(n) if n == info.len() => {
                // ssi_signo is the first field.
                Some(u32::from_ne_bytes([info[0], info[1], info[2], info[3]]) as libc::c_int)
            }
            _ => None,
        }
    }
}

impl AsRawFd for StopSignals {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

pub fn signal_name(sig: libc::c_int) -> &'static str {
    match sig {
        libc::SIGTERM => "SIGTERM",
        libc::SIGINT => "SIGINT",
        _ => "a signal",
    }
}
