//! Emergency access (break-glass, 45 CFR 164.312(a)(2)(ii)): grants an operator gives one
//! peer for one dataset, for a bounded time, over whatever the policy says.
//!
//! [`EmergencyAccess`] is an [`Authorizer`] layered over the node's policy: it asks the
//! policy first, and only if the policy denies does it look for an active grant that
//! covers the access, which then allows it with [`Decision::Emergency`] naming the grant.
//! A grant overrides deny rules too (that is what breaking the glass means); what it
//! allows is exactly what it names: its peer (one SPIFFE ID, no wildcards), its dataset,
//! `read` and `list` (listing is implied, as for the node config's `[[allow]]` entries),
//! `write` only if granted, and, with an object prefix, only objects under it (requests
//! that name no object, such as listing, are then not covered, as for object-scoped
//! rules).
//!
//! Expiry is judged by the clock at every decision, so a grant can never be used past
//! its time, whoever is or is not watching; [`EmergencyGrants::take_expired`] hands the
//! grants whose time has passed to whoever records their expiry. Grants here live in
//! memory; the daemon persists them and writes their audit records.

use std::fmt;
use std::sync::{Arc, PoisonError, RwLock};
use std::time::{Duration, SystemTime};

use certs::SpiffeId;
use serde::{Deserialize, Serialize};

use super::{Access, Authorizer, Decision};
use crate::clock::Clock;
use crate::proto::DatasetName;
use crate::vocab::Action;

/// One emergency grant.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EmergencyGrant {
    /// Its ID, unique on the node; decisions and records name it.
    pub id: String,
    /// The one peer it is for.
    pub peer: SpiffeId,
    /// The one dataset it is for.
    pub dataset: DatasetName,
    /// Whether it allows writes too (it always allows read and list).
    pub write: bool,
    /// If set, only objects whose path is this prefix or below it (`a/b` covers `a/b` and
    /// `a/b/c`, not `a/bc`; a prefix ending in `/` covers what starts with it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub object_prefix: Option<String>,
    /// Why, as the operator gave it.
    pub reason: String,
    /// When it was given.
    pub granted_at: SystemTime,
    /// When it stops allowing anything. Approval does not move it.
    pub expires_at: SystemTime,
    /// The user ID of the operator who gave it.
    pub granted_by: u32,
    /// Whether it waits for a second operator's approval (allowing nothing meanwhile).
    pub pending: bool,
    /// The user ID of the operator who approved it, if it needed approval.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub approved_by: Option<u32>,
}

impl EmergencyGrant {
    /// The actions it allows, for records and listings.
    pub fn actions(&self) -> Vec<Action> {
        if self.write {
            vec![Action::List, Action::Read, Action::Write]
        } else {
            vec![Action::List, Action::Read]
        }
    }

    /// True while it allows what it names: approved (or needing no approval) and before
    /// its expiry.
    pub fn is_active(&self, now: SystemTime) -> bool {
        !self.pending && now < self.expires_at
    }

    /// True if it is active at `now` and names this access exactly.
    pub fn covers(&self, access: &Access<'_>, now: SystemTime) -> bool {
        if !self.is_active(now) || self.peer != *access.peer || self.dataset != *access.dataset {
            return false;
        }
        let action = match access.action {
            Action::List | Action::Read => true,
            Action::Write => self.write,
        };
        action
            && match &self.object_prefix {
                None => true,
                Some(prefix) => access
                    .object
                    .is_some_and(|o| under_prefix(o.as_str(), prefix)),
            }
    }

    /// Time left at `now` (zero once expired).
    pub fn remaining(&self, now: SystemTime) -> Duration {
        self.expires_at.duration_since(now).unwrap_or_default()
    }
}

/// The grants a node holds, shared between the authorizer and whoever changes them.
#[derive(Debug, Default)]
pub struct EmergencyGrants {
    grants: RwLock<Vec<EmergencyGrant>>,
}

impl EmergencyGrants {
    /// No grants.
    pub fn new() -> Self {
        Self::default()
    }

