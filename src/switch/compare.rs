//! `compare`: the tables the Python service wrote beside the ones mqtt-ingest wrote, device by
//! device and field by field. Pure: the rows come in ([`Tables`]), the differences go out, each
//! either of an expected [`Class`] or unexpected.

use std::collections::{BTreeMap, BTreeSet};

use chrono::{DateTime, FixedOffset, NaiveDateTime, TimeDelta};
use serde::Serialize;
use serde_json::{Map, Value};

use super::differences::Class;
use crate::intake::payload::valid_sensor_name;
use crate::intake::zone::Zone;
use crate::store::shadow::{DeviceRow, SensorRow, Tables};

/// The backend's offline check: online while `is_online` is set and `last_seen` is at most
/// this old (`DEVICE_OFFLINE_TIMEOUT_MINUTES` in `backend/app/api/devices.py`).
pub const BACKEND_OFFLINE_AFTER: TimeDelta = TimeDelta::seconds(300);

/// `device_status`'s length on CodeHubot's table.
const DEVICE_STATUS_CHARS: usize = 20;

/// What a comparison needs besides the rows.
#[derive(Debug, Clone)]
pub struct Options {
    /// Now, as the zone's wall clock (what `last_seen` is written in).
    pub now: NaiveDateTime,
    /// The zone of the DATETIME columns and of naive times in `last_report_data`.
    pub zone: Zone,
    /// Times closer than this are the same.
    pub tolerance: TimeDelta,
    /// mqtt-ingest's `PRESENCE_TIMEOUT_SECS` (`None`: off).
    pub presence_timeout: Option<TimeDelta>,
}

/// One difference.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Finding {
    /// The device's uuid.
    pub device: String,
    /// Which field (`last_seen`, `online`, `last_report_data.status.uptime`,
    /// `device_sensors.temperature.value`, …).
    pub field: String,
    /// What the Python service's table holds.
    pub python: String,
    /// What mqtt-ingest's table holds.
    pub ingest: String,
    /// The deliberate difference it is, or `None`: unexpected.
    pub class: Option<Class>,
}

/// Which side a device was found on alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum OneSide {
    /// Only in the Python service's table (registered after the copy, say).
    Python,
    /// Only in mqtt-ingest's (removed from the other after the copy, say).
    Ingest,
}

/// The outcome of a comparison.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Report {
    /// Devices found in both tables and compared.
    pub devices: usize,
    /// Devices in one table only: not compared.
    pub not_compared: Vec<(String, OneSide)>,
    /// Every difference, unexpected ones first, then by device and field.
    pub differences: Vec<Finding>,
}

impl Report {
    /// How many differences are unexpected.
    pub fn unexpected(&self) -> usize {
        self.differences
            .iter()
            .filter(|f| f.class.is_none())
            .count()
    }

    /// Expected differences by class, in [`Class::ALL`]'s order, classes with none left out.
    pub fn expected_by_class(&self) -> Vec<(Class, usize)> {
        Class::ALL
            .iter()
            .map(|c| {
                let n = self
                    .differences
                    .iter()
                    .filter(|f| f.class == Some(*c))
                    .count();
                (*c, n)
            })
            .filter(|(_, n)| *n > 0)
            .collect()
    }

    /// The first line: devices, unexpected differences, expected ones by class.
    pub fn summary(&self) -> String {
        let by_class = self.expected_by_class();
        let expected: usize = by_class.iter().map(|(_, n)| n).sum();
        let mut line = format!(
            "{} devices, {} unexpected differences, {} expected",
            self.devices,
            self.unexpected(),
            expected
        );
        if !by_class.is_empty() {
            let parts: Vec<String> = by_class
                .iter()
                .map(|(c, n)| format!("{n} {}", c.name()))
                .collect();
            line.push_str(": ");
            line.push_str(&parts.join(", "));
        }
        if !self.not_compared.is_empty() {
            line.push_str(&format!(
                "; {} devices in one table only, not compared",
                self.not_compared.len()
            ));
        }
        line
    }

