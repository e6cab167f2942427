//! mqtt-ingest: takes IoT device telemetry from an MQTT broker and keeps each device's state in
//! MySQL/MariaDB (`device_main`).
//!
//! The way a message travels, one module per step:
//!
//! * [`config`]: settings from the environment and `.env`, checked before any I/O.
//! * [`mqtt`]: the event loop: connects, (re)subscribes, hands each message on, acknowledges
//!   after commit.
//! * [`intake`]: pure parsing and validation of topic and bytes into an
//!   [`intake::model::Update`] or an [`intake::rejection::Rejection`], and the merge of updates.
//! * [`writer`]: takes updates from its queue, batches them into transactions through
//!   [`store`] (the database side: the SQL, the pool and the migrations, `device_sensors`,
//!   history, kept rejects, the presence sweep), then
//!   reports them settled; the event loop acknowledges them in order of receipt. [`work`] is
//!   the unit of work both sides share (job, ack token, the way back).
//! * [`ops`]: what an operator sees: HTTP (health, metrics), counters and the statistics block,
//!   systemd, log output.
//! * [`service`]: wires them together and runs until a shutdown token fires.
//! * [`switch`]: a shadow run's comparison with the Python service it replaces.

pub mod backoff;
pub mod config;
pub mod intake;
pub mod mqtt;
pub mod ops;
pub mod service;
pub mod store;
pub mod switch;
pub mod work;
pub mod writer;
