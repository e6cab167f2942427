//! mqtt-ingest-intake-cost: instructions per message on the intake path (topic + payload →
//! an update folded into the one waiting for its device), counted by valgrind's callgrind.
//!
//! An instruction count does not move with the machine's load the way seconds do: the same
//! binary and corpus give the same count, so it shows a change in the intake that a drain's
//! noise (±10 % between runs) hides.
//!
//!   mqtt-ingest-intake-cost                 counts each corpus under callgrind and prints a table
//!   mqtt-ingest-intake-cost --run SHAPE N   the measured work itself (what callgrind runs)
//!
//! Per message = (count of N messages − count of 0 messages) / N, so start-up and the corpus's
//! construction cancel out.

use std::collections::HashMap;
use std::hint::black_box;
use std::process::{Command, ExitCode};

use chrono::{DateTime, TimeZone, Utc};
use mqtt_ingest::intake::merge::absorb;
use mqtt_ingest::intake::model::Update;
use mqtt_ingest::intake::payload::{Rules, process};
use mqtt_ingest::intake::topic::TopicLayout;

/// Devices the corpus spreads its messages over (each fold meets a waiting update).
const DEVICES: usize = 100;

/// The corpora: what the real firmware sends and the seed README's two formats.
const SHAPES: [(&str, &str); 6] = [
    (
        "firmware-dht11",
        r#"{"device_id":"AIOT-ESP32-6E0067F6","sensor":"DHT11","temperature":24.3,"humidity":55.0,"timestamp":90}"#,
    ),
    (
        "firmware-status",
        r#"{"device_id":"AIOT-ESP32-6E0067F6","uptime":90,"free_heap":168432,"wifi_connected":true,"mqtt_connected":true,"ble_connected":false,"timestamp":90}"#,
    ),
    (
        "firmware-heartbeat",
        r#"{"sequence":7,"timestamp":90512,"status":1}"#,
    ),
    (
        "seed-simple",
        r#"{"temperature": 25.5, "humidity": 60, "light": 850}"#,
    ),
    (
        "seed-http",
        r#"{"sensors":[{"sensor_name":"temperature","value":25.5,"unit":"°C","timestamp":"2026-12-02T14:30:00+08:00"},{"sensor_name":"humidity","value":60,"unit":"%"}],"status":{"ip_address":"192.168.1.100","rssi":-50},"timestamp":"2026-12-02T14:30:00+08:00"}"#,
    ),
    (
        "mixed", "", // every shape above in turn
    ),
];

fn kind_of(shape: &str) -> &'static str {
    match shape {
        "firmware-status" => "status",
        "firmware-heartbeat" => "heartbeat",
        _ => "data",
    }
}

/// The messages of one corpus: `(topic, payload)`, one per device and shape.
fn corpus(shape: &str) -> Vec<(String, Vec<u8>)> {
    let shapes: Vec<(&str, &str)> = SHAPES
        .iter()
        .copied()
        .filter(|(name, payload)| !payload.is_empty() && (shape == "mixed" || *name == shape))
        .collect();
    let mut out = Vec::new();
    for d in 0..DEVICES {
        for (name, payload) in &shapes {
            out.push((
                format!("devices/550e8400-e29b-41d4-a716-{d:012}/{}", kind_of(name)),
                payload.as_bytes().to_vec(),
            ));
        }
    }
    out
}

/// The measured work: `n` messages of the corpus through the topic parser, the payload parser
/// and the fold, as the service's intake and queue do them (at one fixed receive time, so the
/// count does not depend on the clock).
fn run(shape: &str, n: usize) -> usize {
    let corpus = corpus(shape);
    let layout = TopicLayout::new("devices").expect("the default prefix");
    let rules = Rules::default();
    let received: DateTime<Utc> = Utc
        .with_ymd_and_hms(2026, 12, 2, 10, 0, 0)
        .single()
        .expect("a valid time");
    let mut waiting: HashMap<String, Update> = HashMap::with_capacity(DEVICES);
    let mut accepted = 0;
    for i in 0..n {
        let (topic, payload) = &corpus[i % corpus.len()];
        let Ok((device, kind)) = layout.parse(black_box(topic)) else {
            continue;
        };
        let Ok(a) = process(kind, device, black_box(payload), received, &rules) else {
            continue;
        };
        accepted += 1;
        // The queue's own index is keyed by the device's hash; a map by name stands in for it
        // (its key is allocated once per device, not per message).
        match waiting.get_mut(a.update.device.as_str()) {
            Some(held) => {
                if let Err(next) = absorb(held, a.update) {
                    *held = next;
                }
            }
            None => {
                waiting.insert(a.update.device.as_str().to_owned(), a.update);
            }
        }
    }
    black_box(&waiting);
    accepted
}

/// callgrind's instruction count of `--run shape n`.
fn count(shape: &str, n: usize) -> Result<u64, String> {
    let me = std::env::current_exe().map_err(|e| e.to_string())?;
    let out = Command::new("valgrind")
        .args([
            "--tool=callgrind",
            "--callgrind-out-file=/dev/null",
            "--cache-sim=no",
        ])
        .arg(&me)
        .args(["--run", shape, &n.to_string()])
        .output()
        .map_err(|e| format!("cannot run valgrind ({e}): install it (Debian: valgrind)"))?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        return Err(format!("valgrind failed: {stderr}"));
    }
    stderr
        .lines()
        .find_map(|l| {
            l.split_once("Collected :")
                .map(|(_, n)| n.trim().to_owned())
        })
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| format!("no instruction count in valgrind's output: {stderr}"))
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.as_slice() {
        [flag, shape, n] if flag == "--run" => {
            let n: usize = n.parse().unwrap_or(0);
            let accepted = run(shape, n);
            println!("{accepted} of {n} accepted");
            ExitCode::SUCCESS
        }
        [] => {
            const N: usize = 20_000;
            println!(
                "intake instructions per message (callgrind; {N} messages over {DEVICES} devices, folded):"
            );
            println!("{:<20} {:>14}", "corpus", "instr/msg");
            for (shape, _) in SHAPES {
                match (count(shape, 0), count(shape, N)) {
                    (Ok(base), Ok(all)) => {
                        let per = all.saturating_sub(base) as f64 / N as f64;
                        println!("{shape:<20} {per:>14.0}");
                    }
                    (Err(e), _) | (_, Err(e)) => {
                        eprintln!("{e}");
                        return ExitCode::FAILURE;
                    }
                }
            }
            ExitCode::SUCCESS
        }
        _ => {
            eprintln!("usage: mqtt-ingest-intake-cost [--run SHAPE N]");
            ExitCode::from(2)
        }
    }
}
