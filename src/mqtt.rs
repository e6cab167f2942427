//! The broker side: connection options, the event loop, subscriptions and acknowledgements.
//!
//! The event-loop task only polls, validates (pure, fast) and hands updates to the writer over a
//! bounded channel; it never waits on SQL. QoS 1/2 messages are acknowledged only after the
//! writer committed them ([`Acker`]), so a crash between receipt and commit makes the broker
//! deliver them again.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use chrono::Utc;
use rumqttc::{
    AsyncClient, ConnectionError, Event, EventLoop, MqttOptions, Outgoing, Packet, Publish, QoS,
    SubscribeFilter, SubscribeReasonCode, TlsConfiguration, Transport,
};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::backoff::Backoff;
use crate::config::{ConfigError, MqttSettings};
use crate::model::{TopicKind, Update};
use crate::payload::{self, Rules};
use crate::rejects::{Evidence, RejectSink};
use crate::stats::Stats;
use crate::writer::Router;

/// MQTT's own limit on a packet (256 MiB). The client accepts anything up to it so that an
/// oversized payload becomes a counted rejection, not a connection error that would make the
/// broker redeliver it forever; the service's own limit (`MQTT_MAX_PAYLOAD_BYTES`) applies after.
const MQTT_MAX_PACKET: usize = 268_435_455;

/// Capacity of the client's request channel. Acks, subscriptions and the disconnect go through
/// it; packet ids are 16-bit, so no more than 65,535 acks can ever be outstanding and sending
/// into it never waits (a full channel here would deadlock with a writer waiting on us).
const REQUEST_CAPACITY: usize = 65_535 + 64;

/// What must be acknowledged once a message is committed.
#[derive(Debug)]
pub struct AckToken {
    /// The publish without its topic and payload (only QoS and packet id are needed).
    publish: Publish,
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

/// Sends acknowledgements through the client. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Acker {
    client: AsyncClient,
    generation: Arc<AtomicU64>,
}

impl Acker {
    /// Acknowledges a committed message. An ack for a message that arrived on an earlier
    /// connection is not sent: its packet id may now name another message, and the broker
    /// redelivers the old one anyway (the write is idempotent).
    pub fn ack(&self, token: AckToken) {
        if token.generation != self.generation.load(Ordering::Acquire) {
            debug!(
                pkid = token.publish.pkid,
                "not acknowledging a message from an earlier connection; the broker redelivers it"
            );
            return;
        }
        if let Err(e) = self.client.try_ack(&token.publish) {
            // Only possible when the event loop is gone (shutting down): the message stays
            // unacknowledged and is redelivered.
            warn!(error = %e, pkid = token.publish.pkid, "could not queue an acknowledgement");
        }
    }

    /// Asks the event loop to disconnect after the acknowledgements already queued.
    pub fn disconnect(&self) {
        if let Err(e) = self.client.try_disconnect() {
            debug!(error = %e, "disconnect request not queued: event loop already stopped");
        }
    }
}

/// Converts the configured QoS number.
pub fn qos(level: u8) -> QoS {
    match level {
        0 => QoS::AtMostOnce,
        2 => QoS::ExactlyOnce,
        _ => QoS::AtLeastOnce,
    }
}

/// Client options for the settings: persistent session unless configured otherwise, manual
/// acks, TLS when configured (its files were checked with the settings; a file that changed
/// since fails here, naming its variable).
pub fn options(settings: &MqttSettings, client_id: &str) -> Result<MqttOptions, ConfigError> {
    let mut o = MqttOptions::new(client_id, settings.broker.clone(), settings.port);
    o.set_keep_alive(settings.keepalive)
        .set_clean_session(settings.clean_session)
        .set_manual_acks(true)
        .set_max_packet_size(MQTT_MAX_PACKET, 64 * 1024);
    if !settings.username.is_empty() {
        o.set_credentials(settings.username.clone(), settings.password.expose());
    }
    if let Some(tls) = &settings.tls {
        let config = crate::tls::mqtt_client_config(tls)?;
        o.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(
            Arc::new(config),
        )));
    }
    Ok(o)
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

