//! Rate-limited warnings: a guest that keeps sending bad requests, or a failing host disk,
//! must not flood the VMM's log.

use std::fmt;
use std::time::{Duration, Instant};

/// Lines let through per window; the rest are counted and summarised.
const BURST: u32 = 10;
const WINDOW: Duration = Duration::from_secs(5);

pub struct LogLimiter {
    window_start: Option<Instant>,
    in_window: u32,
    suppressed: u64,
}

impl LogLimiter {
    pub const fn new() -> Self {
        Self {
            window_start: None,
            in_window: 0,
            suppressed: 0,
        }
    }

    /// Logs `message` at warning level unless too many lines were logged recently.
    /// Returns whether the line was logged.
    pub fn warn(&mut self, name: &str, message: fmt::Arguments) -> bool {
        let now = Instant::now();
        if self
            .window_start
            .is_none_or(|start| now.duration_since(start) >= WINDOW)
        {
            if self.suppressed > 0 {
                log::warn!("{name}: {} similar messages suppressed", self.suppressed);
            }
            self.window_start = Some(now);
            self.in_window = 0;
            self.suppressed = 0;
        }
        if self.in_window < BURST {
            self.in_window += 1;
            log::warn!("{name}: {message}");
            true
        } else {
            self.suppressed += 1;
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lets_a_burst_through_then_suppresses() {
        let mut limiter = LogLimiter::new();
        let logged = (0..100)
            .filter(|i| limiter.warn("blk-test", format_args!("error {i}")))
            .count();
        assert_eq!(logged, BURST as usize);
        assert_eq!(limiter.suppressed, 100 - u64::from(BURST));
    }
}
