//! The apply worker: one per source database, connected to that database
//! here. It streams the task's slot with pgoutput from where the local
//! replication origin says it stopped, and applies the changes transaction by
//! transaction, as PostgreSQL's own apply worker (worker.c) does:
//!
//! * `session_replication_role = replica` (user triggers and foreign keys do
//!   not fire twice), an empty `search_path`, asynchronous local commits;
//! * the replication origin advanced in the same local commit as the applied
//!   transaction, so a crash never applies a transaction twice or skips one;
//! * feedback reports as flushed only what is durably committed here (local
//!   commit LSNs mapped to the source's, checked against the local WAL flush
//!   position), and, when idle, the end of the source's WAL, so the slot
//!   releases WAL even for a database nobody writes to;
//! * a lost stream (network, source restart or failover, walsender killed)
//!   and a transient local error (deadlock, serialization failure, lock or
//!   statement timeout, full disk, out of memory) abort the local batch and
//!   stream again from the origin after a backoff, each such outage within
//!   `cloudmig.source_retry_timeout` of its own (see [`super::outage`]); the
//!   retries are in shared memory, where the task worker turns them into
//!   events;
//! * any other error stops this database's apply; its relation, key, the
//!   source transaction's commit LSN and what to do go to shared memory,
//!   where the task worker picks them up and fails the task;
//! * one source transaction, named by its commit LSN (`cloudmig.skip`), is
//!   skipped as worker.c's `maybe_start_skipping_changes` does: its changes
//!   are ignored, its commit advances the origin.
//! * unless the error comes from a local table that no longer fits what the
//!   source sent (DDL on the source): then the apply pauses and streams again
//!   from the origin once the table fits ([`super::shape_pause`]).

use super::outage::Outage;
use super::shape_pause;
use super::shared::{ApplySlot, APPLY, TASK};
use super::txn::{self, Failure};
use crate::apply::applier::{Applier, ApplyError};
use crate::apply::spi;
use crate::source::pgoutput::{Decoder, Message, Tuple, Value};
use crate::source::{
    ConnInfo, ConnectOptions, Connection, Lsn, PgOutputOptions, ReplicationMessage,
};
use pgrx::bgworkers::{BackgroundWorker, SignalWakeFlags};
use pgrx::pg_sys::panic::CaughtError;
use pgrx::pg_sys::PgTryBuilder;
use pgrx::prelude::*;
use std::collections::{HashMap, VecDeque};
use std::ffi::CString;
use std::panic::AssertUnwindSafe;
use std::time::{Duration, Instant};

/// How often feedback goes to the source at the least (wal_receiver_status_interval).
const STATUS_INTERVAL: Duration = Duration::from_secs(10);
/// Longest single wait for the next message, so signals are seen promptly.
const READ_WAIT: Duration = Duration::from_millis(500);
/// The prefix of cloudmig's own logical messages (the switchover marker).
pub const MESSAGE_PREFIX: &str = "cloudmig";

/// What one apply slot is told by the task worker before the worker starts.
#[derive(Clone)]
pub struct ApplyStart {
    pub slot_name: String,
    pub publication: String,
    pub origin_name: String,
    pub sync_file: String,
}

/// Starts the apply worker of slot `index` (the task worker fills the slot first).
pub fn start_worker(
    index: usize,
    database: &str,
) -> Result<pgrx::bgworkers::DynamicBackgroundWorker, Failure> {
    // SAFETY: MyProcPid is set at process start.
    let my_pid = unsafe { pg_sys::MyProcPid };
    pgrx::bgworkers::BackgroundWorkerBuilder::new(&format!("cloudmig apply ({database})"))
        .set_type("cloudmig apply")
        .set_library("cloudmig")
        .set_function("cloudmig_apply_main")
        .set_argument(Some(pg_sys::Datum::from(index)))
        .enable_spi_access()
        .set_start_time(pgrx::bgworkers::BgWorkerStartTime::RecoveryFinished)
        .set_restart_time(None)
        .set_notify_pid(my_pid)
        .load_dynamic()
        .map_err(|_| {
            Failure::with_hint(
                "no background worker slot is free for a cloudmig apply worker",
                "raise max_worker_processes (restart)",
            )
        })
}

