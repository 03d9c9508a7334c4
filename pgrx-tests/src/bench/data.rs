//! The benchmark's source: one cluster configured so that every peer can read from it, with
//! pgbench's tables in database `bench` and the other data sets of the method in `extra`.
//!
//! All data is generated in SQL after `setseed()`, so two runs at the same scale hold the same
//! rows. Sizes grow with the pgbench scale; the small tables' count is its own option.

use std::time::Instant;

use crate::bench::Options;
use crate::cluster::{Cluster, ClusterBuilder};
use crate::pgbin::run;

/// The database pgbench writes to (copied, and streamed by every applier).
pub const BENCH_DB: &str = "bench";
/// The database holding the other data sets (copied only).
pub const EXTRA_DB: &str = "extra";
/// The logical decoding plugins the source allows, where this PostgreSQL has that setting.
const OUTPUT_PLUGINS: &str = "pgoutput, test_decoding, pglogical_output";

/// Settings every cluster of the run gets (source and destinations alike), after the harness's.
pub const COMMON_CONF: [&str; 10] = [
    "shared_buffers = 256MB",
    "max_wal_size = 4GB",
    // No timed checkpoint during a run: full-page images after one would make the backlog of
    // whichever applier comes next larger than the others'.
    "checkpoint_timeout = '1h'",
    "maintenance_work_mem = 256MB",
    "max_worker_processes = 16",
    "max_replication_slots = 20",
    "max_wal_senders = 20",
    // An applier blocked on the benchmark's lock sends no feedback: without these the
    // walsender (or walreceiver) would drop the connection after a minute and the reconnect
    // would be measured as apply time.
    "wal_sender_timeout = '10min'",
    "wal_receiver_timeout = '10min'",
    "max_slot_wal_keep_size = '20GB'",
];

/// Tables of `bench` whose writes make the backlog (pgbench's tpcb-like transaction).
pub const PGBENCH_TABLES: &str =
    "pgbench_accounts, pgbench_branches, pgbench_tellers, pgbench_history";

/// The benchmark's own tables in `bench`: a marker bumped after each load (its value showing on
/// a destination means everything committed before it was applied there, since every applier
/// applies in commit order) and a heartbeat for lag in time.
const BENCH_TABLES_SQL: &str = "
    CREATE TABLE bench_marker (id int PRIMARY KEY, n bigint NOT NULL);
    INSERT INTO bench_marker VALUES (1, 0);
    CREATE TABLE bench_heartbeat (id int PRIMARY KEY, at timestamptz NOT NULL);
    INSERT INTO bench_heartbeat VALUES (1, clock_timestamp());
";

/// Starts the source and loads the data sets; prints what it built and how big it is.
pub fn start_source(opts: &Options, with_extra: bool) -> Cluster {
    let mut builder = ClusterBuilder::source("bench-src")
        .conf("shared_preload_libraries = 'pglogical'")
        .conf("track_commit_timestamp = on");
    for line in COMMON_CONF {
        builder = builder.conf(line);
    }
    builder = builder.init_sql(&format!("CREATE DATABASE {BENCH_DB}"));
    if with_extra {
        builder = builder.init_sql(&format!("CREATE DATABASE {EXTRA_DB}"));
    }
    let source = builder.start();
    allow_output_plugins(&source);

    let started = Instant::now();
    let mut init = source.command("pgbench");
    init.args(["-i", "-q", "-s", &opts.scale.to_string(), BENCH_DB]);
    run(&mut init).unwrap_or_else(|e| panic!("pgbench -i on the source: {e}"));
    source.execute(BENCH_DB, BENCH_TABLES_SQL);
    println!(
        "  {BENCH_DB}: pgbench -s {} in {:.1} s",
        opts.scale,
        started.elapsed().as_secs_f64()
    );
    if with_extra {
        let started = Instant::now();
        source.execute(EXTRA_DB, &extra_sql(opts.scale, opts.small_tables));
        println!(
            "  {EXTRA_DB}: wide, toast, {} small tables, indexed, no_key, measures (partitioned) in {:.1} s",
            opts.small_tables,
            started.elapsed().as_secs_f64()
        );
    }
    source.execute("postgres", "CHECKPOINT");
    source
}

/// Lists pglogical's output plugin in `output_plugin_libraries` when this PostgreSQL has that
/// setting (a Debian patch of 15.20 added it; pgoutput is allowed by default), reloading or
/// restarting as its context requires.
fn allow_output_plugins(source: &Cluster) {
    let mut client = source.client("postgres");
    if client.simple_query("SHOW output_plugin_libraries").is_err() {
        println!("  output_plugin_libraries does not exist here: nothing to allow");
        return;
    }
    let context: String = client
        .query_one(
            "SELECT context FROM pg_settings WHERE name = 'output_plugin_libraries'",
            &[],
        )
        .map(|row| row.get(0))
        .unwrap_or_else(|e| panic!("reading output_plugin_libraries' context: {e}"));
    client
        // A list setting: one literal per item (a single quoted string would be one item).
        .batch_execute(&format!(
            "ALTER SYSTEM SET output_plugin_libraries = '{}'",
            OUTPUT_PLUGINS.replace(", ", "', '")
        ))
        .unwrap_or_else(|e| panic!("setting output_plugin_libraries: {e}"));
    drop(client);
    if context == "postmaster" {
        source.restart();
    } else {
        source.execute("postgres", "SELECT pg_reload_conf()");
        crate::poll_until(
            source,
            "postgres",
            "SHOW output_plugin_libraries",
            OUTPUT_PLUGINS,
            std::time::Duration::from_secs(30),
        );
    }
    println!("  output_plugin_libraries = '{OUTPUT_PLUGINS}' ({context})");
}

