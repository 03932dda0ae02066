//! Certificates: a site CA, the aggregator's server certificate, agent certificates naming their system id,
//! and the server side of mutual TLS.
//!
//! `certs init` writes `ca.pem`/`ca.key` and `server.pem`/`server.key`; `certs issue <system-id>` writes
//! `agents/<system-id>.pem`/`.key`, signed by the CA, with the system id as common name. The aggregator trusts
//! exactly that CA for client certificates and takes an agent's identity from its certificate, never from what
//! the agent says.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use akosha_protocol::ALPN;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, date_time_ymd,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// Certificate management and TLS setup errors.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    /// Reading or writing a file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A file exists and would be overwritten.
    #[error(
        "{0} already exists; pass --force to replace it (agents holding certificates from the old CA will be refused)"
    )]
    Exists(PathBuf),
    /// rcgen failed to build or sign a certificate.
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
    /// A PEM file does not hold what it should.
    #[error("{path}: {reason}")]
    Pem {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// The system id cannot be used as an identity.
    #[error("invalid system id `{0}`: use letters, digits, '.', '_' and '-'")]
    BadSystemId(String),
    /// rustls/quinn rejected the configuration.
    #[error("invalid TLS configuration: {0}")]
    Tls(String),
}

/// Paths of the files `certs init` writes.
#[derive(Debug, Clone)]
pub struct CertPaths {
    /// CA certificate.
    pub ca_cert: PathBuf,
    /// CA private key.
    pub ca_key: PathBuf,
    /// Server certificate.
    pub server_cert: PathBuf,
    /// Server private key.
    pub server_key: PathBuf,
}

impl CertPaths {
    /// The standard layout inside `dir`.
    pub fn in_dir(dir: &Path) -> Self {
        Self {
            ca_cert: dir.join("ca.pem"),
            ca_key: dir.join("ca.key"),
            server_cert: dir.join("server.pem"),
            server_key: dir.join("server.key"),
        }
    }
}

/// Creates a CA and a server certificate for `server_names` (DNS names or IP addresses).
pub fn init(paths: &CertPaths, server_names: &[String], force: bool) -> Result<(), CertError> {
    if !force {
        for path in [&paths.ca_cert, &paths.ca_key] {
            if path.exists() {
                return Err(CertError::Exists(path.clone()));
            }
        }
    }
    let year = current_year();
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params.distinguished_name = name("akosha site CA");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca_params.key_usages =
        vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    ca_params.not_before = date_time_ymd(year - 1, 1, 1);
    ca_params.not_after = date_time_ymd(year + 10, 1, 1);
    let ca_key = KeyPair::generate()?;
    let ca_cert = ca_params.self_signed(&ca_key)?;
    write(&paths.ca_cert, &ca_cert.pem(), false)?;
    write(&paths.ca_key, &ca_key.serialize_pem(), true)?;

    let issuer = Issuer::new(ca_params, ca_key);
    let mut server_params = CertificateParams::new(server_names.to_vec())?;
    server_params.distinguished_name = name(server_names.first().map_or("akosha-aggregator", String::as_str));
    server_params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    server_params.not_before = date_time_ymd(year - 1, 1, 1);
    server_params.not_after = date_time_ymd(year + 2, 1, 1);
    let server_key = KeyPair::generate()?;
    let server_cert = server_params.signed_by(&server_key, &issuer)?;
    write(&paths.server_cert, &server_cert.pem(), false)?;
    write(&paths.server_key, &server_key.serialize_pem(), true)?;
    Ok(())
}

/// Issues an agent certificate for `system_id` under `out_dir` (`<system-id>.pem` and `.key`).
pub fn issue(paths: &CertPaths, system_id: &str, out_dir: &Path) -> Result<(PathBuf, PathBuf), CertError> {
    let year = current_year();
    let (cert, key) = sign_client(paths, system_id, (year - 1, 1, 1), (year + 2, 1, 1))?;
    let cert_path = out_dir.join(format!("{system_id}.pem"));
    let key_path = out_dir.join(format!("{system_id}.key"));
    write(&cert_path, &cert.pem(), false)?;
    write(&key_path, &key.serialize_pem(), true)?;
    Ok((cert_path, key_path))
}

/// A client certificate for `system_id`, valid for a day and never written to disk: tools that run beside the
/// aggregator with access to the CA key (the cloud-upload import) use it to deliver records on a system's
/// behalf through the normal receive path.
pub fn issue_ephemeral(
    paths: &CertPaths,
    system_id: &str,
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), CertError> {
    let today = jiff::Timestamp::now().to_zoned(jiff::tz::TimeZone::UTC).date();
    let day = |offset: i64| {
        let d = today.checked_add(jiff::Span::new().days(offset)).unwrap_or(today);
        (i32::from(d.year()), d.month() as u8, d.day() as u8)
    };
    // Certificates carry dates at day granularity here: yesterday to the day after tomorrow.
    let (cert, key) = sign_client(paths, system_id, day(-1), day(2))?;
    let key = PrivateKeyDer::try_from(key.serialize_der()).map_err(|e| CertError::Tls(e.to_string()))?;
    Ok((vec![cert.der().clone()], key))
}

