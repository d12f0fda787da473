//! A vhost-user message relay between the frontend and the daemon, for what frontends really
//! send.
//!
//! QEMU (7.2) sends SET_VRING_ENABLE for a vhost-user-net device while it realizes the NIC,
//! before SET_FEATURES. The vhost crate (0.18) refuses that message until the frontend has
//! acked VHOST_USER_F_PROTOCOL_FEATURES, and the daemon of vhost-user-backend (0.24) drops the
//! connection on the refusal; neither offers a hook before that check. So the frontend's
//! connection ends here, on the serving thread, and every message is passed on to the daemon
//! over a private socket, unchanged, with the descriptors that come with it; replies go back
//! the same way. Only the early SET_VRING_ENABLE is held back (and acked, if the frontend asks
//! for a reply) and passed on right after SET_FEATURES, when it is legal. The data path
//! (kick and call eventfds, guest memory) never passes through here.

use std::fs::DirBuilder;
use std::hash::{BuildHasher, RandomState};
use std::io::{self, Write};
use std::net::Shutdown;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::DirBuilderExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};

use vhost::vhost_user::message::{
    FrontendReq, VhostUserVirtioFeatures, MAX_ATTACHED_FD_ENTRIES, MAX_MSG_SIZE,
};
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

/// request, flags, size: three native-endian u32.
const HEADER_LEN: usize = 12;
const FLAG_VERSION: u32 = 0x1;
const FLAG_REPLY: u32 = 0x4;
const FLAG_NEED_REPLY: u32 = 0x8;

#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error(
        "cannot create the backend's private socket in {dir}: {source} (set TMPDIR to a \
         writable directory)"
    )]
    Link { dir: PathBuf, source: io::Error },
    #[error("the vhost-user frontend sent a {0}-byte message; at most {MAX_MSG_SIZE} are allowed")]
    TooLong(usize),
    #[error("cannot receive a vhost-user message: {0}")]
    Receive(io::Error),
    #[error("cannot pass a message between the vhost-user frontend and the backend: {0}")]
    Forward(io::Error),
}

impl RelayError {
    /// Whether only this connection failed (a persistent backend can serve the next one).
    pub fn is_connection_error(&self) -> bool {
        !matches!(self, RelayError::Link { .. })
    }
}

/// A listener with one connection waiting, and that connection's other end: the daemon
/// accepts its side from the listener, the relay talks through the stream. (The daemon only
/// accepts from a listener.) The socket file lives for microseconds in a fresh mode-0700
/// directory of the temporary directory, and is gone before the daemon accepts, so nobody
/// else can connect to the daemon.
pub(crate) fn daemon_link() -> Result<(UnixListener, UnixStream), RelayError> {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let base = std::env::temp_dir();
    let link_err = |source| RelayError::Link {
        dir: base.clone(),
        source,
    };
    let mut attempts = 0;
    let dir = loop {
        // Unpredictable, so that nobody can take the name first.
        let random = RandomState::new().hash_one(NEXT.fetch_add(1, Ordering::Relaxed));
        let dir = base.join(format!("mvmm-backend-{random:016x}"));
        match DirBuilder::new().mode(0o700).create(&dir) {
            Ok(()) => break dir,
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists && attempts < 8 => attempts += 1,
            Err(e) => return Err(link_err(e)),
        }
    };
    let path = dir.join("s");
    let link = UnixListener::bind(&path).and_then(|listener| {
        let stream = UnixStream::connect(&path)?;
        Ok((listener, stream))
    });
    let _ = std::fs::remove_file(&path);
    let _ = std::fs::remove_dir(&dir);
    link.map_err(link_err)
}

/// One vhost-user message with the descriptors that came with it.
struct Message {
    header: [u8; HEADER_LEN],
    payload: Vec<u8>,
    fds: Vec<OwnedFd>,
}

impl Message {
    fn field(&self, i: usize) -> u32 {
        let mut b = [0u8; 4];
        b.copy_from_slice(&self.header[4 * i..4 * i + 4]);
        u32::from_ne_bytes(b)
    }

    fn request(&self) -> Option<FrontendReq> {
        FrontendReq::try_from(self.field(0)).ok()
    }

    fn flags(&self) -> u32 {
        self.field(1)
    }

    fn set_flags(&mut self, flags: u32) {
        self.header[4..8].copy_from_slice(&flags.to_ne_bytes());
    }

