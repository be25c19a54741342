//! SPIFFE IDs and trust domains, parsed and validated by the SPIFFE ID standard.
//!
//! A SPIFFE ID is `spiffe://<trust-domain><path>`: the trust domain is lowercase
//! `[a-z0-9._-]`, at most 255 bytes; the path is zero or more `/segment`s of
//! `[A-Za-z0-9._-]`, none empty, `.` or `..`, with no trailing slash; there is no port,
//! userinfo, query or fragment; the whole ID is at most 2048 bytes. Nothing here does I/O.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A SPIFFE trust domain: the authority part of a SPIFFE ID, such as `example.org`.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TrustDomain(String);

impl TrustDomain {
    /// Validates a bare trust domain name such as `example.org`.
    pub fn new(name: &str) -> Result<Self, IdError> {
        validate_trust_domain(name)?;
        Ok(Self(name.to_owned()))
    }

    /// The trust domain name, without scheme.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The trust domain's own SPIFFE ID, `spiffe://<name>`, carried by its CA certificates.
    pub fn id(&self) -> SpiffeId {
        SpiffeId {
            full: format!("{SCHEME}{}", self.0),
            td_end: SCHEME.len() + self.0.len(),
        }
    }
}

impl FromStr for TrustDomain {
    type Err = IdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

impl fmt::Display for TrustDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for TrustDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TrustDomain({})", self.0)
    }
}

impl Serialize for TrustDomain {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for TrustDomain {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Self::new(&s).map_err(serde::de::Error::custom)
    }
}

/// A validated SPIFFE ID such as `spiffe://example.org/ns/prod/sa/loader`.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SpiffeId {
    full: String,
    /// Byte offset where the trust domain ends and the path begins.
    td_end: usize,
}

impl SpiffeId {
    /// Parses and validates a SPIFFE ID.
    pub fn parse(s: &str) -> Result<Self, IdError> {
        if s.is_empty() {
            return Err(IdError::Empty);
        }
        if s.len() > MAX_ID_BYTES {
            return Err(IdError::TooLong(s.len()));
        }
        let rest = s.strip_prefix(SCHEME).ok_or(IdError::WrongScheme)?;
        let (authority, path) = match rest.find('/') {
            Some(i) => rest.split_at(i),
            None => (rest, ""),
        };
        // The standard forbids these outright; name them so the error says what to remove.
        if authority.contains('@') {
            return Err(IdError::Userinfo);
        }
        if authority.contains(':') {
            return Err(IdError::Port);
        }
        if let Some(i) = s.find(['?', '#']) {
            return Err(if s.as_bytes()[i] == b'?' {
                IdError::Query
            } else {
                IdError::Fragment
            });
        }
        validate_trust_domain(authority)?;
        validate_path(path)?;
        Ok(Self {
            full: s.to_owned(),
            td_end: SCHEME.len() + authority.len(),
        })
    }

    /// Builds `spiffe://<td><path>` from a trust domain and a path such as `/node/gpu-0`.
    pub fn from_parts(td: &TrustDomain, path: &str) -> Result<Self, IdError> {
        Self::parse(&format!("{SCHEME}{}{path}", td.as_str()))
    }

    /// The whole ID, `spiffe://...`.
    pub fn as_str(&self) -> &str {
        &self.full
    }

    /// The trust domain name, without scheme.
    pub fn trust_domain_name(&self) -> &str {
        &self.full[SCHEME.len()..self.td_end]
    }

    /// The trust domain this ID belongs to.
    pub fn trust_domain(&self) -> TrustDomain {
        TrustDomain(self.trust_domain_name().to_owned())
    }

    /// The path, empty or starting with `/`.
    pub fn path(&self) -> &str {
        &self.full[self.td_end..]
    }

    /// True if this ID belongs to `td`.
    pub fn is_member_of(&self, td: &TrustDomain) -> bool {
        self.trust_domain_name() == td.as_str()
    }
}

impl FromStr for SpiffeId {
    type Err = IdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.full)
    }
}

impl fmt::Debug for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SpiffeId({})", self.full)
    }
}

impl Serialize for SpiffeId {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.full)
    }
}

