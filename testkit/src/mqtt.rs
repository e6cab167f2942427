//! MQTT client helpers (rumqttc, MQTT 3.1.1) for publishing test input and
//! observing what a broker delivers.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use rumqttc::{
    AsyncClient, ConnectionError, Event, EventLoop, MqttOptions, Outgoing, Packet, QoS,
    SubscribeReasonCode,
};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::unique_name;
use super::wait::wait_until_named;

/// Host of all brokers used by the tests.
pub const MQTT_HOST: &str = "127.0.0.1";

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const DISCONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const MAX_PACKET: usize = 16 * 1024 * 1024;

/// Port of the shared broker: `TEST_MQTT_PORT`, default 1883.
pub fn shared_mqtt_port() -> u16 {
    std::env::var("TEST_MQTT_PORT")
        .ok()
        .and_then(|p| p.parse().ok())
        .unwrap_or(1883)
}

fn options(client_id: &str, port: u16, clean_session: bool) -> MqttOptions {
    let mut opts = MqttOptions::new(client_id, MQTT_HOST, port);
    opts.set_keep_alive(Duration::from_secs(30))
        .set_clean_session(clean_session)
        .set_max_packet_size(MAX_PACKET, MAX_PACKET);
    opts
}

fn broker_error(port: u16, e: ConnectionError) -> anyhow::Error {
    anyhow::anyhow!("MQTT connection to {MQTT_HOST}:{port} failed: {e}")
}

/// Sends DISCONNECT and polls until it has been written out.
async fn disconnect(
    client: &AsyncClient,
    eventloop: &mut EventLoop,
    port: u16,
) -> anyhow::Result<()> {
    client.disconnect().await.context("queueing DISCONNECT")?;
    let flush = async {
        loop {
            match eventloop.poll().await {
                Ok(Event::Outgoing(Outgoing::Disconnect)) => return Ok(()),
                Ok(_) => {}
                Err(e) => return Err(broker_error(port, e)),
            }
        }
    };
    tokio::time::timeout(DISCONNECT_TIMEOUT, flush)
        .await
        .context("timed out sending DISCONNECT")?
}

/// Publishes one message from a fresh client (clean session) and disconnects
/// cleanly. For QoS 1/2 it returns only once the broker has acknowledged
/// (PUBACK / PUBCOMP), i.e. the broker has the message; for QoS 0 once the
/// message and the DISCONNECT after it are written to the socket.
pub async fn mqtt_publish(
    port: u16,
    topic: &str,
    payload: impl Into<Vec<u8>>,
    qos: QoS,
) -> anyhow::Result<()> {
    publish_many(port, [(topic, payload.into())], qos).await
}

/// Publishes all `messages` (in order, not retained) from one fresh client,
/// up to 1000 in flight (20 for QoS 2), and waits for every acknowledgement (see
/// [`mqtt_publish`]). Times out after 30 s + 1 ms per message.
pub async fn publish_many<T, P>(
    port: u16,
    messages: impl IntoIterator<Item = (T, P)>,
    qos: QoS,
) -> anyhow::Result<()>
where
    T: Into<String>,
    P: Into<Vec<u8>>,
{
    let messages: Vec<(String, Vec<u8>)> = messages
        .into_iter()
        .map(|(t, p)| (t.into(), p.into()))
        .collect();
    let total = messages.len();
    if total == 0 {
        return Ok(());
    }
    let mut opts = options(&unique_name("pub"), port, true);
    // Mosquitto (v3.1.1 clients) holds an incoming QoS 2 message until its
    // PUBREL and silently drops any beyond `max_inflight_messages` (default
    // 20) while still completing the handshake: stay within that for QoS 2.
    opts.set_inflight(if qos == QoS::ExactlyOnce { 20 } else { 1000 });
    let (client, mut eventloop) = AsyncClient::new(opts, 1000);

    // The event loop only makes progress while polled, so requests are fed
    // from a separate task while this one polls.
    let feeder_client = client.clone();
    let feeder = tokio::spawn(async move {
        for (topic, payload) in messages {
            if feeder_client
                .publish(topic, qos, false, payload)
                .await
                .is_err()
            {
                break; // event loop gone; the poller reports why
            }
        }
    });

    let mut done = 0usize;
    let run = async {
        while done < total {
            let event = eventloop.poll().await.map_err(|e| broker_error(port, e))?;
            // What tells that one message is done depends on the QoS.
            if matches!(
                (qos, event),
                (QoS::AtMostOnce, Event::Outgoing(Outgoing::Publish(_)))
                    | (QoS::AtLeastOnce, Event::Incoming(Packet::PubAck(_)))
                    | (QoS::ExactlyOnce, Event::Incoming(Packet::PubComp(_)))
            ) {
                done += 1;
            }
        }
        disconnect(&client, &mut eventloop, port).await
    };
    let limit = Duration::from_secs(30) + Duration::from_millis(total as u64);
    let result = tokio::time::timeout(limit, run).await;
    feeder.abort();
    match result {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(e.context(format!(
            "publishing {total} message(s) at {qos:?}: {done} acknowledged"
        ))),
        Err(_) => anyhow::bail!(
            "publishing {total} message(s) at {qos:?} to {MQTT_HOST}:{port}: timed out after \
             {limit:?} with {done} acknowledged"
        ),
    }
}

