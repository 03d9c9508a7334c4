//! Comparing two clusters the way a migration must leave them: same roles, same databases with
//! the same properties, and per database the same schema (owners and privileges included), data,
//! sequence positions and large objects.
//!
//! Each aspect has a *listing* function (`schema_dump`, `table_fingerprints`, ...), a `compare_*`
//! function returning a [`Mismatch`] that shows only the first differing lines, and an
//! `assert_same_*` wrapper that panics with it.
//!
//! Invariants:
//! - listings depend only on what the clusters hold, never on the session: every query runs in a
//!   [`stable_client`] (UTC, ISO dates, shortest-exact floats, hex bytea, C money), so equal
//!   content gives equal text on both sides;
//! - what cloudmig itself puts in a destination is left out, and nothing else: its schema
//!   `cloudmig`, its extension, and its roles ([`EXTENSION_ROLES`]);
//! - what legitimately differs between two clusters is normalised: pg_dump's `\restrict` keys and
//!   version header, object ACLs left at their default (NULL) versus spelled out, and the order of
//!   ACL items and of settings.

use std::collections::BTreeMap;
use std::fmt;

use postgres::Client;

use crate::cluster::{describe, Cluster};
use crate::pgbin::run;

/// The schema holding cloudmig's own objects on a destination.
pub const EXTENSION_SCHEMA: &str = "cloudmig";
/// Roles cloudmig's extension script creates on a destination (sql/catalog.sql); never migrated.
pub const EXTENSION_ROLES: [&str; 1] = ["cloudmig_admin"];
/// At most this many lines of differences in a [`Mismatch`].
const MAX_DIFF_LINES: usize = 40;
/// Unchanged lines shown before a change.
const CONTEXT_LINES: usize = 3;
/// Tables with more rows than this are not sampled for a data mismatch's message.
const MAX_SAMPLED_ROWS: i64 = 20_000;
/// Differing tables whose rows a data mismatch shows.
const SAMPLED_TABLES: usize = 3;
/// Rows shown per side and table.
const SAMPLED_ROWS: usize = 5;
/// A sampled row's text is cut after this many characters.
const SAMPLED_ROW_CHARS: usize = 200;
/// Above this many (left × right) lines the changed middle is shown as is, not aligned.
const MAX_ALIGN_CELLS: usize = 4_000_000;

/// Session settings that make every value's text form independent of the server's defaults and
/// of database- or role-level settings (`money` follows lc_monetary, floats extra_float_digits).
const STABLE_SESSION: &str = "SET TimeZone = 'UTC'; SET DateStyle = 'ISO, YMD'; \
     SET IntervalStyle = 'postgres'; SET extra_float_digits = 3; SET bytea_output = 'hex'; \
     SET lc_monetary = 'C'; SET search_path = pg_catalog; SET statement_timeout = 0; \
     SET row_security = off";

/// Schemas whose tables and sequences are not user data.
const NOT_USER_SCHEMAS: &str = "n.nspname NOT IN ('pg_catalog', 'information_schema', 'cloudmig') \
     AND n.nspname !~ '^pg_(toast|temp_|toast_temp_)'";

/// How two clusters differ in one aspect, with the first differing lines.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mismatch {
    /// The aspect and where, e.g. `schema of database "app"`.
    pub what: String,
    /// A unified-style excerpt: `-` lines are the first cluster's, `+` lines the second's.
    pub diff: String,
}

impl fmt::Display for Mismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} differ:\n{}", self.what, self.diff)
    }
}

impl std::error::Error for Mismatch {}

/// A superuser client of `db` whose session renders every value the same way on any cluster
/// (see the module doc); use it for any query whose text output is compared across clusters.
pub fn stable_client(cluster: &Cluster, db: &str) -> Client {
    let mut client = cluster.client(db);
    client.batch_execute(STABLE_SESSION).unwrap_or_else(|e| {
        panic!(
            "cluster {} database {db}: {}\nSQL: {STABLE_SESSION}",
            cluster.name,
            describe(&e)
        )
    });
    client
}

/// The non-template databases that accept connections, sorted by name.
pub fn databases(cluster: &Cluster) -> Vec<String> {
    query_strings(
        cluster,
        "postgres",
        "SELECT datname::text FROM pg_database WHERE NOT datistemplate AND datallowconn \
          ORDER BY datname",
    )
}

