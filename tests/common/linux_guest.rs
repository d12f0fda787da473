//! Real Linux guests under QEMU/TCG for the backend tests (`tests/backends_linux_*.rs`).
//!
//! This machine's KVM cannot boot Linux to userspace, so the frontend is QEMU with TCG, driven
//! by the guest test kit in `resources/guest` (see its README.md): `run-qemu.py` boots the
//! pinned Debian kernel with the kit's initramfs, QEMU's vhost-user device connects to an
//! `mvmm backend` process, and one guest test script (`resources/guest/tests/*.sh`) prints
//! `RESULT <check> PASS|FAIL|SKIP|INFO` lines.
//!
//! Needs `qemu-system-x86_64` (Debian package qemu-system-x86), e2fsprogs, iproute2 and
//! python3 on the host; when one is missing and the tests run as root they install them with
//! apt-get, otherwise they fail naming the packages. The kernel and initramfs come from the
//! kit's cache (`build-initramfs.sh`, which fetches what it needs, into ~/.cache/mvmm).
//!
//! What a test starts is killed when it ends, pass or fail: backends by process id, each
//! `run-qemu.py` by its own process group (QEMU is its child).

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::fs::File;
use std::io::{BufRead, BufReader};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver};
use std::sync::OnceLock;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use super::MIB;

/// `run-qemu.py --timeout`: QEMU is killed after this long (the guest's own test timeout is
/// 15 s less). A TCG boot plus a test takes 5-20 s; this only bounds a hung run.
pub const QEMU_TIMEOUT_S: u64 = 180;
/// How long the test waits for `run-qemu.py` itself, on top of its own timeout.
pub const HARNESS_GRACE: Duration = Duration::from_secs(30);
/// How long a backend may take to exit after its frontend left (or after SIGTERM).
pub const BACKEND_EXIT: Duration = Duration::from_secs(30);
/// A guest test that prints nothing for this long is stuck (each step takes seconds).
pub const STALL: Duration = Duration::from_secs(60);

// ---------------------------------------------------------------------------------------------
// Host tools and the guest kit.

/// The kernel and initramfs of the guest test kit.
pub struct Kit {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
}

pub fn guest_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("resources/guest")
}

/// `PATH` with the sbin directories appended (e2fsprogs lives in /usr/sbin), for the kit's
/// scripts, which look tools up with `command -v`.
pub fn tool_path() -> std::ffi::OsString {
    let mut dirs: Vec<PathBuf> =
        std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default()).collect();
    for d in [
        "/usr/local/sbin",
        "/usr/local/bin",
        "/usr/sbin",
        "/usr/bin",
        "/sbin",
        "/bin",
    ] {
        if !dirs.iter().any(|x| x == Path::new(d)) {
            dirs.push(PathBuf::from(d));
        }
    }
    std::env::join_paths(dirs).unwrap()
}

pub fn find_tool(name: &str) -> Option<PathBuf> {
    std::env::split_paths(&tool_path())
        .map(|d| d.join(name))
        .find(|p| {
            p.metadata()
                .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
                .unwrap_or(false)
        })
}

/// The host tools these tests run, with the Debian package that provides each.
const TOOLS: &[(&str, &str)] = &[
    ("qemu-system-x86_64", "qemu-system-x86"),
    ("e2fsck", "e2fsprogs"),
    ("debugfs", "e2fsprogs"),
    ("dumpe2fs", "e2fsprogs"),
    ("python3", "python3"),
    ("ip", "iproute2"),
    ("sha256sum", "coreutils"),
];

fn missing_packages() -> Vec<&'static str> {
    let mut pkgs: Vec<&str> = TOOLS
        .iter()
        .filter(|(tool, _)| find_tool(tool).is_none())
        .map(|&(_, pkg)| pkg)
        .collect();
    pkgs.dedup();
    pkgs
}

/// Installs missing host tools (as root, with apt-get), then builds (or finds in the cache)
/// the kit's kernel and initramfs. Runs once per test process; every test shares the result.
pub fn kit() -> &'static Kit {
    static KIT: OnceLock<Result<Kit, String>> = OnceLock::new();
    match KIT.get_or_init(prepare_kit) {
        Ok(kit) => kit,
        Err(e) => panic!("{e}"),
    }
}

