//! The task worker: runs one migration task through its phases, connected to
//! the control database (where the catalog lives).
//!
//! Per phase, for every source database:
//! * `roles`: `pg_dumpall --roles-only`, roles that exist here left alone;
//! * `schema`: a permanent logical slot (pgoutput) created on a replication
//!   connection that exports a snapshot and stays open; one `pg_dump
//!   --schema-only --format=custom --snapshot` to the work dir, its pre-data
//!   section printed here by `pg_restore --create --section=pre-data`; the
//!   database created here (top level) and the rest applied inside it by a
//!   database worker;
//! * `full_copy`: the tables planned from the source at the snapshot, copied
//!   by up to `copy_workers` database workers in one queue across databases,
//!   largest first overall (a worker moves to another database once its own
//!   has nothing left, see `jobs::run_queue`), each table's
//!   own indexes and constraints (its part of the same dump's post-data) built by
//!   the worker that copied it right after its rows, as `pg_restore -j` does;
//!   then sequences and large objects at the same snapshot;
//! * `post_data`: the rest of post-data (foreign keys, triggers, rules,
//!   policies, ...), then materialized views given the source's rows at the
//!   snapshot; the snapshots are released.
//!
//! Resuming (the worker died or the destination restarted): every step is
//! recorded per database and per table, so a new worker continues where the
//! last stopped. Exported snapshots die with their connection, so a resumed
//! copy takes a fresh snapshot from a *temporary* slot for the tables still to
//! copy and records its LSN as their `sync_lsn`; tables already copied keep
//! theirs, and the permanent slot keeps every change since the first
//! snapshot. Applying a table's changes then skips transactions committed at
//! or before its `sync_lsn`, as PostgreSQL's tablesync does, so the result is
//! consistent. A table whose copy was interrupted is emptied and copied again;
//! a table copied whose indexes were not recorded gets them then (their
//! script is one transaction: all there, or none).
//!
//! Table states: pending -> copying -> copied -> indexed (a table with no
//! index or constraint of its own, or a small one whose indexes are built in
//! its copy's transaction, goes from copying to indexed at once).

use super::jobs::{self, Job, JobResult, Stop};
use super::outage::Outage;
use super::shared::{self, JobKind, TASK};
use super::slot_watch::SlotWatch;
use super::txn::{self, Failure};
use crate::catalog::secrets;
use crate::catalog::tasks::{self, Phase, PlannedTable, TableCopy, Task, TaskDatabase};
use crate::copy::{format_columns, TableColumns, SOURCE_TABLES_SQL};
use crate::schema::{dump, execute, roles, script};
use crate::source::{
    quote_ident, quote_literal, ConnInfo, ConnectOptions, Connection, CreatedSlot, SourceError,
};
use pgrx::bgworkers::{
    BackgroundWorker, BackgroundWorkerBuilder, BgWorkerStartTime, SignalWakeFlags,
};
use pgrx::prelude::*;
use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// Starts a task worker for `task_id` (from the launcher).
pub fn start_worker(task_id: i64) {
    let started = BackgroundWorkerBuilder::new(&format!("cloudmig task {task_id}"))
        .set_type("cloudmig task")
        .set_library("cloudmig")
        .set_function("cloudmig_task_main")
        .set_argument(Some(pg_sys::Datum::from(task_id)))
        .enable_spi_access()
        .set_start_time(BgWorkerStartTime::RecoveryFinished)
        .set_restart_time(None)
        .load_dynamic();
    if started.is_err() {
        pgrx::log!("cloudmig: no background worker slot is free to run task {task_id}");
    }
}

#[pg_guard]
#[no_mangle]
pub extern "C-unwind" fn cloudmig_task_main(arg: pg_sys::Datum) {
    BackgroundWorker::attach_signal_handlers(SignalWakeFlags::SIGHUP | SignalWakeFlags::SIGTERM);
    let task_id = arg.value() as i64;
    txn::serve_task(task_id);
    BackgroundWorker::connect_worker_to_spi(Some(&crate::guc::database()), None);
    // As the bootstrap superuser, in a database members of cloudmig_admin
    // may create objects in: nothing of theirs may be found by name.
    crate::catalog::pin_search_path(pg_sys::GucAction::GUC_ACTION_SET);
    // SAFETY: MyProcPid is set at process start.
    let my_pid = unsafe { pg_sys::MyProcPid };
    {
        let mut task = TASK.exclusive();
        if task.task_id == task_id
            && task.worker_pid != my_pid
            && shared::process_alive(task.worker_pid)
        {
            return; // another worker already runs it
        }
        task.task_id = task_id;
        task.worker_pid = my_pid;
    }
    let outcome = match run_with_retries(task_id) {
        // A step interrupted by the cancel fails with "cancelled": not a failure.
        Err(Stop::Failed(_)) if shared::cancel_requested() == Some(task_id) => Err(Stop::Cancelled),
        other => other,
    };
    let recorded = match outcome {
        Ok(()) | Err(Stop::Shutdown) => Ok(()),
        Err(Stop::Failed(failure)) => {
            pgrx::log!("cloudmig: task {task_id} failed: {failure}");
            let lsn = failure.lsn.map(|lsn| lsn.to_string());
            txn::spi(|| {
                tasks::fail(
                    task_id,
                    &failure.message,
                    failure.hint.as_deref(),
                    lsn.as_deref(),
                )
            })
        }
        Err(Stop::Cancelled) => Ok(()), // cloudmig.cancel() finishes the job
    };
    if let Err(failure) = recorded {
        pgrx::log!("cloudmig: could not record the outcome of task {task_id}: {failure}");
    }
    let mut task = TASK.exclusive();
    if task.worker_pid == my_pid {
        task.worker_pid = 0;
        task.conninfo.set("");
    }
}

/// Set while the task worker rides out an outage of the source; the first
/// successful connection to the source ends it (see [`Runner::connect`]).
static OUTAGE_OPEN: AtomicBool = AtomicBool::new(false);

