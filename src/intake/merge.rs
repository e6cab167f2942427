//! Pure merging of updates into a device's stored state: what a batch does to one row.
//!
//! The store reads each device's row once per batch (under a row lock), applies every update
//! of that device in order here, and writes the row once: many messages of one device in one
//! batch become one row write. Merging is order-safe: a sensor reading older than the stored
//! one (by its reading time) is not applied, a status carrying an older `timestamp` is not
//! applied, and `last_seen` / `last_heartbeat` never move backwards. So a redelivered or late
//! message cannot roll a device's state back.

use std::borrow::Cow;
use std::collections::BTreeMap;

use chrono::{DateTime, FixedOffset, NaiveDateTime, TimeDelta};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::{Map, Value};

use crate::intake::model::{Change, DataReport, ReadingTime, SensorValue, StatusReport, Update};

/// `last_report_data`, parsed only as deep as merging needs: the top-level keys with their
/// values kept as JSON text, and `sensors` and `status` opened into their keys only when an
/// update needs them. What no update touches is written back as it was read; the whole is
/// written compact with keys in order, as `serde_json` would write the same object. (Building
/// and dropping a full `serde_json::Value` tree per row was half of the service's CPU with
/// 10,000 devices.)
#[derive(Debug, Clone, Default)]
struct StoredData {
    /// Top-level keys, other than the ones opened below.
    top: BTreeMap<String, Box<RawValue>>,
    /// `sensors`, opened: each sensor's stored object as JSON text.
    sensors: Option<BTreeMap<String, Box<RawValue>>>,
    /// `status`, opened.
    status: Option<Map<String, Value>>,
}

/// What merging reads of a stored sensor or of `status`: its `timestamp`, when a string.
#[derive(Deserialize)]
struct Stamped<'a> {
    #[serde(borrow)]
    timestamp: Option<Cow<'a, str>>,
}

/// A sensor reading as stored (keys in the order `serde_json` writes a map).
#[derive(Serialize)]
struct StoredSensor<'a> {
    timestamp: &'a str,
    unit: &'a str,
    value: &'a SensorValue,
}

/// JSON text for a value that always serializes (strings, numbers, maps with string keys).
fn raw<T: Serialize + ?Sized>(value: &T) -> Box<RawValue> {
    serde_json::value::to_raw_value(value).unwrap_or_else(|_| empty_object())
}

fn empty_object() -> Box<RawValue> {
    RawValue::from_string("{}".to_owned()).expect("{} is JSON")
}

/// The `timestamp` string of a stored object, if it is one and has one.
fn timestamp_in(raw: &RawValue) -> Option<Cow<'_, str>> {
    serde_json::from_str::<Stamped>(raw.get())
        .ok()
        .and_then(|s| s.timestamp)
}

impl StoredData {
    /// The column's text; NULL, text that is not JSON, or JSON that is not an object give an
    /// empty object (start afresh rather than refuse the device's new data).
    fn parse(text: Option<&str>) -> Self {
        let top = text
            .and_then(|t| serde_json::from_str(t).ok())
            .unwrap_or_default();
        Self {
            top,
            sensors: None,
            status: None,
        }
    }

    fn is_empty(&self) -> bool {
        self.top.is_empty() && self.sensors.is_none() && self.status.is_none()
    }

    /// `sensors`, opened; made an empty object if missing or not an object.
    fn sensors(&mut self) -> &mut BTreeMap<String, Box<RawValue>> {
        if self.sensors.is_none() {
            let stored = self.top.remove("sensors");
            self.sensors = Some(
                stored
                    .and_then(|r| serde_json::from_str(r.get()).ok())
                    .unwrap_or_default(),
            );
        }
        self.sensors.get_or_insert_default()
    }

    /// `status`, opened if it is an object; `None` if missing or not an object (left as is).
    fn status_if_object(&mut self) -> Option<&mut Map<String, Value>> {
        if self.status.is_none()
            && let Some(stored) = self.top.get("status")
            && let Ok(map) = serde_json::from_str::<Map<String, Value>>(stored.get())
        {
            self.top.remove("status");
            self.status = Some(map);
        }
        self.status.as_mut()
    }

    /// `status`, opened; made an empty object if missing or not an object.
    fn status(&mut self) -> &mut Map<String, Value> {
        if self.status_if_object().is_none() {
            self.top.remove("status");
        }
        self.status.get_or_insert_default()
    }

    /// The stored status's `timestamp`, when a string.
    fn status_time(&mut self) -> Option<String> {
        match self.status_if_object()?.get("timestamp") {
            Some(Value::String(t)) => Some(t.clone()),
            _ => None,
        }
    }

    fn set(&mut self, key: &str, value: Box<RawValue>) {
        match key {
            "sensors" => self.sensors = None,
            "status" => self.status = None,
            _ => {}
        }
        self.top.insert(key.to_owned(), value);
    }

