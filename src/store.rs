//! The database side: the pool, migrations, and the SQL that applies validated updates.
//!
//! A batch reads each of its devices' rows once under a row lock, merges every update into them
//! in Rust ([`crate::merge`]: sensors by name, `status` by key, order-safe), and writes each row
//! once, with a few multi-row statements of fixed shapes.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use sqlx::mysql::{MySqlConnectOptions, MySqlPool, MySqlPoolOptions, MySqlSslMode};
use sqlx::{Executor, MySql, QueryBuilder, Row, Transaction};

use crate::config::{DbSettings, DbSslMode};
use crate::history::{self, HistoryRow};
use crate::merge::DeviceState;
use crate::model::Update;
use crate::sensors::{self, SensorTable};
use crate::zone::Zone;

pub use crate::sql::{
    SHAPES, StoreError, delete_in_batches, error_number, exact_chunks, fit_chars, is_refusal,
    placeholders, settings_hint, shaped_chunks,
};

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

/// What a committed batch did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchOutcome {
    /// One outcome per update, in order.
    pub applied: Vec<Applied>,
    /// Device rows written (a device's updates in one batch share one write).
    pub rows_written: usize,
}

/// Errors an upsert can meet where the join cannot: the user may UPDATE but not INSERT into
/// `device_main` (1142), the insert half needs a value for a column (1364), a CHECK constraint
/// (MariaDB 4025, MySQL 3819) or a trigger (1442) refuses it.
fn refuses_upserts(e: &sqlx::Error) -> bool {
    matches!(error_number(e), Some(1142 | 1364 | 1442 | 3819 | 4025))
}

/// Connection options for the settings. The session's `time_zone` is left to [`pool`], which
/// sets it on each new connection (sqlx would fix one offset for the life of the options).
pub fn connect_options(db: &DbSettings) -> MySqlConnectOptions {
    let mut options = MySqlConnectOptions::new()
        .host(&db.host)
        .port(db.port)
        .username(&db.user)
        .database(&db.name)
        .charset("utf8mb4")
        .timezone(None)
        .ssl_mode(match db.ssl_mode {
            DbSslMode::Disabled => MySqlSslMode::Disabled,
            DbSslMode::Preferred => MySqlSslMode::Preferred,
            DbSslMode::Required => MySqlSslMode::Required,
            DbSslMode::VerifyCa => MySqlSslMode::VerifyCa,
            DbSslMode::VerifyIdentity => MySqlSslMode::VerifyIdentity,
        });
    if let Some(ca) = &db.ssl_ca_file {
        options = options.ssl_ca(ca);
    }
    if let Some((cert, key)) = &db.ssl_client_cert {
        options = options.ssl_client_cert(cert).ssl_client_key(key);
    }
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
///
/// Each session's `time_zone` is the database zone's offset (`DB_TIMEZONE`), so that `NOW()`
/// and `ON UPDATE CURRENT_TIMESTAMP` columns agree with what the service writes. For a zone
/// with daylight saving, a connection keeps the offset in force when it connected, until it is
/// recycled (`DB_POOL_RECYCLE_SECS`).
pub fn pool(db: &DbSettings) -> MySqlPool {
    let zone = db.zone.clone();
    MySqlPoolOptions::new()
        .min_connections(db.pool_min)
        .max_connections(db.pool_max)
        .max_lifetime(db.recycle)
        .acquire_timeout(db.connect_timeout)
        .test_before_acquire(true)
        .after_connect(move |conn, _| {
            // The offset is digits and a sign, from `Zone`: safe to put in the text.
            let offset = zone.session_offset();
            Box::pin(async move {
                conn.execute(sqlx::AssertSqlSafe(format!("SET time_zone = '{offset}'")))
                    .await
                    .map(|_| ())
            })
        })
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

/// Writes updates through a pool.
#[derive(Debug, Clone)]
pub struct Store {
    pool: MySqlPool,
    options: StoreOptions,
    /// Set when the database refused an upsert in a way the portable statement avoids (a
    /// table [`write_mode`] misjudged): from then on this store writes with the join.
    upsert_refused: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

/// What a store writes besides the device rows, and how.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StoreOptions {
    /// Create a `device_main` row for an unknown uuid instead of rejecting its messages.
    pub register_unknown_devices: bool,
    /// Append every accepted reading to `device_history`.
    pub history: bool,
    /// How merged rows go back ([`write_mode`] picks it for the table at start-up).
    pub write_mode: WriteMode,
    /// The zone of the DATETIME columns.
    pub zone: Zone,
    /// `device_status`'s length in characters (read at start-up): a longer status is cut to
    /// fit rather than failing the write. `None`: unknown, written as it is.
    pub device_status_chars: Option<usize>,
    /// `device_sensors`, when found at start-up.
    pub sensors: Option<SensorTable>,
    /// `INGEST_MAX_CLOCK_SKEW_SECS`: stored times further ahead than this are not trusted
    /// to order newer data (see [`DeviceState::with_clock_skew`]).
    pub max_clock_skew: Duration,
}

/// How merged rows are written back. Either way each row was read and locked first in the same
/// transaction, so both only ever change rows that exist.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum WriteMode {
    /// `INSERT … ON DUPLICATE KEY UPDATE` keyed by the primary key `id`: for an existing (locked)
    /// row it can only update, and MariaDB takes many rows this way at about twice the rate of
    /// the join below. Used only where the insert half can never get in the way: see
    /// [`write_mode`].
    Upsert,
    /// `UPDATE … JOIN` a derived table of the new values: works on any table.
    #[default]
    JoinUpdate,
}

impl std::fmt::Display for WriteMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            WriteMode::Upsert => "insert-on-duplicate-key by id",
            WriteMode::JoinUpdate => "update-join by id",
        })
    }
}

