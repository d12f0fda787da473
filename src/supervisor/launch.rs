//! Starting mvmm: the supervisor opens KVM, the disks and the console file as root, derives
//! mvmm's config from vm.json with those as `fd:N` (and the taps as `net[].fd`), hands it over
//! in a memfd, and starts mvmm (this same binary) as the VM's user.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};

use serde_json::Value;

use super::plan::{Plan, User};
use super::tap::TapHandle;
use crate::config::{SerialMode, FD_PREFIX};

#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    #[error("{field}: cannot open {path}: {source}")]
    Open {
        field: String,
        path: String,
        source: io::Error,
    },
    #[error("cannot hand mvmm its config: {0}")]
    Memfd(io::Error),
    #[error("cannot find mvmm's own binary to start the VM: {0}")]
    CurrentExe(io::Error),
    #[error("cannot start mvmm{}: {source}", user.as_ref().map(|u| format!(" as {u}")).unwrap_or_default())]
    Spawn {
        user: Option<String>,
        source: io::Error,
    },
}

impl LaunchError {
    /// Files the config names that cannot be opened are the user's to fix.
    pub fn is_user_error(&self) -> bool {
        matches!(self, LaunchError::Open { .. })
    }
}

/// What the supervisor opened for mvmm, by config position.
pub struct Opened {
    kvm: File,
    /// One per `disks[]` entry (`None` for vhost-user disks, which mvmm connects to itself).
    disks: Vec<Option<File>>,
    serial: Option<File>,
}

impl Opened {
    pub fn open(plan: &Plan) -> Result<Self, LaunchError> {
        let config = &plan.config;
        let err = |field: String, path: &Path| {
            let path = path.display().to_string();
            move |source| LaunchError::Open {
                field,
                path,
                source,
            }
        };
        let kvm_path = config.kvm_path();
        let kvm = OpenOptions::new()
            .read(true)
            .write(true)
            .open(kvm_path)
            .map_err(err("kvm".to_owned(), kvm_path))?;
        let mut disks = Vec::new();
        for (i, disk) in config.disks.iter().enumerate() {
            disks.push(match &disk.path {
                Some(path) => Some(
                    OpenOptions::new()
                        .read(true)
                        .write(!disk.read_only)
                        .open(path)
                        .map_err(err(format!("disks[{i}].path"), path))?,
                ),
                None => None,
            });
        }
        let serial = match (config.serial.mode, &config.serial.path) {
            (SerialMode::File, Some(path)) => {
                Some(File::create(path).map_err(err("serial.path".to_owned(), path))?)
            }
            _ => None,
        };
        Ok(Self { kvm, disks, serial })
    }

    fn fds(&self) -> Vec<RawFd> {
        let mut fds = vec![self.kvm.as_raw_fd()];
        fds.extend(self.disks.iter().flatten().map(AsRawFd::as_raw_fd));
        fds.extend(self.serial.iter().map(AsRawFd::as_raw_fd));
        fds
    }
}

fn fd_path(fd: RawFd) -> Value {
    Value::String(format!("{FD_PREFIX}{fd}"))
}

fn path_value(path: &Path) -> Value {
    Value::String(path.display().to_string())
}

/// mvmm's config: vm.json with every path mvmm would open replaced by the descriptor opened
/// here, relative paths made absolute (the config no longer lives next to them), and the api
/// socket set. Other fields pass through untouched.
pub fn render_config(plan: &Plan, opened: &Opened, taps: &[Option<TapHandle>]) -> Value {
    let config = &plan.config;
    let mut json = plan.raw.clone();
    json["kvm"] = fd_path(opened.kvm.as_raw_fd());
    json["api_socket"] = path_value(&plan.api_socket);
    json["kernel"]["path"] = path_value(&config.kernel.path);
    if let Some(initrd) = &config.kernel.initrd {
        json["kernel"]["initrd"] = path_value(initrd);
    }
    if let Some(serial) = &opened.serial {
        json["serial"]["path"] = fd_path(serial.as_raw_fd());
    }
    for (i, disk) in config.disks.iter().enumerate() {
        if let Some(file) = &opened.disks[i] {
            json["disks"][i]["path"] = fd_path(file.as_raw_fd());
        } else if let Some(socket) = &disk.socket {
            json["disks"][i]["socket"] = path_value(socket);
        }
    }
    for (i, tap) in taps.iter().enumerate() {
        if let (Some(tap), Some(net)) = (tap, json["net"][i].as_object_mut()) {
            net.remove("tap");
            net.insert("fd".to_owned(), tap.raw_fd().into());
        }
    }
    for (i, share) in config.shares.iter().enumerate() {
        json["shares"][i]["socket"] = path_value(&share.socket);
    }
    json
}

