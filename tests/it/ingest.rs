//! End to end against the shared Mosquitto and MariaDB: the seed's examples, unknown devices,
//! rejected input, and migrations on a backend's existing table. Each test has its own
//! database, client id and topic prefix.

use std::time::Duration;

use crate::app::{
    DeviceRow, Target, device, migrate, register, sensor, spawn_service, wait_for_device,
};
use crate::common::{QoS, TestDb, mqtt_publish, shared_mqtt_port, wait_until_named};
use serde_json::{Value, json};

const SEED_DEVICE: &str = "test-device-uuid";

/// Publishes exactly as the seed's README does, with `mosquitto_pub` (QoS 1 so that the broker
/// has it when this returns).
fn mosquitto_pub(target: &Target, topic: &str, payload: &str) {
    let status = std::process::Command::new("mosquitto_pub")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &target.mqtt_port.to_string(),
            "-q",
            "1",
        ])
        .args(["-t", topic, "-m", payload])
        .status()
        .expect("run mosquitto_pub (scripts/setup.sh installs mosquitto-clients)");
    assert!(status.success(), "mosquitto_pub failed");
}

fn is_rfc3339(v: &Value) -> bool {
    v.as_str()
        .is_some_and(|s| chrono::DateTime::parse_from_rfc3339(s).is_ok())
}