    /// Compact JSON text, keys in order at every level that was opened.
    fn to_json(&self) -> String {
        enum Part<'a> {
            Raw(&'a RawValue),
            Sensors(&'a BTreeMap<String, Box<RawValue>>),
            Status(&'a Map<String, Value>),
        }
        let mut parts: Vec<(&str, Part)> = self
            .top
            .iter()
            .map(|(k, v)| (k.as_str(), Part::Raw(v)))
            .collect();
        if let Some(s) = &self.sensors {
            parts.push(("sensors", Part::Sensors(s)));
        }
        if let Some(s) = &self.status {
            parts.push(("status", Part::Status(s)));
        }
        parts.sort_unstable_by(|a, b| a.0.cmp(b.0));
        let mut out: Vec<u8> = Vec::with_capacity(256);
        out.push(b'{');
        for (i, (key, part)) in parts.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            push_key(&mut out, key);
            match part {
                Part::Raw(r) => out.extend_from_slice(r.get().as_bytes()),
                Part::Sensors(sensors) => {
                    out.push(b'{');
                    for (j, (name, reading)) in sensors.iter().enumerate() {
                        if j > 0 {
                            out.push(b',');
                        }
                        push_key(&mut out, name);
                        out.extend_from_slice(reading.get().as_bytes());
                    }
                    out.push(b'}');
                }
                // A map of JSON values always serializes (its keys are strings).
                Part::Status(map) => {
                    let _ = serde_json::to_writer(&mut out, map);
                }
            }
        }
        out.push(b'}');
        // Made of JSON text and serde_json's output only: always UTF-8.
        String::from_utf8(out).unwrap_or_else(|_| "{}".to_owned())
    }
}

/// `"key":`, escaped as JSON.
fn push_key(out: &mut Vec<u8>, key: &str) {
    let _ = serde_json::to_writer(&mut *out, key);
    out.push(b':');
}

/// A device's row as the store read it, changed in place by [`DeviceState::apply`].
#[derive(Debug, Clone)]
pub struct DeviceState {
    /// `last_report_data` (an object; NULL or anything unusable reads as `{}`).
    data: StoredData,
    /// `last_seen`, on the database zone's wall clock.
    pub last_seen: Option<NaiveDateTime>,
    /// `last_heartbeat`, on the database zone's wall clock.
    pub last_heartbeat: Option<NaiveDateTime>,
    /// `is_online`.
    pub is_online: bool,
    /// `device_status`.
    pub device_status: Option<String>,
    /// `last_report_data` was NULL when read: it stays NULL until something is put in it.
    stored_null: bool,
    /// How far past a message's receive time a stored time may lie and still be trusted.
    clock_skew: TimeDelta,
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
        Self {
            data: StoredData::parse(data),
            last_seen,
            last_heartbeat,
            is_online,
            device_status,
            stored_null: data.is_none(),
            clock_skew: TimeDelta::seconds(300),
        }
    }

    /// Trust stored times (of sensors, of the status) only up to `skew` past a message's
    /// receive time (`INGEST_MAX_CLOCK_SKEW_SECS`). The service never stores a time further
    /// ahead; one that is (a row written before the switch by a device whose clock said 9999)
    /// would otherwise make every later reading "older" and freeze that sensor for good.
    pub fn with_clock_skew(mut self, skew: std::time::Duration) -> Self {
        self.clock_skew = TimeDelta::from_std(skew).unwrap_or(TimeDelta::MAX);
        self
    }

    /// The latest stored time a message received at `received` still respects.
    fn trust_limit(&self, received: DateTime<FixedOffset>) -> Option<DateTime<FixedOffset>> {
        received.checked_add_signed(self.clock_skew)
    }

    /// Applies one update.
    pub fn apply(&mut self, update: &Update) {
        // The receive time is already in the database's zone: its wall clock is what the
        // DATETIME columns hold (naive Beijing time for a CodeHubot backend).
        let received = update.received_at.naive_local();
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
        let limit = self.trust_limit(update.received_at);
        if !self.is_online
            && let Some(new) = &update.reading_time
            && let Some(status_time) = self.data.status_time()
            && is_older(new, &status_time)
            && trusted(&status_time, limit)
        {
            return;
        }
        self.is_online = true;
    }

    /// `last_report_data` as the JSON text to store; `None` keeps a NULL column NULL when
    /// nothing was put in it (a heartbeat to a device that never sent data).
    pub fn data_json(&self) -> Option<String> {
        if self.stored_null && self.data.is_empty() {
            return None;
        }
        Some(self.data.to_json())
    }

    /// `last_report_data` as a JSON value (for tests and diagnostics).
    pub fn data_value(&self) -> Value {
        serde_json::from_str(&self.data.to_json()).unwrap_or(Value::Null)
    }

