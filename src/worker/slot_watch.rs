//! What the task worker watches of its replication slots on the source while
//! it copies (the slots hold WAL from their snapshot on) and while it follows
//! the apply (catch-up and incremental): how much WAL the source may still
//! write before it drops what a slot needs.
//!
//! A source with `max_slot_wal_keep_size` set invalidates a slot whose
//! consumer falls that far behind (`pg_replication_slots.wal_status` becomes
//! `lost`): the changes it held are gone, so the migration cannot be
//! completed from it. Creating a new slot would silently skip them; instead:
//!
//! * once `safe_wal_size` falls below [`WARN_FRACTION`] of
//!   `max_slot_wal_keep_size`, a `warning` event says so (once per slot until
//!   it recovers above the threshold), while there is still time to act;
//! * a `lost` slot, or one that is gone, fails the task with what happened
//!   and what to do; `cloudmig.resume()` refuses such a task (55000).
//!
//! The judgement is a pure function ([`judge`]) over what the source says.

use super::txn::Failure;
use crate::source::{quote_literal, Connection, SourceError};
use std::collections::HashSet;
use std::time::{Duration, Instant};

/// How often the slots are looked at.
const CHECK_INTERVAL: Duration = Duration::from_secs(2);

/// The warning threshold: `safe_wal_size` under this fraction (a quarter) of
/// `max_slot_wal_keep_size`.
pub const WARN_FRACTION: f64 = 0.25;

/// One slot of the task as the source reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotState {
    pub slot_name: String,
    /// `reserved`, `extended`, `unreserved` or `lost`.
    pub wal_status: String,
    /// Bytes the source may still write before the slot is in danger; None
    /// when `max_slot_wal_keep_size` is -1 (no limit) or the slot is lost.
    pub safe_wal_size: Option<i64>,
}

/// What [`judge`] found about one slot.
#[derive(Debug, Clone, PartialEq)]
pub enum Finding {
    /// `safe_wal_size` is under the threshold.
    Low {
        slot: String,
        safe_bytes: i64,
        keep_bytes: i64,
    },
    /// The source invalidated the slot.
    Lost { slot: String },
    /// The slot no longer exists on the source.
    Missing { slot: String },
}

/// Judges the task's `expected` slots against what the source reports
/// (`keep_bytes`: `max_slot_wal_keep_size` in bytes, negative when unlimited).
pub fn judge(expected: &[String], found: &[SlotState], keep_bytes: i64) -> Vec<Finding> {
    let mut findings = Vec::new();
    for slot in expected {
        let Some(state) = found.iter().find(|s| &s.slot_name == slot) else {
            findings.push(Finding::Missing { slot: slot.clone() });
            continue;
        };
        if state.wal_status == "lost" {
            findings.push(Finding::Lost { slot: slot.clone() });
            continue;
        }
        if keep_bytes <= 0 {
            continue;
        }
        if let Some(safe) = state.safe_wal_size {
            if (safe as f64) < keep_bytes as f64 * WARN_FRACTION {
                findings.push(Finding::Low {
                    slot: slot.clone(),
                    safe_bytes: safe,
                    keep_bytes,
                });
            }
        }
    }
    findings
}

/// The failure a lost or missing slot ends the task with.
pub fn failure(finding: &Finding, task_id: i64) -> Option<Failure> {
    let (slot, what) = match finding {
        Finding::Lost { slot } => (
            slot,
            "was invalidated by the source (wal_status lost): the migration (a long copy, or \
             an apply that lagged or stopped) fell more than max_slot_wal_keep_size behind and \
             the source removed WAL it still needed",
        ),
        Finding::Missing { slot } => (
            slot,
            "no longer exists on the source: the changes it held are gone",
        ),
        Finding::Low { .. } => return None,
    };
    Some(Failure::with_hint(
        format!("replication slot {slot} {what}; the migration cannot be completed from it"),
        format!(
            "This task cannot continue: cancel it with SELECT cloudmig.cancel({task_id}); raise \
             max_slot_wal_keep_size on the source (or set it to -1) and start a new task from a new \
             assessment."
        ),
    ))
}

/// The warning event for a slot running out of reserved WAL.
pub fn warning(finding: &Finding) -> Option<String> {
    let Finding::Low {
        slot,
        safe_bytes,
        keep_bytes,
    } = finding
    else {
        return None;
    };
    Some(format!(
        "replication slot {slot} may be invalidated soon: the source can write only {} MB more \
         WAL before it (safe_wal_size, under {:.0}% of max_slot_wal_keep_size = {} MB); the \
         migration is behind (a long copy, or an apply lagging or stopped: see cloudmig.tasks), or \
         raise max_slot_wal_keep_size on the source",
        safe_bytes / (1024 * 1024),
        WARN_FRACTION * 100.0,
        keep_bytes / (1024 * 1024)
    ))
}