async fn setup() -> (TestDb, Target) {
    let db = TestDb::new().await;
    migrate(&db.pool()).await;
    let target = Target::new(&db, shared_mqtt_port());
    (db, target)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seed_readme_examples_end_in_the_stated_rows() {
    let (db, target) = setup().await;
    let pool = db.pool();
    register(&pool, SEED_DEVICE).await;
    let service = spawn_service(&target).await;

    // 1. Full ("HTTP API") format, the seed's mosquitto_pub example.
    mosquitto_pub(
        &target,
        &target.topic(SEED_DEVICE, "data"),
        r#"{
    "sensors": [
      {"sensor_name": "temperature", "value": 25.5, "unit": "°C"},
      {"sensor_name": "humidity", "value": 60, "unit": "%"}
    ],
    "status": {
      "ip_address": "192.168.1.100",
      "rssi": -50
    },
    "timestamp": "2025-12-19T14:30:00+08:00"
  }"#,
    );
    let row = wait_for_device(&pool, SEED_DEVICE, "the full-format data", |r| {
        r.data.is_some()
    })
    .await;
    assert!(row.is_online);
    assert!(row.last_seen.is_some());
    let data = row.data.clone().unwrap();
    assert_eq!(data["sensors"]["temperature"]["value"], json!(25.5));
    assert_eq!(data["sensors"]["temperature"]["unit"], json!("°C"));
    assert!(is_rfc3339(&data["sensors"]["temperature"]["timestamp"]));
    assert_eq!(data["sensors"]["humidity"]["value"], json!(60));
    assert_eq!(data["sensors"]["humidity"]["unit"], json!("%"));
    assert_eq!(
        data["status"],
        json!({"ip_address": "192.168.1.100", "rssi": -50})
    );
    assert!(is_rfc3339(&data["upload_timestamp"]));
    assert_eq!(
        data.as_object().unwrap().keys().collect::<Vec<_>>(),
        ["sensors", "status", "upload_timestamp"]
    );

    // 2. Simple format: merges by sensor name, keeps the status.
    mosquitto_pub(
        &target,
        &target.topic(SEED_DEVICE, "data"),
        r#"{"temperature": 25.5, "humidity": 60, "light": 850}"#,
    );
    let row = wait_for_device(&pool, SEED_DEVICE, "the simple-format data", |r| {
        sensor(r, "light").is_some()
    })
    .await;
    let data = row.data.clone().unwrap();
    for (name, value) in [
        ("temperature", json!(25.5)),
        ("humidity", json!(60)),
        ("light", json!(850)),
    ] {
        assert_eq!(data["sensors"][name]["value"], value, "{name}");
        assert_eq!(data["sensors"][name]["unit"], json!(""), "{name}");
        assert!(is_rfc3339(&data["sensors"][name]["timestamp"]), "{name}");
    }
    assert_eq!(
        data["status"]["rssi"],
        json!(-50),
        "status survives a data message without one"
    );

    // 3. Status: merged into last_report_data.status, device_status set.
    mosquitto_pub(
        &target,
        &target.topic(SEED_DEVICE, "status"),
        r#"{"status": "online", "battery": 95, "signal": "good"}"#,
    );
    let row = wait_for_device(&pool, SEED_DEVICE, "the status", |r| {
        r.device_status.as_deref() == Some("online")
    })
    .await;
    assert!(row.is_online);
    assert_eq!(
        row.data.as_ref().unwrap()["status"],
        json!({"ip_address": "192.168.1.100", "rssi": -50, "status": "online", "battery": 95, "signal": "good"})
    );
    assert_eq!(
        sensor(&row, "light"),
        Some(json!(850)),
        "status leaves sensors alone"
    );

    // 4. Heartbeat: last_heartbeat and last_seen, online.
    let before: DeviceRow = row;
    mosquitto_pub(
        &target,
        &target.topic(SEED_DEVICE, "heartbeat"),
        r#"{"timestamp": "2025-12-19T14:30:00+08:00"}"#,
    );
    let row = wait_for_device(&pool, SEED_DEVICE, "the heartbeat", |r| {
        r.last_heartbeat.is_some()
    })
    .await;
    assert!(row.is_online);
    assert!(row.last_seen >= before.last_seen);
    assert_eq!(
        row.data, before.data,
        "a heartbeat does not touch last_report_data"
    );

    // 5. The device's last will: offline.
    mosquitto_pub(
        &target,
        &target.topic(SEED_DEVICE, "status"),
        r#"{"status": "offline"}"#,
    );
    let row = wait_for_device(&pool, SEED_DEVICE, "offline", |r| !r.is_online).await;
    assert_eq!(row.device_status.as_deref(), Some("offline"));

    let snap = service.settled(5).await;
    assert_eq!((snap.received, snap.succeeded, snap.failed), (5, 5, 0));
    service.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn brief_full_payload_with_location_and_per_sensor_time() {
    let (db, target) = setup().await;
    let pool = db.pool();
    register(&pool, "0C:DC:7E:1D:74:D0").await;
    let service = spawn_service(&target).await;
    mqtt_publish(
        target.mqtt_port,
        &target.topic("0C:DC:7E:1D:74:D0", "data"),
        r#"{"sensors": [{"sensor_name": "temperature", "value": 25.5, "unit": "°C", "timestamp": "2025-12-19T14:30:00+08:00"},
                        {"sensor_name": "humidity", "value": 60, "unit": "%"}],
            "status": {"ip_address": "192.168.1.100", "rssi": -50, "battery": 95},
            "location": {"latitude": 39.9042, "longitude": 116.4074},
            "timestamp": "2025-12-19T14:30:00+08:00"}"#,
        QoS::AtLeastOnce,
    )
    .await
    .unwrap();
    let row = wait_for_device(&pool, "0C:DC:7E:1D:74:D0", "data", |r| r.data.is_some()).await;
    let data = row.data.unwrap();
    assert_eq!(
        data["sensors"]["temperature"],
        json!({"value": 25.5, "unit": "°C", "timestamp": "2025-12-19T14:30:00+08:00"})
    );
    assert_eq!(
        data["sensors"]["humidity"]["timestamp"],
        data["upload_timestamp"]
    );
    assert_eq!(
        data["location"],
        json!({"latitude": 39.9042, "longitude": 116.4074})
    );
    assert_eq!(
        data["status"],
        json!({"ip_address": "192.168.1.100", "rssi": -50, "battery": 95})
    );
    service.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_device_is_counted_and_nothing_is_written() {
    let (db, target) = setup().await;
    let pool = db.pool();
    register(&pool, "known").await;
    let service = spawn_service(&target).await;
    mqtt_publish(
        target.mqtt_port,
        &target.topic("stranger", "data"),
        r#"{"t": 1}"#,
        QoS::AtLeastOnce,
    )
    .await
    .unwrap();
    // The known device's message comes after the stranger's: once it is written, the
    // stranger's was handled.
    mqtt_publish(
        target.mqtt_port,
        &target.topic("known", "data"),
        r#"{"t": 2}"#,
        QoS::AtLeastOnce,
    )
    .await
    .unwrap();
    wait_for_device(&pool, "known", "the known device's data", |r| {
        sensor(r, "t").is_some()
    })
    .await;
    let stats = service.stats.clone();
    wait_until_named(
        "the rejection count",
        Duration::from_secs(10),
        Duration::from_millis(20),
        async || stats.snapshot().failed == 1,
    )
    .await
    .unwrap();
    let snap = service.stats.snapshot();
    assert_eq!(
        snap.rejected
            .iter()
            .find(|(r, _)| *r == "unknown_device")
            .unwrap()
            .1,
        1
    );
    assert_eq!(snap.succeeded, 1);
    assert!(
        device(&pool, "stranger").await.unwrap().is_none(),
        "no row is created"
    );
    let rows: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM device_main")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(rows, 1);
    service.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_devices_are_registered_when_enabled() {
    let (db, target) = setup().await;
    let target = target.with("INGEST_REGISTER_UNKNOWN_DEVICES", "true");
    let pool = db.pool();
    let service = spawn_service(&target).await;
    mqtt_publish(
        target.mqtt_port,
        &target.topic("newcomer", "data"),
        r#"{"t": 7}"#,
        QoS::AtLeastOnce,
    )
    .await
    .unwrap();
    let row = wait_for_device(&pool, "newcomer", "the new device", |r| {
        sensor(r, "t").is_some()
    })
    .await;
    assert!(row.is_online);
    let (device_id, name): (String, String) =
        sqlx::query_as("SELECT device_id, name FROM device_main WHERE uuid = 'newcomer'")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(
        (device_id.as_str(), name.as_str()),
        ("newcomer", "newcomer")
    );
    service.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rejected_sensor_name_does_not_sink_the_valid_ones() {
    let (db, target) = setup().await;
    let pool = db.pool();
    register(&pool, "esp32").await;
    let service = spawn_service(&target).await;
    mqtt_publish(
        target.mqtt_port,
        &target.topic("esp32", "data"),
        r#"{"123abc": 1, "Temp": 2, "temperature": 21.5, "humidity": "wet"}"#,
        QoS::AtLeastOnce,
    )
    .await
    .unwrap();
    let row = wait_for_device(&pool, "esp32", "the valid sensor", |r| r.data.is_some()).await;
    let sensors = row.data.unwrap()["sensors"].clone();
    assert_eq!(
        sensors.as_object().unwrap().keys().collect::<Vec<_>>(),
        ["temperature"]
    );
    let snap = service.settled(1).await;
    // Two bad names; the string is metadata (as the firmware's "sensor": "DHT11"), not a part.
    assert_eq!((snap.succeeded, snap.failed, snap.parts_skipped), (1, 0, 2));
    service.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_messages_are_rejected_with_reasons_and_good_ones_still_land() {
    let (db, target) = setup().await;
    let pool = db.pool();
    register(&pool, "dev1").await;
    let service = spawn_service(&target).await;
    let port = target.mqtt_port;
    let bad: Vec<(String, Vec<u8>, &str)> = vec![
        (
            target.topic("dev1", "data"),
            b"not json".to_vec(),
            "not_json",
        ),
        (
            target.topic("dev1", "data"),
            b"[1, 2]".to_vec(),
            "not_object",
        ),
        (
            target.topic("dev1", "data"),
            b"{\"t\": \xff}".to_vec(),
            "not_utf8",
        ),
        (
            target.topic("dev1", "data"),
            b"{\"123\": 1}".to_vec(),
            "no_valid_data",
        ),
        (
            target.topic("dev1", "data"),
            vec![b' '; 300 * 1024],
            "too_large",
        ),
        (
            format!("{}/dev1/data/extra", target.prefix),
            b"{\"t\": 1}".to_vec(),
            "bad_topic",
        ),
        (
            format!("{}/dev1/config", target.prefix),
            b"{\"t\": 1}".to_vec(),
            "bad_topic",
        ),
        (
            target.topic("dev1'--", "data"),
            b"{\"t\": 1}".to_vec(),
            "bad_device_id",
        ),
    ];
    for (topic, payload, _) in &bad {
        // The service subscribes to PREFIX/+/kind: topics outside that never reach it, so
        // they are published to a topic it does see where possible.
        mqtt_publish(port, topic, payload.clone(), QoS::AtLeastOnce)
            .await
            .unwrap();
    }
    // BOM, trailing NULs and whitespace are repaired, not rejected.
    mqtt_publish(
        port,
        &target.topic("dev1", "data"),
        b"\xEF\xBB\xBF {\"t\": 42}\n\0\0".to_vec(),
        QoS::AtLeastOnce,
    )
    .await
    .unwrap();
    let row = wait_for_device(&pool, "dev1", "the repaired message", |r| {
        sensor(r, "t").is_some()
    })
    .await;
    assert_eq!(sensor(&row, "t"), Some(json!(42)));
    // Six bad messages the broker delivers (see below), then the good one.
    let snap = service.settled(7).await;
    // Topics with an extra level or another kind do not match the subscriptions; the
    // broker never delivers them. Every other bad message is counted under its reason.
    let expected_delivered: Vec<&str> = bad
        .iter()
        .map(|(_, _, r)| *r)
        .filter(|r| *r != "bad_topic")
        .collect();
    for reason in &expected_delivered {
        let n = snap.rejected.iter().find(|(r, _)| r == reason).unwrap().1;
        assert_eq!(n, 1, "{reason}: {:?}", snap.rejected);
    }
    assert_eq!(snap.failed, expected_delivered.len() as u64);
    assert_eq!(snap.succeeded, 1);
    assert_eq!(snap.received, snap.succeeded + snap.failed);
    service.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrations_are_harmless_on_the_backends_existing_table() {
    let db = TestDb::new().await;
    let pool = db.pool();
    // The backend's table, with columns of its own and a device already registered.
    sqlx::raw_sql(
        "CREATE TABLE device_main (
            id INT AUTO_INCREMENT PRIMARY KEY,
            device_id VARCHAR(100) NOT NULL UNIQUE,
            uuid VARCHAR(64) NOT NULL UNIQUE,
            name VARCHAR(100) NOT NULL,
            product_id INT NULL,
            is_online TINYINT(1) NOT NULL DEFAULT 0,
            last_seen DATETIME NULL,
            last_heartbeat DATETIME NULL,
            device_status VARCHAR(50) NULL DEFAULT 'pending',
            last_report_data JSON NULL,
            created_at DATETIME NOT NULL DEFAULT CURRENT_TIMESTAMP
        );
        INSERT INTO device_main (device_id, uuid, name, product_id, last_report_data)
        VALUES ('D-1', 'legacy', 'Legacy', 7, '{\"sensors\": {\"old\": {\"value\": 1, \"unit\": \"\", \"timestamp\": \"2025-01-01T00:00:00Z\"}}}');",
    )
    .execute(&pool)
    .await
    .unwrap();
    let target = Target::new(&db, shared_mqtt_port());
    let service = spawn_service(&target).await;
    mqtt_publish(
        target.mqtt_port,
        &target.topic("legacy", "data"),
        r#"{"new": 2}"#,
        QoS::AtLeastOnce,
    )
    .await
    .unwrap();
    let row = wait_for_device(&pool, "legacy", "the merge", |r| sensor(r, "new").is_some()).await;
    assert_eq!(
        sensor(&row, "old"),
        Some(json!(1)),
        "existing sensors are kept"
    );
    let product: Option<i32> =
        sqlx::query_scalar("SELECT product_id FROM device_main WHERE uuid = 'legacy'")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(product, Some(7), "the backend's own columns are untouched");
    service.stop().await.unwrap();
    // Running them again is a no-op.
    migrate(&pool).await;
}

/// The backend's table as in the test above, with `extra` added to its columns and `after`
/// run once it exists.
async fn backend_table(pool: &sqlx::MySqlPool, extra: &str, after: &str) {
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "CREATE TABLE device_main (
            id INT AUTO_INCREMENT PRIMARY KEY,
            device_id VARCHAR(100) NOT NULL UNIQUE,
            uuid VARCHAR(64) NOT NULL UNIQUE,
            name VARCHAR(100) NOT NULL,
            is_online TINYINT(1) NOT NULL DEFAULT 0,
            last_seen DATETIME NULL,
            last_heartbeat DATETIME NULL,
            device_status VARCHAR(50) NULL,
            last_report_data JSON NULL,
            created_at DATETIME NOT NULL DEFAULT CURRENT_TIMESTAMP
            {extra}
        ); {after}"
    )))
    .execute(pool)
    .await
    .unwrap();
}

