//! One real PostgreSQL server per test role: [`ClusterBuilder`] configures and starts it,
//! [`Cluster`] talks to it, restarts it, and stops it on drop.
//!
//! Life of a cluster:
//! ```text
//! builder ──start()──> fresh Workdir ─> initdb ─> postgresql.conf, pg_hba.conf
//!   ─> pg_ctl start -w on a free port (a new port on a bind clash) ─> CREATE EXTENSION (destination)
//!   ─> init_sql ─> Cluster ──drop──> pg_ctl stop -m immediate ─> directory removed
//!                                    (kept, with a note on stderr, if the thread is panicking)
//! ```

use std::collections::BTreeSet;
use std::fs;
use std::io::{Read, Seek, SeekFrom, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use postgres::types::FromSqlOwned;
use postgres::{Client, NoTls};

use crate::pgbin::{chown_to_server, pg_command, run};
use crate::workdir::{init_data_dir, Workdir};

/// The superuser initdb creates; the harness always connects as it over the socket.
const SUPERUSER: &str = "postgres";
/// Included last by postgresql.conf, so the harness's port wins and can be rewritten on a retry.
const PORT_CONF: &str = "cloudmig_e2e_port.conf";
/// Start attempts when another process takes our port between probing and binding.
const START_ATTEMPTS: usize = 5;
/// What `pg_ctl -w` waits for at most, in seconds (crash recovery after an immediate stop included).
const PG_CTL_TIMEOUT: &str = "60";
/// Lines of server log shown in panic messages.
const LOG_TAIL_LINES: usize = 40;
/// Always first in pg_hba.conf: the harness's own superuser access over the socket.
const HARNESS_HBA: &str = "local all postgres trust\nlocal replication postgres trust";
/// pg_hba.conf when the test does not call [`ClusterBuilder::hba`].
const DEFAULT_HBA: [&str; 3] = [
    "local all all trust",
    "host all all 127.0.0.1/32 trust",
    "host replication all 127.0.0.1/32 trust",
];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Role {
    Source,
    Destination,
}

/// Configuration of a cluster to start; nothing exists on disk until [`ClusterBuilder::start`].
#[derive(Debug)]
#[must_use = "a ClusterBuilder does nothing until start() is called"]
pub struct ClusterBuilder {
    name: String,
    role: Role,
    conf: Vec<String>,
    hba: Option<Vec<String>>,
    init_sql: Vec<String>,
    files: Vec<(String, Vec<u8>)>,
}

impl ClusterBuilder {
    /// A source: wal_level=logical, max_replication_slots=10, max_wal_senders=10, listening on
    /// 127.0.0.1 (plus its own Unix socket directory).
    pub fn source(name: &str) -> Self {
        ClusterBuilder {
            name: sanitize(name),
            role: Role::Source,
            conf: Vec::new(),
            hba: None,
            init_sql: Vec::new(),
            files: Vec::new(),
        }
    }

    /// A destination: a source's settings plus shared_preload_libraries='cloudmig', and
    /// `CREATE EXTENSION cloudmig` in database `postgres` right after start (before init_sql).
    pub fn destination(name: &str) -> Self {
        ClusterBuilder {
            role: Role::Destination,
            ..Self::source(name)
        }
    }

    /// Appends `line` to postgresql.conf after the harness's settings (later lines win),
    /// e.g. `"wal_level = replica"`. `port` is the one setting that cannot be overridden.
    pub fn conf(mut self, line: &str) -> Self {
        self.conf.push(line.to_owned());
        self
    }

    /// Replaces pg_hba.conf with `lines`, after `local all postgres trust`, which the harness
    /// always puts first to keep its own superuser access over the socket.
    pub fn hba(mut self, lines: &[&str]) -> Self {
        self.hba = Some(lines.iter().map(|l| (*l).to_owned()).collect());
        self
    }

    /// Puts a file in the data directory before the server starts, readable by the server only
    /// (mode 0600, as it wants its TLS key): e.g. `server.crt` and `server.key` for `ssl = on`.
    pub fn data_file(mut self, name: &str, contents: &[u8]) -> Self {
        self.files.push((name.to_owned(), contents.to_vec()));
        self
    }

    /// SQL run as superuser in database `postgres` after start (roles, databases, data);
    /// several calls run in order.
    pub fn init_sql(mut self, sql: &str) -> Self {
        self.init_sql.push(sql.to_owned());
        self
    }

    /// Creates, configures and starts the cluster; panics with the server log tail on failure.
    pub fn start(self) -> Cluster {
        let workdir = Workdir::create(&self.name);
        let data_dir = workdir.path.join("data");
        let log_file = workdir.path.join("postgres.log");
        init_data_dir(&data_dir);
        self.write_conf(&data_dir, &workdir.socket_dir);
        self.write_hba(&data_dir);
        for (name, contents) in &self.files {
            write_private_file(&data_dir.join(name), contents);
        }
        let port = start_server(&self.name, &data_dir, &log_file, free_port);
        let cluster = Cluster {
            name: self.name,
            port,
            socket_dir: workdir.socket_dir.clone(),
            data_dir,
            log_file,
            dir: workdir.path.clone(),
            _workdir: workdir,
        };
        // From here on the Cluster exists, so a panic below still stops the server (Drop).
        let mut steps: Vec<&str> = Vec::new();
        if self.role == Role::Destination {
            steps.push("CREATE EXTENSION cloudmig");
        }
        steps.extend(self.init_sql.iter().map(String::as_str));
        for sql in steps {
            if let Err(e) = cluster.try_execute("postgres", sql) {
                panic!(
                    "initialising cluster {} failed: {e}\nSQL: {sql}\n--- server log tail ---\n{}",
                    cluster.name,
                    cluster.log_tail(LOG_TAIL_LINES)
                );
            }
        }
        cluster
    }

    fn write_conf(&self, data_dir: &Path, socket_dir: &Path) {
        let mut conf = String::from("\n# --- cloudmig-e2e harness ---\n");
        let socket_dir = socket_dir.to_string_lossy().replace('\'', "''");
        for line in [
            "listen_addresses = '127.0.0.1'",
            &format!("unix_socket_directories = '{socket_dir}'"),
            // Disposable clusters: no fsync (an immediate stop is not an OS crash, so restarts
            // still recover fully) and small shared memory so many clusters fit on a small machine.
            "fsync = off",
            "shared_buffers = 32MB",
            "log_line_prefix = '%m [%p] %q%a '",
            "wal_level = logical",
            "max_replication_slots = 10",
            "max_wal_senders = 10",
        ] {
            conf.push_str(line);
            conf.push('\n');
        }
        if self.role == Role::Destination {
            conf.push_str("shared_preload_libraries = 'cloudmig'\n");
        }
        conf.push_str("# --- ClusterBuilder::conf ---\n");
        for line in &self.conf {
            conf.push_str(line);
            conf.push('\n');
        }
        conf.push_str(&format!("include '{PORT_CONF}'\n"));
        let path = data_dir.join("postgresql.conf");
        let result = fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .and_then(|mut f| f.write_all(conf.as_bytes()));
        result.unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
    }

    fn write_hba(&self, data_dir: &Path) {
        let mut hba = format!("# written by cloudmig-e2e\n{HARNESS_HBA}\n");
        let lines: Vec<&str> = match &self.hba {
            Some(lines) => lines.iter().map(String::as_str).collect(),
            None => DEFAULT_HBA.to_vec(),
        };
        for line in lines {
            hba.push_str(line);
            hba.push('\n');
        }
        let path = data_dir.join("pg_hba.conf");
        fs::write(&path, hba).unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
    }
}

/// A running PostgreSQL server owned by the test; dropping it stops the server (see module doc).
#[derive(Debug)]
pub struct Cluster {
    /// The name given to the builder (sanitised for use in paths).
    pub name: String,
    /// TCP port on 127.0.0.1, also the number in the Unix socket's name.
    pub port: u16,
    /// Directory of the server's Unix socket.
    pub socket_dir: PathBuf,
    /// PGDATA.
    pub data_dir: PathBuf,
    /// The server log (`pg_ctl -l`).
    pub log_file: PathBuf,
    /// The cluster's own directory (holds data_dir and log_file); removed on drop unless panicking.
    pub dir: PathBuf,
    /// Dropped after `Cluster::drop` has stopped the server: removes or keeps the directory.
    _workdir: Workdir,
}

impl Cluster {
    /// A streaming standby of this cluster (pg_basebackup -R over the socket), started and
    /// caught up enough to accept read-only connections.
    pub fn standby(&self, name: &str) -> Cluster {
        let workdir = Workdir::create(name);
        let data_dir = workdir.path.join("data");
        let log_file = workdir.path.join("postgres.log");
        let mut basebackup = pg_command("pg_basebackup");
        basebackup
            .arg("-D")
            .arg(&data_dir)
            .arg("-h")
            .arg(&self.socket_dir)
            .args([
                "-p",
                &self.port.to_string(),
                "-U",
                "postgres",
                "-R",
                "-X",
                "stream",
            ]);
        run(&mut basebackup)
            .unwrap_or_else(|e| panic!("pg_basebackup of {} failed: {e}", self.name));
        // The copied postgresql.conf names the primary's socket directory: use our own.
        let socket_dir = workdir.socket_dir.to_string_lossy().replace('\'', "''");
        let path = data_dir.join("postgresql.conf");
        let result = fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .and_then(|mut f| {
                f.write_all(format!("unix_socket_directories = '{socket_dir}'\n").as_bytes())
            });
        result.unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
        let port = start_server(name, &data_dir, &log_file, free_port);
        Cluster {
            name: name.to_owned(),
            port,
            socket_dir: workdir.socket_dir.clone(),
            data_dir,
            log_file,
            dir: workdir.path.clone(),
            _workdir: workdir,
        }
    }

    /// A new connection as superuser `postgres` over the Unix socket; panics with the log tail.
    pub fn client(&self, db: &str) -> Client {
        self.try_client(db).unwrap_or_else(|e| {
            panic!(
                "cannot connect to cluster {} (database {db}, socket {}): {}\n--- server log tail ---\n{}",
                self.name,
                self.socket_dir.display(),
                describe(&e),
                self.log_tail(LOG_TAIL_LINES)
            )
        })
    }

    /// Runs `sql` (one or more statements) with `batch_execute`; panics with the SQL error text.
    pub fn execute(&self, db: &str, sql: &str) {
        if let Err(e) = self.try_execute(db, sql) {
            panic!("cluster {} database {db}: {e}\nSQL: {sql}", self.name);
        }
    }

    /// The first column of the single row `sql` returns; panics on an error or not exactly one row.
    pub fn query_scalar<T: FromSqlOwned>(&self, db: &str, sql: &str) -> T {
        let row = self.client(db).query_one(sql, &[]).unwrap_or_else(|e| {
            panic!(
                "cluster {} database {db}: {}\nSQL: {sql}",
                self.name,
                describe(&e)
            )
        });
        row.try_get(0)
            .unwrap_or_else(|e| panic!("cluster {} database {db}: {e}\nSQL: {sql}", self.name))
    }

    /// libpq conninfo for a client of this cluster over TCP on 127.0.0.1 (what `cloudmig.assess` takes).
    pub fn tcp_conninfo(&self, user: &str, password: Option<&str>, db: &str) -> String {
        let mut conninfo = format!("host=127.0.0.1 port={} user={}", self.port, quote(user));
        if let Some(password) = password {
            conninfo.push_str(&format!(" password={}", quote(password)));
        }
        conninfo.push_str(&format!(" dbname={}", quote(db)));
        conninfo
    }

    /// libpq conninfo for a client of this cluster over its Unix socket.
    pub fn socket_conninfo(&self, user: &str, db: &str) -> String {
        format!(
            "host={} port={} user={} dbname={}",
            quote(&self.socket_dir.to_string_lossy()),
            self.port,
            quote(user),
            quote(db)
        )
    }

    /// A PostgreSQL client program (`psql`, `pg_dump`, `pgbench`, ...) from the harness's
    /// binaries, connected to this cluster over its Unix socket as `postgres`: add the database
    /// and the program's own arguments. See [`pg_command`] for its environment.
    pub fn command(&self, program: &str) -> std::process::Command {
        let mut cmd = pg_command(program);
        cmd.arg("-h")
            .arg(&self.socket_dir)
            .args(["-p", &self.port.to_string(), "-U", SUPERUSER]);
        cmd
    }

    /// Writes a file into the data directory, owned by the server user with mode 0600, and
    /// returns its path: files the server process must read (a client certificate and key
    /// for `cloudmig.assess`, for instance).
    pub fn write_file(&self, name: &str, contents: &[u8]) -> PathBuf {
        let path = self.data_dir.join(name);
        write_private_file(&path, contents);
        path
    }

    /// `pg_ctl restart -m fast`; returns once the server accepts connections.
    pub fn restart(&self) {
        self.restart_with("fast");
    }

    /// `pg_ctl restart -m immediate` (a crash as far as PostgreSQL knows: the start runs recovery);
    /// returns once the server accepts connections.
    pub fn restart_immediate(&self) {
        self.restart_with("immediate");
    }

    /// An outage: `pg_ctl stop -m <mode>` (`fast`, or `immediate` for a crash), `downtime` with
    /// the server down, then a start on the same port; returns once it accepts connections.
    pub fn outage(&self, mode: &str, downtime: Duration) {
        let mut stop = self.pg_ctl("stop");
        stop.args(["-w", "-t", PG_CTL_TIMEOUT, "-m", mode]);
        self.run_or_panic(&mut stop, "stop");
        // The outage itself, not a wait for something: nothing to poll.
        std::thread::sleep(downtime);
        let mut start = self.pg_ctl("start");
        start
            .args(["-w", "-t", PG_CTL_TIMEOUT])
            .arg("-l")
            .arg(&self.log_file);
        self.run_or_panic(&mut start, "start");
    }

    /// A crash of one process: `kill -9` of every backend of `backend_type` (as
    /// `pg_stat_activity` shows it, e.g. `cloudmig apply`, `cloudmig task`, `walsender`), then
    /// waits until the server accepts connections again (the postmaster reinitialises after a
    /// backend dies by a signal, as after any crash). Returns how many processes were killed.
    pub fn kill9(&self, backend_type: &str) -> usize {
        let mut client = self.client("postgres");
        let pids: Vec<i32> = client
            .query(
                "SELECT pid FROM pg_catalog.pg_stat_activity WHERE backend_type = $1",
                &[&backend_type],
            )
            .unwrap_or_else(|e| panic!("cluster {}: {}", self.name, describe(&e)))
            .iter()
            .map(|row| row.get(0))
            .collect();
        let checkpointer = self.checkpointer_pid(&mut client);
        drop(client);
        for pid in &pids {
            // SAFETY: kill(2) with a pid PostgreSQL just reported as its own backend.
            unsafe { libc::kill(*pid, libc::SIGKILL) };
        }
        if !pids.is_empty() {
            // The postmaster resets asynchronously: a session may still get in just before it
            // does. The reset is over once a new checkpointer runs and sessions are accepted.
            let deadline = std::time::Instant::now() + Duration::from_secs(120);
            loop {
                let now = self
                    .try_client("postgres")
                    .ok()
                    .map(|mut c| self.checkpointer_pid(&mut c));
                if matches!(now, Some(Some(pid)) if Some(pid) != checkpointer) {
                    break;
                }
                assert!(
                    std::time::Instant::now() < deadline,
                    "cluster {} did not come back after kill -9 of {backend_type}\n{}",
                    self.name,
                    self.log_tail(LOG_TAIL_LINES)
                );
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        pids.len()
    }

    fn checkpointer_pid(&self, client: &mut Client) -> Option<i32> {
        client
            .query_opt(
                "SELECT pid FROM pg_catalog.pg_stat_activity WHERE backend_type = 'checkpointer'",
                &[],
            )
            .ok()
            .flatten()
            .map(|row| row.get(0))
    }

    /// `pg_ctl reload`. Asynchronous like PostgreSQL's own: wait for the effect with
    /// [`crate::poll_until`] (e.g. on `SHOW setting`).
    pub fn reload(&self) {
        let mut cmd = self.pg_ctl("reload");
        self.run_or_panic(&mut cmd, "reload");
    }

    /// `pg_ctl stop -m fast`, waiting until the server is down.
    pub fn stop(&self) {
        let mut cmd = self.pg_ctl("stop");
        cmd.args(["-w", "-t", PG_CTL_TIMEOUT, "-m", "fast"]);
        self.run_or_panic(&mut cmd, "stop");
    }

    /// The last `lines` lines of the server log (empty if there is none yet).
    pub fn log_tail(&self, lines: usize) -> String {
        log_tail(&self.log_file, lines)
    }

    /// A new connection as superuser `postgres` over the Unix socket, or why not.
    pub fn try_client(&self, db: &str) -> Result<Client, postgres::Error> {
        postgres::Config::new()
            .host_path(&self.socket_dir)
            .port(self.port)
            .user(SUPERUSER)
            .dbname(db)
            .application_name("cloudmig-e2e")
            .connect_timeout(Duration::from_secs(10))
            .connect(NoTls)
    }

    fn try_execute(&self, db: &str, sql: &str) -> Result<(), String> {
        let mut client = self.try_client(db).map_err(|e| describe(&e))?;
        client.batch_execute(sql).map_err(|e| describe(&e))
    }

    fn restart_with(&self, mode: &str) {
        let mut cmd = self.pg_ctl("restart");
        cmd.args(["-w", "-t", PG_CTL_TIMEOUT, "-m", mode])
            // Without -l the new server would write to pg_ctl's stdout, our pipe, and we would
            // wait on it forever.
            .arg("-l")
            .arg(&self.log_file);
        self.run_or_panic(&mut cmd, "restart");
    }

    fn pg_ctl(&self, action: &str) -> std::process::Command {
        let mut cmd = pg_command("pg_ctl");
        cmd.args([action, "-s", "-D"]).arg(&self.data_dir);
        cmd
    }

    fn run_or_panic(&self, cmd: &mut std::process::Command, what: &str) {
        if let Err(e) = run(cmd) {
            panic!(
                "{what} of cluster {} failed: {e}\n--- server log tail ---\n{}",
                self.name,
                self.log_tail(LOG_TAIL_LINES)
            );
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        stop_immediately(&self.data_dir);
        // `_workdir` drops next: it removes the directory, or keeps it if the thread is panicking.
    }
}

/// Starts the server with `pg_ctl start -w` on `next_port()`, and on another one after a bind
/// clash; returns the port it listens on.
fn start_server(
    name: &str,
    data_dir: &Path,
    log_file: &Path,
    mut next_port: impl FnMut() -> u16,
) -> u16 {
    let port_conf = data_dir.join(PORT_CONF);
    for attempt in 1..=START_ATTEMPTS {
        let port = next_port();
        fs::write(&port_conf, format!("port = {port}\n"))
            .and_then(|()| chown_to_server(&port_conf))
            .unwrap_or_else(|e| panic!("cannot write {}: {e}", port_conf.display()));
        let log_offset = fs::metadata(log_file).map(|m| m.len()).unwrap_or(0);
        let mut cmd = pg_command("pg_ctl");
        cmd.args(["start", "-s", "-w", "-t", PG_CTL_TIMEOUT, "-D"])
            .arg(data_dir)
            .arg("-l")
            .arg(log_file);
        let Err(error) = run(&mut cmd) else {
            return port;
        };
        // A timed-out start may leave a server coming up: never leave one running.
        stop_immediately(data_dir);
        let new_log = read_from(log_file, log_offset);
        if port_clash(&new_log) && attempt < START_ATTEMPTS {
            continue;
        }
        panic!(
            "cluster {name} did not start (attempt {attempt}): {error}\n--- server log tail ---\n{}",
            log_tail(log_file, LOG_TAIL_LINES)
        );
    }
    unreachable!("the last attempt returns or panics")
}

/// A port nobody listens on now, never handed out before by this process. Another process may
/// still take it before the server binds it: `start_server` retries then.
fn free_port() -> u16 {
    static HANDED_OUT: Mutex<BTreeSet<u16>> = Mutex::new(BTreeSet::new());
    let mut handed_out = HANDED_OUT.lock().unwrap_or_else(|e| e.into_inner());
    for _ in 0..1000 {
        let listener = TcpListener::bind(("127.0.0.1", 0))
            .unwrap_or_else(|e| panic!("cannot bind 127.0.0.1:0 to find a free port: {e}"));
        let port = listener.local_addr().map(|a| a.port()).unwrap_or(0);
        if port != 0 && handed_out.insert(port) {
            return port;
        }
    }
    panic!("no fresh free port found on 127.0.0.1")
}

/// Whether a failed start's log shows that the TCP port was taken.
fn port_clash(log: &str) -> bool {
    [
        "Address already in use",
        "could not create any TCP/IP sockets",
    ]
    .iter()
    .any(|needle| log.contains(needle))
}

/// `pg_ctl stop -m immediate` if a server may be running; errors are ignored (used on cleanup).
fn stop_immediately(data_dir: &Path) {
    if data_dir.join("postmaster.pid").exists() {
        let mut cmd = pg_command("pg_ctl");
        cmd.args([
            "stop",
            "-s",
            "-w",
            "-t",
            PG_CTL_TIMEOUT,
            "-m",
            "immediate",
            "-D",
        ])
        .arg(data_dir);
        let _ = run(&mut cmd);
    }
}

/// Writes `contents` to `path` with mode 0600, owned by the server user; panics on failure.
fn write_private_file(path: &Path, contents: &[u8]) {
    use std::os::unix::fs::PermissionsExt;
    let result = fs::write(path, contents)
        .and_then(|()| fs::set_permissions(path, fs::Permissions::from_mode(0o600)))
        .and_then(|()| chown_to_server(path));
    result.unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
}

fn log_tail(log_file: &Path, lines: usize) -> String {
    let log = read_from(log_file, 0);
    let all: Vec<&str> = log.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

fn read_from(path: &Path, offset: u64) -> String {
    let mut bytes = Vec::new();
    if let Ok(mut file) = fs::File::open(path) {
        if file.seek(SeekFrom::Start(offset)).is_ok() {
            let _ = file.read_to_end(&mut bytes);
        }
    }
    String::from_utf8_lossy(&bytes).into_owned()
}

/// A SQL error with its SQLSTATE, detail and hint; the plain error otherwise.
pub(crate) fn describe(error: &postgres::Error) -> String {
    let Some(db) = error.as_db_error() else {
        return error.to_string();
    };
    let mut text = format!(
        "{}: {} (SQLSTATE {})",
        db.severity(),
        db.message(),
        db.code().code()
    );
    if let Some(detail) = db.detail() {
        text.push_str(&format!("\nDETAIL: {detail}"));
    }
    if let Some(hint) = db.hint() {
        text.push_str(&format!("\nHINT: {hint}"));
    }
    text
}

/// A conninfo value, single-quoted (with `\` and `'` escaped) when libpq would need it.
fn quote(value: &str) -> String {
    let plain = !value.is_empty()
        && !value
            .chars()
            .any(|c| c.is_whitespace() || c == '\'' || c == '\\' || c == '=');
    if plain {
        value.to_owned()
    } else {
        format!("'{}'", value.replace('\\', "\\\\").replace('\'', "\\'"))
    }
}

/// Keeps names path- and log-friendly: letters, digits, `_` and `-`, at most 32 characters.
fn sanitize(name: &str) -> String {
    let name: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .take(32)
        .collect();
    if name.is_empty() {
        "cluster".to_owned()
    } else {
        name
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quote_leaves_plain_values_alone() {
        assert_eq!(quote("alice"), "alice");
        assert_eq!(quote("/tmp/x/s"), "/tmp/x/s");
    }

    #[test]
    fn quote_escapes_what_libpq_needs() {
        assert_eq!(quote(""), "''");
        assert_eq!(quote("correct horse"), "'correct horse'");
        assert_eq!(quote(r"it's a\b"), r"'it\'s a\\b'");
        assert_eq!(quote("a=b"), "'a=b'");
    }

    #[test]
    fn sanitize_keeps_names_path_friendly() {
        assert_eq!(sanitize("src-1_a"), "src-1_a");
        assert_eq!(sanitize("a/b c"), "a_b_c");
        assert_eq!(sanitize(""), "cluster");
        assert_eq!(sanitize(&"x".repeat(50)).len(), 32);
    }

    #[test]
    fn port_clash_is_recognised_in_the_log() {
        assert!(port_clash(
            "LOG:  could not bind IPv4 address \"127.0.0.1\": Address already in use"
        ));
        assert!(!port_clash("FATAL:  could not load library"));
    }

    #[test]
    fn start_retries_on_another_port_after_a_bind_clash() {
        let workdir = Workdir::create("clash");
        let builder = ClusterBuilder::source("clash");
        let data_dir = workdir.path.join("data");
        let log_file = workdir.path.join("postgres.log");
        init_data_dir(&data_dir);
        builder.write_conf(&data_dir, &workdir.socket_dir);
        builder.write_hba(&data_dir);
        // Someone else listens on the first port offered.
        let taken = TcpListener::bind(("127.0.0.1", 0)).unwrap();
        let mut ports = vec![free_port(), taken.local_addr().unwrap().port()];
        let port = start_server("clash", &data_dir, &log_file, || ports.pop().unwrap());
        stop_immediately(&data_dir);
        assert!(ports.is_empty(), "the second port was not tried");
        assert_ne!(port, taken.local_addr().unwrap().port());
        assert!(log_tail(&log_file, 100).contains("Address already in use"));
    }

    #[test]
    fn conninfo_parses_with_rust_postgres() {
        let conninfo = format!(
            "host=127.0.0.1 port=5 user={} password={} dbname=d",
            quote("a b"),
            quote("p'w")
        );
        let config: postgres::Config = conninfo.parse().unwrap();
        assert_eq!(config.get_user(), Some("a b"));
        assert_eq!(config.get_password(), Some(&b"p'w"[..]));
    }
}
