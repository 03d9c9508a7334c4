//! The task worker after the copy: it runs one apply worker per database
//! (see [`super::apply`]), follows the source's WAL position to measure lag,
//! moves the task from `catchup` to `incremental` once every database caught
//! up, and carries out `cloudmig.switchover()`:
//!
//! 1. copy, while the source still writes, what changed in the large
//!    objects since they were last copied, and the materialized views'
//!    contents (the bulk of what is not streamed); then refuse unless the
//!    lag is under the limit and the apply's recent pace drains it well
//!    within the timeout (so the source is not fenced for nothing);
//! 2. fence the source: every migrated database gets
//!    `default_transaction_read_only = on` and the other sessions are
//!    terminated (but exempted users), so no new write can start;
//! 3. write a logical message in each database (its LSN is the final
//!    position there) and wait until each apply worker has applied up to it;
//! 4. set the sequences, copy what changed in the large objects and the
//!    materialized views since step 1 (usually nothing);
//! 5. stop the apply, drop the slots and publications on the source, mark
//!    the task completed with the downtime and each step's duration.
//!
//! Any failure after the fence undoes it (the source is writable again) and
//! the task returns to `incremental`.

use super::apply::{self, ApplyStart, MESSAGE_PREFIX};
use super::ddl_watch::DdlWatch;
use super::fence::Fence;
use super::jobs::{Job, Stop};
use super::shared::{ApplySlot, JobKind, SwitchoverState, APPLY, MAX_JOB_SLOTS, TASK};
use super::slot_watch::{self, SlotWatch};
use super::task::Runner;
use super::txn::{self, Failure};
use crate::catalog::tasks::{self, Phase, TaskDatabase};
use crate::copy::objects::{
    self, LargeObjectCounts, LargeObjectPass, LargeObjectState, MaterializedViewState,
};
use crate::source::{quote_ident, quote_literal, Connection, Lsn, SourceError};
use pgrx::bgworkers::{BackgroundWorkerStatus, DynamicBackgroundWorker};
use pgrx::prelude::*;
use std::time::{Duration, Instant};

/// Lag under which a catching-up task is considered caught up.
const CAUGHT_UP_BYTES: u64 = 1024 * 1024;

/// A switchover request as the worker reads it.
struct Request {
    max_lag_bytes: u64,
    timeout: Duration,
    terminate_sessions: bool,
    exempt_users: Vec<String>,
    verify: bool,
    checksums: bool,
}

/// One table compared on both sides.
pub struct Verdict {
    pub database: String,
    pub schema: String,
    pub table: String,
    pub source_rows: i64,
    pub destination_rows: i64,
    pub matches: bool,
    pub detail: String,
}

/// Where the verdicts of the last verification of a task are written.
pub fn verify_file(task_id: i64) -> std::path::PathBuf {
    super::task::work_dir(task_id).join("verify.tsv")
}

/// What the pass before the fence copied of one database.
struct Copied {
    /// Its large objects, as copied.
    large_objects: Vec<LargeObjectState>,
    /// Its materialized views' states, as read before the copy.
    views: Vec<MaterializedViewState>,
}

/// Step durations of a completed switchover.
#[derive(Default)]
struct Report {
    /// The pass before the fence (large objects, materialized views).
    before_fence_ms: i64,
    /// What the large objects' passes before the fence and inside the window changed.
    large_objects_before: LargeObjectCounts,
    large_objects_window: LargeObjectCounts,
    /// Materialized views copied again inside the window.
    views_window: usize,
    fence_ms: i64,
    drain_ms: i64,
    objects_ms: i64,
    cleanup_ms: i64,
    downtime_ms: i64,
    final_lsn: Lsn,
}

fn millis(since: Instant) -> i64 {
    since.elapsed().as_millis() as i64
}

/// Bytes of source WAL not yet applied here (idle databases count as
/// applied up to what the source said it sent).
pub fn lag_of(slot: &ApplySlot) -> u64 {
    slot.source_lsn.saturating_sub(slot.applied_lsn)
}

/// How far back the apply's pace is measured.
const PACE_WINDOW: Duration = Duration::from_secs(5);
/// How long a switchover watches an apply whose pace is not known yet.
const PACE_WATCH: Duration = Duration::from_secs(3);

/// The apply's recent progress per database, sampled by the follow loop each
/// time it reads the source's position, so a switchover can tell before it
/// fences the source whether the lag can be drained within its timeout.
#[derive(Default)]
struct Pace {
    /// (when, applied LSN of each database), oldest first, within the window.
    samples: std::collections::VecDeque<(Instant, Vec<u64>)>,
}

impl Pace {
    fn sample(&mut self, slots: &[ApplySlot]) {
        let now = Instant::now();
        self.samples
            .push_back((now, slots.iter().map(|s| s.applied_lsn).collect()));
        while self
            .samples
            .front()
            .is_some_and(|(at, _)| now.duration_since(*at) > PACE_WINDOW)
        {
            self.samples.pop_front();
        }
    }

    /// Bytes per second database `index` applied lately: the lower of the
    /// rates over the whole window and over its last two seconds (so a stall
    /// shows at once), each once at least a second of it was seen since the
    /// apply started. Under load that is the source's write rate when the
    /// apply keeps up, and the apply's capacity when it does not: the drain
    /// after the fence goes at least as fast.
    fn rate(&self, index: usize) -> Option<f64> {
        let whole = self.rate_since(index, PACE_WINDOW);
        let recent = self.rate_since(index, Duration::from_secs(2));
        match (whole, recent) {
            (Some(whole), Some(recent)) => Some(whole.min(recent)),
            (whole, recent) => whole.or(recent),
        }
    }

