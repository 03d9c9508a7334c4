//! `cloudmig.task`, `cloudmig.task_database`, `cloudmig.table_copy`,
//! `cloudmig.events`: the durable state of migrations.
//!
//! The phase machine lives here ([`Phase`]): every phase change goes through
//! [`set_phase`], which also writes the event, in the caller's transaction.

use pgrx::prelude::*;
use std::fmt;

/// The phases of a task, in order; see sql/tasks.sql for the diagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Phase {
    Created,
    Roles,
    Schema,
    FullCopy,
    PostData,
    /// The copy is complete; the apply of changes starts from here.
    CopyComplete,
    /// Changes stream in; the destination is catching up with the source.
    Catchup,
    /// Caught up: changes are applied as they happen; switchover is possible.
    Incremental,
    /// `cloudmig.switchover()` is fencing the source and draining.
    SwitchingOver,
    /// Cut over: the destination has everything, the source is read-only.
    Completed,
    Failed,
    Cancelled,
}

impl Phase {
    pub const ALL: [Phase; 12] = [
        Phase::Created,
        Phase::Roles,
        Phase::Schema,
        Phase::FullCopy,
        Phase::PostData,
        Phase::CopyComplete,
        Phase::Catchup,
        Phase::Incremental,
        Phase::SwitchingOver,
        Phase::Completed,
        Phase::Failed,
        Phase::Cancelled,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Created => "created",
            Phase::Roles => "roles",
            Phase::Schema => "schema",
            Phase::FullCopy => "full_copy",
            Phase::PostData => "post_data",
            Phase::CopyComplete => "copy_complete",
            Phase::Catchup => "catchup",
            Phase::Incremental => "incremental",
            Phase::SwitchingOver => "switching_over",
            Phase::Completed => "completed",
            Phase::Failed => "failed",
            Phase::Cancelled => "cancelled",
        }
    }

    pub fn parse(text: &str) -> Option<Phase> {
        Phase::ALL.into_iter().find(|p| p.as_str() == text)
    }

    /// Phases in which a task worker has work to do.
    pub fn needs_worker(self) -> bool {
        !matches!(self, Phase::Completed | Phase::Failed | Phase::Cancelled)
    }

    /// Whether `self` is `target` or comes after it on the way to completion
    /// (failed and cancelled come after everything: a waiter must stop).
    pub fn reached(self, target: Phase) -> bool {
        self >= target
    }
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a worker needs to know about a task.
#[derive(Debug, Clone)]
pub struct Task {
    pub id: i64,
    pub assessment_id: i64,
    pub phase: Phase,
    pub options: serde_json::Value,
    /// The role that called `cloudmig.start()`; None for a task of an older
    /// version (treated as a role with no rights to hand out).
    pub started_by: Option<pg_sys::Oid>,
}

/// A database of a task.
#[derive(Debug, Clone)]
pub struct TaskDatabase {
    pub datname: String,
    pub state: String,
    pub slot_name: String,
    pub consistent_lsn: Option<String>,
}

/// A table to copy.
#[derive(Debug, Clone)]
pub struct TableCopy {
    pub datname: String,
    pub schema_name: String,
    pub table_name: String,
    pub state: String,
    /// An extension's configuration table (see sql/tasks.sql).
    pub extension_config: bool,
}

/// A table as planned from the source.
#[derive(Debug, Clone)]
pub struct PlannedTable {
    pub schema_name: String,
    pub table_name: String,
    pub bytes_total: i64,
    pub rows_estimated: i64,
    pub extension_config: bool,
}

type SpiResult<T> = Result<T, pgrx::spi::Error>;

