//! The publisher-side ledger and the checker for the fault tests (issue 4).
//!
//! [`LedgerPublisher`] publishes `{"seq": S, "timestamp": T}` to `PREFIX/dev{i}/data` at a
//! steady rate, round-robin over the devices, each device's `seq` counting up and `T` = a base
//! time + `S` seconds (so every reading has its own history row). It records every message the
//! broker acknowledged (PUBACK) as `(device, seq)`. On a connection error it drops the client and
//! starts a new one: what was in flight then is "not acknowledged" (it may or may not arrive).
//!
//! [`Sampler`] reads every device's stored `seq` every 100 ms and records any that went down.
//! [`check`] proves, once the last acknowledged message of each device has landed, that every
//! acknowledged reading is in `device_history` (the service runs with `HISTORY_ENABLED=true`)
//! and the final state is the last acknowledged one.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rumqttc::{AsyncClient, Event, MqttOptions, Outgoing, Packet, QoS};
use sqlx::{MySqlPool, Row as _};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::generators::{dated_payload as payload, device};
use crate::{MQTT_HOST, unique_name, wait_until_named};

/// Settings every ledger test gives the service: history on (the proof of every reading) and
/// kept forever (the readings are dated 2026-01-01 on).
pub const SERVICE_VARS: &[(&str, &str)] = &[
    ("HISTORY_ENABLED", "true"),
    ("HISTORY_RETENTION_DAYS", "0"),
    ("PRESENCE_TIMEOUT_SECS", "0"),
];

#[derive(Default)]
pub struct Counts {
    /// Messages handed to the client.
    pub sent: AtomicU64,
    /// Messages the broker acknowledged.
    pub acked: AtomicU64,
    /// Connections made (the first included).
    pub connects: AtomicU64,
}

pub struct LedgerPublisher {
    pub counts: Arc<Counts>,
    acked: Arc<Mutex<Vec<(usize, u64)>>>,
    stop: CancellationToken,
    paused: Arc<AtomicBool>,
    task: JoinHandle<()>,
}

/// What the publisher ended with.
pub struct Ledger {
    /// Every acknowledged (device index, seq), in acknowledgement order.
    pub acked: Vec<(usize, u64)>,
    /// Messages sent in all.
    pub sent: u64,
    pub connects: u64,
}

impl Ledger {
    /// The last acknowledged seq of each device.
    pub fn last(&self) -> BTreeMap<usize, u64> {
        let mut m = BTreeMap::new();
        for &(d, s) in &self.acked {
            let e = m.entry(d).or_insert(s);
            *e = (*e).max(s);
        }
        m
    }
}

impl LedgerPublisher {
    /// Starts publishing `rate` messages a second over `devices` devices under `prefix`.
    pub fn start(port: u16, prefix: &str, devices: usize, rate: u64) -> Self {
        Self::start_limited(port, prefix, devices, rate, u64::MAX)
    }

    /// As [`start`](Self::start), sending at most `limit` messages.
    pub fn start_limited(port: u16, prefix: &str, devices: usize, rate: u64, limit: u64) -> Self {
        let counts = Arc::new(Counts::default());
        let acked = Arc::new(Mutex::new(Vec::new()));
        let stop = CancellationToken::new();
        let paused = Arc::new(AtomicBool::new(false));
        let task = tokio::spawn(run(
            port,
            prefix.to_owned(),
            devices,
            rate,
            limit,
            counts.clone(),
            acked.clone(),
            stop.clone(),
            paused.clone(),
        ));
        LedgerPublisher {
            counts,
            acked,
            stop,
            paused,
            task,
        }
    }

    pub fn sent(&self) -> u64 {
        self.counts.sent.load(Relaxed)
    }

    pub fn acked(&self) -> u64 {
        self.counts.acked.load(Relaxed)
    }

    /// Stops sending new messages (what is in flight still completes).
    pub fn pause(&self, paused: bool) {
        self.paused.store(paused, Relaxed);
    }

    /// Waits until at least `n` more messages were acknowledged.
    pub async fn wait_acked(&self, more: u64, timeout: Duration) {
        let target = self.acked() + more;
        let counts = self.counts.clone();
        wait_until_named(
            &format!("the broker to acknowledge {target} messages"),
            timeout,
            Duration::from_millis(20),
            async || counts.acked.load(Relaxed) >= target,
        )
        .await
        .unwrap();
    }

