//! End to end, fault injection (the fast part; tests/faults_slow.rs has the long ones): the
//! source restarts, the destination crashes, the network black-holes and resets, walsenders
//! die, the destination's disk fills up and is freed, a slot is invalidated, and awkward
//! changes (TRUNCATE CASCADE / RESTART IDENTITY, descending, cycling and identity sequences,
//! large objects written after the copy, large transactions with savepoints and aborted ones
//! decoded with 64 kB of memory) arrive. Every scenario ends with the same verdict
//! (`cloudmig_e2e::verdict`): same rows and checksums, no duplicates in keyless tables, nothing
//! of cloudmig left on either side, and a status row and events that say what happened.
//!
//! The source is reached through a `Proxy`; a rate limit on it makes the copy and the catch-up
//! last long enough for a fault to hit them.

use cloudmig_e2e::compare::{assert_same_large_objects, assert_same_sequences};
use cloudmig_e2e::faults::{scenario, Scenario};
use cloudmig_e2e::migration::events;
use cloudmig_e2e::proxy::Direction;
use cloudmig_e2e::verdict::{assert_verdict, Expect};
use cloudmig_e2e::{chown_to_server, poll_until, Cluster};
use std::io::{ErrorKind, Write};
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

const TIMEOUT: Duration = Duration::from_secs(180);
/// Rows of `bulk` (200 bytes each) in the scenarios that fault the copy: ~8 MB.
const BULK_ROWS: u64 = 40_000;
/// What the source sends per second through the proxy while the copy and the catch-up should
/// last a few seconds.
const SLOW_LINK: u64 = 2_000_000;

/// Writes ~`mb` MB of changes on the source (so the catch-up after the copy has that much to
/// stream through the slow link).
fn write_megabytes(source: &Cluster, mb: u64) {
    source.execute(
        "app",
        &format!(
            "UPDATE bulk SET pad = repeat(md5((id + 1)::text), 6) || '-' || id \
              WHERE id <= {}",
            mb * 5_000
        ),
    );
}

/// A fault in each phase: while the copy runs, during the catch-up (the changes written during
/// the copy stream through a slow link), and in incremental.
fn in_each_phase(name: &str, fault: impl Fn(&Scenario, &str)) -> Scenario {
    let s = scenario(
        name,
        BULK_ROWS,
        "",
        &[],
        &["cloudmig.source_retry_timeout = 120"],
        |p| p.set_rate(Direction::Down, Some(SLOW_LINK)),
    );
    s.wait("full_copy");
    s.write(1);
    fault(&s, "full_copy");
    // Enough changes that the catch-up lasts several seconds on the slow link.
    write_megabytes(&s.source, 6);
    s.write(2);
    s.wait("catchup");
    fault(&s, "catchup");
    s.write(3);
    s.wait("incremental");
    s.proxy.set_rate(Direction::Down, None);
    fault(&s, "incremental");
    s.write(4);
    s.caught_up();
    s.write(5);
    s
}

#[test]
fn source_restarts_fast_and_immediate_in_copy_catchup_and_incremental() {
    let s = in_each_phase("f-src-restart", |s, phase| {
        let mode = if phase == "catchup" {
            "fast"
        } else {
            "immediate"
        };
        s.source.outage(mode, Duration::from_secs(1));
    });
    s.complete(&["the source is unavailable", "retrying", "streaming again"]);
}

#[test]
fn destination_kill9_of_a_worker_in_each_phase() {
    let s = in_each_phase("f-dst-kill9", |s, phase| {
        let victim = if phase == "full_copy" {
            "cloudmig database worker"
        } else {
            "cloudmig apply"
        };
        // The copy phase starts with planning and the post-data scripts; its workers come after.
        poll_until(
            &s.dest,
            "postgres",
            &format!(
                "SELECT count(*) > 0 FROM pg_catalog.pg_stat_activity WHERE backend_type = '{victim}'"
            ),
            "t",
            TIMEOUT,
        );
        let killed = s.dest.kill9(victim);
        assert!(killed > 0, "no {victim} ran in {phase}");
    });
    s.complete(&[]);
}

