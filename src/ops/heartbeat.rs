//! The event loop's sign of life, which the systemd watchdog reads: a loop that neither
//! progresses nor says it waits on purpose is hung, and the watchdog stops being fed.

use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

/// What `ms` holds while the event loop waits on purpose.
const WAITING: u64 = u64::MAX;

/// When the event loop last made progress.
#[derive(Debug)]
pub struct LoopBeat {
    started: Instant,
    /// Milliseconds after `started` of the last sign of life, or [`WAITING`].
    ms: AtomicU64,
}

impl Default for LoopBeat {
    fn default() -> Self {
        Self {
            started: Instant::now(),
            ms: AtomicU64::new(0),
        }
    }
}

impl LoopBeat {
    /// The event loop made progress (a poll returned).
    pub fn beat(&self) {
        let ms = u64::try_from(self.started.elapsed().as_millis()).unwrap_or(WAITING - 1);
        self.ms.store(ms, Relaxed);
    }

    /// The event loop is about to wait on purpose: a reconnect backoff, or the writers' full
    /// queue (backpressure). Silence during such a wait is not a hang.
    pub fn waiting(&self) {
        self.ms.store(WAITING, Relaxed);
    }

    /// How long the event loop has been silent; zero while it waits on purpose.
    pub fn silence(&self) -> Duration {
        match self.ms.load(Relaxed) {
            WAITING => Duration::ZERO,
            ms => self
                .started
                .elapsed()
                .saturating_sub(Duration::from_millis(ms)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn silence_is_zero_while_the_loop_waits_on_purpose() {
        let b = LoopBeat::default();
        b.beat();
        assert!(b.silence() < Duration::from_secs(1));
        std::thread::sleep(Duration::from_millis(30));
        assert!(b.silence() >= Duration::from_millis(30));
        b.waiting();
        assert_eq!(b.silence(), Duration::ZERO);
    }
}
