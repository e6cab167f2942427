//! The connection pool: options from the settings (TLS, the session's time zone), the
//! migrations, and the check that the database answers.

use sqlx::mysql::{MySqlConnectOptions, MySqlPool, MySqlPoolOptions, MySqlSslMode};
use sqlx::{Connection as _, Executor};

use std::sync::Arc;

use super::nodes::{MoveClock, Nodes};
use crate::config::{DbSettings, DbSslMode, Endpoint};

/// The migrations in `migrations/`, compiled in.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// Connection options for the settings' first host. The session's `time_zone` is left to
/// [`pool`], which sets it on each new connection (sqlx would fix one offset for the life of the
/// options).
pub fn connect_options(db: &DbSettings) -> MySqlConnectOptions {
    match db.hosts.first() {
        Some(host) => node_options(db, host),
        None => node_options(
            db,
            &Endpoint {
                host: "localhost".into(),
                port: 3306,
            },
        ),
    }
}

/// Connection options for one node.
fn node_options(db: &DbSettings, node: &Endpoint) -> MySqlConnectOptions {
    let mut options = MySqlConnectOptions::new()
        .host(&node.host)
        .port(node.port)
        .username(&db.user)
        .database(&db.name)
        .charset("utf8mb4")
        .timezone(None)
        .ssl_mode(match db.ssl_mode {
            DbSslMode::Disabled => MySqlSslMode::Disabled,
            DbSslMode::Preferred => MySqlSslMode::Preferred,
            DbSslMode::Required => MySqlSslMode::Required,
            DbSslMode::VerifyCa => MySqlSslMode::VerifyCa,
            DbSslMode::VerifyIdentity => MySqlSslMode::VerifyIdentity,
        });
    if let Some(ca) = &db.ssl_ca_file {
        options = options.ssl_ca(ca);
    }
    if let Some((cert, key)) = &db.ssl_client_cert {
        options = options.ssl_client_cert(cert).ssl_client_key(key);
    }
    // An empty password must be sent as no password: sqlx would otherwise send the scramble
    // of "", which a server account without a password refuses.
    if db.password.expose().is_empty() {
        options
    } else {
        options.password(db.password.expose())
    }
}

/// How long the ping before a pooled connection's use may take.
const PING_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// A pool like the seed's: `pool_min` kept, up to `pool_max`, recycled, pinged before use.
/// It connects lazily, so the service starts while the database is down.
///
/// Each session's `time_zone` is the database zone's offset (`DB_TIMEZONE`), so that `NOW()`
/// and `ON UPDATE CURRENT_TIMESTAMP` columns agree with what the service writes. For a zone
/// with daylight saving, a connection keeps the offset in force when it connected, until it is
/// recycled (`DB_POOL_RECYCLE_SECS`).
pub fn pool(db: &DbSettings) -> MySqlPool {
    nodes(db).pool().clone()
}

/// The pool of [`pool`] on the nodes of `DB_HOST`: it starts on the first and moves to the next
/// when one fails ([`Nodes::failed`]).
pub fn nodes(db: &DbSettings) -> Arc<Nodes> {
    let zone = db.zone.clone();
    let clock = MoveClock::new();
    let (acquire_clock, release_clock) = (clock.clone(), clock.clone());
    let pool = MySqlPoolOptions::new()
        .min_connections(db.pool_min)
        .max_connections(db.pool_max)
        .max_lifetime(db.recycle)
        .acquire_timeout(db.connect_timeout)
        // The ping before use is ours (below), bounded: a server that stopped answering
        // without closing the connection must not hold an acquire until TCP gives up.
        .test_before_acquire(false)
        .after_connect(move |conn, _| {
            // The offset is digits and a sign, from `Zone`: safe to put in the text.
            let offset = zone.session_offset();
            Box::pin(async move {
                conn.execute(sqlx::AssertSqlSafe(format!("SET time_zone = '{offset}'")))
                    .await
                    .map(|_| ())
            })
        })
        // A connection opened before the pool moved to another node is to the node it left.
        .before_acquire(move |conn, meta| {
            let fresh = !acquire_clock.predates_move(meta.age);
            Box::pin(async move {
                Ok(fresh
                    && matches!(
                        tokio::time::timeout(PING_TIMEOUT, conn.ping()).await,
                        Ok(Ok(()))
                    ))
            })
        })
        .after_release(move |_, meta| {
            let keep = !release_clock.predates_move(meta.age);
            Box::pin(async move { Ok(keep) })
        })
        .connect_lazy_with(connect_options(db));
    let nodes = db
        .hosts
        .iter()
        .map(|h| (h.clone(), node_options(db, h)))
        .collect();
    Arc::new(Nodes::new(pool, nodes, clock))
}

/// Runs the migrations (idempotent: `device_main` is created only where it is absent).
pub async fn migrate(pool: &MySqlPool) -> Result<(), sqlx::migrate::MigrateError> {
    MIGRATOR.run(pool).await
}

/// Checks that the database answers.
pub async fn ping(pool: &MySqlPool) -> Result<(), sqlx::Error> {
    pool.execute("SELECT 1").await.map(|_| ())
}
