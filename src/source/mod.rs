//! The client for the remote *source* server: connection strings, password files, a blocking
//! protocol-3.0 connection (TCP or Unix socket, TLS with libpq's sslmode semantics; trust,
//! password, md5 and SCRAM-SHA-256(-PLUS) authentication under libpq's `require_auth` and
//! `channel_binding` plus our own rule against handing a password to an unauthenticated
//! server; simple queries; streaming `COPY ... TO STDOUT`; replication-mode commands,
//! slots and logical streaming), the pgoutput decoder, WAL positions, and SQL quoting helpers.
//!
//! Plain Rust with no pgrx imports, so it is unit-tested with `cargo test`. Every wait wakes at
//! least every 100 ms to run the caller's interrupt check (inside PostgreSQL,
//! `CHECK_FOR_INTERRUPTS`), and nothing here ever shows a password: see [`conninfo`]. Client
//! programs such as `pg_dump` get the password through a private passfile
//! ([`write_private_passfile`]), never on their command line or in their environment.

mod auth;
pub mod connection;
pub mod conninfo;
pub mod copy_out;
pub mod error;
pub mod lsn;
pub mod passfile;
pub mod pgoutput;
mod protocol;
pub mod replication;
pub mod sql;
pub mod stream;
mod tls;
#[cfg(test)]
mod tls_tests;
mod transport;

pub use connection::{ConnectOptions, Connection, InterruptCheck, Row, SystemIdentity};
pub use conninfo::{
    AuthMethod, ChannelBindingMode, ConnInfo, ConnInfoError, RequireAuth, RootCert, SslMode,
    SslNegotiation,
};
pub use copy_out::CopyOut;
pub use error::{ServerError, SourceError};
pub use lsn::{Lsn, ParseLsnError};
pub use passfile::{write_private_passfile, PassfileError};
pub use pgoutput::{DecodeError, Decoder};
pub use replication::CreatedSlot;
pub use sql::{quote_ident, quote_literal};
pub use stream::{PgOutputOptions, ReplicationMessage, ReplicationStream};
