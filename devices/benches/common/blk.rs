//! A virtio-blk guest driver for the benchmarks: it lays out one 256-entry split virtqueue by
//! hand (not `virtio_queue::mock`, whose layout is wrong for EVENT_IDX), activates a device on
//! it — mvmm's in-process `Block`, or a `VhostUserDevice` whose backend is another process —
//! and keeps `qd` requests in flight:
//!
//! ```text
//! driver: header + descriptors -> avail ring -> fence -> avail idx -> kick eventfd write
//!   device: wakes on the kick -> serves the chains -> used ring -> call eventfd write
//! driver: blocking eventfd read -> reaps the used ring, checks every status -> resubmits
//! ```
//!
//! With EVENT_IDX (as Linux negotiates it when offered) the driver follows the spec's
//! suppression rules both ways: it kicks only when `avail_event` asks for it, and publishes
//! `used_event` = the last used index it has seen, so the device interrupts as soon as
//! something new completes.

use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use devices::virtio::block::config::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_SEG_MAX,
};
use devices::virtio::{VirtioDevice, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use super::ring::{guest_memory, wait_readable, CallInterrupt, Desc, Layout, Ram, Vq};
use super::{cpu_times, die, Histogram};

use super::blk_options::{BlkOptions, Workload};

// ---- Guest memory layout (fixed guest-physical addresses) -----------------------------------

pub const QUEUE_SIZE: u16 = 256;
const LAYOUT: Layout = Layout {
    desc: 0x0,
    avail: 0x1000,
    used: 0x2000,
};
/// Request headers, 16 bytes per slot.
const HEADERS: u64 = 0x4000;
/// Status bytes, one per slot.
const STATUSES: u64 = 0x6000;
/// Data buffers, one per slot, page aligned.
const DATA: u64 = 0x10_0000;
/// Every request is header + data + status: three descriptors, so this many fit in the table.
pub const MAX_QD: usize = QUEUE_SIZE as usize / 3;

const VIRTIO_BLK_T_IN: u32 = 0;
const VIRTIO_BLK_T_OUT: u32 = 1;
const STATUS_UNSET: u8 = 0xff;
/// Random offsets are multiples of this; `--verify` keeps the first u64 of every such page of
/// the disk equal to its offset.
pub const PAGE: u64 = 4096;
/// What `--verify` puts in a read buffer's checked words before the request.
const POISON: u64 = u64::MAX;

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

/// Bytes between two data buffers: bs rounded up to a page.
fn data_stride(bs: u64) -> u64 {
    bs.div_ceil(PAGE) * PAGE
}

// ---- The guest -------------------------------------------------------------------------------

/// Guest memory with the queue and the request buffers, and the interrupt eventfd.
pub struct BlkGuest {
    pub mem: GuestMemoryMmap,
    ram: Ram,
    vq: Vq,
    call: EventFd,
    bs: u64,
    qd: usize,
}

impl BlkGuest {
    /// `shared`: guest memory in a memfd, which a vhost-user backend can map.
    pub fn new(o: &BlkOptions, shared: bool) -> BlkGuest {
        // Rings and headers in the first MiB, then one buffer per slot, filled with a pattern
        // so writes carry non-zero data.
        let stride = data_stride(o.bs);
        let size = (DATA + o.qd as u64 * stride).div_ceil(1 << 21) << 21;
        let mem = guest_memory(size, shared);
        let pattern: Vec<u8> = (0..stride).map(|i| (i as u8) ^ 0xa5 | 1).collect();
        for slot in 0..o.qd as u64 {
            mem.write_slice(&pattern, GuestAddress(DATA + slot * stride))
                .unwrap_or_else(|e| die(&format!("guest memory access failed: {e}")));
        }
        let ram = Ram::new(&mem, size);
        BlkGuest {
            vq: Vq::new(ram, LAYOUT, QUEUE_SIZE, o.event_idx),
            ram,
            mem,
            call: EventFd::new(0).unwrap_or_else(|e| die(&format!("eventfd: {e}"))),
            bs: o.bs,
            qd: o.qd,
        }
    }

    /// The features a driver like Linux accepts here: VERSION_1 and FLUSH (writeback), which
    /// the device must offer; SEG_MAX and BLK_SIZE if offered; EVENT_IDX if offered and
    /// wanted. `strict`: every one of them must be offered.
    pub fn negotiate(
        &mut self,
        device: &dyn VirtioDevice,
        want_event_idx: bool,
        strict: bool,
    ) -> u64 {
        let offered = device.features();
        let required = VIRTIO_F_VERSION_1 | VIRTIO_BLK_F_FLUSH;
        let mut wanted = required | VIRTIO_BLK_F_SEG_MAX | VIRTIO_BLK_F_BLK_SIZE;
        if want_event_idx {
            wanted |= VIRTIO_RING_F_EVENT_IDX;
        }
        let must = if strict { wanted } else { required };
        if offered & must != must {
            die(&format!(
                "the device does not offer the features {:#x}",
                must & !offered
            ));
        }
        let features = offered & wanted;
        self.vq.event_idx = features & VIRTIO_RING_F_EVENT_IDX != 0;
        features
    }

    /// Accepts `features` (from `negotiate`) and starts the device on the queue.
    pub fn activate(&self, device: &mut dyn VirtioDevice, features: u64) {
        device.ack_features(features);
        let interrupt = Arc::new(CallInterrupt {
            call: self
                .call
                .try_clone()
                .unwrap_or_else(|e| die(&format!("eventfd clone: {e}"))),
        });
        device
            .activate(
                self.mem.clone(),
                interrupt,
                vec![self.vq.activated(&self.mem, 0)],
            )
            .unwrap_or_else(|e| die(&format!("activation failed: {e}")));
    }

    fn set_call_nonblocking(&self) {
        let fd = self.call.as_raw_fd();
        // SAFETY: fcntl on a descriptor we own; F_GETFL/F_SETFL only touch its status flags.
        let ok = unsafe {
            let flags = libc::fcntl(fd, libc::F_GETFL);
            flags >= 0 && libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) == 0
        };
        if !ok {
            die(&format!(
                "cannot make the call eventfd non-blocking: {}",
                std::io::Error::last_os_error()
            ));
        }
    }

    /// Sleeps until the device interrupts; returns how many times it did.
    fn wait_call(&self, wait: Wait) -> u64 {
        if let Wait::Poll(limit) = wait {
            if !wait_readable(self.call.as_raw_fd(), limit) {
                die(&format!(
                    "no interrupt from the device for {limit:?}: it stopped answering"
                ));
            }
        }
        self.call
            .read()
            .unwrap_or_else(|e| die(&format!("interrupt eventfd read failed: {e}")))
    }

    pub fn event_idx(&self) -> bool {
        self.vq.event_idx
    }

    fn data_addr(&self, slot: usize) -> u64 {
        DATA + slot as u64 * data_stride(self.bs)
    }
}

