//! Faults: a broker restart, a database outage, `kill -9` while the database is down, and
//! SIGTERM with messages in flight. Tests that stop a server start their own private one, so
//! the shared services (and tests beside these) are never disturbed.

mod app;
mod common;

use std::time::Duration;

use app::{ServiceProcess, Target, migrate, register, sensor, spawn_service, wait_for_device};
use common::{
    PrivateMariaDb, PrivateMosquitto, QoS, TestDb, clear_session, mqtt_publish, publish_many,
    shared_mqtt_port, wait_until_named,
};
use serde_json::json;
use sqlx::MySqlPool;

/// Waits until every device `dev{i}` for i in 0..n has sensor `seq` equal to `seq`.
async fn wait_all_devices(pool: &MySqlPool, n: usize, seq: u64, timeout: Duration) {
    wait_until_named(
        &format!("{n} devices to reach seq {seq}"),
        timeout,
        Duration::from_millis(100),
        async || {
            let done: i64 = sqlx::query_scalar(
                "SELECT COUNT(*) FROM device_main \
                 WHERE JSON_VALUE(last_report_data, '$.sensors.seq.value') = ?",
            )
            .bind(seq)
            .fetch_one(pool)
            .await?;
            if done as usize == n {
                Ok(true)
            } else {
                anyhow::bail!("{done} of {n} devices done")
            }
        },
    )
    .await
    .unwrap();
}

