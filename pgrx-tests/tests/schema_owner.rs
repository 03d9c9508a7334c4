//! End to end: the schema steps run each object's statements as its owner, never as the
//! superuser that drives the migration.
//!
//! The source's `carol` (no attribute) owns a table whose index expression, CHECK constraint
//! (validated when post-data adds it) and materialized view (through its query, and an index
//! expression) each call a function of hers that notes `current_user` and `session_user` and
//! tries `ALTER ROLE carol SUPERUSER`. Run as the bootstrap superuser, the CHECK makes her one;
//! PostgreSQL itself already builds indexes as the owner, but with the superuser as the session
//! user. The view's query never runs here (its rows come from the source); its index is rebuilt
//! over them, as carol.
//! A non-superuser caller's migration creates nothing owned by a superuser: an event trigger is
//! left out with a warning, a `SECURITY DEFINER` function of `postgres` is not `postgres`'s here.

use cloudmig_e2e::migration::events;
use cloudmig_e2e::{postgres, Cluster, ClusterBuilder};

/// carol's schema in database `app` of the source. `note(what)` records who runs it in
/// `public.seen` (emptied once everything exists, so only the destination's calls remain).
const CAROL_SCHEMA: &str = "
    GRANT CREATE ON SCHEMA public TO carol;
    SET ROLE carol;
    CREATE TABLE public.seen (what text, cur name, sess name);
    ALTER TABLE public.seen REPLICA IDENTITY FULL;
    -- Empty while the schema is built on the source (where carol's own SET ROLE session could
    -- switch back to its superuser), armed once it is built, and copied so.
    CREATE TABLE public.armed (a boolean PRIMARY KEY);
    CREATE FUNCTION public.note(what text) RETURNS void LANGUAGE plpgsql AS $$
    BEGIN
        INSERT INTO public.seen VALUES (what, current_user, session_user);
        IF NOT EXISTS (SELECT FROM public.armed) THEN
            RETURN;
        END IF;
        BEGIN
            ALTER ROLE carol SUPERUSER;
        EXCEPTION WHEN OTHERS THEN NULL;
        END;
        BEGIN
            EXECUTE 'RESET SESSION AUTHORIZATION';
            EXECUTE 'ALTER ROLE carol SUPERUSER';
        EXCEPTION WHEN OTHERS THEN NULL;
        END;
    END $$;
    CREATE FUNCTION public.by_index(a integer) RETURNS integer LANGUAGE plpgsql IMMUTABLE AS $$
    BEGIN PERFORM public.note('index'); RETURN a; END $$;
    CREATE TABLE public.t (a integer PRIMARY KEY, b text);
    INSERT INTO public.t SELECT g, 'row ' || g FROM generate_series(1, 3) g;
    CREATE INDEX t_by_index ON public.t (public.by_index(a));
    -- Takes the table's row type: pg_dump adds the constraint after the data (post-data).
    CREATE FUNCTION public.checked(r public.t) RETURNS boolean LANGUAGE plpgsql IMMUTABLE AS $$
    BEGIN PERFORM public.note('check'); RETURN true; END $$;
    ALTER TABLE public.t ADD CONSTRAINT t_checked CHECK (public.checked(t));
    CREATE FUNCTION public.in_view(a integer) RETURNS integer LANGUAGE plpgsql AS $$
    BEGIN PERFORM public.note('matview'); RETURN a; END $$;
    CREATE MATERIALIZED VIEW public.mv AS SELECT public.in_view(a) AS a FROM public.t;
    CREATE FUNCTION public.by_view_index(a integer) RETURNS integer LANGUAGE plpgsql IMMUTABLE AS $$
    BEGIN PERFORM public.note('view index'); RETURN a; END $$;
    CREATE INDEX mv_by_index ON public.mv (public.by_view_index(a));
    TRUNCATE public.seen;
    INSERT INTO public.armed VALUES (true);
    RESET ROLE;";

/// The source superuser's password (a non-superuser caller must log in with one).
const PASSWORD: &str = "s0urce-pa55";

/// A source whose `postgres` logs in over TCP with [`PASSWORD`].
fn source(name: &str) -> ClusterBuilder {
    ClusterBuilder::source(name)
        .hba(&[
            "local all all trust",
            "host all all 127.0.0.1/32 scram-sha-256",
            "host replication all 127.0.0.1/32 scram-sha-256",
        ])
        .conf("max_slot_wal_keep_size = '1GB'")
        .init_sql(&format!(
            "SET password_encryption = 'scram-sha-256'; ALTER ROLE postgres PASSWORD '{PASSWORD}'"
        ))
}

