//! The hardware completion queue: completions come out as plain structs
//! ([`WorkCompletion`]), and the completion channel's descriptor wakes the async poller
//! through the tokio reactor.

use std::io;
use std::sync::Arc;

use tokio::io::unix::AsyncFd;

use super::sys::{
    self, ChannelFd, CompChannel, Context, Cq, PostKind, WorkCompletion, WorkTag, wc_status,
};
use super::verbs::{Completion, CompletionError, CompletionKind, RemoteAccessError, WorkId};

/// A completion queue with its channel, registered with the tokio reactor.
pub(super) struct CompletionQueue {
    cq: Arc<Cq>,
    fd: AsyncFd<ChannelFd>,
}

impl CompletionQueue {
    /// Creates a queue of `entries` completions. Must run inside a tokio runtime.
    pub(super) fn new(ctx: &Arc<Context>, entries: u32) -> io::Result<Self> {
        let channel = Arc::new(CompChannel::create(ctx)?);
        let cq = Arc::new(Cq::create(ctx, &channel, entries)?);
        let fd = channel.register()?;
        Ok(Self { cq, fd })
    }

    pub(super) fn raw(&self) -> &Arc<Cq> {
        &self.cq
    }

    /// Appends the completions that are there now.
    pub(super) fn poll_into(&self, out: &mut Vec<WorkCompletion>) -> io::Result<()> {
        while self.cq.poll(out, usize::MAX)? > 0 {}
        Ok(())
    }

    /// Asks for a wake-up at the next completion (then poll once more before waiting).
    pub(super) fn arm(&self) -> io::Result<()> {
        self.cq.arm()
    }

    /// Waits for a wake-up and consumes the channel's events.
    pub(super) async fn wait(&self) -> io::Result<()> {
        let mut ready = self.fd.readable().await?;
        while self.cq.take_event()? {}
        ready.clear_ready();
        Ok(())
    }
}

impl std::fmt::Debug for CompletionQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CompletionQueue").finish_non_exhaustive()
    }
}

/// The caller's completion for a work request the device finished.
pub(super) fn completion(tag: WorkTag, wc: &WorkCompletion) -> Completion {
    let status = status(wc);
    let kind = match (tag.kind, &status) {
        (PostKind::WriteImm, _) => CompletionKind::Write,
        (PostKind::Send, _) => CompletionKind::Send,
        (PostKind::Recv, Err(_)) => CompletionKind::Recv { len: 0 },
        (PostKind::Recv, Ok(())) => match wc.imm {
            Some(imm) if wc.opcode == sys::OPCODE_RECV_RDMA_WITH_IMM => {
                CompletionKind::WriteWithImm {
                    imm,
                    len: wc.byte_len,
                }
            }
            _ => CompletionKind::Recv { len: wc.byte_len },
        },
    };
    Completion {
        id: WorkId(tag.id),
        kind,
        status,
    }
}

fn status(wc: &WorkCompletion) -> Result<(), CompletionError> {
    Err(match wc.status {
        wc_status::SUCCESS => return Ok(()),
        wc_status::REM_ACCESS_ERR => CompletionError::RemoteAccess(RemoteAccessError::Unspecified),
        wc_status::RNR_RETRY_EXC_ERR => CompletionError::ReceiverNotReady,
        wc_status::REM_INV_REQ_ERR => CompletionError::RemoteInvalidRequest,
        wc_status::REM_OP_ERR => CompletionError::RemoteOperation,
        wc_status::LOC_LEN_ERR => CompletionError::LocalLength,
        wc_status::LOC_PROT_ERR => CompletionError::LocalProtection,
        wc_status::WR_FLUSH_ERR => CompletionError::Flushed,
        wc_status::RETRY_EXC_ERR => CompletionError::RetryExceeded,
        status => CompletionError::Device {
            status,
            vendor: wc.vendor_err,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_map_to_completion_errors() {
        let tag = |kind| WorkTag { id: 7, kind };
        let ok_imm = sys::test_completion(
            wc_status::SUCCESS,
            sys::OPCODE_RECV_RDMA_WITH_IMM,
            100,
            Some(5),
        );
        assert_eq!(
            completion(tag(PostKind::Recv), &ok_imm).kind,
            CompletionKind::WriteWithImm { imm: 5, len: 100 }
        );
        let ok_recv = sys::test_completion(wc_status::SUCCESS, sys::OPCODE_RECV, 42, None);
        assert_eq!(
            completion(tag(PostKind::Recv), &ok_recv).kind,
            CompletionKind::Recv { len: 42 }
        );
        let flushed = sys::test_completion(wc_status::WR_FLUSH_ERR, 0, 0, None);
        let c = completion(tag(PostKind::WriteImm), &flushed);
        assert_eq!(c.kind, CompletionKind::Write);
        assert_eq!(c.status, Err(CompletionError::Flushed));
        let denied = sys::test_completion(wc_status::REM_ACCESS_ERR, 0, 0, None);
        assert_eq!(
            completion(tag(PostKind::WriteImm), &denied).status,
            Err(CompletionError::RemoteAccess(
                RemoteAccessError::Unspecified
            ))
        );
        let rnr = sys::test_completion(wc_status::RNR_RETRY_EXC_ERR, 0, 0, None);
        assert_eq!(
            completion(tag(PostKind::Send), &rnr).status,
            Err(CompletionError::ReceiverNotReady)
        );
    }
}
