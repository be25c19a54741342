//! The admin endpoint (loopback by default): `/metrics` in the Prometheus text format,
//! `/healthz` (the process is up), `/readyz` (ready only with a valid SVID and a writable
//! audit trail; detail lines for trail breaks and a lagging or refusing witness). Nothing
//! here changes state.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use libtransport::IdentityHandle;
use libtransport::audit::{AuditSink, FileSink, WitnessQueue, WitnessStatus};
use libtransport::clock::Clock;
use libtransport::metrics::Metrics;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use crate::role::agent::AgentStatus;

/// What the endpoint reports on.
#[derive(Debug, Clone)]
pub(crate) struct State {
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) identity: IdentityHandle,
    pub(crate) audit: Arc<FileSink>,
    pub(crate) clock: Arc<dyn Clock>,
    /// The audit checkpoints waiting for the witness, and how long they may wait before
    /// `/readyz` says so; `None` without a witness.
    pub(crate) witness: Option<(WitnessQueue, std::time::Duration)>,
    /// How the node's agent stands with its issuer; `None` without an agent.
    pub(crate) agent: Option<Arc<AgentStatus>>,
}

/// The running endpoint.
#[derive(Debug)]
pub(crate) struct Admin {
    pub(crate) addr: SocketAddr,
    pub(crate) task: tokio::task::JoinHandle<()>,
}

/// Binds `addr` and serves in the background.
pub(crate) async fn serve(addr: SocketAddr, state: State) -> std::io::Result<Admin> {
    let listener = TcpListener::bind(addr).await?;
    let addr = listener.local_addr()?;
    let task = tokio::spawn(accept(listener, Arc::new(state)));
    Ok(Admin { addr, task })
}

async fn accept(listener: TcpListener, state: Arc<State>) {
    // A scraper needs one or two connections; this bounds what anyone else can hold.
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            continue;
        };
        let state = state.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let state = state.clone();
                async move { Ok::<_, Infallible>(respond(&state, &req)) }
            });
            let conn = http1::Builder::new().serve_connection(TokioIo::new(stream), service);
            let _ = tokio::time::timeout(std::time::Duration::from_secs(30), conn).await;
            drop(permit);
        });
    }
}

fn respond(state: &State, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    if req.method() != Method::GET {
        return text(StatusCode::METHOD_NOT_ALLOWED, "GET only\n".into());
    }
    match req.uri().path() {
        "/metrics" => {
            state.metrics.set_svid_expiry(svid_expiry_seconds(state));
            if let Some(agent) = &state.agent {
                let now = state.clock.now();
                state.metrics.set_issuer_status(
                    agent
                        .issuer_unreachable_for(now)
                        .map_or(0.0, |d| d.as_secs_f64()),
                    agent.workload_svids_expiry(now).unwrap_or(0.0),
                );
            }
            state.metrics.set_audit_writable(state.audit.is_healthy());
            if let Some((q, _)) = &state.witness {
                let s = q.status();
                state.metrics.set_audit_witness(
                    s.pending,
                    s.last_witnessed.unwrap_or(0),
                    s.refused,
                );
            }
            let mut r = text(StatusCode::OK, state.metrics.encode());
            if let Ok(v) = "application/openmetrics-text; version=1.0.0; charset=utf-8".parse() {
                r.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
            }
            r
        }
        "/healthz" => text(StatusCode::OK, "ok\n".into()),
        "/readyz" => {
            let mut problems = Vec::new();
            if svid_expiry_seconds(state) <= 0.0 {
                problems.push("the node's SVID has expired");
            }
            if !state.audit.is_healthy() {
                problems.push(
                    "the audit trail cannot be written (new transfers are refused until it can)",
                );
            }
            // Serving goes on over a broken trail, but its breaks are said wherever anyone
            // looks: here, in the metrics, the log and the trail itself.
            let mut detail = String::new();
            let breaks = state.audit.breaks_on_record();
            if breaks > 0 {
                detail.push_str(&format!(
                    "audit trail: {breaks} break(s) on record; `transportd audit verify` names them\n"
                ));
                for b in state.audit.breaks() {
                    detail.push_str(&format!("audit trail found broken at this start: {b}\n"));
                }
            }
            if let Some((q, lag)) = &state.witness {
                detail.push_str(&witness_detail(&q.status(), *lag, state.clock.instant()));
            }
            if let Some(agent) = &state.agent {
                detail.push_str(&offline_detail(agent, svid_expiry_seconds(state), state));
            }
            if problems.is_empty() {
                text(StatusCode::OK, format!("ready\n{detail}"))
            } else {
                text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("not ready: {}\n{detail}", problems.join("; ")),
                )
            }
        }
        _ => text(
            StatusCode::NOT_FOUND,
            "not found: try /metrics, /healthz or /readyz\n".into(),
        ),
    }
}

/// The `/readyz` line of a node whose issuer is unreachable: how long it has been, and how
/// long what the node serves on stays valid.
fn offline_detail(agent: &AgentStatus, node_svid_left: f64, state: &State) -> String {
    let now = state.clock.now();
    let Some(down) = agent.issuer_unreachable_for(now) else {
        return String::new();
    };
    let secs = |s: f64| s.max(0.0) as u64;
    let workloads = match agent.workload_svids_expiry(now) {
        Some(left) => format!("the soonest workload SVID for {}s", secs(left)),
        None => "no workload SVIDs".to_owned(),
    };
    format!(
        "issuer unreachable for {}s; serving on what this node holds: its SVID valid for {}s, {workloads}\n",
        down.as_secs(),
        secs(node_svid_left),
    )
}

/// `/readyz` lines about the witness: checkpoints waiting longer than `lag`, refusals.
fn witness_detail(s: &WitnessStatus, lag: std::time::Duration, now: std::time::Instant) -> String {
    let mut out = String::new();
    if let Some(oldest) = s.oldest
        && now.saturating_duration_since(oldest) > lag
    {
        out.push_str(&format!(
            "audit witness lags: {} checkpoint(s) not witnessed, the oldest for {}s (last \
             witnessed seq {}){}\n",
            s.pending,
            now.saturating_duration_since(oldest).as_secs(),
            s.last_witnessed.map_or("none".into(), |l| l.to_string()),
            s.last_error
                .as_ref()
                .map(|e| format!(": {e}"))
                .unwrap_or_default()
        ));
    }
    if let Some(r) = &s.last_refusal {
        out.push_str(&format!(
            "audit witness refused {} checkpoint(s); the last: {r}\n",
            s.refused
        ));
    }
    out
}

fn svid_expiry_seconds(state: &State) -> f64 {
    let not_after = state.identity.current().svid().not_after();
    libtransport::clock::seconds_until(state.clock.now(), not_after)
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    if let Ok(v) = "text/plain; charset=utf-8".parse() {
        r.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
    }
    r
}

/// Admin connections at once.
const MAX_CONNECTIONS: usize = 32;
