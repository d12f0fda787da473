//! virtio-net transmit-path throughput benchmark: no guest, no KVM, no vCPU.
//!
//! Mode `virtio` plays the guest driver for a real `devices::virtio::net::Net` on a tap: it
//! lays out the receive queue (0, never given buffers) and the transmit queue (1) by hand in
//! a `GuestMemoryMmap`, negotiates VERSION_1 | EVENT_IDX (no offloads: plain frames), and
//! keeps the transmit ring full of chains of two descriptors, a zeroed 12-byte
//! `virtio_net_hdr_v1` and one Ethernet frame (broadcast, ethertype 0x88b5):
//!
//! ```text
//! driver: descriptors -> avail ring -> fence -> avail idx -> kick eventfd (if avail_event asks)
//!   device worker thread: epoll wakes -> pops chains -> one writev per frame to the tap
//!                         -> used ring -> interrupt (an eventfd write)
//! driver: blocking eventfd read -> reaps the used ring -> resubmits the freed slots
//! ```
//!
//! Mode `raw` is the baseline: one thread writing [vnet header + frame] to a second fd on the
//! same tap with write(2), as fast as it can.
//!
//! ```text
//! net_path --tap NAME [--frame-size N] [--seconds S] [--warmup S] [--mode virtio|raw]
//! ```
//!
//! Prints one JSON line: frames/s, Gbit/s (frame bytes, without the vnet header; 10^9 bit/s),
//! CPU µs per frame (getrusage of the whole process: driver + device worker thread in mode
//! virtio), and in mode virtio kicks and interrupts per frame and the device's counters.

use std::io;
use std::os::fd::AsRawFd;
use std::process::exit;
use std::sync::atomic::{fence, AtomicU16, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use devices::virtio::net::{Net, NetConfig, Tap, MAX_FRAME_LEN, VNET_HDR_LEN};
use devices::virtio::{
    ActivatedQueue, VirtioDevice, VirtioInterrupt, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX,
};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

// ---- Guest memory layout ---------------------------------------------------------------------

const QUEUE_SIZE: u16 = 256;
/// Transmit queue (1): descriptor table, avail ring, used ring.
const TX_DESC: u64 = 0x0;
const TX_AVAIL: u64 = 0x1000;
const TX_USED: u64 = 0x2000;
/// Receive queue (0): valid rings that never get a buffer.
const RX_DESC: u64 = 0x4000;
const RX_AVAIL: u64 = 0x5000;
const RX_USED: u64 = 0x6000;
/// vnet headers, 16 bytes apart (one per slot).
const HEADERS: u64 = 0x8000;
/// Frames, one per slot, page-aligned.
const FRAMES: u64 = 0x10_0000;

const TX_AVAIL_IDX: u64 = TX_AVAIL + 2;
const TX_AVAIL_RING: u64 = TX_AVAIL + 4;
const TX_USED_EVENT: u64 = TX_AVAIL + 4 + 2 * QUEUE_SIZE as u64;
const TX_USED_IDX: u64 = TX_USED + 2;
const TX_USED_RING: u64 = TX_USED + 4;
const TX_AVAIL_EVENT: u64 = TX_USED + 4 + 8 * QUEUE_SIZE as u64;

/// Two descriptors per frame.
const SLOTS: usize = QUEUE_SIZE as usize / 2;

const VIRTQ_DESC_F_NEXT: u16 = 1;
const ETHERTYPE: u16 = 0x88b5;
const MAC: [u8; 6] = [0x02, 0x6d, 0x76, 0x6d, 0x6d, 0x01];
/// Smallest frame accepted (Ethernet minimum without FCS).
const MIN_FRAME: usize = 60;

// ---- Options ---------------------------------------------------------------------------------

#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    Virtio,
    Raw,
}

struct Options {
    tap: Option<String>,
    frame_size: usize,
    seconds: f64,
    warmup: f64,
    mode: Mode,
}

const USAGE: &str = "usage: net_path --tap NAME [--frame-size BYTES] [--seconds S] [--warmup S] \
[--mode virtio|raw]
Sends frames (Ethernet, without the 12-byte vnet header) to the tap for S seconds.
Without --tap (plain `cargo bench`) it prints a note and exits 0: it needs a tap.";

fn die(msg: &str) -> ! {
    eprintln!("net_path: {msg}");
    exit(2)
}