/// Columns the service writes or fills in itself; any other column that must have a value
/// (NOT NULL, no default, not generated, not auto-increment) would make the insert half of an
/// upsert fail.
const OWN_COLUMNS: &str = "'id', 'device_id', 'uuid', 'name', 'is_online', 'last_seen', \
                           'last_heartbeat', 'device_status', 'last_report_data'";

/// Picks how to write rows to this database's `device_main`: [`WriteMode::Upsert`] when its
/// primary key is exactly `id`, no other column needs a value, no trigger fires on INSERT (a
/// BEFORE INSERT trigger runs even when the statement ends up updating) and no CHECK
/// constraint other than MariaDB's JSON check on `last_report_data` could refuse the row;
/// otherwise [`WriteMode::JoinUpdate`]. Returns the mode and, for the join, why.
pub async fn write_mode(pool: &MySqlPool) -> Result<(WriteMode, Option<String>), sqlx::Error> {
    let primary: Vec<String> = sqlx::query_scalar(
        "SELECT CAST(COLUMN_NAME AS CHAR) FROM information_schema.KEY_COLUMN_USAGE \
         WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = 'device_main' \
           AND CONSTRAINT_NAME = 'PRIMARY'",
    )
    .fetch_all(pool)
    .await?;
    if primary != ["id"] {
        return Ok((
            WriteMode::JoinUpdate,
            Some(format!(
                "the primary key is ({}), not (id)",
                primary.join(", ")
            )),
        ));
    }
    let required = required_columns(pool, OWN_COLUMNS).await?;
    if !required.is_empty() {
        return Ok((
            WriteMode::JoinUpdate,
            Some(format!(
                "column(s) {} need a value on insert",
                required.join(", ")
            )),
        ));
    }
    let triggers: i64 = sqlx::query_scalar(
        "SELECT COUNT(*) FROM information_schema.TRIGGERS \
         WHERE EVENT_OBJECT_SCHEMA = DATABASE() AND EVENT_OBJECT_TABLE = 'device_main' \
           AND EVENT_MANIPULATION = 'INSERT'",
    )
    .fetch_one(pool)
    .await?;
    if triggers > 0 {
        return Ok((
            WriteMode::JoinUpdate,
            Some("the table has an INSERT trigger".into()),
        ));
    }
    let checks: Vec<String> = sqlx::query_scalar(
        "SELECT CAST(CONSTRAINT_NAME AS CHAR) FROM information_schema.TABLE_CONSTRAINTS \
         WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = 'device_main' \
           AND CONSTRAINT_TYPE = 'CHECK' AND CONSTRAINT_NAME <> 'last_report_data'",
    )
    .fetch_all(pool)
    .await?;
    if !checks.is_empty() {
        return Ok((
            WriteMode::JoinUpdate,
            Some(format!("CHECK constraint(s) {}", checks.join(", "))),
        ));
    }
    Ok((WriteMode::Upsert, None))
}

