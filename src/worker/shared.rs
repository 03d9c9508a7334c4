//! Live state in shared memory.
//!
//! * which backend is running an assessment right now (so another session can
//!   see the destination as "assessing", and a second assessment is refused);
//! * the mailbox through which an inspection worker hands its findings back to
//!   the backend that started it;
//! * the launcher's pid (so `start()` can wake it);
//! * the running task: its worker's pid, and the job slots through which it
//!   hands work to the database workers connected to other databases, which
//!   report live progress back the same way.
//!
//! Durable state lives in the catalog tables; this is only what must be seen
//! across sessions before anything commits.

use pgrx::prelude::*;
use pgrx::{pg_shmem_init, PGRXSharedMemory, PgLwLock};

/// The backend currently running `cloudmig.assess()`, if any.
#[derive(Copy, Clone, Default)]
pub struct AssessmentActivity {
    /// Backend pid; 0 when no assessment runs.
    pub pid: i32,
    /// When it started (PostgreSQL `TimestampTz`).
    pub started_at: i64,
}
// SAFETY: plain old data, no pointers.
unsafe impl PGRXSharedMemory for AssessmentActivity {}

/// Size of the object list an inspection worker can hand back.
pub const INSPECTION_SAMPLE_BYTES: usize = 1024;

/// Where an inspection request stands.
#[derive(Copy, Clone, PartialEq, Eq, Debug)]
#[repr(u8)]
pub enum InspectionState {
    Idle = 0,
    Requested = 1,
    Done = 2,
}

/// The mailbox between the assessing backend and its inspection worker.
#[derive(Copy, Clone)]
pub struct InspectionMailbox {
    pub state: InspectionState,
    /// The database the worker must look into (`pg_database.oid`).
    pub database_oid: u32,
    /// Number of user objects it found.
    pub object_count: i64,
    /// The first few of them, as text, truncated to fit.
    pub sample_len: usize,
    pub sample: [u8; INSPECTION_SAMPLE_BYTES],
}
// SAFETY: plain old data, no pointers.
unsafe impl PGRXSharedMemory for InspectionMailbox {}

impl Default for InspectionMailbox {
    fn default() -> Self {
        Self {
            state: InspectionState::Idle,
            database_oid: 0,
            object_count: 0,
            sample_len: 0,
            sample: [0; INSPECTION_SAMPLE_BYTES],
        }
    }
}

impl InspectionMailbox {
    /// The sample list as text.
    pub fn sample_text(&self) -> String {
        let len = self.sample_len.min(INSPECTION_SAMPLE_BYTES);
        String::from_utf8_lossy(&self.sample[..len]).into_owned()
    }

    /// Stores `text`, cut at a character boundary to fit.
    pub fn set_sample(&mut self, text: &str) {
        let mut end = text.len().min(INSPECTION_SAMPLE_BYTES);
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        self.sample[..end].copy_from_slice(&text.as_bytes()[..end]);
        self.sample_len = end;
    }
}

/// Fixed-size text in shared memory (names, snapshot ids, messages).
#[derive(Copy, Clone)]
pub struct FixedText<const N: usize> {
    len: usize,
    bytes: [u8; N],
}
// SAFETY: plain old data, no pointers.
unsafe impl<const N: usize> PGRXSharedMemory for FixedText<N> {}

impl<const N: usize> Default for FixedText<N> {
    fn default() -> Self {
        Self {
            len: 0,
            bytes: [0; N],
        }
    }
}

impl<const N: usize> FixedText<N> {
    /// Stores `text`, cut at a character boundary to fit.
    pub fn set(&mut self, text: &str) {
        let mut end = text.len().min(N);
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        self.bytes[..end].copy_from_slice(&text.as_bytes()[..end]);
        self.len = end;
    }

    /// Stores `text` whole, or refuses (with the capacity) when it does not
    /// fit: for values that must never be cut, such as a connection string.
    pub fn set_whole(&mut self, text: &str) -> Result<(), usize> {
        if text.len() > N {
            return Err(N);
        }
        self.set(text);
        Ok(())
    }

    pub fn get(&self) -> String {
        String::from_utf8_lossy(&self.bytes[..self.len.min(N)]).into_owned()
    }
}

/// Longest source connection string (password included, in bytes) a task
/// can hand its workers through shared memory; `assess` and
/// `set_source_password` refuse longer ones instead of cutting them.
pub const CONNINFO_CAPACITY: usize = 2048;

