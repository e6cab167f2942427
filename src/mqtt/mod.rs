//! The broker side: connection options, the event loop, subscriptions and acknowledgements.
//!
//! The event-loop task only polls, validates (pure, fast) and hands updates to the writer over a
//! bounded channel; it never waits on SQL. QoS 1/2 messages are acknowledged only after the
//! writer committed them ([`Acker`]), so a crash between receipt and commit makes the broker
//! deliver them again.
//!
//! Both protocol versions (`MQTT_PROTOCOL`) go through the same code here: [`v4`] (MQTT 3.1.1)
//! and [`v5`] (MQTT 5) only build their rumqttc client and turn what its event loop yields into
//! the common [`Polled`] events, so subscribing, acknowledging and the intake of a publish are
//! written once.

mod v4;
mod v5;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use chrono::Utc;
use rumqttc::{TlsConfiguration, Transport};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::backoff::Backoff;
use crate::config::{ConfigError, MqttProtocol, MqttSettings};
use crate::model::{TopicKind, Update};
use crate::payload::{self, Rules};
use crate::rejects::{Evidence, RejectSink};
use crate::stats::Stats;
use crate::writer::Router;

/// MQTT's own limit on a packet (256 MiB). The client accepts anything up to it so that an
/// oversized payload becomes a counted rejection, not a connection error that would make the
/// broker redeliver it forever (MQTT 3.1.1), nor a message the broker silently drops for being
/// over our announced maximum (MQTT 5); the service's own limit (`MQTT_MAX_PAYLOAD_BYTES`)
/// applies after.
const MQTT_MAX_PACKET: usize = 268_435_455;

/// Capacity of the client's request channel. Acks, subscriptions and the disconnect go through
/// it, always with `try_` sends: what does not fit waits in the [`Acker`] (4-byte tokens rather
/// than rumqttc's request enum, which made a 65,535-deep channel several MB at the end of a
/// large drain), so nothing ever waits on the event loop (a writer waiting on it while it waits
/// on the writer would deadlock).
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

impl Delivery {
    fn pkid(&self) -> u16 {
        self.pkid
    }
}

/// What must be acknowledged once a message is committed.
#[derive(Debug)]
pub struct AckToken {
    delivery: Delivery,
    /// The connection it arrived on.
    generation: u64,
}

/// A validated update on its way to the writer.
#[derive(Debug)]
pub struct Job {
    /// What to write.
    pub update: Update,
    /// What to acknowledge after the commit; `None` for QoS 0.
    pub ack: Option<AckToken>,
    /// Topic and payload start, kept only when rejects are kept (the writer may still reject
    /// the message: unknown device).
    pub evidence: Option<Evidence>,
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
    ConnAck {
        session_present: bool,
        /// MQTT 5: the session expiry the broker granted, when it set one other than asked.
        session_expiry: Option<u32>,
    },
    /// The broker answered the subscriptions; `refused` lists the codes when any failed.
    SubAck { refused: Option<String> },
    /// Our DISCONNECT went out.
    DisconnectSent,
    /// Anything else (pings, acks going out).
    Other,
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
    /// [`v5::describe`]). Polling again after an error reconnects.
    async fn poll(&mut self) -> Result<Polled, String> {
        match &mut self.0 {
            Loop::V4(l) => l.poll().await.map(v4::polled).map_err(|e| v4::describe(&e)),
            Loop::V5(l) => l.poll().await.map(v5::polled).map_err(|e| v5::describe(&e)),
        }
    }
}

/// Acks held back at most: 16 MiB of 16-byte tokens. A broker that keeps to its inflight window
/// never has more than that window (at most 65,535) unacknowledged; Mosquitto before 2.0.13 does
/// not keep to it, and while it drains a backlog it sends ten messages for each ack rumqttc
/// takes, so a 100,000-message backlog held over 65,536 acks here (measured: 25,967 dropped in
/// the 10,000-device benchmark drain with a cap of 65,536).
const HELD_ACKS_MAX: usize = 1 << 20;

