//! `make demo`: a real migration between two local clusters.
//!
//! Starts a source with sample data and a migration account prepared as the
//! README says, and a destination with cloudmig installed; runs
//! `cloudmig.assess()` over TCP with a SCRAM password and prints the report,
//! then `cloudmig.start()` and the progress of the copy from `cloudmig.tasks`
//! until it completes, and compares row counts on both sides. Both clusters
//! stop when it ends.

use cloudmig_e2e::postgres::{self, Config, NoTls};
use cloudmig_e2e::ClusterBuilder;

const SAMPLE_DATA: &str = "
    SET password_encryption = 'scram-sha-256';
    -- A superuser account copies role passwords and can fence the source at switchover
    -- (a non-superuser with REPLICATION, CREATEROLE and pg_monitor copies the rest).
    CREATE ROLE migrator LOGIN SUPERUSER PASSWORD 'demo-password';
    CREATE ROLE app_owner LOGIN PASSWORD 'app-password';
";

const SHOP_DATA: &str = "
    SET ROLE app_owner;
    CREATE TABLE customers (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, name text NOT NULL);
    CREATE TABLE orders (id bigserial PRIMARY KEY, customer_id bigint REFERENCES customers,
                         placed_at timestamptz NOT NULL DEFAULT now(), total numeric(12,2));
    CREATE TABLE audit_log (at timestamptz DEFAULT now(), message text);  -- no primary key
    INSERT INTO customers (name) SELECT 'customer ' || i FROM generate_series(1, 10000) i;
    INSERT INTO orders (customer_id, total)
        SELECT 1 + (i % 10000), (i % 997) * 1.25 FROM generate_series(1, 1000000) i;
    INSERT INTO audit_log (message) SELECT 'event ' || i FROM generate_series(1, 1000) i;
    -- What logical replication does not carry: a 20 MB large object (a catalog, say) that does
    -- not change, and a report the application refreshes now and then.
    SELECT lo_from_bytea(0, (SELECT string_agg(decode(md5(i::text), 'hex'), '')
                               FROM generate_series(1, 1310720) i));
    CREATE MATERIALIZED VIEW customer_totals AS
        SELECT customer_id, count(*) AS orders, sum(total) AS total FROM orders GROUP BY customer_id;
";

