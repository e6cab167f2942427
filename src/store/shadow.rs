//! A shadow run's tables: the copy of the live `device_main` and `device_sensors` it writes
//! into, and what `compare` reads from both sides.
//!
//! The copy is made once, at the first start: `CREATE TABLE … LIKE` (columns, keys and indexes,
//! no foreign keys) and the rows in one transaction (plain statements rather than `CREATE …
//! SELECT`, which commits on its own and which Galera handles poorly). Beside them goes
//! [`START_TABLE`], each device's `last_report_data` as it was copied, so that `compare` can
//! tell a part the Python service never wrote since (its lost status merges; the sensors its
//! current version does not store there) from a part it wrote differently.

use std::collections::BTreeMap;

use chrono::NaiveDateTime;
use sqlx::{Connection, MySqlConnection, Row};

use crate::config::DbSettings;
use crate::store::sql::begin_read_committed;

/// The table beside the shadow copy that records each device's `last_report_data` as copied;
/// its row with the empty uuid marks the copy whole.
pub const START_TABLE: &str = "mqtt_ingest_shadow_start";

/// Why a shadow copy could not be made.
#[derive(Debug, thiserror::Error)]
pub enum ShadowError {
    /// The live database has no `device_main`.
    #[error("{0}.device_main does not exist: there is nothing to shadow (check DB_NAME)")]
    NoLiveTable(String),
    /// The shadow database has a `device_main` that no shadow copy made.
    #[error(
        "{0}.device_main exists but is not a shadow copy (no {START_TABLE} beside it): name a new or empty database in SHADOW_DATABASE, or drop that one"
    )]
    NotAShadow(String),
    /// The server refused or failed a statement.
    #[error("{what}: {source}")]
    Sql {
        /// What was being done.
        what: String,
        /// The server's error.
        #[source]
        source: sqlx::Error,
    },
}

fn sql(what: impl Into<String>) -> impl FnOnce(sqlx::Error) -> ShadowError {
    let what = what.into();
    move |source| ShadowError::Sql { what, source }
}

/// What [`prepare`] found or did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Prepared {
    /// The tables were copied now: so many devices and `device_sensors` rows (`None`: the live
    /// database has no such table).
    Copied {
        /// `device_main` rows.
        devices: u64,
        /// `device_sensors` rows.
        sensors: Option<u64>,
    },
    /// A copy from an earlier start is there and is written on.
    Kept,
}

/// A name the settings checked (`[A-Za-z0-9_$]`, at most 64), quoted for SQL.
fn quoted(name: &str) -> String {
    format!("`{}`", name.replace('`', "``"))
}

async fn table_exists(
    conn: &mut MySqlConnection,
    database: &str,
    table: &str,
) -> Result<bool, sqlx::Error> {
    let n: i64 = sqlx::query_scalar(
        "SELECT COUNT(*) FROM information_schema.TABLES WHERE TABLE_SCHEMA = ? AND TABLE_NAME = ?",
    )
    .bind(database)
    .bind(table)
    .fetch_one(conn)
    .await?;
    Ok(n > 0)
}

/// Opens one connection to the settings' first node, on the database `name`, in the zone's
/// offset (so `NOW()` is the zone's wall clock, as in the service's own sessions).
async fn connect(db: &DbSettings, name: &str) -> Result<MySqlConnection, sqlx::Error> {
    let options = super::connect_options(&DbSettings {
        name: name.to_owned(),
        ..db.clone()
    });
    let mut conn = MySqlConnection::connect_with(&options).await?;
    sqlx::query("SET time_zone = ?")
        .bind(db.zone.session_offset())
        .execute(&mut conn)
        .await?;
    Ok(conn)
}

/// Makes the shadow copy of `live` in `shadow` (created when missing) unless an earlier start
/// made it. Only reads `live`.
pub async fn prepare(
    db: &DbSettings,
    live: &str,
    shadow: &str,
    sensors_table: Option<&str>,
) -> Result<Prepared, ShadowError> {
    let mut conn = connect(db, live)
        .await
        .map_err(sql(format!("cannot connect to {live}")))?;
    let result = copy(&mut conn, live, shadow, sensors_table).await;
    let _ = conn.close().await;
    result
}

