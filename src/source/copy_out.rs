//! Streaming the data of a `COPY ... TO STDOUT` off the source: [`Connection::copy_out`] and
//! the [`CopyOut`] reader it returns.
//!
//! States of a `CopyOut`, after the server's `CopyOutResponse`:
//!
//! ```text
//!   Streaming --CopyData--> Streaming (a chunk for the caller)
//!   Streaming --CopyDone, CommandComplete--> Streaming (rows known)
//!   Streaming --ReadyForQuery--> Ended (next_chunk gives None; connection ready)
//!   Streaming --ErrorResponse ... ReadyForQuery--> Failed (Server error; connection ready)
//!   Streaming --a second statement's replies ... ReadyForQuery--> Failed (Unsupported; ready)
//!   Streaming --I/O error, timeout, bad bytes, unwinding--> Failed (connection Broken)
//! ```
//!
//! Interrupts: while the data flows the caller's check runs about every 100 ms (not per
//! message); while waiting for the server, at least every 100 ms.
//!
//! Dropping a `CopyOut` before `next_chunk` returned `None` leaves the connection
//! [`SourceError::Broken`]: draining could mean reading gigabytes inside `Drop`, possibly while
//! unwinding. Call [`CopyOut::finish`] to discard the rest and keep the connection.
//!
//! Throughput: reads go straight into a buffer with [`COPY_READ_ROOM`] of free space and each
//! `CopyData` payload is a slice of it ([`Bytes`]), so payload bytes are never copied here. A
//! payload keeps its whole read buffer allocated until every slice of it is dropped.

use bytes::Bytes;

use crate::source::connection::{message_name, Budget, Connection};
use crate::source::error::SourceError;
use crate::source::protocol::{self, BackendMessage};

/// Free buffer space made before each read of COPY data.
pub const COPY_READ_ROOM: usize = 256 * 1024;

/// Where a [`CopyOut`] is in its exchange.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Reading the server's messages.
    Streaming,
    /// `ReadyForQuery` arrived after a successful COPY.
    Ended,
    /// An error was returned; see the state diagram for the connection's state.
    Failed,
}

/// A `COPY ... TO STDOUT` in progress on a borrowed [`Connection`]; see the module docs for
/// its states and for what dropping it early does.
pub struct CopyOut<'c> {
    conn: &'c mut Connection,
    budget: Budget,
    state: State,
    copy_done: bool,
    complete: bool,
    rows: Option<u64>,
    bytes: u64,
}

impl std::fmt::Debug for CopyOut<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CopyOut")
            .field("target", &self.conn.target())
            .field("state", &self.state)
            .field("rows", &self.rows)
            .field("bytes", &self.bytes)
            .finish_non_exhaustive()
    }
}

