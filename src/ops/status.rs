//! The status page (`/`) and its data (`/status.json`): whether the broker and the database are
//! there, how fast messages go through (the last hour, sampled every 10 s), why messages were
//! refused, how full the writers' queue is, and when the last batch committed.
//!
//! One source: the page is rendered from the JSON, and the JSON from the same counters and
//! gauges as `/metrics` (a [`Snapshot`] and [`Gauges`]), plus the trend of those counters. The
//! only thing it shows that `/metrics` does not is the evidence of the latest kept rejects, and
//! only where the operator allows it ([`RejectsShown`]).
//!
//! The page is HTML rendered here, with no script and nothing fetched from elsewhere; it reloads
//! itself every 10 s. Device input (topics, payloads, reasons) is escaped.

use std::collections::VecDeque;
use std::fmt::Write as _;

use chrono::{DateTime, Utc};
use serde_json::{Value, json};

use crate::ops::metrics::Gauges;
use crate::ops::stats::Snapshot;
use crate::store::rejects::StoredReject;

/// How often the trend is sampled, and how many samples are kept (an hour).
pub const TREND_EVERY_SECS: u64 = 10;
pub const TREND_SAMPLES: usize = 360;

/// One sample of the counters.
#[derive(Debug, Clone, Copy)]
pub struct Sample {
    pub at: DateTime<Utc>,
    pub received: u64,
    pub written: u64,
    pub rejected: u64,
}

/// The last hour of samples.
#[derive(Debug, Default)]
pub struct Trend(VecDeque<Sample>);

impl Trend {
    /// Adds a sample, dropping the oldest past an hour.
    pub fn push(&mut self, s: Sample) {
        if self.0.len() == TREND_SAMPLES {
            self.0.pop_front();
        }
        self.0.push_back(s);
    }

    /// Messages per second between consecutive samples: (end time, received, written,
    /// rejected).
    pub fn rates(&self) -> Vec<(DateTime<Utc>, f64, f64, f64)> {
        self.0
            .iter()
            .zip(self.0.iter().skip(1))
            .filter_map(|(a, b)| {
                let secs = (b.at - a.at).num_milliseconds() as f64 / 1000.0;
                (secs > 0.0).then(|| {
                    let per = |x: u64, y: u64| y.saturating_sub(x) as f64 / secs;
                    (
                        b.at,
                        per(a.received, b.received),
                        per(a.written, b.written),
                        per(a.rejected, b.rejected),
                    )
                })
            })
            .collect()
    }
}

/// Whether the page shows the kept rejects' evidence (`STATUS_SHOW_REJECTS`): it is device
/// input, seen by whoever reaches the listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RejectsShown {
    /// Rejects are not kept (`REJECTS_ENABLED=false`).
    NotKept,
    /// Kept, but the listener is not on a loopback address and the operator did not ask.
    Hidden,
    /// Shown.
    Shown,
}

fn time(t: Option<DateTime<Utc>>) -> Value {
    t.map_or(Value::Null, |t| json!(t.to_rfc3339()))
}

