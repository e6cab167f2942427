//! `mqtt-ingest-cluster`: the scale-out scenarios of docs/scale-out.md, on the topology that
//! `scripts/cluster.sh up` starts (three RMQTT nodes, three Galera nodes, all on 127.0.0.1).
//!
//! Each scenario gets a fresh database (created on the first Galera node, replicated to the
//! others), 10,000 devices registered in the backend's table shape, `device_sensors` as the
//! backend creates it, and 1–3 instances of the real service binary in one shared-subscription
//! group, instance `k` on broker node `k` and Galera node `k` first (the other nodes after it in
//! its lists). The devices publish what the firmware publishes; the ledger of every data
//! message the broker acknowledged is then checked against `device_main`, `device_sensors` and
//! `device_history`.

mod publisher;

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use clap::Parser;
use serde_json::json;
use sqlx::mysql::{MySqlConnectOptions, MySqlPool, MySqlPoolOptions};
use sqlx::{AssertSqlSafe, Row as _};
use tokio::process::{Child, Command};

use mqtt_ingest_testkit::{cpu_seconds, free_port, unique_name};
use publisher::{Devices, Ledger, Pace};

const SENSORS_DDL: &str = include_str!("../../../tests/it/fixtures/codehubot-device-sensors.sql");

/// mqtt-ingest-cluster: scale-out scenarios on the topology of scripts/cluster.sh.
#[derive(Debug, Parser)]
struct Cli {
    /// Where scripts/cluster.sh keeps the topology (its ports and pids)
    #[arg(long, default_value = "target/cluster")]
    cluster_dir: PathBuf,
    /// The script that kills and starts nodes
    #[arg(long, default_value = "scripts/cluster.sh")]
    cluster_script: PathBuf,
    /// The service binary under test
    #[arg(long, default_value = "target/release/mqtt-ingest")]
    service_bin: PathBuf,
    /// Devices registered and publishing
    #[arg(long, default_value_t = 10_000)]
    devices: usize,
    /// Seconds each live scenario publishes
    #[arg(long, default_value_t = 60)]
    secs: u64,
    /// Messages per device in a scale run (published as fast as the brokers take them)
    #[arg(long, default_value_t = 3)]
    flood_per_device: u64,
    /// Runs of each scale row (the median is reported)
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Scenarios, comma-separated: scale, steady, instance-restart, instance-lost, db-node,
    /// broker-node; or all
    #[arg(long, value_delimiter = ',', default_value = "all")]
    scenario: Vec<String>,
    /// Write the rows as JSON here too
    #[arg(long)]
    json: Option<PathBuf>,
    /// The node (1-3) the db-node and broker-node faults kill (node 1 is RMQTT's raft leader);
    /// the instance watched for the failover is the one on that node
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=3))]
    fault_node: u8,
    /// Data messages carry a real reading time (ISO 8601) besides the firmware's uptime, so
    /// that the stored state is ordered by when a reading was taken, not when it arrived
    #[arg(long)]
    dated: bool,
}

/// The topology, read from scripts/cluster.sh's files.
struct Topology {
    dir: PathBuf,
    brokers: Vec<u16>,
    dbs: Vec<u16>,
    strategy: String,
}

impl Topology {
    fn read(dir: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(dir.join("ports")).with_context(|| {
            format!(
                "{}/ports: is the topology up? (scripts/cluster.sh up)",
                dir.display()
            )
        })?;
        let ports: HashMap<String, u16> = text
            .lines()
            .filter_map(|l| l.split_once('='))
            .filter_map(|(k, v)| Some((k.to_owned(), v.parse().ok()?)))
            .collect();
        let get = |k: String| ports.get(&k).copied().context(k);
        let strategy =
            std::fs::read_to_string(dir.join("rmqtt/1/plugins/rmqtt-shared-subscription.toml"))
                .unwrap_or_default()
                .lines()
                .find_map(|l| l.strip_prefix("strategy = "))
                .map(|s| s.trim_matches('"').to_owned())
                .unwrap_or_else(|| "?".into());
        Ok(Topology {
            dir: dir.to_owned(),
            brokers: (1..=3)
                .map(|n| get(format!("mqtt{n}")))
                .collect::<Result<_, _>>()?,
            dbs: (1..=3)
                .map(|n| get(format!("sql{n}")))
                .collect::<Result<_, _>>()?,
            strategy,
        })
    }

