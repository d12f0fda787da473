//! The guest side of a split virtqueue (virtio 1.2, 2.7): guest memory, the driver's direct
//! view of it, and one queue as a guest driver sees it.

use std::fs::File;
use std::os::fd::FromRawFd;
use std::sync::atomic::{fence, AtomicU16, Ordering};
use std::time::{Duration, Instant};

use devices::virtio::{ActivatedQueue, VirtioInterrupt};
use virtio_queue::{Queue, QueueT};
use vm_memory::{FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{die, need_event};

pub const VIRTQ_DESC_F_NEXT: u16 = 1;
pub const VIRTQ_DESC_F_WRITE: u16 = 2;
const VIRTQ_USED_F_NO_NOTIFY: u16 = 1;
/// The longest chain `Vq::add` takes.
pub const MAX_CHAIN: usize = 4;

/// Guest RAM at guest address 0, `size` bytes. `shared`: backed by a memfd, as vhost-user
/// needs (the backend maps it); otherwise anonymous memory, as for an in-process device.
pub fn guest_memory(size: u64, shared: bool) -> GuestMemoryMmap {
    if !shared {
        return GuestMemoryMmap::from_ranges(&[(GuestAddress(0), size as usize)])
            .unwrap_or_else(|e| die(&format!("cannot map guest memory: {e}")));
    }
    // SAFETY: memfd_create takes a NUL-terminated name and flags and returns a new descriptor
    // or -1; nothing else is touched.
    let fd = unsafe { libc::memfd_create(c"mvmm-bench-guest".as_ptr(), libc::MFD_CLOEXEC) };
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
/// has it: plain loads and stores at host addresses. Going through vm-memory's checked
/// accessors for every ring field would make this "guest" several times slower than a real
/// one, and it sits on the critical path of every batch.
#[derive(Clone, Copy)]
pub struct Ram {
    base: *mut u8,
    len: u64,
}

impl Ram {
    /// `mem` must hold one region of at least `len` bytes at guest address 0, and outlive
    /// every use of the returned view.
    pub fn new(mem: &GuestMemoryMmap, len: u64) -> Ram {
        let base = mem
            .get_host_address(GuestAddress(0))
            .unwrap_or_else(|e| die(&format!("guest memory has no host mapping: {e}")));
        Ram { base, len }
    }

    /// Host pointer to `size` bytes at guest address `gpa`.
    fn ptr(&self, gpa: u64, size: u64) -> *mut u8 {
        assert!(gpa.checked_add(size).is_some_and(|end| end <= self.len));
        // SAFETY: in bounds of the mapping, checked above.
        unsafe { self.base.add(gpa as usize) }
    }

    /// A 16-bit ring field, accessed atomically (the device reads it concurrently).
    pub fn u16(&self, gpa: u64) -> &AtomicU16 {
        assert_eq!(gpa % 2, 0);
        // SAFETY: in bounds and aligned; the mapping outlives `self`, and the device accesses
        // these fields atomically (vm-memory load/store) or after an acquire.
        unsafe { AtomicU16::from_ptr(self.ptr(gpa, 2).cast()) }
    }

    pub fn write(&self, gpa: u64, bytes: &[u8]) {
        let dst = self.ptr(gpa, bytes.len() as u64);
        // SAFETY: in bounds; the device does not read these bytes until the request is
        // published with a release store of the available index.
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), dst, bytes.len()) }
    }

    pub fn write_u64(&self, gpa: u64, value: u64) {
        self.write(gpa, &value.to_le_bytes());
    }

    pub fn read(&self, gpa: u64, len: usize) -> Vec<u8> {
        let src = self.ptr(gpa, len as u64);
        let mut out = vec![0u8; len];
        // SAFETY: in bounds; the device wrote these bytes before its release store of the used
        // index, which was loaded with acquire.
        unsafe { std::ptr::copy_nonoverlapping(src, out.as_mut_ptr(), len) }
        out
    }

    pub fn read_u8(&self, gpa: u64) -> u8 {
        // SAFETY: as for `read`.
        unsafe { std::ptr::read_volatile(self.ptr(gpa, 1)) }
    }

    pub fn read_u32(&self, gpa: u64) -> u32 {
        // SAFETY: as for `read`; the address may be unaligned.
        u32::from_le(unsafe { std::ptr::read_unaligned(self.ptr(gpa, 4).cast::<u32>()) })
    }

    pub fn read_u64(&self, gpa: u64) -> u64 {
        // SAFETY: as for `read`; the address may be unaligned.
        u64::from_le(unsafe { std::ptr::read_unaligned(self.ptr(gpa, 8).cast::<u64>()) })
    }
}

/// Where a queue's three parts are in guest memory.
#[derive(Clone, Copy)]
pub struct Layout {
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
}

/// One descriptor of a chain: guest address, length, device-writable.
#[derive(Clone, Copy)]
pub struct Desc {
    pub addr: u64,
    pub len: u32,
    pub write: bool,
}

/// One split virtqueue, driver side.
pub struct Vq {
    ram: Ram,
    pub size: u16,
    pub layout: Layout,
    pub event_idx: bool,
    /// The driver's copy of avail idx (what it has published or is about to).
    avail_idx: u16,
    /// avail idx at the previous kick decision (vring_need_event's `old`).
    kicked_idx: u16,
    last_used: u16,
    kick: EventFd,
    pub kicks: u64,
}

