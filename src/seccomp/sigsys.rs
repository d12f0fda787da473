//! The SIGSYS report: which thread made which forbidden system call, then exit.
//!
//! The handler runs on the offending thread, inside its filter, so it may only use calls
//! every policy allows (`write`, `exit_group`) and nothing that allocates or locks.

use std::cell::Cell;
use std::io;

/// The process exit code after a forbidden system call (README, "Exit codes").
pub const EXIT_SECCOMP: i32 = 3;
// The report line spells the code out.
const _: () = assert!(EXIT_SECCOMP == 3);

/// Longest thread label kept for the report.
const LABEL_LEN: usize = 48;

thread_local! {
    // Const-initialised and without a destructor: reading it is a plain TLS access, safe in
    // a signal handler.
    static LABEL: Cell<[u8; LABEL_LEN]> = const { Cell::new([0; LABEL_LEN]) };
}

/// Remembers the calling thread's kind and name for the report.
pub fn set_thread_label(kind: &str) {
    let mut label = [0u8; LABEL_LEN];
    let mut text = kind.to_owned();
    if let Some(name) = std::thread::current().name() {
        text = format!("{kind} ({name})");
    }
    let n = text.len().min(LABEL_LEN);
    label[..n].copy_from_slice(&text.as_bytes()[..n]);
    LABEL.with(|l| l.set(label));
}

pub fn install_handler() -> io::Result<()> {
    // SAFETY: a zeroed sigaction is a valid "no flags, empty mask" value; we set the handler
    // and SA_SIGINFO, and the handler only uses async-signal-safe calls.
    unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = on_sigsys as *const () as usize;
        action.sa_flags = libc::SA_SIGINFO;
        if libc::sigaction(libc::SIGSYS, &action, std::ptr::null_mut()) != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Byte offset of `si_syscall` in `siginfo_t` for SIGSYS on x86_64 (after si_signo, si_errno,
/// si_code, padding and `si_call_addr`); the libc crate has no accessor for it.
const SI_SYSCALL_OFFSET: usize = 24;

extern "C" fn on_sigsys(_signal: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo_t for SA_SIGINFO handlers; for SIGSYS from
    // seccomp the int at this offset is the system call number.
    let nr = unsafe {
        *(info
            .cast::<u8>()
            .add(SI_SYSCALL_OFFSET)
            .cast::<libc::c_int>())
    };
    let label = LABEL.with(|l| l.get());
    let label_len = label.iter().position(|&b| b == 0).unwrap_or(LABEL_LEN);
    let mut line = [0u8; 192];
    let mut at = 0;
    for part in [
        b"mvmm: seccomp: thread ".as_slice(),
        if label_len == 0 {
            b"unlabelled".as_slice()
        } else {
            &label[..label_len]
        },
        b" made forbidden system call ",
        &decimal(nr).0[..decimal(nr).1],
        b"; exiting with code 3\n",
    ] {
        line[at..at + part.len()].copy_from_slice(part);
        at += part.len();
    }
    // SAFETY: write and _exit are async-signal-safe and allowed by every policy.
    unsafe {
        libc::write(2, line.as_ptr().cast(), at);
        libc::_exit(EXIT_SECCOMP);
    }
}

/// `n` in decimal without allocating: (digits, length).
fn decimal(n: libc::c_int) -> ([u8; 12], usize) {
    let mut digits = [0u8; 12];
    let mut len = 0;
    let negative = n < 0;
    let mut v = i64::from(n).unsigned_abs();
    loop {
        digits[len] = b'0' + (v % 10) as u8;
        len += 1;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    if negative {
        digits[len] = b'-';
        len += 1;
    }
    digits[..len].reverse();
    (digits, len)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decimal_formats_without_allocating() {
        for n in [0, 7, 42, 435, -1, i32::MAX, i32::MIN] {
            let (d, len) = decimal(n);
            assert_eq!(std::str::from_utf8(&d[..len]).unwrap(), n.to_string());
        }
    }
}