#[test]
fn destination_immediate_stop_in_each_phase() {
    let s = in_each_phase("f-dst-immediate", |s, _| s.dest.restart_immediate());
    s.complete(&[]);
}

#[test]
fn a_black_hole_longer_than_the_source_timeout_then_resets() {
    let s = scenario(
        "f-blackhole",
        1000,
        "",
        &[],
        &[
            "cloudmig.source_timeout = 3",
            "cloudmig.source_retry_timeout = 120",
        ],
        |_| {},
    );
    s.wait("incremental");
    // Streaming, not still starting: a small copy reaches incremental (under 1 MB behind)
    // before the apply has connected, and a black hole then times out its start instead.
    s.caught_up();
    s.proxy.black_hole();
    s.write(1);
    // The apply notices the silence (no keepalive either) and retries.
    poll_until(
        &s.dest,
        "postgres",
        &format!(
            "SELECT count(*) > 0 FROM cloudmig.events WHERE task_id = {} \
                AND message LIKE '%the source sent nothing for 3 s%'",
            s.task
        ),
        "t",
        TIMEOUT,
    );
    s.write(2);
    s.proxy.pass();
    s.caught_up();
    // Then the link resets a few times while the source is written to.
    for round in 3..6 {
        s.proxy.reset(Duration::from_millis(500));
        s.write(round);
        s.caught_up();
    }
    assert_eq!(s.phase(), "incremental", "{}", events(&s.dest, s.task));
    s.complete(&["the source sent nothing", "streaming again"]);
}

#[test]
fn walsenders_terminated_under_load() {
    let s = scenario("f-walsender", 1000, "", &[], &[], |_| {});
    s.wait("incremental");
    let source_port = s.source.port;
    let load = {
        let socket = s.source.socket_dir.clone();
        std::thread::spawn(move || {
            let mut client = postgres::Config::new()
                .host_path(&socket)
                .port(source_port)
                .user("postgres")
                .dbname("app")
                .connect(postgres::NoTls)
                .expect("load client");
            for i in 0..300 {
                client
                    .batch_execute(&format!(
                        "INSERT INTO items (name) VALUES ('load {i}');
                         UPDATE items SET name = name || '.' WHERE id = {};
                         INSERT INTO keyless VALUES ({}, 'load')",
                        i % 50 + 1,
                        i % 7
                    ))
                    .expect("load");
            }
        })
    };
    for _ in 0..3 {
        // A walsender streaming to us, then its end.
        poll_until(
            &s.source,
            "postgres",
            "SELECT count(*) > 0 FROM pg_stat_activity WHERE backend_type = 'walsender' \
                AND state = 'active'",
            "t",
            TIMEOUT,
        );
        s.source.execute(
            "postgres",
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE backend_type = 'walsender'",
        );
    }
    load.join().expect("the load ran");
    s.caught_up();
    assert_eq!(s.phase(), "incremental", "{}", events(&s.dest, s.task));
    s.complete(&["terminating connection", "streaming again"]);
}

/// A small tmpfs mounted under a cluster's directory for a tablespace of the destination;
/// unmounted on drop, also when the test fails (lazily: the server may still hold files
/// open in it), before the cluster's directory is removed.
struct SmallDisk {
    dir: PathBuf,
}

impl SmallDisk {
    /// Mounts a tmpfs of `megabytes` at `dir` (created), owned by the server user.
    fn mount(dir: PathBuf, megabytes: u32) -> SmallDisk {
        std::fs::create_dir_all(&dir).expect("the mount point");
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={megabytes}m"), "tmpfs"])
            .arg(&dir)
            .status()
            .expect("run mount");
        assert!(status.success(), "mount -t tmpfs on {}", dir.display());
        let disk = SmallDisk { dir };
        chown_to_server(&disk.dir).expect("chown the tmpfs to the server user");
        disk
    }

    /// The filler file that takes the room of this disk.
    fn filler(&self) -> PathBuf {
        self.dir.join("filler")
    }

