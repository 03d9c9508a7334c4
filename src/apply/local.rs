//! What the applier knows about a local table: which local column each
//! source column fills, the input function of each column (so values go from
//! the source's text form to a datum once, with the local type's own
//! function, as worker.c's `slot_store_data` does), how rows are found, and
//! whose rights changes run with.
//!
//! It is built from the opened, locked relation and dropped whenever the
//! relation cache says the table changed (a relcache callback, as
//! logicalrep_relmap_invalidate_cb does), so local DDL is picked up at the
//! next change.

use super::executor::{Equality, FullIdentityIndex};
use crate::source::pgoutput::Column;
use pgrx::pg_sys;
use std::cell::RefCell;
use std::collections::HashSet;

/// How to turn the source's text form of a value into a local datum.
pub struct Input {
    function: pg_sys::FmgrInfo,
    io_param: pg_sys::Oid,
    type_modifier: i32,
}

/// How rows of a table are found for UPDATE and DELETE.
pub enum RowLookup {
    /// The local replica identity index, else the primary key.
    IdentityIndex(pg_sys::Oid),
    /// `REPLICA IDENTITY FULL`: every column the source sent is compared,
    /// through a usable index when there is one.
    Full {
        index: Option<FullIdentityIndex>,
        /// One per local column (None for dropped ones).
        equalities: Vec<Option<Equality>>,
    },
    /// Neither: the source cannot send UPDATE or DELETE for it either.
    None,
}

/// A local table mapped to the source relation that feeds it.
pub struct LocalTable {
    pub relid: pg_sys::Oid,
    pub owner: pg_sys::Oid,
    /// Number of local attributes (dropped ones included).
    pub attributes: usize,
    /// For each source column, the local column index (from 0) it fills;
    /// None for a column the table computes itself (generated here).
    pub remote_to_local: Vec<Option<usize>>,
    /// Per local column: its input function, for columns the source fills.
    pub inputs: Vec<Option<Input>>,
    /// Local columns the source does not send that have a default here.
    pub defaults: Vec<usize>,
    pub lookup: RowLookup,
    /// Owns the input functions' cached state (fn_extra) and output
    /// functions of [`Equality::OutputText`].
    context: pg_sys::MemoryContext,
}

/// Why a source relation cannot be mapped onto a local table.
#[derive(Debug, thiserror::Error)]
pub enum MappingError {
    #[error("column {column} of {table} does not exist here")]
    MissingColumn { table: String, column: String },
}

impl LocalTable {
    /// Maps `columns` (as the source announced them) onto `relation`.
    ///
    /// # Safety
    /// In a transaction; `relation` open and locked.
    pub unsafe fn build(
        relation: pg_sys::Relation,
        table: &str,
        columns: &[Column],
        full_identity: bool,
    ) -> Result<Self, MappingError> {
        let context = pg_sys::AllocSetContextCreateInternal(
            pg_sys::TopMemoryContext,
            c"cloudmig apply relation".as_ptr(),
            pg_sys::ALLOCSET_SMALL_MINSIZE as usize,
            pg_sys::ALLOCSET_SMALL_INITSIZE as usize,
            pg_sys::ALLOCSET_SMALL_MAXSIZE as usize,
        );
        let mut local = LocalTable {
            relid: (*relation).rd_id,
            owner: (*(*relation).rd_rel).relowner,
            attributes: 0,
            remote_to_local: Vec::with_capacity(columns.len()),
            inputs: Vec::new(),
            defaults: Vec::new(),
            lookup: RowLookup::None,
            context,
        };
        let descriptor = (*relation).rd_att;
        let count = (*descriptor).natts.max(0) as usize;
        let attributes = (*descriptor).attrs.as_slice(count);
        local.attributes = count;
        local.inputs = (0..count).map(|_| None).collect();
        let mut filled = vec![false; count];
        for column in columns {
            let position = attributes.iter().position(|attribute| {
                !attribute.attisdropped && name_of(attribute) == column.name.as_bytes()
            });
            let Some(position) = position else {
                return Err(MappingError::MissingColumn {
                    table: table.to_string(),
                    column: column.name.clone(),
                });
            };
            let attribute = &attributes[position];
            if attribute.attgenerated != 0 {
                // Computed here from the other columns, as on the source.
                local.remote_to_local.push(None);
                continue;
            }
            let mut input_function = pg_sys::InvalidOid;
            let mut io_param = pg_sys::InvalidOid;
            pg_sys::getTypeInputInfo(attribute.atttypid, &mut input_function, &mut io_param);
            let mut function: pg_sys::FmgrInfo = std::mem::zeroed();
            pg_sys::fmgr_info_cxt(input_function, &mut function, context);
            local.inputs[position] = Some(Input {
                function,
                io_param,
                type_modifier: attribute.atttypmod,
            });
            local.remote_to_local.push(Some(position));
            filled[position] = true;
        }
        for (position, attribute) in attributes.iter().enumerate() {
            if !filled[position]
                && !attribute.attisdropped
                && attribute.attgenerated == 0
                && attribute.atthasdef
            {
                local.defaults.push(position);
            }
        }
        let mut index = pg_sys::RelationGetReplicaIndex(relation);
        if index == pg_sys::InvalidOid {
            index = pg_sys::RelationGetPrimaryKeyIndex(relation);
        }
        local.lookup = if index != pg_sys::InvalidOid {
            RowLookup::IdentityIndex(index)
        } else if full_identity {
            RowLookup::Full {
                index: FullIdentityIndex::choose(relation),
                equalities: attributes
                    .iter()
                    .map(|attribute| {
                        (!attribute.attisdropped).then(|| {
                            Equality::for_type(attribute.atttypid, attribute.attcollation, context)
                        })
                    })
                    .collect(),
            }
        } else {
            RowLookup::None
        };
        Ok(local)
    }

