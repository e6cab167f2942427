//! Faults under a steady stream, with a publisher-side ledger (issue 4). Each test runs its own
//! private Mosquitto (and MariaDB where it kills it), publishes at a steady rate while the
//! fault happens, and then proves with `crate::ledger::check`:
//!
//! * every message the broker acknowledged reached the table (a `device_history` row each);
//! * every device ends at its last acknowledged seq, and no sample of the table ever saw a
//!   device's seq go down (no rollback);
//! * the service's counters add up: received = succeeded + failed, failed = 0.
//!
//! The long ones (a 2-minute database outage with memory sampling) are `#[ignore]`d and run by
//! `scripts/fault-db-outage.sh`.

use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::app::{Running, ServiceProcess, Target, migrate, register, spawn_service};
use crate::common::{PrivateMariaDb, PrivateMosquitto, TestDb, clear_session, wait_until_named};
use crate::common::{last_logged_counter, rss_kib};
use crate::ledger::{Ledger, LedgerPublisher, Sampler, Verdict, check};
use sqlx::MySqlPool;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

const DEVICES: usize = 20;
const RATE: u64 = 200;

async fn prepare(db: &TestDb) -> MySqlPool {
    let pool = db.pool();
    migrate(&pool).await;
    for d in 0..DEVICES {
        register(&pool, &crate::common::generators::device(d)).await;
    }
    pool
}

fn target(db: &TestDb, mqtt_port: u16) -> Target {
    let mut t = Target::new(db, mqtt_port);
    for (k, v) in crate::ledger::SERVICE_VARS {
        t = t.with(k, v);
    }
    t
}

/// The common end of every scenario: stop the publisher, wait for the table, check.
async fn verify(
    pool: &MySqlPool,
    publisher: LedgerPublisher,
    sampler: Sampler,
    timeout: Duration,
) -> (Ledger, Verdict) {
    let ledger = publisher.finish().await;
    let verdict = check(pool, &ledger, timeout).await;
    let (samples, backwards) = sampler.finish().await;
    eprintln!(
        "[ledger] sent {}, acknowledged {}, publisher connections {}, history rows {}, lost {}, samples {samples}",
        ledger.sent,
        verdict.acked,
        ledger.connects,
        verdict.history_rows,
        verdict.lost.len()
    );
    assert!(samples > 10, "the sampler hardly ran ({samples} samples)");
    assert!(backwards.is_empty(), "state went backwards: {backwards:?}");
    (ledger, verdict)
}

fn assert_no_loss(verdict: &Verdict) {
    assert!(
        verdict.lost.is_empty(),
        "{} acknowledged readings never reached the table, e.g. {:?}",
        verdict.lost.len(),
        &verdict.lost[..verdict.lost.len().min(10)]
    );
}

/// In-process service: received = succeeded + failed, nothing rejected.
async fn assert_counters(service: Running) {
    let stats = service.stats.clone();
    wait_until_named(
        "the service's queue to empty",
        Duration::from_secs(30),
        Duration::from_millis(50),
        async || {
            let s = stats.snapshot();
            s.received == s.succeeded + s.failed
        },
    )
    .await
    .unwrap();
    let s = stats.snapshot();
    eprintln!(
        "[service] received {}, succeeded {}, failed {}, db errors {}, reconnects {}",
        s.received, s.succeeded, s.failed, s.db_errors, s.reconnects
    );
    assert_eq!(s.failed, 0, "nothing is rejected");
    service.stop().await.unwrap();
}

/// (a) MariaDB `kill -9` mid-stream, restarted after 12 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mariadb_sigkill_mid_stream_loses_nothing() {
    let broker = PrivateMosquitto::start().await;
    let mut mariadb = PrivateMariaDb::start().await;
    let db = TestDb::on(mariadb.host(), mariadb.port()).await;
    let pool = prepare(&db).await;
    let t = target(&db, broker.port());
    let service = spawn_service(&t).await;
    let sampler = Sampler::start(pool.clone());
    let publisher = LedgerPublisher::start(broker.port(), &t.prefix, DEVICES, RATE);
    publisher.wait_acked(400, Duration::from_secs(30)).await;

    mariadb.kill().await;
    let errors_before = service.stats.snapshot().db_errors;
    let down = Instant::now();
    let stats = service.stats.clone();
    wait_until_named(
        "failed write attempts while the database is down",
        Duration::from_secs(10),
        Duration::from_millis(50),
        async || stats.snapshot().db_errors > errors_before,
    )
    .await
    .unwrap();
    // The fault's length (12 s down), not a wait for an event.
    tokio::time::sleep(Duration::from_secs(12).saturating_sub(down.elapsed())).await;
    let s = service.stats.snapshot();
    assert!(s.connected && s.subscribed, "the MQTT side stays up: {s:?}");
    eprintln!(
        "[outage] db errors during 12 s down: {}",
        s.db_errors - errors_before
    );
    mariadb.restart().await;
    publisher.wait_acked(400, Duration::from_secs(30)).await;

    let (_, verdict) = verify(&pool, publisher, sampler, Duration::from_secs(60)).await;
    assert_no_loss(&verdict);
    assert_counters(service).await;
}

