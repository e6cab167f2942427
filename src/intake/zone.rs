//! The database's time zone: the zone in which DATETIME columns (`last_seen`, `last_heartbeat`,
//! `device_sensors.timestamp`, …) are written and timestamps without an offset are read.
//!
//! CodeHubot's backend and its Python MQTT service keep these columns as naive Beijing time
//! (UTC+8) and the backend's offline check compares `last_seen` with Beijing "now", so that is
//! the default. An IANA name (`Asia/Shanghai`, `Europe/Berlin`) or a fixed offset (`+08:00`,
//! `UTC`) can be set with `DB_TIMEZONE`.

use std::fmt;
use std::str::FromStr;

use chrono::{
    DateTime, Datelike, FixedOffset, LocalResult, NaiveDateTime, TimeZone, Timelike, Utc,
};
use jiff::tz::AmbiguousOffset;

/// A time zone given by name or by a fixed offset.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Zone {
    /// A fixed offset from UTC (`+08:00`, `UTC`).
    Fixed(FixedOffset),
    /// An IANA zone, whose offset may change over the year (daylight saving).
    Named(NamedZone),
}

/// An IANA zone, from the system's tz database (`/usr/share/zoneinfo`), or the copy built in
/// where the system has none (slim containers). jiff rather than chrono-tz: chrono-tz's tables
/// are relocated at start-up and cost about 3 MB of resident memory whatever zone is used.
#[derive(Debug, Clone)]
pub struct NamedZone {
    name: String,
    tz: jiff::tz::TimeZone,
}

impl PartialEq for NamedZone {
    fn eq(&self, other: &Self) -> bool {
        self.name == other.name
    }
}

impl Eq for NamedZone {}

impl Default for Zone {
    /// Beijing time, what a CodeHubot backend expects (the name, so it reads as the backend
    /// says it; the bundled database has it when the system's has not).
    fn default() -> Self {
        Self::named("Asia/Shanghai")
            .unwrap_or_else(|| Zone::Fixed(FixedOffset::east_opt(8 * 3600).expect("+08:00")))
    }
}

impl Zone {
    /// UTC.
    pub fn utc() -> Self {
        Zone::Fixed(FixedOffset::east_opt(0).expect("zero is a valid offset"))
    }

    /// The IANA zone `name`, if the tz database has it.
    fn named(name: &str) -> Option<Self> {
        let tz = jiff::tz::TimeZone::get(name).ok()?;
        Some(Zone::Named(NamedZone {
            name: name.to_owned(),
            tz,
        }))
    }

    /// The offset in force at `instant`.
    fn offset_at(&self, instant: DateTime<Utc>) -> FixedOffset {
        match self {
            Zone::Fixed(offset) => *offset,
            Zone::Named(z) => jiff::Timestamp::new(
                instant.timestamp(),
                i32::try_from(instant.timestamp_subsec_nanos()).unwrap_or(0),
            )
            .ok()
            .and_then(|ts| FixedOffset::east_opt(z.tz.to_offset(ts).seconds()))
            // Outside jiff's range (years beyond ±9999): no zone rules apply there anyway.
            .unwrap_or_else(|| FixedOffset::east_opt(0).expect("zero is a valid offset")),
        }
    }

    /// `instant` as the zone's wall clock shows it, with the offset in force then.
    pub fn at(&self, instant: DateTime<Utc>) -> DateTime<FixedOffset> {
        instant.with_timezone(&self.offset_at(instant))
    }

    /// Now, in this zone.
    pub fn now(&self) -> DateTime<FixedOffset> {
        self.at(Utc::now())
    }

    /// The zone's wall-clock time at `instant`: what goes into a DATETIME column.
    pub fn naive(&self, instant: DateTime<Utc>) -> NaiveDateTime {
        self.at(instant).naive_local()
    }

    /// A wall-clock time of this zone as an instant. During a daylight-saving change a time
    /// that occurs twice is read as the earlier one, and a time that never occurs is `None`.
    pub fn from_naive(&self, wall: NaiveDateTime) -> Option<DateTime<FixedOffset>> {
        match self {
            Zone::Fixed(offset) => match offset.from_local_datetime(&wall) {
                LocalResult::Single(t) => Some(t),
                _ => None,
            },
            Zone::Named(z) => {
                let civil = jiff::civil::DateTime::new(
                    i16::try_from(wall.year()).ok()?,
                    i8::try_from(wall.month()).ok()?,
                    i8::try_from(wall.day()).ok()?,
                    i8::try_from(wall.hour()).ok()?,
                    i8::try_from(wall.minute()).ok()?,
                    i8::try_from(wall.second()).ok()?,
                    i32::try_from(wall.nanosecond()).ok()?,
                )
                .ok()?;
                let offset = match z.tz.to_ambiguous_timestamp(civil).offset() {
                    AmbiguousOffset::Unambiguous { offset } => offset,
                    AmbiguousOffset::Fold { before, .. } => before,
                    AmbiguousOffset::Gap { .. } => return None,
                };
                FixedOffset::east_opt(offset.seconds())?
                    .from_local_datetime(&wall)
                    .single()
            }
        }
    }

