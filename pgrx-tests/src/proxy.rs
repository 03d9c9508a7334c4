//! A TCP proxy between cloudmig and its source, to inject network faults: the test points the
//! source conninfo at [`Proxy::port`] and switches the link's behaviour at run time.
//!
//! Behaviours ([`Proxy::pass`], [`Proxy::black_hole`], [`Proxy::reset`], [`Proxy::set_delay`],
//! [`Proxy::set_rate`]):
//! - *pass*: bytes flow both ways, after the delay of their direction and within the rate;
//! - *black-hole*: a network that drops every packet but does not close anything. Open
//!   connections stall (nothing is read or forwarded, so TCP's buffers fill as they would while
//!   retransmitting), new connections are accepted and held without reaching the server. What
//!   was sent in the meantime flows once the link passes again, as after a healed partition,
//!   unless an end gave up and closed its connection first;
//! - *reset*: every open connection is closed at once (both ends see it end) and new ones are
//!   closed on arrival for a while; then the link passes again;
//! - *delay* per direction (`up` towards the server, `down` towards the client), a
//!   token-bucket *rate* per direction and a cap on the bytes *in flight* per connection and
//!   direction ([`Proxy::set_in_flight_cap`]), so the proxy can serve as a link emulator.
//!
//! Threads (std only): one accepting; per connection one reader and one writer per direction,
//! joined by a channel that carries each chunk with the moment it was read (that is what the
//! delay counts from). Every blocking call is bounded ([`TICK`]) so each thread notices a mode
//! change, a reset or the proxy's drop promptly. Dropping the [`Proxy`] closes everything.

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

/// Longest wait of any proxy thread before it looks at the mode again.
const TICK: Duration = Duration::from_millis(20);
/// Bytes read at once.
const CHUNK: usize = 64 * 1024;
/// Burst a rate-limited direction allows, in seconds of its rate.
const BURST_SECONDS: f64 = 0.05;

/// What the link does with traffic.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Forward (after the delay, within the rate).
    Pass,
    /// Forward nothing, close nothing.
    BlackHole,
}

/// A direction of the link.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// Client to server.
    Up,
    /// Server to client.
    Down,
}

/// A token bucket: `rate` bytes per second, bursts of [`BURST_SECONDS`] of it.
#[derive(Debug)]
struct Bucket {
    rate: Option<u64>,
    tokens: f64,
    last: Instant,
}

impl Bucket {
    fn new() -> Self {
        Self {
            rate: None,
            tokens: 0.0,
            last: Instant::now(),
        }
    }

    /// Takes `bytes` and returns how long to wait before sending them (their debt).
    fn take(&mut self, bytes: usize) -> Duration {
        let Some(rate) = self.rate.filter(|r| *r > 0) else {
            return Duration::ZERO;
        };
        let rate = rate as f64;
        let now = Instant::now();
        let refill = now.duration_since(self.last).as_secs_f64() * rate;
        self.last = now;
        self.tokens = (self.tokens + refill).min(rate * BURST_SECONDS) - bytes as f64;
        if self.tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-self.tokens / rate)
        }
    }
}

#[derive(Debug)]
struct Settings {
    mode: Mode,
    /// New connections are closed on arrival until then.
    refuse_until: Option<Instant>,
    delay_up: Duration,
    delay_down: Duration,
    /// Bytes a connection may have read but not yet written, per direction.
    in_flight_cap: Option<usize>,
}

/// One proxied connection.
#[derive(Debug)]
struct Conn {
    client: TcpStream,
    server: Mutex<Option<TcpStream>>,
    closed: AtomicBool,
    /// Whether the server sent something since the client last did: the client's next bytes
    /// then start a new exchange (see [`Proxy::exchanges`]).
    answered: AtomicBool,
}

impl Conn {
    fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
        let _ = self.client.shutdown(Shutdown::Both);
        if let Some(server) = lock(&self.server).as_ref() {
            let _ = server.shutdown(Shutdown::Both);
        }
    }

    fn is_closed(&self) -> bool {
        self.closed.load(Ordering::SeqCst)
    }
}

#[derive(Debug)]
struct Shared {
    target: SocketAddr,
    settings: Mutex<Settings>,
    up: Mutex<Bucket>,
    down: Mutex<Bucket>,
    conns: Mutex<Vec<Arc<Conn>>>,
    stop: AtomicBool,
    accepted: AtomicU64,
    exchanges: AtomicU64,
}

