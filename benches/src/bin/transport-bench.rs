//! `transport-bench`: what does security cost? Runs the plaintext baseline, TLS/TCP and
//! QUIC/mTLS, and RDMA over the software device sealed (`rdma-soft`) and unsealed
//! (`rdma-soft-plain`), over the same workload and reports throughput, the ratio to each
//! mode's unencrypted baseline, CPU per GB and request latency percentiles.
//!
//! * `local`: everything on loopback in one process;
//! * `server` and `client`: two machines of a real cluster, authenticated by SVIDs (like
//!   iperf3); the plaintext baseline runs only when both sides pass `--dangerous-plaintext`;
//! * `lab`: a server and a client on two netlab hosts (needs root).

#![forbid(unsafe_code)]
#![allow(clippy::disallowed_methods)]

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{Context, bail};
use benches::mode::{self, Destination, Mode, Target};
use benches::setup::{ObjectSource, ServeSpec};
use benches::{chart, report};
use clap::{Args, Parser, Subcommand};
use libtransport::proto::{DatasetName, ObjectPath};
use libtransport::{Client, ClientConfig, Path, RdmaMode, TransportConfig};
use serde_json::{Value, json};
use tokio::signal::unix::SignalKind;

/// Benchmarks transportd's secure transports against a plaintext baseline.
#[derive(Debug, Parser)]
#[command(name = "transport-bench", version, max_term_width = 100)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Everything on loopback in this process: one server, one client per mode. Modes run
    /// interleaved (baseline, TLS/TCP, QUIC, baseline, ...) so they share the machine's
    /// moment; medians over the runs are reported.
    Local {
        /// Size of the object each run pulls.
        #[arg(long, default_value = "1GiB")]
        size: bytesize::ByteSize,
        #[command(flatten)]
        run: RunArgs,
        /// QUIC path-MTU ceiling (loopback allows up to 65527).
        #[arg(long, default_value_t = 1452)]
        max_mtu: u16,
        /// Run the server without its audit trail (to show what the trail costs: it is
        /// written per transfer and per decision, never per chunk).
        #[arg(long)]
        no_audit: bool,
    },
    /// Serve a benchmark object to `client`s of the same trust domain, over QUIC and TLS/TCP
    /// (and the plaintext baseline with --plaintext and --dangerous-plaintext). Prints one
    /// JSON line with its addresses, then serves until interrupted.
    Server {
        /// QUIC and TLS/TCP listen on this address (the same port for both).
        #[arg(long, default_value = "0.0.0.0:7443")]
        listen: SocketAddr,
        /// Directory holding svid.pem, svid.key and bundle.pem (`transportd ca issue`).
        #[arg(long)]
        identity: PathBuf,
        /// Serve pseudo-random bytes of this size...
        #[arg(long, default_value = "1GiB", conflicts_with = "object")]
        size: bytesize::ByteSize,
        /// ... or a copy of this file.
        #[arg(long)]
        object: Option<PathBuf>,
        /// Chunk size of the object's manifest.
        #[arg(long, default_value = "4MiB")]
        chunk_size: bytesize::ByteSize,
        /// Also serve the plaintext baseline here (needs --dangerous-plaintext).
        #[arg(long, requires = "dangerous_plaintext")]
        plaintext: Option<SocketAddr>,
        /// Acknowledge that --plaintext sends the object unencrypted and unauthenticated.
        #[arg(long)]
        dangerous_plaintext: bool,
        /// QUIC path-MTU ceiling.
        #[arg(long, default_value_t = 1452)]
        max_mtu: u16,
        /// Run without an audit trail.
        #[arg(long)]
        no_audit: bool,
        /// Also serve the reference loops here, so a `client` elsewhere measures them across
        /// the same network: bare-tcp on this TCP port, bare-tls on the next, bare-quic on
        /// this UDP port. The ready line carries their certificate (`bare_cert`, PEM) for
        /// the client's --bare-cert.
        #[arg(long, value_name = "ADDR")]
        bare: Option<SocketAddr>,
    },
    /// Measure the modes against a `server` on another machine.
    Client {
        /// The server's QUIC and TLS/TCP address.
        #[arg(long)]
        server: SocketAddr,
        /// The server's plaintext baseline address (needs --dangerous-plaintext).
        #[arg(long, requires = "dangerous_plaintext")]
        plaintext_server: Option<SocketAddr>,
        /// Acknowledge that the plaintext mode moves data unencrypted and unauthenticated.
        #[arg(long)]
        dangerous_plaintext: bool,
        /// Directory holding this client's svid.pem, svid.key and bundle.pem.
        #[arg(long)]
        identity: PathBuf,
        /// Insist on this server SPIFFE ID (default: the one its SVID shows over TLS).
        #[arg(long)]
        server_id: Option<String>,
        /// The server's process id, if it runs on this machine (its CPU is measured too).
        #[arg(long)]
        server_pid: Option<u32>,
        #[command(flatten)]
        run: RunArgs,
        /// QUIC path-MTU ceiling.
        #[arg(long, default_value_t = 1452)]
        max_mtu: u16,
        /// The server's reference loops (`server --bare`): without it the loops run on this
        /// machine's loopback, and ratios to them compare the network with loopback.
        #[arg(long, value_name = "ADDR", requires = "bare_cert")]
        bare_server: Option<SocketAddr>,
        /// A PEM file with the certificate the server's reference loops present (its ready
        /// line's `bare_cert`).
        #[arg(long, value_name = "FILE", requires = "bare_server")]
        bare_cert: Option<PathBuf>,
    },
    /// N local readers of one object through a GPU node's sidecar, against N direct
    /// clients, with the real `transportd` binaries (an issuer, a storage node, two GPU
    /// nodes with sidecars): network bytes per reader, aggregate GB/s and CPU s/GB, the
    /// hand-off rate of hits held in memory, and of hits opened from the sealed disk cache
    /// against one core's AES-256-GCM open rate, measured in the same run.
    Sidecar {
        /// Size of the object.
        #[arg(long, default_value = "256MiB")]
        size: bytesize::ByteSize,
        /// Readers at once.
        #[arg(long, default_value_t = 8)]
        readers: u32,
        /// Fetches per reader in the phases that hit the cache.
        #[arg(long, default_value_t = 3)]
        rounds: u32,
        /// The `transportd` binary (default: the one beside this binary; build it in the
        /// same profile, e.g. `cargo build --release -p transportd`).
        #[arg(long)]
        transportd: Option<PathBuf>,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// A `sidecar` run's reader through the sidecar (run by `sidecar`).
    #[command(hide = true)]
    SidecarReader {
        #[arg(long)]
        socket: PathBuf,
        #[arg(long)]
        object: String,
        #[arg(long)]
        rounds: u32,
    },
    /// A `sidecar` run's direct reader (run by `sidecar`).
    #[command(hide = true)]
    DirectReader {
        #[arg(long)]
        node: SocketAddr,
        #[arg(long)]
        workload_socket: PathBuf,
        #[arg(long)]
        object: String,
        #[arg(long)]
        rounds: u32,
    },
    /// A server and a client on two netlab hosts (network namespaces joined by a bridge):
    /// the modes cross a wire with a real MTU. Needs root.
    Lab {
        /// Size of the object each run pulls.
        #[arg(long, default_value = "1GiB")]
        size: bytesize::ByteSize,
        /// The link MTU.
        #[arg(long, default_value_t = 1500)]
        mtu: u32,
        /// Rate limit per direction, Mbit/s (default: none).
        #[arg(long)]
        rate_mbit: Option<u64>,
        #[command(flatten)]
        run: RunArgs,
    },
}

