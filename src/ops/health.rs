//! What the service knows about its own health, for `/readyz`, `/metrics` and the systemd
//! watchdog: the counters ([`Stats`]), a periodic database check, and the writers' queues.
//!
//! The database check runs on its own timer rather than per scrape, so a scraper polling every
//! second cannot turn into a load on the database, and `/readyz` answers at once.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use crate::store::Nodes;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::ops::metrics::Gauges;
use crate::ops::stats::Stats;
use crate::ops::status::{self, RejectsShown, Sample, TREND_EVERY_SECS, Trend};
use crate::writer::QueueDepth;

/// The longest a database check may take before it counts as failed.
pub const DB_CHECK_TIMEOUT: Duration = Duration::from_secs(5);

/// Health state shared by the service's tasks and the HTTP listener.
#[derive(Debug)]
pub struct Health {
    stats: Arc<Stats>,
    db: Mutex<DbCheck>,
    queues: OnceLock<QueueDepth>,
    nodes: OnceLock<Arc<Nodes>>,
    stopping: AtomicBool,
    /// The counters over the last hour, for the status page.
    trend: Mutex<Trend>,
    /// Whether the status page shows the kept rejects.
    rejects_shown: OnceLock<RejectsShown>,
    /// The latest kept rejects as last read (shown while the database is down).
    latest_rejects: Mutex<Vec<crate::store::rejects::StoredReject>>,
}

/// The outcome of the latest database check.
#[derive(Debug, Default)]
struct DbCheck {
    /// `Ok(devices online)` or the error, `None` before the first check finished.
    last: Option<Result<i64, String>>,
    /// When a check last finished, successful or not (the watchdog's sign of life).
    finished_at: Option<Instant>,
    /// Devices online at the last successful check.
    devices_online: Option<i64>,
    /// A check has succeeded since the start (so a success after failures is "again").
    ever_up: bool,
}

impl Health {
    /// Health for a service whose counters are `stats`.
    pub fn new(stats: Arc<Stats>) -> Self {
        Self {
            stats,
            db: Mutex::new(DbCheck::default()),
            queues: OnceLock::new(),
            nodes: OnceLock::new(),
            stopping: AtomicBool::new(false),
            trend: Mutex::new(Trend::default()),
            rejects_shown: OnceLock::new(),
            latest_rejects: Mutex::new(Vec::new()),
        }
    }

    /// The service is stopping: it takes no more messages, so it is no longer ready.
    pub fn set_stopping(&self) {
        self.stopping.store(true, Ordering::Relaxed);
    }

    /// The live counters.
    pub fn stats(&self) -> &Arc<Stats> {
        &self.stats
    }

    /// Makes the writers' queues measurable (once they exist).
    pub fn set_queues(&self, queues: QueueDepth) {
        let _ = self.queues.set(queues);
    }

    /// Whether the status page shows the kept rejects (set once at start-up).
    pub fn set_rejects_shown(&self, shown: RejectsShown) {
        let _ = self.rejects_shown.set(shown);
    }

    /// Samples the counters for the status page's trend.
    pub fn sample_trend(&self) {
        let s = self.stats.snapshot();
        self.trend
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(Sample {
                at: chrono::Utc::now(),
                received: s.received,
                written: s.succeeded,
                rejected: s.failed,
            });
    }

