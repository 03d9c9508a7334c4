//! Gathers what the assessment needs to know about the source server.
//!
//! Only reads: one connection to the database named in the conninfo (or the
//! account's default) for the instance-wide facts, one per other database for
//! the per-database facts, and one replication connection. Every failure is
//! kept as a fact (a database that refuses us is itself a finding), so one
//! bad database does not hide the rest of the report.

use crate::source::{ConnInfo, ConnectOptions, Connection, Row, SourceError, SystemIdentity};
use std::collections::HashMap;
use std::time::Duration;

const DATABASES_SQL: &str = include_str!("sql/source_databases.sql");
const WITHOUT_IDENTITY_SQL: &str = include_str!("sql/source_tables_without_identity.sql");
const UNREADABLE_SQL: &str = include_str!("sql/source_unreadable_relations.sql");
const UNLOGGED_SQL: &str = include_str!("sql/source_unlogged_tables.sql");
const LONG_TRANSACTIONS_SQL: &str = include_str!("sql/source_long_transactions.sql");
const UNPUBLISHABLE_SQL: &str = include_str!("sql/source_unpublishable_tables.sql");

/// The settings the checks read, by name.
pub const SETTINGS: &[&str] = &[
    "wal_level",
    "max_replication_slots",
    "max_wal_senders",
    "max_slot_wal_keep_size",
    "output_plugin_libraries",
    "max_connections",
    "superuser_reserved_connections",
];

/// The oldest major version cloudmig migrates from (logical replication with
/// pgoutput and `pg_monitor` arrived in 10).
pub const MIN_VERSION_NUM: i32 = 100000;

/// How gathering is tuned.
pub struct GatherOptions {
    /// Longest wait for any reply.
    pub io_timeout: Duration,
    /// Open transactions older than this are reported.
    pub long_transaction_seconds: u32,
    /// Called at least every 100 ms while waiting on the network; may unwind
    /// (statement cancelled).
    pub interrupt_check: fn(),
    /// Refuse a source that let us in without a password (callers that are
    /// not superusers must not borrow the server's own identity, e.g. trust
    /// or peer authentication on this host, as postgres_fdw also refuses).
    pub require_password: bool,
}

/// What the source told us, or why it could not.
#[derive(Debug)]
pub enum SourceSurvey {
    /// Not even the first connection worked.
    Unreachable(SourceError),
    /// Connected, but without a password while one is required.
    PasswordNotRequested,
    /// Connected, but the server is older than [`MIN_VERSION_NUM`]: nothing
    /// else is gathered (the catalogs differ).
    TooOld {
        version: String,
        version_num: i32,
    },
    Reached(Box<SourceFacts>),
}

/// The migration account's attributes.
#[derive(Debug, Clone, Default)]
pub struct Account {
    pub name: String,
    pub superuser: bool,
    pub replication: bool,
    pub createrole: bool,
    pub pg_monitor: bool,
}

/// An existing replication slot on the source.
#[derive(Debug, Clone)]
pub struct Slot {
    pub name: String,
    pub database: Option<String>,
    pub active: bool,
}

/// Instance-wide facts.
#[derive(Debug)]
pub struct SourceFacts {
    /// host:port, and whether TLS protected the connection, for messages.
    pub target: String,
    pub version: String,
    pub version_num: i32,
    pub account: Account,
    pub settings: HashMap<String, String>,
    /// The result of opening a replication connection and IDENTIFY_SYSTEM.
    pub replication: Result<SystemIdentity, SourceError>,
    pub databases: Vec<SourceDatabase>,
    pub slots: Vec<Slot>,
    pub walsenders_in_use: i64,
    pub connections_in_use: i64,
    pub long_transactions: Vec<String>,
    pub prepared_transactions: Vec<String>,
    pub tablespaces: Vec<String>,
    /// How long one exchange with the source takes (the shortest of a few).
    pub round_trip: Duration,
}

impl SourceFacts {
    /// A setting as an integer, if present and numeric.
    pub fn setting_i64(&self, name: &str) -> Option<i64> {
        self.settings.get(name).and_then(|v| v.trim().parse().ok())
    }

    /// Total size of the databases a migration copies (those we could size).
    pub fn total_size_bytes(&self) -> u64 {
        self.databases
            .iter()
            .filter_map(|d| d.size_bytes)
            .map(|s| s.max(0) as u64)
            .sum()
    }
}

/// One source database.
#[derive(Debug)]
pub struct SourceDatabase {
    pub name: String,
    pub encoding: String,
    pub collate: String,
    pub ctype: String,
    /// `c` (libc) or `i` (ICU).
    pub locale_provider: String,
    pub icu_locale: Option<String>,
    pub can_connect: bool,
    /// Whether the account has its owner's privileges (needed to fence it).
    pub owned: bool,
    pub size_bytes: Option<i64>,
    /// What a connection to it found, or why connecting failed.
    pub contents: Result<DatabaseContents, SourceError>,
}

