//! End to end: a migration rides out what a week of production does to it. Each outage of the
//! source gets its own retry window (a task older than `cloudmig.source_retry_timeout` survives
//! source restarts); an apply error names the relation, the key, the commit LSN and a fix, and
//! the failed task continues with `cloudmig.resume()` or, leaving one transaction out,
//! `cloudmig.skip()`; a deadlock against a session here is retried; a cancelled task leaves no
//! replication origin behind.

use cloudmig_e2e::compare::assert_same_data;
use cloudmig_e2e::migration::{self, caught_up, events, wait_phase as wait};
use cloudmig_e2e::{poll_until, Cluster, ClusterBuilder};
use std::time::Duration;

const TIMEOUT: Duration = Duration::from_secs(120);
/// Each outage's window here: shorter than the task's age when the source restarts.
const RETRY_WINDOW_SECONDS: u64 = 6;

fn source(name: &str) -> Cluster {
    ClusterBuilder::source(name)
        .init_sql("CREATE DATABASE app")
        .start()
}

fn destination(name: &str) -> Cluster {
    ClusterBuilder::destination(name)
        .conf(&format!(
            "cloudmig.source_retry_timeout = {RETRY_WINDOW_SECONDS}"
        ))
        .start()
}

/// A source and destination with a task streaming `app.items` in `incremental`.
fn streaming(name: &str) -> (Cluster, Cluster, i64) {
    let source = source(&format!("{name}-src"));
    source.execute(
        "app",
        "CREATE TABLE items (id bigserial PRIMARY KEY, name text NOT NULL);
         INSERT INTO items (name) SELECT 'item ' || i FROM generate_series(1, 1000) i;",
    );
    let dest = destination(&format!("{name}-dst"));
    let task = migration::start_task(&dest, &source, "{}");
    wait(&dest, task, "incremental");
    (source, dest, task)
}

fn phase(dest: &Cluster, task: i64) -> String {
    dest.query_scalar(
        "postgres",
        &format!("SELECT phase FROM cloudmig.task WHERE id = {task}"),
    )
}

#[test]
fn a_task_older_than_the_retry_window_survives_two_source_restarts() {
    let (source, dest, task) = streaming("outage-restart");
    // A window taken once when the worker started would be over by now.
    poll_until(
        &dest,
        "postgres",
        &format!(
            "SELECT pg_catalog.clock_timestamp() - created_at > interval '{} seconds' \
               FROM cloudmig.task WHERE id = {task}",
            RETRY_WINDOW_SECONDS + 1
        ),
        "t",
        TIMEOUT,
    );
    for (round, mode) in ["fast", "immediate"].into_iter().enumerate() {
        source.execute(
            "app",
            &format!("INSERT INTO items (name) SELECT 'before {round} ' || i FROM generate_series(1, 500) i"),
        );
        source.outage(mode, Duration::from_secs(3));
        source.execute(
            "app",
            &format!(
                "INSERT INTO items (name) SELECT 'after {round} ' || i FROM generate_series(1, 500) i;
                 UPDATE items SET name = name || ' changed' WHERE id % 7 = {round};
                 DELETE FROM items WHERE id % 11 = {round};"
            ),
        );
        caught_up(&source, &dest, task);
        assert_eq!(phase(&dest, task), "incremental", "{}", events(&dest, task));
    }
    assert_same_data(&source, &dest, "app");
    let log = events(&dest, task);
    assert!(log.contains("retrying"), "{log}");
    assert!(log.contains("streaming again"), "{log}");
    // Nothing shows an outage any more.
    let attempts: i32 = dest.query_scalar(
        "postgres",
        &format!("SELECT outage_attempts FROM cloudmig.tasks WHERE task_id = {task}"),
    );
    assert_eq!(attempts, 0);
}

/// Makes the apply fail: a unique index here that the source does not have, and a source
/// transaction of two rows, one of which collides with it. Returns the failed transaction's
/// commit LSN as the task reports it.
fn fail_on_a_conflict(source: &Cluster, dest: &Cluster, task: i64) -> String {
    dest.execute("app", "CREATE UNIQUE INDEX items_name_here ON items (name)");
    source.execute(
        "app",
        "INSERT INTO items (name) VALUES ('fine'), ('item 7')",
    );
    wait(dest, task, "failed");
    let row = dest
        .client("postgres")
        .query_one(
            "SELECT last_error, last_error_hint, last_error_lsn::text FROM cloudmig.tasks \
              WHERE task_id = $1",
            &[&task],
        )
        .expect("the failed task's row");
    let (error, hint, lsn): (String, String, String) = (row.get(0), row.get(1), row.get(2));
    assert!(error.contains("relation public.items"), "{error}");
    assert!(error.contains("key (id)=(1002)"), "{error}");
    assert!(error.contains(&format!("committing at {lsn}")), "{error}");
    assert!(error.contains("items_name_here"), "{error}");
    assert!(hint.contains(&format!("cloudmig.resume({task})")), "{hint}");
    assert!(
        hint.contains(&format!("cloudmig.skip({task}, '{lsn}')")),
        "{hint}"
    );
    lsn
}

