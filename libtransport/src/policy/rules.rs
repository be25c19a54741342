//! The policy engine: data classes, allow and deny rules, and how they combine. Pure: no
//! I/O, no clock; `policy/file.rs` builds a [`Policy`] from TOML.
//!
//! Precedence, in this order:
//! 1. a matching `deny` rule denies, whatever else matches;
//! 2. otherwise a matching `allow` rule allows (the first in file order is named);
//! 3. otherwise the request is denied ("no rule allows it").
//!
//! A rule matches an access when the peer matches one of its subjects and none of its
//! exceptions, the dataset matches one of its dataset patterns, the action is listed, the
//! dataset's class is among the rule's classes (if it names any), and, if the rule names
//! object patterns, the request names an object that matches one (requests that name no
//! object, such as listing a dataset, never match an object-scoped rule).

use std::fmt;

use certs::SpiffeId;
use globset::{Glob, GlobBuilder, GlobMatcher};

use super::{Access, Authorizer, Decision};
use crate::vocab::Action;

/// Why a subject, a pattern or a set of rules was refused ([`Subject::parse`],
/// [`Pattern::new`], [`Policy::new`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RuleError {
    /// A subject is neither `*` nor a valid SPIFFE ID (optionally followed by `/*`).
    #[error("{subject:?}: {source}")]
    SubjectId {
        /// The subject as written.
        subject: String,
        /// Why it is not a SPIFFE ID.
        #[source]
        source: certs::IdError,
    },
    /// A subject has a wildcard somewhere other than a final `/*`.
    #[error("{subject:?}: a wildcard may only end a subject, as in spiffe://td/path/*")]
    SubjectWildcard {
        /// The subject as written.
        subject: String,
    },
    /// A dataset or object pattern is empty.
    #[error("empty pattern")]
    EmptyPattern,
    /// A dataset or object pattern is not a valid glob.
    #[error("{pattern:?}: {source}")]
    Glob {
        /// The pattern as written.
        pattern: String,
        /// Why it does not compile.
        #[source]
        source: globset::Error,
    },
    /// Two rules have the same name.
    #[error("rule name {name:?} is used twice")]
    DuplicateName {
        /// The name used twice.
        name: String,
    },
}

/// A dataset's data class: how sensitive its contents are.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DataClass {
    /// Protected health information.
    Phi,
    /// De-identified data derived from PHI.
    Deidentified,
    /// Public data.
    Public,
}

impl DataClass {
    /// The lower-case name used in policy files.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Phi => "phi",
            Self::Deidentified => "deidentified",
            Self::Public => "public",
        }
    }
}

impl fmt::Display for DataClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a rule does when it matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Effect {
    /// Allows the access, unless a deny rule also matches.
    Allow,
    /// Denies the access, whatever else matches.
    Deny,
}

impl fmt::Display for Effect {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Allow => "allow",
            Self::Deny => "deny",
        })
    }
}

/// Which peers a rule is about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Subject {
    /// Any authenticated peer: `*`.
    Any,
    /// Exactly this ID.
    Exact(SpiffeId),
    /// Every ID below a path of a trust domain: `spiffe://td/path/*` (or `spiffe://td/*`
    /// for the whole trust domain). The path itself is not below itself.
    Under {
        /// The trust domain.
        trust_domain: String,
        /// The path prefix, empty or starting with `/`, without a trailing slash.
        path: String,
    },
}

impl Subject {
    /// Parses `*`, `spiffe://td/path` or `spiffe://td/path/*`.
    pub fn parse(s: &str) -> Result<Self, RuleError> {
        let invalid_id = |source| RuleError::SubjectId {
            subject: s.to_owned(),
            source,
        };
        if s == "*" {
            return Ok(Self::Any);
        }
        if let Some(base) = s.strip_suffix("/*") {
            let id = SpiffeId::parse(base).map_err(invalid_id)?;
            return Ok(Self::Under {
                trust_domain: id.trust_domain_name().to_owned(),
                path: id.path().to_owned(),
            });
        }
        if s.contains('*') {
            return Err(RuleError::SubjectWildcard {
                subject: s.to_owned(),
            });
        }
        SpiffeId::parse(s).map(Self::Exact).map_err(invalid_id)
    }

