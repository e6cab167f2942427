//! Every deliberate difference from CodeHubot's Python MQTT service, in one list: the table of
//! `docs/switching-from-python.md` is made from it (a test keeps the two in step), and
//! `compare` calls a difference "expected" only by one of the classes named here.

use serde::Serialize;

/// What `compare` calls a difference it expects: each is one or more rows of [`DIFFERENCES`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Class {
    /// mqtt-ingest has a later message of the device than the Python service.
    PythonLostMessage,
    /// The Python service kept the first status in `last_report_data` and lost the merges after.
    LostStatusMerge,
    /// A status `"offline"`: mqtt-ingest sets the device offline, the Python service leaves it.
    OfflineStatus,
    /// A silent device set offline by the presence sweep.
    PresenceSweep,
    /// A `device_status` cut to the column or turned into text.
    DeviceStatusFitted,
    /// Readings (and a data message's status and location) in `last_report_data`, which the
    /// Python service does not write.
    NotInLastReportData,
    /// An older reading kept out by mqtt-ingest, taken by the Python service.
    LateOlderReading,
    /// A reading's time read differently (the device's own time, or the receive time).
    DeviceTime,
    /// The same number written as different text.
    NumberText,
    /// A status `timestamp` text that dates nothing, which mqtt-ingest leaves out.
    StatusTimestamp,
    /// A sensor name the Python service takes and the seed's rule does not.
    SensorNameRule,
    /// A numeric `device_id` stored by the Python service as a reading.
    NumericDeviceId,
    /// `NaN` or `Infinity`, which is not JSON: taken by the Python service.
    NotJson,
}

impl Class {
    /// Every class, in the order the summary lists them.
    pub const ALL: [Class; 13] = [
        Class::PythonLostMessage,
        Class::LostStatusMerge,
        Class::OfflineStatus,
        Class::PresenceSweep,
        Class::DeviceStatusFitted,
        Class::NotInLastReportData,
        Class::LateOlderReading,
        Class::DeviceTime,
        Class::NumberText,
        Class::StatusTimestamp,
        Class::SensorNameRule,
        Class::NumericDeviceId,
        Class::NotJson,
    ];

    /// The name `compare` prints and the JSON form carries.
    pub fn name(self) -> &'static str {
        match self {
            Class::PythonLostMessage => "python_lost_message",
            Class::LostStatusMerge => "lost_status_merge",
            Class::OfflineStatus => "offline_status",
            Class::PresenceSweep => "presence_sweep",
            Class::DeviceStatusFitted => "device_status_fitted",
            Class::NotInLastReportData => "not_in_last_report_data",
            Class::LateOlderReading => "late_older_reading",
            Class::DeviceTime => "device_time",
            Class::NumberText => "number_text",
            Class::StatusTimestamp => "status_timestamp",
            Class::SensorNameRule => "sensor_name_rule",
            Class::NumericDeviceId => "numeric_device_id",
            Class::NotJson => "not_json",
        }
    }

    /// How `compare` recognises it in the tables.
    pub fn seen_as(self) -> &'static str {
        match self {
            Class::PythonLostMessage => {
                "mqtt-ingest's `last_seen`, `last_heartbeat` or reading is later than the Python service's (beyond the tolerance), and not in the future"
            }
            Class::LostStatusMerge => {
                "a status key mqtt-ingest holds and the Python service lacks or holds an earlier value of the same kind, where the Python service's status is what the shadow copy held (or the copy had none)"
            }
            Class::OfflineStatus => {
                "offline in mqtt-ingest, whose stored status says `offline`; online in the Python service"
            }
            Class::PresenceSweep => {
                "offline in mqtt-ingest with the same `last_seen`, silent for `PRESENCE_TIMEOUT_SECS`; online in the Python service"
            }
            Class::DeviceStatusFitted => {
                "mqtt-ingest's `device_status` is as long as the column (20) or a number's text"
            }
            Class::NotInLastReportData => {
                "the Python service's sensors or location in `last_report_data` are what they were when the shadow copy was made"
            }
            Class::LateOlderReading => {
                "a reading's value, unit or type differs and the Python service's is dated later than mqtt-ingest's, which saw the device as recently and whose two tables agree on the reading"
            }
            Class::DeviceTime => {
                "the same value with times further apart than the tolerance, where mqtt-ingest's two tables agree on the reading's time"
            }
            Class::NumberText => "two texts of the same number (`1e+20`, `1e20`)",
            Class::StatusTimestamp => {
                "a status `timestamp` text that reads as no time, stored by the Python service and not by mqtt-ingest"
            }
            Class::SensorNameRule => {
                "a `device_sensors` row only the Python service has, named against the seed's rule"
            }
            Class::NumericDeviceId => {
                "a `device_sensors` row `device_id` only the Python service has"
            }
            Class::NotJson => {
                "a `nan` or `inf` reading the Python service stored, and the later `last_seen` it set then"
            }
        }
    }
}

