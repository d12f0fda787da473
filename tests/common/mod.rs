//! Shared helpers for the integration tests: run the real mvmm binary against the test guest.
#![allow(dead_code)]

pub mod linux_guest;
pub mod netns;
pub mod virtiofsd;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

pub const MIB: u64 = 1 << 20;

/// A path in the repository.
pub fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

/// A command's stdout then stderr, for assertion messages.
pub fn text(out: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

pub fn mvmm_bin() -> &'static str {
    env!("CARGO_BIN_EXE_mvmm")
}

/// The test guest image in one of its forms: "pvh", "elf64" or "bzimage".
pub fn testguest(form: &str) -> PathBuf {
    let name = match form {
        "pvh" => "testguest-pvh.elf",
        "elf64" => "testguest-elf64.elf",
        "bzimage" => "testguest.bzImage",
        other => panic!("unknown test guest form {other}"),
    };
    Path::new(env!("MVMM_TESTGUEST_DIR")).join(name)
}

/// A temporary directory holding a vm.json.
pub struct VmDir {
    pub dir: tempfile::TempDir,
}

impl VmDir {
    pub fn new() -> Self {
        Self {
            dir: tempfile::tempdir().unwrap(),
        }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn write_config(&self, json: &str) -> PathBuf {
        let path = self.path("vm.json");
        std::fs::write(&path, json).unwrap();
        path
    }
}

/// A vm.json for `kernel` with the given machine and command line.
pub fn config_json(kernel: &Path, vcpus: u32, memory_mib: u64, cmdline: &str) -> String {
    serde_json::json!({
        "kernel": {"path": kernel, "cmdline": cmdline},
        "machine": {"vcpus": vcpus, "memory_mib": memory_mib},
    })
    .to_string()
}

pub struct RunOutput {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
    pub elapsed: Duration,
}

impl RunOutput {
    pub fn code(&self) -> Option<i32> {
        self.status.code()
    }

    /// Both streams, for assertion messages.
    pub fn dump(&self) -> String {
        format!(
            "status: {:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.status, self.stdout, self.stderr
        )
    }
}

pub fn spawn_mvmm(args: &[&str]) -> Child {
    Command::new(mvmm_bin())
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn mvmm")
}

/// Waits for `child` up to `timeout`; kills it and fails the test if it takes longer.
pub fn wait_with_timeout(mut child: Child, timeout: Duration) -> RunOutput {
    let start = Instant::now();
    // Drain pipes on threads so a chatty child never blocks on a full pipe.
    // A stream the caller already took reads as empty.
    let drain = |stream: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut s = Vec::new();
            if let Some(mut stream) = stream {
                let _ = stream.read_to_end(&mut s);
            }
            s
        })
    };
    let out_thread = drain(
        child
            .stdout
            .take()
            .map(|s| Box::new(s) as Box<dyn Read + Send>),
    );
    let err_thread = drain(
        child
            .stderr
            .take()
            .map(|s| Box::new(s) as Box<dyn Read + Send>),
    );
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if start.elapsed() > timeout {
            let _ = child.kill();
            let status = child.wait().unwrap();
            let stdout = String::from_utf8_lossy(&out_thread.join().unwrap()).into_owned();
            let stderr = String::from_utf8_lossy(&err_thread.join().unwrap()).into_owned();
            panic!(
                "mvmm did not exit within {timeout:?}; killed ({status:?})\n--- stdout ---\n{stdout}\n--- stderr ---\n{stderr}"
            );
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let elapsed = start.elapsed();
    RunOutput {
        status,
        stdout: String::from_utf8_lossy(&out_thread.join().unwrap()).into_owned(),
        stderr: String::from_utf8_lossy(&err_thread.join().unwrap()).into_owned(),
        elapsed,
    }
}

pub fn run_mvmm(args: &[&str], timeout: Duration) -> RunOutput {
    wait_with_timeout(spawn_mvmm(args), timeout)
}

pub fn run_config(config: &Path, timeout: Duration) -> RunOutput {
    run_mvmm(&["--config", config.to_str().unwrap()], timeout)
}

