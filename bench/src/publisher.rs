//! The benchmark's own publisher (rumqttc, QoS 1): backlogs as fast as the broker takes them,
//! and a paced live stream that records each message's publish time.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, Packet, QoS};

use crate::progress::Progress;
use mqtt_ingest::intake::model::TopicKind;

/// Outgoing QoS 1 publishes a connection keeps unacknowledged (rumqttc's own window).
const INFLIGHT: u16 = 10_000;
/// Publishes queued between the feeding task and the event loop.
const REQUEST_CAPACITY: usize = 10_000;

use mqtt_ingest_testkit::generators;
pub use mqtt_ingest_testkit::generators::{Shape, data_topic as topic, payload};

fn connect(port: u16, client_id: &str) -> (AsyncClient, EventLoop) {
    let mut o = MqttOptions::new(client_id, "127.0.0.1", port);
    o.set_clean_session(true)
        .set_keep_alive(Duration::from_secs(30))
        .set_inflight(INFLIGHT)
        .set_max_packet_size(64 * 1024, 64 * 1024);
    AsyncClient::new(o, REQUEST_CAPACITY)
}

/// Polls the event loop until `expected` PubAcks came back (counting them in `acked`) and
/// `feeder` has finished, then disconnects.
async fn drive(
    client: &AsyncClient,
    events: &mut EventLoop,
    feeder: tokio::task::JoinHandle<anyhow::Result<()>>,
    expected: u64,
    acked: &AtomicU64,
) -> anyhow::Result<u64> {
    let mut feeder = Some(feeder);
    let mut n = 0u64;
    loop {
        match events.poll().await.context("publisher connection")? {
            Event::Incoming(Packet::ConnAck(ack))
                if ack.code != rumqttc::ConnectReturnCode::Success =>
            {
                bail!("broker refused the publisher: {:?}", ack.code);
            }
            Event::Incoming(Packet::PubAck(_)) => {
                n += 1;
                acked.fetch_add(1, Relaxed);
            }
            _ => {}
        }
        if feeder.as_ref().is_some_and(|f| f.is_finished())
            && let Some(f) = feeder.take()
        {
            f.await.context("feeder task")??;
        }
        if feeder.is_none() && n >= expected {
            break;
        }
    }
    client.disconnect().await?;
    // Let the DISCONNECT go out; the connection closing afterwards is expected.
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        while let Ok(ev) = events.poll().await {
            if matches!(ev, Event::Outgoing(rumqttc::Outgoing::Disconnect)) {
                break;
            }
        }
    })
    .await;
    Ok(n)
}

/// A backlog to publish: for seq 1..=per_device, for every device, message (device, seq).
pub struct Backlog<'a> {
    pub port: u16,
    /// Client ids are `<id_base>-pub<n>` (clean sessions: nothing stays on the broker).
    pub id_base: &'a str,
    pub prefix: &'a str,
    pub devices: u64,
    pub per_device: u64,
    /// Parallel connections; device d goes over connection d % connections, so each
    /// device's messages stay in order.
    pub connections: usize,
    /// What the messages look like.
    pub shape: Shape,
}

/// Publishes the backlog and returns when the broker has acknowledged every message.
pub async fn backlog(
    b: &Backlog<'_>,
    progress: &Arc<Progress>,
    limit: Duration,
) -> anyhow::Result<Duration> {
    let Backlog {
        port,
        id_base,
        prefix,
        devices,
        per_device,
        connections,
        shape,
    } = *b;
    let started = Instant::now();
    let k = connections.max(1) as u64;
    let mut tasks = Vec::new();
    for c in 0..k.min(devices) {
        let (client, mut events) = connect(port, &format!("{id_base}-pub{c}"));
        let mine: Vec<u64> = (c..devices).step_by(k as usize).collect();
        let expected = mine.len() as u64 * per_device;
        let prefix = prefix.to_owned();
        let feed_client = client.clone();
        let feed_progress = Arc::clone(progress);
        let feeder = tokio::spawn(async move {
            let topics: Vec<String> = mine.iter().map(|&d| topic(&prefix, d)).collect();
            for seq in 1..=per_device {
                for t in &topics {
                    feed_client
                        .publish(t.as_str(), QoS::AtLeastOnce, false, payload(seq, shape))
                        .await?;
                    feed_progress.published.fetch_add(1, Relaxed);
                }
            }
            anyhow::Ok(())
        });
        let progress = Arc::clone(progress);
        tasks.push(tokio::spawn(async move {
            drive(&client, &mut events, feeder, expected, &progress.acked).await
        }));
    }
    let all = async {
        for t in tasks {
            t.await.context("publisher task")??;
        }
        anyhow::Ok(())
    };
    tokio::time::timeout(limit, all)
        .await
        .with_context(|| format!("publishing the backlog took longer than {limit:?}"))??;
    Ok(started.elapsed())
}

