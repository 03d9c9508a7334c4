//! The harness's files: one base directory, a fresh directory per cluster (each with its own
//! initdb), and the reaping of what a killed test run left behind.
//!
//! Layout of the base (`$CLOUDMIG_E2E_DIR`, else `<tmp>/cloudmig-e2e`):
//! ```text
//! <name>-<pid>-<n>/   one cluster: owner (pid), data/, postgres.log, s/ (socket), KEPT after a panic
//! ```
//! Invariants: a directory whose owner pid is alive belongs to that process and no other process
//! touches it; a directory is never reused (names that exist are skipped), so a new run never sees
//! stale files; a server is stopped by the reaper only if its command line names that directory.

use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Once, OnceLock};

use crate::pgbin::{chown_to_server, pg_command, run};

/// Overrides the base directory.
const DIR_ENV: &str = "CLOUDMIG_E2E_DIR";
/// Holds the pid of the process that created the directory.
const OWNER_FILE: &str = "owner";
/// Marks a directory kept on purpose after a panic: the reaper stops its server but keeps its files.
const KEPT_FILE: &str = "KEPT";
/// Holds the path of a socket directory made outside the cluster directory (see `socket_dir_for`).
const SOCKET_LINK_FILE: &str = "socket_dir";
/// A Unix socket path is at most 107 bytes (`sun_path` is 108 with its NUL) and PostgreSQL
/// puts `/.s.PGSQL.<port>` (up to 15 bytes) after the socket directory.
const MAX_SOCKET_DIR_LEN: usize = 107 - "/.s.PGSQL.65535".len();

/// One cluster's directory; removed on drop, or kept (with a note on stderr) if the thread panics.
#[derive(Debug)]
pub(crate) struct Workdir {
    /// `<base>/<name>-<pid>-<n>`.
    pub path: PathBuf,
    /// Where the server puts its Unix socket: `<path>/s`, or a short directory under /tmp.
    pub socket_dir: PathBuf,
}

impl Workdir {
    /// Creates a fresh directory for a cluster called `name`, owned by the server user.
    pub fn create(name: &str) -> Workdir {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let base = base_dir();
        let pid = std::process::id();
        let path = loop {
            let n = COUNTER.fetch_add(1, Ordering::Relaxed);
            let path = base.join(format!("{name}-{pid}-{n}"));
            match fs::create_dir(&path) {
                Ok(()) => break path,
                // Left by an earlier process with our pid and kept: never reuse it.
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(e) => panic!("cannot create {}: {e}", path.display()),
            }
        };
        write_file(&path.join(OWNER_FILE), &format!("{pid}\n"));
        let socket_dir = match socket_dir_for(&path) {
            Some(dir) => {
                fs::create_dir(&dir)
                    .unwrap_or_else(|e| panic!("cannot create {}: {e}", dir.display()));
                dir
            }
            None => {
                let n = COUNTER.fetch_add(1, Ordering::Relaxed);
                let dir = short_socket_dir(pid, n);
                write_file(&path.join(SOCKET_LINK_FILE), &dir.to_string_lossy());
                dir
            }
        };
        for dir in [&path, &socket_dir] {
            chown_to_server(dir).unwrap_or_else(|e| panic!("cannot chown {}: {e}", dir.display()));
        }
        Workdir { path, socket_dir }
    }

    fn owns_socket_dir(&self) -> bool {
        self.socket_dir.starts_with(&self.path)
    }
}

impl Drop for Workdir {
    fn drop(&mut self) {
        // The socket directory holds nothing worth keeping once the server is down.
        if !self.owns_socket_dir() {
            let _ = fs::remove_dir_all(&self.socket_dir);
        }
        if std::thread::panicking() {
            let _ = fs::write(self.path.join(KEPT_FILE), "kept after a panic\n");
            eprintln!(
                "cloudmig-e2e: kept {} for inspection; server log: {}",
                self.path.display(),
                self.path.join("postgres.log").display()
            );
        } else {
            let _ = fs::remove_dir_all(&self.path);
        }
    }
}

/// Creates a fresh cluster in `data_dir` (which must not exist yet) with initdb.
///
/// Each cluster gets its own initdb, not a copy of a shared one: a copy would share the
/// template's system identifier, and cloudmig tells a source from its destination by it.
pub(crate) fn init_data_dir(data_dir: &Path) {
    // -N: no fsync of the new files, test clusters are disposable; C locale for stable messages.
    let mut initdb = pg_command("initdb");
    initdb.arg("-D").arg(data_dir).args([
        "-U",
        "postgres",
        "-A",
        "trust",
        "-E",
        "UTF8",
        "--locale=C",
        "-N",
    ]);
    run(&mut initdb).unwrap_or_else(|e| panic!("initdb of {} failed: {e}", data_dir.display()));
}

