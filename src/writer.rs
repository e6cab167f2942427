//! The writer: takes validated updates from its queue, writes them in batches (one
//! transaction each), and reports each message settled ([`Settled`]) only after its batch
//! committed; the event loop sends the acks.
//!
//! Each writer has a bounded queue of parsed updates, grouped by device in order of arrival. A
//! device's data message or heartbeat that arrives while an earlier one of the same kind still
//! waits is folded into it ([`crate::merge::absorb`], exact: the row ends the same) and costs
//! only its acknowledgement. So while the database is busy with one batch, the messages of the
//! devices in the next one fold together, and a backlog of many messages per device is written
//! as few rows per device.
//!
//! A database that is down or slow makes the writer retry with backoff while the messages wait;
//! the queue fills and the event loop stops taking more, so memory stays bounded. A message the
//! database refuses for its own data is isolated and rejected, so it cannot stall the rest.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, error, info, warn};

use crate::backoff::Backoff;
use crate::merge::absorb;
use crate::rejection::Rejection;
use crate::rejects::RejectSink;
use crate::sql::RETRY_FIRST;
use crate::stats::Stats;
use crate::store::{Applied, Store, StoreError};
use crate::work::{AckToken, InFlight, Job, Settled};

/// Hands each update to a writer chosen by its device, so that one device's messages stay in
/// order (one writer, one queue) and no two writers ever lock the same row. Device ids are
/// compared without ASCII case, as the database's usual collations do.
#[derive(Debug, Clone)]
pub struct Router {
    writers: Vec<Arc<Queue>>,
}

impl Router {
    /// A router over the writers' queues (at least one).
    pub fn new(writers: Vec<Arc<Queue>>) -> Self {
        assert!(!writers.is_empty(), "at least one writer");
        Self { writers }
    }

    /// Queues `job` for its device's writer; waits while that queue is full. Gives the job
    /// back if the writer has stopped taking messages (shutdown).
    pub async fn send(&self, job: Job) -> Result<(), Job> {
        let hash = folded_hash(job.update.device.as_str());
        let queue = &self.writers[writer_of(hash, self.writers.len())];
        queue.send(job, hash).await
    }

    /// Wakes every writer that waits for its batch to fill: nothing more is coming.
    pub fn wake(&self) {
        for q in &self.writers {
            q.ready.notify_one();
        }
    }

    /// A handle that measures how full the writers' queues are, for `/metrics`.
    pub fn depth_probe(&self) -> QueueDepth {
        QueueDepth {
            queues: self.writers.clone(),
        }
    }
}

/// Measures the writers' queues.
#[derive(Debug, Clone)]
pub struct QueueDepth {
    queues: Vec<Arc<Queue>>,
}

impl QueueDepth {
    /// Parsed updates waiting in all the queues together, and their total capacity.
    pub fn current(&self) -> (usize, usize) {
        self.queues.iter().fold((0, 0), |(depth, cap), q| {
            (depth + q.lock().updates, cap + q.capacity)
        })
    }
}

/// One parsed update waiting for its batch, and the messages folded into it.
#[derive(Debug)]
pub struct Held {
    job: Job,
    /// Acknowledgements of the messages folded into `job` (QoS 0 ones have none).
    folded_acks: Vec<AckToken>,
    /// How many messages were folded into `job`.
    folded: u64,
}

impl Held {
    fn new(job: Job) -> Self {
        Self {
            job,
            folded_acks: Vec::new(),
            folded: 0,
        }
    }

    /// Messages this update stands for.
    fn messages(&self) -> u64 {
        1 + self.folded
    }

    /// The tokens of this update's messages, its own and those folded into it.
    fn tokens_into(self, out: &mut Vec<AckToken>) {
        out.extend(self.job.ack);
        out.extend(self.folded_acks);
    }
}

/// The updates of one device (ids that differ only in case count as one) in order.
#[derive(Debug)]
struct Entry {
    hash: u64,
    items: Vec<Held>,
}

