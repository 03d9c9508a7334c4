//! Judges gathered facts: one function per check, each returning a verdict,
//! a detail that names what it saw, and a fix a DBA can act on.
//!
//! No I/O here. The check names are stable (dashboards and the README use
//! them) and [`evaluate`] emits them in a fixed order.

use super::destination_facts::DestinationFacts;
use super::source_facts::{SourceDatabase, SourceFacts, SourceSurvey};
use super::{name_list, pretty_bytes, CheckResult, Report};
use crate::source::SourceError;
use std::time::Duration;

/// Names of objects shown in a detail before "and N more".
const LIST_LIMIT: usize = 10;

/// Knobs the judging depends on (from GUCs and assess options).
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub copy_workers: u32,
    pub disk_headroom_percent: u32,
}

/// Turns facts into the ordered list of check results.
pub fn evaluate(survey: &SourceSurvey, dest: &DestinationFacts, limits: Limits) -> Report {
    let mut checks = Vec::new();
    match survey {
        SourceSurvey::Unreachable(error) => {
            checks.push(source_connection_failed(error));
            checks.extend(destination_checks(dest, None, limits));
        }
        SourceSurvey::PasswordNotRequested => {
            // The API refuses this before judging; kept total for safety.
            checks.push(CheckResult::fail(
                "source_connection",
                "the source did not ask for a password",
                "use an account that authenticates with a password",
            ));
        }
        SourceSurvey::TooOld {
            version,
            version_num,
        } => {
            checks.push(CheckResult::pass(
                "source_connection",
                "connected and authenticated",
            ));
            checks.push(server_version(version, *version_num, dest));
            checks.extend(destination_checks(dest, None, limits));
        }
        SourceSurvey::Reached(source) => {
            checks.push(CheckResult::pass(
                "source_connection",
                format!(
                    "connected to {} as {} (PostgreSQL {})",
                    source.target, source.account.name, source.version
                ),
            ));
            checks.push(server_version(&source.version, source.version_num, dest));
            if let Some(check) = source_is_not_destination(source, dest) {
                checks.push(check);
            }
            checks.extend(destination_checks(dest, Some(source), limits));
            checks.push(account_privileges(source));
            checks.push(role_passwords(source));
            checks.push(database_access(source));
            checks.push(table_access(source));
            checks.push(wal_level(source));
            checks.push(replication_slots(source));
            checks.push(wal_senders(source));
            checks.push(connection_capacity(source, limits));
            checks.push(round_trip(source, limits));
            checks.push(output_plugin(source));
            checks.push(slot_wal_keep_size(source));
            checks.push(replication_connection(source));
            checks.push(publication_rights(source));
            checks.push(switchover_fence(source));
            checks.push(no_concurrent_migration(source, dest));
            checks.push(extensions_available(source, dest));
            checks.push(encodings_and_locales(source, dest));
            checks.push(tables_without_replica_identity(source));
            checks.push(unlogged_tables(source));
            checks.push(large_objects(source));
            checks.push(long_transactions(source));
            checks.push(prepared_transactions(source));
            checks.push(tablespaces(source));
        }
    }
    Report { checks }
}

fn source_connection_failed(error: &SourceError) -> CheckResult {
    let fix = match error {
        SourceError::HostNotFound { .. } => {
            "check the host name in the connection string, or use the source's IP address"
                .to_string()
        }
        SourceError::ConnectionRefused { .. } => "check that the source server is running on that \
             host and port, and that its listen_addresses includes the address cloudmig connects to"
            .to_string(),
        SourceError::Unreachable { .. } => "check the network route (firewall, security group, \
             VPC peering) between this server and the source, or the socket directory"
            .to_string(),
        SourceError::Timeout { .. } => "the source did not answer in time: check firewalls that \
             drop packets, the source's load, or raise connect_timeout in the connection string"
            .to_string(),
        SourceError::AuthenticationFailed { .. } => "check the user name and password of the \
             migration account, and that pg_hba.conf on the source allows it from this server's \
             address with a password method (scram-sha-256 or md5)"
            .to_string(),
        SourceError::PasswordRequired { .. } => {
            "the source asks for a password: add password=... or passfile=... to the connection string"
                .to_string()
        }
        SourceError::TlsRefused { .. } => "the source does not offer TLS: turn on ssl in its \
             postgresql.conf (with a certificate), or use sslmode=prefer on a private network"
            .to_string(),
        SourceError::Tls { .. } | SourceError::TlsConfig { .. } => error
            .hint()
            .unwrap_or_else(|| "check the TLS settings of the connection string".to_string()),
        SourceError::AuthenticationRefused { .. } => "the source asked for a password in a way \
             that would expose it to anyone in between: use scram-sha-256 on the source, or \
             connect with sslmode=verify-full and sslrootcert, or allow the method explicitly \
             with require_auth=md5 (or password)"
            .to_string(),
        SourceError::UnsupportedAuthentication { .. } => "allow the migration account with \
             scram-sha-256, md5, password or trust in the source's pg_hba.conf"
            .to_string(),
        SourceError::Server(server) if server.code == "3D000" => {
            "name an existing database with dbname=... (postgres usually exists)".to_string()
        }
        SourceError::Server(server) if server.code == "28000" => {
            "add a pg_hba.conf line on the source for this server's address and the migration \
             account, then reload the source (SELECT pg_reload_conf())"
                .to_string()
        }
        SourceError::Server(server) if server.code == "53300" => {
            "the source has no free connection slots: close idle sessions or raise max_connections"
                .to_string()
        }
        _ => "check the connection string and the source server's log".to_string(),
    };
    CheckResult::fail(
        "source_connection",
        format!("{error}; the source checks were not run"),
        fix,
    )
}

fn major(version_num: i32) -> i32 {
    if version_num >= 100000 {
        version_num / 10000
    } else {
        version_num / 100
    }
}

fn server_version(source_version: &str, source_num: i32, dest: &DestinationFacts) -> CheckResult {
    let name = "server_version";
    let (source_major, dest_major) = (major(source_num), major(dest.version_num));
    if source_num < 100000 {
        CheckResult::fail(
            name,
            format!("the source runs PostgreSQL {source_version}; cloudmig needs 10 or later"),
            "upgrade the source to a supported major version first (pg_upgrade)",
        )
    } else if source_major != dest_major {
        CheckResult::fail(
            name,
            format!(
                "the source runs PostgreSQL {source_version} and this destination {}; both must \
                 run the same major version",
                dest.version
            ),
            format!("migrate into a destination running PostgreSQL {source_major}"),
        )
    } else {
        CheckResult::pass(
            name,
            format!(
                "source {source_version}, destination {} (same major {source_major})",
                dest.version
            ),
        )
    }
}

fn source_is_not_destination(source: &SourceFacts, dest: &DestinationFacts) -> Option<CheckResult> {
    let identity = source.replication.as_ref().ok()?;
    let name = "source_is_not_destination";
    Some(if identity.systemid == dest.system_identifier {
        CheckResult::fail(
            name,
            format!(
                "the source {} is this very instance (system identifier {})",
                source.target, identity.systemid
            ),
            "point the connection string at the source server, not at the destination",
        )
    } else {
        CheckResult::pass(
            name,
            format!(
                "source system identifier {}, destination {}",
                identity.systemid, dest.system_identifier
            ),
        )
    })
}

