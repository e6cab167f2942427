//! The scenarios: backlog drain by the service, the same drain by a do-nothing subscriber
//! (the broker's limit), the database's single-connection upsert limit, and the live stream.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use std::fmt::Write as _;

use anyhow::{Context as _, bail};
use mqtt_ingest::intake::zone::Zone;
use sqlx::AssertSqlSafe;

use crate::args::{Options, Scenario, Size};
use crate::broker::{Broker, NullSub, Sub};
use crate::db::BenchDb;
use crate::progress::Progress;
use crate::publisher;
use crate::report::Row;
use crate::service::{Service, Stopped};

/// How long the live scenario waits after the last publish for every message to show up.
const LIVE_SETTLE: Duration = Duration::from_secs(10);
/// The live scenario's database poll interval.
const LIVE_POLL: Duration = Duration::from_millis(5);
/// How many devices the live scenario observes for latency.
const LIVE_SAMPLE: usize = 1_000;
/// The service's default `PRESENCE_TIMEOUT_SECS`.
const PRESENCE_TIMEOUT: Duration = Duration::from_secs(90);

pub struct Ctx<'a> {
    pub opts: &'a Options,
    pub broker: &'a Broker,
    pub db: &'a BenchDb,
    pub progress: &'a Arc<Progress>,
    /// Unique per benchmark process and run: keeps topic prefixes and client ids apart.
    pub tag: String,
}

impl Ctx<'_> {
    fn prefix(&self, s: Scenario) -> String {
        format!("bench-{}-{}", self.tag, s.name())
    }

    fn client_id(&self, s: Scenario, role: &str) -> String {
        format!("bench-{}-{}-{role}", self.tag, s.name())
    }

    fn spawn_service(&self, s: Scenario) -> anyhow::Result<Service> {
        let extra: &[(&str, &str)] = match s {
            Scenario::Drain10kHistory => &[("HISTORY_ENABLED", "true")],
            _ => &[],
        };
        Service::spawn(
            self.opts,
            self.broker.port(),
            &self.opts.db,
            self.db.name(),
            &self.client_id(s, "svc"),
            &self.prefix(s),
            extra,
        )
    }
}

pub fn kind(s: Scenario) -> &'static str {
    match s {
        Scenario::DbLimit
        | Scenario::DbLimitWriters
        | Scenario::HistoryLimit
        | Scenario::SensorsLimit => "db",
        Scenario::Broker100 | Scenario::Broker10k => "broker",
        Scenario::Drain100
        | Scenario::Drain10k
        | Scenario::Drain10kHistory
        | Scenario::Drain10kSensors => "drain",
        Scenario::Live => "live",
        Scenario::Presence => "presence",
    }
}

pub async fn run(ctx: &Ctx<'_>, s: Scenario) -> anyhow::Result<Row> {
    match s {
        Scenario::DbLimit
        | Scenario::DbLimitWriters
        | Scenario::HistoryLimit
        | Scenario::SensorsLimit => db_limit(ctx, s).await,
        Scenario::Broker100 => broker_limit(ctx, s, ctx.opts.small).await,
        Scenario::Broker10k => broker_limit(ctx, s, ctx.opts.large).await,
        Scenario::Drain100 => drain(ctx, s, ctx.opts.small).await,
        Scenario::Drain10k | Scenario::Drain10kHistory => drain(ctx, s, ctx.opts.large).await,
        Scenario::Drain10kSensors => {
            // The service finds the table at start-up and writes it in every batch.
            ctx.db.sensors_table(true).await?;
            let row = drain(ctx, s, ctx.opts.large).await;
            let rows = ctx.db.sensor_rows().await;
            ctx.db.sensors_table(false).await?;
            let mut row = row?;
            row.note = Some(format!(
                "{}; device_sensors holds {} rows",
                row.note.unwrap_or_default(),
                rows?
            ));
            Ok(row)
        }
        Scenario::Live => live(ctx).await,
        Scenario::Presence => presence(ctx).await,
    }
}

