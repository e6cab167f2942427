//! Command line of the benchmark (clap derive).

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context as _, bail};
use clap::Parser;

/// How the benchmark measures: the end of `--help`.
const HOW_IT_MEASURES: &str = "\
Scenarios (--scenario, comma-separated; default all), run in this order:
  db-limit     multi-row upserts of the large drain's rows over ONE connection (rows/s)
  broker-100   the drain-100 backlog drained by a do-nothing subscriber (the broker's own limit;
               mosquitto_sub drains a copy too, for comparison)
  drain-100    backlog of 100 devices x 500 messages drained by the service
  broker-10k   the drain-10k backlog drained by the do-nothing subscriber (and mosquitto_sub)
  drain-10k    backlog of 10,000 devices x 10 messages drained by the service
  history-10k  the same with HISTORY_ENABLED=true (every reading also appended to history)
  live         5,000 msg/s for 30 s over 100 devices; publish-to-commit latency
  aliases: all, drain (both drains), broker (both broker limits), db (= db-limit)

How it measures:
  drains      the service is started once to create its persistent session and stopped; the
              backlog is published (every device's messages in order, both payload formats,
              each carrying the per-device sequence number as sensor `seq`); the service is
              started again and timed from spawn until every device's row shows its last seq.
              The row of the device published last is polled every --poll-ms; the full scan
              (JSON of every row, ~14 ms for 10,000 rows) runs once a second and, once that
              device is done, every poll. Then SIGTERM: its final total/succeeded/failed must
              match what was published. 'vs broker' is msg/s over the do-nothing subscriber's
              on the same size; 'from sub' the same with the service's start-up (spawn to
              subscription) left out of its time, as the subscriber has none.
  live        latency = the first poll (every 5 ms) that shows a device at seq >= s, minus
              the time message s was handed to the publisher; lost = never seen 10 s after
              the last publish.
  broker      the test kit's private Mosquitto with persistence off (it is never restarted)
              and unlimited queues (max_queued_messages 0). The default window is
              config/mosquitto-sample.conf's 20000. Mosquitto before 2.0.13 (Debian 12 ships
              2.0.11) does not hold the window after the first one: each PUBACK releases a
              whole new window, so there it does not bound the drains.
  sessions    every persistent session the benchmark made is removed after each scenario
              (a clean-session connect with the same client id).

Exit status: 0 when every scenario ran without error and lost nothing, 1 otherwise,
2 for a bad command line.";

/// mqtt-ingest-bench: throughput and latency benchmark of mqtt-ingest.
///
/// Runs only on this machine (127.0.0.1). Starts its own Mosquitto on a free loopback port,
/// creates a throw-away database bench_<unique> (dropped at the end, also on Ctrl-C), drives
/// the real service binary as a child process and compares it with the broker's and the
/// database's own limits measured in the same run.
#[derive(Debug, Parser)]
#[command(name = "mqtt-ingest-bench", after_long_help = HOW_IT_MEASURES)]
struct Cli {
    /// Scenarios to run, comma-separated (see the list below)
    #[arg(long, visible_alias = "scenarios", default_value = "all", value_parser = parse_scenarios, help_heading = "Scenarios")]
    scenario: Vec<Scenarios>,

