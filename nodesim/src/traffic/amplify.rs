//! `--amplify K1,K2,…`: the hook's own cost, made large enough to measure. On veth a packet
//! costs 15–25 µs, and a 1–2 % difference between two hooks drowns in the round-to-round
//! spread. So each hook is stacked `k` times on its node and the workloads are measured at
//! every `k`; the slope of the cost over `k` is what one more hook costs, with everything the
//! hook does not do (veth, conntrack, sockets, the generators) in the intercept.
//!
//! - iptables: `k` jumps from nat `PREROUTING` to Kube-OVN's `OVN-PREROUTING` (the real one
//!   plus `k − 1` copies). Its rules only set marks, so every packet runs through all `k` and
//!   ends with the marks one pass sets.
//! - ebpf: the agent's program run `k` times at ingress of every interface it is attached to:
//!   its own tcx link, then `k − 1` `cls_bpf` filters of the same program on a clsact qdisc
//!   (it returns `TC_ACT_UNSPEC`, "next", for this traffic), then a sentinel filter that only
//!   returns "next". tcx refuses one program twice on a hook; a filter's dispatch costs a few
//!   ns more than a tcx link's, so the ebpf slope errs high.
//!
//! A slope only means something if every copy ran, so each (round, k) block ends with proof:
//! the per-copy packet counters of the jumps must be equal and non-zero, and with
//! `BPF_ENABLE_STATS` on for a short probe (never during a measured window: the stats cost
//! two clock reads per run) the agent's program must have run exactly `k` times per packet
//! that reached the sentinel. A block without that proof fails the run.
//!
//! The measured value is the workload's CPU per operation (ns per connection, delivered
//! datagram, `ovn0` packet or transaction). Per round, a least-squares line over the `k`
//! values gives one slope per mode; the slope reported is the median over rounds with a
//! percentile-bootstrap 95 % CI, and `ebpf / iptables` is the paired per-round slope ratio
//! (as in `paired`).

use std::{
    fmt::Write as _,
    os::fd::OwnedFd,
    path::{Path, PathBuf},
    thread,
};

use anyhow::{Context as _, Result, bail, ensure};
use serde_json::{Value, json};

use super::{
    Config, ModeNode, load,
    paired::{self, Paired},
    report::{Workload, load_averages, num},
};
use crate::node::{Family, HookKind, Host, bpf, exec, netns::NetNs};

/// The comment on the copies of the jump, so they can be told apart from Kube-OVN's own.
const COPY_COMMENT: &str = "kovn-amplify copy";
/// The chain every copy jumps to.
const CHAIN: &str = "OVN-PREROUTING";
/// The agent's program, as the kernel names it.
const AGENT_PROG: &str = "kovn_ingress";
/// Connections of each kind the ebpf proof sends while stats are on.
const PROBE_CONNECTIONS: usize = 5;

/// Least-squares slope of `ys` over `xs`, ignoring pairs with a non-finite `y`; NaN without
/// two distinct `x` values.
pub fn slope(xs: &[f64], ys: &[f64]) -> f64 {
    let points: Vec<(f64, f64)> = xs
        .iter()
        .zip(ys)
        .filter(|(_, y)| y.is_finite())
        .map(|(x, y)| (*x, *y))
        .collect();
    #[expect(clippy::cast_precision_loss, reason = "a handful of points")]
    let n = points.len() as f64;
    let mean_x = points.iter().map(|p| p.0).sum::<f64>() / n;
    let mean_y = points.iter().map(|p| p.1).sum::<f64>() / n;
    let sxx: f64 = points.iter().map(|p| (p.0 - mean_x).powi(2)).sum();
    let sxy: f64 = points.iter().map(|p| (p.0 - mean_x) * (p.1 - mean_y)).sum();
    if points.len() < 2 || sxx == 0.0 {
        return f64::NAN;
    }
    sxy / sxx
}

/// Slopes of one mode: one per round, their median and its bootstrap 95 % CI.
#[derive(Clone, Debug)]
pub struct Fit {
    pub per_round: Vec<f64>,
    pub median: f64,
    pub ci95: (f64, f64),
}

