//! `mvmm backend blk` as a process: a frontend in the test connects over the socket, writes
//! and reads the disk through a virtqueue in shared memfd memory, and disconnects; the process
//! must exit 0 (or, persistent, serve the next frontend and stop on SIGTERM). Setup errors
//! exit 2 and name the culprit. Finally mvmm itself, as the frontend, runs the test guest's
//! virtio-blk checks against two backend processes.

mod common;

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vm_memory::{Address, Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

const MVMM: &str = env!("CARGO_BIN_EXE_mvmm");
const SECTORS: u64 = 128;
const QSIZE: u16 = 8;
const MEM_SIZE: usize = 0x10_0000;
const DESC: u64 = 0x1000;
const AVAIL: u64 = 0x2000;
const USED: u64 = 0x3000;
const HEADER: u64 = 0x8000;
const BUF: u64 = 0x9000;
const STATUS: u64 = 0xa000;
const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const EVENT_IDX: u64 = 1 << 29;
const VERSION_1: u64 = 1 << 32;

/// A backend process, killed if a failing test leaves it running.
struct Backend(Child);

impl Drop for Backend {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
        // A failed test shows what the backend said.
        if std::thread::panicking() {
            let mut stderr = String::new();
            if let Some(pipe) = self.0.stderr.as_mut() {
                let _ = std::io::Read::read_to_string(pipe, &mut stderr);
            }
            eprintln!("--- backend stderr ---\n{stderr}");
        }
    }
}

impl Backend {
    fn id(&self) -> u32 {
        self.0.id()
    }
}

fn spawn(args: &[&str]) -> Backend {
    Backend(
        Command::new(MVMM)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    )
}