/// Facts that live inside one database.
#[derive(Debug, Clone, Default)]
pub struct DatabaseContents {
    pub without_identity: Vec<String>,
    pub unlogged: Vec<String>,
    pub unreadable: Vec<String>,
    pub large_objects: i64,
    pub cloudmig_publications: Vec<String>,
    /// (name, version) of every installed extension.
    pub extensions: Vec<(String, String)>,
    /// Whether the account may create a publication here (CREATE on the database).
    pub can_create: bool,
    /// Tables whose owner's privileges the account lacks (it cannot publish them).
    pub unpublishable: Vec<String>,
}

fn connect(
    info: &ConnInfo,
    options: &GatherOptions,
    replication: bool,
) -> Result<Connection, SourceError> {
    let mut connect_options = ConnectOptions::new();
    connect_options.io_timeout = options.io_timeout;
    connect_options.replication = replication;
    connect_options.interrupt_check = Some(Box::new(options.interrupt_check));
    Connection::connect(info, connect_options)
}

/// Asks the source everything the checks need.
pub fn gather(info: &ConnInfo, options: GatherOptions) -> SourceSurvey {
    let mut first = match connect(info, &options, false) {
        Ok(connection) => connection,
        Err(error) => return SourceSurvey::Unreachable(error),
    };
    if options.require_password && !first.used_password() {
        first.close();
        return SourceSurvey::PasswordNotRequested;
    }
    let version_num = first.server_version_num().unwrap_or(0);
    let version = first
        .parameter("server_version")
        .unwrap_or("unknown")
        .to_string();
    if version_num < MIN_VERSION_NUM {
        return SourceSurvey::TooOld {
            version,
            version_num,
        };
    }
    match gather_instance(info, &mut first, &options, version, version_num) {
        Ok(facts) => SourceSurvey::Reached(Box::new(facts)),
        Err(error) => SourceSurvey::Unreachable(error),
    }
}

fn gather_instance(
    info: &ConnInfo,
    first: &mut Connection,
    options: &GatherOptions,
    version: String,
    version_num: i32,
) -> Result<SourceFacts, SourceError> {
    let round_trip = round_trip(first)?;
    let account_row = first
        .simple_query(
            "SELECT r.rolname, r.rolsuper, r.rolreplication, r.rolcreaterole, \
                    pg_catalog.pg_has_role(current_user, 'pg_monitor', 'USAGE') AS pg_monitor \
               FROM pg_catalog.pg_roles r WHERE r.rolname = current_user",
        )?
        .into_iter()
        .next();
    let account = match account_row {
        Some(row) => Account {
            name: row.get("rolname").unwrap_or_default().to_string(),
            superuser: row.get_bool("rolsuper")?,
            replication: row.get_bool("rolreplication")?,
            createrole: row.get_bool("rolcreaterole")?,
            pg_monitor: row.get_bool("pg_monitor")?,
        },
        None => Account::default(),
    };

    let names = SETTINGS
        .iter()
        .map(|s| format!("'{s}'"))
        .collect::<Vec<_>>()
        .join(", ");
    let settings = first
        .simple_query(&format!(
            "SELECT name, setting FROM pg_catalog.pg_settings WHERE name IN ({names})"
        ))?
        .iter()
        .filter_map(|row| {
            Some((
                row.get("name")?.to_string(),
                row.get("setting")?.to_string(),
            ))
        })
        .collect();

    let slots = first
        .simple_query(
            "SELECT slot_name, database, active FROM pg_catalog.pg_replication_slots ORDER BY 1",
        )?
        .iter()
        .map(|row| {
            Ok(Slot {
                name: row.get("slot_name").unwrap_or_default().to_string(),
                database: row.get("database").map(str::to_string),
                active: row.get_bool("active")?,
            })
        })
        .collect::<Result<_, SourceError>>()?;

    let activity = first
        .simple_query(
            "SELECT count(*) FILTER (WHERE backend_type = 'walsender') AS walsenders, \
                    count(*) FILTER (WHERE backend_type = 'client backend') AS clients \
               FROM pg_catalog.pg_stat_activity",
        )?
        .into_iter()
        .next();
    let (walsenders_in_use, connections_in_use) = match activity {
        Some(row) => (row.parse("walsenders")?, row.parse("clients")?),
        None => (0, 0),
    };

    let long_transactions = names_of(
        first.simple_query(
            &LONG_TRANSACTIONS_SQL
                .replace("%THRESHOLD%", &options.long_transaction_seconds.to_string()),
        )?,
    );
    let prepared_transactions = names_of(first.simple_query(
        "SELECT pg_catalog.format('%s (database %s, owner %s, prepared %s)', gid, database, owner, \
                pg_catalog.date_trunc('second', prepared)) AS name \
           FROM pg_catalog.pg_prepared_xacts ORDER BY prepared",
    )?);
    let tablespaces = names_of(first.simple_query(
        "SELECT spcname AS name FROM pg_catalog.pg_tablespace \
          WHERE spcname NOT IN ('pg_default', 'pg_global') ORDER BY 1",
    )?);

    let replication = connect(info, options, true).and_then(|mut replication| {
        let identity = replication.identify_system();
        replication.close();
        identity
    });

    let first_database = first
        .simple_query("SELECT current_database() AS name")?
        .into_iter()
        .next()
        .and_then(|row| row.get("name").map(str::to_string));

    let mut databases = Vec::new();
    for row in first.simple_query(DATABASES_SQL)? {
        let name = row.get("datname").unwrap_or_default().to_string();
        let can_connect = row.get_bool("can_connect")?;
        let contents = if first_database.as_deref() == Some(name.as_str()) {
            database_contents(first)
        } else {
            connect(&info.with_dbname(&name), options, false).and_then(|mut connection| {
                let contents = database_contents(&mut connection);
                connection.close();
                contents
            })
        };
        databases.push(SourceDatabase {
            encoding: row.get("encoding").unwrap_or_default().to_string(),
            collate: row.get("datcollate").unwrap_or_default().to_string(),
            ctype: row.get("datctype").unwrap_or_default().to_string(),
            locale_provider: row.get("locale_provider").unwrap_or("c").to_string(),
            icu_locale: row.get("icu_locale").map(str::to_string),
            size_bytes: row.get("size_bytes").and_then(|s| s.parse().ok()),
            can_connect,
            owned: row.get_bool("owned")?,
            contents,
            name,
        });
    }

    // Say how the first connection was protected; the others use the same conninfo.
    let transport = match (first.tls_in_use(), first.server_verified()) {
        (true, true) => " over TLS (server certificate verified)",
        (true, false) => " over TLS (server certificate not verified)",
        (false, _) => "",
    };
    Ok(SourceFacts {
        target: format!("{}{transport}", info.display_target()),
        version,
        version_num,
        account,
        settings,
        replication,
        databases,
        slots,
        walsenders_in_use,
        connections_in_use,
        long_transactions,
        prepared_transactions,
        tablespaces,
        round_trip,
    })
}

