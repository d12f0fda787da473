//! Packaging, microvm.nix: the runner (resources/nix/) evaluates with Debian's
//! nix-instantiate to the expected vm.json, refuses what mvmm cannot do, produces configs the
//! schema and mvmm accept, and its runner package boots the test guest with bin/microvm-run,
//! stops it with bin/microvm-shutdown, and runs under `mvmm supervise` the way mvmm@.service
//! runs it.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use common::virtiofsd::{self, Virtiofsd};
use common::*;
use serde_json::Value;

const BOOT_TIMEOUT: Duration = Duration::from_secs(60);

/// nix-instantiate, installed once (Debian's nix-bin) by resources/nix/install-nix.sh.
fn nix_instantiate() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let out = Command::new("bash")
            .arg(repo("resources/nix/install-nix.sh"))
            .output()
            .expect("run install-nix.sh");
        assert!(
            out.status.success(),
            "install-nix.sh failed:\n{}",
            text(&out)
        );
        let stdout = String::from_utf8(out.stdout).unwrap();
        let path = stdout
            .lines()
            .find_map(|l| l.strip_prefix("NIX_INSTANTIATE="))
            .expect("NIX_INSTANTIATE= line");
        PathBuf::from(path)
    })
}

/// nix-instantiate without a daemon or a store (`--store dummy://`), its state and cache in a
/// throwaway directory (kept alive by the returned guard).
fn nix_command() -> (Command, tempfile::TempDir) {
    let state = tempfile::tempdir().unwrap();
    let mut cmd = Command::new(nix_instantiate());
    cmd.args(["--store", "dummy://"])
        .env("NIX_STATE_DIR", state.path().join("state"))
        .env("NIX_LOG_DIR", state.path().join("log"))
        .env("XDG_CACHE_HOME", state.path().join("cache"));
    (cmd, state)
}

/// `nix-instantiate --eval --strict --json resources/nix/test.nix` with `args` (pairs for
/// --argstr; none: the whole result set).
fn eval_test_nix(args: &[(&str, &str)]) -> Output {
    let (mut cmd, _state) = nix_command();
    cmd.args(["--eval", "--strict", "--json"])
        .arg(repo("resources/nix/test.nix"));
    if args.is_empty() {
        cmd.args(["--arg", "case", "null"]);
    }
    for (name, value) in args {
        cmd.args(["--argstr", name, value]);
    }
    cmd.output().expect("run nix-instantiate")
}

fn eval_json(args: &[(&str, &str)]) -> Value {
    let out = eval_test_nix(args);
    assert!(
        out.status.success(),
        "test.nix {args:?} failed:\n{}",
        text(&out)
    );
    serde_json::from_slice(&out.stdout).expect("nix-instantiate printed JSON")
}

#[test]
fn nix_runner_evaluates_to_the_expected_vm_json() {
    let start = Instant::now();
    let got = eval_json(&[]);
    let expected_path = repo("resources/nix/test.expected.json");
    let expected: Value =
        serde_json::from_str(&std::fs::read_to_string(&expected_path).unwrap()).unwrap();
    assert!(
        got == expected,
        "test.nix no longer evaluates to {}; if the change is intended, regenerate it with\n  \
         nix-instantiate --store dummy:// --eval --strict --json resources/nix/test.nix \
         --arg case null | python3 -m json.tool > resources/nix/test.expected.json\n\
         --- got ---\n{}",
        expected_path.display(),
        serde_json::to_string_pretty(&got).unwrap()
    );
    eprintln!("test.nix evaluated in {:?}", start.elapsed());
}

#[test]
fn nix_runner_refuses_what_mvmm_cannot_do() {
    for (case, message) in [
        (
            "ninep",
            "share journal uses 9p; mvmm supports virtio-fs only: set proto = \"virtiofs\"",
        ),
        (
            "balloon",
            "microvm.balloon: mvmm has no virtio-balloon device",
        ),
        (
            "hotplug",
            "microvm.hotplugMem: mvmm has no virtio-mem device",
        ),
        (
            "devices",
            "microvm.devices: mvmm has no PCI/USB passthrough",
        ),
        (
            "macvtap",
            "has type \"macvtap\"; mvmm supports type = \"tap\" only",
        ),
        ("serial", "must be 1 to 20 bytes (the virtio-blk ID)"),
        ("tapname", "must be 1 to 15 bytes (a Linux interface name)"),
        ("machineid", "is not 32 lowercase hex digits"),
        ("aarch64", "mvmm runs x86_64-linux guests only"),
    ] {
        let out = eval_test_nix(&[("case", case)]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "case {case} evaluated");
        assert!(
            stderr.contains(message),
            "case {case}: expected {message:?} in\n{stderr}"
        );
    }
}

