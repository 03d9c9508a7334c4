//! End to end: the attacks of the security review, each by a member of `cloudmig_admin` who is not
//! a superuser (`mallory`), against a destination that must not give them more than they have.
//!
//! - roles: a source of mallory's own, whose superuser and its password mallory knows, must not
//!   become a superuser (or a REPLICATION, BYPASSRLS, pg_execute_server_program role, or one with
//!   superuser-only settings) here;
//! - search_path: a schema of mallory's first in the path must never run code with the extension
//!   owner's rights;
//! - secrets: the source password lives only while something needs it, can be rotated, and stays
//!   out of the server log under `log_min_duration_statement = 0` and auto_explain.

use cloudmig_e2e::migration::events;
use cloudmig_e2e::{poll_until, postgres, Cluster, ClusterBuilder};
use std::time::Duration;

/// The source superuser's password, which mallory knows.
const PASSWORD: &str = "Kn0wn-to-mallory";

/// pg_hba.conf of a source that asks for passwords over TCP.
const SCRAM_HBA: &[&str] = &[
    "local all all trust",
    "host all all 127.0.0.1/32 scram-sha-256",
    "host replication all 127.0.0.1/32 scram-sha-256",
];

/// A source whose `postgres` superuser logs in over TCP with [`PASSWORD`].
fn source(name: &str) -> ClusterBuilder {
    ClusterBuilder::source(name)
        .hba(SCRAM_HBA)
        .conf("max_slot_wal_keep_size = '1GB'")
        .init_sql(&format!(
            "SET password_encryption = 'scram-sha-256'; ALTER ROLE postgres PASSWORD '{PASSWORD}'"
        ))
}

/// A destination with `mallory`, a member of cloudmig_admin and nothing more.
fn destination(builder: ClusterBuilder) -> Cluster {
    builder
        .init_sql("CREATE ROLE mallory LOGIN IN ROLE cloudmig_admin")
        .start()
}

/// A connection to `dest` as `user`.
fn connect(dest: &Cluster, user: &str) -> postgres::Client {
    postgres::Config::new()
        .host_path(&dest.socket_dir)
        .port(dest.port)
        .user(user)
        .dbname("postgres")
        .connect(postgres::NoTls)
        .unwrap_or_else(|e| panic!("connect as {user}: {e}"))
}

fn sqlstate<T: std::fmt::Debug>(result: Result<T, postgres::Error>) -> String {
    match result {
        Ok(value) => panic!("expected an error, got {value:?}"),
        Err(e) => e
            .code()
            .map(|c| c.code().to_string())
            .unwrap_or_else(|| format!("no SQLSTATE: {e}")),
    }
}

/// `SELECT cloudmig.assess('<source>')` as `client`, the conninfo in the statement text (simple
/// query protocol), returns the assessment id.
fn assess_simple(client: &mut postgres::Client, conninfo: &str) -> i64 {
    let sql = format!("SELECT cloudmig.assess('{}')", conninfo.replace('\'', "''"));
    simple_scalar(client, &sql)
        .parse()
        .unwrap_or_else(|e| panic!("assess id: {e}"))
}

/// The first column of the first row of a simple query, as text.
fn simple_scalar(client: &mut postgres::Client, sql: &str) -> String {
    client
        .simple_query(sql)
        .unwrap_or_else(|e| panic!("{sql}: {e:?}"))
        .into_iter()
        .find_map(|m| match m {
            postgres::SimpleQueryMessage::Row(row) => row.get(0).map(str::to_string),
            _ => None,
        })
        .unwrap_or_default()
}

fn wait(dest: &Cluster, task: i64, phase: &str) {
    let reached: String = dest
        .client("postgres")
        .query_one(
            "SELECT cloudmig.wait($1, $2, '3 minutes')",
            &[&task, &phase],
        )
        .unwrap_or_else(|e| panic!("wait {phase}: {e:?}\n{}", dest.log_tail(30)))
        .get(0);
    assert_eq!(reached, phase, "{}", events(dest, task));
}

