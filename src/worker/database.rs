//! The database worker: connected to one database of this instance, it runs
//! the jobs the task worker hands it through its shared-memory slot (see
//! [`super::jobs`]): apply a schema script, copy a table, sequences, large
//! objects, refresh materialized views. Every job is one local transaction.

use super::shared::{self, JobKind, JobState, JOBS, TASK};
use super::txn::{self, Failure};
use crate::copy::{into_table, objects};
use crate::schema::{execute, script};
use crate::source::{quote_ident, quote_literal, ConnInfo, ConnectOptions, Connection};
use pgrx::bgworkers::{BackgroundWorker, SignalWakeFlags};
use pgrx::prelude::*;
use std::collections::HashMap;
use std::time::Duration;

/// A source session inside a snapshot, kept across jobs that share it.
struct Session {
    snapshot: String,
    connection: Connection,
}

/// The column lists of a database's tables (see `crate::copy::TableColumns`),
/// read once from the file the task worker wrote with its plan.
type ColumnLists = HashMap<(String, String), Vec<String>>;

/// The last column file read, by path.
#[derive(Default)]
struct ColumnCache(Option<(String, ColumnLists)>);

impl ColumnCache {
    /// The columns of `schema.table` per the file at `path`; None when the
    /// file does not list it (or there is none), and the source is asked.
    fn get(
        &mut self,
        path: &str,
        schema: &str,
        table: &str,
    ) -> Result<Option<Vec<String>>, Failure> {
        if path.is_empty() {
            return Ok(None);
        }
        if self.0.as_ref().is_none_or(|(cached, _)| cached != path) {
            let text = std::fs::read_to_string(path)
                .map_err(|e| Failure::new(format!("could not read {path}: {e}")))?;
            let lists = crate::copy::parse_columns(&text)
                .map_err(|e| Failure::new(format!("could not read {path}: {e}")))?;
            self.0 = Some((path.to_string(), lists));
        }
        Ok(self
            .0
            .as_ref()
            .and_then(|(_, lists)| lists.get(&(schema.to_string(), table.to_string())))
            .cloned())
    }
}

#[pg_guard]
#[no_mangle]
pub extern "C-unwind" fn cloudmig_database_main(arg: pg_sys::Datum) {
    BackgroundWorker::attach_signal_handlers(SignalWakeFlags::SIGHUP | SignalWakeFlags::SIGTERM);
    let index = arg.value();
    let database = match JOBS.share().get(index) {
        Some(slot) => slot.database.get(),
        None => return,
    };
    let task_id = JOBS.share()[index].task_id;
    txn::serve_task(task_id);
    BackgroundWorker::connect_worker_to_spi(Some(&database), None);
    // SAFETY: MyProcPid is set at process start.
    let my_pid = unsafe { pg_sys::MyProcPid };
    JOBS.exclusive()[index].worker_pid = my_pid;
    let mut session: Option<Session> = None;
    let mut columns = ColumnCache::default();
    while !txn::shutdown_requested() {
        let job = {
            let mut slots = JOBS.exclusive();
            let slot = &mut slots[index];
            match slot.state {
                JobState::Exit => break,
                JobState::Assigned => {
                    slot.state = JobState::Running;
                    Some(*slot)
                }
                _ => None,
            }
        };
        let Some(job) = job else {
            // Short: a job is often handed over just after this worker started.
            txn::nap(Duration::from_millis(100));
            continue;
        };
        let result = run_job(index, &database, &job, &mut session, &mut columns);
        let task_pid = {
            let mut slots = JOBS.exclusive();
            let slot = &mut slots[index];
            match &result {
                Ok(()) => slot.state = JobState::Done,
                Err(failure) => {
                    slot.error.set(&failure.message);
                    slot.transient = failure.transient;
                    slot.state = JobState::Failed;
                }
            }
            TASK.share().worker_pid
        };
        if result.is_err() {
            // The source session may be mid-COPY: start afresh next time.
            session = None;
        }
        shared::wake(task_pid);
    }
}

fn source_info(database: &str) -> Result<ConnInfo, Failure> {
    let conninfo = TASK.share().conninfo.get();
    ConnInfo::parse(&conninfo)
        .map(|info| info.with_dbname(database))
        .map_err(|e| Failure::new(format!("invalid source connection string: {e}")))
}

