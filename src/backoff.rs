//! Exponential backoff with jitter, for reconnecting to the broker and retrying writes.

use std::time::Duration;

/// Shortens `d` by a random 0–20 %, so that many clients that lost the same broker do not all
/// come back in the same instant.
pub fn with_jitter(d: Duration) -> Duration {
    d.mul_f64(1.0 - fastrand::f64() * 0.2)
}

/// Waits that start at `min`, double after each failure, and stop growing at `max`.
#[derive(Debug, Clone)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    /// A backoff from `min` to `max` (the seed: 2 s to 300 s).
    pub fn new(min: Duration, max: Duration) -> Self {
        Self {
            min,
            max: max.max(min),
            next: min,
        }
    }

    /// The wait before the next attempt (with jitter); doubles the one after it.
    pub fn next_delay(&mut self) -> Duration {
        let d = self.next;
        self.next = self.next.saturating_mul(2).min(self.max);
        with_jitter(d)
    }

    /// Straight to `max`: for a failure that waiting will not cure soon (refused credentials),
    /// so that retries and their log lines come at a rate a person can read.
    pub fn give_up_quickly(&mut self) {
        self.next = self.max;
    }

    /// Back to `min`, after a success.
    pub fn reset(&mut self) {
        self.next = self.min;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_from_min_to_max_with_jitter_below() {
        let mut b = Backoff::new(Duration::from_secs(2), Duration::from_secs(300));
        let bases = [2, 4, 8, 16, 32, 64, 128, 256, 300, 300];
        for base in bases {
            let d = b.next_delay();
            let base = Duration::from_secs(base);
            assert!(d <= base && d >= base.mul_f64(0.8), "{d:?} vs {base:?}");
        }
        b.reset();
        assert!(b.next_delay() <= Duration::from_secs(2));
    }
}
