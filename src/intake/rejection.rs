//! Why a message was not applied: every rejection has a reason code (for counters and logs)
//! and a human sentence.

use thiserror::Error;

/// A message the service refused. Nothing is written for it, and it is acknowledged to the
/// broker (retrying it would give the same answer).
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum Rejection {
    /// The topic is not `PREFIX/{uuid}/data|status|heartbeat`.
    #[error("topic is not <prefix>/<device>/data|status|heartbeat")]
    BadTopic,
    /// The device level of the topic is not 1–64 characters of `[A-Za-z0-9_.:-]`.
    #[error("device id in topic is not 1-64 characters of [A-Za-z0-9_.:-]")]
    BadDeviceId,
    /// The payload exceeds the configured size limit.
    #[error("payload of {size} bytes exceeds the limit of {limit} bytes")]
    TooLarge {
        /// Payload size in bytes.
        size: usize,
        /// The configured limit.
        limit: usize,
    },
    /// The payload is not UTF-8 text.
    #[error("payload is not valid UTF-8")]
    NotUtf8,
    /// The payload does not parse as JSON.
    #[error("payload is not valid JSON: {0}")]
    NotJson(String),
    /// The payload is JSON but not an object.
    #[error("payload is JSON but not an object")]
    NotObject,
    /// Every part of the payload was invalid.
    #[error("no valid data in payload: {0}")]
    NoValidData(String),
    /// No `device_main` row has this uuid (and registration of unknown devices is off).
    #[error("device not found in device_main")]
    UnknownDevice,
    /// The database refused this one message's write (for example a value too long for a column).
    #[error("database refused the write: {0}")]
    DbRefused(String),
}

impl Rejection {
    /// Every reason code, for metrics that list zero counts too.
    pub const REASONS: [&'static str; 9] = [
        "bad_topic",
        "bad_device_id",
        "too_large",
        "not_utf8",
        "not_json",
        "not_object",
        "no_valid_data",
        "unknown_device",
        "db_refused",
    ];

    /// A short, stable code for counters and structured logs.
    pub fn reason(&self) -> &'static str {
        match self {
            Rejection::BadTopic => "bad_topic",
            Rejection::BadDeviceId => "bad_device_id",
            Rejection::TooLarge { .. } => "too_large",
            Rejection::NotUtf8 => "not_utf8",
            Rejection::NotJson(_) => "not_json",
            Rejection::NotObject => "not_object",
            Rejection::NoValidData(_) => "no_valid_data",
            Rejection::UnknownDevice => "unknown_device",
            Rejection::DbRefused(_) => "db_refused",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_reason_is_listed() {
        let all = [
            Rejection::BadTopic,
            Rejection::BadDeviceId,
            Rejection::TooLarge { size: 2, limit: 1 },
            Rejection::NotUtf8,
            Rejection::NotJson(String::new()),
            Rejection::NotObject,
            Rejection::NoValidData(String::new()),
            Rejection::UnknownDevice,
            Rejection::DbRefused(String::new()),
        ];
        let reasons: Vec<_> = all.iter().map(Rejection::reason).collect();
        assert_eq!(reasons, Rejection::REASONS);
    }
}
