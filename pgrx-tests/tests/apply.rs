//! End to end: after the copy, the source's changes stream in and are
//! applied exactly once; then a switchover cuts over and reports downtime.

use cloudmig_e2e::compare::{assert_same_data, assert_same_sequences};
use cloudmig_e2e::migration::{self, caught_up, events, wait_phase as wait};
use cloudmig_e2e::{poll_until, Cluster, ClusterBuilder};
use std::time::Duration;

const TIMEOUT: Duration = Duration::from_secs(120);

fn source(name: &str) -> Cluster {
    ClusterBuilder::source(name)
        .conf("max_prepared_transactions = 2")
        .init_sql("CREATE DATABASE app")
        .start()
}

const APP_SQL: &str = "
    CREATE TABLE items (id bigserial PRIMARY KEY, name text NOT NULL, doc jsonb, big text);
    CREATE TABLE events (at timestamptz, what text);               -- no key: REPLICA IDENTITY FULL
    CREATE TABLE audit (id bigserial PRIMARY KEY, item bigint, op text);
    CREATE FUNCTION audit_items() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN INSERT INTO audit (item, op) VALUES (coalesce(NEW.id, OLD.id), TG_OP); RETURN NULL; END $$;
    CREATE TRIGGER items_audit AFTER INSERT OR UPDATE OR DELETE ON items
        FOR EACH ROW EXECUTE FUNCTION audit_items();
    CREATE TABLE measures (city text, day date, value int, PRIMARY KEY (city, day)) PARTITION BY LIST (city);
    CREATE TABLE measures_a PARTITION OF measures FOR VALUES IN ('a');
    CREATE TABLE measures_b PARTITION OF measures FOR VALUES IN ('b');
    CREATE TABLE priced (id int PRIMARY KEY, net numeric, gross numeric GENERATED ALWAYS AS (net * 1.2) STORED);
    INSERT INTO priced (id, net) VALUES (1, 10);
    INSERT INTO items (name, doc) SELECT 'item ' || i, jsonb_build_object('i', i) FROM generate_series(1, 1000) i;
    INSERT INTO events VALUES ('2024-01-01', 'dup'), ('2024-01-01', 'dup'), ('2024-01-02', 'one');
    INSERT INTO measures VALUES ('a', '2024-01-01', 1), ('a', '2024-01-02', 3), ('b', '2024-01-01', 2);
";

fn start_task(dest: &Cluster, source: &Cluster) -> i64 {
    migration::start_task(dest, source, "{\"replica_identity_full\": true}")
}