/// mallory migrates a source of their own that holds a superuser (whose password they know), a
/// REPLICATION and BYPASSRLS role, a member of pg_execute_server_program, a member of the
/// destination's own superuser, and a superuser-only role setting. None of it may arrive with
/// those rights; each is a warning event with its fix; harmless parts arrive.
#[test]
fn a_non_superuser_cannot_create_privileged_roles_through_a_migration() {
    let source = source("roles-src")
        .init_sql(&format!(
            "CREATE ROLE boss LOGIN SUPERUSER PASSWORD '{PASSWORD}';
             CREATE ROLE streamer LOGIN REPLICATION BYPASSRLS CREATEROLE CREATEDB;
             CREATE ROLE runner LOGIN;
             GRANT pg_execute_server_program, pg_read_server_files TO runner;
             GRANT postgres TO runner;
             ALTER ROLE runner SET work_mem = '64MB';
             ALTER ROLE runner SET log_min_messages = 'debug1';
             CREATE ROLE team NOLOGIN;
             GRANT team TO runner;"
        ))
        .start();
    let dest = destination(ClusterBuilder::destination("roles-dst"));
    let mut mallory = connect(&dest, "mallory");
    let conninfo = source.tcp_conninfo("postgres", Some(PASSWORD), "postgres");
    let assessment: i64 = mallory
        .query_one("SELECT cloudmig.assess($1)", &[&conninfo])
        .expect("assess")
        .get(0);
    let task: i64 = mallory
        .query_one("SELECT cloudmig.start($1)", &[&assessment])
        .unwrap_or_else(|e| panic!("start: {e:?}"))
        .get(0);
    wait(&dest, task, "incremental");

    let attributes: String = dest.query_scalar(
        "postgres",
        "SELECT string_agg(format('%s:%s%s%s%s%s', rolname, rolsuper::int, rolreplication::int, \
                rolbypassrls::int, rolcreaterole::int, rolcreatedb::int), ' ' ORDER BY rolname) \
           FROM pg_roles WHERE rolname IN ('boss', 'streamer', 'runner', 'team')",
    );
    assert_eq!(
        attributes,
        "boss:00000 runner:00000 streamer:00000 team:00000",
        "{}",
        events(&dest, task)
    );
    let memberships: String = dest.query_scalar(
        "postgres",
        "SELECT coalesce(string_agg(r.rolname, ' ' ORDER BY r.rolname), '') \
           FROM pg_auth_members m JOIN pg_roles r ON r.oid = m.roleid \
          WHERE m.member = 'runner'::regrole",
    );
    assert_eq!(
        memberships, "team",
        "only the migrated role's own membership"
    );
    let settings: String = dest.query_scalar(
        "postgres",
        "SELECT array_to_string(setconfig, ' ') FROM pg_db_role_setting \
          WHERE setrole = 'runner'::regrole AND setdatabase = 0",
    );
    assert_eq!(settings, "work_mem=64MB");
    // mallory cannot reach more through the migrated login either.
    assert!(!dest.query_scalar::<bool>(
        "postgres",
        "SELECT pg_has_role('boss', 'postgres', 'USAGE') OR pg_has_role('runner', 'postgres', 'USAGE')"
    ));

    let warnings = events(&dest, task);
    for expected in [
        "role boss was created without SUPERUSER",
        "fix: if boss needs it, a superuser runs ALTER ROLE \"boss\" WITH SUPERUSER",
        "role streamer was created without REPLICATION, BYPASSRLS, CREATEROLE, CREATEDB",
        "role runner was not made a member of pg_execute_server_program",
        "role runner was not made a member of pg_read_server_files",
        "role runner was not made a member of postgres",
        "setting log_min_messages of role runner was not copied",
    ] {
        assert!(
            warnings.contains(expected),
            "no event {expected:?} in:\n{warnings}"
        );
    }
    assert!(warnings.contains("mallory, who started the migration"));
    let started_by: String = dest.query_scalar(
        "postgres",
        &format!("SELECT started_by::regrole::text FROM cloudmig.task WHERE id = {task}"),
    );
    assert_eq!(started_by, "mallory");
}

