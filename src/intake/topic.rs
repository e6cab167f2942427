//! Topic names: the filters the service subscribes to and the parsing of incoming topics.

use crate::intake::model::{DeviceUuid, TopicKind};
use crate::intake::rejection::Rejection;

/// The topic layout `PREFIX/{uuid}/{kind}`; the prefix is `devices` unless configured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicLayout {
    prefix: String,
}

impl TopicLayout {
    /// A layout under `prefix`, which must be non-empty, free of wildcards and of empty levels.
    pub fn new(prefix: &str) -> Result<Self, String> {
        let prefix = prefix.trim_end_matches('/');
        if prefix.is_empty() {
            return Err("must not be empty".into());
        }
        if prefix.contains(['+', '#', '\0']) {
            return Err("must not contain '+', '#' or NUL".into());
        }
        if prefix.split('/').any(str::is_empty) {
            return Err("must not contain empty levels ('//' or a leading '/')".into());
        }
        Ok(Self {
            prefix: prefix.to_owned(),
        })
    }

    /// The prefix, without a trailing slash.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The subscription filter for one kind: `PREFIX/+/kind`.
    pub fn filter(&self, kind: TopicKind) -> String {
        format!("{}/+/{}", self.prefix, kind.as_str())
    }

    /// The topic a device publishes to.
    pub fn topic(&self, device: &str, kind: TopicKind) -> String {
        format!("{}/{}/{}", self.prefix, device, kind.as_str())
    }

    /// Splits an incoming topic into device and kind; anything else is rejected before any SQL.
    pub fn parse(&self, topic: &str) -> Result<(DeviceUuid, TopicKind), Rejection> {
        let rest = topic
            .strip_prefix(self.prefix.as_str())
            .and_then(|r| r.strip_prefix('/'))
            .ok_or(Rejection::BadTopic)?;
        // The kind is the last level: found from the end, a few bytes away, where the device
        // id before it would be searched through from the front.
        let (device, kind) = rest.rsplit_once('/').ok_or(Rejection::BadTopic)?;
        let kind = match kind {
            "data" => TopicKind::Data,
            "status" => TopicKind::Status,
            "heartbeat" => TopicKind::Heartbeat,
            _ => return Err(Rejection::BadTopic),
        };
        match DeviceUuid::parse(device) {
            Some(device) => Ok((device, kind)),
            // More levels than three is a topic of another layout, not a bad device id.
            None if device.contains('/') => Err(Rejection::BadTopic),
            None => Err(Rejection::BadDeviceId),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn devices() -> TopicLayout {
        TopicLayout::new("devices").unwrap()
    }

    #[test]
    fn parses_the_three_kinds() {
        let l = devices();
        for kind in TopicKind::ALL {
            let (d, k) = l.parse(&l.topic("test-device-uuid", kind)).unwrap();
            assert_eq!(d.as_str(), "test-device-uuid");
            assert_eq!(k, kind);
        }
    }

    #[test]
    fn accepts_mac_addresses_and_max_length() {
        let l = devices();
        assert!(l.parse("devices/0C:DC:7E:1D:74:D0/data").is_ok());
        assert!(l.parse(&format!("devices/{}/data", "a".repeat(64))).is_ok());
        assert!(l.parse("devices/a.b_c-D9/heartbeat").is_ok());
    }

    #[test]
    fn rejects_bad_topics() {
        let l = devices();
        for t in [
            "devices/x",
            "devices/x/data/extra",
            "devices/x/other",
            "devices//data",
            "other/x/data",
            "devicesx/y/data",
            "devices",
            "",
            "/devices/x/data",
        ] {
            assert!(l.parse(t).is_err(), "{t:?} should be rejected");
        }
        // Which refusal (they are counted apart): a level too many is another layout; an
        // empty level where the id goes is a bad id.
        for (t, why) in [
            ("devices/a/b/data", Rejection::BadTopic),
            ("devices/x/data/extra", Rejection::BadTopic),
            ("devices/x/other", Rejection::BadTopic),
            ("devices//data", Rejection::BadDeviceId),
            ("devices/a b/status", Rejection::BadDeviceId),
        ] {
            assert_eq!(l.parse(t), Err(why), "{t:?}");
        }
    }

    #[test]
    fn rejects_bad_device_ids() {
        let l = devices();
        for d in [
            "x'; DROP TABLE device_main; --",
            "..%00",
            "caf\u{e9}",
            "a b",
            "a\u{200f}b",
        ] {
            assert_eq!(
                l.parse(&format!("devices/{d}/data")),
                Err(Rejection::BadDeviceId),
                "{d:?}"
            );
        }
        assert_eq!(
            l.parse(&format!("devices/{}/data", "a".repeat(65))),
            Err(Rejection::BadDeviceId)
        );
        assert_eq!(
            l.parse(&format!("devices/{}/data", "x".repeat(10_000))),
            Err(Rejection::BadDeviceId)
        );
    }

    #[test]
    fn nested_prefix_and_filters() {
        let l = TopicLayout::new("t_1/devices/").unwrap();
        assert_eq!(l.filter(TopicKind::Status), "t_1/devices/+/status");
        assert!(l.parse("t_1/devices/d1/data").is_ok());
        assert!(l.parse("devices/d1/data").is_err());
        for bad in ["", "/", "a/+/b", "a/#", "a//b", "/a"] {
            assert!(TopicLayout::new(bad).is_err(), "{bad:?}");
        }
    }

    proptest! {
        #[test]
        fn any_topic_parses_or_rejects_without_panic(t in ".{0,200}") {
            let _ = devices().parse(&t);
        }

        #[test]
        fn accepted_ids_round_trip(id in "[A-Za-z0-9_.:-]{1,64}") {
            let l = devices();
            let (d, k) = l.parse(&l.topic(&id, TopicKind::Data)).unwrap();
            prop_assert_eq!(d.as_str(), id.as_str());
            prop_assert_eq!(k, TopicKind::Data);
        }
    }
}
