//! Driving a migration from a test: start a task from a fresh assessment, wait for a phase, wait
//! until the apply has caught up with the source, and the task's events for failure messages.

use crate::{poll_until, Cluster};
use std::time::Duration;

/// How long a phase or a catch-up may take before a test fails.
pub const MIGRATION_TIMEOUT: Duration = Duration::from_secs(180);

/// Assesses `source` (as its `postgres` superuser over TCP) and starts a task with `options`
/// (JSON); returns the task id.
pub fn start_task(dest: &Cluster, source: &Cluster, options: &str) -> i64 {
    start_task_via(
        dest,
        &source.tcp_conninfo("postgres", None, "postgres"),
        options,
    )
}

/// [`start_task`] with the source at `conninfo` (e.g. through a [`crate::proxy::Proxy`]).
pub fn start_task_via(dest: &Cluster, conninfo: &str, options: &str) -> i64 {
    let mut client = dest.client("postgres");
    let assessment: i64 = client
        .query_one("SELECT cloudmig.assess($1)", &[&conninfo])
        .expect("assess")
        .get(0);
    client
        .query_one(
            "SELECT cloudmig.start($1, $2::text::jsonb)",
            &[&assessment, &options],
        )
        .unwrap_or_else(|e| panic!("start: {e:?}"))
        .get(0)
}

/// Runs the switchover of `task` with `options` (JSON) and waits until it is completed; panics
/// with the task's events if it is refused or fails.
pub fn switchover(dest: &Cluster, task: i64, options: &str) {
    dest.client("postgres")
        .query_one(
            "SELECT downtime_ms FROM cloudmig.switchover($1, $2::text::jsonb)",
            &[&task, &options],
        )
        .unwrap_or_else(|e| panic!("switchover: {e:?}\n{}", events(dest, task)));
    wait_phase(dest, task, "completed");
}

/// Blocks (in `cloudmig.wait`) until task `task` reaches `phase`; panics with its events if not.
pub fn wait_phase(dest: &Cluster, task: i64, phase: &str) {
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

/// The task's events, one "kind: message" per line.
pub fn events(dest: &Cluster, task: i64) -> String {
    dest.client("postgres")
        .query(
            "SELECT kind || ': ' || message FROM cloudmig.events WHERE task_id = $1 ORDER BY id",
            &[&task],
        )
        .map(|rows| {
            rows.iter()
                .map(|r| r.get::<_, String>(0))
                .collect::<Vec<_>>()
                .join("\n")
        })
        .unwrap_or_default()
}

/// Waits until every database of `task` applied everything the source has written so far.
pub fn caught_up(source: &Cluster, dest: &Cluster, task: i64) {
    let target: String = source.query_scalar("postgres", "SELECT pg_current_wal_lsn()::text");
    poll_until(
        dest,
        "postgres",
        &format!(
            "SELECT bool_and(applied_lsn::pg_lsn >= '{target}'::pg_lsn) FROM cloudmig.apply_progress \
              WHERE task_id = {task}"
        ),
        "t",
        MIGRATION_TIMEOUT,
    );
}

/// After a completed switchover the migrated source databases refuse connections (the fence
/// stays); lets connections in again, as a DBA would to read them, through `template1`.
/// They stay read-only by default.
pub fn reopen_source(source: &Cluster) {
    source.execute(
        "template1",
        "DO $$ DECLARE d name; BEGIN \
           FOR d IN SELECT datname FROM pg_database WHERE NOT datallowconn AND datname <> 'template0' LOOP \
             EXECUTE format('ALTER DATABASE %I ALLOW_CONNECTIONS true', d); \
           END LOOP; END $$",
    );
}
