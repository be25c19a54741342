//! The evidence report: what one or more nodes' trails say, verified and aggregated for a
//! reviewer. [`evidence_report`] verifies each trail (and, given receipts, compares it with
//! its witness), then reads its records and sums them up: accesses by identity, dataset,
//! data class and action; refusals with their reasons; identity events; policy loads with
//! what changed from the load before; transfers by path with bytes; accesses over time.
//! Rendering (HTML, JSON, CSV) is the CLI's (`transportd audit report`).
//!
//! A trail that fails verification is reported as failed, with the reason, and its records
//! are still read and counted (those that parse): a reviewer sees what it claims, marked as
//! not to be trusted. Object names are left out of the report (they can carry patient
//! identifiers); `transportd audit query` shows them.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use certs::TrustBundle;
use serde::Serialize;
use serde_json::Value;

use super::file::segments;
use super::verify::{VerifyReport, WitnessReport, verify, verify_witnessed};
use super::witness::Receipt;
use crate::policy::DataClass;

/// Which records a report covers.
#[derive(Debug, Clone, Default)]
pub struct ReportFilter {
    /// Only records at or after this time.
    pub from: Option<SystemTime>,
    /// Only records before this time.
    pub to: Option<SystemTime>,
    /// Only accesses, refusals of access and transfers of this dataset. Records about no
    /// dataset (identity events, policy loads, refused connections) are kept.
    pub dataset: Option<String>,
    /// Only accesses, refusals of access and transfers of datasets of this class (as the
    /// node's policy declared it when it decided the access). Records about no dataset are
    /// kept.
    pub class: Option<DataClass>,
}

/// One node's trail to report on.
#[derive(Debug, Clone)]
pub struct NodeTrail {
    /// The trail's directory.
    pub dir: PathBuf,
    /// The witness's receipts for this node, if the reviewer has them.
    pub receipts: Option<Vec<Receipt>>,
}

/// The report: per-node verification, then tables aggregated across nodes.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct EvidenceReport {
    /// When the report was made, RFC 3339.
    pub generated_at: String,
    /// The filter's `from`, RFC 3339, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub from: Option<String>,
    /// The filter's `to`, RFC 3339, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub to: Option<String>,
    /// The filter's dataset, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dataset: Option<String>,
    /// The filter's data class, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub class: Option<DataClass>,
    /// True if every trail verified (and matched its witness where receipts were given).
    pub all_verified: bool,
    /// One section per trail, in the order given.
    pub nodes: Vec<NodeSection>,
    /// Authorization decisions by identity, dataset, class and action.
    pub accesses: Vec<AccessRow>,
    /// Everything refused, in time order.
    pub refusals: Vec<RefusalRow>,
    /// Identities issued, loaded, rotated and banned, and other identity changes.
    pub identity_events: Vec<IdentityRow>,
    /// Policies taken into use, with what changed from the load before on that node.
    pub policy_changes: Vec<PolicyChange>,
    /// Ended transfers by path and direction.
    pub transfers: Vec<TransferRow>,
    /// Emergency (break-glass) grants: given, approved, used, ended.
    pub emergency: Vec<EmergencyRow>,
    /// Authorization decisions over time, in buckets of `bucket_secs`.
    pub timeline: Vec<TimeBucket>,
    /// The width of a timeline bucket, seconds.
    pub bucket_secs: u64,
}

/// One emergency (break-glass) grant on one node, from its records in the window.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct EmergencyRow {
    /// The node that holds it.
    pub node: String,
    /// The grant's ID.
    pub grant: String,
    /// The one peer it is for.
    pub peer: String,
    /// The one dataset it is for.
    pub dataset: String,
    /// What it allows (empty if its grant record is outside the window).
    pub actions: Vec<String>,
    /// Why, as the operator gave it.
    pub reason: String,
    /// When it was given (empty if outside the window).
    pub granted_at: String,
    /// The granting operator's user ID.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub granted_by: Option<u64>,
    /// The approving operator's user ID, where a second operator approved it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub approved_by: Option<u64>,
    /// When it expires or expired.
    pub expires_at: String,
    /// Accesses it allowed.
    pub uses: u64,
    /// `expired` or `revoked`; empty if the window ends with it still in force.
    pub ended: String,
    /// When it ended.
    pub ended_at: String,
}