impl Vq {
    pub fn new(ram: Ram, layout: Layout, size: u16, event_idx: bool) -> Vq {
        Vq {
            ram,
            size,
            layout,
            event_idx,
            avail_idx: 0,
            kicked_idx: 0,
            last_used: 0,
            kick: EventFd::new(EFD_NONBLOCK).unwrap_or_else(|e| die(&format!("eventfd: {e}"))),
            kicks: 0,
        }
    }

    /// The queue as the transport hands it to the device at DRIVER_OK.
    pub fn activated(&self, mem: &GuestMemoryMmap, index: u16) -> ActivatedQueue {
        let mut queue = Queue::new(self.size).unwrap_or_else(|e| die(&format!("queue: {e}")));
        queue.set_size(self.size);
        let split = |a: u64| (Some(a as u32), Some((a >> 32) as u32));
        let (lo, hi) = split(self.layout.desc);
        queue.set_desc_table_address(lo, hi);
        let (lo, hi) = split(self.layout.avail);
        queue.set_avail_ring_address(lo, hi);
        let (lo, hi) = split(self.layout.used);
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
        self.layout.avail + 4 + 2 * u64::from(self.size)
    }

    fn avail_event(&self) -> u64 {
        self.layout.used + 4 + 8 * u64::from(self.size)
    }

    /// Writes a chain of descriptors at `head`, `head + 1`, ... and its available ring entry.
    /// The device sees it after `publish`.
    pub fn add(&mut self, head: u16, chain: &[Desc]) {
        assert!(!chain.is_empty() && chain.len() <= MAX_CHAIN);
        // Descriptor: le64 addr, le32 len, le16 flags, le16 next.
        let mut table = [0u8; 16 * MAX_CHAIN];
        for (i, d) in chain.iter().enumerate() {
            let last = i + 1 == chain.len();
            let mut flags = if d.write { VIRTQ_DESC_F_WRITE } else { 0 };
            if !last {
                flags |= VIRTQ_DESC_F_NEXT;
            }
            let next = if last { 0 } else { head + i as u16 + 1 };
            let e = &mut table[16 * i..16 * i + 16];
            e[0..8].copy_from_slice(&d.addr.to_le_bytes());
            e[8..12].copy_from_slice(&d.len.to_le_bytes());
            e[12..14].copy_from_slice(&flags.to_le_bytes());
            e[14..16].copy_from_slice(&next.to_le_bytes());
        }
        self.ram.write(
            self.layout.desc + 16 * u64::from(head),
            &table[..16 * chain.len()],
        );
        // The avail ring entry; the index follows in `publish`, after a fence.
        let pos = u64::from(self.avail_idx % self.size);
        self.ram
            .u16(self.layout.avail + 4 + 2 * pos)
            .store(head.to_le(), Ordering::Relaxed);
        self.avail_idx = self.avail_idx.wrapping_add(1);
    }

    /// Makes the added chains visible and kicks if the device asks for it.
    pub fn publish(&mut self) {
        fence(Ordering::Release);
        self.ram
            .u16(self.layout.avail + 2)
            .store(self.avail_idx.to_le(), Ordering::Release);
        // The index store must be visible before we read the device's suppression state
        // (virtio_mb in Linux's virtqueue_kick_prepare).
        fence(Ordering::SeqCst);
        let kick = if self.event_idx {
            let event = u16::from_le(self.ram.u16(self.avail_event()).load(Ordering::Relaxed));
            need_event(event, self.avail_idx, self.kicked_idx)
        } else {
            let flags = u16::from_le(self.ram.u16(self.layout.used).load(Ordering::Relaxed));
            flags & VIRTQ_USED_F_NO_NOTIFY == 0
        };
        self.kicked_idx = self.avail_idx;
        if kick {
            self.kicks += 1;
            self.kick
                .write(1)
                .unwrap_or_else(|e| die(&format!("kick eventfd write failed: {e}")));
        }
    }

    /// The next used element (descriptor head, bytes written), if there is one.
    pub fn next_used(&mut self) -> Option<(u32, u32)> {
        let used_idx = u16::from_le(self.ram.u16(self.layout.used + 2).load(Ordering::Acquire));
        if used_idx == self.last_used {
            return None;
        }
        let at = self.layout.used + 4 + 8 * u64::from(self.last_used % self.size);
        self.last_used = self.last_used.wrapping_add(1);
        Some((self.ram.read_u32(at), self.ram.read_u32(at + 4)))
    }

    /// With EVENT_IDX, asks for an interrupt at the next completion (`used_event` = the last
    /// used index seen) and then looks again: true if a completion raced with that store and
    /// would otherwise never be signalled (reap again). Always false without EVENT_IDX.
    pub fn arm(&mut self) -> bool {
        if !self.event_idx {
            return false;
        }
        self.ram
            .u16(self.used_event())
            .store(self.last_used.to_le(), Ordering::Relaxed);
        fence(Ordering::SeqCst);
        u16::from_le(self.ram.u16(self.layout.used + 2).load(Ordering::Acquire)) != self.last_used
    }
}

/// The transport's interrupt as an eventfd: written by an in-process device
/// (`signal_used_queue`), or handed to a vhost-user backend to write itself (VRING_CALL), as
/// the VMM hands it an irqfd.
pub struct CallInterrupt {
    pub call: EventFd,
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

/// Waits until `fd` is readable; false after `timeout`.
pub fn wait_readable(fd: i32, timeout: Duration) -> bool {
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