/// Fits `values[k_index][round]` over `ks`, round by round.
pub fn fit(ks: &[usize], values: &[Vec<f64>]) -> Fit {
    #[expect(clippy::cast_precision_loss, reason = "small copy counts")]
    let xs: Vec<f64> = ks.iter().map(|k| *k as f64).collect();
    let rounds = values.iter().map(Vec::len).min().unwrap_or(0);
    let per_round: Vec<f64> = (0..rounds)
        .map(|r| {
            let ys: Vec<f64> = values.iter().map(|v| v[r]).collect();
            slope(&xs, &ys)
        })
        .filter(|s| s.is_finite())
        .collect();
    Fit {
        median: paired::median(&per_round),
        ci95: paired::bootstrap_ci(&per_round),
        per_round,
    }
}

/// How far two counts that should be equal may differ: a packet or two in flight while the
/// counters are read, never a copy that missed traffic.
fn slack(n: u64) -> u64 {
    (n / 1000).max(2)
}

/// The packet counters of the `k` jumps to `OVN-PREROUTING` must be there, non-zero and equal:
/// every packet that reached one copy reached all.
pub fn check_iptables(jump_packets: &[u64], k: usize) -> Result<()> {
    ensure!(
        jump_packets.len() == k,
        "iptables: nat PREROUTING holds {} jumps to {CHAIN}, expected {k}",
        jump_packets.len()
    );
    let most = jump_packets.iter().copied().max().unwrap_or(0);
    ensure!(
        most > 0,
        "iptables: no copy of the jump to {CHAIN} saw a packet"
    );
    for (copy, &seen) in jump_packets.iter().enumerate() {
        ensure!(
            most - seen <= slack(most),
            "iptables: copy {} of {k} of the jump to {CHAIN} saw {seen} packets, another {most}: \
             not every copy ran",
            copy + 1
        );
    }
    Ok(())
}

/// The agent's program must be linked `k` times on every interface it runs on
/// (`links`: interface, its links of the program), and have run `k` times per packet that
/// reached the sentinel behind the copies.
pub fn check_ebpf(
    links: &[(String, usize)],
    copy_runs: u64,
    sentinel_runs: u64,
    k: usize,
) -> Result<()> {
    ensure!(!links.is_empty(), "ebpf: the agent's program runs nowhere");
    for (ifname, found) in links {
        ensure!(
            *found == k,
            "ebpf: {ifname} runs the agent's program {found} times at tcx ingress, expected {k}"
        );
    }
    ensure!(
        sentinel_runs > 0,
        "ebpf: the sentinel behind the copies never ran: no traffic reached the end of the chain"
    );
    let expected = sentinel_runs * k as u64;
    ensure!(
        copy_runs.abs_diff(expected) <= slack(expected) * k as u64,
        "ebpf: the agent's program ran {copy_runs} times for {sentinel_runs} packets that \
         reached the sentinel; {k} copies each running once per packet make {expected}: not \
         every copy ran"
    );
    Ok(())
}

/// The `k − 1` extra jumps on the iptables node, in each of `families`' nat `PREROUTING`.
fn set_iptables(ns: &NetNs, families: &[Family], extra_now: usize, k: usize) -> Result<()> {
    for &family in families {
        set_iptables_family(ns, family, extra_now, k)?;
    }
    Ok(())
}

fn set_iptables_family(ns: &NetNs, family: Family, extra_now: usize, k: usize) -> Result<()> {
    let copy = ["-m", "comment", "--comment", COPY_COMMENT, "-j", CHAIN];
    for _ in 0..extra_now {
        ns.run(
            family.iptables(),
            &[&["-t", "nat", "-D", "PREROUTING"][..], &copy].concat(),
        )?;
    }
    for _ in 1..k {
        ns.run(
            family.iptables(),
            &[&["-t", "nat", "-I", "PREROUTING", "1"][..], &copy].concat(),
        )?;
    }
    ns.run(family.iptables(), &["-t", "nat", "-Z", "PREROUTING"])?;
    Ok(())
}

/// Packet counters of every jump to `OVN-PREROUTING` in `family`'s nat `PREROUTING`.
fn jump_packets(ns: &NetNs, family: Family) -> Result<Vec<u64>> {
    let listing = ns.run(
        family.iptables(),
        &["-t", "nat", "-L", "PREROUTING", "-n", "-v", "-x"],
    )?;
    Ok(listing
        .lines()
        .skip(2)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.get(2) == Some(&CHAIN))
                .then(|| f[0].parse().ok())
                .flatten()
        })
        .collect())
}

