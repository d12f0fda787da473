//! Against the real virtiofsd: the test plays the guest's FUSE driver on the request queue.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::util::{wait_until, MockInterrupt, Ring};
use super::{activate, fs, LONG};
use crate::virtio::vhost_user::VhostUserDevice;
use crate::virtio::VirtioDevice;

const FUSE_LOOKUP: u32 = 1;
const FUSE_INIT: u32 = 26;
const FUSE_ROOT_ID: u64 = 1;
const OUT_HEADER: usize = 16;

fn virtiofsd_binary() -> Option<PathBuf> {
    let mut candidates = vec![PathBuf::from("/root/.cargo/bin/virtiofsd")];
    if let Some(home) = std::env::var_os("CARGO_HOME") {
        candidates.push(Path::new(&home).join("bin/virtiofsd"));
    }
    if let Some(paths) = std::env::var_os("PATH") {
        candidates.extend(std::env::split_paths(&paths).map(|d| d.join("virtiofsd")));
    }
    candidates.into_iter().find(|p| p.is_file())
}

/// A virtiofsd child process, killed when dropped.
struct Virtiofsd(Child);

impl Virtiofsd {
    fn start(bin: &Path, socket: &Path, shared: &Path) -> Virtiofsd {
        let child = Command::new(bin)
            .arg("--socket-path")
            .arg(socket)
            .arg("--shared-dir")
            .arg(shared)
            .args(["--sandbox", "none", "--seccomp", "none", "--cache", "never"])
            .args(["--log-level", "error"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .expect("cannot start virtiofsd");
        Virtiofsd(child)
    }

    fn kill(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }

    /// Waits for virtiofsd to exit by itself (it does when its frontend disconnects).
    fn exited(&mut self, timeout: Duration) -> bool {
        wait_until(timeout, || matches!(self.0.try_wait(), Ok(Some(_))))
    }
}

impl Drop for Virtiofsd {
    fn drop(&mut self) {
        self.kill();
    }
}

fn fuse_request(opcode: u32, unique: u64, nodeid: u64, body: &[u8]) -> Vec<u8> {
    let mut req = Vec::with_capacity(40 + body.len());
    req.extend_from_slice(&((40 + body.len()) as u32).to_le_bytes());
    req.extend_from_slice(&opcode.to_le_bytes());
    req.extend_from_slice(&unique.to_le_bytes());
    req.extend_from_slice(&nodeid.to_le_bytes());
    req.extend_from_slice(&[0u8; 12]); // uid, gid, pid: root
    req.extend_from_slice(&[0u8; 4]); // total_extlen, padding
    req.extend_from_slice(body);
    req
}

fn u32_at(buf: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(buf[at..at + 4].try_into().unwrap())
}

fn u64_at(buf: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(buf[at..at + 8].try_into().unwrap())
}

/// Sends a FUSE request; returns (error, reply body) after checking the out header.
fn exchange(ring: &mut Ring, interrupt: &MockInterrupt, request: &[u8]) -> (i32, Vec<u8>) {
    let unique = u64_at(request, 8);
    let before = ring.used_idx();
    let reply_addr = ring.push(request, 4096);
    ring.kick();
    assert!(interrupt.wait_call(LONG), "virtiofsd did not answer");
    assert_eq!(ring.used_idx(), before.wrapping_add(1));
    let (_, written) = ring.used_elem(before);
    let reply = ring.read(reply_addr, written as usize);
    assert!(reply.len() >= OUT_HEADER, "short reply: {reply:?}");
    assert_eq!(u32_at(&reply, 0) as usize, reply.len(), "out header length");
    assert_eq!(u64_at(&reply, 8), unique);
    let error = u32_at(&reply, 4) as i32;
    (error, reply[OUT_HEADER..].to_vec())
}

/// FUSE_INIT, then LOOKUPs of a file that exists and one that does not.
fn init_and_lookup(ring: &mut Ring, interrupt: &MockInterrupt, unique: u64, file_len: u64) {
    let mut init = Vec::new();
    for v in [7u32, 38, 0, 0] {
        init.extend_from_slice(&v.to_le_bytes()); // major, minor, max_readahead, flags
    }
    let (error, body) = exchange(ring, interrupt, &fuse_request(FUSE_INIT, unique, 0, &init));
    assert_eq!(error, 0, "FUSE_INIT failed");
    assert_eq!(u32_at(&body, 0), 7, "FUSE major version");

    let lookup = fuse_request(FUSE_LOOKUP, unique + 1, FUSE_ROOT_ID, b"hello.txt\0");
    let (error, entry) = exchange(ring, interrupt, &lookup);
    assert_eq!(error, 0, "LOOKUP hello.txt failed");
    // fuse_entry_out: nodeid, generation, entry_valid, attr_valid, 2 x nsec, then fuse_attr
    // (ino, size, blocks, 3 x time, 3 x nsec, mode...).
    assert_ne!(u64_at(&entry, 0), 0, "node id");
    assert_eq!(u64_at(&entry, 48), file_len, "file size");
    let mode = u32_at(&entry, 40 + 60);
    assert_eq!(mode & libc::S_IFMT, libc::S_IFREG, "mode {mode:o}");

    let missing = fuse_request(FUSE_LOOKUP, unique + 2, FUSE_ROOT_ID, b"missing\0");
    let (error, _) = exchange(ring, interrupt, &missing);
    assert_eq!(error, -libc::ENOENT);
}

#[test]
fn real_virtiofsd_answers_fuse_requests_and_survives_a_restart() {
    let Some(bin) = virtiofsd_binary() else {
        eprintln!(
            "SKIPPED real_virtiofsd test: virtiofsd is not installed (apt-get install -y libseccomp-dev libcap-ng-dev && cargo install virtiofsd --locked)"
        );
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let shared = dir.path().join("shared");
    std::fs::create_dir(&shared).unwrap();
    let content = b"hello from the host\n";
    std::fs::write(shared.join("hello.txt"), content).unwrap();
    let socket = dir.path().join("virtiofsd.sock");

    // virtiofsd starts in parallel: the device waits for its socket.
    let mut daemon = Virtiofsd::start(&bin, &socket, &shared);
    let started = Instant::now();
    let mut device =
        VhostUserDevice::new(socket.clone(), fs("hostshare"), 1024, None, LONG).unwrap();
    let connected = started.elapsed();
    let t = Instant::now();
    let (_mem, interrupt, mut rings) = activate(&mut device, 2);
    eprintln!(
        "virtiofsd: process start -> connected+negotiated {connected:?}, activation {:?}",
        t.elapsed()
    );
    assert_eq!(device.queue_max_sizes(), vec![1024, 1024]);
    init_and_lookup(&mut rings[1], &interrupt, 1, content.len() as u64);

    // virtiofsd dies; a new one on the same socket gets the replayed setup (request queue
    // based at the used index, 3) and, after a new FUSE_INIT, serves the same queue.
    daemon.kill();
    assert!(wait_until(LONG, || device.needs_reset()));
    let mut daemon = Virtiofsd::start(&bin, &socket, &shared);
    let t = Instant::now();
    assert!(wait_until(LONG, || device.backend_connected()));
    eprintln!("virtiofsd: restarted -> reconnected in {:?}", t.elapsed());
    init_and_lookup(&mut rings[1], &interrupt, 10, content.len() as u64);
    assert_eq!(rings[1].used_idx(), 6);

    assert!(device.reset());
    drop(device);
    assert!(
        daemon.exited(LONG),
        "virtiofsd did not exit after the frontend left"
    );
}
