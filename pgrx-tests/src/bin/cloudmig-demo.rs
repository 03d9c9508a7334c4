//! `make demo`: a real assessment between two local clusters.
//!
//! Starts a source with sample data and a migration account prepared as the
//! README says, and a destination with cloudmig installed, runs
//! `cloudmig.assess()` over TCP with a SCRAM password, and prints the NOTICE
//! summary and the full report. Both clusters stop when it ends.

use cloudmig_e2e::postgres::{self, Config, NoTls};
use cloudmig_e2e::ClusterBuilder;

const SAMPLE_DATA: &str = "
    SET password_encryption = 'scram-sha-256';
    CREATE ROLE migrator LOGIN REPLICATION CREATEROLE PASSWORD 'demo-password';
    GRANT pg_monitor, pg_read_all_data TO migrator;
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
        SELECT 1 + (i % 10000), (i % 997) * 1.25 FROM generate_series(1, 100000) i;
    INSERT INTO audit_log (message) SELECT 'event ' || i FROM generate_series(1, 1000) i;
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
    println!("demo done; both clusters are stopped now.");
}

fn print_rows(rows: &[postgres::Row]) {
    for row in rows {
        let (name, status, detail): (String, String, String) = (row.get(0), row.get(1), row.get(2));
        println!("  {status:<4}  {name:<33} {detail}");
    }
}
