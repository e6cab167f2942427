//! Payload handling, pure and without I/O: repair, detect the format, normalize and validate.
//!
//! Input is a topic kind, a device and the raw bytes; output is either an [`Accepted`] update
//! (with the parts that were skipped and why) or a [`Rejection`]. A bad part of a message never
//! sinks the good parts; a message with nothing valid is rejected.

use std::collections::HashMap;
use std::ops::RangeInclusive;

use chrono::{DateTime, FixedOffset, Utc};
use serde_json::{Number, Value};

use crate::intake::json::{self, Json, Object};
use crate::intake::model::{
    Change, DataReport, DeviceTime, DeviceUuid, Location, ReadingTime, Sensor, SensorReading,
    SensorValue, StatusReport, StatusTime, TopicKind, Update,
};
use crate::intake::rejection::Rejection;
use crate::intake::timestamp::{self, TimeRules, Undatable};

/// Whether `name` passes the seed's sensor-name rule, `^[a-z][a-z0-9_]{0,49}$`: lower-case
/// letters, digits and `_`, 1–50 long, not starting with a digit or `_`.
///
/// Written out rather than run through the `regex` crate: it is checked for every reading of
/// every message, and the regex engine spent about 400 instructions a name on it (callgrind,
/// `mqtt-ingest-intake-cost`) where this loop spends a few per byte. A property test holds the
/// two to the same answers.
pub fn valid_sensor_name(name: &str) -> bool {
    let b = name.as_bytes();
    !b.is_empty()
        && b.len() <= 50
        && b[0].is_ascii_lowercase()
        && b[1..].iter().all(|&c| SENSOR_NAME_BYTES[usize::from(c)])
}

/// The bytes a sensor name may hold after its first, as a table: looked up once per byte of
/// every reading's name (three range tests cost about twice as many instructions per byte).
static SENSOR_NAME_BYTES: [bool; 256] = {
    let mut table = [false; 256];
    let mut b = 0;
    while b < 256 {
        let c = b as u8;
        table[b] = c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'_';
        b += 1;
    }
    table
};

/// Keys of a simple-format message that are never readings: the reading time, the device's
/// own name, the sensor's type, and the two keys the Python service also passed over.
/// [`is_metadata`] answers for them (a property test holds it to this list).
#[cfg(test)]
const SIMPLE_FORMAT_METADATA: [&str; 5] =
    ["timestamp", "device_id", "sensor", "status", "location"];

/// Whether `name` is a key of a simple-format message that is never a reading (`timestamp`,
/// `device_id`, `sensor`, `status`, `location`), by its length first: most members are
/// readings, and a length rules them out without comparing any text.
fn is_metadata(name: &str) -> bool {
    match name.len() {
        9 => name == "timestamp" || name == "device_id",
        6 => name == "sensor" || name == "status",
        8 => name == "location",
        _ => false,
    }
}

/// Configurable validation rules.
#[derive(Debug, Clone, PartialEq)]
pub struct Rules {
    /// Payloads larger than this many bytes are rejected.
    pub max_payload_bytes: usize,
    /// Allowed value range per sensor name; numeric readings outside are skipped.
    pub sensor_ranges: HashMap<String, RangeInclusive<f64>>,
    /// How device timestamps are read.
    pub time: TimeRules,
    /// Sensor names changed on the way in (`SENSOR_RENAMES` with `SENSOR_RENAMES_IN=everywhere`;
    /// by default the renames apply to `device_sensors` only, at the write).
    pub renames: Renames,
}

impl Default for Rules {
    fn default() -> Self {
        Self {
            max_payload_bytes: 256 * 1024,
            sensor_ranges: HashMap::new(),
            time: TimeRules::default(),
            // The firmware's own names reach last_report_data (SENSOR_RENAMES_IN).
            renames: Renames::default(),
        }
    }
}

/// One rename: a reading called `from` (of a sensor of type `sensor_type`, or of any type)
/// is stored as `to`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Rename {
    /// Upper-cased; `None` for every type.
    sensor_type: Option<String>,
    from: String,
    to: String,
}

