//! End to end: `cloudmig.assess()` against real source clusters, each built
//! with the defect a check must find, and a correctly prepared one that
//! passes. Every test starts its own clusters (see the harness).

use cloudmig_e2e::{poll_until, Cluster, ClusterBuilder};
use std::net::TcpListener;
use std::time::Duration;

const PASSWORD: &str = "s3cret-Pa55";

/// The migration account the README tells DBAs to create.
const MIGRATOR_SQL: &str = "
    SET password_encryption = 'scram-sha-256';
    CREATE ROLE migrator LOGIN REPLICATION CREATEROLE PASSWORD 's3cret-Pa55';
    GRANT pg_monitor TO migrator;
    GRANT pg_read_all_data TO migrator;
";

/// pg_hba.conf of a source that wants SCRAM passwords over TCP.
const SCRAM_HBA: &[&str] = &[
    "local all all trust",
    "host all all 127.0.0.1/32 scram-sha-256",
    "host replication all 127.0.0.1/32 scram-sha-256",
];

/// A source prepared as the README says.
fn prepared_source(name: &str) -> ClusterBuilder {
    ClusterBuilder::source(name)
        .hba(SCRAM_HBA)
        .conf("max_slot_wal_keep_size = '1GB'")
        .init_sql(MIGRATOR_SQL)
        .init_sql("CREATE DATABASE app")
        // A non-superuser streams what it can publish: tables of owners it
        // has the privileges of, in databases where it may create.
        .init_sql(
            "CREATE ROLE app_owner NOLOGIN; GRANT app_owner TO migrator; \
             GRANT CREATE ON DATABASE postgres, app TO migrator",
        )
}

fn destination(name: &str) -> Cluster {
    ClusterBuilder::destination(name).start()
}

/// Runs an assessment as the destination's superuser; returns its id.
fn assess(dest: &Cluster, conninfo: &str) -> i64 {
    assess_with(dest, conninfo, "{}")
}

fn assess_with(dest: &Cluster, conninfo: &str, options: &str) -> i64 {
    let mut client = dest.client("postgres");
    let row = client
        .query_one(
            "SELECT cloudmig.assess($1, $2::text::jsonb)",
            &[&conninfo, &options],
        )
        .unwrap_or_else(|e| panic!("assess failed: {e:?}"));
    row.get(0)
}

/// (status, detail, fix) of one check.
fn check(dest: &Cluster, id: i64, name: &str) -> (String, String, Option<String>) {
    let mut client = dest.client("postgres");
    let row = client
        .query_opt(
            "SELECT status, detail, fix FROM cloudmig.assessment_checks \
              WHERE assessment_id = $1 AND name = $2",
            &[&id, &name],
        )
        .expect("query checks")
        .unwrap_or_else(|| panic!("assessment {id} has no check {name}"));
    (row.get(0), row.get(1), row.get(2))
}

fn assert_check(dest: &Cluster, id: i64, name: &str, status: &str, detail: &str, fix: &str) {
    let (got_status, got_detail, got_fix) = check(dest, id, name);
    assert_eq!(got_status, status, "{name}: {got_detail} / {got_fix:?}");
    assert!(
        got_detail.contains(detail),
        "{name} detail {got_detail:?} lacks {detail:?}"
    );
    let got_fix = got_fix.unwrap_or_default();
    assert!(
        got_fix.contains(fix),
        "{name} fix {got_fix:?} lacks {fix:?}"
    );
}

fn passed(dest: &Cluster, id: i64) -> bool {
    dest.query_scalar(
        "postgres",
        &format!("SELECT passed FROM cloudmig.assessments WHERE id = {id}"),
    )
}

/// The SQLSTATE of a failed call.
fn sqlstate(result: Result<Vec<postgres::Row>, postgres::Error>) -> String {
    match result {
        Ok(_) => panic!("expected an error"),
        Err(e) => e
            .code()
            .map(|c| c.code().to_string())
            .unwrap_or_else(|| format!("{e}")),
    }
}

