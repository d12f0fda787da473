//! `mvmm backend blk` against the real Linux virtio-blk driver, under QEMU/TCG (see
//! `tests/common/linux_guest.rs`): QEMU's `vhost-user-blk` device connects to the backend
//! process, and one guest test script (`resources/guest/tests/blk*.sh`) checks the disk. This
//! mirrors `resources/guest/selftest-qemu.sh`, which proves the kit against
//! qemu-storage-daemon, with mvmm as the backend instead.
//!
//! Every test works in its own temporary directory (image, socket, logs).

mod common;

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use common::linux_guest::{
    guest_dir, mib, run_tool, sha256_file, Backend, GuestOutcome, GuestRun, BACKEND_EXIT,
    QEMU_TIMEOUT_S, STALL,
};
use common::MIB;

const GIB_SECTORS: u64 = (1 << 30) / 512;

/// `mvmm backend blk --socket SOCKET --path IMAGE EXTRA...`, listening.
fn start_backend(socket: &Path, image: &Path, extra: &[&str], log: &Path) -> Backend {
    let mut args: Vec<&OsStr> = vec![OsStr::new("--path"), image.as_os_str()];
    args.extend(extra.iter().map(OsStr::new));
    Backend::spawn(Backend::command("blk", socket, &args), socket, log)
}

/// Bytes the host file system has allocated for `path` (`st_blocks` is in 512-byte units).
fn allocated(path: &Path) -> u64 {
    std::fs::metadata(path).unwrap().blocks() * 512
}

/// A fresh sparse image of `size` bytes.
fn sparse_image(path: &Path, size: u64) {
    File::create(path).unwrap().set_len(size).unwrap();
}

/// `dumpe2fs -h IMG` as key -> value.
fn superblock(image: &Path) -> Result<BTreeMap<String, String>, String> {
    let out = run_tool("dumpe2fs", &[OsStr::new("-h"), image.as_os_str()]);
    if !out.ok() {
        return Err(out.text);
    }
    Ok(out
        .stdout
        .lines()
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect())
}

// ---------------------------------------------------------------------------------------------
// Tests.

/// The blk.sh checks every writable run must pass.
const BLK_WRITABLE_CHECKS: &[&str] = &[
    "blk-present",
    "blk-size",
    "blk-serial",
    "blk-ro",
    "blk-raw",
    "blk-mkfs",
    "blk-mount",
    "blk-write",
    "blk-verify",
    "blk-fsck",
];

/// `verify-blk-image.sh IMG` must pass, and its /MANIFEST hash must be the one the guest
/// printed (`RESULT blk-manifest INFO /MANIFEST sha256=...`).
fn assert_image_verifies(image: &Path, guest: &GuestOutcome, context: &str) {
    let script = guest_dir().join("verify-blk-image.sh");
    let out = run_tool("bash", &[script.as_os_str(), image.as_os_str()]);
    assert!(
        out.ok(),
        "verify-blk-image.sh failed:\n{}\n{}\n{context}",
        out.text,
        guest.dump()
    );
    assert!(
        out.text.contains("RESULT host-blk-fsck PASS"),
        "{}",
        out.text
    );
    assert!(
        out.text.contains("RESULT host-blk-manifest PASS"),
        "{}",
        out.text
    );
    let guest_sum = guest
        .detail("blk-manifest")
        .and_then(|d| d.strip_prefix("/MANIFEST sha256=").map(str::to_string))
        .unwrap_or_else(|| panic!("no blk-manifest line from the guest\n{}", guest.dump()));
    assert!(
        out.text.contains(&format!("sha256={guest_sum}")),
        "host and guest disagree on /MANIFEST (guest sha256={guest_sum}):\n{}",
        out.text
    );
}

