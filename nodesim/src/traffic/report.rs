//! Workloads and their metrics, per-window samples, statistics over rounds, ratios, the
//! targets of issue 6, and the outputs: `traffic.json`, `traffic.md`, SVG plots, the console
//! table. The JSON schema is documented in BENCHMARKS.md; bump `SCHEMA` when it changes.

use std::{fmt::Write as _, path::Path, time::Duration};

use anyhow::{Context as _, Result};
use serde_json::{Value, json};

use super::{Config, MODES, cpu, svg};

const SCHEMA: u32 = 1;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Workload {
    ConnClusterIp,
    ConnNodePort,
    UdpClusterIp,
    UdpNodePort,
    Bulk,
    /// Bulk with one MSS per packet: the client's link offers no segmentation offload, so every
    /// ~1.5 KB packet crosses TC on its own (the per-packet worst case of established flows).
    BulkSegments,
    Rr,
}

pub struct Metric {
    pub name: &'static str,
    pub unit: &'static str,
    pub higher_is_better: bool,
    /// Drawn as an SVG (value vs scale, one line per mode).
    pub plot: bool,
}

const fn metric(name: &'static str, unit: &'static str, higher: bool, plot: bool) -> Metric {
    Metric {
        name,
        unit,
        higher_is_better: higher,
        plot,
    }
}

const CONN: &[Metric] = &[
    metric("conn_per_s", "connections/s", true, true),
    metric("cpu_us_per_conn", "µs CPU per connection", false, false),
];
const UDP: &[Metric] = &[
    metric("delivered_pps", "packets/s delivered", true, true),
    metric("sent_pps", "packets/s sent", true, false),
    metric("loss_pct", "% sent but not delivered", false, false),
    metric(
        "cpu_ns_per_pkt",
        "ns CPU per delivered packet",
        false,
        false,
    ),
];
const BULK: &[Metric] = &[
    metric("gbit_per_s", "Gbit/s", true, true),
    metric("ovn0_kpps", "kpackets/s through ovn0", true, false),
    metric("cpu_ns_per_pkt", "ns CPU per ovn0 packet", false, false),
];
const RR: &[Metric] = &[
    metric("trans_per_s", "transactions/s", true, true),
    metric("p50_us", "µs p50 latency", false, true),
    metric("p99_us", "µs p99 latency", false, true),
    metric("cpu_us_per_trans", "µs CPU per transaction", false, false),
];

impl Workload {
    pub const ALL: [Self; 7] = [
        Self::ConnClusterIp,
        Self::ConnNodePort,
        Self::UdpClusterIp,
        Self::UdpNodePort,
        Self::Bulk,
        Self::BulkSegments,
        Self::Rr,
    ];

    pub fn id(self) -> &'static str {
        match self {
            Self::ConnClusterIp => "conn_clusterip",
            Self::ConnNodePort => "conn_nodeport",
            Self::UdpClusterIp => "udp_clusterip",
            Self::UdpNodePort => "udp_nodeport",
            Self::Bulk => "bulk",
            Self::BulkSegments => "bulk_mss",
            Self::Rr => "rr",
        }
    }

    pub fn title(self) -> &'static str {
        match self {
            Self::ConnClusterIp => "New TCP connections, pod → ClusterIP (R1a)",
            Self::ConnNodePort => "New TCP connections, external → NodePort ETP=Local (R2t)",
            Self::UdpClusterIp => "New UDP flows (new 5-tuple per packet), pod → ClusterIP (R1a)",
            Self::UdpNodePort => {
                "New UDP flows (new 5-tuple per packet), external → NodePort ETP=Local (R2u)"
            }
            Self::Bulk => "Established TCP, bulk throughput, pod → ClusterIP, one connection",
            Self::BulkSegments => {
                "Established TCP, bulk throughput without segmentation offload (one MSS per \
                 packet), pod → ClusterIP"
            }
            Self::Rr => {
                "Established TCP, 64-byte request/response, pod → ClusterIP, one connection"
            }
        }
    }

    pub fn metrics(self) -> &'static [Metric] {
        match self {
            Self::ConnClusterIp | Self::ConnNodePort => CONN,
            Self::UdpClusterIp | Self::UdpNodePort => UDP,
            Self::Bulk | Self::BulkSegments => BULK,
            Self::Rr => RR,
        }
    }

    /// The metrics issue 6's "ebpf ≥ iptables" target is judged on.
    fn target_metrics(self) -> &'static [&'static str] {
        match self {
            Self::ConnClusterIp | Self::ConnNodePort => &["conn_per_s"],
            Self::UdpClusterIp | Self::UdpNodePort => &["delivered_pps"],
            Self::Bulk | Self::BulkSegments => &["gbit_per_s"],
            Self::Rr => &["trans_per_s", "p99_us"],
        }
    }
}

