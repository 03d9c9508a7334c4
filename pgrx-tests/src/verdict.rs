//! The one verdict every fault scenario ends with ([`assert_verdict`]):
//!
//! 1. the task's status row is in the expected phase, and its events say what happened (each
//!    expected text appears in them);
//! 2. per database, every table has the same row count and checksum on both sides
//!    ([`crate::compare::compare_data`]), and no table without a primary key or unique index has
//!    more duplicate rows here than on the source (a change applied twice shows there first);
//! 3. once the task is over (`completed` or `cancelled`): no replication slot or publication of
//!    cloudmig is left on the source, no replication origin of the task here.

use crate::compare::{compare_data, stable_client};
use crate::migration::{events, reopen_source};
use crate::Cluster;

/// What a scenario expects of the task at its end.
#[derive(Debug, Clone, Copy)]
pub struct Expect<'a> {
    /// The phase in `cloudmig.tasks`.
    pub phase: &'a str,
    /// Texts that must each appear in some event of the task.
    pub events: &'a [&'a str],
    /// Databases whose data is compared.
    pub databases: &'a [&'a str],
}

/// Checks the verdict (see the module doc); panics with everything found wrong at once.
pub fn assert_verdict(source: &Cluster, dest: &Cluster, task: i64, expect: Expect<'_>) {
    let mut wrong: Vec<String> = Vec::new();
    let log = events(dest, task);
    let phase: String = dest.query_scalar(
        "postgres",
        &format!("SELECT phase FROM cloudmig.task WHERE id = {task}"),
    );
    if phase != expect.phase {
        wrong.push(format!("the task is {phase}, expected {}", expect.phase));
    }
    for text in expect.events {
        if !log.contains(text) {
            wrong.push(format!("no event says {text:?}"));
        }
    }
    let over = matches!(expect.phase, "completed" | "cancelled");
    if over {
        // A completed switchover leaves the migrated databases closed to connections.
        reopen_source(source);
    }
    for db in expect.databases {
        if let Err(mismatch) = compare_data(source, dest, db) {
            wrong.push(mismatch.to_string());
        }
        for (table, here, there) in duplicates(source, dest, db) {
            if here > there {
                wrong.push(format!(
                    "{db}: {table} (no key) has {here} duplicate row(s) here, {there} on the source"
                ));
            }
        }
    }
    if over {
        let slots: String = source.query_scalar(
            "postgres",
            "SELECT coalesce(string_agg(slot_name, ', '), '') FROM pg_replication_slots \
              WHERE slot_name LIKE 'cloudmig%'",
        );
        if !slots.is_empty() {
            wrong.push(format!("slots left on the source: {slots}"));
        }
        for db in crate::compare::databases(source) {
            let publications: String = source.query_scalar(
                &db,
                "SELECT coalesce(string_agg(pubname, ', '), '') FROM pg_publication \
                  WHERE pubname LIKE 'cloudmig%'",
            );
            if !publications.is_empty() {
                wrong.push(format!(
                    "publications left in source database {db}: {publications}"
                ));
            }
        }
        let origins: String = dest.query_scalar(
            "postgres",
            &format!(
                "SELECT coalesce(string_agg(roname, ', '), '') FROM pg_replication_origin \
                  WHERE roname LIKE 'cloudmig\\_{task}\\_%'"
            ),
        );
        if !origins.is_empty() {
            wrong.push(format!("replication origins left here: {origins}"));
        }
    }
    assert!(
        wrong.is_empty(),
        "verdict of task {task}:\n- {}\n--- events ---\n{log}",
        wrong.join("\n- ")
    );
}

/// Per table of `db` without a primary key or unique index (on the destination): (table,
/// duplicate rows here, duplicate rows on the source).
pub fn duplicates(source: &Cluster, dest: &Cluster, db: &str) -> Vec<(String, i64, i64)> {
    let mut client = stable_client(dest, db);
    let tables: Vec<String> = client
        .query(
            "SELECT format('%I.%I', n.nspname, c.relname) FROM pg_class c \
               JOIN pg_namespace n ON n.oid = c.relnamespace \
              WHERE c.relkind = 'r' AND n.nspname NOT IN ('pg_catalog', 'information_schema', 'cloudmig') \
                AND n.nspname !~ '^pg_' \
                AND NOT EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = c.oid \
                                   AND (i.indisprimary OR i.indisunique)) \
              ORDER BY 1",
            &[],
        )
        .unwrap_or_else(|e| panic!("keyless tables of {db}: {e}"))
        .iter()
        .map(|row| row.get(0))
        .collect();
    let count = |cluster: &Cluster, table: &str| -> i64 {
        cluster.query_scalar(
            db,
            &format!(
                "SELECT count(*) - (SELECT count(*) FROM (SELECT DISTINCT md5(t::text) FROM ONLY {table} t) d) \
                   FROM ONLY {table}"
            ),
        )
    };
    tables
        .into_iter()
        .map(|table| {
            let (here, there) = (count(dest, &table), count(source, &table));
            (table, here, there)
        })
        .collect()
}
