//! Object storage locations from URLs: `s3://bucket/prefix`, `gs://…`, `az://container/prefix` (also
//! `abfs[s]://`, `azure://`), `file:///dir` or a plain directory path.
//!
//! Credentials and endpoints come from the usual environment variables (`AWS_*`, `GOOGLE_*`, `AZURE_*`, as the
//! `object_store` builders read them) and from explicit `key=value` options, which win. Unlike
//! `object_store::parse_url_opts`, an option the backend does not know is an error that names it: a misspelt
//! `endpoint` must not silently send requests to AWS.

use std::path::PathBuf;
use std::sync::Arc;

use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreScheme};

mod checksum;
pub(crate) use checksum::probe as probe_checksum_verification;

/// Why a location could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum ObjectsError {
    /// The URL does not parse or names no supported backend.
    #[error("invalid object store URL `{url}`: {reason}")]
    BadUrl {
        /// The URL as given.
        url: String,
        /// Why.
        reason: String,
    },
    /// An option is unknown to the backend.
    #[error("unknown option `{key}` for {backend} (see the object_store documentation for its configuration keys)")]
    UnknownOption {
        /// The backend.
        backend: &'static str,
        /// The option.
        key: String,
    },
    /// The backend rejected its configuration.
    #[error("cannot open `{url}`: {source}")]
    Build {
        /// The URL.
        url: String,
        /// Why.
        #[source]
        source: object_store::Error,
    },
}

/// An opened store and the prefix inside it that the URL named.
#[derive(Debug, Clone)]
pub struct Location {
    /// The store (bucket, container or directory).
    pub store: Arc<dyn ObjectStore>,
    /// The prefix inside the store (may be empty).
    pub prefix: Path,
    /// The URL, for messages and for remembering what came from where.
    pub url: String,
    /// S3 only: the same bucket through a client that declares each PUT body's sha256
    /// (`x-amz-checksum-sha256`), for uploads the store itself verifies once
    /// [`probe_checksum_verification`] has shown it does.
    pub checksummed: Option<Arc<dyn ObjectStore>>,
}

impl Location {
    /// `prefix/relative`.
    pub fn join(&self, relative: &str) -> Path {
        relative.split('/').filter(|p| !p.is_empty()).fold(self.prefix.clone(), |path, part| path.child(part))
    }
}

/// Opens the location a URL names, with extra backend options.
pub fn open(url: &str, options: &[(String, String)]) -> Result<Location, ObjectsError> {
    open_with_retry(url, options, None)
}

/// [`open`] with the remote backends' retry policy (backoff with jitter, attempts, total time) set.
pub fn open_with_retry(
    url: &str,
    options: &[(String, String)],
    retry: Option<object_store::RetryConfig>,
) -> Result<Location, ObjectsError> {
    let bad = |reason: String| ObjectsError::BadUrl { url: url.to_owned(), reason };
    let parsed = match url::Url::parse(url) {
        Ok(parsed) => parsed,
        // A plain path is a local directory.
        Err(url::ParseError::RelativeUrlWithoutBase) => return open_local(url, PathBuf::from(url), options),
        Err(e) => return Err(bad(e.to_string())),
    };
    if parsed.scheme() == "file" {
        let dir = parsed.to_file_path().map_err(|()| bad("not a local path".into()))?;
        return open_local(url, dir, options);
    }
    let (scheme, mut prefix) = ObjectStoreScheme::parse(&parsed).map_err(|e| bad(e.to_string()))?;
    // object_store's scheme parser reads `az://` as `az://account/container/path`, its Azure builder as
    // `az://container/path` (the fsspec convention, which we document): the prefix must follow the builder.
    if matches!(parsed.scheme(), "az" | "abfs" | "abfss") && parsed.username().is_empty() {
        prefix = Path::from(parsed.path());
    }
    let build = |source| ObjectsError::Build { url: url.to_owned(), source };
    let store: Arc<dyn ObjectStore> = match scheme {
        ObjectStoreScheme::AmazonS3 => {
            let mut builder = object_store::aws::AmazonS3Builder::from_env().with_url(url);
            for (key, value) in options {
                let key = key.parse().map_err(|_| ObjectsError::UnknownOption { backend: "S3", key: key.clone() })?;
                builder = builder.with_config(key, value);
            }
            if let Some(retry) = &retry {
                builder = builder.with_retry(retry.clone());
            }
            let checksummed = builder
                .clone()
                .with_checksum_algorithm(object_store::aws::Checksum::SHA256)
                .with_http_connector(checksum::TamperingConnector);
            let checksummed: Arc<dyn ObjectStore> = Arc::new(checksummed.build().map_err(build)?);
            let store = Arc::new(builder.build().map_err(build)?);
            return Ok(Location { store, prefix, url: url.to_owned(), checksummed: Some(checksummed) });
        }
        ObjectStoreScheme::GoogleCloudStorage => {
            let mut builder = object_store::gcp::GoogleCloudStorageBuilder::from_env().with_url(url);
            for (key, value) in options {
                let key = key
                    .parse()
                    .map_err(|_| ObjectsError::UnknownOption { backend: "Google Cloud Storage", key: key.clone() })?;
                builder = builder.with_config(key, value);
            }
            if let Some(retry) = &retry {
                builder = builder.with_retry(retry.clone());
            }
            Arc::new(builder.build().map_err(build)?)
        }
        ObjectStoreScheme::MicrosoftAzure => {
            let mut builder = object_store::azure::MicrosoftAzureBuilder::from_env().with_url(url);
            for (key, value) in options {
                let key = key
                    .parse()
                    .map_err(|_| ObjectsError::UnknownOption { backend: "Azure Blob Storage", key: key.clone() })?;
                builder = builder.with_config(key, value);
            }
            if let Some(retry) = &retry {
                builder = builder.with_retry(retry.clone());
            }
            Arc::new(builder.build().map_err(build)?)
        }
        other => return Err(bad(format!("unsupported scheme ({other:?}); use s3://, gs://, az:// or file://"))),
    };
    Ok(Location { store, prefix, url: url.to_owned(), checksummed: None })
}