/// What the coordinator read around one window.
pub struct Window {
    pub usage: cpu::Usage,
    /// Completed connections, sent datagrams, or recorded transactions.
    pub ops: u64,
    pub failed: u64,
    /// Datagrams the UDP sink received.
    pub delivered: u64,
    /// Bytes the bulk sink received.
    pub bytes: u64,
    pub ovn0_packets: u64,
    /// Request/response round trips (ns).
    pub latencies: Vec<u32>,
    pub first_error: Option<String>,
    pub cores: usize,
}

/// One window's values, in the order of its workload's [`Workload::metrics`].
#[derive(Clone, Debug)]
pub struct Sample {
    pub values: Vec<f64>,
    pub failed: u64,
    pub first_error: Option<String>,
    pub foreign_share: f64,
}

#[expect(
    clippy::cast_precision_loss,
    reason = "counts and ns within a window are far below 2^52"
)]
fn f(v: u64) -> f64 {
    v as f64
}

fn per(numerator: f64, denominator: f64) -> f64 {
    if denominator > 0.0 {
        numerator / denominator
    } else {
        f64::NAN
    }
}

fn percentile(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    #[expect(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        reason = "an index into a non-empty slice"
    )]
    let index = ((f(sorted.len() as u64) - 1.0) * p).round() as usize;
    f64::from(sorted[index.min(sorted.len() - 1)])
}

impl Sample {
    pub fn from_window(workload: Workload, w: &Window) -> Self {
        let wall = w.usage.wall_s;
        let cpu = f(w.usage.total_ns());
        let ops = f(w.ops);
        let values = match workload {
            Workload::ConnClusterIp | Workload::ConnNodePort => {
                vec![per(ops, wall), per(cpu, ops) / 1e3]
            }
            Workload::UdpClusterIp | Workload::UdpNodePort => {
                let delivered = f(w.delivered);
                vec![
                    per(delivered, wall),
                    per(ops, wall),
                    // Packets in flight at the window's edges make this slightly noisy around 0.
                    (per(ops - delivered, ops) * 100.0).max(0.0),
                    per(cpu, delivered),
                ]
            }
            Workload::Bulk | Workload::BulkSegments => {
                let packets = f(w.ovn0_packets);
                vec![
                    per(f(w.bytes) * 8.0, wall) / 1e9,
                    per(packets, wall) / 1e3,
                    per(cpu, packets),
                ]
            }
            Workload::Rr => {
                let mut sorted = w.latencies.clone();
                sorted.sort_unstable();
                let n = f(sorted.len() as u64);
                vec![
                    per(n, wall),
                    percentile(&sorted, 0.50) / 1e3,
                    percentile(&sorted, 0.99) / 1e3,
                    per(cpu, n) / 1e3,
                ]
            }
        };
        Self {
            values,
            failed: w.failed,
            first_error: w.first_error.clone(),
            foreign_share: w.usage.foreign_share(w.cores),
        }
    }
}

#[derive(Clone, Copy, Debug)]
pub struct Stats {
    pub median: f64,
    pub min: f64,
    pub max: f64,
}