/// A client and its event loop (not connected yet: polling connects).
pub fn client(settings: &MqttSettings) -> Result<(AsyncClient, EventLoop, Acker), ConfigError> {
    let (client, eventloop) =
        AsyncClient::new(options(settings, &settings.client_id)?, REQUEST_CAPACITY);
    let acker = Acker {
        client: client.clone(),
        generation: Arc::new(AtomicU64::new(0)),
    };
    Ok((client, eventloop, acker))
}

/// Describes a connection error for an operator, with a hint where one helps.
fn describe(e: &ConnectionError) -> String {
    use rumqttc::ConnectReturnCode as C;
    match e {
        ConnectionError::ConnectionRefused(C::BadUserNamePassword) => {
            "broker refused the login: bad user name or password (check MQTT_USERNAME / MQTT_PASSWORD)".into()
        }
        ConnectionError::ConnectionRefused(C::NotAuthorized) => {
            "broker refused the connection: not authorized (check MQTT_USERNAME / MQTT_PASSWORD and the broker's ACL)".into()
        }
        ConnectionError::ConnectionRefused(C::BadClientId) => {
            "broker refused the client id (check MQTT_CLIENT_ID)".into()
        }
        ConnectionError::Io(io) if io.kind() == std::io::ErrorKind::ConnectionRefused => {
            format!("{io} (is the broker running? check MQTT_BROKER / MQTT_PORT)")
        }
        other => other.to_string(),
    }
}