#[test]
fn changes_of_every_kind_are_applied_once_and_switchover_completes() {
    let source = source("apply-src");
    source.execute("app", APP_SQL);
    let dest = ClusterBuilder::destination("apply-dst").start();
    let task = start_task(&dest, &source);
    wait(&dest, task, "incremental");

    source.execute(
        "app",
        "INSERT INTO items (name) VALUES ('new');
         UPDATE items SET name = name || ' changed' WHERE id <= 10;
         DELETE FROM items WHERE id BETWEEN 11 AND 20;
         UPDATE items SET big = repeat(md5(random()::text), 100000) WHERE id = 21;
         UPDATE events SET what = 'changed' WHERE what = 'one';
         DELETE FROM events WHERE ctid = (SELECT ctid FROM events WHERE what = 'dup' LIMIT 1);
         UPDATE measures SET city = 'b' WHERE city = 'a' AND day = '2024-01-02';",
    );
    // An unchanged TOASTed value keeps its value here.
    source.execute("app", "UPDATE items SET name = 'toast kept' WHERE id = 21");
    // A big transaction, a rolled-back one and a rolled-back savepoint.
    source.execute(
        "app",
        "INSERT INTO items (name) SELECT 'bulk ' || i FROM generate_series(1, 200000) i",
    );
    source.execute(
        "app",
        "BEGIN; INSERT INTO items (name) VALUES ('never'); ROLLBACK;",
    );
    source.execute(
        "app",
        "BEGIN; INSERT INTO items (name) VALUES ('kept');
         SAVEPOINT s; INSERT INTO items (name) VALUES ('rolled back'); ROLLBACK TO SAVEPOINT s;
         COMMIT;",
    );
    source.execute("app", "TRUNCATE audit");
    // Generated columns are not sent: they are computed here.
    source.execute(
        "app",
        "INSERT INTO priced (id, net) VALUES (2, 100); UPDATE priced SET net = 20 WHERE id = 1",
    );
    caught_up(&source, &dest, task);

    for table in [
        "items",
        "events",
        "audit",
        "measures_a",
        "measures_b",
        "priced",
    ] {
        let sql = format!("SELECT count(*)::text || ':' || coalesce(md5(string_agg(t::text, ',' ORDER BY t::text)), '') FROM {table} t");
        let (on_source, here): (String, String) = (
            source.query_scalar("app", &sql),
            dest.query_scalar("app", &sql),
        );
        assert_eq!(on_source, here, "{table} differs");
    }
    let toast: String = dest.query_scalar("app", "SELECT md5(big) FROM items WHERE id = 21");
    assert_eq!(
        toast,
        source.query_scalar::<String>("app", "SELECT md5(big) FROM items WHERE id = 21")
    );
    // Triggers fired once, on the source only: the audit rows came as data.
    assert_eq!(
        dest.query_scalar::<i64>("app", "SELECT count(*) FROM audit"),
        0
    );

    // Nothing writes now: verify agrees table by table, checksums included.
    let differing: Vec<String> = dest
        .client("postgres")
        .query(
            "SELECT schema_name || '.' || table_name || ': ' || detail FROM cloudmig.verify($1, true) \
              WHERE NOT matches",
            &[&task],
        )
        .unwrap_or_else(|e| panic!("verify: {e:?}"))
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(differing.is_empty(), "{differing:#?}");
    // A difference is found: a row changed behind the apply's back.
    dest.execute("app", "UPDATE priced SET net = 99 WHERE id = 2");
    let found: i64 = dest.query_scalar(
        "postgres",
        &format!("SELECT count(*) FROM cloudmig.verify({task}, true) WHERE NOT matches AND table_name = 'priced'"),
    );
    assert_eq!(found, 1);
    dest.execute("app", "UPDATE priced SET net = 100 WHERE id = 2");

    // Switchover: writes stop on the source, the rest arrives, downtime is reported.
    let row = dest
        .client("postgres")
        .query_one(
            "SELECT downtime_ms, final_lsn FROM cloudmig.switchover($1, '{\"verify\": true}')",
            &[&task],
        )
        .unwrap_or_else(|e| panic!("switchover: {e:?}\n{}", events(&dest, task)));
    let downtime: i64 = row.get(0);
    assert!(downtime >= 0);
    wait(&dest, task, "completed");
    // A completed task keeps no source password.
    let secrets: i64 = dest.query_scalar("postgres", "SELECT count(*) FROM cloudmig.source_secret");
    assert_eq!(secrets, 0, "a completed task keeps no password");
    // The source refuses connections now; let in again, it refuses writes,
    // and keeps no slot or publication of ours.
    let connected = source.try_client("app");
    assert!(connected.is_err(), "the source still accepts connections");
    migration::reopen_source(&source);
    let refused = source
        .client("app")
        .batch_execute("INSERT INTO items (name) VALUES ('late')");
    assert!(refused.is_err(), "the source still accepts writes");
    poll_until(
        &source,
        "postgres",
        "SELECT count(*) FROM pg_replication_slots WHERE slot_name LIKE 'cloudmig%'",
        "0",
        TIMEOUT,
    );
    // The publication is dropped although the fence made new sessions
    // read-only there, and nothing was left for the DBA to drop by hand.
    let publications: i64 = source.query_scalar(
        "app",
        "SELECT count(*) FROM pg_publication WHERE pubname LIKE 'cloudmig%'",
    );
    assert_eq!(publications, 0, "{}", events(&dest, task));
    let left_behind: i64 = dest.query_scalar(
        "postgres",
        &format!(
            "SELECT count(*) FROM cloudmig.events WHERE task_id = {task} AND kind = 'warning' \
                AND message LIKE '%by hand'"
        ),
    );
    assert_eq!(left_behind, 0, "{}", events(&dest, task));
    assert_same_data(&source, &dest, "app");
    assert_same_sequences(&source, &dest, "app");
}

