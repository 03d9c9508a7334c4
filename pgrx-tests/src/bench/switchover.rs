//! Section `switchover`: `cloudmig.switchover(task)` while pgbench writes at a fixed rate, on a
//! fresh destination per repetition. cloudmig reports the downtime (from the fence of the
//! source to the destination being ready) and its steps; the wall time of the call, the lag
//! when it was called, and a check of the data after it are recorded beside them.

use std::process::Stdio;
use std::thread;
use std::time::{Duration, Instant};

use crate::bench::data::BENCH_DB;
use crate::bench::tools::{self, is_timeout, secs};
use crate::bench::{guarded, verify, Bench, Outcome, Section, Status, Tool};
use crate::cluster::describe;

/// Runs the section: one switchover per repetition.
pub fn run(bench: &mut Bench) {
    println!(
        "\n== switchover: cloudmig under pgbench -c2 -j2 -R {} (after {} s of load) ==",
        bench.opts.switchover_rate, bench.opts.switchover_warmup_seconds
    );
    let dbs = [BENCH_DB.to_owned()];
    if bench.opts.chosen(&[Tool::Cloudmig]).is_empty() {
        return;
    }
    for rep in 1..=bench.opts.reps {
        let mut outcome = Outcome::new(Section::Switchover, Tool::Cloudmig, rep, 1);
        guarded(&mut outcome, |outcome| switch_over(bench, outcome));
        tools::reset_source(&bench.source, &dbs);
        bench.record(outcome);
    }
}

fn switch_over(bench: &Bench, outcome: &mut Outcome) -> Status {
    let source = &bench.source;
    let opts = &bench.opts;
    let dbs = [BENCH_DB.to_owned()];
    let dest = tools::destination(Tool::Cloudmig, "bench-switchover");
    let task =
        match tools::stream_cloudmig(source, &dest, &dbs, opts.setup_timeout, opts.copy_workers) {
            Ok(task) => task,
            Err(e) if is_timeout(&e) => return Status::Unfinished(format!("set-up: {e}")),
            Err(e) => return Status::Failed(format!("set-up: {e}")),
        };
    // The load runs until the fence ends its sessions (or is stopped below if the switchover
    // fails); its duration only bounds it.
    let budget = opts.switchover_warmup_seconds + 120;
    let mut pgbench = source.command("pgbench");
    pgbench
        .args([
            "-n",
            "-c2",
            "-j2",
            "-R",
            &opts.switchover_rate.to_string(),
            "-T",
            &budget.to_string(),
            BENCH_DB,
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let mut load = match pgbench.spawn() {
        Ok(child) => child,
        Err(e) => return Status::Failed(format!("pgbench: {e}")),
    };
    thread::sleep(Duration::from_secs(opts.switchover_warmup_seconds.into()));
    let mut client = dest.client("postgres");
    if let Ok(row) = client.query_one(
        "SELECT coalesce(lag_bytes, 0)::float8 FROM cloudmig.tasks WHERE task_id = $1",
        &[&task],
    ) {
        outcome.set("lag_bytes_at_call", row.get(0));
    }
    let started = Instant::now();
    // Bounded like the drain of the apply section; every other option at its default.
    let options = format!(
        "{{\"timeout_seconds\": {}}}",
        opts.drain_timeout.as_secs().max(1)
    );
    let result = client.query_one(
        "SELECT downtime_ms::float8, fence_ms::float8, drain_ms::float8, sequences_ms::float8, \
                cleanup_ms::float8, before_fence_ms::float8 \
           FROM cloudmig.switchover($1, $2::text::jsonb)",
        &[&task, &options],
    );
    outcome.set("call_seconds", secs(started));
    // Our own child: stopped by its pid if the fence did not end it.
    let _ = load.kill();
    let _ = load.wait();
    let row = match result {
        Ok(row) => row,
        Err(e) => return Status::Failed(format!("switchover: {}", describe(&e))),
    };
    for (i, name) in [
        "downtime_ms",
        "fence_ms",
        "drain_ms",
        "sequences_ms",
        "cleanup_ms",
        "before_fence_ms",
    ]
    .into_iter()
    .enumerate()
    {
        outcome.set(name, row.get::<_, f64>(i));
    }
    // The source is fenced now: nothing moves, the destination must hold the same data. The
    // fence refuses connections until the DBA lets them in again.
    crate::migration::reopen_source(source);
    let expected = verify::contents(source, BENCH_DB);
    match verify::check(&expected, &dest, BENCH_DB) {
        Ok(()) => Status::Ok,
        Err(diff) => Status::Failed(format!("destination differs after switchover: {diff}")),
    }
}
