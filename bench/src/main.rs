//! `mqtt-ingest-bench`: measures mqtt-ingest against the broker's and the database's own
//! limits on this machine, in one run (issue 3). See `--help` and `scripts/bench.sh`.
//!
//! Everything runs on 127.0.0.1: a private Mosquitto started here, a throw-away database
//! `bench_<random>` on the given MariaDB, the real service binary as a child process.

mod args;
mod broker;
mod db;
mod progress;
mod publisher;
mod report;
mod scenarios;
mod service;

use std::path::Path;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};

use anyhow::Context as _;
use serde_json::json;

use args::{Options, Scenario};
use broker::Broker;
use db::BenchDb;
use progress::Progress;
use report::Row;

fn main() -> ExitCode {
    // A bad command line exits 2 with clap's message; --help exits 0.
    let opts = args::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("mqtt-ingest-bench: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(bench(opts))
}

/// What a run leaves behind and `teardown` removes.
struct Env {
    broker: Option<Broker>,
    broker_version: String,
    db_name: String,
    db: Option<BenchDb>,
}

async fn setup(opts: &Options, env: &mut Env) -> anyhow::Result<()> {
    let needs_service = opts.scenarios.iter().any(|s| {
        matches!(
            s,
            Scenario::Drain100 | Scenario::Drain10k | Scenario::Drain10kHistory | Scenario::Live
        )
    });
    if needs_service {
        service::check_binary(&opts.service_bin)?;
    }
    eprintln!(
        "[bench] starting a private Mosquitto (max_inflight_messages {})",
        opts.broker_inflight
    );
    let broker = Broker::start(&opts.mosquitto, opts.broker_inflight).await?;
    eprintln!(
        "[bench]   mosquitto {} listening on 127.0.0.1:{}",
        broker.version,
        broker.port()
    );
    if broker::enforces_inflight(&broker.version) == Some(false) {
        eprintln!(
            "[bench]   note: Mosquitto before 2.0.13 does not hold max_inflight_messages after the \
             first window (in-flight quota fixes in 2.0.13): the window does not bound the drains here"
        );
    }
    env.broker_version = broker.version.clone();
    env.broker = Some(broker);
    let db = BenchDb::create(&opts.db, opts.codehubot_table).await?;
    eprintln!(
        "[bench] created database {} on {}:{}",
        db.name(),
        opts.db.host,
        opts.db.port
    );
    env.db_name = db.name().to_owned();
    env.db = Some(db);
    Ok(())
}

async fn teardown(env: &mut Env) {
    if let Some(mut broker) = env.broker.take() {
        broker.stop().await;
    }
    if let Some(db) = env.db.take() {
        let name = db.name().to_owned();
        db.drop_database().await;
        eprintln!("[bench] dropped database {name}");
    }
}

async fn shutdown_signal() -> &'static str {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut int), Ok(mut term)) = (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) else {
        return std::future::pending().await;
    };
    tokio::select! {
        _ = int.recv() => "SIGINT",
        _ = term.recv() => "SIGTERM",
    }
}

async fn bench(opts: Options) -> ExitCode {
    // Client ids and topic prefixes of this run.
    let tag = mqtt_ingest_testkit::unique_name("b");
    let mut env = Env {
        broker: None,
        broker_version: String::new(),
        db_name: String::new(),
        db: None,
    };
    let results: Mutex<Vec<Vec<Row>>> = Mutex::new(Vec::new());
    let progress = Progress::new();
    let ticker = progress.spawn_ticker();

    let outcome = tokio::select! {
        r = async {
            setup(&opts, &mut env).await?;
            run_all(&opts, &env, &tag, &progress, &results).await
        } => r,
        sig = shutdown_signal() => Err(anyhow::anyhow!("interrupted by {sig}")),
    };
    progress.idle();
    ticker.abort();
    teardown(&mut env).await;

    let runs = results.into_inner().unwrap_or_else(|e| e.into_inner());
    let mut ok = outcome.is_ok();
    if let Err(e) = &outcome {
        eprintln!("mqtt-ingest-bench: {e:#}");
    }
    ok &= runs.iter().flatten().all(|r| !r.failed());
    let medians = report::medians(&runs);
    if runs.len() > 1 {
        println!();
        print!(
            "{}",
            report::table(&format!("median of {} runs", runs.len()), &medians)
        );
    }
    if !runs.is_empty() {
        let meta = Meta {
            ok,
            error: outcome.as_ref().err(),
            broker_version: &env.broker_version,
            db_name: &env.db_name,
        };
        match write_json(&opts, &runs, &medians, &meta) {
            Ok(()) => eprintln!("[bench] results written to {}", opts.json.display()),
            Err(e) => {
                eprintln!("mqtt-ingest-bench: writing {}: {e:#}", opts.json.display());
                ok = false;
            }
        }
    }
    if ok {
        ExitCode::SUCCESS
    } else {
        for r in runs.iter().flatten().filter(|r| r.failed()) {
            let why = r
                .error
                .clone()
                .unwrap_or_else(|| format!("{} messages lost", r.lost));
            eprintln!("FAILED {}: {why}", r.scenario);
        }
        ExitCode::FAILURE
    }
}

