//! The byte pipe under a [`crate::source::Connection`]: a TCP or Unix socket, or TLS over a TCP
//! socket. It never waits longer than the socket's timeouts, which the connection sets to at
//! most [`crate::source::connection::POLL_INTERVAL`] so that it can run the interrupt check.
//!
//! Timeouts and TLS: a read or write that times out (`WouldBlock`/`TimedOut`) or is interrupted
//! by a signal must leave the TLS state as it was, so the caller can simply try again. rustls
//! makes that possible: `read_tls` only consumes bytes it was handed and `write_tls` only drops
//! bytes the socket took, so a failed socket call changes nothing. We never use rustls'
//! `Stream` helpers, whose `complete_io` loops would wait past our slices.
//!
//! Reading over TLS: one `recv` fills a 64 KiB buffer of ciphertext (so a fast COPY pays one
//! system call per 64 KiB, not per 4 KiB read of rustls), rustls decrypts from it, and the
//! plaintext is copied once into the connection's read buffer. Nothing is allocated per
//! message.

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use bytes::BytesMut;
use rustls::ClientConnection;

/// Ciphertext read from the socket at once.
const TLS_READ_BUFFER: usize = 64 * 1024;

/// The socket under a connection.
pub(super) enum Socket {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Socket {
    pub(super) fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Socket::Tcp(s) => s.set_read_timeout(t),
            Socket::Unix(s) => s.set_read_timeout(t),
        }
    }

    pub(super) fn set_write_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Socket::Tcp(s) => s.set_write_timeout(t),
            Socket::Unix(s) => s.set_write_timeout(t),
        }
    }

    fn shutdown(&self) {
        // Best effort: the peer may already be gone.
        let _ = match self {
            Socket::Tcp(s) => s.shutdown(Shutdown::Both),
            Socket::Unix(s) => s.shutdown(Shutdown::Both),
        };
    }

    fn try_clone(&self) -> io::Result<Socket> {
        Ok(match self {
            Socket::Tcp(s) => Socket::Tcp(s.try_clone()?),
            Socket::Unix(s) => Socket::Unix(s.try_clone()?),
        })
    }

    pub(super) fn is_unix(&self) -> bool {
        matches!(self, Socket::Unix(_))
    }

    /// One `recv(2)` into the spare capacity of `buf`, so bytes are never copied between the
    /// socket and the message slices handed out. Blocks for at most the read timeout
    /// (`SO_RCVTIMEO`), after which it fails with `WouldBlock`.
    fn recv_into(&self, buf: &mut BytesMut) -> io::Result<usize> {
        let fd = self.as_raw_fd();
        let spare = buf.spare_capacity_mut();
        let room = spare.len();
        // SAFETY: recv writes at most `room` bytes starting at `spare`, which the buffer owns
        // and which is valid for writes; no reference to uninitialized bytes is formed.
        let n = unsafe { libc::recv(fd, spare.as_mut_ptr().cast(), room, 0) };
        let n = usize::try_from(n).map_err(|_| io::Error::last_os_error())?;
        let filled = buf.len() + n.min(room);
        // SAFETY: the kernel initialized the `n` bytes (at most the spare capacity) that
        // follow the old length.
        unsafe { buf.set_len(filled) };
        Ok(n)
    }
}

impl AsRawFd for Socket {
    fn as_raw_fd(&self) -> RawFd {
        match self {
            Socket::Tcp(s) => s.as_raw_fd(),
            Socket::Unix(s) => s.as_raw_fd(),
        }
    }
}

impl Read for Socket {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Socket::Tcp(s) => s.read(buf),
            Socket::Unix(s) => s.read(buf),
        }
    }
}

