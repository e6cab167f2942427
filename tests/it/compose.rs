//! The compose stack, checked without a container engine: the files are parsed and held to what
//! the service needs, and the service's health check command is run against a live service.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use crate::app::{Target, spawn_service};
use crate::common::{TestDb, shared_mqtt_port};
use serde_yaml::Value;

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

fn read(path: &str) -> String {
    std::fs::read_to_string(repo(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn compose() -> Value {
    serde_yaml::from_str(&read("docker/docker-compose.yml")).expect("compose file is YAML")
}

/// The names set in an env file (`NAME=value` lines).
fn env_names(path: &str) -> BTreeSet<String> {
    read(path)
        .lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .filter_map(|l| l.split_once('=').map(|(k, _)| k.trim().to_owned()))
        .filter(|k| !k.is_empty())
        .collect()
}

/// Every variable the service reads, from its settings' definition.
fn names_read_by_the_service() -> BTreeSet<String> {
    mqtt_ingest::config::reference()
        .into_iter()
        .map(|e| e.var)
        .collect()
}

#[test]
fn services_health_checks_restart_policies_and_start_order() {
    let c = compose();
    let services = c["services"].as_mapping().expect("services");
    let names: BTreeSet<&str> = services.keys().filter_map(Value::as_str).collect();
    assert_eq!(names, BTreeSet::from(["mosquitto", "mqtt-ingest", "mysql"]));
    for (name, service) in services {
        let name = name.as_str().unwrap();
        assert_eq!(
            service["restart"].as_str(),
            Some("unless-stopped"),
            "{name}: restart policy"
        );
        // A shell string (CMD-SHELL): podman-compose 1.0.3 mangles the array forms.
        let test = service["healthcheck"]["test"]
            .as_str()
            .unwrap_or_else(|| panic!("{name}: the healthcheck test is not a string"));
        assert!(!test.trim().is_empty(), "{name}: empty healthcheck");
        for field in ["interval", "timeout", "retries"] {
            assert!(
                !service["healthcheck"][field].is_null(),
                "{name}: healthcheck {field}"
            );
        }
    }
    let svc = &c["services"]["mqtt-ingest"];
    assert_eq!(
        svc["env_file"].as_str(),
        Some("${MQTT_INGEST_ENV_FILE:-.env}")
    );
    // Not root (the image's USER), and a read-only root filesystem.
    assert_eq!(svc["read_only"].as_bool(), Some(true));
    let dockerfile = read("docker/Dockerfile");
    assert!(dockerfile.contains("\nUSER 10001:10001\n"), "{dockerfile}");
    // Every published port is set by a variable (the host may already listen on the default).
    for (service, var) in [
        ("mosquitto", "MQTT_PUBLISH_PORT"),
        ("mysql", "DB_PUBLISH_PORT"),
        ("mqtt-ingest", "HTTP_PUBLISH_PORT"),
    ] {
        let ports = c["services"][service]["ports"].as_sequence().unwrap();
        assert!(
            ports
                .iter()
                .all(|p| p.as_str().unwrap().contains(&format!("${{{var}:-"))),
            "{service}: {ports:?}"
        );
    }
    for dep in ["mosquitto", "mysql"] {
        assert_eq!(
            svc["depends_on"][dep]["condition"].as_str(),
            Some("service_healthy"),
            "mqtt-ingest waits for {dep} to be healthy"
        );
    }
    // Inside the stack the service reaches the others by their service names.
    assert_eq!(
        svc["environment"]["MQTT_BROKER"].as_str(),
        Some("mosquitto")
    );
    assert_eq!(svc["environment"]["DB_HOST"].as_str(), Some("mysql"));
    // Room for SHUTDOWN_TIMEOUT_SECS (30) after SIGTERM.
    let grace = svc["stop_grace_period"].as_str().unwrap();
    assert!(grace.trim_end_matches('s').parse::<u32>().unwrap() > 30);
    // The build points at the Dockerfile from the repository root.
    assert_eq!(svc["build"]["context"].as_str(), Some(".."));
    assert_eq!(
        svc["build"]["dockerfile"].as_str(),
        Some("docker/Dockerfile")
    );
    assert!(repo("docker/Dockerfile").is_file());
    // The MySQL image's root password comes from .env and is required.
    let mysql_env = &c["services"]["mysql"]["environment"];
    assert!(
        mysql_env["MYSQL_ROOT_PASSWORD"]
            .as_str()
            .unwrap()
            .starts_with("${DB_PASSWORD:?")
    );
    // Data survives `docker compose down` / up.
    for volume in ["mosquitto-data", "mysql-data"] {
        assert!(
            c["volumes"].as_mapping().unwrap().contains_key(volume),
            "{volume}"
        );
    }
}

#[test]
fn mosquitto_config_keeps_messages_for_the_service() {
    let c = compose();
    let mounts: Vec<&str> = c["services"]["mosquitto"]["volumes"]
        .as_sequence()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    let conf_mount = mounts
        .iter()
        .find(|m| m.ends_with(":/mosquitto/config/mosquitto.conf:ro"))
        .expect("mosquitto.conf mounted read-only");
    let host_path = conf_mount.split(':').next().unwrap();
    assert_eq!(host_path, "./mosquitto/mosquitto.conf");
    let conf = read("docker/mosquitto/mosquitto.conf");
    let setting = |name: &str| -> Option<String> {
        conf.lines()
            .map(str::trim)
            .filter(|l| !l.starts_with('#'))
            .find_map(|l| {
                l.strip_prefix(name)?
                    .strip_prefix(' ')
                    .map(|v| v.trim().to_owned())
            })
    };
    assert_eq!(setting("persistence").as_deref(), Some("true"));
    assert_eq!(
        setting("persistence_location").as_deref(),
        Some("/mosquitto/data/")
    );
    assert!(mounts.iter().any(|m| m.ends_with(":/mosquitto/data")));
    // Above Mosquitto's defaults (1000 queued, 20 in flight), which drop messages and throttle.
    let number = |name: &str| setting(name).and_then(|v| v.parse::<u64>().ok());
    assert!(number("max_queued_messages").is_some_and(|n| n > 1000));
    assert!(number("max_inflight_messages").is_some_and(|n| n > 20));
    assert!(number("autosave_interval").is_some());
}

#[test]
fn dockerfile_is_multi_stage_and_runs_unprivileged() {
    let dockerfile = read("docker/Dockerfile");
    let instructions: Vec<(String, String)> = dockerfile
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .filter_map(|l| {
            let (word, rest) = l.split_once(' ')?;
            word.chars()
                .all(|c| c.is_ascii_uppercase())
                .then(|| (word.to_owned(), rest.trim().to_owned()))
        })
        .collect();
    let froms: Vec<&str> = instructions
        .iter()
        .filter(|(w, _)| w == "FROM")
        .map(|(_, r)| r.as_str())
        .collect();
    assert_eq!(froms.len(), 2, "build and run stages: {froms:?}");
    assert!(froms[0].ends_with(" AS builder"));
    assert!(
        froms[1].contains("-slim"),
        "small runtime image: {}",
        froms[1]
    );
    // Everything after the last FROM is the runtime image.
    let last_from = instructions.iter().rposition(|(w, _)| w == "FROM").unwrap();
    let runtime = &instructions[last_from..];
    let user = runtime
        .iter()
        .rev()
        .find(|(w, _)| w == "USER")
        .map(|(_, r)| r.as_str())
        .expect("USER in the runtime stage");
    let user_name = user.split(':').next().unwrap();
    assert!(!matches!(user_name, "root" | "0"), "runs as {user}");
    assert!(
        runtime
            .iter()
            .any(|(w, r)| w == "COPY" && r.contains("--from=builder"))
    );
    assert!(
        runtime
            .iter()
            .any(|(w, r)| w == "ENTRYPOINT" && r.contains("mqtt-ingest"))
    );
    assert!(dockerfile.contains("cargo build --release --locked"));
}

#[test]
fn every_setting_is_documented_for_compose_and_systemd() {
    // The other names of the broker settings (the Python service's) are documented beside the
    // names they stand for, not set in the examples: two names set differently stop the start.
    let aliases: BTreeSet<String> = mqtt_ingest::config::ALIASES
        .iter()
        .flat_map(|(_, others)| others.iter().map(|s| (*s).to_owned()))
        .collect();
    // The manual: the configuration reference and the operations guide (the README links them).
    let readme = read("docs/configuration.md") + &read("docs/operations.md");
    for alias in &aliases {
        assert!(
            readme.contains(&format!("`{alias}`")),
            "docs/configuration.md lacks {alias}"
        );
    }
    // The definition names each setting once, by its own name (the aliases are not in it).
    let read_by_service = names_read_by_the_service();
    let example = env_names(".env.example");
    let docker = env_names("docker/.env.example");
    let missing: Vec<_> = read_by_service.difference(&example).collect();
    assert!(missing.is_empty(), ".env.example lacks {missing:?}");
    let missing: Vec<_> = example.difference(&docker).collect();
    assert!(missing.is_empty(), "docker/.env.example lacks {missing:?}");
    let unknown: Vec<_> = example.difference(&read_by_service).collect();
    assert!(
        unknown.is_empty(),
        ".env.example has names the service ignores: {unknown:?}"
    );
    // Each name in the configuration table.
    for name in &read_by_service {
        assert!(
            readme.contains(&format!("| `{name}` |")),
            "docs/configuration.md's table lacks {name}"
        );
    }
    // The operations guide's compose commands are the ones the compose file's header gives.
    for line in [
        "cd docker",
        "cp .env.example .env",
        "docker compose up -d --build",
        "docker compose logs -f mqtt-ingest",
    ] {
        assert!(readme.contains(line), "docs/operations.md lacks {line:?}");
        assert!(
            read("docker/docker-compose.yml").contains(line.trim_start_matches("cd docker")),
            "compose header lacks {line:?}"
        );
    }
}

/// The mqtt-ingest health check command, run by `sh -c` as CMD-SHELL runs it, against a live service: it succeeds
/// when /readyz says 200.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_services_health_check_command_passes_against_a_ready_service() {
    let c = compose();
    let test = c["services"]["mqtt-ingest"]["healthcheck"]["test"]
        .as_str()
        .unwrap();
    // The image's /bin/sh is dash: the check runs bash for /dev/tcp.
    assert!(test.starts_with("bash -c "), "{test}");
    let docker_env = read("docker/.env.example");
    assert!(
        docker_env.contains("\nHTTP_LISTEN=0.0.0.0:9464\n") && test.contains("/127.0.0.1/9464"),
        "the health check must reach the listener that docker/.env.example sets"
    );

    let db = TestDb::new().await;
    let target = Target::new(&db, shared_mqtt_port()).with("HTTP_LISTEN", "127.0.0.1:0");
    let service = spawn_service(&target).await;
    let port = service.http.unwrap().port();
    let script = test.replace("/9464", &format!("/{port}"));
    // Ready once the first database check ran (every second in tests).
    let status = crate::common::wait_until(
        std::time::Duration::from_secs(10),
        std::time::Duration::from_millis(200),
        async || {
            tokio::process::Command::new("sh")
                .args(["-c", &script])
                .status()
                .await
                .is_ok_and(|s| s.success())
        },
    )
    .await;
    assert!(status.is_ok(), "{status:?}");
    service.stop().await.unwrap();
    // Nothing listens any more: the same check fails.
    let after = tokio::process::Command::new("sh")
        .args(["-c", &script])
        .status()
        .await
        .unwrap();
    assert!(!after.success());
}

/// The table in docs/configuration.md is the one the definition generates;
/// `MQTT_INGEST_BLESS=1` writes it there.
#[test]
fn the_configuration_reference_is_generated() {
    let path = "docs/configuration.md";
    let doc = read(path);
    let begin = doc.find("<!-- settings:begin").expect("begin marker");
    let begin = begin + doc[begin..].find('\n').unwrap() + 1;
    let end = doc.find("<!-- settings:end -->").expect("end marker");
    let generated = mqtt_ingest::config::markdown_table();
    if std::env::var_os("MQTT_INGEST_BLESS").is_some() {
        let updated = format!("{}{generated}{}", &doc[..begin], &doc[end..]);
        std::fs::write(repo(path), updated).unwrap();
        return;
    }
    assert_eq!(
        &doc[begin..end],
        generated,
        "{path}'s table differs from the definition: run MQTT_INGEST_BLESS=1 cargo test --test it compose::"
    );
}

/// `.env.example` sets each variable to its default.
#[test]
fn the_example_file_holds_the_defaults() {
    let values: std::collections::BTreeMap<String, String> = read(".env.example")
        .lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim().to_owned(), v.to_owned()))
        .collect();
    for entry in mqtt_ingest::config::reference() {
        assert_eq!(
            values.get(&entry.var).map(String::as_str),
            Some(entry.default.as_deref().unwrap_or("")),
            ".env.example's {}",
            entry.var
        );
    }
}