fn lag_is_zero(source: &Cluster, dest: &Cluster, task: i64) {
    caught_up(source, dest, task);
}

#[test]
fn a_destination_crash_mid_transaction_neither_duplicates_nor_loses() {
    let source = source("crash-apply-src");
    source.execute("app", APP_SQL);
    let dest = ClusterBuilder::destination("crash-apply-dst").start();
    let task = start_task(&dest, &source);
    wait(&dest, task, "incremental");
    // A large transaction; crash the destination while it is being applied.
    let writer = {
        let mut client = source.client("app");
        std::thread::spawn(move || {
            client
                .batch_execute("INSERT INTO events SELECT now(), 'bulk ' || i FROM generate_series(1, 300000) i")
                .unwrap();
        })
    };
    writer.join().unwrap();
    // The apply is inside the big transaction while it holds its row lock on events.
    poll_until(
        &dest,
        "app",
        "SELECT count(*) > 0 FROM pg_locks l JOIN pg_class c ON c.oid = l.relation \
          WHERE c.relname = 'events' AND l.mode = 'RowExclusiveLock' AND l.pid <> pg_backend_pid()",
        "t",
        TIMEOUT,
    );
    dest.restart_immediate();
    // Also end the walsender from the source side once the apply is back.
    wait(&dest, task, "incremental");
    source.execute(
        "postgres",
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE backend_type = 'walsender'",
    );
    source.execute(
        "app",
        "INSERT INTO events VALUES (now(), 'after the walsender died')",
    );
    lag_is_zero(&source, &dest, task);
    let sql =
        "SELECT count(*)::text || ':' || md5(string_agg(what, ',' ORDER BY what)) FROM events";
    assert_eq!(
        source.query_scalar::<String>("app", sql),
        dest.query_scalar::<String>("app", sql)
    );
}

