//! [`WorkloadIdentity`]: our credentials, taken from the Workload API and kept current.
//!
//! It waits for the first SVID, publishes it through an [`IdentityHandle`], then follows
//! the agent's stream in a background task: every new SVID or bundle becomes the
//! handle's credentials (new handshakes use them; open connections keep theirs). When the
//! stream breaks it reconnects with a capped, doubling backoff, keeping the last good
//! credentials meanwhile. Dropping the value (or [`WorkloadIdentity::stop`]) ends the
//! task.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use certs::SpiffeId;
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

use super::WorkloadError;
use super::client::{WorkloadClient, X509Updates};
use super::codec::X509Context;
use crate::identity::{Credentials, IdentityHandle};
use crate::proto::retry::Backoff;

/// Our identity as the Workload API issues it, following rotations.
#[derive(Debug)]
pub struct WorkloadIdentity {
    handle: IdentityHandle,
    socket: PathBuf,
    task: JoinHandle<()>,
}

impl WorkloadIdentity {
    /// Connects to the Workload API at `socket` and waits for the first answer holding an
    /// SVID for `want` (any: the agent's default, its first). Fails at once when the agent
    /// is unreachable, refuses us or answers nonsense; if the agent answers without `want`,
    /// it keeps waiting for an answer that has it (wrap the call in a timeout to bound
    /// that).
    pub async fn start(socket: &Path, want: Option<SpiffeId>) -> Result<Self, WorkloadError> {
        let client = WorkloadClient::connect(socket).await?;
        let mut updates = client.watch_x509().await?;
        let creds = loop {
            let ctx = updates.next().await?;
            match credentials(&ctx, want.as_ref()) {
                Ok(c) => break c,
                Err(WorkloadError::NotOffered { want, offered }) => {
                    debug!(want = %want, offered = %offered, "waiting for the SVID asked for");
                }
                Err(e) => return Err(e),
            }
        };
        info!(
            id = %creds.id(),
            serial = %creds.svid().serial(),
            not_after = %humantime::format_rfc3339_seconds(creds.svid().not_after()),
            "identity from the workload API"
        );
        let handle = IdentityHandle::new(creds);
        let task = tokio::spawn(follow(client, updates, want, handle.clone()));
        Ok(Self {
            handle,
            socket: socket.to_path_buf(),
            task,
        })
    }

    /// The handle client and server configurations take; it always holds the newest
    /// credentials.
    pub fn handle(&self) -> &IdentityHandle {
        &self.handle
    }

    /// The credentials new handshakes use now.
    pub fn current(&self) -> Arc<Credentials> {
        self.handle.current()
    }

    /// The socket it follows.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Stops following the agent and waits for the task to end. The handle keeps the last
    /// credentials.
    pub async fn stop(mut self) {
        self.task.abort();
        // An aborted task reports cancellation; there is nothing else it can report.
        let _ = (&mut self.task).await;
    }
}

impl Drop for WorkloadIdentity {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The credentials for `want` (or the default SVID) in `ctx`.
fn credentials(ctx: &X509Context, want: Option<&SpiffeId>) -> Result<Credentials, WorkloadError> {
    let svid = match want {
        Some(id) => ctx.svid(id).ok_or_else(|| WorkloadError::NotOffered {
            want: id.clone(),
            offered: ctx
                .svids
                .iter()
                .map(|s| s.id().as_str())
                .collect::<Vec<_>>()
                .join(", "),
        })?,
        // A decoded context always holds an SVID; an empty one built by hand offers none.
        None => ctx.default_svid().ok_or(WorkloadError::Closed)?,
    };
    Ok(Credentials::new(svid.clone(), ctx.bundle.clone())?)
}

/// Follows the stream until aborted: applies every answer, reconnects when it breaks.
async fn follow(
    client: WorkloadClient,
    first: X509Updates,
    want: Option<SpiffeId>,
    handle: IdentityHandle,
) {
    let mut updates = Some(first);
    let mut backoff = reconnect_backoff();
    loop {
        let mut stream = match updates.take() {
            Some(s) => s,
            None => match client.watch_x509().await {
                Ok(s) => s,
                Err(e) => {
                    let delay = backoff.fail();
                    warn!(
                        error = %e,
                        retry_in_ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX),
                        "workload API unavailable; keeping the current identity"
                    );
                    tokio::time::sleep(delay).await;
                    continue;
                }
            },
        };
        loop {
            match stream.next().await {
                Ok(ctx) => {
                    backoff.reset();
                    apply(&ctx, want.as_ref(), &handle);
                }
                Err(e) => {
                    warn!(error = %e, "workload API stream ended; reconnecting");
                    break;
                }
            }
        }
        tokio::time::sleep(backoff.fail()).await;
    }
}

