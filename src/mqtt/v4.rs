//! MQTT 3.1.1 (protocol level 4) through rumqttc's default client: its options, and what its
//! event loop yields turned into the common [`Polled`] events.

use rumqttc::{
    ConnectionError, Event, MqttOptions, Outgoing, Packet, QoS, SubscribeFilter,
    SubscribeReasonCode,
};

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

/// Client options: `persistent` turns clean session off, so the broker keeps the session and
/// queues messages while we are away (until its own `persistent_client_expiration`, if any).
pub(super) fn options(
    settings: &MqttSettings,
    broker: &Endpoint,
    client_id: &str,
    persistent: bool,
) -> Result<MqttOptions, ConfigError> {
    let mut o = MqttOptions::new(client_id, broker.host.clone(), broker.port);
    o.set_keep_alive(settings.keepalive)
        .set_clean_session(!persistent)
        .set_manual_acks(true)
        .set_max_packet_size(MQTT_MAX_PACKET, 64 * 1024)
        .set_transport(super::transport(settings)?);
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
            let topic = std::mem::take(&mut publish.topic);
            let payload = std::mem::take(&mut publish.payload);
            Polled::Publish(Message {
                topic,
                payload,
                ack: (publish.qos != QoS::AtMostOnce).then_some(Delivery {
                    v5: false,
                    exactly_once: publish.qos == QoS::ExactlyOnce,
                    pkid: publish.pkid,
                }),
            })
        }
        Event::Incoming(Packet::ConnAck(connack)) => Polled::ConnAck(ConnAck {
            session_present: connack.session_present,
            ..ConnAck::default()
        }),
        Event::Incoming(Packet::SubAck(suback)) => Polled::SubAck {
            refused: suback
                .return_codes
                .iter()
                .any(|c| matches!(c, SubscribeReasonCode::Failure))
                .then(|| Refused {
                    codes: format!("{:?}", suback.return_codes),
                    shared_unsupported: false,
                }),
        },
        Event::Outgoing(Outgoing::Disconnect) => Polled::DisconnectSent,
        _ => Polled::Other,
    }
}

/// Describes a connection error for an operator, with a hint where one helps.
pub(super) fn describe(e: &ConnectionError) -> String {
    use rumqttc::ConnectReturnCode as C;
    match e {
        ConnectionError::ConnectionRefused(C::BadUserNamePassword) => BAD_LOGIN.into(),
        ConnectionError::ConnectionRefused(C::NotAuthorized) => NOT_AUTHORIZED.into(),
        ConnectionError::ConnectionRefused(C::BadClientId) => BAD_CLIENT_ID.into(),
        ConnectionError::Io(io) => super::io_refused(io).unwrap_or_else(|| e.to_string()),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    #[test]
    fn qos_levels() {
        assert_eq!(qos(0), QoS::AtMostOnce);
        assert_eq!(qos(1), QoS::AtLeastOnce);
        assert_eq!(qos(2), QoS::ExactlyOnce);
    }

    #[test]
    fn a_publish_becomes_topic_payload_and_an_ack_without_them() {
        let mut p = rumqttc::Publish::new("devices/a/data", QoS::AtLeastOnce, "{}");
        p.pkid = 7;
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
                v5: false,
                exactly_once: false,
                pkid: 7
            })
        );
        let q0 = rumqttc::Publish::new("t", QoS::AtMostOnce, "x");
        let Polled::Publish(m) = polled(Event::Incoming(Packet::Publish(q0))) else {
            panic!("not a publish");
        };
        assert!(m.ack.is_none());
    }

    #[test]
    fn a_failed_subscription_is_reported() {
        let ok = rumqttc::SubAck::new(1, vec![SubscribeReasonCode::Success(QoS::AtLeastOnce)]);
        assert!(matches!(
            polled(Event::Incoming(Packet::SubAck(ok))),
            Polled::SubAck { refused: None }
        ));
        let bad = rumqttc::SubAck::new(
            1,
            vec![
                SubscribeReasonCode::Success(QoS::AtLeastOnce),
                SubscribeReasonCode::Failure,
            ],
        );
        assert!(matches!(
            polled(Event::Incoming(Packet::SubAck(bad))),
            Polled::SubAck { refused: Some(_) }
        ));
    }

    #[test]
    fn refusals_name_the_variable_to_check() {
        let refused = |c| describe(&ConnectionError::ConnectionRefused(c));
        assert!(refused(rumqttc::ConnectReturnCode::BadUserNamePassword).contains("MQTT_PASSWORD"));
        assert!(refused(rumqttc::ConnectReturnCode::BadClientId).contains("MQTT_CLIENT_ID"));
        let io = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        assert!(describe(&ConnectionError::Io(io)).contains("MQTT_PORT"));
    }
}
