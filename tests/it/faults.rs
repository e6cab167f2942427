//! Faults: a broker restart, a database outage, `kill -9` while the database is down, and
//! SIGTERM with messages in flight. Tests that stop a server start their own private one, so
//! the shared services (and tests beside these) are never disturbed.

use std::time::Duration;

use crate::app::{
    ServiceProcess, Target, migrate, register, sensor, spawn_service, wait_devices_at_seq,
    wait_for_device,
};
use crate::common::{
    PrivateMariaDb, PrivateMosquitto, QoS, TestDb, clear_session, mqtt_publish, publish_many,
    shared_mqtt_port, wait_until_named,
};
use serde_json::json;

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

/// The service rides out the outage: nothing commits while the database is down, and every
/// message is written once it is back. That nothing is acknowledged before its commit is
/// shown where it can be seen: the next test (SIGKILL during the outage: the broker delivers
/// everything again) and `strict.rs` (a broker that checks each ack).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn database_outage_while_running_loses_nothing_and_commits_nothing_while_down() {
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
    wait_devices_at_seq(&pool, DEVICES, 0, Duration::from_secs(20)).await;

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
    wait_devices_at_seq(&pool, DEVICES, 5, Duration::from_secs(60)).await;
    let snap = service.settled(6 * DEVICES as u64).await;
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
    wait_devices_at_seq(&pool, DEVICES, 2, Duration::from_secs(60)).await;
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
    // The last lines may still be on their way from the pipe.
    process
        .wait_for_log("db errors:", Duration::from_secs(10))
        .await;
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
    wait_devices_at_seq(&pool, DEVICES, SEQS - 1, Duration::from_secs(60)).await;
    drop(process);
    clear_session(target.mqtt_port, &target.client_id)
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_bad_messages_is_counted_but_logged_once_per_device_and_reason() {
    let broker = PrivateMosquitto::start().await;
    let db = TestDb::new().await;
    let pool = db.pool();
    migrate(&pool).await;
    register(&pool, "ok").await;
    let target = Target::new(&db, broker.port());
    let mut process = ServiceProcess::start(&target).await;
    let mut flood: Vec<(String, Vec<u8>)> = (0..500)
        .map(|i| {
            (
                target.topic("noisy", "data"),
                format!("garbage {i}").into_bytes(),
            )
        })
        .collect();
    flood.extend((0..500).map(|i| {
        (
            target.topic("noisy", "data"),
            format!(r#"{{"123": {i}, "t": 1}}"#).into_bytes(),
        )
    }));
    flood.push((target.topic("ok", "data"), br#"{"t": 7}"#.to_vec()));
    publish_many(broker.port(), flood, QoS::AtLeastOnce)
        .await
        .unwrap();
    wait_for_device(&pool, "ok", "the good message after the flood", |r| {
        sensor(r, "t").is_some()
    })
    .await;
    process.signal("TERM");
    assert_eq!(process.wait_exit(Duration::from_secs(30)).await, Some(0));
    // The last lines may still be on their way from the pipe.
    process
        .wait_for_log("db errors:", Duration::from_secs(10))
        .await;
    let log = process.log();
    let lines = |needle: &str| log.lines().filter(|l| l.contains(needle)).count();
    assert_eq!(
        lines("reason=\"not_json\""),
        1,
        "500 identical rejections, one line:\n{log}"
    );
    assert_eq!(lines("skipped part of a message"), 1, "{log}");
    assert_eq!(
        lines("reason=\"unknown_device\""),
        1,
        "noisy is not registered: its 500 valid messages, one line"
    );
    // The counters count every one: 500 not_json + 500 unknown devices failed, 1 written.
    let field = |name: &str| -> u64 {
        log.lines()
            .rev()
            .find_map(|l| {
                l.trim()
                    .strip_prefix(name)
                    .map(|v| v.trim().parse::<u64>().unwrap())
            })
            .unwrap()
    };
    assert_eq!(
        (field("total:"), field("succeeded:"), field("failed:")),
        (1001, 1, 1000)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passwords_never_reach_logs_errors_or_check_config() {
    // A wrong database password and an MQTT password: the service fails to connect and says
    // so, naming everything but the secrets.
    let db = TestDb::new().await;
    let target = Target::new(&db, shared_mqtt_port())
        .with("DB_PASSWORD", "s3cret-db-pw")
        .with("MQTT_USERNAME", "someone")
        .with("MQTT_PASSWORD", "s3cret-mqtt-pw");
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_mqtt-ingest"));
    cmd.args(["--check-config", "--env-file", "/dev/null"])
        .env("LOG_LEVEL", "trace");
    for (k, v) in target.vars() {
        cmd.env(k, v);
    }
    cmd.env("LOG_LEVEL", "trace");
    let out = cmd.output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        out.status.code(),
        Some(1),
        "the database login fails:\n{text}"
    );
    assert!(
        text.contains("database") && text.contains("FAILED"),
        "{text}"
    );
    assert!(!text.contains("s3cret"), "a password leaked:\n{text}");

    // A configuration error about a password-bearing setting does not echo it either.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_mqtt-ingest"))
        .args(["--env-file", "/dev/null"])
        .env("DB_PASSWORD", "s3cret-db-pw")
        .env("MQTT_PORT", "not-a-port")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(78));
    assert!(
        text.contains("MQTT_PORT") && !text.contains("s3cret"),
        "{text}"
    );

    // And the running service, at trace level, through a failed database connection.
    let mut process_env = target.clone().with("LOG_LEVEL", "trace");
    process_env.db_password = "s3cret-db-pw".into();
    let mut process = ServiceProcess::spawn(&process_env);
    process
        .wait_for_log("database refused the service", Duration::from_secs(20))
        .await;
    process.signal("TERM");
    process.wait_exit(Duration::from_secs(20)).await;
    let text = process.log();
    // A wrong password is a refusal, named as such, with the settings to check.
    assert!(
        text.contains("database refused the service") && text.contains("DB_PASSWORD"),
        "{text}"
    );
    assert!(!text.contains("s3cret"), "a password leaked:\n{text}");
}
