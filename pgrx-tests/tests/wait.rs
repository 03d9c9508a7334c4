//! End to end: `cloudmig.wait()` sees the task's progress as it commits, not
//! the snapshot its statement started with.

use cloudmig_e2e::migration::{self, events};
use cloudmig_e2e::ClusterBuilder;

#[test]
fn wait_returns_as_soon_as_the_phase_is_committed() {
    let source = ClusterBuilder::source("wait-src")
        .init_sql("CREATE DATABASE app")
        .start();
    source.execute(
        "app",
        "CREATE TABLE t (id int PRIMARY KEY); INSERT INTO t SELECT generate_series(1, 100);",
    );
    let dest = ClusterBuilder::destination("wait-dst").start();
    let task = migration::start_task(&dest, &source, "{}");

    // Called right after start(), while the task is still early on: its
    // statement's snapshot shows the task before the copy.
    let row = dest
        .client("postgres")
        .query_one(
            "SELECT cloudmig.wait($1, 'incremental', '3 minutes'), \
                    pg_catalog.clock_timestamp()::text",
            &[&task],
        )
        .unwrap_or_else(|e| panic!("wait: {e:?}\n{}", events(&dest, task)));
    let reached: String = row.get(0);
    let returned_at: String = row.get(1);
    assert_eq!(reached, "incremental", "{}", events(&dest, task));

    // It returned after the phase was reached, and within a few of its
    // 200 ms polls of it: a stale read returns seconds late, or never.
    let late_ms: f64 = dest.query_scalar(
        "postgres",
        &format!(
            "SELECT (extract(epoch FROM '{returned_at}'::timestamptz - at) * 1000)::float8 \
               FROM cloudmig.events WHERE task_id = {task} AND kind = 'phase' \
                AND message LIKE 'incremental%' ORDER BY id DESC LIMIT 1"
        ),
    );
    assert!(
        (0.0..3000.0).contains(&late_ms),
        "wait returned {late_ms} ms after the phase was reached\n{}",
        events(&dest, task)
    );
}
