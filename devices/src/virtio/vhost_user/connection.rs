//! One connection to a vhost-user backend: connecting (and waiting for the socket), the
//! handshake, and starting and stopping the vrings.

use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use vhost::vhost_user::message::{VhostUserHeaderFlag, VHOST_USER_MAX_VRINGS};
use vhost::vhost_user::{
    Frontend, VhostUserFrontend, VhostUserProtocolFeatures, VhostUserVirtioFeatures,
};
use vhost::{VhostBackend, VringConfigData};

use super::active::Active;
use super::Error;

/// The protocol features the device uses when the backend has them.
const WANTED_PROTOCOL: VhostUserProtocolFeatures = VhostUserProtocolFeatures::MQ
    .union(VhostUserProtocolFeatures::REPLY_ACK)
    .union(VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS)
    .union(VhostUserProtocolFeatures::CONFIG);

/// VHOST_USER_F_PROTOCOL_FEATURES: a vhost-user bit in the virtio feature word.
pub(super) const PROTOCOL_FEATURES_BIT: u64 = VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();

/// How long GET_CONFIG may take (the frontend library would wait forever on some replies).
const CONFIG_TIMEOUT: Duration = Duration::from_secs(10);
/// GET_CONFIG's request code, and the header flags: protocol version 1, and the reply bit.
const GET_CONFIG: u32 = 24;
const HEADER_VERSION: u32 = 0x1;
const HEADER_REPLY: u32 = 0x4;
/// The largest configuration space vhost-user carries.
const MAX_CONFIG_SIZE: usize = 0x1000;

/// How often to look for the socket while waiting for a backend to start: quickly at first
/// (a backend started in parallel usually listens within a few ms), backing off to the maximum.
const STARTUP_POLL_FIRST: Duration = Duration::from_millis(1);
const STARTUP_POLL_MAX: Duration = Duration::from_millis(10);

/// Nobody listens on `path` (yet): the socket file is missing or stale.
pub(super) fn is_absent(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
    )
}

/// Connects to `path`, waiting up to `timeout` for a backend to listen there.
pub(super) fn wait_for_socket(
    path: &Path,
    timeout: Duration,
    label: &str,
) -> Result<UnixStream, Error> {
    let deadline = Instant::now() + timeout;
    let mut waiting = false;
    let mut poll = STARTUP_POLL_FIRST;
    loop {
        match UnixStream::connect(path) {
            Ok(stream) => return Ok(stream),
            Err(e) if is_absent(&e) => {
                let now = Instant::now();
                if now >= deadline {
                    return Err(Error::SocketTimeout {
                        path: path.to_path_buf(),
                        timeout,
                    });
                }
                if !waiting {
                    log::info!(
                        "vhost-user {label}: waiting up to {timeout:?} for the backend socket {}",
                        path.display()
                    );
                    waiting = true;
                }
                std::thread::sleep(poll.min(deadline - now));
                poll = (poll * 2).min(STARTUP_POLL_MAX);
            }
            Err(source) => {
                return Err(Error::Connect {
                    path: path.to_path_buf(),
                    source,
                })
            }
        }
    }
}

