//! Typed access to cloudmig's own tables. Nothing else reads or writes them.
//!
//! Writes run as the extension owner ([`as_extension_owner`]): callers (members
//! of `cloudmig_admin`) can read the public tables but cannot write them, so
//! an assessment row can only come from `cloudmig.assess()` itself, and the
//! secrets table stays readable by the owner alone.

pub mod assessments;
pub mod schema_drift;
pub mod secrets;
pub mod tasks;

use pgrx::prelude::*;

/// The `search_path` of everything cloudmig runs with elevated rights: only
/// the system catalog, temporary objects last (as PostgreSQL recommends for
/// SECURITY DEFINER functions), so no operator or function of a caller's
/// schema can stand in for one that cloudmig's SQL names.
pub const SAFE_SEARCH_PATH: &std::ffi::CStr = c"pg_catalog, pg_temp";

/// Runs `body` with the current user switched to the owner of the cloudmig
/// extension and `search_path` pinned to [`SAFE_SEARCH_PATH`], as PostgreSQL
/// does for a SECURITY DEFINER function with `SET search_path` (fmgr.c's
/// `fmgr_security_definer`: a new GUC nest level, the setting saved in it,
/// the level popped on return). The previous user and path are restored on
/// return and on error (PostgreSQL's (sub)transaction abort restores them
/// too).
pub fn as_extension_owner<R>(body: impl FnOnce() -> R) -> R {
    let owner = Spi::get_one::<pg_sys::Oid>(
        "SELECT extowner FROM pg_catalog.pg_extension \
          WHERE extname OPERATOR(pg_catalog.=) 'cloudmig'::pg_catalog.name",
    )
    .ok()
    .flatten();
    let Some(owner) = owner else {
        return body();
    };
    struct Restore {
        user: pg_sys::Oid,
        context: i32,
        guc_level: i32,
    }
    impl Drop for Restore {
        fn drop(&mut self) {
            // SAFETY: restores the values saved below, on the same backend;
            // popping our GUC level also pops any level a failed call left
            // above it, as a subtransaction abort would.
            unsafe {
                pg_sys::AtEOXact_GUC(!std::thread::panicking(), self.guc_level);
                pg_sys::SetUserIdAndSecContext(self.user, self.context);
            }
        }
    }
    let mut user = pg_sys::InvalidOid;
    let mut context = 0;
    // SAFETY: out-parameters are valid; switching user for our own catalog
    // writes with SECURITY_LOCAL_USERID_CHANGE prevents SET ROLE meanwhile;
    // the GUC level is popped by Restore (or by the transaction's abort).
    let guc_level = unsafe {
        pg_sys::GetUserIdAndSecContext(&mut user, &mut context);
        let guc_level = pg_sys::NewGUCNestLevel();
        pg_sys::SetUserIdAndSecContext(
            owner,
            context | pg_sys::SECURITY_LOCAL_USERID_CHANGE as i32,
        );
        guc_level
    };
    let _restore = Restore {
        user,
        context,
        guc_level,
    };
    pin_search_path(pg_sys::GucAction::GUC_ACTION_SAVE);
    body()
}

/// Sets `search_path` to [`SAFE_SEARCH_PATH`]: saved in the current GUC nest
/// level (`GUC_ACTION_SAVE`, see [`as_extension_owner`]) or for the session
/// (`GUC_ACTION_SET`, background workers in the control database).
pub fn pin_search_path(action: pg_sys::GucAction::Type) {
    // SAFETY: valid NUL-terminated strings, on the backend's main thread;
    // search_path is a user setting, so this cannot fail for lack of rights.
    unsafe {
        pg_sys::set_config_option(
            c"search_path".as_ptr(),
            SAFE_SEARCH_PATH.as_ptr(),
            pg_sys::GucContext::PGC_USERSET,
            pg_sys::GucSource::PGC_S_SESSION,
            action,
            true,
            0,
            false,
        );
    }
}

/// Runs `body` (SPI reads) through a snapshot taken now instead of the
/// calling statement's. A function that polls our tables (`cloudmig.wait`)
/// otherwise keeps reading what was committed when its statement started:
/// pgrx runs a SELECT as a read-only SPI query, which uses the active
/// snapshot, and a C function's statement never takes another one.
pub fn at_latest_snapshot<R>(body: impl FnOnce() -> R) -> R {
    // SAFETY: inside a transaction (any SQL function is); PushActiveSnapshot
    // copies the static snapshot GetLatestSnapshot returns.
    unsafe { pg_sys::PushActiveSnapshot(pg_sys::GetLatestSnapshot()) };
    let result = body();
    // SAFETY: pops the snapshot pushed above. On an error (a panic unwinding
    // past here) the (sub)transaction abort unwinds the snapshot stack itself.
    unsafe { pg_sys::PopActiveSnapshot() };
    result
}

/// The first column of the first row of `query`, or None when it returns no
/// row (pgrx's `Spi::get_one` treats "no row" as an error).
pub fn first_value<T: pgrx::IntoDatum + pgrx::FromDatum>(
    query: &str,
    args: &[pgrx::datum::DatumWithOid<'_>],
) -> Result<Option<T>, pgrx::spi::Error> {
    Spi::connect(|client| {
        let table = client.select(query, Some(1), args)?;
        if table.is_empty() {
            Ok(None)
        } else {
            table.first().get_one::<T>()
        }
    })
}