/// mallory puts a schema of theirs first in `search_path`, holding a `current_setting(text)` (what
/// the destination checks of `assess` call) and an `=` for bigint (what reading an assessment uses), each of which, when run by
/// anyone but mallory, makes mallory a superuser. Calls of cloudmig must never run them.
#[test]
fn a_hostile_search_path_never_runs_as_the_extension_owner() {
    let dest = destination(ClusterBuilder::destination("path-dst"));
    dest.execute("postgres", "CREATE SCHEMA evil AUTHORIZATION mallory");
    let mut mallory = connect(&dest, "mallory");
    mallory
        .batch_execute(
            "CREATE TABLE evil.ran_as (who name);
             GRANT INSERT ON evil.ran_as TO PUBLIC;
             CREATE FUNCTION evil.escalate() RETURNS void LANGUAGE plpgsql AS $$
             BEGIN
                 IF current_user <> 'mallory' THEN
                     INSERT INTO evil.ran_as VALUES (current_user);
                     ALTER ROLE mallory SUPERUSER;
                 END IF;
             END $$;
             CREATE FUNCTION evil.current_setting(name text) RETURNS text LANGUAGE plpgsql AS $$
             BEGIN
                 PERFORM evil.escalate();
                 RETURN pg_catalog.current_setting(name);
             END $$;
             CREATE FUNCTION evil.int8eq(a bigint, b bigint) RETURNS boolean LANGUAGE plpgsql AS $$
             BEGIN
                 PERFORM evil.escalate();
                 RETURN a OPERATOR(pg_catalog.=) b;
             END $$;
             CREATE OPERATOR evil.= (LEFTARG = bigint, RIGHTARG = bigint, FUNCTION = evil.int8eq);
             SET search_path = evil, pg_catalog, public;",
        )
        .expect("mallory's schema");
    // A source that refuses the connection: the assessment is stored all the same.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let conninfo = format!("host=127.0.0.1 port={port} user=x password=y dbname=postgres");
    let assessment: i64 = mallory
        .query_one("SELECT cloudmig.assess($1)", &[&conninfo])
        .expect("assess")
        .get(0);
    // Not passed: refused, after reading the assessment as the owner.
    assert_eq!(
        sqlstate(mallory.query_one("SELECT cloudmig.start($1)", &[&assessment])),
        "55000"
    );
    assert_eq!(
        sqlstate(mallory.query_one("SELECT cloudmig.cancel(424242)", &[])),
        "42704"
    );
    let superuser: bool = dest.query_scalar(
        "postgres",
        "SELECT rolsuper FROM pg_roles WHERE rolname = 'mallory'",
    );
    let ran_as: String = dest.query_scalar(
        "postgres",
        "SELECT coalesce(string_agg(DISTINCT who::text, ' '), '') FROM evil.ran_as",
    );
    assert!(
        !superuser && ran_as.is_empty(),
        "mallory's code ran as {ran_as:?}; mallory is superuser: {superuser}"
    );
    // cloudmig's own work was unaffected by the hostile path.
    let checks: i64 = dest.query_scalar(
        "postgres",
        &format!(
            "SELECT count(*) FROM cloudmig.assessment_checks WHERE assessment_id = {assessment}"
        ),
    );
    assert!(checks > 0);
    let path: String = simple_scalar(&mut mallory, "SHOW search_path");
    assert_eq!(
        path, "evil, pg_catalog, public",
        "the caller's path is restored"
    );
}

