//! The alert rules (`ops/prometheus/alerts.yml`) are checked, not just written:
//! `promtool check rules`; `promtool test rules` over synthetic series that fire each alert and
//! series that do not; and every metric a rule names is one that `/metrics` exposes, so a
//! renamed metric cannot leave a dead alert.
//!
//! The promtool test file is built here from the rules themselves (their annotations, with the
//! two template parts the summaries use filled in), so a reworded description needs no second
//! copy. promtool comes from `scripts/setup.sh --for-tests` (PATH or `target/tools/promtool`).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use mqtt_ingest::ops::metrics::{Gauges, render};
use mqtt_ingest::ops::stats::Stats;
use serde_yaml::{Mapping, Value};

const RULES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/ops/prometheus/alerts.yml");

fn promtool() -> PathBuf {
    let local = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/tools/promtool");
    if local.exists() {
        return local;
    }
    PathBuf::from("promtool")
}

fn run(args: &[&str]) -> (bool, String) {
    let out = Command::new(promtool())
        .args(args)
        .output()
        .expect("promtool runs (scripts/setup.sh --for-tests installs it)");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// One alert's case: input series, when to look, and the instance it should fire for (with the
/// `$value` its summary shows), or `None` when it must not fire.
struct Case {
    alert: &'static str,
    series: &'static [(&'static str, &'static str)],
    eval: &'static str,
    fires: Option<(&'static str, &'static str)>,
}

const CASES: &[Case] = &[
    Case {
        alert: "MqttIngestDown",
        series: &[("up{job=\"mqtt-ingest\", instance=\"a\"}", "1 1 0x10")],
        eval: "10m",
        fires: Some(("a", "")),
    },
    Case {
        alert: "MqttIngestDown",
        series: &[("up{job=\"mqtt-ingest\", instance=\"a\"}", "1 0 0 1x10")],
        eval: "10m",
        fires: None,
    },
    Case {
        alert: "MqttIngestRestarted",
        series: &[(
            "mqtt_ingest_uptime_seconds{instance=\"a\"}",
            "60 120 180 10 70 130",
        )],
        eval: "5m",
        fires: Some(("a", "")),
    },
    Case {
        alert: "MqttIngestRestarted",
        series: &[("mqtt_ingest_uptime_seconds{instance=\"a\"}", "60+60x20")],
        eval: "20m",
        fires: None,
    },
    Case {
        alert: "MqttIngestBrokerDisconnected",
        series: &[("mqtt_ingest_mqtt_connected{instance=\"a\"}", "1 0x10")],
        eval: "5m",
        fires: Some(("a", "")),
    },
    Case {
        // A reconnect within a minute is not an alert.
        alert: "MqttIngestBrokerDisconnected",
        series: &[("mqtt_ingest_mqtt_connected{instance=\"a\"}", "1 0 1x10")],
        eval: "5m",
        fires: None,
    },
    Case {
        alert: "MqttIngestNotSubscribed",
        series: &[
            ("mqtt_ingest_mqtt_connected{instance=\"a\"}", "1x10"),
            ("mqtt_ingest_mqtt_subscribed{instance=\"a\"}", "0x10"),
        ],
        eval: "8m",
        fires: Some(("a", "")),
    },
    Case {
        alert: "MqttIngestNotSubscribed",
        series: &[
            ("mqtt_ingest_mqtt_connected{instance=\"a\"}", "1x10"),
            ("mqtt_ingest_mqtt_subscribed{instance=\"a\"}", "1x10"),
        ],
        eval: "8m",
        fires: None,
    },
    Case {
        alert: "MqttIngestDatabaseUnreachable",
        series: &[("mqtt_ingest_db_up{instance=\"a\"}", "1 0x10")],
        eval: "5m",
        fires: Some(("a", "")),
    },
    Case {
        alert: "MqttIngestDatabaseUnreachable",
        series: &[("mqtt_ingest_db_up{instance=\"a\"}", "1x10")],
        eval: "5m",
        fires: None,
    },
    Case {
        alert: "MqttIngestWritesStalled",
        series: &[
            (
                "mqtt_ingest_messages_received_total{instance=\"a\"}",
                "0+100x20",
            ),
            ("mqtt_ingest_messages_written_total{instance=\"a\"}", "0x20"),
            (
                "mqtt_ingest_messages_rejected_total{instance=\"a\", reason=\"not_json\"}",
                "0x20",
            ),
        ],
        eval: "15m",
        fires: Some(("a", "")),
    },
    Case {
        alert: "MqttIngestWritesStalled",
        series: &[
            (
                "mqtt_ingest_messages_received_total{instance=\"a\"}",
                "0+100x20",
            ),
            (
                "mqtt_ingest_messages_written_total{instance=\"a\"}",
                "0+100x20",
            ),
            (
                "mqtt_ingest_messages_rejected_total{instance=\"a\", reason=\"not_json\"}",
                "0x20",
            ),
        ],
        eval: "15m",
        fires: None,
    },
    Case {
        // 10 of every 100 rejected: 10 %.
        alert: "MqttIngestRejectionRateHigh",
        series: &[
            (
                "mqtt_ingest_messages_received_total{instance=\"a\"}",
                "0+100x40",
            ),
            (
                "mqtt_ingest_messages_rejected_total{instance=\"a\", reason=\"unknown_device\"}",
                "0+10x40",
            ),
        ],
        eval: "30m",
        fires: Some(("a", "10%")),
    },
    Case {
        alert: "MqttIngestRejectionRateHigh",
        series: &[
            (
                "mqtt_ingest_messages_received_total{instance=\"a\"}",
                "0+100x40",
            ),
            (
                "mqtt_ingest_messages_rejected_total{instance=\"a\", reason=\"unknown_device\"}",
                "0+1x40",
            ),
        ],
        eval: "30m",
        fires: None,
    },
    Case {
        alert: "MqttIngestSessionLost",
        series: &[(
            "mqtt_ingest_mqtt_sessions_lost_total{instance=\"a\"}",
            "0 0 1 1 1",
        )],
        eval: "4m",
        fires: Some(("a", "")),
    },
    Case {
        alert: "MqttIngestSessionLost",
        series: &[(
            "mqtt_ingest_mqtt_sessions_lost_total{instance=\"a\"}",
            "0x20",
        )],
        eval: "15m",
        fires: None,
    },
    Case {
        alert: "MqttIngestQueueNearLimit",
        series: &[
            ("mqtt_ingest_queue_depth{instance=\"a\"}", "900x10"),
            ("mqtt_ingest_queue_capacity{instance=\"a\"}", "1000x10"),
        ],
        eval: "8m",
        fires: Some(("a", "90%")),
    },
    Case {
        alert: "MqttIngestQueueNearLimit",
        series: &[
            ("mqtt_ingest_queue_depth{instance=\"a\"}", "500x10"),
            ("mqtt_ingest_queue_capacity{instance=\"a\"}", "1000x10"),
        ],
        eval: "8m",
        fires: None,
    },
    Case {
        alert: "MqttIngestDatabaseNodeMoved",
        series: &[("mqtt_ingest_db_node_moves_total{instance=\"a\"}", "0 0 1 1")],
        eval: "3m",
        fires: Some(("a", "")),
    },
    Case {
        alert: "MqttIngestDatabaseNodeMoved",
        series: &[("mqtt_ingest_db_node_moves_total{instance=\"a\"}", "0x20")],
        eval: "15m",
        fires: None,
    },
];

fn rules() -> Vec<Mapping> {
    let text = std::fs::read_to_string(RULES).unwrap();
    let doc: Value = serde_yaml::from_str(&text).unwrap();
    doc["groups"]
        .as_sequence()
        .unwrap()
        .iter()
        .flat_map(|g| g["rules"].as_sequence().unwrap().clone())
        .map(|r| r.as_mapping().unwrap().clone())
        .collect()
}

fn text(v: &Value) -> String {
    v.as_str().unwrap_or_default().to_owned()
}

/// The promtool unit-test file for every case.
fn unit_tests() -> String {
    let rules = rules();
    let mut tests = Vec::new();
    for case in CASES {
        let rule = rules
            .iter()
            .find(|r| r["alert"].as_str() == Some(case.alert))
            .unwrap_or_else(|| panic!("no rule {}", case.alert));
        let mut exp_alerts = Vec::new();
        if let Some((instance, value)) = case.fires {
            let mut labels = Mapping::new();
            for (k, v) in rule["labels"].as_mapping().unwrap() {
                labels.insert(k.clone(), v.clone());
            }
            labels.insert("instance".into(), instance.into());
            // `up` carries the job label, the service's own series in these cases do not.
            if case.series.iter().any(|(s, _)| s.starts_with("up{")) {
                labels.insert("job".into(), "mqtt-ingest".into());
            }
            let annotations = &rule["annotations"];
            let summary = text(&annotations["summary"])
                .replace("{{ $labels.instance }}", instance)
                .replace("{{ $value | humanizePercentage }}", value);
            let mut exp_annotations = Mapping::new();
            exp_annotations.insert("summary".into(), summary.into());
            exp_annotations.insert(
                "description".into(),
                text(&annotations["description"]).into(),
            );
            let mut alert = Mapping::new();
            alert.insert("exp_labels".into(), Value::Mapping(labels));
            alert.insert("exp_annotations".into(), Value::Mapping(exp_annotations));
            exp_alerts.push(Value::Mapping(alert));
        }
        let series: Vec<Value> = case
            .series
            .iter()
            .map(|(s, v)| {
                let mut m = Mapping::new();
                m.insert("series".into(), (*s).into());
                m.insert("values".into(), (*v).into());
                Value::Mapping(m)
            })
            .collect();
        let mut check = Mapping::new();
        check.insert("eval_time".into(), case.eval.into());
        check.insert("alertname".into(), case.alert.into());
        check.insert("exp_alerts".into(), Value::Sequence(exp_alerts));
        let mut test = Mapping::new();
        test.insert("interval".into(), "1m".into());
        test.insert("input_series".into(), Value::Sequence(series));
        test.insert(
            "alert_rule_test".into(),
            Value::Sequence(vec![Value::Mapping(check)]),
        );
        tests.push(Value::Mapping(test));
    }
    let mut file = Mapping::new();
    file.insert("rule_files".into(), Value::Sequence(vec![RULES.into()]));
    file.insert("evaluation_interval".into(), "1m".into());
    file.insert("tests".into(), Value::Sequence(tests));
    serde_yaml::to_string(&Value::Mapping(file)).unwrap()
}

#[test]
fn the_alert_rules_load_in_promtool() {
    let (ok, out) = run(&["check", "rules", RULES]);
    assert!(ok, "{out}");
    assert!(out.contains("SUCCESS"), "{out}");
}

#[test]
fn every_alert_fires_on_its_series_and_not_on_healthy_ones() {
    // Every rule has a case that fires it and one that does not.
    for rule in rules() {
        let name = rule["alert"].as_str().unwrap();
        for fires in [true, false] {
            assert!(
                CASES
                    .iter()
                    .any(|c| c.alert == name && c.fires.is_some() == fires),
                "{name} has no case where it {}",
                if fires { "fires" } else { "stays quiet" }
            );
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("alerts_test.yml");
    std::fs::write(&file, unit_tests()).unwrap();
    let (ok, out) = run(&["test", "rules", file.to_str().unwrap()]);
    assert!(ok, "{out}");
    assert!(out.contains("SUCCESS"), "{out}");
}

/// Every sample name `/metrics` can show, every gauge known.
fn exposed() -> BTreeSet<String> {
    let text = render(
        &Stats::default().snapshot(),
        &Gauges {
            queue: Some((0, 1)),
            db_up: true,
            devices_online: Some(0),
            db_node: Some(("db:3306".into(), 0)),
        },
    );
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split(['{', ' ']).next())
        .map(str::to_owned)
        .collect()
}

/// Metric names in PromQL text: `mqtt_ingest_…` words.
pub fn named_metrics(promql: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = promql;
    while let Some(at) = rest.find("mqtt_ingest_") {
        let word: String = rest[at..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        rest = &rest[at + word.len()..];
        names.insert(word);
    }
    names
}

#[test]
fn the_rules_name_only_metrics_the_service_exposes() {
    let exposed = exposed();
    let mut named = BTreeSet::new();
    for rule in rules() {
        named.extend(named_metrics(&text(&rule["expr"])));
    }
    assert!(named.len() >= 10, "{named:?}");
    let dead: Vec<_> = named.difference(&exposed).collect();
    assert!(
        dead.is_empty(),
        "rules name metrics /metrics lacks: {dead:?}"
    );
    // The check itself sees a misspelt name.
    assert!(!exposed.contains("mqtt_ingest_db_up_total"));
}

const DASHBOARD: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/ops/grafana/mqtt-ingest.json");

/// Every PromQL expression of the dashboard (panels' targets and the variables' queries), with
/// Grafana's variables filled in as Grafana would.
fn dashboard_exprs() -> Vec<String> {
    let dash: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(DASHBOARD).unwrap()).unwrap();
    let mut exprs = Vec::new();
    for panel in dash["panels"].as_array().unwrap() {
        let targets = panel["targets"].as_array().unwrap();
        assert!(!targets.is_empty(), "panel {} has no query", panel["title"]);
        for t in targets {
            exprs.push(t["expr"].as_str().unwrap().to_owned());
        }
    }
    let fill = |e: &str| {
        e.replace("$__rate_interval", "2m")
            .replace("$job", ".*")
            .replace("$instance", ".*")
    };
    exprs.iter().map(|e| fill(e)).collect()
}

#[test]
fn the_dashboard_queries_parse_and_name_only_exposed_metrics() {
    let exprs = dashboard_exprs();
    assert!(exprs.len() >= 14, "{exprs:?}");
    let exposed = exposed();
    let mut named = BTreeSet::new();
    for e in &exprs {
        named.extend(named_metrics(e));
    }
    let dead: Vec<_> = named.difference(&exposed).collect();
    assert!(
        dead.is_empty(),
        "panels query metrics /metrics lacks: {dead:?}"
    );
    // The variables' label_values() are Grafana's, not PromQL: their metric is checked above
    // through the panels. Each panel query must parse: promtool checks them as recording rules.
    let rules: Vec<Value> = exprs
        .iter()
        .enumerate()
        .map(|(i, e)| {
            let mut m = Mapping::new();
            m.insert("record".into(), format!("dashboard:query{i}").into());
            m.insert("expr".into(), e.clone().into());
            Value::Mapping(m)
        })
        .collect();
    let mut group = Mapping::new();
    group.insert("name".into(), "dashboard".into());
    group.insert("rules".into(), Value::Sequence(rules));
    let mut file = Mapping::new();
    file.insert(
        "groups".into(),
        Value::Sequence(vec![Value::Mapping(group)]),
    );
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("dashboard_rules.yml");
    std::fs::write(&path, serde_yaml::to_string(&Value::Mapping(file)).unwrap()).unwrap();
    let (ok, out) = run(&["check", "rules", path.to_str().unwrap()]);
    assert!(ok, "{out}");
}