impl<'de> Deserialize<'de> for SpiffeId {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Self::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// Why a string is not a valid SPIFFE ID or trust domain.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum IdError {
    /// The input was empty.
    #[error("empty SPIFFE ID")]
    Empty,
    /// The ID is longer than the standard allows.
    #[error("SPIFFE ID is {0} bytes; at most 2048 are allowed")]
    TooLong(usize),
    /// The ID does not start with `spiffe://`.
    #[error("SPIFFE ID must start with spiffe://")]
    WrongScheme,
    /// The trust domain is empty.
    #[error("trust domain is empty")]
    EmptyTrustDomain,
    /// The trust domain is longer than the standard allows.
    #[error("trust domain is {0} bytes; at most 255 are allowed")]
    TrustDomainTooLong(usize),
    /// The trust domain holds a character outside lowercase `[a-z0-9._-]`.
    #[error(
        "trust domain holds {0:?}; only lowercase letters, digits, '.', '-' and '_' are allowed"
    )]
    TrustDomainChar(char),
    /// The authority holds a port.
    #[error("SPIFFE ID must not carry a port")]
    Port,
    /// The authority holds userinfo.
    #[error("SPIFFE ID must not carry userinfo")]
    Userinfo,
    /// The ID holds a query.
    #[error("SPIFFE ID must not carry a query")]
    Query,
    /// The ID holds a fragment.
    #[error("SPIFFE ID must not carry a fragment")]
    Fragment,
    /// A path segment is empty (`//`).
    #[error("path has an empty segment")]
    EmptySegment,
    /// A path segment is `.` or `..`.
    #[error("path has a '.' or '..' segment")]
    DotSegment,
    /// The path ends with `/`.
    #[error("path ends with '/'")]
    TrailingSlash,
    /// A path segment holds a character outside `[A-Za-z0-9._-]`.
    #[error("path holds {0:?}; only letters, digits, '.', '-' and '_' are allowed")]
    PathChar(char),
}

fn validate_trust_domain(td: &str) -> Result<(), IdError> {
    if td.is_empty() {
        return Err(IdError::EmptyTrustDomain);
    }
    if td.len() > MAX_TRUST_DOMAIN_BYTES {
        return Err(IdError::TrustDomainTooLong(td.len()));
    }
    match td
        .chars()
        .find(|c| !matches!(c, 'a'..='z' | '0'..='9' | '.' | '-' | '_'))
    {
        Some(':') => Err(IdError::Port),
        Some('@') => Err(IdError::Userinfo),
        Some(c) => Err(IdError::TrustDomainChar(c)),
        None => Ok(()),
    }
}

fn validate_path(path: &str) -> Result<(), IdError> {
    if path.is_empty() {
        return Ok(());
    }
    if path.ends_with('/') {
        return Err(IdError::TrailingSlash);
    }
    // `path` starts with '/', so the first split item is the empty string before it.
    for segment in path.split('/').skip(1) {
        if segment.is_empty() {
            return Err(IdError::EmptySegment);
        }
        if segment == "." || segment == ".." {
            return Err(IdError::DotSegment);
        }
        if let Some(c) = segment
            .chars()
            .find(|c| !matches!(c, 'a'..='z' | 'A'..='Z' | '0'..='9' | '.' | '-' | '_'))
        {
            return Err(IdError::PathChar(c));
        }
    }
    Ok(())
}

const SCHEME: &str = "spiffe://";

/// The SPIFFE ID standard's limit on a whole ID; also bounds what a peer can make us hold.
const MAX_ID_BYTES: usize = 2048;