/// The README's table of the settings that matter gives the definition's defaults.
#[test]
fn the_readme_gives_the_defaults() {
    let defaults: std::collections::BTreeMap<String, String> = mqtt_ingest::config::reference()
        .into_iter()
        .map(|e| (e.var, e.default.unwrap_or_default()))
        .collect();
    let readme = read("README.md");
    let section = readme
        .split("## The settings that matter")
        .nth(1)
        .expect("the README's settings section");
    let mut checked = 0;
    for row in section.lines().filter(|l| l.starts_with("| `")) {
        let cells: Vec<&str> = row.split(" | ").collect();
        let names: Vec<&str> = cells[0]
            .trim_start_matches("| ")
            .split(", ")
            .map(|n| n.trim_matches('`'))
            .collect();
        let given: Vec<&str> = cells[1].split(", ").collect();
        for (i, name) in names.iter().enumerate() {
            let shown = given.get(i).or(given.last()).unwrap();
            let shown = if *shown == "empty" {
                ""
            } else {
                shown.trim_matches('`')
            };
            assert_eq!(
                defaults.get(*name).map(String::as_str),
                Some(shown),
                "README's default of {name}"
            );
            checked += 1;
        }
    }
    assert!(
        checked >= 8,
        "only {checked} settings found in the README's table"
    );
}