fn sign_client(
    paths: &CertPaths,
    system_id: &str,
    (from_year, from_month, from_day): (i32, u8, u8),
    (until_year, until_month, until_day): (i32, u8, u8),
) -> Result<(rcgen::Certificate, KeyPair), CertError> {
    if system_id.is_empty() || !system_id.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    {
        return Err(CertError::BadSystemId(system_id.to_owned()));
    }
    let ca_pem = read(&paths.ca_cert)?;
    let ca_key = KeyPair::from_pem(&read(&paths.ca_key)?)
        .map_err(|e| CertError::Pem { path: paths.ca_key.clone(), reason: e.to_string() })?;
    let issuer = Issuer::from_ca_cert_pem(&ca_pem, ca_key)
        .map_err(|e| CertError::Pem { path: paths.ca_cert.clone(), reason: e.to_string() })?;
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.distinguished_name = name(system_id);
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    params.not_before = date_time_ymd(from_year, from_month, from_day);
    params.not_after = date_time_ymd(until_year, until_month, until_day);
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, &issuer)?;
    Ok((cert, key))
}

/// The QUIC server configuration: TLS 1.3 only, ALPN `akosha/1`, client certificates required and verified
/// against the site CA.
pub fn server_config(
    ca_cert: &Path,
    server_cert: &Path,
    server_key: &Path,
    transport: quinn::TransportConfig,
) -> Result<quinn::ServerConfig, CertError> {
    let pem_err = |path: &Path, reason: String| CertError::Pem { path: path.to_owned(), reason };
    let mut roots = rustls::RootCertStore::empty();
    for cert in load_certs(ca_cert)? {
        roots.add(cert).map_err(|e| pem_err(ca_cert, e.to_string()))?;
    }
    let chain = load_certs(server_cert)?;
    let key = PrivateKeyDer::from_pem_file(server_key).map_err(|e| pem_err(server_key, e.to_string()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .map_err(|e| CertError::Tls(e.to_string()))?;
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| CertError::Tls(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .map_err(|e| CertError::Tls(format!("server certificate {}: {e}", server_cert.display())))?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls).map_err(|e| CertError::Tls(e.to_string()))?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    config.transport_config(Arc::new(transport));
    Ok(config)
}

/// The system id in a verified client certificate: its common name.
pub fn system_id_of(cert: &CertificateDer<'_>) -> Option<String> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    let cn = parsed.subject().iter_common_name().next()?.as_str().ok()?.to_owned();
    let valid = !cn.is_empty() && cn.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    valid.then_some(cn)
}

pub(crate) fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, CertError> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|iter| iter.collect::<Result<Vec<_>, _>>())
        .map_err(|e| CertError::Pem { path: path.to_owned(), reason: e.to_string() })?;
    if certs.is_empty() {
        return Err(CertError::Pem { path: path.to_owned(), reason: "no certificate in the file".into() });
    }
    Ok(certs)
}

fn name(common_name: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common_name);
    dn.push(DnType::OrganizationName, "akosha");
    dn
}

fn current_year() -> i32 {
    i32::from(jiff::Zoned::now().year())
}

fn read(path: &Path) -> Result<String, CertError> {
    std::fs::read_to_string(path).map_err(|source| CertError::Io { path: path.to_owned(), source })
}

fn write(path: &Path, contents: &str, private: bool) -> Result<(), CertError> {
    let io = |source| CertError::Io { path: path.to_owned(), source };
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(io)?;
    }
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(if private { 0o600 } else { 0o644 });
    }
    #[cfg(not(unix))]
    let _ = private;
    use std::io::Write;
    options.open(path).and_then(|mut f| f.write_all(contents.as_bytes())).map_err(io)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn init_issue_and_identity() {
        let dir = tempfile::tempdir().unwrap();
        let paths = CertPaths::in_dir(dir.path());
        init(&paths, &["localhost".into(), "127.0.0.1".into()], false).unwrap();
        assert!(matches!(init(&paths, &["localhost".into()], false), Err(CertError::Exists(_))));
        let (cert, key) = issue(&paths, "edge-host-1", &dir.path().join("agents")).unwrap();
        assert!(key.exists());
        let der = load_certs(&cert).unwrap().remove(0);
        assert_eq!(system_id_of(&der).as_deref(), Some("edge-host-1"));
        assert!(matches!(issue(&paths, "../evil", dir.path()), Err(CertError::BadSystemId(_))));
        server_config(&paths.ca_cert, &paths.server_cert, &paths.server_key, quinn::TransportConfig::default())
            .unwrap();
    }
}
