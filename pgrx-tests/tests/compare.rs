//! The comparison helpers (`cloudmig_e2e::compare`) proved on their own, before any migration:
//! a copy made with PostgreSQL's own tools compares equal in every aspect, each single seeded
//! difference is caught by the helper meant to catch it (with a message naming it), and a fresh
//! destination (cloudmig installed) compares equal to a fresh source.

use std::thread;
use std::time::Instant;

use cloudmig_e2e::compare::{
    compare_data, compare_database_properties, compare_instance, compare_large_objects,
    compare_role_passwords, compare_roles, compare_schema, compare_sequences, database_properties,
    databases, large_objects, role_passwords, roles, schema_dump, sequence_values,
    table_fingerprints,
};
use cloudmig_e2e::fixture::RICH_SOURCE_DATABASES;
use cloudmig_e2e::{
    assert_same_instance, assert_same_role_passwords, copy_with_pg_dump, load_rich_source, Cluster,
    ClusterBuilder, Mismatch,
};

/// One difference seeded on the copy: made, caught, undone.
struct Seeded<'a> {
    /// What is changed, for messages.
    name: &'a str,
    db: &'a str,
    change: &'a str,
    undo: &'a str,
    /// The helper that must notice.
    compare: fn(&Cluster, &Cluster, &str) -> Result<(), Mismatch>,
    /// Text the mismatch must show (the object that differs).
    shows: &'a str,
}

fn roles_of(a: &Cluster, b: &Cluster, _db: &str) -> Result<(), Mismatch> {
    compare_roles(a, b)
}

fn passwords_of(a: &Cluster, b: &Cluster, _db: &str) -> Result<(), Mismatch> {
    compare_role_passwords(a, b)
}

fn databases_of(a: &Cluster, b: &Cluster, _db: &str) -> Result<(), Mismatch> {
    compare_database_properties(a, b)
}