/// A source connection in `snapshot` (or in a plain read-only transaction
/// when it is empty), with row security off so a policy cannot hide rows.
fn open_session(database: &str, snapshot: &str) -> Result<Session, Failure> {
    let info = source_info(database)?;
    let mut options = ConnectOptions::new();
    options.interrupt_check = Some(Box::new(txn::interrupt_check));
    options.io_timeout = crate::guc::source_timeout();
    let mut connection = Connection::connect(&info, options).map_err(source_failure)?;
    let mut setup = vec!["BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY".to_string()];
    if !snapshot.is_empty() {
        setup.push(format!(
            "SET TRANSACTION SNAPSHOT {}",
            quote_literal(snapshot)
        ));
    }
    setup.extend(
        [
            "SET LOCAL row_security = off",
            "SET LOCAL statement_timeout = 0",
            "SET LOCAL lock_timeout = 0",
        ]
        .map(str::to_string),
    );
    // One exchange for all of it: over a distant link each costs a round trip.
    connection
        .execute(&setup.join("; "))
        .map_err(source_failure)?;
    Ok(Session {
        snapshot: snapshot.to_string(),
        connection,
    })
}

/// A failure copying sequences, large objects or refreshing materialized
/// views; one that comes from losing the source stays transient, so the task
/// worker retries instead of failing the task.
fn objects_failure(error: crate::copy::objects::ObjectsError) -> Failure {
    match error {
        crate::copy::objects::ObjectsError::Source(error) => source_failure(error),
        other => Failure::new(other.to_string()),
    }
}

fn source_failure(error: crate::source::SourceError) -> Failure {
    Failure::from_source("", &error)
}

fn session_for<'s>(
    session: &'s mut Option<Session>,
    database: &str,
    snapshot: &str,
) -> Result<&'s mut Connection, Failure> {
    if session.as_ref().is_none_or(|s| s.snapshot != snapshot) {
        *session = Some(open_session(database, snapshot)?);
    }
    match session.as_mut() {
        Some(session) => Ok(&mut session.connection),
        None => Err(Failure::new("no source session")),
    }
}

fn run_job(
    index: usize,
    database: &str,
    job: &shared::JobSlot,
    session: &mut Option<Session>,
    columns: &mut ColumnCache,
) -> Result<(), Failure> {
    let snapshot = job.snapshot.get();
    match job.kind {
        JobKind::ApplyScript | JobKind::TableIndexes => {
            let path = job.path.get();
            let sql = std::fs::read_to_string(&path)
                .map_err(|e| Failure::new(format!("could not read {path}: {e}")))?;
            let steps = script::steps(&sql)
                .map_err(|e| Failure::with_hint(format!("schema script refused: {e}"), e.hint()))?;
            let applied = txn::run(|| Ok(execute::steps_as_owners(&steps, job.caller)));
            let skipped = match applied {
                // The attempt that died had applied it (see JobSlot::resuming).
                Err(failure) if job.resuming && failure.is_duplicate_object() => {
                    pgrx::log!("cloudmig: {path} was applied before the task resumed ({failure})");
                    Vec::new()
                }
                other => other?,
            };
            write_skipped(&path, &skipped)
        }
        JobKind::CopyTable => {
            let (schema, table) = (job.schema.get(), job.table.get());
            let listed = columns.get(&job.path.get(), &schema, &table)?;
            let connection = session_for(session, database, &snapshot)?;
            let script = job.script.get();
            let indexes = if script.is_empty() {
                None
            } else {
                let sql = std::fs::read_to_string(&script)
                    .map_err(|e| Failure::new(format!("could not read {script}: {e}")))?;
                Some(script::steps(&sql).map_err(|e| {
                    Failure::with_hint(format!("schema script refused: {e}"), e.hint())
                })?)
            };
            let skipped = copy_table(
                index,
                connection,
                &schema,
                &table,
                listed,
                job.truncate_first,
                indexes.as_deref().map(|steps| (steps, job.caller)),
            )?;
            if !script.is_empty() {
                write_skipped(&script, &skipped)?;
            }
            Ok(())
        }
        JobKind::CopySequences => {
            let connection = session_for(session, database, &snapshot)?;
            txn::run(|| {
                objects::copy_sequences(connection)
                    .map(|_| ())
                    .map_err(objects_failure)
            })
        }
        JobKind::CopyLargeObjects => {
            let connection = session_for(session, database, &snapshot)?;
            // With a path: what was copied, for the switchover's pass inside
            // its window to compare with.
            let path = job.path.get();
            let (objects, counts) = txn::run(|| {
                objects::copy_large_objects(connection, !path.is_empty()).map_err(objects_failure)
            })?;
            if path.is_empty() {
                return Ok(());
            }
            let pass = objects::LargeObjectPass { objects, counts };
            let text = serde_json::to_string(&pass).map_err(|e| Failure::new(e.to_string()))?;
            std::fs::write(&path, text)
                .map_err(|e| Failure::new(format!("could not write {path}: {e}")))
        }
        JobKind::CopyMaterializedViews => {
            let connection = session_for(session, database, &snapshot)?;
            // With a path: only the views it lists (JSON, [schema, name]s).
            let path = job.path.get();
            let only: Option<Vec<(String, String)>> = if path.is_empty() {
                None
            } else {
                let text = std::fs::read_to_string(&path)
                    .map_err(|e| Failure::new(format!("could not read {path}: {e}")))?;
                Some(
                    serde_json::from_str(&text)
                        .map_err(|e| Failure::new(format!("{path}: {e}")))?,
                )
            };
            let lost = std::cell::RefCell::new(None);
            txn::run(|| {
                objects::copy_materialized_views(connection, job.caller, only.as_deref(), &lost)
                    .map(|_| ())
                    .map_err(objects_failure)
            })
            .map_err(|failure| match lost.into_inner().map(source_failure) {
                Some(source) if source.transient => source,
                _ => failure,
            })
        }
        JobKind::CountRows => count_rows(&job.path.get(), job.checksums),
        JobKind::ApplyObjects => {
            let path = job.path.get();
            let text = std::fs::read_to_string(&path)
                .map_err(|e| Failure::new(format!("could not read {path}: {e}")))?;
            txn::run(|| {
                for line in text.lines().filter(|line| !line.is_empty()) {
                    let object: objects::SourceObject = serde_json::from_str(line)
                        .map_err(|e| Failure::new(format!("{path}: {e}")))?;
                    objects::apply(&object, job.caller).map_err(|e| Failure::new(e.to_string()))?;
                }
                Ok(())
            })
        }
        JobKind::None => Ok(()),
    }
}