/// Linux formats the disk (ext4), writes 64 MiB in 16 files, syncs, remounts and verifies
/// them; afterwards the host's e2fsck and the guest's /MANIFEST agree with the image, and the
/// backend exits 0 by itself when QEMU disconnects.
#[test]
fn linux_formats_writes_and_remounts_an_ext4_disk() {
    let t0 = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.img");
    let socket = dir.path().join("blk.sock");
    sparse_image(&image, 1 << 30);
    let mut backend = start_backend(
        &socket,
        &image,
        &["--serial", "mvmm-test"],
        &dir.path().join("backend.log"),
    );
    let guest = GuestRun::start(
        "blk",
        &[
            "--vhost-user-blk".into(),
            socket.display().to_string(),
            "-p".into(),
            format!("size_sectors={GIB_SECTORS}"),
            "-p".into(),
            "serial=mvmm-test".into(),
            "-p".into(),
            "ro=0".into(),
            "-p".into(),
            "data_mib=64".into(),
        ],
    )
    .finish();
    let status = backend.wait_exit(BACKEND_EXIT);
    let context = format!("--- backend log ---\n{}", backend.log_text());
    guest.assert_all_pass(BLK_WRITABLE_CHECKS, &context);
    assert!(
        guest
            .detail("blk-write")
            .is_some_and(|d| d.starts_with("67108864 bytes")),
        "the guest did not write 64 MiB\n{}",
        guest.dump()
    );
    assert!(
        status.success(),
        "the backend did not exit 0 after QEMU disconnected: {status}\n{context}"
    );
    assert_image_verifies(&image, &guest, &context);
    eprintln!(
        "linux_formats_writes_and_remounts_an_ext4_disk: guest {:.1?}, total {:.1?}",
        guest.elapsed,
        t0.elapsed()
    );
}

/// With `--read-only` Linux sees the ro flag, a write fails, the whole disk reads back with
/// the host's SHA-256, and the image's bytes stay the same.
#[test]
fn linux_sees_a_read_only_disk_and_cannot_write_it() {
    let t0 = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("ro.img");
    let socket = dir.path().join("ro.sock");
    let size = 16 * MIB;
    std::fs::write(&image, common::pseudo_random_bytes(size as usize, 0x5eed)).unwrap();
    let before = sha256_file(&image);
    let mut backend = start_backend(
        &socket,
        &image,
        &["--read-only", "--serial", "mvmm-ro"],
        &dir.path().join("backend.log"),
    );
    let guest = GuestRun::start(
        "blk",
        &[
            "--vhost-user-blk".into(),
            socket.display().to_string(),
            "-p".into(),
            format!("size_sectors={}", size / 512),
            "-p".into(),
            "serial=mvmm-ro".into(),
            "-p".into(),
            "ro=1".into(),
            "-p".into(),
            format!("sha256={before}"),
        ],
    )
    .finish();
    let status = backend.wait_exit(BACKEND_EXIT);
    let context = format!("--- backend log ---\n{}", backend.log_text());
    guest.assert_all_pass(
        &[
            "blk-present",
            "blk-size",
            "blk-serial",
            "blk-ro",
            "blk-ro-write",
            "blk-ro-read",
        ],
        &context,
    );
    assert!(
        status.success(),
        "the backend did not exit 0 after QEMU disconnected: {status}\n{context}"
    );
    assert_eq!(
        sha256_file(&image),
        before,
        "the read-only image changed\n{}",
        guest.dump()
    );
    assert_eq!(std::fs::metadata(&image).unwrap().len(), size);
    eprintln!(
        "linux_sees_a_read_only_disk_and_cannot_write_it: guest {:.1?}, total {:.1?}",
        guest.elapsed,
        t0.elapsed()
    );
}

/// Samples a file's allocation in the background; remembers the peak.
struct AllocationWatch {
    stop: Arc<AtomicBool>,
    peak: Arc<AtomicU64>,
    thread: Option<JoinHandle<()>>,
}

impl AllocationWatch {
    fn start(path: &Path) -> AllocationWatch {
        let stop = Arc::new(AtomicBool::new(false));
        let peak = Arc::new(AtomicU64::new(allocated(path)));
        let (path, stop2, peak2) = (path.to_path_buf(), stop.clone(), peak.clone());
        let thread = thread::spawn(move || {
            while !stop2.load(Ordering::Relaxed) {
                if let Ok(m) = std::fs::metadata(&path) {
                    peak2.fetch_max(m.blocks() * 512, Ordering::Relaxed);
                }
                thread::sleep(Duration::from_millis(5));
            }
        });
        AllocationWatch {
            stop,
            peak,
            thread: Some(thread),
        }
    }

