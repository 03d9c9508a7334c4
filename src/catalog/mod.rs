//! Typed access to cloudmig's own tables. Nothing else reads or writes them.
//!
//! Writes run as the extension owner ([`as_extension_owner`]): callers (members
//! of `cloudmig_admin`) can read the public tables but cannot write them, so
//! an assessment row can only come from `cloudmig.assess()` itself, and the
//! secrets table stays readable by the owner alone.

pub mod assessments;
pub mod tasks;

use pgrx::prelude::*;

/// Runs `body` with the current user switched to the owner of the cloudmig
/// extension, as PostgreSQL itself does for referential-integrity checks.
/// The previous user is restored on return and on error (PostgreSQL's
/// transaction abort restores it too).
pub fn as_extension_owner<R>(body: impl FnOnce() -> R) -> R {
    let owner = Spi::get_one::<pg_sys::Oid>(
        "SELECT extowner FROM pg_catalog.pg_extension WHERE extname = 'cloudmig'",
    )
    .ok()
    .flatten();
    let Some(owner) = owner else {
        return body();
    };
    struct Restore(pg_sys::Oid, i32);
    impl Drop for Restore {
        fn drop(&mut self) {
            // SAFETY: restores the values read below, on the same backend.
            unsafe { pg_sys::SetUserIdAndSecContext(self.0, self.1) };
        }
    }
    let mut previous_user = pg_sys::InvalidOid;
    let mut previous_context = 0;
    // SAFETY: out-parameters are valid; switching user for our own catalog
    // writes with SECURITY_LOCAL_USERID_CHANGE prevents SET ROLE meanwhile.
    unsafe {
        pg_sys::GetUserIdAndSecContext(&mut previous_user, &mut previous_context);
        pg_sys::SetUserIdAndSecContext(
            owner,
            previous_context | pg_sys::SECURITY_LOCAL_USERID_CHANGE as i32,
        );
    }
    let _restore = Restore(previous_user, previous_context);
    body()
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
