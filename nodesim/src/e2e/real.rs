//! `cargo xtask e2e --kube-ovn VERSIONS`: the outcome scenarios with Kube-OVN's own code
//! (`crate::kube_ovn`'s harness) as the iptables side instead of this project's transcription,
//! and the eBPF agent next to the same real Kube-OVN — same packets, same outcome.
//!
//! Per variant and kube-proxy mode, two fresh nodes (no transcribed Kube-OVN state at all):
//! - `kube-ovn`: the release runs one gateway pass (sets, POSTROUTING, filter guards and its nat
//!   `OVN-PREROUTING`); the scenarios run against those rules.
//! - `ebpf`: for a release, the same pass, then its PREROUTING jumps are deleted (what
//!   `kube-ovn-agent cleanup-iptables` does; a single pass does not re-add them) and the agent
//!   starts; for `patched`, the patched kube-ovn-cni keeps running every 3 s with
//!   `--prerouting-datapath=external` next to the agent — the hand-over as deployed. Its
//!   `kube-ovn` column is the release it patches.
//!
//! Then, per variant, nat PREROUTING start states of spec §5.4 (Calico's, kube-proxy's and the
//! CNI hostport jumps, copies of Kube-OVN's): after one real pass the chain, and whether the pass
//! failed, must be what the transcription's positioning of that release's generation
//! (`kube_ovn::positioning_of`) makes of it, or the start without any Kube-OVN jump (`patched`).
//!
//! In IPVS mode the e2e's IPVS emulation needs the INPUT guard mirrored in FORWARD
//! (`kube_proxy::input_guard_mirror`, docs/e2e.md); it is added on both nodes.

use std::{
    fmt::Write as _,
    fs,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result, ensure};

use super::{coexist, exactness, scenarios};
use crate::{
    cmd,
    kube_ovn::{self, Variant},
    node::{
        Cluster, Family, HookKind, HookOptions, Host, KubeProxyMode, Node, NodeSpec, Outcome,
        cleanup, kube_proxy,
    },
};

/// One scenario's outcomes.
struct Row {
    scenario: scenarios::Scenario,
    kube_ovn: Outcome,
    ebpf: Outcome,
}

/// One variant in one kube-proxy mode: the rows, or why the run could not happen.
struct ModeRun {
    mode: KubeProxyMode,
    rows: Result<Vec<Row>, String>,
}

pub fn run(variants: &[Variant], options: &HookOptions) -> Result<()> {
    let mut json = Vec::new();
    let mut failed_total = 0;
    let mut lines = Vec::new();
    for variant in variants {
        let binary = kube_ovn::build(variant)?;
        let release = kube_ovn::build(&Variant::release(&variant.version))?;
        let mut runs = Vec::new();
        for mode in [KubeProxyMode::Ipvs, KubeProxyMode::Iptables] {
            let rows =
                run_mode(variant, &binary, &release, mode, options).map_err(|e| format!("{e:#}"));
            runs.push(ModeRun { mode, rows });
        }
        let (passed, failed) = print_variant(variant, &runs);
        failed_total += failed;
        lines.push(format!(
            "kube-ovn {}: {passed} passed, {failed} failed",
            variant.name()
        ));
        let positions = positioning(variant, &binary).map_err(|e| format!("{e:#}"));
        let (pos_passed, pos_failed) = print_positioning(variant, &positions);
        failed_total += pos_failed;
        lines.push(format!(
            "kube-ovn {} jump positioning: {pos_passed} passed, {pos_failed} failed",
            variant.name()
        ));
        let cases = exactness::run(variant, &binary, &release, options);
        let (ex_passed, ex_failed) = exactness::print(variant, &cases);
        failed_total += ex_failed;
        lines.push(format!(
            "kube-ovn {} exactness: {ex_passed} passed, {ex_failed} failed",
            variant.name()
        ));
        let mut entry = variant_json(variant, &runs);
        entry["positioning"] = positioning_json(&positions);
        entry["exactness"] = exactness::json(&cases);
        json.push(entry);
    }
    write_report("kube-ovn.json", &json, &lines)?;
    ensure!(
        failed_total == 0,
        "{failed_total} checks differ between the eBPF agent, the transcription and real Kube-OVN"
    );
    Ok(())
}

