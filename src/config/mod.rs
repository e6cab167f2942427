//! Settings from the environment (and a `.env` file), validated before any I/O.
//!
//! The seed's names (`MQTT_BROKER`, `DB_HOST`, …) keep their meaning; every added name has a
//! default, listed in `.env.example`. A wrong value stops the service with one line that names
//! the variable. Passwords are [`Secret`]s: they cannot be printed by accident.

use std::collections::HashMap;
use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use crate::intake::payload::{RenameScope, Renames, Rules};
use crate::intake::timestamp::TimeRules;
use crate::intake::topic::TopicLayout;

mod definition;
pub mod hosts;

use crate::intake::zone::Zone;
use definition::DbArgs;
pub use definition::{Definition, Entry, help_text, markdown_table, reference};
pub use hosts::Endpoint;

/// A value that must never reach a log line: `Debug` and `Display` print `***`.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret value.
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The secret itself, for the one place that needs it (a connection).
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.0.is_empty() { "\"\"" } else { "***" })
    }
}

/// A configuration problem, naming the variable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("configuration error: {var}: {problem}")]
pub struct ConfigError {
    /// The environment variable at fault.
    pub var: String,
    /// What is wrong with it (never its value when it is a secret).
    pub problem: String,
}

/// Broker connection and subscription settings.
#[derive(Debug, Clone, PartialEq)]
pub struct MqttSettings {
    /// `MQTT_BROKER` (with `MQTT_PORT` where a host names no port): the broker, or the nodes of
    /// a broker cluster, tried in turn.
    pub brokers: Vec<Endpoint>,
    /// `MQTT_USERNAME`: empty means no credentials are sent.
    pub username: String,
    /// `MQTT_PASSWORD`.
    pub password: Secret,
    /// `MQTT_CLIENT_ID`: stable, because the persistent session is keyed on it.
    pub client_id: String,
    /// `MQTT_QOS`: subscription QoS, 0, 1 or 2.
    pub qos: u8,
    /// `MQTT_CLEAN_SESSION`: `false` keeps a persistent session (messages queue while we are away).
    pub clean_session: bool,
    /// `MQTT_KEEPALIVE_SECS`.
    pub keepalive: Duration,
    /// `MQTT_TOPIC_PREFIX`: topics are `PREFIX/{uuid}/data|status|heartbeat`.
    pub topics: TopicLayout,
    /// `MQTT_RECONNECT_MIN_SECS`: first wait after a failed connection; doubles each time.
    pub reconnect_min: Duration,
    /// `MQTT_RECONNECT_MAX_SECS`: longest wait between connection attempts.
    pub reconnect_max: Duration,
    /// `MQTT_SHARED_GROUP`: subscribe as a member of this shared-subscription group
    /// (`$share/<group>/…`), so several instances split the messages; `None` (empty) for a plain
    /// subscription.
    pub shared_group: Option<String>,
    /// `MQTT_TLS` and its files: `None` for plain TCP.
    pub tls: Option<MqttTls>,
    /// `MQTT_PROTOCOL`: the protocol version spoken to the broker.
    pub protocol: MqttProtocol,
    /// `MQTT_SESSION_EXPIRY_SECS` (MQTT 5 only): how long the broker keeps the persistent
    /// session, with its subscriptions and queued messages, after the connection ends. MQTT 5
    /// ends a session with its connection unless told otherwise, so without it nothing would
    /// queue while the service restarts.
    pub session_expiry: Duration,
}

/// The MQTT protocol version (`MQTT_PROTOCOL`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MqttProtocol {
    /// MQTT 3.1.1 (protocol level 4), the default.
    V311,
    /// MQTT 5.
    V5,
}

impl MqttProtocol {
    /// Parses `MQTT_PROTOCOL`: `3.1.1` (also `3`, `4`, `311`) or `5`.
    pub fn parse(raw: &str) -> Option<Self> {
        match raw.trim() {
            "" | "3.1.1" | "311" | "3" | "4" => Some(Self::V311),
            "5" => Some(Self::V5),
            _ => None,
        }
    }
}

impl fmt::Display for MqttProtocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::V311 => "3.1.1",
            Self::V5 => "5",
        })
    }
}

/// TLS to the broker (rustls).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MqttTls {
    /// `MQTT_TLS_CA_FILE`: PEM file of the CA(s) to trust; `None`: the system's roots.
    pub ca_file: Option<PathBuf>,
    /// `MQTT_TLS_CERT_FILE` and `MQTT_TLS_KEY_FILE`: a client certificate, if the broker asks.
    pub client_cert: Option<(PathBuf, PathBuf)>,
}

/// How the database connection uses TLS (`DB_SSL_MODE`), as MySQL clients name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DbSslMode {
    /// Plain TCP.
    Disabled,
    /// TLS when the server offers it, without checking its certificate (the MySQL default).
    Preferred,
    /// TLS or nothing, without checking the certificate.
    Required,
    /// TLS with the certificate checked against `DB_SSL_CA_FILE`.
    VerifyCa,
    /// As `VerifyCa`, and the certificate must name `DB_HOST`.
    VerifyIdentity,
}

