//! The counters in the Prometheus text format (version 0.0.4), for `/metrics`.
//!
//! Written by hand: a dozen families do not need a metrics registry, and the numbers come
//! straight from the [`Stats`](crate::stats::Stats) the statistics block already reads, so the
//! two can never disagree.

use std::fmt::Write as _;

use crate::stats::{FLUSH_BUCKETS, Snapshot};

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
}

/// Renders every metric family. Each rejection reason is listed, with zero when it never
/// happened, so that `rate()` and alerts see a series from the start.
pub fn render(snap: &Snapshot, gauges: &Gauges) -> String {
    let mut out = String::with_capacity(4096);
    let mut family = |name: &str, kind: &str, help: &str, samples: &[(String, String)]| {
        let _ = writeln!(out, "# HELP mqtt_ingest_{name} {help}");
        let _ = writeln!(out, "# TYPE mqtt_ingest_{name} {kind}");
        for (suffix_and_labels, value) in samples {
            let _ = writeln!(out, "mqtt_ingest_{name}{suffix_and_labels} {value}");
        }
    };
    let one = |v: u64| vec![(String::new(), v.to_string())];
    let flag = |b: bool| one(u64::from(b));

    family(
        "build_info",
        "gauge",
        "Version of the running service.",
        &[(
            format!("{{version=\"{}\"}}", env!("CARGO_PKG_VERSION")),
            "1".into(),
        )],
    );
    family(
        "uptime_seconds",
        "gauge",
        "Seconds since the service started.",
        &[(String::new(), format!("{:.3}", snap.uptime.as_secs_f64()))],
    );
    family(
        "messages_received_total",
        "counter",
        "Messages taken in from the broker (each ends as written or rejected).",
        &one(snap.received),
    );
    family(
        "messages_written_total",
        "counter",
        "Messages whose update committed to the database.",
        &one(snap.succeeded),
    );
    let rejected: Vec<_> = snap
        .rejected
        .iter()
        .map(|(reason, n)| (format!("{{reason=\"{reason}\"}}"), n.to_string()))
        .collect();
    family(
        "messages_rejected_total",
        "counter",
        "Messages rejected, by reason; nothing is written for them.",
        &rejected,
    );
    family(
        "parts_skipped_total",
        "counter",
        "Invalid parts (a sensor, a location) skipped in messages that were still written.",
        &one(snap.parts_skipped),
    );
    let undated: Vec<_> = snap
        .undated
        .iter()
        .map(|(reason, n)| (format!("{{reason=\"{reason}\"}}"), n.to_string()))
        .collect();
    family(
        "timestamps_undated_total",
        "counter",
        "Device timestamps that dated nothing (uptime counters, garbage, too far ahead), by reason; their readings kept the receive time.",
        &undated,
    );
    family(
        "batches_total",
        "counter",
        "Committed batches (one transaction each).",
        &one(snap.batches),
    );
    family(
        "rows_written_total",
        "counter",
        "device_main rows written by the committed batches.",
        &one(snap.rows_written),
    );
    // Cumulative buckets, as the format wants them.
    let mut buckets: Vec<(String, String)> = FLUSH_BUCKETS
        .iter()
        .zip(&snap.flush_buckets)
        .map(|(le, n)| (format!("_bucket{{le=\"{le}\"}}"), n.to_string()))
        .collect();
    buckets.push(("_bucket{le=\"+Inf\"}".into(), snap.flush_count.to_string()));
    buckets.push((
        "_sum".into(),
        format!("{:.6}", snap.flush_sum.as_secs_f64()),
    ));
    buckets.push(("_count".into(), snap.flush_count.to_string()));
    family(
        "flush_duration_seconds",
        "histogram",
        "Time to write and commit one batch (successful attempts).",
        &buckets,
    );
    if let Some((depth, capacity)) = gauges.queue {
        family(
            "queue_depth",
            "gauge",
            "Validated messages waiting for the database writers.",
            &one(depth as u64),
        );
        family(
            "queue_capacity",
            "gauge",
            "Capacity of the writers' queues together (INGEST_QUEUE_CAPACITY).",
            &one(capacity as u64),
        );
    }
    family(
        "mqtt_connected",
        "gauge",
        "1 while the connection to the broker is up.",
        &flag(snap.connected),
    );
    family(
        "mqtt_subscribed",
        "gauge",
        "1 while the broker has acknowledged the subscriptions on the current connection.",
        &flag(snap.subscribed),
    );
    family(
        "mqtt_reconnects_total",
        "counter",
        "Connections to the broker after the first.",
        &one(snap.reconnects),
    );
    family(
        "mqtt_sessions_lost_total",
        "counter",
        "Reconnections on which the broker no longer had the persistent session (session_present=false): what it had queued is lost.",
        &one(snap.sessions_lost),
    );
    family(
        "db_errors_total",
        "counter",
        "Failed database write attempts (each is retried).",
        &one(snap.db_errors),
    );
    family(
        "db_up",
        "gauge",
        "1 when the last periodic database check succeeded.",
        &flag(gauges.db_up),
    );
    if let Some(n) = gauges.devices_online {
        family(
            "devices_online",
            "gauge",
            "Rows of device_main with is_online = 1, at the last database check.",
            &[(String::new(), n.to_string())],
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rejection::Rejection;
    use crate::stats::Stats;
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
    fn unknown_gauges_are_left_out() {
        let text = render(&Stats::default().snapshot(), &Gauges::default());
        assert!(!text.contains("mqtt_ingest_devices_online"));
        assert!(!text.contains("mqtt_ingest_queue_depth"));
        assert_eq!(sample(&text, "mqtt_ingest_db_up").as_deref(), Some("0"));
    }
}
