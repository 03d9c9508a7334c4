//! Gathers what the assessment needs to know about this (the destination)
//! instance: its role, version, emptiness, disk, worker capacity, and which
//! extensions and locales it can offer.
//!
//! Runs in the calling backend with SPI, except for the contents of other
//! databases, which an inspection worker reads (see `worker::inspect`).

use crate::worker::inspect::{self, UserObjects, USER_OBJECTS_SQL};
use pgrx::prelude::*;
use std::collections::{BTreeSet, HashMap};
use std::ffi::{CStr, CString};

/// Databases initdb creates; anything else here means the destination is in use.
pub const DEFAULT_DATABASES: &[&str] = &["postgres", "template0", "template1"];

/// What one database of this instance holds.
#[derive(Debug, Clone)]
pub struct DatabaseInspection {
    pub name: String,
    pub objects: Result<UserObjects, String>,
}

/// Facts about this instance.
#[derive(Debug, Clone)]
pub struct DestinationFacts {
    pub version: String,
    pub version_num: i32,
    pub in_recovery: bool,
    pub system_identifier: String,
    /// The database where cloudmig is installed.
    pub control_database: String,
    /// Databases beyond the defaults and the control database.
    pub extra_databases: Vec<String>,
    /// User objects in the control database and in each default database.
    pub inspections: Vec<DatabaseInspection>,
    pub data_directory: String,
    /// Free bytes on the data directory's file system, if statvfs worked.
    pub free_disk_bytes: Result<u64, String>,
    pub max_worker_processes: i64,
    /// Background workers counted against max_worker_processes right now.
    pub workers_in_use: i64,
    pub shared_preload_libraries: String,
    /// Replication origins available (max_replication_slots in 15) and used.
    pub max_replication_origins: i64,
    pub replication_origins_in_use: i64,
    /// Available versions of each extension that can be installed here.
    pub available_extensions: HashMap<String, Vec<String>>,
    /// Whether ICU collations exist here.
    pub icu_available: bool,
    /// For each locale name the source uses: can it be loaded here, and its
    /// character set when it can.
    pub locales: HashMap<String, Option<String>>,
    /// A migration task of this destination that is not cancelled.
    pub active_task: Option<i64>,
}

fn text(sql: &str) -> String {
    Spi::get_one::<String>(sql)
        .ok()
        .flatten()
        .unwrap_or_default()
}

fn int(sql: &str) -> i64 {
    Spi::get_one::<i64>(sql).ok().flatten().unwrap_or(0)
}

/// Gathers the facts. `locale_names` are the locales the source's databases
/// use, which are probed here as `CREATE DATABASE` would.
pub fn gather(locale_names: &BTreeSet<String>) -> DestinationFacts {
    let control_database = text("SELECT current_database()::text");
    let extra_databases = Spi::connect(|client| {
        client
            .select(
                "SELECT datname::text FROM pg_catalog.pg_database \
                  WHERE datname <> ALL ($1) AND datname <> current_database() ORDER BY 1",
                None,
                &[DEFAULT_DATABASES
                    .iter()
                    .map(|s| s.to_string())
                    .collect::<Vec<_>>()
                    .into()],
            )
            .map(|rows| {
                rows.filter_map(|r| r.get::<String>(1).ok().flatten())
                    .collect()
            })
            .unwrap_or_default()
    });

    DestinationFacts {
        version: text("SELECT current_setting('server_version')"),
        version_num: int("SELECT current_setting('server_version_num')::bigint") as i32,
        in_recovery: Spi::get_one::<bool>("SELECT pg_catalog.pg_is_in_recovery()")
            .ok()
            .flatten()
            .unwrap_or(false),
        // SAFETY: reads the control file's identifier, fixed at initdb.
        system_identifier: unsafe { pg_sys::GetSystemIdentifier() }.to_string(),
        inspections: inspect_databases(&control_database),
        control_database,
        extra_databases,
        data_directory: data_directory(),
        free_disk_bytes: free_disk_bytes(),
        max_worker_processes: int("SELECT current_setting('max_worker_processes')::bigint"),
        workers_in_use: int("SELECT count(*) FROM pg_catalog.pg_stat_activity \
              WHERE backend_type NOT IN ('client backend', 'autovacuum launcher', \
                    'autovacuum worker', 'walsender', 'walreceiver', 'checkpointer', \
                    'background writer', 'walwriter', 'startup', 'archiver', \
                    'standalone backend', 'logger', 'stats collector')"),
        shared_preload_libraries: text("SELECT current_setting('shared_preload_libraries')"),
        max_replication_origins: int("SELECT current_setting('max_replication_slots')::bigint"),
        replication_origins_in_use: int("SELECT count(*) FROM pg_catalog.pg_replication_origin"),
        available_extensions: available_extensions(),
        icu_available: int("SELECT count(*) FROM pg_catalog.pg_collation WHERE collprovider = 'i'")
            > 0,
        locales: locale_names
            .iter()
            .map(|name| (name.clone(), locale_codeset(name)))
            .collect(),
        active_task: crate::catalog::tasks::active_task_id().ok().flatten(),
    }
}

