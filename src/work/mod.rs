//! The unit of work that travels from the broker side to the writers and back: a [`Job`] (a
//! validated update, the [`AckToken`] of the message it came in, and the evidence kept for a
//! rejection), and the tokens that the writers hand back once their messages are settled
//! ([`Settled`]). Both sides import this module and nothing of each other: the writers never see
//! the MQTT client, and the event loop never sees a queue's insides.
//!
//! The event-loop task owns the acknowledgements (see `mqtt::acks`): a writer reports that a
//! message's outcome is final (committed, or rejected for good), and the event loop sends the
//! PUBACK/PUBREC when every earlier message of the same connection is settled as well, so acks
//! leave in the order the messages arrived, whatever order the writers finish in.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::sync::mpsc;

use crate::intake::model::Update;

mod rejects;

pub use rejects::{Evidence, RejectSink, channel as reject_channel};

/// Names a received QoS 1/2 message for its acknowledgement: the connection it arrived on and
/// its place in that connection's order of receipt. 8 bytes, so that folded messages (which
/// keep only their token) cost little: both numbers wrap around (see `mqtt::acks`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AckToken {
    /// Which connection (generation) it arrived on: a new connection starts a new one.
    pub(crate) connection: u32,
    /// Its number in the order of receipt, counted over all connections, modulo 2^32.
    pub(crate) seq: u32,
}

/// A validated update on its way to a writer.
#[derive(Debug)]
pub struct Job {
    /// What to write.
    pub update: Update,
    /// What to acknowledge once the outcome is final; `None` for QoS 0.
    pub ack: Option<AckToken>,
    /// Topic and payload start, kept only when rejects are kept (the writer may still reject
    /// the message: unknown device). Boxed: by default there is none, and a job may wait in a
    /// queue of thousands.
    pub evidence: Option<Box<Evidence>>,
}

/// The writers' side of the way back: each call hands over the tokens of messages whose
/// outcome is final. Unbounded, so that a writer never waits on the event loop (which may be
/// waiting on the writer's queue); what it holds is bounded by the messages taken in.
#[derive(Debug, Clone)]
pub struct Settled(mpsc::UnboundedSender<Vec<AckToken>>);

impl Settled {
    /// Reports `tokens` settled. After the event loop has stopped there is nobody left to
    /// acknowledge: the broker redelivers those messages (the writes are idempotent).
    pub fn report(&self, tokens: Vec<AckToken>) {
        if !tokens.is_empty() {
            let _ = self.0.send(tokens);
        }
    }
}

/// The event loop's side of the way back. It ends once every [`Settled`] is dropped, that is
/// once every writer has finished.
#[derive(Debug)]
pub struct SettledReceiver(mpsc::UnboundedReceiver<Vec<AckToken>>);

impl SettledReceiver {
    /// The next tokens; `None` once every writer has finished and all was received. Cancel
    /// safe (tokio's `recv`), so the event loop can wait on it beside the broker.
    pub async fn recv(&mut self) -> Option<Vec<AckToken>> {
        self.0.recv().await
    }
}

/// The way back from the writers to the event loop.
pub fn settled_channel() -> (Settled, SettledReceiver) {
    let (tx, rx) = mpsc::unbounded_channel();
    (Settled(tx), SettledReceiver(rx))
}

/// How many messages the broker has handed us that we have not acknowledged yet, and the most
/// it has ever handed us at once on this connection (its inflight window, as far as we have
/// seen it). A writer uses it to skip its batch wait when nothing more can come: the broker
/// sends no more until we acknowledge some.
#[derive(Debug, Default)]
pub struct InFlight {
    unacked: AtomicUsize,
    window: AtomicUsize,
}

impl InFlight {
    /// A gauge shared by the event loop (which sets it) and the writers (which read it).
    pub fn new() -> Arc<Self> {
        Arc::default()
    }

    /// The event loop's count of messages received and not acknowledged, after each change.
    pub(crate) fn set_unacked(&self, n: usize) {
        self.unacked.store(n, Ordering::Relaxed);
        if n > self.window.load(Ordering::Relaxed) {
            self.window.store(n, Ordering::Relaxed);
        }
    }

    /// A new connection: the window is learned again (the broker may have changed).
    pub(crate) fn reset(&self) {
        self.unacked.store(0, Ordering::Relaxed);
        self.window.store(0, Ordering::Relaxed);
    }

    /// Whether every message the broker lets us have is already here, unacknowledged: waiting
    /// for more before writing would wait for nothing. A broker that keeps one message in
    /// flight (ejabberd) is always full; one with a window of 1,000 is full during a burst.
    pub fn window_full(&self) -> bool {
        let unacked = self.unacked.load(Ordering::Relaxed);
        unacked > 0 && unacked >= self.window.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_window_is_the_most_seen_and_full_when_reached_again() {
        let f = InFlight::new();
        assert!(
            !f.window_full(),
            "nothing in flight: nothing to wait for either"
        );
        f.set_unacked(1);
        assert!(f.window_full(), "one message and no more seen yet");
        f.set_unacked(20);
        f.set_unacked(5);
        assert!(!f.window_full(), "the broker may send 15 more");
        f.set_unacked(20);
        assert!(f.window_full());
        f.reset();
        assert!(!f.window_full());
        f.set_unacked(3);
        assert!(f.window_full(), "learned again on a new connection");
    }

    #[tokio::test]
    async fn the_way_back_ends_when_every_writer_has_finished() {
        let (tx, mut rx) = settled_channel();
        let other = tx.clone();
        let t = AckToken {
            connection: 1,
            seq: 7,
        };
        tx.report(vec![t]);
        tx.report(Vec::new());
        drop(tx);
        other.report(vec![t, t]);
        drop(other);
        assert_eq!(rx.recv().await, Some(vec![t]));
        assert_eq!(
            rx.recv().await,
            Some(vec![t, t]),
            "empty reports are not sent"
        );
        assert_eq!(rx.recv().await, None);
    }
}
