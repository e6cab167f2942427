//! Every setting, defined once with clap: its variable, default, range, parser and meaning.
//!
//! The same definition parses the values, fills `mqtt-ingest run --help`, and generates the
//! table in `docs/configuration.md` (a test keeps that table and `.env.example` in step with
//! it). Values come from the environment and `.env`, not from the command line: the service
//! turns the variables it finds into this parser's `--long=value` arguments
//! ([`super::Settings::from_lookup`]), because an operator's `.env` and systemd's
//! `EnvironmentFile` are where settings live, and because clap alone reads an empty variable as
//! an empty value while an empty `MQTT_PORT=` in an example file means "the default".

use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;

use clap::{ArgAction, Args, Command, FromArgMatches};

use super::hosts::HostList;
use super::{DbSslMode, LogFormat, LogStyle, MqttProtocol, Secret};
use crate::intake::payload::{RenameScope, Renames, SensorRanges, parse_sensor_ranges};
use crate::intake::topic::TopicLayout;
use crate::intake::zone::Zone;

/// A setting that an empty value turns off (`HTTP_LISTEN=`), though its default is on.
#[derive(Debug, Clone, PartialEq)]
pub struct Off<T>(pub Option<T>);

/// A whole number from `min` to `max`.
fn whole<T>(min: T, max: T) -> impl Fn(&str) -> Result<T, String> + Clone + Send + Sync + 'static
where
    T: FromStr + PartialOrd + std::fmt::Display + Copy + Send + Sync + 'static,
{
    move |raw| {
        let bad = || format!("must be a whole number from {min} to {max}, got {raw:?}");
        let v: T = raw.parse().map_err(|_| bad())?;
        if v < min || v > max {
            return Err(bad());
        }
        Ok(v)
    }
}

/// `true`/`false`, and the words systemd and shells also use for them.
fn switch(raw: &str) -> Result<bool, String> {
    match raw.to_ascii_lowercase().as_str() {
        "1" | "true" | "yes" | "on" => Ok(true),
        "0" | "false" | "no" | "off" => Ok(false),
        _ => Err(format!("must be true or false, got {raw:?}")),
    }
}

fn non_empty(raw: &str) -> Result<String, String> {
    if raw.is_empty() {
        return Err("must not be empty".into());
    }
    Ok(raw.to_owned())
}

fn secret(raw: &str) -> Result<Secret, String> {
    Ok(Secret::new(raw))
}

fn client_id(raw: &str) -> Result<String, String> {
    let id = non_empty(raw)?;
    if id.contains(['+', '#', '/']) || id.len() > 65_535 {
        return Err("must not contain '+', '#' or '/'".into());
    }
    Ok(id)
}

fn topic_prefix(raw: &str) -> Result<TopicLayout, String> {
    TopicLayout::new(raw)
}

fn shared_group(raw: &str) -> Result<String, String> {
    if raw.contains(['+', '#', '/', '\0']) {
        return Err("must not contain '/', '+', '#' or NUL".into());
    }
    Ok(raw.to_owned())
}

fn protocol(raw: &str) -> Result<MqttProtocol, String> {
    MqttProtocol::parse(raw)
        .ok_or_else(|| format!("must be 3.1.1 (or 3, 4, 311) or 5, got {raw:?}"))
}

fn zone(raw: &str) -> Result<Zone, String> {
    raw.parse()
}

fn ssl_mode(raw: &str) -> Result<DbSslMode, String> {
    match raw.to_ascii_lowercase().as_str() {
        "disabled" => Ok(DbSslMode::Disabled),
        "preferred" => Ok(DbSslMode::Preferred),
        "required" => Ok(DbSslMode::Required),
        "verify_ca" => Ok(DbSslMode::VerifyCa),
        "verify_identity" => Ok(DbSslMode::VerifyIdentity),
        other => Err(format!(
            "must be disabled, preferred, required, verify_ca or verify_identity, got {other:?}"
        )),
    }
}

fn sensor_ranges(raw: &str) -> Result<SensorRanges, String> {
    parse_sensor_ranges(raw)
}

fn renames(raw: &str) -> Result<Renames, String> {
    Renames::parse(raw)
}