fn main() {
    println!("starting a source cluster with sample data and a destination with cloudmig ...");
    let source = ClusterBuilder::source("demo-source")
        .hba(&[
            "local all all trust",
            "host all all 127.0.0.1/32 scram-sha-256",
            "host replication all 127.0.0.1/32 scram-sha-256",
        ])
        .conf("max_slot_wal_keep_size = '1GB'")
        .init_sql(SAMPLE_DATA)
        .init_sql("CREATE DATABASE shop OWNER app_owner")
        // To stream changes, a non-superuser migration account publishes the
        // tables: it needs CREATE on the databases and its owners' privileges.
        .init_sql(
            "GRANT app_owner TO migrator; GRANT CREATE ON DATABASE shop, postgres TO migrator",
        )
        .start();
    source.execute("shop", SHOP_DATA);
    let destination = ClusterBuilder::destination("demo-destination").start();
    println!(
        "source:      port {} (databases postgres, shop)\ndestination: port {} (cloudmig installed in postgres)\n",
        source.port, destination.port
    );

    let conninfo = source.tcp_conninfo("migrator", Some("demo-password"), "postgres");
    let mut client = Config::new()
        .host_path(&destination.socket_dir)
        .port(destination.port)
        .user("postgres")
        .dbname("postgres")
        .notice_callback(|notice| println!("NOTICE:  {}\n", notice.message()))
        .connect(NoTls)
        .unwrap_or_else(|e| panic!("cannot connect to the destination: {e}"));
    println!("destination=# SELECT cloudmig.assess('host=127.0.0.1 port={} user=migrator password=... dbname=postgres');\n", source.port);
    let id: i64 = client
        .query_one("SELECT cloudmig.assess($1)", &[&conninfo])
        .unwrap_or_else(|e| panic!("assessment failed: {e}"))
        .get(0);

    println!("destination=# SELECT name, status, detail FROM cloudmig.assessment_report WHERE assessment_id = {id};\n");
    let rows = client
        .query(
            "SELECT name, status, detail FROM cloudmig.assessment_report \
              WHERE assessment_id = $1 ORDER BY ordinal",
            &[&id],
        )
        .unwrap_or_else(|e| panic!("cannot read the report: {e}"));
    print_rows(&rows);
    let source_shown: String = client
        .query_one(
            "SELECT source FROM cloudmig.assessments WHERE id = $1",
            &[&id],
        )
        .map(|row| row.get(0))
        .unwrap_or_default();
    println!("\nthe stored source (password masked): {source_shown}");

    // shop.audit_log has no key: the explicit choice the assessment asked for.
    println!(
        "\ndestination=# SELECT cloudmig.start({id}, '{{\"replica_identity_full\": true}}');\n"
    );
    let task: i64 = client
        .query_one(
            "SELECT cloudmig.start($1, '{\"replica_identity_full\": true}')",
            &[&id],
        )
        .unwrap_or_else(|e| panic!("start failed: {e}"))
        .get(0);
    println!("destination=# SELECT phase, tables_done, tables_total, percent, copy_rate_bytes_per_second, eta FROM cloudmig.tasks;  -- every half second\n");
    let mut last = String::new();
    loop {
        let row = client
            .query_one(
                "SELECT phase, tables_done, tables_total, percent::text, \
                        coalesce(pg_size_pretty(copy_rate_bytes_per_second) || '/s', '-'), \
                        coalesce(date_trunc('second', eta)::text, '-'), coalesce(last_error, '') \
                   FROM cloudmig.tasks WHERE task_id = $1",
                &[&task],
            )
            .unwrap_or_else(|e| panic!("cannot read cloudmig.tasks: {e}"));
        let phase: String = row.get(0);
        let line = format!(
            "  {phase:<14} tables {:>2}/{:<2}  {:>5}%  rate {:>10}  eta {}",
            row.get::<_, i64>(1),
            row.get::<_, i64>(2),
            row.get::<_, String>(3),
            row.get::<_, String>(4),
            row.get::<_, String>(5),
        );
        if line != last {
            println!("{line}");
            last = line;
        }
        let error: String = row.get(6);
        if phase == "failed" {
            panic!("the task failed: {error}");
        }
        if phase == "incremental" {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(500));
    }
    println!(
        "\ndestination=# SELECT at, kind, message FROM cloudmig.events WHERE task_id = {task};\n"
    );
    for row in client
        .query(
            "SELECT to_char(at, 'HH24:MI:SS.MS'), kind, coalesce(datname || ': ', '') || message \
               FROM cloudmig.events WHERE task_id = $1 ORDER BY id",
            &[&task],
        )
        .unwrap_or_default()
    {
        println!(
            "  {}  {:<7} {}",
            row.get::<_, String>(0),
            row.get::<_, String>(1),
            row.get::<_, String>(2)
        );
    }
    // The application keeps writing on the source while changes stream in.
    println!("\nan application writes on the source; changes stream in:\n");
    let writer = {
        let mut app = source.client("shop");
        std::thread::spawn(move || {
            let mut written = 0u64;
            while app
                .execute("INSERT INTO orders (customer_id, total) VALUES (1 + (random() * 9999)::int, 9.99)", &[])
                .is_ok()
            {
                written += 1;
            }
            written
        })
    };
    for _ in 0..6 {
        let row = client
            .query_one(
                "SELECT phase, coalesce(lag_bytes, 0), coalesce(transactions_applied, 0) FROM cloudmig.tasks WHERE task_id = $1",
                &[&task],
            )
            .unwrap_or_else(|e| panic!("cannot read cloudmig.tasks: {e}"));
        println!(
            "  {:<12} lag {:>8} bytes, {:>6} transactions applied",
            row.get::<_, String>(0),
            row.get::<_, i64>(1),
            row.get::<_, i64>(2)
        );
        std::thread::sleep(std::time::Duration::from_millis(500));
    }
    println!("\ndestination=# SELECT * FROM cloudmig.switchover({task});  -- while the application still writes\n");
    let row = client
        .query_one(
            "SELECT downtime_ms, fence_ms, drain_ms, sequences_ms, cleanup_ms, final_lsn, before_fence_ms, \
                    large_objects_in_window, materialized_views_in_window \
               FROM cloudmig.switchover($1)",
            &[&task],
        )
        .unwrap_or_else(|e| panic!("switchover failed: {e}"));
    let written = writer.join().unwrap_or(0);
    println!(
        "  downtime {} ms: fence {} ms, drain {} ms, sequences and large objects {} ms (then cleanup {} ms); final source LSN {}",
        row.get::<_, i64>(0),
        row.get::<_, i64>(1),
        row.get::<_, i64>(2),
        row.get::<_, i64>(3),
        row.get::<_, i64>(4),
        row.get::<_, String>(5)
    );
    println!(
        "  before the fence (not downtime): {} ms for large objects and materialized views; \
         inside the window {} large object(s) and {} materialized view(s) changed",
        row.get::<_, i64>(6),
        row.get::<_, i64>(7),
        row.get::<_, i64>(8)
    );
    println!("  the application wrote {written} orders during the migration; its session was ended by the fence");

    let refused = source.try_client("shop").err().map(|e| {
        e.as_db_error()
            .map(|d| d.message().to_string())
            .unwrap_or_else(|| e.to_string())
    });
    println!(
        "\nthe source refuses connections to the migrated databases: {}",
        refused.unwrap_or_else(|| "NO, it accepted one".into())
    );
    println!("  a DBA lets readers in again with ALTER DATABASE shop ALLOW_CONNECTIONS true");
    cloudmig_e2e::migration::reopen_source(&source);

    println!("\nrow counts, source vs destination:");
    for table in ["customers", "orders", "audit_log", "customer_totals"] {
        let sql = format!("SELECT count(*) FROM {table}");
        let on_source: i64 = source.query_scalar("shop", &sql);
        let on_destination: i64 = destination.query_scalar("shop", &sql);
        println!("  shop.{table:<15} {on_source:>8} {on_destination:>8}");
        assert_eq!(on_source, on_destination, "{table} differs");
    }
    let refused = source
        .client("shop")
        .batch_execute("INSERT INTO audit_log (message) VALUES ('late')");
    println!(
        "\nthe source refuses writes now: {}",
        refused
            .err()
            .map(|e| e
                .as_db_error()
                .map(|d| d.message().to_string())
                .unwrap_or_else(|| e.to_string()))
            .unwrap_or_else(|| "NO, it accepted one".into())
    );
    println!("\ndemo done; both clusters are stopped now.");
}

fn print_rows(rows: &[postgres::Row]) {
    for row in rows {
        let (name, status, detail): (String, String, String) = (row.get(0), row.get(1), row.get(2));
        println!("  {status:<4}  {name:<33} {detail}");
    }
}
