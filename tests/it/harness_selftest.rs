//! Checks that the shared test harness (tests/common) itself works.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use crate::common::{
    PrivateMariaDb, PrivateMosquitto, QoS, TestDb, TestSubscriber, clear_session, free_port,
    mqtt_publish, publish_many, shared_mqtt_port, unique_name, wait_until,
};
use sqlx::{AssertSqlSafe, Connection as _, MySqlConnection};

const SECS_10: Duration = Duration::from_secs(10);
const POLL: Duration = Duration::from_millis(20);

#[test]
fn unique_names_are_unique_and_safe() {
    let names: Vec<String> = (0..2000).map(|_| unique_name("Dev-Ice")).collect();
    let distinct: HashSet<&String> = names.iter().collect();
    assert_eq!(distinct.len(), names.len());
    for name in &names {
        assert!(name.starts_with("dev_ice_"), "{name}");
        assert!(
            name.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'),
            "{name}"
        );
        assert!(name.len() <= 40, "{name}");
    }
    assert!(unique_name("mi").len() <= 23, "{}", unique_name("mi"));
}

#[test]
fn free_ports_are_distinct_and_bindable() {
    let ports: Vec<u16> = (0..50).map(|_| free_port()).collect();
    let distinct: HashSet<&u16> = ports.iter().collect();
    assert_eq!(distinct.len(), ports.len());
    for port in ports {
        std::net::TcpListener::bind(("127.0.0.1", port)).expect("port is free");
    }
}

#[tokio::test]
async fn wait_until_returns_values_and_reports_the_last_error() {
    let mut n = 0;
    let got = wait_until(SECS_10, Duration::from_millis(1), async || {
        n += 1;
        (n >= 3).then_some(n * 10)
    })
    .await
    .unwrap();
    assert_eq!(got, 30);

    wait_until(SECS_10, Duration::from_millis(1), async || true)
        .await
        .unwrap();

    let mut tries = 0;
    let err = wait_until(
        Duration::from_millis(200),
        Duration::from_millis(20),
        async || {
            tries += 1;
            if tries > 0 {
                anyhow::bail!("still {tries} rows");
            }
            Ok(true)
        },
    )
    .await
    .unwrap_err()
    .to_string();
    assert!(err.contains("timed out"), "{err}");
    assert!(err.contains(&format!("still {tries} rows")), "{err}");

    let err = wait_until(Duration::from_millis(50), POLL, async || false)
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("returned false"), "{err}");

    // A condition that hangs is abandoned at the deadline.
    let started = Instant::now();
    let err = wait_until(Duration::from_millis(300), POLL, async || {
        tokio::time::sleep(Duration::from_secs(60)).await;
        true
    })
    .await
    .unwrap_err()
    .to_string();
    assert!(started.elapsed() < Duration::from_secs(5));
    assert!(err.contains("still running"), "{err}");
}

#[tokio::test]
async fn test_db_is_created_usable_and_dropped() {
    let db = TestDb::new().await;
    assert!(db.name.starts_with("mi_"), "{}", db.name);
    let pool = db.pool();
    sqlx::raw_sql(
        "CREATE TABLE t (id INT PRIMARY KEY, v VARCHAR(20)); INSERT INTO t VALUES (1, 'x')",
    )
    .execute(&pool)
    .await
    .unwrap();
    let v: String = sqlx::query_scalar("SELECT v FROM t WHERE id = 1")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(v, "x");
    let current: String = sqlx::query_scalar("SELECT DATABASE()")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(current, db.name);
    assert!(
        db.url().ends_with(&format!(":{}/{}", db.port, db.name)),
        "{}",
        db.url()
    );

    let admin = db.server_connect_options();
    let name = db.name.clone();
    let mut conn = MySqlConnection::connect_with(&admin).await.unwrap();
    assert!(database_exists(&mut conn, &name).await);

    // A second TestDb is a different database.
    let other = TestDb::new().await;
    assert_ne!(other.name, name);

    pool.close().await;
    drop(db);
    assert!(
        !database_exists(&mut conn, &name).await,
        "{name} still exists"
    );
    assert!(database_exists(&mut conn, &other.name).await);
}

