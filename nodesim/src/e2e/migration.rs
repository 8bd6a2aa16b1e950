//! The migration of docs/migration.md on the e2e node: Kube-OVN's iptables hook in place (with
//! Calico's and the CNI hostport plugin's jumps beside it), the agent started next to it in
//! shadow mode; `verify` under traffic must agree; the agent switched to enforce; then
//! `cleanup-iptables` must remove Kube-OVN's jumps and nothing else. After every step all
//! IPVS-mode scenarios must still give the hooked outcome.

use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};

use super::{
    coexist,
    faults::{all_scenarios, with_traffic},
    scenarios::{self, Scenario},
};
use crate::node::{
    Cluster, Family, HookKind, HookOptions, Host, KubeProxyMode, Node, NodeSpec, agent::Agent,
    kube_ovn::PREROUTING_JUMP, netns::NetNs,
};

/// One step, after which every scenario ran once (or, for verify, traffic ran throughout).
pub struct Step {
    pub name: String,
    pub connections: usize,
    /// Outcomes that were not the hooked one.
    pub wrong: Vec<String>,
    pub detail: String,
    /// Checks of the step itself (verify's verdict, the rules cleanup left).
    pub failures: Vec<String>,
}

impl Step {
    /// A step judged by running every scenario once afterwards.
    fn scenarios(name: &str, node: &Node, detail: String) -> Result<Self> {
        let (connections, wrong) = all_scenarios(node, |e| &e.marked)?;
        Ok(Self {
            name: name.into(),
            connections,
            wrong,
            detail,
            failures: Vec::new(),
        })
    }
}

pub struct MigrationResult {
    pub steps: Vec<Step>,
    pub elapsed: Duration,
}

pub fn run(options: &HookOptions, quick: bool, probe_timeout: Duration) -> Result<MigrationResult> {
    let started = Instant::now();
    let mut node = Node::build(NodeSpec {
        cluster: Cluster::fixture(),
        kube_proxy: KubeProxyMode::Ipvs,
    })?;
    coexist::install_neighbours(node.ns(Host::Node))?;
    node.install_hook(HookKind::Iptables, options)?;
    let mut config = options
        .agent
        .clone()
        .context("agent not available: no agent binary given")?;
    config.shadow = true;
    // Declared after `node`, so dropped (stopped, detached) before the namespaces go.
    let mut agent = Agent::start(node.ns(Host::Node).name(), &node.spec, &config)?;
    let mut steps = vec![Step::scenarios(
        "iptables hook + agent in shadow mode",
        &node,
        format!("agent mode {}", mode(&agent)?),
    )?];
    steps.push(verify(&mut node, &agent, quick, probe_timeout)?);
    agent.terminate()?;
    agent.set_shadow(false);
    agent
        .spawn()
        .context("restarting the agent in enforce mode")?;
    steps.push(Step::scenarios(
        "agent switched to enforce",
        &node,
        format!("agent mode {}", mode(&agent)?),
    )?);
    steps.push(cleanup(&node, &agent)?);
    drop(agent);
    Ok(MigrationResult {
        steps,
        elapsed: started.elapsed(),
    })
}

/// `verify --json` while the mark-dependent scenarios and UDP NodePort traffic run (so every
/// rule, R2u and R3u included, is compared rather than idle): it must agree.
fn verify(node: &mut Node, agent: &Agent, quick: bool, probe_timeout: Duration) -> Result<Step> {
    let window = if quick { "2s" } else { "5s" };
    let mix: Vec<Scenario> = scenarios::all()
        .into_iter()
        .filter(|s| s.coexist || matches!(s.vector, "16" | "18"))
        .collect();
    let (verify, counts) = with_traffic(node, &mix, 1, probe_timeout, |_, _| {
        agent.cli(
            &["verify", "--json", "--window", window],
            Duration::from_mins(1),
        )
    });
    let verify = verify?;
    let counts = counts?;
    let report: serde_json::Value = serde_json::from_slice(&verify.stdout).unwrap_or_default();
    let verdict = report["verdict"].as_str().unwrap_or("none").to_owned();
    let rules: Vec<String> = report["rules"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|r| {
            format!(
                "{} {}",
                r["rule"].as_str().unwrap_or("?"),
                r["verdict"].as_str().unwrap_or("?")
            )
        })
        .collect();
    let mut failures = Vec::new();
    if verify.status.code() != Some(0) || verdict != "agree" {
        failures.push(format!(
            "verify: exit {:?}, verdict {verdict}:\n{}\n{}",
            verify.status.code(),
            String::from_utf8_lossy(&verify.stdout),
            String::from_utf8_lossy(&verify.stderr)
        ));
    }
    Ok(Step {
        name: format!("verify --window {window} under traffic"),
        connections: counts[0].connections,
        wrong: counts[0].wrong.keys().cloned().collect(),
        detail: format!("verdict {verdict} ({})", rules.join(", ")),
        failures,
    })
}

/// `cleanup-iptables`: exactly Kube-OVN's jumps go, in nat and mangle, both families.
fn cleanup(node: &Node, agent: &Agent) -> Result<Step> {
    let ns = node.ns(Host::Node);
    let before = nat_and_mangle(ns)?;
    let out = agent.cli(&["cleanup-iptables"], Duration::from_mins(1))?;
    let after = nat_and_mangle(ns)?;
    let expected: Vec<String> = before
        .iter()
        .filter(|l| !l.ends_with(PREROUTING_JUMP))
        .cloned()
        .collect();
    let mut step = Step::scenarios(
        "cleanup-iptables",
        node,
        format!(
            "removed {} Kube-OVN jump(s); kept {} other PREROUTING rules (Calico, KUBE-SERVICES, \
             CNI-HOSTPORT-DNAT) and the OVN-PREROUTING chains",
            before.len().saturating_sub(after.len()),
            after
                .iter()
                .filter(|l| l.contains("-A PREROUTING "))
                .count()
        ),
    )?;
    if !out.status.success() {
        step.failures.push(format!(
            "cleanup-iptables failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    if after != expected {
        step.failures.push(format!(
            "cleanup-iptables must remove Kube-OVN's jumps and nothing else:\nbefore:\n{}\n\
             after:\n{}",
            before.join("\n"),
            after.join("\n")
        ));
    }
    Ok(step)
}

fn mode(agent: &Agent) -> Result<String> {
    Ok(agent.status()?.mode)
}

/// The nat and mangle tables of both families as `iptables -S` prints them, each line prefixed
/// with its family and table.
fn nat_and_mangle(ns: &NetNs) -> Result<Vec<String>> {
    let mut lines = Vec::new();
    for family in Family::ALL {
        for table in ["nat", "mangle"] {
            for line in ns.run(family.iptables(), &["-t", table, "-S"])?.lines() {
                lines.push(format!("{family} {table} {line}"));
            }
        }
    }
    Ok(lines)
}
