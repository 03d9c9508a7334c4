//! Transactions in background workers, with errors caught.
//!
//! A worker runs each bounded step in its own transaction. An ERROR inside
//! (PostgreSQL's or ours) is caught, the transaction aborted, and the message
//! and hint returned, so the worker can record why and carry on or stop
//! cleanly instead of dying with the reason only in the server log.

use pgrx::pg_sys::panic::CaughtError;
use pgrx::pg_sys::PgTryBuilder;
use pgrx::prelude::*;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};

/// An error caught in a worker's transaction.
#[derive(Debug, Clone)]
pub struct Failure {
    pub message: String,
    pub hint: Option<String>,
    /// The source went away (network, restart, too many connections): the
    /// task worker retries with backoff instead of failing the task.
    pub transient: bool,
    /// The SQLSTATE of a local ERROR, when the failure is one.
    pub sqlstate: Option<pgrx::PgSqlErrorCode>,
    /// The commit LSN of the source transaction an apply error happened in
    /// (what `cloudmig.skip` takes).
    pub lsn: Option<crate::source::Lsn>,
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl Failure {
    /// Whether a local ERROR said an object exists already (a schema script
    /// that a resumed task applied once before, but could not record). A
    /// table's primary key added again says "multiple primary keys for table"
    /// (invalid_table_definition) rather than "already exists".
    pub fn is_duplicate_object(&self) -> bool {
        use pgrx::PgSqlErrorCode::*;
        matches!(
            self.sqlstate,
            Some(
                ERRCODE_DUPLICATE_TABLE
                    | ERRCODE_DUPLICATE_OBJECT
                    | ERRCODE_DUPLICATE_SCHEMA
                    | ERRCODE_DUPLICATE_FUNCTION
                    | ERRCODE_INVALID_TABLE_DEFINITION
            )
        )
    }

    /// A failure talking to the source, transient when the source is away.
    pub fn from_source(context: &str, error: &crate::source::SourceError) -> Self {
        Self {
            message: if context.is_empty() {
                error.to_string()
            } else {
                format!("{context}: {error}")
            },
            hint: error.hint(),
            transient: source_unavailable(error),
            sqlstate: None,
            lsn: None,
        }
    }

    pub fn new(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            hint: None,
            transient: false,
            sqlstate: None,
            lsn: None,
        }
    }

    pub fn with_hint(message: impl Into<String>, hint: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            hint: Some(hint.into()),
            transient: false,
            sqlstate: None,
            lsn: None,
        }
    }
}

fn describe(error: CaughtError) -> Failure {
    let report = match &error {
        CaughtError::PostgresError(report) | CaughtError::ErrorReport(report) => report,
        CaughtError::RustPanic { ereport, .. } => ereport,
    };
    Failure {
        message: report.message().to_string(),
        hint: report.hint().map(str::to_string),
        transient: false,
        sqlstate: Some(report.sql_error_code()),
        lsn: None,
    }
}

/// Runs `body` in a transaction of its own: committed when it returns Ok,
/// aborted when it returns Err or raises an ERROR.
pub fn run<R>(body: impl FnOnce() -> Result<R, Failure>) -> Result<R, Failure> {
    // SAFETY: a background worker's transaction boundaries, on its main
    // thread, as worker_spi does.
    unsafe {
        pg_sys::SetCurrentStatementStartTimestamp();
        pg_sys::StartTransactionCommand();
        pg_sys::PushActiveSnapshot(pg_sys::GetTransactionSnapshot());
    }
    let body = AssertUnwindSafe(body);
    let result = PgTryBuilder::new(AssertUnwindSafe(move || (body.0)()))
        .catch_others(|error| Err(describe(error)))
        .execute();
    // SAFETY: as above; AbortCurrentTransaction also resets the snapshot stack.
    unsafe {
        match &result {
            Ok(_) => {
                pg_sys::PopActiveSnapshot();
                pg_sys::CommitTransactionCommand();
            }
            Err(_) => pg_sys::AbortCurrentTransaction(),
        }
    }
    result
}

