//! `jail`: mvmm confines itself when no service manager does (Firecracker ships a separate
//! jailer for this; here it is two steps of the same process).
//!
//! 1. [`enter_pid_namespace`], first thing for a VM: a new PID namespace only applies to
//!    children, so mvmm forks; the child runs the VM as PID 1 of the namespace, the parent
//!    forwards stop signals to it and exits with its code. The child dies with the parent.
//! 2. [`confine`], once the VM is built (KVM, memory, disks, taps, sockets all open) and
//!    before any other thread exists: new mount/IPC/UTS namespaces, the socket directories
//!    bind-mounted into `root`, chroot, rlimits, then setgid/setuid.

use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI32, Ordering};

use crate::config::JailConfig;

#[derive(Debug, thiserror::Error)]
pub enum JailError {
    #[error(
        "jail: {step} failed: {source} (the jail needs root: CAP_SYS_ADMIN for namespaces and \
         mounts, CAP_SYS_CHROOT, CAP_SETUID/CAP_SETGID)"
    )]
    Privileged {
        step: &'static str,
        source: io::Error,
    },
    #[error("jail: {step} failed: {source}")]
    Call {
        step: &'static str,
        source: io::Error,
    },
    #[error("jail: {0} is not a directory; create it (empty) before starting mvmm")]
    NoRoot(PathBuf),
    #[error("jail: cannot bind-mount {dir} into the jail: {source}")]
    Bind { dir: PathBuf, source: io::Error },
    #[error("jail: mvmm already runs {0} threads; the jail must be entered before any start")]
    Threads(usize),
    #[error(transparent)]
    Seccomp(#[from] crate::seccomp::SeccompError),
}

impl JailError {
    pub fn exit_code(&self) -> i32 {
        match self {
            JailError::NoRoot(_) => crate::EXIT_USAGE,
            _ => crate::EXIT_FAILURE,
        }
    }
}

fn check(step: &'static str, rc: libc::c_int) -> Result<(), JailError> {
    if rc == 0 {
        return Ok(());
    }
    let source = io::Error::last_os_error();
    Err(match source.raw_os_error() {
        Some(libc::EPERM) => JailError::Privileged { step, source },
        _ => JailError::Call { step, source },
    })
}

/// The VM's process as seen by the parent, for signal forwarding.
static CHILD: AtomicI32 = AtomicI32::new(0);

extern "C" fn forward_signal(signal: libc::c_int) {
    let child = CHILD.load(Ordering::SeqCst);
    if child > 0 {
        // SAFETY: kill is async-signal-safe; the pid is our own child.
        unsafe { libc::kill(child, signal) };
    }
}

/// Step 1. Returns `None` in the VM process (go on), or the exit code the parent must exit
/// with once the VM process has ended. Call before any thread exists.
pub fn enter_pid_namespace(jail: &JailConfig) -> Result<Option<i32>, JailError> {
    if !jail.namespaces {
        return Ok(None);
    }
    check("unshare(CLONE_NEWPID)", unshare(libc::CLONE_NEWPID))?;
    // SAFETY: single-threaded here (checked by the caller's position: first thing for a VM),
    // so the child may run arbitrary code.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(JailError::Call {
            step: "fork",
            source: io::Error::last_os_error(),
        });
    }
    if pid == 0 {
        // SAFETY: asks for SIGKILL when the parent dies; no pointers involved.
        check("prctl(PR_SET_PDEATHSIG)", unsafe {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0)
        })?;
        return Ok(None);
    }
    CHILD.store(pid, Ordering::SeqCst);
    for signal in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
        // SAFETY: the handler only calls kill(2).
        unsafe { libc::signal(signal, forward_signal as *const () as libc::sighandler_t) };
    }
    // The parent only waits and forwards; it gets the narrowest filter of all.
    crate::seccomp::install(crate::seccomp::ThreadKind::JailParent)?;
    let mut status = 0;
    loop {
        // SAFETY: waits for our own child; `status` is a valid out-pointer.
        let rc = unsafe { libc::waitpid(pid, &mut status, 0) };
        if rc == pid {
            break;
        }
        if io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
            return Ok(Some(crate::EXIT_FAILURE));
        }
    }
    Ok(Some(if libc::WIFEXITED(status) {
        libc::WEXITSTATUS(status)
    } else {
        128 + libc::WTERMSIG(status)
    }))
}

fn unshare(flags: libc::c_int) -> libc::c_int {
    // SAFETY: unshare takes flags only.
    unsafe { libc::unshare(flags) }
}

