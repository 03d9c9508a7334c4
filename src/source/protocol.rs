//! Backend (server-to-client) messages of protocol 3.0: framing a byte buffer into messages and
//! parsing the ones this client uses into [`BackendMessage`]. Pure functions over bytes, no I/O.
//!
//! We parse backend messages ourselves rather than with `postgres_protocol::message::backend`
//! because that parser lacks `CopyBothResponse` (needed for replication) and its iterators need
//! the `fallible-iterator` crate; frontend messages and authentication still come from
//! `postgres-protocol`. Invariants: every length is bounds-checked, a message longer than
//! [`MAX_MESSAGE_LEN`] is refused before it is buffered, and no input makes this code panic.

use bytes::{Buf, Bytes, BytesMut};

use crate::source::error::{ServerError, SourceError};

/// Largest backend message we accept, header included (PostgreSQL itself caps a field at 1 GB).
pub(crate) const MAX_MESSAGE_LEN: usize = 1 << 30;

/// An authentication request (`R` message).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Auth {
    /// Authentication succeeded.
    Ok,
    /// Send the password in clear.
    CleartextPassword,
    /// Send `md5(md5(password || user) || salt)`.
    Md5Password { salt: [u8; 4] },
    /// Start SASL with one of these mechanisms.
    Sasl { mechanisms: Vec<String> },
    /// SASL server-first message.
    SaslContinue(Bytes),
    /// SASL server-final message.
    SaslFinal(Bytes),
    /// A method we do not implement, by name.
    Unsupported(&'static str),
}

/// A backend message, as much of it as this client needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum BackendMessage {
    Authentication(Auth),
    BackendKeyData { process_id: i32, secret_key: i32 },
    ParameterStatus { name: String, value: String },
    ReadyForQuery { status: u8 },
    RowDescription { columns: Vec<String> },
    DataRow { values: Vec<Option<String>> },
    CommandComplete { tag: String },
    EmptyQueryResponse,
    ErrorResponse(ServerError),
    NoticeResponse(ServerError),
    NotificationResponse,
    CopyInResponse,
    CopyOutResponse,
    CopyBothResponse,
    CopyData,
    CopyDone,
    NegotiateProtocolVersion,
}

fn malformed(what: &str) -> SourceError {
    SourceError::Protocol(format!("malformed {what} message"))
}

/// Takes one whole message off the front of `buf`, returning its tag and body, or `None` when
/// more bytes are needed. Errors on a length below 4 or above [`MAX_MESSAGE_LEN`].
pub(crate) fn split_frame(buf: &mut BytesMut) -> Result<Option<(u8, Bytes)>, SourceError> {
    let header = buf.get(1..5).and_then(|b| <[u8; 4]>::try_from(b).ok());
    let (Some(&tag), Some(len_bytes)) = (buf.first(), header) else {
        return Ok(None);
    };
    let len = u32::from_be_bytes(len_bytes);
    let len = usize::try_from(len).unwrap_or(usize::MAX);
    if len < 4 {
        return Err(SourceError::Protocol(format!(
            "message of type {} has invalid length {len}",
            tag_name(tag)
        )));
    }
    if len >= MAX_MESSAGE_LEN {
        return Err(SourceError::Protocol(format!(
            "message of type {} is too large ({len} bytes)",
            tag_name(tag)
        )));
    }
    if buf.len() < len + 1 {
        return Ok(None);
    }
    // One pointer bump and one split: the body shares the buffer's memory, no copy.
    buf.advance(5);
    let body = buf.split_to(len - 4).freeze();
    Ok(Some((tag, body)))
}

/// The total size (tag included) of the message at the front of `buf`, once its header is
/// buffered; lets a reader make room for a large message in one step.
pub(crate) fn frame_len(buf: &[u8]) -> Option<usize> {
    let header = buf.get(1..5).and_then(|b| <[u8; 4]>::try_from(b).ok())?;
    usize::try_from(u32::from_be_bytes(header))
        .ok()
        .filter(|&len| len < MAX_MESSAGE_LEN)
        .map(|len| len + 1)
}

/// Printable rendering of a message tag for error messages.
fn tag_name(tag: u8) -> String {
    if tag.is_ascii_graphic() {
        format!("\"{}\"", tag as char)
    } else {
        format!("0x{tag:02x}")
    }
}

