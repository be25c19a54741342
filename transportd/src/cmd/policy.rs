//! `transportd policy check | explain | example`.

use std::path::Path;

use anyhow::Context;
use certs::SpiffeId;
use libtransport::policy::{Access, Action, Decision, Policy};
use libtransport::proto::{DatasetName, ObjectPath};

use crate::cli::ActionArg;
use crate::config::{ConfigError, NodeConfig};

/// `policy check FILE`.
pub(crate) fn check(file: &Path) -> anyhow::Result<()> {
    let policy = load(file)?;
    println!(
        "{}: ok ({} rules, {} class declarations)",
        file.display(),
        policy.rules().len(),
        policy.classes().len()
    );
    if policy.rules().is_empty() {
        eprintln!("warning: no rules, so every request will be denied");
    }
    Ok(())
}

/// The arguments of `policy explain`.
#[derive(Debug)]
pub(crate) struct ExplainArgs<'a> {
    pub(crate) policy: Option<&'a Path>,
    pub(crate) config: Option<&'a Path>,
    pub(crate) peer: &'a str,
    pub(crate) dataset: &'a str,
    pub(crate) object: Option<&'a str>,
    pub(crate) action: ActionArg,
    pub(crate) json: bool,
}

/// `policy explain`.
pub(crate) fn explain(a: &ExplainArgs<'_>) -> anyhow::Result<()> {
    let policy = match (a.policy, a.config) {
        (Some(p), _) => load(p)?,
        (None, Some(c)) => NodeConfig::load(c)?.policy.load()?.0,
        (None, None) => anyhow::bail!("give --policy FILE or --config NODE.toml"),
    };
    let peer = SpiffeId::parse(a.peer).context("--peer")?;
    let dataset = DatasetName::new(a.dataset).context("--dataset")?;
    let object = a
        .object
        .map(ObjectPath::new)
        .transpose()
        .context("--object")?;
    let action = match a.action {
        ActionArg::List => Action::List,
        ActionArg::Read => Action::Read,
        ActionArg::Write => Action::Write,
    };
    let e = policy.explain(&Access {
        peer: &peer,
        action,
        dataset: &dataset,
        object: object.as_ref(),
    });
    if a.json {
        println!("{}", serde_json::to_string_pretty(&e)?);
        return Ok(());
    }
    let verdict = match &e.decision {
        Decision::Allow { rule } => format!("ALLOW by rule {rule:?}"),
        Decision::Deny {
            rule: Some(rule), ..
        } => format!("DENY by rule {rule:?}"),
        Decision::Deny { rule: None, reason } => format!("DENY: {reason} (default deny)"),
    };
    println!("peer      {peer}");
    println!(
        "dataset   {dataset} ({})",
        e.class
            .map_or("no data class".to_owned(), |c| format!("class {c}"))
    );
    if let Some(o) = &object {
        println!("object    {o}");
    }
    println!("action    {action}");
    println!("decision  {verdict}");
    if e.matched.is_empty() {
        println!("matching rules: none");
    } else {
        println!("matching rules (deny rules win over allow rules):");
        for m in &e.matched {
            let mark = if e.deciding.as_deref() == Some(m.name.as_str()) {
                "  <- decided"
            } else {
                ""
            };
            let line = m.line.map(|l| format!(" (line {l})")).unwrap_or_default();
            println!("  {:<5} {:?}{line}{mark}", m.effect.to_string(), m.name);
        }
    }
    Ok(())
}

fn load(file: &Path) -> Result<Policy, ConfigError> {
    let text = std::fs::read_to_string(file).map_err(|source| ConfigError::Read {
        path: file.to_path_buf(),
        source,
    })?;
    Policy::parse(&text).map_err(|e| ConfigError::Parse {
        path: file.to_path_buf(),
        message: e.to_string(),
    })
}
