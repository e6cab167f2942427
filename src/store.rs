//! The database side: the pool, migrations, and the SQL that applies validated updates.
//!
//! Merging happens in SQL (`JSON_MERGE_PATCH`), so an update needs no read first: sensors merge
//! by name and `status` by key into what is stored; `location` and `upload_timestamp` are
//! replaced. `last_seen` and `last_heartbeat` never move backwards, so a redelivered message
//! cannot roll them back.

use std::time::Duration;

use chrono::{DateTime, SecondsFormat, Utc};
use serde_json::{Map, Value, json};
use sqlx::mysql::{MySqlConnectOptions, MySqlDatabaseError, MySqlPool, MySqlPoolOptions};
use sqlx::{Executor, MySql, Transaction};

use crate::config::DbSettings;
use crate::model::{Change, DataReport, Update};

/// The migrations in `migrations/`, compiled in.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// What happened to one update inside a committed transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    /// The device's row was updated.
    Written,
    /// No row has this uuid; nothing was written.
    UnknownDevice,
}

/// A failed database attempt, sorted by what the writer should do about it.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database refused a statement because of the data in it (too long, invalid JSON, …):
    /// retrying the same message gives the same answer.
    #[error("database refused the data: {0}")]
    Refused(#[source] sqlx::Error),
    /// Anything else: connection lost, server gone, lock timeout, table missing. Retried.
    #[error("database unavailable: {0}")]
    Unavailable(#[source] sqlx::Error),
}

impl From<sqlx::Error> for StoreError {
    fn from(e: sqlx::Error) -> Self {
        // Only errors known to be about one row's data are final; an unknown error is
        // retried, because acknowledging a message the database never took would lose it.
        const DATA_ERRORS: &[u16] = &[
            1048, // column cannot be null
            1062, // duplicate key
            1264, // out of range value
            1292, // truncated incorrect value
            1366, // incorrect string value
            1406, // data too long
            3140, // MySQL: invalid JSON text
            3141, // MySQL: invalid JSON text in argument
            4025, // MariaDB: CONSTRAINT_FAILED (the JSON_VALID check)
            4038, // MariaDB: syntax error in JSON text
        ];
        let refused = e
            .as_database_error()
            .and_then(|d| d.try_downcast_ref::<MySqlDatabaseError>())
            .is_some_and(|d| DATA_ERRORS.contains(&d.number()));
        if refused {
            StoreError::Refused(e)
        } else {
            StoreError::Unavailable(e)
        }
    }
}

/// Connection options for the settings; the session time zone is UTC.
pub fn connect_options(db: &DbSettings) -> MySqlConnectOptions {
    let options = MySqlConnectOptions::new()
        .host(&db.host)
        .port(db.port)
        .username(&db.user)
        .database(&db.name)
        .charset("utf8mb4")
        .timezone(Some("+00:00".to_owned()));
    // An empty password must be sent as no password: sqlx would otherwise send the scramble
    // of "", which a server account without a password refuses.
    if db.password.expose().is_empty() {
        options
    } else {
        options.password(db.password.expose())
    }
}

/// A pool like the seed's: `pool_min` kept, up to `pool_max`, recycled, pinged before use.
/// It connects lazily, so the service starts while the database is down.
pub fn pool(db: &DbSettings) -> MySqlPool {
    MySqlPoolOptions::new()
        .min_connections(db.pool_min)
        .max_connections(db.pool_max)
        .max_lifetime(db.recycle)
        .acquire_timeout(db.connect_timeout)
        .test_before_acquire(true)
        .connect_lazy_with(connect_options(db))
}

/// Runs the migrations (idempotent: `device_main` is created only where it is absent).
pub async fn migrate(pool: &MySqlPool) -> Result<(), sqlx::migrate::MigrateError> {
    MIGRATOR.run(pool).await
}

/// Checks that the database answers.
pub async fn ping(pool: &MySqlPool) -> Result<(), sqlx::Error> {
    pool.execute("SELECT 1").await.map(|_| ())
}

const RFC3339_MS: SecondsFormat = SecondsFormat::Millis;

/// The JSON merged into `last_report_data` for a data message.
pub fn data_patch(report: &DataReport, received_at: DateTime<Utc>) -> Value {
    let mut patch = Map::new();
    if !report.sensors.is_empty() {
        let sensors: Map<String, Value> = report
            .sensors
            .iter()
            .map(|(name, r)| {
                (
                    name.clone(),
                    json!({"value": r.value, "unit": r.unit, "timestamp": r.timestamp}),
                )
            })
            .collect();
        patch.insert("sensors".into(), Value::Object(sensors));
    }
    if let Some(status) = &report.status {
        patch.insert("status".into(), Value::Object(status.clone()));
    }
    if let Some(l) = &report.location {
        patch.insert(
            "location".into(),
            json!({"latitude": l.latitude, "longitude": l.longitude}),
        );
    }
    patch.insert(
        "upload_timestamp".into(),
        Value::String(received_at.to_rfc3339_opts(RFC3339_MS, true)),
    );
    Value::Object(patch)
}

/// What is stored when the column holds nothing usable (NULL or text that is not JSON).
const STORED_JSON: &str =
    "CASE WHEN JSON_VALID(last_report_data) THEN last_report_data ELSE '{}' END";

/// Writes updates through a pool.
#[derive(Debug, Clone)]
pub struct Store {
    pool: MySqlPool,
    register_unknown_devices: bool,
}

impl Store {
    /// A store on `pool`; with `register_unknown_devices`, an unknown uuid gets a new row.
    pub fn new(pool: MySqlPool, register_unknown_devices: bool) -> Self {
        Self {
            pool,
            register_unknown_devices,
        }
    }

    /// The pool, for health checks and shutdown.
    pub fn pool(&self) -> &MySqlPool {
        &self.pool
    }

    /// Applies all `updates` in one transaction, in order. Either all commit or none.
    pub async fn apply(&self, updates: &[&Update]) -> Result<Vec<Applied>, StoreError> {
        let mut tx = self.pool.begin().await?;
        let mut outcomes = Vec::with_capacity(updates.len());
        for update in updates {
            outcomes.push(self.apply_one(&mut tx, update).await?);
        }
        tx.commit().await?;
        Ok(outcomes)
    }

    async fn apply_one(
        &self,
        tx: &mut Transaction<'static, MySql>,
        update: &Update,
    ) -> Result<Applied, StoreError> {
        let uuid = update.device.as_str();
        if self.register_unknown_devices {
            // How the backend registers a device: device_id, uuid and name; the rest defaults.
            sqlx::query("INSERT IGNORE INTO device_main (device_id, uuid, name) VALUES (?, ?, ?)")
                .bind(uuid)
                .bind(uuid)
                .bind(uuid)
                .execute(&mut **tx)
                .await?;
        }
        let seen = update.received_at.naive_utc();
        let result = match &update.change {
            Change::Data(report) => {
                let patch = data_patch(report, update.received_at).to_string();
                sqlx::query(sqlx::AssertSqlSafe(format!(
                    "UPDATE device_main SET \
                       last_report_data = JSON_MERGE_PATCH({STORED_JSON}, ?), \
                       last_seen = GREATEST(COALESCE(last_seen, ?), ?), \
                       is_online = 1 \
                     WHERE uuid = ?"
                )))
                .bind(patch)
                .bind(seen)
                .bind(seen)
                .bind(uuid)
                .execute(&mut **tx)
                .await?
            }
            Change::Status(status) => {
                let patch = json!({ "status": status.fields }).to_string();
                sqlx::query(sqlx::AssertSqlSafe(format!(
                    "UPDATE device_main SET \
                       last_report_data = JSON_MERGE_PATCH({STORED_JSON}, ?), \
                       device_status = COALESCE(?, device_status), \
                       is_online = COALESCE(?, is_online), \
                       last_seen = GREATEST(COALESCE(last_seen, ?), ?) \
                     WHERE uuid = ?"
                )))
                .bind(patch)
                .bind(status.device_status.as_deref())
                .bind(status.online)
                .bind(seen)
                .bind(seen)
                .bind(uuid)
                .execute(&mut **tx)
                .await?
            }
            Change::Heartbeat => {
                sqlx::query(
                    "UPDATE device_main SET \
                       last_seen = GREATEST(COALESCE(last_seen, ?), ?), \
                       last_heartbeat = GREATEST(COALESCE(last_heartbeat, ?), ?), \
                       is_online = 1 \
                     WHERE uuid = ?",
                )
                .bind(seen)
                .bind(seen)
                .bind(seen)
                .bind(seen)
                .bind(uuid)
                .execute(&mut **tx)
                .await?
            }
        };
        // sqlx asks the server for "found rows", so an update that changed nothing still
        // counts its row: zero means there is no such device.
        Ok(if result.rows_affected() == 0 {
            Applied::UnknownDevice
        } else {
            Applied::Written
        })
    }
}

/// How long the writer waits before retrying after `attempt` failures (capped, with jitter).
pub fn retry_delay(attempt: u32, max: Duration) -> Duration {
    let base = Duration::from_millis(100).saturating_mul(1u32 << attempt.min(16));
    crate::backoff::with_jitter(base.min(max))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Location, SensorReading};
    use serde_json::Number;

    #[test]
    fn data_patch_has_the_stored_shape() {
        let at = DateTime::parse_from_rfc3339("2026-01-02T03:04:05.678Z")
            .unwrap()
            .with_timezone(&Utc);
        let mut report = DataReport::default();
        report.sensors.insert(
            "temperature".into(),
            SensorReading {
                value: Number::from_f64(25.5).unwrap(),
                unit: "°C".into(),
                timestamp: "2025-12-19T14:30:00+08:00".into(),
            },
        );
        report.location = Some(Location {
            latitude: Number::from_f64(39.9042).unwrap(),
            longitude: Number::from_f64(116.4074).unwrap(),
        });
        assert_eq!(
            data_patch(&report, at),
            json!({
                "sensors": {"temperature": {"value": 25.5, "unit": "°C", "timestamp": "2025-12-19T14:30:00+08:00"}},
                "location": {"latitude": 39.9042, "longitude": 116.4074},
                "upload_timestamp": "2026-01-02T03:04:05.678Z"
            })
        );
    }

    #[test]
    fn retry_delay_grows_and_is_capped() {
        let max = Duration::from_secs(30);
        assert!(retry_delay(0, max) <= Duration::from_millis(100));
        assert!(retry_delay(3, max) >= Duration::from_millis(320));
        assert!(retry_delay(40, max) <= max);
    }
}