impl Write for Socket {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Socket::Tcp(s) => s.write(buf),
            Socket::Unix(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Writes to the socket, turning a zero-length write into an error (the peer is gone).
struct NonZeroWriter<'a>(&'a mut Socket);

impl Write for NonZeroWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self.0.write(buf)? {
            0 if !buf.is_empty() => Err(io::ErrorKind::WriteZero.into()),
            n => Ok(n),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// TLS over a socket.
pub(super) struct TlsStream {
    socket: Socket,
    session: ClientConnection,
    /// Ciphertext received but not yet handed to rustls: `inbuf[start..end]`.
    inbuf: Box<[u8]>,
    start: usize,
    end: usize,
    /// Decrypted bytes rustls holds, as its last `process_new_packets` said.
    plaintext: usize,
    /// The server certificate chain was verified against trusted roots.
    verified: bool,
}

impl TlsStream {
    /// The server's certificate (DER), once the handshake is done.
    pub(super) fn peer_certificate(&self) -> Option<&[u8]> {
        self.session
            .peer_certificates()
            .and_then(|c| c.first())
            .map(|c| c.as_ref())
    }

    /// The ALPN protocol the server chose, if any.
    pub(super) fn alpn_protocol(&self) -> Option<&[u8]> {
        self.session.alpn_protocol()
    }

    /// Hands rustls more ciphertext, receiving from the socket when our buffer is empty, and
    /// lets it process what it has. `Ok(0)` is end of file. A timeout leaves all state as it
    /// was.
    fn read_socket(&mut self) -> io::Result<usize> {
        if self.start == self.end {
            let n = self.socket.read(&mut self.inbuf)?;
            if n == 0 {
                return Ok(0);
            }
            self.start = 0;
            self.end = n;
        }
        let mut pending = self.inbuf.get(self.start..self.end).unwrap_or_default();
        let n = self.session.read_tls(&mut pending)?;
        if n == 0 {
            // rustls refused bytes although we offered some: its buffer is full.
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "TLS record buffer full",
            ));
        }
        self.start += n;
        match self.session.process_new_packets() {
            Ok(state) => {
                self.plaintext = state.plaintext_bytes_to_read();
                Ok(n)
            }
            Err(e) => {
                // Tell the server why (rustls queued an alert), best effort.
                let _ = self.session.write_tls(&mut NonZeroWriter(&mut self.socket));
                Err(io::Error::new(io::ErrorKind::InvalidData, e))
            }
        }
    }

    /// Moves decrypted bytes into the spare capacity of `buf` (which must have some).
    fn read_plaintext(&mut self, buf: &mut BytesMut) -> io::Result<usize> {
        let room = buf.capacity() - buf.len();
        let want = self.plaintext.min(room);
        if want == 0 {
            // Nothing decrypted: rustls says whether that is "wait", clean close or EOF.
            let mut one = [0u8; 1];
            let n = self.session.reader().read(&mut one)?;
            buf.extend_from_slice(one.get(..n).unwrap_or_default());
            return Ok(n);
        }
        let start = buf.len();
        // Within capacity, so no reallocation: only the bytes about to be overwritten are
        // zeroed (rustls' reader needs an initialized slice).
        buf.resize(start + want, 0);
        let result = self.session.reader().read(&mut buf[start..]);
        let n = *result.as_ref().unwrap_or(&0);
        buf.truncate(start + n);
        self.plaintext = self.plaintext.saturating_sub(n);
        result
    }
}

/// What a connection reads from and writes to.
pub(super) enum Transport {
    Plain(Socket),
    Tls(Box<TlsStream>),
}

impl Transport {
    /// Puts a TLS client session over the plain socket (the handshake is then driven with
    /// [`Transport::handshake_step`]).
    pub(super) fn start_tls(&mut self, setup: crate::source::tls::TlsSetup) -> io::Result<()> {
        let Transport::Plain(socket) = self else {
            return Err(io::Error::other("TLS is already in use"));
        };
        // The session takes a handle of its own on the same socket; ours closes on assignment.
        let socket = socket.try_clone()?;
        let session = ClientConnection::new(setup.config, setup.server_name)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        *self = Transport::Tls(Box::new(TlsStream {
            socket,
            session,
            inbuf: vec![0; TLS_READ_BUFFER].into_boxed_slice(),
            start: 0,
            end: 0,
            plaintext: 0,
            verified: setup.verifies_chain,
        }));
        Ok(())
    }