fn wait_exit(backend: &mut Backend, within: Duration) -> (ExitStatus, String) {
    let child = &mut backend.0;
    let deadline = Instant::now() + within;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("mvmm backend did not exit within {within:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut stderr).unwrap();
    (status, stderr)
}

struct Disk {
    dir: tempfile::TempDir,
    image: PathBuf,
    socket: PathBuf,
}

fn disk() -> Disk {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.img");
    let bytes: Vec<u8> = (0..SECTORS * 512).map(|i| (i / 512) as u8).collect();
    std::fs::write(&image, bytes).unwrap();
    let socket = dir.path().join("blk.sock");
    Disk { dir, image, socket }
}

/// A VMM and its guest driver, in the test: one virtio-blk queue.
struct Driver {
    frontend: Frontend,
    mem: GuestMemoryMmap,
    kick: EventFd,
    call: EventFd,
    avail_idx: u16,
    event_idx: bool,
}

impl Driver {
    fn connect(socket: &Path) -> Driver {
        let deadline = Instant::now() + Duration::from_secs(10);
        let frontend = loop {
            match Frontend::connect(socket, 1) {
                Ok(f) => break f,
                Err(e) => {
                    assert!(Instant::now() < deadline, "cannot connect: {e}");
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        };
        let mut frontend = frontend;
        frontend.set_owner().unwrap();
        let offered = frontend.get_features().unwrap();
        let protocol_bit = VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        assert_ne!(offered & protocol_bit, 0);
        assert_ne!(offered & EVENT_IDX, 0);
        let protocol = frontend.get_protocol_features().unwrap();
        let wanted = VhostUserProtocolFeatures::CONFIG | VhostUserProtocolFeatures::REPLY_ACK;
        assert!(protocol.contains(wanted));
        frontend.set_protocol_features(wanted).unwrap();
        frontend.set_features(offered).unwrap();

        // SAFETY: memfd_create with a NUL-terminated name; the result is checked.
        let fd = unsafe { libc::memfd_create(c"backend-cli-test".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0);
        // SAFETY: a new descriptor nothing else owns.
        let file = unsafe { File::from_raw_fd(fd) };
        file.set_len(MEM_SIZE as u64).unwrap();
        let mem = GuestMemoryMmap::from_ranges_with_files([(
            GuestAddress(0),
            MEM_SIZE,
            Some(FileOffset::from_arc(Arc::new(file), 0)),
        )])
        .unwrap();
        let regions: Vec<_> = mem
            .iter()
            .map(|r| VhostUserMemoryRegionInfo::from_guest_region(r).unwrap())
            .collect();
        frontend.set_mem_table(&regions).unwrap();

        let host = |a: u64| mem.get_host_address(GuestAddress(a)).unwrap() as u64;
        let kick = EventFd::new(EFD_NONBLOCK).unwrap();
        let call = EventFd::new(EFD_NONBLOCK).unwrap();
        frontend.set_vring_num(0, QSIZE).unwrap();
        frontend
            .set_vring_addr(
                0,
                &VringConfigData {
                    queue_max_size: QSIZE,
                    queue_size: QSIZE,
                    flags: 0,
                    desc_table_addr: host(DESC),
                    used_ring_addr: host(USED),
                    avail_ring_addr: host(AVAIL),
                    log_addr: None,
                },
            )
            .unwrap();
        frontend.set_vring_base(0, 0).unwrap();
        frontend.set_vring_call(0, &call).unwrap();
        frontend.set_vring_kick(0, &kick).unwrap();
        frontend.set_vring_enable(0, true).unwrap();
        Driver {
            frontend,
            mem,
            kick,
            call,
            avail_idx: 0,
            event_idx: offered & EVENT_IDX != 0,
        }
    }

    fn capacity(&mut self) -> u64 {
        let (_, config) = self
            .frontend
            .get_config(
                0,
                8,
                vhost::vhost_user::message::VhostUserConfigFlags::empty(),
                &[0; 8],
            )
            .unwrap();
        u64::from_le_bytes(config[..8].try_into().unwrap())
    }

    /// One request: header, `len` data bytes at BUF (device-writable for reads), status.
    fn request(&mut self, kind: u32, sector: u64, len: u32) -> u8 {
        let mut header = [0u8; 16];
        header[..4].copy_from_slice(&kind.to_le_bytes());
        header[8..].copy_from_slice(&sector.to_le_bytes());
        self.mem.write_slice(&header, GuestAddress(HEADER)).unwrap();
        self.mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
        let descs = [
            (HEADER, 16u32, 0u16),
            (BUF, len, if kind == T_IN { 2 } else { 0 }),
            (STATUS, 1, 2),
        ];
        for (i, &(addr, len, flags)) in descs.iter().enumerate() {
            let next = if i + 1 < descs.len() { 1 } else { 0 };
            let mut raw = [0u8; 16];
            raw[..8].copy_from_slice(&addr.to_le_bytes());
            raw[8..12].copy_from_slice(&len.to_le_bytes());
            raw[12..14].copy_from_slice(&(flags | next).to_le_bytes());
            raw[14..].copy_from_slice(&(i as u16 + 1).to_le_bytes());
            let at = GuestAddress(DESC).unchecked_add(16 * i as u64);
            self.mem.write_slice(&raw, at).unwrap();
        }
        let slot = GuestAddress(AVAIL + 4 + 2 * u64::from(self.avail_idx % QSIZE));
        self.mem.write_obj(0u16, slot).unwrap();
        if self.event_idx {
            // used_event: interrupt for the entry this request will fill.
            let used_event = GuestAddress(AVAIL + 4 + 2 * u64::from(QSIZE));
            self.mem.write_obj(self.avail_idx, used_event).unwrap();
        }
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.mem
            .write_obj(self.avail_idx, GuestAddress(AVAIL + 2))
            .unwrap();
        self.kick.write(1).unwrap();

        let mut pfd = libc::pollfd {
            fd: self.call.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: polls one valid pollfd.
        assert_eq!(unsafe { libc::poll(&mut pfd, 1, 5000) }, 1, "no interrupt");
        let _ = self.call.read();
        let used: u16 = self.mem.read_obj(GuestAddress(USED + 2)).unwrap();
        assert_eq!(used, self.avail_idx);
        self.mem.read_obj(GuestAddress(STATUS)).unwrap()
    }

    /// Writes `data` at `sector`, reads it back and compares.
    fn round_trip(&mut self, sector: u64, seed: u8) {
        let data: Vec<u8> = (0..1024u32).map(|i| (i as u8).wrapping_mul(seed)).collect();
        self.mem.write_slice(&data, GuestAddress(BUF)).unwrap();
        assert_eq!(self.request(T_OUT, sector, 1024), 0);
        self.mem
            .write_slice(&[0u8; 1024], GuestAddress(BUF))
            .unwrap();
        assert_eq!(self.request(T_IN, sector, 1024), 0);
        let mut got = vec![0u8; 1024];
        self.mem.read_slice(&mut got, GuestAddress(BUF)).unwrap();
        assert_eq!(got, data);
    }
}

#[test]
fn blk_serves_one_frontend_and_exits_when_it_leaves() {
    let d = disk();
    let mut child = spawn(&[
        "backend",
        "blk",
        "--socket",
        d.socket.to_str().unwrap(),
        "--path",
        d.image.to_str().unwrap(),
        "--serial",
        "cli-disk",
    ]);
    let mut driver = Driver::connect(&d.socket);
    assert_ne!(VERSION_1 & driver.frontend.get_features().unwrap(), 0);
    assert_eq!(driver.capacity(), SECTORS);
    driver.round_trip(3, 7);
    // Sector 2 is untouched, the written ones hold the data.
    assert_eq!(driver.request(T_IN, 2, 512), 0);
    assert_eq!(driver.mem.read_obj::<u8>(GuestAddress(BUF)).unwrap(), 2);
    drop(driver);

    let (status, stderr) = wait_exit(&mut child, Duration::from_secs(10));
    assert_eq!(status.code(), Some(0), "{stderr}");
    assert!(stderr.contains("disconnected"), "{stderr}");
    assert!(!d.socket.exists(), "the socket file is left behind");
    let image = std::fs::read(&d.image).unwrap();
    let expected: Vec<u8> = (0..1024u32).map(|i| (i as u8).wrapping_mul(7)).collect();
    assert_eq!(image[3 * 512..5 * 512], expected[..]);
}

/// Descriptors open in process `pid`.
fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

#[test]
fn persistent_blk_serves_frontend_after_frontend_and_stops_on_sigterm() {
    let d = disk();
    // An old socket file is replaced.
    drop(std::os::unix::net::UnixListener::bind(&d.socket).unwrap());
    // A child that a parallel test forked just then holds the old listener until it execs;
    // a frontend connecting to it would be reset when that happens. Wait until it is gone.
    while std::os::unix::net::UnixStream::connect(&d.socket).is_ok() {
        std::thread::sleep(Duration::from_millis(5));
    }
    let mut child = spawn(&[
        "backend",
        "blk",
        "--socket",
        d.socket.to_str().unwrap(),
        "--path",
        d.image.to_str().unwrap(),
        "--persistent",
    ]);
    let mut fds = Vec::new();
    for round in 0..4u8 {
        let mut driver = Driver::connect(&d.socket);
        driver.round_trip(10 + u64::from(round), round + 3);
        // The previous connection is torn down by the time this one is served.
        fds.push(open_fds(child.id()));
    }
    // Nothing leaks from one frontend to the next.
    assert!(fds.windows(2).skip(1).all(|w| w[0] == w[1]), "{fds:?}");

    let start = Instant::now();
    // SAFETY: kill with a valid pid and signal.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGTERM) }, 0);
    let (status, stderr) = wait_exit(&mut child, Duration::from_secs(5));
    assert_eq!(status.code(), Some(0), "{stderr}");
    assert!(start.elapsed() < Duration::from_secs(2));
    assert!(stderr.contains("SIGTERM"), "{stderr}");
    assert!(!d.socket.exists());
}

#[test]
fn setup_errors_exit_2_and_name_the_culprit() {
    let d = disk();
    let missing = d.dir.path().join("no-such.img");
    let socket = d.socket.to_str().unwrap();
    let mut child = spawn(&[
        "backend",
        "blk",
        "--socket",
        socket,
        "--path",
        missing.to_str().unwrap(),
    ]);
    let (status, stderr) = wait_exit(&mut child, Duration::from_secs(5));
    assert_eq!(status.code(), Some(2), "{stderr}");
    assert!(stderr.contains(missing.to_str().unwrap()), "{stderr}");

    // A socket path that is some other file is not deleted.
    let image = d.image.to_str().unwrap();
    let mut child = spawn(&["backend", "blk", "--socket", image, "--path", image]);
    let (status, stderr) = wait_exit(&mut child, Duration::from_secs(5));
    assert_eq!(status.code(), Some(2), "{stderr}");
    assert!(stderr.contains(image), "{stderr}");
    assert!(d.image.exists());

    // A socket in a directory that does not exist.
    let bad_socket = d.dir.path().join("nodir/s.sock");
    let mut child = spawn(&[
        "backend",
        "blk",
        "--socket",
        bad_socket.to_str().unwrap(),
        "--path",
        image,
    ]);
    let (status, stderr) = wait_exit(&mut child, Duration::from_secs(5));
    assert_eq!(status.code(), Some(2), "{stderr}");
    assert!(stderr.contains(bad_socket.to_str().unwrap()), "{stderr}");

    // An inherited descriptor that is not open.
    let mut child = spawn(&["backend", "net", "--socket", socket, "--fd", "987"]);
    let (status, stderr) = wait_exit(&mut child, Duration::from_secs(5));
    assert_eq!(status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("987"), "{stderr}");
}

/// mvmm's own vhost-user frontend, with the test guest's virtio-mmio driver, against two
/// backend processes: the same checks as the in-VMM device passes (tests/virtio_blk.rs).
#[test]
fn the_vmm_and_its_guest_use_backend_disks() {
    let vm = common::VmDir::new();
    let (ro, rw) = (vm.path("store.img"), vm.path("data.img"));
    let ro_bytes = common::pseudo_random_bytes(1 << 20, 11);
    let rw_bytes = common::pseudo_random_bytes(2 << 20, 23);
    std::fs::write(&ro, &ro_bytes).unwrap();
    std::fs::write(&rw, &rw_bytes).unwrap();
    let (ro_sock, rw_sock) = (vm.path("ro.sock"), vm.path("rw.sock"));
    let backend = |sock: &Path, image: &Path, extra: &[&str]| {
        let mut args = vec![
            "backend",
            "blk",
            "--socket",
            sock.to_str().unwrap(),
            "--path",
            image.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        spawn(&args)
    };
    let mut backends = [
        backend(&ro_sock, &ro, &["--read-only", "--serial", "nix-store"]),
        backend(&rw_sock, &rw, &[]),
    ];
    let seed = 7;
    let json = format!(
        r#"{{"kernel": {{"path": "{}", "cmdline": "test=blk blk.seed={seed}"}},
            "machine": {{"vcpus": 1, "memory_mib": 64}},
            "disks": [{{"socket": "{}"}}, {{"socket": "{}"}}]}}"#,
        common::testguest("pvh").display(),
        ro_sock.display(),
        rw_sock.display()
    );
    let out = common::run_config(&vm.write_config(&json), Duration::from_secs(60));
    assert_eq!(out.code(), Some(0), "{}", out.dump());
    let expect = |prefix: &str, value: &str| {
        let got = common::line_value(&out.stdout, prefix);
        assert_eq!(got, Some(value), "{prefix}\n{}", out.dump());
    };
    const PATTERN_STARTS: [u64; 2] = [0, 2048];
    let mut written = Vec::new();
    let mut expected = rw_bytes.clone();
    for start in PATTERN_STARTS {
        for sector in start..start + 8 {
            let pattern = common::blk_pattern_sector(sector, seed);
            let at = (sector * 512) as usize;
            expected[at..at + 512].copy_from_slice(&pattern);
            written.extend(pattern);
        }
    }
    expect("blk1: flush=", "1");
    assert!(
        out.stdout.contains("blk1: write+flush+read ok\n"),
        "{}",
        out.dump()
    );
    expect("blk1: fnv=", &format!("{:016x}", common::fnv1a64(&written)));
    expect(
        "blk0: fnv=",
        &format!("{:016x}", common::fnv1a64(&ro_bytes[..64 << 10])),
    );
    expect("blk0: capacity=", &(ro_bytes.len() / 512).to_string());
    expect("blk0: id=", "nix-store");
    expect("blk0: ro=", "1");
    expect("blk0: write status=", "1");
    assert!(out.stdout.contains("blk: done"), "{}", out.dump());
    // The VM is gone, so are its frontends: both backends exit cleanly.
    for child in &mut backends {
        let (status, stderr) = wait_exit(child, Duration::from_secs(10));
        assert_eq!(status.code(), Some(0), "{stderr}");
    }
    assert!(
        std::fs::read(&rw).unwrap() == expected,
        "data.img does not hold exactly the guest's writes"
    );
    assert!(
        std::fs::read(&ro).unwrap() == ro_bytes,
        "the read-only disk changed"
    );
}