fn c_path(path: &Path) -> CString {
    // Paths from the config or the file system never contain NUL bytes.
    CString::new(path.as_os_str().as_bytes()).unwrap_or_default()
}

/// Step 2: confine the built VM. `socket_dirs` are bind-mounted into the jail at the same
/// paths (vhost-user reconnects and the control socket need them).
pub fn confine(jail: &JailConfig, socket_dirs: &[PathBuf]) -> Result<(), JailError> {
    let threads = std::fs::read_dir("/proc/self/task").map_or(1, |d| d.count());
    if threads != 1 {
        return Err(JailError::Threads(threads));
    }
    if !jail.root.is_dir() {
        return Err(JailError::NoRoot(jail.root.clone()));
    }
    if jail.namespaces {
        check(
            "unshare(mount, IPC, UTS namespaces)",
            unshare(libc::CLONE_NEWNS | libc::CLONE_NEWIPC | libc::CLONE_NEWUTS),
        )?;
        let root = c"/";
        // SAFETY: valid NUL-terminated strings; makes every mount private to this namespace
        // so the bind mounts below do not leak to the host.
        check("making mounts private", unsafe {
            libc::mount(
                std::ptr::null(),
                root.as_ptr(),
                std::ptr::null(),
                libc::MS_REC | libc::MS_PRIVATE,
                std::ptr::null(),
            )
        })?;
        for dir in socket_dirs {
            bind_into(&jail.root, dir)?;
        }
    } else if !socket_dirs.is_empty() {
        log::warn!(
            "jail without namespaces: vhost-user and control sockets are not reachable from the \
             jail; a restarted backend cannot be reconnected"
        );
    }
    let root = c_path(&jail.root);
    // SAFETY: valid NUL-terminated paths.
    check("chroot", unsafe { libc::chroot(root.as_ptr()) })?;
    // SAFETY: as above.
    check("chdir(/)", unsafe { libc::chdir(c"/".as_ptr()) })?;
    set_rlimits(jail)?;
    if let Some(gid) = jail.gid {
        // SAFETY: an empty group list.
        check("setgroups", unsafe { libc::setgroups(0, std::ptr::null()) })?;
        // SAFETY: plain ids.
        check("setresgid", unsafe { libc::setresgid(gid, gid, gid) })?;
    }
    if let Some(uid) = jail.uid {
        // SAFETY: plain ids.
        check("setresuid", unsafe { libc::setresuid(uid, uid, uid) })?;
    }
    log::info!(
        "jailed in {}{}",
        jail.root.display(),
        jail.uid.map(|u| format!(" as uid {u}")).unwrap_or_default()
    );
    Ok(())
}

fn bind_into(root: &Path, dir: &Path) -> Result<(), JailError> {
    let target = root.join(dir.strip_prefix("/").unwrap_or(dir));
    let bind_err = |source| JailError::Bind {
        dir: dir.to_owned(),
        source,
    };
    std::fs::create_dir_all(&target).map_err(bind_err)?;
    let (source, target) = (c_path(dir), c_path(&target));
    // SAFETY: valid NUL-terminated paths; a plain bind mount.
    let rc = unsafe {
        libc::mount(
            source.as_ptr(),
            target.as_ptr(),
            std::ptr::null(),
            libc::MS_BIND,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(bind_err(io::Error::last_os_error()));
    }
    Ok(())
}

fn set_rlimits(jail: &JailConfig) -> Result<(), JailError> {
    let limits = &jail.rlimits;
    if limits.fsize.is_some() {
        // A write past the limit then fails with EFBIG (an I/O error for the guest) instead of
        // SIGXFSZ killing the VM.
        // SAFETY: ignoring a signal.
        unsafe { libc::signal(libc::SIGXFSZ, libc::SIG_IGN) };
    }
    for (resource, value, step) in [
        (libc::RLIMIT_NOFILE, limits.nofile, "setrlimit(NOFILE)"),
        (libc::RLIMIT_FSIZE, limits.fsize, "setrlimit(FSIZE)"),
        (libc::RLIMIT_NPROC, limits.nproc, "setrlimit(NPROC)"),
        (libc::RLIMIT_CORE, limits.core, "setrlimit(CORE)"),
    ] {
        if let Some(value) = value {
            let limit = libc::rlimit {
                rlim_cur: value,
                rlim_max: value,
            };
            // SAFETY: a valid rlimit struct.
            check(step, unsafe { libc::setrlimit(resource, &limit) })?;
        }
    }
    Ok(())
}
