//! Section `copy`: a full copy of the source's databases by every tool into a fresh destination,
//! timed until the destination is usable (data, indexes, constraints), then checked.
//!
//! Figures per outcome: `seconds` (wall, from the first command to done), `mb_per_s` (the
//! source's `pg_database_size` over the wall), `phase_<name>` where the tool reports phases
//! (cloudmig from `cloudmig.events`, native: schema then sync, pg_dump -Fd: dump then restore).

use std::collections::BTreeMap;
use std::time::Instant;

use crate::bench::data::database_size;
use crate::bench::tools::{self, is_timeout, secs, Phases};
use crate::bench::verify::{self, Contents};
use crate::bench::{guarded, rotated, Bench, Outcome, Section, Status, Tool};
use crate::cluster::Cluster;
use crate::compare::sequence_values;

/// Runs the section: `reps` repetitions of every copier, in rotated order.
pub fn run(bench: &mut Bench) {
    let dbs = bench.databases.clone();
    let expected: BTreeMap<String, Contents> = dbs
        .iter()
        .map(|db| (db.clone(), verify::contents(&bench.source, db)))
        .collect();
    let bytes: i64 = dbs.iter().map(|db| database_size(&bench.source, db)).sum();
    let tables: usize = expected.values().map(|c| c.tables.len()).sum();
    println!(
        "\n== copy: {} ({tables} tables, {:.0} MB) ==",
        dbs.join(", "),
        bytes as f64 / 1e6
    );
    for rep in 1..=bench.opts.reps {
        for (i, tool) in rotated(&bench.opts.chosen(&Tool::COPIERS), rep)
            .into_iter()
            .enumerate()
        {
            let mut outcome = Outcome::new(Section::Copy, tool, rep, i + 1);
            outcome.set("source_bytes", bytes as f64);
            guarded(&mut outcome, |outcome| {
                copy_once(bench, tool, &dbs, &expected, bytes, outcome)
            });
            tools::reset_source(&bench.source, &dbs);
            bench.record(outcome);
        }
    }
}

fn copy_once(
    bench: &Bench,
    tool: Tool,
    dbs: &[String],
    expected: &BTreeMap<String, Contents>,
    bytes: i64,
    outcome: &mut Outcome,
) -> Status {
    let source = &bench.source;
    let timeout = bench.opts.copy_timeout;
    let dest = tools::destination(tool, &format!("bench-copy-{}", tool.slug()));
    // cloudmig's assessment moves no data and is not part of the copy.
    let assessment = match tool {
        Tool::Cloudmig => match tools::assess_cloudmig(source, &dest) {
            Ok(id) => Some(id),
            Err(e) => return Status::Failed(e),
        },
        _ => None,
    };
    let started = Instant::now();
    let result: Result<Phases, String> = match (tool, assessment) {
        (Tool::Cloudmig, Some(assessment)) => {
            tools::start_cloudmig(&dest, assessment, dbs, "copy_complete", timeout)
                .map(|(_, phases)| phases)
        }
        (Tool::PgDumpPipe, _) => tools::copy_pg_dump_pipe(source, &dest, dbs).map(|()| vec![]),
        (Tool::PgDumpParallel, _) => {
            tools::copy_pg_dump_parallel(source, &dest, dbs, &bench.scratch)
        }
        (Tool::Pgcopydb, _) => {
            tools::copy_pgcopydb(source, &dest, dbs, &bench.scratch).map(|()| vec![])
        }
        (Tool::Native, _) => tools::stream_native(source, &dest, dbs, timeout),
        (Tool::Pglogical, _) => tools::stream_pglogical(source, &dest, dbs, timeout),
        (Tool::Cloudmig, None) => unreachable!("cloudmig was assessed above"),
        (Tool::Decoding, _) => Err(format!("{tool} does not copy")),
    };
    let wall = secs(started);
    let phases = match result {
        Ok(phases) => phases,
        Err(e) if is_timeout(&e) => {
            return Status::Unfinished(format!("did not finish in {} s: {e}", timeout.as_secs()))
        }
        Err(e) => return Status::Failed(e),
    };
    outcome.set("seconds", wall);
    outcome.set("mb_per_s", bytes as f64 / 1e6 / wall);
    for (phase, seconds) in phases {
        outcome.set(&format!("phase_{phase}"), seconds);
    }
    if let Err(diff) = verify::check_all(expected, &dest) {
        return Status::Failed(format!("destination differs from the source: {diff}"));
    }
    note_sequences(source, &dest, dbs, outcome);
    Status::Ok
}

/// Notes databases whose sequences are not at the source's values (logical replication does not
/// carry them): not a failure of the copy, but a step left to do before switching over.
fn note_sequences(source: &Cluster, dest: &Cluster, dbs: &[String], outcome: &mut Outcome) {
    for db in dbs {
        let (on_source, on_dest) = (sequence_values(source, db), sequence_values(dest, db));
        let differing = on_source
            .iter()
            .filter(|(name, value)| on_dest.get(*name) != Some(value))
            .count();
        if differing > 0 {
            outcome.notes.push(format!(
                "{db}: {differing} of {} sequences not at the source's value",
                on_source.len()
            ));
        }
    }
}