fn parse_args() -> Options {
    let mut o = Options {
        tap: None,
        frame_size: 1514,
        seconds: 2.0,
        warmup: 0.3,
        mode: Mode::Virtio,
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let (name, inline) = match arg.split_once('=') {
            Some((n, v)) if n.starts_with("--") => (n.to_owned(), Some(v.to_owned())),
            _ => (arg.clone(), None),
        };
        let mut value = || -> String {
            inline
                .clone()
                .or_else(|| args.next())
                .unwrap_or_else(|| die(&format!("{name} needs a value\n{USAGE}")))
        };
        let num = |v: String, what: &str| -> f64 {
            v.parse()
                .unwrap_or_else(|_| die(&format!("bad {what}: {v}")))
        };
        match name.as_str() {
            "--tap" => o.tap = Some(value()),
            "--frame-size" => {
                let v = value();
                o.frame_size = v
                    .parse()
                    .unwrap_or_else(|_| die(&format!("bad --frame-size {v}")))
            }
            "--seconds" => o.seconds = num(value(), "--seconds"),
            "--warmup" => o.warmup = num(value(), "--warmup"),
            "--mode" => {
                o.mode = match value().as_str() {
                    "virtio" => Mode::Virtio,
                    "raw" => Mode::Raw,
                    v => die(&format!("--mode takes virtio or raw, not {v}")),
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
    if !(MIN_FRAME..=MAX_FRAME_LEN).contains(&o.frame_size) {
        die(&format!(
            "--frame-size must be {MIN_FRAME}..={MAX_FRAME_LEN}"
        ));
    }
    if !o.seconds.is_finite() || o.seconds <= 0.0 || !o.warmup.is_finite() || o.warmup < 0.0 {
        die("--seconds must be > 0 and --warmup >= 0");
    }
    o
}

// ---- Helpers -------------------------------------------------------------------------------

/// User + system CPU time of the whole process, in seconds.
fn cpu_seconds() -> f64 {
    // SAFETY: an all-zero rusage is valid; getrusage only writes it.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: valid pointer to a rusage.
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) } != 0 {
        die("getrusage failed");
    }
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 * 1e-6;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// `vring_need_event` (virtio 1.2, 2.7.10).
fn need_event(event: u16, new: u16, old: u16) -> bool {
    new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
}

/// A broadcast Ethernet frame of `len` bytes from `MAC` with the local-experimental ethertype.
fn eth_frame(len: usize) -> Vec<u8> {
    let mut f = Vec::with_capacity(len);
    f.extend_from_slice(&[0xff; 6]);
    f.extend_from_slice(&MAC);
    f.extend_from_slice(&ETHERTYPE.to_be_bytes());
    f.extend((0..len - 14).map(|i| (i as u8) ^ 0x5a));
    f
}

/// Result of one measurement window.
struct Measured {
    seconds: f64,
    frames: u64,
    cpu_s: f64,
}

fn tap_name(o: &Options) -> String {
    o.tap.clone().unwrap_or_else(|| die("--tap is required"))
}

fn open_tap(name: &str) -> Tap {
    Tap::open_named(name).unwrap_or_else(|e| die(&format!("{e}")))
}

// ---- Mode raw --------------------------------------------------------------------------------

fn run_raw(o: &Options) -> (Measured, u64) {
    let tap = open_tap(&tap_name(o));
    let mut packet = vec![0u8; VNET_HDR_LEN];
    packet.extend_from_slice(&eth_frame(o.frame_size));
    let fd = tap.as_raw_fd();
    let mut errors = 0u64;
    let mut send = || {
        // SAFETY: writes from a live buffer of the given length.
        let n = unsafe { libc::write(fd, packet.as_ptr().cast(), packet.len()) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::WouldBlock {
                errors += 1;
                if errors == 1 {
                    eprintln!("net_path: tap write failed: {e}");
                }
            }
            false
        } else {
            true
        }
    };
    // Check the clock every BATCH writes.
    const BATCH: u64 = 64;
    let warm_end = Instant::now() + Duration::from_secs_f64(o.warmup);
    while Instant::now() < warm_end {
        for _ in 0..BATCH {
            send();
        }
    }
    let cpu0 = cpu_seconds();
    let start = Instant::now();
    let end = start + Duration::from_secs_f64(o.seconds);
    let mut frames = 0;
    let mut now = start;
    while now < end {
        for _ in 0..BATCH {
            if send() {
                frames += 1;
            }
        }
        now = Instant::now();
    }
    let m = Measured {
        seconds: now.duration_since(start).as_secs_f64(),
        frames,
        cpu_s: cpu_seconds() - cpu0,
    };
    (m, errors)
}

// ---- Mode virtio -----------------------------------------------------------------------------

struct EventFdInterrupt {
    fd: EventFd,
    count: AtomicU64,
}

impl VirtioInterrupt for EventFdInterrupt {
    fn signal_used_queue(&self, _queue_index: u16) -> io::Result<()> {
        self.count.fetch_add(1, Ordering::Relaxed);
        self.fd.write(1)
    }
    fn signal_config_change(&self) -> io::Result<()> {
        self.fd.write(1)
    }
}

/// The driver's view of guest RAM: plain loads/stores at host addresses, as a guest kernel
/// has it, for the ring fields on the hot path.
struct Ram {
    base: *mut u8,
    len: u64,
}

impl Ram {
    fn at(&self, gpa: u64, size: u64, align: u64) -> *mut u8 {
        assert!(gpa + size <= self.len && gpa % align == 0);
        // SAFETY: in bounds of the single mapping (checked above).
        unsafe { self.base.add(gpa as usize) }
    }

    fn u16(&self, gpa: u64) -> &AtomicU16 {
        // SAFETY: in bounds, 2-byte aligned, mapped for the life of `self`; the device accesses
        // ring indices atomically.
        unsafe { AtomicU16::from_ptr(self.at(gpa, 2, 2).cast()) }
    }

    fn write(&self, gpa: u64, bytes: &[u8]) {
        let dst = self.at(gpa, bytes.len() as u64, 1);
        // SAFETY: in bounds; the device reads these bytes only after the release store of the
        // avail index that publishes them.
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), dst, bytes.len()) }
    }

    fn used_elem(&self, pos: u16) -> (u32, u32) {
        let p = self.at(TX_USED_RING + 8 * u64::from(pos), 8, 4);
        // SAFETY: in bounds; written by the device before its release store of used idx, which
        // was loaded with acquire.
        let b = unsafe { std::ptr::read_volatile(p.cast::<[u8; 8]>()) };
        (
            u32::from_le_bytes([b[0], b[1], b[2], b[3]]),
            u32::from_le_bytes([b[4], b[5], b[6], b[7]]),
        )
    }
}

