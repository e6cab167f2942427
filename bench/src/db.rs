//! The throw-away database `bench_<unique>` (the test kit's): the service's own migrations,
//! device rows, the progress queries, the single-connection upsert limit.

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use chrono::{SecondsFormat, Utc};
use mqtt_ingest_testkit::TestDb;
use sqlx::mysql::MySqlPool;
use sqlx::{AssertSqlSafe, Connection as _, Row as _};

use mqtt_ingest::store::placeholders;

use crate::args::DbTarget;
use crate::progress::Progress;

/// Rows per INSERT when registering devices.
const SEED_CHUNK: u64 = 1000;

/// The per-device sequence number the publishers send as sensor `seq`, as a number.
macro_rules! seq_expr {
    () => {
        "CAST(JSON_VALUE(last_report_data, '$.sensors.seq.value') AS DOUBLE)"
    };
}

/// (devices at the last seq, sum of the stored seqs); one full scan.
const DRAIN_STATUS: &str = concat!(
    "SELECT CAST(COALESCE(SUM(v = ?), 0) AS SIGNED), CAST(COALESCE(SUM(v), 0) AS SIGNED) ",
    "FROM (SELECT ",
    seq_expr!(),
    " AS v FROM device_main) t"
);

/// One device's stored seq (an index lookup).
const DEVICE_SEQ: &str = concat!("SELECT ", seq_expr!(), " FROM device_main WHERE uuid = ?");

/// Every device's uuid and stored seq.
const SEQS: &str = concat!(
    "SELECT uuid, ",
    seq_expr!(),
    " FROM device_main WHERE id <= ?"
);

/// The benchmark's database: the test kit's throw-away database (dropped when this is
/// dropped), with the service's tables.
pub struct BenchDb {
    db: TestDb,
    /// `device_main` is CodeHubot's (its rows need a `device_secret`).
    codehubot: bool,
}

/// CodeHubot's `device_main` as its backend creates it (the integration tests' fixture, written
/// from the real DDL): 40 columns, no index on `last_seen`, one on `is_online`. `{team}` is
/// the team column's name.
const CODEHUBOT_DEVICE_MAIN: &str =
    include_str!("../../tests/it/fixtures/codehubot-device-main.sql");

/// Creates CodeHubot's `device_main` (with its `team_id` column) in `pool`'s database.
pub async fn create_codehubot_device_main(pool: &MySqlPool) -> anyhow::Result<()> {
    let ddl = CODEHUBOT_DEVICE_MAIN.replace("{team}", "team_id");
    for statement in mqtt_ingest_testkit::sql_statements(&ddl) {
        sqlx::query(AssertSqlSafe(statement))
            .execute(pool)
            .await
            .context("creating CodeHubot's device_main")?;
    }
    Ok(())
}

impl BenchDb {
    /// Creates `bench_<unique>` and runs the service's migrations in it; with `codehubot`,
    /// `device_main` is then made again as CodeHubot's backend makes it.
    pub async fn create(target: &DbTarget, codehubot: bool) -> anyhow::Result<BenchDb> {
        let db = TestDb::try_named(
            "bench",
            &target.host,
            target.port,
            &target.user,
            &target.password,
        )
        .await
        .with_context(|| {
            format!(
                "creating a database on MariaDB at {}:{}",
                target.host, target.port
            )
        })?;
        mqtt_ingest::store::MIGRATOR
            .run(&db.pool())
            .await
            .context("running the service's migrations")?;
        if codehubot {
            sqlx::query("DROP TABLE device_main")
                .execute(&db.pool())
                .await?;
            create_codehubot_device_main(&db.pool()).await?;
        }
        Ok(BenchDb { db, codehubot })
    }

    /// The secret column and value the rows of CodeHubot's table need, which its backend
    /// always sets (none for the service's own table): `(", device_secret", ",'secret'")`.
    fn secret(&self) -> (&'static str, &'static str) {
        if self.codehubot {
            (", device_secret", ",'secret'")
        } else {
            ("", "")
        }
    }

    /// The database's name.
    pub fn name(&self) -> &str {
        &self.db.name
    }

    fn pool(&self) -> MySqlPool {
        self.db.pool()
    }

    /// Empties `device_main` and registers devices 0..n as the backend would:
    /// (`bench-dev-<i>`, `dev<i>`, `Bench <i>`).
    pub async fn reseed(&self, n: u64) -> anyhow::Result<()> {
        sqlx::query("TRUNCATE TABLE device_main")
            .execute(&self.pool())
            .await?;
        let mut start = 0;
        while start < n {
            let end = (start + SEED_CHUNK).min(n);
            let (secret_column, secret) = self.secret();
            let mut sql =
                format!("INSERT INTO device_main (device_id, uuid, name{secret_column}) VALUES ");
            for i in start..end {
                if i > start {
                    sql.push(',');
                }
                let _ = write!(sql, "('bench-dev-{i}','dev{i}','Bench {i}'{secret})");
            }
            sqlx::raw_sql(AssertSqlSafe(sql))
                .execute(&self.pool())
                .await
                .context("registering devices")?;
            start = end;
        }
        Ok(())
    }