    fn apply_data(&mut self, report: &DataReport, update: &Update) {
        if !report.sensors.is_empty() {
            let limit = self.trust_limit(update.received_at);
            let sensors = self.data.sensors();
            for (name, reading) in &report.sensors {
                // Written out once: a receive time's text is made here.
                let time = reading.timestamp.text();
                let newer = match sensors.get(name).and_then(|s| timestamp_in(s)) {
                    // Parsed for trust only when the reading would be refused.
                    Some(stored) => !is_older(&time, &stored) || !trusted(&stored, limit),
                    None => true,
                };
                if newer {
                    let entry = raw(&StoredSensor {
                        timestamp: &time,
                        unit: reading.unit(),
                        value: &reading.value,
                    });
                    match sensors.get_mut(name) {
                        Some(slot) => *slot = entry,
                        None => {
                            sensors.insert(name.to_owned(), entry);
                        }
                    }
                }
            }
        }
        if let Some(status) = &report.status {
            merge_by_key(self.data.status(), status.iter().cloned());
        }
        if let Some(l) = &report.location {
            let mut location = Map::new();
            location.insert("latitude".into(), Value::Number(l.latitude.clone()));
            location.insert("longitude".into(), Value::Number(l.longitude.clone()));
            self.data.set("location", raw(&location));
        }
        let received = crate::intake::zone::rfc3339_millis(&update.received_at);
        let stored = self
            .data
            .top
            .get("upload_timestamp")
            .and_then(|r| serde_json::from_str::<Cow<str>>(r.get()).ok());
        let newer = match stored {
            Some(stored) => !is_older(&received, &stored),
            None => true,
        };
        if newer {
            self.data.set("upload_timestamp", raw(&received));
        }
    }

    fn apply_status(&mut self, status: &StatusReport, update: &Update) {
        let limit = self.trust_limit(update.received_at);
        if let Some(new) = &update.reading_time
            && let Some(old) = self.data.status_time()
            && is_older(new, &old)
            && trusted(&old, limit)
        {
            return; // a status the device sent before the one already stored
        }
        merge_by_key(
            self.data.status(),
            status.fields(update.reading_time.as_deref()),
        );
        if let Some(s) = &status.device_status {
            self.device_status = Some(s.to_string());
        }
        self.is_online = status.online();
    }
}

/// Folds `next` into `into`, an earlier update of the same device, when one update can do
/// exactly what the two do one after the other, whatever the stored row: then a device's
/// messages that wait together cost one parsed update, not one each. Gives `next` back when
/// it cannot:
/// - only data into data and heartbeat into heartbeat (one update is one kind);
/// - not a data message whose `status` fields set or remove `timestamp`: the stored status
///   time decides whether each message marks the device online, so it must not move between
///   the two;
/// - not across device ids that differ (in case only, say: the store may map them to one
///   row, but they are still two ids).
///
/// The fold keeps, per sensor, the reading `apply` would end with (the later one by its
/// reading time; the second on a tie), the second message's status fields over the first's,
/// the second location when it has one, the later receive time (`last_seen`,
/// `last_heartbeat`, `upload_timestamp`) and the later reading time, or none if either has
/// none (without one a message marks the device online unconditionally). Timestamps in
/// updates are RFC 3339, as [`crate::intake::payload`] accepts them; see the property test
/// `absorbing_equals_applying_in_order`.
#[allow(clippy::result_large_err)] // gives `next` back as it came, without boxing it
pub fn absorb(into: &mut Update, next: Update) -> Result<(), Update> {
    let foldable = into.device == next.device
        && match (&into.change, &next.change) {
            (Change::Heartbeat, Change::Heartbeat) => true,
            (Change::Data(_), Change::Data(b)) => !b
                .status
                .as_ref()
                .is_some_and(|fields| fields.iter().any(|(k, _)| k == "timestamp")),
            _ => false,
        };
    if !foldable {
        return Err(next);
    }
    if let (Change::Data(a), Change::Data(b)) = (&mut into.change, next.change) {
        for reading in b.sensors {
            match a.sensors.get_mut_like(&reading) {
                Some(held) => {
                    if !reading_is_older(&reading.timestamp, &held.timestamp) {
                        *held = reading;
                    }
                }
                None => a.sensors.insert(reading),
            }
        }
        if let Some(fields) = b.status {
            let mut held = a.status.take().map(Vec::from).unwrap_or_default();
            for (k, v) in fields {
                match held.binary_search_by(|(h, _)| h.as_str().cmp(&k)) {
                    Ok(i) => held[i].1 = v,
                    Err(i) => held.insert(i, (k, v)),
                }
            }
            a.status = Some(held.into());
        }
        if b.location.is_some() {
            a.location = b.location;
        }
    }
    into.received_at = into.received_at.max(next.received_at);
    into.reading_time = match (into.reading_time.take(), next.reading_time) {
        (Some(a), Some(b)) => Some(if is_older(&b, &a) { a } else { b }),
        _ => None,
    };
    Ok(())
}

/// Whether stored RFC 3339 time `stored` is at most `limit` (no limit: always).
fn trusted(stored: &str, limit: Option<DateTime<FixedOffset>>) -> bool {
    match (DateTime::parse_from_rfc3339(stored), limit) {
        (Ok(t), Some(limit)) => t <= limit,
        (Ok(_), None) => true,
        (Err(_), _) => false,
    }
}

fn later(stored: Option<NaiveDateTime>, new: NaiveDateTime) -> Option<NaiveDateTime> {
    Some(stored.map_or(new, |s| s.max(new)))
}

/// Top-level keys of `patch` replace those in `target`; a `null` removes the key.
fn merge_by_key(target: &mut Map<String, Value>, patch: impl IntoIterator<Item = (String, Value)>) {
    for (k, v) in patch {
        if v.is_null() {
            target.remove(&k);
        } else {
            target.insert(k, v);
        }
    }
}

