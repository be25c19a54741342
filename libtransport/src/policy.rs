//! Authorization: default deny, one decision point for every request.
//!
//! Every request (list, read, write) asks an [`Authorizer`] for a [`Decision`] about an
//! [`Access`]. The decision is pure: no I/O, no clock. [`Policy`] is the engine a node
//! runs: data classes and allow/deny rules from a TOML file (`policy/file.rs`), with the
//! precedence documented in `policy/rules.rs`. [`AccessList`] is a minimal allow-list for
//! embedding. [`EmergencyAccess`] lays an operator's time-bound emergency grants
//! (`policy/emergency.rs`) over any of them. Anything an authorizer does not explicitly
//! allow is denied.

use std::fmt;

use certs::SpiffeId;

use crate::proto::{DatasetName, ObjectPath};

mod emergency;
mod file;
mod rules;

pub use emergency::{EmergencyAccess, EmergencyGrant, EmergencyGrants};
pub use file::PolicyError;
pub use rules::{
    ClassDeclaration, DataClass, Effect, Explanation, MatchedRule, Pattern, Policy, Rule,
    RuleError, Subject,
};

pub use crate::vocab::Action;

/// One access to decide.
#[derive(Debug, Clone, Copy)]
pub struct Access<'a> {
    /// The authenticated peer.
    pub peer: &'a SpiffeId,
    /// What it wants to do.
    pub action: Action,
    /// Which dataset.
    pub dataset: &'a DatasetName,
    /// Which object, if the request names one.
    pub object: Option<&'a ObjectPath>,
}

/// The outcome of a decision, with what decided it (for the audit trail).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(tag = "decision", rename_all = "snake_case")]
pub enum Decision {
    /// Allowed by the named rule.
    Allow {
        /// Which rule allowed it.
        rule: String,
    },
    /// Allowed by an emergency grant the policy itself would not have allowed
    /// ([`EmergencyAccess`]): every such use must reach the audit trail.
    Emergency {
        /// The grant's ID.
        grant: String,
        /// The reason the operator gave for it.
        reason: String,
    },
    /// Denied, and why.
    Deny {
        /// The rule that denied it; none for the default deny.
        rule: Option<String>,
        /// Why; "no rule allows it" for the default.
        reason: String,
    },
}

impl Decision {
    /// True if allowed.
    pub fn is_allow(&self) -> bool {
        matches!(self, Self::Allow { .. } | Self::Emergency { .. })
    }

    /// The rule that allowed or denied it, as records quote it: an emergency grant as
    /// `emergency:<id>`; none for the default deny.
    pub fn rule(&self) -> Option<String> {
        match self {
            Self::Allow { rule } => Some(rule.clone()),
            Self::Emergency { grant, .. } => Some(format!("emergency:{grant}")),
            Self::Deny { rule, .. } => rule.clone(),
        }
    }
}

/// Decides accesses. Implementations must deny anything they do not explicitly allow.
pub trait Authorizer: fmt::Debug + Send + Sync {
    /// Decides one access.
    fn decide(&self, access: &Access<'_>) -> Decision;

    /// The data class the authorizer declares for `dataset`, if any; the audit trail
    /// records it with each decision. None by default.
    fn class_of(&self, dataset: &DatasetName) -> Option<DataClass> {
        let _ = dataset;
        None
    }
}

/// The node config's allow-list: SPIFFE IDs mapped to datasets with read and/or write.
/// Either grant also lets the peer list the dataset.
#[derive(Debug, Clone, Default)]
pub struct AccessList {
    grants: Vec<Grant>,
}

impl AccessList {
    /// An empty list: denies everything.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a grant.
    pub fn grant(&mut self, grant: Grant) -> &mut Self {
        self.grants.push(grant);
        self
    }

    /// The grants, in order.
    pub fn grants(&self) -> &[Grant] {
        &self.grants
    }
}

impl Authorizer for AccessList {
    fn decide(&self, access: &Access<'_>) -> Decision {
        for (i, g) in self.grants.iter().enumerate() {
            if g.peer != *access.peer || g.dataset != *access.dataset {
                continue;
            }
            let allowed = match access.action {
                Action::List => g.read || g.write,
                Action::Read => g.read,
                Action::Write => g.write,
            };
            if allowed {
                return Decision::Allow {
                    rule: format!("access[{i}]"),
                };
            }
        }
        Decision::Deny {
            rule: None,
            reason: "no rule allows it".into(),
        }
    }
}

/// One allow-list entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    /// Who.
    pub peer: SpiffeId,
    /// Which dataset.
    pub dataset: DatasetName,
    /// May read (and list).
    pub read: bool,
    /// May write (and list).
    pub write: bool,
}

#[cfg(test)]
mod policy_tests;

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> SpiffeId {
        SpiffeId::parse(s).unwrap()
    }

    fn ds(s: &str) -> DatasetName {
        DatasetName::new(s).unwrap()
    }

    #[test]
    fn default_deny_and_grants() {
        let loader = id("spiffe://td/gpu/loader");
        let trainer = id("spiffe://td/gpu/trainer");
        let mut acl = AccessList::new();
        acl.grant(Grant {
            peer: loader.clone(),
            dataset: ds("scans"),
            read: true,
            write: false,
        })
        .grant(Grant {
            peer: trainer.clone(),
            dataset: ds("ckpt"),
            read: false,
            write: true,
        });
        let decide = |peer: &SpiffeId, action, d: &str| {
            acl.decide(&Access {
                peer,
                action,
                dataset: &ds(d),
                object: None,
            })
        };
        assert!(decide(&loader, Action::Read, "scans").is_allow());
        assert!(decide(&loader, Action::List, "scans").is_allow());
        assert!(!decide(&loader, Action::Write, "scans").is_allow());
        assert!(!decide(&loader, Action::Read, "ckpt").is_allow());
        assert!(decide(&trainer, Action::Write, "ckpt").is_allow());
        assert!(decide(&trainer, Action::List, "ckpt").is_allow());
        assert!(!decide(&trainer, Action::Read, "ckpt").is_allow());
        // Same path in another trust domain is another identity.
        assert!(!decide(&id("spiffe://other/gpu/loader"), Action::Read, "scans").is_allow());
        assert!(
            !AccessList::new()
                .decide(&Access {
                    peer: &loader,
                    action: Action::List,
                    dataset: &ds("scans"),
                    object: None
                })
                .is_allow()
        );
    }
}
