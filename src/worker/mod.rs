//! Background workers and the shared memory through which processes of this
//! instance see each other's live cloudmig state.
//!
//! Only this folder touches background workers, latches and signals.

pub mod inspect;
pub mod shared;
