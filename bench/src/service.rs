//! The real service binary as a child process: environment, readiness, peak RSS, clean stop
//! and its final statistics block.

use std::collections::VecDeque;
use std::path::Path;
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use tokio::io::{AsyncBufReadExt as _, BufReader};
use tokio::process::{Child, Command};

use crate::args::{DbTarget, Options};
use mqtt_ingest_testkit::stats_counter as counter;

const READY_TIMEOUT: Duration = Duration::from_secs(30);
const STOP_TIMEOUT: Duration = Duration::from_secs(60);
const TAIL_LINES: usize = 40;

/// The counters of the service's final statistics block.
#[derive(Clone, Copy, Debug, Default)]
pub struct Counters {
    pub total: Option<u64>,
    pub succeeded: Option<u64>,
    pub failed: Option<u64>,
    /// Lines logged at WARN or ERROR: a clean run has none.
    pub warnings: u64,
}

#[derive(Default)]
struct LogState {
    tail: VecDeque<String>,
    /// When the "subscribed topic=<prefix>/+/data" line came.
    subscribed: Option<Instant>,
    counters: Counters,
}

pub struct Service {
    child: Child,
    pid: u32,
    spawned: Instant,
    log: Arc<Mutex<LogState>>,
    reader: tokio::task::JoinHandle<()>,
    peak_rss_kib: u64,
}

pub struct Stopped {
    pub status: ExitStatus,
    /// Time from spawn to the subscription.
    pub started_in: Option<Duration>,
    pub counters: Counters,
    pub peak_rss_kib: u64,
    pub tail: String,
}

impl Service {
    /// Starts the service with only the settings the benchmark gives it (`--env-file
    /// /dev/null`, a cleared environment), logging text on stderr, which we read.
    pub fn spawn(
        opts: &Options,
        port: u16,
        db: &DbTarget,
        db_name: &str,
        client_id: &str,
        prefix: &str,
        extra_env: &[(&str, &str)],
    ) -> anyhow::Result<Service> {
        let mut cmd = Command::new(&opts.service_bin);
        cmd.args(["--env-file", "/dev/null"])
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("MQTT_BROKER", "127.0.0.1")
            .env("MQTT_PORT", port.to_string())
            .env("MQTT_CLIENT_ID", client_id)
            .env("MQTT_TOPIC_PREFIX", prefix)
            .env("DB_HOST", "127.0.0.1")
            .env("DB_PORT", db.port.to_string())
            .env("DB_NAME", db_name)
            .env("DB_USER", &db.user)
            .env("DB_PASSWORD", &db.password)
            .env("LOG_FORMAT", "text")
            .env("STATS_INTERVAL_SECS", "0")
            // The benchmark may run beside an installed service that holds the default port.
            .env("HTTP_LISTEN", "");
        for (k, v) in extra_env {
            cmd.env(k, v);
        }
        for (k, v) in &opts.service_env {
            cmd.env(k, v);
        }
        let spawned = Instant::now();
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {}", opts.service_bin.display()))?;
        let pid = child.id().context("service pid")?;
        let stderr = child.stderr.take().context("service stderr")?;
        let log = Arc::new(Mutex::new(LogState::default()));
        let ready_marker = format!("subscribed topic={prefix}/+/data");
        let reader_log = Arc::clone(&log);
        let reader = tokio::spawn(async move {
            let mut lines = BufReader::new(stderr).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                let mut s = reader_log.lock().unwrap_or_else(|e| e.into_inner());
                if s.subscribed.is_none() && line.contains(&ready_marker) {
                    s.subscribed = Some(Instant::now());
                }
                if line.contains(" WARN ") || line.contains(" ERROR ") {
                    s.counters.warnings += 1;
                }
                if let Some(n) = counter(&line, "total") {
                    s.counters.total = Some(n);
                } else if let Some(n) = counter(&line, "succeeded") {
                    s.counters.succeeded = Some(n);
                } else if let Some(n) = counter(&line, "failed") {
                    s.counters.failed = Some(n);
                }
                if s.tail.len() == TAIL_LINES {
                    s.tail.pop_front();
                }
                s.tail.push_back(line);
            }
        });
        Ok(Service {
            child,
            pid,
            spawned,
            log,
            reader,
            peak_rss_kib: 0,
        })
    }

    /// The last lines the service logged.
    pub fn tail(&self) -> String {
        let s = self.log.lock().unwrap_or_else(|e| e.into_inner());
        s.tail.iter().cloned().collect::<Vec<_>>().join("\n")
    }

    /// Fails with the log tail when the service has exited.
    pub fn check_running(&mut self) -> anyhow::Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!(
                "the service exited ({status}); its last lines:\n{}",
                self.tail()
            );
        }
        Ok(())
    }

    /// Waits until the service has subscribed to the data topic.
    pub async fn wait_subscribed(&mut self) -> anyhow::Result<()> {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            self.sample_rss();
            if self.started_in().is_some() {
                return Ok(());
            }
            self.check_running()?;
            if Instant::now() > deadline {
                bail!(
                    "the service did not subscribe within {READY_TIMEOUT:?}; its last lines:\n{}",
                    self.tail()
                );
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Time from spawn to the subscription, once the service has subscribed.
    pub fn started_in(&self) -> Option<Duration> {
        let s = self.log.lock().unwrap_or_else(|e| e.into_inner());
        s.subscribed.map(|t| t - self.spawned)
    }

    /// The service's process id.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Reads the peak RSS so far (VmHWM) and returns the highest seen, in KiB.
    pub fn sample_rss(&mut self) -> u64 {
        if let Some(kib) = mqtt_ingest_testkit::peak_rss_kib(self.pid) {
            self.peak_rss_kib = self.peak_rss_kib.max(kib);
        }
        self.peak_rss_kib
    }

    /// SIGTERM, wait for the exit (sampling the RSS meanwhile), read the final statistics.
    pub async fn stop(mut self) -> anyhow::Result<Stopped> {
        self.sample_rss();
        mqtt_ingest_testkit::sigterm(self.pid)?;
        let deadline = Instant::now() + STOP_TIMEOUT;
        let status = loop {
            if let Some(status) = self.child.try_wait()? {
                break status;
            }
            self.sample_rss();
            if Instant::now() > deadline {
                let _ = self.child.kill().await;
                bail!(
                    "the service did not stop within {STOP_TIMEOUT:?} of SIGTERM; its last lines:\n{}",
                    self.tail()
                );
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        };
        // The pipe closes when the process is gone; the reader then has every line.
        let _ = tokio::time::timeout(Duration::from_secs(5), &mut self.reader).await;
        let counters = self.log.lock().unwrap_or_else(|e| e.into_inner()).counters;
        Ok(Stopped {
            status,
            started_in: self.started_in(),
            counters,
            peak_rss_kib: self.peak_rss_kib,
            tail: self.tail(),
        })
    }
}

/// Whether a path looks like a runnable file, for an early, clear error.
pub fn check_binary(path: &Path) -> anyhow::Result<()> {
    let meta = std::fs::metadata(path).with_context(|| {
        format!(
            "service binary {} not found (build it: cargo build --release --bin mqtt-ingest)",
            path.display()
        )
    })?;
    if !meta.is_file() {
        bail!("{} is not a file", path.display());
    }
    Ok(())
}
