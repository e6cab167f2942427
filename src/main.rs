//! The `mqtt-ingest` binary: parses the command line, loads settings, sets up logging, and runs
//! the service until SIGINT or SIGTERM.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use mqtt_ingest::config::{DbSettings, RejectsSettings, Settings};
use mqtt_ingest::mqtt;
use mqtt_ingest::ops::telemetry;
use mqtt_ingest::service::Service;
use mqtt_ingest::store::{self, rejects};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

/// sysexits' EX_CONFIG: the unit file tells systemd not to restart on it.
const EXIT_CONFIG: u8 = 78;

/// What the help says after the options: where the settings come from.
const SETTINGS_HELP: &str = "\
Settings come from the environment and a .env file: MQTT_BROKER, MQTT_PORT, MQTT_USERNAME,
MQTT_PASSWORD, DB_HOST, DB_PORT, DB_NAME, DB_USER, DB_PASSWORD, DB_TIMEZONE and more;
`mqtt-ingest run --help` lists them all with their defaults. The Python service's names for the
broker (MQTT_SERVICE_BROKER, MQTT_BROKER_HOST, MQTT_SERVICE_PORT, MQTT_BROKER_PORT,
MQTT_SERVICE_USERNAME, MQTT_SERVICE_PASSWORD) are read too; check-config says which was used.";

/// mqtt-ingest: MQTT device telemetry into MySQL/MariaDB (device_main).
#[derive(Debug, Parser)]
#[command(
    name = "mqtt-ingest",
    version,
    after_help = SETTINGS_HELP
)]
struct Cli {
    /// Read settings from PATH instead of ./.env (variables already set win)
    #[arg(long, value_name = "PATH", global = true)]
    env_file: Option<PathBuf>,
    /// Same as the check-config command (kept for unit files and scripts that use it)
    #[arg(long)]
    check_config: bool,
    #[command(subcommand)]
    command: Option<Command>,
}

impl Cli {
    /// The command to run and the .env file to read; `--check-config` beside a command is a
    /// usage error (clap cannot say so itself: `--env-file` is global, so a plain conflict
    /// between options and commands would refuse it too).
    fn resolve(self) -> Result<(Command, Option<PathBuf>), clap::Error> {
        use clap::CommandFactory;
        let command = match (self.command, self.check_config) {
            (Some(_), true) => {
                return Err(Cli::command().error(
                    clap::error::ErrorKind::ArgumentConflict,
                    "--check-config is a command of its own: use it without another command",
                ));
            }
            (None, true) => Command::CheckConfig,
            (Some(command), false) => command,
            (None, false) => Command::Run,
        };
        Ok((command, self.env_file))
    }
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the service until SIGTERM or SIGINT (what no command means)
    Run,
    /// Validate the settings, connect to the database and the broker, exit 0 or 1
    CheckConfig,
    /// Print the latest kept rejected messages, newest first (REJECTS_ENABLED=true keeps them)
    Rejects(RejectsQuery),
    /// Compare the tables CodeHubot's Python service writes with those mqtt-ingest writes (a
    /// shadow run's), device by device and field by field; exit 1 on an unexpected difference
    Compare(CompareArgs),
    /// Copy DB_NAME's device_main and device_sensors, with their rows, into another database:
    /// what a shadow run does at its first start, and where the Python service can shadow
    /// mqtt-ingest after the switch
    ShadowCopy(ShadowCopyArgs),
}

#[derive(Debug, clap::Args)]
struct CompareArgs {
    /// The database the Python service writes [default: DB_NAME; with SHADOW_DATABASE set,
    /// the live DB_NAME it shadows]
    #[arg(long, value_name = "DATABASE")]
    python: Option<String>,
    /// The database mqtt-ingest writes [default: SHADOW_DATABASE when set, else DB_NAME]
    #[arg(long, value_name = "DATABASE")]
    ingest: Option<String>,
    /// Times closer than this many seconds are the same
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(0..=86_400))]
    tolerance_secs: u32,
    /// `text` (a summary line, then each difference) or `json`
    #[arg(long, value_enum, default_value_t = Format::Text)]
    format: Format,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Format {
    Text,
    Json,
}