#[test]
fn a_prepared_source_passes_every_check() {
    let source = prepared_source("ok-src")
        .init_sql(
            "CREATE TABLE public.items (id int PRIMARY KEY, name text); \
             ALTER TABLE public.items OWNER TO app_owner",
        )
        .start();
    let dest = destination("ok-dst");
    let id = assess(
        &dest,
        &source.tcp_conninfo("migrator", Some(PASSWORD), "postgres"),
    );
    let not_passing: Vec<(String, String)> = dest
        .client("postgres")
        .query(
            "SELECT name, detail FROM cloudmig.assessment_checks \
              WHERE assessment_id = $1 AND status <> 'pass' ORDER BY ordinal",
            &[&id],
        )
        .expect("query")
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    // Left for a non-superuser: the superuser-only password read,
    let names: Vec<&str> = not_passing.iter().map(|(n, _)| n.as_str()).collect();
    // and the fence at switchover, which needs the owner of `postgres` (a superuser).
    assert_eq!(
        names,
        vec!["source_role_passwords", "source_switchover_fence"],
        "{not_passing:#?}"
    );
    assert!(passed(&dest, id));
    let databases: Vec<String> = dest.query_scalar(
        "postgres",
        &format!("SELECT source_databases FROM cloudmig.assessments WHERE id = {id}"),
    );
    assert_eq!(databases, vec!["app".to_string(), "postgres".to_string()]);
}

#[test]
fn every_authentication_method_connects() {
    let source = ClusterBuilder::source("auth-src")
        .hba(&[
            "local all all trust",
            "host all scram_user 127.0.0.1/32 scram-sha-256",
            "host all md5_user 127.0.0.1/32 md5",
            "host all plain_user 127.0.0.1/32 password",
            "host all trust_user 127.0.0.1/32 trust",
        ])
        .init_sql(
            "SET password_encryption = 'scram-sha-256';
             CREATE ROLE scram_user LOGIN PASSWORD 'pw1';
             SET password_encryption = 'md5';
             CREATE ROLE md5_user LOGIN PASSWORD 'pw2';
             CREATE ROLE plain_user LOGIN PASSWORD 'pw3';
             CREATE ROLE trust_user LOGIN;",
        )
        .start();
    let dest = destination("auth-dst");
    // md5 and cleartext passwords go to a server not authenticated by TLS only when named in
    // require_auth (see the README's Security section).
    for (user, password, extra) in [
        ("scram_user", Some("pw1"), ""),
        ("md5_user", Some("pw2"), " require_auth=md5"),
        ("plain_user", Some("pw3"), " require_auth=password"),
        ("trust_user", None, ""),
    ] {
        let conninfo = source.tcp_conninfo(user, password, "postgres") + extra;
        let id = assess(&dest, &conninfo);
        assert_check(&dest, id, "source_connection", "pass", user, "");
        if !extra.is_empty() {
            let id = assess(&dest, &source.tcp_conninfo(user, password, "postgres"));
            assert_check(
                &dest,
                id,
                "source_connection",
                "fail",
                "refused by the client",
                "require_auth",
            );
        }
    }
    // A wrong password is told apart from the rest.
    let id = assess(
        &dest,
        &source.tcp_conninfo("scram_user", Some("wrong"), "postgres"),
    );
    assert_check(
        &dest,
        id,
        "source_connection",
        "fail",
        "password authentication failed",
        "check the user name and password",
    );
    assert!(!passed(&dest, id));
}

#[test]
fn unreachable_refused_and_silent_sources_are_told_apart() {
    let dest = destination("net-dst");
    // Nothing listens on a port we just released.
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let id = assess(
        &dest,
        &format!("host=127.0.0.1 port={port} user=x password=y"),
    );
    assert_check(
        &dest,
        id,
        "source_connection",
        "fail",
        "refused",
        "listen_addresses",
    );

    let id = assess(&dest, "host=no-such-host.invalid user=x password=y");
    assert_check(
        &dest,
        id,
        "source_connection",
        "fail",
        "no-such-host.invalid",
        "host name",
    );

    // A listener that accepts and never answers: a timeout, bounded.
    let silent = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = silent.local_addr().unwrap().port();
    let id = assess(
        &dest,
        &format!("host=127.0.0.1 port={port} user=x password=y connect_timeout=2"),
    );
    assert_check(
        &dest,
        id,
        "source_connection",
        "fail",
        "timed out",
        "connect_timeout",
    );
    drop(silent);

    // The destination's own checks still ran.
    let (status, detail, _) = check(&dest, id, "destination_is_empty");
    assert_eq!(status, "pass", "{detail}");
}

