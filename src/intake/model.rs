//! The validated types that cross from the MQTT side to the database side.
//!
//! Everything here has already passed the checks in [`crate::intake::topic`] and [`crate::intake::payload`]:
//! the store accepts only these types, so it never sees raw bytes (parse, don't validate).

use std::borrow::Cow;
use std::fmt;
use std::sync::Arc;

use chrono::{DateTime, FixedOffset, Timelike};
use serde::Serialize;
use serde_json::{Map, Number, Value};

/// What a device calls itself: 1–64 characters of `[A-Za-z0-9_.:-]` (MAC addresses included).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DeviceUuid(Box<str>);

/// The bytes a device id may hold, as a table: looked up once per byte of every topic (a chain
/// of range tests cost about twice as many instructions per byte).
static DEVICE_ID_BYTES: [bool; 256] = {
    let mut table = [false; 256];
    let mut b = 0;
    while b < 256 {
        let c = b as u8;
        table[b] = c.is_ascii_alphanumeric() || matches!(c, b'_' | b'.' | b':' | b'-');
        b += 1;
    }
    table
};

impl DeviceUuid {
    /// Longest accepted device id, in bytes (all allowed characters are ASCII).
    pub const MAX_LEN: usize = 64;

    /// Accepts `s` if it is a well-formed device id: 1–64 of `[A-Za-z0-9_.:-]`.
    pub fn parse(s: &str) -> Option<Self> {
        let ok = !s.is_empty()
            && s.len() <= Self::MAX_LEN
            && s.bytes().all(|b| DEVICE_ID_BYTES[usize::from(b)]);
        ok.then(|| Self(s.into()))
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for DeviceUuid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The last topic level: which kind of message a device sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TopicKind {
    /// `…/data`: sensor readings.
    Data,
    /// `…/status`: device status, merged into `last_report_data.status`.
    Status,
    /// `…/heartbeat`: liveness only.
    Heartbeat,
}

impl TopicKind {
    /// All kinds, in the order the service subscribes to them.
    pub const ALL: [TopicKind; 3] = [TopicKind::Data, TopicKind::Status, TopicKind::Heartbeat];

    /// The topic level that names this kind.
    pub fn as_str(self) -> &'static str {
        match self {
            TopicKind::Data => "data",
            TopicKind::Status => "status",
            TopicKind::Heartbeat => "heartbeat",
        }
    }
}

/// A sensor's value: a number or a boolean (the Python service took both, since in Python
/// `True` is an `int`; the rain board sends `"is_raining": false`).
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum SensorValue {
    /// The number exactly as the device sent it (integers stay integers).
    Number(Number),
    /// `true` or `false`.
    Bool(bool),
}

impl SensorValue {
    /// The value as a number (a boolean is 1 or 0, as in Python).
    pub fn as_f64(&self) -> Option<f64> {
        match self {
            SensorValue::Number(n) => n.as_f64(),
            SensorValue::Bool(b) => Some(f64::from(u8::from(*b))),
        }
    }

    /// The value as text the way the Python service wrote it to `device_sensors.sensor_value`
    /// (Python's `str()`): `True`/`False`, numbers as sent.
    pub fn to_db_text(&self) -> String {
        match self {
            SensorValue::Number(n) => n.to_string(),
            SensorValue::Bool(true) => "True".to_owned(),
            SensorValue::Bool(false) => "False".to_owned(),
        }
    }
}

/// The value as JSON text (`24.3`, `true`).
impl fmt::Display for SensorValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SensorValue::Number(n) => write!(f, "{n}"),
            SensorValue::Bool(b) => write!(f, "{b}"),
        }
    }
}

impl From<Number> for SensorValue {
    fn from(n: Number) -> Self {
        SensorValue::Number(n)
    }
}

/// A device's own time as RFC 3339 text: kept as sent when it had an offset, else rendered in
/// the database zone. Shared by a message's update and the readings it dates, through one
/// pointer: beside a receive time in [`ReadingTime`], a wide pointer (`Arc<str>`) made every
/// reading 8 bytes larger, and readings wait in a queue by the ten thousand.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceTime(Arc<String>);

