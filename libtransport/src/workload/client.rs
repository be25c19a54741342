//! The Workload API client: a gRPC channel over the agent's Unix socket, the security
//! header on every call, and the streams of SVID and bundle updates.

use std::error::Error as StdError;
use std::path::{Path, PathBuf};
use std::time::Duration;

use certs::TrustBundle;
use hyper_util::rt::TokioIo;
use tokio::net::UnixStream;
use tonic::metadata::MetadataValue;
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint, Uri};
use tonic::{Code, Request, Status, Streaming};

use super::codec::{X509Context, decode_bundles_response, decode_x509_response};
use super::pb::spiffe_workload_api_client::SpiffeWorkloadApiClient;
use super::{MAX_MESSAGE_BYTES, SECURITY_HEADER, SECURITY_HEADER_VALUE, WorkloadError, pb};

/// A gRPC channel to the Workload API socket at `socket`, connected now. Calls on it carry
/// no security header; [`WorkloadClient`] adds it. For callers that need a raw channel
/// (other services on the same endpoint, or tests).
pub async fn channel(socket: &Path) -> Result<Channel, WorkloadError> {
    let path = socket.to_path_buf();
    let connector = tower::service_fn(move |_: Uri| {
        let path = path.clone();
        async move { UnixStream::connect(path).await.map(TokioIo::new) }
    });
    // The URI only fills the :authority header; the connector ignores it.
    Endpoint::from_static("http://localhost")
        .connect_timeout(CONNECT_TIMEOUT)
        .connect_with_connector(connector)
        .await
        .map_err(|e| WorkloadError::Unreachable {
            path: socket.to_path_buf(),
            reason: error_chain(&e),
        })
}

/// A client of the SPIFFE Workload API on a Unix socket. Cheap to clone; clones share the
/// connection, which reconnects by itself on the next call after a failure.
#[derive(Debug, Clone)]
pub struct WorkloadClient {
    socket: PathBuf,
    inner: SpiffeWorkloadApiClient<InterceptedService<Channel, SecurityHeader>>,
}

impl WorkloadClient {
    /// Connects to the Workload API at `socket` (see [`super::endpoint_path`] for turning an
    /// `SPIFFE_ENDPOINT_SOCKET` value into one).
    pub async fn connect(socket: &Path) -> Result<Self, WorkloadError> {
        let channel = channel(socket).await?;
        let inner = SpiffeWorkloadApiClient::with_interceptor(channel, SecurityHeader)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES);
        Ok(Self {
            socket: socket.to_path_buf(),
            inner,
        })
    }

    /// The socket this client talks to.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The SVIDs the agent issues this process now, with their trust domain's bundle: the
    /// first answer of `FetchX509SVID`.
    pub async fn fetch_x509(&self) -> Result<X509Context, WorkloadError> {
        self.watch_x509().await?.next().await
    }

    /// Follows `FetchX509SVID`: the current SVIDs first, then a new answer on every change
    /// (rotation, bundle, entries).
    pub async fn watch_x509(&self) -> Result<X509Updates, WorkloadError> {
        let stream = self
            .inner
            .clone()
            .fetch_x509svid(pb::X509svidRequest {})
            .await
            .map_err(|s| status_error(&self.socket, &s))?
            .into_inner();
        Ok(X509Updates {
            socket: self.socket.clone(),
            stream,
        })
    }

    /// The trust bundles the agent says to trust, one per trust domain, sorted: the first
    /// answer of `FetchX509Bundles`.
    pub async fn fetch_bundles(&self) -> Result<Vec<TrustBundle>, WorkloadError> {
        self.watch_bundles().await?.next().await
    }

    /// Follows `FetchX509Bundles`: the current bundles, then a new answer on every change.
    pub async fn watch_bundles(&self) -> Result<BundleUpdates, WorkloadError> {
        let stream = self
            .inner
            .clone()
            .fetch_x509_bundles(pb::X509BundlesRequest {})
            .await
            .map_err(|s| status_error(&self.socket, &s))?
            .into_inner();
        Ok(BundleUpdates {
            socket: self.socket.clone(),
            stream,
        })
    }
}

/// The answers of an open `FetchX509SVID` stream.
#[derive(Debug)]
pub struct X509Updates {
    socket: PathBuf,
    stream: Streaming<pb::X509svidResponse>,
}

impl X509Updates {
    /// The next answer: the first comes at once, later ones when something changes.
    /// [`WorkloadError::Closed`] when the agent ends the stream; an error ends it too.
    pub async fn next(&mut self) -> Result<X509Context, WorkloadError> {
        match self.stream.message().await {
            Ok(Some(m)) => Ok(decode_x509_response(&m)?),
            Ok(None) => Err(WorkloadError::Closed),
            Err(s) => Err(status_error(&self.socket, &s)),
        }
    }
}

/// The answers of an open `FetchX509Bundles` stream.
#[derive(Debug)]
pub struct BundleUpdates {
    socket: PathBuf,
    stream: Streaming<pb::X509BundlesResponse>,
}

impl BundleUpdates {
    /// The next set of bundles, sorted by trust domain.
    pub async fn next(&mut self) -> Result<Vec<TrustBundle>, WorkloadError> {
        match self.stream.message().await {
            Ok(Some(m)) => Ok(decode_bundles_response(&m)?),
            Ok(None) => Err(WorkloadError::Closed),
            Err(s) => Err(status_error(&self.socket, &s)),
        }
    }
}

/// Adds `workload.spiffe.io: true` to every call.
#[derive(Debug, Clone, Copy)]
pub(crate) struct SecurityHeader;

impl Interceptor for SecurityHeader {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        req.metadata_mut().insert(
            SECURITY_HEADER,
            MetadataValue::from_static(SECURITY_HEADER_VALUE),
        );
        Ok(req)
    }
}

/// A gRPC status as our error: the codes the Workload API standard gives a meaning keep it.
fn status_error(socket: &Path, s: &Status) -> WorkloadError {
    let message = sanitize(s.message());
    match s.code() {
        Code::PermissionDenied => WorkloadError::PermissionDenied(message),
        Code::InvalidArgument => WorkloadError::InvalidArgument(message),
        Code::Unavailable => WorkloadError::Unreachable {
            path: socket.to_path_buf(),
            reason: match s.source() {
                Some(src) => format!("{message}: {}", error_chain(src)),
                None => message,
            },
        },
        code => WorkloadError::Status { code, message },
    }
}

/// An error and its sources, `a: b: c`.
fn error_chain(e: &(dyn StdError + 'static)) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        // Wrappers often repeat their source's text; say it once.
        let text = s.to_string();
        if !out.ends_with(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        cur = s.source();
    }
    sanitize(&out)
}

/// The agent's text fit for our errors: no control characters, at most 256 characters.
fn sanitize(s: &str) -> String {
    s.chars()
        .filter(|c| !c.is_control())
        .take(MAX_MESSAGE_CHARS)
        .collect()
}

/// How long connecting to the socket may take: a local socket answers at once or never.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Most characters of an agent's status message kept in an error.
const MAX_MESSAGE_CHARS: usize = 256;