/// Runs the task; while the source is away (network, restart, failover),
/// retries with backoff, each outage within a window of its own (see
/// [`Outage`]), saying so in the events and the task's outage columns. Each
/// retry resumes from what is recorded, as after a restart.
fn run_with_retries(task_id: i64) -> Result<(), Stop> {
    let mut outage: Option<Outage> = None;
    loop {
        let outcome = Runner::load(task_id).and_then(|mut runner| {
            let result = runner.run();
            runner.release_snapshots();
            result
        });
        let failure = match outcome {
            Err(Stop::Failed(failure)) if failure.transient => failure,
            other => return other,
        };
        if !OUTAGE_OPEN.load(Ordering::SeqCst) {
            // The source answered since the last failure: a new outage.
            outage = None;
        }
        let current = outage.get_or_insert_with(Outage::begin);
        let Some(wait) = current.next_attempt() else {
            OUTAGE_OPEN.store(false, Ordering::SeqCst);
            let mut failure = failure;
            failure.message = format!("{} ({})", failure.message, current.gave_up());
            return Err(Stop::Failed(failure));
        };
        OUTAGE_OPEN.store(true, Ordering::SeqCst);
        let event = format!(
            "the source is unavailable ({failure}); retrying in {}s (attempt {}; this outage \
             gives up in {:.0}s)",
            wait.as_secs(),
            current.attempts,
            current.seconds_left()
        );
        let (attempts, left) = (current.attempts as i32, current.seconds_left());
        txn::spi(|| tasks::note_outage(task_id, None, &failure.message, attempts, left, &event))?;
        let until = Instant::now() + wait;
        while Instant::now() < until {
            if txn::shutdown_requested() {
                return Err(Stop::Shutdown);
            }
            if shared::cancel_requested() == Some(task_id) {
                return Err(Stop::Cancelled);
            }
            txn::nap(Duration::from_millis(200));
        }
    }
}

/// The role that started a task, and what it may grant.
#[derive(Default)]
struct CallerGrants {
    name: String,
    rights: roles::CallerRights,
    /// Roles existing here it may grant membership in.
    grantable: HashSet<String>,
    /// Settings any user may set (pg_settings' `context = 'user'`), lower case.
    user_settings: HashSet<String>,
}

/// A snapshot exported by a replication connection that stays open.
pub(super) struct HeldSnapshot {
    connection: Connection,
    slot: CreatedSlot,
}

pub(super) struct Runner {
    pub(super) task: Task,
    pub(super) info: ConnInfo,
    pub(super) work_dir: PathBuf,
    copy_workers: usize,
    snapshots: HashMap<String, HeldSnapshot>,
    /// An earlier worker ran this task (see `JobSlot::resuming`).
    resumed: bool,
}

fn source_failure(what: &str, error: SourceError) -> Failure {
    Failure::from_source(what, &error)
}

impl Runner {
    fn load(task_id: i64) -> Result<Runner, Stop> {
        let (task, conninfo, starts) = txn::spi(|| {
            let Some(task) = tasks::load(task_id)? else {
                return Ok(None);
            };
            let conninfo = secrets::of_task(task_id)?;
            let starts = tasks::note_worker_start(task_id)?;
            Ok(Some((task, conninfo, starts)))
        })?
        .ok_or_else(|| Stop::Failed(Failure::new(format!("task {task_id} does not exist"))))?;
        // A missing secret is an error, never an empty connection string.
        let conninfo = conninfo.ok_or_else(|| {
            Stop::Failed(Failure::with_hint(
                format!("task {task_id} has no source connection string any more"),
                "Cancel it with cloudmig.cancel(); start a new one from a new assessment.",
            ))
        })?;
        let info = ConnInfo::parse(&conninfo).map_err(|e| {
            Stop::Failed(Failure::new(format!(
                "invalid source connection string: {e}"
            )))
        })?;
        TASK.exclusive()
            .conninfo
            .set_whole(&conninfo)
            .map_err(|capacity| {
                Stop::Failed(Failure::new(format!(
                    "the source connection string is longer than {capacity} bytes"
                )))
            })?;
        let copy_workers = task
            .options
            .get("copy_workers")
            .and_then(serde_json::Value::as_u64)
            .map(|n| n as usize)
            .unwrap_or_else(|| crate::guc::copy_workers() as usize);
        let work_dir = work_dir(task_id);
        std::fs::create_dir_all(&work_dir).map_err(|e| {
            Stop::Failed(Failure::new(format!(
                "could not create {}: {e}",
                work_dir.display()
            )))
        })?;
        Ok(Runner {
            task,
            info,
            work_dir,
            copy_workers,
            snapshots: HashMap::new(),
            resumed: starts > 1,
        })
    }

    pub(super) fn should_stop(&self) -> Option<Stop> {
        if txn::shutdown_requested() {
            Some(Stop::Shutdown)
        } else if shared::cancel_requested() == Some(self.task.id) {
            Some(Stop::Cancelled)
        } else {
            None
        }
    }

    pub(super) fn check(&self) -> Result<(), Stop> {
        self.should_stop().map_or(Ok(()), Err)
    }

    pub(super) fn set_phase(&mut self, phase: Phase, message: &str) -> Result<(), Stop> {
        let id = self.task.id;
        txn::spi(|| tasks::set_phase(id, phase, message))?;
        self.task.phase = phase;
        Ok(())
    }

    pub(super) fn event(
        &self,
        datname: Option<&str>,
        kind: &str,
        message: &str,
    ) -> Result<(), Stop> {
        let id = self.task.id;
        txn::spi(|| tasks::add_event(id, datname, kind, message))?;
        Ok(())
    }

    pub(super) fn databases(&self) -> Result<Vec<TaskDatabase>, Stop> {
        let id = self.task.id;
        Ok(txn::spi(|| tasks::databases(id))?)
    }

    fn set_database_state(
        &self,
        datname: &str,
        state: &str,
        lsn: Option<&str>,
    ) -> Result<(), Stop> {
        let id = self.task.id;
        txn::spi(|| tasks::set_database_state(id, datname, state, lsn))?;
        Ok(())
    }

    pub(super) fn connect(&self, dbname: &str, replication: bool) -> Result<Connection, Stop> {
        let mut options = ConnectOptions::new();
        options.replication = replication;
        options.io_timeout = crate::guc::source_timeout();
        options.interrupt_check = Some(Box::new(txn::interrupt_check));
        let connection =
            Connection::connect(&self.info.with_dbname(dbname), options).map_err(|e| {
                Stop::Failed(source_failure(
                    &format!("could not connect to source database {dbname}"),
                    e,
                ))
            })?;
        // SAFETY: reads this backend's transaction state.
        let in_transaction = unsafe { pg_sys::IsTransactionState() };
        if !in_transaction && OUTAGE_OPEN.swap(false, Ordering::SeqCst) {
            let id = self.task.id;
            txn::spi(|| {
                tasks::outage_over(id, None, "the source answers again; the outage is over")
            })?;
        }
        Ok(connection)
    }

    fn run(&mut self) -> Result<(), Stop> {
        loop {
            self.check()?;
            match self.task.phase {
                Phase::Created => self.set_phase(Phase::Roles, "")?,
                Phase::Roles => {
                    self.copy_roles()?;
                    self.set_phase(Phase::Schema, "")?;
                }
                Phase::Schema => {
                    self.apply_pre_data()?;
                    self.set_phase(Phase::FullCopy, "")?;
                }
                Phase::FullCopy => {
                    self.copy_data()?;
                    self.set_phase(Phase::PostData, "")?;
                }
                Phase::PostData => {
                    self.apply_post_data()?;
                    self.release_snapshots();
                    self.prepare_apply()?;
                    self.set_phase(
                        Phase::CopyComplete,
                        "every database is copied; the apply of changes starts",
                    )?;
                }
                Phase::CopyComplete => self.set_phase(Phase::Catchup, "")?,
                Phase::Catchup | Phase::Incremental | Phase::SwitchingOver => {
                    return self.follow();
                }
                _ => return Ok(()),
            }
        }
    }

