//! Log output: text or JSON on stderr, or journald when run by systemd; optionally also the
//! seed's log files in a directory, rotated daily (no logrotate needed).

use std::path::Path;

use tracing::Subscriber;
use tracing_appender::rolling::{RollingFileAppender, Rotation};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::writer::MakeWriterExt;
use tracing_subscriber::layer::{Layer, SubscriberExt};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;

use crate::config::{LogFormat, LogSettings};

/// The seed's file names; the rotation appends the day: `mqtt-service.log.2025-12-19`.
pub const LOG_FILE: &str = "mqtt-service.log";
/// Errors only, same rotation.
pub const ERROR_LOG_FILE: &str = "mqtt-service-error.log";

/// Two text layers writing into `dir`: everything to [`LOG_FILE`], errors to
/// [`ERROR_LOG_FILE`], each rotated at midnight (UTC) with `keep_days` files kept.
fn file_layers<S>(dir: &Path, keep_days: usize) -> Result<impl Layer<S>, String>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    let appender = |name: &str| {
        RollingFileAppender::builder()
            .rotation(Rotation::DAILY)
            .filename_prefix(name)
            .max_log_files(keep_days)
            .build(dir)
            .map_err(|e| {
                format!(
                    "configuration error: LOG_DIR: cannot write {name} in {}: {e}",
                    dir.display()
                )
            })
    };
    let all = appender(LOG_FILE)?;
    let errors = appender(ERROR_LOG_FILE)?.with_max_level(tracing::Level::ERROR);
    // Written directly (no background thread): a line reaches the file before the call returns,
    // so nothing is lost at exit, and log volume is low (no line per stored message).
    let text = || tracing_subscriber::fmt::layer().with_ansi(false);
    Ok(text().with_writer(all).and_then(text().with_writer(errors)))
}

/// Installs the global subscriber. Returns a note to log once logging is up (for example that
/// journald was asked for but is not there), or an error when `LOG_DIR` cannot be written.
pub fn init(settings: &LogSettings) -> Result<Option<String>, String> {
    // The level was validated with the settings; a fallback keeps logging on regardless.
    let filter = || EnvFilter::try_new(&settings.level).unwrap_or_else(|_| EnvFilter::new("info"));
    // systemd sets JOURNAL_STREAM when stdout/stderr go to the journal.
    let under_systemd = std::env::var_os("JOURNAL_STREAM").is_some();
    let want_journald = match settings.format {
        LogFormat::Journald => true,
        LogFormat::Auto => under_systemd,
        LogFormat::Text | LogFormat::Json => false,
    };
    let files = || -> Result<_, String> {
        settings
            .dir
            .as_deref()
            .map(|dir| file_layers(dir, settings.keep_days))
            .transpose()
    };
    let mut note = None;
    if want_journald {
        match tracing_journald::layer() {
            Ok(layer) => {
                // Priorities as syslog reads them (info is 6, not tracing-journald's default 5),
                // and fields under their own names: `journalctl -u mqtt-ingest REASON=not_json`.
                let layer = layer
                    .with_syslog_identifier("mqtt-ingest".into())
                    .with_field_prefix(None)
                    .with_priority_mappings(tracing_journald::PriorityMappings {
                        info: tracing_journald::Priority::Informational,
                        debug: tracing_journald::Priority::Debug,
                        ..tracing_journald::PriorityMappings::new()
                    });
                tracing_subscriber::registry()
                    .with(filter())
                    .with(files()?)
                    .with(layer)
                    .init();
                return Ok(None);
            }
            // No journal socket (a container, a test): fall back to stderr.
            Err(e) => note = Some(format!("journald not available ({e}); logging to stderr")),
        }
    }
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    if settings.format == LogFormat::Json {
        tracing_subscriber::registry()
            .with(filter())
            .with(files()?)
            .with(fmt.json().flatten_event(true))
            .init();
    } else {
        use std::io::IsTerminal;
        tracing_subscriber::registry()
            .with(filter())
            .with(files()?)
            .with(fmt.with_ansi(std::io::stderr().is_terminal()))
            .init();
    }
    Ok(note)
}

/// A duration in seconds as a person reads it in a log line: to a tenth (`29.7`, not
/// `29.729949951171875`).
pub fn secs(d: std::time::Duration) -> f64 {
    (d.as_secs_f64() * 10.0).round() / 10.0
}

#[cfg(test)]
mod secs_tests {
    use super::secs;
    use std::time::Duration;

    #[test]
    fn durations_are_logged_to_a_tenth() {
        assert_eq!(secs(Duration::from_secs_f64(29.729949951171875)), 29.7);
        assert_eq!(secs(Duration::from_millis(50)), 0.1);
        assert_eq!(secs(Duration::ZERO), 0.0);
        assert_eq!(format!("{}", secs(Duration::from_secs(2))), "2");
    }
}