/// Options every measuring command shares.
#[derive(Debug, Args)]
struct RunArgs {
    /// Modes to run, comma-separated: bare-tcp, bare-tls, bare-quic (the reference loops:
    /// the libraries alone; in `local` on loopback, in `lab` and in `client --bare-server`
    /// against the server's own loops, across the same network), plaintext-tcp, tls-tcp,
    /// quic, rdma-soft-plain,
    /// rdma-soft, rdma (hardware; needs the `rdma` build feature and a device). Each mode's
    /// ratio is to its unencrypted baseline: plaintext-tcp, or rdma-soft-plain for rdma-soft
    /// (a bare loop over two soft devices in this process, on loopback).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "bare-tcp,bare-tls,bare-quic,plaintext-tcp,tls-tcp,quic"
    )]
    modes: Vec<Mode>,
    /// Where each mode that pulls the object puts it, comma-separated: memory
    /// (`Client::fetch_into`, a buffer kept across runs) and/or file (`Client::fetch_to_file`: written in place, verified,
    /// fsynced and renamed; removed after each run, so every run pulls it whole). With
    /// both, a mode's two pulls run one after the other in each round; its file pulls are
    /// reported as their own rows, named `MODE>file` (`tls-tcp>file`), with their ratio to
    /// the same mode's pull into memory ("to mem", `ratio_to_memory`). Files land under
    /// the bench's temporary directory (`local`: beside the server's store; else TMPDIR).
    /// The reference loops and rdma-soft-plain always read into memory, once per round.
    #[arg(long, value_delimiter = ',', default_value = "memory")]
    into: Vec<Destination>,
    /// Connections one pull stripes its chunks over, comma-separated, each a row of its own
    /// for every mode that pulls the object: `MODE*N` (`tls-tcp*2`) for N over 1. Striping
    /// gains only where there are idle cores at both ends; what must hold everywhere is that
    /// CPU s/GB does not grow with N. The reference loops use one connection.
    #[arg(long, value_delimiter = ',', default_value = "1", value_parser = clap::value_parser!(u32).range(1..=16))]
    stripes: Vec<u32>,
    /// Runs per mode.
    #[arg(long, default_value_t = 3)]
    runs: u32,
    /// Chunks in flight, each on its own stream.
    #[arg(long, default_value_t = 8)]
    parallel: u32,
    /// Chunk size.
    #[arg(long, default_value = "4MiB")]
    chunk_size: bytesize::ByteSize,
    /// Connections pulling the object at once in each run (throughput is their sum).
    #[arg(long, default_value_t = 1)]
    connections: u32,
    /// Small requests timed per run for the latency percentiles.
    #[arg(long, default_value_t = 1000)]
    requests: u32,
    /// Bytes each latency request reads (0: a `stat` without data).
    #[arg(long, default_value = "0B")]
    request_size: bytesize::ByteSize,
    /// QUIC flow-control window per stream (default: the library's).
    #[arg(long)]
    stream_window: Option<bytesize::ByteSize>,
    /// QUIC flow-control window per connection (default: the library's).
    #[arg(long)]
    connection_window: Option<bytesize::ByteSize>,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
    /// Also write JSON, markdown and an SVG chart into this directory.
    #[arg(long)]
    out: Option<PathBuf>,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    // Diagnostics on standard error, only when asked for (RUST_LOG=libtransport=debug, say):
    // the reports on standard output stay clean.
    if let Ok(filter) = tracing_subscriber::EnvFilter::try_from_default_env() {
        tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .init();
    }
    if let Command::Lab {
        size,
        mtu,
        rate_mbit,
        run,
    } = &cli.command
    {
        // The lab drives processes on its hosts; it needs no runtime of its own.
        let args = benches::lab::LabArgs {
            size: size.as_u64(),
            mtu: *mtu,
            rate_mbit: *rate_mbit,
            modes: run
                .modes
                .iter()
                .map(|m| m.name())
                .collect::<Vec<_>>()
                .join(","),
            into: run
                .into
                .iter()
                .map(|d| d.name())
                .collect::<Vec<_>>()
                .join(","),
            runs: run.runs.max(1),
            parallel: run.parallel,
            chunk_bytes: chunk_bytes(run)?,
            requests: run.requests,
            connections: run.connections.max(1),
            request_bytes: run.request_size.as_u64(),
        };
        let doc = benches::lab::run(&args)?;
        return finish(&doc, &format!("lab-mtu{mtu}"), run);
    }
    if let Command::Sidecar {
        size,
        readers,
        rounds,
        transportd,
        json,
    } = &cli.command
    {
        // The daemons and readers are processes of their own; this one only drives them.
        let bench = std::env::current_exe().context("locating transport-bench")?;
        let transportd = match transportd {
            Some(t) => t.clone(),
            None => bench.with_file_name("transportd"),
        };
        if !transportd.exists() {
            bail!(
                "no transportd binary at {}: build it in the same profile (cargo build --release -p transportd) or pass --transportd",
                transportd.display()
            );
        }
        let machine = report::machine(&benches::host::measure(std::time::Duration::from_millis(
            300,
        ))?);
        let mut doc = benches::sidecar::run(&benches::sidecar::Params {
            size: size.as_u64(),
            readers: *readers,
            rounds: *rounds,
            transportd,
            bench,
        })?;
        doc["machine"] = machine;
        if *json {
            println!("{}", serde_json::to_string_pretty(&doc)?);
        } else {
            print!("{}", benches::sidecar::table(&doc));
            println!("{}", report::host_line(&doc["machine"]));
        }
        return Ok(());
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async_main(cli.command))
}