    /// The payload as a u64 (SET_FEATURES), if it is one.
    fn u64_payload(&self) -> Option<u64> {
        let bytes: [u8; 8] = self.payload.get(..8)?.try_into().ok()?;
        Some(u64::from_ne_bytes(bytes))
    }

    /// The success reply to `self` for a frontend that wants one (REPLY_ACK).
    fn ack(&self) -> Message {
        let mut header = [0u8; HEADER_LEN];
        header[..4].copy_from_slice(&self.header[..4]);
        header[4..8].copy_from_slice(&(FLAG_VERSION | FLAG_REPLY).to_ne_bytes());
        header[8..].copy_from_slice(&8u32.to_ne_bytes());
        Message {
            header,
            payload: 0u64.to_ne_bytes().to_vec(),
            fds: Vec::new(),
        }
    }
}

/// Fills `buf` from `sock`, keeping the descriptors that arrive with the bytes. Returns how
/// many bytes it read: fewer than `buf.len()` only when the peer closed the connection.
fn recv_exact(sock: &UnixStream, buf: &mut [u8], fds: &mut Vec<OwnedFd>) -> io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        let rest = &mut buf[done..];
        let mut iov = [libc::iovec {
            iov_base: rest.as_mut_ptr().cast(),
            iov_len: rest.len(),
        }];
        let mut raw: [RawFd; MAX_ATTACHED_FD_ENTRIES] = [-1; MAX_ATTACHED_FD_ENTRIES];
        // SAFETY: the iovec covers `rest`, which we borrow mutably and which may hold any
        // bytes.
        let got = match unsafe { sock.recv_with_fds(&mut iov, &mut raw) } {
            Ok(got) => got,
            Err(e) if e.errno() == libc::EINTR => continue,
            Err(e) => return Err(io::Error::from_raw_os_error(e.errno())),
        };
        for &fd in &raw[..got.1] {
            // SAFETY: recvmsg just installed this descriptor in our table; nothing else owns
            // it.
            fds.push(unsafe { OwnedFd::from_raw_fd(fd) });
        }
        if got.0 == 0 {
            break;
        }
        done += got.0;
    }
    Ok(done)
}

/// Reads one message. `Ok(None)`: the peer closed the connection (a message cut short by the
/// close counts as closed, as the daemon treats it).
fn recv(sock: &UnixStream) -> Result<Option<Message>, RelayError> {
    let mut msg = Message {
        header: [0; HEADER_LEN],
        payload: Vec::new(),
        fds: Vec::new(),
    };
    let got = recv_exact(sock, &mut msg.header, &mut msg.fds).map_err(RelayError::Receive)?;
    if got < HEADER_LEN {
        return Ok(None);
    }
    let size = msg.field(2) as usize;
    if size > MAX_MSG_SIZE {
        return Err(RelayError::TooLong(size));
    }
    msg.payload = vec![0; size];
    let got = recv_exact(sock, &mut msg.payload, &mut msg.fds).map_err(RelayError::Receive)?;
    Ok((got == size).then_some(msg))
}

fn send(sock: &UnixStream, msg: &Message) -> Result<(), RelayError> {
    let fds: Vec<RawFd> = msg.fds.iter().map(AsRawFd::as_raw_fd).collect();
    let parts: [&[u8]; 2] = [&msg.header, &msg.payload];
    let total = HEADER_LEN + msg.payload.len();
    let sent = loop {
        match sock.send_with_fds(&parts, &fds) {
            Ok(n) => break n,
            Err(e) if e.errno() == libc::EINTR => continue,
            Err(e) => return Err(RelayError::Forward(io::Error::from_raw_os_error(e.errno()))),
        }
    };
    if sent < total {
        // The descriptors went with the first bytes; the rest is only bytes.
        let rest: Vec<u8> = msg
            .header
            .iter()
            .chain(&msg.payload)
            .skip(sent)
            .copied()
            .collect();
        (&*sock).write_all(&rest).map_err(RelayError::Forward)?;
    }
    Ok(())
}

/// What the relay changes in the frontend's message stream.
#[derive(Default)]
struct Quirks {
    /// SET_FEATURES has been passed on (since the last reset).
    features_set: bool,
    /// SET_VRING_ENABLE messages that came before SET_FEATURES.
    early_enables: Vec<Message>,
}

