//! `mvmm supervise` end to end with the test guest, under a temporary state directory: two
//! shares served by real virtiofsds the supervisor starts, a tap it creates, two disks, mvmm as
//! nobody; READY=1/STOPPING=1 on a notify socket, the `booted` and journal links, a killed
//! virtiofsd restarted under the running VM, SIGTERM stopping everything. Bad state
//! directories and configs exit 2 having started nothing. `mvmm list` compares generations.

mod common;

use std::os::unix::fs::{symlink, PermissionsExt};
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::virtiofsd::virtiofsd_bin;
use common::*;

const TIMEOUT: Duration = Duration::from_secs(60);
const MACHINE_ID: &str = "5c2a9b0e7d3f4e1a8b6c0d9e8f7a6b5c";
const NOBODY: u32 = 65534;
const SEED: u64 = 9;

/// A state directory with one VM whose `current` points at a generation holding vm.json.
struct State {
    root: tempfile::TempDir,
    name: String,
    tap: String,
}

impl State {
    fn new(tag: &str) -> Self {
        let root = tempfile::tempdir().unwrap();
        // mvmm runs as nobody: it must reach the sockets under the root.
        std::fs::set_permissions(root.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let name = "vm1".to_owned();
        let vm_dir = root.path().join("state").join(&name);
        std::fs::create_dir_all(&vm_dir).unwrap();
        // microvm.nix gives the VM's directory to its user; mvmm creates its api socket there.
        std::os::unix::fs::chown(&vm_dir, Some(NOBODY), Some(NOBODY)).unwrap();
        for dir in ["run", "shares/data", "shares/journal", "gens", "journal"] {
            std::fs::create_dir_all(root.path().join(dir)).unwrap();
        }
        let tap = format!("mv{tag}{}", std::process::id() % 100_000);
        Self { root, name, tap }
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.root.path().join(rel)
    }

    fn state_dir(&self) -> PathBuf {
        self.path("state")
    }

    fn vm_dir(&self) -> PathBuf {
        self.state_dir().join(&self.name)
    }

    /// Writes generation `gen` with `vm.json` and points `current` at it.
    fn install(&self, gen: &str, vm_json: &str) -> PathBuf {
        let dir = self.path("gens").join(gen);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("vm.json"), vm_json).unwrap();
        let current = self.vm_dir().join("current");
        let _ = std::fs::remove_file(&current);
        symlink(&dir, &current).unwrap();
        dir
    }

    /// The full VM: two disks, a tap, two shares with sources, a machine id.
    fn full_config(&self, cmdline: &str) -> serde_json::Value {
        let store = self.path("store.img");
        let data = self.path("data.img");
        std::fs::write(&store, pseudo_random_bytes(1 << 20, 3)).unwrap();
        std::fs::write(&data, pseudo_random_bytes(2 << 20, 4)).unwrap();
        std::fs::write(self.path("shares/data/hello.txt"), b"hello from the host\n").unwrap();
        serde_json::json!({
            "kernel": {"path": testguest("pvh"), "cmdline": cmdline},
            "machine": {"vcpus": 1, "memory_mib": 64, "shutdown_timeout_secs": 2},
            "disks": [
                {"path": store, "read_only": true, "serial": "nix-store"},
                {"path": data},
            ],
            "net": [{"tap": self.tap, "mac": "52:54:00:12:34:58"}],
            // The test guest's FUSE client does not offer POSIX ACLs, which virtiofsd's
            // --posix-acl (on by default, as microvm.nix has it) requires at FUSE_INIT.
            "shares": [
                {"tag": "data", "socket": self.path("run/data.sock"),
                 "source": self.path("shares/data"),
                 "virtiofsd": {"cache": "never", "posix_acl": false}},
                {"tag": "journal", "socket": self.path("run/journal.sock"),
                 "source": self.path("shares/journal"),
                 "virtiofsd": {"posix_acl": false, "extra_args": ["--log-level=warn"]}},
            ],
            "machine_id": MACHINE_ID,
        })
    }