    fn peak(mut self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.peak.load(Ordering::Relaxed)
    }
}

impl Drop for AllocationWatch {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// blk-discard.sh writes a 64 MiB file on a fresh ext4, syncs, deletes it and runs fstrim:
/// the DISCARDs must punch holes in the host file, so its allocation (st_blocks) must drop by
/// most of those 64 MiB from its peak after the write. Raw blkdiscard and blkdiscard -z (write
/// zeroes) must work too.
#[test]
fn linux_discard_punches_holes_in_the_host_file() {
    let t0 = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("discard.img");
    let socket = dir.path().join("discard.sock");
    sparse_image(&image, 1 << 30);
    const DATA_MIB: u64 = 64;
    let mut backend = start_backend(&socket, &image, &[], &dir.path().join("backend.log"));
    let watch = AllocationWatch::start(&image);
    let guest = GuestRun::start(
        "blk-discard",
        &[
            "--vhost-user-blk".into(),
            socket.display().to_string(),
            "-p".into(),
            "discard=1".into(),
            "-p".into(),
            format!("discard_mib={DATA_MIB}"),
        ],
    )
    .finish();
    let status = backend.wait_exit(BACKEND_EXIT);
    let peak = watch.peak();
    let after = allocated(&image);
    let context = format!(
        "--- backend log ---\n{}\nhost allocation: peak {} after {}",
        backend.log_text(),
        mib(peak),
        mib(after)
    );
    guest.assert_all_pass(
        &[
            "discard-supported",
            "discard-fstrim",
            "discard-fsck",
            "discard-raw",
            "discard-zeroout",
        ],
        &context,
    );
    assert!(
        status.success(),
        "the backend did not exit 0 after QEMU disconnected: {status}\n{context}"
    );
    // The peak comes after the 64 MiB file reached the disk (plus ext4's metadata and
    // journal, ~32 MiB): the write did allocate in the host file.
    assert!(
        peak >= DATA_MIB * MIB,
        "the guest's {DATA_MIB} MiB write never showed in the host file\n{context}\n{}",
        guest.dump()
    );
    // After fstrim, the file's blocks are holes again: the allocation fell by (nearly) the
    // whole file. What stays is ext4's metadata and journal, and the raw region near the end
    // that blkdiscard -z zeroed (up to 4 MiB: write-zeroes may allocate); the margin also
    // covers the sampling of the peak.
    assert!(
        peak.saturating_sub(after) >= (DATA_MIB - 16) * MIB,
        "fstrim did not punch holes in the host file\n{context}\n{}",
        guest.dump()
    );
    // Like selftest-qemu.sh's check with qemu-storage-daemon.
    assert!(after < 56 * MIB, "{context}");
    eprintln!(
        "linux_discard_punches_holes_in_the_host_file: peak {} -> {} after fstrim; guest {:.1?}, total {:.1?}",
        mib(peak),
        mib(after),
        guest.elapsed,
        t0.elapsed()
    );
}

/// The backend is killed with SIGKILL while Linux writes back its 64 MiB of files, and
/// restarted on the same socket. QEMU's socket chardev is given `reconnect=1`, so QEMU
/// reconnects to the new process (without it the device would stay dead and the guest hang
/// until the harness's timeout).
///
/// Acceptable for the guest: it carries on (QEMU rewinds the ring to the used index, so the new
/// backend serves again what the dead one had taken but not completed) or it reports I/O
/// errors. Either way the VM must end by itself. A guest that waits forever is a failure: the
/// new backend never told the driver about a completion the dead one had put in the used ring
/// without notifying, or never served a request the driver will not kick for again. blk.sh is
/// never silent for a minute, so the test stops such a run after 60 s without console output
/// instead of waiting for the harness's timeout.
///
/// The invariant asserted on the host: **no corruption of data that was flushed before the
/// kill**. The backend completes a request only after its pwrite() / fdatasync() returned, so
/// a completed write is in the host's page cache or on disk, and killing the process cannot
/// take it back. Concretely:
/// 1. mkfs.ext4 had finished (and fsync'ed the device) before the kill, since the kill comes
///    after its `blk-mkfs PASS` line: `dumpe2fs -h` must read a valid ext4 superblock with the
///    geometry mkfs wrote (1 GiB, 4 KiB blocks).
/// 2. ext4 (data=ordered, with the device's FLUSH honoured) is crash-consistent: whatever the
///    guest did after the kill, every journal transaction it committed was flushed before its
///    commit block, so after replaying the journal (on a copy, if it needs recovery)
///    `e2fsck -fn` must find no inconsistency. A completed write that got lost or torn would
///    show up here as a corrupt fs.
/// 3. If the guest carried on and passed its own remount-verify and e2fsck, everything it
///    wrote was synced, so the host's verify-blk-image.sh (e2fsck + /MANIFEST) must pass too.
///
/// Whether the kill lands mid-write is made sure of by watching the image: the kill comes
/// once the file's allocation has grown by 16 MiB after `blk-gen` (the guest's file data
/// reaching the backend), i.e. in the middle of writing the 64 MiB.
#[test]
fn backend_killed_while_linux_writes() {
    let t0 = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.img");
    let socket = dir.path().join("blk.sock");
    sparse_image(&image, 1 << 30);
    let args = ["--serial", "mvmm-kill", "--persistent"];
    let mut first = start_backend(&socket, &image, &args, &dir.path().join("backend1.log"));

    // QEMU's own socket chardev with reconnect, instead of run-qemu.py's --vhost-user-blk.
    let mut guest = GuestRun::start(
        "blk",
        &[
            "-p".into(),
            format!("size_sectors={GIB_SECTORS}"),
            "-p".into(),
            "serial=mvmm-kill".into(),
            "--".into(),
            "-chardev".into(),
            format!("socket,id=vubr,path={},reconnect=1", socket.display()),
            "-device".into(),
            "vhost-user-blk,chardev=vubr,num-queues=1".into(),
        ],
    );
    let boot = Duration::from_secs(QEMU_TIMEOUT_S);
    assert!(
        guest.wait_console("RESULT blk-mkfs PASS", boot),
        "no blk-mkfs PASS from the guest\n{}\n--- console ---\n{}",
        guest.stdout,
        guest.console
    );
    assert!(
        guest.wait_console("RESULT blk-gen", boot),
        "no blk-gen line from the guest\n--- console ---\n{}",
        guest.console
    );
    // Now the guest copies its 64 MiB onto the ext4 and syncs. Kill once 16 MiB of it has
    // reached the image.
    let base = allocated(&image);
    let deadline = Instant::now() + Duration::from_secs(QEMU_TIMEOUT_S);
    while allocated(&image) < base + 16 * MIB {
        assert!(
            Instant::now() < deadline,
            "the guest's writes never reached the image (allocated {} since blk-gen)\n{}",
            mib(allocated(&image).saturating_sub(base)),
            guest.console
        );
        assert!(
            matches!(first.child.try_wait(), Ok(None)),
            "the backend exited before the kill:\n{}",
            first.log_text()
        );
        thread::sleep(Duration::from_millis(2));
    }
    first.signal(libc::SIGKILL);
    let killed = first.wait_exit(BACKEND_EXIT);
    let at_kill = allocated(&image).saturating_sub(base);
    assert_eq!(killed.signal(), Some(libc::SIGKILL));
    // Console lines that arrived before the kill (for the report below).
    guest.drain();
    let write_done_before_kill = guest.console.contains("RESULT blk-write");

    let mut second = start_backend(&socket, &image, &args, &dir.path().join("backend2.log"));
    // blk.sh is never silent for long (its longest step takes seconds under TCG), so a minute
    // without console output means the guest is stuck: fail now instead of at the timeout.
    let ended = guest.wait_end_or_stall(STALL);
    if !ended {
        guest.kill_group();
    }
    let guest = guest.finish();
    let context = format!(
        "--- first backend (killed after {} written) ---\n{}\n--- second backend ---\n{}",
        mib(at_kill),
        first.log_text(),
        second.log_text()
    );
    // The VM ended by itself: 0 (carried on), 1 (a check failed, e.g. I/O errors) or 2 (the
    // test ended abnormally), but not 3 (hung until the harness killed QEMU) and not stalled.
    assert!(
        ended,
        "the guest stalled after the backend restart: no console output for {STALL:?}, its \
         I/O never completed. A restarted backend must, when its ring starts, notify the \
         driver of used entries the killed one may have added without notifying (and serve \
         requests it had taken but not completed)\n{}\n{context}",
        guest.dump()
    );
    assert!(
        matches!(guest.code, Some(0..=2)),
        "the VM did not end by itself\n{}\n{context}",
        guest.dump()
    );
    // A persistent backend waits for the next frontend; SIGTERM stops it with 0.
    assert!(
        matches!(second.child.try_wait(), Ok(None)),
        "the restarted --persistent backend exited on its own\n{context}"
    );
    second.signal(libc::SIGTERM);
    let stopped = second.wait_exit(BACKEND_EXIT);
    assert!(
        stopped.success(),
        "the restarted backend did not exit 0 on SIGTERM: {stopped}\n{context}"
    );

    // 1. mkfs's result, flushed before the kill, is intact.
    let sb = superblock(&image)
        .unwrap_or_else(|e| panic!("no readable ext4 superblock after the kill:\n{e}\n{context}"));
    for (key, want) in [
        ("Filesystem magic number", "0xEF53"),
        ("Block size", "4096"),
        ("Block count", "262144"),
    ] {
        assert_eq!(
            sb.get(key).map(String::as_str),
            Some(want),
            "superblock field {key:?} after the kill: {sb:?}\n{context}"
        );
    }

    // 2. Consistent after journal recovery (on a copy: the original stays as Linux left it).
    let needs_recovery = sb
        .get("Filesystem features")
        .is_some_and(|f| f.split_whitespace().any(|x| x == "needs_recovery"));
    let checked = if needs_recovery {
        let copy = dir.path().join("recovered.img");
        let cp = run_tool(
            "cp",
            &[
                OsStr::new("--sparse=always"),
                image.as_os_str(),
                copy.as_os_str(),
            ],
        );
        assert!(cp.ok(), "{}", cp.text);
        let replay = run_tool(
            "e2fsck",
            &[
                OsStr::new("-y"),
                OsStr::new("-E"),
                OsStr::new("journal_only"),
                copy.as_os_str(),
            ],
        );
        // 0: nothing to do, 1: the journal was replayed.
        assert!(
            matches!(replay.code, Some(0 | 1)),
            "journal replay failed:\n{}\n{context}",
            replay.text
        );
        copy
    } else {
        image.clone()
    };
    let fsck = run_tool("e2fsck", &[OsStr::new("-fn"), checked.as_os_str()]);
    assert!(
        fsck.ok(),
        "the filesystem is corrupt after the backend was killed (needs_recovery={needs_recovery}):\n{}\n{}\n{context}",
        fsck.text,
        guest.dump()
    );

    // 3. If Linux carried on through the restart, all of its data is there.
    let carried_on = guest.code == Some(0)
        && guest.passed("blk-write")
        && guest.passed("blk-verify")
        && guest.passed("blk-fsck");
    if carried_on {
        assert_image_verifies(&image, &guest, &context);
    }
    eprintln!(
        "backend_killed_while_linux_writes: killed after {} of the write reached the image \
         (write+sync done before the kill: {write_done_before_kill}); guest {} (exit {:?}, \
         failures {:?}); fs needed recovery: {needs_recovery}; guest {:.1?}, total {:.1?}",
        mib(at_kill),
        if carried_on {
            "carried on"
        } else {
            "saw errors"
        },
        guest.code,
        guest.failures(),
        guest.elapsed,
        t0.elapsed()
    );
}
