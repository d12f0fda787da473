//! Raw mode for the host terminal while the guest console is attached, restored on every exit.

use std::sync::Mutex;

/// The terminal settings to put back, if we changed them.
static SAVED: Mutex<Option<libc::termios>> = Mutex::new(None);

/// Puts stdin into raw-ish mode when it is a terminal: no line buffering or echo, so keys reach
/// the guest as typed. Ctrl-C still raises SIGINT, which stops the VM.
pub fn enter_raw_mode() {
    let fd = libc::STDIN_FILENO;
    // SAFETY: isatty only inspects the descriptor.
    if unsafe { libc::isatty(fd) } != 1 {
        return;
    }
    // SAFETY: termios is plain data; tcgetattr fills it and reports errors through its result.
    let mut original = unsafe { std::mem::zeroed::<libc::termios>() };
    // SAFETY: `original` is a valid termios to fill.
    if unsafe { libc::tcgetattr(fd, &mut original) } != 0 {
        return;
    }
    let mut raw = original;
    raw.c_lflag &= !(libc::ICANON | libc::ECHO | libc::IEXTEN);
    raw.c_iflag &= !(libc::ICRNL | libc::IXON);
    raw.c_cc[libc::VMIN] = 1;
    raw.c_cc[libc::VTIME] = 0;
    // SAFETY: `raw` is a valid termios derived from the current settings.
    if unsafe { libc::tcsetattr(fd, libc::TCSANOW, &raw) } == 0 {
        *SAVED.lock().unwrap_or_else(|p| p.into_inner()) = Some(original);
    }
}

/// Puts the terminal back as it was. Safe to call any number of times.
pub fn restore() {
    let saved = SAVED.lock().unwrap_or_else(|p| p.into_inner()).take();
    if let Some(original) = saved {
        // SAFETY: `original` came from tcgetattr on the same descriptor.
        unsafe { libc::tcsetattr(libc::STDIN_FILENO, libc::TCSANOW, &original) };
    }
}