/// Creates a task for a passed assessment, with one row per database, on
/// behalf of role `started_by` (the caller of `start`); the assessment's
/// secret now belongs to the task. Returns the task's id.
pub fn create(
    assessment_id: i64,
    masked_source: &str,
    options: serde_json::Value,
    databases: &[(String, Option<i64>)],
    started_by: pg_sys::Oid,
) -> SpiResult<i64> {
    let id = Spi::get_one_with_args::<i64>(
        "INSERT INTO cloudmig.task (assessment_id, source, options, started_by, requested_by) \
         SELECT $1, $2, $3, $4, coalesce((SELECT rolname FROM pg_catalog.pg_roles WHERE oid = $4), \
                                         session_user) \
         RETURNING id",
        &[
            assessment_id.into(),
            masked_source.into(),
            pgrx::JsonB(options).into(),
            started_by.into(),
        ],
    )?
    .ok_or(pgrx::spi::Error::NoTupleTable)?;
    super::secrets::give_to_task(assessment_id, id)?;
    for (ordinal, (datname, size)) in databases.iter().enumerate() {
        Spi::run_with_args(
            "INSERT INTO cloudmig.task_database (task_id, ordinal, datname, size_bytes, slot_name) \
             VALUES ($1, $2, $3, $4, $5)",
            &[
                id.into(),
                (ordinal as i32).into(),
                datname.as_str().into(),
                (*size).into(),
                slot_name(id, ordinal).into(),
            ],
        )?;
    }
    add_event(id, None, "phase", "created")?;
    Ok(id)
}

/// The permanent logical slot a task keeps on the source for a database. Its
/// name carries the task id so `no_concurrent_migration` recognises it.
pub fn slot_name(task_id: i64, ordinal: usize) -> String {
    format!("cloudmig_{task_id}_{ordinal}")
}

/// The publication a task creates on the source database it streams.
pub fn publication_name(task_id: i64) -> String {
    format!("cloudmig_{task_id}")
}

/// The active task (not completed or cancelled), if any.
pub fn active_task_id() -> SpiResult<Option<i64>> {
    super::first_value::<i64>(
        "SELECT id FROM cloudmig.task WHERE phase NOT IN ('completed', 'cancelled') ORDER BY id LIMIT 1",
        &[],
    )
}

/// Loads a task.
pub fn load(task_id: i64) -> SpiResult<Option<Task>> {
    Spi::connect(|client| {
        let mut rows = client.select(
            "SELECT id, assessment_id, phase, options, started_by FROM cloudmig.task WHERE id = $1",
            None,
            &[task_id.into()],
        )?;
        let Some(row) = rows.next() else {
            return Ok(None);
        };
        let phase: String = row.get(3)?.unwrap_or_default();
        Ok(Some(Task {
            id: row.get(1)?.unwrap_or_default(),
            assessment_id: row.get(2)?.unwrap_or_default(),
            phase: Phase::parse(&phase).unwrap_or(Phase::Failed),
            options: row.get::<pgrx::JsonB>(4)?.map(|j| j.0).unwrap_or_default(),
            started_by: row.get::<pg_sys::Oid>(5)?,
        }))
    })
}

/// Moves a task to `phase` and logs it, in the current transaction. A task
/// that is completed or cancelled needs its source password no more: its
/// secret goes in the same transaction.
pub fn set_phase(task_id: i64, phase: Phase, message: &str) -> SpiResult<()> {
    if matches!(phase, Phase::Completed | Phase::Cancelled) {
        super::secrets::forget_task(task_id)?;
    }
    Spi::run_with_args(
        "UPDATE cloudmig.task SET phase = $2, phase_since = pg_catalog.clock_timestamp(), \
                finished_at = CASE WHEN $2 IN ('completed', 'failed', 'cancelled') \
                                   THEN pg_catalog.clock_timestamp() END, \
                copy_started_at = CASE WHEN $2 = 'full_copy' \
                                       THEN coalesce(copy_started_at, pg_catalog.clock_timestamp()) \
                                       ELSE copy_started_at END \
          WHERE id = $1",
        &[task_id.into(), phase.as_str().into()],
    )?;
    let text = if message.is_empty() {
        phase.as_str().to_string()
    } else {
        format!("{phase}: {message}")
    };
    add_event(task_id, None, "phase", &text)
}

