//! Workload API messages to and from our identity types: splitting concatenated DER
//! certificates, reading the PKCS#8 key, and the encoders the node agent answers with.
//!
//! Everything here is pure and bounded: a length field is believed only as far as the
//! buffer it sits in, certificate counts stop at `certs::MAX_CHAIN_LEN` per chain and
//! `certs::MAX_BUNDLE_CAS` per bundle before anything is copied, and the whole message was
//! already capped at [`MAX_MESSAGE_BYTES`](super::MAX_MESSAGE_BYTES) by the gRPC layer. No
//! I/O, no clock: whether an SVID is still valid is for the TLS side to check.

use std::collections::HashMap;
use std::fmt;

use certs::{
    BundleError, MAX_BUNDLE_CAS, MAX_CHAIN_LEN, SpiffeId, Svid, SvidError, TrustBundle, TrustDomain,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

use super::{MAX_BUNDLES, MAX_SVIDS, pb};

/// What an `X509SVIDResponse` gives a workload: its SVIDs (the agent's preferred one
/// first) and the bundle of their trust domain. Federated bundles and CRLs are not kept.
#[derive(Debug, Clone)]
pub struct X509Context {
    /// The SVIDs, in the agent's order; never empty when decoded.
    pub svids: Vec<Svid>,
    /// The CAs of the SVIDs' trust domain.
    pub bundle: TrustBundle,
}

impl X509Context {
    /// The SVID for `id`, if the agent offers it.
    pub fn svid(&self, id: &SpiffeId) -> Option<&Svid> {
        self.svids.iter().find(|s| s.id() == id)
    }

    /// The agent's default SVID: the first.
    pub fn default_svid(&self) -> Option<&Svid> {
        self.svids.first()
    }
}

/// Why concatenated DER could not be split into elements.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DerError {
    /// No bytes where at least one element is required.
    #[error("empty")]
    Empty,
    /// The bytes end inside an element: truncated, or a length larger than what is left.
    #[error(
        "element at byte {offset} is incomplete: it claims {claimed} bytes, {available} remain"
    )]
    Incomplete {
        /// Where the element starts.
        offset: usize,
        /// The size its header claims, header included (0 if the header itself is cut).
        claimed: usize,
        /// Bytes left from `offset`.
        available: usize,
    },
    /// An element is not a DER SEQUENCE (certificates and PKCS#8 keys all are).
    #[error("element at byte {offset} is not a DER SEQUENCE")]
    NotSequence {
        /// Where the element starts.
        offset: usize,
    },
    /// A length is indefinite, not minimal, or longer than four bytes.
    #[error("element at byte {offset} has an invalid DER length")]
    BadLength {
        /// Where the element starts.
        offset: usize,
    },
    /// More elements than the limit.
    #[error("more than {max} elements")]
    TooMany {
        /// The limit.
        max: usize,
    },
}

