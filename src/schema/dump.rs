//! Runs the destination's own client programs (`pg_dump`, `pg_dumpall`)
//! against the source, and `pg_restore` on what they saved here.
//!
//! They come from the directory of this server's binaries, so their major
//! version is the destination's, as pg_dump requires (`cloudmig.pg_bin_dir`
//! overrides). The password reaches them through a private passfile written
//! for the run and removed after it: never the command line, never the
//! environment, both of which other local users can read.

use super::SchemaError;
use crate::source::{write_private_passfile, ConnInfo};
use std::ffi::CStr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

/// Where this server's client programs live.
pub fn bin_dir() -> PathBuf {
    if let Some(dir) = crate::guc::pg_bin_dir() {
        return PathBuf::from(dir);
    }
    // SAFETY: my_exec_path is a NUL-terminated path set at process start.
    let exec = unsafe { CStr::from_ptr((&raw const pgrx::pg_sys::my_exec_path).cast()) };
    Path::new(&*exec.to_string_lossy())
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("/usr/bin"))
}

/// Runs `program args...` against `dbname` on the source and returns what it
/// printed. `work_dir` holds the temporary passfile. `interrupt_check` is
/// called at least every 100 ms while the program runs; if it unwinds, the
/// program is killed first.
pub fn run(
    program: &str,
    args: &[&str],
    info: &ConnInfo,
    dbname: &str,
    work_dir: &Path,
    interrupt_check: fn(),
) -> Result<String, SchemaError> {
    run_all(&[(program, args, dbname)], info, work_dir, interrupt_check)?
        .pop()
        .unwrap_or_else(|| Ok(String::new()))
}

/// One run of [`run_all`]: the program, its arguments, the source database.
pub type Invocation<'a> = (&'a str, &'a [&'a str], &'a str);

/// As [`run`] for several runs at once, each against its own database, all
/// started before any is waited for: over a distant link each spends most
/// of its time waiting for round trips, which then overlap. The results come
/// in the order of `runs` (the passfile's failure stops them all first); if
/// `interrupt_check` unwinds, every program still running is killed.
pub fn run_all(
    runs: &[Invocation<'_>],
    info: &ConnInfo,
    work_dir: &Path,
    interrupt_check: fn(),
) -> Result<Vec<Result<String, SchemaError>>, SchemaError> {
    let program = runs.first().map(|run| run.0).unwrap_or("pg_dump");
    let passfile =
        write_private_passfile(work_dir, info).map_err(|source| SchemaError::Credentials {
            program: program.to_string(),
            source,
        })?;
    let _remove = RemoveOnDrop(passfile.clone());
    let started: Vec<Result<Running, SchemaError>> = runs
        .iter()
        .map(|&(program, args, dbname)| {
            let path = bin_dir().join(program);
            let mut command = Command::new(&path);
            command
                .args(args)
                // Never prompt: a missing password is an error, not a hang.
                .arg("--no-password")
                // UTF-8 whatever the database's encoding: applied through
                // `execute::run_utf8`, which converts to the local encoding.
                .arg("--encoding=UTF8")
                .arg(format!("--dbname={}", info.for_client_program(dbname)))
                // The script is cut into statements with standard_conforming_strings
                // on (schema::lexer): have pg_dump write it so whatever the source's
                // database or role settings say, which a client option outranks.
                .env("PGOPTIONS", "-c standard_conforming_strings=on")
                .env_remove("PGPASSWORD")
                .env_remove("PGSERVICE")
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped());
            match &passfile {
                Some(file) => command.env("PGPASSFILE", file),
                None => command.env("PGPASSFILE", "/dev/null"),
            };
            Running::start(program, &path, &mut command)
        })
        .collect();
    Ok(wait_all(started, interrupt_check))
}