/// The data of the page.
pub fn data(
    snap: &Snapshot,
    gauges: &Gauges,
    trend: &Trend,
    shown: RejectsShown,
    rejects: &[StoredReject],
) -> Value {
    let rejected_by: serde_json::Map<String, Value> = snap
        .rejected
        .iter()
        .filter(|(_, n)| *n > 0)
        .map(|(r, n)| ((*r).to_owned(), json!(n)))
        .collect();
    let rates: Vec<Value> = trend
        .rates()
        .into_iter()
        .map(|(at, r, w, x)| json!({"at": at.to_rfc3339(), "received": r, "written": w, "rejected": x}))
        .collect();
    let kept = match shown {
        RejectsShown::NotKept => json!({"kept": false}),
        RejectsShown::Hidden => json!({"kept": true, "shown": false}),
        RejectsShown::Shown => json!({
            "kept": true,
            "shown": true,
            "latest": rejects.iter().map(|r| json!({
                "received_at": r.received_at.format("%Y-%m-%d %H:%M:%S").to_string(),
                "device": r.device,
                "topic": r.topic,
                "reason": r.reason,
                "detail": r.detail,
                "payload": String::from_utf8_lossy(&r.payload),
                "payload_bytes": r.payload_bytes,
            })).collect::<Vec<_>>(),
        }),
    };
    json!({
        "version": env!("CARGO_PKG_VERSION"),
        "uptime_seconds": snap.uptime.as_secs(),
        "broker": {
            "connected": snap.connected,
            "subscribed": snap.subscribed,
            "address": (!snap.broker.is_empty()).then(|| snap.broker.clone()),
            "connected_since": time(snap.connected_since),
            "session_present": snap.session_present,
            "reconnects": snap.reconnects,
            "sessions_lost": snap.sessions_lost,
        },
        "database": {
            "up": gauges.db_up,
            "node": gauges.db_node.as_ref().map(|(n, _)| n.clone()),
            "node_moves": gauges.db_node.as_ref().map(|(_, m)| *m),
            "devices_online": gauges.devices_online,
            "last_commit": time(snap.last_commit),
            "errors": snap.db_errors,
            "conflicts": snap.db_conflicts,
        },
        "messages": {
            "received": snap.received,
            "written": snap.succeeded,
            "rejected": snap.failed,
            "rejected_by_reason": rejected_by,
            "last_message": time(snap.last_message),
        },
        "queue": gauges.queue.map(|(depth, capacity)| json!({"depth": depth, "capacity": capacity})),
        "rates_per_second": rates,
        "rejects": kept,
    })
}

/// Escapes text for HTML (written by hand: five characters, no crate needed).
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

fn state(ok: bool, yes: &str, no: &str) -> String {
    let (class, word) = if ok { ("ok", yes) } else { ("bad", no) };
    format!("<span class=\"{class}\">{}</span>", escape(word))
}

fn text(v: &Value) -> String {
    match v {
        Value::Null => "–".to_owned(),
        Value::String(s) => escape(s),
        other => escape(&other.to_string()),
    }
}

/// A time of the data as a person reads it: `2026-12-02 08:43:00 UTC`.
fn when(v: &Value) -> String {
    v.as_str()
        .and_then(|t| DateTime::parse_from_rfc3339(t).ok())
        .map_or_else(
            || text(v),
            |t| {
                t.with_timezone(&Utc)
                    .format("%Y-%m-%d %H:%M:%S UTC")
                    .to_string()
            },
        )
}

/// The chart of the last hour: an inline SVG with one line per rate.
fn chart(rates: &[Value]) -> String {
    if rates.len() < 2 {
        return "<p class=\"dim\">The chart starts after two samples (every 10 s).</p>".into();
    }
    let get = |v: &Value, k: &str| v[k].as_f64().unwrap_or(0.0);
    let top = rates
        .iter()
        .flat_map(|r| [get(r, "received"), get(r, "written"), get(r, "rejected")])
        .fold(1.0f64, f64::max);
    let (w, h) = (600.0, 140.0);
    let n = rates.len() - 1;
    let line = |key: &str| {
        rates
            .iter()
            .enumerate()
            .map(|(i, r)| {
                format!(
                    "{:.1},{:.1}",
                    i as f64 * w / n as f64,
                    h - get(r, key) / top * (h - 4.0)
                )
            })
            .collect::<Vec<_>>()
            .join(" ")
    };
    format!(
        "<svg viewBox=\"0 0 {w} {h}\" role=\"img\" aria-label=\"messages per second, last hour\">\
         <polyline class=\"received\" points=\"{}\"/><polyline class=\"written\" points=\"{}\"/>\
         <polyline class=\"rejected\" points=\"{}\"/></svg>\
         <p class=\"legend\"><span class=\"received\">received</span> <span class=\"written\">written</span> \
         <span class=\"rejected\">rejected</span>, per second; top of the chart: {top:.0}/s</p>",
        line("received"),
        line("written"),
        line("rejected"),
    )
}

