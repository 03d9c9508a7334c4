//! The switchover's fence: from the moment the source stops taking writes to
//! the cut-over, no write may reach the source's migrated databases, and any
//! that does anyway must be noticed before the destination opens.
//!
//! `default_transaction_read_only` alone stops only clients that leave it
//! alone: a client that reconnects and runs `SET default_transaction_read_only
//! = off` (or `BEGIN READ WRITE`) writes on, and so does a background worker.
//! So the fence is, per migrated database:
//! 1. `default_transaction_read_only = on`;
//! 2. `ALLOW_CONNECTIONS false`, issued from a database that is not fenced
//!    (`template1`): from here on nobody connects, superusers included. Both
//!    stay after a completed switchover: an application still pointed at the
//!    source fails there instead of writing where nobody reads; the DBA lets
//!    readers in again with `ALTER DATABASE ... ALLOW_CONNECTIONS true`;
//! 3. every backend connected to it ended and waited for (client backends,
//!    background workers, logical replication workers), except walsenders
//!    (they only read), autovacuum, `exempt_users`' sessions and cloudmig's
//!    own sessions, which are known by process id (never by a name a client
//!    could take, such as `application_name`);
//! 4. the stream checked: a final marker written after the drain and
//!    everything else, once applied here, must find no source transaction
//!    committed after the first marker. One that did (an exempt session, a
//!    worker that bypasses `ALLOW_CONNECTIONS`) abandons the switchover.
//!
//! Every source session the switchover needs after step 2 is therefore
//! opened before it, one per database: markers, verification, and reading the
//! sequences, large objects and materialized views a database worker then
//! recreates here (from a file: it cannot connect to the source itself).

use super::incremental::stop_failure;
use super::task::Runner;
use super::txn::Failure;
use crate::catalog::tasks::TaskDatabase;
use crate::source::{quote_ident, quote_literal, Connection};

/// Databases a fence can be issued from, first that answers (never a
/// migrated one: ALLOW_CONNECTIONS cannot be turned off for one's own).
const CONTROL_DATABASES: [&str; 2] = ["template1", "postgres"];

/// The source sessions a switchover holds from before the fence to the cut.
pub struct Fence {
    /// One per migrated database, in the task's order.
    pub sessions: Vec<Connection>,
    /// A session in an unfenced database; None when none could be opened,
    /// and then the fence cannot refuse new connections.
    control: Option<Connection>,
}

impl Fence {
    /// Closes the sessions.
    pub fn close(self) {
        for session in self.sessions {
            session.close();
        }
        if let Some(control) = self.control {
            control.close();
        }
    }

    /// The session ALTER DATABASE statements go through.
    fn alter_session(&mut self) -> Option<&mut Connection> {
        match self.control.as_mut() {
            Some(control) => Some(control),
            None => self.sessions.first_mut(),
        }
    }
}

fn statements(databases: &[TaskDatabase], each: impl Fn(&str) -> String) -> String {
    databases
        .iter()
        .map(|d| each(&quote_ident(&d.datname)))
        .collect()
}

impl Runner {
    /// Opens every session the fenced switchover will need. Nothing is
    /// fenced yet: a failure here leaves the source as it was.
    pub(super) fn open_fence(&mut self, databases: &[TaskDatabase]) -> Result<Fence, Failure> {
        let mut fence = Fence {
            sessions: Vec::new(),
            control: None,
        };
        let opened = self.open_fence_sessions(databases, &mut fence);
        if let Err(failure) = opened {
            fence.close();
            return Err(failure);
        }
        if fence.control.is_none() {
            let _ = self.event(
                None,
                "warning",
                "no source database outside the migration (template1, postgres) accepted a \
                 connection, so the fence cannot refuse new connections to the migrated ones; \
                 a write that still reaches the stream before the cut-over abandons the \
                 switchover. Allow the migration account to connect to template1 on the source.",
            );
        }
        Ok(fence)
    }