/// Publish times of the live stream: `times[d][s - 1]` is when message `s` of device `d` was
/// handed to the client.
pub type PublishLog = Arc<Mutex<Vec<Vec<Instant>>>>;

/// A paced stream: `rate` messages/s for `secs` seconds, round-robin over the devices (message
/// k goes to device k % devices). Data messages carry each device's own seq, 1, 2, …
pub struct Stream {
    pub port: u16,
    pub client_id: String,
    pub prefix: String,
    pub devices: u64,
    pub rate: u64,
    pub secs: u64,
    /// What the messages look like.
    pub shape: Shape,
    /// The firmware's mix instead of data only: a device's messages go through [`MIX`]: data
    /// (the firmware's payload), status and heartbeat in the firmware's proportions.
    pub mix: bool,
}

/// What a device sends in turn with `mix`, in the firmware's proportions per minute: data
/// every 10–30 s (3 a minute on average), a status and a heartbeat every 30 s (2 each).
pub const MIX: [TopicKind; 7] = [
    TopicKind::Data,
    TopicKind::Status,
    TopicKind::Data,
    TopicKind::Heartbeat,
    TopicKind::Data,
    TopicKind::Status,
    TopicKind::Heartbeat,
];

/// Publishes the stream, paced by a 1 ms tick that sends what the schedule says is due (a
/// late tick catches up). Returns the number sent (all acknowledged by the broker) and the
/// time from the first to the last publish.
pub async fn live(
    stream: Stream,
    log: PublishLog,
    progress: &Arc<Progress>,
) -> anyhow::Result<(u64, Duration)> {
    let Stream {
        port,
        client_id,
        prefix,
        devices,
        rate,
        secs,
        shape,
        mix,
    } = stream;
    let client_id = client_id.as_str();
    let prefix = prefix.as_str();
    let total = rate * secs;
    let (client, mut events) = connect(port, client_id);
    let topics: Vec<String> = (0..devices).map(|d| topic(prefix, d)).collect();
    let feed_client = client.clone();
    let feed_prefix = prefix.to_owned();
    let feed_progress = Arc::clone(progress);
    let span = Arc::new(Mutex::new(Duration::ZERO));
    let feed_span = Arc::clone(&span);
    let feeder = tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        let started = Instant::now();
        let mut sent = 0u64;
        // Messages sent to each device so far, and data messages (its seq).
        let mut turns = vec![0u64; devices as usize];
        let mut seqs = vec![0u64; devices as usize];
        while sent < total {
            tick.tick().await;
            let due = ((started.elapsed().as_secs_f64() * rate as f64) as u64).min(total);
            while sent < due {
                let d = (sent % devices) as usize;
                let turn = turns[d];
                turns[d] += 1;
                // The firmware's uptime: a message every few seconds since boot.
                let uptime = turn * 10;
                let kind = if mix {
                    MIX[turn as usize % MIX.len()]
                } else {
                    TopicKind::Data
                };
                let (topic, body) = match kind {
                    TopicKind::Status => (
                        format!("{feed_prefix}/dev{d}/status"),
                        generators::firmware_status(uptime),
                    ),
                    TopicKind::Heartbeat => (
                        format!("{feed_prefix}/dev{d}/heartbeat"),
                        generators::firmware_heartbeat(turn, uptime * 1000),
                    ),
                    TopicKind::Data => {
                        seqs[d] += 1;
                        let shape = if mix { Shape::Firmware } else { shape };
                        log.lock().unwrap_or_else(|e| e.into_inner())[d].push(Instant::now());
                        (topics[d].clone(), payload(seqs[d], shape))
                    }
                };
                feed_client
                    .publish(topic, QoS::AtLeastOnce, false, body)
                    .await?;
                sent += 1;
                feed_progress.published.store(sent, Relaxed);
            }
        }
        *feed_span.lock().unwrap_or_else(|e| e.into_inner()) = started.elapsed();
        anyhow::Ok(())
    });
    let acked = drive(&client, &mut events, feeder, total, &progress.acked);
    let acked = tokio::time::timeout(Duration::from_secs(secs + 60), acked)
        .await
        .context("live publishing did not finish in time")??;
    let span = *span.lock().unwrap_or_else(|e| e.into_inner());
    Ok((acked, span))
}