    /// The summary, then each difference on a line of its own.
    pub fn text(&self) -> String {
        let mut out = self.summary();
        out.push('\n');
        let mut section = |title: &str, findings: &mut dyn Iterator<Item = &Finding>| {
            let mut first = true;
            for f in findings {
                if first {
                    out.push_str(&format!("\n{title}:\n"));
                    first = false;
                }
                let class = f.class.map(|c| format!(" [{}]", c.name()));
                out.push_str(&format!(
                    "  {} {}: python {}, mqtt-ingest {}{}\n",
                    f.device,
                    f.field,
                    f.python,
                    f.ingest,
                    class.unwrap_or_default()
                ));
            }
        };
        section(
            "unexpected",
            &mut self.differences.iter().filter(|f| f.class.is_none()),
        );
        section(
            "expected",
            &mut self.differences.iter().filter(|f| f.class.is_some()),
        );
        if !self.not_compared.is_empty() {
            out.push_str("\nin one table only (registered or removed after the shadow copy):\n");
            for (uuid, side) in &self.not_compared {
                let side = match side {
                    OneSide::Python => "python",
                    OneSide::Ingest => "mqtt-ingest",
                };
                out.push_str(&format!("  {uuid}: {side}\n"));
            }
        }
        out
    }

    /// The JSON form (`--format json`).
    pub fn json(&self) -> Value {
        let by_class: Map<String, Value> = self
            .expected_by_class()
            .into_iter()
            .map(|(c, n)| (c.name().to_owned(), Value::from(n)))
            .collect();
        serde_json::json!({
            "summary": self.summary(),
            "devices": self.devices,
            "unexpected": self.unexpected(),
            "expected": by_class.values().filter_map(Value::as_u64).sum::<u64>(),
            "expected_by_class": by_class,
            "not_compared": self.not_compared.iter().map(|(uuid, side)| {
                serde_json::json!({"device": uuid, "only_in": side})
            }).collect::<Vec<_>>(),
            "differences": self.differences.iter().map(|f| serde_json::json!({
                "device": f.device,
                "field": f.field,
                "python": f.python,
                "mqtt_ingest": f.ingest,
                "expected": f.class.is_some(),
                "class": f.class.map(Class::name),
            })).collect::<Vec<_>>(),
        })
    }
}

/// Which of two times is later, beyond the tolerance.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Later {
    Same,
    Python,
    Ingest,
}

fn later(
    python: Option<NaiveDateTime>,
    ingest: Option<NaiveDateTime>,
    tolerance: TimeDelta,
) -> Later {
    match (python, ingest) {
        (None, None) => Later::Same,
        (None, Some(_)) => Later::Ingest,
        (Some(_), None) => Later::Python,
        (Some(p), Some(i)) if (i - p).abs() <= tolerance => Later::Same,
        (Some(p), Some(i)) if i > p => Later::Ingest,
        _ => Later::Python,
    }
}

fn show_time(t: Option<NaiveDateTime>) -> String {
    t.map_or_else(
        || "never".to_owned(),
        |t| t.format("%Y-%m-%d %H:%M:%S").to_string(),
    )
}

fn show_json(v: Option<&Value>) -> String {
    v.map_or_else(|| "(none)".to_owned(), Value::to_string)
}

/// JSON values equal as a reader sees them: numbers by value (`55` and `55.0`).
fn same_json(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => x.as_f64() == y.as_f64(),
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(a, b)| same_json(a, b))
        }
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len()
                && x.iter()
                    .all(|(k, v)| y.get(k).is_some_and(|w| same_json(v, w)))
        }
        _ => a == b,
    }
}

/// Two JSON values of the same kind (both numbers, both texts, …).
fn same_kind(a: &Value, b: &Value) -> bool {
    std::mem::discriminant(a) == std::mem::discriminant(b)
}

fn same_opt(a: Option<&Value>, b: Option<&Value>) -> bool {
    match (a, b) {
        (None, None) => true,
        (Some(a), Some(b)) => same_json(a, b),
        _ => false,
    }
}

/// A time inside `last_report_data`: RFC 3339, or naive (Python's `isoformat()`) in the zone.
fn instant(v: Option<&Value>, zone: &Zone) -> Option<DateTime<FixedOffset>> {
    let text = v?.as_str()?;
    DateTime::parse_from_rfc3339(text).ok().or_else(|| {
        NaiveDateTime::parse_from_str(text, "%Y-%m-%dT%H:%M:%S%.f")
            .ok()
            .and_then(|t| zone.from_naive(t))
    })
}

