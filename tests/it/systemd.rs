//! systemd's notify protocol, played by the test: the real binary gets `NOTIFY_SOCKET` pointing
//! at a datagram socket bound here, as systemd does for `Type=notify`.

use std::time::Duration;

use crate::app::{ServiceProcess, Target, migrate, register, sensor, wait_for_device};
use crate::common::{
    PrivateMariaDb, QoS, TestDb, clear_session, mqtt_publish, shared_mqtt_port, wait_until_named,
};
use tokio::net::UnixDatagram;

/// The next datagram, as text, or `None` if none comes within `timeout`.
async fn next(socket: &UnixDatagram, timeout: Duration) -> Option<String> {
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(timeout, socket.recv(&mut buf))
        .await
        .ok()?
        .expect("recv on the notify socket");
    Some(String::from_utf8_lossy(&buf[..n]).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_only_once_the_database_and_subscriptions_are_up_then_watchdog_and_stopping() {
    let mut mariadb = PrivateMariaDb::start().await;
    let db = TestDb::on(mariadb.host(), mariadb.port()).await;
    let pool = db.pool();
    migrate(&pool).await;
    register(&pool, "d1").await;
    mariadb.kill().await;

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("notify");
    let socket = UnixDatagram::bind(&path).unwrap();
    let target = Target::new(&db, shared_mqtt_port())
        .with("NOTIFY_SOCKET", path.to_str().unwrap())
        // 1 s: fed every 0.5 s.
        .with("WATCHDOG_USEC", "1000000");
    let mut process = ServiceProcess::spawn(&target);

    // The database is down: the service waits for it and says nothing to systemd.
    process
        .wait_for_log("database not reachable", Duration::from_secs(20))
        .await;
    assert_eq!(next(&socket, Duration::from_secs(2)).await, None);

    mariadb.restart().await;
    let first = next(&socket, Duration::from_secs(30))
        .await
        .expect("READY=1 once the database is back");
    assert!(first.lines().any(|l| l == "READY=1"), "{first:?}");
    // READY=1 came after the broker acknowledged the subscriptions: a message published at
    // once reaches the service (its session is new, so before the subscription it would not).
    mqtt_publish(
        target.mqtt_port,
        &target.topic("d1", "data"),
        r#"{"after_ready": 1}"#,
        QoS::AtLeastOnce,
    )
    .await
    .unwrap();
    wait_for_device(
        &pool,
        "d1",
        "the message published right after READY=1",
        |r| sensor(r, "after_ready").is_some(),
    )
    .await;
    // And in the service's own (ordered) log: database, subscriptions, then READY=1.
    process
        .wait_for_log("told systemd: ready", Duration::from_secs(5))
        .await;
    let log = process.log();
    let db_ready = log.find("database ready").expect("database ready logged");
    let subscribed = log
        .rfind("subscribed topic=")
        .expect("subscriptions logged");
    let notified = log.find("told systemd: ready").unwrap();
    assert!(db_ready < subscribed && subscribed < notified, "{log}");

    // Fed while both sides make progress: every 0.5 s, so at least four in three seconds.
    let mut fed = 0;
    let until = tokio::time::Instant::now() + Duration::from_secs(3);
    while let Some(msg) = next(&socket, until - tokio::time::Instant::now()).await {
        assert_eq!(msg, "WATCHDOG=1\n");
        fed += 1;
    }
    assert!(fed >= 4, "WATCHDOG=1 sent {fed} times in 3 s");

    process.signal("TERM");
    let stopping = wait_until_named(
        "STOPPING=1",
        Duration::from_secs(10),
        Duration::from_millis(10),
        async || {
            next(&socket, Duration::from_millis(200))
                .await
                .filter(|m| m.contains("STOPPING=1"))
        },
    )
    .await;
    assert!(stopping.is_ok(), "{stopping:?}");
    assert_eq!(process.wait_exit(Duration::from_secs(40)).await, Some(0));
    clear_session(target.mqtt_port, &target.client_id)
        .await
        .unwrap();
}
