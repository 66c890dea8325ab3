//! TLS to PostgreSQL. `database.url` carries libpq's `sslmode` and `sslrootcert`; tokio-postgres
//! itself knows only `disable`/`prefer`/`require` and no CA file, so both are taken out of the
//! URL here ([`split_url`]) and a rustls connector ([`TlsSettings::connector`], ring provider,
//! the one reqwest already builds) checks what the mode asks for:
//!
//! | `sslmode`          | encrypted                     | chain checked               | host name checked |
//! |--------------------|-------------------------------|-----------------------------|-------------------|
//! | `disable`          | no                            | —                           | —                 |
//! | `prefer` (default) | when the server offers TLS    | only with `sslrootcert=FILE`| no                |
//! | `require`          | yes, or the connection fails  | only with `sslrootcert=FILE`| no                |
//! | `verify-ca`        | yes                           | yes                         | no                |
//! | `verify-full`      | yes                           | yes                         | yes               |
//!
//! Trust anchors: `sslrootcert=/path/ca.pem` (PEM, one or more CA certificates), else the
//! platform's store as rustls-native-certs reads it (`SSL_CERT_FILE` / `SSL_CERT_DIR`, else the
//! OS bundle, `/etc/ssl/certs` on Debian); `sslrootcert=system` names that store explicitly and,
//! as in libpq, implies `verify-full`. Where this differs from libpq: without `sslrootcert`
//! libpq reads `~/.postgresql/root.crt` (we use the platform store), and libpq's `prefer` also
//! falls back to plain text when a TLS handshake fails (tokio-postgres only when the server
//! declines TLS).
//!
//! [`explain_connect_error`] turns a failed connection into a message that says what to change.

use std::error::Error as _;
use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use percent_encoding::percent_decode_str;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use tokio_postgres::config::SslMode;
use tokio_postgres_rustls::MakeRustlsConnect;

/// libpq's `sslmode` values (`allow` aside, which tokio-postgres cannot do).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TlsMode {
    /// Plain text only.
    Disable,
    /// TLS when the server offers it, plain text when it declines; no verification without a
    /// CA file. libpq's and tokio-postgres's default.
    #[default]
    Prefer,
    /// TLS or no connection; the certificate is not verified unless a CA file is given.
    Require,
    /// TLS, and the server certificate must chain to a trusted CA (any host name).
    VerifyCa,
    /// TLS, a trusted chain, and a certificate naming the host of `database.url`.
    VerifyFull,
}

impl TlsMode {
    /// Every value, as written in the URL, for error messages.
    const NAMES: &'static str = "disable, prefer, require, verify-ca, verify-full";

    fn parse(value: &str) -> Option<Self> {
        Some(match value {
            "disable" => Self::Disable,
            "prefer" => Self::Prefer,
            "require" => Self::Require,
            "verify-ca" => Self::VerifyCa,
            "verify-full" => Self::VerifyFull,
            _ => return None,
        })
    }

    /// The value as written in the URL.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Disable => "disable",
            Self::Prefer => "prefer",
            Self::Require => "require",
            Self::VerifyCa => "verify-ca",
            Self::VerifyFull => "verify-full",
        }
    }

    /// What tokio-postgres must be told: whether to ask for TLS and whether it is optional.
    pub fn postgres(self) -> SslMode {
        match self {
            Self::Disable => SslMode::Disable,
            Self::Prefer => SslMode::Prefer,
            Self::Require | Self::VerifyCa | Self::VerifyFull => SslMode::Require,
        }
    }
}

/// Where the CAs that may sign the server's certificate come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RootCerts {
    /// A PEM file of CA certificates (`sslrootcert=/path`).
    File(PathBuf),
    /// The platform's trust store (`sslrootcert=system`, or no `sslrootcert` with `verify-*`).
    Platform,
}

/// The TLS part of `database.url`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TlsSettings {
    /// `sslmode`.
    pub mode: TlsMode,
    /// `sslrootcert`, when given.
    pub root_cert: Option<RootCerts>,
}

