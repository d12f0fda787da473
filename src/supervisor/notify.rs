//! sd_notify: readiness and stop notifications to the service manager, written by hand (one
//! datagram to $NOTIFY_SOCKET; a leading '@' means the abstract namespace).

use std::io;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};

/// The socket systemd (or a test) listens on, if any.
pub struct Notifier {
    target: Option<String>,
}

impl Notifier {
    /// Reads NOTIFY_SOCKET; without it every notification is a no-op.
    pub fn from_env() -> Self {
        let target = std::env::var("NOTIFY_SOCKET")
            .ok()
            .filter(|s| !s.is_empty());
        Self { target }
    }

    /// Sends `state` (e.g. "READY=1"); failures are logged, never fatal: the VM runs anyway.
    pub fn notify(&self, state: &str) {
        let Some(target) = &self.target else {
            return;
        };
        if let Err(e) = send(target, state) {
            log::warn!("cannot send {state:?} to NOTIFY_SOCKET {target}: {e}");
        } else {
            log::debug!("sd_notify {state}");
        }
    }
}

fn send(target: &str, state: &str) -> io::Result<()> {
    let socket = UnixDatagram::unbound()?;
    let addr = match target.strip_prefix('@') {
        Some(name) => SocketAddr::from_abstract_name(name.as_bytes())?,
        None => SocketAddr::from_pathname(target)?,
    };
    socket.send_to_addr(state.as_bytes(), &addr)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn receive(listener: &UnixDatagram) -> String {
        listener
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let mut buf = [0u8; 256];
        let n = listener.recv(&mut buf).unwrap();
        String::from_utf8_lossy(&buf[..n]).into_owned()
    }

    #[test]
    fn sends_to_a_path_and_to_an_abstract_name() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify.sock");
        let listener = UnixDatagram::bind(&path).unwrap();
        let notifier = Notifier {
            target: Some(path.to_str().unwrap().to_owned()),
        };
        notifier.notify("READY=1");
        assert_eq!(receive(&listener), "READY=1");

        let name = format!("mvmm-notify-test-{}", std::process::id());
        let addr = SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let listener = UnixDatagram::bind_addr(&addr).unwrap();
        let notifier = Notifier {
            target: Some(format!("@{name}")),
        };
        notifier.notify("STOPPING=1");
        assert_eq!(receive(&listener), "STOPPING=1");
    }

    #[test]
    fn without_a_socket_nothing_is_sent() {
        // Nothing to observe but that it returns: no socket, no error, no panic.
        Notifier { target: None }.notify("READY=1");
        let missing = Notifier {
            target: Some("/nonexistent/notify.sock".to_owned()),
        };
        assert!(send("/nonexistent/notify.sock", "READY=1").is_err());
        missing.notify("READY=1");
    }
}
