//! One transfer over several connections: the stripes a pull's or a push's chunks are
//! spread over, each a connection to the same server with the object open on it.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use super::Client;
use super::connection::Connection;
use super::pace::{Gate, Pace};
use crate::proto::{Request, TransferId};

/// One connection a transfer's chunks move over, with the object open on it.
pub(super) struct Stripe {
    pub(super) conn: Arc<Connection>,
    pub(super) transfer: TransferId,
    pub(super) gate: Arc<Gate>,
    /// A further stripe's transfer, which [`close_stripes`] ends; none for the attempt's
    /// own (closed or committed by the attempt).
    open: Option<OpenTransfer>,
}

impl Stripe {
    /// The attempt's own connection and transfer.
    pub(super) fn first(conn: &Arc<Connection>, transfer: TransferId, gate: &Arc<Gate>) -> Self {
        Self {
            conn: conn.clone(),
            transfer,
            gate: gate.clone(),
            open: None,
        }
    }
}

impl Client {
    /// A transfer's stripes: the attempt's own, `first`, then more up to `wanted` in all,
    /// each a further connection to the server on which `open` opens the object. A further
    /// connection costs a request, so each takes two of the `chunks` at least. One that
    /// fails to come up, or on which `open` gives no transfer, is left out, and the
    /// transfer goes on over the rest.
    pub(super) async fn stripes<F, Fut>(
        &self,
        first: Stripe,
        chunks: usize,
        wanted: usize,
        pace: &Arc<Pace>,
        open: F,
    ) -> Vec<Stripe>
    where
        F: Fn(Arc<Connection>) -> Fut,
        Fut: Future<Output = Option<TransferId>>,
    {
        let mut stripes = vec![first];
        let wanted = wanted.min(chunks / 2);
        if wanted <= 1 {
            return stripes;
        }
        let more = match self.stripe_connections(wanted - 1).await {
            Ok(c) => c,
            Err(e) => {
                tracing::debug!(error = %e, "striping: a further connection failed; going on with one");
                return stripes;
            }
        };
        for conn in more {
            if let Some(transfer) = open(conn.clone()).await {
                stripes.push(Stripe {
                    gate: Gate::new(pace.clone(), conn.clone()),
                    open: Some(OpenTransfer::new(&conn, transfer)),
                    conn,
                    transfer,
                });
            }
        }
        stripes
    }
}

/// Closes the further stripes' transfers (the attempt ends its own); whether any of their
/// connections became due for renewal.
pub(super) async fn close_stripes(stripes: &[Stripe]) -> bool {
    let mut renewing = false;
    for s in stripes {
        if let Some(open) = &s.open {
            open.close().await;
            renewing |= s.gate.is_renewing();
        }
    }
    renewing
}

/// A transfer the server holds open until we end it or the connection ends. If the future
/// that opened it is dropped before it has ended it (the caller's task was cancelled, or an
/// error returned early), a task of its own sends the `Close`: otherwise a cancelled push
/// would keep its object locked for writing (`Conflict` for the next push of it), and a
/// cancelled pull its place in the connection's transfer table, while the connection lives.
pub(super) struct OpenTransfer {
    conn: Arc<Connection>,
    transfer: TransferId,
    ended: AtomicBool,
}

impl OpenTransfer {
    /// `transfer`, just opened on `conn`.
    pub(super) fn new(conn: &Arc<Connection>, transfer: TransferId) -> Self {
        Self {
            conn: conn.clone(),
            transfer,
            ended: AtomicBool::new(false),
        }
    }

    /// Closes it (best effort, as [`close`]).
    pub(super) async fn close(&self) {
        close(&self.conn, self.transfer).await;
        self.ended();
    }

    /// Says it has been ended otherwise: committed, or closed by a request of the caller's.
    pub(super) fn ended(&self) {
        self.ended.store(true, Ordering::Relaxed);
    }
}

impl Drop for OpenTransfer {
    fn drop(&mut self) {
        if *self.ended.get_mut() {
            return;
        }
        // Without a runtime (its shutdown), the connection is ending anyway.
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            let (conn, transfer) = (self.conn.clone(), self.transfer);
            drop(rt.spawn(async move { close(&conn, transfer).await }));
        }
    }
}

/// Ends a transfer, best effort: the server also ends transfers when the connection ends.
pub(super) async fn close(conn: &Connection, transfer: TransferId) {
    let _ = conn.call(&Request::Close { transfer }).await;
}

/// A striped transfer's id, so the node records its parts as one transfer; none for a
/// transfer over one connection.
pub(super) fn stripe_group(stripes: usize) -> std::io::Result<Option<[u8; 16]>> {
    if stripes <= 1 {
        return Ok(None);
    }
    let mut id = [0u8; 16];
    aws_lc_rs::rand::fill(&mut id)
        .map_err(|_| std::io::Error::other("no randomness for a striped transfer's id"))?;
    Ok(Some(id))
}
