//! Logical streaming replication on a replication connection: `START_REPLICATION ... LOGICAL`
//! with the `pgoutput` plugin ([`Connection::start_logical_replication`]) and the
//! [`ReplicationStream`] it returns, which yields the server's XLogData and keepalives and
//! sends our standby status updates. Decode the XLogData with [`crate::source::pgoutput`].
//!
//! States of a `ReplicationStream`, after the server's `CopyBothResponse`:
//!
//! ```text
//!   Streaming --XLogData / keepalive--> Streaming (a message for the caller)
//!   Streaming --nothing within `wait`--> Streaming (Ok(None))
//!   Streaming --send_status--> Streaming
//!   Streaming --finish: CopyDone ... CopyDone, CommandComplete, ReadyForQuery--> gone
//!                                                                (connection ready again)
//!   Streaming --ErrorResponse--> Failed (Server error; connection Broken)
//!   Streaming --end of file, "COPY 0" of a shutting-down walsender--> Failed (Closed; Broken)
//!   Streaming --I/O error, bad bytes--> Failed (connection Broken)
//! ```
//!
//! One stream per connection: PostgreSQL's walsender does not reset its end-of-streaming
//! state for logical replication (`StartLogicalReplication` in walsender.c, unlike the
//! physical `StartReplication`), so a second `START_REPLICATION` on a connection whose stream
//! was finished would end at once. [`Connection::start_pgoutput`] refuses it with
//! [`SourceError::Unsupported`]: open a new replication connection to stream again. The
//! finished connection still runs other commands (`IDENTIFY_SYSTEM`, slot commands, SQL).
//!
//! After a failure every call returns [`SourceError::Broken`]. Dropping the stream without
//! [`ReplicationStream::finish`] leaves the connection Broken too: draining could mean
//! reading the rest of a large transaction inside `Drop`.
//!
//! Keeping the walsender alive: the server ends a connection that has not sent a status
//! update for `wal_sender_timeout` (60 s by default), and asks for one early with a keepalive
//! whose `reply_requested` is set. The caller must send [`ReplicationStream::send_status`] at
//! least every 10 s, as `wal_receiver_status_interval` makes a standby do, and at once when a
//! keepalive requests a reply: so call [`ReplicationStream::next`] with a wait of a few
//! seconds at most, and send status between calls, including while busy applying a large
//! transaction (the walsender's clock runs on while we do not read). Conversely the server may stay silent
//! for as long as it has nothing to send and gets our status updates: to notice a dead peer,
//! track the time since the last message (as `wal_receiver_timeout` does in worker.c) and
//! ask for a reply when it grows.
//!
//! Throughput: messages are split off the connection's read buffer (made [`COPY_READ_ROOM`]
//! bytes roomy before each read) without copying, and an XLogData's `data` is a slice of it,
//! so a decoded row's values still point into the bytes the kernel wrote. A slice keeps its
//! whole read buffer allocated until every slice of it is dropped. The interrupt check runs
//! about every 100 ms while data flows, and at least every 100 ms while waiting.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::{BufMut, Bytes, BytesMut};
use postgres_protocol::message::frontend;

use crate::source::connection::{message_name, Budget, Connection};
use crate::source::copy_out::COPY_READ_ROOM;
use crate::source::error::SourceError;
use crate::source::lsn::Lsn;
use crate::source::protocol::{self, BackendMessage};
use crate::source::replication::validate_slot_name;

/// Seconds from the Unix epoch to PostgreSQL's (2000-01-01 00:00 UTC).
const POSTGRES_EPOCH_UNIX_SECS: u64 = 946_684_800;
/// Longest publication name, in bytes (`NAMEDATALEN - 1`).
const MAX_PUBLICATION_BYTES: usize = 63;
/// Shortest wait [`ReplicationStream::next`] uses, so that it always tries one read.
const MIN_WAIT: Duration = Duration::from_millis(1);

/// The `pgoutput` options of `START_REPLICATION`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PgOutputOptions {
    /// The publications whose tables to send (`publication_names`); at least one.
    pub publications: Vec<String>,
    /// `proto_version`: 1, or 2 (PostgreSQL 14+) for streaming of in-progress transactions.
    /// Later versions are refused: [`crate::source::pgoutput`] decodes 1 and 2 only.
    pub proto_version: u32,
    /// `streaming 'on'`: send large in-progress transactions in blocks before they commit
    /// (needs `proto_version` 2), bounding the walsender's memory and spill files.
    pub streaming: bool,
    /// `messages 'true'` (PostgreSQL 14+): also send `pg_logical_emit_message()` messages.
    pub messages: bool,
    /// `binary 'true'` (PostgreSQL 14+): column values in binary send format where the type
    /// has one. Only safe between identical server versions and type definitions.
    pub binary: bool,
}

impl PgOutputOptions {
    /// Protocol 1 for one publication, no streaming, messages or binary values.
    pub fn new(publication: &str) -> PgOutputOptions {
        PgOutputOptions {
            publications: vec![publication.to_owned()],
            proto_version: 1,
            streaming: false,
            messages: false,
            binary: false,
        }
    }
}

/// One message of the replication stream (the `CopyData` payloads of the walsender).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReplicationMessage {
    /// WAL data: for logical replication, one pgoutput message.
    XLogData {
        /// Where this message's WAL starts (0/0 for some pgoutput messages).
        wal_start: Lsn,
        /// The end of the WAL the server has, for progress and lag.
        wal_end: Lsn,
        /// The server's clock when it sent this, in microseconds since 2000-01-01.
        server_time: i64,
        /// The pgoutput message, a slice of the read buffer.
        data: Bytes,
    },
    /// A keepalive.
    Keepalive {
        /// The end of the WAL the server has sent; nothing below it remains for this slot.
        wal_end: Lsn,
        /// The server's clock, in microseconds since 2000-01-01.
        server_time: i64,
        /// The server wants a status update at once, or it will soon end the connection.
        reply_requested: bool,
    },
}