#[test]
fn helpers_see_a_pg_dump_copy_as_equal_and_catch_each_seeded_difference() {
    let started = Instant::now();
    let (source, copy) = start_two("cmp-src", "cmp-copy");
    let clusters_up = started.elapsed();
    let load = load_rich_source(&source);
    let copy_started = Instant::now();
    copy_with_pg_dump(&source, &copy);
    let copied = copy_started.elapsed();

    let compare_started = Instant::now();
    assert_same_instance(&source, &copy);
    assert_same_role_passwords(&source, &copy);
    let compared = compare_started.elapsed();
    eprintln!(
        "clusters up {clusters_up:?}, fixture loaded {load:?}, pg_dump copy {copied:?}, \
         full comparison {compared:?}"
    );

    listings_are_not_vacuous(&source);

    // The copy's own password verifiers, to put one back verbatim after changing it.
    let app_owner_verifier: String = copy.query_scalar(
        "postgres",
        "SELECT rolpassword FROM pg_authid WHERE rolname = 'app_owner'",
    );
    let restore_password = format!("ALTER ROLE app_owner PASSWORD '{app_owner_verifier}'");
    let lo_byte: i32 = copy.query_scalar("app", "SELECT get_byte(lo_get(424242, 100, 1), 0)");
    let restore_lo_byte = format!("SELECT lo_put(424242, 100, set_byte('\\x00', 0, {lo_byte}))");

    let seeded = [
        Seeded {
            name: "a value in one row",
            db: "app",
            change: "UPDATE app.kitchen_sink SET amount = amount + 1 WHERE id = 500",
            undo: "UPDATE app.kitchen_sink SET amount = amount - 1 WHERE id = 500",
            compare: compare_data,
            // The differing table, then the row as it is on each side.
            shows: "rows of app.kitchen_sink on one side only:\n- (500,",
        },
        Seeded {
            name: "one byte of a 2 MiB TOASTed value",
            db: "app",
            change: "UPDATE app.attachments \
                        SET content = set_byte(content, 1048576, (get_byte(content, 1048576) + 1) % 256) \
                      WHERE id = 1",
            undo: "UPDATE app.attachments \
                      SET content = set_byte(content, 1048576, (get_byte(content, 1048576) + 255) % 256) \
                    WHERE id = 1",
            compare: compare_data,
            shows: "app.attachments",
        },
        Seeded {
            name: "one of two identical rows of a table without a key, deleted",
            db: "app",
            change: "DELETE FROM app.raw_import WHERE ctid = \
                        (SELECT min(ctid) FROM app.raw_import WHERE source_file = 'dup.csv')",
            undo: "INSERT INTO app.raw_import VALUES ('same', 'dup.csv', '2024-05-02 00:00')",
            compare: compare_data,
            shows: "rows of app.raw_import on one side only:\n- (same,dup.csv,\"2024-05-02 00:00:00\")",
        },
        Seeded {
            name: "a row of a unicode-named table, in a database with a quoted name",
            db: "Sales & Ops",
            change: "UPDATE \"données\".\"日本語テーブル\" SET \"値\" = 'x' WHERE id = 3",
            undo: "UPDATE \"données\".\"日本語テーブル\" SET \"値\" = NULL WHERE id = 3",
            compare: compare_data,
            shows: "\"données\".\"日本語テーブル\"",
        },
        Seeded {
            name: "a sequence's is_called",
            db: "app",
            change: "SELECT setval('app.ticket_seq', 500, true)",
            undo: "SELECT setval('app.ticket_seq', 500, false)",
            compare: compare_sequences,
            shows: "app.ticket_seq",
        },
        Seeded {
            name: "an identity sequence's value",
            db: "app",
            change: "SELECT setval('app.customers_id_seq', 501)",
            undo: "SELECT setval('app.customers_id_seq', 500)",
            compare: compare_sequences,
            shows: "app.customers_id_seq",
        },
        Seeded {
            name: "a column default",
            db: "app",
            change: "ALTER TABLE app.customers ALTER COLUMN region SET DEFAULT 'apac'",
            undo: "ALTER TABLE app.customers ALTER COLUMN region SET DEFAULT 'emea'",
            compare: compare_schema,
            shows: "'apac'",
        },
        Seeded {
            name: "a column privilege",
            db: "app",
            change: "REVOKE SELECT (name) ON app.customers FROM reporting",
            undo: "GRANT SELECT (name) ON app.customers TO reporting",
            compare: compare_schema,
            shows: "GRANT SELECT(name) ON TABLE app.customers TO reporting",
        },
        Seeded {
            name: "a table owner",
            db: "Sales & Ops",
            change: "ALTER TABLE \"données\".\"café_crème\" OWNER TO app_owner",
            undo: "ALTER TABLE \"données\".\"café_crème\" OWNER TO postgres",
            compare: compare_schema,
            shows: "OWNER TO app_owner",
        },
        Seeded {
            name: "a role attribute",
            db: "postgres",
            change: "ALTER ROLE reporting CONNECTION LIMIT 4",
            undo: "ALTER ROLE reporting CONNECTION LIMIT 3",
            compare: roles_of,
            shows: "role reporting:",
        },
        Seeded {
            name: "a role membership",
            db: "postgres",
            change: "REVOKE analysts FROM reporting",
            undo: "GRANT analysts TO reporting",
            compare: roles_of,
            shows: "- member reporting of analysts",
        },
        Seeded {
            name: "a per-database role setting",
            db: "postgres",
            change: "ALTER ROLE reporting IN DATABASE app SET work_mem = '17MB'",
            undo: "ALTER ROLE reporting IN DATABASE app SET work_mem = '16MB'",
            compare: roles_of,
            shows: "work_mem=17MB",
        },
        Seeded {
            name: "a password",
            db: "postgres",
            change: "ALTER ROLE app_owner PASSWORD 'changed'",
            undo: &restore_password,
            compare: passwords_of,
            shows: "app_owner: SCRAM-SHA-256$",
        },
        Seeded {
            name: "one byte of a large object",
            db: "app",
            change: "SELECT lo_put(424242, 100, '\\x00')",
            undo: &restore_lo_byte,
            compare: compare_large_objects,
            shows: "424242 owner=app_owner",
        },
        Seeded {
            name: "a large object's owner",
            db: "app",
            change: "ALTER LARGE OBJECT 424242 OWNER TO etl",
            undo: "ALTER LARGE OBJECT 424242 OWNER TO app_owner",
            compare: compare_large_objects,
            shows: "424242 owner=etl",
        },
        Seeded {
            name: "a database setting",
            db: "postgres",
            change: "ALTER DATABASE app SET work_mem = '13MB'",
            undo: "ALTER DATABASE app SET work_mem = '12MB'",
            compare: databases_of,
            shows: "database app setting: work_mem=13MB",
        },
        Seeded {
            name: "a database privilege",
            db: "postgres",
            change: "GRANT TEMPORARY ON DATABASE app TO etl",
            undo: "REVOKE TEMPORARY ON DATABASE app FROM etl",
            compare: databases_of,
            shows: "etl=Tc/app_owner",
        },
    ];
    let seeded_started = Instant::now();
    for case in &seeded {
        copy.execute(case.db, case.change);
        let caught = (case.compare)(&source, &copy, case.db);
        let Err(mismatch) = caught else {
            panic!("{} ({}) was not noticed", case.name, case.change);
        };
        let text = mismatch.to_string();
        assert!(
            text.contains(case.shows),
            "{}: the mismatch does not show {:?}:\n{text}",
            case.name,
            case.shows
        );
        // At most 40 changed lines, plus context and headers.
        assert!(
            text.lines().count() <= 60,
            "{}: the mismatch should show only what differs:\n{text}",
            case.name
        );
        copy.execute(case.db, case.undo);
        if let Err(left) = (case.compare)(&source, &copy, case.db) {
            panic!("{}: still differs after undoing it:\n{left}", case.name);
        }
    }
    eprintln!(
        "{} seeded differences caught and undone in {:?}",
        seeded.len(),
        seeded_started.elapsed()
    );

    // A password is not a role attribute: roles() ignores it, role_passwords() alone sees it.
    copy.execute("postgres", "ALTER ROLE etl PASSWORD 'changed'");
    assert_eq!(compare_roles(&source, &copy), Ok(()));
    assert!(compare_role_passwords(&source, &copy).is_err());
    copy.execute("postgres", "ALTER ROLE etl PASSWORD NULL");
    assert!(role_passwords(&copy).contains("etl: <none>"));

    // Several differences at once are all reported, each with its own excerpt.
    copy.execute(
        "app",
        "CREATE TABLE app.extra (a int); INSERT INTO app.extra VALUES (1)",
    );
    copy.execute(
        "legacy",
        "UPDATE public.notes SET body = body || '!' WHERE id = 1",
    );
    let found: Vec<String> = compare_instance(&source, &copy)
        .iter()
        .map(|m| m.what.clone())
        .collect();
    assert_eq!(found.len(), 3, "{found:#?}");
    assert!(
        found[0].starts_with("schemas of database \"app\""),
        "{found:#?}"
    );
    assert!(
        found[1].starts_with("table contents (rows, checksum) of database \"app\""),
        "{found:#?}"
    );
    assert!(
        found[2].starts_with("table contents (rows, checksum) of database \"legacy\""),
        "{found:#?}"
    );
}

