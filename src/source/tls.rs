//! TLS to the source: the client configuration a conninfo asks for (roots, certificate checks,
//! client certificate), and the certificate hash SCRAM channel binding needs.
//!
//! Certificate checks follow libpq's `sslmode` (fe-secure-openssl.c):
//! - `verify-full`: the chain must lead to a root of `sslrootcert` and the certificate must
//!   name the `host` (subjectAltName DNS name or IP address; unlike libpq, the subject's CN is
//!   not consulted, as browsers and rustls do);
//! - `verify-ca`, and any other TLS mode when `sslrootcert` is given (libpq: "if a root
//!   certificate file exists, behaves like verify-ca"): the chain only;
//! - otherwise (`prefer`, `allow`, `require` without `sslrootcert`): no chain check. The
//!   handshake signatures are still checked, so the session is bound to the certificate shown,
//!   but anyone can show one: such a connection is encrypted, not authenticated.
//!
//! Unlike libpq we never read `~/.postgresql/`: the client runs inside the destination server,
//! whose home directory is not the user's, so every file must be named in the conninfo.
//!
//! Errors never quote file contents, only paths, and never a password.

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
};

use crate::source::conninfo::{ConnInfo, RootCert, SslMode};

/// The ALPN protocol name PostgreSQL 17 servers expect (and require for direct TLS).
pub(super) const ALPN_POSTGRESQL: &[u8] = b"postgresql";

/// A conninfo's TLS settings that cannot work, found before any connection.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct TlsConfigError(pub String);

/// A client configuration and what it promises about the server.
#[derive(Clone)]
pub(super) struct TlsSetup {
    /// The rustls configuration for one connection.
    pub config: Arc<ClientConfig>,
    /// The name the server certificate is checked against (or a placeholder when the name is
    /// not checked); also sent as SNI when it is a DNS name.
    pub server_name: ServerName<'static>,
    /// True when the certificate chain is verified against trusted roots.
    pub verifies_chain: bool,
}

/// Builds the TLS configuration for `info`, reading the roots, certificate and key it names.
pub(super) fn setup(info: &ConnInfo) -> Result<TlsSetup, TlsConfigError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let roots = match &info.sslrootcert {
        None => None,
        Some(RootCert::File(path)) => Some(load_roots(path)?),
        Some(RootCert::System) => Some(system_roots()?),
    };
    let check_name = info.sslmode == SslMode::VerifyFull;
    if roots.is_none() && matches!(info.sslmode, SslMode::VerifyCa | SslMode::VerifyFull) {
        // libpq names its default file here; we have none (see the module doc).
        return Err(TlsConfigError(format!(
            "sslmode={} needs a root certificate: set sslrootcert to a file of trusted CA \
             certificates, or sslrootcert=system to use the system's trusted roots",
            info.sslmode
        )));
    }
    let verifies_chain = roots.is_some();
    let inner = match roots {
        Some(roots) => Some(
            WebPkiServerVerifier::builder_with_provider(Arc::new(roots), Arc::clone(&provider))
                .build()
                .map_err(|e| TlsConfigError(format!("could not use the root certificates: {e}")))?,
        ),
        None => None,
    };
    let verifier = Arc::new(Verifier {
        inner,
        check_name,
        provider: Arc::clone(&provider),
    });
    let builder = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsConfigError(format!("could not set up TLS: {e}")))?
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    let mut config = match (&info.sslcert, &info.sslkey) {
        (Some(cert), Some(key)) => {
            let chain = load_certs(cert, "client certificate")?;
            let key = load_key(key)?;
            builder.with_client_auth_cert(chain, key).map_err(|e| {
                TlsConfigError(format!(
                    "client certificate \"{}\" and private key do not go together: {e}",
                    cert.display()
                ))
            })?
        }
        (Some(cert), None) => {
            return Err(TlsConfigError(format!(
            "sslcert \"{}\" needs sslkey (the default ~/.postgresql/postgresql.key is not read)",
            cert.display()
        )))
        }
        (None, Some(_)) => {
            return Err(TlsConfigError(
                "sslkey needs sslcert (the client certificate it belongs to)".to_owned(),
            ))
        }
        (None, None) => builder.with_no_client_auth(),
    };
    // As libpq 17 does in both negotiation modes; older servers ignore it.
    config.alpn_protocols = vec![ALPN_POSTGRESQL.to_vec()];
    Ok(TlsSetup {
        config: Arc::new(config),
        server_name: server_name(info, check_name)?,
        verifies_chain,
    })
}

