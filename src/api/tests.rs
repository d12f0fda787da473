//! The control socket server against real sockets and a real event loop, with a stand-in VM.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};
use serde_json::Value;

use super::*;

/// Records what it was asked; pause fails while "shutting down", as the real VM does.
#[derive(Default)]
struct FakeVm {
    state: Mutex<Option<VmState>>,
    calls: Mutex<Vec<&'static str>>,
}

impl VmControl for FakeVm {
    fn state(&self) -> VmState {
        self.state.lock().unwrap().unwrap_or(VmState::Running)
    }
    fn shutdown(&self) -> Result<(), String> {
        self.calls.lock().unwrap().push("shutdown");
        *self.state.lock().unwrap() = Some(VmState::ShuttingDown);
        Ok(())
    }
    fn pause(&self) -> Result<(), String> {
        self.calls.lock().unwrap().push("pause");
        if self.state() == VmState::ShuttingDown {
            return Err("the VM is shutting down".into());
        }
        *self.state.lock().unwrap() = Some(VmState::Paused);
        Ok(())
    }
    fn resume(&self) -> Result<(), String> {
        self.calls.lock().unwrap().push("resume");
        *self.state.lock().unwrap() = Some(VmState::Running);
        Ok(())
    }
}

type Subscriber = Arc<Mutex<dyn MutEventSubscriber + Send>>;

struct Harness {
    events: EventManager<Subscriber>,
    vm: Arc<FakeVm>,
    _dir: tempfile::TempDir,
    path: std::path::PathBuf,
}

impl Harness {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("api.sock");
        let vm = Arc::new(FakeVm::default());
        let counters = Arc::new(devices::virtio::block::BlockCounters::default());
        counters
            .writes
            .fetch_add(7, std::sync::atomic::Ordering::Relaxed);
        let info = StatusInfo {
            started: Instant::now(),
            vcpus: 2,
            devices: vec![DeviceReport {
                id: "disks[0]".into(),
                source: DeviceSource::Block(counters),
            }],
        };
        let server = ApiServer::bind(&path, vm.clone(), info).unwrap();
        let mut events: EventManager<Subscriber> = EventManager::new().unwrap();
        events.add_subscriber(Arc::new(Mutex::new(server)));
        Self {
            events,
            vm,
            _dir: dir,
            path,
        }
    }

    fn connect(&self) -> UnixStream {
        let stream = UnixStream::connect(&self.path).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_millis(20)))
            .unwrap();
        stream
    }

    /// Runs the event loop until `reader` has a line (or the peer closed: None).
    fn reply(&mut self, reader: &mut BufReader<UnixStream>) -> Option<Value> {
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut line = String::new();
        loop {
            self.events.run_with_timeout(10).unwrap();
            match reader.read_line(&mut line) {
                Ok(0) => return None,
                Ok(_) if line.ends_with('\n') => return Some(serde_json::from_str(&line).unwrap()),
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => panic!("{e}"),
            }
            assert!(Instant::now() < deadline, "no reply; partial {line:?}");
        }
    }
}

#[test]
fn several_requests_on_one_connection_in_order() {
    let mut h = Harness::new();
    let mut stream = h.connect();
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    // Three requests in one write, the third split over two writes, and a blank line.
    stream
        .write_all(b"{\"cmd\":\"status\"}\n\r\n{\"cmd\":\"pause\"}\n{\"cmd\":")
        .unwrap();
    let status = h.reply(&mut reader).unwrap();
    assert_eq!(status["ok"], true);
    assert_eq!(status["state"], "running");
    assert_eq!(status["vcpus"], 2);
    assert!(status["uptime_ms"].as_u64().is_some());
    assert_eq!(status["devices"][0]["id"], "disks[0]");
    assert_eq!(status["devices"][0]["writes"], 7);
    assert_eq!(h.reply(&mut reader).unwrap()["state"], "paused");
    stream.write_all(b"\"resume\"}\n").unwrap();
    assert_eq!(h.reply(&mut reader).unwrap()["state"], "running");

    // A bad request gets an error and the connection stays usable.
    stream.write_all(b"{\"cmd\":\"reboot\"}\n").unwrap();
    let err = h.reply(&mut reader).unwrap();
    assert_eq!(err["ok"], false);
    assert!(err["error"].as_str().unwrap().contains("unknown command"));
    stream
        .write_all(b"{\"cmd\":\"shutdown\"}\n{\"cmd\":\"pause\"}\n")
        .unwrap();
    assert_eq!(h.reply(&mut reader).unwrap()["state"], "shutting_down");
    let err = h.reply(&mut reader).unwrap();
    assert_eq!(
        err,
        serde_json::json!({"ok": false, "error": "the VM is shutting down"})
    );
    assert_eq!(
        *h.vm.calls.lock().unwrap(),
        ["pause", "resume", "shutdown", "pause"]
    );
}