/// The listings hold what the fixture put there, so equality above means something.
fn listings_are_not_vacuous(source: &Cluster) {
    assert_eq!(databases(source), RICH_SOURCE_DATABASES.map(String::from));

    let tables = table_fingerprints(source, "app");
    for (table, rows) in [
        ("app.kitchen_sink", 2003),
        ("app.orders", 3000),
        ("app.audit_log", 3300),
        ("app.raw_import", 202),
        ("app.attachments", 2),
        ("app.daily_revenue", 15),
    ] {
        assert_eq!(
            tables.get(table).map(|(n, _)| *n),
            Some(rows),
            "{table} in {tables:#?}"
        );
    }
    let leaves: i64 = tables
        .iter()
        .filter(|(name, _)| name.starts_with("app.measurements_"))
        .map(|(_, (n, _))| n)
        .sum();
    assert_eq!(leaves, 6000, "partition leaves: {tables:#?}");
    for leaf in ["app.measurements_rest_low", "app.measurements_rest_other"] {
        assert!(
            tables[leaf].0 > 0,
            "{leaf} of the default partition is empty"
        );
    }
    assert!(
        !tables.contains_key("app.measurements"),
        "a partitioned parent holds no rows"
    );
    let quoted = table_fingerprints(source, "Sales & Ops");
    assert!(
        quoted.contains_key("\"Q3 Report\".\"Line Items\""),
        "{quoted:#?}"
    );

    let sequences = sequence_values(source, "app");
    assert_eq!(sequences["app.ticket_seq"], (500, false));
    assert_eq!(sequences["app.customers_id_seq"], (500, true));
    assert!(sequences["app.invoice_no"].0 > 1000, "{sequences:#?}");

    let schema = schema_dump(source, "app");
    for needle in [
        "CREATE TRIGGER orders_audit AFTER INSERT OR UPDATE ON app.orders",
        "ALTER TABLE app.kitchen_sink OWNER TO app_owner;",
        "GRANT SELECT(region) ON TABLE app.customers TO reporting;",
        "GRANT SELECT,INSERT ON TABLE app.orders TO etl;",
        "ALTER DEFAULT PRIVILEGES FOR ROLE app_owner IN SCHEMA app GRANT SELECT ON TABLES",
        "CREATE POLICY customers_by_region ON app.customers",
        "ALTER TABLE ONLY app.measurements_rest ATTACH PARTITION app.measurements_rest_other DEFAULT;",
    ] {
        assert!(schema.contains(needle), "the app schema lacks {needle:?}");
    }
    assert!(
        !schema.contains("\\restrict"),
        "the key lines are normalised away"
    );

    let roles = roles(source);
    for needle in [
        "role \"sales lead\": NOSUPERUSER INHERIT",
        "member \"sales lead\" of analysts admin=true grantor=postgres",
        "member reporting of pg_read_all_stats admin=false",
        "setting of reporting in app: work_mem=16MB",
        "setting of reporting in every database: statement_timeout=30s",
        "VALID UNTIL 2099-12-31 23:59:59+00",
        "role analysts comment: 'read-only analysts'",
    ] {
        assert!(roles.contains(needle), "roles lack {needle:?}:\n{roles}");
    }
    let passwords = role_passwords(source);
    assert!(passwords.contains("etl: md5"), "{passwords}");
    assert!(passwords.contains("\"sales lead\": <none>"), "{passwords}");

    let objects = large_objects(source, "app");
    assert!(
        objects.contains("424242 owner=app_owner acl=app_owner=rw/app_owner,reporting=r/app_owner"),
        "{objects}"
    );
    assert!(objects.contains("424243 owner=postgres"), "{objects}");

    let databases = database_properties(source);
    for needle in [
        "database \"Sales & Ops\": owner=\"sales lead\" encoding=UTF8 collate=C.utf8",
        "database legacy: owner=postgres encoding=LATIN1",
        "connection_limit=50",
        "comment='the application'",
        "database app setting: app.tenant=acme",
        "database postgres setting: work_mem=8MB",
    ] {
        assert!(
            databases.contains(needle),
            "databases lack {needle:?}:\n{databases}"
        );
    }
}

