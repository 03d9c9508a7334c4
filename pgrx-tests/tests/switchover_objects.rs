//! End to end: what logical replication does not carry (large objects, materialized views)
//! changes on the source while the apply streams; the switchover brings every change over, moving
//! only what differs, and the bulk before its fence: an unchanged large object of tens of megabytes
//! is not copied again, and nothing is left to copy inside the window. Materialized views hold the
//! source's contents (a stale one stays stale), and one unpopulated there stays unpopulated here.

use cloudmig_e2e::compare::{assert_same_large_objects, table_fingerprints};
use cloudmig_e2e::migration::{self, events, wait_phase as wait};
use cloudmig_e2e::ClusterBuilder;

/// 30 MB of incompressible bytes.
const BIG_BYTES: i64 = 1_966_080 * 16;

#[test]
fn only_changed_large_objects_move_and_materialized_views_keep_the_sources_contents() {
    let source = ClusterBuilder::source("sw-obj-src")
        .init_sql("CREATE DATABASE app")
        .init_sql("CREATE ROLE reader")
        .init_sql("CREATE ROLE keeper")
        .start();
    source.execute(
        "app",
        "SELECT setseed(0.17);
         SELECT lo_from_bytea(3001, (SELECT string_agg(decode(md5(random()::text), 'hex'), '')
                                       FROM generate_series(1, 1966080)));
         SELECT lo_from_bytea(3002, decode(repeat('ab', 3000000), 'hex'));
         SELECT lo_from_bytea(3003, decode(repeat('cd', 2500000), 'hex'));
         SELECT lo_from_bytea(3004, 'unlinked later');
         SELECT lo_from_bytea(3005, 'owner changes');
         SELECT lo_from_bytea(3006, 'privileges change');
         GRANT SELECT ON LARGE OBJECT 3006 TO reader;
         SELECT lo_from_bytea(3007, 'comment changes');
         COMMENT ON LARGE OBJECT 3007 IS 'before';
         CREATE TABLE base_plain (id int PRIMARY KEY, v text);
         CREATE TABLE base_conc (id int PRIMARY KEY, v text);
         CREATE TABLE base_stale (id int PRIMARY KEY, v text);
         INSERT INTO base_plain SELECT g, 'p' || g FROM generate_series(1, 100) g;
         INSERT INTO base_conc SELECT g, 'c' || g FROM generate_series(1, 100) g;
         INSERT INTO base_stale SELECT g, 's' || g FROM generate_series(1, 100) g;
         CREATE MATERIALIZED VIEW mv_plain AS SELECT id, upper(v) AS v FROM base_plain;
         CREATE INDEX mv_plain_expr ON mv_plain (lower(v));
         CREATE MATERIALIZED VIEW mv_conc AS SELECT id, v FROM base_conc;
         CREATE UNIQUE INDEX mv_conc_id ON mv_conc (id);
         CREATE MATERIALIZED VIEW mv_stale AS SELECT id, v FROM base_stale;
         CREATE MATERIALIZED VIEW mv_empty AS SELECT id FROM base_plain WITH NO DATA;
         CREATE MATERIALIZED VIEW mv_busy AS SELECT clock_timestamp() AS at, random() AS r;",
    );
    let dest = ClusterBuilder::destination("sw-obj-dst").start();
    let task = migration::start_task(&dest, &source, "{}");
    wait(&dest, task, "incremental");
    assert_same_large_objects(&source, &dest, "app");

    // While the apply streams: every kind of change a large object can take, and the three ways a
    // materialized view's contents move on (or do not).
    source.execute(
        "app",
        "SELECT lo_from_bytea(3008, 'created after the copy');
         SELECT lo_put(3002, 4000000, 'written into the middle');
         SELECT lo_truncate(fd, 100) FROM (SELECT lo_open(3003, 131072) AS fd) s;
         SELECT lo_unlink(3004);
         ALTER LARGE OBJECT 3005 OWNER TO keeper;
         GRANT UPDATE ON LARGE OBJECT 3006 TO keeper;
         REVOKE SELECT ON LARGE OBJECT 3006 FROM reader;
         COMMENT ON LARGE OBJECT 3007 IS 'after';
         UPDATE base_plain SET v = v || '!' WHERE id <= 10;
         REFRESH MATERIALIZED VIEW mv_plain;
         DELETE FROM base_conc WHERE id > 90;
         REFRESH MATERIALIZED VIEW CONCURRENTLY mv_conc;
         UPDATE base_stale SET v = 'changed, never refreshed';",
    );
    let source_views = views(&table_fingerprints(&source, "app"));
    let fresh: String = source.query_scalar(
        "app",
        "SELECT md5(string_agg(md5(t::text), '' ORDER BY md5(t::text))) \
           FROM (SELECT id, v FROM base_stale) t",
    );
    assert_ne!(
        source_views["public.mv_stale"].1, fresh,
        "mv_stale must differ from its query's result now"
    );

    // A first switchover is abandoned (verification finds a table differing here) after its pass
    // before the fence copied every view; the next pass copies only those changed since.
    let mut here = dest.client("app");
    here.batch_execute("DELETE FROM base_conc WHERE id = 1")
        .expect("delete here");
    dest.client("postgres")
        .query_one(
            "SELECT * FROM cloudmig.switchover($1, '{\"verify\": true}')",
            &[&task],
        )
        .expect_err("a differing table must stop the switchover");
    here.batch_execute("INSERT INTO base_conc VALUES (1, 'c1')")
        .expect("repair here");
    source.execute(
        "app",
        "UPDATE base_plain SET v = v || '?' WHERE id = 20;
         REFRESH MATERIALIZED VIEW mv_plain;",
    );

    // mv_busy is refreshed over and over until the fence ends the session: the refreshes after
    // the pass before the fence read it are found inside the window.
    let mut busy = source.client("app");
    let refreshing = std::thread::spawn(move || {
        let mut refreshes = 0u64;
        while busy
            .batch_execute("REFRESH MATERIALIZED VIEW mv_busy")
            .is_ok()
        {
            refreshes += 1;
        }
        refreshes
    });
    let row = dest
        .client("postgres")
        .query_one(
            "SELECT large_objects_before_fence, large_objects_in_window, \
                    large_object_bytes_in_window, materialized_views_in_window \
               FROM cloudmig.switchover($1)",
            &[&task],
        )
        .unwrap_or_else(|e| panic!("switchover: {e:?}\n{}", events(&dest, task)));
    let refreshes = refreshing.join().expect("the refreshing thread");
    assert!(refreshes > 0);
    let (before, in_window, window_bytes, views_in_window): (i64, i64, i64, i64) =
        (row.get(0), row.get(1), row.get(2), row.get(3));
    let log = events(&dest, task);
    // The abandoned attempt's pass copied the large objects' changes: 3008 created, 3004
    // removed, 3005-3007 new metadata, 3002 and 3003 new data. Nothing was left for this one.
    assert!(
        log.contains("1 created, 1 removed, 3 with new owner/privileges/comment, 2 with new data"),
        "{log}"
    );
    assert_eq!(before, 0, "{log}");
    assert_eq!((in_window, window_bytes), (0, 0), "{log}");
    // mv_busy alone changed after the pass before the fence.
    assert_eq!(views_in_window, 1, "{log}");
    // The pass before the fence moved the chunk written into (a megabyte) and the new object,
    // never the unchanged 30 MB one.
    let copied: i64 = dest.query_scalar(
        "postgres",
        &format!(
            "SELECT substring(message FROM '\\((\\d+) bytes copied\\)')::bigint FROM cloudmig.events \
              WHERE task_id = {task} AND message LIKE 'switchover, before the fence:%bytes copied%'"
        ),
    );
    assert!(
        copied > 0 && copied < 2 * 1024 * 1024,
        "{copied} bytes copied before the fence\n{log}"
    );
    assert!(copied < BIG_BYTES / 10);
    // Every view in the first pass; in the second, mv_plain (refreshed since) and perhaps mv_busy.
    let passes: Vec<String> = dest
        .client("postgres")
        .query(
            "SELECT substring(message FROM '(\\d+ of \\d+) materialized') FROM cloudmig.events \
              WHERE task_id = $1 AND message LIKE 'switchover, before the fence: % materialized%' \
              ORDER BY id",
            &[&task],
        )
        .expect("events")
        .iter()
        .map(|row| row.get(0))
        .collect();
    assert!(
        passes.len() == 2
            && passes[0] == "5 of 5"
            && ["1 of 5", "2 of 5"].contains(&passes[1].as_str()),
        "{passes:?}\n{log}"
    );

    migration::reopen_source(&source);
    assert_same_large_objects(&source, &dest, "app");
    let source_views = views(&table_fingerprints(&source, "app"));
    let dest_views = views(&table_fingerprints(&dest, "app"));
    assert_eq!(source_views, dest_views, "{log}");
    let populated: bool = dest.query_scalar(
        "app",
        "SELECT relispopulated FROM pg_class WHERE relname = 'mv_empty'",
    );
    assert!(!populated, "mv_empty must stay unpopulated");
    // The indexes were rebuilt over the new contents.
    let mut client = dest.client("app");
    client
        .batch_execute("SET enable_seqscan = off")
        .expect("set");
    let found: i64 = client
        .query_one("SELECT count(*) FROM mv_plain WHERE lower(v) = 'p1!'", &[])
        .expect("count")
        .get(0);
    assert_eq!(found, 1);
}

/// The materialized views among `fingerprints` (named `mv_*` here).
fn views(
    fingerprints: &std::collections::BTreeMap<String, (i64, String)>,
) -> std::collections::BTreeMap<String, (i64, String)> {
    fingerprints
        .iter()
        .filter(|(name, _)| name.starts_with("public.mv_"))
        .map(|(name, value)| (name.clone(), value.clone()))
        .collect()
}
