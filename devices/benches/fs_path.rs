//! virtio-fs benchmark: mvmm's vhost-user frontend with the real virtiofsd, and no guest.
//!
//! This program plays the guest's virtio-fs driver. It puts guest memory in a memfd, lays out
//! the two split virtqueues (hiprio and one request queue) by hand, and attaches a real
//! `devices::virtio::vhost_user::VhostUserDevice` (kind `Fs`) to a virtiofsd that it starts
//! itself. From then on, FUSE requests go straight to virtiofsd:
//!
//! ```text
//! driver: FUSE request + reply buffers -> descriptors -> avail ring -> kick eventfd write
//!   virtiofsd (queue thread): eventfd wakes -> reads the request from guest memory
//!        -> preadv2 of the file straight into the guest's reply buffer -> used ring -> call eventfd
//! driver: waits on the call eventfd -> reaps the used ring, checks the replies -> resubmits
//! ```
//!
//! The frontend is not on this path: after activation its only thread (`vhu-<tag>`) just
//! watches the socket for the backend hanging up. The `read` test shows that with the CPU time
//! of every thread of this process (`/proc/self/task/*/schedstat`) during the timed passes.
//! In the VMM the kick eventfd is a KVM ioeventfd and the call eventfd an irqfd, so the VM exit
//! per kick and the guest interrupt are not included here.
//!
//! Tests (JSON lines on stdout, one per run or pass; progress on stderr):
//!
//! ```text
//! fs_path attach --shared DIR [--mode ready|parallel] [--runs N]
//!     ready: virtiofsd is already waiting in accept() (as one started before the VM is);
//!            time from the frontend starting to connect to the FUSE_INIT reply
//!            (connect+negotiate, activate, FUSE_INIT round trip).
//!     parallel: virtiofsd is spawned right before the frontend starts to connect (the
//!            socket appears late); time from the spawn to the FUSE_INIT reply.
//! fs_path read --shared DIR --file NAME [--bs BYTES] [--qd N] [--passes N] [--verify on|off]
//!     FUSE_INIT, LOOKUP, OPEN, then READs of --bs bytes with --qd requests in flight on the
//!     request queue, over the whole file, --passes times (after one untimed warm-up pass that,
//!     with --verify on, checks every byte). The file must hold its own offsets: the u64 at
//!     byte offset o is o (little endian), and its size must be a multiple of 8.
//!
//! common: [--virtiofsd PATH] [--cache never|auto|always|metadata] [--thread-pool-size N]
//!         [--virtiofsd-arg ARG]... [--queue-size N] [--event-idx on|off]
//! ```
//!
//! Without a test name (`cargo bench`), runs a short attach and read on a temporary 64 MiB
//! file, or prints SKIPPED when no virtiofsd is installed. `resources/bench/fs.py` runs the
//! full comparison against `cat`/`dd`.
//!
//! Layout: this file has the options and the two tests; `fs_path/fuse.rs` the virtio-fs
//! driver (FUSE requests on the request queue), `fs_path/virtiofsd.rs` the daemon's life
//! cycle, and `common/` the virtqueue and per-thread CPU code shared with the other benches.

#[path = "common/mod.rs"]
mod common;
#[path = "fs_path/fuse.rs"]
mod fuse;
#[path = "fs_path/virtiofsd.rs"]
mod virtiofsd;

use std::fs::File;
use std::io::Write;
use std::path::PathBuf;
use std::process::exit;
use std::time::{Duration, Instant};

use common::threads::{cpu_delta, settle_threads, threads, threads_json, ThreadCpu};
use common::{die, json_str, number, on_off, parse_size, Args};
use devices::virtio::vhost_user::{VhostUserDevice, VhostUserKind};
use fuse::{Driver, FOPEN_DIRECT_IO, FOPEN_KEEP_CACHE, FUSE_MAX_PAGES, PAGE};
use virtiofsd::{find_virtiofsd, Daemon};

/// How long any single wait (socket, reply, exit) may take before the bench gives up.
const TIMEOUT: Duration = Duration::from_secs(10);

// ---- Options -------------------------------------------------------------------------------

#[derive(Clone, Copy, PartialEq, Eq)]
enum Test {
    Default,
    Attach,
    Read,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    Ready,
    Parallel,
}

