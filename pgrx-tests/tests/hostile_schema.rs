//! End to end: a source whose objects were written by a hostile non-superuser. Comments, names,
//! function bodies and role settings hold psql syntax (`\c`, `\restrict`), quotes, backslashes,
//! semicolons, newlines and dollar signs; cloudmig must carry them over byte for byte and never
//! run any of it as SQL.
//!
//! The attack these tests stand guard against: the owner of a table sets a comment whose last
//! line is `\c x'` (in the dump: `\c x''';`) and, on a column, a comment
//! `'; ALTER ROLE evil SUPERUSER; --'`. A reader that drops every line starting with `\c`
//! drops the first literal's closing quote with that line, so the second comment's text runs as
//! SQL, as the bootstrap superuser that applies the schema.
//!
//! Each test waits for `incremental` with `cloudmig.wait()`, never a fixed sleep, then compares
//! catalogs of the source and the destination.

use std::collections::BTreeMap;

use cloudmig_e2e::{assert_same_data, assert_same_schema, Cluster, ClusterBuilder};

/// The first hostile comment: its last line, in pg_dump's script, reads `\c x''';`.
const COMMENT_1: &str = "innocent looking\n\\c x'";
/// The second: SQL that runs if the first literal lost its closing quote.
const COMMENT_2: &str = "'; ALTER ROLE evil SUPERUSER; --'";

