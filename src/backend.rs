//! `mvmm backend blk|net`: a device model served as a vhost-user backend, in its own process.
//!
//! The process listens on `--socket` and serves one frontend (a VMM) at a time; when the
//! frontend disconnects it exits 0, or with `--persistent` waits for the next one. SIGTERM and
//! SIGINT end it at once with 0 (no request is half done: each is synchronous and the guest's
//! view of it was complete or never reported). Setup problems (disk, tap, socket) exit 2 with
//! one line naming the culprit; runtime failures exit 1.
//!
//! Threads:
//! - the main thread only waits for a stop signal or for the serving thread to finish:
//!   `epoll_wait`, `read` (signalfd, eventfd), `unlink`/`newfstatat` (the socket file),
//!   `write` (log), `futex` (join), `exit_group`;
//! - the serving thread (`backend`) runs the connections, and creates the vhost-user daemon's
//!   threads, which inherit its seccomp filter: see `devices::backend` for their calls.

use std::fs::{File, OpenOptions};
use std::io::{self, Read};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::thread;

use devices::backend::{BackendError, BlkConfig, BlkDevice, Device, NetDevice, Server};
use devices::virtio::net::{Tap, TapError};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::cli::{BackendCommand, BackendCommonArgs, BlkBackendArgs, NetBackendArgs};
use crate::{EXIT_FAILURE, EXIT_OK, EXIT_USAGE};

/// What stops the backend before it serves anyone.
#[derive(Debug, thiserror::Error)]
enum SetupError {
    #[error("cannot open disk image {path}: {source}")]
    OpenDisk { path: PathBuf, source: io::Error },
    #[error("disk image {path}: {source}")]
    Disk { path: PathBuf, source: BackendError },
    #[error("{0}")]
    Tap(TapError),
    #[error("give the tap as --tap NAME or --fd N")]
    NoTap,
    #[error("--fd {0} is not an open file descriptor; the process starting mvmm must pass it")]
    FdNotOpen(RawFd),
    #[error("--mac {0:?} is not a MAC address like 52:54:00:12:34:56")]
    BadMac(String),
    #[error("{0}")]
    Net(BackendError),
    #[error("socket {0} exists and is not a socket; remove it or choose another path")]
    NotASocket(PathBuf),
    #[error("cannot replace the old socket {path}: {source}")]
    StaleSocket { path: PathBuf, source: io::Error },
    #[error(
        "cannot listen on socket {path}: {source} (does its directory exist and is it writable?)"
    )]
    Bind { path: PathBuf, source: io::Error },
    #[error("cannot set up stop-signal handling: {0}")]
    Signals(io::Error),
    #[error(transparent)]
    Seccomp(#[from] crate::seccomp::SeccompError),
}

impl SetupError {
    fn exit_code(&self) -> i32 {
        match self {
            SetupError::Signals(_) | SetupError::Seccomp(_) => EXIT_FAILURE,
            _ => EXIT_USAGE,
        }
    }
}

pub fn run(command: &BackendCommand) -> i32 {
    // Block the stop signals before any thread exists: every thread inherits the mask, and the
    // main thread reads them from a signalfd.
    let result = StopSignals::new()
        .map_err(SetupError::Signals)
        .and_then(|signals| {
            Ok(match command {
                BackendCommand::Blk(args) => serve(blk_device(args)?, &args.common, signals)?,
                BackendCommand::Net(args) => serve(net_device(args)?, &args.common, signals)?,
            })
        });
    result.unwrap_or_else(|e| {
        log::error!("{e}");
        e.exit_code()
    })
}

fn blk_device(args: &BlkBackendArgs) -> Result<BlkDevice, SetupError> {
    let mut options = OpenOptions::new();
    options.read(true).write(!args.read_only);
    if args.direct {
        options.custom_flags(libc::O_DIRECT);
    }
    let file = options
        .open(&args.path)
        .map_err(|source| SetupError::OpenDisk {
            path: args.path.clone(),
            source,
        })?;
    BlkDevice::new(BlkConfig {
        file,
        read_only: args.read_only,
        serial: args.serial.clone(),
        direct: args.direct,
    })
    .map(|device| device.with_poll(std::time::Duration::from_micros(args.poll_us)))
    .map_err(|source| SetupError::Disk {
        path: args.path.clone(),
        source,
    })
}