/// Why a Workload API answer is not acceptable. Each names the SVID (by position) or the
/// bundle at fault.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum MalformedAnswer {
    /// The answer holds no SVID.
    #[error("no SVID in the answer")]
    NoSvid,
    /// More SVIDs than [`MAX_SVIDS`].
    #[error("{count} SVIDs in one answer; at most {MAX_SVIDS} are accepted")]
    TooManySvids {
        /// How many there were.
        count: usize,
    },
    /// More bundles than [`MAX_BUNDLES`].
    #[error("{count} bundles in one answer; at most {MAX_BUNDLES} are accepted")]
    TooManyBundles {
        /// How many there were.
        count: usize,
    },
    /// The bundles answer holds none.
    #[error("no bundle in the answer")]
    NoBundle,
    /// An SVID's certificate chain could not be split.
    #[error("SVID {index}: certificate chain: {error}")]
    Chain {
        /// The SVID's position.
        index: usize,
        /// What is wrong.
        error: DerError,
    },
    /// An SVID's key is not one DER element.
    #[error("SVID {index}: private key: {error}")]
    Key {
        /// The SVID's position.
        index: usize,
        /// What is wrong.
        error: DerError,
    },
    /// An SVID's leaf breaks the X.509-SVID rules.
    #[error("SVID {index}: {error}")]
    Svid {
        /// The SVID's position.
        index: usize,
        /// What is wrong.
        error: SvidError,
    },
    /// The `spiffe_id` field disagrees with the certificate.
    #[error("SVID {index} is labelled {claimed:?} but its certificate names {actual}")]
    IdMismatch {
        /// The SVID's position.
        index: usize,
        /// The label, shortened.
        claimed: String,
        /// The certificate's ID.
        actual: SpiffeId,
    },
    /// SVIDs of several trust domains in one answer.
    #[error("SVID {index} is in trust domain {actual}, SVID 0 in {first}")]
    MixedTrustDomains {
        /// The SVID's position.
        index: usize,
        /// SVID 0's trust domain.
        first: TrustDomain,
        /// This one's.
        actual: TrustDomain,
    },
    /// Two SVIDs of one trust domain came with different bundles.
    #[error("SVID {index} carries another bundle than SVID 0")]
    InconsistentBundle {
        /// The SVID's position.
        index: usize,
    },
    /// A bundle could not be split into certificates.
    #[error("bundle of {trust_domain}: {error}")]
    BundleDer {
        /// The trust domain (or the key it was filed under), shortened.
        trust_domain: String,
        /// What is wrong.
        error: DerError,
    },
    /// A bundle's certificates are not CAs of one trust domain.
    #[error("bundle of {trust_domain}: {error}")]
    Bundle {
        /// The trust domain (or the key it was filed under), shortened.
        trust_domain: String,
        /// What is wrong.
        error: BundleError,
    },
    /// A bundle is filed under another trust domain than its CAs name, or under a key that
    /// is no trust domain.
    #[error("bundle filed under {key:?} holds CAs of {actual}")]
    BundleKey {
        /// The key, shortened.
        key: String,
        /// The trust domain its CAs name (empty if the key itself is invalid).
        actual: String,
    },
}

/// Why our own SVID cannot be put into a Workload API answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum EncodeError {
    /// The key is not PKCS#8, the only form the standard allows.
    #[error("the private key of {0} is not PKCS#8")]
    NotPkcs8(SpiffeId),
    /// The SVID belongs to another trust domain than the bundle.
    #[error("{id} is not in trust domain {trust_domain} of the bundle")]
    ForeignSvid {
        /// The SVID's ID.
        id: SpiffeId,
        /// The bundle's trust domain.
        trust_domain: TrustDomain,
    },
}

/// Splits concatenated DER SEQUENCEs (certificates, or one PKCS#8 key) into elements,
/// refusing more than `max`. Lengths are checked against the bytes that are there before
/// anything is taken; indefinite, non-minimal and over-long (more than four bytes) lengths
/// are refused, so an accepted buffer is exactly the concatenation of what is returned.
pub fn split_der(buf: &[u8], max: usize) -> Result<Vec<&[u8]>, DerError> {
    if buf.is_empty() {
        return Err(DerError::Empty);
    }
    let mut out = Vec::new();
    let mut offset = 0;
    while offset < buf.len() {
        if out.len() == max {
            return Err(DerError::TooMany { max });
        }
        let len = element_len(&buf[offset..], offset)?;
        out.push(&buf[offset..offset + len]);
        offset += len;
    }
    Ok(out)
}

