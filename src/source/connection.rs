//! A blocking connection to the source server: connecting (DNS, TCP or Unix socket),
//! authenticating, the simple query protocol, and replication-mode commands. Streaming COPY
//! lives in [`crate::source::copy_out`], slot commands in [`crate::source::replication`].
//!
//! Waiting: every wait (DNS, TCP connect, each read and write) is a loop of slices of at most
//! [`POLL_INTERVAL`] that calls the caller's interrupt check at least once per slice (before
//! each slice for connects and writes; for reads, see below) and gives up at a deadline. Inside PostgreSQL the check is `CHECK_FOR_INTERRUPTS()`, which may unwind: we
//! hold no global state, sockets are owned values closed on unwind, and a connection whose
//! request was cut short is marked unusable (see below) rather than left out of step.
//!
//! Connection states: `ready` is true only between a `ReadyForQuery` and the next request.
//! A request sets it false first and the final `ReadyForQuery` sets it back, so any early exit
//! (error, timeout, or unwinding from the interrupt check) leaves it false and every later
//! request fails with [`SourceError::Broken`] instead of reading another request's replies.
//!
//! Timeouts: the conninfo's `connect_timeout` bounds the DNS lookup, each TCP connect attempt,
//! and the whole authentication exchange; [`ConnectOptions::io_timeout`] bounds each wait for
//! the server after that, measured from the last bytes received (a long result that keeps
//! streaming never times out). Commands known to wait on the server for as long as it takes
//! (`CREATE_REPLICATION_SLOT`, `DROP_REPLICATION_SLOT ... WAIT`) have no deadline at all, only
//! the interrupt check.
//!
//! Reading: bytes go straight from the socket into the spare room of one growing buffer, and
//! messages are split off it without copying (a COPY's data reaches the caller as slices of
//! that buffer). A read blocks for at most the time until the next interrupt check is due, and
//! the check runs whenever [`POLL_INTERVAL`] has passed since it last ran, so a fast stream
//! pays for one check per 100 ms, not one per read or per message.

use std::collections::VecDeque;
use std::io;
use std::net::{IpAddr, SocketAddr, TcpStream, ToSocketAddrs};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::str::FromStr;
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use postgres_protocol::authentication::md5_hash;
use postgres_protocol::authentication::sasl::{
    ChannelBinding, ScramSha256, SCRAM_SHA_256, SCRAM_SHA_256_PLUS,
};
use postgres_protocol::message::frontend;

use crate::source::auth::{self, Channel, Progress, Request};
use crate::source::conninfo::{ChannelBindingMode, ConnInfo, SslMode, SslNegotiation};
use crate::source::error::{ServerError, SourceError};
use crate::source::passfile;
use crate::source::protocol::{self, Auth, BackendMessage};
use crate::source::tls;
use crate::source::transport::{is_retry, Socket, Transport};

/// Longest time between two calls of the interrupt check during any wait.
pub const POLL_INTERVAL: Duration = Duration::from_millis(100);
/// Default for [`ConnectOptions::io_timeout`].
pub const DEFAULT_IO_TIMEOUT: Duration = Duration::from_secs(60);
/// How many notices [`Connection::notices`] keeps.
const MAX_NOTICES: usize = 16;
/// Largest total size of the rows one query may return; beyond it the query fails.
const MAX_RESULT_BYTES: usize = 1 << 30;
/// Room made in the read buffer before each read of an ordinary reply.
pub(super) const READ_CHUNK: usize = 16 * 1024;
/// Most room made at once for a large message whose header is buffered; beyond it the
/// buffer grows as the bytes arrive.
const MAX_UPFRONT_ROOM: usize = 64 * 1024 * 1024;
/// The `SSLRequest` code (1234 << 16 | 5679).
const SSL_REQUEST_CODE: i32 = 80_877_103;

/// A callback run at least every [`POLL_INTERVAL`] while waiting. Inside PostgreSQL it is
/// `|| pgrx::check_for_interrupts!()`; it may panic to abort the wait.
pub type InterruptCheck = Box<dyn FnMut() + Send>;

/// How to connect, beyond what the conninfo says.
pub struct ConnectOptions {
    /// Longest wait for any server reply after authentication (default 60 s).
    pub io_timeout: Duration,
    /// Called at least every 100 ms during every wait, for the life of the connection.
    pub interrupt_check: Option<InterruptCheck>,
    /// Open a logical replication connection (`replication=database`), which accepts
    /// replication commands such as `IDENTIFY_SYSTEM` as well as SQL.
    pub replication: bool,
    /// `application_name` to send when the conninfo sets none (default `cloudmig`).
    pub default_application_name: String,
}

impl ConnectOptions {
    /// The defaults: 60 s I/O timeout, no interrupt check, not replication, `cloudmig`.
    pub fn new() -> ConnectOptions {
        ConnectOptions {
            io_timeout: DEFAULT_IO_TIMEOUT,
            interrupt_check: None,
            replication: false,
            default_application_name: "cloudmig".to_owned(),
        }
    }
}

impl Default for ConnectOptions {
    fn default() -> ConnectOptions {
        ConnectOptions::new()
    }
}

impl std::fmt::Debug for ConnectOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnectOptions")
            .field("io_timeout", &self.io_timeout)
            .field("interrupt_check", &self.interrupt_check.is_some())
            .field("replication", &self.replication)
            .field("default_application_name", &self.default_application_name)
            .finish()
    }
}

/// One row of a query result, all values in text format.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Row {
    columns: Arc<[String]>,
    values: Vec<Option<String>>,
}

impl Row {
    /// Builds a row; `values` must have one entry per column.
    pub fn new(columns: Arc<[String]>, values: Vec<Option<String>>) -> Row {
        Row { columns, values }
    }

    /// The column names, shared by all rows of a result.
    pub fn columns(&self) -> &[String] {
        &self.columns
    }

    /// Number of columns.
    pub fn len(&self) -> usize {
        self.values.len()
    }

    /// True for a row without columns.
    pub fn is_empty(&self) -> bool {
        self.values.is_empty()
    }

    /// The value at a position; `None` for NULL or out of range.
    pub fn value(&self, index: usize) -> Option<&str> {
        self.values.get(index).and_then(|v| v.as_deref())
    }

    fn index_of(&self, column: &str) -> Option<usize> {
        self.columns.iter().position(|c| c == column)
    }

    /// The value of a column; `None` for NULL or a missing column.
    pub fn get(&self, column: &str) -> Option<&str> {
        self.index_of(column).and_then(|i| self.value(i))
    }

    /// The value of a column, `None` for NULL; a missing column is an error.
    pub fn try_get(&self, column: &str) -> Result<Option<&str>, SourceError> {
        match self.index_of(column) {
            Some(i) => Ok(self.value(i)),
            None => Err(SourceError::Protocol(format!(
                "column \"{column}\" is missing from the result"
            ))),
        }
    }

    /// The value of a column parsed as `T`; NULL, a missing column and an unparsable value
    /// are errors naming the column.
    pub fn parse<T: FromStr>(&self, column: &str) -> Result<T, SourceError> {
        self.parse_opt(column)?
            .ok_or_else(|| SourceError::Protocol(format!("column \"{column}\" is null")))
    }

    /// Like [`Row::parse`] but NULL gives `None`.
    pub fn parse_opt<T: FromStr>(&self, column: &str) -> Result<Option<T>, SourceError> {
        let Some(text) = self.try_get(column)? else {
            return Ok(None);
        };
        text.parse().map(Some).map_err(|_| {
            let shown: String = text.chars().take(64).collect();
            SourceError::Protocol(format!(
                "column \"{column}\" has value \"{shown}\", which is not a valid {}",
                std::any::type_name::<T>()
            ))
        })
    }

    /// A boolean column in PostgreSQL's text form (`t`/`f`); NULL or missing is an error.
    pub fn get_bool(&self, column: &str) -> Result<bool, SourceError> {
        match self.try_get(column)? {
            Some("t") => Ok(true),
            Some("f") => Ok(false),
            Some(other) => Err(SourceError::Protocol(format!(
                "column \"{column}\" has value \"{}\", which is not a boolean",
                other.chars().take(64).collect::<String>()
            ))),
            None => Err(SourceError::Protocol(format!(
                "column \"{column}\" is null"
            ))),
        }
    }
}

/// What `IDENTIFY_SYSTEM` reports on a replication connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SystemIdentity {
    /// The cluster's system identifier (a 64-bit integer, as text).
    pub systemid: String,
    /// Current timeline.
    pub timeline: u32,
    /// Current WAL flush location, as `X/X`.
    pub xlogpos: String,
    /// The database connected to, for a logical replication connection.
    pub dbname: Option<String>,
}

/// How long a wait may last and what to call it when it times out.
#[derive(Clone, Copy)]
pub(super) struct Budget {
    phase: &'static str,
    /// A fixed deadline, or `None` for "`limit` after the last progress".
    deadline: Option<Instant>,
    limit: Duration,
}

impl Budget {
    pub(super) fn fixed(phase: &'static str, limit: Duration) -> Budget {
        Budget {
            phase,
            deadline: Some(deadline_after(limit)),
            limit,
        }
    }

    pub(super) fn idle(phase: &'static str, limit: Duration) -> Budget {
        Budget {
            phase,
            deadline: None,
            limit,
        }
    }

    /// No deadline (in practice: a year after the last progress); only the interrupt check
    /// ends the wait. For commands that wait on the server for as long as it takes.
    pub(super) fn unbounded(phase: &'static str) -> Budget {
        Budget::idle(phase, Duration::MAX)
    }

    fn deadline(&self) -> Instant {
        self.deadline.unwrap_or_else(|| deadline_after(self.limit))
    }
}

/// The read timeout for a wait of at most `limit`: whole 10 ms steps (so the socket option
/// rarely changes while a stream flows), or whole milliseconds below 10 ms; never zero,
/// which would mean "forever".
fn read_slice(limit: Duration) -> Duration {
    let ms = limit.as_millis().min(POLL_INTERVAL.as_millis());
    let ms = if ms >= 10 { ms - ms % 10 } else { ms.max(1) };
    Duration::from_millis(u64::try_from(ms).unwrap_or(1))
}

/// `now + limit`, saturating instead of overflowing for absurd limits.
fn deadline_after(limit: Duration) -> Instant {
    let now = Instant::now();
    now.checked_add(limit)
        .or_else(|| now.checked_add(Duration::from_secs(365 * 24 * 3600)))
        .unwrap_or(now)
}

