//! The validated types that cross from the MQTT side to the database side.
//!
//! Everything here has already passed the checks in [`crate::topic`] and [`crate::payload`]:
//! the store accepts only these types, so it never sees raw bytes (parse, don't validate).

use std::collections::BTreeMap;
use std::fmt;

use chrono::{DateTime, Utc};
use serde_json::{Map, Number, Value};

/// What a device calls itself: 1–64 characters of `[A-Za-z0-9_.:-]` (MAC addresses included).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DeviceUuid(String);

impl DeviceUuid {
    /// Longest accepted device id, in bytes (all allowed characters are ASCII).
    pub const MAX_LEN: usize = 64;

    /// Accepts `s` if it is a well-formed device id.
    pub fn parse(s: &str) -> Option<Self> {
        let ok = !s.is_empty()
            && s.len() <= Self::MAX_LEN
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b':' | b'-'));
        ok.then(|| Self(s.to_owned()))
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

/// One sensor's accepted reading, in the stored shape.
#[derive(Debug, Clone, PartialEq)]
pub struct SensorReading {
    /// The number exactly as the device sent it (integers stay integers).
    pub value: Number,
    /// Unit text, `""` when the device gave none.
    pub unit: String,
    /// Reading time as RFC 3339 text: the device's own (kept as sent) or the receive time.
    pub timestamp: String,
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
    pub sensors: BTreeMap<String, SensorReading>,
    /// Status fields to merge by key into the stored `status`.
    pub status: Option<Map<String, Value>>,
    /// Replaces the stored location when present.
    pub location: Option<Location>,
}

/// The valid part of a `status` message.
#[derive(Debug, Clone, PartialEq)]
pub struct StatusReport {
    /// The whole payload object, merged by key into the stored `status`.
    pub fields: Map<String, Value>,
    /// The payload's `status` text, written to `device_status`.
    pub device_status: Option<String>,
    /// `Some(false)` for `"offline"`, `Some(true)` for `"online"`, else `None` (unchanged).
    pub online: Option<bool>,
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
    /// When the service received the message (UTC); becomes `last_seen`.
    pub received_at: DateTime<Utc>,
    /// The message's own top-level `timestamp` (RFC 3339, as sent), when it gave a valid one:
    /// the reading time that order-safe merging compares.
    pub reading_time: Option<String>,
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
