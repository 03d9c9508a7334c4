//! End to end: `cloudmig.start()` copying a whole source instance into the destination, up to
//! `copy_complete` (roles, schema, a snapshot-consistent copy of the data, post-data).
//!
//! Every test assesses the source first (start() takes an assessment), then waits with
//! `cloudmig.wait()` or `poll_until`, never with a fixed sleep, and judges the result with
//! `cloudmig_e2e::compare`, whose helpers are proved on their own in tests/compare.rs.
//!
//! The migration account is the superuser `migrator`, except in the test that says otherwise.

use std::collections::BTreeMap;
use std::thread;
use std::time::{Duration, Instant};

use cloudmig_e2e::compare::{databases, ordinary_tables, stable_client, table_fingerprints};
use cloudmig_e2e::{
    assert_same_data, assert_same_instance, assert_same_role_passwords, assert_same_roles,
    assert_same_schema, load_rich_source, poll_until, Cluster, ClusterBuilder,
};

const PASSWORD: &str = "m1grat0r-Pa55";

/// The migration account, as a superuser (so that passwords can be read and copied).
const SUPERUSER_MIGRATOR_SQL: &str = "
    SET password_encryption = 'scram-sha-256';
    CREATE ROLE migrator LOGIN SUPERUSER PASSWORD 'm1grat0r-Pa55';
";

/// The account the README recommends when a superuser is not available.
const PLAIN_MIGRATOR_SQL: &str = "
    SET password_encryption = 'scram-sha-256';
    CREATE ROLE migrator LOGIN REPLICATION CREATEROLE PASSWORD 'm1grat0r-Pa55';
    GRANT pg_monitor, pg_read_all_data TO migrator;
";

/// pg_hba.conf of a source that wants SCRAM passwords over TCP.
const SCRAM_HBA: &[&str] = &[
    "local all all trust",
    "host all all 127.0.0.1/32 scram-sha-256",
    "host replication all 127.0.0.1/32 scram-sha-256",
];

/// The phases a successful task goes through, in order (sql/tasks.sql).
const PHASES: [&str; 5] = ["roles", "schema", "full_copy", "post_data", "copy_complete"];

/// How long a whole copy of these small sources may take (two cores shared by two tests).
const COPY_TIMEOUT: Duration = Duration::from_secs(300);
/// How long an intermediate state may take to show.
const POLL_TIMEOUT: Duration = Duration::from_secs(120);

