//! MQTT 5 through rumqttc's v5 client: its options, and what its event loop yields turned into
//! the common [`Polled`] events.
//!
//! What differs from MQTT 3.1.1 for this service:
//! - a session no longer lives on by itself: clean start off only resumes one, and the session
//!   expiry interval (`MQTT_SESSION_EXPIRY_SECS`) says how long the broker keeps it after the
//!   connection ends. Zero, MQTT 5's default, would end it with every restart and lose what was
//!   published meanwhile;
//! - the maximum packet size is a CONNECT property the broker honours by *dropping* larger
//!   messages for us, so we announce MQTT's own maximum and reject oversized payloads ourselves;
//! - refusals, subscription failures and the broker's own DISCONNECT carry reason codes.

use rumqttc::Outgoing;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::{
    ConnectReturnCode, DisconnectReasonCode, Filter as SubscribeFilter, Packet, SubscribeReasonCode,
};
use rumqttc::v5::{ConnectionError, Event, MqttOptions, StateError};

use super::{
    BAD_CLIENT_ID, BAD_LOGIN, ConnAck, Delivery, Filter, MQTT_MAX_PACKET, Message, NOT_AUTHORIZED,
    Polled, Refused,
};
use crate::config::{ConfigError, Endpoint, MqttSettings};

/// Converts the configured QoS number.
fn qos(level: u8) -> QoS {
    match level {
        0 => QoS::AtMostOnce,
        2 => QoS::ExactlyOnce,
        _ => QoS::AtLeastOnce,
    }
}

/// The session expiry as MQTT 5 carries it: whole seconds in 32 bits (the settings keep it in
/// range; `u32::MAX` means the session never expires).
fn expiry_secs(settings: &MqttSettings) -> u32 {
    u32::try_from(settings.session_expiry.as_secs()).unwrap_or(u32::MAX)
}

/// Client options: `persistent` turns clean start off and asks the broker to keep the session
/// for `MQTT_SESSION_EXPIRY_SECS` after a disconnect; otherwise the session starts clean and
/// ends with the connection (expiry 0), as a clean session does in MQTT 3.1.1.
pub(super) fn options(
    settings: &MqttSettings,
    broker: &Endpoint,
    client_id: &str,
    persistent: bool,
) -> Result<MqttOptions, ConfigError> {
    let mut o = MqttOptions::new(client_id, broker.host.clone(), broker.port);
    o.set_keep_alive(settings.keepalive)
        .set_clean_start(!persistent)
        .set_manual_acks(true)
        // Also the limit rumqttc applies to what it reads.
        .set_max_packet_size(Some(MQTT_MAX_PACKET as u32))
        .set_transport(super::transport(settings)?);
    if persistent {
        o.set_session_expiry_interval(Some(expiry_secs(settings)));
    }
    if !settings.username.is_empty() {
        o.set_credentials(settings.username.clone(), settings.password.expose());
    }
    Ok(o)
}

pub(super) fn filter(f: &Filter) -> SubscribeFilter {
    SubscribeFilter::new(f.path.clone(), qos(f.qos))
}

pub(super) fn polled(event: Event) -> Polled {
    match event {
        Event::Incoming(Packet::Publish(mut publish)) => {
            // The broker checks that topics are UTF-8; a topic that is not anyway ends up a
            // bad_topic rejection with its bad bytes shown as U+FFFD.
            let topic = String::from_utf8_lossy(&std::mem::take(&mut publish.topic)).into_owned();
            let payload = std::mem::take(&mut publish.payload);
            Polled::Publish(Message {
                topic,
                payload,
                ack: (publish.qos != QoS::AtMostOnce).then_some(Delivery {
                    v5: true,
                    exactly_once: publish.qos == QoS::ExactlyOnce,
                    pkid: publish.pkid,
                }),
            })
        }
        Event::Incoming(Packet::ConnAck(connack)) => {
            let p = connack.properties.as_ref();
            Polled::ConnAck(ConnAck {
                session_present: connack.session_present,
                session_expiry: p.and_then(|p| p.session_expiry_interval),
                shared_unavailable: p.and_then(|p| p.shared_subscription_available) == Some(0),
                receive_max: p.and_then(|p| p.receive_max),
                max_packet_size: p.and_then(|p| p.max_packet_size),
            })
        }
        Event::Incoming(Packet::SubAck(suback)) => Polled::SubAck {
            refused: suback
                .return_codes
                .iter()
                .any(|c| !matches!(c, SubscribeReasonCode::Success(_)))
                .then(|| {
                    let reason = suback.properties.and_then(|p| p.reason_string);
                    Refused {
                        codes: match reason {
                            Some(r) => format!("{:?} ({r})", suback.return_codes),
                            None => format!("{:?}", suback.return_codes),
                        },
                        shared_unsupported: suback.return_codes.iter().any(|c| {
                            matches!(c, SubscribeReasonCode::SharedSubscriptionsNotSupported)
                        }),
                    }
                }),
        },
        Event::Outgoing(Outgoing::Disconnect) => Polled::DisconnectSent,
        _ => Polled::Other,
    }
}