    fn open_fence_sessions(
        &mut self,
        databases: &[TaskDatabase],
        fence: &mut Fence,
    ) -> Result<(), Failure> {
        for database in databases {
            let mut session = self
                .connect(&database.datname, false)
                .map_err(stop_failure)?;
            // The window's reads (every large object's digests, a changed
            // view's rows) are single statements that a statement_timeout
            // set for the account or the database would cut short.
            session
                .execute("SET statement_timeout = 0")
                .map_err(|e| Failure::from_source("preparing the switchover's sessions", &e))?;
            fence.sessions.push(session);
        }
        let migrated: Vec<&str> = databases.iter().map(|d| d.datname.as_str()).collect();
        fence.control = CONTROL_DATABASES
            .iter()
            .filter(|name| !migrated.contains(name))
            .find_map(|name| self.connect(name, false).ok());
        Ok(())
    }

    /// Fences the source: read-only by default, no new connection, and every
    /// other session on the migrated databases ended (see the module doc).
    pub(super) fn fence(
        &mut self,
        fence: &mut Fence,
        databases: &[TaskDatabase],
        terminate_sessions: bool,
        exempt_users: &[String],
    ) -> Result<(), Failure> {
        let mut sql = statements(databases, |name| {
            format!("ALTER DATABASE {name} SET default_transaction_read_only = on; ")
        });
        let refuse = fence.control.is_some();
        if refuse {
            sql.push_str(&statements(databases, |name| {
                format!("ALTER DATABASE {name} ALLOW_CONNECTIONS false; ")
            }));
        }
        let Some(session) = fence.alter_session() else {
            return Err(Failure::new("no source session to fence from"));
        };
        // One implicit transaction: when it fails, nothing changed.
        session
            .simple_query(&sql)
            .map_err(|e| Failure::from_source("fencing the source", &e))
            .map_err(|mut failure| {
                failure.hint = Some(
                    "the migration account must own the databases or be a superuser to fence them"
                        .into(),
                );
                failure
            })?;
        if !terminate_sessions {
            return Ok(());
        }
        let exempt_clause = if exempt_users.is_empty() {
            String::new()
        } else {
            let names: Vec<String> = exempt_users.iter().map(|u| quote_literal(u)).collect();
            format!(" AND a.usename NOT IN ({})", names.join(", "))
        };
        let ours: Vec<String> = fence
            .sessions
            .iter()
            .filter_map(Connection::backend_pid)
            .map(|pid| pid.to_string())
            .collect();
        for (index, database) in databases.iter().enumerate() {
            // Every backend signalled at once, then waited for until gone
            // (up to 10 s): one signalled mid-commit could otherwise commit
            // after the marker. (pg_terminate_backend's own wait looks first
            // and then sleeps 100 ms, one backend after another: 100 ms of
            // downtime per session.) A non-superuser account cannot end a
            // superuser's backend: those are left, counted, and covered by
            // the check after the drain.
            let rows = fence.sessions[index]
                .simple_query(&format!(
                    "SELECT count(*) FILTER (WHERE NOT signalable) AS spared, \
                            coalesce(pg_catalog.array_agg(pid) FILTER (WHERE CASE WHEN signalable \
                                       THEN pg_catalog.pg_terminate_backend(pid) ELSE false END), \
                                     '{{}}')::text AS ended \
                       FROM (SELECT a.pid, \
                                    pg_catalog.current_setting('is_superuser')::bool \
                                    OR a.usesysid IS NULL \
                                    OR NOT coalesce((SELECT r.rolsuper FROM pg_catalog.pg_roles r \
                                                      WHERE r.oid = a.usesysid), false) AS signalable \
                               FROM pg_catalog.pg_stat_activity a \
                              WHERE a.datname = pg_catalog.current_database() \
                                AND a.pid <> ALL ('{{{}}}'::int[]) \
                                AND a.backend_type NOT IN ('walsender', 'autovacuum worker'){exempt_clause}) s",
                    ours.join(",")
                ))
                .map_err(|e| {
                    Failure::from_source(
                        &format!(
                            "ending the sessions of source database {}",
                            database.datname
                        ),
                        &e,
                    )
                })?;
            let spared: i64 = rows
                .first()
                .and_then(|row| row.get("spared"))
                .and_then(|n| n.parse().ok())
                .unwrap_or(0);
            let ended = backend_pids(rows.first().and_then(|row| row.get("ended")));
            wait_until_gone(&mut fence.sessions[index], &ended).map_err(|e| {
                Failure::from_source(
                    &format!(
                        "waiting for the sessions of source database {} to end",
                        database.datname
                    ),
                    &e,
                )
            })?;
            if spared > 0 {
                let _ = self.event(
                    Some(&database.datname),
                    "warning",
                    &format!(
                        "{spared} superuser session(s) on source database {} could not be ended by \
                         the migration account; a write from one abandons the switchover",
                        database.datname
                    ),
                );
            }
        }
        Ok(())
    }

