//! `transportd health`: is a running node (or issuer) ready? For kubelet exec probes,
//! systemd `ExecStartPost=`/timers and scripts. A node is asked over its admin endpoint
//! (`GET /readyz`); the issuer, which has no HTTP admin endpoint, over its admin socket
//! (`GET /v1/status`: it answers only once it serves). Exit 0 ready, 75 up but not ready
//! (what `/readyz` said on stderr), 69 nothing answers, 78 the configuration is unusable.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::config::NodeConfig;
use crate::config::issuer::IssuerConfig;
use crate::role::issuer::admin::{AdminClient, AdminRefused};

/// Why the daemon asked is not ready; [`crate::cmd::exit_code`] maps each to its code.
#[derive(Debug, thiserror::Error)]
pub(crate) enum HealthError {
    /// It answered, and is not ready (75, EX_TEMPFAIL: ask again later).
    #[error("{target}: {reason}")]
    NotReady {
        /// What was asked.
        target: String,
        /// What it said, on one line.
        reason: String,
    },
    /// Nothing answered, or not in time (69, EX_UNAVAILABLE).
    #[error("{target}: {reason}")]
    Unreachable {
        /// What was asked.
        target: String,
        /// Why not.
        reason: String,
    },
}

/// Which daemon to ask.
#[derive(Debug)]
pub(crate) enum Target {
    /// A node's configuration file (`[admin] listen`) or an issuer's (`admin_socket`).
    Config(PathBuf),
    /// A node's admin endpoint.
    Admin(SocketAddr),
    /// An issuer's admin socket.
    IssuerSocket(PathBuf),
}

/// Asks once; `Ok` (and what the daemon said, on stdout) only when it is ready.
pub(crate) async fn run(target: Target, timeout: Duration) -> anyhow::Result<()> {
    let target = match target {
        Target::Config(file) => from_config(&file)?,
        t => t,
    };
    let said = match target {
        Target::Admin(addr) => ask_node(probe_addr(addr), timeout).await?,
        Target::IssuerSocket(socket) => ask_issuer(&socket, timeout).await?,
        Target::Config(_) => unreachable!("resolved above"),
    };
    print!("{said}");
    Ok(())
}

/// What a configuration file points at: the issuer's files say `trust_domain` at the top
/// (a node's never do: its file has no such key), anything else is read as a node's.
fn from_config(file: &Path) -> anyhow::Result<Target> {
    let text = std::fs::read_to_string(file).map_err(|e| crate::config::ConfigError::Read {
        path: file.to_path_buf(),
        source: e,
    })?;
    let is_issuer =
        toml::from_str::<toml::Table>(&text).is_ok_and(|t| t.contains_key("trust_domain"));
    if is_issuer {
        let cfg = IssuerConfig::load(file)?;
        return Ok(Target::IssuerSocket(cfg.admin_socket));
    }
    let cfg = NodeConfig::load(file)?;
    match cfg.admin {
        Some(addr) => Ok(Target::Admin(addr)),
        None => Err(crate::config::ConfigError::Invalid {
            field: "admin.listen".into(),
            message: format!(
                "is \"off\" in {}: a node's readiness is read from its admin endpoint; give it \
                 an address (a loopback one is enough for a probe on the same host)",
                file.display()
            ),
        }
        .into()),
    }
}

/// A node listening on every address (`0.0.0.0:9464`) is asked on loopback.
fn probe_addr(addr: SocketAddr) -> SocketAddr {
    match addr.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => (Ipv4Addr::LOCALHOST, addr.port()).into(),
        IpAddr::V6(ip) if ip.is_unspecified() => (Ipv6Addr::LOCALHOST, addr.port()).into(),
        _ => addr,
    }
}

async fn ask_node(addr: SocketAddr, timeout: Duration) -> Result<String, HealthError> {
    let target = format!("node admin endpoint {addr}");
    let unreachable = |reason: String| HealthError::Unreachable {
        target: target.clone(),
        reason,
    };
    let (status, body) = tokio::time::timeout(timeout, get_readyz(addr))
        .await
        .map_err(|_| {
            unreachable(format!(
                "no answer within {}",
                humantime::format_duration(timeout)
            ))
        })?
        .map_err(unreachable)?;
    match status {
        StatusCode::OK => Ok(body),
        StatusCode::SERVICE_UNAVAILABLE => Err(HealthError::NotReady {
            target,
            reason: one_line(&body),
        }),
        other => Err(unreachable(format!(
            "/readyz answered {other}, not a transportd node's admin endpoint? {}",
            one_line(&body)
        ))),
    }
}

async fn get_readyz(addr: SocketAddr) -> Result<(StatusCode, String), String> {
    let stream = TcpStream::connect(addr).await.map_err(|e| {
        format!("cannot connect: {e}; is the node running, and is this its [admin] listen?")
    })?;
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| e.to_string())?;
    let driver = tokio::spawn(conn);
    let req = Request::builder()
        .method(Method::GET)
        .uri("/readyz")
        .header(hyper::header::HOST, addr.to_string())
        .body(Empty::<Bytes>::new())
        .map_err(|e| e.to_string())?;
    let result = async {
        let resp = send.send_request(req).await.map_err(|e| e.to_string())?;
        let status = resp.status();
        let body = Limited::new(resp.into_body(), MAX_BODY_BYTES)
            .collect()
            .await
            .map_err(|e| format!("reading the answer: {e}"))?
            .to_bytes();
        Ok((status, String::from_utf8_lossy(&body).into_owned()))
    }
    .await;
    driver.abort();
    result
}

async fn ask_issuer(socket: &Path, timeout: Duration) -> Result<String, HealthError> {
    let target = format!("issuer admin socket {}", socket.display());
    let client = AdminClient::new(socket.to_path_buf());
    let call = client.call::<(), serde_json::Value>(Method::GET, "/v1/status", None);
    match tokio::time::timeout(timeout, call).await {
        Ok(Ok(_)) => Ok("ready\n".into()),
        Ok(Err(e)) => match e.downcast_ref::<AdminRefused>() {
            Some(r) => Err(HealthError::NotReady {
                target,
                reason: format!("answered {}: {}", r.status, one_line(&r.message)),
            }),
            None => Err(HealthError::Unreachable {
                target,
                reason: one_line(&format!("{e:#}")),
            }),
        },
        Err(_) => Err(HealthError::Unreachable {
            target,
            reason: format!("no answer within {}", humantime::format_duration(timeout)),
        }),
    }
}

/// `/readyz`'s answer on one line: its lines joined with "; ".
fn one_line(text: &str) -> String {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join("; ")
}

/// `/readyz` answers in a few lines; anything longer is not ours.
const MAX_BODY_BYTES: usize = 64 << 10;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_node_on_every_address_is_asked_on_loopback() {
        let a = |s: &str| s.parse::<SocketAddr>().unwrap();
        assert_eq!(probe_addr(a("0.0.0.0:9464")), a("127.0.0.1:9464"));
        assert_eq!(probe_addr(a("[::]:9464")), a("[::1]:9464"));
        assert_eq!(probe_addr(a("10.1.2.3:9464")), a("10.1.2.3:9464"));
    }

    #[test]
    fn the_reason_is_one_line() {
        assert_eq!(
            one_line("not ready: the node's SVID has expired\naudit trail: 1 break(s)\n"),
            "not ready: the node's SVID has expired; audit trail: 1 break(s)"
        );
    }
}
