//! Keeps the source password out of places PostgreSQL would copy the
//! statement text to.
//!
//! The conninfo (password included) is an argument of the SQL call, so the
//! statement text holds it. Two places would show that text to others:
//! `pg_stat_activity.query` (visible to the same role and to superusers and
//! pg_read_all_stats members) and the server log's `STATEMENT:` line that
//! PostgreSQL adds to an ERROR under the default `log_min_error_statement`.
//! Both are closed here for the rest of the transaction. (`log_statement =
//! all` logs every statement before any extension code runs; the README says
//! so and recommends a passfile.)

use pgrx::pg_sys;
use std::ffi::CString;

/// Replaces this backend's query text in `pg_stat_activity` with `shown`, and
/// stops ERRORs of this transaction from logging the statement text.
pub fn hide_statement_text(shown: &str) {
    let shown = CString::new(shown.replace('\0', "")).unwrap_or_default();
    // SAFETY: both functions are called on the backend's main thread with
    // valid NUL-terminated strings; PGC_SUSET lets extension code set a
    // superuser-only GUC for its own transaction, as the server itself does.
    unsafe {
        pg_sys::pgstat_report_activity(pg_sys::BackendState::STATE_RUNNING, shown.as_ptr());
        pg_sys::set_config_option(
            c"log_min_error_statement".as_ptr(),
            c"panic".as_ptr(),
            pg_sys::GucContext::PGC_SUSET,
            pg_sys::GucSource::PGC_S_SESSION,
            pg_sys::GucAction::GUC_ACTION_LOCAL,
            true,
            0,
            false,
        );
    }
}
