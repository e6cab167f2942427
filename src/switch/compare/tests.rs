use std::collections::BTreeMap;

use chrono::{NaiveDate, NaiveDateTime, TimeDelta};
use serde_json::{Value, json};

use super::*;
use crate::store::shadow::{DeviceRow, SensorRow, Tables};

const UUID: &str = "550e8400-e29b-41d4-a716-446655440000";

fn now() -> NaiveDateTime {
    NaiveDate::from_ymd_opt(2026, 12, 2)
        .unwrap()
        .and_hms_opt(18, 0, 0)
        .unwrap()
}

fn ago(secs: i64) -> NaiveDateTime {
    now() - TimeDelta::seconds(secs)
}

fn options() -> Options {
    Options {
        now: now(),
        zone: Zone::default(),
        tolerance: TimeDelta::seconds(10),
        presence_timeout: Some(TimeDelta::seconds(90)),
    }
}

/// A device seen `secs` ago with this `last_report_data`.
fn row(secs: i64, data: Option<Value>) -> DeviceRow {
    DeviceRow {
        is_online: true,
        last_seen: Some(ago(secs)),
        last_heartbeat: Some(ago(secs)),
        device_status: Some("pending".into()),
        last_report_data: data,
    }
}

fn sensor(value: &str, secs: i64) -> SensorRow {
    SensorRow {
        value: value.into(),
        unit: String::new(),
        kind: "DHT11".into(),
        timestamp: ago(secs),
    }
}

/// Tables with one device and its `device_sensors` rows.
fn tables(device: DeviceRow, sensors: &[(&str, SensorRow)]) -> Tables {
    Tables {
        devices: BTreeMap::from([(UUID.to_owned(), device)]),
        sensors: Some(
            sensors
                .iter()
                .map(|(n, r)| ((UUID.to_owned(), (*n).to_owned()), r.clone()))
                .collect(),
        ),
        start: None,
    }
}

fn with_start(mut t: Tables, data: Option<Value>) -> Tables {
    t.start = Some(BTreeMap::from([(UUID.to_owned(), data)]));
    t
}

/// The fields that differ and their classes.
fn found(python: &Tables, ingest: &Tables) -> Vec<(String, Option<&'static str>)> {
    compare(python, ingest, &options())
        .differences
        .into_iter()
        .map(|f| (f.field, f.class.map(Class::name)))
        .collect()
}

fn field(name: &str, class: Option<&'static str>) -> (String, Option<&'static str>) {
    (name.to_owned(), class)
}

#[test]
fn the_same_rows_differ_in_nothing() {
    let t = tables(
        row(5, Some(json!({"status": {"uptime": 90}}))),
        &[("temperature", sensor("24.3", 5))],
    );
    let report = compare(&t, &t, &options());
    assert_eq!(report.differences, []);
    assert_eq!(
        report.summary(),
        "1 devices, 0 unexpected differences, 0 expected"
    );
    assert_eq!(report.unexpected(), 0);
}

#[test]
fn a_wrong_value_is_unexpected_and_named() {
    let p = tables(row(5, None), &[("temperature", sensor("24.3", 5))]);
    let i = tables(row(5, None), &[("temperature", sensor("42.0", 5))]);
    let report = compare(&p, &i, &options());
    assert_eq!(report.unexpected(), 1);
    let f = &report.differences[0];
    assert_eq!(
        (f.device.as_str(), f.field.as_str(), f.class),
        (UUID, "device_sensors.temperature.value", None)
    );
    assert!(
        f.python.starts_with("24.3 at ") && f.ingest.starts_with("42.0 at "),
        "{f:?}"
    );
    assert!(
        report.text().contains("\nunexpected:\n  550e8400"),
        "{}",
        report.text()
    );
}

#[test]
fn a_device_that_never_comes_online_is_unexpected() {
    let p = tables(row(5, None), &[]);
    let mut never = row(5, None);
    never.last_seen = None;
    never.last_heartbeat = None;
    never.is_online = false;
    let i = tables(never, &[]);
    assert_eq!(
        found(&p, &i),
        [
            field("last_heartbeat", None),
            field("last_seen", None),
            field("online", None),
        ]
    );
    let report = compare(&p, &i, &options());
    let online = report
        .differences
        .iter()
        .find(|f| f.field == "online")
        .unwrap();
    assert_eq!(
        (online.python.as_str(), online.ingest.as_str()),
        (
            "online (is_online 1, last_seen 2026-12-02 17:59:55)",
            "offline (is_online 0, last_seen never)"
        )
    );
}