/// The ebpf node's copies and sentinel, as `cls_bpf` filters on a clsact qdisc behind the
/// agent's own tcx link. tcx refuses a program linked twice on one hook (`EEXIST`), and
/// loading k separate instances would need the agent's object and map pins; `cls_bpf` runs the
/// very same program once per filter, each direct-action filter returning `TC_ACT_UNSPEC`
/// passes the packet on to the next, and tcx hands what its programs pass on to clsact. Per
/// interface: tcx [agent] → clsact [copy 1 … copy k−1, sentinel].
struct EbpfStack {
    prog_id: u32,
    ifaces: Vec<String>,
    /// The agent's bpffs: the programs are pinned there for the moment `tc` needs them.
    bpffs: PathBuf,
    sentinel: OwnedFd,
    sentinel_id: u32,
    /// Whether this stack added the clsact qdiscs (removed again on drop).
    qdiscs: bool,
    ns_name: String,
}

/// Distance between the preferences of consecutive filters.
const PREF_STEP: usize = 10;

/// The sentinel's program name (what `tc filter show` and the kernel report).
const SENTINEL_PROG: &str = "kovn_amp_end";

impl EbpfStack {
    /// Finds the agent's program and every interface it runs on in `ns`.
    fn find(ns: &NetNs, bpffs: &Path) -> Result<Self> {
        let names: Vec<String> = ns
            .run("ip", &["-o", "link", "show"])?
            .lines()
            .filter_map(|l| {
                let name = l.split(": ").nth(1)?;
                Some(name.split('@').next()?.to_owned())
            })
            .collect();
        let found = ns.enter(|| -> Result<Vec<(String, u32)>> {
            let mut found = Vec::new();
            for name in &names {
                for (prog, _) in bpf::tcx_ingress(name).unwrap_or_default() {
                    if bpf::prog_name(prog)?.as_deref() == Some(AGENT_PROG) {
                        found.push((name.clone(), prog));
                    }
                }
            }
            Ok(found)
        })??;
        let Some(&(_, prog_id)) = found.first() else {
            bail!("ebpf: the agent's program is attached nowhere in the node");
        };
        ensure!(
            found.iter().all(|(_, p)| *p == prog_id),
            "ebpf: more than one agent program attached: {found:?}"
        );
        let sentinel = bpf::load_next(SENTINEL_PROG).context("loading the sentinel")?;
        let sentinel_id = bpf::prog_id(&sentinel)?;
        let mut stack = Self {
            prog_id,
            ifaces: found.into_iter().map(|(i, _)| i).collect(),
            bpffs: bpffs.to_owned(),
            sentinel,
            sentinel_id,
            qdiscs: false,
            ns_name: ns.name().to_owned(),
        };
        for ifname in &stack.ifaces {
            ns.run("tc", &["qdisc", "add", "dev", ifname, "clsact"])
                .with_context(|| format!("adding clsact on {ifname}"))?;
            stack.qdiscs = true;
        }
        Ok(stack)
    }

    /// `k` runs of the agent's program on every interface (its tcx link and `k − 1` filters),
    /// then the sentinel.
    fn set(&mut self, ns: &NetNs, k: usize) -> Result<()> {
        let prog = bpf::prog_by_id(self.prog_id)?.context("the agent's program vanished")?;
        let stem = format!("kovn-amplify-{}", std::process::id());
        let (copy_pin, end_pin) = (
            self.bpffs.join(format!("{stem}-copy")),
            self.bpffs.join(format!("{stem}-end")),
        );
        bpf::pin(&prog, &copy_pin).context("pinning the agent's program for tc")?;
        let pinned = bpf::pin(&self.sentinel, &end_pin).context("pinning the sentinel for tc");
        let result = pinned.and_then(|()| {
            for ifname in &self.ifaces {
                ns.run("tc", &["filter", "del", "dev", ifname, "ingress"])?;
                // Preferences 10, 20, …: room between them (the tests put a filter there).
                for p in 1..=k {
                    let pref = (p * PREF_STEP).to_string();
                    let pin = if p < k { &copy_pin } else { &end_pin }.to_string_lossy();
                    ns.run(
                        "tc",
                        &[
                            "filter",
                            "add",
                            "dev",
                            ifname,
                            "ingress",
                            "pref",
                            &pref,
                            "bpf",
                            "object-pinned",
                            &pin,
                            "direct-action",
                        ],
                    )
                    .with_context(|| format!("adding filter {p} of {k} on {ifname}"))?;
                }
            }
            Ok(())
        });
        // The filters hold the programs; the pins were only for `tc`.
        let _ = std::fs::remove_file(&copy_pin);
        let _ = std::fs::remove_file(&end_pin);
        result
    }

