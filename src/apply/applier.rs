//! Applies decoded changes to local tables, inside a transaction the caller
//! opens and commits.
//!
//! It keeps what the source announced about each relation (Relation
//! messages come before the first change of a relation, and again after its
//! definition changes) and maps it onto the local table at the first change
//! ([`super::local`]). Each change is one executor operation
//! ([`super::executor`]), run as the table's owner in a security-restricted
//! operation, in a memory context reset after the change so a transaction
//! of a million rows holds one row's worth of values at a time. A change
//! that finds no row to update or delete is an error, never skipped: the
//! copy and the stream disagree, and a DBA must know.

use super::executor::{self, Execution};
use super::local::{self, LocalTable, MappingError, RowLookup};
use super::shape;
use super::spi;
use crate::owner::AsOwner;
use crate::source::pgoutput::{Column, Tuple, Value};
use crate::source::{quote_ident, Lsn};
use pgrx::pg_sys;
use std::collections::hash_map::Entry;
use std::collections::HashMap;

/// Why a change could not be applied.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error("change for relation {0}, which the source never described")]
    UnknownRelation(u32),
    #[error("table {0} does not exist here")]
    MissingTable(String),
    #[error("{0}")]
    Mapping(#[from] MappingError),
    #[error("no row of {table} matches the source's {what}")]
    RowNotFound { table: String, what: &'static str },
    #[error("{table}: neither the source nor this table identifies rows for an {what} (no replica identity)")]
    NoIdentity { table: String, what: &'static str },
    #[error("{table}: the source sent {got} values for {expected} columns")]
    ColumnCount {
        table: String,
        got: usize,
        expected: usize,
    },
    #[error("{table}: binary values were not requested from the source")]
    Binary { table: String },
    #[error("{0}")]
    Spi(#[from] spi::SpiFailure),
}

impl ApplyError {
    /// What to do about it, for the task's last_error_hint.
    pub fn hint(&self) -> &'static str {
        match self {
            ApplyError::RowNotFound { .. } => {
                "the row was changed or deleted here, or the source and destination diverged: \
                 compare them, repair the row here, and restart the migration if needed"
            }
            ApplyError::MissingTable(_)
            | ApplyError::Mapping(_)
            | ApplyError::ColumnCount { .. } => {
                "the source's schema changed during the migration (DDL is not replicated): \
                 apply the same DDL here, then the apply resumes"
            }
            ApplyError::NoIdentity { .. } => {
                "give the table a primary key or REPLICA IDENTITY FULL on the source and here"
            }
            _ => "see the server log of the destination",
        }
    }
}

/// A source relation as announced.
struct Relation {
    namespace: String,
    name: String,
    columns: Vec<Column>,
    /// REPLICA IDENTITY FULL on the source: every column identifies a row.
    full_identity: bool,
    /// Changes committed before this LSN were in the table's copy.
    sync_lsn: Option<Lsn>,
    /// The local table, mapped at the first change; dropped when the source
    /// re-announces the relation or the local table changes.
    local: Option<LocalTable>,
}

impl Relation {
    fn display_name(&self) -> String {
        format!("{}.{}", self.namespace, self.name)
    }
}

/// A table opened for the current local transaction: locked, its indexes
/// open, its executor state and slots made at its first change and reused
/// by every later one (opening and closing them per change was most of the
/// cost of a small change).
struct OpenTable {
    rel: pg_sys::Relation,
    execution: Execution,
    /// The row a change names (identity or old values).
    search: *mut pg_sys::TupleTableSlot,
    /// The new row of an insert or update.
    new: *mut pg_sys::TupleTableSlot,
    /// The local row found and locked.
    found: *mut pg_sys::TupleTableSlot,
    /// A scan's current row (REPLICA IDENTITY FULL).
    candidate: *mut pg_sys::TupleTableSlot,
}

impl OpenTable {
    /// # Safety
    /// In a transaction; `rel` open and locked `RowExclusiveLock`.
    unsafe fn new(rel: pg_sys::Relation) -> Self {
        let execution = Execution::begin(rel);
        OpenTable {
            rel,
            search: execution.virtual_slot(),
            new: execution.virtual_slot(),
            found: execution.table_slot(),
            candidate: execution.table_slot(),
            execution,
        }
    }

    /// # Safety
    /// In the transaction that opened it, before it commits.
    unsafe fn close(self) {
        self.execution.close();
        // The lock is held to commit, as worker.c's logicalrep_rel_close.
        pg_sys::table_close(self.rel, pg_sys::NoLock as i32);
    }
}

/// The per-database applier.
pub struct Applier {
    relations: HashMap<u32, Relation>,
    /// Tables opened in the current local transaction, by source relation.
    open: HashMap<u32, OpenTable>,
    /// "schema.table" -> LSN its rows were copied at, when later than the
    /// slot's start (a resumed copy); see the task worker's module doc.
    sync_lsns: HashMap<String, Lsn>,
    /// Where one change's values and executor state live; reset after it.
    change_context: pg_sys::MemoryContext,
    /// Names of the source's non-built-in types (its Type messages), for
    /// the DDL a shape pause suggests.
    type_names: HashMap<u32, String>,
}

impl Applier {
    pub fn new(sync_lsns: HashMap<String, Lsn>) -> Self {
        local::watch_relation_cache();
        // SAFETY: a child of TopMemoryContext, kept for the worker's life.
        let change_context = unsafe {
            pg_sys::AllocSetContextCreateInternal(
                pg_sys::TopMemoryContext,
                c"cloudmig apply change".as_ptr(),
                pg_sys::ALLOCSET_DEFAULT_MINSIZE as usize,
                pg_sys::ALLOCSET_DEFAULT_INITSIZE as usize,
                pg_sys::ALLOCSET_DEFAULT_MAXSIZE as usize,
            )
        };
        Self {
            relations: HashMap::new(),
            open: HashMap::new(),
            sync_lsns,
            change_context,
            type_names: HashMap::new(),
        }
    }

    /// Records a Type message: the name of a non-built-in type on the source.
    pub fn type_announced(&mut self, oid: u32, namespace: &str, name: &str) {
        self.type_names.insert(
            oid,
            format!("{}.{}", quote_ident(namespace), quote_ident(name)),
        );
    }

    /// Relation `oid` as the source last announced it, for a shape check.
    ///
    /// # Safety
    /// In a transaction (types are spelled by the local catalog).
    pub unsafe fn announced(&self, oid: u32) -> Option<shape::Announced> {
        let relation = self.relations.get(&oid)?;
        Some(shape::announce(
            &relation.namespace,
            &relation.name,
            &relation.columns,
            &self.type_names,
        ))
    }

    /// Records a Relation message; the local table is looked at when the
    /// first change arrives (in a transaction), as core's apply does.
    pub fn relation(
        &mut self,
        oid: u32,
        namespace: &str,
        name: &str,
        replica_identity: u8,
        columns: &[Column],
    ) {
        let sync_lsn = self.sync_lsns.get(&format!("{namespace}.{name}")).copied();
        if let Some(table) = self.open.remove(&oid) {
            // SAFETY: Relation messages come inside the transaction that
            // opened the table.
            unsafe { table.close() };
        }
        self.relations.insert(
            oid,
            Relation {
                namespace: namespace.to_string(),
                name: name.to_string(),
                columns: columns.to_vec(),
                full_identity: replica_identity == b'f',
                sync_lsn,
                local: None,
            },
        );
    }

    /// Whether changes of `oid` in a transaction committing at `commit_lsn`
    /// were already in the table's copy. As tablesync.c has it, a change is
    /// applied when the table's sync LSN is at or before the commit.
    pub fn already_copied(&self, oid: u32, commit_lsn: Lsn) -> bool {
        self.relations
            .get(&oid)
            .and_then(|r| r.sync_lsn)
            .is_some_and(|sync| commit_lsn < sync)
    }

    /// The columns the source announced for a relation, for error context.
    pub fn columns(&self, oid: u32) -> Option<&[Column]> {
        self.relations.get(&oid).map(|r| r.columns.as_slice())
    }

    /// The table name of a relation, for error context.
    pub fn relation_name(&self, oid: u32) -> Option<String> {
        self.relations.get(&oid).map(Relation::display_name)
    }

    pub fn insert(&mut self, oid: u32, new: &Tuple) -> Result<(), ApplyError> {
        self.with_table(oid, |relation, local, table| {
            // SAFETY: inside `with_table`: a transaction, the table open.
            unsafe {
                store(relation, local, table.new, new, None)?;
                fill_defaults(&table.execution, table.rel, local, table.new);
                table.execution.insert(table.new);
            }
            Ok(())
        })
    }

    pub fn update(
        &mut self,
        oid: u32,
        old: Option<&Tuple>,
        key: Option<&Tuple>,
        new: &Tuple,
    ) -> Result<(), ApplyError> {
        self.with_table(oid, |relation, local, table| {
            // SAFETY: as in insert.
            unsafe {
                let compare = store(
                    relation,
                    local,
                    table.search,
                    old.or(key).unwrap_or(new),
                    None,
                )?;
                if !find(relation, local, table, &compare, "update")? {
                    return Err(ApplyError::RowNotFound {
                        table: relation.display_name(),
                        what: "update",
                    });
                }
                // The new row: the local row, with every column the source
                // sent replaced (unchanged TOASTed values keep the local one).
                store(relation, local, table.new, new, Some(table.found))?;
                table.execution.update(table.found, table.new);
            }
            Ok(())
        })
    }

    pub fn delete(
        &mut self,
        oid: u32,
        old: Option<&Tuple>,
        key: Option<&Tuple>,
    ) -> Result<(), ApplyError> {
        self.with_table(oid, |relation, local, table| {
            let Some(identity) = old.or(key) else {
                return Err(ApplyError::NoIdentity {
                    table: relation.display_name(),
                    what: "delete",
                });
            };
            // SAFETY: as in insert.
            unsafe {
                let compare = store(relation, local, table.search, identity, None)?;
                if !find(relation, local, table, &compare, "delete")? {
                    return Err(ApplyError::RowNotFound {
                        table: relation.display_name(),
                        what: "delete",
                    });
                }
                table.execution.delete(table.found);
            }
            Ok(())
        })
    }

    /// Closes the tables opened in this local transaction; called before
    /// it commits.
    pub fn end_transaction(&mut self) {
        for (_, table) in self.open.drain() {
            // SAFETY: still in the transaction that opened them.
            unsafe { table.close() };
        }
    }

    /// Forgets the tables of a transaction that aborted: the abort released
    /// their locks, references and memory.
    pub fn forget_transaction(&mut self) {
        self.open.clear();
    }

    /// TRUNCATE of several tables at once, as the source did it. It runs as
    /// the tables' owner when they share one (TRUNCATE triggers enabled
    /// ALWAYS or REPLICA run then); tables of several owners are truncated
    /// together with the worker's own rights, since a cascade must see them
    /// all in one statement.
    pub fn truncate(
        &mut self,
        oids: &[u32],
        cascade: bool,
        restart_identity: bool,
    ) -> Result<(), ApplyError> {
        let mut names = Vec::new();
        let mut owners = Vec::new();
        for oid in oids {
            let relation = self
                .relations
                .get(oid)
                .ok_or(ApplyError::UnknownRelation(*oid))?;
            names.push(format!(
                "{}.{}",
                quote_ident(&relation.namespace),
                quote_ident(&relation.name)
            ));
            // SAFETY: in the caller's transaction.
            let relid = unsafe { local::find_relid(&relation.namespace, &relation.name) }
                .ok_or_else(|| ApplyError::MissingTable(relation.display_name()))?;
            // SAFETY: a syscache lookup of an existing relation.
            owners.push(unsafe { relation_owner(relid) });
        }
        if names.is_empty() {
            return Ok(());
        }
        owners.dedup();
        // TRUNCATE refuses tables this session still has open.
        self.end_transaction();
        let sql = truncate_statement(&names, cascade, restart_identity);
        // SAFETY: SPI and the snapshot are opened and closed in the
        // caller's transaction; the owner is restored before SPI finishes.
        unsafe { pg_sys::PushActiveSnapshot(pg_sys::GetTransactionSnapshot()) };
        let result = spi::connect().and_then(|()| {
            let result = {
                let _owner = (owners.len() == 1).then(|| unsafe { AsOwner::switch(owners[0]) });
                spi::query(&sql)
            };
            spi::finish();
            result
        });
        // SAFETY: as above.
        unsafe {
            pg_sys::PopActiveSnapshot();
            pg_sys::CommandCounterIncrement();
        }
        result?;
        Ok(())
    }

    /// Drops the local mapping of every table the relation cache said
    /// changed, so the next change maps it afresh.
    fn forget_invalidated(&mut self) {
        let invalidated = local::take_invalidations();
        if matches!(invalidated, local::Invalidations::Nothing) {
            return;
        }
        for (oid, relation) in self.relations.iter_mut() {
            if relation
                .local
                .as_ref()
                .is_some_and(|local| invalidated.covers(local.relid))
            {
                relation.local = None;
                if let Some(table) = self.open.remove(oid) {
                    // SAFETY: between changes, in the transaction that
                    // opened it.
                    unsafe { table.close() };
                }
            }
        }
    }

    /// Runs `body` with the relation's local table mapped and open for this
    /// transaction (`RowExclusiveLock`, held to commit), as the table's
    /// owner, in the per-change memory context.
    fn with_table(
        &mut self,
        oid: u32,
        body: impl FnOnce(&Relation, &LocalTable, &OpenTable) -> Result<(), ApplyError>,
    ) -> Result<(), ApplyError> {
        self.forget_invalidated();
        let relation = self
            .relations
            .get_mut(&oid)
            .ok_or(ApplyError::UnknownRelation(oid))?;
        // SAFETY: in the caller's transaction.
        unsafe {
            pg_sys::MemoryContextReset(self.change_context);
            if let Entry::Vacant(entry) = self.open.entry(oid) {
                let relid = match &relation.local {
                    Some(local) => local.relid,
                    None => local::find_relid(&relation.namespace, &relation.name)
                        .ok_or_else(|| ApplyError::MissingTable(relation.display_name()))?,
                };
                let rel = pg_sys::try_table_open(relid, pg_sys::RowExclusiveLock as i32);
                if rel.is_null() {
                    relation.local = None;
                    return Err(ApplyError::MissingTable(relation.display_name()));
                }
                // Opening took the lock, which processed pending invalidations.
                let invalidations = local::take_invalidations();
                if invalidations.covers(relid) {
                    relation.local = None;
                }
                if !matches!(invalidations, local::Invalidations::Nothing) {
                    // Others changed too: forget them at the next change.
                    local::invalidate_again(invalidations);
                }
                if relation.local.is_none() {
                    match LocalTable::build(
                        rel,
                        &relation.display_name(),
                        &relation.columns,
                        relation.full_identity,
                    ) {
                        Ok(local) => relation.local = Some(local),
                        Err(error) => {
                            pg_sys::table_close(rel, pg_sys::NoLock as i32);
                            return Err(error.into());
                        }
                    }
                }
                entry.insert(OpenTable::new(rel));
            }
            let relation: &Relation = relation;
            let (Some(local), Some(table)) = (relation.local.as_ref(), self.open.get(&oid)) else {
                return Err(ApplyError::MissingTable(relation.display_name()));
            };
            let previous = pg_sys::MemoryContextSwitchTo(self.change_context);
            // A snapshot per change, as worker.c's begin_replication_step.
            pg_sys::PushActiveSnapshot(pg_sys::GetTransactionSnapshot());
            table.execution.begin_change();
            let result = {
                let _owner = AsOwner::switch(local.owner);
                let result = body(relation, local, table);
                table.execution.end_change();
                result
            };
            pg_sys::PopActiveSnapshot();
            pg_sys::MemoryContextSwitchTo(previous);
            // Later changes of this transaction see this one.
            pg_sys::CommandCounterIncrement();
            result
        }
    }
}

impl Drop for Applier {
    fn drop(&mut self) {
        // SAFETY: created in `new`; nothing refers to it past the applier.
        unsafe { pg_sys::MemoryContextDelete(self.change_context) };
    }
}

/// Stores `tuple` in the virtual `slot`: the local row of `base` when given
/// (an update's target), else NULLs, with each column the source sent set
/// through its input function. Returns, per local column, whether the source
/// sent a value for it (what a `REPLICA IDENTITY FULL` search compares).
///
/// # Safety
/// In a transaction; `slot` a virtual slot of the relation.
unsafe fn store(
    relation: &Relation,
    local: &LocalTable,
    slot: *mut pg_sys::TupleTableSlot,
    tuple: &Tuple,
    base: Option<*mut pg_sys::TupleTableSlot>,
) -> Result<Vec<bool>, ApplyError> {
    if tuple.0.len() != local.remote_to_local.len() {
        return Err(ApplyError::ColumnCount {
            table: relation.display_name(),
            got: tuple.0.len(),
            expected: local.remote_to_local.len(),
        });
    }
    pg_sys::ExecClearTuple(slot);
    let values = (*slot).tts_values;
    let nulls = (*slot).tts_isnull;
    match base {
        Some(base) => {
            pg_sys::slot_getallattrs(base);
            std::ptr::copy_nonoverlapping((*base).tts_values, values, local.attributes);
            std::ptr::copy_nonoverlapping((*base).tts_isnull, nulls, local.attributes);
        }
        None => {
            for position in 0..local.attributes {
                *values.add(position) = pg_sys::Datum::from(0usize);
                *nulls.add(position) = true;
            }
        }
    }
    let mut sent = vec![false; local.attributes];
    for (value, position) in tuple.0.iter().zip(&local.remote_to_local) {
        let Some(position) = *position else { continue };
        match value {
            Value::UnchangedToast => continue,
            Value::Null => {
                *values.add(position) = pg_sys::Datum::from(0usize);
                *nulls.add(position) = true;
            }
            Value::Text(text) => {
                let Some(datum) = local.input(position, text) else {
                    continue;
                };
                *values.add(position) = datum;
                *nulls.add(position) = false;
            }
            Value::Binary(_) => {
                return Err(ApplyError::Binary {
                    table: relation.display_name(),
                })
            }
        }
        sent[position] = true;
    }
    pg_sys::ExecStoreVirtualTuple(slot);
    Ok(sent)
}

/// Local columns the source does not know get their default here, as
/// worker.c's slot_fill_defaults does (a column added here ahead of the
/// source).
///
/// # Safety
/// In a transaction; `slot` stored by [`store`] for an insert.
unsafe fn fill_defaults(
    execution: &Execution,
    rel: pg_sys::Relation,
    local: &LocalTable,
    slot: *mut pg_sys::TupleTableSlot,
) {
    for &position in &local.defaults {
        let expression = pg_sys::build_column_default(rel, position as i32 + 1);
        if expression.is_null() {
            continue;
        }
        let (value, is_null) = execution.evaluate(expression.cast());
        *(*slot).tts_values.add(position) = value;
        *(*slot).tts_isnull.add(position) = is_null;
    }
}

/// Finds and locks the local row a change names (the identity is in
/// `table.search`), into `table.found`.
///
/// # Safety
/// As [`executor::find_full`].
unsafe fn find(
    relation: &Relation,
    local: &LocalTable,
    table: &OpenTable,
    compare: &[bool],
    what: &'static str,
) -> Result<bool, ApplyError> {
    match &local.lookup {
        RowLookup::IdentityIndex(index) => Ok(executor::find_by_identity_index(
            table.rel,
            *index,
            table.search,
            table.found,
        )),
        RowLookup::Full { index, equalities } => Ok(executor::find_full(
            table.rel,
            index.as_ref(),
            equalities,
            compare,
            table.search,
            table.candidate,
            table.found,
        )),
        RowLookup::None => Err(ApplyError::NoIdentity {
            table: relation.display_name(),
            what,
        }),
    }
}

/// The owner of relation `relid`.
///
/// # Safety
/// In a transaction; `relid` exists.
unsafe fn relation_owner(relid: pg_sys::Oid) -> pg_sys::Oid {
    let rel = pg_sys::relation_open(relid, pg_sys::AccessShareLock as i32);
    let owner = (*(*rel).rd_rel).relowner;
    pg_sys::relation_close(rel, pg_sys::NoLock as i32);
    owner
}

/// `TRUNCATE ONLY` of already quoted names, with the source's options.
fn truncate_statement(names: &[String], cascade: bool, restart_identity: bool) -> String {
    format!(
        "TRUNCATE ONLY {}{}{}",
        names.join(", "),
        if restart_identity {
            " RESTART IDENTITY"
        } else {
            ""
        },
        if cascade { " CASCADE" } else { "" }
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn truncate_keeps_the_source_options() {
        let sql = truncate_statement(
            &["\"Sales\".\"line items\"".into(), "\"public\".\"t\"".into()],
            true,
            true,
        );
        assert_eq!(
            sql,
            "TRUNCATE ONLY \"Sales\".\"line items\", \"public\".\"t\" RESTART IDENTITY CASCADE"
        );
    }
}
