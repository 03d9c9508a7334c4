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
/// called at least every 100 ms while the program runs; if it unwinds, the program is
/// killed first.
pub fn run(
    program: &str,
    args: &[&str],
    info: &ConnInfo,
    dbname: &str,
    work_dir: &Path,
    interrupt_check: fn(),
) -> Result<String, SchemaError> {
    let passfile =
        write_private_passfile(work_dir, info).map_err(|source| SchemaError::Credentials {
            program: program.to_string(),
            source,
        })?;
    let _remove = RemoveOnDrop(passfile.clone());
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
    collect(program, &path, &mut command, interrupt_check)
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
    collect("pg_restore", &path, &mut command, interrupt_check)
}

/// Starts `command` and waits for it, checking interrupts; its standard
/// output when it succeeded, its standard error as the failure otherwise.
fn collect(
    program: &str,
    path: &Path,
    command: &mut Command,
    interrupt_check: fn(),
) -> Result<String, SchemaError> {
    let mut child = command.spawn().map_err(|source| SchemaError::Spawn {
        program: path.display().to_string(),
        source,
    })?;
    let guard = KillOnDrop(&mut child);
    // (Dropping the guard after the child exited only reaps it again.)
    // Read both pipes on helper threads (no PostgreSQL calls there) so a full
    // pipe cannot stall the child while this thread waits and checks interrupts.
    let stdout = guard.0.stdout.take().map(read_all_in_thread);
    let stderr = guard.0.stderr.take().map(read_all_in_thread);
    // Short naps first: a local pg_restore of a schema ends in milliseconds,
    // and a fixed 100 ms would add up over every database.
    let mut nap = Duration::from_millis(2);
    let status = loop {
        if let Some(status) = guard.0.try_wait()? {
            break status;
        }
        interrupt_check();
        std::thread::sleep(nap);
        nap = (nap * 2).min(Duration::from_millis(100));
    };
    let stdout = stdout.map(join_output).unwrap_or_default();
    let stderr = stderr.map(join_output).unwrap_or_default();
    if status.success() {
        Ok(stdout)
    } else {
        Err(SchemaError::Failed {
            program: program.to_string(),
            stderr: stderr
                .trim()
                .lines()
                .take(20)
                .collect::<Vec<_>>()
                .join("\n"),
        })
    }
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
struct KillOnDrop<'a>(&'a mut std::process::Child);

impl Drop for KillOnDrop<'_> {
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
