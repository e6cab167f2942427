//! `device_sensors`: one row per device and sensor with its latest value, the table that
//! CodeHubot's current backend and plugin service read sensor values from.
//!
//! Written in the same transaction as the device rows, for every reading of a message whose
//! device row was written. The table belongs to the backend: it is found at start-up (never
//! created), and its column lengths are read then so that a unit or type longer than a column
//! is cut to fit rather than failing the batch.

use std::collections::HashMap;

use chrono::{NaiveDateTime, Utc};
use sqlx::{MySql, MySqlPool, Transaction};

use crate::intake::merge::reading_is_older;
use crate::intake::model::{Change, Update};
use crate::intake::payload::Renames;
use crate::intake::zone::Zone;
use crate::store::sql::{StoreError, fit_chars, placeholders, shaped_chunks};

/// The columns the service writes.
const COLUMNS: [&str; 6] = [
    "device_uuid",
    "sensor_name",
    "sensor_value",
    "sensor_unit",
    "sensor_type",
    "timestamp",
];

/// A `device_sensors` table found at start-up, with its text columns' lengths in characters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SensorTable {
    /// Table name (checked to be a plain identifier by the configuration).
    pub name: String,
    uuid_chars: usize,
    name_chars: usize,
    value_chars: usize,
    unit_chars: usize,
    type_chars: usize,
    /// `SENSOR_RENAMES` as they apply to this table (`SENSOR_RENAMES_IN=device_sensors`).
    pub renames: Renames,
}

impl SensorTable {
    /// The table, its rows written under `renames`' names.
    pub fn with_renames(self, renames: Renames) -> Self {
        Self { renames, ..self }
    }
}

/// What start-up found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Discovery {
    /// The table is there and usable.
    Found(SensorTable),
    /// No table of that name in the database.
    Absent,
    /// The table is there but cannot be written as intended (why).
    Unusable(String),
}

/// Looks for `name` in the connected database and checks its shape: the six columns, and a
/// unique key on exactly `(device_uuid, sensor_name)` (without it an upsert would add a row
/// per reading).
pub async fn discover(pool: &MySqlPool, name: &str) -> Result<Discovery, sqlx::Error> {
    let columns: Vec<(String, Option<i64>)> = sqlx::query_as(
        "SELECT CAST(COLUMN_NAME AS CHAR), CAST(CHARACTER_MAXIMUM_LENGTH AS SIGNED) \
         FROM information_schema.COLUMNS \
         WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = ?",
    )
    .bind(name)
    .fetch_all(pool)
    .await?;
    if columns.is_empty() {
        return Ok(Discovery::Absent);
    }
    let length = |column: &str| {
        columns
            .iter()
            .find(|(c, _)| c.eq_ignore_ascii_case(column))
            .map(|(_, len)| len.and_then(|l| usize::try_from(l).ok()).unwrap_or(0))
    };
    let missing: Vec<&str> = COLUMNS
        .iter()
        .copied()
        .filter(|c| length(c).is_none())
        .collect();
    if !missing.is_empty() {
        return Ok(Discovery::Unusable(format!(
            "it has no column(s) {}",
            missing.join(", ")
        )));
    }
    let unique: Vec<(String, String)> = sqlx::query_as(
        "SELECT CAST(INDEX_NAME AS CHAR), CAST(COLUMN_NAME AS CHAR) \
         FROM information_schema.STATISTICS \
         WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = ? AND NON_UNIQUE = 0",
    )
    .bind(name)
    .fetch_all(pool)
    .await?;
    let mut keys: HashMap<&str, Vec<String>> = HashMap::new();
    for (index, column) in &unique {
        keys.entry(index.as_str())
            .or_default()
            .push(column.to_ascii_lowercase());
    }
    let keyed = keys.values_mut().any(|cols| {
        cols.sort();
        cols == &["device_uuid", "sensor_name"]
    });
    if !keyed {
        return Ok(Discovery::Unusable(
            "it has no unique key on (device_uuid, sensor_name)".into(),
        ));
    }
    // A column that is not text (length NULL) gets what fits any text column.
    let chars = |column| match length(column) {
        Some(0) | None => 255,
        Some(n) => n,
    };
    Ok(Discovery::Found(SensorTable {
        name: name.to_owned(),
        uuid_chars: chars("device_uuid"),
        name_chars: chars("sensor_name"),
        value_chars: chars("sensor_value"),
        unit_chars: chars("sensor_unit"),
        type_chars: chars("sensor_type"),
        renames: Renames::default(),
    }))
}