/// The columns a registering INSERT gives values for (how the backend registers a device).
pub const REGISTER_COLUMNS: &str = "'device_id', 'uuid', 'name'";

/// Columns of `device_main` that an INSERT giving only `supplied` (a quoted, comma-separated
/// list) would lack a value for: NOT NULL, no default, not generated, not auto-increment
/// (CodeHubot's `device_secret`).
pub async fn required_columns(
    pool: &MySqlPool,
    supplied: &str,
) -> Result<Vec<String>, sqlx::Error> {
    sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "SELECT CAST(COLUMN_NAME AS CHAR) FROM information_schema.COLUMNS \
         WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = 'device_main' \
           AND IS_NULLABLE = 'NO' AND COLUMN_DEFAULT IS NULL \
           AND EXTRA NOT LIKE '%auto_increment%' AND COALESCE(GENERATION_EXPRESSION, '') = '' \
           AND COLUMN_NAME NOT IN ({supplied})"
    )))
    .fetch_all(pool)
    .await
}

/// The length in characters of a text column of the connected database, if it has one.
pub async fn column_chars(
    pool: &MySqlPool,
    table: &str,
    column: &str,
) -> Result<Option<usize>, sqlx::Error> {
    let length: Option<Option<i64>> = sqlx::query_scalar(
        "SELECT CAST(CHARACTER_MAXIMUM_LENGTH AS SIGNED) FROM information_schema.COLUMNS \
         WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = ? AND COLUMN_NAME = ?",
    )
    .bind(table)
    .bind(column)
    .fetch_optional(pool)
    .await?;
    Ok(length.flatten().and_then(|l| usize::try_from(l).ok()))
}

/// A device row read under lock: its primary key, the columns an upsert must repeat, and its
/// state.
struct LockedRow {
    id: u64,
    uuid: String,
    device_id: String,
    name: String,
    state: DeviceState,
}

impl Store {
    /// A store on `pool`.
    pub fn new(pool: MySqlPool, options: StoreOptions) -> Self {
        Self {
            pool,
            options,
            upsert_refused: Default::default(),
        }
    }

    /// How this store writes rows now.
    pub fn write_mode(&self) -> WriteMode {
        if self
            .upsert_refused
            .load(std::sync::atomic::Ordering::Relaxed)
        {
            WriteMode::JoinUpdate
        } else {
            self.options.write_mode
        }
    }

    /// The pool, for health checks and shutdown.
    pub fn pool(&self) -> &MySqlPool {
        &self.pool
    }

    /// Applies all `updates` in one transaction: each device's row is read once (locked),
    /// every update of that device is merged into it in order, and the rows are written back
    /// with a few multi-row statements. Either all commit or none.
    pub async fn apply(&self, updates: &[&Update]) -> Result<BatchOutcome, StoreError> {
        let mode = self.write_mode();
        match self.apply_with(updates, mode).await {
            Err(StoreError::Refused(e) | StoreError::Unavailable(e))
                if mode == WriteMode::Upsert && refuses_upserts(&e) =>
            {
                self.upsert_refused
                    .store(true, std::sync::atomic::Ordering::Relaxed);
                tracing::warn!(
                    error = %e,
                    "the database refused the upsert statement for device_main; writing with the portable statement from now on"
                );
                // Rolled back: write the same batch again, the other way.
                Err(StoreError::Conflict(e))
            }
            other => other,
        }
    }

