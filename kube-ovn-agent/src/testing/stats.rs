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

/// The 1-, 5- and 15-minute load averages.
pub fn loadavg() -> [f64; 3] {
    let text = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let mut values = text.split_whitespace().filter_map(|v| v.parse().ok());
    [
        values.next().unwrap_or(f64::NAN),
        values.next().unwrap_or(f64::NAN),
        values.next().unwrap_or(f64::NAN),
    ]
}

/// What a reader needs to judge a benchmark's numbers: kernel, CPU, cores, load before and
/// after, and the CPU vulnerability mitigations in force (they set the cost of every system
/// call).
pub fn machine_facts(load_before: [f64; 3]) -> serde_json::Value {
    let read = |path: &str| {
        std::fs::read_to_string(path).map_or_else(|_| "unknown".into(), |s| s.trim().to_owned())
    };
    let mut vulnerabilities = serde_json::Map::new();
    if let Ok(dir) = std::fs::read_dir("/sys/devices/system/cpu/vulnerabilities") {
        let mut entries: Vec<_> = dir.flatten().collect();
        entries.sort_by_key(std::fs::DirEntry::file_name);
        for entry in entries {
            let value = std::fs::read_to_string(entry.path()).unwrap_or_default();
            vulnerabilities.insert(
                entry.file_name().to_string_lossy().into_owned(),
                value.trim().into(),
            );
        }
    }
    let cpu = read("/proc/cpuinfo")
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .map(|m| m.trim().to_owned())
        .unwrap_or_default();
    serde_json::json!({
        "kernel": read("/proc/sys/kernel/osrelease"),
        "cpu": cpu,
        "cores": std::thread::available_parallelism().map_or(0, usize::from),
        "loadavg_before": load_before,
        "loadavg_after": loadavg(),
        "vulnerabilities": vulnerabilities,
    })
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
