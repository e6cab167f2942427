//! The counters for `/metrics`, encoded by `prometheus-client` in the Prometheus text format
//! (version 0.0.4).
//!
//! The numbers are not kept twice: a [`Collector`] reads one [`Snapshot`] of the
//! [`Stats`](crate::ops::stats::Stats) the statistics block also reads, so the two never disagree,
//! and the crate writes the families, their HELP/TYPE lines, label escaping and the histogram.

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use crate::ops::stats::{FLUSH_BUCKETS, Snapshot};

/// The `Content-Type` of what [`render`] returns.
pub const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

/// Gauges that are not counters of the message path: measured by the service around it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Gauges {
    /// Messages waiting in the writers' queues, and the queues' total capacity; `None` before
    /// the writers exist.
    pub queue: Option<(usize, usize)>,
    /// Whether the last database check succeeded.
    pub db_up: bool,
    /// Devices with `is_online = 1` at the last successful check; `None` before the first.
    pub devices_online: Option<i64>,
    /// The database node in use (`host:port`) and how often the pool moved to another;
    /// `None` before the pool exists.
    pub db_node: Option<(String, u64)>,
}

/// Renders every metric family. Each rejection reason is listed, with zero when it never
/// happened, so that `rate()` and alerts see a series from the start.
pub fn render(snap: &Snapshot, gauges: &Gauges) -> String {
    let mut registry = Registry::with_prefix("mqtt_ingest");
    registry.register_collector(Box::new(Scrape {
        snap: snap.clone(),
        gauges: gauges.clone(),
    }));
    let mut out = String::with_capacity(4096);
    // Writing into a String cannot fail, and no value here is one the encoder refuses.
    prometheus_client::encoding::prometheus_text::encode(&mut out, &registry)
        .expect("the metrics encode into a String");
    out
}

/// One scrape's numbers.
#[derive(Debug)]
struct Scrape {
    snap: Snapshot,
    gauges: Gauges,
}

/// One family's samples.
enum Value<'a> {
    /// A counter (the encoder adds `_total` to the name).
    Counter(u64),
    /// A counter with one series per reason.
    ByReason(&'a [(&'static str, u64)]),
    /// A gauge.
    Gauge(i64),
    /// A gauge in seconds.
    Seconds(f64),
    /// An information gauge: 1, with one label saying what.
    Info(&'static str, &'a str),
    /// Left out: not known yet (before the writers exist, before the first database check).
    Unknown,
}

