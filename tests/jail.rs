//! `jail`: a VM confined by mvmm itself (PID/mount namespaces, chroot, setuid, rlimits) still
//! serves its disk and share, reconnects a restarted virtiofsd through the bind-mounted socket
//! directory, and stops gracefully on SIGTERM sent to the outer process.

mod common;

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use common::virtiofsd::Virtiofsd;
use common::*;

const TIMEOUT: Duration = Duration::from_secs(60);
const NOBODY: u32 = 65534;

fn jailed_config(vm: &VmDir, cmdline: &str) -> PathBuf {
    std::fs::create_dir_all(vm.path("jail")).unwrap();
    std::fs::create_dir_all(vm.path("run/share")).unwrap();
    std::fs::write(vm.path("run/share/hello.txt"), b"jailed\n").unwrap();
    std::fs::write(vm.path("data.img"), vec![0u8; 1 << 20]).unwrap();
    let json = serde_json::json!({
        "kernel": {"path": testguest("pvh"), "cmdline": cmdline},
        "machine": {"vcpus": 1, "memory_mib": 64, "shutdown_timeout_secs": 5},
        "disks": [{"path": "data.img"}],
        "shares": [{"tag": "jt", "socket": vm.path("run/fs.sock")}],
        "jail": {
            "root": "jail",
            "uid": NOBODY,
            "gid": NOBODY,
            "rlimits": {"nofile": 256, "core": 0},
        },
    });
    vm.write_config(&json.to_string())
}

/// The single child of `parent` (the VM process inside the PID namespace).
fn vm_process(parent: u32) -> u32 {
    for _ in 0..200 {
        let children = std::fs::read_to_string(format!("/proc/{parent}/task/{parent}/children"))
            .unwrap_or_default();
        if let Some(pid) = children.split_whitespace().next() {
            return pid.parse().unwrap();
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    panic!("mvmm {parent} started no VM process");
}

fn status_field(pid: u32, name: &str) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(name))
        .unwrap_or_default()
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
}

#[test]
fn jailed_vm_is_confined_and_reconnects_a_restarted_virtiofsd() {
    let vm = VmDir::new();
    let config = jailed_config(&vm, "test=blk test=fs-wait blk.seed=9");
    let mut virtiofsd = Virtiofsd::start(&vm.path("run/fs.sock"), &vm.path("run/share"));
    let mut cmd = Command::new(mvmm_bin());
    cmd.arg("--config").arg(&config);
    let mut run = Watched::spawn(cmd);
    assert!(
        run.wait_for(true, "fs: content-hex=", TIMEOUT),
        "{}",
        run.dump()
    );
    let child = vm_process(run.child.id());

    // Confinement, as the kernel reports it.
    assert_eq!(status_field(child, "Uid:"), "65534 65534 65534 65534");
    assert_eq!(status_field(child, "Gid:"), "65534 65534 65534 65534");
    assert_eq!(status_field(child, "Groups:"), "");
    assert!(
        status_field(child, "NSpid:").ends_with(" 1"),
        "not PID 1 of a new namespace: {}",
        status_field(child, "NSpid:")
    );
    assert_eq!(status_field(child, "Seccomp:"), "2");
    assert_eq!(status_field(run.child.id(), "Seccomp:"), "2");
    let root = std::fs::read_link(format!("/proc/{child}/root")).unwrap();
    assert_eq!(root, vm.path("jail").canonicalize().unwrap());
    let ns = |pid: &str| std::fs::read_link(format!("/proc/{pid}/ns/mnt")).unwrap();
    assert_ne!(ns(&child.to_string()), ns("self"));
    let limits = std::fs::read_to_string(format!("/proc/{child}/limits")).unwrap();
    assert!(
        limits
            .lines()
            .any(|l| l.starts_with("Max open files") && l.contains(" 256 ")),
        "{limits}"
    );
    // The bind mount stayed inside the VM's mount namespace.
    let host_mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(!host_mounts.contains(vm.path("jail").to_str().unwrap()));

    // virtiofsd dies and comes back: the jailed VM reconnects through the bind mount.
    virtiofsd.kill();
    // SIGKILL leaves the socket file; waiting for the new one must not find the old one.
    let _ = std::fs::remove_file(vm.path("run/fs.sock"));
    std::thread::sleep(Duration::from_millis(300));
    let _virtiofsd = Virtiofsd::start(&vm.path("run/fs.sock"), &vm.path("run/share"));
    // The jailed VM runs as nobody now: the new socket and its directories must let it
    // connect (what virtiofsd's --socket-group and the state dir's modes do in a deployment).
    use std::os::unix::fs::PermissionsExt;
    let mode = |path: PathBuf, mode| {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap()
    };
    mode(vm.path(""), 0o755);
    mode(vm.path("run"), 0o755);
    mode(vm.path("run/fs.sock"), 0o666);

    std::fs::write(vm.path("run/share/marker"), b"").unwrap();
    let out = run.finish(TIMEOUT);
    assert_eq!(out.code(), Some(0), "{}", out.dump());
    assert!(out.stdout.contains("blk: done"), "{}", out.dump());
    assert!(out.stdout.contains("fs: marker found"), "{}", out.dump());
    assert!(out.stderr.contains("jailed in"), "{}", out.dump());
}

#[test]
fn sigterm_to_the_outer_process_shuts_the_jailed_guest_down() {
    let vm = VmDir::new();
    let config = jailed_config(&vm, "test=shutdown-wait");
    let _virtiofsd = Virtiofsd::start(&vm.path("run/fs.sock"), &vm.path("run/share"));
    let mut cmd = Command::new(mvmm_bin());
    cmd.arg("--config").arg(&config);
    let mut run = Watched::spawn(cmd);
    assert!(run.wait_for(false, "jailed in", TIMEOUT), "{}", run.dump());
    // SAFETY: signalling our own child.
    unsafe { libc::kill(run.child.id() as i32, libc::SIGTERM) };
    let out = run.finish(Duration::from_secs(10));
    assert_eq!(out.code(), Some(0), "{}", out.dump());
    assert!(out.elapsed < Duration::from_secs(5), "{:?}", out.elapsed);
}

#[test]
fn a_missing_jail_root_is_a_config_error() {
    let vm = VmDir::new();
    let config = jailed_config(&vm, "test=poweroff");
    std::fs::remove_dir(vm.path("jail")).unwrap();
    let _virtiofsd = Virtiofsd::start(&vm.path("run/fs.sock"), &vm.path("run/share"));
    let out = run_config(&config, TIMEOUT);
    assert_eq!(out.code(), Some(2), "{}", out.dump());
    assert!(
        out.stderr.contains("jail") && out.stderr.contains("is not a directory"),
        "{}",
        out.dump()
    );
}