    /// Undoes the fence (the switchover was abandoned): writable again and
    /// connections allowed. Without `fence` (the worker died mid-switchover),
    /// connects afresh. Best effort; says what it could not undo.
    pub(super) fn unfence(&mut self, databases: &[TaskDatabase], fence: Option<&mut Fence>) {
        if databases.is_empty() {
            return;
        }
        let sql = statements(databases, |name| {
            format!(
                "ALTER DATABASE {name} RESET default_transaction_read_only; \
                 ALTER DATABASE {name} ALLOW_CONNECTIONS true; "
            )
        });
        let undone = match fence.and_then(Fence::alter_session) {
            Some(session) => session
                .simple_query(&sql)
                .map(|_| ())
                .map_err(|e| Failure::from_source("on the source", &e)),
            None => self.unfence_afresh(databases, &sql),
        };
        if let Err(failure) = undone {
            let _ = self.event(
                None,
                "error",
                &format!(
                    "could not make the source writable again ({failure}): on the source, run \
                     ALTER DATABASE ... RESET default_transaction_read_only and ALTER DATABASE \
                     ... ALLOW_CONNECTIONS true"
                ),
            );
        }
    }

    fn unfence_afresh(&mut self, databases: &[TaskDatabase], sql: &str) -> Result<(), Failure> {
        let migrated: Vec<&str> = databases.iter().map(|d| d.datname.as_str()).collect();
        let candidates = CONTROL_DATABASES
            .iter()
            .copied()
            .filter(|name| !migrated.contains(name))
            .chain(migrated.iter().copied());
        let mut last = Failure::new("no source database accepted a connection");
        for name in candidates {
            let mut connection = match self.connect(name, false) {
                Ok(connection) => connection,
                Err(stop) => {
                    last = stop_failure(stop);
                    continue;
                }
            };
            // A new session in a fenced database starts read-only itself.
            let result = connection
                .execute("SET default_transaction_read_only = off")
                .and_then(|_| connection.simple_query(sql))
                .map(|_| ())
                .map_err(|e| Failure::from_source("on the source", &e));
            connection.close();
            return result;
        }
        Err(last)
    }
}

/// Longest wait for the ended backends of one database to be gone.
const TERMINATION_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// Process ids in `int[]` text from the source (`{1,2}`), as numbers: they go
/// back into a statement, so nothing else from the source may.
fn backend_pids(text: Option<&str>) -> Vec<i32> {
    text.unwrap_or("")
        .trim_matches(|c| c == '{' || c == '}')
        .split(',')
        .filter_map(|pid| pid.trim().parse().ok())
        .collect()
}

/// Waits until none of `pids` is a backend of the source any more (its
/// transaction is over: a backend leaves pg_stat_activity after aborting
/// it), or [`TERMINATION_WAIT`] passed; one left then is covered by the check
/// after the drain, as a superuser's session is.
fn wait_until_gone(
    session: &mut Connection,
    pids: &[i32],
) -> Result<(), crate::source::SourceError> {
    if pids.is_empty() {
        return Ok(());
    }
    let list = pids
        .iter()
        .map(i32::to_string)
        .collect::<Vec<_>>()
        .join(",");
    let query = format!(
        "SELECT count(*) AS left FROM pg_catalog.pg_stat_activity WHERE pid = ANY ('{{{list}}}'::int[])"
    );
    let deadline = std::time::Instant::now() + TERMINATION_WAIT;
    loop {
        let rows = session.simple_query(&query)?;
        let gone = rows.first().and_then(|row| row.get("left")) == Some("0");
        if gone || std::time::Instant::now() >= deadline {
            return Ok(());
        }
        super::txn::nap(std::time::Duration::from_millis(2));
    }
}

