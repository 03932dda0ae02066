//! Delivering imported records to an aggregator exactly as an agent would: QUIC with mutual TLS (a short-lived
//! certificate for the upload's system, signed by the site CA), Hello/Welcome, credit-limited batches, durable
//! acks. Each upload is its own buffer epoch with records numbered from 1, so the aggregator's
//! `durable_through` for that epoch tells an interrupted import where to pick up.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use akosha_protocol::{
    ALPN, Batch, Codec, FrameDecoder, Hello, MIN_PROTOCOL_VERSION, Message, PROTOCOL_VERSION, Record, SendWindow,
    encode_record,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::certs::{self, CertPaths};

/// Why delivery failed.
#[derive(Debug, thiserror::Error)]
pub enum DeliveryError {
    /// TLS material could not be loaded or minted.
    #[error("TLS: {0}")]
    Tls(String),
    /// The aggregator could not be reached.
    #[error("cannot reach the aggregator at {addr}: {reason}")]
    Connect {
        /// Where.
        addr: SocketAddr,
        /// Why.
        reason: String,
    },
    /// The aggregator refused or broke the session.
    #[error("the aggregator {0}")]
    Refused(String),
    /// The connection failed mid-session.
    #[error("connection lost: {0}")]
    Lost(String),
}

/// Where and how to deliver.
#[derive(Debug, Clone)]
pub struct Destination {
    /// The aggregator's QUIC address.
    pub addr: SocketAddr,
    /// The name its server certificate carries.
    pub server_name: String,
    /// The site CA (certificate and key).
    pub certs: CertPaths,
}

/// Largest encoded batch the importer builds (the aggregator may announce a smaller limit).
const TARGET_BATCH_BYTES: usize = 1 << 20;
const TIMEOUT: Duration = Duration::from_secs(30);

/// Delivers `records` as system `system_id` in buffer epoch `epoch`; records the aggregator already holds
/// durably for that epoch are skipped. Calls `progress` with the number of records acknowledged so far.
/// Returns how many records were sent in this call.
pub async fn deliver(
    destination: &Destination,
    system_id: &str,
    epoch: u64,
    records: &[Record],
    mut progress: impl FnMut(u64),
) -> Result<u64, DeliveryError> {
    let client = client_config(destination, system_id)?;
    let any: std::net::IpAddr = if destination.addr.is_ipv6() {
        std::net::Ipv6Addr::UNSPECIFIED.into()
    } else {
        std::net::Ipv4Addr::UNSPECIFIED.into()
    };
    let bind = SocketAddr::new(any, 0);
    let mut endpoint = quinn::Endpoint::client(bind)
        .map_err(|e| DeliveryError::Connect { addr: destination.addr, reason: e.to_string() })?;
    endpoint.set_default_client_config(client);
    let connect_err = |reason: String| DeliveryError::Connect { addr: destination.addr, reason };
    let connecting =
        endpoint.connect(destination.addr, &destination.server_name).map_err(|e| connect_err(e.to_string()))?;
    let connection = tokio::time::timeout(TIMEOUT, connecting)
        .await
        .map_err(|_| connect_err("no handshake within 30 s".into()))?
        .map_err(|e| connect_err(e.to_string()))?;
    let (mut send, mut recv) = connection.open_bi().await.map_err(|e| DeliveryError::Lost(e.to_string()))?;
    let mut stream = Incoming { recv: &mut recv, decoder: FrameDecoder::new(16 << 20) };

    let hello = Hello {
        min_version: MIN_PROTOCOL_VERSION,
        max_version: PROTOCOL_VERSION,
        agent_version: format!("akosha-import/{}", env!("CARGO_PKG_VERSION")),
        system_id: system_id.to_owned(),
        buffer_epoch: epoch,
        resume_from: 1,
    };
    write(&mut send, &Message::Hello(hello)).await?;
    let welcome = match stream.next().await? {
        Message::Welcome(welcome) => welcome,
        Message::Error(e) => return Err(DeliveryError::Refused(format!("refused the session: {}", e.message))),
        other => return Err(DeliveryError::Refused(format!("answered Hello with {:?}", other.frame_type()))),
    };
    let already = welcome.durable_through.unwrap_or(0);
    let skip = usize::try_from(already).unwrap_or(usize::MAX).min(records.len());
    progress(skip as u64);
    let max_batch = (welcome.max_batch_bytes as usize).clamp(1, TARGET_BATCH_BYTES);
    let mut window: SendWindow<u64> = SendWindow::new(welcome.credit);
    let mut next = skip;
    let mut acked = skip as u64;
    let mut sent = 0u64;
    while next < records.len() || window.in_flight() > 0 {
        while next < records.len() && window.can_send() {
            let first = next;
            let mut payload = Vec::new();
            while next < records.len() && (next == first || payload.len() < max_batch / 2) {
                let before = payload.len();
                encode_record(&records[next], &mut payload);
                if payload.len() > max_batch && next > first {
                    payload.truncate(before);
                    break;
                }
                next += 1;
            }
            let count = (next - first) as u64;
            let codec = Codec::Zstd(3);
            let compressed = codec.compress(&payload);
            let seq = window.send(count).map_err(|e| DeliveryError::Refused(e.to_string()))?;
            let batch = Batch {
                seq,
                first_record: first as u64 + 1,
                last_record: next as u64,
                record_count: count as u32,
                codec,
                uncompressed_len: payload.len() as u32,
                payload: compressed,
            };
            write(&mut send, &Message::Batch(batch)).await?;
            sent += count;
        }
        match stream.next().await? {
            Message::Ack { through } => {
                let done = window.ack(through).map_err(|e| DeliveryError::Refused(e.to_string()))?;
                acked += done.iter().sum::<u64>();
                progress(acked);
            }
            Message::Credit { batches } => window.grant(batches),
            Message::Heartbeat { nonce } => write(&mut send, &Message::HeartbeatAck { nonce }).await?,
            Message::HeartbeatAck { .. } => {}
            Message::Error(e) => {
                let batch = e.batch_seq.map(|s| format!(" batch {s}:")).unwrap_or_default();
                return Err(DeliveryError::Refused(format!("rejected{batch} {} ({})", e.message, e.code.as_str())));
            }
            other => return Err(DeliveryError::Refused(format!("sent an unexpected {:?}", other.frame_type()))),
        }
    }
    let _ = write(&mut send, &Message::Goodbye { reason: "import complete".into() }).await;
    let _ = send.finish();
    // Wait briefly for the aggregator to close the stream so the Goodbye is delivered before the endpoint goes.
    let _ = tokio::time::timeout(Duration::from_secs(2), stream.drain()).await;
    connection.close(0u32.into(), b"done");
    endpoint.wait_idle().await;
    Ok(sent)
}

