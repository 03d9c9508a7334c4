//! Keeps the source password out of every place PostgreSQL would copy the
//! statement text (or its parameters) to.
//!
//! The conninfo or password is an argument of the SQL call, so the statement
//! text (simple query protocol) or a bind parameter (extended protocol) holds
//! it. What an extension can reach, once its function runs, and what it does:
//!
//! | where the text goes | when | what we do |
//! |---|---|---|
//! | `pg_stat_activity.query` | while the call runs | replaced (`pgstat_report_activity`) |
//! | `STATEMENT:` of an ERROR (`log_min_error_statement`) | on error | off for the transaction; text scrubbed |
//! | `duration: ... statement:` (`log_min_duration_statement`, `log_min_duration_sample`, `log_transaction_sample_rate`) | after the statement, simple protocol: after the commit | the text is scrubbed in place (postgres.c logs `query_string`, the buffer `debug_query_string` points to) |
//! | `duration: ... execute ...` with `DETAIL: parameters:` | after Execute, extended protocol, before the commit | duration logging off for the transaction, the transaction's sampling off |
//! | auto_explain's `Query Text:` and plans | at executor end, in the transaction | `auto_explain.log_min_duration = -1` for the transaction |
//!
//! Out of reach (the README says so): `log_statement = 'all'` logs the text
//! before any function runs, and so does the extended protocol's Bind step
//! under `log_min_duration_statement` (with its parameters).

use pgrx::pg_sys;
use std::ffi::{CStr, CString};

/// Replaces this backend's query text in `pg_stat_activity` and in the
/// server's own buffer with `shown`, and keeps the statement and its
/// parameters out of the log for the rest of the transaction.
pub fn hide_statement_text(shown: &str) {
    let shown = CString::new(shown.replace('\0', "")).unwrap_or_default();
    // SAFETY: both functions are called on the backend's main thread with
    // valid NUL-terminated strings.
    unsafe {
        pg_sys::pgstat_report_activity(pg_sys::BackendState::STATE_RUNNING, shown.as_ptr());
    }
    set_locally(c"log_min_error_statement", c"panic");
    set_locally(c"log_min_duration_statement", c"-1");
    set_locally(c"log_min_duration_sample", c"-1");
    if setting_exists(c"auto_explain.log_min_duration") {
        set_locally(c"auto_explain.log_min_duration", c"-1");
    }
    // SAFETY: a plain global of the backend, read by check_log_duration.
    unsafe { pg_sys::xact_is_sampled = false };
    scrub_query_buffer(shown.as_bytes());
}

/// Sets a setting for the rest of the transaction. PGC_SUSET lets extension
/// code set a superuser-only GUC for its own transaction, as the server
/// itself does.
fn set_locally(name: &CStr, value: &CStr) {
    // SAFETY: valid NUL-terminated strings, on the backend's main thread.
    unsafe {
        pg_sys::set_config_option(
            name.as_ptr(),
            value.as_ptr(),
            pg_sys::GucContext::PGC_SUSET,
            pg_sys::GucSource::PGC_S_SESSION,
            pg_sys::GucAction::GUC_ACTION_LOCAL,
            true,
            0,
            false,
        );
    }
}

fn setting_exists(name: &CStr) -> bool {
    // SAFETY: missing_ok = true returns NULL for an unknown setting;
    // restrict_privileged = false reads it whoever the caller is.
    unsafe { !pg_sys::GetConfigOption(name.as_ptr(), true, false).is_null() }
}

/// Overwrites the text `debug_query_string` points to, in place: `shown`,
/// then spaces up to the original length (the terminating NUL stays where it
/// was, so nothing reading a statement's location and length inside that
/// buffer reads past it). In the simple query protocol this is the very
/// buffer exec_simple_query logs after the commit (`query_string`) and the
/// portal's source text that auto_explain prints; in the extended protocol
/// it is the portal's copy of the prepared text, which holds `$1`, not the
/// password. Other statements sent in the same query string lose their text
/// in the log too: a price for a call that carries a password.
fn scrub_query_buffer(shown: &[u8]) {
    // SAFETY: debug_query_string is NULL or a NUL-terminated string in
    // palloc'd memory owned by the server for the current statement (the
    // protocol message, a portal's or a plan source's copy); writing within
    // its length keeps it a valid string of the same length.
    unsafe {
        let text = pg_sys::debug_query_string as *mut u8;
        if text.is_null() {
            return;
        }
        let len = CStr::from_ptr(text as *const std::ffi::c_char)
            .to_bytes()
            .len();
        let buffer = std::slice::from_raw_parts_mut(text, len);
        for (i, byte) in buffer.iter_mut().enumerate() {
            *byte = shown.get(i).copied().unwrap_or(b' ');
        }
    }
}
