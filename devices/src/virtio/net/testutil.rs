//! Test helpers: guest memory, descriptor chains, a fake frame device, and real taps watched
//! through a packet socket.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap};

use super::chain::FrameIo;
use super::tap::Tap;
use super::VNET_HDR_LEN;
use crate::virtio::VirtioInterrupt;

pub const TEST_ETHERTYPE: u16 = 0x88b5;

/// 16 MiB of guest memory from address 0.
pub fn mem() -> GuestMemoryMmap {
    GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x100_0000)]).unwrap()
}

/// A descriptor for [`TestQueue::add`], which links them.
#[derive(Clone, Copy, Debug)]
pub struct Desc {
    pub addr: u64,
    pub len: u32,
    pub writable: bool,
}

pub fn desc(addr: u64, len: u32, writable: bool) -> Desc {
    Desc {
        addr,
        len,
        writable,
    }
}

/// The driver side of a split queue, with its rings well apart. (virtio-queue's
/// MockSplitQueue sizes the available ring in elements, not bytes, so its used ring overlaps
/// the available ring's tail and `used_event`.)
pub struct TestQueue<'m> {
    mem: &'m GuestMemoryMmap,
    size: u16,
    desc_table: GuestAddress,
    avail: GuestAddress,
    used: GuestAddress,
    next_desc: Cell<u16>,
}

impl<'m> TestQueue<'m> {
    /// A queue of `size` entries with its rings from `base` (64 KiB per queue is plenty).
    pub fn new(mem: &'m GuestMemoryMmap, base: u64, size: u16) -> Self {
        let q = TestQueue {
            mem,
            size,
            desc_table: GuestAddress(base),
            avail: GuestAddress(base + 0x4000),
            used: GuestAddress(base + 0x8000),
            next_desc: Cell::new(0),
        };
        // Clear the rings' headers and used_event.
        mem.write_slice(&[0u8; 0x8000], q.avail).unwrap();
        mem.write_slice(&[0u8; 0x8000], q.used).unwrap();
        q
    }

    /// The device side, ready to use.
    pub fn create_queue(&self) -> Queue {
        let mut q = Queue::new(self.size).unwrap();
        q.set_size(self.size);
        q.try_set_desc_table_address(self.desc_table).unwrap();
        q.try_set_avail_ring_address(self.avail).unwrap();
        q.try_set_used_ring_address(self.used).unwrap();
        q.set_ready(true);
        assert!(q.is_valid(self.mem));
        q
    }

    /// Writes descriptor `index` as is.
    pub fn write_desc(&self, index: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let mut raw = [0u8; 16];
        raw[..8].copy_from_slice(&addr.to_le_bytes());
        raw[8..12].copy_from_slice(&len.to_le_bytes());
        raw[12..14].copy_from_slice(&flags.to_le_bytes());
        raw[14..].copy_from_slice(&next.to_le_bytes());
        let at = self.desc_table.unchecked_add(16 * u64::from(index));
        self.mem.write_slice(&raw, at).unwrap();
    }

    /// Makes `head` available.
    pub fn push_avail(&self, head: u16) {
        let idx: u16 = self.mem.read_obj(self.avail.unchecked_add(2)).unwrap();
        let slot = self.avail.unchecked_add(4 + 2 * u64::from(idx % self.size));
        self.mem.write_obj(head, slot).unwrap();
        self.mem
            .write_obj(idx.wrapping_add(1), self.avail.unchecked_add(2))
            .unwrap();
    }

    /// Writes `descs` as one chain in the next free table entries and makes it available.
    pub fn add(&self, descs: &[Desc]) -> u16 {
        let head = self.next_desc.get();
        for (i, d) in descs.iter().enumerate() {
            let index = head + i as u16;
            assert!(index < self.size, "test queue descriptor table full");
            let mut flags = if d.writable { VRING_DESC_F_WRITE } else { 0 } as u16;
            if i + 1 < descs.len() {
                flags |= VRING_DESC_F_NEXT as u16;
            }
            self.write_desc(index, d.addr, d.len, flags, index + 1);
        }
        self.next_desc.set(head + descs.len() as u16);
        self.push_avail(head);
        head
    }

    /// The next descriptor table entry `add` will use.
    pub fn skip_descs(&self, n: u16) {
        self.next_desc.set(self.next_desc.get() + n);
    }

    pub fn used_idx(&self) -> u16 {
        self.mem.read_obj(self.used.unchecked_add(2)).unwrap()
    }

