//! Summaries of benchmark samples, one definition for every benchmark's JSON.

use serde::Serialize;

/// Median and range over rounds.
#[derive(Serialize, Clone, Copy)]
pub struct Spread {
    pub median: f64,
    pub min: f64,
    pub max: f64,
}

/// Median (the upper one of an even count), minimum and maximum.
pub fn spread(mut samples: Vec<f64>) -> Spread {
    samples.sort_by(f64::total_cmp);
    Spread {
        median: samples[samples.len() / 2],
        min: samples[0],
        max: samples[samples.len() - 1],
    }
}

#[derive(Serialize, Clone, Copy)]
/// Nearest-rank p50 and p99, and the maximum.
pub struct Percentiles {
    pub p50: f64,
    pub p99: f64,
    pub max: f64,
}

pub fn percentiles(mut samples: Vec<f64>) -> Percentiles {
    samples.sort_by(f64::total_cmp);
    // Nearest rank: the smallest sample with at least `percent` % of the samples at or below it.
    let at = |percent: usize| samples[(samples.len() * percent).div_ceil(100).max(1) - 1];
    Percentiles {
        p50: at(50),
        p99: at(99),
        max: samples[samples.len() - 1],
    }
}

pub use kube_ovn_testkit::machine::loadavg;

/// [`kube_ovn_testkit::machine::facts`] with the load averages before and after the run.
pub fn machine_facts(load_before: [f64; 3]) -> serde_json::Value {
    let mut facts = kube_ovn_testkit::machine::facts();
    facts.insert("loadavg_before".into(), load_before.to_vec().into());
    facts.insert("loadavg_after".into(), loadavg().to_vec().into());
    facts.into()
}

/// A memory line of `/proc/<pid>/status` (`VmRSS`, `VmHWM`, …) in MiB; NaN when unreadable.
pub fn proc_memory_mib(pid: u32, field: &str) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|kib| kib.parse::<f64>().ok())
        .map_or(f64::NAN, |kib| kib / 1024.0)
}

/// A benchmark binary's command line: `--list` (cargo probing: nothing to run), `--quick`,
/// `--out FILE` (default `target/bench/<name>.json`), and the Service counts
/// (`KOVN_BENCH_SCALES=10,10000` overrides the defaults, as for the traffic benchmark).
pub struct BenchArgs {
    pub list: bool,
    pub quick: bool,
    pub out: String,
    pub scales: Vec<usize>,
}

impl BenchArgs {
    /// This process's arguments for the benchmark writing `name.json`, with `quick` and `full`
    /// as the default scales.
    pub fn from_env(name: &str, quick: &[usize], full: &[usize]) -> Self {
        let args: Vec<String> = std::env::args().collect();
        let quick_run = args.iter().any(|a| a == "--quick");
        let out = args
            .iter()
            .position(|a| a == "--out")
            .and_then(|i| args.get(i + 1))
            .cloned()
            .unwrap_or_else(|| {
                format!("{}/../target/bench/{name}.json", env!("CARGO_MANIFEST_DIR"))
            });
        let scales = match std::env::var("KOVN_BENCH_SCALES") {
            Ok(list) => list
                .split(',')
                .map(|v| {
                    v.trim()
                        .parse()
                        .expect("KOVN_BENCH_SCALES: comma-separated counts")
                })
                .collect(),
            Err(_) if quick_run => quick.to_vec(),
            Err(_) => full.to_vec(),
        };
        Self {
            list: args.iter().any(|a| a == "--list"),
            quick: quick_run,
            out,
            scales,
        }
    }
}
