//! mvmm's device models served as vhost-user backends, in a process of their own.
//!
//! The same request engines that the in-VMM devices run ([`RequestHandler`] for virtio-blk,
//! [`RxPath`]/[`TxPath`] for virtio-net) serve the queues here; only the transport differs:
//! the vhost-user-backend crate's [`VhostUserDaemon`] speaks the protocol on a Unix socket,
//! maps the guest memory the frontend shares, and runs one vring worker thread that calls the
//! backend's `handle_event` on every kick (and, for net, on tap readiness).
//!
//! A [`Server`] owns the listening socket and the device (disk or tap). Each frontend gets a
//! fresh daemon and fresh per-connection state (features, memory, rings); the device itself
//! survives from one frontend to the next.
//!
//! Two things make the crate fit the frontends that exist: net's frontends reach the daemon
//! through a [`relay`] (QEMU enables net rings before it sets the features, which the crate
//! refuses), and every ring is a [`Vring`], which signals the driver when it starts (a killed
//! backend may have left completions it never announced).
//!
//! # Threads and system calls (for the per-thread seccomp filters)
//!
//! A backend process runs these threads:
//! - the caller's thread, which runs [`Server::serve_one`]: `accept4` on the listening
//!   socket, and creating a daemon per frontend (`eventfd2`, `epoll_create1`, `epoll_ctl`,
//!   `clone3`/`clone`, `mmap`/`mprotect`/`munmap` for thread stacks, `set_robust_list`,
//!   `rseq`, `sigaltstack`, `futex` to join the daemon's threads, `close`); for net only
//!   (`Device::RELAY`), the private link to the daemon (`mkdir`, `socket` (AF_UNIX),
//!   `bind`, `listen`, `connect`, `unlink`, `rmdir` in the temporary directory) and the
//!   relay itself (`poll`, `recvmsg`/`sendmsg` and `write` on both connections,
//!   `shutdown`). Seccomp filters are inherited by threads created afterwards, so the filter
//!   this thread installs before its first `serve_one` also covers the two threads below
//!   and must allow their calls too;
//! - the daemon's protocol thread (`vhost-<kind>`, created by the crate): `recvmsg`/`sendmsg`
//!   on the connection, `mmap`/`munmap` of the frontend's memory regions (`MAP_SHARED` from
//!   the received memfds), `fstat`, `close` of received descriptors, `epoll_ctl` and `write`
//!   (eventfd) to start and stop rings and to signal a ring that starts, `shutdown`, `futex`,
//!   `madvise`, `exit`;
//! - the vring worker (`vring_worker`, created by the crate): `epoll_wait`, `read` of kick
//!   eventfds, `write` of call eventfds, plus the device's own I/O, listed in [`blk`] and
//!   [`net`]. All three run under the one filter of the backend's kind
//!   (`resources/seccomp/backend-<kind>.json` in the mvmm package).
//!
//! All of them may `write` log lines to stderr.
//!
//! [`RequestHandler`]: crate::virtio::block::RequestHandler
//! [`RxPath`]: crate::virtio::net::RxPath
//! [`TxPath`]: crate::virtio::net::TxPath

pub mod blk;
pub mod net;
mod relay;
mod vring;

#[cfg(test)]
mod tests;

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::{Arc, Mutex, PoisonError};

use vhost::vhost_user::{Error as VhostUserError, Listener};
use vhost_user_backend::{VhostUserBackendMut, VhostUserDaemon};
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

pub use blk::{BlkBackend, BlkConfig, BlkDevice};
pub use net::{NetBackend, NetDevice};
pub use relay::RelayError;
pub use vring::Vring;

/// The largest queue a backend accepts. QEMU's virtio-mmio transport reports 1024 to the
/// guest whatever the device's queue size, and Linux then asks for 1024 entries, so a smaller
/// maximum would refuse QEMU microVMs. The request limits the driver sees (virtio-blk's
/// `seg_max`) stay those of the in-VMM devices.
pub const MAX_QUEUE_SIZE: u16 = 1024;

/// Guest memory as the daemon maps it, swapped when the frontend sends a new table.
pub type BackendMemory = GuestMemoryAtomic<GuestMemoryMmap>;
/// The daemon's view of one queue.
pub type BackendVring = Vring<BackendMemory>;
/// A backend as the daemon holds it.
pub type Shared<B> = Arc<Mutex<B>>;
/// The daemon serving one frontend.
pub type Daemon<B> = VhostUserDaemon<Shared<B>>;