/// Where a [`ReplicationStream`] is; see the module docs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Streaming,
    Failed,
}

/// A logical replication stream in progress on a borrowed [`Connection`]; see the module docs
/// for its states, the status updates it needs and what dropping it does.
pub struct ReplicationStream<'c> {
    conn: &'c mut Connection,
    state: State,
    bytes: u64,
}

impl std::fmt::Debug for ReplicationStream<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplicationStream")
            .field("target", &self.conn.target())
            .field("state", &self.state)
            .field("bytes", &self.bytes)
            .finish_non_exhaustive()
    }
}

impl Connection {
    /// `START_REPLICATION SLOT slot LOGICAL start` with `pgoutput`'s `proto_version`,
    /// `publication_names` (the one `publication`) and, when `streaming`, `streaming 'on'`.
    /// See [`Connection::start_pgoutput`] for the other options and the errors.
    pub fn start_logical_replication(
        &mut self,
        slot: &str,
        start: Lsn,
        publication: &str,
        proto_version: u32,
        streaming: bool,
    ) -> Result<ReplicationStream<'_>, SourceError> {
        let options = PgOutputOptions {
            streaming,
            proto_version,
            ..PgOutputOptions::new(publication)
        };
        self.start_pgoutput(slot, start, &options)
    }

    /// `START_REPLICATION SLOT slot LOGICAL start (...)` with every pgoutput option of
    /// `options`, on a connection made with [`crate::source::ConnectOptions::replication`].
    ///
    /// The slot name is validated like PostgreSQL's and sent bare; publication names are
    /// double-quoted inside a single-quoted value, so any name (spaces, quotes, upper case)
    /// arrives intact. The server streams from `start` or from the slot's
    /// `confirmed_flush_lsn`, whichever is later; [`Lsn::INVALID`] means "where the slot is".
    ///
    /// Options the server cannot honour (protocol 2, streaming, messages and binary need
    /// PostgreSQL 14) fail with [`SourceError::Unsupported`] before anything is sent, and so
    /// does a second stream on one connection (see the module docs). A server error before
    /// streaming starts (no such slot `42704`, slot in use by another process `55006`) comes
    /// back as [`SourceError::Server`] with the connection still usable. A publication that
    /// does not exist is only reported once decoding reaches a change (`42704` from
    /// [`ReplicationStream::next`], connection Broken), so check it beforehand with SQL.
    pub fn start_pgoutput(
        &mut self,
        slot: &str,
        start: Lsn,
        options: &PgOutputOptions,
    ) -> Result<ReplicationStream<'_>, SourceError> {
        let version = self.replication_server_version("START_REPLICATION")?;
        if self.logical_stream_ended() {
            return Err(SourceError::Unsupported(
                "a replication connection streams logically only once; open a new connection to \
                 stream again"
                    .into(),
            ));
        }
        let command = start_replication_command(slot, start, options, version)?;
        let budget = Budget::idle("query", self.io_timeout());
        self.start_query(&command, budget)?;
        loop {
            let msg = self.read_message(budget)?;
            let Some(msg) = self.absorb_async(msg) else {
                continue;
            };
            match msg {
                BackendMessage::CopyBothResponse => {
                    return Ok(ReplicationStream {
                        conn: self,
                        state: State::Streaming,
                        bytes: 0,
                    })
                }
                BackendMessage::ErrorResponse(e) => {
                    if e.severity != "FATAL" && e.severity != "PANIC" {
                        self.drain_to_ready(budget)?;
                    }
                    return Err(SourceError::Server(Box::new(e)));
                }
                other => {
                    return Err(SourceError::Protocol(format!(
                        "unexpected {} in reply to START_REPLICATION",
                        message_name(&other)
                    )))
                }
            }
        }
    }
}