    fn rate_since(&self, index: usize, span: Duration) -> Option<f64> {
        let (last_at, last) = self.samples.back()?;
        let last = *last.get(index)?;
        // The oldest sample in the span taken while the apply was running
        // (before it starts its applied position is 0).
        let (first_at, first) = self
            .samples
            .iter()
            .filter(|(at, _)| last_at.duration_since(*at) <= span)
            .map(|(at, applied)| (*at, applied.get(index).copied().unwrap_or(0)))
            .find(|(_, applied)| *applied > 0)?;
        let seconds = last_at.duration_since(first_at).as_secs_f64();
        if seconds < 1.0 {
            return None;
        }
        Some(last.saturating_sub(first) as f64 / seconds)
    }
}

/// Whether a database's apply has nothing left to drain but the source's
/// next keepalive.
fn nothing_to_drain(lag: u64, caught_up: bool) -> bool {
    lag == 0 || (caught_up && lag < CAUGHT_UP_BYTES)
}

/// Why the apply of a database may not drain its `lag` in `timeout` at
/// `rate` bytes per second (None: it will). A `caught_up` apply with a small
/// lag is only waiting for the source's next keepalive; any other must have
/// shown a pace (a second or two after it started) at which the drain fits in
/// half the timeout, as the objects step follows it. Refusing costs a retry;
/// fencing for a drain that cannot finish stops the source's writes.
fn too_slow_to_drain(
    lag: u64,
    caught_up: bool,
    rate: Option<f64>,
    timeout: Duration,
) -> Option<String> {
    if nothing_to_drain(lag, caught_up) {
        return None;
    }
    let Some(rate) = rate else {
        return Some(format!(
            "the apply is {lag} bytes behind and has not run long enough to show its pace"
        ));
    };
    let budget = timeout.as_secs_f64() / 2.0;
    if rate <= 0.0 {
        return Some(format!(
            "the apply is {lag} bytes behind and made no progress lately"
        ));
    }
    let needed = lag as f64 / rate;
    (needed > budget).then(|| {
        format!(
            "the apply is {lag} bytes behind at {:.0} bytes/s: draining would take about {:.0} s, \
             more than half the timeout of {} s",
            rate,
            needed,
            timeout.as_secs()
        )
    })
}

impl Runner {
    /// Writes what each apply worker needs: its slot, publication, origin,
    /// and the tables copied at a later snapshot than the slot's start.
    pub(super) fn prepare_apply(&self) -> Result<(), Stop> {
        let task_id = self.task.id;
        for (ordinal, database) in self.databases()?.into_iter().enumerate() {
            let datname = database.datname.clone();
            let later: Vec<(String, String)> = txn::spi(|| {
                Spi::connect(|client| {
                    client
                        .select(
                            "SELECT t.schema_name || '.' || t.table_name, t.sync_lsn::text \
                               FROM cloudmig.table_copy t JOIN cloudmig.task_database d USING (task_id, datname) \
                              WHERE t.task_id = $1 AND t.datname = $2 AND t.sync_lsn > d.consistent_lsn",
                            None,
                            &[task_id.into(), datname.as_str().into()],
                        )?
                        .map(|row| Ok((row.get::<String>(1)?.unwrap_or_default(), row.get::<String>(2)?.unwrap_or_default())))
                        .collect()
                })
            })?;
            let sync_file = self.work_dir.join(format!("sync-{ordinal}.tsv"));
            let lines: String = later
                .iter()
                .map(|(table, lsn)| format!("{table}\t{lsn}\n"))
                .collect();
            std::fs::write(&sync_file, lines).map_err(|e| {
                Stop::Failed(Failure::new(format!(
                    "could not write {}: {e}",
                    sync_file.display()
                )))
            })?;
            let start = ApplyStart {
                slot_name: database.slot_name.clone(),
                publication: tasks::publication_name(task_id),
                origin_name: apply::origin_name(task_id, ordinal),
                sync_file: sync_file.display().to_string(),
            };
            apply::write_start_file(task_id, ordinal, &start).map_err(|e| {
                Stop::Failed(Failure::new(format!(
                    "could not write the apply parameters: {e}"
                )))
            })?;
        }
        Ok(())
    }

    fn start_apply(&self, index: usize, database: &str) -> Result<DynamicBackgroundWorker, Stop> {
        apply::start_worker(index, database).map_err(Stop::Failed)
    }

    /// Runs the apply until a switchover completes, or a stop.
    pub(super) fn follow(&mut self) -> Result<(), Stop> {
        let databases = self.databases()?;
        if databases.len() > MAX_JOB_SLOTS {
            return Err(Stop::Failed(Failure::new(format!(
                "a task streams at most {MAX_JOB_SLOTS} databases at once"
            ))));
        }
        let task_id = self.task.id;
        let skip_lsn = txn::spi(|| tasks::skip_lsn(task_id))?
            .and_then(|lsn| lsn.parse::<Lsn>().ok())
            .unwrap_or_default();
        {
            let mut slots = APPLY.exclusive();
            for (index, slot) in slots.iter_mut().enumerate() {
                *slot = ApplySlot::default();
                if let Some(database) = databases.get(index) {
                    slot.task_id = self.task.id;
                    slot.skip_lsn = skip_lsn.0;
                    slot.database.set(&database.datname);
                    slot.start_lsn = database
                        .consistent_lsn
                        .as_deref()
                        .and_then(|lsn| lsn.parse::<Lsn>().ok())
                        .map(|lsn| lsn.0)
                        .unwrap_or(0);
                }
            }
        }
        if self.task.phase == Phase::SwitchingOver {
            // The worker died mid-switchover: make the source writable again.
            self.unfence(&databases, None);
            self.set_phase(
                Phase::Incremental,
                "switchover interrupted; the source is writable again",
            )?;
        }
        let mut workers: Vec<Option<DynamicBackgroundWorker>> = Vec::new();
        for (index, database) in databases.iter().enumerate() {
            workers.push(Some(self.start_apply(index, &database.datname)?));
        }
        let outcome = self.follow_loop(&databases, &mut workers);
        for worker in workers.into_iter().flatten() {
            apply::stop_worker(worker);
        }
        outcome
    }

