//! virtio-blk device-path throughput benchmark: no guest, no KVM, no vCPU.
//!
//! This program plays the guest driver. It lays out a 256-entry split virtqueue by hand in a
//! `GuestMemoryMmap`, activates a real `devices::virtio::block::Block` on a file, and keeps
//! `--qd` requests in flight through it:
//!
//! ```text
//! driver: descriptors + header -> avail ring -> fence -> avail idx -> kick eventfd write
//!   device worker thread: epoll wakes -> pops chains -> preadv/pwritev on the file
//!                         -> used ring -> interrupt (an eventfd write)
//! driver: blocking eventfd read -> reaps the used ring, checks every status byte -> resubmits
//! ```
//!
//! In the VMM the kick eventfd is a KVM ioeventfd (the guest's QueueNotify write) and the
//! interrupt eventfd an irqfd; here both are plain eventfds, so the cost of the VM exit per
//! kick is not included. With EVENT_IDX (the default, as Linux negotiates it) the driver
//! follows the spec's suppression rules both ways: it kicks only when `avail_event` asks for
//! it (`vring_need_event`) and publishes `used_event` = the last used index it has seen, so
//! the device interrupts as soon as something new completes.
//!
//! Usage (all options have defaults; `cargo bench` runs it on a temporary 64 MiB file):
//!
//! ```text
//! blk_path [--file PATH] [--workload randread|randwrite|seqread|seqwrite] [--bs BYTES]
//!          [--qd N] [--seconds S] [--warmup S] [--direct] [--event-idx on|off]
//! ```
//!
//! Prints one JSON line: IOPS, MB/s (10^6 bytes), process CPU per request (getrusage of the
//! whole process: driver thread + device worker thread), kicks and interrupts per request,
//! and latency from submission to reaping.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::process::exit;
use std::sync::atomic::{fence, AtomicU16, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use devices::virtio::block::config::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_SEG_MAX,
};
use devices::virtio::block::{Block, BlockConfig};
use devices::virtio::{
    ActivatedQueue, VirtioDevice, VirtioInterrupt, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX,
};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

// ---- Guest memory layout (all fixed guest-physical addresses) -------------------------------

const QUEUE_SIZE: u16 = 256;
/// Descriptor table: 16 bytes per entry, 16-byte aligned.
const DESC_TABLE: u64 = 0x0;
/// Available ring: flags, idx, ring[QUEUE_SIZE], used_event. 2-byte aligned.
const AVAIL_RING: u64 = 0x1000;
/// Used ring: flags, idx, ring[QUEUE_SIZE] of {id: u32, len: u32}, avail_event. 4-byte aligned.
const USED_RING: u64 = 0x2000;
/// Request headers, 16 bytes per slot.
const HEADERS: u64 = 0x4000;
/// Status bytes, one per slot.
const STATUSES: u64 = 0x6000;
/// Data buffers, one per slot, page aligned.
const DATA: u64 = 0x10_0000;

const AVAIL_IDX: u64 = AVAIL_RING + 2;
const AVAIL_ENTRIES: u64 = AVAIL_RING + 4;
const USED_EVENT: u64 = AVAIL_RING + 4 + 2 * QUEUE_SIZE as u64;
const USED_FLAGS: u64 = USED_RING;
const USED_IDX: u64 = USED_RING + 2;
const USED_ENTRIES: u64 = USED_RING + 4;
const AVAIL_EVENT: u64 = USED_RING + 4 + 8 * QUEUE_SIZE as u64;

/// Every request is header + data + status: three descriptors, so this many fit in the table.
const MAX_QD: usize = QUEUE_SIZE as usize / 3;

// virtio constants (virtio 1.2, 2.7 and 5.2.6).
const VIRTQ_DESC_F_NEXT: u16 = 1;
const VIRTQ_DESC_F_WRITE: u16 = 2;
const VIRTQ_USED_F_NO_NOTIFY: u16 = 1;
const VIRTIO_BLK_T_IN: u32 = 0;
const VIRTIO_BLK_T_OUT: u32 = 1;
const STATUS_UNSET: u8 = 0xff;

