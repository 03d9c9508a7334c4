//! Schema and roles: running the destination's own `pg_dump`/`pg_dumpall`
//! against the source, and applying what they print here.
//!
//! * [`dump`] runs a client program with the source's password in a private
//!   passfile (never on the command line or in the environment), bounded by
//!   the caller's interrupt check.
//! * [`lexer`] cuts a psql script into statements and meta-commands the way
//!   psql and the server do (plain Rust, no pgrx), so nothing an object's
//!   owner writes into a name, comment or body can end a statement or pass
//!   for a meta-command.
//! * [`script`] turns pg_dump's plain output into what the server can run:
//!   psql meta-commands dropped (unexpected ones refused), the part before
//!   `\connect` (the database itself) separated from the rest.
//! * [`roles`] filters `pg_dumpall --roles-only` so roles that already exist
//!   here are left untouched.
//! * [`execute`] runs SQL here: a script through SPI, or a statement that
//!   must run at top level (`CREATE DATABASE`) through ProcessUtility.

pub mod dump;
pub mod execute;
pub mod lexer;
pub mod roles;
pub mod script;

/// Why a schema step failed.
#[derive(Debug, thiserror::Error)]
pub enum SchemaError {
    #[error("could not run {program}: {source}")]
    Spawn {
        program: String,
        source: std::io::Error,
    },
    #[error("{program} failed: {stderr}")]
    Failed { program: String, stderr: String },
    #[error("could not prepare credentials for {program}: {source}")]
    Credentials {
        program: String,
        source: crate::source::SourceError,
    },
    #[error("{0}")]
    Io(#[from] std::io::Error),
}
