//! End to end: the source client over TLS against a real PostgreSQL with `ssl = on`, through
//! `cloudmig.assess()` (and one full migration), so the client runs inside the extension as it
//! does in production. Certificates are made here: a CA, a server certificate for `localhost`
//! and 127.0.0.1, an expired one, and a client certificate for `cert_user`.
//!
//! Host names: `host=localhost hostaddr=127.0.0.1` checks the certificate against `localhost`
//! while connecting to 127.0.0.1 with no DNS involved; `host=wrong.example hostaddr=...` is a
//! name the certificate does not carry.

use cloudmig_e2e::{Cluster, ClusterBuilder};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
use std::path::Path;

const PASSWORD: &str = "s3cret-Pa55";

struct Certs {
    ca: String,
    server: (String, String),
    expired: (String, String),
    client: (String, String),
}

fn certs() -> Certs {
    let ca_key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params
        .distinguished_name
        .push(DnType::CommonName, "cloudmig e2e CA");
    let ca = params.self_signed(&ca_key).unwrap();
    let issue = |names: &[&str], cn: &str, expired: bool| {
        let key = KeyPair::generate().unwrap();
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let mut params = CertificateParams::new(names).unwrap();
        params.distinguished_name.push(DnType::CommonName, cn);
        if expired {
            params.not_before = rcgen::date_time_ymd(2001, 1, 1);
            params.not_after = rcgen::date_time_ymd(2002, 1, 1);
        }
        let cert = params.signed_by(&key, &ca, &ca_key).unwrap();
        (cert.pem(), key.serialize_pem())
    };
    Certs {
        server: issue(&["localhost", "127.0.0.1"], "localhost", false),
        expired: issue(&["localhost", "127.0.0.1"], "localhost", true),
        client: issue(&[], "cert_user", false),
        ca: ca.pem(),
    }
}

/// A source with TLS on: SCRAM over TLS for `migrator` (SQL and replication), client
/// certificates for `cert_user`, and plaintext-only accounts to show what is refused.
fn tls_source(name: &str, server: &(String, String), ca: &str) -> Cluster {
    ClusterBuilder::source(name)
        .data_file("server.crt", server.0.as_bytes())
        .data_file("server.key", server.1.as_bytes())
        .data_file("root.crt", ca.as_bytes())
        .conf("ssl = on")
        .conf("ssl_cert_file = 'server.crt'")
        .conf("ssl_key_file = 'server.key'")
        .conf("ssl_ca_file = 'root.crt'")
        .conf("max_slot_wal_keep_size = '1GB'")
        .hba(&[
            "local all all trust",
            "hostssl all migrator 127.0.0.1/32 scram-sha-256",
            "hostssl all cert_user 127.0.0.1/32 cert",
            "hostnossl all plain_user 127.0.0.1/32 password",
            "hostnossl all scram_user 127.0.0.1/32 scram-sha-256",
            "hostssl all postgres 127.0.0.1/32 scram-sha-256",
        ])
        .init_sql(&format!(
            "SET password_encryption = 'scram-sha-256';
             CREATE ROLE migrator LOGIN REPLICATION SUPERUSER PASSWORD '{PASSWORD}';
             CREATE ROLE cert_user LOGIN SUPERUSER;
             CREATE ROLE plain_user LOGIN PASSWORD '{PASSWORD}';
             CREATE ROLE scram_user LOGIN PASSWORD '{PASSWORD}';
             ALTER ROLE postgres PASSWORD '{PASSWORD}';"
        ))
        .start()
}

/// The destination, with the CA and the client certificate where its server process can
/// read them; returns the paths.
fn destination(name: &str, certs: &Certs) -> (Cluster, String, String, String) {
    let dest = ClusterBuilder::destination(name).start();
    let path = |p: &Path| p.to_string_lossy().into_owned();
    let root = path(&dest.write_file("source-root.crt", certs.ca.as_bytes()));
    let cert = path(&dest.write_file("client.crt", certs.client.0.as_bytes()));
    let key = path(&dest.write_file("client.key", certs.client.1.as_bytes()));
    (dest, root, cert, key)
}

