//! Smoke tests of the harness itself (not of cloudmig): clusters start in parallel, settings and
//! pg_hba.conf are applied, restarts keep data, `poll_until` waits and times out as documented,
//! and clusters are stopped and cleaned up on drop, kept (but stopped) after a panic.

use std::fs;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use cloudmig_e2e::postgres::error::SqlState;
use cloudmig_e2e::postgres::{Client, NoTls};
use cloudmig_e2e::{pg_command, poll_until, Cluster, ClusterBuilder};

/// Generous: two cores shared by every test of the run.
const TIMEOUT: Duration = Duration::from_secs(30);

#[test]
fn two_sources_start_in_parallel() {
    let started = Instant::now();
    let threads: Vec<_> = ["par-a", "par-b"]
        .into_iter()
        .map(|name| thread::spawn(move || ClusterBuilder::source(name).start()))
        .collect();
    let clusters: Vec<Cluster> = threads
        .into_iter()
        .map(|t| t.join().expect("a cluster failed to start"))
        .collect();
    eprintln!("two sources started in {:?}", started.elapsed());
    assert_ne!(clusters[0].port, clusters[1].port);
    assert_ne!(clusters[0].data_dir, clusters[1].data_dir);
    for cluster in &clusters {
        assert_eq!(
            cluster.query_scalar::<String>("postgres", "SHOW wal_level"),
            "logical"
        );
        assert_eq!(
            cluster.query_scalar::<String>("postgres", "SHOW max_replication_slots"),
            "10"
        );
        assert_eq!(
            cluster.query_scalar::<String>("postgres", "SHOW max_wal_senders"),
            "10"
        );
        // The default pg_hba.conf lets any user in over TCP without a password.
        let mut tcp = Client::connect(&cluster.tcp_conninfo("postgres", None, "postgres"), NoTls)
            .expect("TCP connection with the default pg_hba.conf");
        let port: i32 = tcp
            .query_one("SELECT inet_server_port()", &[])
            .unwrap()
            .get(0);
        assert_eq!(port, i32::from(cluster.port));
    }
}

#[test]
fn destination_preloads_and_creates_the_extension() {
    let dst = ClusterBuilder::destination("dst-smoke").start();
    assert_eq!(
        dst.query_scalar::<String>("postgres", "SHOW shared_preload_libraries"),
        "cloudmig"
    );
    assert_eq!(
        dst.query_scalar::<i64>(
            "postgres",
            "SELECT count(*) FROM pg_extension WHERE extname = 'cloudmig'"
        ),
        1
    );
}

#[test]
fn conf_lines_and_init_sql_are_applied() {
    let cluster = ClusterBuilder::source("conf")
        .conf("wal_level = replica")
        .conf("work_mem = '5MB'")
        .init_sql("CREATE DATABASE app")
        .init_sql("CREATE ROLE bob LOGIN")
        .start();
    // Later lines win over the harness's own settings.
    assert_eq!(
        cluster.query_scalar::<String>("postgres", "SHOW wal_level"),
        "replica"
    );
    assert_eq!(
        cluster.query_scalar::<String>("postgres", "SHOW work_mem"),
        "5MB"
    );
    cluster.execute("app", "CREATE TABLE t (id int)");
    let mut bob = Client::connect(&cluster.socket_conninfo("bob", "app"), NoTls)
        .expect("bob over the socket");
    let user: String = bob
        .query_one("SELECT current_user::text", &[])
        .unwrap()
        .get(0);
    assert_eq!(user, "bob");
}

#[test]
fn hba_replacement_enforces_scram_passwords() {
    let cluster = ClusterBuilder::source("hba")
        .hba(&["host all all 127.0.0.1/32 scram-sha-256"])
        .init_sql("SET password_encryption = 'scram-sha-256'; CREATE ROLE alice LOGIN PASSWORD 'correct horse'")
        .start();

    let mut alice = Client::connect(
        &cluster.tcp_conninfo("alice", Some("correct horse"), "postgres"),
        NoTls,
    )
    .expect("alice with the right password over TCP");
    let user: String = alice
        .query_one("SELECT current_user::text", &[])
        .unwrap()
        .get(0);
    assert_eq!(user, "alice");

    let wrong = Client::connect(
        &cluster.tcp_conninfo("alice", Some("battery staple"), "postgres"),
        NoTls,
    )
    .err()
    .expect("a wrong password must be refused");
    assert_eq!(wrong.code(), Some(&SqlState::INVALID_PASSWORD), "{wrong}");

    // The replaced file has no `local` line for alice, only the harness's own for postgres.
    let socket = Client::connect(&cluster.socket_conninfo("alice", "postgres"), NoTls)
        .err()
        .expect("no pg_hba.conf entry for alice over the socket");
    assert_eq!(
        socket.code(),
        Some(&SqlState::INVALID_AUTHORIZATION_SPECIFICATION),
        "{socket}"
    );
    assert_eq!(cluster.query_scalar::<i32>("postgres", "SELECT 1"), 1);
}

