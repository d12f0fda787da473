//! The thread that watches a running device's backend connection, and brings the backend
//! back up to date when it restarts.
//!
//! The data path never passes here: the backend waits on the queues' ioeventfds and signals
//! the guest's irqfd itself. This thread sleeps in poll(2) on the socket until the backend
//! hangs up; then it marks the device as needing a reset, tries the socket every
//! [`RETRY_INTERVAL`], and on success redoes the handshake and replays the activation, each
//! queue starting at the used index the dead backend last wrote, so requests it had taken but
//! not completed are served again. Other devices are not affected.

use std::io;
use std::net::Shutdown;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use vmm_sys_util::eventfd::EventFd;

use super::active::Active;
use super::connection::{is_absent, poll, pollfd, Connection};
use super::Error;
use crate::threads::{self, ThreadRole};

/// How often to look for the socket of a backend that went away.
pub(super) const RETRY_INTERVAL: Duration = Duration::from_millis(100);
/// The longest pause after a backend that came back failed the replay.
const MAX_BACKOFF: Duration = Duration::from_secs(2);

/// What the thread shares with the device.
#[derive(Clone)]
pub(super) struct Context {
    pub path: PathBuf,
    pub label: String,
    /// Set when the backend dies; cleared when the driver resets the device.
    pub needs_reset: Arc<AtomicBool>,
    /// Whether a backend currently serves the queues.
    pub connected: Arc<AtomicBool>,
    /// The socket of a backend being brought up to date, to unblock the thread when the
    /// device stops meanwhile (the frontend library waits for replies forever).
    pub talking: Arc<Mutex<Option<UnixStream>>>,
}

/// A running device: its connection (none while the backend is away) and its queues.
pub(super) struct Session {
    pub conn: Option<Connection>,
    pub active: Active,
}

pub(super) struct Watcher {
    stop: EventFd,
    talking: Arc<Mutex<Option<UnixStream>>>,
    thread: JoinHandle<Session>,
}

impl Watcher {
    pub fn spawn(ctx: Context, session: Session) -> io::Result<Watcher> {
        let stop = EventFd::new(libc::EFD_NONBLOCK)?;
        let stop_rx = stop.try_clone()?;
        let talking = ctx.talking.clone();
        let name = format!("vhu-{}", ctx.label);
        let thread = threads::spawn(ThreadRole::VhostUserWatcher, name, move || {
            run(&ctx, session, &stop_rx)
        })?;
        Ok(Watcher {
            stop,
            talking,
            thread,
        })
    }

    /// Stops the thread and takes the session back (none if the thread panicked).
    pub fn stop(self) -> Option<Session> {
        if let Err(e) = self.stop.write(1) {
            log::error!("vhost-user: cannot stop a watcher thread: {e}");
        }
        // A reconnection in progress is abandoned: the next activation connects again.
        if let Some(sock) = lock(&self.talking).take() {
            let _ = sock.shutdown(Shutdown::Both);
        }
        self.thread.join().ok()
    }
}

fn run(ctx: &Context, mut session: Session, stop: &EventFd) -> Session {
    ctx.connected
        .store(session.conn.is_some(), Ordering::SeqCst);
    loop {
        let Some(conn) = &session.conn else {
            match reconnect(ctx, &session.active, stop) {
                Some(conn) => {
                    session.conn = Some(conn);
                    ctx.connected.store(true, Ordering::SeqCst);
                    continue;
                }
                None => return session,
            }
        };
        let mut fds = [
            pollfd(conn.fd(), libc::POLLRDHUP),
            pollfd(stop.as_raw_fd(), libc::POLLIN),
        ];
        if let Err(e) = poll(&mut fds, -1) {
            log::error!("vhost-user {}: cannot watch the backend: {e}", ctx.label);
            return session;
        }
        if fds[1].revents != 0 {
            return session;
        }
        if fds[0].revents != 0 {
            backend_died(ctx, &mut session);
        }
    }
}

fn backend_died(ctx: &Context, session: &mut Session) {
    log::warn!(
        "vhost-user {}: the backend at {} went away; the device needs a reset, waiting for the backend to come back",
        ctx.label,
        ctx.path.display()
    );
    session.conn = None;
    ctx.connected.store(false, Ordering::SeqCst);
    ctx.needs_reset.store(true, Ordering::SeqCst);
    if let Err(e) = session.active.interrupt.signal_needs_reset() {
        log::error!(
            "vhost-user {}: cannot raise the config-change interrupt: {e}",
            ctx.label
        );
    }
}

/// Waits for a backend to listen on the socket again and brings it up to date. None when the
/// device is stopped first.
fn reconnect(ctx: &Context, active: &Active, stop: &EventFd) -> Option<Connection> {
    let mut delay = RETRY_INTERVAL;
    let mut last_error = String::new();
    loop {
        if stopped(stop, delay) {
            return None;
        }
        let result = match UnixStream::connect(&ctx.path) {
            Ok(stream) => {
                *lock(&ctx.talking) = stream.try_clone().ok();
                let result = restore(ctx, active, stream);
                lock(&ctx.talking).take();
                result
            }
            Err(e) if is_absent(&e) => {
                delay = RETRY_INTERVAL;
                continue;
            }
            Err(source) => Err(Error::Connect {
                path: ctx.path.clone(),
                source,
            }),
        };
        match result {
            Ok(conn) => {
                log::info!(
                    "vhost-user {}: reconnected to the backend at {}",
                    ctx.label,
                    ctx.path.display()
                );
                // Buffers the driver added while the backend was away, and the ones the dead
                // backend had taken, wait behind a kick the new backend never saw.
                active.kick_all();
                return Some(conn);
            }
            Err(e) => {
                let message = e.to_string();
                if message != last_error {
                    log::warn!("vhost-user {}: reconnecting failed: {message}", ctx.label);
                    last_error = message;
                }
                delay = (delay * 2).min(MAX_BACKOFF);
            }
        }
    }
}

/// The handshake, then the activation again, each queue from its used index.
fn restore(ctx: &Context, active: &Active, stream: UnixStream) -> Result<Connection, Error> {
    let mut conn = Connection::handshake(&ctx.path, stream)?;
    let bases = active.used_indexes()?;
    conn.start(active, &bases)?;
    Ok(conn)
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Sleeps up to `timeout`; true if the device asked the thread to stop.
fn stopped(stop: &EventFd, timeout: Duration) -> bool {
    let mut fds = [pollfd(stop.as_raw_fd(), libc::POLLIN)];
    let ms = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
    match poll(&mut fds, ms) {
        Ok(ready) => ready,
        Err(e) => {
            log::error!("vhost-user: cannot wait on the watcher's stop event: {e}");
            true
        }
    }
}