/// How one trail verified.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NodeSection {
    /// The trail's directory.
    pub dir: String,
    /// The node, as the latest checkpoint's signer names it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// True if the chain, the checkpoints and the latest checkpoint verified.
    pub verified: bool,
    /// What `verify` found, if it verified.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub verify: Option<VerifyReport>,
    /// Why it failed, if it did: the first broken record.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub failure: Option<String>,
    /// How it compares with its witness.
    pub witness: WitnessCheck,
    /// Records read (those that parse), checkpoints included.
    pub records: u64,
    /// Lines that are not JSON records (changed or torn), skipped.
    pub unreadable: u64,
    /// The first record's time.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub first: Option<String>,
    /// The last record's time.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last: Option<String>,
}

/// A trail against its witness.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum WitnessCheck {
    /// No receipts were given for this node.
    NotChecked,
    /// Every witnessed checkpoint is in the trail.
    Matched(WitnessReport),
    /// The trail does not match what its witness holds.
    Failed {
        /// Why.
        reason: String,
    },
}

/// Decisions about one identity, dataset, class and action.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AccessRow {
    /// Who asked (SPIFFE ID).
    pub identity: String,
    /// Which dataset.
    pub dataset: String,
    /// Its data class, where the policy declared one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub class: Option<String>,
    /// `list`, `read` or `write`.
    pub action: String,
    /// Decisions that allowed.
    pub allowed: u64,
    /// Decisions that denied.
    pub denied: u64,
    /// The first decision's time.
    pub first: String,
    /// The last decision's time.
    pub last: String,
    /// The nodes that decided.
    pub nodes: Vec<String>,
}

/// Something refused.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RefusalRow {
    /// The node whose trail holds it.
    pub node: String,
    /// When.
    pub time: String,
    /// The record's event (`authorization`, `connection_refused`, `issuance_refused`, ...).
    pub event: String,
    /// Who was refused: a SPIFFE ID, an address, a uid; empty if unknown.
    pub who: String,
    /// What was asked for: an action and dataset, a transport, a policy file.
    pub what: String,
    /// Why.
    pub reason: String,
    /// How many refusals the record stands for (more than one for counted refusals).
    pub count: u64,
}

/// An identity event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct IdentityRow {
    /// The node whose trail holds it.
    pub node: String,
    /// When.
    pub time: String,
    /// `issued`, `loaded`, `rotated`, `banned`, `refused`, `trust_updated`, `token_created`,
    /// `entry_created`, `entry_deleted`, `ca_prepared`, ...
    pub kind: String,
    /// The identity it is about, if any.
    pub id: String,
    /// The SVID serial (or serials) concerned, if any.
    pub serial: String,
    /// The rest, in words.
    pub detail: String,
}

/// A policy taken into use.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PolicyChange {
    /// The node.
    pub node: String,
    /// When.
    pub time: String,
    /// Where it came from.
    pub source: String,
    /// BLAKE3 of its bytes, hex.
    pub digest: String,
    /// How many rules it holds.
    pub rules: u64,
    /// True if the node had loaded a policy before (in its trail): `diff` is against it.
    pub has_previous: bool,
    /// False if the record holds no policy lines (written before records held them):
    /// only the digest says it changed.
    pub lines_recorded: bool,
    /// Lines removed (`- `) and added (`+ `) against the previous load.
    pub diff: Vec<String>,
}

/// Ended transfers over one path in one direction.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TransferRow {
    /// `quic`, `tcp` or `rdma`.
    pub path: String,
    /// `out` (bytes left the node) or `in`.
    pub direction: String,
    /// Transfers that ended.
    pub transfers: u64,
    /// Of them, complete.
    pub complete: u64,
    /// Payload bytes moved.
    pub bytes: u64,
}

/// Authorization decisions in one interval.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TimeBucket {
    /// The interval's start, RFC 3339.
    pub start: String,
    /// Decisions that allowed.
    pub allowed: u64,
    /// Decisions that denied.
    pub denied: u64,
}