    /// True if `id` is one of the peers this subject names.
    pub fn matches(&self, id: &SpiffeId) -> bool {
        match self {
            Self::Any => true,
            Self::Exact(e) => e == id,
            Self::Under { trust_domain, path } => {
                id.trust_domain_name() == trust_domain
                    && id
                        .path()
                        .strip_prefix(path.as_str())
                        .is_some_and(|rest| rest.starts_with('/'))
            }
        }
    }
}

impl fmt::Display for Subject {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Any => f.write_str("*"),
            Self::Exact(id) => write!(f, "{id}"),
            Self::Under { trust_domain, path } => write!(f, "spiffe://{trust_domain}{path}/*"),
        }
    }
}

/// A dataset-name or object-path pattern: a literal or a glob (`*`, `?`, `[...]`, and in
/// object paths `**` across directories; a single `*` stays within one directory).
#[derive(Clone)]
pub struct Pattern {
    text: String,
    matcher: GlobMatcher,
}

impl Pattern {
    /// Compiles `text`.
    pub fn new(text: &str) -> Result<Self, RuleError> {
        if text.is_empty() {
            return Err(RuleError::EmptyPattern);
        }
        let glob: Glob = GlobBuilder::new(text)
            .literal_separator(true)
            .backslash_escape(true)
            .build()
            .map_err(|source| RuleError::Glob {
                pattern: text.to_owned(),
                source,
            })?;
        Ok(Self {
            text: text.to_owned(),
            matcher: glob.compile_matcher(),
        })
    }

    /// True if `s` matches.
    pub fn matches(&self, s: &str) -> bool {
        self.matcher.is_match(s)
    }

    /// The pattern as written.
    pub fn as_str(&self) -> &str {
        &self.text
    }
}

impl fmt::Debug for Pattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Pattern({:?})", self.text)
    }
}

/// Which datasets carry a data class.
#[derive(Debug, Clone)]
pub struct ClassDeclaration {
    /// Dataset names (or globs) this declaration covers.
    pub datasets: Pattern,
    /// Their class.
    pub class: DataClass,
    /// Where it was declared (1-based line), if it came from a file.
    pub line: Option<usize>,
}

/// One rule.
#[derive(Debug, Clone)]
pub struct Rule {
    /// Its name, unique in the policy; decisions and the audit trail quote it.
    pub name: String,
    /// Allow or deny.
    pub effect: Effect,
    /// Peers it is about.
    pub subjects: Vec<Subject>,
    /// Peers it is not about, even if a subject matches.
    pub except: Vec<Subject>,
    /// Datasets it is about.
    pub datasets: Vec<Pattern>,
    /// Objects it is about; empty: the whole dataset (and requests that name no object).
    pub objects: Vec<Pattern>,
    /// Data classes it is about; empty: any, including unclassified datasets.
    pub classes: Vec<DataClass>,
    /// Actions it is about.
    pub actions: Vec<Action>,
    /// Where it was declared (1-based line), if it came from a file.
    pub line: Option<usize>,
}

impl Rule {
    fn matches(&self, access: &Access<'_>, class: Option<DataClass>) -> bool {
        self.actions.contains(&access.action)
            && self.subjects.iter().any(|s| s.matches(access.peer))
            && !self.except.iter().any(|s| s.matches(access.peer))
            && self
                .datasets
                .iter()
                .any(|p| p.matches(access.dataset.as_str()))
            && (self.classes.is_empty() || class.is_some_and(|c| self.classes.contains(&c)))
            && (self.objects.is_empty()
                || access
                    .object
                    .is_some_and(|o| self.objects.iter().any(|p| p.matches(o.as_str()))))
    }

    fn describe(&self) -> String {
        match self.line {
            Some(l) => format!("rule {:?} (line {l})", self.name),
            None => format!("rule {:?}", self.name),
        }
    }
}

/// A default-deny policy: data classes and rules. Build with `Policy::parse` (TOML) or
/// [`Policy::new`].
#[derive(Debug, Clone, Default)]
pub struct Policy {
    classes: Vec<ClassDeclaration>,
    rules: Vec<Rule>,
}

