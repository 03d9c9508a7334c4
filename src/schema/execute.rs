//! Running SQL in this server on behalf of a migration.
//!
//! A pg_dump script runs through SPI statement by statement
//! ([`steps_as_owners`]), each as the role pg_dump names as its object's
//! owner, all in the caller's transaction (applied atomically). `CREATE
//! DATABASE` refuses to run inside a function (SPI), so [`toplevel_utility`]
//! plans and runs such a statement as a top-level command, as
//! `exec_simple_query` does.
//!
//! Who runs what ([`steps_as_owners`]; `caller` is the role that started the
//! task):
//!
//! | statement | caller is a superuser | caller is not |
//! |---|---|---|
//! | pg_dump's session settings | as they are | as they are |
//! | owned by a role that is not a superuser here | as that owner | as that owner |
//! | owned by a superuser here, or by nobody (extensions) | as that superuser | as the caller; left out with a warning if the caller may not |
//! | database settings (`ALTER DATABASE/ROLE ... SET`), `ALTER ... OWNER TO`, `CREATE SCHEMA` (run no code) | as the bootstrap superuser (`CREATE SCHEMA ... AUTHORIZATION` the owner) | as the owner; left out with a warning if it may not |
//! | superuser-only objects (event triggers, languages...) | as the owner; left out with a warning if it may not | as above, left out if not allowed |
//!
//! "As a role" is [`crate::owner::SessionAs`]: session and current user,
//! in a security-restricted operation, so nothing the statement makes run
//! can switch back.

use super::script::{Step, StepKind};
use crate::owner::{identity_is, pin_session_authorization, SessionAs};
use pgrx::pg_sys::panic::CaughtError;
use pgrx::pg_sys::PgTryBuilder;
use pgrx::prelude::*;
use std::collections::HashMap;
use std::ffi::CString;
use std::panic::AssertUnwindSafe;

/// Runs SQL given in UTF-8 (several statements allowed) through SPI, after
/// converting it to this database's encoding. Everything cloudmig receives
/// from the source is UTF-8 (it asks pg_dump and its connections for that),
/// while a database may be LATIN1 or another server encoding; pgrx's SPI
/// helpers would pass the UTF-8 bytes through unconverted.
pub fn run_utf8(sql: &str) -> Result<(), pgrx::spi::Error> {
    if sql.trim().is_empty() {
        return Ok(());
    }
    standard_strings_on()?;
    execute_utf8(sql)
}

/// [`run_utf8`] without setting standard_conforming_strings first: for
/// callers that keep it on themselves.
fn execute_utf8(sql: &str) -> Result<(), pgrx::spi::Error> {
    let utf8 = CString::new(sql.replace('\0', "")).unwrap_or_default();
    // SAFETY: pg_any_to_server returns its input or a palloc'd converted
    // copy, NUL-terminated; SPI is connected and finished around the call on
    // the backend's main thread, inside the caller's transaction.
    unsafe {
        let converted = pg_sys::pg_any_to_server(
            utf8.as_ptr(),
            utf8.as_bytes().len() as i32,
            pg_sys::pg_enc::PG_UTF8 as i32,
        );
        let connected = pg_sys::SPI_connect();
        Spi::check_status(connected)?;
        let status = pg_sys::SPI_execute(converted, false, 0);
        pg_sys::SPI_finish();
        Spi::check_status(status)?;
    }
    Ok(())
}

/// Sets standard_conforming_strings on until the end of the transaction.
/// The text is cut into statements by `schema::lexer` with it on (pg_dump
/// runs with it on, see `dump`), and the server parses a whole SPI string
/// up front with the value in force: were it off (a database setting copied
/// from the source, say), a literal ending in a backslash would end later
/// than the lexer saw, and text inside it could run as SQL.
fn standard_strings_on() -> Result<(), pgrx::spi::Error> {
    Spi::run("SELECT pg_catalog.set_config('standard_conforming_strings', 'on', true)")
}

/// A statement of a schema script that was left out, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Skipped {
    /// The statement's leading words (never its values: a user mapping's
    /// options may hold a password).
    pub what: String,
    /// The role pg_dump named (empty: none).
    pub owner: String,
    /// Whom it ran as.
    pub ran_as: String,
    /// The error it raised.
    pub reason: String,
}

impl Skipped {
    /// One line for the task's events, ending with the fix.
    pub fn message(&self) -> String {
        let owner = if self.owner.is_empty() {
            "no owner (run as a superuser by pg_restore)".to_string()
        } else {
            format!("owner {}", self.owner)
        };
        format!(
            "{} ({owner}) was left out: run as {} it failed: {}; fix: if it is wanted, a superuser \
             runs it here, from pg_dump --schema-only of the source",
            self.what, self.ran_as, self.reason
        )
    }
}

