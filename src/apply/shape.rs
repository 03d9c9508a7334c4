//! Whether a source relation, as the source last announced it, still fits
//! its local table, and when it does not, what differs and the DDL that
//! makes it fit.
//!
//! DDL is not replicated: a column added or a table created on the source
//! reaches the apply as a Relation message the local table cannot take. Like
//! PostgreSQL's own apply (relation.c's `logicalrep_rel_open`), columns are
//! matched by name, extra local columns are fine (they get their default),
//! and a source column missing here cannot be applied. Where core stops
//! the apply with an error and retries, the apply worker pauses that
//! database (see `worker::shape_pause`): these differences, with the DDL
//! that makes the local table fit, are what it reports.
//!
//! A type that differs is only a difference when a value failed to convert,
//! and a local NOT NULL column the source no longer sends (dropped there)
//! only when an insert left it NULL (the caller says which failed): a wider
//! type here (the DBA changed it first) takes the source's values, as it
//! does in core.

use super::local;
use crate::source::pgoutput::Column;
use crate::source::quote_ident;
use pgrx::pg_sys;

/// OIDs below this are built in, the same on every PostgreSQL 15 server
/// (`FirstNormalObjectId`); the types of other OIDs are known by name only.
const FIRST_NORMAL_OBJECT_ID: u32 = 16384;

/// A source relation as the source announced it.
#[derive(Clone, Debug)]
pub struct Announced {
    pub namespace: String,
    pub name: String,
    pub columns: Vec<SourceColumn>,
}

impl Announced {
    pub fn display_name(&self) -> String {
        format!("{}.{}", self.namespace, self.name)
    }

    fn quoted_name(&self) -> String {
        format!(
            "{}.{}",
            quote_ident(&self.namespace),
            quote_ident(&self.name)
        )
    }
}

/// A source column, its type spelled for DDL here.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SourceColumn {
    pub name: String,
    /// Part of the source's replica identity (its primary key, mostly).
    pub is_key: bool,
    /// The source's type OID, comparable here for built-in types only.
    pub type_oid: Option<u32>,
    pub type_modifier: i32,
    /// The type as DDL here would spell it.
    pub type_name: String,
}

/// A local column, as the comparison needs it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LocalColumn {
    pub name: String,
    pub type_oid: u32,
    pub type_modifier: i32,
    pub type_name: String,
    /// NOT NULL with nothing to fill it here (no default, not identity or
    /// generated): an insert must send it.
    pub required: bool,
}

/// What the failed change ran into, as far as the shape is concerned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Failed {
    /// A value the local type refused (SQLSTATE class 22).
    Conversion,
    /// A NULL in a NOT NULL column (23502).
    NotNull,
    /// Anything else: only missing tables and columns count.
    Other,
}

/// One way the local table does not fit the source relation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Difference {
    MissingTable,
    MissingColumn {
        column: String,
        source_type: String,
    },
    TypeDiffers {
        column: String,
        source_type: String,
        local_type: String,
    },
    /// NOT NULL here, and the source does not send it (dropped there).
    RequiredHere {
        column: String,
    },
}

impl std::fmt::Display for Difference {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Difference::MissingTable => f.write_str("the table does not exist here"),
            Difference::MissingColumn {
                column,
                source_type,
            } => write!(f, "column {column} ({source_type}) is missing here"),
            Difference::TypeDiffers {
                column,
                source_type,
                local_type,
            } => write!(
                f,
                "column {column} is {source_type} on the source and {local_type} here"
            ),
            Difference::RequiredHere { column } => write!(
                f,
                "column {column} is NOT NULL without a default here and the source does not send it"
            ),
        }
    }
}

/// Why a database's apply paused: what the source sent that the local table
/// cannot take.
#[derive(Clone, Debug)]
pub struct ShapePause {
    pub relation: Announced,
    pub differences: Vec<Difference>,
    /// The local table's shape when the pause began (None: no table), so a
    /// change by the DBA is noticed even when it is not the suggested DDL.
    pub local_at_pause: Option<Vec<LocalColumn>>,
    /// What the change ran into.
    pub failed: Failed,
}

impl ShapePause {
    /// "column note (text) is missing here"
    pub fn describe(&self) -> String {
        let differences: Vec<String> = self.differences.iter().map(|d| d.to_string()).collect();
        differences.join("; ")
    }

    /// What to do: the DDL to run here, as one line of statements.
    pub fn hint(&self) -> String {
        let added = self
            .differences
            .iter()
            .any(|d| matches!(d, Difference::MissingColumn { .. }));
        format!(
            "run here the DDL that ran on the source, at least: {}{}; the apply continues by \
             itself within seconds",
            ddl(&self.relation, &self.differences),
            if added {
                " (with the source's DEFAULT: rows already here are not sent again)"
            } else {
                ""
            }
        )
    }
}

