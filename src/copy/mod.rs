//! Table data: planning what to copy from a source database, and streaming
//! one table's `COPY ... TO STDOUT` from the source straight into the local
//! table through PostgreSQL's own COPY FROM machinery (as tablesync.c does),
//! with no client connection back into this server.

pub mod into_table;
pub mod matview;
pub mod objects;

/// The tables to copy, largest first (runs on the source, in the snapshot).
pub const SOURCE_TABLES_SQL: &str = include_str!("sql/source_tables.sql");
/// Sequence states at the snapshot (runs on the source).
pub const SOURCE_SEQUENCES_SQL: &str = include_str!("sql/source_sequences.sql");
/// The tables published one by one when FOR ALL TABLES is not allowed.
pub const PUBLISHABLE_TABLES_SQL: &str = include_str!("sql/publishable_tables.sql");
/// Tables the source would refuse UPDATE/DELETE on once published (shared
/// with the assessment's check).
pub const TABLES_WITHOUT_IDENTITY_SQL: &str =
    include_str!("../assess/sql/source_tables_without_identity.sql");
/// Row count and optional checksum of one table, on either side.
pub const TABLE_FINGERPRINT_SQL: &str = include_str!("sql/table_fingerprint.sql");

/// The fingerprint query for `qualified` (an already quoted `schema.table`).
pub fn fingerprint_sql(qualified: &str, checksums: bool) -> String {
    TABLE_FINGERPRINT_SQL
        .replace("%TABLE%", qualified)
        .replace("%CHECKSUMS%", if checksums { "true" } else { "false" })
}

/// The columns one table's COPY reads, in order, as the plan read them from
/// the source at the snapshot (`columns` of [`SOURCE_TABLES_SQL`]): the task
/// worker writes them for every table of a database to one file, which each
/// copy worker reads once, instead of asking the source before every COPY.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct TableColumns {
    pub schema: String,
    pub table: String,
    pub columns: Vec<String>,
}

/// The columns of every table listed in `text` (one JSON [`TableColumns`] a
/// line), by (schema, table).
pub fn parse_columns(
    text: &str,
) -> Result<std::collections::HashMap<(String, String), Vec<String>>, serde_json::Error> {
    text.lines()
        .filter(|line| !line.is_empty())
        .map(|line| {
            serde_json::from_str::<TableColumns>(line).map(|t| ((t.schema, t.table), t.columns))
        })
        .collect()
}

/// What [`parse_columns`] reads.
pub fn format_columns(tables: &[TableColumns]) -> Result<String, serde_json::Error> {
    let mut text = String::new();
    for table in tables {
        text.push_str(&serde_json::to_string(table)?);
        text.push('\n');
    }
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::{format_columns, parse_columns, TableColumns};

    #[test]
    fn column_lists_survive_hostile_names() {
        let tables = vec![
            TableColumns {
                schema: "s\"\n\t".into(),
                table: "t;\\".into(),
                columns: vec!["a b".into(), "\n".into(), "ü".into()],
            },
            TableColumns {
                schema: "public".into(),
                table: "no_columns".into(),
                columns: Vec::new(),
            },
        ];
        let parsed = parse_columns(&format_columns(&tables).unwrap()).unwrap();
        assert_eq!(parsed.len(), 2);
        assert_eq!(
            parsed[&("s\"\n\t".to_string(), "t;\\".to_string())],
            tables[0].columns
        );
        assert!(parsed[&("public".to_string(), "no_columns".to_string())].is_empty());
    }
}