#[test]
fn wal_level_replica_fails() {
    let source = prepared_source("wal-src")
        .conf("wal_level = replica")
        .start();
    let dest = destination("wal-dst");
    let id = assess(
        &dest,
        &source.tcp_conninfo("migrator", Some(PASSWORD), "postgres"),
    );
    assert_check(
        &dest,
        id,
        "source_wal_level",
        "fail",
        "replica",
        "wal_level = logical",
    );
    assert!(!passed(&dest, id));
}

#[test]
fn slots_senders_and_plugin_allow_list_are_checked() {
    let source = prepared_source("slots-src")
        .conf("max_replication_slots = 2")
        .conf("max_wal_senders = 1")
        .conf("output_plugin_libraries = 'test_decoding'")
        .init_sql("SELECT pg_create_logical_replication_slot('other_tool', 'test_decoding')")
        .start();
    let dest = destination("slots-dst");
    let id = assess(
        &dest,
        &source.tcp_conninfo("migrator", Some(PASSWORD), "postgres"),
    );
    // Two databases need two slots; one of two is taken.
    assert_check(
        &dest,
        id,
        "source_replication_slots",
        "fail",
        "2 needed",
        "drop unused slots (other_tool)",
    );
    assert_check(
        &dest,
        id,
        "source_wal_senders",
        "fail",
        "max_wal_senders = 1",
        "max_wal_senders = 2",
    );
    assert_check(
        &dest,
        id,
        "source_output_plugin",
        "fail",
        "test_decoding",
        "pgoutput",
    );
}

#[test]
fn unlimited_slot_wal_keep_size_warns() {
    let source = prepared_source("keep-src")
        .conf("max_slot_wal_keep_size = -1")
        .start();
    let dest = destination("keep-dst");
    let id = assess(
        &dest,
        &source.tcp_conninfo("migrator", Some(PASSWORD), "postgres"),
    );
    assert_check(
        &dest,
        id,
        "source_slot_wal_keep_size",
        "warn",
        "-1",
        "max_slot_wal_keep_size",
    );
    assert!(passed(&dest, id));
}

#[test]
fn an_unprivileged_account_is_refused_what_it_lacks() {
    let source = ClusterBuilder::source("priv-src")
        .hba(SCRAM_HBA)
        .init_sql(
            "SET password_encryption = 'scram-sha-256';
             CREATE ROLE plain LOGIN PASSWORD 'pw';
             CREATE SCHEMA hidden;
             CREATE TABLE hidden.payroll (id int PRIMARY KEY);
",
        )
        .init_sql("CREATE DATABASE app")
        .init_sql("REVOKE CONNECT ON DATABASE app FROM PUBLIC")
        .start();
    let dest = destination("priv-dst");
    let id = assess(&dest, &source.tcp_conninfo("plain", Some("pw"), "postgres"));
    assert_check(
        &dest,
        id,
        "source_account_privileges",
        "fail",
        "REPLICATION, CREATEROLE, membership in pg_monitor",
        "GRANT pg_monitor TO plain",
    );
    assert_check(
        &dest,
        id,
        "source_role_passwords",
        "warn",
        "not a superuser",
        "ALTER ROLE",
    );
    assert_check(
        &dest,
        id,
        "source_database_access",
        "fail",
        "app: no CONNECT privilege",
        "GRANT CONNECT",
    );
    assert_check(
        &dest,
        id,
        "source_table_access",
        "fail",
        "postgres: hidden.payroll",
        "pg_read_all_data",
    );
    assert_check(
        &dest,
        id,
        "source_replication_connection",
        "fail",
        "refused",
        "REPLICATION",
    );
}