async fn database_exists(conn: &mut MySqlConnection, name: &str) -> bool {
    let n: i64 = sqlx::query_scalar(
        "SELECT COUNT(*) FROM information_schema.SCHEMATA WHERE SCHEMA_NAME = ?",
    )
    .bind(name)
    .fetch_one(conn)
    .await
    .unwrap();
    n == 1
}

#[tokio::test]
async fn publish_helpers_work_on_the_shared_broker() {
    let port = shared_mqtt_port();
    let prefix = unique_name("st");
    let mut sub = TestSubscriber::connect(
        port,
        &unique_name("sub"),
        true,
        &[(&format!("{prefix}/#"), QoS::AtLeastOnce)],
    )
    .await
    .unwrap();

    mqtt_publish(port, &format!("{prefix}/one"), "hello", QoS::AtLeastOnce)
        .await
        .unwrap();
    let m = sub.recv(SECS_10).await.unwrap();
    assert_eq!(m.topic, format!("{prefix}/one"));
    assert_eq!(m.payload_str(), "hello");

    for qos in [QoS::AtMostOnce, QoS::AtLeastOnce, QoS::ExactlyOnce] {
        let messages: Vec<(String, String)> = (0..200)
            .map(|i| (format!("{prefix}/many"), format!("{{\"i\":{i}}}")))
            .collect();
        publish_many(port, messages, qos).await.unwrap();
        let got = sub
            .recv_many(200, SECS_10)
            .await
            .map_err(|e| e.context(format!("{qos:?}")))
            .unwrap();
        for (i, m) in got.iter().enumerate() {
            assert_eq!(m.json().unwrap()["i"], i, "{qos:?}");
        }
    }
    sub.disconnect().await.unwrap();
}

#[tokio::test]
async fn publishing_to_a_dead_port_fails_quickly() {
    let port = free_port();
    let started = Instant::now();
    let err = mqtt_publish(port, "x", "y", QoS::AtLeastOnce)
        .await
        .unwrap_err();
    assert!(started.elapsed() < SECS_10, "{err:#}");
    let err = TestSubscriber::connect(port, &unique_name("sub"), true, &[])
        .await
        .err()
        .expect("connect to a dead port fails");
    assert!(format!("{err:#}").contains("connection failed"), "{err:#}");
}

#[tokio::test]
async fn private_mosquitto_keeps_persistent_sessions_across_restarts() {
    let started = Instant::now();
    let mut broker = PrivateMosquitto::start().await;
    eprintln!("private mosquitto started in {:?}", started.elapsed());
    let port = broker.port();
    assert_ne!(port, shared_mqtt_port());

    let client_id = unique_name("ps");
    let topic = format!("{client_id}/telemetry");

    // Create a persistent session with a QoS 1 subscription, then leave.
    let sub = TestSubscriber::connect(port, &client_id, false, &[(&topic, QoS::AtLeastOnce)])
        .await
        .unwrap();
    assert!(!sub.session_present());
    sub.disconnect().await.unwrap();

    // Queued for the offline session.
    mqtt_publish(port, &topic, "queued-1", QoS::AtLeastOnce)
        .await
        .unwrap();

    let t = Instant::now();
    broker.stop().await;
    assert!(!broker.is_running());
    eprintln!("private mosquitto stopped in {:?}", t.elapsed());
    let err = mqtt_publish(port, &topic, "nobody home", QoS::AtLeastOnce).await;
    assert!(err.is_err(), "broker is down");

    let t = Instant::now();
    broker.restart().await;
    eprintln!("private mosquitto restarted in {:?}", t.elapsed());
    assert_eq!(broker.port(), port);

    let mut sub = TestSubscriber::connect(port, &client_id, false, &[])
        .await
        .unwrap();
    assert!(sub.session_present(), "session lost\n{}", broker.log_tail());
    let m = sub.recv(SECS_10).await.unwrap();
    assert_eq!(m.topic, topic);
    assert_eq!(m.payload_str(), "queued-1");
    assert_eq!(m.qos, QoS::AtLeastOnce);
    sub.disconnect().await.unwrap();

    // clear_session removes it.
    clear_session(port, &client_id).await.unwrap();
    let sub = TestSubscriber::connect(port, &client_id, false, &[])
        .await
        .unwrap();
    assert!(!sub.session_present());
    sub.disconnect().await.unwrap();
    clear_session(port, &client_id).await.unwrap();

    // kill + restart also works, and the log is readable.
    broker.kill().await;
    assert!(!broker.is_running());
    broker.restart().await;
    mqtt_publish(port, &topic, "after kill", QoS::AtLeastOnce)
        .await
        .unwrap();
    let log = broker.log_tail();
    assert!(log.contains("mosquitto version"), "{log}");
}