/// Whether reading time `new` is strictly before `held`, as [`is_older`] of their texts says:
/// two receive times compare as times, and a receive time with a device's text as instants,
/// without writing the receive time out as text to parse it back.
pub fn reading_is_older(new: &ReadingTime, held: &ReadingTime) -> bool {
    match (new, held) {
        (ReadingTime::Received(n), ReadingTime::Received(h)) => n < h,
        (ReadingTime::Device(n), ReadingTime::Device(h)) => is_older(n, h),
        // A receive time's text says its instant (to the millisecond, as it is kept); text
        // that does not parse is never older, nor anything older than it.
        _ => matches!((new.instant(), held.instant()), (Some(n), Some(h)) if n < h),
    }
}

/// Whether RFC 3339 time `new` is strictly before `stored`. Text that does not parse is never
/// "older" (it cannot be compared, so the newer message wins).
pub fn is_older(new: &str, stored: &str) -> bool {
    // Fast path: two texts laid out alike with the same offset (the service's own receive
    // times, `2026-01-02T03:04:05.678+08:00`; a device's times, `2026-12-02T14:30:00+08:00`)
    // compare as text. Parsing both was a visible cost: about 1,100 instructions each
    // (chrono), where this is a few dozen.
    let (n, s) = (new.as_bytes(), stored.as_bytes());
    if n.len() == s.len()
        && let (Some(i), Some(j)) = (offset_at(n), offset_at(s))
        && i == j
        && n[i..] == s[j..]
    {
        return n < s;
    }
    let parse = |s: &str| DateTime::<FixedOffset>::parse_from_rfc3339(s).ok();
    matches!((parse(new), parse(stored)), (Some(n), Some(s)) if n < s)
}

