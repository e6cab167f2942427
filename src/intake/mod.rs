//! The pure intake: what a message is and what it becomes, with no I/O.
//!
//! [`topic`] and [`payload`] turn topic and bytes into a [`model::Update`] or a
//! [`rejection::Rejection`]; [`json`] is a payload's JSON, borrowed from its bytes; [`timestamp`] reads a device's
//! timestamp, [`zone`] is the
//! database's time zone; [`merge`] folds updates into a device's state, order-safe.

pub mod json;
pub mod merge;
pub mod model;
pub mod payload;
pub mod rejection;
pub mod timestamp;
pub mod topic;
pub mod zone;