/// The SPIFFE ID standard's limit on a trust domain name.
const MAX_TRUST_DOMAIN_BYTES: usize = 255;

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn valid_ids_parse_into_parts() {
        let id = SpiffeId::parse("spiffe://example.org/ns/prod/sa/loader-1.2_x").unwrap();
        assert_eq!(id.trust_domain_name(), "example.org");
        assert_eq!(id.path(), "/ns/prod/sa/loader-1.2_x");
        assert_eq!(
            id.to_string(),
            "spiffe://example.org/ns/prod/sa/loader-1.2_x"
        );
        assert!(id.is_member_of(&TrustDomain::new("example.org").unwrap()));
        assert!(!id.is_member_of(&TrustDomain::new("example.com").unwrap()));

        let td_only = SpiffeId::parse("spiffe://a-b_c.9").unwrap();
        assert_eq!(td_only.path(), "");
        assert_eq!(td_only, TrustDomain::new("a-b_c.9").unwrap().id());
    }

    #[test]
    fn invalid_ids_are_refused_with_the_reason() {
        let cases: &[(&str, IdError)] = &[
            ("", IdError::Empty),
            ("http://example.org/a", IdError::WrongScheme),
            ("SPIFFE://example.org/a", IdError::WrongScheme),
            ("spiffe:/example.org", IdError::WrongScheme),
            ("spiffe://", IdError::EmptyTrustDomain),
            ("spiffe:///a", IdError::EmptyTrustDomain),
            ("spiffe://Example.org/a", IdError::TrustDomainChar('E')),
            ("spiffe://exa mple.org", IdError::TrustDomainChar(' ')),
            ("spiffe://example.org:443/a", IdError::Port),
            ("spiffe://user@example.org/a", IdError::Userinfo),
            ("spiffe://example.org/a?x=1", IdError::Query),
            ("spiffe://example.org/a#frag", IdError::Fragment),
            ("spiffe://example.org/a//b", IdError::EmptySegment),
            ("spiffe://example.org/a/./b", IdError::DotSegment),
            ("spiffe://example.org/a/../b", IdError::DotSegment),
            ("spiffe://example.org/..", IdError::DotSegment),
            ("spiffe://example.org/a/", IdError::TrailingSlash),
            ("spiffe://example.org/", IdError::TrailingSlash),
            ("spiffe://example.org/a%20b", IdError::PathChar('%')),
            (
                "spiffe://example.org/caf\u{e9}",
                IdError::PathChar('\u{e9}'),
            ),
        ];
        for (input, want) in cases {
            assert_eq!(
                SpiffeId::parse(input).as_ref(),
                Err(want),
                "input {input:?}"
            );
        }
    }

    #[test]
    fn length_limits_are_enforced_at_the_boundary() {
        let td255 = "a".repeat(255);
        assert!(TrustDomain::new(&td255).is_ok());
        assert_eq!(
            TrustDomain::new(&"a".repeat(256)),
            Err(IdError::TrustDomainTooLong(256))
        );

        let prefix = format!("spiffe://{td255}/");
        let fill = 2048 - prefix.len();
        let at_limit = format!("{prefix}{}", "p".repeat(fill));
        assert_eq!(at_limit.len(), 2048);
        assert!(SpiffeId::parse(&at_limit).is_ok());
        let over = format!("{at_limit}p");
        assert_eq!(SpiffeId::parse(&over), Err(IdError::TooLong(2049)));
    }

    #[test]
    fn serde_validates_on_the_way_in() {
        let id: SpiffeId = serde_json::from_str("\"spiffe://example.org/x\"").unwrap();
        assert_eq!(
            serde_json::to_string(&id).unwrap(),
            "\"spiffe://example.org/x\""
        );
        assert!(serde_json::from_str::<SpiffeId>("\"spiffe://example.org/x/\"").is_err());
        assert!(serde_json::from_str::<TrustDomain>("\"Example.org\"").is_err());
    }

    #[test]
    fn from_parts_validates_the_path() {
        let td = TrustDomain::new("example.org").unwrap();
        assert_eq!(
            SpiffeId::from_parts(&td, "/node/gpu-0").unwrap().as_str(),
            "spiffe://example.org/node/gpu-0"
        );
        assert_eq!(
            SpiffeId::from_parts(&td, "/node/../x"),
            Err(IdError::DotSegment)
        );
    }

    proptest! {
        #[test]
        fn parse_never_panics_and_accepted_ids_round_trip(s in "\\PC{0,64}") {
            if let Ok(id) = SpiffeId::parse(&s) {
                prop_assert_eq!(id.as_str(), s.as_str());
                let again = SpiffeId::parse(id.as_str()).unwrap();
                prop_assert_eq!(again, id);
            }
        }

        #[test]
        fn generated_valid_ids_parse(
            td in "[a-z0-9._-]{1,40}",
            segs in proptest::collection::vec("[A-Za-z0-9_-][A-Za-z0-9._-]{0,10}", 0..6),
        ) {
            let path: String = segs.iter().map(|s| format!("/{s}")).collect();
            let s = format!("spiffe://{td}{path}");
            let id = SpiffeId::parse(&s).unwrap();
            prop_assert_eq!(id.trust_domain_name(), td.as_str());
            prop_assert_eq!(id.path(), path.as_str());
        }
    }
}
