//! Attestation decisions, without I/O: join tokens (how a node proves itself the first
//! time) and Unix selectors (which workloads on a node get which SPIFFE IDs).
//!
//! The issuer stores only a token's [`TokenHash`]; the secret is shown once, to whoever
//! creates it, and travels to the node out of band. [`redeem`] decides whether a stored
//! token may be used now. A [`RegistrationEntry`] grants a SPIFFE ID to the workloads of one
//! node (its parent) that satisfy all of its [`Selector`]s; the node agent reads the
//! caller's uid, gid and executable (transportd does that I/O) into a [`Workload`] and
//! asks [`RegistrationEntry::matches`].

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use zeroize::Zeroizing;

use crate::ca::hex;
use crate::issue::CryptoError;
use crate::{IssueError, SpiffeId};

/// A join token's secret: 32 random bytes, hex. Shown once; never stored or logged.
pub struct JoinToken(Zeroizing<String>);

impl JoinToken {
    /// A fresh random token.
    pub fn generate() -> Result<Self, IssueError> {
        let mut bytes = Zeroizing::new([0u8; TOKEN_BYTES]);
        aws_lc_rs::rand::fill(bytes.as_mut()).map_err(|_| CryptoError::NoRandomness)?;
        Ok(Self(Zeroizing::new(hex(bytes.as_ref()))))
    }

    /// A token as a node operator typed or stored it (surrounding whitespace is ignored).
    pub fn from_secret(secret: &str) -> Result<Self, AttestError> {
        let s = secret.trim();
        if s.len() != TOKEN_BYTES * 2 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(AttestError::MalformedToken);
        }
        Ok(Self(Zeroizing::new(s.to_ascii_lowercase())))
    }

    /// The secret, to hand to the node.
    pub fn secret(&self) -> &str {
        &self.0
    }

    /// What the issuer stores and looks the token up by.
    pub fn hash(&self) -> TokenHash {
        let d = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, self.0.as_bytes());
        TokenHash(hex(d.as_ref()))
    }
}

impl fmt::Debug for JoinToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("JoinToken(..)")
    }
}

/// SHA-256 of a join token's secret, lowercase hex: safe to store and to log.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TokenHash(String);

impl TokenHash {
    /// Parses a stored hash.
    pub fn parse(s: &str) -> Result<Self, AttestError> {
        if s.len() != 64 || !s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            return Err(AttestError::MalformedToken);
        }
        Ok(Self(s.to_owned()))
    }

    /// The hex form.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// A short prefix that names the token in logs and listings.
    pub fn short(&self) -> &str {
        &self.0[..12]
    }
}

impl fmt::Display for TokenHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A join token as the issuer keeps it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenRecord {
    /// The token's hash.
    pub hash: TokenHash,
    /// The node ID a node that redeems it receives.
    pub node: SpiffeId,
    /// When it stops being accepted.
    pub expires_at: SystemTime,
    /// When it was redeemed, if it was.
    pub used_at: Option<SystemTime>,
}

/// Decides whether a token looked up by its hash may be redeemed at `now`: it must exist,
/// not have been used, and not have expired. Returns the node ID it grants.
pub fn redeem(record: Option<&TokenRecord>, now: SystemTime) -> Result<&SpiffeId, TokenRefusal> {
    let r = record.ok_or(TokenRefusal::Unknown)?;
    if let Some(at) = r.used_at {
        return Err(TokenRefusal::Used { at });
    }
    if now >= r.expires_at {
        return Err(TokenRefusal::Expired { at: r.expires_at });
    }
    Ok(&r.node)
}

/// Why a join token was not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TokenRefusal {
    /// No such token (never created, or a typo).
    #[error("unknown join token")]
    Unknown,
    /// The token was redeemed before; tokens are single use.
    #[error("join token already used at {}", humantime::format_rfc3339_seconds(*at))]
    Used {
        /// When it was used.
        at: SystemTime,
    },
    /// The token expired.
    #[error("join token expired at {}", humantime::format_rfc3339_seconds(*at))]
    Expired {
        /// When it expired.
        at: SystemTime,
    },
}

/// A property a workload must have to get an entry's SPIFFE ID. Written as SPIRE writes
/// Unix selectors: `unix:uid:1000`, `unix:gid:1000`, `unix:path:/usr/bin/python3`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Selector {
    /// The caller's effective user ID.
    Uid(u32),
    /// The caller's effective group ID.
    Gid(u32),
    /// The absolute path of the caller's executable.
    Path(PathBuf),
}

