//! The status page as a person sees it: a real headless browser (Debian's chromium, installed by
//! `scripts/setup.sh --for-tests`) renders `/` of a running service that has had traffic and a
//! hostile rejected message, with its database stopped; the test reads what the browser shows
//! and writes a screenshot to `target/status-page.png`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::app::{Target, http_get, metric, migrate, register, spawn_service};
use crate::common::{
    PrivateMariaDb, QoS, mqtt_publish, publish_many, shared_mqtt_port, wait_until_named,
};

fn chromium() -> &'static str {
    ["/usr/bin/chromium", "/usr/bin/chromium-browser"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .expect("chromium is installed (scripts/setup.sh --for-tests)")
}

/// Runs headless chromium on `url` with `args` (a profile of its own, no sandbox: tests run as
/// root) and returns its stdout.
fn browse(url: &str, args: &[&str]) -> String {
    let profile = tempfile::tempdir().unwrap();
    let out = Command::new(chromium())
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .args(args)
        .arg(url)
        .output()
        .expect("chromium runs");
    assert!(
        out.status.success(),
        "chromium failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

const HOSTILE: &str = r#"<script>alert("owned")</script>"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_status_page_shows_states_numbers_and_escaped_rejects_in_a_browser() {
    let mut server = PrivateMariaDb::start().await;
    let db = server.test_db().await;
    let pool = db.pool();
    migrate(&pool).await;
    register(&pool, "dev0").await;
    let target = Target::new(&db, shared_mqtt_port())
        .with("HTTP_LISTEN", "127.0.0.1:0")
        .with("REJECTS_ENABLED", "true");
    let service = spawn_service(&target).await;
    let addr = service.http.expect("the listener is on");

    let good: Vec<_> = (0..5)
        .map(|i| {
            (
                target.topic("dev0", "data"),
                format!(r#"{{"temperature": 2{i}.5}}"#).into_bytes(),
            )
        })
        .collect();
    publish_many(target.mqtt_port, good, QoS::AtLeastOnce)
        .await
        .unwrap();
    mqtt_publish(
        target.mqtt_port,
        &target.topic("dev0", "data"),
        HOSTILE.as_bytes(),
        QoS::AtLeastOnce,
    )
    .await
    .unwrap();
    let done = service.settled(6).await;
    assert_eq!((done.succeeded, done.failed), (5, 1));
    // The reject is kept (written by its own task), and the page has read it.
    wait_until_named(
        "the kept reject on /status.json",
        Duration::from_secs(20),
        Duration::from_millis(100),
        async || {
            let (_, body) = http_get(addr, "/status.json").await?;
            let v: serde_json::Value = serde_json::from_str(&body)?;
            anyhow::Ok(
                v["rejects"]["latest"]
                    .as_array()
                    .is_some_and(|l| !l.is_empty()),
            )
        },
    )
    .await
    .unwrap();

    // The database goes away; the page says so at the next check.
    drop(pool);
    server.stop().await;
    wait_until_named(
        "the database check to fail",
        Duration::from_secs(30),
        Duration::from_millis(100),
        async || {
            let (_, body) = http_get(addr, "/status.json").await?;
            let v: serde_json::Value = serde_json::from_str(&body)?;
            anyhow::Ok(v["database"]["up"] == false)
        },
    )
    .await
    .unwrap();

    let url = format!("http://{addr}/");
    let dom = browse(&url, &["--dump-dom"]);
    let (_, metrics) = http_get(addr, "/metrics").await.unwrap();
    let value = |series: &str| metric(&metrics, series).unwrap() as u64;
    // States.
    assert!(dom.contains("connected, subscribed"), "{dom}");
    assert!(dom.contains("UNREACHABLE"), "{dom}");
    // Numbers, as /metrics has them.
    for (id, series) in [
        ("received", "mqtt_ingest_messages_received_total"),
        ("written", "mqtt_ingest_messages_written_total"),
    ] {
        let shown = format!("<span id=\"{id}\">{}</span>", value(series));
        assert!(dom.contains(&shown), "{shown} in {dom}");
    }
    let failed: u64 = metrics
        .lines()
        .filter(|l| l.starts_with("mqtt_ingest_messages_rejected_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum();
    assert!(
        dom.contains(&format!("<span id=\"rejected\">{failed}</span>")),
        "{dom}"
    );
    assert!(dom.contains("not_json"), "{dom}");
    // The hostile payload is text on the page, not an element: the browser's DOM has no script.
    assert!(
        dom.contains(r#"&lt;script&gt;alert("owned")&lt;/script&gt;"#),
        "{dom}"
    );
    assert!(!dom.contains("<script"), "{dom}");

    // A phone-sized screenshot for a developer to look at.
    let shot = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/status-page.png");
    let _ = std::fs::remove_file(&shot);
    browse(
        &url,
        &[
            &format!("--screenshot={}", shot.display()),
            "--window-size=412,1500",
            "--hide-scrollbars",
        ],
    );
    let size = std::fs::metadata(&shot).map(|m| m.len()).unwrap_or(0);
    assert!(size > 10_000, "screenshot of {size} bytes");
    service.abort().await;
}