    /// Turns the apply workers' retries into events and the task's outage
    /// columns: a warning per attempt, an info when one streams again.
    fn record_apply_outages(
        &self,
        databases: &[TaskDatabase],
        seen: &mut [u32],
    ) -> Result<(), Stop> {
        let task_id = self.task.id;
        for (index, database) in databases.iter().enumerate() {
            let (attempts, cause, ms_left) = {
                let slots = APPLY.share();
                let slot = &slots[index];
                (
                    slot.outage_attempts,
                    slot.outage_cause.get(),
                    slot.outage_ms_left,
                )
            };
            let before = seen[index];
            if attempts == before {
                continue;
            }
            seen[index] = attempts;
            let datname = database.datname.as_str();
            if attempts == 0 {
                let event = format!("streaming again after {before} retry(ies)");
                txn::spi(|| tasks::outage_over(task_id, Some(datname), &event))?;
                continue;
            }
            let left = ms_left as f64 / 1000.0;
            let event = format!(
                "the apply is interrupted ({cause}); retrying (attempt {attempts}; this outage \
                 gives up in {left:.0}s)"
            );
            txn::spi(|| {
                tasks::note_outage(
                    task_id,
                    Some(datname),
                    &cause,
                    attempts as i32,
                    left,
                    &event,
                )
            })?;
        }
        Ok(())
    }

    /// Records a transaction skipped at `cloudmig.skip`'s request, once the
    /// apply committed past it, and forgets the request.
    fn record_skipped(&self, databases: &[TaskDatabase]) -> Result<(), Stop> {
        let task_id = self.task.id;
        for (index, database) in databases.iter().enumerate() {
            let skipped = {
                let mut slots = APPLY.exclusive();
                std::mem::take(&mut slots[index].skipped_lsn)
            };
            if skipped == 0 {
                continue;
            }
            let event = format!(
                "skipped the source transaction committing at {}, as cloudmig.skip() asked: \
                 its changes are not applied here",
                Lsn(skipped)
            );
            let datname = database.datname.as_str();
            txn::spi(|| {
                tasks::set_skip_lsn(task_id, None)?;
                tasks::add_event(task_id, Some(datname), "warning", &event)
            })?;
            for slot in APPLY.exclusive().iter_mut() {
                slot.skip_lsn = 0;
            }
        }
        Ok(())
    }

    /// Turns what the slot watch found into warning events, or fails the
    /// task for a lost slot (never replaced silently by a new one).
    pub(super) fn judge_slots(
        &self,
        databases: &[TaskDatabase],
        findings: &[slot_watch::Finding],
    ) -> Result<(), Stop> {
        for finding in findings {
            if let Some(failure) = slot_watch::failure(finding, self.task.id) {
                return Err(Stop::Failed(failure));
            }
            if let (Some(message), slot_watch::Finding::Low { slot, .. }) =
                (slot_watch::warning(finding), finding)
            {
                let datname = databases
                    .iter()
                    .find(|d| &d.slot_name == slot)
                    .map(|d| d.datname.as_str());
                self.event(datname, "warning", &message)?;
            }
        }
        Ok(())
    }

