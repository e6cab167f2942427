//! Kept rejects (opt-in): rejected messages stored in `ingest_rejects` with their reason and the
//! start of their payload, bounded by count and age, and a query for `mqtt-ingest rejects`.
//!
//! Recording never waits: the event loop hands a record to a bounded queue and goes on; if the
//! queue is full (the database is slow), the record is dropped and counted. Rejects are for
//! diagnosis; they must not slow the ingest path down.

use std::time::Duration;

use chrono::{DateTime, FixedOffset, NaiveDateTime, Utc};
use sqlx::{MySql, MySqlPool, QueryBuilder, Row};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::backoff::Backoff;
use crate::intake::rejection::Rejection;
use crate::intake::zone::Zone;
use crate::store::sql::{StoreError, delete_in_batches, exact_chunks, fit_chars};

/// Longest topic kept (the column is `VARCHAR(255)`).
const TOPIC_MAX_CHARS: usize = 255;
/// Longest reason text kept (the column is `VARCHAR(512)`).
const DETAIL_MAX_CHARS: usize = 512;

/// One rejected message, ready to store.
#[derive(Debug, Clone, PartialEq)]
pub struct RejectRecord {
    received_at: NaiveDateTime,
    topic: String,
    device: Option<String>,
    reason: &'static str,
    detail: String,
    payload: Vec<u8>,
    payload_bytes: usize,
}

impl RejectRecord {
    /// A record of `rejection`, for a message that came on `topic` with `payload` (its start:
    /// `payload_bytes` is the full size). `messages`: how many messages it stands for (folded
    /// into one update, all rejected with it; the evidence is the first one's).
    pub fn new(
        topic: String,
        payload: Vec<u8>,
        payload_bytes: usize,
        device: Option<&str>,
        rejection: &Rejection,
        received_at: DateTime<FixedOffset>,
        messages: u64,
    ) -> Self {
        let detail = if messages > 1 {
            format!("{rejection} ({messages} messages folded into one; the first is shown)")
        } else {
            rejection.to_string()
        };
        RejectRecord {
            // In the database's zone, like every DATETIME the service writes.
            received_at: received_at.naive_local(),
            topic: fit_topic(&topic).to_owned(),
            device: device.map(str::to_owned),
            reason: rejection.reason(),
            detail: fit_chars(&detail, DETAIL_MAX_CHARS).to_owned(),
            payload,
            payload_bytes,
        }
    }
}

/// The part of a topic the table keeps.
pub fn fit_topic(topic: &str) -> &str {
    fit_chars(topic, TOPIC_MAX_CHARS)
}

/// Writes queued records in multi-row inserts until every sink is dropped and the queue is
/// empty. A failed insert is retried (the writers' policy, at most [`ATTEMPTS`] tries: kept
/// rejects are diagnostics, and must not hold up the service's stop), then given up with a
/// warning.
pub async fn run_writer(pool: MySqlPool, mut rx: mpsc::Receiver<RejectRecord>) {
    let mut batch = Vec::with_capacity(256);
    while rx.recv_many(&mut batch, 256).await > 0 {
        let mut backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(2));
        for attempt in 1.. {
            let Err(e) = insert(&pool, &batch).await else {
                break;
            };
            let e = StoreError::from(e);
            match e.retry_after(&mut backoff) {
                Some(delay) if attempt < ATTEMPTS => {
                    debug!(error = %e, attempt, "keeping rejects failed; retrying");
                    tokio::time::sleep(delay).await;
                }
                _ => {
                    warn!(error = %e, records = batch.len(), "could not keep rejected messages");
                    break;
                }
            }
        }
        batch.clear();
    }
}

/// Tries to keep one batch of rejects.
const ATTEMPTS: u32 = 4;

async fn insert(pool: &MySqlPool, records: &[RejectRecord]) -> Result<(), sqlx::Error> {
    // Not padded: a repeated record would be a duplicate row here.
    for chunk in exact_chunks(records) {
        let mut q = QueryBuilder::<MySql>::new(
            "INSERT INTO ingest_rejects \
               (received_at, topic, device_uuid, reason, detail, payload, payload_bytes) ",
        );
        // Every value here is the service's own (the receive time, text, sizes): none can fail
        // to encode, which QueryBuilder would answer with a panic.
        q.push_values(chunk, |mut row, r| {
            row.push_bind(r.received_at)
                .push_bind(&r.topic)
                .push_bind(r.device.as_deref())
                .push_bind(r.reason)
                .push_bind(&r.detail)
                .push_bind(&r.payload)
                .push_bind(r.payload_bytes as u64);
        });
        q.build().execute(pool).await?;
    }
    Ok(())
}

