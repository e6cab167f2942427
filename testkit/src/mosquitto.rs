//! A private Mosquitto broker per test, which may be stopped, killed and restarted.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context as _;
use tempfile::TempDir;
use tokio::time::Instant;

use super::procs::{self, LaunchError, Proc};

const START_TIMEOUT: Duration = Duration::from_secs(10);
const STOP_GRACE: Duration = Duration::from_secs(15);

/// A Mosquitto broker on 127.0.0.1:`port()` with its own config, persistence
/// file and log in a private temp dir.
///
/// Runs in the foreground as a child of the test process; `persistence true`
/// with `autosave_interval 1`, so a [`stop`](Self::stop) (clean exit) keeps
/// persistent sessions and their queued messages, and a [`kill`](Self::kill)
/// keeps what was autosaved. Dropping it kills the broker and deletes the dir.
pub struct PrivateMosquitto {
    dir: TempDir,
    port: u16,
    proc: Option<Proc>,
    config: MosquittoConfig,
}

/// How a private broker is set up. The default is the tests' broker.
#[derive(Debug, Clone)]
pub struct MosquittoConfig {
    /// The program; `None`: `$MOSQUITTO_BIN`, else `/usr/sbin/mosquitto`.
    pub program: Option<PathBuf>,
    /// Keep sessions and queued messages across a stop (autosaved every second), for tests
    /// that restart the broker. The benchmark's broker is never restarted.
    pub persistence: bool,
    /// `max_inflight_messages`: unacknowledged QoS 1/2 messages in flight to each client.
    pub max_inflight: u32,
    /// `max_queued_messages`: most messages queued for one client; 0 for no limit.
    pub max_queued: u32,
    /// Log connections, subscriptions and notices with timestamps (tests read them); only
    /// errors and warnings otherwise (the benchmark counts the broker's own work).
    pub verbose_log: bool,
    /// Lines appended to the generated config (another listener, TLS files, …).
    pub extra: String,
}

impl Default for MosquittoConfig {
    fn default() -> Self {
        Self {
            program: None,
            persistence: true,
            max_inflight: 1000,
            max_queued: 100_000,
            verbose_log: true,
            extra: String::new(),
        }
    }
}

impl PrivateMosquitto {
    /// Starts a broker on a free port and waits (up to 10 s) until it accepts
    /// TCP connections. Panics with the broker's log tail on failure.
    pub async fn start() -> Self {
        match Self::try_start().await {
            Ok(broker) => broker,
            Err(e) => panic!("PrivateMosquitto::start failed: {e:#}"),
        }
    }

    pub async fn try_start() -> anyhow::Result<Self> {
        Self::try_start_with_config("").await
    }

    /// Like [`start`](Self::start), with `extra` appended to the config (for example a TLS
    /// listener on a port of the test's choosing).
    pub async fn start_with_config(extra: &str) -> Self {
        match Self::try_start_with_config(extra).await {
            Ok(broker) => broker,
            Err(e) => panic!("PrivateMosquitto::start_with_config failed: {e:#}"),
        }
    }

    pub async fn try_start_with_config(extra: &str) -> anyhow::Result<Self> {
        Self::try_start_with(MosquittoConfig {
            extra: extra.to_owned(),
            ..MosquittoConfig::default()
        })
        .await
    }

    /// A broker set up as `config` says.
    pub async fn try_start_with(config: MosquittoConfig) -> anyhow::Result<Self> {
        let dir = procs::make_tmpdir("mosquitto")?;
        let mut broker = PrivateMosquitto {
            dir,
            port: 0,
            proc: None,
            config,
        };
        // A port that looked free may be grabbed by someone else before the
        // broker binds it: then try another one.
        let mut attempt = 0;
        loop {
            attempt += 1;
            broker.port = procs::free_port();
            match broker.launch(Instant::now() + START_TIMEOUT).await {
                Ok(()) => return Ok(broker),
                Err(e) if e.exited_early && attempt < 3 => continue,
                Err(e) => return Err(e.error),
            }
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The process id while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.proc.as_ref().map(Proc::pid)
    }

    /// The program this broker runs.
    pub fn program(&self) -> PathBuf {
        self.config
            .program
            .clone()
            .unwrap_or_else(|| procs::program("MOSQUITTO_BIN", "/usr/sbin/mosquitto"))
    }

    /// The private dir (config, `mosquitto.db`, logs).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn is_running(&mut self) -> bool {
        self.proc.as_mut().is_some_and(Proc::is_running)
    }

