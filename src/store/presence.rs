//! Device presence: a device that sent nothing for a while is set offline by a periodic sweep
//! in SQL. Doing it in the database (not from memory) makes the state right straight after a
//! restart of the service and safe with several instances sweeping the same table.

use std::time::Duration;

use chrono::Utc;
use sqlx::MySqlPool;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::intake::zone::Zone;
use crate::store::sql::begin_read_committed;

/// Sets offline every device whose `last_seen` is older than `timeout` (or unset); returns how
/// many changed.
pub async fn sweep(pool: &MySqlPool, timeout: Duration, zone: &Zone) -> Result<u64, sqlx::Error> {
    // The cutoff comes from this host's clock, on the database zone's wall clock like
    // last_seen, so the server's own time zone does not matter. A timeout too large to
    // subtract means nobody is ever old enough.
    let Some(cutoff) = chrono::Duration::from_std(timeout)
        .ok()
        .and_then(|t| zone.naive(Utc::now()).checked_sub_signed(t))
    else {
        return Ok(0);
    };
    // READ COMMITTED: CodeHubot's table has no index on last_seen, so the statement reads
    // every online row (100,000 in about 80 ms: the benchmark's `presence` scenario). Under
    // REPEATABLE READ it would lock each row it reads until it ends, holding the writers up;
    // under READ COMMITTED InnoDB lets go of the rows that do not match at once.
    let mut conn = pool.acquire().await?;
    let mut tx = begin_read_committed(&mut conn).await?;
    let result = sqlx::query(
        "UPDATE device_main SET is_online = 0 \
         WHERE is_online <> 0 AND (last_seen IS NULL OR last_seen < ?)",
    )
    .bind(cutoff)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(result.rows_affected())
}

/// Sweeps every `interval` until shutdown (first sweep at once).
pub async fn run_sweeper(
    pool: MySqlPool,
    timeout: Duration,
    interval: Duration,
    zone: Zone,
    shutdown: CancellationToken,
) {
    info!(
        timeout_secs = timeout.as_secs(),
        "presence: devices silent this long are set offline"
    );
    loop {
        match sweep(&pool, timeout, &zone).await {
            Ok(0) => debug!("presence sweep: nothing changed"),
            Ok(n) => info!(
                devices = n,
                "presence sweep: devices set offline after silence"
            ),
            Err(e) => warn!(error = %e, "presence sweep failed; trying again later"),
        }
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = shutdown.cancelled() => return,
        }
    }
}