/// Writes `variants` to `target/e2e/<file>` as the JSON report, then prints its path and the
/// summary `lines`.
pub(super) fn write_report(
    file: &str,
    variants: &[serde_json::Value],
    lines: &[String],
) -> Result<()> {
    let dir = cmd::target_dir().join("e2e");
    fs::create_dir_all(&dir)?;
    let path = dir.join(file);
    fs::write(
        &path,
        serde_json::to_string_pretty(&serde_json::json!({ "variants": variants }))?,
    )?;
    println!("\nJSON report: {}", path.display());
    for line in lines {
        println!("{line}");
    }
    Ok(())
}

/// A run's directory `target/e2e/<prefix>-<unique>`, removed on drop, holding the cluster file
/// Kube-OVN's harness reads.
pub(super) struct RunDir {
    pub dir: PathBuf,
    pub cluster_file: PathBuf,
    _guard: cleanup::Guard,
}

impl RunDir {
    pub fn new(prefix: &str, cluster: &Cluster) -> Result<Self> {
        let dir = cmd::target_dir()
            .join("e2e")
            .join(format!("{prefix}-{}", cleanup::unique_stem()));
        fs::create_dir_all(&dir)?;
        let guard = cleanup::dir(&dir);
        let cluster_file = dir.join("cluster.yaml");
        fs::write(&cluster_file, cluster.to_yaml())?;
        Ok(Self {
            dir,
            cluster_file,
            _guard: guard,
        })
    }
}

fn run_mode(
    variant: &Variant,
    binary: &Path,
    release: &Path,
    mode: KubeProxyMode,
    options: &HookOptions,
) -> Result<Vec<Row>> {
    let applicable: Vec<scenarios::Scenario> = scenarios::all()
        .into_iter()
        .filter(|s| s.expect(mode).is_some())
        .collect();
    let cluster = Cluster::fixture();
    let run = RunDir::new("kube-ovn", &cluster)?;
    let cluster_file = run.cluster_file.as_path();
    let spec = NodeSpec {
        cluster: cluster.clone(),
        kube_proxy: mode,
    };

    let kube_ovn_outcomes = {
        let node = Node::build_without_kube_ovn(spec.clone())?;
        let ns = node.ns(Host::Node);
        kube_ovn::run_once(ns, release, cluster_file, &cluster)
            .context("Kube-OVN's gateway pass")?;
        guard_mirror(&node, &cluster, mode, &Family::ALL)?;
        probe_all(&node, &applicable)?
    };

    let ebpf_outcomes = {
        let mut node = Node::build_without_kube_ovn(spec)?;
        let ns = node.ns(Host::Node);
        let running = if variant.patched {
            Some(kube_ovn::spawn(
                ns,
                binary,
                cluster_file,
                &cluster,
                &run.dir.join("kovn-harness.log"),
            )?)
        } else {
            kube_ovn::run_once(ns, binary, cluster_file, &cluster)
                .context("Kube-OVN's gateway pass")?;
            delete_prerouting_jumps(&node)?;
            None
        };
        guard_mirror(&node, &cluster, mode, &Family::ALL)?;
        node.install_hook(HookKind::Ebpf, options)?;
        let outcomes = probe_all(&node, &applicable)?;
        // The agent alone set the marks: no Kube-OVN jump is left (or, with the patched
        // kube-ovn-cni running, came back).
        no_kube_ovn_prerouting(&node)?;
        node.hook_mut().context("hook installed")?.check()?;
        drop(running);
        outcomes
    };

    Ok(applicable
        .into_iter()
        .zip(kube_ovn_outcomes.into_iter().zip(ebpf_outcomes))
        .map(|(scenario, (kube_ovn, ebpf))| Row {
            scenario,
            kube_ovn,
            ebpf,
        })
        .collect())
}