/// Runs the event loop until the disconnect that shutdown asks for (or until `shutdown` fires
/// while there is no connection). Reconnects forever with backoff and re-subscribes after every
/// connection: rumqttc does neither on its own.
#[allow(clippy::too_many_arguments)] // the parts it connects; a struct would only rename them
pub async fn run_event_loop(
    settings: MqttSettings,
    rules: Rules,
    mut eventloop: EventLoop,
    acker: Acker,
    jobs: Router,
    rejects: Option<RejectSink>,
    stats: Arc<Stats>,
    shutdown: CancellationToken,
) {
    let filters: Vec<SubscribeFilter> = TopicKind::ALL
        .iter()
        .map(|k| SubscribeFilter::new(subscription(&settings, *k), qos(settings.qos)))
        .collect();
    let mut backoff = Backoff::new(settings.reconnect_min, settings.reconnect_max);
    let mut first_connection = true;
    let address = format!("{}:{}", settings.broker, settings.port);
    info!(broker = %address, client_id = %settings.client_id, "connecting to the MQTT broker");
    loop {
        let polled = eventloop.poll().await;
        // Every poll result, pings included, is a sign of life for the systemd watchdog.
        stats.event_loop_beat();
        match polled {
            Ok(Event::Incoming(Packet::Publish(publish))) => {
                let ctx = Intake {
                    settings: &settings,
                    rules: &rules,
                    acker: &acker,
                    jobs: &jobs,
                    rejects: rejects.as_ref(),
                    stats: &stats,
                    shutdown: &shutdown,
                };
                handle_publish(publish, &ctx).await;
            }
            Ok(Event::Incoming(Packet::ConnAck(connack))) => {
                acker.generation.fetch_add(1, Ordering::AcqRel);
                stats.connected(first_connection);
                first_connection = false;
                backoff.reset();
                info!(
                    broker = %address,
                    session_present = connack.session_present,
                    "connected to the MQTT broker"
                );
                if let Err(e) = acker.client.try_subscribe_many(filters.clone()) {
                    error!(error = %e, "could not queue the subscription request");
                }
            }
            Ok(Event::Incoming(Packet::SubAck(suback))) => {
                let refused = suback
                    .return_codes
                    .iter()
                    .any(|c| matches!(c, SubscribeReasonCode::Failure));
                if refused {
                    error!(
                        codes = ?suback.return_codes,
                        "the broker refused a subscription (check its ACL for this user)"
                    );
                } else {
                    stats.subscribed();
                    for f in &filters {
                        info!(topic = %f.path, qos = ?f.qos, "subscribed");
                    }
                }
            }
            Ok(Event::Outgoing(Outgoing::Disconnect)) => {
                info!("disconnected from the MQTT broker");
                stats.disconnected();
                return;
            }
            Ok(_) => {}
            Err(e) => {
                stats.disconnected();
                if shutdown.is_cancelled() {
                    debug!(error = %e, "connection closed while shutting down");
                    return;
                }
                let delay = backoff.next_delay();
                warn!(
                    broker = %address,
                    error = %describe(&e),
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

async fn handle_publish(mut publish: Publish, ctx: &Intake<'_>) {
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
    // Keep only what an ack needs (QoS and packet id), so queued messages do not hold their
    // topics and payloads.
    let topic = std::mem::take(&mut publish.topic);
    let payload = std::mem::take(&mut publish.payload);
    let parsed = settings.topics.parse(&topic);
    let device_key = parsed
        .as_ref()
        .map_or(String::new(), |(d, _)| d.as_str().to_owned());
    let outcome = parsed
        .and_then(|(device, kind)| payload::process(kind, device, &payload, received_at, rules));
    let ack = (publish.qos != QoS::AtMostOnce).then(|| AckToken {
        publish,
        generation: acker.generation.load(Ordering::Acquire),
    });
    let evidence = rejects.map(|sink| sink.evidence(&topic, &payload));
    match outcome {
        Err(rejection) => {
            stats.received();
            stats.rejected(&rejection);
            // A device with a bad topic has no valid id: such warnings share one key.
            if let Some(left_out) = stats.should_warn(&device_key, rejection.reason()) {
                warn!(
                    topic = %shown_topic(&topic),
                    reason = rejection.reason(),
                    error = %rejection,
                    similar_left_out = left_out,
                    "message rejected"
                );
            }
            if let (Some(sink), Some(evidence)) = (rejects, evidence) {
                let device = (!device_key.is_empty()).then_some(device_key.as_str());
                sink.record(evidence, device, &rejection, received_at);
            }
            // Final: the same message would be rejected again.
            if let Some(token) = ack {
                acker.ack(token);
            }
        }
        Ok(accepted) => {
            if !accepted.skipped.is_empty() {
                stats.parts_skipped(accepted.skipped.len() as u64);
                if let Some(left_out) = stats.should_warn(&device_key, "parts_skipped") {
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
                }
            }
            let job = Job {
                update: accepted.update,
                ack,
                evidence,
            };
            // Waits only when the writer is behind by a whole queue: that is the backpressure
            // towards the broker. With QoS 1 the broker's inflight window keeps it from filling.
            stats.event_loop_waiting();
            let sent = jobs.send(job).await;
            stats.event_loop_beat();
            if sent.is_ok() {
                stats.received();
            } else {
                debug!("writer closed; message left to the broker for redelivery");
            }
        }
    }
}

/// Connects once with a throw-away client id and a clean session (so the service's persistent
/// session is not disturbed), for `--check-config`.
pub async fn check_connection(settings: &MqttSettings, timeout: Duration) -> Result<(), String> {
    let id = format!("{}-check-{}", settings.client_id, std::process::id());
    let mut o = options(settings, &id).map_err(|e| e.to_string())?;
    o.set_clean_session(true);
    let (client, mut eventloop) = AsyncClient::new(o, 10);
    let result = tokio::time::timeout(timeout, async {
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => return Ok(()),
                Ok(_) => {}
                Err(e) => return Err(describe(&e)),
            }
        }
    })
    .await
    .unwrap_or_else(|_| Err(format!("no answer within {}s", timeout.as_secs())));
    if result.is_ok() {
        let _ = client.try_disconnect();
        let _ = tokio::time::timeout(Duration::from_secs(2), eventloop.poll()).await;
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

    #[test]
    fn qos_levels() {
        assert_eq!(qos(0), QoS::AtMostOnce);
        assert_eq!(qos(1), QoS::AtLeastOnce);
        assert_eq!(qos(2), QoS::ExactlyOnce);
    }
}