fn destination_checks(
    dest: &DestinationFacts,
    source: Option<&SourceFacts>,
    limits: Limits,
) -> Vec<CheckResult> {
    vec![
        destination_is_primary(dest),
        destination_is_empty(dest),
        destination_disk_space(dest, source, limits),
        destination_preload(dest),
        destination_worker_capacity(dest, source, limits),
        destination_replication_origins(dest, source),
        databases_per_task(source),
    ]
}

/// A task streams each source database with an apply worker of its own, in
/// one of a fixed number of shared-memory slots: more databases than that
/// would be refused only at catch-up, after the whole copy.
fn databases_per_task(source: Option<&SourceFacts>) -> CheckResult {
    let name = "databases_per_task";
    let databases = source.map(|s| s.databases.len()).unwrap_or(1);
    let limit = crate::worker::shared::MAX_JOB_SLOTS;
    let detail =
        format!("{databases} database(s) to migrate; a task streams at most {limit} at once");
    if databases > limit {
        CheckResult::fail(
            name,
            detail,
            format!(
                "migrate them in several tasks of at most {limit} databases each: \
                 cloudmig.start(<assessment>, '{{\"databases\": [...]}}'), one after the other"
            ),
        )
    } else {
        CheckResult::pass(name, detail)
    }
}

fn destination_is_primary(dest: &DestinationFacts) -> CheckResult {
    if dest.in_recovery {
        CheckResult::fail(
            "destination_is_primary",
            "this instance is a standby (in recovery); a migration writes here",
            "install cloudmig on the primary and run the migration there",
        )
    } else {
        CheckResult::pass("destination_is_primary", "this instance is a primary")
    }
}

fn destination_is_empty(dest: &DestinationFacts) -> CheckResult {
    let name = "destination_is_empty";
    let mut problems = Vec::new();
    let mut unknown = Vec::new();
    if !dest.extra_databases.is_empty() {
        problems.push(format!(
            "databases besides the defaults and {}: {}",
            dest.control_database,
            name_list(&dest.extra_databases, LIST_LIMIT)
        ));
    }
    for inspection in &dest.inspections {
        match &inspection.objects {
            Ok(objects) if objects.count > 0 => problems.push(format!(
                "database {} holds {} user object(s): {}{}",
                inspection.name,
                objects.count,
                objects.sample,
                if objects.count > 10 { ", ..." } else { "" }
            )),
            Ok(_) => {}
            Err(error) => unknown.push(format!("database {}: {error}", inspection.name)),
        }
    }
    if !problems.is_empty() {
        CheckResult::fail(
            name,
            problems.join("; "),
            "migrate into an empty instance: drop the listed databases and objects (or use a \
             freshly initialised destination); cloudmig's own objects do not count",
        )
    } else if !unknown.is_empty() {
        CheckResult::warn(
            name,
            format!("could not inspect {}", unknown.join("; ")),
            "free a background worker slot (max_worker_processes) and assess again",
        )
    } else {
        let inspected: Vec<String> = dest.inspections.iter().map(|i| i.name.clone()).collect();
        CheckResult::pass(
            name,
            format!(
                "no user databases, and no user objects in {}",
                inspected.join(", ")
            ),
        )
    }
}

fn destination_disk_space(
    dest: &DestinationFacts,
    source: Option<&SourceFacts>,
    limits: Limits,
) -> CheckResult {
    let name = "destination_disk_space";
    let free = match &dest.free_disk_bytes {
        Ok(free) => *free,
        Err(error) => {
            return CheckResult::warn(
                name,
                format!(
                    "could not measure free space of {}: {error}",
                    dest.data_directory
                ),
                "check the free space of the data directory's file system by hand",
            )
        }
    };
    let Some(source) = source else {
        return CheckResult::pass(
            name,
            format!(
                "{} free on {} (source size unknown)",
                pretty_bytes(free),
                dest.data_directory
            ),
        );
    };
    let size = source.total_size_bytes();
    let needed = size.saturating_mul(100 + limits.disk_headroom_percent as u64) / 100;
    let unsized_databases: Vec<String> = source
        .databases
        .iter()
        .filter(|d| d.size_bytes.is_none())
        .map(|d| d.name.clone())
        .collect();
    if free < needed {
        CheckResult::fail(
            name,
            format!(
                "the source holds {} and the destination needs {} with {}% headroom, but only {} \
                 is free on {}",
                pretty_bytes(size),
                pretty_bytes(needed),
                limits.disk_headroom_percent,
                pretty_bytes(free),
                dest.data_directory
            ),
            format!(
                "grow the destination's storage by at least {}, or free space on it",
                pretty_bytes(needed - free)
            ),
        )
    } else if !unsized_databases.is_empty() {
        CheckResult::warn(
            name,
            format!(
                "{} free; could not size databases {} (the account lacks CONNECT or \
                 pg_read_all_stats), the rest holds {}",
                pretty_bytes(free),
                name_list(&unsized_databases, LIST_LIMIT),
                pretty_bytes(size)
            ),
            "grant pg_monitor (which includes pg_read_all_stats) to the migration account",
        )
    } else {
        CheckResult::pass(
            name,
            format!(
                "the source holds {}; {} free on {} covers it with {}% headroom",
                pretty_bytes(size),
                pretty_bytes(free),
                dest.data_directory,
                limits.disk_headroom_percent
            ),
        )
    }
}

fn destination_preload(dest: &DestinationFacts) -> CheckResult {
    let preloaded = dest
        .shared_preload_libraries
        .split(',')
        .any(|lib| lib.trim().trim_matches('"') == "cloudmig");
    if preloaded {
        CheckResult::pass(
            "destination_preload",
            "cloudmig is in shared_preload_libraries",
        )
    } else {
        CheckResult::fail(
            "destination_preload",
            format!(
                "shared_preload_libraries is '{}'",
                dest.shared_preload_libraries
            ),
            "add cloudmig to shared_preload_libraries and restart the destination, so that its \
             workers can run and resume after a restart",
        )
    }
}

fn destination_worker_capacity(
    dest: &DestinationFacts,
    source: Option<&SourceFacts>,
    limits: Limits,
) -> CheckResult {
    let name = "destination_worker_capacity";
    let databases = source.map(|s| s.databases.len() as i64).unwrap_or(1);
    let free = dest.max_worker_processes - dest.workers_in_use;
    // A launcher, one apply worker per database (they stream at the same
    // time), and the copy workers.
    let essential = 1 + databases;
    let wanted = essential + limits.copy_workers as i64;
    let detail = format!(
        "max_worker_processes = {}, {} in use, {} free; the migration needs {} (launcher, one \
         apply worker per database for {} database(s), {} copy worker(s))",
        dest.max_worker_processes,
        dest.workers_in_use,
        free,
        wanted,
        databases,
        limits.copy_workers
    );
    let fix = format!(
        "raise max_worker_processes to at least {} and restart the destination",
        dest.workers_in_use + wanted
    );
    if free < essential + 1 {
        CheckResult::fail(name, detail, fix)
    } else if free < wanted {
        CheckResult::warn(
            name,
            detail,
            format!("{fix}, or lower cloudmig.copy_workers"),
        )
    } else {
        CheckResult::pass(name, detail)
    }
}

