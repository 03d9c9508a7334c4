//! `cloudmig.switchover(task, options)` and the live apply state behind
//! `cloudmig.apply_progress`.
//!
//! The switchover itself runs in the task worker (it owns the apply workers
//! and the database workers that set sequences); this function hands it the
//! request through shared memory, waits for the outcome, and returns the
//! downtime with each step's duration, or raises why it was refused or
//! abandoned (in which case the source is writable again).

use super::error::{ApiError, OrRaise};
use crate::catalog::tasks::{self, Phase};
use crate::source::Lsn;
use crate::worker::incremental::lag_of;
use crate::worker::shared::{self, SwitchoverState, APPLY, TASK};
use pgrx::prelude::*;
use pgrx::JsonB;
use serde::Deserialize;
use std::time::{Duration, Instant};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct SwitchoverOptions {
    /// Refuse when any database lags more than this many bytes of WAL.
    max_lag_bytes: i64,
    /// Give up (and make the source writable again) after this many seconds.
    timeout_seconds: i64,
    /// End the sessions on the source's migrated databases after fencing.
    terminate_sessions: bool,
    /// Users whose sessions are not ended (monitoring, replication tools...).
    exempt_users: Vec<String>,
    /// Once drained, compare every table's row count; refuse on a difference.
    verify: bool,
    /// With `verify`, compare order-independent checksums too (reads every row).
    checksums: bool,
}

impl Default for SwitchoverOptions {
    fn default() -> Self {
        Self {
            max_lag_bytes: 16 * 1024 * 1024,
            timeout_seconds: 60,
            terminate_sessions: true,
            exempt_users: Vec::new(),
            verify: false,
            checksums: false,
        }
    }
}

fn nap(milliseconds: i64) {
    // SAFETY: a short latch wait in a backend, waking on postmaster death.
    unsafe {
        pg_sys::WaitLatch(
            pg_sys::MyLatch,
            (pg_sys::WL_LATCH_SET | pg_sys::WL_TIMEOUT | pg_sys::WL_EXIT_ON_PM_DEATH) as i32,
            milliseconds as std::ffi::c_long,
            pg_sys::PG_WAIT_EXTENSION,
        );
        pg_sys::ResetLatch(pg_sys::MyLatch);
    }
    pgrx::check_for_interrupts!();
}

/// Cuts over from the source to this destination; blocks until done or refused.
// pgrx spells a SQL table's columns as a tuple of named types.
#[allow(clippy::type_complexity)]
#[pg_extern(volatile, parallel_unsafe)]
fn switchover(
    task: i64,
    options: default!(JsonB, "'{}'"),
) -> TableIterator<
    'static,
    (
        name!(task_id, i64),
        name!(downtime_ms, i64),
        name!(fence_ms, i64),
        name!(drain_ms, i64),
        name!(sequences_ms, i64),
        name!(cleanup_ms, i64),
        name!(final_lsn, String),
        name!(before_fence_ms, i64),
        name!(large_objects_before_fence, i64),
        name!(large_objects_in_window, i64),
        name!(large_object_bytes_in_window, i64),
        name!(materialized_views_in_window, i64),
    ),