impl Connection {
    /// Runs `sql` (a `COPY ... TO STDOUT`) and returns a reader of its data.
    ///
    /// A server error before the data starts (no such table, permission denied) comes back
    /// as [`SourceError::Server`] with the connection usable; so does a query that is not a
    /// single `COPY ... TO STDOUT`, as [`SourceError::Unsupported`], after its replies were
    /// read and discarded. Each wait for the server is bounded by the I/O timeout, measured
    /// from the last bytes received: raise it with [`Connection::set_io_timeout`] for a
    /// `COPY (query)` that is slow to produce its first row.
    pub fn copy_out(&mut self, sql: &str) -> Result<CopyOut<'_>, SourceError> {
        let budget = Budget::idle("query", self.io_timeout());
        self.start_query(sql, budget)?;
        let not_copy = |what: &str| {
            SourceError::Unsupported(format!(
                "copy_out runs a COPY ... TO STDOUT, but the query {what}"
            ))
        };
        loop {
            let msg = self.read_message(budget)?;
            let Some(msg) = self.absorb_async(msg) else {
                continue;
            };
            match msg {
                BackendMessage::CopyOutResponse => {
                    return Ok(CopyOut {
                        conn: self,
                        budget,
                        state: State::Streaming,
                        copy_done: false,
                        complete: false,
                        rows: None,
                        bytes: 0,
                    })
                }
                BackendMessage::ErrorResponse(e) => {
                    if e.severity == "FATAL" || e.severity == "PANIC" {
                        return Err(SourceError::Server(Box::new(e)));
                    }
                    self.drain_to_ready(budget)?;
                    return Err(SourceError::Server(Box::new(e)));
                }
                BackendMessage::ReadyForQuery { status } => {
                    self.finish_request(status);
                    return Err(not_copy("returned no result"));
                }
                BackendMessage::CopyInResponse => {
                    // The server then answers with an error we expect and discard.
                    self.fail_copy_in(budget)?;
                    self.drain_to_ready(budget)?;
                    return Err(not_copy("is a COPY FROM STDIN"));
                }
                BackendMessage::CopyBothResponse => {
                    return Err(SourceError::Protocol(
                        "copy_out got CopyBothResponse (START_REPLICATION?), which cannot be \
                         stopped"
                            .into(),
                    ))
                }
                BackendMessage::RowDescription { .. }
                | BackendMessage::DataRow { .. }
                | BackendMessage::CommandComplete { .. }
                | BackendMessage::EmptyQueryResponse => {
                    let what = if matches!(msg, BackendMessage::EmptyQueryResponse) {
                        "is empty"
                    } else {
                        "returned something else"
                    };
                    if let Some(e) = self.drain_to_ready(budget)? {
                        return Err(SourceError::Server(Box::new(e)));
                    }
                    return Err(not_copy(what));
                }
                other => {
                    return Err(SourceError::Protocol(format!(
                        "unexpected {} in reply to a COPY",
                        message_name(&other)
                    )))
                }
            }
        }
    }
}

impl CopyOut<'_> {
    /// The next CopyData payload, or None once CopyDone and CommandComplete arrived and the
    /// connection is ready for the next query (ReadyForQuery consumed).
    ///
    /// A payload is whatever the server put in one `CopyData` message: one row in text, CSV
    /// or binary format (the binary header rides on the first row, the trailer alone).
    /// An `ErrorResponse` mid-copy becomes [`SourceError::Server`] once the server is ready
    /// again, leaving the connection usable; any other failure leaves it broken. After an
    /// error this keeps returning an error.
    pub fn next_chunk(&mut self) -> Result<Option<Bytes>, SourceError> {
        match self.state {
            State::Streaming => {}
            State::Ended => return Ok(None),
            State::Failed => {
                return Err(if self.conn.is_usable() {
                    SourceError::Protocol("this COPY already failed".into())
                } else {
                    SourceError::Broken {
                        target: self.conn.target().to_owned(),
                    }
                })
            }
        }
        let result = self.step();
        match &result {
            Ok(Some(_)) => {}
            Ok(None) => self.state = State::Ended,
            Err(_) => self.state = State::Failed,
        }
        result
    }

    fn step(&mut self) -> Result<Option<Bytes>, SourceError> {
        loop {
            let (tag, body) = self.conn.next_frame(self.budget, COPY_READ_ROOM)?;
            // The hot path: no parsing, no copy.
            if tag == b'd' {
                if self.copy_done {
                    return Err(SourceError::Protocol("CopyData after CopyDone".into()));
                }
                self.bytes = self.bytes.saturating_add(body.len() as u64);
                return Ok(Some(body));
            }
            let msg = protocol::parse_message(tag, body)?;
            let Some(msg) = self.conn.absorb_async(msg) else {
                continue;
            };
            match msg {
                BackendMessage::CopyDone if !self.copy_done => self.copy_done = true,
                BackendMessage::CommandComplete { tag } if self.copy_done && !self.complete => {
                    self.rows = parse_copy_tag(&tag)?;
                    self.complete = true;
                }
                BackendMessage::ReadyForQuery { status } => {
                    // The server is ready whatever came before: we are in step again.
                    self.conn.finish_request(status);
                    if !self.complete {
                        return Err(SourceError::Protocol(
                            "COPY ended without CopyDone and CommandComplete".into(),
                        ));
                    }
                    return Ok(None);
                }
                BackendMessage::ErrorResponse(e) => {
                    if e.severity == "FATAL" || e.severity == "PANIC" {
                        return Err(SourceError::Server(Box::new(e)));
                    }
                    self.conn.drain_to_ready(self.budget)?;
                    return Err(SourceError::Server(Box::new(e)));
                }
                // A second statement after the COPY ("COPY ...; SELECT ..."): its replies are
                // well-formed, so discard them and stay in step.
                BackendMessage::RowDescription { .. }
                | BackendMessage::CommandComplete { .. }
                | BackendMessage::EmptyQueryResponse
                | BackendMessage::CopyOutResponse
                | BackendMessage::CopyInResponse
                    if self.complete =>
                {
                    if matches!(msg, BackendMessage::CopyInResponse) {
                        self.conn.fail_copy_in(self.budget)?;
                    }
                    let error = self.conn.drain_to_ready(self.budget)?;
                    return Err(match error {
                        Some(e) => SourceError::Server(Box::new(e)),
                        None => SourceError::Unsupported(
                            "copy_out runs a single COPY statement, but the query had more".into(),
                        ),
                    });
                }
                other => {
                    return Err(SourceError::Protocol(format!(
                        "unexpected {} during COPY TO STDOUT",
                        message_name(&other)
                    )))
                }
            }
        }
    }

    /// Rows reported by CommandComplete ("COPY n"), known after the end.
    pub fn rows(&self) -> Option<u64> {
        self.rows
    }

    /// Payload bytes received so far.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Reads and discards the rest of the data, leaving the connection ready for the next
    /// query, and returns the row count. For a caller that stops early but keeps the
    /// connection; it reads (and waits for) everything the server still sends.
    pub fn finish(mut self) -> Result<Option<u64>, SourceError> {
        while self.next_chunk()?.is_some() {}
        Ok(self.rows)
    }
}