/// The schema of `db` as `pg_dump --schema-only` prints it, owners and privileges included,
/// without cloudmig's own objects and normalised (see the module doc).
pub fn schema_dump(cluster: &Cluster, db: &str) -> String {
    let mut dump = cluster.command("pg_dump");
    dump.args([
        "--schema-only",
        "--encoding=UTF8",
        // Publications and subscriptions describe a topology, not data: cloudmig
        // does not copy them, and creates one of its own on the source.
        "--no-publications",
        "--no-subscriptions",
        &format!("--exclude-schema={EXTENSION_SCHEMA}"),
        "-d",
        db,
    ])
    // Partition bounds and defaults print timestamptz constants in the session's time zone.
    .env("PGTZ", "UTC");
    let out = run(&mut dump)
        .unwrap_or_else(|e| panic!("pg_dump of cluster {} database {db}: {e}", cluster.name));
    normalize_dump(&String::from_utf8_lossy(&out.stdout))
}

/// Per ordinary table (partitions included) and populated materialized view of `db`, outside
/// cloudmig's schema: `format('%I.%I', schema, name)` → (rows, checksum). The checksum is
/// order-independent and counts duplicates: the md5 of the sorted md5s of the rows' text forms.
pub fn table_fingerprints(cluster: &Cluster, db: &str) -> BTreeMap<String, (i64, String)> {
    let mut client = stable_client(cluster, db);
    let tables = query_in(
        cluster,
        db,
        &mut client,
        &format!(
            "SELECT format('%I.%I', n.nspname, c.relname) FROM pg_class c \
               JOIN pg_namespace n ON n.oid = c.relnamespace \
              WHERE (c.relkind = 'r' OR (c.relkind = 'm' AND c.relispopulated)) \
                AND {NOT_USER_SCHEMAS} ORDER BY 1"
        ),
    );
    let mut fingerprints = BTreeMap::new();
    for table in tables {
        // ONLY: a table with inheritance children is fingerprinted without their rows (the
        // children have fingerprints of their own).
        let sql = format!(
            "SELECT count(*), md5(coalesce(string_agg(h, '' ORDER BY h), '')) \
               FROM (SELECT md5(t::text) AS h FROM ONLY {table} t) s"
        );
        let result = client.query_one(&sql, &[]).unwrap_or_else(|e| {
            panic!(
                "cluster {} database {db}: {}\nSQL: {sql}",
                cluster.name,
                describe(&e)
            )
        });
        fingerprints.insert(table, (result.get(0), result.get(1)));
    }
    fingerprints
}

/// The ordinary tables (partitions included, partitioned parents and views not) of `db` outside
/// cloudmig's schema, as `format('%I.%I', schema, name)`, sorted.
pub fn ordinary_tables(cluster: &Cluster, db: &str) -> Vec<String> {
    query_strings(
        cluster,
        db,
        &format!(
            "SELECT format('%I.%I', n.nspname, c.relname) FROM pg_class c \
               JOIN pg_namespace n ON n.oid = c.relnamespace \
              WHERE c.relkind = 'r' AND {NOT_USER_SCHEMAS} ORDER BY 1"
        ),
    )
}

/// Per sequence of `db` outside cloudmig's schema (identity and serial ones included):
/// `format('%I.%I', schema, name)` → (last_value, is_called).
pub fn sequence_values(cluster: &Cluster, db: &str) -> BTreeMap<String, (i64, bool)> {
    let mut client = stable_client(cluster, db);
    let sequences = query_in(
        cluster,
        db,
        &mut client,
        &format!(
            "SELECT format('%I.%I', n.nspname, c.relname) FROM pg_class c \
               JOIN pg_namespace n ON n.oid = c.relnamespace \
              WHERE c.relkind = 'S' AND {NOT_USER_SCHEMAS} ORDER BY 1"
        ),
    );
    let mut values = BTreeMap::new();
    for sequence in sequences {
        let sql = format!("SELECT last_value, is_called FROM {sequence}");
        let row = client.query_one(&sql, &[]).unwrap_or_else(|e| {
            panic!(
                "cluster {} database {db}: {}\nSQL: {sql}",
                cluster.name,
                describe(&e)
            )
        });
        values.insert(sequence, (row.get(0), row.get(1)));
    }
    values
}

