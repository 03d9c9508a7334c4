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

/// What pg_dump / pg_dumpall print (libpq's and the server's messages) when the source went away
/// or is restarting, as opposed to a refused login or an object they cannot dump.
const SOURCE_AWAY: &[&str] = &[
    "the database system is shutting down",
    "the database system is starting up",
    "the database system is in recovery mode",
    "the database system is not yet accepting connections",
    "terminating connection due to administrator command",
    "terminating connection due to unexpected postmaster exit",
    "server closed the connection unexpectedly",
    "no connection to the server",
    "could not receive data from server",
    "could not send data to server",
    "sorry, too many clients already",
    "Connection refused",
    "Connection timed out",
    "Connection reset by peer",
    "No route to host",
    "Network is unreachable",
    "SSL SYSCALL error",
    // `--snapshot=` of an exported snapshot whose session a restart ended.
    "invalid snapshot identifier",
];

impl SchemaError {
    /// A dump that failed because the source was away (restarting, the network lost): worth
    /// retrying once it answers again, as the task worker does for its own connections.
    pub fn source_unavailable(&self) -> bool {
        match self {
            SchemaError::Failed { stderr, .. } => {
                SOURCE_AWAY.iter().any(|text| stderr.contains(text))
            }
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::SchemaError;

    fn failed(stderr: &str) -> SchemaError {
        SchemaError::Failed {
            program: "pg_dump".into(),
            stderr: stderr.into(),
        }
    }

    #[test]
    fn a_source_that_went_away_is_told_from_a_refusal() {
        assert!(failed(
            "pg_dump: error: connection to server at \"127.0.0.1\", port 5432 failed: FATAL:  \
             the database system is shutting down"
        )
        .source_unavailable());
        assert!(failed(
            "pg_dump: error: Dumping the contents of table \"t\" failed: PQgetResult() failed.\n\
             pg_dump: detail: server closed the connection unexpectedly"
        )
        .source_unavailable());
        assert!(!failed(
            "pg_dump: error: connection to server at \"127.0.0.1\", port 5432 failed: FATAL:  \
             password authentication failed for user \"m\""
        )
        .source_unavailable());
        assert!(
            !failed("pg_dump: error: query failed: ERROR:  permission denied for table t")
                .source_unavailable()
        );
    }
}
