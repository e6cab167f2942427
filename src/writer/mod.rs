//! The writer: takes validated updates from its queue, writes them in batches (one
//! transaction each), and reports each message settled ([`Settled`]) only after its batch
//! committed; the event loop sends the acks.
//!
//! Each writer has a bounded queue of parsed updates, grouped by device in order of arrival. A
//! device's data message or heartbeat that arrives while an earlier one of the same kind still
//! waits is folded into it ([`crate::intake::merge::absorb`], exact: the row ends the same) and costs
//! only its acknowledgement. So while the database is busy with one batch, the messages of the
//! devices in the next one fold together, and a backlog of many messages per device is written
//! as few rows per device.
//!
//! A database that is down or slow makes the writer retry with backoff while the messages wait;
//! the queue fills and the event loop stops taking more, so memory stays bounded. A message the
//! database refuses for its own data is isolated and rejected, so it cannot stall the rest.

mod queue;
mod router;

use queue::CloseOnDrop;
pub use queue::{Held, Queue};
pub use router::{QueueDepth, Router};

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, error, info, warn};

use crate::backoff::Backoff;
use crate::intake::rejection::Rejection;
use crate::ops::stats::Stats;
use crate::store::sql::RETRY_FIRST;
use crate::store::{Applied, Store, StoreError};
use crate::work::RejectSink;
use crate::work::{AckToken, InFlight, Settled};

#[derive(Debug, Clone, Copy)]
pub struct Batching {
    /// Most parsed updates in one transaction (messages folded into one count once).
    pub max_messages: usize,
    /// How long a batch waits to fill once its first message is there.
    pub max_wait: Duration,
    /// Longest wait between retries of a failed write.
    pub retry_max: Duration,
}

/// What a writer is given to run.
pub struct WriterParts {
    pub store: Store,
    pub queue: Arc<Queue>,
    /// Where settled messages are reported (the event loop acknowledges them).
    pub settled: Settled,
    /// Whether the broker can send more before some are acknowledged.
    pub in_flight: Arc<InFlight>,
    pub rejects: Option<RejectSink>,
    pub stats: Arc<Stats>,
    pub batching: Batching,
    pub shutdown: CancellationToken,
}

/// Writes until `shutdown` fires and the queue is drained: every message the event loop
/// handed over is committed (or rejected) and reported settled before this returns.
pub async fn run_writer(parts: WriterParts) {
    let WriterParts {
        store,
        queue,
        settled,
        in_flight,
        rejects,
        stats,
        batching,
        shutdown,
    } = parts;
    let _close = CloseOnDrop(&queue);
    let out = Outcomes {
        settled: &settled,
        rejects: rejects.as_ref(),
        stats: &stats,
    };
    let mut closing = false;
    let mut batches: u64 = 0;
    // Whether the last batch was full (in messages): only then is there a backlog worth
    // waiting to gather.
    let mut last_full = false;
    loop {
        // Wait for the first update (or the end).
        loop {
            if !closing && shutdown.is_cancelled() {
                // No new messages from here on; what is already queued is still written.
                queue.close();
                closing = true;
                info!(
                    queued = queue.updates(),
                    "shutting down: writing the queued messages"
                );
            }
            if queue.updates() > 0 {
                break;
            }
            if closing {
                info!("writer finished: everything taken in is committed and acknowledged");
                return;
            }
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => {}
                _ = queue.ready.notified() => {}
            }
        }
        // Wait for the batch to fill only while a backlog is being worked off (the last batch
        // was full): then waiting folds more messages of a device into one row and lets the
        // event loop, on the same thread, take in more. At a steady rate batches stay small and
        // leave at once, so the wait is no latency floor (live 5,000 msg/s: see
        // docs/performance.md). Never while nothing more can come: the broker sends no more
        // until some of what it sent is acknowledged (a broker that keeps one message in flight
        // would otherwise cost a whole wait per message).
        if !closing && last_full && !batching.max_wait.is_zero() {
            let deadline = Instant::now() + batching.max_wait;
            while queue.updates() < batching.max_messages && !in_flight.window_full() {
                let more = tokio::select! {
                    biased;
                    _ = shutdown.cancelled() => false,
                    r = tokio::time::timeout_at(deadline, queue.ready.notified()) => r.is_ok(),
                };
                if !more {
                    break;
                }
            }
        }
        let batch = queue.take(batching.max_messages);
        // Full in messages, folded ones included: 100 devices sending in a burst fill a batch
        // of 100 updates with 500 messages.
        last_full = batch.iter().map(Held::messages).sum::<u64>() >= batching.max_messages as u64;
        // Every line the batch logs (retries, rejections, isolation) carries which batch.
        batches += 1;
        let span = tracing::info_span!("batch", seq = batches, updates = batch.len());
        write_batch(&store, batch, &out, batching.retry_max)
            .instrument(span)
            .await;
    }
}

