//! Every cloudmig setting (GUC), in one place, with typed accessors.
//!
//! All settings are `cloudmig.*`; the prefix is reserved so a typo in
//! postgresql.conf is reported instead of silently ignored. None holds a
//! secret: source passwords never travel through settings.

use pgrx::guc::{GucContext, GucFlags, GucRegistry, GucSetting};
use std::time::Duration;

/// Number of copy workers a migration runs in parallel per database. The
/// assessment sizes its checks (source connections, destination worker
/// slots) with it.
static COPY_WORKERS: GucSetting<i32> = GucSetting::<i32>::new(2);

/// Extra free disk, in percent of the source's data size, that the
/// destination must have on top of that size (indexes rebuilt here, WAL,
/// bloat from the copy).
static DISK_HEADROOM_PERCENT: GucSetting<i32> = GucSetting::<i32>::new(20);

/// Longest wait, in seconds, for any single reply of the source server.
static SOURCE_TIMEOUT: GucSetting<i32> = GucSetting::<i32>::new(60);

/// Age, in seconds, from which an open transaction on the source is reported:
/// creating the replication slot waits for such transactions to end.
static LONG_TRANSACTION_SECONDS: GucSetting<i32> = GucSetting::<i32>::new(300);

/// Directory of the pg_dump and pg_dumpall to run; empty means the directory
/// of this server's own binaries (same major version, as pg_dump requires).
static PG_BIN_DIR: GucSetting<Option<std::ffi::CString>> =
    GucSetting::<Option<std::ffi::CString>>::new(None);

/// The database the launcher watches for tasks: where `CREATE EXTENSION
/// cloudmig` ran (as pg_cron's cron.database_name).
static DATABASE: GucSetting<Option<std::ffi::CString>> =
    GucSetting::<Option<std::ffi::CString>>::new(Some(c"postgres"));

/// How long, in seconds, a task keeps retrying while its source is
/// unavailable before it fails.
static SOURCE_RETRY_TIMEOUT: GucSetting<i32> = GucSetting::<i32>::new(300);

/// How long, in seconds, the source password of an assessment is kept for a
/// `cloudmig.start()` that has not come yet; then the launcher removes it.
static SECRET_RETENTION: GucSetting<i32> = GucSetting::<i32>::new(3600);

/// Registers every setting; called once from `_PG_init`.
pub fn register() {
    GucRegistry::define_int_guc(
        c"cloudmig.copy_workers",
        c"Number of tables a migration copies in parallel.",
        c"The assessment checks that source connections and destination worker slots suffice for this many copy workers.",
        &COPY_WORKERS,
        1,
        64,
        GucContext::Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"cloudmig.disk_headroom_percent",
        c"Free disk the destination needs beyond the source's data size, in percent of that size.",
        c"Covers indexes built here, WAL written by the copy and bloat.",
        &DISK_HEADROOM_PERCENT,
        0,
        1000,
        GucContext::Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"cloudmig.source_timeout",
        c"Longest wait for any single reply of the source server.",
        c"A source that stays silent longer is reported as timed out.",
        &SOURCE_TIMEOUT,
        1,
        3600,
        GucContext::Suset,
        GucFlags::UNIT_S,
    );
    GucRegistry::define_int_guc(
        c"cloudmig.long_transaction_seconds",
        c"Age from which an open transaction on the source is reported by the assessment.",
        c"Creating the migration's replication slot waits until such transactions end.",
        &LONG_TRANSACTION_SECONDS,
        1,
        86400,
        GucContext::Suset,
        GucFlags::UNIT_S,
    );
    GucRegistry::define_int_guc(
        c"cloudmig.source_retry_timeout",
        c"How long a task retries one outage of its source, or transient apply errors, before it fails.",
        c"Each outage gets this window of its own from its first failure; retries back off from 1 to 30 seconds; each is recorded in cloudmig.events.",
        &SOURCE_RETRY_TIMEOUT,
        0,
        86400,
        GucContext::Sighup,
        GucFlags::UNIT_S,
    );
    GucRegistry::define_int_guc(
        c"cloudmig.secret_retention",
        c"How long the source password of an assessment that was not started is kept.",
        c"Then it is removed; a task keeps its own until it is completed or cancelled.",
        &SECRET_RETENTION,
        1,
        7 * 86400,
        GucContext::Sighup,
        GucFlags::UNIT_S,
    );
    GucRegistry::define_string_guc(
        c"cloudmig.pg_bin_dir",
        c"Directory of the pg_dump and pg_dumpall that cloudmig runs.",
        c"Empty: the directory of this server's own binaries.",
        &PG_BIN_DIR,
        GucContext::Suset,
        GucFlags::default(),
    );
    GucRegistry::define_string_guc(
        c"cloudmig.database",
        c"Database in which cloudmig is installed and whose tasks the launcher runs.",
        c"The launcher connects to it at server start.",
        &DATABASE,
        GucContext::Postmaster,
        GucFlags::default(),
    );
    // SAFETY: called from _PG_init, on the main thread, with a static name.
    unsafe { pgrx::pg_sys::MarkGUCPrefixReserved(c"cloudmig".as_ptr()) };
}

/// See [`COPY_WORKERS`].
pub fn copy_workers() -> u32 {
    COPY_WORKERS.get().max(1) as u32
}

/// See [`DISK_HEADROOM_PERCENT`].
pub fn disk_headroom_percent() -> u32 {
    DISK_HEADROOM_PERCENT.get().max(0) as u32
}

/// See [`SOURCE_TIMEOUT`].
pub fn source_timeout() -> Duration {
    Duration::from_secs(SOURCE_TIMEOUT.get().max(1) as u64)
}

/// See [`LONG_TRANSACTION_SECONDS`].
pub fn long_transaction_seconds() -> u32 {
    LONG_TRANSACTION_SECONDS.get().max(1) as u32
}

/// See [`PG_BIN_DIR`]; None when unset or empty.
pub fn pg_bin_dir() -> Option<String> {
    PG_BIN_DIR
        .get()
        .map(|dir| dir.to_string_lossy().into_owned())
        .filter(|dir| !dir.trim().is_empty())
}

/// See [`DATABASE`].
pub fn database() -> String {
    DATABASE
        .get()
        .map(|db| db.to_string_lossy().into_owned())
        .unwrap_or_else(|| "postgres".to_string())
}

/// See [`SOURCE_RETRY_TIMEOUT`].
pub fn source_retry_timeout() -> Duration {
    Duration::from_secs(SOURCE_RETRY_TIMEOUT.get().max(0) as u64)
}

/// See [`SECRET_RETENTION`].
pub fn secret_retention_seconds() -> i64 {
    i64::from(SECRET_RETENTION.get().max(1))
}