/// The task being run, and who runs it.
#[derive(Copy, Clone, Default)]
pub struct TaskActivity {
    pub task_id: i64,
    /// Pid of the task worker; 0 when none runs.
    pub worker_pid: i32,
    /// The source conninfo, password included, for the database workers (they
    /// cannot read the control database's secrets table). Shared memory is
    /// not reachable from SQL. Set whole or not at all (`set_whole`): the API
    /// refuses longer connection strings ([`CONNINFO_CAPACITY`]).
    pub conninfo: FixedText<CONNINFO_CAPACITY>,
    /// `cloudmig.cancel()` asked this task to stop (shared memory, so the
    /// request is seen at once, without waiting for the caller to commit).
    pub cancel_task_id: i64,
    /// The switchover handshake between `cloudmig.switchover()` and the task worker.
    pub switchover: SwitchoverExchange,
    /// The same for `cloudmig.verify()`; the verdicts go to a file.
    pub verify: VerifyExchange,
}

/// A verification request and its outcome.
#[derive(Copy, Clone, Default)]
pub struct VerifyExchange {
    pub state: SwitchoverState,
    pub task_id: i64,
    pub checksums: bool,
    pub message: FixedText<1024>,
}

/// Where a switchover request stands.
#[derive(Copy, Clone, PartialEq, Eq, Debug, Default)]
#[repr(u8)]
pub enum SwitchoverState {
    #[default]
    Idle = 0,
    Requested = 1,
    Running = 2,
    Done = 3,
    Failed = 4,
}

/// A switchover request (written by the caller) and its outcome (by the worker).
#[derive(Copy, Clone, Default)]
pub struct SwitchoverExchange {
    pub state: SwitchoverState,
    pub task_id: i64,
    pub requester_pid: i32,
    pub max_lag_bytes: i64,
    pub timeout_ms: i64,
    pub terminate_sessions: bool,
    /// Compare row counts of every table once drained (checksums too when `checksums`).
    pub verify: bool,
    pub checksums: bool,
    /// Comma-separated user names whose sessions are not terminated.
    pub exempt_users: FixedText<512>,
    pub message: FixedText<1024>,
    pub hint: FixedText<256>,
    /// Milliseconds of: the whole downtime, fencing, draining, sequences and
    /// large objects, cleanup.
    pub downtime_ms: i64,
    pub fence_ms: i64,
    pub drain_ms: i64,
    pub objects_ms: i64,
    pub cleanup_ms: i64,
    /// The pass before the fence, and the large objects created, removed or
    /// changed by it and inside the window (with the bytes moved there).
    pub before_fence_ms: i64,
    pub large_objects_before: i64,
    pub large_objects_window: i64,
    pub large_object_bytes_window: i64,
    /// Materialized views copied again inside the window.
    pub views_window: i64,
    /// The worker is in the pass before the fence (which the timeout does
    /// not bound: the source still takes writes).
    pub preparing: bool,
    /// The source's LSN at the fence (the last database's marker).
    pub final_lsn: u64,
}
// SAFETY: plain old data, no pointers.
unsafe impl PGRXSharedMemory for TaskActivity {}

/// How many database workers can run at once (the copy parallelism cap).
pub const MAX_JOB_SLOTS: usize = 16;

/// Where a job slot stands. The task worker moves it Free -> Assigned and
/// (Done | Failed) -> Free or Exit; the database worker Assigned -> Running
/// -> (Done | Failed).
#[derive(Copy, Clone, PartialEq, Eq, Debug, Default)]
#[repr(u8)]
pub enum JobState {
    #[default]
    Free = 0,
    Assigned = 1,
    Running = 2,
    Done = 3,
    Failed = 4,
    /// The worker should exit.
    Exit = 5,
}

/// What a database worker is asked to do in its database.
#[derive(Copy, Clone, PartialEq, Eq, Debug, Default)]
#[repr(u8)]
pub enum JobKind {
    #[default]
    None = 0,
    /// Run the SQL script in `path` (pg_dump pre-data or post-data output).
    ApplyScript = 1,
    /// Copy table `schema`.`table` from the source at `snapshot` (the
    /// columns listed in `path`), then, in the same transaction, run the
    /// script in `script` if any: a small table's own indexes and
    /// constraints.
    CopyTable = 2,
    /// Set every sequence to its value at `snapshot`.
    CopySequences = 3,
    /// Copy every large object at `snapshot`.
    CopyLargeObjects = 4,
    /// Give every materialized view here the source's contents at
    /// `snapshot` (or as the source is now, without one); see `copy::matview`.
    CopyMaterializedViews = 5,
    /// Count (and with `checksums`, checksum) the rows of the tables listed
    /// in `path`, writing the results beside it (`.out`).
    CountRows = 6,
    /// Set sequences, recreate large objects and refresh materialized views
    /// from what the task worker read on the source (the JSON lines of `path`).
    ApplyObjects = 7,
    /// Run the script in `path`: the indexes and constraints of the table
    /// `schema`.`table` alone (see `script::split_post_data`), as an
    /// ApplyScript job does.
    TableIndexes = 8,
}

