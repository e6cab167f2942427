//! Log output: text or JSON on stderr, or journald when run by systemd.

use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

use crate::config::{LogFormat, LogSettings};

/// Installs the global subscriber. Returns a note to log once logging is up (for example that
/// journald was asked for but is not there).
pub fn init(settings: &LogSettings) -> Option<String> {
    // The level was validated with the settings; a fallback keeps logging on regardless.
    let filter = || EnvFilter::try_new(&settings.level).unwrap_or_else(|_| EnvFilter::new("info"));
    // systemd sets JOURNAL_STREAM when stdout/stderr go to the journal.
    let under_systemd = std::env::var_os("JOURNAL_STREAM").is_some();
    let want_journald = match settings.format {
        LogFormat::Journald => true,
        LogFormat::Auto => under_systemd,
        LogFormat::Text | LogFormat::Json => false,
    };
    let mut note = None;
    if want_journald {
        match tracing_journald::layer() {
            Ok(layer) => {
                tracing_subscriber::registry()
                    .with(filter())
                    .with(layer.with_syslog_identifier("mqtt-ingest".into()))
                    .init();
                return None;
            }
            // No journal socket (a container, a test): fall back to stderr.
            Err(e) => note = Some(format!("journald not available ({e}); logging to stderr")),
        }
    }
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    if settings.format == LogFormat::Json {
        tracing_subscriber::registry()
            .with(filter())
            .with(fmt.json().flatten_event(true))
            .init();
    } else {
        use std::io::IsTerminal;
        tracing_subscriber::registry()
            .with(filter())
            .with(fmt.with_ansi(std::io::stderr().is_terminal()))
            .init();
    }
    note
}
