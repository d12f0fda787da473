//! The control socket and `mvmm ctl`: status with per-device counters, shutdown (the same as
//! SIGTERM), pause/resume (the guest stops making progress and continues), and the client's
//! exit codes.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::virtiofsd::Virtiofsd;
use common::*;
use serde_json::Value;

struct Ctl {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl Ctl {
    fn json(&self) -> Value {
        serde_json::from_str(&self.stdout).unwrap_or_else(|e| {
            panic!(
                "ctl printed no JSON ({e}): {:?} {:?}",
                self.stdout, self.stderr
            )
        })
    }
}

fn ctl(socket: &Path, command: &str) -> Ctl {
    let out = Command::new(mvmm_bin())
        .args(["ctl", "--socket", socket.to_str().unwrap(), command])
        .output()
        .expect("run mvmm ctl");
    Ctl {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn start(config: &Path) -> Watched {
    let mut cmd = Command::new(mvmm_bin());
    cmd.args(["--config", config.to_str().unwrap()]);
    Watched::spawn(cmd)
}

/// A VM with a control socket whose guest waits for the power button, ticking if `tick`.
fn waiting_vm(vm: &VmDir, tick: bool) -> (Watched, PathBuf) {
    let socket = vm.path("api.sock");
    let cmdline = if tick {
        "test=shutdown-wait shutdown.tick"
    } else {
        "test=shutdown-wait"
    };
    let json = serde_json::json!({
        "kernel": {"path": testguest("pvh"), "cmdline": cmdline},
        "machine": {"vcpus": 2, "memory_mib": 64},
        "api_socket": "api.sock",
    });
    let mut running = start(&vm.write_config(&json.to_string()));
    assert!(
        running.wait_for(
            true,
            "shutdown: waiting for the power button",
            Duration::from_secs(20)
        ),
        "{}",
        running.dump()
    );
    (running, socket)
}

#[test]
fn shutdown_over_the_socket_is_the_power_button() {
    let vm = VmDir::new();
    let (running, socket) = waiting_vm(&vm, false);
    let sent = Instant::now();
    let reply = ctl(&socket, "shutdown");
    assert_eq!(reply.code, Some(0), "{}", reply.stderr);
    assert_eq!(
        reply.json(),
        serde_json::json!({"ok": true, "state": "shutting_down"})
    );
    let out = running.finish(Duration::from_secs(10));
    assert!(
        sent.elapsed() < Duration::from_secs(5),
        "{:?}",
        sent.elapsed()
    );
    assert_eq!(out.code(), Some(0), "{}", out.dump());
    assert!(
        out.stdout.contains("shutdown: power button pressed"),
        "{}",
        out.dump()
    );
    assert!(
        out.stderr
            .contains("a control-socket request: pressed the ACPI power button"),
        "{}",
        out.dump()
    );
    assert!(!socket.exists(), "the socket outlived the VM");
}

#[test]
fn status_shows_the_state_and_every_device() {
    let vm = VmDir::new();
    std::fs::write(vm.path("store.img"), pseudo_random_bytes(1 << 20, 1)).unwrap();
    std::fs::write(vm.path("data.img"), pseudo_random_bytes(2 << 20, 2)).unwrap();
    std::fs::create_dir(vm.path("shared")).unwrap();
    let _fsd = Virtiofsd::start(&vm.path("fs.sock"), &vm.path("shared"));
    // mvmm creates this tap and it goes away with mvmm.
    let tap = format!("mvapi{}", std::process::id() % 100_000);
    let socket = vm.path("api.sock");
    let json = serde_json::json!({
        "kernel": {"path": testguest("pvh"), "cmdline": "test=blk blk.seed=3 test=shutdown-wait"},
        "machine": {"vcpus": 2, "memory_mib": 64},
        "disks": [{"path": "store.img", "read_only": true}, {"path": "data.img"}],
        "net": [{"tap": tap, "mac": "52:54:00:00:00:01"}],
        "shares": [{"tag": "myfs", "socket": "fs.sock"}],
        "api_socket": "api.sock",
    });
    let mut running = start(&vm.write_config(&json.to_string()));
    assert!(
        running.wait_for(
            true,
            "shutdown: waiting for the power button",
            Duration::from_secs(30)
        ),
        "{}",
        running.dump()
    );
    assert!(running.stdout.contains("blk: done"), "{}", running.dump());

    let reply = ctl(&socket, "status");
    assert_eq!(reply.code, Some(0), "{}", reply.stderr);
    // Pretty-printed for people: several lines.
    assert!(reply.stdout.lines().count() > 10, "{}", reply.stdout);
    let status = reply.json();
    assert_eq!(status["ok"], true);
    assert_eq!(status["state"], "running");
    assert_eq!(status["vcpus"], 2);
    let uptime = status["uptime_ms"].as_u64().unwrap();
    assert!(uptime > 0 && uptime < 60_000, "{status}");
    let devices = status["devices"].as_array().unwrap();
    let ids: Vec<&str> = devices.iter().map(|d| d["id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["disks[0]", "disks[1]", "net[0]", "shares[0]"]);
    let kinds: Vec<&str> = devices
        .iter()
        .map(|d| d["kind"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, ["blk", "blk", "net", "fs"]);
    // The guest read disk 0, and wrote, flushed and read back disk 1 (test=blk).
    let n = |d: &Value, key: &str| d[key].as_u64().unwrap_or_else(|| panic!("{key} in {d}"));
    assert!(n(&devices[0], "reads") > 0 && n(&devices[0], "read_bytes") >= 64 << 10);
    assert_eq!(
        n(&devices[0], "writes"),
        0,
        "the read-only disk's write is refused"
    );
    assert!(n(&devices[0], "errors") >= 1, "{}", devices[0]);
    assert!(
        n(&devices[1], "writes") > 0 && n(&devices[1], "write_bytes") > 0,
        "{status}\n{}",
        running.dump()
    );
    assert_eq!(n(&devices[1], "flushes"), 1, "{}", devices[1]);
    for key in ["rx_frames", "rx_bytes", "tx_frames", "tx_bytes"] {
        n(&devices[2], key);
    }
    assert_eq!(devices[3]["tag"], "myfs");
    assert_eq!(devices[3]["connected"], true);

    assert_eq!(ctl(&socket, "shutdown").code, Some(0));
    let out = running.finish(Duration::from_secs(10));
    assert_eq!(out.code(), Some(0), "{}", out.dump());
}

/// Ticks printed so far.
fn ticks(vm: &mut Watched) -> usize {
    vm.wait_for(true, "\u{0}never", Duration::from_millis(50));
    vm.stdout.lines().filter(|l| l.starts_with("tick ")).count()
}

#[test]
fn pause_stops_the_guest_and_resume_lets_it_continue() {
    let vm = VmDir::new();
    let (mut running, socket) = waiting_vm(&vm, true);
    assert!(
        running.wait_for(true, "tick 3", Duration::from_secs(10)),
        "{}",
        running.dump()
    );

    let reply = ctl(&socket, "pause");
    assert_eq!(reply.code, Some(0), "{}", reply.stderr);
    assert_eq!(
        reply.json(),
        serde_json::json!({"ok": true, "state": "paused"})
    );
    assert_eq!(ctl(&socket, "status").json()["state"], "paused");
    // Output already in the pipe drains; after that, nothing new while paused.
    std::thread::sleep(Duration::from_millis(100));
    let at_pause = ticks(&mut running);
    std::thread::sleep(Duration::from_millis(700));
    assert_eq!(
        ticks(&mut running),
        at_pause,
        "the paused guest kept running"
    );

    let reply = ctl(&socket, "resume");
    assert_eq!(
        reply.json(),
        serde_json::json!({"ok": true, "state": "running"})
    );
    let next = format!("tick {}", at_pause + 3);
    assert!(
        running.wait_for(true, &next, Duration::from_secs(10)),
        "no progress after resume: {}",
        running.dump()
    );

    // Shutdown of a paused VM resumes it, so the guest sees the button.
    assert_eq!(ctl(&socket, "pause").code, Some(0));
    let reply = ctl(&socket, "shutdown");
    assert_eq!(reply.json()["state"], "shutting_down");
    let out = running.finish(Duration::from_secs(10));
    assert_eq!(out.code(), Some(0), "{}", out.dump());
    assert!(
        out.stdout.contains("shutdown: power button pressed"),
        "{}",
        out.dump()
    );
}

#[test]
fn a_paused_vm_cannot_be_paused_while_shutting_down() {
    let vm = VmDir::new();
    let json = serde_json::json!({
        "kernel": {"path": testguest("pvh"), "cmdline": "test=hang"},
        "machine": {"vcpus": 1, "memory_mib": 64, "shutdown_timeout_secs": 1},
        "api_socket": "api.sock",
    });
    let mut running = start(&vm.write_config(&json.to_string()));
    assert!(running.wait_for(true, "testguest: hanging", Duration::from_secs(20)));
    let socket = vm.path("api.sock");
    assert_eq!(ctl(&socket, "shutdown").code, Some(0));
    let reply = ctl(&socket, "pause");
    assert_eq!(reply.code, Some(1), "{}", reply.stdout);
    let err = reply.json();
    assert_eq!(err["ok"], false);
    assert!(
        err["error"].as_str().unwrap().contains("shutting down"),
        "{err}"
    );
    // The hanging guest ignores the button: forced stop after the grace period.
    let out = running.finish(Duration::from_secs(10));
    assert_eq!(out.code(), Some(1), "{}", out.dump());
    assert!(
        out.stderr.contains("(a control-socket request)"),
        "{}",
        out.dump()
    );
}

#[test]
fn ctl_without_a_vm_exits_2_naming_the_socket() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("nothing-here.sock");
    let reply = ctl(&socket, "status");
    assert_eq!(reply.code, Some(2));
    assert!(reply.stdout.is_empty());
    assert!(
        reply.stderr.contains(&socket.display().to_string()),
        "{}",
        reply.stderr
    );
}

#[test]
fn a_stale_socket_file_is_replaced() {
    let vm = VmDir::new();
    // Left behind by a VM that was killed.
    drop(std::os::unix::net::UnixListener::bind(vm.path("api.sock")).unwrap());
    // A child forked by a parallel test may hold that listener until it execs.
    while std::os::unix::net::UnixStream::connect(vm.path("api.sock")).is_ok() {
        std::thread::sleep(Duration::from_millis(5));
    }
    let (running, socket) = waiting_vm(&vm, false);
    assert_eq!(ctl(&socket, "status").json()["state"], "running");
    assert_eq!(ctl(&socket, "shutdown").code, Some(0));
    let out = running.finish(Duration::from_secs(10));
    assert_eq!(out.code(), Some(0), "{}", out.dump());
}

#[test]
fn a_config_with_a_bad_socket_path_is_refused() {
    let vm = VmDir::new();
    std::fs::write(vm.path("taken"), b"not a socket").unwrap();
    let json = serde_json::json!({
        "kernel": {"path": testguest("pvh")},
        "machine": {"vcpus": 1, "memory_mib": 64},
        "api_socket": "taken",
    });
    let out = run_config(&vm.write_config(&json.to_string()), Duration::from_secs(20));
    assert_eq!(out.code(), Some(2), "{}", out.dump());
    assert!(
        out.stderr.contains("`api_socket`") && out.stderr.contains("is not a socket"),
        "{}",
        out.dump()
    );
    assert_eq!(std::fs::read(vm.path("taken")).unwrap(), b"not a socket");
}
