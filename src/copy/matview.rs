//! A materialized view's contents as on the source. REFRESH here would run
//! the destination's query over the destination's tables: a view the source
//! refreshed at 9:00 whose base tables changed since would get other rows.
//! So the source's rows (`COPY (SELECT * FROM view) TO STDOUT`) go into a new
//! heap, which then takes the view's place the way REFRESH does it
//! (matview.c `refresh_by_heap_swap`): `make_new_heap`, filled, then
//! `finish_heap_swap` swaps the relfilenodes and rebuilds the indexes.

use super::into_table::{self, NextChunk};
use super::objects::ObjectsError;
use crate::schema::execute::run_utf8;
use pgrx::pg_sys::{self, Oid};
use pgrx::prelude::*;

// cluster.c: exported by the server, not in pgrx's bindings. Called only
// through pg_sys::ffi::pg_guard_ffi_boundary (an ERROR becomes a Rust
// unwind to the caller's transaction abort).
unsafe extern "C-unwind" {
    fn make_new_heap(
        old_heap: Oid,
        new_tablespace: Oid,
        new_access_method: Oid,
        relpersistence: std::ffi::c_char,
        lockmode: pg_sys::LOCKMODE,
    ) -> Oid;
    fn finish_heap_swap(
        old_heap: Oid,
        new_heap: Oid,
        is_system_catalog: bool,
        swap_toast_by_content: bool,
        check_constraints: bool,
        is_internal: bool,
        frozen_xid: pg_sys::TransactionId,
        cutoff_multi: pg_sys::MultiXactId,
        newrelpersistence: std::ffi::c_char,
    );
}

/// The view here: its oid, owner and whether it is populated.
fn find(qualified: &str) -> Result<(Oid, Oid, bool), ObjectsError> {
    let found = Spi::connect(|client| {
        let mut rows = client.select(
            "SELECT oid, relowner, relispopulated FROM pg_catalog.pg_class \
              WHERE oid = $1::pg_catalog.regclass AND relkind = 'm'",
            None,
            &[qualified.into()],
        )?;
        match rows.next() {
            Some(row) => Ok::<_, pgrx::spi::Error>(Some((
                row.get::<Oid>(1)?.unwrap_or(pg_sys::InvalidOid),
                row.get::<Oid>(2)?.unwrap_or(pg_sys::InvalidOid),
                row.get::<bool>(3)?.unwrap_or(false),
            ))),
            None => Ok(None),
        }
    })?;
    found.ok_or_else(|| ObjectsError::Invalid(format!("no materialized view {qualified} here")))
}

/// Replaces the contents of materialized view `qualified` (quoted) here by
/// the rows `next` yields (COPY text of all its columns, in order), in the
/// caller's transaction; returns how many. What runs user code (the index
/// expressions of the rebuild) runs as the view's owner in a
/// security-restricted operation, as REFRESH does, or as `caller` when that
/// owner is a superuser and the caller is not (see `schema::execute`).
pub fn install(
    qualified: &str,
    caller: Oid,
    next: &mut NextChunk<'_>,
) -> Result<u64, ObjectsError> {
    let (view, owner, populated) = find(qualified)?;
    // As REFRESH without CONCURRENTLY: nobody reads it meanwhile.
    // (LOCK TABLE refuses materialized views; REFRESH locks it so too.)
    // SAFETY: in a transaction; the lock is released at its end.
    unsafe { pg_sys::LockRelationOid(view, pg_sys::AccessExclusiveLock as i32) };
    if !populated {
        // REFRESH marks it populated before filling it (its
        // SetMatViewPopulatedState is not exported); the swap keeps the mark.
        run_utf8(&format!(
            "UPDATE pg_catalog.pg_class SET relispopulated = true WHERE oid = {}",
            u32::from(view)
        ))?;
    }
    let rows = crate::schema::execute::as_owner_for(owner, caller, || {
        // SAFETY: in a transaction, with the view locked above; the calls
        // are those of ExecRefreshMatView and refresh_by_heap_swap, each
        // behind the ffi guard (an ERROR unwinds to the caller's abort).
        let (tablespace, access_method, persistence) = unsafe {
            pg_sys::CommandCounterIncrement();
            let relation = pg_sys::table_open(view, pg_sys::NoLock as i32);
            let form = (*relation).rd_rel;
            let found = ((*form).reltablespace, (*form).relam, (*form).relpersistence);
            pg_sys::table_close(relation, pg_sys::NoLock as i32);
            found
        };
        // SAFETY: as above.
        let new_heap = unsafe {
            let new_heap = pg_sys::ffi::pg_guard_ffi_boundary(|| {
                make_new_heap(
                    view,
                    tablespace,
                    access_method,
                    persistence,
                    pg_sys::ExclusiveLock as i32,
                )
            });
            pg_sys::LockRelationOid(new_heap, pg_sys::AccessExclusiveLock as i32);
            pg_sys::CommandCounterIncrement();
            new_heap
        };
        // SAFETY: the new heap exists in this transaction; the names are
        // palloc'd copies.
        let (schema, table) = unsafe {
            let name = pg_sys::get_rel_name(new_heap);
            let namespace = pg_sys::get_namespace_name(pg_sys::get_rel_namespace(new_heap));
            if name.is_null() || namespace.is_null() {
                return Err(ObjectsError::Invalid(format!(
                    "the new heap of {qualified} is gone"
                )));
            }
            (
                std::ffi::CStr::from_ptr(namespace)
                    .to_string_lossy()
                    .into_owned(),
                std::ffi::CStr::from_ptr(name)
                    .to_string_lossy()
                    .into_owned(),
            )
        };
        let stats = into_table::copy_into(&schema, &table, &[], true, next, &mut |_, _| {});
        // SAFETY: as above; the arguments are refresh_by_heap_swap's.
        unsafe {
            let frozen_xid = pg_sys::RecentXmin;
            let cutoff_multi = pg_sys::ReadNextMultiXactId();
            pg_sys::ffi::pg_guard_ffi_boundary(|| {
                finish_heap_swap(
                    view,
                    new_heap,
                    false,
                    false,
                    true,
                    true,
                    frozen_xid,
                    cutoff_multi,
                    persistence,
                )
            });
        }
        Ok(stats.rows)
    })?;
    Ok(rows)
}
