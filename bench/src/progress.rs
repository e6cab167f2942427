//! One progress line on stderr about every second while a phase runs.

use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

/// What the running phase has done so far. Counters the phase does not use stay at zero and
/// are not printed.
pub struct Progress {
    state: Mutex<(String, Instant)>,
    active: AtomicBool,
    pub total: AtomicU64,
    pub published: AtomicU64,
    pub acked: AtomicU64,
    pub committed: AtomicU64,
}

impl Progress {
    pub fn new() -> Arc<Self> {
        Arc::new(Progress {
            state: Mutex::new((String::new(), Instant::now())),
            active: AtomicBool::new(false),
            total: AtomicU64::new(0),
            published: AtomicU64::new(0),
            acked: AtomicU64::new(0),
            committed: AtomicU64::new(0),
        })
    }

    /// Starts a phase: resets the counters and prints its name.
    pub fn phase(&self, label: impl Into<String>, total: u64) {
        let label = label.into();
        eprintln!("[bench] {label}");
        self.total.store(total, Relaxed);
        self.published.store(0, Relaxed);
        self.acked.store(0, Relaxed);
        self.committed.store(0, Relaxed);
        *self.state.lock().unwrap_or_else(|e| e.into_inner()) = (label, Instant::now());
        self.active.store(true, Relaxed);
    }

    /// Ends the phase: no more progress lines until the next one.
    pub fn idle(&self) {
        self.active.store(false, Relaxed);
    }

    fn line(&self) -> Option<String> {
        if !self.active.load(Relaxed) {
            return None;
        }
        let (label, started) = self.state.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let total = self.total.load(Relaxed);
        let mut line = format!(
            "[bench]   {label}: {:.1} s",
            started.elapsed().as_secs_f64()
        );
        for (name, counter) in [
            ("published", &self.published),
            ("acked", &self.acked),
            ("committed", &self.committed),
        ] {
            let n = counter.load(Relaxed);
            if n > 0 {
                line.push_str(&format!(", {name} {n}/{total}"));
            }
        }
        Some(line)
    }

    /// Prints a line every second while a phase is active, until the handle is aborted.
    pub fn spawn_ticker(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let me = Arc::clone(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await;
            loop {
                tick.tick().await;
                if let Some(line) = me.line() {
                    eprintln!("{line}");
                }
            }
        })
    }
}
