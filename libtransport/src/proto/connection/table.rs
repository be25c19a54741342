//! A connection's table of open transfers, without I/O: ids handed out in order, never
//! reused on the connection, and at most a limit open at once.
//!
//! The server driver keeps one per connection (`server/conn.rs`): `OpenRead` and
//! `OpenWrite` insert, `Read`, `WriteChunk` and `RdmaOpen` look up, `Close` and `Commit`
//! remove, and the connection's end drains what is left (those transfers were
//! interrupted). A lookup of an id the table does not hold is the peer's mistake and reads
//! as [`ErrorCode::UnknownTransfer`]; a full table reads as [`ErrorCode::Busy`].

use std::collections::HashMap;

use crate::proto::{ErrorCode, TransferId};

/// Open transfers of one connection, each with the caller's state `T`.
#[derive(Debug)]
pub struct TransferTable<T> {
    max: usize,
    /// The last id handed out.
    last: u64,
    open: HashMap<TransferId, T>,
}

/// Why the table refused an operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TableError {
    /// As many transfers are open as the connection may hold.
    #[error("{0} transfers already open on this connection")]
    Full(usize),
    /// No open transfer has this id (never opened, or already closed).
    #[error("no open transfer {0}")]
    Unknown(u64),
}

impl TableError {
    /// The wire code the peer gets.
    pub fn code(self) -> ErrorCode {
        match self {
            Self::Full(_) => ErrorCode::Busy,
            Self::Unknown(_) => ErrorCode::UnknownTransfer,
        }
    }
}

impl From<TableError> for ErrorCode {
    fn from(e: TableError) -> Self {
        e.code()
    }
}

impl<T> TransferTable<T> {
    /// A table holding at most `max` open transfers.
    pub fn new(max: usize) -> Self {
        Self {
            max,
            last: 0,
            open: HashMap::new(),
        }
    }

    /// Whether another transfer may open now.
    pub fn check_room(&self) -> Result<(), TableError> {
        if self.open.len() >= self.max {
            return Err(TableError::Full(self.max));
        }
        Ok(())
    }

    /// Opens a transfer with state `t`: its id, or [`TableError::Full`].
    pub fn insert(&mut self, t: T) -> Result<TransferId, TableError> {
        self.check_room()?;
        self.last += 1;
        let id = TransferId(self.last);
        self.open.insert(id, t);
        Ok(id)
    }

    /// The state of open transfer `id`.
    pub fn get(&self, id: TransferId) -> Result<&T, TableError> {
        self.open.get(&id).ok_or(TableError::Unknown(id.0))
    }

    /// Closes transfer `id`, handing back its state.
    pub fn remove(&mut self, id: TransferId) -> Result<T, TableError> {
        self.open.remove(&id).ok_or(TableError::Unknown(id.0))
    }

    /// Closes every transfer still open (the connection ended), handing back their states.
    pub fn drain(&mut self) -> Vec<T> {
        self.open.drain().map(|(_, t)| t).collect()
    }

    /// Transfers open now.
    pub fn len(&self) -> usize {
        self.open.len()
    }

    /// Whether no transfer is open.
    pub fn is_empty(&self) -> bool {
        self.open.is_empty()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)] // Tests fail loudly.

    use super::*;

    #[test]
    fn ids_are_never_reused_and_closed_transfers_are_unknown() {
        let mut t = TransferTable::new(4);
        let a = t.insert("a").unwrap();
        let b = t.insert("b").unwrap();
        assert_ne!(a, b);
        assert_eq!(t.remove(a), Ok("a"));
        assert_eq!(t.get(a), Err(TableError::Unknown(a.0)));
        assert_eq!(t.remove(a), Err(TableError::Unknown(a.0)));
        let c = t.insert("c").unwrap();
        assert!(c != a && c != b, "an id came back");
        assert_eq!(t.get(b), Ok(&"b"));
        assert_eq!(
            t.get(TransferId(99)).unwrap_err().code(),
            ErrorCode::UnknownTransfer
        );
    }

    #[test]
    fn a_full_table_refuses_with_busy_until_one_closes() {
        let mut t = TransferTable::new(2);
        let a = t.insert(1).unwrap();
        t.insert(2).unwrap();
        assert_eq!(t.check_room(), Err(TableError::Full(2)));
        let e = t.insert(3).unwrap_err();
        assert_eq!(e.code(), ErrorCode::Busy);
        assert_eq!(t.len(), 2);
        t.remove(a).unwrap();
        t.insert(3).unwrap();
        let mut left = t.drain();
        left.sort();
        assert_eq!(left, [2, 3]);
        assert!(t.is_empty());
    }
}