    /// Clean shutdown: SIGTERM and wait for the exit (Mosquitto writes its
    /// persistence file on the way out). Falls back to SIGKILL after 15 s.
    pub async fn stop(&mut self) {
        let (port, proc) = (self.port, self.proc.take());
        let what = format_args!("mosquitto on port {port}");
        procs::stop_server(proc, STOP_GRACE, what, || self.log_tail()).await;
    }

    /// SIGKILL (no final save) and wait until the process is gone.
    pub async fn kill(&mut self) {
        if let Some(mut proc) = self.proc.take() {
            proc.kill().await;
        }
    }

    /// Starts the broker again on the same port with the same data dir, and
    /// waits until it accepts connections. A broker that is still running is
    /// stopped cleanly first. Panics with the log tail on failure.
    pub async fn restart(&mut self) {
        if let Err(e) = self.try_restart().await {
            panic!("PrivateMosquitto::restart failed: {e:#}");
        }
    }

    pub async fn try_restart(&mut self) -> anyhow::Result<()> {
        self.stop().await;
        let deadline = Instant::now() + START_TIMEOUT;
        procs::relaunch(deadline, async || self.launch(deadline).await).await
    }

    /// The whole broker log so far (to wait for a line in it).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// The last lines of the broker log and of its stdout/stderr.
    pub fn log_tail(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "--- {} (tail) ---\n{}",
            self.log_path().display(),
            procs::file_tail(&self.log_path(), 40)
        );
        let _ = write!(
            out,
            "--- {} (tail) ---\n{}",
            self.output_path().display(),
            procs::file_tail(&self.output_path(), 20)
        );
        out
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("mosquitto.log")
    }

    fn output_path(&self) -> PathBuf {
        self.dir.path().join("mosquitto.out")
    }

    fn config_path(&self) -> PathBuf {
        self.dir.path().join("mosquitto.conf")
    }

    fn write_config(&self) -> anyhow::Result<()> {
        let dir = self.dir.path().display();
        let mut conf = String::new();
        // As root, Mosquitto would switch to user `mosquitto`, which cannot
        // write our root-owned temp dir.
        if procs::is_root() {
            conf.push_str("user root\n");
        }
        let c = &self.config;
        let _ = write!(
            conf,
            "listener {port} 127.0.0.1\n\
             allow_anonymous true\n\
             max_inflight_messages {inflight}\n\
             max_queued_messages {queued}\n\
             log_dest file {dir}/mosquitto.log\n\
             log_type error\n\
             log_type warning\n",
            port = self.port,
            inflight = c.max_inflight,
            queued = c.max_queued,
        );
        if c.persistence {
            let _ = write!(
                conf,
                "persistence true\npersistence_location {dir}/\nautosave_interval 1\n"
            );
        } else {
            conf.push_str("persistence false\n");
        }
        if c.verbose_log {
            conf.push_str(
                "log_type notice\n\
                 log_type information\n\
                 log_type subscribe\n\
                 log_type unsubscribe\n\
                 connection_messages true\n\
                 log_timestamp true\n\
                 log_timestamp_format %Y-%m-%dT%H:%M:%S\n",
            );
        }
        conf.push_str(&c.extra);
        conf.push('\n');
        std::fs::write(self.config_path(), conf)
            .with_context(|| format!("writing {}", self.config_path().display()))
    }

    /// Spawns the broker on `self.port` and waits until it accepts TCP.
    async fn launch(&mut self, deadline: Instant) -> Result<(), LaunchError> {
        self.write_config().map_err(LaunchError::fatal)?;
        let program = self.program();
        let config = self.config_path();
        let mut proc = Proc::spawn(
            "mosquitto",
            &program,
            [std::ffi::OsStr::new("-c"), config.as_os_str()],
            &self.output_path(),
        )
        .map_err(LaunchError::fatal)?;
        loop {
            if let Some(status) = proc.exit_status() {
                return Err(LaunchError {
                    exited_early: true,
                    error: anyhow::anyhow!(
                        "mosquitto on port {} exited during startup ({status})\n{}",
                        self.port,
                        self.log_tail()
                    ),
                });
            }
            // The connect may have reached someone else's listener: only
            // trust it if our broker is still alive afterwards.
            if procs::tcp_accepts(self.port).await && proc.is_running() {
                self.proc = Some(proc);
                return Ok(());
            }
            if Instant::now() >= deadline {
                proc.kill().await;
                return Err(LaunchError::fatal(anyhow::anyhow!(
                    "mosquitto did not accept connections on port {} within {START_TIMEOUT:?}\n{}",
                    self.port,
                    self.log_tail()
                )));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for PrivateMosquitto {
    fn drop(&mut self) {
        // Proc's own Drop sends SIGKILL and reaps; the TempDir goes afterwards.
        self.proc.take();
    }
}