fn prepare_kit() -> Result<Kit, String> {
    let missing = missing_packages();
    if !missing.is_empty() {
        // SAFETY: geteuid has no preconditions.
        let root = unsafe { libc::geteuid() } == 0;
        if !root || find_tool("apt-get").is_none() {
            return Err(format!(
                "these tests need qemu-system-x86_64, e2fsprogs, iproute2 and python3 on the \
                 host; install them first: apt-get install {}",
                missing.join(" ")
            ));
        }
        eprintln!("backends_linux: installing {}", missing.join(" "));
        let apt = |args: &[&str]| {
            Command::new("apt-get")
                .args(["-o", "DPkg::Lock::Timeout=300", "-qq"])
                .args(args)
                .env("DEBIAN_FRONTEND", "noninteractive")
                .env("PATH", tool_path())
                .status()
                .map_err(|e| format!("cannot run apt-get: {e}"))
        };
        apt(&["update"])?;
        let mut install = vec!["install", "-y", "--no-install-recommends"];
        install.extend(&missing);
        let status = apt(&install)?;
        let still = missing_packages();
        if !status.success() || !still.is_empty() {
            return Err(format!(
                "apt-get install {} failed ({status}); still missing: {}",
                missing.join(" "),
                still.join(" ")
            ));
        }
    }
    let out = Command::new("bash")
        .arg(guest_dir().join("build-initramfs.sh"))
        .env("PATH", tool_path())
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run build-initramfs.sh: {e}"))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let value = |key: &str| {
        stdout
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .map(PathBuf::from)
    };
    match (out.status.success(), value("BZIMAGE="), value("INITRAMFS=")) {
        (true, Some(kernel), Some(initrd)) => Ok(Kit { kernel, initrd }),
        _ => Err(format!(
            "resources/guest/build-initramfs.sh failed ({}):\n{stdout}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        )),
    }
}

// ---------------------------------------------------------------------------------------------
// Processes.

/// An `mvmm backend` process; killed (by its pid) if the test ends while it runs.
pub struct Backend {
    pub child: Child,
    log: PathBuf,
}

impl Backend {
    /// `mvmm backend KIND --socket SOCKET ARGS...`, for [`Backend::spawn`].
    pub fn command<S: AsRef<OsStr>>(kind: &str, socket: &Path, args: &[S]) -> Command {
        let mut cmd = Command::new(super::mvmm_bin());
        cmd.args(["backend", kind, "--socket"])
            .arg(socket)
            .args(args);
        cmd
    }

    /// Starts `cmd` (an `mvmm backend` command line, possibly behind `ip netns exec`, which
    /// execs it: the pid stays the backend's) and waits until it listens on `socket`. Its
    /// stdout and stderr go to `log`.
    pub fn spawn(mut cmd: Command, socket: &Path, log: &Path) -> Backend {
        let out = File::create(log).unwrap();
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .expect("spawn mvmm backend");
        let mut backend = Backend {
            child,
            log: log.to_path_buf(),
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            // A stale socket left by a killed backend is replaced, so wait for the log line
            // of this process as well as for the socket file.
            let listening = backend.log_text().contains("listening on");
            let is_socket = socket
                .symlink_metadata()
                .map(|m| m.file_type().is_socket())
                .unwrap_or(false);
            if listening && is_socket {
                return backend;
            }
            if let Ok(Some(status)) = backend.child.try_wait() {
                panic!(
                    "mvmm backend exited before listening ({status}):\n{}",
                    backend.log_text()
                );
            }
            assert!(
                Instant::now() < deadline,
                "mvmm backend is not listening on {} after 20 s:\n{}",
                socket.display(),
                backend.log_text()
            );
            thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    pub fn signal(&self, signal: i32) {
        // SAFETY: kill() on our own child, which is not reaped yet (its pid is still ours).
        assert_eq!(unsafe { libc::kill(self.pid(), signal) }, 0);
    }

    /// Waits for the process to exit by itself; fails the test after `within`.
    pub fn wait_exit(&mut self, within: Duration) -> ExitStatus {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "mvmm backend did not exit within {within:?}:\n{}",
                self.log_text()
            );
            thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A running `run-qemu.py`, in a process group of its own so that QEMU (its child) goes with
/// it: if the test ends while it runs, the whole group is killed.
pub struct GuestRun {
    child: Child,
    lines: Receiver<(bool, String)>,
    readers: Vec<JoinHandle<()>>,
    /// RESULT/TIMING/SUMMARY lines (run-qemu.py's stdout, printed when QEMU exits).
    pub stdout: String,
    /// The guest console and the harness's messages (its stderr, streamed).
    pub console: String,
    started: Instant,
}

/// What one guest test run produced.
pub struct GuestOutcome {
    /// run-qemu.py's exit status: 0 all PASS, 1 a FAIL, 2 no result / QEMU failed, 3 timeout.
    pub code: Option<i32>,
    pub stdout: String,
    pub console: String,
    pub elapsed: Duration,
}

impl GuestRun {
    /// `run-qemu.py --test TEST --timeout .. --kernel .. --initrd .. ARGS...`.
    pub fn start(test: &str, args: &[String]) -> GuestRun {
        let kit = kit();
        let mut cmd = Command::new("python3");
        cmd.arg(guest_dir().join("run-qemu.py"))
            .args(["--test", test, "--timeout", &QEMU_TIMEOUT_S.to_string()])
            .arg("--kernel")
            .arg(&kit.kernel)
            .arg("--initrd")
            .arg(&kit.initrd)
            .args(args)
            .env("PATH", tool_path())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0);
        let mut child = cmd.spawn().expect("spawn resources/guest/run-qemu.py");
        let (tx, lines) = mpsc::channel();
        let mut readers = Vec::new();
        let out = child.stdout.take().unwrap();
        let err = child.stderr.take().unwrap();
        let tx2 = tx.clone();
        readers.push(thread::spawn(move || {
            for l in BufReader::new(out).lines().map_while(Result::ok) {
                let _ = tx.send((true, l));
            }
        }));
        readers.push(thread::spawn(move || {
            for l in BufReader::new(err).lines().map_while(Result::ok) {
                let _ = tx2.send((false, l));
            }
        }));
        GuestRun {
            child,
            lines,
            readers,
            stdout: String::new(),
            console: String::new(),
            started: Instant::now(),
        }
    }

    /// Keeps the lines that arrived so far, without waiting.
    pub fn drain(&mut self) {
        while let Ok((is_stdout, line)) = self.lines.try_recv() {
            self.keep(is_stdout, line);
        }
    }

    fn keep(&mut self, is_stdout: bool, line: String) {
        let buf = if is_stdout {
            &mut self.stdout
        } else {
            &mut self.console
        };
        buf.push_str(&line);
        buf.push('\n');
    }

    /// Waits until a console line contains `needle`; false if the harness ends first or after
    /// `timeout`.
    pub fn wait_console(&mut self, needle: &str, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok((is_stdout, line)) => {
                    let found = !is_stdout && line.contains(needle);
                    self.keep(is_stdout, line);
                    if found {
                        return true;
                    }
                }
                Err(_) => return false,
            }
        }
    }

    /// Waits until the harness ends (true), or until the console has been silent for `stall`
    /// (false; the run is left as it is).
    pub fn wait_end_or_stall(&mut self, stall: Duration) -> bool {
        loop {
            match self.lines.recv_timeout(stall) {
                Ok((is_stdout, line)) => self.keep(is_stdout, line),
                Err(mpsc::RecvTimeoutError::Disconnected) => return true,
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    return !matches!(self.child.try_wait(), Ok(None))
                }
            }
        }
    }

    /// Waits for the harness to end (it kills QEMU after its --timeout itself; this kills the
    /// group if even that does not happen) and collects its output.
    pub fn finish(mut self) -> GuestOutcome {
        let deadline = Instant::now() + Duration::from_secs(QEMU_TIMEOUT_S) + HARNESS_GRACE;
        let status = loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                break status;
            }
            if Instant::now() > deadline {
                self.kill_group();
                break self.child.wait().unwrap();
            }
            while let Ok((is_stdout, line)) = self.lines.try_recv() {
                self.keep(is_stdout, line);
            }
            thread::sleep(Duration::from_millis(20));
        };
        // The pipes close when run-qemu.py and QEMU are gone.
        for r in std::mem::take(&mut self.readers) {
            let _ = r.join();
        }
        while let Ok((is_stdout, line)) = self.lines.try_recv() {
            self.keep(is_stdout, line);
        }
        GuestOutcome {
            code: status.code(),
            stdout: std::mem::take(&mut self.stdout),
            console: std::mem::take(&mut self.console),
            elapsed: self.started.elapsed(),
        }
    }

    pub fn kill_group(&self) {
        // SAFETY: the process group we created for run-qemu.py (process_group(0): its pgid is
        // its pid, which stays ours until we reap it).
        unsafe { libc::killpg(self.child.id() as i32, libc::SIGKILL) };
    }
}