/// Decodes an `X509SVIDResponse`: every SVID (chain split, key as PKCS#8, leaf checked by
/// the X.509-SVID rules, label equal to the certificate's ID) and the bundle of their
/// trust domain. Chains are not verified here: that needs a time, and peers verify anyway.
pub fn decode_x509_response(resp: &pb::X509svidResponse) -> Result<X509Context, MalformedAnswer> {
    if resp.svids.len() > MAX_SVIDS {
        return Err(MalformedAnswer::TooManySvids {
            count: resp.svids.len(),
        });
    }
    let first = resp.svids.first().ok_or(MalformedAnswer::NoSvid)?;
    let first_svid = decode_svid(0, first)?;
    let td = first_svid.id().trust_domain();
    let bundle = decode_bundle(&first.bundle, &td)?;
    let mut svids = Vec::with_capacity(resp.svids.len());
    svids.push(first_svid);
    for (index, m) in resp.svids.iter().enumerate().skip(1) {
        let svid = decode_svid(index, m)?;
        let actual = svid.id().trust_domain();
        if actual != td {
            return Err(MalformedAnswer::MixedTrustDomains {
                index,
                first: td,
                actual,
            });
        }
        if m.bundle != first.bundle {
            return Err(MalformedAnswer::InconsistentBundle { index });
        }
        svids.push(svid);
    }
    Ok(X509Context { svids, bundle })
}

/// Decodes an `X509BundlesResponse`: one bundle per trust domain, each filed under its
/// trust domain's SPIFFE ID (`spiffe://name`; a bare name is accepted too). Sorted by trust
/// domain.
pub fn decode_bundles_response(
    resp: &pb::X509BundlesResponse,
) -> Result<Vec<TrustBundle>, MalformedAnswer> {
    if resp.bundles.len() > MAX_BUNDLES {
        return Err(MalformedAnswer::TooManyBundles {
            count: resp.bundles.len(),
        });
    }
    if resp.bundles.is_empty() {
        return Err(MalformedAnswer::NoBundle);
    }
    let mut out = Vec::with_capacity(resp.bundles.len());
    for (key, der) in &resp.bundles {
        let name = key.strip_prefix("spiffe://").unwrap_or(key);
        let td = TrustDomain::new(name).map_err(|_| MalformedAnswer::BundleKey {
            key: shorten(key),
            actual: String::new(),
        })?;
        out.push(decode_bundle(der, &td)?);
    }
    // Distinct keys may name one trust domain (`td` and `spiffe://td`): keep one answer
    // per trust domain.
    out.sort_by(|a, b| a.trust_domain().cmp(b.trust_domain()));
    let before = out.len();
    out.dedup_by(|a, b| a.trust_domain() == b.trust_domain());
    if out.len() != before {
        return Err(MalformedAnswer::BundleKey {
            key: String::from("(a trust domain filed twice)"),
            actual: String::new(),
        });
    }
    Ok(out)
}

/// One `X509SVID` message: the chain concatenated leaf first, the PKCS#8 key, and the
/// bundle's CAs concatenated.
pub fn encode_x509_svid(svid: &Svid, bundle: &TrustBundle) -> Result<pb::X509svid, EncodeError> {
    if !svid.id().is_member_of(bundle.trust_domain()) {
        return Err(EncodeError::ForeignSvid {
            id: svid.id().clone(),
            trust_domain: bundle.trust_domain().clone(),
        });
    }
    let PrivateKeyDer::Pkcs8(key) = svid.key() else {
        return Err(EncodeError::NotPkcs8(svid.id().clone()));
    };
    Ok(pb::X509svid {
        spiffe_id: svid.id().to_string(),
        x509_svid: concat(svid.chain()),
        x509_svid_key: key.secret_pkcs8_der().to_vec(),
        bundle: concat(bundle.cas()),
        hint: String::new(),
    })
}

/// An `X509SVIDResponse` holding `svids` (the first is the default) with `bundle`.
pub fn encode_x509_response<'a>(
    svids: impl IntoIterator<Item = &'a Svid>,
    bundle: &TrustBundle,
) -> Result<pb::X509svidResponse, EncodeError> {
    Ok(pb::X509svidResponse {
        svids: svids
            .into_iter()
            .map(|s| encode_x509_svid(s, bundle))
            .collect::<Result<_, _>>()?,
        crl: Vec::new(),
        federated_bundles: HashMap::new(),
    })
}