impl std::ops::Deref for DeviceTime {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

/// The text as it is (no copy).
impl From<String> for DeviceTime {
    fn from(text: String) -> Self {
        Self(Arc::new(text))
    }
}

impl From<&str> for DeviceTime {
    fn from(text: &str) -> Self {
        Self(Arc::new(text.to_owned()))
    }
}

/// When a reading was read.
///
/// The receive time is kept as a time and written out as text only where it is stored: most
/// readings have it (the firmware's timestamps are uptime counters), and text for each of them,
/// in a queue of thousands, was an allocation per reading and about 930 instructions a message.
#[derive(Debug, Clone, PartialEq)]
pub enum ReadingTime {
    /// The device's own time.
    Device(DeviceTime),
    /// The receive time of the reading's message, in the database zone; as text, RFC 3339
    /// with milliseconds.
    Received(DateTime<FixedOffset>),
}

impl ReadingTime {
    /// Receive time `t` as a reading time, to the millisecond, as its text has it: what is
    /// compared and stored as a time is what the text says.
    pub fn received(t: DateTime<FixedOffset>) -> Self {
        let millis = t.nanosecond() / 1_000_000 * 1_000_000;
        ReadingTime::Received(t.with_nanosecond(millis).unwrap_or(t))
    }

    /// The time as RFC 3339 text, as it is stored.
    pub fn text(&self) -> Cow<'_, str> {
        match self {
            ReadingTime::Device(text) => Cow::Borrowed(text),
            ReadingTime::Received(t) => Cow::Owned(crate::intake::zone::rfc3339_millis(t)),
        }
    }

    /// The time as an instant (`None` only for device text that is not RFC 3339, which the
    /// payload reader never makes).
    pub fn instant(&self) -> Option<DateTime<FixedOffset>> {
        match self {
            ReadingTime::Device(text) => DateTime::parse_from_rfc3339(text).ok(),
            ReadingTime::Received(t) => Some(*t),
        }
    }
}

impl fmt::Display for ReadingTime {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text())
    }
}

/// Device text.
impl From<&str> for ReadingTime {
    fn from(text: &str) -> Self {
        ReadingTime::Device(text.into())
    }
}

/// Device text.
impl From<String> for ReadingTime {
    fn from(text: String) -> Self {
        ReadingTime::Device(text.into())
    }
}

/// Compares the stored text.
impl PartialEq<&str> for ReadingTime {
    fn eq(&self, other: &&str) -> bool {
        self.text() == *other
    }
}

/// What a reading is of: its sensor's name, the unit it gave and the sensor's type.
///
/// Shared ([`Sensor::shared`]): a board sends the same few sensors with every message, and a
/// name, a unit and a type of their own for each reading of each waiting update were most of a
/// queued update's memory and an allocation per reading.
#[derive(Debug, PartialEq, Eq)]
pub struct Sensor {
    /// The reading's name (after renames), the key in `last_report_data.sensors`.
    pub name: Box<str>,
    /// Unit text, `""` when the device gave none.
    pub unit: Box<str>,
    /// The sensor's type (`DHT11`, `RAIN_SENSOR`): the simple format's `sensor` field or a full
    /// format entry's `sensor_type`; `None` when the device gave none. Written to
    /// `device_sensors.sensor_type`, not to `last_report_data`.
    pub kind: Option<Box<str>>,
}

/// Sensors kept for reuse, per thread.
const SHARED_SENSORS: usize = 32;

thread_local! {
    /// The sensors this thread met last, and where the next one not among them goes.
    static SENSORS: std::cell::RefCell<(Vec<Arc<Sensor>>, usize)> =
        const { std::cell::RefCell::new((Vec::new(), 0)) };
}