fn table_name(raw: &str) -> Result<Off<String>, String> {
    if raw.len() > 64
        || !raw
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'$'))
    {
        return Err(format!(
            "must be a table name of up to 64 of [A-Za-z0-9_$], or empty for off, got {raw:?}"
        ));
    }
    Ok(Off(Some(raw.to_owned()).filter(|t| !t.is_empty())))
}

fn database_name(raw: &str) -> Result<Off<String>, String> {
    table_name(raw).map_err(|_| {
        format!(
            "must be a database name of up to 64 of [A-Za-z0-9_$], or empty for off, got {raw:?}"
        )
    })
}

fn log_level(raw: &str) -> Result<String, String> {
    let level = non_empty(raw)?;
    tracing_subscriber::EnvFilter::try_new(&level)
        .map_err(|e| format!("is not a level or filter ({e})"))?;
    Ok(level)
}

fn log_format(raw: &str) -> Result<LogFormat, String> {
    match raw.to_ascii_lowercase().as_str() {
        "auto" => Ok(LogFormat::Auto),
        "text" => Ok(LogFormat::Text),
        "json" => Ok(LogFormat::Json),
        "journald" => Ok(LogFormat::Journald),
        other => Err(format!(
            "must be auto, text, json or journald, got {other:?}"
        )),
    }
}

fn log_style(raw: &str) -> Result<LogStyle, String> {
    match raw.to_ascii_lowercase().as_str() {
        "default" => Ok(LogStyle::Default),
        "codehubot" => Ok(LogStyle::Codehubot),
        other => Err(format!("must be default or codehubot, got {other:?}")),
    }
}

fn http_listen(raw: &str) -> Result<Off<SocketAddr>, String> {
    if raw.is_empty() {
        return Ok(Off(None));
    }
    raw.parse().map(|a| Off(Some(a))).map_err(|_| {
        format!(
            "must be an IP address and port such as 127.0.0.1:9464, or empty for off, got {raw:?}"
        )
    })
}