    fn supervise(&self, notify: Option<&Path>, extra: &[&str]) -> Command {
        let mut cmd = Command::new(mvmm_bin());
        cmd.arg("supervise")
            .arg(&self.name)
            .arg("--state-dir")
            .arg(self.state_dir())
            .arg("--virtiofsd")
            .arg(virtiofsd_bin())
            .arg("--journal-dir")
            .arg(self.path("journal"))
            .args(extra)
            .env_remove("NOTIFY_SOCKET");
        if let Some(notify) = notify {
            cmd.env("NOTIFY_SOCKET", notify);
        }
        cmd
    }

    /// Processes whose command line mentions this test's directory: virtiofsds, mvmm.
    fn processes(&self) -> Vec<(u32, String)> {
        processes_mentioning(self.root.path().to_str().unwrap())
    }
}

impl Drop for State {
    fn drop(&mut self) {
        // Whatever a failed test left running.
        for (pid, _) in self.processes() {
            // SAFETY: kill only sends a signal.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        }
    }
}

fn processes_mentioning(needle: &str) -> Vec<(u32, String)> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if cmdline.contains(needle) && pid != std::process::id() {
            found.push((pid, cmdline));
        }
    }
    found
}

fn comm(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .unwrap_or_default()
        .trim()
        .to_owned()
}

fn parent(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces; fields after its closing parenthesis are plain.
    let rest = &stat[stat.rfind(')')? + 2..];
    rest.split_whitespace().nth(1)?.parse().ok()
}

/// The virtiofsd children of `supervisor`, by the socket they serve.
fn virtiofsds(supervisor: u32) -> Vec<(u32, String)> {
    processes_mentioning("--socket-path=")
        .into_iter()
        .filter(|(pid, _)| parent(*pid) == Some(supervisor) && comm(*pid) == "virtiofsd")
        .collect()
}

fn find_child(supervisor: u32, name: &str, timeout: Duration) -> Option<u32> {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        for entry in std::fs::read_dir("/proc").unwrap().flatten() {
            if let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse().ok()) {
                if parent(pid) == Some(supervisor) && comm(pid) == name {
                    return Some(pid);
                }
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    None
}

/// A notify socket like systemd's: the supervisor's datagrams, in order.
struct NotifySocket {
    sock: UnixDatagram,
    path: PathBuf,
    seen: Vec<String>,
}

impl NotifySocket {
    fn bind(path: PathBuf) -> Self {
        let sock = UnixDatagram::bind(&path).unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        Self {
            sock,
            path,
            seen: Vec::new(),
        }
    }

    fn wait_for(&mut self, message: &str, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut buf = [0u8; 512];
        while !self.seen.iter().any(|m| m == message) && Instant::now() < deadline {
            if let Ok(n) = self.sock.recv(&mut buf) {
                self.seen
                    .push(String::from_utf8_lossy(&buf[..n]).into_owned());
            }
        }
        self.seen.iter().any(|m| m == message)
    }
}

fn is_up(tap: &str) -> bool {
    std::fs::read_to_string(format!("/sys/class/net/{tap}/flags"))
        .ok()
        .and_then(|f| u32::from_str_radix(f.trim().trim_start_matches("0x"), 16).ok())
        .is_some_and(|flags| flags & 1 != 0)
}

/// Whether process `pid` holds a tun/tap descriptor attached to `tap` (fdinfo `iff:`).
fn holds_tap(pid: u32, tap: &str) -> bool {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fdinfo")) else {
        return false;
    };
    dir.flatten().any(|e| {
        std::fs::read_to_string(e.path())
            .unwrap_or_default()
            .lines()
            .any(|l| l.strip_prefix("iff:").map(str::trim) == Some(tap))
    })
}

fn uid_of(pid: u32) -> Option<String> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("Uid:"))?;
    line.split_whitespace().nth(1).map(str::to_owned)
}