/// Sensor names changed on the way in (`SENSOR_RENAMES`), before names are checked: the
/// names a deployment's readers expect, whatever a board calls them.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Renames(Vec<Rename>);

impl Renames {
    /// CodeHubot's current names for the rain board (`is_raining` → `rain`, `level` →
    /// `rain_level`), which its backend and plugin service read from `device_sensors`.
    pub const CODEHUBOT: &'static str = "RAIN_SENSOR:is_raining=rain,RAIN_SENSOR:level=rain_level";

    /// [`Self::CODEHUBOT`], parsed.
    pub fn codehubot() -> Self {
        // A constant known to parse; the unit test `renames_parse_and_apply` checks it.
        Self::parse(Self::CODEHUBOT).unwrap_or_default()
    }

    /// Parses `TYPE:from=to,…`; `*:from=to` or `from=to` renames for every sensor type.
    pub fn parse(spec: &str) -> Result<Self, String> {
        let mut all = Vec::new();
        for item in spec.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let bad = || format!("{item:?} is not TYPE:from=to (or *:from=to)");
            let (scope, pair) = match item.split_once(':') {
                Some((t, pair)) => (t.trim(), pair),
                None => ("*", item),
            };
            let (from, to) = pair.split_once('=').ok_or_else(bad)?;
            let (from, to) = (from.trim(), to.trim());
            if scope.is_empty() || from.is_empty() || from.contains(['=', ':']) {
                return Err(bad());
            }
            if !valid_sensor_name(to) {
                return Err(format!(
                    "{item:?}: {to:?} is not a valid sensor name (1-50 of [a-z0-9_], starting with a letter)"
                ));
            }
            all.push(Rename {
                sensor_type: (scope != "*").then(|| scope.to_ascii_uppercase()),
                from: from.to_owned(),
                to: to.to_owned(),
            });
        }
        Ok(Self(all))
    }

    /// Whether there is no rename.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The new name of a reading called `name`, of a sensor of type `sensor_type`, if a rename
    /// applies (borrowing: nothing is allocated for the names that stay).
    pub fn rename(&self, sensor_type: &str, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|r| {
                r.from == name
                    && r.sensor_type
                        .as_deref()
                        .is_none_or(|t| t.eq_ignore_ascii_case(sensor_type))
            })
            .map(|r| r.to.as_str())
    }
}

/// Where `SENSOR_RENAMES` apply (`SENSOR_RENAMES_IN`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RenameScope {
    /// In `device_sensors` only, the table CodeHubot's current backend reads by those names;
    /// `last_report_data` and history keep the firmware's names (`is_raining`, `level`), which
    /// the Python service of the seed's version stored there and the frontend's product
    /// definitions read.
    #[default]
    DeviceSensors,
    /// Everywhere: the readings are renamed on the way in.
    Everywhere,
}

impl RenameScope {
    /// Parses `device_sensors` or `everywhere`.
    pub fn parse(raw: &str) -> Result<Self, String> {
        match raw.trim() {
            "device_sensors" => Ok(Self::DeviceSensors),
            "everywhere" => Ok(Self::Everywhere),
            other => Err(format!(
                "must be device_sensors or everywhere, got {other:?}"
            )),
        }
    }
}

/// Allowed value range per sensor name (`INGEST_SENSOR_RANGES`).
pub type SensorRanges = HashMap<String, RangeInclusive<f64>>;

