//! With a terminal on stdin, mvmm switches it to raw mode for the guest console and restores
//! it on exit.

mod common;

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

fn lflag(fd: &OwnedFd) -> libc::tcflag_t {
    // SAFETY: termios is plain data filled by tcgetattr on a descriptor we own.
    let mut t = unsafe { std::mem::zeroed::<libc::termios>() };
    // SAFETY: `t` is valid for writes and `fd` is an open terminal.
    assert_eq!(unsafe { libc::tcgetattr(fd.as_raw_fd(), &mut t) }, 0);
    t.c_lflag
}

#[test]
fn terminal_is_raw_while_running_and_restored_after_sigterm() {
    let (mut master, mut slave) = (0, 0);
    // SAFETY: openpty fills two descriptors we then own.
    let rc = unsafe {
        libc::openpty(
            &mut master,
            &mut slave,
            std::ptr::null_mut(),
            std::ptr::null(),
            std::ptr::null(),
        )
    };
    assert_eq!(rc, 0);
    // SAFETY: fresh descriptors from openpty, owned by nobody else.
    let (master, slave) = unsafe { (OwnedFd::from_raw_fd(master), OwnedFd::from_raw_fd(slave)) };
    let before = lflag(&slave);
    assert_ne!(
        before & libc::ICANON,
        0,
        "a new pty starts in canonical mode"
    );

    let vm = VmDir::new();
    // No grace period: SIGTERM stops the hanging guest at once.
    let json = serde_json::json!({
        "kernel": {"path": testguest("pvh"), "cmdline": "test=hang"},
        "machine": {"vcpus": 1, "memory_mib": 64, "shutdown_timeout_secs": 0},
    });
    let config = vm.write_config(&json.to_string());
    let child = Command::new(mvmm_bin())
        .args(["--config", config.to_str().unwrap()])
        .stdin(Stdio::from(slave.try_clone().unwrap()))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while lflag(&slave) & libc::ICANON != 0 {
        assert!(
            Instant::now() < deadline,
            "mvmm never switched the terminal to raw mode"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(lflag(&slave) & libc::ECHO, 0);

    // SAFETY: signalling our own child.
    let rc = unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
    assert_eq!(rc, 0);
    let out = wait_with_timeout(child, Duration::from_secs(10));
    assert_eq!(out.code(), Some(0), "{}", out.dump());
    assert_eq!(lflag(&slave), before, "terminal settings not restored");
    drop(master);
}
