//! A private MariaDB server per test, which may be stopped, killed and restarted.

use std::ffi::OsString;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context as _;
use sqlx::Connection as _;
use sqlx::mysql::{MySqlConnectOptions, MySqlPool, MySqlPoolOptions};
use tempfile::TempDir;
use tokio::time::Instant;

use super::TestDb;
use super::db::{connect_once, connect_options};
use super::procs::{self, LaunchError, Proc};

const INSTALL_TIMEOUT: Duration = Duration::from_secs(120);
const START_TIMEOUT: Duration = Duration::from_secs(30);
const STOP_GRACE: Duration = Duration::from_secs(60);

/// Server options for both the bootstrap and the server: small memory,
/// no binlog, cheap I/O. Committed transactions still survive a SIGKILL of
/// the server (the redo log is written at each commit, only not fsynced),
/// just not a crash of the machine.
const SERVER_OPTIONS: &[&str] = &[
    "--skip-name-resolve",
    "--skip-log-bin",
    "--innodb-buffer-pool-size=16M",
    "--innodb-log-file-size=8M",
    "--innodb-flush-log-at-trx-commit=2",
    "--innodb-flush-method=nosync",
    "--innodb-doublewrite=0",
    "--innodb-use-native-aio=0",
    "--innodb-buffer-pool-dump-at-shutdown=0",
    "--innodb-buffer-pool-load-at-startup=0",
    "--character-set-server=utf8mb4",
    "--collation-server=utf8mb4_general_ci",
];

/// A MariaDB server on 127.0.0.1:`port()` whose data dir lives in a private
/// temp dir; `root` with an empty password can log in over TCP.
///
/// Dropping it kills the server and deletes the dir.
pub struct PrivateMariaDb {
    dir: TempDir,
    port: u16,
    proc: Option<Proc>,
    /// Server options added to the defaults (TLS files, …).
    extra_args: Vec<String>,
    /// How long a start may take until root can log in (a Galera joiner receives its state
    /// first).
    start_timeout: Duration,
}

impl PrivateMariaDb {
    /// Creates a data dir (`mariadb-install-db`), starts the server on a free
    /// port and waits (up to 30 s) until `root` can log in and `SELECT 1`.
    /// Panics with the server's log tail on failure.
    pub async fn start() -> Self {
        match Self::try_start().await {
            Ok(server) => server,
            Err(e) => panic!("PrivateMariaDb::start failed: {e:#}"),
        }
    }

    pub async fn try_start() -> anyhow::Result<Self> {
        Self::try_start_with_args(&[]).await
    }

    /// Like [`start`](Self::start), with extra server options (e.g. `--ssl-cert=…`).
    pub async fn start_with_args(args: &[String]) -> Self {
        match Self::try_start_with_args(args).await {
            Ok(server) => server,
            Err(e) => panic!("PrivateMariaDb::start_with_args failed: {e:#}"),
        }
    }

    pub async fn try_start_with_args(args: &[String]) -> anyhow::Result<Self> {
        let dir = procs::make_tmpdir("mariadb")?;
        let mut server = PrivateMariaDb {
            dir,
            port: 0,
            proc: None,
            extra_args: args.to_vec(),
            start_timeout: START_TIMEOUT,
        };
        server.install().await?;
        server.launch_on_a_free_port().await?;
        Ok(server)
    }

    /// A server that is not started yet: its options may depend on ports handed out with
    /// [`free_port`](procs::free_port) before it starts (a Galera node's). `install`: make
    /// the system tables (a Galera joiner starts empty and receives them).
    pub(crate) async fn install_only(
        args: Vec<String>,
        start_timeout: Duration,
        install: bool,
    ) -> anyhow::Result<Self> {
        let dir = procs::make_tmpdir("mariadb")?;
        let server = PrivateMariaDb {
            dir,
            port: procs::free_port(),
            proc: None,
            extra_args: args,
            start_timeout,
        };
        if install {
            server.install().await?;
        }
        Ok(server)
    }

