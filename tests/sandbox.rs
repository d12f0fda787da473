//! Seccomp: every thread of a running VM (and of a backend) is filtered; a forbidden system
//! call in any thread kind ends the process with exit code 3 and a line naming the thread
//! and the call; `--no-seccomp` runs unfiltered and says so.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::virtiofsd::Virtiofsd;
use common::*;

const TIMEOUT: Duration = Duration::from_secs(60);
/// acct(2), the call the test hook makes (`MVMM_SECCOMP_TEST_VIOLATION`).
const SYS_ACCT: i64 = libc::SYS_acct;

/// A VM with every kind of device: two disks, a tap (created by mvmm, gone when it exits) and
/// a virtio-fs share. The guest uses them in turn (blk, net, then fs) and waits on the share
/// for a marker file that never comes.
fn all_devices_config(vm: &VmDir, tap: &str) -> std::path::PathBuf {
    std::fs::write(vm.path("data.img"), vec![0u8; 1 << 20]).unwrap();
    std::fs::create_dir_all(vm.path("share")).unwrap();
    std::fs::write(vm.path("share/hello.txt"), b"hello\n").unwrap();
    let json = serde_json::json!({
        "kernel": {
            "path": testguest("pvh"),
            "cmdline": "test=blk test=net test=fs-wait blk.seed=5 net.token=sbx",
        },
        "machine": {"vcpus": 2, "memory_mib": 64},
        "disks": [{"path": "data.img"}, {"path": "data.img", "read_only": true}],
        "net": [{"tap": tap, "mac": "52:54:00:5b:c0:01"}],
        "shares": [{"tag": "sbx", "socket": vm.path("fs.sock")}],
    });
    vm.write_config(&json.to_string())
}

fn start_virtiofsd(vm: &VmDir) -> Virtiofsd {
    Virtiofsd::start(&vm.path("fs.sock"), &vm.path("share"))
}

fn mvmm_command(config: &Path, extra: &[&str]) -> Command {
    let mut cmd = Command::new(mvmm_bin());
    cmd.arg("--config").arg(config).args(extra);
    cmd
}

/// `mvmm backend blk` on a 1 MiB disk.img in `vm`, socket blk.sock.
fn blk_backend(vm: &VmDir) -> Command {
    std::fs::write(vm.path("disk.img"), vec![0u8; 1 << 20]).unwrap();
    let mut cmd = Command::new(mvmm_bin());
    cmd.args(["backend", "blk", "--socket"])
        .arg(vm.path("blk.sock"))
        .arg("--path")
        .arg(vm.path("disk.img"));
    cmd
}

/// The threads of `pid` once `settled` holds for them, or as they are after 5 s. A device
/// thread names and filters itself right after it is created, which can lag on a loaded host.
fn settled_threads(
    pid: u32,
    settled: impl Fn(&[(String, u32, u32)]) -> bool,
) -> Vec<(String, u32, u32)> {
    let mut threads = thread_seccomp(pid);
    for _ in 0..250 {
        if settled(&threads) {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
        threads = thread_seccomp(pid);
    }
    threads
}

/// Name → (Seccomp mode, number of filters) for every thread of `pid`.
fn thread_seccomp(pid: u32) -> Vec<(String, u32, u32)> {
    let mut threads = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let status = std::fs::read_to_string(task.unwrap().path().join("status")).unwrap();
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .map(|v| v.trim().to_owned())
                .unwrap_or_default()
        };
        threads.push((
            field("Name:"),
            field("Seccomp:").parse().unwrap_or(99),
            field("Seccomp_filters:").parse().unwrap_or(0),
        ));
    }
    threads.sort();
    threads
}

#[test]
fn every_thread_of_a_vm_using_all_devices_is_filtered() {
    let vm = VmDir::new();
    let config = all_devices_config(&vm, "mvsbx0");
    let _virtiofsd = start_virtiofsd(&vm);
    let mut run = Watched::spawn(mvmm_command(&config, &[]));
    // The guest has used every device (so every worker exists) and now spins.
    assert!(
        run.wait_for(true, "fs: content-hex=", TIMEOUT),
        "guest did not get through its device tests:\n{}",
        run.dump()
    );
    // A device thread runs its start hook (name, filter) right after the starter creates it;
    // on a loaded host that can lag behind the guest a little.
    let expected = [
        "mvmm",
        "vcpu0",
        "vcpu1",
        "thread-starter",
        "vhu-sbx",
        "net-mvsbx0",
    ];
    let threads = settled_threads(run.child.id(), |threads| {
        expected
            .iter()
            .all(|e| threads.iter().any(|(n, _, _)| n == e))
            && threads
                .iter()
                .filter(|(n, _, _)| n == "thread-starter")
                .count()
                == 1
    });
    let _ = run.child.kill();
    let out = run.finish(TIMEOUT);
    let names: Vec<&str> = threads.iter().map(|(n, _, _)| n.as_str()).collect();
    for expected in expected {
        assert!(
            names.contains(&expected),
            "{expected} missing in {threads:?}"
        );
    }
    assert_eq!(
        names.iter().filter(|n| n.starts_with("blk-")).count(),
        2,
        "{threads:?}"
    );
    for (name, mode, filters) in &threads {
        assert_eq!(
            *mode, 2,
            "thread {name} is not in seccomp filter mode: {threads:?}"
        );
        assert!(*filters >= 1, "thread {name}: {threads:?}");
    }
    assert!(out.stdout.contains("blk: done"), "{}", out.dump());
    assert!(out.stdout.contains("net: sent"), "{}", out.dump());
}