/// The page, from [`data`].
pub fn page(d: &Value) -> String {
    let b = &d["broker"];
    let db = &d["database"];
    let m = &d["messages"];
    let connected = b["connected"].as_bool().unwrap_or(false);
    let subscribed = b["subscribed"].as_bool().unwrap_or(false);
    let db_up = db["up"].as_bool().unwrap_or(false);
    let rates = d["rates_per_second"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let now = rates.last();
    let rate = |k: &str| {
        now.map_or("–".to_owned(), |r| {
            format!("{:.1}", r[k].as_f64().unwrap_or(0.0))
        })
    };
    let mut out = String::with_capacity(8192);
    let _ = write!(
        out,
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <meta http-equiv=\"refresh\" content=\"10\"><title>mqtt-ingest</title><style>{CSS}</style></head><body>\
         <h1>mqtt-ingest <span class=\"dim\">{}</span></h1><div class=\"cards\">",
        text(&d["version"])
    );
    let _ = write!(
        out,
        "<section id=\"broker\"><h2>Broker</h2><p class=\"big\">{}</p>\
         <p>{} · since {}</p><p>session {} · reconnects {} · sessions lost {}</p></section>",
        state(
            connected && subscribed,
            "connected, subscribed",
            if connected {
                "connected, NOT subscribed"
            } else {
                "DISCONNECTED"
            }
        ),
        text(&b["address"]),
        when(&b["connected_since"]),
        if b["session_present"].as_bool().unwrap_or(false) {
            "kept"
        } else {
            "new (nothing was queued for us)"
        },
        text(&b["reconnects"]),
        text(&b["sessions_lost"]),
    );
    let _ = write!(
        out,
        "<section id=\"database\"><h2>Database</h2><p class=\"big\">{}</p>\
         <p>node {} · moves {}</p><p>devices online {} · last commit {}</p>\
         <p>errors {} · conflicts retried {}</p></section>",
        state(db_up, "reachable", "UNREACHABLE"),
        text(&db["node"]),
        text(&db["node_moves"]),
        text(&db["devices_online"]),
        when(&db["last_commit"]),
        text(&db["errors"]),
        text(&db["conflicts"]),
    );
    let queue = match &d["queue"] {
        Value::Null => "–".to_owned(),
        q => format!("{} of {}", text(&q["depth"]), text(&q["capacity"])),
    };
    let _ = write!(
        out,
        "<section id=\"messages\"><h2>Messages</h2>\
         <p class=\"big\"><span id=\"received\">{}</span> received · <span id=\"written\">{}</span> written · \
         <span id=\"rejected\">{}</span> rejected</p>\
         <p>now: {} received/s, {} written/s, {} rejected/s</p>\
         <p>queue {queue} · last message {}</p></section></div>",
        text(&m["received"]),
        text(&m["written"]),
        text(&m["rejected"]),
        rate("received"),
        rate("written"),
        rate("rejected"),
        when(&m["last_message"]),
    );
    let _ = write!(
        out,
        "<section><h2>The last hour</h2>{}</section>",
        chart(&rates)
    );
    out.push_str("<section id=\"rejections\"><h2>Rejected, by reason</h2>");
    match m["rejected_by_reason"].as_object() {
        Some(by) if !by.is_empty() => {
            out.push_str("<table>");
            for (reason, n) in by {
                let _ = write!(
                    out,
                    "<tr><td>{}</td><td>{}</td></tr>",
                    escape(reason),
                    text(n)
                );
            }
            out.push_str("</table>");
        }
        _ => out.push_str("<p class=\"dim\">none</p>"),
    }
    out.push_str("</section><section id=\"rejects\"><h2>Latest rejected messages</h2>");
    let rejects = &d["rejects"];
    if !rejects["kept"].as_bool().unwrap_or(false) {
        out.push_str("<p class=\"dim\">Not kept: set REJECTS_ENABLED=true to keep them (docs/operations.md).</p>");
    } else if !rejects["shown"].as_bool().unwrap_or(false) {
        out.push_str("<p class=\"dim\">Kept, not shown on a listener that is not on 127.0.0.1: set STATUS_SHOW_REJECTS=true, or use <code>mqtt-ingest rejects</code>.</p>");
    } else {
        let latest = rejects["latest"].as_array().cloned().unwrap_or_default();
        if latest.is_empty() {
            out.push_str("<p class=\"dim\">none</p>");
        } else {
            for r in &latest {
                let _ = write!(
                    out,
                    "<div class=\"reject\"><p><b>{}</b> · device {} · {} (DB_TIMEZONE)</p>\
                     <p class=\"dim\">{} · {}</p><p><code>{}</code></p></div>",
                    text(&r["reason"]),
                    text(&r["device"]),
                    text(&r["received_at"]),
                    text(&r["topic"]),
                    text(&r["detail"]),
                    text(&r["payload"]),
                );
            }
        }
    }
    out.push_str(
        "</section><p class=\"dim\">Reloads every 10 s. The same data: <a href=\"/status.json\">/status.json</a>, \
         <a href=\"/metrics\">/metrics</a>.</p></body></html>",
    );
    out
}

const CSS: &str = "body{font-family:system-ui,sans-serif;margin:1rem;max-width:60rem;color:#222}\
h1{font-size:1.4rem}h2{font-size:1rem;margin:.2rem 0}.cards{display:flex;flex-wrap:wrap;gap:.8rem}\
section{border:1px solid #ddd;border-radius:6px;padding:.6rem .8rem;margin:.6rem 0;flex:1 1 16rem;overflow-x:auto}\
.big{font-size:1.15rem;margin:.3rem 0}.ok{color:#176f2c;font-weight:600}.bad{color:#b00020;font-weight:600}\
.dim{color:#777}p{margin:.25rem 0}table{border-collapse:collapse;font-size:.9rem}td,th{padding:.2rem .5rem;\
border-bottom:1px solid #eee;text-align:left;vertical-align:top}code{word-break:break-all}\
.reject{border-top:1px solid #eee;padding:.3rem 0}svg{width:100%;height:9rem;background:#fafafa}polyline{fill:none;stroke-width:1.5}\
polyline.received{stroke:#1f77b4}polyline.written{stroke:#2ca02c}polyline.rejected{stroke:#d62728}\
.legend span.received{color:#1f77b4}.legend span.written{color:#2ca02c}.legend span.rejected{color:#d62728}";

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::stats::Stats;

    #[test]
    fn device_input_is_escaped() {
        assert_eq!(
            escape("<script>alert('x')</script>&\""),
            "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt;&amp;&quot;"
        );
    }

    #[test]
    fn rates_come_from_consecutive_samples_and_an_hour_is_kept() {
        let mut t = Trend::default();
        let t0 = DateTime::from_timestamp(1_000_000, 0).unwrap();
        for i in 0..(TREND_SAMPLES as i64 + 5) {
            t.push(Sample {
                at: t0 + chrono::Duration::seconds(10 * i),
                received: 100 * i as u64,
                written: 90 * i as u64,
                rejected: 10 * i as u64,
            });
        }
        let rates = t.rates();
        assert_eq!(rates.len(), TREND_SAMPLES - 1);
        assert_eq!((rates[0].1, rates[0].2, rates[0].3), (10.0, 9.0, 1.0));
    }

    #[test]
    fn the_page_says_what_the_data_says() {
        let stats = Stats::default();
        stats.connected(true);
        stats.connection_to("broker:1883", false);
        let gauges = Gauges {
            queue: Some((3, 100)),
            db_up: false,
            devices_online: Some(7),
            db_node: Some(("db:3306".into(), 1)),
        };
        let d = data(
            &stats.snapshot(),
            &gauges,
            &Trend::default(),
            RejectsShown::Hidden,
            &[],
        );
        assert_eq!(d["broker"]["address"], "broker:1883");
        assert_eq!(d["database"]["up"], false);
        let html = page(&d);
        assert!(html.contains("UNREACHABLE") && html.contains("connected, NOT subscribed"));
        assert!(html.contains("3 of 100") && html.contains("db:3306"));
        assert!(html.contains("STATUS_SHOW_REJECTS"));
        assert!(!html.contains("<script"));
    }
}