/// Parses `humidity:0..100,battery:0..100` into per-sensor ranges.
pub fn parse_sensor_ranges(spec: &str) -> Result<SensorRanges, String> {
    let mut ranges = HashMap::new();
    for item in spec.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let (name, range) = item
            .split_once(':')
            .ok_or_else(|| format!("{item:?} is not NAME:MIN..MAX"))?;
        let name = name.trim();
        if !valid_sensor_name(name) {
            return Err(format!("{name:?} is not a valid sensor name"));
        }
        let (lo, hi) = range
            .split_once("..")
            .ok_or_else(|| format!("{item:?} is not NAME:MIN..MAX"))?;
        let parse = |s: &str| -> Result<f64, String> {
            let v: f64 = s
                .trim()
                .parse()
                .map_err(|_| format!("{s:?} in {item:?} is not a number"))?;
            if v.is_finite() {
                Ok(v)
            } else {
                Err(format!("{s:?} in {item:?} is not finite"))
            }
        };
        let (lo, hi) = (parse(lo)?, parse(hi)?);
        if lo > hi {
            return Err(format!("{item:?}: minimum is above maximum"));
        }
        ranges.insert(name.to_owned(), lo..=hi);
    }
    Ok(ranges)
}

/// A part of a message that was left out, and why (logged as a warning naming the device).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Skipped {
    /// Which part: `sensor "123abc"`, `location`, `status`, …
    pub part: String,
    /// Why it was left out.
    pub reason: String,
    /// For a sensor left out for its name: the name (bounded and escaped for a log line).
    pub bad_name: Option<String>,
}

/// Why a sensor name is refused (the seed's rule).
const NAME_RULE: &str =
    "name must be 1-50 of [a-z0-9_] and start with a letter (e.g. temperature, sensor_1)";

/// A device timestamp that dated nothing: the readings it came with kept the receive time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UndatedTimestamp {
    /// Which one: `timestamp`, `sensors[2].timestamp` (a constant where it can be: every
    /// firmware message has one).
    pub part: std::borrow::Cow<'static, str>,
    /// Why it dated nothing.
    pub reason: Undatable,
    /// The value, for a log line.
    pub shown: ShownValue,
}

/// A value from the payload as a log line shows it. Built for every firmware message (their
/// uptime counters date nothing) and rendered only for the few that are warned about, so a
/// number is kept as it is rather than written out each time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ShownValue {
    /// A number, a boolean or null, as JSON writes it.
    Scalar(Value),
    /// Text, bounded and escaped, in quotes.
    Text(String),
    /// An array.
    Array,
    /// An object.
    Object,
}

impl std::fmt::Display for ShownValue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ShownValue::Scalar(v) => write!(f, "{v}"),
            ShownValue::Text(t) => f.write_str(t),
            ShownValue::Array => f.write_str("an array"),
            ShownValue::Object => f.write_str("an object"),
        }
    }
}

/// A message's timestamps that dated nothing.
pub type Undated = smallvec::SmallVec<[UndatedTimestamp; 1]>;

/// A message that yielded an update.
#[derive(Debug, Clone, PartialEq)]
pub struct Accepted {
    /// What to write.
    pub update: Update,
    /// The parts that were skipped.
    pub skipped: Vec<Skipped>,
    /// Timestamps that dated nothing (the firmware's uptime counters, garbage, far future).
    /// Room for one without an allocation: every firmware message has one.
    pub undated: Undated,
}

/// The only repairs made ("JSON auto-check and repair"): a leading UTF-8 BOM, trailing NUL bytes
/// (firmware that sends `sizeof` instead of `strlen`) and surrounding whitespace.
pub fn repair(bytes: &[u8]) -> &[u8] {
    let bytes = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(bytes);
    let end = bytes
        .iter()
        .rposition(|&b| b != 0 && !b.is_ascii_whitespace())
        .map_or(0, |i| i + 1);
    let bytes = &bytes[..end];
    let start = bytes
        .iter()
        .position(|b| !b.is_ascii_whitespace())
        .unwrap_or(bytes.len());
    &bytes[start..]
}

/// What reading one message needs besides its bytes.
struct Reader<'a> {
    rules: &'a Rules,
    /// The receive time, in the database's zone.
    received: DateTime<FixedOffset>,
    skipped: Vec<Skipped>,
    undated: Undated,
    /// The last device text that dated anything, as kept: a message's readings often carry
    /// the message's own time, which is then read once and shared.
    dated: Option<DeviceTime>,
}