/// The slice of time to wait next: at most [`POLL_INTERVAL`], at least 1 ms (a zero socket
/// timeout would mean "forever").
fn slice_until(deadline: Instant, now: Instant) -> Duration {
    deadline
        .saturating_duration_since(now)
        .min(POLL_INTERVAL)
        .max(Duration::from_millis(1))
}

fn run_check(check: &mut Option<InterruptCheck>) {
    if let Some(f) = check.as_mut() {
        f();
    }
}

/// An open, authenticated connection to the source server.
pub struct Connection {
    transport: Transport,
    target: String,
    rbuf: BytesMut,
    parameters: Vec<(String, String)>,
    backend_key: Option<(i32, i32)>,
    used_password: bool,
    /// SCRAM was bound to the TLS channel (SCRAM-SHA-256-PLUS) and verified.
    channel_bound: bool,
    replication: bool,
    io_timeout: Duration,
    interrupt_check: Option<InterruptCheck>,
    /// When the interrupt check last ran (or the connection was opened).
    last_check: Instant,
    notices: VecDeque<ServerError>,
    transaction_status: u8,
    ready: bool,
    /// The startup completed: on close we say goodbye with `Terminate` (never before, where
    /// the server would read it as a malformed startup packet).
    established: bool,
    /// A logical `START_REPLICATION` on this connection ended; the walsender cannot run
    /// another (see [`crate::source::stream`]).
    logical_stream_ended: bool,
    read_timeout: Option<Duration>,
    write_timeout: Option<Duration>,
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection")
            .field("target", &self.target)
            .field("backend_pid", &self.backend_pid())
            .field("used_password", &self.used_password)
            .field("tls", &self.tls_in_use())
            .field("replication", &self.replication)
            .field("ready", &self.ready)
            .finish_non_exhaustive()
    }
}

impl Connection {
    /// Connects and authenticates, with TLS as the conninfo's `sslmode` says (see
    /// [`crate::source::tls`]) and answering only the authentication requests
    /// [`crate::source::auth`] allows.
    ///
    /// As libpq does: `prefer` tries TLS and, if the handshake fails or the server rejects the
    /// TLS connection during startup, once more without; `allow` tries plaintext and, if the
    /// server rejects it, once more with TLS. A server answering `N` to the `SSLRequest` gets
    /// the plaintext startup on the same socket when the mode allows it. Unix sockets never
    /// use TLS (libpq ignores sslmode there).
    pub fn connect(info: &ConnInfo, opts: ConnectOptions) -> Result<Connection, SourceError> {
        let ConnectOptions {
            io_timeout,
            interrupt_check,
            replication,
            default_application_name,
        } = opts;
        let target = info.display_target();
        let user = match &info.user {
            Some(u) => u.clone(),
            // libpq's default: the operating system user running the client.
            None => os_user_name().ok_or_else(|| SourceError::Io {
                target: target.clone(),
                source: io::Error::other("could not look up the local user name; set user"),
            })?,
        };
        let dbname = info.dbname.clone().unwrap_or_else(|| user.clone());
        let application_name = info
            .application_name
            .clone()
            .unwrap_or(default_application_name);
        let unix = info.socket_path().is_some();
        // Read the certificate files first: a bad one fails before touching the network.
        let tls_setup = if unix || info.sslmode == SslMode::Disable {
            None
        } else {
            Some(tls::setup(info).map_err(|e| SourceError::TlsConfig {
                target: target.clone(),
                reason: e.0,
            })?)
        };
        let attempts: &[Attempt] = match info.sslmode {
            _ if unix => &[Attempt::Plain],
            SslMode::Disable => &[Attempt::Plain],
            SslMode::Allow => &[Attempt::Plain, Attempt::Tls],
            SslMode::Prefer => &[Attempt::Tls, Attempt::Plain],
            SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull => &[Attempt::Tls],
        };
        let mut check = interrupt_check;
        let mut last_error = None;
        for attempt in attempts {
            let (socket, target) = open_stream(info, &target, &mut check)?;
            let mut conn = Connection {
                transport: Transport::Plain(socket),
                target,
                rbuf: BytesMut::with_capacity(READ_CHUNK),
                parameters: Vec::new(),
                backend_key: None,
                used_password: false,
                channel_bound: false,
                replication,
                io_timeout,
                interrupt_check: check.take(),
                last_check: Instant::now(),
                notices: VecDeque::new(),
                transaction_status: b'I',
                ready: false,
                established: false,
                logical_stream_ended: false,
                read_timeout: None,
                write_timeout: None,
            };
            let budget = Budget::fixed("authentication", info.connect_timeout);
            let outcome = match (attempt, &tls_setup) {
                (Attempt::Tls, Some(setup)) => conn.negotiate_tls(info, setup.clone(), budget),
                _ => Ok(()),
            }
            .and_then(|()| conn.startup(info, &user, &dbname, &application_name, budget));
            match outcome {
                Ok(()) => return Ok(conn),
                Err(e) => {
                    check = conn.interrupt_check.take();
                    // Only a server's refusal (or, for prefer, a failed handshake) is worth
                    // another try, and only in the direction libpq retries.
                    // A server that answered `N` already chose plaintext: no retry then.
                    let retry = match (info.sslmode, attempt) {
                        (SslMode::Prefer, Attempt::Tls) => {
                            conn.tls_in_use()
                                && (matches!(e, SourceError::Tls { .. }) || is_server_rejection(&e))
                        }
                        (SslMode::Allow, Attempt::Plain) => is_server_rejection(&e),
                        _ => false,
                    };
                    drop(conn);
                    if !retry {
                        return Err(e);
                    }
                    last_error = Some(e);
                }
            }
        }
        Err(last_error.unwrap_or_else(|| SourceError::Protocol("no connection attempt".into())))
    }

    /// Starts TLS: an `SSLRequest` (or, for `sslnegotiation=direct`, nothing), then the
    /// handshake. A server answering `N` leaves the connection in plaintext, which is an error
    /// if the sslmode requires TLS.
    fn negotiate_tls(
        &mut self,
        info: &ConnInfo,
        setup: tls::TlsSetup,
        budget: Budget,
    ) -> Result<(), SourceError> {
        if info.sslnegotiation == SslNegotiation::Postgres {
            let mut request = BytesMut::with_capacity(8);
            request.extend_from_slice(&8i32.to_be_bytes());
            request.extend_from_slice(&SSL_REQUEST_CODE.to_be_bytes());
            self.send(&request, budget)?;
            self.fill(budget, 1)?;
            match self.rbuf.first().copied() {
                // Bytes after the answer were not encrypted, yet would be read as if they had
                // come through TLS (CVE-2021-23222): refuse, as libpq does.
                Some(b'S') | Some(b'N') if self.rbuf.len() > 1 => {
                    return Err(SourceError::Protocol(
                        "received unencrypted data after SSL response".into(),
                    ))
                }
                Some(b'S') => self.rbuf.clear(),
                Some(b'N') => {
                    self.rbuf.clear();
                    if info.sslmode.requires_tls() {
                        return Err(SourceError::TlsRefused {
                            target: self.target.clone(),
                            sslmode: info.sslmode,
                        });
                    }
                    return Ok(());
                }
                // An error before negotiation (too many connections, for instance).
                Some(b'E') => {
                    return match self.read_message(budget)? {
                        BackendMessage::ErrorResponse(e) => Err(SourceError::Server(Box::new(e))),
                        other => Err(SourceError::Protocol(format!(
                            "unexpected {} in reply to SSLRequest",
                            message_name(&other)
                        ))),
                    }
                }
                _ => {
                    return Err(SourceError::Protocol(
                        "received invalid response to SSL negotiation".into(),
                    ))
                }
            }
        }
        self.transport
            .start_tls(setup)
            .map_err(|e| self.io_error(e))?;
        let deadline = budget.deadline();
        while !self.wait_io(budget, deadline, |t, _| t.handshake_step())? {}
        if info.sslnegotiation == SslNegotiation::Direct
            && self.transport.tls().and_then(|t| t.alpn_protocol()) != Some(tls::ALPN_POSTGRESQL)
        {
            return Err(SourceError::Tls {
                target: self.target.clone(),
                reason: "direct SSL connection was established without ALPN protocol \
                         negotiation extension (the server is older than PostgreSQL 17)"
                    .into(),
            });
        }
        Ok(())
    }

    /// Sends the startup packet and runs the authentication exchange until `ReadyForQuery`.
    fn startup(
        &mut self,
        info: &ConnInfo,
        user: &str,
        dbname: &str,
        application_name: &str,
        budget: Budget,
    ) -> Result<(), SourceError> {
        let mut params = vec![
            ("user", user),
            ("database", dbname),
            // Text forms every reader here parses exactly, whatever the
            // source's configuration (as libpqwalreceiver pins them): ISO
            // dates, postgres-style intervals, floats that round-trip.
            ("client_encoding", "UTF8"),
            ("DateStyle", "ISO"),
            ("IntervalStyle", "postgres"),
            ("extra_float_digits", "3"),
        ];
        if !application_name.is_empty() {
            params.push(("application_name", application_name));
        }
        if self.replication {
            params.push(("replication", "database"));
        }
        let mut buf = BytesMut::new();
        frontend::startup_message(params, &mut buf).map_err(|_| {
            SourceError::Protocol("user, database or application name contains a null byte".into())
        })?;
        self.send(&buf, budget)?;

        let mut scram: Option<Scram> = None;
        let mut progress = Progress::default();
        loop {
            match self.read_message(budget)? {
                BackendMessage::Authentication(auth) => {
                    self.authenticate(auth, &mut scram, &mut progress, info, user, dbname, budget)?
                }
                BackendMessage::ParameterStatus { name, value } => self.set_parameter(name, value),
                BackendMessage::BackendKeyData {
                    process_id,
                    secret_key,
                } => self.backend_key = Some((process_id, secret_key)),
                BackendMessage::NoticeResponse(n) => self.push_notice(n),
                BackendMessage::ErrorResponse(error) => {
                    // Class 28 is invalid_authorization_specification / invalid_password.
                    return Err(if error.code.starts_with("28") {
                        SourceError::AuthenticationFailed {
                            target: self.target.clone(),
                            error: Box::new(error),
                        }
                    } else {
                        SourceError::Server(Box::new(error))
                    });
                }
                BackendMessage::ReadyForQuery { status } => {
                    self.transaction_status = status;
                    self.ready = true;
                    self.established = true;
                    return Ok(());
                }
                BackendMessage::NegotiateProtocolVersion => {
                    return Err(SourceError::Protocol(
                        "server does not support protocol version 3.0".into(),
                    ))
                }
                other => {
                    return Err(SourceError::Protocol(format!(
                        "unexpected {} during authentication",
                        message_name(&other)
                    )))
                }
            }
        }
    }

