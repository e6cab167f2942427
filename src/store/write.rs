//! The write: the SQL that applies validated updates.
//!
//! A batch reads each of its devices' rows once under a row lock, merges every update into them
//! in Rust ([`crate::intake::merge`]: sensors by name, `status` by key, order-safe), and writes each row
//! once, with a few multi-row statements of fixed shapes.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use sqlx::mysql::MySqlPool;
use sqlx::{MySql, QueryBuilder, Row, Transaction};

use crate::intake::merge::DeviceState;
use crate::intake::model::Update;
use crate::intake::zone::Zone;
use crate::store::history::{self, HistoryRow};
use crate::store::sensors::{self, SensorTable};

use super::nodes::Nodes;
use super::schema::WriteMode;
use super::sql::{StoreError, error_number, exact_chunks, fit_chars, placeholders, shaped_chunks};

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

/// Writes updates through a pool.
#[derive(Debug, Clone)]
pub struct Store {
    pool: MySqlPool,
    options: StoreOptions,
    /// Set when the database refused an upsert in a way the portable statement avoids (a
    /// table [`write_mode`] misjudged): from then on this store writes with the join.
    upsert_refused: std::sync::Arc<std::sync::atomic::AtomicBool>,
    /// The nodes of `DB_HOST` behind the pool: a failure that is the node's moves the pool on.
    nodes: Option<std::sync::Arc<Nodes>>,
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
            nodes: None,
        }
    }

    /// A store on the nodes of `DB_HOST`: its pool, moved to the next node when a batch fails
    /// because of the node.
    pub fn on_nodes(nodes: std::sync::Arc<Nodes>, options: StoreOptions) -> Self {
        Self {
            nodes: Some(nodes.clone()),
            ..Self::new(nodes.pool().clone(), options)
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
        let turn = self.nodes.as_ref().map(|n| n.turn());
        let result = self.apply_once(updates).await;
        if let (Err(e), Some(nodes), Some(turn)) = (&result, &self.nodes, turn) {
            nodes.failed(turn, e.cause());
        }
        result
    }

    async fn apply_once(&self, updates: &[&Update]) -> Result<BatchOutcome, StoreError> {
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
fn push_list(q: &mut QueryBuilder<MySql>, devices: &[&&str]) {
    q.push("(");
    let mut list = q.separated(", ");
    for d in devices {
        list.push_bind(**d);
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
    use crate::store::sql::SHAPES;

    #[test]
    fn chunks_have_fixed_shapes_and_keep_every_item() {
        for n in [0usize, 1, 2, 8, 9, 64, 65, 256, 257, 500, 1000] {
            let items: Vec<usize> = (0..n).collect();
            let chunks = shaped_chunks(&items);
            for c in &chunks {
                assert!(SHAPES.contains(&c.len()), "{n}: {}", c.len());
            }
            let mut seen: Vec<usize> = chunks.concat().into_iter().copied().collect();
            seen.dedup();
            assert_eq!(seen, items, "{n}");
        }
    }

    #[test]
    fn an_in_list_has_one_placeholder_per_device() {
        let mut q = QueryBuilder::<MySql>::new("SELECT 1 WHERE u IN ");
        push_list(&mut q, &[&"a", &"b", &"c"]);
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