    /// Fills the disk with the filler file until only `left` bytes are free.
    fn fill_leaving(&self, left: u64) {
        let mut file = std::fs::File::create(self.filler()).expect("create the filler");
        let chunk = vec![0u8; 1 << 20];
        let mut written: u64 = 0;
        loop {
            match file.write(&chunk) {
                Ok(0) => break,
                Ok(n) => written += n as u64,
                Err(e) if e.kind() == ErrorKind::StorageFull => break,
                Err(e) => panic!("write the filler: {e}"),
            }
        }
        file.set_len(written.saturating_sub(left))
            .expect("shrink the filler");
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
    }
}

#[test]
fn destination_disk_full_then_freed() {
    let s = scenario(
        "f-disk-full",
        1000,
        "",
        &[],
        // The disk stays full for as long as the test needs: longer than a default window.
        &["cloudmig.source_retry_timeout = 900"],
        |_| {},
    );
    s.wait("incremental");
    s.write(1);
    s.caught_up();
    // `items` moves here to a tablespace on a 32 MB disk, filled but for 256 kB.
    let disk = SmallDisk::mount(s.dest.dir.join("small-disk"), 32);
    let location = disk.dir.join("tablespace");
    std::fs::create_dir(&location).expect("the tablespace's directory");
    chown_to_server(&location).expect("chown the tablespace's directory");
    s.dest.execute(
        "postgres",
        &format!("CREATE TABLESPACE small LOCATION '{}'", location.display()),
    );
    s.dest
        .execute("app", "ALTER TABLE items SET TABLESPACE small");
    disk.fill_leaving(256 * 1024);
    // ~12 MB of rows for `items`: the apply cannot extend its file.
    s.source.execute(
        "app",
        "INSERT INTO items (name) SELECT repeat('full ', 40) || i FROM generate_series(1, 50000) i",
    );
    s.write(2);
    // Transient: the apply retries (twice at least, while the disk is still full) and the
    // task rides it out; its status row says why it waits.
    poll_until(
        &s.dest,
        "postgres",
        &format!(
            "SELECT outage_attempts >= 2 FROM cloudmig.tasks WHERE task_id = {}",
            s.task
        ),
        "t",
        TIMEOUT,
    );
    let row = s
        .dest
        .client("postgres")
        .query_one(
            "SELECT phase, outage_cause, outage_attempts FROM cloudmig.tasks WHERE task_id = $1",
            &[&s.task],
        )
        .expect("the task's row");
    let (phase, cause, attempts): (String, Option<String>, i32) =
        (row.get(0), row.get(1), row.get(2));
    assert_eq!(phase, "incremental", "{}", events(&s.dest, s.task));
    let cause = cause.unwrap_or_default();
    assert!(cause.contains("could not extend file"), "{cause}");
    assert!(cause.contains("No space left on device"), "{cause}");
    assert!(attempts >= 2, "{attempts}");
    // Room again: the apply converges by itself.
    std::fs::remove_file(disk.filler()).expect("remove the filler");
    s.write(3);
    s.caught_up();
    assert_eq!(s.phase(), "incremental", "{}", events(&s.dest, s.task));
    // The outage is over in the status row too.
    poll_until(
        &s.dest,
        "postgres",
        &format!(
            "SELECT outage_cause IS NULL FROM cloudmig.tasks WHERE task_id = {}",
            s.task
        ),
        "t",
        TIMEOUT,
    );
    // The table goes back so that nothing is left on the small disk.
    s.dest
        .execute("app", "ALTER TABLE items SET TABLESPACE pg_default");
    s.dest.execute("postgres", "DROP TABLESPACE small");
    s.complete(&["could not extend file", "streaming again"]);
    drop(disk);
}

