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
        Decision::Emergency { grant, .. } => format!("ALLOW by emergency grant {grant}"),
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

/// `policy grant --emergency`, `approve`, `revoke-emergency`, `list-emergency`: calls to
/// a running node's admin socket.
pub(crate) mod emergency {
    use std::path::PathBuf;

    use anyhow::Context;
    use certs::SpiffeId;
    use hyper::Method;
    use libtransport::proto::DatasetName;
    use serde::Serialize;
    use serde::de::DeserializeOwned;

    use crate::cli::NodeAdminTarget;
    use crate::config::NodeConfig;
    use crate::role::issuer::http::{self, CallError};
    use crate::role::node::{GrantRequest, GrantView};

    /// What `policy grant --emergency` asks for.
    #[derive(Debug)]
    pub(crate) struct Grant {
        pub(crate) peer: String,
        pub(crate) dataset: String,
        pub(crate) ttl: std::time::Duration,
        pub(crate) reason: String,
        pub(crate) write: bool,
        pub(crate) prefix: Option<String>,
    }

    /// Gives a grant and prints it.
    pub(crate) async fn grant(
        target: &NodeAdminTarget,
        g: Grant,
        json: bool,
    ) -> anyhow::Result<()> {
        let req = GrantRequest {
            peer: SpiffeId::parse(&g.peer).context("--peer")?,
            dataset: DatasetName::new(&g.dataset).context("--dataset")?,
            write: g.write,
            object_prefix: g.prefix,
            ttl_secs: g.ttl.as_secs(),
            reason: g.reason,
        };
        let v: GrantView = call(target, Method::POST, "/v1/emergency", Some(&req)).await?;
        print(&[v], json)
    }

    /// Approves a pending grant.
    pub(crate) async fn approve(
        target: &NodeAdminTarget,
        id: &str,
        json: bool,
    ) -> anyhow::Result<()> {
        let route = format!("/v1/emergency/{}/approve", checked(id)?);
        let v: GrantView = call(target, Method::POST, &route, None::<&()>).await?;
        print(&[v], json)
    }

    /// Revokes a grant.
    pub(crate) async fn revoke(
        target: &NodeAdminTarget,
        id: &str,
        json: bool,
    ) -> anyhow::Result<()> {
        let route = format!("/v1/emergency/{}", checked(id)?);
        let v: GrantView = call(target, Method::DELETE, &route, None::<&()>).await?;
        print(&[v], json)
    }

    /// Lists the grants held.
    pub(crate) async fn list(target: &NodeAdminTarget, json: bool) -> anyhow::Result<()> {
        let v: Vec<GrantView> = call(target, Method::GET, "/v1/emergency", None::<&()>).await?;
        if v.is_empty() && !json {
            println!("no emergency grants");
            return Ok(());
        }
        print(&v, json)
    }

    /// The node refused a request (exit 64 for a bad request, 66 for an unknown grant, 77
    /// for an operator who may not do it, 75 if it could not be recorded).
    #[derive(Debug, thiserror::Error)]
    #[error("{message}")]
    pub(crate) struct Refused {
        pub(crate) status: u16,
        pub(crate) message: String,
    }

    /// The node's admin socket could not be reached.
    #[derive(Debug, thiserror::Error)]
    #[error("{0}")]
    pub(crate) struct Unreachable(pub(crate) String);

    fn checked(id: &str) -> anyhow::Result<&str> {
        if id.is_empty() || !id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') {
            anyhow::bail!("{id:?} is not a grant ID (eg-...)");
        }
        Ok(id)
    }

    async fn call<B: Serialize, T: DeserializeOwned>(
        target: &NodeAdminTarget,
        method: Method,
        route: &str,
        body: Option<&B>,
    ) -> anyhow::Result<T> {
        let socket: PathBuf = match (&target.socket, &target.config) {
            (Some(s), _) => s.clone(),
            (None, Some(c)) => NodeConfig::load(c)?.emergency.socket,
            (None, None) => anyhow::bail!("give --config NODE.toml or --socket PATH"),
        };
        let stream = tokio::net::UnixStream::connect(&socket)
            .await
            .map_err(|e| {
                Unreachable(format!(
                    "cannot reach the node's admin socket {}: {e}; is `transportd node` running, \
                 and are you its user, root or of its [emergency] group?",
                    socket.display()
                ))
            })?;
        match http::call(stream, method, route, body).await {
            Ok(v) => Ok(v),
            Err(CallError::Refused { status, message }) => Err(Refused {
                status: status.as_u16(),
                message,
            }
            .into()),
            Err(e) => Err(Unreachable(e.to_string()).into()),
        }
    }

    fn print(grants: &[GrantView], json: bool) -> anyhow::Result<()> {
        if json {
            for g in grants {
                println!("{}", serde_json::to_string(g)?);
            }
            return Ok(());
        }
        for g in grants {
            let prefix = g
                .object_prefix
                .as_deref()
                .map(|p| format!(" under {p}"))
                .unwrap_or_default();
            println!(
                "{}  {:<7}  {} may {} {}{prefix} until {} ({}s left; granted by uid {}{})",
                g.id,
                g.state,
                g.peer,
                g.actions.join(","),
                g.dataset,
                g.expires_at,
                g.remaining_secs,
                g.granted_by,
                g.approved_by
                    .map(|u| format!(", approved by uid {u}"))
                    .unwrap_or_default()
            );
        }
        Ok(())
    }
}
