//! The writer: takes validated updates from the bounded channel, writes them in batches (one
//! transaction each), and acknowledges each message only after its batch committed.
//!
//! A database that is down or slow makes the writer retry with backoff while the messages wait;
//! the channel fills and the event loop stops taking more, so memory stays bounded. A message the
//! database refuses for its own data is isolated and rejected, so it cannot stall the rest.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::mqtt::{Acker, Job};
use crate::rejection::Rejection;
use crate::rejects::RejectSink;
use crate::stats::Stats;
use crate::store::{Applied, Store, StoreError, retry_delay};

/// Hands each update to a writer chosen by its device, so that one device's messages stay in
/// order (one writer, one queue) and no two writers ever lock the same row. Device ids are
/// compared without ASCII case, as the database's usual collations do.
#[derive(Debug, Clone)]
pub struct Router {
    writers: Vec<mpsc::Sender<Job>>,
}

impl Router {
    /// A router over the writers' queues (at least one).
    pub fn new(writers: Vec<mpsc::Sender<Job>>) -> Self {
        assert!(!writers.is_empty(), "at least one writer");
        Self { writers }
    }

    /// Queues `job` for its device's writer; waits while that queue is full. Gives the job
    /// back if the writer has stopped taking messages (shutdown).
    pub async fn send(&self, job: Job) -> Result<(), Job> {
        let i = shard(job.update.device.as_str(), self.writers.len());
        self.writers[i].send(job).await.map_err(|e| e.0)
    }
}

impl Router {
    /// A handle that measures how full the writers' queues are, for `/metrics`.
    pub fn depth_probe(&self) -> QueueDepth {
        QueueDepth {
            // Weak: the probe must not keep a queue open once its writers are gone.
            queues: self.writers.iter().map(mpsc::Sender::downgrade).collect(),
        }
    }
}

/// Measures the writers' queues without holding them open.
#[derive(Debug, Clone)]
pub struct QueueDepth {
    queues: Vec<mpsc::WeakSender<Job>>,
}

impl QueueDepth {
    /// Messages waiting in all the queues together, and their total capacity.
    pub fn current(&self) -> (usize, usize) {
        self.queues
            .iter()
            .filter_map(mpsc::WeakSender::upgrade)
            .fold((0, 0), |(depth, cap), q| {
                (
                    depth + q.max_capacity() - q.capacity(),
                    cap + q.max_capacity(),
                )
            })
    }
}

/// Which of `n` writers takes `device` (FNV-1a over the lower-cased id: stable and cheap).
pub fn shard(device: &str, n: usize) -> usize {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in device.bytes() {
        h ^= u64::from(b.to_ascii_lowercase());
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    (h % n as u64) as usize
}

/// How the writer groups messages.
#[derive(Debug, Clone, Copy)]
pub struct Batching {
    /// Most messages in one transaction.
    pub max_messages: usize,
    /// How long a batch waits to fill once its first message is there.
    pub max_wait: Duration,
    /// Longest wait between retries of a failed write.
    pub retry_max: Duration,
}

/// Writes until `shutdown` fires and the channel is drained: every message the event loop
/// handed over is committed (or rejected) and acknowledged before this returns.
#[allow(clippy::too_many_arguments)] // the parts it connects; a struct would only rename them
pub async fn run_writer(
    store: Store,
    mut jobs: mpsc::Receiver<Job>,
    acker: Acker,
    rejects: Option<RejectSink>,
    stats: Arc<Stats>,
    batching: Batching,
    shutdown: CancellationToken,
) {
    let out = Outcomes {
        acker: &acker,
        rejects: rejects.as_ref(),
        stats: &stats,
    };
    let mut closing = false;
    let mut batch: Vec<Job> = Vec::with_capacity(batching.max_messages);
    loop {
        let received = if closing {
            jobs.recv_many(&mut batch, batching.max_messages).await
        } else {
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => {
                    // No new messages from here on; what is already queued is still written.
                    jobs.close();
                    closing = true;
                    info!(queued = jobs.len(), "shutting down: writing the queued messages");
                    continue;
                }
                n = jobs.recv_many(&mut batch, batching.max_messages) => n,
            }
        };
        if received == 0 {
            break; // closed and drained
        }
        if !closing && !batching.max_wait.is_zero() {
            let deadline = Instant::now() + batching.max_wait;
            while batch.len() < batching.max_messages {
                let room = batching.max_messages - batch.len();
                match tokio::time::timeout_at(deadline, jobs.recv_many(&mut batch, room)).await {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
            }
        }
        write_batch(&store, std::mem::take(&mut batch), &out, batching.retry_max).await;
        batch.reserve(batching.max_messages);
    }
    info!("writer finished: everything taken in is committed and acknowledged");
}

/// Where a batch's outcomes go: acks, kept rejects, counters.
struct Outcomes<'a> {
    acker: &'a Acker,
    rejects: Option<&'a RejectSink>,
    stats: &'a Stats,
}