struct Driver {
    ram: Ram,
    frame_size: u32,
    frame_stride: u64,
    avail_idx: u16,
    kicked_idx: u16,
    last_used: u16,
    in_flight: usize,
    kick: EventFd,
    kicks: u64,
    frames: u64,
}

impl Driver {
    /// Writes slot's two descriptors and its avail entry (published by `publish_and_kick`).
    fn submit(&mut self, slot: usize) {
        let head = (slot * 2) as u16;
        let descs = [
            (
                HEADERS + 16 * slot as u64,
                VNET_HDR_LEN as u32,
                VIRTQ_DESC_F_NEXT,
                head + 1,
            ),
            (
                FRAMES + slot as u64 * self.frame_stride,
                self.frame_size,
                0,
                0,
            ),
        ];
        let mut table = [0u8; 32];
        for (d, (addr, len, flags, next)) in table.chunks_exact_mut(16).zip(descs) {
            d[0..8].copy_from_slice(&addr.to_le_bytes());
            d[8..12].copy_from_slice(&len.to_le_bytes());
            d[12..14].copy_from_slice(&flags.to_le_bytes());
            d[14..16].copy_from_slice(&next.to_le_bytes());
        }
        self.ram.write(TX_DESC + 16 * u64::from(head), &table);
        let pos = u64::from(self.avail_idx % QUEUE_SIZE);
        self.ram
            .u16(TX_AVAIL_RING + 2 * pos)
            .store(head.to_le(), Ordering::Relaxed);
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.in_flight += 1;
    }

    fn publish_and_kick(&mut self) {
        fence(Ordering::Release);
        self.ram
            .u16(TX_AVAIL_IDX)
            .store(self.avail_idx.to_le(), Ordering::Release);
        fence(Ordering::SeqCst);
        let event = u16::from_le(self.ram.u16(TX_AVAIL_EVENT).load(Ordering::Relaxed));
        let kick = need_event(event, self.avail_idx, self.kicked_idx);
        self.kicked_idx = self.avail_idx;
        if kick {
            self.kicks += 1;
            if let Err(e) = self.kick.write(1) {
                die(&format!("kick eventfd write failed: {e}"));
            }
        }
    }

