//! What only MQTT 5 has: the session expiry. Under MQTT 5 a session ends with its connection
//! unless the client asks the broker to keep it, so these tests set `MQTT_PROTOCOL=5` whatever
//! `TEST_MQTT_PROTOCOL` says. (Everything else of the ingest path runs under MQTT 5 through
//! `TEST_MQTT_PROTOCOL=5`; see scripts/test.sh.)

use crate::app::{Target, migrate, register, sensor, spawn_service, wait_for_device};
use crate::common::{QoS, TestDb, clear_session, publish_many, shared_mqtt_port};
use serde_json::json;

const DEVICES: usize = 20;

fn readings(target: &Target, seq: u64) -> Vec<(String, Vec<u8>)> {
    (0..DEVICES)
        .map(|d| {
            (
                target.topic(&format!("dev{d}"), "data"),
                format!(r#"{{"seq": {seq}}}"#).into_bytes(),
            )
        })
        .collect()
}

/// Runs a v5 service with `expiry`, stops it cleanly (DISCONNECT), publishes one reading per
/// device while it is away, starts it again and publishes a marker after it subscribed. Returns
/// how many devices got the reading sent while it was away, counted once the marker landed
/// (the broker delivers a resumed session's queue before anything published later), and how
/// many messages the restarted service received.
async fn published_while_stopped(expiry: &str) -> (i64, u64) {
    let db = TestDb::new().await;
    let pool = db.pool();
    migrate(&pool).await;
    for d in 0..DEVICES {
        register(&pool, &format!("dev{d}")).await;
    }
    register(&pool, "marker").await;
    let target = Target::new(&db, shared_mqtt_port())
        .with("MQTT_PROTOCOL", "5")
        .with("MQTT_SESSION_EXPIRY_SECS", expiry);

    let first = spawn_service(&target).await;
    publish_many(target.mqtt_port, readings(&target, 1), QoS::AtLeastOnce)
        .await
        .unwrap();
    first.settled(DEVICES as u64).await;
    assert_eq!(crate::app::devices_at_seq(&pool, 1).await.unwrap(), DEVICES);
    first.stop_keeping_session().await.unwrap();

    // The service is away: only its session, if the broker kept it, can take these.
    publish_many(target.mqtt_port, readings(&target, 2), QoS::AtLeastOnce)
        .await
        .unwrap();

    let second = spawn_service(&target).await;
    publish_many(
        target.mqtt_port,
        [(target.topic("marker", "data"), br#"{"seq": 99}"#.to_vec())],
        QoS::AtLeastOnce,
    )
    .await
    .unwrap();
    let row = wait_for_device(&pool, "marker", "the marker to land", |r| {
        sensor(r, "seq") == Some(json!(99))
    })
    .await;
    assert!(row.data.is_some());
    let received = second.stats.snapshot().received;
    let landed = crate::app::devices_at_seq(&pool, 2).await.unwrap() as i64;
    second.stop().await.unwrap();
    clear_session(target.mqtt_port, &target.client_id)
        .await
        .unwrap();
    (landed, received)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_v5_session_with_an_expiry_keeps_what_was_published_across_a_restart() {
    let (landed, received) = published_while_stopped("3600").await;
    assert_eq!(landed, DEVICES as i64, "every queued reading landed");
    assert_eq!(
        received,
        DEVICES as u64 + 1,
        "the queued readings and the marker"
    );
}

/// The control: MQTT 5's own default, expiry 0, ends the session at the DISCONNECT, and what is
/// published meanwhile is lost. This is why the service asks for an expiry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_v5_session_without_an_expiry_ends_with_the_connection() {
    let (landed, received) = published_while_stopped("0").await;
    assert_eq!(landed, 0, "no session, so nothing was queued");
    assert_eq!(received, 1, "only the marker");
}

fn check_config(target: &Target) -> (bool, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_mqtt-ingest"))
        .arg("--env-file")
        .arg("/dev/null")
        .arg("--check-config")
        .env_clear()
        .envs(target.vars())
        .output()
        .expect("run mqtt-ingest --check-config");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    (out.status.success(), stdout)
}

/// `--check-config` speaks MQTT 5 too, and describes a broker that is not there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_config_connects_with_mqtt_5() {
    let db = TestDb::new().await;
    let target = Target::new(&db, shared_mqtt_port()).with("MQTT_PROTOCOL", "5");
    let (ok, out) = check_config(&target);
    assert!(ok, "{out}");
    assert!(
        out.contains(&format!(
            "broker 127.0.0.1:{} as anonymous: ok",
            target.mqtt_port
        )),
        "{out}"
    );

    let closed = crate::common::free_port();
    let (ok, out) = check_config(&target.clone().with("MQTT_PORT", &closed.to_string()));
    assert!(!ok, "{out}");
    assert!(
        out.contains("FAILED") && out.contains("check MQTT_BROKER / MQTT_PORT"),
        "{out}"
    );
}
