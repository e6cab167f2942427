//! Counters shared by the MQTT side and the writer, and the seed's statistics block.

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};

use crate::config::LogStyle;
use crate::intake::rejection::Rejection;
use crate::intake::timestamp::Undatable;
use crate::intake::zone::Zone;
use crate::ops::heartbeat::LoopBeat;
use crate::ops::warn_limit::Warnings;

/// Upper bounds (seconds) of the flush-latency histogram's buckets: from a fast local commit
/// (1 ms) to a database in trouble (10 s).
pub const FLUSH_BUCKETS: [f64; 13] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// Live counters. Plain atomics: each is a separate fact, none must agree with another at the
/// instant it is read.
#[derive(Debug)]
pub struct Stats {
    started: Instant,
    received: AtomicU64,
    succeeded: AtomicU64,
    failed: AtomicU64,
    rejected: [AtomicU64; Rejection::REASONS.len()],
    parts_skipped: AtomicU64,
    /// Device timestamps that dated nothing, by [`Undatable::ALL`].
    undated: [AtomicU64; Undatable::ALL.len()],
    db_errors: AtomicU64,
    db_conflicts: AtomicU64,
    batches: AtomicU64,
    rows_written: AtomicU64,
    reconnects: AtomicU64,
    sessions_lost: AtomicU64,
    /// Milliseconds since the Unix epoch of the last message, 0 before the first.
    last_message_ms: AtomicI64,
    /// Milliseconds since the Unix epoch of the last commit, 0 before the first.
    last_commit_ms: AtomicI64,
    /// Since when the current connection is up (ms since the epoch), 0 while disconnected.
    connected_since_ms: AtomicI64,
    /// Whether the current connection's CONNACK said the session was kept.
    session_present: AtomicBool,
    /// The broker of the current (or last) connection, `host:port`.
    broker: std::sync::Mutex<String>,
    connected: AtomicBool,
    subscribed: AtomicBool,
    warnings: Warnings,
    /// Flushes per latency bucket (not cumulative; the last slot is "above every bound").
    flush_buckets: [AtomicU64; FLUSH_BUCKETS.len() + 1],
    flush_micros: AtomicU64,
    /// The event loop's sign of life, for the watchdog.
    loop_beat: LoopBeat,
}

impl Default for Stats {
    fn default() -> Self {
        Self::new(Duration::from_secs(60))
    }
}

impl Stats {
    /// Counters whose repeated warnings are logged once per `warn_interval` per device and
    /// reason.
    pub fn new(warn_interval: Duration) -> Self {
        Self::with_style(warn_interval, LogStyle::Default)
    }

    /// The same, with the log lines operators grep for in `style`'s words.
    pub fn with_style(warn_interval: Duration, style: LogStyle) -> Self {
        Self {
            started: Instant::now(),
            received: AtomicU64::new(0),
            succeeded: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            rejected: std::array::from_fn(|_| AtomicU64::new(0)),
            parts_skipped: AtomicU64::new(0),
            undated: std::array::from_fn(|_| AtomicU64::new(0)),
            db_errors: AtomicU64::new(0),
            db_conflicts: AtomicU64::new(0),
            batches: AtomicU64::new(0),
            rows_written: AtomicU64::new(0),
            reconnects: AtomicU64::new(0),
            sessions_lost: AtomicU64::new(0),
            last_message_ms: AtomicI64::new(0),
            last_commit_ms: AtomicI64::new(0),
            connected_since_ms: AtomicI64::new(0),
            session_present: AtomicBool::new(false),
            broker: std::sync::Mutex::new(String::new()),
            connected: AtomicBool::new(false),
            subscribed: AtomicBool::new(false),
            warnings: Warnings::new(warn_interval, style),
            flush_buckets: std::array::from_fn(|_| AtomicU64::new(0)),
            flush_micros: AtomicU64::new(0),
            loop_beat: LoopBeat::default(),
        }
    }

    /// How repeated warnings are logged (how often, in whose words).
    pub fn warnings(&self) -> &Warnings {
        &self.warnings
    }

    /// The event loop's sign of life.
    pub fn loop_beat(&self) -> &LoopBeat {
        &self.loop_beat
    }
}

