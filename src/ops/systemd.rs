//! Talking to systemd (`Type=notify`): `READY=1` once the database is prepared and the broker
//! acknowledged the subscriptions, `WATCHDOG=1` while the service makes progress, `STOPPING=1`
//! on a stop. Every call is a no-op when `NOTIFY_SOCKET` is not set (not run by systemd).

use std::sync::Arc;
use std::time::Duration;

use sd_notify::NotifyState;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::ops::health::Health;

fn send(states: &[NotifyState]) {
    // A lost notification is not worth stopping for: systemd then times the start out or the
    // watchdog fires, and says so in the journal.
    if let Err(e) = sd_notify::notify(states) {
        warn!(error = %e, "could not notify systemd");
    }
}

/// Tells systemd the service is stopping (so `systemctl status` shows it while it drains).
pub fn notify_stopping() {
    send(&[NotifyState::Stopping]);
}

/// How long each side may be silent before the watchdog goes hungry.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Patience {
    /// For the event loop. An idle connection polls only once per keep-alive (the ping), so
    /// this is at least twice `MQTT_KEEPALIVE_SECS`, whatever `WatchdogSec` says.
    pub event_loop: Duration,
    /// For the database checks: at least one check interval plus its timeout.
    pub db_check: Duration,
}

impl Patience {
    /// The patience for a watchdog period of `watchdog`.
    pub fn new(watchdog: Duration, keepalive: Duration, db_check_interval: Duration) -> Self {
        Self {
            event_loop: watchdog.max(keepalive * 2),
            db_check: watchdog.max(db_check_interval + crate::ops::health::DB_CHECK_TIMEOUT * 2),
        }
    }
}

/// Waits until the subscriptions are acknowledged, then sends `READY=1`; afterwards feeds the
/// watchdog when systemd asked for one (`WatchdogSec=` sets `WATCHDOG_USEC`). Call it once the
/// database is prepared. Runs until `shutdown`.
pub async fn notify_ready_then_feed_watchdog(
    health: Arc<Health>,
    keepalive: Duration,
    db_check_interval: Duration,
    shutdown: CancellationToken,
) {
    // Polled: the flag flips once per start, and 20 ms is well inside any start timeout.
    while !health.stats().is_subscribed() {
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(20)) => {}
            _ = shutdown.cancelled() => return,
        }
    }
    send(&[
        NotifyState::Ready,
        NotifyState::Status("database ready, subscribed at the broker"),
    ]);
    if std::env::var_os("NOTIFY_SOCKET").is_some() {
        info!("told systemd: ready");
    }
    let Some(limit) = sd_notify::watchdog_enabled() else {
        return;
    };
    info!(
        watchdog_secs = crate::ops::telemetry::secs(limit),
        "systemd watchdog on: fed while the event loop and the database checks make progress"
    );
    let patience = Patience::new(limit, keepalive, db_check_interval);
    let mut ticks = tokio::time::interval(limit / 2);
    let mut starving = false;
    loop {
        tokio::select! {
            _ = ticks.tick() => {}
            _ = shutdown.cancelled() => return,
        }
        let verdict = watchdog_verdict(
            health.stats().loop_beat().silence(),
            health.db_check_age(),
            patience,
        );
        match verdict {
            Ok(()) => {
                send(&[NotifyState::Watchdog]);
                starving = false;
            }
            Err(why) if !starving => {
                // Said once, just before systemd acts: the journal then shows why.
                warn!(reason = %why, "not feeding the systemd watchdog");
                starving = true;
            }
            Err(_) => {}
        }
    }
}

/// Whether the watchdog may be fed: the event loop has polled lately (or is waiting on
/// purpose), and a database check finished lately. A failed check counts as progress:
/// a database outage is waited out (and shown by `/readyz`), not a reason to restart; what the
/// watchdog catches is a service that stopped moving.
pub fn watchdog_verdict(
    loop_silence: Duration,
    db_check_age: Option<Duration>,
    patience: Patience,
) -> Result<(), String> {
    if loop_silence >= patience.event_loop {
        return Err(format!(
            "the MQTT event loop has not polled for {:.1}s",
            loop_silence.as_secs_f32()
        ));
    }
    match db_check_age {
        Some(age) if age < patience.db_check => Ok(()),
        Some(age) => Err(format!(
            "no database check has finished for {:.1}s",
            age.as_secs_f32()
        )),
        None => Err("no database check has finished yet".to_owned()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fed_only_while_both_sides_move() {
        let s = Duration::from_secs;
        let limit = Patience {
            event_loop: s(60),
            db_check: s(60),
        };
        assert_eq!(watchdog_verdict(s(1), Some(s(2)), limit), Ok(()));
        assert!(
            watchdog_verdict(s(61), Some(s(2)), limit)
                .unwrap_err()
                .contains("event loop")
        );
        assert!(
            watchdog_verdict(s(1), Some(s(60)), limit)
                .unwrap_err()
                .contains("database check")
        );
        assert!(watchdog_verdict(s(0), None, limit).is_err());
    }

    #[test]
    fn an_idle_connection_and_a_slow_check_are_not_hangs() {
        let s = Duration::from_secs;
        let p = Patience::new(s(10), s(30), s(5));
        assert_eq!(p.event_loop, s(60));
        assert_eq!(p.db_check, s(15));
        assert_eq!(Patience::new(s(90), s(30), s(5)).event_loop, s(90));
    }
}