/// The name to check: `host` (never `hostaddr`, as libpq). When the name is not checked, any
/// valid name does; the host's own when it parses, so a DNS name still goes out as SNI.
fn server_name(info: &ConnInfo, check_name: bool) -> Result<ServerName<'static>, TlsConfigError> {
    let host = info.host.as_deref().filter(|h| !h.starts_with('/'));
    match host.map(|h| ServerName::try_from(h.to_owned())) {
        Some(Ok(name)) => Ok(name),
        Some(Err(_)) if check_name => Err(TlsConfigError(format!(
            "host name \"{}\" cannot be checked against a certificate",
            host.unwrap_or_default()
        ))),
        None if check_name => Err(TlsConfigError(
            "host name must be specified for a verified SSL connection (sslmode=verify-full)"
                .to_owned(),
        )),
        _ => Ok(ServerName::try_from("postgresql.invalid")
            .map_err(|e| TlsConfigError(format!("placeholder server name rejected: {e}")))?),
    }
}

fn read_file(path: &Path, what: &str) -> Result<Vec<u8>, TlsConfigError> {
    fs::read(path).map_err(|e| {
        TlsConfigError(format!(
            "could not read {what} file \"{}\": {e}",
            path.display()
        ))
    })
}

fn load_certs(path: &Path, what: &str) -> Result<Vec<CertificateDer<'static>>, TlsConfigError> {
    let pem = read_file(path, what)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| {
            TlsConfigError(format!(
                "could not parse {what} file \"{}\": {e}",
                path.display()
            ))
        })?;
    if certs.is_empty() {
        return Err(TlsConfigError(format!(
            "{what} file \"{}\" holds no PEM certificate",
            path.display()
        )));
    }
    Ok(certs)
}

fn load_roots(path: &Path) -> Result<RootCertStore, TlsConfigError> {
    let mut store = RootCertStore::empty();
    for cert in load_certs(path, "root certificate")? {
        store.add(cert).map_err(|e| {
            TlsConfigError(format!(
                "could not use root certificate file \"{}\": {e}",
                path.display()
            ))
        })?;
    }
    Ok(store)
}

fn system_roots() -> Result<RootCertStore, TlsConfigError> {
    let found = rustls_native_certs::load_native_certs();
    let mut store = RootCertStore::empty();
    let (added, _ignored) = store.add_parsable_certificates(found.certs);
    if added == 0 {
        return Err(TlsConfigError(format!(
            "sslrootcert=system: no trusted root certificates found on this server{}",
            found
                .errors
                .first()
                .map(|e| format!(" ({e})"))
                .unwrap_or_default()
        )));
    }
    Ok(store)
}

/// Loads the client's private key after libpq's permission check: a regular file, mode 0600
/// or less, or 0640 or less when owned by root (a system-wide key readable through a group).
fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsConfigError> {
    let meta = fs::metadata(path).map_err(|e| {
        TlsConfigError(format!(
            "could not access private key file \"{}\": {e}",
            path.display()
        ))
    })?;
    check_key_permissions(path, meta.is_file(), meta.uid(), meta.permissions().mode())?;
    let pem = read_file(path, "private key")?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|e| {
        TlsConfigError(format!(
            "could not load private key file \"{}\": {e} (it must be an unencrypted PEM key)",
            path.display()
        ))
    })
}