#[test]
fn an_explained_apply_error_fails_the_task_and_resume_continues_once_fixed() {
    let (source, dest, task) = streaming("outage-resume");
    fail_on_a_conflict(&source, &dest, task);
    dest.execute("app", "DROP INDEX items_name_here");
    dest.execute("postgres", &format!("SELECT cloudmig.resume({task})"));
    wait(&dest, task, "incremental");
    source.execute("app", "INSERT INTO items (name) VALUES ('after resume')");
    caught_up(&source, &dest, task);
    assert_same_data(&source, &dest, "app");
    // Only a failed task resumes.
    let refused = dest
        .client("postgres")
        .execute(&format!("SELECT cloudmig.resume({task})"), &[])
        .expect_err("resume of a running task");
    assert_eq!(
        refused.code().map(|c| c.code()),
        Some("55000"),
        "{refused:?}"
    );
}

#[test]
fn skip_leaves_out_exactly_one_transaction_and_cancel_drops_the_origins() {
    let (source, dest, task) = streaming("outage-skip");
    let lsn = fail_on_a_conflict(&source, &dest, task);
    dest.execute(
        "postgres",
        &format!("SELECT cloudmig.skip({task}, '{lsn}')"),
    );
    wait(&dest, task, "incremental");
    source.execute("app", "INSERT INTO items (name) VALUES ('after skip')");
    caught_up(&source, &dest, task);
    let here: String = dest.query_scalar(
        "app",
        "SELECT string_agg(name, ',' ORDER BY id) FROM items WHERE id > 1000",
    );
    assert_eq!(
        here, "after skip",
        "both rows of the skipped transaction are left out"
    );
    // The task worker records the skip once the apply committed past it.
    poll_until(
        &dest,
        "postgres",
        &format!(
            "SELECT count(*) FROM cloudmig.events WHERE task_id = {task} \
                AND message LIKE 'skipped the source transaction committing at {lsn}%'"
        ),
        "1",
        TIMEOUT,
    );
    let skip_left: Option<String> = dest.query_scalar(
        "postgres",
        &format!("SELECT skip_lsn::text FROM cloudmig.tasks WHERE task_id = {task}"),
    );
    assert_eq!(skip_left, None, "the skip is forgotten once done");
    let origins = format!(
        "SELECT count(*) FROM pg_replication_origin WHERE roname LIKE 'cloudmig\\_{task}\\_%'"
    );
    // One per source database (app and postgres).
    let databases: i64 = dest.query_scalar(
        "postgres",
        &format!("SELECT count(*) FROM cloudmig.task_database WHERE task_id = {task}"),
    );
    assert_eq!(dest.query_scalar::<i64>("postgres", &origins), databases);
    dest.execute("postgres", &format!("SELECT cloudmig.cancel({task})"));
    assert_eq!(dest.query_scalar::<i64>("postgres", &origins), 0);
}

#[test]
fn a_deadlock_with_a_session_here_is_retried_not_fatal() {
    let (source, dest, task) = streaming("outage-deadlock");
    let mut blocker = dest.client("app");
    // The apply is the one to find the deadlock (after its 1 s deadlock_timeout).
    blocker
        .batch_execute(
            "SET deadlock_timeout = '30s'; BEGIN; UPDATE items SET name = 'here' WHERE id = 2",
        )
        .expect("lock row 2 here");
    source.execute(
        "app",
        "UPDATE items SET name = name || ' changed' WHERE id IN (1, 2)",
    );
    // The apply holds row 1 and waits for row 2.
    poll_until(
        &dest,
        "postgres",
        "SELECT count(*) FROM pg_stat_activity \
          WHERE backend_type = 'cloudmig apply' AND wait_event_type = 'Lock'",
        "1",
        TIMEOUT,
    );
    // Waiting for row 1 closes the cycle; the apply gives up its locks, so this goes through.
    blocker
        .batch_execute("UPDATE items SET name = 'here too' WHERE id = 1; COMMIT")
        .expect("the apply, not this session, is the deadlock's victim");
    caught_up(&source, &dest, task);
    assert_eq!(phase(&dest, task), "incremental", "{}", events(&dest, task));
    assert_same_data(&source, &dest, "app");
    let log = events(&dest, task);
    assert!(log.contains("deadlock detected"), "{log}");
    assert!(log.contains("retrying"), "{log}");
}
