//! A strict broker: rumqttd, run in this test process. It disconnects a client whose PUBACKs
//! (or PUBRECs) do not come in the order its PUBLISHes went out [MQTT-4.6.0-2], and redelivers;
//! Mosquitto does not mind, so only a broker like this one shows the service acknowledging out
//! of order. Before the ack ledger, one valid message followed by one rejected one was enough:
//! the service never got through a burst, reconnecting forever.
//!
//! rumqttd keeps sessions in memory and cannot be stopped: one broker serves the whole test
//! binary, each test with its own client id, topic prefix and database.

use std::sync::OnceLock;
use std::time::Duration;

use crate::app::{Target, migrate, register, spawn_service, wait_devices_at_seq};
use crate::common::{QoS, TestDb, publish_many, wait_until_named};
use sqlx::Connection;

/// Ports of the in-process rumqttd: (MQTT 3.1.1 listener, MQTT 5 listener).
fn strict_broker() -> (u16, u16) {
    static PORTS: OnceLock<(u16, u16)> = OnceLock::new();
    *PORTS.get_or_init(|| {
        let free = || {
            std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port()
        };
        let (v4, v5) = (free(), free());
        let connections = rumqttd::ConnectionSettings {
            connection_timeout_ms: 10_000,
            max_payload_size: 1 << 20,
            max_inflight_count: 100,
            auth: None,
            external_auth: None,
            dynamic_filters: true,
        };
        let listener = |name: &str, port: u16| {
            let server = rumqttd::ServerSettings {
                name: name.to_owned(),
                listen: ([127, 0, 0, 1], port).into(),
                tls: None,
                next_connection_delay_ms: 1,
                connections: connections.clone(),
            };
            std::collections::HashMap::from([("1".to_owned(), server)])
        };
        let config = rumqttd::Config {
            id: 0,
            router: rumqttd::RouterConfig {
                max_connections: 100,
                max_outgoing_packet_count: 200,
                max_segment_size: 10 << 20,
                max_segment_count: 10,
                ..Default::default()
            },
            v4: Some(listener("v4", v4)),
            v5: Some(listener("v5", v5)),
            ..Default::default()
        };
        let mut broker = rumqttd::Broker::new(config);
        std::thread::spawn(move || {
            let _ = broker.start();
        });
        // Listening once both ports take a connection (a blocking wait on a plain thread, in
        // the test's set-up: the broker has no other signal).
        for port in [v4, v5] {
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
                assert!(
                    std::time::Instant::now() < deadline,
                    "rumqttd did not listen on {port}"
                );
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        (v4, v5)
    })
}

/// A target on the strict broker, speaking the protocol version under test.
fn strict_target(db: &TestDb) -> Target {
    let (v4, v5) = strict_broker();
    let mut target = Target::new(db, v4);
    if target.protocol == "5" {
        target.mqtt_port = v5;
    }
    target
}

/// A burst over two writers, with messages that fold (several per device while the database is
/// busy), messages rejected in the event loop (not JSON) and by a writer (unknown device)
/// between accepted ones: every device reaches its last value and the broker never had a
/// reason to disconnect the service.
async fn burst_without_a_reconnect(target: Target, db: &TestDb) {
    let pool = db.pool();
    migrate(&pool).await;
    const DEVICES: usize = 40;
    const SEQS: u64 = 25;
    for d in 0..DEVICES {
        register(&pool, &format!("dev{d}")).await;
    }
    let target = target
        .with("INGEST_WRITERS", "2")
        .with("INGEST_BATCH_MAX_WAIT_MS", "20");
    let (publish_port, _) = strict_broker();
    let service = spawn_service(&target).await;
    let mut messages = Vec::new();
    for seq in 0..SEQS {
        for d in 0..DEVICES {
            messages.push((
                target.topic(&format!("dev{d}"), "data"),
                format!(r#"{{"seq": {seq}}}"#).into_bytes(),
            ));
            if d % 13 == 0 {
                messages.push((target.topic("dev1", "data"), b"{not json".to_vec()));
                messages.push((
                    target.topic(&format!("ghost{seq}"), "data"),
                    br#"{"seq": 1}"#.to_vec(),
                ));
            }
        }
    }
    let total = messages.len() as u64;
    publish_many(publish_port, messages, QoS::AtLeastOnce)
        .await
        .unwrap();
    wait_devices_at_seq(&pool, DEVICES, SEQS - 1, Duration::from_secs(60)).await;
    let snap = service.settled_within(total, Duration::from_secs(60)).await;
    assert_eq!(snap.received, total);
    assert!(snap.failed > 0, "rejections were part of the burst");
    // Every message settled: had an ack left out of order, rumqttd would have disconnected
    // the service and redelivered.
    let stats = service.stats.clone();
    wait_until_named(
        "still connected after the burst",
        Duration::from_secs(5),
        Duration::from_millis(20),
        async || {
            let s = stats.snapshot();
            anyhow::ensure!(s.reconnects == 0, "{} reconnects", s.reconnects);
            Ok(s.connected)
        },
    )
    .await
    .unwrap();
    service.stop().await.unwrap();
}

/// The case that once broke it, made certain: the first message's write is held up (another
/// transaction locks its row), and rejected messages behind it settle at once. Their acks must
/// wait for the first one's; sent at once, rumqttd disconnects the service.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ack_waits_for_an_earlier_message_still_being_written() {
    let db = TestDb::new().await;
    let pool = db.pool();
    migrate(&pool).await;
    register(&pool, "held").await;
    let target = strict_target(&db).with("INGEST_BATCH_MAX_WAIT_MS", "0");
    let (publish_port, _) = strict_broker();
    let service = spawn_service(&target).await;

    let mut lock = db.connect().await.unwrap();
    let mut tx = lock.begin().await.unwrap();
    sqlx::query("SELECT id FROM device_main WHERE uuid = 'held' FOR UPDATE")
        .execute(&mut *tx)
        .await
        .unwrap();
    let stats = service.stats.clone();
    let rejected = async |n: u64| {
        wait_until_named(
            &format!("{n} rejections"),
            Duration::from_secs(20),
            Duration::from_millis(5),
            async || anyhow::Ok(stats.snapshot().failed == n),
        )
        .await
        .unwrap();
    };
    let held = (target.topic("held", "data"), br#"{"seq": 1}"#.to_vec());
    let bad = (target.topic("held", "data"), b"{not json".to_vec());
    publish_many(publish_port, [held, bad.clone()], QoS::AtLeastOnce)
        .await
        .unwrap();
    rejected(1).await;
    // A second rejection, published only now: by the time it is here, an ack sent early for the
    // first would have reached the broker.
    publish_many(publish_port, [bad], QoS::AtLeastOnce)
        .await
        .unwrap();
    rejected(2).await;
    assert_eq!(
        stats.snapshot().succeeded,
        0,
        "the first write is still held"
    );
    tx.commit().await.unwrap();
    let snap = service.settled(3).await;
    assert_eq!((snap.succeeded, snap.failed), (1, 2));
    wait_devices_at_seq(&pool, 1, 1, Duration::from_secs(20)).await;
    let s = service.stats.snapshot();
    assert_eq!((s.reconnects, s.connected), (0, true), "never disconnected");
    service.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acks_in_order_through_two_writers_folding_and_rejections() {
    let db = TestDb::new().await;
    let target = strict_target(&db);
    burst_without_a_reconnect(target, &db).await;
}

/// The same through a shared subscription, where out-of-order acks once made rumqttd's router
/// panic and the broker die for every client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acks_in_order_through_a_shared_subscription() {
    let db = TestDb::new().await;
    let target = strict_target(&db).with("MQTT_SHARED_GROUP", &crate::common::unique_name("g"));
    burst_without_a_reconnect(target, &db).await;
}
