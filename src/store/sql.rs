//! What every table's code shares, so that none of them imports another (`store` and `history`
//! used to import each other): the classes of a database error and the one retry policy they decide,
//! the statement shapes and placeholders, cutting text to a column, and deleting in batches.

use std::time::Duration;

use crate::backoff::{Backoff, with_jitter};

use sqlx::mysql::MySqlDatabaseError;
use sqlx::{Connection as _, MySql, MySqlConnection, MySqlPool, Transaction};

/// A failed database attempt, sorted by what the writer should do about it.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database refused a statement because of the data in it (too long, invalid JSON, …):
    /// retrying the same message gives the same answer.
    #[error("database refused the data: {0}")]
    Refused(#[source] sqlx::Error),
    /// Two transactions met on the same locks (deadlock, lock wait timeout): the database
    /// rolled this one back. Retried at once.
    #[error("transaction conflict: {0}")]
    Conflict(#[source] sqlx::Error),
    /// Anything else: connection lost, server gone, table missing. Retried with backoff.
    #[error("database unavailable: {0}")]
    Unavailable(#[source] sqlx::Error),
}

/// The first wait of a database retry; it doubles up to the task's maximum
/// (`DB_RETRY_MAX_SECS` for the writers).
pub const RETRY_FIRST: Duration = Duration::from_millis(100);

/// The pause after a transaction conflict: the other transaction has usually committed by then.
const CONFLICT_PAUSE: Duration = Duration::from_millis(20);

impl StoreError {
    /// The database's error behind it.
    pub fn cause(&self) -> &sqlx::Error {
        match self {
            StoreError::Refused(e) | StoreError::Conflict(e) | StoreError::Unavailable(e) => e,
        }
    }

    /// The retry policy of every database task (the writers, the start-up check, kept
    /// rejects), decided by the error's class: how long to wait before the next attempt, or
    /// `None` when another attempt cannot help (the data itself was refused). A conflict is
    /// retried after a short pause that does not grow; an unavailable database after the
    /// backoff's next wait — at once its longest when the server refused the service's
    /// credentials or database, which waiting will not cure soon.
    pub fn retry_after(&self, backoff: &mut Backoff) -> Option<Duration> {
        match self {
            StoreError::Refused(_) => None,
            StoreError::Conflict(_) => Some(with_jitter(CONFLICT_PAUSE)),
            StoreError::Unavailable(e) => Some(unavailable_retry(Some(e), backoff)),
        }
    }
}

/// [`StoreError::retry_after`] for a database that could not be reached or used (`error`, when
/// the failure was a database error at all: a migration's may not be).
pub fn unavailable_retry(error: Option<&sqlx::Error>, backoff: &mut Backoff) -> Duration {
    if error.is_some_and(is_refusal) {
        backoff.give_up_quickly();
    }
    backoff.next_delay()
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
        const CONFLICTS: &[u16] = &[
            1205, // lock wait timeout
            1213, // deadlock
        ];
        match error_number(&e) {
            Some(n) if DATA_ERRORS.contains(&n) => StoreError::Refused(e),
            Some(n) if CONFLICTS.contains(&n) => StoreError::Conflict(e),
            _ => StoreError::Unavailable(e),
        }
    }
}

/// The MySQL/MariaDB error number of an error the server returned.
pub fn error_number(e: &sqlx::Error) -> Option<u16> {
    e.as_database_error()
        .and_then(|d| d.try_downcast_ref::<MySqlDatabaseError>())
        .map(MySqlDatabaseError::number)
}

/// What a person should check when the database refused the service or could not be reached:
/// the setting to look at, from the error's class; `None` when nothing in the settings is
/// likely at fault.
pub fn settings_hint(e: &sqlx::Error) -> Option<&'static str> {
    match (error_number(e), e) {
        (Some(1045 | 1698), _) => {
            Some("the server refused the login: check DB_USER and DB_PASSWORD")
        }
        (Some(1044), _) => Some(
            "DB_USER may not use DB_NAME: grant it the rights in docs/operations.md's least-privilege grant (Security)",
        ),
        (Some(1049), _) => Some("no such database: check DB_NAME, or create it"),
        (Some(_), _) => None,
        (None, sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut) => Some(
            "no connection: check DB_HOST and DB_PORT, and that the server is running and reachable",
        ),
        (None, sqlx::Error::Tls(_)) => {
            Some("TLS to the database failed: check DB_SSL_MODE and DB_SSL_CA_FILE")
        }
        _ => None,
    }
}

/// Whether the server refused the service itself (credentials, rights, the database name):
/// retrying soon will not help.
pub fn is_refusal(e: &sqlx::Error) -> bool {
    matches!(error_number(e), Some(1044 | 1045 | 1049 | 1698))
}

/// Statement shapes: a batch is cut into chunks of at most the largest, and a chunk is padded
/// up to the next shape by repeating its last item (harmless in an `IN` list, and a repeated row
/// writes the same values). A few fixed shapes keep the prepared-statement cache small.
pub const SHAPES: [usize; 4] = [1, 8, 64, 256];