/// Sends acknowledgements through the client. Cheap to clone.
///
/// rumqttc's event loop takes one request (one ack) per turn but reads up to ten incoming
/// packets in one, so behind a deep backlog its request channel can fill faster than it empties.
/// An ack that does not fit is held here and sent on a later turn, rather than lost (which would
/// make the broker redeliver a message already written).
#[derive(Debug, Clone)]
pub struct Acker {
    client: Client,
    generation: Arc<AtomicU64>,
    // A std Mutex: held only to move tokens in and out, never across an await.
    held: Arc<std::sync::Mutex<Held>>,
}

/// What waits for room in the client's request channel, in the order it must go out.
#[derive(Debug, Default)]
struct Held {
    /// The subscriptions for the newest connection, until the channel takes them.
    subscribe: Option<Vec<Filter>>,
    acks: std::collections::VecDeque<AckToken>,
    /// Acks dropped for want of room since the last report.
    dropped: u64,
    /// Shutdown asked to disconnect: sent once every held ack is in the channel, never
    /// before (the broker would redeliver what was written but not acknowledged) and never
    /// lost (the event loop waits for it to go out).
    disconnect: bool,
}

impl Acker {
    fn new(client: Client) -> Self {
        Self {
            client,
            generation: Arc::new(AtomicU64::new(0)),
            held: Arc::default(),
        }
    }

    /// Acknowledges a committed message. An ack for a message that arrived on an earlier
    /// connection is not sent: its packet id may now name another message, and the broker
    /// redelivers the old one anyway (the write is idempotent).
    pub fn ack(&self, token: AckToken) {
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        held.acks.push_back(token);
        self.send_held(&mut held);
    }

    /// Sends held acks, oldest first, while the client takes them, then a disconnect that
    /// was asked for.
    pub fn flush_held(&self) {
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        if !held.acks.is_empty() || held.disconnect || held.subscribe.is_some() {
            self.send_held(&mut held);
        }
    }

    /// Subscribes to `filters` on the current connection: at once when the channel has room,
    /// else as soon as it has.
    fn subscribe(&self, filters: &[Filter]) {
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        held.subscribe = Some(filters.to_vec());
        self.send_held(&mut held);
        if held.subscribe.is_some() {
            debug!("subscription request waits for room in the client's request channel");
        }
    }

    fn send_held(&self, held: &mut Held) {
        if let Some(filters) = &held.subscribe
            && self.client.try_subscribe(filters).is_ok()
        {
            held.subscribe = None;
        }
        self.send_held_acks(&mut held.acks);
        if held.acks.len() > HELD_ACKS_MAX {
            let n = held.acks.len() - HELD_ACKS_MAX;
            held.acks.drain(..n);
            if held.dropped == 0 {
                warn!(
                    held = HELD_ACKS_MAX,
                    "acknowledgements dropped: too many waiting for the client; the broker redelivers those messages after the next reconnect"
                );
            }
            held.dropped += n as u64;
        } else if held.dropped > 0 && held.acks.len() < HELD_ACKS_MAX / 2 {
            warn!(
                dropped = held.dropped,
                "acknowledgements were dropped; the broker redelivers those messages after the next reconnect"
            );
            held.dropped = 0;
        }
        if held.disconnect && held.acks.is_empty() {
            // Not taken: the channel is full (the event loop flushes again after each request
            // it takes) or closed (the event loop has stopped; nothing left to disconnect).
            if self.client.try_disconnect().is_ok() {
                held.disconnect = false;
            }
        }
    }

    fn send_held_acks(&self, held: &mut std::collections::VecDeque<AckToken>) {
        let generation = self.generation.load(Ordering::Acquire);
        while let Some(token) = held.front() {
            if token.generation != generation {
                debug!(
                    pkid = token.delivery.pkid(),
                    "not acknowledging a message from an earlier connection; the broker redelivers it"
                );
                held.pop_front();
                continue;
            }
            if self.client.try_ack(&token.delivery).is_err() {
                // Full (sent on a later turn) or closed (shutting down: the broker keeps the
                // message and redelivers it).
                break;
            }
            held.pop_front();
        }
    }

