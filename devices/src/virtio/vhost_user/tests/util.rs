//! Test helpers: memfd-backed guest memory, a hand-driven split virtqueue, an interrupt.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use virtio_queue::{Queue, QueueT};
use vm_memory::{Address, Bytes, FileOffset, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use crate::virtio::{ActivatedQueue, VirtioInterrupt};

/// Queue size the test driver uses.
pub const QSIZE: u16 = 16;
/// Guest memory: two 1 MiB regions with a hole, both in one memfd.
pub const REGION_SIZE: usize = 0x10_0000;
pub const REGIONS: [(u64, u64); 2] = [(0, 0), (0x20_0000, REGION_SIZE as u64)];
/// Where ring `q` lives (region 0) and where its buffers live (region 1).
const RING_BASE: u64 = 0x1_0000;
const DATA_BASE: u64 = 0x20_0000;
const SLOT: u64 = 0x2000;

pub fn memfd(size: usize) -> File {
    // SAFETY: memfd_create takes a NUL-terminated name and flags and returns a new descriptor
    // or -1; nothing else is touched.
    let fd = unsafe { libc::memfd_create(c"mvmm-test".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
    // SAFETY: `fd` was just created and is owned by nobody else.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(size as u64).unwrap();
    file
}

/// Shared (MAP_SHARED memfd) guest memory, as the VMM creates it for vhost-user.
pub fn shared_memory() -> GuestMemoryMmap {
    let file = Arc::new(memfd(REGIONS.len() * REGION_SIZE));
    GuestMemoryMmap::from_ranges_with_files(REGIONS.iter().map(|&(gpa, offset)| {
        (
            GuestAddress(gpa),
            REGION_SIZE,
            Some(FileOffset::from_arc(file.clone(), offset)),
        )
    }))
    .unwrap()
}

/// The test's side of one split virtqueue: it plays the driver.
pub struct Ring {
    pub index: u16,
    mem: GuestMemoryMmap,
    desc: GuestAddress,
    avail: GuestAddress,
    used: GuestAddress,
    data: GuestAddress,
    avail_idx: u16,
    pub kick: EventFd,
}

impl Ring {
    pub fn new(mem: &GuestMemoryMmap, index: u16) -> Ring {
        let base = RING_BASE * (u64::from(index) + 1);
        Ring {
            index,
            mem: mem.clone(),
            desc: GuestAddress(base),
            avail: GuestAddress(base + 0x1000),
            used: GuestAddress(base + 0x2000),
            data: GuestAddress(DATA_BASE + 0x4_0000 * u64::from(index)),
            avail_idx: 0,
            kick: EventFd::new(libc::EFD_NONBLOCK).unwrap(),
        }
    }

    /// The queue as the transport hands it to the device at DRIVER_OK.
    pub fn activated(&self) -> ActivatedQueue {
        let mut queue = Queue::new(QSIZE).unwrap();
        queue.set_size(QSIZE);
        let split = |a: GuestAddress| {
            (
                Some(a.raw_value() as u32),
                Some((a.raw_value() >> 32) as u32),
            )
        };
        let (lo, hi) = split(self.desc);
        queue.set_desc_table_address(lo, hi);
        let (lo, hi) = split(self.avail);
        queue.set_avail_ring_address(lo, hi);
        let (lo, hi) = split(self.used);
        queue.set_used_ring_address(lo, hi);
        queue.set_ready(true);
        assert!(queue.is_valid(&self.mem));
        ActivatedQueue {
            index: self.index,
            queue,
            kick: self.kick.try_clone().unwrap(),
        }
    }

    pub fn addresses(&self) -> (u64, u64, u64) {
        (
            self.desc.raw_value(),
            self.avail.raw_value(),
            self.used.raw_value(),
        )
    }

    /// Makes `request` available with a `reply_len`-byte writable buffer; returns the reply
    /// buffer's address. Does not kick.
    pub fn push(&mut self, request: &[u8], reply_len: u32) -> GuestAddress {
        let slot = self.avail_idx % (QSIZE / 2);
        let head = slot * 2;
        let req_addr = self.data.unchecked_add(u64::from(slot) * SLOT);
        let reply_addr = req_addr.unchecked_add(SLOT / 2);
        self.mem.write_slice(request, req_addr).unwrap();
        self.mem
            .write_slice(&vec![0u8; reply_len as usize], reply_addr)
            .unwrap();
        const NEXT: u16 = 1;
        const WRITE: u16 = 2;
        self.write_desc(head, req_addr, request.len() as u32, NEXT, head + 1);
        self.write_desc(head + 1, reply_addr, reply_len, WRITE, 0);
        let entry = self
            .avail
            .unchecked_add(4 + 2 * u64::from(self.avail_idx % QSIZE));
        self.mem.write_obj(head.to_le(), entry).unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.mem
            .store(
                self.avail_idx.to_le(),
                self.avail.unchecked_add(2),
                Ordering::Release,
            )
            .unwrap();
        reply_addr
    }

    fn write_desc(&self, index: u16, addr: GuestAddress, len: u32, flags: u16, next: u16) {
        let mut bytes = [0u8; 16];
        bytes[..8].copy_from_slice(&addr.raw_value().to_le_bytes());
        bytes[8..12].copy_from_slice(&len.to_le_bytes());
        bytes[12..14].copy_from_slice(&flags.to_le_bytes());
        bytes[14..].copy_from_slice(&next.to_le_bytes());
        let at = self.desc.unchecked_add(16 * u64::from(index));
        self.mem.write_slice(&bytes, at).unwrap();
    }

    pub fn kick(&self) {
        self.kick.write(1).unwrap();
    }

    pub fn used_idx(&self) -> u16 {
        u16::from_le(
            self.mem
                .load(self.used.unchecked_add(2), Ordering::Acquire)
                .unwrap(),
        )
    }

    /// The `n`th used element: (descriptor head, bytes written).
    pub fn used_elem(&self, n: u16) -> (u32, u32) {
        let at = self.used.unchecked_add(4 + 8 * u64::from(n % QSIZE));
        let id: u32 = self.mem.read_obj(at).unwrap();
        let len: u32 = self.mem.read_obj(at.unchecked_add(4)).unwrap();
        (u32::from_le(id), u32::from_le(len))
    }

    pub fn read(&self, addr: GuestAddress, len: usize) -> Vec<u8> {
        let mut buf = vec![0u8; len];
        self.mem.read_slice(&mut buf, addr).unwrap();
        buf
    }
}

/// The transport's interrupt, as far as the device can tell.
pub struct MockInterrupt {
    /// The "irqfd" the backend signals (VRING_CALL).
    pub call: EventFd,
    pub config_changes: AtomicUsize,
    pub used_signals: AtomicUsize,
}

impl MockInterrupt {
    pub fn new() -> Arc<MockInterrupt> {
        Arc::new(MockInterrupt {
            call: EventFd::new(libc::EFD_NONBLOCK).unwrap(),
            config_changes: AtomicUsize::new(0),
            used_signals: AtomicUsize::new(0),
        })
    }

    /// Waits for the backend to signal the call eventfd, and consumes the signal.
    pub fn wait_call(&self, timeout: Duration) -> bool {
        let mut fds = [libc::pollfd {
            fd: self.call.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        }];
        // SAFETY: one valid pollfd for a descriptor that `self` keeps open.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), 1, timeout.as_millis() as i32) };
        n == 1 && self.call.read().is_ok()
    }
}

impl VirtioInterrupt for MockInterrupt {
    fn signal_used_queue(&self, _queue_index: u16) -> std::io::Result<()> {
        self.used_signals.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    fn signal_config_change(&self) -> std::io::Result<()> {
        self.config_changes.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    fn direct_notifier(&self) -> Option<EventFd> {
        self.call.try_clone().ok()
    }
}

/// Polls `cond` until it holds or `timeout` passes.
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    cond()
}