async fn async_main(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Local {
            size,
            run,
            max_mtu,
            no_audit,
        } => local(size.as_u64(), &run, max_mtu, !no_audit).await,
        Command::Server {
            listen,
            identity,
            size,
            object,
            chunk_size,
            plaintext,
            dangerous_plaintext: _,
            max_mtu,
            no_audit,
            bare,
        } => {
            let mut transport = TransportConfig::default();
            transport.mtu(1200, max_mtu).context("--max-mtu")?;
            let bare_cert = match bare {
                Some(addr) => Some(pem::encode(&pem::Pem::new(
                    "CERTIFICATE",
                    benches::bare::serve_remote(addr, &transport)?.to_vec(),
                ))),
                None => None,
            };
            // Serve rdma-soft (its unsealed baseline is a bare loop on the client's side).
            transport.rdma(RdmaMode::Soft);
            let cb = u32::try_from(chunk_size.as_u64()).context("--chunk-size")?;
            transport.chunk_bytes(cb).context("--chunk-size")?;
            let served = benches::setup::serve(ServeSpec {
                identity: benches::setup::load_identity(&identity)?,
                listen,
                plaintext,
                object: object.map_or(ObjectSource::Synthetic(size.as_u64()), ObjectSource::File),
                transport,
                chunk_bytes: cb,
                audit: !no_audit,
            })
            .await?;
            println!(
                "{}",
                json!({
                    "event": "listening",
                    "id": served.server_id,
                    "quic": served.server.quic_addr(),
                    "tcp": served.server.tcp_addr(),
                    "plaintext": served.plaintext,
                    "size": served.size,
                    "pid": std::process::id(),
                    "bare": bare,
                    "bare_cert": bare_cert,
                })
            );
            // Stop on SIGINT or SIGTERM, and drop what was served: the synthetic object
            // lives in a temporary directory that goes with it.
            let mut term = tokio::signal::unix::signal(SignalKind::terminate())?;
            tokio::select! {
                r = tokio::signal::ctrl_c() => r?,
                _ = term.recv() => {}
            }
            drop(served);
            Ok(())
        }
        Command::Client {
            server,
            plaintext_server,
            dangerous_plaintext: _,
            identity,
            server_id,
            server_pid,
            run,
            max_mtu,
            bare_server,
            bare_cert,
        } => {
            let bare = match (bare_server, bare_cert) {
                (Some(addr), Some(path)) => {
                    let text = std::fs::read_to_string(&path)
                        .with_context(|| format!("reading --bare-cert {}", path.display()))?;
                    let cert = pem::parse(text)
                        .with_context(|| format!("--bare-cert {}: not PEM", path.display()))?;
                    Some(benches::bare::RemoteBare {
                        addr,
                        cert: cert.into_contents().into(),
                        server_pid,
                    })
                }
                _ => None,
            };
            let mut transport = TransportConfig::default();
            transport.mtu(1200, max_mtu).context("--max-mtu")?;
            transport
                .parallel_chunks(run.parallel)
                .context("--parallel")?;
            let client_id = benches::setup::load_identity(&identity)?;
            // Learn the object's size and the server's identity over an authenticated path.
            let mut config = ClientConfig::builder()
                .identity(client_id.clone())
                .transport(transport.clone());
            if let Some(id) = &server_id {
                config = config.server_id(certs::SpiffeId::parse(id).context("--server-id")?);
            }
            let probe = Client::connect(config.build(), server, Path::Tcp)
                .await
                .context("connecting to the server")?;
            let dataset = DatasetName::new("bench")?;
            let object = ObjectPath::new("object.bin")?;
            let manifest = probe.stat(&dataset, &object).await?;
            let (size, chunk_bytes) = (manifest.size(), manifest.chunk_bytes());
            let pulls = tempfile::Builder::new()
                .prefix("transport-bench-pulls-")
                .tempdir()
                .context("creating a directory for pulls into files")?;
            let target = Target {
                client: client_id,
                server_id: probe.server().id,
                quic: server,
                tcp: server,
                plaintext: plaintext_server,
                dataset,
                object,
                size,
                chunk_bytes,
                transport,
                server_pid,
                pull_dir: pulls.path().to_path_buf(),
                bare,
            };
            probe.close();
            // Where the reference loops' server end ran: across the network, or loopback.
            let loops = if target.bare.is_some() {
                "server"
            } else {
                "loopback"
            };
            let params = json!({ "kind": "client", "server": server, "reference_loops": loops });
            let doc = measure(&target, &run, params).await?;
            finish(&doc, "client", &run)
        }
        Command::Lab { .. } => bail!("lab runs without a runtime"),
        Command::Sidecar { .. } => bail!("sidecar runs without a runtime"),
        Command::SidecarReader {
            socket,
            object,
            rounds,
        } => benches::sidecar::sidecar_reader(&socket, &object, rounds).await,
        Command::DirectReader {
            node,
            workload_socket,
            object,
            rounds,
        } => benches::sidecar::direct_reader(node, &workload_socket, &object, rounds).await,
    }
}

