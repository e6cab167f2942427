//! Pure merging of updates into a device's stored state: what a batch does to one row.
//!
//! The store reads each device's row once per batch (under a row lock), applies every update
//! of that device in order here, and writes the row once: many messages of one device in one
//! batch become one row write. Merging is order-safe: a sensor reading older than the stored
//! one (by its reading time) is not applied, a status carrying an older `timestamp` is not
//! applied, and `last_seen` / `last_heartbeat` never move backwards. So a redelivered or late
//! message cannot roll a device's state back.

use chrono::{DateTime, FixedOffset, NaiveDateTime, SecondsFormat};
use serde_json::{Map, Value, json};

use crate::model::{Change, DataReport, StatusReport, Update};

/// A device's row as the store read it, changed in place by [`DeviceState::apply`].
#[derive(Debug, Clone, PartialEq)]
pub struct DeviceState {
    /// `last_report_data` (an object; NULL or anything unusable reads as `{}`).
    pub data: Map<String, Value>,
    /// `last_seen` (UTC).
    pub last_seen: Option<NaiveDateTime>,
    /// `last_heartbeat` (UTC).
    pub last_heartbeat: Option<NaiveDateTime>,
    /// `is_online`.
    pub is_online: bool,
    /// `device_status`.
    pub device_status: Option<String>,
    /// `last_report_data` was NULL when read: it stays NULL until something is put in it.
    stored_null: bool,
}

impl DeviceState {
    /// The state from the stored columns; `data` is the column's text, if any.
    pub fn from_row(
        data: Option<&str>,
        last_seen: Option<NaiveDateTime>,
        last_heartbeat: Option<NaiveDateTime>,
        is_online: bool,
        device_status: Option<String>,
    ) -> Self {
        let stored_null = data.is_none();
        let data = match data.map(serde_json::from_str::<Value>) {
            Some(Ok(Value::Object(map))) => map,
            // NULL, text that is not JSON, or JSON that is not an object: start afresh rather
            // than refuse the device's new data.
            _ => Map::new(),
        };
        Self {
            data,
            last_seen,
            last_heartbeat,
            is_online,
            device_status,
            stored_null,
        }
    }

    /// Applies one update.
    pub fn apply(&mut self, update: &Update) {
        let received = update.received_at.naive_utc();
        self.last_seen = later(self.last_seen, received);
        match &update.change {
            Change::Data(report) => {
                self.apply_data(report, update);
                self.mark_online(update);
            }
            Change::Status(status) => self.apply_status(status, update),
            Change::Heartbeat => {
                self.last_heartbeat = later(self.last_heartbeat, received);
                self.mark_online(update);
            }
        }
    }

    /// Data and heartbeats mean the device is online, unless the message was sent before the
    /// stored status (an "offline" last will, say) by the device's own clock.
    fn mark_online(&mut self, update: &Update) {
        if !self.is_online
            && let Some(new) = &update.reading_time
            && let Some(Value::String(status_time)) = self.status_time()
            && is_older(new, status_time)
        {
            return;
        }
        self.is_online = true;
    }

    fn status_time(&self) -> Option<&Value> {
        self.data.get("status")?.get("timestamp")
    }

    /// `last_report_data` as the JSON text to store; `None` keeps a NULL column NULL when
    /// nothing was put in it (a heartbeat to a device that never sent data).
    pub fn data_json(&self) -> Option<String> {
        if self.stored_null && self.data.is_empty() {
            return None;
        }
        // A map of JSON values always serializes (its keys are strings).
        Some(serde_json::to_string(&self.data).unwrap_or_else(|_| "{}".to_owned()))
    }