/// The password is kept only while needed, can be rotated, is refused when it could not be passed
/// on whole, and never reaches the log, although every statement's duration and plan is logged.
#[test]
fn the_source_password_lives_only_while_needed_and_stays_out_of_the_log() {
    let source = source("secret-src").start();
    let dest = ClusterBuilder::destination("secret-dst")
        .conf("shared_preload_libraries = 'cloudmig,auto_explain'")
        .conf("log_min_duration_statement = 0")
        .conf("auto_explain.log_min_duration = 0")
        .conf("auto_explain.log_nested_statements = on")
        .conf("auto_explain.log_verbose = on")
        .init_sql("CREATE ROLE mallory LOGIN IN ROLE cloudmig_admin")
        .start();
    let conninfo = source.tcp_conninfo("postgres", Some(PASSWORD), "postgres");
    let mut admin = connect(&dest, "mallory");

    // Refused when it would not fit the workers' shared memory, instead of being cut. (In the
    // statement text: a bind parameter is logged by the Bind step, before cloudmig runs.)
    let long = format!("{conninfo} application_name={}", "x".repeat(3000));
    assert_eq!(
        sqlstate(admin.simple_query(&format!("SELECT cloudmig.assess('{long}')"))),
        "54000"
    );

    let assessment = assess_simple(&mut admin, &conninfo);
    let task: i64 = simple_scalar(&mut admin, &format!("SELECT cloudmig.start({assessment})"))
        .parse()
        .expect("task id");
    wait(&dest, task, "incremental");
    let kept: i64 = dest.query_scalar(
        "postgres",
        &format!("SELECT count(*) FROM cloudmig.source_secret WHERE task_id = {task}"),
    );
    assert_eq!(kept, 1, "a running task keeps its password");

    // Rotation: bad input is refused with a SQLSTATE and without echoing it.
    for (sql, state) in [
        (
            format!("SELECT cloudmig.set_source_password({task}, '')"),
            "22023",
        ),
        (
            format!("SELECT cloudmig.set_source_password({task}, NULL)"),
            "22023",
        ),
        (
            "SELECT cloudmig.set_source_password(424242, 'x')".to_string(),
            "42704",
        ),
        (
            format!("SELECT cloudmig.set_source_password({task}, repeat('p', 3000))"),
            "54000",
        ),
    ] {
        let error = admin.simple_query(&sql).expect_err(&sql);
        assert_eq!(
            error.code().map(|c| c.code()),
            Some(state),
            "{sql}: {error:?}"
        );
        assert!(!error.to_string().contains("ppppp"), "{error}");
    }
    let rotated = "R0tated-pa55";
    source.execute(
        "postgres",
        &format!(
            "SET password_encryption = 'scram-sha-256'; ALTER ROLE postgres PASSWORD '{rotated}'"
        ),
    );
    simple_scalar(
        &mut admin,
        &format!("SELECT cloudmig.set_source_password({task}, '{rotated}')"),
    );
    let stored: String = dest.query_scalar(
        "postgres",
        &format!("SELECT conninfo FROM cloudmig.source_secret WHERE task_id = {task}"),
    );
    assert!(stored.contains(rotated) && !stored.contains(PASSWORD));

    // Cancel reaches the source with the new password (its slots go) and forgets it.
    admin
        .simple_query(&format!("SELECT cloudmig.cancel({task})"))
        .expect("cancel");
    let slots: i64 = source.query_scalar(
        "postgres",
        "SELECT count(*) FROM pg_replication_slots WHERE slot_name LIKE 'cloudmig%'",
    );
    assert_eq!(slots, 0, "{}", events(&dest, task));
    let left: i64 = dest.query_scalar("postgres", "SELECT count(*) FROM cloudmig.source_secret");
    assert_eq!(left, 0, "a cancelled task keeps no password");
    assert_eq!(
        sqlstate(admin.simple_query(&format!("SELECT cloudmig.set_source_password({task}, 'x')"))),
        "55000"
    );

    // An assessment nobody starts loses its password after cloudmig.secret_retention.
    dest.execute("postgres", "ALTER SYSTEM SET cloudmig.secret_retention = 1");
    dest.execute("postgres", "SELECT pg_reload_conf()");
    let unstarted = assess_simple(
        &mut admin,
        &source.tcp_conninfo("postgres", Some(rotated), "postgres"),
    );
    poll_until(
        &dest,
        "postgres",
        &format!("SELECT count(*) FROM cloudmig.source_secret WHERE assessment_id = {unstarted}"),
        "0",
        Duration::from_secs(60),
    );
    assert_eq!(
        sqlstate(admin.query_one("SELECT cloudmig.start($1)", &[&unstarted])),
        "55000"
    );

    let log = std::fs::read_to_string(&dest.log_file).unwrap();
    assert!(
        log.contains("duration:") && log.contains("Query Text:"),
        "duration logging and auto_explain are on"
    );
    for secret in [PASSWORD, rotated] {
        let leaks: Vec<&str> = log.lines().filter(|l| l.contains(secret)).collect();
        assert!(
            leaks.is_empty(),
            "password in the server log:\n{}",
            leaks.join("\n")
        );
    }
}