fn mb(kib: u64) -> Option<f64> {
    (kib > 0).then(|| kib as f64 / 1024.0)
}

/// Checks a clean stop and the final counters against what was published; returns the
/// number of messages that never committed.
fn check_stop(stopped: &Stopped, published: u64) -> anyhow::Result<u64> {
    if !stopped.status.success() {
        bail!(
            "the service exited with {} after SIGTERM; its last lines:\n{}",
            stopped.status,
            stopped.tail
        );
    }
    let c = stopped.counters;
    let (Some(total), Some(succeeded), Some(failed)) = (c.total, c.succeeded, c.failed) else {
        bail!(
            "no final statistics block in the service's log; its last lines:\n{}",
            stopped.tail
        );
    };
    if failed > 0 {
        bail!(
            "the service rejected {failed} of the benchmark's messages; its last lines:\n{}",
            stopped.tail
        );
    }
    if total > published {
        bail!("the service counted {total} messages, more than the {published} published");
    }
    Ok(published.saturating_sub(succeeded))
}

/// Publishes the backlog for `prefix` and reports it.
async fn publish_backlog(
    ctx: &Ctx<'_>,
    s: Scenario,
    size: Size,
    prefix: &str,
) -> anyhow::Result<()> {
    let m = size.messages();
    ctx.progress.phase(
        format!(
            "{}: publishing the backlog ({} devices x {} messages)",
            s.name(),
            size.devices,
            size.per_device
        ),
        m,
    );
    let id_base = ctx.client_id(s, "pub");
    let backlog = publisher::Backlog {
        port: ctx.broker.port(),
        id_base: &id_base,
        prefix,
        devices: size.devices,
        per_device: size.per_device,
        connections: ctx.opts.publishers,
        shape: ctx.opts.shape,
    };
    let took = publisher::backlog(&backlog, ctx.progress, ctx.opts.timeout).await?;
    eprintln!(
        "[bench]   {}: {m} messages published and acknowledged in {:.2} s ({:.0}/s)",
        s.name(),
        took.as_secs_f64(),
        m as f64 / took.as_secs_f64()
    );
    Ok(())
}