/// Random offsets are multiples of this.
const RAND_ALIGN: u64 = 4096;
/// Latency histogram: 100 ns buckets up to 50 ms, then one overflow bucket.
const LAT_BUCKET_NS: u64 = 100;
const LAT_BUCKETS: usize = 500_000;

// ---- Options ---------------------------------------------------------------------------------

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Workload {
    RandRead,
    RandWrite,
    SeqRead,
    SeqWrite,
}

impl Workload {
    fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "randread" => Self::RandRead,
            "randwrite" => Self::RandWrite,
            "seqread" => Self::SeqRead,
            "seqwrite" => Self::SeqWrite,
            _ => return None,
        })
    }
    fn name(self) -> &'static str {
        match self {
            Self::RandRead => "randread",
            Self::RandWrite => "randwrite",
            Self::SeqRead => "seqread",
            Self::SeqWrite => "seqwrite",
        }
    }
    fn is_read(self) -> bool {
        matches!(self, Self::RandRead | Self::SeqRead)
    }
    fn is_random(self) -> bool {
        matches!(self, Self::RandRead | Self::RandWrite)
    }
}

struct Options {
    file: Option<String>,
    workload: Workload,
    bs: u64,
    qd: usize,
    seconds: f64,
    warmup: f64,
    direct: bool,
    event_idx: bool,
}

const USAGE: &str =
    "usage: blk_path [--file PATH] [--workload randread|randwrite|seqread|seqwrite] \
[--bs BYTES] [--qd N] [--seconds S] [--warmup S] [--direct] [--event-idx on|off]
Without --file, runs on a temporary 64 MiB file.";

fn die(msg: &str) -> ! {
    eprintln!("blk_path: {msg}");
    exit(2)
}

fn parse_args() -> Options {
    let mut o = Options {
        file: None,
        workload: Workload::RandRead,
        bs: 4096,
        qd: 32,
        seconds: 1.0,
        warmup: 0.5,
        direct: false,
        event_idx: true,
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        // Accept both `--opt value` and `--opt=value`.
        let (name, inline) = match arg.split_once('=') {
            Some((n, v)) if n.starts_with("--") => (n.to_owned(), Some(v.to_owned())),
            _ => (arg.clone(), None),
        };
        let mut value = |what: &str| -> String {
            inline
                .clone()
                .or_else(|| args.next())
                .unwrap_or_else(|| die(&format!("{name} needs {what}\n{USAGE}")))
        };
        match name.as_str() {
            "--file" => o.file = Some(value("a path")),
            "--workload" => {
                let v = value("a workload");
                o.workload =
                    Workload::parse(&v).unwrap_or_else(|| die(&format!("bad workload {v}")));
            }
            "--bs" => o.bs = parse_size(&value("a size")),
            "--qd" => {
                o.qd = value("a number")
                    .parse()
                    .unwrap_or_else(|_| die("bad --qd"))
            }
            "--seconds" => {
                o.seconds = value("seconds")
                    .parse()
                    .unwrap_or_else(|_| die("bad --seconds"))
            }
            "--warmup" => {
                o.warmup = value("seconds")
                    .parse()
                    .unwrap_or_else(|_| die("bad --warmup"))
            }
            "--direct" => o.direct = true,
            "--event-idx" => {
                o.event_idx = match value("on or off").as_str() {
                    "on" => true,
                    "off" => false,
                    v => die(&format!("--event-idx takes on or off, not {v}")),
                }
            }
            // `cargo bench` passes --bench to harness = false benches.
            "--bench" => {}
            "-h" | "--help" => {
                println!("{USAGE}");
                exit(0)
            }
            _ => die(&format!("unknown argument {arg}\n{USAGE}")),
        }
    }
    if o.bs == 0 || o.bs % 512 != 0 || o.bs > u64::from(u32::MAX) - 1 {
        die("--bs must be a non-zero multiple of 512 below 4 GiB");
    }
    if o.qd == 0 || o.qd > MAX_QD {
        die(&format!(
            "--qd must be 1..={MAX_QD} (3 descriptors per request, {QUEUE_SIZE} descriptors)"
        ));
    }
    if !o.seconds.is_finite() || o.seconds <= 0.0 || !o.warmup.is_finite() || o.warmup < 0.0 {
        die("--seconds must be > 0 and --warmup >= 0");
    }
    o
}