    /// The offset in force now, as MySQL's `time_zone` takes it (`+08:00`). A session gets
    /// an offset rather than the name: named zones work on a MySQL/MariaDB server only once
    /// its time-zone tables are loaded, which most are not.
    pub fn session_offset(&self) -> String {
        let secs = self.offset_at(Utc::now()).local_minus_utc();
        let sign = if secs < 0 { '-' } else { '+' };
        let minutes = secs.unsigned_abs() / 60;
        format!("{sign}{:02}:{:02}", minutes / 60, minutes % 60)
    }
}

impl fmt::Display for Zone {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Zone::Fixed(offset) if offset.local_minus_utc() == 0 => f.write_str("UTC"),
            Zone::Fixed(offset) => write!(f, "{offset}"),
            Zone::Named(z) => f.write_str(&z.name),
        }
    }
}

impl FromStr for Zone {
    type Err = String;

    /// `UTC`, `Z`, an offset (`+08:00`, `-0530`, `+8`), optionally after `UTC`/`GMT`
    /// (`UTC+8`), or an IANA name (`Asia/Shanghai`).
    fn from_str(raw: &str) -> Result<Self, String> {
        let s = raw.trim();
        let bad = || {
            format!(
                "must be an IANA time zone (Asia/Shanghai) or an offset (+08:00, UTC), got {raw:?}"
            )
        };
        if s.is_empty() {
            return Err(bad());
        }
        let upper = s.to_ascii_uppercase();
        if matches!(upper.as_str(), "UTC" | "Z" | "GMT" | "ETC/UTC") {
            return Ok(Zone::utc());
        }
        let offset_text = upper
            .strip_prefix("UTC")
            .or_else(|| upper.strip_prefix("GMT"))
            .unwrap_or(&upper);
        if offset_text.starts_with(['+', '-']) {
            return parse_offset(offset_text).map(Zone::Fixed).ok_or_else(bad);
        }
        Zone::named(s).ok_or_else(bad)
    }
}

/// `+08:00`, `+0800`, `+08`, `+8`, `-05:30`: at most ±14:00, as real zones are.
fn parse_offset(s: &str) -> Option<FixedOffset> {
    // Split at byte offsets below: only ASCII can be an offset anyway.
    if !s.is_ascii() {
        return None;
    }
    let (sign, rest) = match s.as_bytes().first()? {
        b'+' => (1, &s[1..]),
        b'-' => (-1, &s[1..]),
        _ => return None,
    };
    let (hours, minutes) = match rest.split_once(':') {
        Some((h, m)) => (h, m),
        None if rest.len() == 4 => rest.split_at(2),
        None => (rest, "0"),
    };
    let all_digits =
        |t: &str| !t.is_empty() && t.len() <= 2 && t.bytes().all(|b| b.is_ascii_digit());
    if !all_digits(hours) || !all_digits(minutes) {
        return None;
    }
    let (h, m): (i32, i32) = (hours.parse().ok()?, minutes.parse().ok()?);
    if m >= 60 || h * 60 + m > 14 * 60 {
        return None;
    }
    FixedOffset::east_opt(sign * (h * 3600 + m * 60))
}

/// `t` as RFC 3339 with milliseconds, `Z` for UTC: what chrono's
/// `to_rfc3339_opts(SecondsFormat::Millis, true)` writes.
///
/// Written out by hand: every message's receive time is written this way (the reading time of
/// readings the device did not date, `upload_timestamp`), and chrono's formatter, which goes
/// through `core::fmt`, cost about 930 instructions a message (`mqtt-ingest-intake-cost`), this
/// about a tenth of that. Years outside 0–9999 are left to chrono. A property test holds the two
/// to the same text.
pub fn rfc3339_millis(t: &DateTime<FixedOffset>) -> String {
    let chrono_text = || t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    let local = t.naive_local();
    let (date, time) = (local.date(), local.time());
    let offset = t.offset().local_minus_utc();
    if !(0..=9999).contains(&date.year()) || offset % 60 != 0 {
        return chrono_text();
    }
    // A leap second's nanoseconds run past 999,999,999: chrono writes it as second 60.
    let (second, millis) = match time.nanosecond() / 1_000_000 {
        m if m >= 1000 => (60, m - 1000),
        m => (time.second(), m),
    };
    let mut text = *b"0000-00-00T00:00:00.000+00:00";
    let mut put = |at: usize, n: u32, width: usize| {
        let mut n = n;
        for i in (at..at + width).rev() {
            text[i] = b'0' + (n % 10) as u8;
            n /= 10;
        }
    };
    put(0, date.year().unsigned_abs(), 4);
    put(5, date.month(), 2);
    put(8, date.day(), 2);
    put(11, time.hour(), 2);
    put(14, time.minute(), 2);
    put(17, second, 2);
    put(20, millis, 3);
    let minutes = offset.unsigned_abs() / 60;
    put(24, minutes / 60, 2);
    put(27, minutes % 60, 2);
    let text = if offset == 0 {
        text[23] = b'Z';
        &text[..24]
    } else {
        text[23] = if offset < 0 { b'-' } else { b'+' };
        &text[..]
    };
    // Digits and separators only: always UTF-8.
    String::from_utf8(text.to_vec()).unwrap_or_else(|_| chrono_text())
}