    fn dump(&self, program: &str, args: &[&str], dbname: &str) -> Result<String, Stop> {
        dump::run(
            program,
            args,
            &self.info,
            dbname,
            &self.work_dir,
            txn::interrupt_check,
        )
        .map_err(|e| self.dump_failure(e, dbname))
    }

    /// A failed pg_dump or pg_dumpall against `dbname`: a source restarting
    /// then is an outage like any other, not the end of the task.
    fn dump_failure(&self, error: crate::schema::SchemaError, dbname: &str) -> Stop {
        let mut failure = Failure::new(error.to_string());
        failure.transient = error.source_unavailable() || self.source_unreachable(dbname);
        Stop::Failed(failure)
    }

    /// Whether the source cannot be reached now, classified as for our own
    /// connections: a failed pg_dump whose message
    /// [`crate::schema::SchemaError::source_unavailable`]
    /// does not know (another `lc_messages`) still counts as an outage then.
    fn source_unreachable(&self, dbname: &str) -> bool {
        let mut options = ConnectOptions::new();
        options.io_timeout = crate::guc::source_timeout();
        options.interrupt_check = Some(Box::new(txn::interrupt_check));
        match Connection::connect(&self.info.with_dbname(dbname), options) {
            Ok(probe) => {
                probe.close();
                false
            }
            Err(error) => txn::source_unavailable(&error),
        }
    }

    /// What the role that started this task may grant (see
    /// `roles::restrict`), read here and now: a role dropped or demoted
    /// since `start` hands out nothing more than it has now.
    fn caller_rights(&self) -> Result<CallerGrants, Stop> {
        let started_by = self.task.started_by.unwrap_or(pg_sys::InvalidOid);
        Ok(txn::spi(|| {
            Spi::connect(|client| {
                let mut grants = CallerGrants {
                    name: format!("the role with oid {}", u32::from(started_by)),
                    ..CallerGrants::default()
                };
                let rows = client.select(
                    "SELECT rolname::text, rolsuper, rolcreaterole, rolcreatedb \
                       FROM pg_catalog.pg_authid WHERE oid = $1",
                    None,
                    &[started_by.into()],
                )?;
                for row in rows {
                    grants.name = row.get::<String>(1)?.unwrap_or_default();
                    grants.rights = roles::CallerRights {
                        superuser: row.get::<bool>(2)?.unwrap_or(false),
                        createrole: row.get::<bool>(3)?.unwrap_or(false),
                        createdb: row.get::<bool>(4)?.unwrap_or(false),
                    };
                }
                if grants.rights.superuser {
                    return Ok(grants);
                }
                // As PostgreSQL 15's GRANT checks a non-superuser: never a
                // superuser role; others with CREATEROLE or ADMIN OPTION.
                grants.grantable = client
                    .select(
                        "SELECT rolname::text FROM pg_catalog.pg_roles \
                          WHERE NOT rolsuper \
                            AND ($2 OR pg_catalog.pg_has_role($1, oid, 'MEMBER WITH ADMIN OPTION'))",
                        None,
                        &[started_by.into(), grants.rights.createrole.into()],
                    )?
                    .map(|row| row.get::<String>(1).map(Option::unwrap_or_default))
                    .collect::<Result<_, _>>()?;
                grants.user_settings = client
                    .select(
                        "SELECT pg_catalog.lower(name) FROM pg_catalog.pg_settings WHERE context = 'user'",
                        None,
                        &[],
                    )?
                    .map(|row| row.get::<String>(1).map(Option::unwrap_or_default))
                    .collect::<Result<_, _>>()?;
                Ok(grants)
            })
        })?)
    }

    fn copy_roles(&mut self) -> Result<(), Stop> {
        let first_db = self
            .info
            .effective_dbname()
            .unwrap_or("postgres")
            .to_string();
        let mut connection = self.connect(&first_db, false)?;
        let superuser = connection
            .simple_query("SELECT rolsuper FROM pg_catalog.pg_roles WHERE rolname = current_user")
            .map_err(|e| Stop::Failed(source_failure("could not read the migration account", e)))?
            .first()
            .map(|row| row.get("rolsuper") == Some("t"))
            .unwrap_or(false);
        connection.close();
        let mut args = vec!["--roles-only"];
        if !superuser {
            args.push("--no-role-passwords");
        }
        let dump = self.dump("pg_dumpall", &args, &first_db)?;
        let existing: HashSet<String> = txn::spi(|| {
            Spi::connect(|client| {
                client
                    .select("SELECT rolname::text FROM pg_catalog.pg_roles", None, &[])?
                    .map(|row| row.get::<String>(1).map(Option::unwrap_or_default))
                    .collect::<Result<HashSet<String>, _>>()
            })
        })?;
        let refused = |e: script::ScriptError| {
            Stop::Failed(Failure::with_hint(
                format!("roles dump refused: {e}"),
                e.hint(),
            ))
        };
        let statements = roles::statements_for_new_roles(&dump, &existing).map_err(refused)?;
        let created: Vec<String> = roles::created_roles(&dump)
            .map_err(refused)?
            .into_iter()
            .filter(|r| !existing.contains(r))
            .collect();
        let caller = self.caller_rights()?;
        let restricted = roles::restrict(
            statements,
            &created,
            &caller.rights,
            |role| caller.grantable.contains(role),
            |setting| caller.user_settings.contains(&setting.to_lowercase()),
        );
        let id = self.task.id;
        txn::run(|| {
            for statement in &restricted.statements {
                execute::run_utf8(statement)
                    .map_err(|e| Failure::new(format!("{e} (in: {statement})")))?;
            }
            for withheld in &restricted.withheld {
                tasks::add_event(id, None, "warning", &withheld.message(&caller.name))
                    .map_err(|e| Failure::new(e.to_string()))?;
            }
            let kept = existing.len();
            let mut message = format!("{} role(s) created", created.len());
            if kept > 0 {
                message.push_str("; roles that already existed here were left unchanged");
            }
            tasks::add_event(id, None, "info", &message)
                .map_err(|e| Failure::new(e.to_string()))?;
            if !superuser {
                for role in &created {
                    tasks::add_event(
                        id,
                        None,
                        "warning",
                        &format!(
                            "role {role} was created without its password: the migration account \
                             cannot read passwords; set it with ALTER ROLE ... PASSWORD"
                        ),
                    )
                    .map_err(|e| Failure::new(e.to_string()))?;
                }
            }
            Ok(())
        })?;
        Ok(())
    }

