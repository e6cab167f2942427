//! Scale-out: instances in one shared-subscription group split the messages between them, and
//! when one dies the others carry on.

use std::time::Duration;

use crate::app::{Target, migrate, register, spawn_service, wait_devices_at_seq};
use crate::common::{QoS, TestDb, publish_many, shared_mqtt_port, unique_name, wait_until_named};

const DEVICES: usize = 40;
/// Unknown devices whose rejected messages mark the end of a round.
const MARKERS: usize = 6;

fn messages(target: &Target, seqs: std::ops::Range<u64>) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    for seq in seqs {
        for d in 0..DEVICES {
            out.push((
                target.topic(&format!("dev{d}"), "data"),
                // With a reading time: what the dead member held is delivered after its
                // restart, and by arrival order alone that would count as newest.
                format!(
                    r#"{{"seq": {seq}, "timestamp": "2026-01-01T00:{:02}:{:02}Z"}}"#,
                    seq / 60,
                    seq % 60
                )
                .into_bytes(),
            ));
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_share_the_load_and_one_carries_on_when_the_other_dies() {
    let db = TestDb::new().await;
    let pool = db.pool();
    migrate(&pool).await;
    for d in 0..DEVICES {
        register(&pool, &format!("dev{d}")).await;
    }
    let group = unique_name("g");
    let a = Target::new(&db, shared_mqtt_port()).with("MQTT_SHARED_GROUP", &group);
    // Same prefix and group, its own client id (and so its own session).
    let mut b = a.clone();
    b.client_id = unique_name("svc");
    let first = spawn_service(&a).await;
    let second = spawn_service(&b).await;

    const ROUND: u64 = 10;
    let n = DEVICES as u64 * ROUND;
    publish_many(a.mqtt_port, messages(&a, 0..ROUND), QoS::AtLeastOnce)
        .await
        .unwrap();
    wait_devices_at_seq(&pool, DEVICES, ROUND - 1, Duration::from_secs(30)).await;
    let (sa, sb) = (first.stats.clone(), second.stats.clone());
    wait_until_named(
        "both instances' written counts to add up",
        Duration::from_secs(10),
        Duration::from_millis(50),
        async || sa.snapshot().succeeded + sb.snapshot().succeeded >= n,
    )
    .await
    .unwrap();
    // Markers: a message to each of a few unknown devices, published after the round, which
    // each member rejects. A member takes in its messages in the order the broker sends them,
    // so once each member has rejected at least one marker and all are rejected, everything
    // the broker sent before them has been counted as received: anything sent twice (or to
    // both members) shows up as more than N + markers.
    let markers: Vec<(String, Vec<u8>)> = (0..MARKERS)
        .map(|m| {
            (
                a.topic(&format!("mark{m}"), "data"),
                br#"{"m": 1}"#.to_vec(),
            )
        })
        .collect();
    publish_many(a.mqtt_port, markers, QoS::AtLeastOnce)
        .await
        .unwrap();
    wait_until_named(
        "each member to reject markers, and all of them to be rejected",
        Duration::from_secs(10),
        Duration::from_millis(20),
        async || {
            let (fa, fb) = (sa.snapshot().failed, sb.snapshot().failed);
            fa >= 1 && fb >= 1 && fa + fb >= MARKERS as u64
        },
    )
    .await
    .unwrap();
    let (ra, rb) = (sa.snapshot().received, sb.snapshot().received);
    assert_eq!(
        ra + rb,
        n + MARKERS as u64,
        "each message received once: {ra} + {rb}"
    );
    let (wa, wb) = (sa.snapshot().succeeded, sb.snapshot().succeeded);
    assert_eq!(wa + wb, n, "each message written once: {wa} + {wb}");
    assert!(wa > 0 && wb > 0, "both took a share: {wa} and {wb}");
    // Messages came under their own topics, not `$share/...` (that would be bad_topic): the
    // markers are the only rejections.
    let (ja, jb) = (sa.snapshot(), sb.snapshot());
    for (reason, n) in ja
        .rejected
        .iter()
        .zip(&jb.rejected)
        .map(|(a, b)| (a.0, a.1 + b.1))
    {
        let want = if reason == "unknown_device" {
            MARKERS as u64
        } else {
            0
        };
        assert_eq!(n, want, "{reason}");
    }

    // The second dies without a word while messages flow.
    let publisher = {
        let msgs = messages(&a, ROUND..2 * ROUND);
        let port = a.mqtt_port;
        tokio::spawn(async move { publish_many(port, msgs, QoS::AtLeastOnce).await })
    };
    wait_until_named(
        "the second instance to be mid-stream",
        Duration::from_secs(10),
        Duration::from_millis(5),
        async || sb.snapshot().succeeded > wb,
    )
    .await
    .unwrap();
    let b = second.abort().await;
    let written_by_b = sb.snapshot().succeeded;
    publisher.await.unwrap().unwrap();
    // Published after the kill: the survivor writes what comes to it. Mosquitto (2.0) keeps
    // giving the dead member's persistent session its share, queued there: not lost, but it
    // waits for that instance to come back (systemd restarts it). A broker that skips offline
    // members (EMQX) hands everything to the survivor; see the README.
    let before_round3 = sa.snapshot().succeeded;
    publish_many(
        a.mqtt_port,
        messages(&a, 2 * ROUND..3 * ROUND),
        QoS::AtLeastOnce,
    )
    .await
    .unwrap();
    wait_until_named(
        "the survivor to keep writing after the kill",
        Duration::from_secs(10),
        Duration::from_millis(20),
        async || sa.snapshot().succeeded > before_round3,
    )
    .await
    .unwrap();
    // The dead one's share, and what it had taken but not committed, wait in its session.
    let back = spawn_service(&b).await;
    wait_devices_at_seq(&pool, DEVICES, 3 * ROUND - 1, Duration::from_secs(30)).await;
    let sc = back.stats.clone();
    wait_until_named(
        "every message of all rounds to be written",
        Duration::from_secs(10),
        Duration::from_millis(50),
        async || {
            let total = sa.snapshot().succeeded + written_by_b + sc.snapshot().succeeded;
            if total >= 3 * n {
                Ok(true)
            } else {
                anyhow::bail!("{total} of {}", 3 * n)
            }
        },
    )
    .await
    .unwrap();
    first.stop().await.unwrap();
    back.stop().await.unwrap();
}
