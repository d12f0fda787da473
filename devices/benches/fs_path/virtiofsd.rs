//! The virtiofsd that `fs_path` measures: found, started, watched until it listens and
//! accepts, and stopped.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::common::die;
use super::{Options, TIMEOUT};

pub fn find_virtiofsd() -> Option<PathBuf> {
    let mut candidates = Vec::new();
    if let Some(home) = std::env::var_os("CARGO_HOME") {
        candidates.push(Path::new(&home).join("bin/virtiofsd"));
    }
    if let Some(home) = std::env::var_os("HOME") {
        candidates.push(Path::new(&home).join(".cargo/bin/virtiofsd"));
    }
    if let Some(paths) = std::env::var_os("PATH") {
        candidates.extend(std::env::split_paths(&paths).map(|d| d.join("virtiofsd")));
    }
    candidates.into_iter().find(|p| p.is_file())
}

/// A virtiofsd this program started; killed (by its own handle) if still running when dropped.
pub struct Daemon {
    child: Child,
}

impl Daemon {
    pub fn spawn(o: &Options, bin: &Path, socket: &Path, shared: &Path) -> Daemon {
        let child = Command::new(bin)
            .arg("--socket-path")
            .arg(socket)
            .arg("--shared-dir")
            .arg(shared)
            .args(["--sandbox", "none", "--log-level", "error"])
            .arg(format!("--cache={}", o.cache))
            .arg(format!("--thread-pool-size={}", o.pool))
            .args(&o.extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| die(&format!("cannot start {}: {e}", bin.display())));
        Daemon { child }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn check_alive(&mut self) {
        if let Ok(Some(status)) = self.child.try_wait() {
            die(&format!("virtiofsd exited early: {status}"));
        }
    }

    /// Waits for virtiofsd to exit by itself (it does when its frontend disconnects).
    pub fn wait_exit(&mut self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        false
    }

    /// Waits until virtiofsd listens on `socket` (a listening socket in /proc/net/unix: the
    /// frontend's first connect will then succeed, and nobody connected to find out).
    pub fn wait_listening(&mut self, socket: &Path) {
        let want = socket.to_string_lossy();
        let deadline = Instant::now() + TIMEOUT;
        loop {
            let table = std::fs::read_to_string("/proc/net/unix").unwrap_or_default();
            let listening = table.lines().skip(1).any(|line| {
                let f: Vec<&str> = line.split_whitespace().collect();
                // Num RefCount Protocol Flags Type St Inode Path; __SO_ACCEPTCON = 0x10000.
                f.len() >= 8
                    && f[7] == want
                    && u32::from_str_radix(f[3], 16).is_ok_and(|fl| fl & 0x1_0000 != 0)
            });
            if listening {
                return;
            }
            self.check_alive();
            if Instant::now() >= deadline {
                die(&format!(
                    "virtiofsd did not listen on {want} within {TIMEOUT:?}"
                ));
            }
            std::thread::sleep(Duration::from_micros(100));
        }
    }

    /// Waits (up to a second) until a virtiofsd thread is blocked in accept(): virtiofsd
    /// listens early and still sets itself up for a few milliseconds before it accepts, and a
    /// virtiofsd started ahead of the VM is idle in accept(). False if that was not seen
    /// (/proc/PID/task/*/syscall unreadable, or virtiofsd waits some other way).
    pub fn wait_accepting(&mut self) -> bool {
        let accept = [libc::SYS_accept, libc::SYS_accept4];
        let deadline = Instant::now() + Duration::from_secs(1);
        while Instant::now() < deadline {
            let Ok(dir) = std::fs::read_dir(format!("/proc/{}/task", self.pid())) else {
                return false;
            };
            let in_accept = dir.flatten().any(|task| {
                std::fs::read_to_string(task.path().join("syscall"))
                    .ok()
                    .and_then(|s| s.split_whitespace().next()?.parse::<i64>().ok())
                    .is_some_and(|nr| accept.contains(&nr))
            });
            if in_accept {
                return true;
            }
            self.check_alive();
            std::thread::sleep(Duration::from_micros(100));
        }
        false
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
