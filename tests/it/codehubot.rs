//! A switch from CodeHubot's Python MQTT service, end to end: the backend's real tables (the
//! seed's and the current one with `device_sensors`), what the real ESP32 firmware publishes,
//! a row as the Python service leaves it, the backend's offline check, the `.env` names users
//! have, and the time zone the backend expects. Each test has its own database, client id and
//! topic prefix.

use std::time::Duration;

use crate::app::{ServiceProcess, Target, device, spawn_service, wait_for_device};
use crate::common::{
    PrivateMosquitto, QoS, TestDb, clear_session, mqtt_publish, shared_mqtt_port, wait_until_named,
};
use chrono::{NaiveDateTime, TimeDelta, Utc};
use serde_json::json;
use sqlx::{MySqlPool, Row};

/// A device as the backend registers it (uuid in the topic, device_id in the payloads).
const UUID: &str = "550e8400-e29b-41d4-a716-446655440000";
const DEVICE_ID: &str = "AIOT-ESP32-6E0067F6";

/// Which version of the backend's schema.
#[derive(Clone, Copy)]
pub(crate) enum Schema {
    /// The seed's: `device_main` with `school_id`, no `device_sensors`.
    Seed,
    /// The current: `device_main` with `team_id`, and `device_sensors`.
    Current,
}

pub(crate) async fn create_schema(pool: &MySqlPool, schema: Schema) {
    let team = match schema {
        Schema::Seed => "school_id",
        Schema::Current => "team_id",
    };
    let mut sql = include_str!("fixtures/codehubot-device-main.sql").replace("{team}", team);
    if let Schema::Current = schema {
        sql.push_str(include_str!("fixtures/codehubot-device-sensors.sql"));
    }
    for statement in crate::common::sql_statements(&sql) {
        sqlx::query(sqlx::AssertSqlSafe(statement))
            .execute(pool)
            .await
            .expect("create the backend's tables");
    }
}

/// Beijing's wall clock now, as the backend's `get_beijing_now()` gives it.
fn beijing_now() -> NaiveDateTime {
    (Utc::now() + TimeDelta::hours(8)).naive_utc()
}

/// The backend's offline check (`check_and_update_device_offline_status` in
/// `backend/app/api/devices.py`), as it reads a row: online while `is_online` is set and
/// `last_seen` (naive Beijing time) is at most `DEVICE_OFFLINE_TIMEOUT_MINUTES` (5) old.
async fn backend_says_online(pool: &MySqlPool, uuid: &str) -> bool {
    let row = device(pool, uuid).await.unwrap().expect("device row");
    let Some(last_seen) = row.last_seen else {
        return false;
    };
    row.is_online && (beijing_now() - last_seen).num_milliseconds() as f64 / 1000.0 <= 300.0
}

/// Registers a device the way the backend does on the real table (a secret, status
/// `pending`), with the row the Python service leaves after a while: naive Beijing times, its
/// stored shape with `isoformat()` timestamps, the firmware's uptime as `upload_timestamp`.
async fn register_like_the_backend(pool: &MySqlPool, uuid: &str, device_id: &str) -> NaiveDateTime {
    let before = beijing_now() - TimeDelta::minutes(3);
    let python_time = before.format("%Y-%m-%dT%H:%M:%S%.6f").to_string();
    let data = json!({
        "sensors": {"temperature": {"value": 20.1, "unit": "", "timestamp": python_time}},
        "status": {"device_id": device_id, "uptime": 30, "wifi_connected": true},
        "upload_timestamp": 30,
    });
    sqlx::query(
        "INSERT INTO device_main (uuid, device_id, name, device_secret, is_online, last_seen, \
                                  last_heartbeat, last_report_data) \
         VALUES (?, ?, ?, 'a-secret', 1, ?, ?, ?)",
    )
    .bind(uuid)
    .bind(device_id)
    .bind(format!("Board {device_id}"))
    .bind(before)
    .bind(before)
    .bind(data.to_string())
    .execute(pool)
    .await
    .expect("register device");
    before
}

async fn setup(schema: Schema) -> (TestDb, Target) {
    let db = TestDb::new().await;
    create_schema(&db.pool(), schema).await;
    let target = Target::new(&db, shared_mqtt_port());
    (db, target)
}