/// Parses the body of a message with tag `tag`.
pub(crate) fn parse_message(tag: u8, body: Bytes) -> Result<BackendMessage, SourceError> {
    let mut r = Reader::new(&body);
    let msg = match tag {
        b'R' => return parse_auth(body.clone()),
        b'K' => {
            let process_id = r.i32("BackendKeyData")?;
            let secret_key = r.i32("BackendKeyData")?;
            r.finish("BackendKeyData")?;
            BackendMessage::BackendKeyData {
                process_id,
                secret_key,
            }
        }
        b'S' => {
            let name = r.string("ParameterStatus")?;
            let value = r.string("ParameterStatus")?;
            r.finish("ParameterStatus")?;
            BackendMessage::ParameterStatus { name, value }
        }
        b'Z' => {
            let status = r.u8("ReadyForQuery")?;
            r.finish("ReadyForQuery")?;
            if !matches!(status, b'I' | b'T' | b'E') {
                return Err(malformed("ReadyForQuery"));
            }
            BackendMessage::ReadyForQuery { status }
        }
        b'T' => {
            let count = r.count("RowDescription")?;
            // Each field takes at least 19 bytes; refuse counts the body cannot hold rather
            // than reserving memory for them.
            if count > r.remaining() / 19 {
                return Err(malformed("RowDescription"));
            }
            let mut columns = Vec::with_capacity(count);
            for _ in 0..count {
                columns.push(r.string("RowDescription")?);
                // table oid, column number, type oid, type size, type modifier, format code
                r.skip(18, "RowDescription")?;
            }
            r.finish("RowDescription")?;
            BackendMessage::RowDescription { columns }
        }
        b'D' => {
            let count = r.count("DataRow")?;
            if count > r.remaining() / 4 {
                return Err(malformed("DataRow"));
            }
            let mut values = Vec::with_capacity(count);
            for _ in 0..count {
                let len = r.i32("DataRow")?;
                if len == -1 {
                    values.push(None);
                } else {
                    let len = usize::try_from(len).map_err(|_| malformed("DataRow"))?;
                    let bytes = r.take(len, "DataRow")?;
                    let text = std::str::from_utf8(bytes).map_err(|_| {
                        SourceError::Protocol("data row value is not valid UTF-8".to_owned())
                    })?;
                    values.push(Some(text.to_owned()));
                }
            }
            r.finish("DataRow")?;
            BackendMessage::DataRow { values }
        }
        b'C' => {
            let tag = r.string("CommandComplete")?;
            r.finish("CommandComplete")?;
            BackendMessage::CommandComplete { tag }
        }
        b'I' => BackendMessage::EmptyQueryResponse,
        b'E' => BackendMessage::ErrorResponse(parse_error_fields(&mut r, "ErrorResponse")?),
        b'N' => BackendMessage::NoticeResponse(parse_error_fields(&mut r, "NoticeResponse")?),
        b'A' => BackendMessage::NotificationResponse,
        b'G' => BackendMessage::CopyInResponse,
        b'H' => BackendMessage::CopyOutResponse,
        b'W' => BackendMessage::CopyBothResponse,
        b'd' => BackendMessage::CopyData,
        b'c' => BackendMessage::CopyDone,
        b'v' => BackendMessage::NegotiateProtocolVersion,
        other => {
            return Err(SourceError::Protocol(format!(
                "unexpected message type {}",
                tag_name(other)
            )))
        }
    };
    Ok(msg)
}

fn parse_auth(body: Bytes) -> Result<BackendMessage, SourceError> {
    let mut r = Reader::new(&body);
    let code = r.i32("Authentication")?;
    let auth = match code {
        0 => Auth::Ok,
        2 => Auth::Unsupported("Kerberos V5"),
        3 => Auth::CleartextPassword,
        5 => {
            let salt = r.array::<4>("AuthenticationMD5Password")?;
            Auth::Md5Password { salt }
        }
        6 => Auth::Unsupported("SCM credentials"),
        7 | 8 => Auth::Unsupported("GSSAPI"),
        9 => Auth::Unsupported("SSPI"),
        10 => {
            let mut mechanisms = Vec::new();
            loop {
                let name = r.string("AuthenticationSASL")?;
                if name.is_empty() {
                    break;
                }
                mechanisms.push(name);
            }
            Auth::Sasl { mechanisms }
        }
        11 => {
            return Ok(BackendMessage::Authentication(Auth::SaslContinue(
                body.slice(4..),
            )))
        }
        12 => {
            return Ok(BackendMessage::Authentication(Auth::SaslFinal(
                body.slice(4..),
            )))
        }
        _ => Auth::Unsupported("unknown"),
    };
    if !matches!(auth, Auth::Unsupported(_)) {
        r.finish("Authentication")?;
    }
    Ok(BackendMessage::Authentication(auth))
}