fn check_key_permissions(
    path: &Path,
    is_file: bool,
    uid: u32,
    mode: u32,
) -> Result<(), TlsConfigError> {
    if !is_file {
        return Err(TlsConfigError(format!(
            "private key file \"{}\" is not a regular file",
            path.display()
        )));
    }
    let forbidden = if uid == 0 { 0o037 } else { 0o077 };
    if mode & forbidden != 0 {
        return Err(TlsConfigError(format!(
            "private key file \"{}\" has group or world access; file must have permissions \
             u=rw (0600) or less if owned by the current user, or permissions u=rw,g=r (0640) \
             or less if owned by root",
            path.display()
        )));
    }
    Ok(())
}

/// Checks the server certificate as the sslmode says (see the module doc).
#[derive(Debug)]
struct Verifier {
    /// The chain check, when there are roots to check against.
    inner: Option<Arc<WebPkiServerVerifier>>,
    /// Whether the certificate must name the host.
    check_name: bool,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for Verifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let Some(inner) = &self.inner else {
            return Ok(ServerCertVerified::assertion());
        };
        match inner.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now) {
            // webpki checks the chain before the name, so a name error means the chain is good.
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) if !self.check_name => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// Describes a TLS failure for users, in libpq's words where it has some.
pub(super) fn describe(e: &rustls::Error) -> String {
    match e {
        rustls::Error::InvalidCertificate(c) => {
            let what = match c {
                CertificateError::NotValidForName
                | CertificateError::NotValidForNameContext { .. } => {
                    "server certificate does not match host name".to_owned()
                }
                CertificateError::Expired | CertificateError::ExpiredContext { .. } => {
                    "certificate has expired".to_owned()
                }
                CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
                    "certificate is not yet valid".to_owned()
                }
                CertificateError::UnknownIssuer => {
                    "unable to get local issuer certificate (the chain does not lead to a root in sslrootcert)"
                        .to_owned()
                }
                CertificateError::BadSignature => {
                    "certificate signature failure (was it signed by a CA in sslrootcert?)"
                        .to_owned()
                }
                CertificateError::Revoked => "certificate revoked".to_owned(),
                other => format!("{other:?}"),
            };
            format!("certificate verify failed: {what}")
        }
        rustls::Error::AlertReceived(alert) => format!("server sent TLS alert {alert:?}"),
        other => other.to_string(),
    }
}

/// The `tls-server-end-point` channel binding data (RFC 5929): the hash of the server's
/// certificate with the hash function of its signature, SHA-256 for MD5 and SHA-1, as
/// libpq's `pgtls_get_peer_certificate_hash` computes it.
pub(super) fn certificate_hash(cert: &[u8]) -> Result<Vec<u8>, String> {
    use ring::digest;
    let algorithm = match signature_hash(cert) {
        Some(SigHash::Sha256) => &digest::SHA256,
        Some(SigHash::Sha384) => &digest::SHA384,
        Some(SigHash::Sha512) => &digest::SHA512,
        None => {
            return Err(
                "could not determine the hash function of the server certificate's signature \
                 algorithm for channel binding"
                    .to_owned(),
            )
        }
    };
    Ok(digest::digest(algorithm, cert).as_ref().to_vec())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SigHash {
    Sha256,
    Sha384,
    Sha512,
}

/// The hash of an X.509 certificate's `signatureAlgorithm`, read from its DER: Certificate ::=
/// SEQUENCE { tbsCertificate, signatureAlgorithm SEQUENCE { algorithm OID, ... }, ... }.
fn signature_hash(cert: &[u8]) -> Option<SigHash> {
    let (tag, body, _) = der_item(cert)?;
    if tag != 0x30 {
        return None;
    }
    let (_, _, after_tbs) = der_item(body)?;
    let (tag, alg, _) = der_item(after_tbs)?;
    if tag != 0x30 {
        return None;
    }
    let (tag, oid, _) = der_item(alg)?;
    if tag != 0x06 {
        return None;
    }
    const RSA: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01];
    const ECDSA_SHA2: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03];
    const ECDSA_SHA1: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x01];
    const DSA_SHA1: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x38, 0x04, 0x03];
    const DSA_SHA2: &[u8] = &[0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x03];
    if let Some(n) = oid.strip_prefix(RSA) {
        return match n {
            // md5WithRSAEncryption and sha1WithRSAEncryption hash with SHA-256 (RFC 5929).
            [0x04] | [0x05] | [0x0b] => Some(SigHash::Sha256),
            [0x0c] => Some(SigHash::Sha384),
            [0x0d] => Some(SigHash::Sha512),
            _ => None,
        };
    }
    if oid == ECDSA_SHA1 || oid == DSA_SHA1 {
        return Some(SigHash::Sha256);
    }
    if let Some(n) = oid.strip_prefix(ECDSA_SHA2) {
        return match n {
            [0x02] => Some(SigHash::Sha256),
            [0x03] => Some(SigHash::Sha384),
            [0x04] => Some(SigHash::Sha512),
            _ => None,
        };
    }
    if oid.strip_prefix(DSA_SHA2) == Some(&[0x02]) {
        return Some(SigHash::Sha256);
    }
    None
}