impl Quirks {
    /// Passes one frontend message on to the daemon, or holds it back.
    fn forward(
        &mut self,
        mut msg: Message,
        frontend: &UnixStream,
        daemon: &UnixStream,
    ) -> Result<(), RelayError> {
        match msg.request() {
            Some(FrontendReq::SET_VRING_ENABLE) if !self.features_set => {
                if msg.flags() & FLAG_NEED_REPLY != 0 {
                    send(frontend, &msg.ack())?;
                    msg.set_flags(msg.flags() & !FLAG_NEED_REPLY);
                }
                log::debug!(
                    "vhost-user: SET_VRING_ENABLE before SET_FEATURES; applying it after them"
                );
                self.early_enables.push(msg);
                Ok(())
            }
            Some(FrontendReq::SET_FEATURES) => {
                let protocol = msg.u64_payload().unwrap_or(0)
                    & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
                    != 0;
                send(daemon, &msg)?;
                self.features_set = true;
                // Without protocol features the daemon enables every ring by itself.
                for early in std::mem::take(&mut self.early_enables) {
                    if protocol {
                        send(daemon, &early)?;
                    }
                }
                Ok(())
            }
            Some(FrontendReq::RESET_OWNER | FrontendReq::RESET_DEVICE) => {
                // The daemon forgets the acked features: enables wait for the next ones.
                self.features_set = false;
                send(daemon, &msg)
            }
            _ => send(daemon, &msg),
        }
    }
}