/// Removes the broker's persistent session of `client_id` (subscriptions and
/// queued messages) by connecting once with clean session and disconnecting.
/// A client currently connected with that id is kicked off by the broker.
pub async fn clear_session(port: u16, client_id: &str) -> anyhow::Result<()> {
    let (client, mut eventloop) = AsyncClient::new(options(client_id, port, true), 10);
    let run = async {
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => break,
                Ok(_) => {}
                Err(e) => return Err(broker_error(port, e)),
            }
        }
        disconnect(&client, &mut eventloop, port).await
    };
    tokio::time::timeout(CONNECT_TIMEOUT + DISCONNECT_TIMEOUT, run)
        .await
        .context("timed out")
        .and_then(|r| r)
        .with_context(|| format!("clearing the MQTT session of {client_id}"))
}

/// A message delivered to a [`TestSubscriber`].
#[derive(Debug, Clone)]
pub struct ReceivedMessage {
    pub topic: String,
    pub payload: Vec<u8>,
    pub qos: QoS,
}

impl ReceivedMessage {
    pub fn payload_str(&self) -> String {
        String::from_utf8_lossy(&self.payload).into_owned()
    }

    pub fn json(&self) -> anyhow::Result<serde_json::Value> {
        serde_json::from_slice(&self.payload).with_context(|| {
            format!(
                "payload on {} is not JSON: {}",
                self.topic,
                self.payload_str()
            )
        })
    }
}

#[derive(Default)]
struct SubscriberState {
    ever_connected: bool,
    connected: bool,
    session_present: bool,
    granted: Vec<SubscribeReasonCode>,
    last_error: Option<String>,
    stopping: bool,
    finished: bool,
}

/// An MQTT client that collects the messages the broker delivers to it.
///
/// Acknowledges QoS 1/2 deliveries automatically. After a connection loss it
/// reconnects every 200 ms (a persistent session then resumes; with a clean
/// session the subscriptions are gone). Dropping it just closes the socket
/// (no DISCONNECT); use [`disconnect`](Self::disconnect) for a clean one.
pub struct TestSubscriber {
    client_id: String,
    port: u16,
    client: AsyncClient,
    messages: mpsc::UnboundedReceiver<ReceivedMessage>,
    state: Arc<Mutex<SubscriberState>>,
    task: JoinHandle<()>,
}

