//! vhost-user frontend: a virtio device whose queues an external process (the backend, e.g.
//! virtiofsd) serves over a unix socket.
//!
//! The VMM only sets the device up: the backend maps guest memory (which must be shared, i.e.
//! memfd-backed), waits on the queues' ioeventfds (VRING_KICK) and raises the guest's interrupt
//! through the irqfd (VRING_CALL), so requests and completions never pass through mvmm.
//!
//! Layout:
//! - [`VhostUserKind`] (`kind`): the personality (virtio-fs, virtio-blk): device ID, features,
//!   queues and configuration space;
//! - `connection`: connecting (waiting for the socket), the handshake, vring setup;
//! - `active`: what activation handed the backend, kept for a replay;
//! - `watcher`: the thread that notices a dead backend and reconnects when it comes back.

mod active;
mod connection;
mod kind;
mod watcher;

#[cfg(test)]
mod tests;

use std::io;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vhost::vhost_user::VhostUserProtocolFeatures;
use vm_memory::GuestMemoryMmap;

pub use kind::{VhostUserKind, FS_TAG_MAX_LEN};

use super::{ActivateError, ActivatedQueue, VirtioDevice, VirtioInterrupt};
use active::Active;
use connection::Connection;
use watcher::{Context, Session, Watcher};

/// The queue size when the configuration names none.
pub const DEFAULT_QUEUE_SIZE: u16 = 256;
/// The largest queue size offered (virtiofsd accepts up to 32768, QEMU's backends 1024).
pub const MAX_QUEUE_SIZE: u16 = 1024;
const MIN_QUEUE_SIZE: u16 = 2;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "the vhost-user socket {} did not appear within {timeout:?}: start the backend on that path (e.g. virtiofsd --socket-path {}) or raise the connect timeout",
        path.display(),
        path.display()
    )]
    SocketTimeout { path: PathBuf, timeout: Duration },
    #[error("cannot connect to the vhost-user socket {}: {source}", path.display())]
    Connect {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot set up the vhost-user socket: {0}")]
    Socket(#[source] io::Error),
    #[error("the vhost-user backend at {} failed {op}: {source}", path.display())]
    Backend {
        path: PathBuf,
        op: &'static str,
        #[source]
        source: vhost::Error,
    },
    #[error("the virtio-fs tag {0:?} is invalid: use 1 to 36 bytes, without NUL")]
    FsTag(String),
    #[error("queue size {0} is invalid: use a power of two from 2 to 1024")]
    QueueSize(u16),
    #[error("{count} {what} configured: use at least 1")]
    QueueCount { what: &'static str, count: usize },
    #[error(
        "{wanted} {what} configured, but the vhost-user backend at {} serves at most {max}: configure fewer",
        path.display()
    )]
    BackendQueues {
        path: PathBuf,
        what: &'static str,
        wanted: usize,
        max: u64,
    },
    #[error(
        "the vhost-user-blk backend at {} does not provide its configuration space (it lacks the CONFIG protocol feature or failed GET_CONFIG): use a backend that does",
        path.display()
    )]
    NoBackendConfig { path: PathBuf },
    #[error(
        "vhost-user needs shared guest memory: the region at guest address {gpa:#x} is not a shared mapping of a file; back guest memory with a memfd"
    )]
    PrivateMemory { gpa: u64 },
    #[error("guest memory has {0} regions; vhost-user passes at most 32")]
    TooManyRegions(usize),
    #[error("queue {queue}: the {ring} ring at guest address {gpa:#x} is not inside one guest memory region")]
    RingAddress {
        queue: u16,
        ring: &'static str,
        gpa: u64,
    },
    #[error("queue {index} does not exist: the device has {count} queues")]
    QueueIndex { index: u16, count: usize },
    #[error("the transport gives no interrupt eventfd (VirtioInterrupt::direct_notifier) for the backend to signal the guest")]
    NoNotifier,
    #[error(
        "the vhost-user backend at {} does not offer features {missing:#x} that the driver accepted",
        path.display()
    )]
    FeaturesLost { path: PathBuf, missing: u64 },
    #[error("cannot read the used index of queue {queue} from guest memory: {reason}")]
    UsedIndex { queue: u16, reason: String },
}