/// Runs the destination's `pg_restore args...` on a local archive (no
/// connection anywhere) and returns the script it printed: pg_dump's own
/// section logic applied to a custom-format dump taken once.
pub fn restore_script(args: &[&str], interrupt_check: fn()) -> Result<String, SchemaError> {
    let path = bin_dir().join("pg_restore");
    let mut command = Command::new(&path);
    command
        .args(args)
        .arg("--file=-")
        .env_remove("PGPASSWORD")
        .env_remove("PGSERVICE")
        .env_remove("PGOPTIONS")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let started = Running::start("pg_restore", &path, &mut command);
    wait_all(vec![started], interrupt_check)
        .pop()
        .unwrap_or_else(|| Ok(String::new()))
}

/// A client program started, its output read on helper threads (no
/// PostgreSQL calls there) so a full pipe cannot stall it while this thread
/// waits and checks interrupts.
struct Running {
    program: String,
    child: KillOnDrop,
    stdout: Option<std::thread::JoinHandle<String>>,
    stderr: Option<std::thread::JoinHandle<String>>,
}

impl Running {
    fn start(program: &str, path: &Path, command: &mut Command) -> Result<Running, SchemaError> {
        let mut child = command.spawn().map_err(|source| SchemaError::Spawn {
            program: path.display().to_string(),
            source,
        })?;
        let stdout = child.stdout.take().map(read_all_in_thread);
        let stderr = child.stderr.take().map(read_all_in_thread);
        Ok(Running {
            program: program.to_string(),
            child: KillOnDrop(child),
            stdout,
            stderr,
        })
    }

    /// Its result once it exited: its standard output when it succeeded,
    /// its standard error as the failure otherwise.
    fn finish(self, status: std::process::ExitStatus) -> Result<String, SchemaError> {
        let stdout = self.stdout.map(join_output).unwrap_or_default();
        let stderr = self.stderr.map(join_output).unwrap_or_default();
        if status.success() {
            Ok(stdout)
        } else {
            Err(SchemaError::Failed {
                program: self.program,
                stderr: stderr
                    .trim()
                    .lines()
                    .take(20)
                    .collect::<Vec<_>>()
                    .join("\n"),
            })
        }
    }
}

/// Waits for every program started, checking interrupts; their results in
/// the same order. (Dropping a [`KillOnDrop`] after its child exited only
/// reaps it again.)
fn wait_all(
    started: Vec<Result<Running, SchemaError>>,
    interrupt_check: fn(),
) -> Vec<Result<String, SchemaError>> {
    let mut results: Vec<Option<Result<String, SchemaError>>> = Vec::new();
    let mut running: Vec<(usize, Running)> = Vec::new();
    for (index, start) in started.into_iter().enumerate() {
        match start {
            Ok(run) => {
                results.push(None);
                running.push((index, run));
            }
            Err(error) => results.push(Some(Err(error))),
        }
    }
    // Short naps first: a local pg_restore of a schema ends in milliseconds,
    // and a fixed 100 ms would add up over every database.
    let mut nap = Duration::from_millis(2);
    while !running.is_empty() {
        let mut still = Vec::with_capacity(running.len());
        for (index, mut run) in running {
            match run.child.0.try_wait() {
                Ok(Some(status)) => results[index] = Some(run.finish(status)),
                Ok(None) => still.push((index, run)),
                Err(error) => results[index] = Some(Err(error.into())),
            }
        }
        running = still;
        if running.is_empty() {
            break;
        }
        interrupt_check();
        std::thread::sleep(nap);
        nap = (nap * 2).min(Duration::from_millis(100));
    }
    results
        .into_iter()
        .map(|result| result.unwrap_or_else(|| Ok(String::new())))
        .collect()
}

fn read_all_in_thread<R: std::io::Read + Send + 'static>(
    mut reader: R,
) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let mut bytes = Vec::new();
        let _ = reader.read_to_end(&mut bytes);
        String::from_utf8_lossy(&bytes).into_owned()
    })
}

fn join_output(handle: std::thread::JoinHandle<String>) -> String {
    handle.join().unwrap_or_default()
}

/// Kills the child if the wait is abandoned (cancel, SIGTERM).
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

struct RemoveOnDrop(Option<PathBuf>);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        if let Some(path) = &self.0 {
            let _ = std::fs::remove_file(path);
        }
    }
}