    /// Creates (or recreates) the permanent slot of a database, exporting a snapshot.
    fn take_snapshot(
        &mut self,
        database: &TaskDatabase,
        temporary_name: Option<String>,
    ) -> Result<(), Stop> {
        let mut connection = self.connect(&database.datname, true)?;
        let (name, temporary) = match &temporary_name {
            Some(name) => (name.clone(), true),
            None => (database.slot_name.clone(), false),
        };
        if !temporary {
            // The publication must exist before the slot: pgoutput reads it
            // with the historic snapshot of each change.
            self.ensure_publication(&database.datname)?;
            // A slot left by an attempt that applied nothing: start over.
            match connection.drop_replication_slot(&name, false) {
                Ok(()) => {}
                Err(SourceError::Server(error)) if error.code == "42704" => {}
                Err(e) => {
                    return Err(Stop::Failed(source_failure(
                        "could not drop an old slot",
                        e,
                    )))
                }
            }
        }
        let slot = connection
            .create_logical_slot(&name, "pgoutput", temporary, true)
            .map_err(|e| {
                Stop::Failed(source_failure(
                    &format!("could not create replication slot {name}"),
                    e,
                ))
            })?;
        self.snapshots
            .insert(database.datname.clone(), HeldSnapshot { connection, slot });
        Ok(())
    }

    /// Creates the task's publication in a source database (FOR ALL TABLES
    /// for a superuser account, else the tables one by one, which needs the
    /// privileges of their owners), after giving the tables without replica
    /// identity REPLICA IDENTITY FULL when the task's options ask for it
    /// (`start` refuses to run without that choice).
    fn ensure_publication(&self, datname: &str) -> Result<(), Stop> {
        let publication = tasks::publication_name(self.task.id);
        let mut connection = self.connect(datname, false)?;
        let failed = |what: &str, e: SourceError| Stop::Failed(source_failure(what, e));
        let exists = !connection
            .simple_query(&format!(
                "SELECT 1 FROM pg_catalog.pg_publication WHERE pubname = {}",
                quote_literal(&publication)
            ))
            .map_err(|e| failed("could not read publications", e))?
            .is_empty();
        if exists {
            connection.close();
            return Ok(());
        }
        if self
            .task
            .options
            .get("replica_identity_full")
            .and_then(serde_json::Value::as_bool)
            == Some(true)
        {
            let tables = connection
                .simple_query(crate::copy::TABLES_WITHOUT_IDENTITY_SQL)
                .map_err(|e| failed("could not list tables without replica identity", e))?;
            for row in &tables {
                let name = row.get("name").unwrap_or_default();
                connection
                    .execute(&format!("ALTER TABLE {name} REPLICA IDENTITY FULL"))
                    .map_err(|e| {
                        failed(&format!("could not set REPLICA IDENTITY FULL on {name}"), e)
                    })?;
                self.event(
                    Some(datname),
                    "info",
                    &format!("{name}: REPLICA IDENTITY FULL set on the source"),
                )?;
            }
        }
        let superuser = connection
            .simple_query("SELECT rolsuper FROM pg_catalog.pg_roles WHERE rolname = current_user")
            .map_err(|e| failed("could not read the migration account", e))?
            .first()
            .map(|row| row.get("rolsuper") == Some("t"))
            .unwrap_or(false);
        let scope = if superuser {
            "FOR ALL TABLES".to_string()
        } else {
            let tables: Vec<String> = connection
                .simple_query(crate::copy::PUBLISHABLE_TABLES_SQL)
                .map_err(|e| failed("could not list the tables to publish", e))?
                .iter()
                .filter_map(|row| row.get("name").map(str::to_string))
                .collect();
            if tables.is_empty() {
                String::new()
            } else {
                format!("FOR TABLE {}", tables.join(", "))
            }
        };
        connection
            .execute(&format!(
                "CREATE PUBLICATION {} {scope}",
                crate::source::quote_ident(&publication)
            ))
            .map_err(|e| {
                let mut failure =
                    source_failure(&format!("could not create publication {publication}"), e);
                failure.hint = Some(
                    "use a superuser migration account, or grant the account the owners of every \
                     table (GRANT <owner> TO <account>)"
                        .into(),
                );
                Stop::Failed(failure)
            })?;
        connection.close();
        Ok(())
    }

    fn snapshot_of(&self, datname: &str) -> Option<(String, String)> {
        let held = self.snapshots.get(datname)?;
        Some((
            held.slot.snapshot_name.clone().unwrap_or_default(),
            held.slot.consistent_point.to_string(),
        ))
    }

    fn release_snapshots(&mut self) {
        for (_, held) in self.snapshots.drain() {
            held.connection.close();
        }
    }

    pub(super) fn run_jobs(
        &self,
        database: &str,
        jobs: Vec<Job>,
        workers: usize,
        on_assign: &mut dyn FnMut(&Job) -> Result<(), Failure>,
        on_done: &mut dyn FnMut(&Job, JobResult) -> Result<(), Failure>,
    ) -> Result<(), Stop> {
        self.run_chained_jobs(database, jobs, workers, on_assign, &mut |job, result| {
            on_done(job, result).map(|()| Vec::new())
        })
    }

    /// As [`Self::run_jobs`], with the follow-up jobs `on_done` returns (see
    /// [`jobs::run_queue`]), all in `database`.
    pub(super) fn run_chained_jobs(
        &self,
        database: &str,
        jobs: Vec<Job>,
        workers: usize,
        on_assign: &mut dyn FnMut(&Job) -> Result<(), Failure>,
        on_done: &mut jobs::FollowUps<'_>,
    ) -> Result<(), Stop> {
        let mut jobs = jobs;
        for job in &mut jobs {
            if job.database.is_empty() {
                job.database = database.to_string();
            }
        }
        self.run_queue_jobs(jobs, workers, on_assign, on_done, &mut |_| Ok(()))
    }

    /// As [`Self::run_chained_jobs`] for the jobs of several databases in
    /// one queue (see [`jobs::run_queue`]).
    pub(super) fn run_queue_jobs(
        &self,
        jobs: Vec<Job>,
        workers: usize,
        on_assign: &mut dyn FnMut(&Job) -> Result<(), Failure>,
        on_done: &mut jobs::FollowUps<'_>,
        on_database_done: &mut dyn FnMut(&str) -> Result<(), Stop>,
    ) -> Result<(), Stop> {
        let watch = std::cell::RefCell::new((SlotWatch::new(), None));
        jobs::run_queue(
            self.task.id,
            jobs,
            workers,
            &|| {
                self.should_stop()
                    .or_else(|| self.watch_slots_while_copying(&watch))
            },
            on_assign,
            on_done,
            on_database_done,
        )
    }

