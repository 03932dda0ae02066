//! Session-Buddy cloud uploads in a real S3 server (SeaweedFS) imported with `akosha-aggregator import`:
//! the records arrive through the normal receive path, a broken upload is reported without stopping the
//! others, and a second run imports nothing twice.

use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use akosha_e2e::s3::S3Server;
use akosha_e2e::{Aggregator, Site, binary};
use object_store::path::Path as ObjectPath;

fn fixture() -> String {
    akosha_e2e::crate_path("../../shared/fixtures/session-buddy/cloud_upload_small").display().to_string()
}
const UPLOAD: &str = "20261122_094622_edge-host-1";

fn import(site: &Site, aggregator: &Aggregator, s3: &S3Server, url: &str) -> Output {
    Command::new(binary("akosha-aggregator"))
        .arg("--config")
        .arg(site.path("aggregator/aggregator.yaml"))
        .args(["import", url, "--aggregator", &format!("127.0.0.1:{}", aggregator.quic_port)])
        .envs(s3.client_env())
        .output()
        .expect("run import")
}

fn text(output: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uploads_in_s3_are_imported_once_and_a_broken_one_does_not_stop_the_rest() -> anyhow::Result<()> {
    let fixture = fixture();
    let site = Site::new()?;
    let aggregator = Aggregator::start(&site, "aggregator").await?;
    let s3 = S3Server::start(&site.path("s3"), &["sb-uploads"]).await?;
    let bucket = s3.bucket("sb-uploads")?;
    assert_eq!(s3.upload_dir("sb-uploads", "team-a", Path::new(&fixture)).await?, 3);

    // A second system whose database object is damaged, and an upload still being written (no manifest yet).
    let manifest = std::fs::read_to_string(format!("{fixture}/systems/edge-host-1/uploads/{UPLOAD}/manifest.json"))?;
    let broken = manifest.replace("edge-host-1", "broken-host");
    let broken_dir = "team-a/systems/broken-host/uploads/20261122_094622_broken-host";
    bucket.put(&ObjectPath::from(format!("{broken_dir}/manifest.json")), broken.into_bytes().into()).await?;
    for name in ["reflection.duckdb", "knowledge_graph.duckdb"] {
        bucket.put(&ObjectPath::from(format!("{broken_dir}/{name}")), b"not gzip at all".to_vec().into()).await?;
    }
    let pending = "team-a/systems/edge-host-1/uploads/20261123_000000_edge-host-1/reflection.duckdb";
    bucket.put(&ObjectPath::from(pending), b"partial".to_vec().into()).await?;

    let first = import(&site, &aggregator, &s3, "s3://sb-uploads/team-a");
    let out = text(&first);
    assert!(!first.status.success(), "a failed upload must fail the command:\n{out}");
    assert!(out.contains(&format!("imported edge-host-1/{UPLOAD}: 67 records")), "{out}");
    assert!(
        out.contains("FAILED team-a/systems/broken-host/uploads/20261122_094622_broken-host/manifest.json"),
        "{out}"
    );
    assert!(out.contains("is not valid gzip"), "{out}");
    assert!(
        out.contains(
            "3 uploads found: 1 imported now (67 records), 0 imported before, 1 still being written, 1 failed"
        ),
        "{out}"
    );

    aggregator.wait_total(67, Duration::from_secs(30)).await?;
    let stats = aggregator.stats().await?;
    let host = &stats["systems"]["edge-host-1"];
    assert_eq!((host["conversation"].as_u64(), host["reflection"].as_u64()), (Some(20), Some(8)), "{stats}");
    assert_eq!((host["entity"].as_u64(), host["relation"].as_u64()), (Some(19), Some(20)), "{stats}");
    assert!(stats["systems"].get("broken-host").is_none(), "{stats}");

    // The upload's records are the same rows as Session-Buddy's own push: an id from the push is found.
    let push = std::fs::read_to_string(format!("{fixture}/../http_push_20.jsonl"))?;
    let memory_id = push
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find_map(|r| r["body"]["params"]["arguments"]["memories"][0]["memory_id"].as_str().map(str::to_owned))
        .expect("a memory in the push");
    let record = aggregator.record("edge-host-1", "conversation", &memory_id).await?.expect("imported conversation");
    assert!(record["text"].as_str().is_some_and(|t| !t.is_empty()), "{record}");

    // Second run, broken upload removed: nothing new, nothing twice.
    for name in ["manifest.json", "reflection.duckdb", "knowledge_graph.duckdb"] {
        bucket.delete(&ObjectPath::from(format!("{broken_dir}/{name}"))).await?;
    }
    let second = import(&site, &aggregator, &s3, "s3://sb-uploads/team-a");
    let out = text(&second);
    assert!(second.status.success(), "{out}");
    // SeaweedFS keeps the emptied directory listed (S3 proper would not): it counts as an upload in progress.
    assert!(out.contains("0 imported now (0 records), 1 imported before"), "{out}");
    assert!(out.contains(" 0 failed"), "{out}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(aggregator.total().await?, 67);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_local_directory_imports_and_bad_arguments_are_named() -> anyhow::Result<()> {
    let fixture = fixture();
    let site = Site::new()?;
    let aggregator = Aggregator::start(&site, "aggregator").await?;
    let config = site.path("aggregator/aggregator.yaml");
    let run = |args: &[&str]| {
        Command::new(binary("akosha-aggregator")).arg("--config").arg(&config).args(args).output().expect("run")
    };
    let quic = format!("127.0.0.1:{}", aggregator.quic_port);
    let ok = run(&["import", &fixture, "--aggregator", &quic, "--timezone", "Europe/Berlin"]);
    assert!(ok.status.success(), "{}", text(&ok));
    aggregator.wait_total(67, Duration::from_secs(30)).await?;

    // A watch picks up uploads that appear later.
    let watched = site.path("watched");
    std::fs::create_dir_all(&watched)?;
    let mut watch = Command::new(binary("akosha-aggregator"))
        .arg("--config")
        .arg(&config)
        .args(["import", watched.to_str().unwrap(), "--aggregator", &quic, "--watch", "300ms"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    // Prepared beside the watched directory and moved in at once, as another system's upload.
    let staging = site.path("staging");
    std::fs::create_dir_all(&staging)?;
    let script = format!(
        "cp -r {fixture}/systems {staging} && cd {staging}/systems && mv edge-host-1 laptop-2 && \
         sed -i 's/edge-host-1/laptop-2/g' laptop-2/uploads/*/manifest.json && \
         mv laptop-2/uploads/{UPLOAD} laptop-2/uploads/20261122_094622_laptop-2 && mv {staging}/systems {watched}/",
        staging = staging.display(),
        watched = watched.display()
    );
    assert!(Command::new("sh").arg("-c").arg(script).status()?.success());
    let waited = aggregator.wait_total(134, Duration::from_secs(30)).await;
    let _ = watch.kill();
    let _ = watch.wait();
    assert_eq!(waited?, 134);
    assert_eq!(aggregator.stats().await?["systems"]["laptop-2"]["conversation"], 20);

    let bad_option = run(&["import", "s3://bucket", "-o", "endpiont=http://127.0.0.1:1", "--aggregator", &quic]);
    assert!(!bad_option.status.success());
    assert!(text(&bad_option).contains("unknown option `endpiont` for S3"), "{}", text(&bad_option));
    let bad_zone = run(&["import", &fixture, "--timezone", "Mars/Olympus"]);
    assert!(text(&bad_zone).contains("--timezone `Mars/Olympus`"), "{}", text(&bad_zone));
    Ok(())
}