    /// Runs of the agent's program on each interface: its tcx link plus its `cls_bpf` filters;
    /// fails unless the sentinel is the last filter everywhere.
    fn links(&self, ns: &NetNs) -> Result<Vec<(String, usize)>> {
        let mut links = Vec::new();
        for ifname in &self.ifaces {
            let prog = self.prog_id;
            let tcx = ns.enter(|| bpf::tcx_ingress(ifname))??;
            let in_tcx = tcx.iter().filter(|(p, _)| *p == prog).count();
            let filters = ns.run("tc", &["filter", "show", "dev", ifname, "ingress"])?;
            let ids: Vec<u32> = filters
                .lines()
                .filter_map(|l| {
                    let mut words = l.split_whitespace().skip_while(|w| *w != "id");
                    words.next()?;
                    words.next()?.parse().ok()
                })
                .collect();
            ensure!(
                ids.last() == Some(&self.sentinel_id),
                "ebpf: the sentinel is not the last filter on {ifname}: programs {ids:?}"
            );
            let copies = ids.iter().filter(|id| **id == prog).count();
            links.push((ifname.clone(), in_tcx + copies));
        }
        Ok(links)
    }

    /// Turns run counting on, runs `probe`, and checks every copy ran for every packet.
    fn verify(&self, ns: &NetNs, k: usize, probe: impl FnOnce() -> Result<()>) -> Result<Value> {
        let runs =
            |id: u32| -> Result<u64> { bpf::prog_run_count(id)?.context("a program vanished") };
        let stats = bpf::enable_stats().context("BPF_ENABLE_STATS")?;
        let (copy0, sentinel0) = (runs(self.prog_id)?, runs(self.sentinel_id)?);
        probe()?;
        let (copy1, sentinel1) = (runs(self.prog_id)?, runs(self.sentinel_id)?);
        drop(stats);
        let links = self.links(ns)?;
        let (copy_runs, sentinel_runs) = (copy1 - copy0, sentinel1 - sentinel0);
        check_ebpf(&links, copy_runs, sentinel_runs, k)?;
        Ok(json!({
            "links": links.iter().map(|(i, n)| json!({"iface": i, "copies": n})).collect::<Vec<_>>(),
            "copy_runs": copy_runs,
            "sentinel_runs": sentinel_runs,
        }))
    }
}

impl Drop for EbpfStack {
    /// Removing the qdisc removes its filters, which drops their programs.
    fn drop(&mut self) {
        if !self.qdiscs {
            return;
        }
        for ifname in &self.ifaces {
            let mut del = std::process::Command::new("tc");
            del.args(["-n", &self.ns_name, "qdisc", "del", "dev", ifname, "clsact"]);
            if let Err(e) = exec::checked(&mut del, None) {
                eprintln!("traffic: removing clsact on {ifname}: {e:#}");
            }
        }
    }
}

/// The measured value of a sample: its CPU per operation, in ns.
fn cpu_ns(workload: Workload, values: &[f64]) -> f64 {
    workload
        .metrics()
        .iter()
        .zip(values)
        .find(|(m, _)| m.name.starts_with("cpu_"))
        .map_or(f64::NAN, |(m, v)| {
            if m.unit.starts_with("µs") {
                v * 1e3
            } else {
                *v
            }
        })
}

