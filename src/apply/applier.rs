//! Applies decoded changes to local tables, one transaction at a time (the
//! caller opens and commits it).
//!
//! It keeps what the source announced about each relation (Relation
//! messages come before the first change of a relation, and again after its
//! definition changes), maps the columns to the local table, and runs the
//! statements of [`super::statements`] through prepared SPI plans. A change
//! that finds no row to update or delete is an error, never skipped: the
//! copy and the stream disagree, and a DBA must know.

use super::spi::{self, Plan};
use super::statements::{self, LocalColumn, Statement, Target, TYPES_WITHOUT_EQUALITY};
use crate::source::pgoutput::{Column, Tuple, Value};
use crate::source::{quote_ident, quote_literal, Lsn};
use std::collections::HashMap;

/// Why a change could not be applied.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error("change for relation {0}, which the source never described")]
    UnknownRelation(u32),
    #[error("table {0} does not exist here")]
    MissingTable(String),
    #[error("column {column} of {table} does not exist here")]
    MissingColumn { table: String, column: String },
    #[error("no row of {table} matches the source's {what}")]
    RowNotFound { table: String, what: &'static str },
    #[error("{table}: the source sent no replica identity for an {what}")]
    NoIdentity { table: String, what: &'static str },
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
            ApplyError::MissingTable(_) | ApplyError::MissingColumn { .. } => {
                "the source's schema changed during the migration (DDL is not replicated): \
                 apply the same DDL here, then the apply resumes"
            }
            _ => "see the server log of the destination",
        }
    }
}

/// A source relation as announced, mapped to the local table.
struct Relation {
    target: Target,
    /// Source columns, in the order tuples carry them, with their local twin.
    columns: Vec<(Column, LocalColumn)>,
    /// REPLICA IDENTITY FULL on the source: every column identifies a row.
    full_identity: bool,
    /// Changes committed at or before this LSN were in the table's copy.
    sync_lsn: Option<Lsn>,
}

impl Relation {
    fn name(&self) -> String {
        format!("{}.{}", self.target.schema, self.target.table)
    }
}

/// Identity columns and their values (None for NULL) naming one row.
type Identity<'r, 't> = (Vec<&'r LocalColumn>, Vec<Option<&'t [u8]>>);

/// The per-database applier.
#[derive(Default)]
pub struct Applier {
    relations: HashMap<u32, Relation>,
    plans: HashMap<String, Plan>,
    /// "schema.table" -> LSN its rows were copied at, when later than the
    /// slot's start (a resumed copy); see the task worker's module doc.
    sync_lsns: HashMap<String, Lsn>,
}

fn text(value: &Value) -> Option<&[u8]> {
    match value {
        Value::Text(bytes) | Value::Binary(bytes) => Some(bytes),
        Value::Null | Value::UnchangedToast => None,
    }
}

impl Applier {
    pub fn new(sync_lsns: HashMap<String, Lsn>) -> Self {
        Self {
            sync_lsns,
            ..Self::default()
        }
    }

    /// Records a Relation message, reading the local table's columns.
    pub fn relation(
        &mut self,
        oid: u32,
        namespace: &str,
        name: &str,
        replica_identity: u8,
        columns: &[Column],
    ) -> Result<(), ApplyError> {
        let qualified = format!("{}.{}", quote_ident(namespace), quote_ident(name));
        let table = format!("{namespace}.{name}");
        let rows = spi::query(&format!(
            "SELECT a.attname, pg_catalog.format_type(a.atttypid, a.atttypmod), \
                    coalesce(b.typname, t.typname)::text \
               FROM pg_catalog.pg_attribute a \
               JOIN pg_catalog.pg_type t ON t.oid = a.atttypid \
               LEFT JOIN pg_catalog.pg_type b ON t.typtype = 'd' AND b.oid = t.typbasetype \
              WHERE a.attrelid = pg_catalog.to_regclass({}) AND a.attnum > 0 AND NOT a.attisdropped",
            quote_literal(&qualified)
        ))?;
        if rows.is_empty() {
            return Err(ApplyError::MissingTable(table));
        }
        let local: HashMap<String, LocalColumn> = rows
            .into_iter()
            .filter_map(|row| {
                let mut row = row.into_iter();
                let (name, type_name, base) = (row.next()??, row.next()??, row.next()??);
                let has_equality = !TYPES_WITHOUT_EQUALITY.contains(&base.as_str());
                Some((
                    name.clone(),
                    LocalColumn {
                        name,
                        type_name,
                        has_equality,
                    },
                ))
            })
            .collect();
        let mut mapped = Vec::with_capacity(columns.len());
        for column in columns {
            let local_column =
                local
                    .get(&column.name)
                    .cloned()
                    .ok_or_else(|| ApplyError::MissingColumn {
                        table: table.clone(),
                        column: column.name.clone(),
                    })?;
            mapped.push((column.clone(), local_column));
        }
        self.relations.insert(
            oid,
            Relation {
                target: Target {
                    schema: namespace.to_string(),
                    table: name.to_string(),
                },
                columns: mapped,
                full_identity: replica_identity == b'f',
                sync_lsn: self.sync_lsns.get(&table).copied(),
            },
        );
        Ok(())
    }