    fn follow_loop(
        &mut self,
        databases: &[TaskDatabase],
        workers: &mut [Option<DynamicBackgroundWorker>],
    ) -> Result<(), Stop> {
        let first = databases
            .first()
            .map(|d| d.datname.clone())
            .unwrap_or_else(|| "postgres".into());
        let mut source: Option<Connection> = None;
        let mut pace = Pace::default();
        let mut last_poll = Instant::now() - Duration::from_secs(10);
        let mut outage_attempts = vec![0u32; databases.len()];
        let mut ddl_watch = DdlWatch::new(databases.len());
        let mut slot_watch = SlotWatch::new();
        let slots: Vec<String> = databases.iter().map(|d| d.slot_name.clone()).collect();
        loop {
            self.check()?;
            self.watch_ddl(databases, &mut ddl_watch, source.is_some())?;
            self.record_apply_outages(databases, &mut outage_attempts)?;
            self.record_skipped(databases)?;
            if last_poll.elapsed() >= Duration::from_secs(1) {
                last_poll = Instant::now();
                if source.is_none() {
                    source = self.connect(&first, false).ok();
                }
                let position = source
                    .as_mut()
                    .map(|c| c.simple_query("SELECT pg_catalog.pg_current_wal_lsn()::text AS lsn"));
                match position {
                    Some(Ok(rows)) => {
                        if let Some(lsn) = rows
                            .first()
                            .and_then(|r| r.get("lsn"))
                            .and_then(|l| l.parse::<Lsn>().ok())
                        {
                            let mut slots = APPLY.exclusive();
                            for slot in slots.iter_mut().take(databases.len()) {
                                slot.source_lsn = lsn.0;
                            }
                            pace.sample(&slots[..databases.len()]);
                        }
                    }
                    Some(Err(_)) => source = None,
                    None => {}
                }
            }
            if slot_watch.due() {
                if let Some(connection) = source.as_mut() {
                    match slot_watch.look(connection, self.task.id, &slots) {
                        Ok(findings) => self.judge_slots(databases, &findings)?,
                        Err(_) => source = None,
                    }
                }
            }
            // A stopped apply worker: its error fails the task, else restart it.
            for (index, worker) in workers.iter_mut().enumerate() {
                let stopped = worker.as_ref().is_none_or(|w| {
                    matches!(
                        w.pid(),
                        Err(BackgroundWorkerStatus::Stopped
                            | BackgroundWorkerStatus::PostmasterDied)
                    )
                });
                if !stopped {
                    continue;
                }
                let (error, hint, error_lsn) = {
                    let slots = APPLY.share();
                    (
                        slots[index].error.get(),
                        slots[index].error_hint.get(),
                        slots[index].error_lsn,
                    )
                };
                if !error.is_empty() {
                    // A slot the source invalidated stops the apply with the
                    // walsender's error: say what happened and what to do.
                    if let Some(connection) = source.as_mut() {
                        if let Ok(findings) =
                            SlotWatch::new().look(connection, self.task.id, &slots)
                        {
                            self.judge_slots(databases, &findings)?;
                        }
                    }
                    // Final: the apply rides out outages and transient
                    // errors itself, within their windows.
                    let mut failure =
                        Failure::new(format!("database {}: {error}", databases[index].datname));
                    failure.hint = (!hint.is_empty()).then_some(hint);
                    failure.lsn = (error_lsn != 0).then_some(Lsn(error_lsn));
                    return Err(Stop::Failed(failure));
                }
                *worker = Some(self.start_apply(index, &databases[index].datname)?);
            }
            if self.task.phase == Phase::Catchup {
                let caught_up = APPLY
                    .share()
                    .iter()
                    .take(databases.len())
                    .all(|slot| slot.source_lsn > 0 && lag_of(slot) < CAUGHT_UP_BYTES);
                if caught_up {
                    self.set_phase(
                        Phase::Incremental,
                        "every database caught up; switchover is possible",
                    )?;
                }
            }
            if let Some(checksums) = take_verify_request(self.task.id) {
                let outcome = self.verify(databases, checksums, None).map(|verdicts| {
                    let text: String = verdicts
                        .iter()
                        .map(|v| {
                            format!(
                                "{}\t{}\t{}\t{}\t{}\t{}\t{}\n",
                                v.database,
                                v.schema,
                                v.table,
                                v.source_rows,
                                v.destination_rows,
                                v.matches,
                                v.detail
                            )
                        })
                        .collect();
                    std::fs::write(verify_file(self.task.id), text)
                });
                let mut task = TASK.exclusive();
                match outcome {
                    Ok(Ok(())) => task.verify.state = SwitchoverState::Done,
                    Ok(Err(error)) => {
                        task.verify
                            .message
                            .set(&format!("could not write the verdicts: {error}"));
                        task.verify.state = SwitchoverState::Failed;
                    }
                    Err(failure) => {
                        task.verify.message.set(&failure.message);
                        task.verify.state = SwitchoverState::Failed;
                    }
                }
            }
            if let Some(request) = take_request(self.task.id) {
                // The fence ends every session but the switchover's own.
                if let Some(connection) = source.take() {
                    connection.close();
                }
                let outcome = self
                    .record_apply_outages(databases, &mut outage_attempts)
                    .map_err(stop_failure)
                    .and_then(|()| {
                        self.switchover(
                            databases,
                            workers,
                            &request,
                            &mut pace,
                            &mut outage_attempts,
                        )
                    });
                match outcome {
                    Ok(report) => {
                        publish_outcome(Ok(&report));
                        return Ok(());
                    }
                    Err(failure) => {
                        publish_outcome(Err(&failure));
                        if self.task.phase == Phase::SwitchingOver {
                            self.set_phase(
                                Phase::Incremental,
                                &format!("switchover abandoned: {}", failure.message),
                            )?;
                        }
                    }
                }
            }
            txn::nap(Duration::from_millis(200));
        }
    }

