//! Logging: `tracing` to stderr, filtered by `TRANSPORTD_LOG`, plain or JSON by
//! `TRANSPORTD_LOG_FORMAT`, coloured only on a terminal (`TRANSPORTD_LOG_COLOR`, `NO_COLOR`),
//! so a log file or a journal never holds escape codes. Logs never carry payloads, keys or
//! object names; audit records go to the audit trail, not here.

use std::io::IsTerminal;

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
    let colour = match std::env::var(env::LOG_COLOR).as_deref() {
        Ok("always") => true,
        Ok("never") => false,
        Ok("auto") | Err(_) => {
            std::io::stderr().is_terminal()
                && std::env::var_os(env::NO_COLOR).is_none_or(|v| v.is_empty())
        }
        Ok(other) => anyhow::bail!(
            "{}={other:?}: expected auto, always or never",
            env::LOG_COLOR
        ),
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(colour && !json)
        .with_target(false);
    if json {
        builder.json().flatten_event(true).init();
    } else {
        builder.init();
    }
    Ok(())
}