/// The amplified phase of one scale step on its iptables and ebpf nodes (`nodes` in
/// [`super::MODES`] order). Returns the `amplified` JSON of the scale step.
pub fn run(config: &Config, nodes: &mut [ModeNode]) -> Result<Value> {
    let ks = &config.amplify;
    let (ipt, ebpf) = (1, 2);
    ensure!(
        nodes[ipt].kind == HookKind::Iptables && nodes[ebpf].kind == HookKind::Ebpf,
        "amplify: unexpected node order"
    );
    let cores = thread::available_parallelism().map_or(1, usize::from);
    let mut stack = EbpfStack::find(
        nodes[ebpf].node.ns(Host::Node),
        &super::ebpf_bpffs(&nodes[ebpf])?,
    )?;
    let mut extra = 0;
    // IPv6 workloads meet ip6tables' nat PREROUTING: the copies go there too. Each family's
    // copies must have run if a workload of that family was measured.
    let families: &[Family] = if config.variant.ipv6 {
        &Family::ALL
    } else {
        &[Family::V4]
    };
    let carried = |family: Family| {
        config
            .workloads
            .iter()
            .any(|w| w.ipv6() == (family == Family::V6))
    };
    // values[workload][mode (0 iptables, 1 ebpf)][k index][round]: each (workload, mode, k)
    // is measured once per round, so pushing keeps the rounds in order.
    let mut values =
        vec![vec![vec![Vec::with_capacity(config.rounds); ks.len()]; 2]; config.workloads.len()];
    let mut proofs = Vec::new();
    let result = (|| -> Result<()> {
        for round in 0..config.rounds {
            for step in 0..ks.len() {
                // Rotate the order of k every round, so drift within a round does not always
                // favour the same k.
                let ki = (step + round) % ks.len();
                let k = ks[ki];
                set_iptables(nodes[ipt].node.ns(Host::Node), families, extra, k)?;
                extra = k - 1;
                stack.set(nodes[ebpf].node.ns(Host::Node), k)?;
                for (w, &workload) in config.workloads.iter().enumerate() {
                    let order = if (round + w + step) % 2 == 0 {
                        [0, 1]
                    } else {
                        [1, 0]
                    };
                    for m in order {
                        let node = &mut nodes[[ipt, ebpf][m]];
                        let sample =
                            super::measure(config, node, workload, cores).with_context(|| {
                                format!("amplified k={k}: {} node, {}", node.kind, workload.id())
                            })?;
                        values[w][m][ki].push(cpu_ns(workload, &sample.values));
                    }
                }
                let mut counters = Vec::new();
                for &family in families {
                    let packets = jump_packets(nodes[ipt].node.ns(Host::Node), family)?;
                    if carried(family) {
                        check_iptables(&packets, k).with_context(|| {
                            format!("amplified round {} k={k}, {family}", round + 1)
                        })?;
                    }
                    counters.push(packets);
                }
                let node = &nodes[ebpf];
                let ebpf_proof = stack
                    .verify(node.node.ns(Host::Node), k, || {
                        for _ in 0..PROBE_CONNECTIONS {
                            for w in [Workload::ConnClusterIp, Workload::ConnNodePort] {
                                load::check_connection(&node.target(w))?;
                            }
                        }
                        Ok(())
                    })
                    .with_context(|| format!("amplified round {} k={k}", round + 1))?;
                proofs.push(json!({
                    "round": round + 1,
                    "k": k,
                    "iptables_jump_packets": counters[0],
                    "ip6tables_jump_packets": counters.get(1),
                    "ebpf": ebpf_proof,
                }));
            }
            eprintln!(
                "traffic:   amplified round {}/{} done (load {:.2})",
                round + 1,
                config.rounds,
                super::cpu::loadavg()[0]
            );
        }
        Ok(())
    })();
    // Leave the nodes as they were, also after a failure (the namespaces go anyway).
    drop(stack);
    let restored = set_iptables(nodes[ipt].node.ns(Host::Node), families, extra, 1);
    result?;
    restored?;
    Ok(to_json(config, &values, &proofs))
}

fn fit_json(fit: &Fit) -> Value {
    json!({
        "per_round": fit.per_round,
        "median": fit.median,
        "ci95": [fit.ci95.0, fit.ci95.1],
    })
}