    /// Stops sending, waits for what is in flight (or gives up on it after 30 s), returns the
    /// ledger.
    pub async fn finish(self) -> Ledger {
        self.stop.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(60), self.task).await;
        let acked = std::mem::take(&mut *self.acked.lock().unwrap());
        Ledger {
            acked,
            sent: self.counts.sent.load(Relaxed),
            connects: self.counts.connects.load(Relaxed),
        }
    }
}

/// What a publisher handed to its rumqttc client and what the broker acknowledged: rumqttc
/// names a publish's packet id only when it goes out (`Outgoing::Publish`), in the order the
/// publishes were handed over, so each message waits in `queued` until then, and in
/// `in_flight` under its packet id until its PUBACK.
pub struct PubAcks<T> {
    queued: VecDeque<T>,
    in_flight: HashMap<u16, T>,
}

impl<T> Default for PubAcks<T> {
    fn default() -> Self {
        Self {
            queued: VecDeque::new(),
            in_flight: HashMap::new(),
        }
    }
}

impl<T> PubAcks<T> {
    /// A message handed to the client.
    pub fn handed(&mut self, m: T) {
        self.queued.push_back(m);
    }

    /// The client sent the next handed message under `pkid`.
    pub fn sent(&mut self, pkid: u16) {
        if let Some(m) = self.queued.pop_front() {
            self.in_flight.insert(pkid, m);
        }
    }

    /// The broker acknowledged `pkid`: the message, if it was ours.
    pub fn acked(&mut self, pkid: u16) -> Option<T> {
        self.in_flight.remove(&pkid)
    }

    /// Messages handed and not yet acknowledged.
    pub fn pending(&self) -> usize {
        self.queued.len() + self.in_flight.len()
    }
}

#[allow(clippy::too_many_arguments)]
async fn run(
    port: u16,
    prefix: String,
    devices: usize,
    rate: u64,
    limit: u64,
    counts: Arc<Counts>,
    acked: Arc<Mutex<Vec<(usize, u64)>>>,
    stop: CancellationToken,
    paused: Arc<AtomicBool>,
) {
    const WINDOW: usize = 200;
    const TICK: Duration = Duration::from_millis(10);
    let mut next_seq = vec![0u64; devices];
    let mut next_device = 0usize;
    // Fractional messages per tick carried over.
    let mut credit = 0f64;
    let per_tick = rate as f64 * TICK.as_secs_f64();
    let mut stopping = false;
    loop {
        let mut opts = MqttOptions::new(unique_name("led"), MQTT_HOST, port);
        opts.set_keep_alive(Duration::from_secs(5))
            .set_clean_session(true)
            .set_inflight(WINDOW as u16);
        let (client, mut eventloop) = AsyncClient::new(opts, WINDOW * 2);
        let mut pending: PubAcks<(usize, u64)> = PubAcks::default();
        let mut connected = false;
        let mut tick = tokio::time::interval(TICK);
        loop {
            if stopping && pending.pending() == 0 && connected {
                let _ = client.try_disconnect();
                let _ = tokio::time::timeout(Duration::from_secs(2), async {
                    while let Ok(e) = eventloop.poll().await {
                        if matches!(e, Event::Outgoing(Outgoing::Disconnect)) {
                            break;
                        }
                    }
                })
                .await;
                return;
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
                            acked.lock().unwrap().push(m);
                            counts.acked.fetch_add(1, Relaxed);
                        }
                    }
                    Ok(_) => {}
                    Err(_) => break,
                },
                _ = tick.tick(), if connected && !stopping && !paused.load(Relaxed) => {
                    credit += per_tick;
                    while credit >= 1.0
                        && pending.pending() < WINDOW
                        && counts.sent.load(Relaxed) < limit
                    {
                        credit -= 1.0;
                        let d = next_device;
                        next_device = (next_device + 1) % devices;
                        let seq = next_seq[d];
                        let topic = format!("{prefix}/{}/data", device(d));
                        if client.try_publish(topic, QoS::AtLeastOnce, false, payload(seq)).is_err() {
                            break;
                        }
                        next_seq[d] += 1;
                        pending.handed((d, seq));
                        counts.sent.fetch_add(1, Relaxed);
                    }
                    // Do not bank credit while the window is full.
                    credit = credit.min(per_tick.max(1.0));
                }
                _ = stop.cancelled(), if !stopping => stopping = true,
            }
        }
        // The connection failed: what was queued or in flight is not acknowledged.
        if stopping {
            return;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Every device's stored `seq` (devices without one are left out).
pub async fn stored_seqs(pool: &MySqlPool) -> anyhow::Result<BTreeMap<String, u64>> {
    let rows = sqlx::query(
        "SELECT uuid, CAST(JSON_VALUE(last_report_data, '$.sensors.seq.value') AS UNSIGNED) AS s \
         FROM device_main",
    )
    .fetch_all(pool)
    .await?;
    let mut out = BTreeMap::new();
    for r in rows {
        if let Some(s) = r.try_get::<Option<u64>, _>("s")? {
            out.insert(r.try_get("uuid")?, s);
        }
    }
    Ok(out)
}

/// Samples stored seqs in the background and notes any device whose seq went down.
pub struct Sampler {
    stop: CancellationToken,
    task: JoinHandle<(u64, Vec<String>)>,
}

impl Sampler {
    pub fn start(pool: MySqlPool) -> Self {
        let stop = CancellationToken::new();
        let s = stop.clone();
        let task = tokio::spawn(async move {
            let mut seen: BTreeMap<String, u64> = BTreeMap::new();
            let mut backwards = Vec::new();
            let mut samples = 0u64;
            while !s.is_cancelled() {
                // The database may be down: a failed sample is just skipped.
                if let Ok(Ok(now)) =
                    tokio::time::timeout(Duration::from_secs(2), stored_seqs(&pool)).await
                {
                    samples += 1;
                    for (dev, seq) in now {
                        let prev = seen.entry(dev.clone()).or_insert(seq);
                        if seq < *prev {
                            backwards.push(format!("{dev}: {prev} -> {seq}"));
                        }
                        *prev = (*prev).max(seq);
                    }
                }
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                    _ = s.cancelled() => {}
                }
            }
            (samples, backwards)
        });
        Sampler { stop, task }
    }

    /// Stops and returns (samples taken, devices that went backwards).
    pub async fn finish(self) -> (u64, Vec<String>) {
        self.stop.cancel();
        self.task.await.expect("sampler")
    }
}

