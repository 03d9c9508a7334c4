//! SPI for the apply, speaking UTF-8 to the caller and the database's own
//! encoding to the server.
//!
//! pgoutput sends names and text values converted to the replication
//! connection's client encoding, UTF-8; a destination database may be LATIN1
//! or another server encoding. Every SQL text and parameter is converted here
//! before it reaches the server (a no-op check in a UTF-8 database), and
//! results are converted back. Parameters are `text`; statements cast them.
//!
//! Must run inside a transaction between [`connect`] and [`finish`].

use pgrx::prelude::*;
use std::ffi::{CStr, CString};

/// Why an SPI call failed without raising an ERROR.
#[derive(Debug, thiserror::Error)]
#[error("SPI {what} failed with code {code}")]
pub struct SpiFailure {
    pub what: &'static str,
    pub code: i32,
}

/// A statement prepared once and kept across transactions.
pub struct Plan {
    plan: pg_sys::SPIPlanPtr,
    parameters: usize,
}

fn to_server(utf8: &[u8]) -> Vec<u8> {
    if utf8.is_empty() {
        return Vec::new();
    }
    // SAFETY: pg_any_to_server reads `len` bytes and returns either the input
    // pointer (nothing to convert) or a palloc'd NUL-terminated copy.
    unsafe {
        let input = utf8.as_ptr() as *const std::ffi::c_char;
        let converted =
            pg_sys::pg_any_to_server(input, utf8.len() as i32, pg_sys::pg_enc::PG_UTF8 as i32);
        if std::ptr::eq(converted, input) {
            utf8.to_vec()
        } else {
            CStr::from_ptr(converted).to_bytes().to_vec()
        }
    }
}

fn to_utf8(server: &CStr) -> String {
    let bytes = server.to_bytes();
    // SAFETY: as above, in the other direction.
    unsafe {
        let input = bytes.as_ptr() as *const std::ffi::c_char;
        let converted =
            pg_sys::pg_server_to_any(input, bytes.len() as i32, pg_sys::pg_enc::PG_UTF8 as i32);
        if std::ptr::eq(converted, input) {
            String::from_utf8_lossy(bytes).into_owned()
        } else {
            CStr::from_ptr(converted).to_string_lossy().into_owned()
        }
    }
}

fn sql_cstring(sql: &str) -> CString {
    CString::new(to_server(sql.as_bytes())).unwrap_or_default()
}

/// Opens SPI for the current transaction.
pub fn connect() -> Result<(), SpiFailure> {
    // SAFETY: on the main thread inside a transaction.
    let code = unsafe { pg_sys::SPI_connect() };
    if code < 0 {
        return Err(SpiFailure {
            what: "connect",
            code,
        });
    }
    Ok(())
}

/// Closes SPI before the transaction commits.
pub fn finish() {
    // SAFETY: paired with `connect`.
    unsafe { pg_sys::SPI_finish() };
}

/// Prepares `sql` taking `parameters` text parameters; the plan outlives the
/// transaction (the plan cache invalidates it on DDL).
pub fn prepare(sql: &str, parameters: usize) -> Result<Plan, SpiFailure> {
    let query = sql_cstring(sql);
    let mut types = vec![pg_sys::TEXTOID; parameters];
    // SAFETY: valid C string and argument type array; SPI is connected.
    unsafe {
        let plan = pg_sys::SPI_prepare(query.as_ptr(), parameters as i32, types.as_mut_ptr());
        if plan.is_null() {
            return Err(SpiFailure {
                what: "prepare",
                code: pg_sys::SPI_result,
            });
        }
        let code = pg_sys::SPI_keepplan(plan);
        if code < 0 {
            return Err(SpiFailure {
                what: "keepplan",
                code,
            });
        }
        Ok(Plan { plan, parameters })
    }
}

thread_local! {
    /// Where the parameter values of one change live; reset after each
    /// change, so a transaction of a million rows does not accumulate them
    /// (as worker.c resets ApplyMessageContext per message).
    static VALUES_CONTEXT: std::cell::Cell<pg_sys::MemoryContext> =
        const { std::cell::Cell::new(std::ptr::null_mut()) };
}

