//! Payload handling, pure and without I/O: repair, detect the format, normalize and validate.
//!
//! Input is a topic kind, a device and the raw bytes; output is either an [`Accepted`] update
//! (with the parts that were skipped and why) or a [`Rejection`]. A bad part of a message never
//! sinks the good parts; a message with nothing valid is rejected.

use std::collections::HashMap;
use std::ops::RangeInclusive;
use std::sync::LazyLock;

use chrono::{DateTime, SecondsFormat, Utc};
use regex::Regex;
use serde_json::{Map, Number, Value};

use crate::model::{
    Change, DataReport, DeviceUuid, Location, SensorReading, StatusReport, TopicKind, Update,
};
use crate::rejection::Rejection;

/// The seed's sensor-name rule: lower-case letters, digits and `_`, 1–50 long, not starting
/// with a digit.
static SENSOR_NAME: LazyLock<Regex> = LazyLock::new(|| {
    // The pattern is a literal that is known to compile; a failure here is a programming error.
    Regex::new(r"^[a-z][a-z0-9_]{0,49}$").expect("sensor name pattern compiles")
});

/// Longest `device_status` text accepted (the backend's column is `VARCHAR(50)`).
pub const DEVICE_STATUS_MAX_CHARS: usize = 50;

/// Configurable validation rules.
#[derive(Debug, Clone, PartialEq)]
pub struct Rules {
    /// Payloads larger than this many bytes are rejected.
    pub max_payload_bytes: usize,
    /// Allowed value range per sensor name; readings outside are skipped.
    pub sensor_ranges: HashMap<String, RangeInclusive<f64>>,
}

impl Default for Rules {
    fn default() -> Self {
        Self {
            max_payload_bytes: 256 * 1024,
            sensor_ranges: HashMap::new(),
        }
    }
}

