//! The inspection worker: looks into one database of this instance and counts
//! the objects a user created there.
//!
//! A backend can only read the catalogs of the database it is connected to,
//! but the assessment must know whether *every* database here is empty. So it
//! starts this short-lived dynamic worker per database, connected to that
//! database, which runs one query and leaves its answer in the shared
//! [`InspectionMailbox`](super::shared::InspectionMailbox).
//!
//! Protocol: the backend (holding the assessment claim, so it is the only
//! requester) writes `Requested` + the database oid, starts the worker, waits
//! for it to exit; the worker writes `Done` + its findings. A worker that
//! fails leaves `Requested`, which the backend reports as "could not inspect".

use super::shared::{InspectionState, INSPECTION};
use pgrx::bgworkers::{
    BackgroundWorker, BackgroundWorkerBuilder, BgWorkerStartTime, SignalWakeFlags,
};
use pgrx::prelude::*;

/// The query the worker runs: count and first few user objects.
pub const USER_OBJECTS_SQL: &str = include_str!("../assess/sql/user_objects.sql");

/// What an inspection found in one database.
#[derive(Debug, Clone)]
pub struct UserObjects {
    pub count: i64,
    /// The first few, comma separated.
    pub sample: String,
}

/// Why a database could not be inspected.
#[derive(Debug, thiserror::Error)]
pub enum InspectError {
    #[error("no background worker slot is free (max_worker_processes)")]
    NoWorkerSlot,
    #[error("the inspection worker stopped without an answer; see the server log")]
    NoAnswer,
}

/// Counts the user objects in database `database_oid` with a dynamic worker.
/// Blocks until the worker exits; the wait honours statement cancellation.
pub fn inspect_database(database_oid: pg_sys::Oid) -> Result<UserObjects, InspectError> {
    {
        let mut mailbox = INSPECTION.exclusive();
        mailbox.state = InspectionState::Requested;
        mailbox.database_oid = database_oid.to_u32();
        mailbox.object_count = 0;
        mailbox.set_sample("");
    }
    // SAFETY: MyProcPid is set once at backend start.
    let my_pid = unsafe { pg_sys::MyProcPid };
    let worker = BackgroundWorkerBuilder::new("cloudmig inspect database")
        .set_type("cloudmig inspect")
        .set_library("cloudmig")
        .set_function("cloudmig_inspect_database_main")
        .set_argument(Some(pg_sys::Datum::from(database_oid.to_u32())))
        .enable_spi_access()
        .set_start_time(BgWorkerStartTime::RecoveryFinished)
        .set_restart_time(None)
        .set_notify_pid(my_pid)
        .load_dynamic()
        .map_err(|_| InspectError::NoWorkerSlot)?;
    // A worker that failed to start or crashed both end here; the mailbox
    // tells whether it answered.
    let _ = worker.wait_for_shutdown();
    let mailbox = INSPECTION.share();
    if mailbox.state == InspectionState::Done && mailbox.database_oid == database_oid.to_u32() {
        Ok(UserObjects {
            count: mailbox.object_count,
            sample: mailbox.sample_text(),
        })
    } else {
        Err(InspectError::NoAnswer)
    }
}

/// Entry point of the inspection worker (named in its registration).
#[pg_guard]
#[no_mangle]
pub extern "C-unwind" fn cloudmig_inspect_database_main(arg: pg_sys::Datum) {
    BackgroundWorker::attach_signal_handlers(SignalWakeFlags::SIGTERM);
    let database_oid = pg_sys::Oid::from(arg.value() as u32);
    BackgroundWorker::connect_worker_to_spi_by_oid(Some(database_oid), None);
    let found = BackgroundWorker::transaction(|| {
        Spi::get_two::<i64, String>(USER_OBJECTS_SQL)
            .map(|(count, sample)| (count.unwrap_or(0), sample.unwrap_or_default()))
    });
    match found {
        Ok((count, sample)) => {
            let mut mailbox = INSPECTION.exclusive();
            if mailbox.database_oid == database_oid.to_u32() {
                mailbox.object_count = count;
                mailbox.set_sample(&sample);
                mailbox.state = InspectionState::Done;
            }
        }
        Err(error) => {
            pgrx::log!("cloudmig: could not inspect database {database_oid:?}: {error}");
        }
    }
}