    fn switchover(
        &mut self,
        databases: &[TaskDatabase],
        workers: &mut [Option<DynamicBackgroundWorker>],
        request: &Request,
        pace: &mut Pace,
        outage_attempts: &mut [u32],
    ) -> Result<Report, Failure> {
        if self.task.phase != Phase::Incremental {
            return Err(Failure::with_hint(
                format!(
                    "task {} is in {}, not incremental",
                    self.task.id, self.task.phase
                ),
                "wait until cloudmig.tasks shows phase incremental",
            ));
        }
        if let Some(refusal) = super::ddl_watch::paused_refusal(databases) {
            return Err(refusal);
        }
        // The fence closes the source's databases to new sessions, the
        // apply's replication connections included: an apply that is
        // reconnecting after an outage (a walsender ended, a network reset)
        // would be shut out and the switchover abandoned. Give it a moment
        // to stream again, then refuse while the source is still writable.
        let reconnect_until = Instant::now() + request.timeout / 4;
        loop {
            // An apply that streams again says so before the switchover
            // goes on (its 'streaming again' event comes first).
            self.record_apply_outages(databases, outage_attempts)
                .map_err(stop_failure)?;
            let reconnecting = {
                let slots = APPLY.share();
                databases
                    .iter()
                    .enumerate()
                    .find(|(index, _)| slots[*index].outage_attempts > 0)
                    .map(|(index, d)| (d.datname.clone(), slots[index].outage_cause.get()))
            };
            let Some((datname, cause)) = reconnecting else {
                break;
            };
            if Instant::now() >= reconnect_until {
                return Err(Failure::with_hint(
                    format!(
                        "the apply of database {datname} is reconnecting to the source ({cause}); \
                         the fence would shut it out"
                    ),
                    "try again once cloudmig.tasks shows no outage (outage_attempts = 0)",
                ));
            }
            txn::nap(Duration::from_millis(200));
        }
        // The bulk of what is not streamed, while the source still writes:
        // the window then only has what changes after this.
        let before_started = Instant::now();
        let (known, large_objects_before) = self.before_fence(databases)?;
        let before_fence_ms = millis(before_started);
        // The follow loop did not read the source's position meanwhile: the
        // lag below must not be judged on an old one.
        self.refresh_source_position(databases)?;
        let lag = APPLY
            .share()
            .iter()
            .take(databases.len())
            .map(lag_of)
            .max()
            .unwrap_or(0);
        if lag > request.max_lag_bytes {
            return Err(Failure::with_hint(
                format!(
                    "the lag is {lag} bytes, over the limit of {}",
                    request.max_lag_bytes
                ),
                "wait until the apply catches up, or raise max_lag_bytes",
            ));
        }
        // Fencing only to time out would stop the source's writes for nothing.
        // An apply that started a moment ago (a switchover called right after
        // the task reached incremental) has no pace yet: watch it for a few
        // seconds rather than refuse at once.
        let watch_until = Instant::now() + PACE_WATCH.min(request.timeout / 4);
        while Instant::now() < watch_until {
            let slots = APPLY.share();
            // An apply that shows no progress over a small lag is usually
            // between two steps (a commit waiting for the local WAL flush, a
            // keepalive on its way): watch it too before judging.
            let unknown = (0..databases.len()).any(|index| {
                let slot = &slots[index];
                let lag = lag_of(slot);
                !nothing_to_drain(lag, slot.caught_up)
                    && match pace.rate(index) {
                        None => true,
                        Some(rate) => rate <= 0.0 && lag < CAUGHT_UP_BYTES,
                    }
            });
            if !unknown {
                break;
            }
            pace.sample(&slots[..databases.len()]);
            drop(slots);
            txn::nap(Duration::from_millis(250));
        }
        let slots = APPLY.share();
        for (index, database) in databases.iter().enumerate() {
            pgrx::debug1!(
                "cloudmig: switchover of task {}: database {} lags {} bytes (caught up: {}), applies {:?} bytes/s lately",
                self.task.id,
                database.datname,
                lag_of(&slots[index]),
                slots[index].caught_up,
                pace.rate(index)
            );
        }
        let too_slow = databases.iter().enumerate().find_map(|(index, database)| {
            too_slow_to_drain(
                lag_of(&slots[index]),
                slots[index].caught_up,
                pace.rate(index),
                request.timeout,
            )
            .map(|why| format!("database {}: {why}", database.datname))
        });
        drop(slots);
        if let Some(why) = too_slow {
            return Err(Failure::with_hint(
                why,
                "wait until the apply catches up (cloudmig.apply_progress), or raise timeout_seconds",
            ));
        }
        // Every source session needed after the fence, opened before it.
        let mut fence = self.open_fence(databases)?;
        if let Err(stop) = self.set_phase(Phase::SwitchingOver, "") {
            fence.close();
            return Err(stop_failure(stop));
        }
        let started = Instant::now();
        let outcome = self
            .fence(
                &mut fence,
                databases,
                request.terminate_sessions,
                &request.exempt_users,
            )
            .and_then(|()| {
                let fence_ms = millis(started);
                self.drain_and_finish(databases, workers, request, started, &mut fence, &known)
                    .map(|report| Report {
                        fence_ms,
                        before_fence_ms,
                        large_objects_before,
                        ..report
                    })
            });
        if outcome.is_err() {
            self.unfence(databases, Some(&mut fence));
        }
        fence.close();
        outcome
    }

    /// Before the fence, per database: copies what changed in the large
    /// objects since they were last copied (a database worker compares
    /// digests of each object's chunks on both sides and moves only the
    /// differing ones) and gives the materialized views the source's
    /// contents. Returns the large objects as copied and the views' states,
    /// for the pass inside the window to compare with, and what changed.
    fn before_fence(
        &mut self,
        databases: &[TaskDatabase],
    ) -> Result<(Vec<Copied>, LargeObjectCounts), Failure> {
        TASK.exclusive().switchover.preparing = true;
        let outcome = self.copy_before_fence(databases);
        TASK.exclusive().switchover.preparing = false;
        outcome
    }

    /// Reads the source's current WAL position into the apply slots, as the
    /// follow loop does every second.
    fn refresh_source_position(&mut self, databases: &[TaskDatabase]) -> Result<(), Failure> {
        let Some(first) = databases.first() else {
            return Ok(());
        };
        let mut source = self.connect(&first.datname, false).map_err(stop_failure)?;
        let rows = source.simple_query("SELECT pg_catalog.pg_current_wal_lsn()::text AS lsn");
        source.close();
        let lsn = rows
            .map_err(|e| Failure::from_source("reading the source's position", &e))?
            .first()
            .and_then(|r| r.get("lsn"))
            .and_then(|l| l.parse::<Lsn>().ok())
            .ok_or_else(|| Failure::new("the source returned no WAL position"))?;
        for slot in APPLY.exclusive().iter_mut().take(databases.len()) {
            slot.source_lsn = lsn.0;
        }
        Ok(())
    }