impl Shared {
    fn mode(&self) -> Mode {
        lock(&self.settings).mode
    }

    fn delay(&self, direction: Direction) -> Duration {
        let settings = lock(&self.settings);
        match direction {
            Direction::Up => settings.delay_up,
            Direction::Down => settings.delay_down,
        }
    }

    fn bucket(&self, direction: Direction) -> &Mutex<Bucket> {
        match direction {
            Direction::Up => &self.up,
            Direction::Down => &self.down,
        }
    }

    fn in_flight_cap(&self) -> Option<usize> {
        lock(&self.settings).in_flight_cap
    }

    fn stopped(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }
}

/// A running proxy on 127.0.0.1; stopped (every connection closed) on drop.
#[derive(Debug)]
pub struct Proxy {
    port: u16,
    shared: Arc<Shared>,
    acceptor: Option<thread::JoinHandle<()>>,
}

impl Proxy {
    /// A proxy to `127.0.0.1:target_port`, passing.
    pub fn to_port(target_port: u16) -> Proxy {
        Proxy::start(SocketAddr::from(([127, 0, 0, 1], target_port)))
    }

    /// A proxy to `target`, listening on a free port of 127.0.0.1, passing.
    pub fn start(target: SocketAddr) -> Proxy {
        let listener = TcpListener::bind(("127.0.0.1", 0))
            .unwrap_or_else(|e| panic!("proxy: cannot bind 127.0.0.1:0: {e}"));
        let port = listener
            .local_addr()
            .unwrap_or_else(|e| panic!("proxy: no local address: {e}"))
            .port();
        listener
            .set_nonblocking(true)
            .unwrap_or_else(|e| panic!("proxy: cannot make the listener non-blocking: {e}"));
        let shared = Arc::new(Shared {
            target,
            settings: Mutex::new(Settings {
                mode: Mode::Pass,
                refuse_until: None,
                delay_up: Duration::ZERO,
                delay_down: Duration::ZERO,
                in_flight_cap: None,
            }),
            up: Mutex::new(Bucket::new()),
            down: Mutex::new(Bucket::new()),
            conns: Mutex::new(Vec::new()),
            stop: AtomicBool::new(false),
            accepted: AtomicU64::new(0),
            exchanges: AtomicU64::new(0),
        });
        let acceptor = {
            let shared = Arc::clone(&shared);
            thread::spawn(move || accept_loop(&listener, &shared))
        };
        Proxy {
            port,
            shared,
            acceptor: Some(acceptor),
        }
    }

    /// The port clients connect to.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Bytes flow again (also what a black-hole held back).
    pub fn pass(&self) {
        let mut settings = lock(&self.shared.settings);
        settings.mode = Mode::Pass;
        settings.refuse_until = None;
    }

    /// Nothing flows, nothing is closed (see the module doc).
    pub fn black_hole(&self) {
        lock(&self.shared.settings).mode = Mode::BlackHole;
    }

    /// The current mode.
    pub fn mode(&self) -> Mode {
        self.shared.mode()
    }

    /// Closes every open connection now and new ones on arrival for `refuse_for`; passes after.
    pub fn reset(&self, refuse_for: Duration) {
        {
            let mut settings = lock(&self.shared.settings);
            settings.mode = Mode::Pass;
            settings.refuse_until = Some(Instant::now() + refuse_for);
        }
        let conns = std::mem::take(&mut *lock(&self.shared.conns));
        for conn in conns {
            conn.close();
        }
    }

    /// One-way delay added to every chunk of each direction.
    pub fn set_delay(&self, up: Duration, down: Duration) {
        let mut settings = lock(&self.shared.settings);
        settings.delay_up = up;
        settings.delay_down = down;
    }

    /// Bytes per second in `direction`, None for unlimited (shared by every connection, as a
    /// link's bandwidth is).
    pub fn set_rate(&self, direction: Direction, bytes_per_second: Option<u64>) {
        let mut bucket = lock(self.shared.bucket(direction));
        bucket.rate = bytes_per_second;
        bucket.tokens = 0.0;
        bucket.last = Instant::now();
    }

    /// At most `bytes` read but not yet forwarded per connection and direction (None: no cap).
    /// The proxy then stops reading, so the sender's socket buffers fill and it blocks, as a
    /// TCP sender does when its window is full: without a cap a delayed link would buffer
    /// without bound and hide what a window costs over a long round trip.
    pub fn set_in_flight_cap(&self, bytes: Option<usize>) {
        lock(&self.shared.settings).in_flight_cap = bytes;
    }

