//! Beyond one machine, the parts that are ours: a Galera cluster of two private MariaDB nodes
//! under two instances (Mosquitto's `$share` splits the messages), a node killed under an
//! instance, a commit whose answer is lost, the broker list walked on reconnect, and
//! `--check-config` over both lists. The
//! three-node RMQTT + Galera scenarios run in the bench's `cluster` runner (docs/scale-out.md):
//! CI does not compile a broker.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use sqlx::MySqlPool;
use sqlx::mysql::MySqlPoolOptions;

use crate::app::{
    ServiceProcess, Target, devices_at_seq, migrate, register, spawn_service, wait_devices_at_seq,
};
use crate::common::{
    PrivateGalera, PrivateMosquitto, QoS, TestDb, free_port, mqtt_publish, publish_many,
    shared_mqtt_port, unique_name, wait_until_named,
};

const DEVICES: usize = 5;

/// One round: every device's reading `seq`, its time growing with `seq` (order-safe merges keep
/// the newest whichever instance commits last).
fn round(target: &Target, seq: u64) -> Vec<(String, Vec<u8>)> {
    (0..DEVICES)
        .map(|d| {
            (
                target.topic(&format!("dev{d}"), "data"),
                format!(
                    r#"{{"seq": {seq}, "timestamp": "2026-01-01T{:02}:{:02}:{:02}Z"}}"#,
                    seq / 3600,
                    seq / 60 % 60,
                    seq % 60
                )
                .into_bytes(),
            )
        })
        .collect()
}