#[test]
fn last_request_without_newline_is_answered_at_end_of_input() {
    let mut h = Harness::new();
    let mut stream = h.connect();
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    stream.write_all(b"{\"cmd\":\"status\"}").unwrap();
    stream.shutdown(std::net::Shutdown::Write).unwrap();
    assert_eq!(h.reply(&mut reader).unwrap()["ok"], true);
    assert!(h.reply(&mut reader).is_none(), "closed after the reply");
}

#[test]
fn overlong_requests_and_extra_clients_are_refused() {
    let mut h = Harness::new();
    let mut stream = h.connect();
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    stream
        .write_all(&vec![b'x'; server::MAX_REQUEST_LEN + 1])
        .unwrap();
    let err = h.reply(&mut reader).unwrap();
    assert!(
        err["error"].as_str().unwrap().contains("longer than"),
        "{err}"
    );
    assert!(h.reply(&mut reader).is_none(), "closed after the error");

    let clients: Vec<UnixStream> = (0..server::MAX_CLIENTS).map(|_| h.connect()).collect();
    let extra = h.connect();
    let mut reader = BufReader::new(extra);
    let err = h.reply(&mut reader).unwrap();
    assert!(
        err["error"]
            .as_str()
            .unwrap()
            .contains("clients are connected"),
        "{err}"
    );
    assert!(h.reply(&mut reader).is_none());
    // The others still work.
    let mut first = clients[0].try_clone().unwrap();
    first.write_all(b"{\"cmd\":\"status\"}\n").unwrap();
    assert_eq!(h.reply(&mut BufReader::new(first)).unwrap()["ok"], true);
}

#[test]
fn bind_replaces_a_stale_socket_refuses_other_files_and_drop_removes_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("api.sock");
    let info = || StatusInfo {
        started: Instant::now(),
        vcpus: 1,
        devices: Vec::new(),
    };
    let vm: Arc<dyn VmControl> = Arc::new(FakeVm::default());
    // A socket file left by a process that died.
    drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
    assert!(path.exists());
    let server = ApiServer::bind(&path, vm.clone(), info()).unwrap();
    assert!(UnixStream::connect(&path).is_ok());
    drop(server);
    assert!(!path.exists(), "the socket is removed when the server goes");

    let file = dir.path().join("precious.txt");
    std::fs::write(&file, "data").unwrap();
    let err = ApiServer::bind(&file, vm.clone(), info())
        .map(|_| ())
        .unwrap_err();
    assert!(matches!(err, ApiError::NotASocket { .. }), "{err}");
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "data");
    let err = ApiServer::bind(Path::new("/nonexistent/dir/api.sock"), vm, info())
        .map(|_| ())
        .unwrap_err();
    assert!(
        err.to_string().contains("/nonexistent/dir/api.sock"),
        "{err}"
    );
}

#[test]
fn a_client_that_never_reads_its_replies_is_dropped() {
    let mut h = Harness::new();
    let stream = h.connect();
    let mut writer = stream.try_clone().unwrap();
    // Enough requests for far more than the 1 MiB of replies the server keeps for a client.
    let sender = std::thread::spawn(move || {
        let requests = "{\"cmd\":\"status\"}\n".repeat(1000);
        for _ in 0..100 {
            if writer.write_all(requests.as_bytes()).is_err() {
                return true; // The server closed the connection.
            }
        }
        false
    });
    let deadline = Instant::now() + Duration::from_secs(20);
    while !sender.is_finished() {
        h.events.run_with_timeout(10).unwrap();
        assert!(Instant::now() < deadline, "the server kept buffering");
    }
    assert!(sender.join().unwrap(), "the client was never cut off");
    // The server is still there for others.
    let mut other = h.connect();
    other.write_all(b"{\"cmd\":\"status\"}\n").unwrap();
    assert_eq!(h.reply(&mut BufReader::new(other)).unwrap()["ok"], true);
}
