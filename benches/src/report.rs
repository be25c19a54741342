//! Reports: medians per mode (and per destination: `tls-tcp` pulls into memory,
//! `tls-tcp>file` into a file), ratios to each mode's unencrypted baseline (plaintext-tcp;
//! rdma-soft-plain for rdma-soft), to its library's reference loop and, for a pull into a
//! file, to the same pull into memory; the machine they ran on; as a table, JSON and
//! markdown.

use serde::Serialize;
use serde_json::{Value, json};

use crate::mode::{Destination, Mode, RunResult};
use crate::stats::median;

/// One mode's summary over all runs.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct ModeSummary {
    /// Mode name, as its rows are named: `tls-tcp` for pulls into memory, `tls-tcp>file`
    /// for pulls into a file (see `Mode::row_name`).
    pub mode: String,
    /// Where the object went: `memory` or `file`.
    #[serde(default)]
    pub into: Destination,
    /// Connections one pull was striped over (`MODE*N` rows).
    #[serde(default = "one")]
    pub stripes: u32,
    /// Median throughput, 10^9 bytes/s.
    pub gbps: f64,
    /// Median throughput over its baseline's median: plaintext-tcp, or rdma-soft-plain for
    /// the soft RDMA modes (1.0 for a baseline; absent without it). A pull into a file is
    /// set against the baseline's pull into a file.
    pub ratio_to_plaintext: Option<f64>,
    /// Median throughput over the median of the reference loop of its library (bare-tcp,
    /// bare-tls or bare-quic; see `Mode::bare`), when that loop ran. The loops read into
    /// memory; a pull into a file is set against them all the same.
    #[serde(default)]
    pub ratio_to_bare: Option<f64>,
    /// A pull into a file: its median throughput over the same mode's pull into memory,
    /// when both ran (absent for pulls into memory).
    #[serde(default)]
    pub ratio_to_memory: Option<f64>,
    /// Median CPU seconds per GB, both sides.
    pub cpu_s_per_gb: f64,
    /// Median CPU seconds per GB at the client.
    #[serde(default)]
    pub client_cpu_s_per_gb: f64,
    /// Median CPU seconds per GB at the server, where it was measured.
    #[serde(default)]
    pub server_cpu_s_per_gb: Option<f64>,
    /// CPU seconds per GB over the floor (bare-tcp's, plus one seal, one open and one
    /// BLAKE3 pass; `floor_cpu_s_per_gb` in the report), when bare-tcp ran.
    #[serde(default)]
    pub cost_over_floor: Option<f64>,
    /// Median of each run's p50 small-request latency.
    pub p50_us: u64,
    /// Median of each run's p99 small-request latency.
    pub p99_us: u64,
    /// Median p99.9.
    pub p999_us: u64,
    /// Largest latency seen in any run.
    pub max_us: u64,
    /// Median connection set-up time.
    pub connect_us: u64,
    /// Throughput of each run, in order.
    pub runs_gbps: Vec<f64>,
}

fn one() -> u32 {
    1
}

/// The floor of CPU seconds per GB in this run: bare-tcp's median (both ends) plus what one
/// seal, one open and one BLAKE3 pass cost on one core of this host; none without bare-tcp.
pub fn floor(summary: &[ModeSummary], rates: &crate::host::Rates) -> Option<f64> {
    summary
        .iter()
        .find(|m| m.mode == Mode::BareTcp.name())
        .map(|m| round(rates.floor_cpu_s_per_gb(m.cpu_s_per_gb), 3))
}