#[derive(Clone)]
struct Options {
    test: Test,
    virtiofsd: Option<PathBuf>,
    shared: Option<PathBuf>,
    file: String,
    cache: String,
    pool: usize,
    extra: Vec<String>,
    queue_size: u16,
    event_idx: bool,
    mode: Mode,
    runs: usize,
    bs: u64,
    qd: usize,
    passes: usize,
    verify: bool,
}

const USAGE: &str = "usage:
  fs_path attach --shared DIR [--mode ready|parallel] [--runs N] [common]
  fs_path read --shared DIR --file NAME [--bs BYTES] [--qd N] [--passes N] [--verify on|off] [common]
  common: [--virtiofsd PATH] [--cache never|auto|always|metadata] [--thread-pool-size N]
          [--virtiofsd-arg ARG]... [--queue-size N] [--event-idx on|off]
Without a test name: a short attach and read on a temporary 64 MiB file.";

fn parse_args() -> Options {
    let mut o = Options {
        test: Test::Default,
        virtiofsd: None,
        shared: None,
        file: "bench.dat".into(),
        cache: "never".into(),
        pool: 0,
        extra: Vec::new(),
        queue_size: 256,
        event_idx: true,
        mode: Mode::Ready,
        runs: 10,
        bs: 128 << 10,
        qd: 8,
        passes: 3,
        verify: true,
    };
    let mut args = Args::from_env();
    while let Some(name) = args.next_arg() {
        let mut value = || args.value(USAGE);
        match name.as_str() {
            "attach" => o.test = Test::Attach,
            "read" => o.test = Test::Read,
            "--virtiofsd" => o.virtiofsd = Some(value().into()),
            "--shared" => o.shared = Some(value().into()),
            "--file" => o.file = value(),
            "--cache" => o.cache = value(),
            "--thread-pool-size" => o.pool = number(&name, &value()),
            "--virtiofsd-arg" => o.extra.push(value()),
            "--queue-size" => o.queue_size = number(&name, &value()),
            "--event-idx" => o.event_idx = on_off(&name, &value()),
            "--mode" => {
                o.mode = match value().as_str() {
                    "ready" => Mode::Ready,
                    "parallel" => Mode::Parallel,
                    v => die(&format!("--mode takes ready or parallel, not {v}")),
                }
            }
            "--runs" => o.runs = number(&name, &value()),
            "--bs" => o.bs = parse_size(&value()),
            "--qd" => o.qd = number(&name, &value()),
            "--passes" => o.passes = number(&name, &value()),
            "--verify" => o.verify = on_off(&name, &value()),
            // `cargo bench` passes --bench to harness = false benches.
            "--bench" => {}
            "-h" | "--help" => {
                println!("{USAGE}");
                exit(0)
            }
            _ => die(&format!("unknown argument {name}\n{USAGE}")),
        }
    }
    if !o.queue_size.is_power_of_two() || !(4..=1024).contains(&o.queue_size) {
        die("--queue-size must be a power of two from 4 to 1024");
    }
    let max_qd = usize::from(o.queue_size) / 3;
    if o.qd == 0 || o.qd > max_qd {
        die(&format!(
            "--qd must be 1..={max_qd} (3 descriptors per request, {} descriptors)",
            o.queue_size
        ));
    }
    if o.bs == 0 || o.bs % 8 != 0 || o.bs > 64 << 20 {
        die("--bs must be a non-zero multiple of 8, at most 64 MiB");
    }
    if o.runs == 0 || o.passes == 0 {
        die("--runs and --passes must be at least 1");
    }
    o
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}
// ---- Tests ---------------------------------------------------------------------------------

struct Setup {
    bin: PathBuf,
    shared: PathBuf,
    sockets: tempfile::TempDir,
}

fn setup(o: &Options) -> Setup {
    let bin = o
        .virtiofsd
        .clone()
        .or_else(find_virtiofsd)
        .unwrap_or_else(|| die("virtiofsd not found: pass --virtiofsd PATH"));
    let shared = o
        .shared
        .clone()
        .unwrap_or_else(|| die(&format!("--shared DIR is needed\n{USAGE}")));
    let sockets = tempfile::Builder::new()
        .prefix("fs_path")
        .tempdir()
        .unwrap_or_else(|e| die(&format!("cannot create a temporary directory: {e}")));
    Setup {
        bin,
        shared,
        sockets,
    }
}