#[test]
fn leftovers_of_another_migration_fail() {
    let source = prepared_source("conc-src")
        .init_sql(
            "SELECT pg_create_logical_replication_slot('cloudmig_7_app', 'pgoutput');
             CREATE PUBLICATION cloudmig_7 FOR ALL TABLES;",
        )
        .start();
    let dest = destination("conc-dst");
    let id = assess(
        &dest,
        &source.tcp_conninfo("migrator", Some(PASSWORD), "postgres"),
    );
    assert_check(
        &dest,
        id,
        "no_concurrent_migration",
        "fail",
        "cloudmig_7_app",
        "pg_drop_replication_slot",
    );
    let (_, detail, _) = check(&dest, id, "no_concurrent_migration");
    assert!(detail.contains("postgres: cloudmig_7"), "{detail}");
}

#[test]
fn extensions_missing_or_too_old_here_fail() {
    // Both clusters share this machine's extension files, so the source's
    // catalog is edited (as a superuser may) to claim what the destination
    // cannot offer.
    let source = prepared_source("ext-src")
        .init_sql(
            "CREATE EXTENSION hstore;
             CREATE EXTENSION pg_trgm;
             UPDATE pg_extension SET extversion = '99.0' WHERE extname = 'hstore';
             UPDATE pg_extension SET extname = 'no_such_extension' WHERE extname = 'pg_trgm';",
        )
        .start();
    let dest = destination("ext-dst");
    let id = assess(
        &dest,
        &source.tcp_conninfo("migrator", Some(PASSWORD), "postgres"),
    );
    assert_check(
        &dest,
        id,
        "extensions_available",
        "fail",
        "no_such_extension",
        "install the packages",
    );
    let (_, detail, _) = check(&dest, id, "extensions_available");
    assert!(
        detail.contains("hstore 99.0 (in postgres; here only"),
        "{detail}"
    );
}

#[test]
fn a_locale_missing_here_fails() {
    let source = prepared_source("loc-src")
        .init_sql("UPDATE pg_database SET datcollate = 'xx_XX.UTF-8' WHERE datname = 'app'")
        .start();
    let dest = destination("loc-dst");
    let id = assess(
        &dest,
        &source.tcp_conninfo("migrator", Some(PASSWORD), "postgres"),
    );
    assert_check(
        &dest,
        id,
        "encodings_and_locales",
        "fail",
        "app: locale xx_XX.UTF-8 does not exist",
        "locale",
    );
}

#[test]
fn things_that_need_a_plan_warn() {
    let source = prepared_source("warn-src")
        .conf("max_prepared_transactions = 2")
        .init_sql(
            "CREATE TABLE public.no_key (a int);
             ALTER TABLE public.no_key OWNER TO app_owner;
             CREATE UNLOGGED TABLE public.scratch (id int PRIMARY KEY);
             SELECT lo_create(4242);",
        )
        .init_sql(
            "BEGIN; CREATE TABLE public.pending (id int PRIMARY KEY); PREPARE TRANSACTION 'tx_pending';",
        )
        .start();
    let tablespace_dir = source.dir.join("tblspc");
    std::fs::create_dir_all(&tablespace_dir).unwrap();
    cloudmig_e2e::chown_to_server(&tablespace_dir).unwrap();
    source.execute(
        "postgres",
        &format!(
            "CREATE TABLESPACE fast LOCATION '{}'",
            tablespace_dir.display()
        ),
    );
    // A transaction left open past the (lowered) threshold.
    let mut idle = source.client("app");
    idle.batch_execute("BEGIN; SELECT txid_current();").unwrap();
    poll_until(
        &source,
        "postgres",
        "SELECT bool_or(now() - xact_start > interval '1 second') FROM pg_stat_activity WHERE datname = 'app'",
        "t",
        Duration::from_secs(30),
    );
    let dest = ClusterBuilder::destination("warn-dst")
        .conf("cloudmig.long_transaction_seconds = 1")
        .start();
    let id = assess(
        &dest,
        &source.tcp_conninfo("migrator", Some(PASSWORD), "postgres"),
    );
    assert_check(
        &dest,
        id,
        "tables_without_replica_identity",
        "warn",
        "postgres: public.no_key",
        "REPLICA IDENTITY FULL",
    );
    assert_check(
        &dest,
        id,
        "unlogged_tables",
        "warn",
        "postgres: public.scratch",
        "SET LOGGED",
    );
    assert_check(
        &dest,
        id,
        "large_objects",
        "warn",
        "postgres: 1",
        "switchover",
    );
    assert_check(
        &dest,
        id,
        "prepared_transactions",
        "warn",
        "tx_pending",
        "ROLLBACK PREPARED",
    );
    assert_check(
        &dest,
        id,
        "long_transactions",
        "warn",
        "on app",
        "pg_terminate_backend",
    );
    assert_check(&dest, id, "tablespaces", "warn", "fast", "same names");
    assert!(
        passed(&dest, id),
        "warnings alone do not fail an assessment"
    );
    idle.batch_execute("ROLLBACK").unwrap();
    // The prepared transaction and the tablespace go with the cluster.
}