fn available_extensions() -> HashMap<String, Vec<String>> {
    let mut map: HashMap<String, Vec<String>> = HashMap::new();
    Spi::connect(|client| {
        if let Ok(rows) = client.select(
            "SELECT name::text, version FROM pg_catalog.pg_available_extension_versions",
            None,
            &[],
        ) {
            for row in rows {
                if let (Ok(Some(name)), Ok(Some(version))) =
                    (row.get::<String>(1), row.get::<String>(2))
                {
                    map.entry(name).or_default().push(version);
                }
            }
        }
    });
    map
}

/// User objects in the control database (read here) and in `postgres` and
/// `template1` (read by inspection workers). Extra databases are reported by
/// name and not inspected: their mere existence fails the check.
fn inspect_databases(control_database: &str) -> Vec<DatabaseInspection> {
    let mut inspections = vec![DatabaseInspection {
        name: control_database.to_string(),
        objects: Spi::get_two::<i64, String>(USER_OBJECTS_SQL)
            .map(|(count, sample)| UserObjects {
                count: count.unwrap_or(0),
                sample: sample.unwrap_or_default(),
            })
            .map_err(|e| e.to_string()),
    }];
    let others = Spi::connect(|client| {
        client
            .select(
                "SELECT oid, datname::text FROM pg_catalog.pg_database \
                  WHERE datname IN ('postgres', 'template1') AND datname <> current_database() \
                  ORDER BY 2",
                None,
                &[],
            )
            .map(|rows| {
                rows.filter_map(|r| {
                    Some((r.get::<pg_sys::Oid>(1).ok()??, r.get::<String>(2).ok()??))
                })
                .collect::<Vec<_>>()
            })
            .unwrap_or_default()
    });
    for (oid, name) in others {
        inspections.push(DatabaseInspection {
            name,
            objects: inspect::inspect_database(oid).map_err(|e| e.to_string()),
        });
    }
    inspections
}

fn data_directory() -> String {
    // SAFETY: DataDir is set at postmaster start and never changes.
    unsafe {
        let dir = pg_sys::DataDir;
        if dir.is_null() {
            String::new()
        } else {
            CStr::from_ptr(dir).to_string_lossy().into_owned()
        }
    }
}

/// Free bytes available to unprivileged writers on the data directory's file
/// system (what PostgreSQL, not root, can use).
fn free_disk_bytes() -> Result<u64, String> {
    let dir = CString::new(data_directory()).map_err(|e| e.to_string())?;
    let mut stats: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: dir is a valid C string and stats a valid out-parameter.
    let rc = unsafe { libc::statvfs(dir.as_ptr(), &mut stats) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error().to_string());
    }
    Ok(stats.f_bavail as u64 * stats.f_frsize as u64)
}

/// Loads `name` as `CREATE DATABASE` does (check_locale uses the C library),
/// returning its character set, or None if this machine lacks the locale.
fn locale_codeset(name: &str) -> Option<String> {
    let cname = CString::new(name).ok()?;
    // SAFETY: newlocale/nl_langinfo_l/freelocale are used as documented; the
    // locale object is freed before returning.
    unsafe {
        let locale = libc::newlocale(libc::LC_CTYPE_MASK, cname.as_ptr(), std::ptr::null_mut());
        if locale.is_null() {
            return None;
        }
        let codeset = libc::nl_langinfo_l(libc::CODESET, locale);
        let codeset = if codeset.is_null() {
            String::new()
        } else {
            CStr::from_ptr(codeset).to_string_lossy().into_owned()
        };
        libc::freelocale(locale);
        Some(codeset)
    }
}