    /// (devices whose stored `seq` is `last`, sum of every device's stored `seq`). The sum is
    /// the number of messages committed so far, since each device's messages are numbered 1..
    pub async fn drain_status(&self, last: u64) -> anyhow::Result<(u64, u64)> {
        let row = sqlx::query(DRAIN_STATUS)
            .bind(last as f64)
            .fetch_one(&self.pool())
            .await?;
        let done: i64 = row.try_get(0)?;
        let sum: i64 = row.try_get(1)?;
        Ok((done.max(0) as u64, sum.max(0) as u64))
    }

    /// The stored seq of device `dev<i>` (0 when none yet). Cheap: one row by its index.
    pub async fn device_seq(&self, i: u64) -> anyhow::Result<u64> {
        let seq: Option<Option<f64>> = sqlx::query_scalar(DEVICE_SEQ)
            .bind(format!("dev{i}"))
            .fetch_optional(&self.pool())
            .await?;
        Ok(seq.flatten().unwrap_or(0.0) as u64)
    }

    /// Every device's index (from `dev<i>`) and its stored `seq` (0 when none yet).
    /// Each of the first `devices` devices (by registration) and its stored `seq`.
    pub async fn seqs(&self, devices: u64) -> anyhow::Result<Vec<(usize, u64)>> {
        let rows = sqlx::query(SEQS)
            .bind(devices)
            .fetch_all(&self.pool())
            .await?;
        let mut out = Vec::with_capacity(rows.len());
        for row in rows {
            let uuid: String = row.try_get(0)?;
            let seq: Option<f64> = row.try_get(1)?;
            if let Some(i) = uuid.strip_prefix("dev").and_then(|s| s.parse().ok()) {
                out.push((i, seq.unwrap_or(0.0) as u64));
            }
        }
        Ok(out)
    }

    /// The database's own upsert limit: `rows` rows of the shape the service writes, upserted
    /// over `conns` connections at once (the service's `INGEST_WRITERS`; each takes its own
    /// devices, as the service's writers do), `batch` rows per statement, one fixed statement
    /// shape (so one prepared statement), autocommit. Returns (rows written, time).
    pub async fn upsert_limit(
        &self,
        devices: u64,
        rows: u64,
        batch: usize,
        conns: u64,
        progress: &std::sync::Arc<Progress>,
    ) -> anyhow::Result<(u64, Duration)> {
        // CodeHubot's table needs a device secret for the insert half.
        let (secret_column, secret) = self.secret();
        let row = format!("(?,?,?,?,?,?{secret})");
        let sql: std::sync::Arc<str> = format!(
            "INSERT INTO device_main (device_id, uuid, name, last_report_data, last_seen, is_online{secret_column}) \
             VALUES {} ON DUPLICATE KEY UPDATE last_report_data = VALUES(last_report_data), \
             last_seen = VALUES(last_seen), is_online = VALUES(is_online)",
            placeholders(batch, &row, ",")
        )
        .into();
        let per_conn = rows.div_ceil(conns);
        let options = self.db.connect_options();
        let mut conns_open = Vec::new();
        for _ in 0..conns {
            conns_open.push(sqlx::MySqlConnection::connect_with(&options).await?);
        }
        let started = Instant::now();
        let mut tasks = tokio::task::JoinSet::new();
        for (k, mut conn) in conns_open.into_iter().enumerate() {
            let sql = sql.clone();
            let progress = progress.clone();
            tasks.spawn(async move {
                let k = k as u64;
                // This connection's devices: k, k + conns, k + 2 conns, …
                let mine = devices.div_ceil(conns).max(1);
                let mut done = 0u64;
                while done < per_conn {
                    let now = Utc::now();
                    let ts = now.to_rfc3339_opts(SecondsFormat::Millis, true);
                    let mut q = sqlx::query(AssertSqlSafe(sql.clone()));
                    for _ in 0..batch {
                        let d = ((done % mine) * conns + k) % devices;
                        let seq = done / mine + 1;
                        q = q
                            .bind(format!("bench-dev-{d}"))
                            .bind(format!("dev{d}"))
                            .bind(format!("Bench {d}"))
                            .bind(stored_json(seq, &ts))
                            .bind(now)
                            .bind(true);
                        done += 1;
                    }
                    q.execute(&mut conn).await.context("upsert")?;
                    progress
                        .committed
                        .fetch_add(batch as u64, std::sync::atomic::Ordering::Relaxed);
                }
                let _ = conn.close().await;
                Ok::<u64, anyhow::Error>(done)
            });
        }
        let mut written = 0;
        while let Some(done) = tasks.join_next().await {
            written += done.context("an upsert task")??;
        }
        Ok((written, started.elapsed()))
    }