/// The backend's judgement.
fn backend_online(row: &DeviceRow, now: NaiveDateTime) -> bool {
    row.is_online
        && row
            .last_seen
            .is_some_and(|t| now - t <= BACKEND_OFFLINE_AFTER)
}

fn part<'a>(data: Option<&'a Value>, key: &str) -> Option<&'a Value> {
    data?.as_object()?.get(key)
}

/// A `last_report_data` that the Python service would replace rather than merge into.
fn empty_data(data: Option<&Value>) -> bool {
    match data {
        None | Some(Value::Null) => true,
        Some(Value::Object(m)) => m.is_empty(),
        _ => false,
    }
}

fn said_offline(row: &DeviceRow) -> bool {
    part(part(row.last_report_data.as_ref(), "status"), "status")
        .and_then(Value::as_str)
        .is_some_and(|s| s.eq_ignore_ascii_case("offline"))
}

fn not_json_text(value: &str) -> bool {
    matches!(
        value.to_ascii_lowercase().as_str(),
        "nan" | "inf" | "-inf" | "infinity" | "-infinity"
    )
}

/// One device's rows on both sides and what the shadow copy held.
struct Device<'a> {
    uuid: &'a str,
    python: &'a DeviceRow,
    ingest: &'a DeviceRow,
    /// `last_report_data` as copied (`None`: no record of the copy).
    start: Option<Option<&'a Value>>,
    /// When the Python side last stored a reading that is not JSON (`nan`, `inf`).
    python_not_json_at: Option<NaiveDateTime>,
}