/// Broker settings.
#[derive(Debug, Clone, clap::Args)]
#[command(next_help_heading = "Broker")]
pub struct MqttArgs {
    /// Broker host, or several separated by commas (`host` or `host:port`, tried in turn: the
    /// nodes of a cluster); also read as `MQTT_SERVICE_BROKER` or `MQTT_BROKER_HOST` (the Python
    /// service's names)
    #[arg(long, env = "MQTT_BROKER", default_value = "localhost", value_parser = HostList::parse)]
    pub mqtt_broker: HostList,
    /// Broker port (for hosts that name none); also read as `MQTT_SERVICE_PORT` or `MQTT_BROKER_PORT`
    #[arg(long, env = "MQTT_PORT", default_value_t = 1883, value_parser = whole(1u16, 65_535))]
    pub mqtt_port: u16,
    /// Broker user name; empty: connect anonymously; also read as `MQTT_SERVICE_USERNAME`
    #[arg(long, env = "MQTT_USERNAME")]
    pub mqtt_username: Option<String>,
    /// Broker password; also read as `MQTT_SERVICE_PASSWORD`
    #[arg(long, env = "MQTT_PASSWORD", value_parser = secret, hide_env_values = true)]
    pub mqtt_password: Option<Secret>,
    /// Client id; keep it stable: the persistent session (and what queues while the service is away) is keyed
    /// on it
    #[arg(long, env = "MQTT_CLIENT_ID", default_value = "mqtt-ingest", value_parser = client_id)]
    pub mqtt_client_id: String,
    /// Subscription QoS, 0–2 (0 gives up at-least-once)
    #[arg(long, env = "MQTT_QOS", default_value_t = 1, value_parser = whole(0u8, 2))]
    pub mqtt_qos: u8,
    /// `true` drops the broker-side session on every connect
    #[arg(long, env = "MQTT_CLEAN_SESSION", default_value_t = false, value_parser = switch, action = ArgAction::Set)]
    pub mqtt_clean_session: bool,
    /// Seconds between keep-alive pings when nothing else is sent
    #[arg(long, env = "MQTT_KEEPALIVE_SECS", default_value_t = 30, value_parser = whole(5u64, 65_535))]
    pub mqtt_keepalive_secs: u64,
    /// Topic prefix: topics are `PREFIX/{uuid}/data|status|heartbeat`
    #[arg(long, env = "MQTT_TOPIC_PREFIX", default_value = "devices", value_parser = topic_prefix)]
    pub mqtt_topic_prefix: TopicLayout,
    /// Larger payloads are rejected (`too_large`)
    #[arg(long, env = "MQTT_MAX_PAYLOAD_BYTES", default_value_t = 262_144, value_parser = whole(1usize, 268_435_455))]
    pub mqtt_max_payload_bytes: usize,
    /// First reconnect delay; doubles per failure (with jitter)
    #[arg(long, env = "MQTT_RECONNECT_MIN_SECS", default_value_t = 2, value_parser = whole(1u64, 3600))]
    pub mqtt_reconnect_min_secs: u64,
    /// Longest reconnect delay; retries go on forever
    #[arg(long, env = "MQTT_RECONNECT_MAX_SECS", default_value_t = 300, value_parser = whole(1u64, 86_400))]
    pub mqtt_reconnect_max_secs: u64,
    /// Connect to the broker over TLS (rustls); point `MQTT_PORT` at the TLS listener (8883)
    #[arg(long, env = "MQTT_TLS", default_value_t = false, value_parser = switch, action = ArgAction::Set)]
    pub mqtt_tls: bool,
    /// PEM CA(s) to trust; empty: the system's CA certificates
    #[arg(long, env = "MQTT_TLS_CA_FILE")]
    pub mqtt_tls_ca_file: Option<PathBuf>,
    /// PEM client certificate, for brokers that require one
    #[arg(long, env = "MQTT_TLS_CERT_FILE")]
    pub mqtt_tls_cert_file: Option<PathBuf>,
    /// PEM private key of `MQTT_TLS_CERT_FILE`
    #[arg(long, env = "MQTT_TLS_KEY_FILE")]
    pub mqtt_tls_key_file: Option<PathBuf>,
    /// Subscribe as a member of this shared-subscription group (`$share/GROUP/PREFIX/+/kind`) so
    /// several instances split the load; empty: a plain subscription
    #[arg(long, env = "MQTT_SHARED_GROUP", value_parser = shared_group)]
    pub mqtt_shared_group: Option<String>,
    /// Protocol version: `3.1.1` (also `3`, `4`, `311`) or `5` (see "MQTT 5" in docs/configuration.md)
    #[arg(long, env = "MQTT_PROTOCOL", default_value = "3.1.1", value_parser = protocol)]
    pub mqtt_protocol: MqttProtocol,
    /// MQTT 5 only: how long the broker keeps the session (subscriptions, queued messages) after
    /// the service disconnects; must outlive any restart or outage; `4294967295`: never expires
    #[arg(long, env = "MQTT_SESSION_EXPIRY_SECS", default_value_t = 86_400, value_parser = whole(0u64, u64::from(u32::MAX)))]
    pub mqtt_session_expiry_secs: u64,
}

