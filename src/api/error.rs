//! Errors at the SQL boundary: each becomes a specific SQLSTATE, a message
//! that says what failed (PostgreSQL style: lower case, no period) and a hint
//! that says what to do. None ever carries a password.

use crate::source::{ConnInfoError, SourceError};
use pgrx::pg_sys::panic::ErrorReport;
use pgrx::prelude::*;
use pgrx::PgSqlErrorCode;

/// Everything an API function can refuse with.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("invalid source connection string: {0}")]
    InvalidConnInfo(#[from] ConnInfoError),
    #[error("invalid options: {0}")]
    InvalidOptions(String),
    #[error("only superusers and members of pg_read_server_files may name a passfile or TLS certificate and key files")]
    PassfileNotAllowed,
    #[error("the source did not ask for a password")]
    PasswordNotRequested,
    #[error("cloudmig cannot run on a standby: this instance is in recovery")]
    DestinationIsStandby,
    #[error("another assessment is running (backend pid {0})")]
    AssessmentRunning(i32),
    #[error("assessment {0} does not exist")]
    UnknownAssessment(i64),
    #[error("assessment {0} did not pass")]
    AssessmentFailed(i64),
    #[error("task {0} is still active")]
    TaskActive(i64),
    #[error("the source is no longer the instance assessment {assessment} checked (system identifier {found}, expected {expected})")]
    SourceChanged {
        assessment: i64,
        expected: String,
        found: String,
    },
    #[error("task {0} does not exist")]
    UnknownTask(i64),
    #[error("{} table(s) have no primary key or replica identity: {}", .0.len(), crate::assess::name_list(.0, 10))]
    TablesWithoutIdentity(Vec<String>),
    #[error("the worker of task {0} (pid {1}) did not stop within 60 seconds")]
    WorkerBusy(i64, i32),
    #[error("task {task} did not reach {target} in time (it is in {now})")]
    WaitTimeout {
        task: i64,
        target: String,
        now: String,
    },
    #[error("switchover refused: {message}")]
    SwitchoverRefused { message: String, hint: String },
    #[error("the source password of assessment {0} is no longer kept")]
    SecretGone(i64),
    #[error("task {0} is {1}: it has no source password to replace")]
    TaskFinished(i64, String),
    #[error("task {0} has no source connection string any more")]
    TaskSecretGone(i64),
    #[error("the password must not be null or empty")]
    EmptyPassword,
    #[error("the source connection string would be {length} bytes long, more than the {capacity} bytes cloudmig can pass to its workers")]
    ConnInfoTooLong { length: usize, capacity: usize },
    #[error("task {0} is {1}, not failed: there is nothing to resume")]
    TaskNotFailed(i64, String),
    #[error("task {0} failed before cloudmig recorded the phase it failed in")]
    FailedPhaseUnknown(i64),
    #[error("replication slot {slot} of task {task} {why} on the source")]
    SlotUnusable {
        task: i64,
        slot: String,
        why: String,
    },
    #[error("invalid LSN {0:?}")]
    InvalidLsn(String),
    #[error("the apply of task {task} is already past {lsn}: there is nothing to skip there")]
    SkipAlreadyApplied { task: i64, lsn: String },
    #[error("catalog access failed: {0}")]
    Catalog(String),
    #[error("{0}")]
    Source(#[from] SourceError),
}

impl ApiError {
    fn sqlstate(&self) -> PgSqlErrorCode {
        use PgSqlErrorCode::*;
        match self {
            ApiError::InvalidConnInfo(_) | ApiError::InvalidOptions(_) => {
                ERRCODE_INVALID_PARAMETER_VALUE
            }
            ApiError::PassfileNotAllowed => ERRCODE_INSUFFICIENT_PRIVILEGE,
            ApiError::PasswordNotRequested => ERRCODE_S_R_E_PROHIBITED_SQL_STATEMENT_ATTEMPTED,
            ApiError::DestinationIsStandby => ERRCODE_READ_ONLY_SQL_TRANSACTION,
            ApiError::AssessmentRunning(_) => ERRCODE_OBJECT_IN_USE,
            ApiError::UnknownAssessment(_) | ApiError::UnknownTask(_) => ERRCODE_UNDEFINED_OBJECT,
            ApiError::TablesWithoutIdentity(_) => ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            ApiError::AssessmentFailed(_) | ApiError::SourceChanged { .. } => {
                ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE
            }
            ApiError::TaskActive(_) | ApiError::WorkerBusy(..) => ERRCODE_OBJECT_IN_USE,
            ApiError::WaitTimeout { .. } => ERRCODE_QUERY_CANCELED,
            ApiError::SwitchoverRefused { .. } => ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            ApiError::SecretGone(_) | ApiError::TaskFinished(..) | ApiError::TaskSecretGone(_) => {
                ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE
            }
            ApiError::TaskNotFailed(..)
            | ApiError::FailedPhaseUnknown(_)
            | ApiError::SlotUnusable { .. }
            | ApiError::SkipAlreadyApplied { .. } => ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            ApiError::InvalidLsn(_) => ERRCODE_INVALID_TEXT_REPRESENTATION,
            ApiError::EmptyPassword => ERRCODE_INVALID_PARAMETER_VALUE,
            ApiError::ConnInfoTooLong { .. } => ERRCODE_PROGRAM_LIMIT_EXCEEDED,
            ApiError::Catalog(_) => ERRCODE_INTERNAL_ERROR,
            ApiError::Source(_) => ERRCODE_CONNECTION_FAILURE,
        }
    }

    fn hint(&self) -> Option<String> {
        match self {
            ApiError::InvalidConnInfo(_) => Some(
                "Pass a libpq connection string such as 'host=db1 port=5432 user=migrator \
                 dbname=postgres' or a postgresql:// URI."
                    .into(),
            ),
            ApiError::InvalidOptions(_) => None,
            ApiError::PassfileNotAllowed => Some(
                "Put the password in the connection string, or ask a superuser to run the \
                 assessment."
                    .into(),
            ),
            ApiError::PasswordNotRequested => Some(
                "Non-superusers may only use sources that authenticate them with a password: \
                 configure the source's pg_hba.conf with scram-sha-256 or md5 for this account."
                    .into(),
            ),
            ApiError::DestinationIsStandby => Some(
                "A migration writes into its destination: install cloudmig on the primary and \
                 run it there."
                    .into(),
            ),
            ApiError::AssessmentRunning(_) => {
                Some("Wait for it to finish (see cloudmig.instance_status) and try again.".into())
            }
            ApiError::UnknownAssessment(_) => {
                Some("See cloudmig.assessments; run cloudmig.assess() first.".into())
            }
            ApiError::AssessmentFailed(id) => Some(format!(
                "Fix the failed checks (SELECT name, detail, fix FROM cloudmig.assessment_report \
                 WHERE assessment_id = {id} AND status = 'fail') and assess again."
            )),
            ApiError::TaskActive(id) => Some(format!(
                "Follow it in cloudmig.tasks, or stop it with SELECT cloudmig.cancel({id});"
            )),
            ApiError::SourceChanged { .. } => {
                Some("Assess the source again and start from the new assessment.".into())
            }
            ApiError::TablesWithoutIdentity(_) => Some(
                "Once published, the source would refuse UPDATE and DELETE on them. Add primary \
                 keys, or start with '{\"replica_identity_full\": true}' to give them REPLICA \
                 IDENTITY FULL on the source."
                    .into(),
            ),
            ApiError::UnknownTask(_) => Some("See cloudmig.tasks.".into()),
            ApiError::WorkerBusy(..) => Some("Try again; see the server log.".into()),
            ApiError::WaitTimeout { .. } => Some("Wait longer, or watch cloudmig.tasks.".into()),
            ApiError::SwitchoverRefused { hint, .. } => (!hint.is_empty()).then(|| hint.clone()),
            ApiError::SecretGone(_) => Some(
                "Its password was removed after cloudmig.secret_retention, or a task started \
                 from it is finished: assess again and start from the new assessment."
                    .into(),
            ),
            ApiError::TaskFinished(..) => None,
            ApiError::TaskSecretGone(id) => Some(format!(
                "Cancel it with SELECT cloudmig.cancel({id}); and start anew from a new assessment."
            )),
            ApiError::TaskNotFailed(..) => {
                Some("Only a failed task resumes; see cloudmig.tasks for its phase.".into())
            }
            ApiError::FailedPhaseUnknown(id) | ApiError::SlotUnusable { task: id, .. } => {
                Some(format!(
                    "It cannot continue: cancel it with SELECT cloudmig.cancel({id}); and start                      anew from a new assessment."
                ))
            }
            ApiError::InvalidLsn(_) => Some(
                "Give the commit LSN the error named, as in '0/16B3748' (cloudmig.tasks.last_error_lsn)."
                    .into(),
            ),
            ApiError::SkipAlreadyApplied { task, .. } => Some(format!(
                "Check the LSN in cloudmig.tasks.last_error_lsn; to continue without skipping, \
                 SELECT cloudmig.resume({task});"
            )),
            ApiError::EmptyPassword => None,
            ApiError::ConnInfoTooLong { .. } => Some(
                "Shorten the connection string (host names, application_name) or the password."
                    .into(),
            ),
            ApiError::Catalog(_) => None,
            ApiError::Source(error) => error.hint(),
        }
    }

    /// Raises this error as a PostgreSQL ERROR; does not return.
    pub fn raise(self) -> ! {
        let mut report = ErrorReport::new(self.sqlstate(), self.to_string(), "cloudmig");
        if let Some(hint) = self.hint() {
            report = report.set_hint(hint);
        }
        report.report(PgLogLevel::ERROR);
        unreachable!("an ERROR report does not return")
    }
}

/// Unwraps a result at the SQL boundary, raising the error.
pub trait OrRaise<T> {
    fn or_raise(self) -> T;
}

impl<T, E: Into<ApiError>> OrRaise<T> for Result<T, E> {
    fn or_raise(self) -> T {
        match self {
            Ok(value) => value,
            Err(error) => error.into().raise(),
        }
    }
}