    /// While the copy runs, the slots already created hold the source's WAL:
    /// a source with `max_slot_wal_keep_size` may invalidate them before the
    /// apply even starts. Warns and fails as the follow loop does (see
    /// [`super::slot_watch`]); a source away now is the copy's to notice.
    fn watch_slots_while_copying(
        &self,
        watch: &std::cell::RefCell<(SlotWatch, Option<Connection>)>,
    ) -> Option<Stop> {
        if !matches!(
            self.task.phase,
            Phase::Schema | Phase::FullCopy | Phase::PostData
        ) {
            return None;
        }
        let mut guard = watch.borrow_mut();
        let (watch, source) = &mut *guard;
        if !watch.due() {
            return None;
        }
        let databases = self.databases().ok()?;
        let slots: Vec<String> = databases
            .iter()
            .filter(|d| d.state != "pending")
            .map(|d| d.slot_name.clone())
            .collect();
        if slots.is_empty() {
            watch.missed();
            return None;
        }
        if source.is_none() {
            *source = self.connect(&databases[0].datname, false).ok();
        }
        let Some(connection) = source.as_mut() else {
            watch.missed();
            return None;
        };
        let findings = match watch.look(connection, self.task.id, &slots) {
            Ok(findings) => findings,
            Err(_) => {
                *source = None;
                return None;
            }
        };
        self.judge_slots(&databases, &findings).err()
    }

    /// Writes a script for an ApplyScript job, once it is known to read as
    /// pg_dump writes it (see `script::steps`; the database worker reads it
    /// again the same way).
    fn write_script(
        &self,
        name: &str,
        sql: &str,
        section: &str,
        datname: &str,
    ) -> Result<String, Stop> {
        script::steps(sql).map_err(|e| {
            Stop::Failed(Failure::with_hint(
                format!("{section} schema dump of {datname} refused: {e}"),
                e.hint(),
            ))
        })?;
        let path = self.work_dir.join(name);
        std::fs::write(&path, sql).map_err(|e| {
            Stop::Failed(Failure::new(format!(
                "could not write {}: {e}",
                path.display()
            )))
        })?;
        Ok(path.display().to_string())
    }

    /// The role that started the task, on whose behalf the schema runs.
    fn caller(&self) -> pg_sys::Oid {
        self.task.started_by.unwrap_or(pg_sys::InvalidOid)
    }

    /// Records as warning events what an ApplyScript job (or a CopyTable
    /// job's index script) left out.
    fn record_skipped_statements(&self, datname: &str, job: &Job) -> Result<(), Failure> {
        let script = match job.kind {
            JobKind::ApplyScript | JobKind::TableIndexes => &job.path,
            JobKind::CopyTable if !job.script.is_empty() => &job.script,
            _ => return Ok(()),
        };
        let path = super::database::skipped_path(script);
        let lines = match std::fs::read_to_string(&path) {
            Ok(lines) => lines,
            Err(e) => return Err(Failure::new(format!("could not read {path}: {e}"))),
        };
        for line in lines.lines().filter(|l| !l.is_empty()) {
            tasks::add_event(self.task.id, Some(datname), "warning", line)
                .map_err(|e| Failure::new(e.to_string()))?;
        }
        Ok(())
    }

    fn apply_pre_data(&mut self) -> Result<(), Stop> {
        let local: HashSet<String> = txn::spi(|| {
            Spi::connect(|client| {
                client
                    .select(
                        "SELECT datname::text FROM pg_catalog.pg_database",
                        None,
                        &[],
                    )?
                    .map(|row| row.get::<String>(1).map(Option::unwrap_or_default))
                    .collect::<Result<HashSet<String>, _>>()
            })
        })?;
        let todo: Vec<(usize, TaskDatabase)> = self
            .databases()?
            .into_iter()
            .enumerate()
            .filter(|(_, database)| matches!(database.state.as_str(), "pending" | "created"))
            .collect();
        // A few databases at a time: their snapshots taken, then their
        // schemas dumped all at once (see `dump_schemas`), then applied one
        // after the other.
        // No more dumps at once than the copy workers that come after them
        // plus one: the source connections the assessment checked for.
        let at_once = (self.copy_workers + 1).clamp(1, SCHEMA_DUMPS_AT_ONCE);
        for group in todo.chunks(at_once) {
            let mut dumps = Vec::new();
            for (ordinal, database) in group {
                self.check()?;
                self.take_snapshot(database, None)?;
                let (snapshot, _) = self.snapshot_of(&database.datname).unwrap_or_default();
                dumps.push((*ordinal, database.datname.clone(), snapshot));
            }
            let archives = self.dump_schemas(&dumps)?;
            for ((ordinal, database), archive) in group.iter().zip(archives) {
                self.check()?;
                self.apply_database_pre_data(*ordinal, database, &archive, &local)?;
            }
        }
        Ok(())
    }

    /// Creates database `database` here if it is not yet, and applies the
    /// pre-data section of its schema dump `archive` inside it.
    fn apply_database_pre_data(
        &mut self,
        ordinal: usize,
        database: &TaskDatabase,
        archive: &std::path::Path,
        local: &HashSet<String>,
    ) -> Result<(), Stop> {
        let datname = database.datname.clone();
        let (_, lsn) = self.snapshot_of(&datname).unwrap_or_default();
        let dump = self.restore_section(archive, "pre-data", &datname)?;
        let split = script::split(&dump).map_err(|e| {
            Stop::Failed(Failure::with_hint(
                format!("pre-data schema dump of {datname} refused: {e}"),
                e.hint(),
            ))
        })?;
        if database.state == "pending" {
            for statement in script::database_statements(&split.before_connect) {
                let creates = statement
                    .to_ascii_uppercase()
                    .starts_with("CREATE DATABASE");
                if creates && local.contains(&datname) {
                    continue; // postgres, or the control database: migrate into it
                }
                txn::run(|| {
                    if creates {
                        execute::toplevel_utility(&statement);
                        Ok(())
                    } else {
                        execute::run_utf8(&statement).map_err(|e| Failure::new(e.to_string()))
                    }
                })?;
            }
            // Created by the bootstrap superuser (creating a database
            // from template0 runs no code of the source), then given to
            // its owner, as pg_dump's ALTER DATABASE ... OWNER TO would.
            if let Some(owner) = script::database_owner(&split.before_connect) {
                let statement = format!(
                    "ALTER DATABASE {} OWNER TO {}",
                    quote_ident(&datname),
                    quote_ident(&owner)
                );
                txn::run(|| {
                    execute::run_utf8(&statement).map_err(|e| Failure::new(e.to_string()))
                })?;
            }
            self.set_database_state(&datname, "created", Some(&lsn))?;
        }
        let path = self.write_script(
            &format!("pre-data-{ordinal}.sql"),
            &split.after_connect,
            "pre-data",
            &datname,
        )?;
        let job = Job {
            kind: JobKind::ApplyScript,
            resuming: self.resumed,
            path,
            caller: self.caller(),
            ..Job::default()
        };
        self.run_jobs(&datname, vec![job], 1, &mut |_| Ok(()), &mut |job, _| {
            self.record_skipped_statements(&datname, job)
        })?;
        self.set_database_state(&datname, "schema_applied", Some(&lsn))?;
        self.event(
            Some(&datname),
            "info",
            &format!(
                "schema created; slot {} starts at {lsn}",
                database.slot_name
            ),
        )?;
        Ok(())
    }