fn open_local(url: &str, dir: PathBuf, options: &[(String, String)]) -> Result<Location, ObjectsError> {
    if let Some((key, _)) = options.first() {
        return Err(ObjectsError::UnknownOption { backend: "a local directory", key: key.clone() });
    }
    let store = object_store::local::LocalFileSystem::new_with_prefix(&dir)
        .map_err(|source| ObjectsError::Build { url: url.to_owned(), source })?;
    Ok(Location { store: Arc::new(store), prefix: Path::default(), url: url.to_owned(), checksummed: None })
}

/// The directory a URL names when it is a local one (`file:///dir` or a plain path).
pub fn local_dir(url: &str) -> Option<PathBuf> {
    match url::Url::parse(url) {
        Err(url::ParseError::RelativeUrlWithoutBase) => Some(PathBuf::from(url)),
        Ok(parsed) if parsed.scheme() == "file" => parsed.to_file_path().ok(),
        _ => None,
    }
}

/// Parses `key=value` (as given on a command line).
pub fn parse_option(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((key, value)) if !key.trim().is_empty() => Ok((key.trim().to_owned(), value.to_owned())),
        _ => Err(format!("`{text}` is not key=value")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_open_or_say_what_is_wrong() {
        let dir = tempfile::tempdir().unwrap();
        let local = open(dir.path().to_str().unwrap(), &[]).unwrap();
        assert_eq!(local.prefix.as_ref(), "");
        let file_url = format!("file://{}", dir.path().display());
        assert!(open(&file_url, &[]).is_ok());

        let s3 = open("s3://bucket/some/prefix", &[("endpoint".into(), "http://127.0.0.1:1".into())]).unwrap();
        assert_eq!(s3.join("systems/a/").as_ref(), "some/prefix/systems/a");

        let err = open("s3://bucket", &[("endpiont".into(), "x".into())]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "unknown option `endpiont` for S3 (see the object_store documentation for its configuration keys)"
        );
        let err = open("ftp://host/x", &[]).unwrap_err();
        assert!(err.to_string().starts_with("invalid object store URL `ftp://host/x`"), "{err}");
        assert!(open(&file_url, &[("region".into(), "x".into())]).is_err());
        assert_eq!(parse_option("a=b=c").unwrap(), ("a".into(), "b=c".into()));
        assert!(parse_option("novalue").is_err());
    }

    /// Azure and GCS have no emulator here: their URLs, options and prefixes are checked without a request.
    #[test]
    fn azure_and_gcs_urls_and_options_open_without_a_request() {
        let azure = open(
            "az://container/cold/akosha",
            &[("account_name".into(), "devstoreaccount1".into()), ("access_key".into(), "a2V5".into())],
        )
        .unwrap();
        assert_eq!(azure.join("kind=reflection/").as_ref(), "cold/akosha/kind=reflection");
        assert!(azure.store.to_string().to_lowercase().contains("azure"), "{}", azure.store);
        let err = open("az://container", &[("acount_name".into(), "x".into())]).unwrap_err().to_string();
        assert!(err.contains("unknown option `acount_name` for Azure Blob Storage"), "{err}");
        // An https URL of the blob service names account and container itself.
        let https = open(
            "https://devstoreaccount1.blob.core.windows.net/container/prefix",
            &[("access_key".into(), "a2V5".into())],
        )
        .unwrap();
        assert_eq!(https.prefix.as_ref(), "prefix");

        let key = r#"{"type": "service_account", "client_email": "akosha@example.iam.gserviceaccount.com",
            "private_key_id": "1", "private_key": "", "token_uri": "https://oauth2.googleapis.com/token"}"#;
        let gcs = open("gs://bucket/archive", &[("service_account_key".into(), key.into())]);
        match gcs {
            Ok(gcs) => assert_eq!(gcs.join("a/b").as_ref(), "archive/a/b"),
            // Without a usable private key the builder says so; the URL and the option were accepted.
            Err(e) => assert!(!e.to_string().contains("unknown option"), "{e}"),
        }
        let err = open("gs://bucket", &[("service_acount".into(), "x".into())]).unwrap_err().to_string();
        assert!(err.contains("unknown option `service_acount` for Google Cloud Storage"), "{err}");
    }
}
