//! SPI for the few statements the apply and verify run as SQL (TRUNCATE,
//! session settings, fingerprints), speaking UTF-8 to the caller and the
//! database's own encoding to the server.
//!
//! pgoutput sends names and text values converted to the replication
//! connection's client encoding, UTF-8; a destination database may be LATIN1
//! or another server encoding. Every SQL text is converted here before it
//! reaches the server (a no-op check in a UTF-8 database), and results are
//! converted back.
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
