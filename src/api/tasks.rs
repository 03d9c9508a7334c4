//! `cloudmig.start()`, `cloudmig.cancel()`, `cloudmig.wait()` and the live
//! progress behind the `cloudmig.tasks` and `cloudmig.table_progress` views.

use super::error::{ApiError, OrRaise};
use super::secrecy::hide_statement_text;
use crate::assess::source_facts::SourceDatabaseName;
use crate::catalog::tasks::{self, Phase};
use crate::catalog::{as_extension_owner, secrets};
use crate::source::{quote_literal, ConnInfo, ConnectOptions, Connection, Lsn};
use crate::worker::cleanup;
use crate::worker::shared::{self, JobKind, JobState, JOBS, TASK};
use pgrx::prelude::*;
use pgrx::JsonB;
use serde::Deserialize;
use std::time::{Duration, Instant};

/// What `start`'s options may hold.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct StartOptions {
    /// Copy only these databases.
    databases: Option<Vec<String>>,
    /// Copy every database but these.
    exclude_databases: Option<Vec<String>>,
    /// Tables copied in parallel (database workers per database).
    copy_workers: Option<u32>,
    /// Give the source's tables without primary key or replica identity
    /// REPLICA IDENTITY FULL, so the source keeps accepting their UPDATEs and
    /// DELETEs once they are published. Required when such tables exist.
    replica_identity_full: Option<bool>,
}

fn check_for_interrupts() {
    pgrx::check_for_interrupts!();
}

