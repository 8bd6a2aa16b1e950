//! `cargo xtask e2e`: the same outcome scenarios on a simulated Kube-OVN node with each
//! PREROUTING implementation — none (`baseline`), Kube-OVN's iptables rules, the eBPF agent —
//! side by side; Calico/kube-proxy churn with Kube-OVN's old and current jump positioning;
//! Calico's raw mark clearing; and faults of the agent (kill -9, upgrade, `ovn0` re-creation,
//! detach). See `docs/e2e.md`.

mod coexist;
mod exactness;
mod faults;
mod migration;
mod real;
mod real_coexist;
mod report;
mod scenarios;
mod tun;

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};

use self::{
    coexist::CoexistConfig,
    faults::{Attach, FaultConfig},
    report::{Column, Differential, Report},
};
use crate::{
    cmd,
    node::{
        Cluster, HookKind, HookOptions, Host, KubeProxyMode, Node, NodeSpec, Outcome,
        agent::{Agent, AgentConfig},
        cleanup,
        kube_ovn::Positioning,
    },
    setup,
};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// PREROUTING implementations to compare. `baseline` (no hook at all) always runs too: it
    /// shows which scenarios depend on the marks.
    #[arg(long, value_enum, default_value_t = ModeArg::Both)]
    mode: ModeArg,
    /// CI-sized runs: 1000 coexistence connections over 10 s per hook instead of 3000 over 30 s,
    /// one kill -9 instead of three, shorter fault windows.
    #[arg(long)]
    quick: bool,
    /// Agent binary to run in `ebpf` mode instead of building `kube-ovn-agent`.
    #[arg(long, value_name = "PATH")]
    agent: Option<PathBuf>,
    /// Agent binary the upgrade fault switches to, instead of rebuilding `kube-ovn-agent` with
    /// `KOVN_EBPF_SALT=1` (same behaviour, another program tag).
    #[arg(long, value_name = "PATH")]
    rebuilt_agent: Option<PathBuf>,
    /// Build and run the release agent.
    #[arg(long)]
    release: bool,
    /// Run only these parts (repeat or list); default: all.
    #[arg(long, value_enum, num_args = 1.., value_delimiter = ',')]
    only: Vec<Part>,
    /// Instead of the parts: the outcome scenarios with real Kube-OVN (its own gateway code,
    /// `cargo xtask kube-ovn`) as the iptables side and next to the agent, for these variants
    /// (comma list of versions such as v1.16.2, and `patched`). See docs/kube-ovn-real.md.
    #[arg(long, value_delimiter = ',', value_name = "VERSIONS")]
    kube_ovn: Vec<String>,
    /// With --kube-ovn: instead of the scenarios, the seed's churn with the real releases —
    /// Calico in insert mode and a kube-proxy service jump Kube-OVN cannot see (nftables mode),
    /// for this many seconds per node, iptables vs ebpf. See docs/kube-ovn-real.md.
    #[arg(long, value_name = "SECONDS", requires = "kube_ovn")]
    kube_ovn_coexist: Option<u64>,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum Part {
    /// The outcome tables (both kube-proxy modes, Calico's raw rule).
    Differential,
    /// Control-plane vectors C1–C6 and the chain churn runs.
    Coexistence,
    /// kill -9, upgrade/downgrade, ovn0 re-creation, detach (ebpf only).
    Faults,
    /// shadow → verify → enforce → cleanup-iptables next to Kube-OVN's rules (both hooks).
    Migration,
}