/// (status, detail) of the `source_connection` check of a fresh assessment.
fn connection_check(dest: &Cluster, conninfo: &str) -> (String, String) {
    let mut client = dest.client("postgres");
    let id: i64 = client
        .query_one("SELECT cloudmig.assess($1)", &[&conninfo])
        .unwrap_or_else(|e| panic!("assess failed: {e:?}"))
        .get(0);
    let row = client
        .query_one(
            "SELECT status, detail FROM cloudmig.assessment_checks \
              WHERE assessment_id = $1 AND name = 'source_connection'",
            &[&id],
        )
        .expect("check");
    (row.get(0), row.get(1))
}

fn check_status(dest: &Cluster, conninfo: &str, name: &str) -> (String, String) {
    let mut client = dest.client("postgres");
    let id: i64 = client
        .query_one("SELECT cloudmig.assess($1)", &[&conninfo])
        .unwrap_or_else(|e| panic!("assess failed: {e:?}"))
        .get(0);
    let row = client
        .query_one(
            "SELECT status, detail FROM cloudmig.assessment_checks \
              WHERE assessment_id = $1 AND name = $2",
            &[&id, &name],
        )
        .expect("check");
    (row.get(0), row.get(1))
}

fn assert_pass(dest: &Cluster, conninfo: &str, detail: &str) {
    let (status, got) = connection_check(dest, conninfo);
    assert_eq!(status, "pass", "{conninfo}: {got}");
    assert!(got.contains(detail), "{conninfo}: {got:?} lacks {detail:?}");
}

fn assert_fail(dest: &Cluster, conninfo: &str, detail: &str) {
    let (status, got) = connection_check(dest, conninfo);
    assert_eq!(status, "fail", "{conninfo}: {got}");
    assert!(got.contains(detail), "{conninfo}: {got:?} lacks {detail:?}");
}

#[test]
fn certificates_host_names_client_certificates_and_channel_binding() {
    let certs = certs();
    let source = tls_source("tls-src", &certs.server, &certs.ca);
    let (dest, root, cert, key) = destination("tls-dst", &certs);
    let port = source.port;
    let base = format!("hostaddr=127.0.0.1 port={port} dbname=postgres");
    let migrator = format!("{base} user=migrator password={PASSWORD}");

    // verify-full: chain and name check; SCRAM over TLS; replication over TLS too.
    let full = format!("{migrator} host=localhost sslmode=verify-full sslrootcert={root}");
    assert_pass(&dest, &full, "over TLS (server certificate verified)");
    let (status, detail) = check_status(&dest, &full, "source_replication_connection");
    assert_eq!(status, "pass", "{detail}");

    // A name the certificate does not carry fails verify-full but passes verify-ca.
    let wrong = format!("{migrator} host=wrong.example sslrootcert={root}");
    assert_fail(
        &dest,
        &format!("{wrong} sslmode=verify-full"),
        "does not match host name",
    );
    assert_pass(
        &dest,
        &format!("{wrong} sslmode=verify-ca"),
        "server certificate verified",
    );
    // require without roots encrypts without authenticating the server; SCRAM still works.
    assert_pass(
        &dest,
        &format!("{migrator} host=localhost sslmode=require"),
        "server certificate not verified",
    );
    // verify-ca without a root file is refused before connecting.
    assert_fail(
        &dest,
        &format!("{migrator} host=localhost sslmode=verify-ca"),
        "needs a root certificate",
    );

    // `hostssl ... cert`: the client certificate is the credential.
    let cert_user = format!(
        "{base} host=localhost user=cert_user sslmode=verify-full sslrootcert={root} \
         sslcert={cert} sslkey={key}"
    );
    assert_pass(&dest, &cert_user, "as cert_user");
    assert_fail(
        &dest,
        &format!("{base} host=localhost user=cert_user sslmode=verify-full sslrootcert={root}"),
        "certificate",
    );

    // channel_binding=require: SCRAM-SHA-256-PLUS over TLS works, nothing else does.
    assert_pass(
        &dest,
        &format!("{full} channel_binding=require"),
        "over TLS (server certificate verified)",
    );
    assert_fail(
        &dest,
        &format!(
            "{base} user=scram_user password={PASSWORD} sslmode=disable channel_binding=require"
        ),
        "channel binding",
    );
    assert_pass(
        &dest,
        &format!("{base} user=scram_user password={PASSWORD} sslmode=disable"),
        "as scram_user",
    );

    // A cleartext password request over plaintext is refused unless asked for.
    let plain = format!("{base} user=plain_user password={PASSWORD}");
    assert_fail(&dest, &plain, "refused by the client");
    assert_pass(
        &dest,
        &format!("{plain} require_auth=password"),
        "as plain_user",
    );
    // require_auth=scram-sha-256 refuses it even when named elsewhere.
    assert_fail(
        &dest,
        &format!("{plain} require_auth=scram-sha-256"),
        "server requested a cleartext password",
    );
}

