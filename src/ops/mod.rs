//! Operations: what an operator sees and what the host asks of the service.
//!
//! [`http`] serves [`status`] (`/`, `/status.json`), [`health`] (`/healthz`, `/readyz`) and
//! [`metrics`] (`/metrics`); [`stats`]
//! counts and renders the periodic statistics block, [`warn_limit`] throttles warnings;
//! [`systemd`] speaks sd_notify and the watchdog, fed by [`heartbeat`]; [`telemetry`] sets up
//! log output.

pub mod health;
pub mod heartbeat;
pub mod http;
pub mod metrics;
pub mod stats;
pub mod status;
pub mod systemd;
pub mod telemetry;
pub mod warn_limit;
