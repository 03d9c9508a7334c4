//! The launcher: a static background worker, started with the server, that
//! keeps the active task running. It connects to `cloudmig.database`, and
//! every second (or when woken by `cloudmig.start()`) starts a task worker
//! for a task that needs one and has none, e.g. after the destination
//! restarted mid-copy. It also removes the source passwords of assessments
//! nobody started within `cloudmig.secret_retention`.

use super::shared::{self, LAUNCHER_PID};
use super::txn;
use crate::catalog::{secrets, tasks};
use crate::guc;
use pgrx::bgworkers::{
    BackgroundWorker, BackgroundWorkerBuilder, BgWorkerStartTime, SignalWakeFlags,
};
use pgrx::prelude::*;
use std::time::{Duration, Instant};

/// Registers the launcher; called from `_PG_init`.
pub fn register() {
    BackgroundWorkerBuilder::new("cloudmig launcher")
        .set_type("cloudmig launcher")
        .set_library("cloudmig")
        .set_function("cloudmig_launcher_main")
        .enable_spi_access()
        .set_start_time(BgWorkerStartTime::RecoveryFinished)
        .set_restart_time(Some(Duration::from_secs(5)))
        .load();
}

/// Least time between two starts of a task worker for the same task, so a
/// worker that keeps crashing does not spin.
const RESTART_DELAY: Duration = Duration::from_secs(5);

/// How often the launcher removes source passwords nothing needs any more.
const SECRET_PURGE_INTERVAL: Duration = Duration::from_secs(10);

/// Removes the secrets of assessments not started within
/// `cloudmig.secret_retention` (and any a finished task left).
fn purge_secrets() {
    let purged = txn::spi(|| {
        let installed = Spi::get_one::<bool>(
            "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_extension WHERE extname = 'cloudmig')",
        )?
        .unwrap_or(false);
        if !installed {
            return Ok(0);
        }
        secrets::purge(guc::secret_retention_seconds())
    });
    match purged {
        Ok(0) => {}
        Ok(n) => pgrx::log!("cloudmig launcher: removed {n} source password(s) no task needs"),
        Err(failure) => pgrx::log!("cloudmig launcher: {failure}"),
    }
}

#[pg_guard]
#[no_mangle]
pub extern "C-unwind" fn cloudmig_launcher_main(_arg: pg_sys::Datum) {
    BackgroundWorker::attach_signal_handlers(SignalWakeFlags::SIGHUP | SignalWakeFlags::SIGTERM);
    let database = guc::database();
    BackgroundWorker::connect_worker_to_spi(Some(&database), None);
    // SAFETY: MyProcPid is set at process start.
    *LAUNCHER_PID.exclusive() = unsafe { pg_sys::MyProcPid };
    crate::catalog::pin_search_path(pg_sys::GucAction::GUC_ACTION_SET);
    let mut last_start: Option<(i64, Instant)> = None;
    let mut next_purge = Instant::now();
    while !txn::shutdown_requested() {
        if Instant::now() >= next_purge {
            purge_secrets();
            next_purge = Instant::now() + SECRET_PURGE_INTERVAL;
        }
        let due = txn::spi(|| {
            let installed = Spi::get_one::<bool>(
                "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_extension WHERE extname = 'cloudmig')",
            )?
            .unwrap_or(false);
            if !installed {
                return Ok(None);
            }
            let Some(id) = tasks::active_task_id()? else {
                return Ok(None);
            };
            let task = tasks::load(id)?;
            Ok(task.filter(|t| t.phase.needs_worker() && shared::cancel_requested() != Some(t.id)))
        });
        match due {
            Ok(Some(task)) if shared::task_worker_pid(task.id).is_none() => {
                let recently = matches!(last_start, Some((id, at)) if id == task.id && at.elapsed() < RESTART_DELAY);
                if !recently {
                    super::task::start_worker(task.id);
                    last_start = Some((task.id, Instant::now()));
                }
            }
            Ok(_) => {}
            Err(failure) => pgrx::log!("cloudmig launcher: {failure}"),
        }
        txn::nap(Duration::from_secs(1));
    }
    *LAUNCHER_PID.exclusive() = 0;
}