/// Records a failure: phase failed, the error and its hint, the phase it
/// failed in (where `cloudmig.resume` continues), the commit LSN of the
/// source transaction the apply failed on (for `cloudmig.skip`), an error event.
pub fn fail(task_id: i64, error: &str, hint: Option<&str>, lsn: Option<&str>) -> SpiResult<()> {
    Spi::run_with_args(
        "UPDATE cloudmig.task SET last_error = $2, last_error_hint = $3, \
                last_error_at = pg_catalog.clock_timestamp(), last_error_lsn = $4::pg_lsn, \
                failed_in = CASE WHEN phase = 'failed' THEN failed_in ELSE phase END, \
                outage_since = NULL, outage_attempts = 0, outage_cause = NULL, \
                outage_gives_up_at = NULL \
          WHERE id = $1",
        &[task_id.into(), error.into(), hint.into(), lsn.into()],
    )?;
    add_event(task_id, None, "error", error)?;
    set_phase(task_id, Phase::Failed, "")
}

/// Where a failed task continues, and whether it is failed at all:
/// (phase now, phase it failed in).
pub fn failure_of(task_id: i64) -> SpiResult<Option<(Phase, Option<Phase>)>> {
    Spi::connect(|client| {
        let mut rows = client.select(
            "SELECT phase, failed_in FROM cloudmig.task WHERE id = $1",
            None,
            &[task_id.into()],
        )?;
        let Some(row) = rows.next() else {
            return Ok(None);
        };
        let phase = row.get::<String>(1)?.unwrap_or_default();
        let failed_in = row.get::<String>(2)?;
        Ok(Some((
            Phase::parse(&phase).unwrap_or(Phase::Failed),
            failed_in.as_deref().and_then(Phase::parse),
        )))
    })
}

/// Puts a failed task back into the phase it failed in (`cloudmig.resume`);
/// the launcher starts its worker. A switchover that failed continues as
/// `switching_over`, which the worker turns back into `incremental` after
/// making the source writable again.
pub fn resume(task_id: i64, phase: Phase, message: &str) -> SpiResult<()> {
    Spi::run_with_args(
        "UPDATE cloudmig.task SET failed_in = NULL WHERE id = $1",
        &[task_id.into()],
    )?;
    set_phase(task_id, phase, message)
}

/// Records the source transaction (by commit LSN) the apply must skip.
pub fn set_skip_lsn(task_id: i64, lsn: Option<&str>) -> SpiResult<()> {
    Spi::run_with_args(
        "UPDATE cloudmig.task SET skip_lsn = $2::pg_lsn WHERE id = $1",
        &[task_id.into(), lsn.into()],
    )
}

/// The skip LSN of a task, as text ("0/0" for none).
pub fn skip_lsn(task_id: i64) -> SpiResult<Option<String>> {
    super::first_value::<String>(
        "SELECT skip_lsn::text FROM cloudmig.task WHERE id = $1 AND skip_lsn IS NOT NULL",
        &[task_id.into()],
    )
}

/// The outage a task rides out: shown in `cloudmig.tasks` (the event's text
/// as its last error too), and a warning event per attempt.
pub fn note_outage(
    task_id: i64,
    datname: Option<&str>,
    cause: &str,
    attempts: i32,
    seconds_left: f64,
    event: &str,
) -> SpiResult<()> {
    Spi::run_with_args(
        "UPDATE cloudmig.task SET \
                outage_since = coalesce(outage_since, pg_catalog.clock_timestamp()), \
                outage_attempts = $3, outage_cause = $2, \
                outage_gives_up_at = pg_catalog.clock_timestamp() \
                                     + pg_catalog.make_interval(secs => $4), \
                last_error = $5, last_error_hint = NULL, \
                last_error_at = pg_catalog.clock_timestamp() \
          WHERE id = $1",
        &[
            task_id.into(),
            cause.into(),
            attempts.into(),
            seconds_left.into(),
            event.into(),
        ],
    )?;
    add_event(task_id, datname, "warning", event)
}