/// Database connection and pool settings.
#[derive(Debug, Clone, PartialEq)]
pub struct DbSettings {
    /// `DB_HOST` (with `DB_PORT` where a host names no port): the server, or the nodes of a
    /// cluster; the first is used until it fails.
    pub hosts: Vec<Endpoint>,
    /// `DB_NAME`.
    pub name: String,
    /// `DB_USER`.
    pub user: String,
    /// `DB_PASSWORD`.
    pub password: Secret,
    /// `DB_POOL_MIN`: connections kept open (the seed's pool size, 5).
    pub pool_min: u32,
    /// `DB_POOL_MAX`: most connections at once (the seed's 5 + 10 overflow).
    pub pool_max: u32,
    /// `DB_POOL_RECYCLE_SECS`: a connection older than this is replaced (keep it below the
    /// server's `wait_timeout`).
    pub recycle: Duration,
    /// `DB_CONNECT_TIMEOUT_SECS`: how long to wait for a connection from the pool.
    pub connect_timeout: Duration,
    /// `DB_AUTO_MIGRATE`: run the migrations at start-up.
    pub auto_migrate: bool,
    /// `DB_RETRY_MAX_SECS`: longest wait between retries of a failed write.
    pub retry_max: Duration,
    /// `DB_SSL_MODE`.
    pub ssl_mode: DbSslMode,
    /// `DB_SSL_CA_FILE`: PEM file of the CA(s) that signed the server's certificate.
    pub ssl_ca_file: Option<PathBuf>,
    /// `DB_SSL_CERT_FILE` and `DB_SSL_KEY_FILE`: a client certificate.
    pub ssl_client_cert: Option<(PathBuf, PathBuf)>,
    /// `DB_TIMEZONE`: the zone DATETIME columns are written in (and the session's
    /// `time_zone`); Beijing time by default, as CodeHubot's backend reads them.
    pub zone: Zone,
    /// In a shadow run, the live database (`DB_NAME`) whose tables `name` copies; `name` is then
    /// `SHADOW_DATABASE`, where everything is written.
    pub shadow_of: Option<String>,
}

/// How validated messages flow into the database.
#[derive(Debug, Clone, PartialEq)]
pub struct IngestSettings {
    /// `INGEST_QUEUE_CAPACITY`: parsed updates waiting for the writers (shared out between
    /// them); messages folded into a waiting update do not count.
    pub queue_capacity: usize,
    /// `INGEST_WRITERS`: parallel writers, each with its own connection and its own devices.
    pub writers: usize,
    /// `INGEST_BATCH_MAX_MESSAGES`: most updates in one transaction (folded messages count
    /// once).
    pub batch_max_messages: usize,
    /// `INGEST_BATCH_MAX_WAIT_MS`: how long a batch waits to fill before it is written.
    pub batch_max_wait: Duration,
    /// `INGEST_REGISTER_UNKNOWN_DEVICES`: create a `device_main` row for an unknown uuid
    /// instead of rejecting its messages.
    pub register_unknown_devices: bool,
    /// `MQTT_MAX_PAYLOAD_BYTES` and `INGEST_SENSOR_RANGES`.
    pub rules: Rules,
    /// `SENSOR_RENAMES` applied when `device_sensors` is written (`SENSOR_RENAMES_IN`
    /// `device_sensors`, the default); empty when they apply on the way in.
    pub sensor_table_renames: Renames,
    /// `SHUTDOWN_TIMEOUT_SECS`: how long a stop may take to commit and acknowledge.
    pub shutdown_timeout: Duration,
}

/// Device presence: offline after silence.
#[derive(Debug, Clone, PartialEq)]
pub struct PresenceSettings {
    /// `PRESENCE_TIMEOUT_SECS`: a device that sent nothing for this long is set offline;
    /// zero turns the sweep off.
    pub timeout: Duration,
    /// `PRESENCE_SWEEP_SECS`: how often the sweep runs.
    pub sweep_interval: Duration,
}

/// Sensor history and kept rejects, both opt-in.
#[derive(Debug, Clone, PartialEq)]
pub struct KeepSettings {
    /// `HISTORY_ENABLED`: append every accepted reading to `device_history`.
    pub history: bool,
    /// `HISTORY_RETENTION_DAYS`: readings older than this are deleted; zero keeps them all.
    pub history_retention: Duration,
    /// `REJECTS_ENABLED`: keep rejected messages in `ingest_rejects`.
    pub rejects: bool,
    /// `REJECTS_MAX_PAYLOAD_BYTES`: how much of a rejected payload is kept.
    pub rejects_max_payload: usize,
    /// `REJECTS_KEEP`: most rejects kept.
    pub rejects_keep: u64,
    /// `REJECTS_RETENTION_DAYS`: rejects older than this are deleted.
    pub rejects_retention: Duration,
    /// `MAINTENANCE_INTERVAL_SECS`: how often old history and rejects are removed.
    pub maintenance_interval: Duration,
    /// `DEVICE_SENSORS_TABLE`: the table of one row per device and sensor (CodeHubot's
    /// `device_sensors`), written when it exists; `None` (empty) turns it off.
    pub device_sensors_table: Option<String>,
}

/// Which words the service's log uses for the lines operators grep for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogStyle {
    /// The service's own English lines.
    Default,
    /// The statistics block, unknown devices, bad sensor names and JSON errors also in the
    /// words of CodeHubot's Python service (`📊 MQTT服务统计信息`, `⚠️ 设备不存在: …`).
    Codehubot,
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// journald when started by systemd, else text.
    Auto,
    /// Human-readable lines on stderr.
    Text,
    /// One JSON object per line on stderr.
    Json,
    /// Native journald fields (falls back to text when there is no journal).
    Journald,
}