fn attach(o: &Options) {
    let s = setup(o);
    let mode = match o.mode {
        Mode::Ready => "ready",
        Mode::Parallel => "parallel",
    };
    for run in 0..o.runs {
        let socket = s.sockets.path().join(format!("attach-{run}.sock"));
        // Guest memory exists before the device is attached; not timed.
        let mut driver = Driver::new(o, 1, PAGE);
        let (mut daemon, started, listening, accepting) = match o.mode {
            Mode::Ready => {
                let t = Instant::now();
                let mut d = Daemon::spawn(o, &s.bin, &socket, &s.shared);
                d.wait_listening(&socket);
                let listening = t.elapsed();
                let accepting = d.wait_accepting().then(|| t.elapsed());
                (d, Instant::now(), Some(listening), accepting)
            }
            Mode::Parallel => {
                let t = Instant::now();
                (Daemon::spawn(o, &s.bin, &socket, &s.shared), t, None, None)
            }
        };
        let t0 = Instant::now();
        let mut device = VhostUserDevice::new(
            socket.clone(),
            VhostUserKind::Fs {
                tag: "bench".into(),
            },
            o.queue_size,
            None,
            TIMEOUT,
        )
        .unwrap_or_else(|e| die(&format!("run {run}: {e}")));
        let t1 = Instant::now();
        driver.activate(&mut device);
        let t2 = Instant::now();
        let init = driver.init();
        let t3 = Instant::now();
        drop(device);
        let exited = daemon.wait_exit(TIMEOUT);
        println!(
            concat!(
                "{{\"test\":\"attach\",\"mode\":\"{}\",\"cache\":{},\"run\":{},",
                "\"spawn_to_listen_ms\":{},\"spawn_to_accept_ms\":{},",
                "\"spawn_to_connect_start_ms\":{:.3},",
                "\"connect_negotiate_ms\":{:.3},\"activate_ms\":{:.3},\"fuse_init_ms\":{:.3},",
                "\"connect_to_init_ms\":{:.3},\"total_ms\":{:.3},\"fuse_minor\":{},",
                "\"virtiofsd_exited\":{}}}"
            ),
            mode,
            json_str(&o.cache),
            run,
            listening.map_or("null".into(), |d| format!("{:.3}", ms(d))),
            accepting.map_or("null".into(), |d| format!("{:.3}", ms(d))),
            ms(t0 - started),
            ms(t1 - t0),
            ms(t2 - t1),
            ms(t3 - t2),
            ms(t3 - t0),
            ms(t3 - started),
            init.minor,
            exited,
        );
        if !exited {
            die("virtiofsd did not exit after the frontend disconnected");
        }
    }
}

