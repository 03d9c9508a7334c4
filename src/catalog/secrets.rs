//! `cloudmig.source_secret`: the source conninfo with its password, readable
//! by the extension owner only.
//!
//! Lifetime of a row:
//!
//! ```text
//! assess() --> stored (task_id NULL) --start()--> owned by the task --completed/cancelled--> deleted
//!                   \--cloudmig.secret_retention passes (launcher)--> deleted
//! ```
//!
//! The deletion on completion or cancellation happens in the transaction that
//! sets that phase ([`super::tasks::set_phase`]), so no finished task keeps a
//! password. Callers run these as the extension owner (API) or as the
//! bootstrap superuser (workers).

use pgrx::prelude::*;

type SpiResult<T> = Result<T, pgrx::spi::Error>;

/// Stores the secret of a new assessment.
pub fn store(assessment_id: i64, conninfo: &str) -> SpiResult<()> {
    Spi::run_with_args(
        "INSERT INTO cloudmig.source_secret (assessment_id, conninfo) VALUES ($1, $2)",
        &[assessment_id.into(), conninfo.into()],
    )
}

/// The secret of an assessment no task has taken yet, unless it is older
/// than `retention_seconds` (the launcher may not have removed it yet).
pub fn of_unstarted_assessment(
    assessment_id: i64,
    retention_seconds: i64,
) -> SpiResult<Option<String>> {
    super::first_value::<String>(
        "SELECT conninfo FROM cloudmig.source_secret \
          WHERE assessment_id = $1 AND task_id IS NULL \
            AND stored_at >= pg_catalog.clock_timestamp() - pg_catalog.make_interval(secs => $2)",
        &[assessment_id.into(), (retention_seconds as f64).into()],
    )
}

/// Hands the secret of an assessment to the task started from it.
pub fn give_to_task(assessment_id: i64, task_id: i64) -> SpiResult<()> {
    Spi::run_with_args(
        "UPDATE cloudmig.source_secret SET task_id = $2 WHERE assessment_id = $1",
        &[assessment_id.into(), task_id.into()],
    )
}

/// The secret of a task; None once it was removed.
pub fn of_task(task_id: i64) -> SpiResult<Option<String>> {
    super::first_value::<String>(
        "SELECT conninfo FROM cloudmig.source_secret WHERE task_id = $1",
        &[task_id.into()],
    )
}

/// Replaces the secret of a task (`cloudmig.set_source_password`); false
/// when the task has none.
pub fn replace_for_task(task_id: i64, conninfo: &str) -> SpiResult<bool> {
    Ok(super::first_value::<i64>(
        "UPDATE cloudmig.source_secret SET conninfo = $2, stored_at = pg_catalog.clock_timestamp() \
          WHERE task_id = $1 RETURNING task_id",
        &[task_id.into(), conninfo.into()],
    )?
    .is_some())
}

/// Removes the secret of a task that no longer needs it.
pub fn forget_task(task_id: i64) -> SpiResult<()> {
    Spi::run_with_args(
        "DELETE FROM cloudmig.source_secret WHERE task_id = $1",
        &[task_id.into()],
    )
}

/// Removes the secrets of assessments not started within `retention_seconds`,
/// and any left by a finished task; returns how many went.
pub fn purge(retention_seconds: i64) -> SpiResult<i64> {
    Ok(super::first_value::<i64>(
        "WITH gone AS ( \
             DELETE FROM cloudmig.source_secret s \
              WHERE (s.task_id IS NULL \
                     AND s.stored_at < pg_catalog.clock_timestamp() \
                                       - pg_catalog.make_interval(secs => $1)) \
                 OR s.task_id IN (SELECT t.id FROM cloudmig.task t \
                                   WHERE t.phase IN ('completed', 'cancelled')) \
             RETURNING 1) \
         SELECT pg_catalog.count(*) FROM gone",
        &[(retention_seconds as f64).into()],
    )?
    .unwrap_or(0))
}