#[test]
fn a_destination_in_use_fails_emptiness() {
    let source = prepared_source("busy-src").start();
    let dest = destination("busy-dst");
    dest.execute("postgres", "CREATE DATABASE shop");
    dest.execute("postgres", "CREATE TABLE public.leftover (id int)");
    // template1 is read by an inspection worker, not by the calling backend.
    dest.execute("template1", "CREATE TABLE public.in_template (id int)");
    let id = assess(
        &dest,
        &source.tcp_conninfo("migrator", Some(PASSWORD), "postgres"),
    );
    let (status, detail, fix) = check(&dest, id, "destination_is_empty");
    assert_eq!(status, "fail");
    for needle in [
        "shop",
        "table public.leftover",
        "template1",
        "table public.in_template",
    ] {
        assert!(detail.contains(needle), "{detail} lacks {needle}");
    }
    assert!(fix.unwrap().contains("empty instance"));
}

#[test]
fn destination_capacity_and_disk_are_checked() {
    let source = prepared_source("cap-src").start();
    let dest = ClusterBuilder::destination("cap-dst")
        .conf("max_worker_processes = 2")
        .conf("max_replication_slots = 1")
        .start();
    let id = assess_with(
        &dest,
        &source.tcp_conninfo("migrator", Some(PASSWORD), "postgres"),
        r#"{"disk_headroom_percent": 100000000}"#,
    );
    assert_check(
        &dest,
        id,
        "destination_worker_capacity",
        "fail",
        "max_worker_processes = 2",
        "max_worker_processes",
    );
    assert_check(
        &dest,
        id,
        "destination_replication_origins",
        "fail",
        "max_replication_slots = 1",
        "max_replication_slots",
    );
    assert_check(
        &dest,
        id,
        "destination_disk_space",
        "fail",
        "free on",
        "grow the destination's storage",
    );
}

#[test]
fn a_standby_destination_is_refused() {
    let source = prepared_source("stby-src").start();
    let primary = destination("stby-primary");
    let standby = primary.standby("stby-standby");
    let conninfo = source.tcp_conninfo("migrator", Some(PASSWORD), "postgres");
    let refused = standby
        .client("postgres")
        .query("SELECT cloudmig.assess($1)", &[&conninfo]);
    assert_eq!(sqlstate(refused), "25006");
    // The primary it follows is fine.
    let id = assess(&primary, &conninfo);
    assert_check(
        &primary,
        id,
        "destination_is_primary",
        "pass",
        "primary",
        "",
    );
}

