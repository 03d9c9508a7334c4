//! End to end: DDL on the source during a migration pauses the apply of that database (with the
//! relation, the difference and the DDL to run here), never fails the task or loses a row; the
//! apply continues by itself once the DBA ran the DDL here. A table a table-list publication
//! does not carry is recorded as not migrated, never silently left out.

use cloudmig_e2e::migration::{self, caught_up, events, wait_phase as wait, MIGRATION_TIMEOUT};
use cloudmig_e2e::{assert_same_data, poll_until, Cluster, ClusterBuilder};
use std::thread;

const APP_SQL: &str = "
    CREATE TABLE items (id bigserial PRIMARY KEY, name text NOT NULL, qty int);
    INSERT INTO items (name, qty) SELECT 'item ' || i, i FROM generate_series(1, 100) i;
";

fn source(name: &str) -> Cluster {
    let source = ClusterBuilder::source(name)
        .init_sql("CREATE DATABASE app")
        .init_sql("CREATE DATABASE other")
        .start();
    source.execute("app", APP_SQL);
    source.execute("other", APP_SQL);
    source
}

/// The pause recorded for `datname`, as "relation | detail | hint", once there is one.
fn pause_of(dest: &Cluster, task: i64, datname: &str) -> String {
    let pauses = format!(
        "SELECT count(*) FROM cloudmig.schema_drift \
          WHERE task_id = {task} AND datname = '{datname}' AND kind = 'apply_paused'"
    );
    poll_until(dest, "postgres", &pauses, "1", MIGRATION_TIMEOUT);
    dest.query_scalar(
        "postgres",
        &format!(
            "SELECT relation || ' | ' || detail || ' | ' || hint FROM cloudmig.schema_drift \
              WHERE task_id = {task} AND datname = '{datname}' AND kind = 'apply_paused'"
        ),
    )
}

fn no_pause_left(dest: &Cluster, task: i64) {
    poll_until(
        dest,
        "postgres",
        &format!(
            "SELECT count(*) FROM cloudmig.schema_drift WHERE task_id = {task} AND kind = 'apply_paused'"
        ),
        "0",
        MIGRATION_TIMEOUT,
    );
}

fn phase(dest: &Cluster, task: i64) -> String {
    dest.query_scalar(
        "postgres",
        &format!("SELECT phase FROM cloudmig.tasks WHERE task_id = {task}"),
    )
}

