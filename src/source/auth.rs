//! Which authentication requests the client answers: libpq 16's `require_auth` and
//! `channel_binding` checks (fe-auth.c, `check_expected_areq`), plus our own default that a
//! password never goes to a server we have not authenticated.
//!
//! The default rule (no `require_auth`, or a list of `!method`s): a cleartext or md5 password
//! request is answered only over a Unix socket or over TLS whose server certificate was
//! verified against `sslrootcert` (`verify-ca`, `verify-full`, or any TLS mode with a root
//! certificate given). Anywhere else whoever answers could be a man in the middle who
//! replaced the server's SCRAM request with one that hands it the password (cleartext) or a
//! salted hash it can attack offline or replay against the real server (md5). SCRAM needs no
//! such rule: its exchange never reveals the password and proves the server knows it.
//! Naming the method in a positive `require_auth` list (`require_auth=md5`) is the explicit
//! opt-in. libpq itself answers both by default; we are stricter on purpose.
//!
//! Everything here is a pure function of the conninfo, what the channel is, and how far the
//! exchange got, so it is tested without a server.

use crate::source::conninfo::{AuthMethod, ChannelBindingMode, ConnInfo};

/// What protects the connection while authenticating.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Channel {
    /// TLS is in use.
    pub tls: bool,
    /// The server's certificate chain was verified against trusted roots.
    pub server_verified: bool,
    /// The connection is a Unix socket (local, no network in between).
    pub unix_socket: bool,
}

/// An authentication request of the server, as far as the policy cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Request {
    /// `AuthenticationOk`: the server lets us in.
    Ok,
    /// A cleartext password.
    Cleartext,
    /// An md5-hashed password.
    Md5,
    /// Start, continue or finish a SASL exchange.
    Sasl,
}

/// How far the exchange got.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(super) struct Progress {
    /// We completed our side of an exchange: sent a password or verified SCRAM's final.
    pub finished: bool,
    /// The SCRAM exchange was bound to the TLS channel and verified.
    pub channel_bound: bool,
}

