//! Sections `apply` and `lag`, on one streaming set-up per applier and repetition.
//!
//! ```text
//! fresh destination ─> initial copy (not timed) ─> caught up (marker seen)
//!   ─> apply: LOCK pgbench's tables on the destination; pgbench -c4 -j2 -T n on the source;
//!             bump the marker, note the end LSN; release ─> time until the marker shows on the
//!             destination (and until the applier's position passes the end LSN) ─> check data
//!   ─> lag:   pgbench -R rate, heartbeat every 100 ms; each second: bytes (source WAL position
//!             minus the slot's confirmed_flush_lsn) and seconds (age of the heartbeat seen on
//!             the destination)
//! ```
//!
//! The marker is the uniform "done": every applier applies in the source's commit order, so the
//! marker's value on the destination means every earlier transaction is applied and visible.
//! The position each applier reports (the slot's `confirmed_flush_lsn` for native and pglogical,
//! `cloudmig.apply_progress.applied_lsn` for cloudmig) is recorded beside it, not used for the
//! figure: how soon it passes the end LSN differs by what each one reports.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use postgres::Client;

use crate::bench::cpu::{self, Meter};
use crate::bench::data::{BENCH_DB, PGBENCH_TABLES};
use crate::bench::stats::percentile;
use crate::bench::tools::{self, is_timeout, secs, TIMING_POLL};
use crate::bench::{first_lines, rotated, verify, Bench, Outcome, Section, Status, Tool};
use crate::cluster::{describe, Cluster};
use crate::pgbin::run as run_program;
use crate::poll::try_poll_every;

/// How long the applier's reported position may trail the marker before the drain stops
/// waiting for it.
const POSITION_GRACE: Duration = Duration::from_secs(5);

/// Runs the sections `apply` and/or `lag` (whichever are enabled): per repetition, every applier
/// in rotated order.
pub fn run(bench: &mut Bench) {
    let (drain, lag) = (
        bench.opts.runs(Section::Apply),
        bench.opts.runs(Section::Lag),
    );
    println!(
        "\n== {}: database {BENCH_DB}, backlog pgbench -c4 -j2 -T {}, lag at -R {} for {} s ==",
        match (drain, lag) {
            (true, true) => "apply and lag",
            (true, false) => "apply",
            _ => "lag",
        },
        bench.opts.backlog_seconds,
        bench.opts.rate,
        bench.opts.lag_seconds
    );
    // A warm-up load: after the source's initial checkpoint the first writes to each page carry
    // a full-page image, which only the first applier's backlog would otherwise hold.
    if let Err(e) = backlog_load(&bench.source, bench.opts.backlog_seconds) {
        println!("  warm-up pgbench failed: {}", first_lines(&e, 2));
    }
    for rep in 1..=bench.opts.reps {
        for (i, tool) in rotated(&bench.opts.chosen(&Tool::APPLIERS), rep)
            .into_iter()
            .enumerate()
        {
            let mut drained = Outcome::new(Section::Apply, tool, rep, i + 1);
            let mut lagged = Outcome::new(Section::Lag, tool, rep, i + 1);
            lagged.status = Status::Failed("not run".into());
            let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                measure(bench, tool, &mut drained, &mut lagged)
            }));
            if let Err(panic) = result {
                let message = panic_text(panic);
                let failed = Status::Failed(first_lines(&message, 6));
                if drained.status == Status::Ok {
                    drained.status = failed.clone();
                }
                lagged.status = failed;
            }
            tools::reset_source(&bench.source, &[BENCH_DB.to_owned()]);
            if drain {
                bench.record(drained);
            }
            if lag {
                bench.record(lagged);
            }
        }
        if drain {
            let order = bench.opts.chosen(&Tool::APPLIERS).len() + 1;
            let mut decoded = Outcome::new(Section::Apply, Tool::Decoding, rep, order);
            let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                decoding_alone(bench, &mut decoded)
            }));
            decoded.status = match result {
                Ok(status) => status,
                Err(panic) => Status::Failed(first_lines(&panic_text(panic), 6)),
            };
            tools::reset_source(&bench.source, &[BENCH_DB.to_owned()]);
            bench.record(decoded);
        }
    }
}

fn panic_text(panic: Box<dyn std::any::Any + Send>) -> String {
    panic
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_owned()))
        .unwrap_or_else(|| "panicked".to_owned())
}

