//! Applying the source's decoded changes to local tables.
//!
//! * [`applier`] keeps what the source announced about each relation and
//!   applies one change at a time, as the table's owner;
//! * [`local`] maps a source relation onto its local table (columns, input
//!   functions, how rows are found) and follows local DDL;
//! * [`executor`] makes the executor calls PostgreSQL's own apply makes;
//! * [`shape`] tells what differs when a source relation no longer fits its
//!   local table (DDL on the source), and the DDL that makes it fit;
//! * [`spi`] runs the few statements that stay SQL (TRUNCATE, session setup).
//!
//! The apply worker (`worker::apply`) streams from the slot and drives the
//! applier transaction by transaction.

pub mod applier;
mod executor;
mod local;
pub mod shape;
pub mod spi;