impl Sensor {
    /// The sensor `name` (`unit`, `kind`): one this thread keeps, shared, or a new one, which
    /// then takes the place of the one kept longest once [`SHARED_SENSORS`] are kept (round
    /// robin: a device sending ever new names cannot pin the list). Written here rather than taken from an interning crate: those keep
    /// every string for ever (a device may send any name), and this is a short list.
    pub fn shared(name: &str, unit: &str, kind: Option<&str>) -> Arc<Sensor> {
        SENSORS.with_borrow_mut(|(kept, next)| {
            if let Some(s) = kept
                .iter()
                .find(|s| same(&s.name, name) && same(&s.unit, unit) && s.kind.as_deref() == kind)
            {
                return s.clone();
            }
            let s = Arc::new(Sensor {
                name: name.into(),
                unit: unit.into(),
                kind: kind.map(Into::into),
            });
            if kept.len() < SHARED_SENSORS {
                kept.push(s.clone());
            } else {
                kept[*next] = s.clone();
                *next = (*next + 1) % SHARED_SENSORS;
            }
            s
        })
    }
}

/// `a == b`, without a call to `memcmp` for two empty strings: most readings have no unit.
fn same(a: &str, b: &str) -> bool {
    a.len() == b.len() && (a.is_empty() || a == b)
}

/// One sensor's accepted reading, in the stored shape.
#[derive(Debug, Clone, PartialEq)]
pub struct SensorReading {
    /// Whose reading: name, unit, type.
    pub sensor: Arc<Sensor>,
    /// The value as the device sent it.
    pub value: SensorValue,
    /// Reading time: the device's own or the receive time.
    pub timestamp: ReadingTime,
}

impl SensorReading {
    /// A reading of `sensor`.
    pub fn of(sensor: Arc<Sensor>, value: SensorValue, timestamp: ReadingTime) -> Self {
        Self {
            sensor,
            value,
            timestamp,
        }
    }

    /// The sensor's name.
    pub fn name(&self) -> &str {
        &self.sensor.name
    }

    /// Unit text, `""` for none.
    pub fn unit(&self) -> &str {
        &self.sensor.unit
    }

    /// The sensor's type, `""` for none.
    pub fn sensor_type(&self) -> &str {
        self.sensor.kind.as_deref().unwrap_or("")
    }
}

/// Readings by sensor name: sorted by name, each name once. A flat vector rather than a map: an
/// update may wait in a queue for a while, and a map's node (about 1 KB) for two or three readings
/// was most of a queued message's memory.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Sensors(Vec<SensorReading>);

impl Sensors {
    fn find(&self, name: &str) -> Result<usize, usize> {
        self.0
            .binary_search_by(|r| crate::intake::json::name_cmp(r.name(), name))
    }

    /// Adds a reading or replaces the one of the same name (for a few; collect many with
    /// [`FromIterator`]).
    pub fn insert(&mut self, reading: SensorReading) {
        match self.find(reading.name()) {
            Ok(i) => self.0[i] = reading,
            Err(i) => self.0.insert(i, reading),
        }
    }

    /// The reading of `name`.
    pub fn get(&self, name: &str) -> Option<&SensorReading> {
        self.find(name).ok().map(|i| &self.0[i])
    }

    /// The reading of `name`, to change in place.
    pub fn get_mut(&mut self, name: &str) -> Option<&mut SensorReading> {
        self.find(name).ok().map(|i| &mut self.0[i])
    }

    /// The reading of the sensor `reading` is of, to change in place: by the shared sensor
    /// first (a board's readings share theirs, and comparing it costs no text), else by name.
    pub fn get_mut_like(&mut self, reading: &SensorReading) -> Option<&mut SensorReading> {
        match self
            .0
            .iter()
            .position(|held| Arc::ptr_eq(&held.sensor, &reading.sensor))
        {
            Some(i) => Some(&mut self.0[i]),
            None => self.get_mut(reading.name()),
        }
    }

    /// Whether `name` has a reading.
    pub fn contains_key(&self, name: &str) -> bool {
        self.get(name).is_some()
    }

    /// How many readings.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// No readings.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The readings in name order, with their names.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &SensorReading)> {
        self.0.iter().map(|r| (r.name(), r))
    }

    /// The names, in order.
    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.0.iter().map(SensorReading::name)
    }
}