    fn apply_data(&mut self, report: &DataReport, update: &Update) {
        if !report.sensors.is_empty() {
            let sensors = object_at(&mut self.data, "sensors");
            for (name, reading) in &report.sensors {
                let newer = match sensors.get(name).and_then(|s| s.get("timestamp")) {
                    Some(Value::String(stored)) => !is_older(&reading.timestamp, stored),
                    _ => true,
                };
                if newer {
                    let mut entry = Map::new();
                    entry.insert("value".into(), Value::Number(reading.value.clone()));
                    entry.insert("unit".into(), Value::String(reading.unit.clone()));
                    entry.insert("timestamp".into(), Value::String(reading.timestamp.clone()));
                    sensors.insert(name.clone(), Value::Object(entry));
                }
            }
        }
        if let Some(status) = &report.status {
            merge_by_key(object_at(&mut self.data, "status"), status);
        }
        if let Some(l) = &report.location {
            self.data.insert(
                "location".into(),
                json!({"latitude": l.latitude, "longitude": l.longitude}),
            );
        }
        let received = update
            .received_at
            .to_rfc3339_opts(SecondsFormat::Millis, true);
        let newer = match self.data.get("upload_timestamp") {
            Some(Value::String(stored)) => !is_older(&received, stored),
            _ => true,
        };
        if newer {
            self.data
                .insert("upload_timestamp".into(), Value::String(received));
        }
    }

    fn apply_status(&mut self, status: &StatusReport, update: &Update) {
        if let (Some(new), Some(Value::String(old))) = (&update.reading_time, self.status_time())
            && is_older(new, old)
        {
            return; // a status the device sent before the one already stored
        }
        merge_by_key(object_at(&mut self.data, "status"), &status.fields);
        if let Some(s) = &status.device_status {
            self.device_status = Some(s.clone());
        }
        if let Some(online) = status.online {
            self.is_online = online;
        }
    }
}

fn later(stored: Option<NaiveDateTime>, new: NaiveDateTime) -> Option<NaiveDateTime> {
    Some(stored.map_or(new, |s| s.max(new)))
}

/// The object under `key`, made one if it is missing or not an object.
fn object_at<'a>(data: &'a mut Map<String, Value>, key: &str) -> &'a mut Map<String, Value> {
    let slot = data
        .entry(key.to_owned())
        .or_insert_with(|| Value::Object(Map::new()));
    if !slot.is_object() {
        *slot = Value::Object(Map::new());
    }
    match slot {
        Value::Object(map) => map,
        _ => unreachable!("made an object just above"),
    }
}

/// Top-level keys of `patch` replace those in `target`; a `null` removes the key.
fn merge_by_key(target: &mut Map<String, Value>, patch: &Map<String, Value>) {
    for (k, v) in patch {
        if v.is_null() {
            target.remove(k);
        } else {
            target.insert(k.clone(), v.clone());
        }
    }
}