/// The non-system roles (not `pg_*`, not [`EXTENSION_ROLES`]), one line per fact, sorted:
/// attributes (password aside: see [`role_passwords`]), comment, memberships (with admin option
/// and grantor) and settings (role-wide and per database).
pub fn roles(cluster: &Cluster) -> String {
    query_lines(cluster, "postgres", include_str!("sql/roles.sql"))
}

/// `role: verifier` (or `<none>`) per non-system role, sorted. Verifiers are salted, so equal
/// lines mean a verbatim copy. Compare these only when the migration account is a superuser:
/// nobody else can read them.
pub fn role_passwords(cluster: &Cluster) -> String {
    query_lines(
        cluster,
        "postgres",
        "SELECT format('%I: %s', rolname, coalesce(rolpassword, '<none>')) FROM pg_authid \
          WHERE rolname !~ '^pg_' AND rolname <> ALL ($EXTENSION_ROLES) ORDER BY 1",
    )
}

/// The large objects of `db`, one line each, by oid: owner, ACL (sorted items, the default spelled
/// out), comment, size and md5 of the contents.
pub fn large_objects(cluster: &Cluster, db: &str) -> String {
    query_lines(
        cluster,
        db,
        "SELECT format('%s owner=%I acl=%s comment=%L bytes=%s md5=%s', m.oid, \
                pg_get_userbyid(m.lomowner), \
                (SELECT string_agg(a::text, ',' ORDER BY a::text) \
                   FROM unnest(coalesce(m.lomacl, acldefault('L', m.lomowner))) a), \
                obj_description(m.oid, 'pg_largeobject'), length(lo_get(m.oid)), \
                md5(lo_get(m.oid))) \
           FROM pg_largeobject_metadata m ORDER BY m.oid",
    )
}

/// The non-template databases, one line per fact, sorted: owner, encoding, locale (and provider
/// where the server has one), connection settings, tablespace, ACL (sorted items, the default
/// spelled out), comment; then each database-wide setting.
pub fn database_properties(cluster: &Cluster) -> String {
    query_lines(
        cluster,
        "postgres",
        include_str!("sql/database_properties.sql"),
    )
}

/// `pg_dump --schema-only` of `db` in both clusters.
pub fn compare_schema(left: &Cluster, right: &Cluster, db: &str) -> Result<(), Mismatch> {
    let what = format!("schemas of database {db:?}");
    mismatch(
        &what,
        left,
        right,
        text_diff(&schema_dump(left, db), &schema_dump(right, db)),
    )
}

/// [`table_fingerprints`] of `db` in both clusters.
/// For the first few differing tables that are small enough, the mismatch also shows some rows
/// found on one side only.
pub fn compare_data(left: &Cluster, right: &Cluster, db: &str) -> Result<(), Mismatch> {
    let what = format!("table contents (rows, checksum) of database {db:?}");
    let (l, r) = (table_fingerprints(left, db), table_fingerprints(right, db));
    let diff = map_diff(&l, &r).map(|mut diff| {
        let differing = l.iter().filter_map(|(table, (l_rows, l_sum))| {
            let (r_rows, r_sum) = r.get(table)?;
            let small = (*l_rows).max(*r_rows) <= MAX_SAMPLED_ROWS;
            (l_sum != r_sum && small).then_some(table)
        });
        for table in differing.take(SAMPLED_TABLES) {
            diff.push_str(&format!("\nrows of {table} on one side only:\n"));
            diff.push_str(&row_sample_diff(left, right, db, table));
        }
        diff
    });
    mismatch(&what, left, right, diff)
}

/// Up to [`SAMPLED_ROWS`] rows of `table` per side that the other side lacks (as a multiset),
/// each cut to [`SAMPLED_ROW_CHARS`] characters.
fn row_sample_diff(left: &Cluster, right: &Cluster, db: &str, table: &str) -> String {
    let rows = |cluster: &Cluster| -> BTreeMap<String, (usize, String)> {
        let sql =
            format!("SELECT md5(t::text), left(t::text, {SAMPLED_ROW_CHARS}) FROM ONLY {table} t");
        let mut client = stable_client(cluster, db);
        let result = client.query(&sql, &[]).unwrap_or_else(|e| {
            panic!(
                "cluster {} database {db}: {}\nSQL: {sql}",
                cluster.name,
                describe(&e)
            )
        });
        let mut rows: BTreeMap<String, (usize, String)> = BTreeMap::new();
        for row in result {
            let entry = rows.entry(row.get(0)).or_insert((0, row.get(1)));
            entry.0 += 1;
        }
        rows
    };
    let (l, r) = (rows(left), rows(right));
    let mut out = Vec::new();
    for (mark, this, other) in [("-", &l, &r), ("+", &r, &l)] {
        let extra = this.iter().filter_map(|(hash, (n, text))| {
            let missing = n.saturating_sub(other.get(hash).map_or(0, |(m, _)| *m));
            (missing > 0).then(|| format!("{mark} {text}{}", times(missing)))
        });
        out.extend(extra.take(SAMPLED_ROWS));
    }
    out.join("\n")
}

