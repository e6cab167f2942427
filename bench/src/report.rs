//! Result rows, the printed table, medians over runs, the JSON file.

use std::fmt::Write as _;

use serde::Serialize;

/// One scenario's outcome in one run.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Row {
    pub scenario: String,
    /// "drain", "broker", "db" or "live".
    pub kind: String,
    pub devices: u64,
    pub messages: u64,
    pub seconds: f64,
    /// messages (rows for db-limit) per second.
    pub rate: f64,
    /// drains: rate / the broker limit of the same size in the same run.
    pub ratio_to_broker: Option<f64>,
    /// drains: the rate from the service's subscription on (its start-up left out, as the
    /// do-nothing subscriber, which is not a process of its own, has none) / the broker limit.
    pub ratio_from_subscription: Option<f64>,
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    pub max_ms: Option<f64>,
    /// the service's peak RSS (VmHWM).
    pub peak_rss_mb: Option<f64>,
    pub lost: u64,
    pub service_total: Option<u64>,
    pub service_succeeded: Option<u64>,
    pub service_failed: Option<u64>,
    /// seconds from the service's spawn to its subscription (part of a drain's time).
    pub service_start_s: Option<f64>,
    pub note: Option<String>,
    pub error: Option<String>,
}

impl Row {
    pub fn failed(&self) -> bool {
        self.error.is_some() || self.lost > 0
    }
}

/// Fills in each drain's ratio to the broker limit of the same size measured in the run.
pub fn link_ratios(rows: &mut [Row]) {
    let limit = |name: &str| {
        rows.iter()
            .find(|r| r.scenario == name && r.error.is_none())
            .map(|r| r.rate)
    };
    let l100 = limit("broker-100");
    let l10k = limit("broker-10k");
    for r in rows.iter_mut() {
        let l = match r.scenario.as_str() {
            "drain-100" => l100,
            "drain-10k" | "history-10k" => l10k,
            _ => None,
        };
        if let Some(l) = l.filter(|l| *l > 0.0)
            && r.error.is_none()
        {
            r.ratio_to_broker = Some(r.rate / l);
            r.ratio_from_subscription = r
                .service_start_s
                .filter(|s| *s < r.seconds)
                .map(|s| r.messages as f64 / (r.seconds - s) / l);
        }
    }
}

fn median(mut v: Vec<f64>) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    })
}

/// Per scenario, the median of each figure over the runs that measured it (lost: the most).
pub fn medians(runs: &[Vec<Row>]) -> Vec<Row> {
    let mut names: Vec<&str> = Vec::new();
    for r in runs.iter().flatten() {
        if !names.contains(&r.scenario.as_str()) {
            names.push(&r.scenario);
        }
    }
    names
        .into_iter()
        .map(|name| {
            let all: Vec<&Row> = runs
                .iter()
                .flatten()
                .filter(|r| r.scenario == name)
                .collect();
            let ok: Vec<&Row> = all.iter().copied().filter(|r| r.error.is_none()).collect();
            let m =
                |f: &dyn Fn(&Row) -> Option<f64>| median(ok.iter().filter_map(|r| f(r)).collect());
            let errors: Vec<String> = all.iter().filter_map(|r| r.error.clone()).collect();
            Row {
                scenario: name.to_owned(),
                kind: all[0].kind.clone(),
                devices: all[0].devices,
                messages: all[0].messages,
                seconds: m(&|r| Some(r.seconds)).unwrap_or(0.0),
                rate: m(&|r| Some(r.rate)).unwrap_or(0.0),
                ratio_to_broker: m(&|r| r.ratio_to_broker),
                ratio_from_subscription: m(&|r| r.ratio_from_subscription),
                p50_ms: m(&|r| r.p50_ms),
                p99_ms: m(&|r| r.p99_ms),
                max_ms: m(&|r| r.max_ms),
                peak_rss_mb: m(&|r| r.peak_rss_mb),
                lost: all.iter().map(|r| r.lost).max().unwrap_or(0),
                service_total: None,
                service_succeeded: None,
                service_failed: None,
                service_start_s: m(&|r| r.service_start_s),
                note: Some(format!("median of {} run(s)", ok.len())),
                error: (!errors.is_empty()).then(|| errors.join(" | ")),
            }
        })
        .collect()
}

fn opt(v: Option<f64>, decimals: usize) -> String {
    v.map_or_else(|| "-".to_owned(), |v| format!("{v:.decimals$}"))
}

/// The printed table.
pub fn table(title: &str, rows: &[Row]) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "{title}");
    let _ = writeln!(
        out,
        "{:<11} {:>7} {:>8} {:>8} {:>10} {:>9} {:>8} {:>7} {:>7} {:>7} {:>7} {:>5}",
        "scenario",
        "devices",
        "messages",
        "seconds",
        "msg/s",
        "vs broker",
        "from sub",
        "p50 ms",
        "p99 ms",
        "max ms",
        "RSS MB",
        "lost"
    );
    for r in rows {
        let rate = if r.kind == "db" || r.kind == "presence" {
            format!("{:.0} rows", r.rate)
        } else {
            format!("{:.0}", r.rate)
        };
        let _ = writeln!(
            out,
            "{:<11} {:>7} {:>8} {:>8.2} {:>10} {:>9} {:>8} {:>7} {:>7} {:>7} {:>7} {:>5}",
            r.scenario,
            r.devices,
            r.messages,
            r.seconds,
            rate,
            opt(r.ratio_to_broker, 2),
            opt(r.ratio_from_subscription, 2),
            opt(r.p50_ms, 1),
            opt(r.p99_ms, 1),
            opt(r.max_ms, 1),
            opt(r.peak_rss_mb, 1),
            r.lost
        );
        if let Some(note) = r.note.as_deref().filter(|n| !n.starts_with("median of")) {
            let _ = writeln!(out, "    {note}");
        }
        if let Some(e) = &r.error {
            let first = e.lines().next().unwrap_or("");
            let _ = writeln!(out, "    ERROR: {first}");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(name: &str, rate: f64) -> Row {
        Row {
            scenario: name.into(),
            kind: if name.starts_with("drain") {
                "drain"
            } else {
                "broker"
            }
            .into(),
            rate,
            ..Row::default()
        }
    }

    #[test]
    fn ratios_use_the_same_size() {
        let mut rows = vec![
            row("broker-100", 100.0),
            row("drain-100", 50.0),
            row("broker-10k", 10.0),
            row("drain-10k", 20.0),
        ];
        rows[1].messages = 50;
        rows[1].seconds = 1.0;
        rows[1].service_start_s = Some(0.5);
        link_ratios(&mut rows);
        assert_eq!(rows[1].ratio_to_broker, Some(0.5));
        assert_eq!(rows[3].ratio_to_broker, Some(2.0));
        // 50 messages in the 0.5 s after the subscription: 100 msg/s, the broker's rate.
        assert_eq!(rows[1].ratio_from_subscription, Some(1.0));
        assert_eq!(rows[3].ratio_from_subscription, None);
    }

    #[test]
    fn median_of_odd_and_even() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(vec![4.0, 1.0]), Some(2.5));
        assert_eq!(median(vec![]), None);
    }
}
