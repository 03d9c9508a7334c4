//! What the fault-injection scenarios (tests/faults.rs, tests/faults_slow.rs) share: a source
//! with the scenario's tables behind a [`Proxy`], a destination, a task started through the
//! proxy, and the writes a scenario makes while a fault is on.

use crate::migration::{self, wait_phase};
use crate::proxy::Proxy;
use crate::{Cluster, ClusterBuilder};

/// The tables every scenario migrates in database `app`: one with a key, one without (changed
/// with REPLICA IDENTITY FULL, holding duplicate rows on purpose: a change applied twice here
/// would show as one more), and `bulk`, `bulk_rows` rows of 200 bytes to make the copy last.
pub fn app_schema(bulk_rows: u64) -> String {
    format!(
        "CREATE TABLE items (id bigserial PRIMARY KEY, name text NOT NULL);
         CREATE TABLE keyless (n int, note text);
         ALTER TABLE keyless REPLICA IDENTITY FULL;
         CREATE TABLE bulk (id bigint PRIMARY KEY, pad text);
         INSERT INTO items (name) SELECT 'item ' || i FROM generate_series(1, 2000) i;
         INSERT INTO keyless SELECT i % 50, 'twice' FROM generate_series(1, 500) i;
         INSERT INTO bulk SELECT i, repeat(md5(i::text), 6) || '-' || i FROM generate_series(1, {bulk_rows}) i;"
    )
}

/// A two-cluster scenario: the source, the destination, the proxy between them, the task.
pub struct Scenario {
    pub source: Cluster,
    pub dest: Cluster,
    pub proxy: Proxy,
    pub task: i64,
}

/// Builds a scenario named `name`: a source with `app` ([`app_schema`] with `bulk_rows`, then
/// `extra_sql`) and `source_conf` lines, a destination with `dest_conf` lines, a proxy passing (with `setup`
/// applied before the task starts, e.g. a rate) and a task started through it.
pub fn scenario(
    name: &str,
    bulk_rows: u64,
    extra_sql: &str,
    source_conf: &[&str],
    dest_conf: &[&str],
    setup: impl FnOnce(&Proxy),
) -> Scenario {
    let mut source = ClusterBuilder::source(&format!("{name}-src")).init_sql("CREATE DATABASE app");
    for line in source_conf {
        source = source.conf(line);
    }
    let source = source.start();
    source.execute("app", &app_schema(bulk_rows));
    if !extra_sql.is_empty() {
        source.execute("app", extra_sql);
    }
    let mut dest = ClusterBuilder::destination(&format!("{name}-dst"));
    for line in dest_conf {
        dest = dest.conf(line);
    }
    let dest = dest.start();
    let proxy = Proxy::to_port(source.port);
    setup(&proxy);
    let task = migration::start_task_via(&dest, &conninfo(&proxy), "{}");
    Scenario {
        source,
        dest,
        proxy,
        task,
    }
}

/// The conninfo of the source as cloudmig sees it: through `proxy`.
pub fn conninfo(proxy: &Proxy) -> String {
    format!(
        "host=127.0.0.1 port={} user=postgres dbname=postgres",
        proxy.port()
    )
}

impl Scenario {
    /// Waits for `phase` (or a later one).
    pub fn wait(&self, phase: &str) {
        wait_phase(&self.dest, self.task, phase);
    }

    /// The task's phase now.
    pub fn phase(&self) -> String {
        self.dest.query_scalar(
            "postgres",
            &format!("SELECT phase FROM cloudmig.task WHERE id = {}", self.task),
        )
    }

    /// Inserts, updates and deletes in every table of `app` (round `round` names its rows).
    pub fn write(&self, round: u32) {
        write_round(&self.source, round);
    }

    /// Waits until every change of the source so far is applied here.
    pub fn caught_up(&self) {
        migration::caught_up(&self.source, &self.dest, self.task);
    }

    /// Puts five WAL segments between the source's position and its slot, more than the
    /// scenarios' `max_slot_wal_keep_size = 48MB` keeps (the WAL stays until a checkpoint
    /// removes it, which invalidates the slot), and waits for the task's early warning.
    pub fn outgrow_slot_wal_limit(&self) {
        self.source.execute(
            "app",
            "DO $$ BEGIN FOR i IN 1..5 LOOP \
               PERFORM pg_logical_emit_message(false, 'fill', 'x'); PERFORM pg_switch_wal(); \
             END LOOP; END $$",
        );
        crate::poll_until(
            &self.dest,
            "postgres",
            &format!(
                "SELECT count(*) > 0 FROM cloudmig.events WHERE task_id = {} AND kind = 'warning' \
                    AND message LIKE '%may be invalidated soon%'",
                self.task
            ),
            "t",
            std::time::Duration::from_secs(180),
        );
    }

    /// Switches over and waits until the task is completed.
    pub fn switchover(&self) {
        migration::switchover(&self.dest, self.task, "{}");
    }

    /// Switches over and asserts the verdict: completed, `events` among the task's events.
    /// The task worker writes "streaming again" on its next look at the apply workers, which
    /// may come after the apply caught up: the switchover would end its watch first, so that
    /// one is waited for.
    pub fn complete(&self, events: &[&str]) {
        if events.contains(&"streaming again") {
            crate::poll_until(
                &self.dest,
                "postgres",
                &format!(
                    "SELECT count(*) > 0 FROM cloudmig.events WHERE task_id = {} \
                        AND message LIKE '%streaming again%'",
                    self.task
                ),
                "t",
                std::time::Duration::from_secs(180),
            );
        }
        self.switchover();
        crate::verdict::assert_verdict(
            &self.source,
            &self.dest,
            self.task,
            crate::verdict::Expect {
                phase: "completed",
                events,
                databases: &["app"],
            },
        );
    }
}

/// One round of writes on `source`'s `app`: rows added, changed and removed in each table.
pub fn write_round(source: &Cluster, round: u32) {
    source.execute(
        "app",
        &format!(
            "INSERT INTO items (name) SELECT 'round {round} ' || i FROM generate_series(1, 200) i;
             UPDATE items SET name = name || ' changed' WHERE id % 13 = {m};
             DELETE FROM items WHERE id % 17 = {m};
             INSERT INTO keyless SELECT i % 10, 'round {round}' FROM generate_series(1, 40) i;
             UPDATE keyless SET note = note || '+' WHERE n = {k};
             DELETE FROM keyless WHERE n = {d};
             UPDATE bulk SET pad = 'round {round}' WHERE id % 101 = {m};",
            m = round % 13,
            k = round % 10,
            d = (round + 5) % 10
        ),
    );
}