    /// What protects this connection, for the authentication policy.
    fn channel(&self) -> Channel {
        Channel {
            tls: self.tls_in_use(),
            server_verified: self.transport.server_verified(),
            unix_socket: self.transport.socket().is_unix(),
        }
    }

    /// Refuses a request the policy forbids, before anything is sent.
    fn check_request(
        &self,
        info: &ConnInfo,
        request: Request,
        progress: Progress,
    ) -> Result<(), SourceError> {
        auth::check(info, self.channel(), request, progress).map_err(|reason| {
            SourceError::AuthenticationRefused {
                target: self.target.clone(),
                reason,
            }
        })
    }

    /// Answers one authentication request.
    #[allow(clippy::too_many_arguments)]
    fn authenticate(
        &mut self,
        auth: Auth,
        scram: &mut Option<Scram>,
        progress: &mut Progress,
        info: &ConnInfo,
        user: &str,
        dbname: &str,
        budget: Budget,
    ) -> Result<(), SourceError> {
        let mut buf = BytesMut::new();
        match auth {
            Auth::Ok => {
                self.check_request(info, Request::Ok, *progress)?;
                self.channel_bound = progress.channel_bound;
                return Ok(());
            }
            Auth::CleartextPassword => {
                self.check_request(info, Request::Cleartext, *progress)?;
                let password = self.password(info, user, dbname)?;
                frontend::password_message(password.as_bytes(), &mut buf)
                    .map_err(|_| SourceError::Protocol("password contains a null byte".into()))?;
                progress.finished = true;
            }
            Auth::Md5Password { salt } => {
                self.check_request(info, Request::Md5, *progress)?;
                let password = self.password(info, user, dbname)?;
                let hash = md5_hash(user.as_bytes(), password.as_bytes(), salt);
                frontend::password_message(hash.as_bytes(), &mut buf)
                    .map_err(|_| SourceError::Protocol("md5 hash contains a null byte".into()))?;
                progress.finished = true;
            }
            Auth::Sasl { mechanisms } => {
                self.check_request(info, Request::Sasl, *progress)?;
                let (mechanism, binding) = self.choose_sasl(info, &mechanisms)?;
                let password = self.password(info, user, dbname)?;
                let client = ScramSha256::new(password.as_bytes(), binding);
                frontend::sasl_initial_response(mechanism, client.message(), &mut buf).map_err(
                    |e| SourceError::Protocol(format!("could not build SASL message: {e}")),
                )?;
                *scram = Some(Scram {
                    client,
                    bound: mechanism == SCRAM_SHA_256_PLUS,
                });
            }
            Auth::SaslContinue(data) => {
                self.check_request(info, Request::Sasl, *progress)?;
                let scram = scram.as_mut().ok_or_else(|| {
                    SourceError::Protocol("SASL continue message without SASL start".into())
                })?;
                scram.client.update(&data).map_err(|e| {
                    SourceError::Protocol(format!("invalid SCRAM server-first-message: {e}"))
                })?;
                frontend::sasl_response(scram.client.message(), &mut buf).map_err(|e| {
                    SourceError::Protocol(format!("could not build SASL message: {e}"))
                })?;
            }
            Auth::SaslFinal(data) => {
                self.check_request(info, Request::Sasl, *progress)?;
                let scram = scram.as_mut().ok_or_else(|| {
                    SourceError::Protocol("SASL final message without SASL start".into())
                })?;
                // A failure here means the server does not know the password: it may be an
                // impostor, so this is an error even though it let us in.
                scram.client.finish(&data).map_err(|e| {
                    SourceError::Protocol(format!("server's SCRAM signature did not verify: {e}"))
                })?;
                progress.finished = true;
                progress.channel_bound = scram.bound;
                return Ok(());
            }
            Auth::Unsupported(method) => {
                return Err(SourceError::UnsupportedAuthentication {
                    target: self.target.clone(),
                    method: method.to_owned(),
                })
            }
        }
        self.send(&buf, budget)?;
        self.used_password = true;
        Ok(())
    }

    /// Picks the SASL mechanism and channel binding as libpq's `pg_SASL_init` does: over TLS,
    /// SCRAM-SHA-256-PLUS bound to the server certificate when offered (unless
    /// `channel_binding=disable`), else SCRAM-SHA-256 saying "client supports binding, server
    /// did not offer it" (gs2 flag `y`, so a server that did offer it detects the downgrade);
    /// without TLS, SCRAM-SHA-256 with flag `n`.
    fn choose_sasl(
        &self,
        info: &ConnInfo,
        mechanisms: &[String],
    ) -> Result<(&'static str, ChannelBinding), SourceError> {
        let refuse = |reason: &str| SourceError::AuthenticationRefused {
            target: self.target.clone(),
            reason: reason.to_owned(),
        };
        let offered = |m: &str| mechanisms.iter().any(|x| x == m);
        let tls = self.transport.tls();
        if offered(SCRAM_SHA_256_PLUS) && tls.is_none() {
            // Stripped TLS, maybe by a proxy: the server would refuse unbound SCRAM anyway.
            return Err(refuse(
                "server offered SCRAM-SHA-256-PLUS authentication over a non-SSL connection",
            ));
        }
        let choice = match tls {
            Some(t)
                if offered(SCRAM_SHA_256_PLUS)
                    && info.channel_binding != ChannelBindingMode::Disable =>
            {
                let cert = t
                    .peer_certificate()
                    .ok_or_else(|| refuse("no server certificate to bind the SCRAM exchange to"))?;
                let hash = tls::certificate_hash(cert).map_err(|e| refuse(&e))?;
                (
                    SCRAM_SHA_256_PLUS,
                    ChannelBinding::tls_server_end_point(hash),
                )
            }
            _ if offered(SCRAM_SHA_256) => {
                let binding =
                    if tls.is_some() && info.channel_binding != ChannelBindingMode::Disable {
                        ChannelBinding::unrequested()
                    } else {
                        ChannelBinding::unsupported()
                    };
                (SCRAM_SHA_256, binding)
            }
            _ => {
                return Err(SourceError::UnsupportedAuthentication {
                    target: self.target.clone(),
                    method: format!("SASL ({})", mechanisms.join(", ")),
                })
            }
        };
        if info.channel_binding == ChannelBindingMode::Require && choice.0 != SCRAM_SHA_256_PLUS {
            return Err(refuse(
                "channel binding is required, but server did not offer an authentication method \
                 that supports channel binding",
            ));
        }
        Ok(choice)
    }

    /// The password: the conninfo's, else the passfile's, else [`SourceError::PasswordRequired`].
    fn password(&self, info: &ConnInfo, user: &str, dbname: &str) -> Result<String, SourceError> {
        if let Some(p) = &info.password {
            return Ok(p.clone());
        }
        if let Some(path) = &info.passfile {
            if let Some(p) = passfile::read_password(path, info, dbname, user)? {
                return Ok(p);
            }
        }
        Err(SourceError::PasswordRequired {
            target: self.target.clone(),
            user: user.to_owned(),
        })
    }

    /// Runs one statement with the simple query protocol and returns the rows of all its
    /// result sets. An `ErrorResponse` becomes [`SourceError::Server`] once the server is ready
    /// again, so the connection stays usable.
    pub fn simple_query(&mut self, sql: &str) -> Result<Vec<Row>, SourceError> {
        let budget = Budget::idle("query", self.io_timeout);
        self.run(sql, true, budget).map(|(rows, _)| rows)
    }

    /// Runs one statement and returns its command tag (`CREATE TABLE`, `INSERT 0 1`...),
    /// discarding any rows.
    pub fn execute(&mut self, sql: &str) -> Result<String, SourceError> {
        let budget = Budget::idle("query", self.io_timeout);
        self.run(sql, false, budget).map(|(_, tag)| tag)
    }

    /// Runs one statement within `budget`: rows (when `keep_rows`) and the last command tag.
    pub(super) fn run(
        &mut self,
        sql: &str,
        keep_rows: bool,
        budget: Budget,
    ) -> Result<(Vec<Row>, String), SourceError> {
        self.start_query(sql, budget)?;

        let mut rows = Vec::new();
        let mut result_bytes = 0usize;
        let mut columns: Option<Arc<[String]>> = None;
        let mut tag = String::new();
        let mut error: Option<ServerError> = None;
        let mut unsupported: Option<&'static str> = None;
        let mut in_copy_out = false;
        loop {
            match self.read_message(budget)? {
                BackendMessage::RowDescription { columns: c } => columns = Some(c.into()),
                BackendMessage::DataRow { values } => {
                    let cols = columns.as_ref().ok_or_else(|| {
                        SourceError::Protocol("data row without row description".into())
                    })?;
                    if values.len() != cols.len() {
                        return Err(SourceError::Protocol(format!(
                            "data row has {} values for {} columns",
                            values.len(),
                            cols.len()
                        )));
                    }
                    if keep_rows {
                        result_bytes = values.iter().fold(result_bytes, |acc, v| {
                            acc.saturating_add(v.as_ref().map_or(0, String::len) + 8)
                        });
                        if result_bytes > MAX_RESULT_BYTES {
                            return Err(SourceError::Protocol(format!(
                                "query result exceeds {MAX_RESULT_BYTES} bytes"
                            )));
                        }
                        rows.push(Row::new(cols.clone(), values));
                    }
                }
                BackendMessage::CommandComplete { tag: t } => {
                    tag = t;
                    columns = None;
                    in_copy_out = false;
                }
                BackendMessage::EmptyQueryResponse => tag.clear(),
                BackendMessage::ErrorResponse(e) => {
                    if e.severity == "FATAL" || e.severity == "PANIC" {
                        // The server closes the connection after this; report it, not the EOF.
                        return Err(SourceError::Server(Box::new(e)));
                    }
                    error.get_or_insert(e);
                }
                BackendMessage::NoticeResponse(n) => self.push_notice(n),
                BackendMessage::ParameterStatus { name, value } => self.set_parameter(name, value),
                BackendMessage::NotificationResponse => {}
                BackendMessage::CopyInResponse => self.fail_copy_in(budget)?,
                BackendMessage::CopyOutResponse => {
                    in_copy_out = true;
                    unsupported = Some("COPY TO STDOUT is not supported by simple_query");
                }
                BackendMessage::CopyData | BackendMessage::CopyDone if in_copy_out => {}
                BackendMessage::ReadyForQuery { status } => {
                    self.transaction_status = status;
                    self.ready = true;
                    break;
                }
                // CopyBothResponse (START_REPLICATION) cannot be drained: the stream never
                // ends on its own. Leave the connection unusable.
                other => {
                    return Err(SourceError::Protocol(format!(
                        "unexpected {} in reply to a simple query",
                        message_name(&other)
                    )))
                }
            }
        }
        if let Some(e) = error {
            return Err(SourceError::Server(Box::new(e)));
        }
        if let Some(msg) = unsupported {
            return Err(SourceError::Protocol(msg.to_owned()));
        }
        Ok((rows, tag))
    }