/// (a)/(b): the service drains a backlog queued for its persistent session while it was
/// stopped; timed from spawn until every device shows its last seq.
async fn drain(ctx: &Ctx<'_>, s: Scenario, size: Size) -> anyhow::Result<Row> {
    let name = s.name();
    let (n, last, m) = (size.devices, size.per_device, size.messages());
    ctx.progress
        .phase(format!("{name}: registering {n} devices"), 0);
    ctx.db.reseed(n).await?;

    ctx.progress.phase(
        format!("{name}: starting the service once to create its session"),
        0,
    );
    ctx.broker.track(&ctx.client_id(s, "svc"));
    let mut svc = ctx.spawn_service(s)?;
    svc.wait_subscribed().await?;
    let first = svc.stop().await?;
    check_stop(&first, 0)?;

    let prefix = ctx.prefix(s);
    publish_backlog(ctx, s, size, &prefix).await?;

    ctx.progress
        .phase(format!("{name}: the service drains the backlog"), m);
    let started = Instant::now();
    let broker_cpu0 = ctx.broker.cpu_seconds();
    let db_cpu0 = database_cpu_seconds();
    let mut svc = ctx.spawn_service(s)?;
    let deadline = started + ctx.opts.timeout;
    let mut tick = tokio::time::interval(ctx.opts.poll);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    // A full scan parses every row's JSON (about 14 ms for 10,000 rows on the 2-core machine),
    // too much load to repeat every poll. The device published last is delivered last, so
    // until it shows its last message only it is polled (one row by index), with a full scan
    // once a second for the progress line; from then on every poll is a full scan.
    let mut polls = 0u64;
    let mut full_scans = 0u64;
    let mut tail = false;
    let mut next_full = started + Duration::from_secs(1);
    let took = loop {
        tick.tick().await;
        polls += 1;
        if !tail {
            tail = ctx.db.device_seq(n - 1).await? >= last;
        }
        let now = Instant::now();
        if tail || now >= next_full {
            let (done, sum) = ctx.db.drain_status(last).await?;
            let now = Instant::now();
            full_scans += 1;
            next_full = now + Duration::from_secs(1);
            ctx.progress.committed.store(sum, Relaxed);
            if done >= n {
                break now - started;
            }
            if now > deadline {
                bail!(
                    "the drain did not finish within {:?}: {done}/{n} devices at their last message, \
                     {sum}/{m} messages committed; the service's last lines:\n{}",
                    ctx.opts.timeout,
                    svc.tail()
                );
            }
        }
        if polls.is_multiple_of(10) {
            svc.sample_rss();
            svc.check_running()?;
        }
        if now > deadline + Duration::from_secs(5) {
            bail!("the drain did not finish within {:?}", ctx.opts.timeout);
        }
    };
    let cpu = mqtt_ingest_testkit::cpu_seconds(svc.pid());
    let broker_cpu = broker_cpu0
        .zip(ctx.broker.cpu_seconds())
        .map(|(a, b)| b - a);
    let db_cpu = db_cpu0.zip(database_cpu_seconds()).map(|(a, b)| b - a);
    ctx.progress
        .phase(format!("{name}: stopping the service"), 0);
    let stopped = svc.stop().await?;
    let lost = check_stop(&stopped, m)?;
    let secs = took.as_secs_f64();
    let cpu_note = cpu.map_or_else(String::new, |c| {
        format!(
            ", service CPU {c:.2} s ({:.1} us/msg, {:.0}% of one core)",
            c * 1e6 / m as f64,
            c * 100.0 / secs
        )
    }) + &broker_cpu.map_or_else(String::new, |c| {
        format!(", broker CPU {:.0}% of one core", c * 100.0 / secs)
    }) + &db_cpu.map_or_else(String::new, |c| {
        format!(
            ", database CPU {:.0}% of one core (the polls included)",
            c * 100.0 / secs
        )
    });
    Ok(Row {
        scenario: name.to_owned(),
        kind: kind(s).to_owned(),
        devices: n,
        messages: m,
        seconds: secs,
        rate: m as f64 / secs,
        peak_rss_mb: mb(stopped.peak_rss_kib),
        lost,
        service_total: stopped.counters.total,
        service_succeeded: stopped.counters.succeeded,
        service_failed: stopped.counters.failed,
        service_start_s: stopped.started_in.map(|d| d.as_secs_f64()),
        note: Some(format!(
            "{polls} polls, {full_scans} full scans{cpu_note}, {} warning lines",
            stopped.counters.warnings
        )),
        ..Row::default()
    })
}

/// CPU seconds used so far by the machine's database server (`mariadbd` or `mysqld`, all of them
/// if several run): which of service, broker and database is the busy process in a drain.
fn database_cpu_seconds() -> Option<f64> {
    let pids = mqtt_ingest_testkit::pids_named(&["mariadbd", "mysqld"]);
    (!pids.is_empty()).then(|| {
        pids.into_iter()
            .filter_map(mqtt_ingest_testkit::cpu_seconds)
            .sum()
    })
}

