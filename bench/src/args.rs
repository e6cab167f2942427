//! Command line of the benchmark, parsed by hand (no argument-parsing crate).

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context as _, bail};

pub const USAGE: &str = "\
mqtt-ingest-bench: throughput and latency benchmark of mqtt-ingest (issue 3)

Runs only on this machine (127.0.0.1). Starts its own Mosquitto on a free loopback port,
creates a throw-away database bench_<random> (dropped at the end, also on Ctrl-C), drives the
real service binary as a child process and compares it with the broker's and the database's
own limits measured in the same run.

Usage: mqtt-ingest-bench [OPTIONS]

Scenarios (--scenario, comma-separated; default all), run in this order:
  db-limit     multi-row upserts of the large drain's rows over ONE connection (rows/s)
  broker-100   the drain-100 backlog drained by mosquitto_sub (the broker's own limit)
  drain-100    backlog of 100 devices x 500 messages drained by the service
  broker-10k   the drain-10k backlog drained by mosquitto_sub
  drain-10k    backlog of 10,000 devices x 10 messages drained by the service
  history-10k  the same with HISTORY_ENABLED=true (every reading also appended to history)
  live         5,000 msg/s for 30 s over 100 devices; publish-to-commit latency
  aliases: all, drain (both drains), broker (both broker limits), db (= db-limit)

Sizes:
  --scale F               multiply the default sizes (drain-100 messages per device, drain-10k
                          devices, live seconds; the db-limit rows follow drain-10k) [1.0]
  --small DEVICESxMSGS    drain-100 / broker-100 size                        [100x500]
  --large DEVICESxMSGS    drain-10k / broker-10k size                        [10000x10]
  --live-rate N           live publish rate, messages/s                     [5000]
  --live-secs N           live publish duration, seconds                    [30]
  --live-devices N        live device count                                 [100]
  --payload SHAPE         seed (the seed's two formats, alternating) or firmware (CodeHubot's
                          ESP32: simple format, device_id/sensor strings, uptime timestamp) [seed]
  --db-rows N             rows upserted by db-limit             [drain-10k messages]
  --db-batch N            rows per upsert statement                         [250]

Service:
  --service-bin PATH      the service binary              [target/release/mqtt-ingest]
  --service-env K=V       extra setting for the service (INGEST_*, DB_POOL_*, LOG_LEVEL);
                          repeatable

Environment of the benchmark:
  --db-host HOST          MariaDB/MySQL host: 127.0.0.1 or localhost only  [127.0.0.1]
  --db-port N             [3306]
  --db-user NAME          needs CREATE/DROP DATABASE                        [root]
  --db-password PW        empty: log in without a password                  [empty]
  --broker-inflight N     max_inflight_messages of the benchmark broker      [20000]
  --publishers N          parallel publisher connections for backlogs        [1]
  --mosquitto PATH        [/usr/sbin/mosquitto]
  --mosquitto-sub PATH    [/usr/bin/mosquitto_sub]

Run control and output:
  --runs K                repeat the whole set K times and print medians     [1]
  --timeout-secs N        limit for each drain and each backlog publish      [300]
  --poll-ms N             database poll interval while a drain runs          [20]
  --json PATH             results file          [target/bench/results-<unix time>.json]
  -h, --help              print this help

How it measures:
  drains      the service is started once to create its persistent session and stopped; the
              backlog is published (every device's messages in order, both payload formats,
              each carrying the per-device sequence number as sensor `seq`); the service is
              started again and timed from spawn until every device's row shows its last seq.
              The row of the device published last is polled every --poll-ms; the full scan
              (JSON of every row, ~14 ms for 10,000 rows) runs once a second and, once that
              device is done, every poll. Then SIGTERM: its final total/succeeded/failed must
              match what was published.
  live        latency = the first poll (every 5 ms) that shows a device at seq >= s, minus
              the time message s was handed to the publisher; lost = never seen 10 s after
              the last publish.
  broker      Mosquitto persistence is off (the benchmark broker is never restarted) and its
              queues are unlimited (max_queued_messages 0, max_queued_bytes 0). The default
              window is config/mosquitto-sample.conf's 20000. Mosquitto before 2.0.13 (Debian
              12 ships 2.0.11) does not hold the window after the first one: each PUBACK
              releases a whole new window, so there it does not bound the drains.
  sessions    every persistent session the benchmark made is removed after each scenario
              (a clean-session connect with the same client id).

Exit status: 0 when every scenario ran without error and lost nothing, 1 otherwise,
2 for a bad command line.";