impl Drop for GuestRun {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            self.kill_group();
            let _ = self.child.wait();
        }
    }
}

impl GuestOutcome {
    /// check name -> (status, detail), from the `RESULT <check> <status> <detail>` lines.
    pub fn results(&self) -> BTreeMap<String, (String, String)> {
        self.stdout
            .lines()
            .filter_map(|l| l.strip_prefix("RESULT "))
            .filter_map(|l| {
                let mut parts = l.splitn(3, ' ');
                let name = parts.next()?.to_string();
                let status = parts.next()?.to_string();
                Some((name, (status, parts.next().unwrap_or("").to_string())))
            })
            .collect()
    }

    pub fn detail(&self, check: &str) -> Option<String> {
        self.results().get(check).map(|(_, d)| d.clone())
    }

    pub fn passed(&self, check: &str) -> bool {
        self.results()
            .get(check)
            .is_some_and(|(status, _)| status == "PASS")
    }

    pub fn failures(&self) -> Vec<String> {
        self.results()
            .into_iter()
            .filter(|(_, (status, _))| status == "FAIL")
            .map(|(name, (_, detail))| format!("{name}: {detail}"))
            .collect()
    }

    pub fn dump(&self) -> String {
        format!(
            "run-qemu.py exit {:?} after {:.1?}\n--- results ---\n{}--- console ---\n{}",
            self.code, self.elapsed, self.stdout, self.console
        )
    }

