//! virtio-fs end to end against the real (Rust) virtiofsd: the test guest's FUSE client reads
//! a host file and creates, writes and fsyncs a new one; a "journal" share; virtiofsd killed
//! and restarted under a running VM; a socket that is missing or late at start.

mod common;

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use common::virtiofsd::Virtiofsd;
use common::*;

const TIMEOUT: Duration = Duration::from_secs(60);

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn share_config(vm: &VmDir, cmdline: &str, machine_id: Option<&str>) -> PathBuf {
    let mut json = serde_json::json!({
        "kernel": {"path": testguest("pvh"), "cmdline": cmdline},
        "machine": {"vcpus": 1, "memory_mib": 64},
        "shares": [{"tag": "myfs", "socket": "fs.sock", "connect_timeout_secs": 10}],
    });
    if let Some(id) = machine_id {
        json["machine_id"] = id.into();
    }
    vm.write_config(&json.to_string())
}

#[test]
fn guest_reads_a_host_file_and_writes_a_new_one() {
    let vm = VmDir::new();
    let shared = vm.path("shared");
    std::fs::create_dir_all(shared.join("dir")).unwrap();
    let content = pseudo_random_bytes(3000, 5);
    std::fs::write(shared.join("dir/hello.bin"), &content).unwrap();
    let _fsd = Virtiofsd::start(&vm.path("fs.sock"), &shared);

    let cmdline = "test=fs fs.tag=myfs fs.read=dir/hello.bin fs.write=out/new.txt fs.token=t42";
    let out = run_config(&share_config(&vm, cmdline, None), TIMEOUT);
    assert_eq!(out.code(), Some(0), "{}", out.dump());
    let s = &out.stdout;
    assert!(s.contains("fs: init ok"), "{}", out.dump());
    assert_eq!(
        line_value(s, "fs: read "),
        Some("3000 bytes"),
        "{}",
        out.dump()
    );
    assert_eq!(
        line_value(s, "fs: content-hex="),
        Some(hex(&content).as_str()),
        "{}",
        out.dump()
    );
    assert!(
        s.contains("fs: fsync ok") && !s.contains("fs: error"),
        "{}",
        out.dump()
    );
    assert_eq!(
        std::fs::read(shared.join("out/new.txt")).unwrap(),
        b"mvmm-fs t42\n"
    );
}

#[test]
fn journal_share_lands_where_the_host_journal_looks() {
    let vm = VmDir::new();
    let machine_id = "5c2a9b0e7d3f4e1a8b6c0d9e8f7a6b5c";
    // The share's source, as in microvm.nix's journald FAQ.
    let journal = vm.path("microvms/test/journal");
    std::fs::create_dir_all(&journal).unwrap();
    std::fs::write(journal.join("hello.txt"), b"x").unwrap();
    let _fsd = Virtiofsd::start(&vm.path("fs.sock"), &journal);

    let cmdline = format!(
        "test=fs fs.tag=myfs fs.read=hello.txt fs.write={machine_id}/system.journal fs.token=journal"
    );
    let out = run_config(&share_config(&vm, &cmdline, Some(machine_id)), TIMEOUT);
    assert_eq!(out.code(), Some(0), "{}", out.dump());

    // The tmpfiles rule: /var/log/journal/<machine_id> -> the share's <machine_id> directory.
    let var_log_journal = vm.path("var/log/journal");
    std::fs::create_dir_all(&var_log_journal).unwrap();
    std::os::unix::fs::symlink(journal.join(machine_id), var_log_journal.join(machine_id)).unwrap();
    let via_link = std::fs::read(var_log_journal.join(machine_id).join("system.journal")).unwrap();
    assert_eq!(via_link, b"mvmm-fs journal\n", "{}", out.dump());
}

#[test]
fn virtiofsd_killed_and_restarted_under_a_running_vm() {
    let vm = VmDir::new();
    let shared = vm.path("shared");
    std::fs::create_dir_all(&shared).unwrap();
    std::fs::write(shared.join("hello.txt"), b"hello from the host\n").unwrap();
    let socket = vm.path("fs.sock");
    let mut fsd = Virtiofsd::start(&socket, &shared);

    let cmdline = "test=fs-wait fs.tag=myfs fs.read=hello.txt fs.marker=marker";
    let config = share_config(&vm, cmdline, None);
    let mut cmd = Command::new(mvmm_bin());
    cmd.args(["--config", config.to_str().unwrap()]);
    let mut mvmm = Watched::spawn(cmd);
    assert!(
        mvmm.wait_for(true, "fs: fsync ok", TIMEOUT),
        "{}",
        mvmm.dump()
    );

    // Kill the backend: mvmm must stay up and say so.
    fsd.kill();
    assert!(
        mvmm.wait_for(false, socket.to_str().unwrap(), Duration::from_secs(10)),
        "mvmm did not log the lost backend:\n{}",
        mvmm.dump()
    );
    assert!(
        mvmm.child.try_wait().unwrap().is_none(),
        "mvmm exited:\n{}",
        mvmm.dump()
    );
    std::fs::remove_file(&socket).ok();

    // Restart it on the same socket; the guest's next request succeeds.
    std::fs::write(shared.join("marker"), b"").unwrap();
    let _fsd = Virtiofsd::start(&socket, &shared);
    assert!(
        mvmm.wait_for(true, "fs: marker found", TIMEOUT),
        "{}",
        mvmm.dump()
    );
    assert!(
        mvmm.wait_for(true, "fs: reread ok 20 bytes", TIMEOUT),
        "{}",
        mvmm.dump()
    );
    let out = mvmm.finish(TIMEOUT);
    assert_eq!(out.code(), Some(0), "{}", out.dump());
}

#[test]
fn missing_socket_fails_with_exit_2_after_the_timeout() {
    let vm = VmDir::new();
    let json = serde_json::json!({
        "kernel": {"path": testguest("pvh")},
        "machine": {"vcpus": 1, "memory_mib": 64},
        "shares": [{"tag": "myfs", "socket": "absent.sock", "connect_timeout_secs": 1}],
    });
    let start = Instant::now();
    let out = run_config(&vm.write_config(&json.to_string()), TIMEOUT);
    assert_eq!(out.code(), Some(2), "{}", out.dump());
    assert!(
        start.elapsed() >= Duration::from_secs(1),
        "{:?}",
        start.elapsed()
    );
    assert!(out.stderr.contains("absent.sock"), "{}", out.dump());
    assert!(out.stderr.contains("shares[0].socket"), "{}", out.dump());
}

#[test]
fn socket_appearing_within_the_timeout_boots_normally() {
    let vm = VmDir::new();
    let shared = vm.path("shared");
    std::fs::create_dir_all(&shared).unwrap();
    std::fs::write(shared.join("hello.txt"), b"late").unwrap();
    let config = share_config(&vm, "test=fs fs.tag=myfs", None);
    let child = spawn_mvmm(&["--config", config.to_str().unwrap()]);
    std::thread::sleep(Duration::from_millis(1500));
    let _fsd = Virtiofsd::start(&vm.path("fs.sock"), &shared);
    let out = wait_with_timeout(child, TIMEOUT);
    assert_eq!(out.code(), Some(0), "{}", out.dump());
    assert_eq!(
        line_value(&out.stdout, "fs: content-hex="),
        Some(hex(b"late").as_str()),
        "{}",
        out.dump()
    );
}
