//! The broker side: connection options, the event loop, subscriptions and acknowledgements.
//!
//! The event-loop task only polls, validates (pure, fast) and hands updates to the writers'
//! queues; it never waits on SQL. It alone holds the client: QoS 1/2 messages are acknowledged
//! only after a writer reported them settled (committed, or rejected for good), and in the order
//! they arrived ([`acks`]), so a crash between receipt and commit makes the broker deliver them
//! again, and a strict broker sees its acks in order.
//!
//! Both protocol versions (`MQTT_PROTOCOL`) go through the same code here: [`v4`] (MQTT 3.1.1)
//! and [`v5`] (MQTT 5) only build their rumqttc client and turn what its event loop yields into
//! the common [`Polled`] events, so subscribing, acknowledging and the intake of a publish are
//! written once.

mod acks;
mod v4;
mod v5;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use chrono::Utc;
use rumqttc::{TlsConfiguration, Transport};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use self::acks::Ledger;

use crate::backoff::Backoff;
use crate::config::{ConfigError, MqttProtocol, MqttSettings};
use crate::model::TopicKind;
use crate::payload::{self, Rules};
use crate::rejects::RejectSink;
use crate::stats::Stats;
use crate::work::{AckToken, InFlight, Job, SettledReceiver};
use crate::writer::Router;

/// MQTT's own limit on a packet (256 MiB). The client accepts anything up to it so that an
/// oversized payload becomes a counted rejection, not a connection error that would make the
/// broker redeliver it forever (MQTT 3.1.1), nor a message the broker silently drops for being
/// over our announced maximum (MQTT 5); the service's own limit (`MQTT_MAX_PAYLOAD_BYTES`)
/// applies after.
const MQTT_MAX_PACKET: usize = 268_435_455;

/// Capacity of the client's request channel. Acks, subscriptions and the disconnect go through
/// it, always with `try_` sends: what does not fit waits in the ack ledger ([`acks`]; a few
/// bytes per message rather than rumqttc's request enum, which made a 65,535-deep channel several
/// MB at the end of a large drain) and goes on a later turn of the loop.
const REQUEST_CAPACITY: usize = 1024;

/// What an ack needs of a received QoS 1/2 publish: a few bytes, so that queued and held acks
/// hold neither topics, payloads nor MQTT 5 properties.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Delivery {
    /// Which client received it.
    v5: bool,
    /// QoS 2 (answered with PUBREC) rather than QoS 1 (PUBACK).
    exactly_once: bool,
    pkid: u16,
}

/// The request side of either client.
#[derive(Debug, Clone)]
enum Client {
    V4(rumqttc::AsyncClient),
    V5(rumqttc::v5::AsyncClient),
}

impl Client {
    fn try_ack(&self, d: &Delivery) -> Result<(), String> {
        // rumqttc builds the ack from the publish's QoS and packet id only.
        match self {
            Client::V4(c) if !d.v5 => {
                use rumqttc::QoS::{AtLeastOnce, ExactlyOnce};
                let qos = if d.exactly_once {
                    ExactlyOnce
                } else {
                    AtLeastOnce
                };
                let mut p = rumqttc::Publish::new("", qos, Vec::<u8>::new());
                p.pkid = d.pkid;
                c.try_ack(&p).map_err(|e| e.to_string())
            }
            Client::V5(c) if d.v5 => {
                use rumqttc::v5::mqttbytes::QoS::{AtLeastOnce, ExactlyOnce};
                let qos = if d.exactly_once {
                    ExactlyOnce
                } else {
                    AtLeastOnce
                };
                let mut p =
                    rumqttc::v5::mqttbytes::v5::Publish::new("", qos, Vec::<u8>::new(), None);
                p.pkid = d.pkid;
                c.try_ack(&p).map_err(|e| e.to_string())
            }
            // A client only ever acknowledges what its own event loop delivered.
            _ => Err("acknowledgement for the other protocol version".into()),
        }
    }

    fn try_subscribe(&self, filters: &[Filter]) -> Result<(), String> {
        match self {
            Client::V4(c) => c
                .try_subscribe_many(filters.iter().map(v4::filter))
                .map_err(|e| e.to_string()),
            Client::V5(c) => c
                .try_subscribe_many(filters.iter().map(v5::filter))
                .map_err(|e| e.to_string()),
        }
    }

    fn try_disconnect(&self) -> Result<(), String> {
        match self {
            Client::V4(c) => c.try_disconnect().map_err(|e| e.to_string()),
            Client::V5(c) => c.try_disconnect().map_err(|e| e.to_string()),
        }
    }
}