/// What the connector checks of the server's certificate.
enum Verification {
    /// Encrypted, not authenticated (libpq's `prefer`/`require` without a CA file).
    Nothing,
    /// The chain, not the host name.
    Chain(RootCerts),
    /// Chain and host name.
    Full(RootCerts),
}

impl TlsSettings {
    fn verification(&self) -> Verification {
        let roots = self.root_cert.clone().unwrap_or(RootCerts::Platform);
        match (self.mode, &self.root_cert) {
            (TlsMode::VerifyFull, _) => Verification::Full(roots),
            (TlsMode::VerifyCa, _) => Verification::Chain(roots),
            // libpq: with a CA file, prefer and require verify the chain like verify-ca.
            (TlsMode::Prefer | TlsMode::Require, Some(RootCerts::File(_))) => Verification::Chain(roots),
            _ => Verification::Nothing,
        }
    }

    /// The rustls connector for these settings; reads the CA file or the platform store. Errors
    /// name `sslrootcert` and what to put there.
    pub fn connector(&self) -> Result<MakeRustlsConnect> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let verifier: Arc<dyn ServerCertVerifier> = match self.verification() {
            Verification::Nothing => Arc::new(Unverified(provider.clone())),
            Verification::Chain(roots) => Arc::new(ChainOnly(webpki_verifier(&roots, &provider)?)),
            Verification::Full(roots) => webpki_verifier(&roots, &provider)?,
        };
        let config = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .context("the TLS provider supports no protocol version")?
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_no_client_auth();
        Ok(MakeRustlsConnect::new(config))
    }
}

impl fmt::Display for TlsSettings {
    /// How the connection is protected, for the start-up log line.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let roots = |r: &RootCerts| match r {
            RootCerts::File(path) => format!("CA file {}", path.display()),
            RootCerts::Platform => "the platform trust store".to_string(),
        };
        match (self.mode, self.verification()) {
            (TlsMode::Disable, _) => write!(f, "sslmode=disable (plain text)"),
            (mode, Verification::Nothing) => write!(f, "sslmode={} (certificate not verified)", mode.as_str()),
            (mode, Verification::Chain(r)) => {
                write!(f, "sslmode={} (chain checked against {})", mode.as_str(), roots(&r))
            }
            (mode, Verification::Full(r)) => write!(
                f,
                "sslmode={} (chain checked against {}, host name checked)",
                mode.as_str(),
                roots(&r)
            ),
        }
    }
}

/// Splits `url` into the URL tokio-postgres accepts (without `sslmode` and `sslrootcert`) and
/// the TLS settings they held. Other query parameters are passed on untouched. Errors say which
/// parameter is wrong and never repeat the URL (it may hold a password).
pub fn split_url(url: &str) -> Result<(String, TlsSettings)> {
    let Some((base, query)) = url.split_once('?') else {
        return Ok((url.to_string(), TlsSettings::default()));
    };
    let mut kept = Vec::new();
    let mut mode = None;
    let mut root_cert = None;
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (raw_key, raw_value) = pair.split_once('=').unwrap_or((pair, ""));
        let key = decode(raw_key, "a query parameter name")?;
        match key.as_str() {
            "sslmode" => {
                let value = decode(raw_value, "sslmode")?;
                mode = Some(
                    TlsMode::parse(&value)
                        .with_context(|| format!("database.url: sslmode={value} is not one of {}", TlsMode::NAMES))?,
                );
            }
            "sslrootcert" => {
                let value = decode(raw_value, "sslrootcert")?;
                root_cert = Some(match value.as_str() {
                    "" => bail!("database.url: sslrootcert is empty; give the path of a PEM CA file or `system`"),
                    "system" => RootCerts::Platform,
                    path => RootCerts::File(PathBuf::from(path)),
                });
            }
            "sslcert" | "sslkey" | "sslpassword" => bail!(
                "database.url: {key} (a TLS client certificate) is not supported; authenticate with a \
                 password (database.password)"
            ),
            _ => kept.push(pair),
        }
    }
    let mode = match (mode, &root_cert) {
        (None, Some(RootCerts::Platform)) => TlsMode::VerifyFull,
        (Some(weak), Some(RootCerts::Platform)) if weak != TlsMode::VerifyFull => bail!(
            "database.url: sslrootcert=system needs sslmode=verify-full (as in libpq), not sslmode={}",
            weak.as_str()
        ),
        (mode, _) => mode.unwrap_or_default(),
    };
    let rest = if kept.is_empty() {
        base.to_string()
    } else {
        format!("{base}?{}", kept.join("&"))
    };
    Ok((rest, TlsSettings { mode, root_cert }))
}