/// A source with role `carol` and database `app` holding [`CAROL_SCHEMA`] and `extra`.
fn carol_source(name: &str, extra: &str) -> Cluster {
    let source = source(name)
        .init_sql("CREATE ROLE carol LOGIN NOSUPERUSER")
        .init_sql("CREATE DATABASE app")
        .start();
    source.execute("app", CAROL_SCHEMA);
    if !extra.is_empty() {
        source.execute("app", extra);
    }
    assert!(
        !is_superuser(&source, "carol"),
        "the source's setup made carol a superuser"
    );
    source
}

/// Assesses `source` and starts a task as `user` on `dest`, waits for `incremental`.
fn migrate_as(dest: &Cluster, source: &Cluster, user: &str) -> i64 {
    let mut client = postgres::Config::new()
        .host_path(&dest.socket_dir)
        .port(dest.port)
        .user(user)
        .dbname("postgres")
        .connect(postgres::NoTls)
        .unwrap_or_else(|e| panic!("connect as {user}: {e}"));
    let conninfo = source.tcp_conninfo("postgres", Some(PASSWORD), "postgres");
    let assessment: i64 = client
        .query_one("SELECT cloudmig.assess($1)", &[&conninfo])
        .expect("assess")
        .get(0);
    let task: i64 = client
        .query_one("SELECT cloudmig.start($1)", &[&assessment])
        .unwrap_or_else(|e| panic!("start: {e:?}"))
        .get(0);
    let reached: String = dest
        .client("postgres")
        .query_one(
            "SELECT cloudmig.wait($1, 'incremental', '3 minutes')",
            &[&task],
        )
        .unwrap_or_else(|e| panic!("wait: {e:?}\n{}", dest.log_tail(30)))
        .get(0);
    assert_eq!(
        reached,
        "incremental",
        "{}\n{}",
        events(dest, task),
        dest.log_tail(30)
    );
    task
}

/// Who ran carol's code on the destination: "what:current_user/session_user", distinct, sorted.
fn seen(dest: &Cluster) -> String {
    dest.query_scalar(
        "app",
        "SELECT coalesce(string_agg(DISTINCT format('%s:%s/%s', what, cur, sess), ' '), '') \
           FROM public.seen",
    )
}

fn is_superuser(cluster: &Cluster, role: &str) -> bool {
    cluster.query_scalar(
        "postgres",
        &format!("SELECT rolsuper FROM pg_roles WHERE rolname = '{role}'"),
    )
}

/// A superuser's migration: carol's index expression, CHECK constraint and materialized view's
/// index run as carol, session user included, and she stays what she is.
#[test]
fn an_objects_code_runs_as_its_owner() {
    let source = carol_source("owner-src", "");
    let dest = ClusterBuilder::destination("owner-dst").start();
    let task = migrate_as(&dest, &source, "postgres");
    assert!(!is_superuser(&dest, "carol"), "{}", events(&dest, task));
    assert_eq!(
        seen(&dest),
        "check:carol/carol index:carol/carol view index:carol/carol",
        "{}",
        events(&dest, task)
    );
    // The objects are carol's, with the constraint in place and the view populated.
    let owners: String = dest.query_scalar(
        "app",
        "SELECT string_agg(format('%s:%s', relname, relowner::regrole), ' ' ORDER BY relname) \
           FROM pg_class WHERE relname IN ('t', 'mv', 't_by_index', 'seen')",
    );
    assert_eq!(owners, "mv:carol seen:carol t:carol t_by_index:carol");
    let database_owner: String = dest.query_scalar(
        "postgres",
        "SELECT datdba::regrole::text FROM pg_database WHERE datname = 'app'",
    );
    assert_eq!(database_owner, "postgres");
    let rows: i64 = dest.query_scalar("app", "SELECT count(*) FROM public.mv");
    assert_eq!(rows, 3);
    let constraint: i64 = dest.query_scalar(
        "app",
        "SELECT count(*) FROM pg_constraint WHERE conname = 't_checked' AND convalidated",
    );
    assert_eq!(constraint, 1);
}

