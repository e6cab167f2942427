//! mqtt-ingest: takes IoT device telemetry from an MQTT broker and keeps each device's state in
//! MySQL/MariaDB (`device_main`).
//!
//! The way a message travels, one module per step:
//!
//! * [`config`]: settings from the environment and `.env`, checked before any I/O.
//! * [`mqtt`]: the event loop: connects, (re)subscribes, hands each message on, acknowledges
//!   after commit.
//! * [`topic`] and [`payload`]: pure parsing and validation of topic and bytes into a
//!   [`model::Update`] or a [`rejection::Rejection`]; [`timestamp`] reads a device's
//!   timestamp, [`zone`] is the database's time zone.
//! * [`writer`]: takes updates from its queue, batches them into transactions through
//!   [`store`] (the SQL, the pool and the migrations; [`sensors`] for `device_sensors`), then
//!   reports them settled; the event loop acknowledges them in order of receipt. [`work`] is
//!   the unit of work both sides share (job, ack token, the way back).
//! * [`stats`]: counters and the periodic statistics block; [`telemetry`]: log output.
//! * [`service`]: wires them together and runs until a shutdown token fires.

pub mod backoff;
pub mod config;
pub mod health;
pub mod heartbeat;
pub mod history;
pub mod http;
pub mod merge;
pub mod metrics;
pub mod model;
pub mod mqtt;
pub mod payload;
pub mod presence;
pub mod rejection;
pub mod rejects;
pub mod sensors;
pub mod service;
pub mod sql;
pub mod stats;
pub mod store;
pub mod systemd;
pub mod telemetry;
pub mod timestamp;
pub mod tls;
pub mod topic;
pub mod warn_limit;
pub mod work;
pub mod writer;
pub mod zone;