#[derive(Debug, clap::Args)]
struct ShadowCopyArgs {
    /// The database to copy into (created when missing; a copy already there is kept)
    #[arg(long, value_name = "DATABASE")]
    into: String,
}

#[derive(Debug, clap::Args)]
struct RejectsQuery {
    /// Only this device's
    #[arg(long, value_name = "UUID")]
    device: Option<String>,
    /// Only this reason's (not_json, unknown_device, …)
    #[arg(long)]
    reason: Option<String>,
    /// How many
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    limit: u32,
}

/// glibc's malloc keeps small freed blocks in "fast bins" and merges them all back whenever a
/// block of 64 KiB or more is freed. The writers build and free such blocks (the arguments of a
/// multi-row statement) a few times per batch, between tens of thousands of small frees, so that
/// merging was about a tenth of the service's CPU in the 10,000-device drain. Without fast bins
/// small blocks still come from glibc's per-thread cache; RSS is unchanged (benchmark,
/// drain-10k: 19.6 → 12–14 µs/msg, 20 MB either way).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn tune_allocator() {
    // SAFETY: mallopt only changes a malloc parameter; M_MXFAST = 0 is a documented value.
    unsafe {
        libc::mallopt(libc::M_MXFAST, 0);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn tune_allocator() {}

/// The command line's parser, with every setting (from the one definition in `config`) listed
/// by `run --help` and `check-config --help`.
fn cli_command() -> clap::Command {
    use clap::CommandFactory;
    let settings = mqtt_ingest::config::help_text();
    Cli::command()
        .mut_subcommand("run", |c| c.after_long_help(settings.clone()))
        .mut_subcommand("check-config", |c| c.after_long_help(settings))
}

fn main() -> ExitCode {
    tune_allocator();
    // Usage errors exit 2 with clap's message; --help and --version exit 0. The settings'
    // reference is built for the help only, not on every start.
    let (command, env_file) = match Cli::try_parse().and_then(Cli::resolve) {
        Ok(parsed) => parsed,
        Err(e) if e.kind() == clap::error::ErrorKind::DisplayHelp => {
            cli_command().get_matches();
            e.exit()
        }
        Err(e) => e.exit(),
    };
    let loaded = match &env_file {
        Some(path) => dotenvy::from_path(path).map(|()| Some(path.clone())),
        None => match dotenvy::dotenv() {
            Ok(path) => Ok(Some(path)),
            Err(e) if e.not_found() => Ok(None),
            Err(e) => Err(e),
        },
    };
    let loaded = match loaded {
        Ok(path) => path,
        Err(e) => {
            eprintln!("configuration error: cannot read the .env file: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    if let Command::Rejects(query) = command {
        return rejects_command(query);
    }
    let settings = match Settings::from_env() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    // The TLS files were found readable; check that they hold what they should, now, so that a
    // bad one is a configuration error rather than a failure at the first connection.
    if let Some(tls) = &settings.mqtt.tls
        && let Err(e) = mqtt_ingest::mqtt::tls::mqtt_client_config(tls)
    {
        eprintln!("{e}");
        return ExitCode::from(EXIT_CONFIG);
    }
    let note = match telemetry::init(&settings.log) {
        Ok(note) => note,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    if let Some(note) = note {
        warn!("{note}");
    }
    if let Some(path) = loaded {
        info!(path = %path.display(), "settings read from file");
    }

    // One thread: the event loop and the writers interleave on it while the database and the
    // broker work on the other cores. Measured against the multi-threaded runtime in the same
    // benchmark run, it used less CPU per message and half the memory (no cross-thread wake-ups,
    // no cross-thread frees in the allocator).
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .thread_name("mqtt-ingest-rt")
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            error!(error = %e, "cannot start the async runtime");
            return ExitCode::FAILURE;
        }
    };
    match command {
        Command::CheckConfig => runtime.block_on(check_config(settings)),
        Command::Run => runtime.block_on(run(settings)),
        Command::Compare(args) => runtime.block_on(compare_command(&settings, args)),
        Command::ShadowCopy(args) => runtime.block_on(shadow_copy_command(&settings, args)),
        Command::Rejects(_) => unreachable!("handled before the settings are read"),
    }
}

/// sysexits' EX_UNAVAILABLE: a database could not be read.
const EXIT_UNAVAILABLE: u8 = 69;

/// `compare`: reads both databases and prints what differs.
async fn compare_command(settings: &Settings, args: CompareArgs) -> ExitCode {
    use mqtt_ingest::store::shadow;
    let db = &settings.db;
    let python = args
        .python
        .or_else(|| db.shadow_of.clone())
        .unwrap_or_else(|| db.name.clone());
    let ingest = args.ingest.unwrap_or_else(|| db.name.clone());
    if python == ingest {
        eprintln!(
            "compare: both sides are the database {python}: name the other with --python or --ingest (or set SHADOW_DATABASE)"
        );
        return ExitCode::from(2);
    }
    let table = settings.keep.device_sensors_table.as_deref();
    let read = async {
        let p = shadow::read_tables(db, &python, table).await?;
        let i = shadow::read_tables(db, &ingest, table).await?;
        Ok::<_, shadow::ShadowError>((p, i))
    };
    let (p, i) = match read.await {
        Ok(tables) => tables,
        Err(e) => {
            eprintln!("compare: {e}");
            return ExitCode::from(EXIT_UNAVAILABLE);
        }
    };
    let options = mqtt_ingest::switch::Options {
        now: db.zone.naive(chrono::Utc::now()),
        zone: db.zone.clone(),
        tolerance: chrono::TimeDelta::seconds(i64::from(args.tolerance_secs)),
        presence_timeout: Some(settings.presence.timeout)
            .filter(|t| !t.is_zero())
            .and_then(|t| chrono::TimeDelta::from_std(t).ok()),
    };
    let report = mqtt_ingest::switch::compare(&p, &i, &options);
    match args.format {
        Format::Text => {
            let text = report.text();
            let (summary, details) = text.split_once('\n').unwrap_or((&text, ""));
            println!("{summary}\npython: {python}, mqtt-ingest: {ingest}");
            print!("{details}");
        }
        Format::Json => println!("{:#}", report.json()),
    }
    if report.unexpected() == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// `shadow-copy`: the copy a shadow run makes at its first start.
async fn shadow_copy_command(settings: &Settings, args: ShadowCopyArgs) -> ExitCode {
    let db = &settings.db;
    let live = db.shadow_of.as_deref().unwrap_or(&db.name);
    if args.into == live {
        eprintln!("shadow-copy: --into names DB_NAME itself ({live})");
        return ExitCode::from(2);
    }
    match shadow_copy(settings, live, &args.into).await {
        Ok(said) => {
            println!("{said}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("shadow-copy: {e}");
            ExitCode::from(EXIT_UNAVAILABLE)
        }
    }
}

/// Makes (or keeps) the shadow copy of `live` in `into`, and says which.
async fn shadow_copy(
    settings: &Settings,
    live: &str,
    into: &str,
) -> Result<String, mqtt_ingest::store::shadow::ShadowError> {
    use mqtt_ingest::store::shadow::{Prepared, prepare};
    let table = settings.keep.device_sensors_table.as_deref();
    Ok(match prepare(&settings.db, live, into, table).await? {
        Prepared::Copied { devices, sensors } => {
            let sensors = sensors
                .map(|n| format!(" and {n} {} rows", table.unwrap_or("device_sensors")))
                .unwrap_or_default();
            format!(
                "shadow copy made: {devices} device_main rows{sensors} copied from {live} into {into}"
            )
        }
        Prepared::Kept => {
            format!("shadow copy kept: {into} already holds one (drop it to start afresh)")
        }
    })
}

/// `rejects`: reads only the database settings (and whether rejects are kept), so a broker's
/// TLS files need not be readable to run one query.
fn rejects_command(query: RejectsQuery) -> ExitCode {
    let settings = match RejectsSettings::from_env() {
        Ok(settings) => settings,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt.block_on(print_rejects(&settings.db, settings.kept, query)),
        Err(e) => {
            eprintln!("cannot start the async runtime: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(settings: Settings) -> ExitCode {
    if let Some(live) = &settings.db.shadow_of {
        info!(
            live = %live,
            shadow = %settings.db.name,
            client_id = %settings.mqtt.client_id,
            "shadow run: the live tables are read once, to copy them; everything is written into the shadow database"
        );
        match shadow_copy(&settings, live, &settings.db.name).await {
            Ok(said) => info!("{said}"),
            Err(e) => {
                error!(error = %e, "cannot make the shadow copy");
                return ExitCode::FAILURE;
            }
        }
    }
    let shutdown = CancellationToken::new();
    tokio::spawn(cancel_on_signal(shutdown.clone()));
    let service = Service::build(settings).await;
    match async { service?.run_until_stopped(shutdown).await }.await {
        Ok(()) => {
            info!("stopped");
            ExitCode::SUCCESS
        }
        Err(e) => {
            error!(error = %format!("{e:#}"), "stopped with an error");
            ExitCode::FAILURE
        }
    }
}

/// Fires `shutdown` on the first SIGINT or SIGTERM.
async fn cancel_on_signal(shutdown: CancellationToken) {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            error!(error = %e, "cannot listen for SIGTERM; only Ctrl-C stops the service cleanly");
            let _ = tokio::signal::ctrl_c().await;
            shutdown.cancel();
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => info!("SIGTERM received"),
        _ = tokio::signal::ctrl_c() => info!("SIGINT received"),
    }
    shutdown.cancel();
}

/// Prints the latest kept rejects.
async fn print_rejects(db: &DbSettings, kept: bool, query: RejectsQuery) -> ExitCode {
    let pool = store::pool(db);
    let result = rejects::latest(
        &pool,
        query.device.as_deref(),
        query.reason.as_deref(),
        query.limit,
    )
    .await;
    pool.close().await;
    match result {
        Ok(rows) if rows.is_empty() => {
            println!(
                "no rejected messages kept{}",
                if kept {
                    ""
                } else {
                    " (REJECTS_ENABLED is off)"
                }
            );
            ExitCode::SUCCESS
        }
        Ok(rows) => {
            for r in rows {
                println!("{}\n", r.render());
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("cannot read the kept rejects: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Validates the settings (done before we get here) and tests both connections.
async fn check_config(settings: Settings) -> ExitCode {
    let timeout = Duration::from_secs(10);
    let db = &settings.db;
    let mut ok = true;
    println!("configuration: valid");
    // Which of the names a setting goes by each value came from (the Python service's
    // MQTT_SERVICE_*, the backend's MQTT_BROKER_HOST / MQTT_BROKER_PORT, or ours).
    for (setting, origin) in &settings.origins {
        match *origin {
            "default" => println!("  {setting}: not set, default"),
            o if o == *setting => println!("  {setting}: from {o}"),
            o => println!("  {setting}: from {o} (another name for {setting})"),
        }
    }
    println!(
        "  DB_TIMEZONE: {} (DATETIME columns and the session time_zone)",
        db.zone
    );
    // Every node of a list is tried: the check passes when any answers (the service moves to
    // the next when the one in use fails), and names each that does not.
    let mut any_db = false;
    // A shadow run's database may not exist before its first start: the live one is checked.
    let checked = db.shadow_of.as_deref().unwrap_or(&db.name);
    if let Some(live) = &db.shadow_of {
        println!(
            "  SHADOW_DATABASE: {} (a shadow run: {live}'s tables are copied there and {live} is never written)",
            db.name
        );
    }
    for host in &db.hosts {
        let node = mqtt_ingest::config::DbSettings {
            hosts: vec![host.clone()],
            name: checked.to_owned(),
            ..db.clone()
        };
        let pool = store::pool(&node);
        match tokio::time::timeout(timeout, store::ping(&pool)).await {
            Ok(Ok(())) => {
                any_db = true;
                println!("database {host}/{checked} as {}: ok", db.user);
            }
            Ok(Err(e)) => {
                let hint = store::settings_hint(&e)
                    .map(|h| format!("\n  {h}"))
                    .unwrap_or_default();
                println!(
                    "database {host}/{checked} as {}: FAILED: {e}{hint}",
                    db.user
                );
            }
            Err(_) => println!(
                "database {host}/{checked}: FAILED: no answer within {}s\n  check DB_HOST and DB_PORT, and that the server is running and reachable",
                timeout.as_secs()
            ),
        }
        pool.close().await;
    }
    if db.hosts.len() > 1 && any_db {
        println!("database: ok (the service uses the nodes that answer)");
    }
    ok &= any_db;
    let m = &settings.mqtt;
    let who = if m.username.is_empty() {
        "anonymous".to_owned()
    } else {
        m.username.clone()
    };
    let mut any_broker = false;
    for broker in &m.brokers {
        let one = mqtt_ingest::config::MqttSettings {
            brokers: vec![broker.clone()],
            ..m.clone()
        };
        match mqtt::check_connection(&one, timeout).await {
            Ok(()) => {
                any_broker = true;
                println!("broker {broker} as {who}: ok");
            }
            Err(e) => println!("broker {broker} as {who}: FAILED: {e}"),
        }
    }
    if m.brokers.len() > 1 && any_broker {
        println!("broker: ok (the service connects to the brokers that answer)");
    }
    ok &= any_broker;
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("mqtt-ingest").chain(args.iter().copied()))
    }

    fn resolve(args: &[&str]) -> Result<(Command, Option<PathBuf>), clap::Error> {
        parse(args)?.resolve()
    }

    #[test]
    fn the_definition_is_consistent() {
        cli_command().debug_assert();
        mqtt_ingest::config::command_for_checks().debug_assert();
    }

    #[test]
    fn run_help_lists_every_setting_with_its_default() {
        let help = cli_command()
            .find_subcommand_mut("run")
            .unwrap()
            .render_long_help()
            .to_string();
        for entry in mqtt_ingest::config::reference() {
            assert!(help.contains(&entry.var), "run --help lacks {}", entry.var);
        }
        assert!(help.contains("MQTT_PORT=1883"), "{help}");
        assert!(help.contains("HTTP_LISTEN=127.0.0.1:9464"), "{help}");
    }

    #[test]
    fn commands_options_and_their_errors() {
        assert!(parse(&[]).unwrap().command.is_none());
        let c = parse(&["--env-file=/x", "--check-config"]).unwrap();
        assert!(c.check_config && c.env_file == Some(PathBuf::from("/x")));
        let c = parse(&["--env-file", "/x", "rejects"]).unwrap();
        assert!(matches!(c.command, Some(Command::Rejects(_))) && c.env_file.is_some());
        let c = parse(&["check-config", "--env-file", "/x"]).unwrap();
        assert!(matches!(c.command, Some(Command::CheckConfig)));
        let c = parse(&["rejects", "--limit=5", "--device", "d"]).unwrap();
        let Some(Command::Rejects(q)) = c.command else {
            panic!("not rejects");
        };
        assert_eq!((q.limit, q.device.as_deref()), (5, Some("d")));
        let Some(Command::Rejects(q)) = parse(&["rejects"]).unwrap().command else {
            panic!("not rejects");
        };
        assert_eq!(q.limit, 20);
        // What the hand-written loop got wrong.
        assert!(parse(&["rejects", "--limit", "0"]).is_err());
        assert!(resolve(&["rejects", "--check-config"]).is_err());
        assert!(resolve(&["--check-config", "rejects"]).is_err());
        assert!(matches!(
            resolve(&["--check-config"]),
            Ok((Command::CheckConfig, None))
        ));
        assert!(matches!(resolve(&[]), Ok((Command::Run, None))));
        assert!(parse(&["--nope"]).is_err());
    }
}
