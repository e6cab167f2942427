//! Running the service under test: in-process (`spawn_service`) or as the real binary
//! (`ServiceProcess`, for signals and `kill -9`), plus reading `device_main` rows back.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use chrono::NaiveDateTime;
use mqtt_ingest::config::Settings;
use mqtt_ingest::ops::stats::Stats;
use mqtt_ingest::service::Service;
use serde_json::Value;
use sqlx::{MySqlPool, Row};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::common::{TestDb, clear_session, unique_name, wait_until_named};
pub use crate::common::{http_get, metric};

/// Where the service under test connects, and its per-test names.
#[derive(Debug, Clone)]
pub struct Target {
    pub mqtt_port: u16,
    pub client_id: String,
    pub prefix: String,
    pub db_host: String,
    pub db_port: u16,
    pub db_name: String,
    pub db_user: String,
    pub db_password: String,
    /// `MQTT_PROTOCOL`: from `TEST_MQTT_PROTOCOL` (default 3.1.1), so the same tests run the
    /// service under either protocol version (scripts/test.sh runs the ingest path under both).
    pub protocol: String,
    /// Extra or overriding variables.
    pub extra: Vec<(String, String)>,
    /// Variables left out of the environment (a user's `.env` that names the broker otherwise).
    pub removed: Vec<String>,
}

impl Target {
    pub fn new(db: &TestDb, mqtt_port: u16) -> Self {
        Self {
            mqtt_port,
            client_id: unique_name("svc"),
            prefix: format!("{}/devices", unique_name("t")),
            db_host: db.host.clone(),
            db_port: db.port,
            db_name: db.name.clone(),
            db_user: db.user.clone(),
            db_password: db.password.clone(),
            protocol: test_protocol(),
            extra: Vec::new(),
            removed: Vec::new(),
        }
    }

    /// Leaves `var` out of the service's environment.
    pub fn without(mut self, var: &str) -> Self {
        self.removed.push(var.to_owned());
        self
    }

    pub fn with(mut self, var: &str, value: &str) -> Self {
        self.extra.push((var.to_owned(), value.to_owned()));
        self
    }