#[test]
fn every_nix_file_parses() {
    // module.nix and mvmm.nix need nixpkgs to evaluate fully; parsing catches syntax errors in
    // all of them (test.nix evaluates the rest).
    let dir = repo("resources/nix");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "nix"))
        .collect();
    files.sort();
    assert!(files.len() >= 5, "{files:?}");
    for file in files {
        let (mut cmd, _state) = nix_command();
        let out = cmd.arg("--parse").arg(&file).output().unwrap();
        assert!(out.status.success(), "{}:\n{}", file.display(), text(&out));
    }
}

/// resources/schema/check.py's validator (built-in, as the CI uses) and its semantic checks
/// (without the file checks) on `config`: the error lines.
fn schema_errors(config: &Value) -> Vec<String> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("vm.json");
    std::fs::write(&path, config.to_string()).unwrap();
    const SCRIPT: &str = "
import json, sys
from pathlib import Path
sys.path.insert(0, sys.argv[1])
import check
_, validate = check.make_validator(check.load_json(check.SCHEMA_PATH), True, False)
config = check.load_json(sys.argv[2])
for e in validate(config) + check.semantic_errors(config, Path(sys.argv[2]).parent, False):
    print(e)
";
    let out = Command::new("python3")
        .args(["-c", SCRIPT])
        .arg(repo("resources/schema"))
        .arg(&path)
        .output()
        .expect("python3");
    assert!(out.status.success(), "check.py failed:\n{}", text(&out));
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect()
}

#[test]
fn generated_vm_json_passes_the_schema_check() {
    let got = eval_json(&[]);
    for key in ["vmJson", "minimalVmJson"] {
        let errors = schema_errors(&got[key]);
        assert!(errors.is_empty(), "{key}: {errors:#?}");
    }
    // The same check notices a wrong config.
    let mut bad = got["vmJson"].clone();
    bad["net"][0]["mac"] = "01:00:00:00:00:01".into(); // multicast
    assert!(!schema_errors(&bad).is_empty(), "a multicast MAC passed");
}