    /// Multiply the default sizes (drain-100 messages per device, drain-10k devices, live
    /// seconds; the db-limit rows follow drain-10k)
    #[arg(long, default_value_t = 1.0, value_parser = positive, help_heading = "Sizes")]
    scale: f64,
    /// drain-100 / broker-100 size [default: 100x500]
    #[arg(long, value_name = "DEVICESxMSGS", value_parser = parse_size, help_heading = "Sizes")]
    small: Option<Size>,
    /// drain-10k / broker-10k size [default: 10000x10]
    #[arg(long, value_name = "DEVICESxMSGS", value_parser = parse_size, help_heading = "Sizes")]
    large: Option<Size>,
    /// Live publish rate, messages/s
    #[arg(long, default_value_t = 5000, value_parser = at_least_one, help_heading = "Sizes")]
    live_rate: u64,
    /// Live publish duration, seconds [default: 30]
    #[arg(long, value_parser = at_least_one, help_heading = "Sizes")]
    live_secs: Option<u64>,
    /// Live device count
    #[arg(long, default_value_t = 100, value_parser = at_least_one, help_heading = "Sizes")]
    live_devices: u64,
    /// seed (the seed's two formats, alternating) or firmware (CodeHubot's ESP32: simple
    /// format, device_id/sensor strings, uptime timestamp)
    #[arg(long = "payload", value_name = "SHAPE", default_value = "seed", value_parser = shape, help_heading = "Sizes")]
    shape: crate::publisher::Shape,
    /// The live stream sends the firmware's mix: of every 7 messages of a device, 3 data (the
    /// firmware's payload), 2 status, 2 heartbeats; latency is measured on the data messages
    #[arg(long, help_heading = "Sizes")]
    live_mix: bool,
    /// device_main's shape: service (the service's migrations) or codehubot (the backend's own
    /// DDL: its 40 columns and indexes, no index on last_seen)
    #[arg(long, value_name = "SHAPE", default_value = "service", value_parser = ["service", "codehubot"], help_heading = "Sizes")]
    table: String,
    /// Rows upserted by db-limit [default: drain-10k's messages]
    #[arg(long, value_parser = at_least_one, help_heading = "Sizes")]
    db_rows: Option<u64>,
    /// Rows per upsert statement (6 placeholders each; a statement takes at most 65,535)
    #[arg(long, default_value_t = 250, value_parser = clap::value_parser!(u64).range(1..=10_000), help_heading = "Sizes")]
    db_batch: u64,

    /// The service binary
    #[arg(
        long,
        default_value = "target/release/mqtt-ingest",
        help_heading = "Service"
    )]
    service_bin: PathBuf,
    /// Extra setting for the service (INGEST_*, DB_POOL_*, REJECTS_*, LOG_LEVEL); repeatable
    #[arg(long, value_name = "K=V", value_parser = service_env, help_heading = "Service")]
    service_env: Vec<(String, String)>,

    /// MariaDB/MySQL host: 127.0.0.1 or localhost only
    #[arg(long, default_value = "127.0.0.1", value_parser = check_local, help_heading = "Environment of the benchmark")]
    db_host: String,
    #[arg(
        long,
        default_value_t = 3306,
        help_heading = "Environment of the benchmark"
    )]
    db_port: u16,
    /// Needs CREATE/DROP DATABASE
    #[arg(
        long,
        default_value = "root",
        help_heading = "Environment of the benchmark"
    )]
    db_user: String,
    /// Empty: log in without a password
    #[arg(
        long,
        default_value = "",
        hide_default_value = true,
        help_heading = "Environment of the benchmark"
    )]
    db_password: String,
    /// max_inflight_messages of the benchmark broker
    #[arg(
        long,
        default_value_t = 20_000,
        help_heading = "Environment of the benchmark"
    )]
    broker_inflight: u32,
    /// Parallel publisher connections for backlogs
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..), help_heading = "Environment of the benchmark")]
    publishers: u64,
    #[arg(
        long,
        default_value = "/usr/sbin/mosquitto",
        help_heading = "Environment of the benchmark"
    )]
    mosquitto: PathBuf,
    #[arg(
        long,
        default_value = "/usr/bin/mosquitto_sub",
        help_heading = "Environment of the benchmark"
    )]
    mosquitto_sub: PathBuf,

    /// Repeat the whole set K times and print medians
    #[arg(long, value_name = "K", default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..), help_heading = "Run control and output")]
    runs: u64,
    /// Limit for each drain and each backlog publish
    #[arg(long, default_value_t = 300, value_parser = at_least_one, help_heading = "Run control and output")]
    timeout_secs: u64,
    /// Database poll interval while a drain runs
    #[arg(long, default_value_t = 20, value_parser = at_least_one, help_heading = "Run control and output")]
    poll_ms: u64,
    /// Results file [default: target/bench/results-<unix time>.json]
    #[arg(long, value_name = "PATH", help_heading = "Run control and output")]
    json: Option<PathBuf>,
}