    fn copy_before_fence(
        &mut self,
        databases: &[TaskDatabase],
    ) -> Result<(Vec<Copied>, LargeObjectCounts), Failure> {
        let mut known = Vec::new();
        let mut total = LargeObjectCounts::default();
        let caller = self.task.started_by.unwrap_or(pg_sys::InvalidOid);
        for (ordinal, database) in databases.iter().enumerate() {
            let path = self
                .work_dir
                .join(format!("switchover-large-objects-{ordinal}.json"));
            // Left by an earlier attempt: never taken for this one's.
            let _ = std::fs::remove_file(&path);
            // Read before the jobs' own reads: a view refreshed in between
            // differs inside the window and is copied again there.
            let mut source = self
                .connect(&database.datname, false)
                .map_err(stop_failure)?;
            let views = objects::materialized_view_states(&mut source);
            source.close();
            let views = views.map_err(|e| {
                Failure::new(format!(
                    "reading the materialized views of source database {}: {e}",
                    database.datname
                ))
            })?;
            // What an earlier pass copied (the states it read before
            // copying, so the rows here are at least that new): only the
            // views changed since are copied again. Nothing else changes the
            // views here. The first pass copies them all.
            let record = self
                .work_dir
                .join(format!("switchover-views-{ordinal}.json"));
            let earlier: Option<Vec<MaterializedViewState>> = std::fs::read_to_string(&record)
                .ok()
                .and_then(|text| serde_json::from_str(&text).ok());
            let changed: Vec<(String, String)> = views
                .iter()
                .filter(|view| earlier.as_ref().is_none_or(|e| !e.contains(view)))
                .map(|view| (view.schema.clone(), view.name.clone()))
                .collect();
            let list = self
                .work_dir
                .join(format!("switchover-views-{ordinal}.todo.json"));
            std::fs::write(&list, serde_json::to_string(&changed).unwrap_or_default())
                .map_err(|e| Failure::new(format!("could not write {}: {e}", list.display())))?;
            // No snapshot: each job reads the source as it is now.
            let jobs = vec![
                Job {
                    kind: JobKind::CopyLargeObjects,
                    path: path.display().to_string(),
                    caller,
                    ..Job::default()
                },
                Job {
                    kind: JobKind::CopyMaterializedViews,
                    path: list.display().to_string(),
                    caller,
                    ..Job::default()
                },
            ];
            self.run_jobs(&database.datname, jobs, 1, &mut |_| Ok(()), &mut |_, _| {
                Ok(())
            })
            .map_err(stop_failure)?;
            std::fs::write(&record, serde_json::to_string(&views).unwrap_or_default())
                .map_err(|e| Failure::new(format!("could not write {}: {e}", record.display())))?;
            if !changed.is_empty() {
                self.event(
                    Some(&database.datname),
                    "info",
                    &format!(
                        "switchover, before the fence: {} of {} materialized view(s) copied",
                        changed.len(),
                        views.len()
                    ),
                )
                .map_err(stop_failure)?;
            }
            let pass: LargeObjectPass = std::fs::read_to_string(&path)
                .map_err(|e| e.to_string())
                .and_then(|text| serde_json::from_str(&text).map_err(|e| e.to_string()))
                .map_err(|e| Failure::new(format!("could not read {}: {e}", path.display())))?;
            if !pass.counts.is_empty() {
                self.event(
                    Some(&database.datname),
                    "info",
                    &format!("switchover, before the fence: {}", pass.counts),
                )
                .map_err(stop_failure)?;
            }
            total.add(&pass.counts);
            known.push(Copied {
                large_objects: pass.objects,
                views,
            });
        }
        Ok((known, total))
    }

    /// Writes a marker (a logical message) in each database through the
    /// fence's sessions; its position is where that database's stream must
    /// have been applied up to.
    ///
    /// A non-transactional message is not flushed by itself, and a walsender
    /// sends only flushed WAL: it would wait for the source's WAL writer
    /// (`wal_writer_delay`, 200 ms by default), twice in the window. So the
    /// same transaction takes a transaction id, whose commit, synchronous on
    /// the source alone (`local`: no wait for a standby), flushes the message
    /// too. The transaction changes nothing, and pgoutput sends no empty
    /// transaction, so the apply never sees it.
    fn write_markers(&self, fence: &mut Fence, what: &str) -> Result<Vec<Lsn>, Failure> {
        let mut markers = Vec::new();
        for session in fence.sessions.iter_mut() {
            let rows = session
                .simple_query(&format!(
                    "SET synchronous_commit = local; \
                     SELECT pg_catalog.pg_logical_emit_message(false, {}, {})::text AS lsn, \
                            pg_catalog.txid_current() AS flushed_by_commit",
                    quote_literal(MESSAGE_PREFIX),
                    quote_literal(what)
                ))
                .map_err(|e| Failure::from_source("writing the switchover marker", &e))?;
            let lsn = rows
                .first()
                .and_then(|r| r.get("lsn"))
                .and_then(|l| l.parse::<Lsn>().ok())
                .ok_or_else(|| {
                    Failure::new("the source returned no LSN for the switchover marker")
                })?;
            markers.push(lsn);
        }
        Ok(markers)
    }

    /// Waits until each database's apply has committed everything before its marker.
    fn wait_for_markers(&self, markers: &[Lsn], deadline: Instant) -> Result<(), Failure> {
        loop {
            if Instant::now() > deadline {
                return Err(Failure::with_hint(
                    "the apply did not reach the source's final position in time",
                    "raise the switchover timeout, or check cloudmig.apply_progress",
                ));
            }
            if let Some(Stop::Cancelled | Stop::Shutdown) = self.should_stop() {
                return Err(Failure::new("the task worker is stopping"));
            }
            let slots = APPLY.share();
            let drained = markers
                .iter()
                .enumerate()
                .all(|(i, marker)| slots[i].fence_seen_lsn >= marker.0);
            let failed = slots
                .iter()
                .take(markers.len())
                .find(|s| !s.error.get().is_empty())
                .map(|s| s.error.get());
            drop(slots);
            if let Some(error) = failed {
                return Err(Failure::new(format!("the apply stopped: {error}")));
            }
            if drained {
                return Ok(());
            }
            txn::nap(Duration::from_millis(5));
        }
    }