/// Ends the outage shown for a task (the source is back), with an event.
pub fn outage_over(task_id: i64, datname: Option<&str>, event: &str) -> SpiResult<()> {
    Spi::run_with_args(
        "UPDATE cloudmig.task SET outage_since = NULL, outage_attempts = 0, \
                outage_cause = NULL, outage_gives_up_at = NULL WHERE id = $1",
        &[task_id.into()],
    )?;
    add_event(task_id, datname, "info", event)
}

/// Appends an event.
pub fn add_event(task_id: i64, datname: Option<&str>, kind: &str, message: &str) -> SpiResult<()> {
    Spi::run_with_args(
        "INSERT INTO cloudmig.events (task_id, datname, kind, message) VALUES ($1, $2, $3, $4)",
        &[task_id.into(), datname.into(), kind.into(), message.into()],
    )
}

/// Counts one more start of a task worker.
pub fn note_worker_start(task_id: i64) -> SpiResult<i32> {
    Ok(Spi::get_one_with_args::<i32>(
        "UPDATE cloudmig.task SET worker_starts = worker_starts + 1 WHERE id = $1 RETURNING worker_starts",
        &[task_id.into()],
    )?
    .unwrap_or(0))
}

/// The databases of a task, in order.
pub fn databases(task_id: i64) -> SpiResult<Vec<TaskDatabase>> {
    Spi::connect(|client| {
        client
            .select(
                "SELECT datname, state, slot_name, consistent_lsn::text FROM cloudmig.task_database \
                  WHERE task_id = $1 ORDER BY ordinal",
                None,
                &[task_id.into()],
            )?
            .map(|row| {
                Ok(TaskDatabase {
                    datname: row.get(1)?.unwrap_or_default(),
                    state: row.get(2)?.unwrap_or_default(),
                    slot_name: row.get(3)?.unwrap_or_default(),
                    consistent_lsn: row.get(4)?,
                })
            })
            .collect()
    })
}

/// Records a database's progress (and, once its slot exists, where it starts).
pub fn set_database_state(
    task_id: i64,
    datname: &str,
    state: &str,
    consistent_lsn: Option<&str>,
) -> SpiResult<()> {
    Spi::run_with_args(
        "UPDATE cloudmig.task_database SET state = $3, \
                consistent_lsn = coalesce($4::pg_lsn, consistent_lsn) \
          WHERE task_id = $1 AND datname = $2",
        &[
            task_id.into(),
            datname.into(),
            state.into(),
            consistent_lsn.into(),
        ],
    )
}

/// Stores the copy plan of a database (idempotent: planned tables stay).
pub fn plan_tables(task_id: i64, datname: &str, tables: &[PlannedTable]) -> SpiResult<()> {
    for table in tables {
        Spi::run_with_args(
            "INSERT INTO cloudmig.table_copy \
                    (task_id, datname, schema_name, table_name, bytes_total, rows_estimated, extension_config) \
             VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT DO NOTHING",
            &[
                task_id.into(),
                datname.into(),
                table.schema_name.as_str().into(),
                table.table_name.as_str().into(),
                table.bytes_total.into(),
                table.rows_estimated.into(),
                table.extension_config.into(),
            ],
        )?;
    }
    Ok(())
}

/// Tables of a database not yet copied or not yet indexed, largest first.
pub fn tables_to_copy(task_id: i64, datname: &str) -> SpiResult<Vec<TableCopy>> {
    Spi::connect(|client| {
        client
            .select(
                "SELECT datname, schema_name, table_name, state, extension_config FROM cloudmig.table_copy \
                  WHERE task_id = $1 AND datname = $2 AND state IN ('pending', 'copying', 'copied') \
                  ORDER BY bytes_total DESC, schema_name, table_name",
                None,
                &[task_id.into(), datname.into()],
            )?
            .map(|row| {
                Ok(TableCopy {
                    datname: row.get(1)?.unwrap_or_default(),
                    schema_name: row.get(2)?.unwrap_or_default(),
                    table_name: row.get(3)?.unwrap_or_default(),
                    state: row.get(4)?.unwrap_or_default(),
                    extension_config: row.get(5)?.unwrap_or_default(),
                })
            })
            .collect()
    })
}

