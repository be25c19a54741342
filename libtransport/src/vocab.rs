//! The crate's shared vocabulary: small enums that the transports, the drivers, the audit
//! trail, the metrics and the policy all speak.
//!
//! A leaf: it imports nothing of the crate, so any module may use it without a cycle. Each
//! type is re-exported where it is documented for users (`transport::Path`,
//! `audit::Direction`, `policy::Action`, ...). The names these types serialize and display
//! as are recorded in audit trails already written; they never change.

use std::fmt;
use std::str::FromStr;

use serde::Serialize;

/// Which transport carries a connection.
///
/// RDMA is not one: it moves a transfer's bytes beside a QUIC connection, so it is a
/// [`TransferPath`] and never a `Path`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Path {
    /// QUIC with mutual TLS 1.3.
    Quic,
    /// TLS 1.3 over TCP, for networks that block UDP.
    Tcp,
}

impl Path {
    /// A lower-case label: `quic` or `tcp`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Quic => "quic",
            Self::Tcp => "tcp",
        }
    }
}

impl fmt::Display for Path {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Path {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "quic" => Ok(Self::Quic),
            "tcp" => Ok(Self::Tcp),
            "rdma" => Err(
                "rdma is not a connection path: connect over quic and enable RDMA for transfers"
                    .into(),
            ),
            other => Err(format!("unknown path {other:?}: expected quic or tcp")),
        }
    }
}

/// Which way a transfer's bytes moved: over its connection's transport, or by RDMA beside
/// a QUIC connection. What reports, audit records and metrics name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum TransferPath {
    /// Over a QUIC connection.
    Quic,
    /// Over a TLS/TCP connection.
    Tcp,
    /// RDMA for the bulk data (each chunk sealed with AES-256-GCM under keys from the TLS
    /// session), the QUIC connection for control.
    Rdma,
}

impl TransferPath {
    /// A lower-case label: `quic`, `tcp` or `rdma`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Quic => "quic",
            Self::Tcp => "tcp",
            Self::Rdma => "rdma",
        }
    }
}

impl From<Path> for TransferPath {
    fn from(path: Path) -> Self {
        match path {
            Path::Quic => Self::Quic,
            Path::Tcp => Self::Tcp,
        }
    }
}

impl fmt::Display for TransferPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for TransferPath {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "quic" => Ok(Self::Quic),
            "tcp" => Ok(Self::Tcp),
            "rdma" => Ok(Self::Rdma),
            other => Err(format!(
                "unknown path {other:?}: expected quic, tcp or rdma"
            )),
        }
    }
}

/// Which way bytes moved, seen from the node writing the record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Direction {
    /// Bytes left this node (we served a read or pushed).
    Out,
    /// Bytes arrived (we accepted a write or pulled).
    In,
}

/// How a transfer ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Every byte moved and verified (for writes: committed durably).
    Complete,
    /// Closed before completion; an uncommitted write keeps its verified chunks.
    Incomplete,
    /// The connection ended with the transfer open.
    Interrupted,
    /// Verification failed.
    Corrupt,
    /// Another failure.
    Failed,
}

/// An authorization outcome, for the trail.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DecisionKind {
    /// Allowed.
    Allow,
    /// Denied.
    Deny,
}

/// What a peer wants to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    /// See that a dataset exists and list its objects.
    List,
    /// Read objects (stat, open, read).
    Read,
    /// Create or replace objects.
    Write,
}

impl Action {
    /// A lower-case label.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::List => "list",
            Self::Read => "read",
            Self::Write => "write",
        }
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)] // Tests fail loudly.

    use super::*;

    fn json<T: Serialize>(v: T) -> String {
        serde_json::to_string(&v).unwrap()
    }

    /// The names audit trails already written carry: changing one breaks their readers.
    #[test]
    fn serialized_names_are_unchanged() {
        for (p, name) in [(Path::Quic, "quic"), (Path::Tcp, "tcp")] {
            assert_eq!(json(p), format!("\"{name}\""));
            assert_eq!(p.to_string(), name);
            assert_eq!(p.as_str(), name);
            assert_eq!(name.parse::<Path>(), Ok(p));
            assert_eq!(json(TransferPath::from(p)), json(p));
            assert_eq!(TransferPath::from(p).to_string(), name);
        }
        let transfer = [
            (TransferPath::Quic, "quic"),
            (TransferPath::Tcp, "tcp"),
            (TransferPath::Rdma, "rdma"),
        ];
        for (p, name) in transfer {
            assert_eq!(json(p), format!("\"{name}\""));
            assert_eq!(p.to_string(), name);
            assert_eq!(p.as_str(), name);
            assert_eq!(name.parse::<TransferPath>(), Ok(p));
        }
        for (d, name) in [(Direction::Out, "out"), (Direction::In, "in")] {
            assert_eq!(json(d), format!("\"{name}\""));
        }
        let outcomes = [
            (Outcome::Complete, "complete"),
            (Outcome::Incomplete, "incomplete"),
            (Outcome::Interrupted, "interrupted"),
            (Outcome::Corrupt, "corrupt"),
            (Outcome::Failed, "failed"),
        ];
        for (o, name) in outcomes {
            assert_eq!(json(o), format!("\"{name}\""));
        }
        for (d, name) in [(DecisionKind::Allow, "allow"), (DecisionKind::Deny, "deny")] {
            assert_eq!(json(d), format!("\"{name}\""));
        }
        let actions = [
            (Action::List, "list"),
            (Action::Read, "read"),
            (Action::Write, "write"),
        ];
        for (a, name) in actions {
            assert_eq!(json(a), format!("\"{name}\""));
            assert_eq!(a.to_string(), name);
            assert_eq!(a.as_str(), name);
            let back: Action = serde_json::from_str(&json(a)).unwrap();
            assert_eq!(back, a);
        }
    }

    #[test]
    fn rdma_parses_as_a_transfer_path_only() {
        assert_eq!("rdma".parse::<TransferPath>(), Ok(TransferPath::Rdma));
        let err = "rdma".parse::<Path>().unwrap_err();
        assert!(err.contains("not a connection path"), "{err}");
        assert!("udp".parse::<Path>().is_err());
        assert!("udp".parse::<TransferPath>().is_err());
    }
}