/// Stops an apply worker and waits until it is gone. pgrx's SIGTERM handler
/// only sets a flag, which an apply waiting for a lock that a session here
/// holds would not look at until that session lets go; when the worker is
/// still there after [`STOP_GRACE`], a cancel (SIGINT, PostgreSQL's
/// StatementCancelHandler in a worker with a database connection) ends such
/// a wait, and the apply, finding the shutdown flag set, leaves. The batch it
/// was in rolls back; the origin did not move.
pub fn stop_worker(worker: pgrx::bgworkers::DynamicBackgroundWorker) {
    let pid = worker.pid().ok().filter(|pid| *pid > 0);
    let terminated = worker.terminate();
    if let Some(pid) = pid {
        let until = Instant::now() + STOP_GRACE;
        while Instant::now() < until && super::shared::process_alive(pid) {
            txn::nap(Duration::from_millis(50));
        }
        if super::shared::process_alive(pid) {
            // SAFETY: kill(2) on the pid of our own worker, which the
            // postmaster reported as running a moment ago.
            unsafe { libc::kill(pid, libc::SIGINT) };
        }
    }
    let _ = terminated.wait_for_shutdown();
}

/// How long [`stop_worker`] lets an apply worker leave by itself.
const STOP_GRACE: Duration = Duration::from_secs(2);

/// The names the task worker and the apply worker agree on.
pub fn origin_name(task_id: i64, ordinal: usize) -> String {
    format!("cloudmig_{task_id}_{ordinal}")
}

/// Reads "schema.table<TAB>lsn" lines (tables copied after a resume). The
/// task worker always writes the file: a missing or unreadable one is an
/// error, never "nothing to skip", which would apply copied changes twice.
fn read_sync_file(path: &str) -> Result<HashMap<String, Lsn>, Failure> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| Failure::new(format!("could not read the sync file {path}: {e}")))?;
    text.lines()
        .map(|line| {
            line.rsplit_once('\t')
                .and_then(|(table, lsn)| Some((table.to_string(), lsn.parse().ok()?)))
                .ok_or_else(|| {
                    Failure::new(format!("malformed line in the sync file {path}: {line:?}"))
                })
        })
        .collect()
}

fn now() -> i64 {
    // SAFETY: reads the clock.
    unsafe { pg_sys::GetCurrentTimestamp() }
}

fn update_slot(index: usize, change: impl FnOnce(&mut ApplySlot)) {
    let mut slots = APPLY.exclusive();
    if let Some(slot) = slots.get_mut(index) {
        change(slot);
    }
}

#[pg_guard]
#[no_mangle]
pub extern "C-unwind" fn cloudmig_apply_main(arg: pg_sys::Datum) {
    BackgroundWorker::attach_signal_handlers(SignalWakeFlags::SIGHUP | SignalWakeFlags::SIGTERM);
    let index = arg.value();
    let (task_id, database, start_lsn, skip_lsn) = match APPLY.share().get(index) {
        Some(slot) => (
            slot.task_id,
            slot.database.get(),
            slot.start_lsn,
            slot.skip_lsn,
        ),
        None => return,
    };
    txn::serve_task(task_id);
    BackgroundWorker::connect_worker_to_spi(Some(&database), None);
    // SAFETY: MyProcPid is set at process start.
    let my_pid = unsafe { pg_sys::MyProcPid };
    update_slot(index, |slot| {
        slot.worker_pid = my_pid;
        slot.error.set("");
        slot.error_hint.set("");
        slot.error_lsn = 0;
        slot.outage_attempts = 0;
    });
    let start = read_start_file(task_id, index);
    let from = Start {
        task_id,
        slot_start: Lsn(start_lsn),
        skip_lsn: Lsn(skip_lsn),
    };
    // A pause for DDL on the source waits here, then streams again from the
    // origin (see `shape_pause`).
    let outcome = loop {
        match run(index, &database, from, start.clone()) {
            Ok(Some(paused)) => match shape_pause::wait(index, &paused) {
                Ok(()) if !txn::shutdown_requested() => continue,
                other => break other,
            },
            Ok(None) => break Ok(()),
            Err(failure) => break Err(failure),
        }
    };
    if let Err(failure) = outcome {
        if !txn::shutdown_requested() {
            pgrx::log!("cloudmig: apply of {database} stopped: {failure}");
            update_slot(index, |slot| {
                slot.error.set(&failure.message);
                slot.error_hint.set(failure.hint.as_deref().unwrap_or(""));
                slot.error_lsn = failure.lsn.map_or(0, |lsn| lsn.0);
                slot.outage_attempts = 0;
            });
            super::shared::wake(TASK.share().worker_pid);
        }
    }
    update_slot(index, |slot| slot.worker_pid = 0);
}

/// The start parameters, written by the task worker beside the slot.
fn read_start_file(task_id: i64, index: usize) -> Option<ApplyStart> {
    let path = super::task::work_dir(task_id).join(format!("apply-{index}.conf"));
    let text = std::fs::read_to_string(path).ok()?;
    let mut lines = text.lines();
    Some(ApplyStart {
        slot_name: lines.next()?.to_string(),
        publication: lines.next()?.to_string(),
        origin_name: lines.next()?.to_string(),
        sync_file: lines.next().unwrap_or("").to_string(),
    })
}

