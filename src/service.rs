//! Wires the parts together and runs them until shutdown: the event loop, the writer and the
//! statistics ticker, with a bounded channel between the event loop and the writer; beside them
//! the database check and the HTTP listener for metrics and health.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tokio_util::task::AbortOnDropHandle;
use tracing::{error, info, warn};

use crate::backoff::Backoff;
use crate::config::Settings;
use crate::config::hosts::list_text;
use crate::mqtt;
use crate::ops::health::Health;
use crate::ops::http;
use crate::ops::stats::Stats;
use crate::ops::status::RejectsShown;
use crate::ops::systemd;
use crate::store::sensors::{self, Discovery};
use crate::store::sql::unavailable_retry;
use crate::store::{self, Nodes, Store, StoreOptions};
use crate::store::{history, presence, rejects};
use crate::work::RejectSink;
use crate::work::{InFlight, settled_channel};
use crate::writer::{Batching, Queue, Router, WriterParts, run_writer};

/// The service, built and not yet running: its counters and health exist and its HTTP
/// listener is bound (so [`Service::http_address`] is known before it runs).
/// [`Service::run_until_stopped`] then runs it.
pub struct Service {
    settings: Settings,
    stats: Arc<Stats>,
    health: Arc<Health>,
    http: Option<tokio::net::TcpListener>,
}

impl Service {
    /// Builds the service for `settings`; fails only when the HTTP listener cannot bind.
    pub async fn build(settings: Settings) -> anyhow::Result<Self> {
        let stats = Arc::new(Stats::with_style(
            settings.log.warn_interval,
            settings.log.style,
        ));
        let http = match settings.ops.http_listen {
            Some(addr) => Some(
                http::bind(addr)
                    .await
                    .with_context(|| format!("cannot listen on HTTP_LISTEN={addr}"))?,
            ),
            None => None,
        };
        Ok(Self {
            settings,
            health: Arc::new(Health::new(stats.clone())),
            stats,
            http,
        })
    }

    /// Where `/metrics`, `/healthz` and `/readyz` are served, when `HTTP_LISTEN` is set (tests
    /// ask for port 0 and need to know which one they got).
    pub fn http_address(&self) -> Option<std::net::SocketAddr> {
        self.http.as_ref().and_then(|l| l.local_addr().ok())
    }

    /// Readiness, the database check and the queues (what `/readyz` and `/metrics` show).
    pub fn health(&self) -> Arc<Health> {
        self.health.clone()
    }

    /// The live counters.
    pub fn stats(&self) -> Arc<Stats> {
        self.stats.clone()
    }

    /// Runs until `shutdown` fires, then stops taking messages, commits and acknowledges what
    /// was taken, disconnects and returns. Fails only when the shutdown deadline passes, a
    /// migration fails or the broker lacks what the settings need; a database or broker that
    /// is down is waited for. Dropping the future stops every task it started (a dropped
    /// service must not leave an event loop holding its client id).
    pub async fn run_until_stopped(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let Service {
            settings,
            stats,
            health,
            http,
        } = self;
        let db = &settings.db;
        info!(
            broker = %list_text(&settings.mqtt.brokers),
            database = %format!("{}/{}", list_text(&db.hosts), db.name),
            client_id = %settings.mqtt.client_id,
            qos = settings.mqtt.qos,
            "starting mqtt-ingest {}",
            env!("CARGO_PKG_VERSION")
        );
        // Tasks that run beside the pipeline and end with it (aborted when the set is dropped).
        let mut background = JoinSet::new();
        if let Some(listener) = http {
            // The kept rejects are device input: on the status page only on a local listener,
            // or where the operator asks for them.
            let local = listener.local_addr().is_ok_and(|a| a.ip().is_loopback());
            health.set_rejects_shown(
                match (
                    settings.keep.rejects,
                    local || settings.ops.status_show_rejects,
                ) {
                    (false, _) => RejectsShown::NotKept,
                    (true, false) => RejectsShown::Hidden,
                    (true, true) => RejectsShown::Shown,
                },
            );
            health.sample_trend();
            background.spawn(health.clone().sample_trend_every(shutdown.clone()));
            background.spawn(http::serve(listener, health.clone(), shutdown.clone()));
        }
        let nodes = store::nodes(db);
        let pool = nodes.pool().clone();
        health.set_nodes(nodes.clone());
        background.spawn(health.clone().check_database_every(
            nodes.clone(),
            settings.ops.db_check_interval,
            shutdown.clone(),
        ));
        if !prepare_database(&nodes, db.auto_migrate, &shutdown).await? {
            return Ok(()); // stopped before the database was ever reachable
        }
        let store_options = store_options(&pool, &settings).await?;
        spawn_maintenance(&mut background, &settings, &pool, &shutdown);
        let pipeline =
            Pipeline::start(&settings, &nodes, store_options, &stats, &health, &shutdown)?;
        background.spawn(log_stats_every(
            settings.log.stats_interval,
            stats.clone(),
            db.zone.clone(),
        ));
        // The database is prepared; READY=1 follows the subscriptions' acknowledgement.
        background.spawn(systemd::notify_ready_then_feed_watchdog(
            health.clone(),
            settings.mqtt.keepalive,
            settings.ops.db_check_interval,
            shutdown.clone(),
        ));

        let result = pipeline
            .run_until_stopped(settings.ingest.shutdown_timeout, &health)
            .await;
        drop(background);
        info!("final statistics\n{}", render_stats(&stats, &db.zone));
        pool.close().await;
        result
    }
}