/// Readings in message order: a name given twice keeps its last reading.
impl FromIterator<SensorReading> for Sensors {
    fn from_iter<I: IntoIterator<Item = SensorReading>>(iter: I) -> Self {
        let mut all: Vec<SensorReading> = iter.into_iter().collect();
        crate::intake::json::in_name_order_last_wins(&mut all, |r| r.name());
        // Held in a queue, perhaps for a while: no room for the readings a payload's other
        // members did not become (the firmware's data message has six members, three readings).
        all.shrink_to_fit();
        Self(all)
    }
}

impl IntoIterator for Sensors {
    type Item = SensorReading;
    type IntoIter = std::vec::IntoIter<SensorReading>;
    fn into_iter(self) -> Self::IntoIter {
        self.0.into_iter()
    }
}

impl<'a> IntoIterator for &'a Sensors {
    type Item = (&'a str, &'a SensorReading);
    type IntoIter = std::iter::Map<
        std::slice::Iter<'a, SensorReading>,
        fn(&'a SensorReading) -> (&'a str, &'a SensorReading),
    >;
    fn into_iter(self) -> Self::IntoIter {
        self.0.iter().map(|r| (r.name(), r))
    }
}

impl std::ops::Index<&str> for Sensors {
    type Output = SensorReading;
    fn index(&self, name: &str) -> &SensorReading {
        self.get(name)
            .unwrap_or_else(|| panic!("no reading of sensor {name:?}"))
    }
}

/// A location that passed the range checks.
#[derive(Debug, Clone, PartialEq)]
pub struct Location {
    /// Degrees, −90..=90.
    pub latitude: Number,
    /// Degrees, −180..=180.
    pub longitude: Number,
}

/// The valid part of a `data` message.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct DataReport {
    /// Readings by sensor name (a name repeated in one message: the last one wins).
    pub sensors: Sensors,
    /// Status fields to merge by key into the stored `status`, in key order (a flat list for
    /// the same reason as [`Sensors`], and no spare room: an update may wait a while).
    pub status: Option<Box<[(String, Value)]>>,
    /// Replaces the stored location when present (boxed: most messages have none, and an
    /// update may wait in a queue of thousands).
    pub location: Option<Box<Location>>,
}

/// The valid part of a `status` message.
#[derive(Debug, Clone, PartialEq)]
pub struct StatusReport {
    /// The payload's object as the device sent it, JSON text that reads as an object (checked
    /// on the way in): merged by key into the stored `status` ([`Self::fields`]). Kept as text
    /// rather than as serde_json's map: read into a map once, where it is merged, instead of
    /// read into one here, held in the queue (seven keys and a tree node for the firmware's
    /// status) and copied into the stored one there.
    pub object: Box<str>,
    /// The payload's `status` scalar as text, written to `device_status` (cut to the column's
    /// length by the store).
    pub device_status: Option<Box<str>>,
}

impl StatusReport {
    /// A status of `fields`, for tests (the service's come from the payload reader).
    #[cfg(test)]
    pub(crate) fn of(fields: &Map<String, Value>, device_status: Option<&str>) -> Self {
        Self {
            object: Value::Object(fields.clone()).to_string().into(),
            device_status: device_status.map(Into::into),
        }
    }

    /// The fields to merge into the stored `status`, their `timestamp` as it is stored
    /// ([`store_status_time`]) for the message's reading time `reading_time`.
    pub fn fields(&self, reading_time: Option<&str>) -> Map<String, Value> {
        // Read by the reader that checked it when the message came in (`json`, which takes
        // every member name as a name: serde_json's own tree reader, with the `raw_value`
        // feature, takes `$serde_json::private::RawValue` as a command), so it is an object
        // now too: the empty map, what an unusable stored status reads as, is never met.
        let mut fields = match crate::intake::json::parse(&self.object) {
            Ok(crate::intake::json::Json::Object(object)) => object.to_map(),
            _ => Map::new(),
        };
        store_status_time(&mut fields, reading_time);
        fields
    }