/// The device's capacity in bytes, from its configuration space (le64 sectors at offset 0).
pub fn capacity(device: &dyn VirtioDevice) -> u64 {
    let mut sectors = [0u8; 8];
    device.read_config(0, &mut sectors);
    u64::from_le_bytes(sectors).saturating_mul(512)
}

// ---- The driver ------------------------------------------------------------------------------

/// Counters for one measurement window.
#[derive(Default, Clone, Copy)]
pub struct Tally {
    pub ios: u64,
    pub bytes: u64,
    pub kicks: u64,
    pub lat_sum_ns: u64,
}

/// How the driver sleeps until the device interrupts.
#[derive(Clone, Copy)]
pub enum Wait {
    /// A blocking read of the call eventfd: one system call.
    Blocking,
    /// `poll` then a read, giving up when nothing comes for this long (a backend that died
    /// would otherwise leave the driver asleep for ever). A vhost-user backend shares the
    /// eventfd's file description and may make it non-blocking (qemu-storage-daemon does), so
    /// the driver makes it non-blocking itself: every backend sees the same driver.
    Poll(Duration),
}

/// The measurement window's edges, for callers that sample something else (another process)
/// over exactly the same window.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Edge {
    Start,
    End,
}

/// One run's results.
pub struct Measurement {
    pub elapsed: f64,
    pub usr: f64,
    pub sys: f64,
    pub tally: Tally,
    /// Interrupts (call eventfd signals), and the driver's wake-ups to take them.
    pub irqs: u64,
    pub wakeups: u64,
    pub p50: f64,
    pub p99: f64,
}

impl Measurement {
    pub fn iops(&self) -> f64 {
        self.tally.ios as f64 / self.elapsed
    }

