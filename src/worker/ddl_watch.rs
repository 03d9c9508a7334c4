//! What the task worker does about DDL on the source while it follows the
//! apply (catch-up and incremental):
//!
//! * it records each pause of a database's apply (`worker::shape_pause`) in
//!   `cloudmig.schema_drift`, the events and the task's last error and hint,
//!   and notes when the apply continues;
//! * with a table-list publication (a non-superuser migration account cannot
//!   publish FOR ALL TABLES), it looks every few seconds for source tables the
//!   publication does not carry: tables created after it. Such a table is
//!   never silently left out: it is recorded as not migrated, with what to do.
//!
//! Why not add such a table to the publication: pgoutput decides what to
//! send with the catalog as of each change, so the rows written between the
//! CREATE TABLE and an ALTER PUBLICATION ADD TABLE would never be streamed;
//! adding it would migrate part of the table and look complete. Carrying it
//! correctly needs a copy at a snapshot of its own (a `sync_lsn`), which
//! tasks do not do once streaming.

use super::jobs::Stop;
use super::shared::{ApplySlot, APPLY};
use super::task::Runner;
use super::txn::{self, Failure};
use crate::catalog::schema_drift;
use crate::catalog::tasks::{self, TaskDatabase};
use crate::source::{quote_literal, Lsn};
use std::collections::HashSet;
use std::time::{Duration, Instant};

/// How often the source is asked for tables the publication leaves out.
const PUBLICATION_CHECK_INTERVAL: Duration = Duration::from_secs(10);

/// What the follow loop already reported.
pub(super) struct DdlWatch {
    /// Per apply slot: the pause count last recorded, and whether paused.
    recorded: Vec<(u32, bool)>,
    /// The first look waits one interval: the follow loop's first seconds
    /// measure the apply's pace, which a switchover needs.
    last_publication_check: Instant,
    /// Databases whose publication is FOR ALL TABLES: nothing to look for.
    all_tables: HashSet<String>,
    started: bool,
}

impl DdlWatch {
    pub(super) fn new(databases: usize) -> Self {
        Self {
            recorded: vec![(0, false); databases],
            last_publication_check: Instant::now(),
            all_tables: HashSet::new(),
            started: false,
        }
    }
}

/// The tables a table-list publication `publication` does not carry (none
/// when it is FOR ALL TABLES).
fn unpublished_tables_sql(publication: &str) -> String {
    let publication = quote_literal(publication);
    format!(
        "SELECT t.name FROM (\n{}\n) t \
           JOIN pg_catalog.pg_publication p ON p.pubname = {publication} \
          WHERE NOT p.puballtables \
            AND t.name NOT IN (SELECT pg_catalog.format('%I.%I', schemaname, tablename) \
                                 FROM pg_catalog.pg_publication_tables \
                                WHERE pubname = {publication})",
        crate::copy::PUBLISHABLE_TABLES_SQL
    )
}

/// Why a switchover may not start: a database's apply waits for DDL here,
/// so its changes since could not be drained.
pub(super) fn paused_refusal(databases: &[TaskDatabase]) -> Option<Failure> {
    let slots = APPLY.share();
    let (index, slot) = slots
        .iter()
        .take(databases.len())
        .enumerate()
        .find(|(_, slot)| slot.paused)?;
    Some(Failure::with_hint(
        format!(
            "the apply of database {} is paused at {}: {}",
            databases[index].datname,
            slot.pause_relation.get(),
            slot.pause_difference.get()
        ),
        format!("{}, then switch over", slot.pause_hint.get()),
    ))
}

impl Runner {
    /// One step of the watch; called by the follow loop, which says whether
    /// the source answered its last poll (the publications are not looked at
    /// while it does not: each try would wait for the connect timeout).
    pub(super) fn watch_ddl(
        &self,
        databases: &[TaskDatabase],
        watch: &mut DdlWatch,
        source_reachable: bool,
    ) -> Result<(), Stop> {
        let task_id = self.task.id;
        if !watch.started {
            txn::spi(|| schema_drift::forget_pauses(task_id))?;
            watch.started = true;
        }
        let slots: Vec<ApplySlot> = APPLY
            .share()
            .iter()
            .take(databases.len())
            .copied()
            .collect();
        for (index, slot) in slots.iter().enumerate() {
            let Some(recorded) = watch.recorded.get_mut(index) else {
                continue;
            };
            let datname = &databases[index].datname;
            if slot.paused && slot.pause_count != recorded.0 {
                let lsn = (slot.pause_lsn != 0).then(|| Lsn(slot.pause_lsn).to_string());
                txn::spi(|| {
                    schema_drift::record_pause(
                        task_id,
                        datname,
                        &slot.pause_relation.get(),
                        &slot.pause_difference.get(),
                        &slot.pause_hint.get(),
                        lsn.as_deref(),
                    )
                })?;
                *recorded = (slot.pause_count, true);
            } else if !slot.paused && recorded.1 {
                txn::spi(|| schema_drift::clear_pause(task_id, datname))?;
                recorded.1 = false;
            }
        }
        if source_reachable && watch.last_publication_check.elapsed() >= PUBLICATION_CHECK_INTERVAL
        {
            watch.last_publication_check = Instant::now();
            for database in databases {
                if !watch.all_tables.contains(&database.datname)
                    && self.check_publication(&database.datname)?
                {
                    watch.all_tables.insert(database.datname.clone());
                }
            }
        }
        Ok(())
    }

    /// Records the tables of `datname` the task's publication leaves out;
    /// true when it is FOR ALL TABLES (nothing to look for again). An
    /// unreachable source is not this check's business (the apply reports
    /// it): it tries again next time.
    fn check_publication(&self, datname: &str) -> Result<bool, Stop> {
        let task_id = self.task.id;
        let Ok(mut connection) = self.connect(datname, false) else {
            return Ok(false);
        };
        let publication = tasks::publication_name(task_id);
        let all_tables = connection.simple_query(&format!(
            "SELECT 1 FROM pg_catalog.pg_publication WHERE pubname = {} AND puballtables",
            quote_literal(&publication)
        ));
        if all_tables.as_ref().is_ok_and(|rows| !rows.is_empty()) {
            connection.close();
            return Ok(true);
        }
        let rows = connection.simple_query(&unpublished_tables_sql(&publication));
        connection.close();
        let Ok(rows) = rows else {
            return Ok(false);
        };
        for row in &rows {
            let Some(name) = row.get("name") else {
                continue;
            };
            let hint = format!(
                "its rows are not migrated (or only as the copy saw them): copy the table yourself \
                 after the switchover (pg_dump --table={name} on the source), or cancel this task \
                 and start a new one, which publishes it; a superuser migration account publishes \
                 FOR ALL TABLES, where a new table pauses the apply until it is created here"
            );
            txn::spi(|| {
                schema_drift::record_not_published(
                    task_id,
                    datname,
                    name,
                    &format!(
                        "is not in publication {publication} (created after it): its changes are \
                         not streamed"
                    ),
                    &hint,
                )
            })?;
        }
        Ok(false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_publication_name_is_quoted_as_a_literal() {
        let sql = unpublished_tables_sql("cloudmig_7");
        assert!(sql.contains("p.pubname = 'cloudmig_7'"));
        assert!(sql.contains("ORDER BY 1\n\n) t JOIN"), "{sql}");
    }
}