/// A built runner package of test.nix's `case` (boot or hang) for a VM whose files are in
/// `dir`: its inputs written as the stand-in store paths under dir/store, then its build
/// script run with $out set. Returns the plan (with `out` and `vmJson`).
fn build_runner_package(dir: &Path, case: &str) -> Value {
    let mvmm_pkg = dir.join("mvmm");
    std::fs::create_dir_all(mvmm_pkg.join("bin")).unwrap();
    let _ = std::os::unix::fs::symlink(mvmm_bin(), mvmm_pkg.join("bin/mvmm"));
    std::fs::create_dir_all(dir.join("journal")).unwrap();
    std::fs::write(dir.join("initrd"), b"initrd").unwrap();
    std::fs::File::create(dir.join("store.img"))
        .unwrap()
        .set_len(MIB)
        .unwrap();
    let _ = std::os::unix::fs::symlink(testguest("pvh"), dir.join("vmlinux"));

    let store = dir.join("store");
    let plan = eval_json(&[
        ("case", case),
        ("bootDir", dir.to_str().unwrap()),
        ("storeDir", store.to_str().unwrap()),
        ("mvmmPackage", mvmm_pkg.to_str().unwrap()),
    ]);
    std::fs::create_dir_all(&store).unwrap();
    for input in plan["inputs"].as_array().unwrap() {
        let path = Path::new(input["path"].as_str().unwrap());
        std::fs::write(path, input["text"].as_str().unwrap()).unwrap();
        if input["executable"].as_bool().unwrap() {
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
    }
    let out = Command::new("bash")
        .args(["-euo", "pipefail", "-c", plan["script"].as_str().unwrap()])
        .env("out", plan["out"].as_str().unwrap())
        .output()
        .unwrap();
    assert!(out.status.success(), "build script failed:\n{}", text(&out));
    plan
}

/// bin/microvm-run of a built package, in a network namespace of its own (its tap is created
/// there and goes away with it), with PATH reaching mkfs.ext4.
fn microvm_run(out: &Path) -> Command {
    let mut cmd = Command::new("unshare");
    cmd.arg("--net").arg(out.join("bin/microvm-run")).env(
        "PATH",
        "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    );
    cmd
}

#[test]
fn runner_package_boots_the_test_guest() {
    let dir = tempfile::tempdir().unwrap();
    let plan = build_runner_package(dir.path(), "boot");
    let out = PathBuf::from(plan["out"].as_str().unwrap());

    // The layout microvm.nix's host module and `mvmm supervise` read.
    let vm_json: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("vm.json")).unwrap()).unwrap();
    assert_eq!(vm_json, plan["vmJson"], "current/vm.json");
    for bin in ["microvm-run", "microvm-shutdown", "create-volumes"] {
        assert!(out.join("bin").join(bin).is_file(), "bin/{bin} missing");
    }
    let share = out.join("share/microvm");
    let read = |p: &str| std::fs::read_to_string(share.join(p)).unwrap();
    assert_eq!(read("tap-interfaces"), "mvmm-nix0\n");
    assert_eq!(read("virtiofs/journal/socket"), "journal.sock\n");
    assert_eq!(
        read("virtiofs/journal/source").trim_end(),
        dir.path().join("journal").to_str().unwrap()
    );

    // The share's virtiofsd, as microvm.nix's virtiofsd-run or the supervisor would start it.
    let _fsd = Virtiofsd::start(
        &dir.path().join("journal.sock"),
        &dir.path().join("journal"),
    );
    let var = dir.path().join("var.img");
    assert!(!var.exists());
    let run = wait_with_timeout(
        microvm_run(&out)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap(),
        BOOT_TIMEOUT,
    );
    assert_eq!(run.code(), Some(0), "{}", run.dump());
    assert!(run.stdout.contains("testguest: done"), "{}", run.dump());

    // microvm-run made the autoCreate volume: 16 MiB of ext4 (superblock magic 0xEF53 at
    // byte 1080), labelled "var".
    let image = std::fs::read(&var).unwrap();
    assert_eq!(image.len() as u64, 16 * MIB);
    assert_eq!(&image[1080..1082], &[0x53, 0xef], "var.img is not ext4");
    assert_eq!(&image[1024 + 120..1024 + 124], b"var\0", "volume label");
    // A second start keeps the volume as it is.
    let modified = std::fs::metadata(&var).unwrap().modified().unwrap();
    let again = Command::new(out.join("bin/create-volumes"))
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .output()
        .unwrap();
    assert!(again.status.success(), "{}", text(&again));
    assert_eq!(
        std::fs::metadata(&var).unwrap().modified().unwrap(),
        modified
    );
}

/// The notifications (sd_notify datagrams) that arrive on `socket` until one has a line `want`
/// or `timeout` passes.
fn notifications_until(
    socket: &std::os::unix::net::UnixDatagram,
    want: &str,
    timeout: Duration,
) -> Vec<String> {
    let deadline = Instant::now() + timeout;
    let mut messages = Vec::new();
    let mut buf = [0u8; 4096];
    while !messages
        .iter()
        .any(|m: &String| m.lines().any(|l| l == want))
    {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        socket.set_read_timeout(Some(left)).unwrap();
        match socket.recv(&mut buf) {
            Ok(n) => messages.push(String::from_utf8_lossy(&buf[..n]).into_owned()),
            Err(_) => break,
        }
    }
    messages
}