> {
    if !options.0.is_object() {
        ApiError::InvalidOptions("options must be a JSON object".into()).raise();
    }
    let options: SwitchoverOptions = serde_json::from_value(options.0)
        .map_err(|e| ApiError::InvalidOptions(e.to_string()))
        .or_raise();
    if options.timeout_seconds <= 0 || options.max_lag_bytes < 0 {
        ApiError::InvalidOptions(
            "timeout_seconds must be positive and max_lag_bytes not negative".into(),
        )
        .raise();
    }
    let loaded = tasks::load(task)
        .map_err(|e| ApiError::Catalog(e.to_string()))
        .or_raise();
    let Some(loaded) = loaded else {
        ApiError::UnknownTask(task).raise()
    };
    if loaded.phase != Phase::Incremental {
        ApiError::SwitchoverRefused {
            message: format!("task {task} is in phase {}, not incremental", loaded.phase),
            hint: "Wait until cloudmig.tasks shows phase incremental (SELECT cloudmig.wait(task, 'incremental')).".into(),
        }
        .raise();
    }
    let Some(worker) = shared::task_worker_pid(task) else {
        ApiError::SwitchoverRefused {
            message: format!("task {task} has no running worker"),
            hint: "The launcher restarts it within seconds; try again.".into(),
        }
        .raise()
    };
    // SAFETY: MyProcPid is set at process start.
    let my_pid = unsafe { pg_sys::MyProcPid };
    {
        let mut activity = TASK.exclusive();
        let exchange = &mut activity.switchover;
        if matches!(
            exchange.state,
            SwitchoverState::Requested | SwitchoverState::Running
        ) {
            drop(activity);
            ApiError::SwitchoverRefused {
                message: format!("a switchover of task {task} is already running"),
                hint: "Wait for it to finish.".into(),
            }
            .raise();
        }
        *exchange = Default::default();
        exchange.state = SwitchoverState::Requested;
        exchange.task_id = task;
        exchange.requester_pid = my_pid;
        exchange.max_lag_bytes = options.max_lag_bytes;
        exchange.timeout_ms = options.timeout_seconds * 1000;
        exchange.terminate_sessions = options.terminate_sessions;
        exchange.verify = options.verify || options.checksums;
        exchange.checksums = options.checksums;
        exchange.exempt_users.set(&options.exempt_users.join(","));
    }
    shared::wake(worker);
    // The worker gives up at the timeout; allow it time to undo the fence.
    let allowance = Duration::from_secs(options.timeout_seconds as u64 + 60);
    let mut deadline = Instant::now() + allowance;
    loop {
        // The pass before the fence copies what changed since the copy, as
        // long as that takes: the timeout counts from its end.
        if TASK.share().switchover.preparing {
            deadline = Instant::now() + allowance;
        }
        let outcome = {
            let activity = TASK.share();
            let exchange = activity.switchover;
            matches!(
                exchange.state,
                SwitchoverState::Done | SwitchoverState::Failed
            )
            .then_some(exchange)
        };
        if let Some(exchange) = outcome {
            TASK.exclusive().switchover.state = SwitchoverState::Idle;
            if exchange.state == SwitchoverState::Failed {
                ApiError::SwitchoverRefused {
                    message: exchange.message.get(),
                    hint: exchange.hint.get(),
                }
                .raise();
            }
            let row = (
                task,
                exchange.downtime_ms,
                exchange.fence_ms,
                exchange.drain_ms,
                exchange.objects_ms,
                exchange.cleanup_ms,
                Lsn(exchange.final_lsn).to_string(),
                exchange.before_fence_ms,
                exchange.large_objects_before,
                exchange.large_objects_window,
                exchange.large_object_bytes_window,
                exchange.views_window,
            );
            pgrx::notice!(
                "task {task} completed: downtime {} ms; the source databases are read-only now \
                 (undo with ALTER DATABASE ... RESET default_transaction_read_only on the source)",
                exchange.downtime_ms
            );
            return TableIterator::once(row);
        }
        if Instant::now() > deadline || shared::task_worker_pid(task).is_none() {
            ApiError::SwitchoverRefused {
                message: "the task worker did not report the switchover's outcome".into(),
                hint: "See cloudmig.events and the server log; the source may still be fenced."
                    .into(),
            }
            .raise();
        }
        nap(20);
    }
}

/// Per database of the running task: what the apply received, applied and
/// reported flushed, the source's position, and the lag.
#[allow(clippy::type_complexity)]
#[pg_extern(volatile, parallel_unsafe)]
fn apply_status() -> TableIterator<
    'static,
    (
        name!(task_id, i64),
        name!(datname, String),
        name!(pid, Option<i32>),
        name!(received_lsn, String),
        name!(applied_lsn, String),
        name!(flushed_lsn, String),
        name!(source_lsn, String),
        name!(lag_bytes, i64),
        name!(lag_seconds, f64),
        name!(transactions, i64),
        name!(last_error, Option<String>),
    ),
