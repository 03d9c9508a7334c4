//! End to end: large objects arrive whole, with owner, privileges and comment, whatever their
//! size (they travel in chunks, never as one value); those written or changed after the copy
//! arrive at the switchover.

use cloudmig_e2e::compare::assert_same_large_objects;
use cloudmig_e2e::migration::{self, events, wait_phase as wait};
use cloudmig_e2e::ClusterBuilder;

#[test]
fn large_objects_of_any_size_arrive_and_later_changes_at_the_switchover() {
    let source = ClusterBuilder::source("lo-src")
        .init_sql("CREATE DATABASE app")
        .init_sql("CREATE ROLE reader")
        .start();
    // 40 MB of incompressible bytes: more than two chunks, and not a multiple of one.
    source.execute(
        "app",
        "SELECT setseed(0.42);
         SELECT lo_from_bytea(1001, (SELECT string_agg(decode(md5(random()::text), 'hex'), '')
                                       FROM generate_series(1, 2621441)));
         SELECT lo_from_bytea(1002, '');
         SELECT lo_from_bytea(1003, 'small');
         COMMENT ON LARGE OBJECT 1003 IS 'a comment';
         GRANT SELECT ON LARGE OBJECT 1003 TO reader;",
    );
    let size: i64 = source.query_scalar("app", "SELECT length(lo_get(1001))::bigint");
    assert_eq!(size, 2_621_441 * 16);
    let dest = ClusterBuilder::destination("lo-dst").start();
    let task = migration::start_task(&dest, &source, "{}");
    wait(&dest, task, "incremental");
    assert_same_large_objects(&source, &dest, "app");

    // Written after the copy: a new object, one changed, one removed.
    source.execute(
        "app",
        "SELECT lo_from_bytea(1004, 'written after the copy');
         SELECT lo_put(1001, 20000000, 'changed in the middle');
         SELECT lo_unlink(1002);",
    );
    dest.client("postgres")
        .query_one("SELECT downtime_ms FROM cloudmig.switchover($1)", &[&task])
        .unwrap_or_else(|e| panic!("switchover: {e:?}\n{}", events(&dest, task)));
    migration::reopen_source(&source);
    assert_same_large_objects(&source, &dest, "app");
}
