//! TLS and authentication-policy tests of the source client against fake servers: a rustls
//! server with certificates made on the spot (rcgen), scripted like the plaintext fake servers
//! of `connection.rs` (whose helpers these reuse). Real-server cases (PostgreSQL with
//! `ssl=on`, client certificates, SCRAM-SHA-256-PLUS) are end-to-end tests in
//! `pgrx-tests/tests/source_tls.rs`.

use std::fs;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig, ServerConnection, StreamOwned};

use crate::source::connection::tests::{
    auth, counting_options, data_row, fake_server, read_msg, read_ssl_request, read_startup,
    ready_sequence, row_description,
};
use crate::source::protocol::tests::frame;
use crate::source::{ConnInfo, ConnectOptions, Connection, SourceError};

type TlsServerStream = StreamOwned<ServerConnection, TcpStream>;

/// A CA, a server certificate it signed, and a client certificate it signed, with the PEM
/// files the client reads in a private directory.
struct Pki {
    dir: PathBuf,
    ca_der: CertificateDer<'static>,
    server_chain: Vec<CertificateDer<'static>>,
    server_key: Vec<u8>,
}

impl Pki {
    /// A server certificate for `names`, valid now unless `expired`.
    fn new(names: &[&str], expired: bool) -> Pki {
        static N: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "cloudmig-tls-test-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        fs::create_dir_all(&dir).expect("temp dir");
        let ca_key = KeyPair::generate().expect("ca key");
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("ca params");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "cloudmig test CA");
        let ca = ca_params.self_signed(&ca_key).expect("ca cert");

        let server_key = KeyPair::generate().expect("server key");
        let names: Vec<String> = names.iter().map(|n| (*n).to_owned()).collect();
        let mut params = CertificateParams::new(names).expect("server params");
        if expired {
            params.not_before = rcgen::date_time_ymd(2001, 1, 1);
            params.not_after = rcgen::date_time_ymd(2002, 1, 1);
        }
        let server = params
            .signed_by(&server_key, &ca, &ca_key)
            .expect("server cert");

        let client_key = KeyPair::generate().expect("client key");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("client params");
        params.distinguished_name.push(DnType::CommonName, "alice");
        let client = params
            .signed_by(&client_key, &ca, &ca_key)
            .expect("client cert");

        fs::write(dir.join("root.crt"), ca.pem()).expect("write");
        fs::write(dir.join("client.crt"), client.pem()).expect("write");
        let key_path = dir.join("client.key");
        fs::write(&key_path, client_key.serialize_pem()).expect("write");
        fs::set_permissions(&key_path, fs::Permissions::from_mode(0o600)).expect("chmod");
        Pki {
            dir,
            ca_der: ca.der().clone(),
            server_chain: vec![server.der().clone()],
            server_key: server_key.serialize_der(),
        }
    }

    fn path(&self, name: &str) -> String {
        self.dir.join(name).to_string_lossy().into_owned()
    }

    fn server_config(&self, require_client_cert: bool, alpn: bool) -> Arc<ServerConfig> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = ServerConfig::builder_with_provider(Arc::clone(&provider))
            .with_safe_default_protocol_versions()
            .expect("versions");
        let builder = if require_client_cert {
            let mut roots = RootCertStore::empty();
            roots.add(self.ca_der.clone()).expect("root");
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .expect("client verifier");
            builder.with_client_cert_verifier(verifier)
        } else {
            builder.with_no_client_auth()
        };
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.server_key.clone()));
        let mut config = builder
            .with_single_cert(self.server_chain.clone(), key)
            .expect("server config");
        if alpn {
            config.alpn_protocols = vec![b"postgresql".to_vec()];
        }
        Arc::new(config)
    }
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// Answers the `SSLRequest` with `S` and runs the handshake; `None` if it failed.
fn accept_tls(mut tcp: TcpStream, config: Arc<ServerConfig>) -> Option<TlsServerStream> {
    read_ssl_request(&mut tcp).expect("SSLRequest first");
    tcp.write_all(b"S").expect("answer SSLRequest");
    handshake(tcp, config)
}

