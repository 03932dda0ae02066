//! Whether an S3-compatible store verifies the `x-amz-checksum-sha256` a PUT declares.
//!
//! A store that refuses a body which does not match its declared sha256 has verified every object it accepts,
//! so an upload needs no second check (no MD5 of the body against the ETag, no read-back). Stores differ: AWS
//! S3, MinIO and SeaweedFS refuse a mismatch with `400 BadDigest`; an older or partial S3 compatible may ignore
//! the header and store whatever arrived. The only way to know is to ask: [`probe`] sends one object whose body
//! is swapped after the client computed its checksum and signed the request, and watches what the store does.
//!
//! The swap is done by [`TamperingConnector`], the HTTP client of the checksummed store, and only for a request
//! carrying the private [`Tamper`] marker, which only [`probe`] attaches.

use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use object_store::client::{
    ClientOptions, HttpClient, HttpConnector, HttpError, HttpRequest, HttpRequestBody, HttpResponse, HttpService,
    ReqwestConnector,
};
use object_store::path::Path;
use object_store::{ObjectStore, PutOptions, PutPayload};

/// Marks a request whose body the client replaces after signing; collects the status of each attempt.
#[derive(Clone, Debug, Default)]
struct Tamper {
    statuses: Arc<Mutex<Vec<u16>>>,
}

/// Makes HTTP clients that send requests as they are, except a [`Tamper`]-marked one.
#[derive(Debug, Default)]
pub(crate) struct TamperingConnector;

impl HttpConnector for TamperingConnector {
    fn connect(&self, options: &ClientOptions) -> object_store::Result<HttpClient> {
        Ok(HttpClient::new(TamperingClient(ReqwestConnector::default().connect(options)?)))
    }
}

#[derive(Debug)]
struct TamperingClient(HttpClient);

#[async_trait]
impl HttpService for TamperingClient {
    async fn call(&self, request: HttpRequest) -> Result<HttpResponse, HttpError> {
        let Some(tamper) = request.extensions().get::<Tamper>().cloned() else {
            return self.0.execute(request).await;
        };
        // Same length (the signed Content-Length stays true), different bytes: the probe's body is text, so
        // zeros differ from it everywhere.
        let (parts, body) = request.into_parts();
        let swapped = HttpRequestBody::from(vec![0u8; body.content_length()]);
        let response = self.0.execute(HttpRequest::from_parts(parts, swapped)).await?;
        tamper.statuses.lock().unwrap_or_else(|p| p.into_inner()).push(response.status().as_u16());
        Ok(response)
    }
}

/// Asks whether `checked` (a store that declares each PUT body's sha256 and whose client is a
/// [`TamperingConnector`]) refuses a body that does not match its declaration. `plain` is the same bucket
/// without checksums. Leaves nothing behind at `path` unless a delete fails.
///
/// `Ok(true)`: a swapped body was refused with `400` and the object kept its earlier content. `Ok(false)`: the
/// store stored the swapped body, answered otherwise, or refused checksummed PUTs altogether (which `plain`
/// then accepted). `Err`: the store could not be asked (unreachable, no permission): ask again later.
pub(crate) async fn probe(
    plain: &dyn ObjectStore,
    checked: &dyn ObjectStore,
    path: &Path,
) -> Result<bool, object_store::Error> {
    let body = |what: &str| PutPayload::from(format!("akosha checksum probe: {what} {:032x}", rand::random::<u128>()));
    let original = body("original");
    if checked.put(path, original.clone()).await.is_err() {
        plain.put(path, original).await?;
        let _ = plain.delete(path).await;
        return Ok(false);
    }
    let tamper = Tamper::default();
    let mut options = PutOptions::default();
    options.extensions.insert(tamper.clone());
    let swapped_accepted = checked.put_opts(path, body("swapped!"), options).await.is_ok();
    let statuses = std::mem::take(&mut *tamper.statuses.lock().unwrap_or_else(|p| p.into_inner()));
    let kept = plain.get(path).await?.bytes().await?;
    let _ = plain.delete(path).await;
    let original: bytes::Bytes = original.into();
    Ok(!swapped_accepted && !statuses.is_empty() && statuses.iter().all(|&s| s == 400) && kept == original)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_store_without_http_verification_is_not_trusted() {
        // An in-memory store stores whatever it is given: the marker changes nothing and nothing is refused.
        let store = object_store::memory::InMemory::new();
        let path = Path::from("probe/checksum");
        assert!(!probe(&store, &store, &path).await.unwrap());
        assert!(store.head(&path).await.is_err(), "the probe object was deleted");
    }
}
