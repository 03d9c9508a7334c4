//! Handing jobs to database workers and collecting their results.
//!
//! The task worker is connected to the control database, but a table can only
//! be written by a backend connected to its own database. So per source
//! database it starts up to `copy_workers` *database workers* connected there,
//! and feeds them jobs through the shared-memory [`JOBS`] slots: it writes a
//! job and wakes the worker; the worker runs it, reports rows/bytes live, and
//! marks it done or failed and wakes the task worker back.

use super::shared::{self, JobKind, JobSlot, JobState, JOBS, MAX_JOB_SLOTS};
use super::txn::{self, Failure};
use pgrx::bgworkers::{
    BackgroundWorkerBuilder, BackgroundWorkerStatus, BgWorkerStartTime, DynamicBackgroundWorker,
};
use pgrx::prelude::*;
use std::collections::VecDeque;
use std::time::Duration;

/// One unit of work for a database worker.
#[derive(Debug, Clone, Default)]
pub struct Job {
    pub kind: JobKind,
    pub schema: String,
    pub table: String,
    pub snapshot: String,
    pub path: String,
    /// See `JobSlot::script`.
    pub script: String,
    pub truncate_first: bool,
    pub resuming: bool,
    pub checksums: bool,
    /// See `JobSlot::caller`.
    pub caller: pgrx::pg_sys::Oid,
}

/// What a finished job reports.
#[derive(Debug, Clone, Copy, Default)]
pub struct JobResult {
    pub rows: u64,
    pub bytes: u64,
}

/// Called when a job finished; returns the jobs it makes due (see
/// [`run_chained`]).
pub type FollowUps<'a> = dyn FnMut(&Job, JobResult) -> Result<Vec<Job>, Failure> + 'a;

/// Why a batch of jobs stopped early.
#[derive(Debug)]
pub enum Stop {
    Failed(Failure),
    /// SIGTERM: the worker must exit; the task resumes later.
    Shutdown,
    /// `cloudmig.cancel()`.
    Cancelled,
}

impl From<Failure> for Stop {
    fn from(failure: Failure) -> Self {
        Stop::Failed(failure)
    }
}

/// Runs `jobs` in database `database` on up to `workers` database workers,
/// in order of the queue. `on_assign` runs (in its own transaction) before a
/// job is handed out, `on_done` after it finished; `should_stop` is polled.
/// The jobs `on_done` returns go to the front of the queue,
/// so the worker that just finished a job takes the first of them in the
/// same pass: a table's indexes are built by the worker that copied it, right
/// after its rows, while the other workers go on copying (as `pg_restore -j`
/// schedules a table's indexes once its data is restored).
pub fn run_chained(
    task_id: i64,
    database: &str,
    jobs: Vec<Job>,
    workers: usize,
    should_stop: &dyn Fn() -> Option<Stop>,
    on_assign: &mut dyn FnMut(&Job) -> Result<(), Failure>,
    on_done: &mut FollowUps<'_>,
) -> Result<(), Stop> {
    let count = workers.clamp(1, MAX_JOB_SLOTS).min(jobs.len().max(1));
    {
        let mut slots = JOBS.exclusive();
        for slot in slots.iter_mut().take(count) {
            *slot = JobSlot::default();
            slot.task_id = task_id;
            slot.database.set(database);
        }
    }
    let mut handles = Vec::new();
    for index in 0..count {
        handles.push(start_database_worker(index, database)?);
    }
    let outcome = dispatch(count, jobs, &handles, should_stop, on_assign, on_done);
    {
        let mut slots = JOBS.exclusive();
        for slot in slots.iter_mut().take(count) {
            slot.state = JobState::Exit;
            shared::wake(slot.worker_pid);
        }
    }
    for handle in handles {
        // A worker in the middle of a job (cancel, shutdown) is told to stop.
        if outcome.is_err() {
            let _ = handle.terminate().wait_for_shutdown();
        } else {
            let _ = handle.wait_for_shutdown();
        }
    }
    let mut slots = JOBS.exclusive();
    for slot in slots.iter_mut().take(count) {
        *slot = JobSlot::default();
    }
    outcome
}

fn start_database_worker(index: usize, database: &str) -> Result<DynamicBackgroundWorker, Stop> {
    // SAFETY: MyProcPid is set at process start.
    let my_pid = unsafe { pg_sys::MyProcPid };
    BackgroundWorkerBuilder::new(&format!("cloudmig database worker {index} ({database})"))
        .set_type("cloudmig database worker")
        .set_library("cloudmig")
        .set_function("cloudmig_database_main")
        .set_argument(Some(pg_sys::Datum::from(index)))
        .enable_spi_access()
        .set_start_time(BgWorkerStartTime::RecoveryFinished)
        .set_restart_time(None)
        .set_notify_pid(my_pid)
        .load_dynamic()
        .map_err(|_| {
            Stop::Failed(Failure::with_hint(
                "no background worker slot is free for a cloudmig database worker",
                "raise max_worker_processes (restart) or lower the task's copy_workers",
            ))
        })
}