impl Collector for Scrape {
    fn encode(&self, mut e: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        use Value::{ByReason, Counter, Gauge, Info, Seconds, Unknown};
        let (s, g) = (&self.snap, &self.gauges);
        let flag = |b: bool| Gauge(i64::from(b));
        let known = |v: Option<i64>| v.map_or(Unknown, Gauge);
        let count = |n: usize| i64::try_from(n).unwrap_or(i64::MAX);
        let queue = |f: fn((usize, usize)) -> usize| known(g.queue.map(|q| count(f(q))));
        e.encode_descriptor(
            "build_info",
            "Version of the running service.",
            None,
            MetricType::Gauge,
        )?
        .encode_family(&[("version", env!("CARGO_PKG_VERSION"))])?
        .encode_gauge(&1u64)?;
        // In the order they are shown; the flush histogram goes after rows_written.
        let unix = |t: Option<chrono::DateTime<chrono::Utc>>| {
            t.map_or(Unknown, |t| Seconds(t.timestamp_millis() as f64 / 1000.0))
        };
        let families: [(&str, &str, Value<'_>); 24] = [
            (
                "uptime_seconds",
                "Seconds since the service started.",
                Seconds(s.uptime.as_secs_f64()),
            ),
            (
                "messages_received",
                "Messages taken in from the broker (each ends as written or rejected).",
                Counter(s.received),
            ),
            (
                "messages_written",
                "Messages whose update committed to the database.",
                Counter(s.succeeded),
            ),
            (
                "messages_rejected",
                "Messages rejected, by reason; nothing is written for them.",
                ByReason(&s.rejected),
            ),
            (
                "parts_skipped",
                "Invalid parts (a sensor, a location) skipped in messages that were still written.",
                Counter(s.parts_skipped),
            ),
            (
                "timestamps_undated",
                "Device timestamps that dated nothing (uptime counters, garbage, too far ahead), by reason; their readings kept the receive time.",
                ByReason(&s.undated),
            ),
            (
                "batches",
                "Committed batches (one transaction each).",
                Counter(s.batches),
            ),
            (
                "rows_written",
                "device_main rows written by the committed batches.",
                Counter(s.rows_written),
            ),
            (
                "queue_depth",
                "Validated messages waiting for the database writers.",
                queue(|(depth, _)| depth),
            ),
            (
                "queue_capacity",
                "Capacity of the writers' queues together (INGEST_QUEUE_CAPACITY).",
                queue(|(_, capacity)| capacity),
            ),
            (
                "mqtt_connected",
                "1 while the connection to the broker is up.",
                flag(s.connected),
            ),
            (
                "mqtt_subscribed",
                "1 while the broker has acknowledged the subscriptions on the current connection.",
                flag(s.subscribed),
            ),
            (
                "mqtt_connected_since_seconds",
                "When the current connection to the broker was made (Unix time); absent while disconnected.",
                unix(s.connected_since),
            ),
            (
                "mqtt_session_present",
                "1 when the broker kept the persistent session at the current connection (its CONNACK's session_present).",
                flag(s.session_present),
            ),
            (
                "mqtt_broker",
                "The broker of the current (or last) connection, in its label.",
                if s.broker.is_empty() {
                    Unknown
                } else {
                    Info("broker", s.broker.as_str())
                },
            ),
            (
                "mqtt_reconnects",
                "Connections to the broker after the first.",
                Counter(s.reconnects),
            ),
            (
                "mqtt_sessions_lost",
                "Reconnections on which the broker no longer had the persistent session (session_present=false): what it had queued is lost.",
                Counter(s.sessions_lost),
            ),
            (
                "db_errors",
                "Failed database write attempts (each is retried).",
                Counter(s.db_errors),
            ),
            (
                "db_conflicts",
                "Transactions the database rolled back because another met the same rows (deadlock, lock wait timeout, Galera certification failure); each batch is retried after a pause of about 20 ms, never rejected.",
                Counter(s.db_conflicts),
            ),
            (
                "db_node_moves",
                "Times the pool moved to the next node of DB_HOST because the one in use failed.",
                match &g.db_node {
                    Some((_, moves)) => Counter(*moves),
                    None => Unknown,
                },
            ),
            (
                "db_node",
                "The database node in use (host:port of DB_HOST), in its label.",
                match &g.db_node {
                    Some((node, _)) => Info("node", node.as_str()),
                    None => Unknown,
                },
            ),
            (
                "last_commit_timestamp_seconds",
                "When a batch last committed (Unix time); absent before the first.",
                unix(s.last_commit),
            ),
            (
                "db_up",
                "1 when the last periodic database check succeeded.",
                flag(g.db_up),
            ),
            (
                "devices_online",
                "Rows of device_main with is_online = 1, at the last database check.",
                known(g.devices_online),
            ),
        ];
        for (name, help, value) in families {
            match value {
                Counter(v) => e
                    .encode_descriptor(name, help, None, MetricType::Counter)?
                    .encode_counter::<NoLabelSet, _, u64>(&v, None)?,
                ByReason(counts) => {
                    let mut family = e.encode_descriptor(name, help, None, MetricType::Counter)?;
                    for (reason, n) in counts {
                        family
                            .encode_family(&[("reason", *reason)])?
                            .encode_counter::<NoLabelSet, _, u64>(n, None)?;
                    }
                }
                Gauge(v) => e
                    .encode_descriptor(name, help, None, MetricType::Gauge)?
                    .encode_gauge(&v)?,
                Seconds(v) => e
                    .encode_descriptor(name, help, None, MetricType::Gauge)?
                    .encode_gauge(&v)?,
                Info(label, value) => e
                    .encode_descriptor(name, help, None, MetricType::Gauge)?
                    .encode_family(&[(label, value)])?
                    .encode_gauge(&1i64)?,
                Unknown => {}
            }
            if name == "rows_written" {
                self.flush_histogram(&mut e)?;
            }
        }
        Ok(())
    }
}

impl Scrape {
    fn flush_histogram(&self, e: &mut DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let s = &self.snap;
        // The snapshot's buckets are cumulative; the encoder wants each bucket's own count
        // (it adds them up), with +Inf last.
        let mut below = 0;
        let mut buckets: Vec<(f64, u64)> = FLUSH_BUCKETS
            .iter()
            .zip(&s.flush_buckets)
            .map(|(le, cumulative)| {
                let own = cumulative - below;
                below = *cumulative;
                (*le, own)
            })
            .collect();
        buckets.push((f64::INFINITY, s.flush_count - below));
        e.encode_descriptor(
            "flush_duration_seconds",
            "Time to write and commit one batch (successful attempts).",
            None,
            MetricType::Histogram,
        )?
        .encode_histogram::<NoLabelSet>(
            s.flush_sum.as_secs_f64(),
            s.flush_count,
            &buckets,
            None,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::intake::rejection::Rejection;
    use crate::ops::stats::Stats;
    use std::time::Duration;

    /// The value of the one sample whose name (with labels) is exactly `series`.
    fn sample(text: &str, series: &str) -> Option<String> {
        text.lines()
            .filter(|l| !l.starts_with('#'))
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ').map(str::to_owned))
    }

    #[test]
    fn every_reason_is_listed_and_the_histogram_is_cumulative() {
        let s = Stats::default();
        s.received();
        s.received();
        s.rejected(&Rejection::NotJson(String::new()));
        s.flush_took(Duration::from_micros(700));
        s.flush_took(Duration::from_millis(30));
        s.flush_took(Duration::from_secs(60));
        let text = render(
            &s.snapshot(),
            &Gauges {
                queue: Some((3, 1024)),
                db_up: true,
                devices_online: Some(7),
                db_node: Some(("db2:3306".into(), 2)),
            },
        );
        for reason in Rejection::REASONS {
            let want = if reason == "not_json" { "1" } else { "0" };
            let series = format!("mqtt_ingest_messages_rejected_total{{reason=\"{reason}\"}}");
            assert_eq!(sample(&text, &series).as_deref(), Some(want), "{series}");
        }
        let bucket = |le: &str| {
            sample(
                &text,
                &format!("mqtt_ingest_flush_duration_seconds_bucket{{le=\"{le}\"}}"),
            )
        };
        assert_eq!(bucket("0.001").as_deref(), Some("1"));
        assert_eq!(bucket("0.025").as_deref(), Some("1"));
        assert_eq!(bucket("0.05").as_deref(), Some("2"));
        assert_eq!(bucket("10").as_deref(), Some("2"));
        assert_eq!(bucket("+Inf").as_deref(), Some("3"));
        assert_eq!(
            sample(&text, "mqtt_ingest_flush_duration_seconds_count").as_deref(),
            Some("3")
        );
        assert_eq!(
            sample(&text, "mqtt_ingest_messages_received_total").as_deref(),
            Some("2")
        );
        assert_eq!(
            sample(&text, "mqtt_ingest_queue_depth").as_deref(),
            Some("3")
        );
        assert_eq!(
            sample(&text, "mqtt_ingest_devices_online").as_deref(),
            Some("7")
        );
        assert_eq!(
            sample(&text, "mqtt_ingest_db_node_moves_total").as_deref(),
            Some("2")
        );
        // Every sample line belongs to a family declared just before it.
        let mut declared = String::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                declared = rest.split(' ').next().unwrap().to_owned();
            } else if !line.starts_with('#') {
                assert!(line.starts_with(&declared), "{line} outside {declared}");
            }
        }
    }