    /// Used element `i`: (head, length).
    pub fn used(&self, i: u16) -> (u32, u32) {
        let at = self.used.unchecked_add(4 + 8 * u64::from(i % self.size));
        let id: u32 = self.mem.read_obj(at).unwrap();
        let len: u32 = self.mem.read_obj(at.unchecked_add(4)).unwrap();
        (id, len)
    }

    pub fn used_flags(&self) -> u16 {
        self.mem.read_obj(self.used).unwrap()
    }

    /// The device's avail_event (after the used ring).
    pub fn avail_event(&self) -> u16 {
        let at = self.used.unchecked_add(4 + 8 * u64::from(self.size));
        self.mem.read_obj(at).unwrap()
    }

    pub fn set_avail_flags(&self, flags: u16) {
        self.mem.write_obj(flags, self.avail).unwrap();
    }

    pub fn set_used_event(&self, event: u16) {
        let at = self.avail.unchecked_add(4 + 2 * u64::from(self.size));
        self.mem.write_obj(event, at).unwrap();
    }
}

/// An Ethernet frame of `len` bytes with the test EtherType and a payload pattern.
pub fn eth_frame(len: usize, seed: u8) -> Vec<u8> {
    assert!(len >= 14);
    let mut f = vec![0x02, 0, 0, 0, 0, 0x01, 0x02, 0, 0, 0, 0, 0x02];
    f.extend_from_slice(&TEST_ETHERTYPE.to_be_bytes());
    f.extend((0..len - 14).map(|i| (i as u8).wrapping_mul(7).wrapping_add(seed)));
    f
}

/// A frame preceded by an all-zero virtio-net header.
pub fn with_hdr(frame: &[u8]) -> Vec<u8> {
    let mut p = vec![0u8; VNET_HDR_LEN];
    p.extend_from_slice(frame);
    p
}

/// A frame device in memory: `rx` frames are read out, written frames land in `tx`.
#[derive(Default)]
pub struct FakeTap {
    pub rx: RefCell<VecDeque<Vec<u8>>>,
    pub tx: RefCell<Vec<Vec<u8>>>,
    pub tx_full: Cell<bool>,
    pub tx_error: Cell<Option<i32>>,
    pub rx_error: Cell<Option<i32>>,
    /// Report truncated reads as the bytes copied (tun) rather than the frame length.
    pub report_copied: Cell<bool>,
}

impl FrameIo for FakeTap {
    unsafe fn read_frame(&self, iovs: &[libc::iovec]) -> io::Result<usize> {
        if let Some(e) = self.rx_error.take() {
            return Err(io::Error::from_raw_os_error(e));
        }
        let Some(frame) = self.rx.borrow_mut().pop_front() else {
            return Err(io::ErrorKind::WouldBlock.into());
        };
        let mut done = 0;
        for iov in iovs {
            let n = iov.iov_len.min(frame.len() - done);
            // SAFETY: the caller guarantees each iovec is writable for its length.
            unsafe {
                std::ptr::copy_nonoverlapping(frame[done..].as_ptr(), iov.iov_base.cast(), n)
            };
            done += n;
        }
        if self.report_copied.get() {
            // Like tun: the bytes copied.
            Ok(done)
        } else {
            Ok(frame.len())
        }
    }