/// One database worker's mailbox.
#[derive(Copy, Clone, Default)]
pub struct JobSlot {
    pub state: JobState,
    pub kind: JobKind,
    pub worker_pid: i32,
    pub task_id: i64,
    pub database: FixedText<64>,
    pub schema: FixedText<64>,
    pub table: FixedText<64>,
    pub snapshot: FixedText<64>,
    pub path: FixedText<512>,
    /// CopyTable: the table's own index script, run in the copy's
    /// transaction (empty: none, or built by a TableIndexes job later).
    pub script: FixedText<512>,
    /// Empty the table before copying (an interrupted earlier copy, an
    /// extension's defaults).
    pub truncate_first: bool,
    /// The task resumed: a script may have been applied by the attempt that
    /// died before recording it.
    pub resuming: bool,
    /// CountRows: also compute an order-independent checksum.
    pub checksums: bool,
    /// ApplyScript, CopyMaterializedViews, ApplyObjects: the role that started the
    /// task (`cloudmig.task.started_by`), on whose behalf nothing may run
    /// as a superuser unless it is one.
    pub caller: pg_sys::Oid,
    /// Live progress of the current job.
    pub rows: u64,
    pub bytes: u64,
    /// Why the job failed.
    pub error: FixedText<1024>,
    /// It failed because the source went away (worth a retry).
    pub transient: bool,
}
// SAFETY: plain old data, no pointers.
unsafe impl PGRXSharedMemory for JobSlot {}

pub static ASSESSMENT: PgLwLock<AssessmentActivity> =
    unsafe { PgLwLock::new(c"cloudmig_assessment") };
pub static INSPECTION: PgLwLock<InspectionMailbox> =
    unsafe { PgLwLock::new(c"cloudmig_inspection") };

/// Where one database's apply stands; written by its apply worker (and
/// the source's WAL position by the task worker), read by the views.
#[derive(Copy, Clone, Default)]
pub struct ApplySlot {
    pub task_id: i64,
    pub database: FixedText<64>,
    pub worker_pid: i32,
    /// Where streaming starts (the slot's consistent point the first time).
    pub start_lsn: u64,
    /// End of the WAL the source has sent us (keepalives included).
    pub received_lsn: u64,
    /// End LSN of the last transaction committed here.
    pub applied_lsn: u64,
    /// What we reported to the source as durably flushed here.
    pub flushed_lsn: u64,
    /// Source commit time of the last applied transaction (TimestampTz).
    pub last_commit_time: i64,
    /// Local time of the last message from the source (TimestampTz).
    pub last_message_at: i64,
    /// Transactions applied since the worker started.
    pub transactions: u64,
    /// True while nothing received is left to apply.
    pub caught_up: bool,
    /// The source's current WAL insert position, polled by the task worker.
    pub source_lsn: u64,
    /// The switchover's marker LSN in this database, once seen applied.
    pub fence_seen_lsn: u64,
    /// End LSN of the last source transaction with changes committed here
    /// (the switchover checks that none came after its marker).
    pub last_transaction_lsn: u64,
    /// Why the apply stopped (relation, key, remote LSN, xid in the message).
    pub error: FixedText<1024>,
    pub error_hint: FixedText<512>,
    /// Commit LSN of the source transaction the error happened in (0: none).
    pub error_lsn: u64,
    /// The outage the apply rides out (0 attempts: none): retries so far,
    /// why, and the milliseconds left of its window. The task worker writes
    /// them to the catalog.
    pub outage_attempts: u32,
    pub outage_cause: FixedText<512>,
    pub outage_ms_left: i64,
    /// The source transaction (commit LSN) to skip (`cloudmig.skip`), set by
    /// the task worker before the apply starts; 0: none.
    pub skip_lsn: u64,
    /// Set by the apply once that transaction was skipped and the origin
    /// moved past it.
    pub skipped_lsn: u64,
    /// The apply waits for a local table to fit what the source sent (DDL
    /// on the source); see `worker::shape_pause`.
    pub paused: bool,
    /// Bumped at each new pause, so the task worker reports each one once.
    pub pause_count: u32,
    /// The relation, "schema.table".
    pub pause_relation: FixedText<128>,
    /// What differs.
    pub pause_difference: FixedText<1024>,
    /// What to do: the DDL that makes the local table fit.
    pub pause_hint: FixedText<4096>,
    /// Source LSN of the transaction that waits (its commit).
    pub pause_lsn: u64,
}
// SAFETY: plain old data, no pointers.
unsafe impl PGRXSharedMemory for ApplySlot {}

