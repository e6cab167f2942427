//! Fuzzing the payload module through its public API with proptest.
//!
//! CI runs proptest's default 256 cases per property. A long run scales the count with the
//! environment (see the README, "Hostile input and fuzzing"):
//!
//! ```text
//! PROPTEST_CASES=1000000 cargo test --release --test payload_fuzz
//! ```
//!
//! Properties: `process` never panics on any bytes, any JSON-ish text or any JSON value, for
//! any kind; it is deterministic; a rejection carries one of the listed reasons; and whatever
//! it accepts is valid (names match the rule, values are finite, times are RFC 3339,
//! coordinates in range, a data update is never empty, `device_status` fits its column).

use chrono::{DateTime, TimeZone, Utc};
use mqtt_ingest::intake::model::{Change, DeviceUuid, TopicKind};
use mqtt_ingest::intake::payload::{Rules, process, repair};
use mqtt_ingest::intake::rejection::Rejection;
use proptest::prelude::*;
use serde_json::{Map, Value};

fn at() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 1, 2, 3, 4, 5).unwrap()
}

fn dev() -> DeviceUuid {
    DeviceUuid::parse("fuzz-device").unwrap()
}

fn rules() -> Rules {
    let mut r = Rules {
        max_payload_bytes: 4096,
        ..Rules::default()
    };
    r.sensor_ranges.insert("humidity".into(), 0.0..=100.0);
    r
}

fn is_name(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 50
        && b[0].is_ascii_lowercase()
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'_')
}

fn rfc3339(s: &str) -> bool {
    DateTime::parse_from_rfc3339(s).is_ok()
}

/// Runs `process` twice (it must be deterministic) and checks what it returned.
fn check(kind: TopicKind, bytes: &[u8]) -> Result<(), TestCaseError> {
    let rules = rules();
    let first = process(kind, dev(), bytes, at(), &rules);
    let second = process(kind, dev(), bytes, at(), &rules);
    prop_assert_eq!(&first, &second);
    match first {
        Err(r) => {
            prop_assert!(Rejection::REASONS.contains(&r.reason()));
            prop_assert!(!matches!(
                r,
                Rejection::BadTopic
                    | Rejection::BadDeviceId
                    | Rejection::UnknownDevice
                    | Rejection::DbRefused(_)
            ));
            if bytes.len() > rules.max_payload_bytes {
                prop_assert!(
                    matches!(r, Rejection::TooLarge { .. }),
                    "not too_large: {:?}",
                    r
                );
            }
        }
        Ok(a) => {
            prop_assert!(bytes.len() <= rules.max_payload_bytes);
            prop_assert_eq!(a.update.kind(), kind);
            if let Some(t) = &a.update.reading_time {
                prop_assert!(rfc3339(t));
            }
            match a.update.change {
                Change::Data(d) => {
                    prop_assert!(
                        !d.sensors.is_empty() || d.status.is_some() || d.location.is_some()
                    );
                    for (name, r) in &d.sensors {
                        prop_assert!(is_name(name), "name {:?}", name);
                        let v = r.value.as_f64();
                        prop_assert!(v.is_some_and(f64::is_finite), "value {}", r.value);
                        let negative_zero = v == Some(0.0) && r.value.to_string().starts_with('-');
                        prop_assert!(!negative_zero, "negative zero {}", r.value);
                        prop_assert!(rfc3339(&r.timestamp.text()));
                        if name == "humidity" {
                            prop_assert!((0.0..=100.0).contains(&v.unwrap()));
                        }
                    }
                    if let Some(l) = d.location {
                        prop_assert!(l.latitude.as_f64().unwrap().abs() <= 90.0);
                        prop_assert!(l.longitude.as_f64().unwrap().abs() <= 180.0);
                    }
                }
                Change::Status(s) => {
                    // Any status is a sign of life, except an "offline" one.
                    if !s.online() {
                        prop_assert!(
                            s.device_status
                                .as_deref()
                                .is_some_and(|t| t.eq_ignore_ascii_case("offline"))
                        );
                    }
                }
                Change::Heartbeat => prop_assert_eq!(kind, TopicKind::Heartbeat),
            }
        }
    }
    Ok(())
}