/// A SQL string literal (standard_conforming_strings on).
fn literal(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

/// A quoted SQL identifier.
fn ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// A source with role `evil` (LOGIN, no other attribute) and database `hostile`, where `evil`
/// owns table `public.t` carrying the two hostile comments.
fn attacked_source(name: &str) -> Cluster {
    let source = ClusterBuilder::source(name)
        .init_sql("CREATE ROLE evil LOGIN NOSUPERUSER")
        .init_sql("CREATE DATABASE hostile")
        .start();
    source.execute(
        "hostile",
        &format!(
            "GRANT CREATE ON SCHEMA public TO evil;
             SET ROLE evil;
             CREATE TABLE public.t (a integer PRIMARY KEY, b text);
             INSERT INTO public.t VALUES (1, 'one'), (2, E'two\\n\\\\c x''');
             COMMENT ON TABLE public.t IS {};
             COMMENT ON COLUMN public.t.a IS {};
             RESET ROLE;",
            literal(COMMENT_1),
            literal(COMMENT_2)
        ),
    );
    source
}

/// Assesses the source as `postgres` over TCP, starts a task, waits for `incremental`.
fn migrate(dest: &Cluster, source: &Cluster) -> i64 {
    let conninfo = source.tcp_conninfo("postgres", None, "postgres");
    let mut client = dest.client("postgres");
    let assessment: i64 = client
        .query_one("SELECT cloudmig.assess($1)", &[&conninfo])
        .unwrap_or_else(|e| panic!("assess failed: {e:?}"))
        .get(0);
    let task: i64 = client
        .query_one("SELECT cloudmig.start($1)", &[&assessment])
        .unwrap_or_else(|e| panic!("start failed: {e:?}"))
        .get(0);
    let reached: String = client
        .query_one(
            "SELECT cloudmig.wait($1, 'incremental', '5 minutes')",
            &[&task],
        )
        .unwrap_or_else(|e| panic!("wait failed: {e:?}\n{}", report(dest, task)))
        .get(0);
    assert_eq!(
        reached,
        "incremental",
        "task {task} did not reach incremental:\n{}",
        report(dest, task)
    );
    task
}

/// The task's row, its events and the destination's log tail, for failure messages.
fn report(dest: &Cluster, task: i64) -> String {
    let mut client = dest.client("postgres");
    let row: String = client
        .query_one(
            "SELECT coalesce((SELECT to_jsonb(t)::text FROM cloudmig.tasks t \
                               WHERE task_id = $1), '<none>')",
            &[&task],
        )
        .map(|r| r.get(0))
        .unwrap_or_default();
    let events: Vec<String> = client
        .query(
            "SELECT format('%s %s', kind, message) FROM cloudmig.events \
              WHERE task_id = $1 ORDER BY at",
            &[&task],
        )
        .map(|rows| rows.iter().map(|r| r.get(0)).collect())
        .unwrap_or_default();
    format!(
        "task: {row}\nevents:\n{}\n--- destination log tail ---\n{}",
        events.join("\n"),
        dest.log_tail(40)
    )
}

/// Rows of `sql` (text columns) as a sorted map from the first column to the others.
fn listing(cluster: &Cluster, db: &str, sql: &str) -> BTreeMap<String, Vec<Option<String>>> {
    cluster
        .client(db)
        .query(sql, &[])
        .unwrap_or_else(|e| panic!("{sql}: {e:?}"))
        .iter()
        .map(|row| {
            let key: String = row.get(0);
            let rest = (1..row.len()).map(|i| row.get(i)).collect();
            (key, rest)
        })
        .collect()
}

fn is_superuser(cluster: &Cluster, role: &str) -> bool {
    cluster.query_scalar::<bool>(
        "postgres",
        &format!(
            "SELECT rolsuper FROM pg_catalog.pg_roles WHERE rolname = {}",
            literal(role)
        ),
    )
}

/// Comments on objects of `db` (not the catalog's own), keyed by object description.
const COMMENTS_SQL: &str = "SELECT pg_catalog.pg_describe_object(classoid, objoid, objsubid), \
            description \
       FROM pg_catalog.pg_description WHERE objoid >= 16384";
/// Comments on the test's roles.
const ROLE_COMMENTS_SQL: &str = "SELECT r.rolname::text, d.description \
       FROM pg_catalog.pg_shdescription d JOIN pg_catalog.pg_roles r ON r.oid = d.objoid \
      WHERE d.classoid = 'pg_catalog.pg_authid'::regclass AND r.rolname IN ('alice', 'evil')";
/// Settings of the test's roles (in any or no database), keyed by role and database.
const ROLE_SETTINGS_SQL: &str = "SELECT r.rolname || ' in ' || coalesce(d.datname, '*'), \
            s.setconfig::text \
       FROM pg_catalog.pg_db_role_setting s \
       JOIN pg_catalog.pg_roles r ON r.oid = s.setrole \
       LEFT JOIN pg_catalog.pg_database d ON d.oid = s.setdatabase \
      WHERE r.rolname IN ('alice', 'evil')";
/// Functions of schema public: source text and full definition.
const FUNCTIONS_SQL: &str = "SELECT p.oid::regprocedure::text, p.prosrc, \
            pg_catalog.pg_get_functiondef(p.oid) \
       FROM pg_catalog.pg_proc p WHERE p.pronamespace = 'public'::regnamespace";
/// Tables and columns of schema public, with their owner.
const COLUMNS_SQL: &str = "SELECT c.relname || ' / ' || a.attname, c.relowner::regrole::text \
       FROM pg_catalog.pg_class c \
       JOIN pg_catalog.pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 \
      WHERE c.relnamespace = 'public'::regnamespace AND c.relkind = 'r'";

/// `sql`'s listing is the same on both sides, and holds `expected` keys at least.
fn assert_same_listing(source: &Cluster, dest: &Cluster, db: &str, sql: &str, expected: usize) {
    let (left, right) = (listing(source, db, sql), listing(dest, db, sql));
    assert!(
        left.len() >= expected,
        "the source lacks what the test set up ({sql}): {left:#?}"
    );
    assert_eq!(left, right, "source and destination differ: {sql}");
}

/// The attack alone: on a reader that drops `\c` lines without lexing, `evil` ends up superuser.
#[test]
fn a_comment_cannot_make_its_author_superuser() {
    let source = attacked_source("attack-src");
    assert!(!is_superuser(&source, "evil"));
    let dest = ClusterBuilder::destination("attack-dst").start();
    let task = migrate(&dest, &source);

    assert!(
        !is_superuser(&dest, "evil"),
        "the hostile comment ran as SQL: evil is superuser on the destination\n{}",
        report(&dest, task)
    );
    let comments = listing(&dest, "hostile", COMMENTS_SQL);
    assert_eq!(
        comments.get("table t"),
        Some(&vec![Some(COMMENT_1.to_string())])
    );
    assert_eq!(
        comments.get("column a of table t"),
        Some(&vec![Some(COMMENT_2.to_string())])
    );
    assert_same_listing(&source, &dest, "hostile", COMMENTS_SQL, 2);
    assert_same_data(&source, &dest, "hostile");
}

/// Everything a hostile owner can write into a dump: names, comments, function bodies (classic
/// and BEGIN ATOMIC), role comments and settings. All arrive byte for byte; nothing runs.
#[test]
fn hostile_names_bodies_and_settings_arrive_byte_for_byte() {
    let source = attacked_source("hostile-src");
    let table = "x'; \\c y\n\\restrict k;\n$$ \"q\" \\\\ end";
    let column = "col\n\\c postgres\n'; DROP TABLE t; --";
    let role_comment =
        "line 1\n\\c postgres\n\\restrict abc\n''; ALTER ROLE evil SUPERUSER; --\n$x$ \\\\ end";
    let body = "SELECT 'a\n\\c postgres\n\\restrict abc\n\\unrestrict abc\n;'' $$ \\'::text";
    source.execute(
        "postgres",
        &format!(
            "CREATE ROLE alice NOLOGIN;
             COMMENT ON ROLE alice IS {comment};
             ALTER ROLE alice SET search_path TO 'we''ird\\schema', 'line1
\\c x
line2', \"$user\";
             ALTER ROLE alice SET cloudmig_test.note TO {note};",
            comment = literal(role_comment),
            note = literal("it's \\ a\nnew line; \\c x\n\\restrict y"),
        ),
    );
    source.execute(
        "hostile",
        &format!(
            "SET ROLE evil;
             CREATE TABLE public.{table} (id integer PRIMARY KEY, {column} text);
             INSERT INTO public.{table} VALUES (1, {value}), (2, NULL);
             COMMENT ON TABLE public.{table} IS {table_comment};
             COMMENT ON COLUMN public.{table}.{column} IS {column_comment};
             CREATE FUNCTION public.{function}() RETURNS text LANGUAGE sql AS {body};
             CREATE FUNCTION public.atomic_f(a integer) RETURNS text LANGUAGE sql
             BEGIN ATOMIC
               SELECT CASE WHEN a > 0 THEN 'pos;
\\c postgres
\\restrict k' ELSE $q$neg$$;$q$ END;
             END;
             COMMENT ON FUNCTION public.atomic_f(integer) IS {function_comment};
             RESET ROLE;",
            table = ident(table),
            column = ident(column),
            value = literal("v\n\\c x\n'"),
            table_comment = literal("\\c\n\\c x\n;"),
            column_comment = literal("E'\\'; SELECT 1; --"),
            function = ident("f\n\\c x"),
            body = literal(body),
            function_comment = literal("$$\n\\connect x\n$$"),
        ),
    );
    let dest = ClusterBuilder::destination("hostile-dst").start();
    let task = migrate(&dest, &source);

    assert!(
        !is_superuser(&dest, "evil"),
        "a hostile text ran as SQL: evil is superuser on the destination\n{}",
        report(&dest, task)
    );
    assert!(!is_superuser(&dest, "alice"));
    // Table and column names, and who owns the tables.
    assert_same_listing(&source, &dest, "hostile", COLUMNS_SQL, 4);
    // Comments on the tables, columns and function.
    assert_same_listing(&source, &dest, "hostile", COMMENTS_SQL, 5);
    // Function bodies, classic and BEGIN ATOMIC.
    assert_same_listing(&source, &dest, "hostile", FUNCTIONS_SQL, 2);
    let functions = listing(&dest, "hostile", FUNCTIONS_SQL);
    assert!(
        functions.values().any(|f| f[0].as_deref() == Some(body)),
        "{functions:#?}"
    );
    // Role comments and settings (shared catalogs: any database will do).
    assert_same_listing(&source, &dest, "postgres", ROLE_COMMENTS_SQL, 1);
    assert_eq!(
        listing(&dest, "postgres", ROLE_COMMENTS_SQL).get("alice"),
        Some(&vec![Some(role_comment.to_string())])
    );
    assert_same_listing(&source, &dest, "postgres", ROLE_SETTINGS_SQL, 1);
    // And the whole schema as pg_dump prints it, and the rows.
    assert_same_schema(&source, &dest, "hostile");
    assert_same_data(&source, &dest, "hostile");
}
