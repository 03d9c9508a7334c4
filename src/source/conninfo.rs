//! Connection strings: parsing libpq's two forms (`key=value` pairs and `postgresql://` URIs)
//! into a [`ConnInfo`], validating them, and rendering them back.
//!
//! We accept the subset of libpq's keywords that this client implements and reject every other
//! one by name, as libpq rejects unknown keywords, so a user never believes an option took
//! effect when it did not. Parsing never panics on any input.
//!
//! TLS and authentication policy keywords (`sslmode`, `sslrootcert`, `sslcert`, `sslkey`,
//! `sslnegotiation`, `channel_binding`, `require_auth`) are parsed and cross-checked here, as
//! libpq's `connectOptions2` does, so a contradictory string is refused before any connection.
//!
//! Secrets: the password only leaves a `ConnInfo` through [`ConnInfo::to_conninfo_string`] (to
//! store the secret) and the connection's authentication exchange. `Debug`, [`ConnInfo::masked`]
//! and every [`ConnInfoError`] leave it out.

use std::fmt;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

/// Where libpq looks for the Unix socket when no host is given (Debian's compiled-in default).
pub const DEFAULT_SOCKET_DIR: &str = "/var/run/postgresql";
/// Where Debian, Red Hat and Alpine keep the system's CA bundle (OpenSSL's default file).
const SYSTEM_CA_BUNDLES: &[&str] = &[
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/ssl/cert.pem",
];
/// The default port.
pub const DEFAULT_PORT: u16 = 5432;
/// Our connect timeout when the conninfo sets none (libpq would wait forever).
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// What masked renderings show instead of the password.
pub const PASSWORD_MASK: &str = "********";

/// libpq keywords we know but do not implement: naming them in the error tells the user the
/// option is real but ignored here, rather than misspelled.
const UNSUPPORTED_LIBPQ_KEYS: &[&str] = &[
    "client_encoding",
    "fallback_application_name",
    "gssdelegation",
    "gssencmode",
    "gsslib",
    "keepalives",
    "keepalives_count",
    "keepalives_idle",
    "keepalives_interval",
    "krbsrvname",
    "load_balance_hosts",
    "options",
    "replication",
    "requirepeer",
    "requiressl",
    "service",
    "ssl_max_protocol_version",
    "ssl_min_protocol_version",
    "sslcertmode",
    "sslcompression",
    "sslcrl",
    "sslcrldir",
    "sslpassword",
    "sslsni",
    "target_session_attrs",
    "tcp_user_timeout",
];

/// libpq's `sslmode`. Over a Unix socket it is ignored (no TLS there), as in libpq.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum SslMode {
    /// Never use TLS.
    Disable,
    /// Plaintext first; TLS only if the server rejects the plaintext connection.
    Allow,
    /// TLS if the server offers it, else plaintext (libpq's default).
    #[default]
    Prefer,
    /// TLS; the certificate is checked against `sslrootcert` only if one is given.
    Require,
    /// TLS with the server certificate checked against a CA.
    VerifyCa,
    /// TLS with the certificate and the host name checked.
    VerifyFull,
}

impl SslMode {
    /// libpq's spelling of the mode.
    pub fn as_str(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Allow => "allow",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }

    /// True when the mode forbids a plaintext connection.
    pub fn requires_tls(self) -> bool {
        matches!(
            self,
            SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull
        )
    }
}

impl fmt::Display for SslMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for SslMode {
    type Err = ConnInfoError;

    fn from_str(s: &str) -> Result<SslMode, ConnInfoError> {
        Ok(match s {
            "disable" => SslMode::Disable,
            "allow" => SslMode::Allow,
            "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            _ => return Err(ConnInfoError::InvalidSslMode(s.to_owned())),
        })
    }
}

/// `sslrootcert`: where the trusted root certificates for the source's certificate come from.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum RootCert {
    /// A PEM file of one or more certificates.
    File(PathBuf),
    /// The operating system's trusted roots (libpq 16's `sslrootcert=system`), which forces
    /// `sslmode=verify-full`.
    System,
}

/// libpq 17's `sslnegotiation`: how TLS starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum SslNegotiation {
    /// Ask with an `SSLRequest` first (every server version).
    #[default]
    Postgres,
    /// Start the TLS handshake at once, with ALPN `postgresql` (PostgreSQL 17 servers only).
    Direct,
}

impl SslNegotiation {
    /// libpq's spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            SslNegotiation::Postgres => "postgres",
            SslNegotiation::Direct => "direct",
        }
    }
}

/// libpq's `channel_binding`: whether SCRAM must be bound to the TLS channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum ChannelBindingMode {
    /// Never bind (SCRAM-SHA-256 only).
    Disable,
    /// Bind when TLS is in use and the server offers SCRAM-SHA-256-PLUS.
    #[default]
    Prefer,
    /// Refuse any authentication that is not SCRAM-SHA-256-PLUS over TLS.
    Require,
}

impl ChannelBindingMode {
    /// libpq's spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            ChannelBindingMode::Disable => "disable",
            ChannelBindingMode::Prefer => "prefer",
            ChannelBindingMode::Require => "require",
        }
    }
}

/// One method a `require_auth` list may name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AuthMethod {
    /// Cleartext password (`AuthenticationCleartextPassword`).
    Password,
    /// MD5-hashed password.
    Md5,
    /// GSSAPI (never implemented here; accepted in the list as libpq does).
    Gss,
    /// SSPI (never implemented here; accepted in the list as libpq does).
    Sspi,
    /// SCRAM-SHA-256, with or without channel binding.
    ScramSha256,
    /// No authentication at all (the server says `AuthenticationOk` straight away).
    None,
}

impl AuthMethod {
    /// libpq's spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            AuthMethod::Password => "password",
            AuthMethod::Md5 => "md5",
            AuthMethod::Gss => "gss",
            AuthMethod::Sspi => "sspi",
            AuthMethod::ScramSha256 => "scram-sha-256",
            AuthMethod::None => "none",
        }
    }

    fn parse(s: &str) -> Option<AuthMethod> {
        Some(match s {
            "password" => AuthMethod::Password,
            "md5" => AuthMethod::Md5,
            "gss" => AuthMethod::Gss,
            "sspi" => AuthMethod::Sspi,
            "scram-sha-256" => AuthMethod::ScramSha256,
            "none" => AuthMethod::None,
            _ => return None,
        })
    }
}

/// libpq 16's `require_auth`: the authentication methods the server may use, either as a list
/// of allowed methods (`md5,scram-sha-256`) or of forbidden ones (`!password,!md5`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RequireAuth {
    /// True for a list of `!method`s.
    pub negated: bool,
    /// The methods named, without the `!`, in order.
    pub methods: Vec<AuthMethod>,
}