/// Verifies each trail and sums up its records under `filter`. With `bundle`, checkpoint
/// signers (and witnesses) must chain to it. `now` is the report's date.
pub fn evidence_report(
    trails: &[NodeTrail],
    bundle: Option<&TrustBundle>,
    filter: &ReportFilter,
    now: SystemTime,
) -> EvidenceReport {
    let mut report = EvidenceReport {
        generated_at: rfc3339(now),
        from: filter.from.map(rfc3339),
        to: filter.to.map(rfc3339),
        dataset: filter.dataset.clone(),
        class: filter.class,
        all_verified: true,
        ..EvidenceReport::default()
    };
    let mut acc = Aggregates::default();
    for trail in trails {
        let (records, unreadable) = read_records(&trail.dir);
        let signer = records
            .iter()
            .rev()
            .find(|r| str_of(r, "event") == "checkpoint")
            .map(|r| str_of(r, "signer").to_owned());
        let node = signer
            .clone()
            .unwrap_or_else(|| trail.dir.display().to_string());
        let verified = verify(&trail.dir, bundle);
        let witness = match &trail.receipts {
            None => WitnessCheck::NotChecked,
            Some(receipts) => match verify_witnessed(&trail.dir, receipts, bundle) {
                Ok(w) => WitnessCheck::Matched(w),
                Err(e) => WitnessCheck::Failed {
                    reason: e.to_string(),
                },
            },
        };
        let ok = verified.is_ok() && !matches!(witness, WitnessCheck::Failed { .. });
        report.all_verified &= ok;
        report.nodes.push(NodeSection {
            dir: trail.dir.display().to_string(),
            node: signer,
            verified: verified.is_ok(),
            failure: verified.as_ref().err().map(ToString::to_string),
            verify: verified.ok(),
            witness,
            records: records.len() as u64,
            unreadable,
            first: records.first().map(|r| str_of(r, "time").to_owned()),
            last: records.last().map(|r| str_of(r, "time").to_owned()),
        });
        acc.add_node(&node, &records, filter);
    }
    acc.finish(&mut report);
    report
}

/// What the records add up to, across nodes.
#[derive(Debug, Default)]
struct Aggregates {
    accesses: BTreeMap<(String, String, Option<String>, String), AccessRow>,
    refusals: Vec<(SystemTime, RefusalRow)>,
    identity: Vec<(SystemTime, IdentityRow)>,
    policy: Vec<(SystemTime, PolicyChange)>,
    transfers: BTreeMap<(String, String), TransferRow>,
    emergency: BTreeMap<(String, String), EmergencyRow>,
    decisions: Vec<(SystemTime, bool)>,
}

impl Aggregates {
    fn add_node(&mut self, node: &str, records: &[Value], filter: &ReportFilter) {
        // The class each dataset had at its latest decision on this node, for transfers.
        let mut classes: HashMap<String, Option<String>> = HashMap::new();
        let mut previous_policy: Option<Vec<String>> = None;
        for r in records {
            let event = str_of(r, "event");
            let Some(time) = humantime::parse_rfc3339(str_of(r, "time")).ok() else {
                continue;
            };
            let in_window =
                filter.from.is_none_or(|f| time >= f) && filter.to.is_none_or(|t| time < t);
            let dataset = r["dataset"].as_str();
            let class = match event {
                "authorization" => {
                    let c = r["class"].as_str().map(str::to_owned);
                    if let Some(d) = dataset {
                        classes.insert(d.to_owned(), c.clone());
                    }
                    c
                }
                _ => dataset.and_then(|d| classes.get(d).cloned().flatten()),
            };
            // Policy state is followed over the whole trail, so the first change in the
            // window is diffed against the policy in force before it.
            if event == "policy_loaded" {
                let lines: Vec<String> = r["policy"]
                    .as_array()
                    .map(|a| {
                        a.iter()
                            .filter_map(|l| l.as_str().map(str::to_owned))
                            .collect()
                    })
                    .unwrap_or_default();
                if in_window {
                    let diff = match &previous_policy {
                        Some(prev) => diff(prev, &lines),
                        None => lines.iter().map(|l| format!("+ {l}")).collect(),
                    };
                    self.policy.push((
                        time,
                        PolicyChange {
                            node: node.to_owned(),
                            time: str_of(r, "time").to_owned(),
                            source: str_of(r, "source").to_owned(),
                            digest: str_of(r, "digest").to_owned(),
                            rules: r["rules"].as_u64().unwrap_or(0),
                            has_previous: previous_policy.is_some(),
                            lines_recorded: r["policy"].is_array(),
                            diff,
                        },
                    ));
                }
                previous_policy = Some(lines);
                continue;
            }
            if !in_window {
                continue;
            }
            let about_data = dataset.is_some();
            let data_match = filter.dataset.as_deref().is_none_or(|d| dataset == Some(d))
                && filter
                    .class
                    .is_none_or(|c| class.as_deref() == Some(c.as_str()));
            if about_data && !data_match {
                continue;
            }
            self.add(node, time, event, r, class);
        }
    }

