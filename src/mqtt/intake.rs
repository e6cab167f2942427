//! The intake of one publish: topic and bytes through the pure parsers into an update or a
//! rejection, the warnings and counters, kept rejects, and the hand-over to the writers' queues
//! (the backpressure towards the broker).

use chrono::Utc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::Fatal;
use super::client::Message;
use super::outbox::Outbox;
use crate::config::MqttSettings;
use crate::intake::payload::{self, Rules};
use crate::ops::stats::Stats;
use crate::work::Job;
use crate::work::RejectSink;
use crate::writer::Router;

/// At most this many characters of a topic reach a log line.
const TOPIC_SHOWN: usize = 120;

fn shown_topic(topic: &str) -> String {
    let mut s: String = topic
        .chars()
        .take(TOPIC_SHOWN)
        .collect::<String>()
        .escape_debug()
        .to_string();
    if topic.chars().nth(TOPIC_SHOWN).is_some() {
        s.push('…');
    }
    s
}

/// What handling one publish needs.
pub(super) struct Intake<'a> {
    pub(super) settings: &'a MqttSettings,
    pub(super) rules: &'a Rules,
    pub(super) jobs: &'a Router,
    pub(super) rejects: Option<&'a RejectSink>,
    pub(super) stats: &'a Stats,
    pub(super) shutdown: &'a CancellationToken,
    /// The connection's span: entered only for the (rate-limited) warnings, since entering
    /// one per message costs a fifth of the drain rate.
    pub(super) span: &'a tracing::Span,
}

pub(super) async fn handle_publish(
    message: Message,
    ctx: &Intake<'_>,
    outbox: &mut Outbox,
) -> Result<(), Fatal> {
    let Intake {
        settings,
        rules,
        jobs,
        rejects,
        stats,
        shutdown,
        span,
    } = *ctx;
    if shutdown.is_cancelled() {
        // Not taken: unacknowledged, so the broker keeps it for the next start.
        return Ok(());
    }
    let received_at = Utc::now();
    let Message {
        topic,
        payload,
        ack,
    } = message;
    let outcome = settings
        .topics
        .parse(&topic)
        .and_then(|(device, kind)| payload::process(kind, device, &payload, received_at, rules));
    let ack = ack.map(|delivery| outbox.receive(delivery));
    let evidence = rejects.map(|sink| sink.evidence(&topic, &payload));
    match outcome {
        Err(rejection) => {
            stats.received();
            stats.rejected(&rejection);
            // Parsed again only here, off the accepted path. A bad topic has no valid device
            // id: its warnings share one key.
            let device = settings.topics.parse(&topic).ok().map(|(d, _)| d);
            let device_key = device.as_ref().map_or("", |d| d.as_str());
            if let Some(left_out) = stats.warnings().should_warn(device_key, rejection.reason()) {
                let _entered = span.enter();
                match &rejection {
                    // The Python service's words, which its README has operators grep for.
                    crate::intake::rejection::Rejection::NotJson(e)
                        if stats.warnings().codehubot_wording() =>
                    {
                        let head: String = String::from_utf8_lossy(&payload)
                            .chars()
                            .take(100)
                            .collect();
                        warn!(
                            topic = %shown_topic(&topic),
                            reason = rejection.reason(),
                            similar_left_out = left_out,
                            "❌ JSON解析失败: {e}, payload: {}",
                            head.escape_debug()
                        );
                    }
                    _ => warn!(
                        topic = %shown_topic(&topic),
                        reason = rejection.reason(),
                        error = %rejection,
                        similar_left_out = left_out,
                        "message rejected"
                    ),
                }
            }
            if let (Some(sink), Some(evidence)) = (rejects, evidence) {
                sink.record(
                    evidence,
                    device.as_ref().map(|d| d.as_str()),
                    &rejection,
                    rules.time.zone.at(received_at),
                    1,
                );
            }
            // Final: the same message would be rejected again. Its ack still waits for every
            // earlier message's.
            if let Some(token) = ack {
                outbox.acks.settle(token);
            }
            Ok(())
        }
        Ok(accepted) => {
            report_undated(&accepted, stats, span);
            if !accepted.skipped.is_empty() {
                stats.parts_skipped(accepted.skipped.len() as u64);
                let device_key = accepted.update.device.as_str();
                if let Some(left_out) = stats.warnings().should_warn(device_key, "parts_skipped") {
                    let _entered = span.enter();
                    let parts: Vec<String> = accepted
                        .skipped
                        .iter()
                        .map(|s| format!("{}: {}", s.part, s.reason))
                        .collect();
                    warn!(
                        device = %accepted.update.device,
                        skipped = %parts.join("; "),
                        similar_left_out = left_out,
                        "skipped part of a message"
                    );
                    if stats.warnings().codehubot_wording() {
                        for name in accepted.skipped.iter().filter_map(|s| s.bad_name.as_ref()) {
                            warn!(device = %accepted.update.device, "⚠️ 传感器名称格式不正确，跳过: {name}");
                        }
                    }
                }
            }
            let job = Job {
                update: accepted.update,
                ack,
                evidence: evidence.map(Box::new),
            };
            // Waits only when the writer is behind by a whole queue: that is the backpressure
            // towards the broker. With QoS 1 the broker's inflight window keeps it from filling.
            // Counted before it is queued: once queued, a writer on another thread may commit
            // and count it before this line would run, and `received` must never trail
            // `succeeded + failed`.
            stats.received();
            stats.loop_beat().waiting();
            let sent = jobs.send(job).await;
            stats.loop_beat().beat();
            if sent.is_err() {
                // Unacknowledged (and so is every later message of this connection): the
                // broker keeps it for the next start.
                stats.not_received();
                debug!("writer closed; message left to the broker for redelivery");
                if !shutdown.is_cancelled() {
                    // A writer ended on its own: its token can never settle, so no later ack
                    // could go out either. Stop rather than hold the broker's window forever.
                    return Err(Fatal("a writer stopped unexpectedly".into()));
                }
            }
            Ok(())
        }
    }
}

/// Counts the timestamps of `accepted` that dated nothing and warns about them, at most once
/// per warning interval for all devices together: a fleet whose firmware sends uptime counters
/// (CodeHubot's does) would otherwise warn for every device, all the time.
fn report_undated(accepted: &payload::Accepted, stats: &Stats, span: &tracing::Span) {
    for u in &accepted.undated {
        stats.undated(u.reason);
    }
    if let Some(first) = accepted.undated.first()
        && let Some(left_out) = stats.warnings().should_warn("", "timestamp_undated")
    {
        let _entered = span.enter();
        warn!(
            device = %accepted.update.device,
            part = %first.part,
            value = %first.shown,
            reason = first.reason.as_str(),
            similar_left_out = left_out,
            "a device timestamp dates nothing (not a wall-clock time, or too far ahead): its readings keep the receive time"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_topics_are_shortened_and_escaped() {
        let t = format!("devices/{}\n/data", "x".repeat(500));
        let s = shown_topic(&t);
        assert!(s.chars().count() <= TOPIC_SHOWN + 2);
        assert!(!s.contains('\n'));
    }
}