#[test]
fn an_invalidated_slot_fails_the_task_with_an_explanation_after_a_warning() {
    let s = scenario(
        "f-slot-lost",
        1000,
        "",
        &["max_slot_wal_keep_size = 48MB"],
        &[],
        |_| {},
    );
    s.wait("incremental");
    // The apply waits for a lock here, so the slot stops moving on.
    let mut blocker = s.dest.client("app");
    blocker
        .batch_execute("BEGIN; LOCK TABLE items IN ACCESS EXCLUSIVE MODE")
        .expect("lock items here");
    s.source.execute(
        "app",
        "UPDATE items SET name = name || ' held' WHERE id = 1",
    );
    s.outgrow_slot_wal_limit();
    // The checkpoint removes the WAL and invalidates the slot.
    s.source.execute("postgres", "CHECKPOINT");
    s.wait("failed");
    drop(blocker);
    let row = s
        .dest
        .client("postgres")
        .query_one(
            "SELECT last_error, last_error_hint FROM cloudmig.tasks WHERE task_id = $1",
            &[&s.task],
        )
        .expect("the failed task's row");
    let (error, hint): (String, String) = (row.get(0), row.get(1));
    assert!(error.contains("was invalidated by the source"), "{error}");
    assert!(hint.contains("max_slot_wal_keep_size"), "{hint}");
    assert!(hint.contains("new task"), "{hint}");
    // Never a silently recreated slot: resume refuses.
    let refused = s
        .dest
        .client("postgres")
        .execute(&format!("SELECT cloudmig.resume({})", s.task), &[])
        .expect_err("resume of a task whose slot is lost");
    assert_eq!(
        refused.code().map(|c| c.code()),
        Some("55000"),
        "{refused:?}"
    );
    s.dest
        .execute("postgres", &format!("SELECT cloudmig.cancel({})", s.task));
    assert_verdict(
        &s.source,
        &s.dest,
        s.task,
        Expect {
            phase: "cancelled",
            events: &["may be invalidated soon", "was invalidated by the source"],
            // What was not applied is lost with the slot: nothing to compare.
            databases: &[],
        },
    );
}

#[test]
fn a_slot_invalidated_during_the_copy_fails_the_task_before_the_apply_starts() {
    let s = scenario(
        "f-slot-copy",
        BULK_ROWS,
        "",
        &["max_slot_wal_keep_size = 48MB"],
        &[],
        // ~16 s of copy.
        |p| p.set_rate(Direction::Down, Some(SLOW_LINK / 4)),
    );
    s.wait("full_copy");
    s.outgrow_slot_wal_limit();
    s.source.execute("postgres", "CHECKPOINT");
    s.wait("failed");
    s.proxy.set_rate(Direction::Down, None);
    let (error, failed_in): (String, String) = {
        let row = s
            .dest
            .client("postgres")
            .query_one(
                "SELECT last_error, failed_in FROM cloudmig.tasks WHERE task_id = $1",
                &[&s.task],
            )
            .expect("the failed task's row");
        (row.get(0), row.get(1))
    };
    assert!(error.contains("was invalidated by the source"), "{error}");
    assert_eq!(failed_in, "full_copy");
    s.dest
        .execute("postgres", &format!("SELECT cloudmig.cancel({})", s.task));
    assert_verdict(
        &s.source,
        &s.dest,
        s.task,
        Expect {
            phase: "cancelled",
            events: &["may be invalidated soon"],
            databases: &[],
        },
    );
}

