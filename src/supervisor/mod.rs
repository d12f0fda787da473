//! `mvmm supervise <name>`: runs one VM of a microvm.nix-style state directory, made to be a
//! systemd `ExecStart=` (Type=notify). It reads `<state-dir>/<name>/current/vm.json`, checks
//! everything first (any problem: exit 2, nothing started), then opens KVM, the disks, the
//! console file and the taps as root (creating missing taps), starts one virtiofsd per share
//! with a `source` and waits for their sockets, and starts mvmm with those descriptors as the
//! VM's user. While the VM runs it restarts virtiofsds that exit, forwards SIGTERM/SIGINT to
//! mvmm (which shuts the guest down gracefully), tells systemd READY=1 once mvmm reports the VM
//! running (then links `booted` and the journal) and STOPPING=1 on the way down. It exits with
//! mvmm's exit code, after stopping the virtiofsds and closing the taps it created.

mod launch;
mod links;
pub mod list;
mod notify;
mod plan;
mod ready;
mod signals;
mod tap;
mod virtiofsd;

use std::os::unix::fs::FileTypeExt;
use std::process::Child;
use std::time::{Duration, Instant};

use clap::ValueEnum;

use crate::cli::{Cli, SuperviseArgs};
use launch::{LaunchError, Opened};
use notify::Notifier;
use plan::{Plan, PlanError};
use signals::{Signals, Wake};
use tap::{TapHandle, TapSetupError};
use virtiofsd::{Daemon, VirtiofsdError};

/// How often the main loop looks around when no signal comes.
const TICK: Duration = Duration::from_millis(50);
/// When a virtiofsd exits, how long mvmm's own exit may take to show before the daemon's
/// exit counts as a crash.
const VM_EXIT_GRACE: Duration = Duration::from_millis(200);