    unsafe fn write_frame(&self, iovs: &[libc::iovec]) -> io::Result<usize> {
        if self.tx_full.get() {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        if let Some(e) = self.tx_error.get() {
            return Err(io::Error::from_raw_os_error(e));
        }
        let mut frame = Vec::new();
        for iov in iovs {
            // SAFETY: the caller guarantees each iovec is readable for its length.
            frame.extend_from_slice(unsafe {
                std::slice::from_raw_parts(iov.iov_base.cast::<u8>(), iov.iov_len)
            });
        }
        let len = frame.len();
        self.tx.borrow_mut().push(frame);
        Ok(len)
    }
}

/// Counts interrupts per queue.
#[derive(Default)]
pub struct TestInterrupt {
    pub used: [AtomicU64; 2],
}

impl TestInterrupt {
    /// Waits up to 5 s for queue `q` to have been signalled more than `seen` times.
    pub fn wait(&self, q: usize, seen: u64) -> bool {
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if self.used[q].load(Ordering::SeqCst) > seen {
                return true;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        false
    }
}

impl VirtioInterrupt for TestInterrupt {
    fn signal_used_queue(&self, queue_index: u16) -> io::Result<()> {
        self.used[usize::from(queue_index)].fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    fn signal_config_change(&self) -> io::Result<()> {
        Ok(())
    }
}

/// Whether taps can be created; prints why tests are skipped if not.
pub fn tun_available() -> bool {
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")
    {
        Ok(_) => true,
        Err(e) => {
            eprintln!("SKIPPED: cannot open /dev/net/tun ({e}): tap tests need root and tun");
            false
        }
    }
}

/// An interface name unique to this process and call (at most 14 bytes).
pub fn unique_name() -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    format!("mvt{}x{}", std::process::id() % 10_000_000, n)
}

/// A fresh tap interface, up, with a packet socket bound to it. The interface disappears
/// when the tap fd closes.
pub struct TestTap {
    pub tap: Tap,
    pub name: String,
    sock: OwnedFd,
}

impl TestTap {
    pub fn new() -> TestTap {
        let name = unique_name();
        let tap = Tap::open_named(&name).expect("create the test tap");
        // Keep the kernel quiet on the interface (no IPv6 autoconfiguration traffic).
        let _ = std::fs::write(format!("/proc/sys/net/ipv6/conf/{name}/disable_ipv6"), "1");
        set_up(&name);
        let cname = std::ffi::CString::new(name.clone()).unwrap();
        // SAFETY: a valid NUL-terminated name.
        let ifindex = unsafe { libc::if_nametoindex(cname.as_ptr()) };
        assert_ne!(ifindex, 0);
        let proto = (libc::ETH_P_ALL as u16).to_be();
        // SAFETY: plain socket creation; the result is checked.
        let raw = unsafe {
            libc::socket(
                libc::AF_PACKET,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                i32::from(proto),
            )
        };
        assert!(raw >= 0, "packet socket: {}", io::Error::last_os_error());
        // SAFETY: a new fd we own.
        let sock = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: an all-zero sockaddr_ll is valid.
        let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_protocol = proto;
        addr.sll_ifindex = ifindex as i32;
        // SAFETY: binds to a sockaddr_ll of the given size.
        let ret = unsafe {
            libc::bind(
                raw,
                (&addr as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        assert_eq!(ret, 0, "bind: {}", io::Error::last_os_error());
        TestTap { tap, name, sock }
    }

    /// Sends `frame` out of the interface, i.e. into the tap fd's read queue.
    pub fn inject(&self, frame: &[u8]) {
        // SAFETY: sends from a valid buffer.
        let n = unsafe { libc::send(self.sock.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0) };
        assert_eq!(n, frame.len() as isize, "{}", io::Error::last_os_error());
    }

    /// The next frame with the test EtherType that the interface received, within 2 s.
    pub fn recv_test_frame(&self) -> Option<Vec<u8>> {
        let deadline = Instant::now() + Duration::from_secs(2);
        let mut buf = vec![0u8; 70000];
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() || !poll_in(self.sock.as_raw_fd(), left.as_millis() as i32) {
                return None;
            }
            // SAFETY: receives into a valid buffer.
            let n = unsafe {
                libc::recv(
                    self.sock.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    libc::MSG_DONTWAIT,
                )
            };
            if n >= 14 && buf[12..14] == TEST_ETHERTYPE.to_be_bytes() {
                return Some(buf[..n as usize].to_vec());
            }
        }
    }

    /// Another fd for the tap's queue, for a device under test (the interface lives as long
    /// as any of them).
    pub fn tap_fd_dup(&self) -> OwnedFd {
        // SAFETY: dup of an open fd; the result is checked.
        let fd = unsafe { libc::dup(self.tap.as_raw_fd()) };
        assert!(fd >= 0);
        // SAFETY: a new fd we own.
        unsafe { OwnedFd::from_raw_fd(fd) }
    }

    /// Whether a frame waits in the tap fd's queue (without reading it).
    pub fn tap_readable(&self) -> bool {
        poll_in(self.tap.as_raw_fd(), 0)
    }
}

fn poll_in(fd: i32, timeout_ms: i32) -> bool {
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: polls one valid pollfd.
    unsafe { libc::poll(&mut pfd, 1, timeout_ms) == 1 }
}

fn set_up(name: &str) {
    // SAFETY: plain socket creation; the result is checked.
    let raw = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    assert!(raw >= 0);
    // SAFETY: a new fd we own.
    let sock = unsafe { OwnedFd::from_raw_fd(raw) };
    // SAFETY: an all-zero ifreq is valid.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in ifr.ifr_name.iter_mut().zip(name.bytes()) {
        *d = s as libc::c_char;
    }
    // SAFETY: SIOCGIFFLAGS/SIOCSIFFLAGS read and write an ifreq.
    unsafe {
        assert_eq!(
            libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut ifr),
            0
        );
        ifr.ifr_ifru.ifru_flags |= libc::IFF_UP as i16;
        assert_eq!(
            libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &mut ifr),
            0
        );
    }
}
