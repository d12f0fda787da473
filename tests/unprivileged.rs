//! mvmm as an unprivileged user (nobody, 65534, no supplementary groups) with everything it
//! cannot open itself passed as inherited descriptors: /dev/kvm (`"kvm": "fd:N"`), two disk
//! images (`disks[].path: "fd:N"`) and a tap (`net[].fd`). The test guest runs its blk and
//! net tests; while it waits for the network answer, /proc shows whom mvmm runs as. The same
//! VM with paths instead of descriptors fails as nobody: the descriptors are what make it work.

mod common;

use std::fs::{File, OpenOptions};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::netns::{packet_socket, NetNs};
use common::*;

const NOBODY: u32 = 65534;
const TIMEOUT: Duration = Duration::from_secs(60);
const ETHERTYPE: u16 = 0x88b5;
const GUEST_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x57];
const HOST_MAC: [u8; 6] = [0x02, 0xaa, 0xbb, 0xcc, 0xdd, 0xef];
const SEED: u64 = 5;

/// Attaches to tap `name` (in the calling thread's namespace) as mvmm would.
fn open_tap(name: &str) -> OwnedFd {
    let tun = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")
        .unwrap();
    // SAFETY: an all-zero ifreq is valid; we fill in the name and flags.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in ifr.ifr_name.iter_mut().zip(name.bytes()) {
        *dst = src as libc::c_char;
    }
    ifr.ifr_ifru.ifru_flags = (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as i16;
    // SAFETY: TUNSETIFF reads an ifreq, which ifr is.
    let rc = unsafe { libc::ioctl(tun.as_raw_fd(), libc::TUNSETIFF, &mut ifr) };
    assert_eq!(
        rc,
        0,
        "TUNSETIFF {name}: {}",
        std::io::Error::last_os_error()
    );
    tun.into()
}

