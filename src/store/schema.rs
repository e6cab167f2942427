//! What the service learns about the tables at start-up: how `device_main` rows can be
//! written, which columns an insert would lack, how long a text column is.

use sqlx::mysql::MySqlPool;

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
