//! `cloudmig.assess(source text, options jsonb default '{}') returns bigint`
//!
//! Runs every feasibility check against the source and this destination,
//! stores the assessment, prints a short summary as NOTICEs and returns the
//! assessment id. Moves no data and changes nothing on the source.

use super::error::{ApiError, OrRaise};
use super::secrecy::hide_statement_text;
use crate::assess::checks::{self, Limits};
use crate::assess::source_facts::{self, GatherOptions, SourceSurvey};
use crate::assess::{destination_facts, CheckStatus, Report};
use crate::catalog::as_extension_owner;
use crate::catalog::assessments::{self, NewAssessment};
use crate::guc;
use crate::source::ConnInfo;
use crate::worker::shared::{AssessmentClaim, CONNINFO_CAPACITY};
use pgrx::prelude::*;
use pgrx::JsonB;
use serde::Deserialize;
use std::collections::BTreeSet;

/// What `options` may hold; unknown keys are refused so a typo is not ignored.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct AssessOptions {
    /// Overrides `cloudmig.copy_workers` for the capacity checks.
    copy_workers: Option<u32>,
    /// Overrides `cloudmig.disk_headroom_percent`.
    disk_headroom_percent: Option<u32>,
}

fn parse_options(options: &serde_json::Value) -> Result<AssessOptions, ApiError> {
    if !options.is_object() {
        return Err(ApiError::InvalidOptions(
            "options must be a JSON object".into(),
        ));
    }
    let parsed: AssessOptions = serde_json::from_value(options.clone())
        .map_err(|e| ApiError::InvalidOptions(e.to_string()))?;
    if parsed.copy_workers == Some(0) {
        return Err(ApiError::InvalidOptions(
            "copy_workers must be at least 1".into(),
        ));
    }
    Ok(parsed)
}

fn caller_is_superuser() -> bool {
    // SAFETY: reads the current user's catalog entry on the main thread.
    unsafe { pg_sys::superuser() }
}

fn caller_has_role(role: &std::ffi::CStr) -> bool {
    // SAFETY: valid C string; missing_ok = true returns InvalidOid.
    unsafe {
        let role = pg_sys::get_role_oid(role.as_ptr(), true);
        role != pg_sys::InvalidOid && pg_sys::has_privs_of_role(pg_sys::GetUserId(), role)
    }
}

/// Lets a cancel request or a termination stop the network waits promptly.
fn check_for_interrupts() {
    pgrx::check_for_interrupts!();
}

/// Runs the feasibility assessment of `source` (a libpq conninfo string or
/// URI) and returns the id of the stored assessment.
#[pg_extern(volatile, parallel_unsafe)]
fn assess(source: &str, options: default!(JsonB, "'{}'")) -> i64 {
    hide_statement_text("SELECT cloudmig.assess(<source connection string hidden>, ...)");
    let options_value = options.0;
    let parsed = parse_options(&options_value).or_raise();
    let info = ConnInfo::parse(source).or_raise();
    // The assessment is stored here, so a standby cannot even record its
    // own destination_is_primary failure: refuse before touching the source.
    // SAFETY: reads shared recovery state.
    if unsafe { pg_sys::RecoveryInProgress() } {
        ApiError::DestinationIsStandby.raise();
    }
    // Workers get the connection string through shared memory, whole or not
    // at all: refuse now what could not be passed on later.
    let secret_source = info.to_conninfo_string();
    if secret_source.len() > CONNINFO_CAPACITY {
        ApiError::ConnInfoTooLong {
            length: secret_source.len(),
            capacity: CONNINFO_CAPACITY,
        }
        .raise();
    }
    let superuser = caller_is_superuser();
    // The passfile and TLS files are read by the server process with its own rights.
    if !info.server_files().is_empty() && !superuser && !caller_has_role(c"pg_read_server_files") {
        ApiError::PassfileNotAllowed.raise();
    }
    let _claim = AssessmentClaim::acquire()
        .map_err(ApiError::AssessmentRunning)
        .or_raise();
    let started_at = Spi::get_one::<TimestampWithTimeZone>("SELECT pg_catalog.clock_timestamp()")
        .ok()
        .flatten()
        .unwrap_or_else(|| {
            TimestampWithTimeZone::try_from(0i64).expect("zero is a valid timestamp")
        });

    let survey = source_facts::gather(
        &info,
        GatherOptions {
            io_timeout: guc::source_timeout(),
            long_transaction_seconds: guc::long_transaction_seconds(),
            interrupt_check: check_for_interrupts,
            require_password: !superuser,
        },
    );
    if let SourceSurvey::PasswordNotRequested = survey {
        ApiError::PasswordNotRequested.raise();
    }

    let locale_names: BTreeSet<String> = match &survey {
        SourceSurvey::Reached(facts) => facts
            .databases
            .iter()
            .flat_map(|d| [d.collate.clone(), d.ctype.clone()])
            .collect(),
        _ => BTreeSet::new(),
    };
    // Some of these facts (shared_preload_libraries, replication origins)
    // are superuser-only reads; a cloudmig_admin gets the same assessment as
    // a superuser, so they are read with the extension owner's rights.
    let destination = as_extension_owner(|| destination_facts::gather(&locale_names));
    let limits = Limits {
        copy_workers: parsed.copy_workers.unwrap_or_else(guc::copy_workers),
        disk_headroom_percent: parsed
            .disk_headroom_percent
            .unwrap_or_else(guc::disk_headroom_percent),
    };
    let report = checks::evaluate(&survey, &destination, limits);

    let reached = match &survey {
        SourceSurvey::Reached(facts) => Some(facts),
        _ => None,
    };
    let id = assessments::insert(NewAssessment {
        masked_source: &info.masked(),
        secret_source: &secret_source,
        options: options_value,
        started_at,
        report: &report,
        source_version: match &survey {
            SourceSurvey::Reached(facts) => Some(facts.version.clone()),
            SourceSurvey::TooOld { version, .. } => Some(version.clone()),
            _ => None,
        },
        source_system_identifier: reached
            .and_then(|f| f.replication.as_ref().ok().map(|id| id.systemid.clone())),
        source_databases: reached.map(|f| f.databases.iter().map(|d| d.name.clone()).collect()),
        source_size_bytes: reached.map(|f| f.total_size_bytes() as i64),
    })
    .map_err(|e| ApiError::Catalog(e.to_string()))
    .or_raise();

    notify_summary(id, &info, &report);
    id
}

/// The NOTICE a DBA reads in psql: the verdict, then each check that did not
/// pass with its fix.
fn notify_summary(id: i64, info: &ConnInfo, report: &Report) {
    let verdict = if report.passed() { "passed" } else { "failed" };
    let mut lines = vec![format!(
        "assessment {id} of {} {verdict}: {} passed, {} warning(s), {} failed",
        info.display_target(),
        report.count(CheckStatus::Pass),
        report.count(CheckStatus::Warn),
        report.count(CheckStatus::Fail),
    )];
    for check in report
        .checks
        .iter()
        .filter(|c| c.status != CheckStatus::Pass)
    {
        lines.push(format!(
            "  {} {}: {}",
            check.status.as_str().to_uppercase(),
            check.name,
            check.detail
        ));
        if let Some(fix) = &check.fix {
            lines.push(format!("    fix: {fix}"));
        }
    }
    lines.push(format!(
        "details: SELECT * FROM cloudmig.assessment_report WHERE assessment_id = {id};"
    ));
    pgrx::notice!("{}", lines.join("\n"));
}
