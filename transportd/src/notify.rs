//! Telling a service manager how the daemon stands (`sd_notify`): `READY=1` once a node or
//! the issuer serves, `RELOADING=1` and `READY=1` again around a SIGHUP reload,
//! `STOPPING=1` when it begins to shut down. Only when `$NOTIFY_SOCKET` is set (systemd's
//! `Type=notify` sets it); otherwise every call does nothing. A message that cannot be sent
//! is logged, never fatal: the daemon serves either way.

use sd_notify::NotifyState;
use tracing::warn;

/// The daemon serves: its listeners are bound and its ready line is printed.
pub(crate) fn ready(status: &str) {
    send(&[NotifyState::Ready, NotifyState::Status(status)]);
}

/// A reload (SIGHUP) begins; [`ready`] follows when it is done, whatever its outcome.
pub(crate) fn reloading() {
    // systemd wants the monotonic time of the reload's start beside RELOADING=1 (253+ uses
    // it to match the reload with the signal; older versions ignore it).
    match NotifyState::monotonic_usec_now() {
        Ok(now) => send(&[NotifyState::Reloading, now]),
        Err(_) => send(&[NotifyState::Reloading]),
    }
}

/// Shutting down: in-flight work is being finished.
pub(crate) fn stopping() {
    send(&[NotifyState::Stopping, NotifyState::Status("stopping")]);
}

fn send(states: &[NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(states) {
        warn!(error = %e, "cannot notify the service manager ($NOTIFY_SOCKET)");
    }
}