    /// Opens the data dir to every user: a Galera joiner receives its state through an rsync
    /// daemon that, started by root, runs as `nobody` (MariaDB's `wsrep_sst_rsync` names no
    /// user), and must write there. Test data only.
    pub(crate) fn open_data_dir(&self) -> anyhow::Result<()> {
        use std::os::unix::fs::PermissionsExt as _;
        for (path, mode) in [
            (self.dir.path().to_owned(), 0o755),
            (self.data_dir(), 0o777),
            (self.tmp_dir(), 0o777),
        ] {
            std::fs::create_dir_all(&path)?;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode))
                .with_context(|| format!("chmod {}", path.display()))?;
        }
        Ok(())
    }

    /// Starts a server made by [`install_only`](Self::install_only) on its port.
    pub(crate) async fn launch_now(&mut self) -> anyhow::Result<()> {
        let deadline = Instant::now() + self.start_timeout;
        self.launch(deadline).await.map_err(|e| e.error)
    }

    /// The options a later (re)start uses instead of those given at the start.
    pub(crate) fn set_extra_args(&mut self, args: Vec<String>) {
        self.extra_args = args;
    }

    async fn launch_on_a_free_port(&mut self) -> anyhow::Result<()> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            self.port = procs::free_port();
            match self.launch(Instant::now() + self.start_timeout).await {
                Ok(()) => return Ok(()),
                Err(e) if e.exited_early && attempt < 3 => continue,
                Err(e) => return Err(e.error),
            }
        }
    }

    pub fn host(&self) -> &'static str {
        "127.0.0.1"
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn user(&self) -> &'static str {
        "root"
    }

    pub fn password(&self) -> &'static str {
        ""
    }

    pub fn socket_path(&self) -> PathBuf {
        self.dir.path().join("mariadbd.sock")
    }

    pub fn is_running(&mut self) -> bool {
        self.proc.as_mut().is_some_and(Proc::is_running)
    }

    /// Options to connect as root over TCP (no database selected).
    pub fn connect_options(&self) -> MySqlConnectOptions {
        connect_options(self.host(), self.port, self.user(), self.password(), None)
    }

    /// A new small pool (max 5) connected as root, no database selected.
    pub async fn pool(&self) -> anyhow::Result<MySqlPool> {
        Ok(MySqlPoolOptions::new()
            .max_connections(5)
            .acquire_timeout(Duration::from_secs(10))
            .connect_with(self.connect_options())
            .await?)
    }

    /// A fresh database on this server (see [`TestDb::on`]). Drop it before
    /// the server, or its drop will just report that it could not connect.
    pub async fn test_db(&self) -> TestDb {
        TestDb::on(self.host(), self.port).await
    }

    /// Clean shutdown: SIGTERM and wait (SIGKILL after 60 s).
    pub async fn stop(&mut self) {
        let (port, proc) = (self.port, self.proc.take());
        let what = format_args!("mariadbd on port {port}");
        procs::stop_server(proc, STOP_GRACE, what, || self.log_tail()).await;
    }

    /// SIGKILL (a crash, as far as InnoDB is concerned) and wait until the
    /// process is gone.
    pub async fn kill(&mut self) {
        if let Some(mut proc) = self.proc.take() {
            proc.kill().await;
        }
    }

    /// Starts the server again on the same port and data dir and waits (up to
    /// 30 s) until a login and `SELECT 1` work. A server that is still running
    /// is stopped cleanly first. Panics with the log tail on failure.
    pub async fn restart(&mut self) {
        if let Err(e) = self.try_restart().await {
            panic!("PrivateMariaDb::restart failed: {e:#}");
        }
    }

    pub async fn try_restart(&mut self) -> anyhow::Result<()> {
        self.stop().await;
        let deadline = Instant::now() + self.start_timeout;
        procs::relaunch(deadline, async || self.launch(deadline).await).await
    }

    /// The last lines of the server's error log and of its stdout/stderr.
    pub fn log_tail(&self) -> String {
        let mut out = String::new();
        for (path, lines) in [(self.error_log_path(), 40), (self.output_path(), 10)] {
            let _ = writeln!(
                out,
                "--- {} (tail) ---\n{}",
                path.display(),
                procs::file_tail(&path, lines)
            );
        }
        out
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn tmp_dir(&self) -> PathBuf {
        self.dir.path().join("tmp")
    }

    fn error_log_path(&self) -> PathBuf {
        self.dir.path().join("mariadbd.err")
    }

    fn output_path(&self) -> PathBuf {
        self.dir.path().join("mariadbd.out")
    }

    async fn install(&self) -> anyhow::Result<()> {
        let tmp = self.tmp_dir();
        std::fs::create_dir_all(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        let mut args: Vec<OsString> = vec![
            "--no-defaults".into(),
            path_arg("--datadir=", &self.data_dir()),
            path_arg("--tmpdir=", &tmp),
            "--auth-root-authentication-method=normal".into(),
            "--skip-test-db".into(),
        ];
        if procs::is_root() {
            // Without it the bootstrap refuses to run as root; only root may
            // pass it at all.
            args.push("--user=root".into());
        }
        args.extend(SERVER_OPTIONS.iter().map(OsString::from));
        let program = procs::program("MARIADB_INSTALL_DB_BIN", "/usr/bin/mariadb-install-db");
        procs::run_to_completion(
            "mariadb-install-db",
            &program,
            args,
            &self.dir.path().join("install.log"),
            INSTALL_TIMEOUT,
        )
        .await
    }

    /// Spawns mariadbd on `self.port` and waits until root can `SELECT 1`.
    async fn launch(&mut self, deadline: Instant) -> Result<(), LaunchError> {
        let mut args: Vec<OsString> = vec![
            // Must come first.
            "--no-defaults".into(),
            path_arg("--datadir=", &self.data_dir()),
            // Private: concurrent servers' temp files must not meet in /tmp.
            path_arg("--tmpdir=", &self.tmp_dir()),
            format!("--port={}", self.port).into(),
            "--bind-address=127.0.0.1".into(),
            path_arg("--socket=", &self.socket_path()),
            path_arg("--pid-file=", &self.dir.path().join("mariadbd.pid")),
            path_arg("--log-error=", &self.error_log_path()),
        ];
        if procs::is_root() {
            args.push("--user=root".into());
        }
        args.extend(SERVER_OPTIONS.iter().map(OsString::from));
        args.extend(self.extra_args.iter().map(OsString::from));
        let program = procs::program("MARIADBD_BIN", "/usr/sbin/mariadbd");
        let mut proc = Proc::spawn("mariadbd", &program, args, &self.output_path())
            .map_err(LaunchError::fatal)?;

        let opts = self.connect_options();
        let mut last_error = String::from("no attempt yet");
        loop {
            if let Some(status) = proc.exit_status() {
                return Err(LaunchError {
                    exited_early: true,
                    error: anyhow::anyhow!(
                        "mariadbd on port {} exited during startup ({status})\n{}",
                        self.port,
                        self.log_tail()
                    ),
                });
            }
            // Only try to log in once something listens (cheap check).
            if procs::tcp_accepts(self.port).await {
                match select_one(&opts).await {
                    // Someone else's server could answer: make sure ours is alive.
                    Ok(()) if proc.is_running() => {
                        self.proc = Some(proc);
                        return Ok(());
                    }
                    Ok(()) => {}
                    Err(e) => last_error = format!("{e:#}"),
                }
            }
            if Instant::now() >= deadline {
                proc.kill().await;
                return Err(LaunchError::fatal(anyhow::anyhow!(
                    "mariadbd on port {} did not accept a root login in time (last error: {last_error})\n{}",
                    self.port,
                    self.log_tail()
                )));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

async fn select_one(opts: &MySqlConnectOptions) -> anyhow::Result<()> {
    let attempt = async {
        let mut conn = connect_once(opts).await?;
        let one: i64 = sqlx::query_scalar("SELECT 1").fetch_one(&mut conn).await?;
        anyhow::ensure!(one == 1, "SELECT 1 returned {one}");
        let _ = conn.close().await;
        anyhow::Ok(())
    };
    tokio::time::timeout(Duration::from_secs(5), attempt)
        .await
        .context("login attempt timed out")?
}

fn path_arg(flag: &str, path: &Path) -> OsString {
    let mut arg = OsString::from(flag);
    arg.push(path);
    arg
}

impl Drop for PrivateMariaDb {
    fn drop(&mut self) {
        // Proc's own Drop sends SIGKILL and reaps; the TempDir goes afterwards.
        self.proc.take();
    }
}