pub fn stats(values: impl Iterator<Item = f64>) -> Stats {
    let mut v: Vec<f64> = values.filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return Stats {
            median: f64::NAN,
            min: f64::NAN,
            max: f64::NAN,
        };
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    let median = if n % 2 == 1 {
        v[n / 2]
    } else {
        f64::midpoint(v[n / 2 - 1], v[n / 2])
    };
    Stats {
        median,
        min: v[0],
        max: v[n - 1],
    }
}

/// One scale step: samples per workload, per mode (in [`MODES`] order), per round.
pub struct ScaleResult {
    pub entries: usize,
    pub agent_file_bytes: usize,
    pub setup_s: f64,
    pub state_check: Value,
    pub evidence: Value,
    samples: Vec<[Vec<Sample>; 3]>,
}

impl ScaleResult {
    pub fn new(entries: usize, agent_file_bytes: usize, setup_s: f64, state_check: Value) -> Self {
        Self {
            entries,
            agent_file_bytes,
            setup_s,
            state_check,
            evidence: Value::Null,
            samples: Workload::ALL.iter().map(|_| Default::default()).collect(),
        }
    }

    pub fn push(&mut self, workload: Workload, mode: usize, sample: Sample) {
        let w = Workload::ALL
            .iter()
            .position(|x| *x == workload)
            .expect("known workload");
        self.samples[w][mode].push(sample);
    }

    fn cell(&self, workload: Workload, mode: usize) -> &[Sample] {
        let w = Workload::ALL
            .iter()
            .position(|x| *x == workload)
            .expect("known workload");
        &self.samples[w][mode]
    }

    fn stat(&self, workload: Workload, mode: usize, metric: usize) -> Stats {
        stats(self.cell(workload, mode).iter().map(|s| s.values[metric]))
    }

    fn foreign(&self) -> Stats {
        stats(
            self.samples
                .iter()
                .flat_map(|modes| modes.iter().flatten())
                .map(|s| s.foreign_share * 100.0),
        )
    }
}

fn ratio(a: f64, b: f64) -> f64 {
    per(a, b)
}

pub struct Report {
    config: Config,
    agent: String,
    kernel: String,
    cpu: String,
    cores: usize,
    load_before: [f64; 3],
    load_after: [f64; 3],
    perf: std::result::Result<(), String>,
    wall_s: f64,
    pub scales: Vec<ScaleResult>,
}

fn read_trimmed(path: &str) -> String {
    std::fs::read_to_string(path).map_or_else(|_| "unknown".into(), |s| s.trim().to_owned())
}

impl Report {
    pub fn new(config: &Config, agent: &Path) -> Self {
        Self {
            config: config.clone(),
            agent: agent.display().to_string(),
            kernel: read_trimmed("/proc/sys/kernel/osrelease"),
            cpu: std::fs::read_to_string("/proc/cpuinfo")
                .ok()
                .and_then(|c| {
                    c.lines()
                        .find(|l| l.starts_with("model name"))
                        .and_then(|l| l.split(':').nth(1))
                        .map(|m| m.trim().to_owned())
                })
                .unwrap_or_default(),
            cores: std::thread::available_parallelism().map_or(0, usize::from),
            load_before: cpu::loadavg(),
            load_after: [0.0; 3],
            perf: cpu::perf_cycles(),
            wall_s: 0.0,
            scales: Vec::new(),
        }
    }

    pub fn finish(&mut self, elapsed: Duration) {
        self.load_after = cpu::loadavg();
        self.wall_s = elapsed.as_secs_f64();
    }

