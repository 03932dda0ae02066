//! Identity and hostile input: foreign certificates, records for another system, garbage frames.

use std::time::Duration;

use akosha_e2e::raw_client::RawClient;
use akosha_e2e::{Agent, AgentOptions, Aggregator, Site, ndjson};
use akosha_protocol::{
    Batch, Codec, ErrorCode, FRAME_MAGIC, Message, PROTOCOL_VERSION, Record, RecordKind, encode_frame, encode_records,
};

fn batch_for(system_id: &str, seq: u64) -> Message {
    let records: Vec<Record> = (0..3)
        .map(|i| Record {
            system_id: system_id.into(),
            kind: RecordKind::Reflection,
            id: format!("x{i}"),
            ts: 1,
            ..Record::default()
        })
        .collect();
    let raw = encode_records(&records);
    Message::Batch(Batch {
        seq,
        first_record: seq * 10,
        last_record: seq * 10 + 2,
        record_count: 3,
        codec: Codec::None,
        uncompressed_len: raw.len() as u32,
        payload: raw,
    })
}

async fn raw(site: &Site, aggregator: &Aggregator, system_id: &str) -> anyhow::Result<RawClient> {
    site.issue(system_id)?;
    let certs = &site.certs;
    RawClient::connect(
        aggregator.quic_port,
        &certs.join("ca.pem"),
        &certs.join(format!("agents/{system_id}.pem")),
        &certs.join(format!("agents/{system_id}.key")),
    )
    .await
}

async fn expect_error(client: &mut RawClient, code: ErrorCode) -> anyhow::Result<()> {
    match client.recv(Duration::from_secs(10)).await? {
        Some(Message::Error(e)) => {
            assert_eq!(e.code, code, "{}", e.message);
            Ok(())
        }
        other => anyhow::bail!("expected {code:?}, got {other:?}"),
    }
}