/// Logging and statistics settings.
#[derive(Debug, Clone, PartialEq)]
pub struct LogSettings {
    /// `LOG_LEVEL`: a level or a tracing filter (`info,mqtt_ingest=debug`).
    pub level: String,
    /// `LOG_FORMAT`.
    pub format: LogFormat,
    /// `STATS_INTERVAL_SECS`: how often the statistics block is logged; 0 turns it off.
    pub stats_interval: Duration,
    /// `LOG_WARN_INTERVAL_SECS`: a repeated warning (same device, same reason) is logged once
    /// per this interval; 0 logs every one.
    pub warn_interval: Duration,
    /// `LOG_DIR`: also write `mqtt-service.log` and `mqtt-service-error.log` (rotated daily)
    /// here; `None` (empty) turns the files off.
    pub dir: Option<std::path::PathBuf>,
    /// `LOG_KEEP_DAYS`: how many daily files of each kind are kept.
    pub keep_days: usize,
    /// `LOG_STYLE`.
    pub style: LogStyle,
}

/// The operations side: the HTTP listener and the health checks behind it.
#[derive(Debug, Clone, PartialEq)]
pub struct OpsSettings {
    /// `HTTP_LISTEN`: address of the `/metrics`, `/healthz`, `/readyz` listener; `None` (empty)
    /// turns it off.
    pub http_listen: Option<std::net::SocketAddr>,
    /// `STATUS_SHOW_REJECTS`: the status page shows kept rejects on any listener address.
    pub status_show_rejects: bool,
    /// `HEALTH_DB_CHECK_SECS`: how often the database is checked (and devices online counted)
    /// for readiness, metrics and the watchdog.
    pub db_check_interval: Duration,
}

/// Everything the service is configured with.
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    /// Broker side.
    pub mqtt: MqttSettings,
    /// Database side.
    pub db: DbSettings,
    /// The path between them.
    pub ingest: IngestSettings,
    /// Logs and statistics.
    pub log: LogSettings,
    /// Offline after silence.
    pub presence: PresenceSettings,
    /// History and kept rejects.
    pub keep: KeepSettings,
    /// Metrics, health and the service manager.
    pub ops: OpsSettings,
    /// For each broker setting that has other names, the name its value came from
    /// (`"default"` when none was set), for `--check-config`.
    pub origins: Vec<(&'static str, &'static str)>,
}

/// Broker settings and the other names real `.env` files give them: the Python service's
/// `MQTT_SERVICE_*` (at the seed's version) and the backend's `MQTT_BROKER_HOST` /
/// `MQTT_BROKER_PORT` (the Python service's later versions).
pub const ALIASES: [(&str, &[&str]); 4] = [
    ("MQTT_BROKER", &["MQTT_SERVICE_BROKER", "MQTT_BROKER_HOST"]),
    ("MQTT_PORT", &["MQTT_SERVICE_PORT", "MQTT_BROKER_PORT"]),
    ("MQTT_USERNAME", &["MQTT_SERVICE_USERNAME"]),
    ("MQTT_PASSWORD", &["MQTT_SERVICE_PASSWORD"]),
];

/// An aliased setting as resolved: its name, its value if any name set it, and the name the
/// value came from (`"default"` for none).
type Resolved = (&'static str, Option<String>, &'static str);