fn decode(raw: &str, what: &str) -> Result<String> {
    percent_decode_str(raw)
        .decode_utf8()
        .map(|s| s.into_owned())
        .map_err(|_| anyhow::anyhow!("database.url: {what} is not valid percent-encoded UTF-8"))
}

/// The CAs of `roots`, as a store rustls can verify against.
fn load_roots(roots: &RootCerts) -> Result<RootCertStore> {
    let mut store = RootCertStore::empty();
    match roots {
        RootCerts::File(path) => {
            let unreadable = |e: &dyn fmt::Display| {
                anyhow::anyhow!(
                    "database.url: sslrootcert={}: {e}; it must be a readable PEM file of the CA certificates \
                     that signed the server's certificate (in Kubernetes, mount it from a Secret or ConfigMap)",
                    path.display()
                )
            };
            let certs = CertificateDer::pem_file_iter(path)
                .map_err(|e| unreadable(&e))?
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| unreadable(&e))?;
            if certs.is_empty() {
                return Err(unreadable(&"no CERTIFICATE block in it"));
            }
            for cert in certs {
                store.add(cert).map_err(|e| unreadable(&e))?;
            }
        }
        RootCerts::Platform => {
            let found = rustls_native_certs::load_native_certs();
            let (added, _unparsable) = store.add_parsable_certificates(found.certs);
            if added == 0 {
                let errors: Vec<String> = found.errors.iter().map(ToString::to_string).collect();
                bail!(
                    "no trusted CA certificates found in the platform store{}; set sslrootcert=/path/to/ca.pem \
                     in database.url (or install ca-certificates, or set SSL_CERT_FILE)",
                    if errors.is_empty() {
                        String::new()
                    } else {
                        format!(" ({})", errors.join("; "))
                    }
                );
            }
        }
    }
    Ok(store)
}

fn webpki_verifier(roots: &RootCerts, provider: &Arc<CryptoProvider>) -> Result<Arc<WebPkiServerVerifier>> {
    WebPkiServerVerifier::builder_with_provider(Arc::new(load_roots(roots)?), provider.clone())
        .build()
        .context("building the certificate verifier")
}

