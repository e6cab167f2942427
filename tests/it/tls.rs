//! TLS to the broker and to the database, each against a CA made for the test (openssl) and a
//! private server that only speaks TLS to the service.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use crate::app::{Target, migrate, register, sensor, spawn_service, wait_for_device};
use crate::common::{
    PrivateMariaDb, PrivateMosquitto, QoS, TestDb, free_port, mqtt_publish, wait_until_named,
};
use mqtt_ingest::config::Settings;
use mqtt_ingest::service::Service;
use tokio_util::sync::CancellationToken;

/// A CA, a server certificate for 127.0.0.1 / localhost and a client certificate, all PEM.
struct Pki {
    dir: tempfile::TempDir,
}

impl Pki {
    fn make() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let run = |args: &[&str]| {
            let out = Command::new("openssl")
                .args(args)
                .current_dir(dir.path())
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "openssl {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        run(&[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=mqtt-ingest test CA",
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
        ]);
        // Extensions make X.509 v3 certificates; webpki refuses v1 ones.
        let write = |name: &str, text: &str| std::fs::write(dir.path().join(name), text).unwrap();
        write("server.ext", "subjectAltName=IP:127.0.0.1,DNS:localhost\n");
        write("client.ext", "extendedKeyUsage=clientAuth\n");
        for name in ["server", "client"] {
            let (key, csr, pem, ext) = (
                format!("{name}.key"),
                format!("{name}.csr"),
                format!("{name}.pem"),
                format!("{name}.ext"),
            );
            let subject = format!("/CN={name}");
            run(&[
                "req", "-newkey", "rsa:2048", "-nodes", "-subj", &subject, "-keyout", &key, "-out",
                &csr,
            ]);
            run(&[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-days",
                "2",
                "-out",
                &pem,
                "-extfile",
                &ext,
            ]);
        }
        Pki { dir }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn s(&self, name: &str) -> String {
        self.path(name).display().to_string()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_over_tls_with_a_client_certificate() {
    let pki = Pki::make();
    let tls_port = free_port();
    let broker = PrivateMosquitto::start_with_config(&format!(
        "listener {tls_port} 127.0.0.1\ncafile {}\ncertfile {}\nkeyfile {}\nrequire_certificate true\n",
        pki.s("ca.pem"),
        pki.s("server.pem"),
        pki.s("server.key")
    ))
    .await;
    let db = TestDb::new().await;
    let pool = db.pool();
    migrate(&pool).await;
    register(&pool, "secure").await;
    let target = Target::new(&db, tls_port)
        .with("MQTT_TLS", "true")
        .with("MQTT_TLS_CA_FILE", &pki.s("ca.pem"))
        .with("MQTT_TLS_CERT_FILE", &pki.s("client.pem"))
        .with("MQTT_TLS_KEY_FILE", &pki.s("client.key"));
    let service = spawn_service(&target).await;
    // Devices publish on the plain listener; the service reads over TLS.
    mqtt_publish(
        broker.port(),
        &target.topic("secure", "data"),
        r#"{"t": 42}"#,
        QoS::AtLeastOnce,
    )
    .await
    .unwrap();
    let row = wait_for_device(&pool, "secure", "data through TLS", |r| {
        sensor(r, "t").is_some()
    })
    .await;
    assert_eq!(sensor(&row, "t"), Some(serde_json::json!(42)));
    service.stop_keeping_session().await.unwrap();

    // Without the client certificate the broker refuses the service: it never subscribes.
    let no_cert = Target::new(&db, tls_port)
        .with("MQTT_TLS", "true")
        .with("MQTT_TLS_CA_FILE", &pki.s("ca.pem"));
    let svc = Service::build(no_cert.settings()).await.unwrap();
    let stats = svc.stats();
    let stop = CancellationToken::new();
    let task = tokio::spawn(svc.run_until_stopped(stop.clone()));
    // The broker's log says when it turned the service away; twice: it tried again.
    wait_until_named(
        "the broker to refuse the certificate-less service twice",
        Duration::from_secs(20),
        Duration::from_millis(20),
        async || {
            broker
                .log()
                .matches("peer did not return a certificate")
                .count()
                >= 2
        },
    )
    .await
    .unwrap();
    assert!(
        !stats.is_subscribed(),
        "a TLS broker that requires a certificate let the service in without one"
    );
    stop.cancel();
    task.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mysql_over_tls_with_a_verified_server_identity() {
    let pki = Pki::make();
    let server = PrivateMariaDb::start_with_args(&[
        format!("--ssl-ca={}", pki.s("ca.pem")),
        format!("--ssl-cert={}", pki.s("server.pem")),
        format!("--ssl-key={}", pki.s("server.key")),
    ])
    .await;
    let db = TestDb::on(server.host(), server.port()).await;
    let pool = db.pool();
    migrate(&pool).await;
    register(&pool, "tls-db").await;
    // A user that may only log in over TLS.
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "CREATE USER 'ingest'@'127.0.0.1' IDENTIFIED BY 'tls-pw' REQUIRE SSL; \
         GRANT SELECT, INSERT, UPDATE, DELETE, CREATE, ALTER, INDEX, DROP ON `{}`.* TO 'ingest'@'127.0.0.1';",
        db.name
    )))
    .execute(&pool)
    .await
    .unwrap();
    let base = Target::new(&db, crate::common::shared_mqtt_port());
    let target = base
        .clone()
        .with("DB_USER", "ingest")
        .with("DB_PASSWORD", "tls-pw")
        .with("DB_HOST", "127.0.0.1")
        .with("DB_SSL_MODE", "verify_identity")
        .with("DB_SSL_CA_FILE", &pki.s("ca.pem"));
    let service = spawn_service(&target).await;
    mqtt_publish(
        target.mqtt_port,
        &target.topic("tls-db", "data"),
        r#"{"t": 7}"#,
        QoS::AtLeastOnce,
    )
    .await
    .unwrap();
    wait_for_device(&pool, "tls-db", "a write over TLS", |r| {
        sensor(r, "t").is_some()
    })
    .await;
    service.stop().await.unwrap();

    // The same user over plain TCP is refused: the writes above really went over TLS.
    let plain: Settings = base
        .with("DB_USER", "ingest")
        .with("DB_PASSWORD", "tls-pw")
        .with("DB_SSL_MODE", "disabled")
        .settings();
    let pool = mqtt_ingest::store::pool(&plain.db);
    let refused = mqtt_ingest::store::ping(&pool).await;
    assert!(refused.is_err(), "a REQUIRE SSL user logged in without TLS");
    // And a CA that did not sign the server's certificate is not trusted.
    let other = Pki::make();
    let mut wrong_ca = target_settings_with_ca(&target, &other.s("ca.pem"));
    wrong_ca.db.connect_timeout = Duration::from_secs(3);
    let pool = mqtt_ingest::store::pool(&wrong_ca.db);
    assert!(
        mqtt_ingest::store::ping(&pool).await.is_err(),
        "a certificate from another CA was accepted"
    );
    let p = db.pool();
    wait_until_named(
        "the pool still works as root",
        Duration::from_secs(5),
        Duration::from_millis(50),
        async || mqtt_ingest::store::ping(&p).await.is_ok(),
    )
    .await
    .unwrap();
}

fn target_settings_with_ca(target: &Target, ca: &str) -> Settings {
    target.clone().with("DB_SSL_CA_FILE", ca).settings()
}