/// Database settings.
#[derive(Debug, Clone, clap::Args)]
#[command(next_help_heading = "Database")]
pub struct DbArgs {
    /// Database host, or several separated by commas (`host` or `host:port`: the nodes of a
    /// Galera cluster; the service moves to the next when the one in use fails)
    #[arg(long, env = "DB_HOST", default_value = "localhost", value_parser = HostList::parse)]
    pub db_host: HostList,
    /// Database port (for hosts that name none)
    #[arg(long, env = "DB_PORT", default_value_t = 3306, value_parser = whole(1u16, 65_535))]
    pub db_port: u16,
    /// Database name (CodeHubot's is `aiot_admin`)
    #[arg(long, env = "DB_NAME", default_value = "aiot_admin", value_parser = non_empty)]
    pub db_name: String,
    /// Shadow run (beside the service it replaces): write into this database instead, never into
    /// `DB_NAME`, whose `device_main` and `device_sensors` are copied there with their rows at the
    /// first start; the client id gets `-shadow` and no shared group. Empty: off
    #[arg(long, env = "SHADOW_DATABASE", default_value = "", value_parser = database_name)]
    pub shadow_database: Off<String>,
    /// Database user
    #[arg(long, env = "DB_USER", default_value = "root", value_parser = non_empty)]
    pub db_user: String,
    /// Database password; may be empty
    #[arg(long, env = "DB_PASSWORD", value_parser = secret, hide_env_values = true)]
    pub db_password: Option<Secret>,
    /// Zone of the DATETIME columns (`last_seen`, `last_heartbeat`, `device_sensors.timestamp`, …)
    /// and of the session's `time_zone`, and in which device times without an offset are read: an
    /// IANA name or an offset (`+08:00`, `UTC`); CodeHubot's backend expects Beijing time
    #[arg(long, env = "DB_TIMEZONE", default_value = "Asia/Shanghai", value_parser = zone)]
    pub db_timezone: Zone,
    /// `disabled`, `preferred` (TLS if offered, unverified), `required`, `verify_ca`,
    /// `verify_identity`
    #[arg(long, env = "DB_SSL_MODE", default_value = "preferred", value_parser = ssl_mode)]
    pub db_ssl_mode: DbSslMode,
    /// PEM CA of the server's certificate (required for `verify_*`)
    #[arg(long, env = "DB_SSL_CA_FILE")]
    pub db_ssl_ca_file: Option<PathBuf>,
    /// PEM client certificate for the database
    #[arg(long, env = "DB_SSL_CERT_FILE")]
    pub db_ssl_cert_file: Option<PathBuf>,
    /// PEM private key of `DB_SSL_CERT_FILE`
    #[arg(long, env = "DB_SSL_KEY_FILE")]
    pub db_ssl_key_file: Option<PathBuf>,
    /// Connections kept open (the seed's pool size)
    #[arg(long, env = "DB_POOL_MIN", default_value_t = 5, value_parser = whole(0u32, 1000))]
    pub db_pool_min: u32,
    /// Most connections (the seed's 5 + 10 overflow)
    #[arg(long, env = "DB_POOL_MAX", default_value_t = 15, value_parser = whole(1u32, 1000))]
    pub db_pool_max: u32,
    /// Connections older than this are replaced; keep below the server's `wait_timeout`
    #[arg(long, env = "DB_POOL_RECYCLE_SECS", default_value_t = 3600, value_parser = whole(10u64, 31_536_000))]
    pub db_pool_recycle_secs: u64,
    /// Wait for a pooled connection
    #[arg(long, env = "DB_CONNECT_TIMEOUT_SECS", default_value_t = 10, value_parser = whole(1u64, 3600))]
    pub db_connect_timeout_secs: u64,
    /// Run the migrations at start-up
    #[arg(long, env = "DB_AUTO_MIGRATE", default_value_t = true, value_parser = switch, action = ArgAction::Set)]
    pub db_auto_migrate: bool,
    /// Longest wait between retries of a failed write
    #[arg(long, env = "DB_RETRY_MAX_SECS", default_value_t = 30, value_parser = whole(1u64, 3600))]
    pub db_retry_max_secs: u64,
}