/// `verify-ca`: the web PKI verifier, with a certificate for another name accepted. rustls
/// checks the name only after the chain, so a name error means the chain was trusted.
#[derive(Debug)]
struct ChainOnly(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
        {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// `prefer`/`require` without a CA file (libpq's meaning): any certificate is accepted, but the
/// handshake signatures are still checked, so the session is encrypted to whoever holds the key.
#[derive(Debug)]
struct Unverified(Arc<CryptoProvider>);

impl ServerCertVerifier for Unverified {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// A failed connection in words, and whether trying again later could help.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct ConnectFailure {
    /// What happened (the server's or rustls's own words) and, when we know, what to change.
    pub message: String,
    /// False for TLS mismatches and certificate errors, which waiting does not fix.
    pub retry_may_help: bool,
}

/// Describes why connecting failed: the server's error or the underlying cause, followed by
/// what to change when it is a TLS mismatch or a certificate problem.
pub fn explain_connect_error(e: &tokio_postgres::Error) -> ConnectFailure {
    let detail = match e.as_db_error() {
        Some(db) => format!("{}: {} (SQLSTATE {})", db.severity(), db.message(), db.code().code()),
        None => match e.source() {
            Some(source) => format!("{e}: {source}"),
            None => e.to_string(),
        },
    };
    match tls_hint(e) {
        Some(hint) => ConnectFailure {
            message: format!("{detail}; {hint}"),
            retry_may_help: false,
        },
        None => ConnectFailure {
            message: detail,
            retry_may_help: true,
        },
    }
}

/// What to change, when `e` is a TLS mismatch between `sslmode` and the server or a rejected
/// certificate.
fn tls_hint(e: &tokio_postgres::Error) -> Option<&'static str> {
    if let Some(db) = e.as_db_error() {
        // pg_hba.conf: "no pg_hba.conf entry for host ..., no encryption" or "... rejects
        // connection for host ..., no encryption" ("SSL off" before PostgreSQL 12): only
        // hostssl lines match this client.
        let plain_refused = ["no encryption", "SSL off"]
            .iter()
            .any(|end| db.message().ends_with(end));
        return (db.code().code() == "28000" && plain_refused).then_some(
            "the server accepts only TLS connections from here: set sslmode=verify-full (with \
             sslrootcert=/path/to/ca.pem) or sslmode=require in database.url",
        );
    }
    if let Some(rustls_error) = rustls_cause(e) {
        return Some(match rustls_error {
            rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer | CertificateError::BadSignature) => {
                "the server's certificate is not signed by a trusted CA: set sslrootcert=/path/to/ca.pem \
                 in database.url to the CA that signed it (managed services publish theirs, e.g. the RDS \
                 or Cloud SQL server CA); without sslrootcert the platform trust store is used"
            }
            rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            ) => {
                "the server's certificate does not name the host of database.url: connect with a host \
                 name the certificate lists, or use sslmode=verify-ca to check the CA only"
            }
            rustls::Error::InvalidCertificate(
                CertificateError::Expired
                | CertificateError::ExpiredContext { .. }
                | CertificateError::NotValidYet
                | CertificateError::NotValidYetContext { .. },
            ) => "the server's certificate is outside its validity period: renew it (or check the clock)",
            rustls::Error::InvalidCertificate(_) => {
                "the server's certificate was rejected: check it and sslrootcert in database.url"
            }
            _ => {
                "the TLS handshake failed: check that the server offers TLS 1.2 or 1.3, and sslmode in \
                 database.url"
            }
        });
    }
    let text = e.source().map(ToString::to_string).unwrap_or_default();
    if text.contains("server does not support TLS") {
        return Some(
            "the server does not accept TLS: enable ssl on the server, or set sslmode=disable (or \
             prefer) in database.url on a trusted network",
        );
    }
    None
}

