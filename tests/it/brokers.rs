//! Brokers other than a well-behaved Mosquitto: one that drops the connection right after
//! accepting it, one without MQTT 5 (it answers with an MQTT 3.1.1 refusal, or not at all), one
//! without shared subscriptions, and a Mosquitto that lost the persistent session. The odd
//! brokers are a few lines of TCP here that say exactly what the real ones were seen to say
//! (aedes, amqtt, ejabberd: see docs/brokers.md); the strict one (rumqttd) is in `strict.rs`.

use std::time::Duration;

use crate::app::{
    ServiceProcess, Target, migrate, register, sensor, spawn_service, wait_for_device,
};
use crate::common::{PrivateMosquitto, QoS, TestDb, mqtt_publish, wait_until_named};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;

/// CONNACK, session not present, accepted: MQTT 3.1.1 has no properties, MQTT 5 an empty set.
fn connack_accepted(protocol: &str) -> &'static [u8] {
    if protocol == "5" {
        &[0x20, 0x03, 0x00, 0x00, 0x00]
    } else {
        &[0x20, 0x02, 0x00, 0x00]
    }
}

/// The service's next connection, once its CONNECT is read.
async fn accept_connect(listener: &TcpListener) -> TcpStream {
    let (mut socket, _) = tokio::time::timeout(Duration::from_secs(30), listener.accept())
        .await
        .expect("the service connects")
        .unwrap();
    read_connect(&mut socket).await;
    socket
}

/// Reads what the client sends first (its CONNECT): at least the fixed header.
async fn read_connect(socket: &mut TcpStream) {
    let mut buf = [0u8; 512];
    let n = tokio::time::timeout(Duration::from_secs(10), socket.read(&mut buf))
        .await
        .expect("the service sends a CONNECT")
        .expect("read the CONNECT");
    assert!(n >= 2 && buf[0] == 0x10, "not a CONNECT: {:?}", &buf[..n]);
}

async fn listener() -> (TcpListener, u16) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    (l, port)
}

/// ejabberd refusing `$share`, rumqttd refusing out-of-order acks: the broker accepts the
/// connection, then closes it at once. Each reconnect must wait longer than the one before;
/// the backoff used to start over at every CONNACK (a reconnect every 2 s, forever).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_that_drops_us_right_after_accepting_meets_a_growing_backoff() {
    let db = TestDb::new().await;
    migrate(&db.pool()).await;
    let (listener, port) = listener().await;
    let target = Target::new(&db, port)
        .with("MQTT_RECONNECT_MIN_SECS", "1")
        .with("MQTT_RECONNECT_MAX_SECS", "8");
    let mut process = ServiceProcess::spawn(&target);
    let mut accepted = Vec::new();
    while accepted.len() < 4 {
        let mut socket = accept_connect(&listener).await;
        accepted.push(Instant::now());
        socket
            .write_all(connack_accepted(&target.protocol))
            .await
            .unwrap();
        drop(socket);
    }
    let gaps: Vec<f64> = accepted
        .windows(2)
        .map(|w| (w[1] - w[0]).as_secs_f64())
        .collect();
    // 1 s, 2 s, 4 s, each shortened by up to 20 % of jitter.
    assert!(gaps[0] >= 0.7, "{gaps:?}");
    assert!(gaps[1] > gaps[0] * 1.3, "the wait grows: {gaps:?}");
    assert!(gaps[2] > gaps[1] * 1.3, "the wait grows: {gaps:?}");
    process
        .wait_for_log(
            "the broker closed the connection soon after it was made",
            Duration::from_secs(5),
        )
        .await;
    process.signal("TERM");
    assert_eq!(process.wait_exit(Duration::from_secs(10)).await, Some(0));
}