/// (c): the same backlog drained by a do-nothing subscriber (rumqttc, QoS 1, persistent
/// session, a PUBACK each, nothing printed): the broker's own limit. `mosquitto_sub` drains a
/// second copy, for the figure earlier runs called the broker's limit (it formats every
/// message). The broker's CPU share during each drain goes in the note: a drain is at the
/// broker's ceiling when the broker is the busy process.
async fn broker_limit(ctx: &Ctx<'_>, s: Scenario, size: Size) -> anyhow::Result<Row> {
    let name = s.name();
    let m = size.messages();
    let prefix = ctx.prefix(s);
    let filter = format!("{prefix}/+/+");
    let null_id = ctx.client_id(s, "null");
    let null = NullSub {
        port: ctx.broker.port(),
        client_id: &null_id,
        filter: &filter,
    };
    let id = ctx.client_id(s, "sub");
    let sub = Sub {
        bin: &ctx.opts.mosquitto_sub,
        port: ctx.broker.port(),
        client_id: &id,
        filter: &filter,
    };
    ctx.progress
        .phase(format!("{name}: creating the subscribers' sessions"), 0);
    ctx.broker.track(&null_id);
    ctx.broker.track(&id);
    null.create_session().await?;
    sub.create_session().await?;
    publish_backlog(ctx, s, size, &prefix).await?;
    ctx.progress.phase(
        format!("{name}: the do-nothing subscriber drains the backlog"),
        m,
    );
    let cpu0 = ctx.broker.cpu_seconds();
    let took = null.consume(m, ctx.opts.timeout).await?;
    let secs = took.as_secs_f64();
    let share = cpu0
        .zip(ctx.broker.cpu_seconds())
        .map(|(a, b)| (b - a) / secs);
    ctx.progress
        .phase(format!("{name}: mosquitto_sub drains its copy"), m);
    let sub_took = sub.consume(m, ctx.opts.timeout).await?.as_secs_f64();
    eprintln!(
        "[bench]   {name}: do-nothing subscriber {:.0} msg/s (broker CPU {}), mosquitto_sub {:.0} msg/s",
        m as f64 / secs,
        share.map_or("?".into(), |c| format!("{c:.2} cores")),
        m as f64 / sub_took
    );
    Ok(Row {
        scenario: name.to_owned(),
        kind: kind(s).to_owned(),
        devices: size.devices,
        messages: m,
        seconds: secs,
        rate: m as f64 / secs,
        note: Some(format!(
            "do-nothing subscriber; broker CPU {}; mosquitto_sub {:.0} msg/s",
            share.map_or("?".into(), |c| format!("{c:.2} cores")),
            m as f64 / sub_took
        )),
        ..Row::default()
    })
}

/// The number of writers the service runs: `INGEST_WRITERS` from `--service-env`, else its
/// default (2).
fn writers(opts: &Options) -> u64 {
    opts.service_env
        .iter()
        .find(|(k, _)| k == "INGEST_WRITERS")
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(2)
}

/// (d): the database's own limits: upserts over one connection and over the service's writers'
/// connections, and history rows.
async fn db_limit(ctx: &Ctx<'_>, s: Scenario) -> anyhow::Result<Row> {
    let devices = ctx.opts.large.devices;
    ctx.progress
        .phase(format!("{}: registering {devices} devices", s.name()), 0);
    ctx.db.reseed(devices).await?;
    let batch = ctx.opts.db_batch;
    let (rows, took, note) = match s {
        Scenario::HistoryLimit => {
            // history-10k's rows: two readings for each of drain-10k's messages.
            let rows = ctx.opts.large.messages() * 2;
            ctx.progress.phase(
                format!(
                    "{}: {rows} history rows inserted over one connection",
                    s.name()
                ),
                rows,
            );
            let (rows, took) = ctx
                .db
                .history_limit(devices, rows, batch, ctx.progress)
                .await?;
            (
                rows,
                took,
                format!("INSERT IGNORE, {batch} rows per statement, one connection"),
            )
        }
        Scenario::SensorsLimit => {
            // sensors-10k's rows: three readings for each of drain-10k's messages (folding
            // aside: the ceiling if every message were written).
            let rows = ctx.opts.large.messages() * 3;
            ctx.progress.phase(
                format!(
                    "{}: {rows} device_sensors rows upserted over one connection",
                    s.name()
                ),
                rows,
            );
            ctx.db.sensors_table(true).await?;
            let result = ctx
                .db
                .sensors_limit(devices, rows, batch, ctx.progress)
                .await;
            ctx.db.sensors_table(false).await?;
            let (rows, took) = result?;
            (
                rows,
                took,
                format!("the service's own upsert, {batch} rows per statement, one connection"),
            )
        }
        _ => {
            let conns = if s == Scenario::DbLimit {
                1
            } else {
                writers(ctx.opts)
            };
            ctx.progress.phase(
                format!(
                    "{}: {} rows upserted over {conns} connection(s), {batch} rows per statement",
                    s.name(),
                    ctx.opts.db_rows,
                ),
                ctx.opts.db_rows,
            );
            let (rows, took) = ctx
                .db
                .upsert_limit(devices, ctx.opts.db_rows, batch, conns, ctx.progress)
                .await?;
            (
                rows,
                took,
                format!("{batch} rows per statement, {conns} connection(s)"),
            )
        }
    };
    let secs = took.as_secs_f64();
    Ok(Row {
        scenario: s.name().to_owned(),
        kind: kind(s).to_owned(),
        devices,
        messages: rows,
        seconds: secs,
        rate: rows as f64 / secs,
        note: Some(note),
        ..Row::default()
    })
}

