//! The devices of the cluster scenarios: publishers spread over the broker nodes, each owning a
//! share of the devices, sending what CodeHubot's ESP32 firmware sends (its format strings:
//! data with `device_id`, `sensor` and an uptime `timestamp`, status, heartbeat), and a ledger
//! of every data message the broker acknowledged.
//!
//! Each data message carries the device's sequence number as sensor `seq`: the check reads it
//! back from `device_main`, `device_sensors` and `device_history`.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rumqttc::{AsyncClient, Event, MqttOptions, Outgoing, Packet, QoS};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use mqtt_ingest_testkit::generators::{FIRMWARE_DEVICE_ID, firmware_heartbeat, firmware_status};
pub use mqtt_ingest_testkit::ledger::Ledger;
use mqtt_ingest_testkit::ledger::PubAcks;

/// How the devices report.
#[derive(Clone, Copy, Debug)]
pub enum Pace {
    /// As the firmware does: data every 10–30 s (each device its own period), status every
    /// 30 s, a heartbeat every 30 s, starting at random offsets.
    Firmware,
    /// Data only, as fast as the brokers take it, `per_device` messages per device.
    Flood { per_device: u64 },
}

#[derive(Default)]
pub struct Counts {
    pub sent: AtomicU64,
    pub acked: AtomicU64,
    pub data_acked: AtomicU64,
    /// Connections made, the first included.
    pub connects: AtomicU64,
}

/// The publishers of one scenario.
pub struct Devices {
    pub counts: Arc<Counts>,
    acked: Arc<Mutex<Vec<(usize, u64)>>>,
    stop: CancellationToken,
    done: Arc<AtomicBool>,
    tasks: Vec<JoinHandle<()>>,
}

impl Devices {
    /// One publisher per broker (`ports`), publisher `k` owning the devices `d` with
    /// `d % ports.len() == k`, on its own node first and the next on a failure.
    pub fn start(ports: &[u16], prefix: &str, devices: usize, pace: Pace, dated: bool) -> Self {
        let counts = Arc::new(Counts::default());
        let acked = Arc::new(Mutex::new(Vec::new()));
        let stop = CancellationToken::new();
        let finished = Arc::new(AtomicU64::new(0));
        let done = Arc::new(AtomicBool::new(false));
        let n = ports.len();
        let tasks = (0..n)
            .map(|k| {
                let mine: Vec<usize> = (0..devices).filter(|d| d % n == k).collect();
                let order: Vec<u16> = (0..n).map(|i| ports[(k + i) % n]).collect();
                tokio::spawn(publish(
                    order,
                    prefix.to_owned(),
                    mine,
                    pace,
                    dated,
                    counts.clone(),
                    acked.clone(),
                    stop.clone(),
                    (finished.clone(), n as u64, done.clone()),
                ))
            })
            .collect();
        Devices {
            counts,
            acked,
            stop,
            done,
            tasks,
        }
    }

    /// Whether a flood has sent and seen acknowledged everything.
    pub fn flood_done(&self) -> bool {
        self.done.load(Relaxed)
    }

    /// Stops sending, waits for what is in flight (at most a minute), returns the ledger.
    pub async fn finish(self) -> Ledger {
        self.stop.cancel();
        for t in self.tasks {
            let _ = tokio::time::timeout(Duration::from_secs(60), t).await;
        }
        Ledger {
            acked: std::mem::take(&mut *self.acked.lock().unwrap()),
            sent: self.counts.sent.load(Relaxed),
            connects: self.counts.connects.load(Relaxed),
        }
    }
}

/// A message to send: topic, payload, and the device and seq of a data message.
type OutMessage = (String, String, Option<(usize, u64)>);

/// A device's next messages (firmware pace).
struct Schedule {
    device: usize,
    seq: u64,
    data_every: Duration,
    next_data: Instant,
    next_status: Instant,
    next_heartbeat: Instant,
}

/// A data message as the firmware formats it; `dated`: with a reading time instead of the uptime
/// (what the docs advise for several instances): a day ago plus `seq` seconds, so that each
/// reading of a device has its own time, in the order of its seq.
fn data(seq: u64, uptime: u64, dated: Option<chrono::DateTime<chrono::Utc>>) -> String {
    let timestamp = if let Some(base) = dated {
        let t = base + chrono::Duration::seconds(seq as i64);
        format!("\"{}\"", t.format("%Y-%m-%dT%H:%M:%SZ"))
    } else {
        uptime.to_string()
    };
    format!(
        "{{\"device_id\":\"{FIRMWARE_DEVICE_ID}\",\"sensor\":\"DHT11\",\"seq\":{seq},\"temperature\":24.3,\"humidity\":55.0,\"timestamp\":{timestamp}}}"
    )
}

