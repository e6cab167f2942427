//! Sensor history (opt-in): every accepted reading appended to `device_history` in the same
//! transaction as the device's state, and old rows removed in small batches in the background.

use std::time::Duration;

use chrono::{NaiveDateTime, Utc};
use sqlx::{MySql, MySqlPool, Transaction};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::intake::model::{Change, Update};
use crate::intake::zone::Zone;
use crate::store::sql::{StoreError, delete_in_batches, fit_chars, placeholders, shaped_chunks};

/// Longest unit kept in history (the column is `VARCHAR(64)`).
const UNIT_MAX_CHARS: usize = 64;

/// Rows deleted per statement by the retention task (the `LIMIT` in its SQL).
const PRUNE_BATCH: u64 = 1000;

/// One reading, as a history row, its texts borrowed from the update (a batch holds thousands).
#[derive(Debug, Clone, PartialEq)]
pub struct HistoryRow<'a> {
    /// The device.
    pub device: &'a str,
    /// Sensor name.
    pub sensor: &'a str,
    /// The value as a double.
    pub value: f64,
    /// Unit text (cut to 64 characters).
    pub unit: &'a str,
    /// When the device read it, on the database zone's wall clock.
    pub reading_time: NaiveDateTime,
    /// When the service received it, on the database zone's wall clock.
    pub received_at: NaiveDateTime,
}

/// The history rows of `update`'s readings.
pub fn rows_of<'a>(
    update: &'a Update,
    zone: &'a Zone,
) -> impl Iterator<Item = HistoryRow<'a>> + 'a {
    let sensors = match &update.change {
        Change::Data(report) => Some(&report.sensors),
        _ => None,
    };
    sensors.into_iter().flatten().filter_map(move |(name, r)| {
        // Validated already: a number and an RFC 3339 time.
        let value = r.value.as_f64()?;
        let reading_time = zone.naive(r.timestamp.instant()?.with_timezone(&Utc));
        Some(HistoryRow {
            device: update.device.as_str(),
            sensor: name,
            value,
            unit: fit_chars(r.unit(), UNIT_MAX_CHARS),
            reading_time,
            received_at: zone.naive(update.received_at.with_timezone(&Utc)),
        })
    })
}

/// Appends `rows` inside the batch's transaction. A reading already there (same device, sensor
/// and reading time: a redelivery) is skipped.
pub async fn append(
    tx: &mut Transaction<'static, MySql>,
    rows: &mut [HistoryRow<'_>],
) -> Result<(), StoreError> {
    // In key order: writers that insert beside each other then take their index locks in the
    // same order, which keeps them from deadlocking on the unique key's gaps.
    rows.sort_by(|a, b| {
        (a.device, a.sensor, a.reading_time).cmp(&(b.device, b.sensor, b.reading_time))
    });
    for chunk in shaped_chunks(rows) {
        let sql = format!(
            "INSERT IGNORE INTO device_history \
               (device_uuid, sensor, value, unit, reading_time, received_at) VALUES {}",
            placeholders(chunk.len(), "(?, ?, ?, ?, ?, ?)", ", ")
        );
        let mut q = sqlx::query(sqlx::AssertSqlSafe(sql));
        for r in &chunk {
            q = q
                .bind(r.device)
                .bind(r.sensor)
                .bind(r.value)
                .bind(r.unit)
                .bind(r.reading_time)
                .bind(r.received_at);
        }
        q.execute(&mut **tx).await?;
    }
    Ok(())
}

/// Deletes rows received before `cutoff`, in small batches; returns how many.
pub async fn prune(pool: &MySqlPool, cutoff: NaiveDateTime) -> Result<u64, sqlx::Error> {
    delete_in_batches(
        pool,
        "DELETE FROM device_history WHERE received_at < ? LIMIT 1000",
        PRUNE_BATCH,
        cutoff,
    )
    .await
}

/// Removes history older than `retention` every `interval` until shutdown.
pub async fn run_retention(
    pool: MySqlPool,
    retention: Duration,
    interval: Duration,
    zone: Zone,
    shutdown: CancellationToken,
) {
    let Ok(retention) = chrono::Duration::from_std(retention) else {
        return;
    };
    loop {
        let cutoff = zone.naive(Utc::now()) - retention;
        match prune(&pool, cutoff).await {
            Ok(0) => {}
            Ok(n) => debug!(deleted = n, "old history removed"),
            Err(e) => warn!(error = %e, "history retention failed; trying again later"),
        }
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = shutdown.cancelled() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::intake::model::{DataReport, DeviceUuid, Sensor, SensorReading};
    use chrono::DateTime;
    use serde_json::Number;

    #[test]
    fn readings_become_rows_on_the_database_zones_clock() {
        let mut report = DataReport::default();
        report.sensors.insert(SensorReading::of(
            Sensor::shared("temperature", &"°C".repeat(40), None),
            Number::from_f64(25.5).unwrap().into(),
            "2025-12-19T06:30:00Z".into(),
        ));
        let zone = Zone::default();
        let received = zone.at(DateTime::parse_from_rfc3339("2025-12-19T06:31:00Z")
            .unwrap()
            .with_timezone(&Utc));
        let update = Update {
            device: DeviceUuid::parse("d1").unwrap(),
            received_at: received,
            reading_time: None,
            change: Change::Data(report),
        };
        let rows: Vec<_> = rows_of(&update, &zone).collect();
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].reading_time.to_string(), "2025-12-19 14:30:00");
        assert_eq!(rows[0].received_at.to_string(), "2025-12-19 14:31:00");
        let utc_zone = Zone::utc();
        let utc: Vec<_> = rows_of(&update, &utc_zone).collect();
        assert_eq!(utc[0].reading_time.to_string(), "2025-12-19 06:30:00");
        assert_eq!(utc[0].received_at.to_string(), "2025-12-19 06:31:00");
        assert_eq!(rows[0].unit.chars().count(), 64);
        assert_eq!(rows[0].value, 25.5);
        let heartbeat = Update {
            change: Change::Heartbeat,
            ..update
        };
        assert_eq!(rows_of(&heartbeat, &zone).count(), 0);
    }
}