/// The target of a `host:container[:ro]` volume whose host side is `host`.
fn mount_of<'a>(service: &'a Value, host: &str) -> Option<&'a str> {
    service["volumes"]
        .as_sequence()?
        .iter()
        .filter_map(Value::as_str)
        .find_map(|v| v.strip_prefix(host)?.strip_prefix(':'))
        .map(|rest| rest.trim_end_matches(":ro"))
}

/// The monitoring override (`docker/monitoring.yml`): Prometheus gets the rules and scrapes the
/// service as the rules and the dashboard expect; Grafana gets the Prometheus data source and
/// the dashboard. (scripts/compose-test.sh runs Prometheus for real; Grafana only where its image
/// can be pulled.)
#[test]
fn the_monitoring_stack_is_wired_to_the_files_the_tests_check() {
    let m: Value =
        serde_yaml::from_str(&read("docker/monitoring.yml")).expect("monitoring.yml is YAML");
    let prom = &m["services"]["prometheus"];
    let grafana = &m["services"]["grafana"];
    for (name, s) in [("prometheus", prom), ("grafana", grafana)] {
        assert_eq!(s["restart"].as_str(), Some("unless-stopped"), "{name}");
        let ports = s["ports"].as_sequence().unwrap();
        assert!(
            ports
                .iter()
                .all(|p| p.as_str().unwrap().starts_with("127.0.0.1:${")),
            "{name}: published on loopback from a variable: {ports:?}"
        );
    }
    // Prometheus: its configuration and the rule file it names.
    let config_path =
        mount_of(prom, "./prometheus/prometheus.yml").expect("prometheus.yml mounted");
    assert!(
        prom["command"]
            .as_sequence()
            .unwrap()
            .iter()
            .any(|a| a.as_str() == Some(&format!("--config.file={config_path}"))),
        "prometheus reads the mounted configuration"
    );
    let config: Value = serde_yaml::from_str(&read("docker/prometheus/prometheus.yml")).unwrap();
    let rules_at = mount_of(prom, "../ops/prometheus/alerts.yml").expect("the alert rules mounted");
    assert_eq!(config["rule_files"][0].as_str(), Some(rules_at));
    let scrape = &config["scrape_configs"][0];
    // The rules' MqttIngestDown and the dashboard's variables select job="mqtt-ingest".
    assert_eq!(scrape["job_name"].as_str(), Some("mqtt-ingest"));
    assert!(read("ops/prometheus/alerts.yml").contains(r#"up{job="mqtt-ingest"}"#));
    let docker_env = read("docker/.env.example");
    let listen_port = docker_env
        .lines()
        .find_map(|l| l.strip_prefix("HTTP_LISTEN="))
        .and_then(|v| v.rsplit(':').next())
        .expect("HTTP_LISTEN in docker/.env.example");
    assert_eq!(
        scrape["static_configs"][0]["targets"][0].as_str(),
        Some(format!("mqtt-ingest:{listen_port}").as_str())
    );
    // Grafana: the data source points at the stack's Prometheus, the provider at the dashboards.
    let datasources: Value = serde_yaml::from_str(&read("docker/grafana/datasources.yml")).unwrap();
    let ds = &datasources["datasources"][0];
    assert_eq!(ds["type"].as_str(), Some("prometheus"));
    assert_eq!(ds["url"].as_str(), Some("http://prometheus:9090"));
    assert_eq!(ds["isDefault"].as_bool(), Some(true));
    assert!(
        mount_of(grafana, "./grafana/datasources.yml")
            .is_some_and(|p| p.starts_with("/etc/grafana/provisioning/datasources/"))
    );
    assert!(
        mount_of(grafana, "./grafana/dashboards.yml")
            .is_some_and(|p| p.starts_with("/etc/grafana/provisioning/dashboards/"))
    );
    let providers: Value = serde_yaml::from_str(&read("docker/grafana/dashboards.yml")).unwrap();
    assert_eq!(
        mount_of(grafana, "../ops/grafana"),
        providers["providers"][0]["options"]["path"].as_str()
    );
    assert!(repo("ops/grafana/mqtt-ingest.json").is_file());
}
