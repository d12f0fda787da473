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

use std::fs::File;
use std::io::Write;
use std::os::fd::{AsRawFd, FromRawFd};
use std::path::{Path, PathBuf};
use std::process::{exit, Child, Command, Stdio};
use std::sync::atomic::{fence, AtomicU16, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use devices::virtio::vhost_user::{VhostUserDevice, VhostUserKind};
use devices::virtio::{
    ActivatedQueue, VirtioDevice, VirtioInterrupt, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX,
};
use virtio_queue::{Queue, QueueT};
use vm_memory::{FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

// ---- Guest memory layout -------------------------------------------------------------------

/// Queue `i` lives at `i * RING_STRIDE`: descriptor table, then the available ring at +0x4000,
/// the used ring at +0x5000 (room for 1024 entries each).
const RING_STRIDE: u64 = 0x8000;
const AVAIL_OFF: u64 = 0x4000;
const USED_OFF: u64 = 0x5000;
/// FUSE requests (in header + body), one 256-byte slot per request.
const REQUESTS: u64 = 0x1_0000;
const REQUEST_SLOT: u64 = 256;
/// FUSE out headers, one 64-byte slot per request.
const OUT_HEADERS: u64 = 0x3_0000;
const OUT_SLOT: u64 = 64;
/// Reply data buffers, one page-aligned buffer per request.
const DATA: u64 = 0x10_0000;

const HIPRIO_QUEUE: u16 = 0;
const REQUEST_QUEUE: u16 = 1;

// ---- virtio and FUSE constants (virtio 1.2 2.7, 5.11; include/uapi/linux/fuse.h) -----------

const VIRTQ_DESC_F_NEXT: u16 = 1;
const VIRTQ_DESC_F_WRITE: u16 = 2;

const FUSE_LOOKUP: u32 = 1;
const FUSE_OPEN: u32 = 14;
const FUSE_READ: u32 = 15;
const FUSE_RELEASE: u32 = 18;
const FUSE_INIT: u32 = 26;
const FUSE_ROOT_ID: u64 = 1;
const FUSE_KERNEL_MINOR: u32 = 38;
const FUSE_ASYNC_READ: u32 = 1 << 0;
const FUSE_BIG_WRITES: u32 = 1 << 5;
const FUSE_PARALLEL_DIROPS: u32 = 1 << 18;
const FUSE_MAX_PAGES: u32 = 1 << 22;
const FUSE_SUBMOUNTS: u32 = 1 << 27;
const FUSE_INIT_EXT: u32 = 1 << 30;
const FOPEN_DIRECT_IO: u32 = 1 << 0;
const FOPEN_KEEP_CACHE: u32 = 1 << 1;
const IN_HEADER: usize = 40;
const OUT_HEADER: u32 = 16;
const PAGE: u64 = 4096;

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

fn die(msg: &str) -> ! {
    eprintln!("fs_path: {msg}");
    exit(2)
}

fn on_off(v: &str) -> bool {
    match v {
        "on" => true,
        "off" => false,
        _ => die(&format!("expected on or off, not {v}")),
    }
}

fn number<T: std::str::FromStr>(name: &str, v: &str) -> T {
    v.parse()
        .unwrap_or_else(|_| die(&format!("{name}: bad number {v}")))
}

/// `4096`, `128k`, `1M`.
fn parse_size(s: &str) -> u64 {
    let lower = s.to_ascii_lowercase();
    let (digits, mult) = if let Some(d) = lower.strip_suffix('k') {
        (d, 1 << 10)
    } else if let Some(d) = lower.strip_suffix('m') {
        (d, 1 << 20)
    } else {
        (lower.as_str(), 1)
    };
    digits
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .unwrap_or_else(|| die(&format!("bad size {s}")))
}

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
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let (name, inline) = match arg.split_once('=') {
            Some((n, v)) if n.starts_with("--") => (n.to_owned(), Some(v.to_owned())),
            _ => (arg.clone(), None),
        };
        let mut value = || {
            inline
                .clone()
                .or_else(|| args.next())
                .unwrap_or_else(|| die(&format!("{name} needs a value\n{USAGE}")))
        };
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
            "--event-idx" => o.event_idx = on_off(&value()),
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
            "--verify" => o.verify = on_off(&value()),
            // `cargo bench` passes --bench to harness = false benches.
            "--bench" => {}
            "-h" | "--help" => {
                println!("{USAGE}");
                exit(0)
            }
            _ => die(&format!("unknown argument {arg}\n{USAGE}")),
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

// ---- Small helpers -------------------------------------------------------------------------

fn json_str(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn find_virtiofsd() -> Option<PathBuf> {
    let mut candidates = Vec::new();
    if let Some(home) = std::env::var_os("CARGO_HOME") {
        candidates.push(Path::new(&home).join("bin/virtiofsd"));
    }
    if let Some(home) = std::env::var_os("HOME") {
        candidates.push(Path::new(&home).join(".cargo/bin/virtiofsd"));
    }
    if let Some(paths) = std::env::var_os("PATH") {
        candidates.extend(std::env::split_paths(&paths).map(|d| d.join("virtiofsd")));
    }
    candidates.into_iter().find(|p| p.is_file())
}

/// Waits until `fd` is readable; false after `timeout`.
fn wait_readable(fd: i32, timeout: Duration) -> bool {
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        // SAFETY: one valid pollfd for a descriptor the caller keeps open.
        let n = unsafe { libc::poll(&mut pfd, 1, left.as_millis().max(1) as i32) };
        if n > 0 {
            return true;
        }
        if n == 0 && Instant::now() >= deadline {
            return false;
        }
        if n < 0 && std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted {
            die(&format!("poll: {}", std::io::Error::last_os_error()));
        }
    }
}

// ---- virtiofsd ------------------------------------------------------------------------------

/// A virtiofsd this program started; killed (by its own handle) if still running when dropped.
struct Daemon {
    child: Child,
}

impl Daemon {
    fn spawn(o: &Options, bin: &Path, socket: &Path, shared: &Path) -> Daemon {
        let child = Command::new(bin)
            .arg("--socket-path")
            .arg(socket)
            .arg("--shared-dir")
            .arg(shared)
            .args(["--sandbox", "none", "--log-level", "error"])
            .arg(format!("--cache={}", o.cache))
            .arg(format!("--thread-pool-size={}", o.pool))
            .args(&o.extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| die(&format!("cannot start {}: {e}", bin.display())));
        Daemon { child }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn check_alive(&mut self) {
        if let Ok(Some(status)) = self.child.try_wait() {
            die(&format!("virtiofsd exited early: {status}"));
        }
    }

    /// Waits for virtiofsd to exit by itself (it does when its frontend disconnects).
    fn wait_exit(&mut self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        false
    }

    /// Waits until virtiofsd listens on `socket` (a listening socket in /proc/net/unix: the
    /// frontend's first connect will then succeed, and nobody connected to find out).
    fn wait_listening(&mut self, socket: &Path) {
        let want = socket.to_string_lossy();
        let deadline = Instant::now() + TIMEOUT;
        loop {
            let table = std::fs::read_to_string("/proc/net/unix").unwrap_or_default();
            let listening = table.lines().skip(1).any(|line| {
                let f: Vec<&str> = line.split_whitespace().collect();
                // Num RefCount Protocol Flags Type St Inode Path; __SO_ACCEPTCON = 0x10000.
                f.len() >= 8
                    && f[7] == want
                    && u32::from_str_radix(f[3], 16).is_ok_and(|fl| fl & 0x1_0000 != 0)
            });
            if listening {
                return;
            }
            self.check_alive();
            if Instant::now() >= deadline {
                die(&format!(
                    "virtiofsd did not listen on {want} within {TIMEOUT:?}"
                ));
            }
            std::thread::sleep(Duration::from_micros(100));
        }
    }

    /// Waits (up to a second) until a virtiofsd thread is blocked in accept(): virtiofsd
    /// listens early and still sets itself up for a few milliseconds before it accepts, and a
    /// virtiofsd started ahead of the VM is idle in accept(). False if that was not seen
    /// (/proc/PID/task/*/syscall unreadable, or virtiofsd waits some other way).
    fn wait_accepting(&mut self) -> bool {
        let accept = [libc::SYS_accept, libc::SYS_accept4];
        let deadline = Instant::now() + Duration::from_secs(1);
        while Instant::now() < deadline {
            let Ok(dir) = std::fs::read_dir(format!("/proc/{}/task", self.pid())) else {
                return false;
            };
            let in_accept = dir.flatten().any(|task| {
                std::fs::read_to_string(task.path().join("syscall"))
                    .ok()
                    .and_then(|s| s.split_whitespace().next()?.parse::<i64>().ok())
                    .is_some_and(|nr| accept.contains(&nr))
            });
            if in_accept {
                return true;
            }
            self.check_alive();
            std::thread::sleep(Duration::from_micros(100));
        }
        false
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

// ---- Per-thread CPU time -------------------------------------------------------------------

struct ThreadCpu {
    tid: u32,
    name: String,
    /// Time on the CPU, and how many times the thread was scheduled in.
    run_ns: u64,
    slices: u64,
}

/// The threads of process `pid` ("self" for this one) and their CPU time so far.
fn threads(pid: &str) -> Vec<ThreadCpu> {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for entry in dir.flatten() {
        let Ok(tid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let path = entry.path();
        let name = std::fs::read_to_string(path.join("comm"))
            .unwrap_or_default()
            .trim()
            .to_owned();
        // schedstat: run time (ns), wait time (ns), timeslices; stat (ticks) as a fallback.
        let (run_ns, slices) = match std::fs::read_to_string(path.join("schedstat")) {
            Ok(s) => {
                let f: Vec<u64> = s
                    .split_whitespace()
                    .filter_map(|x| x.parse().ok())
                    .collect();
                (
                    f.first().copied().unwrap_or(0),
                    f.get(2).copied().unwrap_or(0),
                )
            }
            Err(_) => {
                let stat = std::fs::read_to_string(path.join("stat")).unwrap_or_default();
                let after = stat.rsplit_once(')').map_or("", |(_, a)| a);
                let f: Vec<u64> = after
                    .split_whitespace()
                    .filter_map(|x| x.parse().ok())
                    .collect();
                // After "comm)": state is field 3; utime, stime are fields 14, 15.
                let ticks = f.get(10).copied().unwrap_or(0) + f.get(11).copied().unwrap_or(0);
                // SAFETY: sysconf has no side effects.
                let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
                (ticks * 1_000_000_000 / hz, 0)
            }
        };
        out.push(ThreadCpu {
            tid,
            name,
            run_ns,
            slices,
        });
    }
    out.sort_by_key(|t| t.tid);
    out
}

/// CPU used by each thread between two snapshots (threads that appeared count from zero).
fn cpu_delta(before: &[ThreadCpu], after: &[ThreadCpu]) -> Vec<ThreadCpu> {
    after
        .iter()
        .map(|a| {
            let b = before.iter().find(|b| b.tid == a.tid);
            ThreadCpu {
                tid: a.tid,
                name: a.name.clone(),
                run_ns: a.run_ns - b.map_or(0, |b| b.run_ns.min(a.run_ns)),
                slices: a.slices - b.map_or(0, |b| b.slices.min(a.slices)),
            }
        })
        .collect()
}

/// Waits (up to a second) until every thread of this process but the main one has run and is
/// asleep, so a thread that was just started and not yet scheduled (the frontend's watcher)
/// does not charge its start-up to a timed pass.
fn settle_threads(main_tid: u32) {
    let deadline = Instant::now() + Duration::from_secs(1);
    while Instant::now() < deadline {
        let settled = threads("self").iter().all(|t| {
            let state = std::fs::read_to_string(format!("/proc/self/task/{}/stat", t.tid))
                .ok()
                .and_then(|s| {
                    s.rsplit_once(')')
                        .and_then(|(_, a)| a.trim().chars().next())
                });
            t.tid == main_tid || (t.slices > 0 && state == Some('S'))
        });
        if settled {
            return;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn threads_json(threads: &[ThreadCpu]) -> String {
    let items: Vec<String> = threads
        .iter()
        .map(|t| {
            format!(
                "{{\"tid\":{},\"name\":{},\"cpu_ms\":{:.3},\"runs\":{}}}",
                t.tid,
                json_str(&t.name),
                t.run_ns as f64 / 1e6,
                t.slices
            )
        })
        .collect();
    format!("[{}]", items.join(","))
}

// ---- Guest memory and the driver's view of it ----------------------------------------------

/// Shared guest memory at guest address 0, backed by a memfd (vhost-user needs shared memory).
fn guest_memory(size: u64) -> GuestMemoryMmap {
    // SAFETY: memfd_create takes a NUL-terminated name and flags and returns a new descriptor
    // or -1; nothing else is touched.
    let fd = unsafe { libc::memfd_create(c"mvmm-fs-bench".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        die(&format!(
            "memfd_create: {}",
            std::io::Error::last_os_error()
        ));
    }
    // SAFETY: `fd` was just created and is owned by nobody else.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(size)
        .unwrap_or_else(|e| die(&format!("cannot size the memfd: {e}")));
    GuestMemoryMmap::from_ranges_with_files([(
        GuestAddress(0),
        size as usize,
        Some(FileOffset::new(file, 0)),
    )])
    .unwrap_or_else(|e| die(&format!("cannot map guest memory: {e}")))
}

/// The driver's direct view of guest RAM (one region at guest address 0), as a guest kernel
/// has it: plain loads and stores.
#[derive(Clone, Copy)]
struct Ram {
    base: *mut u8,
    len: u64,
}

impl Ram {
    fn new(mem: &GuestMemoryMmap, len: u64) -> Ram {
        let base = mem
            .get_host_address(GuestAddress(0))
            .unwrap_or_else(|e| die(&format!("guest memory has no host mapping: {e}")));
        Ram { base, len }
    }

    fn ptr(&self, gpa: u64, size: u64) -> *mut u8 {
        assert!(gpa.checked_add(size).is_some_and(|end| end <= self.len));
        // SAFETY: in bounds of the mapping, checked above.
        unsafe { self.base.add(gpa as usize) }
    }

    /// A 16-bit ring field, which virtiofsd accesses concurrently.
    fn u16(&self, gpa: u64) -> &AtomicU16 {
        assert_eq!(gpa % 2, 0);
        // SAFETY: in bounds and aligned; the mapping lives as long as the run, and the other
        // side accesses ring indexes atomically.
        unsafe { AtomicU16::from_ptr(self.ptr(gpa, 2).cast()) }
    }

    fn write(&self, gpa: u64, bytes: &[u8]) {
        let dst = self.ptr(gpa, bytes.len() as u64);
        // SAFETY: in bounds; virtiofsd does not look at these bytes before they are published
        // with a release store of the available index.
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), dst, bytes.len()) }
    }

    fn read(&self, gpa: u64, len: usize) -> Vec<u8> {
        let src = self.ptr(gpa, len as u64);
        let mut out = vec![0u8; len];
        // SAFETY: in bounds; virtiofsd wrote these bytes before its release store of the used
        // index, which was loaded with acquire.
        unsafe { std::ptr::copy_nonoverlapping(src, out.as_mut_ptr(), len) }
        out
    }

    fn read_u64(&self, gpa: u64) -> u64 {
        // SAFETY: as for `read`; the address may be unaligned.
        u64::from_le(unsafe { std::ptr::read_unaligned(self.ptr(gpa, 8).cast::<u64>()) })
    }

    fn read_u32(&self, gpa: u64) -> u32 {
        // SAFETY: as for `read`.
        u32::from_le(unsafe { std::ptr::read_unaligned(self.ptr(gpa, 4).cast::<u32>()) })
    }
}

/// `vring_need_event` (virtio 1.2, 2.7.10).
fn need_event(event: u16, new: u16, old: u16) -> bool {
    new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
}

/// One split virtqueue, driver side.
struct Vq {
    ram: Ram,
    size: u16,
    desc: u64,
    avail: u64,
    used: u64,
    event_idx: bool,
    avail_idx: u16,
    kicked_idx: u16,
    last_used: u16,
    kick: EventFd,
    kicks: u64,
}

impl Vq {
    fn new(ram: Ram, index: u16, size: u16, event_idx: bool) -> Vq {
        let base = RING_STRIDE * u64::from(index);
        Vq {
            ram,
            size,
            desc: base,
            avail: base + AVAIL_OFF,
            used: base + USED_OFF,
            event_idx,
            avail_idx: 0,
            kicked_idx: 0,
            last_used: 0,
            kick: EventFd::new(EFD_NONBLOCK).unwrap_or_else(|e| die(&format!("eventfd: {e}"))),
            kicks: 0,
        }
    }

    /// The queue as the transport hands it to the device at DRIVER_OK.
    fn activated(&self, mem: &GuestMemoryMmap, index: u16) -> ActivatedQueue {
        let mut queue = Queue::new(self.size).unwrap_or_else(|e| die(&format!("queue: {e}")));
        queue.set_size(self.size);
        let split = |a: u64| (Some(a as u32), Some((a >> 32) as u32));
        let (lo, hi) = split(self.desc);
        queue.set_desc_table_address(lo, hi);
        let (lo, hi) = split(self.avail);
        queue.set_avail_ring_address(lo, hi);
        let (lo, hi) = split(self.used);
        queue.set_used_ring_address(lo, hi);
        queue.set_event_idx(self.event_idx);
        queue.set_ready(true);
        if !queue.is_valid(mem) {
            die("the hand-made queue layout is invalid");
        }
        ActivatedQueue {
            index,
            queue,
            kick: self
                .kick
                .try_clone()
                .unwrap_or_else(|e| die(&format!("eventfd clone: {e}"))),
        }
    }

    fn used_event(&self) -> u64 {
        self.avail + 4 + 2 * u64::from(self.size)
    }

    fn avail_event(&self) -> u64 {
        self.used + 4 + 8 * u64::from(self.size)
    }

    /// Writes a chain of descriptors starting at `head` and its available ring entry; the
    /// device sees it after `publish`.
    fn add(&mut self, head: u16, chain: &[(u64, u32, bool)]) {
        let mut table = Vec::with_capacity(16 * chain.len());
        for (i, &(addr, len, writable)) in chain.iter().enumerate() {
            let last = i + 1 == chain.len();
            let mut flags = if writable { VIRTQ_DESC_F_WRITE } else { 0 };
            if !last {
                flags |= VIRTQ_DESC_F_NEXT;
            }
            let next = if last { 0 } else { head + i as u16 + 1 };
            table.extend_from_slice(&addr.to_le_bytes());
            table.extend_from_slice(&len.to_le_bytes());
            table.extend_from_slice(&flags.to_le_bytes());
            table.extend_from_slice(&next.to_le_bytes());
        }
        self.ram.write(self.desc + 16 * u64::from(head), &table);
        let pos = u64::from(self.avail_idx % self.size);
        self.ram
            .u16(self.avail + 4 + 2 * pos)
            .store(head.to_le(), Ordering::Relaxed);
        self.avail_idx = self.avail_idx.wrapping_add(1);
    }

    /// Publishes the added chains and kicks if the device asks for it.
    fn publish(&mut self) {
        fence(Ordering::Release);
        self.ram
            .u16(self.avail + 2)
            .store(self.avail_idx.to_le(), Ordering::Release);
        fence(Ordering::SeqCst);
        let kick = if self.event_idx {
            let event = u16::from_le(self.ram.u16(self.avail_event()).load(Ordering::Relaxed));
            need_event(event, self.avail_idx, self.kicked_idx)
        } else {
            // VIRTQ_USED_F_NO_NOTIFY
            u16::from_le(self.ram.u16(self.used).load(Ordering::Relaxed)) & 1 == 0
        };
        self.kicked_idx = self.avail_idx;
        if kick {
            self.kicks += 1;
            self.kick
                .write(1)
                .unwrap_or_else(|e| die(&format!("kick: {e}")));
        }
    }

    /// The next used element (descriptor head, bytes written), if there is one.
    fn next_used(&mut self) -> Option<(u32, u32)> {
        let used_idx = u16::from_le(self.ram.u16(self.used + 2).load(Ordering::Acquire));
        if used_idx == self.last_used {
            return None;
        }
        let at = self.used + 4 + 8 * u64::from(self.last_used % self.size);
        self.last_used = self.last_used.wrapping_add(1);
        Some((self.ram.read_u32(at), self.ram.read_u32(at + 4)))
    }

    /// Asks for an interrupt at the next completion; true if one arrived meanwhile (reap again).
    fn arm(&mut self) -> bool {
        if !self.event_idx {
            return false;
        }
        self.ram
            .u16(self.used_event())
            .store(self.last_used.to_le(), Ordering::Relaxed);
        fence(Ordering::SeqCst);
        u16::from_le(self.ram.u16(self.used + 2).load(Ordering::Acquire)) != self.last_used
    }
}

/// The transport's interrupt: only its eventfd matters, since virtiofsd signals it directly.
struct CallInterrupt {
    call: EventFd,
}

impl VirtioInterrupt for CallInterrupt {
    fn signal_used_queue(&self, _queue_index: u16) -> std::io::Result<()> {
        self.call.write(1)
    }
    fn signal_config_change(&self) -> std::io::Result<()> {
        Ok(())
    }
    fn direct_notifier(&self) -> Option<EventFd> {
        self.call.try_clone().ok()
    }
}

// ---- The FUSE driver -----------------------------------------------------------------------

fn fuse_request(opcode: u32, unique: u64, nodeid: u64, body: &[u8]) -> Vec<u8> {
    let mut req = Vec::with_capacity(IN_HEADER + body.len());
    req.extend_from_slice(&((IN_HEADER + body.len()) as u32).to_le_bytes());
    req.extend_from_slice(&opcode.to_le_bytes());
    req.extend_from_slice(&unique.to_le_bytes());
    req.extend_from_slice(&nodeid.to_le_bytes());
    req.extend_from_slice(&[0u8; 16]); // uid, gid, pid (root), total_extlen, padding
    req.extend_from_slice(body);
    req
}

fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}

fn le64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
}

/// What FUSE_INIT negotiated.
struct Init {
    minor: u32,
    flags: u64,
    max_write: u32,
    max_pages: u16,
}

/// Counters of one READ pass.
#[derive(Default)]
struct Pass {
    bytes: u64,
    requests: u64,
    kicks: u64,
    wakeups: u64,
    seconds: f64,
}

/// The guest side of a virtio-fs device: guest memory, the request queue, the interrupt.
struct Driver {
    ram: Ram,
    mem: GuestMemoryMmap,
    hiprio: Vq,
    req: Vq,
    call: EventFd,
    stride: u64,
    slots: usize,
    unique: u64,
}

impl Driver {
    fn new(o: &Options, slots: usize, buf: u64) -> Driver {
        let stride = buf.max(PAGE).div_ceil(PAGE) * PAGE;
        let size = (DATA + slots as u64 * stride).div_ceil(2 << 20) * (2 << 20);
        let mem = guest_memory(size);
        let ram = Ram::new(&mem, size);
        Driver {
            ram,
            hiprio: Vq::new(ram, HIPRIO_QUEUE, o.queue_size, o.event_idx),
            req: Vq::new(ram, REQUEST_QUEUE, o.queue_size, o.event_idx),
            mem,
            call: EventFd::new(0).unwrap_or_else(|e| die(&format!("eventfd: {e}"))),
            stride,
            slots,
            unique: 0,
        }
    }

    /// Makes every data page exist in the memfd (what a booted guest's RAM would be like).
    fn touch_buffers(&self) {
        for gpa in (DATA..DATA + self.slots as u64 * self.stride).step_by(PAGE as usize) {
            self.ram.write(gpa, &[0]);
        }
    }

    fn activate(&self, device: &mut VhostUserDevice) {
        let mut features = VIRTIO_F_VERSION_1;
        if self.req.event_idx {
            if device.features() & VIRTIO_RING_F_EVENT_IDX == 0 {
                die("virtiofsd does not offer EVENT_IDX (use --event-idx off)");
            }
            features |= VIRTIO_RING_F_EVENT_IDX;
        }
        device.ack_features(features);
        let interrupt = Arc::new(CallInterrupt {
            call: self
                .call
                .try_clone()
                .unwrap_or_else(|e| die(&format!("eventfd clone: {e}"))),
        });
        let queues = vec![
            self.hiprio.activated(&self.mem, HIPRIO_QUEUE),
            self.req.activated(&self.mem, REQUEST_QUEUE),
        ];
        device
            .activate(self.mem.clone(), interrupt, queues)
            .unwrap_or_else(|e| die(&format!("activation failed: {e}")));
    }

    fn data_addr(&self, slot: usize) -> u64 {
        DATA + slot as u64 * self.stride
    }

    /// Queues one request in `slot`: request (readable), out header and `reply_len` bytes of
    /// data (writable). Not published.
    fn submit(&mut self, slot: usize, request: &[u8], reply_len: u32) {
        assert!(request.len() as u64 <= REQUEST_SLOT && u64::from(reply_len) <= self.stride);
        let req_addr = REQUESTS + slot as u64 * REQUEST_SLOT;
        let out_addr = OUT_HEADERS + slot as u64 * OUT_SLOT;
        self.ram.write(req_addr, request);
        self.ram.write(out_addr, &[0u8; OUT_HEADER as usize]);
        let chain = [
            (req_addr, request.len() as u32, false),
            (out_addr, OUT_HEADER, true),
            (self.data_addr(slot), reply_len, true),
        ];
        self.req.add((slot * 3) as u16, &chain);
    }

    /// Blocks until virtiofsd signals the call eventfd.
    fn wait_call(&self) {
        if !wait_readable(self.call.as_raw_fd(), TIMEOUT) {
            die(&format!("no interrupt from virtiofsd within {TIMEOUT:?}"));
        }
        self.call
            .read()
            .unwrap_or_else(|e| die(&format!("call eventfd: {e}")));
    }

    /// Checks a completed request's out header; returns (slot, error, reply body length).
    fn complete(&self, id: u32, written: u32, unique: impl Fn(usize) -> u64) -> (usize, i32, u32) {
        if id % 3 != 0 || id as usize / 3 >= self.slots {
            die(&format!(
                "virtiofsd returned descriptor {id}, not a request head"
            ));
        }
        let slot = id as usize / 3;
        let out = self.ram.read(OUT_HEADERS + slot as u64 * OUT_SLOT, 16);
        let (len, error, uniq) = (le32(&out, 0), le32(&out, 4) as i32, le64(&out, 8));
        if written < OUT_HEADER || len != written {
            die(&format!(
                "slot {slot}: used length {written}, out header length {len}"
            ));
        }
        if uniq != unique(slot) {
            die(&format!(
                "slot {slot}: reply to request {uniq}, expected {}",
                unique(slot)
            ));
        }
        (slot, error, written - OUT_HEADER)
    }

    /// One synchronous FUSE request; returns (error, reply body).
    fn call(&mut self, opcode: u32, nodeid: u64, body: &[u8]) -> (i32, Vec<u8>) {
        self.unique += 1;
        let unique = self.unique;
        let reply_len = self.stride.min(PAGE) as u32;
        self.submit(0, &fuse_request(opcode, unique, nodeid, body), reply_len);
        self.req.publish();
        loop {
            self.wait_call();
            if let Some((id, written)) = self.req.next_used() {
                self.req.arm();
                let (slot, error, len) = self.complete(id, written, |_| unique);
                return (error, self.ram.read(self.data_addr(slot), len as usize));
            }
            self.req.arm();
        }
    }

    fn init(&mut self) -> Init {
        let mut body = Vec::new();
        let flags = FUSE_ASYNC_READ
            | FUSE_BIG_WRITES
            | FUSE_PARALLEL_DIROPS
            | FUSE_MAX_PAGES
            | FUSE_SUBMOUNTS
            | FUSE_INIT_EXT;
        // major, minor, max_readahead, flags, flags2, unused[11]
        for v in [7, FUSE_KERNEL_MINOR, 1 << 20, flags, 0] {
            body.extend_from_slice(&u32::to_le_bytes(v));
        }
        body.extend_from_slice(&[0u8; 44]);
        let (error, out) = self.call(FUSE_INIT, 0, &body);
        if error != 0 || out.len() < 40 {
            die(&format!(
                "FUSE_INIT failed: error {error}, {} bytes",
                out.len()
            ));
        }
        // major, minor, max_readahead, flags, max_background u16, congestion u16, max_write,
        // time_gran, max_pages u16, map_alignment u16, flags2
        if le32(&out, 0) != 7 {
            die(&format!("FUSE major version {}", le32(&out, 0)));
        }
        Init {
            minor: le32(&out, 4),
            flags: u64::from(le32(&out, 12)) | u64::from(le32(&out, 36)) << 32,
            max_write: le32(&out, 20),
            max_pages: u16::from_le_bytes([out[28], out[29]]),
        }
    }

    /// LOOKUP in the root directory: (node id, size).
    fn lookup(&mut self, name: &str) -> (u64, u64) {
        let mut body = name.as_bytes().to_vec();
        body.push(0);
        let (error, entry) = self.call(FUSE_LOOKUP, FUSE_ROOT_ID, &body);
        if error != 0 || entry.len() < 56 {
            die(&format!("LOOKUP {name} failed: error {error}"));
        }
        // fuse_entry_out: nodeid, generation, entry_valid, attr_valid, 2 x nsec, fuse_attr
        // (ino, size, ...).
        (le64(&entry, 0), le64(&entry, 48))
    }

    /// OPEN read-only: (file handle, open flags).
    fn open(&mut self, nodeid: u64) -> (u64, u32) {
        let mut body = (libc::O_RDONLY as u32).to_le_bytes().to_vec();
        body.extend_from_slice(&[0u8; 4]);
        let (error, out) = self.call(FUSE_OPEN, nodeid, &body);
        if error != 0 || out.len() < 12 {
            die(&format!("OPEN failed: error {error}"));
        }
        (le64(&out, 0), le32(&out, 8))
    }

    fn release(&mut self, nodeid: u64, fh: u64) {
        let mut body = fh.to_le_bytes().to_vec();
        body.extend_from_slice(&(libc::O_RDONLY as u32).to_le_bytes());
        body.extend_from_slice(&[0u8; 12]);
        let (error, _) = self.call(FUSE_RELEASE, nodeid, &body);
        if error != 0 {
            die(&format!("RELEASE failed: error {error}"));
        }
    }

    /// Reads the whole file with `bs`-byte READs, `qd` in flight. Checks every reply; with
    /// `full`, every u64 of the data, otherwise three per reply.
    fn read_file(
        &mut self,
        nodeid: u64,
        fh: u64,
        size: u64,
        bs: u64,
        qd: usize,
        full: bool,
    ) -> Pass {
        let mut pass = Pass::default();
        let kicks = self.req.kicks;
        let mut in_flight: Vec<Option<(u64, u64, u64)>> = vec![None; qd]; // offset, len, unique
        let mut free: Vec<usize> = (0..qd).rev().collect();
        let mut next = 0u64;
        let mut active = 0usize;
        let start = Instant::now();
        loop {
            // Fill every free slot.
            let mut added = false;
            while next < size {
                let Some(slot) = free.pop() else { break };
                let len = bs.min(size - next);
                self.unique += 1;
                let mut body = Vec::with_capacity(40);
                body.extend_from_slice(&fh.to_le_bytes());
                body.extend_from_slice(&next.to_le_bytes());
                body.extend_from_slice(&(len as u32).to_le_bytes());
                body.extend_from_slice(&0u32.to_le_bytes()); // read_flags
                body.extend_from_slice(&0u64.to_le_bytes()); // lock_owner
                body.extend_from_slice(&(libc::O_RDONLY as u32).to_le_bytes());
                body.extend_from_slice(&0u32.to_le_bytes());
                let req = fuse_request(FUSE_READ, self.unique, nodeid, &body);
                self.submit(slot, &req, len as u32);
                in_flight[slot] = Some((next, len, self.unique));
                next += len;
                active += 1;
                added = true;
            }
            if added {
                self.req.publish();
            }
            if active == 0 {
                break;
            }
            self.wait_call();
            pass.wakeups += 1;
            loop {
                while let Some((id, written)) = self.req.next_used() {
                    let (slot, error, got) = self.complete(id, written, |s| {
                        in_flight[s].map_or(u64::MAX, |(_, _, u)| u)
                    });
                    let (offset, len, _) = in_flight[slot].take().unwrap();
                    if error != 0 {
                        die(&format!("READ at {offset} failed: error {error}"));
                    }
                    if u64::from(got) != len {
                        die(&format!("READ at {offset}: {got} bytes, asked for {len}"));
                    }
                    self.check_data(slot, offset, len, full);
                    pass.bytes += len;
                    pass.requests += 1;
                    active -= 1;
                    free.push(slot);
                }
                if !self.req.arm() {
                    break;
                }
            }
        }
        pass.seconds = start.elapsed().as_secs_f64();
        pass.kicks = self.req.kicks - kicks;
        pass
    }

    /// The file holds its own offsets: the u64 at byte offset o is o.
    fn check_data(&self, slot: usize, offset: u64, len: u64, full: bool) {
        let base = self.data_addr(slot);
        let check = |at: u64| {
            let got = self.ram.read_u64(base + at);
            if got != offset + at {
                die(&format!(
                    "data mismatch at file offset {}: read {got:#x} (the file must hold its own offsets)",
                    offset + at
                ));
            }
        };
        if full {
            (0..len).step_by(8).for_each(check);
        } else {
            check(0);
            check(len / 2 / 8 * 8);
            check(len - 8);
        }
    }
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