impl Runner {
    /// Reads the database's sequences, what changed in its large objects
    /// since `known` (what the pass before the fence copied), and the rows
    /// of the materialized views whose state changed since `views` (read
    /// before that pass), through the fence's session into `path` (JSON
    /// lines; each view's rows in a file beside it) for a database worker's
    /// ApplyObjects job. Returns what the large objects' delta holds and how
    /// many views it has.
    pub(super) fn export_objects(
        &self,
        session: &mut Connection,
        known: &[crate::copy::objects::LargeObjectState],
        views: &[crate::copy::objects::MaterializedViewState],
        path: &std::path::Path,
    ) -> Result<(crate::copy::objects::LargeObjectCounts, usize), Failure> {
        use crate::copy::objects::{self, ObjectsError, SourceObject};
        use std::io::Write;
        let file = std::fs::File::create(path)
            .map_err(|e| Failure::new(format!("could not write {}: {e}", path.display())))?;
        let mut out = std::io::BufWriter::new(file);
        let mut write = |object: SourceObject| -> Result<(), ObjectsError> {
            let line =
                serde_json::to_string(&object).map_err(|e| ObjectsError::File(e.to_string()))?;
            writeln!(out, "{line}").map_err(|e| ObjectsError::File(e.to_string()))
        };
        let mut read = || -> Result<(objects::LargeObjectCounts, usize), ObjectsError> {
            objects::read_sequences(session, &mut write)?;
            let theirs = objects::source_large_objects(session, true)?;
            let counts = objects::large_object_delta(
                &theirs,
                known,
                &mut |oid, offset, length| objects::read_large_object(session, oid, offset, length),
                &mut write,
            )?;
            let mut changed = 0;
            for (index, view) in objects::materialized_view_states(session)?
                .into_iter()
                .filter(|view| !views.contains(view))
                .enumerate()
            {
                changed += 1;
                let rows = if view.populated {
                    let rows = path.with_extension(format!("view-{index}.copy"));
                    copy_to_file(session, &view, &rows)?;
                    Some(rows.display().to_string())
                } else {
                    None
                };
                write(SourceObject::MaterializedView {
                    schema: view.schema,
                    name: view.name,
                    populated: view.populated,
                    rows,
                })?;
            }
            Ok((counts, changed))
        };
        let counts = read().map_err(|e| {
            Failure::new(format!(
                "reading sequences and large objects on the source: {e}"
            ))
        })?;
        out.flush()
            .map_err(|e| Failure::new(format!("could not write {}: {e}", path.display())))?;
        Ok(counts)
    }
}

/// Writes materialized view `view`'s rows on the source (COPY text) to `path`.
fn copy_to_file(
    session: &mut Connection,
    view: &crate::copy::objects::MaterializedViewState,
    path: &std::path::Path,
) -> Result<(), crate::copy::objects::ObjectsError> {
    use crate::copy::objects::{materialized_view_copy, ObjectsError};
    use std::io::Write;
    let failed = |e: std::io::Error| ObjectsError::File(format!("{}: {e}", path.display()));
    let mut out = std::io::BufWriter::new(std::fs::File::create(path).map_err(failed)?);
    let mut copy = session.copy_out(&materialized_view_copy(&view.schema, &view.name))?;
    while let Some(chunk) = copy.next_chunk()? {
        out.write_all(&chunk).map_err(failed)?;
    }
    out.flush().map_err(failed)
}

#[cfg(test)]
mod tests {
    use super::backend_pids;

    #[test]
    fn only_numbers_from_the_source_become_process_ids() {
        assert_eq!(backend_pids(Some("{12,345}")), vec![12, 345]);
        assert_eq!(backend_pids(Some("{}")), Vec::<i32>::new());
        assert_eq!(backend_pids(None), Vec::<i32>::new());
        assert_eq!(backend_pids(Some("{1,2); DROP TABLE t; --}")), vec![1]);
    }
}
