//! `mvmm backend net` against the real Linux virtio-net driver, under QEMU/TCG (see
//! `tests/common/linux_guest.rs`): QEMU's `-netdev vhost-user` NIC connects to the backend
//! process, whose tap lives in a network namespace of the test's own, with the address
//! 192.0.2.1/24 and `resources/guest/net-peer.py` listening on it. The guest runs
//! `resources/guest/tests/net.sh`: its MAC, an address, ping, a TCP upload and download with
//! MD5 checks, and its offloads as `ethtool -k` reports them.
//!
//! Needs root (namespaces, taps). QEMU emulates the NIC's config space itself (MAC, status)
//! and passes the guest's features on to the backend, so the test checks that the features the
//! backend was told, the guest's own and the offloads Linux turned on agree.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use common::linux_guest::{tool_path, Backend, GuestOutcome, GuestRun, BACKEND_EXIT};

const MAC: &str = "52:54:00:12:34:56";
const TAP: &str = "mvtap0";
const PEER_PORT: &str = "5201";

// virtio-net feature bits (virtio 1.2, 5.1.3).
const CSUM: u32 = 0;
const GUEST_CSUM: u32 = 1;
const MAC_BIT: u32 = 5;
const GUEST_TSO4: u32 = 7;
const GUEST_TSO6: u32 = 8;
const GUEST_ECN: u32 = 9;
const GUEST_UFO: u32 = 10;
const HOST_TSO4: u32 = 11;
const HOST_TSO6: u32 = 12;
const HOST_ECN: u32 = 13;
const HOST_UFO: u32 = 14;
const MRG_RXBUF: u32 = 15;
/// The bits QEMU passes through between the guest and a vhost-user-net backend that decide
/// the data path (QEMU handles the control-queue, MAC and status bits itself).
const DATA_PATH_BITS: [u32; 11] = [
    CSUM, GUEST_CSUM, GUEST_TSO4, GUEST_TSO6, GUEST_ECN, GUEST_UFO, HOST_TSO4, HOST_TSO6, HOST_ECN,
    HOST_UFO, MRG_RXBUF,
];

fn has(features: u64, bit: u32) -> bool {
    features & (1 << bit) != 0
}

/// A network namespace of the test's own, holding the tap (192.0.2.1/24); deleted on drop.
struct NetNs {
    name: String,
}

impl NetNs {
    fn new() -> NetNs {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let ns = NetNs {
            name: format!(
                "mvmmt{}-{}",
                std::process::id(),
                NEXT.fetch_add(1, Ordering::Relaxed)
            ),
        };
        ip(&["netns", "add", &ns.name]);
        for args in [
            &["tuntap", "add", "dev", TAP, "mode", "tap"][..],
            &["addr", "add", "192.0.2.1/24", "dev", TAP],
            &["link", "set", TAP, "up"],
            &["link", "set", "lo", "up"],
        ] {
            let mut all = vec!["-n", ns.name.as_str()];
            all.extend(args);
            ip(&all);
        }
        ns
    }

    /// `ip netns exec NAME PROGRAM`: ip execs the program, so the pid is the program's.
    fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name])
            .arg(program)
            .env("PATH", tool_path());
        cmd
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        // Deleting the namespace removes the tap with it.
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .env("PATH", tool_path())
            .status();
    }
}