    /// The datum for the source's text form `utf8` of local column `position`.
    ///
    /// # Safety
    /// In a transaction; the result lives in the current memory context.
    pub unsafe fn input(&self, position: usize, utf8: &[u8]) -> Option<pg_sys::Datum> {
        let input = self.inputs.get(position)?.as_ref()?;
        let text = server_cstring(utf8);
        let function = &input.function as *const _ as *mut pg_sys::FmgrInfo;
        Some(pg_sys::InputFunctionCall(
            function,
            text,
            input.io_param,
            input.type_modifier,
        ))
    }
}

impl Drop for LocalTable {
    fn drop(&mut self) {
        // SAFETY: the context was created by `build` and nothing else keeps
        // pointers into it once this table is gone.
        unsafe { pg_sys::MemoryContextDelete(self.context) };
    }
}

fn name_of(attribute: &pg_sys::FormData_pg_attribute) -> &[u8] {
    // SAFETY: attname is a NUL-terminated NameData.
    unsafe { std::ffi::CStr::from_ptr(attribute.attname.data.as_ptr()).to_bytes() }
}

/// `utf8` (as pgoutput sends text) in this database's encoding, as a
/// NUL-terminated palloc'd string. Invalid or NUL bytes raise an ERROR, as
/// PostgreSQL does for any client text.
///
/// # Safety
/// In a transaction.
pub unsafe fn server_cstring(utf8: &[u8]) -> *mut std::ffi::c_char {
    let input = utf8.as_ptr() as *const std::ffi::c_char;
    let converted =
        pg_sys::pg_any_to_server(input, utf8.len() as i32, pg_sys::pg_enc::PG_UTF8 as i32);
    if !std::ptr::eq(converted, input) {
        return converted;
    }
    let copy = pg_sys::palloc(utf8.len() + 1) as *mut u8;
    std::ptr::copy_nonoverlapping(utf8.as_ptr(), copy, utf8.len());
    *copy.add(utf8.len()) = 0;
    copy.cast()
}

/// Name lookups of a source relation's local twin.
///
/// # Safety
/// In a transaction.
pub unsafe fn find_relid(namespace: &str, name: &str) -> Option<pg_sys::Oid> {
    let namespace_oid = pg_sys::get_namespace_oid(server_cstring(namespace.as_bytes()), true);
    if namespace_oid == pg_sys::InvalidOid {
        return None;
    }
    let relid = pg_sys::get_relname_relid(server_cstring(name.as_bytes()), namespace_oid);
    (relid != pg_sys::InvalidOid).then_some(relid)
}

thread_local! {
    /// Relations the relation cache said changed since the applier last
    /// looked; `None` in the set's place means "all of them".
    static INVALIDATED: RefCell<Option<HashSet<pg_sys::Oid>>> = RefCell::new(Some(HashSet::new()));
    static CALLBACK_REGISTERED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

#[pgrx::pg_guard]
unsafe extern "C-unwind" fn relation_changed(_argument: pg_sys::Datum, relid: pg_sys::Oid) {
    INVALIDATED.with(|cell| {
        let mut invalidated = cell.borrow_mut();
        if relid == pg_sys::InvalidOid {
            *invalidated = None;
        } else if let Some(set) = invalidated.as_mut() {
            set.insert(relid);
        }
    });
}

/// Registers the relcache callback once per process.
pub fn watch_relation_cache() {
    CALLBACK_REGISTERED.with(|registered| {
        if !registered.get() {
            // SAFETY: a process-lifetime callback, as worker.c registers its own.
            unsafe {
                pg_sys::CacheRegisterRelcacheCallback(
                    Some(relation_changed),
                    pg_sys::Datum::from(0usize),
                )
            };
            registered.set(true);
        }
    });
}

/// Whether `relid` changed since the last call that cleared it; `all`
/// changes clear the whole record.
pub fn take_invalidations() -> Invalidations {
    INVALIDATED.with(|cell| {
        let taken = cell.replace(Some(HashSet::new()));
        match taken {
            None => Invalidations::All,
            Some(set) if set.is_empty() => Invalidations::Nothing,
            Some(set) => Invalidations::Some(set),
        }
    })
}

/// Puts back what [`take_invalidations`] took, for the next look.
pub fn invalidate_again(invalidations: Invalidations) {
    INVALIDATED.with(|cell| {
        let mut current = cell.borrow_mut();
        match (invalidations, current.as_mut()) {
            (Invalidations::Nothing, _) | (_, None) => {}
            (Invalidations::All, Some(_)) => *current = None,
            (Invalidations::Some(set), Some(pending)) => pending.extend(set),
        }
    });
}

/// What [`take_invalidations`] found.
pub enum Invalidations {
    Nothing,
    Some(HashSet<pg_sys::Oid>),
    All,
}

impl Invalidations {
    pub fn covers(&self, relid: pg_sys::Oid) -> bool {
        match self {
            Invalidations::Nothing => false,
            Invalidations::Some(set) => set.contains(&relid),
            Invalidations::All => true,
        }
    }
}
