//! Test data and reference copies: loading `fixtures/*.sql` psql scripts into a cluster, and
//! copying a whole cluster into another with PostgreSQL's own tools (what a correct migration
//! must be indistinguishable from, per [`crate::compare`]).
//!
//! Scripts run through `psql` rather than the SQL client because they hold `CREATE DATABASE`
//! (which cannot run in a multi-statement batch) and switch databases with `\connect`.

use std::time::{Duration, Instant};

use crate::cluster::Cluster;
use crate::compare::databases;
use crate::pgbin::{run, run_with_input};

/// `fixtures/rich_source.sql`: roles, four databases and most kinds of objects and values (its
/// header lists them).
pub const RICH_SOURCE_SQL: &str = include_str!("../fixtures/rich_source.sql");

/// The non-template databases a cluster holds after [`load_rich_source`], sorted by name.
pub const RICH_SOURCE_DATABASES: [&str; 4] = ["Sales & Ops", "app", "legacy", "postgres"];

/// Loads [`RICH_SOURCE_SQL`] into `cluster` (which must not hold its roles and databases yet);
/// returns how long it took. Panics with psql's output on the first error.
pub fn load_rich_source(cluster: &Cluster) -> Duration {
    let started = Instant::now();
    psql_script(cluster, "postgres", RICH_SOURCE_SQL);
    started.elapsed()
}

/// Runs `script` with `psql -X -v ON_ERROR_STOP=1` as `postgres` in `db` (so `\connect` and
/// one-statement-only commands work); panics with psql's output on the first error.
pub fn psql_script(cluster: &Cluster, db: &str, script: &str) {
    let mut psql = psql(cluster, db);
    psql.args(["-q", "-v", "ON_ERROR_STOP=1", "-f", "-"]);
    if let Err(e) = run_with_input(&mut psql, script.as_bytes()) {
        panic!("psql script on cluster {} database {db}: {e}", cluster.name);
    }
}

/// Copies every role and every non-template database of `from` into `to` (a fresh cluster) with
/// `pg_dumpall --roles-only` and, per database, `pg_dump -Fc | pg_restore --create`: a reference
/// for what a faithful migration produces. `postgres` is dropped and recreated with `--clean`
/// so that its own properties (settings, ACL, comment) come along too.
pub fn copy_with_pg_dump(from: &Cluster, to: &Cluster) {
    let mut dumpall = from.command("pg_dumpall");
    dumpall.args(["--roles-only"]);
    let roles = run(&mut dumpall)
        .unwrap_or_else(|e| panic!("pg_dumpall --roles-only of {}: {e}", from.name));
    // `postgres` exists in every cluster: its CREATE would fail, its ALTER ROLE still applies.
    let roles: String = String::from_utf8_lossy(&roles.stdout)
        .lines()
        .filter(|line| *line != "CREATE ROLE postgres;")
        .map(|line| format!("{line}\n"))
        .collect();
    psql_script(to, "postgres", &roles);

    for db in databases(from) {
        let mut dump = from.command("pg_dump");
        dump.args(["-Fc", "-d", &db]);
        let archive = run(&mut dump)
            .unwrap_or_else(|e| panic!("pg_dump of {} database {db}: {e}", from.name));
        let mut restore = to.command("pg_restore");
        restore.args(["--create", "--exit-on-error", "-d", "template1"]);
        if db == "postgres" {
            restore.arg("--clean");
        }
        if let Err(e) = run_with_input(&mut restore, &archive.stdout) {
            panic!("pg_restore of database {db} into {}: {e}", to.name);
        }
    }
}

/// A `psql` command connected to `db` of `cluster` over its socket as `postgres`, with UTF8 as
/// the client encoding whatever the database's.
fn psql(cluster: &Cluster, db: &str) -> std::process::Command {
    let mut cmd = cluster.command("psql");
    cmd.args(["-X", "-d", db]).env("PGCLIENTENCODING", "UTF8");
    cmd
}