fn to_json(config: &Config, values: &[Vec<Vec<Vec<f64>>>], proofs: &[Value]) -> Value {
    let ks = &config.amplify;
    let workloads: Vec<Value> = config
        .workloads
        .iter()
        .zip(values)
        .map(|(&w, v)| {
            let fits = [fit(ks, &v[0]), fit(ks, &v[1])];
            let mut modes = serde_json::Map::new();
            for (m, name) in ["iptables", "ebpf"].into_iter().enumerate() {
                let medians: Vec<f64> = v[m].iter().map(|r| paired::median(r)).collect();
                modes.insert(
                    name.into(),
                    json!({
                        "values": v[m],
                        "medians": medians,
                        "slope_ns": fit_json(&fits[m]),
                    }),
                );
            }
            let ratio: Paired = paired::paired(&fits[1].per_round, &fits[0].per_round);
            json!({
                "workload": w.id(),
                "title": w.title(),
                "modes": modes,
                "slope_ratio_ebpf_iptables": ratio.json(),
            })
        })
        .collect();
    json!({
        "ks": ks,
        "value": "CPU per operation, ns (connection, delivered datagram, ovn0 packet or transaction: the workload's cpu_* metric)",
        "method": "k copies of each hook (iptables: k jumps to OVN-PREROUTING; ebpf: the agent's program at tcx ingress of each of its interfaces plus k-1 cls_bpf direct-action filters of the same program on clsact, then a sentinel filter); per round a least-squares slope over k per mode = cost of one more hook; median over rounds, percentile-bootstrap 95 % CI; ebpf/iptables = paired per-round slope ratio",
        "workloads": workloads,
        "copies_verified": proofs,
    })
}

/// BENCHMARKS.md's amplified block: the run's machine and load, then [`markdown`].
pub fn document(j: &Value) -> String {
    let m = &j["machine"];
    let c = &j["config"];
    let mut md = format!(
        "Amplified traffic benchmark{}: kernel {}, {} ({} cores); load average {} before, {} \
         after; {:.0} s wall. k = {}; {} rounds per scale, {} s warm-up + {} s window per \
         measurement. Slopes: median over rounds of the per-round least-squares slope \
         [95 % bootstrap CI]; ratio: median of the per-round ebpf/iptables slope ratios.\n",
        if j["quick"].as_bool() == Some(true) {
            " (quick)"
        } else {
            ""
        },
        m["kernel"].as_str().unwrap_or("?"),
        m["cpu"].as_str().unwrap_or("?"),
        m["cores"],
        load_averages(m, "loadavg_before"),
        load_averages(m, "loadavg_after"),
        j["wall_s"].as_f64().unwrap_or(f64::NAN),
        c["amplify"],
        c["rounds"],
        c["warmup_s"],
        c["window_s"],
    );
    md.push_str(&markdown(j));
    md
}

fn cell(fit: &Value) -> String {
    let ci = &fit["ci95"];
    format!(
        "{} [{}, {}]",
        num(fit["median"].as_f64().unwrap_or(f64::NAN)),
        num(ci[0].as_f64().unwrap_or(f64::NAN)),
        num(ci[1].as_f64().unwrap_or(f64::NAN))
    )
}

/// The amplified tables of a traffic JSON (empty when it has none): per scale step, per
/// workload the median CPU per operation at every `k` and the slope per hook of each mode, and
/// the slope ratio.
fn markdown(j: &Value) -> String {
    let mut md = String::new();
    for scale in j["scales"].as_array().into_iter().flatten() {
        let a = &scale["amplified"];
        if a.is_null() {
            continue;
        }
        let ks: Vec<String> = a["ks"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|k| format!("k={k}"))
            .collect();
        let _ = writeln!(
            md,
            "\n#### Amplified: {} entries — ns CPU per operation at k stacked hooks\n",
            scale["entries"]
        );
        let _ = writeln!(
            md,
            "| workload | mode | {} | slope, ns per hook (median [95 % CI]) |",
            ks.join(" | ")
        );
        let _ = writeln!(md, "|---|---|{}---|", "---:|".repeat(ks.len()));
        for w in a["workloads"].as_array().into_iter().flatten() {
            for mode in ["iptables", "ebpf"] {
                let m = &w["modes"][mode];
                let medians: Vec<String> = m["medians"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|v| num(v.as_f64().unwrap_or(f64::NAN)))
                    .collect();
                let _ = writeln!(
                    md,
                    "| {} | {mode} | {} | {} |",
                    w["workload"].as_str().unwrap_or("?"),
                    medians.join(" | "),
                    cell(&m["slope_ns"])
                );
            }
            let r = &w["slope_ratio_ebpf_iptables"];
            let _ = writeln!(
                md,
                "| {} | **ebpf/iptables slope** |{} {} (sign test p = {}) |",
                w["workload"].as_str().unwrap_or("?"),
                " |".repeat(ks.len()),
                cell(r),
                num(r["sign_test_p"].as_f64().unwrap_or(f64::NAN))
            );
        }
        let proofs = a["copies_verified"].as_array().map_or(0, Vec::len);
        let _ = writeln!(
            md,
            "\nEvery copy ran in all {proofs} (round, k) blocks: equal, non-zero packet counters \
             on the k jumps; the agent's program ran k times per packet reaching the sentinel \
             (`copies_verified` in the JSON)."
        );
    }
    md
}