fn dispatch(
    count: usize,
    jobs: Vec<Job>,
    handles: &[DynamicBackgroundWorker],
    should_stop: &dyn Fn() -> Option<Stop>,
    on_assign: &mut dyn FnMut(&Job) -> Result<(), Failure>,
    on_done: &mut FollowUps<'_>,
) -> Result<(), Stop> {
    let mut queue: VecDeque<Job> = jobs.into();
    let mut running: Vec<Option<Job>> = vec![None; count];
    loop {
        if let Some(stop) = should_stop() {
            return Err(stop);
        }
        let states: Vec<(JobState, JobResult, String, bool)> = JOBS
            .share()
            .iter()
            .take(count)
            .map(|s| {
                (
                    s.state,
                    JobResult {
                        rows: s.rows,
                        bytes: s.bytes,
                    },
                    s.error.get(),
                    s.transient,
                )
            })
            .collect();
        for (index, (state, result, error, transient)) in states.into_iter().enumerate() {
            let free = match state {
                JobState::Done => {
                    if let Some(job) = running[index].take() {
                        let next = txn::run(|| on_done(&job, result))?;
                        for follow_up in next.into_iter().rev() {
                            queue.push_front(follow_up);
                        }
                    }
                    JOBS.exclusive()[index].state = JobState::Free;
                    true
                }
                JobState::Failed => {
                    let job = running[index].take().unwrap_or_default();
                    let mut failure = Failure::new(format!("{} failed: {error}", describe(&job)));
                    failure.transient = transient;
                    return Err(Stop::Failed(failure));
                }
                JobState::Free => true,
                _ => false,
            };
            // A slot whose job just finished gets the next one in the same
            // pass: the worker's wake-up was consumed by this pass, so
            // waiting for the next one would leave the slot idle a whole nap.
            if free && running[index].is_none() {
                if let Some(job) = queue.pop_front() {
                    assign_transaction(|| on_assign(&job))?;
                    let pid = {
                        let mut slots = JOBS.exclusive();
                        let slot = &mut slots[index];
                        slot.kind = job.kind;
                        slot.schema.set(&job.schema);
                        slot.table.set(&job.table);
                        slot.snapshot.set(&job.snapshot);
                        slot.path.set(&job.path);
                        slot.script.set(&job.script);
                        slot.truncate_first = job.truncate_first;
                        slot.resuming = job.resuming;
                        slot.checksums = job.checksums;
                        slot.caller = job.caller;
                        slot.rows = 0;
                        slot.bytes = 0;
                        slot.error.set("");
                        slot.state = JobState::Assigned;
                        slot.worker_pid
                    };
                    // A worker still starting up has no pid yet: it looks at
                    // its slot once it has recorded one.
                    shared::wake(pid);
                    running[index] = Some(job);
                }
            }
        }
        if queue.is_empty() && running.iter().all(Option::is_none) {
            return Ok(());
        }
        for (index, handle) in handles.iter().enumerate() {
            let stopped = matches!(
                handle.pid(),
                Err(BackgroundWorkerStatus::Stopped | BackgroundWorkerStatus::PostmasterDied)
            );
            if running[index].is_some() && stopped {
                let state = JOBS.share()[index].state;
                if !matches!(state, JobState::Done | JobState::Failed) {
                    return Err(Stop::Failed(Failure::new(
                        "a cloudmig database worker exited unexpectedly; see the server log",
                    )));
                }
            }
        }
        // Every finished job wakes this worker; the timeout only bounds how
        // late a crashed database worker or a cancel is noticed.
        txn::nap(Duration::from_millis(500));
    }
}

/// Runs what is recorded before a job is handed out (a table's `copying`
/// mark, when its indexes started) in a transaction that commits without
/// waiting for its WAL to reach disk: with many small tables the task
/// worker's synchronous flushes were what the copy waited for. Nothing that
/// matters can be lost. The job's own work commits later, synchronously, on
/// its database worker, and that flush covers all WAL written before it,
/// this commit's included: so if a crash loses this mark, the job had
/// committed nothing, and a table still `pending` on resume is empty here and
/// copied afresh. The marks after a job (`copied`, `indexed`) stay
/// synchronous: nothing would flush them before a crash, and a lost `copied`
/// mark would copy a table twice.
fn assign_transaction(body: impl FnOnce() -> Result<(), Failure>) -> Result<(), Failure> {
    txn::run(|| {
        pgrx::Spi::run("SET LOCAL synchronous_commit = off")
            .map_err(|e| Failure::new(e.to_string()))?;
        body()
    })
}

/// What a job does, for error messages.
fn describe(job: &Job) -> String {
    match job.kind {
        JobKind::CopyTable => format!("copying {}.{}", job.schema, job.table),
        JobKind::ApplyScript => "applying the schema".to_string(),
        JobKind::TableIndexes => format!(
            "building the indexes and constraints of {}.{}",
            job.schema, job.table
        ),
        JobKind::CopySequences => "copying sequences".to_string(),
        JobKind::CopyLargeObjects => "copying large objects".to_string(),
        JobKind::RefreshMaterializedViews => "refreshing materialized views".to_string(),
        JobKind::CountRows => "counting rows".to_string(),
        JobKind::ApplyObjects => {
            "setting sequences, large objects and materialized views".to_string()
        }
        JobKind::None => "a job".to_string(),
    }
}