fn values_context() -> pg_sys::MemoryContext {
    VALUES_CONTEXT.with(|cell| {
        if cell.get().is_null() {
            // SAFETY: a child of TopMemoryContext, created once per process.
            let context = unsafe {
                pg_sys::AllocSetContextCreateInternal(
                    pg_sys::TopMemoryContext,
                    c"cloudmig apply values".as_ptr(),
                    pg_sys::ALLOCSET_DEFAULT_MINSIZE as usize,
                    pg_sys::ALLOCSET_DEFAULT_INITSIZE as usize,
                    pg_sys::ALLOCSET_DEFAULT_MAXSIZE as usize,
                )
            };
            cell.set(context);
        }
        cell.get()
    })
}

/// Executes a plan with UTF-8 text values (None is NULL); returns the rows
/// it processed.
pub fn execute(plan: &Plan, values: &[Option<&[u8]>]) -> Result<u64, SpiFailure> {
    let context = values_context();
    // SAFETY: switch to the per-change context for the values and back; the
    // executor is done with them when SPI_execute_plan returns.
    let previous = unsafe { pg_sys::MemoryContextSwitchTo(context) };
    let result = execute_in_current_context(plan, values);
    unsafe {
        pg_sys::MemoryContextSwitchTo(previous);
        pg_sys::MemoryContextReset(context);
    }
    result
}

fn execute_in_current_context(plan: &Plan, values: &[Option<&[u8]>]) -> Result<u64, SpiFailure> {
    let mut datums = Vec::with_capacity(plan.parameters);
    let mut nulls = Vec::with_capacity(plan.parameters);
    for index in 0..plan.parameters {
        match values.get(index).copied().flatten() {
            Some(value) => {
                let server = to_server(value);
                // SAFETY: builds a text datum in the current memory context.
                let text = unsafe {
                    pg_sys::cstring_to_text_with_len(
                        server.as_ptr() as *const std::ffi::c_char,
                        server.len() as i32,
                    )
                };
                datums.push(pg_sys::Datum::from(text));
                nulls.push(b' ' as std::ffi::c_char);
            }
            None => {
                datums.push(pg_sys::Datum::from(0usize));
                nulls.push(b'n' as std::ffi::c_char);
            }
        }
    }
    // SAFETY: arrays sized to the plan's parameter count; SPI is connected.
    unsafe {
        let code =
            pg_sys::SPI_execute_plan(plan.plan, datums.as_mut_ptr(), nulls.as_ptr(), false, 0);
        if code < 0 {
            return Err(SpiFailure {
                what: "execute",
                code,
            });
        }
        Ok(pg_sys::SPI_processed)
    }
}

/// Runs `sql` (UTF-8) and returns every row as UTF-8 text values.
pub fn query(sql: &str) -> Result<Vec<Vec<Option<String>>>, SpiFailure> {
    let query = sql_cstring(sql);
    // SAFETY: SPI is connected; the tuple table is read before the next call.
    unsafe {
        let code = pg_sys::SPI_execute(query.as_ptr(), false, 0);
        if code < 0 {
            return Err(SpiFailure {
                what: "execute",
                code,
            });
        }
        let table = pg_sys::SPI_tuptable;
        let mut rows = Vec::new();
        if table.is_null() {
            return Ok(rows);
        }
        let columns = (*(*table).tupdesc).natts;
        for row in 0..pg_sys::SPI_processed as usize {
            let tuple = *(*table).vals.add(row);
            let mut values = Vec::with_capacity(columns as usize);
            for column in 1..=columns {
                let value = pg_sys::SPI_getvalue(tuple, (*table).tupdesc, column);
                values.push((!value.is_null()).then(|| to_utf8(CStr::from_ptr(value))));
            }
            rows.push(values);
        }
        Ok(rows)
    }
}
