//! The database side: everything that speaks SQL.
//!
//! * [`write`]: a batch of validated updates applied in one transaction (re-exported here);
//! * [`pool`]: connection options, migrations, the start-up ping; [`nodes`]: the nodes of
//!   `DB_HOST` and the move to the next when one fails; [`schema`]: what is learnt about
//!   `device_main` at start-up;
//! * [`sql`]: error classes and the retry policy, statement shapes, placeholders;
//! * [`sensors`] (`device_sensors`), [`history`] (`device_history`), [`rejects`] (kept rejects),
//!   [`presence`] (the offline sweep), [`shadow`] (a shadow run's copy, and what `compare` reads).

pub mod history;
pub mod nodes;
mod pool;
pub mod presence;
pub mod rejects;
mod schema;
pub mod sensors;
pub mod shadow;
pub mod sql;
mod write;

pub use nodes::{NodeTurn, Nodes};
pub use pool::{MIGRATOR, connect_options, migrate, nodes, ping, pool};
pub use schema::{REGISTER_COLUMNS, WriteMode, column_chars, required_columns, write_mode};
pub use sql::{
    SHAPES, StoreError, delete_in_batches, error_number, exact_chunks, fit_chars, is_refusal,
    placeholders, settings_hint, shaped_chunks,
};
pub use write::{Applied, BatchOutcome, Store, StoreOptions};