fn destination_replication_origins(
    dest: &DestinationFacts,
    source: Option<&SourceFacts>,
) -> CheckResult {
    let name = "destination_replication_origins";
    let needed = source.map(|s| s.databases.len() as i64).unwrap_or(1);
    let free = dest.max_replication_origins - dest.replication_origins_in_use;
    let detail = format!(
        "{} replication origin(s) free (max_replication_slots = {}), {} needed: one per source \
         database, to apply changes exactly once",
        free, dest.max_replication_origins, needed
    );
    if free < needed {
        CheckResult::fail(
            name,
            detail,
            format!(
                "raise max_replication_slots on the destination to at least {} and restart it",
                dest.replication_origins_in_use + needed
            ),
        )
    } else {
        CheckResult::pass(name, detail)
    }
}

fn account_privileges(source: &SourceFacts) -> CheckResult {
    let name = "source_account_privileges";
    let account = &source.account;
    if account.superuser {
        return CheckResult::pass(name, format!("{} is a superuser", account.name));
    }
    let mut missing = Vec::new();
    if !account.replication {
        missing.push("REPLICATION");
    }
    if !account.createrole {
        missing.push("CREATEROLE");
    }
    if !account.pg_monitor {
        missing.push("membership in pg_monitor");
    }
    if missing.is_empty() {
        CheckResult::pass(
            name,
            format!(
                "{} has REPLICATION, CREATEROLE and pg_monitor",
                account.name
            ),
        )
    } else {
        let mut fix = Vec::new();
        if !account.replication || !account.createrole {
            fix.push(format!(
                "ALTER ROLE {} WITH REPLICATION CREATEROLE;",
                display_ident(&account.name)
            ));
        }
        if !account.pg_monitor {
            fix.push(format!(
                "GRANT pg_monitor TO {};",
                display_ident(&account.name)
            ));
        }
        CheckResult::fail(
            name,
            format!(
                "the migration account {} lacks {}",
                account.name,
                missing.join(", ")
            ),
            format!("on the source, as a superuser: {}", fix.join(" ")),
        )
    }
}

fn role_passwords(source: &SourceFacts) -> CheckResult {
    let name = "source_role_passwords";
    if source.account.superuser {
        CheckResult::pass(name, "the account can read role passwords (superuser)")
    } else {
        CheckResult::warn(
            name,
            format!(
                "{} is not a superuser, so role passwords (pg_authid) cannot be read: roles will \
                 be created here without passwords",
                source.account.name
            ),
            "migrate with a superuser account, or set each role's password on the destination \
             after the migration (ALTER ROLE ... PASSWORD ...)",
        )
    }
}

fn database_access(source: &SourceFacts) -> CheckResult {
    let name = "source_database_access";
    let mut problems = Vec::new();
    for database in &source.databases {
        if !database.can_connect {
            problems.push(format!("{}: no CONNECT privilege", database.name));
        } else if let Err(error) = &database.contents {
            problems.push(format!("{}: {error}", database.name));
        }
    }
    let names: Vec<String> = source.databases.iter().map(|d| d.name.clone()).collect();
    if problems.is_empty() {
        CheckResult::pass(
            name,
            format!(
                "connected to all {} database(s): {}",
                names.len(),
                name_list(&names, LIST_LIMIT)
            ),
        )
    } else {
        CheckResult::fail(
            name,
            format!("cannot use {}", problems.join("; ")),
            format!(
                "GRANT CONNECT ON DATABASE <name> TO {} and allow it in the source's pg_hba.conf \
                 for every database",
                display_ident(&source.account.name)
            ),
        )
    }
}

/// `database: item` for every item in every database.
fn per_database(
    source: &SourceFacts,
    items: impl Fn(&SourceDatabase) -> Vec<String>,
) -> Vec<String> {
    source
        .databases
        .iter()
        .flat_map(|d| {
            items(d)
                .into_iter()
                .map(move |item| format!("{}: {item}", d.name))
        })
        .collect()
}

fn table_access(source: &SourceFacts) -> CheckResult {
    let name = "source_table_access";
    let unreadable = per_database(source, |d| {
        d.contents
            .as_ref()
            .map(|c| c.unreadable.clone())
            .unwrap_or_default()
    });
    if unreadable.is_empty() {
        CheckResult::pass(
            name,
            "the account can read every table, sequence and materialized view",
        )
    } else {
        let grant = if source.version_num >= 140000 {
            format!(
                "GRANT pg_read_all_data TO {};",
                display_ident(&source.account.name)
            )
        } else {
            format!(
                "GRANT USAGE ON SCHEMA <schema> TO {0}; GRANT SELECT ON ALL TABLES IN SCHEMA \
                 <schema> TO {0}; GRANT SELECT ON ALL SEQUENCES IN SCHEMA <schema> TO {0};",
                display_ident(&source.account.name)
            )
        };
        CheckResult::fail(
            name,
            format!(
                "the account cannot read {} relation(s): {}",
                unreadable.len(),
                name_list(&unreadable, LIST_LIMIT)
            ),
            format!("on the source: {grant}"),
        )
    }
}

fn wal_level(source: &SourceFacts) -> CheckResult {
    let level = source
        .settings
        .get("wal_level")
        .map(String::as_str)
        .unwrap_or("unknown");
    if level == "logical" {
        CheckResult::pass("source_wal_level", "wal_level = logical")
    } else {
        CheckResult::fail(
            "source_wal_level",
            format!("wal_level = {level}; logical decoding needs logical"),
            "on the source: ALTER SYSTEM SET wal_level = logical; then restart the source",
        )
    }
}

fn replication_slots(source: &SourceFacts) -> CheckResult {
    let name = "source_replication_slots";
    let max = source.setting_i64("max_replication_slots").unwrap_or(0);
    let used = source.slots.len() as i64;
    let needed = source.databases.len() as i64;
    let detail =
        format!("max_replication_slots = {max}, {used} in use, {needed} needed (one per database)");
    if max - used < needed {
        let unused: Vec<String> = source
            .slots
            .iter()
            .filter(|s| !s.active)
            .map(|s| s.name.clone())
            .collect();
        let drop_hint = if unused.is_empty() {
            String::new()
        } else {
            format!(
                ", or drop unused slots ({})",
                name_list(&unused, LIST_LIMIT)
            )
        };
        CheckResult::fail(
            name,
            detail,
            format!(
                "on the source: ALTER SYSTEM SET max_replication_slots = {} and restart{drop_hint}",
                used + needed
            ),
        )
    } else {
        CheckResult::pass(name, detail)
    }
}

fn wal_senders(source: &SourceFacts) -> CheckResult {
    let name = "source_wal_senders";
    let max = source.setting_i64("max_wal_senders").unwrap_or(0);
    let used = source.walsenders_in_use;
    let needed = source.databases.len() as i64;
    let detail =
        format!("max_wal_senders = {max}, {used} in use, {needed} needed (one per database)");
    if max - used < needed {
        CheckResult::fail(
            name,
            detail,
            format!(
                "on the source: ALTER SYSTEM SET max_wal_senders = {} and restart",
                used + needed
            ),
        )
    } else {
        CheckResult::pass(name, detail)
    }
}