    async fn apply_with(
        &self,
        updates: &[&Update],
        mode: WriteMode,
    ) -> Result<BatchOutcome, StoreError> {
        let devices = distinct(updates.iter().map(|u| u.device.as_str()));
        let mut tx = self.pool.begin().await?;
        if self.options.register_unknown_devices {
            register(&mut tx, &devices).await?;
        }
        // Each update's device group: its case variants together (the column's collation may
        // make them one row, and the router gives them to one writer), numbered in order of
        // first appearance.
        let mut group_of: HashMap<Folded<'_>, usize> = HashMap::with_capacity(devices.len());
        let group: Vec<usize> = updates
            .iter()
            .map(|u| {
                let next = group_of.len();
                *group_of.entry(Folded(u.device.as_str())).or_insert(next)
            })
            .collect();
        let groups = group_of.len();
        drop(group_of);
        // Rows are read, merged and written a chunk of devices at a time, all in this one
        // transaction: a large batch never holds more than a chunk of merged rows in memory.
        let mut outcomes = vec![Applied::UnknownDevice; updates.len()];
        let mut rows_written = 0;
        for first in (0..groups).step_by(ROWS_PER_CHUNK) {
            let chunk = first..first + ROWS_PER_CHUNK;
            let indices: Vec<usize> = (0..updates.len())
                .filter(|&i| chunk.contains(&group[i]))
                .collect();
            rows_written += merge_chunk(
                &mut tx,
                updates,
                &indices,
                &mut outcomes,
                mode,
                &self.options,
            )
            .await?;
        }
        let written = || {
            updates
                .iter()
                .zip(&outcomes)
                .filter(|(_, o)| **o == Applied::Written)
                .map(|(u, _)| *u)
        };
        if self.options.history {
            let mut rows: Vec<HistoryRow> = written()
                .flat_map(|u| history::rows_of(u, &self.options.zone))
                .collect();
            history::append(&mut tx, &mut rows).await?;
        }
        if let Some(table) = &self.options.sensors {
            let rows = sensors::rows_of(written(), table, &self.options.zone);
            sensors::upsert(&mut tx, table, &rows, self.options.max_clock_skew).await?;
        }
        tx.commit().await?;
        Ok(BatchOutcome {
            applied: outcomes,
            rows_written,
        })
    }
}

/// Most device rows read, merged and written back at a time (the largest statement shape).
const ROWS_PER_CHUNK: usize = 256;

/// The ids in order of first appearance, each once.
fn distinct<'a>(ids: impl Iterator<Item = &'a str>) -> Vec<&'a str> {
    let mut seen = HashSet::new();
    ids.filter(|d| seen.insert(*d)).collect()
}

/// A device id that compares and hashes without ASCII case, as the usual collations do.
#[derive(Debug, Clone, Copy)]
struct Folded<'a>(&'a str);

impl PartialEq for Folded<'_> {
    fn eq(&self, other: &Self) -> bool {
        self.0.eq_ignore_ascii_case(other.0)
    }
}

impl Eq for Folded<'_> {}

impl std::hash::Hash for Folded<'_> {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        for b in self.0.bytes() {
            state.write_u8(b.to_ascii_lowercase());
        }
    }
}

/// Reads and locks the rows of the devices of `updates[indices]` (ascending), merges those
/// updates into them in order, writes the changed rows back and records each update's outcome.
/// Returns the number of rows written.
async fn merge_chunk(
    tx: &mut Transaction<'static, MySql>,
    updates: &[&Update],
    indices: &[usize],
    outcomes: &mut [Applied],
    mode: WriteMode,
    options: &StoreOptions,
) -> Result<usize, StoreError> {
    let devices = distinct(indices.iter().map(|&i| updates[i].device.as_str()));
    let mut rows = lock_rows(tx, &devices, options.max_clock_skew).await?;

    // Which row each device is (the column's collation may match ids that differ in case: an
    // exact match first, then one that ignores ASCII case).
    let exact: HashMap<&str, usize> = rows
        .iter()
        .enumerate()
        .map(|(i, r)| (r.uuid.as_str(), i))
        .collect();
    let mut folded: Option<HashMap<String, usize>> = None;
    let mut row_of: HashMap<&str, usize> = HashMap::with_capacity(devices.len());
    for d in &devices {
        let found = exact.get(d).copied().or_else(|| {
            folded
                .get_or_insert_with(|| {
                    rows.iter()
                        .enumerate()
                        .map(|(i, r)| (r.uuid.to_ascii_lowercase(), i))
                        .collect()
                })
                .get(&d.to_ascii_lowercase())
                .copied()
        });
        if let Some(i) = found {
            row_of.insert(d, i);
        }
    }
    let mut touched = vec![false; rows.len()];
    for &i in indices {
        let u = updates[i];
        if let Some(&r) = row_of.get(u.device.as_str()) {
            rows[r].state.apply(u);
            touched[r] = true;
            outcomes[i] = Applied::Written;
        }
    }
    let changed: Vec<&LockedRow> = rows
        .iter()
        .zip(&touched)
        .filter_map(|(r, t)| t.then_some(r))
        .collect();
    write_rows(tx, &changed, mode, options.device_status_chars).await?;
    Ok(changed.len())
}