/// A pool on node `port` of the cluster, in the test's database.
async fn pool_on(db: &TestDb, port: u16) -> MySqlPool {
    let opts = sqlx::mysql::MySqlConnectOptions::new()
        .host("127.0.0.1")
        .port(port)
        .username("root")
        .database(&db.name);
    MySqlPoolOptions::new()
        .max_connections(2)
        .connect_with(opts)
        .await
        .expect("pool on the node")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_through_two_galera_nodes_retry_conflicts_and_keep_the_newest() {
    let cluster = PrivateGalera::start(2).await;
    let (n0, n1) = (cluster.node(0), cluster.node(1));
    let db = TestDb::on(n0.host(), n0.port()).await;
    let pool = db.pool();
    migrate(&pool).await;
    for d in 0..DEVICES {
        register(&pool, &format!("dev{d}")).await;
    }
    let group = unique_name("g");
    let a = Target::new(&db, shared_mqtt_port())
        .with("MQTT_SHARED_GROUP", &group)
        // One message per batch: the most transactions, the most chances to meet.
        .with("INGEST_BATCH_MAX_WAIT_MS", "0");
    let mut b = a.clone();
    b.client_id = unique_name("svc");
    b.db_port = n1.port();
    let first = spawn_service(&a).await;
    let second = spawn_service(&b).await;

    // Rounds until the two instances have met on a row at least once (each round's messages
    // alternate between them, so the same device is written through both nodes), bounded.
    let mut seq = 0;
    let conflicts = |s: &crate::app::Running| s.stats.snapshot().db_conflicts;
    while conflicts(&first) + conflicts(&second) == 0 && seq < 400 {
        let mut msgs = Vec::new();
        for _ in 0..20 {
            msgs.extend(round(&a, seq));
            seq += 1;
        }
        publish_many(a.mqtt_port, msgs, QoS::AtLeastOnce)
            .await
            .unwrap();
        wait_devices_at_seq(&pool, DEVICES, seq - 1, Duration::from_secs(60)).await;
    }
    let sent = seq * DEVICES as u64;
    let (sa, sb) = (first.stats.clone(), second.stats.clone());
    wait_until_named(
        "both instances' counts to add up to what was sent",
        Duration::from_secs(30),
        Duration::from_millis(50),
        async || sa.snapshot().succeeded + sb.snapshot().succeeded >= sent,
    )
    .await
    .unwrap();
    let (ra, rb) = (sa.snapshot(), sb.snapshot());
    assert!(
        ra.db_conflicts + rb.db_conflicts > 0,
        "no certification conflict in {seq} rounds: the test proved nothing"
    );
    assert_eq!(ra.failed + rb.failed, 0, "a conflict reached a rejection");
    assert_eq!(ra.succeeded + rb.succeeded, sent);
    assert!(
        ra.succeeded > 0 && rb.succeeded > 0,
        "both instances wrote: {} and {}",
        ra.succeeded,
        rb.succeeded
    );
    // The newest reading is on both nodes, for every device.
    // (The other node applies what it certified a moment later: wait for it.)
    let other = pool_on(&db, n1.port()).await;
    assert_eq!(devices_at_seq(&pool, seq - 1).await.unwrap(), DEVICES);
    wait_devices_at_seq(&other, DEVICES, seq - 1, Duration::from_secs(30)).await;
    other.close().await;
    first.stop().await.unwrap();
    second.stop().await.unwrap();
    drop(db);
    drop(cluster);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_instance_moves_to_the_next_node_when_its_node_is_killed() {
    let mut cluster = PrivateGalera::start(2).await;
    let db = TestDb::on(cluster.node(0).host(), cluster.node(0).port()).await;
    let pool = db.pool();
    migrate(&pool).await;
    for d in 0..DEVICES {
        register(&pool, &format!("dev{d}")).await;
    }
    let target = Target::new(&db, shared_mqtt_port()).with("DB_HOST", &cluster.db_hosts());
    let service = ServiceProcess::start(&target).await;
    publish_many(target.mqtt_port, round(&target, 1), QoS::AtLeastOnce)
        .await
        .unwrap();
    wait_devices_at_seq(&pool, DEVICES, 1, Duration::from_secs(30)).await;

    // The node in use dies; the other (weighing more) stays the primary component. The
    // instance is idle: its periodic database check finds the node gone and moves the pool.
    cluster.node_mut(0).kill().await;
    cluster.wait_synced(1, 1).await.unwrap();
    service
        .wait_for_log(
            "moving to the next node of DB_HOST",
            Duration::from_secs(30),
        )
        .await;
    let survivor = pool_on(&db, cluster.node(1).port()).await;
    publish_many(target.mqtt_port, round(&target, 2), QoS::AtLeastOnce)
        .await
        .unwrap();
    wait_devices_at_seq(&survivor, DEVICES, 2, Duration::from_secs(60)).await;
    let log = service.log();
    assert_eq!(
        log.matches("moving to the next node of DB_HOST").count(),
        1,
        "said once:\n{log}"
    );
    assert!(!log.contains("message rejected"), "{log}");
    survivor.close().await;
    drop(service);
    drop(db);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_broker_list_is_walked_on_reconnect() {
    let db = TestDb::new().await;
    let pool = db.pool();
    migrate(&pool).await;
    register(&pool, "dev0").await;
    let mut first = PrivateMosquitto::start().await;
    let second = PrivateMosquitto::start().await;
    let target = Target::new(&db, first.port()).with(
        "MQTT_BROKER",
        &format!("127.0.0.1:{},127.0.0.1:{}", first.port(), second.port()),
    );
    let service = ServiceProcess::start(&target).await;
    let at_first = format!("127.0.0.1:{}", first.port());
    assert!(
        service.log().contains(&at_first),
        "connects to the first:\n{}",
        service.log()
    );
    mqtt_publish(
        first.port(),
        &target.topic("dev0", "data"),
        br#"{"seq": 1}"#,
        QoS::AtLeastOnce,
    )
    .await
    .unwrap();
    wait_devices_at_seq(&pool, 1, 1, Duration::from_secs(20)).await;

    first.kill().await;
    // On the second broker, subscribed again; what it is sent arrives.
    wait_until_named(
        "subscribed on the second broker",
        Duration::from_secs(20),
        Duration::from_millis(50),
        async || {
            let log = service.log();
            let connected = format!(
                "connected to the MQTT broker broker=127.0.0.1:{}",
                second.port()
            );
            log.find(&connected)
                .is_some_and(|at| log[at..].contains("subscribed topic="))
        },
    )
    .await
    .unwrap();
    mqtt_publish(
        second.port(),
        &target.topic("dev0", "data"),
        br#"{"seq": 2}"#,
        QoS::AtLeastOnce,
    )
    .await
    .unwrap();
    wait_devices_at_seq(&pool, 1, 2, Duration::from_secs(20)).await;
    // A broker that never had our session: the lost-session warning says so.
    assert!(
        service
            .log()
            .contains("no longer had this client's session"),
        "the session's loss is logged:\n{}",
        service.log()
    );
    drop(service);
}

#[tokio::test]
async fn check_config_walks_both_lists() {
    let db = TestDb::new().await;
    let dead_db = free_port();
    let dead_broker = free_port();
    let run = |db_hosts: String, brokers: String| {
        std::process::Command::new(env!("CARGO_BIN_EXE_mqtt-ingest"))
            .args(["--env-file", "/dev/null", "--check-config"])
            .env_clear()
            .env("MQTT_BROKER", brokers)
            .env("MQTT_PORT", shared_mqtt_port().to_string())
            .env("DB_HOST", db_hosts)
            .env("DB_PORT", db.port.to_string())
            .env("DB_NAME", &db.name)
            .env("DB_USER", &db.user)
            .env("DB_PASSWORD", &db.password)
            .env("DB_CONNECT_TIMEOUT_SECS", "2")
            .output()
            .unwrap()
    };
    let good_db = format!("{}:{}", db.host, db.port);
    let output = run(
        format!("127.0.0.1:{dead_db},{good_db}"),
        format!("127.0.0.1:{dead_broker},127.0.0.1"),
    );
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "any host answering is enough:\n{text}"
    );
    assert!(
        text.contains(&format!("database 127.0.0.1:{dead_db}/{}", db.name))
            && text.contains("FAILED"),
        "the dead node is named:\n{text}"
    );
    assert!(
        text.contains(&format!("database {good_db}/{}", db.name)),
        "{text}"
    );
    assert!(
        text.contains(&format!(
            "broker 127.0.0.1:{dead_broker} as anonymous: FAILED"
        )),
        "{text}"
    );
    assert!(
        text.contains(&format!(
            "broker 127.0.0.1:{} as anonymous: ok",
            shared_mqtt_port()
        )),
        "{text}"
    );

    // No host answering fails the check.
    let output = run(
        format!("127.0.0.1:{dead_db}"),
        format!("127.0.0.1:{dead_broker}"),
    );
    assert!(!output.status.success());
}

/// A TCP proxy in front of the database that, once armed, forwards the next `COMMIT` to the
/// server and then closes the connection before the server's answer can come back: the
/// transaction is committed, and the service cannot know it.
struct CommitCutter {
    port: u16,
    armed: Arc<AtomicBool>,
    cuts: Arc<AtomicU64>,
    accept: tokio::task::JoinHandle<()>,
}

impl CommitCutter {
    async fn start(upstream: u16) -> Self {
        let listener = TcpListener::bind(("127.0.0.1", 0)).await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let armed = Arc::new(AtomicBool::new(false));
        let cuts = Arc::new(AtomicU64::new(0));
        let (a, c) = (armed.clone(), cuts.clone());
        let accept = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = TcpStream::connect(("127.0.0.1", upstream)).await else {
                    continue;
                };
                let cut = Arc::new(AtomicBool::new(false));
                let (mut cr, mut cw) = client.into_split();
                let (mut sr, mut sw) = server.into_split();
                let (armed, cuts, cut2) = (a.clone(), c.clone(), cut.clone());
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 64 * 1024];
                    loop {
                        let n = match cr.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => n,
                        };
                        let chunk = &buf[..n];
                        // COM_QUERY (3) "COMMIT": the text protocol's commit.
                        let commit = chunk.windows(7).any(|w| w == b"\x03COMMIT");
                        if commit && armed.swap(false, Ordering::SeqCst) {
                            cut2.store(true, Ordering::SeqCst);
                            let _ = sw.write_all(chunk).await;
                            cuts.fetch_add(1, Ordering::SeqCst);
                            return; // both halves dropped: the client sees the connection end
                        }
                        if sw.write_all(chunk).await.is_err() {
                            return;
                        }
                    }
                });
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 64 * 1024];
                    loop {
                        let n = match sr.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => n,
                        };
                        if cut.load(Ordering::SeqCst) || cw.write_all(&buf[..n]).await.is_err() {
                            return; // the answer to the cut COMMIT never reaches the client
                        }
                    }
                });
            }
        });
        Self {
            port,
            armed,
            cuts,
            accept,
        }
    }
}