/// (c) The service `kill -9`ed under load, five times: the broker redelivers what was not
/// acknowledged (some of it committed already); no duplicate effect, no rollback.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn service_sigkill_under_load_redeliveries_are_absorbed() {
    let broker = PrivateMosquitto::start().await;
    let db = TestDb::new().await;
    let pool = prepare(&db).await;
    // Small batches: more commits, so more kills land between a commit and its acks.
    let t = target(&db, broker.port()).with("INGEST_BATCH_MAX_MESSAGES", "10");
    let mut process = ServiceProcess::start(&t).await;
    let sampler = Sampler::start(pool.clone());
    let publisher = LedgerPublisher::start(broker.port(), &t.prefix, DEVICES, 300);
    for round in 0..5 {
        publisher
            .wait_acked(150 + 50 * round, Duration::from_secs(30))
            .await;
        process.signal("KILL");
        process.wait_exit(Duration::from_secs(10)).await;
        process = ServiceProcess::start(&t).await;
    }
    publisher.wait_acked(300, Duration::from_secs(30)).await;
    let (_, verdict) = verify(&pool, publisher, sampler, Duration::from_secs(60)).await;
    assert_no_loss(&verdict);
    // No duplicate effect: one history row per distinct reading.
    let rows: Vec<(String, u64, i64)> = sqlx::query_as(
        "SELECT device_uuid, CAST(value AS UNSIGNED), COUNT(*) FROM device_history \
         WHERE sensor = 'seq' GROUP BY device_uuid, value HAVING COUNT(*) > 1",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert!(rows.is_empty(), "duplicate history rows: {rows:?}");

    process.signal("TERM");
    assert_eq!(process.wait_exit(Duration::from_secs(40)).await, Some(0));
    // The exit can be seen before the last lines of output are read: wait for the block's end.
    process
        .wait_for_log("db errors:", Duration::from_secs(10))
        .await;
    let log = process.log();
    let (total, succeeded, failed) = (
        last_logged_counter(&log, "total").unwrap(),
        last_logged_counter(&log, "succeeded").unwrap(),
        last_logged_counter(&log, "failed").unwrap(),
    );
    eprintln!("[service] last process: total {total}, succeeded {succeeded}, failed {failed}");
    assert_eq!(total, succeeded + failed);
    assert_eq!(failed, 0);
    clear_session(t.mqtt_port, &t.client_id).await.unwrap();
}

/// (d) The broker stopped cleanly and started again (persistence on): no loss at all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_restart_with_persistence_loses_nothing() {
    let mut broker = PrivateMosquitto::start().await;
    let db = TestDb::new().await;
    let pool = prepare(&db).await;
    let t = target(&db, broker.port());
    let service = spawn_service(&t).await;
    let sampler = Sampler::start(pool.clone());
    let publisher = LedgerPublisher::start(broker.port(), &t.prefix, DEVICES, RATE);
    publisher.wait_acked(400, Duration::from_secs(30)).await;
    broker.stop().await;
    // Down for 2 s while the devices keep publishing: the fault's length.
    tokio::time::sleep(Duration::from_secs(2)).await;
    broker.restart().await;
    wait_resubscribed(&service, 1).await;
    publisher.wait_acked(400, Duration::from_secs(30)).await;
    let (_, verdict) = verify(&pool, publisher, sampler, Duration::from_secs(60)).await;
    assert_no_loss(&verdict);
    assert_counters(service).await;
}