/// A benchmark scenario, in the order they run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Scenario {
    DbLimit,
    /// The same upserts over the service's INGEST_WRITERS connections at once.
    DbLimitWriters,
    /// Multi-row INSERT into device_history: history-10k's rows.
    HistoryLimit,
    /// The service's own device_sensors upsert: sensors-10k's rows.
    SensorsLimit,
    Broker100,
    Drain100,
    Broker10k,
    Drain10k,
    /// drain-10k with sensor history on (HISTORY_ENABLED=true): two history rows per message.
    Drain10kHistory,
    /// drain-10k with CodeHubot's `device_sensors` table present (the service writes it).
    Drain10kSensors,
    Live,
    /// The presence sweep on CodeHubot's own `device_main` at ten times drain-10k's devices.
    Presence,
}

impl Scenario {
    pub const ALL: [Scenario; 12] = [
        Scenario::DbLimit,
        Scenario::DbLimitWriters,
        Scenario::HistoryLimit,
        Scenario::SensorsLimit,
        Scenario::Broker100,
        Scenario::Drain100,
        Scenario::Broker10k,
        Scenario::Drain10k,
        Scenario::Drain10kHistory,
        Scenario::Drain10kSensors,
        Scenario::Live,
        Scenario::Presence,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Scenario::DbLimit => "db-limit",
            Scenario::DbLimitWriters => "db-writers",
            Scenario::HistoryLimit => "db-history",
            Scenario::SensorsLimit => "db-sensors",
            Scenario::Broker100 => "broker-100",
            Scenario::Drain100 => "drain-100",
            Scenario::Broker10k => "broker-10k",
            Scenario::Drain10k => "drain-10k",
            Scenario::Drain10kHistory => "history-10k",
            Scenario::Drain10kSensors => "sensors-10k",
            Scenario::Live => "live",
            Scenario::Presence => "presence",
        }
    }
}

/// Devices x messages per device of a backlog.
#[derive(Clone, Copy, Debug)]
pub struct Size {
    pub devices: u64,
    pub per_device: u64,
}

impl Size {
    pub fn messages(&self) -> u64 {
        self.devices * self.per_device
    }
}

#[derive(Clone, Copy, Debug)]
pub struct LiveSpec {
    pub devices: u64,
    pub rate: u64,
    pub secs: u64,
    /// The firmware's mix of data, status and heartbeats.
    pub mix: bool,
}

#[derive(Clone, Debug)]
pub struct DbTarget {
    pub host: String,
    pub port: u16,
    pub user: String,
    pub password: String,
}

#[derive(Clone, Debug)]
pub struct Options {
    pub scenarios: Vec<Scenario>,
    pub runs: usize,
    pub small: Size,
    pub large: Size,
    pub live: LiveSpec,
    pub db_rows: u64,
    pub db_batch: usize,
    pub db: DbTarget,
    pub service_bin: PathBuf,
    pub service_env: Vec<(String, String)>,
    pub broker_inflight: u32,
    pub publishers: usize,
    pub mosquitto: PathBuf,
    pub mosquitto_sub: PathBuf,
    pub timeout: Duration,
    pub poll: Duration,
    pub json: PathBuf,
    pub shape: crate::publisher::Shape,
    /// `device_main` as CodeHubot's backend creates it.
    pub codehubot_table: bool,
}

/// The variables the benchmark sets itself; `--service-env` may not override them.
const OWN_VARS: [&str; 11] = [
    "MQTT_BROKER",
    "MQTT_PORT",
    "MQTT_CLIENT_ID",
    "MQTT_TOPIC_PREFIX",
    "DB_HOST",
    "DB_PORT",
    "DB_NAME",
    "DB_USER",
    "DB_PASSWORD",
    "LOG_FORMAT",
    "STATS_INTERVAL_SECS",
];