#[cfg(test)]
mod tests {

    proptest::proptest! {
        /// The hand-written receive-time text is chrono's, for any instant and offset.
        #[test]
        fn rfc3339_millis_is_what_chrono_writes(
            secs in -62_167_219_200i64..300_000_000_000,
            nanos in 0u32..2_000_000_000,
            offset_minutes in -1439i32..=1439,
            offset_seconds in proptest::prop_oneof![proptest::strategy::Just(0i32), 0i32..60],
        ) {
            let offset = FixedOffset::east_opt(offset_minutes * 60 + offset_seconds * offset_minutes.signum()).unwrap();
            if let Some(t) = DateTime::from_timestamp(secs, nanos) {
                let t = t.with_timezone(&offset);
                proptest::prop_assert_eq!(
                    rfc3339_millis(&t),
                    t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
                );
            }
        }
    }

    use super::*;
    use chrono::NaiveDate;

    #[test]
    fn parses_names_and_offsets() {
        assert_eq!("Asia/Shanghai".parse::<Zone>().unwrap(), Zone::default());
        for utc in ["UTC", "utc", "Z", "GMT", "+00:00", "UTC+0", "-00:00"] {
            assert_eq!(utc.parse::<Zone>().unwrap().to_string(), "UTC", "{utc}");
        }
        for (raw, secs) in [
            ("+08:00", 8 * 3600),
            ("+0800", 8 * 3600),
            ("+8", 8 * 3600),
            ("UTC+8", 8 * 3600),
            ("-05:30", -(5 * 3600 + 1800)),
            ("+14:00", 14 * 3600),
        ] {
            assert_eq!(
                raw.parse::<Zone>().unwrap(),
                Zone::Fixed(FixedOffset::east_opt(secs).unwrap()),
                "{raw}"
            );
        }
        for bad in [
            "",
            "Mars/Olympus",
            "+1é1",
            "UTC+1é1",
            "+15:00",
            "+08:60",
            "+8:0:0",
            "08:00",
            "+x",
        ] {
            assert!(bad.parse::<Zone>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn beijing_is_utc_plus_eight_on_the_wall_clock() {
        let zone = Zone::default();
        let instant = Utc.with_ymd_and_hms(2026, 1, 2, 3, 4, 5).unwrap();
        let wall = NaiveDate::from_ymd_opt(2026, 1, 2)
            .unwrap()
            .and_hms_opt(11, 4, 5)
            .unwrap();
        assert_eq!(zone.naive(instant), wall);
        assert_eq!(zone.from_naive(wall).unwrap(), instant);
        assert_eq!(zone.session_offset(), "+08:00");
        assert_eq!(zone.at(instant).to_rfc3339(), "2026-01-02T11:04:05+08:00");
    }

    #[test]
    fn daylight_saving_gaps_and_overlaps() {
        let berlin: Zone = "Europe/Berlin".parse().unwrap();
        let day = |d, h, m| {
            NaiveDate::from_ymd_opt(2026, 3, d)
                .unwrap()
                .and_hms_opt(h, m, 0)
                .unwrap()
        };
        // 2026-03-29 02:30 does not exist in Berlin.
        assert_eq!(berlin.from_naive(day(29, 2, 30)), None);
        assert_eq!(
            berlin
                .from_naive(day(28, 12, 0))
                .unwrap()
                .offset()
                .local_minus_utc(),
            3600
        );
        let autumn = NaiveDate::from_ymd_opt(2026, 10, 25)
            .unwrap()
            .and_hms_opt(2, 30, 0)
            .unwrap();
        // Occurs twice: the earlier (summer time) is taken.
        assert_eq!(
            berlin
                .from_naive(autumn)
                .unwrap()
                .offset()
                .local_minus_utc(),
            7200
        );
        assert_eq!("-05:30".parse::<Zone>().unwrap().session_offset(), "-05:30");
    }
}
