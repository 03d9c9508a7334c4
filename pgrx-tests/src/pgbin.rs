//! Where the PostgreSQL programs are and how to run them.
//!
//! initdb, pg_ctl and postgres refuse to run as root, and tests here run as root: so when the
//! effective uid is 0 every program runs as the `postgres` OS user through `runuser` (util-linux)
//! and the directories it writes are chowned to that user; otherwise programs run as ourselves.

use std::ffi::{CString, OsStr};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;

/// Overrides `pg_config --bindir`.
const BINDIR_ENV: &str = "CLOUDMIG_PG_BINDIR";
/// The OS user servers run as when we are root.
const SERVER_USER: &str = "postgres";

/// Directory of initdb, pg_ctl and postgres: `$CLOUDMIG_PG_BINDIR`, else `pg_config --bindir`.
pub fn bindir() -> &'static Path {
    static BINDIR: OnceLock<PathBuf> = OnceLock::new();
    BINDIR.get_or_init(|| {
        if let Some(dir) = std::env::var_os(BINDIR_ENV).filter(|d| !d.is_empty()) {
            return PathBuf::from(dir);
        }
        PathBuf::from(pg_config("pg_config", "--bindir"))
    })
}

/// `pg_config --sharedir` of the same installation as [`bindir`] (control files are in `extension/`).
pub fn sharedir() -> PathBuf {
    // Prefer the pg_config next to the binaries, so an overridden bindir answers for itself.
    let local = bindir().join("pg_config");
    let program = if local.exists() {
        local.into_os_string()
    } else {
        "pg_config".into()
    };
    PathBuf::from(pg_config(&program, "--sharedir"))
}

fn pg_config(program: impl AsRef<OsStr>, flag: &str) -> String {
    let program = program.as_ref();
    let out = Command::new(program)
        .arg(flag)
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run {} {flag}: {e}; install PostgreSQL or set {BINDIR_ENV}",
                program.to_string_lossy()
            )
        });
    assert!(
        out.status.success(),
        "{} {flag} failed: {}",
        program.to_string_lossy(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// A command for `program` from [`bindir`], run as the `postgres` OS user when we are root.
///
/// Its working directory is `/` (the test's own may be unreadable by `postgres`), stdin is null,
/// and libpq's `PG*` variables are removed so the caller's environment cannot redirect it.
pub fn pg_command(program: &str) -> Command {
    let path = bindir().join(program);
    let mut cmd = if server_user().is_some() {
        let mut cmd = Command::new("runuser");
        cmd.args(["-u", SERVER_USER, "--"]).arg(path);
        cmd
    } else {
        Command::new(path)
    };
    cmd.current_dir("/").stdin(Stdio::null());
    for var in [
        "PGDATA",
        "PGHOST",
        "PGHOSTADDR",
        "PGPORT",
        "PGUSER",
        "PGDATABASE",
        "PGOPTIONS",
        "PGPASSWORD",
        "PGSERVICE",
    ] {
        cmd.env_remove(var);
    }
    cmd
}

/// Runs `cmd` to completion; `Err` with the command, its status and output when it fails.
pub(crate) fn run(cmd: &mut Command) -> Result<Output, String> {
    let out = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .output()
        .map_err(|e| format!("cannot run {cmd:?}: {e}"))?;
    if out.status.success() {
        Ok(out)
    } else {
        Err(format!(
            "{cmd:?} failed ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// Runs `cmd` to completion with `input` on its stdin (written from another thread, so a
/// program that answers while it reads cannot deadlock on a full pipe); `Err` as [`run`] does.
pub(crate) fn run_with_input(cmd: &mut Command, input: &[u8]) -> Result<Output, String> {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run {cmd:?}: {e}"))?;
    let mut stdin = child.stdin.take().expect("stdin was piped");
    let out = std::thread::scope(|scope| {
        // A program that fails early closes its stdin: the write error is expected then, and the
        // exit status below tells what happened.
        scope.spawn(move || {
            let _ = stdin.write_all(input);
        });
        child.wait_with_output()
    })
    .map_err(|e| format!("cannot wait for {cmd:?}: {e}"))?;
    if out.status.success() {
        Ok(out)
    } else {
        Err(format!(
            "{cmd:?} failed ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// `(uid, gid)` of the server user when we are root, `None` when programs run as ourselves.
pub(crate) fn server_user() -> Option<(u32, u32)> {
    static USER: OnceLock<Option<(u32, u32)>> = OnceLock::new();
    *USER.get_or_init(|| {
        // SAFETY: geteuid has no preconditions and cannot fail.
        if unsafe { libc::geteuid() } != 0 {
            return None;
        }
        Some(lookup_user(SERVER_USER).unwrap_or_else(|| {
            panic!(
                "running as root, so servers must run as the `{SERVER_USER}` OS user, \
                 which does not exist: install the postgresql package or run as another user"
            )
        }))
    })
}

/// Gives `path` to the server user (nothing to do when we are not root).
pub fn chown_to_server(path: &Path) -> io::Result<()> {
    match server_user() {
        Some((uid, gid)) => std::os::unix::fs::chown(path, Some(uid), Some(gid)),
        None => Ok(()),
    }
}

fn lookup_user(name: &str) -> Option<(u32, u32)> {
    let name = CString::new(name).ok()?;
    // getpwnam_r rather than getpwnam: the latter returns a static buffer shared between threads.
    let mut buf = vec![0 as libc::c_char; 16 * 1024];
    // SAFETY: passwd is plain old data; all-zero is a valid (empty) value for it.
    let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
    let mut result: *mut libc::passwd = std::ptr::null_mut();
    // SAFETY: every pointer is valid for the call and `buf` outlives the use of `pwd`.
    let rc = unsafe {
        libc::getpwnam_r(
            name.as_ptr(),
            &mut pwd,
            buf.as_mut_ptr(),
            buf.len(),
            &mut result,
        )
    };
    if rc != 0 || result.is_null() {
        return None;
    }
    Some((pwd.pw_uid, pwd.pw_gid))
}