    /// The database's own limit for history rows: `rows` rows of the shape the service appends
    /// (`INSERT IGNORE INTO device_history`, two sensors per message, each reading its own time)
    /// over one connection, `batch` rows per statement, autocommit. Returns (rows, time).
    pub async fn history_limit(
        &self,
        devices: u64,
        rows: u64,
        batch: usize,
        progress: &Progress,
    ) -> anyhow::Result<(u64, Duration)> {
        sqlx::query("TRUNCATE TABLE device_history")
            .execute(&self.pool())
            .await?;
        let mut conn = self.db.connect().await?;
        let sql: std::sync::Arc<str> = format!(
            "INSERT IGNORE INTO device_history \
             (device_uuid, sensor, value, unit, reading_time, received_at) VALUES {}",
            placeholders(batch, "(?,?,?,?,?,?)", ",")
        )
        .into();
        let base = Utc::now().naive_utc() - chrono::TimeDelta::hours(1);
        let started = Instant::now();
        let mut row = 0u64;
        while row < rows {
            let now = Utc::now().naive_utc();
            let mut q = sqlx::query(AssertSqlSafe(sql.clone()));
            for _ in 0..batch {
                let message = row / 2;
                let d = message % devices;
                let at = base + chrono::TimeDelta::milliseconds((message / devices) as i64);
                let (sensor, value) = if row.is_multiple_of(2) {
                    ("seq", (message / devices + 1) as f64)
                } else {
                    ("temperature", 21.5)
                };
                q = q
                    .bind(format!("dev{d}"))
                    .bind(sensor)
                    .bind(value)
                    .bind("")
                    .bind(at)
                    .bind(now);
                row += 1;
            }
            q.execute(&mut conn).await.context("history insert")?;
            progress
                .committed
                .store(row, std::sync::atomic::Ordering::Relaxed);
        }
        let took = started.elapsed();
        let _ = conn.close().await;
        Ok((row, took))
    }

    /// The database's own limit for `device_sensors`: `rows` rows (three sensors per device,
    /// each newer than the last) through the service's own upsert statement, over one
    /// connection, `batch` rows per statement, autocommit. Returns (rows, time).
    pub async fn sensors_limit(
        &self,
        devices: u64,
        rows: u64,
        batch: usize,
        progress: &Progress,
    ) -> anyhow::Result<(u64, Duration)> {
        const SENSORS: [(&str, &str); 3] = [("temperature", "°C"), ("humidity", "%"), ("seq", "")];
        let mut conn = self.db.connect().await?;
        let sql: std::sync::Arc<str> =
            mqtt_ingest::store::sensors::upsert_sql("device_sensors", batch, 300).into();
        let base = Utc::now().naive_utc() - chrono::TimeDelta::hours(1);
        let started = Instant::now();
        let mut row = 0u64;
        while row < rows {
            let mut q = sqlx::query(AssertSqlSafe(sql.clone()));
            for _ in 0..batch {
                let (sensor, unit) = SENSORS[(row % 3) as usize];
                let message = row / 3;
                let d = message % devices;
                let round = message / devices;
                q = q
                    .bind(format!("dev{d}"))
                    .bind(sensor)
                    .bind((round + 1).to_string())
                    .bind(unit)
                    .bind("DHT11")
                    .bind(base + chrono::TimeDelta::milliseconds(round as i64));
                row += 1;
            }
            q.execute(&mut conn)
                .await
                .context("device_sensors upsert")?;
            progress
                .committed
                .store(row, std::sync::atomic::Ordering::Relaxed);
        }
        let took = started.elapsed();
        let _ = conn.close().await;
        Ok((row, took))
    }

    /// Creates CodeHubot's `device_sensors` (the tests' fixture, from its DDL), or drops it.
    pub async fn sensors_table(&self, create: bool) -> anyhow::Result<()> {
        sqlx::query("DROP TABLE IF EXISTS device_sensors")
            .execute(&self.pool())
            .await?;
        if create {
            let ddl = include_str!("../../tests/it/fixtures/codehubot-device-sensors.sql");
            for statement in mqtt_ingest_testkit::sql_statements(ddl) {
                sqlx::query(AssertSqlSafe(statement))
                    .execute(&self.pool())
                    .await
                    .context("creating device_sensors")?;
            }
        }
        Ok(())
    }

    /// How many rows `device_sensors` holds.
    pub async fn sensor_rows(&self) -> anyhow::Result<i64> {
        Ok(sqlx::query_scalar("SELECT COUNT(*) FROM device_sensors")
            .fetch_one(&self.pool())
            .await?)
    }

    /// Closes the pool and drops the database.
    pub async fn drop_database(self) {
        self.pool().close().await;
        drop(self.db);
    }
}

/// `last_report_data` as the service stores it for the benchmark's full-format message
/// (about 250 bytes).
fn stored_json(seq: u64, ts: &str) -> String {
    format!(
        "{{\"sensors\": {{\"seq\": {{\"value\": {seq}, \"unit\": \"\", \"timestamp\": \"{ts}\"}}, \
         \"temperature\": {{\"value\": 21.5, \"unit\": \"°C\", \"timestamp\": \"{ts}\"}}, \
         \"humidity\": {{\"value\": 60, \"unit\": \"\", \"timestamp\": \"{ts}\"}}}}, \
         \"status\": {{\"rssi\": -50}}, \"upload_timestamp\": \"{ts}\"}}"
    )
}
