//! Running a transfer in attempts: the one retry and renewal loop of pulls and pushes.
//!
//! [`run`] calls an attempt until it completes, deciding after each one that did not (with
//! [`after_attempt`], so by the crate's one [`RetryPolicy`](crate::proto::retry::RetryPolicy))
//! whether to go on at once over a renewed connection, to wait and retry, or to give up. What
//! an attempt does, and what it keeps for the next one, stays with its caller; this file only
//! counts, logs and sleeps.

use std::fmt::Display;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use super::connection::Connection;
use crate::error::{ConnectError, FetchError, LostReason, PushError};
use crate::proto::retry::{AttemptEnd, Attempts, MAX_STALLED_RENEWALS, Next, RetryPolicy};

/// Which transfer runs, for its log lines.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Kind {
    /// A pull into a file.
    Pull,
    /// A pull into memory (a whole object or a range).
    Read,
    /// A push.
    Push,
}

impl Kind {
    /// Logs that the transfer goes on over a renewed connection.
    fn renewed(self) {
        match self {
            Self::Pull => tracing::info!("pull goes on over a renewed connection"),
            Self::Read => tracing::debug!("read goes on over a renewed connection"),
            Self::Push => tracing::info!("push goes on over a renewed connection"),
        }
    }

    /// Logs that the transfer failed with `error` and retries (`attempt`: failures so far).
    fn retrying(self, error: &dyn Display, attempt: u32) {
        match self {
            Self::Pull => tracing::warn!(error = %error, attempt, "pull interrupted; resuming"),
            // Reads retry without a log line; the error reaches the caller if they run out.
            Self::Read => {}
            Self::Push => tracing::warn!(error = %error, attempt, "push interrupted; resuming"),
        }
    }
}

/// How one attempt of a transfer ended, when not with an error.
#[derive(Debug)]
pub(super) enum Attempt<T> {
    /// The transfer is complete.
    Done(T),
    /// The connection became due for renewal between chunks: the chunks in flight finished,
    /// the others wait for the next attempt, on a fresh connection.
    Renew,
}

/// How one attempt ended: the state it hands on, the connection it used (none if it got
/// none) and its result.
#[derive(Debug)]
pub(super) struct Ran<S, T, E> {
    pub(super) state: S,
    pub(super) used: Option<Arc<Connection>>,
    pub(super) result: Result<Attempt<T>, E>,
}

/// A transfer's outcome, the state its last attempt handed on, and the failures it took
/// (what its report calls retries).
#[derive(Debug)]
pub(super) struct Done<S, T> {
    pub(super) value: T,
    pub(super) state: S,
    pub(super) retries: u32,
}

/// An error a transfer may retry.
pub(super) trait Retriable: Display + From<ConnectError> {
    /// Whether the error may pass (a network failure, a busy server).
    fn is_retriable(&self) -> bool;
}

impl Retriable for FetchError {
    fn is_retriable(&self) -> bool {
        Self::is_retriable(self)
    }
}

impl Retriable for PushError {
    fn is_retriable(&self) -> bool {
        Self::is_retriable(self)
    }
}

/// Runs attempts of a `kind` transfer under `policy` until one completes or the policy gives
/// up. Each attempt takes `state` (what earlier attempts kept: chunks verified, a partial
/// file) and hands it on in its [`Ran`], with the connection it used, so that a failure on a
/// connection whose credentials ended counts as a renewal. `progress` is the transfer's bytes
/// moved so far, across attempts. On giving up it returns the last attempt's error, or, if
/// the last attempt ended for a renewal, [`renewals_stalled`].
///
/// The state moves through by value, rather than the attempt borrowing it, so the transfer's
/// future stays `Send` (a closure handing out borrows of its captures would need
/// higher-ranked lifetimes, for which the compiler cannot prove `Send`).
pub(super) async fn run<S, T, E, Fut>(
    kind: Kind,
    policy: RetryPolicy,
    progress: &AtomicU64,
    mut state: S,
    mut attempt: impl FnMut(S) -> Fut,
) -> Result<Done<S, T>, E>
where
    E: Retriable,
    Fut: Future<Output = Ran<S, T, E>>,
{
    let mut attempts = Attempts::new(policy);
    loop {
        let ran = attempt(state).await;
        state = ran.state;
        let error = match ran.result {
            Ok(Attempt::Done(value)) => {
                return Ok(Done {
                    value,
                    state,
                    retries: attempts.failures(),
                });
            }
            Ok(Attempt::Renew) => None,
            Err(e) => Some(e),
        };
        match after_attempt(
            &mut attempts,
            error.as_ref().map(E::is_retriable),
            ran.used.as_deref(),
            progress.load(Ordering::Relaxed),
        ) {
            Next::Renew => kind.renewed(),
            Next::Retry(delay) => {
                if let Some(e) = &error {
                    kind.retrying(e, attempts.failures());
                }
                tokio::time::sleep(delay).await;
            }
            Next::GiveUp => return Err(error.unwrap_or_else(|| renewals_stalled().into())),
        }
    }
}

/// Decides what a transfer does after an attempt that ended for a renewal (`failed` none)
/// or failed (`failed`: whether its error is retriable). A retriable failure on a connection
/// that ended with its credentials, or that the server retired (`used`), counts as a renewal
/// too.
fn after_attempt(
    attempts: &mut Attempts,
    failed: Option<bool>,
    used: Option<&Connection>,
    progress: u64,
) -> Next {
    let end = match failed {
        None => AttemptEnd::Renewal,
        Some(retriable) => AttemptEnd::Failed {
            retriable,
            connection_retired: used.is_some_and(Connection::ended_for_renewal),
        },
    };
    attempts.next(end, progress)
}

/// The error of a transfer whose connections kept needing renewal without progress.
fn renewals_stalled() -> ConnectError {
    ConnectError::Lost(LostReason::RenewalsStalled(MAX_STALLED_RENEWALS))
}