#[test]
fn a_later_message_on_our_side_is_one_python_lost() {
    let p = tables(row(200, None), &[("temperature", sensor("24.3", 200))]);
    let i = tables(row(5, None), &[("temperature", sensor("24.9", 5))]);
    assert_eq!(
        found(&p, &i),
        [
            field(
                "device_sensors.temperature.value",
                Some("python_lost_message")
            ),
            field("last_heartbeat", Some("python_lost_message")),
            field("last_seen", Some("python_lost_message")),
        ]
    );
    // A later message on the Python side is not explained by anything.
    assert!(found(&i, &p).iter().all(|(_, c)| c.is_none()));
}

#[test]
fn an_offline_last_will_and_the_presence_sweep_are_expected() {
    let mut offline = row(30, Some(json!({"status": {"status": "offline"}})));
    offline.is_online = false;
    offline.device_status = Some("offline".into());
    let mut p_status = row(30, Some(json!({"status": {"status": "offline"}})));
    p_status.device_status = Some("offline".into());
    let found_offline = found(&tables(p_status, &[]), &tables(offline, &[]));
    assert_eq!(found_offline, [field("online", Some("offline_status"))]);

    // Silent for 120 s: offline on our side after 90, online on the backend's for 300.
    let p = tables(row(120, None), &[]);
    let mut swept = row(120, None);
    swept.is_online = false;
    assert_eq!(
        found(&p, &tables(swept.clone(), &[])),
        [field("online", Some("presence_sweep"))]
    );
    // Not silent long enough for the sweep: unexpected.
    let mut early = row(30, None);
    early.is_online = false;
    assert_eq!(
        found(&tables(row(30, None), &[]), &tables(early, &[])),
        [field("online", None)]
    );
}

#[test]
fn status_merges_python_lost_are_expected_only_where_it_loses_them() {
    let copied = json!({"status": {"uptime": 30, "wifi_connected": true}});
    let later = json!({"status": {"uptime": 90, "wifi_connected": true, "free_heap": 1000}});
    // The Python side still holds the copied status; ours moved on.
    let p = with_start(
        tables(row(5, Some(copied.clone())), &[]),
        Some(copied.clone()),
    );
    let i = tables(row(5, Some(later.clone())), &[]);
    assert_eq!(
        found(&p, &i),
        [
            field(
                "last_report_data.status.free_heap",
                Some("lost_status_merge")
            ),
            field("last_report_data.status.uptime", Some("lost_status_merge")),
        ]
    );
    // The copy had no data: Python stored the first status after it, then lost the rest.
    let first = json!({"status": {"uptime": 60}});
    let p = with_start(tables(row(5, Some(first)), &[]), None);
    assert!(
        found(&p, &i)
            .iter()
            .all(|(_, c)| *c == Some("lost_status_merge"))
    );
    // The Python side wrote a status after the copy that differs from ours: not a lost merge.
    let p = with_start(
        tables(row(5, Some(json!({"status": {"uptime": 77}}))), &[]),
        Some(copied),
    );
    assert!(found(&p, &i).iter().any(|(_, c)| c.is_none()));
    // A status time written two ways for the same instant is no difference.
    let a = tables(
        row(
            5,
            Some(json!({"status": {"timestamp": "2026-12-02T18:00:00"}})),
        ),
        &[],
    );
    let b = tables(
        row(
            5,
            Some(json!({"status": {"timestamp": "2026-12-02T10:00:00Z"}})),
        ),
        &[],
    );
    assert_eq!(found(&a, &b), []);
}

#[test]
fn readings_in_last_report_data() {
    let reading = |v: Value, at: &str| json!({"value": v, "unit": "", "timestamp": at});
    // The current Python service writes none: what the copy held stays.
    let p = with_start(tables(row(5, Some(json!({}))), &[]), Some(json!({})));
    let i = tables(
        row(
            5,
            Some(
                json!({"sensors": {"temperature": reading(json!(24.3), "2026-12-02T17:59:55+08:00")}}),
            ),
        ),
        &[],
    );
    assert_eq!(
        found(&p, &i),
        [field(
            "last_report_data.sensors.temperature",
            Some("not_in_last_report_data")
        )]
    );
    // The seed's version writes them: the same value is no difference whatever its text.
    let p = tables(
        row(
            5,
            Some(json!({"sensors": {"humidity": reading(json!(55.0), "2026-12-02T17:59:55.1")}})),
        ),
        &[],
    );
    let i = tables(
        row(
            5,
            Some(json!({"sensors": {"humidity": reading(json!(55), "2026-12-02T17:59:55+08:00")}})),
        ),
        &[],
    );
    assert_eq!(found(&p, &i), []);
    // A later reading on the Python side that we kept out as older; a plain wrong value.
    let p = tables(
        row(
            5,
            Some(json!({"sensors": {"t": reading(json!(1), "2026-12-02T17:59:55")}})),
        ),
        &[],
    );
    let i = tables(
        row(
            5,
            Some(json!({"sensors": {"t": reading(json!(2), "2026-12-02T17:00:00+08:00")}})),
        ),
        &[],
    );
    assert_eq!(
        found(&p, &i),
        [field(
            "last_report_data.sensors.t",
            Some("late_older_reading")
        )]
    );
    let i = tables(
        row(
            5,
            Some(json!({"sensors": {"t": reading(json!(2), "2026-12-02T17:59:56+08:00")}})),
        ),
        &[],
    );
    assert_eq!(found(&p, &i), [field("last_report_data.sensors.t", None)]);
}

