//! Background workers and the shared memory through which processes of this
//! instance see each other's live cloudmig state.
//!
//! Only this folder touches background workers, latches and signals.
//!
//! ```text
//! launcher (static, control db) ──starts──> task worker (control db, one per task)
//!                                              │ jobs through shared memory
//!                                              └──> database workers (one db each, up to copy_workers)
//! ```

pub mod apply;
pub mod cleanup;
pub mod database;
mod ddl_watch;
pub mod fence;
pub mod incremental;
pub mod inspect;
pub mod jobs;
pub mod launcher;
pub mod outage;
pub mod shape_pause;
pub mod shared;
mod slot_watch;
pub mod task;
pub mod txn;