/// Parses `humidity:0..100,battery:0..100` into per-sensor ranges.
pub fn parse_sensor_ranges(spec: &str) -> Result<HashMap<String, RangeInclusive<f64>>, String> {
    let mut ranges = HashMap::new();
    for item in spec.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let (name, range) = item
            .split_once(':')
            .ok_or_else(|| format!("{item:?} is not NAME:MIN..MAX"))?;
        let name = name.trim();
        if !SENSOR_NAME.is_match(name) {
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
}

/// A message that yielded an update.
#[derive(Debug, Clone, PartialEq)]
pub struct Accepted {
    /// What to write.
    pub update: Update,
    /// The parts that were skipped.
    pub skipped: Vec<Skipped>,
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
    let mut skipped = Vec::new();
    let mut reading_time = None;
    let change = match kind {
        // A heartbeat carries no data the service keeps: an empty one is fine.
        TopicKind::Heartbeat if text.is_empty() => Change::Heartbeat,
        TopicKind::Heartbeat => {
            reading_time = timestamp_of(&parse_object(text)?);
            Change::Heartbeat
        }
        TopicKind::Status => {
            let object = parse_object(text)?;
            reading_time = timestamp_of(&object);
            Change::Status(status_report(object, &mut skipped))
        }
        TopicKind::Data => {
            let object = parse_object(text)?;
            reading_time = timestamp_of(&object);
            let receive_time = received_at.to_rfc3339_opts(SecondsFormat::Millis, true);
            let report = match object.get("sensors") {
                Some(Value::Array(_)) => full_format(object, &receive_time, rules, &mut skipped),
                _ => simple_format(object, &receive_time, rules, &mut skipped),
            };
            if report.sensors.is_empty() && report.status.is_none() && report.location.is_none() {
                return Err(Rejection::NoValidData(summarize(&skipped)));
            }
            Change::Data(report)
        }
    };
    Ok(Accepted {
        update: Update {
            device,
            received_at,
            reading_time,
            change,
        },
        skipped,
    })
}

/// The payload's top-level `timestamp`, if it is RFC 3339.
fn timestamp_of(object: &Map<String, Value>) -> Option<String> {
    match object.get("timestamp") {
        Some(Value::String(t)) if is_rfc3339(t) => Some(t.clone()),
        _ => None,
    }
}

fn parse_object(text: &str) -> Result<Map<String, Value>, Rejection> {
    if text.is_empty() {
        return Err(Rejection::NotJson("empty payload".into()));
    }
    match serde_json::from_str::<Value>(text) {
        Ok(Value::Object(map)) => Ok(map),
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

/// A printable, bounded rendering of a name from the payload (it may be huge or hostile).
fn shown(name: &str) -> String {
    const MAX: usize = 40;
    let mut out: String = name
        .chars()
        .take(MAX)
        .collect::<String>()
        .escape_debug()
        .to_string();
    if name.chars().nth(MAX).is_some() {
        out.push('…');
    }
    format!("\"{out}\"")
}

fn skip(skipped: &mut Vec<Skipped>, part: String, reason: impl Into<String>) {
    skipped.push(Skipped {
        part,
        reason: reason.into(),
    });
}

/// The full ("HTTP API") format: `{"sensors": [...], "status": {...}, "location": {...}}`.
fn full_format(
    mut object: Map<String, Value>,
    receive_time: &str,
    rules: &Rules,
    skipped: &mut Vec<Skipped>,
) -> DataReport {
    let mut report = DataReport::default();
    let mut readings = Vec::new();
    if let Some(Value::Array(entries)) = object.remove("sensors") {
        readings.reserve(entries.len());
        for (i, entry) in entries.into_iter().enumerate() {
            let Value::Object(mut entry) = entry else {
                skip(skipped, format!("sensors[{i}]"), "not an object");
                continue;
            };
            let name = match entry.remove("sensor_name") {
                Some(Value::String(name)) => name,
                Some(_) => {
                    skip(
                        skipped,
                        format!("sensors[{i}]"),
                        "sensor_name is not a string",
                    );
                    continue;
                }
                None => {
                    skip(skipped, format!("sensors[{i}]"), "sensor_name is missing");
                    continue;
                }
            };
            // Built only when a part is skipped: formatting it for every sensor costs.
            let part = || format!("sensor {}", shown(&name));
            let unit = match entry.remove("unit") {
                None | Some(Value::Null) => String::new(),
                Some(Value::String(unit)) => unit,
                Some(_) => {
                    skip(skipped, part(), "unit is not a string");
                    continue;
                }
            };
            let timestamp = match entry.remove("timestamp") {
                None | Some(Value::Null) => receive_time.to_owned(),
                Some(Value::String(t)) if is_rfc3339(&t) => t,
                Some(_) => {
                    skip(skipped, part(), "timestamp is not RFC 3339");
                    continue;
                }
            };
            let value = entry.remove("value").unwrap_or(Value::Null);
            match reading(&name, value, unit, timestamp, rules) {
                Ok(r) => readings.push((name, r)),
                Err(reason) => skip(skipped, part(), reason),
            }
        }
    }
    report.sensors = readings.into_iter().collect();
    match object.remove("status") {
        None | Some(Value::Null) => {}
        // In key order, as the map kept them; a vector holds a few fields in far less memory.
        Some(Value::Object(status)) => report.status = Some(status.into_iter().collect()),
        Some(_) => skip(skipped, "status".into(), "not an object"),
    }
    match object.remove("location") {
        None | Some(Value::Null) => {}
        Some(value) => match location(&value) {
            Ok(l) => report.location = Some(l),
            Err(reason) => skip(skipped, "location".into(), reason),
        },
    }
    report
}

/// The simple format: every key a sensor name, every value a number; `timestamp` is the
/// reading time of all of them.
fn simple_format(
    mut object: Map<String, Value>,
    receive_time: &str,
    rules: &Rules,
    skipped: &mut Vec<Skipped>,
) -> DataReport {
    let mut report = DataReport::default();
    let timestamp = match object.remove("timestamp") {
        None | Some(Value::Null) => receive_time.to_owned(),
        Some(Value::String(t)) if is_rfc3339(&t) => t,
        Some(_) => {
            // Without a trustworthy reading time the readings are not stored at all, rather
            // than stamped with a time the device did not mean.
            skip(
                skipped,
                "timestamp".into(),
                "not RFC 3339; readings dropped",
            );
            return report;
        }
    };
    let mut readings = Vec::with_capacity(object.len());
    for (name, value) in object {
        match reading(&name, value, String::new(), timestamp.clone(), rules) {
            Ok(r) => readings.push((name, r)),
            Err(reason) => skip(skipped, format!("sensor {}", shown(&name)), reason),
        }
    }
    report.sensors = readings.into_iter().collect();
    report
}

fn reading(
    name: &str,
    value: Value,
    unit: String,
    timestamp: String,
    rules: &Rules,
) -> Result<SensorReading, String> {
    if !SENSOR_NAME.is_match(name) {
        return Err(
            "name must be 1-50 of [a-z0-9_] and start with a letter (e.g. temperature, sensor_1)"
                .into(),
        );
    }
    let Value::Number(value) = value else {
        return Err(format!("value must be a number, got {}", type_name(&value)));
    };
    let v = finite(&value).ok_or("value is not a finite number")?;
    if let Some(range) = rules.sensor_ranges.get(name)
        && !range.contains(&v)
    {
        return Err(format!(
            "value {v} outside the configured range {}..{}",
            range.start(),
            range.end()
        ));
    }
    Ok(SensorReading {
        value: normalize_zero(value),
        unit,
        timestamp,
    })
}

fn location(value: &Value) -> Result<Location, String> {
    let Value::Object(map) = value else {
        return Err("not an object".into());
    };
    let coordinate = |key: &str, limit: f64| -> Result<Number, String> {
        match map.get(key) {
            Some(Value::Number(n)) => match finite(n) {
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

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn is_rfc3339(s: &str) -> bool {
    DateTime::parse_from_rfc3339(s).is_ok()
}

fn status_report(fields: Map<String, Value>, skipped: &mut Vec<Skipped>) -> StatusReport {
    let (device_status, online) = match fields.get("status") {
        Some(Value::String(s)) if s.chars().count() <= DEVICE_STATUS_MAX_CHARS => {
            let online = if s.eq_ignore_ascii_case("online") {
                Some(true)
            } else if s.eq_ignore_ascii_case("offline") {
                Some(false)
            } else {
                None
            };
            (Some(s.clone()), online)
        }
        Some(Value::String(_)) => {
            skip(
                skipped,
                "status.status".into(),
                format!(
                    "longer than {DEVICE_STATUS_MAX_CHARS} characters; device_status unchanged"
                ),
            );
            (None, None)
        }
        None | Some(Value::Null) => (None, None),
        Some(other) => {
            skip(
                skipped,
                "status.status".into(),
                format!("{} is not text; device_status unchanged", type_name(other)),
            );
            (None, None)
        }
    };
    StatusReport {
        fields,
        device_status,
        online,
    }
}

#[cfg(test)]
mod tests;