/// A subscription: topic filter and QoS level.
#[derive(Debug, Clone)]
struct Filter {
    path: String,
    qos: u8,
}

/// The event loop of either client (not connected yet: polling connects).
pub struct Connection(Loop);

/// Boxed: there is one per client, and the two differ much in size.
enum Loop {
    V4(Box<rumqttc::EventLoop>),
    V5(Box<rumqttc::v5::EventLoop>),
}

/// What a poll yielded, whichever the protocol version.
// Nearly every poll yields a publish, and it is moved once: boxing it would only add an
// allocation per message.
#[allow(clippy::large_enum_variant)]
enum Polled {
    /// A message from the broker.
    Publish(Message),
    /// A connection was made.
    ConnAck(ConnAck),
    /// The broker answered the subscriptions; `refused` when any failed.
    SubAck { refused: Option<Refused> },
    /// Our DISCONNECT went out.
    DisconnectSent,
    /// Anything else (pings, acks going out).
    Other,
}

/// What a CONNACK says, whichever the protocol version (MQTT 3.1.1 has only the first).
#[derive(Debug, Default, PartialEq, Eq)]
struct ConnAck {
    session_present: bool,
    /// MQTT 5: the session expiry the broker granted, when it set one other than asked.
    session_expiry: Option<u32>,
    /// MQTT 5: `shared_subscription_available = 0`.
    shared_unavailable: bool,
    /// MQTT 5: how many QoS 1/2 publishes the broker takes from us at once (we send none).
    receive_max: Option<u16>,
    /// MQTT 5: the largest packet the broker takes from us.
    max_packet_size: Option<u32>,
}

/// A subscription the broker refused.
#[derive(Debug, PartialEq, Eq)]
struct Refused {
    /// The reason codes, for the log.
    codes: String,
    /// MQTT 5 reason code 0x9E: the broker has no shared subscriptions.
    shared_unsupported: bool,
}

/// A publish in the parts the intake needs.
struct Message {
    topic: String,
    payload: Bytes,
    /// What to acknowledge; `None` for QoS 0.
    ack: Option<Delivery>,
}

impl Connection {
    /// Polls once; an error comes described for an operator (see [`v4::describe`],
    /// [`v5::describe`]; `connected`: whether the broker had answered the CONNECT, since a
    /// broker that cannot speak MQTT 5 fails before that). Polling again after an error
    /// reconnects.
    async fn poll(&mut self, connected: bool) -> Result<Polled, String> {
        let polled = match &mut self.0 {
            Loop::V4(l) => l.poll().await.map(v4::polled).map_err(|e| v4::describe(&e)),
            Loop::V5(l) => l
                .poll()
                .await
                .map(v5::polled)
                .map_err(|e| v5::describe(&e, connected)),
        };
        if polled.is_err() {
            self.forget_the_connection();
        }
        polled
    }

    /// After a connection failed, drops what rumqttc keeps of it: publishes it had read but not
    /// yet handed out (MQTT 3.1.1 would hand them out after the next CONNACK, where their packet
    /// ids name other messages), and requests it would send first on the next connection (a
    /// PUBREC or SUBSCRIBE meant for the old one). The broker redelivers those messages, and the
    /// event loop subscribes again on every CONNACK.
    fn forget_the_connection(&mut self) {
        match &mut self.0 {
            Loop::V4(l) => {
                l.state.events.clear();
                l.pending.clear();
            }
            Loop::V5(l) => {
                l.state.events.clear();
                l.pending.clear();
            }
        }
    }
}

/// The transport for the settings: TLS when configured (its files were checked with the
/// settings; a file that changed since fails here, naming its variable), else plain TCP.
fn transport(settings: &MqttSettings) -> Result<Transport, ConfigError> {
    Ok(match &settings.tls {
        Some(tls) => {
            let config = crate::tls::mqtt_client_config(tls)?;
            Transport::tls_with_config(TlsConfiguration::Rustls(Arc::new(config)))
        }
        None => Transport::tcp(),
    })
}

/// Operator hints shared by both protocol versions' error descriptions.
const BAD_LOGIN: &str =
    "broker refused the login: bad user name or password (check MQTT_USERNAME / MQTT_PASSWORD)";
const NOT_AUTHORIZED: &str = "broker refused the connection: not authorized (check MQTT_USERNAME / MQTT_PASSWORD and the broker's ACL)";
const BAD_CLIENT_ID: &str = "broker refused the client id (check MQTT_CLIENT_ID)";

