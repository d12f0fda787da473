//! The control socket's protocol: one JSON object per line each way.
//!
//! Requests: `{"cmd":"status"}`, `{"cmd":"shutdown"}`, `{"cmd":"pause"}`, `{"cmd":"resume"}`.
//! Replies: `{"ok":true, ...}` or `{"ok":false,"error":"<message>"}`.

use serde::Deserialize;
use serde_json::{json, Map, Value};

/// What the VM is doing, as `status` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VmState {
    Running,
    Paused,
    /// The power button was pressed; the VM ends when the guest powers off or the grace
    /// period runs out.
    ShuttingDown,
}

impl VmState {
    pub fn as_str(self) -> &'static str {
        match self {
            VmState::Running => "running",
            VmState::Paused => "paused",
            VmState::ShuttingDown => "shutting_down",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request {
    Status,
    Shutdown,
    Pause,
    Resume,
}

impl Request {
    pub const NAMES: [&'static str; 4] = ["status", "shutdown", "pause", "resume"];

    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "status" => Some(Request::Status),
            "shutdown" => Some(Request::Shutdown),
            "pause" => Some(Request::Pause),
            "resume" => Some(Request::Resume),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Request::Status => "status",
            Request::Shutdown => "shutdown",
            Request::Pause => "pause",
            Request::Resume => "resume",
        }
    }

    /// The request line a client sends (without the newline).
    pub fn to_line(self) -> String {
        json!({ "cmd": self.name() }).to_string()
    }

    /// Parses one request line; the error is the message to send back.
    pub fn parse(line: &[u8]) -> Result<Self, String> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Raw {
            cmd: String,
        }
        let usage = format!(
            "send one JSON object per line, e.g. {{\"cmd\":\"status\"}}; commands: {}",
            Self::NAMES.join(", ")
        );
        let raw: Raw =
            serde_json::from_slice(line).map_err(|e| format!("bad request ({e}); {usage}"))?;
        Self::from_name(&raw.cmd).ok_or_else(|| format!("unknown command {:?}; {usage}", raw.cmd))
    }
}

/// `{"ok":true}` plus `fields` (an object), as one line.
pub fn ok_line(fields: Value) -> String {
    let mut reply = Map::new();
    reply.insert("ok".into(), Value::Bool(true));
    if let Value::Object(fields) = fields {
        reply.extend(fields);
    }
    let mut line = Value::Object(reply).to_string();
    line.push('\n');
    line
}

/// `{"ok":false,"error":message}`, as one line.
pub fn error_line(message: &str) -> String {
    let mut line = json!({ "ok": false, "error": message }).to_string();
    line.push('\n');
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_command_and_round_trips() {
        for name in Request::NAMES {
            let req = Request::from_name(name).unwrap();
            assert_eq!(req.name(), name);
            assert_eq!(Request::parse(req.to_line().as_bytes()), Ok(req));
        }
        assert_eq!(
            Request::parse(br#" { "cmd" : "pause" } "#),
            Ok(Request::Pause)
        );
    }

    #[test]
    fn bad_requests_explain_the_protocol() {
        for (line, expect) in [
            (&b"status"[..], "bad request"),
            (br#"{"cmd":"reboot"}"#, "unknown command \"reboot\""),
            (br#"{"cmd":"status","x":1}"#, "unknown field `x`"),
            (br#"{"command":"status"}"#, "bad request"),
            (br#"{"cmd":5}"#, "bad request"),
            (b"\xff\xfe", "bad request"),
        ] {
            let err = Request::parse(line).unwrap_err();
            assert!(err.contains(expect), "{err}");
            assert!(err.contains("status, shutdown, pause, resume"), "{err}");
        }
    }

    #[test]
    fn replies_are_single_json_lines() {
        let ok = ok_line(json!({"state": "running", "vcpus": 2}));
        assert!(ok.ends_with('\n') && !ok.trim_end().contains('\n'));
        let v: Value = serde_json::from_str(&ok).unwrap();
        assert_eq!(v, json!({"ok": true, "state": "running", "vcpus": 2}));
        assert_eq!(
            serde_json::from_str::<Value>(&ok_line(Value::Null)).unwrap(),
            json!({"ok": true})
        );
        let err = error_line("multi\nline \"quoted\"");
        assert!(!err.trim_end().contains('\n'));
        let v: Value = serde_json::from_str(&err).unwrap();
        assert_eq!(v, json!({"ok": false, "error": "multi\nline \"quoted\""}));
    }
}
