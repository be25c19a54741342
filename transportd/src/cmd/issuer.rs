//! `transportd issuer ...`: run the issuer, or drive a running one through its admin socket.

use std::path::PathBuf;

use anyhow::Context;
use certs::{RegistrationEntry, Selector, SpiffeId};
use hyper::Method;
use serde_json::Value;

use crate::cli::{
    AdminTarget, EntryCommand, IssuerArgs, IssuerCaCommand, IssuerCommand, NodeCommand,
    TokenCommand, WitnessCommand,
};
use crate::config::issuer::{ISSUER_EXAMPLE, IssuerConfig};
use crate::role::issuer::admin::AdminClient;
use crate::role::issuer::wire::{
    Ban, Banned, CaInfo, CaStep, EntryCreate, TokenCreate, TokenCreated, WitnessExport,
};

/// Dispatches `transportd issuer`.
pub(crate) async fn run(args: IssuerArgs) -> anyhow::Result<()> {
    let Some(command) = args.command else {
        let config = args.config.context(
            "give --config ISSUER.TOML to run the issuer (see `transportd issuer example`)",
        )?;
        return crate::role::issuer::run(&config).await;
    };
    match command {
        IssuerCommand::Example => {
            print!("{ISSUER_EXAMPLE}");
            Ok(())
        }
        IssuerCommand::Check { file } => check(&file),
        IssuerCommand::Bundle { target, all } => {
            let route = if all { "/v1/bundle/all" } else { "/v1/bundle" };
            let v: Value = client(&target)?
                .call(Method::GET, route, None::<&()>)
                .await?;
            print!("{}", v["bundle"].as_str().unwrap_or_default());
            Ok(())
        }
        IssuerCommand::Witness(WitnessCommand::Export { target, node }) => {
            let node = SpiffeId::parse(&node).context("--node")?;
            let receipts: Vec<libtransport::audit::Receipt> = client(&target)?
                .call(
                    Method::POST,
                    "/v1/witness/export",
                    Some(&WitnessExport { node: node.clone() }),
                )
                .await?;
            for r in &receipts {
                println!("{}", serde_json::to_string(r)?);
            }
            eprintln!("{} witnessed checkpoints for {node}", receipts.len());
            Ok(())
        }
        IssuerCommand::Status { target, json } => {
            let v: Value = client(&target)?
                .call(Method::GET, "/v1/status", None::<&()>)
                .await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                print_status(&v);
            }
            Ok(())
        }
        IssuerCommand::Token(TokenCommand::Create {
            target,
            node,
            ttl,
            json,
        }) => {
            let node = SpiffeId::parse(&node).context("--node")?;
            let t: TokenCreated = client(&target)?
                .call(
                    Method::POST,
                    "/v1/tokens",
                    Some(&TokenCreate {
                        node,
                        ttl_secs: ttl.as_secs(),
                    }),
                )
                .await?;
            if json {
                println!("{}", serde_json::to_string(&t)?);
            } else {
                println!("{}", t.token);
                eprintln!(
                    "join token for {} (single use, expires {}); it is not shown again",
                    t.node, t.expires_at
                );
            }
            Ok(())
        }
        IssuerCommand::Entry(EntryCommand::Create {
            target,
            spiffe_id,
            parent_id,
            selectors,
            ttl,
            json,
        }) => {
            let req = EntryCreate {
                spiffe_id: SpiffeId::parse(&spiffe_id).context("--spiffe-id")?,
                parent_id: SpiffeId::parse(&parent_id).context("--parent-id")?,
                selectors: selectors
                    .iter()
                    .map(|s| s.parse::<Selector>())
                    .collect::<Result<_, _>>()
                    .context("--selector")?,
                ttl_secs: ttl.map(|t| t.as_secs()),
            };
            let e: RegistrationEntry = client(&target)?
                .call(Method::POST, "/v1/entries", Some(&req))
                .await?;
            if json {
                println!("{}", serde_json::to_string(&e)?);
            } else {
                println!("entry {} created", e.id);
                print_entry(&e);
            }
            Ok(())
        }
        IssuerCommand::Entry(EntryCommand::List { target, json }) => {
            let entries: Vec<RegistrationEntry> = client(&target)?
                .call(Method::GET, "/v1/entries", None::<&()>)
                .await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&entries)?);
            } else if entries.is_empty() {
                println!("no registration entries");
            } else {
                for e in &entries {
                    println!("entry {}", e.id);
                    print_entry(e);
                }
            }
            Ok(())
        }
        IssuerCommand::Entry(EntryCommand::Delete { target, id }) => {
            let e: RegistrationEntry = client(&target)?
                .call(Method::DELETE, &format!("/v1/entries/{id}"), None::<&()>)
                .await?;
            println!("entry {} deleted ({})", e.id, e.spiffe_id);
            Ok(())
        }
        IssuerCommand::Node(NodeCommand::Ban { target, id }) => {
            let node = SpiffeId::parse(&id).context("node ID")?;
            let b: Banned = client(&target)?
                .call(Method::POST, "/v1/nodes/ban", Some(&Ban { node }))
                .await?;
            println!(
                "node {} banned; {} live SVIDs revoked (nodes refuse them at their next sync)",
                b.node,
                b.revoked.len()
            );
            Ok(())
        }
        IssuerCommand::Ca(step) => {
            let (target, name, force) = match step {
                IssuerCaCommand::Prepare { target } => (target, "prepare", false),
                IssuerCaCommand::Activate { target } => (target, "activate", false),
                IssuerCaCommand::Retire { target, force } => (target, "retire", force),
            };
            let c: CaInfo = client(&target)?
                .call(
                    Method::POST,
                    &format!("/v1/ca/{name}"),
                    Some(&CaStep { force }),
                )
                .await?;
            println!(
                "CA {} is now {} (valid until {}, {} live SVIDs)",
                c.serial, c.state, c.not_after, c.live_svids
            );
            Ok(())
        }
    }
}