/// Pid of the launcher worker (0 while it is not running).
pub static LAUNCHER_PID: PgLwLock<i32> = unsafe { PgLwLock::new(c"cloudmig_launcher") };
pub static TASK: PgLwLock<TaskActivity> = unsafe { PgLwLock::new(c"cloudmig_task") };
pub static JOBS: PgLwLock<[JobSlot; MAX_JOB_SLOTS]> = unsafe { PgLwLock::new(c"cloudmig_jobs") };
/// One apply slot per source database of the running task.
pub static APPLY: PgLwLock<[ApplySlot; MAX_JOB_SLOTS]> =
    unsafe { PgLwLock::new(c"cloudmig_apply") };

/// Requests the shared memory; called from `_PG_init`.
pub fn init() {
    pg_shmem_init!(ASSESSMENT);
    pg_shmem_init!(INSPECTION);
    pg_shmem_init!(LAUNCHER_PID);
    pg_shmem_init!(TASK);
    pg_shmem_init!(JOBS = [JobSlot::default(); MAX_JOB_SLOTS]);
    pg_shmem_init!(APPLY = [ApplySlot::default(); MAX_JOB_SLOTS]);
}

/// Wakes process `pid` (a background worker) by setting its latch, the way
/// PostgreSQL's own procsignal machinery does: SIGUSR1 sets the latch of a
/// background worker.
pub fn wake(pid: i32) {
    if pid > 0 {
        // SAFETY: signalling a pid of our own instance; a stale pid at worst
        // gets a harmless SIGUSR1 or ESRCH.
        unsafe { libc::kill(pid, libc::SIGUSR1) };
    }
}

/// Wakes the launcher, e.g. after a task was created or cancelled.
pub fn wake_launcher() {
    wake(*LAUNCHER_PID.share());
}

/// The pid of the running task worker of `task_id`, if one is alive.
pub fn task_worker_pid(task_id: i64) -> Option<i32> {
    let task = TASK.share();
    (task.task_id == task_id && process_alive(task.worker_pid)).then_some(task.worker_pid)
}

/// True when `pid` is a live process of this instance (backends and workers).
pub fn process_alive(pid: i32) -> bool {
    // SAFETY: kill with signal 0 only checks for existence.
    pid > 0 && unsafe { libc::kill(pid, 0) } == 0
}

/// True when `pid` is a live backend of this instance. A backend that died
/// without clearing its claim (FATAL, crash) must not block others forever.
fn backend_alive(pid: i32) -> bool {
    // SAFETY: BackendPidGetProc only reads the proc array under its own lock.
    pid != 0 && unsafe { !pg_sys::BackendPidGetProc(pid).is_null() }
}

/// This backend's claim on "the" running assessment; released on drop, which
/// also runs when the assessment is cancelled or fails (the error unwinds).
pub struct AssessmentClaim(());

impl AssessmentClaim {
    /// Claims the assessment slot, or returns the pid of the live backend that
    /// holds it.
    pub fn acquire() -> Result<Self, i32> {
        let mut activity = ASSESSMENT.exclusive();
        if activity.pid != 0 && activity.pid != my_pid() && backend_alive(activity.pid) {
            return Err(activity.pid);
        }
        activity.pid = my_pid();
        // SAFETY: reads the statement start time of this backend.
        activity.started_at = unsafe { pg_sys::GetCurrentTimestamp() };
        Ok(Self(()))
    }
}

impl Drop for AssessmentClaim {
    fn drop(&mut self) {
        let mut activity = ASSESSMENT.exclusive();
        if activity.pid == my_pid() {
            *activity = AssessmentActivity::default();
        }
    }
}

/// The running assessment, if one runs in a live backend.
pub fn current_assessment() -> Option<AssessmentActivity> {
    let activity = *ASSESSMENT.share();
    backend_alive(activity.pid).then_some(activity)
}

fn my_pid() -> i32 {
    // SAFETY: MyProcPid is set once at backend start.
    unsafe { pg_sys::MyProcPid }
}

/// The task whose cancellation is requested, if any.
pub fn cancel_requested() -> Option<i64> {
    let task = TASK.share();
    (task.cancel_task_id != 0).then_some(task.cancel_task_id)
}