fn parse_size(v: &str) -> anyhow::Result<Size> {
    let (d, m) = v
        .split_once(['x', 'X'])
        .with_context(|| format!("expected DEVICESxMESSAGES, got {v:?}"))?;
    let size = Size {
        devices: d.trim().parse().context("devices")?,
        per_device: m.trim().parse().context("messages per device")?,
    };
    if size.devices == 0 || size.per_device == 0 {
        bail!("sizes must be at least 1, got {v:?}");
    }
    Ok(size)
}

fn at_least_one(v: &str) -> anyhow::Result<u64> {
    match v.trim().parse()? {
        0 => bail!("must be at least 1"),
        n => Ok(n),
    }
}

fn positive(v: &str) -> anyhow::Result<f64> {
    let x: f64 = v.trim().parse()?;
    if !(x > 0.0 && x.is_finite()) {
        bail!("must be a positive number");
    }
    Ok(x)
}

fn shape(v: &str) -> anyhow::Result<crate::publisher::Shape> {
    match v {
        "seed" => Ok(crate::publisher::Shape::Seed),
        "firmware" => Ok(crate::publisher::Shape::Firmware),
        other => bail!("seed or firmware, got {other:?}"),
    }
}

fn check_local(host: &str) -> anyhow::Result<String> {
    match host {
        "127.0.0.1" | "localhost" => Ok("127.0.0.1".to_owned()),
        other => bail!("the benchmark runs only against 127.0.0.1, got {other:?}"),
    }
}

/// The scenarios one `--scenario` names.
#[derive(Clone, Debug)]
struct Scenarios(Vec<Scenario>);

fn parse_scenarios(v: &str) -> anyhow::Result<Scenarios> {
    let mut out = Vec::new();
    for part in v.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let add: &[Scenario] = match part {
            "all" => &Scenario::ALL,
            "drain" => &[
                Scenario::Drain100,
                Scenario::Drain10k,
                Scenario::Drain10kHistory,
            ],
            "broker" => &[Scenario::Broker100, Scenario::Broker10k],
            "db" => &[
                Scenario::DbLimit,
                Scenario::DbLimitWriters,
                Scenario::HistoryLimit,
                Scenario::SensorsLimit,
            ],
            "db-limit" => &[Scenario::DbLimit],
            "db-writers" => &[Scenario::DbLimitWriters],
            "db-history" => &[Scenario::HistoryLimit],
            "db-sensors" => &[Scenario::SensorsLimit],
            "broker-100" => &[Scenario::Broker100],
            "broker-10k" => &[Scenario::Broker10k],
            "drain-100" => &[Scenario::Drain100],
            "drain-10k" => &[Scenario::Drain10k],
            "history-10k" => &[Scenario::Drain10kHistory],
            "sensors-10k" => &[Scenario::Drain10kSensors],
            "live" => &[Scenario::Live],
            "presence" => &[Scenario::Presence],
            other => bail!(
                "unknown scenario {other:?} (db-limit, db-writers, db-history, db-sensors, broker-100, drain-100, broker-10k, drain-10k, history-10k, sensors-10k, live, presence, all, drain, broker, db)"
            ),
        };
        out.extend_from_slice(add);
    }
    if out.is_empty() {
        bail!("no scenario given");
    }
    Ok(Scenarios(out))
}

fn service_env(v: &str) -> anyhow::Result<(String, String)> {
    let (k, val) = v
        .split_once('=')
        .with_context(|| format!("expected KEY=VALUE, got {v:?}"))?;
    let k = k.trim();
    if OWN_VARS.contains(&k) {
        bail!("{k} is set by the benchmark itself");
    }
    // The HTTP listener (status page, metrics) only on loopback: the benchmark stays on this
    // machine.
    let loopback_listener = k == "HTTP_LISTEN"
        && val
            .trim()
            .parse::<std::net::SocketAddr>()
            .is_ok_and(|a| a.ip().is_loopback());
    let allowed = k.starts_with("INGEST_")
        || k.starts_with("DB_POOL_")
        || k.starts_with("REJECTS_")
        || k == "LOG_LEVEL"
        || loopback_listener;
    if !allowed {
        bail!(
            "only INGEST_*, DB_POOL_*, REJECTS_*, LOG_LEVEL and HTTP_LISTEN on 127.0.0.1 may be passed, got {k}"
        );
    }
    Ok((k.to_owned(), val.to_owned()))
}