#[test]
fn poll_until_waits_for_a_background_change_and_times_out() {
    let cluster = ClusterBuilder::source("poll")
        .init_sql("CREATE TABLE flag (v int); INSERT INTO flag VALUES (0)")
        .start();
    let conninfo = cluster.socket_conninfo("postgres", "postgres");
    let setter = thread::spawn(move || {
        // The "moment" is the test's own, to make poll_until actually wait; the harness never sleeps.
        thread::sleep(Duration::from_millis(300));
        let mut client = Client::connect(&conninfo, NoTls).unwrap();
        client.batch_execute("UPDATE flag SET v = 1").unwrap();
    });
    let value = poll_until(&cluster, "postgres", "SELECT v FROM flag", "1", TIMEOUT);
    assert_eq!(value, "1");
    setter.join().unwrap();

    assert_eq!(
        poll_until(&cluster, "postgres", "SELECT NULL", "<NULL>", TIMEOUT),
        "<NULL>"
    );
    assert_eq!(
        poll_until(
            &cluster,
            "postgres",
            "SELECT 1 WHERE false",
            "<no rows>",
            TIMEOUT
        ),
        "<no rows>"
    );

    let started = Instant::now();
    let timed_out = catch_unwind(AssertUnwindSafe(|| {
        poll_until(
            &cluster,
            "postgres",
            "SELECT 41",
            "42",
            Duration::from_millis(300),
        )
    }));
    let message = panic_text(timed_out.expect_err("poll_until must panic on timeout"));
    assert!(
        message.contains("SELECT 41") && message.contains("\"41\""),
        "{message}"
    );
    assert!(started.elapsed() < Duration::from_secs(5));

    // A table that does not exist yet is retried until the timeout, showing the error.
    let missing = catch_unwind(AssertUnwindSafe(|| {
        poll_until(
            &cluster,
            "postgres",
            "SELECT count(*) FROM later",
            "1",
            Duration::from_millis(100),
        )
    }));
    let message = panic_text(missing.expect_err("must time out"));
    assert!(message.contains("42P01"), "{message}");
}

#[test]
fn restarts_keep_data_and_reload_applies_settings() {
    let cluster = ClusterBuilder::source("restart")
        .init_sql("CREATE TABLE t (v int); INSERT INTO t VALUES (1)")
        .start();
    cluster.restart();
    cluster.execute("postgres", "INSERT INTO t VALUES (2)");
    // Committed data survives a crash-like stop: fsync=off does not matter without an OS crash.
    cluster.restart_immediate();
    assert_eq!(
        cluster.query_scalar::<i64>("postgres", "SELECT sum(v) FROM t"),
        3
    );

    cluster.execute("postgres", "ALTER SYSTEM SET work_mem = '7MB'");
    cluster.reload();
    poll_until(&cluster, "postgres", "SHOW work_mem", "7MB", TIMEOUT);

    cluster.stop();
    assert!(!cluster.data_dir.join("postmaster.pid").exists());
}

#[test]
fn dropping_a_cluster_stops_it_and_removes_its_directory() {
    let cluster = ClusterBuilder::source("drop").start();
    let dir = cluster.dir.clone();
    let pid: i32 = cluster.query_scalar("postgres", "SELECT pg_backend_pid()");
    let postmaster = postmaster_pid(&cluster);
    drop(cluster);
    assert!(!dir.exists(), "{} should be removed", dir.display());
    assert!(!alive(postmaster), "postmaster {postmaster} still running");
    assert!(!alive(pid));
}

#[test]
fn a_panicking_test_keeps_its_directory_and_stops_its_server() {
    let (paths_tx, paths_rx) = mpsc::channel();
    let panicking = thread::spawn(move || {
        let cluster = ClusterBuilder::source("panicky").start();
        paths_tx
            .send((
                cluster.dir.clone(),
                cluster.data_dir.clone(),
                postmaster_pid(&cluster),
            ))
            .unwrap();
        panic!("deliberate panic while holding a Cluster");
    });
    assert!(panicking.join().is_err());
    let (dir, data_dir, postmaster) = paths_rx.recv().unwrap();

    assert!(
        data_dir.join("PG_VERSION").exists(),
        "{} should be kept",
        dir.display()
    );
    assert!(dir.join("postgres.log").exists());
    let status = pg_command("pg_ctl")
        .arg("status")
        .arg("-D")
        .arg(&data_dir)
        .output()
        .unwrap();
    // pg_ctl status exits with 3 when no server runs in the directory.
    assert_eq!(
        status.status.code(),
        Some(3),
        "{}",
        String::from_utf8_lossy(&status.stdout)
    );
    assert!(!alive(postmaster));
    fs::remove_dir_all(&dir).unwrap();
}

fn postmaster_pid(cluster: &Cluster) -> i32 {
    let pid_file = fs::read_to_string(cluster.data_dir.join("postmaster.pid")).unwrap();
    pid_file.lines().next().unwrap().trim().parse().unwrap()
}

/// Whether `pid` is a live process; a zombie (exited, not yet reaped: PID 1 of a container may
/// never reap it) counts as gone.
fn alive(pid: i32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the parenthesised command name.
        Ok(stat) => {
            stat.rsplit(')')
                .next()
                .and_then(|rest| rest.split_whitespace().next())
                != Some("Z")
        }
        // No /proc (not Linux): ask the kernel. SAFETY: signal 0 only checks existence.
        Err(_) if !std::path::Path::new("/proc/self").exists() => unsafe {
            libc::kill(pid, 0) == 0
        },
        Err(_) => false,
    }
}

fn panic_text(payload: Box<dyn std::any::Any + Send>) -> String {
    match payload.downcast::<String>() {
        Ok(text) => *text,
        Err(payload) => payload
            .downcast_ref::<&str>()
            .map(|s| (*s).to_owned())
            .unwrap_or_default(),
    }
}
