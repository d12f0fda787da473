//! One virtiofsd per share with a `source`: started before mvmm, restarted (with backoff) if
//! it exits while the VM runs — mvmm reconnects when the socket comes back — and stopped
//! after mvmm.

use std::io;
use std::os::unix::fs::FileTypeExt;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use super::plan::DaemonSpec;

/// First restart delay; doubled per quick failure up to `MAX_BACKOFF`.
const MIN_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// A daemon that ran this long had no quick failure: its next restart is immediate again.
const STABLE_AFTER: Duration = Duration::from_secs(10);
/// How long a daemon gets to exit on SIGTERM before SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(3);

#[derive(Debug, thiserror::Error)]
pub enum VirtiofsdError {
    #[error("share {tag}: cannot start {program}: {source}")]
    Spawn {
        tag: String,
        program: String,
        source: io::Error,
    },
    #[error("share {tag}: cannot remove the old socket {socket}: {source}")]
    StaleSocket {
        tag: String,
        socket: String,
        source: io::Error,
    },
}

pub struct Daemon {
    spec: DaemonSpec,
    child: Option<Child>,
    started: Instant,
    backoff: Duration,
    restart_at: Option<Instant>,
}

impl Daemon {
    pub fn new(spec: DaemonSpec) -> Self {
        Self {
            spec,
            child: None,
            started: Instant::now(),
            backoff: MIN_BACKOFF,
            restart_at: None,
        }
    }

    pub fn tag(&self) -> &str {
        &self.spec.tag
    }

    pub fn spec(&self) -> &DaemonSpec {
        &self.spec
    }

    /// Starts virtiofsd on a fresh socket path (a leftover socket would look ready).
    pub fn start(&mut self) -> Result<(), VirtiofsdError> {
        remove_socket(&self.spec.socket).map_err(|source| VirtiofsdError::StaleSocket {
            tag: self.spec.tag.clone(),
            socket: self.spec.socket.display().to_string(),
            source,
        })?;
        let mut cmd = Command::new(&self.spec.program);
        cmd.args(&self.spec.args)
            .env_remove("NOTIFY_SOCKET")
            .stdin(Stdio::null());
        super::launch::tie_to_supervisor(&mut cmd);
        let child = cmd.spawn().map_err(|source| VirtiofsdError::Spawn {
            tag: self.spec.tag.clone(),
            program: self.spec.program.display().to_string(),
            source,
        })?;
        log::info!(
            "share {}: virtiofsd (pid {}) serving on {}",
            self.spec.tag,
            child.id(),
            self.spec.socket.display()
        );
        self.child = Some(child);
        self.started = Instant::now();
        self.restart_at = None;
        Ok(())
    }

    /// Whether the socket exists (virtiofsd binds it, then listens).
    pub fn socket_ready(&self) -> bool {
        std::fs::symlink_metadata(&self.spec.socket).is_ok_and(|m| m.file_type().is_socket())
    }

    #[cfg(test)]
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Collects the daemon if it exited.
    /// Collects the daemon if it exited, and sweeps what is left of its process group: with
    /// its namespace sandbox virtiofsd forks, and a worker that outlived the parent would keep
    /// the socket's pid-file lock, so the restarted daemon could not start.
    pub fn reap(&mut self) -> Option<ExitStatus> {
        let child = self.child.as_mut()?;
        let status = child.try_wait().ok()??;
        signal_group(child.id(), libc::SIGKILL);
        self.child = None;
        Some(status)
    }

    /// After an unexpected exit (or a failed start): plans the restart, backing off on quick
    /// failures.
    pub fn schedule_restart(&mut self, why: &str) {
        if self.started.elapsed() >= STABLE_AFTER {
            self.backoff = MIN_BACKOFF;
        }
        let delay = self.backoff;
        self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
        log::warn!(
            "share {}: virtiofsd {why} while the VM runs; restarting it in {} ms",
            self.spec.tag,
            delay.as_millis()
        );
        self.restart_at = Some(Instant::now() + delay);
    }

    pub fn restart_due(&self, now: Instant) -> bool {
        self.child.is_none() && self.restart_at.is_some_and(|at| now >= at)
    }

    /// SIGTERM, then SIGKILL after a grace period; waits for the exit. No restart follows.
    pub fn stop(&mut self) {
        self.restart_at = None;
        let Some(mut child) = self.child.take() else {
            return;
        };
        signal_group(child.id(), libc::SIGTERM);
        let deadline = Instant::now() + STOP_GRACE;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                signal_group(child.id(), libc::SIGKILL);
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        log::warn!(
            "share {}: virtiofsd ignored SIGTERM for {} s; killing it",
            self.spec.tag,
            STOP_GRACE.as_secs()
        );
        signal_group(child.id(), libc::SIGKILL);
        let _ = child.wait();
    }
}

/// Signals the process group a daemon leads (it was started as the leader of its own group;
/// see `launch::tie_to_supervisor`). Called while the leader is unreaped or right after
/// reaping it, so the group id still belongs to the daemon's processes.
fn signal_group(leader: u32, signal: libc::c_int) {
    // SAFETY: kill only sends a signal; a negative pid addresses the process group.
    unsafe { libc::kill(-(leader as libc::pid_t), signal) };
}

/// Removes a leftover socket file (only a socket: plan.rs refused anything else there).
fn remove_socket(path: &Path) -> io::Result<()> {
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => std::fs::remove_file(path),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(program: &str, args: &[&str], socket: &Path) -> DaemonSpec {
        DaemonSpec {
            tag: "t".to_owned(),
            socket: socket.to_owned(),
            program: program.into(),
            args: args.iter().map(Into::into).collect(),
            socket_timeout: Duration::from_secs(1),
        }
    }

    #[test]
    fn restarts_back_off_and_stop_ends_the_process() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("fs.sock");
        // A leftover socket is removed at start.
        let _old = std::os::unix::net::UnixListener::bind(&socket).unwrap();
        let mut daemon = Daemon::new(spec("/bin/sleep", &["60"], &socket));
        daemon.start().unwrap();
        assert!(!daemon.socket_ready());
        assert_eq!(daemon.reap(), None);

        let before = Instant::now();
        daemon.schedule_restart("exited");
        let first = daemon.restart_at.unwrap() - before;
        daemon.schedule_restart("exited");
        let second = daemon.restart_at.unwrap() - before;
        assert!(
            first >= MIN_BACKOFF && second >= 2 * MIN_BACKOFF,
            "{first:?} {second:?}"
        );
        // Not due while the process still runs.
        assert!(!daemon.restart_due(Instant::now() + MAX_BACKOFF));

        let pid = daemon.pid().unwrap();
        daemon.stop();
        assert!(daemon.pid().is_none() && daemon.restart_at.is_none());
        assert!(
            !Path::new(&format!("/proc/{pid}")).exists(),
            "sleep survived stop()"
        );
    }

    #[test]
    fn a_program_that_cannot_start_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let mut daemon = Daemon::new(spec("/nonexistent/virtiofsd", &[], &dir.path().join("s")));
        let err = daemon.start().unwrap_err().to_string();
        assert!(err.contains("/nonexistent/virtiofsd"), "{err}");
    }
}