async fn publish(target: &Target, uuid: &str, kind: &str, payload: &str) {
    mqtt_publish(
        target.mqtt_port,
        &target.topic(uuid, kind),
        payload,
        QoS::AtLeastOnce,
    )
    .await
    .unwrap();
}

/// One `device_sensors` row.
struct SensorRow {
    name: String,
    value: String,
    unit: String,
    kind: String,
    time: NaiveDateTime,
}

/// A device's `device_sensors` rows, by sensor name.
async fn sensor_rows(pool: &MySqlPool, uuid: &str) -> Vec<SensorRow> {
    sqlx::query(
        "SELECT sensor_name, sensor_value, sensor_unit, sensor_type, `timestamp` \
         FROM device_sensors WHERE device_uuid = ? ORDER BY sensor_name",
    )
    .bind(uuid)
    .fetch_all(pool)
    .await
    .unwrap()
    .into_iter()
    .map(|r| SensorRow {
        name: r.get(0),
        value: r.get(1),
        unit: r.get::<Option<String>, _>(2).unwrap_or_default(),
        kind: r.get::<Option<String>, _>(3).unwrap_or_default(),
        time: r.get(4),
    })
    .collect()
}

/// Name, value and type of each of a device's `device_sensors` rows.
async fn sensor_values(pool: &MySqlPool, uuid: &str) -> Vec<(String, String, String)> {
    sensor_rows(pool, uuid)
        .await
        .into_iter()
        .map(|r| (r.name, r.value, r.kind))
        .collect()
}

/// `device_main.updated_at` of a device (the backend's ON UPDATE CURRENT_TIMESTAMP column).
async fn updated_at(pool: &MySqlPool, uuid: &str) -> NaiveDateTime {
    sqlx::query_scalar("SELECT updated_at FROM device_main WHERE uuid = ?")
        .bind(uuid)
        .fetch_one(pool)
        .await
        .unwrap()
}

/// `(name, value, type)` triples as owned strings, for comparing with [`sensor_values`].
fn triples(expected: &[(&str, &str, &str)]) -> Vec<(String, String, String)> {
    expected
        .iter()
        .map(|(n, v, t)| ((*n).to_owned(), (*v).to_owned(), (*t).to_owned()))
        .collect()
}

