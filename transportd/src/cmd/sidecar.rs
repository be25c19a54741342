//! `ls`, `pull` and `push` through a node's sidecar (`--sidecar` or
//! `TRANSPORTD_SIDECAR_SOCKET`): no identity of our own, no connection to the storage node.
//! The node attests this process, acts with its workload SVID, and hands objects over as
//! sealed memory files; `--node` names one of the sidecar's storage nodes (default: its
//! first).

use std::path::{Path, PathBuf};

use anyhow::Context;
use libtransport::clock::{Clock, SystemClock};
use libtransport::proto::ObjectPath;
use libtransport::sidecar::{SidecarClient, SidecarError};
use serde_json::json;

use crate::cli::ConnArgs;
use crate::cmd::client::{push_jobs, split_target};

/// The sidecar client `conn` asks for.
async fn client(conn: &ConnArgs, socket: &Path) -> anyhow::Result<SidecarClient> {
    let c = SidecarClient::connect(socket)
        .await
        .map_err(explain)
        .with_context(|| format!("the sidecar at {}", socket.display()))?;
    Ok(match &conn.node {
        Some(n) => c.with_node(n.clone()),
        None => c,
    })
}

/// `transportd ls --sidecar`.
pub(crate) async fn ls(
    conn: &ConnArgs,
    socket: &Path,
    target: Option<&str>,
    json: bool,
) -> anyhow::Result<()> {
    let c = client(conn, socket).await?;
    match target {
        None => {
            let names = c.list_datasets().await.map_err(explain)?;
            if json {
                println!("{}", json!({ "datasets": names, "via": "sidecar" }));
            } else {
                for n in names {
                    println!("{n}");
                }
            }
        }
        Some(t) => {
            let (dataset, prefix) = split_target(t)?;
            let entries = c
                .list_objects(&dataset, prefix.as_deref().unwrap_or(""))
                .await
                .map_err(explain)
                .with_context(|| format!("listing {dataset}"))?;
            if json {
                let list: Vec<_> = entries
                    .iter()
                    .map(|e| json!({ "path": e.path.as_str(), "size": e.size }))
                    .collect();
                println!(
                    "{}",
                    json!({ "dataset": dataset, "objects": list, "via": "sidecar" })
                );
            } else {
                for e in entries {
                    println!("{:>14}  {}", e.size, e.path);
                }
            }
        }
    }
    Ok(())
}

/// `transportd pull --sidecar`.
pub(crate) async fn pull(
    conn: &ConnArgs,
    socket: &Path,
    source: &str,
    dest: &Path,
    json: bool,
) -> anyhow::Result<()> {
    let c = client(conn, socket).await?;
    let (dataset, object) = split_target(source)?;
    let jobs: Vec<(ObjectPath, PathBuf)> = match object {
        Some(o) => {
            let object = ObjectPath::new(&o).with_context(|| format!("object path {o:?}"))?;
            let to = if dest.is_dir() {
                dest.join(object.segments().last().unwrap_or("object"))
            } else {
                dest.to_path_buf()
            };
            vec![(object, to)]
        }
        None => c
            .list_objects(&dataset, "")
            .await
            .map_err(explain)
            .with_context(|| format!("listing {dataset}"))?
            .into_iter()
            .map(|e| {
                let to = e.path.segments().fold(dest.to_path_buf(), |p, s| p.join(s));
                (e.path, to)
            })
            .collect(),
    };
    let mut reports = Vec::new();
    for (object, to) in jobs {
        if let Some(parent) = to.parent() {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("creating {}", parent.display()))?;
        }
        let started = SystemClock.instant();
        let got = c
            .fetch_to_file(&dataset, &object, &to)
            .await
            .map_err(explain)
            .with_context(|| format!("pulling {dataset}/{object} into {}", to.display()))?;
        let ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
        if !json {
            println!(
                "{dataset}/{object}: {} bytes verified by the sidecar, {} (root {})",
                got.size,
                if got.cached {
                    "from its cache"
                } else {
                    "fetched from storage"
                },
                got.root.short()
            );
        }
        reports.push(json!({
            "object": object.as_str(),
            "report": {
                "size": got.size,
                "root": got.root.to_hex(),
                "cached": got.cached,
                "elapsed": ms,
            },
        }));
    }
    if json {
        println!(
            "{}",
            json!({
                "via": "sidecar",
                "dataset": dataset,
                "verified": true,
                "objects": reports,
                "socket_bytes": c.bytes_through_socket(),
            })
        );
    }
    Ok(())
}

/// `transportd push --sidecar`.
pub(crate) async fn push(
    conn: &ConnArgs,
    socket: &Path,
    src: &Path,
    dest: &str,
    json: bool,
) -> anyhow::Result<()> {
    let (dataset, jobs) = push_jobs(src, dest)?;
    let c = client(conn, socket).await?;
    let mut reports = Vec::new();
    for (path, object, _) in jobs {
        let started = SystemClock.instant();
        let r = c
            .push_file(&dataset, &object, &path)
            .await
            .map_err(explain)
            .with_context(|| format!("pushing {} to {dataset}/{object}", path.display()))?;
        let ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
        if !json {
            println!(
                "{dataset}/{object}: {} bytes committed through the sidecar (root {})",
                r.size,
                r.root.short()
            );
        }
        reports.push(json!({
            "object": object.as_str(),
            "report": { "size": r.size, "root": r.root.to_hex(), "elapsed": ms },
        }));
    }
    if json {
        println!(
            "{}",
            json!({ "via": "sidecar", "dataset": dataset, "verified": true, "objects": reports })
        );
    }
    Ok(())
}

/// The sidecar's error, with what to do where the user can do something.
fn explain(e: SidecarError) -> anyhow::Error {
    let hint = match &e {
        SidecarError::Unavailable(_) => Some(
            "is `transportd node` running with a [sidecar] section, and may this user reach \
             its socket (mode 0660, the configured group)?",
        ),
        SidecarError::NotFound { .. } => Some(
            "the storage node has no such object, or its policy does not let this workload \
             read it",
        ),
        _ => None,
    };
    let e = anyhow::Error::new(e);
    match hint {
        Some(h) => e.context(h),
        None => e,
    }
}
