//! The node's ceiling on object bytes read from disk ahead of the network. Every block a
//! read request reads holds a share of three budgets for as long as it is in memory (until
//! the transport has let go of its last piece: written to the socket, or acknowledged): its connection's (`max_buffered_bytes`), its identity's (a quarter of the
//! node's, shared by that identity's connections) and the node's (`max_memory_bytes`). So
//! peers that ask for reads and never take them hold at most the node's budget in all, and
//! one identity at most a quarter of it, whatever the number of connections; a read past a
//! budget waits until bytes leave.
//!
//! Budgets are counted in KiB, and taken in one order (connection, identity, node), so
//! readers waiting on one another cannot wait in a circle.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError, Weak};

use certs::SpiffeId;
use tokio::sync::{AcquireError, OwnedSemaphorePermit, Semaphore};

/// The node's budget and its identities' shares.
#[derive(Debug)]
pub(crate) struct MemoryBudget {
    node: Arc<Semaphore>,
    #[cfg(test)]
    node_kib: usize,
    share_kib: usize,
    identities: Mutex<HashMap<SpiffeId, Weak<Semaphore>>>,
}

impl MemoryBudget {
    /// A budget of `bytes` for the node, a quarter of it per identity.
    pub(crate) fn new(bytes: u64) -> Self {
        let node_kib = usize::try_from(bytes / 1024)
            .unwrap_or(usize::MAX)
            .min(Semaphore::MAX_PERMITS);
        Self {
            node: Arc::new(Semaphore::new(node_kib)),
            #[cfg(test)]
            node_kib,
            share_kib: (node_kib / 4).max(1),
            identities: Mutex::default(),
        }
    }

    /// The budget `id`'s connections share, made when its first connection needs it and
    /// gone with its last.
    pub(crate) fn identity(&self, id: &SpiffeId) -> Arc<Semaphore> {
        let mut map = self
            .identities
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(s) = map.get(id).and_then(Weak::upgrade) {
            return s;
        }
        // Entries of identities with no connection left go when a new one comes, so the
        // map holds at most the identities connected now, plus one.
        map.retain(|_, w| w.strong_count() > 0);
        let s = Arc::new(Semaphore::new(self.share_kib));
        map.insert(id.clone(), Arc::downgrade(&s));
        s
    }

    /// The node's budget.
    pub(crate) fn node(&self) -> &Arc<Semaphore> {
        &self.node
    }

    /// The most one read block may take: no more than a quarter of an identity's share, so
    /// a read never waits for more than its budgets can ever hold.
    pub(crate) fn max_block_kib(&self) -> usize {
        (self.share_kib / 4).max(1)
    }

    /// KiB held now, node-wide.
    #[cfg(test)]
    pub(crate) fn held_kib(&self) -> usize {
        self.node_kib - self.node.available_permits()
    }
}

/// What one block holds of the three budgets, given back when dropped.
#[derive(Debug)]
pub(crate) struct BlockPermit {
    _conn: OwnedSemaphorePermit,
    _identity: OwnedSemaphorePermit,
    _node: OwnedSemaphorePermit,
}

impl BlockPermit {
    /// Waits for `kib` of each budget, in order: the connection's, the identity's, the
    /// node's.
    pub(crate) async fn acquire(
        conn: &Arc<Semaphore>,
        identity: &Arc<Semaphore>,
        node: &Arc<Semaphore>,
        kib: u32,
    ) -> Result<Self, AcquireError> {
        let conn = conn.clone().acquire_many_owned(kib).await?;
        let identity = identity.clone().acquire_many_owned(kib).await?;
        let node = node.clone().acquire_many_owned(kib).await?;
        Ok(Self {
            _conn: conn,
            _identity: identity,
            _node: node,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(path: &str) -> SpiffeId {
        SpiffeId::parse(&format!("spiffe://hospital.example{path}")).unwrap()
    }

    #[tokio::test]
    async fn an_identity_holds_at_most_a_quarter_and_the_node_at_most_its_budget() {
        let budget = MemoryBudget::new(64 << 20); // 65536 KiB; 16384 per identity
        let conn = Arc::new(Semaphore::new(1 << 20));
        let a = budget.identity(&id("/gpu/a"));
        assert!(
            Arc::ptr_eq(&a, &budget.identity(&id("/gpu/a"))),
            "one share per identity"
        );
        let mut held = Vec::new();
        let block = budget.max_block_kib() as u32;
        while let Ok(Ok(p)) = tokio::time::timeout(
            std::time::Duration::from_millis(20),
            BlockPermit::acquire(&conn, &a, budget.node(), block),
        )
        .await
        {
            held.push(p);
        }
        assert_eq!(held.len() * block as usize, 16384, "identity a's share");
        assert_eq!(budget.held_kib(), 16384);
        // Three more identities take the rest of the node's budget; a fifth gets nothing.
        for who in ["/gpu/b", "/gpu/c", "/gpu/d"] {
            let s = budget.identity(&id(who));
            for _ in 0..4 {
                held.push(
                    BlockPermit::acquire(&conn, &s, budget.node(), block)
                        .await
                        .unwrap(),
                );
            }
        }
        assert_eq!(budget.held_kib(), 65536);
        let e = budget.identity(&id("/gpu/e"));
        {
            let waiting = BlockPermit::acquire(&conn, &e, budget.node(), block);
            tokio::pin!(waiting);
            assert!(
                tokio::time::timeout(std::time::Duration::from_millis(20), &mut waiting)
                    .await
                    .is_err(),
                "the node's budget was exceeded"
            );
            // A block gone from memory gives its bytes back: the waiting read gets them.
            drop(held.remove(0));
            let got = tokio::time::timeout(std::time::Duration::from_secs(5), &mut waiting)
                .await
                .expect("the freed bytes did not reach the waiting read");
            assert!(got.is_ok());
        }
        drop(held);
        // Identities with no budget held left the map once a new one came.
        drop((a, e));
        let _f = budget.identity(&id("/gpu/f"));
        assert!(budget.identities.lock().unwrap().len() <= 1);
    }
}