/// What the follow loop keeps between looks.
pub(super) struct SlotWatch {
    last_check: Instant,
    /// Slots a warning was given for and that have not recovered since.
    warned: HashSet<String>,
}

impl SlotWatch {
    pub(super) fn new() -> Self {
        Self {
            last_check: Instant::now() - CHECK_INTERVAL,
            warned: HashSet::new(),
        }
    }

    /// Whether it is time for a look.
    pub(super) fn due(&self) -> bool {
        self.last_check.elapsed() >= CHECK_INTERVAL
    }

    /// Counts a look that could not be made (the source is away): the next
    /// one waits a whole interval.
    pub(super) fn missed(&mut self) {
        self.last_check = Instant::now();
    }

    /// Asks the source about `slots`. An error here is the caller's to judge
    /// (the source may be away: the apply rides that out).
    pub(super) fn look(
        &mut self,
        source: &mut Connection,
        task_id: i64,
        slots: &[String],
    ) -> Result<Vec<Finding>, SourceError> {
        self.last_check = Instant::now();
        // One row even without a slot: a missing slot is a finding too.
        let rows = source.simple_query(&format!(
            "SELECT c.setting AS keep_mb, s.slot_name::text AS slot_name, \
                    coalesce(s.wal_status, '') AS wal_status, \
                    s.safe_wal_size::text AS safe_wal_size \
               FROM pg_catalog.pg_settings c \
               LEFT JOIN pg_catalog.pg_replication_slots s ON s.slot_name LIKE {} \
              WHERE c.name = 'max_slot_wal_keep_size'",
            quote_literal(&format!("cloudmig\\_{task_id}\\_%"))
        ))?;
        let mut keep_bytes = -1;
        let mut found = Vec::new();
        for row in &rows {
            if let Some(mb) = row.get("keep_mb").and_then(|v| v.parse::<i64>().ok()) {
                keep_bytes = if mb < 0 { -1 } else { mb * 1024 * 1024 };
            }
            let Some(name) = row.get("slot_name") else {
                continue;
            };
            found.push(SlotState {
                slot_name: name.to_string(),
                wal_status: row.get("wal_status").unwrap_or("").to_string(),
                safe_wal_size: row.get("safe_wal_size").and_then(|v| v.parse().ok()),
            });
        }
        let findings = judge(slots, &found, keep_bytes);
        // A slot back above the threshold may warn again later.
        self.warned.retain(|slot| {
            findings
                .iter()
                .any(|f| matches!(f, Finding::Low { slot: s, .. } if s == slot))
        });
        Ok(findings
            .into_iter()
            .filter(|f| match f {
                Finding::Low { slot, .. } => self.warned.insert(slot.clone()),
                _ => true,
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slot(name: &str, status: &str, safe: Option<i64>) -> SlotState {
        SlotState {
            slot_name: name.into(),
            wal_status: status.into(),
            safe_wal_size: safe,
        }
    }

    const MB: i64 = 1024 * 1024;

    #[test]
    fn a_healthy_slot_says_nothing() {
        let found = [slot("a", "reserved", Some(60 * MB))];
        assert!(judge(&["a".into()], &found, 64 * MB).is_empty());
        // No limit on the source: nothing to warn about.
        assert!(judge(&["a".into()], &[slot("a", "reserved", None)], -1).is_empty());
    }

    #[test]
    fn low_lost_and_missing_are_told_apart() {
        let found = [
            slot("low", "unreserved", Some(10 * MB)),
            slot("lost", "lost", None),
        ];
        let expected = ["low".to_string(), "lost".into(), "gone".into()];
        let findings = judge(&expected, &found, 64 * MB);
        assert_eq!(
            findings,
            vec![
                Finding::Low {
                    slot: "low".into(),
                    safe_bytes: 10 * MB,
                    keep_bytes: 64 * MB
                },
                Finding::Lost {
                    slot: "lost".into()
                },
                Finding::Missing {
                    slot: "gone".into()
                },
            ]
        );
        assert!(warning(&findings[0]).is_some_and(|w| w.contains("only 10 MB")));
        assert!(failure(&findings[0], 7).is_none());
        let lost = failure(&findings[1], 7).expect("a lost slot fails the task");
        assert!(lost.message.contains("invalidated"), "{}", lost.message);
        assert!(lost.hint.is_some_and(
            |h| h.contains("cloudmig.cancel(7)") && h.contains("max_slot_wal_keep_size")
        ));
    }

    #[test]
    fn a_negative_safe_size_is_low() {
        let found = [slot("a", "unreserved", Some(-MB))];
        assert_eq!(judge(&["a".into()], &found, 32 * MB).len(), 1);
    }
}
