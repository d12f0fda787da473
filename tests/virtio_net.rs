//! virtio-net end to end: the test guest sends one Ethernet frame through a tap that lives in a
//! network namespace of its own; a raw socket in that namespace answers it, and the guest
//! prints what it received. Both directions are checked.

mod common;

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

const ETHERTYPE: u16 = 0x88b5;
const GUEST_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
const HOST_MAC: [u8; 6] = [0x02, 0xaa, 0xbb, 0xcc, 0xdd, 0xee];

/// A network namespace with one tap in it, removed on drop.
struct NetNs {
    name: String,
}

fn ip(args: &[&str]) {
    let status = Command::new("ip").args(args).status().expect("run ip");
    assert!(status.success(), "ip {args:?} failed");
}

impl NetNs {
    fn with_tap(name: &str, tap: &str) -> Self {
        let _ = Command::new("ip").args(["netns", "del", name]).status();
        ip(&["netns", "add", name]);
        let ns = Self {
            name: name.to_owned(),
        };
        ip(&["-n", name, "tuntap", "add", tap, "mode", "tap"]);
        ip(&["-n", name, "link", "set", tap, "up"]);
        ns
    }

    /// Moves the calling thread into the namespace.
    fn enter(&self) {
        let file = std::fs::File::open(format!("/var/run/netns/{}", self.name)).unwrap();
        // SAFETY: setns on a namespace fd we hold; it only changes this thread's namespace.
        assert_eq!(
            unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) },
            0
        );
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// A raw AF_PACKET socket bound to `ifname` (in the current thread's namespace).
fn packet_socket(ifname: &str) -> OwnedFd {
    let proto = (libc::ETH_P_ALL as u16).to_be();
    // SAFETY: plain socket creation; the fd is owned below.
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, i32::from(proto)) };
    assert!(fd >= 0, "{}", std::io::Error::last_os_error());
    // SAFETY: fresh descriptor.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    let name = std::ffi::CString::new(ifname).unwrap();
    // SAFETY: a valid NUL-terminated name.
    let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
    assert_ne!(ifindex, 0, "no interface {ifname}");
    // SAFETY: sockaddr_ll is plain data; we fill the fields bind needs.
    let mut addr = unsafe { std::mem::zeroed::<libc::sockaddr_ll>() };
    addr.sll_family = libc::AF_PACKET as u16;
    addr.sll_protocol = proto;
    addr.sll_ifindex = ifindex as i32;
    // SAFETY: addr is a valid sockaddr_ll of the size given.
    let rc = unsafe {
        libc::bind(
            sock.as_raw_fd(),
            (&addr as *const libc::sockaddr_ll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as u32,
        )
    };
    assert_eq!(rc, 0, "{}", std::io::Error::last_os_error());
    let timeout = libc::timeval {
        tv_sec: 0,
        tv_usec: 100_000,
    };
    // SAFETY: setting a receive timeout with a valid timeval.
    unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&timeout as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as u32,
        );
    }
    sock
}

/// Waits for the guest's ping and answers it; returns the ping's payload.
fn answer_ping(sock: &OwnedFd, token: &str, deadline: Instant) -> Option<String> {
    let mut buf = [0u8; 2048];
    while Instant::now() < deadline {
        // SAFETY: reading into a buffer we own, of the length given.
        let n = unsafe { libc::recv(sock.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 14 {
            continue;
        }
        let frame = &buf[..n as usize];
        if u16::from_be_bytes([frame[12], frame[13]]) != ETHERTYPE || frame[6..12] != GUEST_MAC {
            continue;
        }
        let payload = String::from_utf8_lossy(&frame[14..])
            .trim_end_matches('\0')
            .to_owned();
        let mut reply = Vec::new();
        reply.extend_from_slice(&GUEST_MAC);
        reply.extend_from_slice(&HOST_MAC);
        reply.extend_from_slice(&ETHERTYPE.to_be_bytes());
        reply.extend_from_slice(format!("mvmm-pong {token}").as_bytes());
        reply.resize(60, 0);
        // SAFETY: sending a buffer we own.
        let sent = unsafe { libc::send(sock.as_raw_fd(), reply.as_ptr().cast(), reply.len(), 0) };
        assert_eq!(sent, reply.len() as isize);
        return Some(payload);
    }
    None
}

#[test]
fn guest_frame_reaches_the_host_and_the_answer_reaches_the_guest() {
    let id = std::process::id();
    let tap = format!("mvt{id}");
    let ns = NetNs::with_tap(&format!("mvmm-net-{id}"), &tap);
    let token = format!("tok{id}");

    // The responder lives in the namespace, as the host side of the tap.
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let responder = {
        let (ns_name, tap, token) = (ns.name.clone(), tap.clone(), token.clone());
        std::thread::spawn(move || {
            NetNs { name: ns_name }.enter_and_forget();
            let sock = packet_socket(&tap);
            ready_tx.send(()).unwrap();
            answer_ping(&sock, &token, Instant::now() + Duration::from_secs(60))
        })
    };
    // The socket must be listening before the guest sends.
    ready_rx.recv_timeout(Duration::from_secs(10)).unwrap();

    let vm = VmDir::new();
    let json = serde_json::json!({
        "kernel": {"path": testguest("pvh"), "cmdline": format!("test=net net.token={token}")},
        "machine": {"vcpus": 1, "memory_mib": 64},
        "net": [{"tap": tap, "mac": "52:54:00:12:34:56"}],
    });
    let config = vm.write_config(&json.to_string());
    let child = Command::new("ip")
        .args([
            "netns",
            "exec",
            &ns.name,
            mvmm_bin(),
            "--config",
            config.to_str().unwrap(),
        ])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let out = wait_with_timeout(child, Duration::from_secs(60));
    let ping = responder.join().unwrap();
    assert_eq!(out.code(), Some(0), "{}", out.dump());

    assert_eq!(
        ping.as_deref(),
        Some(format!("mvmm-ping {token}").as_str()),
        "{}",
        out.dump()
    );
    let s = &out.stdout;
    assert_eq!(
        line_value(s, "net: mac="),
        Some("52:54:00:12:34:56"),
        "{}",
        out.dump()
    );
    assert!(s.contains("net: sent 60\n"), "{}", out.dump());
    assert!(
        s.contains(&format!("net: received 60 payload=mvmm-pong {token}\n")),
        "{}",
        out.dump()
    );
    assert_eq!(
        line_value(s, "net: from="),
        Some("02:aa:bb:cc:dd:ee"),
        "{}",
        out.dump()
    );
}

impl NetNs {
    /// Enters the namespace without deleting it when this handle goes away.
    fn enter_and_forget(self) {
        self.enter();
        std::mem::forget(self);
    }
}
