//! `transportd ls | pull | push`: client commands authenticated by SVID files.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use certs::SpiffeId;
use indicatif::{ProgressBar, ProgressStyle};
use libtransport::audit::{FileSink, FileSinkConfig};
use libtransport::proto::retry::{AttemptEnd, Attempts, Next};
use libtransport::proto::{DatasetName, ObjectPath};
use libtransport::{
    Client, ClientConfig, FetchError, FetchOptions, FetchReport, IdentityHandle, Path as Transport,
    PushOptions, PushReport, RdmaMode, RetryPolicy, TransportConfig,
};
use serde_json::json;

use crate::cli::{ConnArgs, PathArg, TransferArgs};
use crate::config::{IdentityPaths, load_credentials};

/// `transportd ls`.
pub(crate) async fn ls(conn: &ConnArgs, target: Option<&str>, json: bool) -> anyhow::Result<()> {
    let client = connect(
        conn,
        None,
        None,
        RetryPolicy::default().attempts,
        RdmaMode::Off,
    )
    .await?;
    match target {
        None => {
            let names = client.list_datasets().await?;
            if json {
                println!("{}", json!({ "datasets": names }));
            } else {
                for n in names {
                    println!("{n}");
                }
            }
        }
        Some(t) => {
            let (dataset, prefix) = split_target(t)?;
            let entries = client
                .list_objects(&dataset, prefix.as_deref().unwrap_or(""))
                .await
                .with_context(|| format!("listing {dataset}"))?;
            if json {
                let list: Vec<_> = entries
                    .iter()
                    .map(|e| json!({ "path": e.path.as_str(), "size": e.size }))
                    .collect();
                println!("{}", json!({ "dataset": dataset, "objects": list }));
            } else {
                for e in entries {
                    println!("{:>14}  {}", e.size, e.path);
                }
            }
        }
    }
    client.close();
    Ok(())
}

/// `transportd pull`.
pub(crate) async fn pull(
    conn: &ConnArgs,
    source: &str,
    dest: &Path,
    args: &TransferArgs,
) -> anyhow::Result<()> {
    let client = connect(
        conn,
        args.audit.as_deref(),
        Some(args.parallel),
        args.retries,
        args.rdma.into(),
    )
    .await?;
    let (dataset, object) = split_target(source)?;
    let jobs: Vec<(ObjectPath, PathBuf, u64)> = match object {
        Some(o) => {
            let object = ObjectPath::new(&o).with_context(|| format!("object path {o:?}"))?;
            let to = if dest.is_dir() {
                dest.join(object.segments().last().unwrap_or("object"))
            } else {
                dest.to_path_buf()
            };
            let size = client
                .stat(&dataset, &object)
                .await
                .with_context(|| format!("{dataset}/{object}"))?
                .size();
            vec![(object, to, size)]
        }
        None => {
            let entries = client
                .list_objects(&dataset, "")
                .await
                .with_context(|| format!("listing {dataset}"))?;
            entries
                .into_iter()
                .map(|e| {
                    let to = e.path.segments().fold(dest.to_path_buf(), |p, s| p.join(s));
                    (e.path, to, e.size)
                })
                .collect()
        }
    };
    let total: u64 = jobs.iter().map(|j| j.2).sum();
    let bar = progress_bar(total, args.json);
    let mut reports: Vec<(String, FetchReport)> = Vec::new();
    let mut base = 0;
    for (object, to, size) in jobs {
        if let Some(parent) = to.parent() {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("creating {}", parent.display()))?;
        }
        let opts = FetchOptions {
            parallel: Some(args.parallel),
            retry: RetryPolicy::with_attempts(args.retries),
            progress: Some(progress_fn(&bar, base)),
            max_rate: args.max_rate.map(|r| r.as_u64()),
            connections: args.connections,
        };
        let report = client
            .fetch_to_file(&dataset, &object, &to, &opts)
            .await
            .map_err(|e| explain_fetch(e, &to))
            .with_context(|| format!("pulling {dataset}/{object} into {}", to.display()))?;
        base += size;
        reports.push((object.to_string(), report));
    }
    bar.finish_and_clear();
    print_pulls(&client, &dataset, &reports, args.json);
    client.close();
    Ok(())
}