#[test]
fn device_sensors_rows_of_each_documented_difference() {
    let p = tables(
        row(5, None),
        &[
            ("big", sensor("1e+20", 5)),
            ("dated", sensor("25.5", 5)),
            ("late", sensor("1", 5)),
            ("device_id", sensor("12345", 5)),
            ("_hidden", sensor("1", 5)),
            ("broken", sensor("nan", 5)),
        ],
    );
    let i = tables(
        row(5, None),
        &[
            ("big", sensor("1e20", 5)),
            ("dated", sensor("25.5", 3600)),
            ("late", sensor("2", 600)),
        ],
    );
    assert_eq!(
        found(&p, &i),
        [
            field("device_sensors._hidden", Some("sensor_name_rule")),
            field("device_sensors.big.value", Some("number_text")),
            field("device_sensors.broken", Some("not_json")),
            field("device_sensors.dated.timestamp", Some("device_time")),
            field("device_sensors.device_id", Some("numeric_device_id")),
            field("device_sensors.late.value", Some("late_older_reading")),
        ]
    );
    // A unit or type that differs is never expected.
    let mut other = sensor("1", 5);
    other.unit = "°C".into();
    let p = tables(row(5, None), &[("t", sensor("1", 5))]);
    let i = tables(row(5, None), &[("t", other)]);
    assert_eq!(found(&p, &i), [field("device_sensors.t.unit", None)]);
    // … unless it came with a reading kept out as older.
    let mut older = sensor("1", 600);
    older.unit = "°C".into();
    let i = tables(row(5, None), &[("t", older)]);
    assert_eq!(
        found(&p, &i),
        [field("device_sensors.t.unit", Some("late_older_reading"))]
    );
}

#[test]
fn a_device_status_fitted_to_the_column() {
    let mut p = row(5, None);
    p.device_status = Some("pending".into());
    let mut i = row(5, None);
    i.device_status = Some("x".repeat(20));
    assert_eq!(
        found(&tables(p.clone(), &[]), &tables(i.clone(), &[])),
        [field("device_status", Some("device_status_fitted"))]
    );
    i.device_status = Some("running".into());
    assert_eq!(
        found(&tables(p, &[]), &tables(i, &[])),
        [field("device_status", None)]
    );
}

#[test]
fn devices_on_one_side_only_are_listed_not_compared() {
    let mut p = tables(row(5, None), &[]);
    p.devices.insert("new".into(), row(5, None));
    let mut i = tables(row(5, None), &[]);
    i.devices.insert("gone".into(), row(5, None));
    let report = compare(&p, &i, &options());
    assert_eq!(report.devices, 1);
    assert_eq!(
        report.not_compared,
        [
            ("new".to_owned(), OneSide::Python),
            ("gone".to_owned(), OneSide::Ingest)
        ]
    );
    assert!(
        report
            .summary()
            .ends_with("; 2 devices in one table only, not compared")
    );
}

#[test]
fn the_summary_counts_by_class_and_the_json_form_carries_it_all() {
    let p = tables(
        row(200, None),
        &[("big", sensor("1e+20", 5)), ("device_id", sensor("7", 5))],
    );
    let i = tables(
        row(5, None),
        &[("big", sensor("1e20", 5)), ("temperature", sensor("3", 5))],
    );
    let report = compare(&p, &i, &options());
    assert_eq!(
        report.summary(),
        "1 devices, 0 unexpected differences, 5 expected: 3 python_lost_message, 1 number_text, 1 numeric_device_id"
    );
    let j = report.json();
    assert_eq!(j["devices"], 1);
    assert_eq!(j["unexpected"], 0);
    assert_eq!(j["expected"], 5);
    assert_eq!(j["expected_by_class"]["python_lost_message"], 3);
    let d = j["differences"].as_array().unwrap();
    assert_eq!(d.len(), 5);
    assert!(
        d.iter()
            .all(|f| f["expected"] == true && f["device"] == UUID)
    );
    assert!(d.iter().any(|f| f["field"] == "device_sensors.big.value"
        && f["python"] == "1e+20 at 2026-12-02 17:59:55"
        && f["mqtt_ingest"] == "1e20 at 2026-12-02 17:59:55"
        && f["class"] == "number_text"));
}