/// The row count of a `COPY n` command tag; `None` for a bare `COPY` (servers before 8.2).
fn parse_copy_tag(tag: &str) -> Result<Option<u64>, SourceError> {
    let bad = || SourceError::Protocol(format!("unexpected command tag \"{tag}\" after COPY"));
    let rest = tag.strip_prefix("COPY").ok_or_else(bad)?;
    if rest.is_empty() {
        return Ok(None);
    }
    let count = rest.strip_prefix(' ').ok_or_else(bad)?;
    count.parse().map(Some).map_err(|_| bad())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::connection::tests::{
        counting_options, data_row, fake_server, read_msg, read_startup, ready_sequence,
        row_description,
    };
    use crate::source::connection::ConnectOptions;
    use crate::source::protocol::tests::{error_body, frame};
    use std::io::{Read, Write};
    use std::net::TcpStream;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::time::Duration;

    /// `CopyOutResponse` for text format with `columns` columns.
    fn copy_out_response(columns: u16) -> Vec<u8> {
        let mut body = vec![0];
        body.extend_from_slice(&columns.to_be_bytes());
        for _ in 0..columns {
            body.extend_from_slice(&[0, 0]);
        }
        frame(b'H', &body)
    }

    fn copy_data(payload: &[u8]) -> Vec<u8> {
        frame(b'd', payload)
    }

    fn copy_end(tag: &str) -> Vec<u8> {
        let mut out = frame(b'c', b"");
        out.extend(frame(b'C', format!("{tag}\0").as_bytes()));
        out.extend(frame(b'Z', b"I"));
        out
    }

    fn server_error(code: &str, message: &str) -> Vec<u8> {
        frame(
            b'E',
            &error_body(&[(b'V', "ERROR"), (b'C', code), (b'M', message)]),
        )
    }

    /// Answers `SELECT 1` with one row, proving the connection is in step.
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

    fn assert_usable(conn: &mut Connection) {
        assert!(conn.is_usable());
        let rows = conn.simple_query("SELECT 1 AS one").expect("usable");
        assert_eq!(rows.first().and_then(|r| r.get("one")), Some("1"));
    }

    fn collect(copy: &mut CopyOut<'_>) -> Result<Vec<Vec<u8>>, SourceError> {
        let mut chunks = Vec::new();
        while let Some(chunk) = copy.next_chunk()? {
            chunks.push(chunk.to_vec());
        }
        Ok(chunks)
    }

    #[test]
    fn several_chunks_then_ready() {
        let (info, server) = fake_server(|mut s| {
            read_startup(&mut s);
            s.write_all(&ready_sequence()).unwrap();
            let (tag, body) = read_msg(&mut s);
            assert_eq!((tag, body.as_slice()), (b'Q', &b"COPY t TO STDOUT\0"[..]));
            let mut out = copy_out_response(2);
            out.extend(copy_data(b"1\ta\n"));
            out.extend(frame(
                b'N',
                &error_body(&[(b'V', "NOTICE"), (b'C', "00000"), (b'M', "mid-copy")]),
            ));
            out.extend(copy_data(b"2\tb\n"));
            out.extend(frame(b'S', b"application_name\0x\0"));
            out.extend(copy_data(b""));
            out.extend(copy_data(b"3\t\\N\n"));
            out.extend(copy_end("COPY 4"));
            s.write_all(&out).unwrap();
            answer_select_one(&mut s);
            wait_for_close(&mut s);
        });
        let mut conn = Connection::connect(&info, ConnectOptions::new()).expect("connect");
        let mut copy = conn.copy_out("COPY t TO STDOUT").expect("copy starts");
        assert_eq!(copy.rows(), None, "unknown until the end");
        let chunks = collect(&mut copy).expect("copy");
        assert_eq!(
            chunks,
            [&b"1\ta\n"[..], b"2\tb\n", b"", b"3\t\\N\n"].map(<[u8]>::to_vec)
        );
        assert_eq!(copy.rows(), Some(4));
        assert_eq!(copy.bytes(), 4 + 4 + 5);
        assert_eq!(copy.next_chunk().ok(), Some(None), "stays ended");
        assert_eq!(
            conn.notices()
                .map(|n| n.message.as_str())
                .collect::<Vec<_>>(),
            ["mid-copy"]
        );
        assert_eq!(conn.parameter("application_name"), Some("x"));
        assert_usable(&mut conn);
        drop(conn);
        server.join().expect("server thread");
    }

    #[test]
    fn chunk_boundaries_and_large_messages() {
        // 1.5 MiB payload (bigger than the read room), many small ones, all written in
        // awkward pieces: one byte at a time at first, then odd-sized slices.
        let big: Vec<u8> = (0..1_572_864u32).map(|i| (i % 251) as u8).collect();
        let mut payloads: Vec<Vec<u8>> = vec![b"first\n".to_vec(), big];
        payloads.extend((0..5000u32).map(|i| format!("{i}\trow {i}\n").into_bytes()));
        let expected = payloads.clone();
        let (info, server) = fake_server(move |mut s| {
            s.set_nodelay(true).unwrap();
            read_startup(&mut s);
            s.write_all(&ready_sequence()).unwrap();
            let _ = read_msg(&mut s);
            let mut out = copy_out_response(1);
            for p in &payloads {
                out.extend(copy_data(p));
            }
            out.extend(copy_end("COPY 5002"));
            let (head, tail) = out.split_at(64);
            for b in head {
                s.write_all(&[*b]).unwrap();
                std::thread::sleep(Duration::from_millis(1));
            }
            let mut step = 1usize;
            let mut rest = tail;
            while !rest.is_empty() {
                step = (step * 7 + 3) % 70_001 + 1;
                let (piece, more) = rest.split_at(step.min(rest.len()));
                s.write_all(piece).unwrap();
                rest = more;
            }
            answer_select_one(&mut s);
            wait_for_close(&mut s);
        });
        let checks = Arc::new(AtomicUsize::new(0));
        let mut conn = Connection::connect(&info, counting_options(&checks)).expect("connect");
        checks.store(0, Ordering::Relaxed);
        let mut copy = conn.copy_out("COPY t TO STDOUT").expect("copy starts");
        let chunks = collect(&mut copy).expect("copy");
        assert_eq!(chunks.len(), expected.len());
        assert!(chunks == expected, "payloads differ");
        assert_eq!(copy.rows(), Some(5002));
        let total: usize = expected.iter().map(Vec::len).sum();
        assert_eq!(copy.bytes(), total as u64);
        // Checks run before waits and every 100 ms, never once per message.
        let ran = checks.load(Ordering::Relaxed);
        assert!(ran > 0 && ran < 50, "{ran} interrupt checks");
        assert_usable(&mut conn);
        drop(conn);
        server.join().expect("server thread");
    }

    #[test]
    fn error_mid_copy_leaves_connection_usable() {
        let (info, server) = fake_server(|mut s| {
            read_startup(&mut s);
            s.write_all(&ready_sequence()).unwrap();
            let _ = read_msg(&mut s);
            let mut out = copy_out_response(1);
            out.extend(copy_data(b"1\n"));
            out.extend(server_error(
                "57014",
                "canceling statement due to user request",
            ));
            out.extend(frame(b'Z', b"I"));
            s.write_all(&out).unwrap();
            answer_select_one(&mut s);
            wait_for_close(&mut s);
        });
        let mut conn = Connection::connect(&info, ConnectOptions::new()).expect("connect");
        let mut copy = conn.copy_out("COPY t TO STDOUT").expect("copy starts");
        assert_eq!(
            copy.next_chunk().ok().flatten().as_deref(),
            Some(&b"1\n"[..])
        );
        let err = copy.next_chunk().expect_err("server error");
        assert!(
            matches!(&err, SourceError::Server(e) if e.code == "57014"),
            "{err:?}"
        );
        assert!(!err.is_fatal());
        assert!(copy.next_chunk().is_err(), "keeps failing");
        assert_eq!(copy.rows(), None);
        assert_usable(&mut conn);
        drop(conn);
        server.join().expect("server thread");
    }

    #[test]
    fn queries_that_are_not_copy_to_stdout() {
        let (info, server) = fake_server(|mut s| {
            read_startup(&mut s);
            s.write_all(&ready_sequence()).unwrap();
            // 1: a SELECT.
            let _ = read_msg(&mut s);
            let mut out = row_description(&["a"]);
            out.extend(data_row(&[Some("1")]));
            out.extend(frame(b'C', b"SELECT 1\0"));
            out.extend(frame(b'Z', b"I"));
            s.write_all(&out).unwrap();
            // 2: an empty query.
            let _ = read_msg(&mut s);
            let mut out = frame(b'I', b"");
            out.extend(frame(b'Z', b"I"));
            s.write_all(&out).unwrap();
            // 3: an error before any data.
            let _ = read_msg(&mut s);
            let mut out = server_error("42P01", "relation \"t\" does not exist");
            out.extend(frame(b'Z', b"I"));
            s.write_all(&out).unwrap();
            // 4: COPY FROM STDIN: the client must fail it.
            let _ = read_msg(&mut s);
            s.write_all(&frame(b'G', &[0, 0, 0])).unwrap();
            let (tag, _) = read_msg(&mut s);
            assert_eq!(tag, b'f', "CopyFail");
            let mut out = server_error("57014", "COPY from stdin failed");
            out.extend(frame(b'Z', b"I"));
            s.write_all(&out).unwrap();
            answer_select_one(&mut s);
            wait_for_close(&mut s);
        });
        let mut conn = Connection::connect(&info, ConnectOptions::new()).expect("connect");
        for sql in ["SELECT 1", ""] {
            let err = conn.copy_out(sql).err();
            assert!(
                matches!(&err, Some(SourceError::Unsupported(m)) if m.contains("COPY ... TO STDOUT")),
                "{sql:?}: {err:?}"
            );
            assert!(conn.is_usable());
        }
        let err = conn.copy_out("COPY t TO STDOUT").err();
        assert!(
            matches!(&err, Some(SourceError::Server(e)) if e.code == "42P01"),
            "{err:?}"
        );
        assert!(conn.is_usable());
        let err = conn.copy_out("COPY t FROM STDIN").err();
        assert!(matches!(&err, Some(SourceError::Unsupported(_))), "{err:?}");
        assert_usable(&mut conn);
        drop(conn);
        server.join().expect("server thread");
    }

    #[test]
    fn a_second_statement_is_discarded() {
        let (info, server) = fake_server(|mut s| {
            read_startup(&mut s);
            s.write_all(&ready_sequence()).unwrap();
            let _ = read_msg(&mut s);
            let mut out = copy_out_response(1);
            out.extend(copy_data(b"1\n"));
            out.extend(frame(b'c', b""));
            out.extend(frame(b'C', b"COPY 1\0"));
            out.extend(row_description(&["two"]));
            out.extend(data_row(&[Some("2")]));
            out.extend(frame(b'C', b"SELECT 1\0"));
            out.extend(frame(b'Z', b"I"));
            s.write_all(&out).unwrap();
            answer_select_one(&mut s);
            wait_for_close(&mut s);
        });
        let mut conn = Connection::connect(&info, ConnectOptions::new()).expect("connect");
        let mut copy = conn
            .copy_out("COPY t TO STDOUT; SELECT 2")
            .expect("copy starts");
        let err = collect(&mut copy).expect_err("two statements");
        assert!(
            matches!(&err, SourceError::Unsupported(m) if m.contains("single")),
            "{err:?}"
        );
        assert_usable(&mut conn);
        drop(conn);
        server.join().expect("server thread");
    }

    #[test]
    fn simple_query_still_refuses_copy() {
        let (info, server) = fake_server(|mut s| {
            read_startup(&mut s);
            s.write_all(&ready_sequence()).unwrap();
            let _ = read_msg(&mut s);
            let mut out = copy_out_response(1);
            out.extend(copy_data(b"1\n"));
            out.extend(copy_end("COPY 1"));
            s.write_all(&out).unwrap();
            answer_select_one(&mut s);
            wait_for_close(&mut s);
        });
        let mut conn = Connection::connect(&info, ConnectOptions::new()).expect("connect");
        let err = conn.simple_query("COPY t TO STDOUT").err();
        assert!(matches!(err, Some(SourceError::Protocol(_))), "{err:?}");
        assert_usable(&mut conn);
        drop(conn);
        server.join().expect("server thread");
    }

    #[test]
    fn early_drop_breaks_and_finish_drains() {
        let (info, server) = fake_server(|mut s| {
            read_startup(&mut s);
            s.write_all(&ready_sequence()).unwrap();
            for _ in 0..2 {
                let _ = read_msg(&mut s);
                let mut out = copy_out_response(1);
                for i in 0..100 {
                    out.extend(copy_data(format!("{i}\n").as_bytes()));
                }
                out.extend(copy_end("COPY 100"));
                s.write_all(&out).unwrap();
            }
            wait_for_close(&mut s);
        });
        let mut conn = Connection::connect(&info, ConnectOptions::new()).expect("connect");
        let mut copy = conn.copy_out("COPY t TO STDOUT").expect("copy starts");
        assert!(copy.next_chunk().is_ok_and(|c| c.is_some()));
        assert_eq!(copy.finish().ok(), Some(Some(100)));
        assert!(conn.is_usable(), "finish drains");
        let mut copy = conn.copy_out("COPY t TO STDOUT").expect("copy starts");
        assert!(copy.next_chunk().is_ok_and(|c| c.is_some()));
        assert!(!conn.is_usable());
        let err = conn.simple_query("SELECT 1").err();
        assert!(matches!(err, Some(SourceError::Broken { .. })), "{err:?}");
        drop(conn);
        server.join().expect("server thread");
    }

    #[test]
    fn truncated_and_out_of_order_messages_break_the_connection() {
        let cases: Vec<(&str, Vec<u8>, bool)> = vec![
            // A CopyData announcing 100 bytes, then the server goes away.
            (
                "truncated data",
                {
                    let mut out = copy_out_response(1);
                    out.extend_from_slice(&[b'd', 0, 0, 0, 104, b'x', b'y']);
                    out
                },
                true,
            ),
            // CommandComplete without its terminating NUL.
            (
                "unterminated tag",
                {
                    let mut out = copy_out_response(1);
                    out.extend(frame(b'c', b""));
                    out.extend(frame(b'C', b"COPY 1"));
                    out
                },
                false,
            ),
            (
                "bad row count",
                {
                    let mut out = copy_out_response(1);
                    out.extend(copy_end("COPY x"));
                    out
                },
                false,
            ),
            (
                "data after CopyDone",
                {
                    let mut out = copy_out_response(1);
                    out.extend(frame(b'c', b""));
                    out.extend(copy_data(b"late"));
                    out
                },
                false,
            ),
            (
                "CommandComplete before CopyDone",
                {
                    let mut out = copy_out_response(1);
                    out.extend(frame(b'C', b"COPY 0\0"));
                    out
                },
                false,
            ),
            (
                "a DataRow mid-copy",
                {
                    let mut out = copy_out_response(1);
                    out.extend(data_row(&[Some("1")]));
                    out
                },
                false,
            ),
            (
                "oversized length",
                {
                    let mut out = copy_out_response(1);
                    out.extend_from_slice(&[b'd', 0x7f, 0xff, 0xff, 0xff]);
                    out
                },
                false,
            ),
        ];
        for (name, reply, closes) in cases {
            let (info, server) = fake_server(move |mut s| {
                read_startup(&mut s);
                s.write_all(&ready_sequence()).unwrap();
                let _ = read_msg(&mut s);
                s.write_all(&reply).unwrap();
                if !closes {
                    wait_for_close(&mut s);
                }
            });
            let mut conn = Connection::connect(&info, ConnectOptions::new()).expect("connect");
            let mut copy = conn.copy_out("COPY t TO STDOUT").expect("copy starts");
            let err = collect(&mut copy).expect_err(name);
            if closes {
                assert!(matches!(err, SourceError::Closed { .. }), "{name}: {err:?}");
            } else {
                assert!(matches!(err, SourceError::Protocol(_)), "{name}: {err:?}");
            }
            assert!(
                matches!(copy.next_chunk(), Err(SourceError::Broken { .. })),
                "{name}"
            );
            assert!(!conn.is_usable(), "{name}");
            drop(conn);
            server.join().expect("server thread");
        }
    }

    #[test]
    fn copy_timeout_and_interrupts() {
        let (info, server) = fake_server(|mut s| {
            read_startup(&mut s);
            s.write_all(&ready_sequence()).unwrap();
            let _ = read_msg(&mut s);
            let mut out = copy_out_response(1);
            out.extend(copy_data(b"1\n"));
            s.write_all(&out).unwrap();
            wait_for_close(&mut s);
        });
        let checks = Arc::new(AtomicUsize::new(0));
        let mut opts = counting_options(&checks);
        opts.io_timeout = Duration::from_millis(500);
        let mut conn = Connection::connect(&info, opts).expect("connect");
        let mut copy = conn.copy_out("COPY t TO STDOUT").expect("copy starts");
        assert!(copy.next_chunk().is_ok_and(|c| c.is_some()));
        checks.store(0, Ordering::Relaxed);
        let err = copy.next_chunk().expect_err("stalls");
        assert!(
            matches!(err, SourceError::Timeout { phase: "query", .. }),
            "{err:?}"
        );
        assert!(checks.load(Ordering::Relaxed) >= 4, "checked while waiting");
        assert!(!conn.is_usable());
        drop(conn);
        server.join().expect("server thread");
    }

    #[test]
    fn copy_tags() {
        assert_eq!(parse_copy_tag("COPY 12").ok(), Some(Some(12)));
        assert_eq!(parse_copy_tag("COPY").ok(), Some(None));
        for bad in ["COPY12", "COPY -1", "SELECT 1", "COPY 1 2", ""] {
            assert!(parse_copy_tag(bad).is_err(), "{bad}");
        }
    }
}