fn net_device(args: &NetBackendArgs) -> Result<NetDevice, SetupError> {
    let mac = match &args.mac {
        Some(text) => {
            Some(crate::config::parse_mac(text).ok_or_else(|| SetupError::BadMac(text.clone()))?)
        }
        None => None,
    };
    let tap = match (&args.tap, args.fd) {
        (Some(name), _) => Tap::open_named(name).map_err(SetupError::Tap)?,
        (None, Some(fd)) => {
            // SAFETY: fcntl(F_GETFD) only checks that the descriptor is open.
            if fd < 0 || unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
                return Err(SetupError::FdNotOpen(fd));
            }
            // SAFETY: the command line hands this inherited descriptor to us; nothing else in
            // the process uses it, so the device may own (and eventually close) it.
            let owned = unsafe { OwnedFd::from_raw_fd(fd) };
            Tap::from_fd(owned).map_err(SetupError::Tap)?
        }
        (None, None) => return Err(SetupError::NoTap),
    };
    NetDevice::new(tap, mac).map_err(SetupError::Net)
}

/// The socket file we created, removed when we stop unless something replaced it meanwhile.
struct SocketFile {
    path: PathBuf,
    id: (u64, u64),
}

impl SocketFile {
    fn bind(path: &Path) -> Result<(UnixListener, SocketFile), SetupError> {
        match std::fs::symlink_metadata(path) {
            Ok(meta) if meta.file_type().is_socket() => {
                std::fs::remove_file(path).map_err(|source| SetupError::StaleSocket {
                    path: path.to_path_buf(),
                    source,
                })?
            }
            Ok(_) => return Err(SetupError::NotASocket(path.to_path_buf())),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(source) => {
                return Err(SetupError::StaleSocket {
                    path: path.to_path_buf(),
                    source,
                })
            }
        }
        let bind_err = |source| SetupError::Bind {
            path: path.to_path_buf(),
            source,
        };
        let listener = UnixListener::bind(path).map_err(bind_err)?;
        let meta = std::fs::symlink_metadata(path).map_err(bind_err)?;
        let file = SocketFile {
            path: path.to_path_buf(),
            id: (meta.dev(), meta.ino()),
        };
        Ok((listener, file))
    }

    fn remove(&self) {
        if let Ok(meta) = std::fs::symlink_metadata(&self.path) {
            if (meta.dev(), meta.ino()) == self.id {
                let _ = std::fs::remove_file(&self.path);
            }
        }
    }
}

/// Serves `device` on the socket until the frontend leaves (or, persistent, until a signal).
fn serve<D: Device>(
    device: D,
    common: &BackendCommonArgs,
    mut signals: StopSignals,
) -> Result<i32, SetupError> {
    let (listener, socket) = SocketFile::bind(&common.socket)?;
    let done = EventFd::new(EFD_NONBLOCK).map_err(SetupError::Signals)?;
    let done_writer = done.try_clone().map_err(SetupError::Signals)?;
    let server = Server::new(listener, device);
    let persistent = common.persistent;
    let path = common.socket.clone();
    log::info!(
        "vhost-user-{} backend listening on {}",
        D::KIND,
        path.display()
    );
    let policy = backend_policy(D::KIND);
    let thread = thread::Builder::new()
        .name("backend".to_string())
        .spawn(move || {
            // Filtered before the first frontend connects; the vhost-user daemon's threads
            // inherit the filter (see `devices::backend` for their calls).
            if let Err(e) = crate::seccomp::install(policy) {
                log::error!("{e}");
                return EXIT_FAILURE;
            }
            let code = serve_frontends(server, persistent, &path);
            let _ = done_writer.write(1);
            code
        })
        .map_err(SetupError::Signals)?;
    // This thread only waits for a signal from here on; it gets the same filter.
    crate::seccomp::install(policy)?;
    let code = match wait_for_stop(&mut signals, &done) {
        Ok(Some(signal)) => {
            log::info!("{signal}: stopping the backend");
            EXIT_OK
        }
        Ok(None) => thread.join().unwrap_or(EXIT_FAILURE),
        Err(e) => {
            log::error!("waiting for a stop signal failed: {e}");
            EXIT_FAILURE
        }
    };
    socket.remove();
    Ok(code)
}

