//! The benchmark's own Mosquitto (the test kit's, on a free 127.0.0.1 port), session clean-up, and the
//! subscribers that measure the broker's own limit: a do-nothing rumqttc one, and `mosquitto_sub`.

use std::path::Path;
use std::process::Stdio;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use mqtt_ingest_testkit::{MosquittoConfig, PrivateMosquitto, clear_session};
use tokio::process::Command;

const SESSION_TIMEOUT: Duration = Duration::from_secs(10);

/// The benchmark's broker: the test kit's private Mosquitto, set up for measuring, with the
/// persistent sessions the scenarios made.
pub struct Broker {
    /// "2.0.11", from `mosquitto -h`.
    pub version: String,
    server: PrivateMosquitto,
    /// Client ids of persistent sessions the benchmark made (service, mosquitto_sub).
    sessions: Mutex<Vec<String>>,
}

impl Broker {
    /// Starts Mosquitto on a free loopback port: nothing is dropped (no queue limit), no
    /// persistence (a broker that is never restarted needs none), quiet logs, and the
    /// in-flight window as asked — the service acks after commit, so that window bounds its
    /// rate (about window / commit latency).
    pub async fn start(bin: &Path, inflight: u32) -> anyhow::Result<Broker> {
        let server = PrivateMosquitto::try_start_with(MosquittoConfig {
            program: Some(bin.to_owned()),
            persistence: false,
            max_inflight: inflight,
            max_queued: 0,
            verbose_log: false,
            extra: String::new(),
        })
        .await?;
        Ok(Broker {
            version: version(bin).await,
            server,
            sessions: Mutex::new(Vec::new()),
        })
    }

    /// Its loopback port.
    pub fn port(&self) -> u16 {
        self.server.port()
    }

    /// CPU seconds the broker has used so far.
    pub fn cpu_seconds(&self) -> Option<f64> {
        self.server.pid().and_then(mqtt_ingest_testkit::cpu_seconds)
    }

    /// Remembers a client id whose persistent session must be removed after the scenario.
    pub fn track(&self, client_id: &str) {
        self.sessions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(client_id.to_owned());
    }

    /// Removes every tracked persistent session (connect once with a clean session).
    pub async fn remove_sessions(&self) -> anyhow::Result<()> {
        let ids = std::mem::take(&mut *self.sessions.lock().unwrap_or_else(|e| e.into_inner()));
        let mut failed = Vec::new();
        for id in ids {
            if let Err(e) = clear_session(self.port(), &id).await {
                failed.push(format!("{id}: {e:#}"));
            }
        }
        if !failed.is_empty() {
            bail!("could not remove sessions: {}", failed.join("; "));
        }
        Ok(())
    }

    pub fn log_tail(&self) -> String {
        self.server.log_tail()
    }

    /// SIGTERM, and SIGKILL if it does not go.
    pub async fn stop(&mut self) {
        self.server.stop().await;
    }
}

/// The version `mosquitto -h` prints ("mosquitto version 2.0.11"), or "unknown".
async fn version(bin: &Path) -> String {
    let out = Command::new(bin)
        .arg("-h")
        .stdin(Stdio::null())
        .output()
        .await;
    let text = out
        .map(|o| {
            format!(
                "{}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            )
        })
        .unwrap_or_default();
    text.lines()
        .find_map(|l| l.trim().strip_prefix("mosquitto version "))
        .map_or_else(|| "unknown".to_owned(), |v| v.trim().to_owned())
}

/// Whether this Mosquitto has the in-flight quota fixes of 2.0.13 (upstream issue 2306).
/// Before them, after the first window each PUBACK releases a whole new window, so
/// `max_inflight_messages` does not bound what is in flight to a slow subscriber.
pub fn enforces_inflight(version: &str) -> Option<bool> {
    let mut parts = version.split('.').map(|p| p.parse::<u32>().ok());
    let (Some(Some(a)), Some(Some(b)), Some(Some(c))) = (parts.next(), parts.next(), parts.next())
    else {
        return None;
    };
    Some((a, b, c) >= (2, 0, 13))
}

/// `mosquitto_sub` at QoS 1 with a persistent session, throwing the payloads away.
pub struct Sub<'a> {
    pub bin: &'a Path,
    pub port: u16,
    pub client_id: &'a str,
    pub filter: &'a str,
}

