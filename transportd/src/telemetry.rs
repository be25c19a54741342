//! Logging: `tracing` to stderr, filtered by `TRANSPORTD_LOG`, plain or JSON by
//! `TRANSPORTD_LOG_FORMAT`. Logs never carry payloads, keys or object names; audit records
//! go to the audit trail, not here.

use tracing_subscriber::EnvFilter;

use crate::env;

/// Installs the subscriber. `default` is the filter when `TRANSPORTD_LOG` is unset.
pub(crate) fn init(default: &str) -> anyhow::Result<()> {
    let filter = EnvFilter::try_from_env(env::LOG).unwrap_or_else(|_| EnvFilter::new(default));
    let json = match std::env::var(env::LOG_FORMAT).as_deref() {
        Ok("json") => true,
        Ok("plain") | Err(_) => false,
        Ok(other) => anyhow::bail!("{}={other:?}: expected plain or json", env::LOG_FORMAT),
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false);
    if json {
        builder.json().flatten_event(true).init();
    } else {
        builder.init();
    }
    Ok(())
}