/// Whether RFC 3339 time `new` is strictly before `stored`. Text that does not parse is never
/// "older" (it cannot be compared, so the newer message wins).
fn is_older(new: &str, stored: &str) -> bool {
    // Fast path for the service's own receive times (`2026-01-02T03:04:05.678Z`, UTC, fixed
    // width): these compare as text. Parsing every stored timestamp was a visible cost.
    let own_format = |s: &str| s.len() == 24 && s.as_bytes()[19] == b'.' && s.ends_with('Z');
    if own_format(new) && own_format(stored) {
        return new < stored;
    }
    let parse = |s: &str| DateTime::<FixedOffset>::parse_from_rfc3339(s).ok();
    matches!((parse(new), parse(stored)), (Some(n), Some(s)) if n < s)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{DeviceUuid, Location, SensorReading};
    use chrono::{TimeZone, Utc};
    use serde_json::Number;

    fn at(secs: i64) -> chrono::DateTime<Utc> {
        Utc.timestamp_opt(1_766_000_000 + secs, 0).unwrap()
    }

    fn data(secs: i64, sensors: &[(&str, f64, Option<&str>)]) -> Update {
        let mut report = DataReport::default();
        for (name, v, ts) in sensors {
            report.sensors.insert(
                (*name).into(),
                SensorReading {
                    value: Number::from_f64(*v).unwrap(),
                    unit: "u".into(),
                    timestamp: ts.map_or_else(
                        || at(secs).to_rfc3339_opts(SecondsFormat::Millis, true),
                        str::to_owned,
                    ),
                },
            );
        }
        Update {
            device: DeviceUuid::parse("d").unwrap(),
            received_at: at(secs),
            reading_time: None,
            change: Change::Data(report),
        }
    }

    fn status(secs: i64, fields: Value) -> Update {
        let Value::Object(fields) = fields else {
            panic!()
        };
        let device_status = fields
            .get("status")
            .and_then(Value::as_str)
            .map(str::to_owned);
        let online = match device_status.as_deref() {
            Some("online") => Some(true),
            Some("offline") => Some(false),
            _ => None,
        };
        Update {
            device: DeviceUuid::parse("d").unwrap(),
            received_at: at(secs),
            reading_time: fields
                .get("timestamp")
                .and_then(Value::as_str)
                .map(str::to_owned),
            change: Change::Status(StatusReport {
                fields,
                device_status,
                online,
            }),
        }
    }

    fn empty() -> DeviceState {
        DeviceState::from_row(None, None, None, false, None)
    }

    fn value(s: &DeviceState, name: &str) -> Option<f64> {
        s.data.get("sensors")?.get(name)?.get("value")?.as_f64()
    }

    #[test]
    fn older_compares_own_and_foreign_formats() {
        assert!(is_older(
            "2026-01-02T03:04:05.677Z",
            "2026-01-02T03:04:05.678Z"
        ));
        assert!(!is_older(
            "2026-01-02T03:04:05.678Z",
            "2026-01-02T03:04:05.678Z"
        ));
        assert!(!is_older(
            "2026-01-02T03:04:06.000Z",
            "2026-01-02T03:04:05.678Z"
        ));
        assert!(is_older(
            "2026-01-02T11:04:05+08:00",
            "2026-01-02T03:04:05.678Z"
        ));
        assert!(!is_older(
            "2026-01-02T11:04:06+08:00",
            "2026-01-02T03:04:05.678Z"
        ));
        assert!(!is_older("garbage", "2026-01-02T03:04:05.678Z"));
        assert!(!is_older("2026-01-02T03:04:05.678Z", "garbage"));
    }

    #[test]
    fn sensors_merge_by_name_across_messages() {
        let mut s = empty();
        s.apply(&data(1, &[("temperature", 20.0, None)]));
        s.apply(&data(2, &[("humidity", 60.0, None)]));
        assert_eq!(value(&s, "temperature"), Some(20.0));
        assert_eq!(value(&s, "humidity"), Some(60.0));
        assert!(s.is_online);
        assert_eq!(s.last_seen, Some(at(2).naive_utc()));
    }

    #[test]
    fn an_older_reading_does_not_roll_a_sensor_back() {
        let mut s = empty();
        s.apply(&data(5, &[("t", 2.0, None)]));
        s.apply(&data(3, &[("t", 1.0, None)]));
        assert_eq!(value(&s, "t"), Some(2.0));
        assert_eq!(
            s.last_seen,
            Some(at(5).naive_utc()),
            "last_seen never moves back"
        );
        // The device's own reading time counts, whatever the receive order.
        s.apply(&data(9, &[("t", 0.5, Some("2020-01-01T00:00:00Z"))]));
        assert_eq!(value(&s, "t"), Some(2.0));
        // A redelivery of the same reading is harmless.
        s.apply(&data(5, &[("t", 2.0, None)]));
        assert_eq!(value(&s, "t"), Some(2.0));
    }

    #[test]
    fn status_merges_by_key_and_null_removes() {
        let mut s = empty();
        s.apply(&status(
            1,
            json!({"status": "online", "battery": 95, "fw": "1.0"}),
        ));
        s.apply(&status(2, json!({"battery": 90, "fw": null})));
        assert_eq!(
            Value::Object(s.data["status"].as_object().unwrap().clone()),
            json!({"status": "online", "battery": 90})
        );
        assert_eq!(s.device_status.as_deref(), Some("online"));
        assert!(s.is_online);
        s.apply(&status(3, json!({"status": "offline"})));
        assert!(!s.is_online);
        assert_eq!(s.device_status.as_deref(), Some("offline"));
    }

    #[test]
    fn a_status_with_an_older_timestamp_is_not_applied() {
        let mut s = empty();
        s.apply(&status(
            1,
            json!({"status": "offline", "timestamp": "2026-01-01T00:00:10Z"}),
        ));
        s.apply(&status(
            2,
            json!({"status": "online", "timestamp": "2026-01-01T00:00:05Z"}),
        ));
        assert!(!s.is_online);
        assert_eq!(s.device_status.as_deref(), Some("offline"));
        assert_eq!(s.last_seen, Some(at(2).naive_utc()));
    }

    #[test]
    fn a_data_message_sent_before_an_offline_status_does_not_mark_online() {
        let mut s = empty();
        s.apply(&status(
            1,
            json!({"status": "offline", "timestamp": "2026-01-01T00:00:10Z"}),
        ));
        let mut old = data(2, &[("t", 1.0, None)]);
        old.reading_time = Some("2026-01-01T00:00:05Z".into());
        s.apply(&old);
        assert!(!s.is_online);
        assert_eq!(value(&s, "t"), Some(1.0), "its readings still count");
        let mut new = data(3, &[("t", 2.0, None)]);
        new.reading_time = Some("2026-01-01T00:00:11Z".into());
        s.apply(&new);
        assert!(s.is_online);
        // Without a reading time there is nothing to compare: the device spoke, so online.
        s.apply(&status(
            4,
            json!({"status": "offline", "timestamp": "2026-01-01T00:00:20Z"}),
        ));
        s.apply(&data(5, &[("t", 3.0, None)]));
        assert!(s.is_online);
    }

    #[test]
    fn heartbeat_and_location() {
        let mut s = DeviceState::from_row(Some("not json"), None, None, false, Some("x".into()));
        s.apply(&Update {
            device: DeviceUuid::parse("d").unwrap(),
            received_at: at(4),
            reading_time: None,
            change: Change::Heartbeat,
        });
        assert_eq!(s.last_heartbeat, Some(at(4).naive_utc()));
        assert!(s.is_online);
        assert!(
            s.data.is_empty(),
            "a heartbeat does not touch last_report_data"
        );
        let mut u = data(5, &[]);
        if let Change::Data(r) = &mut u.change {
            r.location = Some(Location {
                latitude: Number::from(1),
                longitude: Number::from(2),
            });
        }
        s.apply(&u);
        assert_eq!(s.data["location"], json!({"latitude": 1, "longitude": 2}));
        assert_eq!(
            s.data["upload_timestamp"],
            json!("2025-12-17T19:33:25.000Z")
        );
    }

    #[test]
    fn unusable_stored_data_starts_afresh() {
        for stored in ["[1,2]", "\"x\"", "{\"sensors\": [1], \"status\": 3}"] {
            let mut s = DeviceState::from_row(Some(stored), None, None, false, None);
            s.apply(&data(1, &[("t", 1.0, None)]));
            s.apply(&status(1, json!({"a": 1})));
            assert_eq!(value(&s, "t"), Some(1.0), "{stored}");
            assert_eq!(s.data["status"], json!({"a": 1}), "{stored}");
        }
    }

    #[test]
    fn coalescing_equals_applying_one_by_one() {
        // Applying a device's messages in one batch gives the same row as one batch each.
        let updates = [
            data(1, &[("a", 1.0, None), ("b", 1.0, None)]),
            status(2, json!({"status": "online", "x": 1})),
            data(3, &[("a", 2.0, None)]),
            status(4, json!({"x": null, "y": 2})),
        ];
        let mut together = empty();
        for u in &updates {
            together.apply(u);
        }
        let mut separately = empty();
        for u in &updates {
            let mut row = DeviceState::from_row(
                separately.data_json().as_deref(),
                separately.last_seen,
                separately.last_heartbeat,
                separately.is_online,
                separately.device_status.clone(),
            );
            row.apply(u);
            separately = row;
        }
        // Equal but for whether the column was NULL when first read.
        let view = |s: &DeviceState| {
            (
                s.data_json(),
                s.last_seen,
                s.last_heartbeat,
                s.is_online,
                s.device_status.clone(),
            )
        };
        assert_eq!(view(&together), view(&separately));
    }
}