/// Parses the `(type, value)` fields of an ErrorResponse or NoticeResponse. Values are decoded
/// lossily: errors sent before `client_encoding` applies may be in the server's encoding, and a
/// garbled error is more useful than none.
fn parse_error_fields(r: &mut Reader<'_>, what: &str) -> Result<ServerError, SourceError> {
    let mut fields = Vec::new();
    loop {
        let kind = r.u8(what)?;
        if kind == 0 {
            break;
        }
        let value = r.cstr(what)?;
        fields.push((kind, String::from_utf8_lossy(value).into_owned()));
    }
    r.finish(what)?;
    Ok(ServerError::from_fields(
        fields.iter().map(|(k, v)| (*k, v.as_str())),
    ))
}

/// A bounds-checked cursor over a message body.
struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    fn new(buf: &'a [u8]) -> Reader<'a> {
        Reader { buf }
    }

    fn remaining(&self) -> usize {
        self.buf.len()
    }

    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], SourceError> {
        if n > self.buf.len() {
            return Err(malformed(what));
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }

    fn skip(&mut self, n: usize, what: &str) -> Result<(), SourceError> {
        self.take(n, what).map(|_| ())
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N], SourceError> {
        let bytes = self.take(N, what)?;
        <[u8; N]>::try_from(bytes).map_err(|_| malformed(what))
    }

    fn u8(&mut self, what: &str) -> Result<u8, SourceError> {
        self.array::<1>(what).map(|[b]| b)
    }

    fn i32(&mut self, what: &str) -> Result<i32, SourceError> {
        self.array(what).map(i32::from_be_bytes)
    }

    /// An Int16 element count, which must not be negative.
    fn count(&mut self, what: &str) -> Result<usize, SourceError> {
        let n = i16::from_be_bytes(self.array(what)?);
        usize::try_from(n).map_err(|_| malformed(what))
    }

    fn cstr(&mut self, what: &str) -> Result<&'a [u8], SourceError> {
        let nul = self
            .buf
            .iter()
            .position(|&b| b == 0)
            .ok_or_else(|| malformed(what))?;
        let s = self.take(nul, what)?;
        self.skip(1, what)?;
        Ok(s)
    }

    fn string(&mut self, what: &str) -> Result<String, SourceError> {
        let bytes = self.cstr(what)?;
        String::from_utf8(bytes.to_vec())
            .map_err(|_| SourceError::Protocol(format!("{what} message is not valid UTF-8")))
    }

    fn finish(&self, what: &str) -> Result<(), SourceError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(malformed(what))
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Builds a framed backend message.
    pub(crate) fn frame(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut out = vec![tag];
        out.extend_from_slice(&(body.len() as u32 + 4).to_be_bytes());
        out.extend_from_slice(body);
        out
    }

    pub(crate) fn error_body(fields: &[(u8, &str)]) -> Vec<u8> {
        let mut body = Vec::new();
        for (k, v) in fields {
            body.push(*k);
            body.extend_from_slice(v.as_bytes());
            body.push(0);
        }
        body.push(0);
        body
    }

    fn parse_one(bytes: &[u8]) -> Result<BackendMessage, SourceError> {
        let mut buf = BytesMut::from(bytes);
        match split_frame(&mut buf)? {
            Some((tag, body)) => parse_message(tag, body),
            None => Err(SourceError::Protocol("incomplete".into())),
        }
    }

    #[test]
    fn framing_waits_for_whole_messages() {
        let mut bytes = frame(b'Z', b"I");
        bytes.extend(frame(b'C', b"SELECT 1\0"));
        for cut in 0..bytes.len() {
            let mut buf = BytesMut::from(&bytes[..cut]);
            let first = split_frame(&mut buf);
            match first {
                Ok(Some((tag, _))) => assert!(cut >= 6 && tag == b'Z'),
                Ok(None) => assert!(cut < 6),
                Err(e) => panic!("cut {cut}: {e}"),
            }
        }
        let mut buf = BytesMut::from(&bytes[..]);
        let mut tags = Vec::new();
        while let Ok(Some((tag, body))) = split_frame(&mut buf) {
            tags.push(tag);
            assert!(parse_message(tag, body).is_ok());
        }
        assert_eq!(tags, b"ZC");
        assert!(buf.is_empty());
    }

    #[test]
    fn frame_lengths_and_zero_copy_bodies() {
        let mut bytes = frame(b'd', b"payload");
        bytes.extend(frame(b'c', b""));
        assert_eq!(frame_len(&bytes), Some(12));
        assert_eq!(frame_len(&bytes[..4]), None);
        assert_eq!(frame_len(&[b'd', 0x7f, 0xff, 0xff, 0xff]), None);
        let mut buf = BytesMut::from(&bytes[..]);
        let start = buf.as_ptr() as usize;
        let first = split_frame(&mut buf).ok().flatten();
        let Some((b'd', body)) = first else {
            panic!("{first:?}");
        };
        assert_eq!(&body[..], b"payload");
        assert_eq!(body.as_ptr() as usize, start + 5, "a slice of the buffer");
        assert!(matches!(split_frame(&mut buf), Ok(Some((b'c', b))) if b.is_empty()));
        assert!(buf.is_empty());
    }

    #[test]
    fn framing_rejects_bad_lengths() {
        let mut buf = BytesMut::from(&[b'Z', 0, 0, 0, 3][..]);
        assert!(matches!(
            split_frame(&mut buf),
            Err(SourceError::Protocol(_))
        ));
        let mut buf = BytesMut::from(&[b'D', 0x7f, 0xff, 0xff, 0xff][..]);
        assert!(matches!(
            split_frame(&mut buf),
            Err(SourceError::Protocol(_))
        ));
        let mut buf = BytesMut::from(&[b'D', 0xff, 0xff, 0xff, 0xff][..]);
        assert!(matches!(
            split_frame(&mut buf),
            Err(SourceError::Protocol(_))
        ));
    }

    #[test]
    fn error_response_fields() {
        let body = error_body(&[
            (b'S', "ERREUR"),
            (b'V', "ERROR"),
            (b'C', "42P01"),
            (b'M', "relation \"t\" does not exist"),
            (b'D', "some detail"),
            (b'H', "some hint"),
            (b'P', "15"),
            (b'W', "SQL function"),
            (b'F', "parse_relation.c"),
        ]);
        let msg = parse_one(&frame(b'E', &body));
        let Ok(BackendMessage::ErrorResponse(e)) = msg else {
            panic!("{msg:?}");
        };
        assert_eq!(e.severity, "ERROR");
        assert_eq!(e.code, "42P01");
        assert_eq!(e.message, "relation \"t\" does not exist");
        assert_eq!(e.detail.as_deref(), Some("some detail"));
        assert_eq!(e.hint.as_deref(), Some("some hint"));
        assert_eq!(e.position, Some(15));
        assert_eq!(e.where_.as_deref(), Some("SQL function"));
        let notice = parse_one(&frame(b'N', &error_body(&[(b'V', "NOTICE"), (b'M', "hi")])));
        assert!(matches!(notice, Ok(BackendMessage::NoticeResponse(n)) if n.message == "hi"));
    }

    #[test]
    fn truncated_messages_are_protocol_errors() {
        let good = [
            frame(b'E', &error_body(&[(b'C', "42P01"), (b'M', "x")])),
            frame(b'D', &[0, 2, 0, 0, 0, 1, b'a', 0xff, 0xff, 0xff, 0xff]),
            frame(
                b'T',
                &[
                    0, 1, b'c', 0, 0, 0, 0, 1, 0, 1, 0, 0, 0, 25, 0xff, 0xff, 0xff, 0xff, 0xff,
                    0xff, 0, 0,
                ],
            ),
            frame(b'S', b"server_version\x0015.2\0"),
            frame(b'K', &[0, 0, 0, 1, 0, 0, 0, 2]),
            frame(b'R', &[0, 0, 0, 5, 1, 2, 3, 4]),
            frame(b'R', b"\0\0\0\x0aSCRAM-SHA-256\0\0"),
            frame(b'C', b"SELECT 1\0"),
            frame(b'Z', b"I"),
        ];
        for msg in &good {
            let body = &msg[5..];
            assert!(
                parse_message(msg[0], Bytes::copy_from_slice(body)).is_ok(),
                "{msg:?}"
            );
            // Every strict prefix of the body is malformed, never a panic.
            for cut in 0..body.len() {
                let parsed = parse_message(msg[0], Bytes::copy_from_slice(&body[..cut]));
                assert!(
                    matches!(parsed, Err(SourceError::Protocol(_))),
                    "{:?} cut {cut}: {parsed:?}",
                    msg[0] as char
                );
            }
            // Trailing garbage is refused too (except where the body is free-form).
            let mut long = body.to_vec();
            long.push(7);
            let parsed = parse_message(msg[0], Bytes::from(long));
            assert!(
                parsed.is_err(),
                "{:?} with trailing byte: {parsed:?}",
                msg[0] as char
            );
        }
    }

    #[test]
    fn data_row_values() {
        let msg = parse_one(&frame(
            b'D',
            &[0, 3, 0, 0, 0, 1, b'a', 0xff, 0xff, 0xff, 0xff, 0, 0, 0, 0],
        ));
        assert_eq!(
            msg.ok(),
            Some(BackendMessage::DataRow {
                values: vec![Some("a".into()), None, Some(String::new())]
            })
        );
        // A huge column count with a tiny body must not allocate; a negative length is bad.
        assert!(parse_one(&frame(b'D', &[0x7f, 0xff])).is_err());
        assert!(parse_one(&frame(b'D', &[0xff, 0xff])).is_err());
        assert!(parse_one(&frame(b'D', &[0, 1, 0xff, 0xff, 0xff, 0xfe])).is_err());
        assert!(parse_one(&frame(b'D', &[0, 1, 0x7f, 0xff, 0xff, 0xff])).is_err());
        assert!(
            parse_one(&frame(b'D', &[0, 1, 0, 0, 0, 1, 0xc3])).is_err(),
            "invalid utf-8"
        );
    }

    #[test]
    fn authentication_requests() {
        let auth = |body: &[u8]| match parse_one(&frame(b'R', body)) {
            Ok(BackendMessage::Authentication(a)) => a,
            other => panic!("{other:?}"),
        };
        assert_eq!(auth(&[0, 0, 0, 0]), Auth::Ok);
        assert_eq!(auth(&[0, 0, 0, 3]), Auth::CleartextPassword);
        assert_eq!(
            auth(&[0, 0, 0, 5, 9, 8, 7, 6]),
            Auth::Md5Password { salt: [9, 8, 7, 6] }
        );
        assert_eq!(
            auth(b"\0\0\0\x0aSCRAM-SHA-256-PLUS\0SCRAM-SHA-256\0\0"),
            Auth::Sasl {
                mechanisms: vec!["SCRAM-SHA-256-PLUS".into(), "SCRAM-SHA-256".into()]
            }
        );
        assert_eq!(
            auth(b"\0\0\0\x0br=abc"),
            Auth::SaslContinue(Bytes::from_static(b"r=abc"))
        );
        assert_eq!(
            auth(b"\0\0\0\x0cv=xyz"),
            Auth::SaslFinal(Bytes::from_static(b"v=xyz"))
        );
        assert_eq!(auth(&[0, 0, 0, 7]), Auth::Unsupported("GSSAPI"));
        assert_eq!(auth(&[0, 0, 0, 9]), Auth::Unsupported("SSPI"));
        assert_eq!(auth(&[0, 0, 0, 99]), Auth::Unsupported("unknown"));
    }

    #[test]
    fn unknown_tags_and_garbage() {
        assert!(matches!(
            parse_one(&frame(b'?', b"")),
            Err(SourceError::Protocol(_))
        ));
        assert!(matches!(
            parse_one(&frame(b'Z', b"X")),
            Err(SourceError::Protocol(_))
        ));
        // Deterministic pseudo-random bytes through the framer and parser: no panics.
        let mut state: u32 = 0x1234_5678;
        for _ in 0..2000 {
            let mut bytes = Vec::new();
            for _ in 0..(state % 40) {
                state = state.wrapping_mul(1_103_515_245).wrapping_add(12345);
                bytes.push((state >> 16) as u8);
            }
            state = state.wrapping_mul(1_103_515_245).wrapping_add(12345);
            for tag in [b'R', b'E', b'N', b'D', b'T', b'S', b'K', b'Z', b'C'] {
                let _ = parse_message(tag, Bytes::copy_from_slice(&bytes));
            }
            let mut buf = BytesMut::from(&bytes[..]);
            while let Ok(Some((tag, body))) = split_frame(&mut buf) {
                let _ = parse_message(tag, body);
            }
        }
    }
}
