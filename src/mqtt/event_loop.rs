//! The event-loop task: polls the broker, (re)connects with backoff, (re)subscribes, reads what a
//! CONNACK says, hands each publish to the intake, and owns the acknowledgements: the writers'
//! settled tokens come back here, and the ack ledger ([`super::acks`]) releases them in order.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use super::Fatal;
use super::acks::Ledger;
use super::client::{ConnAck, Filter, Link, Polled, subscription};
use super::intake::{Intake, handle_publish};
use super::outbox::Outbox;
use crate::backoff::Backoff;
use crate::config::MqttSettings;
use crate::intake::model::TopicKind;
use crate::intake::payload::Rules;
use crate::ops::stats::Stats;
use crate::work::RejectSink;
use crate::work::{InFlight, SettledReceiver};
use crate::writer::Router;

/// How long a connection must stay up and subscribed before the reconnect backoff starts over:
/// a broker that drops us right after connecting or subscribing (it refuses a feature, or
/// disconnects a client it finds at fault) meets a growing wait, not a reconnect every
/// `MQTT_RECONNECT_MIN_SECS`.
const STABLE_AFTER: Duration = Duration::from_secs(30);

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
    // Brokers of MQTT_BROKER tried since the last wait (reset by a connection that lasted).
    let mut tried_in_round = 0;
    let mut first_connection = true;
    // Since when the current connection is subscribed (whether it got its CONNACK is
    // `outbox.connected`).
    let mut subscribed_at: Option<Instant> = None;
    let mut settled_open = true;
    // Which connection a message's lines belong to (counted from 1 at each CONNACK).
    let mut connections: u64 = 0;
    let mut span = tracing::Span::none();
    info!(
        broker = %connection.broker(),
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
                stats.connection_to(&connection.broker().to_string(), connack.session_present);
                outbox.connected = true;
                subscribed_at = None;
                info!(
                    broker = %connection.broker(),
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
                    tried_in_round = 0;
                }
                // With several brokers (the nodes of a cluster), the next one is tried at once,
                // until each has been tried in this round; the wait (growing) comes between
                // rounds. While this instance is away, a clustered broker may go on choosing
                // its share of a shared subscription and deliver it to no one, so the seconds
                // it takes to be subscribed on another node are lost messages.
                let failed = connection.broker().clone();
                connection.next_broker();
                tried_in_round += 1;
                let delay = if tried_in_round < connection.brokers() {
                    Duration::ZERO
                } else {
                    tried_in_round = 0;
                    backoff.next_delay()
                };
                if was_connected && !stable {
                    warn!(
                        broker = %failed,
                        error = %e,
                        subscribed = up.is_some(),
                        subscribed_secs = up.map(crate::ops::telemetry::secs),
                        retry_in_secs = crate::ops::telemetry::secs(delay),
                        "the broker closed the connection soon after it was made; the wait before each retry grows until a connection lasts {}s",
                        STABLE_AFTER.as_secs()
                    );
                } else {
                    warn!(
                        broker = %failed,
                        error = %e,
                        next = %connection.broker(),
                        retry_in_secs = crate::ops::telemetry::secs(delay),
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
