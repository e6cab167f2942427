//! Operations: the HTTP listener's metrics and health endpoints against a real ingest run.

use std::time::Duration;

use crate::app::{Running, Target, http_get, metric, migrate, register, spawn_service};
use crate::common::{
    PrivateMariaDb, QoS, TestDb, publish_many, shared_mqtt_port, wait_until_named,
};
use mqtt_ingest::intake::rejection::Rejection;

/// Scrapes `/metrics` of a running service.
async fn scrape(service: &Running) -> String {
    let addr = service.http.expect("the HTTP listener is on");
    let (status, body) = http_get(addr, "/metrics").await.unwrap();
    assert_eq!(status, 200, "{body}");
    body
}

/// Waits until `/readyz` answers `status`, and returns its body.
async fn wait_ready(service: &Running, status: u16, timeout: Duration) -> String {
    let addr = service.http.expect("the HTTP listener is on");
    wait_until_named(
        &format!("/readyz to answer {status}"),
        timeout,
        Duration::from_millis(100),
        async || {
            let (got, body) = http_get(addr, "/readyz").await?;
            if got == status {
                Ok(Some(body))
            } else {
                anyhow::bail!("{got}: {body}")
            }
        },
    )
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_exactly_what_was_published() {
    let db = TestDb::new().await;
    let pool = db.pool();
    migrate(&pool).await;
    const DEVICES: usize = 10;
    const SEQS: usize = 5;
    for d in 0..DEVICES {
        register(&pool, &format!("dev{d}")).await;
    }
    let target = Target::new(&db, shared_mqtt_port()).with("HTTP_LISTEN", "127.0.0.1:0");
    let service = spawn_service(&target).await;
    let addr = service.http.unwrap();
    assert_eq!(
        http_get(addr, "/healthz").await.unwrap(),
        (200, "ok\n".into())
    );
    assert_eq!(
        wait_ready(&service, 200, Duration::from_secs(10)).await,
        "ready\n"
    );

    let good = |seqs: std::ops::Range<usize>| {
        let mut out = Vec::new();
        for seq in seqs {
            for d in 0..DEVICES {
                out.push((
                    target.topic(&format!("dev{d}"), "data"),
                    format!(r#"{{"seq": {seq}}}"#).into_bytes(),
                ));
            }
        }
        out
    };
    // First half, then a scrape while the service works, then the rest.
    publish_many(target.mqtt_port, good(0..2), QoS::AtLeastOnce)
        .await
        .unwrap();
    let mid = scrape(&service).await;
    let received_mid = metric(&mid, "mqtt_ingest_messages_received_total").unwrap();
    assert!(received_mid <= (2 * DEVICES) as f64, "{received_mid}");

    let bad: Vec<(String, Vec<u8>)> = vec![
        (target.topic("dev0", "data"), b"{not json".to_vec()),
        (target.topic("dev1", "data"), b"[1, 2]".to_vec()),
        (target.topic("dev2", "data"), b"{broken".to_vec()),
        (target.topic("ghost1", "data"), br#"{"seq": 1}"#.to_vec()),
        (target.topic("ghost2", "heartbeat"), b"{}".to_vec()),
        // Written, with one part skipped.
        (target.topic("dev4", "status"), br#"{"rssi": -40}"#.to_vec()),
        (
            target.topic("dev5", "data"),
            br#"{"sensors": [{"sensor_name": "ok", "value": 1}, {"sensor_name": "BAD", "value": 2}]}"#
                .to_vec(),
        ),
    ];
    publish_many(target.mqtt_port, bad, QoS::AtLeastOnce)
        .await
        .unwrap();
    publish_many(target.mqtt_port, good(2..SEQS), QoS::AtLeastOnce)
        .await
        .unwrap();

    // (A bad topic cannot be shown here: the subscriptions only match the three kinds.)
    let total = DEVICES * SEQS + 7;
    let written = DEVICES * SEQS + 2;
    let stats = service.stats.clone();
    wait_until_named(
        "every message to be written or rejected",
        Duration::from_secs(20),
        Duration::from_millis(50),
        async || {
            let s = stats.snapshot();
            if s.received == total as u64 && s.succeeded + s.failed == total as u64 {
                Ok(true)
            } else {
                anyhow::bail!("{s:?}")
            }
        },
    )
    .await
    .unwrap();
    // The database check runs every second: wait for one that saw every device online.
    let text = wait_until_named(
        "devices_online to count the ten devices",
        Duration::from_secs(10),
        Duration::from_millis(200),
        async || {
            let text = scrape(&service).await;
            (metric(&text, "mqtt_ingest_devices_online") == Some(DEVICES as f64)).then_some(text)
        },
    )
    .await
    .unwrap();

    let get =
        |series: &str| metric(&text, series).unwrap_or_else(|| panic!("no {series} in\n{text}"));
    assert_eq!(get("mqtt_ingest_messages_received_total"), total as f64);
    assert_eq!(get("mqtt_ingest_messages_written_total"), written as f64);
    for reason in Rejection::REASONS {
        let want = match reason {
            "not_json" => 2.0,
            "not_object" => 1.0,
            "unknown_device" => 2.0,
            _ => 0.0,
        };
        let series = format!("mqtt_ingest_messages_rejected_total{{reason=\"{reason}\"}}");
        assert_eq!(get(&series), want, "{series}");
    }
    assert_eq!(get("mqtt_ingest_parts_skipped_total"), 1.0);
    let batches = get("mqtt_ingest_batches_total");
    assert!(batches >= 1.0);
    assert_eq!(get("mqtt_ingest_flush_duration_seconds_count"), batches);
    assert_eq!(
        get("mqtt_ingest_flush_duration_seconds_bucket{le=\"+Inf\"}"),
        batches
    );
    assert!(get("mqtt_ingest_flush_duration_seconds_sum") > 0.0);
    // At least one row per device, at most one per written message.
    let rows = get("mqtt_ingest_rows_written_total");
    assert!((DEVICES as f64..=written as f64).contains(&rows), "{rows}");
    assert_eq!(get("mqtt_ingest_queue_depth"), 0.0);
    assert_eq!(get("mqtt_ingest_queue_capacity"), 12288.0);
    assert_eq!(get("mqtt_ingest_mqtt_connected"), 1.0);
    assert_eq!(get("mqtt_ingest_mqtt_subscribed"), 1.0);
    assert_eq!(get("mqtt_ingest_mqtt_reconnects_total"), 0.0);
    assert_eq!(get("mqtt_ingest_db_errors_total"), 0.0);
    assert_eq!(get("mqtt_ingest_db_up"), 1.0);
    service.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_names_the_database_while_it_is_down() {
    let mut mariadb = PrivateMariaDb::start().await;
    let db = TestDb::on(mariadb.host(), mariadb.port()).await;
    let pool = db.pool();
    migrate(&pool).await;
    let target = Target::new(&db, shared_mqtt_port()).with("HTTP_LISTEN", "127.0.0.1:0");
    let service = spawn_service(&target).await;
    let addr = service.http.unwrap();
    wait_ready(&service, 200, Duration::from_secs(10)).await;

    mariadb.kill().await;
    let body = wait_ready(&service, 503, Duration::from_secs(20)).await;
    assert!(body.starts_with("not ready: database: "), "{body}");
    assert!(!body.contains("mqtt"), "the broker is fine: {body}");
    assert!(
        !body.contains(&mariadb.port().to_string()),
        "no error text (addresses, users) for whoever asks: {body}"
    );
    // Alive all the same: an outage is waited out, not a reason to restart.
    assert_eq!(http_get(addr, "/healthz").await.unwrap().0, 200);
    assert_eq!(
        metric(&scrape(&service).await, "mqtt_ingest_db_up"),
        Some(0.0)
    );

    mariadb.restart().await;
    wait_ready(&service, 200, Duration::from_secs(30)).await;
    service.stop().await.unwrap();
}

/// Refused credentials name the settings to fix, once, and retries wait the longest delay at
/// once instead of counting up to it (a person reads the log at that rate).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_db_password_names_the_settings_once() {
    let db = TestDb::new().await;
    let target =
        Target::new(&db, shared_mqtt_port()).with("DB_PASSWORD", "surely-not-the-password");
    let mut process = crate::app::ServiceProcess::spawn(&target);
    process
        .wait_for_log("database refused the service", Duration::from_secs(20))
        .await;
    let log = process.log();
    let line = log
        .lines()
        .find(|l| l.contains("database refused the service"))
        .unwrap();
    assert!(line.contains("check DB_USER and DB_PASSWORD"), "{line}");
    assert_eq!(line.matches("Access denied").count(), 1, "{line}");
    assert!(!line.contains("surely-not-the-password"), "{line}");
    let raw = line
        .split("retry_in_secs=")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .unwrap_or_else(|| panic!("no retry_in_secs in {line}"));
    // As a person reads it: to a tenth of a second.
    assert!(
        raw.split('.').nth(1).is_none_or(|d| d.len() <= 1),
        "{raw} in {line}"
    );
    let wait: f64 = raw.parse().unwrap();
    assert!(
        wait >= 24.0,
        "the first retry already waits the longest (with jitter): {wait}"
    );
    process.signal("TERM");
    assert_eq!(process.wait_exit(Duration::from_secs(20)).await, Some(0));

    // --check-config says the same.
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_mqtt-ingest"))
        .args(["--env-file", "/dev/null", "--check-config"])
        .env_clear()
        .envs(target.vars())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(!output.status.success());
    assert!(text.contains("check DB_USER and DB_PASSWORD"), "{text}");
}