#[cfg(test)]
mod tests {
    use super::*;

    /// y = intercept + slope·k + round noise, for ks 1, 4, 16 over `rounds` rounds.
    fn series(slope_ns: f64, rounds: usize) -> Vec<Vec<f64>> {
        let ks = [1.0, 4.0, 16.0];
        ks.iter()
            .enumerate()
            .map(|(i, k)| {
                (0..rounds)
                    .map(|r| {
                        // Deterministic noise of ±40 ns, different per (k, round).
                        #[expect(clippy::cast_precision_loss, reason = "small")]
                        let noise = (((i * 7 + r * 13) % 9) as f64 - 4.0) * 10.0;
                        20_000.0 + slope_ns * k + noise
                    })
                    .collect()
            })
            .collect()
    }

    #[test]
    fn a_known_slope_is_recovered_with_an_interval_around_it() {
        let f = fit(&[1, 4, 16], &series(150.0, 7));
        assert_eq!(f.per_round.len(), 7);
        assert!((f.median - 150.0).abs() < 5.0, "median {}", f.median);
        assert!(f.ci95.0 <= 150.0 + 5.0 && f.ci95.1 >= 150.0 - 5.0);
        assert!(f.ci95.0 > 100.0, "the interval excludes 0: {:?}", f.ci95);
    }

    #[test]
    fn a_flat_series_gives_an_interval_containing_zero() {
        let f = fit(&[1, 4, 16], &series(0.0, 7));
        assert!(f.ci95.0 <= 0.0 && f.ci95.1 >= 0.0, "{:?}", f.ci95);
        assert!(f.median.abs() < 5.0);
    }

    #[test]
    fn slope_needs_two_distinct_ks_and_skips_missing_values() {
        assert!(slope(&[4.0, 4.0], &[1.0, 2.0]).is_nan());
        assert!((slope(&[1.0, 2.0, 3.0], &[10.0, f64::NAN, 30.0]) - 10.0).abs() < 1e-9);
    }

    #[test]
    fn the_json_and_its_table_carry_the_fitted_slopes() {
        let mut config = Config::preset(true);
        config.amplify = vec![1, 4, 16];
        config.rounds = 7;
        config.workloads = vec![Workload::Rr];
        let values = vec![vec![series(0.0, 7), series(150.0, 7)]];
        let j = to_json(&config, &values, &[]);
        let w = &j["workloads"][0];
        let ebpf = w["modes"]["ebpf"]["slope_ns"]["median"].as_f64().unwrap();
        assert!((ebpf - 150.0).abs() < 5.0, "{ebpf}");
        let report = json!({"scales": [{"entries": 10, "amplified": j}]});
        let md = markdown(&report);
        assert!(md.contains("| rr | ebpf |"), "{md}");
        assert!(md.contains("| k=1 | k=4 | k=16 |"), "{md}");
        assert!(md.contains(&num(ebpf)), "{md}");
    }

    #[test]
    fn iptables_copies_must_all_see_the_traffic() {
        check_iptables(&[5000, 5000, 5001, 5000], 4).unwrap();
        let idle = check_iptables(&[5000, 5000, 0, 5000], 4).unwrap_err();
        assert!(idle.to_string().contains("copy 3 of 4"), "{idle}");
        assert!(check_iptables(&[0, 0], 2).is_err(), "nothing ran at all");
        assert!(
            check_iptables(&[5000, 5000], 4).is_err(),
            "two copies missing"
        );
    }

