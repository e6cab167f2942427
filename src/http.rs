//! The operations listener: `/metrics`, `/healthz` and `/readyz` over plain HTTP/1.1.
//!
//! A small responder of its own rather than an HTTP framework: three GET endpoints for
//! Prometheus and probes need no keep-alive, bodies or routing, so it reads one request head
//! (bounded in size and time), answers, and closes the connection. That keeps the surface an
//! attacker on the network can reach to a few dozen lines, and the dependency tree unchanged.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info};

use crate::health::Health;
use crate::metrics;

/// Largest request head read; a probe's GET is a few hundred bytes.
const MAX_HEAD: usize = 8 * 1024;
/// How long a client may take to send its request head.
const READ_TIMEOUT: Duration = Duration::from_secs(5);
/// Connections served at once; more wait in the kernel's accept queue.
const MAX_CONNECTIONS: usize = 32;

/// Binds the listener (at start-up, so a taken port stops the service with a clear error).
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}

/// Serves requests until `shutdown` fires.
pub async fn serve(listener: TcpListener, health: Arc<Health>, shutdown: CancellationToken) {
    if let Ok(addr) = listener.local_addr() {
        info!(address = %addr, "HTTP listener: /metrics /healthz /readyz");
    }
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        // Take a slot first, so at most MAX_CONNECTIONS are open and served.
        let slot = tokio::select! {
            slot = slots.clone().acquire_owned() => match slot {
                Ok(slot) => slot,
                Err(_) => return, // never closed
            },
            _ = shutdown.cancelled() => return,
        };
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(conn) => conn,
                Err(e) => {
                    // Out of file descriptors and the like: pause rather than spin.
                    debug!(error = %e, "HTTP accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = shutdown.cancelled() => return,
        };
        let health = health.clone();
        tokio::spawn(async move {
            if let Err(e) = respond(stream, &health).await {
                debug!(peer = %peer, error = %e, "HTTP request failed");
            }
            drop(slot);
        });
    }
}

/// A response: status line, content type and body.
#[derive(Debug, PartialEq)]
struct Response {
    status: &'static str,
    content_type: &'static str,
    body: String,
}

impl Response {
    fn text(status: &'static str, body: impl Into<String>) -> Self {
        Self {
            status,
            content_type: "text/plain; charset=utf-8",
            body: body.into(),
        }
    }
}

async fn respond(mut stream: TcpStream, health: &Health) -> std::io::Result<()> {
    let head = match tokio::time::timeout(READ_TIMEOUT, read_head(&mut stream)).await {
        Ok(head) => head?,
        Err(_) => return Ok(()), // a client that says nothing gets nothing
    };
    let (response, head_only) = match head {
        Some(head) => route(&head, health),
        None => (Response::text("400 Bad Request", "bad request\n"), false),
    };
    let mut out = format!(
        "HTTP/1.1 {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nCache-Control: no-store\r\nConnection: close\r\n\r\n",
        response.status,
        response.content_type,
        response.body.len()
    );
    if !head_only {
        out.push_str(&response.body);
    }
    stream.write_all(out.as_bytes()).await?;
    stream.shutdown().await
}

/// Reads up to the blank line that ends a request head. `None` if it is too long or the
/// client closed early.
async fn read_head(stream: &mut TcpStream) -> std::io::Result<Option<String>> {
    let mut buf = Vec::with_capacity(512);
    let mut chunk = [0u8; 1024];
    loop {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Ok(None);
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            buf.truncate(end);
            return Ok(String::from_utf8(buf).ok());
        }
        if buf.len() > MAX_HEAD {
            return Ok(None);
        }
    }
}

/// Picks the answer for a request head; the flag says "HEAD: no body".
fn route(head: &str, health: &Health) -> (Response, bool) {
    let mut parts = head.lines().next().unwrap_or("").split(' ');
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let head_only = method == "HEAD";
    if method != "GET" && !head_only {
        return (
            Response::text("405 Method Not Allowed", "only GET and HEAD\n"),
            false,
        );
    }
    let path = target.split('?').next().unwrap_or("");
    let response = match path {
        "/metrics" => Response {
            status: "200 OK",
            content_type: "text/plain; version=0.0.4; charset=utf-8",
            body: metrics::render(&health.stats().snapshot(), &health.gauges()),
        },
        "/healthz" => Response::text("200 OK", "ok\n"),
        "/readyz" => match health.readiness() {
            Ok(()) => Response::text("200 OK", "ready\n"),
            Err(why) => Response::text("503 Service Unavailable", format!("not ready: {why}\n")),
        },
        _ => Response::text(
            "404 Not Found",
            "not found; try /metrics, /healthz, /readyz\n",
        ),
    };
    (response, head_only)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::Stats;

    fn health() -> Health {
        Health::new(Arc::new(Stats::default()))
    }

    #[test]
    fn routes_and_methods() {
        let h = health();
        let get = |target: &str| route(&format!("GET {target} HTTP/1.1\r\nHost: x"), &h).0;
        assert_eq!(get("/healthz").status, "200 OK");
        assert_eq!(get("/healthz").body, "ok\n");
        assert_eq!(get("/metrics?x=1").status, "200 OK");
        assert!(
            get("/metrics")
                .body
                .contains("mqtt_ingest_messages_received_total 0")
        );
        let ready = get("/readyz");
        assert_eq!(ready.status, "503 Service Unavailable");
        assert!(ready.body.contains("mqtt:") && ready.body.contains("database:"));
        assert_eq!(get("/nope").status, "404 Not Found");
        let (r, head_only) = route("HEAD /healthz HTTP/1.1", &h);
        assert_eq!((r.status, head_only), ("200 OK", true));
        assert_eq!(
            route("POST /metrics HTTP/1.1", &h).0.status,
            "405 Method Not Allowed"
        );
        assert_eq!(route("", &h).0.status, "405 Method Not Allowed");
    }
}