    /// Reaps every used entry into `done` (slot numbers), then asks for an interrupt on the
    /// next completion.
    fn reap(&mut self, done: &mut Vec<usize>) {
        loop {
            let used = u16::from_le(self.ram.u16(TX_USED_IDX).load(Ordering::Acquire));
            while self.last_used != used {
                let (id, len) = self.ram.used_elem(self.last_used % QUEUE_SIZE);
                if id % 2 != 0 || id as usize / 2 >= SLOTS {
                    die(&format!(
                        "the device returned descriptor {id}, not a chain head"
                    ));
                }
                if len != 0 {
                    die(&format!("transmit used length {len}, expected 0"));
                }
                done.push(id as usize / 2);
                self.frames += 1;
                self.in_flight -= 1;
                self.last_used = self.last_used.wrapping_add(1);
            }
            self.ram
                .u16(TX_USED_EVENT)
                .store(self.last_used.to_le(), Ordering::Relaxed);
            fence(Ordering::SeqCst);
            if u16::from_le(self.ram.u16(TX_USED_IDX).load(Ordering::Acquire)) == self.last_used {
                return;
            }
        }
    }
}

fn make_queue(mem: &GuestMemoryMmap, desc: u64, avail: u64, used: u64) -> Queue {
    let mut q = Queue::new(QUEUE_SIZE).unwrap_or_else(|e| die(&format!("queue: {e}")));
    q.set_size(QUEUE_SIZE);
    q.set_desc_table_address(Some(desc as u32), Some((desc >> 32) as u32));
    q.set_avail_ring_address(Some(avail as u32), Some((avail >> 32) as u32));
    q.set_used_ring_address(Some(used as u32), Some((used >> 32) as u32));
    q.set_event_idx(true);
    q.set_ready(true);
    if !q.is_valid(mem) {
        die("the hand-made queue layout is invalid");
    }
    q
}

struct VirtioExtra {
    kicks: u64,
    irqs: u64,
    dev_tx_frames: u64,
    dev_tx_dropped: u64,
}