    fn copy_data(&mut self) -> Result<(), Stop> {
        let task_id = self.task.id;
        let caller = self.caller();
        // Every database whose schema is in place is planned first, then
        // all their tables go into one queue, largest first overall: a worker
        // done with one database's tables goes on with another's instead of
        // idling through the first one's tail (its largest table's last rows
        // and indexes).
        let mut copies: HashMap<String, DatabaseCopy> = HashMap::new();
        let mut index_jobs = Vec::new();
        let mut table_jobs = Vec::new();
        let mut object_jobs = Vec::new();
        for (ordinal, database) in self.databases()?.into_iter().enumerate() {
            self.check()?;
            if database.state != "schema_applied" {
                continue;
            }
            let datname = database.datname.clone();
            if !self.snapshots.contains_key(&datname) {
                // Resumed after the first snapshot died: a temporary slot gives
                // a fresh one for the tables still to copy (see module doc).
                // SAFETY: MyProcPid is set at process start.
                let pid = unsafe { pg_sys::MyProcPid };
                self.take_snapshot(
                    &database,
                    Some(format!("{}_resume_{pid}", database.slot_name)),
                )?;
                self.event(
                    Some(&datname),
                    "info",
                    "resumed: tables not yet copied are copied at a fresh snapshot",
                )?;
            }
            let (snapshot, sync_lsn) = self.snapshot_of(&datname).unwrap_or_default();
            let (planned, columns) = self.plan(&datname, &snapshot)?;
            let columns_path = self.write_columns(ordinal, &columns)?;
            txn::spi(|| tasks::plan_tables(task_id, &datname, &planned))?;
            let tables = txn::spi(|| tasks::tables_to_copy(task_id, &datname))?;
            // Each table's own indexes and constraints, built right after its
            // rows by the worker that copied it; the rest waits for post-data.
            let index_scripts = self.post_data_scripts(ordinal, &datname, &snapshot)?;
            let sizes: HashMap<(String, String), i64> = planned
                .iter()
                .map(|t| ((t.schema_name.clone(), t.table_name.clone()), t.bytes_total))
                .collect();
            let mut by_name: HashMap<(String, String), TableCopy> = HashMap::new();
            for table in tables {
                let name = (table.schema_name.clone(), table.table_name.clone());
                let size = sizes.get(&name).copied();
                let bytes = size.unwrap_or_default();
                if table.state == "copied" {
                    // Its rows committed, its indexes may have (see JobSlot::resuming).
                    index_jobs.extend(index_job(&index_scripts, &name, true, caller).map(|job| {
                        Job {
                            database: datname.clone(),
                            ..job
                        }
                    }));
                } else {
                    // An interrupted copy, or an extension's defaults to replace.
                    let truncate_first = table.state == "copying" || table.extension_config;
                    // A small table's indexes in its copy's transaction: one
                    // job and one commit fewer (see SMALL_TABLE_BYTES). Not
                    // on a copy done again: the attempt that died may have
                    // committed both, and its indexes' job then knows to
                    // accept that they exist (see JobSlot::resuming).
                    let script = match index_scripts.get(&name) {
                        Some(path)
                            if !truncate_first && size.is_some_and(|b| b <= SMALL_TABLE_BYTES) =>
                        {
                            path.clone()
                        }
                        _ => String::new(),
                    };
                    table_jobs.push(Job {
                        kind: JobKind::CopyTable,
                        database: datname.clone(),
                        bytes,
                        schema: table.schema_name.clone(),
                        table: table.table_name.clone(),
                        snapshot: snapshot.clone(),
                        path: columns_path.clone(),
                        script,
                        truncate_first,
                        caller,
                        ..Job::default()
                    });
                }
                by_name.insert(name, table);
            }
            // Once a database's tables are all handed out, its worker takes
            // its sequences and large objects, at the same snapshot.
            for kind in [JobKind::CopySequences, JobKind::CopyLargeObjects] {
                object_jobs.push(Job {
                    kind,
                    database: datname.clone(),
                    snapshot: snapshot.clone(),
                    ..Job::default()
                });
            }
            copies.insert(
                datname,
                DatabaseCopy {
                    sync_lsn,
                    index_scripts,
                    by_name,
                    ..DatabaseCopy::default()
                },
            );
        }
        if copies.is_empty() {
            return Ok(());
        }
        // Resumed index builds first, then the copies largest first (of
        // all databases; planning order among equals), then each database's
        // sequences and large objects.
        table_jobs.sort_by_key(|job| std::cmp::Reverse(job.bytes));
        let mut queue = index_jobs;
        queue.append(&mut table_jobs);
        queue.append(&mut object_jobs);
        let copies = std::cell::RefCell::new(copies);
        let with_table = |job: &Job, body: &mut TableStep<'_>| {
            let mut copies = copies.borrow_mut();
            let Some(copy) = copies.get_mut(&job.database) else {
                return Ok(Vec::new());
            };
            let Some(table) = copy
                .by_name
                .get(&(job.schema.clone(), job.table.clone()))
                .cloned()
            else {
                return Ok(Vec::new());
            };
            body(copy, &table)
        };
        let to_catalog = |e: pgrx::spi::Error| Failure::new(e.to_string());
        self.run_queue_jobs(
            queue,
            self.copy_workers,
            &mut |job| match job.kind {
                JobKind::CopyTable => with_table(job, &mut |copy, table| {
                    tasks::mark_copying(task_id, table, &copy.sync_lsn).map_err(to_catalog)?;
                    Ok(Vec::new())
                })
                .map(drop),
                JobKind::TableIndexes => with_table(job, &mut |_, table| {
                    tasks::mark_indexing(task_id, table).map_err(to_catalog)?;
                    Ok(Vec::new())
                })
                .map(drop),
                _ => Ok(()),
            },
            &mut |job, result| match job.kind {
                JobKind::CopyTable => with_table(job, &mut |copy, table| {
                    copy.tables_copied += 1;
                    copy.rows_copied += result.rows;
                    tasks::mark_copied(task_id, table, result.rows as i64, result.bytes as i64)
                        .map_err(to_catalog)?;
                    if !job.script.is_empty() {
                        // Built in the copy's own transaction.
                        copy.tables_indexed += 1;
                        self.record_skipped_statements(&job.database, job)?;
                        tasks::mark_table_indexed(task_id, table).map_err(to_catalog)?;
                        return Ok(Vec::new());
                    }
                    let name = (job.schema.clone(), job.table.clone());
                    // A copy done again: the attempt that died may have
                    // built its indexes in the copy's transaction.
                    let next: Vec<Job> =
                        index_job(&copy.index_scripts, &name, job.truncate_first, caller)
                            .map(|next| Job {
                                database: job.database.clone(),
                                ..next
                            })
                            .into_iter()
                            .collect();
                    if next.is_empty() {
                        tasks::mark_table_indexed(task_id, table).map_err(to_catalog)?;
                    }
                    Ok(next)
                }),
                JobKind::TableIndexes => with_table(job, &mut |copy, table| {
                    copy.tables_indexed += 1;
                    self.record_skipped_statements(&job.database, job)?;
                    tasks::mark_table_indexed(task_id, table).map_err(to_catalog)?;
                    Ok(Vec::new())
                }),
                _ => Ok(Vec::new()),
            },
            &mut |datname| {
                self.set_database_state(datname, "copied", None)?;
                let (tables, rows, indexed) = copies
                    .borrow()
                    .get(datname)
                    .map(|c| (c.tables_copied, c.rows_copied, c.tables_indexed))
                    .unwrap_or_default();
                self.event(
                    Some(datname),
                    "info",
                    &format!(
                        "data copied: {tables} table(s), {rows} row(s), sequences and large \
                         objects; indexes and constraints of {indexed} table(s) built right \
                         after their rows"
                    ),
                )
            },
        )
    }

    /// pg_dump's post-data section of `datname` at `snapshot`, cut by
    /// `script::split_post_data` against every table planned for copy: the
    /// tables' own scripts are written to files (by table), the rest to
    /// `post-data-<ordinal>.sql`, which [`Self::apply_post_data`] runs.
    fn post_data_scripts(
        &self,
        ordinal: usize,
        datname: &str,
        snapshot: &str,
    ) -> Result<HashMap<(String, String), String>, Stop> {
        // The archive the pre-data came from, so both halves describe the
        // same schema; taken again (at the snapshot held now) only if it is
        // gone.
        let mut archive = self.schema_archive(ordinal);
        if !archive.exists() {
            archive = self.dump_schema(ordinal, datname, snapshot)?;
        }
        let dump = self.restore_section(&archive, "post-data", datname)?;
        let refused = |e: script::ScriptError| {
            Stop::Failed(Failure::with_hint(
                format!("post-data schema dump of {datname} refused: {e}"),
                e.hint(),
            ))
        };
        let split = script::split(&dump).map_err(refused)?;
        let task_id = self.task.id;
        let planned = txn::spi(|| tasks::table_names(task_id, datname))?;
        let cut = script::split_post_data(&split.after_connect, &planned).map_err(refused)?;
        let mut paths = HashMap::new();
        for (number, (name, sql)) in cut.tables.into_iter().enumerate() {
            let path = self.write_script(
                &format!("post-data-{ordinal}-table-{number}.sql"),
                &sql,
                "post-data",
                datname,
            )?;
            paths.insert(name, path);
        }
        self.write_script(
            &format!("post-data-{ordinal}.sql"),
            &cut.rest,
            "post-data",
            datname,
        )?;
        Ok(paths)
    }

    /// Where the schema dump of the `ordinal`-th database is kept.
    fn schema_archive(&self, ordinal: usize) -> PathBuf {
        self.work_dir.join(format!("schema-{ordinal}.dump"))
    }

    /// Dumps the whole schema of `datname` at `snapshot` (none: now) once,
    /// in pg_dump's custom format, to the task's work dir: one pg_dump run
    /// per database, where a dump per section ran it twice, and over a
    /// distant link each run costs a round trip per table it locks.
    fn dump_schema(&self, ordinal: usize, datname: &str, snapshot: &str) -> Result<PathBuf, Stop> {
        let mut archives =
            self.dump_schemas(&[(ordinal, datname.to_string(), snapshot.to_string())])?;
        archives
            .pop()
            .ok_or_else(|| Stop::Failed(Failure::new("no schema dump")))
    }

    /// As [`Self::dump_schema`] for several databases (ordinal, name,
    /// snapshot) at once: their pg_dump runs overlap their round trips.
    /// Each is written under a temporary name first, so a run cut short
    /// never passes for a whole dump. The archives come in the same order.
    fn dump_schemas(&self, databases: &[(usize, String, String)]) -> Result<Vec<PathBuf>, Stop> {
        let mut args: Vec<Vec<String>> = Vec::new();
        let mut files = Vec::new();
        for (ordinal, _, snapshot) in databases {
            let archive = self.schema_archive(*ordinal);
            let partial = archive.with_extension("dump.partial");
            let mut these = vec![
                "--schema-only".to_string(),
                "--format=custom".to_string(),
                // Small, and read back at once: not worth the CPU.
                "--compress=0".to_string(),
                "--no-publications".to_string(),
                "--no-subscriptions".to_string(),
                format!("--file={}", partial.display()),
            ];
            if !snapshot.is_empty() {
                these.push(format!("--snapshot={snapshot}"));
            }
            args.push(these);
            files.push((partial, archive));
        }
        let args: Vec<Vec<&str>> = args
            .iter()
            .map(|these| these.iter().map(String::as_str).collect())
            .collect();
        let runs: Vec<dump::Invocation<'_>> = databases
            .iter()
            .zip(&args)
            .map(|((_, datname, _), these)| ("pg_dump", these.as_slice(), datname.as_str()))
            .collect();
        let results = dump::run_all(&runs, &self.info, &self.work_dir, txn::interrupt_check)
            .map_err(|e| self.dump_failure(e, &databases[0].1))?;
        let mut archives = Vec::new();
        for ((result, (_, datname, _)), (partial, archive)) in
            results.into_iter().zip(databases).zip(files)
        {
            result.map_err(|e| self.dump_failure(e, datname))?;
            std::fs::rename(&partial, &archive).map_err(|e| {
                Stop::Failed(Failure::new(format!(
                    "could not rename {}: {e}",
                    partial.display()
                )))
            })?;
            archives.push(archive);
        }
        Ok(archives)
    }

    /// The script of one section of a schema archive, as pg_dump would have
    /// printed it with `--section`: run locally by the destination's
    /// pg_restore, pg_dump's own section logic with no trip to the source.
    /// Each object's statements come preceded by its owner, run as that
    /// owner (see schema::execute); pre-data also creates the database.
    fn restore_section(
        &self,
        archive: &std::path::Path,
        section: &str,
        datname: &str,
    ) -> Result<String, Stop> {
        let section_arg = format!("--section={section}");
        let mut args = vec![section_arg.as_str(), "--use-set-session-authorization"];
        if section == "pre-data" {
            args.push("--create");
        }
        let archive = archive.display().to_string();
        args.push(&archive);
        dump::restore_script(&args, txn::interrupt_check).map_err(|e| {
            Stop::Failed(Failure::new(format!(
                "could not read the {section} schema of {datname} from its dump: {e}"
            )))
        })
    }

    /// The tables of a source database, read at the snapshot, with the
    /// columns each one's COPY reads.
    fn plan(
        &self,
        datname: &str,
        snapshot: &str,
    ) -> Result<(Vec<PlannedTable>, Vec<TableColumns>), Stop> {
        let mut connection = self.connect(datname, false)?;
        type Plan = (Vec<PlannedTable>, Vec<TableColumns>);
        let mut planning = || -> Result<Plan, SourceError> {
            // One exchange: over a distant link each costs a round trip.
            connection.execute(&format!(
                "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY; SET TRANSACTION SNAPSHOT {}",
                quote_literal(snapshot)
            ))?;
            let rows = connection.simple_query(SOURCE_TABLES_SQL)?;
            connection.execute("COMMIT")?;
            let mut planned = Vec::with_capacity(rows.len());
            let mut columns = Vec::with_capacity(rows.len());
            for row in &rows {
                let schema = row.try_get("schema_name")?.unwrap_or_default().to_string();
                let table = row.try_get("table_name")?.unwrap_or_default().to_string();
                let names: Vec<String> =
                    serde_json::from_str(row.try_get("columns")?.unwrap_or("[]")).map_err(|e| {
                        SourceError::Protocol(format!(
                            "column \"columns\" is not a JSON array of names: {e}"
                        ))
                    })?;
                columns.push(TableColumns {
                    schema: schema.clone(),
                    table: table.clone(),
                    columns: names,
                });
                planned.push(PlannedTable {
                    schema_name: schema,
                    table_name: table,
                    bytes_total: row.parse("bytes_total")?,
                    rows_estimated: row.parse("rows_estimated")?,
                    extension_config: row.get_bool("extension_config")?,
                });
            }
            Ok((planned, columns))
        };
        let planned = planning().map_err(|e| {
            Stop::Failed(source_failure(
                &format!("could not list the tables of {datname}"),
                e,
            ))
        });
        connection.close();
        planned
    }

    /// Writes the column lists of a database's tables for its copy workers
    /// (see [`TableColumns`]); returns the file's path.
    fn write_columns(&self, ordinal: usize, columns: &[TableColumns]) -> Result<String, Stop> {
        let path = self.work_dir.join(format!("columns-{ordinal}.jsonl"));
        let text = format_columns(columns)
            .map_err(|e| Stop::Failed(Failure::new(format!("could not list columns: {e}"))))?;
        std::fs::write(&path, text).map_err(|e| {
            Stop::Failed(Failure::new(format!(
                "could not write {}: {e}",
                path.display()
            )))
        })?;
        Ok(path.display().to_string())
    }

    fn apply_post_data(&mut self) -> Result<(), Stop> {
        let task_id = self.task.id;
        for (ordinal, database) in self.databases()?.into_iter().enumerate() {
            self.check()?;
            if database.state != "copied" {
                continue;
            }
            let datname = database.datname.clone();
            let snapshot = self
                .snapshot_of(&datname)
                .map(|(name, _)| name)
                .unwrap_or_default();
            // What the tables' own scripts left, written by the copy (again
            // from the source if the file is gone).
            let path = self.work_dir.join(format!("post-data-{ordinal}.sql"));
            if !path.exists() {
                self.post_data_scripts(ordinal, &datname, &snapshot)?;
            }
            let jobs = vec![
                Job {
                    kind: JobKind::ApplyScript,
                    resuming: self.resumed,
                    path: path.display().to_string(),
                    caller: self.caller(),
                    ..Job::default()
                },
                Job {
                    kind: JobKind::CopyMaterializedViews,
                    snapshot,
                    caller: self.caller(),
                    ..Job::default()
                },
            ];
            self.run_jobs(&datname, jobs, 1, &mut |_| Ok(()), &mut |job, _| {
                self.record_skipped_statements(&datname, job)
            })?;
            txn::spi(|| tasks::mark_indexed(task_id, &datname))?;
            self.set_database_state(&datname, "post_data_applied", None)?;
            self.event(
                Some(&datname),
                "info",
                "foreign keys, triggers and the rest of post-data created; materialized views hold the source's rows",
            )?;
        }
        Ok(())
    }
}

