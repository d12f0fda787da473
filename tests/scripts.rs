//! The shell helpers the install scripts share (resources/guest/apt.sh): retrying apt while
//! another process holds its lock, as on a fresh machine running unattended upgrades.

use std::process::{Command, Output};

const APT_SH: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/resources/guest/apt.sh");

/// Runs `apt_retry fake_apt` where fake_apt fails `lock_failures` times with apt's lock
/// message, then exits with `final_status`.
fn apt_retry(lock_failures: u32, final_status: i32, timeout_secs: u32) -> (Output, u32) {
    let dir = tempfile::tempdir().unwrap();
    let count = dir.path().join("count");
    let script = format!(
        r#"
        set -euo pipefail
        log() {{ printf 'test: %s\n' "$*" >&2; }}
        die() {{ log "error: $*"; exit 1; }}
        source {APT_SH}
        fake_apt() {{
            n=$(( $(cat {count} 2>/dev/null || echo 0) + 1 )); echo $n > {count}
            if (( n <= {lock_failures} )); then
                echo 'E: Could not get lock /var/lib/dpkg/lock-frontend. It is held by process 1' >&2
                return 100
            fi
            echo "fake apt output"
            return {final_status}
        }}
        rc=0; apt_retry fake_apt || rc=$?
        echo "rc=$rc"
        "#,
        count = count.display(),
    );
    let out = Command::new("bash")
        .arg("-c")
        .arg(script)
        .env("MVMM_APT_RETRY_INTERVAL", "0")
        .env("MVMM_APT_LOCK_TIMEOUT", timeout_secs.to_string())
        .output()
        .unwrap();
    let calls = std::fs::read_to_string(&count)
        .map(|s| s.trim().parse().unwrap())
        .unwrap_or(0);
    (out, calls)
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn apt_retry_waits_out_a_held_lock() {
    let (out, calls) = apt_retry(2, 0, 60);
    assert_eq!(text(&out.stdout).trim(), "rc=0", "{}", text(&out.stderr));
    assert_eq!(calls, 3);
    let stderr = text(&out.stderr);
    assert_eq!(
        stderr.matches("lock is held by another process").count(),
        2,
        "{stderr}"
    );
    // The command's own output goes to stderr, keeping the caller's stdout clean.
    assert!(stderr.contains("fake apt output"), "{stderr}");
}

#[test]
fn apt_retry_gives_up_when_the_lock_outlives_the_timeout() {
    let (out, calls) = apt_retry(u32::MAX, 0, 0);
    assert_eq!(text(&out.stdout).trim(), "rc=100", "{}", text(&out.stderr));
    assert_eq!(calls, 1);
    assert!(text(&out.stderr).contains("still held after 0 s"));
}

#[test]
fn apt_retry_does_not_retry_other_failures() {
    let (out, calls) = apt_retry(0, 7, 60);
    assert_eq!(text(&out.stdout).trim(), "rc=7", "{}", text(&out.stderr));
    assert_eq!(calls, 1);
}