/// Writes the start parameters of apply slot `index`.
pub fn write_start_file(task_id: i64, index: usize, start: &ApplyStart) -> std::io::Result<()> {
    let dir = super::task::work_dir(task_id);
    std::fs::create_dir_all(&dir)?;
    std::fs::write(
        dir.join(format!("apply-{index}.conf")),
        format!(
            "{}\n{}\n{}\n{}\n",
            start.slot_name, start.publication, start.origin_name, start.sync_file
        ),
    )
}

/// Sets up the replication origin for this session; returns where it stands.
fn setup_origin(name: &str) -> Result<Lsn, Failure> {
    let name = CString::new(name).unwrap_or_default();
    txn::run(|| {
        // SAFETY: origin functions in a transaction on the main thread, as
        // worker.c calls them.
        unsafe {
            let mut origin = pg_sys::replorigin_by_name(name.as_ptr(), true);
            if origin == pg_sys::InvalidRepOriginId as u16 {
                origin = pg_sys::replorigin_create(name.as_ptr());
            }
            // Streaming again after a pause: the session has it already.
            if pg_sys::replorigin_session_origin != origin {
                pg_sys::replorigin_session_setup(origin);
            }
            pg_sys::replorigin_session_origin = origin;
            Ok(Lsn(pg_sys::replorigin_session_get_progress(false)))
        }
    })
}

fn caught(error: CaughtError) -> Failure {
    let report = match &error {
        CaughtError::PostgresError(report) | CaughtError::ErrorReport(report) => report,
        CaughtError::RustPanic { ereport, .. } => ereport,
    };
    let mut failure = Failure::new(match report.detail() {
        Some(detail) => format!("{}: {}", report.message(), cap(detail, KEY_TEXT_LIMIT)),
        None => report.message().to_string(),
    });
    failure.hint = report.hint().map(str::to_string);
    failure.sqlstate = Some(report.sql_error_code());
    failure
}

/// The most characters of row data (a key, an error's detail) an error
/// message carries: enough to find the row, never a whole document.
const KEY_TEXT_LIMIT: usize = 200;

fn cap(text: &str, limit: usize) -> String {
    match text.char_indices().nth(limit) {
        Some((at, _)) => format!("{}...", &text[..at]),
        None => text.to_string(),
    }
}

/// The row a change names, as PostgreSQL shows a key: `(id)=(42)`, from the
/// replica identity columns (every column under REPLICA IDENTITY FULL).
fn key_of(applier: &Applier, message: &Message) -> Option<String> {
    let (relation, tuple): (u32, &Tuple) = match message {
        Message::Insert { relation, new, .. } => (*relation, new),
        Message::Update {
            relation,
            old,
            key,
            new,
            ..
        } => (*relation, key.as_ref().or(old.as_ref()).unwrap_or(new)),
        Message::Delete {
            relation, old, key, ..
        } => (*relation, key.as_ref().or(old.as_ref())?),
        _ => return None,
    };
    let columns = applier.columns(relation)?;
    let has_key = columns.iter().any(|c| c.is_key);
    let (names, values): (Vec<&str>, Vec<String>) = columns
        .iter()
        .zip(&tuple.0)
        .filter(|(column, _)| column.is_key || !has_key)
        .map(|(column, value)| {
            let shown = match value {
                Value::Null => "null".to_string(),
                Value::UnchangedToast => "(unchanged)".to_string(),
                Value::Text(bytes) => String::from_utf8_lossy(bytes).into_owned(),
                Value::Binary(_) => "(binary)".to_string(),
            };
            (column.name.as_str(), shown)
        })
        .unzip();
    Some(cap(
        &format!("({})=({})", names.join(", "), values.join(", ")),
        KEY_TEXT_LIMIT,
    ))
}

/// The source transaction being applied.
struct OpenTransaction {
    xid: u32,
    final_lsn: Lsn,
    /// `cloudmig.skip` named it: its changes are ignored.
    skipping: bool,
}

/// The local transaction: opened at the first Begin of a batch, committed
/// when the stream has nothing more at hand, or the batch is full or old.
/// During catch-up many small source transactions share one local commit;
/// the origin advances to the last one's end in that same commit, so a
/// crash replays the whole batch and nothing is applied twice or lost.
struct Batch {
    /// Source transactions whose Commit was applied into it.
    transactions: u64,
    /// Where the origin goes at the local commit.
    end_lsn: Lsn,
    commit_time: i64,
    started: Instant,
    /// The skipped source transaction whose commit this batch carries.
    skipped: Option<Lsn>,
}