    /// Connections open now.
    pub fn open_connections(&self) -> usize {
        let mut conns = lock(&self.shared.conns);
        conns.retain(|c| !c.is_closed());
        conns.len()
    }

    /// Connections accepted since the start.
    pub fn accepted(&self) -> u64 {
        self.shared.accepted.load(Ordering::SeqCst)
    }

    /// Exchanges since the start, over every connection: times a client sent bytes after the
    /// server had answered (or first). A request waited for before the next is sent counts
    /// once, so over a delayed link each costs at least a round trip; requests pipelined
    /// without waiting count as one.
    pub fn exchanges(&self) -> u64 {
        self.shared.exchanges.load(Ordering::SeqCst)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        for conn in std::mem::take(&mut *lock(&self.shared.conns)) {
            conn.close();
        }
        if let Some(acceptor) = self.acceptor.take() {
            let _ = acceptor.join();
        }
    }
}

/// A poisoned lock only means another proxy thread panicked: the data is still usable.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

fn accept_loop(listener: &TcpListener, shared: &Arc<Shared>) {
    while !shared.stopped() {
        let client = match listener.accept() {
            Ok((client, _)) => client,
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                thread::sleep(TICK);
                continue;
            }
            Err(_) => {
                thread::sleep(TICK);
                continue;
            }
        };
        shared.accepted.fetch_add(1, Ordering::SeqCst);
        let refusing = {
            let mut settings = lock(&shared.settings);
            match settings.refuse_until {
                Some(until) if Instant::now() < until => true,
                Some(_) => {
                    settings.refuse_until = None;
                    false
                }
                None => false,
            }
        };
        if refusing || client.set_nonblocking(false).is_err() {
            let _ = client.shutdown(Shutdown::Both);
            continue;
        }
        let Ok(client_reader) = client.try_clone() else {
            continue;
        };
        let conn = Arc::new(Conn {
            client,
            server: Mutex::new(None),
            closed: AtomicBool::new(false),
            answered: AtomicBool::new(true),
        });
        lock(&shared.conns).push(Arc::clone(&conn));
        let shared = Arc::clone(shared);
        thread::spawn(move || serve(&shared, &conn, client_reader));
    }
}

/// Connects to the server once the link passes, then runs the four pumps.
fn serve(shared: &Arc<Shared>, conn: &Arc<Conn>, client_reader: TcpStream) {
    // A held connection reaches the server only when the link passes.
    while shared.mode() == Mode::BlackHole {
        if conn.is_closed() || shared.stopped() {
            return;
        }
        thread::sleep(TICK);
    }
    if conn.is_closed() || shared.stopped() {
        return;
    }
    let server = match TcpStream::connect_timeout(&shared.target, Duration::from_secs(5)) {
        Ok(server) => server,
        Err(_) => {
            conn.close();
            return;
        }
    };
    let _ = server.set_nodelay(true);
    let _ = conn.client.set_nodelay(true);
    let (Ok(server_reader), Ok(server_writer), Ok(client_writer)) = (
        server.try_clone(),
        server.try_clone(),
        conn.client.try_clone(),
    ) else {
        conn.close();
        return;
    };
    *lock(&conn.server) = Some(server);
    if conn.is_closed() {
        // A reset came while connecting.
        conn.close();
        return;
    }
    for (reader, writer, direction) in [
        (client_reader, server_writer, Direction::Up),
        (server_reader, client_writer, Direction::Down),
    ] {
        let (tx, rx) = mpsc::channel();
        let queued = Arc::new(AtomicUsize::new(0));
        {
            let (shared, conn, queued) =
                (Arc::clone(shared), Arc::clone(conn), Arc::clone(&queued));
            thread::spawn(move || read_pump(&shared, &conn, reader, &tx, &queued, direction));
        }
        let (shared, conn) = (Arc::clone(shared), Arc::clone(conn));
        thread::spawn(move || write_pump(&shared, &conn, writer, &rx, direction, &queued));
    }
}

/// A chunk read and when; `None` ends the direction (the other end closed).
type Chunk = Option<(Instant, Vec<u8>)>;

/// How long a read pump over its in-flight cap waits before looking again: short against the
/// delays emulated (milliseconds), as a window opens as soon as an acknowledgement arrives.
const CAP_WAIT: Duration = Duration::from_millis(1);

