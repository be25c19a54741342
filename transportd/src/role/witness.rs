//! Sends the node's audit checkpoints to its witness (the issuer by default): the sink
//! queues each checkpoint it writes ([`WitnessQueue`]), this task sends what waits, oldest
//! first, whenever the witness answers, and keeps the countersigned receipts beside the trail
//! in `witness.jsonl`. It never blocks a transfer: a witness that is down only makes the
//! queue wait (bounded; the newest checkpoints are kept, and each vouches for every record
//! before it), which `/metrics` and `/readyz` report.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::time::Duration;

use libtransport::IdentityHandle;
use libtransport::audit::{Receipt, WitnessQueue};
use tracing::{debug, error, info, warn};

use crate::role::agent::IssuerClient;
use crate::role::issuer::wire::{MAX_WITNESS_BATCH, WitnessAnswer, WitnessRequest};

/// The sender.
#[derive(Debug)]
pub(crate) struct Witness {
    pub(crate) client: IssuerClient,
    pub(crate) identity: IdentityHandle,
    pub(crate) queue: WitnessQueue,
    /// The trail's directory: receipts go to `witness.jsonl` in it.
    pub(crate) dir: PathBuf,
}

impl Witness {
    /// Sends whatever waits, until the task is dropped.
    pub(crate) async fn run(self: std::sync::Arc<Self>) {
        let mut failing = false;
        loop {
            if !self.queue.waiting().is_empty() {
                match self.send().await {
                    Ok(()) if failing => {
                        info!(witness = %self.client.addr, "audit witness reachable again");
                        failing = false;
                    }
                    Ok(()) => {}
                    Err(e) if !failing => {
                        warn!(witness = %self.client.addr, error = %e, "audit checkpoints wait for the witness");
                        failing = true;
                    }
                    Err(e) => debug!(error = %e, "audit witness still unreachable"),
                }
            }
            tokio::time::sleep(if failing { RETRY } else { TICK }).await;
        }
    }

    /// One last attempt at shutdown, bounded by `limit`.
    pub(crate) async fn flush(&self, limit: Duration) {
        if self.queue.waiting().is_empty() {
            return;
        }
        match tokio::time::timeout(limit, self.send()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => warn!(error = %e, "the last audit checkpoints were not witnessed"),
            Err(_) => warn!("the audit witness did not answer in time at shutdown"),
        }
    }

    async fn send(&self) -> Result<(), String> {
        let mut checkpoints = self.queue.waiting();
        if checkpoints.len() > MAX_WITNESS_BATCH {
            checkpoints.drain(..checkpoints.len() - MAX_WITNESS_BATCH);
        }
        let creds = self.identity.current();
        let answer: WitnessAnswer = match self
            .client
            .call(
                creds.bundle(),
                Some(creds.svid()),
                "/v1/witness",
                &WitnessRequest {
                    checkpoints: checkpoints.clone(),
                },
            )
            .await
        {
            Ok(a) => a,
            Err(e) => {
                self.queue.unreachable(e.to_string());
                return Err(e.to_string());
            }
        };
        let mut keep = Vec::new();
        for r in answer.receipts {
            // A receipt counts only if it is for what was sent and the witness's signature
            // and certificate verify.
            let sent = checkpoints.iter().any(|c| *c == r.checkpoint());
            match r.verify(Some(creds.bundle())) {
                Ok(()) if sent && r.node == *creds.id() => {
                    self.queue.witnessed(r.seq);
                    keep.push(r);
                }
                Ok(()) => error!(
                    seq = r.seq,
                    "the witness answered for a checkpoint not sent"
                ),
                Err(e) => error!(seq = r.seq, error = %e, "the witness's receipt does not verify"),
            }
        }
        for r in answer.refused {
            error!(seq = r.seq, reason = %r.reason, "the witness refused an audit checkpoint: the trail was rewritten or cut back after it was witnessed");
            self.queue.refused(r.seq, r.reason);
        }
        if let Err(e) = self.keep(&keep) {
            warn!(error = %e, "witness receipts not kept beside the trail");
        }
        Ok(())
    }

    /// Appends receipts to `witness.jsonl` (mode 0600).
    fn keep(&self, receipts: &[Receipt]) -> std::io::Result<()> {
        if receipts.is_empty() {
            return Ok(());
        }
        let mut text = Vec::new();
        for r in receipts {
            serde_json::to_writer(&mut text, r)?;
            text.push(b'\n');
        }
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(self.dir.join(RECEIPTS_FILE))?
            .write_all(&text)
    }
}

/// The receipts, beside the trail.
pub(crate) const RECEIPTS_FILE: &str = "witness.jsonl";
/// How often the queue is looked at.
const TICK: Duration = Duration::from_millis(500);
/// How soon an unreachable witness is tried again.
const RETRY: Duration = Duration::from_secs(2);
