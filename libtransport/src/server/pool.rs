//! Reusable buffers for the send path: a block read from disk goes to the network as
//! `Bytes` views of one buffer, which comes back here once the last view is dropped (by
//! the TCP writer once written, by QUIC once acknowledged).
//!
//! A buffer taken again is already initialized, so a read overwrites it without zeroing or
//! page faults; only new buffers cost an allocation. What is kept idle is bounded.

use std::sync::{Arc, Mutex, PoisonError, Weak};

use bytes::Bytes;

/// Idle read buffers, shared by a server's connections.
#[derive(Debug, Default)]
pub(crate) struct BufferPool {
    free: Mutex<Free>,
}

#[derive(Debug, Default)]
struct Free {
    bufs: Vec<Vec<u8>>,
    bytes: usize,
}

impl BufferPool {
    /// Fills `len` bytes of a buffer with `read` (which must write all of them) and hands
    /// them out as `Bytes`. The buffer returns to the pool when the last view of it is
    /// dropped, or at once if `read` fails.
    #[cfg(test)]
    pub(crate) fn fill<E>(
        self: &Arc<Self>,
        len: usize,
        read: impl FnOnce(&mut [u8]) -> Result<(), E>,
    ) -> Result<Bytes, E> {
        self.fill_holding(len, read, ())
    }

    /// As [`BufferPool::fill`], and `held` lives as long as the buffer is lent out: a share
    /// of a memory budget, say, given back only when the bytes are gone from memory.
    pub(crate) fn fill_holding<E>(
        self: &Arc<Self>,
        len: usize,
        read: impl FnOnce(&mut [u8]) -> Result<(), E>,
        held: impl Send + 'static,
    ) -> Result<Bytes, E> {
        let mut block = Block {
            buf: self.take(len),
            len,
            pool: Arc::downgrade(self),
            _held: Box::new(held),
        };
        read(&mut block.buf[..len])?;
        Ok(Bytes::from_owner(block))
    }

    /// An initialized buffer of at least `len` bytes: an idle one no more than twice as
    /// large, else a new one of exactly `len`.
    fn take(&self, len: usize) -> Vec<u8> {
        let mut free = self.lock();
        let fits = free
            .bufs
            .iter()
            .rposition(|b| b.len() >= len && b.len() / 2 <= len);
        match fits {
            Some(i) => {
                let buf = free.bufs.swap_remove(i);
                free.bytes -= buf.len();
                buf
            }
            None => {
                drop(free);
                vec![0; len]
            }
        }
    }

    fn give(&self, buf: Vec<u8>) {
        let mut free = self.lock();
        if buf.len() < MIN_POOLED_BYTES || free.bytes + buf.len() > MAX_IDLE_BYTES {
            return;
        }
        free.bytes += buf.len();
        free.bufs.push(buf);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Free> {
        self.free.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// One buffer lent out; its first `len` bytes are the data.
struct Block {
    buf: Vec<u8>,
    len: usize,
    pool: Weak<BufferPool>,
    /// Dropped after the buffer went back to the pool (fields drop after `Drop::drop`).
    _held: Box<dyn Send>,
}

impl AsRef<[u8]> for Block {
    fn as_ref(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

impl Drop for Block {
    fn drop(&mut self) {
        if let Some(pool) = self.pool.upgrade() {
            pool.give(std::mem::take(&mut self.buf));
        }
    }
}

/// Buffers smaller than this are not worth keeping: allocating them is cheap.
const MIN_POOLED_BYTES: usize = 64 << 10;

/// Idle buffers a server keeps at most: enough for the blocks in flight of a few busy
/// connections to be reused, little enough not to matter when idle.
const MAX_IDLE_BYTES: usize = 64 << 20;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_buffer_returns_when_its_last_view_drops_and_is_reused_without_reallocation() {
        let pool = Arc::new(BufferPool::default());
        let bytes = pool
            .fill(1 << 20, |b| {
                b.fill(7);
                Ok::<_, ()>(())
            })
            .unwrap();
        let ptr = bytes.as_ptr();
        let (head, tail) = (bytes.slice(..1000), bytes.slice(1000..));
        drop(bytes);
        drop(head);
        assert_eq!(pool.lock().bufs.len(), 0, "a view is still alive");
        assert!(tail.iter().all(|b| *b == 7));
        drop(tail);
        assert_eq!(pool.lock().bytes, 1 << 20);
        // Reused for a read up to twice smaller, and the old contents are overwritten.
        let again = pool
            .fill(600 << 10, |b| {
                b.fill(9);
                Ok::<_, ()>(())
            })
            .unwrap();
        assert_eq!(again.as_ptr(), ptr);
        assert_eq!(again.len(), 600 << 10);
        assert!(again.iter().all(|b| *b == 9));
        assert_eq!(pool.lock().bufs.len(), 0);
    }

    #[test]
    fn a_failed_read_returns_its_buffer_and_small_or_surplus_buffers_are_not_kept() {
        let pool = Arc::new(BufferPool::default());
        assert_eq!(pool.fill(1 << 20, |_| Err("disk")), Err("disk"));
        assert_eq!(pool.lock().bufs.len(), 1);
        // Too small to keep.
        drop(pool.fill(100, |_| Ok::<_, ()>(())).unwrap());
        assert_eq!(pool.lock().bufs.len(), 1);
        // A buffer more than twice the read's size is not lent for it.
        let small = pool.fill(100 << 10, |_| Ok::<_, ()>(())).unwrap();
        assert_eq!(pool.lock().bufs.len(), 1);
        drop(small);
        assert_eq!(pool.lock().bufs.len(), 2);
        // Idle bytes stay bounded.
        let many: Vec<_> = (0..MAX_IDLE_BYTES / (4 << 20) + 4)
            .map(|_| pool.fill(4 << 20, |_| Ok::<_, ()>(())).unwrap())
            .collect();
        drop(many);
        assert!(pool.lock().bytes <= MAX_IDLE_BYTES);
    }
}