/// `4096`, `4k`, `128K`, `1m`.
fn parse_size(s: &str) -> u64 {
    let lower = s.to_ascii_lowercase();
    let (num, mult) = match lower.strip_suffix(['k', 'm']) {
        Some(n) if lower.ends_with('k') => (n, 1024),
        Some(n) => (n, 1024 * 1024),
        None => (lower.as_str(), 1),
    };
    num.parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .unwrap_or_else(|| die(&format!("bad size {s}")))
}

// ---- The interrupt: an eventfd, like the irqfd the VMM gives the device ----------------------

struct EventFdInterrupt {
    fd: EventFd,
    count: AtomicU64,
}

impl VirtioInterrupt for EventFdInterrupt {
    fn signal_used_queue(&self, _queue_index: u16) -> std::io::Result<()> {
        self.count.fetch_add(1, Ordering::Relaxed);
        self.fd.write(1)
    }
    fn signal_config_change(&self) -> std::io::Result<()> {
        self.fd.write(1)
    }
}

// ---- Helpers -------------------------------------------------------------------------------

/// wyrand: a fast, good-enough 64-bit PRNG.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0xa076_1d64_78bd_642f);
        let t = u128::from(self.0) * u128::from(self.0 ^ 0xe703_7ed1_a0b4_28db);
        ((t >> 64) ^ t) as u64
    }
    /// Uniform in 0..n (multiply-high, no division).
    fn below(&mut self, n: u64) -> u64 {
        ((u128::from(self.next()) * u128::from(n)) >> 64) as u64
    }
}

/// (user, system) CPU time of the whole process, in seconds.
fn cpu_times() -> (f64, f64) {
    // SAFETY: getrusage only writes the struct we pass.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: valid pointer to a rusage.
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) } != 0 {
        die("getrusage failed");
    }
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 * 1e-6;
    (tv(ru.ru_utime), tv(ru.ru_stime))
}

/// `vring_need_event` (virtio 1.2, 2.7.10): whether moving the index from `old` to `new`
/// crossed `event`.
fn need_event(event: u16, new: u16, old: u16) -> bool {
    new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
}

fn percentile(hist: &[u64], total: u64, p: f64) -> f64 {
    if total == 0 {
        return 0.0;
    }
    let target = ((total as f64) * p).ceil().max(1.0) as u64;
    let mut seen = 0;
    for (i, &n) in hist.iter().enumerate() {
        seen += n;
        if seen >= target {
            return ((i as u64 + 1) * LAT_BUCKET_NS) as f64 / 1000.0;
        }
    }
    (hist.len() as u64 * LAT_BUCKET_NS) as f64 / 1000.0
}

/// The inside of a JSON string literal.
fn json_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out
}

fn gm<T, E: std::fmt::Display>(r: Result<T, E>) -> T {
    r.unwrap_or_else(|e| die(&format!("guest memory access failed: {e}")))
}

// ---- The driver ----------------------------------------------------------------------------

/// Counters for one measurement window.
#[derive(Default, Clone, Copy)]
struct Tally {
    ios: u64,
    bytes: u64,
    kicks: u64,
    lat_sum_ns: u64,
}

/// The driver's direct view of guest RAM, as a guest kernel has it: plain loads and stores at
/// host addresses (going through vm-memory's bounds-checked accessors for every ring field
/// would make this "guest" several times slower than a real one, and it sits on the critical
/// path of every batch). One region, mapped for the life of the run.
struct Ram {
    base: *mut u8,
    len: u64,
}

impl Ram {
    fn new(mem: &GuestMemoryMmap, len: u64) -> Self {
        // The region starts at guest address 0 and is `len` bytes long.
        let base = mem
            .get_host_address(GuestAddress(0))
            .unwrap_or_else(|e| die(&format!("guest memory has no host mapping: {e}")));
        Ram { base, len }
    }

    /// Host pointer to `size` bytes at guest address `gpa`, aligned for `align`.
    fn ptr(&self, gpa: u64, size: u64, align: u64) -> *mut u8 {
        assert!(gpa + size <= self.len && gpa % align == 0);
        // SAFETY: in bounds of the mapping (checked above).
        unsafe { self.base.add(gpa as usize) }
    }