#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("{0}")]
    Disk(#[from] crate::virtio::block::DiskError),
    #[error(transparent)]
    Block(#[from] crate::virtio::block::BlockError),
    #[error(
        "MAC address {0} is a multicast address: clear the lowest bit of the first byte \
         (e.g. use 02:xx:xx:xx:xx:xx)"
    )]
    MulticastMac(String),
    #[error("cannot set up the backend's event handling: {0} (out of file descriptors?)")]
    Setup(io::Error),
    #[error("cannot start the vhost-user daemon: {0}")]
    Daemon(vhost_user_backend::Error),
    #[error("cannot accept a vhost-user frontend on the socket: {0}")]
    Accept(vhost_user_backend::Error),
    #[error("the vhost-user connection failed: {0}")]
    Connection(vhost_user_backend::Error),
    #[error(transparent)]
    Relay(#[from] RelayError),
    #[error(
        "the device is still held by a finished connection (a backend thread did not stop); \
         restart the backend"
    )]
    DeviceLost,
}

impl BackendError {
    /// Whether only the connection failed: a persistent backend can serve the next frontend.
    pub fn is_connection_error(&self) -> bool {
        match self {
            BackendError::Connection(_) => true,
            BackendError::Relay(e) => e.is_connection_error(),
            _ => false,
        }
    }
}

/// A device served over vhost-user. Its backend (the per-connection state around it) is made
/// fresh for every frontend, and the device taken back when the frontend is gone.
pub trait Device: Send + Sized + 'static {
    type Backend: VhostUserBackendMut<Bitmap = (), Vring = BackendVring> + 'static;

    /// Short name (`blk`, `net`) for thread names and log lines.
    const KIND: &'static str;

    /// Whether the frontend's messages pass through the [`relay`] (for frontends that send
    /// them in an order the crate refuses). Only where needed: the relay's private socket
    /// costs the sandbox a few system calls.
    const RELAY: bool = false;

    /// The state serving one frontend, with the daemon's exit event.
    fn into_backend(self, exit: ExitEvent) -> Self::Backend;

    /// The device back from a finished connection's backend, with its exit event.
    fn from_backend(backend: Self::Backend) -> (Self, ExitEvent);

    /// Hooks the backend into the daemon's event loop before the frontend connects.
    fn attach(_daemon: &Daemon<Self::Backend>, _backend: &Shared<Self::Backend>) -> io::Result<()> {
        Ok(())
    }
}

/// The vring worker's exit event: the daemon signals it when the frontend has gone, and the
/// worker thread stops (without it the daemon would wait for that thread forever).
///
/// vhost-user-backend 0.24 registers the consumer it is given with `into_raw_fd` and never
/// closes it, so the descriptor is remembered and closed by [`ExitEvent::reclaim`] once the
/// daemon is gone: a persistent backend would otherwise leak one descriptor per frontend.
pub struct ExitEvent {
    state: Mutex<ExitState>,
}

struct ExitState {
    pair: Option<(EventConsumer, EventNotifier)>,
    handed_out: Option<RawFd>,
}

impl ExitEvent {
    fn new() -> io::Result<ExitEvent> {
        let pair = new_event_consumer_and_notifier(EventFlag::NONBLOCK | EventFlag::CLOEXEC)?;
        Ok(ExitEvent {
            state: Mutex::new(ExitState {
                pair: Some(pair),
                handed_out: None,
            }),
        })
    }

    /// The pair for `VhostUserBackendMut::exit_event`; the daemon asks once for its single
    /// worker thread.
    pub(crate) fn hand_out(&self) -> Option<(EventConsumer, EventNotifier)> {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let (consumer, notifier) = state.pair.take()?;
        state.handed_out = Some(consumer.as_raw_fd());
        Some((consumer, notifier))
    }

    /// Closes the consumer the daemon leaked.
    ///
    /// # Safety
    /// Only once the daemon that got the consumer is dropped (its worker thread joined and its
    /// epoll closed), so that nothing uses or closes the descriptor any more.
    unsafe fn reclaim(self) {
        let state = self
            .state
            .into_inner()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(fd) = state.handed_out {
            // SAFETY: per this function's contract the daemon is gone, and vhost-user-backend
            // 0.24 turned the consumer into a raw descriptor it never closes: we are its only
            // owner.
            unsafe { libc::close(fd) };
        }
        // A pair never handed out is closed by its own drop.
        drop(state.pair);
    }
}

/// Serves a device to one vhost-user frontend after the other on a listening socket.
pub struct Server<D: Device> {
    listener: Listener,
    device: Option<D>,
}

impl<D: Device> Server<D> {
    /// `listener` is bound to the socket the frontends connect to.
    pub fn new(listener: UnixListener, device: D) -> Server<D> {
        Server {
            listener: Listener::from(listener),
            device: Some(device),
        }
    }