/// The walsender of the set-up's slot on the source (every applier has one slot on `bench`).
const WALSENDER_PIDS: &str = "SELECT active_pid FROM pg_replication_slots \
     WHERE database = 'bench' AND slot_type = 'logical' AND active_pid IS NOT NULL";
/// The applying processes on the destination, by the backend type each tool's worker has.
const APPLIER_PIDS: &str = "SELECT pid FROM pg_stat_activity WHERE datname = 'bench' \
     AND (backend_type IN ('cloudmig apply', 'logical replication worker') \
          OR backend_type LIKE 'pglogical apply%')";

/// CPU of the walsender and the applier over a drain, per transaction of the backlog.
fn record_cpu(outcome: &mut Outcome, side: &str, meter: &mut Meter, transactions: u64) {
    if meter.is_empty() || transactions == 0 {
        return;
    }
    let used = meter.used();
    outcome.set(&format!("{side}_cpu_s"), used);
    outcome.set(
        &format!("{side}_us_per_txn"),
        used * 1e6 / transactions as f64,
    );
}

/// The backlog every applier drains: pgbench's default load on `bench` for `seconds`, four
/// clients on two threads; returns how many transactions it committed.
fn backlog_load(source: &Cluster, seconds: u32) -> Result<u64, String> {
    let mut pgbench = source.command("pgbench");
    pgbench.args(["-n", "-c4", "-j2", "-T", &seconds.to_string(), BENCH_DB]);
    let out = run_program(&mut pgbench).map_err(|e| format!("pgbench: {e}"))?;
    processed(&String::from_utf8_lossy(&out.stdout))
        .ok_or_else(|| "pgbench printed no transaction count".to_string())
}

/// The ceiling of every applier: the source's walsender decoding a backlog of the same load
/// with pgoutput for `pg_recvlogical`, which writes it to /dev/null. The walsender's CPU per
/// transaction here is what decoding costs without any applier behind it.
fn decoding_alone(bench: &Bench, outcome: &mut Outcome) -> Status {
    let source = &bench.source;
    let opts = &bench.opts;
    // Two statements, two transactions: a slot cannot be made in one that wrote.
    source.execute(BENCH_DB, "CREATE PUBLICATION bench_decode FOR ALL TABLES");
    source.execute(
        BENCH_DB,
        "SELECT pg_create_logical_replication_slot('bench_decode', 'pgoutput')",
    );
    let transactions = match backlog_load(source, opts.backlog_seconds) {
        Ok(n) => n,
        Err(e) => return Status::Failed(e),
    };
    let mut on_source = source.client(BENCH_DB);
    let end_lsn = lsn_now(&mut on_source);
    // A change after the end: pg_recvlogical stops at the first message at or past --endpos.
    if let Err(e) = bump_marker(&mut on_source) {
        return Status::Failed(e);
    }
    outcome.set("transactions", transactions as f64);
    let mut recv = source.command("pg_recvlogical");
    // Over TCP at the tools' port of the source, so that it crosses the same link they do.
    let port = crate::bench::tools::source_port(source).to_string();
    recv.args(["-h", "127.0.0.1", "-p", &port, "-U", "postgres"]);
    recv.args([
        "-d",
        BENCH_DB,
        "-S",
        "bench_decode",
        "--start",
        "-E",
        &end_lsn,
        "-o",
        "proto_version=1",
        "-o",
        "publication_names=bench_decode",
        "-f",
        "/dev/null",
    ])
    .stdout(std::process::Stdio::null())
    .stderr(std::process::Stdio::piped());
    let started = Instant::now();
    let mut child = match recv.spawn() {
        Ok(child) => child,
        Err(e) => return Status::Failed(format!("pg_recvlogical: {e}")),
    };
    let mut meter = Meter::default();
    let exit = loop {
        if meter.is_empty() {
            meter = Meter::start(&cpu::pids(source, "postgres", WALSENDER_PIDS));
        } else {
            meter.sample();
        }
        match child.try_wait() {
            Ok(Some(exit)) => break Ok(exit),
            Ok(None) if started.elapsed() > opts.drain_timeout => {
                let _ = child.kill();
                let _ = child.wait();
                break Err(Status::Unfinished(format!(
                    "pg_recvlogical did not reach the end LSN in {} s",
                    opts.drain_timeout.as_secs()
                )));
            }
            Ok(None) => thread::sleep(Duration::from_millis(20)),
            Err(e) => break Err(Status::Failed(format!("pg_recvlogical: {e}"))),
        }
    };
    let seconds = secs(started);
    let exit = match exit {
        Ok(exit) => exit,
        Err(status) => return status,
    };
    if !exit.success() {
        let mut text = String::new();
        if let Some(mut stderr) = child.stderr.take() {
            let _ = std::io::Read::read_to_string(&mut stderr, &mut text);
        }
        return Status::Failed(format!("pg_recvlogical: {exit}: {}", first_lines(&text, 3)));
    }
    outcome.set("seconds", seconds);
    outcome.set("txn_per_s", transactions as f64 / seconds);
    record_cpu(outcome, "walsender", &mut meter, transactions);
    Status::Ok
}