/// Ingest settings.
#[derive(Debug, Clone, clap::Args)]
#[command(next_help_heading = "Ingest")]
pub struct IngestArgs {
    /// Parsed updates waiting for the writers (shared out between them, about 1 KB each); a message
    /// folded into a waiting update does not count, so size it to about the number of devices that
    /// report
    #[arg(long, env = "INGEST_QUEUE_CAPACITY", default_value_t = 12_288, value_parser = whole(1usize, 1_000_000))]
    pub ingest_queue_capacity: usize,
    /// Parallel writers, each with its own transaction; a device always goes to the same one
    #[arg(long, env = "INGEST_WRITERS", default_value_t = 2, value_parser = whole(1usize, 64))]
    pub ingest_writers: usize,
    /// Most updates per transaction (messages folded into one count once)
    #[arg(long, env = "INGEST_BATCH_MAX_MESSAGES", default_value_t = 500, value_parser = whole(1usize, 10_000))]
    pub ingest_batch_max_messages: usize,
    /// How long a batch may wait to fill, only while a backlog is worked off (the last batch was
    /// full; at a steady rate a batch leaves at once), and never while the broker can send no
    /// more before an ack
    #[arg(long, env = "INGEST_BATCH_MAX_WAIT_MS", default_value_t = 10, value_parser = whole(0u64, 60_000))]
    pub ingest_batch_max_wait_ms: u64,
    /// `true`: an unknown uuid gets a row (`device_id` = `name` = uuid) instead of
    /// `unknown_device`; refused at start-up where `device_main` needs values the service does not
    /// have (CodeHubot's `device_secret`)
    #[arg(long, env = "INGEST_REGISTER_UNKNOWN_DEVICES", default_value_t = false, value_parser = switch, action = ArgAction::Set)]
    pub ingest_register_unknown_devices: bool,
    /// `name:min..max,…`; numeric readings outside are skipped
    #[arg(long, env = "INGEST_SENSOR_RANGES", value_parser = sensor_ranges)]
    pub ingest_sensor_ranges: Option<SensorRanges>,
    /// A device time further ahead of the receive time than this dates nothing (the readings keep
    /// the receive time)
    #[arg(long, env = "INGEST_MAX_CLOCK_SKEW_SECS", default_value_t = 300, value_parser = whole(0u64, 31_536_000))]
    pub ingest_max_clock_skew_secs: u64,
    /// `TYPE:from=to,…` (`*:from=to` for any type): readings renamed on the way in; the default
    /// gives CodeHubot's current names for the rain board; empty: none
    #[arg(long, env = "SENSOR_RENAMES", default_value = Renames::CODEHUBOT, value_parser = renames)]
    pub sensor_renames: Renames,
    /// Where SENSOR_RENAMES apply: `device_sensors` (the backend's per-sensor table; `last_report_data`
    /// and history keep the firmware's names) or `everywhere`
    #[arg(long, env = "SENSOR_RENAMES_IN", default_value = "device_sensors", value_parser = RenameScope::parse)]
    pub sensor_renames_in: RenameScope,
    /// The backend's one-row-per-sensor table, written in the same transaction when it exists
    /// (found at start-up); empty: off
    #[arg(long, env = "DEVICE_SENSORS_TABLE", default_value = "device_sensors", value_parser = table_name)]
    pub device_sensors_table: Off<String>,
    /// How long a stop may take to commit and acknowledge
    #[arg(long, env = "SHUTDOWN_TIMEOUT_SECS", default_value_t = 30, value_parser = whole(1u64, 3600))]
    pub shutdown_timeout_secs: u64,
}

/// Presence, history and rejects settings.
#[derive(Debug, Clone, clap::Args)]
#[command(next_help_heading = "Presence, history and rejects")]
pub struct KeepArgs {
    /// A device silent this long is set offline (three missed 30 s heartbeats); 0 turns it off
    #[arg(long, env = "PRESENCE_TIMEOUT_SECS", default_value_t = 90, value_parser = whole(0u64, 31_536_000))]
    pub presence_timeout_secs: u64,
    /// How often the offline sweep runs
    #[arg(long, env = "PRESENCE_SWEEP_SECS", default_value_t = 15, value_parser = whole(1u64, 3600))]
    pub presence_sweep_secs: u64,
    /// Append every accepted reading to `device_history`
    #[arg(long, env = "HISTORY_ENABLED", default_value_t = false, value_parser = switch, action = ArgAction::Set)]
    pub history_enabled: bool,
    /// Older history is deleted in the background; 0 keeps it all
    #[arg(long, env = "HISTORY_RETENTION_DAYS", default_value_t = 30, value_parser = whole(0u64, 36_500))]
    pub history_retention_days: u64,
    /// Keep rejected messages in `ingest_rejects`
    #[arg(long, env = "REJECTS_ENABLED", default_value_t = false, value_parser = switch, action = ArgAction::Set)]
    pub rejects_enabled: bool,
    /// How much of a rejected payload is kept
    #[arg(long, env = "REJECTS_MAX_PAYLOAD_BYTES", default_value_t = 1024, value_parser = whole(0usize, 65_535))]
    pub rejects_max_payload_bytes: usize,
    /// Most rejected messages kept (oldest removed first)
    #[arg(long, env = "REJECTS_KEEP", default_value_t = 10_000, value_parser = whole(1u64, 100_000_000))]
    pub rejects_keep: u64,
    /// Rejected messages older than this are removed
    #[arg(long, env = "REJECTS_RETENTION_DAYS", default_value_t = 7, value_parser = whole(0u64, 36_500))]
    pub rejects_retention_days: u64,
    /// How often old history and rejects are removed
    #[arg(long, env = "MAINTENANCE_INTERVAL_SECS", default_value_t = 60, value_parser = whole(1u64, 86_400))]
    pub maintenance_interval_secs: u64,
}