/// The data sets of database `extra` at `scale`:
/// - `wide`: random text in several columns (so compression flatters nobody), a bigserial key;
/// - `toast`: values of 8–64 kB, half of them incompressible;
/// - `small_NNNN`: `small_tables` tables of 20 rows with a secondary index each;
/// - `indexed`: six secondary indexes, GIN and expression ones included;
/// - `no_key`: no primary key, duplicate rows;
/// - `measures`: partitioned by range, four partitions.
pub fn extra_sql(scale: u32, small_tables: u32) -> String {
    let wide_rows = 20_000 * scale;
    let toast_rows = 100 * scale;
    let indexed_rows = 10_000 * scale;
    let no_key_rows = 10_000 * scale;
    let measure_rows = 25_000 * scale;
    format!(
        "
    SELECT setseed(0.42);
    CREATE TABLE wide (id bigserial PRIMARY KEY, a text, b text, c text, d text, n numeric, at timestamptz);
    INSERT INTO wide (a, b, c, d, n, at)
        SELECT md5(random()::text) || md5(random()::text), md5(random()::text),
               md5(random()::text) || md5(random()::text) || md5(random()::text),
               md5(random()::text), round((random() * 1e6)::numeric, 2),
               '2024-01-01'::timestamptz + random() * interval '365 days'
          FROM generate_series(1, {wide_rows});

    CREATE TABLE toast (id int PRIMARY KEY, compressible boolean NOT NULL, doc text NOT NULL);
    INSERT INTO toast
        SELECT i, i % 2 = 0,
               CASE WHEN i % 2 = 0
                    THEN repeat('compressible text ', (8192 + (random() * 57344)::int) / 18)
                    ELSE (SELECT string_agg(md5(random()::text || i || g), '')
                            FROM generate_series(1, (8192 + (random() * 57344)::int) / 32) g)
               END
          FROM generate_series(1, {toast_rows}) i;

    DO $$
    BEGIN
        FOR i IN 1..{small_tables} LOOP
            EXECUTE format('CREATE TABLE small_%s (id int PRIMARY KEY, v text, at timestamptz)', lpad(i::text, 4, '0'));
            EXECUTE format('INSERT INTO small_%s SELECT g, md5(random()::text), now() FROM generate_series(1, 20) g',
                           lpad(i::text, 4, '0'));
            EXECUTE format('CREATE INDEX ON small_%s (v)', lpad(i::text, 4, '0'));
        END LOOP;
    END $$;

    CREATE TABLE indexed (id int PRIMARY KEY, a int, b text, c jsonb, d timestamptz, e int[]);
    INSERT INTO indexed
        SELECT i, (random() * 1000)::int, md5(random()::text),
               jsonb_build_object('k', (random() * 100)::int, 'tag', md5(random()::text)),
               '2024-01-01'::timestamptz + random() * interval '30 days',
               ARRAY[(random() * 10)::int, (random() * 10)::int]
          FROM generate_series(1, {indexed_rows}) i;
    CREATE INDEX ON indexed (a);
    CREATE INDEX ON indexed (b);
    CREATE INDEX ON indexed USING gin (c);
    CREATE INDEX ON indexed (lower(b));
    CREATE INDEX ON indexed (d, a);
    CREATE INDEX ON indexed USING gin (e);

    CREATE TABLE no_key (at timestamptz, what text, n int);
    INSERT INTO no_key
        SELECT '2024-01-01'::timestamptz + (i % 1000) * interval '1 minute', 'event ' || (i % 5000), i % 7
          FROM generate_series(1, {no_key_rows}) i;

    CREATE TABLE measures (city int NOT NULL, day date NOT NULL, value numeric, PRIMARY KEY (city, day))
        PARTITION BY RANGE (city);
    CREATE TABLE measures_0 PARTITION OF measures FOR VALUES FROM (0) TO (250);
    CREATE TABLE measures_1 PARTITION OF measures FOR VALUES FROM (250) TO (500);
    CREATE TABLE measures_2 PARTITION OF measures FOR VALUES FROM (500) TO (750);
    CREATE TABLE measures_3 PARTITION OF measures FOR VALUES FROM (750) TO (1000);
    INSERT INTO measures
        SELECT i % 1000, '2000-01-01'::date + i / 1000, round((random() * 100)::numeric, 3)
          FROM generate_series(0, {measure_rows} - 1) i;
    ANALYZE;
"
    )
}

/// `pg_database_size` of `db` on `cluster`, in bytes.
pub fn database_size(cluster: &Cluster, db: &str) -> i64 {
    cluster.query_scalar(
        "postgres",
        &format!("SELECT pg_database_size('{}')", db.replace('\'', "''")),
    )
}