fn times(n: usize) -> String {
    if n == 1 {
        String::new()
    } else {
        format!(" (x{n})")
    }
}

/// [`sequence_values`] of `db` in both clusters.
pub fn compare_sequences(left: &Cluster, right: &Cluster, db: &str) -> Result<(), Mismatch> {
    let what = format!("sequences (last_value, is_called) of database {db:?}");
    let diff = map_diff(&sequence_values(left, db), &sequence_values(right, db));
    mismatch(&what, left, right, diff)
}

/// [`roles`] of both clusters.
pub fn compare_roles(left: &Cluster, right: &Cluster) -> Result<(), Mismatch> {
    mismatch("roles", left, right, text_diff(&roles(left), &roles(right)))
}

/// [`role_passwords`] of both clusters.
pub fn compare_role_passwords(left: &Cluster, right: &Cluster) -> Result<(), Mismatch> {
    let diff = text_diff(&role_passwords(left), &role_passwords(right));
    mismatch("role password verifiers", left, right, diff)
}

/// [`large_objects`] of `db` in both clusters.
pub fn compare_large_objects(left: &Cluster, right: &Cluster, db: &str) -> Result<(), Mismatch> {
    let what = format!("large objects of database {db:?}");
    let diff = text_diff(&large_objects(left, db), &large_objects(right, db));
    mismatch(&what, left, right, diff)
}

/// [`database_properties`] of both clusters.
pub fn compare_database_properties(left: &Cluster, right: &Cluster) -> Result<(), Mismatch> {
    let diff = text_diff(&database_properties(left), &database_properties(right));
    mismatch("databases", left, right, diff)
}

/// Everything but passwords: roles, database properties, then per database of `left` that
/// `right` also has: schema, data, sequences and large objects. Returns every mismatch found.
pub fn compare_instance(left: &Cluster, right: &Cluster) -> Vec<Mismatch> {
    let mut found: Vec<Mismatch> = [
        compare_roles(left, right),
        compare_database_properties(left, right),
    ]
    .into_iter()
    .filter_map(Result::err)
    .collect();
    let right_dbs = databases(right);
    for db in databases(left) {
        // A missing database is already in the database_properties mismatch.
        if right_dbs.contains(&db) {
            found.extend(
                [
                    compare_schema(left, right, &db),
                    compare_data(left, right, &db),
                    compare_sequences(left, right, &db),
                    compare_large_objects(left, right, &db),
                ]
                .into_iter()
                .filter_map(Result::err),
            );
        }
    }
    found
}

/// Panics with the diff unless [`compare_schema`] finds none.
pub fn assert_same_schema(left: &Cluster, right: &Cluster, db: &str) {
    ok_or_panic(compare_schema(left, right, db));
}

/// Panics with the differing tables unless [`compare_data`] finds none.
pub fn assert_same_data(left: &Cluster, right: &Cluster, db: &str) {
    ok_or_panic(compare_data(left, right, db));
}

/// Panics with the differing sequences unless [`compare_sequences`] finds none.
pub fn assert_same_sequences(left: &Cluster, right: &Cluster, db: &str) {
    ok_or_panic(compare_sequences(left, right, db));
}

/// Panics with the diff unless [`compare_roles`] finds none.
pub fn assert_same_roles(left: &Cluster, right: &Cluster) {
    ok_or_panic(compare_roles(left, right));
}

/// Panics with the diff unless [`compare_role_passwords`] finds none.
pub fn assert_same_role_passwords(left: &Cluster, right: &Cluster) {
    ok_or_panic(compare_role_passwords(left, right));
}

/// Panics with the diff unless [`compare_large_objects`] finds none.
pub fn assert_same_large_objects(left: &Cluster, right: &Cluster, db: &str) {
    ok_or_panic(compare_large_objects(left, right, db));
}