/// The rustls error behind `e`, if any: tokio-rustls wraps it in an `io::Error`, whose own
/// `source()` skips it, so each `io::Error` in the chain is looked into.
fn rustls_cause(e: &tokio_postgres::Error) -> Option<&rustls::Error> {
    let mut next: Option<&(dyn std::error::Error + 'static)> = e.source();
    while let Some(err) = next {
        if let Some(found) = err.downcast_ref::<rustls::Error>() {
            return Some(found);
        }
        if let Some(found) = err
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
            .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        {
            return Some(found);
        }
        next = err.source();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sslmode_and_sslrootcert_leave_the_url_and_the_rest_stays() {
        let (rest, tls) = split_url(
            "postgres://u:p@db:5432/x?application_name=a&sslmode=verify-full&sslrootcert=%2Fetc%2Fdb%20ca.pem\
             &options=-c%20statement_timeout%3D5s",
        )
        .unwrap();
        assert_eq!(
            rest,
            "postgres://u:p@db:5432/x?application_name=a&options=-c%20statement_timeout%3D5s"
        );
        assert_eq!(
            tls,
            TlsSettings {
                mode: TlsMode::VerifyFull,
                root_cert: Some(RootCerts::File("/etc/db ca.pem".into())),
            }
        );
        let (rest, tls) = split_url("postgres://db/x?sslmode=require").unwrap();
        assert_eq!(rest, "postgres://db/x");
        assert_eq!((tls.mode, tls.root_cert), (TlsMode::Require, None));
        let (rest, tls) = split_url("postgres://db/x").unwrap();
        assert_eq!((rest.as_str(), tls), ("postgres://db/x", TlsSettings::default()));
        assert_eq!(TlsSettings::default().mode, TlsMode::Prefer);
    }

    #[test]
    fn modes_map_to_what_tokio_postgres_enforces() {
        for (name, asked) in [
            ("disable", SslMode::Disable),
            ("prefer", SslMode::Prefer),
            ("require", SslMode::Require),
            ("verify-ca", SslMode::Require),
            ("verify-full", SslMode::Require),
        ] {
            let mode = TlsMode::parse(name).unwrap();
            assert_eq!(mode.as_str(), name);
            assert_eq!(mode.postgres(), asked, "{name}");
        }
    }

    #[test]
    fn sslrootcert_system_means_verify_full_as_in_libpq() {
        let (_, tls) = split_url("postgres://db/x?sslrootcert=system").unwrap();
        assert_eq!(
            (tls.mode, tls.root_cert),
            (TlsMode::VerifyFull, Some(RootCerts::Platform))
        );
        let err = split_url("postgres://db/x?sslrootcert=system&sslmode=require")
            .unwrap_err()
            .to_string();
        assert!(err.contains("verify-full"), "{err}");
    }

    #[test]
    fn bad_tls_parameters_say_what_to_write_and_hide_the_url() {
        for (url, needle) in [
            ("postgres://u:hunter2@db/x?sslmode=allow", "verify-full"),
            ("postgres://u:hunter2@db/x?sslmode=VERIFY", "sslmode=VERIFY"),
            ("postgres://u:hunter2@db/x?sslrootcert=", "sslrootcert is empty"),
            ("postgres://u:hunter2@db/x?sslcert=/c.pem", "not supported"),
            ("postgres://u:hunter2@db/x?sslmode=%FF", "percent-encoded"),
        ] {
            let err = split_url(url).unwrap_err().to_string();
            assert!(err.contains(needle), "{url}: {err}");
            assert!(!err.contains("hunter2"), "{url}: {err}");
        }
    }

    #[test]
    fn what_is_verified_follows_libpq() {
        let file = Some(RootCerts::File("/ca.pem".into()));
        let case = |mode, root_cert: Option<RootCerts>| TlsSettings { mode, root_cert }.to_string();
        assert!(case(TlsMode::Require, None).contains("not verified"));
        assert!(case(TlsMode::Prefer, None).contains("not verified"));
        assert!(case(TlsMode::Require, file.clone()).contains("chain checked against CA file /ca.pem"));
        let ca = case(TlsMode::VerifyCa, None);
        assert!(ca.contains("platform trust store") && !ca.contains("host name"), "{ca}");
        assert!(case(TlsMode::VerifyFull, file).contains("host name checked"));
        assert!(case(TlsMode::Disable, None).contains("plain text"));
    }

    #[test]
    fn an_unreadable_or_empty_ca_file_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "not a certificate\n").unwrap();
        for (path, needle) in [
            (dir.path().join("missing.pem"), "missing.pem"),
            (empty, "no CERTIFICATE block"),
        ] {
            let settings = TlsSettings {
                mode: TlsMode::VerifyFull,
                root_cert: Some(RootCerts::File(path)),
            };
            let err = format!("{:#}", settings.connector().err().unwrap());
            assert!(err.contains(needle) && err.contains("sslrootcert"), "{err}");
        }
        // Modes that verify nothing do not read a store at all.
        TlsSettings::default().connector().unwrap();
    }
}