/// One sweep: how long it took (ms) and how many devices it set offline.
async fn timed_sweep(pool: &sqlx::MySqlPool, zone: &Zone) -> anyhow::Result<(f64, u64)> {
    let t = Instant::now();
    let changed = mqtt_ingest::store::presence::sweep(pool, PRESENCE_TIMEOUT, zone).await?;
    Ok((t.elapsed().as_secs_f64() * 1000.0, changed))
}

/// The sweep timed on the table as it is: the median of five with nothing stale (ms), then one
/// with a device in a hundred stale (ms, devices made stale, devices set offline).
async fn time_sweeps(
    pool: &sqlx::MySqlPool,
    zone: &Zone,
    now: chrono::NaiveDateTime,
) -> anyhow::Result<(f64, f64, u64, u64)> {
    let mut quiet = Vec::new();
    for _ in 0..5 {
        quiet.push(timed_sweep(pool, zone).await?.0);
    }
    quiet.sort_by(f64::total_cmp);
    let stale = make_stale(pool, now).await?;
    let (stale_ms, swept) = timed_sweep(pool, zone).await?;
    Ok((quiet[2], stale_ms, stale, swept))
}

/// One stale device in a hundred: silent for an hour, still marked online.
async fn make_stale(pool: &sqlx::MySqlPool, now: chrono::NaiveDateTime) -> anyhow::Result<u64> {
    let done =
        sqlx::query("UPDATE device_main SET is_online = 1, last_seen = ? WHERE MOD(id, 100) = 0")
            .bind(now - chrono::TimeDelta::hours(1))
            .execute(pool)
            .await?;
    Ok(done.rows_affected())
}