#[test]
fn switchover_is_refused_when_lagging_or_stalled_and_undone_on_failure() {
    let source = source("refuse-src");
    source.execute("app", APP_SQL);
    let dest = ClusterBuilder::destination("refuse-dst").start();
    let task = start_task(&dest, &source);
    wait(&dest, task, "incremental");
    // Hold the apply back: a lock on the destination table it must write.
    let mut blocker = dest.client("app");
    blocker
        .batch_execute("BEGIN; LOCK TABLE items IN ACCESS EXCLUSIVE MODE")
        .unwrap();
    source.execute(
        "app",
        "INSERT INTO items (name) SELECT 'x' FROM generate_series(1, 1000)",
    );
    poll_until(
        &dest,
        "postgres",
        &format!("SELECT max(lag_bytes) > 0 FROM cloudmig.apply_progress WHERE task_id = {task}"),
        "t",
        TIMEOUT,
    );
    let mut client = dest.client("postgres");
    // Over the lag limit: refused before anything is fenced.
    let refused = client
        .query(
            "SELECT * FROM cloudmig.switchover($1, '{\"max_lag_bytes\": 0}')",
            &[&task],
        )
        .expect_err("a lagging task must be refused");
    assert_eq!(refused.code().map(|c| c.code()), Some("55000"), "{refused}");
    assert!(
        refused.to_string().contains("lag") || format!("{refused:?}").contains("lag"),
        "{refused:?}"
    );
    source.execute("app", "INSERT INTO items (name) VALUES ('still writable')");
    // Under the lag limit but making no progress: refused before the fence
    // too, rather than fencing the source for a drain that cannot finish.
    let stalled = client
        .query(
            "SELECT * FROM cloudmig.switchover($1, '{\"timeout_seconds\": 2, \"max_lag_bytes\": 1000000000}')",
            &[&task],
        )
        .expect_err("a blocked apply cannot drain");
    assert_eq!(stalled.code().map(|c| c.code()), Some("55000"), "{stalled}");
    assert!(format!("{stalled:?}").contains("behind"), "{stalled:?}");
    let fenced: i64 = dest.query_scalar(
        "postgres",
        &format!(
            "SELECT count(*) FROM cloudmig.events WHERE task_id = {task} AND kind = 'phase' \
                AND message LIKE 'switching_over%'"
        ),
    );
    assert_eq!(fenced, 0, "{}", events(&dest, task));
    source.execute("app", "INSERT INTO items (name) VALUES ('never fenced')");
    blocker.batch_execute("ROLLBACK").unwrap();
    lag_is_zero(&source, &dest, task);

    // A failure after the fence (here: verification finds a difference) undoes it.
    dest.execute("app", "DELETE FROM priced WHERE id = 1");
    let differs = client
        .query(
            "SELECT * FROM cloudmig.switchover($1, '{\"verify\": true}')",
            &[&task],
        )
        .expect_err("a differing table must stop the switchover");
    assert_eq!(differs.code().map(|c| c.code()), Some("55000"), "{differs}");
    source.execute("app", "INSERT INTO items (name) VALUES ('writable again')");
    let phase: String = dest.query_scalar(
        "postgres",
        &format!("SELECT phase FROM cloudmig.tasks WHERE task_id = {task}"),
    );
    assert_eq!(phase, "incremental");
    // Repaired and caught up, a switchover succeeds.
    dest.execute("app", "INSERT INTO priced (id, net) VALUES (1, 10)");
    lag_is_zero(&source, &dest, task);
    client
        .query_one("SELECT downtime_ms FROM cloudmig.switchover($1)", &[&task])
        .unwrap_or_else(|e| panic!("switchover: {e:?}\n{}", events(&dest, task)));
    migration::reopen_source(&source);
    assert_same_data(&source, &dest, "app");
}

#[test]
fn a_switchover_scheduled_with_pg_cron_completes() {
    let source = source("cron-src");
    source.execute("app", APP_SQL);
    let dest = ClusterBuilder::destination("cron-dst")
        .conf("shared_preload_libraries = 'cloudmig, pg_cron'")
        .conf("cron.database_name = 'postgres'")
        .conf("cron.use_background_workers = on")
        .init_sql("CREATE EXTENSION pg_cron")
        .start();
    let task = start_task(&dest, &source);
    wait(&dest, task, "incremental");
    dest.execute(
        "postgres",
        &format!(
            "SELECT cron.schedule('cutover', '* * * * *', 'SELECT cloudmig.switchover({task})')"
        ),
    );
    // pg_cron runs it within the minute; nobody is attached to that session.
    poll_until(
        &dest,
        "postgres",
        &format!("SELECT phase FROM cloudmig.tasks WHERE task_id = {task}"),
        "completed",
        Duration::from_secs(150),
    );
    migration::reopen_source(&source);
    assert_same_data(&source, &dest, "app");
}

#[test]
fn an_apply_conflict_stops_with_the_relation_and_transaction() {
    let source = source("conflict-src");
    source.execute("app", APP_SQL);
    let dest = ClusterBuilder::destination("conflict-dst").start();
    let task = start_task(&dest, &source);
    wait(&dest, task, "incremental");
    // The row vanishes here; the source then updates it.
    dest.execute("app", "DELETE FROM items WHERE id = 5");
    source.execute("app", "UPDATE items SET name = 'conflict' WHERE id = 5");
    poll_until(
        &dest,
        "postgres",
        &format!("SELECT phase FROM cloudmig.tasks WHERE task_id = {task}"),
        "failed",
        TIMEOUT,
    );
    let row = dest
        .client("postgres")
        .query_one(
            "SELECT last_error, last_error_hint FROM cloudmig.tasks WHERE task_id = $1",
            &[&task],
        )
        .unwrap();
    let (error, hint): (String, String) = (row.get(0), row.get(1));
    for needle in [
        "public.items",
        "key (id)=(5)",
        "source transaction",
        "committing at",
        "no row",
    ] {
        assert!(error.contains(needle), "{error} lacks {needle}");
    }
    assert!(hint.contains("repair"), "{hint}");
    assert!(hint.contains(&format!("cloudmig.resume({task})")), "{hint}");
}

