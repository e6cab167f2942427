//! The event-loop task: polls the broker, (re)connects with backoff, (re)subscribes, reads what a
//! CONNACK says, hands each publish to the intake, and owns the acknowledgements: the writers'
//! settled tokens come back here, and the ack ledger ([`super::acks`]) releases them in order.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use super::acks::{self, Ledger};
use super::client::{Client, ConnAck, Delivery, Filter, Link, Polled, subscription};
use super::intake::{Intake, handle_publish};
use crate::backoff::Backoff;
use crate::config::MqttSettings;
use crate::model::TopicKind;
use crate::payload::Rules;
use crate::rejects::RejectSink;
use crate::stats::Stats;
use crate::work::{AckToken, InFlight, SettledReceiver};
use crate::writer::Router;

/// How long a connection must stay up and subscribed before the reconnect backoff starts over:
/// a broker that drops us right after connecting or subscribing (it refuses a feature, or
/// disconnects a client it finds at fault) meets a growing wait, not a reconnect every
/// `MQTT_RECONNECT_MIN_SECS`.
const STABLE_AFTER: Duration = Duration::from_secs(30);

/// Why the event loop stopped the service: the broker lacks something the settings ask for, or
/// a writer is gone; waiting will not bring either back.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Fatal(pub(super) String);

/// What the event loop is given to run.
pub struct EventLoopParts {
    pub settings: MqttSettings,
    pub rules: Rules,
    pub link: Link,
    /// Where validated updates go.
    pub jobs: Router,
    /// Tokens of settled messages, from the writers.
    pub settled: SettledReceiver,
    /// What the writers read to skip a batch wait when nothing more can come.
    pub in_flight: Arc<InFlight>,
    pub rejects: Option<RejectSink>,
    pub stats: Arc<Stats>,
    pub shutdown: CancellationToken,
}

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

/// Runs the event loop until the disconnect that shutdown asks for (or until `shutdown` fires
/// while there is no connection). Reconnects forever with backoff and re-subscribes after every
/// connection: rumqttc does neither on its own. Owns the acknowledgements: the writers report
/// settled messages, and their acks leave here in order of receipt. Fails only when the broker
/// lacks what the settings need ([`Fatal`]).
pub async fn run_event_loop(parts: EventLoopParts) -> Result<(), Fatal> {
    let EventLoopParts {
        settings,
        rules,
        link: Link {
            client,
            mut connection,
        },
        jobs,
        mut settled,
        in_flight,
        rejects,
        stats,
        shutdown,
    } = parts;
    let filters: Vec<Filter> = TopicKind::ALL
        .iter()
        .map(|k| Filter {
            path: subscription(&settings, *k),
            qos: settings.qos,
        })
        .collect();
    let mut outbox = Outbox {
        client,
        acks: Ledger::new(),
        subscribe: None,
        disconnect: false,
        in_flight,
        connected: false,
    };
    let mut backoff = Backoff::new(settings.reconnect_min, settings.reconnect_max);
    let mut first_connection = true;
    // Since when the current connection is subscribed (whether it got its CONNACK is
    // `outbox.connected`).
    let mut subscribed_at: Option<Instant> = None;
    let mut settled_open = true;
    // Which connection a message's lines belong to (counted from 1 at each CONNACK).
    let mut connections: u64 = 0;
    let mut span = tracing::Span::none();
    let address = format!("{}:{}", settings.broker, settings.port);
    info!(
        broker = %address,
        client_id = %settings.client_id,
        protocol = %settings.protocol,
        "connecting to the MQTT broker"
    );
    if settings.qos == 2 && !settings.clean_session {
        // rumqttc forgets a QoS 2 message's PUBREC state with the connection; a broker that
        // resends its PUBREL after a reconnect then gets the connection closed, again and again
        // (rumqtt issue 664).
        warn!(
            "MQTT_QOS=2 with a persistent session: a reconnect between a message's PUBREC and its PUBREL can make the client drop every following connection; MQTT_QOS=1 gives the same guarantee here (writes are idempotent)"
        );
    }
    loop {
        // The poll is never cancelled (rumqttc does not promise that it may be): settled
        // tokens are taken in while it waits, and the acks they release wake it up.
        let polled = {
            let connected = outbox.connected;
            let poll = connection.poll(connected);
            tokio::pin!(poll);
            loop {
                tokio::select! {
                    biased;
                    tokens = settled.recv(), if settled_open => {
                        match tokens {
                            Some(tokens) => outbox.settle(tokens),
                            None => {
                                // Every writer has finished: after shutdown, what was taken
                                // in is settled, so the disconnect may follow the last ack.
                                settled_open = false;
                                outbox.disconnect = connected;
                                outbox.flush();
                            }
                        }
                    }
                    r = &mut poll => break Some(r),
                    // Shutdown while connecting (or waiting to): nothing was taken in on this
                    // connection, so nothing waits for an ack. Stop at once.
                    _ = shutdown.cancelled(), if !connected => break None,
                }
            }
        };
        let Some(polled) = polled else {
            stats.disconnected();
            debug!("stopped while not connected");
            return Ok(());
        };
        // Every poll result, pings included, is a sign of life for the systemd watchdog.
        stats.loop_beat().beat();
        match polled {
            Ok(Polled::Publish(message)) => {
                let ctx = Intake {
                    settings: &settings,
                    rules: &rules,
                    jobs: &jobs,
                    rejects: rejects.as_ref(),
                    stats: &stats,
                    shutdown: &shutdown,
                    span: &span,
                };
                let was_full = outbox.in_flight.window_full();
                handle_publish(message, &ctx, &mut outbox).await?;
                if !was_full && outbox.in_flight.window_full() {
                    // Nothing more comes until some are acknowledged: writers waiting for a
                    // batch to fill would wait for nothing. Once, as it fills: a writer that
                    // starts waiting later checks the window itself.
                    jobs.wake();
                }
            }
            Ok(Polled::ConnAck(connack)) => {
                connections += 1;
                span = tracing::info_span!("connection", n = connections);
                outbox.acks.new_connection();
                outbox.in_flight.reset();
                stats.connected(first_connection);
                outbox.connected = true;
                subscribed_at = None;
                info!(
                    broker = %address,
                    session_present = connack.session_present,
                    "connected to the MQTT broker"
                );
                check_connack(&settings, &connack, first_connection, &stats)?;
                first_connection = false;
                outbox.subscribe = Some(filters.clone());
            }
            Ok(Polled::SubAck {
                refused: Some(refused),
            }) => {
                if refused.shared_unsupported && settings.shared_group.is_some() {
                    return Err(Fatal(format!(
                        "the broker does not support shared subscriptions ({}): unset MQTT_SHARED_GROUP, or use a broker that has them (see docs/brokers.md)",
                        refused.codes
                    )));
                }
                error!(
                    codes = %refused.codes,
                    "the broker refused a subscription (check its ACL for this user)"
                );
            }
            Ok(Polled::SubAck { refused: None }) => {
                stats.subscribed();
                subscribed_at = Some(Instant::now());
                for f in &filters {
                    info!(topic = %f.path, qos = f.qos, "subscribed");
                }
            }
            Ok(Polled::DisconnectSent) => {
                info!("disconnected from the MQTT broker");
                stats.disconnected();
                return Ok(());
            }
            Ok(Polled::Other) => {}
            Err(e) => {
                stats.disconnected();
                let was_connected = std::mem::replace(&mut outbox.connected, false);
                if shutdown.is_cancelled() {
                    debug!(error = %e, "connection closed while shutting down");
                    return Ok(());
                }
                let up = subscribed_at.take().map(|t| t.elapsed());
                let stable = up.is_some_and(|up| up >= STABLE_AFTER);
                if stable {
                    backoff.reset();
                }
                let delay = backoff.next_delay();
                if was_connected && !stable {
                    warn!(
                        broker = %address,
                        error = %e,
                        subscribed = up.is_some(),
                        subscribed_secs = up.map(|d| d.as_secs_f32()),
                        retry_in_secs = delay.as_secs_f32(),
                        "the broker closed the connection soon after it was made; the wait before each retry grows until a connection lasts {}s",
                        STABLE_AFTER.as_secs()
                    );
                } else {
                    warn!(
                        broker = %address,
                        error = %e,
                        retry_in_secs = delay.as_secs_f32(),
                        "MQTT connection failed; retrying"
                    );
                }
                stats.loop_beat().waiting();
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = shutdown.cancelled() => return Ok(()),
                }
                stats.loop_beat().beat();
            }
        }
        // Acks that did not fit in the client's channel go out as it empties.
        outbox.flush();
    }
}