/// A writer's queue: devices in order of their oldest waiting message, each with its updates.
#[derive(Debug)]
pub struct Queue {
    state: Mutex<QueueState>,
    /// Wakes the writer: something was queued, or the queue closed.
    ready: Notify,
    /// Wakes the event loop: the writer took a batch, or the queue closed.
    room: Notify,
    /// Most parsed updates held (folded messages do not count).
    capacity: usize,
    /// Whether later messages may be folded into waiting updates (off while every reading must
    /// reach the history table).
    coalesce: bool,
}

#[derive(Debug, Default)]
struct QueueState {
    entries: VecDeque<Entry>,
    /// Sequence number of `entries[0]`; entry `n` is at `n - front`.
    front: u64,
    /// A device's entry, by [`folded_hash`] of its id. Two ids with the same hash share an
    /// entry: harmless, each keeps its own updates in order.
    index: HashMap<u64, u64>,
    /// Parsed updates held.
    updates: usize,
    /// Messages held, folded ones included.
    messages: usize,
    closed: bool,
}

/// What a queue did with a job.
enum Offer {
    /// Queued as an update of its own: the writer may be waiting for it.
    Queued,
    /// Folded into a waiting update: nothing for the writer to wake up for.
    Folded,
    Full(Job),
    Closed(Job),
}

/// Most messages a queue holds per unit of capacity, folded ones included: each folded message
/// keeps a 16-byte acknowledgement.
const MESSAGES_PER_SLOT: usize = 64;

impl Queue {
    /// A queue of at most `capacity` parsed updates.
    pub fn new(capacity: usize, coalesce: bool) -> Self {
        Self {
            state: Mutex::default(),
            ready: Notify::new(),
            room: Notify::new(),
            capacity: capacity.max(1),
            coalesce,
        }
    }

    fn lock(&self) -> MutexGuard<'_, QueueState> {
        // Held only to move updates in and out, never across an await.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    async fn send(&self, mut job: Job, hash: u64) -> Result<(), Job> {
        loop {
            match self.offer(job, hash) {
                Offer::Queued => {
                    self.ready.notify_one();
                    return Ok(());
                }
                Offer::Folded => return Ok(()),
                Offer::Closed(j) => return Err(j),
                Offer::Full(j) => {
                    job = j;
                    self.room.notified().await;
                }
            }
        }
    }

    fn offer(&self, job: Job, hash: u64) -> Offer {
        let mut q = self.lock();
        if q.closed {
            return Offer::Closed(job);
        }
        if q.messages >= self.capacity.saturating_mul(MESSAGES_PER_SLOT) {
            return Offer::Full(job);
        }
        let state = &mut *q;
        let slot = state
            .index
            .get(&hash)
            .map(|&seq| (seq - state.front) as usize);
        let Job {
            mut update,
            ack,
            evidence,
        } = job;
        // Kept rejects change nothing here: a folded message's evidence goes (the update keeps
        // its first message's, which is what a rejection of the device shows).
        if let Some(i) = slot
            && self.coalesce
            && let Some(last) = state.entries[i].items.last_mut()
        {
            match absorb(&mut last.job.update, update) {
                Ok(()) => {
                    last.folded += 1;
                    last.folded_acks.extend(ack);
                    state.messages += 1;
                    return Offer::Folded;
                }
                Err(back) => update = back,
            }
        }
        let job = Job {
            update,
            ack,
            evidence,
        };
        if state.updates >= self.capacity {
            return Offer::Full(job);
        }
        match slot {
            Some(i) => state.entries[i].items.push(Held::new(job)),
            None => {
                let seq = state.front + state.entries.len() as u64;
                state.index.insert(hash, seq);
                state.entries.push_back(Entry {
                    hash,
                    items: vec![Held::new(job)],
                });
            }
        }
        state.updates += 1;
        state.messages += 1;
        Offer::Queued
    }

    /// Takes devices from the front while their updates fit in `max` (at least one device).
    fn take(&self, max: usize) -> Vec<Held> {
        let mut q = self.lock();
        let mut batch = Vec::new();
        while let Some(entry) = q.entries.front() {
            if !batch.is_empty() && batch.len() + entry.items.len() > max {
                break;
            }
            let entry = q.entries.pop_front().expect("front exists");
            let seq = q.front;
            q.front += 1;
            if q.index.get(&entry.hash) == Some(&seq) {
                q.index.remove(&entry.hash);
            }
            q.updates -= entry.items.len();
            q.messages -= entry
                .items
                .iter()
                .map(|h| h.messages() as usize)
                .sum::<usize>();
            batch.extend(entry.items);
        }
        drop(q);
        self.room.notify_one();
        batch
    }

    /// Takes no more messages: the event loop gets them back and leaves them to the broker.
    fn close(&self) {
        self.lock().closed = true;
        self.room.notify_one();
        self.ready.notify_one();
    }

    /// Parsed updates waiting.
    fn updates(&self) -> usize {
        self.lock().updates
    }
}