/// MQTT 5 towards a broker that speaks only MQTT 3.1.1: aedes answers with a 3.1.1 refusal
/// (return code 1), amqtt does not answer at all. Both must name `MQTT_PROTOCOL`, and a SIGTERM
/// while the service waits for an answer ends it at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt5_to_a_broker_without_it_names_mqtt_protocol_and_stops_at_once() {
    let db = TestDb::new().await;
    migrate(&db.pool()).await;
    let (listener, port) = listener().await;
    let target = Target::new(&db, port)
        .with("MQTT_PROTOCOL", "5")
        .with("MQTT_RECONNECT_MIN_SECS", "1");
    let mut process = ServiceProcess::spawn(&target);

    // aedes: CONNACK in MQTT 3.1.1's form, "unacceptable protocol version".
    let mut socket = accept_connect(&listener).await;
    socket.write_all(&[0x20, 0x02, 0x00, 0x01]).await.unwrap();
    drop(socket);
    process
        .wait_for_log("set MQTT_PROTOCOL=3.1.1", Duration::from_secs(20))
        .await;

    // amqtt: takes the CONNECT and says nothing. The service waits for its connect timeout,
    // unless it is told to stop.
    let silent = accept_connect(&listener).await;
    let asked = Instant::now();
    process.signal("TERM");
    assert_eq!(process.wait_exit(Duration::from_secs(10)).await, Some(0));
    assert!(
        asked.elapsed() < Duration::from_secs(2),
        "stopping while connecting took {:?}",
        asked.elapsed()
    );
    drop(silent);
}

/// A broker whose MQTT 5 CONNACK says `shared_subscription_available = 0` while
/// `MQTT_SHARED_GROUP` asks for one: the service stops with one line that says what to change,
/// rather than subscribing to a filter that delivers nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_shared_subscriptions_with_a_shared_group_stops_with_one_clear_line() {
    let db = TestDb::new().await;
    migrate(&db.pool()).await;
    let (listener, port) = listener().await;
    let target = Target::new(&db, port)
        .with("MQTT_PROTOCOL", "5")
        .with("MQTT_SHARED_GROUP", "ingest");
    let mut process = ServiceProcess::spawn(&target);
    let mut socket = accept_connect(&listener).await;
    // Accepted, properties: Shared Subscription Available (0x2A) = 0.
    socket
        .write_all(&[0x20, 0x05, 0x00, 0x00, 0x02, 0x2A, 0x00])
        .await
        .unwrap();
    let code = process.wait_exit(Duration::from_secs(20)).await;
    assert_ne!(code, Some(0), "{}", process.log());
    let log = process.log();
    let lines: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("no shared subscriptions"))
        .collect();
    assert!(!lines.is_empty(), "{log}");
    assert!(lines[0].contains("MQTT_SHARED_GROUP"), "{log}");
    drop(socket);
}

/// A broker that restarted without its persistence file: the reconnection finds no session
/// (`session_present=false`), so whatever it had queued for us is gone. That is a WARN and a
/// counter, not an INFO line nobody reads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_persistent_session_is_a_warning_and_a_counter() {
    let mut broker = PrivateMosquitto::start().await;
    let db = TestDb::new().await;
    let pool = db.pool();
    migrate(&pool).await;
    register(&pool, "d1").await;
    let target = Target::new(&db, broker.port());
    let service = spawn_service(&target).await;
    assert_eq!(service.stats.snapshot().sessions_lost, 0);

    // A clean restart keeps the session: no warning.
    broker.stop().await;
    broker.restart().await;
    let stats = service.stats.clone();
    wait_until_named(
        "reconnect with the session kept",
        Duration::from_secs(30),
        Duration::from_millis(20),
        async || {
            let s = stats.snapshot();
            s.reconnects >= 1 && s.subscribed
        },
    )
    .await
    .unwrap();
    assert_eq!(stats.snapshot().sessions_lost, 0, "the session was kept");

    // Killed, and its persistence file gone: the session is lost.
    broker.kill().await;
    for entry in std::fs::read_dir(broker.dir()).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "db") {
            std::fs::remove_file(path).unwrap();
        }
    }
    broker.restart().await;
    wait_until_named(
        "the lost session to be counted",
        Duration::from_secs(30),
        Duration::from_millis(20),
        async || {
            let s = stats.snapshot();
            s.sessions_lost == 1 && s.subscribed
        },
    )
    .await
    .unwrap();
    // And the service goes on: it subscribed again on the new session.
    mqtt_publish(
        broker.port(),
        &target.topic("d1", "data"),
        r#"{"after": 1}"#,
        QoS::AtLeastOnce,
    )
    .await
    .unwrap();
    let row = wait_for_device(&pool, "d1", "the message after the lost session", |r| {
        sensor(r, "after").is_some()
    })
    .await;
    assert_eq!(sensor(&row, "after"), Some(serde_json::json!(1)));
    service.stop().await.unwrap();
}