/// The base directory, created on first use; the first call also reaps abandoned directories.
fn base_dir() -> &'static Path {
    static BASE: OnceLock<PathBuf> = OnceLock::new();
    static REAP: Once = Once::new();
    let base = BASE.get_or_init(|| {
        let base = std::env::var_os(DIR_ENV)
            .filter(|d| !d.is_empty())
            .map(PathBuf::from)
            .unwrap_or_else(|| std::env::temp_dir().join("cloudmig-e2e"));
        let base = std::path::absolute(&base).unwrap_or(base);
        if !base.exists() {
            fs::create_dir_all(&base)
                .unwrap_or_else(|e| panic!("cannot create {}: {e}", base.display()));
            // The server user must be able to traverse it whatever our umask is.
            use std::os::unix::fs::PermissionsExt;
            let _ = fs::set_permissions(&base, fs::Permissions::from_mode(0o755));
        }
        base
    });
    REAP.call_once(|| reap_abandoned(base));
    base
}

/// `<tmp>`-independent short socket directory for when the cluster directory's path is too long.
fn short_socket_dir(pid: u32, n: u32) -> PathBuf {
    let dir = PathBuf::from(format!("/tmp/cme-{pid}-{n}"));
    // A leftover of an earlier process with our pid: it only ever held sockets.
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir(&dir).unwrap_or_else(|e| panic!("cannot create {}: {e}", dir.display()));
    dir
}

/// `<cluster_dir>/s` when the socket path fits in `sun_path`, else `None`.
fn socket_dir_for(cluster_dir: &Path) -> Option<PathBuf> {
    let dir = cluster_dir.join("s");
    (dir.as_os_str().len() <= MAX_SOCKET_DIR_LEN).then_some(dir)
}

/// Stops servers and removes directories that dead processes left in `base` (a killed test run):
/// their servers would otherwise hold memory and ports forever. Directories marked KEPT stay.
fn reap_abandoned(base: &Path) {
    let Ok(entries) = fs::read_dir(base) else {
        return;
    };
    let me = std::process::id();
    for entry in entries.flatten() {
        let dir = entry.path();
        let Some(owner) = fs::read_to_string(dir.join(OWNER_FILE))
            .ok()
            .and_then(|s| s.trim().parse::<u32>().ok())
        else {
            continue;
        };
        // Nothing of ours exists yet when this runs, so a directory naming our pid is from a dead
        // process whose pid we inherited.
        if owner != me && process_alive(owner) {
            continue;
        }
        stop_orphan(&dir.join("data"));
        if dir.join(KEPT_FILE).exists() {
            continue;
        }
        if let Ok(socket_dir) = fs::read_to_string(dir.join(SOCKET_LINK_FILE)) {
            let _ = fs::remove_dir_all(socket_dir.trim());
        }
        let _ = fs::remove_dir_all(&dir);
    }
}

/// `pg_ctl stop -m immediate` for a server still running in `data_dir`, but only when
/// `/proc/<pid>/cmdline` shows it is a server of that very directory: after a reboot the pid in a
/// stale postmaster.pid may belong to any process.
fn stop_orphan(data_dir: &Path) {
    let Some(pid) = fs::read_to_string(data_dir.join("postmaster.pid"))
        .ok()
        .and_then(|s| s.lines().next()?.trim().parse::<u32>().ok())
    else {
        return;
    };
    let Ok(cmdline) = fs::read(format!("/proc/{pid}/cmdline")) else {
        return;
    };
    let needle = data_dir.as_os_str().as_encoded_bytes();
    if cmdline.windows(needle.len()).any(|w| w == needle) {
        let mut stop = pg_command("pg_ctl");
        stop.args(["stop", "-s", "-m", "immediate", "-D"])
            .arg(data_dir);
        let _ = run(&mut stop);
    }
}

fn process_alive(pid: u32) -> bool {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return false;
    };
    // SAFETY: signal 0 only checks that the process exists; nothing is delivered.
    let rc = unsafe { libc::kill(pid, 0) };
    // EPERM: it exists but is not ours to signal; treat it as alive.
    rc == 0 || io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

fn write_file(path: &Path, text: &str) {
    let result = fs::File::create(path).and_then(|mut f| f.write_all(text.as_bytes()));
    result.unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn socket_dir_stays_inside_short_cluster_dirs() {
        let dir = socket_dir_for(Path::new("/tmp/cloudmig-e2e/src-1-0")).unwrap();
        assert_eq!(dir, Path::new("/tmp/cloudmig-e2e/src-1-0/s"));
        let socket = dir.join(".s.PGSQL.65535");
        assert!(socket.as_os_str().len() <= 107);
    }

    #[test]
    fn socket_dir_moves_out_of_long_cluster_dirs() {
        let long = format!("/tmp/{}/src-1-0", "x".repeat(100));
        assert_eq!(socket_dir_for(Path::new(&long)), None);
        let short = short_socket_dir(u32::MAX, u32::MAX);
        assert!(short.join(".s.PGSQL.65535").as_os_str().len() <= 107);
        fs::remove_dir_all(short).unwrap();
    }
}