    fn drain_and_finish(
        &mut self,
        databases: &[TaskDatabase],
        workers: &mut [Option<DynamicBackgroundWorker>],
        request: &Request,
        started: Instant,
        fence: &mut Fence,
        known: &[Copied],
    ) -> Result<Report, Failure> {
        let deadline = started + request.timeout;
        // The final position of each database: a marker written after the fence.
        let drain_started = Instant::now();
        let markers = self.write_markers(fence, "switchover")?;
        self.wait_for_markers(&markers, deadline)?;
        // The apply commits asynchronously: make everything durable now.
        // SAFETY: flushes this instance's WAL up to its current insert position.
        unsafe { pg_sys::XLogFlush(pg_sys::GetXLogInsertRecPtr()) };
        let drain_ms = millis(drain_started);
        if request.verify {
            let differing: Vec<String> = self
                .verify(databases, request.checksums, Some(&mut *fence))?
                .into_iter()
                .filter(|v| !v.matches)
                .map(|v| format!("{}: {}.{} ({})", v.database, v.schema, v.table, v.detail))
                .collect();
            if !differing.is_empty() {
                return Err(Failure::with_hint(
                    format!(
                        "verification found {} differing table(s): {}",
                        differing.len(),
                        crate::assess::name_list(&differing, 10)
                    ),
                    "compare the tables, fix the destination, and switch over again",
                ));
            }
        }

        let objects_started = Instant::now();
        let mut large_objects_window = LargeObjectCounts::default();
        let mut views_window = 0;
        for (ordinal, database) in databases.iter().enumerate() {
            let path = self
                .work_dir
                .join(format!("switchover-objects-{ordinal}.jsonl"));
            let copied = known.get(ordinal);
            let (counts, views) = self.export_objects(
                &mut fence.sessions[ordinal],
                copied.map_or(&[][..], |c| c.large_objects.as_slice()),
                copied.map_or(&[][..], |c| c.views.as_slice()),
                &path,
            )?;
            large_objects_window.add(&counts);
            views_window += views;
            let job = Job {
                kind: JobKind::ApplyObjects,
                path: path.display().to_string(),
                caller: self.task.started_by.unwrap_or(pg_sys::InvalidOid),
                ..Job::default()
            };
            self.run_jobs(
                &database.datname,
                vec![job],
                1,
                &mut |_| Ok(()),
                &mut |_, _| Ok(()),
            )
            .map_err(stop_failure)?;
        }
        let objects_ms = millis(objects_started);
        // Nothing may have been committed on the source after the first
        // marker: a second one, once applied, shows the stream up to now.
        let closing = self.write_markers(fence, "switchover check")?;
        self.wait_for_markers(&closing, deadline)?;
        let late = {
            let slots = APPLY.share();
            databases
                .iter()
                .zip(&markers)
                .enumerate()
                .find(|(index, (_, marker))| slots[*index].last_transaction_lsn > marker.0)
                .map(|(index, (database, _))| {
                    (database.datname.clone(), slots[index].last_transaction_lsn)
                })
        };
        if let Some((database, lsn)) = late {
            return Err(Failure::with_hint(
                format!(
                    "a write reached source database {database} after the fence (a transaction \
                     ending at {}), so the source was not quiet; it was applied here too",
                    Lsn(lsn)
                ),
                "find the session that still writes (an exempt user's, or a background worker \
                 that ignores ALLOW_CONNECTIONS) and stop it, then switch over again",
            ));
        }
        // The destination is ready for the application now: the downtime ends
        // here; dropping what the task left on the source does not delay it.
        let downtime_ms = millis(started);

        let cleanup_started = Instant::now();
        for worker in workers.iter_mut() {
            if let Some(worker) = worker.take() {
                apply::stop_worker(worker);
            }
        }
        // The walsenders of the stopped apply workers release the slots a
        // moment later. The fence's sessions do it: the source refuses new ones.
        let mut problems = Vec::new();
        for _ in 0..50 {
            problems = fence
                .sessions
                .iter_mut()
                .zip(databases)
                .enumerate()
                .flat_map(|(index, (session, database))| {
                    super::cleanup::drop_with(session, self.task.id, &database.datname, index == 0)
                })
                .collect();
            if problems.is_empty() {
                break;
            }
            txn::nap(Duration::from_millis(100));
        }
        for problem in &problems {
            self.event(
                None,
                "warning",
                &format!("{problem}; drop it on the source by hand"),
            )
            .map_err(stop_failure)?;
        }
        let task_id = self.task.id;
        if let Err(failure) = txn::spi(|| super::cleanup::drop_origins(task_id)) {
            self.event(
                None,
                "warning",
                &format!(
                    "could not drop the replication origins cloudmig_{task_id}_*: {failure}; \
                     drop them with pg_replication_origin_drop()"
                ),
            )
            .map_err(stop_failure)?;
        }
        let cleanup_ms = millis(cleanup_started);
        let report = Report {
            large_objects_window,
            views_window,
            drain_ms,
            objects_ms,
            cleanup_ms,
            downtime_ms,
            final_lsn: markers.iter().copied().max().unwrap_or_default(),
            ..Report::default()
        };
        self.event(
            None,
            "info",
            &format!(
                "switchover, inside the window: {large_objects_window}; \
                 {views_window} materialized view(s) copied again"
            ),
        )
        .map_err(stop_failure)?;
        let message = format!(
            "downtime {} ms (fence, drain {} ms, sequences and large objects {} ms; then cleanup {} ms); \
             final source LSN {}; the source databases stay read-only and refuse connections",
            report.downtime_ms, report.drain_ms, report.objects_ms, report.cleanup_ms, report.final_lsn
        );
        self.set_phase(Phase::Completed, &message)
            .map_err(stop_failure)?;
        Ok(report)
    }
}