#[test]
fn truncate_sequences_and_large_objects_after_the_copy() {
    let s = scenario(
        "f-shapes",
        1000,
        "CREATE TABLE parent (id int PRIMARY KEY);
         CREATE TABLE child (id int PRIMARY KEY, parent_id int REFERENCES parent);
         CREATE TABLE counted (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, v int);
         CREATE SEQUENCE down INCREMENT BY -1;
         CREATE SEQUENCE cycling MINVALUE 1 MAXVALUE 7 CYCLE;
         INSERT INTO parent SELECT generate_series(1, 100);
         INSERT INTO child SELECT i, i FROM generate_series(1, 100) i;
         INSERT INTO counted (v) SELECT generate_series(1, 100);",
        &[],
        &[],
        |_| {},
    );
    s.wait("incremental");
    s.source.execute(
        "app",
        "TRUNCATE parent CASCADE;
         INSERT INTO parent SELECT generate_series(1, 10);
         INSERT INTO child SELECT i, i FROM generate_series(1, 10) i;
         TRUNCATE counted RESTART IDENTITY;
         INSERT INTO counted (v) SELECT generate_series(1, 1000);
         SELECT count(nextval('down')) FROM generate_series(1, 1000);
         SELECT count(nextval('cycling')) FROM generate_series(1, 1000);
         SELECT count(nextval('items_id_seq')) FROM generate_series(1, 1000);
         SELECT lo_from_bytea(7001, 'written after the copy');
         SELECT lo_from_bytea(7002, decode(repeat('ab', 100000), 'hex'));",
    );
    s.write(1);
    s.caught_up();
    let child: i64 = s.dest.query_scalar("app", "SELECT count(*) FROM child");
    assert_eq!(child, 10, "TRUNCATE ... CASCADE emptied child here too");
    s.complete(&[]);
    assert_same_sequences(&s.source, &s.dest, "app");
    assert_same_large_objects(&s.source, &s.dest, "app");
    let next: i64 = s
        .dest
        .query_scalar("app", "INSERT INTO counted (v) VALUES (0) RETURNING id");
    assert_eq!(
        next, 1001,
        "the identity restarted and moved on as on the source"
    );
}

#[test]
fn large_transactions_with_savepoints_and_aborted_ones_under_64kb_of_decoding_memory() {
    let s = scenario(
        "f-large-tx",
        1000,
        "",
        &["logical_decoding_work_mem = 64kB"],
        &[],
        |_| {},
    );
    s.wait("incremental");
    // ~20 MB in one transaction, part of it rolled back to a savepoint; then an aborted one.
    s.source.execute(
        "app",
        "BEGIN;
         INSERT INTO bulk SELECT i, repeat('k', 200) FROM generate_series(100001, 150000) i;
         SAVEPOINT a;
         INSERT INTO bulk SELECT i, repeat('r', 200) FROM generate_series(150001, 200000) i;
         ROLLBACK TO SAVEPOINT a;
         SAVEPOINT b;
         UPDATE bulk SET pad = 'kept' WHERE id BETWEEN 100001 AND 120000;
         RELEASE SAVEPOINT b;
         DELETE FROM keyless WHERE n < 5;
         COMMIT;
         BEGIN;
         INSERT INTO bulk SELECT i, repeat('a', 200) FROM generate_series(200001, 260000) i;
         DELETE FROM items;
         ROLLBACK;",
    );
    s.write(1);
    s.caught_up();
    let rows: i64 = s
        .dest
        .query_scalar("app", "SELECT count(*) FROM bulk WHERE id > 100000");
    assert_eq!(rows, 50_000);
    s.complete(&[]);
}

#[test]
fn the_source_lost_while_a_materialized_view_is_copied() {
    // About 20 MB of the view's rows through a 2 MB/s link: its copy in post_data lasts seconds.
    let s = scenario(
        "f-matview-lost",
        1000,
        "CREATE MATERIALIZED VIEW big_view AS \
           SELECT i, repeat(md5(i::text), 3) AS pad FROM generate_series(1, 200000) i",
        &[],
        &["cloudmig.source_retry_timeout = 120"],
        |p| p.set_rate(Direction::Down, Some(SLOW_LINK)),
    );
    s.wait("post_data");
    // The view's rows are on their way into its new heap here.
    poll_until(
        &s.dest,
        "postgres",
        "SELECT count(*) > 0 FROM pg_stat_progress_copy WHERE datname = 'app'",
        "t",
        TIMEOUT,
    );
    s.proxy.reset(Duration::from_secs(1));
    s.wait("incremental");
    s.proxy.set_rate(Direction::Down, None);
    let contents = |cluster: &Cluster| -> String {
        cluster.query_scalar(
            "app",
            "SELECT count(*) || ':' || sum(hashtext(v::text)) FROM big_view v",
        )
    };
    assert_eq!(contents(&s.dest), contents(&s.source));
    s.complete(&["the source is unavailable", "retrying"]);
}
