//! The client for the remote *source* server: connection strings, password files, a blocking
//! protocol-3.0 connection (TCP or Unix socket; trust, password, md5 and SCRAM-SHA-256
//! authentication; simple queries; replication-mode commands), and SQL quoting helpers.
//!
//! Plain Rust with no pgrx imports, so it is unit-tested with `cargo test`. Every wait wakes at
//! least every 100 ms to run the caller's interrupt check (inside PostgreSQL,
//! `CHECK_FOR_INTERRUPTS`), and nothing here ever shows a password: see [`conninfo`].

pub mod connection;
pub mod conninfo;
pub mod error;
pub mod passfile;
mod protocol;
pub mod sql;

pub use connection::{ConnectOptions, Connection, InterruptCheck, Row, SystemIdentity};
pub use conninfo::{ConnInfo, ConnInfoError, SslMode};
pub use error::{ServerError, SourceError};
pub use passfile::PassfileError;
pub use sql::{quote_ident, quote_literal};