impl Device<'_> {
    fn finding(
        &self,
        field: impl Into<String>,
        python: String,
        ingest: String,
        class: Option<Class>,
    ) -> Finding {
        Finding {
            device: self.uuid.to_owned(),
            field: field.into(),
            python,
            ingest,
            class,
        }
    }

    /// Whether the Python service left `key` of `last_report_data` as the copy had it.
    fn python_left(&self, key: &str) -> bool {
        match self.start {
            Some(start) => same_opt(
                part(start, key),
                part(self.python.last_report_data.as_ref(), key),
            ),
            None => false,
        }
    }

    fn seen(&self, o: &Options) -> Later {
        later(self.python.last_seen, self.ingest.last_seen, o.tolerance)
    }

    /// The class of a later time on one side: on ours, a message the Python service lost
    /// (unless ours is in the future: no message explains that); on the Python side, only a
    /// message that is not JSON, which it took at that time and we rejected.
    fn later_class(&self, which: Later, o: &Options) -> Option<Class> {
        let (p, i) = (self.python, self.ingest);
        match which {
            Later::Ingest if i.last_seen.is_some_and(|t| t - o.now > o.tolerance) => None,
            Later::Ingest => Some(Class::PythonLostMessage),
            Later::Python => {
                let took_it = match (self.python_not_json_at, p.last_seen) {
                    (Some(at), Some(seen)) => (seen - at).abs() <= o.tolerance,
                    _ => false,
                };
                took_it.then_some(Class::NotJson)
            }
            Later::Same => None,
        }
    }

    fn compare(&self, o: &Options, out: &mut Vec<Finding>) {
        let (p, i) = (self.python, self.ingest);
        for (field, pt, it) in [
            ("last_seen", p.last_seen, i.last_seen),
            ("last_heartbeat", p.last_heartbeat, i.last_heartbeat),
        ] {
            let which = later(pt, it, o.tolerance);
            if which != Later::Same {
                // A heartbeat is never a message that is not JSON.
                let class = match (field, which) {
                    ("last_heartbeat", Later::Python) => None,
                    _ => self.later_class(which, o),
                };
                out.push(self.finding(field, show_time(pt), show_time(it), class));
            }
        }
        self.online(o, out);
        if p.device_status != i.device_status {
            // Cut to the column, where the Python service's write failed (its value is then
            // an earlier one). A number's text is what both write, so no excuse.
            let fitted = i
                .device_status
                .as_deref()
                .is_some_and(|s| s.chars().count() == DEVICE_STATUS_CHARS);
            let class = if fitted {
                Some(Class::DeviceStatusFitted)
            } else {
                self.later_class(self.seen(o), o)
            };
            let show = |s: &Option<String>| s.clone().unwrap_or_else(|| "NULL".into());
            out.push(self.finding(
                "device_status",
                show(&p.device_status),
                show(&i.device_status),
                class,
            ));
        }
        self.status(o, out);
        self.sensors_in_data(o, out);
        let (pl, il) = (
            part(p.last_report_data.as_ref(), "location"),
            part(i.last_report_data.as_ref(), "location"),
        );
        if !same_opt(pl, il) {
            let class = if self.python_left("location") {
                Some(Class::NotInLastReportData)
            } else {
                self.later_class(self.seen(o), o)
            };
            out.push(self.finding(
                "last_report_data.location",
                show_json(pl),
                show_json(il),
                class,
            ));
        }
    }

    /// Whether our `device_sensors` row of `name` says what our `last_report_data` says of it
    /// (value and time), where the latter has it under that name.
    fn agrees(&self, name: &str, row: &SensorRow, o: &Options) -> bool {
        let Some(entry) = part(part(self.ingest.last_report_data.as_ref(), "sensors"), name) else {
            return true;
        };
        let value = match part(Some(entry), "value") {
            Some(Value::Bool(true)) => row.value == "True",
            Some(Value::Bool(false)) => row.value == "False",
            Some(Value::Number(n)) => row.value.parse::<f64>().ok() == n.as_f64(),
            Some(Value::String(t)) => *t == row.value,
            _ => false,
        };
        let time = match (
            instant(part(Some(entry), "timestamp"), &o.zone),
            o.zone.from_naive(row.timestamp),
        ) {
            (Some(a), Some(b)) => (a - b).abs() <= o.tolerance,
            _ => true,
        };
        value && time
    }

    /// `is_online` as the backend judges it.
    fn online(&self, o: &Options, out: &mut Vec<Finding>) {
        let (p, i) = (self.python, self.ingest);
        let (p_on, i_on) = (backend_online(p, o.now), backend_online(i, o.now));
        let seen = self.seen(o);
        // Both set, seen within the tolerance, on either side of the backend's limit: the same.
        if p_on == i_on || (p.is_online == i.is_online && seen == Later::Same) {
            return;
        }
        let class = if p_on {
            let silent = i.last_seen.is_some_and(|t| {
                o.presence_timeout
                    .is_some_and(|timeout| o.now - t >= timeout)
            });
            if !i.is_online && said_offline(i) {
                Some(Class::OfflineStatus)
            } else if !i.is_online && seen == Later::Same && silent {
                Some(Class::PresenceSweep)
            } else {
                self.later_class(seen, o)
            }
        } else {
            self.later_class(seen, o)
        };
        let show = |on: bool, row: &DeviceRow| {
            format!(
                "{} (is_online {}, last_seen {})",
                if on { "online" } else { "offline" },
                u8::from(row.is_online),
                show_time(row.last_seen)
            )
        };
        out.push(self.finding("online", show(p_on, p), show(i_on, i), class));
    }

    /// The status merged into `last_report_data`, key by key.
    fn status(&self, o: &Options, out: &mut Vec<Finding>) {
        let ps = part(self.python.last_report_data.as_ref(), "status");
        let is = part(self.ingest.last_report_data.as_ref(), "status");
        if same_opt(ps, is) {
            return;
        }
        // The Python service writes a status only into an empty column: after that, its merges
        // are lost (SQLAlchemy does not see a change inside the dict).
        let lost = self.python_left("status") || self.start.is_some_and(empty_data);
        let class = if lost {
            Some(Class::LostStatusMerge)
        } else {
            self.later_class(self.seen(o), o)
        };
        let keys: BTreeSet<&String> = [ps, is]
            .into_iter()
            .filter_map(|s| s.and_then(Value::as_object))
            .flat_map(Map::keys)
            .collect();
        if keys.is_empty() {
            // Not objects: the status as a whole.
            out.push(self.finding(
                "last_report_data.status",
                show_json(ps),
                show_json(is),
                class,
            ));
            return;
        }
        for key in keys {
            let (a, b) = (part(ps, key), part(is, key));
            let same_time = key == "timestamp"
                && instant(a, &o.zone).is_some()
                && instant(a, &o.zone) == instant(b, &o.zone);
            if same_opt(a, b) || same_time {
                continue;
            }
            // A lost merge explains a key we have from a later message: one the Python service
            // lacks, or holds an earlier value of (of the same kind). Never a key we lack.
            let class = match (a, b) {
                (_, Some(b)) if lost && a.is_none_or(|a| same_kind(a, b)) => class,
                (_, Some(_)) if lost => None,
                (Some(a), None)
                    if key == "timestamp"
                        && a.is_string()
                        && instant(Some(a), &o.zone).is_none() =>
                {
                    Some(Class::StatusTimestamp)
                }
                (_, None) if lost => None,
                _ => class,
            };
            out.push(self.finding(
                format!("last_report_data.status.{key}"),
                show_json(a),
                show_json(b),
                class,
            ));
        }
    }

    /// Each reading in `last_report_data.sensors`: its value and unit.
    fn sensors_in_data(&self, o: &Options, out: &mut Vec<Finding>) {
        let ps = part(self.python.last_report_data.as_ref(), "sensors");
        let is = part(self.ingest.last_report_data.as_ref(), "sensors");
        if same_opt(ps, is) {
            return;
        }
        let left = self.python_left("sensors");
        let names: BTreeSet<&String> = [ps, is]
            .into_iter()
            .filter_map(|s| s.and_then(Value::as_object))
            .flat_map(Map::keys)
            .collect();
        for name in names {
            let (a, b) = (part(ps, name), part(is, name));
            let same = same_opt(part(a, "value"), part(b, "value"))
                && same_opt(part(a, "unit"), part(b, "unit"));
            if same {
                continue;
            }
            let class = if left {
                Some(Class::NotInLastReportData)
            } else {
                match (
                    instant(part(a, "timestamp"), &o.zone),
                    instant(part(b, "timestamp"), &o.zone),
                ) {
                    // Kept out as older, though the message came (or we would have missed
                    // it: a later `last_seen` on the Python side is never expected).
                    (Some(pt), Some(it))
                        if pt - it > o.tolerance && self.seen(o) != Later::Python =>
                    {
                        Some(Class::LateOlderReading)
                    }
                    (Some(pt), Some(it)) if it - pt > o.tolerance => Some(Class::PythonLostMessage),
                    _ => None,
                }
            };
            let show = |r: Option<&Value>| match r {
                None => "(none)".to_owned(),
                Some(r) => format!(
                    "{} {}",
                    show_json(part(Some(r), "value")),
                    show_json(part(Some(r), "unit"))
                ),
            };
            out.push(self.finding(
                format!("last_report_data.sensors.{name}"),
                show(a),
                show(b),
                class,
            ));
        }
    }
}