/// What the copy of one database keeps while its jobs run (see
/// [`Runner::copy_data`]).
#[derive(Default)]
struct DatabaseCopy {
    /// The LSN of the snapshot its tables are copied at.
    sync_lsn: String,
    /// Its tables' own index scripts, by table.
    index_scripts: HashMap<(String, String), String>,
    by_name: HashMap<(String, String), TableCopy>,
    tables_copied: u64,
    tables_indexed: u64,
    rows_copied: u64,
}

/// What the copy does with a table's catalog row when its job is handed
/// out or done.
type TableStep<'a> = dyn FnMut(&mut DatabaseCopy, &TableCopy) -> Result<Vec<Job>, Failure> + 'a;

/// Databases whose schemas are dumped at the same time at most (one pg_dump,
/// so one source connection, each; fewer with fewer copy workers).
const SCHEMA_DUMPS_AT_ONCE: usize = 4;

/// Tables up to this size (`pg_table_size` when planned) have their own
/// indexes and constraints built in the transaction that copies their rows,
/// by the same job: for such a table the copy takes about as long as the
/// fixed cost of a job of its own (handing it out, a synchronous commit
/// here and one of its progress row), which dominated a copy of many small
/// tables. Larger tables keep a job for their indexes, so a crash during
/// a long index build does not undo the rows.
const SMALL_TABLE_BYTES: i64 = 1 << 20;

/// The job that builds the indexes and constraints of table `name` alone,
/// if it has any (see `script::split_post_data`).
fn index_job(
    scripts: &HashMap<(String, String), String>,
    name: &(String, String),
    resuming: bool,
    caller: pg_sys::Oid,
) -> Option<Job> {
    scripts.get(name).map(|path| Job {
        kind: JobKind::TableIndexes,
        schema: name.0.clone(),
        table: name.1.clone(),
        path: path.clone(),
        resuming,
        caller,
        ..Job::default()
    })
}

/// Private scratch directory of a task (pg_dump output, temporary passfiles),
/// inside the data directory, which only the server's OS user can read.
pub fn work_dir(task_id: i64) -> PathBuf {
    // SAFETY: DataDir is set at postmaster start and never changes.
    let data_dir = unsafe { std::ffi::CStr::from_ptr(pg_sys::DataDir) }
        .to_string_lossy()
        .into_owned();
    PathBuf::from(data_dir)
        .join("pg_cloudmig")
        .join(format!("task_{task_id}"))
}