/// Panics with the diff unless [`compare_database_properties`] finds none.
pub fn assert_same_database_properties(left: &Cluster, right: &Cluster) {
    ok_or_panic(compare_database_properties(left, right));
}

/// Panics with every mismatch [`compare_instance`] finds.
pub fn assert_same_instance(left: &Cluster, right: &Cluster) {
    let found = compare_instance(left, right);
    if !found.is_empty() {
        let all: Vec<String> = found.iter().map(Mismatch::to_string).collect();
        panic!(
            "{} mismatches between clusters {} (-) and {} (+):\n\n{}",
            found.len(),
            left.name,
            right.name,
            all.join("\n\n")
        );
    }
}

/// Line diff of two texts: `None` when equal, else an excerpt of the changed lines (`-` left,
/// `+` right) with a little context and line numbers, at most [`MAX_DIFF_LINES`] lines.
pub fn text_diff(left: &str, right: &str) -> Option<String> {
    if left == right {
        return None;
    }
    let a: Vec<&str> = left.lines().collect();
    let b: Vec<&str> = right.lines().collect();
    let prefix = a.iter().zip(&b).take_while(|(x, y)| x == y).count();
    let suffix = a[prefix..]
        .iter()
        .rev()
        .zip(b[prefix..].iter().rev())
        .take_while(|(x, y)| x == y)
        .count();
    let (a_mid, b_mid) = (&a[prefix..a.len() - suffix], &b[prefix..b.len() - suffix]);
    let mut out = Vec::new();
    if a_mid.is_empty() && b_mid.is_empty() {
        // Same lines, different line endings or a trailing newline.
        out.push(format!(
            "(texts differ only in line endings: {} vs {} bytes)",
            left.len(),
            right.len()
        ));
        return Some(out.join("\n"));
    }
    out.push(format!(
        "@@ first difference at line {} (left {} lines, right {}) @@",
        prefix + 1,
        a.len(),
        b.len()
    ));
    for line in &a[prefix.saturating_sub(CONTEXT_LINES)..prefix] {
        out.push(format!("  {line}"));
    }
    let edits = align(a_mid, b_mid);
    let changed = edits.iter().filter(|e| !matches!(e, Edit::Same(_))).count();
    // Every printed line counts against the budget, unchanged ones between changes included.
    let mut budget = MAX_DIFF_LINES;
    let mut shown = 0;
    let mut same_run = 0;
    for edit in &edits {
        if budget == 0 {
            out.push(format!(
                "... and {} more changed lines",
                changed.saturating_sub(shown)
            ));
            break;
        }
        let line = match edit {
            Edit::Same(line) => {
                same_run += 1;
                match same_run {
                    n if n <= CONTEXT_LINES => format!("  {line}"),
                    n if n == CONTEXT_LINES + 1 => "  ...".to_owned(),
                    _ => continue,
                }
            }
            Edit::Left(line) => {
                same_run = 0;
                shown += 1;
                format!("- {line}")
            }
            Edit::Right(line) => {
                same_run = 0;
                shown += 1;
                format!("+ {line}")
            }
        };
        out.push(line);
        budget -= 1;
    }
    Some(out.join("\n"))
}

/// Differences of two maps: keys only on one side and keys whose values differ, at most
/// [`MAX_DIFF_LINES`] lines; `None` when equal.
pub fn map_diff<V: fmt::Debug + PartialEq>(
    left: &BTreeMap<String, V>,
    right: &BTreeMap<String, V>,
) -> Option<String> {
    let mut lines = Vec::new();
    for (key, l) in left {
        match right.get(key) {
            None => lines.push(format!("- {key}: {l:?} (missing on the right)")),
            Some(r) if r != l => lines.push(format!("- {key}: {l:?}\n+ {key}: {r:?}")),
            Some(_) => {}
        }
    }
    for (key, r) in right {
        if !left.contains_key(key) {
            lines.push(format!("+ {key}: {r:?} (missing on the left)"));
        }
    }
    if lines.is_empty() {
        return None;
    }
    let total = lines.len();
    lines.truncate(MAX_DIFF_LINES);
    if total > MAX_DIFF_LINES {
        lines.push(format!("... and {} more keys", total - MAX_DIFF_LINES));
    }
    Some(format!(
        "{total} of {} keys differ:\n{}",
        left.len().max(right.len()),
        lines.join("\n")
    ))
}