impl RequireAuth {
    /// Parses libpq's syntax: a comma-separated list, all negated or none, no repeats.
    pub fn parse(s: &str) -> Result<RequireAuth, ConnInfoError> {
        let mut negated = None;
        let mut methods = Vec::new();
        for part in s.split(',') {
            let part = part.trim();
            let (neg, name) = match part.strip_prefix('!') {
                Some(rest) => (true, rest),
                None => (false, part),
            };
            match negated {
                None => negated = Some(neg),
                Some(n) if n != neg => {
                    return Err(ConnInfoError::InvalidRequireAuth(format!(
                        "method \"{part}\" cannot be mixed with {} methods",
                        if n { "negative" } else { "non-negative" }
                    )))
                }
                Some(_) => {}
            }
            let method = AuthMethod::parse(name).ok_or_else(|| {
                ConnInfoError::InvalidRequireAuth(format!("invalid value \"{part}\""))
            })?;
            if methods.contains(&method) {
                return Err(ConnInfoError::InvalidRequireAuth(format!(
                    "method \"{part}\" is specified more than once"
                )));
            }
            methods.push(method);
        }
        Ok(RequireAuth {
            negated: negated.unwrap_or(false),
            methods,
        })
    }

    /// Whether the server may authenticate us with `method` (for [`AuthMethod::None`]: whether
    /// it may let us in without any authentication exchange).
    pub fn allows(&self, method: AuthMethod) -> bool {
        self.methods.contains(&method) != self.negated
    }

    /// Whether the list names `method` as allowed (not merely leaves it unforbidden): our
    /// explicit opt-in for sending a password to a server not authenticated by TLS.
    pub fn names(&self, method: AuthMethod) -> bool {
        !self.negated && self.methods.contains(&method)
    }
}

impl fmt::Display for RequireAuth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, m) in self.methods.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            if self.negated {
                f.write_str("!")?;
            }
            f.write_str(m.as_str())?;
        }
        Ok(())
    }
}

/// Why a connection string was rejected. Messages follow libpq's where it has one, but never
/// quote a value that could be (part of) the password.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConnInfoError {
    /// A keyword libpq does not know either.
    #[error("invalid connection option \"{0}\"")]
    UnknownKey(String),
    /// A libpq keyword this client does not implement.
    #[error("connection option \"{0}\" is not supported")]
    UnsupportedKey(String),
    /// A word without `=` after it in the key=value form.
    #[error("missing \"=\" after \"{0}\" in connection info string")]
    MissingEquals(String),
    /// A word without `=` right after the password's value; we do not quote it because it is
    /// most likely the rest of an unquoted password containing a space.
    #[error("missing \"=\" after a word following the password in connection info string (quote a password containing spaces)")]
    MissingEqualsAfterPassword,
    /// A single-quoted value without its closing quote.
    #[error("unterminated quoted string in connection info string")]
    UnterminatedQuote,
    /// The string contains a NUL byte, which libpq cannot represent either.
    #[error("connection string contains a null byte")]
    NullByte,
    /// More than one host (or port) was given.
    #[error("multiple hosts are not supported")]
    MultipleHosts,
    /// `port` is not an integer between 1 and 65535.
    #[error("invalid port number: \"{0}\"")]
    InvalidPort(String),
    /// `connect_timeout` is not a non-negative integer.
    #[error("invalid integer value \"{0}\" for connection option \"connect_timeout\"")]
    InvalidConnectTimeout(String),
    /// `sslmode` is not one of libpq's modes.
    #[error("invalid sslmode value: \"{0}\"")]
    InvalidSslMode(String),
    /// `sslnegotiation` is not `postgres` or `direct`.
    #[error("invalid sslnegotiation value: \"{0}\"")]
    InvalidSslNegotiation(String),
    /// `channel_binding` is not `disable`, `prefer` or `require`.
    #[error("invalid channel_binding value: \"{0}\"")]
    InvalidChannelBinding(String),
    /// A malformed `require_auth` list.
    #[error("invalid require_auth: {0}")]
    InvalidRequireAuth(String),
    /// TLS options that contradict each other, as libpq refuses them.
    #[error("{0}")]
    ConflictingTlsOptions(String),
    /// `hostaddr` is not a numeric IPv4 or IPv6 address.
    #[error("could not parse network address \"{0}\"")]
    InvalidHostaddr(String),
    /// A malformed `%XX` sequence (or one decoding to invalid UTF-8) in the named URI part.
    #[error("invalid percent-encoded value in the {0} of the URI")]
    InvalidPercentEncoding(&'static str),
    /// Any other malformed URI; the URI itself is not quoted as it may hold the password.
    #[error("invalid URI: {0}")]
    InvalidUri(&'static str),
}

/// A parsed connection string: where the source is and how to log in.
#[derive(Clone, PartialEq, Eq)]
pub struct ConnInfo {
    /// Host name, IP address, or (starting with `/`) Unix socket directory; `None` means the
    /// socket in [`DEFAULT_SOCKET_DIR`].
    pub host: Option<String>,
    /// Numeric address to connect to instead of resolving `host` (which then only names the
    /// server for messages and the passfile, as in libpq).
    pub hostaddr: Option<String>,
    /// TCP port, also the suffix of the Unix socket file name.
    pub port: u16,
    /// User name; `None` means the operating system user, as in libpq.
    pub user: Option<String>,
    /// Password; `None` means look in `passfile`, if any.
    pub password: Option<String>,
    /// Password file in `.pgpass` format, used only when `password` is `None`.
    pub passfile: Option<PathBuf>,
    /// Database name; `None` means the user name.
    pub dbname: Option<String>,
    /// TLS policy.
    pub sslmode: SslMode,
    /// Trusted roots for the server certificate; when set, the chain is always checked.
    pub sslrootcert: Option<RootCert>,
    /// Client certificate chain (PEM), sent when the server asks for one.
    pub sslcert: Option<PathBuf>,
    /// Private key of the client certificate (PEM, unencrypted, mode 0600 or stricter).
    pub sslkey: Option<PathBuf>,
    /// How TLS starts.
    pub sslnegotiation: SslNegotiation,
    /// Whether SCRAM is bound to the TLS channel.
    pub channel_binding: ChannelBindingMode,
    /// Which authentication methods the server may ask for; `None` means our default policy
    /// (see [`crate::source::auth`]).
    pub require_auth: Option<RequireAuth>,
    /// Limit on connecting and authenticating.
    pub connect_timeout: Duration,
    /// `application_name` to report; `None` means the caller's default.
    pub application_name: Option<String>,
}

impl Default for ConnInfo {
    fn default() -> ConnInfo {
        ConnInfo {
            host: None,
            hostaddr: None,
            port: DEFAULT_PORT,
            user: None,
            password: None,
            passfile: None,
            dbname: None,
            sslmode: SslMode::default(),
            sslrootcert: None,
            sslcert: None,
            sslkey: None,
            sslnegotiation: SslNegotiation::default(),
            channel_binding: ChannelBindingMode::default(),
            require_auth: None,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            application_name: None,
        }
    }
}

impl fmt::Debug for ConnInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConnInfo")
            .field("host", &self.host)
            .field("hostaddr", &self.hostaddr)
            .field("port", &self.port)
            .field("user", &self.user)
            .field("password", &self.password.as_ref().map(|_| PASSWORD_MASK))
            .field("passfile", &self.passfile)
            .field("dbname", &self.dbname)
            .field("sslmode", &self.sslmode)
            .field("sslrootcert", &self.sslrootcert)
            .field("sslcert", &self.sslcert)
            .field("sslkey", &self.sslkey)
            .field("sslnegotiation", &self.sslnegotiation)
            .field("channel_binding", &self.channel_binding)
            .field("require_auth", &self.require_auth)
            .field("connect_timeout", &self.connect_timeout)
            .field("application_name", &self.application_name)
            .finish()
    }
}