    /// Asks the event loop to disconnect after every acknowledgement already given, also those
    /// still held for room in the client's channel.
    pub fn disconnect(&self) {
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        held.disconnect = true;
        self.send_held(&mut held);
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

/// The service's client and its event loop (not connected yet: polling connects): persistent
/// session unless `MQTT_CLEAN_SESSION` says otherwise, manual acks, TLS when configured.
pub fn client(settings: &MqttSettings) -> Result<(Connection, Acker), ConfigError> {
    let (client, connection) = parts(
        settings,
        &settings.client_id,
        !settings.clean_session,
        REQUEST_CAPACITY,
    )?;
    Ok((connection, Acker::new(client)))
}

/// Runs the event loop until the disconnect that shutdown asks for (or until `shutdown` fires
/// while there is no connection). Reconnects forever with backoff and re-subscribes after every
/// connection: rumqttc does neither on its own.
#[allow(clippy::too_many_arguments)] // the parts it connects; a struct would only rename them
pub async fn run_event_loop(
    settings: MqttSettings,
    rules: Rules,
    mut connection: Connection,
    acker: Acker,
    jobs: Router,
    rejects: Option<RejectSink>,
    stats: Arc<Stats>,
    shutdown: CancellationToken,
) {
    let filters: Vec<Filter> = TopicKind::ALL
        .iter()
        .map(|k| Filter {
            path: subscription(&settings, *k),
            qos: settings.qos,
        })
        .collect();
    let mut backoff = Backoff::new(settings.reconnect_min, settings.reconnect_max);
    let mut first_connection = true;
    let address = format!("{}:{}", settings.broker, settings.port);
    info!(
        broker = %address,
        client_id = %settings.client_id,
        protocol = %settings.protocol,
        "connecting to the MQTT broker"
    );
    loop {
        let polled = connection.poll().await;
        // Every poll result, pings included, is a sign of life for the systemd watchdog.
        stats.event_loop_beat();
        // Acks that did not fit in the client's channel go out as it empties.
        acker.flush_held();
        match polled {
            Ok(Polled::Publish(message)) => {
                let ctx = Intake {
                    settings: &settings,
                    rules: &rules,
                    acker: &acker,
                    jobs: &jobs,
                    rejects: rejects.as_ref(),
                    stats: &stats,
                    shutdown: &shutdown,
                };
                handle_publish(message, &ctx).await;
            }
            Ok(Polled::ConnAck {
                session_present,
                session_expiry,
            }) => {
                acker.generation.fetch_add(1, Ordering::AcqRel);
                stats.connected(first_connection);
                first_connection = false;
                backoff.reset();
                info!(
                    broker = %address,
                    session_present,
                    "connected to the MQTT broker"
                );
                if let Some(granted) = session_expiry
                    && !settings.clean_session
                    && u64::from(granted) < settings.session_expiry.as_secs()
                {
                    warn!(
                        granted_secs = granted,
                        asked_secs = settings.session_expiry.as_secs(),
                        "the broker shortened the session expiry (MQTT_SESSION_EXPIRY_SECS): messages queue for a shorter outage"
                    );
                }
                acker.subscribe(&filters);
            }
            Ok(Polled::SubAck {
                refused: Some(codes),
            }) => {
                error!(
                    codes = %codes,
                    "the broker refused a subscription (check its ACL for this user)"
                );
            }
            Ok(Polled::SubAck { refused: None }) => {
                stats.subscribed();
                for f in &filters {
                    info!(topic = %f.path, qos = f.qos, "subscribed");
                }
            }
            Ok(Polled::DisconnectSent) => {
                info!("disconnected from the MQTT broker");
                stats.disconnected();
                return;
            }
            Ok(Polled::Other) => {}
            Err(e) => {
                stats.disconnected();
                if shutdown.is_cancelled() {
                    debug!(error = %e, "connection closed while shutting down");
                    return;
                }
                let delay = backoff.next_delay();
                warn!(
                    broker = %address,
                    error = %e,
                    retry_in_secs = delay.as_secs_f32(),
                    "MQTT connection failed; retrying"
                );
                stats.event_loop_waiting();
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = shutdown.cancelled() => return,
                }
                stats.event_loop_beat();
            }
        }
    }
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
    acker: &'a Acker,
    jobs: &'a Router,
    rejects: Option<&'a RejectSink>,
    stats: &'a Stats,
    shutdown: &'a CancellationToken,
}

async fn handle_publish(message: Message, ctx: &Intake<'_>) {
    let Intake {
        settings,
        rules,
        acker,
        jobs,
        rejects,
        stats,
        shutdown,
    } = *ctx;
    if shutdown.is_cancelled() {
        // Not taken: unacknowledged, so the broker keeps it for the next start.
        return;
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
    let ack = ack.map(|delivery| AckToken {
        delivery,
        generation: acker.generation.load(Ordering::Acquire),
    });
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
                );
            }
            // Final: the same message would be rejected again.
            if let Some(token) = ack {
                acker.ack(token);
            }
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
                stats.not_received();
                debug!("writer closed; message left to the broker for redelivery");
            }
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
            match connection.poll().await {
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
        let _ = tokio::time::timeout(Duration::from_secs(2), connection.poll()).await;
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
mod held_ack_tests {
    use super::*;

    fn token(pkid: u16, generation: u64) -> AckToken {
        AckToken {
            delivery: Delivery {
                v5: false,
                exactly_once: false,
                pkid,
            },
            generation,
        }
    }

    fn acked(rx: &flume::Receiver<rumqttc::Request>) -> Vec<u16> {
        rx.drain()
            .filter_map(|r| match r {
                rumqttc::Request::PubAck(a) => Some(a.pkid),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn acks_that_do_not_fit_are_held_and_sent_in_order_later() {
        let (tx, rx) = flume::bounded(2);
        let acker = Acker::new(Client::V4(rumqttc::AsyncClient::from_senders(tx)));
        for pkid in 1..=5 {
            acker.ack(token(pkid, 0));
        }
        assert_eq!(acked(&rx), [1, 2], "the channel holds two");
        acker.flush_held();
        assert_eq!(acked(&rx), [3, 4]);
        // A new connection: what was held for the old one is not sent.
        acker.generation.fetch_add(1, Ordering::AcqRel);
        acker.flush_held();
        acker.ack(token(9, 1));
        assert_eq!(acked(&rx), [9]);
    }

    #[test]
    fn a_disconnect_waits_for_held_acks_and_is_not_lost_to_a_full_channel() {
        let (tx, rx) = flume::bounded(2);
        let acker = Acker::new(Client::V4(rumqttc::AsyncClient::from_senders(tx)));
        for pkid in 1..=5 {
            acker.ack(token(pkid, 0));
        }
        // The channel is full: the disconnect must wait behind the three held acks.
        acker.disconnect();
        let mut sent = Vec::new();
        for _ in 0..5 {
            sent.extend(rx.drain().map(|r| match r {
                rumqttc::Request::PubAck(a) => a.pkid.to_string(),
                rumqttc::Request::Disconnect(_) => "disconnect".to_string(),
                other => format!("{other:?}"),
            }));
            acker.flush_held();
        }
        assert_eq!(sent, ["1", "2", "3", "4", "5", "disconnect"]);
    }

    #[test]
    fn a_subscription_is_not_lost_to_a_full_channel() {
        let (tx, rx) = flume::bounded(1);
        let acker = Acker::new(Client::V4(rumqttc::AsyncClient::from_senders(tx)));
        acker.ack(token(1, 0));
        acker.subscribe(&[Filter {
            path: "devices/+/data".into(),
            qos: 1,
        }]);
        let first: Vec<_> = rx.drain().collect();
        assert!(
            matches!(first[..], [rumqttc::Request::PubAck(_)]),
            "{first:?}"
        );
        acker.flush_held();
        let second: Vec<_> = rx.drain().collect();
        assert!(
            matches!(&second[..], [rumqttc::Request::Subscribe(s)] if s.filters[0].path == "devices/+/data"),
            "{second:?}"
        );
    }
}