/// Keeps at most `keep` rows and none older than `retention`; deletes in small batches.
pub async fn prune(
    pool: &MySqlPool,
    keep: u64,
    retention: Duration,
    zone: &Zone,
) -> Result<u64, sqlx::Error> {
    let mut deleted = 0;
    if let Some(cutoff) = chrono::Duration::from_std(retention)
        .ok()
        .and_then(|age| zone.naive(Utc::now()).checked_sub_signed(age))
    {
        deleted += delete_in_batches(
            pool,
            "DELETE FROM ingest_rejects WHERE received_at < ? LIMIT 1000",
            1000,
            cutoff,
        )
        .await?;
    }
    let newest_dropped: Option<u64> = sqlx::query_scalar(
        "SELECT CAST(id AS UNSIGNED) FROM ingest_rejects ORDER BY id DESC LIMIT 1 OFFSET ?",
    )
    .bind(keep)
    .fetch_optional(pool)
    .await?;
    if let Some(last) = newest_dropped {
        deleted += delete_in_batches(
            pool,
            "DELETE FROM ingest_rejects WHERE id <= ? LIMIT 1000",
            1000,
            last,
        )
        .await?;
    }
    Ok(deleted)
}

/// Prunes every `interval` until shutdown.
pub async fn run_retention(
    pool: MySqlPool,
    keep: u64,
    retention: Duration,
    interval: Duration,
    zone: Zone,
    shutdown: CancellationToken,
) {
    loop {
        match prune(&pool, keep, retention, &zone).await {
            Ok(0) => {}
            Ok(n) => debug!(deleted = n, "old rejects removed"),
            Err(e) => warn!(error = %e, "reject retention failed; trying again later"),
        }
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = shutdown.cancelled() => return,
        }
    }
}

/// A kept reject, as `mqtt-ingest rejects` shows it.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredReject {
    /// When it arrived (UTC).
    pub received_at: NaiveDateTime,
    /// Its topic.
    pub topic: String,
    /// The device, when the topic named a valid one.
    pub device: Option<String>,
    /// Reason code.
    pub reason: String,
    /// The reason in words.
    pub detail: String,
    /// The start of the payload.
    pub payload: Vec<u8>,
    /// The whole payload's size.
    pub payload_bytes: u64,
}

/// The latest `limit` rejects, newest first, optionally for one device or one reason.
pub async fn latest(
    pool: &MySqlPool,
    device: Option<&str>,
    reason: Option<&str>,
    limit: u32,
) -> Result<Vec<StoredReject>, sqlx::Error> {
    let rows = sqlx::query(
        "SELECT received_at, topic, device_uuid, reason, detail, payload, \
                CAST(payload_bytes AS UNSIGNED) AS payload_bytes \
         FROM ingest_rejects \
         WHERE (? IS NULL OR device_uuid = ?) AND (? IS NULL OR reason = ?) \
         ORDER BY id DESC LIMIT ?",
    )
    .bind(device)
    .bind(device)
    .bind(reason)
    .bind(reason)
    .bind(limit)
    .fetch_all(pool)
    .await?;
    rows.iter()
        .map(|r| {
            Ok(StoredReject {
                received_at: r.try_get("received_at")?,
                topic: r.try_get("topic")?,
                device: r.try_get("device_uuid")?,
                reason: r.try_get("reason")?,
                detail: r.try_get("detail")?,
                payload: r
                    .try_get::<Option<Vec<u8>>, _>("payload")?
                    .unwrap_or_default(),
                payload_bytes: r.try_get("payload_bytes")?,
            })
        })
        .collect()
}

impl StoredReject {
    /// One block of text for a terminal: time, reason, topic, detail, payload (escaped).
    pub fn render(&self) -> String {
        const SHOWN: usize = 200;
        let text = String::from_utf8_lossy(&self.payload);
        let mut payload: String = text
            .chars()
            .take(SHOWN)
            .collect::<String>()
            .escape_debug()
            .to_string();
        if text.chars().count() > SHOWN || (self.payload.len() as u64) < self.payload_bytes {
            payload.push_str(&format!(" … ({} bytes in all)", self.payload_bytes));
        }
        format!(
            "{}  {}  {}\n    {}\n    payload: {}",
            self.received_at.format("%Y-%m-%d %H:%M:%S%.3f"),
            self.reason,
            self.topic.escape_debug(),
            self.detail,
            payload
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn render_escapes_and_marks_cut_payloads() {
        let r = StoredReject {
            received_at: NaiveDateTime::default(),
            topic: "devices/x\n/data".into(),
            device: None,
            reason: "not_json".into(),
            detail: "payload is not valid JSON".into(),
            payload: b"ab\x00".to_vec(),
            payload_bytes: 10,
        };
        let text = r.render();
        assert!(text.contains("devices/x\\n/data"), "{text}");
        assert!(
            text.contains("ab\\0") && text.contains("(10 bytes in all)"),
            "{text}"
        );
    }
}