impl Reader<'_> {
    /// The reading time of readings the device did not date.
    fn received(&self) -> ReadingTime {
        ReadingTime::received(self.received)
    }

    fn skip(&mut self, part: String, reason: impl Into<String>) {
        self.skipped.push(Skipped {
            part,
            reason: reason.into(),
            bad_name: None,
        });
    }

    /// Whether `name` is a valid sensor name; notes it as skipped if not.
    fn name_ok(&mut self, name: &str) -> bool {
        let ok = valid_sensor_name(name);
        if !ok {
            self.skipped.push(Skipped {
                part: format!("sensor {}", shown(name)),
                reason: NAME_RULE.into(),
                bad_name: Some(bounded(name)),
            });
        }
        ok
    }

    /// A timestamp field as a reading time, or `None` (absent, null, or dating nothing, which
    /// is noted).
    fn time(
        &mut self,
        part: impl FnOnce() -> std::borrow::Cow<'static, str>,
        value: Option<&Json<'_>>,
    ) -> Option<DeviceTime> {
        let value = value.filter(|v| !v.is_null())?;
        // Text that reads as the last kept reads the same (kept text is RFC 3339 that dated
        // something at this receive time).
        if let (Json::Str(text), Some(last)) = (value, &self.dated)
            && **last == **text
        {
            return Some(last.clone());
        }
        match timestamp::read(value, self.received, &self.rules.time) {
            Ok(text) => {
                let text = DeviceTime::from(text);
                self.dated = Some(text.clone());
                Some(text)
            }
            Err(reason) => {
                self.undated.push(UndatedTimestamp {
                    part: part(),
                    reason,
                    shown: shown_value(value),
                });
                None
            }
        }
    }
}

/// Turns one message into an update, or says why not.
pub fn process(
    kind: TopicKind,
    device: DeviceUuid,
    payload: &[u8],
    received_at: DateTime<Utc>,
    rules: &Rules,
) -> Result<Accepted, Rejection> {
    if payload.len() > rules.max_payload_bytes {
        return Err(Rejection::TooLarge {
            size: payload.len(),
            limit: rules.max_payload_bytes,
        });
    }
    let text = std::str::from_utf8(repair(payload)).map_err(|_| Rejection::NotUtf8)?;
    let received = rules.time.zone.at(received_at);
    let mut r = Reader {
        rules,
        received,
        skipped: Vec::new(),
        undated: Undated::new(),
        dated: None,
    };
    let mut reading_time = None;
    let change = match kind {
        // A heartbeat carries no data the service keeps: an empty one is fine.
        TopicKind::Heartbeat if text.is_empty() => Change::Heartbeat,
        TopicKind::Heartbeat => {
            let [timestamp] = picked(text, ["timestamp"])?;
            reading_time = r.time(|| "timestamp".into(), timestamp.as_ref());
            Change::Heartbeat
        }
        // A status is kept whole, as its text (merged into the stored `status` when it is
        // written): only its `timestamp` and `status` are read here.
        TopicKind::Status => {
            let [timestamp, status] = picked(text, ["timestamp", "status"])?;
            reading_time = r.time(|| "timestamp".into(), timestamp.as_ref());
            Change::Status(status_report(text, status.as_ref(), &mut r))
        }
        TopicKind::Data => {
            let object = parse_object(text)?;
            let [timestamp, sensors] = object.pick(["timestamp", "sensors"]);
            reading_time = r.time(|| "timestamp".into(), timestamp);
            let report = match sensors {
                Some(Json::Array(entries)) => full_format(&object, entries, &mut r),
                _ => simple_format(&object, reading_time.as_ref(), &mut r),
            };
            if report.sensors.is_empty() && report.status.is_none() && report.location.is_none() {
                return Err(Rejection::NoValidData(summarize(&r.skipped)));
            }
            Change::Data(report)
        }
    };
    Ok(Accepted {
        update: Update {
            device,
            received_at: received,
            reading_time,
            change,
        },
        skipped: r.skipped,
        undated: r.undated,
    })
}

