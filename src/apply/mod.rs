//! Applying the source's decoded changes to local tables.
//!
//! [`statements`] builds the SQL for one change (pure, unit-tested); the
//! apply worker that streams from the slot and runs them transaction by
//! transaction, advancing a replication origin in the same commit, builds
//! on it.

pub mod applier;
pub mod spi;
pub mod statements;