/// Creates rows for devices that have none, as the backend registers one: `device_id`, `uuid`
/// and `name` (all the uuid); every other column keeps its default. Only the missing ones are
/// inserted, without padding: every INSERT row, even one that IGNORE turns away, takes an
/// AUTO_INCREMENT id, and a device that exists must not cost one per batch.
async fn register(
    tx: &mut Transaction<'static, MySql>,
    devices: &[&str],
) -> Result<(), StoreError> {
    let mut existing: HashSet<String> = HashSet::new();
    for chunk in shaped_chunks(devices) {
        let mut q = QueryBuilder::<MySql>::new("SELECT uuid FROM device_main WHERE uuid IN ");
        push_list(&mut q, &chunk);
        // The column's collation usually ignores case: so does the comparison here.
        existing.extend(
            q.build_query_scalar::<String>()
                .fetch_all(&mut **tx)
                .await?
                .into_iter()
                .map(|u| u.to_ascii_lowercase()),
        );
    }
    let mut seen = HashSet::new();
    let missing: Vec<&str> = devices
        .iter()
        .copied()
        .filter(|d| {
            let folded = d.to_ascii_lowercase();
            !existing.contains(&folded) && seen.insert(folded)
        })
        .collect();
    for chunk in exact_chunks(&missing) {
        // Not INSERT IGNORE: that would turn a missing value into an empty one and make a
        // half-filled row. A duplicate (another instance registered the device meanwhile) is
        // left as it is.
        let mut q = QueryBuilder::<MySql>::new("INSERT INTO device_main (device_id, uuid, name) ");
        q.push_values(chunk, |mut row, d| {
            row.push_bind(*d).push_bind(*d).push_bind(*d);
        });
        q.push(" ON DUPLICATE KEY UPDATE uuid = uuid");
        q.build().execute(&mut **tx).await?;
    }
    Ok(())
}

/// `(?, ?, …)` bound to `devices`, for an `IN`.
fn push_list(q: &mut QueryBuilder<MySql>, devices: &[&str]) {
    q.push("(");
    let mut list = q.separated(", ");
    for d in devices {
        list.push_bind(*d);
    }
    list.push_unseparated(")");
}

/// Reads and locks the rows of `devices` (those that exist).
async fn lock_rows(
    tx: &mut Transaction<'static, MySql>,
    devices: &[&str],
    clock_skew: Duration,
) -> Result<Vec<LockedRow>, StoreError> {
    let mut rows = Vec::with_capacity(devices.len());
    let mut ids = HashSet::new();
    for chunk in shaped_chunks(devices) {
        // MariaDB keeps JSON as LONGTEXT: read it as text. The casts make the column types
        // whatever the backend chose (INT or BIGINT id, TINYINT or BOOLEAN flag).
        let mut q = QueryBuilder::<MySql>::new(
            "SELECT CAST(id AS UNSIGNED) AS id, uuid, device_id, name, \
                    CAST(last_report_data AS CHAR) AS data, last_seen, last_heartbeat, \
                    CAST(is_online AS SIGNED) AS is_online, device_status \
             FROM device_main WHERE uuid IN ",
        );
        push_list(&mut q, &chunk);
        q.push(" FOR UPDATE");
        for row in q.build().fetch_all(&mut **tx).await? {
            let id: u64 = row.try_get("id")?;
            if !ids.insert(id) {
                continue;
            }
            let data: Option<String> = row.try_get("data")?;
            let is_online: Option<i64> = row.try_get("is_online")?;
            rows.push(LockedRow {
                id,
                uuid: row.try_get("uuid")?,
                device_id: row.try_get("device_id")?,
                name: row.try_get("name")?,
                state: DeviceState::from_row(
                    data.as_deref(),
                    row.try_get("last_seen")?,
                    row.try_get("last_heartbeat")?,
                    is_online.unwrap_or(0) != 0,
                    row.try_get("device_status")?,
                )
                .with_clock_skew(clock_skew),
            });
        }
    }
    Ok(rows)
}