impl Args {
    fn runs(&self, part: Part) -> bool {
        self.only.is_empty() || self.only.contains(&part)
    }
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum ModeArg {
    Iptables,
    Ebpf,
    Both,
}

impl ModeArg {
    fn hooks(self) -> Vec<HookKind> {
        match self {
            Self::Iptables => vec![HookKind::Baseline, HookKind::Iptables],
            Self::Ebpf => vec![HookKind::Baseline, HookKind::Ebpf],
            Self::Both => vec![HookKind::Baseline, HookKind::Iptables, HookKind::Ebpf],
        }
    }
}

/// Commands the suite drives (command → Debian package).
const TOOLS: &[(&str, &str)] = &[
    ("ip", "iproute2"),
    ("tc", "iproute2"),
    ("iptables", "iptables"),
    ("ip6tables", "iptables"),
    ("iptables-restore", "iptables"),
    ("ip6tables-restore", "iptables"),
    ("ipset", "ipset"),
];

/// Every expected outcome is immediate (accepted or refused), so a timeout is always a failure;
/// the margin only keeps a loaded CI machine from turning a slow success into one.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

pub fn run(args: &Args) -> Result<()> {
    if !setup::is_root() {
        bail!(
            "cargo xtask e2e needs root: it creates network namespaces, ipsets and iptables rules, \
             and loads BPF programs in ebpf mode"
        );
    }
    setup::ensure_apt_tools(TOOLS)?;
    cleanup::install_signal_handler();
    cleanup::remove_stale().context("removing what earlier runs left")?;
    if !args.kube_ovn.is_empty() {
        let variants = args
            .kube_ovn
            .iter()
            .map(|v| crate::kube_ovn::Variant::parse(v))
            .collect::<Result<Vec<_>>>()?;
        let options = HookOptions {
            agent: Some(AgentConfig::new(agent_binary(args)?)),
        };
        if let Some(secs) = args.kube_ovn_coexist {
            return real_coexist::run(&variants, &options, Duration::from_secs(secs));
        }
        return real::run(&variants, &options);
    }
    let started = Instant::now();
    let hooks = args.mode.hooks();
    let mut runner = Runner::new(args, &hooks);
    let mut report = Report::default();

    if args.runs(Part::Differential) {
        differentials(&mut runner, &mut report, &hooks);
    }
    if args.runs(Part::Coexistence) {
        coexistence(&mut runner, &mut report, &hooks, args.quick);
    }
    if hooks.contains(&HookKind::Ebpf) && args.runs(Part::Faults) {
        let config = FaultConfig {
            quick: args.quick,
            probe_timeout: PROBE_TIMEOUT,
        };
        // tcx is what this kernel uses; the netlink path (kernels before 6.6) is in the full
        // run and in the kernel matrix's agent tests.
        let attach: &[Attach] = if args.quick {
            &[Attach::Tcx]
        } else {
            &[Attach::Tcx, Attach::Netlink]
        };
        let rebuilt = runner.rebuilt.clone();
        for &attach in attach {
            let result = runner.guard_agent(|options| {
                faults::run(options, &rebuilt, &config, attach).map_err(|e| format!("{e:#}"))
            });
            report.faults.push((attach, result));
        }
    }
    if hooks.contains(&HookKind::Ebpf)
        && hooks.contains(&HookKind::Iptables)
        && args.runs(Part::Migration)
    {
        let quick = args.quick;
        let result = runner.guard_agent(|options| {
            migration::run(options, quick, PROBE_TIMEOUT).map_err(|e| format!("{e:#}"))
        });
        report.migration = Some(result);
    }
    report.notes.push(
        "IPVS is emulated (this kernel has no CONFIG_IP_VS): ClusterIPs are local on kube-ipvs0, \
         virtual servers are DNAT rules behind KUBE-SERVICES, and Kube-OVN's INPUT guard is \
         mirrored in FORWARD. See docs/e2e.md."
            .into(),
    );
    let failures = report.print(started.elapsed());
    ensure!(failures.is_empty(), "{} e2e checks failed", failures.len());
    Ok(())
}

fn differentials(runner: &mut Runner, report: &mut Report, hooks: &[HookKind]) {
    for mode in [KubeProxyMode::Ipvs, KubeProxyMode::Iptables] {
        report
            .differentials
            .push(runner.differential(mode, false, hooks));
    }
    let compared: Vec<HookKind> = hooks
        .iter()
        .copied()
        .filter(|h| *h != HookKind::Baseline)
        .collect();
    report
        .differentials
        .push(runner.differential(KubeProxyMode::Ipvs, true, &compared));
}

fn coexistence(runner: &mut Runner, report: &mut Report, hooks: &[HookKind], quick: bool) {
    if hooks.contains(&HookKind::Iptables) {
        report.vectors = Some(coexist::control_plane_vectors().map_err(|e| format!("{e:#}")));
    }
    let config = CoexistConfig {
        connections: if quick { 1000 } else { 3000 },
        duration: Duration::from_secs(if quick { 10 } else { 30 }),
        probe_timeout: PROBE_TIMEOUT,
    };
    if hooks.contains(&HookKind::Iptables) {
        for version in [Positioning::V1_13_0, Positioning::V1_13_15] {
            let label = format!("iptables ({})", version.label());
            let result = coexist::run(HookKind::Iptables, Some(version), &runner.options, &config)
                .map_err(|e| format!("{e:#}"));
            report.coexistence.push((label, result));
        }
    }
    if hooks.contains(&HookKind::Ebpf) {
        let result = runner.guard_agent(|options| {
            coexist::run(HookKind::Ebpf, None, options, &config).map_err(|e| format!("{e:#}"))
        });
        report.coexistence.push(("ebpf".into(), result));
    }
}

struct Runner {
    options: HookOptions,
    /// The agent the upgrade fault switches to.
    rebuilt: Result<PathBuf, String>,
    /// Set once the agent is known to be unusable, so later ebpf runs report it instead of
    /// waiting for it again.
    agent_problem: Option<String>,
}

impl Runner {
    fn new(args: &Args, hooks: &[HookKind]) -> Self {
        let mut runner = Self {
            options: HookOptions::default(),
            rebuilt: Err("not built".into()),
            agent_problem: None,
        };
        if hooks.contains(&HookKind::Ebpf) {
            // The rebuilt agent first: its build overwrites the default binary, which the
            // default build then restores.
            runner.rebuilt = rebuilt_agent(args).map_err(|e| format!("{e:#}"));
            match agent_binary(args) {
                Ok(binary) => runner.options.agent = Some(AgentConfig::new(binary)),
                Err(e) => runner.agent_problem = Some(format!("agent not available: {e:#}")),
            }
        }
        runner
    }