/// A benchmark scenario, in the order they run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Scenario {
    DbLimit,
    Broker100,
    Drain100,
    Broker10k,
    Drain10k,
    /// drain-10k with sensor history on (HISTORY_ENABLED=true): two history rows per message.
    Drain10kHistory,
    Live,
}

impl Scenario {
    pub const ALL: [Scenario; 7] = [
        Scenario::DbLimit,
        Scenario::Broker100,
        Scenario::Drain100,
        Scenario::Broker10k,
        Scenario::Drain10k,
        Scenario::Drain10kHistory,
        Scenario::Live,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Scenario::DbLimit => "db-limit",
            Scenario::Broker100 => "broker-100",
            Scenario::Drain100 => "drain-100",
            Scenario::Broker10k => "broker-10k",
            Scenario::Drain10k => "drain-10k",
            Scenario::Drain10kHistory => "history-10k",
            Scenario::Live => "live",
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

fn parse_num<T: std::str::FromStr>(flag: &str, v: &str) -> anyhow::Result<T> {
    v.trim()
        .parse::<T>()
        .ok()
        .with_context(|| format!("{flag}: not a valid number: {v:?}"))
}

fn parse_size(flag: &str, v: &str) -> anyhow::Result<Size> {
    let (d, m) = v
        .split_once(['x', 'X'])
        .with_context(|| format!("{flag}: expected DEVICESxMESSAGES, got {v:?}"))?;
    let size = Size {
        devices: parse_num(flag, d)?,
        per_device: parse_num(flag, m)?,
    };
    if size.devices == 0 || size.per_device == 0 {
        bail!("{flag}: sizes must be at least 1, got {v:?}");
    }
    Ok(size)
}

fn parse_scenarios(v: &str) -> anyhow::Result<Vec<Scenario>> {
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
            "db" | "db-limit" => &[Scenario::DbLimit],
            "broker-100" => &[Scenario::Broker100],
            "broker-10k" => &[Scenario::Broker10k],
            "drain-100" => &[Scenario::Drain100],
            "drain-10k" => &[Scenario::Drain10k],
            "history-10k" => &[Scenario::Drain10kHistory],
            "live" => &[Scenario::Live],
            other => bail!(
                "--scenario: unknown scenario {other:?} (db-limit, broker-100, drain-100, broker-10k, drain-10k, history-10k, live, all, drain, broker, db)"
            ),
        };
        out.extend_from_slice(add);
    }
    if out.is_empty() {
        bail!("--scenario: no scenario given");
    }
    out.sort();
    out.dedup();
    Ok(out)
}

fn check_local(host: &str) -> anyhow::Result<String> {
    match host {
        "127.0.0.1" | "localhost" => Ok("127.0.0.1".to_owned()),
        other => bail!("--db-host: the benchmark runs only against 127.0.0.1, got {other:?}"),
    }
}

fn service_env(v: &str) -> anyhow::Result<(String, String)> {
    let (k, val) = v
        .split_once('=')
        .with_context(|| format!("--service-env: expected KEY=VALUE, got {v:?}"))?;
    let k = k.trim();
    if OWN_VARS.contains(&k) {
        bail!("--service-env: {k} is set by the benchmark itself");
    }
    let allowed = k.starts_with("INGEST_")
        || k.starts_with("DB_POOL_")
        || k.starts_with("REJECTS_")
        || k == "LOG_LEVEL";
    if !allowed {
        bail!(
            "--service-env: only INGEST_*, DB_POOL_*, REJECTS_* and LOG_LEVEL may be passed, got {k}"
        );
    }
    Ok((k.to_owned(), val.to_owned()))
}

fn scaled(base: u64, scale: f64, min: u64) -> u64 {
    ((base as f64 * scale).round() as u64).max(min)
}

