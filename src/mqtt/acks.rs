//! The order acknowledgements leave in. MQTT 3.1.1 and 5 say a receiver MUST send its PUBACKs
//! (and QoS 2's PUBRECs) in the order the PUBLISHes arrived [MQTT-4.6.0-2]. Messages settle out
//! of that order: two writers commit independently, a folded message settles with the one it
//! folded into, a rejected one settles at once. Mosquitto does not mind; rumqttd disconnects a
//! client that acknowledges out of order and redelivers, forever.
//!
//! [`Ledger`] keeps every QoS 1/2 message of the current connection from receipt until its ack
//! goes out: an ack is released only when every earlier message of the connection is settled
//! too. Pure: the event loop feeds it and sends what it releases.

use std::collections::VecDeque;

use super::Delivery;
use crate::work::AckToken;

/// Messages kept at most: 4 MiB of 4-byte slots. A broker that keeps to its inflight window
/// never has more than that window (at most 65,535) unacknowledged; Mosquitto before 2.0.13
/// does not keep to it while it drains a backlog. Past this the oldest are forgotten: their
/// acks are not sent and the broker redelivers them after the next reconnect.
pub(super) const KEPT_MAX: usize = 1 << 20;

/// One received message: what its ack needs, and whether its outcome is final, in 4 bytes
/// rather than a [`Delivery`] and a flag's 6 (a drain from a broker that overruns its window
/// keeps a hundred thousand of them).
#[derive(Debug, Clone, Copy)]
struct Slot {
    pkid: u16,
    /// [`Slot::V5`], [`Slot::EXACTLY_ONCE`], [`Slot::SETTLED`].
    flags: u8,
}

impl Slot {
    const V5: u8 = 1;
    const EXACTLY_ONCE: u8 = 2;
    const SETTLED: u8 = 4;

    fn new(d: Delivery) -> Self {
        let flag = |on: bool, bit: u8| if on { bit } else { 0 };
        Self {
            pkid: d.pkid,
            flags: flag(d.v5, Self::V5) | flag(d.exactly_once, Self::EXACTLY_ONCE),
        }
    }

    fn delivery(self) -> Delivery {
        Delivery {
            v5: self.flags & Self::V5 != 0,
            exactly_once: self.flags & Self::EXACTLY_ONCE != 0,
            pkid: self.pkid,
        }
    }

    fn settled(self) -> bool {
        self.flags & Self::SETTLED != 0
    }
}

/// The messages of the current connection in order of receipt, from the oldest not yet
/// acknowledged.
///
/// Message numbers are counted modulo 2^32 (a token is 8 bytes, and a folded message keeps
/// only its token): a token's place is its distance from `front`, wrapping, and a token of a
/// message already acknowledged or forgotten is behind `front`, so its distance wraps to far
/// more than the [`KEPT_MAX`] kept. That holds while no token outlives 2^32 − 2^20 later
/// messages; a token lives only as long as its message waits in a bounded writer's queue.
#[derive(Debug)]
pub(super) struct Ledger {
    connection: u32,
    /// The number of `slots[0]`.
    front: u32,
    slots: VecDeque<Slot>,
    max: usize,
}

impl Ledger {
    pub(super) fn new() -> Self {
        Self::with_max(KEPT_MAX)
    }

    fn with_max(max: usize) -> Self {
        Self {
            connection: 0,
            front: 0,
            slots: VecDeque::new(),
            max,
        }
    }

    /// A new connection: the acks still kept are dropped (their packet ids may now name other
    /// messages; the broker redelivers those messages anyway, and the writes are idempotent).
    pub(super) fn new_connection(&mut self) {
        self.connection = self.connection.wrapping_add(1);
        self.advance(self.slots.len());
        self.slots.clear();
    }

    /// Takes a message in, in order of receipt; its token comes back through [`Ledger::settle`].
    /// Returns how many old ones were forgotten to make room (0 but for a broker that overruns
    /// its window by a million).
    pub(super) fn receive(&mut self, delivery: Delivery) -> (AckToken, u64) {
        let token = AckToken {
            connection: self.connection,
            seq: self.front.wrapping_add(self.slots.len() as u32),
        };
        self.slots.push_back(Slot::new(delivery));
        let mut forgotten = 0;
        while self.slots.len() > self.max {
            self.slots.pop_front();
            self.advance(1);
            forgotten += 1;
        }
        (token, forgotten)
    }

    /// Marks a message settled. Tokens of an earlier connection, or of a message forgotten or
    /// already acknowledged, change nothing.
    pub(super) fn settle(&mut self, token: AckToken) {
        if token.connection != self.connection {
            return;
        }
        let place = token.seq.wrapping_sub(self.front) as usize;
        if let Some(slot) = self.slots.get_mut(place) {
            slot.flags |= Slot::SETTLED;
        }
    }

    /// `n` messages left the front.
    fn advance(&mut self, n: usize) {
        // Counted modulo 2^32 on purpose (see the type's comment).
        self.front = self.front.wrapping_add(n as u32);
    }

    /// The next ack that may go out: the oldest message, when it is settled.
    pub(super) fn next(&self) -> Option<Delivery> {
        self.slots
            .front()
            .filter(|s| s.settled())
            .map(|s| s.delivery())
    }