/// The offline sweep and the retention of history and rejects, as the settings ask.
fn spawn_maintenance(
    tasks: &mut JoinSet<()>,
    settings: &Settings,
    pool: &sqlx::MySqlPool,
    shutdown: &CancellationToken,
) {
    let (keep, zone) = (&settings.keep, &settings.db.zone);
    if !settings.presence.timeout.is_zero() {
        tasks.spawn(presence::run_sweeper(
            pool.clone(),
            settings.presence.timeout,
            settings.presence.sweep_interval,
            zone.clone(),
            shutdown.clone(),
        ));
    }
    if keep.history && !keep.history_retention.is_zero() {
        tasks.spawn(history::run_retention(
            pool.clone(),
            keep.history_retention,
            keep.maintenance_interval,
            zone.clone(),
            shutdown.clone(),
        ));
    }
    if keep.rejects {
        tasks.spawn(rejects::run_retention(
            pool.clone(),
            keep.rejects_keep,
            keep.rejects_retention,
            keep.maintenance_interval,
            zone.clone(),
            shutdown.clone(),
        ));
    }
}

/// The message path, running: the event loop, the writers behind their queues, and the
/// reject writer. Each task is aborted if this is dropped.
struct Pipeline {
    event_loop: AbortOnDropHandle<Result<(), mqtt::Fatal>>,
    writers: JoinSet<()>,
    reject_writer: Option<AbortOnDropHandle<()>>,
    rejects_dropped: Option<Arc<std::sync::atomic::AtomicU64>>,
    /// The caller's shutdown, or the event loop's own stop when the broker lacks what the
    /// settings need: the writers and the event loop stop on it.
    stop: CancellationToken,
}

