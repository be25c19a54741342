//! One-shot commands: CA management, configuration checks, health probes, the client
//! commands, and the shell completions and man pages.

use std::path::Path;

use libtransport::clock::{Clock, SystemClock};
use libtransport::proto::ErrorCode;
use libtransport::{ConnectError, FetchError, PushError, RequestError};

use crate::config::{ConfigError, NodeConfig};

pub(crate) mod audit;
pub(crate) mod ca;
pub(crate) mod client;
pub(crate) mod generate;
pub(crate) mod health;
pub(crate) mod issuer;
pub(crate) mod policy;
pub(crate) mod sidecar;
pub(crate) mod workload;

/// `transportd config check FILE`.
pub(crate) fn config_check(file: &Path) -> anyhow::Result<()> {
    let cfg = NodeConfig::load(file)?;
    let warnings = cfg.check(SystemClock.now())?;
    for w in &warnings {
        eprintln!("warning: {w}");
    }
    let identity = match cfg.credentials()? {
        Some(creds) => creds.id().to_string(),
        None => "from the issuer".to_owned(),
    };
    let (policy, _, source) = cfg.policy.load()?;
    println!(
        "{}: ok (identity {identity}, {} access rules from {source}, store {}, audit trail {})",
        file.display(),
        policy.rules().len(),
        cfg.store_root.display(),
        cfg.audit.dir.display()
    );
    Ok(())
}

/// The exit code for a failure, from the most specific error in its chain.
pub(crate) fn exit_code(e: &anyhow::Error) -> u8 {
    for cause in e.chain() {
        if cause.is::<ConfigError>() {
            return 78;
        }
        if let Some(h) = cause.downcast_ref::<health::HealthError>() {
            return match h {
                health::HealthError::NotReady { .. } => 75,
                health::HealthError::Unreachable { .. } => 69,
            };
        }
        if let Some(w) = cause.downcast_ref::<libtransport::workload::WorkloadError>() {
            use libtransport::workload::WorkloadError as W;
            return match w {
                W::PermissionDenied(_) => 77,
                W::Unreachable { .. } | W::Closed => 69,
                W::Endpoint { .. } | W::NoEndpoint | W::NotOffered { .. } => 64,
                W::Malformed(_) => 65,
                _ => 1,
            };
        }
        if let Some(r) = cause.downcast_ref::<policy::emergency::Refused>() {
            return match r.status {
                400 => 64,
                403 => 77,
                404 => 66,
                503 => 75,
                _ => 1,
            };
        }
        if cause.is::<policy::emergency::Unreachable>() {
            return 69;
        }
        if cause.is::<libtransport::audit::VerifyError>()
            || cause.is::<audit::report::TrailsFailed>()
        {
            return 65;
        }
        if let Some(e) = cause.downcast_ref::<libtransport::sidecar::SidecarError>() {
            return match e.code() {
                "permission_denied" | "unauthenticated" | "server_not_trusted" => 77,
                "not_found" => 66,
                "corrupt" | "protocol" => 65,
                "busy" | "unavailable" | "audit_unavailable" => 75,
                "no_space" | "too_large" => 73,
                "unreachable" => 69,
                _ => 1,
            };
        }
        if let Some(c) = cause.downcast_ref::<ConnectError>() {
            return match c {
                ConnectError::Rejected(_) | ConnectError::ServerNotTrusted(_) => 77,
                ConnectError::Local(_) => 1,
                ConnectError::Busy => 75,
                _ => 69,
            };
        }
        if let Some(FetchError::Corrupt(_)) = cause.downcast_ref::<FetchError>() {
            return 65;
        }
        let request = match cause.downcast_ref::<PushError>() {
            Some(PushError::Corrupt(_)) => return 65,
            // A transparent variant: the chain goes on past the request error.
            Some(PushError::Request(r)) => Some(r),
            _ => cause.downcast_ref::<RequestError>(),
        };
        if let Some(r) = request {
            return match r.code() {
                Some(ErrorCode::NotFound) => 66,
                Some(ErrorCode::Corrupt) => 65,
                Some(ErrorCode::Busy | ErrorCode::Unavailable | ErrorCode::AuditUnavailable) => 75,
                Some(ErrorCode::NoSpace | ErrorCode::TooLarge) => 73,
                Some(_) => 1,
                None if r.is_connection() => 69,
                None => 1,
            };
        }
    }
    1
}