    fn pids(&self, kind: &str) -> Vec<u32> {
        (1..=3)
            .filter_map(|n| {
                std::fs::read_to_string(self.dir.join(format!("{kind}/{n}/pid")))
                    .ok()?
                    .trim()
                    .parse()
                    .ok()
            })
            .collect()
    }

    /// `host:port` of the nodes, starting at node `k`.
    fn list(ports: &[u16], k: usize) -> String {
        (0..ports.len())
            .map(|i| format!("127.0.0.1:{}", ports[(k + i) % ports.len()]))
            .collect::<Vec<_>>()
            .join(",")
    }
}

fn node_options(port: u16) -> MySqlConnectOptions {
    MySqlConnectOptions::new()
        .host("127.0.0.1")
        .port(port)
        .username("root")
}

/// A fresh database with the devices registered.
async fn prepare_db(topo: &Topology, devices: usize) -> anyhow::Result<(String, MySqlPool)> {
    let name = unique_name("cluster");
    let admin = MySqlPoolOptions::new()
        .max_connections(1)
        .connect_with(node_options(topo.dbs[0]))
        .await?;
    sqlx::query(AssertSqlSafe(format!(
        "CREATE DATABASE `{name}` CHARACTER SET utf8mb4"
    )))
    .execute(&admin)
    .await?;
    admin.close().await;
    let pool = MySqlPoolOptions::new()
        .max_connections(4)
        .connect_with(node_options(topo.dbs[0]).database(&name))
        .await?;
    mqtt_ingest::store::migrate(&pool).await?;
    sqlx::raw_sql(AssertSqlSafe(SENSORS_DDL.to_owned()))
        .execute(&pool)
        .await?;
    for chunk in (0..devices).collect::<Vec<_>>().chunks(1000) {
        let mut q = sqlx::QueryBuilder::new("INSERT INTO device_main (device_id, uuid, name) ");
        q.push_values(chunk, |mut b, d| {
            b.push_bind(format!("AIOT-ESP32-{d:08X}"))
                .push_bind(format!("dev{d}"))
                .push_bind(format!("Device {d}"));
        });
        q.build().execute(&pool).await?;
    }
    Ok((name, pool))
}

async fn drop_db(topo: &Topology, name: &str) {
    if let Ok(admin) = MySqlPoolOptions::new()
        .max_connections(1)
        .connect_with(node_options(topo.dbs[0]))
        .await
    {
        let _ = sqlx::query(AssertSqlSafe(format!("DROP DATABASE IF EXISTS `{name}`")))
            .execute(&admin)
            .await;
        admin.close().await;
    }
}

/// One instance of the service.
struct Instance {
    k: usize,
    env: Vec<(String, String)>,
    child: Option<Child>,
    http: u16,
    log: PathBuf,
    cpu_before: f64,
    /// Counters of the lives that ended (a killed instance's last scrape).
    past: Metrics,
}

#[derive(Clone, Copy, Debug, Default)]
struct Metrics {
    received: f64,
    written: f64,
    rejected: f64,
    conflicts: f64,
    node_moves: f64,
    reconnects: f64,
    subscribed: f64,
    cpu: f64,
}

impl std::ops::Add for Metrics {
    type Output = Metrics;
    fn add(self, o: Metrics) -> Metrics {
        Metrics {
            received: self.received + o.received,
            written: self.written + o.written,
            rejected: self.rejected + o.rejected,
            conflicts: self.conflicts + o.conflicts,
            node_moves: self.node_moves + o.node_moves,
            reconnects: self.reconnects + o.reconnects,
            subscribed: o.subscribed,
            cpu: self.cpu + o.cpu,
        }
    }
}