#[tokio::test]
async fn a_subscriber_reconnects_after_a_broker_restart() {
    let mut broker = PrivateMosquitto::start().await;
    let port = broker.port();
    let client_id = unique_name("rc");
    let topic = format!("{client_id}/t");
    let mut sub = TestSubscriber::connect(port, &client_id, false, &[(&topic, QoS::AtLeastOnce)])
        .await
        .unwrap();
    broker.stop().await;
    wait_until(SECS_10, POLL, async || !sub.is_connected())
        .await
        .unwrap();
    broker.restart().await;
    wait_until(SECS_10, POLL, async || sub.is_connected())
        .await
        .unwrap();
    mqtt_publish(port, &topic, "again", QoS::AtLeastOnce)
        .await
        .unwrap();
    assert_eq!(sub.recv(SECS_10).await.unwrap().payload_str(), "again");
    sub.disconnect().await.unwrap();
}

#[tokio::test]
async fn private_mariadb_survives_kill_and_restart() {
    let started = Instant::now();
    let mut server = PrivateMariaDb::start().await;
    eprintln!("private mariadb started in {:?}", started.elapsed());
    let port = server.port();
    assert_ne!(port, 3306);

    let mut conn = MySqlConnection::connect_with(&server.connect_options())
        .await
        .unwrap();
    let one: i64 = sqlx::query_scalar("SELECT 1")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert_eq!(one, 1);
    let user: String = sqlx::query_scalar("SELECT CURRENT_USER()")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert_eq!(user, "root@127.0.0.1");
    let charset: String = sqlx::query_scalar("SELECT @@character_set_server")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert_eq!(charset, "utf8mb4");
    drop(conn);

    // A TestDb on the private server; committed rows survive SIGKILL.
    let db = server.test_db().await;
    sqlx::raw_sql(AssertSqlSafe(
        "CREATE TABLE t (id INT PRIMARY KEY) ENGINE=InnoDB; INSERT INTO t VALUES (1), (2)",
    ))
    .execute(&db.pool())
    .await
    .unwrap();

    let t = Instant::now();
    server.kill().await;
    assert!(!server.is_running());
    eprintln!("private mariadb killed in {:?}", t.elapsed());
    assert!(
        MySqlConnection::connect_with(&server.connect_options())
            .await
            .is_err()
    );

    let t = Instant::now();
    server.restart().await;
    eprintln!(
        "private mariadb restarted after SIGKILL in {:?}",
        t.elapsed()
    );
    assert_eq!(server.port(), port);

    let pool = server.pool().await.unwrap();
    let one: i64 = sqlx::query_scalar("SELECT 1")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(one, 1);
    let n: i64 = sqlx::query_scalar(AssertSqlSafe(format!(
        "SELECT COUNT(*) FROM `{}`.t",
        db.name
    )))
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(n, 2);

    let t = Instant::now();
    server.stop().await;
    eprintln!("private mariadb stopped in {:?}", t.elapsed());
    server.restart().await;
    let n: i64 = sqlx::query_scalar(AssertSqlSafe(format!(
        "SELECT COUNT(*) FROM `{}`.t",
        db.name
    )))
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(n, 2);
    assert!(server.log_tail().contains("ready for connections"));

    // The pool still has connections from before; the TestDb drop must work.
    pool.close().await;
    let name = db.name.clone();
    drop(db);
    let mut conn = MySqlConnection::connect_with(&server.connect_options())
        .await
        .unwrap();
    assert!(!database_exists(&mut conn, &name).await);
}