impl Pipeline {
    fn start(
        settings: &Settings,
        nodes: &Arc<Nodes>,
        store_options: StoreOptions,
        stats: &Arc<Stats>,
        health: &Health,
        shutdown: &CancellationToken,
    ) -> anyhow::Result<Self> {
        let link = mqtt::client(&settings.mqtt)?;
        let pool = nodes.pool();
        let (keep, ingest) = (&settings.keep, &settings.ingest);
        let (rejects, reject_writer) = if keep.rejects {
            let (sink, rx) = crate::work::reject_channel(keep.rejects_max_payload);
            let task = AbortOnDropHandle::new(tokio::spawn(rejects::run_writer(pool.clone(), rx)));
            (Some(sink), Some(task))
        } else {
            (None, None)
        };
        let rejects_dropped = rejects.as_ref().map(RejectSink::dropped_counter);
        let per_writer = (ingest.queue_capacity / ingest.writers).max(1);
        let batching = Batching {
            max_messages: ingest.batch_max_messages,
            max_wait: ingest.batch_max_wait,
            retry_max: settings.db.retry_max,
        };
        let stop = shutdown.child_token();
        let (settled, settled_rx) = settled_channel();
        let in_flight = InFlight::new();
        let mut queues = Vec::with_capacity(ingest.writers);
        let mut writers = JoinSet::new();
        for _ in 0..ingest.writers {
            // Every reading of a folded message would be missing from the history table.
            let queue = Arc::new(Queue::new(per_writer, !keep.history));
            queues.push(queue.clone());
            writers.spawn(run_writer(WriterParts {
                store: Store::on_nodes(nodes.clone(), store_options.clone()),
                queue,
                settled: settled.clone(),
                in_flight: in_flight.clone(),
                rejects: rejects.clone(),
                stats: stats.clone(),
                batching,
                shutdown: stop.clone(),
            }));
        }
        // The way back closes when the last writer ends: the event loop then disconnects.
        drop(settled);
        let router = Router::new(queues);
        health.set_queues(router.depth_probe());
        let event_loop =
            AbortOnDropHandle::new(tokio::spawn(mqtt::run_event_loop(mqtt::EventLoopParts {
                settings: settings.mqtt.clone(),
                rules: settings.ingest.rules.clone(),
                link,
                jobs: router,
                settled: settled_rx,
                in_flight,
                rejects,
                stats: stats.clone(),
                shutdown: stop.clone(),
            })));
        Ok(Self {
            event_loop,
            writers,
            reject_writer,
            rejects_dropped,
            stop,
        })
    }

    /// Runs until the stop, then drains: the writers commit what they hold, the event loop
    /// sends the last acks and disconnects, the reject writer writes what it was sent, all
    /// within `shutdown_timeout`.
    async fn run_until_stopped(
        mut self,
        shutdown_timeout: Duration,
        health: &Health,
    ) -> anyhow::Result<()> {
        // Ends early only when the event loop stops the service (or, racing the shutdown, has
        // already finished it).
        let mut loop_ended = None;
        tokio::select! {
            _ = self.stop.cancelled() => {}
            ended = &mut self.event_loop => {
                let result = match ended {
                    Ok(Ok(())) if self.stop.is_cancelled() => Ok(()),
                    Ok(Ok(())) => Err(anyhow::anyhow!("the MQTT event loop ended")),
                    Ok(Err(e)) => Err(anyhow::Error::from(e)),
                    Err(e) => Err(anyhow::anyhow!("the MQTT event loop failed: {e}")),
                };
                if let Err(e) = &result {
                    error!("{e}; stopping");
                }
                loop_ended = Some(result);
                self.stop.cancel();
            }
        }
        health.set_stopping();
        systemd::notify_stopping();
        info!(
            deadline_secs = shutdown_timeout.as_secs(),
            "stop requested: no new messages; committing and acknowledging what was taken"
        );
        let deadline = tokio::time::Instant::now() + shutdown_timeout;
        let writers_done = wait_all(
            &mut self.writers,
            deadline,
            "a writer (database unreachable?)",
        )
        .await;
        // The event loop sends the last acks, then disconnects, once the writers have ended.
        let loop_done = match loop_ended {
            Some(result) => result,
            // At least a moment of its own, even when a writer used up the deadline: the acks
            // of what was committed and the DISCONNECT still go out.
            None => wait(
                self.event_loop,
                deadline.max(tokio::time::Instant::now() + Duration::from_secs(2)),
                "the MQTT event loop",
            )
            .await
            .and_then(|r| r.map_err(anyhow::Error::from)),
        };
        // Its senders went with the writers and the event loop: it ends once it has written.
        let mut rejects_done = Ok(());
        if let Some(task) = self.reject_writer {
            rejects_done = wait(task, deadline, "the reject writer").await;
        }
        if let Some(n) = self
            .rejects_dropped
            .map(|d| d.load(std::sync::atomic::Ordering::Relaxed))
            .filter(|n| *n > 0)
        {
            warn!(records = n, "rejects not kept: the reject queue was full");
        }
        writers_done.and(loop_done).and(rejects_done)
    }
}