/// The most source transactions one local commit carries.
const BATCH_TRANSACTIONS: u64 = 1000;
/// The longest a batch stays open: the most a steady stream of small
/// transactions (each arriving before the last is committed) adds to the
/// lag, while a backlog still shares each commit among hundreds of them.
const BATCH_AGE: Duration = Duration::from_millis(20);
/// How often, at most, feedback goes out when the flushed position moved
/// (as worker.c sends it whenever a position changed), so the slot's
/// confirmed position follows the apply closely.
const FEEDBACK_INTERVAL: Duration = Duration::from_millis(100);

/// The most messages handled between two looks at the flushed position, the
/// shared slot and the feedback while a stream keeps them coming (a batch's
/// commit, a pause or a keepalive looks at once).
const BOOKKEEPING_MESSAGES: u32 = 256;

/// Where the apply stands, between messages.
struct State {
    open: Option<OpenTransaction>,
    batch: Option<Batch>,
    /// (local commit end, remote end) of commits not yet known flushed here.
    pending: VecDeque<(u64, Lsn)>,
    applied: Lsn,
    /// The source transaction to skip (`cloudmig.skip`); INVALID: none.
    skip_lsn: Lsn,
}

impl State {
    /// Whether source transactions were applied but not committed here.
    fn batch_waiting(&self) -> bool {
        self.open.is_none() && self.batch.as_ref().is_some_and(|b| b.transactions > 0)
    }

    /// Commits the batch, advancing the origin in the same commit.
    fn commit_batch(&mut self, applier: &mut Applier, index: usize) {
        let Some(batch) = self.batch.take() else {
            return;
        };
        applier.end_transaction();
        // SAFETY: the origin's progress is set for this commit, as worker.c
        // does before CommitTransactionCommand.
        unsafe {
            pg_sys::replorigin_session_origin_lsn = batch.end_lsn.0;
            pg_sys::replorigin_session_origin_timestamp = batch.commit_time;
            pg_sys::CommitTransactionCommand();
            self.pending
                .push_back((pg_sys::XactLastCommitEnd, batch.end_lsn));
            // Table statistics (pg_stat_user_tables) of what was applied.
            pg_sys::pgstat_report_stat(false);
        }
        self.applied = self.applied.max(batch.end_lsn);
        if let Some(skipped) = batch.skipped {
            pgrx::log!("cloudmig: skipped the source transaction committing at {skipped}");
            self.skip_lsn = Lsn::INVALID;
        }
        update_slot(index, |slot| {
            slot.last_commit_time = batch.commit_time;
            slot.transactions += batch.transactions;
            slot.last_transaction_lsn = slot.last_transaction_lsn.max(batch.end_lsn.0);
            if let Some(skipped) = batch.skipped {
                slot.skipped_lsn = skipped.0;
            }
        });
    }

    /// Abandons the local transaction; the origin was not advanced, so the
    /// batch is streamed again next time.
    fn abort(&mut self, applier: &mut Applier) {
        if self.batch.take().is_some() {
            // SAFETY: the worker's own transaction.
            unsafe { pg_sys::AbortCurrentTransaction() };
            applier.forget_transaction();
        }
        self.open = None;
    }
}

/// What the task worker handed this apply worker in its slot.
#[derive(Clone, Copy)]
struct Start {
    task_id: i64,
    /// Where streaming starts when the origin has no progress yet.
    slot_start: Lsn,
    /// The source transaction to skip (`cloudmig.skip`), or INVALID.
    skip_lsn: Lsn,
}

/// Why one streaming session ended without an error that stops the apply.
enum Interruption {
    /// The stream was lost (network, source restart, walsender gone): it
    /// ends once messages flow again.
    Stream(Failure),
    /// A local error that goes away when tried again: the outage ends once
    /// a batch commits.
    Local(Failure),
}

/// The outage this apply rides out, and what ends it.
struct CurrentOutage {
    outage: Outage,
    /// Ended by a message from the source (stream) or a local commit (local).
    stream: bool,
}

fn clear_outage(index: usize, current: &mut Option<CurrentOutage>) {
    if current.take().is_some() {
        update_slot(index, |slot| slot.outage_attempts = 0);
    }
}