/// Where a batch's outcomes go: settled tokens, kept rejects, counters.
struct Outcomes<'a> {
    settled: &'a Settled,
    rejects: Option<&'a RejectSink>,
    stats: &'a Stats,
}

impl Outcomes<'_> {
    /// Counts, logs and keeps the messages of an update the writer rejected; their tokens go
    /// to `tokens` (final: they are acknowledged).
    fn reject(&self, held: Held, rejection: Rejection, tokens: &mut Vec<AckToken>) {
        for _ in 0..held.messages() {
            self.stats.rejected(&rejection);
        }
        let job = &held.job;
        if let Some(left_out) = self
            .stats
            .warnings()
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
                messages = held.messages(),
                similar_left_out = left_out,
                "message rejected{hint}"
            );
            if rejection == Rejection::UnknownDevice && self.stats.warnings().codehubot_wording() {
                // The Python service's words, which its README has operators grep for.
                warn!(device = %job.update.device, "⚠️ 设备不存在: {}", job.update.device);
            }
        }
        let messages = held.messages();
        let Held {
            job, folded_acks, ..
        } = held;
        if let (Some(sink), Some(evidence)) = (self.rejects, job.evidence) {
            sink.record(
                *evidence,
                Some(job.update.device.as_str()),
                &rejection,
                job.update.received_at,
                messages,
            );
        }
        tokens.extend(job.ack);
        tokens.extend(folded_acks);
    }
}

/// Writes one batch, retrying until it commits; isolates updates the database refuses.
async fn write_batch(store: &Store, batch: Vec<Held>, out: &Outcomes<'_>, retry_max: Duration) {
    let stats = out.stats;
    let mut backoff = Backoff::new(RETRY_FIRST, retry_max);
    loop {
        let updates: Vec<_> = batch.iter().map(|h| &h.job.update).collect();
        let started = Instant::now();
        match store.apply(&updates).await {
            Ok(outcome) => {
                stats.flush_took(started.elapsed());
                stats.batch_committed(outcome.rows_written as u64);
                finish(batch, outcome.applied, out);
                return;
            }
            // The policy's word on the error: wait and retry, or (refused data) never.
            Err(e) => match (e.retry_after(&mut backoff), &e) {
                (Some(delay), StoreError::Conflict(cause)) => {
                    // Another writer held the locks; the database rolled this batch back.
                    // Nothing is wrong with the database: try again after a moment. Counted
                    // apart from errors: on a Galera cluster they are the normal cost of two
                    // instances writing one device through different nodes.
                    stats.db_conflict();
                    debug!(error = %cause, messages = batch.len(), "transaction conflict; retrying the batch");
                    tokio::time::sleep(delay).await;
                }
                (Some(delay), _) => {
                    stats.db_error();
                    error!(
                        error = %e,
                        messages = batch.len(),
                        retry_in_secs = crate::ops::telemetry::secs(delay),
                        "database write failed; the messages wait, unacknowledged"
                    );
                    tokio::time::sleep(delay).await;
                }
                // Refused for the data in it: isolate the message that is refused.
                (None, StoreError::Refused(cause)) if batch.len() == 1 => {
                    let mut tokens = Vec::new();
                    for held in batch {
                        out.reject(held, Rejection::DbRefused(cause.to_string()), &mut tokens);
                    }
                    out.settled.report(tokens);
                    return;
                }
                (
                    None,
                    StoreError::Refused(cause)
                    | StoreError::Conflict(cause)
                    | StoreError::Unavailable(cause),
                ) => {
                    warn!(error = %cause, messages = batch.len(), "the database refused a batch; writing its messages one by one");
                    for held in batch {
                        Box::pin(write_batch(store, vec![held], out, retry_max)).await;
                    }
                    return;
                }
            },
        }
    }
}

fn finish(batch: Vec<Held>, outcomes: Vec<Applied>, out: &Outcomes<'_>) {
    let mut written = 0;
    let mut tokens = Vec::with_capacity(batch.len());
    for (held, outcome) in batch.into_iter().zip(outcomes) {
        match outcome {
            Applied::Written => {
                written += held.messages();
                held.tokens_into(&mut tokens);
            }
            Applied::UnknownDevice => out.reject(held, Rejection::UnknownDevice, &mut tokens),
        }
    }
    out.stats.succeeded(written);
    // One report for the batch: the event loop acknowledges them in order of receipt.
    out.settled.report(tokens);
}