/// Starts a migration from a passed assessment, reusing its source; returns
/// the task id at once. Background workers do the work.
#[pg_extern(volatile, parallel_unsafe)]
fn start(assessment: i64, options: default!(JsonB, "'{}'")) -> i64 {
    let options_value = options.0;
    if !options_value.is_object() {
        ApiError::InvalidOptions("options must be a JSON object".into()).raise();
    }
    let parsed: StartOptions = serde_json::from_value(options_value.clone())
        .map_err(|e| ApiError::InvalidOptions(e.to_string()))
        .or_raise();
    if let Some(n) = parsed.copy_workers {
        if !(1..=shared::MAX_JOB_SLOTS as u32).contains(&n) {
            ApiError::InvalidOptions(format!(
                "copy_workers must be between 1 and {}",
                shared::MAX_JOB_SLOTS
            ))
            .raise();
        }
    }
    if parsed.databases.is_some() && parsed.exclude_databases.is_some() {
        ApiError::InvalidOptions("give databases or exclude_databases, not both".into()).raise();
    }
    // SAFETY: reads shared recovery state.
    if unsafe { pg_sys::RecoveryInProgress() } {
        ApiError::DestinationIsStandby.raise();
    }
    let (passed, masked, system_identifier) = as_extension_owner(|| {
        Spi::connect(|client| {
            let mut rows = client.select(
                "SELECT a.passed, a.source, a.source_system_identifier \
                   FROM cloudmig.assessments a WHERE a.id = $1",
                None,
                &[assessment.into()],
            )?;
            let Some(row) = rows.next() else {
                return Ok::<_, pgrx::spi::Error>(None);
            };
            Ok(Some((
                row.get::<bool>(1)?.unwrap_or(false),
                row.get::<String>(2)?.unwrap_or_default(),
                row.get::<String>(3)?,
            )))
        })
    })
    .map_err(|e| ApiError::Catalog(format!("reading assessment: {e}")))
    .or_raise()
    .unwrap_or_else(|| ApiError::UnknownAssessment(assessment).raise());
    if !passed {
        ApiError::AssessmentFailed(assessment).raise();
    }
    if let Some(active) = tasks::active_task_id()
        .map_err(|e| ApiError::Catalog(format!("active task: {e}")))
        .or_raise()
    {
        ApiError::TaskActive(active).raise();
    }
    // Read after the checks above: a refused call never touches the secret.
    let conninfo = as_extension_owner(|| {
        secrets::of_unstarted_assessment(assessment, crate::guc::secret_retention_seconds())
    })
    .map_err(|e| ApiError::Catalog(format!("reading assessment: {e}")))
    .or_raise()
    .unwrap_or_else(|| ApiError::SecretGone(assessment).raise());
    let info = ConnInfo::parse(&conninfo).or_raise();

    // The source must still be the assessed instance, and we learn its
    // databases as they are now.
    let mut options = ConnectOptions::new();
    options.replication = true;
    options.interrupt_check = Some(Box::new(check_for_interrupts));
    options.io_timeout = crate::guc::source_timeout();
    let mut replication = Connection::connect(&info, options).or_raise();
    let identity = replication.identify_system().or_raise();
    replication.close();
    if system_identifier.as_deref() != Some(identity.systemid.as_str()) {
        ApiError::SourceChanged {
            assessment,
            expected: system_identifier.unwrap_or_else(|| "unknown".into()),
            found: identity.systemid,
        }
        .raise();
    }
    let mut options = ConnectOptions::new();
    options.interrupt_check = Some(Box::new(check_for_interrupts));
    options.io_timeout = crate::guc::source_timeout();
    let mut connection = Connection::connect(&info, options).or_raise();
    let all: Vec<SourceDatabaseName> =
        crate::assess::source_facts::database_names(&mut connection).or_raise();
    connection.close();
    let names: Vec<&str> = all.iter().map(|d| d.name.as_str()).collect();
    for wanted in parsed
        .databases
        .iter()
        .flatten()
        .chain(parsed.exclude_databases.iter().flatten())
    {
        if !names.contains(&wanted.as_str()) {
            ApiError::InvalidOptions(format!(
                "the source has no database {wanted:?} (it has: {})",
                names.join(", ")
            ))
            .raise();
        }
    }
    let selected: Vec<(String, Option<i64>)> = all
        .into_iter()
        .filter(|d| {
            parsed
                .databases
                .as_ref()
                .is_none_or(|only| only.contains(&d.name))
        })
        .filter(|d| {
            !parsed
                .exclude_databases
                .as_ref()
                .is_some_and(|skip| skip.contains(&d.name))
        })
        .map(|d| (d.name, d.size_bytes))
        .collect();
    if selected.is_empty() {
        ApiError::InvalidOptions("no database left to migrate".into()).raise();
    }
    // Publishing a table without replica identity makes the source refuse
    // its UPDATEs and DELETEs: never do that silently.
    if parsed.replica_identity_full != Some(true) {
        let mut without_identity = Vec::new();
        for (database, _) in &selected {
            let mut options = ConnectOptions::new();
            options.interrupt_check = Some(Box::new(check_for_interrupts));
            options.io_timeout = crate::guc::source_timeout();
            let mut connection =
                Connection::connect(&info.with_dbname(database), options).or_raise();
            for row in connection
                .simple_query(crate::copy::TABLES_WITHOUT_IDENTITY_SQL)
                .or_raise()
            {
                without_identity.push(format!(
                    "{database}: {}",
                    row.get("name").unwrap_or_default()
                ));
            }
            connection.close();
        }
        if !without_identity.is_empty() {
            ApiError::TablesWithoutIdentity(without_identity).raise();
        }
    }
    // The caller's own role (current_user, as SET ROLE or a SECURITY DEFINER
    // function left it): the roles step never grants more than it holds.
    // SAFETY: reads the current user id of this backend.
    let caller = unsafe { pg_sys::GetUserId() };
    let id =
        as_extension_owner(|| tasks::create(assessment, &masked, options_value, &selected, caller))
            .map_err(|e| ApiError::Catalog(format!("creating task: {e}")))
            .or_raise();
    // The launcher starts the task worker once this transaction commits.
    pgrx::register_xact_callback(pgrx::PgXactCallbackEvent::Commit, shared::wake_launcher);
    pgrx::notice!(
        "task {id} started for {} database(s): {}; follow it in cloudmig.tasks",
        selected.len(),
        selected
            .iter()
            .map(|(n, _)| n.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    );
    id
}

/// Stops a task: its workers end, its slots and publications on the source
/// are dropped; data copied so far stays here. Returns when done.
#[pg_extern(volatile, parallel_unsafe)]
fn cancel(task: i64) {
    let loaded = tasks::load(task)
        .map_err(|e| ApiError::Catalog(e.to_string()))
        .or_raise();
    let Some(loaded) = loaded else {
        ApiError::UnknownTask(task).raise()
    };
    if loaded.phase == Phase::Cancelled {
        pgrx::notice!("task {task} is already cancelled");
        return;
    }
    if loaded.phase == Phase::Completed {
        pgrx::notice!("task {task} is completed: there is nothing to cancel");
        return;
    }
    // Stop the worker first: it holds the slots and snapshots.
    TASK.exclusive().cancel_task_id = task;
    let deadline = Instant::now() + Duration::from_secs(60);
    while let Some(pid) = shared::task_worker_pid(task) {
        shared::wake(pid);
        if Instant::now() > deadline {
            TASK.exclusive().cancel_task_id = 0;
            ApiError::WorkerBusy(task, pid).raise();
        }
        // SAFETY: a short latch wait in a backend, waking on postmaster death.
        unsafe {
            pg_sys::WaitLatch(
                pg_sys::MyLatch,
                (pg_sys::WL_LATCH_SET | pg_sys::WL_TIMEOUT | pg_sys::WL_EXIT_ON_PM_DEATH) as i32,
                100,
                pg_sys::PG_WAIT_EXTENSION,
            );
            pg_sys::ResetLatch(pg_sys::MyLatch);
        }
        check_for_interrupts();
    }
    let result = as_extension_owner(|| -> Result<Vec<String>, pgrx::spi::Error> {
        let conninfo = secrets::of_task(task)?;
        let databases: Vec<String> = tasks::databases(task)?
            .into_iter()
            .map(|d| d.datname)
            .collect();
        let problems = match conninfo.as_deref().map(ConnInfo::parse) {
            Some(Ok(info)) => {
                cleanup::drop_source_objects(&info, task, &databases, check_for_interrupts)
            }
            Some(Err(e)) => vec![format!("invalid source connection string: {e}")],
            None => vec![format!(
                "task {task} has no source connection string any more, so its replication \
                 slots and publications were not dropped"
            )],
        };
        for problem in &problems {
            tasks::add_event(
                task,
                None,
                "warning",
                &format!("{problem}; drop it on the source by hand"),
            )?;
        }
        // The workers are gone: nothing uses the task's origins any more.
        cleanup::drop_origins(task)?;
        tasks::set_phase(
            task,
            Phase::Cancelled,
            "stopped by cloudmig.cancel(); copied data stays here",
        )?;
        Ok(problems)
    });
    TASK.exclusive().cancel_task_id = 0;
    let problems = result
        .map_err(|e| ApiError::Catalog(e.to_string()))
        .or_raise();
    for problem in problems {
        pgrx::warning!("cloudmig: {problem}");
    }
}

/// Continues a failed task from what is recorded, once the cause of its
/// failure is fixed: copied tables stay, the slots on the source still hold
/// the changes since the copy, the apply continues from its replication
/// origins. Returns at once; the task's worker starts when this commits.
#[pg_extern(volatile, parallel_unsafe)]
fn resume(task: i64) {
    let phase = resumable_phase(task);
    check_slots(task);
    continue_task(task, phase, "resumed by cloudmig.resume()");
}

/// Skips one source transaction, named by its commit LSN (the LSN a failed
/// apply's error names, `cloudmig.tasks.last_error_lsn`), as PostgreSQL's
/// `ALTER SUBSCRIPTION ... SKIP (lsn = ...)` does, and resumes the failed
/// task. The transaction's changes will be missing here; an event says so.
#[pg_extern(volatile, parallel_unsafe)]
fn skip(task: i64, lsn: &str) {
    let Some(parsed) = lsn.trim().parse::<Lsn>().ok().filter(|lsn| lsn.is_valid()) else {
        ApiError::InvalidLsn(lsn.to_string()).raise()
    };
    let phase = resumable_phase(task);
    check_slots(task);
    let lsn = parsed.to_string();
    // As ALTER SUBSCRIPTION ... SKIP refuses an LSN its origin is past: a
    // transaction every database applied already cannot be skipped.
    let passed = as_extension_owner(|| {
        crate::catalog::first_value::<bool>(
            "SELECT pg_catalog.bool_and(remote_lsn >= $2::pg_lsn) \
               FROM pg_catalog.pg_replication_origin_status WHERE external_id LIKE $1",
            &[format!("cloudmig\\_{task}\\_%").into(), lsn.as_str().into()],
        )
    })
    .map_err(|e| ApiError::Catalog(e.to_string()))
    .or_raise()
    .unwrap_or(false);
    if passed {
        ApiError::SkipAlreadyApplied { task, lsn }.raise();
    }
    as_extension_owner(|| {
        tasks::set_skip_lsn(task, Some(&lsn))?;
        tasks::add_event(
            task,
            None,
            "warning",
            &format!(
                "cloudmig.skip(): the source transaction committing at {lsn} will be skipped; \
                 its changes will be missing here"
            ),
        )
    })
    .map_err(|e| ApiError::Catalog(e.to_string()))
    .or_raise();
    continue_task(task, phase, "resumed by cloudmig.skip()");
}

/// The phase a failed task continues in; raises when it is not failed.
fn resumable_phase(task: i64) -> Phase {
    let (phase, failed_in) = tasks::failure_of(task)
        .map_err(|e| ApiError::Catalog(e.to_string()))
        .or_raise()
        .unwrap_or_else(|| ApiError::UnknownTask(task).raise());
    if phase != Phase::Failed {
        ApiError::TaskNotFailed(task, phase.to_string()).raise();
    }
    failed_in.unwrap_or_else(|| ApiError::FailedPhaseUnknown(task).raise())
}

/// Refuses to resume a task whose replication slots on the source are gone
/// or invalidated: the changes since its copy would be lost, and a new slot
/// would silently miss them.
fn check_slots(task: i64) {
    let conninfo = as_extension_owner(|| secrets::of_task(task))
        .map_err(|e| ApiError::Catalog(e.to_string()))
        .or_raise()
        .unwrap_or_else(|| ApiError::TaskSecretGone(task).raise());
    let info = ConnInfo::parse(&conninfo).or_raise();
    // A database still `pending` has no slot yet: its copy starts anew.
    let expected: Vec<String> = tasks::databases(task)
        .map_err(|e| ApiError::Catalog(e.to_string()))
        .or_raise()
        .into_iter()
        .filter(|d| d.state != "pending")
        .map(|d| d.slot_name)
        .collect();
    if expected.is_empty() {
        return;
    }
    let mut options = ConnectOptions::new();
    options.interrupt_check = Some(Box::new(check_for_interrupts));
    options.io_timeout = crate::guc::source_timeout();
    let mut connection = Connection::connect(&info, options).or_raise();
    let rows = connection
        .simple_query(&format!(
            "SELECT slot_name::text AS slot_name, coalesce(wal_status, '') AS wal_status \
               FROM pg_catalog.pg_replication_slots WHERE slot_name LIKE {}",
            quote_literal(&format!("cloudmig\\_{task}\\_%"))
        ))
        .or_raise();
    connection.close();
    for slot in expected {
        let found = rows
            .iter()
            .find(|row| row.get("slot_name") == Some(slot.as_str()));
        let why = match found.and_then(|row| row.get("wal_status")) {
            None => "no longer exists",
            Some("lost") => {
                "was invalidated (max_slot_wal_keep_size): the source removed WAL the task \
                 still needed"
            }
            Some(_) => continue,
        };
        ApiError::SlotUnusable {
            task,
            slot,
            why: why.to_string(),
        }
        .raise();
    }
}

/// Puts a failed task back into `phase`; the launcher starts its worker once
/// this transaction commits.
fn continue_task(task: i64, phase: Phase, message: &str) {
    as_extension_owner(|| tasks::resume(task, phase, message))
        .map_err(|e| ApiError::Catalog(e.to_string()))
        .or_raise();
    pgrx::register_xact_callback(pgrx::PgXactCallbackEvent::Commit, shared::wake_launcher);
    pgrx::notice!("task {task} continues in {phase}; follow it in cloudmig.tasks");
}

/// Replaces the source password of a task that is not finished, e.g. after
/// it was rotated on the source: the workers use it from their next
/// connection (a running task's database and apply workers at once, the task
/// worker when it next starts or retries). Never shows the password.
#[pg_extern(volatile, parallel_unsafe)]
fn set_source_password(task: i64, password: Option<&str>) {
    hide_statement_text("SELECT cloudmig.set_source_password(<task>, <password hidden>)");
    let Some(password) = password.filter(|p| !p.is_empty()) else {
        ApiError::EmptyPassword.raise()
    };
    let loaded = tasks::load(task)
        .map_err(|e| ApiError::Catalog(e.to_string()))
        .or_raise()
        .unwrap_or_else(|| ApiError::UnknownTask(task).raise());
    if matches!(loaded.phase, Phase::Completed | Phase::Cancelled) {
        ApiError::TaskFinished(task, loaded.phase.to_string()).raise();
    }
    let conninfo = as_extension_owner(|| secrets::of_task(task))
        .map_err(|e| ApiError::Catalog(e.to_string()))
        .or_raise()
        .unwrap_or_else(|| ApiError::TaskSecretGone(task).raise());
    let mut info = ConnInfo::parse(&conninfo).or_raise();
    info.password = Some(password.to_string());
    let conninfo = info.to_conninfo_string();
    if conninfo.len() > shared::CONNINFO_CAPACITY {
        ApiError::ConnInfoTooLong {
            length: conninfo.len(),
            capacity: shared::CONNINFO_CAPACITY,
        }
        .raise();
    }
    let replaced = as_extension_owner(|| secrets::replace_for_task(task, &conninfo))
        .map_err(|e| ApiError::Catalog(e.to_string()))
        .or_raise();
    if !replaced {
        ApiError::TaskSecretGone(task).raise();
    }
    // Workers read the connection string from shared memory when they
    // connect; hand them the new one only once it is committed.
    pgrx::register_xact_callback(pgrx::PgXactCallbackEvent::Commit, move || {
        let mut activity = TASK.exclusive();
        if activity.task_id == task && activity.worker_pid != 0 {
            // Fits: checked against the capacity above.
            let _ = activity.conninfo.set_whole(&conninfo);
        }
    });
    pgrx::notice!("the source password of task {task} was replaced");
}

/// Blocks until `task` reaches `phase` (or a later one), raising a NOTICE
/// with its progress every 10 seconds; returns the phase reached. A task
/// that fails or is cancelled first returns that phase (with a WARNING
/// carrying its error); the timeout raises an error.
#[pg_extern(volatile, parallel_unsafe)]
fn wait(
    task: i64,
    phase: &str,
    timeout: default!(pgrx::datum::Interval, "'10 minutes'"),
) -> String {
    let Some(target) = Phase::parse(phase) else {
        ApiError::InvalidOptions(format!(
            "unknown phase {phase:?} (phases: {})",
            Phase::ALL.map(Phase::as_str).join(", ")
        ))
        .raise()
    };
    let timeout_us = timeout.as_micros().max(0) as u64;
    let deadline = Instant::now() + Duration::from_micros(timeout_us);
    let mut next_notice = Instant::now() + Duration::from_secs(10);
    loop {
        // One text column: pgrx's get_one/get_two treat "no row" as an error.
        // Each poll sees what committed since the last one.
        let row = crate::catalog::at_latest_snapshot(|| {
            crate::catalog::first_value::<String>(
                "SELECT phase || '|' || coalesce(last_error, '') FROM cloudmig.task WHERE id = $1",
                &[task.into()],
            )
        })
        .map_err(|e| ApiError::Catalog(e.to_string()))
        .or_raise();
        let Some(row) = row else {
            ApiError::UnknownTask(task).raise()
        };
        let (current, error) = row.split_once('|').unwrap_or((row.as_str(), ""));
        let (current, error) = (current.to_string(), Some(error.to_string()));
        let current_phase = Phase::parse(&current).unwrap_or(Phase::Failed);
        if current_phase == target {
            return current;
        }
        match current_phase {
            Phase::Failed | Phase::Cancelled => {
                // Returned, not raised: a script branches on it (a later
                // switchover refuses such a task anyway).
                pgrx::warning!(
                    "task {task} is {current}{}",
                    error
                        .as_deref()
                        .filter(|e| !e.is_empty())
                        .map(|e| format!(": {e}"))
                        .unwrap_or_default()
                );
                return current;
            }
            _ if current_phase.reached(target) => return current,
            _ => {}
        }
        if Instant::now() >= deadline {
            ApiError::WaitTimeout {
                task,
                target: target.to_string(),
                now: current,
            }
            .raise();
        }
        if Instant::now() >= next_notice {
            let progress = crate::catalog::at_latest_snapshot(|| {
                crate::catalog::first_value::<String>(
                    "SELECT format('%s%% of %s table(s) copied', coalesce(percent, 0), tables_total) \
                       FROM cloudmig.tasks WHERE task_id = $1",
                    &[task.into()],
                )
            })
            .ok()
            .flatten()
            .unwrap_or_default();
            pgrx::notice!("task {task}: {current}, {progress}");
            next_notice = Instant::now() + Duration::from_secs(10);
        }
        // SAFETY: a short latch wait in a backend, waking on postmaster death.
        unsafe {
            pg_sys::WaitLatch(
                pg_sys::MyLatch,
                (pg_sys::WL_LATCH_SET | pg_sys::WL_TIMEOUT | pg_sys::WL_EXIT_ON_PM_DEATH) as i32,
                200,
                pg_sys::PG_WAIT_EXTENSION,
            );
            pg_sys::ResetLatch(pg_sys::MyLatch);
        }
        check_for_interrupts();
    }
}

/// Tables being copied right now, with their live counters (shared memory).
// pgrx spells a SQL table's columns as a tuple of named types.
#[allow(clippy::type_complexity)]
#[pg_extern(volatile, parallel_unsafe)]
fn live_copies() -> TableIterator<
    'static,
    (
        name!(task_id, i64),
        name!(datname, String),
        name!(schema_name, String),
        name!(table_name, String),
        name!(rows_copied, i64),
        name!(bytes_copied, i64),
    ),
> {
    let rows: Vec<_> = JOBS
        .share()
        .iter()
        .filter(|slot| slot.kind == JobKind::CopyTable && slot.state == JobState::Running)
        .map(|slot| {
            (
                slot.task_id,
                slot.database.get(),
                slot.schema.get(),
                slot.table.get(),
                slot.rows as i64,
                slot.bytes as i64,
            )
        })
        .collect();
    TableIterator::new(rows)
}