    /// A 16-bit ring field, accessed atomically (the device reads it concurrently).
    fn u16(&self, gpa: u64) -> &AtomicU16 {
        // SAFETY: in bounds, 2-byte aligned, and the mapping outlives `self`; the device only
        // accesses these fields atomically (vm-memory load/store) or after an acquire.
        unsafe { AtomicU16::from_ptr(self.ptr(gpa, 2, 2).cast()) }
    }

    fn write(&self, gpa: u64, bytes: &[u8]) {
        let dst = self.ptr(gpa, bytes.len() as u64, 1);
        // SAFETY: in bounds; the device does not read these bytes until the request is
        // published with a release store of avail idx.
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), dst, bytes.len()) }
    }

    fn read_u8(&self, gpa: u64) -> u8 {
        // SAFETY: in bounds; the device wrote it before its release store of used idx, which
        // we loaded with acquire.
        unsafe { std::ptr::read_volatile(self.ptr(gpa, 1, 1)) }
    }

    fn read_u64(&self, gpa: u64) -> u64 {
        // SAFETY: as for read_u8 (used ring entries are only 4-byte aligned: read bytes).
        u64::from_le_bytes(unsafe {
            std::ptr::read_volatile(self.ptr(gpa, 8, 4).cast::<[u8; 8]>())
        })
    }
}

struct Driver {
    ram: Ram,
    workload: Workload,
    bs: u64,
    event_idx: bool,
    /// Number of 4 KiB-aligned offsets a random request may start at.
    rand_slots: u64,
    /// File size rounded down to a multiple of bs (sequential wrap point).
    seq_end: u64,
    seq_next: u64,
    rng: Rng,
    /// Driver's copy of avail idx (what it has published or is about to).
    avail_idx: u16,
    /// avail idx at the previous kick decision (vring_need_event's `old`).
    kicked_idx: u16,
    last_used: u16,
    in_flight: usize,
    submitted_at: Vec<Instant>,
    kick: EventFd,
    tally: Tally,
    hist: Vec<u64>,
}

impl Driver {
    fn header_addr(slot: usize) -> u64 {
        HEADERS + 16 * slot as u64
    }
    fn status_addr(slot: usize) -> u64 {
        STATUSES + slot as u64
    }
    fn data_addr(&self, slot: usize) -> u64 {
        DATA + slot as u64 * data_stride(self.bs)
    }

    fn next_offset(&mut self) -> u64 {
        if self.workload.is_random() {
            self.rng.below(self.rand_slots) * RAND_ALIGN
        } else {
            let off = self.seq_next;
            self.seq_next += self.bs;
            if self.seq_next >= self.seq_end {
                self.seq_next = 0;
            }
            off
        }
    }

    /// Writes one request (header, status, three descriptors) for `slot` and its avail ring
    /// entry. The device cannot see it before `publish_and_kick`.
    fn submit(&mut self, slot: usize, now: Instant) {
        let offset = self.next_offset();
        let head = (slot * 3) as u16;
        let (req_type, data_flags) = if self.workload.is_read() {
            (VIRTIO_BLK_T_IN, VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_WRITE)
        } else {
            (VIRTIO_BLK_T_OUT, VIRTQ_DESC_F_NEXT)
        };
        // Header: le32 type, le32 reserved, le64 sector.
        let mut header = [0u8; 16];
        header[0..4].copy_from_slice(&req_type.to_le_bytes());
        header[8..16].copy_from_slice(&(offset >> 9).to_le_bytes());
        self.ram.write(Self::header_addr(slot), &header);
        self.ram.write(Self::status_addr(slot), &[STATUS_UNSET]);
        // Three descriptors: le64 addr, le32 len, le16 flags, le16 next.
        let descs = [
            (Self::header_addr(slot), 16u32, VIRTQ_DESC_F_NEXT, head + 1),
            (self.data_addr(slot), self.bs as u32, data_flags, head + 2),
            (Self::status_addr(slot), 1, VIRTQ_DESC_F_WRITE, 0),
        ];
        let mut table = [0u8; 48];
        for (i, (addr, len, flags, next)) in descs.into_iter().enumerate() {
            let d = &mut table[i * 16..i * 16 + 16];
            d[0..8].copy_from_slice(&addr.to_le_bytes());
            d[8..12].copy_from_slice(&len.to_le_bytes());
            d[12..14].copy_from_slice(&flags.to_le_bytes());
            d[14..16].copy_from_slice(&next.to_le_bytes());
        }
        self.ram.write(DESC_TABLE + 16 * u64::from(head), &table);
        // The avail ring entry; the index follows in publish_and_kick, after a fence.
        let ring_pos = u64::from(self.avail_idx % QUEUE_SIZE);
        self.ram
            .u16(AVAIL_ENTRIES + 2 * ring_pos)
            .store(head.to_le(), Ordering::Relaxed);
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.submitted_at[slot] = now;
        self.in_flight += 1;
    }