/// Closes the queue when the writer ends, however it ends, so the event loop never waits for
/// room that will not come.
struct CloseOnDrop<'a>(&'a Queue);

impl Drop for CloseOnDrop<'_> {
    fn drop(&mut self) {
        self.0.close();
    }
}

/// FNV-1a over the ASCII-lower-cased id: picks the writer and keys the device's entry.
fn folded_hash(device: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in device.bytes() {
        h ^= u64::from(b.to_ascii_lowercase());
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// Which of `n` writers takes the device whose [`folded_hash`] is `hash`.
fn writer_of(hash: u64, n: usize) -> usize {
    (hash % n as u64) as usize
}

/// How the writer groups messages.
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
        // Wait for the batch to fill, unless nothing more can come: the broker sends no more
        // until some of what it sent is acknowledged (a broker that keeps one message in flight
        // would otherwise cost a whole wait per message).
        if !closing && !batching.max_wait.is_zero() {
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
            if rejection == Rejection::UnknownDevice && self.stats.codehubot_wording() {
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
                evidence,
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
            Err(StoreError::Refused(e)) if batch.len() == 1 => {
                let mut tokens = Vec::new();
                for held in batch {
                    out.reject(held, Rejection::DbRefused(e.to_string()), &mut tokens);
                }
                out.settled.report(tokens);
                return;
            }
            Err(StoreError::Refused(e)) => {
                warn!(error = %e, messages = batch.len(), "the database refused a batch; writing its messages one by one");
                for held in batch {
                    Box::pin(write_batch(store, vec![held], out, retry_max)).await;
                }
                return;
            }
            Err(e) => {
                stats.db_error();
                let delay = e.retry_after(&mut backoff).unwrap_or(retry_max);
                if let StoreError::Conflict(e) = &e {
                    // Another writer held the locks; the database rolled this batch back.
                    // Nothing is wrong with the database: try again after a moment.
                    debug!(error = %e, messages = batch.len(), "transaction conflict; retrying the batch");
                } else {
                    error!(
                        error = %e,
                        messages = batch.len(),
                        retry_in_secs = delay.as_secs_f32(),
                        "database write failed; the messages wait, unacknowledged"
                    );
                }
                tokio::time::sleep(delay).await;
            }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn shard(device: &str, n: usize) -> usize {
        writer_of(folded_hash(device), n)
    }

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

    use crate::model::{Change, DataReport, DeviceUuid, StatusReport, Update};
    use chrono::{TimeZone, Utc};

    fn job(device: &str, secs: i64, change: Change) -> Job {
        Job {
            update: Update {
                device: DeviceUuid::parse(device).unwrap(),
                received_at: Utc
                    .timestamp_opt(1_766_000_000 + secs, 0)
                    .unwrap()
                    .fixed_offset(),
                reading_time: None,
                change,
            },
            ack: None,
            evidence: None,
        }
    }

    fn data(device: &str, secs: i64) -> Job {
        job(device, secs, Change::Data(DataReport::default()))
    }

    fn status(device: &str, secs: i64) -> Job {
        let change = Change::Status(StatusReport {
            fields: Default::default(),
            device_status: None,
            online: true,
        });
        job(device, secs, change)
    }

    fn put(q: &Queue, j: Job) -> &'static str {
        let hash = folded_hash(j.update.device.as_str());
        match q.offer(j, hash) {
            Offer::Queued | Offer::Folded => "taken",
            Offer::Full(_) => "full",
            Offer::Closed(_) => "closed",
        }
    }

    /// (device, messages) of each update taken, in order.
    fn shape(batch: &[Held]) -> Vec<(String, u64)> {
        batch
            .iter()
            .map(|h| (h.job.update.device.to_string(), h.messages()))
            .collect()
    }

    #[test]
    fn a_device_s_waiting_messages_fold_and_keep_their_order() {
        let q = Queue::new(10, true);
        for j in [
            data("a", 1),
            data("b", 1),
            data("a", 2),
            status("a", 3),
            data("a", 4),
            data("A", 5),
            data("a", 6),
            data("b", 7),
        ] {
            assert_eq!(put(&q, j), "taken");
        }
        assert_eq!((q.updates(), q.lock().messages), (6, 8));
        let batch = q.take(100);
        assert_eq!(
            shape(&batch),
            [("a", 2), ("a", 1), ("a", 1), ("A", 1), ("a", 1), ("b", 2)]
                .map(|(d, n)| (d.to_owned(), n))
        );
        assert_eq!(batch[0].job.update.received_at.timestamp(), 1_766_000_002);
        assert_eq!((q.updates(), q.lock().messages), (0, 0));
    }

    #[test]
    fn capacity_counts_parsed_updates_and_a_batch_takes_whole_devices() {
        let q = Queue::new(3, true);
        for j in [data("a", 1), status("a", 2), data("b", 1)] {
            assert_eq!(put(&q, j), "taken");
        }
        assert_eq!(put(&q, data("c", 1)), "full", "a new update needs room");
        assert_eq!(put(&q, data("b", 2)), "taken", "a folded one does not");
        assert_eq!(put(&q, status("b", 3)), "full");
        // "a" has two updates: a batch of at most two takes it alone.
        assert_eq!(
            shape(&q.take(2)),
            [("a".to_owned(), 1), ("a".to_owned(), 1)]
        );
        // A device taken starts a new entry, behind those still waiting.
        assert_eq!(put(&q, data("a", 4)), "taken");
        assert_eq!(put(&q, data("a", 5)), "taken");
        assert_eq!(
            shape(&q.take(1)),
            [("b".to_owned(), 2)],
            "at least one device, even past the limit"
        );
        assert_eq!(shape(&q.take(10)), [("a".to_owned(), 2)]);
        q.close();
        assert_eq!(put(&q, data("a", 6)), "closed");
    }

    #[test]
    fn without_coalescing_nothing_folds_and_kept_evidence_changes_nothing() {
        let q = Queue::new(10, false);
        assert_eq!(put(&q, data("a", 1)), "taken");
        assert_eq!(put(&q, data("a", 2)), "taken");
        assert_eq!(shape(&q.take(10)).len(), 2);
        let q = Queue::new(10, true);
        let evidence = |n: u8| crate::rejects::Evidence {
            topic: "devices/a/data".into(),
            payload: vec![n],
            payload_bytes: 1,
        };
        let mut first = data("a", 1);
        first.evidence = Some(evidence(1));
        let mut second = data("a", 2);
        second.evidence = Some(evidence(2));
        assert_eq!(put(&q, first), "taken");
        assert_eq!(put(&q, second), "taken");
        let batch = q.take(10);
        assert_eq!(
            shape(&batch),
            [("a".to_owned(), 2)],
            "folded as without rejects"
        );
        assert_eq!(
            batch[0].job.evidence,
            Some(evidence(1)),
            "the first message's"
        );
    }
}
