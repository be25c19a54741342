//! Registered memory regions of the hardware device: a region owns its registered buffer
//! (through `sys::Mr`, which deregisters it on drop before freeing it), lends ranges to
//! `with_mut` and to posted work requests, and stays alive while any posted work request
//! holds one of its ranges.

use std::ops::Range;
use std::sync::Arc;

use super::sys;
use super::verbs::{LKey, RKey, Region, RemoteRegion, VerbsError, check_range};

/// A region of a [`HardwareVerbs`](super::hardware::HardwareVerbs) device. Clones share the
/// region; it is deregistered once every clone is dropped and no posted work request uses it.
#[derive(Clone)]
pub struct HardwareRegion {
    pub(super) mr: Arc<sys::Mr>,
    pub(super) len: usize,
}

impl HardwareRegion {
    pub(super) fn register(
        pd: &Arc<sys::ProtectionDomain>,
        len: usize,
    ) -> Result<Self, VerbsError> {
        let mr = sys::Mr::register(pd, len).map_err(|source| VerbsError::Device {
            op: "registering memory (ibv_reg_mr; is RLIMIT_MEMLOCK large enough?)",
            source,
        })?;
        Ok(Self {
            mr: Arc::new(mr),
            len,
        })
    }

    /// Lends `range` out for a work request.
    pub(super) fn lease(&self, range: Range<usize>) -> Result<sys::MrLease, VerbsError> {
        check_range(&range, self.len)?;
        self.mr
            .lease(range)
            .map_err(|sys::Busy| VerbsError::RangeBusy)
    }
}

impl Region for HardwareRegion {
    fn len(&self) -> usize {
        self.len
    }

    fn lkey(&self) -> LKey {
        LKey(self.mr.lkey())
    }

    fn remote(&self) -> RemoteRegion {
        RemoteRegion {
            addr: self.mr.addr(),
            len: self.len as u64,
            rkey: RKey(self.mr.rkey()),
        }
    }

    fn with_mut<R>(
        &self,
        range: Range<usize>,
        f: impl FnOnce(&mut [u8]) -> R,
    ) -> Result<R, VerbsError> {
        check_range(&range, self.len)?;
        self.mr
            .with_range_mut(range, f)
            .map_err(|sys::Busy| VerbsError::RangeBusy)
    }
}

impl std::fmt::Debug for HardwareRegion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the contents or the keys.
        f.debug_struct("HardwareRegion")
            .field("len", &self.len)
            .finish_non_exhaustive()
    }
}
