//! A switch proven before it is made: a shadow run beside a stand-in for CodeHubot's Python
//! service on the same broker and database, then `mqtt-ingest compare`.
//!
//! The stand-in ([`PythonStandIn`]) writes the live tables the way `service/mqtt-service/main.py`
//! does (read from its source, written here from those facts): naive Beijing times, `str()`
//! values in `device_sensors`, a status merged into `last_report_data` only while the column is
//! empty (the later merges SQLAlchemy never sees), `is_online = 1` for every message. It follows
//! main.py for what these tests publish (the firmware's payloads, the seed README's examples);
//! its rollbacks on malformed input (a sensor entry that is not an object, say) are not copied.

use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use chrono::{DateTime, NaiveDateTime, TimeDelta, Utc};
use serde_json::{Value, json};
use sqlx::{MySqlPool, Row};
use tokio::task::JoinHandle;

use crate::app::{ServiceProcess, Target, http_get, metric};
use crate::codehubot::{Schema, create_schema};
use crate::common::{
    QoS, TestDb, TestSubscriber, clear_session, free_port, mqtt_publish, shared_mqtt_port,
    unique_name, wait_until_named,
};

/// Beijing's wall clock now, as the Python service's `get_beijing_now()` gives it.
fn beijing_now() -> NaiveDateTime {
    (Utc::now() + TimeDelta::hours(8)).naive_utc()
}