/// Lists what applying the script at `script_path` left out, for the task
/// worker's events (this worker cannot reach the catalog).
fn write_skipped(script_path: &str, skipped: &[execute::Skipped]) -> Result<(), Failure> {
    let lines: String = skipped.iter().map(|s| s.message() + "\n").collect();
    std::fs::write(skipped_path(script_path), lines).map_err(|e| {
        Failure::new(format!(
            "could not write {}: {e}",
            skipped_path(script_path)
        ))
    })
}

/// Where an ApplyScript job lists the statements it left out, one event
/// line each.
pub fn skipped_path(script_path: &str) -> String {
    format!("{script_path}.skipped")
}

/// Copies one table: its rows at the session's snapshot replace whatever an
/// interrupted earlier attempt left (`truncate_first`, also an extension's
/// defaults), in one local transaction. An empty table is truncated too: that
/// costs a new empty file, and a table truncated in the transaction of the
/// COPY takes its rows frozen (see `into_table::copy_into`). A table that is
/// not empty otherwise keeps its rows: code of the migrated schema that ran
/// here (an index expression of another table writing into it) put them.
/// `indexes` (a small table's own index script and the role it runs for)
/// runs in the same transaction, after the rows: what it left out is
/// returned.
fn copy_table(
    index: usize,
    connection: &mut Connection,
    schema: &str,
    table: &str,
    listed: Option<Vec<String>>,
    truncate_first: bool,
    indexes: Option<(&[script::Step], pg_sys::Oid)>,
) -> Result<Vec<execute::Skipped>, Failure> {
    let qualified = format!("{}.{}", quote_ident(schema), quote_ident(table));
    let columns: Vec<String> = match listed {
        Some(columns) => columns,
        // Not in the plan's list: asked here, in the session's snapshot.
        None => connection
            .simple_query(&format!(
                "SELECT attname FROM pg_catalog.pg_attribute \
                  WHERE attrelid = {}::regclass AND attnum > 0 AND NOT attisdropped \
                    AND attgenerated = '' ORDER BY attnum",
                quote_literal(&qualified)
            ))
            .map_err(source_failure)?
            .iter()
            .filter_map(|row| row.get("attname").map(str::to_string))
            .collect(),
    };
    let column_list = if columns.is_empty() {
        String::new()
    } else {
        format!(
            " ({})",
            columns
                .iter()
                .map(|c| quote_ident(c))
                .collect::<Vec<_>>()
                .join(", ")
        )
    };
    // The source lost mid-COPY (a restart, the network) surfaces as an ERROR
    // of the local COPY; keep the source's own error so the task retries it
    // as the outage it is.
    let lost: std::cell::RefCell<Option<Failure>> = std::cell::RefCell::new(None);
    let copied = txn::run(|| {
        // Locked first, so no row can come between the look and the TRUNCATE.
        execute::run_utf8(&format!(
            "LOCK TABLE ONLY {qualified} IN ACCESS EXCLUSIVE MODE"
        ))
        .map_err(|e| Failure::new(e.to_string()))?;
        if truncate_first || is_empty(&qualified)? {
            execute::run_utf8(&format!("TRUNCATE ONLY {qualified}"))
                .map_err(|e| Failure::new(e.to_string()))?;
        }
        let mut copy = connection
            .copy_out(&format!("COPY {qualified}{column_list} TO STDOUT"))
            .map_err(source_failure)?;
        let mut next = || {
            copy.next_chunk().map_err(|e| {
                let text = e.to_string();
                *lost.borrow_mut() = Some(source_failure(e));
                text
            })
        };
        let mut progress = |rows: u64, bytes: u64| {
            let mut slots = JOBS.exclusive();
            slots[index].rows = rows;
            slots[index].bytes = bytes;
        };
        let stats = into_table::copy_into(schema, table, &columns, true, &mut next, &mut progress);
        // The source's own count ("COPY n") is exact; ours counts lines.
        let rows = copy.rows().unwrap_or(stats.rows);
        {
            let mut slots = JOBS.exclusive();
            slots[index].rows = rows;
            slots[index].bytes = stats.bytes;
        }
        Ok(match indexes {
            Some((steps, caller)) => execute::steps_as_owners(steps, caller),
            None => Vec::new(),
        })
    });
    copied.map_err(|failure| match lost.into_inner() {
        Some(source) if source.transient => source,
        _ => failure,
    })
}