/// What differs between the announced relation and the local table
/// (`local` None: no such table here).
pub fn differences(
    announced: &Announced,
    local: Option<&[LocalColumn]>,
    failed: Failed,
) -> Vec<Difference> {
    let Some(local) = local else {
        return vec![Difference::MissingTable];
    };
    let mut found = Vec::new();
    for column in &announced.columns {
        match local.iter().find(|l| l.name == column.name) {
            None => found.push(Difference::MissingColumn {
                column: column.name.clone(),
                source_type: column.type_name.clone(),
            }),
            Some(here)
                if failed == Failed::Conversion
                    && column.type_oid.is_some_and(|oid| {
                        oid != here.type_oid || column.type_modifier != here.type_modifier
                    }) =>
            {
                found.push(Difference::TypeDiffers {
                    column: column.name.clone(),
                    source_type: column.type_name.clone(),
                    local_type: here.type_name.clone(),
                })
            }
            Some(_) => {}
        }
    }
    if failed == Failed::NotNull {
        for here in local.iter().filter(|l| l.required) {
            if !announced.columns.iter().any(|c| c.name == here.name) {
                found.push(Difference::RequiredHere {
                    column: here.name.clone(),
                });
            }
        }
    }
    found
}

/// The statements that make the local table fit.
pub fn ddl(relation: &Announced, differences: &[Difference]) -> String {
    let table = relation.quoted_name();
    let mut statements = Vec::new();
    for difference in differences {
        match difference {
            Difference::MissingTable => {
                let mut parts: Vec<String> = relation
                    .columns
                    .iter()
                    .map(|c| format!("{} {}", quote_ident(&c.name), c.type_name))
                    .collect();
                let keys: Vec<String> = relation
                    .columns
                    .iter()
                    .filter(|c| c.is_key)
                    .map(|c| quote_ident(&c.name))
                    .collect();
                if !keys.is_empty() {
                    parts.push(format!("PRIMARY KEY ({})", keys.join(", ")));
                }
                statements.push(format!("CREATE TABLE {table} ({})", parts.join(", ")));
            }
            Difference::MissingColumn {
                column,
                source_type,
            } => statements.push(format!(
                "ALTER TABLE {table} ADD COLUMN {} {source_type}",
                quote_ident(column)
            )),
            Difference::TypeDiffers {
                column,
                source_type,
                ..
            } => statements.push(format!(
                "ALTER TABLE {table} ALTER COLUMN {} TYPE {source_type}",
                quote_ident(column)
            )),
            // The least that fits; the source may have dropped it.
            Difference::RequiredHere { column } => statements.push(format!(
                "ALTER TABLE {table} ALTER COLUMN {} DROP NOT NULL",
                quote_ident(column)
            )),
        }
    }
    statements.join("; ")
}

/// The relation as announced, its types spelled here: built-in types by the
/// local catalog, others by the name the source's Type message gave.
///
/// # Safety
/// In a transaction.
pub unsafe fn announce(
    namespace: &str,
    name: &str,
    columns: &[Column],
    type_names: &std::collections::HashMap<u32, String>,
) -> Announced {
    Announced {
        namespace: namespace.to_string(),
        name: name.to_string(),
        columns: columns
            .iter()
            .map(|column| {
                let built_in = column.type_oid < FIRST_NORMAL_OBJECT_ID;
                let type_name = if built_in {
                    format_type(column.type_oid.into(), column.type_modifier)
                } else {
                    type_names
                        .get(&column.type_oid)
                        .cloned()
                        .unwrap_or_else(|| format!("<type {} of the source>", column.type_oid))
                };
                SourceColumn {
                    name: column.name.clone(),
                    is_key: column.is_key,
                    type_oid: built_in.then_some(column.type_oid),
                    type_modifier: column.type_modifier,
                    type_name,
                }
            })
            .collect(),
    }
}

/// The local table's columns, None when it does not exist.
///
/// # Safety
/// In a transaction.
pub unsafe fn local_columns(namespace: &str, name: &str) -> Option<Vec<LocalColumn>> {
    let relid = local::find_relid(namespace, name)?;
    let relation = pg_sys::try_relation_open(relid, pg_sys::AccessShareLock as i32);
    if relation.is_null() {
        return None;
    }
    let descriptor = (*relation).rd_att;
    let count = (*descriptor).natts.max(0) as usize;
    let columns = (*descriptor)
        .attrs
        .as_slice(count)
        .iter()
        .filter(|attribute| !attribute.attisdropped)
        .map(|attribute| LocalColumn {
            name: std::ffi::CStr::from_ptr(attribute.attname.data.as_ptr())
                .to_string_lossy()
                .into_owned(),
            type_oid: attribute.atttypid.into(),
            type_modifier: attribute.atttypmod,
            type_name: format_type(attribute.atttypid, attribute.atttypmod),
            required: attribute.attnotnull
                && !attribute.atthasdef
                && attribute.attidentity == 0
                && attribute.attgenerated == 0,
        })
        .collect();
    pg_sys::relation_close(relation, pg_sys::AccessShareLock as i32);
    Some(columns)
}

