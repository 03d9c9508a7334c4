//! cloudmig-e2e: the out-of-process end-to-end test harness (tier 3 in STYLE.md's tests).
//!
//! It owns the life of real PostgreSQL clusters started for tests: a *source* (wal_level=logical)
//! and a *destination* (cloudmig preloaded and created), a SQL client for each, and
//! [`poll_until`] to wait for an asynchronous outcome instead of sleeping; [`compare`] tells
//! whether a destination holds what its source does, [`fixture`] loads test data, and
//! [`migration`] drives a task (start, wait for a phase, wait for the apply to catch up).
//!
//! Invariants:
//! - every server the harness starts is stopped by [`Cluster`]'s `Drop`, also when a test panics;
//!   a panicking test keeps its directory (data and log) and says where on stderr;
//! - each cluster gets a fresh directory `<base>/<name>-<pid>-<n>` and a fresh port, so what a killed
//!   run left behind cannot collide with a new run (and the next run reaps it, see `workdir`);
//! - no fixed sleeps: start-up waits with `pg_ctl -w`, everything else polls with [`poll_until`].
//!
//! [`proxy`] sits between cloudmig and a source to inject network faults (black-hole, reset,
//! delay, rate); [`faults`] builds the fault scenarios' clusters, proxy and task, and
//! [`verdict`] is the check every one of them ends with.
//!
//! [`bench`] is `make bench`: cloudmig against its peers on the same data (the README's
//! Performance section).
//!
//! Environment: `CLOUDMIG_PG_BINDIR` (PostgreSQL binaries, default `pg_config --bindir`) and
//! `CLOUDMIG_E2E_DIR` (base directory, default `<tmp>/cloudmig-e2e`).

pub mod bench;
mod cluster;
pub mod compare;
pub mod faults;
pub mod fixture;
pub mod migration;
mod pgbin;
mod poll;
pub mod proxy;
pub mod verdict;
mod workdir;

pub use cluster::{Cluster, ClusterBuilder};
pub use compare::{
    assert_same_data, assert_same_database_properties, assert_same_instance,
    assert_same_large_objects, assert_same_role_passwords, assert_same_roles, assert_same_schema,
    assert_same_sequences, Mismatch,
};
pub use fixture::{copy_with_pg_dump, load_rich_source, psql_script};
pub use pgbin::{bindir, chown_to_server, pg_command, sharedir};
pub use poll::{poll_until, try_poll_every, PollTimeout};
/// The SQL client crate, re-exported so scenario tests use the very version the harness returns.
pub use postgres;