#[test]
fn too_few_source_connections_fail() {
    let source = prepared_source("conn-src")
        .conf("max_connections = 8")
        .conf("superuser_reserved_connections = 3")
        .start();
    let dest = destination("conn-dst");
    let conninfo = source.tcp_conninfo("migrator", Some(PASSWORD), "postgres");
    let id = assess_with(&dest, &conninfo, r#"{"copy_workers": 8}"#);
    assert_check(
        &dest,
        id,
        "source_connection_capacity",
        "fail",
        "max_connections = 8, 3 reserved",
        "max_connections",
    );
    let id = assess_with(&dest, &conninfo, r#"{"copy_workers": 2}"#);
    assert_check(
        &dest,
        id,
        "source_connection_capacity",
        "pass",
        "the copy needs 3",
        "",
    );
}

#[test]
fn a_distant_source_is_told_to_use_more_copy_workers() {
    let source = prepared_source("far-src").start();
    let dest = destination("far-dst");
    let near = source.tcp_conninfo("migrator", Some(PASSWORD), "postgres");
    let id = assess(&dest, &near);
    assert_check(
        &dest,
        id,
        "source_round_trip",
        "pass",
        "ms per exchange",
        "",
    );
    // 30 ms there and back, as between regions.
    let proxy = cloudmig_e2e::proxy::Proxy::to_port(source.port);
    proxy.set_delay(Duration::from_millis(15), Duration::from_millis(15));
    let far = near.replace(
        &format!("port={}", source.port),
        &format!("port={}", proxy.port()),
    );
    let id = assess(&dest, &far);
    assert_check(
        &dest,
        id,
        "source_round_trip",
        "warn",
        "ms per exchange",
        r#"'{"copy_workers": 4}'"#,
    );
    assert!(passed(&dest, id), "a warning alone does not fail");
}

#[test]
fn the_destination_is_refused_as_its_own_source() {
    let dest = destination("self-dst");
    let id = assess(&dest, &dest.tcp_conninfo("postgres", None, "postgres"));
    assert_check(
        &dest,
        id,
        "source_is_not_destination",
        "fail",
        "this very instance",
        "source server",
    );
}

#[test]
fn bad_input_is_refused_with_a_sqlstate_and_nothing_stored() {
    let dest = destination("input-dst");
    let mut client = dest.client("postgres");
    let bad_conninfo = client.query("SELECT cloudmig.assess('host=x bogus_key=1')", &[]);
    assert_eq!(sqlstate(bad_conninfo), "22023");
    let bad_option = client.query(
        "SELECT cloudmig.assess('host=x', '{\"copy_workerz\": 1}')",
        &[],
    );
    assert_eq!(sqlstate(bad_option), "22023");
    let not_object = client.query("SELECT cloudmig.assess('host=x', '[1]')", &[]);
    assert_eq!(sqlstate(not_object), "22023");
    let tls = client.query(
        "SELECT cloudmig.assess('host=127.0.0.1 sslmode=verify-full user=x password=y')",
        &[],
    );
    // TLS settings that cannot work fail the connection check before any connection.
    assert!(tls.is_ok());
    let count: i64 = dest.query_scalar("postgres", "SELECT count(*) FROM cloudmig.assessments");
    assert_eq!(count, 1, "refused calls store nothing");
    let (status, detail): (String, String) = {
        let row = client
            .query_one("SELECT status, detail FROM cloudmig.assessment_checks WHERE name = 'source_connection'", &[])
            .unwrap();
        (row.get(0), row.get(1))
    };
    assert_eq!(status, "fail");
    assert!(detail.contains("needs a root certificate"), "{detail}");
}

#[test]
fn only_admins_may_assess_and_nobody_else_sees_the_password() {
    let source = prepared_source("sec-src").start();
    let dest = destination("sec-dst");
    dest.execute(
        "postgres",
        "CREATE ROLE outsider LOGIN; CREATE ROLE dba LOGIN IN ROLE cloudmig_admin;",
    );
    let conninfo = source.tcp_conninfo("migrator", Some(PASSWORD), "postgres");
    let mut outsider = postgres::Config::new()
        .host_path(&dest.socket_dir)
        .port(dest.port)
        .user("outsider")
        .dbname("postgres")
        .connect(postgres::NoTls)
        .unwrap();
    assert_eq!(
        sqlstate(outsider.query("SELECT cloudmig.assess($1)", &[&conninfo])),
        "42501"
    );

    let mut dba = postgres::Config::new()
        .host_path(&dest.socket_dir)
        .port(dest.port)
        .user("dba")
        .dbname("postgres")
        .connect(postgres::NoTls)
        .unwrap();
    let id: i64 = dba
        .query_one("SELECT cloudmig.assess($1)", &[&conninfo])
        .unwrap()
        .get(0);
    assert_eq!(
        sqlstate(dba.query("SELECT * FROM cloudmig.source_secret", &[])),
        "42501"
    );
    // Nor can the admin forge a passed assessment.
    assert_eq!(
        sqlstate(dba.query("UPDATE cloudmig.assessments SET passed = true", &[])),
        "42501"
    );
    let visible: String = dba
        .query_one(
            "SELECT string_agg(t::text, ' ') FROM (SELECT a::text FROM cloudmig.assessments a \
             UNION ALL SELECT c::text FROM cloudmig.assessment_checks c \
             UNION ALL SELECT r::text FROM cloudmig.assessment_report r) t",
            &[],
        )
        .unwrap()
        .get(0);
    assert!(
        visible.contains("********"),
        "the masked password is shown as such"
    );
    assert!(
        !visible.contains(PASSWORD),
        "password leaked into a view: {visible}"
    );
    // The owner can read the secret back (a later start() reuses it).
    let secret: String = dest.query_scalar(
        "postgres",
        &format!("SELECT conninfo FROM cloudmig.source_secret WHERE assessment_id = {id}"),
    );
    assert!(secret.contains(PASSWORD));

    // A non-superuser may not borrow the server's identity on a trust source.
    let trusting = ClusterBuilder::source("sec-trust").start();
    let trust_conninfo = trusting.tcp_conninfo("postgres", None, "postgres");
    assert_eq!(
        sqlstate(dba.query("SELECT cloudmig.assess($1)", &[&trust_conninfo])),
        "2F003"
    );
    // Nor read server files through a passfile.
    assert_eq!(
        sqlstate(dba.query(
            "SELECT cloudmig.assess('host=x user=y passfile=/etc/shadow')",
            &[]
        )),
        "42501"
    );
    // An error of a call carrying the password leaves no trace of it in the log.
    let failing = format!("{conninfo} bogus_key=1");
    assert_eq!(
        sqlstate(dba.query("SELECT cloudmig.assess($1)", &[&failing])),
        "22023"
    );
    let log = std::fs::read_to_string(&dest.log_file).unwrap();
    assert!(!log.contains(PASSWORD), "password in the server log");
}

#[test]
fn a_passfile_supplies_the_password() {
    let source = prepared_source("pass-src").start();
    let dest = destination("pass-dst");
    let passfile = dest.dir.join("pgpass");
    std::fs::write(
        &passfile,
        format!("127.0.0.1:{}:*:migrator:{PASSWORD}\n", source.port),
    )
    .unwrap();
    cloudmig_e2e::chown_to_server(&passfile).unwrap();
    std::fs::set_permissions(
        &passfile,
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .unwrap();
    let conninfo = format!(
        "host=127.0.0.1 port={} user=migrator dbname=postgres passfile={}",
        source.port,
        passfile.display()
    );
    let id = assess(&dest, &conninfo);
    assert_check(&dest, id, "source_connection", "pass", "migrator", "");
    std::fs::remove_file(&passfile).ok();
}

#[test]
fn the_instance_shows_assessing_while_an_assessment_runs() {
    let dest = destination("state-dst");
    assert_eq!(
        dest.query_scalar::<String>("postgres", "SELECT state FROM cloudmig.instance_status"),
        "idle"
    );
    let silent = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = silent.local_addr().unwrap().port();
    let conninfo = format!("host=127.0.0.1 port={port} user=x password=y connect_timeout=5");
    let runner = {
        let mut client = dest.client("postgres");
        std::thread::spawn(move || {
            client
                .query_one("SELECT cloudmig.assess($1)", &[&conninfo])
                .map(|r| r.get::<_, i64>(0))
        })
    };
    poll_until(
        &dest,
        "postgres",
        "SELECT state FROM cloudmig.instance_status",
        "assessing",
        Duration::from_secs(10),
    );
    // A second assessment meanwhile is refused, not queued.
    let second = dest.client("postgres").query(
        "SELECT cloudmig.assess('host=127.0.0.1 port=1 user=x password=y')",
        &[],
    );
    assert_eq!(sqlstate(second), "55006");
    runner
        .join()
        .unwrap()
        .expect("the first assessment completes");
    assert_eq!(
        dest.query_scalar::<String>("postgres", "SELECT state FROM cloudmig.instance_status"),
        "idle"
    );
    drop(silent);
}
