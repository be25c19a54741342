//! One transfer over several connections: the stripes a pull's or a push's chunks are
//! spread over, each a connection to the same server with the object open on it.

use std::future::Future;
use std::sync::Arc;

use super::Client;
use super::connection::Connection;
use super::pace::{Gate, Pace};
use crate::proto::{Request, TransferId};

/// One connection a transfer's chunks move over, with the object open on it.
pub(super) struct Stripe {
    pub(super) conn: Arc<Connection>,
    pub(super) transfer: TransferId,
    pub(super) gate: Arc<Gate>,
    /// Whether the transfer is the attempt's own (closed or committed by the attempt).
    first: bool,
}

impl Stripe {
    /// The attempt's own connection and transfer.
    pub(super) fn first(conn: &Arc<Connection>, transfer: TransferId, gate: &Arc<Gate>) -> Self {
        Self {
            conn: conn.clone(),
            transfer,
            gate: gate.clone(),
            first: true,
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
                    conn,
                    transfer,
                    first: false,
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
    for s in stripes.iter().filter(|s| !s.first) {
        close(&s.conn, s.transfer).await;
        renewing |= s.gate.is_renewing();
    }
    renewing
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