    /// `false` for a `status` of `"offline"` (a last will), else `true`: any status message is
    /// a sign of life. (Worked out rather than kept: a field would make every waiting update 8
    /// bytes larger.)
    pub fn online(&self) -> bool {
        !self
            .device_status
            .as_deref()
            .is_some_and(|s| s.eq_ignore_ascii_case("offline"))
    }
}

/// The status time as it is stored, which orders later status messages: the reading time as
/// read (RFC 3339) when it dated anything; text that dated nothing is left out, so that a clock
/// set to 9999 cannot make every later status "older". A number that dates nothing (the
/// firmware's uptime) stays: a stored number orders nothing.
pub(crate) fn store_status_time(fields: &mut Map<String, Value>, reading_time: Option<&str>) {
    let sent_text = fields.get("timestamp").is_some_and(Value::is_string);
    match StatusTime::of(sent_text, reading_time) {
        StatusTime::Read(t) => {
            fields.insert("timestamp".into(), Value::String(t.to_owned()));
        }
        StatusTime::Dropped => {
            fields.remove("timestamp");
        }
        StatusTime::AsSent => {}
    }
}

/// What a status's `timestamp` is stored as ([`store_status_time`]'s rule, for a status kept
/// as a map or as a list of fields).
pub(crate) enum StatusTime<'a> {
    /// The reading time as read.
    Read(&'a str),
    /// Left out: text that dated nothing.
    Dropped,
    /// As sent (a number that dates nothing, or no timestamp).
    AsSent,
}

impl<'a> StatusTime<'a> {
    /// The rule for a sent timestamp that is text (`sent_text`) or not, and the reading time
    /// it gave.
    pub(crate) fn of(sent_text: bool, reading_time: Option<&'a str>) -> Self {
        match reading_time {
            Some(t) => StatusTime::Read(t),
            None if sent_text => StatusTime::Dropped,
            None => StatusTime::AsSent,
        }
    }
}

/// What a message asks the store to change.
#[derive(Debug, Clone, PartialEq)]
pub enum Change {
    /// Merge readings (and maybe status, location) into `last_report_data`; mark online.
    Data(DataReport),
    /// Merge status; maybe set `device_status` and `is_online`.
    Status(StatusReport),
    /// Set `last_heartbeat`; mark online.
    Heartbeat,
}

/// A validated update for one device, ready for the store.
#[derive(Debug, Clone, PartialEq)]
pub struct Update {
    /// The device the topic named.
    pub device: DeviceUuid,
    /// When the service received the message, in the database's zone (so its wall clock is
    /// what DATETIME columns get); becomes `last_seen`.
    pub received_at: DateTime<FixedOffset>,
    /// The message's own top-level `timestamp` as RFC 3339, when it dated anything: the
    /// reading time that order-safe merging compares (shared with the readings it dated).
    pub reading_time: Option<DeviceTime>,
    /// What to change.
    pub change: Change,
}

impl Update {
    /// The kind of topic the update came from.
    pub fn kind(&self) -> TopicKind {
        match self.change {
            Change::Data(_) => TopicKind::Data,
            Change::Status(_) => TopicKind::Status,
            Change::Heartbeat => TopicKind::Heartbeat,
        }
    }
}

#[cfg(test)]
mod sensors_tests {
    use super::*;

    fn r(name: &str, v: u64) -> SensorReading {
        SensorReading::of(
            Sensor::shared(name, "", None),
            Number::from(v).into(),
            "2026-01-01T00:00:00Z".into(),
        )
    }

    #[test]
    fn collected_readings_are_sorted_and_a_repeated_name_keeps_its_last() {
        let s: Sensors = [("b", 1), ("a", 2), ("b", 3), ("c", 4), ("a", 5), ("b", 6)]
            .into_iter()
            .map(|(n, v)| r(n, v))
            .collect();
        let got: Vec<(&str, u64)> = s
            .iter()
            .map(|(n, x)| (n, x.value.as_f64().unwrap() as u64))
            .collect();
        assert_eq!(got, [("a", 5), ("b", 6), ("c", 4)]);
        assert_eq!(s.len(), 3);
        assert!(s.contains_key("c") && !s.contains_key("d"));
        assert_eq!(s["a"].value.as_f64(), Some(5.0));
    }

