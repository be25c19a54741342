//! One-shot commands: CA management, configuration checks, and the client commands.

use std::path::Path;

use libtransport::clock::{Clock, SystemClock};
use libtransport::proto::ErrorCode;
use libtransport::{ConnectError, FetchError, PushError, RequestError};

use crate::config::{ConfigError, NodeConfig};

pub(crate) mod audit;
pub(crate) mod ca;
pub(crate) mod client;
pub(crate) mod policy;

/// `transportd config check FILE`.
pub(crate) fn config_check(file: &Path) -> anyhow::Result<()> {
    let cfg = NodeConfig::load(file)?;
    let warnings = cfg.check(SystemClock.now())?;
    for w in &warnings {
        eprintln!("warning: {w}");
    }
    let creds = cfg.credentials()?;
    let (policy, _, source) = cfg.policy.load()?;
    println!(
        "{}: ok (identity {}, {} access rules from {source}, store {}, audit trail {})",
        file.display(),
        creds.id(),
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
        if cause.is::<libtransport::audit::VerifyError>() {
            return 65;
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
        if let Some(PushError::Corrupt(_)) = cause.downcast_ref::<PushError>() {
            return 65;
        }
        if let Some(r) = cause.downcast_ref::<RequestError>() {
            return match r.code() {
                Some(ErrorCode::NotFound) => 66,
                Some(ErrorCode::Corrupt) => 65,
                Some(ErrorCode::Busy | ErrorCode::Unavailable | ErrorCode::AuditUnavailable) => 75,
                Some(_) => 1,
                None if r.is_connection() => 69,
                None => 1,
            };
        }
    }
    1
}