/// The hint for a broker that does not answer an MQTT 5 CONNECT the way MQTT 5 says: aedes
/// answers with an MQTT 3.1.1 refusal that reads as the connection closing, amqtt does not
/// answer at all.
const NOT_MQTT5: &str = "no MQTT 5 answer to the CONNECT: if the broker only speaks MQTT 3.1.1, set MQTT_PROTOCOL=3.1.1";

/// Describes a connection error for an operator, with a hint where one helps. `connected`:
/// whether the broker had answered the CONNECT; a connection that ends or times out before
/// that is most often a broker without MQTT 5.
pub(super) fn describe(e: &ConnectionError, connected: bool) -> String {
    let text = describe_error(e);
    let before_answer = matches!(
        e,
        ConnectionError::Io(_)
            | ConnectionError::Timeout(_)
            | ConnectionError::NotConnAck(_)
            | ConnectionError::MqttState(
                StateError::Io(_) | StateError::Deserialization(_) | StateError::ConnectionAborted
            )
    );
    let refused_io =
        matches!(e, ConnectionError::Io(io) if io.kind() == std::io::ErrorKind::ConnectionRefused);
    if !connected && before_answer && !refused_io {
        format!("{text} ({NOT_MQTT5})")
    } else {
        text
    }
}

fn describe_error(e: &ConnectionError) -> String {
    use ConnectReturnCode as C;
    match e {
        ConnectionError::ConnectionRefused(C::BadUserNamePassword) => BAD_LOGIN.into(),
        ConnectionError::ConnectionRefused(C::NotAuthorized) => NOT_AUTHORIZED.into(),
        ConnectionError::ConnectionRefused(C::BadClientId | C::ClientIdentifierNotValid) => {
            BAD_CLIENT_ID.into()
        }
        ConnectionError::ConnectionRefused(
            C::RefusedProtocolVersion | C::UnsupportedProtocolVersion,
        ) => "broker does not accept MQTT 5 (set MQTT_PROTOCOL=3.1.1)".into(),
        ConnectionError::ConnectionRefused(C::Banned) => {
            "broker refused the connection: this client is banned".into()
        }
        ConnectionError::ConnectionRefused(code) => {
            format!("broker refused the connection: {code:?}")
        }
        ConnectionError::MqttState(StateError::ServerDisconnect {
            reason_code,
            reason_string,
        }) => {
            let hint = match reason_code {
                DisconnectReasonCode::SessionTakenOver => {
                    " (another client connected with this MQTT_CLIENT_ID)"
                }
                DisconnectReasonCode::NotAuthorized => " (check the broker's ACL for this user)",
                _ => "",
            };
            match reason_string {
                Some(why) => format!("broker disconnected us: {reason_code:?}: {why}{hint}"),
                None => format!("broker disconnected us: {reason_code:?}{hint}"),
            }
        }
        // The broker's CONNACK set a maximum packet size that the subscription does not fit.
        ConnectionError::MqttState(StateError::OutgoingPacketTooLarge { pkt_size, max }) => {
            format!(
                "the broker takes packets of at most {max} bytes (its MQTT 5 CONNACK), and the subscription is {pkt_size}: shorten MQTT_TOPIC_PREFIX or MQTT_SHARED_GROUP, or raise the broker's limit"
            )
        }
        ConnectionError::Io(io) => super::io_refused(io).unwrap_or_else(|| e.to_string()),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use rumqttc::v5::mqttbytes::v5::{ConnAck, ConnAckProperties, Publish, SubAck};

    fn settings(pairs: &[(&str, &str)]) -> MqttSettings {
        let map = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        crate::config::Settings::from_map(&map).unwrap().mqtt
    }

    #[test]
    fn a_persistent_session_outlives_the_connection() {
        let s = settings(&[("MQTT_PROTOCOL", "5"), ("MQTT_SESSION_EXPIRY_SECS", "600")]);
        let o = options(&s, &s.brokers[0], "svc", true).unwrap();
        assert!(!o.clean_start());
        assert_eq!(o.session_expiry_interval(), Some(600));
        assert!(o.manual_acks());
        assert_eq!(o.max_packet_size(), Some(MQTT_MAX_PACKET as u32));
        // `--check-config` and MQTT_CLEAN_SESSION=true: nothing left behind on the broker.
        let o = options(&s, &s.brokers[0], "svc-check", false).unwrap();
        assert!(o.clean_start());
        assert_eq!(o.session_expiry_interval(), None);
        let never = settings(&[("MQTT_SESSION_EXPIRY_SECS", "4294967295")]);
        assert_eq!(expiry_secs(&never), u32::MAX);
    }

    #[test]
    fn credentials_are_sent_only_when_a_user_is_set() {
        let anonymous = settings(&[("MQTT_PROTOCOL", "5")]);
        assert!(
            options(&anonymous, &anonymous.brokers[0], "a", true)
                .unwrap()
                .credentials()
                .is_none()
        );
        let user = settings(&[("MQTT_USERNAME", "u"), ("MQTT_PASSWORD", "p")]);
        let login = options(&user, &user.brokers[0], "a", true)
            .unwrap()
            .credentials()
            .unwrap();
        assert_eq!(
            (login.username.as_str(), login.password.as_str()),
            ("u", "p")
        );
    }

    #[test]
    fn a_publish_becomes_topic_payload_and_an_ack_without_them() {
        let mut p = Publish::new("devices/a/data", QoS::ExactlyOnce, "{}", None);
        p.pkid = 9;
        let Polled::Publish(m) = polled(Event::Incoming(Packet::Publish(p))) else {
            panic!("not a publish");
        };
        assert_eq!(
            (m.topic.as_str(), m.payload),
            ("devices/a/data", Bytes::from("{}"))
        );
        assert_eq!(
            m.ack,
            Some(Delivery {
                v5: true,
                exactly_once: true,
                pkid: 9
            })
        );
        let q0 = Publish::new("t", QoS::AtMostOnce, "x", None);
        let Polled::Publish(m) = polled(Event::Incoming(Packet::Publish(q0))) else {
            panic!("not a publish");
        };
        assert!(m.ack.is_none());
    }

    #[test]
    fn any_failure_reason_code_is_a_refused_subscription() {
        let suback = |codes| SubAck {
            pkid: 1,
            return_codes: codes,
            properties: None,
        };
        let ok = suback(vec![
            SubscribeReasonCode::Success(QoS::AtLeastOnce),
            SubscribeReasonCode::Success(QoS::AtMostOnce),
        ]);
        assert!(matches!(
            polled(Event::Incoming(Packet::SubAck(ok))),
            Polled::SubAck { refused: None }
        ));
        for code in [
            SubscribeReasonCode::NotAuthorized,
            SubscribeReasonCode::SharedSubscriptionsNotSupported,
            SubscribeReasonCode::Unspecified,
        ] {
            let bad = suback(vec![SubscribeReasonCode::Success(QoS::AtLeastOnce), code]);
            let Polled::SubAck {
                refused: Some(refused),
            } = polled(Event::Incoming(Packet::SubAck(bad)))
            else {
                panic!("{code:?} not reported");
            };
            assert!(
                refused.codes.contains(&format!("{code:?}")),
                "{}",
                refused.codes
            );
            assert_eq!(
                refused.shared_unsupported,
                code == SubscribeReasonCode::SharedSubscriptionsNotSupported
            );
        }
    }

    #[test]
    fn what_the_connack_says_is_passed_on() {
        let props = ConnAckProperties {
            session_expiry_interval: Some(60),
            receive_max: Some(1),
            max_qos: None,
            retain_available: None,
            max_packet_size: Some(4096),
            assigned_client_identifier: None,
            topic_alias_max: None,
            reason_string: None,
            user_properties: Vec::new(),
            wildcard_subscription_available: None,
            subscription_identifiers_available: None,
            shared_subscription_available: Some(0),
            server_keep_alive: None,
            response_information: None,
            server_reference: None,
            authentication_method: None,
            authentication_data: None,
        };
        let connack = ConnAck {
            session_present: true,
            code: ConnectReturnCode::Success,
            properties: Some(props),
        };
        let Polled::ConnAck(c) = polled(Event::Incoming(Packet::ConnAck(connack))) else {
            panic!("not a connack");
        };
        assert_eq!(
            c,
            super::super::ConnAck {
                session_present: true,
                session_expiry: Some(60),
                shared_unavailable: true,
                receive_max: Some(1),
                max_packet_size: Some(4096),
            }
        );
    }

    #[test]
    fn refusals_and_disconnects_name_what_to_check() {
        let refused = |c| describe(&ConnectionError::ConnectionRefused(c), false);
        assert!(refused(ConnectReturnCode::BadUserNamePassword).contains("MQTT_PASSWORD"));
        assert!(refused(ConnectReturnCode::NotAuthorized).contains("ACL"));
        assert!(refused(ConnectReturnCode::ClientIdentifierNotValid).contains("MQTT_CLIENT_ID"));
        assert!(refused(ConnectReturnCode::UnsupportedProtocolVersion).contains("MQTT_PROTOCOL"));
        assert!(refused(ConnectReturnCode::QuotaExceeded).contains("QuotaExceeded"));
        let taken = describe(
            &ConnectionError::MqttState(StateError::ServerDisconnect {
                reason_code: DisconnectReasonCode::SessionTakenOver,
                reason_string: None,
            }),
            true,
        );
        assert!(taken.contains("MQTT_CLIENT_ID"), "{taken}");
        let too_large = describe(
            &ConnectionError::MqttState(StateError::OutgoingPacketTooLarge {
                pkt_size: 300,
                max: 128,
            }),
            true,
        );
        assert!(too_large.contains("MQTT_TOPIC_PREFIX"), "{too_large}");
        let io = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        let text = describe(&ConnectionError::Io(io), false);
        assert!(
            text.contains("MQTT_PORT") && !text.contains("MQTT_PROTOCOL"),
            "{text}"
        );
    }

    #[test]
    fn a_broker_without_mqtt5_gets_the_protocol_hint_in_every_form_seen() {
        // aedes: an MQTT 3.1.1 refusal, read as the connection closing; amqtt: no answer.
        let forms = [
            ConnectionError::MqttState(StateError::ConnectionAborted),
            ConnectionError::MqttState(StateError::Io(std::io::Error::from(
                std::io::ErrorKind::UnexpectedEof,
            ))),
            ConnectionError::Io(std::io::Error::from(std::io::ErrorKind::ConnectionReset)),
            ConnectionError::NotConnAck(Box::new(Packet::PingResp(
                rumqttc::v5::mqttbytes::v5::PingResp,
            ))),
            ConnectionError::ConnectionRefused(ConnectReturnCode::UnsupportedProtocolVersion),
        ];
        for e in forms {
            let text = describe(&e, false);
            assert!(text.contains("MQTT_PROTOCOL=3.1.1"), "{e:?}: {text}");
        }
        // Once the broker answered, a closed connection is just that.
        let closed = describe(
            &ConnectionError::MqttState(StateError::ConnectionAborted),
            true,
        );
        assert!(!closed.contains("MQTT_PROTOCOL"), "{closed}");
    }
}