/// One device's sensor as a row, its texts borrowed from the batch's updates (and the table's
/// renames): a batch holds thousands.
#[derive(Debug, Clone, PartialEq)]
pub struct SensorRow<'a> {
    /// The device id as its topic gave it.
    pub device: &'a str,
    /// Sensor name.
    pub sensor: &'a str,
    /// The value as the Python service wrote it (`True`, `24.3`).
    pub value: String,
    /// Unit, `""` for none.
    pub unit: &'a str,
    /// Sensor type, `""` for none.
    pub sensor_type: &'a str,
    /// Reading time, on the database zone's wall clock.
    pub time: NaiveDateTime,
}

/// The rows of the written `updates` (those whose `written` is true): per device and sensor,
/// the reading with the latest reading time (the later message on a tie), in key order so that
/// writers take their locks in one order. A row that does not fit the table's key columns is
/// left out; text columns are cut to fit.
pub fn rows_of<'a>(
    updates: impl IntoIterator<Item = &'a Update>,
    table: &'a SensorTable,
    zone: &Zone,
) -> Vec<SensorRow<'a>> {
    let mut latest: HashMap<(&str, &str), &crate::intake::model::SensorReading> = HashMap::new();
    for update in updates {
        let Change::Data(report) = &update.change else {
            continue;
        };
        let device = update.device.as_str();
        if device.chars().count() > table.uuid_chars {
            continue;
        }
        for (name, reading) in &report.sensors {
            // The backend's names for this table (the firmware's stay in last_report_data).
            let name = table
                .renames
                .rename(reading.sensor_type(), name)
                .unwrap_or(name);
            if name.chars().count() > table.name_chars {
                continue;
            }
            latest
                .entry((device, name))
                .and_modify(|held| {
                    if !reading_is_older(&reading.timestamp, &held.timestamp) {
                        *held = reading;
                    }
                })
                .or_insert(reading);
        }
    }
    let mut rows: Vec<SensorRow> = latest
        .into_iter()
        .filter_map(|((device, sensor), r)| {
            // Readings carry RFC 3339 times (payload checked them).
            let time = r.timestamp.instant()?;
            let mut value = r.value.to_db_text();
            value.truncate(fit_chars(&value, table.value_chars).len());
            Some(SensorRow {
                device,
                sensor,
                value,
                unit: fit_chars(r.unit(), table.unit_chars),
                sensor_type: fit_chars(r.sensor_type(), table.type_chars),
                time: zone.naive(time.with_timezone(&Utc)),
            })
        })
        .collect();
    rows.sort_by(|a, b| (a.device, a.sensor).cmp(&(b.device, b.sensor)));
    rows
}

/// The upsert for `rows` rows. Order-safe: an older reading does not overwrite a newer one
/// (`timestamp` is assigned last, since MySQL evaluates the assignments in order and the
/// conditions before it must see the stored time). A stored time that is NULL, or further
/// ahead of the database's clock than `skew_secs` (a row left by a device whose clock said
/// 9999), orders nothing: otherwise it would freeze the row. (Public for the benchmark's
/// database ceiling, which runs this very statement.)
pub fn upsert_sql(table: &str, rows: usize, skew_secs: u64) -> String {
    let newer = format!(
        "(`timestamp` IS NULL OR `timestamp` > NOW() + INTERVAL {skew_secs} SECOND \
          OR VALUES(`timestamp`) >= `timestamp`)"
    );
    format!(
        "INSERT INTO `{table}` (device_uuid, sensor_name, sensor_value, sensor_unit, sensor_type, \
                                `timestamp`) VALUES {} \
         ON DUPLICATE KEY UPDATE \
             sensor_value = IF({newer}, VALUES(sensor_value), sensor_value), \
             sensor_unit = IF({newer}, VALUES(sensor_unit), sensor_unit), \
             sensor_type = IF({newer}, VALUES(sensor_type), sensor_type), \
             `timestamp` = IF({newer}, VALUES(`timestamp`), `timestamp`)",
        placeholders(rows, "(?, ?, ?, ?, ?, ?)", ", ")
    )
}

