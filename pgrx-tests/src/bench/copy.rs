//! Section `copy`: a full copy of the source's databases by every tool into a fresh destination,
//! timed until the destination is usable (data, indexes, constraints), then checked.
//!
//! Figures per outcome: `seconds` (wall, from the first command to done), `mb_per_s` (the
//! source's `pg_database_size` over the wall), `phase_<name>` where the tool reports phases
//! (cloudmig from `cloudmig.events`, native: schema then sync, pg_dump -Fd: dump then restore);
//! over an emulated link `link_connections` and `link_exchanges` (requests the tool waited for,
//! each at least a round trip: [`crate::proxy::Proxy::exchanges`]).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use crate::bench::cpu;
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
    // CPU of each side's whole cluster (the tool's own client programs are not counted), and
    // for cloudmig the peak memory of its workers, sampled while they run.
    let cpu_before = (
        cpu::cluster_cpu_seconds(source),
        cpu::cluster_cpu_seconds(&dest),
    );
    let peak_rss = (tool == Tool::Cloudmig).then(|| RssSampler::start(&dest));
    // Over an emulated link, what crossed it: connections and exchanges (requests waited for).
    let link_before = bench.proxy.as_ref().map(|p| (p.accepted(), p.exchanges()));
    let started = Instant::now();
    let result: Result<Phases, String> = match (tool, assessment) {
        (Tool::Cloudmig, Some(assessment)) => tools::start_cloudmig(
            &dest,
            assessment,
            dbs,
            "copy_complete",
            timeout,
            bench.opts.copy_workers,
        )
        .map(|(_, phases)| phases),
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
    if let (Some(proxy), Some((accepted, exchanges))) = (bench.proxy.as_ref(), link_before) {
        outcome.set("link_connections", (proxy.accepted() - accepted) as f64);
        outcome.set("link_exchanges", (proxy.exchanges() - exchanges) as f64);
    }
    let gigabytes = bytes as f64 / 1e9;
    for (side, cluster, before) in [
        ("source", source, cpu_before.0),
        ("destination", &dest, cpu_before.1),
    ] {
        if let (Some(before), Some(after)) = (before, cpu::cluster_cpu_seconds(cluster)) {
            outcome.set(&format!("{side}_cpu_s"), after - before);
            if gigabytes > 0.0 {
                outcome.set(
                    &format!("{side}_cpu_s_per_gb"),
                    (after - before) / gigabytes,
                );
            }
        }
    }
    if let Some(peak) = peak_rss.and_then(RssSampler::finish) {
        outcome.set("worker_peak_rss_mb", peak / 1e6);
    }
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

/// The peak resident memory (`VmHWM`) of cloudmig's background workers on a destination,
/// sampled every 100 ms while a copy runs: a worker's high-water mark is only readable while
/// it lives.
struct RssSampler {
    stop: Arc<AtomicBool>,
    thread: thread::JoinHandle<Option<f64>>,
}

impl RssSampler {
    fn start(dest: &Cluster) -> RssSampler {
        let stop = Arc::new(AtomicBool::new(false));
        let mut client = dest.try_client("postgres").ok();
        let thread = {
            let stop = Arc::clone(&stop);
            thread::spawn(move || {
                let mut peak: Option<f64> = None;
                while !stop.load(Ordering::Relaxed) {
                    let pids: Vec<i32> = client
                        .as_mut()
                        .and_then(|c| {
                            c.query(
                                "SELECT pid FROM pg_stat_activity \
                                  WHERE backend_type LIKE 'cloudmig%'",
                                &[],
                            )
                            .ok()
                        })
                        .map(|rows| rows.iter().filter_map(|r| r.try_get(0).ok()).collect())
                        .unwrap_or_default();
                    for pid in pids {
                        if let Some(rss) = cpu::peak_rss_bytes(pid) {
                            peak = Some(peak.map_or(rss, |p: f64| p.max(rss)));
                        }
                    }
                    thread::sleep(Duration::from_millis(100));
                }
                peak
            })
        };
        RssSampler { stop, thread }
    }

    /// Stops sampling; the highest peak seen, if any worker was.
    fn finish(self) -> Option<f64> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().ok().flatten()
    }
}