/// Decides whether to answer `request`; `Err` holds the reason for the refusal.
pub(super) fn check(
    info: &ConnInfo,
    channel: Channel,
    request: Request,
    progress: Progress,
) -> Result<(), String> {
    if let Some(required) = &info.require_auth {
        let allowed = match request {
            // libpq: without "none", the server must have made us authenticate.
            Request::Ok => required.allows(AuthMethod::None) || progress.finished,
            Request::Cleartext => required.allows(AuthMethod::Password),
            Request::Md5 => required.allows(AuthMethod::Md5),
            Request::Sasl => required.allows(AuthMethod::ScramSha256),
        };
        if !allowed {
            let reason = match request {
                Request::Ok => "server did not complete authentication",
                Request::Cleartext => "server requested a cleartext password",
                Request::Md5 => "server requested a hashed password",
                Request::Sasl => "server requested SASL authentication",
            };
            return Err(format!(
                "authentication method requirement \"{required}\" failed: {reason}"
            ));
        }
    }
    if info.channel_binding == ChannelBindingMode::Require {
        match request {
            Request::Sasl => {}
            Request::Ok if progress.channel_bound => {}
            Request::Ok => {
                return Err(
                    "channel binding required, but server authenticated client without \
                            channel binding"
                        .to_owned(),
                )
            }
            Request::Cleartext | Request::Md5 => {
                return Err("channel binding required but not supported by server's \
                            authentication request"
                    .to_owned())
            }
        }
    }
    let (method, what) = match request {
        Request::Cleartext => (AuthMethod::Password, "a cleartext password"),
        Request::Md5 => (AuthMethod::Md5, "an md5 password hash"),
        Request::Ok | Request::Sasl => return Ok(()),
    };
    let opted_in = info.require_auth.as_ref().is_some_and(|r| r.names(method));
    if channel.unix_socket || channel.server_verified || opted_in {
        return Ok(());
    }
    let over = if channel.tls {
        "over TLS without a verified server certificate"
    } else {
        "over a connection without TLS"
    };
    Err(format!(
        "the server asked for {what} {over}; refusing to send it to a server that is not \
         authenticated"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    const PLAIN: Channel = Channel {
        tls: false,
        server_verified: false,
        unix_socket: false,
    };
    const TLS_UNVERIFIED: Channel = Channel {
        tls: true,
        server_verified: false,
        unix_socket: false,
    };
    const TLS_VERIFIED: Channel = Channel {
        tls: true,
        server_verified: true,
        unix_socket: false,
    };
    const UNIX: Channel = Channel {
        tls: false,
        server_verified: false,
        unix_socket: true,
    };

    fn info(s: &str) -> ConnInfo {
        ConnInfo::parse(s).expect("parse")
    }

    fn ok(s: &str, channel: Channel, request: Request) -> bool {
        check(&info(s), channel, request, Progress::default()).is_ok()
    }

    #[test]
    fn default_policy_keeps_passwords_from_unauthenticated_servers() {
        for request in [Request::Cleartext, Request::Md5] {
            assert!(!ok("", PLAIN, request), "{request:?}");
            assert!(!ok("", TLS_UNVERIFIED, request), "{request:?}");
            assert!(ok("", TLS_VERIFIED, request), "{request:?}");
            assert!(ok("", UNIX, request), "{request:?}");
            // A negated list that leaves the method allowed is not an opt-in.
            assert!(!ok("require_auth=!scram-sha-256", PLAIN, request));
        }
        assert!(ok("", PLAIN, Request::Sasl));
        assert!(ok("", PLAIN, Request::Ok));
        let err =
            check(&info(""), PLAIN, Request::Cleartext, Progress::default()).expect_err("refused");
        assert!(err.contains("cleartext password over a connection without TLS"));
        let err = check(&info(""), TLS_UNVERIFIED, Request::Md5, Progress::default())
            .expect_err("refused");
        assert!(err.contains("md5 password hash over TLS without a verified"));
    }

    #[test]
    fn naming_the_method_opts_in() {
        assert!(ok("require_auth=password", PLAIN, Request::Cleartext));
        assert!(ok("require_auth=md5,scram-sha-256", PLAIN, Request::Md5));
        assert!(!ok("require_auth=md5", PLAIN, Request::Cleartext));
    }

    #[test]
    fn require_auth_as_libpq() {
        let err = check(
            &info("require_auth=scram-sha-256"),
            TLS_VERIFIED,
            Request::Md5,
            Progress::default(),
        )
        .expect_err("md5 refused");
        assert_eq!(
            err,
            "authentication method requirement \"scram-sha-256\" failed: server requested a \
             hashed password"
        );
        assert!(!ok("require_auth=!md5", TLS_VERIFIED, Request::Md5));
        assert!(ok("require_auth=!md5", TLS_VERIFIED, Request::Cleartext));
        // Without "none" the server must make us authenticate.
        assert!(!ok("require_auth=scram-sha-256", PLAIN, Request::Ok));
        let finished = Progress {
            finished: true,
            channel_bound: false,
        };
        assert!(check(
            &info("require_auth=scram-sha-256"),
            PLAIN,
            Request::Ok,
            finished
        )
        .is_ok());
        assert!(ok("require_auth=none", PLAIN, Request::Ok));
        assert!(ok("require_auth=!password", PLAIN, Request::Ok));
        assert!(!ok("require_auth=!none", PLAIN, Request::Ok));
        assert!(!ok("require_auth=none", PLAIN, Request::Sasl));
    }

    #[test]
    fn channel_binding_required() {
        let s = "channel_binding=require";
        assert!(ok(s, TLS_VERIFIED, Request::Sasl));
        assert!(!ok(s, TLS_VERIFIED, Request::Cleartext));
        assert!(!ok(s, TLS_VERIFIED, Request::Md5));
        assert!(!ok(s, TLS_VERIFIED, Request::Ok), "trust is not bound");
        let bound = Progress {
            finished: true,
            channel_bound: true,
        };
        assert!(check(&info(s), TLS_VERIFIED, Request::Ok, bound).is_ok());
    }
}