fn client(target: &AdminTarget) -> anyhow::Result<AdminClient> {
    let socket: PathBuf = match (&target.socket, &target.config) {
        (Some(s), _) => s.clone(),
        (None, Some(c)) => IssuerConfig::load(c)?.admin_socket,
        (None, None) => anyhow::bail!("give --config ISSUER.TOML or --socket PATH"),
    };
    Ok(AdminClient::new(socket))
}

fn check(file: &std::path::Path) -> anyhow::Result<()> {
    let cfg = IssuerConfig::load(file)?;
    cfg.passphrase.read(&|var| std::env::var(var).ok())?;
    println!(
        "{}: ok (trust domain {}, listen {}, SVID TTL {}, CA TTL {}, data in {})",
        file.display(),
        cfg.trust_domain,
        cfg.listen,
        humantime::format_duration(cfg.svid_ttl),
        humantime::format_duration(cfg.ca_ttl),
        cfg.data_dir.display()
    );
    Ok(())
}

fn print_entry(e: &RegistrationEntry) {
    println!("  spiffe id  {}", e.spiffe_id);
    println!("  parent id  {}", e.parent_id);
    for s in &e.selectors {
        println!("  selector   {s}");
    }
    if let Some(t) = e.ttl {
        println!("  ttl        {}", humantime::format_duration(t));
    }
}

fn print_status(v: &Value) {
    let s = |v: &Value| v.as_str().unwrap_or("").to_owned();
    println!("trust domain  {}", s(&v["trust_domain"]));
    println!("issuer        {}", s(&v["id"]));
    for c in v["cas"].as_array().into_iter().flatten() {
        println!(
            "CA {}  {:<9} until {}  {} live SVIDs",
            s(&c["serial"]),
            s(&c["state"]),
            s(&c["not_after"]),
            c["live_svids"]
        );
    }
    for n in v["nodes"].as_array().into_iter().flatten() {
        let banned = if n["banned_at"].is_null() {
            String::new()
        } else {
            format!("  BANNED {}", s(&n["banned_at"]))
        };
        println!(
            "node {}  last seen {}{banned}",
            s(&n["id"]),
            s(&n["last_seen"])
        );
    }
    let c = &v["counts"];
    println!(
        "{} entries, {} unused tokens, {} live SVIDs ({} revoked)",
        c["entries"], c["unused_tokens"], c["live_svids"], c["revoked_live_svids"]
    );
}