    fn add(&mut self, node: &str, time: SystemTime, event: &str, r: &Value, class: Option<String>) {
        let s = |k: &str| str_of(r, k).to_owned();
        let t = s("time");
        let refusal = |who: String, what: String, reason: String, count: u64| RefusalRow {
            node: node.to_owned(),
            time: t.clone(),
            event: event.to_owned(),
            who,
            what,
            reason,
            count,
        };
        let identity = |kind: &str, id: String, serial: String, detail: String| IdentityRow {
            node: node.to_owned(),
            time: t.clone(),
            kind: kind.to_owned(),
            id,
            serial,
            detail,
        };
        match event {
            "authorization" => {
                let allowed = s("decision") == "allow";
                self.decisions.push((time, allowed));
                let key = (s("peer"), s("dataset"), class.clone(), s("action"));
                let row = self.accesses.entry(key).or_insert_with(|| AccessRow {
                    identity: s("peer"),
                    dataset: s("dataset"),
                    class,
                    action: s("action"),
                    allowed: 0,
                    denied: 0,
                    first: t.clone(),
                    last: t.clone(),
                    nodes: Vec::new(),
                });
                if allowed {
                    row.allowed += 1;
                } else {
                    row.denied += 1;
                }
                if t < row.first {
                    row.first.clone_from(&t);
                }
                if t > row.last {
                    row.last.clone_from(&t);
                }
                if !row.nodes.iter().any(|n| n == node) {
                    row.nodes.push(node.to_owned());
                }
                if !allowed {
                    let what = format!("{} {}", s("action"), s("dataset"));
                    let reason = match r["rule"].as_str() {
                        Some(rule) if !s("reason").contains(rule) => {
                            format!("{} (rule {rule:?})", s("reason"))
                        }
                        _ => s("reason"),
                    };
                    self.refusals
                        .push((time, refusal(s("peer"), what, reason, 1)));
                }
            }
            "connection_refused" => {
                let reason = format!("{} ({})", s("reason"), s("class"));
                self.refusals
                    .push((time, refusal(s("addr"), s("path"), reason, 1)));
            }
            "connections_refused" => {
                let reason = format!(
                    "{} more {} refusals from {} to {}",
                    r["count"],
                    s("class"),
                    s("first"),
                    s("last")
                );
                let count = r["count"].as_u64().unwrap_or(0);
                self.refusals
                    .push((time, refusal(s("source"), s("path"), reason, count)));
            }
            "connection_closed" => self.refusals.push((
                time,
                refusal(s("peer"), "connection".into(), s("reason"), 1),
            )),
            "issuance_refused" => {
                let who = r["node"].as_str().or(r["addr"].as_str()).unwrap_or("");
                self.refusals
                    .push((time, refusal(who.into(), "svid".into(), s("reason"), 1)));
                self.identity.push((
                    time,
                    identity("issuance_refused", who.into(), String::new(), s("reason")),
                ));
            }
            "workload_refused" => {
                let who = r["uid"]
                    .as_u64()
                    .map(|u| format!("uid {u}"))
                    .unwrap_or_default();
                self.refusals
                    .push((time, refusal(who, "workload api".into(), s("reason"), 1)));
            }
            "local_request" if s("outcome") != "ok" => {
                let who = r["id"]
                    .as_str()
                    .map_or_else(|| format!("uid {}", r["uid"]), str::to_owned);
                let what = format!("{} {}", s("op"), r["dataset"].as_str().unwrap_or_default());
                self.refusals
                    .push((time, refusal(who, what, s("outcome"), 1)));
            }
            "local_requests_refused" => {
                let who = r["uid"]
                    .as_u64()
                    .map(|u| format!("uid {u}"))
                    .unwrap_or_default();
                let count = r["count"].as_u64().unwrap_or(0);
                self.refusals.push((
                    time,
                    refusal(who, "sidecar".into(), "permission_denied".into(), count),
                ));
            }
            "policy_refused" => self
                .refusals
                .push((time, refusal(String::new(), s("source"), s("reason"), 1))),
            "witness_refused" => self.refusals.push((
                time,
                refusal(
                    s("node"),
                    format!("checkpoint {}", r["seq"]),
                    s("reason"),
                    1,
                ),
            )),
            "identity_refused" => {
                self.refusals.push((
                    time,
                    refusal(String::new(), "identity".into(), s("reason"), 1),
                ));
                self.identity.push((
                    time,
                    identity("refused", String::new(), String::new(), s("reason")),
                ));
            }
            "svid_issued" => {
                let detail = format!(
                    "{} SVID by {}{}, expires {}",
                    s("kind"),
                    s("how"),
                    r["requester"]
                        .as_str()
                        .map(|q| format!(" for {q}"))
                        .unwrap_or_default(),
                    s("not_after")
                );
                self.identity
                    .push((time, identity("issued", s("id"), s("serial"), detail)));
            }
            "identity_loaded" => self.identity.push((
                time,
                identity(
                    "loaded",
                    s("id"),
                    s("serial"),
                    format!("expires {}", s("not_after")),
                ),
            )),
            "identity_rotated" => self.identity.push((
                time,
                identity(
                    "rotated",
                    s("id"),
                    s("serial"),
                    format!("replaces {}, expires {}", s("previous"), s("not_after")),
                ),
            )),
            "node_banned" => {
                let revoked: Vec<&str> = r["revoked"]
                    .as_array()
                    .map(|a| a.iter().filter_map(Value::as_str).collect())
                    .unwrap_or_default();
                self.identity.push((
                    time,
                    identity(
                        "banned",
                        s("node"),
                        revoked.join(", "),
                        format!("{} SVIDs revoked", revoked.len()),
                    ),
                ));
            }
            "trust_updated" => self.identity.push((
                time,
                identity(
                    "trust_updated",
                    String::new(),
                    String::new(),
                    format!("{} CAs, {} serials revoked", r["cas"], r["revoked"]),
                ),
            )),
            "join_token_created" => self.identity.push((
                time,
                identity(
                    "token_created",
                    s("node"),
                    String::new(),
                    format!("expires {}", s("expires_at")),
                ),
            )),
            "entry_changed" => self.identity.push((
                time,
                identity(
                    &format!("entry_{}", s("change")),
                    s("spiffe_id"),
                    String::new(),
                    format!("entry {} under {}", s("entry"), s("parent_id")),
                ),
            )),
            "ca_changed" => self.identity.push((
                time,
                identity(
                    &format!("ca_{}", s("change")),
                    String::new(),
                    s("serial"),
                    format!("expires {}", s("not_after")),
                ),
            )),
            "transfer" => {
                let key = (s("path"), s("direction"));
                let row = self.transfers.entry(key).or_insert_with(|| TransferRow {
                    path: s("path"),
                    direction: s("direction"),
                    transfers: 0,
                    complete: 0,
                    bytes: 0,
                });
                row.transfers += 1;
                row.complete += u64::from(s("outcome") == "complete");
                row.bytes += r["bytes"].as_u64().unwrap_or(0);
            }
            e if e.starts_with("emergency_") => self.emergency_event(node, time, e, r),
            _ => {}
        }
    }

