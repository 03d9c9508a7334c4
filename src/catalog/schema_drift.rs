//! `cloudmig.schema_drift`: the source tables whose DDL a running task waits
//! for (a paused apply) or does not carry (left out of a table-list
//! publication). Each record also goes to the events and, while it needs a
//! DBA, to the task's last error and hint (the `cloudmig.tasks` view).

use super::tasks::add_event;
use pgrx::prelude::*;

type SpiResult<T> = Result<T, pgrx::spi::Error>;

/// Kind of a row: the apply of the database waits for DDL here.
const APPLY_PAUSED: &str = "apply_paused";
/// Kind of a row: the table is not in the task's publication.
const NOT_PUBLISHED: &str = "not_published";

fn note_on_task(task_id: i64, error: &str, hint: &str) -> SpiResult<()> {
    Spi::run_with_args(
        "UPDATE cloudmig.task SET last_error = $2, last_error_hint = $3, \
                last_error_at = pg_catalog.clock_timestamp() WHERE id = $1",
        &[task_id.into(), error.into(), hint.into()],
    )
}

/// Records that the apply of `datname` paused at `relation`.
pub fn record_pause(
    task_id: i64,
    datname: &str,
    relation: &str,
    difference: &str,
    hint: &str,
    waiting_lsn: Option<&str>,
) -> SpiResult<()> {
    Spi::run_with_args(
        "DELETE FROM cloudmig.schema_drift WHERE task_id = $1 AND datname = $2 AND kind = $3",
        &[task_id.into(), datname.into(), APPLY_PAUSED.into()],
    )?;
    Spi::run_with_args(
        "INSERT INTO cloudmig.schema_drift (task_id, datname, relation, kind, detail, hint, waiting_lsn) \
         VALUES ($1, $2, $3, $4, $5, $6, $7::pg_lsn)",
        &[
            task_id.into(),
            datname.into(),
            relation.into(),
            APPLY_PAUSED.into(),
            difference.into(),
            hint.into(),
            waiting_lsn.into(),
        ],
    )?;
    let message = format!(
        "{}{relation}: {difference}{}",
        pause_prefix(datname),
        waiting_lsn
            .map(|lsn| format!(" (the transaction committing at {lsn} waits)"))
            .unwrap_or_default()
    );
    note_on_task(task_id, &message, hint)?;
    add_event(
        task_id,
        Some(datname),
        "warning",
        &format!("{message}; {hint}"),
    )
}

/// Records that the apply of `datname` continues.
pub fn clear_pause(task_id: i64, datname: &str) -> SpiResult<()> {
    let relations: Vec<String> = Spi::connect_mut(|client| {
        client
            .update(
                "DELETE FROM cloudmig.schema_drift WHERE task_id = $1 AND datname = $2 AND kind = $3 \
                 RETURNING relation",
                None,
                &[task_id.into(), datname.into(), APPLY_PAUSED.into()],
            )?
            .map(|row| Ok(row.get::<String>(1)?.unwrap_or_default()))
            .collect::<SpiResult<Vec<String>>>()
    })?;
    // The pause is over: the task's last error no longer stands if it is
    // this pause (a later, other error stays).
    Spi::run_with_args(
        "UPDATE cloudmig.task SET last_error = NULL, last_error_hint = NULL, last_error_at = NULL \
          WHERE id = $1 AND starts_with(last_error, $2)",
        &[task_id.into(), pause_prefix(datname).as_str().into()],
    )?;
    add_event(
        task_id,
        Some(datname),
        "info",
        &format!(
            "apply of database {datname} continues: {} changed here",
            relations.join(", ")
        ),
    )
}

/// How the message of a pause of `datname` begins.
fn pause_prefix(datname: &str) -> String {
    format!("apply of database {datname} paused at ")
}

/// Forgets the pauses of an earlier task worker (a new one records them
/// again when its apply workers meet the same change).
pub fn forget_pauses(task_id: i64) -> SpiResult<()> {
    Spi::run_with_args(
        "DELETE FROM cloudmig.schema_drift WHERE task_id = $1 AND kind = $2",
        &[task_id.into(), APPLY_PAUSED.into()],
    )
}

/// Records a table the publication does not carry; true the first time.
pub fn record_not_published(
    task_id: i64,
    datname: &str,
    relation: &str,
    detail: &str,
    hint: &str,
) -> SpiResult<bool> {
    let inserted = Spi::get_one_with_args::<bool>(
        "WITH inserted AS (\
             INSERT INTO cloudmig.schema_drift (task_id, datname, relation, kind, detail, hint) \
             VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT DO NOTHING RETURNING 1) \
         SELECT count(*) > 0 FROM inserted",
        &[
            task_id.into(),
            datname.into(),
            relation.into(),
            NOT_PUBLISHED.into(),
            detail.into(),
            hint.into(),
        ],
    )?
    .unwrap_or(false);
    if inserted {
        let message = format!("database {datname}: {relation} {detail}");
        note_on_task(task_id, &message, hint)?;
        add_event(
            task_id,
            Some(datname),
            "warning",
            &format!("{message}; {hint}"),
        )?;
    }
    Ok(inserted)
}
