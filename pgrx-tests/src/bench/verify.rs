//! Is a destination's data the source's? Per table: row count and an order-independent checksum
//! (`sum(hashtext(row::text))`), plus the count of indexes and constraints so that a copy
//! without them does not pass for a usable one.
//!
//! Cheaper than [`crate::compare::table_fingerprints`] (no sort of every row's md5), which matters
//! on a 10-million-row pgbench table; the listing of tables and the session that renders values
//! the same on both sides are `compare`'s.

use std::collections::BTreeMap;

use crate::cluster::{describe, Cluster};
use crate::compare::{map_diff, ordinary_tables, stable_client};

/// Schemas the peers create for themselves; never data of the migration.
const TOOL_SCHEMAS: [&str; 2] = ["pglogical.", "pgcopydb."];

/// Per table (`schema.table`): (rows, checksum).
pub type Fingerprints = BTreeMap<String, (i64, i64)>;

/// What a database holds, for comparison.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Contents {
    /// Rows and checksum per table.
    pub tables: Fingerprints,
    /// Indexes on user tables.
    pub indexes: i64,
    /// Constraints on user tables (primary keys, unique, check, foreign keys).
    pub constraints: i64,
}

/// The [`Contents`] of `db` on `cluster`.
pub fn contents(cluster: &Cluster, db: &str) -> Contents {
    let mut client = stable_client(cluster, db);
    let mut tables = Fingerprints::new();
    for table in ordinary_tables(cluster, db) {
        if TOOL_SCHEMAS.iter().any(|schema| table.starts_with(schema)) {
            continue;
        }
        let sql = format!(
            "SELECT count(*), coalesce(sum(hashtext(t::text)), 0)::bigint FROM ONLY {table} t"
        );
        let row = client.query_one(&sql, &[]).unwrap_or_else(|e| {
            panic!(
                "cluster {} database {db}: {}\nSQL: {sql}",
                cluster.name,
                describe(&e)
            )
        });
        tables.insert(table, (row.get(0), row.get(1)));
    }
    let structure = "SELECT (SELECT count(*) FROM pg_index i JOIN pg_class c ON c.oid = i.indrelid \
                                JOIN pg_namespace n ON n.oid = c.relnamespace \
                               WHERE n.nspname NOT IN ('pg_catalog', 'information_schema', 'pg_toast', \
                                                       'cloudmig', 'pglogical', 'pgcopydb')), \
                            (SELECT count(*) FROM pg_constraint k JOIN pg_namespace n ON n.oid = k.connamespace \
                               WHERE k.conrelid <> 0 AND n.nspname NOT IN ('pg_catalog', 'information_schema', \
                                                       'cloudmig', 'pglogical', 'pgcopydb'))";
    let row = client
        .query_one(structure, &[])
        .unwrap_or_else(|e| panic!("cluster {} database {db}: {}", cluster.name, describe(&e)));
    Contents {
        tables,
        indexes: row.get(0),
        constraints: row.get(1),
    }
}

/// `Ok` when `dest`'s `db` holds `expected`; otherwise what differs (first lines).
pub fn check(expected: &Contents, dest: &Cluster, db: &str) -> Result<(), String> {
    let actual = contents(dest, db);
    if let Some(diff) = map_diff(&expected.tables, &actual.tables) {
        return Err(format!(
            "database {db}: table (rows, checksum) differ:\n{}",
            crate::bench::first_lines(&diff, 8)
        ));
    }
    if (expected.indexes, expected.constraints) != (actual.indexes, actual.constraints) {
        return Err(format!(
            "database {db}: {} indexes and {} constraints, the source has {} and {}",
            actual.indexes, actual.constraints, expected.indexes, expected.constraints
        ));
    }
    Ok(())
}

/// Checks every database of `expected` on `dest`; the first difference is the error.
pub fn check_all(expected: &BTreeMap<String, Contents>, dest: &Cluster) -> Result<(), String> {
    for (db, contents) in expected {
        check(contents, dest, db)?;
    }
    Ok(())
}