/// Writes `text` into a memfd mvmm reads as `/proc/self/fd/N` (no file left behind, and
/// nothing the VM's user could read before mvmm starts).
fn config_memfd(text: &str) -> io::Result<File> {
    // SAFETY: memfd_create with a valid NUL-terminated name; the result is checked.
    let raw = unsafe { libc::memfd_create(c"mvmm-vm.json".as_ptr(), libc::MFD_CLOEXEC) };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor nobody else owns.
    let mut file = unsafe { File::from_raw_fd(raw) };
    file.write_all(text.as_bytes())?;
    Ok(file)
}

/// Makes `cmd`'s process hear stop requests from the supervisor only: its own process group
/// (a terminal's Ctrl-C reaches the supervisor alone, which forwards it once; a second signal
/// would force mvmm's stop), and SIGTERM if the supervisor dies, so nothing outlives it.
pub fn tie_to_supervisor(cmd: &mut Command) {
    cmd.process_group(0);
    // SAFETY: getpid before fork; the closure (between fork and exec) only calls prctl and
    // getppid, which are async-signal-safe.
    let supervisor = unsafe { libc::getpid() };
    // SAFETY: see above.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) < 0 {
                return Err(io::Error::last_os_error());
            }
            // The supervisor may have died before the death signal was armed.
            if libc::getppid() != supervisor {
                return Err(io::Error::from_raw_os_error(libc::ESRCH));
            }
            Ok(())
        });
    }
}

/// Starts mvmm on `config` as `user` (no supplementary groups), with the opened files and
/// taps inherited at their descriptor numbers.
pub fn spawn_mvmm(
    config: &Value,
    opened: &Opened,
    taps: &[Option<TapHandle>],
    user: Option<&User>,
    extra_args: &[String],
) -> Result<Child, LaunchError> {
    let exe = std::env::current_exe().map_err(LaunchError::CurrentExe)?;
    let memfd = config_memfd(&config.to_string()).map_err(LaunchError::Memfd)?;
    let mut keep = opened.fds();
    keep.extend(taps.iter().flatten().map(TapHandle::raw_fd));
    keep.push(memfd.as_raw_fd());
    let mut cmd = Command::new(exe);
    cmd.arg("--config")
        .arg(format!("/proc/self/fd/{}", memfd.as_raw_fd()))
        .args(extra_args)
        // systemd's notify socket is the supervisor's alone (NotifyAccess=main).
        .env_remove("NOTIFY_SOCKET")
        .stdin(Stdio::null());
    if let Some(user) = user {
        // With a uid to set, std also drops all supplementary groups (setgroups(0)).
        cmd.uid(user.uid).gid(user.gid);
    }
    tie_to_supervisor(&mut cmd);
    // SAFETY: the closure runs between fork and exec and only calls fcntl (async-signal-safe)
    // on descriptors this process keeps open until spawn returns.
    unsafe {
        cmd.pre_exec(move || {
            for &fd in &keep {
                if libc::fcntl(fd, libc::F_SETFD, 0) < 0 {
                    return Err(io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    let child = cmd.spawn().map_err(|source| LaunchError::Spawn {
        user: user.map(|u| u.name.clone()),
        source,
    })?;
    drop(memfd);
    Ok(child)
}