#[derive(Debug, thiserror::Error)]
pub enum SupervisorError {
    #[error(transparent)]
    Plan(#[from] PlanError),
    #[error(transparent)]
    Launch(#[from] LaunchError),
    #[error(transparent)]
    Tap(#[from] TapSetupError),
    #[error(transparent)]
    Virtiofsd(#[from] VirtiofsdError),
    #[error("share {tag}: virtiofsd exited ({status}) before creating its socket {socket}; its log above says why")]
    DaemonDied {
        tag: String,
        status: std::process::ExitStatus,
        socket: String,
    },
    #[error("share {tag}: virtiofsd did not create its socket {socket} within {secs} s")]
    SocketTimeout {
        tag: String,
        socket: String,
        secs: u64,
    },
    #[error("cannot block the stop signals: {0}")]
    Signals(std::io::Error),
    #[error("{path}: {message}")]
    Lock {
        path: std::path::PathBuf,
        message: String,
    },
}

impl SupervisorError {
    /// 2 for what the configuration or state directory must fix, 1 for failures.
    pub fn exit_code(&self) -> i32 {
        match self {
            SupervisorError::Plan(_) | SupervisorError::Lock { .. } => crate::EXIT_USAGE,
            SupervisorError::Launch(e) if e.is_user_error() => crate::EXIT_USAGE,
            _ => crate::EXIT_FAILURE,
        }
    }
}

pub fn run(cli: &Cli, args: &SuperviseArgs) -> i32 {
    // Before any child exists, so no exit or stop request is missed.
    let signals = match Signals::block() {
        Ok(signals) => signals,
        Err(e) => return fail(&SupervisorError::Signals(e)),
    };
    let plan = match plan::plan(args) {
        Ok(plan) => plan,
        Err(e) => return fail(&e.into()),
    };
    let _lock = match lock_vm_dir(&plan.vm_dir) {
        Ok(lock) => lock,
        Err(e) => return fail(&e),
    };
    let mut supervisor = Supervisor {
        plan,
        signals,
        notifier: Notifier::from_env(),
        daemons: Vec::new(),
        taps: Vec::new(),
        stopping: false,
        ready: false,
        spawned: false,
    };
    let code = match supervisor.run(&mvmm_args(cli)) {
        Ok(code) => code,
        Err(e) => fail(&e),
    };
    supervisor.clean_up();
    code
}

/// Whether `child` exits within `within` (its status stays cached in `child`).
fn exits_within(child: &mut Child, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    loop {
        if !matches!(child.try_wait(), Ok(None)) {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn fail(e: &SupervisorError) -> i32 {
    log::error!("{e}");
    e.exit_code()
}

/// One supervisor per VM: a second one would take over the first one's sockets and taps.
/// The lock goes with the process (and is not inherited: the file is close-on-exec).
fn lock_vm_dir(vm_dir: &std::path::Path) -> Result<std::fs::File, SupervisorError> {
    use std::os::fd::AsRawFd;
    let path = vm_dir.join("supervise.lock");
    let err = |message: String| SupervisorError::Lock {
        path: path.clone(),
        message,
    };
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| err(format!("cannot open the lock file: {e}")))?;
    // SAFETY: flock on a descriptor we own; the result is checked.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } < 0 {
        return Err(err(
            "is locked: another `mvmm supervise` runs this VM; stop it first".to_owned(),
        ));
    }
    Ok(file)
}

/// The options this process got that mvmm should get too.
fn mvmm_args(cli: &Cli) -> Vec<String> {
    let mut args = Vec::new();
    if let Some(level) = cli.log_level.to_possible_value() {
        args.extend(["--log-level".to_owned(), level.get_name().to_owned()]);
    }
    if cli.no_seccomp {
        args.push("--no-seccomp".to_owned());
    }
    args
}

struct Supervisor {
    plan: Plan,
    signals: Signals,
    notifier: Notifier,
    daemons: Vec<Daemon>,
    /// One per `net[]` entry: `Some` for taps opened by name.
    taps: Vec<Option<TapHandle>>,
    stopping: bool,
    ready: bool,
    /// mvmm was started: its api socket, if left behind, is ours to remove.
    spawned: bool,
}

impl Supervisor {
    /// Starts everything and supervises until mvmm exits; returns its exit code.
    fn run(&mut self, mvmm_args: &[String]) -> Result<i32, SupervisorError> {
        let opened = Opened::open(&self.plan)?;
        for (i, net) in self.plan.config.net.iter().enumerate() {
            let tap = net
                .tap
                .as_deref()
                .map(|name| tap::open(i, name))
                .transpose()?;
            self.taps.push(tap);
        }
        self.daemons = self.plan.daemons.iter().cloned().map(Daemon::new).collect();
        for daemon in &mut self.daemons {
            daemon.start()?;
        }
        if !self.wait_for_sockets()? {
            log::info!("stopped before the VM started");
            return Ok(crate::EXIT_OK);
        }

        let config = launch::render_config(&self.plan, &opened, &self.taps);
        log::debug!("mvmm config: {config}");
        let user = self.plan.user.as_ref();
        let mut mvmm = launch::spawn_mvmm(&config, &opened, &self.taps, user, mvmm_args)?;
        self.spawned = true;
        // mvmm holds its own copies now.
        drop(opened);
        log::info!(
            "VM {} started: mvmm pid {}{}",
            self.plan.name,
            mvmm.id(),
            user.map(|u| format!(" as {}", u.name)).unwrap_or_default()
        );
        Ok(self.supervise(&mut mvmm))
    }

    /// Waits until every virtiofsd has its socket. `false` if a stop signal came first.
    fn wait_for_sockets(&mut self) -> Result<bool, SupervisorError> {
        let start = Instant::now();
        loop {
            if let Wake::Stop(_) = self.signals.wait(Duration::from_millis(10)) {
                self.begin_stopping();
                return Ok(false);
            }
            let mut all_ready = true;
            for daemon in &mut self.daemons {
                let socket = daemon.spec().socket.display().to_string();
                if let Some(status) = daemon.reap() {
                    return Err(SupervisorError::DaemonDied {
                        tag: daemon.tag().to_owned(),
                        status,
                        socket,
                    });
                }
                if !daemon.socket_ready() {
                    let timeout = daemon.spec().socket_timeout;
                    if start.elapsed() > timeout {
                        return Err(SupervisorError::SocketTimeout {
                            tag: daemon.tag().to_owned(),
                            socket,
                            secs: timeout.as_secs(),
                        });
                    }
                    all_ready = false;
                }
            }
            if all_ready {
                return Ok(true);
            }
        }
    }

    /// The main loop while mvmm runs; returns mvmm's exit code.
    fn supervise(&mut self, mvmm: &mut Child) -> i32 {
        let started = Instant::now();
        loop {
            if let Wake::Stop(sig) = self.signals.wait(TICK) {
                self.begin_stopping();
                log::info!("signal {sig}: asking mvmm to shut the VM down");
                // SAFETY: kill on our child's pid; it is not reaped yet, so not reused.
                unsafe { libc::kill(mvmm.id() as libc::pid_t, sig) };
            }
            match mvmm.try_wait() {
                Ok(Some(status)) => {
                    self.begin_stopping();
                    return match status.code() {
                        Some(code) => code,
                        None => {
                            log::error!("mvmm was killed ({status})");
                            crate::EXIT_FAILURE
                        }
                    };
                }
                Ok(None) => {}
                Err(e) => log::warn!("cannot check on mvmm: {e}"),
            }
            self.tend_daemons(mvmm);
            if !self.ready
                && !self.stopping
                && ready::vm_running(&self.plan.api_socket, started.elapsed())
            {
                self.on_ready();
            }
        }
    }

    /// Restarts virtiofsds that exited while the VM runs.
    fn tend_daemons(&mut self, mvmm: &mut Child) {
        let now = Instant::now();
        for daemon in &mut self.daemons {
            if let Some(status) = daemon.reap() {
                // A virtiofsd also exits when mvmm does (its frontend went away): that is
                // the VM stopping, not a daemon to restart.
                if !self.stopping && exits_within(mvmm, VM_EXIT_GRACE) {
                    self.stopping = true;
                    self.notifier.notify("STOPPING=1");
                }
                if self.stopping {
                    continue;
                }
                daemon.schedule_restart(&format!("exited ({status})"));
            }
            if !self.stopping && daemon.restart_due(now) {
                if let Err(e) = daemon.start() {
                    daemon.schedule_restart(&format!("could not be started ({e})"));
                }
            }
        }
    }

    fn on_ready(&mut self) {
        self.ready = true;
        let booted = &self.plan.booted;
        match booted.write() {
            Ok(()) => log::info!(
                "VM {} running; {} -> {}",
                self.plan.name,
                booted.link.display(),
                booted.target.display()
            ),
            Err(e) => log::warn!("cannot link {}: {e}", booted.link.display()),
        }
        if let Some(journal) = &self.plan.journal {
            if let Err(e) = journal.write() {
                log::warn!(
                    "cannot link the guest's journal {} -> {}: {e}",
                    journal.link.display(),
                    journal.target.display()
                );
            }
        }
        self.notifier.notify("READY=1");
    }

    fn begin_stopping(&mut self) {
        if !self.stopping {
            self.stopping = true;
            self.notifier.notify("STOPPING=1");
        }
    }

    /// Stops the virtiofsds, closes the taps (the ones created here disappear with the last
    /// descriptor, mvmm's being gone), and unlinks `booted` and a leftover api socket.
    fn clean_up(&mut self) {
        self.begin_stopping();
        for daemon in &mut self.daemons {
            daemon.stop();
        }
        for tap in self.taps.drain(..).flatten() {
            let (name, created) = (tap.name.clone(), tap.created);
            drop(tap);
            if created {
                if tap::interface_exists(&name) {
                    log::warn!("tap {name} is still there: another process holds it open");
                } else {
                    log::info!("removed tap {name}");
                }
            }
        }
        if self.ready {
            self.plan.booted.remove();
        }
        let api = &self.plan.api_socket;
        let is_socket = |m: std::fs::Metadata| m.file_type().is_socket();
        if self.spawned && std::fs::symlink_metadata(api).is_ok_and(is_socket) {
            let _ = std::fs::remove_file(api);
        }
    }
}