impl Runner {
    /// Compares every copied table's row count (and checksum) between the
    /// source and here. Meaningful once the source is fenced, or when nothing
    /// writes to it; in flight, counts differ by the lag.
    /// With `fence`, through its sessions (new connections are refused
    /// while the source is fenced).
    fn verify(
        &self,
        databases: &[TaskDatabase],
        checksums: bool,
        mut fence: Option<&mut Fence>,
    ) -> Result<Vec<Verdict>, Failure> {
        let task_id = self.task.id;
        let mut verdicts = Vec::new();
        for (ordinal, database) in databases.iter().enumerate() {
            let datname = database.datname.clone();
            let tables: Vec<(String, String)> = txn::spi(|| {
                Spi::connect(|client| {
                    client
                        .select(
                            "SELECT schema_name, table_name FROM cloudmig.table_copy \
                              WHERE task_id = $1 AND datname = $2 ORDER BY 1, 2",
                            None,
                            &[task_id.into(), datname.as_str().into()],
                        )?
                        .map(|row| {
                            Ok((
                                row.get::<String>(1)?.unwrap_or_default(),
                                row.get::<String>(2)?.unwrap_or_default(),
                            ))
                        })
                        .collect()
                })
            })?;
            let list = self.work_dir.join(format!("verify-{ordinal}.list"));
            let text: String = tables.iter().map(|(s, t)| format!("{s}\t{t}\n")).collect();
            std::fs::write(&list, text)
                .map_err(|e| Failure::new(format!("could not write {}: {e}", list.display())))?;
            let job = Job {
                kind: JobKind::CountRows,
                path: list.display().to_string(),
                checksums,
                ..Job::default()
            };
            self.run_jobs(&datname, vec![job], 1, &mut |_| Ok(()), &mut |_, _| Ok(()))
                .map_err(stop_failure)?;
            let here: std::collections::HashMap<(String, String), (i64, String)> =
                std::fs::read_to_string(format!("{}.out", list.display()))
                    .map_err(|e| {
                        Failure::new(format!("could not read the destination's counts: {e}"))
                    })?
                    .lines()
                    .filter_map(|line| {
                        let mut parts = line.split('\t');
                        let (schema, table, rows) = (parts.next()?, parts.next()?, parts.next()?);
                        let checksum = parts.next().unwrap_or("");
                        Some((
                            (schema.to_string(), table.to_string()),
                            (rows.parse().ok()?, checksum.to_string()),
                        ))
                    })
                    .collect();
            let mut own = None;
            let connection = match fence.as_deref_mut() {
                Some(fence) => &mut fence.sessions[ordinal],
                None => own.insert(self.connect(&datname, false).map_err(stop_failure)?),
            };
            let source_failure = |e: SourceError| {
                Failure::from_source(&format!("counting on source database {datname}"), &e)
            };
            connection
                .execute("SET TimeZone = 'UTC'")
                .map_err(source_failure)?;
            connection
                .execute("SET DateStyle = 'ISO'")
                .map_err(source_failure)?;
            for (schema, table) in tables {
                let qualified = format!("{}.{}", quote_ident(&schema), quote_ident(&table));
                let rows = connection
                    .simple_query(&crate::copy::fingerprint_sql(&qualified, checksums))
                    .map_err(source_failure)?;
                let source_rows: i64 = rows
                    .first()
                    .and_then(|r| r.get("rows"))
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(-1);
                let source_sum = rows
                    .first()
                    .and_then(|r| r.get("checksum"))
                    .unwrap_or("")
                    .to_string();
                let (destination_rows, destination_sum) = here
                    .get(&(schema.clone(), table.clone()))
                    .cloned()
                    .unwrap_or((-1, String::new()));
                let (matches, detail) = if source_rows != destination_rows {
                    (false, "row count differs".to_string())
                } else if checksums && source_sum != destination_sum {
                    (false, "checksum differs".to_string())
                } else {
                    (
                        true,
                        if checksums {
                            "rows and checksum match"
                        } else {
                            "row count matches"
                        }
                        .to_string(),
                    )
                };
                verdicts.push(Verdict {
                    database: datname.clone(),
                    schema,
                    table,
                    source_rows,
                    destination_rows,
                    matches,
                    detail,
                });
            }
            if let Some(connection) = own {
                connection.close();
            }
        }
        Ok(verdicts)
    }
}

/// Takes a pending verification request for `task_id`; returns whether it wants checksums.
fn take_verify_request(task_id: i64) -> Option<bool> {
    let mut task = TASK.exclusive();
    let exchange = &mut task.verify;
    if exchange.state != SwitchoverState::Requested || exchange.task_id != task_id {
        return None;
    }
    exchange.state = SwitchoverState::Running;
    Some(exchange.checksums)
}

pub(super) fn stop_failure(stop: Stop) -> Failure {
    match stop {
        Stop::Failed(failure) => failure,
        Stop::Cancelled => Failure::new("the task was cancelled"),
        Stop::Shutdown => Failure::new("the server is shutting down"),
    }
}

/// Takes a pending switchover request for `task_id`, marking it running.
fn take_request(task_id: i64) -> Option<Request> {
    let mut task = TASK.exclusive();
    let exchange = &mut task.switchover;
    if exchange.state != SwitchoverState::Requested || exchange.task_id != task_id {
        return None;
    }
    exchange.state = SwitchoverState::Running;
    Some(Request {
        max_lag_bytes: exchange.max_lag_bytes.max(0) as u64,
        timeout: Duration::from_millis(exchange.timeout_ms.max(0) as u64),
        terminate_sessions: exchange.terminate_sessions,
        verify: exchange.verify,
        checksums: exchange.checksums,
        exempt_users: exchange
            .exempt_users
            .get()
            .split(',')
            .map(str::trim)
            .filter(|u| !u.is_empty())
            .map(str::to_string)
            .collect(),
    })
}

fn publish_outcome(outcome: Result<&Report, &Failure>) {
    // The waiting backend polls the exchange every few milliseconds.
    let mut task = TASK.exclusive();
    let exchange = &mut task.switchover;
    match outcome {
        Ok(report) => {
            exchange.state = SwitchoverState::Done;
            exchange.downtime_ms = report.downtime_ms;
            exchange.fence_ms = report.fence_ms;
            exchange.drain_ms = report.drain_ms;
            exchange.objects_ms = report.objects_ms;
            exchange.before_fence_ms = report.before_fence_ms;
            exchange.large_objects_before = report.large_objects_before.changed() as i64;
            exchange.large_objects_window = report.large_objects_window.changed() as i64;
            exchange.large_object_bytes_window = report.large_objects_window.bytes;
            exchange.views_window = report.views_window as i64;
            exchange.cleanup_ms = report.cleanup_ms;
            exchange.final_lsn = report.final_lsn.0;
            exchange.message.set("");
        }
        Err(failure) => {
            exchange.state = SwitchoverState::Failed;
            exchange.message.set(&failure.message);
            exchange.hint.set(failure.hint.as_deref().unwrap_or(""));
        }
    }
}
