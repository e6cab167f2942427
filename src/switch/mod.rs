//! Proving a switch from CodeHubot's Python MQTT service before it is made: a shadow run writes
//! beside the live tables ([`crate::store::shadow`] copies them), and [`compare`] reads both and
//! names every difference, each either one of the deliberate [`differences`] or unexpected.

pub mod compare;
pub mod differences;

pub use compare::{Options, Report, compare};
pub use differences::{Class, DIFFERENCES};
