//! Graceful shutdown: SIGTERM (or SIGINT) presses the guest's power button — the ACPI GED
//! button, or Ctrl-Alt-Del without ACPI — and the test guest's poweroff or reset ends mvmm
//! with 0; a guest that ignores it is stopped after the grace period with 1; a second signal
//! forces the stop at once; a grace period of 0 stops at once with 0.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

fn vm_config(vm: &VmDir, cmdline: &str, acpi: bool, grace_secs: u32) -> std::path::PathBuf {
    let json = serde_json::json!({
        "kernel": {"path": testguest("pvh"), "cmdline": cmdline},
        "machine": {"vcpus": 2, "memory_mib": 64, "acpi": acpi, "shutdown_timeout_secs": grace_secs},
    });
    vm.write_config(&json.to_string())
}

fn start(config: &std::path::Path) -> Watched {
    let mut cmd = Command::new(mvmm_bin());
    cmd.args(["--config", config.to_str().unwrap()]);
    Watched::spawn(cmd)
}

fn signal(vm: &Watched, sig: libc::c_int) {
    // SAFETY: signalling our own child process.
    assert_eq!(unsafe { libc::kill(vm.child.id() as libc::pid_t, sig) }, 0);
}

/// Boots a guest that waits for the shutdown request, sends `sig`, and checks it obeyed.
fn guest_obeys(acpi: bool, sig: libc::c_int) -> RunOutput {
    let vm = VmDir::new();
    let mut running = start(&vm_config(&vm, "test=shutdown-wait", acpi, 30));
    let waiting = if acpi {
        "shutdown: waiting for the power button"
    } else {
        "shutdown: waiting for ctrl-alt-del"
    };
    assert!(
        running.wait_for(true, waiting, Duration::from_secs(20)),
        "{}",
        running.dump()
    );
    let sent = Instant::now();
    signal(&running, sig);
    let out = running.finish(Duration::from_secs(10));
    let took = sent.elapsed();
    assert_eq!(out.code(), Some(0), "{}", out.dump());
    assert!(
        took < Duration::from_secs(5),
        "took {took:?}\n{}",
        out.dump()
    );
    eprintln!("signal to exit: {took:?}");
    out
}

#[test]
fn sigterm_presses_the_acpi_power_button_and_the_guest_powers_off() {
    let out = guest_obeys(true, libc::SIGTERM);
    assert!(
        out.stdout.contains("shutdown: power button pressed"),
        "{}",
        out.dump()
    );
    for line in [
        "SIGTERM: pressed the ACPI power button; the guest has 30 s to shut down",
        "guest shut down",
        "guest powered off",
    ] {
        assert!(out.stderr.contains(line), "no {line:?}\n{}", out.dump());
    }
}

#[test]
fn without_acpi_sigterm_types_ctrl_alt_del_and_the_guest_reboots() {
    let out = guest_obeys(false, libc::SIGTERM);
    assert!(
        out.stdout.contains("shutdown: ctrl-alt-del pressed"),
        "{}",
        out.dump()
    );
    assert!(
        out.stderr.contains("SIGTERM: pressed Ctrl-Alt-Del"),
        "{}",
        out.dump()
    );
    assert!(
        out.stderr.contains("guest requested a reset"),
        "{}",
        out.dump()
    );
}

#[test]
fn sigint_is_graceful_too() {
    let out = guest_obeys(true, libc::SIGINT);
    assert!(
        out.stderr.contains("SIGINT: pressed the ACPI power button"),
        "{}",
        out.dump()
    );
}

/// A guest that ignores the button (`test=hang`: interrupts off, halted).
fn hanging_guest(acpi: bool, grace_secs: u32) -> Watched {
    let vm = VmDir::new();
    let mut running = start(&vm_config(&vm, "test=hang", acpi, grace_secs));
    assert!(
        running.wait_for(true, "testguest: hanging", Duration::from_secs(20)),
        "{}",
        running.dump()
    );
    // The config file may go: mvmm has read it.
    drop(vm);
    running
}

#[test]
fn a_guest_that_ignores_the_button_is_stopped_after_the_grace_period() {
    for acpi in [true, false] {
        let running = hanging_guest(acpi, 1);
        let sent = Instant::now();
        signal(&running, libc::SIGTERM);
        let out = running.finish(Duration::from_secs(10));
        let took = sent.elapsed();
        assert_eq!(out.code(), Some(1), "acpi={acpi}: {}", out.dump());
        assert!(
            took >= Duration::from_secs(1) && took < Duration::from_secs(3),
            "acpi={acpi}: took {took:?}"
        );
        let forced: Vec<&str> = out
            .stderr
            .lines()
            .filter(|l| l.contains("forced stop"))
            .collect();
        let button = if acpi {
            "the ACPI power button"
        } else {
            "Ctrl-Alt-Del"
        };
        assert_eq!(forced.len(), 1, "acpi={acpi}: {}", out.dump());
        assert!(
            forced[0].contains(&format!(
                "forced stop: the guest did not shut down within 1 s of {button} (SIGTERM)"
            )),
            "{}",
            out.dump()
        );
    }
}

#[test]
fn a_second_signal_forces_the_stop_at_once() {
    let running = hanging_guest(true, 30);
    signal(&running, libc::SIGTERM);
    std::thread::sleep(Duration::from_millis(200));
    let sent = Instant::now();
    signal(&running, libc::SIGTERM);
    let out = running.finish(Duration::from_secs(10));
    assert!(
        sent.elapsed() < Duration::from_secs(2),
        "{:?}",
        sent.elapsed()
    );
    assert_eq!(out.code(), Some(1), "{}", out.dump());
    assert!(
        out.stderr
            .contains("forced stop: SIGTERM during the shutdown grace period"),
        "{}",
        out.dump()
    );
}

#[test]
fn no_grace_period_stops_at_once_with_success() {
    let running = hanging_guest(true, 0);
    let sent = Instant::now();
    signal(&running, libc::SIGTERM);
    let out = running.finish(Duration::from_secs(10));
    assert!(
        sent.elapsed() < Duration::from_secs(2),
        "{:?}",
        sent.elapsed()
    );
    assert_eq!(out.code(), Some(0), "{}", out.dump());
    assert!(out.stderr.contains("stopped by SIGTERM"), "{}", out.dump());
    assert!(!out.stderr.contains("power button"), "{}", out.dump());
}