fn read(o: &Options) {
    let s = setup(o);
    let socket = s.sockets.path().join("read.sock");
    let mut daemon = Daemon::spawn(o, &s.bin, &socket, &s.shared);
    daemon.wait_listening(&socket);
    daemon.wait_accepting();
    let vfsd_pid = daemon.pid().to_string();

    let mut driver = Driver::new(o, o.qd, o.bs);
    driver.touch_buffers();
    let mut device = VhostUserDevice::new(
        socket.clone(),
        VhostUserKind::Fs {
            tag: "bench".into(),
        },
        o.queue_size,
        None,
        TIMEOUT,
    )
    .unwrap_or_else(|e| die(&e.to_string()));
    driver.activate(&mut device);
    let init = driver.init();
    let max_read = u64::from(init.max_pages) * PAGE;
    let (nodeid, size) = driver.lookup(&o.file);
    let (fh, open_flags) = driver.open(nodeid);
    println!(
        concat!(
            "{{\"test\":\"read_setup\",\"cache\":{},\"fuse_minor\":{},\"init_flags\":\"{:#x}\",",
            "\"max_write\":{},\"max_pages\":{},\"max_read_bytes\":{},\"file_size\":{},",
            "\"open_flags\":{},\"direct_io\":{},\"keep_cache\":{}}}"
        ),
        json_str(&o.cache),
        init.minor,
        init.flags,
        init.max_write,
        init.max_pages,
        max_read,
        size,
        open_flags,
        open_flags & FOPEN_DIRECT_IO != 0,
        open_flags & FOPEN_KEEP_CACHE != 0,
    );
    if init.flags & u64::from(FUSE_MAX_PAGES) == 0 && o.bs > 128 << 10 {
        die("virtiofsd did not accept MAX_PAGES: READs are limited to 128 KiB");
    }
    if o.bs > max_read {
        die(&format!(
            "--bs {} is larger than the {max_read} bytes a guest may read at once (max_pages {})",
            o.bs, init.max_pages
        ));
    }
    if size == 0 || size % 8 != 0 {
        die(&format!(
            "{} is {size} bytes: it must be a non-empty multiple of 8",
            o.file
        ));
    }

    let me = std::process::id();
    settle_threads(me);
    for pass_no in 0..=o.passes {
        let warmup = pass_no == 0;
        let ours = threads("self");
        let theirs = threads(&vfsd_pid);
        let pass = driver.read_file(nodeid, fh, size, o.bs, o.qd, warmup && o.verify);
        let ours = cpu_delta(&ours, &threads("self"));
        let theirs = cpu_delta(&theirs, &threads(&vfsd_pid));
        let (main, frontend): (Vec<ThreadCpu>, Vec<ThreadCpu>) =
            ours.into_iter().partition(|t| t.tid == me);
        let driver_ms = main.iter().map(|t| t.run_ns).sum::<u64>() as f64 / 1e6;
        let vfsd_ms = theirs.iter().map(|t| t.run_ns).sum::<u64>() as f64 / 1e6;
        let reqs = pass.requests.max(1) as f64;
        println!(
            concat!(
                "{{\"test\":\"read\",\"cache\":{},\"pool\":{},\"bs\":{},\"qd\":{},",
                "\"event_idx\":{},\"pass\":{},\"warmup\":{},\"verified\":{},\"bytes\":{},",
                "\"seconds\":{:.6},\"mb_s\":{:.1},\"requests\":{},\"kicks_per_req\":{:.3},",
                "\"wakeups_per_req\":{:.3},\"driver_cpu_ms\":{:.3},\"virtiofsd_cpu_ms\":{:.3},",
                "\"frontend_cpu_ms\":{:.3},\"frontend_runs\":{},\"frontend_threads\":{},",
                "\"virtiofsd_threads\":{}}}"
            ),
            json_str(&o.cache),
            o.pool,
            o.bs,
            o.qd,
            o.event_idx,
            pass_no,
            warmup,
            warmup && o.verify,
            pass.bytes,
            pass.seconds,
            pass.bytes as f64 / pass.seconds / 1e6,
            pass.requests,
            pass.kicks as f64 / reqs,
            pass.wakeups as f64 / reqs,
            driver_ms,
            vfsd_ms,
            frontend.iter().map(|t| t.run_ns).sum::<u64>() as f64 / 1e6,
            frontend.iter().map(|t| t.slices).sum::<u64>(),
            threads_json(&frontend),
            threads_json(&theirs),
        );
        let _ = std::io::stdout().flush();
    }
    driver.release(nodeid, fh);
    drop(device);
    if !daemon.wait_exit(TIMEOUT) {
        die("virtiofsd did not exit after the frontend disconnected");
    }
}

/// `cargo bench`: a short run of both tests on a temporary 64 MiB file.
fn default_run(o: &Options) {
    let Some(bin) = o.virtiofsd.clone().or_else(find_virtiofsd) else {
        println!(
            "SKIPPED fs_path: virtiofsd is not installed (resources/guest/install-virtiofsd.sh)"
        );
        return;
    };
    let dir = tempfile::Builder::new()
        .prefix("fs_path-share")
        .tempdir()
        .unwrap_or_else(|e| die(&format!("cannot create a temporary directory: {e}")));
    let path = dir.path().join("bench.dat");
    let mut f = File::create(&path).unwrap_or_else(|e| die(&format!("{}: {e}", path.display())));
    let mut chunk = Vec::with_capacity(1 << 20);
    for mib in 0..64u64 {
        chunk.clear();
        for word in 0..(1u64 << 17) {
            chunk.extend_from_slice(&((mib << 20) + word * 8).to_le_bytes());
        }
        f.write_all(&chunk)
            .unwrap_or_else(|e| die(&format!("{}: {e}", path.display())));
    }
    drop(f);
    let mut o = o.clone();
    o.virtiofsd = Some(bin);
    o.shared = Some(dir.path().to_path_buf());
    o.file = "bench.dat".into();
    o.runs = 5;
    attach(&o);
    o.passes = 2;
    read(&o);
}

fn main() {
    let o = parse_args();
    match o.test {
        Test::Attach => attach(&o),
        Test::Read => read(&o),
        Test::Default => default_run(&o),
    }
}