    /// Makes submitted requests visible and kicks if the device wants it.
    fn publish_and_kick(&mut self) {
        fence(Ordering::Release);
        self.ram
            .u16(AVAIL_IDX)
            .store(self.avail_idx.to_le(), Ordering::Release);
        // The index store must be visible before we read the device's suppression state
        // (virtio_mb in Linux's virtqueue_kick_prepare).
        fence(Ordering::SeqCst);
        let kick = if self.event_idx {
            let avail_event = u16::from_le(self.ram.u16(AVAIL_EVENT).load(Ordering::Relaxed));
            need_event(avail_event, self.avail_idx, self.kicked_idx)
        } else {
            let flags = u16::from_le(self.ram.u16(USED_FLAGS).load(Ordering::Relaxed));
            flags & VIRTQ_USED_F_NO_NOTIFY == 0
        };
        self.kicked_idx = self.avail_idx;
        if kick {
            self.tally.kicks += 1;
            if let Err(e) = self.kick.write(1) {
                die(&format!("kick eventfd write failed: {e}"));
            }
        }
    }

    /// Reaps every used entry, checking status and length; pushes the freed slots to `done`.
    fn reap(&mut self, done: &mut Vec<usize>, now: Instant) {
        let want_len = if self.workload.is_read() {
            self.bs as u32 + 1
        } else {
            1
        };
        loop {
            let used_idx = u16::from_le(self.ram.u16(USED_IDX).load(Ordering::Acquire));
            while self.last_used != used_idx {
                let pos = u64::from(self.last_used % QUEUE_SIZE);
                let elem = self.ram.read_u64(USED_ENTRIES + 8 * pos);
                let (id, len) = (elem as u32, (elem >> 32) as u32);
                if id % 3 != 0 || id as usize / 3 >= self.submitted_at.len() {
                    die(&format!(
                        "the device returned descriptor {id}, not a request head"
                    ));
                }
                let slot = id as usize / 3;
                let status = self.ram.read_u8(Self::status_addr(slot));
                if status != 0 {
                    die(&format!(
                        "request in slot {slot} completed with status {status}"
                    ));
                }
                if len != want_len {
                    die(&format!("used length {len}, expected {want_len}"));
                }
                let lat = now
                    .saturating_duration_since(self.submitted_at[slot])
                    .as_nanos() as u64;
                self.tally.ios += 1;
                self.tally.bytes += self.bs;
                self.tally.lat_sum_ns += lat;
                let bucket = ((lat / LAT_BUCKET_NS) as usize).min(LAT_BUCKETS);
                self.hist[bucket] += 1;
                self.in_flight -= 1;
                self.last_used = self.last_used.wrapping_add(1);
                done.push(slot);
            }
            if !self.event_idx {
                return;
            }
            // Ask for an interrupt on the next completion, then look again: a completion
            // that raced with this store would otherwise never be signalled.
            self.ram
                .u16(USED_EVENT)
                .store(self.last_used.to_le(), Ordering::Relaxed);
            fence(Ordering::SeqCst);
            let again = u16::from_le(self.ram.u16(USED_IDX).load(Ordering::Acquire));
            if again == self.last_used {
                return;
            }
        }
    }
}

/// Bytes between two data buffers: bs rounded up to a page.
fn data_stride(bs: u64) -> u64 {
    bs.div_ceil(4096) * 4096
}

fn open_disk(path: &str, direct: bool) -> File {
    let mut oo = OpenOptions::new();
    oo.read(true).write(true);
    if direct {
        oo.custom_flags(libc::O_DIRECT);
    }
    oo.open(path)
        .unwrap_or_else(|e| die(&format!("cannot open {path}: {e}")))
}

