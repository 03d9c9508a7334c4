//! `cloudmig.status()`, behind the `cloudmig.instance_status` view: what this
//! instance is doing right now, as the managed service shows it: `idle`,
//! `assessing`, `migrating` (a task copies or applies), or `failed` (a task
//! stopped on an error and waits for `cloudmig.resume()`, `cloudmig.skip()` or
//! `cloudmig.cancel()`).

use crate::worker::shared;
use pgrx::prelude::*;

/// One row: the state, the backend or task doing it, since when.
// pgrx spells a SQL table's columns as a tuple of named types.
#[allow(clippy::type_complexity)]
#[pg_extern(volatile, parallel_unsafe)]
fn status() -> TableIterator<
    'static,
    (
        name!(state, String),
        name!(pid, Option<i32>),
        name!(task_id, Option<i64>),
        name!(phase, Option<String>),
        name!(since, Option<TimestampWithTimeZone>),
    ),
> {
    if let Some(activity) = shared::current_assessment() {
        return TableIterator::once((
            "assessing".to_string(),
            Some(activity.pid),
            None,
            None,
            TimestampWithTimeZone::try_from(activity.started_at).ok(),
        ));
    }
    let task = Spi::connect(|client| {
        let mut rows = client.select(
            "SELECT id, phase, phase_since FROM cloudmig.task WHERE phase NOT IN ('completed', 'cancelled') ORDER BY id LIMIT 1",
            None,
            &[],
        )?;
        let Some(row) = rows.next() else { return Ok::<_, pgrx::spi::Error>(None) };
        Ok(Some((
            row.get::<i64>(1)?.unwrap_or_default(),
            row.get::<String>(2)?.unwrap_or_default(),
            row.get::<TimestampWithTimeZone>(3)?,
        )))
    })
    .ok()
    .flatten();
    let row = match task {
        Some((id, phase, since)) => (
            if phase == "failed" {
                "failed"
            } else {
                "migrating"
            }
            .to_string(),
            shared::task_worker_pid(id),
            Some(id),
            Some(phase),
            since,
        ),
        None => ("idle".to_string(), None, None, None, None),
    };
    TableIterator::once(row)
}