/// Whether the local table `qualified` has no row (inside a transaction).
fn is_empty(qualified: &str) -> Result<bool, Failure> {
    let spi_failure = |e: crate::apply::spi::SpiFailure| Failure::new(e.to_string());
    crate::apply::spi::connect().map_err(spi_failure)?;
    let rows =
        crate::apply::spi::query(&format!("SELECT NOT EXISTS (SELECT FROM ONLY {qualified})"));
    crate::apply::spi::finish();
    let rows = rows.map_err(spi_failure)?;
    Ok(rows.first().and_then(|row| row.first()).cloned().flatten() == Some("t".to_string()))
}

/// Counts (and checksums) the rows of the tables listed in `path`
/// ("schema<TAB>table" lines), writing "schema<TAB>table<TAB>rows<TAB>checksum"
/// lines to `path.out`.
fn count_rows(path: &str, checksums: bool) -> Result<(), Failure> {
    let list = std::fs::read_to_string(path)
        .map_err(|e| Failure::new(format!("could not read {path}: {e}")))?;
    let output = txn::run(|| {
        let spi_failure = |e: crate::apply::spi::SpiFailure| Failure::new(e.to_string());
        crate::apply::spi::connect().map_err(spi_failure)?;
        let mut output = String::new();
        let result = (|| {
            crate::apply::spi::query("SET LOCAL TimeZone = 'UTC'; SET LOCAL DateStyle = 'ISO'")
                .map_err(spi_failure)?;
            for line in list.lines() {
                let Some((schema, table)) = line.split_once('\t') else {
                    continue;
                };
                let qualified = format!("{}.{}", quote_ident(schema), quote_ident(table));
                let rows =
                    crate::apply::spi::query(&crate::copy::fingerprint_sql(&qualified, checksums))
                        .map_err(spi_failure)?;
                let (count, checksum) = rows
                    .first()
                    .map(|row| {
                        (
                            row.first().cloned().flatten().unwrap_or_default(),
                            row.get(1).cloned().flatten().unwrap_or_default(),
                        )
                    })
                    .unwrap_or_default();
                output.push_str(&format!("{schema}\t{table}\t{count}\t{checksum}\n"));
            }
            Ok(())
        })();
        crate::apply::spi::finish();
        result.map(|()| output)
    })?;
    std::fs::write(format!("{path}.out"), output)
        .map_err(|e| Failure::new(format!("could not write {path}.out: {e}")))
}