#[test]
fn supervised_vm_keeps_its_share_across_a_virtiofsd_restart() {
    let state = State::new("a");
    let cmdline = format!(
        "test=blk blk.seed={SEED} test=fs-wait fs.tag=data fs.read=hello.txt fs.marker=marker"
    );
    let gen = state.install("gen1", &state.full_config(&cmdline).to_string());
    let mut notify = NotifySocket::bind(state.path("notify.sock"));
    assert!(!tap_exists(&state.tap));

    let cmd = state.supervise(Some(&notify.path), &["--user", "nobody"]);
    let mut sup = Watched::spawn(cmd);
    let sup_pid = sup.child.id();
    assert!(
        notify.wait_for("READY=1", TIMEOUT),
        "no READY=1 ({:?})\n{}",
        notify.seen,
        sup.dump()
    );

    // Running: the booted link, the journal link, the tap, two virtiofsds, mvmm as nobody.
    let vm_dir = state.vm_dir();
    assert_eq!(std::fs::read_link(vm_dir.join("booted")).unwrap(), gen);
    assert_eq!(
        std::fs::read_link(state.path("journal").join(MACHINE_ID)).unwrap(),
        state.path("shares/journal").join(MACHINE_ID)
    );
    assert!(is_up(&state.tap), "tap {} missing or down", state.tap);
    let daemons = virtiofsds(sup_pid);
    assert_eq!(daemons.len(), 2, "{daemons:?}");
    let mvmm = find_child(sup_pid, "mvmm", Duration::from_secs(5)).expect("mvmm child");
    assert_eq!(uid_of(mvmm).as_deref(), Some("65534"));
    assert!(holds_tap(mvmm, &state.tap), "mvmm does not hold the tap");
    let list = Command::new(mvmm_bin())
        .args(["list", "--state-dir"])
        .arg(state.state_dir())
        .output()
        .unwrap();
    let list = String::from_utf8_lossy(&list.stdout).into_owned();
    assert!(
        list.starts_with("vm1  ") && list.trim_end().ends_with("up to date"),
        "{list}"
    );

    // The guest used its disks and the data share.
    assert!(
        sup.wait_for(true, "fs: fsync ok", TIMEOUT),
        "{}",
        sup.dump()
    );
    assert!(
        sup.stdout.contains("blk1: write+flush+read ok"),
        "{}",
        sup.dump()
    );

    // Kill the data share's virtiofsd: the supervisor restarts it under the running VM.
    let data_socket = format!("--socket-path={}", state.path("run/data.sock").display());
    let (old, _) = daemons
        .iter()
        .find(|(_, cmd)| cmd.contains(&data_socket))
        .cloned()
        .unwrap();
    // SAFETY: kill only sends a signal.
    unsafe { libc::kill(old as i32, libc::SIGKILL) };
    assert!(
        sup.wait_for(
            false,
            "share data: virtiofsd exited",
            Duration::from_secs(10)
        ),
        "{}",
        sup.dump()
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    let restarted = loop {
        let now = virtiofsds(sup_pid);
        if let Some((pid, _)) = now
            .iter()
            .find(|(pid, cmd)| *pid != old && cmd.contains(&data_socket))
        {
            break *pid;
        }
        assert!(
            Instant::now() < deadline,
            "no new virtiofsd:\n{}",
            sup.dump()
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(sup.child.try_wait().unwrap().is_none(), "{}", sup.dump());

    // The guest's next share request works through the new virtiofsd.
    std::fs::write(state.path("shares/data/marker"), b"").unwrap();
    assert!(
        sup.wait_for(true, "fs: reread ok 20 bytes", TIMEOUT),
        "{}",
        sup.dump()
    );

    // The guest ends: mvmm exits 0, and so does the supervisor, leaving nothing behind.
    let out = sup.finish(TIMEOUT);
    assert_eq!(out.code(), Some(0), "{}", out.dump());
    assert!(notify.wait_for("STOPPING=1", Duration::from_secs(1)));
    assert!(state.processes().is_empty(), "{:?}", state.processes());
    assert!(!Path::new(&format!("/proc/{restarted}")).exists());
    assert!(
        !Path::new(&format!("/proc/{mvmm}")).exists(),
        "mvmm still runs"
    );
    assert!(!tap_exists(&state.tap), "the created tap was not removed");
    assert!(std::fs::symlink_metadata(vm_dir.join("booted")).is_err());
    assert!(!vm_dir.join("mvmm.sock").exists());
    assert!(
        out.stderr.contains(&format!("removed tap {}", state.tap)),
        "{}",
        out.dump()
    );
}

fn tap_exists(name: &str) -> bool {
    Path::new("/sys/class/net").join(name).exists()
}

#[test]
fn sigterm_stops_the_vm_and_everything_around_it() {
    let state = State::new("b");
    // fs-wait without a marker keeps the guest busy for a minute.
    let cmdline = "test=fs-wait fs.tag=journal fs.read=none fs.write=x.txt";
    let gen1 = state.install("gen1", &state.full_config(cmdline).to_string());
    let mut notify = NotifySocket::bind(state.path("notify.sock"));
    let sup = Watched::spawn(state.supervise(Some(&notify.path), &["--user", "nobody"]));
    assert!(
        notify.wait_for("READY=1", TIMEOUT),
        "no READY=1 ({:?})\n{}",
        notify.seen,
        sup.dump()
    );
    assert_eq!(virtiofsds(sup.child.id()).len(), 2);

    // A new generation installed while the VM runs: list says a restart would apply it.
    let gen2 = state.install(
        "gen2",
        &std::fs::read_to_string(gen1.join("vm.json")).unwrap(),
    );
    let list = Command::new(mvmm_bin())
        .args(["list", "--state-dir"])
        .arg(state.state_dir())
        .output()
        .unwrap();
    assert_eq!(list.status.code(), Some(0));
    let words: Vec<String> = String::from_utf8_lossy(&list.stdout)
        .split_whitespace()
        .map(str::to_owned)
        .collect();
    let (gen1, gen2) = (gen1.display().to_string(), gen2.display().to_string());
    assert_eq!(
        words,
        ["vm1", &gen2, &gen1, "outdated,", "restart", "to", "apply"]
    );

    // SIGTERM: mvmm stops the VM (at once, or after the 2 s grace period if the guest does
    // not power off), the supervisor cleans up and exits with mvmm's code.
    let start = Instant::now();
    // SAFETY: kill only sends a signal.
    unsafe { libc::kill(sup.child.id() as i32, libc::SIGTERM) };
    assert!(
        notify.wait_for("STOPPING=1", Duration::from_secs(5)),
        "{:?}",
        notify.seen
    );
    let out = sup.finish(Duration::from_secs(20));
    assert!(matches!(out.code(), Some(0) | Some(1)), "{}", out.dump());
    assert!(
        start.elapsed() < Duration::from_secs(15),
        "{:?}",
        start.elapsed()
    );
    assert!(state.processes().is_empty(), "{:?}", state.processes());
    assert!(!tap_exists(&state.tap));
    let list = Command::new(mvmm_bin())
        .args(["list", "--state-dir"])
        .arg(state.state_dir())
        .output()
        .unwrap();
    let list = String::from_utf8_lossy(&list.stdout).into_owned();
    assert!(list.trim_end().ends_with("not booted"), "{list}");
}

/// Runs the supervisor on a broken setup: exit 2 naming `expect`, nothing started.
fn expect_refusal(state: &State, expect: &str) {
    let tap_before = tap_exists(&state.tap);
    let out = wait_with_timeout(
        {
            let mut cmd = state.supervise(None, &[]);
            cmd.stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped());
            cmd.spawn().unwrap()
        },
        TIMEOUT,
    );
    assert_eq!(out.code(), Some(2), "{expect}\n{}", out.dump());
    assert!(out.stderr.contains(expect), "{expect}\n{}", out.dump());
    assert!(state.processes().is_empty(), "{:?}", state.processes());
    assert_eq!(tap_exists(&state.tap), tap_before, "the tap was touched");
    assert!(!state.path("run/data.sock").exists());
    assert!(std::fs::symlink_metadata(state.vm_dir().join("booted")).is_err());
}

#[test]
fn bad_state_dirs_and_configs_exit_2_and_start_nothing() {
    let state = State::new("c");
    let good = state.full_config("");

    // No state directory at all.
    let missing = state.path("no-such-state");
    let out = Command::new(mvmm_bin())
        .args(["supervise", "vm1", "--state-dir"])
        .arg(&missing)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains(missing.to_str().unwrap()));

    // No `current`, then a dangling one.
    let current = state.vm_dir().join("current");
    expect_refusal(&state, &format!("{}: is missing", current.display()));
    symlink(state.path("gens/deleted"), &current).unwrap();
    expect_refusal(&state, "is a dangling link to");

    // vm.json that does not parse.
    state.install("gen1", "{ not json");
    expect_refusal(&state, "current/vm.json: config is not valid");

    // A share whose source is missing, or relative.
    let mut json = good.clone();
    json["shares"][0]["source"] = state.path("shares/absent").to_str().unwrap().into();
    state.install("gen1", &json.to_string());
    expect_refusal(&state, "`shares[0].source`");
    let mut json = good.clone();
    json["shares"][1]["source"] = "shares/journal".into();
    state.install("gen1", &json.to_string());
    expect_refusal(&state, "is relative");

    // Inherited descriptors are the supervisor's to create.
    let mut json = good.clone();
    json["disks"][0]["path"] = "fd:7".into();
    state.install("gen1", &json.to_string());
    expect_refusal(&state, "`disks[0].path` is an inherited descriptor");

    // A user that does not exist.
    state.install("gen1", &good.to_string());
    let out = wait_with_timeout(
        {
            let mut cmd = state.supervise(None, &["--user", "no-such-user-mvmm"]);
            cmd.stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped());
            cmd.spawn().unwrap()
        },
        TIMEOUT,
    );
    assert_eq!(out.code(), Some(2), "{}", out.dump());
    assert!(
        out.stderr
            .contains("--user no-such-user-mvmm: no such user"),
        "{}",
        out.dump()
    );
    assert!(state.processes().is_empty());
    assert!(!tap_exists(&state.tap));
}