/// `device_sensors`' rows of one device, where both sides have the table.
fn compare_sensor_rows(
    device: &Device<'_>,
    python: &BTreeMap<&str, &SensorRow>,
    ingest: &BTreeMap<&str, &SensorRow>,
    o: &Options,
    out: &mut Vec<Finding>,
) {
    let names: BTreeSet<&str> = python.keys().chain(ingest.keys()).copied().collect();
    for name in names {
        let field = |what: &str| format!("device_sensors.{name}{what}");
        match (python.get(name), ingest.get(name)) {
            (Some(p), None) => {
                let class = if name == "device_id" {
                    Some(Class::NumericDeviceId)
                } else if !valid_sensor_name(name) {
                    Some(Class::SensorNameRule)
                } else if not_json_text(&p.value) {
                    Some(Class::NotJson)
                } else {
                    None
                };
                out.push(device.finding(field(""), p.value.clone(), "(no row)".into(), class));
            }
            (None, Some(i)) => {
                let class = device.later_class(device.seen(o), o);
                out.push(device.finding(field(""), "(no row)".into(), i.value.clone(), class));
            }
            (Some(p), Some(i)) => {
                let when = later(Some(p.timestamp), Some(i.timestamp), o.tolerance);
                let same_number = matches!(
                    (p.value.parse::<f64>(), i.value.parse::<f64>()),
                    (Ok(a), Ok(b)) if a == b
                );
                // A reading dated otherwise, or kept out as older, is expected only where our
                // two tables agree on it (the row is not merely stale beside last_report_data).
                let ours_agree = device.agrees(name, i, o);
                let reading_class = match when {
                    Later::Python if device.seen(o) != Later::Python && ours_agree => {
                        Some(Class::LateOlderReading)
                    }
                    Later::Ingest => device.later_class(Later::Ingest, o),
                    _ => None,
                };
                let show =
                    |r: &SensorRow, v: &str| format!("{v} at {}", show_time(Some(r.timestamp)));
                let mut reading_differs = false;
                for (what, a, b) in [
                    (".value", &p.value, &i.value),
                    (".unit", &p.unit, &i.unit),
                    (".sensor_type", &p.kind, &i.kind),
                ] {
                    if a == b {
                        continue;
                    }
                    let class = if what == ".value" && same_number {
                        Some(Class::NumberText)
                    } else {
                        reading_differs = true;
                        reading_class
                    };
                    out.push(device.finding(field(what), show(p, a), show(i, b), class));
                }
                if !reading_differs && when != Later::Same {
                    out.push(device.finding(
                        field(".timestamp"),
                        show_time(Some(p.timestamp)),
                        show_time(Some(i.timestamp)),
                        ours_agree.then_some(Class::DeviceTime),
                    ));
                }
            }
            (None, None) => {}
        }
    }
}

