//! vhost-user-blk backend benchmark: this program is the VMM's vhost-user frontend and the
//! guest's virtio-blk driver at once, with no guest, no KVM and no vCPU.
//!
//! It puts guest memory in a memfd, lays out one split virtqueue by hand (`common/blk.rs`),
//! and attaches mvmm's own frontend (`devices::virtio::vhost_user::VhostUserDevice`, kind
//! `Block`) to the backend listening on `--socket`: GET_FEATURES/protocol features,
//! GET_CONFIG (the capacity), SET_MEM_TABLE with the memfd, and the vring set-up with a kick
//! eventfd and a call eventfd. From then on the backend alone serves the queue:
//!
//! ```text
//! driver: header + descriptors -> avail ring -> fence -> avail idx -> kick eventfd write
//!   backend process: wakes on the kick -> reads the chains from its mapping of the memfd
//!                    -> preadv/pwritev on its file -> used ring -> call eventfd write
//! driver: blocking eventfd read -> reaps the used ring, checks every status -> resubmits
//! ```
//!
//! In a VM the kick eventfd is a KVM ioeventfd and the call eventfd an irqfd, so the VM exit
//! per kick and the guest interrupt are not included. Any vhost-user-blk backend works:
//! `resources/bench/vhost_user_blk.py` runs `mvmm backend blk` and `qemu-storage-daemon`.
//!
//! ```text
//! vhost_user_blk_path [--socket PATH [--backend-pid PID] | --file PATH]
//!     [--connect-timeout S] [--workload randread|randwrite|seqread|seqwrite] [--bs BYTES]
//!     [--qd N] [--seconds S] [--warmup S] [--event-idx on|off] [--verify]
//! ```
//!
//! Without `--socket`, the program serves mvmm's backend itself (`devices::backend`, the code
//! `mvmm backend blk` runs, on a thread of this process) on `--file`, or on a temporary
//! 64 MiB file whose pages start with their own offsets (so `--verify` works); that is what
//! plain `cargo bench` does. With `--backend-pid`, the backend's CPU time (all its threads)
//! and its threads' context switches are sampled over the measurement window.
//!
//! Prints one JSON line: the fields of `blk_path` (CPU per request is this process's: the
//! driver, plus the backend when it runs in-process), the negotiated features, and the
//! backend's CPU and context switches per request when known.

// Public for the smoke test (tests/vhost_user_blk_bench.rs), which includes this file.
#[path = "common/mod.rs"]
pub mod common;

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::exit;
use std::thread::JoinHandle;
use std::time::Duration;

use common::blk::{self, BlkGuest, Edge, Measurement, Wait, PAGE};
use common::blk_options::{BlkOptions, BLK_USAGE};
use common::threads::{sample_process, ProcessSample};
use common::{die, json_str, number, Args};
use devices::backend::{BlkConfig, BlkDevice, Server};
use devices::virtio::vhost_user::{VhostUserDevice, VhostUserKind};

/// A backend that stops answering for this long ends the run.
const STALL: Duration = Duration::from_secs(10);

#[derive(Clone, Debug)]
pub struct Options {
    pub socket: Option<PathBuf>,
    pub file: Option<PathBuf>,
    pub backend_pid: Option<u32>,
    pub connect_timeout: f64,
    pub blk: BlkOptions,
}

fn usage() -> String {
    format!(
        "usage: vhost_user_blk_path [--socket PATH [--backend-pid PID] | --file PATH] \
         [--connect-timeout S] {BLK_USAGE}\n\
         Without --socket, serves mvmm's backend in-process on --file (or a temporary 64 MiB \
         file)."
    )
}

fn parse_args() -> Options {
    let usage = usage();
    let mut o = Options {
        socket: None,
        file: None,
        backend_pid: None,
        connect_timeout: 10.0,
        blk: BlkOptions::default(),
    };
    let mut args = Args::from_env();
    while let Some(name) = args.next_arg() {
        if o.blk.parse_one(&mut args, &usage) {
            continue;
        }
        match name.as_str() {
            "--socket" => o.socket = Some(args.value(&usage).into()),
            "--file" => o.file = Some(args.value(&usage).into()),
            "--backend-pid" => o.backend_pid = Some(number(&name, &args.value(&usage))),
            "--connect-timeout" => o.connect_timeout = number(&name, &args.value(&usage)),
            // `cargo bench` passes --bench to harness = false benches.
            "--bench" => {}
            "-h" | "--help" => {
                println!("{usage}");
                exit(0)
            }
            _ => die(&format!("unknown argument {name}\n{usage}")),
        }
    }
    o.blk.check();
    if o.socket.is_some() && o.file.is_some() {
        die("--file is for the in-process backend: give --socket or --file, not both");
    }
    if !(o.connect_timeout.is_finite() && o.connect_timeout > 0.0) {
        die("--connect-timeout must be > 0 seconds");
    }
    o
}

/// Writes `size` bytes to `out` in which the first u64 of every 4 KiB page is the page's
/// offset (what `--verify` expects), the rest a pattern.
pub fn write_self_offset_image(out: &mut impl Write, size: u64) -> std::io::Result<()> {
    let mut page = [0x3cu8; PAGE as usize];
    for offset in (0..size).step_by(PAGE as usize) {
        page[..8].copy_from_slice(&offset.to_le_bytes());
        out.write_all(&page)?;
    }
    Ok(())
}

/// mvmm's backend on a thread of this process, serving one frontend.
struct InProcess {
    _dir: tempfile::TempDir,
    _tmp_file: Option<tempfile::NamedTempFile>,
    socket: PathBuf,
    thread: JoinHandle<()>,
}