impl FromStr for Selector {
    type Err = AttestError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || AttestError::Selector(s.to_owned());
        let rest = s.strip_prefix("unix:").ok_or_else(bad)?;
        let (kind, value) = rest.split_once(':').ok_or_else(bad)?;
        // IDs in canonical decimal only ("0999" or "+5" would name uid 999 or 5 under
        // another spelling; one spelling per selector keeps entries comparable).
        let id = |v: &str| -> Result<u32, AttestError> {
            let canonical =
                v == "0" || (!v.starts_with('0') && v.bytes().all(|b| b.is_ascii_digit()));
            if !canonical {
                return Err(bad());
            }
            v.parse().map_err(|_| bad())
        };
        match kind {
            "uid" => id(value).map(Self::Uid),
            "gid" => id(value).map(Self::Gid),
            "path" => {
                let p = PathBuf::from(value);
                if !p.is_absolute() || value.len() > MAX_SELECTOR_PATH || value.contains('\0') {
                    return Err(bad());
                }
                Ok(Self::Path(p))
            }
            _ => Err(bad()),
        }
    }
}

impl fmt::Display for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Uid(u) => write!(f, "unix:uid:{u}"),
            Self::Gid(g) => write!(f, "unix:gid:{g}"),
            Self::Path(p) => write!(f, "unix:path:{}", p.display()),
        }
    }
}

impl Serialize for Selector {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Selector {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// What the node agent learned about a caller of the Workload API from the kernel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Workload {
    /// Effective user ID.
    pub uid: u32,
    /// Effective group ID.
    pub gid: u32,
    /// The executable, if it could be read (a process of another user may hide it).
    pub path: Option<PathBuf>,
}

impl Workload {
    /// Whether the workload has the property `selector` names.
    pub fn satisfies(&self, selector: &Selector) -> bool {
        match selector {
            Selector::Uid(u) => self.uid == *u,
            Selector::Gid(g) => self.gid == *g,
            Selector::Path(p) => self.path.as_deref() == Some(p.as_path()),
        }
    }
}

/// A grant of a SPIFFE ID to the workloads of one node that match every selector.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegistrationEntry {
    /// The entry's own ID (random, assigned by the issuer).
    pub id: String,
    /// The SPIFFE ID the workloads receive.
    pub spiffe_id: SpiffeId,
    /// The node whose agent may hand it out.
    pub parent_id: SpiffeId,
    /// All must hold; an entry has at least one.
    pub selectors: Vec<Selector>,
    /// SVID lifetime for this entry; the issuer's default when absent.
    #[serde(default, skip_serializing_if = "Option::is_none", with = "secs_opt")]
    pub ttl: Option<Duration>,
}

impl RegistrationEntry {
    /// Whether `workload` gets this entry's SPIFFE ID: it satisfies every selector, and
    /// there is at least one (an entry without selectors matches nobody).
    pub fn matches(&self, workload: &Workload) -> bool {
        !self.selectors.is_empty() && self.selectors.iter().all(|s| workload.satisfies(s))
    }

    /// Checks what an entry must be before the issuer stores it: IDs in `trust_domain`, a
    /// workload ID that is not the trust domain or its parent node, one to
    /// [`MAX_SELECTORS`] selectors.
    pub fn validate(&self, trust_domain: &crate::TrustDomain) -> Result<(), AttestError> {
        for id in [&self.spiffe_id, &self.parent_id] {
            if !id.is_member_of(trust_domain) {
                return Err(AttestError::Entry(EntryError::ForeignId {
                    id: id.clone(),
                    trust_domain: trust_domain.clone(),
                }));
            }
            if id.path().is_empty() {
                return Err(AttestError::Entry(EntryError::NoPath(id.clone())));
            }
        }
        if self.spiffe_id == self.parent_id {
            return Err(AttestError::Entry(EntryError::OwnParent));
        }
        if self.selectors.is_empty() {
            return Err(AttestError::Entry(EntryError::NoSelectors));
        }
        if self.selectors.len() > MAX_SELECTORS {
            return Err(AttestError::Entry(EntryError::TooManySelectors(
                self.selectors.len(),
            )));
        }
        Ok(())
    }
}

/// The entries among `entries` that `workload`, a caller on node `node`, is entitled to.
pub fn entries_for<'a>(
    entries: &'a [RegistrationEntry],
    node: &SpiffeId,
    workload: &Workload,
) -> Vec<&'a RegistrationEntry> {
    entries
        .iter()
        .filter(|e| e.parent_id == *node && e.matches(workload))
        .collect()
}