impl Instance {
    fn new(topo: &Topology, k: usize, db: &str, prefix: &str, work: &Path) -> Self {
        let http = free_port();
        let env: Vec<(String, String)> = [
            ("MQTT_BROKER", Topology::list(&topo.brokers, k)),
            ("MQTT_CLIENT_ID", format!("cluster-{k}-{prefix}")),
            ("MQTT_TOPIC_PREFIX", format!("{prefix}/devices")),
            ("MQTT_SHARED_GROUP", "ingest".into()),
            ("MQTT_KEEPALIVE_SECS", "5".into()),
            ("MQTT_RECONNECT_MIN_SECS", "1".into()),
            ("MQTT_RECONNECT_MAX_SECS", "5".into()),
            ("DB_HOST", Topology::list(&topo.dbs, k)),
            ("DB_NAME", db.into()),
            ("DB_USER", "root".into()),
            ("DB_PASSWORD", String::new()),
            ("DB_CONNECT_TIMEOUT_SECS", "5".into()),
            ("DB_RETRY_MAX_SECS", "2".into()),
            ("HISTORY_ENABLED", "true".into()),
            ("HISTORY_RETENTION_DAYS", "0".into()),
            ("PRESENCE_TIMEOUT_SECS", "0".into()),
            ("HTTP_LISTEN", format!("127.0.0.1:{http}")),
            ("LOG_FORMAT", "text".into()),
            ("STATS_INTERVAL_SECS", "0".into()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
        Instance {
            k,
            env,
            child: None,
            http,
            log: work.join(format!("instance-{k}.log")),
            cpu_before: 0.0,
            past: Metrics::default(),
        }
    }

    fn spawn(&mut self, bin: &Path) -> anyhow::Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        let mut cmd = Command::new(bin);
        cmd.args(["--env-file", "/dev/null"])
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true);
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        self.cpu_before = child.id().and_then(cpu_seconds).unwrap_or(0.0);
        self.child = Some(child);
        Ok(())
    }

    fn pid(&self) -> Option<u32> {
        self.child.as_ref().and_then(Child::id)
    }

    async fn metrics(&self) -> Option<Metrics> {
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], self.http));
        let (_, text) = mqtt_ingest_testkit::http_get(addr, "/metrics").await.ok()?;
        let get = |name: &str| {
            text.lines()
                .filter(|l| l.starts_with(name) && !l.starts_with('#'))
                .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                .sum::<f64>()
        };
        Some(Metrics {
            received: get("mqtt_ingest_messages_received_total"),
            written: get("mqtt_ingest_messages_written_total"),
            rejected: get("mqtt_ingest_messages_rejected_total"),
            conflicts: get("mqtt_ingest_db_conflicts_total"),
            node_moves: get("mqtt_ingest_db_node_moves_total"),
            reconnects: get("mqtt_ingest_mqtt_reconnects_total"),
            subscribed: get("mqtt_ingest_mqtt_subscribed"),
            cpu: self
                .pid()
                .and_then(cpu_seconds)
                .map_or(0.0, |c| c - self.cpu_before),
        })
    }

    /// This instance's counters over all its lives.
    async fn total(&self) -> Metrics {
        self.past + self.metrics().await.unwrap_or_default()
    }

    async fn wait_subscribed(&self, limit: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if self.metrics().await.is_some_and(|m| m.subscribed >= 1.0) {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        bail!(
            "instance {} not subscribed within {limit:?}; see {}",
            self.k,
            self.log.display()
        )
    }

    /// SIGKILL, keeping what its counters said last.
    async fn kill(&mut self) {
        self.past = self.total().await;
        if let Some(mut c) = self.child.take() {
            let _ = c.kill().await;
        }
    }

    async fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            if let Some(pid) = c.id() {
                let _ = mqtt_ingest_testkit::sigterm(pid);
            }
            if tokio::time::timeout(Duration::from_secs(30), c.wait())
                .await
                .is_err()
            {
                let _ = c.kill().await;
            }
        }
    }
}