impl Sub<'_> {
    fn command(&self) -> Command {
        let mut c = Command::new(self.bin);
        c.args(["-h", "127.0.0.1", "-p"])
            .arg(self.port.to_string())
            .args(["-q", "1", "-c", "-i", self.client_id, "-t", self.filter])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        c
    }

    /// Subscribes and exits at once (`-E`): creates the persistent session.
    pub async fn create_session(&self) -> anyhow::Result<()> {
        let child = self
            .command()
            .arg("-E")
            .spawn()
            .context("starting mosquitto_sub")?;
        let out = tokio::time::timeout(SESSION_TIMEOUT, child.wait_with_output())
            .await
            .context("mosquitto_sub -E did not finish within 10 s")??;
        if !out.status.success() {
            bail!(
                "mosquitto_sub -E failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(())
    }

    /// Consumes `count` messages (`-C`) and returns the time from spawn to exit.
    pub async fn consume(&self, count: u64, limit: Duration) -> anyhow::Result<Duration> {
        let started = Instant::now();
        let child = self
            .command()
            .arg("-C")
            .arg(count.to_string())
            .spawn()
            .context("starting mosquitto_sub")?;
        let out = tokio::time::timeout(limit, child.wait_with_output())
            .await
            .with_context(|| {
                format!("mosquitto_sub did not receive {count} messages within {limit:?}")
            })??;
        let took = started.elapsed();
        if !out.status.success() {
            bail!(
                "mosquitto_sub failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(took)
    }
}

/// A subscriber that does nothing but take messages: rumqttc at QoS 1 with a persistent
/// session, a PUBACK for each (rumqttc's own), nothing parsed beyond the packet, nothing
/// printed. What the broker can deliver on one connection: the drains' yardstick.
pub struct NullSub<'a> {
    pub port: u16,
    pub client_id: &'a str,
    pub filter: &'a str,
}

impl NullSub<'_> {
    fn client(&self) -> (rumqttc::AsyncClient, rumqttc::EventLoop) {
        let mut o = rumqttc::MqttOptions::new(self.client_id, "127.0.0.1", self.port);
        o.set_clean_session(false)
            .set_keep_alive(Duration::from_secs(30))
            .set_max_packet_size(1 << 20, 1 << 20);
        rumqttc::AsyncClient::new(o, 100)
    }

    /// Connects, subscribes, and disconnects: creates the persistent session.
    pub async fn create_session(&self) -> anyhow::Result<()> {
        let (client, mut events) = self.client();
        client
            .subscribe(self.filter, rumqttc::QoS::AtLeastOnce)
            .await?;
        let subscribe = async {
            loop {
                if let rumqttc::Event::Incoming(rumqttc::Packet::SubAck(_)) = events.poll().await? {
                    return anyhow::Ok(());
                }
            }
        };
        tokio::time::timeout(SESSION_TIMEOUT, subscribe)
            .await
            .context("no SUBACK within 10 s")??;
        client.disconnect().await?;
        disconnected(&mut events).await;
        Ok(())
    }

    /// Takes `count` messages from the session; the time from connecting to the last.
    pub async fn consume(&self, count: u64, limit: Duration) -> anyhow::Result<Duration> {
        let started = Instant::now();
        let (client, mut events) = self.client();
        let mut received = 0u64;
        let take = async {
            while received < count {
                if let rumqttc::Event::Incoming(rumqttc::Packet::Publish(_)) = events.poll().await?
                {
                    received += 1;
                }
            }
            anyhow::Ok(())
        };
        tokio::time::timeout(limit, take).await.with_context(|| {
            format!("the subscriber did not receive {count} messages within {limit:?}")
        })??;
        let took = started.elapsed();
        // The last PUBACKs go out with the disconnect.
        let _ = client.try_disconnect();
        disconnected(&mut events).await;
        Ok(took)
    }
}

/// Polls until the DISCONNECT asked for has gone out (at most 2 s).
async fn disconnected(events: &mut rumqttc::EventLoop) {
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        while !matches!(
            events.poll().await,
            Ok(rumqttc::Event::Outgoing(rumqttc::Outgoing::Disconnect)) | Err(_)
        ) {}
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::enforces_inflight;

    #[test]
    fn inflight_quota_fix_is_2_0_13() {
        assert_eq!(enforces_inflight("2.0.11"), Some(false));
        assert_eq!(enforces_inflight("2.0.13"), Some(true));
        assert_eq!(enforces_inflight("2.0.18"), Some(true));
        assert_eq!(enforces_inflight("2.1.0"), Some(true));
        assert_eq!(enforces_inflight("unknown"), None);
    }
}
