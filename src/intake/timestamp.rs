//! What a device's `timestamp` field means, pure: a reading time, or nothing.
//!
//! Devices send all sorts: RFC 3339 with an offset (the backend's documented shape), Python's
//! `isoformat()` without one, Unix seconds or milliseconds, and — the real ESP32 firmware —
//! seconds (data, status) or milliseconds (heartbeat) since boot. Only a plausible wall-clock
//! time dates a reading. Anything else dates nothing and the readings keep the receive time:
//! a timestamp never costs a reading, and a time far in the future (a clock set to 9999)
//! cannot freeze a sensor, since order-safe merging would refuse everything after it.

use std::time::Duration;

use crate::intake::json::Json;
use crate::intake::zone::Zone;
use chrono::{DateTime, FixedOffset, NaiveDateTime, SecondsFormat, Utc};

/// Earliest time taken as a reading time (2000-01-01T00:00:00Z): below it a number is an
/// uptime counter, and a date is a device clock that was never set.
pub const EARLIEST_UNIX_SECS: i64 = 946_684_800;

/// Oldest a number may date a reading, before the receive time. A Unix time is only told from a
/// counter by its size: milliseconds since boot pass 2000-01-01 read as seconds after 11.6 days
/// of uptime, so a number dates a reading only when it lands near now (an uptime in
/// milliseconds then looks like a time for about 10 minutes, once, at 20.4 days). Text carries
/// its own date and has no such limit.
pub const NUMBER_MAX_AGE: chrono::TimeDelta = chrono::TimeDelta::days(7);

/// How a timestamp is read.
#[derive(Debug, Clone, PartialEq)]
pub struct TimeRules {
    /// The zone in which a time without an offset is read.
    pub zone: Zone,
    /// How far past the receive time a reading time may lie (device clocks drift).
    pub max_clock_skew: Duration,
}

impl Default for TimeRules {
    fn default() -> Self {
        Self {
            zone: Zone::default(),
            max_clock_skew: Duration::from_secs(300),
        }
    }
}

/// Why a timestamp dated nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Undatable {
    /// Not a time at all: an uptime counter, a number before 2000, text in no known form,
    /// a boolean, an object.
    NotATime,
    /// A time further in the future than the allowed clock skew.
    Future,
}

impl Undatable {
    /// Every reason, as counted in metrics.
    pub const ALL: [Undatable; 2] = [Undatable::NotATime, Undatable::Future];

    /// Short, stable name (a metrics label).
    pub fn as_str(self) -> &'static str {
        match self {
            Undatable::NotATime => "not_a_time",
            Undatable::Future => "future",
        }
    }
}

/// Reads `value` as a reading time; `Ok` is RFC 3339 text to store: an RFC 3339 string as
/// sent, anything else rendered in the rules' zone.
pub fn read(
    value: &Json<'_>,
    received_at: DateTime<FixedOffset>,
    rules: &TimeRules,
) -> Result<String, Undatable> {
    let (instant, text) = match value {
        Json::Str(s) => read_text(s, rules)?,
        Json::Number(n) => {
            let instant = n
                .as_i64()
                .and_then(from_unix_integer)
                .or_else(|| n.as_f64().and_then(from_unix_float))
                .ok_or(Undatable::NotATime)?;
            if received_at
                .checked_sub_signed(NUMBER_MAX_AGE)
                .is_some_and(|floor| instant < floor)
            {
                return Err(Undatable::NotATime);
            }
            (instant, None)
        }
        _ => return Err(Undatable::NotATime),
    };
    if instant.timestamp() < EARLIEST_UNIX_SECS {
        return Err(Undatable::NotATime);
    }
    let skew = chrono::Duration::from_std(rules.max_clock_skew).unwrap_or(chrono::Duration::MAX);
    if received_at
        .checked_add_signed(skew)
        .is_some_and(|limit| instant > limit)
    {
        return Err(Undatable::Future);
    }
    Ok(text.unwrap_or_else(|| {
        rules
            .zone
            .at(instant.with_timezone(&Utc))
            .to_rfc3339_opts(SecondsFormat::AutoSi, true)
    }))
}

/// RFC 3339 (kept as sent), or ISO 8601 without an offset (read in the zone).
fn read_text(
    s: &str,
    rules: &TimeRules,
) -> Result<(DateTime<FixedOffset>, Option<String>), Undatable> {
    if let Ok(t) = DateTime::parse_from_rfc3339(s) {
        return Ok((t, Some(s.to_owned())));
    }
    // Python's `isoformat()` (`2025-12-19T14:30:00`, `…T14:30:00.123456`) and `str()` of a
    // datetime (a space instead of the `T`).
    let naive = NaiveDateTime::parse_from_str(s, "%Y-%m-%dT%H:%M:%S%.f")
        .or_else(|_| NaiveDateTime::parse_from_str(s, "%Y-%m-%d %H:%M:%S%.f"))
        .map_err(|_| Undatable::NotATime)?;
    let t = rules.zone.from_naive(naive).ok_or(Undatable::NotATime)?;
    Ok((t, None))
}

/// Latest Unix time in seconds that is taken as seconds; a larger integer is read as
/// milliseconds (year 5138 in seconds: no real clock sends it).
const SECONDS_UP_TO: i64 = 99_999_999_999;