    /// Writes JSON, Markdown and SVGs under `out` and prints the Markdown.
    pub fn write(&self, out: &Path) -> Result<()> {
        let json_path = out.join("traffic.json");
        std::fs::write(
            &json_path,
            serde_json::to_string_pretty(&self.json()).context("serialising the report")?,
        )
        .with_context(|| format!("writing {}", json_path.display()))?;
        let mut svgs = Vec::new();
        for &workload in &self.config.workloads {
            for (m, metric) in workload.metrics().iter().enumerate() {
                if !metric.plot {
                    continue;
                }
                let name = format!("traffic_{}_{}.svg", workload.id(), metric.name);
                let series = MODES
                    .iter()
                    .enumerate()
                    .map(|(mode, kind)| svg::Series {
                        label: kind.to_string(),
                        points: self
                            .scales
                            .iter()
                            .map(|s| {
                                let st = s.stat(workload, mode, m);
                                #[expect(clippy::cast_precision_loss, reason = "≤ 100 000")]
                                let x = s.entries as f64;
                                (x, st.median, st.min, st.max)
                            })
                            .collect(),
                    })
                    .collect::<Vec<_>>();
                let plot = svg::Plot {
                    title: format!("{}: {}", workload.id(), metric.unit),
                    subtitle: workload.title().into(),
                    x_label: "entries (Services = Subnets = Nodes)".into(),
                    y_label: metric.unit.into(),
                    series,
                };
                std::fs::write(out.join(&name), plot.render())
                    .with_context(|| format!("writing {name}"))?;
                svgs.push(name);
            }
        }
        let md = self.markdown(&svgs);
        std::fs::write(out.join("traffic.md"), &md).context("writing traffic.md")?;
        println!("{md}");
        println!(
            "wrote {} , {} and {} SVG plots",
            json_path.display(),
            out.join("traffic.md").display(),
            svgs.len()
        );
        Ok(())
    }

    /// One scale step: per workload, per metric, per mode the samples and statistics.
    fn scale_json(&self, s: &ScaleResult) -> Value {
        let workloads: Vec<Value> = self
            .config
            .workloads
            .iter()
            .map(|&w| {
                let metrics: Vec<Value> = w
                    .metrics()
                    .iter()
                    .enumerate()
                    .map(|(m, metric)| {
                        let mut modes = serde_json::Map::new();
                        let mut medians = [0.0; 3];
                        for (i, kind) in MODES.iter().enumerate() {
                            let st = s.stat(w, i, m);
                            medians[i] = st.median;
                            let samples: Vec<f64> =
                                s.cell(w, i).iter().map(|x| x.values[m]).collect();
                            modes.insert(
                                kind.to_string(),
                                json!({
                                    "median": st.median, "min": st.min, "max": st.max,
                                    "samples": samples,
                                }),
                            );
                        }
                        json!({
                            "name": metric.name,
                            "unit": metric.unit,
                            "higher_is_better": metric.higher_is_better,
                            "modes": modes,
                            "ratio_ebpf_iptables": ratio(medians[2], medians[1]),
                            "ratio_ebpf_baseline": ratio(medians[2], medians[0]),
                        })
                    })
                    .collect();
                let failed: Vec<Value> = MODES
                    .iter()
                    .enumerate()
                    .map(|(i, kind)| {
                        let cell = s.cell(w, i);
                        json!({
                            "mode": kind.to_string(),
                            "failed": cell.iter().map(|x| x.failed).sum::<u64>(),
                            "first_error": cell.iter().find_map(|x| x.first_error.clone()),
                        })
                    })
                    .collect();
                json!({
                    "workload": w.id(),
                    "title": w.title(),
                    "metrics": metrics,
                    "failures": failed,
                })
            })
            .collect();
        let foreign = s.foreign();
        json!({
            "entries": s.entries,
            "setup_s": s.setup_s,
            "agent_file_bytes": s.agent_file_bytes,
            "state": s.state_check,
            "hook_evidence": s.evidence,
            "foreign_cpu_pct": {"median": foreign.median, "min": foreign.min, "max": foreign.max},
            "workloads": workloads,
        })
    }