/// One deliberate difference.
#[derive(Debug, Clone, Copy)]
pub struct Difference {
    /// What it is about.
    pub subject: &'static str,
    /// What the Python service does.
    pub python: &'static str,
    /// What mqtt-ingest does.
    pub ingest: &'static str,
    /// Why.
    pub why: &'static str,
    /// What `compare` calls it, where it shows in the tables compare reads.
    pub class: Option<Class>,
}

const fn row(
    subject: &'static str,
    python: &'static str,
    ingest: &'static str,
    why: &'static str,
    class: Option<Class>,
) -> Difference {
    Difference {
        subject,
        python,
        ingest,
        why,
        class,
    }
}

/// Every deliberate difference, in the order the docs list them.
pub const DIFFERENCES: &[Difference] = &[
    row(
        "Messages while the service is down or restarting",
        "lost: clean session, a new client id each start (`mqtt_service_<time>`)",
        "kept: a persistent session under the stable `MQTT_CLIENT_ID`, acknowledged only after the commit",
        "nothing lost between broker and database. Give the broker room to queue (`max_queued_messages`, see [delivery.md](delivery.md))",
        Some(Class::PythonLostMessage),
    ),
    row(
        "Status merges into `last_report_data` after the first",
        "silently lost once the column is not empty (SQLAlchemy does not see changes inside a JSON dict)",
        "every message merged",
        "the stored status is what the device last said",
        Some(Class::LostStatusMerge),
    ),
    row(
        "`{\"status\": \"offline\"}` (a last will)",
        "`is_online` stays 1",
        "`is_online = 0`",
        "an offline device shows offline",
        Some(Class::OfflineStatus),
    ),
    row(
        "A device that falls silent",
        "`is_online` stays 1 (the backend shows it offline after 5 minutes)",
        "`is_online = 0` after `PRESENCE_TIMEOUT_SECS` (90 s: three missed heartbeats)",
        "the table says what the backend would; `PRESENCE_TIMEOUT_SECS=0` turns it off",
        Some(Class::PresenceSweep),
    ),
    row(
        "`device_status` longer than the column (20) or not text",
        "the write fails, the whole message is lost",
        "cut to the column's length; a number becomes its text; an object leaves it unchanged",
        "the sign of life is not lost to one field",
        Some(Class::DeviceStatusFitted),
    ),
    row(
        "Sensors in `last_report_data` (and a data message's `status` and `location`)",
        "the current version writes only `device_sensors`",
        "both",
        "readers of either keep working",
        Some(Class::NotInLastReportData),
    ),
    row(
        "An older reading arriving late",
        "overwrites the newer one",
        "kept out, in both tables",
        "a redelivered or delayed message cannot roll a sensor back",
        Some(Class::LateOlderReading),
    ),
    row(
        "Device timestamps",
        "copied as sent into `last_report_data`; `device_sensors` took a simple-format message's text `timestamp` but only an entry's own in the other format (else the receive time), and stored `…Z` times as UTC wall-clock, 8 hours off",
        "a plausible wall-clock time dates the reading (written in `DB_TIMEZONE`; a Unix number only within the last 7 days, so an uptime in milliseconds is not mistaken for a date); anything else (uptime counters, a clock never set, year 9999) dates nothing and is counted",
        "times in one zone; a broken clock cannot freeze a sensor",
        Some(Class::DeviceTime),
    ),
    row(
        "`upload_timestamp`",
        "the device's `timestamp` as sent (the firmware's uptime, e.g. `90`) or naive `isoformat()`",
        "the receive time, RFC 3339 with the zone's offset (`2026-11-30T18:00:01.234+08:00`)",
        "an uptime counter is not a time",
        None,
    ),
    row(
        "A status `timestamp`",
        "stored as sent",
        "stored as read (`…+08:00`); text that dates nothing is left out of the stored status, a number is kept",
        "the stored status time orders later statuses: garbage must not",
        Some(Class::StatusTimestamp),
    ),
    row(
        "Receive times inside `last_report_data`",
        "naive (`2025-12-19T23:11:38.123456`)",
        "with an offset (`…+08:00`)",
        "unambiguous; the backend passes them through unread",
        None,
    ),
    row(
        "`updated_at` (`ON UPDATE CURRENT_TIMESTAMP`)",
        "the server's zone (UTC in CodeHubot's compose)",
        "`DB_TIMEZONE`: the session's `time_zone` is set to it",
        "agrees with `last_seen`. Rows written before the switch keep their UTC `updated_at` until written again",
        None,
    ),
    row(
        "A bad part of a message (a sensor entry that is not an object, a data or status payload that is not an object)",
        "the whole message is rolled back, `last_seen` not updated, counted as a success",
        "the part is skipped with a warning, the rest is written",
        "one bad field does not hide a device",
        Some(Class::PythonLostMessage),
    ),
    row(
        "Sensor names",
        "`^[a-z_][a-z0-9_]*$` (a leading `_`, a trailing newline pass)",
        "the seed README's rule, `^[a-z][a-z0-9_]{0,49}$`",
        "as documented",
        Some(Class::SensorNameRule),
    ),
    row(
        "`NaN`, `Infinity`, a number beyond a double (`1e400`)",
        "accepted (then the JSON write fails, or `nan` is stored)",
        "not JSON: the message is rejected (`not_json`)",
        "not valid JSON, no meaningful reading",
        Some(Class::NotJson),
    ),
    row(
        "A numeric `device_id` in the simple format",
        "stored as a sensor `device_id`",
        "never a reading",
        "it is the device's name",
        Some(Class::NumericDeviceId),
    ),
    row(
        "Empty heartbeat payload",
        "`JSON解析失败`",
        "accepted",
        "a heartbeat carries nothing else",
        Some(Class::PythonLostMessage),
    ),
    row(
        "Success count",
        "a missing device or failed write counted as success",
        "counted as failed, by reason (`/metrics`)",
        "the numbers mean what they say",
        None,
    ),
    row(
        "Number text in `device_sensors`",
        "Python's `str()`",
        "JSON as sent: the same for what the firmware sends (`24.3`, `55.0`, `25`); exponents differ (`1e+20` vs `1e20`)",
        "numbers are kept exactly as the device wrote them",
        Some(Class::NumberText),
    ),
    row(
        "Repeated warnings",
        "one line per message",
        "one per device and reason per `LOG_WARN_INTERVAL_SECS`, with the count left out; timestamps that date nothing, one line for all devices",
        "a fleet of firmware that sends uptime counters would warn on every message",
        None,
    ),
    row(
        "Log words",
        "Chinese",
        "English; `LOG_STYLE=codehubot` adds the seed's lines",
        "",
        None,
    ),
    row(
        "Device ids in topics",
        "anything",
        "1–64 of `[A-Za-z0-9_.:-]` (UUIDs and MAC addresses pass)",
        "rejected before any SQL",
        None,
    ),
    row(
        "`INGEST_REGISTER_UNKNOWN_DEVICES=true`",
        "(no such option)",
        "refused at start-up on the backend's table (a new row needs a `device_secret`)",
        "a half-made device row would break the backend",
        None,
    ),
];