fn connection_capacity(source: &SourceFacts, limits: Limits) -> CheckResult {
    let name = "source_connection_capacity";
    let max = source.setting_i64("max_connections").unwrap_or(0);
    let reserved = if source.account.superuser {
        0
    } else {
        source
            .setting_i64("superuser_reserved_connections")
            .unwrap_or(0)
    };
    // The assessment's own connection is counted in use; it closes.
    let used = (source.connections_in_use - 1).max(0);
    let needed = limits.copy_workers as i64 + 1;
    let free = max - reserved - used;
    let detail = format!(
        "{free} connection(s) free (max_connections = {max}, {reserved} reserved, {used} in use); \
         the copy needs {needed} ({} copy worker(s) and a schema dump)",
        limits.copy_workers
    );
    if free < needed {
        CheckResult::fail(
            name,
            detail,
            "close idle sessions on the source, raise its max_connections, or lower \
             cloudmig.copy_workers",
        )
    } else {
        CheckResult::pass(name, detail)
    }
}

/// Round trip from which the copy's own waits add up: each copy worker waits
/// one per table (its COPY) and pg_dump one per table it locks, plus its
/// catalog queries per database.
const FAR_SOURCE: Duration = Duration::from_millis(10);

fn round_trip(source: &SourceFacts, limits: Limits) -> CheckResult {
    let name = "source_round_trip";
    let ms = source.round_trip.as_secs_f64() * 1e3;
    let detail = format!("{ms:.1} ms per exchange with the source");
    if source.round_trip < FAR_SOURCE {
        return CheckResult::pass(name, detail);
    }
    CheckResult::warn(
        name,
        format!(
            "{detail}: the copy waits about two round trips per table (the schema dump's lock, \
             then its COPY), {} copy worker(s) at a time",
            limits.copy_workers
        ),
        format!(
            "a distant source copies faster with more copy workers, each waiting its own round \
             trips: assess and start with '{{\"copy_workers\": {}}}' (each takes one source \
             connection); or run the migration from closer to the source",
            (limits.copy_workers * 2).max(4)
        ),
    )
}

fn output_plugin(source: &SourceFacts) -> CheckResult {
    let name = "source_output_plugin";
    match source.settings.get("output_plugin_libraries") {
        None => CheckResult::pass(
            name,
            "the source has no output_plugin_libraries restriction",
        ),
        Some(list)
            if list
                .split(',')
                .any(|p| p.trim().trim_matches('"') == "pgoutput") =>
        {
            CheckResult::pass(
                name,
                format!("pgoutput is allowed (output_plugin_libraries = '{list}')"),
            )
        }
        Some(list) => CheckResult::fail(
            name,
            format!("output_plugin_libraries = '{list}' does not allow pgoutput"),
            format!(
                "on the source: ALTER SYSTEM SET output_plugin_libraries = '{}'; SELECT \
                 pg_reload_conf();",
                if list.trim().is_empty() {
                    "pgoutput".to_string()
                } else {
                    format!("{list}, pgoutput")
                }
            ),
        ),
    }
}

fn slot_wal_keep_size(source: &SourceFacts) -> CheckResult {
    let name = "source_slot_wal_keep_size";
    match source.setting_i64("max_slot_wal_keep_size") {
        Some(-1) => CheckResult::warn(
            name,
            "max_slot_wal_keep_size = -1: if the migration stalls, its slot keeps WAL without \
             limit and can fill the source's disk",
            "on the source: ALTER SYSTEM SET max_slot_wal_keep_size = '<a size the disk can hold>'; \
             SELECT pg_reload_conf(); (a slot that exceeds it is invalidated and the migration \
             must restart) — or watch the source's disk during the migration",
        ),
        Some(mb) => CheckResult::pass(
            name,
            format!("max_slot_wal_keep_size = {mb}MB bounds the WAL a stalled slot keeps"),
        ),
        None => CheckResult::warn(
            name,
            format!(
                "PostgreSQL {} has no max_slot_wal_keep_size: a stalled migration keeps WAL without limit",
                source.version
            ),
            "watch the source's disk during the migration",
        ),
    }
}

fn replication_connection(source: &SourceFacts) -> CheckResult {
    let name = "source_replication_connection";
    match &source.replication {
        Ok(identity) => CheckResult::pass(
            name,
            format!(
                "replication connection accepted: system {}, timeline {}, WAL at {}",
                identity.systemid, identity.timeline, identity.xlogpos
            ),
        ),
        Err(error) => CheckResult::fail(
            name,
            format!("a replication connection (replication=database) was refused: {error}"),
            format!(
                "give {} the REPLICATION attribute and allow it in the source's pg_hba.conf: \
                 logical replication connections match the database name (not the keyword \
                 'replication'); check max_wal_senders",
                display_ident(&source.account.name)
            ),
        ),
    }
}

fn publication_rights(source: &SourceFacts) -> CheckResult {
    let name = "source_publication_rights";
    if source.account.superuser {
        return CheckResult::pass(name, "a superuser account publishes FOR ALL TABLES");
    }
    let no_create: Vec<String> = source
        .databases
        .iter()
        .filter(|d| d.contents.as_ref().is_ok_and(|c| !c.can_create))
        .map(|d| d.name.clone())
        .collect();
    let tables = per_database(source, |d| {
        d.contents
            .as_ref()
            .map(|c| c.unpublishable.clone())
            .unwrap_or_default()
    });
    if no_create.is_empty() && tables.is_empty() {
        return CheckResult::pass(
            name,
            format!(
                "{} can publish every table it migrates",
                source.account.name
            ),
        );
    }
    let mut problems = Vec::new();
    if !no_create.is_empty() {
        problems.push(format!(
            "no CREATE privilege on {}",
            name_list(&no_create, LIST_LIMIT)
        ));
    }
    if !tables.is_empty() {
        problems.push(format!(
            "{} table(s) of owners whose privileges it lacks: {}",
            tables.len(),
            name_list(&tables, LIST_LIMIT)
        ));
    }
    let account = display_ident(&source.account.name);
    CheckResult::fail(
        name,
        format!(
            "{} is not a superuser, and streaming changes needs a publication of every table: {}",
            source.account.name,
            problems.join("; ")
        ),
        format!(
            "on the source: GRANT CREATE ON DATABASE <each database> TO {account}; and GRANT <each \
             table owner> TO {account} (CREATEROLE allows it for non-superuser owners); or migrate \
             with a superuser account"
        ),
    )
}

fn switchover_fence(source: &SourceFacts) -> CheckResult {
    let name = "source_switchover_fence";
    if source.account.superuser {
        return CheckResult::pass(
            name,
            "a superuser account can make the source read-only at switchover",
        );
    }
    let not_owned: Vec<String> = source
        .databases
        .iter()
        .filter(|d| !d.owned)
        .map(|d| d.name.clone())
        .collect();
    if not_owned.is_empty() {
        CheckResult::pass(
            name,
            "the account owns every database it would make read-only at switchover",
        )
    } else {
        CheckResult::warn(
            name,
            format!(
                "switchover makes each migrated database read-only (ALTER DATABASE), which needs \
                 its owner's privileges; {} lacks them for {}",
                source.account.name,
                name_list(&not_owned, LIST_LIMIT)
            ),
            "run the switchover with a superuser migration account (assess and start again with \
             it), or GRANT each database owner to the account before the switchover",
        )
    }
}