/// Logs and operations settings.
#[derive(Debug, Clone, clap::Args)]
#[command(next_help_heading = "Logs and operations")]
pub struct OpsArgs {
    /// Statistics block interval; 0 turns it off
    #[arg(long, env = "STATS_INTERVAL_SECS", default_value_t = 300, value_parser = whole(0u64, 86_400))]
    pub stats_interval_secs: u64,
    /// A level or a filter (`info,mqtt_ingest=debug`)
    #[arg(long, env = "LOG_LEVEL", default_value = "info", value_parser = log_level)]
    pub log_level: String,
    /// `auto` (journald under systemd, else text), `text`, `json`, `journald`
    #[arg(long, env = "LOG_FORMAT", default_value = "auto", value_parser = log_format)]
    pub log_format: LogFormat,
    /// A repeated warning (same device, same reason) is logged once per interval, with
    /// `similar_left_out=N`; counters count every one; 0 logs all
    #[arg(long, env = "LOG_WARN_INTERVAL_SECS", default_value_t = 60, value_parser = whole(0u64, 86_400))]
    pub log_warn_interval_secs: u64,
    /// Also write `mqtt-service.log` and `mqtt-service-error.log` (errors only) here, rotated
    /// daily; empty: no files
    #[arg(long, env = "LOG_DIR")]
    pub log_dir: Option<PathBuf>,
    /// Daily files of each kind kept in `LOG_DIR`; older ones are deleted
    #[arg(long, env = "LOG_KEEP_DAYS", default_value_t = 7, value_parser = whole(1usize, 3650))]
    pub log_keep_days: usize,
    /// `codehubot` also writes the statistics block and the unknown-device, bad-sensor-name and
    /// JSON-error lines in the Python service's words (`📊 MQTT服务统计信息`, `⚠️ 设备不存在: …`)
    #[arg(long, env = "LOG_STYLE", default_value = "default", value_parser = log_style)]
    pub log_style: LogStyle,
    /// Address of the status page (`/`, `/status.json`) and `/metrics`, `/healthz`, `/readyz`
    /// (IP and port); empty turns it off
    #[arg(long, env = "HTTP_LISTEN", default_value = "127.0.0.1:9464", value_parser = http_listen)]
    pub http_listen: Off<SocketAddr>,
    /// Show the latest kept rejects (device input) on the status page even when HTTP_LISTEN is
    /// not a loopback address (on 127.0.0.1 / ::1 they are shown when REJECTS_ENABLED)
    #[arg(long, env = "STATUS_SHOW_REJECTS", default_value_t = false, value_parser = switch, action = ArgAction::Set)]
    pub status_show_rejects: bool,
    /// How often the database is checked (and devices online counted) for `/readyz` and `/metrics`
    #[arg(long, env = "HEALTH_DB_CHECK_SECS", default_value_t = 5, value_parser = whole(1u64, 3600))]
    pub health_db_check_secs: u64,
}
/// Every setting, in the order the reference lists them.
#[derive(Debug, Clone, clap::Args)]
pub struct Definition {
    #[command(flatten)]
    pub mqtt: MqttArgs,
    #[command(flatten)]
    pub db: DbArgs,
    #[command(flatten)]
    pub ingest: IngestArgs,
    #[command(flatten)]
    pub keep: KeepArgs,
    #[command(flatten)]
    pub ops: OpsArgs,
}

/// What the `rejects` command reads: the database group and `REJECTS_ENABLED`'s group.
#[derive(Debug, Clone, clap::Args)]
pub struct RejectsArgs {
    #[command(flatten)]
    pub db: DbArgs,
    #[command(flatten)]
    pub keep: KeepArgs,
}

/// The parser of one group of settings (`A` is [`Definition`] for all of them).
pub fn command<A: Args>() -> Command {
    A::augment_args(Command::new("mqtt-ingest").no_binary_name(true))
}

/// The variable behind an argument.
fn var_of(arg: &clap::Arg) -> Option<&str> {
    arg.get_env().and_then(|e| e.to_str())
}

/// Whether an empty value means the default: for numbers and switches, and for settings without
/// a default. For the others an empty value is read: it turns `HTTP_LISTEN`,
/// `DEVICE_SENSORS_TABLE` and `SENSOR_RENAMES` off, and is an error for a name that must not be
/// empty (`DB_HOST`).
fn empty_means_default(arg: &clap::Arg) -> bool {
    match arg.get_default_values() {
        [] => true,
        [one] => one
            .to_str()
            .is_some_and(|d| d.parse::<u64>().is_ok() || d == "true" || d == "false"),
        _ => false,
    }
}