    /// Follows one emergency grant through its records; refused grant requests go to the
    /// refusals.
    fn emergency_event(&mut self, node: &str, at: SystemTime, event: &str, r: &Value) {
        let s = |k: &str| str_of(r, k).to_owned();
        let time = s("time");
        if event == "emergency_refused" {
            let who = format!("operator uid {}", r["operator_uid"]);
            let what = format!("emergency {} {}", s("op"), s("grant"))
                .trim_end()
                .to_owned();
            self.refusals.push((
                at,
                RefusalRow {
                    node: node.to_owned(),
                    time,
                    event: event.to_owned(),
                    who,
                    what,
                    reason: s("error"),
                    count: 1,
                },
            ));
            return;
        }
        let row = self
            .emergency
            .entry((node.to_owned(), s("grant")))
            .or_insert_with(|| EmergencyRow {
                node: node.to_owned(),
                grant: s("grant"),
                peer: s("peer"),
                dataset: s("dataset"),
                reason: s("reason"),
                expires_at: s("expires_at"),
                ..EmergencyRow::default()
            });
        match event {
            "emergency_granted" => {
                row.actions = r["actions"]
                    .as_array()
                    .map(|a| {
                        a.iter()
                            .filter_map(|v| v.as_str().map(str::to_owned))
                            .collect()
                    })
                    .unwrap_or_default();
                row.granted_at = time;
                row.granted_by = r["operator_uid"].as_u64();
            }
            "emergency_approved" => row.approved_by = r["operator_uid"].as_u64(),
            "emergency_used" => row.uses += 1,
            "emergency_expired" | "emergency_revoked" => {
                row.ended = event.trim_start_matches("emergency_").to_owned();
                row.ended_at = time;
            }
            _ => {}
        }
    }