    fn json(&self) -> Value {
        let c = &self.config;
        let scales: Vec<Value> = self.scales.iter().map(|s| self.scale_json(s)).collect();
        json!({
            "schema": SCHEMA,
            "suite": "traffic",
            "quick": c.quick,
            "wall_s": self.wall_s,
            "machine": {
                "kernel": self.kernel,
                "cpu": self.cpu,
                "cores": self.cores,
                "loadavg_before": self.load_before,
                "loadavg_after": self.load_after,
            },
            "config": {
                "scales": c.scales,
                "rounds": c.rounds,
                "warmup_s": c.warmup.as_secs_f64(),
                "window_s": c.window.as_secs_f64(),
                "conn_threads": c.conn_threads,
                "modes": MODES.iter().map(ToString::to_string).collect::<Vec<_>>(),
                "order": "per round, per workload: baseline, iptables, ebpf",
                "kube_proxy": "ipvs (emulated)",
            },
            "agent": { "binary": self.agent },
            "cpu_accounting": {
                "perf_cycles": match &self.perf { Ok(()) => Value::from("available, not used"), Err(e) => Value::from(e.clone()) },
                "method": "getrusage(RUSAGE_SELF) of the benchmark process (generators, servers and the softirq work charged to them) + ksoftirqd/* schedstat + the agent's /proc/<pid>/stat, per window",
            },
            "scales": scales,
            "targets": self.targets().iter().map(|t| json!({
                "target": t.goal, "workload": t.workload, "entries": t.entries,
                "metric": t.metric, "ratio": t.ratio, "met": t.met,
                "within_spread": t.within_spread,
            })).collect::<Vec<_>>(),
        })
    }

    fn workload_table(&self, s: &mut String, w: Workload) {
        let _ = writeln!(
            *s,
            "\n## {} — {}\n\n| metric | entries | baseline | iptables | ebpf | ebpf/iptables \
             | ebpf/baseline |\n|---|---:|---:|---:|---:|---:|---:|",
            w.id(),
            w.title()
        );
        for (m, metric) in w.metrics().iter().enumerate() {
            for sc in &self.scales {
                let st: Vec<Stats> = (0..3).map(|i| sc.stat(w, i, m)).collect();
                let _ = writeln!(
                    s,
                    "| {} ({}) | {} | {} | {} | {} | {} | {} |",
                    metric.name,
                    metric.unit,
                    sc.entries,
                    cell(st[0]),
                    cell(st[1]),
                    cell(st[2]),
                    num(ratio(st[2].median, st[1].median)),
                    num(ratio(st[2].median, st[0].median)),
                );
            }
        }
        let failures: Vec<String> = self
            .scales
            .iter()
            .flat_map(|sc| {
                MODES.iter().enumerate().filter_map(move |(i, kind)| {
                    let cell = sc.cell(w, i);
                    let failed: u64 = cell.iter().map(|x| x.failed).sum();
                    (failed > 0).then(|| {
                        format!(
                            "{} entries, {kind}: {failed} failed ({})",
                            sc.entries,
                            cell.iter()
                                .find_map(|x| x.first_error.clone())
                                .unwrap_or_default()
                        )
                    })
                })
            })
            .collect();
        if !failures.is_empty() {
            let _ = writeln!(*s, "\nFailures: {}", failures.join("; "));
        }
    }

    fn targets(&self) -> Vec<Target> {
        let mut out = Vec::new();
        for s in &self.scales {
            for &w in &self.config.workloads {
                for name in w.target_metrics() {
                    let (m, metric) = w
                        .metrics()
                        .iter()
                        .enumerate()
                        .find(|(_, x)| x.name == *name)
                        .expect("target metric exists");
                    let (ipt, ebpf) = (s.stat(w, 1, m), s.stat(w, 2, m));
                    let r = ratio(ebpf.median, ipt.median);
                    out.push(Target {
                        goal: "ebpf ≥ iptables",
                        workload: w.id(),
                        entries: s.entries,
                        metric: metric.name,
                        ratio: r,
                        met: if metric.higher_is_better {
                            r >= 1.0
                        } else {
                            r <= 1.0
                        },
                        within_spread: ebpf.min <= ipt.max && ipt.min <= ebpf.max,
                    });
                }
            }
            for w in [Workload::Bulk, Workload::BulkSegments]
                .into_iter()
                .filter(|w| self.config.workloads.contains(w))
            {
                let m = 0; // gbit_per_s
                let (base, ebpf) = (s.stat(w, 0, m), s.stat(w, 2, m));
                let r = ratio(ebpf.median, base.median);
                out.push(Target {
                    goal: "ebpf within 3 % of baseline (established throughput)",
                    workload: w.id(),
                    entries: s.entries,
                    metric: "gbit_per_s",
                    ratio: r,
                    met: r >= 0.97,
                    within_spread: ebpf.min <= base.max && base.min <= ebpf.max,
                });
            }
        }
        out
    }