fn any_kind() -> impl Strategy<Value = TopicKind> {
    prop_oneof![
        Just(TopicKind::Data),
        Just(TopicKind::Status),
        Just(TopicKind::Heartbeat)
    ]
}

/// Keys the parser looks for, hostile names, and anything.
fn key() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => prop_oneof![
            Just("sensors"), Just("sensor_name"), Just("value"), Just("unit"),
            Just("timestamp"), Just("status"), Just("location"), Just("latitude"),
            Just("longitude"), Just("humidity"), Just("t"),
        ]
        .prop_map(str::to_owned),
        2 => "[a-z][a-z0-9_]{0,55}",
        1 => "\\PC{0,12}",
        1 => "[\u{202e}\u{200f}\u{0}\u{feff}a-z]{1,6}",
    ]
}

/// Numbers at the edges: zeros, signs, huge, tiny, integers beyond i64.
fn number_text() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("-0".to_owned()),
        Just("-0.0".to_owned()),
        Just("0e0".to_owned()),
        Just("1e308".to_owned()),
        Just("1e400".to_owned()),
        Just("-1e400".to_owned()),
        Just("5e-324".to_owned()),
        Just("123456789012345678901234567890".to_owned()),
        Just("18446744073709551616".to_owned()),
        Just("-9223372036854775809".to_owned()),
        any::<i64>().prop_map(|n| n.to_string()),
        any::<f64>().prop_map(|f| format!("{f:e}")),
        (-200i32..200, -400i32..400).prop_map(|(m, e)| format!("{m}e{e}")),
    ]
}

/// Timestamps: valid far past and future, near misses, and text.
fn timestamp_text() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("2025-12-19T14:30:00+08:00".to_owned()),
        Just("0001-01-01T00:00:00Z".to_owned()),
        Just("9999-12-31T23:59:59.999999999Z".to_owned()),
        Just("2016-12-31T23:59:60Z".to_owned()),
        Just("2025-02-30T00:00:00Z".to_owned()),
        Just("2025-12-19 14:30:00".to_owned()),
        Just("2025-12-19T14:30:00+24:00".to_owned()),
        (0u32..10000, 0u32..14, 0u32..33, 0u32..25, 0u32..61)
            .prop_map(|(y, mo, d, h, mi)| format!("{y:04}-{mo:02}-{d:02}T{h:02}:{mi:02}:00Z")),
    ]
}

/// JSON text built from pieces, so numbers and strings the `Value` type cannot hold (1e400,
/// duplicate keys, deep nesting) appear too.
fn json_text() -> impl Strategy<Value = String> {
    let leaf = prop_oneof![
        number_text(),
        timestamp_text().prop_map(|t| format!("{t:?}")),
        key().prop_map(|k| serde_json::to_string(&k).unwrap()),
        Just("null".to_owned()),
        Just("true".to_owned()),
        Just("\"\\u0000\"".to_owned()),
        Just("\"\\ud800\"".to_owned()),
        (1usize..300).prop_map(|n| format!("{}1{}", "[".repeat(n), "]".repeat(n))),
    ];
    leaf.prop_recursive(5, 96, 8, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(|v| format!("[{}]", v.join(","))),
            prop::collection::vec((key(), inner), 0..8).prop_map(|kv| {
                let body: Vec<String> = kv
                    .into_iter()
                    .map(|(k, v)| format!("{}:{v}", serde_json::to_string(&k).unwrap()))
                    .collect();
                format!("{{{}}}", body.join(","))
            }),
        ]
    })
}