/// Looks at the local table again: a pause while `relation` does not fit it.
///
/// # Safety
/// In a transaction.
pub unsafe fn check(relation: &Announced, failed: Failed) -> Option<ShapePause> {
    let local = local_columns(&relation.namespace, &relation.name);
    let differences = differences(relation, local.as_deref(), failed);
    (!differences.is_empty()).then(|| ShapePause {
        relation: relation.clone(),
        differences,
        local_at_pause: local,
        failed,
    })
}

/// Whether a paused apply should try again: the local table fits now, or the
/// DBA changed it in some other way (if that is still not enough, the apply
/// pauses again at the same change).
///
/// # Safety
/// In a transaction.
pub unsafe fn may_resume(pause: &ShapePause) -> bool {
    let relation = &pause.relation;
    let local = local_columns(&relation.namespace, &relation.name);
    local != pause.local_at_pause
        || differences(relation, local.as_deref(), pause.failed).is_empty()
}

/// `format_type_with_typemod`, as text.
///
/// # Safety
/// In a transaction.
unsafe fn format_type(type_oid: pg_sys::Oid, type_modifier: i32) -> String {
    let text = pg_sys::format_type_with_typemod(type_oid, type_modifier);
    std::ffi::CStr::from_ptr(text)
        .to_string_lossy()
        .into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn source_column(name: &str, oid: u32, type_name: &str, is_key: bool) -> SourceColumn {
        SourceColumn {
            name: name.into(),
            is_key,
            type_oid: Some(oid),
            type_modifier: -1,
            type_name: type_name.into(),
        }
    }

    fn local_column(name: &str, oid: u32, type_name: &str) -> LocalColumn {
        LocalColumn {
            name: name.into(),
            type_oid: oid,
            type_modifier: -1,
            type_name: type_name.into(),
            required: false,
        }
    }

    fn items() -> Announced {
        Announced {
            namespace: "public".into(),
            name: "Line Items".into(),
            columns: vec![
                source_column("id", 20, "bigint", true),
                source_column("note", 25, "text", false),
            ],
        }
    }

    #[test]
    fn a_missing_column_is_added_and_extra_local_columns_are_fine() {
        let local = [
            local_column("id", 20, "bigint"),
            local_column("added_here_first", 23, "integer"),
        ];
        let found = differences(&items(), Some(&local), Failed::Other);
        assert_eq!(
            found,
            [Difference::MissingColumn {
                column: "note".into(),
                source_type: "text".into()
            }]
        );
        assert_eq!(
            ddl(&items(), &found),
            r#"ALTER TABLE "public"."Line Items" ADD COLUMN "note" text"#
        );
        let fits = [
            local_column("id", 20, "bigint"),
            local_column("note", 25, "text"),
            local_column("extra", 23, "integer"),
        ];
        assert!(differences(&items(), Some(&fits), Failed::Other).is_empty());
    }

    #[test]
    fn a_missing_table_gets_its_create_table_with_the_key() {
        let found = differences(&items(), None, Failed::Other);
        assert_eq!(found, [Difference::MissingTable]);
        assert_eq!(
            ddl(&items(), &found),
            r#"CREATE TABLE "public"."Line Items" ("id" bigint, "note" text, PRIMARY KEY ("id"))"#
        );
    }

    #[test]
    fn types_differ_only_when_a_value_failed_to_convert() {
        let local = [
            local_column("id", 23, "integer"),
            local_column("note", 25, "text"),
        ];
        assert!(differences(&items(), Some(&local), Failed::Other).is_empty());
        let found = differences(&items(), Some(&local), Failed::Conversion);
        assert_eq!(
            found,
            [Difference::TypeDiffers {
                column: "id".into(),
                source_type: "bigint".into(),
                local_type: "integer".into()
            }]
        );
        assert_eq!(
            ddl(&items(), &found),
            r#"ALTER TABLE "public"."Line Items" ALTER COLUMN "id" TYPE bigint"#
        );
    }

    #[test]
    fn a_required_column_the_source_dropped_counts_when_a_null_was_refused() {
        let mut dropped = local_column("gone", 23, "integer");
        dropped.required = true;
        let local = [
            local_column("id", 20, "bigint"),
            local_column("note", 25, "text"),
            dropped,
        ];
        assert!(differences(&items(), Some(&local), Failed::Other).is_empty());
        let found = differences(&items(), Some(&local), Failed::NotNull);
        assert_eq!(
            found,
            [Difference::RequiredHere {
                column: "gone".into()
            }]
        );
        assert_eq!(
            ddl(&items(), &found),
            r#"ALTER TABLE "public"."Line Items" ALTER COLUMN "gone" DROP NOT NULL"#
        );
    }
}