fn measure(bench: &Bench, tool: Tool, drained: &mut Outcome, lagged: &mut Outcome) {
    let source = &bench.source;
    let opts = &bench.opts;
    let dbs = [BENCH_DB.to_owned()];
    let dest = tools::destination(tool, &format!("bench-apply-{}", tool.slug()));
    let setup = match tool {
        Tool::Native => tools::stream_native(source, &dest, &dbs, opts.setup_timeout).map(|_| ()),
        Tool::Pglogical => {
            tools::stream_pglogical(source, &dest, &dbs, opts.setup_timeout).map(|_| ())
        }
        Tool::Cloudmig => {
            tools::stream_cloudmig(source, &dest, &dbs, opts.setup_timeout, opts.copy_workers)
                .map(|_| ())
        }
        _ => Err(format!("{tool} is not an applier")),
    }
    .and_then(|()| catch_up(source, &dest, opts.setup_timeout));
    if let Err(e) = setup {
        let status = if is_timeout(&e) {
            Status::Unfinished(format!("set-up: {e}"))
        } else {
            Status::Failed(format!("set-up: {e}"))
        };
        drained.status = status.clone();
        lagged.status = status;
        return;
    }
    if opts.runs(Section::Apply) {
        drained.status = drain(bench, tool, &dest, drained);
        if drained.status != Status::Ok {
            lagged.status = Status::Unfinished("skipped: the backlog was not drained".into());
            return;
        }
    }
    if opts.runs(Section::Lag) {
        lagged.status = lag(bench, tool, &dest, lagged);
    }
}

/// Bumps the marker on the source; its new value.
fn bump_marker(client: &mut Client) -> Result<i64, String> {
    client
        .query_one(
            "UPDATE bench_marker SET n = n + 1 WHERE id = 1 RETURNING n",
            &[],
        )
        .map(|row| row.get(0))
        .map_err(|e| describe(&e))
}

/// Waits until the destination has applied everything the source committed so far.
fn catch_up(source: &Cluster, dest: &Cluster, timeout: Duration) -> Result<(), String> {
    let mut client = source.try_client(BENCH_DB).map_err(|e| describe(&e))?;
    let n = bump_marker(&mut client)?;
    try_poll_every(
        dest,
        BENCH_DB,
        "SELECT n FROM bench_marker",
        &n.to_string(),
        timeout,
        TIMING_POLL,
    )
    .map(|_| ())
    .map_err(|e| {
        format!(
            "{} not caught up (marker {})",
            tools::TIMEOUT_PREFIX,
            e.last
        )
    })
}

