//! A throw-away database per test on the shared (or a private) MariaDB.

use std::time::Duration;

use anyhow::Context as _;
use sqlx::mysql::{
    MySqlConnectOptions, MySqlConnection, MySqlPool, MySqlPoolOptions, MySqlSslMode,
};
use sqlx::{AssertSqlSafe, Connection as _};

use super::unique_name;

/// How long any single admin step (connect, CREATE/DROP DATABASE) may take.
const ADMIN_TIMEOUT: Duration = Duration::from_secs(15);

/// Connection options for a MariaDB server (TLS off, utf8mb4).
pub(crate) fn connect_options(
    host: &str,
    port: u16,
    user: &str,
    password: &str,
    database: Option<&str>,
) -> MySqlConnectOptions {
    let mut opts = MySqlConnectOptions::new()
        .host(host)
        .port(port)
        .username(user)
        .ssl_mode(MySqlSslMode::Disabled)
        .charset("utf8mb4");
    // sqlx sends the scramble of "" for an empty password, which an account without one
    // refuses: send no password at all then.
    if !password.is_empty() {
        opts = opts.password(password);
    }
    if let Some(db) = database {
        opts = opts.database(db);
    }
    opts
}

/// One connection, bounded by [`ADMIN_TIMEOUT`].
pub(crate) async fn connect_once(opts: &MySqlConnectOptions) -> anyhow::Result<MySqlConnection> {
    match tokio::time::timeout(ADMIN_TIMEOUT, MySqlConnection::connect_with(opts)).await {
        Ok(conn) => Ok(conn?),
        Err(_) => anyhow::bail!("connect timed out after {ADMIN_TIMEOUT:?}"),
    }
}

/// A fresh database `mi_<unique>` created for one test, dropped on drop.
///
/// The fields describe how to reach it (e.g. to configure the service under
/// test); [`pool`](Self::pool) is a small pool already connected to it.
pub struct TestDb {
    pub name: String,
    pub host: String,
    pub port: u16,
    pub user: String,
    pub password: String,
    pool: MySqlPool,
}

impl TestDb {
    /// On the shared server: `TEST_DB_HOST` / `TEST_DB_PORT` / `TEST_DB_USER` /
    /// `TEST_DB_PASSWORD`, default `127.0.0.1:3306`, `root`, empty password.
    /// Panics on failure.
    pub async fn new() -> Self {
        match Self::try_new().await {
            Ok(db) => db,
            Err(e) => panic!("TestDb::new failed: {e:#}"),
        }
    }

    pub async fn try_new() -> anyhow::Result<Self> {
        let env = |key: &str, default: &str| {
            std::env::var(key)
                .ok()
                .filter(|v| !v.is_empty())
                .unwrap_or_else(|| default.to_string())
        };
        let port = env("TEST_DB_PORT", "3306")
            .parse()
            .context("TEST_DB_PORT is not a port number")?;
        // An empty password is a legitimate value, so no filtering here.
        let password = std::env::var("TEST_DB_PASSWORD").unwrap_or_default();
        Self::try_with(
            &env("TEST_DB_HOST", "127.0.0.1"),
            port,
            &env("TEST_DB_USER", "root"),
            &password,
        )
        .await
    }

    /// On another server (e.g. a [`PrivateMariaDb`](super::PrivateMariaDb)),
    /// as `root` with an empty password. Panics on failure.
    pub async fn on(host: &str, port: u16) -> Self {
        match Self::try_with(host, port, "root", "").await {
            Ok(db) => db,
            Err(e) => panic!("TestDb::on({host}, {port}) failed: {e:#}"),
        }
    }

    /// With explicit credentials (the user needs CREATE and DROP rights).
    pub async fn try_with(
        host: &str,
        port: u16,
        user: &str,
        password: &str,
    ) -> anyhow::Result<Self> {
        Self::try_named("mi", host, port, user, password).await
    }

