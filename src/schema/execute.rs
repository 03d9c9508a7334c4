//! Running SQL in this server on behalf of a migration.
//!
//! A pg_dump script runs through SPI as one multi-statement string, so it is
//! applied atomically in the caller's transaction. `CREATE DATABASE` refuses
//! to run inside a function (SPI), so [`toplevel_utility`] plans and runs
//! such a statement as a top-level command, as `exec_simple_query` does.

use pgrx::prelude::*;
use std::ffi::CString;

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

/// Runs a whole script (several statements) in this database: see [`run_utf8`].
pub fn script(sql: &str) -> Result<(), pgrx::spi::Error> {
    run_utf8(sql)
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