/// (d) The broker SIGKILLed twice and started again; the service reconnects and resumes each
/// time. The broker saves its state every second (`autosave_interval 1`), so a SIGKILL loses
/// what it acknowledged since the last save and had not yet handed on:
///
/// 1. with the service connected and keeping up, that is only what was on its way to the
///    service at the instant of the kill (the service commits what it got, whatever happens to
///    the broker);
/// 2. with the service away (its session queuing at the broker), it is up to the last second's
///    worth of messages. The test measures both and checks that every lost message was
///    acknowledged within two autosave intervals before the kill.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_sigkill_loss_is_measured_and_the_service_resumes() {
    let mut broker = PrivateMosquitto::start().await;
    let db = TestDb::new().await;
    let pool = prepare(&db).await;
    let t = target(&db, broker.port());
    let service = spawn_service(&t).await;
    let sampler = Sampler::start(pool.clone());
    let publisher = LedgerPublisher::start(broker.port(), &t.prefix, DEVICES, RATE);
    publisher.wait_acked(400, Duration::from_secs(30)).await;
    let kill1 = publisher.acked();
    broker.kill().await;
    // Down for 2 s while the devices keep publishing: the fault's length.
    tokio::time::sleep(Duration::from_secs(2)).await;
    broker.restart().await;
    wait_resubscribed(&service, 1).await;
    publisher.wait_acked(400, Duration::from_secs(30)).await;

    // Phase 2: the service away, its session queuing at the broker.
    service.stop_keeping_session().await.unwrap();
    publisher
        .wait_acked(3 * RATE, Duration::from_secs(30))
        .await;
    let kill2 = publisher.acked();
    broker.kill().await;
    // Down for 2 s while the devices keep publishing: the fault's length.
    tokio::time::sleep(Duration::from_secs(2)).await;
    broker.restart().await;
    let service = spawn_service(&t).await;
    publisher.wait_acked(400, Duration::from_secs(30)).await;

    let (ledger, verdict) = verify(&pool, publisher, sampler, Duration::from_secs(60)).await;
    let position = |m: &(usize, u64)| ledger.acked.iter().position(|a| a == m).unwrap() as u64;
    let lost_at: Vec<u64> = verdict.lost.iter().map(position).collect();
    let phase1: Vec<u64> = lost_at
        .iter()
        .copied()
        .filter(|&i| i < kill1 + RATE)
        .collect();
    let phase2: Vec<u64> = lost_at
        .iter()
        .copied()
        .filter(|&i| i >= kill1 + RATE)
        .collect();
    eprintln!(
        "[broker SIGKILL] {} acknowledged in all; service connected: lost {} (kill at ack #{kill1}); \
         service away: lost {} (kill at ack #{kill2}), acknowledged #{:?}..#{:?}",
        ledger.acked.len(),
        phase1.len(),
        phase2.len(),
        phase2.first(),
        phase2.last(),
    );
    for &i in &lost_at {
        // Up to two autosave intervals before the kill, or acknowledged in the moment between
        // reading the count and the kill taking effect (the publisher does not stop for it).
        let before_kill = [kill1, kill2]
            .iter()
            .any(|&k| i < k + RATE / 2 && k.saturating_sub(i) <= 2 * RATE);
        assert!(
            before_kill,
            "message acknowledged as #{i} was lost, not within two autosave intervals before a kill \
             (kills at #{kill1} and #{kill2})"
        );
    }
    assert_counters(service).await;
}

async fn wait_resubscribed(service: &Running, reconnects: u64) {
    let stats = service.stats.clone();
    wait_until_named(
        "reconnect and re-subscribe",
        Duration::from_secs(30),
        Duration::from_millis(20),
        async || {
            let s = stats.snapshot();
            s.reconnects >= reconnects && s.subscribed
        },
    )
    .await
    .unwrap();
}

/// A TCP proxy that can black-hole its open connections: bytes stop flowing both ways but
/// neither socket is closed. Connections made after a stall are forwarded normally (as when a
/// NAT entry or a mobile link dies and a new connection gets through).
struct Proxy {
    port: u16,
    conns: Arc<Mutex<Vec<Arc<AtomicBool>>>>,
    tasks: Arc<Mutex<Vec<JoinHandle<()>>>>,
}