fn run(
    index: usize,
    database: &str,
    handed: Start,
    start: Option<ApplyStart>,
) -> Result<Option<shape_pause::Paused>, Failure> {
    let start = start.ok_or_else(|| Failure::new("apply worker started without its parameters"))?;
    let sync_lsns = read_sync_file(&start.sync_file)?;
    txn::run(|| {
        spi::connect().map_err(|e| Failure::new(e.to_string()))?;
        let result = spi::query(
            "SET session_replication_role = replica; SET search_path = ''; SET synchronous_commit = off",
        );
        spi::finish();
        result.map(|_| ()).map_err(|e| Failure::new(e.to_string()))
    })?;
    let origin_progress = setup_origin(&start.origin_name)?;
    let first = if origin_progress.0 != 0 {
        origin_progress
    } else {
        handed.slot_start
    };
    update_slot(index, |slot| {
        slot.applied_lsn = slot.applied_lsn.max(first.0);
        slot.received_lsn = slot.received_lsn.max(first.0);
    });
    let mut applier = Applier::new(sync_lsns);
    let mut state = State {
        open: None,
        batch: None,
        pending: VecDeque::new(),
        applied: first,
        skip_lsn: handed.skip_lsn,
    };
    let mut outage: Option<CurrentOutage> = None;
    loop {
        // Each session streams from what the origin says was committed here.
        let progress = txn::run(|| {
            // SAFETY: the session's origin was set up above.
            Ok(Lsn(unsafe {
                pg_sys::replorigin_session_get_progress(false)
            }))
        })?;
        let from = if progress.0 != 0 {
            progress
        } else {
            handed.slot_start
        };
        let interruption = match stream_session(
            index,
            database,
            &start,
            handed.task_id,
            from,
            &mut applier,
            &mut state,
            &mut outage,
        ) {
            Ok(()) => return Ok(None),
            Err(SessionEnd::Paused(paused)) => return Ok(Some(*paused)),
            Err(SessionEnd::Stop(failure)) => {
                state.abort(&mut applier);
                return Err(failure);
            }
            Err(SessionEnd::Retry(interruption)) => interruption,
        };
        state.abort(&mut applier);
        let (failure, stream) = match interruption {
            Interruption::Stream(failure) => (failure, true),
            Interruption::Local(failure) => (failure, false),
        };
        let current = outage.get_or_insert_with(|| CurrentOutage {
            outage: Outage::begin(),
            stream,
        });
        let Some(wait) = current.outage.next_attempt() else {
            let mut failure = failure;
            failure.message = format!("{} ({})", failure.message, current.outage.gave_up());
            return Err(failure);
        };
        let (attempts, left) = (
            current.outage.attempts,
            (current.outage.seconds_left() * 1000.0) as i64,
        );
        pgrx::log!(
            "cloudmig: apply of {database}: {failure}; retrying in {}s (attempt {attempts})",
            wait.as_secs()
        );
        update_slot(index, |slot| {
            slot.outage_attempts = attempts;
            slot.outage_cause.set(&failure.message);
            slot.outage_ms_left = left;
            slot.caught_up = false;
        });
        super::shared::wake(TASK.share().worker_pid);
        let until = Instant::now() + wait;
        while Instant::now() < until {
            if txn::shutdown_requested() {
                return Ok(None);
            }
            txn::nap(Duration::from_millis(200));
        }
    }
}

/// How a streaming session ended.
enum SessionEnd {
    Retry(Interruption),
    Stop(Failure),
    /// A local table no longer fits the source's (see `shape_pause`).
    Paused(Box<shape_pause::Paused>),
}

fn lost(context: &str, error: &crate::source::SourceError) -> SessionEnd {
    let failure = Failure::from_source(context, error);
    if failure.transient {
        SessionEnd::Retry(Interruption::Stream(failure))
    } else {
        SessionEnd::Stop(failure)
    }
}