impl ReplicationStream<'_> {
    /// The next message, or `Ok(None)` when `wait` passed without one, so the caller can send
    /// status and check its own state (a zero `wait` still tries one read of 1 ms). The
    /// interrupt check runs at least every 100 ms meanwhile.
    ///
    /// An `ErrorResponse` (walsender terminated, slot dropped, WAL removed...) becomes
    /// [`SourceError::Server`]; the server closing the connection, or a shutting-down server's
    /// final `CommandComplete`, becomes [`SourceError::Closed`]. Both, and any other failure,
    /// leave the connection Broken.
    pub fn next(&mut self, wait: Duration) -> Result<Option<ReplicationMessage>, SourceError> {
        self.ensure_streaming()?;
        let result = self.step(Budget::fixed("query", wait.max(MIN_WAIT)));
        if result.is_err() {
            self.state = State::Failed;
        }
        result
    }

    fn step(&mut self, budget: Budget) -> Result<Option<ReplicationMessage>, SourceError> {
        loop {
            let (tag, body) = match self.conn.next_frame(budget, COPY_READ_ROOM) {
                Ok(frame) => frame,
                // Only the budget times out here, and a partly read message stays buffered.
                Err(SourceError::Timeout { .. }) => return Ok(None),
                Err(e) => return Err(e),
            };
            // The hot path: one tag test and a fixed header, no copy.
            if tag == b'd' {
                let msg = parse_copy_data(body)?;
                if let ReplicationMessage::XLogData { data, .. } = &msg {
                    self.bytes = self.bytes.saturating_add(data.len() as u64);
                }
                return Ok(Some(msg));
            }
            let msg = protocol::parse_message(tag, body)?;
            let Some(msg) = self.conn.absorb_async(msg) else {
                continue;
            };
            return Err(match msg {
                BackendMessage::ErrorResponse(e) => SourceError::Server(Box::new(e)),
                // WalSndDone: a walsender told to shut down sends "COPY 0" and exits.
                BackendMessage::CommandComplete { .. } => SourceError::Closed {
                    target: self.conn.target().to_owned(),
                },
                other => SourceError::Protocol(format!(
                    "unexpected {} during logical replication",
                    message_name(&other)
                )),
            });
        }
    }

    /// Sends a standby status update (`r`): the WAL positions written, flushed and applied
    /// here (each the end, +1, of what is covered), our clock, and whether the server
    /// should answer with a keepalive at once.
    ///
    /// The server advances the slot's `confirmed_flush_lsn` to `flushed` and may then recycle
    /// the WAL before it: send only positions whose changes are durably committed here (as
    /// worker.c does, from the replication origin's progress), and never a lower one than
    /// before. Send at least every 10 s (see the module docs).
    pub fn send_status(
        &mut self,
        written: Lsn,
        flushed: Lsn,
        applied: Lsn,
        reply_requested: bool,
    ) -> Result<(), SourceError> {
        self.ensure_streaming()?;
        let now = postgres_epoch_micros(SystemTime::now());
        let buf = status_update(written, flushed, applied, now, reply_requested);
        let budget = Budget::idle("query", self.conn.io_timeout());
        let result = self.conn.send(&buf, budget);
        if result.is_err() {
            self.state = State::Failed;
        }
        result
    }

    /// Ends streaming: sends `CopyDone`, discards the messages still in flight, and waits for
    /// the server's `CopyDone`, `CommandComplete` and `ReadyForQuery`, leaving the connection
    /// usable for other commands. The wait is bounded by the I/O timeout measured from the
    /// last bytes received: a walsender in the middle of a large transaction may keep sending
    /// it first.
    pub fn finish(mut self) -> Result<(), SourceError> {
        self.ensure_streaming()?;
        // Failed until ReadyForQuery: an early return leaves the connection Broken.
        self.state = State::Failed;
        let budget = Budget::idle("query", self.conn.io_timeout());
        let mut buf = BytesMut::new();
        frontend::copy_done(&mut buf);
        self.conn.send(&buf, budget)?;
        loop {
            let (tag, body) = self.conn.next_frame(budget, COPY_READ_ROOM)?;
            // Sent before the server read our CopyDone (pgoutput may even finish the
            // transaction it was sending): of no use to a caller that stops.
            if tag == b'd' {
                continue;
            }
            let msg = protocol::parse_message(tag, body)?;
            let Some(msg) = self.conn.absorb_async(msg) else {
                continue;
            };
            match msg {
                // The server's CopyDone, then "START_REPLICATION" (or nothing before 15).
                BackendMessage::CopyDone | BackendMessage::CommandComplete { .. } => {}
                BackendMessage::ReadyForQuery { status } => {
                    self.conn.finish_request(status);
                    self.conn.set_logical_stream_ended();
                    return Ok(());
                }
                BackendMessage::ErrorResponse(e) => {
                    // After an error the walsender leaves COPY mode and ignores our CopyDone,
                    // so ReadyForQuery follows and the connection is in step again.
                    self.conn.set_logical_stream_ended();
                    if e.severity != "FATAL" && e.severity != "PANIC" {
                        self.conn.drain_to_ready(budget)?;
                    }
                    return Err(SourceError::Server(Box::new(e)));
                }
                other => {
                    return Err(SourceError::Protocol(format!(
                        "unexpected {} while ending logical replication",
                        message_name(&other)
                    )))
                }
            }
        }
    }

    /// Bytes of XLogData payload received so far.
    pub fn bytes_received(&self) -> u64 {
        self.bytes
    }

    fn ensure_streaming(&self) -> Result<(), SourceError> {
        match self.state {
            State::Streaming => Ok(()),
            State::Failed => Err(SourceError::Broken {
                target: self.conn.target().to_owned(),
            }),
        }
    }
}

/// A time as PostgreSQL's `TimestampTz`: microseconds since 2000-01-01 00:00 UTC (negative
/// before), saturating far outside the representable range.
pub fn postgres_epoch_micros(t: SystemTime) -> i64 {
    let epoch = UNIX_EPOCH + Duration::from_secs(POSTGRES_EPOCH_UNIX_SECS);
    match t.duration_since(epoch) {
        Ok(after) => i64::try_from(after.as_micros()).unwrap_or(i64::MAX),
        Err(before) => i64::try_from(before.duration().as_micros())
            .map(|us| -us)
            .unwrap_or(i64::MIN),
    }
}