fn io_refused(io: &std::io::Error) -> Option<String> {
    (io.kind() == std::io::ErrorKind::ConnectionRefused)
        .then(|| format!("{io} (is the broker running? check MQTT_BROKER / MQTT_PORT)"))
}

/// The filter to subscribe to for `kind`: `PREFIX/+/kind`, or `$share/GROUP/PREFIX/+/kind` in
/// a shared-subscription group. Messages arrive under their own topic either way (the broker
/// strips nothing because it adds nothing: `$share/GROUP/` only names the group), so parsing is
/// the same.
pub fn subscription(settings: &MqttSettings, kind: TopicKind) -> String {
    match &settings.shared_group {
        Some(group) => format!("$share/{group}/{}", settings.topics.filter(kind)),
        None => settings.topics.filter(kind),
    }
}

/// A client for `client_id` in the configured protocol version. `persistent` keeps the
/// session (MQTT 3.1.1: clean session off; MQTT 5: clean start off and the configured session
/// expiry); otherwise the session ends with the connection.
fn parts(
    settings: &MqttSettings,
    client_id: &str,
    persistent: bool,
    capacity: usize,
) -> Result<(Client, Connection), ConfigError> {
    Ok(match settings.protocol {
        MqttProtocol::V311 => {
            let options = v4::options(settings, client_id, persistent)?;
            let (client, eventloop) = rumqttc::AsyncClient::new(options, capacity);
            (
                Client::V4(client),
                Connection(Loop::V4(Box::new(eventloop))),
            )
        }
        MqttProtocol::V5 => {
            let options = v5::options(settings, client_id, persistent)?;
            let (client, eventloop) = rumqttc::v5::AsyncClient::new(options, capacity);
            (
                Client::V5(client),
                Connection(Loop::V5(Box::new(eventloop))),
            )
        }
    })
}

/// The service's side of the broker before it connects: its client and event loop.
pub struct Link {
    client: Client,
    connection: Connection,
}

/// The service's client and its event loop (not connected yet: polling connects): persistent
/// session unless `MQTT_CLEAN_SESSION` says otherwise, manual acks, TLS when configured.
pub fn client(settings: &MqttSettings) -> Result<Link, ConfigError> {
    let (client, connection) = parts(
        settings,
        &settings.client_id,
        !settings.clean_session,
        REQUEST_CAPACITY,
    )?;
    Ok(Link { client, connection })
}

/// How long a connection must stay up and subscribed before the reconnect backoff starts over:
/// a broker that drops us right after connecting or subscribing (it refuses a feature, or
/// disconnects a client it finds at fault) meets a growing wait, not a reconnect every
/// `MQTT_RECONNECT_MIN_SECS`.
const STABLE_AFTER: Duration = Duration::from_secs(30);

/// Why the event loop stopped the service: the broker lacks something the settings ask for, or
/// a writer is gone; waiting will not bring either back.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Fatal(String);

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
struct Outbox {
    client: Client,
    acks: Ledger,
    /// The subscriptions for the newest connection, until the channel takes them.
    subscribe: Option<Vec<Filter>>,
    /// Every writer has finished and shutdown asked to disconnect: sent once every releasable
    /// ack is in the channel, never before (the broker would redeliver what was written but not
    /// acknowledged) and never lost (the loop waits for it to go out).
    disconnect: bool,
    in_flight: Arc<InFlight>,
    /// Whether the current connection got its CONNACK. Between a lost connection and the next
    /// CONNACK nothing is sent: rumqttc would send it on the next connection, where an ack for
    /// an old packet id is out of order (the next CONNACK drops what the ledger keeps).
    connected: bool,
}

