//! virtio-net end to end: the test guest sends one Ethernet frame through a tap that lives in a
//! network namespace of its own; a raw socket in that namespace answers it, and the guest
//! prints what it received. Both directions are checked.

mod common;

use std::os::fd::{AsRawFd, OwnedFd};
use std::process::Command;
use std::time::{Duration, Instant};

use common::netns::{packet_socket, NetNs};
use common::*;

const ETHERTYPE: u16 = 0x88b5;
const GUEST_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
const HOST_MAC: [u8; 6] = [0x02, 0xaa, 0xbb, 0xcc, 0xdd, 0xee];

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
        let (tap, token) = (tap.clone(), token.clone());
        ns.spawn_inside(move || {
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