#[test]
fn a_forbidden_call_in_any_vm_thread_kind_exits_3_naming_thread_and_call() {
    // (thread kind, a thread name it reports)
    let kinds = [
        ("main", "(main)"),
        ("vcpu", "(vcpu"),
        ("thread-starter", "(thread-starter)"),
        ("blk", "(blk-"),
        ("net", "(net-mvsbx1)"),
        ("vhost-user", "(vhu-sbx)"),
    ];
    for (kind, thread) in kinds {
        let vm = VmDir::new();
        let config = all_devices_config(&vm, "mvsbx1");
        let _virtiofsd = start_virtiofsd(&vm);
        let mut cmd = mvmm_command(&config, &[]);
        cmd.env("MVMM_SECCOMP_TEST_VIOLATION", kind);
        let out = Watched::spawn(cmd).finish(TIMEOUT);
        assert_eq!(out.code(), Some(3), "{kind}: {}", out.dump());
        let line = format!("mvmm: seccomp: thread {kind} {thread}");
        assert!(
            out.stderr.contains(&line),
            "{kind}: want {line:?}\n{}",
            out.dump()
        );
        assert!(
            out.stderr.contains(&format!(
                "made forbidden system call {SYS_ACCT}; exiting with code 3"
            )),
            "{kind}: {}",
            out.dump()
        );
    }
}

#[test]
fn a_forbidden_call_in_a_backend_exits_3() {
    let vm = VmDir::new();
    let blk = blk_backend(&vm);
    // The tap is created by the backend and disappears with it.
    let mut net = Command::new(mvmm_bin());
    net.args(["backend", "net", "--tap", "mvsbx2", "--socket"])
        .arg(vm.path("net.sock"));
    for (kind, mut cmd) in [("backend-blk", blk), ("backend-net", net)] {
        cmd.env("MVMM_SECCOMP_TEST_VIOLATION", kind);
        let out = Watched::spawn(cmd).finish(TIMEOUT);
        assert_eq!(out.code(), Some(3), "{kind}: {}", out.dump());
        assert!(
            out.stderr
                .contains(&format!("mvmm: seccomp: thread {kind} (")),
            "{kind}: {}",
            out.dump()
        );
    }
}

#[test]
fn backend_threads_are_filtered_while_serving() {
    let vm = VmDir::new();
    let mut backend = Watched::spawn(blk_backend(&vm));
    assert!(
        backend.wait_for(false, "listening on", TIMEOUT),
        "{}",
        backend.dump()
    );
    // The serving thread starts and filters itself right after the log line; the main thread
    // filters itself right after starting it.
    let threads = settled_threads(backend.child.id(), |threads| {
        threads.len() >= 2 && threads.iter().all(|(_, mode, _)| *mode == 2)
    });
    let _ = backend.child.kill();
    backend.finish(TIMEOUT);
    assert!(threads.len() >= 2, "{threads:?}");
    for (name, mode, _) in &threads {
        assert_eq!(*mode, 2, "backend thread {name}: {threads:?}");
    }
}

#[test]
fn no_seccomp_runs_unfiltered_and_warns() {
    let config = VmDir::new();
    let path = config.write_config(&config_json(&testguest("pvh"), 1, 64, "test=hang"));
    let mut run = Watched::spawn(mvmm_command(&path, &["--no-seccomp"]));
    assert!(
        run.wait_for(true, "testguest: boot=", TIMEOUT),
        "{}",
        run.dump()
    );
    let threads = thread_seccomp(run.child.id());
    let _ = run.child.kill();
    let out = run.finish(TIMEOUT);
    assert!(
        out.stderr.contains("seccomp filters are OFF"),
        "{}",
        out.dump()
    );
    for (name, mode, _) in &threads {
        assert_eq!(
            *mode, 0,
            "{name} filtered despite --no-seccomp: {threads:?}"
        );
    }
}