    /// The fields every blk bench prints (JSON object members, no braces).
    pub fn json_fields(&self, o: &BlkOptions, event_idx: bool) -> String {
        let t = &self.tally;
        let ios = t.ios.max(1) as f64;
        format!(
            concat!(
                "\"workload\":\"{}\",\"bs\":{},\"qd\":{},\"event_idx\":{},\"seconds\":{:.3},",
                "\"ios\":{},\"iops\":{:.0},\"mb_s\":{:.1},\"cpu_us_per_req\":{:.3},",
                "\"usr_s\":{:.3},\"sys_s\":{:.3},\"cpu_util\":{:.3},",
                "\"kicks_per_req\":{:.4},\"irqs_per_req\":{:.4},",
                "\"lat_us_avg\":{:.2},\"lat_us_p50\":{:.1},\"lat_us_p99\":{:.1}"
            ),
            o.workload.name(),
            o.bs,
            o.qd,
            event_idx,
            self.elapsed,
            t.ios,
            self.iops(),
            t.bytes as f64 / self.elapsed / 1e6,
            (self.usr + self.sys) * 1e6 / ios,
            self.usr,
            self.sys,
            (self.usr + self.sys) / self.elapsed,
            t.kicks as f64 / ios,
            self.irqs as f64 / ios,
            t.lat_sum_ns as f64 / ios / 1000.0,
            self.p50,
            self.p99,
        )
    }
}

struct Driver<'a> {
    g: &'a mut BlkGuest,
    workload: Workload,
    verify: bool,
    /// Number of 4 KiB-aligned offsets a random request may start at.
    rand_slots: u64,
    /// Disk size rounded down to a multiple of bs (sequential wrap point).
    seq_end: u64,
    seq_next: u64,
    rng: Rng,
    in_flight: usize,
    submitted_at: Vec<Instant>,
    offsets: Vec<u64>,
    tally: Tally,
    hist: Histogram,
}

impl Driver<'_> {
    fn header_addr(slot: usize) -> u64 {
        HEADERS + 16 * slot as u64
    }
    fn status_addr(slot: usize) -> u64 {
        STATUSES + slot as u64
    }

    fn next_offset(&mut self) -> u64 {
        if self.workload.is_random() {
            self.rng.below(self.rand_slots) * PAGE
        } else {
            let off = self.seq_next;
            self.seq_next += self.g.bs;
            if self.seq_next >= self.seq_end {
                self.seq_next = 0;
            }
            off
        }
    }

    /// Writes one request (header, status, three descriptors) for `slot` and its avail ring
    /// entry. The device cannot see it before `publish`.
    fn submit(&mut self, slot: usize, now: Instant) {
        let offset = self.next_offset();
        let bs = self.g.bs;
        let data = self.g.data_addr(slot);
        if self.verify {
            // Writes keep the disk's first word per page; reads must replace the poison.
            let read = self.workload.is_read();
            for page in (0..bs).step_by(PAGE as usize) {
                let word = if read { POISON } else { offset + page };
                self.g.ram.write_u64(data + page, word);
            }
        }
        let req_type = if self.workload.is_read() {
            VIRTIO_BLK_T_IN
        } else {
            VIRTIO_BLK_T_OUT
        };
        // Header: le32 type, le32 reserved, le64 sector.
        let mut header = [0u8; 16];
        header[0..4].copy_from_slice(&req_type.to_le_bytes());
        header[8..16].copy_from_slice(&(offset >> 9).to_le_bytes());
        self.g.ram.write(Self::header_addr(slot), &header);
        self.g.ram.write(Self::status_addr(slot), &[STATUS_UNSET]);
        let chain = [
            Desc {
                addr: Self::header_addr(slot),
                len: 16,
                write: false,
            },
            Desc {
                addr: data,
                len: bs as u32,
                write: self.workload.is_read(),
            },
            Desc {
                addr: Self::status_addr(slot),
                len: 1,
                write: true,
            },
        ];
        self.g.vq.add((slot * 3) as u16, &chain);
        self.submitted_at[slot] = now;
        self.offsets[slot] = offset;
        self.in_flight += 1;
    }

    /// Reaps every used entry, checking status and length (and data, with verify); pushes the
    /// freed slots to `done`.
    fn reap(&mut self, done: &mut Vec<usize>, now: Instant) {
        let read = self.workload.is_read();
        let want_len = if read { self.g.bs as u32 + 1 } else { 1 };
        loop {
            while let Some((id, len)) = self.g.vq.next_used() {
                if id % 3 != 0 || id as usize / 3 >= self.g.qd {
                    die(&format!(
                        "the device returned descriptor {id}, not a request head"
                    ));
                }
                let slot = id as usize / 3;
                let status = self.g.ram.read_u8(Self::status_addr(slot));
                if status != 0 {
                    die(&format!(
                        "request in slot {slot} completed with status {status}"
                    ));
                }
                if len != want_len {
                    die(&format!("used length {len}, expected {want_len}"));
                }
                if self.verify && read {
                    self.check_data(slot);
                }
                let lat = now
                    .saturating_duration_since(self.submitted_at[slot])
                    .as_nanos() as u64;
                self.tally.ios += 1;
                self.tally.bytes += self.g.bs;
                self.tally.lat_sum_ns += lat;
                self.hist.add(lat);
                self.in_flight -= 1;
                done.push(slot);
            }
            if !self.g.vq.arm() {
                return;
            }
        }
    }

    fn check_data(&self, slot: usize) {
        let data = self.g.data_addr(slot);
        for page in (0..self.g.bs).step_by(PAGE as usize) {
            let want = self.offsets[slot] + page;
            let got = self.g.ram.read_u64(data + page);
            if got != want {
                die(&format!(
                    "data mismatch: the page at disk offset {want:#x} starts with {got:#x} \
                     (--verify needs a disk whose pages start with their own offsets)"
                ));
            }
        }
    }
}

