//! The integration tests, one binary: each module is one part of the service under test,
//! against the real Mosquitto and MariaDB (`common`: private brokers and databases, ports,
//! waiting; `app`: the service under test; `ledger`: the chaos tests' record of what was sent).

mod alerting;
mod app;
use mqtt_ingest_testkit as common;
use mqtt_ingest_testkit::ledger;

mod brokers;
mod chaos;
mod cluster;
mod codehubot;
mod compose;
mod faults;
mod harness_selftest;
mod hostile;
mod ingest;
mod keep;
mod logs;
mod mqtt5;
mod ops;
mod payload_fuzz;
mod scale;
mod soak;
mod status_page;
mod strict;
mod switch;
mod systemd;
mod tls;
