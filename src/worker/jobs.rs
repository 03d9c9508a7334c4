//! Handing jobs to database workers and collecting their results.
//!
//! The task worker is connected to the control database, but a table can only
//! be written by a backend connected to its own database. So it runs up to
//! `copy_workers` *database workers*, each connected to the database of the
//! jobs it is given, and feeds them jobs through the shared-memory [`JOBS`]
//! slots: it writes a job and wakes the worker; the worker runs it, reports
//! rows/bytes live, and marks it done or failed and wakes the task worker
//! back. One queue may hold the jobs of several databases: a slot whose
//! database has nothing left to do has its worker replaced by one connected
//! to the database of the next job (see [`pick`]).

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
    /// The database it runs in (empty: the one `Runner::run_chained_jobs` was given).
    pub database: String,
    /// The size of its table when planned, to weigh moving a worker to
    /// another database for it (see [`pick`]); 0 for other jobs.
    pub bytes: i64,
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
/// [`run_queue`]).
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

/// Runs `jobs` (each in the database it names) on up to `workers` database
/// workers in all, in order of the queue. `on_assign` runs (in its own
/// transaction) before a job is handed out, `on_done` after it finished;
/// `should_stop` is polled. The jobs `on_done` returns go to the front of the
/// queue, so the worker that just finished a job takes the first of them in
/// the same pass: a table's indexes are built by the worker that copied it,
/// right after its rows, while the other workers go on copying (as
/// `pg_restore -j` schedules a table's indexes once its data is restored). A
/// worker freed by one database's last jobs goes on with another's instead
/// of waiting for that database's tail. `on_database_done` runs (outside any
/// transaction) once a database has no job queued or running left,
/// follow-ups included.
pub fn run_queue(
    task_id: i64,
    jobs: Vec<Job>,
    workers: usize,
    should_stop: &dyn Fn() -> Option<Stop>,
    on_assign: &mut dyn FnMut(&Job) -> Result<(), Failure>,
    on_done: &mut FollowUps<'_>,
    on_database_done: &mut dyn FnMut(&str) -> Result<(), Stop>,
) -> Result<(), Stop> {
    let count = workers.clamp(1, MAX_JOB_SLOTS).min(jobs.len().max(1));
    {
        let mut slots = JOBS.exclusive();
        for slot in slots.iter_mut().take(count) {
            *slot = JobSlot::default();
        }
    }
    let mut handles: Vec<Option<DynamicBackgroundWorker>> = (0..count).map(|_| None).collect();
    let outcome = dispatch(
        task_id,
        count,
        jobs,
        &mut handles,
        should_stop,
        on_assign,
        on_done,
        on_database_done,
    );
    for (index, handle) in handles.into_iter().enumerate() {
        if let Some(handle) = handle {
            // A worker in the middle of a job (cancel, shutdown) is told to stop.
            stop_worker(index, handle, outcome.is_err());
        }
    }
    let mut slots = JOBS.exclusive();
    for slot in slots.iter_mut().take(count) {
        *slot = JobSlot::default();
    }
    outcome
}

/// Tells the worker of slot `index` to exit and waits until it did
/// (terminated at once if `terminate`: it may be in the middle of a job).
fn stop_worker(index: usize, handle: DynamicBackgroundWorker, terminate: bool) {
    {
        let mut slots = JOBS.exclusive();
        slots[index].state = JobState::Exit;
        shared::wake(slots[index].worker_pid);
    }
    if terminate {
        let _ = handle.terminate().wait_for_shutdown();
    } else {
        let _ = handle.wait_for_shutdown();
    }
}

/// A table at least this large (when planned) is worth moving a worker to
/// another database for while the worker's own database still has jobs
/// queued: its copy takes seconds, against the few milliseconds of a worker
/// started and a source session opened there. Smaller ones wait for a
/// worker of their database, so many small tables of several databases do
/// not have workers restarted between each.
const MOVE_FOR_BYTES: i64 = 16 << 20;

