//! Wires the parts together and runs them until shutdown: the event loop, the writer and the
//! statistics ticker, with a bounded channel between the event loop and the writer; beside them
//! the database check and the HTTP listener for metrics and health.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::backoff::Backoff;
use crate::config::Settings;
use crate::health::Health;
use crate::http;
use crate::mqtt;
use crate::rejects::RejectSink;
use crate::sensors::{self, Discovery};
use crate::stats::Stats;
use crate::store::{self, Store, StoreOptions};
use crate::systemd;
use crate::work::{InFlight, settled_channel};
use crate::writer::{Batching, Queue, Router, WriterParts, run_writer};
use crate::{history, presence, rejects};

/// The service, before it runs. [`Service::stats`] gives the live counters (tests and the
/// statistics block read them).
pub struct Service {
    settings: Settings,
    stats: Arc<Stats>,
    health: Arc<Health>,
}

impl Service {
    /// A service for `settings`.
    pub fn new(settings: Settings) -> Self {
        let stats = Arc::new(Stats::with_style(
            settings.log.warn_interval,
            settings.log.style,
        ));
        Self {
            settings,
            health: Arc::new(Health::new(stats.clone())),
            stats,
        }
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
    /// migration fails or the HTTP listener cannot bind; a database or broker that is down is
    /// waited for.
    pub async fn run_until_stopped(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        self.run_reporting_address(shutdown, |_| {}).await
    }

    /// [`Service::run_until_stopped`], calling `bound` with the HTTP listener's address once it
    /// listens (tests ask for port 0 and need to know which one they got).
    pub async fn run_reporting_address(
        self,
        shutdown: CancellationToken,
        bound: impl FnOnce(std::net::SocketAddr),
    ) -> anyhow::Result<()> {
        let Service {
            settings,
            stats,
            health,
        } = self;
        let db = &settings.db;
        info!(
            broker = %format!("{}:{}", settings.mqtt.broker, settings.mqtt.port),
            database = %format!("{}:{}/{}", db.host, db.port, db.name),
            client_id = %settings.mqtt.client_id,
            qos = settings.mqtt.qos,
            "starting mqtt-ingest {}",
            env!("CARGO_PKG_VERSION")
        );
        // Tasks that end with the service: aborted on every way out, also when this future is
        // dropped (a dropped service must not leave an event loop holding its client id).
        let mut background = Background(Vec::new());
        if let Some(addr) = settings.ops.http_listen {
            let listener = http::bind(addr)
                .await
                .with_context(|| format!("cannot listen on HTTP_LISTEN={addr}"))?;
            if let Ok(local) = listener.local_addr() {
                bound(local);
            }
            background.push(tokio::spawn(http::serve(
                listener,
                health.clone(),
                shutdown.clone(),
            )));
        }
        let pool = store::pool(db);
        background.push(tokio::spawn(health.clone().check_database_every(
            pool.clone(),
            settings.ops.db_check_interval,
            shutdown.clone(),
        )));
        if !prepare_database(&pool, db.auto_migrate, &shutdown).await? {
            return Ok(()); // stopped before the database was ever reachable
        }
        let store_options = store_options(&pool, &settings).await?;

        let link = mqtt::client(&settings.mqtt)?;
        let keep = &settings.keep;
        let (rejects, reject_writer) = if keep.rejects {
            let (sink, rx) = rejects::channel(keep.rejects_max_payload);
            (
                Some(sink),
                Some(tokio::spawn(rejects::run_writer(pool.clone(), rx))),
            )
        } else {
            (None, None)
        };
        let rejects_dropped = rejects.as_ref().map(RejectSink::dropped_counter);
        if !settings.presence.timeout.is_zero() {
            background.push(tokio::spawn(presence::run_sweeper(
                pool.clone(),
                settings.presence.timeout,
                settings.presence.sweep_interval,
                db.zone.clone(),
                shutdown.clone(),
            )));
        }
        if keep.history && !keep.history_retention.is_zero() {
            background.push(tokio::spawn(history::run_retention(
                pool.clone(),
                keep.history_retention,
                keep.maintenance_interval,
                db.zone.clone(),
                shutdown.clone(),
            )));
        }
        if keep.rejects {
            background.push(tokio::spawn(rejects::run_retention(
                pool.clone(),
                keep.rejects_keep,
                keep.rejects_retention,
                keep.maintenance_interval,
                db.zone.clone(),
                shutdown.clone(),
            )));
        }
        let ingest = &settings.ingest;
        let per_writer = (ingest.queue_capacity / ingest.writers).max(1);
        let batching = Batching {
            max_messages: ingest.batch_max_messages,
            max_wait: ingest.batch_max_wait,
            retry_max: db.retry_max,
        };
        // The writers and the event loop stop on this one: the caller's shutdown, or the event
        // loop's own stop when the broker lacks what the settings need.
        let stop = shutdown.child_token();
        let (settled, settled_rx) = settled_channel();
        let in_flight = InFlight::new();
        let mut queues = Vec::with_capacity(ingest.writers);
        let mut writers = Vec::with_capacity(ingest.writers);
        for _ in 0..ingest.writers {
            // Every reading of a folded message would be missing from the history table.
            let queue = Arc::new(Queue::new(per_writer, !keep.history));
            queues.push(queue.clone());
            writers.push(tokio::spawn(run_writer(WriterParts {
                store: Store::new(pool.clone(), store_options.clone()),
                queue,
                settled: settled.clone(),
                in_flight: in_flight.clone(),
                rejects: rejects.clone(),
                stats: stats.clone(),
                batching,
                shutdown: stop.clone(),
            })));
        }
        // The way back closes when the last writer ends: the event loop then disconnects.
        drop(settled);
        let router = Router::new(queues);
        health.set_queues(router.depth_probe());
        let mut event_loop = tokio::spawn(mqtt::run_event_loop(mqtt::EventLoopParts {
            settings: settings.mqtt.clone(),
            rules: settings.ingest.rules.clone(),
            link,
            jobs: router,
            settled: settled_rx,
            in_flight,
            rejects,
            stats: stats.clone(),
            shutdown: stop.clone(),
        }));
        let ticker = tokio::spawn(log_stats_every(
            settings.log.stats_interval,
            stats.clone(),
            db.zone.clone(),
        ));
        for task in writers
            .iter()
            .chain([&ticker])
            .chain(reject_writer.as_ref())
        {
            background.0.push(task.abort_handle());
        }
        background.0.push(event_loop.abort_handle());
        // The database is prepared; READY=1 follows the subscriptions' acknowledgement.
        background.push(tokio::spawn(systemd::notify_ready_then_feed_watchdog(
            health.clone(),
            settings.mqtt.keepalive,
            settings.ops.db_check_interval,
            shutdown.clone(),
        )));

        // Ends early only when the event loop stops the service (or, racing the shutdown, has
        // already finished it).
        let mut loop_ended = None;
        tokio::select! {
            _ = stop.cancelled() => {}
            ended = &mut event_loop => {
                let result = match ended {
                    Ok(Ok(())) if stop.is_cancelled() => Ok(()),
                    Ok(Ok(())) => Err(anyhow::anyhow!("the MQTT event loop ended")),
                    Ok(Err(e)) => Err(anyhow::Error::from(e)),
                    Err(e) => Err(anyhow::anyhow!("the MQTT event loop failed: {e}")),
                };
                if let Err(e) = &result {
                    error!("{e}; stopping");
                }
                loop_ended = Some(result);
                stop.cancel();
            }
        }
        health.set_stopping();
        systemd::notify_stopping();
        info!(
            deadline_secs = settings.ingest.shutdown_timeout.as_secs(),
            "stop requested: no new messages; committing and acknowledging what was taken"
        );
        let deadline = tokio::time::Instant::now() + settings.ingest.shutdown_timeout;
        let mut writers_done = Ok(());
        for writer in writers {
            let done = wait(writer, deadline, "a writer (database unreachable?)").await;
            writers_done = writers_done.and(done);
        }
        // The event loop sends the last acks, then disconnects, once the writers have ended.
        let loop_done = match loop_ended {
            Some(result) => result,
            // At least a moment of its own, even when a writer used up the deadline: the acks
            // of what was committed and the DISCONNECT still go out.
            None => wait(
                event_loop,
                deadline.max(tokio::time::Instant::now() + Duration::from_secs(2)),
                "the MQTT event loop",
            )
            .await
            .and_then(|r| r.map_err(anyhow::Error::from)),
        };
        // Its senders went with the writers and the event loop: it ends once it has written.
        let mut rejects_done = Ok(());
        if let Some(task) = reject_writer {
            rejects_done = wait(task, deadline, "the reject writer").await;
        }
        if let Some(n) = rejects_dropped
            .map(|d| d.load(std::sync::atomic::Ordering::Relaxed))
            .filter(|n| *n > 0)
        {
            warn!(records = n, "rejects not kept: the reject queue was full");
        }
        drop(background);
        ticker.abort();
        info!("final statistics\n{}", render_stats(&stats, &db.zone));
        pool.close().await;
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
                Some(table)
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
    pool: &sqlx::MySqlPool,
    auto_migrate: bool,
    shutdown: &CancellationToken,
) -> anyhow::Result<bool> {
    let mut backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(30));
    loop {
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
            Err(e) if is_migration_error(&e) => return Err(e),
            Err(e) => {
                let cause = e.downcast_ref::<sqlx::Error>();
                let refused = cause.is_some_and(store::is_refusal);
                if refused {
                    backoff.give_up_quickly();
                }
                let delay = backoff.next_delay();
                let hint = cause.and_then(store::settings_hint).unwrap_or("");
                // The error once: sqlx's text already holds the server's message, which its
                // source repeats.
                if refused {
                    error!(error = %e, retry_in_secs = delay.as_secs_f32(), "database refused the service; {hint}; retrying");
                } else {
                    error!(error = %e, retry_in_secs = delay.as_secs_f32(), "database not reachable; {hint}; retrying");
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

async fn wait<T>(
    task: JoinHandle<T>,
    deadline: tokio::time::Instant,
    what: &str,
) -> anyhow::Result<T> {
    let abort = task.abort_handle();
    match tokio::time::timeout_at(deadline, task).await {
        Ok(Ok(t)) => Ok(t),
        Ok(Err(e)) => Err(anyhow::anyhow!("{what} failed: {e}")),
        Err(_) => {
            abort.abort();
            warn!(
                "shutdown deadline passed while waiting for {what}; unacknowledged messages will be redelivered by the broker"
            );
            Err(anyhow::anyhow!(
                "shutdown deadline passed while waiting for {what}"
            ))
        }
    }
}

/// Tasks that must not outlive the service: aborted when dropped.
struct Background(Vec<tokio::task::AbortHandle>);

impl Background {
    fn push(&mut self, task: JoinHandle<()>) {
        // Detached: only the abort handle is kept.
        self.0.push(task.abort_handle());
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        for task in &self.0 {
            task.abort();
        }
    }
}

/// The statistics block in the configured words (`LOG_STYLE`).
fn render_stats(stats: &Stats, zone: &crate::zone::Zone) -> String {
    let snap = stats.snapshot();
    if stats.codehubot_wording() {
        snap.render_codehubot(zone)
    } else {
        snap.render()
    }
}

async fn log_stats_every(interval: Duration, stats: Arc<Stats>, zone: crate::zone::Zone) {
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
