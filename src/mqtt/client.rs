//! The client side of the broker connection: options for either protocol version, the
//! transport, what rumqttc's event loop yields turned into common [`Polled`] events, the errors
//! described for an operator, and `--check-config`'s probe.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use rumqttc::{TlsConfiguration, Transport};

use super::{v4, v5};
use crate::config::{ConfigError, Endpoint, MqttProtocol, MqttSettings};
use crate::intake::model::TopicKind;

/// MQTT's own limit on a packet (256 MiB). The client accepts anything up to it so that an
/// oversized payload becomes a counted rejection, not a connection error that would make the
/// broker redeliver it forever (MQTT 3.1.1), nor a message the broker silently drops for being
/// over our announced maximum (MQTT 5); the service's own limit (`MQTT_MAX_PAYLOAD_BYTES`)
/// applies after.
pub(super) const MQTT_MAX_PACKET: usize = 268_435_455;

/// Capacity of the client's request channel. Acks, subscriptions and the disconnect go through
/// it, always with `try_` sends: what does not fit waits in the ack ledger ([`acks`]; a few
/// bytes per message rather than rumqttc's request enum, which made a 65,535-deep channel several
/// MB at the end of a large drain) and goes on a later turn of the loop.
pub(super) const REQUEST_CAPACITY: usize = 1024;

/// What an ack needs of a received QoS 1/2 publish: a few bytes, so that queued and held acks
/// hold neither topics, payloads nor MQTT 5 properties.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Delivery {
    /// Which client received it.
    pub(super) v5: bool,
    /// QoS 2 (answered with PUBREC) rather than QoS 1 (PUBACK).
    pub(super) exactly_once: bool,
    pub(super) pkid: u16,
}

/// The request side of either client.
#[derive(Debug, Clone)]
pub(super) enum Client {
    V4(rumqttc::AsyncClient),
    V5(rumqttc::v5::AsyncClient),
}

impl Client {
    pub(super) fn try_ack(&self, d: &Delivery) -> Result<(), String> {
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

    pub(super) fn try_subscribe(&self, filters: &[Filter]) -> Result<(), String> {
        match self {
            Client::V4(c) => c
                .try_subscribe_many(filters.iter().map(v4::filter))
                .map_err(|e| e.to_string()),
            Client::V5(c) => c
                .try_subscribe_many(filters.iter().map(v5::filter))
                .map_err(|e| e.to_string()),
        }
    }

    pub(super) fn try_disconnect(&self) -> Result<(), String> {
        match self {
            Client::V4(c) => c.try_disconnect().map_err(|e| e.to_string()),
            Client::V5(c) => c.try_disconnect().map_err(|e| e.to_string()),
        }
    }
}

/// A subscription: topic filter and QoS level.
#[derive(Debug, Clone)]
pub(super) struct Filter {
    pub(super) path: String,
    pub(super) qos: u8,
}

/// The event loop of either client (not connected yet: polling connects), and the brokers it
/// may connect to: each failed connection moves it to the next (`MQTT_BROKER` lists the nodes
/// of a cluster; with one broker it stays there).
pub struct Connection {
    pub(super) inner: Loop,
    brokers: Brokers,
    /// The broker now used (index into `brokers`).
    current: usize,
}

/// Every broker's client options (the same client id, so that the session follows where the
/// cluster can move it).
enum Brokers {
    V4(Vec<(Endpoint, rumqttc::MqttOptions)>),
    V5(Vec<(Endpoint, rumqttc::v5::MqttOptions)>),
}

impl Brokers {
    fn len(&self) -> usize {
        match self {
            Brokers::V4(b) => b.len(),
            Brokers::V5(b) => b.len(),
        }
    }