impl Outbox {
    /// Sends what may go out, in order, while the client's channel takes it: the subscriptions,
    /// the acks whose earlier messages are all settled, then a disconnect that was asked for.
    /// What does not fit goes on a later turn (the loop calls this after every poll).
    fn flush(&mut self) {
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

    fn settle(&mut self, tokens: Vec<AckToken>) {
        for t in tokens {
            self.acks.settle(t);
        }
        self.flush();
    }

    /// Takes a QoS 1/2 message in: its token, in the connection's order of receipt.
    fn receive(&mut self, delivery: Delivery) -> AckToken {
        let (token, forgotten) = self.acks.receive(delivery);
        self.in_flight.set_unacked(self.acks.unacked());
        if forgotten > 0 && forgotten == self.acks.take_forgotten() {
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
    // Whether the current connection got its CONNACK, and since when it is subscribed.
    let mut connected = false;
    let mut subscribed_at: Option<Instant> = None;
    let mut settled_open = true;
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
        stats.event_loop_beat();
        match polled {
            Ok(Polled::Publish(message)) => {
                let ctx = Intake {
                    settings: &settings,
                    rules: &rules,
                    jobs: &jobs,
                    rejects: rejects.as_ref(),
                    stats: &stats,
                    shutdown: &shutdown,
                };
                handle_publish(message, &ctx, &mut outbox).await?;
                if outbox.in_flight.window_full() {
                    // Nothing more comes until some are acknowledged: writers waiting for a
                    // batch to fill would wait for nothing.
                    jobs.wake();
                }
            }
            Ok(Polled::ConnAck(connack)) => {
                outbox.acks.new_connection();
                outbox.in_flight.reset();
                stats.connected(first_connection);
                connected = true;
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
                let was_connected = std::mem::replace(&mut connected, false);
                outbox.connected = false;
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
                stats.event_loop_waiting();
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = shutdown.cancelled() => return Ok(()),
                }
                stats.event_loop_beat();
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

/// At most this many characters of a topic reach a log line.
const TOPIC_SHOWN: usize = 120;

fn shown_topic(topic: &str) -> String {
    let mut s: String = topic
        .chars()
        .take(TOPIC_SHOWN)
        .collect::<String>()
        .escape_debug()
        .to_string();
    if topic.chars().nth(TOPIC_SHOWN).is_some() {
        s.push('…');
    }
    s
}

/// What handling one publish needs.
struct Intake<'a> {
    settings: &'a MqttSettings,
    rules: &'a Rules,
    jobs: &'a Router,
    rejects: Option<&'a RejectSink>,
    stats: &'a Stats,
    shutdown: &'a CancellationToken,
}

async fn handle_publish(
    message: Message,
    ctx: &Intake<'_>,
    outbox: &mut Outbox,
) -> Result<(), Fatal> {
    let Intake {
        settings,
        rules,
        jobs,
        rejects,
        stats,
        shutdown,
    } = *ctx;
    if shutdown.is_cancelled() {
        // Not taken: unacknowledged, so the broker keeps it for the next start.
        return Ok(());
    }
    let received_at = Utc::now();
    let Message {
        topic,
        payload,
        ack,
    } = message;
    let outcome = settings
        .topics
        .parse(&topic)
        .and_then(|(device, kind)| payload::process(kind, device, &payload, received_at, rules));
    let ack = ack.map(|delivery| outbox.receive(delivery));
    let evidence = rejects.map(|sink| sink.evidence(&topic, &payload));
    match outcome {
        Err(rejection) => {
            stats.received();
            stats.rejected(&rejection);
            // Parsed again only here, off the accepted path. A bad topic has no valid device
            // id: its warnings share one key.
            let device = settings.topics.parse(&topic).ok().map(|(d, _)| d);
            let device_key = device.as_ref().map_or("", |d| d.as_str());
            if let Some(left_out) = stats.should_warn(device_key, rejection.reason()) {
                match &rejection {
                    // The Python service's words, which its README has operators grep for.
                    crate::rejection::Rejection::NotJson(e) if stats.codehubot_wording() => {
                        let head: String = String::from_utf8_lossy(&payload)
                            .chars()
                            .take(100)
                            .collect();
                        warn!(
                            topic = %shown_topic(&topic),
                            reason = rejection.reason(),
                            similar_left_out = left_out,
                            "❌ JSON解析失败: {e}, payload: {}",
                            head.escape_debug()
                        );
                    }
                    _ => warn!(
                        topic = %shown_topic(&topic),
                        reason = rejection.reason(),
                        error = %rejection,
                        similar_left_out = left_out,
                        "message rejected"
                    ),
                }
            }
            if let (Some(sink), Some(evidence)) = (rejects, evidence) {
                sink.record(
                    evidence,
                    device.as_ref().map(|d| d.as_str()),
                    &rejection,
                    rules.time.zone.at(received_at),
                    1,
                );
            }
            // Final: the same message would be rejected again. Its ack still waits for every
            // earlier message's.
            if let Some(token) = ack {
                outbox.acks.settle(token);
            }
            Ok(())
        }
        Ok(accepted) => {
            report_undated(&accepted, stats);
            if !accepted.skipped.is_empty() {
                stats.parts_skipped(accepted.skipped.len() as u64);
                let device_key = accepted.update.device.as_str();
                if let Some(left_out) = stats.should_warn(device_key, "parts_skipped") {
                    let parts: Vec<String> = accepted
                        .skipped
                        .iter()
                        .map(|s| format!("{}: {}", s.part, s.reason))
                        .collect();
                    warn!(
                        device = %accepted.update.device,
                        skipped = %parts.join("; "),
                        similar_left_out = left_out,
                        "skipped part of a message"
                    );
                    if stats.codehubot_wording() {
                        for name in accepted.skipped.iter().filter_map(|s| s.bad_name.as_ref()) {
                            warn!(device = %accepted.update.device, "⚠️ 传感器名称格式不正确，跳过: {name}");
                        }
                    }
                }
            }
            let job = Job {
                update: accepted.update,
                ack,
                evidence,
            };
            // Waits only when the writer is behind by a whole queue: that is the backpressure
            // towards the broker. With QoS 1 the broker's inflight window keeps it from filling.
            // Counted before it is queued: once queued, a writer on another thread may commit
            // and count it before this line would run, and `received` must never trail
            // `succeeded + failed`.
            stats.received();
            stats.event_loop_waiting();
            let sent = jobs.send(job).await;
            stats.event_loop_beat();
            if sent.is_err() {
                // Unacknowledged (and so is every later message of this connection): the
                // broker keeps it for the next start.
                stats.not_received();
                debug!("writer closed; message left to the broker for redelivery");
                if !shutdown.is_cancelled() {
                    // A writer ended on its own: its token can never settle, so no later ack
                    // could go out either. Stop rather than hold the broker's window forever.
                    return Err(Fatal("a writer stopped unexpectedly".into()));
                }
            }
            Ok(())
        }
    }
}

/// Counts the timestamps of `accepted` that dated nothing and warns about them, at most once
/// per warning interval for all devices together: a fleet whose firmware sends uptime counters
/// (CodeHubot's does) would otherwise warn for every device, all the time.
fn report_undated(accepted: &payload::Accepted, stats: &Stats) {
    for u in &accepted.undated {
        stats.undated(u.reason);
    }
    if let Some(first) = accepted.undated.first()
        && let Some(left_out) = stats.should_warn("", "timestamp_undated")
    {
        warn!(
            device = %accepted.update.device,
            part = %first.part,
            value = %first.shown,
            reason = first.reason.as_str(),
            similar_left_out = left_out,
            "a device timestamp dates nothing (not a wall-clock time, or too far ahead): its readings keep the receive time"
        );
    }
}

/// Connects once with a throw-away client id and a session that ends with the connection (so
/// the service's persistent session is not disturbed), for `--check-config`.
pub async fn check_connection(settings: &MqttSettings, timeout: Duration) -> Result<(), String> {
    let id = format!("{}-check-{}", settings.client_id, std::process::id());
    let (client, mut connection) = parts(settings, &id, false, 10).map_err(|e| e.to_string())?;
    let result = tokio::time::timeout(timeout, async {
        loop {
            match connection.poll(false).await {
                Ok(Polled::ConnAck { .. }) => return Ok(()),
                Ok(_) => {}
                Err(e) => return Err(e),
            }
        }
    })
    .await
    .unwrap_or_else(|_| Err(format!("no answer within {}s", timeout.as_secs())));
    if result.is_ok() {
        let _ = client.try_disconnect();
        let _ = tokio::time::timeout(Duration::from_secs(2), connection.poll(true)).await;
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_topics_are_shortened_and_escaped() {
        let t = format!("devices/{}\n/data", "x".repeat(500));
        let s = shown_topic(&t);
        assert!(s.chars().count() <= TOPIC_SHOWN + 2);
        assert!(!s.contains('\n'));
    }

    #[test]
    fn shared_group_prefixes_the_filters() {
        let map = |pairs: &[(&str, &str)]| {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        let plain = crate::config::Settings::from_map(&map(&[])).unwrap().mqtt;
        assert_eq!(subscription(&plain, TopicKind::Data), "devices/+/data");
        let shared = crate::config::Settings::from_map(&map(&[("MQTT_SHARED_GROUP", "ingest")]))
            .unwrap()
            .mqtt;
        assert_eq!(
            subscription(&shared, TopicKind::Heartbeat),
            "$share/ingest/devices/+/heartbeat"
        );
    }
}

#[cfg(test)]
mod outbox_tests {
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
