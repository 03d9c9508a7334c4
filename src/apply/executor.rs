//! The executor calls that apply one change to one local table, made as
//! PostgreSQL's own apply worker makes them (worker.c's
//! `create_edata_for_relation`/`finish_edata`, execReplication.c's
//! `ExecSimpleRelation*`). Going through the executor, rather than SQL text,
//! is what makes identity columns (`GENERATED ALWAYS`), stored generated
//! columns, constraints, index maintenance and triggers behave as they do in
//! core, and touches exactly the named relation (never a child table).
//!
//! Rows are found through the local replica identity index or primary key
//! (`RelationFindReplTupleByIndex`), or, for `REPLICA IDENTITY FULL`, by a
//! scan that compares every column the source sent ([`find_full`]), through
//! the first usable btree index when there is one. Every function here is
//! `unsafe`: each must be called on the backend's main thread, inside a
//! transaction, with the relation opened and locked by the caller.

use pgrx::pg_sys;
use std::mem::size_of;
use std::ptr::null_mut;

/// The executor state of one relation for one local transaction: made at
/// the relation's first change (create_edata_for_relation), reused by every
/// later change of the transaction, closed before it commits.
pub struct Execution {
    estate: *mut pg_sys::EState,
    result: *mut pg_sys::ResultRelInfo,
    relation: pg_sys::Relation,
    /// Row triggers exist: each change is a "query" of its own for the
    /// AFTER trigger queue, as each change is in core's apply.
    has_triggers: bool,
}

impl Execution {
    /// Sets up the executor for `relation` and opens its indexes; the state
    /// lives in the transaction's memory, so an abort frees it.
    ///
    /// # Safety
    /// In a transaction; `relation` open and locked `RowExclusiveLock`.
    pub unsafe fn begin(relation: pg_sys::Relation) -> Self {
        let previous = pg_sys::MemoryContextSwitchTo(pg_sys::CurTransactionContext);
        let estate = pg_sys::CreateExecutorState();
        pg_sys::MemoryContextSwitchTo((*estate).es_query_cxt);
        let rte = pg_sys::palloc0(size_of::<pg_sys::RangeTblEntry>()) as *mut pg_sys::RangeTblEntry;
        (*rte).type_ = pg_sys::NodeTag::T_RangeTblEntry;
        (*rte).rtekind = pg_sys::RTEKind::RTE_RELATION;
        (*rte).relid = (*relation).rd_id;
        (*rte).relkind = (*(*relation).rd_rel).relkind;
        (*rte).rellockmode = pg_sys::AccessShareLock as i32;
        pg_sys::ExecInitRangeTable(estate, pg_sys::lappend(null_mut(), rte.cast()));
        let result =
            pg_sys::palloc0(size_of::<pg_sys::ResultRelInfo>()) as *mut pg_sys::ResultRelInfo;
        (*result).type_ = pg_sys::NodeTag::T_ResultRelInfo;
        pg_sys::InitResultRelInfo(result, relation, 1, null_mut(), 0);
        // As worker.c: listed so ExecGetTriggerResultRel finds it, without
        // taking a reference that ExecCloseResultRelations would drop.
        (*estate).es_opened_result_relations =
            pg_sys::lappend((*estate).es_opened_result_relations, result.cast());
        pg_sys::ExecOpenIndices(result, false);
        pg_sys::MemoryContextSwitchTo(previous);
        Self {
            estate,
            result,
            relation,
            has_triggers: !(*result).ri_TrigDesc.is_null(),
        }
    }

    /// Starts one change: the current command id, a clean per-tuple
    /// memory, and an AFTER trigger query level when triggers may fire.
    ///
    /// # Safety
    /// In the transaction that made this state.
    pub unsafe fn begin_change(&self) {
        (*self.estate).es_output_cid = pg_sys::GetCurrentCommandId(true);
        let per_tuple = (*self.estate).es_per_tuple_exprcontext;
        if !per_tuple.is_null() {
            pg_sys::MemoryContextReset((*per_tuple).ecxt_per_tuple_memory);
        }
        if self.has_triggers {
            pg_sys::AfterTriggerBeginQuery();
        }
    }