    #[test]
    fn ebpf_copies_must_all_run_for_every_packet() {
        let links = |n| vec![("ovn0".to_owned(), n), ("eth0".to_owned(), n)];
        check_ebpf(&links(4), 4000, 1000, 4).unwrap();
        // One copy of four skipped (a copy stopped the chain, or was not linked where traffic runs).
        let short = check_ebpf(&links(4), 3000, 1000, 4).unwrap_err();
        assert!(short.to_string().contains("not every copy ran"), "{short}");
        assert!(check_ebpf(&links(4), 0, 0, 4).is_err(), "no traffic seen");
        assert!(
            check_ebpf(&links(3), 4000, 1000, 4).is_err(),
            "a link missing"
        );
        assert!(check_ebpf(&[], 4000, 1000, 4).is_err());
    }

    /// Root only: the real stack on a veth pair between two namespaces of the test's own, with a
    /// stand-in for the agent's program (named like it, returning "next"): proven at k = 3.
    /// Then a filter that ends TC processing (`TC_ACT_OK`) between the copies and the sentinel
    /// — a copy that sees nothing — and the proof refuses it.
    #[test]
    fn the_proof_refuses_a_stack_where_a_copy_saw_nothing() {
        use crate::node::{bpf::ForeignTcx, cleanup};
        if !crate::setup::is_root() {
            let required = std::env::var_os("KOVN_REQUIRE_PRIVILEGED").is_some()
                || std::env::var("CI").as_deref() == Ok("true");
            assert!(
                !required,
                "needs root (KOVN_REQUIRE_PRIVILEGED or CI is set)"
            );
            eprintln!("skipped: needs root");
            return;
        }
        let a = NetNs::new("kovn-amp-a").unwrap();
        let b = NetNs::new("kovn-amp-b").unwrap();
        a.run(
            "ip",
            &[
                "link",
                "add",
                "amp0",
                "type",
                "veth",
                "peer",
                "name",
                "amp1",
                "netns",
                b.name(),
            ],
        )
        .unwrap();
        a.sh("ip addr add 192.0.2.1/24 dev amp0 && ip link set amp0 up")
            .unwrap();
        b.sh("ip addr add 192.0.2.2/24 dev amp1 && ip link set amp1 up")
            .unwrap();
        let _agent = b
            .enter(|| ForeignTcx::attach_named("amp1", AGENT_PROG))
            .unwrap()
            .unwrap();
        let dir = PathBuf::from(cleanup::RUN_ROOT).join(cleanup::unique_stem());
        std::fs::create_dir(&dir).unwrap();
        let _dir = cleanup::dir(&dir);
        exec::checked(
            std::process::Command::new("mount")
                .args(["-t", "bpf", "bpf"])
                .arg(&dir),
            None,
        )
        .unwrap();
        let _mount = cleanup::mount(&dir);
        let probe = || -> Result<()> {
            a.enter(|| -> Result<()> {
                let socket = std::net::UdpSocket::bind("192.0.2.1:0")?;
                for _ in 0..20 {
                    socket.send_to(b"amplify", "192.0.2.2:9")?;
                }
                Ok(())
            })??;
            // Delivery on veth is synchronous up to the receiving softirq; give it a moment.
            thread::sleep(std::time::Duration::from_millis(100));
            Ok(())
        };
        let mut stack = EbpfStack::find(&b, &dir).unwrap();
        assert_eq!(stack.ifaces, ["amp1"]);
        stack.set(&b, 3).unwrap();
        let proof = stack.verify(&b, 3, probe).unwrap();
        assert_eq!(
            proof["copy_runs"],
            proof["sentinel_runs"].as_u64().unwrap() * 3
        );
        // A program that ends the chain after the first filter: copy 2 and the sentinel see
        // nothing.
        let stop = bpf::load_returning("kovn_amp_stop", 0).unwrap();
        let pin = dir.join("stop");
        bpf::pin(&stop, &pin).unwrap();
        b.run(
            "tc",
            &[
                "filter",
                "add",
                "dev",
                "amp1",
                "ingress",
                "pref",
                "15",
                "bpf",
                "object-pinned",
                &pin.to_string_lossy(),
                "direct-action",
            ],
        )
        .unwrap();
        let refused = stack.verify(&b, 3, probe).unwrap_err();
        assert!(
            format!("{refused:#}").contains("sentinel behind the copies never ran"),
            "{refused:#}"
        );
        drop(stack);
    }
}
