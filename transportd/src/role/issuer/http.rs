//! The small HTTP/1.1 + JSON layer the issuer's interfaces share, server and client side:
//! bounded bodies, JSON errors with a status, one request per call. hyper does the HTTP.

use std::convert::Infallible;
use std::future::Future;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::io::{AsyncRead, AsyncWrite};

use super::wire::{ErrorBody, MAX_BODY_BYTES};

/// A refusal or failure, as an HTTP status and a message for the caller.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub(crate) struct ApiError {
    pub(crate) status: StatusCode,
    pub(crate) message: String,
}

impl ApiError {
    pub(crate) fn bad_request(m: impl Into<String>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            message: m.into(),
        }
    }

    pub(crate) fn unauthenticated(m: impl Into<String>) -> Self {
        Self {
            status: StatusCode::UNAUTHORIZED,
            message: m.into(),
        }
    }

    pub(crate) fn forbidden(m: impl Into<String>) -> Self {
        Self {
            status: StatusCode::FORBIDDEN,
            message: m.into(),
        }
    }

    pub(crate) fn not_found(m: impl Into<String>) -> Self {
        Self {
            status: StatusCode::NOT_FOUND,
            message: m.into(),
        }
    }

    pub(crate) fn conflict(m: impl Into<String>) -> Self {
        Self {
            status: StatusCode::CONFLICT,
            message: m.into(),
        }
    }

    /// Our own failure: the details go to the log, the caller learns only that it failed.
    pub(crate) fn internal(e: &anyhow::Error) -> Self {
        tracing::error!(error = %format!("{e:#}"), "issuer request failed");
        Self {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            message: "internal error in the issuer; see its log".into(),
        }
    }
}

/// One parsed request: method, path and (bounded) body.
#[derive(Debug)]
pub(crate) struct Call {
    pub(crate) method: Method,
    pub(crate) path: String,
    pub(crate) body: Bytes,
}

impl Call {
    /// The body as JSON of type `T`.
    pub(crate) fn json<T: DeserializeOwned>(&self) -> Result<T, ApiError> {
        serde_json::from_slice(&self.body)
            .map_err(|e| ApiError::bad_request(format!("request body: {e}")))
    }
}

/// A JSON answer.
pub(crate) fn ok<T: Serialize>(value: &T) -> Result<(StatusCode, Vec<u8>), ApiError> {
    serde_json::to_vec(value)
        .map(|v| (StatusCode::OK, v))
        .map_err(|e| ApiError::internal(&e.into()))
}

/// Serves HTTP/1.1 on `io` until the peer is done (or `limit` passes), answering each
/// request with `handle`.
pub(crate) async fn serve_connection<S, H, F>(io: S, limit: Duration, handle: H)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    H: Fn(Call) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Result<(StatusCode, Vec<u8>), ApiError>> + Send + 'static,
{
    let service = hyper::service::service_fn(move |req: Request<Incoming>| {
        let handle = handle.clone();
        async move { Ok::<_, Infallible>(answer(req, handle).await) }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .max_buf_size(MAX_BODY_BYTES.max(8192))
        .serve_connection(TokioIo::new(io), service);
    let _ = tokio::time::timeout(limit, conn).await;
}

async fn answer<H, F>(req: Request<Incoming>, handle: H) -> Response<Full<Bytes>>
where
    H: Fn(Call) -> F,
    F: Future<Output = Result<(StatusCode, Vec<u8>), ApiError>>,
{
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    let body = match Limited::new(req.into_body(), MAX_BODY_BYTES)
        .collect()
        .await
    {
        Ok(b) => b.to_bytes(),
        Err(_) => {
            return respond(Err(ApiError {
                status: StatusCode::PAYLOAD_TOO_LARGE,
                message: format!("request body over {MAX_BODY_BYTES} bytes"),
            }));
        }
    };
    respond(handle(Call { method, path, body }).await)
}

fn respond(result: Result<(StatusCode, Vec<u8>), ApiError>) -> Response<Full<Bytes>> {
    let (status, body) = match result {
        Ok(ok) => ok,
        Err(e) => (
            e.status,
            serde_json::to_vec(&ErrorBody { error: e.message }).unwrap_or_default(),
        ),
    };
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    r
}

/// Why a client call failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum CallError {
    /// The server answered with an error.
    #[error("{message} (HTTP {status})")]
    Refused { status: StatusCode, message: String },
    /// The exchange itself failed.
    #[error("{0}")]
    Transport(String),
}

impl CallError {
    pub(crate) fn status(&self) -> Option<StatusCode> {
        match self {
            Self::Refused { status, .. } => Some(*status),
            Self::Transport(_) => None,
        }
    }
}

/// Sends one request on `io` and decodes the JSON answer.
pub(crate) async fn call<S, B, T>(
    io: S,
    method: Method,
    path: &str,
    body: Option<&B>,
) -> Result<T, CallError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    B: Serialize,
    T: DeserializeOwned,
{
    let t = |e: &dyn std::fmt::Display| CallError::Transport(e.to_string());
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .map_err(|e| t(&e))?;
    let driver = tokio::spawn(conn);
    let bytes = match body {
        Some(b) => serde_json::to_vec(b).map_err(|e| t(&e))?,
        None => Vec::new(),
    };
    let req = Request::builder()
        .method(method)
        .uri(path)
        .header(hyper::header::HOST, "transportd-issuer")
        .header(hyper::header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(bytes)))
        .map_err(|e| t(&e))?;
    let result = async {
        let resp = send.send_request(req).await.map_err(|e| t(&e))?;
        let status = resp.status();
        let body = Limited::new(resp.into_body(), MAX_BODY_BYTES)
            .collect()
            .await
            .map_err(|e| t(&*e))?
            .to_bytes();
        if !status.is_success() {
            let message = serde_json::from_slice::<ErrorBody>(&body)
                .map(|e| e.error)
                .unwrap_or_else(|_| String::from_utf8_lossy(&body).into_owned());
            return Err(CallError::Refused { status, message });
        }
        serde_json::from_slice(&body).map_err(|e| t(&format!("answer: {e}")))
    }
    .await;
    driver.abort();
    result
}
