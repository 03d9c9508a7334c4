//! Driving each tool the way its documentation says, and nothing more: destinations per tool,
//! the copy commands, the streaming set-up of each applier, and the clean-up of the source.
//!
//! Every tool reaches the source over TCP on 127.0.0.1, at [`source_port`]: the source's own
//! port, or a link emulator's in front of it ([`route_source`]), and the destination over its
//! Unix socket. Every wait is bounded by the caller's timeout and
//! returns `Err` with what was seen instead of hanging.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU16, Ordering};
use std::time::{Duration, Instant};

use crate::bench::data::COMMON_CONF;
use crate::bench::Tool;
use crate::cluster::{describe, Cluster, ClusterBuilder};
use crate::pgbin::{bindir, chown_to_server, pg_command, run};
use crate::poll::try_poll_every;

/// How often completion is polled while a tool is timed.
pub const TIMING_POLL: Duration = Duration::from_millis(50);

/// How an error of a wait that ran out of time starts (see [`is_timeout`]).
pub const TIMEOUT_PREFIX: &str = "timeout:";

/// Whether `error` is a wait that ran out of time rather than a failure.
pub fn is_timeout(error: &str) -> bool {
    error.starts_with(TIMEOUT_PREFIX)
}

/// Named phase durations in seconds, in order.
pub type Phases = Vec<(String, f64)>;

/// A fresh destination for `tool`: the same settings for every tool, plus cloudmig preloaded
/// and created (cloudmig) or pglogical preloaded (pglogical).
pub fn destination(tool: Tool, name: &str) -> Cluster {
    let mut builder = match tool {
        Tool::Cloudmig => ClusterBuilder::destination(name),
        _ => ClusterBuilder::source(name),
    };
    for line in COMMON_CONF {
        builder = builder.conf(line);
    }
    if tool == Tool::Pglogical {
        builder = builder.conf("shared_preload_libraries = 'pglogical'");
    }
    builder.start()
}

/// The port the tools reach the source at instead of its own, 0 for none (one source per run,
/// so one process-wide setting; every helper of this module that connects to the source reads
/// it, so no tool can bypass the link).
static SOURCE_ROUTE: AtomicU16 = AtomicU16::new(0);

/// From now on the tools reach the source at `port` of 127.0.0.1 (a link emulator in front of
/// it), or directly with None.
pub fn route_source(port: Option<u16>) {
    SOURCE_ROUTE.store(port.unwrap_or(0), Ordering::SeqCst);
}

/// The port of 127.0.0.1 the tools reach the source at.
pub fn source_port(source: &Cluster) -> u16 {
    match SOURCE_ROUTE.load(Ordering::SeqCst) {
        0 => source.port,
        port => port,
    }
}

/// libpq conninfo of `db` on the source over TCP, as superuser `postgres` (trusted there).
pub fn source_dsn(source: &Cluster, db: &str) -> String {
    let direct = source.tcp_conninfo("postgres", None, db);
    direct.replacen(
        &format!("port={} ", source.port),
        &format!("port={} ", source_port(source)),
        1,
    )
}

/// A PostgreSQL client program connected to the source over TCP on 127.0.0.1.
fn source_command(source: &Cluster, program: &str) -> Command {
    let mut cmd = pg_command(program);
    cmd.args([
        "-h",
        "127.0.0.1",
        "-p",
        &source_port(source).to_string(),
        "-U",
        "postgres",
    ]);
    cmd
}

/// `CREATE DATABASE db` on `dest` (the tools that need an existing target).
fn create_database(dest: &Cluster, db: &str) -> Result<(), String> {
    let mut client = dest.try_client("postgres").map_err(|e| describe(&e))?;
    client
        .batch_execute(&format!("CREATE DATABASE \"{db}\""))
        .map_err(|e| describe(&e))
}