/// pg_dump output without what differs between two clusters holding the same schema: the
/// `\restrict`/`\unrestrict` lines (a random key, PostgreSQL 13.22/14.19/15.14/16.10/17.6+), the
/// version header, and cloudmig's own extension entries (its `CREATE EXTENSION` and comment:
/// `--exclude-schema` leaves them in, and `--exclude-extension` only exists from PostgreSQL 17).
pub fn normalize_dump(dump: &str) -> String {
    let mut out = String::with_capacity(dump.len());
    for entry in split_dump_entries(dump) {
        if is_extension_entry(entry.header) {
            continue;
        }
        for line in entry.lines {
            if line.starts_with("\\restrict ")
                || line.starts_with("\\unrestrict ")
                || line.starts_with("-- Dumped from database version")
                || line.starts_with("-- Dumped by pg_dump version")
            {
                continue;
            }
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

/// One archive entry of a plain-format dump: the lines from its `--` / `-- Name: ...` / `--`
/// comment header to the next entry's.
struct DumpEntry<'a> {
    /// The `-- Name: ...; Type: ...; Schema: ...; Owner: ...` line (empty before the first entry).
    header: &'a str,
    lines: Vec<&'a str>,
}

fn split_dump_entries(dump: &str) -> Vec<DumpEntry<'_>> {
    let lines: Vec<&str> = dump.lines().collect();
    let mut entries = vec![DumpEntry {
        header: "",
        lines: Vec::new(),
    }];
    for (i, line) in lines.iter().enumerate() {
        // The closing "dump complete" banner is an entry of its own, so that it never goes
        // with an entry left out (cloudmig's extension comes last on a fresh destination).
        let starts_entry = *line == "--"
            && lines.get(i + 1).is_some_and(|next| {
                next.starts_with("-- Name: ")
                    || next.starts_with("-- Data for Name: ")
                    || *next == "-- PostgreSQL database dump complete"
            });
        if starts_entry {
            // pg_dump prints the session state an entry needs (`SET default_tablespace`,
            // `SET default_table_access_method`) before its header, so at the end of the entry
            // before: those lines go with the entry they are for.
            // The preamble's own SETs (before the first entry) stay where they are.
            let state = match entries.last_mut() {
                Some(previous) if !previous.header.is_empty() => {
                    let keep = state_lines_start(&previous.lines);
                    previous.lines.split_off(keep)
                }
                _ => Vec::new(),
            };
            entries.push(DumpEntry {
                header: lines[i + 1],
                lines: state,
            });
        }
        if let Some(entry) = entries.last_mut() {
            entry.lines.push(line);
        }
    }
    entries
}

/// Where the trailing run of session-state lines (`SET ...;`, with the blank lines between and
/// after them) of an entry's lines begins; `lines.len()` when there is none.
fn state_lines_start(lines: &[&str]) -> usize {
    let is_state = |line: &str| line.starts_with("SET ") && line.ends_with(';');
    let mut start = lines.len();
    for (i, line) in lines.iter().enumerate().rev() {
        if is_state(line) {
            start = i;
        } else if !line.is_empty() {
            break;
        }
    }
    start
}

/// Whether a dump entry header is cloudmig's extension or its comment (the schema's own entries
/// are gone with `--exclude-schema`).
fn is_extension_entry(header: &str) -> bool {
    header.starts_with(&format!("-- Name: {EXTENSION_SCHEMA}; Type: EXTENSION;"))
        || header.starts_with(&format!(
            "-- Name: EXTENSION {EXTENSION_SCHEMA}; Type: COMMENT;"
        ))
}

#[derive(Debug, PartialEq, Eq)]
enum Edit<'a> {
    Same(&'a str),
    Left(&'a str),
    Right(&'a str),
}

/// A shortest edit script from `a` to `b` (longest common subsequence); all of `a` removed and
/// all of `b` added when they are too large to align.
fn align<'a>(a: &[&'a str], b: &[&'a str]) -> Vec<Edit<'a>> {
    if a.len().saturating_mul(b.len()) > MAX_ALIGN_CELLS {
        let mut edits: Vec<Edit<'a>> = a.iter().map(|l| Edit::Left(l)).collect();
        edits.extend(b.iter().map(|l| Edit::Right(l)));
        return edits;
    }
    // lcs[i][j]: length of the LCS of a[i..] and b[j..].
    let width = b.len() + 1;
    let mut lcs = vec![0u32; (a.len() + 1) * width];
    for i in (0..a.len()).rev() {
        for j in (0..b.len()).rev() {
            lcs[i * width + j] = if a[i] == b[j] {
                lcs[(i + 1) * width + j + 1] + 1
            } else {
                lcs[(i + 1) * width + j].max(lcs[i * width + j + 1])
            };
        }
    }
    let (mut i, mut j) = (0, 0);
    let mut edits = Vec::with_capacity(a.len() + b.len());
    while i < a.len() && j < b.len() {
        if a[i] == b[j] {
            edits.push(Edit::Same(a[i]));
            i += 1;
            j += 1;
        } else if lcs[(i + 1) * width + j] >= lcs[i * width + j + 1] {
            edits.push(Edit::Left(a[i]));
            i += 1;
        } else {
            edits.push(Edit::Right(b[j]));
            j += 1;
        }
    }
    edits.extend(a[i..].iter().map(|l| Edit::Left(l)));
    edits.extend(b[j..].iter().map(|l| Edit::Right(l)));
    edits
}

fn mismatch(
    what: &str,
    left: &Cluster,
    right: &Cluster,
    diff: Option<String>,
) -> Result<(), Mismatch> {
    match diff {
        None => Ok(()),
        Some(diff) => Err(Mismatch {
            what: format!("{what} (- {}, + {})", left.name, right.name),
            diff,
        }),
    }
}

fn ok_or_panic(result: Result<(), Mismatch>) {
    if let Err(mismatch) = result {
        panic!("{mismatch}");
    }
}

/// `ARRAY['cloudmig_admin', ...]::name[]` for SQL.
pub(crate) fn extension_roles_array() -> String {
    let quoted: Vec<String> = EXTENSION_ROLES
        .iter()
        .map(|r| format!("'{}'", r.replace('\'', "''")))
        .collect();
    format!("ARRAY[{}]::name[]", quoted.join(", "))
}

/// The first column of every row of `sql` (text, in a [`stable_client`]) joined with newlines.
fn query_lines(cluster: &Cluster, db: &str, sql: &str) -> String {
    let sql = sql.replace("$EXTENSION_ROLES", &extension_roles_array());
    let mut lines = query_strings(cluster, db, &sql).join("\n");
    if !lines.is_empty() {
        lines.push('\n');
    }
    lines
}

fn query_strings(cluster: &Cluster, db: &str, sql: &str) -> Vec<String> {
    let mut client = stable_client(cluster, db);
    query_in(cluster, db, &mut client, sql)
}

fn query_in(cluster: &Cluster, db: &str, client: &mut Client, sql: &str) -> Vec<String> {
    let rows = client.query(sql, &[]).unwrap_or_else(|e| {
        panic!(
            "cluster {} database {db}: {}\nSQL: {sql}",
            cluster.name,
            describe(&e)
        )
    });
    rows.iter().map(|row| row.get(0)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const DUMP: &str = "\\restrict AbC123\n\
--\n\
-- PostgreSQL database dump\n\
--\n\
\n\
-- Dumped from database version 15.20 (Debian 15.20-0+deb12u1)\n\
-- Dumped by pg_dump version 15.20 (Debian 15.20-0+deb12u1)\n\
\n\
SET statement_timeout = 0;\n\
\n\
--\n\
-- Name: cloudmig; Type: EXTENSION; Schema: -; Owner: -\n\
--\n\
\n\
CREATE EXTENSION IF NOT EXISTS cloudmig WITH SCHEMA cloudmig;\n\
\n\
\n\
--\n\
-- Name: EXTENSION cloudmig; Type: COMMENT; Schema: -; Owner: \n\
--\n\
\n\
COMMENT ON EXTENSION cloudmig IS 'migrate';\n\
\n\
\n\
SET default_tablespace = '';\n\
\n\
SET default_table_access_method = heap;\n\
\n\
--\n\
-- Name: cloudmig_notes; Type: TABLE; Schema: public; Owner: postgres\n\
--\n\
\n\
CREATE TABLE public.cloudmig_notes (a integer);\n\
\n\
\n\
--\n\
-- Name: cloudmig; Type: EXTENSION; Schema: -; Owner: -\n\
--\n\
\n\
CREATE EXTENSION IF NOT EXISTS cloudmig WITH SCHEMA cloudmig;\n\
\n\
\n\
--\n\
-- PostgreSQL database dump complete\n\
--\n\
\n\
\\unrestrict AbC123\n";

    #[test]
    fn normalize_dump_drops_keys_versions_and_only_our_extension() {
        let normalized = normalize_dump(DUMP);
        assert!(!normalized.contains("restrict"), "{normalized}");
        assert!(!normalized.contains("Dumped"), "{normalized}");
        assert!(!normalized.contains("EXTENSION"), "{normalized}");
        assert!(normalized.contains("SET statement_timeout = 0;"));
        // A user object whose name merely starts with cloudmig stays.
        assert!(normalized.contains("CREATE TABLE public.cloudmig_notes (a integer);"));
        assert!(normalized.contains("-- Name: cloudmig_notes; Type: TABLE"));
        // The state lines printed for the table stay, although they follow a dropped entry:
        // the dump equals that of a cluster without the extension.
        assert!(normalized.contains(
            "SET default_tablespace = '';\n\nSET default_table_access_method = heap;\n\n--\n\
             -- Name: cloudmig_notes; Type: TABLE"
        ));
        let extension_entries = DUMP.find("--\n-- Name: cloudmig; Type: EXTENSION").unwrap()
            ..DUMP.find("SET default_tablespace").unwrap();
        let without_extension = DUMP.replace(&DUMP[extension_entries], "");
        assert_eq!(normalize_dump(&without_extension), normalized);
        // The closing banner stays even when the entry before it is left out.
        assert!(normalized.ends_with("--\n-- PostgreSQL database dump complete\n--\n\n"));
        // The same dump with another key and version normalises to the same text.
        let other = DUMP.replace("AbC123", "ZzZ999").replace("15.20", "15.14");
        assert_eq!(normalize_dump(&other), normalized);
    }

    #[test]
    fn text_diff_shows_the_first_changed_lines_with_context() {
        let left: String = (1..=1000).map(|i| format!("line {i}\n")).collect();
        let right = left.replace("line 500\n", "line five hundred\n");
        let diff = text_diff(&left, &right).unwrap();
        assert!(diff.contains("first difference at line 500"), "{diff}");
        assert!(
            diff.contains("  line 499\n- line 500\n+ line five hundred"),
            "{diff}"
        );
        assert!(!diff.contains("line 1\n"), "{diff}");
        assert!(diff.lines().count() < 10, "{diff}");
        assert_eq!(text_diff(&left, &left), None);
    }

    #[test]
    fn text_diff_aligns_insertions_and_caps_its_length() {
        let diff = text_diff("a\nb\nc\n", "a\nx\nb\nc\n").unwrap();
        assert!(diff.contains("  a\n+ x"), "{diff}");
        assert!(
            !diff.contains("- b"),
            "an insertion is not a replacement: {diff}"
        );

        let left: String = (0..500).map(|i| format!("{i}\n")).collect();
        let right: String = (0..500).map(|i| format!("{}\n", i * 2)).collect();
        let diff = text_diff(&left, &right).unwrap();
        assert!(diff.lines().count() <= MAX_DIFF_LINES + 10, "{diff}");
        assert!(diff.contains("more changed lines"), "{diff}");

        assert!(text_diff("a\n", "a").unwrap().contains("line endings"));
    }

    #[test]
    fn map_diff_names_missing_and_differing_keys() {
        let left: BTreeMap<String, (i64, bool)> = [
            ("a".to_owned(), (1, true)),
            ("b".to_owned(), (2, true)),
            ("c".to_owned(), (3, true)),
        ]
        .into();
        let mut right = left.clone();
        right.remove("a");
        right.insert("b".to_owned(), (2, false));
        right.insert("d".to_owned(), (4, true));
        let diff = map_diff(&left, &right).unwrap();
        assert!(diff.starts_with("3 of 3 keys differ"), "{diff}");
        assert!(
            diff.contains("- a: (1, true) (missing on the right)"),
            "{diff}"
        );
        assert!(diff.contains("- b: (2, true)\n+ b: (2, false)"), "{diff}");
        assert!(
            diff.contains("+ d: (4, true) (missing on the left)"),
            "{diff}"
        );
        assert!(!diff.contains("c:"), "{diff}");
        assert_eq!(map_diff(&left, &left), None);
    }

    #[test]
    fn extension_roles_render_as_a_sql_array() {
        assert_eq!(extension_roles_array(), "ARRAY['cloudmig_admin']::name[]");
    }
}