    /// [`TestDb::try_with`], the database's name starting with `prefix` (`bench_…`).
    pub async fn try_named(
        prefix: &str,
        host: &str,
        port: u16,
        user: &str,
        password: &str,
    ) -> anyhow::Result<Self> {
        let name = unique_name(prefix);
        let admin = connect_options(host, port, user, password, None);
        let create = async {
            let mut conn = connect_once(&admin).await?;
            sqlx::raw_sql(AssertSqlSafe(format!(
                "CREATE DATABASE `{name}` CHARACTER SET utf8mb4 COLLATE utf8mb4_general_ci"
            )))
            .execute(&mut conn)
            .await?;
            let _ = conn.close().await;
            anyhow::Ok(())
        };
        tokio::time::timeout(ADMIN_TIMEOUT, create)
            .await
            .map_err(|_| anyhow::anyhow!("timed out after {ADMIN_TIMEOUT:?}"))
            .and_then(|r| r)
            .with_context(|| format!("creating database {name} on {user}@{host}:{port}"))?;

        let opts = connect_options(host, port, user, password, Some(&name));
        let pool = MySqlPoolOptions::new()
            .max_connections(5)
            .acquire_timeout(Duration::from_secs(10))
            .connect_with(opts)
            .await;
        match pool {
            Ok(pool) => Ok(TestDb {
                name,
                host: host.to_string(),
                port,
                user: user.to_string(),
                password: password.to_string(),
                pool,
            }),
            Err(e) => {
                let _ = drop_database(admin, &name);
                Err(anyhow::Error::new(e).context(format!("connecting a pool to database {name}")))
            }
        }
    }

    /// A pool (max 5 connections) connected to this database. Cheap clone.
    pub fn pool(&self) -> MySqlPool {
        self.pool.clone()
    }

    /// Options for connecting to this database.
    pub fn connect_options(&self) -> MySqlConnectOptions {
        connect_options(
            &self.host,
            self.port,
            &self.user,
            &self.password,
            Some(&self.name),
        )
    }

    /// Options for connecting to the same server with no database selected.
    pub fn server_connect_options(&self) -> MySqlConnectOptions {
        connect_options(&self.host, self.port, &self.user, &self.password, None)
    }

    /// A single new connection to this database.
    pub async fn connect(&self) -> anyhow::Result<MySqlConnection> {
        connect_once(&self.connect_options()).await
    }

    /// `mysql://user:password@host:port/name` (user and password percent-encoded).
    pub fn url(&self) -> String {
        let credentials = if self.password.is_empty() {
            percent_encode(&self.user)
        } else {
            format!(
                "{}:{}",
                percent_encode(&self.user),
                percent_encode(&self.password)
            )
        };
        format!(
            "mysql://{credentials}@{}:{}/{}",
            self.host, self.port, self.name
        )
    }
}

fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

impl Drop for TestDb {
    /// Never panics; a failure is only reported on stderr.
    fn drop(&mut self) {
        let admin = connect_options(&self.host, self.port, &self.user, &self.password, None);
        if let Err(e) = drop_database(admin, &self.name) {
            eprintln!(
                "[test harness] could not drop test database {} on {}@{}:{}: {e:#}",
                self.name, self.user, self.host, self.port
            );
        }
    }
}

/// `DROP DATABASE` from a separate thread with its own runtime, waiting for
/// it: usable from `Drop`, where the test's runtime (possibly the current
/// thread, blocked right here) cannot be used.
fn drop_database(admin: MySqlConnectOptions, name: &str) -> anyhow::Result<()> {
    let sql = format!("DROP DATABASE IF EXISTS `{name}`");
    let worker = std::thread::Builder::new()
        .name("test-db-drop".into())
        .spawn(move || -> anyhow::Result<()> {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            rt.block_on(async {
                let drop_db = async {
                    let mut conn = connect_once(&admin).await?;
                    // Do not hang for a day behind a lock someone forgot.
                    sqlx::raw_sql("SET SESSION lock_wait_timeout = 10")
                        .execute(&mut conn)
                        .await?;
                    sqlx::raw_sql(AssertSqlSafe(sql)).execute(&mut conn).await?;
                    let _ = conn.close().await;
                    anyhow::Ok(())
                };
                match tokio::time::timeout(ADMIN_TIMEOUT + Duration::from_secs(15), drop_db).await {
                    Ok(result) => result,
                    Err(_) => anyhow::bail!("timed out"),
                }
            })
        })?;
    worker
        .join()
        .unwrap_or_else(|_| Err(anyhow::anyhow!("drop thread panicked")))
}

/// The statements of an SQL script such as the tests' fixtures: `--` comment lines left out
/// first (they may hold a `;`), then split at `;`, empty ones dropped.
pub fn sql_statements(script: &str) -> Vec<String> {
    script
        .lines()
        .filter(|l| !l.trim_start().starts_with("--"))
        .collect::<Vec<_>>()
        .join("\n")
        .split(';')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect()
}
