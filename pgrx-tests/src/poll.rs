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
    match poll(cluster, db, query, expected, timeout, None) {
        Ok(value) => value,
        Err(timed_out) => panic!("{timed_out}"),
    }
}

/// [`poll_until`] for measurements: polls every `interval` (no back-off, so the moment the value
/// shows is known within `interval`) and returns `Err` on timeout instead of panicking, so a
/// caller can report what did not finish. An invalid query still panics.
pub fn try_poll_every(
    cluster: &Cluster,
    db: &str,
    query: &str,
    expected: &str,
    timeout: Duration,
    interval: Duration,
) -> Result<String, PollTimeout> {
    poll(cluster, db, query, expected, timeout, Some(interval))
}

/// A [`try_poll_every`] that did not see its value in time.
#[derive(Debug, Clone)]
pub struct PollTimeout {
    /// The message [`poll_until`] panics with: query, expected and last value.
    pub message: String,
    /// The last value seen, rendered as in [`poll_until`].
    pub last: String,
}

impl std::fmt::Display for PollTimeout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for PollTimeout {}

fn poll(
    cluster: &Cluster,
    db: &str,
    query: &str,
    expected: &str,
    timeout: Duration,
    fixed_interval: Option<Duration>,
) -> Result<String, PollTimeout> {
    let deadline = Instant::now() + timeout;
    let mut interval = fixed_interval.unwrap_or(FIRST_INTERVAL);
    let mut client: Option<Client> = None;
    let mut polls = 0u32;
    loop {
        polls += 1;
        let last = match poll_once(cluster, db, query, &mut client) {
            Ok(value) if value == expected => return Ok(value),
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
            return Err(PollTimeout {
                message: format!(
                    "poll_until timed out after {timeout:?} ({polls} polls) on cluster {} database {db}\n\
                     query: {query}\nexpected: {expected:?}\nlast value: {last:?}",
                    cluster.name
                ),
                last,
            });
        }
        thread::sleep(interval.min(deadline - now));
        if fixed_interval.is_none() {
            interval = (interval * 2).min(MAX_INTERVAL);
        }
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