/// `transportd push`.
pub(crate) async fn push(
    conn: &ConnArgs,
    src: &Path,
    dest: &str,
    args: &TransferArgs,
) -> anyhow::Result<()> {
    let (dataset, jobs) = push_jobs(src, dest)?;
    let client = connect(
        conn,
        args.audit.as_deref(),
        Some(args.parallel),
        args.retries,
        args.rdma.into(),
    )
    .await?;
    let total: u64 = jobs.iter().map(|j| j.2).sum();
    let bar = progress_bar(total, args.json);
    let mut reports: Vec<(String, PushReport)> = Vec::new();
    let mut base = 0;
    for (path, object, size) in jobs {
        let opts = PushOptions {
            parallel: Some(args.parallel),
            retry: RetryPolicy::with_attempts(args.retries),
            progress: Some(progress_fn(&bar, base)),
            max_rate: args.max_rate.map(|r| r.as_u64()),
            connections: args.connections,
        };
        let report = client
            .push_file(&dataset, &object, &path, &opts)
            .await
            .with_context(|| format!("pushing {} to {dataset}/{object}", path.display()))?;
        base += size;
        reports.push((object.to_string(), report));
    }
    bar.finish_and_clear();
    if args.json {
        print_json(&client, &dataset, &reports);
    } else {
        for (o, r) in &reports {
            println!(
                "{dataset}/{o}: {} bytes committed by {} over {} (sent {}, root {})",
                r.size,
                r.server,
                r.path,
                r.sent_bytes,
                r.root.short()
            );
        }
    }
    client.close();
    Ok(())
}

/// One file of a push: where it is, the object it becomes, its size.
pub(crate) type PushJob = (PathBuf, ObjectPath, u64);

/// What a push of `src` to `dest` (`DATASET[/OBJECT or PREFIX]`) sends: each file, its
/// object path, its size.
pub(crate) fn push_jobs(src: &Path, dest: &str) -> anyhow::Result<(DatasetName, Vec<PushJob>)> {
    let (dataset, target) = split_target(dest)?;
    let meta = std::fs::metadata(src).with_context(|| format!("reading {}", src.display()))?;
    let jobs: Vec<(PathBuf, ObjectPath, u64)> = if meta.is_dir() {
        let mut files = Vec::new();
        walk(src, src, &mut files)?;
        files
            .into_iter()
            .map(|(path, rel, size)| {
                let name = match &target {
                    Some(prefix) => format!("{}/{rel}", prefix.trim_end_matches('/')),
                    None => rel,
                };
                Ok((
                    path,
                    ObjectPath::new(&name).with_context(|| format!("object path {name:?}"))?,
                    size,
                ))
            })
            .collect::<anyhow::Result<_>>()?
    } else {
        let name = match target {
            Some(t) => t,
            None => src
                .file_name()
                .and_then(|n| n.to_str())
                .context("source file name is not UTF-8")?
                .to_owned(),
        };
        vec![(
            src.to_path_buf(),
            ObjectPath::new(&name).with_context(|| format!("object path {name:?}"))?,
            meta.len(),
        )]
    };
    Ok((dataset, jobs))
}

fn print_pulls(
    client: &Client,
    dataset: &DatasetName,
    reports: &[(String, FetchReport)],
    json: bool,
) {
    if json {
        print_json(client, dataset, reports);
        return;
    }
    for (o, r) in reports {
        let resumed = if r.chunks_reused > 0 {
            format!(
                ", resumed: {} of {} chunks were already here",
                r.chunks_reused, r.chunks
            )
        } else {
            String::new()
        };
        println!(
            "{dataset}/{o}: {} bytes verified from {} over {} (root {}){resumed}",
            r.size,
            r.server,
            r.path,
            r.root.short()
        );
    }
}

/// Adds what to do to the errors a user can fix.
fn explain_fetch(e: FetchError, to: &Path) -> anyhow::Error {
    let full = matches!(&e, FetchError::Local(io) if io.kind() == std::io::ErrorKind::StorageFull);
    let e = anyhow::Error::new(e);
    if full {
        e.context(format!(
            "the disk holding {} is full: free space and run the same command again (chunks already verified are kept)",
            to.display()
        ))
    } else {
        e
    }
}

/// The JSON report of pulls or pushes. Printed only when every object completed: a chunk
/// that failed verification ends the command with an error instead.
fn print_json<R: serde::Serialize>(
    client: &Client,
    dataset: &DatasetName,
    reports: &[(String, R)],
) {
    let list: Vec<_> = reports
        .iter()
        .map(|(o, r)| json!({ "object": o, "report": r }))
        .collect();
    let server = client.server();
    println!(
        "{}",
        json!({ "server": server.id, "dataset": dataset, "verified": true, "objects": list })
    );
}

/// A connected client and, when its identity comes from the Workload API, the task that
/// keeps that identity current (it lives as long as the client).
pub(crate) struct Connected {
    client: Client,
    _workload: Option<libtransport::workload::WorkloadIdentity>,
}

