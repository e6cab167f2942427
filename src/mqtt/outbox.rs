//! The event-loop task's own state, shared by the loop and the intake: the only owner of the
//! client, the ack ledger and what waits for room in the client's request channel.

use std::sync::Arc;

use tracing::warn;

use super::acks::{self, Ledger};
use super::client::{Client, Delivery, Filter};
use crate::work::{AckToken, InFlight};

/// The event-loop task's own state: the only owner of the client, the ack ledger and what
/// waits for room in the client's request channel.
pub(super) struct Outbox {
    pub(super) client: Client,
    pub(super) acks: Ledger,
    /// The subscriptions for the newest connection, until the channel takes them.
    pub(super) subscribe: Option<Vec<Filter>>,
    /// Every writer has finished and shutdown asked to disconnect: sent once every releasable
    /// ack is in the channel, never before (the broker would redeliver what was written but not
    /// acknowledged) and never lost (the loop waits for it to go out).
    pub(super) disconnect: bool,
    pub(super) in_flight: Arc<InFlight>,
    /// Whether the current connection got its CONNACK. Between a lost connection and the next
    /// CONNACK nothing is sent: rumqttc would send it on the next connection, where an ack for
    /// an old packet id is out of order (the next CONNACK drops what the ledger keeps).
    pub(super) connected: bool,
}

impl Outbox {
    /// Sends what may go out, in order, while the client's channel takes it: the subscriptions,
    /// the acks whose earlier messages are all settled, then a disconnect that was asked for.
    /// What does not fit goes on a later turn (the loop calls this after every poll).
    pub(super) fn flush(&mut self) {
        if !self.connected {
            return;
        }
        if let Some(filters) = &self.subscribe
            && self.client.try_subscribe(filters).is_ok()
        {
            self.subscribe = None;
        }
        while let Some(delivery) = self.acks.next() {
            if self.client.try_ack(&delivery).is_err() {
                // Full (sent on a later turn) or closed (shutting down: the broker keeps the
                // message and redelivers it).
                break;
            }
            self.acks.sent();
        }
        self.in_flight.set_unacked(self.acks.unacked());
        if self.disconnect
            && self.acks.next().is_none()
            && self.subscribe.is_none()
            && self.client.try_disconnect().is_ok()
        {
            self.disconnect = false;
        }
    }

    pub(super) fn settle(&mut self, tokens: Vec<AckToken>) {
        for t in tokens {
            self.acks.settle(t);
        }
        self.flush();
    }

    /// Takes a QoS 1/2 message in: its token, in the connection's order of receipt.
    pub(super) fn receive(&mut self, delivery: Delivery) -> AckToken {
        let (token, forgotten) = self.acks.receive(delivery);
        self.in_flight.set_unacked(self.acks.unacked());
        if forgotten > 0 {
            warn!(
                kept = acks::KEPT_MAX,
                "acknowledgements dropped: the broker sent far more than its inflight window; it redelivers those messages after the next reconnect"
            );
        }
        token
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn delivery(pkid: u16) -> Delivery {
        Delivery {
            v5: false,
            exactly_once: false,
            pkid,
        }
    }

    fn outbox(room: usize) -> (Outbox, flume::Receiver<rumqttc::Request>) {
        let (tx, rx) = flume::bounded(room);
        let outbox = Outbox {
            client: Client::V4(rumqttc::AsyncClient::from_senders(tx)),
            acks: Ledger::new(),
            subscribe: None,
            disconnect: false,
            in_flight: InFlight::new(),
            connected: true,
        };
        (outbox, rx)
    }

    fn sent(rx: &flume::Receiver<rumqttc::Request>) -> Vec<String> {
        rx.drain()
            .map(|r| match r {
                rumqttc::Request::PubAck(a) => a.pkid.to_string(),
                rumqttc::Request::PubRec(a) => format!("rec{}", a.pkid),
                rumqttc::Request::Disconnect(_) => "disconnect".to_string(),
                rumqttc::Request::Subscribe(s) => format!("sub {}", s.filters[0].path),
                other => format!("{other:?}"),
            })
            .collect()
    }

    #[test]
    fn acks_leave_in_order_of_receipt_and_wait_for_room() {
        let (mut o, rx) = outbox(2);
        let tokens: Vec<_> = (1..=5).map(|p| o.receive(delivery(p))).collect();
        assert!(o.in_flight.window_full());
        // Settled out of order: 2 and 3 wait for 1.
        o.settle(vec![tokens[2], tokens[1]]);
        assert!(sent(&rx).is_empty());
        o.settle(vec![tokens[0], tokens[4], tokens[3]]);
        assert_eq!(sent(&rx), ["1", "2"], "the channel holds two");
        o.flush();
        assert_eq!(sent(&rx), ["3", "4"]);
        o.flush();
        assert_eq!(sent(&rx), ["5"]);
        assert!(!o.in_flight.window_full(), "nothing unacknowledged");
    }

    #[test]
    fn qos2_gets_a_pubrec_in_the_same_order() {
        let (mut o, rx) = outbox(10);
        let a = o.receive(delivery(1));
        let b = o.receive(Delivery {
            v5: false,
            exactly_once: true,
            pkid: 2,
        });
        o.settle(vec![b]);
        o.settle(vec![a]);
        assert_eq!(sent(&rx), ["1", "rec2"]);
    }

    #[test]
    fn nothing_goes_out_between_a_lost_connection_and_the_next_connack() {
        let (mut o, rx) = outbox(10);
        let t = o.receive(delivery(1));
        o.connected = false;
        o.settle(vec![t]);
        assert!(sent(&rx).is_empty(), "it would reach the next connection");
        o.acks.new_connection();
        o.connected = true;
        o.flush();
        assert!(sent(&rx).is_empty(), "the old connection's ack is dropped");
    }

    #[test]
    fn a_new_connection_drops_the_old_acks() {
        let (mut o, rx) = outbox(10);
        let old = o.receive(delivery(1));
        o.acks.new_connection();
        let new = o.receive(delivery(1));
        o.settle(vec![old]);
        assert!(sent(&rx).is_empty());
        o.settle(vec![new]);
        assert_eq!(sent(&rx), ["1"]);
    }

    #[test]
    fn a_disconnect_waits_for_releasable_acks_and_is_not_lost_to_a_full_channel() {
        let (mut o, rx) = outbox(2);
        let tokens: Vec<_> = (1..=6).map(|p| o.receive(delivery(p))).collect();
        // 6 is never settled (its writer stopped first): the disconnect does not wait for it.
        o.settle(tokens[..5].to_vec());
        o.disconnect = true;
        o.flush();
        let mut out = Vec::new();
        for _ in 0..5 {
            out.extend(sent(&rx));
            o.flush();
        }
        assert_eq!(out, ["1", "2", "3", "4", "5", "disconnect"]);
    }

    #[test]
    fn a_subscription_goes_first_and_is_not_lost_to_a_full_channel() {
        let (mut o, rx) = outbox(1);
        let t = o.receive(delivery(1));
        o.subscribe = Some(vec![Filter {
            path: "devices/+/data".into(),
            qos: 1,
        }]);
        o.settle(vec![t]);
        assert_eq!(sent(&rx), ["sub devices/+/data"]);
        o.flush();
        assert_eq!(sent(&rx), ["1"]);
    }
}
