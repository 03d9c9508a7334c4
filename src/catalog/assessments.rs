//! `cloudmig.assessments` and `cloudmig.assessment_checks` (the secret goes
//! to [`super::secrets`]).

use crate::assess::{CheckStatus, Report};
use pgrx::prelude::*;
use pgrx::JsonB;

/// Everything one assessment row records.
pub struct NewAssessment<'a> {
    /// Conninfo with the password masked.
    pub masked_source: &'a str,
    /// Conninfo with the password, stored in the owner-only secrets table.
    pub secret_source: &'a str,
    pub options: serde_json::Value,
    pub started_at: TimestampWithTimeZone,
    pub report: &'a Report,
    pub source_version: Option<String>,
    pub source_system_identifier: Option<String>,
    pub source_databases: Option<Vec<String>>,
    pub source_size_bytes: Option<i64>,
}

/// Stores an assessment with its checks and secret; returns its id.
pub fn insert(new: NewAssessment<'_>) -> Result<i64, pgrx::spi::Error> {
    super::as_extension_owner(|| {
        let report = new.report;
        let id = Spi::get_one_with_args::<i64>(
            "INSERT INTO cloudmig.assessments (source, options, started_at, finished_at, passed, \
                 checks_passed, checks_warned, checks_failed, source_version, \
                 source_system_identifier, source_databases, source_size_bytes) \
             VALUES ($1, $2, $3, pg_catalog.clock_timestamp(), $4, $5, $6, $7, $8, $9, $10, $11) \
             RETURNING id",
            &[
                new.masked_source.into(),
                JsonB(new.options).into(),
                new.started_at.into(),
                report.passed().into(),
                (report.count(CheckStatus::Pass) as i32).into(),
                (report.count(CheckStatus::Warn) as i32).into(),
                (report.count(CheckStatus::Fail) as i32).into(),
                new.source_version.into(),
                new.source_system_identifier.into(),
                new.source_databases.into(),
                new.source_size_bytes.into(),
            ],
        )?
        .unwrap_or_default();

        let names: Vec<String> = report.checks.iter().map(|c| c.name.to_string()).collect();
        let statuses: Vec<String> = report
            .checks
            .iter()
            .map(|c| c.status.as_str().to_string())
            .collect();
        let details: Vec<String> = report.checks.iter().map(|c| c.detail.clone()).collect();
        let fixes: Vec<Option<String>> = report.checks.iter().map(|c| c.fix.clone()).collect();
        Spi::run_with_args(
            "INSERT INTO cloudmig.assessment_checks (assessment_id, ordinal, name, status, detail, fix) \
             SELECT $1, t.ordinal, t.name, t.status, t.detail, t.fix \
               FROM unnest($2::text[], $3::text[], $4::text[], $5::text[]) \
                    WITH ORDINALITY AS t(name, status, detail, fix, ordinal)",
            &[id.into(), names.into(), statuses.into(), details.into(), fixes.into()],
        )?;
        super::secrets::store(id, new.secret_source)?;
        Ok(id)
    })
}