/// Parses one CopyData payload of the walsender: `w` XLogData or `k` keepalive.
fn parse_copy_data(body: Bytes) -> Result<ReplicationMessage, SourceError> {
    fn int64(body: &[u8], at: usize) -> Option<[u8; 8]> {
        let bytes = body.get(at..at.checked_add(8)?)?;
        <[u8; 8]>::try_from(bytes).ok()
    }
    let bad = |what: &str| SourceError::Protocol(format!("malformed {what} message"));
    match body.first() {
        Some(b'w') => {
            let (Some(start), Some(end), Some(time)) =
                (int64(&body, 1), int64(&body, 9), int64(&body, 17))
            else {
                return Err(bad("XLogData"));
            };
            Ok(ReplicationMessage::XLogData {
                wal_start: Lsn(u64::from_be_bytes(start)),
                wal_end: Lsn(u64::from_be_bytes(end)),
                server_time: i64::from_be_bytes(time),
                data: body.slice(25..),
            })
        }
        Some(b'k') => {
            let (Some(end), Some(time), Some(&reply), 18) =
                (int64(&body, 1), int64(&body, 9), body.get(17), body.len())
            else {
                return Err(bad("primary keepalive"));
            };
            Ok(ReplicationMessage::Keepalive {
                wal_end: Lsn(u64::from_be_bytes(end)),
                server_time: i64::from_be_bytes(time),
                reply_requested: reply != 0,
            })
        }
        Some(&other) => Err(SourceError::Protocol(format!(
            "unexpected replication message type 0x{other:02x}"
        ))),
        None => Err(SourceError::Protocol(
            "empty CopyData during logical replication".into(),
        )),
    }
}

/// A framed standby status update: `CopyData` holding `r`, three positions, the clock and the
/// reply flag.
fn status_update(
    written: Lsn,
    flushed: Lsn,
    applied: Lsn,
    now: i64,
    reply_requested: bool,
) -> BytesMut {
    let mut buf = BytesMut::with_capacity(39);
    buf.put_u8(b'd');
    // Length (itself included) and the 34-byte body.
    buf.put_u32(4 + 34);
    buf.put_u8(b'r');
    buf.put_u64(written.0);
    buf.put_u64(flushed.0);
    buf.put_u64(applied.0);
    buf.put_i64(now);
    buf.put_u8(u8::from(reply_requested));
    buf
}

/// Builds `START_REPLICATION ... LOGICAL` with pgoutput's options for `server_version_num`.
pub(crate) fn start_replication_command(
    slot: &str,
    start: Lsn,
    options: &PgOutputOptions,
    server_version_num: i32,
) -> Result<String, SourceError> {
    validate_slot_name(slot)?;
    let unsupported = |what: String| Err(SourceError::Unsupported(what));
    if server_version_num < 100_000 {
        return unsupported(
            "logical replication with pgoutput needs a source running PostgreSQL 10 or later"
                .into(),
        );
    }
    match options.proto_version {
        1 => {}
        2 if server_version_num >= 140_000 => {}
        2 => {
            return unsupported(
                "pgoutput protocol version 2 needs a source running PostgreSQL 14 or later".into(),
            )
        }
        v => {
            return unsupported(format!(
                "pgoutput protocol version {v} is not supported: use 1 or 2"
            ))
        }
    }
    if options.streaming && options.proto_version < 2 {
        return unsupported(
            "streaming of in-progress transactions needs pgoutput protocol version 2".into(),
        );
    }
    for (wanted, name) in [(options.messages, "messages"), (options.binary, "binary")] {
        if wanted && server_version_num < 140_000 {
            return unsupported(format!(
                "the pgoutput option {name} needs a source running PostgreSQL 14 or later"
            ));
        }
    }
    if options.publications.is_empty() {
        return unsupported("logical replication needs at least one publication".into());
    }
    let mut names = Vec::with_capacity(options.publications.len());
    for publication in &options.publications {
        let invalid = |reason| SourceError::InvalidName {
            what: "publication",
            name: publication
                .chars()
                .take(MAX_PUBLICATION_BYTES + 1)
                .collect(),
            reason,
        };
        if publication.is_empty() {
            return Err(invalid("it is empty"));
        }
        if publication.len() > MAX_PUBLICATION_BYTES {
            return Err(invalid("it is longer than 63 bytes"));
        }
        if publication.contains('\0') {
            return Err(invalid("it contains a null byte"));
        }
        // SplitIdentifierString (varlena.c) reads a double-quoted name with "" for ".
        names.push(format!("\"{}\"", publication.replace('"', "\"\"")));
    }
    let mut command = format!(
        "START_REPLICATION SLOT {slot} LOGICAL {start} (\"proto_version\" '{}', \
         \"publication_names\" {}",
        options.proto_version,
        replication_literal(&names.join(","))
    );
    if options.streaming {
        command.push_str(", \"streaming\" 'on'");
    }
    if options.messages {
        command.push_str(", \"messages\" 'true'");
    }
    if options.binary {
        command.push_str(", \"binary\" 'true'");
    }
    command.push(')');
    Ok(command)
}

