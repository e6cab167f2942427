//! Keeps repeated warnings from flooding the log: the first warning for a (device, reason) is
//! logged, the same ones after it within the interval are only counted, and the next one logged
//! says how many were left out. Counters are never limited; only log lines are.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::config::LogStyle;

/// How the service's repeated warnings are logged: how often ([`WarnLimiter`]) and in whose
/// words (`LOG_STYLE`). The event loop and the writers reach it through their statistics.
#[derive(Debug)]
pub struct Warnings {
    limiter: WarnLimiter,
    style: LogStyle,
}

impl Warnings {
    /// One warning per device and reason per `interval`, in `style`'s words.
    pub fn new(interval: Duration, style: LogStyle) -> Self {
        Self {
            limiter: WarnLimiter::new(interval),
            style,
        }
    }

    /// Whether log lines also use the Python service's words (`LOG_STYLE=codehubot`).
    pub fn codehubot_wording(&self) -> bool {
        self.style == LogStyle::Codehubot
    }

    /// Whether a warning about `key` (a device) for `reason` should be logged now; `Some(n)`
    /// says how many like it were left out since the last one logged.
    pub fn should_warn(&self, key: &str, reason: &'static str) -> Option<u64> {
        self.limiter.check(key, reason)
    }
}

/// Most (device, reason) pairs remembered; past it, old ones are forgotten (a flood of ever new
/// device ids must not grow memory).
const MAX_KEYS: usize = 10_000;

#[derive(Debug)]
struct Window {
    started: Instant,
    suppressed: u64,
}

/// Decides which warnings are logged. Shared by the event loop and the writers.
#[derive(Debug)]
pub struct WarnLimiter {
    interval: Duration,
    // A std Mutex: held for a map lookup only, never across an await.
    windows: Mutex<HashMap<(String, &'static str), Window>>,
}

impl WarnLimiter {
    /// One warning per key and reason per `interval`; a zero interval logs every one.
    pub fn new(interval: Duration) -> Self {
        Self {
            interval,
            windows: Mutex::new(HashMap::new()),
        }
    }

    /// `Some(n)` when this warning should be logged (`n` similar ones were left out since the
    /// last), `None` when it should not.
    pub fn check(&self, key: &str, reason: &'static str) -> Option<u64> {
        self.check_at(key, reason, Instant::now())
    }

    fn check_at(&self, key: &str, reason: &'static str, now: Instant) -> Option<u64> {
        if self.interval.is_zero() {
            return Some(0);
        }
        let mut windows = self.windows.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(w) = windows.get_mut(&(key.to_owned(), reason)) {
            if now.duration_since(w.started) < self.interval {
                w.suppressed += 1;
                return None;
            }
            let left_out = w.suppressed;
            *w = Window {
                started: now,
                suppressed: 0,
            };
            return Some(left_out);
        }
        if windows.len() >= MAX_KEYS {
            let interval = self.interval;
            windows.retain(|_, w| now.duration_since(w.started) < interval);
            if windows.len() >= MAX_KEYS {
                windows.clear();
            }
        }
        windows.insert(
            (key.to_owned(), reason),
            Window {
                started: now,
                suppressed: 0,
            },
        );
        Some(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn once_per_interval_then_reports_what_was_left_out() {
        let l = WarnLimiter::new(Duration::from_secs(60));
        let t0 = Instant::now();
        assert_eq!(l.check_at("d1", "not_json", t0), Some(0));
        for i in 1..=999 {
            assert_eq!(
                l.check_at("d1", "not_json", t0 + Duration::from_millis(i)),
                None
            );
        }
        assert_eq!(l.check_at("d1", "bad_topic", t0), Some(0), "another reason");
        assert_eq!(l.check_at("d2", "not_json", t0), Some(0), "another device");
        assert_eq!(
            l.check_at("d1", "not_json", t0 + Duration::from_secs(61)),
            Some(999)
        );
    }

    #[test]
    fn zero_interval_logs_everything_and_keys_stay_bounded() {
        let l = WarnLimiter::new(Duration::ZERO);
        assert_eq!(l.check("d", "x"), Some(0));
        assert_eq!(l.check("d", "x"), Some(0));
        let l = WarnLimiter::new(Duration::from_secs(60));
        for i in 0..(MAX_KEYS * 3) {
            l.check(&format!("dev{i}"), "not_json");
        }
        assert!(l.windows.lock().unwrap().len() <= MAX_KEYS);
    }
}