impl Error {
    /// The backend went away, as opposed to refusing something (a backend built on the
    /// vhost-user-backend crate hangs up after a refusal too).
    fn is_disconnect(&self) -> bool {
        use vhost::vhost_user::Error as E;
        match self {
            Error::Backend {
                source: vhost::Error::VhostUserProtocol(e),
                ..
            } => matches!(
                e,
                E::SocketBroken(_) | E::SocketError(_) | E::Disconnected | E::PartialMessage
            ),
            _ => false,
        }
    }
}

/// A virtio device served by a vhost-user backend.
pub struct VhostUserDevice {
    kind: VhostUserKind,
    queue_sizes: Vec<u16>,
    /// Features offered to the driver, and the ones it accepted.
    features: u64,
    acked_features: u64,
    /// Protocol features negotiated at construction.
    protocol: VhostUserProtocolFeatures,
    config: Vec<u8>,
    ctx: Context,
    /// The connection while the device is not running (the watcher owns it otherwise).
    conn: Option<Connection>,
    watcher: Option<Watcher>,
}

impl VhostUserDevice {
    /// Connects to the backend listening on `socket` and negotiates with it.
    ///
    /// - `queue_size`: the largest queue the driver may set up, a power of two from 2 to 1024
    ///   ([`DEFAULT_QUEUE_SIZE`] is a good default);
    /// - `num_queues`: virtio-fs: the number of request queues (default 1; the device has one
    ///   more, the high-priority queue); virtio-blk: the number of queues (default: as many as
    ///   the backend serves);
    /// - `connect_timeout`: how long to wait for the socket to appear (the backend may start
    ///   in parallel); [`Error::SocketTimeout`] names the socket when it does not.
    pub fn new(
        socket: PathBuf,
        kind: VhostUserKind,
        queue_size: u16,
        num_queues: Option<u16>,
        connect_timeout: Duration,
    ) -> Result<Self, Error> {
        kind.validate()?;
        if !queue_size.is_power_of_two() || !(MIN_QUEUE_SIZE..=MAX_QUEUE_SIZE).contains(&queue_size)
        {
            return Err(Error::QueueSize(queue_size));
        }
        let label = kind.label(&socket);
        let started = Instant::now();
        let stream = connection::wait_for_socket(&socket, connect_timeout, &label)?;
        let mut conn = Connection::handshake(&socket, stream)?;
        let queues = kind.queue_count(num_queues, conn.queue_num, &socket)?;
        kind.check_backend(conn.backend_features, queues, &socket)?;
        let features = kind.offered_features(conn.backend_features, queues);
        let backend_config = if conn.protocol.contains(VhostUserProtocolFeatures::CONFIG) {
            conn.get_config(kind.config_size())?
        } else {
            None
        };
        let config = kind.config_space(backend_config, queues, features, &socket)?;
        log::debug!(
            "vhost-user {label}: connected to {} and negotiated in {:?}",
            socket.display(),
            started.elapsed()
        );
        Ok(VhostUserDevice {
            queue_sizes: vec![queue_size; queues],
            features,
            acked_features: 0,
            protocol: conn.protocol,
            config,
            ctx: Context {
                path: socket,
                label,
                needs_reset: Arc::new(AtomicBool::new(false)),
                connected: Arc::new(AtomicBool::new(true)),
                talking: Arc::default(),
            },
            conn: Some(conn),
            watcher: None,
            kind,
        })
    }

    pub fn kind(&self) -> &VhostUserKind {
        &self.kind
    }

    /// The backend died while the device ran: the driver has to reset the device (the
    /// transport should report DEVICE_NEEDS_RESET). Cleared by the reset.
    pub fn needs_reset(&self) -> bool {
        self.ctx.needs_reset.load(Ordering::SeqCst)
    }

