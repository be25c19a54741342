//! The policy file: TOML, its own file, every error naming its line. Unknown fields are
//! refused, so a typo never silently widens or narrows access.
//!
//! ```toml
//! # Datasets carry a data class: phi, deidentified or public.
//! [[dataset]]
//! name = "ct-*"                 # a name or a glob
//! class = "phi"
//!
//! [[rule]]
//! name = "loaders read training scans"
//! effect = "allow"              # allow (default) or deny; deny rules win
//! subjects = ["spiffe://hospital.example/gpu/*"]
//! datasets = ["ct-*"]
//! objects = ["train/**"]        # optional; without it the rule covers the whole dataset
//! actions = ["read"]
//!
//! [[rule]]
//! name = "PHI stays with the PHI trainers"
//! effect = "deny"
//! subjects = ["*"]
//! except = ["spiffe://hospital.example/phi/*"]
//! classes = ["phi"]
//! datasets = ["*"]
//! actions = ["list", "read", "write"]
//! ```

use std::fmt;
use std::ops::Range;

use serde::Deserialize;
use toml::Spanned;

use super::rules::{ClassDeclaration, DataClass, Effect, Pattern, Policy, Rule, Subject};
use crate::vocab::Action;

impl Policy {
    /// Parses a policy file. Errors name the line they are about.
    pub fn parse(text: &str) -> Result<Self, PolicyError> {
        let file: PolicyFile = toml::from_str(text).map_err(|e| PolicyError {
            line: e.span().map(|s| line_of(text, s.start)),
            message: e.message().trim().to_owned(),
        })?;
        let at = |span: Range<usize>| Some(line_of(text, span.start));
        let err = |span: Range<usize>, message: String| PolicyError {
            line: at(span),
            message,
        };
        let mut classes = Vec::new();
        for d in file.dataset {
            let span = d.span();
            let d = d.into_inner();
            let datasets = Pattern::new(d.name.get_ref())
                .map_err(|m| err(d.name.span(), format!("dataset name: {m}")))?;
            classes.push(ClassDeclaration {
                datasets,
                class: d.class,
                line: at(span),
            });
        }
        let mut rules = Vec::new();
        for r in file.rule {
            let span = r.span();
            let r = r.into_inner();
            let name = r.name.get_ref().trim().to_owned();
            if name.is_empty() {
                return Err(err(r.name.span(), "rule name is empty".into()));
            }
            let need = |what: &str, empty: bool| {
                if empty {
                    Err(err(
                        span.clone(),
                        format!("rule {name:?} lists no {what}; it could never match"),
                    ))
                } else {
                    Ok(())
                }
            };
            need("subjects", r.subjects.is_empty())?;
            need("datasets", r.datasets.is_empty())?;
            need("actions", r.actions.is_empty())?;
            let subjects = |list: &[Spanned<String>]| {
                list.iter()
                    .map(|s| {
                        Subject::parse(s.get_ref())
                            .map_err(|m| err(s.span(), format!("rule {name:?}: subject {m}")))
                    })
                    .collect::<Result<Vec<_>, _>>()
            };
            let patterns = |list: &[Spanned<String>], what: &str| {
                list.iter()
                    .map(|p| {
                        Pattern::new(p.get_ref())
                            .map_err(|m| err(p.span(), format!("rule {name:?}: {what} {m}")))
                    })
                    .collect::<Result<Vec<_>, _>>()
            };
            rules.push(Rule {
                subjects: subjects(&r.subjects)?,
                except: subjects(&r.except)?,
                datasets: patterns(&r.datasets, "dataset")?,
                objects: patterns(&r.objects, "object")?,
                classes: r.classes,
                actions: r.actions,
                effect: r.effect,
                line: at(span.clone()),
                name,
            });
        }
        Self::new(classes, rules).map_err(|e| PolicyError {
            line: None,
            message: e.to_string(),
        })
    }
}

/// Why a policy file was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyError {
    /// The 1-based line the problem is on, when known.
    pub line: Option<usize>,
    /// What is wrong.
    pub message: String,
}

impl fmt::Display for PolicyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.line {
            Some(l) => write!(f, "line {l}: {}", self.message),
            None => f.write_str(&self.message),
        }
    }
}

impl std::error::Error for PolicyError {}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PolicyFile {
    #[serde(default)]
    dataset: Vec<Spanned<DatasetFile>>,
    #[serde(default)]
    rule: Vec<Spanned<RuleFile>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DatasetFile {
    name: Spanned<String>,
    class: DataClass,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleFile {
    name: Spanned<String>,
    #[serde(default = "allow")]
    effect: Effect,
    #[serde(default)]
    subjects: Vec<Spanned<String>>,
    #[serde(default)]
    except: Vec<Spanned<String>>,
    #[serde(default)]
    datasets: Vec<Spanned<String>>,
    #[serde(default)]
    objects: Vec<Spanned<String>>,
    #[serde(default)]
    classes: Vec<DataClass>,
    #[serde(default)]
    actions: Vec<Action>,
}

fn allow() -> Effect {
    Effect::Allow
}

/// The 1-based line holding byte `offset` of `text`.
fn line_of(text: &str, offset: usize) -> usize {
    text.get(..offset).map_or(0, |t| t.matches('\n').count()) + 1
}