impl Proxy {
    async fn start(upstream: u16) -> Proxy {
        let listener = TcpListener::bind(("127.0.0.1", 0)).await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let conns: Arc<Mutex<Vec<Arc<AtomicBool>>>> = Arc::default();
        let tasks: Arc<Mutex<Vec<JoinHandle<()>>>> = Arc::default();
        let (c, t) = (conns.clone(), tasks.clone());
        let accept = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = TcpStream::connect(("127.0.0.1", upstream)).await else {
                    continue;
                };
                let stalled = Arc::new(AtomicBool::new(false));
                c.lock().unwrap().push(stalled.clone());
                let (cr, cw) = client.into_split();
                let (sr, sw) = server.into_split();
                let mut tasks = t.lock().unwrap();
                tasks.push(tokio::spawn(pump(cr, sw, stalled.clone())));
                tasks.push(tokio::spawn(pump(sr, cw, stalled)));
            }
        });
        tasks.lock().unwrap().push(accept);
        Proxy { port, conns, tasks }
    }

    /// Black-holes every connection open now.
    fn stall(&self) {
        for c in self.conns.lock().unwrap().iter() {
            c.store(true, Relaxed);
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        for t in self.tasks.lock().unwrap().iter() {
            t.abort();
        }
    }
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    stalled: Arc<AtomicBool>,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if stalled.load(Relaxed) {
            // Swallow everything from now on, keep both sockets open.
            let _keep = (from, to);
            std::future::pending::<()>().await;
            return;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

/// (e) The connection to the broker black-holed (not closed): keepalive (5 s) detects it and
/// the service is connected and subscribed again within two keepalive periods.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn network_stall_is_detected_by_keepalive_and_the_service_reconnects() {
    const KEEPALIVE: u64 = 5;
    let broker = PrivateMosquitto::start().await;
    let proxy = Proxy::start(broker.port()).await;
    let db = TestDb::new().await;
    let pool = prepare(&db).await;
    let mut t = target(&db, proxy.port).with("MQTT_KEEPALIVE_SECS", &KEEPALIVE.to_string());
    t.mqtt_port = proxy.port;
    let service = spawn_service(&t).await;
    let sampler = Sampler::start(pool.clone());
    // The publisher talks to the broker directly.
    let publisher = LedgerPublisher::start(broker.port(), &t.prefix, DEVICES, RATE);
    publisher.wait_acked(400, Duration::from_secs(30)).await;

    proxy.stall();
    let stalled_at = Instant::now();
    let stats = service.stats.clone();
    wait_until_named(
        "the service to notice the dead connection",
        Duration::from_secs(4 * KEEPALIVE),
        Duration::from_millis(20),
        async || !stats.snapshot().connected,
    )
    .await
    .unwrap();
    let detected = stalled_at.elapsed();
    wait_resubscribed(&service, 1).await;
    let back = stalled_at.elapsed();
    eprintln!(
        "[stall] keepalive {KEEPALIVE} s: detected after {detected:?}, subscribed again after {back:?}"
    );
    assert!(
        back <= Duration::from_secs(2 * KEEPALIVE) + Duration::from_millis(1500),
        "took {back:?} to reconnect (detected after {detected:?})"
    );

    publisher.wait_acked(400, Duration::from_secs(30)).await;
    let (_, verdict) = verify(&pool, publisher, sampler, Duration::from_secs(60)).await;
    assert_no_loss(&verdict);
    assert_counters(service).await;
    drop(proxy);
}

/// (f) SIGTERM under a steady stream: exits 0 within `SHUTDOWN_TIMEOUT_SECS`, having committed
/// and acknowledged everything it took in; a new start picks up the rest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_under_load_drains_commits_acks_and_exits_in_time() {
    const DEADLINE: u64 = 10;
    let broker = PrivateMosquitto::start().await;
    let db = TestDb::new().await;
    let pool = prepare(&db).await;
    let t = target(&db, broker.port())
        .with("SHUTDOWN_TIMEOUT_SECS", &DEADLINE.to_string())
        .with("INGEST_BATCH_MAX_MESSAGES", "5");
    let mut process = ServiceProcess::start(&t).await;
    let sampler = Sampler::start(pool.clone());
    // Faster than the service commits in batches of 5: a queue to drain when the signal comes.
    let publisher = LedgerPublisher::start(broker.port(), &t.prefix, DEVICES, 1000);
    publisher.wait_acked(2000, Duration::from_secs(30)).await;
    process.signal("TERM");
    let signalled = Instant::now();
    let code = process.wait_exit(Duration::from_secs(DEADLINE + 20)).await;
    let took = signalled.elapsed();
    eprintln!("[sigterm] exit {code:?} after {took:?}");
    assert_eq!(code, Some(0), "clean exit");
    assert!(took < Duration::from_secs(DEADLINE), "took {took:?}");
    // The exit can be seen before the last lines of output are read: wait for the block's end.
    process
        .wait_for_log("db errors:", Duration::from_secs(10))
        .await;
    let log = process.log();
    let (total, succeeded, failed) = (
        last_logged_counter(&log, "total").unwrap(),
        last_logged_counter(&log, "succeeded").unwrap(),
        last_logged_counter(&log, "failed").unwrap(),
    );
    eprintln!("[sigterm] final statistics: total {total}, succeeded {succeeded}, failed {failed}");
    assert_eq!(
        total,
        succeeded + failed,
        "everything taken in was committed or rejected"
    );
    assert_eq!(failed, 0);

    // The stream goes on while the service is away; then a new start (with normal batches)
    // catches up.
    publisher.wait_acked(500, Duration::from_secs(30)).await;
    publisher.pause(true);
    let process = ServiceProcess::start(&t.clone().with("INGEST_BATCH_MAX_MESSAGES", "500")).await;
    let (_, verdict) = verify(&pool, publisher, sampler, Duration::from_secs(60)).await;
    assert_no_loss(&verdict);
    drop(process);
    clear_session(t.mqtt_port, &t.client_id).await.unwrap();
}