/// The sweep the service runs every `PRESENCE_SWEEP_SECS`, timed on CodeHubot's own table with
/// ten times drain-10k's devices (100,000 at the default size), every one online and fresh:
/// with nothing stale (the steady state), with one in a hundred stale, then the same with an
/// index on `last_seen` added.
async fn presence(ctx: &Ctx<'_>) -> anyhow::Result<Row> {
    let s = Scenario::Presence;
    let devices = ctx.opts.large.devices * 10;
    let t = &ctx.opts.db;
    let db = mqtt_ingest_testkit::TestDb::try_named("bench", &t.host, t.port, &t.user, &t.password)
        .await
        .context("creating the presence scenario's database")?;
    let pool = db.pool();
    crate::db::create_codehubot_device_main(&pool).await?;
    ctx.progress.phase(
        format!("{}: registering {devices} devices, all online", s.name()),
        0,
    );
    let zone = Zone::default();
    let now = zone.naive(chrono::Utc::now());
    let stamp = now.format("%Y-%m-%d %H:%M:%S").to_string();
    let mut start = 0;
    while start < devices {
        let end = (start + 5_000).min(devices);
        let mut sql = String::from(
            "INSERT INTO device_main (uuid, device_id, name, device_secret, is_online, last_seen) VALUES ",
        );
        for i in start..end {
            if i > start {
                sql.push(',');
            }
            let _ = write!(
                sql,
                "('presence-{i}','dev-{i}','Board {i}','s',1,'{stamp}')"
            );
        }
        sqlx::raw_sql(AssertSqlSafe(sql)).execute(&pool).await?;
        start = end;
    }
    ctx.progress
        .phase(format!("{}: timing the sweep", s.name()), 0);
    let (quiet, stale_ms, stale, swept) = time_sweeps(&pool, &zone, now).await?;
    sqlx::query("ALTER TABLE device_main ADD INDEX idx_last_seen (last_seen)")
        .execute(&pool)
        .await?;
    let (quiet_indexed, stale_indexed_ms, _, swept_indexed) =
        time_sweeps(&pool, &zone, now).await?;
    anyhow::ensure!(
        swept == stale && swept_indexed == stale,
        "the sweep set {swept} and {swept_indexed} offline, not the {stale} stale devices"
    );
    Ok(Row {
        scenario: s.name().to_owned(),
        kind: kind(s).to_owned(),
        devices,
        messages: 0,
        seconds: quiet / 1000.0,
        rate: devices as f64 / (quiet / 1000.0),
        note: Some(format!(
            "sweep, median of 5: {quiet:.1} ms with nothing stale, {stale_ms:.1} ms setting {stale} stale devices offline; with an index on last_seen: {quiet_indexed:.1} ms and {stale_indexed_ms:.1} ms"
        )),
        ..Row::default()
    })
}

/// Nearest-rank percentile of sorted values.
fn percentile(sorted: &[f64], p: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    Some(sorted[rank - 1])
}