#[test]
fn pgbench_writing_through_copy_apply_and_switchover_loses_nothing() {
    // Two databases under pgbench, and mixed DML on keyless rows beside it, from before the
    // start until the switchover's fence ends the sessions.
    let databases = ["bench", "shop"];
    let source = ClusterBuilder::source("bench-apply-src")
        .init_sql("CREATE DATABASE bench")
        .init_sql("CREATE DATABASE shop")
        .start();
    for db in databases {
        let mut init = source.command("pgbench");
        init.args(["-i", "-s", "2", "-q", db]);
        assert!(init.output().expect("pgbench -i").status.success());
    }
    source.execute(
        "shop",
        "CREATE TABLE notes (at timestamptz DEFAULT now(), body text, n int);
         CREATE INDEX ON notes (n);
         INSERT INTO notes (body, n) SELECT 'seed ' || i, i FROM generate_series(1, 1000) i;",
    );
    // Mixed DML on the keyless table (REPLICA IDENTITY FULL): duplicates, updates, deletes.
    let script = std::env::temp_dir().join(format!("cloudmig-notes-{}.sql", std::process::id()));
    std::fs::write(
        &script,
        "\\set n random(1, 100000)
         INSERT INTO notes (body, n) VALUES ('note', :n), ('note', :n);
         UPDATE notes SET body = body || '+' WHERE n = :n - 7;
         DELETE FROM notes WHERE ctid = (SELECT ctid FROM notes WHERE n = :n - 3 LIMIT 1);
",
    )
    .expect("write the pgbench script");
    let dest = ClusterBuilder::destination("bench-apply-dst").start();
    let mut loads: Vec<_> = databases
        .iter()
        .map(|db| {
            let mut bench = source.command("pgbench");
            bench.args(["-n", "-c", "2", "-j", "1", "-R", "250", "-T", "120", db]);
            std::thread::spawn(move || bench.output())
        })
        .collect();
    let mut mixed = source.command("pgbench");
    mixed
        .args(["-n", "-c", "1", "-R", "100", "-T", "120", "-f"])
        .arg(&script)
        .arg("shop");
    loads.push(std::thread::spawn(move || mixed.output()));
    poll_until(
        &source,
        "bench",
        "SELECT count(*) > 0 FROM pgbench_history",
        "t",
        TIMEOUT,
    );
    let task = start_task(&dest, &source);
    wait(&dest, task, "incremental");
    poll_until(
        &dest,
        "postgres",
        &format!(
            "SELECT count(*) FILTER (WHERE transactions > 100) = 2 FROM cloudmig.apply_progress \
              WHERE task_id = {task} AND datname IN ('bench', 'shop')"
        ),
        "t",
        TIMEOUT,
    );
    dest.client("postgres")
        .query_one(
            "SELECT downtime_ms FROM cloudmig.switchover($1, '{\"verify\": true}')",
            &[&task],
        )
        .unwrap_or_else(|e| panic!("switchover: {e:?}\n{}", events(&dest, task)));
    // The writers' sessions were ended by the fence; they stop on their own.
    for load in loads {
        let _ = load.join();
    }
    let _ = std::fs::remove_file(&script);
    migration::reopen_source(&source);
    for db in databases {
        assert_same_data(&source, &dest, db);
        assert_same_sequences(&source, &dest, db);
        let balances = "SELECT sum(abalance)::text || '/' || (SELECT sum(delta) FROM pgbench_history)::text FROM pgbench_accounts";
        let on_dest: String = dest.query_scalar(db, balances);
        assert_eq!(on_dest, source.query_scalar::<String>(db, balances));
    }
}
