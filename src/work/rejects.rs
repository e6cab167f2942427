//! The way to kept rejects (opt-in), as the broker side and the writers see it: the evidence a
//! job carries, and a sink that hands rejected messages to the reject writer (`store::rejects`
//! holds the table, the writer and the queries).
//!
//! Recording never waits: the event loop hands a record to a bounded queue and goes on; if the
//! queue is full (the database is slow), the record is dropped and counted. Rejects are for
//! diagnosis; they must not slow the ingest path down.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use chrono::{DateTime, FixedOffset};
use tokio::sync::mpsc;
use tracing::debug;

use crate::intake::rejection::Rejection;
use crate::store::rejects::{RejectRecord, fit_topic};

/// Records waiting to be written.
const QUEUE: usize = 1024;

/// What is kept of a message in case the writer rejects it later (unknown device).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Evidence {
    /// The topic it came on.
    pub topic: String,
    /// The start of its payload.
    pub payload: Vec<u8>,
    /// Its full payload size.
    pub payload_bytes: usize,
}

/// Hands rejected messages to the reject writer. Cheap to clone.
#[derive(Debug, Clone)]
pub struct RejectSink {
    tx: mpsc::Sender<RejectRecord>,
    max_payload: usize,
    dropped: Arc<AtomicU64>,
}

impl RejectSink {
    /// What to keep of a message that may still be rejected by the writer.
    pub fn evidence(&self, topic: &str, payload: &[u8]) -> Evidence {
        Evidence {
            topic: fit_topic(topic).to_owned(),
            payload: payload[..payload.len().min(self.max_payload)].to_vec(),
            payload_bytes: payload.len(),
        }
    }

    /// Records a rejection (never waits; drops and counts when the queue is full). `messages`:
    /// how many messages it stands for (folded into one update, all rejected with it; the
    /// evidence is the first one's).
    pub fn record(
        &self,
        evidence: Evidence,
        device: Option<&str>,
        rejection: &Rejection,
        received_at: DateTime<FixedOffset>,
        messages: u64,
    ) {
        let record = RejectRecord::new(
            evidence.topic,
            evidence.payload,
            evidence.payload_bytes,
            device,
            rejection,
            received_at,
            messages,
        );
        if self.tx.try_send(record).is_err() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
            debug!("reject queue full: record not kept");
        }
    }

    /// Records that could not be kept because the queue was full.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// The count of [`RejectSink::dropped`], readable after every sink is gone (holding a sink
    /// would keep the reject writer waiting for more).
    pub fn dropped_counter(&self) -> Arc<AtomicU64> {
        self.dropped.clone()
    }
}

/// A sink keeping `max_payload` bytes of each payload, and the queue its writer drains.
pub fn channel(max_payload: usize) -> (RejectSink, mpsc::Receiver<RejectRecord>) {
    let (tx, rx) = mpsc::channel(QUEUE);
    let sink = RejectSink {
        tx,
        max_payload,
        dropped: Arc::new(AtomicU64::new(0)),
    };
    (sink, rx)
}

#[cfg(test)]
mod tests {
    use chrono::Utc;

    use super::*;

    #[test]
    fn evidence_is_bounded() {
        let (sink, _rx) = channel(4);
        let e = sink.evidence(&"t".repeat(1000), b"0123456789");
        // The column is `VARCHAR(255)`.
        assert_eq!(e.topic.len(), 255);
        assert_eq!(e.payload, b"0123");
        assert_eq!(e.payload_bytes, 10);
    }

    #[test]
    fn a_full_queue_drops_and_counts() {
        let (sink, _rx) = channel(8);
        for _ in 0..QUEUE + 5 {
            sink.record(
                sink.evidence("t", b"x"),
                None,
                &Rejection::NotObject,
                Utc::now().fixed_offset(),
                1,
            );
        }
        assert_eq!(sink.dropped(), 5);
    }
}
