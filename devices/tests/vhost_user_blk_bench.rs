//! Smoke test of the vhost-user-blk benchmark harness (`benches/vhost_user_blk_path.rs`), so
//! that CI notices when it breaks: short runs against mvmm's backend (served in-process, the
//! code `mvmm backend blk` runs) and against qemu-storage-daemon, with `--verify` on a disk
//! whose pages start with their own offsets.

#[allow(dead_code)]
#[path = "../benches/vhost_user_blk_path.rs"]
mod bench;

use std::io::Write;
use std::os::unix::fs::FileExt;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bench::common::blk::PAGE;
use bench::common::blk_options::{BlkOptions, Workload};
use bench::common::panic_on_error;
use bench::{measure, write_self_offset_image, Options, Report};

const DISK: u64 = 16 << 20;
/// What the harness's write buffers hold after each page's first word (its data pattern).
const WRITTEN: u8 = (8 ^ 0xa5) | 1;
/// What `write_self_offset_image` puts there.
const ORIGINAL: u8 = 0x3c;

fn disk(dir: &Path) -> std::path::PathBuf {
    let path = dir.join("disk.img");
    let mut f = std::io::BufWriter::new(std::fs::File::create(&path).unwrap());
    write_self_offset_image(&mut f, DISK).unwrap();
    f.flush().unwrap();
    path
}

fn options(workload: Workload, bs: u64, qd: usize, event_idx: bool) -> BlkOptions {
    BlkOptions {
        workload,
        bs,
        qd,
        seconds: 0.2,
        warmup: 0.05,
        event_idx,
        verify: true,
    }
}

/// Checks what every run must show, and returns it.
fn checked(o: &Options) -> Report {
    let r = measure(o);
    assert!(r.m.tally.ios > 0, "no request completed: {}", r.json(o));
    assert_eq!(r.m.tally.bytes, r.m.tally.ios * o.blk.bs);
    assert_eq!(
        r.capacity, DISK,
        "capacity from the backend's configuration space"
    );
    assert_eq!(
        r.event_idx, o.blk.event_idx,
        "EVENT_IDX negotiated as asked"
    );
    assert!(r.m.tally.kicks <= r.m.tally.ios, "more kicks than requests");
    // Every wake-up found at least one interrupt signalled.
    assert!(r.m.wakeups > 0 && r.m.irqs >= r.m.wakeups);
    // The JSON line the script parses.
    let json = r.json(o);
    assert!(json.starts_with('{') && json.ends_with('}') && json.contains("\"iops\":"));
    r
}

/// After writes: every page still starts with its offset (nothing landed in the wrong place)
/// and some pages carry the harness's data (the writes reached the file).
fn written_pages(path: &Path) -> u64 {
    let f = std::fs::File::open(path).unwrap();
    let mut page = vec![0u8; PAGE as usize];
    let mut written = 0;
    for offset in (0..DISK).step_by(PAGE as usize) {
        f.read_exact_at(&mut page, offset).unwrap();
        let first = u64::from_le_bytes(page[..8].try_into().unwrap());
        assert_eq!(
            first, offset,
            "the page at {offset:#x} does not start with its offset"
        );
        match page[8] {
            WRITTEN => written += 1,
            ORIGINAL => {}
            other => panic!("the page at {offset:#x} holds {other:#x} after its first word"),
        }
    }
    written
}

#[test]
fn harness_drives_mvmm_backend_and_data_lands_in_place() {
    panic_on_error();
    let dir = tempfile::tempdir().unwrap();
    let path = disk(dir.path());
    let run = |blk: BlkOptions| {
        checked(&Options {
            socket: None,
            file: Some(path.clone()),
            backend_pid: None,
            connect_timeout: 10.0,
            blk,
        })
    };
    let w = run(options(Workload::RandWrite, 4096, 32, true));
    // QD 32 with EVENT_IDX: far fewer kicks and interrupts than requests.
    assert!(
        w.m.tally.kicks * 4 < w.m.tally.ios,
        "kicks {}",
        w.m.tally.kicks
    );
    let written = written_pages(&path);
    assert!(written > 0, "no write reached the file");
    run(options(Workload::RandRead, 4096, 1, true));
    run(options(Workload::SeqWrite, 128 << 10, 4, false));
    assert!(written_pages(&path) >= written);
    run(options(Workload::SeqRead, 128 << 10, 4, false));
}

/// qemu-storage-daemon on `path`, killed (by its own handle) when dropped.
struct Qsd(Child);

impl Drop for Qsd {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn harness_drives_qemu_storage_daemon() {
    panic_on_error();
    let dir = tempfile::tempdir().unwrap();
    let path = disk(dir.path());
    let socket = dir.path().join("qsd.sock");
    let log = std::fs::File::create(dir.path().join("qsd.log")).unwrap();
    let mut command = Command::new("qemu-storage-daemon");
    // SAFETY: the hook runs in the forked child before exec and only calls prctl, which is
    // async-signal-safe. It kills the daemon if this test's thread dies without dropping it.
    unsafe {
        command.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) == 0 {
                Ok(())
            } else {
                Err(std::io::Error::last_os_error())
            }
        })
    };
    let child = command
        .arg("--blockdev")
        .arg(format!(
            "driver=file,node-name=f,filename={},cache.direct=off,aio=threads",
            path.display()
        ))
        .args(["--blockdev", "driver=raw,node-name=r,file=f", "--export"])
        .arg(format!(
            "type=vhost-user-blk,id=e,node-name=r,addr.type=unix,addr.path={},writable=on",
            socket.display()
        ))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("qemu-storage-daemon: install qemu-system-common (resources/test-all.sh does)");
    let qsd = Qsd(child);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !socket.exists() {
        assert!(
            Instant::now() < deadline,
            "qemu-storage-daemon did not create its socket"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let run = |blk: BlkOptions| {
        checked(&Options {
            socket: Some(socket.clone()),
            file: None,
            backend_pid: Some(qsd.0.id()),
            connect_timeout: 10.0,
            blk,
        })
    };
    let w = run(options(Workload::RandWrite, 4096, 16, true));
    let (before, after) = w.backend.expect("the backend was sampled");
    assert!(after.cpu_s >= before.cpu_s && after.threads > 0);
    run(options(Workload::RandRead, 4096, 16, true));
    drop(qsd);
    assert!(written_pages(&path) > 0, "no write reached the file");
}