/// Runs the steps of a pg_dump script (see the module doc for who runs
/// what) and returns what was left out. A statement that fails otherwise
/// raises its ERROR: the caller's transaction aborts, nothing is applied.
pub fn steps_as_owners(steps: &[Step], caller: pg_sys::Oid) -> Vec<Skipped> {
    // SAFETY: in the database worker's transaction, connected as the
    // bootstrap superuser; every switch below is undone before the next
    // statement (or by the abort of its subtransaction or transaction).
    unsafe { pin_session_authorization() };
    let bootstrap = pg_sys::Oid::from(pg_sys::BOOTSTRAP_SUPERUSERID);
    if role_name(caller).is_none() {
        pgrx::error!(
            "cloudmig: the role that started the task (oid {}) no longer exists",
            u32::from(caller)
        );
    }
    // SAFETY: a catalog lookup in a transaction.
    let caller_is_superuser = unsafe { pg_sys::superuser_arg(caller) };
    let mut roles: HashMap<String, (pg_sys::Oid, bool)> = HashMap::new();
    let mut skipped = Vec::new();
    for step in steps {
        let (owner, kind, statement) = match step {
            Step::Setting(statement) => {
                run_or_raise(statement);
                continue;
            }
            Step::Run {
                owner,
                kind,
                statement,
            } => (owner, *kind, statement),
        };
        let owner_role = owner.as_ref().map(|name| {
            *roles
                .entry(name.clone())
                .or_insert_with(|| role_by_name(name))
        });
        let authorized;
        let statement = match (kind, owner, caller_is_superuser) {
            (StepKind::Schema, Some(owner), true) => {
                authorized = format!(
                    "{} AUTHORIZATION {};",
                    statement.trim_end().trim_end_matches(';'),
                    crate::source::quote_ident(owner)
                );
                &authorized
            }
            _ => statement,
        };
        let (role, may_fail) = match (kind, owner_role, caller_is_superuser) {
            (StepKind::NoCode | StepKind::Schema, _, true) | (_, None, true) => (None, false),
            (_, Some((oid, _)), true) => (Some(oid), kind == StepKind::SuperuserOnly),
            (_, Some((oid, false)), false) => (Some(oid), kind != StepKind::Object),
            // A superuser's object (or no one's) for a caller who is not one:
            // nothing runs as a superuser on their behalf.
            (_, _, false) => (Some(caller), true),
        };
        let ran_as = || match role {
            Some(oid) => role_name(oid).unwrap_or_default(),
            None => role_name(bootstrap).unwrap_or_default(),
        };
        let run = || match role {
            Some(oid) => {
                // SAFETY: see above; dropped at the end of this closure.
                let _as_owner = unsafe { SessionAs::switch(oid) };
                run_or_raise(statement);
            }
            None => run_or_raise(statement),
        };
        if may_fail {
            if let Err(reason) = in_subtransaction(run) {
                skipped.push(Skipped {
                    what: super::script::describe(statement),
                    owner: owner.clone().unwrap_or_default(),
                    ran_as: ran_as(),
                    reason,
                });
            }
        } else {
            run();
        }
        if !identity_is(bootstrap) {
            pgrx::error!(
                "cloudmig: the schema script changed the session's identity ({})",
                super::script::describe(statement)
            );
        }
    }
    skipped
}

/// Runs one statement, parsed with standard_conforming_strings on as the
/// lexer read it; an SPI status error becomes an ERROR.
fn run_or_raise(statement: &str) {
    // SAFETY: reads a setting's variable on the backend's main thread.
    let standard = unsafe { pg_sys::standard_conforming_strings };
    let result = if standard {
        execute_utf8(statement)
    } else {
        run_utf8(statement)
    };
    if let Err(e) = result {
        pgrx::error!("{e}");
    }
}

/// Runs `body` in a subtransaction: its ERROR is rolled back and returned.
fn in_subtransaction(body: impl FnOnce()) -> Result<(), String> {
    // SAFETY: the subtransaction sequence of PL/pgSQL's exception blocks
    // (pl_exec.c exec_stmt_block), on the backend's main thread.
    unsafe {
        let context = pg_sys::CurrentMemoryContext;
        let owner = pg_sys::CurrentResourceOwner;
        pg_sys::BeginInternalSubTransaction(std::ptr::null());
        let body = AssertUnwindSafe(body);
        let result = PgTryBuilder::new(AssertUnwindSafe(move || {
            (body.0)();
            Ok(())
        }))
        .catch_others(|error| {
            Err(match &error {
                CaughtError::PostgresError(report) | CaughtError::ErrorReport(report) => {
                    report.message().to_string()
                }
                CaughtError::RustPanic { ereport, .. } => ereport.message().to_string(),
            })
        })
        .execute();
        match result {
            Ok(()) => pg_sys::ReleaseCurrentSubTransaction(),
            Err(_) => pg_sys::RollbackAndReleaseCurrentSubTransaction(),
        }
        pg_sys::MemoryContextSwitchTo(context);
        pg_sys::CurrentResourceOwner = owner;
        result
    }
}

