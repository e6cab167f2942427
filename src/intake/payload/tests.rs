use super::*;
use proptest::prelude::*;
use serde_json::{Map, json};

fn at() -> DateTime<Utc> {
    DateTime::parse_from_rfc3339("2026-01-02T03:04:05.678Z")
        .unwrap()
        .with_timezone(&Utc)
}

/// The receive time as stored: in the database's zone (Beijing by default).
const RECEIVED: &str = "2026-01-02T11:04:05.678+08:00";

fn dev() -> DeviceUuid {
    DeviceUuid::parse("test-device-uuid").unwrap()
}

fn run(kind: TopicKind, payload: &str) -> Result<Accepted, Rejection> {
    process(kind, dev(), payload.as_bytes(), at(), &Rules::default())
}

fn data(payload: &str) -> (DataReport, Vec<Skipped>) {
    let a = run(TopicKind::Data, payload).expect("accepted");
    match a.update.change {
        Change::Data(d) => (d, a.skipped),
        other => panic!("not data: {other:?}"),
    }
}

fn status(payload: &str) -> (StatusReport, Vec<Skipped>) {
    let a = run(TopicKind::Status, payload).expect("accepted");
    match a.update.change {
        Change::Status(s) => (s, a.skipped),
        other => panic!("not status: {other:?}"),
    }
}

/// A status message's fields as they are merged into the stored status.
fn status_fields(payload: &str) -> Map<String, Value> {
    let a = run(TopicKind::Status, payload).expect("accepted");
    match a.update.change {
        Change::Status(s) => s.fields(a.update.reading_time.as_deref()),
        other => panic!("not status: {other:?}"),
    }
}

fn num(v: Value) -> Number {
    match v {
        Value::Number(n) => n,
        _ => unreachable!(),
    }
}

#[test]
fn seed_full_format_example() {
    let (d, skipped) = data(
        r#"{"sensors": [{"sensor_name": "temperature", "value": 25.5, "unit": "°C", "timestamp": "2025-12-19T14:30:00+08:00"},
             {"sensor_name": "humidity", "value": 60, "unit": "%"}],
           "status": {"ip_address": "192.168.1.100", "rssi": -50, "battery": 95},
           "location": {"latitude": 39.9042, "longitude": 116.4074},
           "timestamp": "2025-12-19T14:30:00+08:00"}"#,
    );
    assert!(skipped.is_empty(), "{skipped:?}");
    let t = &d.sensors["temperature"];
    assert_eq!(t.value, SensorValue::Number(num(json!(25.5))));
    assert_eq!(t.unit(), "°C");
    assert_eq!(t.timestamp, "2025-12-19T14:30:00+08:00");
    let h = &d.sensors["humidity"];
    assert_eq!(h.value.to_string(), "60", "integers stay integers");
    assert_eq!(h.unit(), "%");
    assert_eq!(
        h.timestamp, RECEIVED,
        "no per-sensor timestamp: receive time"
    );
    assert_eq!(
        Value::Object(d.status.unwrap().into_iter().collect()),
        json!({"ip_address": "192.168.1.100", "rssi": -50, "battery": 95})
    );
    let l = d.location.unwrap();
    assert_eq!(
        (l.latitude, l.longitude),
        (num(json!(39.9042)), num(json!(116.4074)))
    );
}

