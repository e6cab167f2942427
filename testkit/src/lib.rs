//! What the integration tests (`tests/it`) and the benchmark (`bench/`) share.
//!
//! Everything here is built for tests that run concurrently (several nextest
//! processes at once): names, ports, databases and temp dirs are unique per
//! call, and nothing ever touches the shared MariaDB / Mosquitto services
//! except for creating and dropping its own `mi_*` databases.
//!
//! Conventions:
//! * lifecycle helpers (`PrivateMosquitto::start`, `TestDb::new`, ...) panic
//!   with a descriptive message (including server log tails) when something
//!   goes wrong; each has a `try_*` twin returning `anyhow::Result`;
//! * everything else returns `anyhow::Result`;
//! * tests never sleep blindly: use [`wait_until`] with a timeout.
//!
//! Environment knobs:
//! * `TEST_DB_HOST`, `TEST_DB_PORT`, `TEST_DB_USER`, `TEST_DB_PASSWORD`: shared
//!   MariaDB (default `127.0.0.1`, `3306`, `root`, empty password);
//! * `TEST_MQTT_PORT`: port of the shared Mosquitto on 127.0.0.1 (default 1883);
//! * `MI_TEST_TMPDIR`: where private servers keep their files (default
//!   `/dev/shm` when writable, else the system temp dir);
//! * `MI_TEST_KEEP_TMP=1`: do not delete those temp dirs (for debugging).

mod db;
mod galera;
pub mod generators;
mod http;
pub mod ledger;
mod mariadb;
mod mosquitto;
mod mqtt;
mod procs;
mod wait;

pub use self::{
    db::{TestDb, sql_statements},
    galera::PrivateGalera,
    http::{http_get, metric},
    mariadb::PrivateMariaDb,
    mosquitto::{MosquittoConfig, PrivateMosquitto},
    mqtt::{
        MQTT_HOST, TestSubscriber, clear_session, mqtt_publish, publish_many, shared_mqtt_port,
    },
    procs::{cpu_seconds, free_port, is_root, peak_rss_kib, pids_named, rss_kib, sigterm},
    wait::{wait_until, wait_until_named},
};
pub use rumqttc::QoS;

use std::sync::atomic::{AtomicU32, Ordering};

/// A short name that is unique across threads, processes and runs.
///
/// Shape: `<prefix>_<pid>_<counter><random>` where pid and counter are base 36,
/// and random is 5 base-36 characters. Only `[a-z0-9_]`, so it is usable as a
/// database name, an MQTT client id and a topic segment. The prefix is
/// lower-cased, other characters become `_`, and it is cut to 16 characters.
/// With a prefix of up to 4 characters the result stays within the 23 bytes
/// that strict MQTT 3.1 brokers allow for client ids.
pub fn unique_name(prefix: &str) -> String {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let mut clean: String = prefix
        .chars()
        .take(16)
        .map(|c| {
            let c = c.to_ascii_lowercase();
            if c.is_ascii_lowercase() || c.is_ascii_digit() {
                c
            } else {
                '_'
            }
        })
        .collect();
    if clean.is_empty() {
        clean.push('t');
    }
    let mut random = String::with_capacity(5);
    for _ in 0..5 {
        random.push(base36_digit(fastrand::u32(0..36)));
    }
    format!(
        "{clean}_{}_{}{random}",
        base36(std::process::id()),
        base36(n)
    )
}

/// A counter of the service's statistics block from one of its lines (`  total: 5` for
/// `name` = `total`).
pub fn stats_counter(line: &str, name: &str) -> Option<u64> {
    stats_field(line, name)?.trim().parse().ok()
}

/// The text after `name:` on a line of the statistics block.
fn stats_field<'a>(line: &'a str, name: &str) -> Option<&'a str> {
    line.trim_start().strip_prefix(name)?.strip_prefix(':')
}

/// `name`'s counter on the last line of a log that gives it; `None` when that line's value is
/// not a number (a block cut off mid-write is not read from an earlier one).
pub fn last_logged_counter(log: &str, name: &str) -> Option<u64> {
    log.lines()
        .rev()
        .find_map(|l| stats_field(l, name))?
        .trim()
        .parse()
        .ok()
}

fn base36_digit(d: u32) -> char {
    char::from_digit(d, 36).expect("digit below 36")
}

fn base36(mut v: u32) -> String {
    if v == 0 {
        return "0".to_string();
    }
    let mut digits = Vec::new();
    while v > 0 {
        digits.push(base36_digit(v % 36));
        v /= 36;
    }
    digits.iter().rev().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_statistics_lines() {
        assert_eq!(stats_counter("  total:         1040", "total"), Some(1040));
        assert_eq!(stats_counter("  succeeded:     7", "succeeded"), Some(7));
        assert_eq!(stats_counter("  failed:        0", "failed"), Some(0));
        assert_eq!(stats_counter("  failed by:     x=1", "failed"), None);
        assert_eq!(stats_counter("INFO total: 3", "total"), None);
        let log = "  total: 1\n  failed: 0\nlater\n  total: 5\n";
        assert_eq!(last_logged_counter(log, "total"), Some(5));
        assert_eq!(
            last_logged_counter("  total: 5\n  total: 6", "total"),
            Some(6)
        );
        assert_eq!(last_logged_counter("  total: 5\n  total: ", "total"), None);
    }

    #[test]
    fn unique_names_are_short_and_plain() {
        let (a, b) = (unique_name("Mi-x"), unique_name("mi-x"));
        assert_ne!(a, b);
        assert!(a.starts_with("mi_x_") && a.len() <= 23, "{a}");
        assert!(
            a.bytes()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'_')
        );
    }
}