async fn copy(
    conn: &mut MySqlConnection,
    live: &str,
    shadow: &str,
    sensors_table: Option<&str>,
) -> Result<Prepared, ShadowError> {
    if !table_exists(conn, live, "device_main")
        .await
        .map_err(sql("cannot read the live tables"))?
    {
        return Err(ShadowError::NoLiveTable(live.to_owned()));
    }
    let (l, s) = (quoted(live), quoted(shadow));
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "CREATE DATABASE IF NOT EXISTS {s} CHARACTER SET utf8mb4 COLLATE utf8mb4_unicode_ci"
    )))
    .execute(&mut *conn)
    .await
    .map_err(sql(format!(
        "cannot create the database {shadow} (create it, and grant DB_USER all rights on it)"
    )))?;
    let read = || sql(format!("cannot read {shadow}"));
    let mut tables = vec!["device_main"];
    if let Some(t) = sensors_table
        && table_exists(conn, live, t)
            .await
            .map_err(sql("cannot read the live tables"))?
    {
        tables.push(t);
    }
    let start = quoted(START_TABLE);
    if table_exists(conn, shadow, START_TABLE)
        .await
        .map_err(read())?
    {
        let whole: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "SELECT COUNT(*) FROM {s}.{start} WHERE uuid = ''"
        )))
        .fetch_one(&mut *conn)
        .await
        .map_err(read())?;
        if whole > 0 {
            return Ok(Prepared::Kept);
        }
        // A copy cut short (its record is made first, its mark of completion last): made again.
        drop_copy(conn, &s, &tables).await;
    } else if table_exists(conn, shadow, "device_main")
        .await
        .map_err(read())?
    {
        return Err(ShadowError::NotAShadow(shadow.to_owned()));
    }
    let made = async {
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "CREATE TABLE {s}.{start} (uuid VARCHAR(255) NOT NULL PRIMARY KEY, \
             last_report_data LONGTEXT NULL, copied_at DATETIME NOT NULL) \
             DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_unicode_ci"
        )))
        .execute(&mut *conn)
        .await?;
        for t in &tables {
            let t = quoted(t);
            sqlx::query(sqlx::AssertSqlSafe(format!(
                "CREATE TABLE {s}.{t} LIKE {l}.{t}"
            )))
            .execute(&mut *conn)
            .await?;
        }
        // READ COMMITTED: the live rows are read as a consistent read, without the shared locks
        // INSERT … SELECT takes under REPEATABLE READ, which would hold the live service's
        // writes (or deadlock with them) while the copy runs.
        let mut tx = begin_read_committed(conn).await?;
        let mut counts = Vec::new();
        for t in &tables {
            let t = quoted(t);
            let done = sqlx::query(sqlx::AssertSqlSafe(format!(
                "INSERT INTO {s}.{t} SELECT * FROM {l}.{t}"
            )))
            .execute(&mut *tx)
            .await?;
            counts.push(done.rows_affected());
        }
        // What was copied, from the copy itself; then the mark that the copy is whole.
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "INSERT INTO {s}.{start} (uuid, last_report_data, copied_at) \
             SELECT uuid, CAST(last_report_data AS CHAR), NOW() FROM {s}.device_main \
             WHERE uuid <> ''"
        )))
        .execute(&mut *tx)
        .await?;
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "INSERT INTO {s}.{start} (uuid, last_report_data, copied_at) VALUES ('', NULL, NOW())"
        )))
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok::<_, sqlx::Error>(counts)
    }
    .await;
    match made {
        Ok(counts) => Ok(Prepared::Copied {
            devices: counts[0],
            sensors: counts.get(1).copied(),
        }),
        Err(e) => {
            // Leave nothing half made: the next start copies again.
            drop_copy(conn, &s, &tables).await;
            Err(sql(format!("cannot copy the live tables into {shadow}"))(e))
        }
    }
}

/// Drops what a copy into the (quoted) database `s` makes; the next start copies again.
async fn drop_copy(conn: &mut MySqlConnection, s: &str, tables: &[&str]) {
    for t in tables.iter().chain([&START_TABLE]) {
        let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
            "DROP TABLE IF EXISTS {s}.{}",
            quoted(t)
        )))
        .execute(&mut *conn)
        .await;
    }
}

