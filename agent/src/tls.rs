//! The agent's side of mutual TLS: trust the site CA, present this agent's certificate.

use std::path::Path;
use std::sync::Arc;

use akosha_protocol::ALPN;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::config::DestinationConfig;

/// Why the TLS configuration of a destination cannot be built.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A PEM file is missing or unreadable.
    #[error("cannot read {what} from {path}: {reason}")]
    Read {
        /// What the file should hold.
        what: &'static str,
        /// The file.
        path: String,
        /// Why.
        reason: String,
    },
    /// The certificate does not name this agent's system id.
    #[error("certificate {path} is issued to `{found}`, but this agent's system_id is `{expected}`")]
    WrongIdentity {
        /// The file.
        path: String,
        /// The configured system id.
        expected: String,
        /// The common name in the certificate.
        found: String,
    },
    /// rustls or quinn rejected the configuration.
    #[error("invalid TLS configuration: {0}")]
    Config(String),
}

/// Builds the QUIC client configuration for a destination, checking that the certificate names `system_id`.
pub fn client_config(dest: &DestinationConfig, system_id: &str) -> Result<quinn::ClientConfig, TlsError> {
    let ca = read_certs(&dest.ca, "the CA certificate")?;
    let chain = read_certs(&dest.cert, "the agent certificate")?;
    let key = PrivateKeyDer::from_pem_file(&dest.key).map_err(|e| TlsError::Read {
        what: "the agent private key",
        path: dest.key.display().to_string(),
        reason: e.to_string(),
    })?;
    check_identity(&chain[0], &dest.cert, system_id)?;

    let mut roots = rustls::RootCertStore::empty();
    for cert in ca {
        roots.add(cert).map_err(|e| TlsError::Config(format!("CA certificate {}: {e}", dest.ca.display())))?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .map_err(|e| TlsError::Config(format!("agent certificate/key {}: {e}", dest.cert.display())))?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls).map_err(|e| TlsError::Config(e.to_string()))?;
    let mut config = quinn::ClientConfig::new(Arc::new(crypto));
    let mut transport = quinn::TransportConfig::default();
    transport.keep_alive_interval(Some(dest.keep_alive));
    transport.max_idle_timeout(Some(
        dest.idle_timeout.try_into().map_err(|_| TlsError::Config("idle_timeout too large".into()))?,
    ));
    // One bidirectional stream per session; the aggregator never opens streams towards agents.
    transport.max_concurrent_uni_streams(0u8.into());
    // Larger windows keep a high-latency link full with multi-megabyte batches in flight.
    transport.stream_receive_window((8u32 << 20).into());
    transport.send_window(32 << 20);
    config.transport_config(Arc::new(transport));
    Ok(config)
}

fn read_certs(path: &Path, what: &'static str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let read_err = |reason: String| TlsError::Read { what, path: path.display().to_string(), reason };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| read_err(e.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| read_err(e.to_string()))?;
    if certs.is_empty() {
        return Err(read_err("no certificate in the file".into()));
    }
    Ok(certs)
}

fn check_identity(cert: &CertificateDer<'_>, path: &Path, system_id: &str) -> Result<(), TlsError> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref())
        .map_err(|e| TlsError::Config(format!("agent certificate {}: {e}", path.display())))?;
    let found =
        parsed.subject().iter_common_name().next().and_then(|cn| cn.as_str().ok()).unwrap_or_default().to_owned();
    if found != system_id {
        return Err(TlsError::WrongIdentity {
            path: path.display().to_string(),
            expected: system_id.to_owned(),
            found,
        });
    }
    Ok(())
}