/// A normal agent still gets its records through.
async fn still_serving(site: &Site, aggregator: &Aggregator, before: u64) -> anyhow::Result<()> {
    let agent =
        Agent::start(site, &format!("agent-{before}"), "healthy-host", aggregator.quic_port, &AgentOptions::default())
            .await?;
    let (status, _, _) = agent.post(ndjson(before..before + 10, "entity")).await?;
    assert_eq!(status, 200);
    aggregator.wait_total(before + 10, Duration::from_secs(30)).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificate_from_another_ca_is_refused() -> anyhow::Result<()> {
    let site = Site::new()?;
    let aggregator = Aggregator::start(&site, "aggregator").await?;
    let rogue = Site::new()?;
    rogue.issue("host-1")?;
    let certs = &rogue.certs;
    // The rogue client trusts the real CA (it knows the server) but presents a certificate from its own CA.
    let result = async {
        let mut client = RawClient::connect(
            aggregator.quic_port,
            &site.certs.join("ca.pem"),
            &certs.join("agents/host-1.pem"),
            &certs.join("agents/host-1.key"),
        )
        .await?;
        client.hello("host-1").await
    }
    .await;
    assert!(result.is_err(), "a foreign client certificate must not get a session");
    let metrics = aggregator.metrics().await?;
    assert!(
        metrics.lines().any(|l| l.starts_with("akosha_receiver_tls_failures_total ") && !l.ends_with(" 0")),
        "{metrics}"
    );
    still_serving(&site, &aggregator, 0).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_claiming_another_system_are_rejected_and_not_stored() -> anyhow::Result<()> {
    let site = Site::new()?;
    let aggregator = Aggregator::start(&site, "aggregator").await?;
    let mut client = raw(&site, &aggregator, "host-1").await?;
    let welcome = client.hello("host-1").await?;
    assert_eq!(welcome.system_id, "host-1");
    client.send(&batch_for("host-2", 1)).await?;
    match client.recv(Duration::from_secs(10)).await? {
        Some(Message::Error(e)) => {
            assert_eq!(e.code, ErrorCode::SystemMismatch);
            assert_eq!(e.batch_seq, Some(1));
            assert!(e.message.contains("host-2"), "{}", e.message);
        }
        other => panic!("expected a SystemMismatch error, got {other:?}"),
    }
    // The session continues; the rejected batch completes (ack) and a valid one is stored.
    loop {
        match client.recv(Duration::from_secs(10)).await? {
            Some(Message::Ack { through: 1 }) => break,
            Some(Message::Credit { .. }) => {}
            other => panic!("expected Ack 1, got {other:?}"),
        }
    }
    client.send(&batch_for("host-1", 2)).await?;
    aggregator.wait_total(3, Duration::from_secs(30)).await?;
    let stats = aggregator.stats().await?;
    assert!(stats["systems"].get("host-2").is_none(), "{stats}");
    assert_eq!(stats["systems"]["host-1"]["reflection"], 3);

    // A Hello that claims another identity than the certificate is refused outright.
    let mut liar = raw(&site, &aggregator, "host-3").await?;
    liar.send(&Message::Hello(akosha_protocol::Hello {
        min_version: 1,
        max_version: PROTOCOL_VERSION,
        agent_version: "t".into(),
        system_id: "host-1".into(),
        buffer_epoch: 1,
        resume_from: 1,
    }))
    .await?;
    expect_error(&mut liar, ErrorCode::SystemMismatch).await?;
    let metrics = aggregator.metrics().await?;
    assert!(metrics.contains("akosha_ingest_rejected_batches_total{reason=\"system_mismatch\"} 1"), "{metrics}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_oversized_and_wrong_version_frames_close_with_typed_errors() -> anyhow::Result<()> {
    let site = Site::new()?;
    let aggregator = Aggregator::start(&site, "aggregator").await?;

    // Garbage where a Hello should be.
    let mut client = raw(&site, &aggregator, "host-1").await?;
    client.send_raw(b"GET / HTTP/1.1\r\nHost: example\r\n\r\n").await?;
    expect_error(&mut client, ErrorCode::MalformedFrame).await?;
    client.closed(Duration::from_secs(5)).await?;

    // Garbage after a good handshake.
    let mut client = raw(&site, &aggregator, "host-1").await?;
    client.hello("host-1").await?;
    // A complete Batch frame whose checksum does not match its bytes.
    client.send_raw(&[0x41, 0x4b, 1, 3, 3, 0, 0, 0, 1, 2, 3, 4, 9, 9, 9]).await?;
    let mut saw = None;
    while let Some(m) = client.recv(Duration::from_secs(10)).await? {
        if let Message::Error(e) = m {
            saw = Some(e.code);
            break;
        }
    }
    assert_eq!(saw, Some(ErrorCode::MalformedFrame));

    // A full-sized Batch frame (read as head and payload) with one payload byte flipped in flight.
    let mut client = raw(&site, &aggregator, "host-1").await?;
    client.hello("host-1").await?;
    let mut frame = Message::Batch(akosha_protocol::Batch {
        seq: 1,
        first_record: 1,
        last_record: 1,
        record_count: 1,
        codec: akosha_protocol::Codec::None,
        uncompressed_len: 100,
        payload: vec![7; 100],
    })
    .encode();
    *frame.last_mut().expect("a frame has bytes") ^= 1;
    client.send_raw(&frame).await?;
    let mut saw = None;
    while let Some(m) = client.recv(Duration::from_secs(10)).await? {
        if let Message::Error(e) = m {
            saw = Some((e.code, e.message));
            break;
        }
    }
    let (code, message) = saw.expect("an error frame");
    assert_eq!(code, ErrorCode::MalformedFrame, "{message}");
    assert!(message.contains("checksum"), "{message}");

    // A frame header announcing 1 GiB.
    let mut client = raw(&site, &aggregator, "host-1").await?;
    client.hello("host-1").await?;
    let mut header = Vec::from(FRAME_MAGIC);
    header.extend([PROTOCOL_VERSION, 3]);
    header.extend((1u32 << 30).to_le_bytes());
    header.extend([0u8; 4]);
    client.send_raw(&header).await?;
    let mut saw = None;
    while let Some(m) = client.recv(Duration::from_secs(10)).await? {
        if let Message::Error(e) = m {
            saw = Some(e.code);
            break;
        }
    }
    assert_eq!(saw, Some(ErrorCode::FrameTooLarge));

    // A Hello in a frame of protocol version 9.
    let mut client = raw(&site, &aggregator, "host-1").await?;
    let mut frame = encode_frame(akosha_protocol::FrameType::Heartbeat, 8, |out| out.extend([0u8; 8]));
    frame[2] = 9;
    client.send_raw(&frame).await?;
    expect_error(&mut client, ErrorCode::UnsupportedVersion).await?;

    // A Hello offering only versions this aggregator does not speak.
    let mut client = raw(&site, &aggregator, "host-1").await?;
    client
        .send(&Message::Hello(akosha_protocol::Hello {
            min_version: 7,
            max_version: 9,
            agent_version: "future".into(),
            system_id: "host-1".into(),
            buffer_epoch: 1,
            resume_from: 1,
        }))
        .await?;
    expect_error(&mut client, ErrorCode::UnsupportedVersion).await?;

    // A batch beyond the granted credit / out of order is a protocol violation.
    let mut client = raw(&site, &aggregator, "host-1").await?;
    client.hello("host-1").await?;
    client.send(&batch_for("host-1", 5)).await?;
    let mut saw = None;
    while let Some(m) = client.recv(Duration::from_secs(10)).await? {
        if let Message::Error(e) = m {
            saw = Some(e.code);
            break;
        }
    }
    assert_eq!(saw, Some(ErrorCode::ProtocolViolation));

    assert_eq!(aggregator.total().await?, 0, "nothing from hostile streams was stored");
    still_serving(&site, &aggregator, 0).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admission_control_tells_extra_agents_to_back_off() -> anyhow::Result<()> {
    let site = Site::new()?;
    let aggregator = Aggregator::start_with(&site, "aggregator", "max_sessions: 1").await?;
    let mut first = raw(&site, &aggregator, "host-1").await?;
    first.hello("host-1").await?;
    let mut second = raw(&site, &aggregator, "host-2").await?;
    second
        .send(&Message::Hello(akosha_protocol::Hello {
            min_version: 1,
            max_version: PROTOCOL_VERSION,
            agent_version: "t".into(),
            system_id: "host-2".into(),
            buffer_epoch: 1,
            resume_from: 1,
        }))
        .await?;
    match second.recv(Duration::from_secs(10)).await? {
        Some(Message::Error(e)) => {
            assert_eq!(e.code, ErrorCode::Overloaded);
            assert!(e.retry_after_ms.is_some_and(|ms| (1000..5000).contains(&ms)), "{e:?}");
        }
        other => panic!("expected Overloaded, got {other:?}"),
    }
    // The admitted session keeps working.
    first.send(&batch_for("host-1", 1)).await?;
    aggregator.wait_total(3, Duration::from_secs(30)).await?;
    Ok(())
}