/// Parses the command line; `Ok(None)` means help was printed.
pub fn parse(args: impl IntoIterator<Item = String>) -> anyhow::Result<Option<Options>> {
    let mut scenarios = Scenario::ALL.to_vec();
    let mut runs = 1usize;
    let mut scale = 1.0f64;
    let mut small: Option<Size> = None;
    let mut large: Option<Size> = None;
    let mut live_rate: Option<u64> = None;
    let mut live_secs: Option<u64> = None;
    let mut live_devices: Option<u64> = None;
    let mut db_rows: Option<u64> = None;
    let mut db_batch = 250usize;
    let mut db = DbTarget {
        host: "127.0.0.1".to_owned(),
        port: 3306,
        user: "root".to_owned(),
        password: String::new(),
    };
    let mut service_bin = PathBuf::from("target/release/mqtt-ingest");
    let mut shape = crate::publisher::Shape::Seed;
    let mut extra_env = Vec::new();
    let mut broker_inflight = 20_000u32;
    let mut publishers = 1usize;
    let mut mosquitto = PathBuf::from("/usr/sbin/mosquitto");
    let mut mosquitto_sub = PathBuf::from("/usr/bin/mosquitto_sub");
    let mut timeout_secs = 300u64;
    let mut poll_ms = 20u64;
    let mut json: Option<PathBuf> = None;

    let mut it = args.into_iter();
    while let Some(arg) = it.next() {
        // Accept both "--flag value" and "--flag=value".
        let (flag, inline) = match arg.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f.to_owned(), Some(v.to_owned())),
            _ => (arg.clone(), None),
        };
        if flag == "-h" || flag == "--help" {
            println!("{USAGE}");
            return Ok(None);
        }
        let mut value = || -> anyhow::Result<String> {
            match &inline {
                Some(v) => Ok(v.clone()),
                None => it.next().with_context(|| format!("{flag} needs a value")),
            }
        };
        match flag.as_str() {
            "--scenario" | "--scenarios" => scenarios = parse_scenarios(&value()?)?,
            "--runs" => runs = parse_num(&flag, &value()?)?,
            "--scale" => scale = parse_num(&flag, &value()?)?,
            "--small" => small = Some(parse_size(&flag, &value()?)?),
            "--large" => large = Some(parse_size(&flag, &value()?)?),
            "--live-rate" => live_rate = Some(parse_num(&flag, &value()?)?),
            "--live-secs" => live_secs = Some(parse_num(&flag, &value()?)?),
            "--live-devices" => live_devices = Some(parse_num(&flag, &value()?)?),
            "--payload" => {
                shape = match value()?.as_str() {
                    "seed" => crate::publisher::Shape::Seed,
                    "firmware" => crate::publisher::Shape::Firmware,
                    other => bail!("--payload: seed or firmware, got {other:?}"),
                }
            }
            "--db-rows" => db_rows = Some(parse_num(&flag, &value()?)?),
            "--db-batch" => db_batch = parse_num(&flag, &value()?)?,
            "--db-host" => db.host = check_local(&value()?)?,
            "--db-port" => db.port = parse_num(&flag, &value()?)?,
            "--db-user" => db.user = value()?,
            "--db-password" => db.password = value()?,
            "--service-bin" => service_bin = PathBuf::from(value()?),
            "--service-env" => extra_env.push(service_env(&value()?)?),
            "--broker-inflight" => broker_inflight = parse_num(&flag, &value()?)?,
            "--publishers" => publishers = parse_num(&flag, &value()?)?,
            "--mosquitto" => mosquitto = PathBuf::from(value()?),
            "--mosquitto-sub" => mosquitto_sub = PathBuf::from(value()?),
            "--timeout-secs" => timeout_secs = parse_num(&flag, &value()?)?,
            "--poll-ms" => poll_ms = parse_num(&flag, &value()?)?,
            "--json" => json = Some(PathBuf::from(value()?)),
            other => bail!("unknown argument {other:?} (see --help)"),
        }
    }

    if !(scale > 0.0 && scale.is_finite()) {
        bail!("--scale: must be a positive number");
    }
    if runs == 0 || publishers == 0 || db_batch == 0 || timeout_secs == 0 || poll_ms == 0 {
        bail!("--runs, --publishers, --db-batch, --timeout-secs and --poll-ms must be at least 1");
    }
    // 6 placeholders per row; one statement takes at most 65,535.
    if db_batch > 10_000 {
        bail!("--db-batch: at most 10000 rows per statement");
    }
    let small = small.unwrap_or(Size {
        devices: 100,
        per_device: scaled(500, scale, 2),
    });
    let large = large.unwrap_or(Size {
        devices: scaled(10_000, scale, 1),
        per_device: 10,
    });
    let live = LiveSpec {
        devices: live_devices.unwrap_or(100),
        rate: live_rate.unwrap_or(5000),
        secs: live_secs.unwrap_or_else(|| scaled(30, scale, 1)),
    };
    if live.devices == 0 || live.rate == 0 || live.secs == 0 {
        bail!("--live-rate, --live-secs and --live-devices must be at least 1");
    }
    let json = json.unwrap_or_else(|| {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        PathBuf::from(format!("target/bench/results-{now}.json"))
    });
    Ok(Some(Options {
        shape,
        scenarios,
        runs,
        small,
        large,
        live,
        db_rows: db_rows.unwrap_or_else(|| large.messages()),
        db_batch,
        db,
        service_bin,
        service_env: extra_env,
        broker_inflight,
        publishers,
        mosquitto,
        mosquitto_sub,
        timeout: Duration::from_secs(timeout_secs),
        poll: Duration::from_millis(poll_ms),
        json,
    }))
}
