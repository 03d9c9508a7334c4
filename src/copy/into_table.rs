//! Streams rows into a local table through PostgreSQL's COPY FROM, fed by a
//! closure that yields the source's `COPY ... TO STDOUT` chunks.
//!
//! PostgreSQL's data-source callback carries no user pointer, so the feed is
//! parked in a thread-local for the duration of one [`copy_into`] call, the
//! way tablesync.c parks its connection in a global. Only the backend's main
//! thread ever runs this.

use bytes::{Buf, Bytes};
use pgrx::prelude::*;
use std::cell::RefCell;
use std::ffi::CString;

/// Yields the next chunk of COPY text data, None at the end.
pub type NextChunk<'a> = dyn FnMut() -> Result<Option<Bytes>, String> + 'a;

/// The feed of the COPY in progress.
struct Feed {
    /// Valid only while `copy_into` runs (it clears it before returning,
    /// also on unwind).
    next: *mut NextChunk<'static>,
    pending: Bytes,
    bytes: u64,
    rows: u64,
    progress: *mut dyn FnMut(u64, u64),
}

thread_local! {
    static FEED: RefCell<Option<Feed>> = const { RefCell::new(None) };
}

/// Clears the feed on every way out of `copy_into`.
struct ClearFeed;

impl Drop for ClearFeed {
    fn drop(&mut self) {
        FEED.with(|feed| feed.borrow_mut().take());
    }
}

/// What one COPY moved.
#[derive(Debug, Clone, Copy, Default)]
pub struct CopyStats {
    pub rows: u64,
    pub bytes: u64,
}

/// Copies into `schema.table` (columns `columns`, in the order the source
/// sends them; empty means all) everything `next` yields. `progress(rows,
/// bytes)` is called after every chunk. Must run inside a transaction; raises
/// an ERROR (after which the caller aborts) on bad data or a feed error.
/// `freeze`: write the rows frozen (`COPY ... FREEZE`) when PostgreSQL allows
/// it, that is when the table was created or truncated in this very
/// transaction; they are then never rewritten to set hint bits or to be
/// frozen by vacuum (the index builds that follow read them clean).
pub fn copy_into(
    schema: &str,
    table: &str,
    columns: &[String],
    freeze: bool,
    next: &mut NextChunk<'_>,
    progress: &mut dyn FnMut(u64, u64),
) -> CopyStats {
    // SAFETY: the lifetime is erased only for the thread-local; ClearFeed
    // removes the pointer before `next` and `progress` go out of scope.
    let next: *mut NextChunk<'static> = unsafe { std::mem::transmute(next as *mut NextChunk<'_>) };
    let progress: *mut dyn FnMut(u64, u64) = unsafe { std::mem::transmute(progress) };
    FEED.with(|feed| {
        *feed.borrow_mut() = Some(Feed {
            next,
            pending: Bytes::new(),
            bytes: 0,
            rows: 0,
            progress,
        })
    });
    let _clear = ClearFeed;
    let schema_c = server_encoded(schema);
    let table_c = server_encoded(table);
    let column_names: Vec<CString> = columns.iter().map(|c| server_encoded(c)).collect();
    // SAFETY: the COPY FROM sequence of tablesync.c's copy_table(), on the
    // main thread inside a transaction; names are copied into palloc'd memory.
    unsafe {
        let range_var = pg_sys::makeRangeVar(
            pg_sys::pstrdup(schema_c.as_ptr()),
            pg_sys::pstrdup(table_c.as_ptr()),
            -1,
        );
        let rel = pg_sys::table_openrv(range_var, pg_sys::RowExclusiveLock as i32);
        let pstate = pg_sys::make_parsestate(std::ptr::null_mut());
        pg_sys::addRangeTableEntryForRelation(
            pstate,
            rel,
            pg_sys::AccessShareLock as i32,
            std::ptr::null_mut(),
            false,
            false,
        );
        let mut attnames: *mut pg_sys::List = std::ptr::null_mut();
        for name in &column_names {
            attnames = pg_sys::lappend(
                attnames,
                pg_sys::makeString(pg_sys::pstrdup(name.as_ptr())).cast(),
            );
        }
        // The source connection speaks UTF8 (cloudmig asks for it), whatever
        // the encoding of this database: COPY converts from there.
        let encoding = pg_sys::makeDefElem(
            pg_sys::pstrdup(c"encoding".as_ptr()),
            pg_sys::makeString(pg_sys::pstrdup(c"UTF8".as_ptr())).cast(),
            -1,
        );
        let mut options = pg_sys::lappend(std::ptr::null_mut(), encoding.cast());
        // The conditions copy.c's CopyFrom() checks for FREEZE, tested first
        // so that a table that does not meet them is copied the plain way
        // instead of failing.
        let subxact = pg_sys::GetCurrentSubTransactionId();
        let freeze = freeze
            && ((*rel).rd_createSubid == subxact || (*rel).rd_newRelfilenodeSubid == subxact)
            && pg_sys::ThereAreNoPriorRegisteredSnapshots()
            && pg_sys::ThereAreNoReadyPortals();
        if freeze {
            let option = pg_sys::makeDefElem(
                pg_sys::pstrdup(c"freeze".as_ptr()),
                pg_sys::makeBoolean(true).cast(),
                -1,
            );
            options = pg_sys::lappend(options, option.cast());
        }
        // Defaults, CHECK and domain constraints, index expressions and
        // triggers of the migrated schema run with the table owner's rights.
        let owner = crate::owner::AsOwner::switch((*(*rel).rd_rel).relowner);
        let cstate = pg_sys::BeginCopyFrom(
            pstate,
            rel,
            std::ptr::null_mut(),
            std::ptr::null(),
            false,
            Some(read_copy_data),
            attnames,
            options,
        );
        pg_sys::CopyFrom(cstate);
        pg_sys::EndCopyFrom(cstate);
        drop(owner);
        pg_sys::table_close(rel, pg_sys::NoLock as i32);
    }
    FEED.with(|feed| {
        feed.borrow()
            .as_ref()
            .map(|f| CopyStats {
                rows: f.rows,
                bytes: f.bytes,
            })
            .unwrap_or_default()
    })
}