    /// Runs `IDENTIFY_SYSTEM`; needs a connection made with [`ConnectOptions::replication`].
    pub fn identify_system(&mut self) -> Result<SystemIdentity, SourceError> {
        if !self.replication {
            return Err(SourceError::Protocol(
                "IDENTIFY_SYSTEM needs a replication connection".into(),
            ));
        }
        let rows = self.simple_query("IDENTIFY_SYSTEM")?;
        let row = rows
            .first()
            .ok_or_else(|| SourceError::Protocol("IDENTIFY_SYSTEM returned no row".into()))?;
        let text = |column: &str| -> Result<String, SourceError> {
            row.try_get(column)?.map(str::to_owned).ok_or_else(|| {
                SourceError::Protocol(format!("IDENTIFY_SYSTEM returned a null {column}"))
            })
        };
        Ok(SystemIdentity {
            systemid: text("systemid")?,
            timeline: row.parse("timeline")?,
            xlogpos: text("xlogpos")?,
            dbname: row.get("dbname").map(str::to_owned),
        })
    }

    /// Whether a password was sent during authentication. Callers refuse non-superusers on
    /// connections that did not use one, as postgres_fdw does, so that a source trusting the
    /// destination's host cannot be reached with the server's own identity.
    pub fn used_password(&self) -> bool {
        self.used_password
    }

    /// Whether the connection is encrypted with TLS.
    pub fn tls_in_use(&self) -> bool {
        self.transport.tls().is_some()
    }

    /// Whether the server's TLS certificate chain was verified against trusted roots (with
    /// `sslmode=verify-full`, its name too).
    pub fn server_verified(&self) -> bool {
        self.transport.server_verified()
    }

    /// Whether SCRAM authentication was bound to the TLS channel (SCRAM-SHA-256-PLUS).
    pub fn channel_bound(&self) -> bool {
        self.channel_bound
    }

    /// A parameter the server reported (`server_version`, `server_encoding`, `TimeZone`...).
    pub fn parameter(&self, name: &str) -> Option<&str> {
        self.parameters
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// The server version as a number like `server_version_num` (150020 for 15.20).
    pub fn server_version_num(&self) -> Option<i32> {
        self.parameter("server_version")
            .and_then(parse_server_version)
    }

    /// The process id of the server backend serving this connection.
    pub fn backend_pid(&self) -> Option<i32> {
        self.backend_key.map(|(pid, _)| pid)
    }

    /// Where this connection goes, for messages (never a secret).
    pub fn target(&self) -> &str {
        &self.target
    }

    /// True when the last request completed and the connection can take another one.
    pub fn is_usable(&self) -> bool {
        self.ready
    }

    /// True inside a transaction block (including a failed one).
    pub fn in_transaction(&self) -> bool {
        matches!(self.transaction_status, b'T' | b'E')
    }

    /// Whether this is a replication connection.
    pub fn is_replication(&self) -> bool {
        self.replication
    }

    /// True once a logical replication stream on this connection has ended.
    pub(super) fn logical_stream_ended(&self) -> bool {
        self.logical_stream_ended
    }

    /// Records that a logical replication stream on this connection ended.
    pub(super) fn set_logical_stream_ended(&mut self) {
        self.logical_stream_ended = true;
    }

    /// The I/O timeout for later requests.
    pub fn io_timeout(&self) -> Duration {
        self.io_timeout
    }

    /// Changes the I/O timeout, e.g. around a command known to wait long on the server
    /// (`CREATE_REPLICATION_SLOT` waits for running transactions).
    pub fn set_io_timeout(&mut self, timeout: Duration) {
        self.io_timeout = timeout;
    }

    /// The last few notices and warnings the server sent, oldest first.
    pub fn notices(&self) -> impl Iterator<Item = &ServerError> {
        self.notices.iter()
    }

    /// Takes the kept notices, leaving none.
    pub fn take_notices(&mut self) -> Vec<ServerError> {
        self.notices.drain(..).collect()
    }

    /// Ends the session politely (`Terminate`) and closes the socket.
    pub fn close(self) {
        // Drop does the work, so that an unwinding caller gets the same cleanup.
        drop(self);
    }

    /// Sends a simple `Query`, first marking the connection busy: from here until the final
    /// `ReadyForQuery` any early exit leaves it [`SourceError::Broken`].
    pub(super) fn start_query(&mut self, sql: &str, budget: Budget) -> Result<(), SourceError> {
        self.ensure_ready()?;
        let mut buf = BytesMut::new();
        frontend::query(sql, &mut buf)
            .map_err(|_| SourceError::Protocol("query contains a null byte".into()))?;
        self.ready = false;
        self.send(&buf, budget)
    }

    /// Records the final `ReadyForQuery` of a request: the connection is in step again.
    pub(super) fn finish_request(&mut self, status: u8) {
        self.transaction_status = status;
        self.ready = true;
    }

    /// Keeps a message that may arrive at any time (notice, parameter change, notification)
    /// and returns `None`, or gives any other message back.
    pub(super) fn absorb_async(&mut self, msg: BackendMessage) -> Option<BackendMessage> {
        match msg {
            BackendMessage::NoticeResponse(n) => self.push_notice(n),
            BackendMessage::ParameterStatus { name, value } => self.set_parameter(name, value),
            BackendMessage::NotificationResponse => {}
            other => return Some(other),
        }
        None
    }

    /// Reads and discards the rest of a request's replies up to its `ReadyForQuery`, keeping
    /// notices, failing any `COPY FROM STDIN` on the way, and returning the first non-fatal
    /// `ErrorResponse` seen. Used to resynchronise after a reply we cannot use.
    pub(super) fn drain_to_ready(
        &mut self,
        budget: Budget,
    ) -> Result<Option<ServerError>, SourceError> {
        let mut error = None;
        loop {
            let msg = self.read_message(budget)?;
            match self.absorb_async(msg) {
                None => {}
                Some(BackendMessage::ReadyForQuery { status }) => {
                    self.finish_request(status);
                    return Ok(error);
                }
                Some(BackendMessage::ErrorResponse(e)) => {
                    if e.severity == "FATAL" || e.severity == "PANIC" {
                        return Err(SourceError::Server(Box::new(e)));
                    }
                    error.get_or_insert(e);
                }
                Some(BackendMessage::CopyInResponse) => self.fail_copy_in(budget)?,
                // Cannot be drained: the stream never ends on its own.
                Some(BackendMessage::CopyBothResponse) => {
                    return Err(SourceError::Protocol(
                        "unexpected CopyBothResponse while discarding a reply".into(),
                    ))
                }
                Some(_) => {}
            }
        }
    }

    /// Answers a `CopyInResponse` with `CopyFail`: we have no data to send, and failing the
    /// COPY makes the server answer with an error and `ReadyForQuery`, keeping us in step.
    pub(super) fn fail_copy_in(&mut self, budget: Budget) -> Result<(), SourceError> {
        let mut fail = BytesMut::new();
        frontend::copy_fail("COPY FROM STDIN is not supported here", &mut fail)
            .map_err(|e| SourceError::Protocol(e.to_string()))?;
        self.send(&fail, budget)
    }

    /// The next whole message as its tag and body, unparsed, reading with at least `room`
    /// bytes of free buffer space (more for a message known to be larger).
    pub(super) fn next_frame(
        &mut self,
        budget: Budget,
        room: usize,
    ) -> Result<(u8, Bytes), SourceError> {
        loop {
            if let Some(frame) = protocol::split_frame(&mut self.rbuf)? {
                return Ok(frame);
            }
            self.fill(budget, room)?;
        }
    }

    fn ensure_ready(&self) -> Result<(), SourceError> {
        if self.ready {
            Ok(())
        } else {
            Err(SourceError::Broken {
                target: self.target.clone(),
            })
        }
    }

    fn set_parameter(&mut self, name: String, value: String) {
        match self.parameters.iter_mut().find(|(n, _)| *n == name) {
            Some(entry) => entry.1 = value,
            None => self.parameters.push((name, value)),
        }
    }

    fn push_notice(&mut self, notice: ServerError) {
        if self.notices.len() >= MAX_NOTICES {
            self.notices.pop_front();
        }
        self.notices.push_back(notice);
    }

    fn check_interrupts(&mut self) {
        run_check(&mut self.interrupt_check);
        self.last_check = Instant::now();
    }

    /// Reads until one whole message is buffered, then parses it.
    pub(super) fn read_message(&mut self, budget: Budget) -> Result<BackendMessage, SourceError> {
        let (tag, body) = self.next_frame(budget, READ_CHUNK)?;
        protocol::parse_message(tag, body)
    }

    /// Reads at least one byte into the buffer, first making room for `room` bytes (or for
    /// the rest of a partly buffered message, if larger).
    ///
    /// The interrupt check runs whenever [`POLL_INTERVAL`] has passed since it last ran (and
    /// at once after a signal), and a read never blocks past the moment the next check is
    /// due: so it runs at least every 100 ms while we wait, but a stream that keeps bytes
    /// coming pays for one check per 100 ms, not one per read.
    fn fill(&mut self, budget: Budget, room: usize) -> Result<(), SourceError> {
        // Capped, so that five bytes announcing a huge message cannot make us allocate it.
        let missing = protocol::frame_len(&self.rbuf)
            .map_or(0, |len| len.saturating_sub(self.rbuf.len()))
            .min(MAX_UPFRONT_ROOM);
        // At least one byte of room: a zero-length read would look like end of file.
        self.rbuf.reserve(room.max(missing).max(1));
        let n = self.wait_io(budget, budget.deadline(), Transport::recv_into)?;
        self.received(n)
    }

    /// Runs `op` (one socket read or write, bounded by the socket timeouts) until it succeeds,
    /// waiting in slices: the interrupt check runs whenever [`POLL_INTERVAL`] has passed since
    /// it last ran (and at once after a signal), and a slice never lasts past the moment the
    /// next check is due, nor past `deadline`.
    fn wait_io<T>(
        &mut self,
        budget: Budget,
        deadline: Instant,
        mut op: impl FnMut(&mut Transport, &mut BytesMut) -> io::Result<T>,
    ) -> Result<T, SourceError> {
        let mut signalled = false;
        loop {
            let mut now = Instant::now();
            if signalled || now.saturating_duration_since(self.last_check) >= POLL_INTERVAL {
                self.check_interrupts();
                now = self.last_check;
                signalled = false;
            }
            if now >= deadline {
                return Err(self.timeout(budget));
            }
            let until_check =
                POLL_INTERVAL.saturating_sub(now.saturating_duration_since(self.last_check));
            let slice = read_slice(until_check.min(deadline.saturating_duration_since(now)));
            self.set_timeouts(slice)?;
            match op(&mut self.transport, &mut self.rbuf) {
                Ok(v) => return Ok(v),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => signalled = true,
                Err(e) if is_retry(&e) => {}
                Err(e) => return Err(self.io_error(e)),
            }
        }
    }

    /// Sets both socket timeouts to `slice`, skipping the system calls when unchanged.
    fn set_timeouts(&mut self, slice: Duration) -> Result<(), SourceError> {
        if self.read_timeout != Some(slice) {
            self.transport
                .socket()
                .set_read_timeout(Some(slice))
                .map_err(|e| self.io_error(e))?;
            self.read_timeout = Some(slice);
        }
        if self.write_timeout != Some(slice) {
            self.transport
                .socket()
                .set_write_timeout(Some(slice))
                .map_err(|e| self.io_error(e))?;
            self.write_timeout = Some(slice);
        }
        Ok(())
    }

    fn received(&self, n: usize) -> Result<(), SourceError> {
        if n == 0 {
            Err(SourceError::Closed {
                target: self.target.clone(),
            })
        } else {
            Ok(())
        }
    }

    /// Writes all of `bytes` (over TLS: until every encrypted byte is on the wire), in slices
    /// of at most [`POLL_INTERVAL`] with the interrupt check before each; the deadline moves
    /// with every progress.
    pub(super) fn send(&mut self, bytes: &[u8], budget: Budget) -> Result<(), SourceError> {
        let mut rest = bytes;
        let mut deadline = budget.deadline();
        while !rest.is_empty() || self.transport.has_pending_writes() {
            self.check_interrupts();
            let now = Instant::now();
            if now >= deadline {
                return Err(self.timeout(budget));
            }
            let slice = Some(slice_until(deadline, now));
            if self.write_timeout != slice {
                self.transport
                    .socket()
                    .set_write_timeout(slice)
                    .map_err(|e| self.io_error(e))?;
                self.write_timeout = slice;
            }
            let result = if rest.is_empty() {
                self.transport.flush_step()
            } else {
                self.transport.write(rest).map(|n| {
                    rest = rest.get(n..).unwrap_or(&[]);
                })
            };
            match result {
                Ok(()) => deadline = budget.deadline(),
                Err(e) if is_retry(&e) => continue,
                Err(e) => return Err(self.io_error(e)),
            }
        }
        Ok(())
    }

    fn timeout(&self, budget: Budget) -> SourceError {
        SourceError::Timeout {
            target: self.target.clone(),
            phase: budget.phase,
            after: budget.limit,
        }
    }

    fn io_error(&self, e: io::Error) -> SourceError {
        if let Some(tls_error) = e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
            return SourceError::Tls {
                target: self.target.clone(),
                reason: tls::describe(tls_error),
            };
        }
        match e.kind() {
            io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::BrokenPipe
            | io::ErrorKind::WriteZero
            | io::ErrorKind::UnexpectedEof => SourceError::Closed {
                target: self.target.clone(),
            },
            _ => SourceError::Io {
                target: self.target.clone(),
                source: e,
            },
        }
    }
}