fn handshake(mut tcp: TcpStream, config: Arc<ServerConfig>) -> Option<TlsServerStream> {
    let mut session = ServerConnection::new(config).expect("server session");
    while session.is_handshaking() {
        if session.complete_io(&mut tcp).is_err() {
            return None;
        }
    }
    Some(StreamOwned::new(session, tcp))
}

/// A fake server for one TLS connection (the script gets `None` if the handshake failed).
fn tls_server(
    config: Arc<ServerConfig>,
    script: impl FnOnce(Option<TlsServerStream>) + Send + 'static,
) -> (ConnInfo, JoinHandle<()>) {
    fake_server(move |tcp| script(accept_tls(tcp, config)))
}

fn conninfo(base: &ConnInfo, extra: &str) -> ConnInfo {
    let mut info = ConnInfo::parse(extra).expect("parse");
    info.host = base.host.clone();
    info.port = base.port;
    info.user = base.user.clone();
    info.dbname = base.dbname.clone();
    info.connect_timeout = base.connect_timeout;
    info
}

/// Cleartext password, then one query answered with a single value.
fn serve_password_and_query(s: &mut TlsServerStream, expected_password: &[u8]) {
    read_startup(s);
    s.write_all(&auth(3, &[])).expect("write");
    s.flush().expect("flush");
    let (tag, body) = read_msg(s);
    assert_eq!(tag, b'p');
    assert_eq!(body, expected_password);
    s.write_all(&ready_sequence()).expect("write");
    let (tag, _) = read_msg(s);
    assert_eq!(tag, b'Q');
    let mut out = row_description(&["v"]);
    out.extend(data_row(&[Some("over tls")]));
    out.extend(frame(b'C', b"SELECT 1\0"));
    out.extend(frame(b'Z', b"I"));
    s.write_all(&out).expect("write");
    let (tag, _) = read_msg(s);
    assert_eq!(tag, b'X', "terminate on drop");
}

/// Expects the client to give up: reads until it closes, returning what it sent.
fn drain(s: &mut impl Read) -> Vec<u8> {
    let mut rest = Vec::new();
    let _ = s.read_to_end(&mut rest);
    rest
}

#[test]
fn verify_full_connects_and_a_verified_server_may_ask_for_a_cleartext_password() {
    let pki = Pki::new(&["localhost", "127.0.0.1"], false);
    let (base, server) = tls_server(pki.server_config(false, false), |s| {
        serve_password_and_query(&mut s.expect("handshake"), b"pw\0");
    });
    let info = conninfo(
        &base,
        &format!(
            "password=pw sslmode=verify-full sslrootcert={}",
            pki.path("root.crt")
        ),
    );
    let counter = Arc::new(AtomicUsize::new(0));
    let mut conn = Connection::connect(&info, counting_options(&counter)).expect("connect");
    assert!(conn.tls_in_use() && conn.server_verified() && !conn.channel_bound());
    let rows = conn.simple_query("SELECT 'over tls'").expect("query");
    assert_eq!(rows[0].get("v"), Some("over tls"));
    conn.close();
    server.join().expect("server thread");
}

#[test]
fn wrong_host_name_fails_verify_full_but_passes_verify_ca() {
    let pki = Pki::new(&["db.example.com"], false);
    let (base, server) = tls_server(pki.server_config(false, false), |s| {
        assert!(s.is_none(), "the client must abort the handshake");
    });
    let root = pki.path("root.crt");
    let info = conninfo(&base, &format!("sslmode=verify-full sslrootcert={root}"));
    let err = Connection::connect(&info, ConnectOptions::new()).expect_err("wrong name");
    assert!(
        matches!(&err, SourceError::Tls { reason, .. } if reason.contains("does not match host name")),
        "{err:?}"
    );
    assert_eq!(err.sqlstate(), "08001");
    assert!(err.hint().is_some_and(|h| h.contains("verify-ca")));
    server.join().expect("server thread");

    let (base, server) = tls_server(pki.server_config(false, false), |s| {
        serve_password_and_query(&mut s.expect("handshake"), b"pw\0");
    });
    let info = conninfo(
        &base,
        &format!("password=pw sslmode=verify-ca sslrootcert={root}"),
    );
    let mut conn = Connection::connect(&info, ConnectOptions::new()).expect("verify-ca");
    assert!(conn.server_verified());
    conn.simple_query("SELECT 1").expect("query");
    drop(conn);
    server.join().expect("server thread");
}