/// The serving thread: one frontend after the other.
fn serve_frontends<D: Device>(mut server: Server<D>, persistent: bool, socket: &Path) -> i32 {
    loop {
        match server.serve_one() {
            Ok(()) if persistent => log::info!(
                "vhost-user frontend disconnected; waiting for the next one on {}",
                socket.display()
            ),
            Ok(()) => {
                log::info!("vhost-user frontend disconnected; exiting");
                return EXIT_OK;
            }
            Err(e) if persistent && e.is_connection_error() => {
                log::error!("{e}; waiting for the next frontend")
            }
            Err(e) => {
                log::error!("{e}");
                return EXIT_FAILURE;
            }
        }
    }
}

fn backend_policy(kind: &str) -> crate::seccomp::ThreadKind {
    match kind {
        "net" => crate::seccomp::ThreadKind::BackendNet,
        _ => crate::seccomp::ThreadKind::BackendBlk,
    }
}

/// Waits until a stop signal arrives (its name) or `done` is signalled (None).
fn wait_for_stop(signals: &mut StopSignals, done: &EventFd) -> io::Result<Option<&'static str>> {
    const SIGNAL: u64 = 0;
    const DONE: u64 = 1;
    let epoll = Epoll::new()?;
    let add = |fd: RawFd, data: u64| {
        epoll.ctl(
            ControlOperation::Add,
            fd,
            EpollEvent::new(EventSet::IN, data),
        )
    };
    add(signals.file.as_raw_fd(), SIGNAL)?;
    add(done.as_raw_fd(), DONE)?;
    let mut events = [EpollEvent::default(); 2];
    loop {
        let n = match epoll.wait(-1, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        for event in &events[..n] {
            if event.data() == DONE {
                return Ok(None);
            }
            if let Some(signal) = signals.read() {
                return Ok(Some(signal));
            }
        }
    }
}

/// SIGTERM and SIGINT, blocked in every thread and read from a signalfd.
struct StopSignals {
    file: File,
}

impl StopSignals {
    fn new() -> io::Result<StopSignals> {
        // SAFETY: sigemptyset initialises the set and sigaddset only writes into it.
        let set = unsafe {
            let mut set = std::mem::zeroed::<libc::sigset_t>();
            libc::sigemptyset(&mut set);
            libc::sigaddset(&mut set, libc::SIGTERM);
            libc::sigaddset(&mut set, libc::SIGINT);
            set
        };
        // SAFETY: `set` is an initialised signal set; the old mask is not needed.
        let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
        if rc != 0 {
            return Err(io::Error::from_raw_os_error(rc));
        }
        // SAFETY: `set` is valid; -1 asks for a new descriptor.
        let fd = unsafe { libc::signalfd(-1, &set, libc::SFD_CLOEXEC | libc::SFD_NONBLOCK) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` was just returned by signalfd and nothing else owns it.
        let file = unsafe { File::from_raw_fd(fd) };
        Ok(StopSignals { file })
    }

    /// The name of the pending stop signal, if any.
    fn read(&mut self) -> Option<&'static str> {
        let mut info = [0u8; std::mem::size_of::<libc::signalfd_siginfo>()];
        match self.file.read(&mut info) {
            // ssi_signo is the first field.
            Ok(n) if n == info.len() => {
                match u32::from_ne_bytes([info[0], info[1], info[2], info[3]]) as libc::c_int {
                    libc::SIGINT => Some("SIGINT"),
                    _ => Some("SIGTERM"),
                }
            }
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn socket_path_that_is_a_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("disk.img");
        std::fs::write(&file, b"data").unwrap();
        assert!(matches!(
            SocketFile::bind(&file),
            Err(SetupError::NotASocket(_))
        ));
        assert_eq!(std::fs::read(&file).unwrap(), b"data");

        // An old socket is replaced, and removed when we stop.
        let sock = dir.path().join("s");
        drop(UnixListener::bind(&sock).unwrap());
        let (_listener, socket) = SocketFile::bind(&sock).unwrap();
        assert!(sock.exists());
        socket.remove();
        assert!(!sock.exists());
    }
}