/// (e): publish at a fixed rate with the service running; publish-to-commit latency.
async fn live(ctx: &Ctx<'_>) -> anyhow::Result<Row> {
    let s = Scenario::Live;
    let name = s.name();
    let spec = ctx.opts.live;
    let devices = spec.devices as usize;
    let total = spec.rate * spec.secs;
    ctx.progress
        .phase(format!("{name}: registering {devices} devices"), 0);
    ctx.db.reseed(spec.devices).await?;

    ctx.progress
        .phase(format!("{name}: starting the service"), 0);
    ctx.broker.track(&ctx.client_id(s, "svc"));
    let mut svc = ctx.spawn_service(s)?;
    svc.wait_subscribed().await?;

    ctx.progress.phase(
        format!(
            "{name}: {} msg/s for {} s over {devices} devices",
            spec.rate, spec.secs
        ),
        total,
    );
    let per_device = (total as usize).div_ceil(devices);
    let log: publisher::PublishLog =
        Arc::new(Mutex::new(vec![Vec::with_capacity(per_device); devices]));
    let publishing = {
        let stream = publisher::Stream {
            port: ctx.broker.port(),
            client_id: ctx.client_id(s, "pub"),
            prefix: ctx.prefix(s),
            devices: spec.devices,
            rate: spec.rate,
            secs: spec.secs,
            shape: ctx.opts.shape,
            mix: spec.mix,
        };
        let log = Arc::clone(&log);
        let progress = Arc::clone(ctx.progress);
        tokio::spawn(async move { publisher::live(stream, log, &progress).await })
    };
    // The publisher task is aborted if this scenario fails or is dropped.
    let mut publishing = AbortOnDrop(publishing);

    // Latency is observed on the first LIVE_SAMPLE devices only: a poll of every row every 5 ms
    // would, at 100,000 devices, be the database's main load and the poll's own time.
    let sample = devices.min(LIVE_SAMPLE);
    let mut observed = vec![0u64; devices];
    let mut latencies: Vec<f64> = Vec::with_capacity(total as usize);
    let mut unexpected = 0u64;
    let mut published: Option<(u64, Duration)> = None;
    let mut settle_deadline = None;
    let mut tick = tokio::time::interval(LIVE_POLL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut polls = 0u64;
    loop {
        tick.tick().await;
        let rows = ctx.db.seqs(sample as u64).await?;
        let seen_at = Instant::now();
        {
            let times = log.lock().unwrap_or_else(|e| e.into_inner());
            for (d, seq) in rows {
                if d >= devices || seq <= observed[d] {
                    continue;
                }
                // Device d is at seq: every earlier message of d has committed by now.
                for k in observed[d] + 1..=seq {
                    match times[d].get(k as usize - 1) {
                        Some(t) => latencies.push((seen_at - *t).as_secs_f64() * 1000.0),
                        None => unexpected += 1,
                    }
                }
                observed[d] = seq;
            }
        }
        ctx.progress
            .committed
            .store(latencies.len() as u64, Relaxed);
        polls += 1;
        if polls.is_multiple_of(20) {
            svc.sample_rss();
            svc.check_running()?;
        }
        if published.is_none() && publishing.0.is_finished() {
            let r = (&mut publishing.0).await.context("live publisher task")??;
            published = Some(r);
            settle_deadline = Some(Instant::now() + LIVE_SETTLE);
            ctx.progress.phase(
                format!("{name}: published {}; waiting for the last commits", r.0),
                r.0,
            );
            ctx.progress
                .committed
                .store(latencies.len() as u64, Relaxed);
        }
        if let (Some(_), Some(deadline)) = (published, settle_deadline)
            && (latencies.len() as u64 >= sampled_sent(&log, sample) || Instant::now() > deadline)
        {
            break;
        }
    }
    let (sent, span) = published.context("live publisher")?;
    let lost = sampled_sent(&log, sample).saturating_sub(latencies.len() as u64);

    ctx.progress
        .phase(format!("{name}: stopping the service"), 0);
    let stopped = svc.stop().await?;
    let counted_lost = check_stop(&stopped, sent)?;
    if unexpected > 0 {
        bail!("{unexpected} stored seq values were never published (a leftover session?)");
    }
    latencies.sort_by(f64::total_cmp);
    let secs = span.as_secs_f64();
    Ok(Row {
        scenario: name.to_owned(),
        kind: kind(s).to_owned(),
        devices: spec.devices,
        messages: sent,
        seconds: secs,
        rate: sent as f64 / secs,
        p50_ms: percentile(&latencies, 0.50),
        p99_ms: percentile(&latencies, 0.99),
        max_ms: latencies.last().copied(),
        peak_rss_mb: mb(stopped.peak_rss_kib),
        lost: lost.max(counted_lost),
        service_total: stopped.counters.total,
        service_succeeded: stopped.counters.succeeded,
        service_failed: stopped.counters.failed,
        service_start_s: stopped.started_in.map(|d| d.as_secs_f64()),
        note: Some(format!(
            "{}target {} msg/s; latency = first DB poll (every {} ms) showing the message committed - publish time, on {} of the {} devices ({} messages)",
            if spec.mix {
                "the firmware's mix (3 data, 2 status, 2 heartbeats of every 7), data on its latency; "
            } else {
                ""
            },
            spec.rate,
            LIVE_POLL.as_millis(),
            sample,
            devices,
            latencies.len()
        )),
        ..Row::default()
    })
}

/// Messages published to the first `sample` devices.
fn sampled_sent(log: &publisher::PublishLog, sample: usize) -> u64 {
    let times = log.lock().unwrap_or_else(|e| e.into_inner());
    times.iter().take(sample).map(|t| t.len() as u64).sum()
}

struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::percentile;

    #[test]
    fn nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 0.5), Some(50.0));
        assert_eq!(percentile(&v, 0.99), Some(99.0));
        assert_eq!(percentile(&[7.0], 0.99), Some(7.0));
        assert_eq!(percentile(&[], 0.5), None);
    }
}