impl Outcomes<'_> {
    /// Counts, logs and keeps a message the writer rejected, then acknowledges it (final).
    fn reject(&self, job: Job, rejection: Rejection) {
        self.stats.rejected(&rejection);
        if let Some(left_out) = self
            .stats
            .should_warn(job.update.device.as_str(), rejection.reason())
        {
            let hint = match rejection {
                Rejection::UnknownDevice => {
                    " (register the device, or set INGEST_REGISTER_UNKNOWN_DEVICES=true)"
                }
                _ => "",
            };
            warn!(
                device = %job.update.device,
                reason = rejection.reason(),
                error = %rejection,
                similar_left_out = left_out,
                "message rejected{hint}"
            );
        }
        if let (Some(sink), Some(evidence)) = (self.rejects, job.evidence) {
            sink.record(
                evidence,
                Some(job.update.device.as_str()),
                &rejection,
                job.update.received_at,
            );
        }
        if let Some(token) = job.ack {
            self.acker.ack(token);
        }
    }
}

/// Writes one batch, retrying until it commits; isolates messages the database refuses.
async fn write_batch(store: &Store, batch: Vec<Job>, out: &Outcomes<'_>, retry_max: Duration) {
    let stats = out.stats;
    let mut attempt = 0u32;
    loop {
        let updates: Vec<_> = batch.iter().map(|j| &j.update).collect();
        let started = Instant::now();
        match store.apply(&updates).await {
            Ok(outcome) => {
                stats.flush_took(started.elapsed());
                stats.batch_committed(outcome.rows_written as u64);
                finish(batch, outcome.applied, out);
                return;
            }
            Err(StoreError::Refused(e)) if batch.len() == 1 => {
                for job in batch {
                    out.reject(job, Rejection::DbRefused(e.to_string()));
                }
                return;
            }
            Err(StoreError::Refused(e)) => {
                warn!(error = %e, messages = batch.len(), "the database refused a batch; writing its messages one by one");
                for job in batch {
                    Box::pin(write_batch(store, vec![job], out, retry_max)).await;
                }
                return;
            }
            Err(StoreError::Conflict(e)) => {
                // Another writer held the locks; the database rolled this batch back. Nothing
                // is wrong with the database: try again after a moment.
                stats.db_error();
                debug!(error = %e, messages = batch.len(), "transaction conflict; retrying the batch");
                tokio::time::sleep(crate::backoff::with_jitter(Duration::from_millis(20))).await;
            }
            Err(StoreError::Unavailable(e)) => {
                stats.db_error();
                let delay = retry_delay(attempt, retry_max);
                attempt = attempt.saturating_add(1);
                error!(
                    error = %e,
                    messages = batch.len(),
                    retry_in_secs = delay.as_secs_f32(),
                    "database write failed; the messages wait, unacknowledged"
                );
                tokio::time::sleep(delay).await;
            }
        }
    }
}

fn finish(batch: Vec<Job>, outcomes: Vec<Applied>, out: &Outcomes<'_>) {
    let mut written = 0;
    for (job, outcome) in batch.into_iter().zip(outcomes) {
        match outcome {
            Applied::Written => {
                written += 1;
                if let Some(token) = job.ack {
                    out.acker.ack(token);
                }
            }
            Applied::UnknownDevice => out.reject(job, Rejection::UnknownDevice),
        }
    }
    out.stats.succeeded(written);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_ignore_case_and_spread() {
        assert_eq!(shard("AB:CD", 4), shard("ab:cd", 4));
        assert_eq!(shard("x", 1), 0);
        let mut counts = [0usize; 4];
        for i in 0..4000 {
            counts[shard(&format!("dev{i}"), 4)] += 1;
        }
        assert!(counts.iter().all(|&c| c > 800), "{counts:?}");
    }
}
