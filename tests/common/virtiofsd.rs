//! The real (Rust) virtiofsd for share tests: installed once (cached) by
//! resources/guest/install-virtiofsd.sh, started per test, killed on drop.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

pub fn virtiofsd_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let script = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/resources/guest/install-virtiofsd.sh"
        );
        let out = Command::new("bash")
            .arg(script)
            .output()
            .expect("run install-virtiofsd.sh");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let stdout = String::from_utf8(out.stdout).unwrap();
        let path = stdout
            .lines()
            .find_map(|l| l.strip_prefix("VIRTIOFSD="))
            .expect("VIRTIOFSD=");
        PathBuf::from(path)
    })
}

/// A virtiofsd serving `dir` on `socket`; killed on drop.
pub struct Virtiofsd(pub Child);

impl Virtiofsd {
    pub fn start(socket: &Path, dir: &Path) -> Self {
        let child = Command::new(virtiofsd_bin())
            .arg(format!("--socket-path={}", socket.display()))
            .arg(format!("--shared-dir={}", dir.display()))
            .args(["--sandbox=none", "--cache=never", "--log-level=error"])
            .stdin(Stdio::null())
            .spawn()
            .expect("start virtiofsd");
        let deadline = Instant::now() + Duration::from_secs(10);
        while !socket.exists() {
            assert!(
                Instant::now() < deadline,
                "virtiofsd never created {}",
                socket.display()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        Self(child)
    }

    pub fn kill(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for Virtiofsd {
    fn drop(&mut self) {
        self.kill();
    }
}