    pub(super) fn socket(&self) -> &Socket {
        match self {
            Transport::Plain(s) => s,
            Transport::Tls(t) => &t.socket,
        }
    }

    pub(super) fn tls(&self) -> Option<&TlsStream> {
        match self {
            Transport::Plain(_) => None,
            Transport::Tls(t) => Some(t),
        }
    }

    /// Whether the server's certificate chain was verified.
    pub(super) fn server_verified(&self) -> bool {
        self.tls().is_some_and(|t| t.verified)
    }

    /// Advances the TLS handshake by one socket read or write; true once it is complete and
    /// everything we had to say is sent.
    pub(super) fn handshake_step(&mut self) -> io::Result<bool> {
        let Transport::Tls(t) = self else {
            return Ok(true);
        };
        if t.session.wants_write() {
            t.session.write_tls(&mut NonZeroWriter(&mut t.socket))?;
        } else if t.session.is_handshaking() && t.read_socket()? == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        Ok(!t.session.is_handshaking() && !t.session.wants_write())
    }

    /// Receives at least one byte of protocol data into the spare capacity of `buf` (which
    /// must have some); `Ok(0)` means the server closed the connection. Blocks for at most
    /// the socket's read timeout.
    pub(super) fn recv_into(&mut self, buf: &mut BytesMut) -> io::Result<usize> {
        let t = match self {
            Transport::Plain(s) => return s.recv_into(buf),
            Transport::Tls(t) => t,
        };
        loop {
            match t.read_plaintext(buf) {
                Ok(n) => return Ok(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                // The peer closed the socket without close_notify: closed all the same.
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(0),
                Err(e) => return Err(e),
            }
            // A key update answer may be queued; it must not wait for our next request.
            if t.session.wants_write() {
                match t.session.write_tls(&mut NonZeroWriter(&mut t.socket)) {
                    Ok(_) => {}
                    Err(e) if is_retry(&e) => {}
                    Err(e) => return Err(e),
                }
            }
            if t.read_socket()? == 0 {
                return Ok(0);
            }
        }
    }

    /// Takes some of `data` toward the server and returns how many bytes it took (never 0
    /// for non-empty data unless a TLS flush made room instead: call again). Over TLS the
    /// bytes are encrypted and queued; [`Transport::flush_step`] sends the queue.
    pub(super) fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        match self {
            Transport::Plain(s) => NonZeroWriter(s).write(data),
            Transport::Tls(t) => {
                let n = t.session.writer().write(data)?;
                if n == 0 && !data.is_empty() {
                    // rustls' send buffer is full: push some of it out.
                    t.session.write_tls(&mut NonZeroWriter(&mut t.socket))?;
                }
                Ok(n)
            }
        }
    }

    /// True while encrypted bytes wait to be sent.
    pub(super) fn has_pending_writes(&self) -> bool {
        self.tls().is_some_and(|t| t.session.wants_write())
    }

    /// Sends some queued encrypted bytes.
    pub(super) fn flush_step(&mut self) -> io::Result<()> {
        if let Transport::Tls(t) = self {
            t.session.write_tls(&mut NonZeroWriter(&mut t.socket))?;
        }
        Ok(())
    }

    /// Sends `last_words` (Terminate) and, over TLS, close_notify, once and without waiting
    /// beyond the socket's write timeout; then shuts the socket down. Never fails: this runs
    /// on drop, maybe while unwinding.
    pub(super) fn close(&mut self, last_words: &[u8]) {
        match self {
            Transport::Plain(s) => {
                let _ = s.write(last_words);
                s.shutdown();
            }
            Transport::Tls(t) => {
                if !t.session.is_handshaking() {
                    let _ = t.session.writer().write(last_words);
                }
                t.session.send_close_notify();
                let _ = t.session.write_tls(&mut NonZeroWriter(&mut t.socket));
                t.socket.shutdown();
            }
        }
    }
}

/// Socket errors after which we simply wait again: the timeout elapsed or a signal
/// interrupted the call.
pub(super) fn is_retry(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut | io::ErrorKind::Interrupted
    )
}