/// Waits for events on `fds`; returns false on timeout. `timeout_ms` -1 waits forever.
pub(super) fn poll(fds: &mut [libc::pollfd], timeout_ms: i32) -> io::Result<bool> {
    loop {
        // SAFETY: `fds` is a valid, exclusively borrowed array of `fds.len()` pollfd structs,
        // and the descriptors in it are owned by the caller for the duration of the call.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout_ms) };
        if n >= 0 {
            return Ok(n > 0);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// `fd` must stay open until the poll returns.
pub(super) fn pollfd(fd: RawFd, events: libc::c_short) -> libc::pollfd {
    libc::pollfd {
        fd,
        events,
        revents: 0,
    }
}

/// A negotiated connection.
pub(super) struct Connection {
    path: PathBuf,
    frontend: Frontend,
    /// The same socket as the frontend's, to watch for the backend hanging up.
    sock: UnixStream,
    /// The backend's virtio features (GET_FEATURES), including PROTOCOL_FEATURES.
    pub backend_features: u64,
    /// The protocol features both sides use.
    pub protocol: VhostUserProtocolFeatures,
    /// The backend's queue count (GET_QUEUE_NUM), if it has the MQ protocol feature.
    pub queue_num: Option<u64>,
}

impl Connection {
    /// SET_OWNER, GET_FEATURES, then the protocol features and queue count when the backend
    /// has them.
    pub fn handshake(path: &Path, stream: UnixStream) -> Result<Self, Error> {
        let sock = stream.try_clone().map_err(Error::Socket)?;
        let mut conn = Connection {
            path: path.to_path_buf(),
            frontend: Frontend::from_stream(stream, VHOST_USER_MAX_VRINGS),
            sock,
            backend_features: 0,
            protocol: VhostUserProtocolFeatures::empty(),
            queue_num: None,
        };
        conn.call("SET_OWNER", |f| f.set_owner())?;
        conn.backend_features = conn.call("GET_FEATURES", |f| f.get_features())?;
        if conn.backend_features & PROTOCOL_FEATURES_BIT != 0 {
            let offered = conn.call("GET_PROTOCOL_FEATURES", |f| f.get_protocol_features())?;
            let protocol = offered & WANTED_PROTOCOL;
            conn.call("SET_PROTOCOL_FEATURES", |f| {
                f.set_protocol_features(protocol)
            })?;
            conn.protocol = protocol;
            if protocol.contains(VhostUserProtocolFeatures::REPLY_ACK) {
                // Every later message is acknowledged: failures surface where they happen.
                conn.frontend.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
            }
            if protocol.contains(VhostUserProtocolFeatures::MQ) {
                conn.queue_num = Some(conn.call("GET_QUEUE_NUM", |f| f.get_queue_num())?);
            }
        }
        Ok(conn)
    }

    /// The backend's configuration space (needs the CONFIG protocol feature).
    ///
    /// Sent by hand rather than through the frontend library, which waits forever for the
    /// payload when a backend answers with the empty reply that means failure.
    /// `Ok(None)` is that failure; an error leaves the connection unusable.
    pub fn get_config(&mut self, size: usize) -> Result<Option<Vec<u8>>, Error> {
        let failed = |source| Error::Backend {
            path: self.path.clone(),
            op: "GET_CONFIG",
            source: vhost::Error::VhostUserProtocol(vhost::vhost_user::Error::SocketError(source)),
        };
        if size > MAX_CONFIG_SIZE {
            return Ok(None);
        }
        self.sock
            .set_read_timeout(Some(CONFIG_TIMEOUT))
            .map_err(Error::Socket)?;
        let reply = exchange_config(&mut self.sock, size).map_err(failed);
        self.sock.set_read_timeout(None).map_err(Error::Socket)?;
        reply
    }

    /// Hands the backend the guest memory and the queues, starting each queue at `bases`.
    pub fn start(&mut self, active: &Active, bases: &[u16]) -> Result<(), Error> {
        let missing = active.acked_features & !self.backend_features;
        if missing != 0 {
            return Err(Error::FeaturesLost {
                path: self.path.clone(),
                missing,
            });
        }
        let features = active.acked_features | (self.backend_features & PROTOCOL_FEATURES_BIT);
        self.call("SET_FEATURES", |f| f.set_features(features))?;
        self.call("SET_MEM_TABLE", |f| f.set_mem_table(&active.regions))?;
        let enable = self.backend_features & PROTOCOL_FEATURES_BIT != 0;
        for (q, &base) in active.queues.iter().zip(bases) {
            let index = usize::from(q.index);
            let addrs = VringConfigData {
                queue_max_size: q.size,
                queue_size: q.size,
                flags: 0,
                desc_table_addr: q.desc,
                used_ring_addr: q.used,
                avail_ring_addr: q.avail,
                log_addr: None,
            };
            self.call("SET_VRING_NUM", |f| f.set_vring_num(index, q.size))?;
            self.call("SET_VRING_ADDR", |f| f.set_vring_addr(index, &addrs))?;
            self.call("SET_VRING_BASE", |f| f.set_vring_base(index, base))?;
            self.call("SET_VRING_KICK", |f| f.set_vring_kick(index, &q.kick))?;
            self.call("SET_VRING_CALL", |f| f.set_vring_call(index, &active.call))?;
            if enable {
                self.call("SET_VRING_ENABLE", |f| f.set_vring_enable(index, true))?;
            }
        }
        Ok(())
    }

    /// Stops every queue (GET_VRING_BASE).
    pub fn stop(&mut self, active: &Active) -> Result<(), Error> {
        for q in &active.queues {
            let index = usize::from(q.index);
            self.call("GET_VRING_BASE", |f| f.get_vring_base(index))?;
        }
        Ok(())
    }

    /// False once the backend hung up.
    pub fn is_alive(&self) -> bool {
        let mut fds = [pollfd(self.fd(), libc::POLLRDHUP)];
        matches!(poll(&mut fds, 0), Ok(false))
    }

    /// The socket, to poll for POLLRDHUP/POLLHUP/POLLERR (it never has data to read between
    /// requests: the backend only answers).
    pub fn fd(&self) -> RawFd {
        self.sock.as_raw_fd()
    }

    fn call<T>(
        &mut self,
        op: &'static str,
        f: impl FnOnce(&mut Frontend) -> vhost::Result<T>,
    ) -> Result<T, Error> {
        f(&mut self.frontend).map_err(|source| Error::Backend {
            path: self.path.clone(),
            op,
            source,
        })
    }
}

/// GET_CONFIG of `size` bytes at offset 0: header (request, flags, size), body (offset, size,
/// flags), then `size` bytes of payload; the reply has the same layout, with no payload and a
/// zero size in the body when the backend failed.
fn exchange_config(sock: &mut UnixStream, size: usize) -> io::Result<Option<Vec<u8>>> {
    let word = |b: &[u8], i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
    let mut request = Vec::with_capacity(24 + size);
    for value in [
        GET_CONFIG,
        HEADER_VERSION,
        (12 + size) as u32,
        0,
        size as u32,
        0,
    ] {
        request.extend_from_slice(&value.to_le_bytes());
    }
    request.resize(24 + size, 0);
    sock.write_all(&request)?;

    let mut header = [0u8; 12];
    sock.read_exact(&mut header)?;
    let len = word(&header, 8) as usize;
    let bad = |what: &str| io::Error::new(io::ErrorKind::InvalidData, what.to_string());
    if word(&header, 0) != GET_CONFIG || word(&header, 4) & HEADER_REPLY == 0 {
        return Err(bad("the reply is not GET_CONFIG's"));
    }
    if !(12..=12 + MAX_CONFIG_SIZE).contains(&len) {
        return Err(bad("the reply has an invalid size"));
    }
    let mut reply = vec![0u8; len];
    sock.read_exact(&mut reply)?;
    let (body, payload) = reply.split_at(12);
    if word(body, 4) as usize != size || payload.len() != size {
        return Ok(None);
    }
    Ok(Some(payload.to_vec()))
}
