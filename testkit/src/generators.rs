//! What the tests and the benchmark publish: device names and payload shapes.

use chrono::{DateTime, TimeZone, Utc};

/// The uuid of device `i` (`dev<i>`).
pub fn device(i: usize) -> String {
    format!("dev{i}")
}

/// The data topic of device `i` under `prefix`.
pub fn data_topic(prefix: &str, device: u64) -> String {
    format!("{prefix}/dev{device}/data")
}

/// What the published messages look like.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Shape {
    /// The seed's two formats, alternating.
    Seed,
    /// CodeHubot's ESP32 firmware: the simple format with `device_id` and `sensor` strings and
    /// a `timestamp` in seconds since boot (which dates nothing).
    Firmware,
}

/// Message `seq` of a device. Seed shape: even the full format, odd the simple format. Every
/// message carries the per-device sequence number as sensor `seq`.
pub fn payload(seq: u64, shape: Shape) -> String {
    if shape == Shape::Firmware {
        return format!(
            "{{\"device_id\":\"AIOT-ESP32-6E0067F6\",\"sensor\":\"DHT11\",\"seq\":{seq},\
             \"temperature\":24.3,\"humidity\":55.0,\"timestamp\":{}}}",
            seq * 10
        );
    }
    if seq.is_multiple_of(2) {
        format!(
            "{{\"sensors\":[{{\"sensor_name\":\"seq\",\"value\":{seq}}},\
             {{\"sensor_name\":\"temperature\",\"value\":21.5,\"unit\":\"°C\"}}],\
             \"status\":{{\"rssi\":-50}}}}"
        )
    } else {
        format!("{{\"seq\":{seq},\"humidity\":60}}")
    }
}

/// The firmware's device name in its payloads (`device_id`, beside the topic's uuid).
pub const FIRMWARE_DEVICE_ID: &str = "AIOT-ESP32-6E0067F6";

/// The firmware's status message (its format string), `uptime` seconds after boot.
pub fn firmware_status(uptime: u64) -> String {
    format!(
        "{{\"device_id\":\"{FIRMWARE_DEVICE_ID}\",\"uptime\":{uptime},\"free_heap\":168432,\
         \"wifi_connected\":true,\"mqtt_connected\":true,\"ble_connected\":false,\
         \"timestamp\":{uptime}}}"
    )
}

/// The firmware's heartbeat (its format string): a counter and milliseconds since boot.
pub fn firmware_heartbeat(sequence: u64, uptime_ms: u64) -> String {
    format!("{{\"sequence\":{sequence},\"timestamp\":{uptime_ms},\"status\":1}}")
}

/// `{"seq": S, "timestamp": T}` with `T` = 2026-01-01 + `S` seconds: every reading has its own
/// reading time (and so its own history row), and a redelivered older one dates as older.
pub fn dated_payload(seq: u64) -> String {
    let base: DateTime<Utc> = Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap();
    let t = base + chrono::Duration::seconds(seq as i64);
    format!(
        r#"{{"seq": {seq}, "timestamp": "{}"}}"#,
        t.format("%Y-%m-%dT%H:%M:%SZ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_shape_is_json_with_its_seq() {
        for seq in [0, 1, 7, 10] {
            for shape in [Shape::Seed, Shape::Firmware] {
                let v: serde_json::Value = serde_json::from_str(&payload(seq, shape)).unwrap();
                let found = v["seq"]
                    .as_u64()
                    .or_else(|| v["sensors"][0]["value"].as_u64());
                assert_eq!(found, Some(seq), "{shape:?} {v}");
            }
            let v: serde_json::Value = serde_json::from_str(&dated_payload(seq)).unwrap();
            assert_eq!(v["seq"].as_u64(), Some(seq));
        }
        let v: serde_json::Value = serde_json::from_str(&dated_payload(61)).unwrap();
        assert_eq!(v["timestamp"], "2026-01-01T00:01:01Z");
    }
}