    #[test]
    fn the_family_names_are_the_ones_dashboards_use() {
        // Every family shown: connected, a commit made.
        let stats = Stats::default();
        stats.connected(true);
        stats.connection_to("broker:1883", true);
        stats.batch_committed(1);
        let text = render(
            &stats.snapshot(),
            &Gauges {
                queue: Some((0, 1)),
                db_up: false,
                devices_online: Some(0),
                db_node: Some(("db:3306".into(), 0)),
            },
        );
        let declared: Vec<&str> = text
            .lines()
            .filter_map(|l| l.strip_prefix("# TYPE mqtt_ingest_"))
            .collect();
        assert_eq!(
            declared,
            [
                "build_info gauge",
                "uptime_seconds gauge",
                "messages_received_total counter",
                "messages_written_total counter",
                "messages_rejected_total counter",
                "parts_skipped_total counter",
                "timestamps_undated_total counter",
                "batches_total counter",
                "rows_written_total counter",
                "flush_duration_seconds histogram",
                "queue_depth gauge",
                "queue_capacity gauge",
                "mqtt_connected gauge",
                "mqtt_subscribed gauge",
                "mqtt_connected_since_seconds gauge",
                "mqtt_session_present gauge",
                "mqtt_broker gauge",
                "mqtt_reconnects_total counter",
                "mqtt_sessions_lost_total counter",
                "db_errors_total counter",
                "db_conflicts_total counter",
                "db_node_moves_total counter",
                "db_node gauge",
                "last_commit_timestamp_seconds gauge",
                "db_up gauge",
                "devices_online gauge",
            ]
        );
        assert_eq!(
            sample(
                &text,
                &format!(
                    "mqtt_ingest_build_info{{version=\"{}\"}}",
                    env!("CARGO_PKG_VERSION")
                )
            )
            .as_deref(),
            Some("1")
        );
    }

    #[test]
    fn unknown_gauges_are_left_out() {
        let text = render(&Stats::default().snapshot(), &Gauges::default());
        assert!(!text.contains("mqtt_ingest_devices_online"));
        assert!(!text.contains("mqtt_ingest_queue_depth"));
        assert_eq!(sample(&text, "mqtt_ingest_db_up").as_deref(), Some("0"));
    }
}
