//! The software device's regions: registration with random keys and addresses, the table an
//! incoming write looks its rkey up in, and [`Lease`], the owned loan of a range.

use std::collections::{HashMap, HashSet};
use std::ops::{Deref, DerefMut, Range};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};

use bytes::BytesMut;

use super::memory::Memory;
use crate::transport::rdma::verbs::{LKey, RKey, VerbsError};

/// Where soft regions' addresses start: far from 0, so an offset is never mistaken for an
/// address.
const ADDR_BASE: u64 = 1 << 32;

/// Addresses are drawn below `ADDR_BASE + ADDR_SPAN`; with regions of at most 1 GiB and
/// `u64` arithmetic nothing overflows.
const ADDR_SPAN: u64 = 1 << 46;

/// A registered region.
pub(crate) struct RegionInner {
    /// The device that registered it.
    pub(crate) device: u64,
    pub(crate) lkey: LKey,
    pub(crate) rkey: RKey,
    /// The address the peer writes to (an opaque number, like a virtual address).
    pub(crate) addr: u64,
    pub(crate) memory: Memory,
    table: Weak<RegionTable>,
}

impl RegionInner {
    /// The offset of `len` bytes at the peer-given `addr`, if they lie within this region.
    pub(crate) fn offset_of(&self, addr: u64, len: u64) -> Option<Range<usize>> {
        let start = addr.checked_sub(self.addr)?;
        let end = start.checked_add(len)?;
        if end > self.memory.len() as u64 {
            return None;
        }
        Some(usize::try_from(start).ok()?..usize::try_from(end).ok()?)
    }
}

impl Drop for RegionInner {
    fn drop(&mut self) {
        // Deregister: from now on the rkey is unknown to incoming writes.
        if let Some(table) = self.table.upgrade() {
            table.remove(self.rkey, self.memory.len());
        }
    }
}

impl std::fmt::Debug for RegionInner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegionInner")
            .field("len", &self.memory.len())
            .field("lkey", &self.lkey)
            .finish_non_exhaustive()
    }
}

/// A device's regions by rkey, and its budget of registered bytes.
#[derive(Debug)]
pub(crate) struct RegionTable {
    max_region_bytes: usize,
    max_total_bytes: usize,
    inner: Mutex<TableInner>,
}

#[derive(Debug, Default)]
struct TableInner {
    /// Live regions by rkey, with their lkey.
    by_rkey: HashMap<u32, (Weak<RegionInner>, u32)>,
    lkeys: HashSet<u32>,
    bytes: usize,
}

impl RegionTable {
    pub(crate) fn new(max_region_bytes: usize, max_total_bytes: usize) -> Arc<Self> {
        Arc::new(Self {
            max_region_bytes,
            max_total_bytes,
            inner: Mutex::new(TableInner::default()),
        })
    }

    /// Registers a zeroed region of `len` bytes with fresh random keys and address.
    pub(crate) fn register(
        self: &Arc<Self>,
        device: u64,
        len: usize,
    ) -> Result<Arc<RegionInner>, VerbsError> {
        if len > self.max_region_bytes {
            return Err(VerbsError::RegionTooLarge {
                len,
                max: self.max_region_bytes,
            });
        }
        let mut inner = self.lock();
        if inner.bytes.saturating_add(len) > self.max_total_bytes {
            return Err(VerbsError::MemoryLimit {
                len,
                max: self.max_total_bytes,
            });
        }
        let (rkey, lkey) = loop {
            let [r0, r1, r2, r3, l0, l1, l2, l3] = super::random::<8>()?;
            let rkey = u32::from_be_bytes([r0, r1, r2, r3]);
            let lkey = u32::from_be_bytes([l0, l1, l2, l3]);
            if rkey != 0
                && lkey != 0
                && !inner.by_rkey.contains_key(&rkey)
                && !inner.lkeys.contains(&lkey)
            {
                break (RKey(rkey), LKey(lkey));
            }
        };
        let addr = ADDR_BASE + ((u64::from_be_bytes(super::random::<8>()?) % ADDR_SPAN) & !0xfff);
        let region = Arc::new(RegionInner {
            device,
            lkey,
            rkey,
            addr,
            memory: Memory::zeroed(len),
            table: Arc::downgrade(self),
        });
        inner
            .by_rkey
            .insert(rkey.0, (Arc::downgrade(&region), lkey.0));
        inner.lkeys.insert(lkey.0);
        inner.bytes += len;
        Ok(region)
    }

    /// The live region with this rkey.
    pub(crate) fn lookup(&self, rkey: RKey) -> Option<Arc<RegionInner>> {
        self.lock().by_rkey.get(&rkey.0)?.0.upgrade()
    }

    fn remove(&self, rkey: RKey, len: usize) {
        let mut inner = self.lock();
        if let Some((_, lkey)) = inner.by_rkey.remove(&rkey.0) {
            inner.lkeys.remove(&lkey);
        }
        inner.bytes = inner.bytes.saturating_sub(len);
    }

    fn lock(&self) -> MutexGuard<'_, TableInner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// An exclusive loan of a region's range. It keeps the region alive (and registered) and
/// gives the range back when dropped.
pub(crate) struct Lease {
    region: Arc<RegionInner>,
    start: usize,
    buf: BytesMut,
}

impl Lease {
    /// Borrows `range` of `region`, or `None` if any of it is held (or out of bounds).
    pub(crate) fn take(region: &Arc<RegionInner>, range: Range<usize>) -> Option<Self> {
        let start = range.start;
        let buf = region.memory.take(range)?;
        Some(Self {
            region: Arc::clone(region),
            start,
            buf,
        })
    }
}

impl Deref for Lease {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        &self.buf
    }
}

impl DerefMut for Lease {
    fn deref_mut(&mut self) -> &mut [u8] {
        &mut self.buf
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        let buf = std::mem::take(&mut self.buf);
        self.region.memory.give_back(self.start, buf);
    }
}

impl std::fmt::Debug for Lease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lease")
            .field("start", &self.start)
            .field("len", &self.buf.len())
            .finish_non_exhaustive()
    }
}