/// Like [`run`] for SPI work whose errors are `pgrx::spi::Error`.
pub fn spi<R>(body: impl FnOnce() -> Result<R, pgrx::spi::Error>) -> Result<R, Failure> {
    run(|| body().map_err(|e| Failure::new(e.to_string())))
}

/// Set once SIGTERM arrived. pgrx's flag resets when read (and its
/// `wait_latch` reads it), so the worker keeps its own, sticky one.
static SHUTDOWN: AtomicBool = AtomicBool::new(false);

/// The task this worker serves, whose `cloudmig.cancel()` must also
/// interrupt long waits (0: none).
static SERVED_TASK: AtomicI64 = AtomicI64::new(0);

/// True once SIGTERM asked this worker to stop.
pub fn shutdown_requested() -> bool {
    if pgrx::bgworkers::BackgroundWorker::sigterm_received() {
        SHUTDOWN.store(true, Ordering::SeqCst);
    }
    SHUTDOWN.load(Ordering::SeqCst)
}

/// Declares the task whose cancellation interrupts this worker's waits.
pub fn serve_task(task_id: i64) {
    SERVED_TASK.store(task_id, Ordering::SeqCst);
}

/// Waits on the latch up to `timeout` (also waking on postmaster death, which
/// ends the process), then handles a pending config reload.
pub fn nap(timeout: std::time::Duration) {
    if !pgrx::bgworkers::BackgroundWorker::wait_latch(Some(timeout)) {
        SHUTDOWN.store(true, Ordering::SeqCst);
    }
    if pgrx::bgworkers::BackgroundWorker::sighup_received() {
        // SAFETY: reloading the config file on the worker's main thread.
        unsafe { pg_sys::ProcessConfigFile(pg_sys::GucContext::PGC_SIGHUP) };
    }
}

/// The check the source client calls while it waits: a SIGTERM, a cancel of
/// the served task, or a query cancel unwinds out of the wait.
pub fn interrupt_check() {
    if shutdown_requested() {
        pgrx::error!("cloudmig: worker shutting down");
    }
    let task = SERVED_TASK.load(Ordering::SeqCst);
    if task != 0 && super::shared::cancel_requested() == Some(task) {
        pgrx::error!("cloudmig: task {task} cancelled");
    }
    pgrx::check_for_interrupts!();
}

/// Local errors that go away when tried again: a deadlock or serialization
/// failure against a session here, a lock not granted in time, a full disk
/// or memory exhaustion that someone may free meanwhile. The apply retries
/// them within `cloudmig.source_retry_timeout` instead of failing the task.
pub fn local_error_is_transient(sqlstate: Option<pgrx::PgSqlErrorCode>) -> bool {
    use pgrx::PgSqlErrorCode::*;
    matches!(
        sqlstate,
        Some(
            ERRCODE_T_R_DEADLOCK_DETECTED
                | ERRCODE_T_R_SERIALIZATION_FAILURE
                | ERRCODE_LOCK_NOT_AVAILABLE
                | ERRCODE_DISK_FULL
                | ERRCODE_OUT_OF_MEMORY
                | ERRCODE_QUERY_CANCELED
        )
    )
}

/// An exported snapshot that can no longer be imported: the replication
/// connection that exported it ended with the source's restart or a network
/// loss, which the task worker may notice only when a session imports it. The
/// retry resumes the copy, taking a fresh snapshot from a temporary slot.
fn snapshot_gone(error: &crate::source::ServerError) -> bool {
    error.code == "22023" && error.message.starts_with("invalid snapshot identifier")
}

/// Errors that mean "the source is not there right now" rather than "this
/// cannot work": the network, a restart, no free connection slot.
pub fn source_unavailable(error: &crate::source::SourceError) -> bool {
    use crate::source::SourceError::*;
    match error {
        HostNotFound { .. } | ConnectionRefused { .. } | Unreachable { .. } | Timeout { .. } => {
            true
        }
        Io { .. } | Closed { .. } | Broken { .. } => true,
        Server(e) => {
            matches!(
                e.code.as_str(),
                "57P01" | "57P02" | "57P03" | "53300" | "08000" | "08003" | "08006"
            ) || snapshot_gone(e)
        }
        _ => false,
    }
}