/// Parses the group `A` from variables: `lookup` gives a variable's value by name. Values are
/// trimmed, passwords excepted (a space may be part of one). An error names the variable and
/// says what is wrong, in the parser's words.
pub fn parse<A: Args + FromArgMatches>(
    lookup: &dyn Fn(&str) -> Option<String>,
) -> Result<A, (String, String)> {
    let cmd = command::<A>();
    let mut argv: Vec<String> = Vec::new();
    for arg in cmd.get_arguments() {
        let (Some(var), Some(long)) = (var_of(arg), arg.get_long()) else {
            continue;
        };
        let Some(raw) = lookup(var) else { continue };
        let value = if var.ends_with("PASSWORD") {
            raw
        } else {
            raw.trim().to_owned()
        };
        if value.is_empty() && empty_means_default(arg) {
            continue;
        }
        argv.push(format!("--{long}={value}"));
    }
    // The variables were read above: clap must not read the environment again (an empty
    // variable would reach the parsers, and tests pass maps).
    let cmd = cmd.mut_args(|a| a.env(None::<&str>));
    let matches = cmd
        .try_get_matches_from(&argv)
        .map_err(|e| clap_error(&command::<A>(), &e))?;
    A::from_arg_matches(&matches).map_err(|e| clap_error(&command::<A>(), &e))
}

/// The variable and the problem of a clap error.
fn clap_error(cmd: &Command, e: &clap::Error) -> (String, String) {
    use clap::error::{ContextKind, ContextValue};
    let long = match e.get(ContextKind::InvalidArg) {
        Some(ContextValue::String(s)) => s
            .trim_start_matches('-')
            .split([' ', '='])
            .next()
            .map(str::to_owned),
        _ => None,
    };
    let var = long
        .and_then(|l| cmd.get_arguments().find(|a| a.get_long() == Some(&l)))
        .and_then(var_of)
        .unwrap_or("settings")
        .to_owned();
    let problem = match std::error::Error::source(e) {
        Some(inner) => inner.to_string(),
        None => e.kind().to_string(),
    };
    (var, problem)
}

/// One setting as the reference shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// The variable.
    pub var: String,
    /// Its default, `None` when it has none (empty).
    pub default: Option<String>,
    /// What it means.
    pub help: String,
    /// Its group.
    pub heading: String,
}

/// Every setting, in order.
pub fn reference() -> Vec<Entry> {
    command::<Definition>()
        .get_arguments()
        .filter_map(|a| {
            Some(Entry {
                var: var_of(a)?.to_owned(),
                default: a
                    .get_default_values()
                    .first()
                    .map(|d| d.to_string_lossy().into_owned()),
                help: a.get_help().map(ToString::to_string).unwrap_or_default(),
                heading: a.get_help_heading().unwrap_or_default().to_owned(),
            })
        })
        .collect()
}

/// The reference as the Markdown table of `docs/configuration.md`.
pub fn markdown_table() -> String {
    let mut out = String::from("| variable | default | meaning |\n|---|---|---|\n");
    for e in reference() {
        let default = match e.default.as_deref() {
            None | Some("") => "*(empty)*".to_owned(),
            Some(d) => format!("`{d}`"),
        };
        out.push_str(&format!(
            "| `{}` | {default} | {} |\n",
            e.var,
            e.help.replace('|', "\\|")
        ));
    }
    out
}

/// The reference as plain text, for `--help`.
pub fn help_text() -> String {
    let mut out = String::from(
        "Settings, from the environment or .env. An empty value means the default for a number,\n\
         a switch or a setting without a default; HTTP_LISTEN=, DEVICE_SENSORS_TABLE= and\n\
         SENSOR_RENAMES= turn those off, MQTT_PROTOCOL= is 3.1.1, and for the other names an\n\
         empty value is refused.\n",
    );
    let mut heading = String::new();
    for e in reference() {
        if e.heading != heading {
            heading.clone_from(&e.heading);
            out.push_str(&format!("\n{heading}:\n"));
        }
        let default = e.default.as_deref().filter(|d| !d.is_empty());
        out.push_str(&format!("  {}", e.var));
        if let Some(d) = default {
            out.push_str(&format!("={d}"));
        }
        out.push_str(&format!("\n      {}\n", e.help));
    }
    out
}
