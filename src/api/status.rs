//! `cloudmig.status()`, behind the `cloudmig.instance_status` view: what this
//! instance is doing right now, as the managed service shows it ("idle",
//! "assessing"; later "migrating", ...).

use crate::worker::shared;
use pgrx::prelude::*;

/// One row: the state, the backend doing it, since when.
#[pg_extern(volatile, parallel_unsafe)]
fn status() -> TableIterator<
    'static,
    (
        name!(state, String),
        name!(pid, Option<i32>),
        name!(since, Option<TimestampWithTimeZone>),
    ),
> {
    let row = match shared::current_assessment() {
        Some(activity) => (
            "assessing".to_string(),
            Some(activity.pid),
            TimestampWithTimeZone::try_from(activity.started_at).ok(),
        ),
        None => ("idle".to_string(), None, None),
    };
    TableIterator::once(row)
}
