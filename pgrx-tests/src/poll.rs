//! Waiting for asynchronous outcomes (workers, replication, reloads) by polling a query: the
//! harness's only sleeps are the back-off between polls here.

use std::thread;
use std::time::{Duration, Instant};

use postgres::error::SqlState;
use postgres::{Client, SimpleQueryMessage};

use crate::cluster::{describe, Cluster};

/// First poll interval; doubled after each miss up to [`MAX_INTERVAL`].
const FIRST_INTERVAL: Duration = Duration::from_millis(20);
/// Longest pause between two polls.
const MAX_INTERVAL: Duration = Duration::from_millis(250);

/// Polls `query` in `db` until its first column of the first row, as text, equals `expected`;
/// returns that value. Panics after `timeout` with the query and the last value seen.
///
/// Values are rendered by the server's text output (a simple query): `t`/`f` for booleans,
/// `<NULL>` for SQL NULL, `<no rows>` when the query returns none. SQL and connection errors are
/// retried (a table or a restarting server may not be there yet) and shown as the last value;
/// only a syntax error fails at once, since no wait can fix it.
pub fn poll_until(
    cluster: &Cluster,
    db: &str,
    query: &str,
    expected: &str,
    timeout: Duration,
) -> String {
    let deadline = Instant::now() + timeout;
    let mut interval = FIRST_INTERVAL;
    let mut client: Option<Client> = None;
    let mut polls = 0u32;
    loop {
        polls += 1;
        let last = match poll_once(cluster, db, query, &mut client) {
            Ok(value) if value == expected => return value,
            Ok(value) => value,
            Err(error) => {
                if error.code() == Some(&SqlState::SYNTAX_ERROR) {
                    panic!(
                        "poll_until: invalid query on cluster {}: {}\nquery: {query}",
                        cluster.name,
                        describe(&error)
                    );
                }
                // A broken connection is replaced on the next poll; a SQL error leaves it usable.
                if client.as_ref().is_some_and(Client::is_closed) || error.as_db_error().is_none() {
                    client = None;
                }
                format!("<error: {}>", describe(&error))
            }
        };
        let now = Instant::now();
        if now >= deadline {
            panic!(
                "poll_until timed out after {timeout:?} ({polls} polls) on cluster {} database {db}\n\
                 query: {query}\nexpected: {expected:?}\nlast value: {last:?}",
                cluster.name
            );
        }
        thread::sleep(interval.min(deadline - now));
        interval = (interval * 2).min(MAX_INTERVAL);
    }
}

fn poll_once(
    cluster: &Cluster,
    db: &str,
    query: &str,
    client: &mut Option<Client>,
) -> Result<String, postgres::Error> {
    let client = match client {
        Some(client) => client,
        None => client.insert(cluster.try_client(db)?),
    };
    for message in client.simple_query(query)? {
        if let SimpleQueryMessage::Row(row) = message {
            return Ok(row.try_get(0)?.unwrap_or("<NULL>").to_owned());
        }
    }
    Ok("<no rows>".to_owned())
}
