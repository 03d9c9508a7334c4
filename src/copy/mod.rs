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