/// Runs every scenario once and checks connections were tracked (otherwise no nat rule ran).
fn probe_all(node: &Node, scenarios: &[scenarios::Scenario]) -> Result<Vec<Outcome>> {
    let mut outcomes = Vec::with_capacity(scenarios.len());
    for scenario in scenarios {
        outcomes.push(super::probe(node, &scenario.probe)?);
    }
    ensure!(
        node.conntrack_entries()? > 0,
        "no conntrack entries in the node namespace: connection tracking is off there"
    );
    Ok(outcomes)
}

/// The FORWARD mirror of the INPUT guard, for the families Kube-OVN runs (`families`).
pub(super) fn guard_mirror(
    node: &Node,
    cluster: &Cluster,
    mode: KubeProxyMode,
    families: &[Family],
) -> Result<()> {
    if mode != KubeProxyMode::Ipvs {
        return Ok(());
    }
    for &family in families {
        let cidrs: Vec<String> = cluster
            .service_cidrs
            .iter()
            .filter(|c| c.family() == family)
            .map(ToString::to_string)
            .collect();
        let script = format!(
            "*filter\n{}COMMIT\n",
            kube_proxy::input_guard_mirror(&cidrs)
        );
        node.ns(Host::Node)
            .run_stdin(family.iptables_restore(), &["--noflush"], &script)
            .context("mirroring the INPUT guard in FORWARD")?;
    }
    Ok(())
}

/// Deletes Kube-OVN's nat PREROUTING jump (every copy, by exact match) in both families.
pub(super) fn delete_prerouting_jumps(node: &Node) -> Result<()> {
    let ns = node.ns(Host::Node);
    for family in Family::ALL {
        let rules = ns.run(family.iptables(), &["-t", "nat", "-S", "PREROUTING"])?;
        for _ in rules
            .lines()
            .filter(|l| *l == crate::node::kube_ovn::PREROUTING_JUMP)
        {
            let mut args = vec!["-t", "nat", "-D", "PREROUTING"];
            args.extend(crate::node::kube_ovn::PREROUTING_JUMP_ARGS);
            ns.run(family.iptables(), &args)?;
        }
    }
    Ok(())
}

/// No PREROUTING jump of Kube-OVN's in nat or mangle, either family.
pub(super) fn no_kube_ovn_prerouting(node: &Node) -> Result<()> {
    let ns = node.ns(Host::Node);
    for family in Family::ALL {
        for table in ["nat", "mangle"] {
            let rules = ns.run(family.iptables(), &["-t", table, "-S", "PREROUTING"])?;
            ensure!(
                !rules.contains("OVN-PREROUTING"),
                "{family} {table} PREROUTING has Kube-OVN's jump next to the agent:\n{rules}"
            );
        }
    }
    Ok(())
}

fn print_variant(variant: &Variant, runs: &[ModeRun]) -> (usize, usize) {
    let (mut passed, mut failed) = (0, 0);
    for run in runs {
        println!("\n== kube-ovn {} vs ebpf, {} ==", variant.name(), run.mode);
        match &run.rows {
            Err(e) => {
                println!("  could not run: {e}");
                failed += 1;
            }
            Ok(rows) => {
                for row in rows {
                    let agree = row.kube_ovn == row.ebpf;
                    if agree {
                        passed += 1;
                    } else {
                        failed += 1;
                    }
                    let expected = row
                        .scenario
                        .expect(run.mode)
                        .map(|e| e.marked.to_string())
                        .unwrap_or_default();
                    let mut line = format!(
                        "  {} {:>3} {:<58} kube-ovn: {:<22} ebpf: {:<22}",
                        if agree { "ok  " } else { "DIFF" },
                        row.scenario.vector,
                        row.scenario.what,
                        row.kube_ovn.to_string(),
                        row.ebpf.to_string(),
                    );
                    if row.kube_ovn.to_string() != expected {
                        let _ = write!(line, " (transcription expects {expected})");
                    }
                    println!("{}", line.trim_end());
                }
            }
        }
    }
    (passed, failed)
}