    /// Ends one change: fires its queued AFTER triggers.
    ///
    /// # Safety
    /// After [`Execution::begin_change`], in the same transaction.
    pub unsafe fn end_change(&self) {
        if self.has_triggers {
            pg_sys::AfterTriggerEndQuery(self.estate);
        }
    }

    /// Closes the indexes, releases the slots and frees the state
    /// (finish_edata), before the transaction commits.
    ///
    /// # Safety
    /// Called once, in the transaction that made this state.
    pub unsafe fn close(self) {
        pg_sys::ExecCloseIndices(self.result);
        pg_sys::ExecResetTupleTable((*self.estate).es_tupleTable, false);
        pg_sys::FreeExecutorState(self.estate);
    }

    /// An empty virtual slot shaped like the relation, owned by the estate.
    ///
    /// # Safety
    /// As [`Execution::begin`].
    pub unsafe fn virtual_slot(&self) -> *mut pg_sys::TupleTableSlot {
        pg_sys::ExecInitExtraTupleSlot(self.estate, (*self.relation).rd_att, &pg_sys::TTSOpsVirtual)
    }

    /// A slot of the relation's table AM (what scans and locks fill).
    ///
    /// # Safety
    /// As [`Execution::begin`].
    pub unsafe fn table_slot(&self) -> *mut pg_sys::TupleTableSlot {
        let previous = pg_sys::MemoryContextSwitchTo((*self.estate).es_query_cxt);
        let slot = pg_sys::table_slot_create(self.relation, &mut (*self.estate).es_tupleTable);
        pg_sys::MemoryContextSwitchTo(previous);
        slot
    }

    /// Evaluates `expression` (a column default) in the per-tuple context.
    ///
    /// # Safety
    /// As [`Execution::begin`]; the value lives until [`Execution::finish`].
    pub unsafe fn evaluate(&self, expression: *mut pg_sys::Expr) -> (pg_sys::Datum, bool) {
        let state = pg_sys::ExecPrepareExpr(expression, self.estate);
        let mut context = (*self.estate).es_per_tuple_exprcontext;
        if context.is_null() {
            context = pg_sys::MakePerTupleExprContext(self.estate);
        }
        let mut is_null = false;
        let value = pg_sys::ExecEvalExpr(state, context, &mut is_null);
        (value, is_null)
    }

    /// Inserts the tuple in `slot` (stored generated columns computed,
    /// constraints checked, indexes maintained, row triggers fired).
    ///
    /// # Safety
    /// `slot` from [`Execution::virtual_slot`], holding a stored tuple.
    pub unsafe fn insert(&self, slot: *mut pg_sys::TupleTableSlot) {
        pg_sys::ExecSimpleRelationInsert(self.result, self.estate, slot);
    }

    /// Replaces the locked row in `found` by the tuple in `new`.
    ///
    /// # Safety
    /// `found` locked by a finder of this module, `new` a stored tuple.
    pub unsafe fn update(
        &self,
        found: *mut pg_sys::TupleTableSlot,
        new: *mut pg_sys::TupleTableSlot,
    ) {
        let mut epq: pg_sys::EPQState = std::mem::zeroed();
        pg_sys::EvalPlanQualInit(&mut epq, self.estate, null_mut(), null_mut(), -1);
        epq.origslot = new;
        pg_sys::ExecSimpleRelationUpdate(self.result, self.estate, &mut epq, found, new);
        pg_sys::EvalPlanQualEnd(&mut epq);
    }

    /// Deletes the locked row in `found`.
    ///
    /// # Safety
    /// `found` locked by a finder of this module.
    pub unsafe fn delete(&self, found: *mut pg_sys::TupleTableSlot) {
        let mut epq: pg_sys::EPQState = std::mem::zeroed();
        pg_sys::EvalPlanQualInit(&mut epq, self.estate, null_mut(), null_mut(), -1);
        epq.origslot = found;
        pg_sys::ExecSimpleRelationDelete(self.result, self.estate, &mut epq, found);
        pg_sys::EvalPlanQualEnd(&mut epq);
    }
}