    /// Grants as loaded (from the node's file, at start).
    pub fn with(grants: Vec<EmergencyGrant>) -> Self {
        Self {
            grants: RwLock::new(grants),
        }
    }

    /// Every grant held, pending, active or expired but not yet taken, in grant order.
    pub fn list(&self) -> Vec<EmergencyGrant> {
        self.read().clone()
    }

    /// The grant `id`, if held.
    pub fn get(&self, id: &str) -> Option<EmergencyGrant> {
        self.read().iter().find(|g| g.id == id).cloned()
    }

    /// How many grants allow something at `now`.
    pub fn active(&self, now: SystemTime) -> usize {
        self.read().iter().filter(|g| g.is_active(now)).count()
    }

    /// Adds a grant. Refused (returns false) if its ID is taken.
    pub fn insert(&self, grant: EmergencyGrant) -> bool {
        let mut all = self.write();
        if all.iter().any(|g| g.id == grant.id) {
            return false;
        }
        all.push(grant);
        true
    }

    /// Replaces the grant with `grant`'s ID, if held; returns the one it replaced.
    pub fn replace(&self, grant: EmergencyGrant) -> Option<EmergencyGrant> {
        let mut all = self.write();
        let slot = all.iter_mut().find(|g| g.id == grant.id)?;
        Some(std::mem::replace(slot, grant))
    }

    /// Removes the grant `id`, if held.
    pub fn remove(&self, id: &str) -> Option<EmergencyGrant> {
        let mut all = self.write();
        let i = all.iter().position(|g| g.id == id)?;
        Some(all.remove(i))
    }

    /// The grants whose expiry is at or before `now`, without removing them: the caller
    /// records each expiry, then [`EmergencyGrants::remove`]s it, so a record that cannot
    /// be written is tried again (the grant allows nothing meanwhile).
    pub fn expired(&self, now: SystemTime) -> Vec<EmergencyGrant> {
        self.read()
            .iter()
            .filter(|g| g.expires_at <= now)
            .cloned()
            .collect()
    }

