//! The connection pool: options from the settings (TLS, the session's time zone), the
//! migrations, and the check that the database answers.

use sqlx::Executor;
use sqlx::mysql::{MySqlConnectOptions, MySqlPool, MySqlPoolOptions, MySqlSslMode};

use crate::config::{DbSettings, DbSslMode};

/// The migrations in `migrations/`, compiled in.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// Connection options for the settings. The session's `time_zone` is left to [`pool`], which
/// sets it on each new connection (sqlx would fix one offset for the life of the options).
pub fn connect_options(db: &DbSettings) -> MySqlConnectOptions {
    let mut options = MySqlConnectOptions::new()
        .host(&db.host)
        .port(db.port)
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

/// A pool like the seed's: `pool_min` kept, up to `pool_max`, recycled, pinged before use.
/// It connects lazily, so the service starts while the database is down.
///
/// Each session's `time_zone` is the database zone's offset (`DB_TIMEZONE`), so that `NOW()`
/// and `ON UPDATE CURRENT_TIMESTAMP` columns agree with what the service writes. For a zone
/// with daylight saving, a connection keeps the offset in force when it connected, until it is
/// recycled (`DB_POOL_RECYCLE_SECS`).
pub fn pool(db: &DbSettings) -> MySqlPool {
    let zone = db.zone.clone();
    MySqlPoolOptions::new()
        .min_connections(db.pool_min)
        .max_connections(db.pool_max)
        .max_lifetime(db.recycle)
        .acquire_timeout(db.connect_timeout)
        .test_before_acquire(true)
        .after_connect(move |conn, _| {
            // The offset is digits and a sign, from `Zone`: safe to put in the text.
            let offset = zone.session_offset();
            Box::pin(async move {
                conn.execute(sqlx::AssertSqlSafe(format!("SET time_zone = '{offset}'")))
                    .await
                    .map(|_| ())
            })
        })
        .connect_lazy_with(connect_options(db))
}

/// Runs the migrations (idempotent: `device_main` is created only where it is absent).
pub async fn migrate(pool: &MySqlPool) -> Result<(), sqlx::migrate::MigrateError> {
    MIGRATOR.run(pool).await
}

/// Checks that the database answers.
pub async fn ping(pool: &MySqlPool) -> Result<(), sqlx::Error> {
    pool.execute("SELECT 1").await.map(|_| ())
}
