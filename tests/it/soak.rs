//! The soak (issue 4): 1,000,000 messages from 1,000 devices through the real binary, its RSS
//! sampled every 2 s. Passes when RSS after warm-up (the first 30% of the messages,
//! `SOAK_WARMUP_PCT`) stays within 10% of the warm-up peak, every device ends at its last
//! acknowledged seq, and the service's final counters add up. Long: run by `scripts/soak.sh`
//! (`SOAK_MESSAGES`, `SOAK_DEVICES` scale it).
//!
//! A private Mosquitto (`max_queued_messages 100000`) and a private MariaDB; the publisher stays
//! at most 10,000 messages ahead of what the service took in, so the broker never drops any.

use std::time::{Duration, Instant};

use crate::app::{ServiceProcess, Target, migrate};
use crate::common::{PrivateMariaDb, PrivateMosquitto, TestDb, clear_session};
use crate::common::{last_logged_counter, rss_kib};
use crate::ledger::{LedgerPublisher, stored_seqs};

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.replace('_', "").parse().ok())
        .unwrap_or(default)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "long: run by scripts/soak.sh"]
async fn soak() {
    let messages = env("SOAK_MESSAGES", 1_000_000);
    let devices = env("SOAK_DEVICES", 1000) as usize;
    // A deep queue at the broker slows Mosquitto 2.0.11 down badly (and with it the PINGRESPs):
    // keep the backlog small, this is a soak of the service, not of the broker.
    const AHEAD: u64 = 10_000;
    let broker = PrivateMosquitto::start().await;
    let mariadb = PrivateMariaDb::start().await;
    let db = TestDb::on(mariadb.host(), mariadb.port()).await;
    let pool = db.pool();
    migrate(&pool).await;
    for chunk in (0..devices).collect::<Vec<_>>().chunks(500) {
        let values = vec!["(?, ?, ?)"; chunk.len()].join(",");
        let sql = format!("INSERT INTO device_main (device_id, uuid, name) VALUES {values}");
        let mut q = sqlx::query(sqlx::AssertSqlSafe(sql));
        for d in chunk {
            let u = crate::common::generators::device(*d);
            q = q.bind(format!("id-{u}")).bind(u.clone()).bind(u);
        }
        q.execute(&pool).await.unwrap();
    }
    let t = Target::new(&db, broker.port())
        .with("MQTT_KEEPALIVE_SECS", "30")
        .with("STATS_INTERVAL_SECS", "2")
        .with("DB_POOL_MAX", "8");
    let mut process = ServiceProcess::start(&t).await;
    let pid = process.pid();
    let started = Instant::now();
    let publisher =
        LedgerPublisher::start_limited(broker.port(), &t.prefix, devices, 1_000_000, messages);

    let warmup = messages * env("SOAK_WARMUP_PCT", 30) / 100;
    let mut samples: Vec<(f64, u64, u64)> = Vec::new(); // (seconds, taken in, RSS KiB)
    loop {
        tokio::time::sleep(Duration::from_secs(2)).await;
        let taken = last_logged_counter(&process.log(), "total").unwrap_or(0);
        let rss = rss_kib(pid).expect("the service is running");
        samples.push((started.elapsed().as_secs_f64(), taken, rss));
        eprintln!(
            "[soak] {:>6.0} s  sent {:>8}  acknowledged {:>8}  taken in {taken:>8}  RSS {rss} KiB",
            started.elapsed().as_secs_f64(),
            publisher.sent(),
            publisher.acked()
        );
        publisher.pause(publisher.sent() > taken + AHEAD);
        if taken >= messages {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(3600),
            "soak took over an hour"
        );
    }
    let ledger = publisher.finish().await;
    let elapsed = started.elapsed();

    process.signal("TERM");
    assert_eq!(process.wait_exit(Duration::from_secs(60)).await, Some(0));
    process
        .wait_for_log("db errors:", Duration::from_secs(10))
        .await;
    let log = process.log();
    let (total, succeeded, failed) = (
        last_logged_counter(&log, "total").unwrap(),
        last_logged_counter(&log, "succeeded").unwrap(),
        last_logged_counter(&log, "failed").unwrap(),
    );

    let warm: Vec<u64> = samples
        .iter()
        .filter(|s| s.1 < warmup)
        .map(|s| s.2)
        .collect();
    let after: Vec<u64> = samples
        .iter()
        .filter(|s| s.1 >= warmup)
        .map(|s| s.2)
        .collect();
    // A run too short to sample its warm-up compares with its first sample.
    let warm_peak = warm.iter().copied().max().unwrap_or(samples[0].2);
    let after_peak = after.iter().copied().max().unwrap_or(0);
    let after_first = after.first().copied().unwrap_or(0);
    let last = samples.last().unwrap().2;
    eprintln!(
        "[soak] {} messages from {devices} devices in {:.0} s ({:.0} msg/s); acknowledged by the broker {}; \
         service total {total}, succeeded {succeeded}, failed {failed}",
        ledger.sent,
        elapsed.as_secs_f64(),
        total as f64 / elapsed.as_secs_f64(),
        ledger.acked.len()
    );
    eprintln!(
        "[soak] RSS KiB: warm-up peak {warm_peak}; after warm-up first {after_first}, peak {after_peak}, last {last}; \
         growth over the warm-up peak {:+.1}%",
        (after_peak as f64 / warm_peak as f64 - 1.0) * 100.0
    );

    assert_eq!(
        ledger.acked.len() as u64,
        messages,
        "the broker acknowledged every message"
    );
    assert_eq!(total, succeeded + failed, "taken in = committed + rejected");
    assert_eq!(failed, 0);
    assert!(
        succeeded >= messages,
        "every message committed ({succeeded} < {messages})"
    );
    let stored = stored_seqs(&pool).await.unwrap();
    for (d, seq) in ledger.last() {
        assert_eq!(
            stored.get(&crate::common::generators::device(d)),
            Some(&seq),
            "{}",
            crate::common::generators::device(d)
        );
    }
    assert!(
        after_peak as f64 <= warm_peak as f64 * 1.10,
        "RSS grew more than 10% after warm-up: {warm_peak} -> {after_peak} KiB"
    );
    clear_session(t.mqtt_port, &t.client_id).await.unwrap();
}