/// One DER TLV: (tag, contents, rest). Definite lengths of up to 4 bytes only.
fn der_item(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&first, mut rest) = rest.split_first()?;
    let len = if first < 0x80 {
        usize::from(first)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 {
            return None;
        }
        let (bytes, after) = rest.split_at_checked(n)?;
        rest = after;
        bytes
            .iter()
            .fold(0usize, |acc, &b| (acc << 8) | usize::from(b))
    };
    let (body, after) = rest.split_at_checked(len)?;
    Some((tag, body, after))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    #[test]
    fn key_permissions_as_libpq() {
        let p = Path::new("/k");
        assert!(check_key_permissions(p, true, 1000, 0o100600).is_ok());
        assert!(check_key_permissions(p, true, 1000, 0o100400).is_ok());
        assert!(check_key_permissions(p, true, 1000, 0o100640).is_err());
        assert!(check_key_permissions(p, true, 1000, 0o100604).is_err());
        assert!(check_key_permissions(p, true, 0, 0o100640).is_ok());
        assert!(check_key_permissions(p, true, 0, 0o100660).is_err());
        assert!(check_key_permissions(p, true, 0, 0o100644).is_err());
        assert!(check_key_permissions(p, false, 1000, 0o040700).is_err());
    }

    #[test]
    fn der_walking_never_panics() {
        assert_eq!(signature_hash(&[]), None);
        assert_eq!(signature_hash(&[0x30, 0x84, 0xff, 0xff, 0xff, 0xff]), None);
        assert_eq!(signature_hash(&[0x30, 0x03, 0x30, 0x01]), None);
        let cert = rcgen::generate_simple_self_signed(vec!["localhost".into()])
            .expect("cert")
            .cert;
        let der = cert.der().to_vec();
        assert_eq!(signature_hash(&der), Some(SigHash::Sha256));
        for i in 0..der.len() {
            let _ = signature_hash(&der[..i]);
        }
        assert_eq!(certificate_hash(&der).map(|h| h.len()), Ok(32));
    }

    #[test]
    fn settings_that_cannot_work_are_refused_before_connecting() {
        let info = |s: &str| ConnInfo::parse(s).expect("parse");
        let err = |s: &str| setup(&info(s)).err().map(|e| e.0).unwrap_or_default();
        assert!(err("host=h sslmode=verify-ca").contains("needs a root certificate"));
        assert!(
            err("host=h sslmode=verify-full sslrootcert=/nonexistent/root.crt")
                .contains("could not read root certificate file \"/nonexistent/root.crt\"")
        );
        assert!(err("host=h sslcert=/x.crt").contains("needs sslkey"));
        assert!(err("host=h sslkey=/x.key").contains("needs sslcert"));
        assert!(
            err("hostaddr=127.0.0.1 sslmode=verify-full sslrootcert=system")
                .contains("host name must be specified")
        );
        let ok = setup(&info("host=h sslmode=require")).expect("setup");
        assert!(!ok.verifies_chain);
    }
}