/// A role by name, and whether it is a superuser; an ERROR if it does not
/// exist here (the roles step creates every role of the source).
fn role_by_name(name: &str) -> (pg_sys::Oid, bool) {
    let c_name = CString::new(name.replace('\0', "")).unwrap_or_default();
    // SAFETY: catalog lookups in a transaction; get_role_oid raises the
    // usual "role does not exist" ERROR.
    unsafe {
        let oid = pg_sys::get_role_oid(c_name.as_ptr(), false);
        (oid, pg_sys::superuser_arg(oid))
    }
}

fn role_name(oid: pg_sys::Oid) -> Option<String> {
    // SAFETY: a catalog lookup in a transaction; NULL when there is none.
    unsafe {
        let name = pg_sys::GetUserNameFromId(oid, true);
        (!name.is_null()).then(|| {
            std::ffi::CStr::from_ptr(name)
                .to_string_lossy()
                .into_owned()
        })
    }
}

/// Runs `body` as `role` (see [`SessionAs`]), or as the role that started
/// the task when `role` is a superuser and that caller is not.
pub fn as_owner_for<R>(role: pg_sys::Oid, caller: pg_sys::Oid, body: impl FnOnce() -> R) -> R {
    // SAFETY: catalog lookups and a switch undone when `_as` is dropped,
    // in the caller's transaction.
    unsafe {
        pin_session_authorization();
        let role = if pg_sys::superuser_arg(role) && !pg_sys::superuser_arg(caller) {
            caller
        } else {
            role
        };
        let _as = SessionAs::switch(role);
        body()
    }
}

/// Runs utility statements (e.g. `CREATE DATABASE`), given in UTF-8, as
/// top-level commands.
/// Must be called in a transaction that is not a transaction block (a
/// background worker's own StartTransactionCommand is one).
pub fn toplevel_utility(sql: &str) {
    if let Err(e) = standard_strings_on() {
        pgrx::error!("cloudmig: could not set standard_conforming_strings: {e}");
    }
    let utf8 = CString::new(sql.replace('\0', "")).unwrap_or_default();
    // SAFETY: as in run_utf8; copied out at once.
    let query = unsafe {
        let converted = pg_sys::pg_any_to_server(
            utf8.as_ptr(),
            utf8.as_bytes().len() as i32,
            pg_sys::pg_enc::PG_UTF8 as i32,
        );
        std::ffi::CStr::from_ptr(converted).to_owned()
    };
    // SAFETY: the parse/analyze/plan/ProcessUtility sequence of
    // exec_simple_query, on the backend's main thread inside a transaction;
    // every pointer comes from the previous call.
    unsafe {
        let raw_statements = pg_sys::pg_parse_query(query.as_ptr());
        for raw in list_pointers::<pg_sys::RawStmt>(raw_statements) {
            let queries = pg_sys::pg_analyze_and_rewrite_fixedparams(
                raw,
                query.as_ptr(),
                std::ptr::null(),
                0,
                std::ptr::null_mut(),
            );
            let planned = pg_sys::pg_plan_queries(
                queries,
                query.as_ptr(),
                pg_sys::CURSOR_OPT_PARALLEL_OK as i32,
                std::ptr::null_mut(),
            );
            for statement in list_pointers::<pg_sys::PlannedStmt>(planned) {
                if (*statement).commandType != pg_sys::CmdType::CMD_UTILITY {
                    pgrx::error!("cloudmig: only utility statements run at top level");
                }
                pg_sys::PushActiveSnapshot(pg_sys::GetTransactionSnapshot());
                pg_sys::ProcessUtility(
                    statement,
                    query.as_ptr(),
                    false,
                    pg_sys::ProcessUtilityContext::PROCESS_UTILITY_TOPLEVEL,
                    std::ptr::null_mut(),
                    std::ptr::null_mut(),
                    pg_sys::None_Receiver,
                    std::ptr::null_mut(),
                );
                pg_sys::PopActiveSnapshot();
                pg_sys::CommandCounterIncrement();
            }
        }
    }
}

/// The pointer elements of a PostgreSQL List.
///
/// # Safety
/// `list` must be NIL or a valid List of pointers to `T`.
unsafe fn list_pointers<T>(list: *mut pg_sys::List) -> Vec<*mut T> {
    if list.is_null() {
        return Vec::new();
    }
    let length = (*list).length.max(0) as usize;
    (0..length)
        .map(|i| (*(*list).elements.add(i)).ptr_value as *mut T)
        .collect()
}