#[test]
fn a_column_added_on_the_source_pauses_its_database_until_added_here() {
    let source = source("ddl-column-src");
    let dest = ClusterBuilder::destination("ddl-column-dst").start();
    let task = migration::start_task(&dest, &source, "{}");
    wait(&dest, task, "incremental");

    // Rows are written while the column is added, some of them with a value for it.
    let mut writer_client = source.client("app");
    let writer = thread::spawn(move || {
        for i in 0..300 {
            writer_client
                .execute(
                    "INSERT INTO items (name) VALUES ($1)",
                    &[&format!("written {i}")],
                )
                .expect("insert on the source");
        }
    });
    source.execute(
        "app",
        "ALTER TABLE items ADD COLUMN note text DEFAULT 'before';
         INSERT INTO items (name, note) VALUES ('with note', 'n1');
         UPDATE items SET note = 'updated' WHERE id = 3;",
    );
    writer.join().expect("the writer");
    source.execute(
        "other",
        "INSERT INTO items (name) SELECT 'other ' || i FROM generate_series(1, 100) i",
    );

    let pause = pause_of(&dest, task, "app");
    for needle in [
        "public.items",
        "column note (text) is missing here",
        r#"ALTER TABLE "public"."items" ADD COLUMN "note" text"#,
    ] {
        assert!(pause.contains(needle), "{pause} lacks {needle}");
    }
    let hint: String = dest.query_scalar(
        "postgres",
        &format!("SELECT last_error_hint FROM cloudmig.tasks WHERE task_id = {task}"),
    );
    assert!(hint.contains(r#"ADD COLUMN "note" text"#), "{hint}");
    assert!(events(&dest, task).contains("apply of database app paused"));
    // The other database keeps applying.
    let target: String = source.query_scalar("other", "SELECT pg_current_wal_lsn()::text");
    poll_until(
        &dest,
        "postgres",
        &format!(
            "SELECT applied_lsn::pg_lsn >= '{target}' FROM cloudmig.apply_progress \
              WHERE task_id = {task} AND datname = 'other'"
        ),
        "t",
        MIGRATION_TIMEOUT,
    );
    assert_same_data(&source, &dest, "other");
    // Nothing past the transaction that needs the column was applied, and the task did not fail.
    assert_eq!(
        dest.query_scalar::<i64>("app", "SELECT count(*) FROM items WHERE name = 'with note'"),
        0
    );
    assert_ne!(phase(&dest, task), "failed", "{}", events(&dest, task));
    // A switchover could not drain the paused database: refused before anything is fenced.
    let refused = dest
        .client("postgres")
        .query("SELECT * FROM cloudmig.switchover($1)", &[&task])
        .expect_err("a paused task must be refused");
    assert!(
        format!("{refused:?}").contains("paused at public.items"),
        "{refused:?}"
    );

    // The DBA runs the same DDL here: the apply continues by itself and converges, once each.
    dest.execute(
        "app",
        "ALTER TABLE items ADD COLUMN note text DEFAULT 'before'",
    );
    no_pause_left(&dest, task);
    caught_up(&source, &dest, task);
    assert_same_data(&source, &dest, "app");
    assert!(events(&dest, task).contains("apply of database app continues"));
    let last_error: Option<String> = dest.query_scalar(
        "postgres",
        &format!("SELECT last_error FROM cloudmig.tasks WHERE task_id = {task}"),
    );
    assert_eq!(last_error, None, "the pause is over");
}

#[test]
fn a_column_added_here_first_needs_no_pause() {
    let source = source("ddl-first-src");
    let dest = ClusterBuilder::destination("ddl-first-dst").start();
    let task = migration::start_task(&dest, &source, "{}");
    wait(&dest, task, "incremental");

    // As PostgreSQL's apply: extra local columns take their default.
    dest.execute("app", "ALTER TABLE items ADD COLUMN extra int DEFAULT 7");
    source.execute(
        "app",
        "INSERT INTO items (name) VALUES ('new'); UPDATE items SET name = 'changed' WHERE id = 5",
    );
    caught_up(&source, &dest, task);
    assert_eq!(
        dest.query_scalar::<String>(
            "app",
            "SELECT string_agg(name || ':' || extra, ',' ORDER BY id) FROM items WHERE id = 5 OR name = 'new'"
        ),
        "changed:7,new:7"
    );
    // Then the source catches up with the same DDL: still nothing to pause for.
    source.execute(
        "app",
        "ALTER TABLE items ADD COLUMN extra int DEFAULT 7; INSERT INTO items (name, extra) VALUES ('both', 8)",
    );
    caught_up(&source, &dest, task);
    assert_same_data(&source, &dest, "app");
    let drift: i64 = dest.query_scalar(
        "postgres",
        &format!("SELECT count(*) FROM cloudmig.schema_drift WHERE task_id = {task}"),
    );
    assert_eq!(drift, 0, "{}", events(&dest, task));
}

#[test]
fn a_type_changed_on_the_source_pauses_only_when_a_value_does_not_fit() {
    let source = source("ddl-type-src");
    let dest = ClusterBuilder::destination("ddl-type-dst").start();
    let task = migration::start_task(&dest, &source, "{}");
    wait(&dest, task, "incremental");

    // Widened here first, as the DBA may: the source's values fit, nothing pauses.
    dest.execute("app", "ALTER TABLE items ALTER COLUMN qty TYPE bigint");
    source.execute("app", "UPDATE items SET qty = qty * 2 WHERE id <= 10");
    caught_up(&source, &dest, task);
    // A type here that cannot take the source's new values: the database pauses.
    source.execute(
        "app",
        "ALTER TABLE items ALTER COLUMN qty TYPE numeric(10,2);
         UPDATE items SET qty = 2.5 WHERE id = 1;",
    );
    let pause = pause_of(&dest, task, "app");
    for needle in [
        "column qty is numeric(10,2) on the source and bigint here",
        r#"ALTER TABLE "public"."items" ALTER COLUMN "qty" TYPE numeric(10,2)"#,
    ] {
        assert!(pause.contains(needle), "{pause} lacks {needle}");
    }
    dest.execute(
        "app",
        "ALTER TABLE items ALTER COLUMN qty TYPE numeric(10,2)",
    );
    no_pause_left(&dest, task);
    caught_up(&source, &dest, task);
    assert_same_data(&source, &dest, "app");
}

#[test]
fn a_table_created_then_a_column_dropped_on_the_source_pause_until_done_here() {
    let source = source("ddl-table-src");
    let dest = ClusterBuilder::destination("ddl-table-dst").start();
    let task = migration::start_task(&dest, &source, "{}");
    wait(&dest, task, "incremental");

    // A superuser account publishes FOR ALL TABLES: the new table's rows are streamed.
    source.execute(
        "app",
        "CREATE TABLE fresh (id int PRIMARY KEY, v text NOT NULL, w text);
         INSERT INTO fresh SELECT g, 'v' || g FROM generate_series(1, 100) g;
         INSERT INTO items (name) VALUES ('after the new table');",
    );
    let pause = pause_of(&dest, task, "app");
    for needle in [
        "public.fresh",
        "the table does not exist here",
        r#"CREATE TABLE "public"."fresh" ("id" integer, "v" text, "w" text, PRIMARY KEY ("id"))"#,
    ] {
        assert!(pause.contains(needle), "{pause} lacks {needle}");
    }
    assert_ne!(phase(&dest, task), "failed", "{}", events(&dest, task));

    // Created after the snapshot, every row of it arrives by the stream.
    dest.execute(
        "app",
        "CREATE TABLE fresh (id int PRIMARY KEY, v text NOT NULL, w text)",
    );
    no_pause_left(&dest, task);
    caught_up(&source, &dest, task);
    assert_same_data(&source, &dest, "app");

    // A NOT NULL column dropped on the source: rows without it cannot be inserted here.
    source.execute(
        "app",
        "ALTER TABLE fresh DROP COLUMN v; INSERT INTO fresh (id, w) VALUES (101, 'w');",
    );
    let pause = pause_of(&dest, task, "app");
    for needle in [
        "column v is NOT NULL without a default here and the source does not send it",
        r#"ALTER TABLE "public"."fresh" ALTER COLUMN "v" DROP NOT NULL"#,
    ] {
        assert!(pause.contains(needle), "{pause} lacks {needle}");
    }
    dest.execute("app", "ALTER TABLE fresh DROP COLUMN v");
    no_pause_left(&dest, task);
    caught_up(&source, &dest, task);
    assert_same_data(&source, &dest, "app");
}

const PASSWORD: &str = "m1grat0r-Pa55";

#[test]
fn a_table_outside_a_table_list_publication_is_reported() {
    // The account the README recommends when a superuser is not available publishes the tables
    // one by one (FOR TABLE).
    let source = ClusterBuilder::source("ddl-list-src")
        .hba(&[
            "local all all trust",
            "host all all 127.0.0.1/32 scram-sha-256",
            "host replication all 127.0.0.1/32 scram-sha-256",
        ])
        .init_sql(
            "SET password_encryption = 'scram-sha-256';
             CREATE ROLE migrator LOGIN REPLICATION CREATEROLE PASSWORD 'm1grat0r-Pa55';
             GRANT pg_monitor, pg_read_all_data TO migrator;
             CREATE ROLE alice LOGIN;",
        )
        .init_sql("CREATE DATABASE app OWNER alice")
        .init_sql("GRANT alice TO migrator; GRANT CREATE ON DATABASE app, postgres TO migrator")
        .start();
    source.execute("app", &format!("SET ROLE alice; {APP_SQL}"));
    let dest = ClusterBuilder::destination("ddl-list-dst").start();
    let conninfo = source.tcp_conninfo("migrator", Some(PASSWORD), "postgres");
    let mut client = dest.client("postgres");
    let assessment: i64 = client
        .query_one("SELECT cloudmig.assess($1)", &[&conninfo])
        .expect("assess")
        .get(0);
    let task: i64 = client
        .query_one("SELECT cloudmig.start($1, '{}')", &[&assessment])
        .unwrap_or_else(|e| panic!("start: {e:?}"))
        .get(0);
    wait(&dest, task, "incremental");
    let list: bool = source.query_scalar(
        "app",
        &format!("SELECT NOT puballtables FROM pg_publication WHERE pubname = 'cloudmig_{task}'"),
    );
    assert!(list, "the publication should list its tables");

    source.execute(
        "app",
        "SET ROLE alice;
         CREATE TABLE late (id int PRIMARY KEY, v text);
         INSERT INTO late VALUES (1, 'never streamed');",
    );
    poll_until(
        &dest,
        "postgres",
        &format!(
            "SELECT count(*) FROM cloudmig.schema_drift \
              WHERE task_id = {task} AND datname = 'app' AND relation = 'public.late' \
                AND kind = 'not_published'"
        ),
        "1",
        MIGRATION_TIMEOUT,
    );
    let log = events(&dest, task);
    assert!(
        log.contains("warning: database app: public.late is not in publication"),
        "{log}"
    );
    let hint: String = dest.query_scalar(
        "postgres",
        &format!("SELECT last_error_hint FROM cloudmig.tasks WHERE task_id = {task}"),
    );
    assert!(hint.contains("not migrated"), "{hint}");
    // The published tables keep streaming.
    source.execute("app", "INSERT INTO items (name) VALUES ('still streamed')");
    caught_up(&source, &dest, task);
    assert_eq!(
        dest.query_scalar::<i64>(
            "app",
            "SELECT count(*) FROM items WHERE name = 'still streamed'"
        ),
        1
    );
}