/// What the store needs to know about the tables it writes, read once at start-up: how to
/// write `device_main` rows, how long `device_status` may be, and whether `device_sensors` is
/// there. Refuses `INGEST_REGISTER_UNKNOWN_DEVICES` where `device_main` needs values on insert
/// that the service does not have (CodeHubot's `device_secret`): such rows could not be made.
async fn store_options(
    pool: &sqlx::MySqlPool,
    settings: &Settings,
) -> anyhow::Result<StoreOptions> {
    let write_mode = match store::write_mode(pool).await {
        Ok((mode, None)) => {
            info!(mode = %mode, "device rows are written by primary key");
            mode
        }
        Ok((mode, Some(why))) => {
            info!(mode = %mode, reason = %why, "device rows are written with the portable statement");
            mode
        }
        Err(e) => {
            let mode = store::WriteMode::JoinUpdate;
            warn!(mode = %mode, error = %e, "could not inspect device_main; using the portable statement");
            mode
        }
    };
    let register = settings.ingest.register_unknown_devices;
    if register {
        let required = store::required_columns(pool, store::REGISTER_COLUMNS)
            .await
            .context("cannot inspect device_main for INGEST_REGISTER_UNKNOWN_DEVICES")?;
        if !required.is_empty() {
            anyhow::bail!(
                "INGEST_REGISTER_UNKNOWN_DEVICES=true, but device_main needs a value for {} on insert, which the service does not have: register devices through the backend, or set INGEST_REGISTER_UNKNOWN_DEVICES=false",
                required.join(", ")
            );
        }
    }
    let device_status_chars = store::column_chars(pool, "device_main", "device_status")
        .await
        .unwrap_or_else(|e| {
            warn!(error = %e, "could not read the length of device_main.device_status; statuses are written uncut");
            None
        });
    let sensors = match &settings.keep.device_sensors_table {
        None => {
            info!("DEVICE_SENSORS_TABLE is empty: no per-sensor rows are written");
            None
        }
        Some(name) => match sensors::discover(pool, name).await {
            Ok(Discovery::Found(table)) => {
                info!(table = %name, "every reading also updates its row in the per-sensor table");
                Some(table.with_renames(settings.ingest.sensor_table_renames.clone()))
            }
            Ok(Discovery::Absent) => {
                info!(table = %name, "no per-sensor table in this database: readings go to device_main only");
                None
            }
            Ok(Discovery::Unusable(why)) => {
                warn!(table = %name, reason = %why, "the per-sensor table cannot be written; readings go to device_main only");
                None
            }
            Err(e) => {
                warn!(table = %name, error = %e, "could not inspect the per-sensor table; readings go to device_main only");
                None
            }
        },
    };
    Ok(StoreOptions {
        register_unknown_devices: register,
        history: settings.keep.history,
        write_mode,
        zone: settings.db.zone.clone(),
        device_status_chars,
        sensors,
        max_clock_skew: settings.ingest.rules.time.max_clock_skew,
    })
}

/// Waits for the pool to answer and runs the migrations; retries while the database is
/// unreachable. Returns `false` if shutdown came first.
async fn prepare_database(
    nodes: &Nodes,
    auto_migrate: bool,
    shutdown: &CancellationToken,
) -> anyhow::Result<bool> {
    let pool = nodes.pool();
    let mut backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(30));
    // Moves to the next node without a wait since the last wait: at most one round of the
    // nodes, so that a cluster whose every node refuses at once is not asked in a tight loop.
    let mut moved_at_once = 0;
    loop {
        let turn = nodes.turn();
        let attempt = async {
            store::ping(pool).await.map_err(anyhow::Error::from)?;
            if auto_migrate {
                store::migrate(pool).await.context("running migrations")?;
            }
            anyhow::Ok(())
        };
        match attempt.await {
            Ok(()) => {
                info!(migrations = auto_migrate, "database ready");
                return Ok(true);
            }
            // A node that cannot be used (read-only, outside the cluster's primary component)
            // may fail the migrations after it answered the ping: the next node may not.
            Err(e) if node_failure_in(&e).is_some_and(|c| nodes.failed(turn, c)) => {
                if moved_at_once + 1 < nodes.len() {
                    moved_at_once += 1;
                    continue; // the next node, at once
                }
                moved_at_once = 0;
                let delay = unavailable_retry(None, &mut backoff);
                error!(error = %e, retry_in_secs = crate::ops::telemetry::secs(delay), "no node of DB_HOST is usable; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = shutdown.cancelled() => return Ok(false),
                }
            }
            Err(e) if is_migration_error(&e) => return Err(e),
            Err(e) => {
                moved_at_once = 0;
                let cause = e.downcast_ref::<sqlx::Error>();
                let refused = cause.is_some_and(store::is_refusal);
                let delay = unavailable_retry(cause, &mut backoff);
                let hint = cause.and_then(store::settings_hint).unwrap_or("");
                // The error once: sqlx's text already holds the server's message, which its
                // source repeats.
                if refused {
                    error!(error = %e, retry_in_secs = crate::ops::telemetry::secs(delay), "database refused the service; {hint}; retrying");
                } else {
                    error!(error = %e, retry_in_secs = crate::ops::telemetry::secs(delay), "database not reachable; {hint}; retrying");
                }
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = shutdown.cancelled() => return Ok(false),
                }
            }
        }
    }
}