#[test]
fn supervisor_runs_the_runner_package() {
    // What mvmm@.service does with a microvm.nix VM: create-volumes (ExecStartPre), then
    // `mvmm supervise <name>` on <state-dir>/<name>/current = the runner package, which starts
    // the share's virtiofsd from `source` and tells systemd READY=1; `systemctl stop` is a
    // SIGTERM to the supervisor alone (KillMode=mixed).
    let dir = tempfile::tempdir().unwrap();
    let plan = build_runner_package(dir.path(), "hang");
    let state = dir.path().join("state");
    let vm_dir = state.join("hang");
    std::fs::create_dir_all(&vm_dir).unwrap();
    std::os::unix::fs::symlink(plan["out"].as_str().unwrap(), vm_dir.join("current")).unwrap();
    let volumes = Command::new(vm_dir.join("current/bin/create-volumes"))
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .output()
        .unwrap();
    assert!(volumes.status.success(), "{}", text(&volumes));

    let notify_path = dir.path().join("notify.sock");
    let notify = std::os::unix::net::UnixDatagram::bind(&notify_path).unwrap();
    let mut cmd = Command::new("unshare");
    cmd.arg("--net")
        .arg(mvmm_bin())
        .args(["supervise", "hang", "--state-dir"])
        .arg(&state)
        .arg("--virtiofsd")
        .arg(virtiofsd::virtiofsd_bin())
        .env("NOTIFY_SOCKET", &notify_path);
    let mut vm = Watched::spawn(cmd);
    let ready = notifications_until(&notify, "READY=1", BOOT_TIMEOUT);
    assert!(
        ready.iter().any(|m| m.lines().any(|l| l == "READY=1")),
        "no READY=1 among {ready:?}\n{}",
        vm.dump()
    );
    assert!(
        vm.wait_for(true, "testguest: hanging", BOOT_TIMEOUT),
        "{}",
        vm.dump()
    );
    assert_eq!(
        std::fs::read_link(vm_dir.join("booted")).unwrap(),
        Path::new(plan["out"].as_str().unwrap())
    );

    // The guest ignores the power button: after its 1 s grace period mvmm stops it (exit 1),
    // and the supervisor exits with that code.
    let kill = Command::new("kill")
        .args(["-TERM", &vm.child.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    let stopping = notifications_until(&notify, "STOPPING=1", Duration::from_secs(10));
    let run = vm.finish(Duration::from_secs(10));
    assert_eq!(run.code(), Some(1), "{}", run.dump());
    assert!(
        stopping
            .iter()
            .any(|m| m.lines().any(|l| l == "STOPPING=1")),
        "no STOPPING=1 among {stopping:?}\n{}",
        run.dump()
    );
}

#[test]
fn microvm_shutdown_stops_a_running_vm() {
    let dir = tempfile::tempdir().unwrap();
    let plan = build_runner_package(dir.path(), "hang");
    let out = PathBuf::from(plan["out"].as_str().unwrap());
    let socket = PathBuf::from(plan["vmJson"]["api_socket"].as_str().unwrap());

    let _fsd = Virtiofsd::start(
        &dir.path().join("journal.sock"),
        &dir.path().join("journal"),
    );
    let mut vm = Watched::spawn(microvm_run(&out));
    assert!(
        vm.wait_for(true, "testguest: hanging", BOOT_TIMEOUT),
        "the guest never started:\n{}",
        vm.dump()
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while !socket.exists() {
        assert!(
            Instant::now() < deadline,
            "no api_socket {}",
            socket.display()
        );
        std::thread::sleep(Duration::from_millis(10));
    }

    // The guest ignores the power button: mvmm stops it after its 1 s grace period, and
    // microvm-shutdown returns once mvmm is gone.
    let start = Instant::now();
    let shutdown = Command::new(out.join("bin/microvm-shutdown"))
        .output()
        .unwrap();
    assert!(
        shutdown.status.success(),
        "microvm-shutdown:\n{}",
        text(&shutdown)
    );
    let took = start.elapsed();
    // mvmm is gone by now (give its exit a moment after the socket went): it stopped the guest
    // after the 1 s grace period with exit 1. Still running means microvm-shutdown did not
    // wait; it is killed then, and has no exit code.
    assert!(
        took >= Duration::from_millis(900),
        "returned after {took:?}, before the grace period ended"
    );
    let run = vm.finish(Duration::from_millis(500));
    assert_eq!(
        run.code(),
        Some(1),
        "mvmm after microvm-shutdown returned:\n{}",
        run.dump()
    );
    assert!(
        took < Duration::from_secs(11),
        "microvm-shutdown took {took:?}"
    );
    eprintln!("microvm-shutdown returned after {took:?}");
    assert!(!socket.exists(), "mvmm left its api_socket behind");
}