impl TestSubscriber {
    /// Connects as `client_id` and subscribes to `topics`, returning once the
    /// broker has acknowledged the connection and every subscription (so
    /// messages published afterwards are delivered). `topics` may be empty,
    /// e.g. to resume a persistent session (`clean_session = false`).
    pub async fn connect(
        port: u16,
        client_id: &str,
        clean_session: bool,
        topics: &[(&str, QoS)],
    ) -> anyhow::Result<Self> {
        let (client, eventloop) =
            AsyncClient::new(options(client_id, port, clean_session), topics.len() + 100);
        let (tx, messages) = mpsc::unbounded_channel();
        let state = Arc::new(Mutex::new(SubscriberState::default()));
        let task = tokio::spawn(drive(eventloop, tx, state.clone()));
        let subscriber = TestSubscriber {
            client_id: client_id.to_string(),
            port,
            client,
            messages,
            state,
            task,
        };
        for (topic, qos) in topics {
            subscriber
                .client
                .subscribe(*topic, *qos)
                .await
                .context("queueing SUBSCRIBE")?;
        }

        let wanted = topics.len();
        let what =
            format!("MQTT client {client_id} to connect to port {port} and get {wanted} SUBACK(s)");
        wait_until_named(
            &what,
            CONNECT_TIMEOUT,
            Duration::from_millis(10),
            async || {
                let s = subscriber.lock();
                if s.finished {
                    // Not retried: the first connection attempt failed.
                    return Ok(Some(Err(format!(
                        "connection failed: {}",
                        s.last_error.as_deref().unwrap_or("?")
                    ))));
                }
                if s.ever_connected && s.granted.len() >= wanted {
                    return Ok(Some(Ok(())));
                }
                anyhow::bail!(
                    "connected: {}, SUBACKs: {}/{wanted}, last error: {:?}",
                    s.connected,
                    s.granted.len(),
                    s.last_error
                )
            },
        )
        .await?
        .map_err(|e| anyhow::anyhow!("MQTT client {client_id} on port {port}: {e}"))?;

        if let Some(i) = subscriber
            .lock()
            .granted
            .iter()
            .position(|g| matches!(g, SubscribeReasonCode::Failure))
        {
            anyhow::bail!("the broker refused the subscription to {:?}", topics[i].0);
        }
        Ok(subscriber)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, SubscriberState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The session-present flag of the latest CONNACK.
    pub fn session_present(&self) -> bool {
        self.lock().session_present
    }

    pub fn is_connected(&self) -> bool {
        self.lock().connected
    }

    /// The next delivered message, waiting up to `timeout`.
    pub async fn recv(&mut self, timeout: Duration) -> anyhow::Result<ReceivedMessage> {
        match tokio::time::timeout(timeout, self.messages.recv()).await {
            Ok(Some(message)) => Ok(message),
            Ok(None) => anyhow::bail!("{}: the event loop has stopped", self.describe()),
            Err(_) => anyhow::bail!("{}: no message within {timeout:?}", self.describe()),
        }
    }

    /// The next `n` delivered messages, all within `timeout`.
    pub async fn recv_many(
        &mut self,
        n: usize,
        timeout: Duration,
    ) -> anyhow::Result<Vec<ReceivedMessage>> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut out = Vec::with_capacity(n);
        while out.len() < n {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let message = self
                .recv(left)
                .await
                .with_context(|| format!("got {} of {n} messages", out.len()))?;
            out.push(message);
        }
        Ok(out)
    }

    /// Sends DISCONNECT (a persistent session is kept by the broker) and stops.
    pub async fn disconnect(mut self) -> anyhow::Result<()> {
        self.lock().stopping = true;
        let _ = self.client.try_disconnect();
        let done = tokio::time::timeout(DISCONNECT_TIMEOUT, &mut self.task).await;
        match done {
            Ok(_) if self.lock().connected => Ok(()),
            Ok(_) => anyhow::bail!("{}: stopped without a clean DISCONNECT", self.describe()),
            Err(_) => anyhow::bail!("{}: DISCONNECT timed out", self.describe()),
        }
    }

    fn describe(&self) -> String {
        let s = self.lock();
        format!(
            "MQTT subscriber {} on port {} (connected: {}, last error: {:?})",
            self.client_id, self.port, s.connected, s.last_error
        )
    }
}

impl Drop for TestSubscriber {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn drive(
    mut eventloop: EventLoop,
    tx: mpsc::UnboundedSender<ReceivedMessage>,
    state: Arc<Mutex<SubscriberState>>,
) {
    let lock = || state.lock().unwrap_or_else(|e| e.into_inner());
    loop {
        match eventloop.poll().await {
            Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                let mut s = lock();
                s.ever_connected = true;
                s.connected = true;
                s.session_present = ack.session_present;
            }
            Ok(Event::Incoming(Packet::SubAck(ack))) => {
                lock().granted.extend(ack.return_codes);
            }
            Ok(Event::Incoming(Packet::Publish(p))) => {
                let _ = tx.send(ReceivedMessage {
                    topic: p.topic,
                    payload: p.payload.to_vec(),
                    qos: p.qos,
                });
            }
            // Written out: done. `connected` stays true to tell a clean end.
            Ok(Event::Outgoing(Outgoing::Disconnect)) => break,
            Ok(_) => {}
            Err(e) => {
                let give_up = {
                    let mut s = lock();
                    s.connected = false;
                    s.last_error = Some(e.to_string());
                    s.stopping || !s.ever_connected
                };
                if give_up {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
    lock().finished = true;
}
