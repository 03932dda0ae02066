//! A bare protocol client for tests that must send what a well-behaved agent never would: garbage, oversized
//! frames, wrong versions, records for another system.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use akosha_protocol::{ALPN, FrameDecoder, Hello, Message, PROTOCOL_VERSION, Welcome};
use anyhow::{Context, Result, bail};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// One QUIC connection with one open stream to the aggregator.
pub struct RawClient {
    _endpoint: quinn::Endpoint,
    /// The connection.
    pub connection: quinn::Connection,
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    decoder: FrameDecoder,
}

impl RawClient {
    /// Connects with the given client certificate and opens the stream.
    pub async fn connect(port: u16, ca: &Path, cert: &Path, key: &Path) -> Result<RawClient> {
        let mut roots = rustls::RootCertStore::empty();
        for c in CertificateDer::pem_file_iter(ca)? {
            roots.add(c?)?;
        }
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)?.collect::<Result<_, _>>()?;
        let key = PrivateKeyDer::from_pem_file(key)?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key)?;
        tls.alpn_protocols = vec![ALPN.to_vec()];
        let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls)?;
        let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse()?)?;
        endpoint.set_default_client_config(quinn::ClientConfig::new(Arc::new(crypto)));
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse()?;
        let connection = tokio::time::timeout(Duration::from_secs(10), endpoint.connect(addr, "localhost")?)
            .await
            .context("handshake timed out")??;
        let (send, recv) = connection.open_bi().await?;
        Ok(RawClient { _endpoint: endpoint, connection, send, recv, decoder: FrameDecoder::new(64 << 20) })
    }

    /// Writes raw bytes on the stream.
    pub async fn send_raw(&mut self, bytes: &[u8]) -> Result<()> {
        self.send.write_all(bytes).await?;
        Ok(())
    }

    /// Writes one message.
    pub async fn send(&mut self, message: &Message) -> Result<()> {
        self.send_raw(&message.encode()).await
    }

    /// The next message, or `None` when the stream or connection ended.
    pub async fn recv(&mut self, timeout: Duration) -> Result<Option<Message>> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Some(m) = self.decoder.next_message()? {
                return Ok(Some(m));
            }
            let mut buf = [0u8; 65536];
            match tokio::time::timeout_at(deadline, self.recv.read(&mut buf)).await {
                Err(_) => bail!("no message within {timeout:?}"),
                Ok(Ok(Some(n))) => self.decoder.push(&buf[..n]),
                Ok(Ok(None)) | Ok(Err(_)) => return Ok(None),
            }
        }
    }

    /// Sends a Hello and returns the Welcome.
    pub async fn hello(&mut self, system_id: &str) -> Result<Welcome> {
        self.send(&Message::Hello(Hello {
            min_version: 1,
            max_version: PROTOCOL_VERSION,
            agent_version: "raw-test-client".into(),
            system_id: system_id.into(),
            buffer_epoch: 1,
            resume_from: 1,
        }))
        .await?;
        match self.recv(Duration::from_secs(10)).await? {
            Some(Message::Welcome(w)) => Ok(w),
            other => bail!("expected Welcome, got {other:?}"),
        }
    }

    /// Waits for the connection to be closed by the peer.
    pub async fn closed(&self, timeout: Duration) -> Result<quinn::ConnectionError> {
        tokio::time::timeout(timeout, self.connection.closed()).await.context("connection still open")
    }
}