    /// The environment the service gets.
    pub fn vars(&self) -> Vec<(String, String)> {
        let mut v: Vec<(String, String)> = [
            ("MQTT_BROKER", "127.0.0.1".to_owned()),
            ("MQTT_PORT", self.mqtt_port.to_string()),
            ("MQTT_USERNAME", String::new()),
            ("MQTT_PASSWORD", String::new()),
            ("MQTT_CLIENT_ID", self.client_id.clone()),
            ("MQTT_TOPIC_PREFIX", self.prefix.clone()),
            ("MQTT_PROTOCOL", self.protocol.clone()),
            ("MQTT_KEEPALIVE_SECS", "5".to_owned()),
            ("MQTT_RECONNECT_MIN_SECS", "1".to_owned()),
            ("MQTT_RECONNECT_MAX_SECS", "2".to_owned()),
            ("DB_HOST", self.db_host.clone()),
            ("DB_PORT", self.db_port.to_string()),
            ("DB_NAME", self.db_name.clone()),
            ("DB_USER", self.db_user.clone()),
            ("DB_PASSWORD", self.db_password.clone()),
            ("DB_POOL_MIN", "1".to_owned()),
            ("DB_POOL_MAX", "4".to_owned()),
            ("DB_CONNECT_TIMEOUT_SECS", "2".to_owned()),
            ("DB_RETRY_MAX_SECS", "1".to_owned()),
            ("INGEST_BATCH_MAX_WAIT_MS", "5".to_owned()),
            ("STATS_INTERVAL_SECS", "0".to_owned()),
            // Tests run side by side: the listener is off unless a test asks for one.
            ("HTTP_LISTEN", String::new()),
            ("HEALTH_DB_CHECK_SECS", "1".to_owned()),
            ("LOG_FORMAT", "text".to_owned()),
            ("LOG_LEVEL", "info".to_owned()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
        for (k, val) in &self.extra {
            v.retain(|(name, _)| name != k);
            v.push((k.clone(), val.clone()));
        }
        v.retain(|(name, _)| !self.removed.contains(name));
        v
    }

    pub fn settings(&self) -> Settings {
        let map: HashMap<String, String> = self.vars().into_iter().collect();
        Settings::from_map(&map).expect("test settings are valid")
    }

    /// The topic a device publishes to under this test's prefix.
    pub fn topic(&self, device: &str, kind: &str) -> String {
        format!("{}/{device}/{kind}", self.prefix)
    }
}

/// The protocol version the service under test speaks: `TEST_MQTT_PROTOCOL`, default 3.1.1.
/// A value the service would not accept fails here, not as a confusing settings error later.
pub fn test_protocol() -> String {
    let raw = std::env::var("TEST_MQTT_PROTOCOL").unwrap_or_default();
    let raw = raw.trim();
    let protocol = if raw.is_empty() { "3.1.1" } else { raw };
    assert!(
        mqtt_ingest::config::MqttProtocol::parse(protocol).is_some(),
        "TEST_MQTT_PROTOCOL={protocol:?}: must be 3.1.1 or 5"
    );
    protocol.to_owned()
}

/// The service running inside the test process.
pub struct Running {
    pub stats: Arc<Stats>,
    /// Where the HTTP listener listens, when the target turned it on.
    pub http: Option<SocketAddr>,
    shutdown: CancellationToken,
    task: JoinHandle<anyhow::Result<()>>,
    target: Target,
}

/// Starts the service and waits until it is subscribed.
pub async fn spawn_service(target: &Target) -> Running {
    let service = Service::build(target.settings())
        .await
        .expect("the service builds");
    let stats = service.stats();
    let http = service.http_address();
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(service.run_until_stopped(shutdown.clone()));
    let s = stats.clone();
    wait_until_named(
        "the service to subscribe",
        Duration::from_secs(20),
        Duration::from_millis(20),
        async || s.is_subscribed(),
    )
    .await
    .expect("service subscribed");
    Running {
        stats,
        http,
        shutdown,
        task,
        target: target.clone(),
    }
}

impl Running {
    /// Waits until `done` messages have finished (committed or rejected) and returns the
    /// counters then. A row can be visible a moment before the writer counts its commit.
    pub async fn settled(&self, done: u64) -> mqtt_ingest::ops::stats::Snapshot {
        self.settled_within(done, Duration::from_secs(20)).await
    }

    /// [`Running::settled`], waiting up to `limit`.
    pub async fn settled_within(
        &self,
        done: u64,
        limit: Duration,
    ) -> mqtt_ingest::ops::stats::Snapshot {
        let stats = self.stats.clone();
        wait_until_named(
            &format!("{done} messages finished"),
            limit,
            Duration::from_millis(10),
            async || {
                let s = stats.snapshot();
                if s.succeeded + s.failed >= done {
                    Ok(Some(s))
                } else {
                    anyhow::bail!("{} succeeded, {} failed", s.succeeded, s.failed)
                }
            },
        )
        .await
        .unwrap()
    }

    /// Stops the service as SIGTERM would, and removes its broker session.
    pub async fn stop(self) -> anyhow::Result<()> {
        self.shutdown.cancel();
        let result = tokio::time::timeout(Duration::from_secs(40), self.task)
            .await
            .context("service did not stop within 40 s")?
            .context("service task panicked")?;
        let _ = clear_session(self.target.mqtt_port, &self.target.client_id).await;
        result
    }

    /// Kills the service as a crash would: the task is dropped mid-stream, no acknowledgement
    /// or DISCONNECT is sent, and its persistent session stays on the broker.
    pub async fn abort(self) -> Target {
        self.task.abort();
        let _ = self.task.await;
        self.target
    }

    /// Stops the service but keeps its persistent session on the broker.
    pub async fn stop_keeping_session(self) -> anyhow::Result<()> {
        self.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(40), self.task)
            .await
            .context("service did not stop within 40 s")?
            .context("service task panicked")?
    }
}

/// The real binary, for signals and `kill -9`.
pub struct ServiceProcess {
    child: Child,
    pub output: Arc<Mutex<Vec<String>>>,
    /// The tasks reading stdout and stderr into `output`; they end at the process's exit.
    readers: Vec<JoinHandle<()>>,
}

impl ServiceProcess {
    /// Starts `mqtt-ingest` with the target's settings and waits until it logged "subscribed".
    pub async fn start(target: &Target) -> Self {
        let p = Self::spawn(target);
        p.wait_for_log("subscribed", Duration::from_secs(20)).await;
        p
    }

    /// Starts `mqtt-ingest` with the target's settings and returns at once.
    pub fn spawn(target: &Target) -> Self {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_mqtt-ingest"));
        cmd.arg("--env-file")
            .arg("/dev/null")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .env("NO_COLOR", "1")
            .env_remove("JOURNAL_STREAM")
            // Only a test that binds its own socket plays systemd.
            .env_remove("NOTIFY_SOCKET")
            .env_remove("WATCHDOG_USEC")
            .env_remove("WATCHDOG_PID")
            .kill_on_drop(true);
        for (k, v) in target.vars() {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("spawn mqtt-ingest");
        let output = Arc::new(Mutex::new(Vec::new()));
        let mut readers = Vec::new();
        for stream in [
            child
                .stderr
                .take()
                .map(|s| Box::new(s) as Box<dyn tokio::io::AsyncRead + Send + Unpin>),
            child
                .stdout
                .take()
                .map(|s| Box::new(s) as Box<dyn tokio::io::AsyncRead + Send + Unpin>),
        ]
        .into_iter()
        .flatten()
        {
            let out = output.clone();
            readers.push(tokio::spawn(async move {
                let mut lines = BufReader::new(stream).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    eprintln!("[mqtt-ingest] {line}");
                    out.lock().unwrap().push(line);
                }
            }));
        }
        ServiceProcess {
            child,
            output,
            readers,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id().expect("process is running")
    }

    /// Waits until a line containing `needle` was logged.
    pub async fn wait_for_log(&self, needle: &str, timeout: Duration) {
        let out = self.output.clone();
        wait_until_named(
            &format!("the service to log {needle:?}"),
            timeout,
            Duration::from_millis(20),
            async || out.lock().unwrap().iter().any(|l| l.contains(needle)),
        )
        .await
        .unwrap();
    }

    pub fn signal(&self, signal: &str) {
        let status = std::process::Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.pid().to_string())
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{signal} failed");
    }