/// One way of connecting that [`Connection::connect`] tries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Attempt {
    Plain,
    Tls,
}

/// Where a SCRAM exchange stands.
struct Scram {
    client: ScramSha256,
    /// SCRAM-SHA-256-PLUS: bound to the TLS channel.
    bound: bool,
}

/// Whether the server turned the connection down during startup (an `ErrorResponse`), which
/// libpq answers with a retry in the other TLS mode for `allow` and `prefer`.
fn is_server_rejection(e: &SourceError) -> bool {
    matches!(
        e,
        SourceError::Server(_) | SourceError::AuthenticationFailed { .. }
    )
}

impl Drop for Connection {
    fn drop(&mut self) {
        // Best effort and bounded: this may run while unwinding from the interrupt check, so
        // it must neither wait long nor panic.
        let mut buf = BytesMut::new();
        if self.established {
            frontend::terminate(&mut buf);
        }
        let _ = self
            .transport
            .socket()
            .set_write_timeout(Some(POLL_INTERVAL));
        self.transport.close(&buf);
    }
}

pub(super) fn message_name(msg: &BackendMessage) -> &'static str {
    match msg {
        BackendMessage::Authentication(_) => "authentication request",
        BackendMessage::BackendKeyData { .. } => "BackendKeyData",
        BackendMessage::ParameterStatus { .. } => "ParameterStatus",
        BackendMessage::ReadyForQuery { .. } => "ReadyForQuery",
        BackendMessage::RowDescription { .. } => "RowDescription",
        BackendMessage::DataRow { .. } => "DataRow",
        BackendMessage::CommandComplete { .. } => "CommandComplete",
        BackendMessage::EmptyQueryResponse => "EmptyQueryResponse",
        BackendMessage::ErrorResponse(_) => "ErrorResponse",
        BackendMessage::NoticeResponse(_) => "NoticeResponse",
        BackendMessage::NotificationResponse => "NotificationResponse",
        BackendMessage::CopyInResponse => "CopyInResponse",
        BackendMessage::CopyOutResponse => "CopyOutResponse",
        BackendMessage::CopyBothResponse => "CopyBothResponse",
        BackendMessage::CopyData => "CopyData",
        BackendMessage::CopyDone => "CopyDone",
        BackendMessage::NegotiateProtocolVersion => "NegotiateProtocolVersion",
    }
}

/// `server_version` to `server_version_num`: `15.20 (Debian...)` is 150020, `9.6.24` is 90624,
/// `17devel` and `16beta1` are 170000 and 160000.
fn parse_server_version(v: &str) -> Option<i32> {
    fn leading_number(s: &str) -> Option<i32> {
        let end = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
        s.get(..end).and_then(|d| d.parse().ok())
    }
    let token = v.split_whitespace().next()?;
    let mut parts = token.split('.');
    let major = leading_number(parts.next()?)?;
    let mut next = || parts.next().and_then(leading_number).unwrap_or(0);
    if major >= 10 {
        major.checked_mul(10000)?.checked_add(next())
    } else {
        let minor = next();
        let patch = next();
        Some(major * 10000 + minor * 100 + patch)
    }
}

/// Opens the socket: Unix socket file, or DNS then TCP to each address in turn. Returns the
/// stream and the target to name in later errors (with the IP address when a name resolved).
fn open_stream(
    info: &ConnInfo,
    target: &str,
    check: &mut Option<InterruptCheck>,
) -> Result<(Socket, String), SourceError> {
    if let Some(path) = info.socket_path() {
        run_check(check);
        return connect_unix(&path, target).map(|s| (Socket::Unix(s), target.to_owned()));
    }
    let timeout = info.connect_timeout;
    // hostaddr, when given, is where to connect; host then only names the server.
    let (name, numeric) = match (&info.hostaddr, &info.host) {
        (Some(addr), _) => (addr.as_str(), true),
        (None, Some(host)) => (host.as_str(), host.parse::<IpAddr>().is_ok()),
        (None, None) => {
            return Err(SourceError::Protocol("no host to connect to".into()));
        }
    };
    let addrs = resolve(name, info.port, timeout, target, check)?;
    let mut last_error = None;
    for addr in addrs {
        let addr_target = if numeric {
            target.to_owned()
        } else {
            format!("{target} ({})", addr.ip())
        };
        match connect_tcp(addr, timeout, &addr_target, check) {
            Ok(stream) => return Ok((Socket::Tcp(stream), addr_target)),
            // Like libpq, try the next address; report the last failure.
            Err(e) => last_error = Some(e),
        }
    }
    Err(last_error.unwrap_or_else(|| SourceError::HostNotFound {
        host: name.to_owned(),
        reason: "no addresses found".into(),
    }))
}

fn connect_unix(path: &Path, target: &str) -> Result<UnixStream, SourceError> {
    UnixStream::connect(path).map_err(|e| match e.kind() {
        io::ErrorKind::NotFound => SourceError::Unreachable {
            target: target.to_owned(),
            reason: format!("socket file \"{}\" does not exist", path.display()),
        },
        // A socket file left behind by a server that is no longer running.
        io::ErrorKind::ConnectionRefused => SourceError::ConnectionRefused {
            target: target.to_owned(),
        },
        io::ErrorKind::PermissionDenied => SourceError::Unreachable {
            target: target.to_owned(),
            reason: format!("permission denied on socket file \"{}\"", path.display()),
        },
        _ => connect_error(e, target, Duration::ZERO),
    })
}

/// Maps a failed connect to the distinct errors the assessment reports.
fn connect_error(e: io::Error, target: &str, timeout: Duration) -> SourceError {
    let target = target.to_owned();
    match e.raw_os_error() {
        Some(libc::ECONNREFUSED) => SourceError::ConnectionRefused { target },
        Some(libc::ETIMEDOUT) => SourceError::Timeout {
            target,
            phase: "connect",
            after: timeout,
        },
        Some(
            libc::EHOSTUNREACH
            | libc::ENETUNREACH
            | libc::EHOSTDOWN
            | libc::ENETDOWN
            | libc::EADDRNOTAVAIL
            | libc::EAFNOSUPPORT
            | libc::ENAMETOOLONG,
        ) => SourceError::Unreachable {
            target,
            reason: os_reason(&e),
        },
        _ if e.kind() == io::ErrorKind::InvalidInput => SourceError::Unreachable {
            target,
            reason: os_reason(&e),
        },
        _ => SourceError::Io { target, source: e },
    }
}

/// The OS's text for an error without std's " (os error N)" suffix.
fn os_reason(e: &io::Error) -> String {
    let text = e.to_string();
    match text.rfind(" (os error ") {
        Some(i) => text.get(..i).unwrap_or(&text).to_owned(),
        None => text,
    }
}