/// The faults of the live scenarios.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Fault {
    None,
    InstanceRestart,
    InstanceLost,
    DbNode,
    BrokerNode,
}

impl Fault {
    fn name(self) -> &'static str {
        match self {
            Fault::None => "steady",
            Fault::InstanceRestart => "instance-restart",
            Fault::InstanceLost => "instance-lost",
            Fault::DbNode => "db-node",
            Fault::BrokerNode => "broker-node",
        }
    }
}

/// What the check found.
#[derive(Debug, Default)]
struct Check {
    acked: usize,
    lost: usize,
    devices_right: usize,
    devices_checked: usize,
    sensors_right: usize,
    history_duplicates: usize,
}

/// Waits (bounded) until every device shows its last acknowledged seq, then compares the
/// ledger with the tables.
async fn check(pool: &MySqlPool, ledger: &Ledger, limit: Duration) -> anyhow::Result<Check> {
    let last = ledger.last();
    let deadline = Instant::now() + limit;
    let stored = loop {
        let rows = sqlx::query(
            "SELECT uuid, CAST(JSON_VALUE(last_report_data, '$.sensors.seq.value') AS UNSIGNED) AS s \
             FROM device_main",
        )
        .fetch_all(pool)
        .await?;
        let stored: HashMap<String, Option<u64>> = rows
            .iter()
            .map(|r| (r.get::<String, _>("uuid"), r.get::<Option<u64>, _>("s")))
            .collect();
        let behind = last
            .iter()
            .filter(|(d, s)| stored.get(&format!("dev{d}")).copied().flatten() != Some(**s))
            .count();
        if behind == 0 || Instant::now() >= deadline {
            break stored;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let devices_right = last
        .iter()
        .filter(|(d, s)| stored.get(&format!("dev{d}")).copied().flatten() == Some(**s))
        .count();
    let sensors: HashMap<String, String> = sqlx::query(
        "SELECT device_uuid, sensor_value FROM device_sensors WHERE sensor_name = 'seq'",
    )
    .fetch_all(pool)
    .await?
    .iter()
    .map(|r| (r.get("device_uuid"), r.get("sensor_value")))
    .collect();
    let sensors_right = last
        .iter()
        .filter(|(d, s)| sensors.get(&format!("dev{d}")) == Some(&s.to_string()))
        .count();
    let rows = sqlx::query(
        "SELECT device_uuid, CAST(value AS UNSIGNED) AS v FROM device_history WHERE sensor = 'seq'",
    )
    .fetch_all(pool)
    .await?;
    let mut history = BTreeSet::new();
    for r in &rows {
        history.insert((r.get::<String, _>("device_uuid"), r.get::<u64, _>("v")));
    }
    let lost = ledger
        .acked
        .iter()
        .filter(|(d, s)| !history.contains(&(format!("dev{d}"), *s)))
        .count();
    Ok(Check {
        acked: ledger.acked.len(),
        lost,
        devices_right,
        devices_checked: last.len(),
        sensors_right,
        history_duplicates: rows.len() - history.len(),
    })
}

fn run_script(cli: &Cli, args: &[&str]) -> anyhow::Result<()> {
    let status = std::process::Command::new(&cli.cluster_script)
        .args(args)
        .env("CLUSTER_DIR", &cli.cluster_dir)
        .status()?;
    anyhow::ensure!(
        status.success(),
        "{} {args:?} failed",
        cli.cluster_script.display()
    );
    Ok(())
}

/// CPU seconds of the processes of a kind (brokers, databases) so far, by pid.
fn cpu_of(pids: &[u32]) -> HashMap<u32, f64> {
    pids.iter()
        .filter_map(|&p| Some((p, cpu_seconds(p)?)))
        .collect()
}

/// CPU seconds used since `before` by the processes of a kind now (a node started again is a
/// new pid, counted from zero; a node that died is counted up to its last reading: not at all).
fn cpu_since(before: &HashMap<u32, f64>, now: &HashMap<u32, f64>) -> f64 {
    now.iter()
        .map(|(pid, c)| c - before.get(pid).copied().unwrap_or(0.0))
        .sum()
}

async fn scenario(
    cli: &Cli,
    topo: &Topology,
    instances: usize,
    pace: Pace,
    fault: Fault,
) -> anyhow::Result<serde_json::Value> {
    let (db, pool) = prepare_db(topo, cli.devices).await?;
    let prefix = unique_name("c");
    let work = cli.cluster_dir.join("runs").join(&prefix);
    std::fs::create_dir_all(&work)?;
    let mut inst: Vec<Instance> = (0..instances)
        .map(|k| Instance::new(topo, k, &db, &prefix, &work))
        .collect();
    for i in &mut inst {
        i.spawn(&cli.service_bin)?;
    }
    for i in &inst {
        i.wait_subscribed(Duration::from_secs(60)).await?;
    }
    let (brokers, dbs) = (topo.pids("rmqtt"), topo.pids("galera"));
    let (broker_cpu0, db_cpu0, self_cpu0) = (
        cpu_of(&brokers),
        cpu_of(&dbs),
        cpu_seconds(std::process::id()).unwrap_or(0.0),
    );
    let started = Instant::now();
    let devices = Devices::start(
        &topo.brokers,
        &format!("{prefix}/devices"),
        cli.devices,
        pace,
        cli.dated,
    );
    let mut failover: Option<f64> = None;
    let mut resumed: Option<f64> = None;
    match pace {
        Pace::Flood { .. } => {
            while !devices.flood_done() && started.elapsed() < Duration::from_secs(600) {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        Pace::Firmware => {
            let half = Duration::from_secs(cli.secs / 2);
            tokio::time::sleep(half).await;
            let t0 = Instant::now();
            // The instance on the node a fault kills (instance faults: the first).
            let w = match fault {
                Fault::DbNode | Fault::BrokerNode => usize::from(cli.fault_node - 1),
                _ => 0,
            }
            .min(inst.len() - 1);
            let node = cli.fault_node.to_string();
            let before = inst[w].metrics().await.unwrap_or_default();
            match fault {
                Fault::None => {}
                Fault::InstanceRestart => {
                    inst[0].kill().await;
                    tokio::time::sleep(Duration::from_secs(5)).await;
                    inst[0].spawn(&cli.service_bin)?;
                    inst[0].wait_subscribed(Duration::from_secs(60)).await?;
                    failover = Some(t0.elapsed().as_secs_f64());
                }
                Fault::InstanceLost => inst[0].kill().await,
                Fault::DbNode => {
                    run_script(cli, &["kill", "db", &node])?;
                    // Until the instance on that node has moved, and written again.
                    while t0.elapsed() < Duration::from_secs(60) {
                        let m = inst[w].metrics().await.unwrap_or_default();
                        if failover.is_none() && m.node_moves > before.node_moves {
                            failover = Some(t0.elapsed().as_secs_f64());
                        }
                        if failover.is_some() && m.written > before.written {
                            resumed = Some(t0.elapsed().as_secs_f64());
                            break;
                        }
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                    tokio::time::sleep(Duration::from_secs(5)).await;
                    run_script(cli, &["start", "db", &node])?;
                }
                Fault::BrokerNode => {
                    run_script(cli, &["kill", "broker", &node])?;
                    while t0.elapsed() < Duration::from_secs(60) {
                        let m = inst[w].metrics().await.unwrap_or_default();
                        if m.reconnects > before.reconnects && m.subscribed >= 1.0 {
                            failover = Some(t0.elapsed().as_secs_f64());
                            break;
                        }
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                    tokio::time::sleep(Duration::from_secs(5)).await;
                    run_script(cli, &["start", "broker", &node])?;
                }
            }
            let rest = Duration::from_secs(cli.secs).saturating_sub(started.elapsed());
            tokio::time::sleep(rest).await;
        }
    }
    let ledger = devices.finish().await;
    let published_for = started.elapsed();
    // A flood's rate: until the instances have written every message the brokers took.
    let mut written_at = None;
    if let Pace::Flood { .. } = pace {
        let acked = ledger.sent as f64;
        let deadline = Instant::now() + Duration::from_secs(300);
        while Instant::now() < deadline {
            let mut written = 0.0;
            for i in &inst {
                written += i.total().await.written;
            }
            if written >= acked {
                written_at = Some(started.elapsed());
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let result = check(&pool, &ledger, Duration::from_secs(180)).await?;
    let committed_at = started.elapsed();
    let mut per_instance = Vec::new();
    let mut sum = Metrics::default();
    for i in &inst {
        let m = i.total().await;
        sum = sum + m;
        per_instance.push(json!({
            "instance": i.k + 1,
            "received": m.received,
            "written": m.written,
            "cpu_us_per_msg": if m.received > 0.0 { m.cpu * 1e6 / m.received } else { 0.0 },
        }));
    }
    let elapsed = match pace {
        Pace::Flood { .. } => written_at.unwrap_or(committed_at),
        Pace::Firmware => published_for,
    }
    .as_secs_f64();
    // A message the broker acknowledged and never delivered is the broker's loss; one an
    // instance received and acknowledged without a commit would be ours (the acks follow
    // commits, so every received message that is not lost in the database was written).
    let ours_at_most = (sum.received - sum.written - sum.rejected).max(0.0);
    let row = json!({
        "scenario": match pace { Pace::Flood { .. } => "scale", Pace::Firmware => fault.name() },
        "instances": instances,
        "strategy": topo.strategy,
        "dated": cli.dated,
        "fault_node": cli.fault_node,
        "devices": cli.devices,
        "seconds": elapsed,
        "published": ledger.sent,
        "data_acked_by_broker": result.acked,
        "received": sum.received,
        "written": sum.written,
        "rejected": sum.rejected,
        "msgs_per_sec": sum.written / elapsed,
        "conflicts": sum.conflicts,
        "conflicts_per_10k": if sum.written > 0.0 { sum.conflicts * 1e4 / sum.written } else { 0.0 },
        "lost": result.lost,
        "received_not_written": ours_at_most,
        "devices_right": result.devices_right,
        "devices_checked": result.devices_checked,
        "device_sensors_right": result.sensors_right,
        "history_duplicates": result.history_duplicates,
        "failover_secs": failover,
        "writes_resumed_secs": resumed,
        "publisher_reconnects": ledger.connects.saturating_sub(topo.brokers.len() as u64),
        "cpu_share": {
            "brokers": cpu_since(&broker_cpu0, &cpu_of(&topo.pids("rmqtt"))) / elapsed,
            "databases": cpu_since(&db_cpu0, &cpu_of(&topo.pids("galera"))) / elapsed,
            "instances": sum.cpu / elapsed,
            "runner": (cpu_seconds(std::process::id()).unwrap_or(0.0) - self_cpu0) / elapsed,
        },
        "per_instance": per_instance,
    });
    eprintln!("[cluster] {row}");
    for i in &mut inst {
        i.stop().await;
    }
    pool.close().await;
    drop_db(topo, &db).await;
    Ok(row)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn print_table(rows: &[serde_json::Value]) {
    println!(
        "\n{:<17} {:>4} {:<11} {:>9} {:>9} {:>6} {:>9} {:>6} {:>11} {:>9} {:>9}",
        "scenario",
        "inst",
        "strategy",
        "acked",
        "msg/s",
        "lost",
        "conflicts",
        "/10k",
        "rows right",
        "failover",
        "dup hist"
    );
    for r in rows {
        let f = |k: &str| r[k].as_f64().unwrap_or(0.0);
        println!(
            "{:<17} {:>4} {:<11} {:>9} {:>9.0} {:>6} {:>9} {:>6.1} {:>11} {:>9} {:>9}",
            r["scenario"].as_str().unwrap_or(""),
            r["instances"].to_string(),
            r["strategy"].as_str().unwrap_or(""),
            r["data_acked_by_broker"].to_string(),
            f("msgs_per_sec"),
            r["lost"].to_string(),
            f("conflicts"),
            f("conflicts_per_10k"),
            format!("{}/{}", r["devices_right"], r["devices_checked"]),
            r["failover_secs"]
                .as_f64()
                .map_or_else(|| "-".into(), |s| format!("{s:.1} s")),
            r["history_duplicates"].to_string(),
        );
        if let Some(per) = r["per_instance"].as_array() {
            let cpu: Vec<String> = per
                .iter()
                .map(|p| format!("{:.1}", p["cpu_us_per_msg"].as_f64().unwrap_or(0.0)))
                .collect();
            println!(
                "    CPU µs/msg per instance: {}; CPU share (cores): brokers {:.2}, databases {:.2}, instances {:.2}, runner {:.2}",
                cpu.join(" / "),
                r["cpu_share"]["brokers"].as_f64().unwrap_or(0.0),
                r["cpu_share"]["databases"].as_f64().unwrap_or(0.0),
                r["cpu_share"]["instances"].as_f64().unwrap_or(0.0),
                r["cpu_share"]["runner"].as_f64().unwrap_or(0.0),
            );
        }
    }
}

async fn run(mut cli: Cli) -> anyhow::Result<bool> {
    // The script and the nodes take it from any directory.
    cli.cluster_dir = std::path::absolute(&cli.cluster_dir)?;
    let topo = Topology::read(&cli.cluster_dir)?;
    anyhow::ensure!(
        cli.service_bin.exists(),
        "{} does not exist (cargo build --release)",
        cli.service_bin.display()
    );
    let all = cli.scenario.iter().any(|s| s == "all");
    let wants = |s: &str| all || cli.scenario.iter().any(|x| x == s);
    let mut rows = Vec::new();
    if wants("scale") {
        for n in 1..=3 {
            let mut runs = Vec::new();
            for _ in 0..cli.runs {
                runs.push(
                    scenario(
                        &cli,
                        &topo,
                        n,
                        Pace::Flood {
                            per_device: cli.flood_per_device,
                        },
                        Fault::None,
                    )
                    .await?,
                );
            }
            let m = median(
                runs.iter()
                    .map(|r| r["msgs_per_sec"].as_f64().unwrap_or(0.0))
                    .collect(),
            );
            let mut row = runs
                .into_iter()
                .min_by(|a, b| {
                    let d = |r: &serde_json::Value| {
                        (r["msgs_per_sec"].as_f64().unwrap_or(0.0) - m).abs()
                    };
                    d(a).total_cmp(&d(b))
                })
                .unwrap_or_default();
            row["runs"] = json!(cli.runs);
            rows.push(row);
        }
    }
    for fault in [
        Fault::None,
        Fault::InstanceRestart,
        Fault::InstanceLost,
        Fault::DbNode,
        Fault::BrokerNode,
    ] {
        if wants(fault.name()) {
            rows.push(scenario(&cli, &topo, 3, Pace::Firmware, fault).await?);
            if let Some(path) = &cli.json {
                std::fs::write(path, serde_json::to_string_pretty(&rows)?)?;
            }
        }
    }
    print_table(&rows);
    if let Some(path) = &cli.json {
        std::fs::write(path, serde_json::to_string_pretty(&rows)?)?;
    }
    // Lost readings are a failure except where the broker is known to lose them (a member
    // that never comes back keeps its queued share in its session).
    Ok(rows
        .iter()
        .all(|r| r["lost"] == 0 || r["scenario"] == "instance-lost"))
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    match run(cli).await {
        Ok(true) => std::process::ExitCode::SUCCESS,
        Ok(false) => {
            eprintln!("mqtt-ingest-cluster: readings were lost (see the table)");
            std::process::ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("mqtt-ingest-cluster: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