impl InProcess {
    fn start(file: Option<&Path>) -> InProcess {
        let (path, tmp_file) = match file {
            Some(p) => (p.to_path_buf(), None),
            None => {
                let mut t = tempfile::NamedTempFile::new()
                    .unwrap_or_else(|e| die(&format!("cannot create a temporary file: {e}")));
                write_self_offset_image(&mut std::io::BufWriter::new(t.as_file_mut()), 64 << 20)
                    .unwrap_or_else(|e| die(&format!("cannot fill the temporary file: {e}")));
                (t.path().to_path_buf(), Some(t))
            }
        };
        let device = BlkDevice::new(BlkConfig {
            file: open_rw(&path),
            read_only: false,
            serial: Some("bench".into()),
            direct: false,
        })
        .unwrap_or_else(|e| die(&format!("{}: {e}", path.display())));
        let dir = tempfile::Builder::new()
            .prefix("vhost_user_blk_path")
            .tempdir()
            .unwrap_or_else(|e| die(&format!("cannot create a temporary directory: {e}")));
        let socket = dir.path().join("blk.sock");
        let listener = UnixListener::bind(&socket)
            .unwrap_or_else(|e| die(&format!("cannot listen on {}: {e}", socket.display())));
        let mut server = Server::new(listener, device);
        let thread = std::thread::Builder::new()
            .name("backend".into())
            .spawn(move || {
                if let Err(e) = server.serve_one() {
                    die(&format!("the in-process backend failed: {e}"));
                }
            })
            .unwrap_or_else(|e| die(&format!("cannot start the backend thread: {e}")));
        InProcess {
            _dir: dir,
            _tmp_file: tmp_file,
            socket,
            thread,
        }
    }

    /// Waits for the backend to finish (after the frontend disconnected).
    fn join(self) {
        if self.thread.join().is_err() {
            die("the in-process backend thread panicked");
        }
    }
}

/// One run's results.
pub struct Report {
    pub m: Measurement,
    pub features: u64,
    pub event_idx: bool,
    pub capacity: u64,
    /// The backend process over the window (with `--backend-pid`).
    pub backend: Option<(ProcessSample, ProcessSample)>,
}

impl Report {
    pub fn json(&self, o: &Options) -> String {
        let backend = match &o.socket {
            Some(s) => s.display().to_string(),
            None => "in-process".into(),
        };
        let mut out = format!(
            "{{\"backend\":{},{},\"features\":\"{:#x}\",\"capacity\":{},\"wakeups_per_req\":{:.4}",
            json_str(&backend),
            self.m.json_fields(&o.blk, self.event_idx),
            self.features,
            self.capacity,
            self.m.wakeups as f64 / self.m.tally.ios.max(1) as f64,
        );
        if let Some((a, b)) = &self.backend {
            let ios = self.m.tally.ios.max(1) as f64;
            let cpu = (b.cpu_s - a.cpu_s).max(0.0);
            out += &format!(
                concat!(
                    ",\"backend_cpu_us_per_req\":{:.3},\"backend_cpu_util\":{:.3},",
                    "\"backend_vol_switches_per_req\":{:.4},",
                    "\"backend_invol_switches_per_req\":{:.4},\"backend_threads\":{}"
                ),
                cpu * 1e6 / ios,
                cpu / self.m.elapsed,
                b.voluntary.saturating_sub(a.voluntary) as f64 / ios,
                b.involuntary.saturating_sub(a.involuntary) as f64 / ios,
                b.threads,
            );
        }
        out.push('}');
        out
    }
}

/// Connects to the backend (or starts the in-process one), runs the workload, disconnects.
pub fn measure(o: &Options) -> Report {
    let in_process = o
        .socket
        .is_none()
        .then(|| InProcess::start(o.file.as_deref()));
    let socket = o
        .socket
        .clone()
        .or_else(|| in_process.as_ref().map(|b| b.socket.clone()))
        .unwrap_or_else(|| die("no socket"));
    // The guest's memory exists before the device is attached, as in a VM.
    let mut guest = BlkGuest::new(&o.blk, true);
    let mut device = VhostUserDevice::new(
        socket.clone(),
        VhostUserKind::Block,
        blk::QUEUE_SIZE,
        Some(1),
        Duration::from_secs_f64(o.connect_timeout),
    )
    .unwrap_or_else(|e| die(&e.to_string()));
    let features = guest.negotiate(&device, o.blk.event_idx, false);
    guest.activate(&mut device, features);
    let capacity = blk::capacity(&device);

    let pid = o.backend_pid;
    let (mut before, mut after) = (None, None);
    let m = blk::run(&mut guest, &o.blk, capacity, Wait::Poll(STALL), |edge| {
        let sample = pid.and_then(sample_process);
        match edge {
            Edge::Start => before = sample,
            Edge::End => after = sample,
        }
    });
    if pid.is_some() && (before.is_none() || after.is_none()) {
        die("the backend process disappeared during the run");
    }
    // Disconnect: mvmm's backend exits (or, in-process, its thread returns).
    drop(device);
    if let Some(b) = in_process {
        b.join();
    }
    Report {
        m,
        features,
        event_idx: guest.event_idx(),
        capacity,
        backend: before.zip(after),
    }
}

fn main() {
    let o = parse_args();
    let report = measure(&o);
    println!("{}", report.json(&o));
}

fn open_rw(path: &Path) -> File {
    OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap_or_else(|e| die(&format!("cannot open {}: {e}", path.display())))
}