/// A migration that the database refused (bad SQL, a checksum mismatch) will not succeed by
/// waiting; one that failed to connect will.
/// The database error behind a failed start-up step (the ping's, or a migration's statement).
fn node_failure_in(e: &anyhow::Error) -> Option<&sqlx::Error> {
    match e.downcast_ref::<sqlx::migrate::MigrateError>() {
        Some(sqlx::migrate::MigrateError::Execute(inner))
        | Some(sqlx::migrate::MigrateError::ExecuteMigration(inner, _)) => Some(inner),
        Some(_) => None,
        None => e.downcast_ref::<sqlx::Error>(),
    }
}

fn is_migration_error(e: &anyhow::Error) -> bool {
    match e.downcast_ref::<sqlx::migrate::MigrateError>() {
        Some(sqlx::migrate::MigrateError::Execute(inner)) => inner.as_database_error().is_some(),
        Some(sqlx::migrate::MigrateError::ExecuteMigration(inner, _)) => {
            inner.as_database_error().is_some()
        }
        Some(_) => true,
        None => false,
    }
}

/// Waits for one task until `deadline`; past it the task is aborted (dropped) and the error
/// says what was waited for.
async fn wait<T>(
    task: AbortOnDropHandle<T>,
    deadline: tokio::time::Instant,
    what: &str,
) -> anyhow::Result<T> {
    match tokio::time::timeout_at(deadline, task).await {
        Ok(Ok(t)) => Ok(t),
        Ok(Err(e)) => Err(anyhow::anyhow!("{what} failed: {e}")),
        Err(_) => Err(deadline_passed(what)),
    }
}

/// Waits for every task of `tasks` until `deadline`; past it the rest are aborted.
async fn wait_all(
    tasks: &mut JoinSet<()>,
    deadline: tokio::time::Instant,
    what: &str,
) -> anyhow::Result<()> {
    let mut result = Ok(());
    loop {
        match tokio::time::timeout_at(deadline, tasks.join_next()).await {
            Ok(None) => return result,
            Ok(Some(Ok(()))) => {}
            Ok(Some(Err(e))) => result = Err(anyhow::anyhow!("{what} failed: {e}")),
            Err(_) => {
                tasks.abort_all();
                return Err(deadline_passed(what));
            }
        }
    }
}

fn deadline_passed(what: &str) -> anyhow::Error {
    warn!(
        "shutdown deadline passed while waiting for {what}; unacknowledged messages will be redelivered by the broker"
    );
    anyhow::anyhow!("shutdown deadline passed while waiting for {what}")
}

/// The statistics block in the configured words (`LOG_STYLE`).
fn render_stats(stats: &Stats, zone: &crate::intake::zone::Zone) -> String {
    let snap = stats.snapshot();
    if stats.warnings().codehubot_wording() {
        snap.render_codehubot(zone)
    } else {
        snap.render(zone)
    }
}

async fn log_stats_every(interval: Duration, stats: Arc<Stats>, zone: crate::intake::zone::Zone) {
    if interval.is_zero() {
        return;
    }
    let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
    loop {
        ticks.tick().await;
        let snap = stats.snapshot();
        info!(
            received = snap.received,
            succeeded = snap.succeeded,
            failed = snap.failed,
            connected = snap.connected,
            "statistics\n{}",
            render_stats(&stats, &zone)
        );
    }
}