/// Streams from `from` and applies until shutdown (Ok) or an interruption.
#[allow(clippy::too_many_arguments)]
fn stream_session(
    index: usize,
    database: &str,
    start: &ApplyStart,
    task_id: i64,
    from: Lsn,
    applier: &mut Applier,
    state: &mut State,
    outage: &mut Option<CurrentOutage>,
) -> Result<(), SessionEnd> {
    let info = ConnInfo::parse(&TASK.share().conninfo.get())
        .map_err(|e| {
            SessionEnd::Stop(Failure::new(format!(
                "invalid source connection string: {e}"
            )))
        })?
        .with_dbname(database);
    let mut options = ConnectOptions::new();
    options.replication = true;
    options.io_timeout = crate::guc::source_timeout();
    options.interrupt_check = Some(Box::new(txn::interrupt_check));
    let mut connection = Connection::connect(&info, options)
        .map_err(|e| lost("could not connect to the source", &e))?;
    let mut pgoutput = PgOutputOptions::new(&start.publication);
    pgoutput.proto_version = 2;
    pgoutput.messages = true;
    let mut stream = connection
        .start_pgoutput(&start.slot_name, from, &pgoutput)
        .map_err(|e| {
            let mut failure = Failure::from_source("could not start streaming", &e);
            // The slot still held by the walsender of an earlier session of ours (`55006`):
            // after a network that black-holed packets, the source notices that connection is
            // dead only at its wal_sender_timeout. Retried within the outage's window, as
            // PostgreSQL's own apply worker restarts until the slot is free.
            if matches!(&e, crate::source::SourceError::Server(s) if s.code == "55006") {
                failure.transient = true;
            }
            if failure.transient {
                SessionEnd::Retry(Interruption::Stream(failure))
            } else {
                SessionEnd::Stop(failure)
            }
        })?;

    // Relation messages come again on a new stream.
    let mut decoder = Decoder::new();
    let mut received = from;
    let mut flushed = from;
    let mut last_status = Instant::now() - STATUS_INTERVAL;
    let mut last_sent_flushed = flushed;
    // A source that sends nothing at all, not even the keepalive asked for
    // every second when idle, is unreachable (a black-holed network keeps
    // the TCP connection open): as walreceiver does with
    // wal_receiver_timeout, the session ends and is retried as an outage.
    // `heard` notes a message without reading the clock per message; the
    // time is taken when the stream pauses or the positions are looked at.
    let silence_limit = crate::guc::source_timeout();
    let mut last_heard = Instant::now();
    let mut heard = false;
    // Messages handled since the positions were last looked at, and whether they were
    // last reported idle (see the bookkeeping below).
    let mut unreported = 0u32;
    let mut reported_idle = false;

    loop {
        if txn::shutdown_requested() {
            state.abort(applier);
            // No CopyDone handshake: closing the connection ends the
            // walsender at once, which frees the slot for the switchover's
            // cleanup (the origin already records what was applied).
            connection.close();
            return Ok(());
        }
        let mut reply_requested = false;
        // With a batch waiting, only look at what is already at hand: when
        // nothing is, the batch commits now.
        let wait = if state.batch_waiting() {
            Duration::ZERO
        } else {
            READ_WAIT
        };
        let message = stream
            .next(wait)
            .map_err(|e| lost("replication stream", &e))?;
        let got_message = message.is_some();
        if got_message {
            heard = true;
        } else if std::mem::take(&mut heard) {
            last_heard = Instant::now();
        } else if last_heard.elapsed() >= silence_limit {
            connection.close();
            return Err(SessionEnd::Retry(Interruption::Stream(Failure {
                transient: true,
                ..Failure::new(format!(
                    "replication stream: the source sent nothing for {} s (cloudmig.source_timeout)",
                    silence_limit.as_secs()
                ))
            })));
        }
        let keepalive = matches!(message, Some(ReplicationMessage::Keepalive { .. }));
        if got_message && outage.as_ref().is_some_and(|o| o.stream) {
            clear_outage(index, outage);
        }
        match message {
            Some(ReplicationMessage::XLogData { wal_end, data, .. }) => {
                received = received.max(wal_end);
                let message = decoder.decode(&data).map_err(|e| {
                    SessionEnd::Stop(Failure::new(format!("undecodable change: {e}")))
                })?;
                let outcome =
                    PgTryBuilder::new(AssertUnwindSafe(|| handle(applier, state, &message, index)))
                        .catch_others(|error| Err(caught(error)))
                        .execute();
                if let Err(failure) = outcome {
                    let waiting_lsn = state.open.as_ref().map(|t| t.final_lsn);
                    let end = explain(failure, applier, state, &message, task_id);
                    if let SessionEnd::Stop(failure) = &end {
                        // A table that no longer fits the source's (DDL there)
                        // pauses instead; the batch goes first, the origin
                        // stays before the transaction that waits.
                        state.abort(applier);
                        if let Some(paused) =
                            shape_pause::after_failure(applier, &message, failure, waiting_lsn)
                        {
                            connection.close();
                            return Err(SessionEnd::Paused(Box::new(paused)));
                        }
                    }
                    return Err(end);
                }
            }
            Some(ReplicationMessage::Keepalive {
                wal_end,
                reply_requested: reply,
                ..
            }) => {
                received = received.max(wal_end);
                reply_requested = reply;
            }
            None => {}
        }
        // Only between source transactions (a batch waits) is the clock read, once per
        // transaction at most.
        let batch_due = |state: &State| {
            state.batch.as_ref().is_some_and(|batch| {
                batch.transactions >= BATCH_TRANSACTIONS || batch.started.elapsed() >= BATCH_AGE
            })
        };
        let mut committed = false;
        if state.batch_waiting() && (!got_message || batch_due(state)) {
            committed = true;
            let committed = PgTryBuilder::new(AssertUnwindSafe(|| {
                state.commit_batch(applier, index);
                Ok(())
            }))
            .catch_others(|error| Err(caught(error)))
            .execute();
            if let Err(failure) = committed {
                // A commit that fails (no disk for the WAL) aborts the batch;
                // the origin did not move, so it is streamed again.
                // SAFETY: the worker's own transaction, after its ERROR.
                unsafe { pg_sys::AbortCurrentTransaction() };
                applier.forget_transaction();
                return Err(if txn::local_error_is_transient(failure.sqlstate) {
                    SessionEnd::Retry(Interruption::Local(failure))
                } else {
                    SessionEnd::Stop(failure)
                });
            }
            if outage.as_ref().is_some_and(|o| !o.stream) {
                clear_outage(index, outage);
            }
        }
        // The positions, the shared slot and the feedback are looked at when something
        // changed for them: the stream paused, a batch committed, the server asked, or
        // enough messages went by (a long transaction); not after every change of a
        // backlog, where the shared-memory lock and clock reads would cost more per source
        // transaction than some of its changes.
        unreported += 1;
        if got_message
            && !committed
            && !reply_requested
            && !keepalive
            && !reported_idle
            && unreported < BOOKKEEPING_MESSAGES
        {
            continue;
        }
        unreported = 0;
        // What is durably committed here, in the source's terms (get_flush_position).
        // SAFETY: reads the local WAL flush position.
        let local_flushed = unsafe { pg_sys::GetFlushRecPtr(std::ptr::null_mut()) };
        while let Some((local_end, remote_end)) = state.pending.front().copied() {
            if local_end > local_flushed {
                break;
            }
            flushed = flushed.max(remote_end);
            state.pending.pop_front();
        }
        let idle = state.open.is_none() && state.batch.is_none() && state.pending.is_empty();
        if !got_message && state.batch.is_none() {
            // Quiet: statistics held back by pgstat's rate limit go out now.
            // SAFETY: outside a transaction, as worker.c calls it.
            unsafe { pg_sys::pgstat_report_stat(true) };
        }
        if idle {
            // Nothing of ours is in flight: everything received is done.
            flushed = flushed.max(received);
            state.applied = state.applied.max(received);
        }
        let applied = state.applied;
        reported_idle = idle;
        update_slot(index, |slot| {
            slot.received_lsn = slot.received_lsn.max(received.0);
            slot.applied_lsn = applied.0;
            slot.flushed_lsn = slot.flushed_lsn.max(flushed.0);
            slot.caught_up = idle;
            slot.last_message_at = now();
        });
        // When idle, ask for a keepalive every second: it carries the end of
        // the source's WAL, which is how an idle database shows no lag. Also
        // when the source has been quiet for half the silence limit (it may
        // be busy decoding a large transaction): its answer proves it is there.
        if std::mem::take(&mut heard) {
            last_heard = Instant::now();
        }
        let since_status = last_status.elapsed();
        let quiet = last_heard.elapsed() >= silence_limit / 2;
        let idle_poll = (idle || quiet) && since_status >= Duration::from_secs(1);
        let moved = flushed > last_sent_flushed && since_status >= FEEDBACK_INTERVAL;
        if reply_requested || moved || since_status >= STATUS_INTERVAL || idle_poll {
            last_sent_flushed = flushed;
            stream
                .send_status(received, flushed, applied, idle_poll)
                .map_err(|e| lost("could not send feedback", &e))?;
            last_status = Instant::now();
        }
    }
}

