//! Errors of the source client: one enum, [`SourceError`], whose variants are distinct on purpose
//! because the assessment turns each of them into a different check result and hint.
//!
//! Invariants: no variant carries a password or a full connection string, so `Display` and
//! `Debug` are safe to log and to show in views. Connection-phase variants carry the target
//! (`host:port`, `/socket/dir:port`) from [`crate::source::ConnInfo::display_target`] instead.

use std::fmt;
use std::time::Duration;

use crate::source::conninfo::SslMode;
use crate::source::passfile::PassfileError;
use crate::source::pgoutput::DecodeError;

/// An `ErrorResponse` (or `NoticeResponse`) sent by the source server, with the fields of the
/// protocol's error message that we keep.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerError {
    /// Non-localized severity (`ERROR`, `FATAL`, `PANIC`, `WARNING`, `NOTICE`...).
    pub severity: String,
    /// The five-character SQLSTATE.
    pub code: String,
    /// The primary message, already in PostgreSQL's lower-case style.
    pub message: String,
    /// Optional secondary message with more detail.
    pub detail: Option<String>,
    /// Optional suggestion of what to do.
    pub hint: Option<String>,
    /// Optional cursor position in the query text (1-based, in characters).
    pub position: Option<u32>,
    /// Optional call-stack context (the protocol's `W` field).
    pub where_: Option<String>,
}

impl ServerError {
    /// Builds an error from the `(field type, value)` pairs of an `ErrorResponse` or
    /// `NoticeResponse`. Missing mandatory fields get placeholders rather than failing: a
    /// server that sends a malformed error still deserves to have it reported.
    pub(crate) fn from_fields<'a>(fields: impl IntoIterator<Item = (u8, &'a str)>) -> ServerError {
        let mut localized_severity = None;
        let mut err = ServerError {
            severity: String::new(),
            code: String::new(),
            message: String::new(),
            detail: None,
            hint: None,
            position: None,
            where_: None,
        };
        for (kind, value) in fields {
            match kind {
                b'S' => localized_severity = Some(value.to_owned()),
                // 'V' is never translated (PostgreSQL 9.6+), so prefer it to 'S'.
                b'V' => err.severity = value.to_owned(),
                b'C' => err.code = value.to_owned(),
                b'M' => err.message = value.to_owned(),
                b'D' => err.detail = Some(value.to_owned()),
                b'H' => err.hint = Some(value.to_owned()),
                b'P' => err.position = value.parse().ok(),
                b'W' => err.where_ = Some(value.to_owned()),
                // Schema, table, column, file, line... are not needed by our callers.
                _ => {}
            }
        }
        if err.severity.is_empty() {
            err.severity = localized_severity.unwrap_or_else(|| "ERROR".to_owned());
        }
        if err.code.len() != 5 {
            // internal_error: the server did not say what went wrong.
            err.code = "XX000".to_owned();
        }
        if err.message.is_empty() {
            err.message = "server sent an error without a message".to_owned();
        }
        err
    }
}

impl fmt::Display for ServerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for ServerError {}