    fn endpoint(&self, i: usize) -> &Endpoint {
        match self {
            Brokers::V4(b) => &b[i].0,
            Brokers::V5(b) => &b[i].0,
        }
    }
}

/// Boxed: there is one per client, and the two differ much in size.
pub(super) enum Loop {
    V4(Box<rumqttc::EventLoop>),
    V5(Box<rumqttc::v5::EventLoop>),
}

/// What a poll yielded, whichever the protocol version.
// Nearly every poll yields a publish, and it is moved once: boxing it would only add an
// allocation per message.
#[allow(clippy::large_enum_variant)]
pub(super) enum Polled {
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
pub(super) struct ConnAck {
    pub(super) session_present: bool,
    /// MQTT 5: the session expiry the broker granted, when it set one other than asked.
    pub(super) session_expiry: Option<u32>,
    /// MQTT 5: `shared_subscription_available = 0`.
    pub(super) shared_unavailable: bool,
    /// MQTT 5: how many QoS 1/2 publishes the broker takes from us at once (we send none).
    pub(super) receive_max: Option<u16>,
    /// MQTT 5: the largest packet the broker takes from us.
    pub(super) max_packet_size: Option<u32>,
}

/// A subscription the broker refused.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Refused {
    /// The reason codes, for the log.
    pub(super) codes: String,
    /// MQTT 5 reason code 0x9E: the broker has no shared subscriptions.
    pub(super) shared_unsupported: bool,
}

/// A publish in the parts the intake needs.
pub(super) struct Message {
    pub(super) topic: String,
    pub(super) payload: Bytes,
    /// What to acknowledge; `None` for QoS 0.
    pub(super) ack: Option<Delivery>,
}

impl Connection {
    /// Polls once; an error comes described for an operator (see [`v4::describe`],
    /// [`v5::describe`]; `connected`: whether the broker had answered the CONNECT, since a
    /// broker that cannot speak MQTT 5 fails before that). Polling again after an error
    /// reconnects.
    pub(super) async fn poll(&mut self, connected: bool) -> Result<Polled, String> {
        let polled = match &mut self.inner {
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

    /// The broker now used (or tried).
    pub(super) fn broker(&self) -> &Endpoint {
        self.brokers.endpoint(self.current)
    }

    /// How many brokers there are to try.
    pub(super) fn brokers(&self) -> usize {
        self.brokers.len()
    }

    /// Moves to the next broker of the list (after a failed or lost connection); the next poll
    /// connects there. With one broker, nothing changes.
    pub(super) fn next_broker(&mut self) {
        if self.brokers.len() < 2 {
            return;
        }
        self.current = (self.current + 1) % self.brokers.len();
        match (&mut self.inner, &self.brokers) {
            (Loop::V4(l), Brokers::V4(b)) => l.mqtt_options = b[self.current].1.clone(),
            (Loop::V5(l), Brokers::V5(b)) => l.options = b[self.current].1.clone(),
            // Built together in `parts`: never of different versions.
            _ => {}
        }
    }

    /// After a connection failed, drops what rumqttc keeps of it: publishes it had read but not
    /// yet handed out (MQTT 3.1.1 would hand them out after the next CONNACK, where their packet
    /// ids name other messages), and requests it would send first on the next connection (a
    /// PUBREC or SUBSCRIBE meant for the old one). The broker redelivers those messages, and the
    /// event loop subscribes again on every CONNACK.
    fn forget_the_connection(&mut self) {
        match &mut self.inner {
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
pub(super) fn transport(settings: &MqttSettings) -> Result<Transport, ConfigError> {
    Ok(match &settings.tls {
        Some(tls) => {
            let config = crate::mqtt::tls::mqtt_client_config(tls)?;
            Transport::tls_with_config(TlsConfiguration::Rustls(Arc::new(config)))
        }
        None => Transport::tcp(),
    })
}

/// Operator hints shared by both protocol versions' error descriptions.
pub(super) const BAD_LOGIN: &str =
    "broker refused the login: bad user name or password (check MQTT_USERNAME / MQTT_PASSWORD)";
pub(super) const NOT_AUTHORIZED: &str = "broker refused the connection: not authorized (check MQTT_USERNAME / MQTT_PASSWORD and the broker's ACL)";
pub(super) const BAD_CLIENT_ID: &str = "broker refused the client id (check MQTT_CLIENT_ID)";

pub(super) fn io_refused(io: &std::io::Error) -> Option<String> {
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
pub(super) fn parts(
    settings: &MqttSettings,
    client_id: &str,
    persistent: bool,
    capacity: usize,
) -> Result<(Client, Connection), ConfigError> {
    if settings.brokers.is_empty() {
        return Err(ConfigError {
            var: "MQTT_BROKER".into(),
            problem: "must not be empty".into(),
        });
    }
    let (client, inner, brokers) = match settings.protocol {
        MqttProtocol::V311 => {
            let brokers = settings
                .brokers
                .iter()
                .map(|b| Ok((b.clone(), v4::options(settings, b, client_id, persistent)?)))
                .collect::<Result<Vec<_>, ConfigError>>()?;
            let (client, eventloop) = rumqttc::AsyncClient::new(brokers[0].1.clone(), capacity);
            (
                Client::V4(client),
                Loop::V4(Box::new(eventloop)),
                Brokers::V4(brokers),
            )
        }
        MqttProtocol::V5 => {
            let brokers = settings
                .brokers
                .iter()
                .map(|b| Ok((b.clone(), v5::options(settings, b, client_id, persistent)?)))
                .collect::<Result<Vec<_>, ConfigError>>()?;
            let (client, eventloop) = rumqttc::v5::AsyncClient::new(brokers[0].1.clone(), capacity);
            (
                Client::V5(client),
                Loop::V5(Box::new(eventloop)),
                Brokers::V5(brokers),
            )
        }
    };
    let connection = Connection {
        inner,
        brokers,
        current: 0,
    };
    Ok((client, connection))
}

/// The service's side of the broker before it connects: its client and event loop.
pub struct Link {
    pub(super) client: Client,
    pub(super) connection: Connection,
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