/// Summarises runs by mode, in `order`, against the floor `floor` (see [`floor`]): call
/// once without it to find bare-tcp's figures, then with it.
pub fn summarise(
    order: &[&'static str],
    runs: &[RunResult],
    floor: Option<f64>,
) -> Vec<ModeSummary> {
    let mut out: Vec<ModeSummary> = order
        .iter()
        .map(|&mode| {
            let rs: Vec<&RunResult> = runs.iter().filter(|r| r.mode == mode).collect();
            let med = |f: &dyn Fn(&RunResult) -> f64| {
                median(&rs.iter().map(|r| f(r)).collect::<Vec<_>>())
            };
            ModeSummary {
                mode: mode.to_owned(),
                into: rs.first().map(|r| r.into).unwrap_or_default(),
                stripes: rs.first().map_or(1, |r| r.stripes),
                gbps: round(med(&|r| r.gbps), 3),
                ratio_to_plaintext: None,
                ratio_to_bare: None,
                ratio_to_memory: None,
                cpu_s_per_gb: round(med(&|r| r.cpu_s_per_gb), 3),
                client_cpu_s_per_gb: round(med(&|r| r.client_cpu_s_per_gb), 3),
                server_cpu_s_per_gb: {
                    let s: Vec<f64> = rs.iter().filter_map(|r| r.server_cpu_s_per_gb).collect();
                    (!s.is_empty()).then(|| round(median(&s), 3))
                },
                cost_over_floor: floor
                    .filter(|f| *f > 0.0)
                    .map(|f| round(med(&|r| r.cpu_s_per_gb) / f, 3)),
                p50_us: med(&|r| r.latency.p50_us as f64) as u64,
                p99_us: med(&|r| r.latency.p99_us as f64) as u64,
                p999_us: med(&|r| r.latency.p999_us as f64) as u64,
                max_us: rs.iter().map(|r| r.latency.max_us).max().unwrap_or(0),
                connect_us: med(&|r| r.connect_us as f64) as u64,
                runs_gbps: rs.iter().map(|r| round(r.gbps, 3)).collect(),
            }
        })
        .collect();
    let gbps: Vec<(String, f64)> = out.iter().map(|m| (m.mode.clone(), m.gbps)).collect();
    // The median of the row named `row`, if it ran and moved anything.
    let of = |row: Option<&str>| {
        row.and_then(|row| gbps.iter().find(|(name, _)| name == row))
            .map(|(_, g)| *g)
            .filter(|g| *g > 0.0)
    };
    for m in &mut out {
        let Some((mode, into, stripes)) = Mode::parse_row(&m.mode) else {
            continue;
        };
        let g = m.gbps;
        let ratio = |base: Option<f64>| base.map(|b| round(g / b, 3));
        m.ratio_to_plaintext = ratio(of(mode.baseline().row_name(into, stripes)));
        m.ratio_to_bare = ratio(of(mode.bare().map(Mode::name)));
        if into == Destination::File {
            m.ratio_to_memory = ratio(of(mode.row_name(Destination::Memory, stripes)));
        }
    }
    out
}

/// Facts about the machine and build, recorded with every result, with what one core of it
/// encrypts and copies per second (`rates`, see [`crate::host`]).
pub fn machine(rates: &crate::host::Rates) -> Value {
    let cpu = crate::host::Cpu::this_machine();
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "unknown".into());
    let mtu = std::fs::read_to_string("/sys/class/net/lo/mtu")
        .ok()
        .and_then(|s| s.trim().parse::<u32>().ok());
    let commit = std::process::Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned());
    json!({
        "cpu": if cpu.model_name.is_empty() { "unknown" } else { cpu.model_name.as_str() },
        "cpu_family": cpu.family,
        "cpu_model": cpu.model,
        "cpu_crypto_flags": cpu.crypto_flags,
        "one_core": rates,
        "cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        "kernel": kernel,
        "loopback_mtu": mtu,
        "commit": commit,
        "time": humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
    })
}

/// One line naming the host's processor and its one-core rates, under the terminal table.
pub fn host_line(machine: &Value) -> String {
    let flags: Vec<&str> = machine["cpu_crypto_flags"]
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    let rate = |k: &str| {
        machine["one_core"][k]
            .as_f64()
            .map_or_else(|| "?".to_owned(), |g| format!("{g:.2}"))
    };
    format!(
        "host: {} (family {}, model {}; {}), one core: AES-128-GCM seal {} GB/s, open {} GB/s, \
         BLAKE3 {} GB/s, memcpy {} GB/s",
        machine["cpu"].as_str().unwrap_or("unknown"),
        machine["cpu_family"],
        machine["cpu_model"],
        if flags.is_empty() {
            "no AES flags".to_owned()
        } else {
            flags.join(" ")
        },
        rate("aes_128_gcm_seal_gbps"),
        rate("aes_128_gcm_open_gbps"),
        rate("blake3_gbps"),
        rate("memcpy_gbps"),
    )
}