/// The value of each aliased setting and the name it came from. An empty value counts as not
/// set (example files leave `MQTT_USERNAME=` empty beside the name actually used); two names
/// with different values are an error naming both, without the values (one may be a password).
fn resolve_aliases(lookup: &dyn Fn(&str) -> Option<String>) -> Result<Vec<Resolved>, ConfigError> {
    let mut out = Vec::with_capacity(ALIASES.len());
    for (canonical, aliases) in ALIASES {
        let secret = canonical.ends_with("PASSWORD");
        let set: Vec<(&'static str, String)> = std::iter::once(canonical)
            .chain(aliases.iter().copied())
            .filter_map(|name| lookup(name).map(|v| (name, v)))
            .collect();
        let meaningful = |v: &str| {
            if secret {
                !v.is_empty()
            } else {
                !v.trim().is_empty()
            }
        };
        let same = |a: &str, b: &str| if secret { a == b } else { a.trim() == b.trim() };
        let mut chosen: Option<&(&'static str, String)> = None;
        for candidate in set.iter().filter(|(_, v)| meaningful(v)) {
            match chosen {
                None => chosen = Some(candidate),
                Some(first) if !same(&first.1, &candidate.1) => {
                    return Err(ConfigError {
                        var: first.0.into(),
                        problem: format!(
                            "{} is also set, to a different value; they name one setting: keep one",
                            candidate.0
                        ),
                    });
                }
                Some(_) => {}
            }
        }
        let (origin, value) = match chosen.or(set.first()) {
            Some((name, value)) => (*name, Some(value.clone())),
            None => ("default", None),
        };
        out.push((canonical, value, origin));
    }
    Ok(out)
}

/// A file named by `var` must exist and be readable.
fn readable(var: &'static str, path: Option<PathBuf>) -> Result<Option<PathBuf>, ConfigError> {
    if let Some(p) = &path {
        std::fs::File::open(p).map_err(|e| ConfigError {
            var: var.into(),
            problem: format!("cannot read {:?}: {e}", p.display().to_string()),
        })?;
    }
    Ok(path)
}

/// A certificate and its key: both or neither.
fn cert_pair(
    (cert_var, cert): (&'static str, Option<PathBuf>),
    (key_var, key): (&'static str, Option<PathBuf>),
) -> Result<Option<(PathBuf, PathBuf)>, ConfigError> {
    match (readable(cert_var, cert)?, readable(key_var, key)?) {
        (Some(c), Some(k)) => Ok(Some((c, k))),
        (None, None) => Ok(None),
        (Some(_), None) => Err(ConfigError {
            var: key_var.into(),
            problem: format!("must be set when {cert_var} is"),
        }),
        (None, Some(_)) => Err(ConfigError {
            var: cert_var.into(),
            problem: format!("must be set when {key_var} is"),
        }),
    }
}

impl Settings {
    /// Reads the settings from the process environment (after `.env` was loaded into it).
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_lookup(&env_var)
    }

    /// Reads the settings from a map (tests, tools).
    pub fn from_map(map: &HashMap<String, String>) -> Result<Self, ConfigError> {
        Self::from_lookup(&|name| map.get(name).cloned())
    }

    /// Reads the settings through `lookup`, which returns a variable's value by name.
    pub fn from_lookup(lookup: &dyn Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let resolved = resolve_aliases(lookup)?;
        let with_aliases = |name: &str| match resolved.iter().find(|(c, _, _)| *c == name) {
            Some((_, value, _)) => value.clone(),
            None => lookup(name),
        };
        // An error in a value set under another name names that name.
        parse_group(&with_aliases)
            .and_then(|def| Self::build(def, &resolved))
            .map_err(|e| named_as_set(e, &resolved))
    }

    fn build(def: Definition, resolved: &[Resolved]) -> Result<Self, ConfigError> {
        let origins = resolved.iter().map(|(c, _, o)| (*c, *o)).collect();
        let Definition {
            mqtt: m,
            db: d,
            ingest: i,
            keep: k,
            ops: o,
        } = def;
        let secs = Duration::from_secs;
        const DAY: u64 = 86_400;
        if m.mqtt_reconnect_max_secs < m.mqtt_reconnect_min_secs {
            return Err(ConfigError {
                var: "MQTT_RECONNECT_MAX_SECS".into(),
                problem: "must not be below MQTT_RECONNECT_MIN_SECS".into(),
            });
        }
        let tls = if m.mqtt_tls {
            Some(MqttTls {
                ca_file: readable("MQTT_TLS_CA_FILE", m.mqtt_tls_ca_file)?,
                client_cert: cert_pair(
                    ("MQTT_TLS_CERT_FILE", m.mqtt_tls_cert_file),
                    ("MQTT_TLS_KEY_FILE", m.mqtt_tls_key_file),
                )?,
            })
        } else {
            None
        };
        let mqtt = MqttSettings {
            brokers: m.mqtt_broker.endpoints(m.mqtt_port),
            username: m.mqtt_username.unwrap_or_default(),
            password: m.mqtt_password.unwrap_or_default(),
            client_id: m.mqtt_client_id,
            qos: m.mqtt_qos,
            clean_session: m.mqtt_clean_session,
            keepalive: secs(m.mqtt_keepalive_secs),
            topics: m.mqtt_topic_prefix,
            reconnect_min: secs(m.mqtt_reconnect_min_secs),
            reconnect_max: secs(m.mqtt_reconnect_max_secs),
            tls,
            shared_group: m.mqtt_shared_group.filter(|g| !g.is_empty()),
            protocol: m.mqtt_protocol,
            // MQTT 5 carries it as a 32-bit number of seconds; 4294967295 means never.
            session_expiry: secs(m.mqtt_session_expiry_secs),
        };
        let db = db_settings(d)?;
        // A shadow run must see every message beside the live service (not share them out with
        // it) and must not take over its session.
        let mqtt = match db.shadow_of {
            Some(_) => MqttSettings {
                client_id: format!("{}-shadow", mqtt.client_id),
                shared_group: None,
                ..mqtt
            },
            None => mqtt,
        };
        let ingest = IngestSettings {
            queue_capacity: i.ingest_queue_capacity,
            writers: i.ingest_writers,
            batch_max_messages: i.ingest_batch_max_messages,
            batch_max_wait: Duration::from_millis(i.ingest_batch_max_wait_ms),
            register_unknown_devices: i.ingest_register_unknown_devices,
            rules: Rules {
                max_payload_bytes: m.mqtt_max_payload_bytes,
                sensor_ranges: i.ingest_sensor_ranges.unwrap_or_default(),
                time: TimeRules {
                    zone: db.zone.clone(),
                    max_clock_skew: secs(i.ingest_max_clock_skew_secs),
                },
                renames: match i.sensor_renames_in {
                    RenameScope::Everywhere => i.sensor_renames.clone(),
                    RenameScope::DeviceSensors => Renames::default(),
                },
            },
            sensor_table_renames: match i.sensor_renames_in {
                RenameScope::Everywhere => Renames::default(),
                RenameScope::DeviceSensors => i.sensor_renames,
            },
            shutdown_timeout: secs(i.shutdown_timeout_secs),
        };
        let log = LogSettings {
            level: o.log_level,
            format: o.log_format,
            stats_interval: secs(o.stats_interval_secs),
            warn_interval: secs(o.log_warn_interval_secs),
            dir: o.log_dir.filter(|d| !d.as_os_str().is_empty()),
            keep_days: o.log_keep_days,
            style: o.log_style,
        };
        let presence = PresenceSettings {
            timeout: secs(k.presence_timeout_secs),
            sweep_interval: secs(k.presence_sweep_secs),
        };
        let keep = KeepSettings {
            history: k.history_enabled,
            history_retention: secs(k.history_retention_days * DAY),
            rejects: k.rejects_enabled,
            rejects_max_payload: k.rejects_max_payload_bytes,
            rejects_keep: k.rejects_keep,
            rejects_retention: secs(k.rejects_retention_days * DAY),
            maintenance_interval: secs(k.maintenance_interval_secs),
            device_sensors_table: i.device_sensors_table.0,
        };
        let ops = OpsSettings {
            http_listen: o.http_listen.0,
            status_show_rejects: o.status_show_rejects,
            db_check_interval: secs(o.health_db_check_secs),
        };
        Ok(Settings {
            mqtt,
            db,
            ingest,
            log,
            presence,
            keep,
            ops,
            origins,
        })
    }
}

/// A variable of the process environment (after `.env` was loaded into it).
fn env_var(name: &str) -> Option<String> {
    std::env::var(name).ok()
}

/// What the `rejects` command needs, and all it reads: the database settings and whether
/// rejects are kept. The broker's settings are neither needed nor checked.
#[derive(Debug, Clone, PartialEq)]
pub struct RejectsSettings {
    /// The database.
    pub db: DbSettings,
    /// `REJECTS_ENABLED`.
    pub kept: bool,
}

impl RejectsSettings {
    /// Reads them from the process environment.
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_lookup(&env_var)
    }

    /// Reads them through `lookup`.
    pub fn from_lookup(lookup: &dyn Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let args: definition::RejectsArgs = parse_group(lookup)?;
        Ok(Self {
            db: db_settings(args.db)?,
            kept: args.keep.rejects_enabled,
        })
    }
}

/// The settings' parser, for clap's own consistency check in tests.
pub fn command_for_checks() -> clap::Command {
    definition::command::<Definition>()
}

/// Parses one group of the definition, the error naming the variable.
fn parse_group<A: clap::Args + clap::FromArgMatches>(
    lookup: &dyn Fn(&str) -> Option<String>,
) -> Result<A, ConfigError> {
    definition::parse(lookup).map_err(|(var, problem)| ConfigError { var, problem })
}

/// An error about a setting given under another name names that name.
fn named_as_set(mut e: ConfigError, resolved: &[Resolved]) -> ConfigError {
    if let Some((_, _, origin)) = resolved.iter().find(|(c, _, _)| *c == e.var.as_str())
        && *origin != "default"
    {
        e.var = (*origin).to_owned();
    }
    e
}

fn db_settings(d: DbArgs) -> Result<DbSettings, ConfigError> {
    if d.db_pool_max < d.db_pool_min {
        return Err(ConfigError {
            var: "DB_POOL_MAX".into(),
            problem: format!("must not be below DB_POOL_MIN ({})", d.db_pool_min),
        });
    }
    let ssl_ca_file = readable("DB_SSL_CA_FILE", d.db_ssl_ca_file)?;
    if matches!(
        d.db_ssl_mode,
        DbSslMode::VerifyCa | DbSslMode::VerifyIdentity
    ) && ssl_ca_file.is_none()
    {
        return Err(ConfigError {
            var: "DB_SSL_CA_FILE".into(),
            problem: "must be set for DB_SSL_MODE verify_ca or verify_identity".into(),
        });
    }
    let (name, shadow_of) = match d.shadow_database.0 {
        Some(shadow) if shadow == d.db_name => {
            return Err(ConfigError {
                var: "SHADOW_DATABASE".into(),
                problem: "must not be DB_NAME: a shadow run writes beside the live tables".into(),
            });
        }
        Some(shadow) => (shadow, Some(d.db_name)),
        None => (d.db_name, None),
    };
    Ok(DbSettings {
        hosts: d.db_host.endpoints(d.db_port),
        name,
        shadow_of,
        user: d.db_user,
        password: d.db_password.unwrap_or_default(),
        pool_min: d.db_pool_min,
        pool_max: d.db_pool_max,
        recycle: Duration::from_secs(d.db_pool_recycle_secs),
        connect_timeout: Duration::from_secs(d.db_connect_timeout_secs),
        auto_migrate: d.db_auto_migrate,
        retry_max: Duration::from_secs(d.db_retry_max_secs),
        ssl_mode: d.db_ssl_mode,
        ssl_ca_file,
        ssl_client_cert: cert_pair(
            ("DB_SSL_CERT_FILE", d.db_ssl_cert_file),
            ("DB_SSL_KEY_FILE", d.db_ssl_key_file),
        )?,
        zone: d.db_timezone,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::intake::payload::Renames;
    use hosts::list_text;

    fn settings(pairs: &[(&str, &str)]) -> Result<Settings, ConfigError> {
        let map = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Settings::from_map(&map)
    }

    #[test]
    fn defaults_match_the_seed() {
        let s = settings(&[]).unwrap();
        assert_eq!(list_text(&s.mqtt.brokers), "localhost:1883");
        assert_eq!(s.mqtt.qos, 1);
        assert!(!s.mqtt.clean_session);
        assert_eq!(s.mqtt.reconnect_min, Duration::from_secs(2));
        assert_eq!(s.mqtt.reconnect_max, Duration::from_secs(300));
        assert_eq!(s.db.name, "aiot_admin");
        assert_eq!((s.db.pool_min, s.db.pool_max), (5, 15));
        assert_eq!(s.db.recycle, Duration::from_secs(3600));
        assert_eq!(s.log.stats_interval, Duration::from_secs(300));
        assert_eq!(s.ingest.rules.max_payload_bytes, 256 * 1024);
        assert_eq!(s.ops.http_listen, Some("127.0.0.1:9464".parse().unwrap()));
        assert_eq!(s.ops.db_check_interval, Duration::from_secs(5));
    }

    #[test]
    fn a_shadow_run_writes_elsewhere_under_its_own_client_id() {
        let s = settings(&[]).unwrap();
        assert_eq!(s.db.shadow_of, None);
        let s = settings(&[
            ("SHADOW_DATABASE", "aiot_shadow"),
            ("MQTT_CLIENT_ID", "ingest-1"),
            ("MQTT_SHARED_GROUP", "g"),
        ])
        .unwrap();
        assert_eq!(
            (s.db.name.as_str(), s.db.shadow_of.as_deref()),
            ("aiot_shadow", Some("aiot_admin"))
        );
        assert_eq!(s.mqtt.client_id, "ingest-1-shadow");
        assert_eq!(s.mqtt.shared_group, None);
        let e = settings(&[("SHADOW_DATABASE", "aiot_admin")]).unwrap_err();
        assert_eq!(e.var, "SHADOW_DATABASE");
        let e = settings(&[("SHADOW_DATABASE", "x`; DROP")]).unwrap_err();
        assert_eq!(e.var, "SHADOW_DATABASE");
        assert_eq!(
            settings(&[("SHADOW_DATABASE", "")]).unwrap().db.shadow_of,
            None
        );
    }

    #[test]
    fn http_listener_can_be_turned_off_or_moved() {
        assert_eq!(
            settings(&[("HTTP_LISTEN", "")]).unwrap().ops.http_listen,
            None
        );
        let s = settings(&[("HTTP_LISTEN", "[::]:9100")]).unwrap();
        assert_eq!(s.ops.http_listen, Some("[::]:9100".parse().unwrap()));
        let e = settings(&[("HTTP_LISTEN", "localhost:9464")]).unwrap_err();
        assert_eq!(e.var, "HTTP_LISTEN");
    }

    #[test]
    fn empty_passwords_and_username_are_valid() {
        let s = settings(&[
            ("MQTT_USERNAME", ""),
            ("MQTT_PASSWORD", ""),
            ("DB_PASSWORD", ""),
        ])
        .unwrap();
        assert!(s.mqtt.username.is_empty());
        assert_eq!(s.db.password.expose(), "");
    }

    #[test]
    fn errors_name_the_variable() {
        for (var, value) in [
            ("MQTT_PORT", "abc"),
            ("MQTT_PORT", "70000"),
            ("MQTT_PORT", "0"),
            ("MQTT_QOS", "3"),
            ("MQTT_BROKER", " "),
            ("MQTT_CLEAN_SESSION", "maybe"),
            ("MQTT_TOPIC_PREFIX", "a/+/b"),
            ("MQTT_CLIENT_ID", ""),
            ("DB_PORT", "-1"),
            ("DB_NAME", ""),
            ("DB_POOL_MAX", "0"),
            ("INGEST_SENSOR_RANGES", "humidity:100..0"),
            ("LOG_FORMAT", "xml"),
            ("LOG_LEVEL", "very[loud"),
            ("MQTT_KEEPALIVE_SECS", "1"),
            ("HEALTH_DB_CHECK_SECS", "0"),
            ("LOG_KEEP_DAYS", "0"),
            ("MQTT_SHARED_GROUP", "a/b"),
            ("MQTT_PROTOCOL", "6"),
            ("MQTT_PROTOCOL", "3.1"),
            ("MQTT_SESSION_EXPIRY_SECS", "4294967296"),
            ("MQTT_SESSION_EXPIRY_SECS", "-1"),
        ] {
            let e = settings(&[(var, value)]).unwrap_err();
            assert_eq!(e.var, var, "{var}={value}: {e}");
            assert!(
                e.to_string()
                    .starts_with(&format!("configuration error: {var}: "))
            );
        }
        let e = settings(&[("DB_POOL_MIN", "20"), ("DB_POOL_MAX", "10")]).unwrap_err();
        assert_eq!(e.var, "DB_POOL_MAX");
    }

    #[test]
    fn an_empty_number_or_switch_is_the_default() {
        let s = settings(&[
            ("MQTT_PORT", ""),
            ("MQTT_TLS", " "),
            ("DB_POOL_MAX", ""),
            ("LOG_DIR", ""),
            ("MQTT_SHARED_GROUP", ""),
        ])
        .unwrap();
        assert_eq!(s.mqtt.brokers[0].port, 1883);
        assert_eq!(s.mqtt.tls, None);
        assert_eq!(s.db.pool_max, 15);
        assert_eq!(s.log.dir, None);
        assert_eq!(s.mqtt.shared_group, None);
        // Passwords are taken as they are.
        let s = settings(&[("DB_PASSWORD", " pw ")]).unwrap();
        assert_eq!(s.db.password.expose(), " pw ");
    }

    #[test]
    fn the_database_group_is_read_alone() {
        let map: HashMap<String, String> = [("DB_NAME", "x"), ("MQTT_PORT", "not a port")]
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
        let db = RejectsSettings::from_lookup(&|n| map.get(n).cloned())
            .unwrap()
            .db;
        assert_eq!(db.name, "x");
        assert_eq!(Settings::from_map(&map).unwrap_err().var, "MQTT_PORT");
        let map: HashMap<String, String> = [("DB_PORT".to_owned(), "x".to_owned())].into();
        assert_eq!(
            RejectsSettings::from_lookup(&|n| map.get(n).cloned())
                .unwrap_err()
                .to_string(),
            "configuration error: DB_PORT: must be a whole number from 1 to 65535, got \"x\""
        );
    }

    #[test]
    fn secrets_never_print() {
        let s = settings(&[("DB_PASSWORD", "hunter2"), ("MQTT_PASSWORD", "s3cret")]).unwrap();
        let shown = format!("{s:?}");
        assert!(
            !shown.contains("hunter2") && !shown.contains("s3cret"),
            "{shown}"
        );
        assert_eq!(s.db.password.expose(), "hunter2");
    }

    #[test]
    fn presence_history_and_rejects() {
        let s = settings(&[]).unwrap();
        assert_eq!(s.presence.timeout, Duration::from_secs(90));
        assert!(!s.keep.history && !s.keep.rejects);
        assert_eq!(s.keep.history_retention, Duration::from_secs(30 * 86_400));
        let s = settings(&[
            ("PRESENCE_TIMEOUT_SECS", "0"),
            ("HISTORY_ENABLED", "true"),
            ("HISTORY_RETENTION_DAYS", "0"),
            ("REJECTS_ENABLED", "1"),
        ])
        .unwrap();
        assert!(s.presence.timeout.is_zero());
        assert!(s.keep.history && s.keep.rejects);
        assert!(s.keep.history_retention.is_zero());
        assert_eq!(
            settings(&[("REJECTS_MAX_PAYLOAD_BYTES", "100000")])
                .unwrap_err()
                .var,
            "REJECTS_MAX_PAYLOAD_BYTES"
        );
    }

    #[test]
    fn tls_settings_are_checked() {
        let s = settings(&[]).unwrap();
        assert_eq!(s.mqtt.tls, None);
        assert_eq!(s.db.ssl_mode, DbSslMode::Preferred);
        let e = settings(&[
            ("MQTT_TLS", "true"),
            ("MQTT_TLS_CA_FILE", "/no/such/ca.pem"),
        ])
        .unwrap_err();
        assert_eq!(e.var, "MQTT_TLS_CA_FILE");
        let e = settings(&[("MQTT_TLS", "true"), ("MQTT_TLS_CERT_FILE", "/dev/null")]).unwrap_err();
        assert_eq!(e.var, "MQTT_TLS_KEY_FILE");
        let e = settings(&[("DB_SSL_MODE", "verify_ca")]).unwrap_err();
        assert_eq!(e.var, "DB_SSL_CA_FILE");
        let e = settings(&[("DB_SSL_MODE", "sometimes")]).unwrap_err();
        assert_eq!(e.var, "DB_SSL_MODE");
        let s = settings(&[("MQTT_TLS", "yes")]).unwrap();
        assert_eq!(
            s.mqtt.tls,
            Some(MqttTls {
                ca_file: None,
                client_cert: None
            })
        );
    }

    #[test]
    fn protocol_versions() {
        let s = settings(&[]).unwrap();
        assert_eq!(s.mqtt.protocol, MqttProtocol::V311);
        assert_eq!(s.mqtt.session_expiry, Duration::from_secs(86_400));
        for raw in ["3.1.1", "3", "4", "311", " 311 "] {
            let s = settings(&[("MQTT_PROTOCOL", raw)]).unwrap();
            assert_eq!(s.mqtt.protocol, MqttProtocol::V311, "{raw:?}");
        }
        let s = settings(&[("MQTT_PROTOCOL", "5"), ("MQTT_SESSION_EXPIRY_SECS", "0")]).unwrap();
        assert_eq!(s.mqtt.protocol, MqttProtocol::V5);
        assert!(s.mqtt.session_expiry.is_zero());
        let s = settings(&[("MQTT_SESSION_EXPIRY_SECS", "4294967295")]).unwrap();
        assert_eq!(
            s.mqtt.session_expiry,
            Duration::from_secs(u64::from(u32::MAX))
        );
        assert_eq!(MqttProtocol::V5.to_string(), "5");
    }

    #[test]
    fn booleans_and_ranges() {
        let s = settings(&[
            ("DB_AUTO_MIGRATE", "off"),
            ("INGEST_REGISTER_UNKNOWN_DEVICES", "YES"),
            ("INGEST_SENSOR_RANGES", "humidity:0..100"),
        ])
        .unwrap();
        assert!(!s.db.auto_migrate);
        assert!(s.ingest.register_unknown_devices);
        assert_eq!(s.ingest.rules.sensor_ranges["humidity"], 0.0..=100.0);
    }

    #[test]
    fn the_python_services_broker_names_are_read() {
        let s = settings(&[
            ("MQTT_SERVICE_BROKER", "mosquitto"),
            ("MQTT_SERVICE_PORT", "1884"),
            ("MQTT_SERVICE_USERNAME", "svc"),
            ("MQTT_SERVICE_PASSWORD", "pw"),
        ])
        .unwrap();
        assert_eq!(list_text(&s.mqtt.brokers), "mosquitto:1884");
        assert_eq!(
            (s.mqtt.username.as_str(), s.mqtt.password.expose()),
            ("svc", "pw")
        );
        assert_eq!(
            s.origins,
            [
                ("MQTT_BROKER", "MQTT_SERVICE_BROKER"),
                ("MQTT_PORT", "MQTT_SERVICE_PORT"),
                ("MQTT_USERNAME", "MQTT_SERVICE_USERNAME"),
                ("MQTT_PASSWORD", "MQTT_SERVICE_PASSWORD"),
            ]
        );
        // The backend's names, as the Python service's later versions read them; an empty
        // MQTT_USERNAME= beside them, as the example files have, is no conflict.
        let s = settings(&[
            ("MQTT_BROKER_HOST", "mqtt"),
            ("MQTT_BROKER_PORT", "1885"),
            ("MQTT_USERNAME", ""),
            ("MQTT_SERVICE_USERNAME", ""),
        ])
        .unwrap();
        assert_eq!(list_text(&s.mqtt.brokers), "mqtt:1885");
        assert_eq!(s.origins[0], ("MQTT_BROKER", "MQTT_BROKER_HOST"));
        assert_eq!(s.origins[2], ("MQTT_USERNAME", "MQTT_USERNAME"));
        assert_eq!(
            settings(&[]).unwrap().origins[0],
            ("MQTT_BROKER", "default")
        );
        // The same value under two names is fine.
        let s = settings(&[("MQTT_BROKER", "b"), ("MQTT_BROKER_HOST", " b ")]).unwrap();
        assert_eq!(s.mqtt.brokers[0].host, "b");
        // A wrong value under another name still names a variable.
        assert_eq!(
            settings(&[("MQTT_SERVICE_PORT", "x")]).unwrap_err().var,
            "MQTT_SERVICE_PORT"
        );
        assert_eq!(
            settings(&[("MQTT_BROKER_HOST", " ")]).unwrap_err().var,
            "MQTT_BROKER_HOST"
        );
    }

    #[test]
    fn two_names_with_different_values_stop_the_start() {
        let e = settings(&[("MQTT_BROKER", "a"), ("MQTT_BROKER_HOST", "b")]).unwrap_err();
        assert_eq!(
            e.to_string(),
            "configuration error: MQTT_BROKER: MQTT_BROKER_HOST is also set, to a different value; they name one setting: keep one"
        );
        let e = settings(&[
            ("MQTT_SERVICE_PASSWORD", "first-secret"),
            ("MQTT_PASSWORD", "second-secret"),
        ])
        .unwrap_err();
        assert_eq!(e.var, "MQTT_PASSWORD");
        assert!(e.to_string().contains("MQTT_SERVICE_PASSWORD"));
        assert!(!e.to_string().contains("secret"), "{e}");
        let e =
            settings(&[("MQTT_SERVICE_PORT", "1883"), ("MQTT_BROKER_PORT", "1884")]).unwrap_err();
        assert_eq!(e.var, "MQTT_SERVICE_PORT");
        assert!(e.to_string().contains("MQTT_BROKER_PORT"));
    }

    #[test]
    fn database_zone_clock_skew_renames_and_sensor_table() {
        let s = settings(&[]).unwrap();
        assert_eq!(s.db.zone, Zone::default());
        assert_eq!(s.db.zone.to_string(), "Asia/Shanghai");
        assert_eq!(s.ingest.rules.time.zone, s.db.zone);
        assert_eq!(s.ingest.rules.time.max_clock_skew, Duration::from_secs(300));
        // The renames apply to device_sensors only: the firmware's names reach last_report_data.
        assert_eq!(s.ingest.rules.renames, Renames::default());
        assert_eq!(s.ingest.sensor_table_renames, Renames::codehubot());
        assert_eq!(
            s.keep.device_sensors_table.as_deref(),
            Some("device_sensors")
        );
        let everywhere = settings(&[("SENSOR_RENAMES_IN", "everywhere")]).unwrap();
        assert_eq!(everywhere.ingest.rules.renames, Renames::codehubot());
        assert_eq!(everywhere.ingest.sensor_table_renames, Renames::default());
        assert_eq!(
            settings(&[("SENSOR_RENAMES_IN", "both")]).unwrap_err().var,
            "SENSOR_RENAMES_IN"
        );
        assert_eq!(s.log.style, LogStyle::Default);
        let s = settings(&[
            ("DB_TIMEZONE", "UTC"),
            ("INGEST_MAX_CLOCK_SKEW_SECS", "0"),
            ("SENSOR_RENAMES", ""),
            ("DEVICE_SENSORS_TABLE", ""),
            ("LOG_STYLE", "CodeHubot"),
        ])
        .unwrap();
        assert_eq!(s.db.zone, Zone::utc());
        assert_eq!(s.ingest.rules.time.zone, Zone::utc());
        assert!(s.ingest.rules.time.max_clock_skew.is_zero());
        assert_eq!(s.ingest.rules.renames, Renames::default());
        assert_eq!(s.ingest.sensor_table_renames, Renames::default());
        assert_eq!(s.keep.device_sensors_table, None);
        assert_eq!(s.log.style, LogStyle::Codehubot);
        for (var, value) in [
            ("DB_TIMEZONE", "Beijing"),
            ("DB_TIMEZONE", "+25:00"),
            ("SENSOR_RENAMES", "RAIN_SENSOR:is_raining"),
            ("SENSOR_RENAMES", "x=Rain"),
            ("DEVICE_SENSORS_TABLE", "a`b"),
            ("DEVICE_SENSORS_TABLE", "db.table"),
            ("LOG_STYLE", "python"),
            ("INGEST_MAX_CLOCK_SKEW_SECS", "-1"),
        ] {
            let e = settings(&[(var, value)]).unwrap_err();
            assert_eq!(e.var, var, "{var}={value}: {e}");
        }
    }
}