/// Which of the two sockets has something to read (or has hung up).
fn wait_readable(a: &UnixStream, b: &UnixStream) -> io::Result<(bool, bool)> {
    let mut fds = [a, b].map(|s| libc::pollfd {
        fd: s.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    });
    loop {
        // SAFETY: `fds` is an array of two initialised pollfd entries that we own.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
        if n >= 0 {
            return Ok((fds[0].revents != 0, fds[1].revents != 0));
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Relays between the frontend and the daemon until either closes its side; then closes the
/// other's, so that the daemon (or the frontend) sees the disconnect. `Ok` when one of them
/// closed; the daemon's own result tells whether it did so because of an error.
pub(crate) fn run(frontend: UnixStream, daemon: UnixStream) -> Result<(), RelayError> {
    let mut quirks = Quirks::default();
    let result = loop {
        let (from_frontend, from_daemon) = match wait_readable(&frontend, &daemon) {
            Ok(ready) => ready,
            Err(e) => break Err(RelayError::Forward(e)),
        };
        // Replies first: the frontend waits for them.
        if from_daemon {
            match recv(&daemon) {
                Ok(Some(reply)) => {
                    if let Err(e) = send(&frontend, &reply) {
                        break Err(e);
                    }
                }
                Ok(None) => break Ok(()),
                Err(e) => break Err(e),
            }
        }
        if from_frontend {
            match recv(&frontend) {
                Ok(Some(msg)) => {
                    if let Err(e) = quirks.forward(msg, &frontend, &daemon) {
                        break Err(e);
                    }
                }
                Ok(None) => break Ok(()),
                Err(e) => break Err(e),
            }
        }
    };
    let _ = daemon.shutdown(Shutdown::Both);
    let _ = frontend.shutdown(Shutdown::Both);
    result
}

#[cfg(test)]
mod tests {
    use std::io::Read;
    use std::os::fd::IntoRawFd;
    use std::thread;

    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

    use super::*;

    fn message(request: FrontendReq, flags: u32, payload: &[u8], fds: Vec<OwnedFd>) -> Message {
        let mut header = [0u8; HEADER_LEN];
        header[..4].copy_from_slice(&(request as u32).to_ne_bytes());
        header[4..8].copy_from_slice(&flags.to_ne_bytes());
        header[8..].copy_from_slice(&(payload.len() as u32).to_ne_bytes());
        Message {
            header,
            payload: payload.to_vec(),
            fds,
        }
    }

    fn enable(index: u32, flags: u32) -> Message {
        let mut payload = index.to_ne_bytes().to_vec();
        payload.extend(1u32.to_ne_bytes());
        message(FrontendReq::SET_VRING_ENABLE, flags, &payload, Vec::new())
    }

    /// A relay on a thread, with the test as both the frontend and the daemon.
    fn relay() -> (
        UnixStream,
        UnixStream,
        thread::JoinHandle<Result<(), RelayError>>,
    ) {
        let (frontend, relay_front) = UnixStream::pair().unwrap();
        let (listener, relay_daemon) = daemon_link().unwrap();
        let (daemon, _) = listener.accept().unwrap();
        let thread = thread::spawn(move || run(relay_front, relay_daemon));
        (frontend, daemon, thread)
    }

    fn read_msg(sock: &UnixStream) -> Message {
        sock.set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .unwrap();
        recv(sock).unwrap().expect("a message")
    }

    #[test]
    fn messages_and_descriptors_pass_both_ways_unchanged() {
        let (frontend, daemon, thread) = relay();
        let call = EventFd::new(EFD_NONBLOCK).unwrap();
        let raw = call.try_clone().unwrap().into_raw_fd();
        // SAFETY: the clone's descriptor, released by into_raw_fd: ours alone.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let payload = 3u64.to_ne_bytes();
        send(
            &frontend,
            &message(
                FrontendReq::SET_VRING_CALL,
                FLAG_VERSION,
                &payload,
                vec![fd],
            ),
        )
        .unwrap();
        let got = read_msg(&daemon);
        assert_eq!(got.request(), Some(FrontendReq::SET_VRING_CALL));
        assert_eq!(got.payload, payload);
        assert_eq!(got.fds.len(), 1);
        // The daemon's descriptor is the same eventfd.
        std::fs::File::from(got.fds.into_iter().next().unwrap())
            .write_all(&1u64.to_ne_bytes())
            .unwrap();
        assert_eq!(call.read().unwrap(), 1);

        // A reply with a payload beyond one read, back to the frontend.
        let big = vec![0xa5; MAX_MSG_SIZE];
        send(
            &daemon,
            &message(
                FrontendReq::GET_CONFIG,
                FLAG_VERSION | FLAG_REPLY,
                &big,
                vec![],
            ),
        )
        .unwrap();
        let reply = read_msg(&frontend);
        assert_eq!(reply.payload, big);
        assert_eq!(reply.flags(), FLAG_VERSION | FLAG_REPLY);

        // The frontend leaves: the daemon sees the end of its connection.
        drop(frontend);
        let mut rest = Vec::new();
        (&daemon).read_to_end(&mut rest).unwrap();
        assert!(rest.is_empty());
        assert!(thread.join().unwrap().is_ok());
    }

    #[test]
    fn an_early_vring_enable_is_applied_after_set_features() {
        let (frontend, daemon, thread) = relay();
        send(&frontend, &enable(0, FLAG_VERSION)).unwrap();
        // Asked for a reply: the relay acks it itself.
        send(&frontend, &enable(1, FLAG_VERSION | FLAG_NEED_REPLY)).unwrap();
        let ack = read_msg(&frontend);
        assert_eq!(ack.request(), Some(FrontendReq::SET_VRING_ENABLE));
        assert_eq!(ack.flags(), FLAG_VERSION | FLAG_REPLY);
        assert_eq!(ack.u64_payload(), Some(0));

        let features = VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() | 1;
        send(
            &frontend,
            &message(
                FrontendReq::SET_FEATURES,
                FLAG_VERSION,
                &features.to_ne_bytes(),
                vec![],
            ),
        )
        .unwrap();
        let got = read_msg(&daemon);
        assert_eq!(got.request(), Some(FrontendReq::SET_FEATURES));
        assert_eq!(got.u64_payload(), Some(features));
        for index in [0u32, 1] {
            let got = read_msg(&daemon);
            assert_eq!(got.request(), Some(FrontendReq::SET_VRING_ENABLE));
            assert_eq!(got.payload[..4], index.to_ne_bytes());
            // Already acked: the daemon must not answer it again.
            assert_eq!(got.flags(), FLAG_VERSION);
        }
        // Later enables pass straight through.
        send(&frontend, &enable(0, FLAG_VERSION)).unwrap();
        assert_eq!(
            read_msg(&daemon).request(),
            Some(FrontendReq::SET_VRING_ENABLE)
        );
        // The daemon leaves: the frontend sees the end of its connection.
        drop(daemon);
        let mut rest = Vec::new();
        (&frontend).read_to_end(&mut rest).unwrap();
        assert!(rest.is_empty());
        assert!(thread.join().unwrap().is_ok());
    }

    #[test]
    fn oversized_messages_end_the_connection() {
        let (frontend, _daemon, thread) = relay();
        let mut header = [0u8; HEADER_LEN];
        header[..4].copy_from_slice(&(FrontendReq::SET_CONFIG as u32).to_ne_bytes());
        header[4..8].copy_from_slice(&FLAG_VERSION.to_ne_bytes());
        header[8..].copy_from_slice(&(MAX_MSG_SIZE as u32 + 1).to_ne_bytes());
        (&frontend).write_all(&header).unwrap();
        let err = thread.join().unwrap().unwrap_err();
        assert!(matches!(err, RelayError::TooLong(_)), "{err}");
        assert!(err.is_connection_error());
    }
}