/// The wait between attempts to reach the agent again: the crate's one doubling backoff, from
/// [`MIN_BACKOFF`] up to [`MAX_BACKOFF`], back to the first after every good answer.
fn reconnect_backoff() -> Backoff {
    Backoff::new(MIN_BACKOFF, MAX_BACKOFF)
}

/// Takes an answer into use if it changes our SVID or bundle.
fn apply(ctx: &X509Context, want: Option<&SpiffeId>, handle: &IdentityHandle) {
    let current = handle.current();
    let creds = match credentials(ctx, want) {
        Ok(c) => c,
        Err(e) => {
            warn!(id = %current.id(), error = %e, "workload API update refused; keeping the current identity");
            return;
        }
    };
    let rotated = creds.svid().serial() != current.svid().serial()
        || creds.svid().chain() != current.svid().chain();
    let bundle_changed = creds.bundle() != current.bundle();
    if !rotated && !bundle_changed {
        return;
    }
    let (id, serial, not_after) = (
        creds.id().clone(),
        creds.svid().serial().to_owned(),
        creds.svid().not_after(),
    );
    let cas = creds.bundle().cas().len();
    handle.update(creds);
    if rotated {
        info!(
            id = %id,
            serial = %serial,
            not_after = %humantime::format_rfc3339_seconds(not_after),
            "identity rotated"
        );
    } else {
        info!(id = %id, cas, "trust bundle updated");
    }
}

/// First wait before reconnecting.
const MIN_BACKOFF: Duration = Duration::from_millis(100);

/// Longest wait between reconnection attempts: SVIDs live an hour or more and are renewed
/// at half-life, so half a minute of delay is harmless, and a restarted agent is found soon.
const MAX_BACKOFF: Duration = Duration::from_secs(30);

#[cfg(test)]
mod tests {
    use certs::test_util::TestPki;

    use super::*;

    #[test]
    fn reconnects_back_off_from_100_ms_doubling_to_30_s() {
        let mut b = reconnect_backoff();
        let ms: Vec<u128> = (0..12).map(|_| b.fail().as_millis()).collect();
        assert_eq!(
            ms,
            [
                100, 200, 400, 800, 1600, 3200, 6400, 12800, 25600, 30000, 30000, 30000
            ]
        );
        b.reset();
        assert_eq!(b.peek(), Duration::from_millis(100));
    }

    #[test]
    fn credentials_pick_the_wanted_svid_or_the_first() {
        let pki = TestPki::new("td.example");
        let ctx = X509Context {
            svids: vec![pki.svid("/a"), pki.svid("/b")],
            bundle: pki.bundle(),
        };
        assert_eq!(credentials(&ctx, None).unwrap().id(), &pki.id("/a"));
        assert_eq!(
            credentials(&ctx, Some(&pki.id("/b"))).unwrap().id(),
            &pki.id("/b")
        );
        let e = credentials(&ctx, Some(&pki.id("/c"))).unwrap_err();
        assert!(
            e.to_string()
                .contains("spiffe://td.example/a, spiffe://td.example/b"),
            "{e}"
        );
    }

    #[test]
    fn apply_updates_only_on_change() {
        let pki = TestPki::new("td.example");
        let first = X509Context {
            svids: vec![pki.svid("/a")],
            bundle: pki.bundle(),
        };
        let handle = IdentityHandle::new(credentials(&first, None).unwrap());
        let before = handle.current();
        apply(&first, None, &handle);
        assert!(
            Arc::ptr_eq(&before, &handle.current()),
            "same answer replaced credentials"
        );
        let rotated = X509Context {
            svids: vec![pki.svid("/a")],
            bundle: pki.bundle(),
        };
        apply(&rotated, None, &handle);
        assert_eq!(handle.current().svid().serial(), rotated.svids[0].serial());
        // An update without the wanted ID keeps the current credentials.
        let other = X509Context {
            svids: vec![pki.svid("/other")],
            bundle: pki.bundle(),
        };
        apply(&other, Some(&pki.id("/a")), &handle);
        assert_eq!(handle.current().svid().serial(), rotated.svids[0].serial());
    }
}
