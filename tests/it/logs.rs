//! Log files (`LOG_DIR`): the seed's two files, the error file holding errors only.

use std::path::Path;
use std::time::Duration;

use crate::app::{ServiceProcess, Target, migrate, register};
use crate::common::{PrivateMariaDb, QoS, TestDb, clear_session, mqtt_publish, shared_mqtt_port};

/// The one file in `dir` whose name starts with `prefix` and a dot (the day follows), as text.
fn rotated(dir: &Path, prefix: &str) -> String {
    let matching: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.starts_with(&format!("{prefix}.")))
        .collect();
    assert_eq!(matching.len(), 1, "{prefix}: {matching:?}");
    std::fs::read_to_string(dir.join(&matching[0])).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn log_dir_gets_the_seeds_two_files_and_the_error_file_only_errors() {
    let mut mariadb = PrivateMariaDb::start().await;
    let db = TestDb::on(mariadb.host(), mariadb.port()).await;
    let pool = db.pool();
    migrate(&pool).await;
    register(&pool, "d1").await;
    mariadb.kill().await;

    let dir = tempfile::tempdir().unwrap();
    let logs = dir.path().join("logs"); // created by the service
    let target = Target::new(&db, shared_mqtt_port())
        .with("LOG_DIR", logs.to_str().unwrap())
        .with("LOG_KEEP_DAYS", "3");
    let mut process = ServiceProcess::spawn(&target);
    // An error: the database is down at start.
    process
        .wait_for_log("database not reachable", Duration::from_secs(20))
        .await;
    mariadb.restart().await;
    process
        .wait_for_log("subscribed", Duration::from_secs(30))
        .await;
    // A warning: a rejected message.
    mqtt_publish(
        target.mqtt_port,
        &target.topic("d1", "data"),
        "{not json",
        QoS::AtLeastOnce,
    )
    .await
    .unwrap();
    process
        .wait_for_log("message rejected", Duration::from_secs(10))
        .await;
    process.signal("TERM");
    assert_eq!(process.wait_exit(Duration::from_secs(40)).await, Some(0));

    let names: Vec<_> = std::fs::read_dir(&logs)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(names.len(), 2, "{names:?}");
    let all = rotated(&logs, "mqtt-service.log");
    for line in [
        "starting mqtt-ingest",
        "database not reachable",
        "message rejected",
        "stopped",
    ] {
        assert!(all.contains(line), "{line:?} missing in\n{all}");
    }
    assert!(!all.contains('\x1b'), "no colours in files");
    let errors = rotated(&logs, "mqtt-service-error.log");
    assert!(errors.contains("database not reachable"), "{errors}");
    for line in errors.lines() {
        assert!(line.contains(" ERROR "), "not an error: {line}");
    }
    clear_session(target.mqtt_port, &target.client_id)
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unwritable_log_dir_is_a_configuration_error() {
    let db = TestDb::new().await;
    let file = tempfile::NamedTempFile::new().unwrap();
    // A path below a regular file cannot be a directory.
    let bad = file.path().join("logs");
    let target = Target::new(&db, shared_mqtt_port()).with("LOG_DIR", bad.to_str().unwrap());
    let mut process = ServiceProcess::spawn(&target);
    assert_eq!(process.wait_exit(Duration::from_secs(10)).await, Some(78));
    // The output is read by other tasks: it may trail the exit a little.
    process
        .wait_for_log("configuration error: LOG_DIR", Duration::from_secs(5))
        .await;
}