#[test]
fn an_expired_server_certificate_fails_verification() {
    let certs = certs();
    let source = tls_source("tls-exp-src", &certs.expired, &certs.ca);
    let (dest, root, _, _) = destination("tls-exp-dst", &certs);
    let conninfo = format!(
        "host=localhost hostaddr=127.0.0.1 port={} user=migrator password={PASSWORD} \
         dbname=postgres sslrootcert={root}",
        source.port
    );
    assert_fail(
        &dest,
        &format!("{conninfo} sslmode=verify-ca"),
        "certificate has expired",
    );
    // prefer with a root file checks the chain too, and falls back to plaintext, which
    // this source's pg_hba.conf does not allow for migrator.
    let (status, _) = connection_check(&dest, &format!("{conninfo} sslmode=prefer"));
    assert_eq!(status, "fail");
}

/// A whole migration over TLS: pg_dump (libpq) gets the TLS options, COPY OUT and the
/// logical replication stream run over TLS, and a change made afterwards is applied.
#[test]
fn a_migration_runs_over_tls() {
    let certs = certs();
    let source = tls_source("tls-mig-src", &certs.server, &certs.ca);
    source.execute(
        "postgres",
        "CREATE TABLE items (id int PRIMARY KEY, body text);
         INSERT INTO items SELECT g, repeat('x', 200) || g FROM generate_series(1, 20000) g;",
    );
    let (dest, root, _, _) = destination("tls-mig-dst", &certs);
    let conninfo = format!(
        "host=localhost hostaddr=127.0.0.1 port={} user=migrator password={PASSWORD} \
         dbname=postgres sslmode=verify-full sslrootcert={root} channel_binding=require",
        source.port
    );
    let mut client = dest.client("postgres");
    let assessment: i64 = client
        .query_one("SELECT cloudmig.assess($1)", &[&conninfo])
        .expect("assess")
        .get(0);
    let task: i64 = client
        .query_one("SELECT cloudmig.start($1)", &[&assessment])
        .unwrap_or_else(|e| panic!("start: {e:?}"))
        .get(0);
    cloudmig_e2e::migration::wait_phase(&dest, task, "incremental");
    assert_eq!(
        dest.query_scalar::<i64>("postgres", "SELECT count(*) FROM items"),
        20000
    );
    source.execute(
        "postgres",
        "INSERT INTO items VALUES (20001, 'after the copy'); DELETE FROM items WHERE id = 1;",
    );
    cloudmig_e2e::migration::caught_up(&source, &dest, task);
    assert_eq!(
        dest.query_scalar::<String>("postgres", "SELECT body FROM items WHERE id = 20001"),
        "after the copy"
    );
    // Every walsender and backend of the migration came in over TLS.
    let plaintext: i64 = source.query_scalar(
        "postgres",
        "SELECT count(*) FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid) \
          WHERE a.usename = 'migrator' AND NOT s.ssl",
    );
    assert_eq!(plaintext, 0);
    let over_tls: i64 = source.query_scalar(
        "postgres",
        "SELECT count(*) FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid) \
          WHERE a.usename = 'migrator' AND s.ssl",
    );
    assert!(over_tls > 0, "the apply's stream runs over TLS");
}
