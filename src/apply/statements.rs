//! The SQL that applies one decoded change to a local table.
//!
//! Values arrive from pgoutput as text; each statement takes them as `text`
//! parameters and casts them to the local column's type (`$1::text::type`),
//! which goes through the type's input function as PostgreSQL's own apply
//! does, and works for enums, domains, arrays and composites whose OIDs
//! differ between the two servers.
//!
//! Rows are found by the replica identity: the key columns, or with
//! `REPLICA IDENTITY FULL` every column, matching exactly one row even when
//! duplicates exist (`ctid = (... LIMIT 1)`).

use crate::source::quote_ident;

/// A local column as the applier needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalColumn {
    pub name: String,
    /// `format_type()` of the local column, e.g. `numeric(10,2)`, `public.mood`.
    pub type_name: String,
    /// Whether `=` is defined for the type (json, xml, geometric types lack it:
    /// they are compared by their text form).
    pub has_equality: bool,
}

/// A local table and the identity by which the source names its rows.
#[derive(Debug, Clone)]
pub struct Target {
    pub schema: String,
    pub table: String,
}

impl Target {
    fn qualified(&self) -> String {
        format!("{}.{}", quote_ident(&self.schema), quote_ident(&self.table))
    }
}

/// A statement and the column names whose values it takes, in `$n` order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Statement {
    pub sql: String,
    pub parameter_count: usize,
}

fn cast(parameter: usize, column: &LocalColumn) -> String {
    format!("${parameter}::text::{}", column.type_name)
}

/// `col = $n` for a row match (NULL-safe), by text for types without `=`.
fn matches(parameter: usize, column: &LocalColumn, qualifier: &str) -> String {
    let name = format!("{qualifier}{}", quote_ident(&column.name));
    if column.has_equality {
        format!("{name} IS NOT DISTINCT FROM {}", cast(parameter, column))
    } else {
        format!("{name}::text IS NOT DISTINCT FROM ${parameter}::text")
    }
}

/// INSERT of `columns` (the new tuple's columns, in the order sent).
pub fn insert(target: &Target, columns: &[&LocalColumn]) -> Statement {
    let names: Vec<String> = columns.iter().map(|c| quote_ident(&c.name)).collect();
    let values: Vec<String> = columns
        .iter()
        .enumerate()
        .map(|(i, c)| cast(i + 1, c))
        .collect();
    Statement {
        sql: format!(
            "INSERT INTO {} ({}) VALUES ({})",
            target.qualified(),
            names.join(", "),
            values.join(", ")
        ),
        parameter_count: columns.len(),
    }
}

/// The `WHERE` that finds the one row named by `identity` columns, taking
/// its parameters from `$first`.
fn one_row(target: &Target, identity: &[&LocalColumn], first: usize) -> String {
    let conditions: Vec<String> = identity
        .iter()
        .enumerate()
        .map(|(i, c)| matches(first + i, c, "r."))
        .collect();
    // One row even when several are identical (REPLICA IDENTITY FULL).
    format!(
        "ctid = (SELECT r.ctid FROM {} r WHERE {} LIMIT 1)",
        target.qualified(),
        if conditions.is_empty() {
            "true".to_string()
        } else {
            conditions.join(" AND ")
        }
    )
}

/// UPDATE setting `set` columns (unchanged TOASTed ones left out by the
/// caller) of the row matched by `identity` columns; parameters are the set
/// values first, then the identity values.
pub fn update(target: &Target, set: &[&LocalColumn], identity: &[&LocalColumn]) -> Statement {
    let assignments: Vec<String> = set
        .iter()
        .enumerate()
        .map(|(i, c)| format!("{} = {}", quote_ident(&c.name), cast(i + 1, c)))
        .collect();
    Statement {
        sql: format!(
            "UPDATE {} SET {} WHERE {}",
            target.qualified(),
            assignments.join(", "),
            one_row(target, identity, set.len() + 1)
        ),
        parameter_count: set.len() + identity.len(),
    }
}

/// DELETE of the row matched by `identity` columns.
pub fn delete(target: &Target, identity: &[&LocalColumn]) -> Statement {
    Statement {
        sql: format!(
            "DELETE FROM {} WHERE {}",
            target.qualified(),
            one_row(target, identity, 1)
        ),
        parameter_count: identity.len(),
    }
}

/// TRUNCATE of several tables at once, as the source did it.
pub fn truncate(targets: &[Target], cascade: bool, restart_identity: bool) -> String {
    let names: Vec<String> = targets.iter().map(Target::qualified).collect();
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

/// Base types without an `=` operator: rows holding them are matched by text.
pub const TYPES_WITHOUT_EQUALITY: &[&str] = &[
    "json", "xml", "point", "line", "lseg", "box", "path", "polygon", "circle",
];

#[cfg(test)]
mod tests {
    use super::*;

    fn column(name: &str, type_name: &str) -> LocalColumn {
        LocalColumn {
            name: name.into(),
            type_name: type_name.into(),
            has_equality: !TYPES_WITHOUT_EQUALITY.contains(&type_name),
        }
    }

    fn target() -> Target {
        Target {
            schema: "Sales".into(),
            table: "line items".into(),
        }
    }

    #[test]
    fn insert_casts_text_parameters_to_local_types() {
        let (id, mood) = (column("id", "integer"), column("mood", "public.mood"));
        let statement = insert(&target(), &[&id, &mood]);
        assert_eq!(
            statement.sql,
            "INSERT INTO \"Sales\".\"line items\" (\"id\", \"mood\") VALUES ($1::text::integer, $2::text::public.mood)"
        );
        assert_eq!(statement.parameter_count, 2);
    }

    #[test]
    fn update_matches_one_row_by_identity_after_the_set_values() {
        let (id, body, doc) = (
            column("id", "integer"),
            column("body", "text"),
            column("doc", "json"),
        );
        let statement = update(&target(), &[&body, &doc], &[&id]);
        assert_eq!(
            statement.sql,
            "UPDATE \"Sales\".\"line items\" SET \"body\" = $1::text::text, \"doc\" = $2::text::json \
             WHERE ctid = (SELECT r.ctid FROM \"Sales\".\"line items\" r \
             WHERE r.\"id\" IS NOT DISTINCT FROM $3::text::integer LIMIT 1)"
        );
        assert_eq!(statement.parameter_count, 3);
    }

    #[test]
    fn full_identity_compares_types_without_equality_as_text() {
        let (a, doc) = (column("a", "integer"), column("doc", "json"));
        let statement = delete(&target(), &[&a, &doc]);
        assert!(statement
            .sql
            .contains("r.\"a\" IS NOT DISTINCT FROM $1::text::integer"));
        assert!(statement
            .sql
            .contains("r.\"doc\"::text IS NOT DISTINCT FROM $2::text"));
        assert!(statement.sql.ends_with("LIMIT 1)"));
    }

    #[test]
    fn truncate_keeps_the_source_options() {
        let sql = truncate(
            &[
                target(),
                Target {
                    schema: "public".into(),
                    table: "t".into(),
                },
            ],
            true,
            true,
        );
        assert_eq!(
            sql,
            "TRUNCATE ONLY \"Sales\".\"line items\", \"public\".\"t\" RESTART IDENTITY CASCADE"
        );
    }
}