impl std::ops::Deref for Connected {
    type Target = Client;

    fn deref(&self) -> &Client {
        &self.client
    }
}

/// Our identity: files named on the command line (or by TRANSPORTD_* variables), else the
/// SPIFFE Workload API (`--workload-socket` or SPIFFE_ENDPOINT_SOCKET), whose rotations
/// are followed for as long as the command runs.
async fn identity_for(
    conn: &ConnArgs,
) -> anyhow::Result<(
    IdentityHandle,
    Option<libtransport::workload::WorkloadIdentity>,
)> {
    let files_given = conn.identity.is_some()
        || conn.svid.is_some()
        || conn.key.is_some()
        || conn.bundle.is_some();
    if !files_given && let Some(endpoint) = &conn.workload_socket {
        let socket = if endpoint.starts_with('/') {
            PathBuf::from(endpoint)
        } else {
            libtransport::workload::endpoint_path(endpoint)
                .context("--workload-socket / SPIFFE_ENDPOINT_SOCKET")?
        };
        let want = conn
            .workload_id
            .as_deref()
            .map(SpiffeId::parse)
            .transpose()
            .context("--workload-id")?;
        let started = tokio::time::timeout(
            WORKLOAD_WAIT,
            libtransport::workload::WorkloadIdentity::start(&socket, want),
        )
        .await
        .map_err(|_| {
            anyhow::anyhow!(
                "the Workload API at {} offered no SVID{} within {} s",
                socket.display(),
                conn.workload_id
                    .as_deref()
                    .map(|w| format!(" for {w}"))
                    .unwrap_or_default(),
                WORKLOAD_WAIT.as_secs()
            )
        })?
        .with_context(|| {
            format!(
                "taking an identity from the Workload API at {}",
                socket.display()
            )
        })?;
        return Ok((started.handle().clone(), Some(started)));
    }
    let paths = identity_paths(conn)?;
    Ok((IdentityHandle::new(load_credentials(&paths)?), None))
}

/// Connects as the identity in `conn`, falling back from QUIC to TCP under `auto`.
pub(crate) async fn connect(
    conn: &ConnArgs,
    audit: Option<&Path>,
    parallel: Option<u32>,
    retries: u32,
    rdma: RdmaMode,
) -> anyhow::Result<Connected> {
    let (identity, workload) = identity_for(conn).await?;
    let mut transport = TransportConfig::default();
    transport.rdma(rdma);
    let idle = Duration::from(conn.idle_timeout);
    if idle < Duration::from_secs(5) {
        anyhow::bail!("--idle-timeout must be at least 5s");
    }
    transport.idle_timeout(idle);
    if let Some(p) = parallel {
        transport.parallel_chunks(p).context("--parallel")?;
    }
    let mut builder = ClientConfig::builder()
        .identity(identity.clone())
        .transport(transport);
    if let Some(id) = &conn.server_id {
        builder = builder.server_id(SpiffeId::parse(id).context("--server-id")?);
    }
    if let Some(a) = audit {
        // The client's own trail, checkpoints signed with its SVID.
        let sink = FileSink::open(
            FileSinkConfig::new(a),
            Arc::new(identity),
            Arc::new(libtransport::clock::SystemClock),
        )
        .with_context(|| format!("opening the audit trail in {}", a.display()))?;
        builder = builder.audit(Arc::new(sink));
    }
    let config = builder.build();
    let node = conn
        .node
        .as_deref()
        .context("give the node to connect to: --node HOST:PORT")?;
    let addr = resolve(node).await?;
    // A busy node or a network hiccup at connect time is retried like one mid-transfer.
    let mut attempts = Attempts::new(RetryPolicy::with_attempts(retries));
    loop {
        let result = match conn.path {
            PathArg::Auto => {
                Client::connect_any(config.clone(), addr, &[Transport::Quic, Transport::Tcp]).await
            }
            PathArg::Quic => Client::connect(config.clone(), addr, Transport::Quic).await,
            PathArg::Tcp => Client::connect(config.clone(), addr, Transport::Tcp).await,
        };
        match result {
            Ok(client) => {
                return Ok(Connected {
                    client,
                    _workload: workload,
                });
            }
            Err(e) => {
                let attempt = attempts.failures();
                let Some(delay) = connect_retry(&mut attempts, e.is_retriable()) else {
                    return Err(anyhow::Error::new(e).context(format!("connecting to {node}")));
                };
                tracing::warn!(error = %e, attempt, "connecting failed; retrying");
                tokio::time::sleep(delay).await;
            }
        }
    }
}