    /// Samples the trend every [`TREND_EVERY_SECS`] until `shutdown`.
    pub async fn sample_trend_every(self: Arc<Self>, shutdown: CancellationToken) {
        let mut ticks = tokio::time::interval(Duration::from_secs(TREND_EVERY_SECS));
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = ticks.tick() => self.sample_trend(),
                _ = shutdown.cancelled() => return,
            }
        }
    }

    /// The status page's data ([`status::data`]): the counters and gauges of `/metrics`, the
    /// trend, and the latest kept rejects where they are shown.
    pub async fn status(&self) -> serde_json::Value {
        let shown = self
            .rejects_shown
            .get()
            .copied()
            .unwrap_or(RejectsShown::NotKept);
        if shown == RejectsShown::Shown
            && let Some(nodes) = self.nodes.get()
        {
            // Bounded: the page answers while the database is down, with what was read last.
            let query = crate::store::rejects::latest(nodes.pool(), None, None, 10);
            if let Ok(Ok(latest)) = tokio::time::timeout(Duration::from_secs(1), query).await {
                *self
                    .latest_rejects
                    .lock()
                    .unwrap_or_else(|e| e.into_inner()) = latest;
            }
        }
        let rejects = self
            .latest_rejects
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let trend = self.trend.lock().unwrap_or_else(|e| e.into_inner());
        status::data(
            &self.stats.snapshot(),
            &self.gauges(),
            &trend,
            shown,
            &rejects,
        )
    }

    /// Makes the database nodes in use visible.
    pub fn set_nodes(&self, nodes: Arc<Nodes>) {
        let _ = self.nodes.set(nodes);
    }

    fn db(&self) -> std::sync::MutexGuard<'_, DbCheck> {
        // A panic while holding this lock cannot leave the plain data inconsistent.
        self.db.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether the last database check succeeded.
    pub fn db_up(&self) -> bool {
        matches!(self.db().last, Some(Ok(_)))
    }

    /// How long ago a database check last finished (successful or not); `None` before the first.
    pub fn db_check_age(&self) -> Option<Duration> {
        self.db().finished_at.map(|t| t.elapsed())
    }

    /// `Ok` when the service can do its work: subscribed at the broker and the database
    /// answering. Otherwise every failing part, named, in one line.
    pub fn readiness(&self) -> Result<(), String> {
        let mut problems = Vec::new();
        if self.stopping.load(Ordering::Relaxed) {
            problems.push("service: shutting down".to_owned());
        }
        let snap = self.stats.snapshot();
        if !snap.connected {
            problems.push("mqtt: not connected to the broker".to_owned());
        } else if !snap.subscribed {
            problems.push("mqtt: connected, subscriptions not acknowledged".to_owned());
        }
        match &self.db().last {
            Some(Ok(_)) => {}
            // The error itself only in the log ("database check failed"): its text can name
            // hosts, users and server versions, and /readyz answers anyone who can reach it.
            Some(Err(_)) => problems.push("database: not reachable (the log says why)".to_owned()),
            None => problems.push("database: not checked yet".to_owned()),
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems.join("; "))
        }
    }

    /// The gauges `/metrics` shows beside the counters.
    pub fn gauges(&self) -> Gauges {
        let db = self.db();
        Gauges {
            queue: self.queues.get().map(QueueDepth::current),
            db_up: matches!(db.last, Some(Ok(_))),
            devices_online: db.devices_online,
            db_node: self
                .nodes
                .get()
                .map(|n| (n.current().to_string(), n.moves())),
        }
    }

    fn record_db_check(&self, outcome: Result<i64, String>) {
        let mut db = self.db();
        let was_up = matches!(db.last, Some(Ok(_)));
        match (&outcome, was_up) {
            (Err(e), true) => warn!(error = %e, "database check failed"),
            (Ok(_), false) if db.ever_up => info!("database check succeeded again"),
            _ => {}
        }
        db.ever_up |= outcome.is_ok();
        if let Ok(n) = outcome {
            db.devices_online = Some(n);
        }
        db.last = Some(outcome);
        db.finished_at = Some(Instant::now());
    }

    /// Checks the database every `interval` until `shutdown`: counts the devices online (a
    /// cheap query that also proves the pool, the server and the table work).
    pub async fn check_database_every(
        self: Arc<Self>,
        nodes: Arc<Nodes>,
        interval: Duration,
        shutdown: CancellationToken,
    ) {
        let mut ticks = tokio::time::interval(interval);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = ticks.tick() => {}
                _ = shutdown.cancelled() => return,
            }
            let turn = nodes.turn();
            let query = sqlx::query_scalar::<_, i64>(
                "SELECT COUNT(*) FROM device_main WHERE is_online = 1",
            )
            .fetch_one(nodes.pool());
            let outcome = match tokio::time::timeout(DB_CHECK_TIMEOUT, query).await {
                Ok(Ok(n)) => Ok(n),
                Ok(Err(e)) => {
                    // A node that fails the check is left even while no message is written.
                    nodes.failed(turn, &e);
                    Err(e.to_string())
                }
                Err(_) => {
                    // No connection within the check's time while the pool had room to open
                    // one: the node refuses or does not answer (the pool's own wait for a
                    // connection, DB_CONNECT_TIMEOUT_SECS, may be longer than the check's).
                    nodes.failed(turn, &sqlx::Error::PoolTimedOut);
                    Err(format!("no answer within {}s", DB_CHECK_TIMEOUT.as_secs()))
                }
            };
            self.record_db_check(outcome);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readiness_names_every_failing_part() {
        let stats = Arc::new(Stats::default());
        let h = Health::new(stats.clone());
        let e = h.readiness().unwrap_err();
        assert!(e.contains("mqtt: not connected") && e.contains("database: not checked"));

        stats.connected(true);
        stats.subscribed();
        h.record_db_check(Err("connection refused".into()));
        let e = h.readiness().unwrap_err();
        assert_eq!(e, "database: not reachable (the log says why)");
        assert!(!e.contains("connection refused"), "no error text to probes");
        assert!(h.db_check_age().is_some() && !h.db_up());

        h.record_db_check(Ok(3));
        assert_eq!(h.readiness(), Ok(()));
        assert_eq!(h.gauges().devices_online, Some(3));

        h.set_stopping();
        assert_eq!(h.readiness().unwrap_err(), "service: shutting down");
    }
}
