//! Removing what a task created on the source: its replication slots (the
//! permanent ones and any temporary one left by a dying connection) and its
//! publications; and here, its replication origins. Used by `cloudmig.cancel()` and after a switchover (when the
//! source databases are fenced read-only), from a backend or a worker; plain
//! source-client calls, no worker machinery.

use crate::catalog::tasks;
use crate::source::{quote_ident, quote_literal, ConnInfo, ConnectOptions, Connection};

/// Drops the task's slots and publications on the source; returns a line
/// per thing that could not be dropped (the source is down, say), so the
/// caller can tell the DBA what to drop by hand.
pub fn drop_source_objects(
    info: &ConnInfo,
    task_id: i64,
    databases: &[String],
    interrupt_check: fn(),
) -> Vec<String> {
    let mut problems = Vec::new();
    let publication = tasks::publication_name(task_id);
    for (index, database) in databases.iter().enumerate() {
        let mut options = ConnectOptions::new();
        options.interrupt_check = Some(Box::new(interrupt_check));
        options.io_timeout = crate::guc::source_timeout();
        let mut connection = match Connection::connect(&info.with_dbname(database), options) {
            Ok(connection) => connection,
            Err(error) => {
                problems.push(format!(
                    "could not connect to source database {database} to drop publication \
                     {publication}{}: {error}",
                    if index == 0 {
                        " and the task's replication slots"
                    } else {
                        ""
                    }
                ));
                continue;
            }
        };
        // After a switchover the source databases are fenced: a new session
        // starts read-only, and DROP PUBLICATION would be refused.
        if let Err(error) = connection.execute("SET default_transaction_read_only = off") {
            problems.push(format!(
                "could not drop publication {publication} in {database}: {error}"
            ));
            connection.close();
            continue;
        }
        problems.extend(drop_with(&mut connection, task_id, database, index == 0));
        connection.close();
    }
    problems
}

/// Drops the task's publication in `database` through `connection` (a
/// writable session there), and with `slots` the task's replication slots
/// (they live in the instance, not in one database); returns the problems.
pub fn drop_with(
    connection: &mut Connection,
    task_id: i64,
    database: &str,
    slots: bool,
) -> Vec<String> {
    let mut problems = Vec::new();
    let slot_prefix = format!("cloudmig\\_{task_id}\\_%");
    let publication = tasks::publication_name(task_id);
    if slots {
        let dropped = connection.simple_query(&format!(
            "SELECT pg_catalog.pg_drop_replication_slot(slot_name) \
               FROM pg_catalog.pg_replication_slots WHERE slot_name LIKE {}",
            quote_literal(&slot_prefix)
        ));
        if let Err(error) = dropped {
            problems.push(format!(
                "could not drop the replication slots cloudmig_{task_id}_*: {error}"
            ));
        }
    }
    if let Err(error) = connection.execute(&format!(
        "DROP PUBLICATION IF EXISTS {}",
        quote_ident(&publication)
    )) {
        problems.push(format!(
            "could not drop publication {publication} in {database}: {error}"
        ));
    }
    problems
}

/// Drops the task's replication origins here (`cloudmig_<task>_<n>`, one per
/// source database), in the caller's transaction; returns how many went. The
/// apply workers must have stopped: PostgreSQL refuses to drop an origin in use.
pub fn drop_origins(task_id: i64) -> Result<i64, pgrx::spi::Error> {
    Ok(crate::catalog::first_value::<i64>(
        "SELECT pg_catalog.count(*) FROM ( \
             SELECT pg_catalog.pg_replication_origin_drop(roname) \
               FROM pg_catalog.pg_replication_origin WHERE roname LIKE $1) dropped",
        &[format!("cloudmig\\_{task_id}\\_%").into()],
    )?
    .unwrap_or(0))
}