impl FromStr for ConnInfo {
    type Err = ConnInfoError;

    fn from_str(s: &str) -> Result<ConnInfo, ConnInfoError> {
        ConnInfo::parse(s)
    }
}

impl ConnInfo {
    /// Parses a libpq connection string, either `key=value ...` or a `postgresql://` URI.
    /// The empty string gives all defaults.
    pub fn parse(s: &str) -> Result<ConnInfo, ConnInfoError> {
        if s.contains('\0') {
            return Err(ConnInfoError::NullByte);
        }
        let pairs = if let Some(rest) = strip_uri_prefix(s) {
            parse_uri(rest)?
        } else {
            parse_key_values(s)?
        };
        let mut info = ConnInfo::default();
        let mut sslmode_given = false;
        for (key, value) in pairs {
            sslmode_given |= key == "sslmode" && !value.is_empty();
            info.set(&key, value)?;
        }
        // libpq 16: the system's roots make sense only with the host name checked, so they
        // make verify-full the default and refuse anything weaker.
        if info.sslrootcert == Some(RootCert::System) {
            if !sslmode_given {
                info.sslmode = SslMode::VerifyFull;
            } else if info.sslmode != SslMode::VerifyFull {
                return Err(ConnInfoError::ConflictingTlsOptions(format!(
                    "weak sslmode \"{}\" may not be used with sslrootcert=system (use \"verify-full\")",
                    info.sslmode
                )));
            }
        }
        // libpq 17: a direct handshake never falls back to plaintext.
        if info.sslnegotiation == SslNegotiation::Direct && !info.sslmode.requires_tls() {
            return Err(ConnInfoError::ConflictingTlsOptions(format!(
                "weak sslmode \"{}\" may not be used with sslnegotiation=direct (use \"require\", \"verify-ca\", or \"verify-full\")",
                info.sslmode
            )));
        }
        Ok(info)
    }

    /// Applies one keyword. Later values override earlier ones, as in libpq; an empty value
    /// means "not set", as libpq treats empty host, user, password, etc.
    fn set(&mut self, key: &str, value: String) -> Result<(), ConnInfoError> {
        let opt = if value.is_empty() { None } else { Some(value) };
        match key {
            "host" => {
                if opt.as_deref().is_some_and(|h| h.contains(',')) {
                    return Err(ConnInfoError::MultipleHosts);
                }
                self.host = opt;
            }
            "hostaddr" => {
                if let Some(addr) = &opt {
                    if addr.contains(',') {
                        return Err(ConnInfoError::MultipleHosts);
                    }
                    if addr.parse::<IpAddr>().is_err() {
                        return Err(ConnInfoError::InvalidHostaddr(addr.clone()));
                    }
                }
                self.hostaddr = opt;
            }
            "port" => {
                self.port = match opt {
                    None => DEFAULT_PORT,
                    Some(p) if p.contains(',') => return Err(ConnInfoError::MultipleHosts),
                    Some(p) => parse_port(&p)?,
                }
            }
            "user" => self.user = opt,
            "password" => self.password = opt,
            "passfile" => self.passfile = opt.map(PathBuf::from),
            "dbname" => self.dbname = opt,
            "sslmode" => {
                self.sslmode = match opt {
                    None => SslMode::default(),
                    Some(m) => m.parse()?,
                }
            }
            "sslrootcert" => {
                self.sslrootcert = opt.map(|v| {
                    if v == "system" {
                        RootCert::System
                    } else {
                        RootCert::File(PathBuf::from(v))
                    }
                })
            }
            "sslcert" => self.sslcert = opt.map(PathBuf::from),
            "sslkey" => self.sslkey = opt.map(PathBuf::from),
            "sslnegotiation" => {
                self.sslnegotiation = match opt.as_deref() {
                    None | Some("postgres") => SslNegotiation::Postgres,
                    Some("direct") => SslNegotiation::Direct,
                    Some(other) => {
                        return Err(ConnInfoError::InvalidSslNegotiation(other.to_owned()))
                    }
                }
            }
            "channel_binding" => {
                self.channel_binding = match opt.as_deref() {
                    None | Some("prefer") => ChannelBindingMode::Prefer,
                    Some("disable") => ChannelBindingMode::Disable,
                    Some("require") => ChannelBindingMode::Require,
                    Some(other) => {
                        return Err(ConnInfoError::InvalidChannelBinding(other.to_owned()))
                    }
                }
            }
            "require_auth" => {
                self.require_auth = match opt {
                    None => None,
                    Some(v) => Some(RequireAuth::parse(&v)?),
                }
            }
            "connect_timeout" => {
                self.connect_timeout = match opt {
                    None => DEFAULT_CONNECT_TIMEOUT,
                    Some(t) => parse_connect_timeout(&t)?,
                }
            }
            "application_name" => self.application_name = opt,
            _ if UNSUPPORTED_LIBPQ_KEYS.contains(&key) => {
                return Err(ConnInfoError::UnsupportedKey(key.to_owned()))
            }
            _ => return Err(ConnInfoError::UnknownKey(key.to_owned())),
        }
        Ok(())
    }

    /// The files on the destination server this conninfo makes us read (passfile, TLS roots,
    /// client certificate and key): callers let only trusted roles name any, since the server
    /// process reads them with its own rights.
    pub fn server_files(&self) -> Vec<&Path> {
        let mut files: Vec<&Path> = Vec::new();
        files.extend(self.passfile.as_deref());
        if let Some(RootCert::File(f)) = &self.sslrootcert {
            files.push(f);
        }
        files.extend(self.sslcert.as_deref());
        files.extend(self.sslkey.as_deref());
        files
    }

    /// The user name to log in as, when the conninfo names one (else the OS user is used).
    pub fn effective_user(&self) -> Option<&str> {
        self.user.as_deref()
    }

