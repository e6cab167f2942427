//! Hostile input (issue 4), table-driven, through the whole service: every row is one message
//! with its topic, its payload, what must end up in `device_main` (the exact stored JSON, or
//! "nothing changed") and which counter must move (`rejected` by reason, `parts_skipped`).
//! Then 1,000 consecutive bad messages followed by good ones: every good one lands and the
//! counters add up.
//!
//! A private Mosquitto is used: the shared one drops what exceeds its default queue of 1000.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::app::{Running, Target, migrate, register, sensor, spawn_service, wait_for_device};
use crate::common::{PrivateMosquitto, QoS, TestDb, mqtt_publish, publish_many};
use mqtt_ingest::intake::rejection::Rejection;
use mqtt_ingest::intake::topic::TopicLayout;
use mqtt_ingest::ops::stats::Snapshot;
use serde_json::{Value, json};
use sqlx::{MySqlPool, Row as _};

/// Placeholder in expected JSON for the receive time (the row's `upload_timestamp`).
const RECV: &str = "RECV";
/// The service's default `MQTT_MAX_PAYLOAD_BYTES`.
const LIMIT: usize = 262_144;

/// What a row must do.
#[derive(Debug, Clone)]
enum Expect {
    /// Committed; the device's `last_report_data` is exactly `data` (`RECV` stands for the
    /// receive time), `device_status` and `is_online` as given, and `skipped` parts counted.
    Stored {
        data: Value,
        status: Option<&'static str>,
        online: bool,
        skipped: u64,
    },
    /// Committed (a heartbeat): `last_heartbeat` set, online; a NULL `last_report_data` stays
    /// NULL (a heartbeat carries no data).
    Heartbeat,
    /// Rejected with this reason; no row anywhere changes.
    Rejected(&'static str),
    /// The broker never delivers it (not under `PREFIX/+/kind`): nothing counted, nothing
    /// changes, and the parser calls the topic `bad_topic` should it ever arrive.
    NotDelivered,
}

struct Case {
    name: &'static str,
    /// The device level of the topic (`None`: a raw topic in `raw_topic`).
    device: String,
    kind: &'static str,
    /// A full topic with `{P}` for the test's prefix, for rows outside the layout.
    raw_topic: Option<String>,
    payload: Vec<u8>,
    expect: Expect,
}

fn case(
    name: &'static str,
    device: &str,
    kind: &'static str,
    payload: impl Into<Vec<u8>>,
    expect: Expect,
) -> Case {
    Case {
        name,
        device: device.to_owned(),
        kind,
        raw_topic: None,
        payload: payload.into(),
        expect,
    }
}

fn raw(name: &'static str, topic: &str) -> Case {
    Case {
        name,
        device: String::new(),
        kind: "",
        raw_topic: Some(topic.to_owned()),
        payload: br#"{"t": 1}"#.to_vec(),
        expect: Expect::NotDelivered,
    }
}

fn rejected(
    name: &'static str,
    kind: &'static str,
    payload: impl Into<Vec<u8>>,
    why: &'static str,
) -> Case {
    case(name, "victim", kind, payload, Expect::Rejected(why))
}

/// One reading as stored: value, unit and timestamp.
fn reading(value: Value, unit: &str, timestamp: &str) -> Value {
    json!({"value": value, "unit": unit, "timestamp": timestamp})
}

/// The stored JSON of a data message that only had these sensors.
fn only_sensors(sensors: Value) -> Value {
    json!({"sensors": sensors, "upload_timestamp": RECV})
}

fn stored(data: Value, skipped: u64) -> Expect {
    Expect::Stored {
        data,
        status: None,
        online: true,
        skipped,
    }
}

/// The table. Rows that store something use a device of their own (`r_<name>`); rows that must
/// change nothing aim at `victim`, which holds state from before.
fn cases() -> Vec<Case> {
    let big_name = "x".repeat(10_000);
    let mut over = br#"{"t": 1}"#.to_vec();
    over.resize(LIMIT + 1, b' ');
    let mut at_limit = br#"{"t": 1}"#.to_vec();
    at_limit.resize(LIMIT, b' ');
    let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
    let deep_in_object = format!(
        r#"{{"t": 1, "x": {}1{}}}"#,
        "[".repeat(200),
        "]".repeat(200)
    );
    let t1 = || only_sensors(json!({"t": reading(json!(1), "", RECV)}));

    vec![
        // Size.
        rejected("payload one byte over the limit", "data", over, "too_large"),
        case(
            "payload exactly at the limit (whitespace trimmed)",
            "r_at_limit",
            "data",
            at_limit,
            stored(t1(), 0),
        ),
        // Structure.
        rejected("100,000 levels of nesting", "data", deep, "not_json"),
        rejected(
            "200 levels of nesting inside an object",
            "data",
            deep_in_object,
            "not_json",
        ),
        case(
            "shallow nesting as a sensor value is a skipped part",
            "r_nested",
            "data",
            r#"{"t": 1, "x": {"y": {"z": 1}}}"#,
            stored(t1(), 1),
        ),
        // Numbers.
        rejected(
            "1e400 (beyond double range)",
            "data",
            r#"{"t": 1e400}"#,
            "not_json",
        ),
        rejected("-1e400", "data", r#"{"t": -1e400}"#, "not_json"),
        case(
            "-0 is stored as 0.0 (serde_json reads -0 as a double)",
            "r_neg_zero",
            "data",
            r#"{"t": -0}"#,
            stored(only_sensors(json!({"t": reading(json!(0.0), "", RECV)})), 0),
        ),
        case(
            "-0.0 is stored as 0.0",
            "r_neg_zero_f",
            "data",
            r#"{"t": -0.0}"#,
            stored(only_sensors(json!({"t": reading(json!(0.0), "", RECV)})), 0),
        ),
        case(
            "1e308 (finite) is kept",
            "r_big",
            "data",
            r#"{"t": 1e308}"#,
            stored(
                only_sensors(json!({"t": reading(json!(1e308), "", RECV)})),
                0,
            ),
        ),
        case(
            "an integer beyond u64 is kept as a double",
            "r_bigint",
            "data",
            r#"{"t": 123456789012345678901234567890}"#,
            stored(
                only_sensors(json!({"t": reading(json!(1.2345678901234568e29), "", RECV)})),
                0,
            ),
        ),
        rejected("NaN is not JSON", "data", r#"{"t": NaN}"#, "not_json"),
        // Encoding.
        rejected(
            "non-UTF-8 bytes in a string",
            "data",
            b"{\"t\": 1, \"u\": \"\xff\xfe\"}".to_vec(),
            "not_utf8",
        ),
        rejected(
            "latin-1 payload",
            "status",
            b"{\"status\": \"caf\xe9\"}".to_vec(),
            "not_utf8",
        ),
        rejected(
            "lone surrogate escape is not JSON",
            "data",
            r#"{"t": 1, "u": "\ud800"}"#,
            "not_json",
        ),
        rejected(
            "raw NUL inside a string",
            "data",
            b"{\"sensors\": [{\"sensor_name\": \"t\", \"value\": 1, \"unit\": \"a\0b\"}]}".to_vec(),
            "not_json",
        ),
        case(
            "escaped NUL inside a unit is kept as text",
            "r_nul_unit",
            "data",
            r#"{"sensors": [{"sensor_name": "t", "value": 1, "unit": "a\u0000b"}]}"#,
            stored(
                only_sensors(json!({"t": reading(json!(1), "a\u{0}b", RECV)})),
                0,
            ),
        ),
        case(
            "escaped NUL in a sensor name: that sensor skipped",
            "r_nul_name",
            "data",
            r#"{"t\u0000x": 5, "t": 1}"#,
            stored(t1(), 1),
        ),
        case(
            "BOM, whitespace and trailing NULs are repaired",
            "r_repaired",
            "data",
            b"\xEF\xBB\xBF  {\"t\": 1}\n\0\0\0".to_vec(),
            stored(t1(), 0),
        ),
        // Duplicates, emptiness, roots.
        case(
            "duplicate keys: the last one wins",
            "r_dup",
            "data",
            r#"{"t": 1, "t": 2}"#,
            stored(only_sensors(json!({"t": reading(json!(2), "", RECV)})), 0),
        ),
        rejected("empty data payload", "data", "", "not_json"),
        rejected(
            "whitespace-only status payload",
            "status",
            "  \n",
            "not_json",
        ),
        rejected("null", "data", "null", "not_object"),
        rejected("an array", "data", r#"[{"t": 1}]"#, "not_object"),
        rejected(
            "a string at the root",
            "data",
            r#""{\"t\": 1}""#,
            "not_object",
        ),
        rejected("a number at the root", "status", "42", "not_object"),
        rejected("null heartbeat", "heartbeat", "null", "not_object"),
        rejected("array heartbeat", "heartbeat", "[]", "not_object"),
        rejected("non-JSON heartbeat", "heartbeat", "ping", "not_json"),
        case(
            "empty heartbeat is fine",
            "r_hb",
            "heartbeat",
            "",
            Expect::Heartbeat,
        ),
        rejected("empty object: no sensors", "data", "{}", "no_valid_data"),
        // Wrong types, simple format.
        // A string is metadata in the simple format (the firmware's "sensor": "DHT11"):
        // nothing else left, nothing valid.
        rejected("value a string", "data", r#"{"t": "25"}"#, "no_valid_data"),
        case(
            "value a boolean is a reading",
            "r_bool",
            "data",
            r#"{"t": true, "device_id": "AIOT-1", "sensor": "RAIN"}"#,
            stored(
                only_sensors(json!({"t": reading(json!(true), "", RECV)})),
                0,
            ),
        ),
        rejected("value null", "data", r#"{"t": null}"#, "no_valid_data"),
        rejected("value an array", "data", r#"{"t": [1]}"#, "no_valid_data"),
        rejected(
            "value an object",
            "data",
            r#"{"t": {"v": 1}}"#,
            "no_valid_data",
        ),
        // A timestamp that dates nothing costs no reading: it keeps the receive time.
        case(
            "timestamp an uptime counter dates nothing",
            "r_ts_uptime",
            "data",
            r#"{"t": 1, "timestamp": 5}"#,
            stored(only_sensors(json!({"t": reading(json!(1), "", RECV)})), 0),
        ),
        case(
            "timestamp garbage dates nothing",
            "r_ts_garbage",
            "data",
            r#"{"t": 1, "timestamp": "yesterday"}"#,
            stored(only_sensors(json!({"t": reading(json!(1), "", RECV)})), 0),
        ),
        rejected(
            "sensors an object: simple format, one bad sensor",
            "data",
            r#"{"sensors": {"t": 1}}"#,
            "no_valid_data",
        ),
        case(
            "sensors a number: simple format, a sensor called sensors",
            "r_sensors_num",
            "data",
            r#"{"sensors": 5}"#,
            stored(
                only_sensors(json!({"sensors": reading(json!(5), "", RECV)})),
                0,
            ),
        ),
        // Wrong types, full format: every field.
        rejected(
            "sensors entry not an object",
            "data",
            r#"{"sensors": [1, "t", null]}"#,
            "no_valid_data",
        ),
        rejected(
            "sensor_name a number",
            "data",
            r#"{"sensors": [{"sensor_name": 1, "value": 1}]}"#,
            "no_valid_data",
        ),
        rejected(
            "sensor_name missing",
            "data",
            r#"{"sensors": [{"value": 1}]}"#,
            "no_valid_data",
        ),
        rejected(
            "value missing",
            "data",
            r#"{"sensors": [{"sensor_name": "t"}]}"#,
            "no_valid_data",
        ),
        rejected(
            "value a string (full)",
            "data",
            r#"{"sensors": [{"sensor_name": "t", "value": "1"}]}"#,
            "no_valid_data",
        ),
        rejected(
            "unit a number",
            "data",
            r#"{"sensors": [{"sensor_name": "t", "value": 1, "unit": 5}]}"#,
            "no_valid_data",
        ),
        case(
            "sensor timestamp an uptime counter dates nothing",
            "r_sts_uptime",
            "data",
            r#"{"sensors": [{"sensor_name": "t", "value": 1, "timestamp": 5}]}"#,
            stored(only_sensors(json!({"t": reading(json!(1), "", RECV)})), 0),
        ),
        case(
            "sensor timestamp impossible dates nothing",
            "r_sts_garbage",
            "data",
            r#"{"sensors": [{"sensor_name": "t", "value": 1, "timestamp": "2025-13-45T99:00:00Z"}]}"#,
            stored(only_sensors(json!({"t": reading(json!(1), "", RECV)})), 0),
        ),
        rejected(
            "status not an object (full)",
            "data",
            r#"{"sensors": [], "status": "ok"}"#,
            "no_valid_data",
        ),
        rejected(
            "location not an object",
            "data",
            r#"{"sensors": [], "location": [39.9, 116.4]}"#,
            "no_valid_data",
        ),
        case(
            "every field wrong beside one good sensor: one stored, the rest skipped",
            "r_full_mixed",
            "data",
            r#"{"sensors": [1, {"sensor_name": 1, "value": 1}, {"value": 1},
                            {"sensor_name": "a", "value": "1"}, {"sensor_name": "b", "value": 1, "unit": 5},
                            {"sensor_name": "c", "value": 1, "timestamp": 5},
                            {"sensor_name": "t", "value": 1, "unit": "C", "timestamp": "2025-12-19T14:30:00+08:00"}],
                "status": 7, "location": {"latitude": "39.9", "longitude": 116.4}}"#,
            stored(
                only_sensors(json!({
                    "c": reading(json!(1), "", RECV),
                    "t": reading(json!(1), "C", "2025-12-19T14:30:00+08:00"),
                })),
                7,
            ),
        ),
        case(
            "unknown fields are ignored (entry and top level)",
            "r_unknown_fields",
            "data",
            r#"{"sensors": [{"sensor_name": "t", "value": 1, "extra": "x"}], "foo": {"bar": 1}, "firmware": "1.2"}"#,
            stored(t1(), 0),
        ),
        // Sensor names.
        rejected(
            "unicode sensor name",
            "data",
            r#"{"température": 1}"#,
            "no_valid_data",
        ),
        rejected("CJK sensor name", "data", r#"{"温度": 1}"#, "no_valid_data"),
        rejected(
            "10,000-character sensor name",
            "data",
            format!(r#"{{"{big_name}": 1}}"#),
            "no_valid_data",
        ),
        rejected(
            "51-character sensor name",
            "data",
            format!(r#"{{"a{}": 1}}"#, "b".repeat(50)),
            "no_valid_data",
        ),
        case(
            "right-to-left mark in one name: skipped, the other kept",
            "r_rtl",
            "data",
            "{\"\u{202e}t\": 3, \"t\": 1}",
            stored(t1(), 1),
        ),
        case(
            "10,000-character name in the full format: skipped, the other kept",
            "r_long_full",
            "data",
            format!(
                r#"{{"sensors": [{{"sensor_name": "{big_name}", "value": 1}}, {{"sensor_name": "t", "value": 1}}]}}"#
            ),
            stored(t1(), 1),
        ),
        // Location.
        rejected(
            "latitude 91",
            "data",
            r#"{"sensors": [], "location": {"latitude": 91, "longitude": 0}}"#,
            "no_valid_data",
        ),
        rejected(
            "longitude -180.5",
            "data",
            r#"{"sensors": [], "location": {"latitude": 0, "longitude": -180.5}}"#,
            "no_valid_data",
        ),
        rejected(
            "latitude a string",
            "data",
            r#"{"sensors": [], "location": {"latitude": "39.9", "longitude": 116.4}}"#,
            "no_valid_data",
        ),
        rejected(
            "longitude missing",
            "data",
            r#"{"sensors": [], "location": {"latitude": 39.9}}"#,
            "no_valid_data",
        ),
        rejected(
            "latitude 1e308",
            "data",
            r#"{"sensors": [], "location": {"latitude": 1e308, "longitude": 0}}"#,
            "no_valid_data",
        ),
        case(
            "location at the limits, -0 as 0.0, extra keys dropped",
            "r_location",
            "data",
            r#"{"sensors": [], "location": {"latitude": -90, "longitude": -0, "altitude": "x"}}"#,
            stored(
                json!({"location": {"latitude": -90, "longitude": 0.0}, "upload_timestamp": RECV}),
                0,
            ),
        ),
        // Timestamps: a plausible time is kept as sent; one before 2000 or past the allowed
        // clock skew dates nothing (see the timestamp policy in docs/).
        case(
            "timestamp in year 0001 dates nothing",
            "r_ts_past",
            "data",
            r#"{"t": 1, "timestamp": "0001-01-01T00:00:00Z"}"#,
            stored(only_sensors(json!({"t": reading(json!(1), "", RECV)})), 0),
        ),
        case(
            "timestamp in year 9999 dates nothing",
            "r_clock",
            "data",
            r#"{"t": 1, "timestamp": "9999-12-31T23:59:59Z"}"#,
            stored(only_sensors(json!({"t": reading(json!(1), "", RECV)})), 0),
        ),
        case(
            "after a year-9999 timestamp, the sensor is not frozen",
            "r_clock",
            "data",
            r#"{"t": 2}"#,
            stored(only_sensors(json!({"t": reading(json!(2), "", RECV)})), 0),
        ),
        // Status.
        case(
            "status with wrong types is merged as sent; a number status is device_status's text",
            "r_status_types",
            "status",
            r#"{"status": 5, "battery": "95", "signal": [1], "nested": {"a": null}}"#,
            Expect::Stored {
                data: json!({"status": {"status": 5, "battery": "95", "signal": [1], "nested": {"a": null}}}),
                status: Some("5"),
                online: true,
                skipped: 0,
            },
        ),
        case(
            "status text over 50 characters: kept in JSON, device_status cut to its column",
            "r_status_long",
            "status",
            format!(r#"{{"status": "{}"}}"#, "o".repeat(51)),
            Expect::Stored {
                data: json!({"status": {"status": "o".repeat(51)}}),
                status: Some("oooooooooooooooooooooooooooooooooooooooooooooooooo"),
                online: true,
                skipped: 0,
            },
        ),
        case(
            "status offline with RTL text elsewhere",
            "r_status_off",
            "status",
            "{\"status\": \"offline\", \"note\": \"\u{202e}evil\"}",
            Expect::Stored {
                data: json!({"status": {"status": "offline", "note": "\u{202e}evil"}}),
                status: Some("offline"),
                online: false,
                skipped: 0,
            },
        ),
        // Topics that reach the service.
        case(
            "device level with SQL",
            "x'; DROP TABLE device_main; --",
            "data",
            r#"{"t": 1}"#,
            Expect::Rejected("bad_device_id"),
        ),
        case(
            "device level with %00",
            "dev%00",
            "data",
            r#"{"t": 1}"#,
            Expect::Rejected("bad_device_id"),
        ),
        case(
            "device level of 10 kB",
            &"x".repeat(10_240),
            "data",
            r#"{"t": 1}"#,
            Expect::Rejected("bad_device_id"),
        ),
        case(
            "device level with unicode",
            "caf\u{e9}",
            "status",
            r#"{"status": "online"}"#,
            Expect::Rejected("bad_device_id"),
        ),
        case(
            "device level with a right-to-left mark",
            "a\u{200f}b",
            "data",
            r#"{"t": 1}"#,
            Expect::Rejected("bad_device_id"),
        ),
        case(
            "empty device level (PREFIX//data)",
            "",
            "data",
            r#"{"t": 1}"#,
            Expect::Rejected("bad_device_id"),
        ),
        case(
            "device level '..' is valid text but no device",
            "..",
            "data",
            r#"{"t": 1}"#,
            Expect::Rejected("unknown_device"),
        ),
        case(
            "device level '--' is valid text but no device",
            "--",
            "heartbeat",
            "",
            Expect::Rejected("unknown_device"),
        ),
        case(
            "unregistered device",
            "ghost",
            "data",
            r#"{"t": 1}"#,
            Expect::Rejected("unknown_device"),
        ),
        // Topics the subscription never matches.
        raw("extra level", "{P}/victim/x/data"),
        raw("extra trailing empty level", "{P}/victim/data/"),
        raw("missing device level", "{P}/data"),
        raw("missing kind level", "{P}/victim"),
        raw("unknown kind", "{P}/victim/config"),
        raw("kind in upper case", "{P}/victim/DATA"),
        raw("'..' as the kind", "{P}/victim/.."),
        raw(
            "SQL as the kind",
            "{P}/victim/data'; DROP TABLE device_main; --",
        ),
    ]
}

/// Every row of `device_main` as comparable text, keyed by uuid.
async fn table(pool: &MySqlPool) -> BTreeMap<String, Vec<Option<String>>> {
    sqlx::query(
        "SELECT uuid, CAST(is_online AS CHAR) AS a, CAST(last_seen AS CHAR) AS b, \
                CAST(last_heartbeat AS CHAR) AS c, device_status AS d, \
                CAST(last_report_data AS CHAR) AS e \
         FROM device_main",
    )
    .fetch_all(pool)
    .await
    .expect("read device_main")
    .into_iter()
    .map(|r| {
        let cols = ["a", "b", "c", "d", "e"]
            .iter()
            .map(|c| r.try_get::<Option<String>, _>(*c).expect("column"))
            .collect();
        (r.try_get::<String, _>("uuid").expect("uuid"), cols)
    })
    .collect()
}

/// Replaces every string equal to the row's `upload_timestamp` with `RECV`.
fn placeholders(data: &Value) -> Value {
    let recv = data
        .get("upload_timestamp")
        .and_then(Value::as_str)
        .map(str::to_owned);
    fn walk(v: &Value, recv: &Option<String>) -> Value {
        match v {
            Value::String(s) if Some(s) == recv.as_ref() => Value::String(RECV.into()),
            Value::Array(a) => Value::Array(a.iter().map(|x| walk(x, recv)).collect()),
            Value::Object(m) => {
                Value::Object(m.iter().map(|(k, x)| (k.clone(), walk(x, recv))).collect())
            }
            other => other.clone(),
        }
    }
    walk(data, &recv)
}

fn rejected_count(s: &Snapshot, reason: &str) -> u64 {
    s.rejected
        .iter()
        .find(|(r, _)| *r == reason)
        .map_or(0, |(_, n)| *n)
}

/// Counter changes between two snapshots: (received, succeeded, failed, parts_skipped, by reason).
fn delta(a: &Snapshot, b: &Snapshot) -> (u64, u64, u64, u64, BTreeMap<&'static str, u64>) {
    let reasons = b
        .rejected
        .iter()
        .map(|(r, n)| (*r, n - rejected_count(a, r)))
        .filter(|(_, n)| *n > 0)
        .collect();
    (
        b.received - a.received,
        b.succeeded - a.succeeded,
        b.failed - a.failed,
        b.parts_skipped - a.parts_skipped,
        reasons,
    )
}

/// The service's counters once `done` messages finished, waiting up to 30 s.
async fn settled(service: &Running, done: u64) -> Snapshot {
    service.settled_within(done, Duration::from_secs(30)).await
}

struct Setup {
    _broker: PrivateMosquitto,
    _db: TestDb,
    pool: MySqlPool,
    target: Target,
    service: Running,
}

async fn setup(devices: &[String]) -> Setup {
    let broker = PrivateMosquitto::start().await;
    let db = TestDb::new().await;
    let pool = db.pool();
    migrate(&pool).await;
    for d in devices {
        register(&pool, d).await;
    }
    let target = Target::new(&db, broker.port());
    let service = spawn_service(&target).await;
    Setup {
        _broker: broker,
        _db: db,
        pool,
        target,
        service,
    }
}

/// Gives `victim` state that every rejected row must leave alone.
async fn prime_victim(s: &Setup) {
    mqtt_publish(
        s.target.mqtt_port,
        &s.target.topic("victim", "data"),
        r#"{"base": 1, "timestamp": "2020-01-01T00:00:00Z"}"#,
        QoS::AtLeastOnce,
    )
    .await
    .unwrap();
    mqtt_publish(
        s.target.mqtt_port,
        &s.target.topic("victim", "status"),
        r#"{"status": "online", "battery": 90}"#,
        QoS::AtLeastOnce,
    )
    .await
    .unwrap();
    wait_for_device(&s.pool, "victim", "victim primed", |r| {
        sensor(r, "base").is_some() && r.device_status.as_deref() == Some("online")
    })
    .await;
}

#[test]
fn topics_outside_the_layout_are_bad_topics_for_the_parser() {
    let layout = TopicLayout::new("p/devices").unwrap();
    for c in cases() {
        if let Some(t) = &c.raw_topic {
            let topic = t.replace("{P}", "p/devices");
            assert_eq!(
                layout.parse(&topic),
                Err(Rejection::BadTopic),
                "{}: {topic:?}",
                c.name
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_hostile_row_has_its_outcome_and_counter() {
    let cases = cases();
    let mut devices: Vec<String> = cases
        .iter()
        .filter(|c| matches!(c.expect, Expect::Stored { .. } | Expect::Heartbeat))
        .map(|c| c.device.clone())
        .collect();
    devices.extend(["victim".to_owned(), "sentinel".to_owned()]);
    devices.sort();
    devices.dedup();
    let s = setup(&devices).await;
    prime_victim(&s).await;
    let mut sentinel = 0u64;
    let mut failures = Vec::new();

    for c in &cases {
        let topic = match &c.raw_topic {
            Some(t) => t.replace("{P}", &s.target.prefix),
            None => s.target.topic(&c.device, c.kind),
        };
        let before_rows = table(&s.pool).await;
        let before = s.service.stats.snapshot();
        mqtt_publish(
            s.target.mqtt_port,
            &topic,
            c.payload.clone(),
            QoS::AtLeastOnce,
        )
        .await
        .unwrap_or_else(|e| panic!("{}: publish: {e:#}", c.name));
        let mut expected_messages = 1;
        if matches!(c.expect, Expect::NotDelivered) {
            // What the broker did not deliver cannot be waited for: a sentinel published after
            // it (same publisher order) is, and it must be the only thing counted.
            sentinel += 1;
            mqtt_publish(
                s.target.mqtt_port,
                &s.target.topic("sentinel", "data"),
                format!(r#"{{"n": {sentinel}}}"#),
                QoS::AtLeastOnce,
            )
            .await
            .unwrap();
            expected_messages = 1;
        }
        let after = settled(
            &s.service,
            before.succeeded + before.failed + expected_messages,
        )
        .await;
        let mut after_rows = table(&s.pool).await;
        let (received, succeeded, failed, skipped, reasons) = delta(&before, &after);

        let mut problems = Vec::new();
        let mut check = |ok: bool, what: String| {
            if !ok {
                problems.push(what);
            }
        };
        match &c.expect {
            Expect::Rejected(reason) => {
                check(
                    (received, succeeded, failed, skipped) == (1, 0, 1, 0)
                        && reasons == BTreeMap::from([(*reason, 1)]),
                    format!(
                        "counters: received {received}, succeeded {succeeded}, failed {failed}, skipped {skipped}, rejected {reasons:?}; expected {reason}"
                    ),
                );
                check(before_rows == after_rows, "a row changed".into());
            }
            Expect::NotDelivered => {
                check(
                    (received, succeeded, failed) == (1, 1, 0) && reasons.is_empty(),
                    format!(
                        "counters: received {received}, succeeded {succeeded}, failed {failed}, rejected {reasons:?}; only the sentinel expected"
                    ),
                );
                let mut before_rows = before_rows;
                before_rows.remove("sentinel");
                after_rows.remove("sentinel");
                check(before_rows == after_rows, "a row changed".into());
            }
            Expect::Stored {
                data,
                status,
                online,
                skipped: parts,
            } => {
                check(
                    (received, succeeded, failed, skipped) == (1, 1, 0, *parts)
                        && reasons.is_empty(),
                    format!(
                        "counters: received {received}, succeeded {succeeded}, failed {failed}, skipped {skipped}, rejected {reasons:?}; expected {parts} skipped"
                    ),
                );
                let row = crate::app::device(&s.pool, &c.device)
                    .await
                    .unwrap()
                    .expect("registered");
                let got = row.data.as_ref().map(placeholders).unwrap_or(Value::Null);
                check(&got == data, format!("stored {got}\n    expected {data}"));
                check(
                    row.device_status.as_deref() == *status,
                    format!("device_status {:?}", row.device_status),
                );
                check(
                    row.is_online == *online,
                    format!("is_online {}", row.is_online),
                );
                let mut before_rows = before_rows;
                before_rows.remove(&c.device);
                after_rows.remove(&c.device);
                check(before_rows == after_rows, "another row changed".into());
            }
            Expect::Heartbeat => {
                check(
                    (received, succeeded, failed, skipped) == (1, 1, 0, 0),
                    format!(
                        "counters: received {received}, succeeded {succeeded}, failed {failed}"
                    ),
                );
                let row = crate::app::device(&s.pool, &c.device)
                    .await
                    .unwrap()
                    .expect("registered");
                check(
                    row.last_heartbeat.is_some() && row.data.is_none() && row.is_online,
                    format!("row {row:?}"),
                );
            }
        }
        if !problems.is_empty() {
            failures.push(format!(
                "row {:?} ({topic:.80}):\n    {}",
                c.name,
                problems.join("\n    ")
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} rows failed:\n{}",
        failures.len(),
        failures.join("\n")
    );

    let end = s.service.stats.snapshot();
    assert_eq!(
        end.received,
        end.succeeded + end.failed,
        "received = succeeded + failed"
    );
    s.service.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_bad_messages_then_good_ones_all_land() {
    const GOOD_DEVICES: usize = 20;
    const GOOD_SEQS: u64 = 5;
    let bad: Vec<Case> = cases()
        .into_iter()
        .filter(|c| matches!(c.expect, Expect::Rejected(_)) && c.payload.len() < 64 * 1024)
        .collect();
    let mut devices: Vec<String> = (0..GOOD_DEVICES).map(|d| format!("good{d}")).collect();
    devices.push("victim".into());
    let s = setup(&devices).await;
    prime_victim(&s).await;
    let victim_before = crate::app::device(&s.pool, "victim").await.unwrap();
    let start = s.service.stats.snapshot();

    let mut expected: BTreeMap<&'static str, u64> = BTreeMap::new();
    let mut messages: Vec<(String, Vec<u8>)> = Vec::new();
    for i in 0..1000 {
        let c = &bad[i % bad.len()];
        let Expect::Rejected(reason) = c.expect else {
            unreachable!()
        };
        *expected.entry(reason).or_default() += 1;
        messages.push((s.target.topic(&c.device, c.kind), c.payload.clone()));
    }
    for seq in 0..GOOD_SEQS {
        for d in 0..GOOD_DEVICES {
            messages.push((
                s.target.topic(&format!("good{d}"), "data"),
                format!(r#"{{"seq": {seq}}}"#).into_bytes(),
            ));
        }
    }
    let total = messages.len() as u64;
    publish_many(s.target.mqtt_port, messages, QoS::AtLeastOnce)
        .await
        .unwrap();
    let end = settled(&s.service, start.succeeded + start.failed + total).await;
    let (received, succeeded, failed, skipped, reasons) = delta(&start, &end);
    assert_eq!(received, total);
    assert_eq!(
        succeeded,
        GOOD_DEVICES as u64 * GOOD_SEQS,
        "every good message committed"
    );
    assert_eq!(failed, 1000);
    assert_eq!(skipped, 0);
    assert_eq!(reasons, expected, "rejections by reason");
    assert_eq!(end.received, end.succeeded + end.failed);
    for d in 0..GOOD_DEVICES {
        let row = crate::app::device(&s.pool, &format!("good{d}"))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(sensor(&row, "seq"), Some(json!(GOOD_SEQS - 1)), "good{d}");
    }
    assert_eq!(
        crate::app::device(&s.pool, "victim").await.unwrap(),
        victim_before
    );
    s.service.stop().await.unwrap();
}