    /// The ack [`Ledger::next`] gave went out.
    pub(super) fn sent(&mut self) {
        if self.slots.pop_front().is_some() {
            self.advance(1);
        }
    }

    /// Messages received and not acknowledged yet.
    pub(super) fn unacked(&self) -> usize {
        self.slots.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn d(pkid: u16) -> Delivery {
        Delivery {
            v5: false,
            exactly_once: false,
            pkid,
        }
    }

    /// Sends everything releasable and returns the packet ids in the order they went.
    fn drain(l: &mut Ledger) -> Vec<u16> {
        let mut out = Vec::new();
        while let Some(x) = l.next() {
            out.push(x.pkid);
            l.sent();
        }
        out
    }

    #[test]
    fn an_ack_goes_out_for_the_protocol_and_qos_its_message_came_with() {
        let mut l = Ledger::new();
        let all: Vec<Delivery> = [(false, false), (true, false), (false, true), (true, true)]
            .into_iter()
            .zip([1, 65535, 2, 40000])
            .map(|((v5, exactly_once), pkid)| Delivery {
                v5,
                exactly_once,
                pkid,
            })
            .collect();
        for t in all.iter().map(|d| l.receive(*d).0).collect::<Vec<_>>() {
            l.settle(t);
        }
        let mut out = Vec::new();
        while let Some(d) = l.next() {
            out.push(d);
            l.sent();
        }
        assert_eq!(out, all);
    }

    #[test]
    fn an_ack_waits_for_every_earlier_message() {
        let mut l = Ledger::new();
        let (a, _) = l.receive(d(1));
        let (b, _) = l.receive(d(2));
        let (c, _) = l.receive(d(3));
        // A rejection (settled at once) behind a message still being written.
        l.settle(b);
        assert_eq!(drain(&mut l), Vec::<u16>::new());
        l.settle(c);
        assert_eq!(drain(&mut l), Vec::<u16>::new());
        l.settle(a);
        assert_eq!(drain(&mut l), [1, 2, 3]);
        assert_eq!(l.unacked(), 0);
    }

    #[test]
    fn numbers_wrap_around_and_an_acknowledged_token_stays_settled() {
        let mut l = Ledger::new();
        l.front = u32::MAX - 1;
        let tokens: Vec<AckToken> = (1..=4).map(|p| l.receive(d(p)).0).collect();
        assert_eq!(
            tokens.iter().map(|t| t.seq).collect::<Vec<_>>(),
            [u32::MAX - 1, u32::MAX, 0, 1]
        );
        l.settle(tokens[2]);
        l.settle(tokens[0]);
        assert_eq!(drain(&mut l), [1]);
        l.settle(tokens[1]);
        assert_eq!(drain(&mut l), [2, 3]);
        // Behind the front now: settling them again must not settle the next message.
        let (e, _) = l.receive(d(5));
        for t in &tokens[..3] {
            l.settle(*t);
        }
        assert_eq!(drain(&mut l), Vec::<u16>::new(), "4 is still being written");
        l.settle(tokens[3]);
        l.settle(e);
        assert_eq!(drain(&mut l), [4, 5]);
        assert_eq!(l.unacked(), 0);
    }

    #[test]
    fn a_new_connection_drops_what_the_old_one_kept() {
        let mut l = Ledger::new();
        let (a, _) = l.receive(d(1));
        let (b, _) = l.receive(d(2));
        l.settle(b);
        l.new_connection();
        assert_eq!(l.unacked(), 0);
        let (c, _) = l.receive(d(1));
        l.settle(a);
        assert_eq!(
            drain(&mut l),
            Vec::<u16>::new(),
            "a token of the old connection settles nothing, even with the same packet id"
        );
        l.settle(c);
        assert_eq!(drain(&mut l), [1]);
    }

    #[test]
    fn past_the_limit_the_oldest_are_forgotten() {
        let mut l = Ledger::with_max(2);
        let (a, _) = l.receive(d(1));
        let (b, _) = l.receive(d(2));
        let (c, forgotten) = l.receive(d(3));
        assert_eq!(forgotten, 1);
        l.settle(a);
        l.settle(c);
        assert_eq!(drain(&mut l), Vec::<u16>::new(), "2 is still being written");
        l.settle(b);
        assert_eq!(drain(&mut l), [2, 3]);
    }

    proptest! {
        /// Whatever order messages settle in, acks go out in the order of receipt, each once,
        /// and each only after it and all before it are settled.
        #[test]
        fn acks_leave_in_the_order_of_receipt(
            n in 1usize..60,
            order in proptest::collection::vec(any::<proptest::sample::Index>(), 0..120),
        ) {
            let mut l = Ledger::new();
            let tokens: Vec<_> = (0..n).map(|i| l.receive(d(i as u16 + 1)).0).collect();
            let mut settled = vec![false; n];
            let mut sent = Vec::new();
            for ix in order {
                let i = ix.index(n);
                l.settle(tokens[i]);
                settled[i] = true;
                sent.extend(drain(&mut l));
                let prefix = settled.iter().take_while(|s| **s).count();
                prop_assert_eq!(sent.len(), prefix);
            }
            for t in &tokens {
                l.settle(*t);
            }
            sent.extend(drain(&mut l));
            let expected: Vec<u16> = (1..=n as u16).collect();
            prop_assert_eq!(sent, expected);
        }
    }
}