/// Waits for the guest's ping; returns its payload (the answer is sent separately).
fn receive_ping(sock: &OwnedFd, deadline: Instant) -> Option<String> {
    let mut buf = [0u8; 2048];
    while Instant::now() < deadline {
        // SAFETY: reading into a buffer we own, of the length given.
        let n = unsafe { libc::recv(sock.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 14 {
            continue;
        }
        let frame = &buf[..n as usize];
        if u16::from_be_bytes([frame[12], frame[13]]) == ETHERTYPE && frame[6..12] == GUEST_MAC {
            let payload = String::from_utf8_lossy(&frame[14..]);
            return Some(payload.trim_end_matches('\0').to_owned());
        }
    }
    None
}

fn send_pong(sock: &OwnedFd, token: &str) {
    let mut reply = Vec::new();
    reply.extend_from_slice(&GUEST_MAC);
    reply.extend_from_slice(&HOST_MAC);
    reply.extend_from_slice(&ETHERTYPE.to_be_bytes());
    reply.extend_from_slice(format!("mvmm-pong {token}").as_bytes());
    reply.resize(60, 0);
    // SAFETY: sending a buffer we own.
    let sent = unsafe { libc::send(sock.as_raw_fd(), reply.as_ptr().cast(), reply.len(), 0) };
    assert_eq!(sent, reply.len() as isize);
}

/// The `Uid:`, `Gid:` and `Groups:` lines of a running process.
fn credentials(pid: u32) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .filter(|l| l.starts_with("Uid:") || l.starts_with("Gid:") || l.starts_with("Groups:"))
        .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
        .collect::<Vec<_>>()
        .join("\n")
}

/// mvmm as nobody, with `keep` left open across exec at the same numbers.
fn nobody_mvmm(config: &std::path::Path, keep: Vec<RawFd>) -> Command {
    let mut cmd = Command::new(mvmm_bin());
    cmd.args(["--config", config.to_str().unwrap()])
        .uid(NOBODY)
        .gid(NOBODY)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // SAFETY: the closure only calls fcntl, which is async-signal-safe, on descriptors this
    // process holds open until the child has started.
    unsafe {
        cmd.pre_exec(move || {
            for &fd in &keep {
                if libc::fcntl(fd, libc::F_SETFD, 0) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    cmd
}

/// A VM directory nobody can read (for the config), holding root-only disk images.
struct Setup {
    vm: VmDir,
    store_bytes: Vec<u8>,
    data_bytes: Vec<u8>,
}

impl Setup {
    fn new() -> Self {
        let vm = VmDir::new();
        std::fs::set_permissions(vm.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let store_bytes = pseudo_random_bytes(1 << 20, 31);
        let data_bytes = pseudo_random_bytes(2 << 20, 37);
        for (name, bytes) in [("store.img", &store_bytes), ("data.img", &data_bytes)] {
            std::fs::write(vm.path(name), bytes).unwrap();
            // Only root may open them: mvmm as nobody must get them as descriptors.
            std::fs::set_permissions(vm.path(name), std::fs::Permissions::from_mode(0o600))
                .unwrap();
        }
        Self {
            vm,
            store_bytes,
            data_bytes,
        }
    }

    fn write_config(&self, name: &str, json: serde_json::Value) -> std::path::PathBuf {
        let path = self.vm.path(name);
        std::fs::write(&path, json.to_string()).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        path
    }
}

fn machine(cmdline: &str) -> serde_json::Value {
    serde_json::json!({
        "kernel": {"path": testguest("pvh"), "cmdline": cmdline},
        "machine": {"vcpus": 1, "memory_mib": 64},
    })
}

#[test]
fn nobody_boots_a_disk_and_tap_vm_from_inherited_fds() {
    let id = std::process::id();
    let tap = format!("mvu{id}");
    let ns = NetNs::with_tap(&format!("mvmm-unpriv-{id}"), &tap);
    let setup = Setup::new();

    // Everything mvmm may not open as nobody, opened here as root.
    let kvm = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .unwrap();
    let store = File::open(setup.vm.path("store.img")).unwrap();
    let data = OpenOptions::new()
        .read(true)
        .write(true)
        .open(setup.vm.path("data.img"))
        .unwrap();
    let tap_fd = {
        let tap = tap.clone();
        ns.spawn_inside(move || open_tap(&tap)).join().unwrap()
    };
    let token = format!("nobody{id}");
    let mut json = machine(&format!(
        "test=blk blk.seed={SEED} test=net net.token={token}"
    ));
    json["kvm"] = format!("fd:{}", kvm.as_raw_fd()).into();
    json["disks"] = serde_json::json!([
        {"path": format!("fd:{}", store.as_raw_fd()), "read_only": true, "serial": "nix-store"},
        {"path": format!("fd:{}", data.as_raw_fd())},
    ]);
    json["net"] = serde_json::json!([
        {"fd": tap_fd.as_raw_fd(), "mac": "52:54:00:12:34:57"},
    ]);
    let config = setup.write_config("vm.json", json);

    // The host side of the tap answers only after /proc has shown who mvmm runs as, so the
    // check cannot race the guest's exit.
    let (pid_tx, pid_rx) = std::sync::mpsc::channel::<u32>();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let responder = {
        let (tap, token) = (tap.clone(), token.clone());
        ns.spawn_inside(move || {
            let sock = packet_socket(&tap);
            ready_tx.send(()).unwrap();
            let pid = pid_rx.recv().unwrap();
            let ping = receive_ping(&sock, Instant::now() + TIMEOUT);
            let creds = credentials(pid);
            if ping.is_some() {
                send_pong(&sock, &token);
            }
            (ping, creds)
        })
    };
    ready_rx.recv_timeout(Duration::from_secs(10)).unwrap();

    let keep = vec![
        kvm.as_raw_fd(),
        store.as_raw_fd(),
        data.as_raw_fd(),
        tap_fd.as_raw_fd(),
    ];
    let child = nobody_mvmm(&config, keep).spawn().expect("spawn mvmm");
    pid_tx.send(child.id()).unwrap();
    let out = wait_with_timeout(child, TIMEOUT);
    let (ping, creds) = responder.join().unwrap();
    assert_eq!(out.code(), Some(0), "{}", out.dump());

    // mvmm really ran as nobody, without supplementary groups.
    assert!(
        creds.contains("Uid: 65534 65534 65534 65534"),
        "{creds}\n{}",
        out.dump()
    );
    assert!(creds.contains("Gid: 65534 65534 65534 65534"), "{creds}");
    assert!(creds.lines().any(|l| l == "Groups:"), "{creds}");

    // The network both ways through the inherited tap.
    assert_eq!(
        ping.as_deref(),
        Some(format!("mvmm-ping {token}").as_str()),
        "{}",
        out.dump()
    );
    let s = &out.stdout;
    assert!(
        s.contains(&format!("net: received 60 payload=mvmm-pong {token}\n")),
        "{}",
        out.dump()
    );

    // The disks through the inherited descriptors: the guest's report and the host files.
    let expect = |prefix: &str, value: &str| {
        assert_eq!(
            line_value(s, prefix),
            Some(value),
            "{prefix}\n{}",
            out.dump()
        );
    };
    expect("blk0: id=", "nix-store");
    expect("blk0: ro=", "1");
    expect("blk0: write status=", "1");
    expect(
        "blk0: fnv=",
        &format!("{:016x}", fnv1a64(&setup.store_bytes[..64 << 10])),
    );
    assert!(s.contains("blk1: write+flush+read ok\n"), "{}", out.dump());
    let after = std::fs::read(setup.vm.path("data.img")).unwrap();
    let mut expected = setup.data_bytes.clone();
    for start in [0u64, 2048] {
        for sector in start..start + 8 {
            let at = (sector * 512) as usize;
            expected[at..at + 512].copy_from_slice(&blk_pattern_sector(sector, SEED));
        }
    }
    assert!(
        after == expected,
        "data.img does not hold the guest's writes"
    );
    assert!(std::fs::read(setup.vm.path("store.img")).unwrap() == setup.store_bytes);
}

#[test]
fn nobody_cannot_open_what_it_was_not_given() {
    let setup = Setup::new();
    let disks = serde_json::json!([
        {"path": "store.img", "read_only": true},
        {"path": "data.img"},
    ]);

    // Paths only: /dev/kvm (root's, mode 0600) is the first thing mvmm cannot open.
    let mut json = machine("test=blk");
    json["disks"] = disks.clone();
    let config = setup.write_config("paths.json", json);
    let out = wait_with_timeout(nobody_mvmm(&config, vec![]).spawn().unwrap(), TIMEOUT);
    assert_eq!(out.code(), Some(1), "{}", out.dump());
    assert!(
        out.stderr.contains("cannot open /dev/kvm: ") && out.stderr.contains("ermission denied"),
        "{}",
        out.dump()
    );

    // KVM as a descriptor, the disks by path: the first disk is refused, naming the field.
    let kvm = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .unwrap();
    let mut json = machine("test=blk");
    json["kvm"] = format!("fd:{}", kvm.as_raw_fd()).into();
    json["disks"] = disks;
    let config = setup.write_config("kvm-fd.json", json);
    let keep = vec![kvm.as_raw_fd()];
    let out = wait_with_timeout(nobody_mvmm(&config, keep).spawn().unwrap(), TIMEOUT);
    assert_eq!(out.code(), Some(2), "{}", out.dump());
    assert!(
        out.stderr.contains("disks[0].path") && out.stderr.contains("ermission denied"),
        "{}",
        out.dump()
    );

    // A descriptor that was not passed (close-on-exec) is named, with what to do.
    let store = File::open(setup.vm.path("store.img")).unwrap();
    let mut json = machine("");
    json["disks"] =
        serde_json::json!([{"path": format!("fd:{}", store.as_raw_fd()), "read_only": true}]);
    let config = setup.write_config("not-passed.json", json);
    let out = wait_with_timeout(nobody_mvmm(&config, vec![]).spawn().unwrap(), TIMEOUT);
    assert_eq!(out.code(), Some(2), "{}", out.dump());
    assert!(
        out.stderr.contains(&format!(
            "disks[0].path`: fd:{} is not open",
            store.as_raw_fd()
        )),
        "{}",
        out.dump()
    );
}