/// Begins a READ COMMITTED transaction on `conn`: rows read and not changed are not locked
/// until its end, and a row another transaction holds is read as last committed. The level is
/// set for the next transaction only and BEGIN takes it at once, so nothing that later runs on
/// the (pooled) connection inherits it, even when the transaction fails.
pub async fn begin_read_committed(
    conn: &mut MySqlConnection,
) -> Result<Transaction<'_, MySql>, sqlx::Error> {
    sqlx::query("SET TRANSACTION ISOLATION LEVEL READ COMMITTED")
        .execute(&mut *conn)
        .await?;
    conn.begin().await
}

/// Cuts `items` into chunks of the fixed [`SHAPES`], padding the last one. The chunks point into
/// `items`: a row of a batch is not copied (a device_sensors row is five strings).
pub fn shaped_chunks<T>(items: &[T]) -> Vec<Vec<&T>> {
    let largest = SHAPES[SHAPES.len() - 1];
    items
        .chunks(largest)
        .map(|chunk| {
            let size = SHAPES
                .iter()
                .copied()
                .find(|&s| s >= chunk.len())
                .unwrap_or(largest);
            let mut padded: Vec<&T> = Vec::with_capacity(size);
            padded.extend(chunk);
            if let Some(last) = chunk.last() {
                padded.resize(size, last);
            }
            padded
        })
        .collect()
}

/// Cuts `items` into pieces whose sizes are all [`SHAPES`], without padding (for inserts where
/// a repeated row would be a duplicate): greedily the largest shape that fits.
pub fn exact_chunks<T>(items: &[T]) -> Vec<&[T]> {
    let mut out = Vec::new();
    let mut rest = items;
    while !rest.is_empty() {
        let size = SHAPES
            .iter()
            .rev()
            .copied()
            .find(|&s| s <= rest.len())
            .unwrap_or(1);
        let (head, tail) = rest.split_at(size);
        out.push(head);
        rest = tail;
    }
    out
}

/// `rows` copies of `per_row` joined by `separator`: the placeholders of a multi-row statement.
///
/// For the statements that bind what devices sent (reading times, readings: `device_main`'s
/// write, `device_sensors`, `device_history`). The others use `sqlx::QueryBuilder`, whose
/// `push_bind` panics when a value cannot be encoded (a date MySQL cannot hold), where
/// `sqlx::query(…).bind(…)` returns that as the statement's error — the writer then isolates
/// the message instead of the service crashing on input.
pub fn placeholders(rows: usize, per_row: &str, separator: &str) -> String {
    vec![per_row; rows].join(separator)
}

/// `s` cut to at most `chars` characters, to fit a text column.
pub fn fit_chars(s: &str, chars: usize) -> &str {
    match s.char_indices().nth(chars) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

/// Runs `sql` (a `DELETE … LIMIT n` with one placeholder, bound to `arg`) until it deletes fewer
/// than `n` rows, so that a large clean-up never holds its locks for long; returns how many.
pub async fn delete_in_batches<A>(
    pool: &MySqlPool,
    sql: &'static str,
    n: u64,
    arg: A,
) -> Result<u64, sqlx::Error>
where
    A: for<'q> sqlx::Encode<'q, MySql> + sqlx::Type<MySql> + Send + Copy,
{
    let mut deleted = 0;
    loop {
        let done = sqlx::query(sql)
            .bind(arg)
            .execute(pool)
            .await?
            .rows_affected();
        deleted += done;
        if done < n {
            return Ok(deleted);
        }
        // Let the ingest path's transactions in between.
        tokio::task::yield_now().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_retry_policy_by_class() {
        let max = Duration::from_secs(30);
        let mut backoff = Backoff::new(RETRY_FIRST, max);
        let unavailable = StoreError::Unavailable(sqlx::Error::PoolTimedOut);
        let waits: Vec<Duration> = (0..12)
            .map(|_| unavailable.retry_after(&mut backoff).unwrap())
            .collect();
        assert!(waits[0] <= RETRY_FIRST && waits[0] >= RETRY_FIRST.mul_f64(0.8));
        assert!(waits[3] >= Duration::from_millis(640), "{waits:?}");
        assert!(waits.iter().all(|w| *w <= max) && waits[11] >= max.mul_f64(0.8));
        // A conflict waits a moment and does not push the backoff on.
        let mut backoff = Backoff::new(RETRY_FIRST, max);
        let conflict = StoreError::Conflict(sqlx::Error::PoolTimedOut);
        for _ in 0..5 {
            assert!(conflict.retry_after(&mut backoff).unwrap() <= CONFLICT_PAUSE);
        }
        assert!(unavailable.retry_after(&mut backoff).unwrap() <= RETRY_FIRST);
        // Refused data is never retried.
        let refused = StoreError::Refused(sqlx::Error::PoolTimedOut);
        assert_eq!(refused.retry_after(&mut backoff), None);
    }
}
