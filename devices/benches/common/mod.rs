//! Code shared by the device-path benchmarks. Each bench includes this directory with
//! `#[path = "common/mod.rs"] mod common;` (the vhost-user-blk smoke test includes it through
//! its bench) and uses part of it.
//!
//! - [`ring`]: guest memory, the driver's direct view of it, one split virtqueue (driver side);
//! - [`blk`]: a virtio-blk driver that keeps `--qd` requests in flight against any
//!   [`devices::virtio::VirtioDevice`] (the in-process device, or a vhost-user frontend), with
//!   the options it takes in [`blk_options`];
//! - [`threads`]: per-thread CPU time from `/proc`.

// Every bench uses only part of this code: what one of them leaves unused is not dead.
#![allow(dead_code)]

pub mod blk;
pub mod blk_options;
pub mod ring;
pub mod threads;

use std::path::Path;
use std::process::exit;
use std::sync::atomic::{AtomicBool, Ordering};

/// The program's name for error messages: `blk_path`, not `blk_path-0123456789abcdef` (the
/// name cargo gives bench executables).
pub fn program() -> String {
    let arg0 = std::env::args().next().unwrap_or_default();
    let name = Path::new(&arg0)
        .file_name()
        .map_or_else(|| "bench".into(), |n| n.to_string_lossy().into_owned());
    match name.rsplit_once('-') {
        Some((stem, hash)) if hash.len() == 16 && hash.bytes().all(|b| b.is_ascii_hexdigit()) => {
            stem.to_owned()
        }
        _ => name,
    }
}

/// Set by [`panic_on_error`].
static PANIC_ON_ERROR: AtomicBool = AtomicBool::new(false);

/// Makes [`die`] panic instead of exiting: for a test that includes bench code, so that the
/// test fails and its guards (child processes) are dropped. (`cfg(test)` cannot tell: cargo
/// builds benches with it too.)
pub fn panic_on_error() {
    PANIC_ON_ERROR.store(true, Ordering::Relaxed);
}

/// Prints `<program>: <msg>` and exits 2: a bench has nobody to return an error to.
pub fn die(msg: &str) -> ! {
    if PANIC_ON_ERROR.load(Ordering::Relaxed) {
        panic!("{msg}");
    }
    eprintln!("{}: {msg}", program());
    exit(2)
}

/// `4096`, `4k`, `128K`, `1m`.
pub fn parse_size(s: &str) -> u64 {
    let lower = s.to_ascii_lowercase();
    let (digits, mult) = if let Some(d) = lower.strip_suffix('k') {
        (d, 1 << 10)
    } else if let Some(d) = lower.strip_suffix('m') {
        (d, 1 << 20)
    } else {
        (lower.as_str(), 1)
    };
    digits
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .unwrap_or_else(|| die(&format!("bad size {s}")))
}

pub fn number<T: std::str::FromStr>(name: &str, v: &str) -> T {
    v.parse()
        .unwrap_or_else(|_| die(&format!("{name}: bad number {v}")))
}

pub fn on_off(name: &str, v: &str) -> bool {
    match v {
        "on" => true,
        "off" => false,
        _ => die(&format!("{name} takes on or off, not {v}")),
    }
}

/// Command-line words as (name, value source): accepts both `--opt value` and `--opt=value`.
pub struct Args {
    args: std::iter::Skip<std::env::Args>,
    inline: Option<String>,
    pub name: String,
}

impl Args {
    pub fn from_env() -> Args {
        Args {
            args: std::env::args().skip(1),
            inline: None,
            name: String::new(),
        }
    }

    /// The next option or word; its value (if it takes one) comes from [`Args::value`].
    pub fn next_arg(&mut self) -> Option<String> {
        let arg = self.args.next()?;
        match arg.split_once('=') {
            Some((n, v)) if n.starts_with("--") => {
                self.name = n.to_owned();
                self.inline = Some(v.to_owned());
            }
            _ => {
                self.name = arg;
                self.inline = None;
            }
        }
        Some(self.name.clone())
    }

    pub fn value(&mut self, usage: &str) -> String {
        self.inline
            .take()
            .or_else(|| self.args.next())
            .unwrap_or_else(|| die(&format!("{} needs a value\n{usage}", self.name)))
    }
}

/// A JSON string literal, quotes included.
pub fn json_str(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// (user, system) CPU time of the whole process, in seconds.
pub fn cpu_times() -> (f64, f64) {
    // SAFETY: getrusage only writes the struct we pass.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: valid pointer to a rusage.
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) } != 0 {
        die("getrusage failed");
    }
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 * 1e-6;
    (tv(ru.ru_utime), tv(ru.ru_stime))
}

/// `vring_need_event` (virtio 1.2, 2.7.10): whether moving the index from `old` to `new`
/// crossed `event`.
pub fn need_event(event: u16, new: u16, old: u16) -> bool {
    new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
}

/// Latency histogram: 100 ns buckets up to 50 ms, then one overflow bucket.
pub struct Histogram {
    buckets: Vec<u64>,
}

impl Default for Histogram {
    fn default() -> Histogram {
        Histogram {
            buckets: vec![0; Self::BUCKETS + 1],
        }
    }
}

impl Histogram {
    const BUCKET_NS: u64 = 100;
    const BUCKETS: usize = 500_000;

    pub fn add(&mut self, ns: u64) {
        let bucket = ((ns / Self::BUCKET_NS) as usize).min(Self::BUCKETS);
        self.buckets[bucket] += 1;
    }

    pub fn clear(&mut self) {
        self.buckets.iter_mut().for_each(|b| *b = 0);
    }

    /// The `p` quantile (0..=1) of `total` samples, in µs (upper edge of its bucket).
    pub fn percentile_us(&self, total: u64, p: f64) -> f64 {
        if total == 0 {
            return 0.0;
        }
        let target = ((total as f64) * p).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (i, &n) in self.buckets.iter().enumerate() {
            seen += n;
            if seen >= target {
                return ((i as u64 + 1) * Self::BUCKET_NS) as f64 / 1000.0;
            }
        }
        (self.buckets.len() as u64 * Self::BUCKET_NS) as f64 / 1000.0
    }
}