fn ip(args: &[&str]) {
    let out = Command::new("ip")
        .args(args)
        .env("PATH", tool_path())
        .output()
        .expect("run ip (iproute2)");
    assert!(
        out.status.success(),
        "ip {} failed (these tests need root): {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `net-peer.py` in the namespace; killed on drop.
struct Peer {
    child: Child,
    out: PathBuf,
}

impl Peer {
    fn start(ns: &NetNs, dir: &Path) -> Peer {
        let out = dir.join("peer.out");
        let ready = dir.join("peer.ready");
        let script = common::linux_guest::guest_dir().join("net-peer.py");
        let mut cmd = ns.command("python3");
        cmd.arg(script)
            .args(["--listen", "192.0.2.1", "--port", PEER_PORT, "--count", "2"])
            .arg("--ready-file")
            .arg(&ready)
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&out).unwrap())
            .stderr(std::fs::File::create(dir.join("peer.err")).unwrap());
        let mut peer = Peer {
            child: cmd.spawn().expect("spawn net-peer.py"),
            out,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while !ready.exists() {
            if let Ok(Some(status)) = peer.child.try_wait() {
                panic!(
                    "net-peer.py exited ({status}): {}",
                    std::fs::read_to_string(dir.join("peer.err")).unwrap_or_default()
                );
            }
            assert!(Instant::now() < deadline, "net-peer.py is not listening");
            thread::sleep(Duration::from_millis(20));
        }
        peer
    }

    /// The MD5 the peer computed for its `PUT` or `GET` request.
    fn md5(&self, op: &str) -> Option<String> {
        let text = std::fs::read_to_string(&self.out).ok()?;
        let line = text
            .lines()
            .find(|l| l.starts_with(&format!("PEER {op} ")))?;
        let md5 = line
            .split_whitespace()
            .find_map(|w| w.strip_prefix("md5="))?;
        Some(md5.to_string())
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// What the backend logged about the last negotiation (QEMU sets the features more than
/// once; the guest's come last): (offered, accepted, tap offloads).
fn negotiated(log: &str) -> Option<(u64, u64, u64)> {
    let line = log.lines().rfind(|l| l.contains("offered features"))?;
    let hex_after = |key: &str| {
        let rest = line[line.find(key)? + key.len()..].strip_prefix("0x")?;
        let end = rest
            .find(|c: char| !c.is_ascii_hexdigit())
            .unwrap_or(rest.len());
        u64::from_str_radix(&rest[..end], 16).ok()
    };
    Some((
        hex_after("offered features ")?,
        hex_after("the driver accepted ")?,
        hex_after("tap offloads ")?,
    ))
}

/// The guest's negotiated features (`RESULT net-features INFO hex=0x...`).
fn guest_features(guest: &GuestOutcome) -> Option<u64> {
    let detail = guest.detail("net-features")?;
    let hex = detail
        .split_whitespace()
        .find_map(|w| w.strip_prefix("hex=0x"))?;
    u64::from_str_radix(hex, 16).ok()
}

/// The offloads the guest's `ethtool -k` reports as on.
fn guest_offloads(guest: &GuestOutcome) -> Vec<String> {
    guest
        .detail("net-offloads")
        .and_then(|d| d.strip_prefix("on: ").map(str::to_string))
        .map(|list| list.split(',').map(str::to_string).collect())
        .unwrap_or_default()
}

/// One guest run of net.sh against `mvmm backend net`, with the QEMU NIC properties
/// `net_opts`, moving `mib` MiB each way; checks everything and returns the negotiated
/// (guest features, backend's accepted features, tap offloads, ethtool's offloads).
fn linux_exchanges_traffic(net_opts: &str, mib: u32) -> (u64, u64, u64, Vec<String>) {
    let t0 = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let ns = NetNs::new();
    let peer = Peer::start(&ns, dir.path());
    let socket = dir.path().join("net.sock");
    let mut cmd = ns.command(common::mvmm_bin());
    cmd.args(["backend", "net", "--socket"])
        .arg(&socket)
        .args(["--tap", TAP, "--mac", MAC]);
    let mut backend = Backend::spawn(cmd, &socket, &dir.path().join("backend.log"));
    let mut args: Vec<String> = [
        "--vhost-user-net",
        socket.to_str().unwrap(),
        "--mac",
        MAC,
        "-p",
        &format!("mac={MAC}"),
        "-p",
        &format!("net_mib={mib}"),
    ]
    .map(str::to_string)
    .to_vec();
    if !net_opts.is_empty() {
        args.extend(["--net-opts".to_string(), net_opts.to_string()]);
    }
    let guest = GuestRun::start("net", &args).finish();
    let status = backend.wait_exit(BACKEND_EXIT);
    let log = backend.log_text();
    let context = format!("--- backend log ---\n{log}");
    guest.assert_all_pass(
        &[
            "net-present",
            "net-mac",
            "net-link",
            "net-ping",
            "net-tx",
            "net-rx",
        ],
        &context,
    );
    assert!(
        status.success(),
        "the backend did not exit 0 after QEMU disconnected: {status}\n{context}"
    );

    // The peer on the host saw the same bytes as the guest, both ways.
    let bytes = u64::from(mib) << 20;
    for (check, op) in [("net-tx", "PUT"), ("net-rx", "GET")] {
        let detail = guest.detail(check).unwrap();
        let guest_md5 = detail
            .split_whitespace()
            .find_map(|w| w.strip_prefix("md5="))
            .unwrap_or_else(|| panic!("no md5 in {check}: {detail}"));
        assert!(detail.starts_with(&format!("{bytes} bytes")), "{detail}");
        assert_eq!(
            peer.md5(op).as_deref(),
            Some(guest_md5),
            "the peer's {op} checksum differs from the guest's ({check})\n{}",
            guest.dump()
        );
    }

    let (offered, accepted, tap_offloads) =
        negotiated(&log).unwrap_or_else(|| panic!("the backend logged no negotiation\n{context}"));
    let guest_features = guest_features(&guest)
        .unwrap_or_else(|| panic!("no net-features line from the guest\n{}", guest.dump()));
    let offloads = guest_offloads(&guest);
    assert_eq!(
        accepted & !offered,
        0,
        "accepted what was not offered\n{context}"
    );
    assert!(
        has(offered, MAC_BIT),
        "--mac must offer VIRTIO_NET_F_MAC\n{context}"
    );
    for bit in DATA_PATH_BITS {
        assert_eq!(
            has(guest_features, bit),
            has(accepted, bit),
            "feature bit {bit}: the guest has {guest_features:#x}, the backend was told \
             {accepted:#x}\n{context}"
        );
    }
    eprintln!(
        "linux_exchanges_traffic({net_opts:?}): guest features {guest_features:#x}, backend \
         accepted {accepted:#x}, tap offloads {tap_offloads:#x}, ethtool on: {}; guest {:.1?}, \
         total {:.1?}",
        offloads.join(","),
        guest.elapsed,
        t0.elapsed()
    );
    (guest_features, accepted, tap_offloads, offloads)
}

/// Whether ethtool lists `name` as on.
fn on(offloads: &[String], name: &str) -> bool {
    offloads.iter().any(|o| o == name)
}

/// QEMU's defaults: every offload the backend offers is negotiated, Linux turns on transmit
/// checksums, TSO and hardware GRO, and the tap passes the guest checksum-less and TSO frames.
#[test]
fn linux_negotiates_offloads_and_moves_32_mib_each_way() {
    let (guest, accepted, tap, offloads) = linux_exchanges_traffic("", 32);
    for bit in DATA_PATH_BITS {
        assert!(
            has(accepted, bit),
            "bit {bit} not negotiated: {accepted:#x}"
        );
    }
    // ethtool's view follows the negotiated bits.
    assert!(on(&offloads, "tx-checksumming"), "{offloads:?} {guest:#x}");
    // Receive side: the device may hand Linux TSO-sized frames (GUEST_TSO4/6).
    assert!(on(&offloads, "rx-gro-hw"), "{offloads:?} {guest:#x}");
    assert!(
        on(&offloads, "tcp-segmentation-offload"),
        "{offloads:?} {guest:#x}"
    );
    // TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_TSO_ECN | TUN_F_UFO.
    assert_eq!(tap, 0x1f, "tap offloads for {accepted:#x}");
}

/// A guest without offloads and without mergeable receive buffers (small 1.5 KiB buffers):
/// Linux turns its offloads off, the tap is told to pass only plain frames, and the traffic
/// still arrives intact.
#[test]
fn linux_without_offloads_or_mergeable_buffers_still_moves_data() {
    let off = "csum=off,guest_csum=off,guest_tso4=off,guest_tso6=off,guest_ecn=off,\
               guest_ufo=off,host_tso4=off,host_tso6=off,host_ecn=off,host_ufo=off,\
               mrg_rxbuf=off";
    let (guest, accepted, tap, offloads) = linux_exchanges_traffic(off, 8);
    for bit in DATA_PATH_BITS {
        assert!(!has(accepted, bit), "bit {bit} negotiated: {accepted:#x}");
    }
    // (Linux reports rx-checksumming on whatever was negotiated: it only means it may take a
    // checksum the device vouches for, which without GUEST_CSUM never comes.)
    for name in ["tx-checksumming", "tcp-segmentation-offload", "rx-gro-hw"] {
        assert!(
            !on(&offloads, name),
            "{name} is on: {offloads:?} {guest:#x}"
        );
    }
    assert_eq!(tap, 0, "tap offloads for {accepted:#x}");
}