#[test]
fn a_killed_supervisor_leaves_nothing_running() {
    let state = State::new("d");
    let cmdline = "test=fs-wait fs.tag=journal fs.read=none";
    state.install("gen1", &state.full_config(cmdline).to_string());
    let mut notify = NotifySocket::bind(state.path("notify.sock"));
    let mut sup = Watched::spawn(state.supervise(Some(&notify.path), &["--user", "nobody"]));
    assert!(
        notify.wait_for("READY=1", TIMEOUT),
        "no READY=1 ({:?})\n{}",
        notify.seen,
        sup.dump()
    );
    let mvmm = find_child(sup.child.id(), "mvmm", Duration::from_secs(5)).expect("mvmm");
    assert_eq!(virtiofsds(sup.child.id()).len(), 2);

    // No cleanup code runs: the children's parent-death signal (SIGTERM) stops them.
    sup.child.kill().unwrap();
    let _ = sup.child.wait();
    let deadline = Instant::now() + Duration::from_secs(15);
    while (Path::new(&format!("/proc/{mvmm}")).exists() || !state.processes().is_empty())
        && Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(state.processes().is_empty(), "{:?}", state.processes());
    assert!(
        !Path::new(&format!("/proc/{mvmm}")).exists(),
        "mvmm outlived the supervisor"
    );
    assert!(!tap_exists(&state.tap), "the tap outlived mvmm");
}