> {
    // SAFETY: reads the clock.
    let now = unsafe { pg_sys::GetCurrentTimestamp() };
    let rows: Vec<_> = APPLY
        .share()
        .iter()
        .filter(|slot| slot.task_id != 0)
        .map(|slot| {
            let lag = lag_of(slot);
            let behind = lag > 0 && !slot.caught_up;
            let lag_seconds = if behind && slot.last_commit_time > 0 {
                (now - slot.last_commit_time).max(0) as f64 / 1_000_000.0
            } else {
                0.0
            };
            let error = slot.error.get();
            (
                slot.task_id,
                slot.database.get(),
                (slot.worker_pid != 0 && shared::process_alive(slot.worker_pid))
                    .then_some(slot.worker_pid),
                Lsn(slot.received_lsn).to_string(),
                Lsn(slot.applied_lsn).to_string(),
                Lsn(slot.flushed_lsn).to_string(),
                Lsn(slot.source_lsn).to_string(),
                lag as i64,
                lag_seconds,
                slot.transactions as i64,
                (!error.is_empty()).then_some(error),
            )
        })
        .collect();
    TableIterator::new(rows)
}

/// Compares every copied table between the source and this destination: row
/// counts, and order-independent checksums when `checksums`. Runs in the
/// task's worker, so the task must be streaming (`incremental`); while the
/// source is written to, counts differ by what is in flight. The switchover
/// runs the same comparison on a fenced source with its `verify` option.
#[allow(clippy::type_complexity)]
#[pg_extern(volatile, parallel_unsafe)]
fn verify(
    task: i64,
    checksums: default!(bool, false),
) -> TableIterator<
    'static,
    (
        name!(database, String),
        name!(schema_name, String),
        name!(table_name, String),
        name!(source_rows, i64),
        name!(destination_rows, i64),
        name!(matches, bool),
        name!(detail, String),
    ),
> {
    let loaded = tasks::load(task)
        .map_err(|e| ApiError::Catalog(e.to_string()))
        .or_raise();
    let Some(loaded) = loaded else {
        ApiError::UnknownTask(task).raise()
    };
    let Some(worker) = shared::task_worker_pid(task).filter(|_| loaded.phase == Phase::Incremental)
    else {
        ApiError::SwitchoverRefused {
            message: format!(
                "task {task} is in phase {}: verify needs it streaming (incremental)",
                loaded.phase
            ),
            hint: "Use the switchover's verify option to compare on a fenced source.".into(),
        }
        .raise()
    };
    {
        let mut activity = TASK.exclusive();
        if matches!(
            activity.verify.state,
            SwitchoverState::Requested | SwitchoverState::Running
        ) {
            drop(activity);
            ApiError::SwitchoverRefused {
                message: "a verification is already running".into(),
                hint: String::new(),
            }
            .raise();
        }
        activity.verify = Default::default();
        activity.verify.state = SwitchoverState::Requested;
        activity.verify.task_id = task;
        activity.verify.checksums = checksums;
    }
    shared::wake(worker);
    loop {
        let exchange = TASK.share().verify;
        if matches!(
            exchange.state,
            SwitchoverState::Done | SwitchoverState::Failed
        ) {
            TASK.exclusive().verify.state = SwitchoverState::Idle;
            if exchange.state == SwitchoverState::Failed {
                ApiError::SwitchoverRefused {
                    message: exchange.message.get(),
                    hint: String::new(),
                }
                .raise();
            }
            break;
        }
        if shared::task_worker_pid(task).is_none() {
            ApiError::SwitchoverRefused {
                message: "the task worker stopped".into(),
                hint: String::new(),
            }
            .raise();
        }
        nap(50);
    }
    let text = std::fs::read_to_string(crate::worker::incremental::verify_file(task))
        .map_err(|e| ApiError::Catalog(format!("could not read the verdicts: {e}")))
        .or_raise();
    let rows: Vec<_> = text
        .lines()
        .filter_map(|line| {
            let parts: Vec<&str> = line.split('\t').collect();
            if parts.len() < 7 {
                return None;
            }
            Some((
                parts[0].to_string(),
                parts[1].to_string(),
                parts[2].to_string(),
                parts[3].parse().unwrap_or(-1),
                parts[4].parse().unwrap_or(-1),
                parts[5] == "true",
                parts[6].to_string(),
            ))
        })
        .collect();
    TableIterator::new(rows)
}
