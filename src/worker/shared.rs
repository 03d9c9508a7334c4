//! Live state in shared memory.
//!
//! * which backend is running an assessment right now (so another session can
//!   see the destination as "assessing", and a second assessment is refused);
//! * the mailbox through which an inspection worker hands its findings back to
//!   the backend that started it.
//!
//! Durable state lives in the catalog tables; this is only what must be seen
//! across sessions before anything commits.

use pgrx::prelude::*;
use pgrx::{pg_shmem_init, PGRXSharedMemory, PgLwLock};

/// The backend currently running `cloudmig.assess()`, if any.
#[derive(Copy, Clone, Default)]
pub struct AssessmentActivity {
    /// Backend pid; 0 when no assessment runs.
    pub pid: i32,
    /// When it started (PostgreSQL `TimestampTz`).
    pub started_at: i64,
}
// SAFETY: plain old data, no pointers.
unsafe impl PGRXSharedMemory for AssessmentActivity {}

/// Size of the object list an inspection worker can hand back.
pub const INSPECTION_SAMPLE_BYTES: usize = 1024;

/// Where an inspection request stands.
#[derive(Copy, Clone, PartialEq, Eq, Debug)]
#[repr(u8)]
pub enum InspectionState {
    Idle = 0,
    Requested = 1,
    Done = 2,
}

/// The mailbox between the assessing backend and its inspection worker.
#[derive(Copy, Clone)]
pub struct InspectionMailbox {
    pub state: InspectionState,
    /// The database the worker must look into (`pg_database.oid`).
    pub database_oid: u32,
    /// Number of user objects it found.
    pub object_count: i64,
    /// The first few of them, as text, truncated to fit.
    pub sample_len: usize,
    pub sample: [u8; INSPECTION_SAMPLE_BYTES],
}
// SAFETY: plain old data, no pointers.
unsafe impl PGRXSharedMemory for InspectionMailbox {}

impl Default for InspectionMailbox {
    fn default() -> Self {
        Self {
            state: InspectionState::Idle,
            database_oid: 0,
            object_count: 0,
            sample_len: 0,
            sample: [0; INSPECTION_SAMPLE_BYTES],
        }
    }
}

impl InspectionMailbox {
    /// The sample list as text.
    pub fn sample_text(&self) -> String {
        let len = self.sample_len.min(INSPECTION_SAMPLE_BYTES);
        String::from_utf8_lossy(&self.sample[..len]).into_owned()
    }

    /// Stores `text`, cut at a character boundary to fit.
    pub fn set_sample(&mut self, text: &str) {
        let mut end = text.len().min(INSPECTION_SAMPLE_BYTES);
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        self.sample[..end].copy_from_slice(&text.as_bytes()[..end]);
        self.sample_len = end;
    }
}

pub static ASSESSMENT: PgLwLock<AssessmentActivity> =
    unsafe { PgLwLock::new(c"cloudmig_assessment") };
pub static INSPECTION: PgLwLock<InspectionMailbox> =
    unsafe { PgLwLock::new(c"cloudmig_inspection") };

/// Requests the shared memory; called from `_PG_init`.
pub fn init() {
    pg_shmem_init!(ASSESSMENT);
    pg_shmem_init!(INSPECTION);
}

/// True when `pid` is a live backend of this instance. A backend that died
/// without clearing its claim (FATAL, crash) must not block others forever.
fn backend_alive(pid: i32) -> bool {
    // SAFETY: BackendPidGetProc only reads the proc array under its own lock.
    pid != 0 && unsafe { !pg_sys::BackendPidGetProc(pid).is_null() }
}

/// This backend's claim on "the" running assessment; released on drop, which
/// also runs when the assessment is cancelled or fails (the error unwinds).
pub struct AssessmentClaim(());

impl AssessmentClaim {
    /// Claims the assessment slot, or returns the pid of the live backend that
    /// holds it.
    pub fn acquire() -> Result<Self, i32> {
        let mut activity = ASSESSMENT.exclusive();
        if activity.pid != 0 && activity.pid != my_pid() && backend_alive(activity.pid) {
            return Err(activity.pid);
        }
        activity.pid = my_pid();
        // SAFETY: reads the statement start time of this backend.
        activity.started_at = unsafe { pg_sys::GetCurrentTimestamp() };
        Ok(Self(()))
    }
}

impl Drop for AssessmentClaim {
    fn drop(&mut self) {
        let mut activity = ASSESSMENT.exclusive();
        if activity.pid == my_pid() {
            *activity = AssessmentActivity::default();
        }
    }
}

/// The running assessment, if one runs in a live backend.
pub fn current_assessment() -> Option<AssessmentActivity> {
    let activity = *ASSESSMENT.share();
    backend_alive(activity.pid).then_some(activity)
}

fn my_pid() -> i32 {
    // SAFETY: MyProcPid is set once at backend start.
    unsafe { pg_sys::MyProcPid }
}