/// The backend's table with a required column of its own, and device `own` registered in it.
async fn table_with_a_required_column(pool: &sqlx::MySqlPool) {
    backend_table(
        pool,
        ", owner_id INT NOT NULL",
        "INSERT INTO device_main (device_id, uuid, name, owner_id) VALUES ('D-1', 'own', 'Own', 42);",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_write_statement_is_chosen_for_the_table() {
    use mqtt_ingest::store::{WriteMode, write_mode};
    // (what the table adds, what runs after, the mode, a word the reason must contain)
    let cases: [(&str, &str, WriteMode, &str); 6] = [
        ("", "", WriteMode::Upsert, ""),
        (
            ", product_id INT NULL, note VARCHAR(10) NOT NULL DEFAULT '', \
             code VARCHAR(80) AS (CONCAT(device_id, '-', uuid)) VIRTUAL",
            "",
            WriteMode::Upsert,
            "",
        ),
        (
            ", owner_id INT NOT NULL",
            "",
            WriteMode::JoinUpdate,
            "owner_id",
        ),
        (
            "",
            "CREATE TRIGGER stamp BEFORE INSERT ON device_main FOR EACH ROW SET NEW.name = UPPER(NEW.name);",
            WriteMode::JoinUpdate,
            "trigger",
        ),
        (
            ", CONSTRAINT named_device CHECK (name <> '')",
            "",
            WriteMode::JoinUpdate,
            "named_device",
        ),
        (
            "",
            "ALTER TABLE device_main DROP PRIMARY KEY, MODIFY id INT NOT NULL UNIQUE, ADD PRIMARY KEY (uuid);",
            WriteMode::JoinUpdate,
            "primary key",
        ),
    ];
    for (extra, after, mode, why) in cases {
        let db = TestDb::new().await;
        let pool = db.pool();
        backend_table(&pool, extra, after).await;
        let (got, reason) = write_mode(&pool).await.unwrap();
        assert_eq!(got, mode, "table + {extra:?} / {after:?}: {reason:?}");
        assert!(
            reason.as_deref().unwrap_or("").contains(why),
            "{why:?} in {reason:?}"
        );
        // Our own migration's table takes the fast path.
        if extra.is_empty() && after.is_empty() {
            let db = TestDb::new().await;
            migrate(&db.pool()).await;
            assert_eq!(
                write_mode(&db.pool()).await.unwrap(),
                (WriteMode::Upsert, None)
            );
        }
    }
}

/// Should the choice be wrong for some table, the first refused upsert turns the store to the
/// portable statement, and the batch is written that way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_upsert_turns_the_store_to_the_portable_statement() {
    use mqtt_ingest::intake::model::{DeviceUuid, TopicKind};
    use mqtt_ingest::store::{Store, StoreError, StoreOptions, WriteMode};
    let db = TestDb::new().await;
    let pool = db.pool();
    table_with_a_required_column(&pool).await;
    let upserting = |pool: &sqlx::MySqlPool| {
        Store::new(
            pool.clone(),
            StoreOptions {
                write_mode: WriteMode::Upsert,
                ..StoreOptions::default()
            },
        )
    };
    let store = upserting(&pool);
    let accepted = mqtt_ingest::intake::payload::process(
        TopicKind::Data,
        DeviceUuid::parse("own").unwrap(),
        br#"{"temperature": 20}"#,
        chrono::Utc::now(),
        &mqtt_ingest::intake::payload::Rules::default(),
    )
    .unwrap();
    let first = store.apply(&[&accepted.update]).await;
    assert!(matches!(first, Err(StoreError::Conflict(_))), "{first:?}");
    assert_eq!(store.write_mode(), WriteMode::JoinUpdate);
    let second = store.apply(&[&accepted.update]).await.unwrap();
    assert_eq!(second.rows_written, 1);
    let row = device(&pool, "own").await.unwrap().unwrap();
    assert_eq!(sensor(&row, "temperature"), Some(json!(20)));

    // A user granted only SELECT and UPDATE on device_main (README's tight grant) on a table
    // the upsert would otherwise suit.
    let db = TestDb::new().await;
    let pool = db.pool();
    migrate(&pool).await;
    register(&pool, "own").await;
    let user = format!("u_{}", db.name);
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "CREATE USER '{user}'@'%' IDENTIFIED BY 'pw-{user}'; \
         GRANT SELECT, UPDATE ON `{db}`.device_main TO '{user}'@'%';",
        db = db.name
    )))
    .execute(&pool)
    .await
    .unwrap();
    let limited = sqlx::mysql::MySqlPoolOptions::new()
        .max_connections(1)
        .connect_with(
            db.connect_options()
                .username(&user)
                .password(&format!("pw-{user}")),
        )
        .await
        .unwrap();
    let store = upserting(&limited);
    let first = store.apply(&[&accepted.update]).await;
    let second = store.apply(&[&accepted.update]).await;
    limited.close().await;
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!("DROP USER '{user}'@'%'")))
        .execute(&pool)
        .await
        .unwrap();
    assert!(matches!(first, Err(StoreError::Conflict(_))), "{first:?}");
    assert_eq!(second.unwrap().rows_written, 1);
    let row = device(&pool, "own").await.unwrap().unwrap();
    assert_eq!(sensor(&row, "temperature"), Some(json!(20)));
}

