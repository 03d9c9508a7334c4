//! End to end, the shortest path through a full copy: a small source with two
//! databases goes through every phase to copy_complete, and the rows, an
//! index and a sequence arrive.

use cloudmig_e2e::{Cluster, ClusterBuilder};

fn start_and_wait(dest: &Cluster, conninfo: &str) -> i64 {
    let mut client = dest.client("postgres");
    let assessment: i64 = client
        .query_one("SELECT cloudmig.assess($1)", &[&conninfo])
        .expect("assess")
        .get(0);
    let task: i64 = client
        .query_one("SELECT cloudmig.start($1)", &[&assessment])
        .unwrap_or_else(|e| panic!("start: {e:?}"))
        .get(0);
    let reached: String = client
        .query_one(
            "SELECT cloudmig.wait($1, 'incremental', '3 minutes')",
            &[&task],
        )
        .unwrap_or_else(|e| {
            let events: Vec<String> = dest
                .client("postgres")
                .query(
                    "SELECT kind || ': ' || message FROM cloudmig.events ORDER BY id",
                    &[],
                )
                .map(|rows| rows.iter().map(|r| r.get(0)).collect())
                .unwrap_or_default();
            panic!(
                "wait: {e:?}\nevents:\n{}\nlog:\n{}",
                events.join("\n"),
                dest.log_tail(40)
            )
        })
        .get(0);
    assert_eq!(reached, "incremental");
    task
}

#[test]
fn a_small_instance_is_copied() {
    let source = ClusterBuilder::source("smoke-src")
        .init_sql("CREATE ROLE app_owner LOGIN PASSWORD 'pw'")
        .init_sql("CREATE DATABASE shop OWNER app_owner")
        .start();
    source.execute(
        "shop",
        "CREATE TABLE items (id serial PRIMARY KEY, name text NOT NULL);
         CREATE INDEX items_name ON items (name);
         INSERT INTO items (name) SELECT 'item ' || i FROM generate_series(1, 5000) i;
         ALTER TABLE items OWNER TO app_owner;",
    );
    source.execute(
        "postgres",
        "CREATE TABLE notes (id int PRIMARY KEY, body text); INSERT INTO notes VALUES (1, 'hello')",
    );
    let dest = ClusterBuilder::destination("smoke-dst").start();
    let task = start_and_wait(&dest, &source.tcp_conninfo("postgres", None, "postgres"));

    assert_eq!(
        dest.query_scalar::<i64>("shop", "SELECT count(*) FROM items"),
        5000
    );
    assert_eq!(
        dest.query_scalar::<String>("postgres", "SELECT body FROM notes"),
        "hello"
    );
    assert_eq!(
        dest.query_scalar::<String>(
            "shop",
            "SELECT tableowner::text FROM pg_tables WHERE tablename = 'items'"
        ),
        "app_owner"
    );
    assert_eq!(
        dest.query_scalar::<i64>(
            "shop",
            "SELECT count(*) FROM pg_indexes WHERE indexname = 'items_name'"
        ),
        1
    );
    assert_eq!(
        dest.query_scalar::<i64>("shop", "SELECT last_value FROM items_id_seq"),
        5000
    );
    let states: Vec<String> = dest
        .client("postgres")
        .query(
            "SELECT DISTINCT state FROM cloudmig.table_progress WHERE task_id = $1",
            &[&task],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(states, vec!["indexed".to_string()]);
}