/// Why a token, selector or entry is not acceptable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AttestError {
    /// Not a join token's form (64 hex digits).
    #[error("malformed join token: expected 64 hex digits")]
    MalformedToken,
    /// Not a selector we know (the text as given).
    #[error("invalid selector {0:?}: use unix:uid:<n>, unix:gid:<n> or unix:path:<absolute path>")]
    Selector(String),
    /// The entry breaks a rule.
    #[error("registration entry: {0}")]
    Entry(#[source] EntryError),
}

/// Which rule a registration entry breaks ([`RegistrationEntry::validate`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum EntryError {
    /// The SPIFFE ID or the parent ID is in another trust domain.
    #[error("{id} is not in trust domain {trust_domain}")]
    ForeignId {
        /// The ID.
        id: SpiffeId,
        /// The issuer's trust domain.
        trust_domain: crate::TrustDomain,
    },
    /// The SPIFFE ID or the parent ID is the trust domain itself.
    #[error("{0} names the trust domain itself; give a path")]
    NoPath(SpiffeId),
    /// The SPIFFE ID is the parent node's own ID.
    #[error("an entry's SPIFFE ID cannot be its parent node's own ID")]
    OwnParent,
    /// The entry has no selector.
    #[error("give at least one selector, e.g. unix:uid:1000")]
    NoSelectors,
    /// The entry has more than [`MAX_SELECTORS`] selectors (how many).
    #[error("{0} selectors; at most {MAX_SELECTORS}")]
    TooManySelectors(usize),
}

mod secs_opt {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(v: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(d) => s.serialize_some(&d.as_secs()),
            None => s.serialize_none(),
        }
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Option<Duration>, D::Error> {
        Ok(Option::<u64>::deserialize(d)?.map(Duration::from_secs))
    }
}

/// Random bytes in a join token.
const TOKEN_BYTES: usize = 32;

/// Most selectors on one entry.
pub const MAX_SELECTORS: usize = 16;