/// An `X509BundlesResponse`: each bundle filed under its trust domain's SPIFFE ID
/// (`spiffe://name`, as SPIRE files them).
pub fn encode_bundles_response<'a>(
    bundles: impl IntoIterator<Item = &'a TrustBundle>,
) -> pb::X509BundlesResponse {
    pb::X509BundlesResponse {
        crl: Vec::new(),
        bundles: bundles
            .into_iter()
            .map(|b| (b.trust_domain().id().to_string(), concat(b.cas())))
            .collect(),
    }
}

impl fmt::Debug for pb::X509svid {
    // The key never shows; certificates only by size.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("X509svid")
            .field("spiffe_id", &self.spiffe_id)
            .field("x509_svid_bytes", &self.x509_svid.len())
            .field("x509_svid_key_bytes", &self.x509_svid_key.len())
            .field("bundle_bytes", &self.bundle.len())
            .field("hint", &self.hint)
            .finish()
    }
}

impl fmt::Debug for pb::Jwtsvid {
    // The token is a bearer credential: never shown.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Jwtsvid")
            .field("spiffe_id", &self.spiffe_id)
            .field("svid_bytes", &self.svid.len())
            .field("hint", &self.hint)
            .finish()
    }
}

fn decode_svid(index: usize, m: &pb::X509svid) -> Result<Svid, MalformedAnswer> {
    let chain = split_der(&m.x509_svid, MAX_CHAIN_LEN)
        .map_err(|error| MalformedAnswer::Chain { index, error })?
        .into_iter()
        .map(|c| CertificateDer::from(c.to_vec()))
        .collect();
    let key = match split_der(&m.x509_svid_key, 1) {
        Ok(parts) if parts.len() == 1 => PrivatePkcs8KeyDer::from(m.x509_svid_key.clone()),
        Ok(_) => {
            return Err(MalformedAnswer::Key {
                index,
                error: DerError::TooMany { max: 1 },
            });
        }
        Err(error) => return Err(MalformedAnswer::Key { index, error }),
    };
    let svid = Svid::from_der(chain, PrivateKeyDer::Pkcs8(key))
        .map_err(|error| MalformedAnswer::Svid { index, error })?;
    if m.spiffe_id != svid.id().as_str() {
        return Err(MalformedAnswer::IdMismatch {
            index,
            claimed: shorten(&m.spiffe_id),
            actual: svid.id().clone(),
        });
    }
    Ok(svid)
}

/// A bundle that must hold CAs of `td`.
fn decode_bundle(der: &[u8], td: &TrustDomain) -> Result<TrustBundle, MalformedAnswer> {
    let cas = split_der(der, MAX_BUNDLE_CAS)
        .map_err(|error| MalformedAnswer::BundleDer {
            trust_domain: td.to_string(),
            error,
        })?
        .into_iter()
        .map(|c| CertificateDer::from(c.to_vec()))
        .collect();
    let bundle = TrustBundle::from_der(cas).map_err(|error| MalformedAnswer::Bundle {
        trust_domain: td.to_string(),
        error,
    })?;
    if bundle.trust_domain() != td {
        return Err(MalformedAnswer::BundleKey {
            key: td.to_string(),
            actual: bundle.trust_domain().to_string(),
        });
    }
    Ok(bundle)
}

/// The size of the DER element at the start of `buf` (header and contents), which must be
/// a SEQUENCE lying entirely within `buf`. `offset` is `buf`'s position, for errors.
fn element_len(buf: &[u8], offset: usize) -> Result<usize, DerError> {
    let incomplete = |claimed| DerError::Incomplete {
        offset,
        claimed,
        available: buf.len(),
    };
    let (&tag, rest) = buf.split_first().ok_or(incomplete(0))?;
    if tag != SEQUENCE {
        return Err(DerError::NotSequence { offset });
    }
    let (&first, rest) = rest.split_first().ok_or(incomplete(0))?;
    let (header, len) = if first < 0x80 {
        (2, usize::from(first))
    } else {
        let n = usize::from(first & 0x7f);
        // 0x80 is BER's indefinite length; DER has none. Over four length bytes would be
        // a 4 GiB element, far beyond any message we accept.
        if n == 0 || n > MAX_LENGTH_BYTES {
            return Err(DerError::BadLength { offset });
        }
        let bytes = rest.get(..n).ok_or(incomplete(0))?;
        let len = bytes
            .iter()
            .fold(0usize, |acc, &b| (acc << 8) | usize::from(b));
        // Minimal encoding: long form only from 128 on, and no leading zero byte.
        if len < 0x80 || bytes[0] == 0 {
            return Err(DerError::BadLength { offset });
        }
        (2 + n, len)
    };
    let total = header
        .checked_add(len)
        .ok_or(DerError::BadLength { offset })?;
    if total > buf.len() {
        return Err(incomplete(total));
    }
    Ok(total)
}