/// A string literal of the replication command grammar (repl_scanner.l): single quotes with
/// `''` for a quote and no backslash escapes, so [`crate::source::quote_literal`]'s `E''`
/// form would be a syntax error there.
fn replication_literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::connection::tests::{
        counting_options, data_row, fake_server, read_msg, read_startup, ready_sequence,
        row_description,
    };
    use crate::source::connection::ConnectOptions;
    use crate::source::pgoutput::{self, Message, Value};
    use crate::source::protocol::tests::{error_body, frame};
    use std::io::{Read, Write};
    use std::net::TcpStream;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::time::Instant;

    const START: &str = "START_REPLICATION SLOT s1 LOGICAL 0/10 (\"proto_version\" '2', \
                         \"publication_names\" '\"pub\"', \"streaming\" 'on')";

    fn xlog_data(start: u64, end: u64, data: &[u8]) -> Vec<u8> {
        let mut body = vec![b'w'];
        body.extend_from_slice(&start.to_be_bytes());
        body.extend_from_slice(&end.to_be_bytes());
        body.extend_from_slice(&7i64.to_be_bytes());
        body.extend_from_slice(data);
        frame(b'd', &body)
    }

    fn keepalive(end: u64, reply: bool) -> Vec<u8> {
        let mut body = vec![b'k'];
        body.extend_from_slice(&end.to_be_bytes());
        body.extend_from_slice(&8i64.to_be_bytes());
        body.push(u8::from(reply));
        frame(b'd', &body)
    }

    fn copy_both_response() -> Vec<u8> {
        frame(b'W', &[0, 0, 0])
    }

    /// A pgoutput Insert of one text value into relation 16384.
    fn insert(value: &str) -> Vec<u8> {
        let mut m = vec![b'I'];
        m.extend_from_slice(&16384u32.to_be_bytes());
        m.push(b'N');
        m.extend_from_slice(&1u16.to_be_bytes());
        m.push(b't');
        m.extend_from_slice(&(value.len() as u32).to_be_bytes());
        m.extend_from_slice(value.as_bytes());
        m
    }

    fn replication_options(counter: &Arc<AtomicUsize>) -> ConnectOptions {
        ConnectOptions {
            replication: true,
            ..counting_options(counter)
        }
    }

    /// Startup, then expects START_REPLICATION and answers CopyBothResponse.
    fn start_streaming(s: &mut TcpStream) {
        read_startup(s);
        s.write_all(&ready_sequence()).unwrap();
        let (tag, body) = read_msg(s);
        assert_eq!(tag, b'Q');
        assert_eq!(String::from_utf8_lossy(&body), format!("{START}\0"));
        s.write_all(&copy_both_response()).unwrap();
    }

    fn answer_select_one(s: &mut TcpStream) {
        let (tag, body) = read_msg(s);
        assert_eq!((tag, body.as_slice()), (b'Q', &b"SELECT 1 AS one\0"[..]));
        let mut out = row_description(&["one"]);
        out.extend(data_row(&[Some("1")]));
        out.extend(frame(b'C', b"SELECT 1\0"));
        out.extend(frame(b'Z', b"I"));
        s.write_all(&out).unwrap();
    }

    fn wait_for_close(s: &mut TcpStream) {
        let mut rest = Vec::new();
        let _ = s.read_to_end(&mut rest);
    }

    fn start(conn: &mut Connection) -> ReplicationStream<'_> {
        match conn.start_logical_replication("s1", Lsn(0x10), "pub", 2, true) {
            Ok(stream) => stream,
            Err(e) => panic!("start: {e}"),
        }
    }

    fn next_some(stream: &mut ReplicationStream<'_>) -> ReplicationMessage {
        match stream.next(Duration::from_secs(5)) {
            Ok(Some(m)) => m,
            other => panic!("expected a message: {other:?}"),
        }
    }

    #[test]
    fn xlogdata_and_keepalives_interleaved_in_partial_frames() {
        let (info, server) = fake_server(|mut s| {
            s.set_nodelay(true).unwrap();
            start_streaming(&mut s);
            let mut out = xlog_data(0x100, 0x200, &insert("first"));
            out.extend(keepalive(0x200, true));
            out.extend(frame(
                b'N',
                &error_body(&[(b'V', "WARNING"), (b'C', "01000"), (b'M', "mid-stream")]),
            ));
            out.extend(xlog_data(0x200, 0x300, b"E"));
            out.extend(keepalive(0x300, false));
            // One byte at a time: every frame arrives in pieces.
            for b in &out {
                s.write_all(&[*b]).unwrap();
                std::thread::sleep(Duration::from_micros(200));
            }
            // The client's status update.
            let (tag, body) = read_msg(&mut s);
            assert_eq!(tag, b'd');
            assert_eq!(body.len(), 34);
            assert_eq!(body[0], b'r');
            assert_eq!(&body[1..9], &0x300u64.to_be_bytes());
            assert_eq!(&body[9..17], &0x200u64.to_be_bytes());
            assert_eq!(&body[17..25], &0x100u64.to_be_bytes());
            let clock = i64::from_be_bytes(body[25..33].try_into().unwrap());
            assert!(clock > 800_000_000_000_000, "after 2025: {clock}");
            assert_eq!(body[33], 1);
            // Silence: the client's next() times out. Then finish: CopyDone in, data still in
            // flight, our CopyDone, CommandComplete, ReadyForQuery.
            let (tag, _) = read_msg(&mut s);
            assert_eq!(tag, b'c', "CopyDone");
            let mut out = xlog_data(0x300, 0x400, b"late");
            out.extend(frame(b'c', b""));
            out.extend(frame(b'C', b"START_REPLICATION\0"));
            out.extend(frame(b'Z', b"I"));
            s.write_all(&out).unwrap();
            answer_select_one(&mut s);
            wait_for_close(&mut s);
        });
        let checks = Arc::new(AtomicUsize::new(0));
        let mut conn = Connection::connect(&info, replication_options(&checks)).expect("connect");
        let mut stream = start(&mut conn);
        let ReplicationMessage::XLogData {
            wal_start,
            wal_end,
            server_time,
            data,
        } = next_some(&mut stream)
        else {
            panic!("not XLogData");
        };
        assert_eq!(
            (wal_start, wal_end, server_time),
            (Lsn(0x100), Lsn(0x200), 7)
        );
        let Ok(Message::Insert { relation, new, .. }) = pgoutput::decode(&data, false) else {
            panic!("not an insert");
        };
        assert_eq!(relation, 16384);
        assert_eq!(new.0, vec![Value::Text(Bytes::from_static(b"first"))]);
        assert_eq!(
            next_some(&mut stream),
            ReplicationMessage::Keepalive {
                wal_end: Lsn(0x200),
                server_time: 8,
                reply_requested: true
            }
        );
        assert!(matches!(
            next_some(&mut stream),
            ReplicationMessage::XLogData { data, .. } if &data[..] == b"E"
        ));
        assert!(matches!(
            next_some(&mut stream),
            ReplicationMessage::Keepalive {
                reply_requested: false,
                ..
            }
        ));
        assert_eq!(stream.bytes_received(), (insert("first").len() + 1) as u64);
        stream
            .send_status(Lsn(0x300), Lsn(0x200), Lsn(0x100), true)
            .expect("status");
        checks.store(0, Ordering::Relaxed);
        let waited = Instant::now();
        assert_eq!(stream.next(Duration::from_millis(350)).ok(), Some(None));
        let elapsed = waited.elapsed();
        assert!(
            elapsed >= Duration::from_millis(340) && elapsed < Duration::from_secs(2),
            "{elapsed:?}"
        );
        assert!(checks.load(Ordering::Relaxed) >= 3, "checked while waiting");
        stream.finish().expect("finish");
        let again = conn.start_logical_replication("s1", Lsn(0x10), "pub", 2, true);
        assert!(
            matches!(&again, Err(SourceError::Unsupported(m)) if m.contains("new connection")),
            "{again:?}"
        );
        assert_eq!(
            conn.notices()
                .map(|n| n.message.as_str())
                .collect::<Vec<_>>(),
            ["mid-stream"]
        );
        assert!(conn.is_usable());
        let rows = conn.simple_query("SELECT 1 AS one").expect("usable");
        assert_eq!(rows.first().and_then(|r| r.get("one")), Some("1"));
        drop(conn);
        server.join().expect("server thread");
    }

    #[test]
    fn error_mid_stream_breaks_the_connection() {
        let (info, server) = fake_server(|mut s| {
            start_streaming(&mut s);
            let mut out = xlog_data(1, 2, b"E");
            out.extend(frame(
                b'E',
                &error_body(&[
                    (b'V', "FATAL"),
                    (b'C', "57P01"),
                    (b'M', "terminating connection due to administrator command"),
                ]),
            ));
            s.write_all(&out).unwrap();
            wait_for_close(&mut s);
        });
        let checks = Arc::new(AtomicUsize::new(0));
        let mut conn = Connection::connect(&info, replication_options(&checks)).expect("connect");
        let mut stream = start(&mut conn);
        assert!(matches!(
            next_some(&mut stream),
            ReplicationMessage::XLogData { .. }
        ));
        let err = stream.next(Duration::from_secs(5)).expect_err("error");
        assert!(
            matches!(&err, SourceError::Server(e) if e.code == "57P01"),
            "{err:?}"
        );
        for _ in 0..2 {
            assert!(matches!(
                stream.next(Duration::ZERO),
                Err(SourceError::Broken { .. })
            ));
        }
        assert!(matches!(
            stream.send_status(Lsn(1), Lsn(1), Lsn(1), false),
            Err(SourceError::Broken { .. })
        ));
        assert!(matches!(stream.finish(), Err(SourceError::Broken { .. })));
        assert!(!conn.is_usable());
        assert!(matches!(
            conn.simple_query("SELECT 1"),
            Err(SourceError::Broken { .. })
        ));
        drop(conn);
        server.join().expect("server thread");
    }

    #[test]
    fn server_going_away_is_closed() {
        // A frame cut short by the server closing, and a walsender's shutdown "COPY 0".
        let endings: Vec<Vec<u8>> = vec![
            {
                let mut out = xlog_data(1, 2, b"E");
                out.truncate(out.len() - 3);
                out
            },
            frame(b'C', b"COPY 0\0"),
        ];
        for ending in endings {
            let (info, server) = fake_server(move |mut s| {
                start_streaming(&mut s);
                let mut out = keepalive(1, false);
                out.extend(ending);
                s.write_all(&out).unwrap();
            });
            let checks = Arc::new(AtomicUsize::new(0));
            let mut conn =
                Connection::connect(&info, replication_options(&checks)).expect("connect");
            let mut stream = start(&mut conn);
            assert!(matches!(
                next_some(&mut stream),
                ReplicationMessage::Keepalive { .. }
            ));
            let err = stream.next(Duration::from_secs(5)).expect_err("closed");
            assert!(matches!(err, SourceError::Closed { .. }), "{err:?}");
            assert!(matches!(
                stream.next(Duration::ZERO),
                Err(SourceError::Broken { .. })
            ));
            assert!(!conn.is_usable());
            drop(conn);
            server.join().expect("server thread");
        }
    }

    #[test]
    fn hostile_payloads_are_protocol_errors() {
        let cases: Vec<Vec<u8>> = vec![
            frame(b'd', b""),
            frame(b'd', b"x"),
            frame(b'd', b"w\0\0\0\0\0\0\0\x01\0\0"),
            frame(b'd', b"k\0\0\0\0\0\0\0\x01\0\0\0\0\0\0\0\x02"),
            frame(b'd', b"k\0\0\0\0\0\0\0\x01\0\0\0\0\0\0\0\x02\x01\x00"),
            frame(b'D', &[0, 0]),
            frame(b'c', b""),
            vec![b'd', 0x7f, 0xff, 0xff, 0xff],
        ];
        for reply in cases {
            let shown = format!("{reply:?}");
            let (info, server) = fake_server(move |mut s| {
                start_streaming(&mut s);
                s.write_all(&reply).unwrap();
                wait_for_close(&mut s);
            });
            let checks = Arc::new(AtomicUsize::new(0));
            let mut conn =
                Connection::connect(&info, replication_options(&checks)).expect("connect");
            let mut stream = start(&mut conn);
            let err = stream.next(Duration::from_secs(5)).expect_err(&shown);
            assert!(matches!(err, SourceError::Protocol(_)), "{shown}: {err:?}");
            assert!(!conn.is_usable());
            drop(conn);
            server.join().expect("server thread");
        }
    }

    #[test]
    fn errors_before_streaming_leave_the_connection_usable() {
        let (info, server) = fake_server(|mut s| {
            read_startup(&mut s);
            s.write_all(&ready_sequence()).unwrap();
            let _ = read_msg(&mut s);
            let mut out = frame(
                b'E',
                &error_body(&[
                    (b'V', "ERROR"),
                    (b'C', "42704"),
                    (b'M', "replication slot \"s1\" does not exist"),
                ]),
            );
            out.extend(frame(b'Z', b"I"));
            s.write_all(&out).unwrap();
            answer_select_one(&mut s);
            wait_for_close(&mut s);
        });
        let checks = Arc::new(AtomicUsize::new(0));
        let mut conn = Connection::connect(&info, replication_options(&checks)).expect("connect");
        let err = conn
            .start_logical_replication("s1", Lsn(0x10), "pub", 2, true)
            .expect_err("no slot");
        assert_eq!(err.sqlstate(), "42704");
        // Refused before sending: nothing reaches the server.
        let err = conn
            .start_logical_replication("s1", Lsn::INVALID, "pub", 1, true)
            .expect_err("streaming needs 2");
        assert!(matches!(err, SourceError::Unsupported(_)), "{err:?}");
        let err = conn
            .start_logical_replication("S 1", Lsn::INVALID, "pub", 1, false)
            .expect_err("bad slot");
        assert!(matches!(err, SourceError::InvalidName { .. }), "{err:?}");
        assert!(conn.is_usable());
        let rows = conn.simple_query("SELECT 1 AS one").expect("usable");
        assert_eq!(rows.len(), 1);
        drop(conn);
        server.join().expect("server thread");
    }

    #[test]
    fn finish_after_a_server_error_keeps_the_connection() {
        let (info, server) = fake_server(|mut s| {
            start_streaming(&mut s);
            let (tag, _) = read_msg(&mut s);
            assert_eq!(tag, b'c');
            let mut out = frame(
                b'E',
                &error_body(&[
                    (b'V', "ERROR"),
                    (b'C', "55000"),
                    (b'M', "cannot read from logical replication slot"),
                ]),
            );
            out.extend(frame(b'Z', b"I"));
            s.write_all(&out).unwrap();
            answer_select_one(&mut s);
            wait_for_close(&mut s);
        });
        let checks = Arc::new(AtomicUsize::new(0));
        let mut conn = Connection::connect(&info, replication_options(&checks)).expect("connect");
        let stream = start(&mut conn);
        let err = stream.finish().expect_err("server error");
        assert_eq!(err.sqlstate(), "55000");
        assert!(conn.is_usable());
        assert_eq!(
            conn.simple_query("SELECT 1 AS one").map(|r| r.len()).ok(),
            Some(1)
        );
        drop(conn);
        server.join().expect("server thread");
    }

    #[test]
    fn dropping_the_stream_breaks_the_connection() {
        let (info, server) = fake_server(|mut s| {
            start_streaming(&mut s);
            wait_for_close(&mut s);
        });
        let checks = Arc::new(AtomicUsize::new(0));
        let mut conn = Connection::connect(&info, replication_options(&checks)).expect("connect");
        {
            let _stream = start(&mut conn);
        }
        assert!(matches!(
            conn.simple_query("SELECT 1"),
            Err(SourceError::Broken { .. })
        ));
        drop(conn);
        server.join().expect("server thread");
    }

    #[test]
    fn many_messages_in_large_reads() {
        // 20k messages written in odd-sized chunks, 1.5 MiB XLogData in the middle.
        let big: Vec<u8> = (0..1_572_864u32).map(|i| (i % 251) as u8).collect();
        let expected_big = big.clone();
        let (info, server) = fake_server(move |mut s| {
            start_streaming(&mut s);
            let mut out = Vec::new();
            for i in 0..20_000u64 {
                if i == 10_000 {
                    out.extend(xlog_data(i, i, &big));
                }
                out.extend(xlog_data(i, i + 1, &insert(&i.to_string())));
            }
            let mut step = 1usize;
            let mut rest = out.as_slice();
            while !rest.is_empty() {
                step = (step * 7 + 3) % 70_001 + 1;
                let (piece, more) = rest.split_at(step.min(rest.len()));
                s.write_all(piece).unwrap();
                rest = more;
            }
            wait_for_close(&mut s);
        });
        let checks = Arc::new(AtomicUsize::new(0));
        let mut conn = Connection::connect(&info, replication_options(&checks)).expect("connect");
        let mut stream = start(&mut conn);
        checks.store(0, Ordering::Relaxed);
        for i in 0..20_001u64 {
            let ReplicationMessage::XLogData {
                data, wal_start, ..
            } = next_some(&mut stream)
            else {
                panic!("not XLogData");
            };
            if data.len() > 1_000_000 {
                assert!(data == expected_big);
                continue;
            }
            let n = if i > 10_000 { i - 1 } else { i };
            assert_eq!(wal_start, Lsn(n));
            assert!(pgoutput::decode(&data, false).is_ok());
        }
        let ran = checks.load(Ordering::Relaxed);
        assert!(ran < 50, "{ran} interrupt checks: not one per message");
        drop(conn);
        server.join().expect("server thread");
    }

    fn command(options: &PgOutputOptions, version: i32) -> Result<String, SourceError> {
        start_replication_command("cloudmig_1", Lsn(0x16_B374_D848), options, version)
    }

    #[test]
    fn start_command_syntax_and_quoting() {
        let mut o = PgOutputOptions::new("pub");
        assert_eq!(
            command(&o, 150020).ok().as_deref(),
            Some(
                "START_REPLICATION SLOT cloudmig_1 LOGICAL 16/B374D848 (\"proto_version\" '1', \
                 \"publication_names\" '\"pub\"')"
            )
        );
        o.proto_version = 2;
        o.streaming = true;
        o.messages = true;
        o.binary = true;
        o.publications = vec!["My Pub".into(), "it's \"x\"".into(), "a\\b,c".into()];
        assert_eq!(
            command(&o, 140000).ok().as_deref(),
            Some(
                "START_REPLICATION SLOT cloudmig_1 LOGICAL 16/B374D848 (\"proto_version\" '2', \
                 \"publication_names\" '\"My Pub\",\"it''s \"\"x\"\"\",\"a\\b,c\"', \
                 \"streaming\" 'on', \"messages\" 'true', \"binary\" 'true')"
            )
        );
        assert!(
            start_replication_command("s", Lsn::INVALID, &PgOutputOptions::new("p"), 150000)
                .is_ok_and(|c| c.contains(" LOGICAL 0/0 ("))
        );
    }

    #[test]
    fn start_command_refusals() {
        let base = PgOutputOptions::new("pub");
        let unsupported =
            |o: &PgOutputOptions, v: i32| matches!(command(o, v), Err(SourceError::Unsupported(_)));
        assert!(unsupported(&base, 90624));
        assert!(command(&base, 100000).is_ok());
        for v in [0, 3, 4] {
            let o = PgOutputOptions {
                proto_version: v,
                ..base.clone()
            };
            assert!(unsupported(&o, 170000), "version {v}");
        }
        let v2 = PgOutputOptions {
            proto_version: 2,
            ..base.clone()
        };
        assert!(unsupported(&v2, 130000));
        assert!(command(&v2, 140000).is_ok());
        let streaming_v1 = PgOutputOptions {
            streaming: true,
            ..base.clone()
        };
        assert!(unsupported(&streaming_v1, 150000));
        for o in [
            PgOutputOptions {
                messages: true,
                ..base.clone()
            },
            PgOutputOptions {
                binary: true,
                ..base.clone()
            },
        ] {
            assert!(unsupported(&o, 130000));
            assert!(command(&o, 140000).is_ok());
        }
        let none = PgOutputOptions {
            publications: vec![],
            ..base.clone()
        };
        assert!(unsupported(&none, 150000));
        for bad in ["", "nul\0", &"p".repeat(64)] {
            let o = PgOutputOptions::new(bad);
            assert!(
                matches!(
                    command(&o, 150000),
                    Err(SourceError::InvalidName {
                        what: "publication",
                        ..
                    })
                ),
                "{bad:?}"
            );
        }
        assert!(command(&PgOutputOptions::new(&"p".repeat(63)), 150000).is_ok());
        let bad_slot = start_replication_command("Bad;Slot", Lsn::INVALID, &base, 150000).err();
        assert!(matches!(bad_slot, Some(SourceError::InvalidName { .. })));
    }

    #[test]
    fn status_update_layout() {
        let buf = status_update(Lsn(3), Lsn(2), Lsn(1), -5, false);
        let mut expected = vec![b'd', 0, 0, 0, 38, b'r'];
        for v in [3u64, 2, 1, (-5i64) as u64] {
            expected.extend_from_slice(&v.to_be_bytes());
        }
        expected.push(0);
        assert_eq!(&buf[..], &expected[..]);
    }

    #[test]
    fn postgres_epoch() {
        let epoch = UNIX_EPOCH + Duration::from_secs(POSTGRES_EPOCH_UNIX_SECS);
        assert_eq!(postgres_epoch_micros(epoch), 0);
        assert_eq!(postgres_epoch_micros(epoch + Duration::from_micros(5)), 5);
        assert_eq!(postgres_epoch_micros(UNIX_EPOCH), -946_684_800_000_000);
    }

    #[test]
    fn copy_data_payloads() {
        let parsed = parse_copy_data(Bytes::from(xlog_data(1, 2, b"")[5..].to_vec()));
        assert!(
            matches!(&parsed, Ok(ReplicationMessage::XLogData { data, .. }) if data.is_empty()),
            "{parsed:?}"
        );
        let ka = parse_copy_data(Bytes::from(keepalive(9, true)[5..].to_vec()));
        assert!(matches!(
            ka,
            Ok(ReplicationMessage::Keepalive {
                wal_end: Lsn(9),
                reply_requested: true,
                ..
            })
        ));
        let full = xlog_data(1, 2, b"")[5..].to_vec();
        for cut in 0..full.len() {
            assert!(parse_copy_data(Bytes::copy_from_slice(&full[..cut])).is_err());
        }
        let full = keepalive(1, false)[5..].to_vec();
        for cut in 0..full.len() {
            assert!(parse_copy_data(Bytes::copy_from_slice(&full[..cut])).is_err());
        }
    }
}
