//! The control socket server: an event-loop subscriber (no thread of its own) that accepts
//! clients on a Unix stream socket and answers their request lines.
//!
//! Sockets are non-blocking. A client may send several requests on one connection; replies go
//! out in order. A client that sends an over-long line, or stops reading its replies while
//! sending more requests, is disconnected, so no client can make the VMM buffer without bound.

use std::collections::HashMap;
use std::fs::File;
use std::io::{ErrorKind, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use event_manager::{EventOps, Events, MutEventSubscriber};
use serde_json::{json, Value};
use vmm_sys_util::epoll::EventSet;

use super::protocol::{error_line, ok_line, Request, VmState};
use super::status::DeviceReport;

/// Longest request line accepted (requests are a few dozen bytes).
pub const MAX_REQUEST_LEN: usize = 4096;
/// Replies a slow client may leave unread before it is dropped.
const MAX_PENDING_OUTPUT: usize = 1 << 20;
/// Clients served at once; more are closed on arrival.
pub const MAX_CLIENTS: usize = 16;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("config field `api_socket`: cannot remove the old socket {}: {source}", path.display())]
    RemoveStale {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config field `api_socket`: {} exists and is not a socket; remove it or choose another path", path.display())]
    NotASocket { path: PathBuf },
    #[error("config field `api_socket`: cannot listen on {}: {source}", path.display())]
    Bind {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// What the control socket can ask of the VM. The event loop's lifecycle implements it.
pub trait VmControl: Send + Sync {
    fn state(&self) -> VmState;
    /// Presses the power button (or stops at once without a grace period).
    fn shutdown(&self) -> Result<(), String>;
    fn pause(&self) -> Result<(), String>;
    fn resume(&self) -> Result<(), String>;
}

/// The fixed facts `status` reports besides the state.
pub struct StatusInfo {
    pub started: Instant,
    pub vcpus: u32,
    pub devices: Vec<DeviceReport>,
}

struct Client {
    /// The connection as a plain file: read(2)/write(2) are what the main thread's seccomp
    /// filter allows (a UnixStream would use recvfrom/sendto).
    stream: File,
    input: Vec<u8>,
    output: Vec<u8>,
    /// Close once the output is flushed (end of input, or a protocol violation).
    closing: bool,
    /// What epoll watches: input until `closing`, output while replies are pending.
    watching: EventSet,
}

pub struct ApiServer {
    listener: UnixListener,
    path: PathBuf,
    clients: HashMap<RawFd, Client>,
    control: Arc<dyn VmControl>,
    info: StatusInfo,
}

impl ApiServer {
    /// Binds `path` (replacing a stale socket file; anything else there is an error).
    pub fn bind(
        path: &Path,
        control: Arc<dyn VmControl>,
        info: StatusInfo,
    ) -> Result<Self, ApiError> {
        match std::fs::symlink_metadata(path) {
            Ok(meta) if meta.file_type().is_socket() => {
                std::fs::remove_file(path).map_err(|source| ApiError::RemoveStale {
                    path: path.to_owned(),
                    source,
                })?
            }
            Ok(_) => {
                return Err(ApiError::NotASocket {
                    path: path.to_owned(),
                })
            }
            Err(_) => {}
        }
        let bind_err = |source| ApiError::Bind {
            path: path.to_owned(),
            source,
        };
        let listener = UnixListener::bind(path).map_err(bind_err)?;
        listener.set_nonblocking(true).map_err(bind_err)?;
        Ok(Self {
            listener,
            path: path.to_owned(),
            clients: HashMap::new(),
            control,
            info,
        })
    }

    fn accept(&mut self, ops: &mut EventOps) {
        loop {
            // SAFETY: accept4 on our listening socket with null address pointers; the result
            // is checked and, when valid, a new descriptor that we own.
            let fd = unsafe {
                libc::accept4(
                    self.listener.as_raw_fd(),
                    std::ptr::null_mut(),
                    std::ptr::null_mut(),
                    libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                )
            };
            if fd < 0 {
                let err = std::io::Error::last_os_error();
                match err.kind() {
                    ErrorKind::WouldBlock => return,
                    ErrorKind::Interrupted | ErrorKind::ConnectionAborted => continue,
                    _ => {
                        log::warn!("api: cannot accept a client: {err}");
                        return;
                    }
                }
            }
            // SAFETY: `fd` is a fresh descriptor from accept4, owned by nobody else.
            let stream = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
            if self.clients.len() >= MAX_CLIENTS {
                let msg = format!("{MAX_CLIENTS} clients are connected already; try again later");
                let _ = (&stream).write(error_line(&msg).as_bytes());
                log::warn!("api: {msg}");
                continue;
            }
            if let Err(e) = ops.add(Events::new(&stream, EventSet::IN)) {
                log::warn!("api: cannot watch a client: {e:?}");
                continue;
            }
            self.clients.insert(
                fd,
                Client {
                    stream,
                    input: Vec::new(),
                    output: Vec::new(),
                    closing: false,
                    watching: EventSet::IN,
                },
            );
        }
    }

    /// Reads what the client sent and answers every complete line.
    fn serve(&mut self, fd: RawFd, events: EventSet, ops: &mut EventOps) {
        let Some(mut client) = self.clients.remove(&fd) else {
            return;
        };
        if events.contains(EventSet::ERROR) {
            client.closing = true;
            client.output.clear();
        } else if !client.closing && events.intersects(EventSet::IN | EventSet::HANG_UP) {
            self.read_requests(&mut client);
        }
        let flushed = flush(&mut client);
        let done = client.closing && client.output.is_empty();
        if !flushed || done || client.output.len() > MAX_PENDING_OUTPUT {
            let _ = ops.remove(Events::empty(&client.stream));
            return; // Dropping the client closes it.
        }
        // A closing client's input is at its end (always readable): watch only for output.
        let mut want = if client.closing {
            EventSet::empty()
        } else {
            EventSet::IN
        };
        if !client.output.is_empty() {
            want |= EventSet::OUT;
        }
        if want != client.watching {
            if ops.modify(Events::new(&client.stream, want)).is_err() {
                let _ = ops.remove(Events::empty(&client.stream));
                return;
            }
            client.watching = want;
        }
        self.clients.insert(fd, client);
    }

    fn read_requests(&self, client: &mut Client) {
        let mut buf = [0u8; 1024];
        loop {
            match client.stream.read(&mut buf) {
                Ok(0) => {
                    // End of input: a last request without its newline still counts.
                    if !client.input.is_empty() {
                        let line = std::mem::take(&mut client.input);
                        self.answer(&line, client);
                    }
                    client.closing = true;
                    return;
                }
                Ok(n) => {
                    client.input.extend_from_slice(&buf[..n]);
                    while let Some(end) = client.input.iter().position(|&b| b == b'\n') {
                        let line: Vec<u8> = client.input.drain(..=end).collect();
                        self.answer(&line[..end], client);
                    }
                    if client.input.len() > MAX_REQUEST_LEN {
                        let msg = format!("request longer than {MAX_REQUEST_LEN} bytes");
                        client.output.extend_from_slice(error_line(&msg).as_bytes());
                        client.input.clear();
                        client.closing = true;
                        return;
                    }
                    if client.closing || client.output.len() > MAX_PENDING_OUTPUT {
                        return;
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(_) => {
                    client.closing = true;
                    client.output.clear();
                    return;
                }
            }
        }
    }

    fn answer(&self, line: &[u8], client: &mut Client) {
        // Blank lines (e.g. "\r\n" keep-alives) get no reply.
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.iter().all(u8::is_ascii_whitespace) {
            return;
        }
        let reply = match Request::parse(line) {
            Ok(request) => {
                log::debug!("api: {}", request.name());
                self.execute(request)
            }
            Err(message) => error_line(&message),
        };
        client.output.extend_from_slice(reply.as_bytes());
    }

    fn execute(&self, request: Request) -> String {
        let done = |result: Result<(), String>| match result {
            Ok(()) => ok_line(json!({ "state": self.control.state().as_str() })),
            Err(message) => error_line(&message),
        };
        match request {
            Request::Status => ok_line(self.status()),
            Request::Shutdown => done(self.control.shutdown()),
            Request::Pause => done(self.control.pause()),
            Request::Resume => done(self.control.resume()),
        }
    }

    fn status(&self) -> Value {
        let uptime_ms = u64::try_from(self.info.started.elapsed().as_millis()).unwrap_or(u64::MAX);
        let devices: Vec<Value> = self.info.devices.iter().map(|d| d.to_json()).collect();
        json!({
            "state": self.control.state().as_str(),
            "uptime_ms": uptime_ms,
            "vcpus": self.info.vcpus,
            "devices": devices,
        })
    }
}

/// Writes as much pending output as the socket takes. False if the client is gone.
fn flush(client: &mut Client) -> bool {
    while !client.output.is_empty() {
        match client.stream.write(&client.output) {
            Ok(0) => return false,
            Ok(n) => {
                client.output.drain(..n);
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => return true,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(_) => return false,
        }
    }
    true
}

impl MutEventSubscriber for ApiServer {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        if events.fd() == self.listener.as_raw_fd() {
            self.accept(ops);
        } else {
            self.serve(events.fd(), events.event_set(), ops);
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.listener, EventSet::IN)) {
            log::error!("api: cannot watch the control socket: {e:?}");
        }
    }
}

impl Drop for ApiServer {
    /// Removes the socket file. Only `unlink`: the main thread's seccomp filter allows no
    /// stat, and nothing else may use this path while we run (the next mvmm on it starts
    /// after we exit, and replaces a stale file anyway).
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}