fn main() {
    let o = parse_args();

    // Without --file (plain `cargo bench`), use a temporary 64 MiB file of non-zero data.
    let _tmp;
    let path = match &o.file {
        Some(p) => p.clone(),
        None => {
            let mut t = tempfile::NamedTempFile::new()
                .unwrap_or_else(|e| die(&format!("cannot create a temporary file: {e}")));
            let chunk = vec![0x5au8; 1 << 20];
            for _ in 0..64 {
                t.write_all(&chunk)
                    .unwrap_or_else(|e| die(&format!("cannot fill the temporary file: {e}")));
            }
            let p = t.path().to_string_lossy().into_owned();
            _tmp = t;
            p
        }
    };
    let file = open_disk(&path, o.direct);
    let size = file
        .metadata()
        .unwrap_or_else(|e| die(&format!("cannot stat {path}: {e}")))
        .len();
    if size < o.bs.max(RAND_ALIGN) {
        die(&format!("{path} is {size} bytes, smaller than one request"));
    }

    // Guest memory: rings and headers in the first MiB, then one buffer per slot; filled
    // with a pattern so writes carry non-zero data.
    let mem_size = DATA + o.qd as u64 * data_stride(o.bs);
    let mem_size = mem_size.div_ceil(1 << 21) << 21;
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), mem_size as usize)])
        .unwrap_or_else(|e| die(&format!("cannot map guest memory: {e}")));
    let pattern: Vec<u8> = (0..data_stride(o.bs))
        .map(|i| (i as u8) ^ 0xa5 | 1)
        .collect();
    for slot in 0..o.qd {
        gm(mem.write_slice(
            &pattern,
            GuestAddress(DATA + slot as u64 * data_stride(o.bs)),
        ));
    }

    // The device, configured as the VMM would for a writable disk.
    let mut block = Block::new(BlockConfig {
        file,
        read_only: false,
        serial: Some("bench".into()),
        direct: o.direct,
        queue_size: QUEUE_SIZE,
    })
    .unwrap_or_else(|e| die(&format!("cannot create the block device: {e}")));
    let mut features =
        VIRTIO_F_VERSION_1 | VIRTIO_BLK_F_FLUSH | VIRTIO_BLK_F_SEG_MAX | VIRTIO_BLK_F_BLK_SIZE;
    if o.event_idx {
        features |= VIRTIO_RING_F_EVENT_IDX;
    }
    if block.features() & features != features {
        die(&format!(
            "the device does not offer the features {:#x}",
            features & !block.features()
        ));
    }
    block.ack_features(features);

    // The queue as the transport would set it up from the driver's register writes.
    let mut queue =
        Queue::new(QUEUE_SIZE).unwrap_or_else(|e| die(&format!("cannot create the queue: {e}")));
    queue.set_size(QUEUE_SIZE);
    let split = |a: u64| (Some(a as u32), Some((a >> 32) as u32));
    let (lo, hi) = split(DESC_TABLE);
    queue.set_desc_table_address(lo, hi);
    let (lo, hi) = split(AVAIL_RING);
    queue.set_avail_ring_address(lo, hi);
    let (lo, hi) = split(USED_RING);
    queue.set_used_ring_address(lo, hi);
    queue.set_event_idx(o.event_idx);
    queue.set_ready(true);
    if !queue.is_valid(&mem) {
        die("the hand-made queue layout is invalid");
    }

    let kick = EventFd::new(EFD_NONBLOCK).unwrap_or_else(|e| die(&format!("eventfd: {e}")));
    let irq = Arc::new(EventFdInterrupt {
        fd: EventFd::new(0).unwrap_or_else(|e| die(&format!("eventfd: {e}"))),
        count: AtomicU64::new(0),
    });
    let device_kick = kick
        .try_clone()
        .unwrap_or_else(|e| die(&format!("eventfd clone: {e}")));
    block
        .activate(
            mem.clone(),
            irq.clone(),
            vec![ActivatedQueue {
                index: 0,
                queue,
                kick: device_kick,
            }],
        )
        .unwrap_or_else(|e| die(&format!("activation failed: {e}")));

    let start_now = Instant::now();
    let seq_end = size / o.bs * o.bs;
    let mut d = Driver {
        ram: Ram::new(&mem, mem_size),
        workload: o.workload,
        bs: o.bs,
        event_idx: o.event_idx,
        rand_slots: (size - o.bs) / RAND_ALIGN + 1,
        seq_end,
        seq_next: 0,
        rng: Rng(0x9e37_79b9_7f4a_7c15 ^ u64::from(std::process::id())),
        avail_idx: 0,
        kicked_idx: 0,
        last_used: 0,
        in_flight: 0,
        submitted_at: vec![start_now; o.qd],
        kick,
        tally: Tally::default(),
        hist: vec![0; LAT_BUCKETS + 1],
    };

    // Fill the queue, then keep it full.
    for slot in 0..o.qd {
        d.submit(slot, start_now);
    }
    d.publish_and_kick();

    let warmup_end = start_now + Duration::from_secs_f64(o.warmup);
    let run_len = Duration::from_secs_f64(o.seconds);
    let mut measuring = false;
    let mut measure_start = start_now;
    let mut end = start_now;
    let mut cpu_start = (0.0, 0.0);
    let mut irq_start = 0;
    let mut result = None;
    let mut done = Vec::with_capacity(o.qd);
    while d.in_flight > 0 {
        // Sleep until the device interrupts (the eventfd counter keeps signals that came
        // while we were busy, so none is lost).
        if let Err(e) = irq.fd.read() {
            die(&format!("interrupt eventfd read failed: {e}"));
        }
        let now = Instant::now();
        if !measuring && result.is_none() && now >= warmup_end {
            // Open the measurement window; forget the warm-up.
            measuring = true;
            measure_start = now;
            end = now + run_len;
            cpu_start = cpu_times();
            irq_start = irq.count.load(Ordering::Relaxed);
            d.tally = Tally::default();
            d.hist.iter_mut().for_each(|b| *b = 0);
        }
        done.clear();
        d.reap(&mut done, now);
        if measuring && now >= end {
            // Close the window at the first wake-up past its end. The requests still in
            // flight are drained below without being counted.
            measuring = false;
            let elapsed = now.duration_since(measure_start).as_secs_f64();
            let cpu_end = cpu_times();
            result = Some((
                elapsed,
                cpu_end.0 - cpu_start.0,
                cpu_end.1 - cpu_start.1,
                d.tally,
                irq.count.load(Ordering::Relaxed) - irq_start,
                percentile(&d.hist, d.tally.ios, 0.50),
                percentile(&d.hist, d.tally.ios, 0.99),
            ));
        }
        if result.is_none() && !done.is_empty() {
            for &slot in &done {
                d.submit(slot, now);
            }
            d.publish_and_kick();
        }
    }
    // Stop the worker before reporting (it hands the disk back).
    drop(block);

    let Some((elapsed, usr, sys, t, irqs, p50, p99)) = result else {
        die("the run ended before the measurement window closed");
    };
    let ios = t.ios.max(1) as f64;
    println!(
        concat!(
            "{{\"file\":\"{}\",\"workload\":\"{}\",\"bs\":{},\"qd\":{},\"direct\":{},",
            "\"event_idx\":{},\"seconds\":{:.3},\"ios\":{},\"iops\":{:.0},\"mb_s\":{:.1},",
            "\"cpu_us_per_req\":{:.3},\"usr_s\":{:.3},\"sys_s\":{:.3},\"cpu_util\":{:.3},",
            "\"kicks_per_req\":{:.4},\"irqs_per_req\":{:.4},",
            "\"lat_us_avg\":{:.2},\"lat_us_p50\":{:.1},\"lat_us_p99\":{:.1}}}"
        ),
        json_escape(&path),
        o.workload.name(),
        o.bs,
        o.qd,
        o.direct,
        o.event_idx,
        elapsed,
        t.ios,
        t.ios as f64 / elapsed,
        t.bytes as f64 / elapsed / 1e6,
        (usr + sys) * 1e6 / ios,
        usr,
        sys,
        (usr + sys) / elapsed,
        t.kicks as f64 / ios,
        irqs as f64 / ios,
        t.lat_sum_ns as f64 / ios / 1000.0,
        p50,
        p99,
    );
}