/// A plain-text table for the terminal.
pub fn table(summary: &[ModeSummary]) -> String {
    let opt = |v: Option<f64>| v.map_or_else(|| "-".to_owned(), |r| format!("{r:.3}"));
    let mut s = format!(
        "{:<18} {:>7} {:>9} {:>8} {:>7} {:>9} {:>9} {:>9} {:>8} {:>8} {:>8} {:>9} {:>10}\n",
        "mode",
        "GB/s",
        "ratio",
        "to bare",
        "to mem",
        "CPU s/GB",
        "client",
        "server",
        "x floor",
        "p50 us",
        "p99 us",
        "p99.9 us",
        "connect us"
    );
    for m in summary {
        s.push_str(&format!(
            "{:<18} {:>7.3} {:>9} {:>8} {:>7} {:>9.3} {:>9.3} {:>9} {:>8} {:>8} {:>8} {:>9} {:>10}\n",
            m.mode,
            m.gbps,
            opt(m.ratio_to_plaintext),
            opt(m.ratio_to_bare),
            opt(m.ratio_to_memory),
            m.cpu_s_per_gb,
            m.client_cpu_s_per_gb,
            opt(m.server_cpu_s_per_gb),
            opt(m.cost_over_floor),
            m.p50_us,
            m.p99_us,
            m.p999_us,
            m.connect_us
        ));
    }
    s
}

/// The same table in markdown, for `benches/results/`.
pub fn markdown(summary: &[ModeSummary], machine: &Value, params: &Value) -> String {
    let opt = |v: Option<f64>| v.map_or_else(|| "-".to_owned(), |r| format!("{r:.3}"));
    let mut s = String::from(
        "| mode | GB/s (median) | ratio to plaintext | ratio to bare | ratio to memory | CPU s/GB (client / server) | × floor | p50 µs | p99 µs | runs (GB/s) |\n|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for m in summary {
        s.push_str(&format!(
            "| {} | {:.3} | {} | {} | {} | {:.3} ({:.3} / {}) | {} | {} | {} | {} |\n",
            m.mode,
            m.gbps,
            opt(m.ratio_to_plaintext),
            opt(m.ratio_to_bare),
            opt(m.ratio_to_memory),
            m.cpu_s_per_gb,
            m.client_cpu_s_per_gb,
            opt(m.server_cpu_s_per_gb),
            opt(m.cost_over_floor),
            m.p50_us,
            m.p99_us,
            m.runs_gbps
                .iter()
                .map(|g| format!("{g:.3}"))
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    s.push_str(&format!(
        "\n{}\n\nMachine: `{machine}`\n\nParameters: `{params}`\n",
        host_line(machine)
    ));
    s
}

fn round(x: f64, places: i32) -> f64 {
    let f = 10f64.powi(places);
    (x * f).round() / f
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_host_line_names_the_processor_and_its_rates() {
        let m = json!({
            "cpu": "AMD EPYC", "cpu_family": 23, "cpu_model": 1,
            "cpu_crypto_flags": ["aes", "avx2"],
            "one_core": {
                "aes_128_gcm_seal_gbps": 2.954, "aes_128_gcm_open_gbps": 3.1,
                "blake3_gbps": 1.5, "memcpy_gbps": 11.0
            },
        });
        assert_eq!(
            host_line(&m),
            "host: AMD EPYC (family 23, model 1; aes avx2), one core: AES-128-GCM seal 2.95 \
             GB/s, open 3.10 GB/s, BLAKE3 1.50 GB/s, memcpy 11.00 GB/s"
        );
        // A report from before the probe existed still prints.
        let old = json!({ "cpu": "AMD EPYC" });
        assert!(
            host_line(&old).contains("AES-128-GCM seal ? GB/s"),
            "{}",
            host_line(&old)
        );
    }
}