    /// The vhost-user protocol features negotiated with the backend (`VHOST_USER_PROTOCOL_F_*`).
    pub fn protocol_features(&self) -> u64 {
        self.protocol.bits()
    }

    /// Whether a backend is connected (false while waiting for a restarted one).
    pub fn backend_connected(&self) -> bool {
        self.ctx.connected.load(Ordering::SeqCst)
    }

    /// The connection kept from before, if the backend is still there, or a new one.
    fn take_connection(&mut self) -> Option<Connection> {
        if let Some(conn) = self.conn.take().filter(Connection::is_alive) {
            return Some(conn);
        }
        let stream = std::os::unix::net::UnixStream::connect(&self.ctx.path).ok()?;
        match Connection::handshake(&self.ctx.path, stream) {
            Ok(conn) => Some(conn),
            Err(e) => {
                log::warn!("vhost-user {}: {e}", self.ctx.label);
                None
            }
        }
    }

    fn stop_watcher(&mut self) -> Option<Session> {
        self.watcher.take().and_then(Watcher::stop)
    }
}

impl VirtioDevice for VhostUserDevice {
    fn device_type(&self) -> u32 {
        self.kind.device_type()
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        self.queue_sizes.clone()
    }

    fn features(&self) -> u64 {
        self.features
    }

    fn ack_features(&mut self, features: u64) {
        self.acked_features = features & self.features;
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let Ok(start) = usize::try_from(offset) else {
            return;
        };
        if let Some(src) = self.config.get(start..) {
            let n = src.len().min(data.len());
            data[..n].copy_from_slice(&src[..n]);
        }
    }

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        interrupt: Arc<dyn VirtioInterrupt>,
        queues: Vec<ActivatedQueue>,
    ) -> Result<(), ActivateError> {
        let started = Instant::now();
        if let Some(session) = self.stop_watcher() {
            self.conn = session.conn;
        }
        let label = self.ctx.label.clone();
        let active = Active::new(
            mem,
            interrupt,
            queues,
            self.acked_features,
            self.queue_sizes.len(),
        )
        .map_err(|e| ActivateError::Other(format!("vhost-user {label}: {e}")))?;
        let conn = match self.take_connection() {
            Some(mut conn) => match conn.start(&active, &active.first_bases()) {
                Ok(()) => Some(conn),
                Err(e) if !e.is_disconnect() => {
                    self.conn = Some(conn);
                    return Err(ActivateError::Other(format!("vhost-user {label}: {e}")));
                }
                Err(e) => {
                    log::warn!("vhost-user {label}: {e}; waiting for the backend to come back");
                    None
                }
            },
            None => {
                log::warn!(
                    "vhost-user {label}: no backend at {} to activate the device; waiting for one",
                    self.ctx.path.display()
                );
                None
            }
        };
        let session = Session { conn, active };
        let watcher = Watcher::spawn(self.ctx.clone(), session).map_err(ActivateError::Worker)?;
        self.watcher = Some(watcher);
        log::debug!("vhost-user {label}: activated in {:?}", started.elapsed());
        Ok(())
    }

    fn reset(&mut self) -> bool {
        if let Some(Session { conn, active }) = self.stop_watcher() {
            self.conn = conn.and_then(|mut conn| match conn.stop(&active) {
                Ok(()) => Some(conn),
                Err(e) => {
                    log::warn!("vhost-user {}: stopping the queues: {e}", self.ctx.label);
                    conn.is_alive().then_some(conn)
                }
            });
            self.ctx
                .connected
                .store(self.conn.is_some(), Ordering::SeqCst);
        }
        self.ctx.needs_reset.store(false, Ordering::SeqCst);
        true
    }
}

impl std::fmt::Debug for VhostUserDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VhostUserDevice")
            .field("socket", &self.ctx.path)
            .field("kind", &self.kind)
            .field("queues", &self.queue_sizes.len())
            .field("running", &self.watcher.is_some())
            .field("connected", &self.backend_connected())
            .finish()
    }
}

impl Drop for VhostUserDevice {
    fn drop(&mut self) {
        self.stop_watcher();
    }
}