    /// Exit status 0, no FAIL, and every check in `checks` PASS.
    pub fn assert_all_pass(&self, checks: &[&str], context: &str) {
        assert_eq!(
            self.code,
            Some(0),
            "the guest test did not pass (failures: {:?})\n{}\n{context}",
            self.failures(),
            self.dump()
        );
        assert!(self.failures().is_empty(), "{}\n{context}", self.dump());
        for check in checks {
            assert!(
                self.passed(check),
                "RESULT {check} is not PASS\n{}\n{context}",
                self.dump()
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Host-side checks.

/// A finished host tool: its exit code and, for messages, the command line and output.
pub struct Output {
    pub code: Option<i32>,
    pub stdout: String,
    pub text: String,
}

impl Output {
    pub fn ok(&self) -> bool {
        self.code == Some(0)
    }
}

pub fn run_tool(program: &str, args: &[&OsStr]) -> Output {
    let path = find_tool(program).unwrap_or_else(|| PathBuf::from(program));
    let out = Command::new(&path)
        .args(args)
        .env("PATH", tool_path())
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let text = format!(
        "$ {program} {}\n({})\n{stdout}{}",
        args.iter()
            .map(|a| a.to_string_lossy())
            .collect::<Vec<_>>()
            .join(" "),
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    Output {
        code: out.status.code(),
        stdout,
        text,
    }
}

pub fn sha256_file(path: &Path) -> String {
    let out = run_tool("sha256sum", &[path.as_os_str()]);
    assert!(out.ok(), "{}", out.text);
    out.stdout.split_whitespace().next().unwrap().to_string()
}

pub fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / MIB as f64)
}
