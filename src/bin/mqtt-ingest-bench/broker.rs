//! The benchmark's own Mosquitto on a free 127.0.0.1 port, session clean-up, and the
//! do-nothing `mosquitto_sub` subscriber that measures the broker's own limit.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use rumqttc::{AsyncClient, Event, MqttOptions, Outgoing, Packet};
use tokio::process::{Child, Command};

use crate::procs;

const START_TIMEOUT: Duration = Duration::from_secs(10);
const SESSION_TIMEOUT: Duration = Duration::from_secs(10);

pub struct Broker {
    pub port: u16,
    /// "2.0.11", from `mosquitto -h`.
    pub version: String,
    dir: PathBuf,
    child: Option<Child>,
    /// Client ids of persistent sessions the benchmark made (service, mosquitto_sub).
    sessions: Mutex<Vec<String>>,
}

/// The broker's configuration: nothing is dropped (no queue limit), no persistence (a
/// benchmark broker that is never restarted needs none), the in-flight window as asked.
fn config(port: u16, dir: &Path, inflight: u32) -> String {
    let mut c = String::new();
    let _ = writeln!(c, "# written by mqtt-ingest-bench; private, loopback only");
    let _ = writeln!(c, "listener {port} 127.0.0.1");
    let _ = writeln!(c, "allow_anonymous true");
    // Never restarted during a run: nothing to keep across restarts.
    let _ = writeln!(c, "persistence false");
    // Unacknowledged QoS 1 messages in flight to each client. The service acks after commit,
    // so this window bounds its rate (about window / commit latency).
    let _ = writeln!(c, "max_inflight_messages {inflight}");
    // 0 = no limit: a stopped service's backlog must not be dropped.
    let _ = writeln!(c, "max_queued_messages 0");
    let _ = writeln!(c, "max_queued_bytes 0");
    let _ = writeln!(c, "log_dest file {}", dir.join("mosquitto.log").display());
    let _ = writeln!(c, "log_type error");
    let _ = writeln!(c, "log_type warning");
    let _ = writeln!(c, "log_type notice");
    if procs::is_root() {
        // Otherwise Mosquitto drops to the `mosquitto` user, which cannot write our tmp dir.
        let _ = writeln!(c, "user root");
    }
    c
}

impl Broker {
    /// Starts Mosquitto in the foreground on a free loopback port and waits until it accepts
    /// connections. `dir` holds its config and log.
    pub async fn start(bin: &Path, dir: &Path, inflight: u32) -> anyhow::Result<Broker> {
        let version = version(bin).await;
        let mut last_err = None;
        for _ in 0..3 {
            let port = procs::free_port()?;
            match Self::launch(bin, dir, port, inflight).await {
                Ok(child) => {
                    return Ok(Broker {
                        port,
                        version,
                        dir: dir.to_owned(),
                        child: Some(child),
                        sessions: Mutex::new(Vec::new()),
                    });
                }
                // The port may have been taken in between: try another.
                Err(e) => last_err = Some(e),
            }
        }
        Err(last_err.unwrap_or_else(|| anyhow::anyhow!("mosquitto did not start")))
    }

    async fn launch(bin: &Path, dir: &Path, port: u16, inflight: u32) -> anyhow::Result<Child> {
        let conf = dir.join("mosquitto.conf");
        std::fs::write(&conf, config(port, dir, inflight)).context("writing mosquitto.conf")?;
        let stderr = std::fs::File::create(dir.join("mosquitto.stderr"))?;
        let mut child = Command::new(bin)
            .arg("-c")
            .arg(&conf)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(status) = child.try_wait()? {
                let err = std::fs::read_to_string(dir.join("mosquitto.stderr")).unwrap_or_default();
                let log = std::fs::read_to_string(dir.join("mosquitto.log")).unwrap_or_default();
                bail!("mosquitto exited at start ({status}): {err}{log}");
            }
            if tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_ok()
            {
                return Ok(child);
            }
            if Instant::now() > deadline {
                bail!("mosquitto did not accept connections on 127.0.0.1:{port} within 10 s");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
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
            if let Err(e) = remove_session(self.port, &id).await {
                failed.push(format!("{id}: {e:#}"));
            }
        }
        if !failed.is_empty() {
            bail!("could not remove sessions: {}", failed.join("; "));
        }
        Ok(())
    }

    pub fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(self.dir.join("mosquitto.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    /// SIGTERM, and SIGKILL if it has not gone within 10 s.
    pub async fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            if let Some(pid) = child.id() {
                let _ = procs::sigterm(pid);
            }
            if tokio::time::timeout(Duration::from_secs(10), child.wait())
                .await
                .is_err()
            {
                let _ = child.kill().await;
            }
        }
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

/// Connects once with a clean session and the given client id, which discards the broker's
/// stored session for it, then disconnects.
pub async fn remove_session(port: u16, client_id: &str) -> anyhow::Result<()> {
    let mut o = MqttOptions::new(client_id, "127.0.0.1", port);
    o.set_clean_session(true)
        .set_keep_alive(Duration::from_secs(10));
    let (client, mut events) = AsyncClient::new(o, 10);
    let work = async {
        loop {
            match events.poll().await.context("MQTT")? {
                Event::Incoming(Packet::ConnAck(_)) => client.disconnect().await?,
                Event::Outgoing(Outgoing::Disconnect) => return anyhow::Ok(()),
                _ => {}
            }
        }
    };
    tokio::time::timeout(SESSION_TIMEOUT, work)
        .await
        .context("timed out")?
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