/// Well-formed payloads of both data formats and of status, with every field drawn from good
/// and bad values: this is what reaches the deep branches.
fn shaped() -> impl Strategy<Value = Value> {
    let any_value = prop_oneof![
        // Text `Value` cannot hold (1e400, NaN) becomes 0 rather than a rejected case.
        number_text().prop_map(|t| serde_json::from_str::<Value>(&t).unwrap_or(Value::from(0))),
        timestamp_text().prop_map(Value::String),
        key().prop_map(Value::String),
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        Just(Value::Array(vec![])),
        Just(Value::Object(Map::new())),
    ];
    let entry = prop::collection::btree_map(
        prop_oneof![
            Just("sensor_name".to_owned()),
            Just("value".to_owned()),
            Just("unit".to_owned()),
            Just("timestamp".to_owned()),
            key(),
        ],
        any_value.clone(),
        0..5,
    )
    .prop_map(|m| Value::Object(m.into_iter().collect()));
    let location = prop::collection::btree_map(
        prop_oneof![
            Just("latitude".to_owned()),
            Just("longitude".to_owned()),
            key()
        ],
        any_value.clone(),
        0..3,
    )
    .prop_map(|m| Value::Object(m.into_iter().collect()));
    let full = (
        prop::collection::vec(prop_oneof![4 => entry, 1 => any_value.clone()], 0..6),
        prop::option::of(any_value.clone()),
        prop::option::of(prop_oneof![location, any_value.clone()]),
        prop::option::of(any_value.clone()),
    )
        .prop_map(|(sensors, status, location, ts)| {
            let mut m = Map::new();
            m.insert("sensors".into(), Value::Array(sensors));
            for (k, v) in [
                ("status", status),
                ("location", location),
                ("timestamp", ts),
            ] {
                if let Some(v) = v {
                    m.insert(k.into(), v);
                }
            }
            Value::Object(m)
        });
    let simple = prop::collection::btree_map(key(), any_value, 0..8)
        .prop_map(|m| Value::Object(m.into_iter().collect()));
    prop_oneof![full, simple]
}

proptest! {
    // No config: proptest's defaults, so PROPTEST_CASES scales every property.

    #[test]
    fn arbitrary_bytes(kind in any_kind(), bytes in prop::collection::vec(any::<u8>(), 0..5000)) {
        check(kind, &bytes)?;
    }

    #[test]
    fn json_like_text(kind in any_kind(), text in json_text(), bom in any::<bool>(), nuls in 0usize..3) {
        let mut bytes = Vec::new();
        if bom {
            bytes.extend_from_slice(b"\xEF\xBB\xBF");
        }
        bytes.extend_from_slice(text.as_bytes());
        bytes.extend(std::iter::repeat_n(0u8, nuls));
        check(kind, &bytes)?;
    }

    #[test]
    fn shaped_payloads(kind in any_kind(), v in shaped()) {
        check(kind, v.to_string().as_bytes())?;
    }

    #[test]
    fn mutated_valid_payloads(
        kind in any_kind(),
        flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..6),
    ) {
        let mut bytes = br#"{"sensors": [{"sensor_name": "temperature", "value": 25.5, "unit": "C", "timestamp": "2025-12-19T14:30:00+08:00"}], "status": {"status": "online", "rssi": -50}, "location": {"latitude": 39.9, "longitude": 116.4}, "timestamp": "2025-12-19T14:30:00Z"}"#.to_vec();
        for (i, b) in flips {
            let i = i.index(bytes.len());
            bytes[i] = b;
        }
        check(kind, &bytes)?;
    }

    #[test]
    fn repair_only_cuts_off_ends(bytes in prop::collection::vec(any::<u8>(), 0..64)) {
        let out = repair(&bytes);
        // A slice of the input: nothing inside is changed.
        let start = out.as_ptr() as usize - bytes.as_ptr() as usize;
        prop_assert!(out.is_empty() || bytes[start..start + out.len()] == *out);
    }
}