#[test]
fn expired_or_foreign_certificates_fail_verification() {
    let pki = Pki::new(&["127.0.0.1"], true);
    let (base, server) = tls_server(pki.server_config(false, false), |s| assert!(s.is_none()));
    let info = conninfo(
        &base,
        &format!("sslmode=verify-ca sslrootcert={}", pki.path("root.crt")),
    );
    let err = Connection::connect(&info, ConnectOptions::new()).expect_err("expired");
    assert!(
        matches!(&err, SourceError::Tls { reason, .. } if reason.contains("expired")),
        "{err:?}"
    );
    server.join().expect("server thread");

    // A root file given makes even sslmode=require check the chain, as libpq does.
    let other = Pki::new(&["127.0.0.1"], false);
    let (base, server) = tls_server(other.server_config(false, false), |s| assert!(s.is_none()));
    let info = conninfo(
        &base,
        &format!("sslmode=require sslrootcert={}", pki.path("root.crt")),
    );
    let err = Connection::connect(&info, ConnectOptions::new()).expect_err("unknown CA");
    // Both CAs have the same name, so the chain is found and its signature fails.
    assert!(
        matches!(&err, SourceError::Tls { reason, .. } if reason.contains("certificate verify failed")),
        "{err:?}"
    );
    server.join().expect("server thread");
}

#[test]
fn require_without_roots_encrypts_but_keeps_the_password_from_the_unverified_server() {
    let pki = Pki::new(&["127.0.0.1"], false);
    let (base, server) = tls_server(pki.server_config(false, false), |s| {
        let mut s = s.expect("handshake");
        read_startup(&mut s);
        s.write_all(&auth(3, &[])).expect("write");
        assert!(drain(&mut s).is_empty(), "no password may follow");
    });
    let info = conninfo(&base, "password=topsecret sslmode=require");
    let err = Connection::connect(&info, ConnectOptions::new()).expect_err("refused");
    assert!(
        matches!(&err, SourceError::AuthenticationRefused { reason, .. }
            if reason.contains("over TLS without a verified server certificate")),
        "{err:?}"
    );
    assert_eq!(err.sqlstate(), "28000");
    assert!(!err.to_string().contains("topsecret"));
    server.join().expect("server thread");

    // Naming the method is the opt-in; the connection is then encrypted, not verified.
    let (base, server) = tls_server(pki.server_config(false, false), |s| {
        serve_password_and_query(&mut s.expect("handshake"), b"topsecret\0");
    });
    let info = conninfo(
        &base,
        "password=topsecret sslmode=require require_auth=password",
    );
    let mut conn = Connection::connect(&info, ConnectOptions::new()).expect("connect");
    assert!(conn.tls_in_use() && !conn.server_verified());
    conn.simple_query("SELECT 1").expect("query");
    drop(conn);
    server.join().expect("server thread");
}

#[test]
fn a_server_without_tls_is_refused_when_tls_is_required() {
    let (base, server) = fake_server(|mut s| {
        read_ssl_request(&mut s).expect("SSLRequest first");
        s.write_all(b"N").expect("write");
        assert!(
            drain(&mut s).is_empty(),
            "nothing after N when TLS is required"
        );
    });
    let info = conninfo(&base, "password=topsecret sslmode=require");
    let err = Connection::connect(&info, ConnectOptions::new()).expect_err("refused");
    assert!(matches!(err, SourceError::TlsRefused { .. }), "{err:?}");
    assert!(err.to_string().contains("does not support SSL"));
    server.join().expect("server thread");
}

#[test]
fn plaintext_cleartext_and_md5_requests_are_refused_by_default() {
    for (code, extra) in [(3u32, &[][..]), (5, &[1, 2, 3, 4][..])] {
        let (base, server) = fake_server(move |mut s| {
            read_startup(&mut s); // answers N to the SSLRequest of sslmode=prefer
            s.write_all(&auth(code, extra)).expect("write");
            assert!(drain(&mut s).is_empty(), "no password may follow");
        });
        let info = conninfo(&base, "password=topsecret");
        let err = Connection::connect(&info, ConnectOptions::new()).expect_err("refused");
        assert!(
            matches!(&err, SourceError::AuthenticationRefused { reason, .. }
                if reason.contains("over a connection without TLS")),
            "{err:?}"
        );
        server.join().expect("server thread");
    }
}