fn close_to(t: NaiveDateTime, now: NaiveDateTime) -> bool {
    (now - t).num_seconds().abs() <= 60
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_firmwares_messages_on_the_current_schema() {
    let (db, target) = setup(Schema::Current).await;
    let pool = db.pool();
    let python_seen = register_like_the_backend(&pool, UUID, DEVICE_ID).await;
    // A rain board beside it, and a device_sensors row as the Python service left it.
    let rain_uuid = "7c9e6679-7425-40de-944b-e07fc1f90ae7";
    register_like_the_backend(&pool, rain_uuid, "AIOT-ESP32-12345678").await;
    sqlx::query(
        "INSERT INTO device_sensors (device_uuid, sensor_name, sensor_value, sensor_unit, \
                                     sensor_type, `timestamp`) \
         VALUES (?, 'temperature', '20.1', '', 'DHT11', ?), \
                (?, 'humidity', '38.0', '', 'DHT11', '9999-12-31 23:59:59')",
    )
    .bind(UUID)
    .bind(python_seen)
    // A row a device with a broken clock left: it must not freeze the sensor.
    .bind(UUID)
    .execute(&pool)
    .await
    .unwrap();
    let service = spawn_service(&target).await;

    // One tick of the standard board: heartbeat, DHT11, DS18B20, status (its format strings).
    publish(
        &target,
        UUID,
        "heartbeat",
        r#"{"sequence":7,"timestamp":90512,"status":1}"#,
    )
    .await;
    publish(
        &target,
        UUID,
        "data",
        &format!(r#"{{"device_id":"{DEVICE_ID}","sensor":"DHT11","temperature":24.3,"humidity":55.0,"timestamp":90}}"#),
    )
    .await;
    publish(
        &target,
        UUID,
        "data",
        &format!(
            r#"{{"device_id":"{DEVICE_ID}","sensor":"DS18B20","temperature":23.8,"timestamp":90}}"#
        ),
    )
    .await;
    publish(
        &target,
        UUID,
        "status",
        &format!(r#"{{"device_id":"{DEVICE_ID}","uptime":90,"free_heap":168432,"wifi_connected":true,"mqtt_connected":true,"ble_connected":false,"timestamp":90}}"#),
    )
    .await;
    // The rain board, dry then raining.
    for (raining, level) in [("false", 1), ("true", 0)] {
        publish(
            &target,
            rain_uuid,
            "data",
            &format!(r#"{{"device_id":"AIOT-ESP32-12345678","sensor":"RAIN_SENSOR","is_raining":{raining},"level":{level},"timestamp":100}}"#),
        )
        .await;
    }
    let snap = service.settled(6).await;
    assert_eq!((snap.succeeded, snap.failed), (6, 0), "{snap:?}");
    assert_eq!(
        snap.parts_skipped, 0,
        "metadata strings are not skipped parts"
    );
    // Every firmware timestamp is an uptime counter: counted, none dated anything.
    assert_eq!(snap.undated, [("not_a_time", 6), ("future", 0)]);

    let now = beijing_now();
    let row = device(&pool, UUID).await.unwrap().unwrap();
    assert!(row.is_online);
    let seen = row.last_seen.unwrap();
    assert!(
        seen > python_seen,
        "last_seen moves on from the Python service's"
    );
    assert!(
        close_to(seen, now),
        "last_seen {seen} is Beijing time (now {now})"
    );
    assert!(close_to(row.last_heartbeat.unwrap(), now));
    assert_eq!(
        row.device_status.as_deref(),
        Some("pending"),
        "no status key: unchanged"
    );
    assert!(backend_says_online(&pool, UUID).await);
    let data = row.data.unwrap();
    // Published in this order, all read at their receive time: the DS18B20 came last.
    assert_eq!(data["sensors"]["temperature"]["value"], json!(23.8));
    assert_eq!(data["sensors"]["humidity"]["value"], json!(55.0));
    let stamp = data["sensors"]["humidity"]["timestamp"].as_str().unwrap();
    assert!(stamp.ends_with("+08:00"), "{stamp}");
    assert_eq!(data["status"]["free_heap"], json!(168432));
    assert_eq!(data["status"]["wifi_connected"], json!(true));
    assert_eq!(data["status"]["device_id"], json!(DEVICE_ID));
    assert!(data["sensors"].get("device_id").is_none() && data["sensors"].get("sensor").is_none());
    // The backend's ON UPDATE column agrees with last_seen (the session's time zone).
    let updated = updated_at(&pool, UUID).await;
    assert!(close_to(updated, now), "updated_at {updated} (now {now})");

    assert_eq!(
        sensor_values(&pool, UUID).await,
        triples(&[
            ("humidity", "55.0", "DHT11"),
            ("temperature", "23.8", "DS18B20")
        ])
    );
    let rows = sensor_rows(&pool, UUID).await;
    assert!(
        rows.iter()
            .all(|r| close_to(r.time, now) && r.unit.is_empty())
    );

    // Order-safe: a reading dated before the stored one changes neither table.
    publish(
        &target,
        UUID,
        "data",
        r#"{"sensors": [{"sensor_name": "humidity", "value": 99, "unit": "%", "timestamp": "2026-01-02T10:00:00+08:00"}]}"#,
    )
    .await;
    assert_eq!(service.settled(7).await.succeeded, 7);
    let rows = sensor_rows(&pool, UUID).await;
    assert_eq!(
        (rows[0].name.as_str(), rows[0].value.as_str()),
        ("humidity", "55.0")
    );
    let row = device(&pool, UUID).await.unwrap().unwrap();
    assert_eq!(
        row.data.unwrap()["sensors"]["humidity"]["value"],
        json!(55.0)
    );

    // last_report_data keeps the firmware's names (what the seed's Python service stored there
    // and the frontend's product definitions read); device_sensors gets the backend's.
    let rain = device(&pool, rain_uuid).await.unwrap().unwrap();
    assert_eq!(
        rain.data.as_ref().unwrap()["sensors"]["is_raining"]["value"],
        json!(true)
    );
    assert_eq!(
        rain.data.as_ref().unwrap()["sensors"]["level"]["value"],
        json!(0)
    );
    assert!(rain.data.as_ref().unwrap()["sensors"].get("rain").is_none());
    assert_eq!(
        sensor_values(&pool, rain_uuid).await,
        triples(&[
            ("rain", "True", "RAIN_SENSOR"),
            ("rain_level", "0", "RAIN_SENSOR")
        ])
    );
    service.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_backends_documented_shapes_on_the_seed_schema() {
    let (db, target) = setup(Schema::Seed).await;
    let pool = db.pool();
    register_like_the_backend(&pool, "test-device-uuid", "dev-1").await;
    let service = spawn_service(&target).await;
    let uuid = "test-device-uuid";

    // The seed README's full format, simple format, status and heartbeat.
    publish(
        &target,
        uuid,
        "data",
        r#"{"sensors": [{"sensor_name": "temperature", "value": 25.5, "unit": "°C", "timestamp": "2025-12-19T14:30:00+08:00"},
                        {"sensor_name": "humidity", "value": 60, "unit": "%"}],
            "status": {"ip_address": "192.168.1.100", "rssi": -50, "battery": 95},
            "location": {"latitude": 39.9042, "longitude": 116.4074},
            "timestamp": "2025-12-19T14:30:00+08:00"}"#,
    )
    .await;
    publish(
        &target,
        uuid,
        "data",
        r#"{"temperature": 25.5, "humidity": 60, "light": 850}"#,
    )
    .await;
    publish(
        &target,
        uuid,
        "status",
        r#"{"status": "online", "battery": 95, "signal": "good"}"#,
    )
    .await;
    publish(
        &target,
        uuid,
        "heartbeat",
        r#"{"timestamp": "2025-12-19T14:30:00+08:00"}"#,
    )
    .await;
    let snap = service.settled(4).await;
    assert_eq!((snap.succeeded, snap.failed), (4, 0), "{snap:?}");
    let row = device(&pool, uuid).await.unwrap().unwrap();
    let data = row.data.unwrap();
    assert_eq!(data["sensors"]["light"]["value"], json!(850));
    assert_eq!(
        data["sensors"]["humidity"]["unit"],
        json!(""),
        "the simple format came later"
    );
    assert_eq!(
        data["location"],
        json!({"latitude": 39.9042, "longitude": 116.4074})
    );
    assert_eq!(data["status"]["signal"], json!("good"));
    assert_eq!(row.device_status.as_deref(), Some("online"));
    assert!(backend_says_online(&pool, uuid).await);

    // Python's isoformat() without an offset is Beijing time; an older reading does not roll
    // the sensor back.
    publish(
        &target,
        uuid,
        "data",
        r#"{"sensors": [{"sensor_name": "pressure", "value": 1013, "timestamp": "2026-01-02T10:00:00.123456"}]}"#,
    )
    .await;
    publish(
        &target,
        uuid,
        "data",
        r#"{"sensors": [{"sensor_name": "pressure", "value": 999, "timestamp": "2026-01-02T09:59:59"}]}"#,
    )
    .await;
    // A last will: offline. A status longer than the real column (20) is cut to fit.
    publish(&target, uuid, "status", r#"{"status": "offline"}"#).await;
    let snap = service.settled(7).await;
    assert_eq!((snap.succeeded, snap.failed), (7, 0), "{snap:?}");
    let row = device(&pool, uuid).await.unwrap().unwrap();
    let pressure = &row.data.as_ref().unwrap()["sensors"]["pressure"];
    assert_eq!(pressure["value"], json!(1013));
    assert_eq!(
        pressure["timestamp"],
        json!("2026-01-02T10:00:00.123456+08:00")
    );
    assert!(!row.is_online);
    assert!(!backend_says_online(&pool, uuid).await);
    assert_eq!(row.device_status.as_deref(), Some("offline"));
    publish(
        &target,
        uuid,
        "status",
        r#"{"status": "recovering-from-brownout-3"}"#,
    )
    .await;
    let row = wait_for_device(&pool, uuid, "the long status, cut", |r| {
        r.device_status.as_deref() != Some("offline")
    })
    .await;
    assert_eq!(row.device_status.as_deref(), Some("recovering-from-brow"));
    assert!(row.is_online, "any status but offline is a sign of life");
    assert_eq!(service.settled(8).await.failed, 0);
    service.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn db_timezone_utc_writes_utc_everywhere() {
    let (db, target) = setup(Schema::Current).await;
    let pool = db.pool();
    register_like_the_backend(&pool, UUID, DEVICE_ID).await;
    // A fresh device: a last_seen left in Beijing time (8 hours ahead of UTC) would hold
    // last_seen where it is, since it never moves backwards.
    sqlx::query("UPDATE device_main SET last_seen = NULL, last_heartbeat = NULL")
        .execute(&pool)
        .await
        .unwrap();
    let service = spawn_service(&target.clone().with("DB_TIMEZONE", "UTC")).await;
    publish(
        &target,
        UUID,
        "data",
        &format!(r#"{{"device_id":"{DEVICE_ID}","sensor":"DHT11","temperature":21.0,"humidity":40.0,"timestamp":5}}"#),
    )
    .await;
    assert_eq!(service.settled(1).await.succeeded, 1);
    let now = Utc::now().naive_utc();
    let row = device(&pool, UUID).await.unwrap().unwrap();
    assert!(
        close_to(row.last_seen.unwrap(), now),
        "{:?} vs UTC {now}",
        row.last_seen
    );
    let stamp = row.data.unwrap()["upload_timestamp"].clone();
    assert!(stamp.as_str().unwrap().ends_with('Z'), "{stamp}");
    let rows = sensor_rows(&pool, UUID).await;
    assert_eq!(rows.len(), 2);
    assert!(rows.iter().all(|r| close_to(r.time, now)));
    assert!(close_to(updated_at(&pool, UUID).await, now));
    service.stop().await.unwrap();
}

/// The Python service's `.env` names for the broker, at the seed's version and later.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_services_env_names_reach_the_broker() {
    let (db, _) = setup(Schema::Current).await;
    let pool = db.pool();
    register_like_the_backend(&pool, UUID, DEVICE_ID).await;
    // A broker of its own, away from the default port: only the other names can find it.
    let broker = PrivateMosquitto::start().await;
    let port = broker.port().to_string();
    let namings: [&[(&str, &str)]; 2] = [
        &[
            ("MQTT_SERVICE_BROKER", "127.0.0.1"),
            ("MQTT_SERVICE_PORT", &port),
            ("MQTT_SERVICE_USERNAME", ""),
            ("MQTT_SERVICE_PASSWORD", ""),
        ],
        &[
            ("MQTT_BROKER_HOST", "127.0.0.1"),
            ("MQTT_BROKER_PORT", &port),
        ],
    ];
    for (i, naming) in namings.into_iter().enumerate() {
        let mut target = Target::new(&db, broker.port())
            .without("MQTT_BROKER")
            .without("MQTT_PORT")
            .without("MQTT_USERNAME")
            .without("MQTT_PASSWORD");
        for (k, v) in naming {
            target = target.with(k, v);
        }
        let service = spawn_service(&target).await;
        publish(&target, UUID, "data", &format!(r#"{{"seq": {i}}}"#)).await;
        assert_eq!(service.settled(1).await.succeeded, 1, "{naming:?}");
        service.stop().await.unwrap();
    }

    // --check-config names where each value came from.
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_mqtt-ingest"))
        .args(["--env-file", "/dev/null", "--check-config"])
        .env_clear()
        .env("MQTT_SERVICE_BROKER", "127.0.0.1")
        .env("MQTT_BROKER_PORT", &port)
        .env("DB_HOST", &db.host)
        .env("DB_PORT", db.port.to_string())
        .env("DB_NAME", &db.name)
        .env("DB_USER", &db.user)
        .env("DB_PASSWORD", &db.password)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{text}");
    assert!(
        text.contains("MQTT_BROKER: from MQTT_SERVICE_BROKER"),
        "{text}"
    );
    assert!(text.contains("MQTT_PORT: from MQTT_BROKER_PORT"), "{text}");
    assert!(text.contains("DB_TIMEZONE: Asia/Shanghai"), "{text}");

    // Two names with different values: the start stops with one line naming both.
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_mqtt-ingest"))
        .args(["--env-file", "/dev/null", "--check-config"])
        .env_clear()
        .env("MQTT_BROKER", "127.0.0.1")
        .env("MQTT_BROKER_HOST", "mqtt")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(
        text.contains("MQTT_BROKER: MQTT_BROKER_HOST is also set, to a different value"),
        "{text}"
    );
}

/// On the real table a new row needs a `device_secret` the service does not have.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registering_unknown_devices_is_refused_where_rows_cannot_be_made() {
    let (_db, target) = setup(Schema::Current).await;
    let service = mqtt_ingest::service::Service::build(
        target
            .with("INGEST_REGISTER_UNKNOWN_DEVICES", "true")
            .settings(),
    )
    .await
    .unwrap();
    let result = tokio::time::timeout(
        Duration::from_secs(30),
        service.run_until_stopped(tokio_util::sync::CancellationToken::new()),
    )
    .await
    .expect("the start stops by itself");
    let error = format!("{:#}", result.unwrap_err());
    assert!(
        error.contains("INGEST_REGISTER_UNKNOWN_DEVICES") && error.contains("device_secret"),
        "{error}"
    );
}

/// Where registering is possible, a device that exists costs no AUTO_INCREMENT id per batch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registering_unknown_devices_burns_no_ids() {
    let db = TestDb::new().await;
    let pool = db.pool();
    crate::app::migrate(&pool).await;
    let target =
        Target::new(&db, shared_mqtt_port()).with("INGEST_REGISTER_UNKNOWN_DEVICES", "true");
    let service = spawn_service(&target).await;
    let next_id = async || -> u64 {
        sqlx::query_scalar::<_, Option<u64>>(
            "SELECT CAST(AUTO_INCREMENT AS UNSIGNED) FROM information_schema.TABLES \
             WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = 'device_main'",
        )
        .fetch_one(&pool)
        .await
        .unwrap()
        .unwrap_or(1)
    };
    let mut done = 0;
    for round in 0..5 {
        // Batches one by one: each one meets the devices the earlier ones registered.
        for d in ["new-a", "new-b", "new-c"] {
            publish(&target, d, "data", &format!(r#"{{"seq": {round}}}"#)).await;
        }
        done += 3;
        assert_eq!(service.settled(done).await.succeeded, done);
    }
    let ids: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM device_main")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(ids, 3);
    assert_eq!(next_id().await, 4, "no id burnt on devices that exist");
    service.stop().await.unwrap();
}

/// `LOG_STYLE=codehubot`: the lines the seed's troubleshooting greps for.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_seeds_log_lines_for_operators_who_grep_for_them() {
    let (db, target) = setup(Schema::Seed).await;
    register_like_the_backend(&db.pool(), UUID, DEVICE_ID).await;
    let target = target
        .with("LOG_STYLE", "codehubot")
        .with("STATS_INTERVAL_SECS", "1");
    let process = ServiceProcess::start(&target).await;
    publish(&target, "ghost", "data", r#"{"temperature": 1}"#).await;
    process
        .wait_for_log("⚠️ 设备不存在: ghost", Duration::from_secs(20))
        .await;
    publish(&target, UUID, "data", "{not json").await;
    process
        .wait_for_log("❌ JSON解析失败: ", Duration::from_secs(20))
        .await;
    publish(&target, UUID, "data", r#"{"123abc": 1, "temperature": 2}"#).await;
    process
        .wait_for_log(
            "⚠️ 传感器名称格式不正确，跳过: 123abc",
            Duration::from_secs(20),
        )
        .await;
    process
        .wait_for_log("📊 MQTT服务统计信息", Duration::from_secs(20))
        .await;
    wait_until_named(
        "the statistics block to count all three",
        Duration::from_secs(20),
        Duration::from_millis(100),
        async || {
            let log = process.log();
            anyhow::Ok(log.contains("  总消息数: 3") && log.contains("  处理失败: 2"))
        },
    )
    .await
    .unwrap();
    let log = process.log();
    assert!(log.contains("  成功率: 33.33%"), "{log}");
    let mut process = process;
    process.signal("TERM");
    assert_eq!(process.wait_exit(Duration::from_secs(40)).await, Some(0));
    let _ = clear_session(target.mqtt_port, &target.client_id).await;
}