/// Which queued job (its position) a free slot takes, the slot connected to
/// `bound` (None: no worker yet), `served` the databases of all slots'
/// workers. The queue is in order (largest tables first); a worker stays
/// with its database while that has jobs queued, except to give a large
/// table at the head of the queue a worker when no worker is connected to
/// its database; with nothing of its own database left it takes the head.
fn pick(queue: &VecDeque<Job>, bound: Option<&str>, served: &[Option<String>]) -> Option<usize> {
    let head = queue.front()?;
    let Some(bound) = bound else {
        return Some(0);
    };
    if head.database == bound {
        return Some(0);
    }
    let Some(own) = queue.iter().position(|job| job.database == bound) else {
        return Some(0);
    };
    let unserved = !served
        .iter()
        .any(|database| database.as_deref() == Some(head.database.as_str()));
    if unserved && head.bytes >= MOVE_FOR_BYTES && head.bytes > queue[own].bytes {
        Some(0)
    } else {
        Some(own)
    }
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

#[allow(clippy::too_many_arguments)]
fn dispatch(
    task_id: i64,
    count: usize,
    jobs: Vec<Job>,
    handles: &mut [Option<DynamicBackgroundWorker>],
    should_stop: &dyn Fn() -> Option<Stop>,
    on_assign: &mut dyn FnMut(&Job) -> Result<(), Failure>,
    on_done: &mut FollowUps<'_>,
    on_database_done: &mut dyn FnMut(&str) -> Result<(), Stop>,
) -> Result<(), Stop> {
    let mut queue: VecDeque<Job> = jobs.into();
    let mut running: Vec<Option<Job>> = vec![None; count];
    // The database each slot's worker is connected to (None: no worker).
    let mut bound: Vec<Option<String>> = vec![None; count];
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
            let mut finished = None;
            let free = match state {
                JobState::Done => {
                    if let Some(job) = running[index].take() {
                        let next = txn::run(|| on_done(&job, result))?;
                        for follow_up in next.into_iter().rev() {
                            queue.push_front(follow_up);
                        }
                        finished = Some(job.database);
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
            if let Some(database) = finished {
                let left = queue.iter().chain(running.iter().flatten());
                if !left.into_iter().any(|job| job.database == database) {
                    on_database_done(&database)?;
                }
            }
            // A slot whose job just finished gets the next one in the same
            // pass: the worker's wake-up was consumed by this pass, so
            // waiting for the next one would leave the slot idle a whole nap.
            if !free || running[index].is_some() {
                continue;
            }
            let Some(job) =
                pick(&queue, bound[index].as_deref(), &bound).and_then(|at| queue.remove(at))
            else {
                continue;
            };
            if bound[index].as_deref() != Some(job.database.as_str()) {
                // Connected elsewhere (or not yet): a worker of the job's
                // database takes the slot.
                if let Some(handle) = handles[index].take() {
                    stop_worker(index, handle, false);
                }
                bound[index] = None;
                {
                    let mut slots = JOBS.exclusive();
                    slots[index] = JobSlot::default();
                    slots[index].task_id = task_id;
                    slots[index].database.set(&job.database);
                }
                handles[index] = Some(start_database_worker(index, &job.database)?);
                bound[index] = Some(job.database.clone());
            }
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
        if queue.is_empty() && running.iter().all(Option::is_none) {
            return Ok(());
        }
        for (index, handle) in handles.iter().enumerate() {
            let Some(handle) = handle else {
                continue;
            };
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
        JobKind::CopyMaterializedViews => "copying the materialized views' rows".to_string(),
        JobKind::CountRows => "counting rows".to_string(),
        JobKind::ApplyObjects => {
            "setting sequences, large objects and materialized views".to_string()
        }
        JobKind::None => "a job".to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(database: &str, bytes: i64) -> Job {
        Job {
            kind: JobKind::CopyTable,
            database: database.to_string(),
            bytes,
            ..Job::default()
        }
    }

    fn served(databases: &[&str]) -> Vec<Option<String>> {
        databases.iter().map(|d| Some(d.to_string())).collect()
    }

    #[test]
    fn a_slot_without_a_worker_takes_the_head() {
        let queue: VecDeque<Job> = vec![job("a", 100), job("b", 50)].into();
        assert_eq!(pick(&queue, None, &[None, None]), Some(0));
        assert_eq!(pick(&VecDeque::new(), None, &[None]), None);
    }

    #[test]
    fn a_worker_stays_with_its_database_while_it_has_jobs() {
        let queue: VecDeque<Job> = vec![job("a", 100), job("b", 50), job("a", 10)].into();
        assert_eq!(pick(&queue, Some("a"), &served(&["a", "b"])), Some(0));
        // Small tables of another database: no worker restarted for them.
        let queue: VecDeque<Job> = vec![job("b", 1000), job("a", 10)].into();
        assert_eq!(pick(&queue, Some("a"), &served(&["a"])), Some(1));
    }

    #[test]
    fn a_worker_moves_when_its_database_has_nothing_left() {
        let queue: VecDeque<Job> = vec![job("b", 10), job("c", 5)].into();
        assert_eq!(pick(&queue, Some("a"), &served(&["a", "b"])), Some(0));
    }

    #[test]
    fn a_large_table_no_worker_would_take_gets_one() {
        let large = MOVE_FOR_BYTES * 4;
        let queue: VecDeque<Job> = vec![job("b", large), job("a", 10)].into();
        assert_eq!(pick(&queue, Some("a"), &served(&["a", "a"])), Some(0));
        // A worker of its database takes it when free.
        assert_eq!(pick(&queue, Some("a"), &served(&["a", "b"])), Some(1));
    }
}