#[test]
fn unencrypted_bytes_after_the_ssl_answer_are_refused() {
    let (base, server) = fake_server(|mut s| {
        read_ssl_request(&mut s).expect("SSLRequest first");
        // An injected reply that would be taken as coming through TLS (CVE-2021-23222).
        let mut out = b"S".to_vec();
        out.extend(auth(0, &[]));
        s.write_all(&out).expect("write");
        drain(&mut s);
    });
    let info = conninfo(&base, "sslmode=require");
    let err = Connection::connect(&info, ConnectOptions::new()).expect_err("injection");
    assert!(
        matches!(&err, SourceError::Protocol(m) if m.contains("unencrypted data")),
        "{err:?}"
    );
    server.join().expect("server thread");
}

/// A fake server for two connections in turn.
fn two_connections(
    first: impl FnOnce(TcpStream) + Send + 'static,
    second: impl FnOnce(TcpStream) + Send + 'static,
) -> (ConnInfo, JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let handle = std::thread::spawn(move || {
        first(listener.accept().expect("accept").0);
        second(listener.accept().expect("accept").0);
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

#[test]
fn prefer_falls_back_to_plaintext_after_a_failed_handshake() {
    let (base, server) = two_connections(
        |mut s| {
            read_ssl_request(&mut s).expect("SSLRequest first");
            s.write_all(b"S").expect("write");
            // Not a TLS server after all.
            let mut hello = [0u8; 5];
            let _ = s.read(&mut hello);
            let _ = s.write_all(b"garbage that is no TLS record\n");
        },
        |mut s| {
            let params = read_startup(&mut s);
            assert!(params.iter().any(|(k, v)| k == "user" && v == "alice"));
            s.write_all(&ready_sequence()).expect("write");
            drain(&mut s);
        },
    );
    let info = conninfo(&base, "sslmode=prefer");
    let conn = Connection::connect(&info, ConnectOptions::new()).expect("plaintext retry");
    assert!(!conn.tls_in_use());
    drop(conn);
    server.join().expect("server thread");

    // require never falls back.
    let (base, server) = fake_server(|mut s| {
        read_ssl_request(&mut s).expect("SSLRequest first");
        s.write_all(b"S").expect("write");
        let mut hello = [0u8; 5];
        let _ = s.read(&mut hello);
        let _ = s.write_all(b"garbage that is no TLS record\n");
    });
    let info = conninfo(&base, "sslmode=require");
    let err = Connection::connect(&info, ConnectOptions::new()).expect_err("no fallback");
    assert!(matches!(err, SourceError::Tls { .. }), "{err:?}");
    server.join().expect("server thread");
}

#[test]
fn allow_retries_with_tls_when_the_server_rejects_plaintext() {
    let pki = Pki::new(&["127.0.0.1"], false);
    let config = pki.server_config(false, false);
    let (base, server) = two_connections(
        |mut s| {
            read_startup(&mut s);
            let body = crate::source::protocol::tests::error_body(&[
                (b'V', "FATAL"),
                (b'C', "28000"),
                (
                    b'M',
                    "no pg_hba.conf entry for host \"127.0.0.1\", no encryption",
                ),
            ]);
            s.write_all(&frame(b'E', &body)).expect("write");
        },
        move |tcp| {
            let mut s = accept_tls(tcp, config).expect("handshake");
            read_startup(&mut s);
            s.write_all(&ready_sequence()).expect("write");
            drain(&mut s);
        },
    );
    let info = conninfo(&base, "sslmode=allow");
    let conn = Connection::connect(&info, ConnectOptions::new()).expect("TLS retry");
    assert!(conn.tls_in_use());
    drop(conn);
    server.join().expect("server thread");
}

#[test]
fn client_certificates() {
    let pki = Pki::new(&["127.0.0.1"], false);
    let (base, server) = tls_server(pki.server_config(true, false), |s| {
        let mut s = s.expect("handshake with a client certificate");
        assert!(s.conn.peer_certificates().is_some_and(|c| !c.is_empty()));
        read_startup(&mut s);
        s.write_all(&ready_sequence()).expect("write");
        drain(&mut s);
    });
    let info = conninfo(
        &base,
        &format!(
            "sslmode=verify-ca sslrootcert={} sslcert={} sslkey={}",
            pki.path("root.crt"),
            pki.path("client.crt"),
            pki.path("client.key")
        ),
    );
    let conn = Connection::connect(&info, ConnectOptions::new()).expect("cert auth");
    assert!(!conn.used_password());
    drop(conn);
    server.join().expect("server thread");

    // Without one the server ends the handshake.
    let (base, server) = tls_server(pki.server_config(true, false), |s| assert!(s.is_none()));
    let info = conninfo(
        &base,
        &format!("sslmode=verify-ca sslrootcert={}", pki.path("root.crt")),
    );
    let err = Connection::connect(&info, ConnectOptions::new()).expect_err("no cert");
    assert!(matches!(err, SourceError::Tls { .. }), "{err:?}");
    server.join().expect("server thread");

    // A key others may read is refused before connecting, as libpq does.
    fs::set_permissions(
        pki.dir.join("client.key"),
        fs::Permissions::from_mode(0o644),
    )
    .expect("chmod");
    let info = conninfo(
        &ConnInfo {
            host: Some("127.0.0.1".into()),
            port: 1,
            ..ConnInfo::default()
        },
        &format!(
            "sslcert={} sslkey={}",
            pki.path("client.crt"),
            pki.path("client.key")
        ),
    );
    let err = Connection::connect(&info, ConnectOptions::new()).expect_err("key mode");
    assert!(
        matches!(&err, SourceError::TlsConfig { reason, .. } if reason.contains("group or world access")),
        "{err:?}"
    );
}

#[test]
fn channel_binding() {
    let pki = Pki::new(&["127.0.0.1"], false);
    let root = pki.path("root.crt");
    // The server offers SCRAM-SHA-256-PLUS: the client picks it, bound to the certificate.
    let (base, server) = tls_server(pki.server_config(false, false), |s| {
        let mut s = s.expect("handshake");
        read_startup(&mut s);
        s.write_all(&auth(10, b"SCRAM-SHA-256-PLUS\0SCRAM-SHA-256\0\0"))
            .expect("write");
        let (tag, body) = read_msg(&mut s);
        assert_eq!(tag, b'p');
        assert!(body.starts_with(b"SCRAM-SHA-256-PLUS\0"), "{body:?}");
        let first = &body[b"SCRAM-SHA-256-PLUS\0".len() + 4..];
        assert!(first.starts_with(b"p=tls-server-end-point,,"), "{first:?}");
        drain(&mut s);
    });
    let info = conninfo(
        &base,
        &format!("password=pw sslmode=verify-ca sslrootcert={root} channel_binding=require"),
    );
    // The fake server stops there; the client sent what we check above.
    let _ = Connection::connect(&info, ConnectOptions::new()).expect_err("fake stops");
    server.join().expect("server thread");

    // channel_binding=require: SCRAM without PLUS, or trust, is refused.
    for request in [
        auth(10, b"SCRAM-SHA-256\0\0"),
        auth(0, &[]),
        auth(5, &[1, 2, 3, 4]),
    ] {
        let (base, server) = tls_server(pki.server_config(false, false), move |s| {
            let mut s = s.expect("handshake");
            read_startup(&mut s);
            s.write_all(&request).expect("write");
            assert!(drain(&mut s).is_empty(), "nothing may follow");
        });
        let info = conninfo(
            &base,
            &format!("password=pw sslmode=verify-ca sslrootcert={root} channel_binding=require"),
        );
        let err = Connection::connect(&info, ConnectOptions::new()).expect_err("refused");
        assert!(
            matches!(&err, SourceError::AuthenticationRefused { reason, .. } if reason.contains("channel binding")),
            "{err:?}"
        );
        server.join().expect("server thread");
    }

    // Over TLS without PLUS on offer, the client says it could have bound ("y").
    let (base, server) = tls_server(pki.server_config(false, false), |s| {
        let mut s = s.expect("handshake");
        read_startup(&mut s);
        s.write_all(&auth(10, b"SCRAM-SHA-256\0\0")).expect("write");
        let (_, body) = read_msg(&mut s);
        let first = &body[b"SCRAM-SHA-256\0".len() + 4..];
        assert!(first.starts_with(b"y,,"), "{first:?}");
        drain(&mut s);
    });
    let info = conninfo(&base, "password=pw sslmode=require");
    let _ = Connection::connect(&info, ConnectOptions::new()).expect_err("fake stops");
    server.join().expect("server thread");
}

#[test]
fn direct_tls_negotiation() {
    let pki = Pki::new(&["127.0.0.1"], false);
    let config = pki.server_config(false, true);
    let (base, server) = fake_server(move |tcp| {
        // No SSLRequest: the ClientHello comes first.
        let mut s = handshake(tcp, config).expect("direct handshake");
        assert_eq!(s.conn.alpn_protocol(), Some(&b"postgresql"[..]));
        read_startup(&mut s);
        s.write_all(&ready_sequence()).expect("write");
        drain(&mut s);
    });
    let info = conninfo(&base, "sslmode=require sslnegotiation=direct");
    let conn = Connection::connect(&info, ConnectOptions::new()).expect("direct");
    assert!(conn.tls_in_use());
    drop(conn);
    server.join().expect("server thread");

    // A server that does not speak ALPN is older than PostgreSQL 17.
    let config = pki.server_config(false, false);
    let (base, server) = fake_server(move |tcp| {
        if let Some(mut s) = handshake(tcp, config) {
            drain(&mut s);
        }
    });
    let info = conninfo(&base, "sslmode=require sslnegotiation=direct");
    let err = Connection::connect(&info, ConnectOptions::new()).expect_err("no ALPN");
    assert!(
        matches!(&err, SourceError::Tls { reason, .. } if reason.contains("ALPN")),
        "{err:?}"
    );
    server.join().expect("server thread");
}

/// A large result whose TLS records arrive in pieces with pauses longer than the 100 ms read
/// slices: every timeout lands in the middle of a record, and the stream must come out whole.
#[test]
fn records_split_across_read_timeouts_stay_intact() {
    let pki = Pki::new(&["127.0.0.1"], false);
    let value: String = (0..300_000)
        .map(|i| char::from(b'a' + (i % 26) as u8))
        .collect();
    let expected = value.clone();
    let (base, server) = tls_server(pki.server_config(false, false), move |s| {
        let mut s = s.expect("handshake");
        read_startup(&mut s);
        s.write_all(&ready_sequence()).expect("write");
        let (tag, _) = read_msg(&mut s);
        assert_eq!(tag, b'Q');
        let mut out = row_description(&["v"]);
        out.extend(data_row(&[Some(&value)]));
        out.extend(frame(b'C', b"SELECT 1\0"));
        out.extend(frame(b'Z', b"I"));
        // Encrypt everything, then dribble the ciphertext out in odd-sized pieces.
        let (session, tcp) = (&mut s.conn, &mut s.sock);
        session.set_buffer_limit(None);
        session.writer().write_all(&out).expect("encrypt");
        let mut wire = Vec::new();
        while session.wants_write() {
            session.write_tls(&mut wire).expect("to vec");
        }
        for (i, piece) in wire.chunks(70_001).enumerate() {
            if i > 0 {
                std::thread::sleep(Duration::from_millis(250));
            }
            tcp.write_all(piece).expect("write");
        }
        drain(&mut s);
    });
    let info = conninfo(&base, "sslmode=require");
    let counter = Arc::new(AtomicUsize::new(0));
    let mut conn = Connection::connect(&info, counting_options(&counter)).expect("connect");
    let before = counter.load(Ordering::Relaxed);
    let rows = conn.simple_query("SELECT big").expect("query");
    assert_eq!(rows[0].get("v"), Some(expected.as_str()));
    assert!(
        counter.load(Ordering::Relaxed) >= before + 4,
        "interrupt checks ran while waiting mid-record"
    );
    assert!(conn.is_usable());
    drop(conn);
    server.join().expect("server thread");
}