    /// Waits for a frontend and serves it until it disconnects. `Ok` means it went away
    /// cleanly (closed the socket); a [`BackendError::is_connection_error`] error means the
    /// connection failed but the server can take the next frontend.
    pub fn serve_one(&mut self) -> Result<(), BackendError> {
        let device = self.device.take().ok_or(BackendError::DeviceLost)?;
        let exit = match ExitEvent::new() {
            Ok(exit) => exit,
            Err(e) => {
                self.device = Some(device);
                return Err(BackendError::Setup(e));
            }
        };
        let backend = Arc::new(Mutex::new(device.into_backend(exit)));
        let result = self.run_daemon(&backend);
        // The daemon is gone; its threads drop their references as they finish. Take the
        // device back for the next frontend.
        let backend = reclaim(backend)?
            .into_inner()
            .unwrap_or_else(PoisonError::into_inner);
        let (device, exit) = D::from_backend(backend);
        // SAFETY: `run_daemon` dropped the daemon, and the backend (which every daemon thread
        // held a reference to) is ours alone again, so those threads have finished.
        unsafe { exit.reclaim() };
        self.device = Some(device);
        result
    }

    fn run_daemon(&mut self, backend: &Shared<D::Backend>) -> Result<(), BackendError> {
        let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
        let name = format!("vhost-{}", D::KIND);
        let mut daemon =
            VhostUserDaemon::new(name, backend.clone(), mem).map_err(BackendError::Daemon)?;
        D::attach(&daemon, backend).map_err(BackendError::Setup)?;
        let relayed = if D::RELAY {
            let frontend = self.accept()?;
            let (link, relay_end) = relay::daemon_link()?;
            daemon
                .start(&mut Listener::from(link))
                .map_err(BackendError::Daemon)?;
            relay::run(frontend, relay_end)
        } else {
            daemon
                .start(&mut self.listener)
                .map_err(BackendError::Accept)?;
            Ok(())
        };
        let result = daemon.wait();
        // Dropping the daemon signals the exit event and joins the vring worker.
        drop(daemon);
        // A daemon error wins: it explains the relay failure it caused (a closed connection).
        match result {
            Ok(())
            | Err(vhost_user_backend::Error::HandleRequest(
                VhostUserError::Disconnected | VhostUserError::PartialMessage,
            )) => relayed.map_err(BackendError::Relay),
            Err(e) => Err(BackendError::Connection(e)),
        }
    }

    /// Waits for the next frontend.
    fn accept(&mut self) -> Result<UnixStream, BackendError> {
        loop {
            match self.listener.accept() {
                Ok(Some(stream)) => return Ok(stream),
                // The frontend gave up before we accepted it.
                Ok(None) => continue,
                Err(e) => {
                    return Err(BackendError::Accept(
                        vhost_user_backend::Error::CreateBackendListener(e),
                    ))
                }
            }
        }
    }

    /// The device, to serve it another way (tests, shutdown).
    pub fn into_device(self) -> Option<D> {
        self.device
    }
}

/// Bytes `offset..offset + size` of a configuration space, zero past its end (the protocol
/// wants exactly `size` bytes back).
pub(crate) fn config_slice(config: &[u8], offset: u32, size: u32) -> Vec<u8> {
    let mut out = vec![0u8; size as usize];
    let start = (offset as usize).min(config.len());
    let end = config.len().min(start.saturating_add(out.len()));
    out[..end - start].copy_from_slice(&config[start..end]);
    out
}

/// Gives only `&mut` access to its content, so a shared `&Exclusive<T>` exposes nothing and
/// may cross threads whatever `T` is (like the unstable `std::sync::Exclusive`). The daemon
/// wants `Sync` backends, while the device models are only `Send` (net's iovec scratch buffers
/// hold raw pointers; block's test hook is a `FnMut`), and the backends only ever use them
/// through `&mut self`.
pub(crate) struct Exclusive<T>(pub(crate) T);

// SAFETY: no method reaches the content through `&self`, so sharing references between
// threads gives none of them access to it; moving it requires `T: Send`.
unsafe impl<T: Send> Sync for Exclusive<T> {}

impl<T> Exclusive<T> {
    pub(crate) fn get_mut(&mut self) -> &mut T {
        &mut self.0
    }
}

/// Logs queue-level trouble (a driver that set up bad rings) once per connection, then only
/// at debug level, so a misbehaving guest cannot flood the log.
#[derive(Default)]
pub(crate) struct QueueWarnings {
    warned: bool,
}

impl QueueWarnings {
    pub(crate) fn warn(&mut self, kind: &str, what: std::fmt::Arguments) {
        if self.warned {
            log::debug!("vhost-user-{kind}: {what}");
        } else {
            self.warned = true;
            log::warn!(
                "vhost-user-{kind}: {what} (further queue errors are logged at debug level)"
            );
        }
    }
}

/// The sole owner of `shared` once every other holder has dropped it: a daemon thread that is
/// still unwinding its stack may hold a reference for a moment after the daemon is gone.
fn reclaim<T>(mut shared: Arc<T>) -> Result<T, BackendError> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
    loop {
        match Arc::try_unwrap(shared) {
            Ok(owned) => return Ok(owned),
            Err(still_shared) if std::time::Instant::now() < deadline => {
                shared = still_shared;
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
            Err(_) => return Err(BackendError::DeviceLost),
        }
    }
}
