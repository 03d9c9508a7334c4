//! End to end: the switchover's fence is watertight. Once it is up, no client writes to the
//! source's migrated databases, not one that reconnects and lifts read-only, nor one that names
//! itself after cloudmig; and a write that still gets through (an exempt user's session) is
//! noticed before the cut-over, which is then abandoned.

use cloudmig_e2e::migration::{self, caught_up, events, wait_phase as wait};
use cloudmig_e2e::postgres::{Client, NoTls};
use cloudmig_e2e::{compare::assert_same_data, Cluster, ClusterBuilder};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

fn source(name: &str) -> Cluster {
    let source = ClusterBuilder::source(name)
        .init_sql("CREATE DATABASE app")
        .init_sql("CREATE ROLE app LOGIN")
        .init_sql("CREATE ROLE monitor LOGIN")
        .start();
    source.execute(
        "app",
        "CREATE TABLE t (id bigserial PRIMARY KEY, who text NOT NULL);
         GRANT INSERT ON t TO app, monitor;
         GRANT USAGE ON SEQUENCE t_id_seq TO app, monitor;
         INSERT INTO t (who) SELECT 'initial' FROM generate_series(1, 1000);",
    );
    source
}

/// What a writer thread saw.
#[derive(Default)]
struct Tally {
    written: AtomicU64,
    refused: AtomicU64,
}

/// Writes a row every few milliseconds as `user` until `stop`. With `reconnect`, a lost
/// session is replaced by a new one that lifts the read-only default and calls itself
/// `cloudmig`, as an attacker of the fence would; without, it keeps its one session.
fn writer(
    source: &Cluster,
    user: &str,
    reconnect: bool,
    stop: Arc<AtomicBool>,
) -> (Arc<Tally>, thread::JoinHandle<()>) {
    let conninfo = source.tcp_conninfo(user, None, "app");
    let tally = Arc::new(Tally::default());
    let counts = Arc::clone(&tally);
    let who = user.to_string();
    let connect = move || -> Option<Client> {
        let mut client = Client::connect(&conninfo, NoTls).ok()?;
        client
            .batch_execute(
                "SET application_name = 'cloudmig'; SET default_transaction_read_only = off",
            )
            .ok()?;
        Some(client)
    };
    let mut session = connect();
    assert!(session.is_some(), "{who} cannot connect to the source");
    let handle = thread::spawn(move || {
        while !stop.load(Ordering::Relaxed) {
            if session.is_none() && reconnect {
                session = connect();
            }
            let written = session.as_mut().is_some_and(|client| {
                client
                    .batch_execute(&format!(
                        "BEGIN READ WRITE; INSERT INTO t (who) VALUES ('{who}'); COMMIT"
                    ))
                    .is_ok()
            });
            if written {
                counts.written.fetch_add(1, Ordering::Relaxed);
            } else {
                counts.refused.fetch_add(1, Ordering::Relaxed);
                session = None;
            }
            thread::sleep(Duration::from_millis(5));
        }
    });
    (tally, handle)
}

#[test]
fn no_client_writes_to_the_source_after_the_fence() {
    let source = source("fence-src");
    let dest = ClusterBuilder::destination("fence-dst").start();
    let task = migration::start_task(&dest, &source, "{}");
    wait(&dest, task, "incremental");

    let stop = Arc::new(AtomicBool::new(false));
    let writers: Vec<_> = ["postgres", "app"]
        .into_iter()
        .map(|user| writer(&source, user, true, Arc::clone(&stop)))
        .collect();
    thread::sleep(Duration::from_millis(500));
    dest.client("postgres")
        .query_one("SELECT downtime_ms FROM cloudmig.switchover($1)", &[&task])
        .unwrap_or_else(|e| panic!("switchover: {e:?}\n{}", events(&dest, task)));
    // The writers keep trying after the cut-over too.
    thread::sleep(Duration::from_millis(1500));
    stop.store(true, Ordering::Relaxed);
    for (tally, handle) in writers {
        handle.join().expect("writer thread");
        assert!(
            tally.written.load(Ordering::Relaxed) > 0,
            "a writer never wrote"
        );
        assert!(
            tally.refused.load(Ordering::Relaxed) > 0,
            "a writer was never refused: the fence did not reach it"
        );
    }
    let refused = source
        .try_client("app")
        .err()
        .map(|e| {
            e.as_db_error()
                .map(|d| d.message().to_string())
                .unwrap_or_else(|| e.to_string())
        })
        .unwrap_or_default();
    assert!(
        refused.contains("not currently accepting connections"),
        "the fenced source accepted a connection: {refused:?}"
    );

    // Every row the source took is here: none was written behind the fence.
    migration::reopen_source(&source);
    assert_same_data(&source, &dest, "app");
}

#[test]
fn a_write_after_the_fence_abandons_the_switchover() {
    let source = source("late-write-src");
    let dest = ClusterBuilder::destination("late-write-dst").start();
    let task = migration::start_task(&dest, &source, "{}");
    wait(&dest, task, "incremental");

    // An exempt user's session is not ended; it writes on through the fence.
    let stop = Arc::new(AtomicBool::new(false));
    let (tally, handle) = writer(&source, "monitor", false, Arc::clone(&stop));
    thread::sleep(Duration::from_millis(300));
    let error = dest
        .client("postgres")
        .query_one(
            "SELECT downtime_ms FROM cloudmig.switchover($1, '{\"exempt_users\": [\"monitor\"]}')",
            &[&task],
        )
        .map(|_| ())
        .expect_err("a write after the fence must abandon the switchover");
    let message = error
        .as_db_error()
        .map(|e| e.message().to_string())
        .unwrap_or_else(|| error.to_string());
    assert!(
        message.contains("after the fence"),
        "{message}\n{}",
        events(&dest, task)
    );
    stop.store(true, Ordering::Relaxed);
    handle.join().expect("writer thread");
    assert!(tally.written.load(Ordering::Relaxed) > 0);

    // Abandoned: the source is open and writable again, the task streams on.
    source.execute(
        "app",
        "INSERT INTO t (who) VALUES ('after the abandoned switchover')",
    );
    let phase: String = dest.query_scalar(
        "postgres",
        &format!("SELECT phase FROM cloudmig.tasks WHERE task_id = {task}"),
    );
    assert_eq!(phase, "incremental", "{}", events(&dest, task));
    caught_up(&source, &dest, task);
    assert_same_data(&source, &dest, "app");
}
