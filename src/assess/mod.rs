//! The feasibility assessment: everything that would make a migration fail
//! later, found before any data moves.
//!
//! It runs in two steps so that the judging is plain, testable code:
//! 1. *gather*: [`source_facts`] asks the source server (one connection per
//!    database, plus a replication connection), [`destination_facts`] asks
//!    this instance; both only read.
//! 2. *judge*: [`checks::evaluate`] turns the facts into [`CheckResult`]s,
//!    one per stable check name, each with a fix a DBA can act on. This part
//!    has no I/O and is unit-tested on hand-made facts.

pub mod checks;
pub mod destination_facts;
pub mod source_facts;

use std::fmt;

/// The verdict of one check.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum CheckStatus {
    Pass,
    /// The migration can run, but something needs a decision or will degrade it.
    Warn,
    /// The migration would fail: fix this first.
    Fail,
}

impl CheckStatus {
    /// The spelling stored in `cloudmig.assessment_checks.status`.
    pub fn as_str(self) -> &'static str {
        match self {
            CheckStatus::Pass => "pass",
            CheckStatus::Warn => "warn",
            CheckStatus::Fail => "fail",
        }
    }
}

impl fmt::Display for CheckStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One check's outcome.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckResult {
    /// Stable name, documented in the README; dashboards filter on it.
    pub name: &'static str,
    pub status: CheckStatus,
    /// What was seen, naming the objects or values involved.
    pub detail: String,
    /// What to do about it; absent only for a pass.
    pub fix: Option<String>,
}

impl CheckResult {
    pub fn pass(name: &'static str, detail: impl Into<String>) -> Self {
        Self {
            name,
            status: CheckStatus::Pass,
            detail: detail.into(),
            fix: None,
        }
    }

    pub fn warn(name: &'static str, detail: impl Into<String>, fix: impl Into<String>) -> Self {
        Self {
            name,
            status: CheckStatus::Warn,
            detail: detail.into(),
            fix: Some(fix.into()),
        }
    }

    pub fn fail(name: &'static str, detail: impl Into<String>, fix: impl Into<String>) -> Self {
        Self {
            name,
            status: CheckStatus::Fail,
            detail: detail.into(),
            fix: Some(fix.into()),
        }
    }
}

/// The checks of one assessment, in a stable order.
#[derive(Debug, Clone, Default)]
pub struct Report {
    pub checks: Vec<CheckResult>,
}

impl Report {
    /// An assessment passes when no check fails.
    pub fn passed(&self) -> bool {
        self.count(CheckStatus::Fail) == 0
    }

    pub fn count(&self, status: CheckStatus) -> usize {
        self.checks.iter().filter(|c| c.status == status).count()
    }
}

/// Renders a list of names for a detail line: the first `limit`, then how
/// many more, so a detail stays readable with 10,000 tables.
pub fn name_list(names: &[String], limit: usize) -> String {
    let mut out = names
        .iter()
        .take(limit)
        .cloned()
        .collect::<Vec<_>>()
        .join(", ");
    if names.len() > limit {
        out.push_str(&format!(" and {} more", names.len() - limit));
    }
    out
}

/// Human-readable bytes (binary units, as pg_size_pretty).
pub fn pretty_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["bytes", "kB", "MB", "GB", "TB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 10240.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    format!("{:.0} {}", value, UNITS[unit])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn name_list_truncates_with_count() {
        let names: Vec<String> = (1..=5).map(|i| format!("t{i}")).collect();
        assert_eq!(name_list(&names, 3), "t1, t2, t3 and 2 more");
        assert_eq!(name_list(&names, 10), "t1, t2, t3, t4, t5");
    }

    #[test]
    fn pretty_bytes_like_pg_size_pretty() {
        assert_eq!(pretty_bytes(8192), "8192 bytes");
        assert_eq!(pretty_bytes(10 * 1024 * 1024), "10 MB");
        assert_eq!(pretty_bytes(3 * 1024 * 1024 * 1024 * 1024), "3072 GB");
    }

    #[test]
    fn report_passes_without_failures() {
        let mut report = Report::default();
        report.checks.push(CheckResult::pass("a", "fine"));
        report.checks.push(CheckResult::warn("b", "meh", "do x"));
        assert!(report.passed());
        report.checks.push(CheckResult::fail("c", "bad", "do y"));
        assert!(!report.passed());
        assert_eq!(report.count(CheckStatus::Warn), 1);
    }
}