async fn run_all(
    opts: &Options,
    env: &Env,
    tag: &str,
    progress: &Arc<Progress>,
    results: &Mutex<Vec<Vec<Row>>>,
) -> anyhow::Result<()> {
    let broker = env.broker.as_ref().context("no broker")?;
    let db = env.db.as_ref().context("no database")?;
    for run in 1..=opts.runs {
        results
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(Vec::new());
        let ctx = scenarios::Ctx {
            opts,
            broker,
            db,
            progress,
            tag: format!("{tag}-r{run}"),
        };
        for &s in &opts.scenarios {
            eprintln!("[bench] run {run}/{}: {}", opts.runs, s.name());
            // A bound on the whole scenario, so that even a hung database query ends it.
            let limit = opts.timeout * 2 + std::time::Duration::from_secs(opts.live.secs + 180);
            let outcome = tokio::time::timeout(limit, scenarios::run(&ctx, s))
                .await
                .unwrap_or_else(|_| Err(anyhow::anyhow!("did not finish within {limit:?}")));
            let mut row = match outcome {
                Ok(row) => row,
                Err(e) => Row {
                    scenario: s.name().to_owned(),
                    kind: scenarios::kind(s).to_owned(),
                    error: Some(format!("{e:#}")),
                    ..Row::default()
                },
            };
            progress.idle();
            // Leftover persistent sessions would collect copies of every later message.
            if let Err(e) = broker.remove_sessions().await {
                let msg = format!("{e:#}");
                row.error = Some(match row.error.take() {
                    Some(first) => format!("{first}; {msg}"),
                    None => msg,
                });
            }
            match &row.error {
                Some(e) => eprintln!("[bench]   {} FAILED: {e}\n{}", s.name(), broker.log_tail()),
                None => eprintln!(
                    "[bench]   {}: {} messages in {:.2} s = {:.0}/s",
                    s.name(),
                    row.messages,
                    row.seconds,
                    row.rate
                ),
            }
            let mut all = results.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(current) = all.last_mut() {
                current.push(row);
                report::link_ratios(current);
            }
        }
        let all = results.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(current) = all.last() {
            println!();
            print!(
                "{}",
                report::table(
                    &format!(
                        "run {run}/{} (broker max_inflight_messages {})",
                        opts.runs, opts.broker_inflight
                    ),
                    current
                )
            );
        }
    }
    Ok(())
}

struct Meta<'a> {
    ok: bool,
    error: Option<&'a anyhow::Error>,
    broker_version: &'a str,
    db_name: &'a str,
}

fn write_json(
    opts: &Options,
    runs: &[Vec<Row>],
    medians: &[Row],
    meta: &Meta,
) -> anyhow::Result<()> {
    let doc = json!({
        "tool": "mqtt-ingest-bench",
        "version": env!("CARGO_PKG_VERSION"),
        "unix_time": std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
        "ok": meta.ok,
        "error": meta.error.map(|e| format!("{e:#}")),
        "mosquitto_version": meta.broker_version,
        "database": meta.db_name,
        "config": {
            "scenarios": opts.scenarios.iter().map(|s| s.name()).collect::<Vec<_>>(),
            "runs": opts.runs,
            "small": { "devices": opts.small.devices, "messages_per_device": opts.small.per_device },
            "large": { "devices": opts.large.devices, "messages_per_device": opts.large.per_device },
            "live": { "devices": opts.live.devices, "rate": opts.live.rate, "secs": opts.live.secs },
            "db_rows": opts.db_rows,
            "db_batch": opts.db_batch,
            "broker_max_inflight_messages": opts.broker_inflight,
            "publishers": opts.publishers,
            "service_bin": opts.service_bin.display().to_string(),
            "service_env": opts.service_env.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>(),
            "poll_ms": opts.poll.as_millis() as u64,
            "timeout_secs": opts.timeout.as_secs(),
            "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        },
        "runs": runs,
        "medians": medians,
    });
    if let Some(parent) = opts.json.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)?;
    }
    write(&opts.json, &serde_json::to_string_pretty(&doc)?)
}

fn write(path: &Path, text: &str) -> anyhow::Result<()> {
    std::fs::write(path, format!("{text}\n")).with_context(|| format!("writing {}", path.display()))
}