    #[test]
    fn a_receive_time_is_kept_to_the_millisecond_as_its_text() {
        let t = DateTime::parse_from_rfc3339("2026-12-02T10:00:00.123456789+08:00").unwrap();
        let r = ReadingTime::received(t);
        assert_eq!(r.text(), "2026-12-02T10:00:00.123+08:00");
        assert_eq!(
            r.instant(),
            Some(DateTime::parse_from_rfc3339("2026-12-02T10:00:00.123+08:00").unwrap())
        );
        assert_eq!(r, "2026-12-02T10:00:00.123+08:00");
        assert_eq!(
            ReadingTime::from("2026-12-02T10:00:00Z").text(),
            "2026-12-02T10:00:00Z"
        );
    }

    #[test]
    fn a_sensor_met_lately_is_shared_and_any_other_is_its_own() {
        let t = Sensor::shared("temperature", "°C", Some("DHT11"));
        assert!(Arc::ptr_eq(
            &t,
            &Sensor::shared("temperature", "°C", Some("DHT11"))
        ));
        // Each part tells sensors apart.
        for other in [
            Sensor::shared("humidity", "°C", Some("DHT11")),
            Sensor::shared("temperature", "", Some("DHT11")),
            Sensor::shared("temperature", "°C", None),
            Sensor::shared("temperature", "°C", Some("DS18B20")),
        ] {
            assert_ne!(*other, *t);
        }
        // More sensors than are kept: each still gets its own name, unit and type.
        for i in 0..3 * SHARED_SENSORS {
            let name = format!("s{i}");
            let s = Sensor::shared(&name, "u", None);
            assert_eq!(
                (&*s.name, &*s.unit, s.kind.as_deref()),
                (name.as_str(), "u", None)
            );
        }
        let again = Sensor::shared("temperature", "°C", Some("DHT11"));
        assert_eq!(*again, *t);
        let r = SensorReading::of(
            again,
            SensorValue::Bool(true),
            "2026-01-01T00:00:00Z".into(),
        );
        assert_eq!(
            (r.name(), r.unit(), r.sensor_type()),
            ("temperature", "°C", "DHT11")
        );
    }

    #[test]
    fn a_reading_finds_its_sensor_s_by_the_shared_sensor_or_by_name() {
        let mut s: Sensors = [r("a", 1), r("m", 2)].into_iter().collect();
        // The same shared sensor.
        assert_eq!(
            s.get_mut_like(&r("m", 9)).map(|x| x.name().to_owned()),
            Some("m".into())
        );
        // Another sensor of the same name (a unit of its own): found by name.
        let other = SensorReading::of(
            Sensor::shared("a", "%", None),
            Number::from(3).into(),
            "2026-01-01T00:00:00Z".into(),
        );
        assert!(!Arc::ptr_eq(&other.sensor, &s["a"].sensor));
        assert_eq!(
            s.get_mut_like(&other).map(|x| x.unit().to_owned()),
            Some(String::new())
        );
        assert!(s.get_mut_like(&r("z", 1)).is_none());
    }

    /// What a waiting reading costs: the queue holds them by the ten thousand (a device's own
    /// time behind one pointer keeps a reading time to a receive time's size).
    #[test]
    fn a_reading_is_forty_bytes() {
        assert_eq!(size_of::<ReadingTime>(), 16);
        assert_eq!(size_of::<SensorReading>(), 40);
    }

    #[test]
    fn insert_replaces_or_adds_in_order() {
        let mut s = Sensors::default();
        assert!(s.is_empty());
        s.insert(r("m", 1));
        s.insert(r("a", 2));
        s.insert(r("z", 3));
        s.insert(r("m", 4));
        assert_eq!(s.keys().collect::<Vec<_>>(), ["a", "m", "z"]);
        assert_eq!(s.get("m").unwrap().value.as_f64(), Some(4.0));
        assert_eq!(s.get("q"), None);
    }
}