struct Incoming<'a> {
    recv: &'a mut quinn::RecvStream,
    decoder: FrameDecoder,
}

impl Incoming<'_> {
    async fn next(&mut self) -> Result<Message, DeliveryError> {
        let deadline = tokio::time::Instant::now() + TIMEOUT;
        loop {
            match self.decoder.next_message() {
                Ok(Some(message)) => return Ok(message),
                Ok(None) => {}
                Err(e) => return Err(DeliveryError::Lost(format!("bad frame from the aggregator: {e}"))),
            }
            let mut buf = [0u8; 16384];
            match tokio::time::timeout_at(deadline, self.recv.read(&mut buf)).await {
                Err(_) => return Err(DeliveryError::Lost("no answer within 30 s".into())),
                Ok(Ok(Some(n))) => self.decoder.push(&buf[..n]),
                Ok(Ok(None)) => return Err(DeliveryError::Lost("the aggregator closed the session".into())),
                Ok(Err(e)) => return Err(DeliveryError::Lost(e.to_string())),
            }
        }
    }

    async fn drain(&mut self) {
        let mut buf = [0u8; 4096];
        while let Ok(Some(_)) = self.recv.read(&mut buf).await {}
    }
}

async fn write(send: &mut quinn::SendStream, message: &Message) -> Result<(), DeliveryError> {
    send.write_all(&message.encode()).await.map_err(|e| DeliveryError::Lost(e.to_string()))
}

fn client_config(destination: &Destination, system_id: &str) -> Result<quinn::ClientConfig, DeliveryError> {
    let tls_err = |e: &dyn std::fmt::Display| DeliveryError::Tls(e.to_string());
    let (chain, key): (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) =
        certs::issue_ephemeral(&destination.certs, system_id).map_err(|e| tls_err(&e))?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in certs::load_certs(&destination.certs.ca_cert).map_err(|e| tls_err(&e))? {
        roots.add(cert).map_err(|e| tls_err(&e))?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| tls_err(&e))?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .map_err(|e| tls_err(&e))?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls).map_err(|e| tls_err(&e))?;
    let mut config = quinn::ClientConfig::new(Arc::new(crypto));
    let mut transport = quinn::TransportConfig::default();
    transport.keep_alive_interval(Some(Duration::from_secs(5)));
    config.transport_config(Arc::new(transport));
    Ok(config)
}