/// Exchanges timed to tell how far the source is.
const ROUND_TRIP_SAMPLES: usize = 5;

/// The shortest of a few trivial queries' exchanges with the source: the
/// network's round trip, without the moments either side was busy elsewhere.
fn round_trip(connection: &mut Connection) -> Result<Duration, SourceError> {
    let mut shortest = Duration::MAX;
    for _ in 0..ROUND_TRIP_SAMPLES {
        let started = std::time::Instant::now();
        connection.simple_query("SELECT 1")?;
        shortest = shortest.min(started.elapsed());
    }
    Ok(shortest)
}

fn database_contents(connection: &mut Connection) -> Result<DatabaseContents, SourceError> {
    let large_objects = connection
        .simple_query("SELECT count(*) AS n FROM pg_catalog.pg_largeobject_metadata")?
        .into_iter()
        .next()
        .map(|row| row.parse::<i64>("n"))
        .transpose()?
        .unwrap_or(0);
    let extensions = connection
        .simple_query("SELECT extname, extversion FROM pg_catalog.pg_extension ORDER BY 1")?
        .iter()
        .filter_map(|row| {
            Some((
                row.get("extname")?.to_string(),
                row.get("extversion")?.to_string(),
            ))
        })
        .collect();
    let can_create = connection
        .simple_query(
            "SELECT pg_catalog.has_database_privilege(current_database(), 'CREATE') AS can_create",
        )?
        .first()
        .map(|row| row.get("can_create") == Some("t"))
        .unwrap_or(false);
    let unpublishable = names_of(connection.simple_query(UNPUBLISHABLE_SQL)?);
    Ok(DatabaseContents {
        can_create,
        unpublishable,
        without_identity: names_of(connection.simple_query(WITHOUT_IDENTITY_SQL)?),
        unlogged: names_of(connection.simple_query(UNLOGGED_SQL)?),
        unreadable: names_of(connection.simple_query(UNREADABLE_SQL)?),
        large_objects,
        cloudmig_publications: names_of(connection.simple_query(
            "SELECT pubname AS name FROM pg_catalog.pg_publication \
              WHERE pubname LIKE 'cloudmig%' ORDER BY 1",
        )?),
        extensions,
    })
}

/// The `name` column of every row.
fn names_of(rows: Vec<Row>) -> Vec<String> {
    rows.iter()
        .filter_map(|row| row.get("name").map(str::to_string))
        .collect()
}

/// A source database a migration would copy, with its size when readable.
#[derive(Debug, Clone)]
pub struct SourceDatabaseName {
    pub name: String,
    pub size_bytes: Option<i64>,
}

/// The databases a migration copies (as the assessment lists them), read now.
pub fn database_names(connection: &mut Connection) -> Result<Vec<SourceDatabaseName>, SourceError> {
    Ok(connection
        .simple_query(DATABASES_SQL)?
        .iter()
        .map(|row| SourceDatabaseName {
            name: row.get("datname").unwrap_or_default().to_string(),
            size_bytes: row.get("size_bytes").and_then(|s| s.parse().ok()),
        })
        .collect())
}