/// The table of `docs/switching-from-python.md` ("What differs, and why").
pub fn markdown_table() -> String {
    let mut out = String::from(
        "| | Python service | mqtt-ingest | why | `compare` calls it |\n|---|---|---|---|---|\n",
    );
    for d in DIFFERENCES {
        let class = match d.class {
            Some(c) => format!("`{}`", c.name()),
            None => "—".to_owned(),
        };
        out.push_str(&format!(
            "| {} | {} | {} | {} | {class} |\n",
            d.subject, d.python, d.ingest, d.why
        ));
    }
    out
}

/// The classes and how `compare` recognises each, as a Markdown list.
pub fn markdown_classes() -> String {
    Class::ALL
        .iter()
        .map(|c| format!("- `{}`: {}\n", c.name(), c.seen_as()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_class_names_a_difference_and_is_listed_once() {
        for c in Class::ALL {
            assert!(
                DIFFERENCES.iter().any(|d| d.class == Some(c)),
                "{} is no documented difference",
                c.name()
            );
            assert_eq!(Class::ALL.iter().filter(|x| **x == c).count(), 1);
        }
    }

    /// The docs' table and list of classes are made from this file: `MQTT_INGEST_BLESS=1`
    /// writes them there.
    #[test]
    fn the_docs_show_this_list() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/docs/switching-from-python.md");
        let docs = std::fs::read_to_string(path).expect("docs/switching-from-python.md");
        let mut want = docs.clone();
        for (name, body) in [
            ("differences", markdown_table()),
            ("classes", markdown_classes()),
        ] {
            let begin = format!("<!-- {name}: made from src/switch/differences.rs -->\n");
            let end = format!("<!-- end of {name} -->");
            let (Some(b), Some(e)) = (want.find(&begin), want.find(&end)) else {
                panic!("{path} lacks the markers {begin:?} … {end:?}");
            };
            want.replace_range(b + begin.len()..e, &body);
        }
        if want != docs {
            if std::env::var_os("MQTT_INGEST_BLESS").is_some() {
                std::fs::write(path, &want).expect("write the docs");
            } else {
                panic!(
                    "{path} differs from src/switch/differences.rs: run MQTT_INGEST_BLESS=1 cargo nextest run --lib switch::"
                );
            }
        }
    }
}