/// Upserts `rows` inside the batch's transaction.
pub async fn upsert(
    tx: &mut Transaction<'static, MySql>,
    table: &SensorTable,
    rows: &[SensorRow<'_>],
    skew: std::time::Duration,
) -> Result<(), StoreError> {
    // Padded with repeats of the last row: a repeat updates its row to the same values.
    for chunk in shaped_chunks(rows) {
        let mut q = sqlx::query(sqlx::AssertSqlSafe(upsert_sql(
            &table.name,
            chunk.len(),
            skew.as_secs(),
        )));
        for r in &chunk {
            q = q
                .bind(r.device)
                .bind(r.sensor)
                .bind(r.value.as_str())
                .bind(r.unit)
                .bind(r.sensor_type)
                .bind(r.time);
        }
        q.execute(&mut **tx).await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::intake::model::{DataReport, DeviceUuid, Sensor, SensorReading, SensorValue};
    use chrono::DateTime;
    use serde_json::Number;

    fn table() -> SensorTable {
        SensorTable {
            name: "device_sensors".into(),
            uuid_chars: 36,
            name_chars: 50,
            value_chars: 255,
            unit_chars: 20,
            type_chars: 5,
            renames: Renames::default(),
        }
    }

    fn data(device: &str, received: &str, readings: &[(&str, SensorValue, &str)]) -> Update {
        let mut report = DataReport::default();
        for (name, value, ts) in readings {
            report.sensors.insert(SensorReading::of(
                Sensor::shared(name, &"°C".repeat(15), Some("RAIN_SENSOR")),
                value.clone(),
                (*ts).into(),
            ));
        }
        Update {
            device: DeviceUuid::parse(device).unwrap(),
            received_at: DateTime::parse_from_rfc3339(received).unwrap(),
            reading_time: None,
            change: Change::Data(report),
        }
    }

    #[test]
    fn renames_give_the_tables_names_only_here() {
        let update = data(
            "rainy",
            "2026-11-22T10:00:00Z",
            &[
                (
                    "is_raining",
                    SensorValue::Bool(true),
                    "2026-11-22T10:00:00Z",
                ),
                (
                    "level",
                    SensorValue::Number(Number::from(0)),
                    "2026-11-22T10:00:00Z",
                ),
            ],
        );
        let plain_table = table();
        let plain = rows_of([&update], &plain_table, &Zone::default());
        assert_eq!(
            plain.iter().map(|r| r.sensor).collect::<Vec<_>>(),
            ["is_raining", "level"]
        );
        let renamed = table().with_renames(Renames::codehubot());
        let rows = rows_of([&update], &renamed, &Zone::default());
        assert_eq!(
            rows.iter().map(|r| r.sensor).collect::<Vec<_>>(),
            ["rain", "rain_level"]
        );
        // The update itself keeps the firmware's names (device_main's last_report_data).
        let Change::Data(report) = &update.change else {
            panic!()
        };
        assert!(report.sensors.contains_key("is_raining"));
    }

    #[test]
    fn latest_reading_per_device_and_sensor_in_key_order_cut_to_fit() {
        let n = |v: f64| SensorValue::Number(Number::from_f64(v).unwrap());
        let updates = [
            data(
                "b",
                "2026-01-01T08:00:05+08:00",
                &[
                    (
                        "rain",
                        SensorValue::Bool(false),
                        "2026-01-01T08:00:05+08:00",
                    ),
                    ("t", n(1.0), "2026-01-01T00:00:10Z"),
                ],
            ),
            // Older than the first by its reading time: not the row's value.
            data(
                "b",
                "2026-01-01T08:00:06+08:00",
                &[("t", n(2.0), "2026-01-01T00:00:09Z")],
            ),
            data(
                "a",
                "2026-01-01T08:00:07+08:00",
                &[("rain", SensorValue::Bool(true), "2026-01-01T08:00:07+08:00")],
            ),
            data(
                "x".repeat(37).as_str(),
                "2026-01-01T08:00:07+08:00",
                &[("t", n(3.0), "2026-01-01T00:00:09Z")],
            ),
        ];
        let t = table();
        let rows = rows_of(&updates, &t, &Zone::default());
        let keys: Vec<(&str, &str, &str)> = rows
            .iter()
            .map(|r| (r.device, r.sensor, r.value.as_str()))
            .collect();
        assert_eq!(
            keys,
            [
                ("a", "rain", "True"),
                ("b", "rain", "False"),
                ("b", "t", "1.0")
            ]
        );
        assert_eq!(rows[2].time.to_string(), "2026-01-01 08:00:10");
        assert_eq!(rows[0].unit.chars().count(), 20);
        assert_eq!(rows[0].sensor_type, "RAIN_");
        let utc = rows_of(&updates, &t, &Zone::utc());
        assert_eq!(utc[2].time.to_string(), "2026-01-01 00:00:10");
    }

    #[test]
    fn the_stored_time_is_assigned_last() {
        let sql = upsert_sql("device_sensors", 2, 300);
        let value = sql.find("sensor_value = IF").unwrap();
        let time = sql.find("`timestamp` = IF").unwrap();
        assert!(value < time, "{sql}");
        assert_eq!(sql.matches('?').count(), 12);
    }
}