async fn local(size: u64, run: &RunArgs, max_mtu: u16, audit: bool) -> anyhow::Result<()> {
    anyhow::ensure!(size > 0, "--size must be more than zero");
    let cb = chunk_bytes(run)?;
    let mut transport = TransportConfig::default();
    transport.chunk_bytes(cb).context("--chunk-size")?;
    transport
        .parallel_chunks(run.parallel)
        .context("--parallel")?;
    transport.mtu(1200, max_mtu).context("--max-mtu")?;
    windows(run, &mut transport)?;
    let ca = benches::setup::new_ca()?;
    let server =
        libtransport::IdentityHandle::new(benches::setup::credentials(&ca, "/bench/server")?);
    let client =
        libtransport::IdentityHandle::new(benches::setup::credentials(&ca, "/bench/client")?);
    let loopback: SocketAddr = "127.0.0.1:0".parse()?;
    let mut server_transport = transport.clone();
    server_transport.rdma(RdmaMode::Soft);
    let served = benches::setup::serve(ServeSpec {
        identity: server,
        listen: loopback,
        plaintext: Some(loopback),
        object: ObjectSource::Synthetic(size),
        transport: server_transport,
        chunk_bytes: cb,
        audit,
    })
    .await?;
    let target = Target {
        client,
        server_id: served.server_id.clone(),
        quic: served.server.quic_addr().context("no QUIC listener")?,
        tcp: served.server.tcp_addr().context("no TCP listener")?,
        plaintext: served.plaintext,
        dataset: served.dataset.clone(),
        object: served.object.clone(),
        size: served.size,
        chunk_bytes: cb,
        transport,
        server_pid: None,
        // The same filesystem as the server's store.
        pull_dir: served.dir.path().join("pulls"),
        bare: None,
    };
    std::fs::create_dir_all(&target.pull_dir)?;
    let doc = measure(
        &target,
        run,
        json!({ "kind": "local", "max_mtu": max_mtu, "audit": audit, "reference_loops": "loopback" }),
    )
    .await?;
    finish(&doc, "local", run)
}