/// Turns an error applying `message` into a retry (transient local errors)
/// or an explained stop: the relation, the row's key, the source
/// transaction's commit LSN, and what to do.
fn explain(
    mut failure: Failure,
    applier: &Applier,
    state: &State,
    message: &Message,
    task_id: i64,
) -> SessionEnd {
    let relation = relation_of(message).and_then(|oid| applier.relation_name(oid));
    let key = key_of(applier, message);
    let transaction = state.open.as_ref().map(|t| (t.xid, t.final_lsn));
    let mut context = Vec::new();
    if let Some(relation) = &relation {
        context.push(format!("relation {relation}"));
    }
    if let Some(key) = &key {
        context.push(format!("key {key}"));
    }
    if let Some((xid, lsn)) = transaction {
        context.push(format!("source transaction {xid} committing at {lsn}"));
    }
    let context = if context.is_empty() {
        String::new()
    } else {
        format!(" ({})", context.join(", "))
    };
    failure.message = format!("applying a change failed: {}{context}", failure.message);
    if txn::local_error_is_transient(failure.sqlstate) {
        return SessionEnd::Retry(Interruption::Local(failure));
    }
    let fix = match transaction {
        Some((_, lsn)) => {
            failure.lsn = Some(lsn);
            format!(
                "then SELECT cloudmig.resume({task_id}); or, to leave out this one source \
                 transaction here (its changes will be missing), SELECT cloudmig.skip({task_id}, '{lsn}')"
            )
        }
        None => format!("then SELECT cloudmig.resume({task_id})"),
    };
    let cause = failure.hint.take().unwrap_or_else(|| {
        "fix the destination so the change applies (a conflicting row, an index or constraint \
         added here, a missing table or column)"
            .to_string()
    });
    failure.hint = Some(format!("{cause}; {fix}"));
    SessionEnd::Stop(failure)
}