fn seq_messages(
    target: &Target,
    devices: usize,
    seqs: std::ops::Range<u64>,
) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    for seq in seqs {
        for d in 0..devices {
            out.push((
                target.topic(&format!("dev{d}"), "data"),
                format!(r#"{{"seq": {seq}}}"#).into_bytes(),
            ));
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_restart_reconnect_resubscribe_and_resume() {
    let mut broker = PrivateMosquitto::start().await;
    let db = TestDb::new().await;
    let pool = db.pool();
    migrate(&pool).await;
    register(&pool, "d1").await;
    let target = Target::new(&db, broker.port());
    let service = spawn_service(&target).await;

    mqtt_publish(
        broker.port(),
        &target.topic("d1", "data"),
        r#"{"before": 1}"#,
        QoS::AtLeastOnce,
    )
    .await
    .unwrap();
    wait_for_device(&pool, "d1", "the message before the restart", |r| {
        sensor(r, "before").is_some()
    })
    .await;

    broker.stop().await;
    let stats = service.stats.clone();
    wait_until_named(
        "the service to notice",
        Duration::from_secs(15),
        Duration::from_millis(20),
        async || !stats.snapshot().connected,
    )
    .await
    .unwrap();
    broker.restart().await;
    wait_until_named(
        "reconnect and re-subscribe",
        Duration::from_secs(30),
        Duration::from_millis(20),
        async || {
            let s = stats.snapshot();
            s.reconnects >= 1 && s.subscribed
        },
    )
    .await
    .unwrap();

    mqtt_publish(
        broker.port(),
        &target.topic("d1", "data"),
        r#"{"after": 2}"#,
        QoS::AtLeastOnce,
    )
    .await
    .unwrap();
    let row = wait_for_device(&pool, "d1", "the message after the restart", |r| {
        sensor(r, "after").is_some()
    })
    .await;
    assert_eq!(sensor(&row, "before"), Some(json!(1)));
    service.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn database_outage_while_running_loses_nothing_and_acks_nothing_early() {
    let mut mariadb = PrivateMariaDb::start().await;
    let db = TestDb::on(mariadb.host(), mariadb.port()).await;
    let pool = db.pool();
    migrate(&pool).await;
    const DEVICES: usize = 20;
    for d in 0..DEVICES {
        register(&pool, &format!("dev{d}")).await;
    }
    let target = Target::new(&db, shared_mqtt_port());
    let service = spawn_service(&target).await;
    publish_many(
        target.mqtt_port,
        seq_messages(&target, DEVICES, 0..1),
        QoS::AtLeastOnce,
    )
    .await
    .unwrap();
    wait_all_devices(&pool, DEVICES, 0, Duration::from_secs(20)).await;

    mariadb.kill().await;
    publish_many(
        target.mqtt_port,
        seq_messages(&target, DEVICES, 1..6),
        QoS::AtLeastOnce,
    )
    .await
    .unwrap();
    let stats = service.stats.clone();
    wait_until_named(
        "failed write attempts",
        Duration::from_secs(20),
        Duration::from_millis(50),
        async || stats.snapshot().db_errors >= 2,
    )
    .await
    .unwrap();
    assert_eq!(
        stats.snapshot().succeeded,
        DEVICES as u64,
        "nothing commits while the database is down"
    );

    mariadb.restart().await;
    wait_all_devices(&pool, DEVICES, 5, Duration::from_secs(60)).await;
    let snap = stats.snapshot();
    assert_eq!(snap.succeeded, 6 * DEVICES as u64);
    assert_eq!(snap.failed, 0);
    service.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_while_the_database_is_down_the_broker_redelivers_everything() {
    let mut mariadb = PrivateMariaDb::start().await;
    let db = TestDb::on(mariadb.host(), mariadb.port()).await;
    let pool = db.pool();
    migrate(&pool).await;
    const DEVICES: usize = 10;
    for d in 0..DEVICES {
        register(&pool, &format!("dev{d}")).await;
    }
    let target = Target::new(&db, shared_mqtt_port());
    let mut process = ServiceProcess::start(&target).await;

    mariadb.kill().await;
    publish_many(
        target.mqtt_port,
        seq_messages(&target, DEVICES, 0..3),
        QoS::AtLeastOnce,
    )
    .await
    .unwrap();
    process
        .wait_for_log("database write failed", Duration::from_secs(20))
        .await;
    process.signal("KILL");
    process.wait_exit(Duration::from_secs(10)).await;

    // Had anything been acknowledged before its commit, the broker would not send it again.
    mariadb.restart().await;
    let process = ServiceProcess::start(&target).await;
    wait_all_devices(&pool, DEVICES, 2, Duration::from_secs(60)).await;
    drop(process);
    clear_session(target.mqtt_port, &target.client_id)
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_with_messages_in_flight_commits_them_and_exits_zero() {
    let db = TestDb::new().await;
    let pool = db.pool();
    migrate(&pool).await;
    const DEVICES: usize = 50;
    const SEQS: u64 = 40;
    for d in 0..DEVICES {
        register(&pool, &format!("dev{d}")).await;
    }
    // A private broker: the shared one keeps Mosquitto's default max_queued_messages (1000),
    // and would drop part of this burst before the service ever sees it.
    let broker = PrivateMosquitto::start().await;
    // Small batches make sure messages are in flight when the signal comes.
    let target = Target::new(&db, broker.port()).with("INGEST_BATCH_MAX_MESSAGES", "20");
    let mut process = ServiceProcess::start(&target).await;
    publish_many(
        target.mqtt_port,
        seq_messages(&target, DEVICES, 0..SEQS),
        QoS::AtLeastOnce,
    )
    .await
    .unwrap();
    process.signal("TERM");
    let code = process.wait_exit(Duration::from_secs(40)).await;
    assert_eq!(code, Some(0), "clean exit; log:\n{}", process.log());

    // Everything the service took in was committed before it exited.
    let log = process.log();
    let field = |name: &str| -> u64 {
        log.lines()
            .rev()
            .find_map(|l| {
                l.trim()
                    .strip_prefix(name)
                    .map(|v| v.trim().parse::<u64>().unwrap())
            })
            .unwrap_or_else(|| panic!("no {name} in the final statistics:\n{log}"))
    };
    let (total, succeeded, failed) = (field("total:"), field("succeeded:"), field("failed:"));
    assert_eq!(total, succeeded + failed, "taken in = committed + rejected");
    assert_eq!(failed, 0);

    // What it had not taken waits at the broker: a new start finishes the job.
    let process = ServiceProcess::start(&target).await;
    wait_all_devices(&pool, DEVICES, SEQS - 1, Duration::from_secs(60)).await;
    drop(process);
    clear_session(target.mqtt_port, &target.client_id)
        .await
        .unwrap();
}