fn no_concurrent_migration(source: &SourceFacts, dest: &DestinationFacts) -> CheckResult {
    let name = "no_concurrent_migration";
    let slots: Vec<String> = source
        .slots
        .iter()
        .filter(|s| s.name.starts_with("cloudmig"))
        .map(|s| s.name.clone())
        .collect();
    let publications = per_database(source, |d| {
        d.contents
            .as_ref()
            .map(|c| c.cloudmig_publications.clone())
            .unwrap_or_default()
    });
    if let Some(task) = dest.active_task {
        CheckResult::fail(
            name,
            format!("task {task} of this destination is still active"),
            format!("let it finish, or stop it with SELECT cloudmig.cancel({task});"),
        )
    } else if slots.is_empty() && publications.is_empty() {
        CheckResult::pass(
            name,
            "no cloudmig slot or publication on the source, no active task here",
        )
    } else {
        let mut found = Vec::new();
        if !slots.is_empty() {
            found.push(format!(
                "replication slots {}",
                name_list(&slots, LIST_LIMIT)
            ));
        }
        if !publications.is_empty() {
            found.push(format!(
                "publications {}",
                name_list(&publications, LIST_LIMIT)
            ));
        }
        CheckResult::fail(
            name,
            format!("another migration uses the source: {}", found.join("; ")),
            "finish or cancel that migration (cloudmig.cancel on its destination); leftovers of \
             one that is gone can be dropped on the source with SELECT \
             pg_drop_replication_slot('<slot>') and DROP PUBLICATION <name>",
        )
    }
}

/// Compares dotted versions numerically ("1.10" > "1.9"); non-numeric parts
/// compare as text.
pub fn version_at_least(available: &str, needed: &str) -> bool {
    fn parts(v: &str) -> Vec<Result<u64, String>> {
        v.split(['.', '-'])
            .map(|p| p.parse::<u64>().map_err(|_| p.to_string()))
            .collect()
    }
    let (a, n) = (parts(available), parts(needed));
    for i in 0..a.len().max(n.len()) {
        let ordering = match (a.get(i), n.get(i)) {
            (Some(Ok(x)), Some(Ok(y))) => x.cmp(y),
            (Some(Ok(_)), None) | (Some(Err(_)), None) => return true,
            (None, Some(_)) => return false,
            (Some(x), Some(y)) => format!("{x:?}").cmp(&format!("{y:?}")),
            (None, None) => std::cmp::Ordering::Equal,
        };
        if ordering != std::cmp::Ordering::Equal {
            return ordering == std::cmp::Ordering::Greater;
        }
    }
    true
}

fn extensions_available(source: &SourceFacts, dest: &DestinationFacts) -> CheckResult {
    let name = "extensions_available";
    let mut missing = Vec::new();
    let mut too_old = Vec::new();
    let mut seen = 0;
    for database in &source.databases {
        let Ok(contents) = &database.contents else {
            continue;
        };
        for (extension, version) in &contents.extensions {
            seen += 1;
            match dest.available_extensions.get(extension) {
                None => missing.push(format!("{extension} {version} (in {})", database.name)),
                Some(versions) if !versions.iter().any(|v| version_at_least(v, version)) => too_old
                    .push(format!(
                        "{extension} {version} (in {}; here only {})",
                        database.name,
                        versions.join(", ")
                    )),
                Some(_) => {}
            }
        }
    }
    if missing.is_empty() && too_old.is_empty() {
        CheckResult::pass(
            name,
            format!("all {seen} installed extension(s) are available here in the same or a newer version"),
        )
    } else {
        let mut detail = Vec::new();
        if !missing.is_empty() {
            detail.push(format!(
                "not available here: {}",
                name_list(&missing, LIST_LIMIT)
            ));
        }
        if !too_old.is_empty() {
            detail.push(format!(
                "only older versions here: {}",
                name_list(&too_old, LIST_LIMIT)
            ));
        }
        CheckResult::fail(
            name,
            detail.join("; "),
            "install the packages that provide these extensions on the destination (e.g. \
             postgresql-<major>-<extension>), in a version at least as new as the source's",
        )
    }
}

fn is_builtin_locale(name: &str) -> bool {
    matches!(name, "C" | "POSIX") || name.starts_with("C.")
}

fn normalize_charset(name: &str) -> String {
    name.to_ascii_uppercase().replace(['-', '_'], "")
}

fn encodings_and_locales(source: &SourceFacts, dest: &DestinationFacts) -> CheckResult {
    let name = "encodings_and_locales";
    let mut problems = Vec::new();
    for database in &source.databases {
        if database.locale_provider == "i" && !dest.icu_available {
            problems.push(format!(
                "{} uses the ICU locale {} but this server has no ICU support",
                database.name,
                database.icu_locale.as_deref().unwrap_or("?")
            ));
        }
        let mut locales = vec![database.collate.as_str()];
        if database.ctype != database.collate {
            locales.push(database.ctype.as_str());
        }
        for locale in locales {
            if is_builtin_locale(locale) {
                continue;
            }
            match dest.locales.get(locale) {
                Some(Some(codeset)) => {
                    let utf8_database = normalize_charset(&database.encoding) == "UTF8";
                    let utf8_locale = normalize_charset(codeset) == "UTF8";
                    if utf8_database != utf8_locale {
                        problems.push(format!(
                            "{}: encoding {} does not match locale {locale} (character set {codeset}) here",
                            database.name, database.encoding
                        ));
                    }
                }
                _ => problems.push(format!(
                    "{}: locale {locale} does not exist on this server",
                    database.name
                )),
            }
        }
    }
    if problems.is_empty() {
        CheckResult::pass(
            name,
            format!(
                "every source database's encoding and locale can be created here ({})",
                source
                    .databases
                    .iter()
                    .map(|d| format!("{}: {} {}", d.name, d.encoding, d.collate))
                    .collect::<Vec<_>>()
                    .join("; ")
            ),
        )
    } else {
        CheckResult::fail(
            name,
            problems.join("; "),
            "install the missing locales on the destination's operating system (e.g. locale-gen \
             or the locales-all package) and restart PostgreSQL",
        )
    }
}

fn tables_without_replica_identity(source: &SourceFacts) -> CheckResult {
    let tables = per_database(source, |d| {
        d.contents
            .as_ref()
            .map(|c| c.without_identity.clone())
            .unwrap_or_default()
    });
    warn_if_any(
        "tables_without_replica_identity",
        &tables,
        "every table has a primary key or a replica identity",
        &format!(
            "{} table(s) have no primary key or replica identity",
            tables.len()
        ),
        "once the migration publishes them, the source refuses UPDATE and DELETE on them",
        "add a primary key, or ALTER TABLE ... REPLICA IDENTITY FULL (slower to apply), before \
         starting",
    )
}