fn scaled(base: u64, scale: f64, min: u64) -> u64 {
    ((base as f64 * scale).round() as u64).max(min)
}

/// Parses the command line (`--help` and errors exit here, as clap does).
pub fn parse() -> Options {
    Options::from(Cli::parse())
}

impl From<Cli> for Options {
    fn from(c: Cli) -> Self {
        // One value per occurrence, each a list: flattened, in run order, once each.
        let mut scenarios: Vec<Scenario> = c.scenario.into_iter().flat_map(|s| s.0).collect();
        scenarios.sort();
        scenarios.dedup();
        let small = c.small.unwrap_or(Size {
            devices: 100,
            per_device: scaled(500, c.scale, 2),
        });
        let large = c.large.unwrap_or(Size {
            devices: scaled(10_000, c.scale, 1),
            per_device: 10,
        });
        let live = LiveSpec {
            devices: c.live_devices,
            rate: c.live_rate,
            secs: c.live_secs.unwrap_or_else(|| scaled(30, c.scale, 1)),
            mix: c.live_mix,
        };
        let json = c.json.unwrap_or_else(|| {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0);
            PathBuf::from(format!("target/bench/results-{now}.json"))
        });
        Options {
            shape: c.shape,
            codehubot_table: c.table == "codehubot",
            scenarios,
            runs: c.runs as usize,
            small,
            large,
            live,
            db_rows: c.db_rows.unwrap_or_else(|| large.messages()),
            db_batch: c.db_batch as usize,
            db: DbTarget {
                host: c.db_host,
                port: c.db_port,
                user: c.db_user,
                password: c.db_password,
            },
            service_bin: c.service_bin,
            service_env: c.service_env,
            broker_inflight: c.broker_inflight,
            publishers: c.publishers as usize,
            mosquitto: c.mosquitto,
            mosquitto_sub: c.mosquitto_sub,
            timeout: Duration::from_secs(c.timeout_secs),
            poll: Duration::from_millis(c.poll_ms),
            json,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    fn parse(args: &[&str]) -> Result<Options, clap::Error> {
        Cli::try_parse_from(std::iter::once("mqtt-ingest-bench").chain(args.iter().copied()))
            .map(Options::from)
    }

    #[test]
    fn the_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn defaults_scenarios_and_refusals() {
        let o = parse(&[]).unwrap();
        assert_eq!(o.scenarios, Scenario::ALL);
        assert_eq!((o.small.devices, o.small.per_device), (100, 500));
        assert_eq!((o.large.devices, o.large.per_device), (10_000, 10));
        assert_eq!((o.live.rate, o.live.secs, o.runs), (5000, 30, 1));
        assert_eq!(o.db_rows, 100_000);
        let o = parse(&["--scenario=live,drain", "--scenarios", "db", "--scale=0.1"]).unwrap();
        assert_eq!(
            o.scenarios,
            [
                Scenario::DbLimit,
                Scenario::DbLimitWriters,
                Scenario::HistoryLimit,
                Scenario::SensorsLimit,
                Scenario::Drain100,
                Scenario::Drain10k,
                Scenario::Drain10kHistory,
                Scenario::Live
            ]
        );
        assert_eq!((o.large.devices, o.live.secs), (1000, 3));
        let o = parse(&["--service-env", "REJECTS_ENABLED=true", "--small=3x4"]).unwrap();
        assert_eq!(o.service_env, [("REJECTS_ENABLED".into(), "true".into())]);
        assert_eq!((o.small.devices, o.small.per_device), (3, 4));
        for bad in [
            &["--scenario", "nope"][..],
            &["--service-env", "DB_NAME=x"],
            &["--service-env", "MQTT_QOS=0"],
            &["--db-host", "10.0.0.1"],
            &["--runs", "0"],
            &["--scale", "-1"],
            &["--small", "0x5"],
            &["--db-batch", "10001"],
            &["--payload", "xml"],
        ] {
            assert!(parse(bad).is_err(), "{bad:?}");
        }
    }
}