/// Finds and locks the row whose identity-index columns equal `search`'s,
/// as core's apply does for a replica identity index or primary key.
///
/// # Safety
/// As [`Execution::begin`]; `index` is the relation's replica identity index
/// or primary key; `search` a virtual slot of the relation with the key
/// columns set; `found` from [`Execution::table_slot`].
pub unsafe fn find_by_identity_index(
    relation: pg_sys::Relation,
    index: pg_sys::Oid,
    search: *mut pg_sys::TupleTableSlot,
    found: *mut pg_sys::TupleTableSlot,
) -> bool {
    pg_sys::RelationFindReplTupleByIndex(
        relation,
        index,
        pg_sys::LockTupleMode::LockTupleExclusive,
        search,
        found,
    )
}

/// How one column of a `REPLICA IDENTITY FULL` row is compared.
pub enum Equality {
    /// The type's default equality operator (the type cache's, long-lived).
    Operator {
        function: *mut pg_sys::FmgrInfo,
        collation: pg_sys::Oid,
    },
    /// Types without `=` (json, point, ...): their text forms are compared.
    OutputText { function: Box<pg_sys::FmgrInfo> },
}

impl Equality {
    /// How to compare values of `type_oid` with `collation`; output
    /// functions are looked up in `context` (which must outlive the result).
    ///
    /// # Safety
    /// In a transaction.
    pub unsafe fn for_type(
        type_oid: pg_sys::Oid,
        collation: pg_sys::Oid,
        context: pg_sys::MemoryContext,
    ) -> Self {
        let entry = pg_sys::lookup_type_cache(type_oid, pg_sys::TYPECACHE_EQ_OPR_FINFO as i32);
        if !entry.is_null() && (*entry).eq_opr_finfo.fn_oid != pg_sys::InvalidOid {
            return Equality::Operator {
                function: &mut (*entry).eq_opr_finfo,
                collation,
            };
        }
        let mut output = pg_sys::InvalidOid;
        let mut varlena = false;
        pg_sys::getTypeOutputInfo(type_oid, &mut output, &mut varlena);
        let mut function: Box<pg_sys::FmgrInfo> = Box::new(std::mem::zeroed());
        pg_sys::fmgr_info_cxt(output, function.as_mut(), context);
        Equality::OutputText { function }
    }

    /// Whether two non-NULL values are equal.
    ///
    /// # Safety
    /// Both datums of the type this was built for.
    unsafe fn equal(&self, left: pg_sys::Datum, right: pg_sys::Datum) -> bool {
        match self {
            Equality::Operator {
                function,
                collation,
            } => pg_sys::FunctionCall2Coll(*function, *collation, left, right).value() != 0,
            Equality::OutputText { function } => {
                let function = function.as_ref() as *const _ as *mut pg_sys::FmgrInfo;
                let left = pg_sys::OutputFunctionCall(function, left);
                let right = pg_sys::OutputFunctionCall(function, right);
                let equal = std::ffi::CStr::from_ptr(left) == std::ffi::CStr::from_ptr(right);
                pg_sys::pfree(left.cast());
                pg_sys::pfree(right.cast());
                equal
            }
        }
    }
}

/// A btree index whose leading key columns are plain columns: it narrows
/// the search for a `REPLICA IDENTITY FULL` row (as PostgreSQL 16 does).
pub struct FullIdentityIndex {
    pub index: pg_sys::Oid,
    /// (index column number, table column index from 0, equality procedure,
    /// collation) of each leading plain key column.
    pub keys: Vec<(i16, usize, pg_sys::RegProcedure, pg_sys::Oid)>,
}