/// The statement that writes `rows` merged rows back in `mode`.
fn write_sql(mode: WriteMode, rows: usize) -> String {
    match mode {
        // Every row exists and is locked by this transaction, so each one is an update;
        // device_id, uuid and name go in unchanged, for the insert half only.
        WriteMode::Upsert => format!(
            "INSERT INTO device_main (id, device_id, uuid, name, last_report_data, last_seen, \
                                      last_heartbeat, is_online, device_status) VALUES {} \
             ON DUPLICATE KEY UPDATE last_report_data = VALUES(last_report_data), \
                 last_seen = VALUES(last_seen), last_heartbeat = VALUES(last_heartbeat), \
                 is_online = VALUES(is_online), device_status = VALUES(device_status)",
            placeholders(rows, "(?, ?, ?, ?, ?, ?, ?, ?, ?)", ", ")
        ),
        WriteMode::JoinUpdate => {
            let derived = format!(
                "SELECT ? AS id, ? AS data, ? AS seen, ? AS hb, ? AS online, ? AS st{}",
                " UNION ALL SELECT ?, ?, ?, ?, ?, ?".repeat(rows.saturating_sub(1))
            );
            format!(
                "UPDATE device_main AS d JOIN ({derived}) AS v ON d.id = v.id \
                 SET d.last_report_data = v.data, d.last_seen = v.seen, d.last_heartbeat = v.hb, \
                     d.is_online = v.online, d.device_status = v.st"
            )
        }
    }
}

/// Writes the merged rows back, one multi-row statement per chunk, keyed by the primary key;
/// `device_status` cut to `status_chars` characters.
async fn write_rows(
    tx: &mut Transaction<'static, MySql>,
    rows: &[&LockedRow],
    mode: WriteMode,
    status_chars: Option<usize>,
) -> Result<(), StoreError> {
    for chunk in shaped_chunks(rows) {
        let mut q = sqlx::query(sqlx::AssertSqlSafe(write_sql(mode, chunk.len())));
        for r in &chunk {
            let s = &r.state;
            q = q.bind(r.id);
            if mode == WriteMode::Upsert {
                q = q
                    .bind(r.device_id.as_str())
                    .bind(r.uuid.as_str())
                    .bind(r.name.as_str());
            }
            q = q
                .bind(s.data_json())
                .bind(s.last_seen)
                .bind(s.last_heartbeat)
                .bind(i8::from(s.is_online))
                .bind(
                    s.device_status
                        .as_deref()
                        .map(|st| status_chars.map_or(st, |n| fit_chars(st, n))),
                );
        }
        q.execute(&mut **tx).await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_have_fixed_shapes_and_keep_every_item() {
        for n in [0usize, 1, 2, 8, 9, 64, 65, 256, 257, 500, 1000] {
            let items: Vec<usize> = (0..n).collect();
            let chunks = shaped_chunks(&items);
            for c in &chunks {
                assert!(SHAPES.contains(&c.len()), "{n}: {}", c.len());
            }
            let mut seen: Vec<usize> = chunks.concat();
            seen.dedup();
            assert_eq!(seen, items, "{n}");
        }
    }

    #[test]
    fn an_in_list_has_one_placeholder_per_device() {
        let mut q = QueryBuilder::<MySql>::new("SELECT 1 WHERE u IN ");
        push_list(&mut q, &["a", "b", "c"]);
        assert_eq!(q.sql().as_str(), "SELECT 1 WHERE u IN (?, ?, ?)");
    }

    #[test]
    fn exact_chunks_use_shapes_without_padding() {
        for n in [0usize, 1, 7, 8, 9, 300, 513] {
            let items: Vec<usize> = (0..n).collect();
            let chunks = exact_chunks(&items);
            assert!(chunks.iter().all(|c| SHAPES.contains(&c.len())), "{n}");
            assert_eq!(chunks.concat(), items, "{n}");
        }
    }
}