fn relation_of(message: &Message) -> Option<u32> {
    match message {
        Message::Insert { relation, .. }
        | Message::Update { relation, .. }
        | Message::Delete { relation, .. } => Some(*relation),
        _ => None,
    }
}

fn apply_error(error: ApplyError) -> Failure {
    Failure::with_hint(error.to_string(), error.hint())
}

/// Applies one decoded message; opens local transactions (batches).
fn handle(
    applier: &mut Applier,
    state: &mut State,
    message: &Message,
    index: usize,
) -> Result<(), Failure> {
    match message {
        Message::Begin { final_lsn, xid, .. } => {
            if state.batch.is_none() {
                // SAFETY: a worker's own transaction boundary.
                unsafe {
                    pg_sys::SetCurrentStatementStartTimestamp();
                    pg_sys::StartTransactionCommand();
                }
                state.batch = Some(Batch {
                    transactions: 0,
                    end_lsn: *final_lsn,
                    commit_time: 0,
                    started: Instant::now(),
                    skipped: None,
                });
            }
            // As worker.c's maybe_start_skipping_changes: by exact commit LSN.
            let skipping = state.skip_lsn.is_valid() && state.skip_lsn == *final_lsn;
            if skipping {
                pgrx::log!(
                    "cloudmig: skipping the source transaction {xid} committing at {final_lsn}, \
                     as cloudmig.skip() asked"
                );
            }
            state.open = Some(OpenTransaction {
                xid: *xid,
                final_lsn: *final_lsn,
                skipping,
            });
        }
        Message::Commit {
            end_lsn,
            commit_time,
            ..
        } if state.open.is_some() => {
            let skipped = state
                .open
                .take()
                .filter(|t| t.skipping)
                .map(|t| t.final_lsn);
            if let Some(batch) = state.batch.as_mut() {
                batch.transactions += 1;
                batch.end_lsn = *end_lsn;
                batch.commit_time = *commit_time;
                batch.skipped = batch.skipped.or(skipped);
            }
        }
        Message::Relation {
            oid,
            namespace,
            name,
            replica_identity,
            columns,
            ..
        } => applier.relation(*oid, namespace, name, *replica_identity, columns),
        Message::Type {
            oid,
            namespace,
            name,
            ..
        } => applier.type_announced(*oid, namespace, name),
        Message::Insert { relation, new, .. } if !skip(applier, state, *relation) => {
            applier.insert(*relation, new).map_err(apply_error)?;
        }
        Message::Update {
            relation,
            old,
            key,
            new,
            ..
        } if !skip(applier, state, *relation) => {
            applier
                .update(*relation, old.as_ref(), key.as_ref(), new)
                .map_err(apply_error)?;
        }
        Message::Delete {
            relation, old, key, ..
        } if !skip(applier, state, *relation) => {
            applier
                .delete(*relation, old.as_ref(), key.as_ref())
                .map_err(apply_error)?;
        }
        Message::Truncate {
            relations,
            cascade,
            restart_identity,
            ..
        } => {
            let relations: Vec<u32> = relations
                .iter()
                .copied()
                .filter(|oid| !skip(applier, state, *oid))
                .collect();
            applier
                .truncate(&relations, *cascade, *restart_identity)
                .map_err(apply_error)?;
        }
        Message::Message { prefix, lsn, .. } if prefix == MESSAGE_PREFIX => {
            // The switchover's marker: everything before it must be
            // committed here before the marker counts as seen.
            if state.batch_waiting() {
                state.commit_batch(applier, index);
            }
            update_slot(index, |slot| {
                slot.fence_seen_lsn = slot.fence_seen_lsn.max(lsn.0)
            });
        }
        Message::StreamStart { .. }
        | Message::StreamCommit { .. }
        | Message::StreamAbort { .. } => {
            return Err(Failure::new("streamed transactions were not requested"));
        }
        _ => {}
    }
    Ok(())
}

/// A change to a table whose copy already contains it (resumed copy), or of
/// the transaction `cloudmig.skip` named.
fn skip(applier: &Applier, state: &State, relation: u32) -> bool {
    state
        .open
        .as_ref()
        .is_some_and(|t| t.skipping || applier.already_copied(relation, t.final_lsn))
}