/// Runs `producer | consumer` (a real pipe between the two processes); `Err` with the stderr of
/// whichever failed.
fn pipe(mut producer: Command, mut consumer: Command) -> Result<(), String> {
    let mut first = producer
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run {producer:?}: {e}"))?;
    let stdout = first.stdout.take().expect("stdout was piped");
    let second = consumer
        .stdin(Stdio::from(stdout))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run {consumer:?}: {e}"))?;
    let second_out = second
        .wait_with_output()
        .map_err(|e| format!("waiting for {consumer:?}: {e}"))?;
    let first_out = first
        .wait_with_output()
        .map_err(|e| format!("waiting for {producer:?}: {e}"))?;
    for (cmd, out) in [(&producer, &first_out), (&consumer, &second_out)] {
        if !out.status.success() {
            return Err(format!(
                "{:?} failed ({}): {}",
                cmd.get_program(),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
    }
    Ok(())
}

/// A fresh directory under `scratch` owned by the server user (the programs run as it).
fn fresh_dir(scratch: &Path, name: &str) -> Result<PathBuf, String> {
    let dir = scratch.join(name);
    if dir.exists() {
        std::fs::remove_dir_all(&dir)
            .map_err(|e| format!("cannot empty {}: {e}", dir.display()))?;
    }
    std::fs::create_dir_all(&dir)
        .and_then(|()| chown_to_server(&dir))
        .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    Ok(dir)
}

/// Seconds since `start`.
pub fn secs(start: Instant) -> f64 {
    start.elapsed().as_secs_f64()
}

/// `pg_dump -Fc | pg_restore --create` per database.
pub fn copy_pg_dump_pipe(source: &Cluster, dest: &Cluster, dbs: &[String]) -> Result<(), String> {
    for db in dbs {
        let mut dump = source_command(source, "pg_dump");
        dump.args(["-Fc", "-d", db]);
        let mut restore = dest.command("pg_restore");
        restore.args(["--create", "--exit-on-error", "-d", "postgres"]);
        pipe(dump, restore)?;
    }
    Ok(())
}

/// `pg_dump -Fd -j2` then `pg_restore -j2 --create` per database, through `scratch`.
pub fn copy_pg_dump_parallel(
    source: &Cluster,
    dest: &Cluster,
    dbs: &[String],
    scratch: &Path,
) -> Result<Phases, String> {
    let (mut dump_s, mut restore_s) = (0.0, 0.0);
    for db in dbs {
        let parent = fresh_dir(scratch, &format!("dump-{db}"))?;
        let dir = parent.join("archive");
        let started = Instant::now();
        let mut dump = source_command(source, "pg_dump");
        dump.args(["-Fd", "-j2", "-d", db, "-f"]).arg(&dir);
        run(&mut dump)?;
        dump_s += secs(started);
        let started = Instant::now();
        let mut restore = dest.command("pg_restore");
        restore
            .args(["-j2", "--create", "--exit-on-error", "-d", "postgres"])
            .arg(&dir);
        run(&mut restore)?;
        restore_s += secs(started);
        let _ = std::fs::remove_dir_all(&parent);
    }
    Ok(vec![("dump".into(), dump_s), ("restore".into(), restore_s)])
}

/// `pgcopydb clone --table-jobs 2 --index-jobs 2` per database (into a database created first).
pub fn copy_pgcopydb(
    source: &Cluster,
    dest: &Cluster,
    dbs: &[String],
    scratch: &Path,
) -> Result<(), String> {
    for db in dbs {
        create_database(dest, db)?;
        let dir = fresh_dir(scratch, &format!("pgcopydb-{db}"))?;
        // pgcopydb is a client like pg_dump: run it as ourselves, with libpq's variables
        // removed like `pg_command` does, and the PostgreSQL programs of this run (PG_CONFIG).
        let mut clone = Command::new("pgcopydb");
        for var in [
            "PGHOST",
            "PGPORT",
            "PGUSER",
            "PGDATABASE",
            "PGOPTIONS",
            "PGSERVICE",
        ] {
            clone.env_remove(var);
        }
        clone
            .current_dir("/")
            .stdin(Stdio::null())
            .env("PG_CONFIG", bindir().join("pg_config"))
            .args(["clone", "--table-jobs", "2", "--index-jobs", "2"])
            .args([
                "--source",
                &tcp_uri(source_port(source), db),
                "--target",
                &tcp_uri(dest.port, db),
            ])
            .arg("--dir")
            .arg(&dir);
        run(&mut clone).map_err(|e| crate::bench::first_lines(&tail_lines(&e, 12), 12))?;
        let _ = std::fs::remove_dir_all(&dir);
    }
    Ok(())
}

/// A `postgres://` URI of `db` at `port` of 127.0.0.1 (pgcopydb takes URIs).
fn tcp_uri(port: u16, db: &str) -> String {
    format!("postgres://postgres@127.0.0.1:{port}/{db}")
}

fn tail_lines(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// The schema of each database as the native subscription needs it first:
/// `pg_dump --schema-only | psql` into a database created by the dump.
fn copy_schema(source: &Cluster, dest: &Cluster, db: &str) -> Result<(), String> {
    let mut dump = source_command(source, "pg_dump");
    dump.args(["--schema-only", "--create", "-d", db]);
    let mut psql = dest.command("psql");
    psql.args([
        "-X",
        "-q",
        "-v",
        "ON_ERROR_STOP=1",
        "-d",
        "postgres",
        "-o",
        "/dev/null",
    ]);
    pipe(dump, psql)
}

/// Native logical replication of `dbs`: schema first, then a publication `FOR ALL TABLES` and a
/// subscription per database; done when every `pg_subscription_rel.srsubstate = 'r'`.
pub fn stream_native(
    source: &Cluster,
    dest: &Cluster,
    dbs: &[String],
    timeout: Duration,
) -> Result<Phases, String> {
    let started = Instant::now();
    for db in dbs {
        copy_schema(source, dest, db)?;
    }
    let schema_s = secs(started);
    let started = Instant::now();
    for db in dbs {
        exec(source, db, "CREATE PUBLICATION bench_pub FOR ALL TABLES")?;
        exec(
            dest,
            db,
            &format!(
                "CREATE SUBSCRIPTION bench_sub_{db} CONNECTION '{}' PUBLICATION bench_pub",
                source_dsn(source, db)
            ),
        )?;
    }
    for db in dbs {
        let left = timeout.saturating_sub(started.elapsed());
        try_poll_every(
            dest,
            db,
            "SELECT count(*) > 0 AND bool_and(srsubstate = 'r') FROM pg_subscription_rel",
            "t",
            left,
            TIMING_POLL,
        )
        .map_err(|e| format!("{TIMEOUT_PREFIX} not all tables ready (last: {})", e.last))?;
    }
    Ok(vec![
        ("schema".into(), schema_s),
        ("sync".into(), secs(started)),
    ])
}

/// pglogical per database: a provider node with every table in a replication set (tables
/// without a replica identity index in `default_insert_only`, as pglogical requires), a
/// subscriber node and `create_subscription(synchronize_structure := true)`; done when the
/// subscription replicates and every table's sync status is `r`.
///
/// One database after the other: created back to back, the second database's manager worker
/// was only started by pglogical's supervisor on its next periodic pass, three minutes later
/// (seen with pglogical 2.4 here), which would time the supervisor's sleep, not the copy.
pub fn stream_pglogical(
    source: &Cluster,
    dest: &Cluster,
    dbs: &[String],
    timeout: Duration,
) -> Result<Phases, String> {
    let started = Instant::now();
    for db in dbs {
        exec(
            source,
            db,
            &format!(
                "CREATE EXTENSION IF NOT EXISTS pglogical;
                 SELECT pglogical.create_node(node_name := 'provider_{db}', dsn := '{}');
                 SELECT pglogical.replication_set_add_table(
                            CASE WHEN c.relreplident = 'd' AND EXISTS (SELECT FROM pg_index i
                                          WHERE i.indrelid = c.oid AND i.indisprimary)
                                 THEN 'default' ELSE 'default_insert_only' END,
                            c.oid::regclass, synchronize_data := true)
                   FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                  WHERE c.relkind = 'r'
                    AND n.nspname NOT IN ('pg_catalog', 'information_schema', 'pglogical', 'cloudmig')
                    AND n.nspname !~ '^pg_';",
                source_dsn(source, db)
            ),
        )?;
        create_database(dest, db)?;
        exec(
            dest,
            db,
            &format!(
                "CREATE EXTENSION pglogical;
                 SELECT pglogical.create_node(node_name := 'subscriber_{db}', dsn := '{}');
                 SELECT pglogical.create_subscription(
                            subscription_name := 'bench_{db}', provider_dsn := '{}',
                            replication_sets := ARRAY['default', 'default_insert_only', 'ddl_sql'],
                            synchronize_structure := true, synchronize_data := true,
                            forward_origins := '{{}}');",
                dest.socket_conninfo("postgres", db),
                source_dsn(source, db)
            ),
        )?;
        let left = timeout.saturating_sub(started.elapsed());
        try_poll_every(
            dest,
            db,
            &format!(
                "SELECT (SELECT status FROM pglogical.show_subscription_status('bench_{db}')) = 'replicating'
                        AND (SELECT bool_and(sync_status = 'r') FROM pglogical.local_sync_status)"
            ),
            "t",
            left,
            TIMING_POLL,
        )
        .map_err(|e| format!("{TIMEOUT_PREFIX} subscription not ready (last: {})", e.last))?;
    }
    Ok(vec![("structure+data".into(), secs(started))])
}

/// cloudmig's assessment of the source (not timed: it moves no data); its id.
pub fn assess_cloudmig(source: &Cluster, dest: &Cluster) -> Result<i64, String> {
    let mut client = dest.try_client("postgres").map_err(|e| describe(&e))?;
    let conninfo = source_dsn(source, "postgres");
    client
        .query_one("SELECT cloudmig.assess($1)", &[&conninfo])
        .map(|row| row.get(0))
        .map_err(|e| format!("assess: {}", describe(&e)))
}

/// cloudmig streaming `dbs` from `source`, as the apply, lag and switchover sections need it:
/// assessed, started, and waited for until `incremental`; returns the task id.
pub fn stream_cloudmig(
    source: &Cluster,
    dest: &Cluster,
    dbs: &[String],
    timeout: Duration,
    copy_workers: Option<u32>,
) -> Result<i64, String> {
    let assessment = assess_cloudmig(source, dest)?;
    start_cloudmig(dest, assessment, dbs, "incremental", timeout, copy_workers)
        .map(|(task, _)| task)
}

/// `cloudmig.start` of `assessment` limited to `dbs` (with `replica_identity_full`, which the
/// tables without a key need, and `copy_workers` when given); waits for `until` (`copy_complete` or `incremental`) and
/// returns the task id and the per-phase durations from `cloudmig.events`.
pub fn start_cloudmig(
    dest: &Cluster,
    assessment: i64,
    dbs: &[String],
    until: &str,
    timeout: Duration,
    copy_workers: Option<u32>,
) -> Result<(i64, Phases), String> {
    let mut client = dest.try_client("postgres").map_err(|e| describe(&e))?;
    let workers = copy_workers
        .map(|n| format!(", \"copy_workers\": {n}"))
        .unwrap_or_default();
    let options = format!(
        "{{\"databases\": [{}], \"replica_identity_full\": true{workers}}}",
        dbs.iter()
            .map(|db| format!("\"{db}\""))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let task: i64 = client
        .query_one(
            "SELECT cloudmig.start($1, $2::text::jsonb)",
            &[&assessment, &options],
        )
        .map_err(|e| format!("start: {}", describe(&e)))?
        .get(0);
    cloudmig_wait(dest, task, until, timeout)?;
    Ok((task, cloudmig_phases(dest, task)?))
}

/// Polls `cloudmig.tasks` until the task is at or past `phase` (in the order of the phases a
/// task goes through), `Err` with its last error if it fails, or on timeout.
pub fn cloudmig_wait(
    dest: &Cluster,
    task: i64,
    phase: &str,
    timeout: Duration,
) -> Result<String, String> {
    const ORDER: [&str; 9] = [
        "created",
        "roles",
        "schema",
        "full_copy",
        "post_data",
        "copy_complete",
        "catchup",
        "incremental",
        "completed",
    ];
    let rank = |p: &str| ORDER.iter().position(|o| *o == p);
    let target = rank(phase).ok_or_else(|| format!("unknown phase {phase}"))?;
    let deadline = Instant::now() + timeout;
    let mut client = dest.try_client("postgres").map_err(|e| describe(&e))?;
    loop {
        let row = client
            .query_one(
                "SELECT phase, coalesce(last_error, '') FROM cloudmig.tasks WHERE task_id = $1",
                &[&task],
            )
            .map_err(|e| describe(&e))?;
        let (now, error): (String, String) = (row.get(0), row.get(1));
        if matches!(now.as_str(), "failed" | "cancelled") {
            return Err(format!("task {task} {now}: {error}"));
        }
        if rank(&now).is_some_and(|r| r >= target) {
            return Ok(now);
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "{TIMEOUT_PREFIX} did not reach {phase} in {} s (phase {now}{})",
                timeout.as_secs(),
                if error.is_empty() {
                    String::new()
                } else {
                    format!(", last error: {error}")
                }
            ));
        }
        std::thread::sleep(TIMING_POLL);
    }
}

/// Durations of the phases of `task` up to `copy_complete`, from its `phase` events.
pub fn cloudmig_phases(dest: &Cluster, task: i64) -> Result<Phases, String> {
    let mut client = dest.try_client("postgres").map_err(|e| describe(&e))?;
    let rows = client
        .query(
            "SELECT split_part(message, ':', 1),
                    extract(epoch FROM lead(at) OVER (ORDER BY id) - at)::float8
               FROM cloudmig.events WHERE task_id = $1 AND kind = 'phase' ORDER BY id",
            &[&task],
        )
        .map_err(|e| describe(&e))?;
    let mut phases = Phases::new();
    for row in rows {
        let (phase, seconds): (String, Option<f64>) = (row.get(0), row.get(1));
        if phase == "copy_complete" {
            break;
        }
        // `created` lasts until the launcher starts the task's worker: part of the wall time,
        // not a phase of the copy.
        if let (Some(seconds), false) = (seconds, phase == "created") {
            phases.push((phase, seconds));
        }
    }
    Ok(phases)
}

/// Runs `sql` (a batch) in `db` of `cluster`; `Err` with the server's message.
pub fn exec(cluster: &Cluster, db: &str, sql: &str) -> Result<(), String> {
    let mut client = cluster.try_client(db).map_err(|e| describe(&e))?;
    client.batch_execute(sql).map_err(|e| {
        format!(
            "{} database {db}: {}",
            cluster.name,
            crate::bench::first_lines(&describe(&e), 3)
        )
    })
}

/// Puts the source back as before a measurement (the destination must be stopped already):
/// the read-only fence of a switchover lifted, publications and pglogical dropped, replication
/// slots dropped once their walsenders are gone.
pub fn reset_source(source: &Cluster, dbs: &[String]) {
    for db in dbs {
        source.execute(
            "postgres",
            &format!("ALTER DATABASE \"{db}\" RESET default_transaction_read_only"),
        );
    }
    // The fence ended their sessions; a new connection sees the reset.
    for db in dbs {
        source.execute(
            db,
            "DO $$ DECLARE p record; BEGIN
                 FOR p IN SELECT pubname FROM pg_publication LOOP
                     EXECUTE format('DROP PUBLICATION %I', p.pubname);
                 END LOOP;
             END $$;
             DROP EXTENSION IF EXISTS pglogical CASCADE;",
        );
    }
    // A stopped destination's walsenders see the connection close; end any that lingers.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let active: i64 = source.query_scalar(
            "postgres",
            "SELECT count(*) FROM pg_replication_slots WHERE active",
        );
        if active == 0 || Instant::now() >= deadline {
            break;
        }
        source.execute(
            "postgres",
            "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots WHERE active",
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    source.execute(
        "postgres",
        "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE NOT active",
    );
    source.execute(
        "postgres",
        "SELECT pg_replication_origin_drop(roname) FROM pg_replication_origin",
    );
}