fn from_unix_integer(n: i64) -> Option<DateTime<FixedOffset>> {
    let t = if n <= SECONDS_UP_TO {
        DateTime::from_timestamp(n, 0)
    } else {
        DateTime::from_timestamp_millis(n)
    };
    t.map(|t| t.fixed_offset())
}

fn from_unix_float(v: f64) -> Option<DateTime<FixedOffset>> {
    if !v.is_finite() || v < 0.0 {
        return None;
    }
    let millis = if v <= SECONDS_UP_TO as f64 {
        v * 1000.0
    } else {
        v
    };
    if millis >= i64::MAX as f64 {
        return None;
    }
    DateTime::from_timestamp_millis(millis.round() as i64).map(|t| t.fixed_offset())
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;
    use proptest::prelude::*;
    use serde_json::json;

    fn received() -> DateTime<FixedOffset> {
        Utc.with_ymd_and_hms(2026, 11, 30, 12, 0, 0)
            .unwrap()
            .fixed_offset()
    }

    /// `read` of `v`'s JSON text, as a payload gives it.
    fn read_with(v: serde_json::Value, rules: &TimeRules) -> Result<String, Undatable> {
        let text = v.to_string();
        read(
            &crate::intake::json::parse(&text).unwrap(),
            received(),
            rules,
        )
    }

    fn read_at(v: serde_json::Value) -> Result<String, Undatable> {
        read_with(v, &TimeRules::default())
    }

    #[test]
    fn rfc3339_with_an_offset_is_kept_as_sent() {
        for s in [
            "2025-12-19T14:30:00+08:00",
            "2025-12-19T06:30:00Z",
            "2026-11-30T12:04:59.999Z",
        ] {
            assert_eq!(read_at(json!(s)).unwrap(), s);
        }
    }

    #[test]
    fn naive_iso_is_read_in_the_zone() {
        assert_eq!(
            read_at(json!("2025-12-19T14:30:00")).unwrap(),
            "2025-12-19T14:30:00+08:00"
        );
        assert_eq!(
            read_at(json!("2025-12-19T14:30:00.123456")).unwrap(),
            "2025-12-19T14:30:00.123456+08:00"
        );
        assert_eq!(
            read_at(json!("2025-12-19 14:30:00")).unwrap(),
            "2025-12-19T14:30:00+08:00"
        );
        let utc = TimeRules {
            zone: Zone::utc(),
            ..TimeRules::default()
        };
        assert_eq!(
            read_with(json!("2025-12-19T14:30:00"), &utc).unwrap(),
            "2025-12-19T14:30:00Z"
        );
    }

    #[test]
    fn unix_seconds_and_milliseconds() {
        // 2026-11-30T11:00:00Z
        assert_eq!(
            read_at(json!(1_796_036_400)).unwrap(),
            "2026-11-30T19:00:00+08:00"
        );
        assert_eq!(
            read_at(json!(1_796_036_400_250_i64)).unwrap(),
            "2026-11-30T19:00:00.250+08:00"
        );
        assert_eq!(
            read_at(json!(1_796_036_400.5)).unwrap(),
            "2026-11-30T19:00:00.500+08:00"
        );
    }

    #[test]
    fn firmware_uptime_counters_and_garbage_date_nothing() {
        // The ESP32 firmware: seconds since boot in data/status, milliseconds in heartbeats.
        for v in [
            json!(1530),
            json!(0),
            json!(1_530_123),
            json!(90_512),
            // Milliseconds since boot after 15 days: 2011 when read as seconds.
            json!(1_296_000_000),
            // A real Unix time, but eight days before the receive time.
            json!(1_796_036_400 - 8 * 86_400),
            json!(-5),
            json!(12.5),
            json!("yesterday"),
            json!(""),
            json!("1796036400"),
            json!(true),
            json!(null),
            json!({"t": 1}),
            json!("1970-01-01T00:00:00Z"),
            json!("1999-12-31T23:59:59Z"),
        ] {
            assert_eq!(read_at(v.clone()), Err(Undatable::NotATime), "{v}");
        }
    }

    #[test]
    fn the_future_beyond_the_skew_dates_nothing() {
        assert_eq!(
            read_at(json!("9999-12-31T23:59:59Z")),
            Err(Undatable::Future)
        );
        assert_eq!(
            read_at(json!("2026-11-30T12:05:01Z")),
            Err(Undatable::Future)
        );
        assert!(read_at(json!("2026-11-30T12:05:00Z")).is_ok());
        assert_eq!(read_at(json!(u64::MAX)), Err(Undatable::NotATime));
        assert_eq!(read_at(json!(1e300)), Err(Undatable::NotATime));
        // Year 5138 in milliseconds is still far in the future.
        assert_eq!(
            read_at(json!(99_999_999_999_000_i64)),
            Err(Undatable::Future)
        );
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        /// Any number or text: never a panic, and a time that is accepted parses back as RFC
        /// 3339 within the plausible window.
        #[test]
        fn any_value_reads_to_a_plausible_time_or_nothing(
            n in any::<i64>(),
            f in any::<f64>(),
            s in "\\PC{0,40}",
        ) {
            for v in [json!(n), json!(f), json!(s)] {
                if let Ok(text) = read_at(v) {
                    let t = DateTime::parse_from_rfc3339(&text).unwrap();
                    prop_assert!(t.timestamp() >= EARLIEST_UNIX_SECS);
                    prop_assert!(t <= received() + chrono::Duration::seconds(300));
                }
            }
        }
    }
}