fn unlogged_tables(source: &SourceFacts) -> CheckResult {
    let tables = per_database(source, |d| {
        d.contents
            .as_ref()
            .map(|c| c.unlogged.clone())
            .unwrap_or_default()
    });
    warn_if_any(
        "unlogged_tables",
        &tables,
        "no unlogged tables",
        &format!("{} unlogged table(s)", tables.len()),
        "their contents are copied once, later changes are not replicated",
        "ALTER TABLE ... SET LOGGED before starting, or reload these tables after the switchover",
    )
}

fn large_objects(source: &SourceFacts) -> CheckResult {
    let name = "large_objects";
    let with_objects: Vec<String> = source
        .databases
        .iter()
        .filter_map(|d| {
            let count = d.contents.as_ref().ok()?.large_objects;
            (count > 0).then(|| format!("{}: {count}", d.name))
        })
        .collect();
    if with_objects.is_empty() {
        CheckResult::pass(name, "no large objects")
    } else {
        CheckResult::warn(
            name,
            format!(
                "large objects in {}; logical decoding does not carry their changes",
                with_objects.join(", ")
            ),
            "they are copied with the data; at switchover only what changed since is copied \
             again, mostly before the fence: avoid writing large objects during the switchover",
        )
    }
}

/// A warning that lists `items` (the check passes when there are none):
/// `what` introduces the list, `why` says what it means for the migration.
fn warn_if_any(
    name: &'static str,
    items: &[String],
    none: &str,
    what: &str,
    why: &str,
    fix: &str,
) -> CheckResult {
    if items.is_empty() {
        CheckResult::pass(name, none)
    } else {
        let why = if why.is_empty() {
            String::new()
        } else {
            format!("; {why}")
        };
        CheckResult::warn(
            name,
            format!("{what}: {}{why}", name_list(items, LIST_LIMIT)),
            fix,
        )
    }
}

fn long_transactions(source: &SourceFacts) -> CheckResult {
    warn_if_any(
        "long_transactions",
        &source.long_transactions,
        "no long-running transactions",
        "long-running transactions",
        "creating the migration's replication slot waits for them to end",
        "let them finish or end them (SELECT pg_terminate_backend(<pid>)) before starting",
    )
}

fn prepared_transactions(source: &SourceFacts) -> CheckResult {
    warn_if_any(
        "prepared_transactions",
        &source.prepared_transactions,
        "no prepared transactions",
        "prepared transactions",
        "the replication slot cannot be created while they are open",
        "COMMIT PREPARED or ROLLBACK PREPARED them before starting",
    )
}

fn tablespaces(source: &SourceFacts) -> CheckResult {
    warn_if_any(
        "tablespaces",
        &source.tablespaces,
        "only the default tablespaces",
        "non-default tablespaces",
        "",
        "create tablespaces with the same names on the destination before starting; objects in a \
         tablespace that does not exist here go to the default tablespace",
    )
}