/// Resolves a host name, waiting with interrupt checks. `getaddrinfo` cannot be interrupted
/// or bounded, so a name (never a numeric address) is looked up on a short-lived helper
/// thread with all signals blocked, leaving PostgreSQL's signal handlers to the main thread.
/// If we stop waiting, the thread finishes on its own and its answer is dropped.
fn resolve(
    host: &str,
    port: u16,
    timeout: Duration,
    target: &str,
    check: &mut Option<InterruptCheck>,
) -> Result<Vec<SocketAddr>, SourceError> {
    if let Ok(ip) = host.parse::<IpAddr>() {
        return Ok(vec![SocketAddr::new(ip, port)]);
    }
    let not_found = |reason: String| SourceError::HostNotFound {
        host: host.to_owned(),
        reason,
    };
    let lookup = |name: &str| -> io::Result<Vec<SocketAddr>> {
        (name, port).to_socket_addrs().map(|addrs| addrs.collect())
    };
    let (tx, rx) = mpsc::channel();
    let name = host.to_owned();
    let spawned = spawn_with_signals_blocked(move || {
        // The receiver may be gone if the caller gave up; nothing to do then.
        let _ = tx.send(
            (name.as_str(), port)
                .to_socket_addrs()
                .map(|a| a.collect::<Vec<_>>()),
        );
    });
    let result = match spawned {
        Ok(()) => {
            let deadline = deadline_after(timeout);
            loop {
                run_check(check);
                let now = Instant::now();
                if now >= deadline {
                    return Err(SourceError::Timeout {
                        target: target.to_owned(),
                        phase: "connect",
                        after: timeout,
                    });
                }
                match rx.recv_timeout(slice_until(deadline, now)) {
                    Ok(result) => break result,
                    Err(mpsc::RecvTimeoutError::Timeout) => continue,
                    Err(mpsc::RecvTimeoutError::Disconnected) => {
                        return Err(not_found("the lookup thread failed".into()))
                    }
                }
            }
        }
        // No thread available: look up inline, uninterruptibly, rather than fail.
        Err(_) => lookup(host),
    };
    match result {
        Ok(addrs) if addrs.is_empty() => Err(not_found("no addresses found".into())),
        Ok(addrs) => Ok(addrs),
        Err(e) => Err(not_found(os_reason(&e))),
    }
}

/// Spawns a detached thread that starts with every signal blocked, restoring the caller's
/// signal mask before returning.
fn spawn_with_signals_blocked(f: impl FnOnce() + Send + 'static) -> io::Result<()> {
    // SAFETY: sigset_t is plain data for which all-zero bytes are a valid (empty) value, and
    // sigfillset/pthread_sigmask only write into the sets we pass. The new thread inherits the
    // blocked mask; nothing between the two pthread_sigmask calls can panic except the spawn,
    // which reports failure as an error instead.
    unsafe {
        let mut all: libc::sigset_t = std::mem::zeroed();
        let mut old: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut all);
        if libc::pthread_sigmask(libc::SIG_SETMASK, &all, &mut old) != 0 {
            return Err(io::Error::other("pthread_sigmask failed"));
        }
        let spawned = std::thread::Builder::new()
            .name("cloudmig-dns".into())
            .spawn(f);
        libc::pthread_sigmask(libc::SIG_SETMASK, &old, std::ptr::null_mut());
        spawned.map(|_| ())
    }
}

/// Connects a TCP socket without blocking, polling every [`POLL_INTERVAL`] so the interrupt
/// check runs, then returns it in blocking mode with TCP_NODELAY and keepalives on.
fn connect_tcp(
    addr: SocketAddr,
    timeout: Duration,
    target: &str,
    check: &mut Option<InterruptCheck>,
) -> Result<TcpStream, SourceError> {
    let started = Instant::now();
    let deadline = deadline_after(timeout);
    let fail = |e: io::Error| connect_error(e, target, started.elapsed());
    let domain = if addr.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    };
    // SAFETY: socket(2) with constant arguments; the result is checked before use.
    let raw = unsafe {
        libc::socket(
            domain,
            libc::SOCK_STREAM | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
            0,
        )
    };
    if raw < 0 {
        return Err(fail(io::Error::last_os_error()));
    }
    // SAFETY: `raw` is a valid descriptor that nothing else owns; OwnedFd closes it on every
    // path out of this function, unwinding included.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    let (storage, len) = sockaddr_of(&addr);
    // SAFETY: `storage` holds a sockaddr of the family of `fd`, valid for `len` bytes.
    let rc = unsafe {
        libc::connect(
            fd.as_raw_fd(),
            std::ptr::addr_of!(storage).cast::<libc::sockaddr>(),
            len,
        )
    };
    if rc != 0 {
        let err = io::Error::last_os_error();
        if err.raw_os_error() != Some(libc::EINPROGRESS) {
            return Err(fail(err));
        }
        loop {
            run_check(check);
            let now = Instant::now();
            if now >= deadline {
                return Err(SourceError::Timeout {
                    target: target.to_owned(),
                    phase: "connect",
                    after: timeout,
                });
            }
            let wait_ms = i32::try_from(slice_until(deadline, now).as_millis()).unwrap_or(100);
            let mut pfd = libc::pollfd {
                fd: fd.as_raw_fd(),
                events: libc::POLLOUT,
                revents: 0,
            };
            // SAFETY: one valid pollfd, count 1.
            let n = unsafe { libc::poll(&mut pfd, 1, wait_ms) };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(fail(e));
            }
            if n > 0 {
                break;
            }
        }
        let mut so_error: libc::c_int = 0;
        let mut so_len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: SO_ERROR writes one c_int into `so_error`, whose size we pass.
        let rc = unsafe {
            libc::getsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_ERROR,
                std::ptr::addr_of_mut!(so_error).cast(),
                &mut so_len,
            )
        };
        if rc != 0 {
            return Err(fail(io::Error::last_os_error()));
        }
        if so_error != 0 {
            return Err(fail(io::Error::from_raw_os_error(so_error)));
        }
    }
    let stream = TcpStream::from(fd);
    let setup = |s: &TcpStream| -> io::Result<()> {
        s.set_nonblocking(false)?;
        s.set_nodelay(true)?;
        // libpq turns keepalives on by default; a replication connection may sit idle long.
        let on: libc::c_int = 1;
        // SAFETY: SO_KEEPALIVE reads one c_int from `on`, whose size we pass.
        let rc = unsafe {
            libc::setsockopt(
                s.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_KEEPALIVE,
                std::ptr::addr_of!(on).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    };
    setup(&stream).map_err(|e| SourceError::Io {
        target: target.to_owned(),
        source: e,
    })?;
    Ok(stream)
}

/// The C socket address for `addr`.
fn sockaddr_of(addr: &SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: sockaddr_storage is plain data for which all-zero bytes are valid.
    let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let len = match addr {
        SocketAddr::V4(a) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: a.port().to_be(),
                sin_addr: libc::in_addr {
                    // octets() is already in network order; keep the bytes as they are.
                    s_addr: u32::from_ne_bytes(a.ip().octets()),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_storage is large enough and aligned for any socket address.
            unsafe { std::ptr::write(std::ptr::addr_of_mut!(storage).cast(), sin) };
            std::mem::size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(a) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: a.port().to_be(),
                sin6_flowinfo: a.flowinfo(),
                sin6_addr: libc::in6_addr {
                    s6_addr: a.ip().octets(),
                },
                sin6_scope_id: a.scope_id(),
            };
            // SAFETY: as above.
            unsafe { std::ptr::write(std::ptr::addr_of_mut!(storage).cast(), sin6) };
            std::mem::size_of::<libc::sockaddr_in6>()
        }
    };
    (storage, len as libc::socklen_t)
}