/// Longest executable path a selector may name (Linux's PATH_MAX).
const MAX_SELECTOR_PATH: usize = 4096;

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> SpiffeId {
        SpiffeId::parse(s).unwrap()
    }

    fn entry(selectors: &[&str]) -> RegistrationEntry {
        RegistrationEntry {
            id: "e1".into(),
            spiffe_id: id("spiffe://td/workload/loader"),
            parent_id: id("spiffe://td/node/gpu-0"),
            selectors: selectors.iter().map(|s| s.parse().unwrap()).collect(),
            ttl: None,
        }
    }

    fn workload(uid: u32, gid: u32, path: Option<&str>) -> Workload {
        Workload {
            uid,
            gid,
            path: path.map(PathBuf::from),
        }
    }

    #[test]
    fn tokens_are_random_and_hash_stably() {
        let a = JoinToken::generate().unwrap();
        let b = JoinToken::generate().unwrap();
        assert_ne!(a.secret(), b.secret());
        assert_eq!(a.secret().len(), 64);
        let again = JoinToken::from_secret(&format!("  {}\n", a.secret())).unwrap();
        assert_eq!(again.hash(), a.hash());
        assert_ne!(a.hash(), b.hash());
        assert_eq!(TokenHash::parse(a.hash().as_str()).unwrap(), a.hash());
        assert!(!format!("{a:?}").contains(a.secret()));
    }

    #[test]
    fn known_answer_hash() {
        let t = JoinToken::from_secret(&"00".repeat(32)).unwrap();
        // SHA-256 of 64 ASCII zeros.
        assert_eq!(
            t.hash().as_str(),
            "60e05bd1b195af2f94112fa7197a5c88289058840ce7c6df9693756bc6250f55"
        );
    }

    #[test]
    fn malformed_tokens_are_refused() {
        for s in ["", "abc", &"g".repeat(64), &"0".repeat(63), &"0".repeat(65)] {
            assert_eq!(
                JoinToken::from_secret(s).unwrap_err(),
                AttestError::MalformedToken
            );
        }
        assert!(TokenHash::parse("ABC").is_err());
    }

    #[test]
    fn redeem_refuses_unknown_used_and_expired_tokens() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let rec = TokenRecord {
            hash: JoinToken::generate().unwrap().hash(),
            node: id("spiffe://td/node/a"),
            expires_at: now + Duration::from_secs(600),
            used_at: None,
        };
        assert_eq!(redeem(Some(&rec), now).unwrap(), &rec.node);
        assert_eq!(redeem(None, now).unwrap_err(), TokenRefusal::Unknown);
        let used = TokenRecord {
            used_at: Some(now),
            ..rec.clone()
        };
        assert_eq!(
            redeem(Some(&used), now).unwrap_err(),
            TokenRefusal::Used { at: now }
        );
        assert_eq!(
            redeem(Some(&rec), rec.expires_at).unwrap_err(),
            TokenRefusal::Expired { at: rec.expires_at }
        );
    }

    #[test]
    fn selectors_round_trip_and_refuse_nonsense() {
        for s in ["unix:uid:0", "unix:gid:1000", "unix:path:/usr/bin/python3"] {
            let sel: Selector = s.parse().unwrap();
            assert_eq!(sel.to_string(), s);
            let json = serde_json::to_string(&sel).unwrap();
            assert_eq!(serde_json::from_str::<Selector>(&json).unwrap(), sel);
        }
        for s in [
            "uid:0",
            "unix:uid:-1",
            "unix:uid:x",
            "unix:path:relative/bin",
            "unix:user:root",
            "k8s:ns:default",
            "unix:uid",
            "unix:uid:",
            "unix:gid:+5",
            "unix:uid:4294967296",
        ] {
            assert!(s.parse::<Selector>().is_err(), "{s} accepted");
        }
    }

    /// Fuzz finding (certs/fuzz `attest`): `unix:uid:0999` parsed as uid 999 and printed
    /// back as `unix:uid:999`, two spellings of one selector.
    #[test]
    fn regression_selector_with_leading_zero() {
        let bytes: &[u8] = &[
            0x75, 0x6e, 0x69, 0x78, 0x3a, 0x75, 0x69, 0x64, 0x3a, 0x30, 0x39, 0x39, 0x39,
        ];
        let text = std::str::from_utf8(bytes).unwrap();
        assert!(text.parse::<Selector>().is_err());
        assert_eq!("unix:uid:0".parse::<Selector>().unwrap(), Selector::Uid(0));
    }

    #[test]
    fn an_entry_matches_only_when_every_selector_holds() {
        let e = entry(&["unix:uid:1000", "unix:path:/opt/loader"]);
        assert!(e.matches(&workload(1000, 5, Some("/opt/loader"))));
        assert!(!e.matches(&workload(1001, 5, Some("/opt/loader"))));
        assert!(!e.matches(&workload(1000, 5, Some("/opt/other"))));
        assert!(!e.matches(&workload(1000, 5, None)));
        assert!(entry(&["unix:gid:5"]).matches(&workload(0, 5, None)));
        assert!(!entry(&[]).matches(&workload(0, 0, None)));
    }

    #[test]
    fn entries_for_keeps_the_callers_node_only() {
        let mine = entry(&["unix:uid:1000"]);
        let other_node = RegistrationEntry {
            id: "e2".into(),
            parent_id: id("spiffe://td/node/gpu-1"),
            ..mine.clone()
        };
        let entries = [mine.clone(), other_node];
        let got = entries_for(
            &entries,
            &id("spiffe://td/node/gpu-0"),
            &workload(1000, 0, None),
        );
        assert_eq!(got, vec![&mine]);
        assert!(
            entries_for(
                &entries,
                &id("spiffe://td/node/gpu-0"),
                &workload(1, 0, None)
            )
            .is_empty()
        );
    }

    #[test]
    fn validate_refuses_bad_entries() {
        let td = crate::TrustDomain::new("td").unwrap();
        let refused = |e: &RegistrationEntry| match e.validate(&td) {
            Err(AttestError::Entry(why)) => why,
            other => panic!("{other:?}"),
        };
        assert!(entry(&["unix:uid:1"]).validate(&td).is_ok());
        assert_eq!(refused(&entry(&[])), EntryError::NoSelectors);
        let mut foreign = entry(&["unix:uid:1"]);
        foreign.spiffe_id = id("spiffe://other/x");
        assert_eq!(
            refused(&foreign),
            EntryError::ForeignId {
                id: id("spiffe://other/x"),
                trust_domain: td.clone(),
            }
        );
        let mut itself = entry(&["unix:uid:1"]);
        itself.spiffe_id = itself.parent_id.clone();
        assert_eq!(refused(&itself), EntryError::OwnParent);
        let mut bare = entry(&["unix:uid:1"]);
        bare.spiffe_id = id("spiffe://td");
        assert_eq!(refused(&bare), EntryError::NoPath(id("spiffe://td")));
        assert_eq!(
            bare.validate(&td).unwrap_err().to_string(),
            "registration entry: spiffe://td names the trust domain itself; give a path"
        );
        let many: Vec<String> = (0..=MAX_SELECTORS)
            .map(|i| format!("unix:gid:{i}"))
            .collect();
        let refs: Vec<&str> = many.iter().map(String::as_str).collect();
        assert_eq!(
            refused(&entry(&refs)),
            EntryError::TooManySelectors(MAX_SELECTORS + 1)
        );
    }
}