/// An identifier as a DBA would type it in a fix text: quoted only when it
/// must be (unlike `source::quote_ident`, which always quotes for safety).
fn display_ident(name: &str) -> String {
    let plain = !name.is_empty()
        && name
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_lowercase() || c == '_')
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    if plain {
        name.to_string()
    } else {
        format!("\"{}\"", name.replace('"', "\"\""))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::assess::destination_facts::DatabaseInspection;
    use crate::assess::source_facts::{Account, DatabaseContents, Slot};
    use crate::assess::CheckStatus::{Fail, Pass, Warn};
    use crate::source::SystemIdentity;
    use crate::worker::inspect::UserObjects;
    use std::collections::HashMap;

    const LIMITS: Limits = Limits {
        copy_workers: 2,
        disk_headroom_percent: 20,
    };
    const GB: u64 = 1024 * 1024 * 1024;

    fn database(name: &str) -> SourceDatabase {
        SourceDatabase {
            name: name.into(),
            encoding: "UTF8".into(),
            collate: "C.UTF-8".into(),
            ctype: "C.UTF-8".into(),
            locale_provider: "c".into(),
            icu_locale: None,
            can_connect: true,
            owned: true,
            size_bytes: Some(GB as i64),
            contents: Ok(DatabaseContents {
                extensions: vec![("plpgsql".into(), "1.0".into())],
                can_create: true,
                ..Default::default()
            }),
        }
    }

    /// A source prepared as the README says: passes every check.
    fn healthy_source() -> SourceFacts {
        let settings = [
            ("wal_level", "logical"),
            ("max_replication_slots", "10"),
            ("max_wal_senders", "10"),
            ("max_slot_wal_keep_size", "10240"),
            ("output_plugin_libraries", "pgoutput, test_decoding"),
            ("max_connections", "100"),
            ("superuser_reserved_connections", "3"),
        ];
        SourceFacts {
            target: "db1:5432".into(),
            version: "15.20".into(),
            version_num: 150020,
            account: Account {
                name: "migrator".into(),
                superuser: false,
                replication: true,
                createrole: true,
                pg_monitor: true,
            },
            settings: settings
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            replication: Ok(SystemIdentity {
                systemid: "111".into(),
                timeline: 1,
                xlogpos: "0/1000000".into(),
                dbname: Some("postgres".into()),
            }),
            databases: vec![database("postgres"), database("app")],
            slots: vec![],
            walsenders_in_use: 0,
            connections_in_use: 1,
            long_transactions: vec![],
            prepared_transactions: vec![],
            tablespaces: vec![],
            round_trip: Duration::from_micros(200),
        }
    }

    fn empty_destination() -> DestinationFacts {
        DestinationFacts {
            version: "15.20".into(),
            version_num: 150020,
            in_recovery: false,
            system_identifier: "222".into(),
            control_database: "postgres".into(),
            extra_databases: vec![],
            inspections: vec![DatabaseInspection {
                name: "postgres".into(),
                objects: Ok(UserObjects {
                    count: 0,
                    sample: String::new(),
                }),
            }],
            data_directory: "/var/lib/postgresql/15/main".into(),
            free_disk_bytes: Ok(100 * GB),
            max_worker_processes: 8,
            workers_in_use: 1,
            shared_preload_libraries: "cloudmig".into(),
            max_replication_origins: 10,
            replication_origins_in_use: 0,
            available_extensions: HashMap::from([("plpgsql".to_string(), vec!["1.0".to_string()])]),
            active_task: None,
            icu_available: true,
            locales: HashMap::new(),
        }
    }

    fn judge(source: SourceFacts, dest: &DestinationFacts) -> Report {
        evaluate(&SourceSurvey::Reached(Box::new(source)), dest, LIMITS)
    }

    fn check<'a>(report: &'a Report, name: &str) -> &'a CheckResult {
        report
            .checks
            .iter()
            .find(|c| c.name == name)
            .unwrap_or_else(|| panic!("no check named {name} in {:?}", report.checks))
    }

    #[test]
    fn a_prepared_source_passes_with_only_the_password_warning() {
        let report = judge(healthy_source(), &empty_destination());
        assert!(report.passed(), "{:#?}", report.checks);
        let not_passed: Vec<_> = report
            .checks
            .iter()
            .filter(|c| c.status != Pass)
            .map(|c| c.name)
            .collect();
        assert_eq!(not_passed, vec!["source_role_passwords"]);
        let mut superuser = healthy_source();
        superuser.account.superuser = true;
        assert_eq!(judge(superuser, &empty_destination()).count(Warn), 0);
    }

    #[test]
    fn check_names_are_unique_and_every_non_pass_has_a_fix() {
        let mut source = healthy_source();
        source.settings.insert("wal_level".into(), "replica".into());
        source.tablespaces.push("fast".into());
        let report = judge(source, &empty_destination());
        let mut names: Vec<_> = report.checks.iter().map(|c| c.name).collect();
        let count = names.len();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), count);
        for c in &report.checks {
            assert_eq!(c.fix.is_some(), c.status != Pass, "{c:?}");
        }
    }

    #[test]
    fn wal_level_replica_fails_with_the_alter_system_fix() {
        let mut source = healthy_source();
        source.settings.insert("wal_level".into(), "replica".into());
        let report = judge(source, &empty_destination());
        let c = check(&report, "source_wal_level");
        assert_eq!(c.status, Fail);
        assert!(c
            .fix
            .as_deref()
            .unwrap()
            .contains("ALTER SYSTEM SET wal_level = logical"));
        assert!(!report.passed());
    }

    #[test]
    fn a_distant_source_is_a_warning_that_suggests_more_copy_workers() {
        let near = judge(healthy_source(), &empty_destination());
        assert_eq!(check(&near, "source_round_trip").status, Pass);
        let mut source = healthy_source();
        source.round_trip = Duration::from_millis(30);
        let report = judge(source, &empty_destination());
        let c = check(&report, "source_round_trip");
        assert_eq!(c.status, Warn);
        assert!(c.detail.contains("30.0 ms"), "{}", c.detail);
        assert!(
            c.fix.as_deref().unwrap().contains(r#"{"copy_workers": 4}"#),
            "{:?}",
            c.fix
        );
        // A warning: the migration may go on.
        assert!(report.passed());
    }

    #[test]
    fn pgoutput_missing_from_the_allow_list_fails() {
        let mut source = healthy_source();
        source
            .settings
            .insert("output_plugin_libraries".into(), "test_decoding".into());
        let report = judge(source, &empty_destination());
        let c = check(&report, "source_output_plugin");
        assert_eq!(c.status, Fail);
        assert!(c
            .fix
            .as_deref()
            .unwrap()
            .contains("'test_decoding, pgoutput'"));
        // Servers without the setting do not restrict plugins.
        let mut old = healthy_source();
        old.settings.remove("output_plugin_libraries");
        assert_eq!(
            check(&judge(old, &empty_destination()), "source_output_plugin").status,
            Pass
        );
    }

    #[test]
    fn missing_privileges_are_named_and_granted_in_the_fix() {
        let mut source = healthy_source();
        source.account.replication = false;
        source.account.pg_monitor = false;
        let report = judge(source, &empty_destination());
        let c = check(&report, "source_account_privileges");
        assert_eq!(c.status, Fail);
        assert!(c.detail.contains("REPLICATION") && c.detail.contains("pg_monitor"));
        assert!(!c.detail.contains("CREATEROLE"));
        let fix = c.fix.as_deref().unwrap();
        assert!(fix.contains("ALTER ROLE migrator WITH REPLICATION"));
        assert!(fix.contains("GRANT pg_monitor TO migrator"));
    }

    #[test]
    fn too_few_slots_and_senders_fail_with_the_needed_numbers() {
        let mut source = healthy_source();
        source
            .settings
            .insert("max_replication_slots".into(), "2".into());
        source.slots.push(Slot {
            name: "old".into(),
            database: None,
            active: false,
        });
        source.settings.insert("max_wal_senders".into(), "1".into());
        let report = judge(source, &empty_destination());
        let slots = check(&report, "source_replication_slots");
        assert_eq!(slots.status, Fail);
        assert!(slots
            .fix
            .as_deref()
            .unwrap()
            .contains("max_replication_slots = 3"));
        assert!(slots
            .fix
            .as_deref()
            .unwrap()
            .contains("drop unused slots (old)"));
        assert_eq!(check(&report, "source_wal_senders").status, Fail);
    }

    #[test]
    fn leftover_cloudmig_slot_or_publication_means_a_concurrent_migration() {
        let mut source = healthy_source();
        source.slots.push(Slot {
            name: "cloudmig_1_app".into(),
            database: None,
            active: true,
        });
        if let Ok(contents) = &mut source.databases[1].contents {
            contents.cloudmig_publications.push("cloudmig_1".into());
        }
        let report = judge(source, &empty_destination());
        let c = check(&report, "no_concurrent_migration");
        assert_eq!(c.status, Fail);
        assert!(c.detail.contains("cloudmig_1_app") && c.detail.contains("app: cloudmig_1"));
    }

    #[test]
    fn destination_must_be_an_empty_primary_with_room() {
        let mut dest = empty_destination();
        dest.in_recovery = true;
        dest.extra_databases.push("shop".into());
        dest.free_disk_bytes = Ok(GB);
        dest.shared_preload_libraries = "pg_stat_statements".into();
        let report = judge(healthy_source(), &dest);
        assert_eq!(check(&report, "destination_is_primary").status, Fail);
        let empty = check(&report, "destination_is_empty");
        assert_eq!(empty.status, Fail);
        assert!(empty.detail.contains("shop"));
        let disk = check(&report, "destination_disk_space");
        assert_eq!(disk.status, Fail);
        assert!(disk.detail.contains("2048 MB"), "{}", disk.detail);
        assert_eq!(check(&report, "destination_preload").status, Fail);
    }

    #[test]
    fn user_objects_in_a_default_database_fail_emptiness() {
        let mut dest = empty_destination();
        dest.inspections.push(DatabaseInspection {
            name: "template1".into(),
            objects: Ok(UserObjects {
                count: 1,
                sample: "table public.t".into(),
            }),
        });
        let report = judge(healthy_source(), &dest);
        let c = check(&report, "destination_is_empty");
        assert_eq!(c.status, Fail);
        assert!(c.detail.contains("template1") && c.detail.contains("public.t"));
    }

    #[test]
    fn more_databases_than_apply_slots_fail_before_the_copy() {
        let report = judge(healthy_source(), &empty_destination());
        assert_eq!(check(&report, "databases_per_task").status, Pass);
        let mut source = healthy_source();
        source.databases = (0..=crate::worker::shared::MAX_JOB_SLOTS)
            .map(|i| database(&format!("db{i}")))
            .collect();
        let report = judge(source, &empty_destination());
        let verdict = check(&report, "databases_per_task");
        assert_eq!(verdict.status, Fail);
        assert!(verdict.fix.as_deref().unwrap_or("").contains("databases"));
    }

    #[test]
    fn worker_and_origin_capacity() {
        let mut dest = empty_destination();
        dest.max_worker_processes = 4; // 3 free: launcher + 2 apply, no copy worker
        let report = judge(healthy_source(), &dest);
        assert_eq!(check(&report, "destination_worker_capacity").status, Fail);
        dest.max_worker_processes = 5; // 4 free: essential + 1 copy worker
        let report = judge(healthy_source(), &dest);
        assert_eq!(check(&report, "destination_worker_capacity").status, Warn);
        dest.max_replication_origins = 1;
        let report = judge(healthy_source(), &dest);
        assert_eq!(
            check(&report, "destination_replication_origins").status,
            Fail
        );
    }

    #[test]
    fn version_rules() {
        let mut dest = empty_destination();
        dest.version = "16.4".into();
        dest.version_num = 160004;
        let c = judge(healthy_source(), &dest).checks[1].clone();
        assert_eq!((c.name, c.status), ("server_version", Fail));
        let old = SourceSurvey::TooOld {
            version: "9.6.24".into(),
            version_num: 90624,
        };
        let report = evaluate(&old, &empty_destination(), LIMITS);
        assert_eq!(check(&report, "server_version").status, Fail);
        assert!(check(&report, "server_version")
            .detail
            .contains("10 or later"));
    }

    #[test]
    fn a_non_superuser_must_be_able_to_publish_every_table() {
        let mut source = healthy_source();
        if let Ok(contents) = &mut source.databases[1].contents {
            contents.can_create = false;
            contents
                .unpublishable
                .push("public.t (owner postgres)".into());
        }
        let report = judge(source, &empty_destination());
        let c = check(&report, "source_publication_rights");
        assert_eq!(c.status, Fail);
        assert!(
            c.detail.contains("no CREATE privilege on app"),
            "{}",
            c.detail
        );
        assert!(c.detail.contains("public.t (owner postgres)"));
        assert!(c
            .fix
            .as_deref()
            .unwrap()
            .contains("GRANT CREATE ON DATABASE"));
        let mut superuser = healthy_source();
        superuser.account.superuser = true;
        if let Ok(contents) = &mut superuser.databases[1].contents {
            contents.can_create = false;
        }
        assert_eq!(
            check(
                &judge(superuser, &empty_destination()),
                "source_publication_rights"
            )
            .status,
            Pass
        );
    }

    #[test]
    fn an_active_task_here_blocks_another_migration() {
        let mut dest = empty_destination();
        dest.active_task = Some(3);
        let report = judge(healthy_source(), &dest);
        let c = check(&report, "no_concurrent_migration");
        assert_eq!(c.status, Fail);
        assert!(c.fix.as_deref().unwrap().contains("cloudmig.cancel(3)"));
    }

    #[test]
    fn the_destination_itself_is_refused_as_source() {
        let mut dest = empty_destination();
        dest.system_identifier = "111".into();
        let report = judge(healthy_source(), &dest);
        assert_eq!(check(&report, "source_is_not_destination").status, Fail);
    }

    #[test]
    fn extension_versions_compare_numerically() {
        assert!(version_at_least("1.10", "1.9"));
        assert!(version_at_least("1.4", "1.4"));
        assert!(!version_at_least("1.3", "1.4"));
        assert!(version_at_least("2.0.1", "2.0"));
        assert!(!version_at_least("2.0", "2.0.1"));
        let mut source = healthy_source();
        if let Ok(contents) = &mut source.databases[1].contents {
            contents.extensions.push(("postgis".into(), "3.4.0".into()));
            contents.extensions.push(("hstore".into(), "1.8".into()));
        }
        let mut dest = empty_destination();
        dest.available_extensions
            .insert("hstore".into(), vec!["1.4".into(), "1.7".into()]);
        let report = judge(source, &dest);
        let c = check(&report, "extensions_available");
        assert_eq!(c.status, Fail);
        assert!(c.detail.contains("postgis 3.4.0 (in app)"), "{}", c.detail);
        assert!(
            c.detail.contains("hstore 1.8 (in app; here only 1.4, 1.7)"),
            "{}",
            c.detail
        );
    }

    #[test]
    fn missing_or_mismatched_locales_fail() {
        let mut source = healthy_source();
        source.databases[1].collate = "de_DE.UTF-8".into();
        source.databases[1].ctype = "de_DE.UTF-8".into();
        let mut dest = empty_destination();
        let report = judge(source, &dest);
        let c = check(&report, "encodings_and_locales");
        assert_eq!(c.status, Fail);
        assert!(
            c.detail.contains("app: locale de_DE.UTF-8 does not exist"),
            "{}",
            c.detail
        );
        let mut source = healthy_source();
        source.databases[1].collate = "de_DE".into();
        source.databases[1].ctype = "de_DE".into();
        dest.locales
            .insert("de_DE".into(), Some("ISO-8859-1".into()));
        let report = judge(source, &dest);
        assert!(check(&report, "encodings_and_locales")
            .detail
            .contains("does not match"));
    }

    #[test]
    fn warnings_list_what_needs_a_plan() {
        let mut source = healthy_source();
        if let Ok(contents) = &mut source.databases[1].contents {
            contents.without_identity.push("public.logs".into());
            contents.unlogged.push("public.cache".into());
            contents.large_objects = 3;
        }
        source
            .long_transactions
            .push("pid 42 (bob on app, open 01:00:00)".into());
        source
            .prepared_transactions
            .push("tx1 (database app, owner bob, prepared now)".into());
        source.tablespaces.push("fast".into());
        source
            .settings
            .insert("max_slot_wal_keep_size".into(), "-1".into());
        let report = judge(source, &empty_destination());
        assert!(report.passed());
        for (name, needle) in [
            ("tables_without_replica_identity", "app: public.logs"),
            ("unlogged_tables", "app: public.cache"),
            ("large_objects", "app: 3"),
            ("long_transactions", "pid 42"),
            ("prepared_transactions", "tx1"),
            ("tablespaces", "fast"),
            ("source_slot_wal_keep_size", "-1"),
        ] {
            let c = check(&report, name);
            assert_eq!(c.status, Warn, "{c:?}");
            assert!(c.detail.contains(needle), "{c:?}");
        }
    }

    #[test]
    fn an_unreadable_table_or_database_fails_access() {
        let mut source = healthy_source();
        if let Ok(contents) = &mut source.databases[1].contents {
            contents.unreadable.push("secret.payroll".into());
        }
        source.databases[0].can_connect = false;
        let report = judge(source, &empty_destination());
        let tables = check(&report, "source_table_access");
        assert_eq!(tables.status, Fail);
        assert!(tables.detail.contains("app: secret.payroll"));
        assert!(tables.fix.as_deref().unwrap().contains("pg_read_all_data"));
        assert_eq!(check(&report, "source_database_access").status, Fail);
    }

    #[test]
    fn an_unreachable_source_still_reports_the_destination() {
        let survey = SourceSurvey::Unreachable(SourceError::PasswordRequired {
            target: "db1:5432".into(),
            user: "migrator".into(),
        });
        let report = evaluate(&survey, &empty_destination(), LIMITS);
        assert_eq!(report.checks[0].name, "source_connection");
        assert_eq!(report.checks[0].status, Fail);
        assert!(report.checks[0]
            .fix
            .as_deref()
            .unwrap()
            .contains("password"));
        assert!(report
            .checks
            .iter()
            .any(|c| c.name == "destination_is_empty"));
        assert!(!report.checks.iter().any(|c| c.name == "source_wal_level"));
    }
}
