//! When the VM counts as running (for READY=1 and the `booted` link): mvmm's control socket
//! says so.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

/// The one switch: ask mvmm's control socket (the agreed interface), or, for an mvmm without
/// one, take "still alive 200 ms after start" as running.
const READY_FROM_API_SOCKET: bool = true;
const ALIVE_FOR: Duration = Duration::from_millis(200);
/// A status request is answered from mvmm's event loop at once; more means it is busy.
const REPLY_TIMEOUT: Duration = Duration::from_secs(1);

pub fn vm_running(api_socket: &Path, since_start: Duration) -> bool {
    if READY_FROM_API_SOCKET {
        status_says_running(api_socket)
    } else {
        since_start >= ALIVE_FOR
    }
}

/// Sends `{"cmd":"status"}` and checks the reply's `"state"`; any failure is "not yet".
fn status_says_running(api_socket: &Path) -> bool {
    let Ok(mut stream) = UnixStream::connect(api_socket) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(REPLY_TIMEOUT));
    let _ = stream.set_write_timeout(Some(REPLY_TIMEOUT));
    if stream.write_all(b"{\"cmd\":\"status\"}\n").is_err() {
        return false;
    }
    let mut line = String::new();
    if BufReader::new(stream).read_line(&mut line).is_err() {
        return false;
    }
    reply_says_running(&line)
}

fn reply_says_running(line: &str) -> bool {
    let Ok(reply) = serde_json::from_str::<serde_json::Value>(line) else {
        return false;
    };
    reply["ok"] == true && reply["state"] == "running"
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_running_state_counts() {
        assert!(reply_says_running(
            r#"{"ok":true,"state":"running","uptime_ms":5,"vcpus":1,"devices":[]}"#
        ));
        assert!(!reply_says_running(r#"{"ok":true,"state":"paused"}"#));
        assert!(!reply_says_running(r#"{"ok":false,"error":"x"}"#));
        assert!(!reply_says_running("garbage"));
    }

    #[test]
    fn asks_the_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("api.sock");
        assert!(!status_says_running(&path), "no socket yet");
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let server = std::thread::spawn(move || {
            let (stream, _) = listener.accept().unwrap();
            let mut reader = BufReader::new(stream);
            let mut request = String::new();
            reader.read_line(&mut request).unwrap();
            let mut stream = reader.into_inner();
            stream
                .write_all(b"{\"ok\":true,\"state\":\"running\"}\n")
                .unwrap();
            request
        });
        assert!(status_says_running(&path));
        assert_eq!(server.join().unwrap(), "{\"cmd\":\"status\"}\n");
    }
}
