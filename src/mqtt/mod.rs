//! The broker side: connection options, the event loop, subscriptions and acknowledgements.
//!
//! The event-loop task ([`event_loop`]) only polls, validates (pure, fast: [`intake`]) and hands
//! updates to the writers' queues; it never waits on SQL. It alone holds the client: QoS 1/2
//! messages are acknowledged only after a writer reported them settled (committed, or rejected
//! for good), and in the order they arrived ([`acks`]), so a crash between receipt and commit
//! makes the broker deliver them again, and a strict broker sees its acks in order.
//!
//! Both protocol versions (`MQTT_PROTOCOL`) go through the same code here: [`v4`] (MQTT 3.1.1)
//! and [`v5`] (MQTT 5) only build their rumqttc client and turn what its event loop yields into
//! the common events of [`client`], so subscribing, acknowledging and the intake of a publish are
//! written once.

mod acks;
mod client;
mod event_loop;
mod intake;
mod outbox;
pub mod tls;
mod v4;
mod v5;

use client::{
    BAD_CLIENT_ID, BAD_LOGIN, ConnAck, Delivery, Filter, MQTT_MAX_PACKET, Message, NOT_AUTHORIZED,
    Polled, Refused, io_refused, transport,
};
pub use client::{Connection, Link, check_connection, client, subscription};
pub use event_loop::{EventLoopParts, run_event_loop};

/// Why the event loop stopped the service: the broker lacks something the settings ask for, or
/// a writer is gone; waiting will not bring either back.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Fatal(String);