/// The members `names` of the payload's object (the last of a name given twice), the rest
/// checked and skipped ([`json::pick`]) instead of being built and dropped; or why the payload
/// is refused, which the full reading ([`parse_object`]) says.
fn picked<'a, const N: usize>(
    text: &'a str,
    names: [&str; N],
) -> Result<[Option<Json<'a>>; N], Rejection> {
    if let Ok(picked) = json::pick(text, names) {
        return Ok(picked);
    }
    // The two accept the same texts (a property test in `json`): this is the reason.
    parse_object(text).map(|object| names.map(|name| object.get(name).cloned()))
}

/// The payload as a JSON object, names and strings borrowed from `text`; or why not.
fn parse_object(text: &str) -> Result<Object<'_>, Rejection> {
    if text.is_empty() {
        return Err(Rejection::NotJson("empty payload".into()));
    }
    match json::parse(text) {
        Ok(Json::Object(object)) => Ok(object),
        Ok(_) => Err(Rejection::NotObject),
        Err(e) => Err(Rejection::NotJson(e.to_string())),
    }
}

fn summarize(skipped: &[Skipped]) -> String {
    if skipped.is_empty() {
        return "no sensors".into();
    }
    const SHOWN: usize = 3;
    let mut s = skipped
        .iter()
        .take(SHOWN)
        .map(|k| format!("{}: {}", k.part, k.reason))
        .collect::<Vec<_>>()
        .join("; ");
    if skipped.len() > SHOWN {
        s.push_str(&format!("; and {} more", skipped.len() - SHOWN));
    }
    s
}

/// At most this many characters of a name or value from the payload reach a log line.
const SHOWN_CHARS: usize = 40;

/// A printable, bounded rendering of a name from the payload (it may be huge or hostile), in
/// quotes.
pub fn shown(name: &str) -> String {
    format!("\"{}\"", bounded(name))
}

/// A name from the payload cut to [`SHOWN_CHARS`] and escaped to one printable line.
fn bounded(name: &str) -> String {
    let mut out: String = name
        .chars()
        .take(SHOWN_CHARS)
        .collect::<String>()
        .escape_debug()
        .to_string();
    if name.chars().nth(SHOWN_CHARS).is_some() {
        out.push('…');
    }
    out
}

/// A bounded rendering of a JSON value from the payload.
fn shown_value(value: &Json<'_>) -> ShownValue {
    match value {
        Json::Str(s) => ShownValue::Text(shown(s)),
        Json::Array(_) => ShownValue::Array,
        Json::Object(_) => ShownValue::Object,
        other => ShownValue::Scalar(other.to_value()),
    }
}