#[test]
fn seed_simple_format_example() {
    let (d, skipped) = data(r#"{"temperature": 25.5, "humidity": 60, "light": 850}"#);
    assert!(skipped.is_empty());
    assert_eq!(d.sensors.len(), 3);
    for (name, v) in [
        ("temperature", "25.5"),
        ("humidity", "60"),
        ("light", "850"),
    ] {
        let r = &d.sensors[name];
        assert_eq!(r.value.to_string(), v);
        assert_eq!(r.unit(), "");
        assert_eq!(r.timestamp, RECEIVED);
    }
    assert!(d.status.is_none() && d.location.is_none());
}

#[test]
fn simple_format_timestamp_is_reading_time_not_a_sensor() {
    let (d, _) = data(r#"{"timestamp": "2025-12-19T14:30:00Z", "temperature": 1}"#);
    assert_eq!(d.sensors.len(), 1);
    assert_eq!(d.sensors["temperature"].timestamp, "2025-12-19T14:30:00Z");
}

#[test]
fn a_timestamp_that_dates_nothing_costs_no_reading() {
    for (ts, reason) in [
        (r#""yesterday""#, Undatable::NotATime),
        ("1530", Undatable::NotATime),
        (r#""9999-12-31T23:59:59Z""#, Undatable::Future),
    ] {
        let a = run(
            TopicKind::Data,
            &format!(r#"{{"timestamp": {ts}, "temperature": 1}}"#),
        )
        .unwrap();
        assert_eq!(a.update.reading_time, None, "{ts}");
        assert!(a.skipped.is_empty(), "{ts}: {:?}", a.skipped);
        assert_eq!(a.undated.len(), 1);
        assert_eq!(
            (a.undated[0].part.as_ref(), a.undated[0].reason),
            ("timestamp", reason)
        );
        let Change::Data(d) = a.update.change else {
            panic!()
        };
        assert_eq!(d.sensors["temperature"].timestamp, RECEIVED, "{ts}");
    }
}

#[test]
fn naive_and_numeric_timestamps_are_read_in_the_database_zone() {
    let (d, _) = data(r#"{"timestamp": "2026-01-02T10:00:00", "t": 1}"#);
    assert_eq!(d.sensors["t"].timestamp, "2026-01-02T10:00:00+08:00");
    let a = run(TopicKind::Data, r#"{"timestamp": 1767322800, "t": 1}"#).unwrap();
    assert_eq!(
        a.update.reading_time.as_deref(),
        Some("2026-01-02T11:00:00+08:00")
    );
    let (d, _) = data(
        r#"{"sensors": [{"sensor_name": "t", "value": 1, "timestamp": "2026-01-02 10:00:00.5"}]}"#,
    );
    assert_eq!(d.sensors["t"].timestamp, "2026-01-02T10:00:00.500+08:00");
}

/// What CodeHubot's ESP32 firmware publishes (its `snprintf` format strings): every reading is
/// kept, the uptime counters date nothing, the strings are metadata without a warning.
#[test]
fn the_real_firmwares_payloads() {
    let dht = run(
        TopicKind::Data,
        r#"{"device_id":"AIOT-ESP32-6E0067F6","sensor":"DHT11","temperature":24.3,"humidity":55.0,"timestamp":60}"#,
    )
    .unwrap();
    assert!(dht.skipped.is_empty(), "{:?}", dht.skipped);
    assert_eq!(dht.undated.len(), 1);
    let Change::Data(d) = &dht.update.change else {
        panic!()
    };
    assert_eq!(
        d.sensors.keys().collect::<Vec<_>>(),
        ["humidity", "temperature"]
    );
    assert_eq!(d.sensors["temperature"].value.to_string(), "24.3");
    assert_eq!(d.sensors["humidity"].value.to_db_text(), "55.0");
    assert_eq!(d.sensors["humidity"].sensor_type(), "DHT11");
    assert_eq!(d.sensors["humidity"].timestamp, RECEIVED);

    let (d, skipped) = data(
        r#"{"device_id":"AIOT-ESP32-6E0067F6","sensor":"DS18B20","temperature":23.8,"timestamp":60}"#,
    );
    assert!(skipped.is_empty());
    assert_eq!(d.sensors["temperature"].sensor_type(), "DS18B20");

    for (raining, level, text) in [("true", 0, "True"), ("false", 1, "False")] {
        let (d, skipped) = data(&format!(
            r#"{{"device_id":"AIOT-ESP32-6E0067F6","sensor":"RAIN_SENSOR","is_raining":{raining},"level":{level},"timestamp":70}}"#
        ));
        assert!(skipped.is_empty());
        // The firmware's names: renames apply to device_sensors, at the write.
        assert_eq!(
            d.sensors.keys().collect::<Vec<_>>(),
            ["is_raining", "level"]
        );
        assert_eq!(d.sensors["is_raining"].value.to_db_text(), text);
        assert_eq!(d.sensors["is_raining"].value.to_string(), raining);
        assert_eq!(d.sensors["level"].value.to_db_text(), level.to_string());
        assert_eq!(d.sensors["is_raining"].sensor_type(), "RAIN_SENSOR");
    }

    let st = run(
        TopicKind::Status,
        r#"{"device_id":"AIOT-ESP32-6E0067F6","uptime":90,"free_heap":168432,"wifi_connected":true,"mqtt_connected":true,"ble_connected":false,"timestamp":90}"#,
    )
    .unwrap();
    let Change::Status(s) = &st.update.change else {
        panic!()
    };
    assert!(s.online(), "a status message is a sign of life");
    assert_eq!(s.device_status, None);
    assert_eq!(
        s.fields(st.update.reading_time.as_deref())["free_heap"],
        json!(168432)
    );

    let hb = run(
        TopicKind::Heartbeat,
        r#"{"sequence":51,"timestamp":1530123,"status":1}"#,
    )
    .unwrap();
    assert_eq!(hb.update.change, Change::Heartbeat);
    assert_eq!(hb.update.reading_time, None);
    assert_eq!(hb.undated[0].reason, Undatable::NotATime);
}

/// The stored status time is what orders later status messages: the reading time as read, or
/// nothing when text dated nothing (a number stays: it orders nothing).
#[test]
fn the_status_time_is_stored_as_read() {
    let s = status_fields(r#"{"status": "online", "timestamp": "2026-01-02T10:00:00"}"#);
    assert_eq!(s["timestamp"], json!("2026-01-02T10:00:00+08:00"));
    let s = status_fields(r#"{"status": "online", "timestamp": "9999-12-31T23:59:59Z"}"#);
    assert!(!s.contains_key("timestamp"));
    let s = status_fields(r#"{"uptime": 90, "timestamp": 90}"#);
    assert_eq!(s["timestamp"], json!(90));
    let (d, _) = data(r#"{"sensors": [], "status": {"rssi": -1, "timestamp": "yesterday"}}"#);
    assert_eq!(*d.status.unwrap(), [("rssi".to_owned(), json!(-1))]);
}

/// Two keys that become one name: the one whose key sorts last wins, in whichever order the
/// payload has them and however many members it has.
#[test]
fn a_rename_onto_a_sent_name_does_not_depend_on_the_payload_s_order() {
    let rules = Rules {
        renames: Renames::codehubot(),
        ..Rules::default()
    };
    let rain = |payload: String| {
        let a = process(TopicKind::Data, dev(), payload.as_bytes(), at(), &rules).unwrap();
        let Change::Data(d) = a.update.change else {
            panic!()
        };
        d.sensors["rain"].value.as_f64()
    };
    let many: String = (0..10).map(|i| format!(r#","x{i}":{i}"#)).collect();
    for extra in ["", many.as_str()] {
        for body in [r#""rain":0,"is_raining":1"#, r#""is_raining":1,"rain":0"#] {
            let payload = format!(r#"{{"sensor":"RAIN_SENSOR",{body}{extra}}}"#);
            // `rain` sorts after `is_raining`: the device's own `rain` wins.
            assert_eq!(rain(payload.clone()), Some(0.0), "{payload}");
        }
    }
}

#[test]
fn renames_parse_and_apply() {
    assert_eq!(Renames::codehubot().0.len(), 2);
    let rules = Rules {
        renames: Renames::parse("*:temp=temperature, DHT11:hum=humidity").unwrap(),
        ..Rules::default()
    };
    let a = process(
        TopicKind::Data,
        dev(),
        br#"{"sensor":"dht11","temp":1,"hum":2,"is_raining":true}"#,
        at(),
        &rules,
    )
    .unwrap();
    let Change::Data(d) = a.update.change else {
        panic!()
    };
    assert_eq!(
        d.sensors.keys().collect::<Vec<_>>(),
        ["humidity", "is_raining", "temperature"]
    );
    // A rename for one type leaves other types alone; full-format entries rename by their
    // own sensor_type.
    let a = process(
        TopicKind::Data,
        dev(),
        br#"{"sensors":[{"sensor_name":"hum","value":1,"sensor_type":"BME280"},{"sensor_name":"hum","value":2,"sensor_type":"DHT11"}]}"#,
        at(),
        &rules,
    )
    .unwrap();
    let Change::Data(d) = a.update.change else {
        panic!()
    };
    assert_eq!(d.sensors.keys().collect::<Vec<_>>(), ["hum", "humidity"]);
    assert_eq!(d.sensors["hum"].sensor_type(), "BME280");
    for bad in ["x", "a:b", "T:=c", "T:a=B", "T:a=1x", ":a=b"] {
        assert!(Renames::parse(bad).is_err(), "{bad}");
    }
    assert_eq!(Renames::parse(" ,, ").unwrap(), Renames::default());
}

#[test]
fn sensor_names_follow_the_seed_rule() {
    for good in [
        "t",
        "temperature",
        "sensor_1",
        &format!("a{}", "b".repeat(49)),
    ] {
        let (d, s) = data(&format!(r#"{{"{good}": 1}}"#));
        assert!(s.is_empty() && d.sensors.contains_key(good), "{good}");
    }
    for bad in [
        "123abc",
        "Temperature",
        "_x",
        "temp-1",
        "temp erature",
        "températ",
        "a\u{200f}b",
        &format!("a{}", "b".repeat(50)),
        "",
    ] {
        let r = run(TopicKind::Data, &json!({ bad: 1 }).to_string());
        assert!(
            matches!(r, Err(Rejection::NoValidData(_))),
            "{bad:?}: {r:?}"
        );
    }
}

#[test]
fn a_bad_sensor_beside_good_ones_is_skipped_with_its_reason() {
    let (d, skipped) = data(r#"{"123abc": 1, "temperature": 20, "humidity": [1], "label": "wet"}"#);
    assert_eq!(d.sensors.keys().collect::<Vec<_>>(), ["temperature"]);
    assert_eq!(
        skipped.len(),
        2,
        "a string is metadata, not a bad sensor: {skipped:?}"
    );
    assert!(
        skipped
            .iter()
            .any(|s| s.part == "sensor \"123abc\"" && s.bad_name.as_deref() == Some("123abc"))
    );
    assert!(
        skipped
            .iter()
            .any(|s| s.part == "sensor \"humidity\"" && s.reason.contains("an array"))
    );
}

#[test]
fn values_must_be_numbers_or_booleans() {
    let (d, _) = data(r#"{"on": true, "off": false}"#);
    assert_eq!(d.sensors["on"].value, SensorValue::Bool(true));
    assert_eq!(d.sensors["off"].value.to_db_text(), "False");
    for bad in ["\"25\"", "null", "[1]", "{}"] {
        let r = run(TopicKind::Data, &format!(r#"{{"t": {bad}}}"#));
        assert!(matches!(r, Err(Rejection::NoValidData(_))), "{bad}");
    }
    let (d, _) = data(r#"{"a": -1.5e3, "b": 0, "c": -0, "d": -0.0}"#);
    assert_eq!(d.sensors["a"].value.as_f64(), Some(-1500.0));
    assert_eq!(
        d.sensors["c"].value.to_string(),
        "0.0",
        "serde_json reads -0 as a float"
    );
    assert_eq!(d.sensors["d"].value.to_string(), "0.0");
}

#[test]
fn out_of_range_numbers_are_not_json() {
    assert!(matches!(
        run(TopicKind::Data, r#"{"t": 1e400}"#),
        Err(Rejection::NotJson(_))
    ));
}

#[test]
fn full_format_entry_rules() {
    let (d, skipped) = data(
        r#"{"sensors": [
            1,
            {"value": 1},
            {"sensor_name": 5, "value": 1},
            {"sensor_name": "a", "value": 1, "unit": 3},
            {"sensor_name": "b", "value": 1, "timestamp": "2025-13-45"},
            {"sensor_name": "c", "value": true},
            {"sensor_name": "d", "value": "1"},
            {"sensor_name": "e"},
            {"sensor_name": "ok", "value": 2, "unit": null, "timestamp": null, "extra": "ignored"}
        ]}"#,
    );
    assert_eq!(d.sensors.keys().collect::<Vec<_>>(), ["b", "c", "ok"]);
    assert_eq!(d.sensors["ok"].unit(), "");
    assert_eq!(
        d.sensors["b"].timestamp, RECEIVED,
        "an impossible date dates nothing"
    );
    assert_eq!(skipped.len(), 6, "{skipped:?}");
}

#[test]
fn full_format_repeated_name_last_wins() {
    let (d, _) = data(
        r#"{"sensors": [{"sensor_name": "t", "value": 1}, {"sensor_name": "t", "value": 2}]}"#,
    );
    assert_eq!(d.sensors["t"].value.to_string(), "2");
}

#[test]
fn location_rules() {
    let ok = r#"{"sensors": [], "location": {"latitude": -90, "longitude": 180}}"#;
    assert!(data(ok).0.location.is_some());
    for bad in [
        r#"{"latitude": 90.1, "longitude": 0}"#,
        r#"{"latitude": 0, "longitude": -180.5}"#,
        r#"{"latitude": "39.9", "longitude": 116.4}"#,
        r#"{"latitude": 39.9}"#,
        r#"[39.9, 116.4]"#,
    ] {
        let payload =
            format!(r#"{{"sensors": [{{"sensor_name": "t", "value": 1}}], "location": {bad}}}"#);
        let (d, skipped) = data(&payload);
        assert!(d.location.is_none(), "{bad}");
        assert_eq!(d.sensors.len(), 1, "the sensor survives a bad location");
        assert_eq!(skipped[0].part, "location");
    }
}

#[test]
fn full_format_status_only_is_valid_but_empty_is_not() {
    let (d, _) = data(r#"{"sensors": [], "status": {"rssi": -50}}"#);
    assert!(d.sensors.is_empty() && d.status.is_some());
    assert!(matches!(
        run(TopicKind::Data, r#"{"sensors": []}"#),
        Err(Rejection::NoValidData(_))
    ));
    assert!(matches!(
        run(TopicKind::Data, r#"{"sensors": [], "status": "ok"}"#),
        Err(Rejection::NoValidData(m)) if m.contains("status")
    ));
}

#[test]
fn sensors_key_that_is_not_an_array_means_simple_format() {
    let (d, skipped) = data(r#"{"sensors": {"t": 1}, "light": 3}"#);
    assert_eq!(d.sensors.keys().collect::<Vec<_>>(), ["light"]);
    assert_eq!(skipped[0].part, "sensor \"sensors\"");
}

#[test]
fn configured_ranges_skip_readings_outside() {
    let rules = Rules {
        sensor_ranges: parse_sensor_ranges("humidity:0..100, battery:0..100").unwrap(),
        ..Rules::default()
    };
    let a = process(
        TopicKind::Data,
        dev(),
        br#"{"humidity": 101, "battery": 100, "light": 5000}"#,
        at(),
        &rules,
    )
    .unwrap();
    let Change::Data(d) = a.update.change else {
        panic!()
    };
    assert_eq!(d.sensors.keys().collect::<Vec<_>>(), ["battery", "light"]);
    assert!(a.skipped[0].reason.contains("outside"));
}

#[test]
fn sensor_range_spec_errors() {
    assert!(parse_sensor_ranges("").unwrap().is_empty());
    assert_eq!(
        parse_sensor_ranges("t:-10.5..60").unwrap()["t"],
        -10.5..=60.0
    );
    for bad in [
        "t", "t:1", "t:a..2", "t:2..1", "T:0..1", "t:0..inf", "t:NaN..1",
    ] {
        assert!(parse_sensor_ranges(bad).is_err(), "{bad}");
    }
}

#[test]
fn repair_strips_only_bom_nuls_and_whitespace() {
    assert_eq!(repair(b"\xEF\xBB\xBF {\"a\":1}\n\0\0\0"), b"{\"a\":1}");
    assert_eq!(repair(b"{\"a\":1}\0\n\0"), b"{\"a\":1}");
    assert_eq!(repair(b"\0\0"), b"");
    assert_eq!(repair(b"  "), b"");
    assert_eq!(repair(b"{'a':1}"), b"{'a':1}", "nothing else is guessed");
    let (d, _) = data("\u{feff}{\"t\": 1}\0\0");
    assert_eq!(d.sensors.len(), 1);
}

#[test]
fn rejections_have_reasons() {
    let cases: &[(&[u8], &str)] = &[
        (b"", "not_json"),
        (b"\0\0\0", "not_json"),
        (b"not json", "not_json"),
        (b"{'a': 1}", "not_json"),
        (b"null", "not_object"),
        (b"[1,2]", "not_object"),
        (b"\"text\"", "not_object"),
        (b"42", "not_object"),
        (b"{\"a\": \xff}", "not_utf8"),
        (b"{}", "no_valid_data"),
    ];
    for (payload, reason) in cases {
        let r = process(TopicKind::Data, dev(), payload, at(), &Rules::default());
        assert_eq!(
            r.map(|_| ()).unwrap_err().reason(),
            *reason,
            "{:?}",
            String::from_utf8_lossy(payload)
        );
    }
}

#[test]
fn too_large_is_rejected_before_parsing() {
    let rules = Rules {
        max_payload_bytes: 10,
        ..Rules::default()
    };
    let r = process(
        TopicKind::Data,
        dev(),
        br#"{"temperature": 1}"#,
        at(),
        &rules,
    );
    assert_eq!(
        r.unwrap_err(),
        Rejection::TooLarge {
            size: 18,
            limit: 10
        }
    );
}

#[test]
fn deep_nesting_is_rejected_not_a_stack_overflow() {
    let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
    let payload = format!(r#"{{"status": {deep}}}"#);
    assert!(matches!(
        run(TopicKind::Status, &payload),
        Err(Rejection::NotJson(_))
    ));
}

#[test]
fn status_online_offline_and_device_status() {
    let (s, _) = status(r#"{"status": "online", "battery": 95, "signal": "good"}"#);
    assert!(s.online());
    assert_eq!(s.device_status.as_deref(), Some("online"));
    assert_eq!(
        Value::Object(s.fields(None)),
        json!({"status": "online", "battery": 95, "signal": "good"})
    );
    let (s, _) = status(r#"{"status": "OFFLINE"}"#);
    assert!(!s.online());
    let (s, _) = status(r#"{"status": "rebooting"}"#);
    assert_eq!(
        (s.online(), s.device_status.as_deref()),
        (true, Some("rebooting"))
    );
    let (s, _) = status(r#"{"battery": 5}"#);
    assert_eq!((s.online(), s.device_status), (true, None));
    let (s, skipped) = status(r#"{"status": 3}"#);
    assert_eq!((s.online(), s.device_status.as_deref()), (true, Some("3")));
    assert!(skipped.is_empty());
    let (s, skipped) = status(r#"{"status": {"a": 1}}"#);
    assert_eq!((s.online(), s.device_status), (true, None));
    assert_eq!(skipped[0].part, "status.status");
    // Cut to the column by the store, not refused here.
    let long = "x".repeat(51);
    let (s, skipped) = status(&format!(r#"{{"status": "{long}"}}"#));
    assert_eq!(s.device_status.as_deref(), Some(long.as_str()));
    assert!(skipped.is_empty());
    assert!(matches!(
        run(TopicKind::Status, "[]"),
        Err(Rejection::NotObject)
    ));
}

#[test]
fn heartbeat_accepts_empty_or_object() {
    for ok in [
        "",
        "  \0",
        r#"{"timestamp": "2025-12-19T14:30:00+08:00"}"#,
        "{}",
    ] {
        let a = run(TopicKind::Heartbeat, ok).unwrap();
        assert_eq!(a.update.change, Change::Heartbeat);
    }
    assert!(matches!(
        run(TopicKind::Heartbeat, "ping"),
        Err(Rejection::NotJson(_))
    ));
    assert!(matches!(
        run(TopicKind::Heartbeat, "1"),
        Err(Rejection::NotObject)
    ));
}

#[test]
fn hostile_names_are_shown_bounded_and_escaped() {
    let name = format!("\u{202e}{}", "x".repeat(10_000));
    let (_, skipped) = data(&json!({ name: 1, "t": 2 }).to_string());
    assert!(skipped[0].part.chars().count() < 60, "{}", skipped[0].part);
    assert!(skipped[0].part.contains("\\u{202e}"));
}

fn arb_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<f64>().prop_map(Value::from),
        ".{0,20}".prop_map(Value::String),
        "[a-z][a-z0-9_]{0,8}".prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 64, 8, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..8).prop_map(Value::Array),
            prop::collection::btree_map(
                prop_oneof![
                    Just("sensors".to_owned()),
                    Just("sensor_name".to_owned()),
                    Just("value".to_owned()),
                    Just("unit".to_owned()),
                    Just("timestamp".to_owned()),
                    Just("status".to_owned()),
                    Just("location".to_owned()),
                    Just("latitude".to_owned()),
                    Just("longitude".to_owned()),
                    "[a-z_]{1,8}",
                    ".{0,8}",
                ],
                inner,
                0..8
            )
            .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

fn any_kind() -> impl Strategy<Value = TopicKind> {
    prop_oneof![
        Just(TopicKind::Data),
        Just(TopicKind::Status),
        Just(TopicKind::Heartbeat)
    ]
}

/// What the full parse makes of a heartbeat: its `timestamp` (null as none), or the refusal.
fn heartbeat_by_the_full_parse(text: &str) -> Result<Option<Value>, Rejection> {
    parse_object(text).map(|o| {
        o.get("timestamp")
            .filter(|v| !v.is_null())
            .map(Json::to_value)
    })
}

/// The light path's answer, in the same terms.
fn heartbeat_by_the_light_parse(text: &str) -> Result<Option<Value>, Rejection> {
    picked(text, ["timestamp"]).map(|[t]| t.filter(|v| !v.is_null()).as_ref().map(Json::to_value))
}

/// A member name is a name, whatever it says: serde_json's own tree reader (with the
/// `raw_value` feature this crate uses) would take this one as a command to read its value as
/// JSON text, so the status would change.
#[test]
fn serde_json_s_private_member_name_is_a_name_in_a_status() {
    let payload = r#"{"$serde_json::private::RawValue":"{\"status\":\"offline\"}"}"#;
    let (s, _) = status(payload);
    assert_eq!((s.device_status.as_deref(), s.online()), (None, true));
    assert_eq!(
        Value::Object(status_fields(payload)),
        json!({"$serde_json::private::RawValue": "{\"status\":\"offline\"}"})
    );
    let nested = r#"{"status":"online","x":{"$serde_json::private::RawValue":"[1"}}"#;
    assert_eq!(
        Value::Object(status_fields(nested)),
        json!({"status": "online", "x": {"$serde_json::private::RawValue": "[1"}})
    );
}

/// A number beyond a double is not JSON (serde_json's tree refuses it) in any kind of message,
/// in a member the service reads or not.
#[test]
fn a_number_beyond_a_double_is_not_json_in_any_message() {
    for kind in TopicKind::ALL {
        for text in [
            r#"{"x": 1e400, "timestamp": 1}"#,
            r#"{"sensors": [], "x": {"y": -1e999}}"#,
        ] {
            assert!(
                matches!(run(kind, text), Err(Rejection::NotJson(_))),
                "{kind:?} {text}"
            );
        }
    }
}

#[test]
fn the_light_heartbeat_parse_agrees_with_the_full_one() {
    for text in [
        r#"{"sequence":7,"timestamp":90512,"status":1}"#,
        r#"{"timestamp": "2025-12-19T14:30:00+08:00"}"#,
        r#"{"timestamp": null, "x": [1, {"y": 2}]}"#,
        r#"{"timestamp": 1, "timestamp": 2}"#,
        r#"{"timestamp": 1, "x": [1e400]}"#,
        r#"  {"a": 1}"#,
        "{}",
        "[1]",
        "5",
        r#"{"a": 1"#,
        r#"{"a": 1} x"#,
        r#""text""#,
    ] {
        assert_eq!(
            heartbeat_by_the_light_parse(text),
            heartbeat_by_the_full_parse(text),
            "{text}"
        );
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn metadata_keys_are_the_listed_ones(name in prop_oneof![
        proptest::sample::select(SIMPLE_FORMAT_METADATA.to_vec()).prop_map(str::to_owned),
        "[a-z_]{5,10}",
        "(timestamp|device_id|sensor|status|location)[a-z]?",
    ]) {
        prop_assert_eq!(is_metadata(&name), SIMPLE_FORMAT_METADATA.contains(&name.as_str()));
    }

    #[test]
    fn the_sensor_name_check_is_the_seed_rule(name in prop_oneof![
        "[a-z_0-9]{0,55}",
        "[a-z][a-z0-9_]{0,52}",
        ".{0,12}",
        "[a-z]{1,3}\n?",
    ]) {
        let rule = regex::Regex::new(r"^[a-z][a-z0-9_]{0,49}$").unwrap();
        prop_assert_eq!(valid_sensor_name(&name), rule.is_match(&name), "{:?}", name);
    }

    #[test]
    fn the_light_heartbeat_parse_agrees_on_any_json(v in arb_json()) {
        let text = v.to_string();
        prop_assert_eq!(heartbeat_by_the_light_parse(&text), heartbeat_by_the_full_parse(&text));
    }

    #[test]
    fn arbitrary_bytes_never_panic(kind in any_kind(), bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        let _ = process(kind, dev(), &bytes, at(), &Rules::default());
    }

    #[test]
    fn arbitrary_json_never_panics_and_accepted_data_is_valid(kind in any_kind(), v in arb_json()) {
        let text = v.to_string();
        if let Ok(a) = process(kind, dev(), text.as_bytes(), at(), &Rules::default())
            && let Change::Data(d) = a.update.change
        {
            prop_assert!(!d.sensors.is_empty() || d.status.is_some() || d.location.is_some());
            for (name, r) in &d.sensors {
                prop_assert!(valid_sensor_name(name));
                prop_assert!(r.value.as_f64().is_some_and(f64::is_finite));
                prop_assert!(DateTime::parse_from_rfc3339(&r.timestamp.text()).is_ok());
            }
            if let Some(l) = d.location {
                prop_assert!(l.latitude.as_f64().unwrap().abs() <= 90.0);
                prop_assert!(l.longitude.as_f64().unwrap().abs() <= 180.0);
            }
        }
    }

    #[test]
    fn repair_only_trims(bytes in prop::collection::vec(any::<u8>(), 0..64)) {
        let out = repair(&bytes);
        prop_assert!(bytes.windows(out.len().max(1)).any(|w| w == out) || out.is_empty());
        prop_assert!(out.first().is_none_or(|b| !b.is_ascii_whitespace()));
        prop_assert!(out.last().is_none_or(|&b| b != 0 && !b.is_ascii_whitespace()));
    }
}