    fn markdown(&self, svgs: &[String]) -> String {
        let c = &self.config;
        let mut s = String::new();
        let _ = writeln!(
            s,
            "# Traffic benchmark{}\n\nKernel {}, {} ({} cores); load average {:.2} / {:.2} / \
             {:.2} before, {:.2} / {:.2} / {:.2} after; {:.0} s wall.\n\n{} rounds per scale, \
             each workload measured on baseline, iptables, ebpf in turn; {:.2} s warm-up + \
             {:.2} s window; median (min–max) over rounds. Ratios are of medians: for \
             throughput > 1 means ebpf is faster, for latency and CPU < 1 means ebpf is \
             cheaper.\n",
            if c.quick { " (quick)" } else { "" },
            self.kernel,
            self.cpu,
            self.cores,
            self.load_before[0],
            self.load_before[1],
            self.load_before[2],
            self.load_after[0],
            self.load_after[1],
            self.load_after[2],
            self.wall_s,
            c.rounds,
            c.warmup.as_secs_f64(),
            c.window.as_secs_f64(),
        );
        for sc in &self.scales {
            let foreign = sc.foreign();
            let _ = writeln!(
                s,
                "- {} entries: set-up {:.1} s; agent cluster file {:.1} MiB; other processes used \
                 {:.1} % (max {:.1} %) of the machine during windows",
                sc.entries,
                sc.setup_s,
                super::mib(sc.agent_file_bytes),
                foreign.median,
                foreign.max
            );
        }
        for &w in &self.config.workloads {
            self.workload_table(&mut s, w);
        }
        let _ = writeln!(
            s,
            "\n## Targets (issue 6)\n\n| target | workload | entries | metric | ratio | verdict \
             |\n|---|---|---:|---|---:|---|"
        );
        for t in self.targets() {
            let verdict = if t.met {
                "met".to_owned()
            } else if t.within_spread {
                "missed, within run-to-run spread".to_owned()
            } else {
                "**missed**".to_owned()
            };
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} | {} | {verdict} |",
                t.goal,
                t.workload,
                t.entries,
                t.metric,
                num(t.ratio)
            );
        }
        let _ = writeln!(
            s,
            "\nCPU: benchmark process (generators, servers, softirq charged to them) + \
             ksoftirqd + agent. perf: {}.\n\nPlots: {}",
            match &self.perf {
                Ok(()) => "cycles available but not used".to_owned(),
                Err(e) => e.clone(),
            },
            svgs.join(", ")
        );
        s
    }
}

struct Target {
    goal: &'static str,
    workload: &'static str,
    entries: usize,
    metric: &'static str,
    ratio: f64,
    met: bool,
    within_spread: bool,
}

/// A number with about three significant digits.
pub fn num(v: f64) -> String {
    if !v.is_finite() {
        return "–".into();
    }
    let a = v.abs();
    if a >= 1000.0 {
        group(v)
    } else if a >= 100.0 {
        format!("{v:.0}")
    } else if a >= 10.0 {
        format!("{v:.1}")
    } else if a >= 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    }
}

/// Rounded to an integer with thin-space thousands separators.
pub fn group(v: f64) -> String {
    #[expect(
        clippy::cast_possible_truncation,
        reason = "display of values far below i64::MAX"
    )]
    let n = v.round() as i64;
    let digits = n.unsigned_abs().to_string();
    let mut out = String::new();
    for (i, ch) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push('\u{2009}');
        }
        out.push(ch);
    }
    if n < 0 { format!("-{out}") } else { out }
}

fn cell(st: Stats) -> String {
    format!("{} ({}–{})", num(st.median), num(st.min), num(st.max))
}