    fn relation_of(&self, oid: u32) -> Result<&Relation, ApplyError> {
        self.relations
            .get(&oid)
            .ok_or(ApplyError::UnknownRelation(oid))
    }

    /// Whether changes of `oid` in a transaction committing at `commit_lsn`
    /// were already in the table's copy.
    pub fn already_copied(&self, oid: u32, commit_lsn: Lsn) -> bool {
        self.relations
            .get(&oid)
            .and_then(|r| r.sync_lsn)
            .is_some_and(|sync| commit_lsn <= sync)
    }

    fn run(&mut self, statement: Statement, values: &[Option<&[u8]>]) -> Result<u64, ApplyError> {
        if !self.plans.contains_key(&statement.sql) {
            let plan = spi::prepare(&statement.sql, statement.parameter_count)?;
            self.plans.insert(statement.sql.clone(), plan);
        }
        let plan = &self.plans[&statement.sql];
        Ok(spi::execute(plan, values)?)
    }

    pub fn insert(&mut self, oid: u32, new: &Tuple) -> Result<(), ApplyError> {
        let relation = self.relation_of(oid)?;
        let (columns, values): (Vec<&LocalColumn>, Vec<Option<&[u8]>>) = relation
            .columns
            .iter()
            .zip(&new.0)
            .map(|((_, local), value)| (local, text(value)))
            .unzip();
        let statement = statements::insert(&relation.target, &columns);
        self.run(statement, &values)?;
        Ok(())
    }

    /// The identity columns and values naming the row a change touches: the
    /// old tuple (FULL), the key tuple (key changed), or the new tuple's keys.
    fn identity<'r, 't>(
        relation: &'r Relation,
        old: Option<&'t Tuple>,
        new: Option<&'t Tuple>,
        what: &'static str,
    ) -> Result<Identity<'r, 't>, ApplyError> {
        let tuple = old.or(new).ok_or_else(|| ApplyError::NoIdentity {
            table: relation.name(),
            what,
        })?;
        let mut columns = Vec::new();
        let mut values = Vec::new();
        for ((remote, local), value) in relation.columns.iter().zip(&tuple.0) {
            let part_of_identity = relation.full_identity || remote.is_key;
            // A key tuple carries NULL for non-key columns; an old FULL tuple
            // may carry "unchanged TOAST", which cannot be matched on.
            if part_of_identity && !matches!(value, Value::UnchangedToast) {
                columns.push(local);
                values.push(text(value));
            }
        }
        if columns.is_empty() {
            return Err(ApplyError::NoIdentity {
                table: relation.name(),
                what,
            });
        }
        Ok((columns, values))
    }

    pub fn update(
        &mut self,
        oid: u32,
        old: Option<&Tuple>,
        key: Option<&Tuple>,
        new: &Tuple,
    ) -> Result<(), ApplyError> {
        let relation = self.relation_of(oid)?;
        // Unchanged TOASTed values keep the value already here.
        let (set_columns, mut values): (Vec<&LocalColumn>, Vec<Option<&[u8]>>) = relation
            .columns
            .iter()
            .zip(&new.0)
            .filter(|(_, value)| !matches!(value, Value::UnchangedToast))
            .map(|((_, local), value)| (local, text(value)))
            .unzip();
        let (identity, identity_values) =
            Self::identity(relation, old.or(key), Some(new), "update")?;
        values.extend(identity_values);
        let statement = statements::update(&relation.target, &set_columns, &identity);
        let table = relation.name();
        if self.run(statement, &values)? == 0 {
            return Err(ApplyError::RowNotFound {
                table,
                what: "update",
            });
        }
        Ok(())
    }

    pub fn delete(
        &mut self,
        oid: u32,
        old: Option<&Tuple>,
        key: Option<&Tuple>,
    ) -> Result<(), ApplyError> {
        let relation = self.relation_of(oid)?;
        let (identity, values) = Self::identity(relation, old.or(key), None, "delete")?;
        let statement = statements::delete(&relation.target, &identity);
        let table = relation.name();
        if self.run(statement, &values)? == 0 {
            return Err(ApplyError::RowNotFound {
                table,
                what: "delete",
            });
        }
        Ok(())
    }

    pub fn truncate(
        &mut self,
        oids: &[u32],
        cascade: bool,
        restart_identity: bool,
    ) -> Result<(), ApplyError> {
        let mut targets = Vec::new();
        for oid in oids {
            targets.push(self.relation_of(*oid)?.target.clone());
        }
        if targets.is_empty() {
            return Ok(());
        }
        spi::query(&statements::truncate(&targets, cascade, restart_identity))?;
        Ok(())
    }

    /// The table name of a relation, for error context.
    pub fn relation_name(&self, oid: u32) -> Option<String> {
        self.relations.get(&oid).map(Relation::name)
    }
}