impl Policy {
    /// A policy from declarations and rules. Rule names must be unique.
    pub fn new(classes: Vec<ClassDeclaration>, rules: Vec<Rule>) -> Result<Self, RuleError> {
        for (i, r) in rules.iter().enumerate() {
            if rules[..i].iter().any(|o| o.name == r.name) {
                return Err(RuleError::DuplicateName {
                    name: r.name.clone(),
                });
            }
        }
        Ok(Self { classes, rules })
    }

    /// The rules, in file order.
    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }

    /// The class declarations, in file order.
    pub fn classes(&self) -> &[ClassDeclaration] {
        &self.classes
    }

    /// The class of a dataset: the first declaration that covers it.
    pub fn class_of(&self, dataset: &str) -> Option<DataClass> {
        self.classes
            .iter()
            .find(|c| c.datasets.matches(dataset))
            .map(|c| c.class)
    }

    /// The policy as canonical lines, one per class declaration and rule, in file order:
    /// `class phi: ct-*` and `allow "name": subjects ...; datasets ...; actions ...`. The
    /// audit trail records them with each load (bounded, see
    /// [`crate::audit::MAX_POLICY_LINES`]), so a report can show what changed between loads.
    pub fn lines(&self) -> Vec<String> {
        let join = |v: Vec<String>| v.join(", ");
        let classes = self
            .classes
            .iter()
            .map(|c| format!("class {}: {}", c.class, c.datasets.as_str()));
        let rules = self.rules.iter().map(|r| {
            let mut s = format!(
                "{} {:?}: subjects {}",
                r.effect,
                r.name,
                join(r.subjects.iter().map(ToString::to_string).collect())
            );
            if !r.except.is_empty() {
                s += &format!(
                    "; except {}",
                    join(r.except.iter().map(ToString::to_string).collect())
                );
            }
            s += &format!(
                "; datasets {}",
                join(r.datasets.iter().map(|p| p.as_str().to_owned()).collect())
            );
            if !r.objects.is_empty() {
                s += &format!(
                    "; objects {}",
                    join(r.objects.iter().map(|p| p.as_str().to_owned()).collect())
                );
            }
            if !r.classes.is_empty() {
                s += &format!(
                    "; classes {}",
                    join(r.classes.iter().map(ToString::to_string).collect())
                );
            }
            s + &format!(
                "; actions {}",
                join(r.actions.iter().map(ToString::to_string).collect())
            )
        });
        classes.chain(rules).collect()
    }

    /// Decides `access` and says why: every rule that matched and which one decided.
    pub fn explain(&self, access: &Access<'_>) -> Explanation {
        let class = self.class_of(access.dataset.as_str());
        let matched: Vec<&Rule> = self
            .rules
            .iter()
            .filter(|r| r.matches(access, class))
            .collect();
        let deciding = matched
            .iter()
            .find(|r| r.effect == Effect::Deny)
            .or_else(|| matched.iter().find(|r| r.effect == Effect::Allow))
            .copied();
        let decision = match deciding {
            Some(r) if r.effect == Effect::Allow => Decision::Allow {
                rule: r.name.clone(),
            },
            Some(r) => Decision::Deny {
                rule: Some(r.name.clone()),
                reason: format!("denied by {}", r.describe()),
            },
            None => Decision::Deny {
                rule: None,
                reason: "no rule allows it".into(),
            },
        };
        Explanation {
            decision,
            class,
            matched: matched
                .iter()
                .map(|r| MatchedRule {
                    name: r.name.clone(),
                    effect: r.effect,
                    line: r.line,
                })
                .collect(),
            deciding: deciding.map(|r| r.name.clone()),
        }
    }
}

impl Authorizer for Policy {
    fn decide(&self, access: &Access<'_>) -> Decision {
        self.explain(access).decision
    }

    fn class_of(&self, dataset: &crate::proto::DatasetName) -> Option<DataClass> {
        Self::class_of(self, dataset.as_str())
    }
}

/// Why a policy decided as it did.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Explanation {
    /// The decision.
    pub decision: Decision,
    /// The dataset's data class, if declared.
    pub class: Option<DataClass>,
    /// Every rule that matched, in file order.
    pub matched: Vec<MatchedRule>,
    /// The rule that decided; none for the default deny.
    pub deciding: Option<String>,
}

/// A rule that matched an access.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct MatchedRule {
    /// Its name.
    pub name: String,
    /// Allow or deny.
    pub effect: Effect,
    /// Its line in the policy file.
    pub line: Option<usize>,
}
