//! `transport-bench`: what does security cost? Runs the plaintext baseline, TLS/TCP and
//! QUIC/mTLS over the same workload in one invocation and reports throughput, the ratio to
//! plaintext, CPU per GB and request latency percentiles.

#![forbid(unsafe_code)]
#![allow(clippy::disallowed_methods)]

use std::path::PathBuf;

use anyhow::Context;
use benches::mode::{self, Mode};
use benches::report;
use clap::{Parser, Subcommand};
use libtransport::TransportConfig;
use serde_json::json;

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
        /// Modes to run, comma-separated.
        #[arg(
            long,
            value_delimiter = ',',
            default_value = "plaintext-tcp,tls-tcp,quic"
        )]
        modes: Vec<Mode>,
        /// Runs per mode.
        #[arg(long, default_value_t = 3)]
        runs: u32,
        /// Chunks in flight, each on its own stream.
        #[arg(long, default_value_t = 8)]
        parallel: u32,
        /// Chunk size.
        #[arg(long, default_value = "4MiB")]
        chunk_size: bytesize::ByteSize,
        /// Small requests timed per run for the latency percentiles.
        #[arg(long, default_value_t = 1000)]
        requests: u32,
        /// QUIC path-MTU ceiling (loopback allows up to 65527).
        #[arg(long, default_value_t = 1452)]
        max_mtu: u16,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// Also write JSON and markdown results into this directory.
        #[arg(long)]
        out: Option<PathBuf>,
        /// Run the server without its audit trail (to show what the trail costs: it is
        /// written per transfer and per decision, never per chunk).
        #[arg(long)]
        no_audit: bool,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    match cli.command {
        Command::Local {
            size,
            modes,
            runs,
            parallel,
            chunk_size,
            requests,
            max_mtu,
            json: as_json,
            out,
            no_audit,
        } => rt.block_on(local(LocalArgs {
            size: size.as_u64(),
            modes,
            runs: runs.max(1),
            parallel,
            chunk_bytes: u32::try_from(chunk_size.as_u64()).context("--chunk-size")?,
            requests,
            max_mtu,
            json: as_json,
            out,
            audit: !no_audit,
        })),
    }
}

struct LocalArgs {
    size: u64,
    modes: Vec<Mode>,
    runs: u32,
    parallel: u32,
    chunk_bytes: u32,
    requests: u32,
    max_mtu: u16,
    json: bool,
    out: Option<PathBuf>,
    audit: bool,
}

async fn local(a: LocalArgs) -> anyhow::Result<()> {
    anyhow::ensure!(a.size > 0, "--size must be more than zero");
    let mut transport = TransportConfig::default();
    transport
        .chunk_bytes(a.chunk_bytes)
        .context("--chunk-size")?;
    transport
        .parallel_chunks(a.parallel)
        .context("--parallel")?;
    transport.mtu(1200, a.max_mtu).context("--max-mtu")?;
    let bench = benches::setup::setup(a.size, transport, a.chunk_bytes, a.audit).await?;
    let mut results = Vec::new();
    for run in 0..a.runs {
        for &m in &a.modes {
            let r = mode::run(&bench, m, a.parallel, a.requests).await?;
            if !a.json {
                eprintln!(
                    "run {}/{}: {:<14} {:.3} GB/s",
                    run + 1,
                    a.runs,
                    m.name(),
                    r.gbps
                );
            }
            results.push(r);
            mode::settle().await;
        }
    }
    let order: Vec<&'static str> = a.modes.iter().map(|m| m.name()).collect();
    let summary = report::summarise(&order, &results);
    let machine = report::machine();
    let params = json!({
        "kind": "local",
        "size": a.size,
        "runs": a.runs,
        "parallel": a.parallel,
        "chunk_bytes": a.chunk_bytes,
        "requests": a.requests,
        "max_mtu": a.max_mtu,
        "audit": a.audit,
    });
    let doc = json!({
        "params": params,
        "machine": machine,
        "modes": summary,
        "runs": results,
    });
    if a.json {
        println!("{}", serde_json::to_string_pretty(&doc)?);
    } else {
        print!("{}", report::table(&summary));
    }
    if let Some(dir) = a.out {
        std::fs::create_dir_all(&dir)?;
        let stamp = chrono_stamp();
        std::fs::write(
            dir.join(format!("local-{stamp}.json")),
            serde_json::to_string_pretty(&doc)?,
        )?;
        std::fs::write(
            dir.join(format!("local-{stamp}.md")),
            report::markdown(&summary, &doc["machine"], &doc["params"]),
        )?;
    }
    Ok(())
}

/// `YYYYMMDD-HHMMSS` in UTC, for result file names.
fn chrono_stamp() -> String {
    let t = humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string();
    t.replace(['-', ':'], "")
        .replace('T', "-")
        .trim_end_matches('Z')
        .to_owned()
}