/// A member of cloudmig_admin who is not a superuser: nothing runs or is created as a superuser
/// on their behalf. The event trigger (superuser-only) is left out with a warning and its fix,
/// `postgres`'s SECURITY DEFINER function is not created as `postgres`, carol's objects arrive.
#[test]
fn a_non_superuser_caller_creates_nothing_as_a_superuser() {
    let source = carol_source(
        "caller-src",
        "CREATE FUNCTION public.on_ddl() RETURNS event_trigger LANGUAGE plpgsql AS $$
         BEGIN PERFORM 1; END $$;
         CREATE EVENT TRIGGER on_ddl ON ddl_command_end EXECUTE FUNCTION public.on_ddl();
         CREATE FUNCTION public.as_postgres() RETURNS void LANGUAGE sql SECURITY DEFINER
             AS 'ALTER ROLE carol SUPERUSER';
         GRANT EXECUTE ON FUNCTION public.as_postgres() TO carol;",
    );
    let dest = ClusterBuilder::destination("caller-dst")
        .init_sql("CREATE ROLE mallory LOGIN IN ROLE cloudmig_admin")
        .start();
    let task = migrate_as(&dest, &source, "mallory");
    assert!(!is_superuser(&dest, "carol"), "{}", events(&dest, task));
    assert!(!is_superuser(&dest, "mallory"), "{}", events(&dest, task));
    assert_eq!(
        seen(&dest),
        "check:carol/carol index:carol/carol view index:carol/carol",
        "{}",
        events(&dest, task)
    );
    let triggers: i64 = dest.query_scalar("app", "SELECT count(*) FROM pg_event_trigger");
    assert_eq!(triggers, 0);
    let superuser_functions: String = dest.query_scalar(
        "app",
        "SELECT coalesce(string_agg(proname, ' ' ORDER BY proname), '') FROM pg_proc p \
           JOIN pg_roles r ON r.oid = p.proowner \
          WHERE r.rolsuper AND p.pronamespace = 'public'::regnamespace",
    );
    assert_eq!(superuser_functions, "", "{}", events(&dest, task));
    let warnings = events(&dest, task);
    for expected in [
        "CREATE EVENT TRIGGER on_ddl ON ddl_command_end EXECUTE FUNCTION public.on_ddl (owner postgres) was left out: run as mallory it failed",
        "CREATE FUNCTION public.as_postgres (owner postgres) was left out: run as mallory",
        "fix: if it is wanted, a superuser runs it here",
    ] {
        assert!(
            warnings.contains(expected),
            "no event {expected:?} in:\n{warnings}"
        );
    }
    let owners: String = dest.query_scalar(
        "app",
        "SELECT string_agg(format('%s:%s', relname, relowner::regrole), ' ' ORDER BY relname) \
           FROM pg_class WHERE relname IN ('t', 'mv')",
    );
    assert_eq!(owners, "mv:carol t:carol");
}

/// How long the schema steps take for a schema of about 5,000 objects (1,250 tables of carol's,
/// each with a comment, a primary key and an index): prints the task's events with their times.
/// Run by hand: `cargo test -p cloudmig-e2e --test schema_owner -- --ignored --nocapture`.
#[test]
#[ignore]
fn timing_of_a_schema_of_5000_objects() {
    let source = source("timing-src")
        .init_sql("CREATE ROLE carol LOGIN NOSUPERUSER")
        .init_sql("CREATE DATABASE app OWNER carol")
        .start();
    source.execute(
        "app",
        "SET ROLE carol;
         DO $$ BEGIN FOR i IN 1..1250 LOOP
             EXECUTE format('CREATE TABLE public.t%s (a integer PRIMARY KEY, b text CHECK (b <> %L))', i, 'x');
             EXECUTE format('COMMENT ON TABLE public.t%s IS %L', i, 'table ' || i);
             EXECUTE format('CREATE INDEX ON public.t%s (lower(b))', i);
         END LOOP; END $$;",
    );
    let dest = ClusterBuilder::destination("timing-dst").start();
    let task = migrate_as(&dest, &source, "postgres");
    let timeline: String = dest.query_scalar(
        "postgres",
        &format!(
            "SELECT string_agg(format('%s  %s', to_char(at - t0, 'SS.MS'), message), E'\\n' \
                    ORDER BY id) \
               FROM (SELECT id, at, message, min(at) OVER () AS t0 \
                       FROM cloudmig.events WHERE task_id = {task}) e"
        ),
    );
    println!("{timeline}");
}
