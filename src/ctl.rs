//! `mvmm ctl --socket S <status|shutdown|pause|resume>`: one request to a running VM's control
//! socket; prints the reply.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;

use crate::api::Request;
use crate::cli::{CtlArgs, CtlCommand};

/// Longer than any request takes (a pause waits at most 2 s for the vCPUs).
const REPLY_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum CtlError {
    #[error("cannot connect to the control socket {}: {source}; is the VM running with `api_socket` set to this path?", path.display())]
    Connect {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("control socket {}: {what}: {source}", path.display())]
    Io {
        path: PathBuf,
        what: &'static str,
        source: std::io::Error,
    },
    #[error("control socket {}: the VM closed the connection without replying", path.display())]
    NoReply { path: PathBuf },
    #[error("control socket {}: the reply is not JSON ({error}): {reply:?}", path.display())]
    BadReply {
        path: PathBuf,
        reply: String,
        error: serde_json::Error,
    },
}

impl CtlError {
    /// 2 when the socket cannot be reached, 1 when the conversation failed.
    pub fn exit_code(&self) -> i32 {
        match self {
            CtlError::Connect { .. } => crate::EXIT_USAGE,
            _ => crate::EXIT_FAILURE,
        }
    }
}

fn request_for(command: CtlCommand) -> Request {
    match command {
        CtlCommand::Status => Request::Status,
        CtlCommand::Shutdown => Request::Shutdown,
        CtlCommand::Pause => Request::Pause,
        CtlCommand::Resume => Request::Resume,
    }
}

/// Sends one request and returns the reply, parsed.
pub fn exchange(socket: &Path, request: Request) -> Result<Value, CtlError> {
    let io = |what| {
        move |source| CtlError::Io {
            path: socket.to_owned(),
            what,
            source,
        }
    };
    let mut stream = UnixStream::connect(socket).map_err(|source| CtlError::Connect {
        path: socket.to_owned(),
        source,
    })?;
    stream
        .set_read_timeout(Some(REPLY_TIMEOUT))
        .map_err(io("cannot set a timeout"))?;
    let mut line = request.to_line();
    line.push('\n');
    stream
        .write_all(line.as_bytes())
        .map_err(io("cannot send the request"))?;
    let mut reply = String::new();
    let n = BufReader::new(&stream)
        .read_line(&mut reply)
        .map_err(io("no reply"))?;
    if n == 0 {
        return Err(CtlError::NoReply {
            path: socket.to_owned(),
        });
    }
    serde_json::from_str(&reply).map_err(|error| CtlError::BadReply {
        path: socket.to_owned(),
        reply: reply.trim_end().to_owned(),
        error,
    })
}

pub fn run(args: &CtlArgs) -> i32 {
    let request = request_for(args.command);
    let reply = match exchange(&args.socket, request) {
        Ok(reply) => reply,
        Err(e) => {
            log::error!("{e}");
            return e.exit_code();
        }
    };
    let text = if request == Request::Status {
        serde_json::to_string_pretty(&reply)
    } else {
        serde_json::to_string(&reply)
    };
    println!("{}", text.unwrap_or_else(|_| reply.to_string()));
    if reply["ok"] == Value::Bool(true) {
        crate::EXIT_OK
    } else {
        crate::EXIT_FAILURE
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::os::unix::net::UnixListener;

    /// A one-shot server that checks the request line and answers with `reply`.
    fn serve_once(dir: &Path, expect: &'static str, reply: &'static str) -> PathBuf {
        let path = dir.join("ctl.sock");
        let listener = UnixListener::bind(&path).unwrap();
        std::thread::spawn(move || {
            let (mut conn, _) = listener.accept().unwrap();
            let mut buf = [0u8; 256];
            let n = conn.read(&mut buf).unwrap();
            assert_eq!(&buf[..n], format!("{expect}\n").as_bytes());
            conn.write_all(reply.as_bytes()).unwrap();
        });
        path
    }

    #[test]
    fn sends_the_command_and_parses_the_reply() {
        let dir = tempfile::tempdir().unwrap();
        let path = serve_once(
            dir.path(),
            r#"{"cmd":"pause"}"#,
            "{\"ok\":true,\"state\":\"paused\"}\n",
        );
        let reply = exchange(&path, Request::Pause).unwrap();
        assert_eq!(reply["state"], "paused");
    }

    #[test]
    fn failures_say_what_went_wrong() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nothing.sock");
        let err = exchange(&missing, Request::Status).unwrap_err();
        assert_eq!(err.exit_code(), 2);
        assert!(
            err.to_string().contains(&missing.display().to_string()),
            "{err}"
        );

        let path = serve_once(dir.path(), r#"{"cmd":"status"}"#, "not json\n");
        let err = exchange(&path, Request::Status).unwrap_err();
        assert!(matches!(err, CtlError::BadReply { .. }), "{err}");
        assert_eq!(err.exit_code(), 1);
    }
}