/// The full ("HTTP API") format: `{"sensors": [...], "status": {...}, "location": {...}}`.
fn full_format(object: &Object<'_>, entries: &[Json<'_>], r: &mut Reader<'_>) -> DataReport {
    let mut report = DataReport::default();
    let mut readings = Vec::with_capacity(entries.len());
    for (i, entry) in entries.iter().enumerate() {
        let Json::Object(entry) = entry else {
            r.skip(format!("sensors[{i}]"), "not an object");
            continue;
        };
        let [sensor_type, name, unit, timestamp, value] =
            entry.pick(["sensor_type", "sensor_name", "unit", "timestamp", "value"]);
        let sensor_type = match sensor_type {
            Some(Json::Str(t)) if !t.is_empty() => Some(t.as_ref()),
            _ => None,
        };
        let name = match name {
            Some(Json::Str(name)) => r
                .rules
                .renames
                .rename(sensor_type.unwrap_or(""), name)
                .unwrap_or(name),
            Some(_) => {
                r.skip(format!("sensors[{i}]"), "sensor_name is not a string");
                continue;
            }
            None => {
                r.skip(format!("sensors[{i}]"), "sensor_name is missing");
                continue;
            }
        };
        if !r.name_ok(name) {
            continue;
        }
        // Built only when a part is skipped: formatting it for every sensor costs.
        let part = || format!("sensor {}", shown(name));
        let unit = match unit {
            None | Some(Json::Null) => "",
            Some(Json::Str(unit)) => unit.as_ref(),
            Some(_) => {
                r.skip(part(), "unit is not a string");
                continue;
            }
        };
        let timestamp = match r.time(|| format!("sensors[{i}].timestamp").into(), timestamp) {
            Some(t) => ReadingTime::Device(t),
            None => r.received(),
        };
        let value = value.unwrap_or(&Json::Null);
        match reading(name, value, unit, timestamp, sensor_type, r.rules) {
            Ok(reading) => readings.push(reading),
            Err(reason) => r.skip(part(), reason),
        }
    }
    report.sensors = readings.into_iter().collect();
    let [status, located] = object.pick(["status", "location"]);
    match status {
        None | Some(Json::Null) => {}
        // A vector holds a few fields in far less memory than a map; sized exactly (an update
        // may wait a while) and in key order (a fold finds a field by binary search).
        Some(Json::Object(status)) => {
            let time = status
                .get("timestamp")
                .and_then(|t| r.time(|| "status.timestamp".into(), Some(t)));
            let mut fields = Vec::with_capacity(status.len());
            for (name, value) in status.iter() {
                let value = if name == "timestamp" {
                    let sent_text = matches!(value, Json::Str(_));
                    match StatusTime::of(sent_text, time.as_deref()) {
                        StatusTime::Read(t) => Value::String(t.to_owned()),
                        StatusTime::Dropped => continue,
                        StatusTime::AsSent => value.to_value(),
                    }
                } else {
                    value.to_value()
                };
                fields.push((name.to_owned(), value));
            }
            fields.sort_unstable_by(|a, b| a.0.cmp(&b.0));
            report.status = Some(fields.into_boxed_slice());
        }
        Some(_) => r.skip("status".into(), "not an object"),
    }
    match located {
        None | Some(Json::Null) => {}
        Some(value) => match location(value) {
            Ok(l) => report.location = Some(Box::new(l)),
            Err(reason) => r.skip("location".into(), reason),
        },
    }
    report
}

/// The simple format: every key a sensor name, every value a number or a boolean, all read at
/// the message's `timestamp` when it dates anything. Strings are metadata, not readings (the
/// firmware sends `"device_id":"AIOT-ESP32-…"` and `"sensor":"DHT11"`, the sensor's type,
/// beside its readings): passed over without a warning.
fn simple_format(
    object: &Object<'_>,
    reading_time: Option<&DeviceTime>,
    r: &mut Reader<'_>,
) -> DataReport {
    let mut report = DataReport::default();
    let timestamp = match reading_time {
        Some(t) => ReadingTime::Device(t.clone()),
        None => r.received(),
    };
    let sensor_type = match object.get("sensor") {
        Some(Json::Str(t)) if !t.is_empty() => Some(t.as_ref()),
        _ => None,
    };
    let is_reading =
        |name: &str, value: &Json<'_>| !is_metadata(name) && !matches!(value, Json::Str(_));
    let members = || object.iter().filter(|(n, v)| is_reading(n, v));
    // Sized for the readings, not the members: the vector is kept while the update waits.
    let mut readings = Vec::with_capacity(members().count());
    let renaming = !r.rules.renames.is_empty();
    let mut read = |name: &str, value: &Json<'_>| {
        let name = r
            .rules
            .renames
            .rename(sensor_type.unwrap_or(""), name)
            .unwrap_or(name);
        if !r.name_ok(name) {
            return;
        }
        match reading(name, value, "", timestamp.clone(), sensor_type, r.rules) {
            Ok(reading) => readings.push(reading),
            Err(reason) => r.skip(format!("sensor {}", shown(name)), reason),
        }
    };
    if !renaming {
        for (name, value) in members() {
            read(name, value);
        }
    } else {
        // Two keys may become one name (`rain`, and `is_raining` renamed to it): the one whose
        // key sorts last wins, whatever the payload's order, so the members go in name order.
        let mut sorted: Vec<_> = members().collect();
        sorted.sort_by(|a, b| json::name_cmp(a.0, b.0));
        for (name, value) in sorted {
            read(name, value);
        }
    }
    report.sensors = readings.into_iter().collect();
    report
}

