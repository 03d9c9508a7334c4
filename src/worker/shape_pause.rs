//! The apply worker's pause when the source's DDL outran the local schema.
//!
//! A change failed, and the relation it belongs to no longer fits its local
//! table (`apply::shape`: a table or column missing here, a type that could
//! not take a value, a NOT NULL column here the source dropped). Instead of
//! failing the task, the apply worker:
//!
//! 1. aborts the local transaction: nothing of the batch is committed, the
//!    replication origin stays before the transaction that needs the new
//!    shape, so exactly-once holds when it is streamed again;
//! 2. closes the stream (the slot keeps the changes) and publishes the pause
//!    in its shared-memory slot: relation, difference, the DDL to run here,
//!    the waiting transaction's commit LSN; the task worker records it
//!    (`worker::ddl_watch`);
//! 3. looks at the local table again every second, in a transaction of its
//!    own (which also takes in the relation cache invalidations of the DBA's
//!    DDL), and streams again from the origin once the table fits, or
//!    changed in any way (a change that is not enough pauses again at the
//!    same transaction).
//!
//! Other databases' apply workers are not affected.

use super::shared::{self, ApplySlot, APPLY, TASK};
use super::txn::{self, Failure};
use crate::apply::applier::Applier;
use crate::apply::shape::{self, Failed, ShapePause};
use crate::source::pgoutput::Message;
use crate::source::Lsn;
use std::time::Duration;

/// How often a paused apply looks at the local table again.
const RECHECK: Duration = Duration::from_secs(1);

/// A pause, with the commit LSN of the source transaction that waits.
pub struct Paused {
    pub pause: ShapePause,
    pub waiting_lsn: Option<Lsn>,
}

/// Whether `failure`, raised by `message`, is a local table that no longer
/// fits the source's relation. Call it after the local transaction aborted.
pub fn after_failure(
    applier: &Applier,
    message: &Message,
    failure: &Failure,
    waiting_lsn: Option<Lsn>,
) -> Option<Paused> {
    let relations: Vec<u32> = match message {
        Message::Insert { relation, .. }
        | Message::Update { relation, .. }
        | Message::Delete { relation, .. } => vec![*relation],
        Message::Truncate { relations, .. } => relations.clone(),
        _ => return None,
    };
    let failed = match failure.sqlstate {
        Some(code) if is_data_exception(code) => Failed::Conversion,
        Some(pgrx::PgSqlErrorCode::ERRCODE_NOT_NULL_VIOLATION) => Failed::NotNull,
        _ => Failed::Other,
    };
    let found = txn::run(|| {
        for oid in &relations {
            // SAFETY: in the transaction txn::run opened.
            let Some(announced) = (unsafe { applier.announced(*oid) }) else {
                continue;
            };
            // SAFETY: as above.
            if let Some(pause) = unsafe { shape::check(&announced, failed) } {
                return Ok(Some(pause));
            }
        }
        Ok(None)
    });
    match found {
        Ok(pause) => pause.map(|pause| Paused { pause, waiting_lsn }),
        Err(error) => {
            pgrx::log!("cloudmig: could not compare the local table with the source's: {error}");
            None
        }
    }
}

/// SQLSTATE class 22 (data exception): a value the local type refused.
fn is_data_exception(code: pgrx::PgSqlErrorCode) -> bool {
    // A SQLSTATE packs six bits per character, the class in the low twelve.
    const CLASS_BITS: i32 = 0xFFF;
    (code as i32 & CLASS_BITS) == (pgrx::PgSqlErrorCode::ERRCODE_DATA_EXCEPTION as i32 & CLASS_BITS)
}

/// Publishes the pause, then waits until the local table may fit (Ok) or
/// the worker is asked to stop (Ok too: the caller checks).
pub fn wait(index: usize, paused: &Paused) -> Result<(), Failure> {
    let pause = &paused.pause;
    let description = pause.describe();
    let hint = pause.hint();
    pgrx::log!(
        "cloudmig: apply paused at {}: {description}; {hint}",
        pause.relation.display_name()
    );
    update(index, |slot| {
        slot.paused = true;
        slot.pause_count = slot.pause_count.wrapping_add(1);
        slot.pause_relation.set(&pause.relation.display_name());
        slot.pause_difference.set(&description);
        slot.pause_hint.set(&hint);
        slot.pause_lsn = paused.waiting_lsn.map_or(0, |lsn| lsn.0);
        slot.caught_up = false;
    });
    shared::wake(TASK.share().worker_pid);
    loop {
        if txn::shutdown_requested() {
            return Ok(());
        }
        txn::nap(RECHECK);
        // SAFETY: in the transaction txn::run opened.
        if txn::run(|| Ok(unsafe { shape::may_resume(pause) }))? {
            break;
        }
    }
    pgrx::log!(
        "cloudmig: apply resumes: {} changed here",
        pause.relation.display_name()
    );
    update(index, |slot| slot.paused = false);
    shared::wake(TASK.share().worker_pid);
    Ok(())
}

fn update(index: usize, change: impl FnOnce(&mut ApplySlot)) {
    if let Some(slot) = APPLY.exclusive().get_mut(index) {
        change(slot);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pgrx::PgSqlErrorCode::*;

    #[test]
    fn conversion_errors_are_data_exceptions_and_others_are_not() {
        for code in [
            ERRCODE_INVALID_TEXT_REPRESENTATION,
            ERRCODE_STRING_DATA_RIGHT_TRUNCATION,
            ERRCODE_NUMERIC_VALUE_OUT_OF_RANGE,
        ] {
            assert!(is_data_exception(code), "{code:?}");
        }
        for code in [ERRCODE_UNIQUE_VIOLATION, ERRCODE_UNDEFINED_COLUMN] {
            assert!(!is_data_exception(code), "{code:?}");
        }
    }
}
