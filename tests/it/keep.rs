//! Presence (offline after silence, last will), sensor history and kept rejects, against the
//! real Mosquitto and MariaDB.

use std::time::Duration;

use crate::app::{Target, migrate, register, sensor, spawn_service, wait_for_device};
use crate::common::{
    QoS, TestDb, mqtt_publish, publish_many, shared_mqtt_port, unique_name, wait_until_named,
};
use rumqttc::{AsyncClient, LastWill, MqttOptions};
use serde_json::json;
use sqlx::MySqlPool;

async fn setup() -> (TestDb, Target) {
    let db = TestDb::new().await;
    migrate(&db.pool()).await;
    let target = Target::new(&db, shared_mqtt_port());
    (db, target)
}

async fn count(pool: &MySqlPool, sql: &str) -> i64 {
    sqlx::query_scalar(sqlx::AssertSqlSafe(sql.to_owned()))
        .fetch_one(pool)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_device_goes_offline_and_a_heartbeat_brings_it_back() {
    let (db, target) = setup().await;
    let target = target
        .with("PRESENCE_TIMEOUT_SECS", "2")
        .with("PRESENCE_SWEEP_SECS", "1");
    let pool = db.pool();
    register(&pool, "quiet").await;
    let service = spawn_service(&target).await;
    mqtt_publish(
        target.mqtt_port,
        &target.topic("quiet", "data"),
        r#"{"t": 1}"#,
        QoS::AtLeastOnce,
    )
    .await
    .unwrap();
    wait_for_device(&pool, "quiet", "online after data", |r| r.is_online).await;
    let offline = wait_for_device(&pool, "quiet", "offline after silence", |r| !r.is_online).await;
    assert_eq!(
        sensor(&offline, "t"),
        Some(json!(1)),
        "going offline keeps the data"
    );
    mqtt_publish(
        target.mqtt_port,
        &target.topic("quiet", "heartbeat"),
        "",
        QoS::AtLeastOnce,
    )
    .await
    .unwrap();
    wait_for_device(&pool, "quiet", "online after a heartbeat", |r| r.is_online).await;
    service.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_devices_last_will_takes_it_offline_at_once() {
    let (db, target) = setup().await;
    // The sweep is off: only the last will can set the device offline.
    let target = target.with("PRESENCE_TIMEOUT_SECS", "0");
    let pool = db.pool();
    register(&pool, "esp32-lwt").await;
    let service = spawn_service(&target).await;

    let mut options = MqttOptions::new(unique_name("dev"), "127.0.0.1", target.mqtt_port);
    options
        .set_keep_alive(Duration::from_secs(30))
        .set_last_will(LastWill::new(
            target.topic("esp32-lwt", "status"),
            r#"{"status": "offline"}"#,
            QoS::AtLeastOnce,
            false,
        ));
    let (device, mut eventloop) = AsyncClient::new(options, 10);
    let device_loop = tokio::spawn(async move {
        loop {
            if let Err(e) = eventloop.poll().await {
                panic!("device connection failed: {e}");
            }
        }
    });
    device
        .publish(
            target.topic("esp32-lwt", "status"),
            QoS::AtLeastOnce,
            false,
            r#"{"status": "online"}"#,
        )
        .await
        .unwrap();
    wait_for_device(&pool, "esp32-lwt", "online", |r| r.is_online).await;

    // The device dies: its connection drops without a DISCONNECT, so the broker publishes the will.
    device_loop.abort();
    let _ = device_loop.await;
    drop(device);
    let row = wait_for_device(&pool, "esp32-lwt", "offline by last will", |r| !r.is_online).await;
    assert_eq!(row.device_status.as_deref(), Some("offline"));
    service.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_keeps_every_reading_once_and_old_rows_are_removed() {
    let (db, target) = setup().await;
    let target = target
        .with("HISTORY_ENABLED", "true")
        .with("HISTORY_RETENTION_DAYS", "30")
        .with("MAINTENANCE_INTERVAL_SECS", "1");
    let pool = db.pool();
    register(&pool, "h1").await;
    // A row from long ago, for retention.
    sqlx::query(
        "INSERT INTO device_history (device_uuid, sensor, value, unit, reading_time, received_at) \
         VALUES ('h1', 'old', 1, '', UTC_TIMESTAMP() - INTERVAL 40 DAY, UTC_TIMESTAMP() - INTERVAL 40 DAY)",
    )
    .execute(&pool)
    .await
    .unwrap();
    let service = spawn_service(&target).await;
    let full = r#"{"sensors": [{"sensor_name": "temperature", "value": 25.5, "unit": "°C", "timestamp": "2025-12-19T14:30:00+08:00"},
                               {"sensor_name": "humidity", "value": 60, "unit": "%", "timestamp": "2025-12-19T14:30:00+08:00"}]}"#;
    let topic = target.topic("h1", "data");
    publish_many(
        target.mqtt_port,
        [
            (topic.clone(), full.as_bytes().to_vec()),
            // The same message again (a redelivery): no second row.
            (topic.clone(), full.as_bytes().to_vec()),
            (
                topic.clone(),
                br#"{"timestamp": "2025-12-19T06:31:00Z", "temperature": 26}"#.to_vec(),
            ),
        ],
        QoS::AtLeastOnce,
    )
    .await
    .unwrap();
    let p = pool.clone();
    wait_until_named(
        "three readings and no old row",
        Duration::from_secs(20),
        Duration::from_millis(50),
        async || {
            let n = count(
                &p,
                "SELECT COUNT(*) FROM device_history WHERE sensor <> 'old'",
            )
            .await;
            let old = count(
                &p,
                "SELECT COUNT(*) FROM device_history WHERE sensor = 'old'",
            )
            .await;
            if n == 3 && old == 0 {
                Ok(true)
            } else {
                anyhow::bail!("{n} readings, {old} old rows")
            }
        },
    )
    .await
    .unwrap();
    let rows: Vec<(String, f64, String, String)> = sqlx::query_as(
        "SELECT sensor, value, unit, DATE_FORMAT(reading_time, '%Y-%m-%d %H:%i:%s') \
         FROM device_history WHERE device_uuid = 'h1' ORDER BY reading_time, sensor",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    // Reading times on Beijing's wall clock (DB_TIMEZONE's default), like every DATETIME.
    assert_eq!(
        rows,
        [
            (
                "humidity".into(),
                60.0,
                "%".into(),
                "2025-12-19 14:30:00".into()
            ),
            (
                "temperature".into(),
                25.5,
                "°C".into(),
                "2025-12-19 14:30:00".into()
            ),
            (
                "temperature".into(),
                26.0,
                "".into(),
                "2025-12-19 14:31:00".into()
            ),
        ]
    );
    service.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejects_are_kept_bounded_and_printed_by_the_command() {
    let (db, target) = setup().await;
    let target = target
        .with("REJECTS_ENABLED", "true")
        .with("REJECTS_KEEP", "4")
        .with("REJECTS_MAX_PAYLOAD_BYTES", "16")
        .with("MAINTENANCE_INTERVAL_SECS", "1");
    let pool = db.pool();
    register(&pool, "known").await;
    let service = spawn_service(&target).await;
    let port = target.mqtt_port;
    publish_many(
        port,
        [
            (
                target.topic("known", "data"),
                b"not json at all, and longer than sixteen bytes".to_vec(),
            ),
            (target.topic("stranger", "data"), br#"{"t": 1}"#.to_vec()),
            (target.topic("known", "data"), br#"{"123abc": 1}"#.to_vec()),
        ],
        QoS::AtLeastOnce,
    )
    .await
    .unwrap();
    let p = pool.clone();
    wait_until_named(
        "three kept rejects",
        Duration::from_secs(20),
        Duration::from_millis(50),
        async || {
            let n = count(&p, "SELECT COUNT(*) FROM ingest_rejects").await;
            if n == 3 {
                Ok(true)
            } else {
                anyhow::bail!("{n} kept")
            }
        },
    )
    .await
    .unwrap();
    let kept: Vec<(String, Option<String>, Vec<u8>, u64)> = sqlx::query_as(
        "SELECT reason, device_uuid, payload, CAST(payload_bytes AS UNSIGNED) FROM ingest_rejects ORDER BY id",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    let reasons: Vec<&str> = kept.iter().map(|k| k.0.as_str()).collect();
    assert!(
        reasons.contains(&"not_json")
            && reasons.contains(&"unknown_device")
            && reasons.contains(&"no_valid_data"),
        "{reasons:?}"
    );
    let not_json = kept.iter().find(|k| k.0 == "not_json").unwrap();
    assert_eq!(
        not_json.2, b"not json at all,",
        "the payload is cut to REJECTS_MAX_PAYLOAD_BYTES"
    );
    assert_eq!(not_json.3, 46);
    let stranger = kept.iter().find(|k| k.0 == "unknown_device").unwrap();
    assert_eq!(stranger.1.as_deref(), Some("stranger"));
    assert_eq!(stranger.2, br#"{"t": 1}"#);

    // The command shows the latest for one device. It reads only the database settings: a
    // broker setting that would stop the service (an unreadable CA file) does not stop it.
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_mqtt-ingest"));
    cmd.args(["rejects", "--device", "stranger", "--env-file", "/dev/null"]);
    for (k, v) in target.vars() {
        cmd.env(k, v);
    }
    cmd.env("MQTT_TLS", "true")
        .env("MQTT_TLS_CA_FILE", "/no/such/ca.pem");
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("unknown_device") && text.contains("/stranger/data"),
        "{text}"
    );
    assert!(
        !text.contains("not_json"),
        "only the device asked for: {text}"
    );

    // Bounded by count: six more, and only the newest four stay.
    let more: Vec<(String, Vec<u8>)> = (0..6)
        .map(|i| {
            (
                target.topic("known", "data"),
                format!("bad {i}").into_bytes(),
            )
        })
        .collect();
    publish_many(port, more, QoS::AtLeastOnce).await.unwrap();
    wait_until_named(
        "only the newest four",
        Duration::from_secs(20),
        Duration::from_millis(100),
        async || {
            let n = count(&p, "SELECT COUNT(*) FROM ingest_rejects").await;
            let newest = count(
                &p,
                "SELECT COUNT(*) FROM ingest_rejects WHERE payload = 'bad 5'",
            )
            .await;
            if n == 4 && newest == 1 {
                Ok(true)
            } else {
                anyhow::bail!("{n} kept, newest there: {newest}")
            }
        },
    )
    .await
    .unwrap();
    service.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sweep_sets_offline_in_sql_so_it_is_right_after_a_restart() {
    let (db, _) = setup().await;
    let pool = db.pool();
    register(&pool, "stale").await;
    register(&pool, "fresh").await;
    // last_seen on Beijing's wall clock, as the service (DB_TIMEZONE's default) writes it.
    sqlx::query("UPDATE device_main SET is_online = 1, last_seen = UTC_TIMESTAMP() + INTERVAL 8 HOUR - INTERVAL 10 MINUTE WHERE uuid = 'stale'")
        .execute(&pool)
        .await
        .unwrap();
    sqlx::query(
        "UPDATE device_main SET is_online = 1, last_seen = UTC_TIMESTAMP() + INTERVAL 8 HOUR WHERE uuid = 'fresh'",
    )
    .execute(&pool)
    .await
    .unwrap();
    let changed = mqtt_ingest::store::presence::sweep(
        &pool,
        Duration::from_secs(90),
        &mqtt_ingest::intake::zone::Zone::default(),
    )
    .await
    .unwrap();
    assert_eq!(changed, 1);
    assert!(
        !crate::app::device(&pool, "stale")
            .await
            .unwrap()
            .unwrap()
            .is_online
    );
    assert!(
        crate::app::device(&pool, "fresh")
            .await
            .unwrap()
            .unwrap()
            .is_online
    );
}

/// The sweep reads every online row (CodeHubot's table has no index on last_seen): it must not
/// wait on a device a writer holds, only set the silent ones offline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sweep_does_not_wait_on_a_row_a_writer_holds() {
    let (db, _) = setup().await;
    let pool = db.pool();
    register(&pool, "stale").await;
    register(&pool, "held").await;
    sqlx::query("UPDATE device_main SET is_online = 1, last_seen = UTC_TIMESTAMP() + INTERVAL 8 HOUR - INTERVAL 10 MINUTE WHERE uuid = 'stale'")
        .execute(&pool)
        .await
        .unwrap();
    sqlx::query(
        "UPDATE device_main SET is_online = 1, last_seen = UTC_TIMESTAMP() + INTERVAL 8 HOUR WHERE uuid = 'held'",
    )
    .execute(&pool)
    .await
    .unwrap();
    // A writer's transaction holds the fresh device's row (as a batch does until its commit).
    let mut writer = pool.begin().await.unwrap();
    sqlx::query("SELECT id FROM device_main WHERE uuid = 'held' FOR UPDATE")
        .fetch_all(&mut *writer)
        .await
        .unwrap();
    let swept = tokio::time::timeout(
        Duration::from_secs(10),
        mqtt_ingest::store::presence::sweep(
            &pool,
            Duration::from_secs(90),
            &mqtt_ingest::intake::zone::Zone::default(),
        ),
    )
    .await
    .expect("the sweep waited on the held row (innodb_lock_wait_timeout is 50 s)")
    .unwrap();
    assert_eq!(swept, 1);
    writer.rollback().await.unwrap();
    assert!(
        crate::app::device(&pool, "held")
            .await
            .unwrap()
            .unwrap()
            .is_online
    );
}