    /// The first active grant covering `access` at `now`.
    pub fn covering(&self, access: &Access<'_>, now: SystemTime) -> Option<EmergencyGrant> {
        self.read().iter().find(|g| g.covers(access, now)).cloned()
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Vec<EmergencyGrant>> {
        self.grants.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Vec<EmergencyGrant>> {
        self.grants.write().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The policy with emergency grants over it: the policy decides first; an access it denies
/// is allowed if an active grant covers it, deny rules included.
pub struct EmergencyAccess {
    policy: Arc<dyn Authorizer>,
    grants: Arc<EmergencyGrants>,
    clock: Arc<dyn Clock>,
}

impl EmergencyAccess {
    /// `policy` with `grants` over it, expiry judged by `clock`.
    pub fn new(
        policy: Arc<dyn Authorizer>,
        grants: Arc<EmergencyGrants>,
        clock: Arc<dyn Clock>,
    ) -> Self {
        Self {
            policy,
            grants,
            clock,
        }
    }

    /// The policy underneath.
    pub fn policy(&self) -> &Arc<dyn Authorizer> {
        &self.policy
    }
}

impl fmt::Debug for EmergencyAccess {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EmergencyAccess")
            .field("policy", &self.policy)
            .field("grants", &self.grants.read().len())
            .finish_non_exhaustive()
    }
}

impl Authorizer for EmergencyAccess {
    fn decide(&self, access: &Access<'_>) -> Decision {
        let decision = self.policy.decide(access);
        if decision.is_allow() {
            return decision;
        }
        match self.grants.covering(access, self.clock.now()) {
            Some(g) => Decision::Emergency {
                grant: g.id,
                reason: g.reason,
            },
            None => decision,
        }
    }

    fn class_of(&self, dataset: &DatasetName) -> Option<super::DataClass> {
        self.policy.class_of(dataset)
    }
}

fn under_prefix(object: &str, prefix: &str) -> bool {
    if prefix.ends_with('/') {
        object.starts_with(prefix)
    } else {
        object
            .strip_prefix(prefix)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::Policy;
    use crate::proto::ObjectPath;
    use crate::test_util::ManualClock;

    const POLICY: &str = r#"
[[rule]]
name = "loader reads scans"
subjects = ["spiffe://td/gpu/loader"]
datasets = ["scans"]
actions = ["list", "read"]

[[rule]]
name = "nobody reads notes"
effect = "deny"
subjects = ["*"]
datasets = ["notes"]
actions = ["list", "read", "write"]
"#;

    fn id(s: &str) -> SpiffeId {
        SpiffeId::parse(s).unwrap()
    }

    fn ds(s: &str) -> DatasetName {
        DatasetName::new(s).unwrap()
    }

    fn grant(id: &str, peer: &str, dataset: &str, start: SystemTime) -> EmergencyGrant {
        EmergencyGrant {
            id: id.into(),
            peer: SpiffeId::parse(peer).unwrap(),
            dataset: ds(dataset),
            write: false,
            object_prefix: None,
            reason: "patient in resus".into(),
            granted_at: start,
            expires_at: start + Duration::from_secs(4 * 3600),
            granted_by: 1000,
            pending: false,
            approved_by: None,
        }
    }

    struct Fixture {
        clock: Arc<ManualClock>,
        grants: Arc<EmergencyGrants>,
        access: EmergencyAccess,
        start: SystemTime,
    }

    fn fixture() -> Fixture {
        let start = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let clock = Arc::new(ManualClock::new(start));
        let grants = Arc::new(EmergencyGrants::new());
        let access = EmergencyAccess::new(
            Arc::new(Policy::parse(POLICY).unwrap()),
            grants.clone(),
            clock.clone(),
        );
        Fixture {
            clock,
            grants,
            access,
            start,
        }
    }

    fn decide(
        a: &EmergencyAccess,
        peer: &str,
        action: Action,
        d: &str,
        o: Option<&str>,
    ) -> Decision {
        let object = o.map(|o| ObjectPath::new(o).unwrap());
        a.decide(&Access {
            peer: &id(peer),
            action,
            dataset: &ds(d),
            object: object.as_ref(),
        })
    }

    const TRAINER: &str = "spiffe://td/gpu/trainer";
    const LOADER: &str = "spiffe://td/gpu/loader";

    #[test]
    fn a_grant_allows_exactly_what_it_names_and_nothing_else() {
        let f = fixture();
        let a = &f.access;
        // Before the grant: default deny.
        assert!(!decide(a, TRAINER, Action::Read, "ckpt", Some("x")).is_allow());
        assert!(f.grants.insert(grant("g1", TRAINER, "ckpt", f.start)));
        assert_eq!(
            decide(a, TRAINER, Action::Read, "ckpt", Some("x")),
            Decision::Emergency {
                grant: "g1".into(),
                reason: "patient in resus".into()
            }
        );
        assert!(decide(a, TRAINER, Action::List, "ckpt", None).is_allow());
        // Not writes, not another dataset, not another peer (nor one below its path, nor
        // the same path in another trust domain).
        assert!(!decide(a, TRAINER, Action::Write, "ckpt", Some("x")).is_allow());
        assert!(!decide(a, TRAINER, Action::Read, "scans", Some("x")).is_allow());
        assert!(!decide(a, LOADER, Action::Read, "ckpt", Some("x")).is_allow());
        assert!(
            !decide(
                a,
                "spiffe://td/gpu/trainer/x",
                Action::Read,
                "ckpt",
                Some("x")
            )
            .is_allow()
        );
        assert!(
            !decide(
                a,
                "spiffe://other/gpu/trainer",
                Action::Read,
                "ckpt",
                Some("x")
            )
            .is_allow()
        );
        // The policy's own allows still decide as before, named by their rule.
        assert_eq!(
            decide(a, LOADER, Action::Read, "scans", Some("x")),
            Decision::Allow {
                rule: "loader reads scans".into()
            }
        );
        // With write, writes too.
        let mut w = grant("g2", TRAINER, "out", f.start);
        w.write = true;
        assert!(f.grants.insert(w));
        assert!(decide(a, TRAINER, Action::Write, "out", Some("x")).is_allow());
        // An ID is given once.
        assert!(!f.grants.insert(grant("g2", LOADER, "other", f.start)));
    }

    #[test]
    fn an_object_prefix_confines_the_grant_to_whole_path_segments() {
        let f = fixture();
        let mut g = grant("g1", TRAINER, "ckpt", f.start);
        g.object_prefix = Some("patient-17".into());
        f.grants.insert(g);
        let a = &f.access;
        assert!(decide(a, TRAINER, Action::Read, "ckpt", Some("patient-17/ct.dcm")).is_allow());
        assert!(decide(a, TRAINER, Action::Read, "ckpt", Some("patient-17")).is_allow());
        assert!(!decide(a, TRAINER, Action::Read, "ckpt", Some("patient-170/ct.dcm")).is_allow());
        assert!(!decide(a, TRAINER, Action::Read, "ckpt", Some("other/ct.dcm")).is_allow());
        // Requests naming no object are not covered, as for object-scoped rules.
        assert!(!decide(a, TRAINER, Action::List, "ckpt", None).is_allow());
        assert!(under_prefix("a/bc", "a/"));
        assert!(!under_prefix("a", "a/"));
    }

    #[test]
    fn a_grant_allows_nothing_once_its_time_passes_whoever_watches() {
        let f = fixture();
        f.grants.insert(grant("g1", TRAINER, "ckpt", f.start));
        let a = &f.access;
        f.clock.advance(Duration::from_secs(4 * 3600 - 1));
        assert!(decide(a, TRAINER, Action::Read, "ckpt", Some("x")).is_allow());
        assert!(f.grants.expired(f.clock.now()).is_empty());
        assert_eq!(f.grants.active(f.clock.now()), 1);
        f.clock.advance(Duration::from_secs(1));
        // Still held (its expiry not yet recorded), but refused.
        assert_eq!(f.grants.list().len(), 1);
        assert!(!decide(a, TRAINER, Action::Read, "ckpt", Some("x")).is_allow());
        assert_eq!(f.grants.active(f.clock.now()), 0);
        let expired = f.grants.expired(f.clock.now());
        assert_eq!(expired.len(), 1);
        assert_eq!(expired[0].remaining(f.clock.now()), Duration::ZERO);
        assert!(f.grants.remove("g1").is_some());
        assert!(f.grants.expired(f.clock.now()).is_empty());
    }

    #[test]
    fn a_grant_overrides_deny_rules_but_a_pending_one_allows_nothing() {
        let f = fixture();
        let a = &f.access;
        assert_eq!(
            decide(a, TRAINER, Action::Read, "notes", Some("x")),
            Decision::Deny {
                rule: Some("nobody reads notes".into()),
                reason: "denied by rule \"nobody reads notes\" (line 8)".into()
            }
        );
        let mut g = grant("g1", TRAINER, "notes", f.start);
        g.pending = true;
        f.grants.insert(g.clone());
        assert!(!decide(a, TRAINER, Action::Read, "notes", Some("x")).is_allow());
        assert_eq!(f.grants.active(f.clock.now()), 0);
        g.pending = false;
        g.approved_by = Some(1001);
        assert!(f.grants.replace(g).is_some());
        // Break-glass: the grant wins over the deny rule, and says so.
        assert!(matches!(
            decide(a, TRAINER, Action::Read, "notes", Some("x")),
            Decision::Emergency { grant, .. } if grant == "g1"
        ));
        // Revoked: denied by the rule again.
        f.grants.remove("g1");
        assert!(matches!(
            decide(a, TRAINER, Action::Read, "notes", Some("x")),
            Decision::Deny { rule: Some(_), .. }
        ));
    }
}