/// `device_sensors`' rows by device (its uuid in lower case: the tables' collation ignores
/// case, so the backend joins them so), then by sensor name.
fn by_device(t: &Tables) -> BTreeMap<String, BTreeMap<&str, &SensorRow>> {
    let mut m: BTreeMap<String, BTreeMap<&str, &SensorRow>> = BTreeMap::new();
    for ((uuid, name), row) in t.sensors.iter().flatten() {
        m.entry(uuid.to_lowercase())
            .or_default()
            .insert(name.as_str(), row);
    }
    m
}

/// Compares the tables the Python service wrote with those mqtt-ingest wrote.
pub fn compare(python: &Tables, ingest: &Tables, o: &Options) -> Report {
    let start = python.start.as_ref().or(ingest.start.as_ref());
    let (p_sensors, i_sensors) = (by_device(python), by_device(ingest));
    let both_sensors = python.sensors.is_some() && ingest.sensors.is_some();
    let empty = BTreeMap::new();
    let mut report = Report {
        devices: 0,
        not_compared: Vec::new(),
        differences: Vec::new(),
    };
    for (uuid, p) in &python.devices {
        let Some(i) = ingest.devices.get(uuid) else {
            report.not_compared.push((uuid.clone(), OneSide::Python));
            continue;
        };
        report.devices += 1;
        // `device_sensors` is keyed by the uuid in lower case (see `by_device`).
        let key = uuid.to_lowercase();
        let ps = p_sensors.get(&key).unwrap_or(&empty);
        let device = Device {
            uuid,
            python: p,
            ingest: i,
            start: start.map(|s| s.get(uuid).and_then(Option::as_ref)),
            python_not_json_at: ps
                .values()
                .filter(|r| not_json_text(&r.value))
                .map(|r| r.timestamp)
                .max(),
        };
        device.compare(o, &mut report.differences);
        if both_sensors {
            let is = i_sensors.get(&key).unwrap_or(&empty);
            compare_sensor_rows(&device, ps, is, o, &mut report.differences);
        }
    }
    for uuid in ingest.devices.keys() {
        if !python.devices.contains_key(uuid) {
            report.not_compared.push((uuid.clone(), OneSide::Ingest));
        }
    }
    report.differences.sort_by(|a, b| {
        (a.class.is_some(), &a.device, &a.field).cmp(&(b.class.is_some(), &b.device, &b.field))
    });
    report
}

#[cfg(test)]
mod tests;