/// Runs every mode `run.runs` times, interleaved, and builds the report document.
async fn measure(target: &Target, run: &RunArgs, mut params: Value) -> anyhow::Result<Value> {
    // What this host's processor can do, measured before the runs while it is quiet.
    let rates = benches::host::measure(std::time::Duration::from_millis(300))?;
    // Each mode with each destination it can pull into (the loops read into memory only);
    // a round runs them all in this order.
    let mut rows: Vec<(Mode, Destination, u32, &'static str)> = Vec::new();
    for &m in &run.modes {
        let (intos, stripes): (&[Destination], &[u32]) = if m.pulls_object() {
            (&run.into, &run.stripes)
        } else {
            (&[Destination::Memory], &[1])
        };
        for &n in stripes {
            for &into in intos {
                if let Some(row) = m.row_name(into, n)
                    && !rows.iter().any(|r| r.3 == row)
                {
                    rows.push((m, into, n, row));
                }
            }
        }
    }
    let mut results = Vec::new();
    for i in 0..run.runs.max(1) {
        for &(m, into, stripes, row) in &rows {
            let shape = mode::Shape {
                parallel: run.parallel,
                connections: run.connections.max(1),
                requests: run.requests,
                request_bytes: run.request_size.as_u64(),
                stripes,
            };
            let r = mode::run(target, m, into, shape).await?;
            if !run.json {
                eprintln!("run {}/{}: {row:<18} {:.3} GB/s", i + 1, run.runs, r.gbps);
            }
            results.push(r);
            mode::settle().await;
        }
    }
    let order: Vec<&'static str> = rows.iter().map(|r| r.3).collect();
    // Once to find bare-tcp's CPU per GB, which the floor builds on; then against the floor.
    let floor = report::floor(&report::summarise(&order, &results, None), &rates);
    let summary = report::summarise(&order, &results, floor);
    params["size"] = target.size.into();
    params["runs"] = run.runs.into();
    params["parallel"] = run.parallel.into();
    params["chunk_bytes"] = chunk_bytes(run)?.into();
    params["requests"] = run.requests.into();
    params["connections"] = run.connections.into();
    params["request_bytes"] = run.request_size.as_u64().into();
    params["into"] = json!(run.into);
    params["stripes"] = json!(run.stripes);
    Ok(json!({
        "params": params,
        "machine": report::machine(&rates),
        "floor_cpu_s_per_gb": floor,
        "modes": summary,
        "runs": results,
    }))
}

/// Prints the report (JSON or table) and writes it with a chart into `--out`.
fn finish(doc: &Value, kind: &str, run: &RunArgs) -> anyhow::Result<()> {
    let summary: Vec<report::ModeSummary> = serde_json::from_value(doc["modes"].clone())?;
    if run.json {
        println!("{}", serde_json::to_string_pretty(doc)?);
    } else {
        print!("{}", report::table(&summary));
        println!("{}", report::host_line(&doc["machine"]));
        if let Some(floor) = doc["floor_cpu_s_per_gb"].as_f64() {
            println!(
                "floor: {floor:.3} CPU s/GB (bare-tcp's, plus one AES-GCM seal, one open and \
                 one BLAKE3 pass on one core)"
            );
        }
    }
    if let Some(dir) = &run.out {
        std::fs::create_dir_all(dir)?;
        let base = format!("{kind}-{}", stamp());
        std::fs::write(
            dir.join(format!("{base}.json")),
            serde_json::to_string_pretty(doc)?,
        )?;
        std::fs::write(
            dir.join(format!("{base}.md")),
            report::markdown(&summary, &doc["machine"], &doc["params"]),
        )?;
        let title = match doc["params"]["kind"].as_str() {
            Some("lab") => format!(
                "transport-bench lab, MTU {}: GB/s (ratio to plaintext)",
                doc["mtu"]
            ),
            Some(k) => format!("transport-bench {k}: GB/s (ratio to plaintext)"),
            None => "transport-bench".to_owned(),
        };
        chart::svg(&dir.join(format!("{base}.svg")), &title, &summary)?;
        eprintln!("wrote {}/{base}.{{json,md,svg}}", dir.display());
    }
    Ok(())
}

/// Applies the QUIC window knobs, if given.
fn windows(run: &RunArgs, transport: &mut TransportConfig) -> anyhow::Result<()> {
    if run.stream_window.is_some() || run.connection_window.is_some() {
        let d = TransportConfig::default();
        let stream = run
            .stream_window
            .map_or(Ok(d.stream_window()), |w| u32::try_from(w.as_u64()))
            .context("--stream-window")?;
        let conn = run
            .connection_window
            .map_or(Ok(d.connection_window()), |w| u32::try_from(w.as_u64()))
            .context("--connection-window")?;
        transport.windows(stream, conn);
    }
    Ok(())
}

fn chunk_bytes(run: &RunArgs) -> anyhow::Result<u32> {
    u32::try_from(run.chunk_size.as_u64()).context("--chunk-size")
}

/// `YYYYMMDD-HHMMSS` in UTC, for result file names.
fn stamp() -> String {
    let t = humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string();
    t.replace(['-', ':'], "")
        .replace('T', "-")
        .trim_end_matches('Z')
        .to_owned()
}
