//! A writer's queue: parsed updates grouped by device in order of arrival, a device's later
//! data message or heartbeat folded into the one already waiting ([`crate::intake::merge::absorb`]),
//! bounded in updates, taken by whole devices.

use std::collections::{HashMap, VecDeque};
use std::sync::{Mutex, MutexGuard};

use tokio::sync::Notify;

use crate::intake::merge::absorb;
use crate::work::{AckToken, Job};

/// One parsed update waiting for its batch, and the messages folded into it.
#[derive(Debug)]
pub struct Held {
    pub(super) job: Job,
    /// Acknowledgements of the messages folded into `job` (QoS 0 ones have none).
    pub(super) folded_acks: Vec<AckToken>,
    /// How many messages were folded into `job`.
    folded: u64,
}

impl Held {
    pub(super) fn new(job: Job) -> Self {
        Self {
            job,
            folded_acks: Vec::new(),
            folded: 0,
        }
    }

    /// Messages this update stands for.
    pub(super) fn messages(&self) -> u64 {
        1 + self.folded
    }

    /// The tokens of this update's messages, its own and those folded into it.
    pub(super) fn tokens_into(self, out: &mut Vec<AckToken>) {
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
    pub(super) ready: Notify,
    /// Wakes the event loop: the writer took a batch, or the queue closed.
    room: Notify,
    /// Most parsed updates held (folded messages do not count).
    pub(super) capacity: usize,
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

/// Pushes `ack`, growing `acks` by half when full (from four) rather than doubling: thousands of
/// devices' folded acknowledgements wait at once, and doubling left up to half of each vector
/// empty (nine tokens in room for sixteen: 56 bytes a device).
fn push_grown_by_half(acks: &mut Vec<AckToken>, ack: AckToken) {
    if acks.len() == acks.capacity() {
        acks.reserve_exact(if acks.is_empty() {
            4
        } else {
            acks.len().div_ceil(2)
        });
    }
    acks.push(ack);
}

/// Most messages a queue holds per unit of capacity, folded ones included: each folded message
/// keeps an 8-byte acknowledgement.
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

    pub(super) async fn send(&self, mut job: Job, hash: u64) -> Result<(), Job> {
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
                    if let Some(ack) = ack {
                        push_grown_by_half(&mut last.folded_acks, ack);
                    }
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
            Some(i) => {
                let items = &mut state.entries[i].items;
                if items.len() == items.capacity() {
                    // Doubling from one: a Vec's own first growth is to four updates (700
                    // bytes), and without folding most devices wait with two or three.
                    items.reserve_exact(items.len());
                }
                items.push(Held::new(job));
            }
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
    pub(super) fn take(&self, max: usize) -> Vec<Held> {
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
    pub(super) fn close(&self) {
        self.lock().closed = true;
        self.room.notify_one();
        self.ready.notify_one();
    }

    /// Parsed updates waiting.
    pub(super) fn updates(&self) -> usize {
        self.lock().updates
    }
}

/// Closes the queue when the writer ends, however it ends, so the event loop never waits for
/// room that will not come.
pub(super) struct CloseOnDrop<'a>(pub(super) &'a Queue);

impl Drop for CloseOnDrop<'_> {
    fn drop(&mut self) {
        self.0.close();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::writer::router::folded_hash;

    use crate::intake::model::{Change, DataReport, DeviceUuid, StatusReport, Update};
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
        let change = Change::Status(StatusReport::of(&Default::default(), None));
        job(device, secs, change)
    }

    #[test]
    fn folded_acknowledgements_grow_by_half_and_keep_their_order() {
        let mut acks = Vec::new();
        let mut capacities = Vec::new();
        for seq in 0..20 {
            push_grown_by_half(&mut acks, AckToken { connection: 1, seq });
            if capacities.last() != Some(&acks.capacity()) {
                capacities.push(acks.capacity());
            }
        }
        assert_eq!(capacities, [4, 6, 9, 14, 21]);
        assert!(acks.iter().map(|t| t.seq).eq(0..20));
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
        assert_eq!(
            q.lock().entries[0].items.capacity(),
            2,
            "room for the two waiting, not for four"
        );
        assert_eq!(shape(&q.take(10)).len(), 2);
        let q = Queue::new(10, true);
        let evidence = |n: u8| crate::work::Evidence {
            topic: "devices/a/data".into(),
            payload: vec![n],
            payload_bytes: 1,
        };
        let mut first = data("a", 1);
        first.evidence = Some(Box::new(evidence(1)));
        let mut second = data("a", 2);
        second.evidence = Some(Box::new(evidence(2)));
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
            Some(Box::new(evidence(1))),
            "the first message's"
        );
    }
}