/// A name from the source (UTF-8) in this database's encoding.
fn server_encoded(name: &str) -> CString {
    let utf8 = CString::new(name.replace('\0', "")).unwrap_or_default();
    // SAFETY: pg_any_to_server returns its input or a palloc'd converted,
    // NUL-terminated copy, which is copied out at once.
    unsafe {
        let converted = pg_sys::pg_any_to_server(
            utf8.as_ptr(),
            utf8.as_bytes().len() as i32,
            pg_sys::pg_enc::PG_UTF8 as i32,
        );
        std::ffi::CStr::from_ptr(converted).to_owned()
    }
}

/// COPY FROM's data source: fills `outbuf` with at least `minread` and at
/// most `maxread` bytes, or fewer at the end of the data.
#[pg_guard]
unsafe extern "C-unwind" fn read_copy_data(
    outbuf: *mut std::ffi::c_void,
    minread: std::ffi::c_int,
    maxread: std::ffi::c_int,
) -> std::ffi::c_int {
    let (minread, maxread) = (minread.max(0) as usize, maxread.max(0) as usize);
    let mut written = 0usize;
    let mut failure = None;
    FEED.with(|feed| {
        let mut feed = feed.borrow_mut();
        let Some(feed) = feed.as_mut() else {
            failure = Some("cloudmig: COPY data requested with no source attached".to_string());
            return;
        };
        while written < maxread {
            if feed.pending.is_empty() {
                if written >= minread.max(1) {
                    break;
                }
                // SAFETY: the pointer is valid while copy_into runs.
                match unsafe { (*feed.next)() } {
                    Ok(Some(chunk)) => {
                        feed.bytes += chunk.len() as u64;
                        feed.rows += chunk.iter().filter(|&&b| b == b'\n').count() as u64;
                        // SAFETY: as above.
                        unsafe { (*feed.progress)(feed.rows, feed.bytes) };
                        feed.pending = chunk;
                        continue;
                    }
                    Ok(None) => break,
                    Err(error) => {
                        failure = Some(error);
                        break;
                    }
                }
            }
            let n = feed.pending.len().min(maxread - written);
            // SAFETY: outbuf has room for maxread bytes (COPY's contract).
            unsafe {
                std::ptr::copy_nonoverlapping(
                    feed.pending.as_ptr(),
                    (outbuf as *mut u8).add(written),
                    n,
                );
            }
            feed.pending.advance(n);
            written += n;
        }
    });
    if let Some(message) = failure {
        pgrx::error!("{message}");
    }
    written as std::ffi::c_int
}