fn variant_json(variant: &Variant, runs: &[ModeRun]) -> serde_json::Value {
    let modes: Vec<serde_json::Value> = runs
        .iter()
        .map(|run| match &run.rows {
            Err(e) => serde_json::json!({ "mode": run.mode.flag(), "error": e }),
            Ok(rows) => serde_json::json!({
                "mode": run.mode.flag(),
                "scenarios": rows.iter().map(|row| serde_json::json!({
                    "vector": row.scenario.vector,
                    "what": row.scenario.what,
                    "kube_ovn": row.kube_ovn.to_string(),
                    "ebpf": row.ebpf.to_string(),
                    "expected_marked": row.scenario.expect(run.mode).map(|e| e.marked.to_string()),
                    "agree": row.kube_ovn == row.ebpf,
                })).collect::<Vec<_>>(),
            }),
        })
        .collect();
    serde_json::json!({
        "variant": variant.name(),
        "version": variant.version,
        "patched": variant.patched,
        "modes": modes,
    })
}

/// nat PREROUTING start states for the jump positioning (spec §5.4's C1–C6 starts, plus an
/// empty chain and a jump below two copies): short names of `coexist`.
const POSITION_STARTS: &[&[&str]] = &[
    &["cali", "KUBE", "CNI"],
    &["cali", "ovn", "KUBE", "CNI"],
    &["cali", "KUBE", "ovn", "CNI"],
    &["ovn"],
    &["ovn", "cali", "ovn", "ovn"],
    &["ovn", "cali", "ovn", "ovn", "KUBE", "CNI"],
    &["KUBE", "ovn", "ovn"],
    &[],
];

/// One start state: the chain after one real pass, and what is expected of it — the
/// transcription's v1.13.15+ positioning (`kube_ovn::ensure_prerouting_jump`) for a release, the
/// start without any Kube-OVN jump for `patched`.
struct Position {
    family: Family,
    start: Vec<&'static str>,
    real: Vec<String>,
    expected: Vec<String>,
    /// The pass's error (either family), real and transcribed: v1.13.0–v1.13.12 deletes
    /// duplicates by stale index and fails with "Index of deletion too big".
    real_error: Option<String>,
    expected_error: Option<String>,
}

impl Position {
    fn ok(&self) -> bool {
        self.real == self.expected && self.real_error.is_some() == self.expected_error.is_some()
    }
}

fn positioning(variant: &Variant, binary: &Path) -> Result<Vec<Position>> {
    let cluster = Cluster::fixture();
    let run = RunDir::new("kube-ovn", &cluster)?;
    let cluster_file = run.cluster_file.as_path();
    let mut out = Vec::new();
    let generation = kube_ovn::positioning_of(&variant.version);
    for start in POSITION_STARTS {
        let real_ns = start_state(start)?;
        let real_error = kube_ovn::run_once(&real_ns, binary, cluster_file, &cluster)
            .err()
            .map(|e| deletion_error(&format!("{e:#}")));
        let twin = start_state(start)?;
        let mut expected_error = None;
        let first = out.len();
        for family in Family::ALL {
            let expected = if variant.patched {
                start
                    .iter()
                    .filter(|n| **n != "ovn")
                    .map(|n| (*n).to_owned())
                    .collect()
            } else if expected_error.is_some() {
                // setIptables returns at the first family's error: IPv6 is not reached.
                start.iter().map(|n| (*n).to_owned()).collect()
            } else {
                let log = crate::node::kube_ovn::ensure_prerouting_jump(&twin, family, generation)?;
                if let Some(e) = log.error {
                    expected_error = Some(format!("{family}: {e}"));
                }
                listing(&twin, family)?
            };
            out.push(Position {
                family,
                start: start.to_vec(),
                real: listing(&real_ns, family)?,
                expected,
                real_error: real_error.clone(),
                expected_error: None,
            });
        }
        for p in &mut out[first..] {
            p.expected_error.clone_from(&expected_error);
        }
    }
    Ok(out)
}