impl Drop for CommitCutter {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_whose_answer_is_lost_is_retried_and_writes_the_same() {
    let db = TestDb::new().await;
    let pool = db.pool();
    migrate(&pool).await;
    register(&pool, "dev0").await;
    register(&pool, "dev1").await;
    let cutter = CommitCutter::start(db.port).await;
    let mut target = Target::new(&db, shared_mqtt_port()).with("HISTORY_ENABLED", "true");
    target.db_port = cutter.port;
    let service = spawn_service(&target).await;
    cutter.armed.store(true, Ordering::SeqCst);
    // The same reading for two devices: the first commit's answer is lost, and the retry
    // writes that batch again on another connection.
    let reading = br#"{"temperature": 21.5, "humidity": 40, "timestamp": "2026-01-01T00:00:05Z"}"#;
    for d in ["dev0", "dev1"] {
        mqtt_publish(
            target.mqtt_port,
            &target.topic(d, "data"),
            &reading[..],
            QoS::AtLeastOnce,
        )
        .await
        .unwrap();
    }
    let done = service.settled(2).await;
    assert_eq!(cutter.cuts.load(Ordering::SeqCst), 1, "a commit was cut");
    assert_eq!((done.succeeded, done.failed), (2, 0));
    assert!(done.db_errors >= 1, "the lost answer was an error, retried");
    // Written once in effect: the rows are what one write gives, history holds one row per
    // reading (its unique key absorbs the repeat).
    for d in ["dev0", "dev1"] {
        let row = crate::app::device(&pool, d).await.unwrap().unwrap();
        assert_eq!(
            crate::app::sensor(&row, "temperature"),
            Some(serde_json::json!(21.5)),
            "{row:?}"
        );
        let history: i64 =
            sqlx::query_scalar("SELECT COUNT(*) FROM device_history WHERE device_uuid = ?")
                .bind(d)
                .fetch_one(&pool)
                .await
                .unwrap();
        assert_eq!(history, 2, "temperature and humidity, once each");
    }
    service.stop().await.unwrap();
}
