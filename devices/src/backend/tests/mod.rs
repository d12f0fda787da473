//! The backends driven through the vhost crate's frontend, in process: the test plays both the
//! VMM (the vhost-user protocol, shared memfd memory) and the guest driver (split rings written
//! by hand into that memory).

mod blk;
mod net;

use std::fs::File;
use std::io::Write;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use vm_memory::{Address, Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{BackendError, Device, Server};
use crate::virtio::VIRTIO_RING_F_EVENT_IDX;

/// Guest memory: two 2 MiB regions with a hole between them, from one memfd.
const REGION_SIZE: usize = 0x20_0000;
const REGIONS: [u64; 2] = [0, 0x40_0000];
/// Queue size the test driver uses.
pub const QSIZE: u16 = 16;
/// Where the buffers live: the second region.
pub const DATA: u64 = 0x40_0000;

/// The server back from its thread, with its result per frontend.
pub type Finished<D> = (Server<D>, Vec<Result<(), BackendError>>);

/// A server on a fresh socket, serving on a thread.
pub struct Served<D: Device> {
    pub socket: PathBuf,
    pub thread: JoinHandle<Finished<D>>,
    _dir: tempfile::TempDir,
}

impl<D: Device> Served<D> {
    /// Serves `frontends` frontends one after the other.
    pub fn start(device: D, frontends: usize) -> Served<D> {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("backend.sock");
        let listener = UnixListener::bind(&socket).unwrap();
        let mut server = Server::new(listener, device);
        let thread = std::thread::spawn(move || {
            let results = (0..frontends).map(|_| server.serve_one()).collect();
            (server, results)
        });
        Served {
            socket,
            thread,
            _dir: dir,
        }
    }

    /// Waits (5 s at most) for the server to finish; its results per frontend.
    pub fn finish(self) -> Finished<D> {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !self.thread.is_finished() {
            assert!(Instant::now() < deadline, "the server did not return");
            std::thread::sleep(Duration::from_millis(5));
        }
        self.thread.join().unwrap()
    }
}

fn memfd(size: usize) -> File {
    // SAFETY: memfd_create takes a NUL-terminated name and flags; the result is checked.
    let fd = unsafe { libc::memfd_create(c"mvmm-backend-test".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
    // SAFETY: `fd` was just created and nothing else owns it.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(size as u64).unwrap();
    file
}

/// Shared guest memory, as a VMM creates it for vhost-user.
pub fn shared_memory() -> GuestMemoryMmap {
    let file = Arc::new(memfd(REGIONS.len() * REGION_SIZE));
    GuestMemoryMmap::from_ranges_with_files(REGIONS.iter().enumerate().map(|(i, &gpa)| {
        (
            GuestAddress(gpa),
            REGION_SIZE,
            Some(FileOffset::from_arc(file.clone(), (i * REGION_SIZE) as u64)),
        )
    }))
    .unwrap()
}

/// The VMM side of a vhost-user connection.
pub struct Driver {
    pub frontend: Frontend,
    pub mem: GuestMemoryMmap,
    pub features: u64,
    pub rings: Vec<Ring>,
}

/// How the test frontend starts the rings.
#[derive(Default)]
pub struct Start<'a> {
    /// Sends SET_VRING_ENABLE before SET_FEATURES, as QEMU does for net, instead of after
    /// setting up each ring.
    pub enable_early: bool,
    /// Fills a ring before the backend sees it (as a previous backend left it) and returns the
    /// available index the backend starts from (SET_VRING_BASE; 0 without it).
    pub prepare: Option<&'a dyn Fn(&mut Ring) -> u16>,
}

impl Driver {
    /// Connects (waiting for the socket), negotiates `wanted` of the offered features, shares
    /// the memory and starts `queues` rings.
    pub fn connect(socket: &Path, queues: usize, wanted: u64) -> Driver {
        Driver::connect_with(socket, queues, wanted, Start::default())
    }

    /// [`Driver::connect`], starting the rings as `start` says.
    pub fn connect_with(socket: &Path, queues: usize, wanted: u64, start: Start) -> Driver {
        let deadline = Instant::now() + Duration::from_secs(5);
        let stream = loop {
            match UnixStream::connect(socket) {
                Ok(s) => break s,
                Err(e) if Instant::now() < deadline => {
                    let _ = e;
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(e) => panic!("cannot connect to {}: {e}", socket.display()),
            }
        };
        if start.enable_early {
            // The vhost crate's frontend refuses this order, so it is written by hand: request
            // 18 (SET_VRING_ENABLE), version 1, no reply wanted; index and 1.
            for i in 0..queues as u32 {
                let mut msg = Vec::new();
                for word in [18u32, 1, 8, i, 1] {
                    msg.extend(word.to_ne_bytes());
                }
                (&stream).write_all(&msg).unwrap();
            }
        }
        let mut frontend = Frontend::from_stream(stream, queues as u64);
        frontend.set_owner().unwrap();
        let offered = frontend.get_features().unwrap();
        let protocol_bit = VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        assert_ne!(offered & protocol_bit, 0, "no PROTOCOL_FEATURES");
        let protocol = frontend.get_protocol_features().unwrap();
        let want = VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK;
        assert!(protocol.contains(want), "{protocol:?}");
        frontend.set_protocol_features(want).unwrap();
        assert_eq!(frontend.get_queue_num().unwrap(), queues as u64);
        let features = offered & (wanted | protocol_bit);
        frontend.set_features(features).unwrap();

        let mem = shared_memory();
        let regions: Vec<_> = mem
            .iter()
            .map(|r| VhostUserMemoryRegionInfo::from_guest_region(r).unwrap())
            .collect();
        frontend.set_mem_table(&regions).unwrap();

        let event_idx = features & VIRTIO_RING_F_EVENT_IDX != 0;
        let mut rings = (0..queues)
            .map(|i| Ring::new(&mem, i as u16, event_idx))
            .collect::<Vec<_>>();
        for ring in &mut rings {
            let base = start.prepare.map_or(0, |prepare| prepare(ring));
            let i = usize::from(ring.index);
            let host = |a: GuestAddress| mem.get_host_address(a).unwrap() as u64;
            frontend.set_vring_num(i, QSIZE).unwrap();
            frontend
                .set_vring_addr(
                    i,
                    &VringConfigData {
                        queue_max_size: QSIZE,
                        queue_size: QSIZE,
                        flags: 0,
                        desc_table_addr: host(ring.desc),
                        used_ring_addr: host(ring.used),
                        avail_ring_addr: host(ring.avail),
                        log_addr: None,
                    },
                )
                .unwrap();
            frontend.set_vring_base(i, base).unwrap();
            frontend.set_vring_call(i, &ring.call).unwrap();
            frontend.set_vring_kick(i, &ring.kick).unwrap();
            if !start.enable_early {
                frontend.set_vring_enable(i, true).unwrap();
            }
        }
        Driver {
            frontend,
            mem,
            features,
            rings,
        }
    }

    /// The device's configuration space.
    pub fn config(&mut self, size: u32) -> Vec<u8> {
        let buf = vec![0u8; size as usize];
        let (_, data) = self
            .frontend
            .get_config(
                0,
                size,
                vhost::vhost_user::message::VhostUserConfigFlags::empty(),
                &buf,
            )
            .unwrap();
        data
    }
}

/// One split virtqueue, played from the driver side.
pub struct Ring {
    pub index: u16,
    mem: GuestMemoryMmap,
    desc: GuestAddress,
    avail: GuestAddress,
    used: GuestAddress,
    next_desc: u16,
    event_idx: bool,
    pub kick: EventFd,
    pub call: EventFd,
}

impl Ring {
    /// Rings for queue `index` in the first region, 16 KiB apart.
    fn new(mem: &GuestMemoryMmap, index: u16, event_idx: bool) -> Ring {
        // Not at 0: virtio-queue takes an available ring at 0 for an unset one.
        let base = 0x1_0000 + 0x4000 * u64::from(index);
        let ring = Ring {
            index,
            mem: mem.clone(),
            desc: GuestAddress(base),
            avail: GuestAddress(base + 0x1000),
            used: GuestAddress(base + 0x2000),
            next_desc: 0,
            event_idx,
            kick: EventFd::new(EFD_NONBLOCK).unwrap(),
            call: EventFd::new(EFD_NONBLOCK).unwrap(),
        };
        mem.write_slice(&[0u8; 0x3000], ring.desc).unwrap();
        ring
    }

    /// Writes `descs` (address, length, device-writable) as one chain and makes it
    /// available, without kicking.
    pub fn add(&mut self, descs: &[(u64, u32, bool)]) -> u16 {
        let head = self.next_desc;
        for (i, &(addr, len, writable)) in descs.iter().enumerate() {
            let index = (head + i as u16) % QSIZE;
            let mut flags = if writable {
                VRING_DESC_F_WRITE as u16
            } else {
                0
            };
            if i + 1 < descs.len() {
                flags |= VRING_DESC_F_NEXT as u16;
            }
            let mut raw = [0u8; 16];
            raw[..8].copy_from_slice(&addr.to_le_bytes());
            raw[8..12].copy_from_slice(&len.to_le_bytes());
            raw[12..14].copy_from_slice(&flags.to_le_bytes());
            raw[14..].copy_from_slice(&((index + 1) % QSIZE).to_le_bytes());
            let at = self.desc.unchecked_add(16 * u64::from(index));
            self.mem.write_slice(&raw, at).unwrap();
        }
        self.next_desc = (head + descs.len() as u16) % QSIZE;
        let idx: u16 = self.mem.read_obj(self.avail.unchecked_add(2)).unwrap();
        let slot = self.avail.unchecked_add(4 + 2 * u64::from(idx % QSIZE));
        self.mem.write_obj(head, slot).unwrap();
        self.mem
            .write_obj(idx.wrapping_add(1), self.avail.unchecked_add(2))
            .unwrap();
        head
    }

    /// Asks for an interrupt at the next used buffer (EVENT_IDX), then kicks.
    pub fn kick(&self) {
        if self.event_idx {
            let used_event = self.avail.unchecked_add(4 + 2 * u64::from(QSIZE));
            self.mem.write_obj(self.used_idx(), used_event).unwrap();
        }
        self.kick.write(1).unwrap();
    }

    /// Asks for an interrupt at the next used buffer without kicking.
    pub fn want_interrupt(&self) {
        if self.event_idx {
            let used_event = self.avail.unchecked_add(4 + 2 * u64::from(QSIZE));
            self.mem.write_obj(self.used_idx(), used_event).unwrap();
        }
    }

    /// Puts chain `head` in the used ring as a device would, without an interrupt.
    pub fn complete(&self, head: u16, len: u32) {
        let idx = self.used_idx();
        let at = self.used.unchecked_add(4 + 8 * u64::from(idx % QSIZE));
        self.mem.write_obj(u32::from(head), at).unwrap();
        self.mem.write_obj(len, at.unchecked_add(4)).unwrap();
        self.mem
            .write_obj(idx.wrapping_add(1), self.used.unchecked_add(2))
            .unwrap();
    }

    pub fn used_idx(&self) -> u16 {
        self.mem.read_obj(self.used.unchecked_add(2)).unwrap()
    }

    /// Used element `i`: (head, length).
    pub fn used(&self, i: u16) -> (u32, u32) {
        let at = self.used.unchecked_add(4 + 8 * u64::from(i % QSIZE));
        let id: u32 = self.mem.read_obj(at).unwrap();
        let len: u32 = self.mem.read_obj(at.unchecked_add(4)).unwrap();
        (id, len)
    }

    /// Waits (5 s at most) for an interrupt, then for `n` used entries in all.
    pub fn wait_used(&self, n: u16) {
        assert!(
            poll_in(self.call.as_raw_fd(), 5000),
            "queue {}: no interrupt (used index {})",
            self.index,
            self.used_idx()
        );
        let _ = self.call.read();
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.used_idx() < n {
            assert!(
                Instant::now() < deadline,
                "queue {}: used index stuck",
                self.index
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(self.used_idx(), n);
    }
}

pub fn poll_in(fd: i32, timeout_ms: i32) -> bool {
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: polls one valid pollfd.
    unsafe { libc::poll(&mut pfd, 1, timeout_ms) == 1 }
}