    /// Runs an ebpf-mode step unless the agent already proved unavailable; remembers it if this
    /// step finds it unavailable.
    fn guard_agent<T>(
        &mut self,
        step: impl FnOnce(&HookOptions) -> Result<T, String>,
    ) -> Result<T, String> {
        if let Some(problem) = &self.agent_problem {
            return Err(problem.clone());
        }
        let result = step(&self.options);
        if let Err(e) = &result
            && e.contains("agent not available")
        {
            self.agent_problem = Some(e.clone());
        }
        result
    }

    fn differential(
        &mut self,
        mode: KubeProxyMode,
        calico_raw: bool,
        hooks: &[HookKind],
    ) -> Differential {
        let all = scenarios::all();
        let applicable: Vec<_> = all
            .into_iter()
            .filter(|s| s.expect(mode).is_some())
            .collect();
        let mut columns = Vec::new();
        for &hook in hooks {
            let run = |options: &HookOptions| {
                run_scenarios(mode, hook, options, calico_raw, &applicable)
                    .map_err(|e| format!("{e:#}"))
            };
            let column: Column = if hook == HookKind::Ebpf {
                self.guard_agent(run)
            } else {
                run(&self.options)
            };
            columns.push((hook, column));
        }
        let title = if calico_raw {
            format!("{mode}, with Calico's raw rule clearing 0xf0000 (spec §6.8)")
        } else {
            mode.to_string()
        };
        Differential {
            title,
            mode,
            calico_raw,
            scenarios: applicable,
            columns,
        }
    }
}

/// Builds a node with `hook`, runs every scenario once and checks the node really tracked
/// connections (design §5: otherwise nat rules silently match nothing).
fn run_scenarios(
    mode: KubeProxyMode,
    hook: HookKind,
    options: &HookOptions,
    calico_raw: bool,
    scenarios: &[scenarios::Scenario],
) -> Result<Vec<Outcome>> {
    let mut node = Node::build(NodeSpec {
        cluster: Cluster::fixture(),
        kube_proxy: mode,
    })?;
    if calico_raw {
        coexist::install_calico_raw_clobber(node.ns(Host::Node))?;
    }
    node.install_hook(hook, options)?;
    if let Some(secs) = std::env::var("KOVN_E2E_HOLD")
        .ok()
        .and_then(|s| s.parse().ok())
    {
        eprintln!("HOLD {secs}s: node ns {}", node.ns(Host::Node).name());
        std::thread::sleep(Duration::from_secs(secs));
    }
    let mut outcomes = Vec::with_capacity(scenarios.len());
    for scenario in scenarios {
        outcomes.push(probe(&node, &scenario.probe)?);
    }
    let tracked = node.conntrack_entries()?;
    ensure!(
        tracked > 0,
        "no conntrack entries in the node namespace after {} connections: connection tracking is \
         off there, so no nat rule ever ran",
        scenarios.len()
    );
    let hook = node.hook_mut().context("hook installed")?;
    hook.check()?;
    if let Some(agent) = hook.agent_mut() {
        check_agent(agent, mode, calico_raw)?;
    }
    Ok(outcomes)
}

/// Checks the agent's own account against the traffic that just ran: it is attached to `ovn0`
/// and `eth0`; the rules the mode enables counted hits and the others none (the outcomes are the
/// independent proof, this catches a right outcome for a wrong reason); and the mark-clobber
/// finding is reported in `status` and in the metric exactly when Calico's raw rule is there
/// (issue 4 §4).
fn check_agent(agent: &Agent, mode: KubeProxyMode, calico_raw: bool) -> Result<()> {
    let status = agent.status()?;
    for ifname in ["ovn0", "eth0"] {
        ensure!(
            status.attached().contains(&ifname),
            "`status --json` shows no attachment on {ifname}: {:?}",
            status.attachments
        );
    }
    let counter = |name: &str| status.counter(name);
    let (hit, silent): (&[&str], &[&str]) = match mode {
        KubeProxyMode::Ipvs => (&["R1a", "R2t", "R2u", "R3t", "R3u"], &["R1b"]),
        KubeProxyMode::Iptables | KubeProxyMode::Nftables => {
            (&["R1b"], &["R1a", "R2t", "R2u", "R3t", "R3u"])
        }
    };
    for rule in hit {
        ensure!(
            counter(rule).is_some_and(|n| n > 0),
            "{mode}: counter {rule} did not move"
        );
    }
    for rule in silent {
        ensure!(
            counter(rule) == Some(0),
            "{mode}: counter {rule} moved ({:?})",
            counter(rule)
        );
    }
    let findings = status.mark_clobber.findings.len();
    let metric = agent
        .metrics()?
        .lines()
        .find_map(|l| l.strip_prefix("kovn_mark_clobber_rules "))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .context("no kovn_mark_clobber_rules metric")?;
    if calico_raw {
        ensure!(
            findings > 0 && metric >= 1.0,
            "Calico's raw rule clears 0xf0000 but the agent reports {findings} findings in status \
             and kovn_mark_clobber_rules {metric}"
        );
    } else {
        ensure!(
            findings == 0 && metric < 1.0,
            "no rule clears our bits but the agent reports {findings} findings in status and \
             kovn_mark_clobber_rules {metric}: {:?}",
            status.mark_clobber
        );
    }
    Ok(())
}

/// Runs one probe; a datagram meant to be fragmented that left whole is reported as a failure
/// (it would test nothing about fragments).
fn probe(node: &Node, probe: &crate::node::Probe) -> Result<Outcome> {
    let fragmented = probe.payload > 1500;
    let family = probe.family();
    let before = if fragmented {
        node.frag_creates(probe.from, family)?
    } else {
        0
    };
    let outcome = node.probe(probe, PROBE_TIMEOUT)?;
    if fragmented && node.frag_creates(probe.from, family)? == before {
        return Ok(Outcome::Failed("left unfragmented".into()));
    }
    Ok(outcome)
}

/// Builds the agent (unless `--agent` names one, and no rebuilt agent had to be built over the
/// default binary) and returns its path: a private copy, `target/e2e/kube-ovn-agent`, so that a
/// build running meanwhile (another run's salted build, for one) cannot change the binary
/// under this run — the downgrade fault must get back the very program it started with.
fn agent_binary(args: &Args) -> Result<PathBuf> {
    if args.agent.is_none() || args.rebuilt_agent.is_none() {
        build_agent(args.release, None).context("building kube-ovn-agent")?;
    }
    match &args.agent {
        Some(path) => Ok(path.clone()),
        None => copy_aside(args.release, "kube-ovn-agent"),
    }
}

/// The agent for the upgrade fault: `--rebuilt-agent`, or this workspace's agent with its eBPF
/// object rebuilt with `KOVN_EBPF_SALT=1` (same behaviour, another program tag), copied to
/// `target/e2e/kube-ovn-agent-salted`. The build overwrites `target/<profile>/kube-ovn-agent`;
/// [`agent_binary`] rebuilds the default right after (cargo reruns the agent's build script
/// when `KOVN_EBPF_SALT` changes; both objects stay cached, so on an unchanged tree each
/// build takes seconds).
fn rebuilt_agent(args: &Args) -> Result<PathBuf> {
    if let Some(path) = &args.rebuilt_agent {
        return Ok(path.clone());
    }
    build_agent(args.release, Some("1"))
        .context("building kube-ovn-agent with KOVN_EBPF_SALT=1")?;
    copy_aside(args.release, "kube-ovn-agent-salted")
}

/// Copies the freshly built `target/<profile>/kube-ovn-agent` to `target/e2e/<name>`: to a
/// temporary name, then renamed over the old copy, which an agent of an earlier run may still
/// execute.
fn copy_aside(release: bool, name: &str) -> Result<PathBuf> {
    let built = cmd::target_dir()
        .join(profile(release))
        .join("kube-ovn-agent");
    let dir = cmd::target_dir().join("e2e");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let copy = dir.join(name);
    let partial = dir.join(format!("{name}.{}", std::process::id()));
    std::fs::copy(&built, &partial)
        .with_context(|| format!("copying {} aside", built.display()))?;
    std::fs::rename(&partial, &copy).with_context(|| format!("renaming to {}", copy.display()))?;
    Ok(copy)
}

/// `cargo build -p kube-ovn-agent`, with `KOVN_EBPF_SALT` set to `salt` or removed.
fn build_agent(release: bool, salt: Option<&str>) -> Result<()> {
    let mut command = Command::new(env!("CARGO"));
    command
        .args(["build", "--package", "kube-ovn-agent"])
        .current_dir(cmd::workspace_root());
    if release {
        command.arg("--release");
    }
    match salt {
        Some(salt) => command.env("KOVN_EBPF_SALT", salt),
        None => command.env_remove("KOVN_EBPF_SALT"),
    };
    cmd::run(&mut command)
}

fn profile(release: bool) -> &'static Path {
    Path::new(if release { "release" } else { "debug" })
}