#[test]
fn what_a_lost_merge_cannot_explain() {
    let copied = json!({"status": {"uptime": 30, "wifi_connected": true, "timestamp": "boot"}});
    let p = with_start(tables(row(5, Some(copied.clone())), &[]), Some(copied));
    // A key we dropped, a value that changed kind: not a later message.
    let i = tables(
        row(
            5,
            Some(json!({"status": {"wifi_connected": "true", "timestamp": "boot"}})),
        ),
        &[],
    );
    assert_eq!(
        found(&p, &i),
        [
            field("last_report_data.status.uptime", None),
            field("last_report_data.status.wifi_connected", None),
        ]
    );
    // A status time that reads as no time, left out on our side: documented.
    let i = tables(
        row(
            5,
            Some(json!({"status": {"uptime": 90, "wifi_connected": true}})),
        ),
        &[],
    );
    assert_eq!(
        found(&p, &i),
        [
            field(
                "last_report_data.status.timestamp",
                Some("status_timestamp")
            ),
            field("last_report_data.status.uptime", Some("lost_status_merge")),
        ]
    );
}

#[test]
fn excuses_hold_only_where_their_cause_can_be() {
    // A number's text in device_status is what both write: no excuse.
    let mut p = row(5, None);
    p.device_status = Some("pending".into());
    let mut i = row(5, None);
    i.device_status = Some("1".into());
    assert_eq!(
        found(&tables(p, &[]), &tables(i, &[])),
        [field("device_status", None)]
    );
    // A `nan` stored long before does not explain a later last_seen on the Python side.
    let p = tables(row(5, None), &[("broken", sensor("nan", 3600))]);
    let i = tables(row(200, None), &[]);
    assert!(
        found(&p, &i)
            .iter()
            .any(|(f, c)| f == "last_seen" && c.is_none()),
        "{:?}",
        found(&p, &i)
    );
    // Nor a heartbeat.
    assert!(
        found(&p, &i)
            .iter()
            .any(|(f, c)| f == "last_heartbeat" && c.is_none())
    );
    // Our last_seen in the future is no message the Python service lost.
    let mut future = row(5, None);
    future.last_seen = Some(now() + TimeDelta::hours(8));
    assert!(
        found(&tables(row(5, None), &[]), &tables(future, &[]))
            .iter()
            .any(|(f, c)| f == "last_seen" && c.is_none())
    );
}

#[test]
fn a_stale_row_beside_our_own_last_report_data_is_unexpected() {
    let reading =
        |v: Value, at: &str| json!({"sensors": {"t": {"value": v, "unit": "", "timestamp": at}}});
    let p = tables(row(5, None), &[("t", sensor("1", 5))]);
    // Our row is an hour old while our last_report_data read the same value just now.
    let i = tables(
        row(5, Some(reading(json!(1), "2026-12-02T17:59:55+08:00"))),
        &[("t", sensor("1", 3600))],
    );
    let f = found(&p, &i);
    assert!(
        f.contains(&field("device_sensors.t.timestamp", None)),
        "{f:?}"
    );
    // Where both our tables say the hour-old time, it is how the reading was dated.
    let i = tables(
        row(5, Some(reading(json!(1), "2026-12-02T17:00:00+08:00"))),
        &[("t", sensor("1", 3600))],
    );
    let f = found(&p, &i);
    assert!(
        f.contains(&field("device_sensors.t.timestamp", Some("device_time"))),
        "{f:?}"
    );
}

#[test]
fn rows_of_a_uuid_in_other_case_are_the_devices() {
    let mut p = tables(row(5, None), &[]);
    p.sensors = Some(BTreeMap::from([(
        (UUID.to_uppercase(), "t".to_owned()),
        sensor("1", 5),
    )]));
    let i = tables(row(5, None), &[("t", sensor("2", 5))]);
    assert_eq!(found(&p, &i), [field("device_sensors.t.value", None)]);
}