    /// Waits for the process to exit, and for its last lines to reach [`ServiceProcess::log`];
    /// returns its exit code.
    pub async fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        let exited = async {
            let status = self.child.wait().await.expect("wait for service");
            for reader in self.readers.drain(..) {
                let _ = reader.await;
            }
            status
        };
        tokio::time::timeout(timeout, exited)
            .await
            .expect("service exited in time")
            .code()
    }

    /// The whole log so far.
    pub fn log(&self) -> String {
        self.output.lock().unwrap().join("\n")
    }
}

/// Registers a device as the backend does: `device_id`, `uuid` and `name` only.
pub async fn register(pool: &MySqlPool, uuid: &str) {
    sqlx::query("INSERT INTO device_main (device_id, uuid, name) VALUES (?, ?, ?)")
        .bind(format!("dev-{uuid}"))
        .bind(uuid)
        .bind(format!("Test device {uuid}"))
        .execute(pool)
        .await
        .expect("register device");
}

/// Runs the service's migrations on a test database (tests that register devices before the
/// service starts need the table first).
pub async fn migrate(pool: &MySqlPool) {
    mqtt_ingest::store::migrate(pool)
        .await
        .expect("migrations run");
}

/// One `device_main` row as the tests look at it.
#[derive(Debug, Clone, PartialEq)]
pub struct DeviceRow {
    pub is_online: bool,
    pub last_seen: Option<NaiveDateTime>,
    pub last_heartbeat: Option<NaiveDateTime>,
    pub device_status: Option<String>,
    pub data: Option<Value>,
}

pub async fn device(pool: &MySqlPool, uuid: &str) -> anyhow::Result<Option<DeviceRow>> {
    // MariaDB's JSON is LONGTEXT: read it back as text.
    let row = sqlx::query(
        "SELECT is_online, last_seen, last_heartbeat, device_status, \
                CAST(last_report_data AS CHAR) AS data \
         FROM device_main WHERE uuid = ?",
    )
    .bind(uuid)
    .fetch_optional(pool)
    .await?;
    let Some(row) = row else { return Ok(None) };
    let data: Option<String> = row.try_get("data")?;
    Ok(Some(DeviceRow {
        is_online: row.try_get::<i8, _>("is_online")? != 0,
        last_seen: row.try_get("last_seen")?,
        last_heartbeat: row.try_get("last_heartbeat")?,
        device_status: row.try_get("device_status")?,
        data: data.map(|d| serde_json::from_str(&d)).transpose()?,
    }))
}

/// Waits until the device's row satisfies `check`, and returns it.
pub async fn wait_for_device(
    pool: &MySqlPool,
    uuid: &str,
    what: &str,
    check: impl Fn(&DeviceRow) -> bool,
) -> DeviceRow {
    wait_until_named(
        what,
        Duration::from_secs(20),
        Duration::from_millis(25),
        async || match device(pool, uuid).await? {
            Some(row) if check(&row) => Ok(Some(row)),
            Some(row) => anyhow::bail!("row is {row:?}"),
            None => anyhow::bail!("no row for {uuid}"),
        },
    )
    .await
    .unwrap()
}

/// `last_report_data.sensors.<name>.value` of a row.
pub fn sensor(row: &DeviceRow, name: &str) -> Option<Value> {
    row.data
        .as_ref()?
        .get("sensors")?
        .get(name)?
        .get("value")
        .cloned()
}

/// How many devices have sensor `seq` at `seq` (tests publish `{"seq": N}` per device).
pub async fn devices_at_seq(pool: &MySqlPool, seq: u64) -> anyhow::Result<usize> {
    let n: i64 = sqlx::query_scalar(
        "SELECT COUNT(*) FROM device_main \
         WHERE JSON_VALUE(last_report_data, '$.sensors.seq.value') = ?",
    )
    .bind(seq)
    .fetch_one(pool)
    .await?;
    Ok(n as usize)
}

/// Waits until `n` devices are at `seq`.
pub async fn wait_devices_at_seq(pool: &MySqlPool, n: usize, seq: u64, timeout: Duration) {
    wait_until_named(
        &format!("{n} devices to reach seq {seq}"),
        timeout,
        Duration::from_millis(100),
        async || {
            let done = devices_at_seq(pool, seq).await?;
            if done == n {
                Ok(true)
            } else {
                anyhow::bail!("{done} of {n} devices done")
            }
        },
    )
    .await
    .unwrap();
}