/// The (schema, table) of every table planned for copy in a database.
pub fn table_names(
    task_id: i64,
    datname: &str,
) -> SpiResult<std::collections::HashSet<(String, String)>> {
    Spi::connect(|client| {
        client
            .select(
                "SELECT schema_name, table_name FROM cloudmig.table_copy \
                  WHERE task_id = $1 AND datname = $2",
                None,
                &[task_id.into(), datname.into()],
            )?
            .map(|row| {
                Ok((
                    row.get::<String>(1)?.unwrap_or_default(),
                    row.get::<String>(2)?.unwrap_or_default(),
                ))
            })
            .collect()
    })
}

/// A table's copy started (at the snapshot of `sync_lsn`).
pub fn mark_copying(task_id: i64, table: &TableCopy, sync_lsn: &str) -> SpiResult<()> {
    Spi::run_with_args(
        "UPDATE cloudmig.table_copy SET state = 'copying', sync_lsn = $5::pg_lsn, rows_copied = 0, \
                bytes_copied = 0, started_at = pg_catalog.clock_timestamp(), finished_at = NULL \
          WHERE task_id = $1 AND datname = $2 AND schema_name = $3 AND table_name = $4",
        &[
            task_id.into(),
            table.datname.as_str().into(),
            table.schema_name.as_str().into(),
            table.table_name.as_str().into(),
            sync_lsn.into(),
        ],
    )
}

/// A table's copy committed here.
pub fn mark_copied(task_id: i64, table: &TableCopy, rows: i64, bytes: i64) -> SpiResult<()> {
    Spi::run_with_args(
        "UPDATE cloudmig.table_copy SET state = 'copied', rows_copied = $5, bytes_copied = $6, \
                finished_at = pg_catalog.clock_timestamp() \
          WHERE task_id = $1 AND datname = $2 AND schema_name = $3 AND table_name = $4",
        &[
            task_id.into(),
            table.datname.as_str().into(),
            table.schema_name.as_str().into(),
            table.table_name.as_str().into(),
            rows.into(),
            bytes.into(),
        ],
    )
}

/// A table's own indexes and constraints are being built.
pub fn mark_indexing(task_id: i64, table: &TableCopy) -> SpiResult<()> {
    Spi::run_with_args(
        "UPDATE cloudmig.table_copy SET indexes_started_at = pg_catalog.clock_timestamp(), \
                indexes_finished_at = NULL \
          WHERE task_id = $1 AND datname = $2 AND schema_name = $3 AND table_name = $4",
        &[
            task_id.into(),
            table.datname.as_str().into(),
            table.schema_name.as_str().into(),
            table.table_name.as_str().into(),
        ],
    )
}

/// A copied table's own indexes and constraints committed here (or it has
/// none: then they took no time).
pub fn mark_table_indexed(task_id: i64, table: &TableCopy) -> SpiResult<()> {
    Spi::run_with_args(
        "UPDATE cloudmig.table_copy SET state = 'indexed', \
                indexes_finished_at = pg_catalog.clock_timestamp(), \
                indexes_started_at = coalesce(indexes_started_at, pg_catalog.clock_timestamp()) \
          WHERE task_id = $1 AND datname = $2 AND schema_name = $3 AND table_name = $4",
        &[
            task_id.into(),
            table.datname.as_str().into(),
            table.schema_name.as_str().into(),
            table.table_name.as_str().into(),
        ],
    )
}

/// After post-data, every copied table of a database has its indexes.
pub fn mark_indexed(task_id: i64, datname: &str) -> SpiResult<()> {
    Spi::run_with_args(
        "UPDATE cloudmig.table_copy SET state = 'indexed' \
          WHERE task_id = $1 AND datname = $2 AND state = 'copied'",
        &[task_id.into(), datname.into()],
    )
}