/// Where the offset of `s` starts, when `s` is laid out as `YYYY-MM-DDTHH:MM:SS[.F…]` (up to
/// nine fraction digits) and then `Z` or `±HH:MM`, with digits where digits go: two such texts
/// of one length and offset put the same field at the same place, so their text order is their
/// time order. Their fields' ranges are not checked: the texts compared are the payload
/// reader's and the service's own, which parse (text laid out alike that chrono would refuse,
/// a 30 February, compares as text, as the service's own format always did).
fn offset_at(s: &[u8]) -> Option<usize> {
    // `0` stands for a digit.
    const LAYOUT: &[u8; 19] = b"0000-00-00T00:00:00";
    let laid_out = s.len() >= 20
        && s[..19].iter().zip(LAYOUT).all(|(&b, &l)| {
            if l == b'0' {
                b.is_ascii_digit()
            } else {
                b == l
            }
        });
    if !laid_out {
        return None;
    }
    let mut at = 19;
    if s[at] == b'.' {
        let digits = s[at + 1..]
            .iter()
            .take_while(|b| b.is_ascii_digit())
            .count();
        // chrono reads nine digits and ignores the rest: two texts that differ past the ninth
        // are the same time, which text order would not say.
        if digits == 0 || digits > 9 {
            return None;
        }
        at += 1 + digits;
    }
    let offset = &s[at..];
    let ok = offset == b"Z"
        || offset.len() == 6
            && matches!(offset[0], b'+' | b'-')
            && offset[3] == b':'
            && [1, 2, 4, 5].iter().all(|&i| offset[i].is_ascii_digit());
    ok.then_some(at)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::intake::model::{DeviceUuid, Location, Sensor, SensorReading};
    use chrono::SecondsFormat;
    use chrono::{TimeZone, Utc};
    use serde_json::{Number, json};

    /// A receive time as the payload makes them: in the database's zone (Beijing here).
    fn at(secs: i64) -> chrono::DateTime<FixedOffset> {
        Utc.timestamp_opt(1_766_000_000 + secs, 0)
            .unwrap()
            .with_timezone(&FixedOffset::east_opt(8 * 3600).unwrap())
    }

    fn data(secs: i64, sensors: &[(&str, f64, Option<&str>)]) -> Update {
        let mut report = DataReport::default();
        for (name, v, ts) in sensors {
            report.sensors.insert(SensorReading::of(
                Sensor::shared(name, "u", None),
                Number::from_f64(*v).unwrap().into(),
                // Undated: the receive time, as the payload reader keeps it.
                ts.map_or(ReadingTime::Received(at(secs)), ReadingTime::from),
            ));
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
        Update {
            device: DeviceUuid::parse("d").unwrap(),
            received_at: at(secs),
            reading_time: fields
                .get("timestamp")
                .and_then(Value::as_str)
                .map(Into::into),
            change: Change::Status(StatusReport::of(&fields, device_status.as_deref())),
        }
    }

    fn empty() -> DeviceState {
        DeviceState::from_row(None, None, None, false, None)
    }

    fn value(s: &DeviceState, name: &str) -> Option<f64> {
        s.data_value()
            .get("sensors")?
            .get(name)?
            .get("value")?
            .as_f64()
    }

    /// RFC 3339 text of `secs` (since 2026-01-01) and `nanos`, with `fraction` digits (0-12;
    /// those past the ninth from `beyond`) at `offset` minutes, or `Z`.
    fn rfc3339(secs: i64, nanos: u32, fraction: usize, beyond: u16, offset: Option<i32>) -> String {
        let t = Utc.timestamp_opt(1_767_225_600 + secs, nanos).unwrap();
        let zone = FixedOffset::east_opt(offset.unwrap_or(0) * 60).unwrap();
        let local = t.with_timezone(&zone);
        let mut text = local.format("%Y-%m-%dT%H:%M:%S").to_string();
        if fraction > 0 {
            let digits = format!("{:09}{:03}", local.timestamp_subsec_nanos(), beyond % 1000);
            text.push('.');
            text.push_str(&digits[..fraction]);
        }
        match offset {
            None => text.push('Z'),
            Some(_) => text.push_str(&local.format("%:z").to_string()),
        }
        text
    }

    proptest::proptest! {
        /// The text fast path answers what parsing both texts answers, for texts of any layout
        /// and offset, alike or not.
        #[test]
        fn older_by_text_is_older_by_time(
            a in (0i64..200, 0u32..1_000_000_000, 0usize..13, proptest::prelude::any::<u16>(), proptest::option::of(-3i32..3)),
            b in (0i64..200, 0u32..1_000_000_000, 0usize..13, proptest::prelude::any::<u16>(), proptest::option::of(-3i32..3)),
            same in proptest::prelude::any::<bool>(),
        ) {
            // Half the pairs differ only past the ninth digit, if at all.
            let b = if same { (a.0, a.1, a.2, b.3, a.4) } else { b };
            let (a, b) = (
                rfc3339(a.0, a.1, a.2, a.3, a.4.map(|h| h * 60)),
                rfc3339(b.0, b.1, b.2, b.3, b.4.map(|h| h * 60)),
            );
            let parse = |s: &str| DateTime::parse_from_rfc3339(s).unwrap();
            proptest::prop_assert_eq!(is_older(&a, &b), parse(&a) < parse(&b), "{} {}", a, b);
        }
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
        assert_eq!(s.last_seen, Some(at(2).naive_local()));
    }

    #[test]
    fn an_older_reading_does_not_roll_a_sensor_back() {
        let mut s = empty();
        s.apply(&data(5, &[("t", 2.0, None)]));
        s.apply(&data(3, &[("t", 1.0, None)]));
        assert_eq!(value(&s, "t"), Some(2.0));
        assert_eq!(
            s.last_seen,
            Some(at(5).naive_local()),
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
            s.data_value()["status"],
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
            json!({"status": "offline", "timestamp": "2025-12-17T19:34:10Z"}),
        ));
        s.apply(&status(
            2,
            json!({"status": "online", "timestamp": "2025-12-17T19:34:05Z"}),
        ));
        assert!(!s.is_online);
        assert_eq!(s.device_status.as_deref(), Some("offline"));
        assert_eq!(s.last_seen, Some(at(2).naive_local()));
    }

    /// A row written before the switch by a device whose clock said 9999: its times order
    /// nothing, or the sensor and the status would be frozen for good.
    #[test]
    fn stored_times_far_ahead_of_the_receive_time_order_nothing() {
        let stored = json!({
            "sensors": {"t": {"value": 1, "unit": "", "timestamp": "9999-12-31T23:59:59Z"}},
            "status": {"status": "offline", "timestamp": "9999-12-31T23:59:59Z"},
        })
        .to_string();
        let mut s = DeviceState::from_row(Some(&stored), None, None, false, None)
            .with_clock_skew(std::time::Duration::from_secs(300));
        let mut u = data(1, &[("t", 2.0, None)]);
        u.reading_time = Some(at(1).to_rfc3339().into());
        s.apply(&u);
        assert_eq!(value(&s, "t"), Some(2.0));
        assert!(
            s.is_online,
            "a stored 9999 offline does not hold the device offline"
        );
        s.apply(&status(
            2,
            json!({"status": "offline", "timestamp": at(2).to_rfc3339()}),
        ));
        assert!(!s.is_online, "a dated status after a 9999 one applies");
        // Within the skew, a stored time still orders: an older reading is refused.
        let ahead = at(100).to_rfc3339_opts(SecondsFormat::Millis, true);
        s.apply(&data(3, &[("t", 3.0, Some(ahead.as_str()))]));
        s.apply(&data(4, &[("t", 4.0, None)]));
        assert_eq!(value(&s, "t"), Some(3.0));
    }

    #[test]
    fn a_data_message_sent_before_an_offline_status_does_not_mark_online() {
        let mut s = empty();
        s.apply(&status(
            1,
            json!({"status": "offline", "timestamp": "2025-12-17T19:34:10Z"}),
        ));
        let mut old = data(2, &[("t", 1.0, None)]);
        old.reading_time = Some("2025-12-17T19:34:05Z".into());
        s.apply(&old);
        assert!(!s.is_online);
        assert_eq!(value(&s, "t"), Some(1.0), "its readings still count");
        let mut new = data(3, &[("t", 2.0, None)]);
        new.reading_time = Some("2025-12-17T19:34:11Z".into());
        s.apply(&new);
        assert!(s.is_online);
        // Without a reading time there is nothing to compare: the device spoke, so online.
        s.apply(&status(
            4,
            json!({"status": "offline", "timestamp": "2025-12-17T19:34:20Z"}),
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
        assert_eq!(s.last_heartbeat, Some(at(4).naive_local()));
        assert!(s.is_online);
        assert!(
            s.data_value() == json!({}),
            "a heartbeat does not touch last_report_data"
        );
        let mut u = data(5, &[]);
        if let Change::Data(r) = &mut u.change {
            r.location = Some(Box::new(Location {
                latitude: Number::from(1),
                longitude: Number::from(2),
            }));
        }
        s.apply(&u);
        assert_eq!(
            s.data_value()["location"],
            json!({"latitude": 1, "longitude": 2})
        );
        assert_eq!(
            s.data_value()["upload_timestamp"],
            json!("2025-12-18T03:33:25.000+08:00"),
            "the receive time, with the database zone's offset"
        );
    }

    #[test]
    fn unusable_stored_data_starts_afresh() {
        for stored in ["[1,2]", "\"x\"", "{\"sensors\": [1], \"status\": 3}"] {
            let mut s = DeviceState::from_row(Some(stored), None, None, false, None);
            s.apply(&data(1, &[("t", 1.0, None)]));
            s.apply(&status(1, json!({"a": 1})));
            assert_eq!(value(&s, "t"), Some(1.0), "{stored}");
            assert_eq!(s.data_value()["status"], json!({"a": 1}), "{stored}");
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

    /// The merge as it was written on a whole `serde_json::Value` tree before the stored data
    /// was parsed only partly: the reference the partial parse must equal.
    mod reference {
        use super::*;

        fn object_at<'a>(
            data: &'a mut Map<String, Value>,
            key: &str,
        ) -> &'a mut Map<String, Value> {
            let slot = data
                .entry(key.to_owned())
                .or_insert_with(|| Value::Object(Map::new()));
            if !slot.is_object() {
                *slot = Value::Object(Map::new());
            }
            slot.as_object_mut().unwrap()
        }

        fn status_time(data: &Map<String, Value>) -> Option<String> {
            match data.get("status")?.get("timestamp") {
                Some(Value::String(t)) => Some(t.clone()),
                _ => None,
            }
        }

        /// The data column after `update`, and whether a data message or heartbeat may mark
        /// the device online (a status compared by time).
        pub fn apply(data: &mut Map<String, Value>, update: &Update) {
            match &update.change {
                Change::Data(report) => {
                    if !report.sensors.is_empty() {
                        let sensors = object_at(data, "sensors");
                        for (name, reading) in &report.sensors {
                            let newer = match sensors.get(name).and_then(|s| s.get("timestamp")) {
                                Some(Value::String(stored)) => {
                                    !is_older(&reading.timestamp.text(), stored)
                                }
                                _ => true,
                            };
                            if newer {
                                sensors.insert(
                                    name.to_owned(),
                                    json!({"value": reading.value, "unit": reading.unit(), "timestamp": reading.timestamp.text()}),
                                );
                            }
                        }
                    }
                    if let Some(status) = &report.status {
                        merge_by_key(object_at(data, "status"), status.iter().cloned());
                    }
                    if let Some(l) = &report.location {
                        data.insert(
                            "location".into(),
                            json!({"latitude": l.latitude, "longitude": l.longitude}),
                        );
                    }
                    let received = update
                        .received_at
                        .to_rfc3339_opts(SecondsFormat::Millis, true);
                    let newer = match data.get("upload_timestamp") {
                        Some(Value::String(stored)) => !is_older(&received, stored),
                        _ => true,
                    };
                    if newer {
                        data.insert("upload_timestamp".into(), Value::String(received));
                    }
                }
                Change::Status(status) => {
                    if let (Some(new), Some(old)) = (&update.reading_time, status_time(data))
                        && is_older(new, &old)
                    {
                        return;
                    }
                    merge_by_key(
                        object_at(data, "status"),
                        status.fields(update.reading_time.as_deref()),
                    );
                }
                Change::Heartbeat => {}
            }
        }
    }

    mod partial_parse_equals_reference {
        use super::*;
        use proptest::prelude::*;

        pub(super) fn stamp() -> impl Strategy<Value = Value> {
            prop_oneof![
                (0i64..20).prop_map(|s| json!(at(s).to_rfc3339_opts(SecondsFormat::Millis, true))),
                (0i64..20).prop_map(|s| json!(format!("2025-12-17T{:02}:00:00+08:00", s))),
                Just(json!("garbage")),
                Just(json!(7)),
                Just(Value::Null),
            ]
        }

        pub(super) fn leaf() -> impl Strategy<Value = Value> {
            prop_oneof![
                Just(Value::Null),
                any::<bool>().prop_map(Value::from),
                (-5i64..5).prop_map(Value::from),
                r#"[a-z"\\é ]{0,4}"#.prop_map(Value::from),
                Just(json!([1, {"b": 2}])),
            ]
        }

        fn sensor_obj() -> impl Strategy<Value = Value> {
            prop_oneof![
                (stamp(), leaf())
                    .prop_map(|(t, v)| json!({"value": v, "unit": "u", "timestamp": t})),
                leaf(),
            ]
        }

        pub(super) fn key() -> impl Strategy<Value = String> {
            prop_oneof![
                Just("t".to_owned()),
                Just("a".to_owned()),
                Just("timestamp".to_owned()),
                Just("status".to_owned()),
                r#"[a-z"é\\]{1,3}"#,
            ]
        }

        pub(super) fn stored() -> impl Strategy<Value = Option<String>> {
            let sensors = prop_oneof![
                prop::collection::btree_map(key(), sensor_obj(), 0..4)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
                leaf(),
            ];
            let status = prop_oneof![
                (stamp(), prop::collection::btree_map(key(), leaf(), 0..3)).prop_map(|(t, m)| {
                    let mut m: Map<String, Value> = m.into_iter().collect();
                    m.insert("timestamp".into(), t);
                    Value::Object(m)
                }),
                leaf(),
            ];
            let object = (
                prop::option::of(sensors),
                prop::option::of(status),
                prop::option::of(stamp()),
                prop::collection::btree_map("[a-z]{1,8}", leaf(), 0..3),
            )
                .prop_map(|(sensors, status, upload, other)| {
                    let mut m: Map<String, Value> = other.into_iter().collect();
                    for (k, v) in [
                        ("sensors", sensors),
                        ("status", status),
                        ("upload_timestamp", upload),
                    ] {
                        if let Some(v) = v {
                            m.insert(k.into(), v);
                        }
                    }
                    serde_json::to_string(&Value::Object(m)).unwrap()
                });
            prop_oneof![
                4 => object.prop_map(Some),
                1 => Just(None),
                1 => Just(Some("[1, 2]".to_owned())),
                1 => Just(Some("not json".to_owned())),
            ]
        }

        pub(super) fn update() -> impl Strategy<Value = Update> {
            let reading = (key(), -3i64..3, prop::option::of(stamp()));
            let data_msg = (
                0i64..20,
                prop::collection::vec(reading, 0..3),
                prop::option::of(prop::collection::btree_map(key(), leaf(), 0..3)),
                any::<bool>(),
            )
                .prop_map(|(secs, readings, status, located)| {
                    let mut u = data(secs, &[]);
                    if let Change::Data(r) = &mut u.change {
                        for (name, v, t) in readings {
                            let timestamp = match t {
                                Some(Value::String(t)) => ReadingTime::from(t),
                                _ => ReadingTime::Received(at(secs)),
                            };
                            r.sensors.insert(SensorReading::of(
                                Sensor::shared(&name, "°C", None),
                                Number::from(v).into(),
                                timestamp,
                            ));
                        }
                        r.status = status.map(|m| m.into_iter().collect());
                        if located {
                            r.location = Some(Box::new(Location {
                                latitude: Number::from(1),
                                longitude: Number::from_f64(-2.5).unwrap(),
                            }));
                        }
                    }
                    u
                });
            let status_msg = (
                0i64..20,
                prop::option::of(stamp()),
                prop::collection::btree_map(key(), leaf(), 0..3),
            )
                .prop_map(|(secs, t, m)| {
                    let mut fields: Map<String, Value> = m.into_iter().collect();
                    if let Some(t) = t {
                        fields.insert("timestamp".into(), t);
                    }
                    status(secs, Value::Object(fields))
                });
            prop_oneof![
                data_msg,
                status_msg,
                (0i64..20).prop_map(|secs| Update {
                    device: DeviceUuid::parse("d").unwrap(),
                    received_at: at(secs),
                    reading_time: None,
                    change: Change::Heartbeat,
                })
            ]
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(3000))]

            #[test]
            fn same_json_as_the_whole_tree_merge(stored in stored(), updates in prop::collection::vec(update(), 1..5)) {
                let mut state = DeviceState::from_row(stored.as_deref(), None, None, false, None);
                let mut expected = match stored.as_deref().map(serde_json::from_str::<Value>) {
                    Some(Ok(Value::Object(m))) => m,
                    _ => Map::new(),
                };
                for u in &updates {
                    // Status timestamps only decide when the reading time is a string.
                    let mut u = u.clone();
                    if u.reading_time.as_deref().is_some_and(|t| t.starts_with('"')) {
                        u.reading_time = None;
                    }
                    state.apply(&u);
                    reference::apply(&mut expected, &u);
                }
                let got = state.data_json();
                if stored.is_none() && expected.is_empty() {
                    prop_assert_eq!(got, None);
                } else {
                    // Same text, not only the same value: what was stored came from serde_json.
                    prop_assert_eq!(got, Some(serde_json::to_string(&expected).unwrap()));
                }
            }
        }
    }

    mod absorbing_equals_applying_in_order {
        use super::partial_parse_equals_reference::{key, leaf, stored, update};
        use super::*;
        use proptest::prelude::*;

        /// Times as the payload accepts them: RFC 3339, in the service's own format or a
        /// device's, close enough together to tie and to cross.
        fn valid_stamp() -> impl Strategy<Value = String> {
            prop_oneof![
                (0i64..12).prop_map(|s| at(s).to_rfc3339_opts(SecondsFormat::Millis, true)),
                (0i64..12).prop_map(|s| at(s)
                    .with_timezone(&Utc)
                    .to_rfc3339_opts(SecondsFormat::Millis, true)),
                (0i64..12).prop_map(|s| at(s)
                    .with_timezone(&FixedOffset::east_opt(8 * 3600).unwrap())
                    .to_rfc3339()),
            ]
        }

        /// Data messages and heartbeats with valid times (each maybe with a reading time), and
        /// status messages as [`update`] makes them.
        fn message() -> impl Strategy<Value = Update> {
            let reading = (
                prop_oneof![Just("t".to_owned()), Just("a".to_owned()), "[a-c]"],
                -3i64..3,
                prop::option::of(valid_stamp()),
            );
            let data_msg = (
                0i64..12,
                prop::collection::vec(reading, 0..3),
                prop::option::of((
                    prop::collection::btree_map(key(), leaf(), 0..3),
                    prop::option::of(prop::option::of(valid_stamp())),
                )),
                any::<bool>(),
                prop::option::of(valid_stamp()),
            )
                .prop_map(|(secs, readings, status, located, reading_time)| {
                    // Status fields may also set the status time, or remove it (null).
                    let status = status.map(|(mut fields, time)| {
                        if let Some(t) = time {
                            fields.insert("timestamp".into(), t.map_or(Value::Null, Value::from));
                        }
                        fields
                    });
                    let mut u = data(secs, &[]);
                    u.reading_time = reading_time.map(Into::into);
                    if let Change::Data(r) = &mut u.change {
                        r.sensors = readings
                            .into_iter()
                            .map(|(name, v, t)| {
                                let timestamp =
                                    t.map_or(ReadingTime::Received(at(secs)), ReadingTime::from);
                                SensorReading::of(
                                    Sensor::shared(&name, "u", None),
                                    Number::from(v).into(),
                                    timestamp,
                                )
                            })
                            .collect();
                        r.status = status.map(|m| m.into_iter().collect());
                        if located {
                            r.location = Some(Box::new(Location {
                                latitude: Number::from(secs),
                                longitude: Number::from(-secs),
                            }));
                        }
                    }
                    u
                });
            let heartbeat =
                (0i64..12, prop::option::of(valid_stamp())).prop_map(|(secs, t)| Update {
                    device: DeviceUuid::parse("d").unwrap(),
                    received_at: at(secs),
                    reading_time: t.map(Into::into),
                    change: Change::Heartbeat,
                });
            let status_msg =
                update().prop_filter("status messages", |u| matches!(u.change, Change::Status(_)));
            prop_oneof![4 => data_msg, 2 => heartbeat, 1 => status_msg]
        }

        fn view(s: &DeviceState) -> impl PartialEq + std::fmt::Debug {
            (
                s.data_json(),
                s.last_seen,
                s.last_heartbeat,
                s.is_online,
                s.device_status.clone(),
            )
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(4000))]

            #[test]
            fn absorbing_equals_applying_in_order(
                stored in stored(),
                seen in prop::option::of(0i64..12),
                heartbeat in prop::option::of(0i64..12),
                online in any::<bool>(),
                updates in prop::collection::vec(message(), 1..7),
            ) {
                let start = || DeviceState::from_row(
                    stored.as_deref(),
                    seen.map(|s| at(s).naive_local()),
                    heartbeat.map(|s| at(s).naive_local()),
                    online,
                    Some("was".into()),
                );
                let mut one_by_one = start();
                for u in &updates {
                    one_by_one.apply(u);
                }
                let mut folded: Vec<Update> = Vec::new();
                for u in updates.iter().cloned() {
                    let rest = match folded.last_mut() {
                        Some(last) => absorb(last, u).err(),
                        None => Some(u),
                    };
                    folded.extend(rest);
                }
                let mut together = start();
                for u in &folded {
                    together.apply(u);
                }
                prop_assert_eq!(view(&together), view(&one_by_one));
            }
        }

        #[test]
        fn folds_data_into_data_and_heartbeat_into_heartbeat_only() {
            let mut a = data(1, &[("t", 1.0, None), ("h", 5.0, None)]);
            assert!(absorb(&mut a, data(3, &[("t", 2.0, None)])).is_ok());
            let Change::Data(r) = &a.change else { panic!() };
            assert_eq!(r.sensors["t"].value, Number::from_f64(2.0).unwrap().into());
            assert_eq!(r.sensors["h"].value, Number::from_f64(5.0).unwrap().into());
            assert_eq!(a.received_at, at(3));
            // An older reading that arrives later does not replace the newer one.
            assert!(absorb(&mut a, data(9, &[("t", 0.0, Some("2020-01-01T00:00:00Z"))])).is_ok());
            let Change::Data(r) = &a.change else { panic!() };
            assert_eq!(r.sensors["t"].value, Number::from_f64(2.0).unwrap().into());
            let beat = |secs| Update {
                device: DeviceUuid::parse("d").unwrap(),
                received_at: at(secs),
                reading_time: None,
                change: Change::Heartbeat,
            };
            assert!(absorb(&mut a, beat(10)).is_err());
            assert!(absorb(&mut a, status(10, json!({"battery": 1}))).is_err());
            let mut other = data(10, &[]);
            other.device = DeviceUuid::parse("D").unwrap();
            assert!(
                absorb(&mut a, other).is_err(),
                "another id, if only by case"
            );
            let mut stamped = data(10, &[]);
            if let Change::Data(r) = &mut stamped.change {
                r.status = Some(vec![("timestamp".into(), json!("2025-12-17T19:34:00Z"))].into());
            }
            assert!(absorb(&mut a, stamped).is_err(), "moves the status time");
            let mut b = beat(1);
            assert!(absorb(&mut b, beat(2)).is_ok());
            assert_eq!(b.received_at, at(2));
        }
    }
}