    /// The database to connect to: `dbname`, else the user name, as libpq defaults it.
    pub fn effective_dbname(&self) -> Option<&str> {
        self.dbname.as_deref().or(self.user.as_deref())
    }

    /// A copy connecting to another database of the same server.
    pub fn with_dbname(&self, db: &str) -> ConnInfo {
        ConnInfo {
            dbname: Some(db.to_owned()),
            ..self.clone()
        }
    }

    /// The Unix socket directory when this connects over a Unix socket (no `hostaddr`, and no
    /// host or a host starting with `/`).
    pub fn socket_dir(&self) -> Option<&str> {
        if self.hostaddr.is_some() {
            return None;
        }
        match self.host.as_deref() {
            None => Some(DEFAULT_SOCKET_DIR),
            Some(h) if h.starts_with('/') => Some(h),
            Some(_) => None,
        }
    }

    /// The Unix socket file this connects to, if it uses one: `<dir>/.s.PGSQL.<port>`.
    pub fn socket_path(&self) -> Option<PathBuf> {
        self.socket_dir()
            .map(|dir| PathBuf::from(dir).join(format!(".s.PGSQL.{}", self.port)))
    }

    /// Where this connects, for messages: `host:port`, `[v6addr]:port` or `/socket/dir:port`.
    /// Never contains a secret.
    pub fn display_target(&self) -> String {
        if let Some(dir) = self.socket_dir() {
            return format!("{dir}:{}", self.port);
        }
        let name = self
            .host
            .as_deref()
            .or(self.hostaddr.as_deref())
            .unwrap_or(DEFAULT_SOCKET_DIR);
        if name.contains(':') {
            format!("[{name}]:{}", self.port)
        } else {
            format!("{name}:{}", self.port)
        }
    }

    /// A `key=value` rendering safe for views and messages: the password, if any, is shown as
    /// `password='********'`.
    pub fn masked(&self) -> String {
        self.render(false)
    }

    /// The full `key=value` rendering, password included; `parse` gives back an equal value.
    /// Only for storing the secret: never log or display it.
    pub fn to_conninfo_string(&self) -> String {
        self.render(true)
    }

    /// A libpq conninfo string for an external client program: host/hostaddr/port/user/
    /// sslmode/connect_timeout/application_name and `dbname`, but never the password or passfile.
    ///
    /// Pass it as the program's database argument (`pg_dump "<this>"`) and the password
    /// through a file from [`crate::source::write_private_passfile`] named in the program's
    /// `PGPASSFILE`, so that no secret shows in `ps` or `/proc/<pid>/environ`. The socket
    /// directory is always spelled out, because the program's libpq may have been built with
    /// another default than ours; `connect_timeout` too, because libpq's default is to wait
    /// forever.
    pub fn for_client_program(&self, dbname: &str) -> String {
        fn push(out: &mut Vec<String>, key: &str, value: &str) {
            out.push(format!("{key}={}", quote_value(value)));
        }
        let mut out = Vec::new();
        match (&self.host, self.socket_dir()) {
            (Some(h), _) => push(&mut out, "host", h),
            (None, Some(dir)) => push(&mut out, "host", dir),
            (None, None) => {}
        }
        if let Some(a) = &self.hostaddr {
            push(&mut out, "hostaddr", a);
        }
        push(&mut out, "port", &self.port.to_string());
        if let Some(u) = &self.user {
            push(&mut out, "user", u);
        }
        push(&mut out, "dbname", dbname);
        push(&mut out, "sslmode", self.sslmode.as_str());
        self.push_tls_options(&mut out, false);
        push(
            &mut out,
            "connect_timeout",
            &self.connect_timeout.as_secs().max(2).to_string(),
        );
        if let Some(a) = &self.application_name {
            push(&mut out, "application_name", a);
        }
        out.join(" ")
    }

    /// Appends the TLS and authentication options that differ from their defaults.
    ///
    /// `all`: every option, for our own parser. Without it, only what PostgreSQL 15's libpq
    /// (our client programs' library) knows: it has no `require_auth` (16) nor `sslnegotiation`
    /// (17), and reads `sslrootcert=system` as a file name, so the system bundle's path is
    /// given instead (libpq 15 then keeps the sslmode, which is verify-full anyway).
    fn push_tls_options(&self, out: &mut Vec<String>, all: bool) {
        fn push(out: &mut Vec<String>, key: &str, value: &str) {
            out.push(format!("{key}={}", quote_value(value)));
        }
        match &self.sslrootcert {
            Some(RootCert::File(f)) => push(out, "sslrootcert", &f.to_string_lossy()),
            Some(RootCert::System) if all => push(out, "sslrootcert", "system"),
            Some(RootCert::System) => {
                if let Some(bundle) = SYSTEM_CA_BUNDLES.iter().find(|p| Path::new(p).exists()) {
                    push(out, "sslrootcert", bundle);
                }
            }
            None => {}
        }
        if let Some(c) = &self.sslcert {
            push(out, "sslcert", &c.to_string_lossy());
        }
        if let Some(k) = &self.sslkey {
            push(out, "sslkey", &k.to_string_lossy());
        }
        if all && self.sslnegotiation != SslNegotiation::default() {
            push(out, "sslnegotiation", self.sslnegotiation.as_str());
        }
        if self.channel_binding != ChannelBindingMode::default() {
            push(out, "channel_binding", self.channel_binding.as_str());
        }
        if let (true, Some(r)) = (all, &self.require_auth) {
            push(out, "require_auth", &r.to_string());
        }
    }

    fn render(&self, with_password: bool) -> String {
        fn push(out: &mut Vec<String>, key: &str, value: &str) {
            out.push(format!("{key}={}", quote_value(value)));
        }
        let mut out = Vec::new();
        if let Some(h) = &self.host {
            push(&mut out, "host", h);
        }
        if let Some(a) = &self.hostaddr {
            push(&mut out, "hostaddr", a);
        }
        push(&mut out, "port", &self.port.to_string());
        if let Some(u) = &self.user {
            push(&mut out, "user", u);
        }
        if let Some(p) = &self.password {
            if with_password {
                push(&mut out, "password", p);
            } else {
                // Always quoted, so the mask reads the same wherever it appears.
                out.push(format!("password='{PASSWORD_MASK}'"));
            }
        }
        if let Some(f) = &self.passfile {
            push(&mut out, "passfile", &f.to_string_lossy());
        }
        if let Some(d) = &self.dbname {
            push(&mut out, "dbname", d);
        }
        push(&mut out, "sslmode", self.sslmode.as_str());
        self.push_tls_options(&mut out, true);
        if self.connect_timeout != DEFAULT_CONNECT_TIMEOUT {
            push(
                &mut out,
                "connect_timeout",
                &self.connect_timeout.as_secs().to_string(),
            );
        }
        if let Some(a) = &self.application_name {
            push(&mut out, "application_name", a);
        }
        out.join(" ")
    }
}

