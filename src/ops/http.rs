//! The operations listener: `/metrics`, `/healthz` and `/readyz` over HTTP/1.1, served by hyper.
//!
//! hyper parses the requests (bare-LF line ends included) and writes the responses; this module
//! keeps what an operations port reachable from the network needs on top: at most
//! `MAX_CONNECTIONS` served at once, a deadline for the request head, no keep-alive, and only
//! GET and HEAD (anything else is a 405 with `Allow`).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::header::{ALLOW, CACHE_CONTROL, CONTENT_TYPE};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info};

use crate::ops::health::Health;
use crate::ops::{metrics, status};

/// How long a client may take to send its request head.
const READ_TIMEOUT: Duration = Duration::from_secs(5);
/// The longest one connection is served, answer included.
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(30);
/// Connections served at once; more wait in the kernel's accept queue.
const MAX_CONNECTIONS: usize = 32;
/// Largest request head read (hyper's smallest buffer); a probe's GET is a few hundred bytes.
const MAX_HEAD: usize = 8 * 1024;

/// Binds the listener (at start-up, so a taken port stops the service with a clear error).
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}

/// Serves requests until `shutdown` fires.
pub async fn serve(listener: TcpListener, health: Arc<Health>, shutdown: CancellationToken) {
    if let Ok(addr) = listener.local_addr() {
        info!(address = %addr, "HTTP listener: / (status page) /status.json /metrics /healthz /readyz");
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
            let service = service_fn(move |req: Request<hyper::body::Incoming>| {
                let health = health.clone();
                let (method, path) = (req.method().clone(), req.uri().path().to_owned());
                async move {
                    let answer = match (&method, path.as_str()) {
                        // The status page reads the kept rejects: the only asynchronous answer.
                        (&Method::GET | &Method::HEAD, "/" | "/status.json") => {
                            let data = health.status().await;
                            if path == "/" {
                                Answer {
                                    status: StatusCode::OK,
                                    content_type: "text/html; charset=utf-8",
                                    body: status::page(&data),
                                }
                            } else {
                                Answer {
                                    status: StatusCode::OK,
                                    content_type: "application/json",
                                    body: data.to_string(),
                                }
                            }
                        }
                        _ => route(&method, &path, &health),
                    };
                    Ok::<_, Infallible>(answer.into_response())
                }
            });
            let connection = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(READ_TIMEOUT)
                .keep_alive(false)
                .max_buf_size(MAX_HEAD)
                .serve_connection(TokioIo::new(stream), service);
            // A client that does not read its answer does not keep the slot.
            match tokio::time::timeout(CONNECTION_TIMEOUT, connection).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => debug!(peer = %peer, error = %e, "HTTP request failed"),
                Err(_) => debug!(peer = %peer, "HTTP connection timed out"),
            }
            drop(slot);
        });
    }
}

/// What to answer: status, content type and body (hyper leaves the body out for HEAD).
#[derive(Debug, PartialEq)]
struct Answer {
    status: StatusCode,
    content_type: &'static str,
    body: String,
}

impl Answer {
    fn text(status: StatusCode, body: impl Into<String>) -> Self {
        Self {
            status,
            content_type: "text/plain; charset=utf-8",
            body: body.into(),
        }
    }

    fn into_response(self) -> Response<Full<Bytes>> {
        let mut response = Response::new(Full::new(Bytes::from(self.body)));
        *response.status_mut() = self.status;
        let headers = response.headers_mut();
        headers.insert(
            CONTENT_TYPE,
            hyper::header::HeaderValue::from_static(self.content_type),
        );
        headers.insert(
            CACHE_CONTROL,
            hyper::header::HeaderValue::from_static("no-store"),
        );
        if self.status == StatusCode::METHOD_NOT_ALLOWED {
            headers.insert(ALLOW, hyper::header::HeaderValue::from_static("GET, HEAD"));
        }
        response
    }
}

/// Picks the answer for a request.
fn route(method: &Method, path: &str, health: &Health) -> Answer {
    if method != Method::GET && method != Method::HEAD {
        return Answer::text(StatusCode::METHOD_NOT_ALLOWED, "only GET and HEAD\n");
    }
    match path {
        "/metrics" => Answer {
            status: StatusCode::OK,
            content_type: metrics::CONTENT_TYPE,
            body: metrics::render(&health.stats().snapshot(), &health.gauges()),
        },
        "/healthz" => Answer::text(StatusCode::OK, "ok\n"),
        "/readyz" => match health.readiness() {
            Ok(()) => Answer::text(StatusCode::OK, "ready\n"),
            Err(why) => Answer::text(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("not ready: {why}\n"),
            ),
        },
        _ => Answer::text(
            StatusCode::NOT_FOUND,
            "not found; try /, /status.json, /metrics, /healthz, /readyz\n",
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::stats::Stats;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn health() -> Arc<Health> {
        Arc::new(Health::new(Arc::new(Stats::default())))
    }

    #[test]
    fn routes_and_methods() {
        let h = health();
        let get = |path: &str| route(&Method::GET, path, &h);
        assert_eq!(get("/healthz").status, StatusCode::OK);
        assert_eq!(get("/healthz").body, "ok\n");
        assert_eq!(get("/metrics").status, StatusCode::OK);
        assert!(
            get("/metrics")
                .body
                .contains("mqtt_ingest_messages_received_total 0")
        );
        let ready = get("/readyz");
        assert_eq!(ready.status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(ready.body.contains("mqtt:") && ready.body.contains("database:"));
        assert_eq!(get("/nope").status, StatusCode::NOT_FOUND);
        assert_eq!(route(&Method::HEAD, "/healthz", &h).status, StatusCode::OK);
        let post = route(&Method::POST, "/metrics", &h).into_response();
        assert_eq!(post.status(), StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(post.headers()[ALLOW], "GET, HEAD");
    }

    /// Sends `request` as raw bytes and returns the whole answer.
    async fn exchange(request: &[u8]) -> String {
        let listener = bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shutdown = CancellationToken::new();
        let server = tokio::spawn(serve(listener, health(), shutdown.clone()));
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        stream.write_all(request).await.unwrap();
        let mut answer = String::new();
        tokio::time::timeout(Duration::from_secs(10), stream.read_to_string(&mut answer))
            .await
            .expect("answered and closed in time")
            .unwrap();
        shutdown.cancel();
        server.await.unwrap();
        answer
    }

    #[tokio::test]
    async fn bare_lf_requests_are_answered_and_the_connection_closed() {
        let answer = exchange(b"GET /healthz HTTP/1.1\nHost: x\n\n").await;
        assert!(answer.starts_with("HTTP/1.1 200 OK"), "{answer}");
        assert!(answer.ends_with("ok\n"), "{answer}");
    }

    #[tokio::test]
    async fn head_has_no_body_and_other_methods_get_allow() {
        let head = exchange(b"HEAD /healthz HTTP/1.1\r\nHost: x\r\n\r\n").await;
        assert!(head.starts_with("HTTP/1.1 200 OK"), "{head}");
        assert!(head.ends_with("\r\n\r\n"), "no body: {head}");
        let delete = exchange(b"DELETE /metrics HTTP/1.1\r\nHost: x\r\n\r\n").await;
        assert!(delete.starts_with("HTTP/1.1 405"), "{delete}");
        assert!(
            delete.to_ascii_lowercase().contains("allow: get, head"),
            "{delete}"
        );
    }
}
