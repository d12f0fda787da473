//! One line per event on stderr. Under systemd (JOURNAL_STREAM names our stderr) each line
//! carries a `<N>` syslog priority prefix so journald records the level; on a terminal it gets
//! a time since start instead.

use std::io::Write;
use std::os::fd::AsRawFd;
use std::time::Instant;

use log::{Level, LevelFilter, Log, Metadata, Record};

struct StderrLogger {
    start: Instant,
    journal: bool,
}

impl Log for StderrLogger {
    fn enabled(&self, metadata: &Metadata) -> bool {
        metadata.level() <= log::max_level()
    }

    fn log(&self, record: &Record) {
        if !self.enabled(record.metadata()) {
            return;
        }
        // One write per line so lines from different threads never interleave.
        let line = if self.journal {
            format!("<{}>{}\n", syslog_priority(record.level()), record.args())
        } else {
            let t = self.start.elapsed();
            format!(
                "[{:>4}.{:06} {:<5}] {}\n",
                t.as_secs(),
                t.subsec_micros(),
                record.level(),
                record.args()
            )
        };
        let _ = std::io::stderr().lock().write_all(line.as_bytes());
    }

    fn flush(&self) {}
}

fn syslog_priority(level: Level) -> u8 {
    match level {
        Level::Error => 3,
        Level::Warn => 4,
        Level::Info => 6,
        Level::Debug | Level::Trace => 7,
    }
}

/// True when stderr is the journal stream systemd connected us to.
fn stderr_is_journal() -> bool {
    let Some(stream) = std::env::var_os("JOURNAL_STREAM") else {
        return false;
    };
    let Some((dev, ino)) = stream.to_str().and_then(|s| s.split_once(':')) else {
        return false;
    };
    // SAFETY: fstat fills a plain struct for a descriptor we hold open.
    let mut st = unsafe { std::mem::zeroed::<libc::stat>() };
    // SAFETY: `st` is valid for writes; stderr is open for the process lifetime.
    if unsafe { libc::fstat(std::io::stderr().as_raw_fd(), &mut st) } != 0 {
        return false;
    }
    dev.parse() == Ok(st.st_dev) && ino.parse() == Ok(st.st_ino)
}

pub fn init(level: LevelFilter) {
    let logger = StderrLogger {
        start: Instant::now(),
        journal: stderr_is_journal(),
    };
    if log::set_boxed_logger(Box::new(logger)).is_ok() {
        log::set_max_level(level);
    }
}