/// The effective OS user's name, libpq's default user name.
pub(crate) fn os_user_name() -> Option<String> {
    // SAFETY: geteuid cannot fail.
    let uid = unsafe { libc::geteuid() };
    let mut size = 1024usize;
    while size <= 1 << 20 {
        let mut buf = vec![0u8; size];
        // SAFETY: passwd is plain data; all-zero is a valid value to be overwritten.
        let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
        let mut result: *mut libc::passwd = std::ptr::null_mut();
        // SAFETY: every pointer is valid for the sizes passed; the strings in `pwd` point into
        // `buf`, which outlives their use below.
        let rc = unsafe {
            libc::getpwuid_r(
                uid,
                &mut pwd,
                buf.as_mut_ptr().cast(),
                buf.len(),
                &mut result,
            )
        };
        if rc == libc::ERANGE {
            size *= 4;
            continue;
        }
        if rc != 0 || result.is_null() || pwd.pw_name.is_null() {
            return None;
        }
        // SAFETY: pw_name is a NUL-terminated string inside `buf`.
        let name = unsafe { std::ffi::CStr::from_ptr(pwd.pw_name) };
        return Some(name.to_string_lossy().into_owned());
    }
    None
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::source::conninfo::RequireAuth;
    use crate::source::protocol::tests::{error_body, frame};
    use std::io::{Read, Write};
    use std::net::TcpListener;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::thread::JoinHandle;

    // ---- a tiny fake server ----

    pub(crate) fn read_exact<S: Read>(s: &mut S, n: usize) -> Vec<u8> {
        let mut buf = vec![0; n];
        s.read_exact(&mut buf).expect("read from client");
        buf
    }

    /// Reads an `SSLRequest` if one comes (true) or the startup packet's length (false).
    pub(crate) fn read_ssl_request<S: Read>(s: &mut S) -> Result<(), usize> {
        let len = u32::from_be_bytes(read_exact(s, 4).try_into().expect("4 bytes")) as usize;
        if len == 8 {
            let code = read_exact(s, 4);
            assert_eq!(code, SSL_REQUEST_CODE.to_be_bytes(), "SSLRequest");
            return Ok(());
        }
        Err(len)
    }

    /// Reads the startup packet, first answering `N` to an `SSLRequest` (sslmode=prefer, the
    /// default, then goes on in plaintext on the same socket).
    pub(crate) fn read_startup<S: Read + Write>(s: &mut S) -> Vec<(String, String)> {
        let len = match read_ssl_request(s) {
            Ok(()) => {
                s.write_all(b"N").expect("answer SSLRequest");
                u32::from_be_bytes(read_exact(s, 4).try_into().expect("4 bytes")) as usize
            }
            Err(len) => len,
        };
        read_startup_body(s, len)
    }

    /// The rest of a startup packet of `len` bytes.
    pub(crate) fn read_startup_body<S: Read>(s: &mut S, len: usize) -> Vec<(String, String)> {
        let body = read_exact(s, len - 4);
        assert_eq!(&body[..4], &[0, 3, 0, 0], "protocol 3.0");
        let strings: Vec<String> = body[4..]
            .split(|&b| b == 0)
            .map(|s| String::from_utf8(s.to_vec()).expect("utf8"))
            .collect();
        strings
            .chunks(2)
            .filter(|c| c.len() == 2 && !c[0].is_empty())
            .map(|c| (c[0].clone(), c[1].clone()))
            .collect()
    }

    pub(crate) fn read_msg<S: Read>(s: &mut S) -> (u8, Vec<u8>) {
        let head = read_exact(s, 5);
        let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
        (head[0], read_exact(s, len - 4))
    }

    pub(crate) fn auth(code: u32, extra: &[u8]) -> Vec<u8> {
        let mut body = code.to_be_bytes().to_vec();
        body.extend_from_slice(extra);
        frame(b'R', &body)
    }

    pub(crate) fn ready_sequence() -> Vec<u8> {
        let mut out = auth(0, &[]);
        out.extend(frame(b'S', b"server_version\x0015.20 (Debian 15.20-1)\0"));
        out.extend(frame(b'K', &[0, 0, 0x30, 0x39, 0, 0, 0, 7]));
        out.extend(frame(b'Z', b"I"));
        out
    }

    pub(crate) fn row_description(names: &[&str]) -> Vec<u8> {
        let mut body = (names.len() as u16).to_be_bytes().to_vec();
        for n in names {
            body.extend_from_slice(n.as_bytes());
            body.push(0);
            body.extend_from_slice(&[0; 18]);
        }
        frame(b'T', &body)
    }

    pub(crate) fn data_row(values: &[Option<&str>]) -> Vec<u8> {
        let mut body = (values.len() as u16).to_be_bytes().to_vec();
        for v in values {
            match v {
                Some(v) => {
                    body.extend_from_slice(&(v.len() as u32).to_be_bytes());
                    body.extend_from_slice(v.as_bytes());
                }
                None => body.extend_from_slice(&[0xff; 4]),
            }
        }
        frame(b'D', &body)
    }

    pub(crate) fn fake_server(
        script: impl FnOnce(TcpStream) + Send + 'static,
    ) -> (ConnInfo, JoinHandle<()>) {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let handle = std::thread::spawn(move || {
            let (stream, _) = listener.accept().expect("accept");
            script(stream);
        });
        let info = ConnInfo {
            host: Some("127.0.0.1".into()),
            port,
            user: Some("alice".into()),
            dbname: Some("app".into()),
            connect_timeout: Duration::from_secs(5),
            ..ConnInfo::default()
        };
        (info, handle)
    }

    pub(crate) fn counting_options(counter: &Arc<AtomicUsize>) -> ConnectOptions {
        let counter = Arc::clone(counter);
        ConnectOptions {
            interrupt_check: Some(Box::new(move || {
                counter.fetch_add(1, Ordering::Relaxed);
            })),
            ..ConnectOptions::new()
        }
    }

    #[test]
    fn cleartext_password_and_queries() {
        let secret = "s3cret-Pw";
        let (mut info, server) = fake_server(move |mut s| {
            let params = read_startup(&mut s);
            let get = |k: &str| params.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
            assert_eq!(get("user").as_deref(), Some("alice"));
            assert_eq!(get("database").as_deref(), Some("app"));
            assert_eq!(get("application_name").as_deref(), Some("cloudmig"));
            assert_eq!(get("client_encoding").as_deref(), Some("UTF8"));
            assert_eq!(get("DateStyle").as_deref(), Some("ISO"));
            assert_eq!(get("IntervalStyle").as_deref(), Some("postgres"));
            assert_eq!(get("extra_float_digits").as_deref(), Some("3"));
            assert_eq!(get("replication"), None);
            s.write_all(&auth(3, &[])).unwrap();
            let (tag, body) = read_msg(&mut s);
            assert_eq!(tag, b'p');
            assert_eq!(body, b"s3cret-Pw\0");
            s.write_all(&ready_sequence()).unwrap();

            // Query 1: two rows.
            let (tag, body) = read_msg(&mut s);
            assert_eq!((tag, body.as_slice()), (b'Q', &b"SELECT a, b FROM t\0"[..]));
            let mut out = row_description(&["a", "b"]);
            out.extend(data_row(&[Some("1"), Some("t")]));
            out.extend(frame(
                b'N',
                &error_body(&[(b'V', "NOTICE"), (b'C', "00000"), (b'M', "hello")]),
            ));
            out.extend(data_row(&[None, Some("f")]));
            out.extend(frame(b'C', b"SELECT 2\0"));
            out.extend(frame(b'Z', b"I"));
            s.write_all(&out).unwrap();

            // Query 2: an error, then ReadyForQuery.
            let (tag, _) = read_msg(&mut s);
            assert_eq!(tag, b'Q');
            let mut out = frame(
                b'E',
                &error_body(&[
                    (b'V', "ERROR"),
                    (b'C', "42P01"),
                    (b'M', "relation \"x\" does not exist"),
                ]),
            );
            out.extend(frame(b'Z', b"I"));
            s.write_all(&out).unwrap();

            // Query 3: execute, command tag.
            let (tag, _) = read_msg(&mut s);
            assert_eq!(tag, b'Q');
            let mut out = frame(b'C', b"CREATE TABLE\0");
            out.extend(frame(b'Z', b"T"));
            s.write_all(&out).unwrap();

            let (tag, _) = read_msg(&mut s);
            assert_eq!(tag, b'X', "terminate on drop");
        });
        info.password = Some(secret.into());
        // Cleartext over plaintext TCP needs the explicit opt-in (see auth.rs).
        info.require_auth = RequireAuth::parse("password").ok();
        let counter = Arc::new(AtomicUsize::new(0));
        let mut conn = Connection::connect(&info, counting_options(&counter)).expect("connect");
        assert!(conn.used_password());
        assert_eq!(conn.server_version_num(), Some(150020));
        assert_eq!(conn.backend_pid(), Some(12345));
        assert_eq!(
            conn.parameter("server_version"),
            Some("15.20 (Debian 15.20-1)")
        );
        assert!(!format!("{conn:?}").contains(secret));

        let rows = conn.simple_query("SELECT a, b FROM t").expect("query");
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0].columns(), ["a", "b"]);
        assert_eq!(rows[0].parse::<i32>("a").ok(), Some(1));
        assert_eq!(rows[0].get_bool("b").ok(), Some(true));
        assert_eq!(rows[1].get("a"), None);
        assert!(
            matches!(rows[1].parse::<i32>("a"), Err(SourceError::Protocol(m)) if m.contains("\"a\""))
        );
        assert_eq!(rows[1].parse_opt::<i32>("a").ok(), Some(None));
        assert!(rows[1].try_get("zzz").is_err());
        assert_eq!(rows[1].get_bool("b").ok(), Some(false));
        assert_eq!(
            conn.notices()
                .map(|n| n.message.as_str())
                .collect::<Vec<_>>(),
            ["hello"]
        );

        let err = conn
            .simple_query("SELECT * FROM x")
            .expect_err("server error");
        assert_eq!(err.sqlstate(), "42P01");
        assert!(conn.is_usable(), "usable after an ERROR");
        assert_eq!(
            conn.execute("CREATE TABLE y()").expect("execute"),
            "CREATE TABLE"
        );
        assert!(conn.in_transaction());
        assert!(counter.load(Ordering::Relaxed) > 0, "interrupt check ran");
        conn.close();
        server.join().expect("server thread");
    }

    #[test]
    fn md5_without_password_is_password_required() {
        let (mut info, server) = fake_server(|mut s| {
            read_startup(&mut s);
            s.write_all(&auth(5, &[1, 2, 3, 4])).unwrap();
            let mut rest = Vec::new();
            let _ = s.read_to_end(&mut rest);
        });
        info.require_auth = RequireAuth::parse("md5").ok();
        let err = Connection::connect(&info, ConnectOptions::new()).expect_err("no password");
        assert!(
            matches!(&err, SourceError::PasswordRequired { user, .. } if user == "alice"),
            "{err:?}"
        );
        assert_eq!(err.sqlstate(), "2F003");
        server.join().expect("server thread");
    }

    #[test]
    fn md5_hash_is_sent() {
        let (mut info, server) = fake_server(|mut s| {
            read_startup(&mut s);
            s.write_all(&auth(5, &[1, 2, 3, 4])).unwrap();
            let (tag, body) = read_msg(&mut s);
            assert_eq!(tag, b'p');
            let expected = md5_hash(b"alice", b"pw", [1, 2, 3, 4]);
            assert_eq!(&body[..body.len() - 1], expected.as_bytes());
            let mut out = frame(
                b'E',
                &error_body(&[
                    (b'V', "FATAL"),
                    (b'C', "28P01"),
                    (b'M', "password authentication failed for user \"alice\""),
                ]),
            );
            out.extend(frame(b'Z', b"I"));
            s.write_all(&out).unwrap();
        });
        info.password = Some("pw".into());
        info.require_auth = RequireAuth::parse("md5").ok();
        let err = Connection::connect(&info, ConnectOptions::new()).expect_err("auth fails");
        assert!(
            matches!(err, SourceError::AuthenticationFailed { .. }),
            "{err:?}"
        );
        assert_eq!(err.sqlstate(), "28P01");
        assert!(!err.to_string().contains("pw\""), "{err}");
        server.join().expect("server thread");
    }

    #[test]
    fn unsupported_authentication() {
        for (code, extra) in [(7u32, &b""[..]), (10, &b"SCRAM-SHA-256-PLUS\0\0"[..])] {
            let (mut info, server) = fake_server(move |mut s| {
                read_startup(&mut s);
                s.write_all(&auth(code, extra)).unwrap();
                let mut rest = Vec::new();
                let _ = s.read_to_end(&mut rest);
            });
            info.password = Some("pw".into());
            let err = Connection::connect(&info, ConnectOptions::new()).expect_err("unsupported");
            if code == 7 {
                assert!(
                    matches!(err, SourceError::UnsupportedAuthentication { .. }),
                    "{err:?}"
                );
            } else {
                // SCRAM-SHA-256-PLUS without TLS: TLS was stripped on the way.
                assert!(
                    matches!(&err, SourceError::AuthenticationRefused { reason, .. } if reason.contains("non-SSL")),
                    "{err:?}"
                );
            }
            server.join().expect("server thread");
        }
    }

    #[test]
    fn silent_server_times_out_quickly_with_interrupt_checks() {
        let (mut info, server) = fake_server(|mut s| {
            read_startup(&mut s);
            // Never answer; wait for the client to give up.
            let mut rest = Vec::new();
            let _ = s.read_to_end(&mut rest);
        });
        info.connect_timeout = Duration::from_millis(400);
        let counter = Arc::new(AtomicUsize::new(0));
        let started = Instant::now();
        let err = Connection::connect(&info, counting_options(&counter)).expect_err("timeout");
        let elapsed = started.elapsed();
        assert!(
            matches!(
                err,
                SourceError::Timeout {
                    phase: "authentication",
                    ..
                }
            ),
            "{err:?}"
        );
        assert!(elapsed < Duration::from_secs(2), "{elapsed:?}");
        assert!(counter.load(Ordering::Relaxed) >= 3, "checked every 100 ms");
        server.join().expect("server thread");
    }

    #[test]
    fn tcp_connect_timeout_with_interrupt_checks() {
        // A listener whose accept queue is full drops further SYNs, so connect hangs.
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        // SAFETY: listen(2) on a socket we own; it only changes the backlog.
        assert_eq!(unsafe { libc::listen(listener.as_raw_fd(), 0) }, 0);
        let addr = listener.local_addr().expect("addr");
        let fillers: Vec<_> = (0..4)
            .filter_map(|_| TcpStream::connect_timeout(&addr, Duration::from_millis(200)).ok())
            .collect();
        let info = ConnInfo {
            host: Some("127.0.0.1".into()),
            port: addr.port(),
            user: Some("u".into()),
            connect_timeout: Duration::from_millis(500),
            ..ConnInfo::default()
        };
        let counter = Arc::new(AtomicUsize::new(0));
        let started = Instant::now();
        let err = Connection::connect(&info, counting_options(&counter)).expect_err("timeout");
        assert!(
            matches!(
                err,
                SourceError::Timeout {
                    phase: "connect",
                    ..
                }
            ),
            "{err:?}"
        );
        assert!(started.elapsed() < Duration::from_secs(2));
        assert!(counter.load(Ordering::Relaxed) >= 4, "checked every 100 ms");
        drop(fillers);
    }

    #[test]
    fn query_timeout_leaves_connection_broken() {
        let (info, server) = fake_server(|mut s| {
            read_startup(&mut s);
            s.write_all(&ready_sequence()).unwrap();
            let _ = read_msg(&mut s);
            let mut rest = Vec::new();
            let _ = s.read_to_end(&mut rest);
        });
        let mut opts = ConnectOptions::new();
        opts.io_timeout = Duration::from_millis(300);
        let mut conn = Connection::connect(&info, opts).expect("connect");
        assert!(!conn.used_password(), "trust");
        let err = conn
            .simple_query("SELECT pg_sleep(10)")
            .expect_err("timeout");
        assert!(
            matches!(err, SourceError::Timeout { phase: "query", .. }),
            "{err:?}"
        );
        assert_eq!(err.sqlstate(), "57014");
        assert!(!conn.is_usable());
        let err = conn.simple_query("SELECT 1").expect_err("broken");
        assert!(matches!(err, SourceError::Broken { .. }), "{err:?}");
        drop(conn);
        server.join().expect("server thread");
    }

    #[test]
    fn panicking_interrupt_check_leaves_connection_broken() {
        let (info, server) = fake_server(|mut s| {
            read_startup(&mut s);
            s.write_all(&ready_sequence()).unwrap();
            let _ = read_msg(&mut s);
            let mut rest = Vec::new();
            let _ = s.read_to_end(&mut rest);
        });
        let armed = Arc::new(AtomicUsize::new(0));
        let flag = Arc::clone(&armed);
        let opts = ConnectOptions {
            interrupt_check: Some(Box::new(move || {
                if flag.load(Ordering::Relaxed) == 1 {
                    panic!("query canceled");
                }
            })),
            ..ConnectOptions::new()
        };
        let mut conn = Connection::connect(&info, opts).expect("connect");
        armed.store(1, Ordering::Relaxed);
        let unwound = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let _ = conn.simple_query("SELECT 1");
        }));
        assert!(unwound.is_err());
        armed.store(0, Ordering::Relaxed);
        assert!(matches!(
            conn.simple_query("SELECT 1"),
            Err(SourceError::Broken { .. })
        ));
        drop(conn);
        server.join().expect("server thread");
    }

    #[test]
    fn server_closing_mid_query_is_closed() {
        let (info, server) = fake_server(|mut s| {
            read_startup(&mut s);
            s.write_all(&ready_sequence()).unwrap();
            let _ = read_msg(&mut s);
            s.write_all(&row_description(&["a"])).unwrap();
            // Drop the socket mid-result.
        });
        let mut conn = Connection::connect(&info, ConnectOptions::new()).expect("connect");
        let err = conn.simple_query("SELECT 1").expect_err("closed");
        assert!(matches!(err, SourceError::Closed { .. }), "{err:?}");
        server.join().expect("server thread");
    }

    #[test]
    fn hostile_server_gets_protocol_errors() {
        // An oversized length, then a truncated DataRow, then a DataRow with too many values.
        let cases: Vec<Vec<u8>> = vec![
            vec![b'D', 0x7f, 0xff, 0xff, 0xff],
            frame(b'D', &[0, 1, 0, 0, 0, 9, b'a']),
            {
                let mut out = row_description(&["a"]);
                out.extend(data_row(&[Some("1"), Some("2")]));
                out
            },
        ];
        for reply in cases {
            let (info, server) = fake_server(move |mut s| {
                read_startup(&mut s);
                s.write_all(&ready_sequence()).unwrap();
                let _ = read_msg(&mut s);
                s.write_all(&reply).unwrap();
                let mut rest = Vec::new();
                let _ = s.read_to_end(&mut rest);
            });
            let mut conn = Connection::connect(&info, ConnectOptions::new()).expect("connect");
            let err = conn.simple_query("SELECT 1").expect_err("protocol");
            assert!(matches!(err, SourceError::Protocol(_)), "{err:?}");
            assert_eq!(err.sqlstate(), "08P01");
            assert!(!conn.is_usable());
            drop(conn);
            server.join().expect("server thread");
        }
    }

    #[test]
    fn fatal_startup_error_is_server_error() {
        let (info, server) = fake_server(|mut s| {
            read_startup(&mut s);
            s.write_all(&frame(
                b'E',
                &error_body(&[
                    (b'V', "FATAL"),
                    (b'C', "3D000"),
                    (b'M', "database \"app\" does not exist"),
                ]),
            ))
            .unwrap();
        });
        let err = Connection::connect(&info, ConnectOptions::new()).expect_err("no db");
        assert_eq!(err.sqlstate(), "3D000");
        assert_eq!(err.to_string(), "database \"app\" does not exist");
        server.join().expect("server thread");
    }

    #[test]
    fn replication_startup_and_identify_system() {
        let (info, server) = fake_server(|mut s| {
            let params = read_startup(&mut s);
            assert!(params.contains(&("replication".into(), "database".into())));
            s.write_all(&ready_sequence()).unwrap();
            let (_, body) = read_msg(&mut s);
            assert_eq!(body, b"IDENTIFY_SYSTEM\0");
            let mut out = row_description(&["systemid", "timeline", "xlogpos", "dbname"]);
            out.extend(data_row(&[
                Some("7301234567890123456"),
                Some("1"),
                Some("0/1A2B3C4"),
                Some("app"),
            ]));
            out.extend(frame(b'C', b"IDENTIFY_SYSTEM\0"));
            out.extend(frame(b'Z', b"I"));
            s.write_all(&out).unwrap();
            let mut rest = Vec::new();
            let _ = s.read_to_end(&mut rest);
        });
        let opts = ConnectOptions {
            replication: true,
            ..ConnectOptions::new()
        };
        let mut conn = Connection::connect(&info, opts).expect("connect");
        let id = conn.identify_system().expect("identify");
        assert_eq!(
            id,
            SystemIdentity {
                systemid: "7301234567890123456".into(),
                timeline: 1,
                xlogpos: "0/1A2B3C4".into(),
                dbname: Some("app".into()),
            }
        );
        drop(conn);
        server.join().expect("server thread");
    }

    #[test]
    fn connection_failures_are_distinct() {
        // Refused: a port nobody listens on (bind, then close).
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("free port");
        let info = ConnInfo::parse(&format!("host=127.0.0.1 port={port} user=u")).expect("parse");
        let err = Connection::connect(&info, ConnectOptions::new()).expect_err("refused");
        assert!(
            matches!(err, SourceError::ConnectionRefused { .. }),
            "{err:?}"
        );
        assert!(err.hint().is_some_and(|h| h.contains("listen_addresses")));

        let info = ConnInfo::parse("host=/nonexistent/dir port=5999 user=u").expect("parse");
        let err = Connection::connect(&info, ConnectOptions::new()).expect_err("no socket");
        assert!(
            matches!(&err, SourceError::Unreachable { reason, .. } if reason.contains(".s.PGSQL.5999")),
            "{err:?}"
        );

        let info =
            ConnInfo::parse("host=no-such-host.invalid user=u connect_timeout=3").expect("parse");
        let err = Connection::connect(&info, ConnectOptions::new()).expect_err("dns");
        assert!(matches!(err, SourceError::HostNotFound { .. }), "{err:?}");
    }

    #[test]
    fn server_versions() {
        assert_eq!(
            parse_server_version("15.20 (Debian 15.20-1.pgdg120+1)"),
            Some(150020)
        );
        assert_eq!(parse_server_version("9.6.24"), Some(90624));
        assert_eq!(parse_server_version("17devel"), Some(170000));
        assert_eq!(parse_server_version("16beta1"), Some(160000));
        assert_eq!(parse_server_version("10.23"), Some(100023));
        assert_eq!(parse_server_version("garbage"), None);
        assert_eq!(parse_server_version(""), None);
    }

    /// Against a real server: `CLOUDMIG_TEST_CONNINFO='host=/tmp/x port=56001 user=...'
    /// cargo test -- --ignored real_server`.
    #[test]
    #[ignore]
    fn real_server() {
        let Ok(conninfo) = std::env::var("CLOUDMIG_TEST_CONNINFO") else {
            return;
        };
        let info = ConnInfo::parse(&conninfo).expect("parse");
        let mut conn = Connection::connect(&info, ConnectOptions::new()).expect("connect");
        let rows = conn
            .simple_query("SELECT current_user AS u, 1::int AS one, NULL AS n, true AS b")
            .expect("query");
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].parse::<i32>("one").ok(), Some(1));
        assert!(conn.server_version_num().is_some());
        let err = conn
            .simple_query("SELECT * FROM no_such_table")
            .expect_err("error");
        assert_eq!(err.sqlstate(), "42P01");
        assert_eq!(
            conn.simple_query("SELECT 2 AS two").expect("usable")[0].get("two"),
            Some("2")
        );
        println!(
            "used_password={} version={:?}",
            conn.used_password(),
            conn.server_version_num()
        );
    }
}