/// Everything that can go wrong while talking to the source server.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// DNS lookup of the host name failed.
    #[error("could not translate host name \"{host}\" to address: {reason}")]
    HostNotFound {
        /// The host name as given in the conninfo.
        host: String,
        /// What the resolver said.
        reason: String,
    },

    /// Nothing listens at that address (TCP RST, or a stale Unix socket file).
    #[error("connection to {target} refused")]
    ConnectionRefused {
        /// Where we tried to connect.
        target: String,
    },

    /// No route to the host or network, or no socket file in the socket directory.
    #[error("could not connect to {target}: {reason}")]
    Unreachable {
        /// Where we tried to connect.
        target: String,
        /// Why, in the operating system's words.
        reason: String,
    },

    /// The server did not answer in time.
    #[error("{phase} with {target} timed out after {}", fmt_duration(*.after))]
    Timeout {
        /// Where we were connected or connecting.
        target: String,
        /// `"connect"`, `"authentication"` or `"query"`.
        phase: &'static str,
        /// How long we waited.
        after: Duration,
    },

    /// The server rejected our credentials or had no `pg_hba.conf` entry for us (class 28).
    #[error("authentication to {target} failed: {error}")]
    AuthenticationFailed {
        /// Where we tried to connect.
        target: String,
        /// The server's error (boxed to keep `Result`s small).
        error: Box<ServerError>,
    },

    /// The server asked for a password and neither the conninfo nor its passfile had one.
    #[error("the server at {target} requires a password for user \"{user}\" but none was given")]
    PasswordRequired {
        /// Where we tried to connect.
        target: String,
        /// The user name we connected as.
        user: String,
    },

    /// The server asked for an authentication method we do not implement (GSSAPI, SSPI...).
    #[error("authentication method {method} requested by {target} is not supported")]
    UnsupportedAuthentication {
        /// Where we tried to connect.
        target: String,
        /// The method's name.
        method: String,
    },

    /// The sslmode demands TLS and the server answered that it has none.
    #[error("server at {target} does not support SSL, but SSL was required (sslmode={sslmode})")]
    TlsRefused {
        /// Where we connected.
        target: String,
        /// The sslmode that demanded TLS.
        sslmode: SslMode,
    },

    /// The TLS handshake or a TLS record failed: a certificate that does not verify, a host
    /// name that does not match, a protocol or alert error.
    #[error("SSL connection to {target} failed: {reason}")]
    Tls {
        /// Where we connected.
        target: String,
        /// What failed, in libpq's words where it has some.
        reason: String,
    },

    /// The conninfo's TLS files or settings cannot be used (nothing was sent).
    #[error("cannot set up SSL for {target}: {reason}")]
    TlsConfig {
        /// Where we would have connected.
        target: String,
        /// What is wrong (paths only, never file contents).
        reason: String,
    },

    /// We refused the server's authentication request: `require_auth`, `channel_binding`, or
    /// our rule against sending a password to a server that is not authenticated.
    #[error("authentication to {target} refused by the client: {reason}")]
    AuthenticationRefused {
        /// Where we connected.
        target: String,
        /// Why.
        reason: String,
    },

    /// The server answered a query (or the startup packet) with an `ErrorResponse`.
    #[error("{0}")]
    Server(Box<ServerError>),

    /// The server sent bytes that do not follow the protocol, or a result we cannot use.
    #[error("protocol violation: {0}")]
    Protocol(String),

    /// Reading or writing the socket failed.
    #[error("could not communicate with {target}: {source}")]
    Io {
        /// Where we were connected or connecting.
        target: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },

    /// The server closed the connection.
    #[error("server at {target} closed the connection unexpectedly")]
    Closed {
        /// Where we were connected.
        target: String,
    },

    /// An earlier request on this connection failed or was interrupted midway, so the replies
    /// on the wire no longer match requests; the connection must be dropped.
    #[error("connection to {target} is unusable after an earlier failure or interruption")]
    Broken {
        /// Where the connection goes.
        target: String,
    },

    /// The passfile named in the conninfo could not be used.
    #[error(transparent)]
    Passfile(#[from] PassfileError),

    /// A name we put into a replication command unquoted is not valid; nothing was sent.
    #[error("{what} name \"{name}\" is invalid: {reason}")]
    InvalidName {
        /// What the name names (`replication slot`, `output plugin`).
        what: &'static str,
        /// The rejected name (never a secret).
        name: String,
        /// Why it was rejected.
        reason: &'static str,
    },

    /// A pgoutput message from the replication stream could not be decoded. The stream cannot
    /// be trusted past it: reconnect and restart from the last confirmed position.
    #[error("could not decode a logical replication message: {0}")]
    Decode(#[from] DecodeError),

    /// The request cannot be done on this connection or by this server (a replication
    /// command on a normal connection, an option the server version lacks, a query that is
    /// not the kind the method runs). The connection stays usable.
    #[error("{0}")]
    Unsupported(String),
}

impl SourceError {
    /// The SQLSTATE to report this error with at the SQL boundary.
    pub fn sqlstate(&self) -> &str {
        match self {
            SourceError::Server(e) => &e.code,
            SourceError::AuthenticationFailed { error, .. } => &error.code,
            // sqlclient_unable_to_establish_sqlconnection, as libpq-based callers report.
            SourceError::HostNotFound { .. }
            | SourceError::ConnectionRefused { .. }
            | SourceError::Unreachable { .. }
            | SourceError::Passfile(_)
            | SourceError::TlsRefused { .. }
            | SourceError::Tls { .. }
            | SourceError::TlsConfig { .. } => "08001",
            // invalid_authorization_specification: the policy forbids this authentication.
            SourceError::AuthenticationRefused { .. } => "28000",
            SourceError::Timeout { phase, .. } => {
                if *phase == "query" {
                    // query_canceled, the code statement_timeout uses.
                    "57014"
                } else {
                    "08001"
                }
            }
            // postgres_fdw reports a missing password with this code too.
            SourceError::PasswordRequired { .. } => "2F003",
            SourceError::UnsupportedAuthentication { .. } => "0A000",
            SourceError::Protocol(_) | SourceError::Decode(_) => "08P01",
            SourceError::Io { .. } | SourceError::Closed { .. } => "08006",
            // connection_does_not_exist
            SourceError::Broken { .. } => "08003",
            // invalid_name, as ReplicationSlotValidateName reports.
            SourceError::InvalidName { .. } => "42602",
            SourceError::Unsupported(_) => "0A000",
        }
    }

    /// A short line saying what to do about the error, when we know one.
    pub fn hint(&self) -> Option<String> {
        let hint = match self {
            SourceError::Server(e) => return e.hint.clone(),
            SourceError::AuthenticationFailed { error, .. } => {
                if let Some(h) = &error.hint {
                    return Some(h.clone());
                }
                if error.code == "28000" {
                    "check that the source's pg_hba.conf has an entry for this user, database and \
                     client address (and that it does not require TLS)"
                } else {
                    "check the user name and password"
                }
            }
            SourceError::HostNotFound { .. } => {
                "check the host name and that it resolves from the destination server"
            }
            SourceError::ConnectionRefused { .. } => {
                "check that the server is running on that host and port and that \
                 listen_addresses includes the address"
            }
            SourceError::Unreachable { .. } => {
                "check the host, the port or the socket directory, and that routes and firewalls \
                 let the destination server reach the source"
            }
            SourceError::Timeout { phase, .. } => match *phase {
                "query" => "the source did not answer in time; check its load and locks, or raise the I/O timeout",
                _ => "check that firewalls or security groups let the destination reach the source, or raise connect_timeout",
            },
            SourceError::PasswordRequired { .. } => {
                "add a password to the connection string or name a passfile holding one"
            }
            SourceError::UnsupportedAuthentication { .. } => {
                "use scram-sha-256, md5 or password authentication for this client in the source's pg_hba.conf"
            }
            SourceError::TlsRefused { .. } => {
                "turn on ssl in the source's postgresql.conf, or use sslmode=prefer"
            }
            SourceError::Tls { reason, .. } if reason.contains("host name") => {
                "connect with the host name the server certificate names, or use sslmode=verify-ca"
            }
            SourceError::Tls { .. } => {
                "check the server certificate and sslrootcert (the CA that signed it)"
            }
            SourceError::TlsConfig { .. } => {
                "check the sslrootcert, sslcert and sslkey files and that the server can read them"
            }
            SourceError::AuthenticationRefused { .. } => {
                "use scram-sha-256 on the source, connect with sslmode=verify-full and sslrootcert, \
                 or allow the method explicitly with require_auth"
            }
            SourceError::Passfile(PassfileError::Permissions { .. }) => {
                "run chmod 0600 on the password file"
            }
            SourceError::Passfile(_) => "check the passfile path and that the server can read it",
            SourceError::Protocol(_) => "check that the target is a PostgreSQL server",
            SourceError::Decode(_) => {
                "restart replication from the last confirmed position; if it recurs at the same \
                 position, report it with the source's version"
            }
            SourceError::Io { .. } | SourceError::Closed { .. } => {
                "check the source server's log for why the connection ended"
            }
            SourceError::Broken { .. } => "open a new connection",
            SourceError::InvalidName { .. } => {
                "use only lower case letters, digits and underscores, at most 63 bytes"
            }
            SourceError::Unsupported(_) => return None,
        };
        Some(hint.to_owned())
    }

    /// True for errors after which the connection cannot be used any more.
    pub fn is_fatal(&self) -> bool {
        match self {
            SourceError::Server(e) => e.severity == "FATAL" || e.severity == "PANIC",
            SourceError::InvalidName { .. } | SourceError::Unsupported(_) => false,
            _ => true,
        }
    }
}

/// Renders a duration for messages: whole seconds as `10s`, otherwise milliseconds as `250ms`.
pub(crate) fn fmt_duration(d: Duration) -> String {
    if d.subsec_millis() == 0 && d.as_secs() > 0 {
        format!("{}s", d.as_secs())
    } else {
        format!("{}ms", d.as_millis())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server_error(code: &str) -> ServerError {
        ServerError::from_fields([(b'V', "FATAL"), (b'C', code), (b'M', "bad")])
    }

    #[test]
    fn from_fields_prefers_unlocalized_severity_and_fills_gaps() {
        let e = ServerError::from_fields([(b'S', "FEHLER"), (b'V', "ERROR"), (b'C', "42P01")]);
        assert_eq!(e.severity, "ERROR");
        assert_eq!(e.code, "42P01");
        assert_eq!(e.message, "server sent an error without a message");
        let e = ServerError::from_fields([(b'S', "FEHLER"), (b'M', "x"), (b'P', "12")]);
        assert_eq!(e.severity, "FEHLER");
        assert_eq!(e.code, "XX000");
        assert_eq!(e.position, Some(12));
    }

    #[test]
    fn sqlstates_and_hints() {
        let target = "h:5432".to_owned();
        let cases: Vec<(SourceError, &str)> = vec![
            (
                SourceError::Server(Box::new(server_error("42P01"))),
                "42P01",
            ),
            (
                SourceError::AuthenticationFailed {
                    target: target.clone(),
                    error: Box::new(server_error("28P01")),
                },
                "28P01",
            ),
            (
                SourceError::ConnectionRefused {
                    target: target.clone(),
                },
                "08001",
            ),
            (
                SourceError::Timeout {
                    target: target.clone(),
                    phase: "query",
                    after: Duration::from_secs(1),
                },
                "57014",
            ),
            (
                SourceError::Timeout {
                    target: target.clone(),
                    phase: "connect",
                    after: Duration::from_secs(1),
                },
                "08001",
            ),
            (
                SourceError::PasswordRequired {
                    target: target.clone(),
                    user: "u".into(),
                },
                "2F003",
            ),
            (
                SourceError::TlsRefused {
                    target: target.clone(),
                    sslmode: SslMode::Require,
                },
                "08001",
            ),
            (
                SourceError::AuthenticationRefused {
                    target: target.clone(),
                    reason: "x".into(),
                },
                "28000",
            ),
            (SourceError::Protocol("x".into()), "08P01"),
            (SourceError::Decode(DecodeError::Empty), "08P01"),
            (SourceError::Closed { target }, "08006"),
            (
                SourceError::InvalidName {
                    what: "replication slot",
                    name: "Bad".into(),
                    reason: "x",
                },
                "42602",
            ),
            (
                SourceError::Unsupported("copy_out needs a COPY".into()),
                "0A000",
            ),
        ];
        for (err, code) in cases {
            assert_eq!(err.sqlstate(), code, "{err}");
            let text = err.to_string();
            assert!(
                text.chars().next().is_some_and(|c| !c.is_uppercase()),
                "{text}"
            );
        }
    }

    #[test]
    fn timeout_display() {
        let e = SourceError::Timeout {
            target: "db:5432".into(),
            phase: "connect",
            after: Duration::from_millis(2500),
        };
        assert_eq!(e.to_string(), "connect with db:5432 timed out after 2500ms");
        assert!(e.hint().is_some());
    }

    #[test]
    fn fatal_classification() {
        assert!(
            !SourceError::Server(Box::new(ServerError::from_fields([(b'V', "ERROR")]))).is_fatal()
        );
        assert!(SourceError::Server(Box::new(server_error("57P01"))).is_fatal());
        assert!(SourceError::Closed {
            target: String::new()
        }
        .is_fatal());
        assert!(!SourceError::Unsupported("x".into()).is_fatal());
        assert!(!SourceError::InvalidName {
            what: "replication slot",
            name: "X".into(),
            reason: "x",
        }
        .is_fatal());
    }
}
