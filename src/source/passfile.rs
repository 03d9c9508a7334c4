//! Password files in libpq's `.pgpass` format: `hostname:port:database:username:password`.
//!
//! Only the file named by the conninfo's `passfile` is ever read: this code runs inside the
//! destination server, whose `~/.pgpass` and `PGPASSFILE` belong to the server's OS user, not
//! to the user who called us. Matching mirrors libpq's `passwordFromFile` (fe-connect.c): `*`
//! matches anything, `\:` and `\\` escape, lines starting with `#` are comments, the first
//! matching line wins, and `localhost` matches a connection over the default Unix socket.

use std::fs::File;
use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use crate::source::conninfo::{ConnInfo, DEFAULT_SOCKET_DIR};

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

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

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
}