impl FullIdentityIndex {
    /// The first valid, non-partial btree index of `relation` that starts
    /// with a plain column, if any.
    ///
    /// # Safety
    /// In a transaction; `relation` open.
    pub unsafe fn choose(relation: pg_sys::Relation) -> Option<Self> {
        let list = pg_sys::RelationGetIndexList(relation);
        let mut chosen = None;
        if !list.is_null() {
            for i in 0..(*list).length.max(0) as usize {
                let oid = (*(*list).elements.add(i)).oid_value;
                let index = pg_sys::index_open(oid, pg_sys::AccessShareLock as i32);
                let candidate = Self::usable(index);
                pg_sys::index_close(index, pg_sys::AccessShareLock as i32);
                if candidate.is_some() {
                    chosen = candidate;
                    break;
                }
            }
            pg_sys::list_free(list);
        }
        chosen
    }

    unsafe fn usable(index: pg_sys::Relation) -> Option<Self> {
        let form = (*index).rd_index;
        if (*(*index).rd_rel).relam != pg_sys::BTREE_AM_OID
            || !(*form).indisvalid
            || !(*form).indisready
            || !pg_sys::RelationGetIndexPredicate(index).is_null()
        {
            return None;
        }
        let key_columns = (*form).indnkeyatts.max(0) as usize;
        let attributes = (*form).indkey.values.as_slice(key_columns);
        let mut keys = Vec::new();
        for (position, &table_column) in attributes.iter().enumerate() {
            if table_column <= 0 {
                break; // an expression: only the columns before it are used
            }
            let family = *(*index).rd_opfamily.add(position);
            let input_type = *(*index).rd_opcintype.add(position);
            let operator = pg_sys::get_opfamily_member(
                family,
                input_type,
                input_type,
                pg_sys::BTEqualStrategyNumber as i16,
            );
            if operator == pg_sys::InvalidOid {
                break;
            }
            keys.push((
                position as i16 + 1,
                table_column as usize - 1,
                pg_sys::get_opcode(operator),
                *(*index).rd_indcollation.add(position),
            ));
        }
        (!keys.is_empty()).then(|| FullIdentityIndex {
            index: (*index).rd_id,
            keys,
        })
    }
}

/// Finds and locks one row equal to `search` in every column marked in
/// `compare` (`REPLICA IDENTITY FULL`; duplicates are interchangeable, so the
/// first is taken). Retries when the row is concurrently changed, as
/// execReplication.c does.
///
/// # Safety
/// As [`find_by_identity_index`]; `equalities` has one entry per column of
/// the relation; `search` holds a stored virtual tuple; `candidate` and
/// `found` are slots of [`Execution::table_slot`].
pub unsafe fn find_full(
    relation: pg_sys::Relation,
    index: Option<&FullIdentityIndex>,
    equalities: &[Option<Equality>],
    compare: &[bool],
    search: *mut pg_sys::TupleTableSlot,
    candidate: *mut pg_sys::TupleTableSlot,
    found: *mut pg_sys::TupleTableSlot,
) -> bool {
    pg_sys::slot_getallattrs(search);
    loop {
        let snapshot = pg_sys::RegisterSnapshot(pg_sys::GetLatestSnapshot());
        let located = match index {
            Some(index) => scan_index(relation, index, snapshot, search, candidate, |slot| {
                rows_equal(equalities, compare, search, slot)
            }),
            None => scan_table(relation, snapshot, candidate, |slot| {
                rows_equal(equalities, compare, search, slot)
            }),
        };
        if !located {
            pg_sys::UnregisterSnapshot(snapshot);
            return false;
        }
        pg_sys::ExecCopySlot(found, candidate);
        let mut failure: pg_sys::TM_FailureData = std::mem::zeroed();
        let outcome = pg_sys::table_tuple_lock(
            relation,
            &mut (*found).tts_tid,
            snapshot,
            found,
            pg_sys::GetCurrentCommandId(false),
            pg_sys::LockTupleMode::LockTupleExclusive,
            pg_sys::LockWaitPolicy::LockWaitBlock,
            0,
            &mut failure,
        );
        pg_sys::UnregisterSnapshot(snapshot);
        match outcome {
            pg_sys::TM_Result::TM_Ok => return true,
            // Changed under us since the scan: look again.
            pg_sys::TM_Result::TM_Updated | pg_sys::TM_Result::TM_Deleted => continue,
            _ => pgrx::error!(
                "cloudmig: unexpected result {outcome} locking a row to apply a change"
            ),
        }
    }
}