/// Reads what a CONNACK says about the session and the broker's limits: a persistent session
/// the broker no longer had is a WARN and a counter; a broker without shared subscriptions
/// stops the service when `MQTT_SHARED_GROUP` asks for one.
fn check_connack(
    settings: &MqttSettings,
    connack: &ConnAck,
    first: bool,
    stats: &Stats,
) -> Result<(), Fatal> {
    if connack.shared_unavailable && settings.shared_group.is_some() {
        return Err(Fatal(
            "the broker says it has no shared subscriptions (MQTT 5 CONNACK), but MQTT_SHARED_GROUP is set: unset it, or use a broker that has them (see docs/brokers.md)".into(),
        ));
    }
    let persistent = !settings.clean_session;
    if persistent && !connack.session_present && !first {
        stats.session_lost();
        warn!(
            client_id = %settings.client_id,
            "the broker no longer had this client's session (session_present=false): messages it queued while we were away are lost. Likely causes: the broker restarted without persistence, its queue limit or session expiry was reached, or it keeps no sessions for this login. Prevent it with broker persistence, a session expiry and queue longer than the longest outage (Mosquitto: persistence true, persistent_client_expiration, max_queued_messages; see docs/brokers.md)"
        );
    }
    if let Some(granted) = connack.session_expiry
        && persistent
        && u64::from(granted) < settings.session_expiry.as_secs()
    {
        warn!(
            granted_secs = granted,
            asked_secs = settings.session_expiry.as_secs(),
            "the broker shortened the session expiry (MQTT_SESSION_EXPIRY_SECS): messages queue for a shorter outage"
        );
    }
    // rumqttc keeps to both limits for what it sends (acks, subscriptions, no publishes): only
    // worth a line when they are unusual.
    if let Some(max) = connack.max_packet_size {
        debug!(max_packet_size = max, "the broker's maximum packet size");
    }
    if let Some(max) = connack.receive_max {
        debug!(receive_maximum = max, "the broker's receive maximum");
    }
    Ok(())
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