fn identity_paths(conn: &ConnArgs) -> anyhow::Result<IdentityPaths> {
    let from_dir = |name: &str| conn.identity.as_ref().map(|d| d.join(name));
    let pick = |explicit: &Option<PathBuf>, name: &str, flag: &str| {
        explicit.clone().or_else(|| from_dir(name)).with_context(|| {
            format!(
                "no identity: pass --identity DIR (holding svid.pem, svid.key and bundle.pem), {flag}, or --workload-socket (SPIFFE_ENDPOINT_SOCKET) to take it from a node's Workload API"
            )
        })
    };
    Ok(IdentityPaths {
        svid: pick(&conn.svid, "svid.pem", "--svid")?,
        key: pick(&conn.key, "svid.key", "--key")?,
        bundle: pick(&conn.bundle, "bundle.pem", "--bundle")?,
    })
}

async fn resolve(node: &str) -> anyhow::Result<SocketAddr> {
    tokio::net::lookup_host(node)
        .await
        .with_context(|| format!("resolving {node:?} (expected HOST:PORT)"))?
        .next()
        .with_context(|| format!("{node:?} resolves to no address"))
}

/// `DATASET` or `DATASET/REST`.
pub(crate) fn split_target(t: &str) -> anyhow::Result<(DatasetName, Option<String>)> {
    let (d, rest) = match t.split_once('/') {
        Some((d, r)) if !r.is_empty() => (d, Some(r.to_owned())),
        Some((d, _)) => (d, None),
        None => (t, None),
    };
    let dataset = DatasetName::new(d).with_context(|| format!("dataset name {d:?}"))?;
    Ok((dataset, rest))
}

fn walk(root: &Path, dir: &Path, out: &mut Vec<(PathBuf, String, u64)>) -> anyhow::Result<()> {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .collect::<Result<_, _>>()?;
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let path = e.path();
        let ft = e.file_type()?;
        if ft.is_dir() {
            walk(root, &path, out)?;
        } else if ft.is_file() {
            let rel = path
                .strip_prefix(root)
                .ok()
                .and_then(|p| p.to_str())
                .with_context(|| format!("{} is not UTF-8", path.display()))?
                .to_owned();
            out.push((path.clone(), rel, e.metadata()?.len()));
        } else if ft.is_symlink() {
            bail!(
                "{} is a symlink; push the file it points to",
                path.display()
            );
        }
    }
    Ok(())
}

/// The wait before trying again after a connect failed (`retriable`: with an error that may
/// pass), or none to give up: the library's retry policy, as for a failure mid-transfer.
fn connect_retry(attempts: &mut Attempts, retriable: bool) -> Option<Duration> {
    let failed = AttemptEnd::Failed {
        retriable,
        // Nothing is connected yet, so no connection can have been retired.
        connection_retired: false,
    };
    match attempts.next(failed, 0) {
        Next::Retry(delay) => Some(delay),
        Next::Renew | Next::GiveUp => None,
    }
}

/// A progress bar on stderr when it is a terminal (hidden otherwise, and with --json).
fn progress_bar(total: u64, quiet: bool) -> ProgressBar {
    if quiet {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(total);
    if let Ok(style) = ProgressStyle::with_template(
        "{bar:40} {binary_bytes}/{binary_total_bytes} {binary_bytes_per_sec} eta {eta}",
    ) {
        bar.set_style(style);
    }
    bar
}

fn progress_fn(bar: &ProgressBar, base: u64) -> Arc<dyn Fn(u64, u64) + Send + Sync> {
    let bar = bar.clone();
    Arc::new(move |done, _total| bar.set_position(base + done))
}

/// How long a command waits for the Workload API's first SVID.
const WORKLOAD_WAIT: Duration = Duration::from_secs(30);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect_retries_wait_as_the_library_policy_says_then_give_up() {
        let policy = RetryPolicy::with_attempts(3);
        let mut attempts = Attempts::new(policy);
        for n in 0..3 {
            assert_eq!(connect_retry(&mut attempts, true), Some(policy.delay(n)));
        }
        assert_eq!(connect_retry(&mut attempts, true), None);
        assert_eq!(attempts.failures(), 3);
        // An error that will not pass ends it at once.
        let mut attempts = Attempts::new(policy);
        assert_eq!(connect_retry(&mut attempts, false), None);
    }

    #[test]
    fn retries_keep_the_default_backoff() {
        let policy = RetryPolicy::with_attempts(7);
        assert_eq!(policy.attempts, 7);
        assert_eq!(policy.backoff, RetryPolicy::default().backoff);
    }
}