unsafe fn rows_equal(
    equalities: &[Option<Equality>],
    compare: &[bool],
    search: *mut pg_sys::TupleTableSlot,
    candidate: *mut pg_sys::TupleTableSlot,
) -> bool {
    pg_sys::slot_getallattrs(candidate);
    for (column, equality) in equalities.iter().enumerate() {
        let (Some(equality), true) = (equality, compare.get(column).copied().unwrap_or(false))
        else {
            continue;
        };
        let (left_null, right_null) = (
            *(*search).tts_isnull.add(column),
            *(*candidate).tts_isnull.add(column),
        );
        if left_null || right_null {
            if left_null != right_null {
                return false;
            }
            continue;
        }
        if !equality.equal(
            *(*search).tts_values.add(column),
            *(*candidate).tts_values.add(column),
        ) {
            return false;
        }
    }
    true
}

unsafe fn scan_table(
    relation: pg_sys::Relation,
    snapshot: pg_sys::Snapshot,
    candidate: *mut pg_sys::TupleTableSlot,
    mut matches: impl FnMut(*mut pg_sys::TupleTableSlot) -> bool,
) -> bool {
    let scan = pg_sys::table_beginscan(relation, snapshot, 0, null_mut());
    let mut located = false;
    while pg_sys::table_scan_getnextslot(
        scan,
        pg_sys::ScanDirection::ForwardScanDirection,
        candidate,
    ) {
        if matches(candidate) {
            located = true;
            break;
        }
    }
    pg_sys::table_endscan(scan);
    located
}

unsafe fn scan_index(
    relation: pg_sys::Relation,
    index: &FullIdentityIndex,
    snapshot: pg_sys::Snapshot,
    search: *mut pg_sys::TupleTableSlot,
    candidate: *mut pg_sys::TupleTableSlot,
    mut matches: impl FnMut(*mut pg_sys::TupleTableSlot) -> bool,
) -> bool {
    let index_relation = pg_sys::index_open(index.index, pg_sys::RowExclusiveLock as i32);
    let mut keys: Vec<pg_sys::ScanKeyData> = Vec::with_capacity(index.keys.len());
    for &(index_column, table_column, procedure, collation) in &index.keys {
        let mut key: pg_sys::ScanKeyData = std::mem::zeroed();
        if *(*search).tts_isnull.add(table_column) {
            pg_sys::ScanKeyEntryInitialize(
                &mut key,
                (pg_sys::SK_ISNULL | pg_sys::SK_SEARCHNULL) as i32,
                index_column,
                0, // InvalidStrategy: a NULL test, not an operator
                pg_sys::InvalidOid,
                pg_sys::InvalidOid,
                pg_sys::InvalidOid,
                pg_sys::Datum::from(0usize),
            );
        } else {
            pg_sys::ScanKeyInit(
                &mut key,
                index_column,
                pg_sys::BTEqualStrategyNumber as u16,
                procedure,
                *(*search).tts_values.add(table_column),
            );
            key.sk_collation = collation;
        }
        keys.push(key);
    }
    let scan = pg_sys::index_beginscan(relation, index_relation, snapshot, keys.len() as i32, 0);
    pg_sys::index_rescan(scan, keys.as_mut_ptr(), keys.len() as i32, null_mut(), 0);
    let mut located = false;
    while pg_sys::index_getnext_slot(scan, pg_sys::ScanDirection::ForwardScanDirection, candidate) {
        if matches(candidate) {
            located = true;
            break;
        }
    }
    pg_sys::index_endscan(scan);
    pg_sys::index_close(index_relation, pg_sys::NoLock as i32);
    located
}