/// The iptables message of a failed pass ("Index of deletion too big."), or its last line.
fn deletion_error(text: &str) -> String {
    text.lines()
        .find(|l| l.contains("Index of deletion too big"))
        .or_else(|| text.lines().last())
        .unwrap_or(text)
        .trim()
        .to_owned()
}

/// A scratch namespace whose nat PREROUTING (both families) is `start`.
fn start_state(start: &[&str]) -> Result<crate::node::netns::NetNs> {
    let ns = crate::node::netns::NetNs::create(&format!("{}-kpos", cleanup::unique_stem()))?;
    for family in Family::ALL {
        let mut script = String::from("*nat\n");
        for chain in [
            "OVN-PREROUTING",
            "cali-PREROUTING",
            "KUBE-SERVICES",
            "CNI-HOSTPORT-DNAT",
        ] {
            let _ = writeln!(script, ":{chain} - [0:0]");
        }
        for name in start {
            let _ = writeln!(script, "{}", coexist::line(name));
        }
        script.push_str("COMMIT\n");
        ns.run_stdin(family.iptables_restore(), &["--noflush"], &script)?;
    }
    Ok(ns)
}

fn listing(ns: &crate::node::netns::NetNs, family: Family) -> Result<Vec<String>> {
    Ok(crate::node::kube_ovn::list_prerouting(ns, family)?
        .iter()
        .skip(1)
        .map(|l| coexist::short(l).to_owned())
        .collect())
}

fn print_positioning(
    variant: &Variant,
    positions: &Result<Vec<Position>, String>,
) -> (usize, usize) {
    println!(
        "\n== kube-ovn {}: nat PREROUTING jump positioning (spec §5.4), real vs {} ==",
        variant.name(),
        if variant.patched {
            "the start without Kube-OVN's jump".to_owned()
        } else {
            format!(
                "the transcription's {} logic",
                kube_ovn::positioning_of(&variant.version).label()
            )
        }
    );
    match positions {
        Err(e) => {
            println!("  could not run: {e}");
            (0, 1)
        }
        Ok(list) => {
            let mut failed = 0;
            for p in list {
                let ok = p.ok();
                failed += usize::from(!ok);
                let mut line = format!(
                    "  {} {} [{}] -> real [{}], expected [{}]",
                    if ok { "ok  " } else { "DIFF" },
                    p.family,
                    p.start.join(", "),
                    p.real.join(", "),
                    p.expected.join(", ")
                );
                if p.real_error.is_some() || p.expected_error.is_some() {
                    let _ = write!(
                        line,
                        "; error real: {}, expected: {}",
                        p.real_error.as_deref().unwrap_or("none"),
                        p.expected_error.as_deref().unwrap_or("none")
                    );
                }
                println!("{line}");
            }
            (list.len() - failed, failed)
        }
    }
}

fn positioning_json(positions: &Result<Vec<Position>, String>) -> serde_json::Value {
    match positions {
        Err(e) => serde_json::json!({ "error": e }),
        Ok(list) => list
            .iter()
            .map(|p| {
                serde_json::json!({
                    "family": p.family.to_string(),
                    "start": p.start,
                    "real": p.real,
                    "expected": p.expected,
                    "real_error": p.real_error,
                    "expected_error": p.expected_error,
                    "agree": p.ok(),
                })
            })
            .collect(),
    }
}