/// A `device_main` row as `compare` reads it.
#[derive(Debug, Clone, PartialEq)]
pub struct DeviceRow {
    /// `is_online`.
    pub is_online: bool,
    /// `last_seen`.
    pub last_seen: Option<NaiveDateTime>,
    /// `last_heartbeat`.
    pub last_heartbeat: Option<NaiveDateTime>,
    /// `device_status`.
    pub device_status: Option<String>,
    /// `last_report_data`, parsed (`None`: NULL, or not JSON).
    pub last_report_data: Option<serde_json::Value>,
}

/// A `device_sensors` row as `compare` reads it.
#[derive(Debug, Clone, PartialEq)]
pub struct SensorRow {
    /// `sensor_value`.
    pub value: String,
    /// `sensor_unit`.
    pub unit: String,
    /// `sensor_type`.
    pub kind: String,
    /// `timestamp`.
    pub timestamp: NaiveDateTime,
}

/// One database's tables as `compare` reads them.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Tables {
    /// `device_main` by uuid.
    pub devices: BTreeMap<String, DeviceRow>,
    /// `device_sensors` by uuid and sensor name; `None` where the table does not exist.
    pub sensors: Option<BTreeMap<(String, String), SensorRow>>,
    /// [`START_TABLE`] by uuid, where this database is a shadow copy.
    pub start: Option<BTreeMap<String, Option<serde_json::Value>>>,
}

fn parse_json(text: Option<String>) -> Option<serde_json::Value> {
    text.and_then(|t| serde_json::from_str(&t).ok())
}

/// Reads `database`'s tables (on the settings' first node).
pub async fn read_tables(
    db: &DbSettings,
    database: &str,
    sensors_table: Option<&str>,
) -> Result<Tables, ShadowError> {
    let failed = || sql(format!("cannot read {database}"));
    let mut conn = connect(db, database).await.map_err(failed())?;
    let d = quoted(database);
    let mut tables = Tables::default();
    let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
        "SELECT uuid, CAST(is_online AS SIGNED), last_seen, last_heartbeat, device_status, \
         CAST(last_report_data AS CHAR) FROM {d}.device_main"
    )))
    .fetch_all(&mut conn)
    .await
    .map_err(failed())?;
    for row in rows {
        let uuid: String = row.try_get(0).map_err(failed())?;
        let online: Option<i64> = row.try_get(1).map_err(failed())?;
        tables.devices.insert(
            uuid,
            DeviceRow {
                is_online: online.unwrap_or(0) != 0,
                last_seen: row.try_get(2).map_err(failed())?,
                last_heartbeat: row.try_get(3).map_err(failed())?,
                device_status: row.try_get(4).map_err(failed())?,
                last_report_data: parse_json(row.try_get(5).map_err(failed())?),
            },
        );
    }
    if let Some(t) = sensors_table
        && table_exists(&mut conn, database, t)
            .await
            .map_err(failed())?
    {
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT device_uuid, sensor_name, sensor_value, sensor_unit, sensor_type, timestamp \
             FROM {d}.{}",
            quoted(t)
        )))
        .fetch_all(&mut conn)
        .await
        .map_err(failed())?;
        let mut sensors = BTreeMap::new();
        for row in rows {
            let unit: Option<String> = row.try_get(3).map_err(failed())?;
            let kind: Option<String> = row.try_get(4).map_err(failed())?;
            sensors.insert(
                (
                    row.try_get(0).map_err(failed())?,
                    row.try_get(1).map_err(failed())?,
                ),
                SensorRow {
                    value: row.try_get(2).map_err(failed())?,
                    unit: unit.unwrap_or_default(),
                    kind: kind.unwrap_or_default(),
                    timestamp: row.try_get(5).map_err(failed())?,
                },
            );
        }
        tables.sensors = Some(sensors);
    }
    if table_exists(&mut conn, database, START_TABLE)
        .await
        .map_err(failed())?
    {
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT uuid, last_report_data FROM {d}.{} WHERE uuid <> ''",
            quoted(START_TABLE)
        )))
        .fetch_all(&mut conn)
        .await
        .map_err(failed())?;
        let mut start = BTreeMap::new();
        for row in rows {
            start.insert(
                row.try_get(0).map_err(failed())?,
                parse_json(row.try_get(1).map_err(failed())?),
            );
        }
        tables.start = Some(start);
    }
    let _ = conn.close().await;
    Ok(tables)
}