/// (b) The database down for `OUTAGE_SECS` (120) at a steady rate, the real binary, its RSS
/// sampled every second. Long: run by `scripts/fault-db-outage.sh`.
///
/// Needs the broker to queue rate × outage messages for the service's session: the private
/// broker has `max_queued_messages 100000` (Mosquitto's default, 1000, would drop most).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "long: run by scripts/fault-db-outage.sh"]
async fn database_down_two_minutes_no_loss_and_bounded_memory() {
    let outage: u64 = std::env::var("OUTAGE_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(120);
    let rate: u64 = std::env::var("OUTAGE_RATE")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200);
    let broker = PrivateMosquitto::start().await;
    let mut mariadb = PrivateMariaDb::start().await;
    let db = TestDb::on(mariadb.host(), mariadb.port()).await;
    let pool = prepare(&db).await;
    let t = target(&db, broker.port());
    let mut process = ServiceProcess::start(&t).await;
    let pid = process.pid();
    let sampler = Sampler::start(pool.clone());
    let publisher = LedgerPublisher::start(broker.port(), &t.prefix, DEVICES, rate);
    publisher
        .wait_acked(rate * 5, Duration::from_secs(60))
        .await;
    let before = rss_kib(pid).unwrap();

    mariadb.kill().await;
    let acked_at_kill = publisher.acked();
    let started = Instant::now();
    let mut samples: Vec<(u64, u64)> = Vec::new();
    while started.elapsed() < Duration::from_secs(outage) {
        // One RSS sample a second for the outage's length.
        tokio::time::sleep(Duration::from_secs(1)).await;
        let rss = rss_kib(pid).expect("the service is still running");
        samples.push((started.elapsed().as_secs(), rss));
    }
    let queued = publisher.acked() - acked_at_kill;
    mariadb.restart().await;
    let recovered = Instant::now();
    publisher
        .wait_acked(rate * 5, Duration::from_secs(120))
        .await;
    let (_, verdict) = verify(&pool, publisher, sampler, Duration::from_secs(300)).await;
    let caught_up = recovered.elapsed();

    let peak = samples.iter().map(|s| s.1).max().unwrap();
    let half = samples.len() / 2;
    let first_half_max = samples[..half].iter().map(|s| s.1).max().unwrap();
    let second_half_max = samples[half..].iter().map(|s| s.1).max().unwrap();
    eprintln!(
        "[outage] {outage} s at {rate} msg/s: {queued} messages acknowledged by the broker while the database was down; \
         RSS before {before} KiB, peak {peak} KiB, max first half {first_half_max} KiB, max second half {second_half_max} KiB; \
         caught up {caught_up:?} after the restart; lost {}",
        verdict.lost.len()
    );
    assert_no_loss(&verdict);
    assert!(
        second_half_max as f64 <= first_half_max as f64 * 1.10,
        "RSS kept growing during the outage: {first_half_max} -> {second_half_max} KiB"
    );
    assert!(
        peak < before + 64 * 1024,
        "RSS grew by more than 64 MiB: {before} -> {peak} KiB"
    );

    process.signal("TERM");
    assert_eq!(process.wait_exit(Duration::from_secs(60)).await, Some(0));
    // The exit can be seen before the last lines of output are read: wait for the block's end.
    process
        .wait_for_log("db errors:", Duration::from_secs(10))
        .await;
    let log = process.log();
    let (total, succeeded, failed) = (
        last_logged_counter(&log, "total").unwrap(),
        last_logged_counter(&log, "succeeded").unwrap(),
        last_logged_counter(&log, "failed").unwrap(),
    );
    eprintln!("[outage] final statistics: total {total}, succeeded {succeeded}, failed {failed}");
    assert_eq!(total, succeeded + failed);
    assert_eq!(failed, 0);
    clear_session(t.mqtt_port, &t.client_id).await.unwrap();
}