/// A table the fast statement cannot write (a column it would have to fill): the portable one
/// does everything the fast one does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_with_a_required_column_of_its_own_is_written_with_the_portable_statement() {
    let db = TestDb::new().await;
    let pool = db.pool();
    table_with_a_required_column(&pool).await;
    let target = Target::new(&db, shared_mqtt_port());
    let service = spawn_service(&target).await;
    let publish = |kind: &'static str, payload: &'static str| {
        let topic = target.topic("own", kind);
        async move {
            mqtt_publish(target.mqtt_port, &topic, payload, QoS::AtLeastOnce)
                .await
                .unwrap()
        }
    };
    publish(
        "data",
        r#"{"temperature": 21.5, "timestamp": "2026-01-01T00:00:00Z"}"#,
    )
    .await;
    publish("status", r#"{"status": "charging", "battery": 80}"#).await;
    publish("heartbeat", "").await;
    let row = wait_for_device(&pool, "own", "data, status and heartbeat", |r| {
        r.last_heartbeat.is_some()
            && r.device_status.as_deref() == Some("charging")
            && sensor(r, "temperature").is_some()
    })
    .await;
    assert!(row.is_online);
    assert_eq!(sensor(&row, "temperature"), Some(json!(21.5)));
    let owner: i32 = sqlx::query_scalar("SELECT owner_id FROM device_main WHERE uuid = 'own'")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(owner, 42);
    let snap = service.settled(3).await;
    assert_eq!((snap.succeeded, snap.failed), (3, 0));
    service.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stored_data_that_is_not_json_is_replaced_not_a_poison_message() {
    let (db, target) = setup().await;
    let pool = db.pool();
    register(&pool, "odd").await;
    // A row whose JSON was nulled or never set, and one device that sends two messages in a
    // single batch.
    let service = spawn_service(&target).await;
    crate::common::publish_many(
        target.mqtt_port,
        [
            (target.topic("odd", "data"), br#"{"a": 1}"#.to_vec()),
            (target.topic("odd", "data"), br#"{"b": 2}"#.to_vec()),
            (target.topic("odd", "status"), br#"{"fw": "1.2"}"#.to_vec()),
        ],
        QoS::AtLeastOnce,
    )
    .await
    .unwrap();
    let row = wait_for_device(&pool, "odd", "all three", |r| {
        sensor(r, "a").is_some()
            && sensor(r, "b").is_some()
            && r.data.as_ref().unwrap().get("status").is_some()
    })
    .await;
    assert_eq!(row.data.unwrap()["status"], json!({"fw": "1.2"}));
    assert_eq!(
        row.device_status, None,
        "a status without a status field leaves device_status"
    );
    service.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_devices_messages_in_one_batch_become_one_row_write() {
    let (db, target) = setup().await;
    // A long fill time so that the burst lands in few batches.
    let target = target
        .with("INGEST_BATCH_MAX_WAIT_MS", "300")
        .with("INGEST_WRITERS", "1");
    let pool = db.pool();
    register(&pool, "chatty").await;
    let service = spawn_service(&target).await;
    let messages: Vec<(String, Vec<u8>)> = (0..200)
        .map(|i| {
            let payload = if i % 2 == 0 {
                format!(r#"{{"seq": {i}, "even": {i}}}"#)
            } else {
                format!(r#"{{"sensors": [{{"sensor_name": "seq", "value": {i}}}], "status": {{"odd": {i}}}}}"#)
            };
            (target.topic("chatty", "data"), payload.into_bytes())
        })
        .collect();
    crate::common::publish_many(target.mqtt_port, messages, QoS::AtLeastOnce)
        .await
        .unwrap();
    let row = wait_for_device(&pool, "chatty", "the last message", |r| {
        sensor(r, "seq") == Some(json!(199))
    })
    .await;
    assert_eq!(sensor(&row, "even"), Some(json!(198)));
    assert_eq!(row.data.as_ref().unwrap()["status"], json!({"odd": 199}));
    let snap = service.settled(200).await;
    assert_eq!(snap.succeeded, 200);
    assert!(
        snap.rows_written < 20 && snap.rows_written == snap.batches,
        "200 messages of one device took {} row writes in {} batches",
        snap.rows_written,
        snap.batches
    );
    service.stop().await.unwrap();
}

/// A batch of more devices than the store reads and writes at a time (256) is merged chunk by
/// chunk in one transaction: every device's updates apply in message order, also when they
/// arrive interleaved with hundreds of others and under ids that differ only in case.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_of_more_devices_than_a_chunk_merges_each_in_message_order() {
    use mqtt_ingest::intake::model::{DeviceUuid, TopicKind};
    use mqtt_ingest::store::{Applied, Store, StoreOptions, WriteMode};
    const DEVICES: usize = 600;
    for mode in [WriteMode::Upsert, WriteMode::JoinUpdate] {
        let db = TestDb::new().await;
        let pool = db.pool();
        migrate(&pool).await;
        let values: Vec<String> = (0..DEVICES)
            .map(|d| format!("('dev-{d}', 'many-{d}', 'Many {d}')"))
            .collect();
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
            "INSERT INTO device_main (device_id, uuid, name) VALUES {}, \
             ('dev-mixed', 'Mixed-Case', 'Mixed')",
            values.join(", ")
        )))
        .execute(&pool)
        .await
        .unwrap();
        let start = chrono::Utc::now();
        let mut accepted = Vec::new();
        // Three rounds over every device (round-robin, as a backlog arrives), each round a
        // new `seq`, its own sensor and a status field (merged without a time guard, so only
        // the order of application decides it); the mixed-case device spelt one way in the
        // first and last round, another way in the middle one (its first appearance under
        // that spelling is hundreds of devices later).
        for round in 1..=3u32 {
            let mut devices: Vec<String> = (0..DEVICES).map(|d| format!("many-{d}")).collect();
            match round {
                1 => devices.insert(0, "mixed-case".into()),
                2 => devices.push("MIXED-CASE".into()),
                3 => devices.push("mixed-case".into()),
                _ => {}
            }
            for d in devices {
                let at = start + chrono::Duration::milliseconds(accepted.len() as i64);
                let payload = format!(
                    r#"{{"sensors": [{{"sensor_name": "seq", "value": {round}}},
                                     {{"sensor_name": "round{round}", "value": {round}}}],
                        "status": {{"round": {round}}}}}"#
                );
                accepted.push(
                    mqtt_ingest::intake::payload::process(
                        TopicKind::Data,
                        DeviceUuid::parse(&d).unwrap(),
                        payload.as_bytes(),
                        at,
                        &mqtt_ingest::intake::payload::Rules::default(),
                    )
                    .unwrap(),
                );
            }
        }
        // Plus one device the table does not have, in the middle.
        let unknown = mqtt_ingest::intake::payload::process(
            TopicKind::Data,
            DeviceUuid::parse("not-registered").unwrap(),
            br#"{"seq": 9}"#,
            start,
            &mqtt_ingest::intake::payload::Rules::default(),
        )
        .unwrap();
        let mut updates: Vec<_> = accepted.iter().map(|a| &a.update).collect();
        updates.insert(DEVICES, &unknown.update);
        let store = Store::new(
            pool.clone(),
            StoreOptions {
                write_mode: mode,
                ..StoreOptions::default()
            },
        );
        let outcome = store.apply(&updates).await.unwrap();
        assert_eq!(outcome.rows_written, DEVICES + 1, "{mode:?}");
        assert_eq!(outcome.applied[DEVICES], Applied::UnknownDevice);
        assert_eq!(
            outcome
                .applied
                .iter()
                .filter(|a| **a == Applied::Written)
                .count(),
            updates.len() - 1
        );
        let wrong: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM device_main WHERE uuid LIKE 'many-%' AND ( \
                 JSON_VALUE(last_report_data, '$.sensors.seq.value') = 3 AND \
                 JSON_VALUE(last_report_data, '$.sensors.round1.value') = 1 AND \
                 JSON_VALUE(last_report_data, '$.sensors.round2.value') = 2 AND \
                 JSON_VALUE(last_report_data, '$.sensors.round3.value') = 3 AND \
                 JSON_VALUE(last_report_data, '$.status.round') = 3) IS NOT TRUE",
        )
        .fetch_one(&pool)
        .await
        .unwrap();
        assert_eq!(
            wrong, 0,
            "{mode:?}: devices not at their merged final state"
        );
        let mixed = device(&pool, "Mixed-Case").await.unwrap().unwrap();
        assert_eq!(sensor(&mixed, "seq"), Some(json!(3)), "{mode:?}");
        assert_eq!(sensor(&mixed, "round1"), Some(json!(1)), "{mode:?}");
        assert_eq!(sensor(&mixed, "round2"), Some(json!(2)), "{mode:?}");
        assert_eq!(sensor(&mixed, "round3"), Some(json!(3)), "{mode:?}");
        assert_eq!(
            mixed.data.as_ref().unwrap()["status"],
            json!({"round": 3}),
            "{mode:?}: {mixed:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_older_reading_or_status_does_not_roll_the_state_back() {
    let (db, target) = setup().await;
    let pool = db.pool();
    register(&pool, "late").await;
    let service = spawn_service(&target).await;
    let port = target.mqtt_port;
    let data = target.topic("late", "data");
    let status = target.topic("late", "status");
    mqtt_publish(
        port,
        &data,
        r#"{"timestamp": "2026-01-01T00:00:10Z", "t": 10}"#,
        QoS::AtLeastOnce,
    )
    .await
    .unwrap();
    mqtt_publish(
        port,
        &status,
        r#"{"status": "offline", "timestamp": "2026-01-01T00:00:10Z"}"#,
        QoS::AtLeastOnce,
    )
    .await
    .unwrap();
    wait_for_device(&pool, "late", "the newer state", |r| {
        r.device_status.as_deref() == Some("offline")
    })
    .await;
    // Sent earlier by the device, delivered later (a slow path, a redelivery).
    mqtt_publish(
        port,
        &data,
        r#"{"timestamp": "2026-01-01T00:00:05Z", "t": 5, "u": 5}"#,
        QoS::AtLeastOnce,
    )
    .await
    .unwrap();
    mqtt_publish(
        port,
        &status,
        r#"{"status": "online", "timestamp": "2026-01-01T00:00:05Z"}"#,
        QoS::AtLeastOnce,
    )
    .await
    .unwrap();
    let row = wait_for_device(&pool, "late", "the older messages", |r| {
        sensor(r, "u").is_some()
    })
    .await;
    let stats = service.stats.clone();
    wait_until_named(
        "all four written",
        Duration::from_secs(10),
        Duration::from_millis(20),
        async || stats.snapshot().succeeded == 4,
    )
    .await
    .unwrap();
    let row = device(&pool, "late").await.unwrap().unwrap_or(row);
    assert_eq!(
        sensor(&row, "t"),
        Some(json!(10)),
        "the older reading of t is not applied"
    );
    assert_eq!(
        sensor(&row, "u"),
        Some(json!(5)),
        "a sensor seen for the first time is"
    );
    assert_eq!(row.device_status.as_deref(), Some("offline"));
    assert!(!row.is_online);
    service.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn several_writers_share_many_devices_and_every_final_reading_lands() {
    let (db, target) = setup().await;
    let target = target
        .with("INGEST_WRITERS", "3")
        .with("INGEST_BATCH_MAX_MESSAGES", "50");
    let pool = db.pool();
    const DEVICES: usize = 300;
    for d in 0..DEVICES {
        register(&pool, &format!("dev{d}")).await;
    }
    let service = spawn_service(&target).await;
    let mut messages = Vec::new();
    for seq in 0..3 {
        for d in 0..DEVICES {
            messages.push((
                target.topic(&format!("dev{d}"), "data"),
                // The reading time orders them. Without it the receive time does, and in a
                // burst under MQTT 5 one device in 300 now and then ended at seq 1 (before
                // coalescing too): its seq 2 must have reached the service first, and the later
                // arrival rightly wins. Who reorders (publisher or broker) is not pinned down.
                format!(r#"{{"seq": {seq}, "timestamp": "2026-01-01T00:00:0{seq}Z"}}"#)
                    .into_bytes(),
            ));
        }
    }
    // Under the shared broker's default queue limit (1000 per client).
    crate::common::publish_many(target.mqtt_port, messages, QoS::AtLeastOnce)
        .await
        .unwrap();
    wait_until_named("every device at seq 2", Duration::from_secs(30), Duration::from_millis(50), async || {
        let n: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM device_main WHERE JSON_VALUE(last_report_data, '$.sensors.seq.value') = 2",
        )
        .fetch_one(&pool)
        .await?;
        if n as usize == DEVICES { Ok(true) } else { anyhow::bail!("{n} of {DEVICES}") }
    })
    .await
    .unwrap();
    let snap = service.settled(3 * DEVICES as u64).await;
    assert_eq!((snap.succeeded, snap.failed), (3 * DEVICES as u64, 0));
    service.stop().await.unwrap();
}

/// A backlog that waited at the broker: each device's messages wait for a writer together
/// (data folded into one update), so far fewer rows are written than messages arrive; the table ends as if
/// every message had been applied in turn (a status message in the middle stays in its place),
/// and every message is acknowledged: a restart gets nothing again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_folds_per_device_and_every_message_is_acknowledged() {
    // A private broker that lets the backlog be in flight at once, whatever the shared one allows.
    let broker = crate::common::PrivateMosquitto::start().await;
    let db = TestDb::new().await;
    migrate(&db.pool()).await;
    // Batches smaller than a round of devices: a device's waiting messages still go together
    // (folded, or at least in one batch), so rows stay far fewer than messages.
    let target = Target::new(&db, broker.port()).with("INGEST_BATCH_MAX_MESSAGES", "10");
    let pool = db.pool();
    const DEVICES: usize = 20;
    const ROUNDS: usize = 40;
    for d in 0..DEVICES {
        register(&pool, &format!("fold{d}")).await;
    }
    // Create the persistent session, then queue the backlog for it.
    spawn_service(&target)
        .await
        .stop_keeping_session()
        .await
        .unwrap();
    let mut messages = Vec::new();
    for round in 0..ROUNDS {
        for d in 0..DEVICES {
            // Two sensors on alternate rounds, one on every round: merged by name. The
            // reading time orders them, whatever the arrival order (see the test above).
            let at = format!("2026-01-01T00:00:{round:02}Z");
            let payload = if round % 2 == 0 {
                json!({"seq": round, "even": round, "timestamp": at})
            } else {
                json!({"seq": round, "timestamp": at})
            };
            messages.push((
                target.topic(&format!("fold{d}"), "data"),
                payload.to_string(),
            ));
        }
        if round == ROUNDS / 2 {
            messages.push((
                target.topic("fold0", "status"),
                json!({"status": "offline", "battery": 7}).to_string(),
            ));
        }
    }
    let total = messages.len() as u64;
    crate::common::publish_many(broker.port(), messages, QoS::AtLeastOnce)
        .await
        .unwrap();

    let service = spawn_service(&target).await;
    let snap = service.settled(total).await;
    assert_eq!((snap.succeeded, snap.failed), (total, 0));
    assert!(
        snap.rows_written * 4 <= total,
        "{} rows written for {total} messages: the backlog did not fold",
        snap.rows_written
    );
    for d in 0..DEVICES {
        let row = device(&pool, &format!("fold{d}")).await.unwrap().unwrap();
        assert_eq!(sensor(&row, "seq"), Some(json!(ROUNDS - 1)), "fold{d}");
        assert_eq!(sensor(&row, "even"), Some(json!(ROUNDS - 2)), "fold{d}");
        if d > 0 {
            assert!(row.is_online, "fold{d}");
        }
    }
    let row = device(&pool, "fold0").await.unwrap().unwrap();
    assert_eq!(row.device_status.as_deref(), Some("offline"));
    assert_eq!(row.data.unwrap()["status"]["battery"], json!(7));
    service.stop_keeping_session().await.unwrap();

    // Every message was acknowledged: the session holds nothing to deliver again. A marker
    // published now (to an unknown device: it ends rejected, unlike anything redelivered)
    // comes after anything the broker still held for the session, so once it is rejected, it
    // is the only message the service may have received.
    let again = spawn_service(&target).await;
    mqtt_publish(
        target.mqtt_port,
        &target.topic("fold-marker", "data"),
        r#"{"marker": 1}"#,
        QoS::AtLeastOnce,
    )
    .await
    .unwrap();
    let stats = again.stats.clone();
    wait_until_named(
        "the marker to be rejected",
        Duration::from_secs(20),
        Duration::from_millis(10),
        async || stats.snapshot().failed >= 1,
    )
    .await
    .unwrap();
    let snap = again.stats.snapshot();
    assert_eq!(
        (snap.received, snap.succeeded),
        (1, 0),
        "redelivered after acks"
    );
    again.stop().await.unwrap();
}