/// One `e820:` line of the test guest's output.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct E820Line {
    pub start: u64,
    pub size: u64,
    pub kind: u32,
}

pub fn parse_e820(stdout: &str) -> Vec<E820Line> {
    stdout
        .lines()
        .filter_map(|l| l.strip_prefix("e820: "))
        .map(|rest| {
            let field = |name: &str| {
                rest.split_whitespace()
                    .find_map(|w| w.strip_prefix(name))
                    .unwrap_or_else(|| panic!("no {name} in e820 line {rest:?}"))
            };
            E820Line {
                start: u64::from_str_radix(field("start=0x"), 16).unwrap(),
                size: u64::from_str_radix(field("size=0x"), 16).unwrap(),
                kind: field("type=").parse().unwrap(),
            }
        })
        .collect()
}

/// FNV-1a 64, as the test guest computes it over disk data.
pub fn fnv1a64(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    })
}

/// The test guest's `test=blk` pattern: byte `i` of sector `s`.
pub fn blk_pattern_sector(sector: u64, seed: u64) -> Vec<u8> {
    (0..512u64)
        .map(|i| ((sector * 31 + i * 7 + seed) & 0xff) as u8)
        .collect()
}

/// Deterministic pseudo-random bytes (xorshift), so failures reproduce.
pub fn pseudo_random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// The value after `key` on the line that starts with `prefix` (e.g. "blk1: fnv=").
pub fn line_value<'a>(stdout: &'a str, prefix: &str) -> Option<&'a str> {
    stdout.lines().find_map(|l| l.strip_prefix(prefix))
}

/// A running mvmm whose stdout and stderr are read line by line as they come. Killed when
/// dropped while still running (a test that fails must not leave a VM behind).
pub struct Watched {
    pub child: Child,
    lines: std::sync::mpsc::Receiver<(bool, String)>,
    pub stdout: String,
    pub stderr: String,
}

impl Watched {
    pub fn spawn(mut cmd: Command) -> Self {
        use std::io::BufRead;
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn");
        let (tx, lines) = std::sync::mpsc::channel();
        let out = child.stdout.take().unwrap();
        let err = child.stderr.take().unwrap();
        let tx2 = tx.clone();
        std::thread::spawn(move || {
            for l in std::io::BufReader::new(out).lines().map_while(Result::ok) {
                let _ = tx.send((true, l));
            }
        });
        std::thread::spawn(move || {
            for l in std::io::BufReader::new(err).lines().map_while(Result::ok) {
                let _ = tx2.send((false, l));
            }
        });
        Self {
            child,
            lines,
            stdout: String::new(),
            stderr: String::new(),
        }
    }

    /// Waits until a line containing `needle` appears (on stdout if `on_stdout`, else stderr).
    pub fn wait_for(&mut self, on_stdout: bool, needle: &str, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok((is_stdout, line)) => {
                    let found = is_stdout == on_stdout && line.contains(needle);
                    let buf = if is_stdout {
                        &mut self.stdout
                    } else {
                        &mut self.stderr
                    };
                    buf.push_str(&line);
                    buf.push('\n');
                    if found {
                        return true;
                    }
                }
                Err(_) => return false,
            }
        }
    }

    /// Waits for the process to exit (killing it after `timeout`) and collects the rest.
    pub fn finish(mut self, timeout: Duration) -> RunOutput {
        let start = Instant::now();
        let status = loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                break status;
            }
            if start.elapsed() > timeout {
                let _ = self.child.kill();
                break self.child.wait().unwrap();
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        while let Ok((is_stdout, line)) = self.lines.recv_timeout(Duration::from_millis(200)) {
            let buf = if is_stdout {
                &mut self.stdout
            } else {
                &mut self.stderr
            };
            buf.push_str(&line);
            buf.push('\n');
        }
        RunOutput {
            status,
            stdout: std::mem::take(&mut self.stdout),
            stderr: std::mem::take(&mut self.stderr),
            elapsed: start.elapsed(),
        }
    }

    pub fn dump(&self) -> String {
        format!(
            "--- stdout ---\n{}\n--- stderr ---\n{}",
            self.stdout, self.stderr
        )
    }
}

impl Drop for Watched {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