/// The backlog drain; fills `outcome` and says how it ended.
fn drain(bench: &Bench, tool: Tool, dest: &Cluster, outcome: &mut Outcome) -> Status {
    let source = &bench.source;
    let opts = &bench.opts;
    let history = |cluster: &Cluster| -> i64 {
        cluster.query_scalar(BENCH_DB, "SELECT count(*) FROM pgbench_history")
    };
    let before = history(dest);
    let mut on_source = source.client(BENCH_DB);
    let start_lsn: String = lsn_now(&mut on_source);

    let mut locker = dest.client(BENCH_DB);
    if let Err(e) = locker.batch_execute(&format!(
        "BEGIN; LOCK TABLE {PGBENCH_TABLES} IN ACCESS EXCLUSIVE MODE"
    )) {
        return Status::Failed(format!("lock on the destination: {}", describe(&e)));
    }
    // CPU from before the load to the end of the drain: a walsender decodes the backlog as it
    // is written until the blocked applier stops reading, the rest once the lock is released.
    let mut walsender = Meter::start(&cpu::pids(source, "postgres", WALSENDER_PIDS));
    let mut applier = Meter::start(&cpu::pids(dest, "postgres", APPLIER_PIDS));
    let transactions = match backlog_load(source, opts.backlog_seconds) {
        Ok(n) => n,
        Err(e) => return Status::Failed(e),
    };
    let marker = match bump_marker(&mut on_source) {
        Ok(n) => n,
        Err(e) => return Status::Failed(e),
    };
    let end_lsn = lsn_now(&mut on_source);
    let backlog_bytes: f64 = source.query_scalar(
        "postgres",
        &format!("SELECT pg_wal_lsn_diff('{end_lsn}', '{start_lsn}')::float8"),
    );
    outcome.set("transactions", transactions as f64);
    outcome.set("backlog_bytes", backlog_bytes);

    let position_sql = match tool {
        Tool::Cloudmig => format!(
            "SELECT coalesce(bool_and(applied_lsn::pg_lsn >= '{end_lsn}'), false) \
               FROM cloudmig.apply_progress WHERE datname = '{BENCH_DB}'"
        ),
        _ => format!(
            "SELECT coalesce(bool_and(confirmed_flush_lsn >= '{end_lsn}'), false) \
               FROM pg_replication_slots WHERE database = '{BENCH_DB}' AND slot_type = 'logical' \
                AND NOT temporary"
        ),
    };
    let (mut marker_client, mut position_client) = (
        dest.client(BENCH_DB),
        match tool {
            Tool::Cloudmig => dest.client("postgres"),
            _ => source.client("postgres"),
        },
    );
    if let Err(e) = locker.batch_execute("ROLLBACK") {
        return Status::Failed(format!("releasing the lock: {}", describe(&e)));
    }
    let released = Instant::now();
    let (mut marker_at, mut position_at) = (None, None);
    while released.elapsed() < opts.drain_timeout {
        if marker_at.is_none() {
            let seen: i64 = marker_client
                .query_one("SELECT n FROM bench_marker", &[])
                .map(|row| row.get(0))
                .unwrap_or(0);
            if seen >= marker {
                marker_at = Some(secs(released));
                record_cpu(outcome, "walsender", &mut walsender, transactions);
                record_cpu(outcome, "applier", &mut applier, transactions);
            }
        }
        if position_at.is_none() {
            let passed: bool = position_client
                .query_one(position_sql.as_str(), &[])
                .map(|row| row.get(0))
                .unwrap_or(false);
            if passed {
                position_at = Some(secs(released));
            }
        }
        match (marker_at, position_at) {
            (Some(_), Some(_)) => break,
            (Some(at), None) if secs(released) > at + POSITION_GRACE.as_secs_f64() => break,
            _ => {
                walsender.sample();
                applier.sample();
                thread::sleep(TIMING_POLL / 2)
            }
        }
    }
    if let Some(at) = position_at {
        outcome.set("position_seconds", at);
    }
    let Some(seconds) = marker_at else {
        let drained = history(dest) - before;
        outcome.set("drained_transactions", drained as f64);
        outcome.set(
            "partial_txn_per_s",
            drained as f64 / opts.drain_timeout.as_secs_f64(),
        );
        let position = match position_at {
            Some(at) => format!(" (yet its position passed the end LSN after {at:.2} s)"),
            None => String::new(),
        };
        return Status::Unfinished(format!(
            "did not finish in {} s: drained {drained} of {transactions} txn ({:.0} txn/s){position}",
            opts.drain_timeout.as_secs(),
            drained as f64 / opts.drain_timeout.as_secs_f64()
        ));
    };
    outcome.set("seconds", seconds);
    outcome.set("txn_per_s", transactions as f64 / seconds);
    match position_at {
        Some(at) if at + 0.2 < seconds => outcome.notes.push(format!(
            "reported position passed the end LSN {:.2} s before the data was visible",
            seconds - at
        )),
        None => outcome.notes.push(format!(
            "reported position had not passed the end LSN {} s after the data was visible",
            POSITION_GRACE.as_secs()
        )),
        _ => {}
    }
    let applied = history(dest) - before;
    if applied != transactions as i64 {
        return Status::Failed(format!(
            "{applied} pgbench_history rows arrived for {transactions} transactions"
        ));
    }
    let expected = verify::contents(source, BENCH_DB);
    match verify::check(&expected, dest, BENCH_DB) {
        Ok(()) => Status::Ok,
        Err(diff) => Status::Failed(format!("destination differs after the drain: {diff}")),
    }
}