/// Python's `str()` of what `json.loads` gave: `True`, `25`, `55.0`, `1e+20`.
fn python_str(v: &Value) -> String {
    match v {
        Value::Bool(true) => "True".into(),
        Value::Bool(false) => "False".into(),
        Value::Number(n) if n.is_f64() => {
            let f = n.as_f64().unwrap_or_default();
            if f.fract() == 0.0 && f.abs() < 1e16 {
                format!("{f:.1}")
            } else if f.abs() >= 1e16 || (f != 0.0 && f.abs() < 1e-4) {
                // Python's repr: the shortest digits, a signed two-digit exponent.
                let e = format!("{f:e}");
                let (mantissa, exp) = e.split_once('e').unwrap_or((&e, "0"));
                let exp: i32 = exp.parse().unwrap_or(0);
                format!(
                    "{mantissa}e{}{:02}",
                    if exp < 0 { '-' } else { '+' },
                    exp.abs()
                )
            } else {
                format!("{f}")
            }
        }
        Value::Number(n) => n.to_string(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// The Python service's sensor-name check.
fn python_name_ok(name: &str) -> bool {
    let mut chars = name.chars();
    !name.is_empty()
        && name.len() <= 50
        && chars
            .next()
            .is_some_and(|c| c.is_ascii_lowercase() || c == '_')
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
}

/// `isinstance(value, (int, float))`: a bool is an int in Python.
fn python_number(v: &Value) -> bool {
    v.is_number() || v.is_boolean()
}

/// A reading's time as `_upsert_sensor` takes it: a text parsed by `fromisoformat` (its wall
/// clock kept, the offset dropped by the driver), else now.
fn python_time(v: Option<&Value>, now: NaiveDateTime) -> NaiveDateTime {
    v.and_then(Value::as_str)
        .and_then(|t| {
            DateTime::parse_from_rfc3339(&t.replace('Z', "+00:00"))
                .map(|d| d.naive_local())
                .ok()
                .or_else(|| NaiveDateTime::parse_from_str(t, "%Y-%m-%dT%H:%M:%S%.f").ok())
        })
        .unwrap_or(now)
}

/// The stand-in for the Python service: subscribes with a clean session under its own client
/// id, handles one message at a time, and counts those it finished.
struct PythonStandIn {
    done: Arc<AtomicU64>,
    task: JoinHandle<()>,
}

impl PythonStandIn {
    async fn start(port: u16, prefix: &str, pool: MySqlPool) -> Self {
        let topics: Vec<String> = ["data", "status", "heartbeat"]
            .iter()
            .map(|k| format!("{prefix}/+/{k}"))
            .collect();
        let subs: Vec<(&str, QoS)> = topics
            .iter()
            .map(|t| (t.as_str(), QoS::AtLeastOnce))
            .collect();
        let mut sub = TestSubscriber::connect(port, &unique_name("mqtt_service"), true, &subs)
            .await
            .expect("the stand-in subscribes");
        let done = Arc::new(AtomicU64::new(0));
        let counter = done.clone();
        let task = tokio::spawn(async move {
            while let Ok(m) = sub.recv(Duration::from_secs(3600)).await {
                let parts: Vec<&str> = m.topic.rsplitn(3, '/').collect();
                if let [kind, uuid, _] = parts[..]
                    && let Ok(Value::Object(data)) = serde_json::from_slice::<Value>(&m.payload)
                {
                    handle(&pool, uuid, kind, &data).await;
                }
                counter.fetch_add(1, Ordering::SeqCst);
            }
        });
        Self { done, task }
    }

    async fn wait_done(&self, n: u64) {
        let done = self.done.clone();
        wait_until_named(
            &format!("the stand-in to handle {n} messages"),
            Duration::from_secs(20),
            Duration::from_millis(20),
            async || {
                let d = done.load(Ordering::SeqCst);
                anyhow::ensure!(d >= n, "{d} handled");
                Ok(Some(()))
            },
        )
        .await
        .unwrap();
    }
}

impl Drop for PythonStandIn {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// `last_seen` (and `last_heartbeat` for a heartbeat) now, `is_online = 1`.
async fn seen(tx: &mut sqlx::MySqlConnection, uuid: &str, now: NaiveDateTime, heartbeat: bool) {
    sqlx::query(
        "UPDATE device_main SET last_seen = ?, last_heartbeat = IFNULL(?, last_heartbeat), \
         is_online = 1 WHERE uuid = ?",
    )
    .bind(now)
    .bind(heartbeat.then_some(now))
    .bind(uuid)
    .execute(tx)
    .await
    .expect("update the device");
}

/// One text column of the device's row.
async fn set_text(tx: &mut sqlx::MySqlConnection, column: &str, value: &str, uuid: &str) {
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "UPDATE device_main SET {column} = ? WHERE uuid = ?"
    )))
    .bind(value)
    .bind(uuid)
    .execute(tx)
    .await
    .expect("update the device");
}

/// `process_device_message` of the Python service, for one message.
async fn handle(pool: &MySqlPool, uuid: &str, kind: &str, data: &serde_json::Map<String, Value>) {
    let mut tx = pool.begin().await.expect("begin");
    let row = sqlx::query("SELECT CAST(last_report_data AS CHAR) FROM device_main WHERE uuid = ?")
        .bind(uuid)
        .fetch_optional(&mut *tx)
        .await
        .expect("find the device");
    let Some(row) = row else {
        return; // ⚠️ 设备不存在
    };
    let stored: Option<String> = row.get(0);
    let now = beijing_now();
    let mut upsert = Vec::new();
    match kind {
        "data" => {
            if let Some(Value::Array(sensors)) = data.get("sensors") {
                for s in sensors {
                    let (Some(name), Some(value)) = (
                        s.get("sensor_name").and_then(Value::as_str),
                        s.get("value").filter(|v| !v.is_null()),
                    ) else {
                        continue;
                    };
                    if !python_name_ok(name) || !python_number(value) {
                        continue;
                    }
                    upsert.push((
                        name.to_owned(),
                        python_str(value),
                        s.get("unit")
                            .and_then(Value::as_str)
                            .unwrap_or("")
                            .to_owned(),
                        s.get("sensor_type")
                            .and_then(Value::as_str)
                            .unwrap_or("")
                            .to_owned(),
                        python_time(s.get("timestamp"), now),
                    ));
                }
            } else {
                let sensor = data.get("sensor").and_then(Value::as_str).unwrap_or("");
                let at = python_time(data.get("timestamp"), now);
                if sensor.to_uppercase() == "RAIN_SENSOR" {
                    let kind = sensor.to_uppercase();
                    if let Some(v) = data.get("is_raining").filter(|v| !v.is_null()) {
                        upsert.push((
                            "rain".into(),
                            python_str(v),
                            String::new(),
                            kind.clone(),
                            at,
                        ));
                    }
                    if let Some(v) = data.get("level").filter(|v| python_number(v)) {
                        upsert.push(("rain_level".into(), python_str(v), String::new(), kind, at));
                    }
                } else {
                    for (key, value) in data {
                        if ["timestamp", "status", "location"].contains(&key.as_str())
                            || !python_name_ok(key)
                            || !python_number(value)
                        {
                            continue;
                        }
                        upsert.push((
                            key.clone(),
                            python_str(value),
                            String::new(),
                            sensor.to_owned(),
                            at,
                        ));
                    }
                }
            }
            seen(&mut tx, uuid, now, false).await;
        }
        "status" => {
            // Merged into a non-empty column in place: SQLAlchemy never writes it.
            let empty = stored
                .as_deref()
                .and_then(|s| serde_json::from_str::<Value>(s).ok())
                .is_none_or(|v| v.is_null() || v.as_object().is_some_and(|m| m.is_empty()));
            if empty {
                let first = json!({"status": data}).to_string();
                set_text(&mut tx, "last_report_data", &first, uuid).await;
            }
            if let Some(status) = data.get("status") {
                set_text(&mut tx, "device_status", &python_str(status), uuid).await;
            }
            seen(&mut tx, uuid, now, false).await;
        }
        "heartbeat" => seen(&mut tx, uuid, now, true).await,
        _ => {}
    }
    for (name, value, unit, kind, at) in upsert {
        sqlx::query(
            "INSERT INTO device_sensors \
             (device_uuid, sensor_name, sensor_value, sensor_unit, sensor_type, timestamp) \
             VALUES (?, ?, ?, ?, ?, ?) ON DUPLICATE KEY UPDATE \
             sensor_value = VALUES(sensor_value), sensor_unit = VALUES(sensor_unit), \
             sensor_type = VALUES(sensor_type), timestamp = VALUES(timestamp)",
        )
        .bind(uuid)
        .bind(name)
        .bind(value)
        .bind(unit)
        .bind(kind)
        .bind(at)
        .execute(&mut *tx)
        .await
        .expect("upsert a sensor");
    }
    tx.commit().await.expect("commit");
}

/// The devices of these tests: the standard board (DHT11, DS18B20), the rain board, one that
/// sends the seed README's shapes, one that only beats, and one that the Python service left
/// with a stored status before the shadow started.
const BOARD: &str = "550e8400-e29b-41d4-a716-446655440001";
const RAIN: &str = "550e8400-e29b-41d4-a716-446655440002";
const SEED: &str = "550e8400-e29b-41d4-a716-446655440003";
const BEATS: &str = "550e8400-e29b-41d4-a716-446655440004";
const STORED: &str = "550e8400-e29b-41d4-a716-446655440005";
const ALL: [&str; 5] = [BOARD, RAIN, SEED, BEATS, STORED];

/// Registers the devices as the backend does; `STORED` with what the Python service leaves
/// after a while (a status, naive times).
async fn register(pool: &MySqlPool) {
    for (n, uuid) in ALL.iter().enumerate() {
        let earlier = beijing_now() - TimeDelta::minutes(3);
        let stored = (*uuid == STORED)
            .then(|| json!({"status": {"uptime": 30, "wifi_connected": true}}).to_string());
        sqlx::query(
            "INSERT INTO device_main (uuid, device_id, name, device_secret, is_online, \
                                      last_seen, last_report_data) \
             VALUES (?, ?, ?, 'a-secret', ?, ?, ?)",
        )
        .bind(uuid)
        .bind(format!("AIOT-ESP32-0000000{n}"))
        .bind(format!("Board {n}"))
        .bind(stored.is_some())
        .bind(stored.as_ref().map(|_| earlier))
        .bind(stored)
        .execute(pool)
        .await
        .expect("register a device");
    }
}

/// What the devices publish: every payload the firmware's format strings make, and the seed
/// README's examples.
fn messages() -> Vec<(&'static str, &'static str, String)> {
    let board = |n: usize| format!("AIOT-ESP32-0000000{n}");
    vec![
        (BOARD, "heartbeat", r#"{"sequence":7,"timestamp":90512,"status":1}"#.into()),
        (
            BOARD,
            "data",
            format!(r#"{{"device_id":"{}","sensor":"DHT11","temperature":24.3,"humidity":55.0,"timestamp":90}}"#, board(0)),
        ),
        (
            BOARD,
            "data",
            format!(r#"{{"device_id":"{}","sensor":"DS18B20","temperature":23.8,"timestamp":90}}"#, board(0)),
        ),
        (
            BOARD,
            "status",
            format!(r#"{{"device_id":"{}","uptime":90,"free_heap":168432,"wifi_connected":true,"mqtt_connected":true,"ble_connected":false,"timestamp":90}}"#, board(0)),
        ),
        (
            BOARD,
            "status",
            format!(r#"{{"device_id":"{}","uptime":120,"free_heap":168000,"wifi_connected":true,"mqtt_connected":true,"ble_connected":false,"timestamp":120}}"#, board(0)),
        ),
        (
            RAIN,
            "data",
            format!(r#"{{"device_id":"{}","sensor":"RAIN_SENSOR","is_raining":false,"level":1,"timestamp":100}}"#, board(1)),
        ),
        (
            RAIN,
            "data",
            format!(r#"{{"device_id":"{}","sensor":"RAIN_SENSOR","is_raining":true,"level":0,"timestamp":130}}"#, board(1)),
        ),
        (RAIN, "heartbeat", r#"{"sequence":1,"timestamp":1000,"status":1}"#.into()),
        (
            SEED,
            "data",
            r#"{"sensors":[{"sensor_name":"temperature","value":25.5,"unit":"°C","timestamp":"2025-12-19T14:30:00+08:00"},{"sensor_name":"humidity","value":60,"unit":"%"}],"status":{"ip_address":"192.168.1.100","rssi":-50,"battery":95},"location":{"latitude":39.9042,"longitude":116.4074},"timestamp":"2025-12-19T14:30:00+08:00"}"#.into(),
        ),
        (SEED, "status", r#"{"status": "online", "battery": 95, "signal": "good"}"#.into()),
        (
            SEED,
            "data",
            r#"{"temperature": 25.5, "humidity": 60, "light": 850}"#.into(),
        ),
        (SEED, "heartbeat", r#"{"timestamp": "2025-12-19T14:30:00+08:00"}"#.into()),
        (BEATS, "heartbeat", r#"{"sequence":3,"timestamp":30000,"status":1}"#.into()),
        (
            STORED,
            "status",
            format!(r#"{{"device_id":"{}","uptime":60,"free_heap":170000,"wifi_connected":true,"mqtt_connected":true,"ble_connected":false,"timestamp":60}}"#, board(4)),
        ),
        (
            STORED,
            "data",
            format!(r#"{{"device_id":"{}","sensor":"DHT11","temperature":21.0,"humidity":40.0,"timestamp":60}}"#, board(4)),
        ),
    ]
}

async fn publish_all(target: &Target) -> u64 {
    let messages = messages();
    for (uuid, kind, payload) in &messages {
        mqtt_publish(
            target.mqtt_port,
            &target.topic(uuid, kind),
            payload.as_str(),
            QoS::AtLeastOnce,
        )
        .await
        .unwrap();
    }
    messages.len() as u64
}

/// Every row of the tables, as text, in key order: what "unchanged" is checked against.
async fn dump(pool: &MySqlPool) -> Vec<String> {
    let mut out = Vec::new();
    let tables: Vec<String> = sqlx::query_scalar("SHOW TABLES")
        .fetch_all(pool)
        .await
        .unwrap();
    out.push(format!("tables: {tables:?}"));
    for (table, key) in [("device_main", "id"), ("device_sensors", "id")] {
        let columns: Vec<String> = sqlx::query_scalar(
            "SELECT COLUMN_NAME FROM information_schema.COLUMNS \
             WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = ? ORDER BY ORDINAL_POSITION",
        )
        .bind(table)
        .fetch_all(pool)
        .await
        .unwrap();
        let row = columns
            .iter()
            .map(|c| format!("IFNULL(CAST(`{c}` AS CHAR), '<NULL>')"))
            .collect::<Vec<_>>()
            .join(", ");
        let rows: Vec<String> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "SELECT CONCAT_WS('|', {row}) FROM {table} ORDER BY {key}"
        )))
        .fetch_all(pool)
        .await
        .unwrap();
        out.extend(rows.into_iter().map(|r| format!("{table}: {r}")));
    }
    out
}

/// The shadow run: the real binary with `SHADOW_DATABASE`, its metrics on a port of its own.
struct Shadow {
    process: ServiceProcess,
    http: std::net::SocketAddr,
    target: Target,
}

impl Shadow {
    async fn start(live: &TestDb, shadow: &TestDb, prefix: &str) -> Self {
        let http: std::net::SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let mut target = Target::new(live, shared_mqtt_port())
            .with("SHADOW_DATABASE", &shadow.name)
            .with("HTTP_LISTEN", &http.to_string());
        target.prefix = prefix.to_owned();
        let process = ServiceProcess::start(&target).await;
        Self {
            process,
            http,
            target,
        }
    }

    /// Waits until `n` messages were written.
    async fn wait_written(&self, n: u64) {
        let http = self.http;
        wait_until_named(
            &format!("the shadow run to write {n} messages"),
            Duration::from_secs(20),
            Duration::from_millis(50),
            async || {
                let (_, body) = http_get(http, "/metrics").await?;
                let written = metric(&body, "mqtt_ingest_messages_written_total").unwrap_or(0.0);
                anyhow::ensure!(written >= n as f64, "{written} written");
                Ok(Some(()))
            },
        )
        .await
        .unwrap();
    }

    async fn stop(mut self) {
        self.process.signal("TERM");
        assert_eq!(
            self.process.wait_exit(Duration::from_secs(30)).await,
            Some(0)
        );
        let _ = clear_session(
            self.target.mqtt_port,
            &format!("{}-shadow", self.target.client_id),
        )
        .await;
    }
}

/// Runs `mqtt-ingest compare` with the target's settings; its exit status and output.
async fn compare(target: &Target, args: &[&str]) -> (i32, String) {
    command(target, &[&["compare"], args].concat()).await
}

/// Runs `mqtt-ingest` with these arguments and the target's settings.
async fn command(target: &Target, args: &[&str]) -> (i32, String) {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_mqtt-ingest"));
    cmd.arg("--env-file")
        .arg("/dev/null")
        .args(args)
        .stdin(Stdio::null())
        .env("NO_COLOR", "1");
    for (k, v) in target.vars() {
        cmd.env(k, v);
    }
    let out = cmd.output().await.expect("run compare");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    eprintln!(
        "[mqtt-ingest {args:?}] exit {:?}\n{text}{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().unwrap_or(-1), text)
}

async fn setup() -> (TestDb, TestDb, String) {
    let live = TestDb::new().await;
    create_schema(&live.pool(), Schema::Current).await;
    register(&live.pool()).await;
    let shadow = TestDb::new().await;
    (live, shadow, format!("{}/devices", unique_name("t")))
}

#[tokio::test]
async fn a_shadow_run_reads_the_live_tables_and_never_writes_them() {
    let (live, shadow, prefix) = setup().await;
    let before = dump(&live.pool()).await;
    let run = Shadow::start(&live, &shadow, &prefix).await;
    assert!(
        run.process
            .log()
            .contains("shadow copy made: 5 device_main rows and 0 device_sensors rows copied"),
        "{}",
        run.process.log()
    );
    let n = publish_all(&run.target).await;
    run.wait_written(n).await;
    // Written into the shadow tables …
    let row = sqlx::query("SELECT is_online, last_heartbeat FROM device_main WHERE uuid = ?")
        .bind(BEATS)
        .fetch_one(&shadow.pool())
        .await
        .unwrap();
    assert!(row.get::<bool, _>(0) && row.get::<Option<NaiveDateTime>, _>(1).is_some());
    let sensors: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM device_sensors")
        .fetch_one(&shadow.pool())
        .await
        .unwrap();
    assert!(sensors >= 8, "{sensors} device_sensors rows in the shadow");
    // … and the live ones are as they were, row for row, with no table added.
    assert_eq!(dump(&live.pool()).await, before);
    // A restart keeps the copy it writes on.
    run.stop().await;
    let again = Shadow::start(&live, &shadow, &prefix).await;
    assert!(
        again.process.log().contains("shadow copy kept"),
        "{}",
        again.process.log()
    );
    again.stop().await;
    assert_eq!(dump(&live.pool()).await, before);
}

#[tokio::test]
async fn compare_finds_no_unexpected_difference_beside_the_python_service_and_names_planted_ones() {
    let (live, shadow, prefix) = setup().await;
    let python = PythonStandIn::start(shared_mqtt_port(), &prefix, live.pool()).await;
    let run = Shadow::start(&live, &shadow, &prefix).await;
    let n = publish_all(&run.target).await;
    python.wait_done(n).await;
    run.wait_written(n).await;

    let (code, text) = compare(&run.target, &[]).await;
    let summary = text.lines().next().unwrap_or_default();
    assert!(
        summary.starts_with("5 devices, 0 unexpected differences, "),
        "{text}"
    );
    assert_eq!(code, 0, "{text}");
    // What the Python service does differently shows, each as what it is.
    for class in ["lost_status_merge", "not_in_last_report_data"] {
        assert!(summary.contains(class), "{class} missing: {text}");
    }

    let (code, json_text) = compare(&run.target, &["--format", "json"]).await;
    assert_eq!(code, 0);
    let report: Value = serde_json::from_str(&json_text).expect("compare --format json is JSON");
    assert_eq!(report["devices"], 5);
    assert_eq!(report["unexpected"], 0);
    assert!(
        report["differences"]
            .as_array()
            .unwrap()
            .iter()
            .all(|d| d["expected"] == true)
    );
    assert_eq!(report["summary"].as_str(), Some(summary));

    // Planted: one wrong value on the Python side, one device our side never saw.
    sqlx::query(
        "UPDATE device_sensors SET sensor_value = '99.9' \
         WHERE device_uuid = ? AND sensor_name = 'humidity'",
    )
    .bind(BOARD)
    .execute(&live.pool())
    .await
    .unwrap();
    sqlx::query(
        "UPDATE device_main SET is_online = 0, last_seen = NULL, last_heartbeat = NULL \
         WHERE uuid = ?",
    )
    .bind(BEATS)
    .execute(&shadow.pool())
    .await
    .unwrap();
    let (code, text) = compare(&run.target, &[]).await;
    assert_eq!(code, 1, "{text}");
    assert!(text.contains(", 4 unexpected differences, "), "{text}");
    for planted in [
        format!("{BOARD} device_sensors.humidity.value: python 99.9 at "),
        format!("{BEATS} online: python online (is_online 1, "),
        format!("{BEATS} last_seen: python "),
        format!("{BEATS} last_heartbeat: python "),
    ] {
        assert!(text.contains(&planted), "{planted:?} not named: {text}");
    }
    run.stop().await;
}

/// After the switch: mqtt-ingest writes the live tables, the Python service a copy, and the same
/// compare proves that switching back would lose nothing either.
#[tokio::test]
async fn the_other_way_round_the_python_service_in_shadow() {
    let (live, python_db, prefix) = setup().await;
    let http: std::net::SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let mut target = Target::new(&live, shared_mqtt_port()).with("HTTP_LISTEN", &http.to_string());
    target.prefix = prefix.clone();
    let (code, said) = command(&target, &["shadow-copy", "--into", &python_db.name]).await;
    assert_eq!(code, 0, "{said}");
    assert!(
        said.starts_with("shadow copy made: 5 device_main rows and 0 device_sensors rows"),
        "{said}"
    );
    let python = PythonStandIn::start(shared_mqtt_port(), &prefix, python_db.pool()).await;
    let run = Shadow {
        process: ServiceProcess::start(&target).await,
        http,
        target: target.clone(),
    };
    let n = publish_all(&target).await;
    python.wait_done(n).await;
    run.wait_written(n).await;
    let (code, text) = compare(&target, &["--python", &python_db.name]).await;
    assert!(
        text.starts_with("5 devices, 0 unexpected differences, "),
        "{text}"
    );
    assert_eq!(code, 0, "{text}");
    // Both sides named the same: a usage error, not a comparison of a table with itself.
    let (code, _) = compare(&target, &[]).await;
    assert_eq!(code, 2);
    run.process.signal("TERM");
    let mut process = run.process;
    assert_eq!(process.wait_exit(Duration::from_secs(30)).await, Some(0));
    let _ = clear_session(target.mqtt_port, &target.client_id).await;
}