fn run_virtio(o: &Options) -> (Measured, VirtioExtra) {
    let tap = open_tap(&tap_name(o));
    let frame_stride = (o.frame_size as u64).div_ceil(4096) * 4096;
    let mem_size = (FRAMES + SLOTS as u64 * frame_stride).div_ceil(1 << 21) << 21;
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), mem_size as usize)])
        .unwrap_or_else(|e| die(&format!("cannot map guest memory: {e}")));
    let frame = eth_frame(o.frame_size);
    for slot in 0..SLOTS as u64 {
        mem.write_slice(&frame, GuestAddress(FRAMES + slot * frame_stride))
            .unwrap_or_else(|e| die(&format!("guest memory write: {e}")));
    }
    // Headers: zeroed already (fresh anonymous memory): no checksum/GSO, num_buffers 0.

    let mut net = Net::new(NetConfig {
        tap,
        mac: MAC,
        mtu: None,
        queue_size: QUEUE_SIZE,
    })
    .unwrap_or_else(|e| die(&format!("cannot create the net device: {e}")));
    let features = VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX;
    if net.features() & features != features {
        die("the device does not offer VERSION_1 | EVENT_IDX");
    }
    net.ack_features(features);
    let counters = net.counters();

    let kick_rx = EventFd::new(EFD_NONBLOCK).unwrap_or_else(|e| die(&format!("eventfd: {e}")));
    let kick_tx = EventFd::new(EFD_NONBLOCK).unwrap_or_else(|e| die(&format!("eventfd: {e}")));
    let irq = Arc::new(EventFdInterrupt {
        fd: EventFd::new(0).unwrap_or_else(|e| die(&format!("eventfd: {e}"))),
        count: AtomicU64::new(0),
    });
    let clone = |fd: &EventFd| {
        fd.try_clone()
            .unwrap_or_else(|e| die(&format!("eventfd clone: {e}")))
    };
    net.activate(
        mem.clone(),
        irq.clone(),
        vec![
            ActivatedQueue {
                index: 0,
                queue: make_queue(&mem, RX_DESC, RX_AVAIL, RX_USED),
                kick: clone(&kick_rx),
            },
            ActivatedQueue {
                index: 1,
                queue: make_queue(&mem, TX_DESC, TX_AVAIL, TX_USED),
                kick: clone(&kick_tx),
            },
        ],
    )
    .unwrap_or_else(|e| die(&format!("activation failed: {e}")));

    let base = mem
        .get_host_address(GuestAddress(0))
        .unwrap_or_else(|e| die(&format!("guest memory has no host mapping: {e}")));
    let mut d = Driver {
        ram: Ram {
            base,
            len: mem_size,
        },
        frame_size: o.frame_size as u32,
        frame_stride,
        avail_idx: 0,
        kicked_idx: 0,
        last_used: 0,
        in_flight: 0,
        kick: kick_tx,
        kicks: 0,
        frames: 0,
    };
    for slot in 0..SLOTS {
        d.submit(slot);
    }
    d.publish_and_kick();

    let warm_end = Instant::now() + Duration::from_secs_f64(o.warmup);
    let run_len = Duration::from_secs_f64(o.seconds);
    let mut window: Option<(Instant, Instant, f64, u64, u64, u64, u64)> = None;
    let mut result = None;
    let mut done = Vec::with_capacity(SLOTS);
    while d.in_flight > 0 {
        if let Err(e) = irq.fd.read() {
            die(&format!("interrupt eventfd read failed: {e}"));
        }
        let now = Instant::now();
        if window.is_none() && result.is_none() && now >= warm_end {
            window = Some((
                now,
                now + run_len,
                cpu_seconds(),
                d.frames,
                d.kicks,
                irq.count.load(Ordering::Relaxed),
                counters.tx_frames.load(Ordering::Relaxed),
            ));
        }
        done.clear();
        d.reap(&mut done);
        if let Some((start, end, cpu0, f0, k0, i0, t0)) = window {
            if now >= end {
                window = None;
                let m = Measured {
                    seconds: now.duration_since(start).as_secs_f64(),
                    frames: d.frames - f0,
                    cpu_s: cpu_seconds() - cpu0,
                };
                let x = VirtioExtra {
                    kicks: d.kicks - k0,
                    irqs: irq.count.load(Ordering::Relaxed) - i0,
                    dev_tx_frames: counters.tx_frames.load(Ordering::Relaxed) - t0,
                    dev_tx_dropped: counters.tx_dropped.load(Ordering::Relaxed),
                };
                result = Some((m, x));
            }
        }
        if result.is_none() && !done.is_empty() {
            for &slot in &done {
                d.submit(slot);
            }
            d.publish_and_kick();
        }
    }
    drop(net);
    let _ = kick_rx;
    result.unwrap_or_else(|| die("the run ended before the measurement window closed"))
}

fn main() {
    let o = parse_args();
    if o.tap.is_none() {
        // Plain `cargo bench` has no tap; resources/bench/net.py sets one up.
        eprintln!("net_path: needs --tap NAME (see resources/bench/net.py); skipping");
        return;
    }
    let (mode, m, extra) = match o.mode {
        Mode::Raw => {
            let (m, errors) = run_raw(&o);
            ("raw", m, format!(",\"write_errors\":{errors}"))
        }
        Mode::Virtio => {
            let (m, x) = run_virtio(&o);
            let f = m.frames.max(1) as f64;
            (
                "virtio",
                m,
                format!(
                    concat!(
                        ",\"kicks_per_frame\":{:.4},\"irqs_per_frame\":{:.4},",
                        "\"dev_tx_frames\":{},\"dev_tx_dropped\":{}"
                    ),
                    x.kicks as f64 / f,
                    x.irqs as f64 / f,
                    x.dev_tx_frames,
                    x.dev_tx_dropped
                ),
            )
        }
    };
    let fps = m.frames as f64 / m.seconds;
    println!(
        concat!(
            "{{\"mode\":\"{}\",\"tap\":\"{}\",\"frame_size\":{},\"seconds\":{:.3},",
            "\"frames\":{},\"frames_per_s\":{:.0},\"gbit_s\":{:.3},\"cpu_us_per_frame\":{:.3},",
            "\"cpu_util\":{:.3}{}}}"
        ),
        mode,
        tap_name(&o),
        o.frame_size,
        m.seconds,
        m.frames,
        fps,
        fps * o.frame_size as f64 * 8.0 / 1e9,
        m.cpu_s * 1e6 / m.frames.max(1) as f64,
        m.cpu_s / m.seconds,
        extra
    );
}