/// A copy of the counters at one moment.
#[derive(Debug, Clone, PartialEq)]
pub struct Snapshot {
    /// Time since the service started.
    pub uptime: Duration,
    /// Whether the MQTT connection is up.
    pub connected: bool,
    /// Whether the subscriptions were acknowledged on the current connection.
    pub subscribed: bool,
    /// Messages taken in (each ends as succeeded or failed).
    pub received: u64,
    /// Messages whose update committed.
    pub succeeded: u64,
    /// Messages rejected, for any reason.
    pub failed: u64,
    /// Rejections by reason, in the order of [`Rejection::REASONS`].
    pub rejected: Vec<(&'static str, u64)>,
    /// Parts of accepted messages that were skipped (a bad sensor beside good ones).
    pub parts_skipped: u64,
    /// Device timestamps that dated nothing, by reason (their readings kept the receive time).
    pub undated: Vec<(&'static str, u64)>,
    /// Failed database attempts (each retried), conflicts not included.
    pub db_errors: u64,
    /// Transactions rolled back by a conflict (each retried after a short pause).
    pub db_conflicts: u64,
    /// Committed batches (transactions).
    pub batches: u64,
    /// Device rows written by them.
    pub rows_written: u64,
    /// Connections to the broker after the first.
    pub reconnects: u64,
    /// Reconnections on which the broker no longer had the persistent session.
    pub sessions_lost: u64,
    /// When the last message arrived.
    pub last_message: Option<DateTime<Utc>>,
    /// When the last batch committed.
    pub last_commit: Option<DateTime<Utc>>,
    /// Since when the current connection is up.
    pub connected_since: Option<DateTime<Utc>>,
    /// Whether the current connection's broker kept the session.
    pub session_present: bool,
    /// The broker of the current (or last) connection.
    pub broker: String,
    /// Flushes that took at most each of [`FLUSH_BUCKETS`] (cumulative, as Prometheus counts).
    pub flush_buckets: Vec<u64>,
    /// Every timed flush.
    pub flush_count: u64,
    /// Their total time.
    pub flush_sum: Duration,
}

impl Stats {
    /// A message was taken in.
    pub fn received(&self) {
        self.received.fetch_add(1, Relaxed);
        self.last_message_ms
            .store(Utc::now().timestamp_millis(), Relaxed);
    }

    /// A message counted by [`Stats::received`] was not taken after all (the writers had
    /// stopped; the broker keeps it for redelivery).
    pub fn not_received(&self) {
        self.received.fetch_sub(1, Relaxed);
    }

    /// `n` messages were committed.
    pub fn succeeded(&self, n: u64) {
        self.succeeded.fetch_add(n, Relaxed);
    }

    /// A batch committed, writing `rows` device rows.
    pub fn batch_committed(&self, rows: u64) {
        self.batches.fetch_add(1, Relaxed);
        self.rows_written.fetch_add(rows, Relaxed);
        self.last_commit_ms
            .store(Utc::now().timestamp_millis(), Relaxed);
    }

    /// A batch took `took` to write and commit.
    pub fn flush_took(&self, took: Duration) {
        let secs = took.as_secs_f64();
        let i = FLUSH_BUCKETS
            .iter()
            .position(|le| secs <= *le)
            .unwrap_or(FLUSH_BUCKETS.len());
        self.flush_buckets[i].fetch_add(1, Relaxed);
        self.flush_micros
            .fetch_add(u64::try_from(took.as_micros()).unwrap_or(u64::MAX), Relaxed);
    }

    /// A message was rejected.
    pub fn rejected(&self, why: &Rejection) {
        // The reason first, `failed` after it with Release: a snapshot that sees the message
        // failed (Acquire) sees its reason too.
        if let Some(i) = Rejection::REASONS.iter().position(|r| *r == why.reason()) {
            self.rejected[i].fetch_add(1, Relaxed);
        }
        self.failed
            .fetch_add(1, std::sync::atomic::Ordering::Release);
    }

    /// A device timestamp dated nothing.
    pub fn undated(&self, why: Undatable) {
        if let Some(i) = Undatable::ALL.iter().position(|u| *u == why) {
            self.undated[i].fetch_add(1, Relaxed);
        }
    }

    /// Parts of an accepted message were skipped.
    pub fn parts_skipped(&self, n: u64) {
        self.parts_skipped.fetch_add(n, Relaxed);
    }

    /// A database attempt failed.
    pub fn db_error(&self) {
        self.db_errors.fetch_add(1, Relaxed);
    }

    /// A transaction was rolled back by a conflict with another.
    pub fn db_conflict(&self) {
        self.db_conflicts.fetch_add(1, Relaxed);
    }

    /// The broker accepted a connection; `first` is false for every reconnection.
    pub fn connected(&self, first: bool) {
        self.connected.store(true, Relaxed);
        self.connected_since_ms
            .store(Utc::now().timestamp_millis(), Relaxed);
        if !first {
            self.reconnects.fetch_add(1, Relaxed);
        }
    }

    /// Which broker the connection is to, and whether it kept the session.
    pub fn connection_to(&self, broker: &str, session_present: bool) {
        self.session_present.store(session_present, Relaxed);
        let mut b = self.broker.lock().unwrap_or_else(|e| e.into_inner());
        b.clear();
        b.push_str(broker);
    }

    /// A reconnection found the persistent session gone (`session_present=false`).
    pub fn session_lost(&self) {
        self.sessions_lost.fetch_add(1, Relaxed);
    }

    /// The connection to the broker was lost.
    pub fn disconnected(&self) {
        self.connected.store(false, Relaxed);
        self.subscribed.store(false, Relaxed);
        self.connected_since_ms.store(0, Relaxed);
    }

    /// The broker acknowledged the subscriptions.
    pub fn subscribed(&self) {
        self.subscribed.store(true, Relaxed);
    }

    /// Whether the service is connected and subscribed (what tests and readiness wait for).
    pub fn is_subscribed(&self) -> bool {
        self.subscribed.load(Relaxed)
    }

    /// Copies the counters.
    pub fn snapshot(&self) -> Snapshot {
        let ms = self.last_message_ms.load(Relaxed);
        let mut flush_buckets = Vec::with_capacity(FLUSH_BUCKETS.len());
        let mut flush_count = 0;
        for (i, n) in self.flush_buckets.iter().enumerate() {
            flush_count += n.load(Relaxed);
            if i < FLUSH_BUCKETS.len() {
                flush_buckets.push(flush_count);
            }
        }
        // Before the reasons (see `rejected`).
        let failed = self.failed.load(std::sync::atomic::Ordering::Acquire);
        Snapshot {
            uptime: self.started.elapsed(),
            connected: self.connected.load(Relaxed),
            subscribed: self.subscribed.load(Relaxed),
            received: self.received.load(Relaxed),
            succeeded: self.succeeded.load(Relaxed),
            failed,
            rejected: Rejection::REASONS
                .iter()
                .zip(&self.rejected)
                .map(|(r, n)| (*r, n.load(Relaxed)))
                .collect(),
            parts_skipped: self.parts_skipped.load(Relaxed),
            undated: Undatable::ALL
                .iter()
                .zip(&self.undated)
                .map(|(u, n)| (u.as_str(), n.load(Relaxed)))
                .collect(),
            db_errors: self.db_errors.load(Relaxed),
            db_conflicts: self.db_conflicts.load(Relaxed),
            batches: self.batches.load(Relaxed),
            rows_written: self.rows_written.load(Relaxed),
            reconnects: self.reconnects.load(Relaxed),
            sessions_lost: self.sessions_lost.load(Relaxed),
            last_message: (ms != 0)
                .then(|| DateTime::from_timestamp_millis(ms))
                .flatten(),
            last_commit: millis(self.last_commit_ms.load(Relaxed)),
            connected_since: millis(self.connected_since_ms.load(Relaxed)),
            session_present: self.session_present.load(Relaxed),
            broker: self
                .broker
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone(),
            flush_buckets,
            flush_count,
            flush_sum: Duration::from_micros(self.flush_micros.load(Relaxed)),
        }
    }
}

/// A time in milliseconds since the epoch; 0 is none.
fn millis(ms: i64) -> Option<DateTime<Utc>> {
    (ms != 0)
        .then(|| DateTime::from_timestamp_millis(ms))
        .flatten()
}

impl Snapshot {
    /// Succeeded as a share of finished messages, in percent; `None` before the first.
    pub fn success_rate(&self) -> Option<f64> {
        let done = self.succeeded + self.failed;
        (done > 0).then(|| self.succeeded as f64 * 100.0 / done as f64)
    }

    /// The seed's statistics block (uptime, connection, total, succeeded, failed, rate, last
    /// message), plus the rejection reasons that occurred.
    pub fn render(&self, zone: &Zone) -> String {
        let secs = self.uptime.as_secs();
        let uptime = format!("{}:{:02}:{:02}", secs / 3600, secs / 60 % 60, secs % 60);
        let connection = match (self.connected, self.subscribed) {
            (true, true) => "connected, subscribed",
            (true, false) => "connected, not subscribed",
            (false, _) => "DISCONNECTED",
        };
        let rate = self
            .success_rate()
            .map_or_else(|| "-".to_owned(), |r| format!("{r:.2}%"));
        // On the clock of the DATETIME columns (last_seen beside it), named.
        let last = self.last_message.map_or_else(
            || "-".to_owned(),
            |t| {
                format!(
                    "{} ({zone}, as last_seen)",
                    zone.naive(t).format("%Y-%m-%d %H:%M:%S")
                )
            },
        );
        let rule = "=".repeat(70);
        let mut out = format!(
            "{rule}\nMQTT ingest statistics\n{rule}\n  uptime:        {uptime}\n  connection:    {connection}\n  total:         {}\n  succeeded:     {}\n  failed:        {}\n  success rate:  {rate}\n  last message:  {last}\n",
            self.received, self.succeeded, self.failed
        );
        let reasons: Vec<String> = self
            .rejected
            .iter()
            .filter(|(_, n)| *n > 0)
            .map(|(r, n)| format!("{r}={n}"))
            .collect();
        if !reasons.is_empty() {
            out.push_str(&format!("  failed by:     {}\n", reasons.join(", ")));
        }
        out.push_str(&format!(
            "  batches:       {} ({} device rows written)\n  reconnects:    {}\n  db errors:     {}\n  db conflicts:  {} (retried)\n{rule}",
            self.batches, self.rows_written, self.reconnects, self.db_errors, self.db_conflicts
        ));
        out
    }
}

impl Snapshot {
    /// The statistics block in the words of CodeHubot's Python service (its README tells
    /// operators to grep for `📊 MQTT服务统计`); the last message's time on `zone`'s clock, as
    /// that service showed it in Beijing time.
    pub fn render_codehubot(&self, zone: &Zone) -> String {
        let secs = self.uptime.as_secs();
        let days = secs / 86_400;
        // Python's str(timedelta), without the microseconds.
        let clock = format!(
            "{}:{:02}:{:02}",
            secs / 3600 % 24,
            secs / 60 % 60,
            secs % 60
        );
        let uptime = match days {
            0 => clock,
            1 => format!("1 day, {clock}"),
            n => format!("{n} days, {clock}"),
        };
        let connection = if self.connected {
            "✅ 已连接"
        } else {
            "❌ 未连接"
        };
        let rule = "=".repeat(70);
        let mut out = format!(
            "{rule}\n📊 MQTT服务统计信息\n{rule}\n  运行时间: {uptime}\n  连接状态: {connection}\n  总消息数: {}\n  成功处理: {}\n  处理失败: {}\n  成功率: {:.2}%\n",
            self.received,
            self.succeeded,
            self.failed,
            self.success_rate().unwrap_or(0.0)
        );
        if let Some(t) = self.last_message {
            out.push_str(&format!(
                "  最后消息: {}\n",
                zone.at(t).format("%Y-%m-%d %H:%M:%S")
            ));
        }
        out.push_str(&rule);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_the_python_services_block() {
        let s = Stats::with_style(Duration::from_secs(60), LogStyle::Codehubot);
        assert!(s.warnings().codehubot_wording());
        for _ in 0..4 {
            s.received();
        }
        s.succeeded(3);
        s.rejected(&Rejection::UnknownDevice);
        s.connected(true);
        let mut snap = s.snapshot();
        snap.uptime = Duration::from_secs(2 * 3600 + 30 * 60 + 15);
        snap.last_message = DateTime::from_timestamp(1_766_125_800, 0);
        let text = snap.render_codehubot(&Zone::default());
        let rule = "=".repeat(70);
        assert_eq!(
            text,
            format!(
                "{rule}\n📊 MQTT服务统计信息\n{rule}\n  运行时间: 2:30:15\n  连接状态: ✅ 已连接\n  总消息数: 4\n  成功处理: 3\n  处理失败: 1\n  成功率: 75.00%\n  最后消息: 2025-12-19 14:30:00\n{rule}"
            )
        );
        snap.uptime = Duration::from_secs(86_400 * 2 + 5);
        snap.connected = false;
        snap.last_message = None;
        let text = snap.render_codehubot(&Zone::default());
        assert!(text.contains("  运行时间: 2 days, 0:00:05\n"), "{text}");
        assert!(text.contains("❌ 未连接") && !text.contains("最后消息"));
    }

    #[test]
    fn counts_and_renders_the_seed_block() {
        let s = Stats::default();
        for _ in 0..4 {
            s.received();
        }
        s.succeeded(3);
        s.rejected(&Rejection::UnknownDevice);
        s.connected(true);
        s.subscribed();
        let snap = s.snapshot();
        assert_eq!((snap.received, snap.succeeded, snap.failed), (4, 3, 1));
        assert_eq!(snap.success_rate(), Some(75.0));
        let text = snap.render(&Zone::default());
        for line in [
            "uptime:        0:00:00",
            "connection:    connected, subscribed",
            "total:         4",
            "succeeded:     3",
            "failed:        1",
            "success rate:  75.00%",
            "failed by:     unknown_device=1",
        ] {
            assert!(text.contains(line), "{line:?} missing in\n{text}");
        }
        assert!(!text.contains("last message:  -"));
    }

    #[test]
    fn empty_stats_render_dashes() {
        let snap = Stats::default().snapshot();
        assert_eq!(snap.success_rate(), None);
        let text = snap.render(&Zone::default());
        assert!(text.contains("success rate:  -") && text.contains("last message:  -"));
        assert!(text.contains("DISCONNECTED"));
    }

    #[test]
    fn reconnects_count_after_the_first() {
        let s = Stats::default();
        s.connected(true);
        s.disconnected();
        assert!(!s.is_subscribed());
        s.connected(false);
        assert_eq!(s.snapshot().reconnects, 1);
    }
}
