//! Password files in libpq's `.pgpass` format: `hostname:port:database:username:password`.
//!
//! Only the file named by the conninfo's `passfile` is ever read: this code runs inside the
//! destination server, whose `~/.pgpass` and `PGPASSFILE` belong to the server's OS user, not
//! to the user who called us. Matching mirrors libpq's `passwordFromFile` (fe-connect.c): `*`
//! matches anything, `\:` and `\\` escape, lines starting with `#` are comments, the first
//! matching line wins, and `localhost` matches a connection over the default Unix socket.
//!
//! The other direction, [`write_private_passfile`], hands a password to a client program
//! (`pg_dump`) through a file that only the server's OS user can read, because a command line
//! or an environment variable is visible to every local user.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::source::connection::os_user_name;
use crate::source::conninfo::{ConnInfo, DEFAULT_SOCKET_DIR};
use crate::source::error::SourceError;

/// Larger files are refused: a password file is a few lines, and we read it whole.
const MAX_PASSFILE_BYTES: u64 = 1024 * 1024;

/// Why the passfile named in the conninfo could not be used.
#[derive(Debug, thiserror::Error)]
pub enum PassfileError {
    /// Opening or reading the file failed (including "does not exist": the user named it).
    #[error("could not read password file \"{}\": {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The path is a directory, device, etc.
    #[error("password file \"{}\" is not a plain file", path.display())]
    NotAFile {
        /// The file.
        path: PathBuf,
    },
    /// Group or other users may access the file; libpq ignores such a file, we refuse it.
    #[error("password file \"{}\" has group or world access; permissions should be u=rw (0600) or less", path.display())]
    Permissions {
        /// The file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// The file is larger than a password file plausibly is.
    #[error("password file \"{}\" is larger than {MAX_PASSFILE_BYTES} bytes", path.display())]
    TooLarge {
        /// The file.
        path: PathBuf,
    },
    /// The file is not UTF-8 text.
    #[error("password file \"{}\" is not valid UTF-8", path.display())]
    NotUtf8 {
        /// The file.
        path: PathBuf,
    },
    /// Creating or writing a private password file failed.
    #[error("could not write password file \"{}\": {source}", path.display())]
    Write {
        /// The file (or, when no name could be created, the directory).
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The password contains a line break, which a password file cannot hold.
    #[error("the password contains a line break, which a password file cannot hold")]
    Unrepresentable,
}

/// The host name to match in a passfile for this conninfo, as libpq chooses it: the host,
/// else the hostaddr, and `localhost` for the default Unix socket directory.
pub fn passfile_host(info: &ConnInfo) -> &str {
    match (info.host.as_deref(), info.hostaddr.as_deref()) {
        (Some(DEFAULT_SOCKET_DIR), _) | (None, None) => "localhost",
        (Some(host), _) => host,
        (None, Some(addr)) => addr,
    }
}

/// Finds the password for a connection in the text of a passfile. Returns `None` when no line
/// matches or the first matching line has an empty password.
pub fn lookup(contents: &str, host: &str, port: u16, db: &str, user: &str) -> Option<String> {
    let port = port.to_string();
    let wanted = [host, port.as_str(), db, user];
    for line in contents.lines() {
        // `lines` strips "\n" and "\r\n"; libpq also strips a stray trailing '\r'.
        let line = line.strip_suffix('\r').unwrap_or(line);
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let fields = split_fields(line);
        if fields.len() < 5 {
            continue;
        }
        let matches = fields
            .iter()
            .zip(wanted)
            .all(|(field, want)| field.wildcard || field.text == want);
        if matches {
            let password = fields
                .into_iter()
                .nth(4)
                .map(|f| f.text)
                .unwrap_or_default();
            return if password.is_empty() {
                None
            } else {
                Some(password)
            };
        }
    }
    None
}

/// One `:`-separated field, de-escaped, remembering whether it was a bare `*`.
struct Field {
    text: String,
    wildcard: bool,
}

/// Splits a line at unescaped colons. An escaped `\*` is a literal star, not a wildcard;
/// a trailing lone backslash is kept literally, as libpq does.
fn split_fields(line: &str) -> Vec<Field> {
    let mut fields = Vec::new();
    let mut text = String::new();
    let mut escaped_any = false;
    let mut chars = line.chars();
    let finish = |text: String, escaped_any: bool| Field {
        wildcard: text == "*" && !escaped_any,
        text,
    };
    while let Some(c) = chars.next() {
        match c {
            '\\' => match chars.next() {
                Some(next) => {
                    text.push(next);
                    escaped_any = true;
                }
                None => text.push('\\'),
            },
            ':' => {
                fields.push(finish(std::mem::take(&mut text), escaped_any));
                escaped_any = false;
            }
            _ => text.push(c),
        }
    }
    fields.push(finish(text, escaped_any));
    fields
}

/// Reads the passfile at `path` and looks up the password for `info` connecting as `user` to
/// `db`. Refuses files that group or others can access, and files that are not plain files.
pub fn read_password(
    path: &Path,
    info: &ConnInfo,
    db: &str,
    user: &str,
) -> Result<Option<String>, PassfileError> {
    let read_err = |source| PassfileError::Read {
        path: path.to_owned(),
        source,
    };
    let file = File::open(path).map_err(read_err)?;
    // Check the opened file, not the path, so a swapped file cannot slip past the check.
    let meta = file.metadata().map_err(read_err)?;
    if !meta.is_file() {
        return Err(PassfileError::NotAFile {
            path: path.to_owned(),
        });
    }
    let mode = meta.permissions().mode();
    if mode & 0o077 != 0 {
        return Err(PassfileError::Permissions {
            path: path.to_owned(),
            mode: mode & 0o7777,
        });
    }
    if meta.len() > MAX_PASSFILE_BYTES {
        return Err(PassfileError::TooLarge {
            path: path.to_owned(),
        });
    }
    let mut bytes = Vec::new();
    file.take(MAX_PASSFILE_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(read_err)?;
    if bytes.len() as u64 > MAX_PASSFILE_BYTES {
        return Err(PassfileError::TooLarge {
            path: path.to_owned(),
        });
    }
    let contents = String::from_utf8(bytes).map_err(|_| PassfileError::NotUtf8 {
        path: path.to_owned(),
    })?;
    Ok(lookup(&contents, passfile_host(info), info.port, db, user))
}

/// Writes a private (0600, created with O_EXCL) pgpass file in `dir` holding the password for
/// `info` (from the conninfo, or looked up in its passfile), matching any database; returns its
/// path, or None when there is no password to give. The caller deletes it.
///
/// The passfile lookup is the one our own connection makes: for the conninfo's user (else the
/// OS user) and its database (else the user name). The single line written is
/// `*:*:*:*:<password>`: the file is made for one program run that connects to one server as
/// one user, so matching everything is as narrow as the file itself, and it spares us libpq's
/// host-matching rules (socket directories, `hostaddr`), which the program's libpq build may
/// apply differently. `dir` should be private to the server's OS user (a data directory
/// subfolder, say); O_EXCL with O_NOFOLLOW still refuses a planted file or symlink elsewhere.
pub fn write_private_passfile(dir: &Path, info: &ConnInfo) -> Result<Option<PathBuf>, SourceError> {
    let password = match &info.password {
        Some(p) => Some(p.clone()),
        None => match &info.passfile {
            Some(path) => {
                let user = match info.user.clone().or_else(os_user_name) {
                    Some(u) => u,
                    None => return Ok(None),
                };
                let db = info.dbname.as_deref().unwrap_or(&user).to_owned();
                read_password(path, info, &db, &user)?
            }
            None => None,
        },
    };
    let Some(password) = password else {
        return Ok(None);
    };
    if password.contains(['\n', '\r']) {
        return Err(PassfileError::Unrepresentable.into());
    }
    let line = format!("*:*:*:*:{}\n", escape_field(&password));
    let (path, mut file) = create_private_file(dir)?;
    if let Err(source) = file.write_all(line.as_bytes()) {
        // Best effort: do not leave a partial secret behind.
        let _ = std::fs::remove_file(&path);
        return Err(PassfileError::Write { path, source }.into());
    }
    Ok(Some(path))
}

/// Escapes a pgpass field: `\` and `:` get a backslash, as libpq's reader expects.
fn escape_field(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 2);
    for c in text.chars() {
        if c == '\\' || c == ':' {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// Creates a new file readable and writable by its owner only, under a fresh name in `dir`.
/// `create_new` is O_CREAT|O_EXCL, so an existing file or symlink is never opened.
fn create_private_file(dir: &Path) -> Result<(PathBuf, File), PassfileError> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut last_error = None;
    for _ in 0..16 {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let name = format!(
            "cloudmig-pgpass-{}-{}-{nanos:08x}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        let path = dir.join(name);
        match OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&path)
        {
            Ok(file) => {
                // The umask can only have removed bits; make sure none were added either.
                if let Err(source) = file.set_permissions(std::fs::Permissions::from_mode(0o600)) {
                    let _ = std::fs::remove_file(&path);
                    return Err(PassfileError::Write { path, source });
                }
                return Ok((path, file));
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => last_error = Some(e),
            Err(source) => return Err(PassfileError::Write { path, source }),
        }
    }
    Err(PassfileError::Write {
        path: dir.to_owned(),
        source: last_error
            .unwrap_or_else(|| std::io::Error::other("could not find an unused file name")),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = "\
# comment line:*:*:*:nope
db.example.com:5432:app:alice:first
db.example.com:5432:app:alice:second
*:5433:*:bob:wild\\:card\\\\pw
localhost:5432:*:carol:viasocket
/tmp/sock:5432:*:carol:customsocket
we\\:ird\\\\host:1:d:u:escaped
\\*:2:d:u:literalstar
*:3:d:u:
short:4:d:u
*:*:*:trailing:pw:with:colons
";

    #[test]
    fn first_match_wins() {
        assert_eq!(
            lookup(FILE, "db.example.com", 5432, "app", "alice").as_deref(),
            Some("first")
        );
        assert_eq!(lookup(FILE, "db.example.com", 5432, "other", "alice"), None);
        assert_eq!(lookup(FILE, "db.example.com", 5433, "app", "alice"), None);
    }

    #[test]
    fn wildcards_and_escapes() {
        assert_eq!(
            lookup(FILE, "anything", 5433, "x", "bob").as_deref(),
            Some("wild:card\\pw")
        );
        assert_eq!(
            lookup(FILE, "we:ird\\host", 1, "d", "u").as_deref(),
            Some("escaped")
        );
        assert_eq!(
            lookup(FILE, "*", 2, "d", "u").as_deref(),
            Some("literalstar")
        );
        assert_eq!(
            lookup(FILE, "other", 2, "d", "u"),
            None,
            "\\* is not a wildcard"
        );
        assert_eq!(lookup(FILE, "h", 3, "d", "u"), None, "empty password");
        assert_eq!(
            lookup(FILE, "short", 4, "d", "u"),
            None,
            "line without password"
        );
        // libpq's password ends at the next unescaped colon.
        assert_eq!(lookup(FILE, "h", 9, "d", "trailing").as_deref(), Some("pw"));
        assert_eq!(
            lookup("# only:*:*:*:comment\n", "# only", 1, "a", "b"),
            None
        );
        assert_eq!(
            lookup("h:1:d:u:crlf\r\n", "h", 1, "d", "u").as_deref(),
            Some("crlf")
        );
        assert_eq!(lookup("", "h", 1, "d", "u"), None);
    }

    #[test]
    fn localhost_matches_default_socket() {
        let socket = ConnInfo::parse("user=carol").unwrap_or_default();
        assert_eq!(passfile_host(&socket), "localhost");
        assert_eq!(
            lookup(FILE, passfile_host(&socket), 5432, "db", "carol").as_deref(),
            Some("viasocket")
        );
        let explicit = ConnInfo::parse("host=/var/run/postgresql").unwrap_or_default();
        assert_eq!(passfile_host(&explicit), "localhost");
        let custom = ConnInfo::parse("host=/tmp/sock").unwrap_or_default();
        assert_eq!(
            lookup(FILE, passfile_host(&custom), 5432, "db", "carol").as_deref(),
            Some("customsocket")
        );
        let addr = ConnInfo::parse("hostaddr=10.1.2.3").unwrap_or_default();
        assert_eq!(passfile_host(&addr), "10.1.2.3");
        let both = ConnInfo::parse("hostaddr=10.1.2.3 host=db").unwrap_or_default();
        assert_eq!(passfile_host(&both), "db");
    }

    #[test]
    fn file_wrapper_checks_permissions() -> Result<(), Box<dyn std::error::Error>> {
        let dir = std::env::temp_dir().join(format!("cloudmig-passfile-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let path = dir.join("pgpass");
        let mut f = File::create(&path)?;
        f.write_all(b"h:5432:d:u:secret\n")?;
        drop(f);
        let info = ConnInfo::parse("host=h")?;

        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644))?;
        let err = read_password(&path, &info, "d", "u").err();
        assert!(
            matches!(err, Some(PassfileError::Permissions { mode: 0o644, .. })),
            "{err:?}"
        );
        let text = err.map(|e| e.to_string()).unwrap_or_default();
        assert!(text.contains("0600") && !text.contains("secret"), "{text}");

        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
        assert_eq!(
            read_password(&path, &info, "d", "u")?.as_deref(),
            Some("secret")
        );
        assert_eq!(read_password(&path, &info, "d", "other")?, None);

        let missing = read_password(&dir.join("missing"), &info, "d", "u");
        assert!(matches!(missing, Err(PassfileError::Read { .. })));
        let not_file = read_password(&dir, &info, "d", "u");
        assert!(
            matches!(
                not_file,
                Err(PassfileError::NotAFile { .. }) | Err(PassfileError::Permissions { .. })
            ),
            "{not_file:?}"
        );
        std::fs::remove_dir_all(&dir)?;
        Ok(())
    }
    #[test]
    fn private_passfile_round_trips() -> Result<(), Box<dyn std::error::Error>> {
        let dir = std::env::temp_dir().join(format!("cloudmig-privpass-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let secret = "p:a\\s s#w*rd\\:";
        let info = ConnInfo {
            password: Some(secret.into()),
            ..ConnInfo::parse("host=db.example.com port=6000 user=alice dbname=app")?
        };
        let path = write_private_passfile(&dir, &info)?.ok_or("no file")?;
        assert!(path.starts_with(&dir));
        let meta = std::fs::symlink_metadata(&path)?;
        assert!(meta.is_file());
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        let text = std::fs::read_to_string(&path)?;
        assert_eq!(text, "*:*:*:*:p\\:a\\\\s s#w*rd\\\\\\:\n");
        // What libpq would find, for any database and for the conninfo's own target.
        for db in ["app", "postgres", "other db"] {
            assert_eq!(
                lookup(&text, passfile_host(&info), 6000, db, "alice").as_deref(),
                Some(secret)
            );
        }
        assert_eq!(
            read_password(&path, &info, "postgres", "alice")?.as_deref(),
            Some(secret)
        );
        // A second file gets another name; neither clobbers the other.
        let second = write_private_passfile(&dir, &info)?.ok_or("no file")?;
        assert_ne!(second, path);
        std::fs::remove_file(&second)?;

        // From the conninfo's passfile instead: looked up for its user and database.
        let source_file = dir.join("source-pgpass");
        std::fs::write(
            &source_file,
            "db.example.com:6000:app:alice:from\\:file\n*:*:*:*:fallback\n",
        )?;
        std::fs::set_permissions(&source_file, std::fs::Permissions::from_mode(0o600))?;
        let via_file = ConnInfo {
            passfile: Some(source_file.clone()),
            ..ConnInfo::parse("host=db.example.com port=6000 user=alice dbname=app")?
        };
        let copy = write_private_passfile(&dir, &via_file)?.ok_or("no file")?;
        assert_eq!(
            lookup(&std::fs::read_to_string(&copy)?, "h", 1, "d", "alice").as_deref(),
            Some("from:file")
        );
        std::fs::remove_file(&copy)?;

        // Nothing to give: no file is written.
        let none = ConnInfo::parse("host=h user=u")?;
        assert_eq!(write_private_passfile(&dir, &none)?, None);
        std::fs::write(&source_file, "other:1:d:u:x\n")?;
        let unmatched = ConnInfo {
            passfile: Some(source_file.clone()),
            ..none.clone()
        };
        assert_eq!(write_private_passfile(&dir, &unmatched)?, None);

        // Errors name the problem, never the password.
        let newline = ConnInfo {
            password: Some("two\nlines-secret".into()),
            ..none.clone()
        };
        let err = write_private_passfile(&dir, &newline)
            .err()
            .map(|e| e.to_string());
        assert!(
            err.as_deref()
                .is_some_and(|e| e.contains("line break") && !e.contains("secret")),
            "{err:?}"
        );
        let missing_dir = write_private_passfile(&dir.join("missing"), &info);
        assert!(
            matches!(
                missing_dir,
                Err(SourceError::Passfile(PassfileError::Write { .. }))
            ),
            "{missing_dir:?}"
        );
        std::fs::remove_file(&path)?;
        std::fs::remove_dir_all(&dir)?;
        Ok(())
    }
}