#[allow(clippy::too_many_arguments)]
async fn publish(
    ports: Vec<u16>,
    prefix: String,
    devices: Vec<usize>,
    pace: Pace,
    dated: bool,
    counts: Arc<Counts>,
    acked: Arc<Mutex<Vec<(usize, u64)>>>,
    stop: CancellationToken,
    (finished, publishers, done): (Arc<AtomicU64>, u64, Arc<AtomicBool>),
) {
    const WINDOW: usize = 500;
    let started = Instant::now();
    let dated = dated.then(|| chrono::Utc::now() - chrono::Duration::days(1));
    let now = Instant::now();
    let mut schedules: Vec<Schedule> = devices
        .iter()
        .map(|&d| {
            let every = Duration::from_millis(fastrand::u64(10_000..=30_000));
            Schedule {
                device: d,
                seq: 0,
                data_every: every,
                next_data: now + Duration::from_millis(fastrand::u64(0..every.as_millis() as u64)),
                next_status: now + Duration::from_millis(fastrand::u64(0..30_000)),
                next_heartbeat: now + Duration::from_millis(fastrand::u64(0..30_000)),
            }
        })
        .collect();
    // Flood: round after round over the devices.
    let mut flood_next = 0usize;
    let flood_total = match pace {
        Pace::Flood { per_device } => per_device * devices.len() as u64,
        Pace::Firmware => 0,
    };
    let mut flood_sent = 0u64;
    let mut node = 0usize;
    let mut stopping = false;
    let mut reported = false;
    loop {
        let mut opts = MqttOptions::new(
            mqtt_ingest_testkit::unique_name("pub"),
            "127.0.0.1",
            ports[node % ports.len()],
        );
        opts.set_keep_alive(Duration::from_secs(5))
            .set_clean_session(true)
            .set_inflight(WINDOW as u16);
        let (client, mut eventloop) = AsyncClient::new(opts, WINDOW * 2);
        // What was handed to the client, in order: the device and seq of a data message.
        let mut pending: PubAcks<Option<(usize, u64)>> = PubAcks::default();
        let mut connected = false;
        let mut tick = tokio::time::interval(Duration::from_millis(20));
        loop {
            if stopping && pending.pending() == 0 {
                let _ = client.try_disconnect();
                return;
            }
            let flood_over = flood_sent >= flood_total && pending.pending() == 0;
            if !reported && flood_total > 0 && flood_over {
                reported = true;
                if finished.fetch_add(1, Relaxed) + 1 == publishers {
                    done.store(true, Relaxed);
                }
            }
            tokio::select! {
                event = eventloop.poll() => match event {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        connected = true;
                        counts.connects.fetch_add(1, Relaxed);
                    }
                    Ok(Event::Outgoing(Outgoing::Publish(pkid))) => pending.sent(pkid),
                    Ok(Event::Incoming(Packet::PubAck(ack))) => {
                        if let Some(m) = pending.acked(ack.pkid) {
                            counts.acked.fetch_add(1, Relaxed);
                            if let Some(m) = m {
                                counts.data_acked.fetch_add(1, Relaxed);
                                acked.lock().unwrap().push(m);
                            }
                        }
                    }
                    Ok(_) => {}
                    Err(_) => break,
                },
                _ = tick.tick(), if connected && !stopping => {
                    let uptime = started.elapsed().as_secs();
                    let room = WINDOW.saturating_sub(pending.pending());
                    let mut out: Vec<OutMessage> = Vec::new();
                    match pace {
                        Pace::Flood { .. } => {
                            while out.len() < room && flood_sent < flood_total {
                                let count = schedules.len();
                                let s = &mut schedules[flood_next];
                                flood_next = (flood_next + 1) % count;
                                out.push((
                                    format!("{prefix}/dev{}/data", s.device),
                                    data(s.seq, uptime, dated),
                                    Some((s.device, s.seq)),
                                ));
                                s.seq += 1;
                                flood_sent += 1;
                            }
                        }
                        Pace::Firmware => {
                            let now = Instant::now();
                            for s in schedules.iter_mut() {
                                if out.len() >= room {
                                    break;
                                }
                                if s.next_data <= now {
                                    out.push((
                                        format!("{prefix}/dev{}/data", s.device),
                                        data(s.seq, uptime, dated),
                                        Some((s.device, s.seq)),
                                    ));
                                    s.seq += 1;
                                    s.next_data += s.data_every;
                                }
                                if s.next_status <= now {
                                    out.push((format!("{prefix}/dev{}/status", s.device), firmware_status(uptime), None));
                                    s.next_status += Duration::from_secs(30);
                                }
                                if s.next_heartbeat <= now {
                                    out.push((
                                        format!("{prefix}/dev{}/heartbeat", s.device),
                                        firmware_heartbeat(s.seq, uptime),
                                        None,
                                    ));
                                    s.next_heartbeat += Duration::from_secs(30);
                                }
                            }
                        }
                    }
                    for (topic, payload, m) in out {
                        if client.try_publish(topic, QoS::AtLeastOnce, false, payload).is_err() {
                            // The channel is full; the message is not sent (a flood's
                            // device moves on: its seq is not acknowledged, so not checked).
                            break;
                        }
                        pending.handed(m);
                        counts.sent.fetch_add(1, Relaxed);
                    }
                }
                _ = stop.cancelled(), if !stopping => stopping = true,
            }
        }
        if stopping {
            return;
        }
        // The node is gone or dropped us: what was in flight is not acknowledged; on to the
        // next node.
        node += 1;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