/// Sixteen tables of 100,000 rows (about 10 MB each) and one without a primary key: a copy long
/// enough, with one copy worker, to be caught half-way by `poll_until`.
const BULK_SQL: &str = "
    DO $$
    BEGIN
        FOR i IN 1..16 LOOP
            EXECUTE format('CREATE TABLE public.bulk_%s (id int, a text, b text)', i);
            EXECUTE format('INSERT INTO public.bulk_%s
                                SELECT g, md5(g::text), md5((g * %s)::text)
                                  FROM generate_series(1, 100000) g', i, i);
            EXECUTE format('ALTER TABLE public.bulk_%s ADD PRIMARY KEY (id)', i);
        END LOOP;
    END
    $$;
    CREATE TABLE public.bulk_no_key AS
        SELECT g % 1000 AS n, md5((g % 1000)::text) AS a FROM generate_series(1, 50000) g;
";

/// A source prepared as the README says, with `account_sql` creating the `migrator` account.
fn source(name: &str, account_sql: &str) -> ClusterBuilder {
    ClusterBuilder::source(name)
        .hba(SCRAM_HBA)
        .conf("max_slot_wal_keep_size = '1GB'")
        .init_sql(account_sql)
}

/// A source with the rich fixture loaded (roles, four databases, most kinds of objects).
fn rich_source(name: &str) -> Cluster {
    let source = source(name, SUPERUSER_MIGRATOR_SQL).start();
    let took = load_rich_source(&source);
    eprintln!("rich fixture loaded in {took:?}");
    source
}

/// A source with database `bulk` holding [`BULK_SQL`].
fn bulk_source(name: &str) -> Cluster {
    let started = Instant::now();
    let source = source(name, SUPERUSER_MIGRATOR_SQL)
        .init_sql("CREATE DATABASE bulk")
        .start();
    source.execute("bulk", BULK_SQL);
    eprintln!("bulk source ready in {:?}", started.elapsed());
    source
}

fn destination(name: &str) -> Cluster {
    ClusterBuilder::destination(name).start()
}

/// Assesses `source` as `migrator` over TCP (the assessment must pass), then starts a task with
/// `options`; returns its id.
fn start(dest: &Cluster, source: &Cluster, options: &str) -> i64 {
    let conninfo = source.tcp_conninfo("migrator", Some(PASSWORD), "postgres");
    let mut client = dest.client("postgres");
    let assessment: i64 = client
        .query_one("SELECT cloudmig.assess($1)", &[&conninfo])
        .unwrap_or_else(|e| panic!("assess failed: {e:?}"))
        .get(0);
    let failed: Vec<String> = client
        .query(
            "SELECT name || ': ' || detail FROM cloudmig.assessment_checks \
              WHERE assessment_id = $1 AND status = 'fail' ORDER BY ordinal",
            &[&assessment],
        )
        .expect("read the assessment")
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(failed.is_empty(), "the assessment failed: {failed:#?}");
    // Fixtures hold tables without a key (pgbench_history among them): choose
    // REPLICA IDENTITY FULL for them, as start() requires a choice.
    let options = if options.trim() == "{}" {
        r#"{"replica_identity_full": true}"#.to_string()
    } else {
        options.replacen('{', r#"{"replica_identity_full": true, "#, 1)
    };
    client
        .query_one(
            "SELECT cloudmig.start($1, $2::text::jsonb)",
            &[&assessment, &options],
        )
        .unwrap_or_else(|e| panic!("start failed: {e:?}"))
        .get(0)
}

/// `cloudmig.wait(task, phase, timeout)`: the phase reached (or failed/cancelled).
fn wait(dest: &Cluster, task: i64, phase: &str, timeout: Duration) -> String {
    let timeout = format!("{} seconds", timeout.as_secs());
    dest.client("postgres")
        .query_one(
            "SELECT cloudmig.wait($1, $2, $3::text::interval)",
            &[&task, &phase, &timeout],
        )
        .unwrap_or_else(|e| panic!("cloudmig.wait({task}, {phase}) failed: {e:?}"))
        .get(0)
}

/// Waits for `phase`; panics with the task, its events and the server log if another comes.
fn expect_phase(dest: &Cluster, task: i64, phase: &str) {
    let started = Instant::now();
    let reached = wait(dest, task, phase, COPY_TIMEOUT);
    assert_eq!(
        reached,
        phase,
        "task {task} did not reach {phase}:\n{}",
        task_report(dest, task)
    );
    eprintln!("task {task} reached {phase} after {:?}", started.elapsed());
}

/// The task's row, its events and the destination's log tail, for failure messages.
fn task_report(dest: &Cluster, task: i64) -> String {
    let mut client = dest.client("postgres");
    let row: Option<String> = client
        .query_opt(
            "SELECT to_jsonb(t)::text FROM cloudmig.tasks t WHERE task_id = $1",
            &[&task],
        )
        .ok()
        .flatten()
        .map(|r| r.get(0));
    let events: Vec<String> = client
        .query(
            "SELECT format('%s %s %s', at, kind, message) FROM cloudmig.events \
              WHERE task_id = $1 ORDER BY at",
            &[&task],
        )
        .map(|rows| rows.iter().map(|r| r.get(0)).collect())
        .unwrap_or_default();
    format!(
        "task: {}\nevents:\n{}\n--- destination log tail ---\n{}",
        row.unwrap_or_else(|| "<none>".to_owned()),
        events.join("\n"),
        dest.log_tail(40)
    )
}

/// Every table of every copied database shows in `table_progress` as copied or indexed, every
/// ordinary table with the source's row count (a materialized view is refreshed, so its count is
/// not checked here: `compare_data` checks its contents); the task's totals agree with its tables.
fn assert_progress_complete(source: &Cluster, dest: &Cluster, task: i64, dbs: &[String]) {
    let mut client = dest.client("postgres");
    let mut problems = Vec::new();
    for db in dbs {
        let progress: BTreeMap<String, (String, Option<i64>)> = client
            .query(
                "SELECT format('%I.%I', schema_name, table_name), state::text, \
                        rows_copied::bigint \
                   FROM cloudmig.table_progress WHERE task_id = $1 AND database::text = $2",
                &[&task, db],
            )
            .expect("read table_progress")
            .iter()
            .map(|r| (r.get(0), (r.get(1), r.get(2))))
            .collect();
        let rows = table_fingerprints(source, db);
        for table in ordinary_tables(source, db) {
            let Some((_, copied)) = progress.get(&table) else {
                problems.push(format!("{db}: {table} is not in table_progress"));
                continue;
            };
            let source_rows = rows.get(&table).map(|(n, _)| *n);
            if *copied != source_rows {
                problems.push(format!(
                    "{db}: {table} copied {copied:?} rows, the source has {source_rows:?}"
                ));
            }
        }
        for (table, (state, _)) in &progress {
            if state != "copied" && state != "indexed" {
                problems.push(format!("{db}: {table} is {state}"));
            }
        }
    }
    let totals: (bool, bool) = {
        let row = client
            .query_one(
                "SELECT t.tables_done = t.tables_total AND t.tables_total > 0, \
                        t.rows_copied::bigint = (SELECT sum(p.rows_copied)::bigint \
                                                   FROM cloudmig.table_progress p \
                                                  WHERE p.task_id = t.task_id) \
                   FROM cloudmig.tasks t WHERE t.task_id = $1",
                &[&task],
            )
            .expect("read the task");
        (row.get(0), row.get(1))
    };
    if !totals.0 {
        problems.push("tasks.tables_done <> tables_total".to_owned());
    }
    if !totals.1 {
        problems.push("tasks.rows_copied <> the sum of table_progress.rows_copied".to_owned());
    }
    assert!(
        problems.is_empty(),
        "progress of task {task}:\n{}\n\n{}",
        problems.join("\n"),
        task_report(dest, task)
    );
}

/// The task's `phase` events name [`PHASES`] in order (other events may come between).
fn assert_phase_events_in_order(dest: &Cluster, task: i64) {
    let messages: Vec<String> = dest
        .client("postgres")
        .query(
            "SELECT message FROM cloudmig.events WHERE task_id = $1 AND kind = 'phase' \
              ORDER BY at",
            &[&task],
        )
        .expect("read events")
        .iter()
        .map(|r| r.get(0))
        .collect();
    let mut expected = PHASES.iter().peekable();
    for message in &messages {
        if expected
            .peek()
            .is_some_and(|phase| mentions(message, phase))
        {
            expected.next();
        }
    }
    assert!(
        expected.peek().is_none(),
        "phase events of task {task} lack {:?} (expected in order {PHASES:?}):\n{}",
        expected.collect::<Vec<_>>(),
        messages.join("\n")
    );
}

/// Whether `message` has `word` as a whole word (`full_copy` is one word; `copy` is not in it).
fn mentions(message: &str, word: &str) -> bool {
    message
        .split(|c: char| !(c.is_alphanumeric() || c == '_'))
        .any(|w| w == word)
}

#[test]
fn the_rich_source_is_copied_whole() {
    let source = rich_source("rich-src");
    let dest = destination("rich-dst");
    let task = start(&dest, &source, r#"{"copy_workers": 2}"#);
    expect_phase(&dest, task, "incremental");

    // The source's four databases, `postgres` merged into the destination's own.
    assert_same_instance(&source, &dest);
    assert_same_role_passwords(&source, &dest);
    assert_progress_complete(&source, &dest, task, &databases(&source));
    assert_phase_events_in_order(&dest, task);

    // The workers honour SIGTERM (pg_ctl waits 60 s), and the copy is durable.
    dest.restart();
    assert_same_data(&source, &dest, "app");
}

/// pgbench writes on the source from before `start()` until after the snapshot. The copy
/// must be the source as of one snapshot, and the apply must add exactly what came after it:
/// once pgbench stops and the apply catches up, both sides are equal. A torn copy or a change
/// applied twice (pgbench_history has no key, so a duplicate would stay) makes them differ.
#[test]
fn writes_during_the_copy_land_once_and_the_apply_catches_up() {
    let source = source("bench-src", SUPERUSER_MIGRATOR_SQL)
        .init_sql("CREATE DATABASE bench")
        .start();
    pgbench_init(&source);
    let dest = destination("bench-dst");

    let load = pgbench_run(&source, 15);
    let committed_before_start = history_rows(&source);
    let task = start(&dest, &source, r#"{"databases": ["bench"]}"#);
    poll_until(
        &dest,
        "postgres",
        &format!(
            "SELECT count(*) > 0 FROM cloudmig.table_progress \
              WHERE task_id = {task} AND database::text = 'bench' AND state <> 'pending'"
        ),
        "t",
        POLL_TIMEOUT,
    );
    expect_phase(&dest, task, "incremental");
    finish(load);
    let committed_after_load = history_rows(&source);
    assert!(
        count(&committed_after_load) > count(&committed_before_start),
        "pgbench wrote nothing during the copy"
    );
    let target: String = source.query_scalar("postgres", "SELECT pg_current_wal_lsn()::text");
    poll_until(
        &dest,
        "postgres",
        &format!(
            "SELECT bool_and(applied_lsn::pg_lsn >= '{target}'::pg_lsn) FROM cloudmig.apply_progress \
              WHERE task_id = {task}"
        ),
        "t",
        POLL_TIMEOUT,
    );
    assert_same_data(&source, &dest, "bench");
    assert_eq!(inconsistent_balances(&dest), 0);
    let accounts: i64 = dest.query_scalar("bench", "SELECT count(*) FROM pgbench_accounts");
    assert_eq!(accounts, 200_000);
    assert_same_schema(&source, &dest, "bench");
    assert_same_roles(&source, &dest);
}

/// `pgbench -i -s 2` into database `bench` (200,000 accounts).
fn pgbench_init(cluster: &Cluster) {
    let mut init = cluster.command("pgbench");
    init.args(["-i", "-s", "2", "-q", "bench"]);
    run_ok(&mut init);
}

/// Starts `pgbench -T seconds` on `bench` in a thread; returns once it has committed something.
/// Rate-limited (-R): the point is writes during the copy, not starving it of the two cores.
fn pgbench_run(cluster: &Cluster, seconds: u32) -> thread::JoinHandle<std::process::Output> {
    let mut bench = cluster.command("pgbench");
    let seconds = seconds.to_string();
    bench.args([
        "-n", "-c", "2", "-j", "2", "-R", "1000", "-T", &seconds, "bench",
    ]);
    let load = thread::spawn(move || bench.output().expect("run pgbench"));
    poll_until(
        cluster,
        "bench",
        "SELECT count(*) > 0 FROM pgbench_history",
        "t",
        POLL_TIMEOUT,
    );
    load
}

/// Waits for a [`pgbench_run`] to end; panics if it failed.
fn finish(load: thread::JoinHandle<std::process::Output>) {
    let out = load.join().expect("the pgbench thread");
    assert!(
        out.status.success(),
        "pgbench: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn run_ok(cmd: &mut std::process::Command) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `md5(row::text)` of every pgbench_history row → how many times it occurs.
fn history_rows(cluster: &Cluster) -> BTreeMap<String, usize> {
    let mut rows = BTreeMap::new();
    for row in stable_client(cluster, "bench")
        .query("SELECT md5(h::text) FROM public.pgbench_history h", &[])
        .expect("read pgbench_history")
    {
        *rows.entry(row.get(0)).or_insert(0) += 1;
    }
    rows
}

fn count(rows: &BTreeMap<String, usize>) -> usize {
    rows.values().sum()
}

/// Accounts, tellers and branches whose balance is not the sum of their history deltas.
fn inconsistent_balances(cluster: &Cluster) -> i64 {
    cluster.query_scalar(
        "bench",
        "SELECT (SELECT count(*) FROM pgbench_accounts a
                   FULL JOIN (SELECT aid, sum(delta) AS s FROM pgbench_history GROUP BY aid) h
                   USING (aid)
                  WHERE a.aid IS NULL OR a.abalance <> coalesce(h.s, 0))
              + (SELECT count(*) FROM pgbench_tellers t
                   FULL JOIN (SELECT tid, sum(delta) AS s FROM pgbench_history GROUP BY tid) h
                   USING (tid)
                  WHERE t.tid IS NULL OR t.tbalance <> coalesce(h.s, 0))
              + (SELECT count(*) FROM pgbench_branches b
                   FULL JOIN (SELECT bid, sum(delta) AS s FROM pgbench_history GROUP BY bid) h
                   USING (bid)
                  WHERE b.bid IS NULL OR b.bbalance <> coalesce(h.s, 0))",
    )
}

#[test]
fn a_destination_crash_mid_copy_resumes_without_duplicates() {
    let source = bulk_source("crash-src");
    let dest = destination("crash-dst");
    let task = start(&dest, &source, r#"{"copy_workers": 1}"#);
    // Half-way: some table done, some not.
    poll_until(
        &dest,
        "postgres",
        &format!(
            "SELECT count(*) FILTER (WHERE state IN ('copied', 'indexed')) > 0 \
                AND count(*) FILTER (WHERE state IN ('pending', 'copying')) > 0 \
               FROM cloudmig.table_progress WHERE task_id = {task}"
        ),
        "t",
        POLL_TIMEOUT,
    );
    dest.restart_immediate();
    expect_phase(&dest, task, "incremental");

    // Equal fingerprints mean equal row counts too: a table copied twice, even in part, differs.
    assert_same_instance(&source, &dest);
    assert_same_data(&source, &dest, "bulk");
    assert_progress_complete(&source, &dest, task, &databases(&source));
}

/// Eight tables each with a key and an index whose expression sleeps a millisecond a row, so
/// that building one table's indexes lasts long enough to be caught by `poll_until`; a foreign key
/// between two of them (post-data proper, built once every table is in). Their rows are padded
/// to over 1 MiB a table: a smaller table has its indexes built in its copy's own transaction,
/// with nothing between its rows and its indexes to catch.
const SLOW_INDEX_SQL: &str = "
    CREATE FUNCTION public.slow_key(n int) RETURNS int LANGUAGE plpgsql IMMUTABLE
        AS $$ BEGIN PERFORM pg_catalog.pg_sleep(0.001); RETURN n; END $$;
    DO $$
    BEGIN
        FOR i IN 1..8 LOOP
            EXECUTE format('CREATE TABLE public.slow_%s (id int PRIMARY KEY, v int,
                                CHECK (v >= 0), pad text)', i);
            EXECUTE format('INSERT INTO public.slow_%s
                            SELECT g, g, repeat(''x'', 800) FROM generate_series(1, 1500) g', i);
            EXECUTE format('CREATE INDEX slow_%s_v ON public.slow_%s (public.slow_key(v))', i, i);
            EXECUTE format('ALTER TABLE public.slow_%s ADD CONSTRAINT slow_%s_positive
                                CHECK (id > 0) NOT VALID', i, i);
        END LOOP;
    END
    $$;
    ALTER TABLE public.slow_2 ADD CONSTRAINT slow_2_fk FOREIGN KEY (v) REFERENCES public.slow_1 (id);
";

/// Each table's own indexes and constraints are built right after its rows, by the copy worker
/// (`table_progress` shows when), before other tables' rows; a destination killed after a
/// table's rows committed but before its indexes did resumes: that table is not copied again,
/// its indexes are built, and the result equals the source (schema and data).
#[test]
fn indexes_are_built_per_table_and_a_crash_between_rows_and_indexes_resumes() {
    let started = Instant::now();
    let source = source("perindex-src", SUPERUSER_MIGRATOR_SQL)
        .init_sql("CREATE DATABASE slow")
        .start();
    source.execute("slow", SLOW_INDEX_SQL);
    eprintln!("slow-index source ready in {:?}", started.elapsed());
    let dest = destination("perindex-dst");
    let task = start(&dest, &source, r#"{"copy_workers": 1}"#);
    // A table whose rows are in and whose indexes are being built.
    poll_until(
        &dest,
        "postgres",
        &format!(
            "SELECT count(*) > 0 FROM cloudmig.table_progress \
              WHERE task_id = {task} AND database = 'slow' AND state = 'copied' \
                AND indexes_started_at IS NOT NULL AND indexes_finished_at IS NULL"
        ),
        "t",
        POLL_TIMEOUT,
    );
    // Those tables, with when their copy started: the same after the resume (not copied again).
    let caught_sql = format!(
        "SELECT coalesce(string_agg(table_name || ' ' || started_at::text, ',' \
                                    ORDER BY table_name), '') \
           FROM cloudmig.table_progress WHERE task_id = {task} AND database = 'slow' \
            AND state = 'copied'"
    );
    let caught: String = dest.query_scalar("postgres", &caught_sql);
    assert!(
        !caught.is_empty(),
        "no table caught between its rows and its indexes"
    );
    dest.restart_immediate();
    expect_phase(&dest, task, "incremental");
    assert_same_schema(&source, &dest, "slow");
    assert_same_data(&source, &dest, "slow");
    assert_progress_complete(&source, &dest, task, &databases(&source));

    let mut client = dest.client("postgres");
    // Every table of `slow` has its own index build timed, and with one worker, some table's
    // indexes were done before another table's copy started: per table, not all at the end.
    let row = client
        .query_one(
            "SELECT count(*) FILTER (WHERE state = 'indexed' AND index_seconds IS NOT NULL), \
                    count(*), \
                    min(indexes_finished_at) < max(started_at) \
               FROM cloudmig.table_progress WHERE task_id = $1 AND database = 'slow'",
            &[&task],
        )
        .expect("read table_progress");
    let (timed, total, interleaved): (i64, i64, bool) = (row.get(0), row.get(1), row.get(2));
    assert_eq!(
        (timed, total),
        (8, 8),
        "indexes not timed per table:\n{}",
        task_report(&dest, task)
    );
    assert!(
        interleaved,
        "indexes were not built table by table:\n{}",
        task_report(&dest, task)
    );
    // The tables caught between their rows and their indexes were not copied again.
    for entry in caught.split(',') {
        let (table, started_at) = entry.split_once(' ').unwrap_or((entry, ""));
        let now: String = dest.query_scalar(
            "postgres",
            &format!(
                "SELECT started_at::text FROM cloudmig.table_progress \
                  WHERE task_id = {task} AND database = 'slow' AND table_name = '{table}'"
            ),
        );
        assert_eq!(
            now, started_at,
            "{table}: its rows were copied again after the crash"
        );
    }
}

/// Two databases, each with a large table: with two copy workers the copy is one queue across
/// databases, largest tables first, so each database's largest table is handed out at once and
/// the two copies overlap (`table_progress` start and finish times). Both databases end up equal
/// to the source, each recorded as copied with its own event.
#[test]
fn two_databases_are_copied_at_the_same_time() {
    let started = Instant::now();
    let source = source("twodb-src", SUPERUSER_MIGRATOR_SQL)
        .init_sql("CREATE DATABASE one")
        .init_sql("CREATE DATABASE two")
        .start();
    for (db, big) in [("one", 300_000), ("two", 200_000)] {
        source.execute(
            db,
            &format!(
                "CREATE TABLE public.big (id int PRIMARY KEY, a text, b text);
                 INSERT INTO public.big
                     SELECT g, md5(g::text), md5((g * 7)::text) FROM generate_series(1, {big}) g;
                 CREATE TABLE public.small (id int PRIMARY KEY, note text);
                 INSERT INTO public.small SELECT g, 'n' || g FROM generate_series(1, 500) g;
                 CREATE SEQUENCE public.counter;
                 SELECT setval('public.counter', 42);"
            ),
        );
    }
    eprintln!("two-database source ready in {:?}", started.elapsed());
    let dest = destination("twodb-dst");
    let task = start(&dest, &source, r#"{"copy_workers": 2}"#);
    expect_phase(&dest, task, "incremental");
    for db in ["one", "two"] {
        assert_same_schema(&source, &dest, db);
        assert_same_data(&source, &dest, db);
    }
    assert_progress_complete(&source, &dest, task, &databases(&source));

    // Some table of `one` was being copied while some table of `two` was: their copies
    // overlapped instead of one database waiting for the other's last table.
    let overlapped: bool = dest.query_scalar(
        "postgres",
        &format!(
            "SELECT EXISTS (SELECT FROM cloudmig.table_progress a, cloudmig.table_progress b \
                             WHERE a.task_id = {task} AND b.task_id = {task} \
                               AND a.database = 'one' AND b.database = 'two' \
                               AND a.started_at < b.finished_at \
                               AND b.started_at < a.finished_at)"
        ),
    );
    assert!(
        overlapped,
        "the two databases were copied one after the other:\n{}",
        task_report(&dest, task)
    );
    let copied: i64 = dest.query_scalar(
        "postgres",
        &format!(
            "SELECT count(DISTINCT datname) FROM cloudmig.events \
              WHERE task_id = {task} AND message LIKE 'data copied:%' \
                AND datname IN ('one', 'two')"
        ),
    );
    assert_eq!(
        copied,
        2,
        "not one 'data copied' event per database:\n{}",
        task_report(&dest, task)
    );
}

#[test]
fn cancel_stops_the_copy_and_cleans_the_source() {
    let source = bulk_source("cancel-src");
    let dest = destination("cancel-dst");
    let task = start(&dest, &source, r#"{"copy_workers": 1}"#);
    assert_eq!(wait(&dest, task, "full_copy", COPY_TIMEOUT), "full_copy");
    // There is something to clean up.
    poll_until(
        &source,
        "postgres",
        "SELECT count(*) > 0 FROM pg_replication_slots WHERE slot_name LIKE 'cloudmig%'",
        "t",
        POLL_TIMEOUT,
    );

    dest.execute("postgres", &format!("SELECT cloudmig.cancel({task})"));
    poll_until(
        &dest,
        "postgres",
        &format!("SELECT phase FROM cloudmig.tasks WHERE task_id = {task}"),
        "cancelled",
        POLL_TIMEOUT,
    );
    poll_until(
        &source,
        "postgres",
        "SELECT count(*) FROM pg_replication_slots WHERE slot_name LIKE 'cloudmig%'",
        "0",
        POLL_TIMEOUT,
    );
    // Publications are per database.
    for db in databases(&source) {
        poll_until(
            &source,
            &db,
            "SELECT count(*) FROM pg_publication WHERE pubname LIKE 'cloudmig%'",
            "0",
            POLL_TIMEOUT,
        );
    }
    // The workers are gone: nothing of theirs is connected to the source any more.
    poll_until(
        &source,
        "postgres",
        "SELECT count(*) FROM pg_stat_activity WHERE usename = 'migrator'",
        "0",
        POLL_TIMEOUT,
    );
    // Waiting on a cancelled task returns at once, with the phase it ended in.
    assert_eq!(
        wait(&dest, task, "copy_complete", COPY_TIMEOUT),
        "cancelled"
    );
}

#[test]
fn a_non_superuser_account_copies_roles_without_passwords() {
    let source = source("plain-src", PLAIN_MIGRATOR_SQL)
        .init_sql(
            "SET password_encryption = 'scram-sha-256';
             CREATE ROLE alice LOGIN CREATEDB PASSWORD 'alice-pw';
             SET password_encryption = 'md5';
             CREATE ROLE bob LOGIN PASSWORD 'bob-pw' VALID UNTIL 'infinity';
             RESET password_encryption;
             CREATE ROLE carol LOGIN;
             CREATE ROLE team NOLOGIN;
             GRANT team TO alice, bob;
             ALTER ROLE alice SET work_mem = '32MB';",
        )
        .init_sql("CREATE DATABASE app OWNER alice")
        // What a non-superuser account needs to publish the tables it streams.
        .init_sql("GRANT alice TO migrator; GRANT CREATE ON DATABASE app, postgres TO migrator")
        .start();
    source.execute(
        "app",
        "SET ROLE alice;
         CREATE TABLE public.notes (id bigserial PRIMARY KEY, body text NOT NULL);
         INSERT INTO public.notes (body) SELECT 'note ' || i FROM generate_series(1, 100) i;
         GRANT SELECT ON public.notes TO team;",
    );
    let with_password: Vec<String> = source
        .client("postgres")
        .query(
            "SELECT rolname::text FROM pg_authid \
              WHERE rolpassword IS NOT NULL AND rolname !~ '^pg_' ORDER BY 1",
            &[],
        )
        .expect("read pg_authid")
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(with_password, ["alice", "bob", "migrator"]);
    let dest = destination("plain-dst");
    let task = start(&dest, &source, "{}");
    expect_phase(&dest, task, "incremental");

    // Everything but the passwords (which compare::roles leaves out) is there.
    assert_same_instance(&source, &dest);
    let mut client = dest.client("postgres");
    for role in &with_password {
        let password_here: bool = client
            .query_one(
                "SELECT rolpassword IS NOT NULL FROM pg_authid WHERE rolname = $1",
                &[role],
            )
            .unwrap_or_else(|e| panic!("role {role} on the destination: {e}"))
            .get(0);
        assert!(!password_here, "{role} got a password");
        let told: i64 = client
            .query_one(
                "SELECT count(*) FROM cloudmig.events WHERE task_id = $1 \
                    AND strpos(message, $2) > 0 AND message ILIKE '%password%'",
                &[&task, role],
            )
            .expect("read events")
            .get(0);
        assert!(
            told > 0,
            "no event says {role}'s password was not copied:\n{}",
            task_report(&dest, task)
        );
    }
}

#[test]
fn a_source_outage_mid_copy_is_retried_and_the_copy_completes() {
    let source = bulk_source("outage-src");
    let dest = destination("outage-dst");
    let task = start(&dest, &source, r#"{"copy_workers": 1}"#);
    poll_until(
        &dest,
        "postgres",
        &format!(
            "SELECT count(*) FILTER (WHERE state IN ('copied', 'indexed')) > 0 \
                AND count(*) FILTER (WHERE state IN ('pending', 'copying')) > 0 \
               FROM cloudmig.table_progress WHERE task_id = {task}"
        ),
        "t",
        POLL_TIMEOUT,
    );
    source.stop();
    // The task says it is waiting for the source, and does not fail.
    poll_until(
        &dest,
        "postgres",
        &format!(
            "SELECT phase <> 'failed' AND last_error LIKE '%source is unavailable%retrying%' \
               FROM cloudmig.tasks WHERE task_id = {task}"
        ),
        "t",
        POLL_TIMEOUT,
    );
    source.restart();
    expect_phase(&dest, task, "incremental");
    assert_same_instance(&source, &dest);
    assert_same_data(&source, &dest, "bulk");
    let retries: i64 = dest.query_scalar(
        "postgres",
        &format!(
            "SELECT count(*) FROM cloudmig.events WHERE task_id = {task} \
                AND kind = 'warning' AND message LIKE '%retrying%'"
        ),
    );
    assert!(retries >= 1);
}