/// Quotes a value for the key=value form when it needs it (empty, whitespace, quote or
/// backslash), escaping `'` and `\` as libpq's parser expects.
fn quote_value(value: &str) -> String {
    let needs_quotes = value.is_empty()
        || value
            .chars()
            .any(|c| c.is_ascii_whitespace() || c == '\'' || c == '\\');
    if !needs_quotes {
        return value.to_owned();
    }
    let mut out = String::with_capacity(value.len() + 2);
    out.push('\'');
    for c in value.chars() {
        if c == '\'' || c == '\\' {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('\'');
    out
}

fn parse_port(p: &str) -> Result<u16, ConnInfoError> {
    match p.trim().parse::<u16>() {
        Ok(port) if port > 0 => Ok(port),
        _ => Err(ConnInfoError::InvalidPort(p.to_owned())),
    }
}

/// libpq: seconds as an integer; 0 means "no limit" there and "our default" here; 1 is raised
/// to 2 because libpq considers a 1-second limit too likely to fire spuriously.
fn parse_connect_timeout(t: &str) -> Result<Duration, ConnInfoError> {
    let secs: u64 = t
        .trim()
        .parse()
        .map_err(|_| ConnInfoError::InvalidConnectTimeout(t.to_owned()))?;
    Ok(match secs {
        0 => DEFAULT_CONNECT_TIMEOUT,
        1 => Duration::from_secs(2),
        // Clamp absurd values so deadline arithmetic can never overflow.
        s => Duration::from_secs(s.min(365 * 24 * 3600)),
    })
}

fn strip_uri_prefix(s: &str) -> Option<&str> {
    s.strip_prefix("postgresql://")
        .or_else(|| s.strip_prefix("postgres://"))
}

/// libpq's `conninfo_parse`: `key = value` pairs separated by whitespace; values may be
/// single-quoted; a backslash escapes the next character, quoted or not.
fn parse_key_values(s: &str) -> Result<Vec<(String, String)>, ConnInfoError> {
    let mut pairs = Vec::new();
    let mut chars = s.chars().peekable();
    let mut last_key_was_password = false;
    loop {
        while chars.next_if(|c| c.is_ascii_whitespace()).is_some() {}
        if chars.peek().is_none() {
            return Ok(pairs);
        }
        let mut key = String::new();
        while let Some(c) = chars.next_if(|c| !c.is_ascii_whitespace() && *c != '=') {
            key.push(c);
        }
        while chars.next_if(|c| c.is_ascii_whitespace()).is_some() {}
        if chars.next_if_eq(&'=').is_none() {
            return Err(if last_key_was_password {
                ConnInfoError::MissingEqualsAfterPassword
            } else {
                ConnInfoError::MissingEquals(key)
            });
        }
        while chars.next_if(|c| c.is_ascii_whitespace()).is_some() {}
        let mut value = String::new();
        if chars.next_if_eq(&'\'').is_some() {
            loop {
                match chars.next() {
                    None => return Err(ConnInfoError::UnterminatedQuote),
                    Some('\'') => break,
                    Some('\\') => match chars.next() {
                        Some(c) => value.push(c),
                        None => return Err(ConnInfoError::UnterminatedQuote),
                    },
                    Some(c) => value.push(c),
                }
            }
        } else {
            while let Some(c) = chars.next_if(|c| !c.is_ascii_whitespace()) {
                if c == '\\' {
                    // libpq drops a trailing lone backslash; so do we.
                    if let Some(next) = chars.next() {
                        value.push(next);
                    }
                } else {
                    value.push(c);
                }
            }
        }
        last_key_was_password = key == "password";
        pairs.push((key, value));
    }
}

/// libpq's `conninfo_uri_parse_options`:
/// `[user[:password]@][host][:port][,...][/dbname][?param=value&...]`.
fn parse_uri(rest: &str) -> Result<Vec<(String, String)>, ConnInfoError> {
    let mut pairs = Vec::new();

    // Like libpq, look for '@' only before the first '/', so a password may contain '?'.
    let mut rest = rest;
    let userinfo_end = rest.find(['@', '/']);
    if let Some(at) = userinfo_end.filter(|&i| rest.as_bytes().get(i) == Some(&b'@')) {
        let userinfo = &rest[..at];
        let (user, password) = match userinfo.split_once(':') {
            Some((u, p)) => (u, Some(p)),
            None => (userinfo, None),
        };
        pairs.push(("user".to_owned(), percent_decode(user, "user name")?));
        if let Some(p) = password {
            pairs.push(("password".to_owned(), percent_decode(p, "password")?));
        }
        rest = &rest[at + 1..];
    }

    // Host, in brackets for IPv6 literals.
    let host;
    if let Some(after_bracket) = rest.strip_prefix('[') {
        let close = after_bracket.find(']').ok_or(ConnInfoError::InvalidUri(
            "missing \"]\" after an IPv6 host address",
        ))?;
        host = &after_bracket[..close];
        if host.is_empty() {
            return Err(ConnInfoError::InvalidUri("empty IPv6 host address"));
        }
        rest = &after_bracket[close + 1..];
        if !rest.is_empty() && !rest.starts_with([':', '/', '?', ',']) {
            return Err(ConnInfoError::InvalidUri(
                "unexpected character after an IPv6 host address",
            ));
        }
    } else {
        let end = rest.find([':', '/', '?', ',']).unwrap_or(rest.len());
        host = &rest[..end];
        rest = &rest[end..];
    }
    if !host.is_empty() {
        pairs.push(("host".to_owned(), percent_decode(host, "host")?));
    }

    if let Some(after_colon) = rest.strip_prefix(':') {
        let end = after_colon
            .find(['/', '?', ','])
            .unwrap_or(after_colon.len());
        let port = &after_colon[..end];
        if !port.is_empty() {
            pairs.push(("port".to_owned(), percent_decode(port, "port")?));
        }
        rest = &after_colon[end..];
    }
    if rest.starts_with(',') {
        return Err(ConnInfoError::MultipleHosts);
    }

    if let Some(after_slash) = rest.strip_prefix('/') {
        let end = after_slash.find('?').unwrap_or(after_slash.len());
        let db = &after_slash[..end];
        if !db.is_empty() {
            pairs.push(("dbname".to_owned(), percent_decode(db, "database name")?));
        }
        rest = &after_slash[end..];
    }

    if let Some(query) = rest.strip_prefix('?') {
        for param in query.split('&').filter(|p| !p.is_empty()) {
            let (key, value) = param.split_once('=').ok_or(ConnInfoError::InvalidUri(
                "missing key/value separator \"=\" in a query parameter",
            ))?;
            if value.contains('=') {
                return Err(ConnInfoError::InvalidUri(
                    "extra key/value separator \"=\" in a query parameter",
                ));
            }
            let key = percent_decode(key, "query parameters")?;
            let value = percent_decode(value, "query parameters")?;
            // libpq's JDBC-compatible spelling.
            if key == "ssl" && value == "true" {
                pairs.push(("sslmode".to_owned(), "require".to_owned()));
            } else {
                pairs.push((key, value));
            }
        }
    } else if !rest.is_empty() {
        return Err(ConnInfoError::InvalidUri(
            "unexpected characters after the host",
        ));
    }
    Ok(pairs)
}

/// Decodes `%XX` sequences; `%00` and sequences decoding to invalid UTF-8 are errors. `part`
/// names where in the URI the error is, without quoting the text (it may be the password).
fn percent_decode(s: &str, part: &'static str) -> Result<String, ConnInfoError> {
    if !s.contains('%') {
        return Ok(s.to_owned());
    }
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while let Some(&b) = bytes.get(i) {
        if b == b'%' {
            let hex = bytes
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or(ConnInfoError::InvalidPercentEncoding(part))?;
            if hex == 0 {
                return Err(ConnInfoError::NullByte);
            }
            out.push(hex);
            i += 3;
        } else {
            out.push(b);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| ConnInfoError::InvalidPercentEncoding(part))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> ConnInfo {
        match ConnInfo::parse(s) {
            Ok(info) => info,
            Err(e) => panic!("{s:?} did not parse: {e}"),
        }
    }

    fn parse_err(s: &str) -> ConnInfoError {
        match ConnInfo::parse(s) {
            Ok(info) => panic!("{s:?} parsed as {info:?}"),
            Err(e) => e,
        }
    }

    #[test]
    fn empty_string_gives_defaults() {
        let info = parse("");
        assert_eq!(info, ConnInfo::default());
        assert_eq!(parse("   \t\n"), ConnInfo::default());
        assert_eq!(info.port, 5432);
        assert_eq!(info.sslmode, SslMode::Prefer);
        assert_eq!(info.connect_timeout, Duration::from_secs(10));
        assert_eq!(
            info.socket_path(),
            Some(PathBuf::from("/var/run/postgresql/.s.PGSQL.5432"))
        );
        assert_eq!(info.display_target(), "/var/run/postgresql:5432");
    }

    #[test]
    fn key_value_form() {
        let info = parse(
            "host=db.example.com port = 6543 user=alice password='s3 cr\\'et\\\\' dbname=app \
             sslmode=disable connect_timeout=5 application_name=mig passfile=/tmp/pgpass",
        );
        assert_eq!(info.host.as_deref(), Some("db.example.com"));
        assert_eq!(info.port, 6543);
        assert_eq!(info.user.as_deref(), Some("alice"));
        assert_eq!(info.password.as_deref(), Some("s3 cr'et\\"));
        assert_eq!(info.dbname.as_deref(), Some("app"));
        assert_eq!(info.sslmode, SslMode::Disable);
        assert_eq!(info.connect_timeout, Duration::from_secs(5));
        assert_eq!(info.application_name.as_deref(), Some("mig"));
        assert_eq!(info.passfile, Some(PathBuf::from("/tmp/pgpass")));
        assert_eq!(info.display_target(), "db.example.com:6543");
        assert_eq!(info.socket_path(), None);
    }

    #[test]
    fn key_value_details() {
        // Unquoted backslash escapes, empty quoted value, later keys win, empty means unset.
        let info = parse("user=a\\ b password='' dbname=x dbname=y host=");
        assert_eq!(info.user.as_deref(), Some("a b"));
        assert_eq!(info.password, None);
        assert_eq!(info.dbname.as_deref(), Some("y"));
        assert_eq!(info.host, None);
        assert_eq!(parse("port=").port, 5432);
        // Quoted value directly followed by the next pair, as libpq allows.
        let info = parse("user='bob'dbname=z");
        assert_eq!(info.user.as_deref(), Some("bob"));
        assert_eq!(info.dbname.as_deref(), Some("z"));
    }

    #[test]
    fn key_value_errors() {
        assert_eq!(
            parse_err("host"),
            ConnInfoError::MissingEquals("host".into())
        );
        assert_eq!(parse_err("user='abc"), ConnInfoError::UnterminatedQuote);
        assert_eq!(parse_err("user='abc\\"), ConnInfoError::UnterminatedQuote);
        assert_eq!(
            parse_err("bogus=1"),
            ConnInfoError::UnknownKey("bogus".into())
        );
        assert_eq!(
            parse_err("sslpassword=x"),
            ConnInfoError::UnsupportedKey("sslpassword".into())
        );
        assert_eq!(parse_err("port=0"), ConnInfoError::InvalidPort("0".into()));
        assert_eq!(
            parse_err("port=65536"),
            ConnInfoError::InvalidPort("65536".into())
        );
        assert_eq!(
            parse_err("port=abc"),
            ConnInfoError::InvalidPort("abc".into())
        );
        assert_eq!(parse_err("host=a,b"), ConnInfoError::MultipleHosts);
        assert_eq!(parse_err("port=1,2"), ConnInfoError::MultipleHosts);
        assert_eq!(
            parse_err("hostaddr=1.2.3.4,5.6.7.8"),
            ConnInfoError::MultipleHosts
        );
        assert_eq!(
            parse_err("hostaddr=db.example"),
            ConnInfoError::InvalidHostaddr("db.example".into())
        );
        assert_eq!(
            parse_err("sslmode=maybe"),
            ConnInfoError::InvalidSslMode("maybe".into())
        );
        assert_eq!(
            parse_err("connect_timeout=-1"),
            ConnInfoError::InvalidConnectTimeout("-1".into())
        );
        assert_eq!(parse_err("user=a\0b"), ConnInfoError::NullByte);
        assert_eq!(parse_err("=x"), ConnInfoError::UnknownKey(String::new()));
    }

    #[test]
    fn connect_timeout_rules() {
        assert_eq!(
            parse("connect_timeout=0").connect_timeout,
            Duration::from_secs(10)
        );
        assert_eq!(
            parse("connect_timeout=1").connect_timeout,
            Duration::from_secs(2)
        );
        assert_eq!(
            parse("connect_timeout=30").connect_timeout,
            Duration::from_secs(30)
        );
    }

    #[test]
    fn all_ssl_modes() {
        for (s, tls) in [
            ("disable", false),
            ("allow", false),
            ("prefer", false),
            ("require", true),
            ("verify-ca", true),
            ("verify-full", true),
        ] {
            let mode = parse(&format!("sslmode={s}")).sslmode;
            assert_eq!(mode.as_str(), s);
            assert_eq!(mode.requires_tls(), tls);
        }
    }

    #[test]
    fn tls_and_auth_keys() {
        let info = parse(
            "host=db sslmode=verify-ca sslrootcert=/r.crt sslcert=/c.crt sslkey=/c.key \
             sslnegotiation=postgres channel_binding=require require_auth=md5,scram-sha-256",
        );
        assert_eq!(info.sslrootcert, Some(RootCert::File("/r.crt".into())));
        assert_eq!(info.sslcert, Some(PathBuf::from("/c.crt")));
        assert_eq!(info.sslkey, Some(PathBuf::from("/c.key")));
        assert_eq!(info.channel_binding, ChannelBindingMode::Require);
        let auth = info.require_auth.clone().expect("require_auth");
        assert!(auth.allows(AuthMethod::Md5) && auth.names(AuthMethod::Md5));
        assert!(!auth.allows(AuthMethod::Password) && !auth.allows(AuthMethod::None));
        assert_eq!(
            info.server_files(),
            [
                Path::new("/r.crt"),
                Path::new("/c.crt"),
                Path::new("/c.key")
            ]
        );
        assert_eq!(parse(&info.to_conninfo_string()), info);
        // Client programs get what PostgreSQL 15's libpq knows.
        let program = info.for_client_program("d");
        assert!(program.contains("sslrootcert=/r.crt sslcert=/c.crt sslkey=/c.key"));
        assert!(program.contains("channel_binding=require"));
        assert!(!program.contains("require_auth"), "{program}");

        let negated = parse("require_auth=!password,!md5")
            .require_auth
            .expect("set");
        assert!(negated.negated && !negated.allows(AuthMethod::Md5));
        assert!(negated.allows(AuthMethod::ScramSha256) && negated.allows(AuthMethod::None));
        assert!(!negated.names(AuthMethod::ScramSha256));
        assert_eq!(negated.to_string(), "!password,!md5");

        // sslrootcert=system implies verify-full and refuses anything weaker, as libpq 16.
        let system = parse("host=db sslrootcert=system");
        assert_eq!(system.sslmode, SslMode::VerifyFull);
        assert_eq!(parse(&system.to_conninfo_string()), system);
        assert!(system.server_files().is_empty());
        assert!(matches!(
            parse_err("host=db sslrootcert=system sslmode=require"),
            ConnInfoError::ConflictingTlsOptions(m) if m.contains("weak sslmode \"require\"")
        ));
        // Direct TLS never falls back, as libpq 17.
        assert_eq!(
            parse("sslnegotiation=direct sslmode=require").sslnegotiation,
            SslNegotiation::Direct
        );
        assert!(matches!(
            parse_err("sslnegotiation=direct"),
            ConnInfoError::ConflictingTlsOptions(m) if m.contains("sslnegotiation=direct")
        ));
    }

    #[test]
    fn tls_and_auth_errors() {
        assert_eq!(
            parse_err("sslnegotiation=maybe"),
            ConnInfoError::InvalidSslNegotiation("maybe".into())
        );
        assert_eq!(
            parse_err("channel_binding=always"),
            ConnInfoError::InvalidChannelBinding("always".into())
        );
        for (s, what) in [
            ("require_auth=kerberos", "invalid value \"kerberos\""),
            (
                "require_auth=md5,!password",
                "cannot be mixed with non-negative",
            ),
            (
                "require_auth=!md5,password",
                "cannot be mixed with negative",
            ),
            ("require_auth=md5,md5", "more than once"),
            ("require_auth=md5,", "invalid value \"\""),
        ] {
            match parse_err(s) {
                ConnInfoError::InvalidRequireAuth(m) => assert!(m.contains(what), "{s}: {m}"),
                other => panic!("{s}: {other:?}"),
            }
        }
    }

    #[test]
    fn uri_form() {
        let info = parse("postgresql://al%40ice:p%3Ass%2F@db.example.com:6543/my%20db?sslmode=disable&application_name=x%26y");
        assert_eq!(info.user.as_deref(), Some("al@ice"));
        assert_eq!(info.password.as_deref(), Some("p:ss/"));
        assert_eq!(info.host.as_deref(), Some("db.example.com"));
        assert_eq!(info.port, 6543);
        assert_eq!(info.dbname.as_deref(), Some("my db"));
        assert_eq!(info.sslmode, SslMode::Disable);
        assert_eq!(info.application_name.as_deref(), Some("x&y"));

        let info = parse("postgres://bob@localhost");
        assert_eq!(info.user.as_deref(), Some("bob"));
        assert_eq!(info.password, None);
        assert_eq!(info.host.as_deref(), Some("localhost"));
        assert_eq!(info.effective_dbname(), Some("bob"));

        assert_eq!(parse("postgresql://"), ConnInfo::default());
        assert_eq!(parse("postgresql:///"), ConnInfo::default());
        // A password may contain '?' before the '@', as libpq allows.
        assert_eq!(
            parse("postgresql://u:a?b@h").password.as_deref(),
            Some("a?b")
        );
        assert_eq!(parse("postgresql://h?ssl=true").sslmode, SslMode::Require);
        assert_eq!(parse("postgresql://h:/d").port, 5432);
    }

    #[test]
    fn uri_ipv6_and_sockets() {
        let info = parse("postgresql://[::1]:5433/db");
        assert_eq!(info.host.as_deref(), Some("::1"));
        assert_eq!(info.port, 5433);
        assert_eq!(info.display_target(), "[::1]:5433");
        let info = parse("postgresql://[fe80::1%25eth0]/db");
        assert_eq!(info.host.as_deref(), Some("fe80::1%eth0"));

        let info = parse("postgresql://%2Ftmp%2Fpg:5999/db");
        assert_eq!(info.host.as_deref(), Some("/tmp/pg"));
        assert_eq!(
            info.socket_path(),
            Some(PathBuf::from("/tmp/pg/.s.PGSQL.5999"))
        );
        assert_eq!(info.display_target(), "/tmp/pg:5999");

        let info = parse("postgresql:///db?host=/run/pg&port=5444&user=me");
        assert_eq!(info.host.as_deref(), Some("/run/pg"));
        assert_eq!(info.port, 5444);
        assert_eq!(info.dbname.as_deref(), Some("db"));

        let info = parse("hostaddr=10.0.0.5 host=/tmp");
        assert_eq!(info.socket_path(), None, "hostaddr means TCP");
    }

    #[test]
    fn uri_errors() {
        assert_eq!(
            parse_err("postgresql://h1,h2/db"),
            ConnInfoError::MultipleHosts
        );
        assert_eq!(
            parse_err("postgresql://h1:5432,h2:5432/db"),
            ConnInfoError::MultipleHosts
        );
        assert_eq!(
            parse_err("postgresql://h/db?host=a,b"),
            ConnInfoError::MultipleHosts
        );
        assert!(matches!(
            parse_err("postgresql://[::1"),
            ConnInfoError::InvalidUri(_)
        ));
        assert!(matches!(
            parse_err("postgresql://[]/db"),
            ConnInfoError::InvalidUri(_)
        ));
        assert!(matches!(
            parse_err("postgresql://[::1]x/db"),
            ConnInfoError::InvalidUri(_)
        ));
        assert!(matches!(
            parse_err("postgresql://h/db?sslmode"),
            ConnInfoError::InvalidUri(_)
        ));
        assert!(matches!(
            parse_err("postgresql://h/db?a=b=c"),
            ConnInfoError::InvalidUri(_)
        ));
        assert_eq!(
            parse_err("postgresql://h/db?foo=1"),
            ConnInfoError::UnknownKey("foo".into())
        );
        assert_eq!(
            parse_err("postgresql://h:99999/db"),
            ConnInfoError::InvalidPort("99999".into())
        );
        assert_eq!(parse_err("postgresql://h/d%00b"), ConnInfoError::NullByte);
        assert_eq!(
            parse_err("postgresql://u:p%zz@h"),
            ConnInfoError::InvalidPercentEncoding("password")
        );
        assert_eq!(
            parse_err("postgresql://u:p%c3@h"),
            ConnInfoError::InvalidPercentEncoding("password")
        );
        assert_eq!(
            parse_err("postgresql://h/db%"),
            ConnInfoError::InvalidPercentEncoding("database name")
        );
    }

    #[test]
    fn password_never_leaks() {
        let secret = "Hunter2-Secret";
        for s in [
            format!("host=h user=u password={secret}"),
            format!("postgresql://u:{secret}@h/db"),
        ] {
            let info = parse(&s);
            assert_eq!(info.password.as_deref(), Some(secret));
            let masked = info.masked();
            assert!(!masked.contains(secret), "{masked}");
            assert!(masked.contains("password='********'"), "{masked}");
            let debug = format!("{info:?}");
            assert!(!debug.contains(secret), "{debug}");
            assert!(debug.contains("********"));
            assert!(!info.display_target().contains(secret));
        }
        // Errors never quote values that may be the password.
        let errors = [
            parse_err(&format!("password=my {secret}")),
            parse_err(&format!("postgresql://u:{secret}%zz@h")),
            parse_err(&format!("postgresql://u:{secret}@[::1")),
            parse_err(&format!("postgresql://u:{secret}@h/d?password")),
            parse_err(&format!("postgresql://u:{secret}@h/d?password={secret}=")),
        ];
        for e in errors {
            let text = e.to_string();
            assert!(!text.contains(secret), "{text}");
            assert!(!format!("{e:?}").contains(secret));
        }
        assert_eq!(
            parse_err(&format!("password=my {secret}")),
            ConnInfoError::MissingEqualsAfterPassword
        );
    }

    #[test]
    fn rendering_round_trips() {
        let cases = [
            "",
            "host=db port=6000 user=u password=p dbname=d",
            "host='/tmp/sock dir' user='o\\'brien' password='a b\\\\c' sslmode=disable connect_timeout=7",
            "postgresql://x:y%20z@[::1]:7000/db?application_name=a%20b&passfile=/p/f",
            "hostaddr=127.0.0.1 host=name user= password=''",
        ];
        for s in cases {
            let info = parse(s);
            let full = info.to_conninfo_string();
            assert_eq!(parse(&full), info, "{s} -> {full}");
            let masked = info.masked();
            let reparsed = parse(&masked);
            assert_eq!(
                reparsed.password.as_deref(),
                info.password.as_ref().map(|_| PASSWORD_MASK)
            );
        }
        let info = parse("host=h user=u password=pw dbname='my db'");
        assert_eq!(
            info.masked(),
            "host=h port=5432 user=u password='********' dbname='my db' sslmode=prefer"
        );
        assert_eq!(
            info.to_conninfo_string(),
            "host=h port=5432 user=u password=pw dbname='my db' sslmode=prefer"
        );
    }

    #[test]
    fn client_program_conninfo_has_no_secrets() {
        let secret = "Hunter2-Secret";
        let info = parse(&format!(
            "host=db.example.com hostaddr=10.0.0.5 port=6000 user='o\\'brien' \
             password={secret} passfile=/p/{secret} dbname=ignored sslmode=disable \
             connect_timeout=7 application_name='cloud mig'"
        ));
        let s = info.for_client_program("my db");
        assert!(!s.contains(secret) && !s.contains("pass"), "{s}");
        assert_eq!(
            s,
            "host=db.example.com hostaddr=10.0.0.5 port=6000 user='o\\'brien' \
             dbname='my db' sslmode=disable connect_timeout=7 application_name='cloud mig'"
        );
        let back = parse(&s);
        assert_eq!(back.password, None);
        assert_eq!(back.passfile, None);
        assert_eq!(back.dbname.as_deref(), Some("my db"));
        assert_eq!(
            back.with_dbname("ignored"),
            ConnInfo {
                password: None,
                passfile: None,
                ..info
            }
        );

        // The default socket directory is spelled out; the default timeout too.
        assert_eq!(
            parse("user=u password=x").for_client_program("postgres"),
            "host=/var/run/postgresql port=5432 user=u dbname=postgres sslmode=prefer \
             connect_timeout=10"
        );
        // A database name that looks like a connection string stays a name.
        let s = parse("host=h").for_client_program("postgresql://evil/x host=other");
        assert_eq!(
            parse(&s).dbname.as_deref(),
            Some("postgresql://evil/x host=other")
        );
        assert_eq!(parse(&s).host.as_deref(), Some("h"));
    }

    #[test]
    fn helpers() {
        let info = parse("user=alice");
        assert_eq!(info.effective_user(), Some("alice"));
        assert_eq!(info.effective_dbname(), Some("alice"));
        let other = info.with_dbname("sales");
        assert_eq!(other.effective_dbname(), Some("sales"));
        assert_eq!(other.user, info.user);
        assert_eq!(parse("").effective_dbname(), None);
        assert_eq!(parse("hostaddr=::1 port=5").display_target(), "[::1]:5");
    }

    #[test]
    fn never_panics_on_odd_input() {
        // A cheap stand-in for fuzzing: every prefix of some nasty strings.
        let nasty = [
            "postgresql://u:p@[::1]:5432/d?host=%2F&sslmode=require&x",
            "host='a\\' port=  '5' user = \\",
            "postgres://%%%@[[]]:/?&&==",
            "postgresql://é:ü@ß/€?application_name=ö",
        ];
        for s in nasty {
            for (i, _) in s.char_indices() {
                let _ = ConnInfo::parse(&s[..i]);
                let _ = ConnInfo::parse(&s[i..]);
            }
        }
    }
}
