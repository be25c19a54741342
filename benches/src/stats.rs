//! Measurements: CPU time from getrusage, latency histograms, medians.

use std::time::Duration;

use hdrhistogram::Histogram;

/// CPU time (user + system) this process has used so far, all threads.
pub fn cpu_time() -> Duration {
    rusage(nix::sys::resource::UsageWho::RUSAGE_SELF)
}

/// CPU time (user + system) of this process's children that have been waited for.
pub fn children_cpu_time() -> Duration {
    rusage(nix::sys::resource::UsageWho::RUSAGE_CHILDREN)
}

fn rusage(who: nix::sys::resource::UsageWho) -> Duration {
    match nix::sys::resource::getrusage(who) {
        Ok(u) => {
            let tv = |t: nix::sys::time::TimeVal| {
                Duration::from_secs(t.tv_sec().max(0) as u64)
                    + Duration::from_micros(t.tv_usec().max(0) as u64)
            };
            tv(u.user_time()) + tv(u.system_time())
        }
        Err(_) => Duration::ZERO,
    }
}

/// CPU time (user + system) another process on this machine has used so far, from
/// `/proc/<pid>/stat`; `None` if it cannot be read.
pub fn process_cpu_time(pid: u32) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces; the fields after its closing parenthesis do not.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line, 12 and 13 after the name.
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    let hz = rustix::param::clock_ticks_per_second().max(1);
    Some(Duration::from_micros(ticks.saturating_mul(1_000_000) / hz))
}

/// A latency histogram in microseconds, 1 µs to 60 s, 3 significant digits.
pub fn latency_histogram() -> Result<Histogram<u64>, hdrhistogram::CreationError> {
    Histogram::new_with_bounds(1, 60_000_000, 3)
}

/// Percentiles of a histogram, in microseconds.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct Latency {
    /// Median.
    pub p50_us: u64,
    /// 90th percentile.
    pub p90_us: u64,
    /// 99th percentile.
    pub p99_us: u64,
    /// 99.9th percentile.
    pub p999_us: u64,
    /// Largest.
    pub max_us: u64,
    /// Samples.
    pub count: u64,
}

impl Latency {
    /// Reads the percentiles off `h`.
    pub fn of(h: &Histogram<u64>) -> Self {
        Self {
            p50_us: h.value_at_quantile(0.50),
            p90_us: h.value_at_quantile(0.90),
            p99_us: h.value_at_quantile(0.99),
            p999_us: h.value_at_quantile(0.999),
            max_us: h.max(),
            count: h.len(),
        }
    }
}

/// The median of `xs` (mean of the middle two for even counts); 0 for none.
pub fn median(xs: &[f64]) -> f64 {
    let mut v: Vec<f64> = xs.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    let m = v.len() / 2;
    if v.len() % 2 == 1 {
        v[m]
    } else {
        (v[m - 1] + v[m]) / 2.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians() {
        assert_eq!(median(&[]), 0.0);
        assert_eq!(median(&[3.0]), 3.0);
        assert_eq!(median(&[5.0, 1.0, 3.0]), 3.0);
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), 2.5);
    }

    #[test]
    fn cpu_time_advances_with_work() {
        let before = cpu_time();
        let mut h = blake3::Hasher::new();
        let buf = vec![7u8; 1 << 20];
        for _ in 0..200 {
            h.update(&buf);
        }
        std::hint::black_box(h.finalize());
        assert!(cpu_time() > before);
    }

    #[test]
    fn another_process_cpu_time_is_read_from_proc() {
        let me = std::process::id();
        let before = process_cpu_time(me).unwrap();
        let mut h = blake3::Hasher::new();
        let buf = vec![7u8; 1 << 20];
        for _ in 0..2000 {
            h.update(&buf);
        }
        std::hint::black_box(h.finalize());
        assert!(process_cpu_time(me).unwrap() > before);
        assert_eq!(process_cpu_time(u32::MAX), None);
    }

    #[test]
    fn percentiles() {
        let mut h = latency_histogram().unwrap();
        for v in 1..=1000u64 {
            h.record(v).unwrap();
        }
        let l = Latency::of(&h);
        assert!((495..=505).contains(&l.p50_us), "{l:?}");
        assert!((985..=995).contains(&l.p99_us), "{l:?}");
        assert_eq!(l.count, 1000);
    }
}