    fn finish(mut self, report: &mut EvidenceReport) {
        report.accesses = self.accesses.into_values().collect();
        self.refusals.sort_by_key(|(t, _)| *t);
        report.refusals = self.refusals.into_iter().map(|(_, r)| r).collect();
        self.identity.sort_by_key(|(t, _)| *t);
        report.identity_events = self.identity.into_iter().map(|(_, r)| r).collect();
        self.policy.sort_by_key(|(t, _)| *t);
        report.policy_changes = self.policy.into_iter().map(|(_, r)| r).collect();
        report.transfers = self.transfers.into_values().collect();
        report.emergency = self.emergency.into_values().collect();
        (report.timeline, report.bucket_secs) = timeline(&self.decisions);
    }
}

/// Buckets decisions so the timeline has at most [`MAX_BUCKETS`] bars.
fn timeline(decisions: &[(SystemTime, bool)]) -> (Vec<TimeBucket>, u64) {
    let secs = |t: &SystemTime| {
        t.duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs()
    };
    let (Some(first), Some(last)) = (
        decisions.iter().map(|(t, _)| secs(t)).min(),
        decisions.iter().map(|(t, _)| secs(t)).max(),
    ) else {
        return (Vec::new(), 0);
    };
    let width = BUCKET_WIDTHS
        .iter()
        .copied()
        .find(|w| (last / w - first / w) < MAX_BUCKETS)
        .unwrap_or(BUCKET_WIDTHS[BUCKET_WIDTHS.len() - 1]);
    let start = first / width;
    let n = (last / width - start + 1) as usize;
    let mut buckets: Vec<TimeBucket> = (0..n as u64)
        .map(|i| TimeBucket {
            start: rfc3339(SystemTime::UNIX_EPOCH + Duration::from_secs((start + i) * width)),
            allowed: 0,
            denied: 0,
        })
        .collect();
    for (t, allowed) in decisions {
        let i = (secs(t) / width - start) as usize;
        if let Some(b) = buckets.get_mut(i) {
            if *allowed {
                b.allowed += 1;
            } else {
                b.denied += 1;
            }
        }
    }
    (buckets, width)
}

/// Lines of `prev` not in `next` (`- `), then lines of `next` not in `prev` (`+ `).
fn diff(prev: &[String], next: &[String]) -> Vec<String> {
    let removed = prev
        .iter()
        .filter(|l| !next.contains(l))
        .map(|l| format!("- {l}"));
    let added = next
        .iter()
        .filter(|l| !prev.contains(l))
        .map(|l| format!("+ {l}"));
    removed.chain(added).collect()
}

/// The records of the trail in `dir` that parse as JSON, in order, and how many lines did
/// not. Reads what it can: a report on a broken trail still shows the rest.
fn read_records(dir: &Path) -> (Vec<Value>, u64) {
    let mut records = Vec::new();
    let mut unreadable = 0;
    for (_, path) in segments(dir).unwrap_or_default() {
        let Ok(bytes) = std::fs::read(&path) else {
            unreadable += 1;
            continue;
        };
        for line in bytes.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
            match serde_json::from_slice::<Value>(line) {
                Ok(v) if v.is_object() => records.push(v),
                _ => unreadable += 1,
            }
        }
    }
    (records, unreadable)
}

fn str_of<'a>(v: &'a Value, key: &str) -> &'a str {
    v[key].as_str().unwrap_or_default()
}

fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

/// Timeline bucket widths tried in turn, seconds: a minute up to a week.
const BUCKET_WIDTHS: [u64; 9] = [
    60,
    300,
    900,
    3600,
    3 * 3600,
    6 * 3600,
    86_400,
    7 * 86_400,
    30 * 86_400,
];
/// Timeline bars at most, so the chart stays readable.
const MAX_BUCKETS: u64 = 48;

#[cfg(test)]
mod tests;