fn concat(ders: &[CertificateDer<'_>]) -> Vec<u8> {
    let mut out = Vec::with_capacity(ders.iter().map(|c| c.len()).sum());
    for c in ders {
        out.extend_from_slice(c);
    }
    out
}

/// Peer-supplied text fit for an error message: at most 128 characters, no controls.
fn shorten(s: &str) -> String {
    s.chars()
        .filter(|c| !c.is_control())
        .take(MAX_LABEL_CHARS)
        .collect()
}

/// The DER tag of a constructed SEQUENCE.
const SEQUENCE: u8 = 0x30;

/// Most length bytes accepted in a DER header.
const MAX_LENGTH_BYTES: usize = 4;

/// Most characters of a peer's label quoted in an error.
const MAX_LABEL_CHARS: usize = 128;

#[cfg(test)]
mod tests {
    use certs::test_util::TestPki;
    use proptest::prelude::*;
    use prost::Message;

    use super::*;

    fn seq(len: usize) -> Vec<u8> {
        let mut v = vec![SEQUENCE];
        if len < 0x80 {
            v.push(len as u8);
        } else if len < 0x100 {
            v.extend([0x81, len as u8]);
        } else {
            v.extend([0x82, (len >> 8) as u8, len as u8]);
        }
        v.extend(std::iter::repeat_n(0xab, len));
        v
    }

    #[test]
    fn splits_concatenated_elements_exactly() {
        let (a, b, c) = (seq(3), seq(200), seq(1000));
        let buf = [a.clone(), b.clone(), c.clone()].concat();
        let parts = split_der(&buf, 8).unwrap();
        assert_eq!(parts, vec![&a[..], &b[..], &c[..]]);
        assert_eq!(split_der(&seq(0), 1).unwrap(), vec![&[0x30, 0][..]]);
    }

    #[test]
    fn truncated_elements_are_incomplete_not_invalid() {
        let full = [seq(3), seq(200)].concat();
        for cut in [1, 4, 6, 7, 8, 100, full.len() - 1] {
            let e = split_der(&full[..cut], 8).unwrap_err();
            assert!(matches!(e, DerError::Incomplete { .. }), "cut {cut}: {e:?}");
        }
        assert_eq!(
            split_der(&[0x30, 0x82, 0x01], 8).unwrap_err(),
            DerError::Incomplete {
                offset: 0,
                claimed: 0,
                available: 3
            }
        );
    }

    #[test]
    fn a_length_beyond_the_buffer_is_refused_without_trusting_it() {
        // Claims 4 GiB - 1 with four length bytes; only six bytes exist.
        let e = split_der(&[0x30, 0x84, 0xff, 0xff, 0xff, 0xff], 8).unwrap_err();
        assert_eq!(
            e,
            DerError::Incomplete {
                offset: 0,
                claimed: 6 + 0xffff_ffff,
                available: 6
            }
        );
        // Five length bytes, indefinite length, non-minimal forms.
        for bad in [
            &[0x30, 0x85, 1, 0, 0, 0, 0][..],
            &[0x30, 0x80, 0, 0],
            &[0x30, 0x81, 0x05, 0, 0, 0, 0, 0],
            &[0x30, 0x82, 0x00, 0x90],
        ] {
            assert_eq!(
                split_der(bad, 8).unwrap_err(),
                DerError::BadLength { offset: 0 },
                "{bad:x?}"
            );
        }
    }

    #[test]
    fn trailing_garbage_is_refused() {
        let mut buf = seq(10);
        buf.push(0x00);
        assert_eq!(
            split_der(&buf, 8).unwrap_err(),
            DerError::NotSequence { offset: 12 }
        );
        let mut buf = seq(10);
        buf.push(SEQUENCE);
        assert!(matches!(
            split_der(&buf, 8).unwrap_err(),
            DerError::Incomplete { offset: 12, .. }
        ));
        assert_eq!(split_der(&[], 8).unwrap_err(), DerError::Empty);
    }

    #[test]
    fn too_many_elements_are_refused() {
        let buf = seq(1).repeat(MAX_CHAIN_LEN + 1);
        assert_eq!(
            split_der(&buf, MAX_CHAIN_LEN).unwrap_err(),
            DerError::TooMany { max: MAX_CHAIN_LEN }
        );
        assert_eq!(
            split_der(&seq(1).repeat(MAX_CHAIN_LEN), MAX_CHAIN_LEN)
                .unwrap()
                .len(),
            MAX_CHAIN_LEN
        );
    }

    #[test]
    fn an_svid_round_trips_through_the_wire_form() {
        let pki = TestPki::new("td.example");
        let a = pki.svid("/w/a");
        let b = pki.svid("/w/b");
        let bundle = pki.bundle();
        let resp = encode_x509_response([&a, &b], &bundle).unwrap();
        assert_eq!(resp.svids[0].spiffe_id, "spiffe://td.example/w/a");
        let wire = resp.encode_to_vec();
        let back = pb::X509svidResponse::decode(&wire[..]).unwrap();
        let ctx = decode_x509_response(&back).unwrap();
        assert_eq!(ctx.svids.len(), 2);
        for (got, want) in ctx.svids.iter().zip([&a, &b]) {
            assert_eq!(got.id(), want.id());
            assert_eq!(got.chain(), want.chain());
            assert_eq!(got.key().secret_der(), want.key().secret_der());
            assert_eq!(got.serial(), want.serial());
        }
        assert_eq!(ctx.bundle, bundle);
        assert_eq!(ctx.default_svid().unwrap().id(), a.id());
        assert!(ctx.svid(b.id()).is_some());

        let bundles = encode_bundles_response([&bundle]);
        assert_eq!(
            bundles.bundles.keys().collect::<Vec<_>>(),
            vec!["spiffe://td.example"]
        );
        let back = pb::X509BundlesResponse::decode(&bundles.encode_to_vec()[..]).unwrap();
        assert_eq!(decode_bundles_response(&back).unwrap(), vec![bundle]);
    }

    #[test]
    fn inconsistent_answers_are_refused() {
        let pki = TestPki::new("td.example");
        let other = TestPki::new("other.example");
        let svid = pki.svid("/w/a");
        let good = encode_x509_svid(&svid, &pki.bundle()).unwrap();

        let label = pb::X509svid {
            spiffe_id: "spiffe://td.example/w/else".into(),
            ..good.clone()
        };
        assert!(matches!(
            one(label).unwrap_err(),
            MalformedAnswer::IdMismatch { index: 0, .. }
        ));
        let foreign_bundle = pb::X509svid {
            bundle: encode_x509_svid(&other.svid("/x"), &other.bundle())
                .unwrap()
                .bundle,
            ..good.clone()
        };
        assert!(matches!(
            one(foreign_bundle).unwrap_err(),
            MalformedAnswer::BundleKey { .. }
        ));
        let two_keys = pb::X509svid {
            x509_svid_key: [good.x509_svid_key.clone(), good.x509_svid_key.clone()].concat(),
            ..good.clone()
        };
        assert!(matches!(
            one(two_keys).unwrap_err(),
            MalformedAnswer::Key {
                error: DerError::TooMany { max: 1 },
                ..
            }
        ));
        let no_chain = pb::X509svid {
            x509_svid: Vec::new(),
            ..good.clone()
        };
        assert!(matches!(
            one(no_chain).unwrap_err(),
            MalformedAnswer::Chain {
                error: DerError::Empty,
                ..
            }
        ));
        let mixed = pb::X509svidResponse {
            svids: vec![
                good.clone(),
                encode_x509_svid(&other.svid("/x"), &other.bundle()).unwrap(),
            ],
            ..Default::default()
        };
        assert!(matches!(
            decode_x509_response(&mixed).unwrap_err(),
            MalformedAnswer::MixedTrustDomains { index: 1, .. }
        ));
        let second = pki.svid("/w/b");
        let stale = pb::X509svidResponse {
            svids: vec![
                good.clone(),
                pb::X509svid {
                    bundle: concat(&[
                        pki.bundle().cas()[0].clone(),
                        other.bundle().cas()[0].clone(),
                    ]),
                    ..encode_x509_svid(&second, &pki.bundle()).unwrap()
                },
            ],
            ..Default::default()
        };
        assert_eq!(
            decode_x509_response(&stale).unwrap_err(),
            MalformedAnswer::InconsistentBundle { index: 1 }
        );
        assert_eq!(
            decode_x509_response(&pb::X509svidResponse::default()).unwrap_err(),
            MalformedAnswer::NoSvid
        );
        let many = pb::X509svidResponse {
            svids: vec![good; MAX_SVIDS + 1],
            ..Default::default()
        };
        assert!(matches!(
            decode_x509_response(&many).unwrap_err(),
            MalformedAnswer::TooManySvids { .. }
        ));
        // A bundle filed under another trust domain than its CAs name.
        let misfiled = pb::X509BundlesResponse {
            bundles: [(
                "spiffe://other.example".to_string(),
                concat(pki.bundle().cas()),
            )]
            .into(),
            ..Default::default()
        };
        assert!(matches!(
            decode_bundles_response(&misfiled).unwrap_err(),
            MalformedAnswer::BundleKey { .. }
        ));
    }

    #[test]
    fn encoding_refuses_what_the_standard_cannot_carry() {
        let pki = TestPki::new("td.example");
        let other = TestPki::new("other.example");
        assert!(matches!(
            encode_x509_svid(&pki.svid("/w"), &other.bundle()).unwrap_err(),
            EncodeError::ForeignSvid { .. }
        ));
        let svid = pki.svid("/w");
        let sec1 = Svid::from_der(
            svid.chain().to_vec(),
            PrivateKeyDer::Sec1(svid.key().secret_der().to_vec().into()),
        )
        .unwrap();
        assert_eq!(
            encode_x509_svid(&sec1, &pki.bundle()).unwrap_err(),
            EncodeError::NotPkcs8(sec1.id().clone())
        );
    }

    fn one(m: pb::X509svid) -> Result<X509Context, MalformedAnswer> {
        decode_x509_response(&pb::X509svidResponse {
            svids: vec![m],
            ..Default::default()
        })
    }

    proptest! {
        #[test]
        fn decoding_never_panics(data in proptest::collection::vec(any::<u8>(), 0..2048)) {
            if let Ok(parts) = split_der(&data, MAX_CHAIN_LEN) {
                prop_assert_eq!(parts.concat(), data.clone());
            }
            if let Ok(m) = pb::X509svidResponse::decode(&data[..]) {
                let _ = decode_x509_response(&m);
            }
            if let Ok(m) = pb::X509BundlesResponse::decode(&data[..]) {
                let _ = decode_bundles_response(&m);
            }
        }

        #[test]
        fn split_der_takes_back_what_was_concatenated(
            lens in proptest::collection::vec(0usize..600, 1..MAX_CHAIN_LEN)
        ) {
            let parts: Vec<Vec<u8>> = lens.iter().map(|&l| seq(l)).collect();
            let buf = parts.concat();
            let got = split_der(&buf, MAX_CHAIN_LEN).unwrap();
            prop_assert_eq!(got, parts.iter().map(Vec::as_slice).collect::<Vec<_>>());
        }
    }
}