fn read_pump(
    shared: &Shared,
    conn: &Conn,
    mut reader: TcpStream,
    tx: &Sender<Chunk>,
    queued: &AtomicUsize,
    direction: Direction,
) {
    if reader.set_read_timeout(Some(TICK)).is_err() {
        conn.close();
        return;
    }
    let mut buf = vec![0u8; CHUNK];
    while !conn.is_closed() && !shared.stopped() {
        if shared.mode() == Mode::BlackHole {
            thread::sleep(TICK);
            continue;
        }
        if let Some(cap) = shared.in_flight_cap() {
            if queued.load(Ordering::SeqCst) >= cap {
                thread::sleep(CAP_WAIT);
                continue;
            }
        }
        match reader.read(&mut buf) {
            Ok(0) => {
                let _ = tx.send(None);
                return;
            }
            Ok(n) => {
                match direction {
                    Direction::Up if conn.answered.swap(false, Ordering::SeqCst) => {
                        shared.exchanges.fetch_add(1, Ordering::SeqCst);
                    }
                    Direction::Up => {}
                    Direction::Down => conn.answered.store(true, Ordering::SeqCst),
                }
                queued.fetch_add(n, Ordering::SeqCst);
                if tx.send(Some((Instant::now(), buf[..n].to_vec()))).is_err() {
                    return;
                }
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(_) => {
                let _ = tx.send(None);
                return;
            }
        }
    }
}

fn write_pump(
    shared: &Shared,
    conn: &Conn,
    mut writer: TcpStream,
    rx: &Receiver<Chunk>,
    direction: Direction,
    queued: &AtomicUsize,
) {
    let alive = || !conn.is_closed() && !shared.stopped();
    while alive() {
        let (read_at, bytes) = match rx.recv_timeout(TICK) {
            Ok(Some(chunk)) => chunk,
            // The other end closed: so does this connection (PostgreSQL's protocol has no
            // half-closed use).
            Ok(None) | Err(RecvTimeoutError::Disconnected) => break,
            Err(RecvTimeoutError::Timeout) => continue,
        };
        // Held while black-holed; the delay counts from the moment the chunk was read.
        loop {
            if !alive() {
                return;
            }
            let due = read_at + shared.delay(direction);
            let now = Instant::now();
            if shared.mode() == Mode::BlackHole {
                thread::sleep(TICK);
            } else if now < due {
                thread::sleep((due - now).min(TICK));
            } else {
                break;
            }
        }
        let debt = lock(shared.bucket(direction)).take(bytes.len());
        let until = Instant::now() + debt;
        while Instant::now() < until {
            if !alive() {
                return;
            }
            thread::sleep((until - Instant::now()).min(TICK));
        }
        if writer.write_all(&bytes).is_err() {
            break;
        }
        queued.fetch_sub(bytes.len(), Ordering::SeqCst);
    }
    conn.close();
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An echo server on a free port; each connection echoes until its peer closes.
    fn echo_server() -> u16 {
        let listener = TcpListener::bind(("127.0.0.1", 0)).unwrap();
        let port = listener.local_addr().unwrap().port();
        thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { return };
                thread::spawn(move || {
                    let mut buf = [0u8; 8192];
                    loop {
                        match stream.read(&mut buf) {
                            Ok(0) | Err(_) => return,
                            Ok(n) => {
                                if stream.write_all(&buf[..n]).is_err() {
                                    return;
                                }
                            }
                        }
                    }
                });
            }
        });
        port
    }

    fn connect(proxy: &Proxy) -> TcpStream {
        let stream = TcpStream::connect(("127.0.0.1", proxy.port())).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        stream
    }

    fn roundtrip(stream: &mut TcpStream, bytes: &[u8]) -> Vec<u8> {
        stream.write_all(bytes).unwrap();
        let mut back = vec![0u8; bytes.len()];
        stream.read_exact(&mut back).unwrap();
        back
    }

    /// Waits until `stream` reports its end (EOF or an error), at most 10 s.
    fn ended(stream: &mut TcpStream) -> bool {
        let mut buf = [0u8; 16];
        matches!(stream.read(&mut buf), Ok(0) | Err(_))
    }

    #[test]
    fn passes_bytes_both_ways() {
        let proxy = Proxy::to_port(echo_server());
        let mut stream = connect(&proxy);
        let data: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        stream.write_all(&data).unwrap();
        let mut back = vec![0u8; data.len()];
        stream.read_exact(&mut back).unwrap();
        assert_eq!(back, data);
        assert_eq!(proxy.accepted(), 1);
        assert!(proxy.exchanges() >= 1);
        let before = proxy.exchanges();
        assert_eq!(roundtrip(&mut stream, b"one"), b"one");
        assert_eq!(roundtrip(&mut stream, b"two"), b"two");
        assert_eq!(proxy.exchanges(), before + 2);
    }

    #[test]
    fn a_black_hole_holds_everything_and_loses_nothing() {
        let proxy = Proxy::to_port(echo_server());
        let mut open = connect(&proxy);
        assert_eq!(roundtrip(&mut open, b"before"), b"before");
        proxy.black_hole();
        assert_eq!(proxy.mode(), Mode::BlackHole);
        // Whether a read pump picks these bytes up or not, its writer holds them.
        open.write_all(b"held").unwrap();
        // A new connection is accepted but reaches nothing.
        let mut held = connect(&proxy);
        held.write_all(b"new").unwrap();
        open.set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        let mut buf = [0u8; 4];
        let silent = open.read(&mut buf);
        assert!(
            matches!(&silent, Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut)),
            "{silent:?}"
        );
        proxy.pass();
        open.set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        open.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"held");
        let mut three = [0u8; 3];
        held.read_exact(&mut three).unwrap();
        assert_eq!(&three, b"new");
    }

    #[test]
    fn a_reset_closes_connections_and_refuses_new_ones_for_a_while() {
        let proxy = Proxy::to_port(echo_server());
        let mut first = connect(&proxy);
        assert_eq!(roundtrip(&mut first, b"x"), b"x");
        proxy.reset(Duration::from_millis(500));
        assert!(ended(&mut first), "the open connection was not closed");
        let mut refused = connect(&proxy);
        assert!(
            ended(&mut refused),
            "a connection during the reset got through"
        );
        // Once the window is over connections pass again.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let mut again = connect(&proxy);
            if again.write_all(b"ok").is_ok() {
                let mut buf = [0u8; 2];
                if again.read_exact(&mut buf).is_ok() {
                    assert_eq!(&buf, b"ok");
                    break;
                }
            }
            assert!(Instant::now() < deadline, "the link never passed again");
            thread::sleep(Duration::from_millis(100));
        }
    }

    #[test]
    fn delay_and_rate_slow_the_link_down() {
        let proxy = Proxy::to_port(echo_server());
        let mut stream = connect(&proxy);
        proxy.set_delay(Duration::from_millis(100), Duration::from_millis(50));
        let started = Instant::now();
        assert_eq!(roundtrip(&mut stream, b"ping"), b"ping");
        assert!(started.elapsed() >= Duration::from_millis(150));
        proxy.set_delay(Duration::ZERO, Duration::ZERO);
        // 100 kB at 200 kB/s upwards: at least ~0.45 s (minus the burst).
        proxy.set_rate(Direction::Up, Some(200_000));
        let data = vec![7u8; 100_000];
        let started = Instant::now();
        assert_eq!(roundtrip(&mut stream, &data), data);
        assert!(started.elapsed() >= Duration::from_millis(400));
    }

    #[test]
    fn an_in_flight_cap_bounds_throughput_to_a_window_per_round_trip() {
        let proxy = Proxy::to_port(echo_server());
        let mut stream = connect(&proxy);
        // 64 kB per 50 ms one way: 1 MB upwards needs at least ~15 windows, ~0.7 s.
        proxy.set_delay(Duration::from_millis(50), Duration::ZERO);
        proxy.set_in_flight_cap(Some(64 * 1024));
        let data: Vec<u8> = (0..1_000_000u32).map(|i| (i % 253) as u8).collect();
        let writer = {
            let mut stream = stream.try_clone().unwrap();
            let data = data.clone();
            thread::spawn(move || stream.write_all(&data).unwrap())
        };
        let started = Instant::now();
        let mut back = vec![0u8; data.len()];
        stream.read_exact(&mut back).unwrap();
        writer.join().unwrap();
        assert_eq!(back, data);
        assert!(started.elapsed() >= Duration::from_millis(500));
    }

    #[test]
    fn the_token_bucket_charges_what_exceeds_the_burst() {
        let mut bucket = Bucket::new();
        assert_eq!(bucket.take(1_000_000), Duration::ZERO, "unlimited");
        bucket.rate = Some(1000);
        bucket.tokens = 0.0;
        bucket.last = Instant::now();
        let wait = bucket.take(500);
        assert!(wait >= Duration::from_millis(450) && wait <= Duration::from_millis(500));
    }
}