#[test]
fn a_fresh_destination_compares_equal_to_a_fresh_source() {
    let (source, dest) = {
        let source = thread::spawn(|| ClusterBuilder::source("fresh-src").start());
        let dest = ClusterBuilder::destination("fresh-dst").start();
        (source.join().expect("the source starts"), dest)
    };
    // The same user objects in both `postgres` databases: on the destination they come after
    // cloudmig's extension in pg_dump's order, so what is left out must not take theirs along.
    for cluster in [&source, &dest] {
        cluster.execute(
            "postgres",
            "CREATE SCHEMA ops;
             CREATE TABLE ops.jobs (id int PRIMARY KEY, name text NOT NULL);
             CREATE INDEX jobs_name ON ops.jobs (name);
             INSERT INTO ops.jobs SELECT i, 'job ' || i FROM generate_series(1, 10) i;",
        );
    }
    // cloudmig's own objects are there, and left out of every listing.
    let raw = dest.query_scalar::<i64>(
        "postgres",
        "SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
          WHERE n.nspname = 'cloudmig'",
    );
    assert!(raw > 0, "the destination has cloudmig's tables");
    assert!(!schema_dump(&dest, "postgres").contains("cloudmig"));
    assert!(!roles(&dest).contains("cloudmig"));
    assert_same_instance(&source, &dest);
    assert_same_role_passwords(&source, &dest);

    // Not too much is left out: a user object in the destination's postgres is a difference.
    dest.execute("postgres", "CREATE TABLE public.cloudmig_lookalike (a int)");
    let found = compare_instance(&source, &dest);
    assert_eq!(found.len(), 2, "{found:#?}");
    assert!(
        found[0]
            .diff
            .contains("+ CREATE TABLE public.cloudmig_lookalike"),
        "{}",
        found[0]
    );
    assert!(
        found[1].diff.contains("+ public.cloudmig_lookalike: (0,"),
        "{}",
        found[1]
    );
}

fn start_two(a: &'static str, b: &'static str) -> (Cluster, Cluster) {
    let first = thread::spawn(move || ClusterBuilder::source(a).start());
    let second = ClusterBuilder::source(b).start();
    (first.join().expect("the first cluster starts"), second)
}