/// What the checker found.
#[derive(Debug)]
pub struct Verdict {
    pub acked: usize,
    /// Acknowledged readings with no history row (lost).
    pub lost: Vec<(usize, u64)>,
    /// History rows of readings (device, seq) in all.
    pub history_rows: usize,
}

/// Waits until every device's stored seq is its last acknowledged one, then compares the
/// ledger with `device_history`. Panics if the final state is not reached in `timeout`.
pub async fn check(pool: &MySqlPool, ledger: &Ledger, timeout: Duration) -> Verdict {
    let last = ledger.last();
    wait_until_named(
        "every device to reach its last acknowledged seq",
        timeout,
        Duration::from_millis(200),
        async || {
            let stored = stored_seqs(pool).await?;
            let behind: Vec<String> = last
                .iter()
                .filter(|(d, s)| stored.get(&device(**d)) != Some(*s))
                .map(|(d, s)| format!("{}: {:?} of {s}", device(*d), stored.get(&device(*d))))
                .collect();
            if behind.is_empty() {
                Ok(true)
            } else {
                anyhow::bail!(
                    "{} behind, e.g. {:?}",
                    behind.len(),
                    &behind[..behind.len().min(5)]
                )
            }
        },
    )
    .await
    .unwrap();
    let rows = sqlx::query(
        "SELECT device_uuid, CAST(value AS UNSIGNED) AS v FROM device_history WHERE sensor = 'seq'",
    )
    .fetch_all(pool)
    .await
    .expect("read device_history");
    let mut history = BTreeSet::new();
    for r in &rows {
        let d: String = r.try_get("device_uuid").unwrap();
        let v: u64 = r.try_get("v").unwrap();
        history.insert((d, v));
    }
    let lost = ledger
        .acked
        .iter()
        .filter(|(d, s)| !history.contains(&(device(*d), *s)))
        .copied()
        .collect();
    Verdict {
        acked: ledger.acked.len(),
        lost,
        history_rows: rows.len(),
    }
}