/// Runs the workload on an activated device of `size` bytes: a warm-up, then a window of
/// `o.seconds` that closes at the first wake-up after its end; the requests still in flight
/// are drained without being counted. `on_edge` runs at the window's start and end.
pub fn run(
    g: &mut BlkGuest,
    o: &BlkOptions,
    size: u64,
    wait: Wait,
    mut on_edge: impl FnMut(Edge),
) -> Measurement {
    if size < o.bs.max(PAGE) {
        die(&format!(
            "the disk is {size} bytes, smaller than one request"
        ));
    }
    if let Wait::Poll(_) = wait {
        g.set_call_nonblocking();
    }
    let start_now = Instant::now();
    let qd = g.qd;
    let mut d = Driver {
        workload: o.workload,
        verify: o.verify,
        rand_slots: (size - o.bs) / PAGE + 1,
        seq_end: size / o.bs * o.bs,
        seq_next: 0,
        rng: Rng(0x9e37_79b9_7f4a_7c15 ^ u64::from(std::process::id())),
        in_flight: 0,
        submitted_at: vec![start_now; qd],
        offsets: vec![0; qd],
        tally: Tally::default(),
        hist: Histogram::default(),
        g,
    };

    // Fill the queue, then keep it full.
    for slot in 0..qd {
        d.submit(slot, start_now);
    }
    d.g.vq.publish();

    let warmup_end = start_now + Duration::from_secs_f64(o.warmup);
    let run_len = Duration::from_secs_f64(o.seconds);
    let mut measuring = false;
    let mut measure_start = start_now;
    let mut end = start_now;
    let mut cpu_start = (0.0, 0.0);
    let (mut irqs, mut wakeups) = (0u64, 0u64);
    let (mut irq_start, mut wake_start) = (0, 0);
    let mut result = None;
    let mut done = Vec::with_capacity(qd);
    while d.in_flight > 0 {
        // Sleep until the device interrupts (the eventfd counter keeps signals that came
        // while we were busy, so none is lost, and its value is how many there were).
        irqs += d.g.wait_call(wait);
        wakeups += 1;
        let now = Instant::now();
        if !measuring && result.is_none() && now >= warmup_end {
            // Open the measurement window; forget the warm-up.
            measuring = true;
            measure_start = now;
            end = now + run_len;
            on_edge(Edge::Start);
            cpu_start = cpu_times();
            (irq_start, wake_start) = (irqs, wakeups);
            d.tally = Tally::default();
            d.g.vq.kicks = 0;
            d.hist.clear();
        }
        done.clear();
        d.reap(&mut done, now);
        if measuring && now >= end {
            // Close the window at the first wake-up past its end.
            measuring = false;
            let elapsed = now.duration_since(measure_start).as_secs_f64();
            let cpu_end = cpu_times();
            on_edge(Edge::End);
            let mut tally = d.tally;
            tally.kicks = d.g.vq.kicks;
            result = Some(Measurement {
                elapsed,
                usr: cpu_end.0 - cpu_start.0,
                sys: cpu_end.1 - cpu_start.1,
                tally,
                irqs: irqs - irq_start,
                wakeups: wakeups - wake_start,
                p50: d.hist.percentile_us(tally.ios, 0.50),
                p99: d.hist.percentile_us(tally.ios, 0.99),
            });
        }
        if result.is_none() && !done.is_empty() {
            for &slot in &done {
                d.submit(slot, now);
            }
            d.g.vq.publish();
        }
    }
    result.unwrap_or_else(|| die("the run ended before the measurement window closed"))
}
