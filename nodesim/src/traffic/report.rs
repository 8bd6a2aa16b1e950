//! Workloads and their metrics, per-window samples, statistics over rounds, paired ratios
//! (`paired`), the targets, and the outputs: `traffic.json`, `traffic.md`, SVG plots, the console
//! table. The JSON schema is documented in BENCHMARKS.md; bump `SCHEMA` when it changes.

use std::{fmt::Write as _, path::Path, time::Duration};

use anyhow::{Context as _, Result};
use serde_json::{Value, json};

use super::{
    super::node::{Family, KubeProxyMode},
    Config, MODES, cpu,
    paired::{self, Paired, Verdict},
    svg,
};

const SCHEMA: u32 = 3;

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
    /// [`Self::ConnClusterIp`] over IPv6: pod → ClusterIP v6 (R1a).
    ConnClusterIp6,
    /// [`Self::ConnNodePort`] over IPv6: external → NodePort on the node's IPv6 address (R2t).
    ConnNodePort6,
    /// [`Self::UdpClusterIp`] over IPv6.
    UdpClusterIp6,
    /// [`Self::UdpNodePort`] over IPv6 (R2u).
    UdpNodePort6,
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

    /// The IPv6 workloads: not run by default; `KOVN_BENCH_WORKLOADS` selects them by id.
    pub const IPV6: [Self; 4] = [
        Self::ConnClusterIp6,
        Self::ConnNodePort6,
        Self::UdpClusterIp6,
        Self::UdpNodePort6,
    ];

    /// Every workload, the index of its samples.
    pub const EVERY: [Self; 11] = [
        Self::ConnClusterIp,
        Self::ConnNodePort,
        Self::UdpClusterIp,
        Self::UdpNodePort,
        Self::Bulk,
        Self::BulkSegments,
        Self::Rr,
        Self::ConnClusterIp6,
        Self::ConnNodePort6,
        Self::UdpClusterIp6,
        Self::UdpNodePort6,
    ];

    pub fn ipv6(self) -> bool {
        Self::IPV6.contains(&self)
    }

    /// The IPv4 workload this one is the IPv6 form of (itself for IPv4 workloads).
    pub fn v4(self) -> Self {
        match self {
            Self::ConnClusterIp6 => Self::ConnClusterIp,
            Self::ConnNodePort6 => Self::ConnNodePort,
            Self::UdpClusterIp6 => Self::UdpClusterIp,
            Self::UdpNodePort6 => Self::UdpNodePort,
            other => other,
        }
    }

    pub fn id(self) -> &'static str {
        match self {
            Self::ConnClusterIp6 => "conn_clusterip6",
            Self::ConnNodePort6 => "conn_nodeport6",
            Self::UdpClusterIp6 => "udp_clusterip6",
            Self::UdpNodePort6 => "udp_nodeport6",
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
            Self::ConnClusterIp6 => "New TCP connections over IPv6, pod → ClusterIP (R1a)",
            Self::ConnNodePort6 => {
                "New TCP connections over IPv6, external → NodePort ETP=Local (R2t)"
            }
            Self::UdpClusterIp6 => {
                "New UDP flows over IPv6 (new 5-tuple per packet), pod → ClusterIP (R1a)"
            }
            Self::UdpNodePort6 => {
                "New UDP flows over IPv6 (new 5-tuple per packet), external → NodePort ETP=Local \
                 (R2u)"
            }
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
        match self.v4() {
            Self::ConnClusterIp | Self::ConnNodePort => CONN,
            Self::UdpClusterIp | Self::UdpNodePort => UDP,
            Self::Bulk | Self::BulkSegments => BULK,
            Self::Rr => RR,
            _ => unreachable!("v4() maps the IPv6 workloads"),
        }
    }

    /// The metrics issue 6's "ebpf ≥ iptables" target is judged on.
    fn target_metrics(self) -> &'static [&'static str] {
        match self.v4() {
            Self::ConnClusterIp | Self::ConnNodePort => &["conn_per_s"],
            Self::UdpClusterIp | Self::UdpNodePort => &["delivered_pps"],
            Self::Bulk | Self::BulkSegments => &["gbit_per_s"],
            Self::Rr => &["trans_per_s", "p99_us"],
            _ => unreachable!("v4() maps the IPv6 workloads"),
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
        let values = match workload.v4() {
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
            _ => unreachable!("v4() maps the IPv6 workloads"),
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
    /// The amplified phase (`--amplify`), if it ran.
    pub amplified: Option<Value>,
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
            amplified: None,
            samples: Workload::EVERY.iter().map(|_| Default::default()).collect(),
        }
    }

    pub fn push(&mut self, workload: Workload, mode: usize, sample: Sample) {
        let w = Workload::EVERY
            .iter()
            .position(|x| *x == workload)
            .expect("known workload");
        self.samples[w][mode].push(sample);
    }

    fn cell(&self, workload: Workload, mode: usize) -> &[Sample] {
        let w = Workload::EVERY
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

impl ScaleResult {
    /// Per-round ratios of mode `a` over mode `b` (indices into [`MODES`]) for one metric.
    fn paired(&self, workload: Workload, a: usize, b: usize, metric: usize) -> Paired {
        let values = |mode| -> Vec<f64> {
            self.cell(workload, mode)
                .iter()
                .map(|s| s.values[metric])
                .collect()
        };
        paired::paired(&values(a), &values(b))
    }
}

pub struct Report {
    config: Config,
    agent: String,
    /// Kernel, CPU, cores, mitigations, load at the start.
    machine: Value,
    load_before: [f64; 3],
    load_after: [f64; 3],
    perf: std::result::Result<(), String>,
    wall_s: f64,
    pub scales: Vec<ScaleResult>,
}

impl Report {
    pub fn new(config: &Config, agent: &Path) -> Self {
        Self {
            config: config.clone(),
            agent: agent.display().to_string(),
            machine: cpu::machine_facts(),
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

    /// Writes JSON, Markdown (rendered from that JSON) and SVGs under `out` and prints the
    /// Markdown.
    pub fn write(&self, out: &Path) -> Result<()> {
        let json = self.json();
        let json_path = out.join("traffic.json");
        std::fs::write(
            &json_path,
            serde_json::to_string_pretty(&json).context("serialising the report")?,
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
        let mut md = markdown(&json);
        if !self.config.amplify.is_empty() {
            md.push('\n');
            md.push_str(&super::amplify::document(&json));
        }
        let _ = writeln!(md, "\nPlots: {}", svgs.join(", "));
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

    /// One scale step: per workload, per metric, per mode the samples and statistics, and the
    /// paired comparisons.
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
                            "paired": {
                                "ebpf_iptables": s.paired(w, 2, 1, m).json(),
                                "ebpf_baseline": s.paired(w, 2, 0, m).json(),
                                "iptables_baseline": s.paired(w, 1, 0, m).json(),
                            },
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
        let mut scale = json!({
            "entries": s.entries,
            "setup_s": s.setup_s,
            "agent_file_bytes": s.agent_file_bytes,
            "state": s.state_check,
            "hook_evidence": s.evidence,
            "foreign_cpu_pct": {"median": foreign.median, "min": foreign.min, "max": foreign.max},
            "workloads": workloads,
        });
        if let Some(amplified) = &s.amplified {
            scale["amplified"] = amplified.clone();
        }
        scale
    }

    fn json(&self) -> Value {
        let c = &self.config;
        let scales: Vec<Value> = self.scales.iter().map(|s| self.scale_json(s)).collect();
        let mut machine = self.machine.clone();
        machine["loadavg_before"] = json!(self.load_before);
        machine["loadavg_after"] = json!(self.load_after);
        let mut report = json!({
            "schema": SCHEMA,
            "suite": "traffic",
            "quick": c.quick,
            "wall_s": self.wall_s,
            "machine": machine,
            "config": {
                "scales": c.scales,
                "rounds": c.rounds,
                "warmup_s": c.warmup.as_secs_f64(),
                "window_s": c.window.as_secs_f64(),
                "conn_threads": c.conn_threads,
                "modes": MODES.iter().map(ToString::to_string).collect::<Vec<_>>(),
                "order": "rotating: round r measures workload w (0-based, in config order) in the r + w mod 6-th of the six orders of the modes",
                "variant": c.variant.id(),
                "kube_proxy": match c.variant.kube_proxy {
                    KubeProxyMode::Ipvs => "ipvs (emulated)",
                    KubeProxyMode::Iptables => "iptables",
                    KubeProxyMode::Nftables => "nftables",
                },
                "iptables_backend": iptables_version(),
                "subnet_prefix_lengths": c.variant.prefix_lengths,
                "profile": "release (kube-ovn-nodesim and the agent)",
            },
            "agent": { "binary": self.agent },
            "cpu_accounting": {
                "perf_cycles": match &self.perf { Ok(()) => Value::from("available, not used"), Err(e) => Value::from(e.clone()) },
                "method": "getrusage(RUSAGE_SELF) of the benchmark process (generators, servers and the softirq work charged to them) + ksoftirqd/* schedstat + the agent's /proc/<pid>/task/*/schedstat, ns, per window",
            },
            "statistics": "paired: per-round ratio of two modes; median, percentile-bootstrap 95 % CI of the median (4000 resamples, fixed seed), exact two-sided sign test; a target is met or missed only when the whole CI is on one side of its threshold",
            "scales": scales,
            "targets": self.targets(),
        });
        if !c.amplify.is_empty() {
            report["config"]["amplify"] = json!(c.amplify);
        }
        report
    }

    fn targets(&self) -> Vec<Value> {
        let mut out = Vec::new();
        let mut push = |goal: &str,
                        w: Workload,
                        entries: usize,
                        metric: &Metric,
                        p: &Paired,
                        threshold: f64| {
            out.push(json!({
                "target": goal,
                "workload": w.id(),
                "entries": entries,
                "metric": metric.name,
                "threshold": threshold,
                "paired_median": p.median,
                "ci95": [p.ci95.0, p.ci95.1],
                "above_1": p.above,
                "below_1": p.below,
                "sign_test_p": p.sign_p,
                "verdict": Verdict::of(p, threshold, metric.higher_is_better).as_str(),
            }));
        };
        for s in &self.scales {
            for &w in &self.config.workloads {
                for name in w.target_metrics() {
                    let (m, metric) = w
                        .metrics()
                        .iter()
                        .enumerate()
                        .find(|(_, x)| x.name == *name)
                        .expect("target metric exists");
                    push(
                        "ebpf ≥ iptables",
                        w,
                        s.entries,
                        metric,
                        &s.paired(w, 2, 1, m),
                        1.0,
                    );
                }
            }
            for w in [Workload::Bulk, Workload::BulkSegments]
                .into_iter()
                .filter(|w| self.config.workloads.contains(w))
            {
                let m = 0; // gbit_per_s
                push(
                    "ebpf within 3 % of baseline (established throughput)",
                    w,
                    s.entries,
                    &w.metrics()[m],
                    &s.paired(w, 2, 0, m),
                    0.97,
                );
            }
        }
        out
    }
}

/// `iptables -V` of the backend every node used (`iptables v1.8.9 (legacy)`).
fn iptables_version() -> String {
    let program = Family::V4.iptables();
    std::process::Command::new(program)
        .arg("-V")
        .output()
        .map_or_else(
            |e| format!("{program}: {e}"),
            |o| String::from_utf8_lossy(&o.stdout).trim().to_owned(),
        )
}

fn number(v: &Value) -> f64 {
    v.as_f64().unwrap_or(f64::NAN)
}

fn text(v: &Value) -> &str {
    v.as_str().unwrap_or("?")
}

/// A report's `machine[key]` load averages (1, 5, 15 min) as `a / b / c`.
pub fn load_averages(machine: &Value, key: &str) -> String {
    (0..3)
        .map(|i| format!("{:.2}", number(&machine[key][i])))
        .collect::<Vec<_>>()
        .join(" / ")
}

/// A report's `machine.vulnerabilities` the CPU is affected by, as `name: state`.
pub fn vulnerable(machine: &Value) -> Vec<String> {
    machine["vulnerabilities"]
        .as_object()
        .map(|v| {
            v.iter()
                .filter(|(_, state)| text(state) != "Not affected")
                .map(|(name, state)| format!("{name}: {}", text(state)))
                .collect()
        })
        .unwrap_or_default()
}

/// `median [lo, hi]` of a paired comparison in the JSON.
fn paired_cell(p: &Value) -> String {
    format!(
        "{} [{}, {}]",
        num(number(&p["median"])),
        num(number(&p["ci95"][0])),
        num(number(&p["ci95"][1]))
    )
}

/// The whole report as Markdown, from its JSON alone: `cargo xtask bench-tables` renders
/// BENCHMARKS.md's tables from a committed JSON file with this, so a table cannot drift from the
/// run it cites.
#[expect(clippy::too_many_lines, reason = "one report, section after section")]
pub fn markdown(j: &Value) -> String {
    let mut s = String::new();
    let m = &j["machine"];
    let load = |key: &str| load_averages(m, key);
    let vulnerable = vulnerable(m);
    let c = &j["config"];
    let _ = writeln!(
        s,
        "Traffic benchmark{}: kernel {}, {} ({} cores); load average {} before, {} after; \
         {:.0} s wall. Mitigations in force: {}.\n\n{} rounds per scale; in each round every \
         workload is measured on baseline, iptables and ebpf in a rotating order (all six \
         orders in turn); {} s warm-up + {} s window. Columns: median (min–max) over rounds. \
         Ratios: median of the per-round ebpf/other ratios [95 % bootstrap CI]; for throughput \
         > 1 means ebpf is faster, for latency and CPU < 1 means ebpf is cheaper.\n",
        if j["quick"].as_bool() == Some(true) {
            " (quick)"
        } else {
            ""
        },
        text(&m["kernel"]),
        text(&m["cpu"]),
        m["cores"],
        load("loadavg_before"),
        load("loadavg_after"),
        number(&j["wall_s"]),
        if vulnerable.is_empty() {
            "none reported (every vulnerability \"Not affected\")".to_owned()
        } else {
            vulnerable.join("; ")
        },
        c["rounds"],
        number(&c["warmup_s"]),
        number(&c["window_s"]),
    );
    let scales = j["scales"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default();
    for sc in scales {
        let _ = writeln!(
            s,
            "- {} entries: set-up {:.1} s; agent cluster file {:.1} MiB; other processes used \
             {:.1} % (max {:.1} %) of the machine during windows",
            group(number(&sc["entries"])),
            number(&sc["setup_s"]),
            number(&sc["agent_file_bytes"]) / f64::from(1u32 << 20),
            number(&sc["foreign_cpu_pct"]["median"]),
            number(&sc["foreign_cpu_pct"]["max"]),
        );
    }
    let workloads = scales
        .first()
        .and_then(|sc| sc["workloads"].as_array())
        .map(Vec::as_slice)
        .unwrap_or_default();
    for (wi, workload) in workloads.iter().enumerate() {
        let _ = writeln!(
            s,
            "\n#### {} — {}\n\n| metric | entries | baseline | iptables | ebpf | ebpf/iptables \
             | ebpf/baseline |\n|---|---:|---:|---:|---:|---:|---:|",
            text(&workload["workload"]),
            text(&workload["title"]),
        );
        let metric_count = workload["metrics"].as_array().map_or(0, Vec::len);
        for mi in 0..metric_count {
            for sc in scales {
                let metric = &sc["workloads"][wi]["metrics"][mi];
                let mode = |name: &str| {
                    let st = &metric["modes"][name];
                    format!(
                        "{} ({}–{})",
                        num(number(&st["median"])),
                        num(number(&st["min"])),
                        num(number(&st["max"]))
                    )
                };
                let _ = writeln!(
                    s,
                    "| {} ({}) | {} | {} | {} | {} | {} | {} |",
                    text(&metric["name"]),
                    text(&metric["unit"]),
                    group(number(&sc["entries"])),
                    mode("baseline"),
                    mode("iptables"),
                    mode("ebpf"),
                    paired_cell(&metric["paired"]["ebpf_iptables"]),
                    paired_cell(&metric["paired"]["ebpf_baseline"]),
                );
            }
        }
        let failures: Vec<String> = scales
            .iter()
            .flat_map(|sc| {
                sc["workloads"][wi]["failures"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default()
                    .into_iter()
                    .filter(|f| f["failed"].as_u64().unwrap_or(0) > 0)
                    .map(move |f| {
                        format!(
                            "{} entries, {}: {} failed ({})",
                            group(number(&sc["entries"])),
                            text(&f["mode"]),
                            f["failed"],
                            f["first_error"].as_str().unwrap_or_default()
                        )
                    })
            })
            .collect();
        if !failures.is_empty() {
            let _ = writeln!(s, "\nFailures: {}", failures.join("; "));
        }
    }
    let _ = writeln!(
        s,
        "\n#### Targets\n\n| target | workload | entries | metric | paired ratio [95 % CI] | \
         rounds above / below 1 (sign test p) | verdict |\n|---|---|---:|---|---:|---:|---|"
    );
    for t in j["targets"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
    {
        let verdict = match text(&t["verdict"]) {
            "missed" => "**missed**".to_owned(),
            "inconclusive" => format!(
                "inconclusive (CI contains {})",
                num(number(&t["threshold"]))
            ),
            other => other.to_owned(),
        };
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} [{}, {}] | {} / {} (p = {:.3}) | {verdict} |",
            text(&t["target"]),
            text(&t["workload"]),
            group(number(&t["entries"])),
            text(&t["metric"]),
            num(number(&t["paired_median"])),
            num(number(&t["ci95"][0])),
            num(number(&t["ci95"][1])),
            t["above_1"],
            t["below_1"],
            number(&t["sign_test_p"]),
        );
    }
    let _ = writeln!(
        s,
        "\nCPU: benchmark process (generators, servers, softirq charged to them) + ksoftirqd + \
         agent, ns from the scheduler's accounting. perf: {}.",
        text(&j["cpu_accounting"]["perf_cycles"]),
    );
    s
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

/// Which side a paired ratio's CI favours: `ebpf` or `iptables` when the whole interval is on
/// one side of 1, `—` when it contains 1 (not resolved).
fn favours(p: &Value, higher_is_better: bool) -> &'static str {
    let (lo, hi) = (number(&p["ci95"][0]), number(&p["ci95"][1]));
    if lo.is_nan() || hi.is_nan() {
        return "?";
    }
    let ebpf_higher = lo > 1.0;
    let ebpf_lower = hi < 1.0;
    match (ebpf_higher, ebpf_lower, higher_is_better) {
        (true, _, true) | (_, true, false) => "ebpf",
        (true, _, false) | (_, true, true) => "iptables",
        _ => "—",
    }
}

/// The variant runs (kube-proxy modes, iptables backends, padding prefix lengths) as one
/// table each: per workload and scale its rate and CPU metric, the three modes' medians, the
/// paired ebpf/iptables ratio with its CI and sign test, and the side the CI favours.
pub fn variants_markdown(runs: &[Value]) -> String {
    let mut out = String::new();
    for run in runs {
        let machine = &run["machine"];
        let config = &run["config"];
        let _ = writeln!(
            out,
            "##### Variant `{}`: kube-proxy {}, {}, padding Subnets of {} prefix length(s)\n\n\
             {}kernel {}, {} ({} cores); load average {} before, {} after; {:.0} s wall; {} \
             rounds, {} s warm-up + {} s window. Ratio: median of the per-round ebpf/iptables \
             ratios [95 % bootstrap CI], sign test (rounds ebpf ahead / behind, p); *favours*: \
             the side the whole CI is on (— when it contains 1).\n\n\
             | workload | metric | entries | baseline | iptables | ebpf | ebpf/iptables | sign \
             test | favours |\n|---|---|---:|---:|---:|---:|---:|---|---|",
            text(&config["variant"]),
            text(&config["kube_proxy"]),
            text(&config["iptables_backend"]),
            config["subnet_prefix_lengths"],
            if run["quick"].as_bool() == Some(true) {
                "Quick run; "
            } else {
                ""
            },
            text(&machine["kernel"]),
            text(&machine["cpu"]),
            machine["cores"],
            load_averages(machine, "loadavg_before"),
            load_averages(machine, "loadavg_after"),
            number(&run["wall_s"]),
            config["rounds"],
            number(&config["warmup_s"]),
            number(&config["window_s"]),
        );
        let scales = run["scales"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or_default();
        let workloads = scales
            .first()
            .and_then(|sc| sc["workloads"].as_array())
            .map_or(0, Vec::len);
        for wi in 0..workloads {
            for sc in scales {
                let workload = &sc["workloads"][wi];
                let metrics = workload["metrics"]
                    .as_array()
                    .map(Vec::as_slice)
                    .unwrap_or_default();
                // The rate and the CPU per operation: the first metric and the `cpu_*` one.
                let shown = metrics
                    .iter()
                    .enumerate()
                    .filter(|(i, metric)| *i == 0 || text(&metric["name"]).starts_with("cpu_"));
                for (_, metric) in shown {
                    let paired = &metric["paired"]["ebpf_iptables"];
                    let mode = |name: &str| num(number(&metric["modes"][name]["median"]));
                    let _ = writeln!(
                        out,
                        "| {} | {} ({}) | {} | {} | {} | {} | {} | {} / {} (p = {:.3}) | {} |",
                        text(&workload["workload"]),
                        text(&metric["name"]),
                        text(&metric["unit"]),
                        group(number(&sc["entries"])),
                        mode("baseline"),
                        mode("iptables"),
                        mode("ebpf"),
                        paired_cell(paired),
                        paired["above_1"],
                        paired["below_1"],
                        number(&paired["sign_test_p"]),
                        favours(paired, metric["higher_is_better"].as_bool().unwrap_or(true)),
                    );
                }
            }
        }
        let failed: u64 = scales
            .iter()
            .flat_map(|sc| sc["workloads"].as_array().cloned().unwrap_or_default())
            .flat_map(|w| w["failures"].as_array().cloned().unwrap_or_default())
            .filter_map(|f| f["failed"].as_u64())
            .sum();
        let _ = writeln!(
            out,
            "\n{failed} failed operations in the run; state checked on every node before \
             measuring (`scales[].state`).\n"
        );
    }
    out
}

/// The amplified phase of variant runs, one row per (run, workload, scale): the cost of one more
/// hook (median of the per-round slopes [95 % CI]) for each mode and their per-round ratio.
pub fn variants_amplified_markdown(runs: &[Value]) -> String {
    let mut out = String::from(
        "| variant | k | workload | entries | iptables, ns per hook | ebpf, ns per hook | \
         ebpf/iptables slope (sign test) |\n|---|---|---|---:|---:|---:|---|\n",
    );
    for run in runs {
        let variant = text(&run["config"]["variant"]);
        let scales = run["scales"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or_default();
        for sc in scales {
            let amplified = &sc["amplified"];
            let ks = amplified["ks"]
                .as_array()
                .map(|ks| {
                    ks.iter()
                        .map(ToString::to_string)
                        .collect::<Vec<_>>()
                        .join(",")
                })
                .unwrap_or_default();
            let workloads = amplified["workloads"]
                .as_array()
                .map(Vec::as_slice)
                .unwrap_or_default();
            for workload in workloads {
                let slope = |mode: &str| paired_cell(&workload["modes"][mode]["slope_ns"]);
                let ratio = &workload["slope_ratio_ebpf_iptables"];
                let _ = writeln!(
                    out,
                    "| `{variant}` | {ks} | {} | {} | {} | {} | {} ({} / {}, p = {:.3}) |",
                    text(&workload["workload"]),
                    group(number(&sc["entries"])),
                    slope("iptables"),
                    slope("ebpf"),
                    paired_cell(ratio),
                    ratio["above_1"],
                    ratio["below_1"],
                    number(&ratio["sign_test_p"]),
                );
            }
        }
    }
    out
}