/// Lag under `pgbench -R`: fills `outcome` with p50/p99/max of bytes and seconds.
fn lag(bench: &Bench, tool: Tool, dest: &Cluster, outcome: &mut Outcome) -> Status {
    let source = &bench.source;
    let opts = &bench.opts;
    let stop = Arc::new(AtomicBool::new(false));
    let heartbeat = {
        let stop = Arc::clone(&stop);
        let mut client = source.client(BENCH_DB);
        thread::spawn(move || {
            let mut beats = 0u64;
            while !stop.load(Ordering::Relaxed) {
                if client
                    .batch_execute("UPDATE bench_heartbeat SET at = clock_timestamp() WHERE id = 1")
                    .is_err()
                {
                    break;
                }
                beats += 1;
                thread::sleep(Duration::from_millis(100));
            }
            beats
        })
    };
    let mut pgbench = source.command("pgbench");
    pgbench.args([
        "-n",
        "-c2",
        "-j2",
        "-R",
        &opts.rate.to_string(),
        "-T",
        &opts.lag_seconds.to_string(),
        BENCH_DB,
    ]);
    let load = thread::spawn(move || run_program(&mut pgbench));
    let mut on_source = source.client("postgres");
    let mut on_dest = dest.client(BENCH_DB);
    let (mut bytes, mut seconds) = (Vec::new(), Vec::new());
    let started = Instant::now();
    for second in 1..=opts.lag_seconds {
        let next = Duration::from_secs(second.into());
        thread::sleep(next.saturating_sub(started.elapsed()));
        if let Ok(row) = on_source.query_one(
            "SELECT coalesce(max(pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn)), 0)::float8 \
               FROM pg_replication_slots WHERE database = 'bench' AND slot_type = 'logical' AND NOT temporary",
            &[],
        ) {
            bytes.push(row.get::<_, f64>(0));
        }
        if let Ok(row) = on_dest.query_one(
            "SELECT extract(epoch FROM clock_timestamp() - at)::float8 FROM bench_heartbeat",
            &[],
        ) {
            seconds.push(row.get::<_, f64>(0));
        }
    }
    let load = load.join();
    stop.store(true, Ordering::Relaxed);
    let _ = heartbeat.join();
    match load {
        Ok(Ok(out)) => {
            let text = String::from_utf8_lossy(&out.stdout);
            if let Some(n) = processed(&text) {
                outcome.set("load_txn_per_s", n as f64 / f64::from(opts.lag_seconds));
            }
        }
        Ok(Err(e)) => return Status::Failed(format!("pgbench: {}", first_lines(&e, 3))),
        Err(_) => return Status::Failed("pgbench thread panicked".into()),
    }
    for (name, values) in [("bytes", &bytes), ("seconds", &seconds)] {
        for (p, label) in [(50.0, "p50"), (99.0, "p99"), (100.0, "max")] {
            if let Some(v) = percentile(values, p) {
                outcome.set(&format!("{name}_{label}"), v);
            }
        }
    }
    outcome.set("samples", bytes.len() as f64);
    // Once the load stops the applier must catch up; then the data must be equal.
    if let Err(e) = catch_up(source, dest, opts.drain_timeout) {
        return Status::Unfinished(format!(
            "lag sampled, but not caught up {} s after the load: {e}",
            opts.drain_timeout.as_secs()
        ));
    }
    let expected = verify::contents(source, BENCH_DB);
    match verify::check(&expected, dest, BENCH_DB) {
        Ok(()) => Status::Ok,
        Err(diff) => Status::Failed(format!(
            "{tool}: destination differs after the load: {diff}"
        )),
    }
}

/// The source's WAL insert position, as text.
fn lsn_now(client: &mut Client) -> String {
    client
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .map(|row| row.get(0))
        .unwrap_or_else(|e| panic!("pg_current_wal_lsn() on the source: {}", describe(&e)))
}

/// pgbench's "number of transactions actually processed: N" (N may be followed by "/M").
pub fn processed(output: &str) -> Option<u64> {
    output.lines().find_map(|line| {
        let rest = line.strip_prefix("number of transactions actually processed:")?;
        rest.trim().split('/').next()?.trim().parse().ok()
    })
}

#[cfg(test)]
mod tests {
    use super::processed;

    #[test]
    fn pgbench_transaction_counts() {
        let out = "transaction type: <builtin: TPC-B (sort of)>\n\
                   number of transactions actually processed: 31337\n\
                   latency average = 1.9 ms\n";
        assert_eq!(processed(out), Some(31337));
        assert_eq!(
            processed("number of transactions actually processed: 100/100\n"),
            Some(100)
        );
        assert_eq!(processed("nothing"), None);
    }
}