fn reading(
    name: &str,
    value: &Json<'_>,
    unit: &str,
    timestamp: ReadingTime,
    sensor_type: Option<&str>,
    rules: &Rules,
) -> Result<SensorReading, String> {
    let value = match value {
        Json::Bool(b) => SensorValue::Bool(*b),
        Json::Number(n) => {
            let v = finite(n).ok_or("value is not a finite number")?;
            if let Some(range) = rules.sensor_ranges.get(name)
                && !range.contains(&v)
            {
                return Err(format!(
                    "value {v} outside the configured range {}..{}",
                    range.start(),
                    range.end()
                ));
            }
            SensorValue::Number(normalize_zero(n.clone()))
        }
        Json::Null => return Err("value is missing".into()),
        other => {
            return Err(format!(
                "value must be a number or a boolean, got {}",
                type_name(other)
            ));
        }
    };
    Ok(SensorReading::of(
        Sensor::shared(name, unit, sensor_type),
        value,
        timestamp,
    ))
}

fn location(value: &Json<'_>) -> Result<Location, String> {
    let Json::Object(map) = value else {
        return Err("not an object".into());
    };
    let coordinate = |key: &str, limit: f64| -> Result<Number, String> {
        match map.get(key) {
            Some(Json::Number(n)) => match finite(n) {
                Some(v) if v.abs() <= limit => Ok(normalize_zero(n.clone())),
                _ => Err(format!("{key} outside -{limit}..{limit}")),
            },
            Some(other) => Err(format!("{key} must be a number, got {}", type_name(other))),
            None => Err(format!("{key} is missing")),
        }
    };
    Ok(Location {
        latitude: coordinate("latitude", 90.0)?,
        longitude: coordinate("longitude", 180.0)?,
    })
}

fn finite(n: &Number) -> Option<f64> {
    n.as_f64().filter(|v| v.is_finite())
}

/// `-0` and `-0.0` are stored as `0`: a negative zero has no meaning for a reading and some
/// JSON consumers render it oddly.
fn normalize_zero(n: Number) -> Number {
    if n.as_f64() == Some(0.0) && n.to_string().starts_with('-') {
        if n.is_f64() {
            Number::from_f64(0.0).unwrap_or_else(|| Number::from(0))
        } else {
            Number::from(0)
        }
    } else {
        n
    }
}

fn type_name(v: &Json<'_>) -> &'static str {
    match v {
        Json::Null => "null",
        Json::Bool(_) => "a boolean",
        Json::Number(_) => "a number",
        Json::Str(_) => "a string",
        Json::Array(_) => "an array",
        Json::Object(_) => "an object",
    }
}

/// A status message: merged whole into `status`; its `status` scalar, if any, becomes
/// `device_status`; any status but `"offline"` marks the device online.
fn status_report(text: &str, status: Option<&Json<'_>>, r: &mut Reader<'_>) -> StatusReport {
    let device_status = match status {
        None | Some(Json::Null) => None,
        Some(Json::Str(s)) => Some(s.as_ref().to_owned()),
        Some(Json::Number(n)) => Some(n.to_string()),
        Some(Json::Bool(b)) => Some(b.to_string()),
        Some(other) => {
            r.skip(
                "status.status".into(),
                format!(
                    "{} is not a scalar; device_status unchanged",
                    type_name(other)
                ),
            );
            None
        }
    };
    StatusReport {
        object: text.into(),
        device_status: device_status.map(Into::into),
    }
}

#[cfg(test)]
mod tests;
