//! `cargo xtask bench traffic`: real traffic through the simulated node (`crate::node`) with no
//! PREROUTING logic (`baseline`), Kube-OVN's iptables rules (`iptables`) and the agent
//! (`ebpf`), in one run. Each scale step builds three identical nodes — same cluster, same
//! ipsets, same consumers — that differ only in the hook, then runs rounds in which every
//! workload is measured on each of the three in turn, so drift of a shared machine spreads over
//! all three; the order rotates through all six permutations ([`mode_order`]) and the
//! comparison is of per-round pairs (`report`: a bootstrap CI of the
//! median paired ratio and a sign test). Writes `target/bench/traffic.{json,md}` and one SVG per
//! plotted metric; BENCHMARKS.md documents the method and the schema.

mod amplify;
mod cpu;
mod load;
mod paired;
mod report;

pub use self::{
    amplify::document as amplified_markdown,
    report::{
        group, load_averages, markdown, num, variants_amplified_markdown, variants_markdown,
        vulnerable,
    },
};
mod state;
mod svg;

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::{Path, PathBuf},
    sync::atomic::Ordering,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use kube_ovn_ebpf_common::names;

use self::{
    load::{Generator, Load, Servers, Target},
    report::{Report, Sample, ScaleResult, Workload},
    state::Variant,
};
use crate::{
    cmd,
    node::{
        Family, HookKind, HookOptions, Host, IptablesBackend, KubeProxyMode, Node, NodeSpec,
        agent::AgentConfig, cleanup, topology::addr,
    },
    setup,
};

/// The modes; results are indexed in this order. Each round measures them in another order
/// ([`mode_order`]).
pub const MODES: [HookKind; 3] = [HookKind::Baseline, HookKind::Iptables, HookKind::Ebpf];

/// Every order of the three modes. Round `r` measures workload `w` in `ORDERS[(r + w) % 6]`, so
/// over six rounds each mode is first, second and third twice for every workload, and a drift
/// within a round (a neighbour's build starting, a cache warming) does not always favour the
/// same mode, as the fixed order A B C did.
const ORDERS: [[usize; 3]; 6] = [
    [0, 1, 2],
    [1, 2, 0],
    [2, 0, 1],
    [0, 2, 1],
    [2, 1, 0],
    [1, 0, 2],
];

/// The order of [`MODES`] indices for the `n`-th (round + workload) slot.
pub fn mode_order(n: usize) -> [usize; 3] {
    ORDERS[n % ORDERS.len()]
}

/// Commands the benchmark drives (command → Debian package).
const TOOLS: &[(&str, &str)] = &[
    ("ip", "iproute2"),
    ("iptables", "iptables"),
    ("ip6tables", "iptables"),
    ("iptables-restore", "iptables"),
    ("ip6tables-restore", "iptables"),
    ("ipset", "ipset"),
    ("conntrack", "conntrack"),
    ("bpftool", "bpftool"),
];

/// Sizes, durations and repetitions of one run.
#[derive(Clone, Debug)]
pub struct Config {
    pub quick: bool,
    /// Padding entries of each kind (Services, Subnets, Nodes) per scale step.
    pub scales: Vec<usize>,
    pub rounds: usize,
    /// Traffic that runs before the window opens (connections ramp up, caches warm).
    pub warmup: Duration,
    pub window: Duration,
    /// Client threads of the connection workloads.
    pub conn_threads: usize,
    pub workloads: Vec<Workload>,
    /// Stacked copies of each hook for the amplified phase (`--amplify`); empty: off.
    pub amplify: Vec<usize>,
    /// kube-proxy's mode, the iptables backend, the padding's prefix lengths.
    pub variant: Variant,
}

impl Config {
    /// The quick or full configuration; `KOVN_BENCH_SCALES` (comma-separated entry counts) and
    /// `KOVN_BENCH_ROUNDS` override the scales and the round count, for a targeted rerun.
    fn new(quick: bool) -> Result<Self> {
        let mut config = Self::preset(quick);
        if let Ok(scales) = std::env::var("KOVN_BENCH_SCALES") {
            config.scales = scales
                .split(',')
                .map(|s| s.trim().parse())
                .collect::<Result<_, _>>()
                .context("KOVN_BENCH_SCALES: comma-separated entry counts")?;
        }
        if let Ok(ids) = std::env::var("KOVN_BENCH_WORKLOADS") {
            config.workloads = ids
                .split(',')
                .map(|id| {
                    Workload::EVERY
                        .into_iter()
                        .find(|w| w.id() == id.trim())
                        .with_context(|| format!("KOVN_BENCH_WORKLOADS: unknown workload {id:?}"))
                })
                .collect::<Result<_>>()?;
        }
        if let Ok(rounds) = std::env::var("KOVN_BENCH_ROUNDS") {
            config.rounds = rounds.parse().context("KOVN_BENCH_ROUNDS: a count")?;
        }
        config.variant = variant_from(|name| std::env::var(name).ok())?;
        config.variant.ipv6 = config.workloads.iter().any(|w| w.ipv6());
        ensure!(
            !config.variant.ipv6 || config.scales.iter().all(|&n| n <= state::MAX_IPV6_ENTRIES),
            "IPv6 workloads: at most {} padding entries (the IPv6 Service CIDR is a /112)",
            state::MAX_IPV6_ENTRIES
        );
        ensure!(
            config.rounds >= 1 && !config.scales.is_empty(),
            "nothing to run"
        );
        Ok(config)
    }
}

/// The variant `KOVN_BENCH_KUBE_PROXY` (`ipvs` | `iptables` | `nftables`), `KOVN_BENCH_IPTABLES`
/// (`nft` | `legacy`) and `KOVN_BENCH_PREFIX_LENGTHS` (1–16) ask for; unset: the default.
fn variant_from(env: impl Fn(&str) -> Option<String>) -> Result<Variant> {
    let mut variant = Variant::default();
    if let Some(mode) = env("KOVN_BENCH_KUBE_PROXY") {
        variant.kube_proxy = match mode.trim() {
            "ipvs" => KubeProxyMode::Ipvs,
            "iptables" => KubeProxyMode::Iptables,
            "nftables" => KubeProxyMode::Nftables,
            other => bail!("KOVN_BENCH_KUBE_PROXY: ipvs, iptables or nftables, not {other:?}"),
        };
    }
    if let Some(backend) = env("KOVN_BENCH_IPTABLES") {
        variant.backend = match backend.trim() {
            "nft" => IptablesBackend::System,
            "legacy" => IptablesBackend::Legacy,
            other => bail!("KOVN_BENCH_IPTABLES: nft or legacy, not {other:?}"),
        };
    }
    if let Some(n) = env("KOVN_BENCH_PREFIX_LENGTHS") {
        let n: u8 = n
            .trim()
            .parse()
            .context("KOVN_BENCH_PREFIX_LENGTHS: a count")?;
        ensure!(
            (1..=state::MAX_PREFIX_LENGTHS).contains(&n),
            "KOVN_BENCH_PREFIX_LENGTHS: 1 to {} distinct prefix lengths",
            state::MAX_PREFIX_LENGTHS
        );
        variant.prefix_lengths = n;
    }
    Ok(variant)
}

impl Config {
    fn preset(quick: bool) -> Self {
        if quick {
            Self {
                quick,
                scales: vec![10, 10_000],
                rounds: 5,
                warmup: Duration::from_millis(150),
                window: Duration::from_millis(400),
                conn_threads: 2,
                workloads: Workload::ALL.to_vec(),
                amplify: Vec::new(),
                variant: Variant::default(),
            }
        } else {
            Self {
                quick,
                scales: vec![10, 1_000, 10_000, 100_000],
                rounds: 7,
                warmup: Duration::from_millis(300),
                window: Duration::from_secs(1),
                conn_threads: 2,
                workloads: Workload::ALL.to_vec(),
                amplify: Vec::new(),
                variant: Variant::default(),
            }
        }
    }
}

/// `amplify`: the copy counts of the amplified phase (`--amplify`, see `amplify`); empty: off.
pub fn run(quick: bool, amplify: &[usize], out: &Path) -> Result<()> {
    if !setup::is_root() {
        bail!(
            "cargo xtask bench traffic needs root: it creates network namespaces, ipsets and \
             iptables rules, and runs the agent"
        );
    }
    let started = Instant::now();
    let mut config = Config::new(quick)?;
    setup::ensure_apt_tools(TOOLS)?;
    if config.variant.kube_proxy == KubeProxyMode::Nftables {
        setup::ensure_apt_tools(&[("nft", "nftables")])?;
    }
    if config.variant.backend == IptablesBackend::Legacy {
        setup::ensure_apt_tools(&[
            ("iptables-legacy", "iptables"),
            ("ip6tables-legacy", "iptables"),
            ("iptables-legacy-restore", "iptables"),
            ("ip6tables-legacy-restore", "iptables"),
        ])?;
    }
    // Every iptables command of every node from here on (kube-proxy's, Kube-OVN's, listings).
    config.variant.backend.set();
    cleanup::install_signal_handler();
    cleanup::remove_stale().context("removing what earlier runs left")?;
    if !amplify.is_empty() {
        ensure!(
            amplify.iter().all(|k| (1..=32).contains(k))
                && amplify.iter().any(|k| *k != amplify[0]),
            "--amplify: at least two different copy counts, each 1..=32 (a slope needs two \
             points; the chains stay small)"
        );
        config.amplify = amplify.to_vec();
    }
    let binary = agent_binary()?;
    let mut report = Report::new(&config, &binary);
    eprintln!(
        "traffic: variant {}, scales {:?} × {} rounds × {} workloads × {} modes, {:?} windows \
         (load {:?})",
        config.variant.id(),
        config.scales,
        config.rounds,
        config.workloads.len(),
        MODES.len(),
        config.window,
        cpu::loadavg()
    );
    for &entries in &config.scales {
        let result = scale_step(&config, &binary, entries)
            .with_context(|| format!("scale step with {entries} entries"))?;
        report.scales.push(result);
    }
    report.finish(started.elapsed());
    report.write(out)?;
    Ok(())
}

/// Builds the optimised agent unless `KOVN_BENCH_AGENT` names a binary. The `bench` profile
/// (release settings) is the one the other suites' `cargo bench` runs already built the agent
/// binary with, so after them this is a no-op rather than a second optimised build.
fn agent_binary() -> Result<PathBuf> {
    if let Some(path) = std::env::var_os("KOVN_BENCH_AGENT") {
        return Ok(PathBuf::from(path));
    }
    cmd::cargo(&["build", "--profile", "bench", "--package", "kube-ovn-agent"])
        .context("building kube-ovn-agent (bench profile)")?;
    Ok(cmd::target_dir().join("release").join("kube-ovn-agent"))
}

/// One node of a scale step with its hook and the benchmark's servers.
struct ModeNode {
    kind: HookKind,
    // Field order is drop order: servers (threads, sockets) before the node's namespaces.
    servers: Servers,
    node: Node,
    agent_pid: Option<u32>,
}

impl ModeNode {
    fn target(&self, workload: Workload) -> Target {
        let pods = self.node.ns(Host::Pods);
        let ext = self.node.ns(Host::Ext);
        let to = |ip: IpAddr, port: u16| SocketAddr::new(ip, port);
        let (v4, v6) = (IpAddr::V4, IpAddr::V6);
        match workload {
            Workload::ConnClusterIp | Workload::Bulk | Workload::BulkSegments | Workload::Rr => {
                Target::new(
                    pods,
                    v4(addr::POD_V4),
                    to(v4(state::TCP_CLUSTER_IP), state::TCP_PORT),
                )
            }
            Workload::ConnNodePort => Target::new(
                ext,
                v4(addr::EXT_V4),
                to(v4(addr::NODE_V4), state::TCP_NODE_PORT),
            ),
            // Sources walk away from these: fresh addresses in the pod subnet and the external
            // /24, none of them a real host (replies are not needed).
            Workload::UdpClusterIp => Target::new(
                pods,
                v4(Ipv4Addr::new(10, 16, 1, 1)),
                to(v4(state::UDP_CLUSTER_IP), state::UDP_PORT),
            ),
            Workload::UdpNodePort => Target::new(
                ext,
                v4(Ipv4Addr::new(203, 0, 113, 10)),
                to(v4(addr::NODE_V4), state::UDP_NODE_PORT),
            ),
            Workload::ConnClusterIp6 => Target::new(
                pods,
                v6(addr::POD_V6),
                to(v6(state::TCP_CLUSTER_IP6), state::TCP_PORT),
            ),
            Workload::ConnNodePort6 => Target::new(
                ext,
                v6(addr::EXT_V6),
                to(v6(addr::NODE_V6), state::TCP_NODE_PORT),
            ),
            // The same in the pod /64 and the external /64.
            Workload::UdpClusterIp6 => Target::new(
                pods,
                v6(Ipv6Addr::new(0xfd00, 0x10, 0x16, 0, 0, 0, 1, 1)),
                to(v6(state::UDP_CLUSTER_IP6), state::UDP_PORT),
            ),
            Workload::UdpNodePort6 => Target::new(
                ext,
                v6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 1, 0x10)),
                to(v6(addr::NODE_V6), state::UDP_NODE_PORT),
            ),
        }
    }
}

fn build_node(
    kind: HookKind,
    variant: Variant,
    cluster: &crate::node::Cluster,
    binary: &Path,
    source_max_bytes: Option<usize>,
) -> Result<ModeNode> {
    let mut node = Node::build(NodeSpec {
        cluster: cluster.clone(),
        kube_proxy: variant.kube_proxy,
    })
    .with_context(|| format!("building the {kind} node"))?;
    let mut options = HookOptions::default();
    if kind == HookKind::Ebpf {
        let mut agent = AgentConfig::new(binary.to_owned());
        agent.ready_timeout = Duration::from_mins(5);
        if let Some(bytes) = source_max_bytes {
            agent.extra_args = vec!["--source-max-bytes".into(), bytes.to_string()];
        }
        options.agent = Some(agent);
    }
    // Only IPVS mode has the guard (Kube-OVN installs it when kube-proxy's sets exist).
    if kind == HookKind::Baseline && variant.ipvs() {
        state::neutralise_guard(node.ns(Host::Node))?;
    }
    // Clients close first and hold TIME_WAIT (see `load`): give them room. Tens of thousands
    // of connections per window would otherwise exhaust the default 28 232 ephemeral ports;
    // reuse of a TIME_WAIT port follows the kernel's rules (timestamps, 1 s delay). Ports stay
    // above every Service port.
    for host in [Host::Pods, Host::Ext] {
        node.ns(host).sysctl(&[
            ("net/ipv4/ip_local_port_range", "10000 65535"),
            ("net/ipv4/tcp_tw_reuse", "1"),
        ])?;
    }
    node.install_hook(kind, &options)
        .with_context(|| format!("installing the {kind} hook"))?;
    let agent_pid = node
        .hook_mut()
        .and_then(|h| h.agent_mut())
        .and_then(|agent| agent.pid());
    let servers = Servers::start(node.ns(Host::Pods))?;
    Ok(ModeNode {
        kind,
        servers,
        node,
        agent_pid,
    })
}

fn scale_step(config: &Config, binary: &Path, entries: usize) -> Result<ScaleResult> {
    let setup_started = Instant::now();
    let cluster = state::cluster(entries, config.variant);
    let yaml_bytes = cluster.to_yaml().len();
    // The agent reads the same cluster as a file; past its default limit it is told to accept it.
    let source_max_bytes = (yaml_bytes > state::AGENT_FILE_LIMIT).then_some(yaml_bytes + (1 << 20));
    eprintln!(
        "traffic: {entries} entries: building 3 nodes (agent cluster file {:.1} MiB)",
        mib(yaml_bytes)
    );
    let mut nodes = Vec::new();
    for kind in MODES {
        let t = Instant::now();
        nodes.push(build_node(
            kind,
            config.variant,
            &cluster,
            binary,
            source_max_bytes,
        )?);
        eprintln!(
            "traffic:   {kind} node ready in {:.1} s",
            t.elapsed().as_secs_f64()
        );
    }
    let state_check = check_state(&nodes, &cluster, config.variant, entries)?;
    for node in &nodes {
        let mut paths = vec![Workload::ConnClusterIp, Workload::ConnNodePort];
        if config.variant.ipv6 {
            paths.extend([Workload::ConnClusterIp6, Workload::ConnNodePort6]);
        }
        for &workload in &paths {
            load::check_connection(&node.target(workload))
                .with_context(|| format!("{} node, {}", node.kind, workload.id()))?;
        }
    }
    let setup_s = setup_started.elapsed().as_secs_f64();
    let mut result = ScaleResult::new(entries, yaml_bytes, setup_s, state_check);
    let cores = thread::available_parallelism().map_or(1, usize::from);
    for round in 0..config.rounds {
        let t = Instant::now();
        for (w, &workload) in config.workloads.iter().enumerate() {
            for m in mode_order(round + w) {
                let node = &mut nodes[m];
                let sample = measure(config, node, workload, cores)
                    .with_context(|| format!("{} node, {}", node.kind, workload.id()))?;
                result.push(workload, m, sample);
            }
        }
        eprintln!(
            "traffic:   round {}/{} done in {:.1} s (load {:.2})",
            round + 1,
            config.rounds,
            t.elapsed().as_secs_f64(),
            cpu::loadavg()[0]
        );
    }
    result.evidence = hook_evidence(&mut nodes, config.variant)?;
    if !config.amplify.is_empty() {
        eprintln!("traffic:   amplified phase, k = {:?}", config.amplify);
        result.amplified = Some(amplify::run(config, &mut nodes).context("amplified phase")?);
    }
    Ok(result)
}

fn mib(bytes: usize) -> f64 {
    #[expect(clippy::cast_precision_loss, reason = "display only")]
    let b = bytes as f64;
    b / f64::from(1u32 << 20)
}

/// The state each node really holds: Kube-OVN's and kube-proxy's set sizes in every node, and
/// the agent's map sizes in the ebpf node. They must agree with the cluster, or the comparison
/// would be between different states. The variant is checked as well — the prefix lengths in
/// `ovn40subnets`, kube-proxy's rules or map elements per Service, and which iptables backend
/// holds the node's tables — so a variant that silently fell back to the default fails here.
fn check_state(
    nodes: &[ModeNode],
    cluster: &crate::node::Cluster,
    variant: Variant,
    entries: usize,
) -> Result<serde_json::Value> {
    let ovn = cluster.ovn_sets(Family::V4);
    let kube = cluster.kube_proxy_sets(Family::V4);
    let mut want = vec![
        ("ovn40subnets", ovn.subnets.len()),
        ("ovn40other-node", ovn.other_node.len()),
    ];
    if variant.ipvs() {
        want.push(("KUBE-CLUSTER-IP", kube.cluster_ip.len()));
    }
    let (ovn6, kube6) = (
        cluster.ovn_sets(Family::V6),
        cluster.kube_proxy_sets(Family::V6),
    );
    if variant.ipv6 {
        want.push(("ovn60subnets", ovn6.subnets.len()));
        want.push(("ovn60other-node", ovn6.other_node.len()));
        if variant.ipvs() {
            want.push(("KUBE-6-CLUSTER-IP", kube6.cluster_ip.len()));
        }
    }
    let lengths: std::collections::BTreeSet<u8> = ovn.subnets.iter().map(|c| c.len).collect();
    ensure!(
        lengths.len() >= usize::from(variant.prefix_lengths),
        "the cluster's subnets have {} prefix lengths, the variant asks for {}",
        lengths.len(),
        variant.prefix_lengths
    );
    let mut json = serde_json::Map::new();
    for node in nodes {
        let ns = node.node.ns(Host::Node);
        let mut sets = serde_json::Map::new();
        for &(set, expected) in &want {
            let have = state::ipset_entries(ns, set)?;
            ensure!(
                have == expected,
                "{} node: ipset {set} holds {have} entries, the cluster says {expected}",
                node.kind
            );
            sets.insert(set.into(), have.into());
        }
        let have = state::ipset_prefix_lengths(ns, "ovn40subnets")?;
        ensure!(
            have == lengths,
            "{} node: ovn40subnets holds the prefix lengths {have:?}, the cluster has {lengths:?}",
            node.kind
        );
        sets.insert("ovn40subnets_prefix_lengths".into(), have.len().into());
        json.insert(format!("{}_ipsets", node.kind), sets.into());
        let services = state::kube_proxy_services(ns, variant.kube_proxy)?;
        if !variant.ipvs() {
            // Every Service with an endpoint (the padding's included) has its rule or element.
            ensure!(
                services >= entries + 2,
                "{} node: kube-proxy ({}) lists {services} Service ports, expected at least {}",
                node.kind,
                variant.kube_proxy.flag(),
                entries + 2
            );
        }
        json.insert(
            format!("{}_kube_proxy_service_ports", node.kind),
            services.into(),
        );
        let tables = state::iptables_tables(ns)?;
        state::check_backend(&tables, variant.backend)
            .with_context(|| format!("{} node", node.kind))?;
        json.insert(format!("{}_iptables_tables", node.kind), tables.json());
    }
    let ebpf = nodes
        .iter()
        .find(|n| n.kind == HookKind::Ebpf)
        .context("no ebpf node")?;
    let bpffs = ebpf_bpffs(ebpf)?;
    let mut maps = serde_json::Map::new();
    // Maps hold the fixture's entries too; the padding must be all there. Local addresses (IPVS
    // mode): every ClusterIP is on kube-ipvs0. Without kube-proxy's sets (iptables, nftables
    // modes) Kube-OVN installs R1b alone, which matches Services by CIDR: the port, other-node
    // and local maps are not consulted there and only recorded.
    let ipvs_only = |n: usize| if variant.ipvs() { n } else { 0 };
    let mut want_maps = vec![
        (names::SERVICE_PORTS_V4, ipvs_only(kube.cluster_ip.len())),
        (names::SUBNETS_V4, ovn.subnets.len()),
        (names::OTHER_NODES_V4, ipvs_only(ovn.other_node.len())),
        (names::LOCAL_ADDRS_V4, ipvs_only(entries)),
    ];
    if variant.ipv6 {
        want_maps.extend([
            (names::SERVICE_PORTS_V6, ipvs_only(kube6.cluster_ip.len())),
            (names::SUBNETS_V6, ovn6.subnets.len()),
            (names::OTHER_NODES_V6, ipvs_only(ovn6.other_node.len())),
            (names::LOCAL_ADDRS_V6, ipvs_only(entries)),
        ]);
    }
    for (map, at_least) in want_maps {
        let have = state::map_entries(&bpffs, map)?;
        ensure!(
            have >= at_least,
            "ebpf node: map {map} holds {have} entries, expected at least {at_least}"
        );
        maps.insert(map.into(), have.into());
    }
    json.insert("ebpf_maps".into(), maps.into());
    Ok(json.into())
}

fn ebpf_bpffs(node: &ModeNode) -> Result<PathBuf> {
    node.node
        .hook()
        .and_then(crate::node::Hook::agent)
        .map(|a| a.bpffs().to_owned())
        .context("the ebpf node has no agent")
}

/// Runs one window of `workload` on `node`.
fn measure(
    config: &Config,
    node: &mut ModeNode,
    workload: Workload,
    cores: usize,
) -> Result<Sample> {
    flush_conntrack(&node.node)?;
    let segments = if workload == Workload::BulkSegments {
        Some(SegmentsOnly::set(node.node.ns(Host::Pods))?)
    } else {
        None
    };
    let meter = cpu::Meter::new(node.agent_pid);
    let target = node.target(workload);
    let deadline = Instant::now() + config.warmup + config.window + Duration::from_secs(5);
    let load = match workload {
        Workload::ConnClusterIp
        | Workload::ConnNodePort
        | Workload::ConnClusterIp6
        | Workload::ConnNodePort6 => Load::Connections {
            threads: config.conn_threads,
        },
        Workload::UdpClusterIp
        | Workload::UdpNodePort
        | Workload::UdpClusterIp6
        | Workload::UdpNodePort6 => Load::NewFlows,
        Workload::Bulk | Workload::BulkSegments => Load::Bulk,
        Workload::Rr => Load::RequestResponse,
    };
    // New flows each leave a conntrack entry until the next flush; the node's table holds
    // 262 144 (nf_conntrack_max), and a full table would drop packets and skew the window.
    // Everything else: far above what a window reaches here; only a runaway generator meets it.
    let max_ops = match load {
        Load::NewFlows => NEW_FLOWS_CAP,
        _ => 50_000_000,
    };
    let generator = Generator::start(load, &target, deadline, max_ops)?;
    thread::sleep(config.warmup);
    let counters = &generator.counters;
    let server = &node.servers.counters;
    let ovn0 = || ovn0_rx_packets(&node.node);
    let (ok0, failed0) = (
        counters.ok.load(Ordering::Relaxed),
        counters.failed.load(Ordering::Relaxed),
    );
    let (bytes0, udp0, packets0) = (
        server.bulk_bytes.load(Ordering::Relaxed),
        server.udp_packets.load(Ordering::Relaxed),
        ovn0()?,
    );
    let cpu0 = meter.snapshot();
    counters.measuring.store(true, Ordering::Relaxed);
    thread::sleep(config.window);
    counters.measuring.store(false, Ordering::Relaxed);
    let cpu1 = meter.snapshot();
    let (ok1, failed1) = (
        counters.ok.load(Ordering::Relaxed),
        counters.failed.load(Ordering::Relaxed),
    );
    let (bytes1, udp1, packets1) = (
        server.bulk_bytes.load(Ordering::Relaxed),
        server.udp_packets.load(Ordering::Relaxed),
        ovn0()?,
    );
    let first_error = counters
        .first_error
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .clone();
    let (mut failed1, mut first_error) = (failed1, first_error);
    if load_is_capped(&generator, max_ops) {
        failed1 += 1;
        first_error.get_or_insert_with(|| {
            format!(
                "the sender reached its {max_ops}-packet cap before the window closed: the rate \
                 is understated; shorten the window"
            )
        });
    }
    let latencies = generator.finish()?;
    drop(segments);
    let usage = cpu::Meter::usage(&cpu0, &cpu1);
    let sample = Sample::from_window(
        workload,
        &report::Window {
            usage,
            ops: ok1 - ok0,
            failed: failed1 - failed0,
            delivered: udp1 - udp0,
            bytes: bytes1 - bytes0,
            ovn0_packets: packets1 - packets0,
            latencies,
            first_error,
            cores,
        },
    );
    if let Some(hook) = node.node.hook_mut() {
        hook.check()
            .with_context(|| format!("{} hook stopped working", node.kind))?;
    }
    Ok(sample)
}

/// Most new flows one window may create (see `measure`).
const NEW_FLOWS_CAP: u64 = 240_000;

fn load_is_capped(generator: &Generator, max_ops: u64) -> bool {
    let c = &generator.counters;
    c.ok.load(Ordering::Relaxed) + c.failed.load(Ordering::Relaxed) >= max_ops
}

/// While alive, TCP from the pods namespace leaves as one MSS per packet: the client link's
/// `gso_max_segs` is 1 (TCP sizes its segments by it at connect time), so nothing is coalesced
/// before the node's TC program sees it. Restored on drop.
struct SegmentsOnly<'a> {
    pods: &'a crate::node::netns::NetNs,
    previous: String,
}

/// The pods namespace's end of the `ovn0` veth pair (see `node::topology`).
const POD_LINK: &str = "ovn-lr";

impl<'a> SegmentsOnly<'a> {
    fn set(pods: &'a crate::node::netns::NetNs) -> Result<Self> {
        let details = pods.run("ip", &["-d", "link", "show", "dev", POD_LINK])?;
        let previous = details
            .split_whitespace()
            .skip_while(|w| *w != "gso_max_segs")
            .nth(1)
            .context("no gso_max_segs in `ip -d link show`")?
            .to_owned();
        pods.run("ip", &["link", "set", "dev", POD_LINK, "gso_max_segs", "1"])?;
        Ok(Self { pods, previous })
    }
}

impl Drop for SegmentsOnly<'_> {
    fn drop(&mut self) {
        if let Err(e) = self.pods.run(
            "ip",
            &[
                "link",
                "set",
                "dev",
                POD_LINK,
                "gso_max_segs",
                &self.previous,
            ],
        ) {
            eprintln!("traffic: restoring gso_max_segs on {POD_LINK}: {e:#}");
        }
    }
}

/// Empties the node's conntrack table so every window starts alike: a window's connections and
/// flows must be new to conntrack, and earlier windows' entries would otherwise fill the table.
fn flush_conntrack(node: &Node) -> Result<()> {
    let out = node
        .ns(Host::Node)
        .output("conntrack", &["-F"], Duration::from_secs(20))?;
    ensure!(
        out.status.success(),
        "conntrack -F: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(())
}

/// Packets received on the node's `ovn0` (`/proc/net/dev`): every packet of the pod-side
/// workloads crosses it, in both directions, and meets the TC program there.
fn ovn0_rx_packets(node: &Node) -> Result<u64> {
    node.ns(Host::Node).enter(|| -> Result<u64> {
        let dev = std::fs::read_to_string("/proc/thread-self/net/dev")?;
        dev.lines()
            .find_map(|l| {
                let (name, rest) = l.split_once(':')?;
                (name.trim() == "ovn0")
                    .then(|| rest.split_whitespace().nth(1)?.parse().ok())
                    .flatten()
            })
            .context("no ovn0 in /proc/net/dev")
    })?
}

/// What each hook says it did during the run: the packet counters of Kube-OVN's nat rules, and
/// the agent's per-rule counters. Proof that the hook under test really classified the traffic.
fn hook_evidence(nodes: &mut [ModeNode], variant: Variant) -> Result<serde_json::Value> {
    let mut json = serde_json::Map::new();
    for node in nodes {
        match node.kind {
            HookKind::Iptables => {
                for family in Family::ALL {
                    if family == Family::V6 && !variant.ipv6 {
                        continue;
                    }
                    let listing = node.node.ns(Host::Node).run(
                        family.iptables(),
                        &["-t", "nat", "-L", "OVN-PREROUTING", "-n", "-v", "-x"],
                    )?;
                    let rules: Vec<serde_json::Value> = listing
                        .lines()
                        .skip(2)
                        .filter_map(|l| {
                            let mut f = l.split_whitespace();
                            let packets: u64 = f.next()?.parse().ok()?;
                            Some(serde_json::json!({ "packets": packets, "rule": l.trim() }))
                        })
                        .collect();
                    // A hook that saw nothing was not in the path (another nat chain ran
                    // first): every workload opens at least one connection through a rule of
                    // this chain, and every node serves a connection of each family first.
                    let seen: u64 = rules.iter().filter_map(|r| r["packets"].as_u64()).sum();
                    ensure!(
                        seen > 0,
                        "iptables node: no rule of {family} OVN-PREROUTING matched a packet \
                         during the run"
                    );
                    let key = match family {
                        Family::V4 => "iptables_ovn_prerouting",
                        Family::V6 => "ip6tables_ovn_prerouting",
                    };
                    json.insert(key.into(), rules.into());
                }
            }
            HookKind::Ebpf => {
                let agent = node
                    .node
                    .hook_mut()
                    .and_then(|h| h.agent_mut())
                    .context("the ebpf node has no agent")?;
                let status = agent.status()?;
                json.insert(
                    "ebpf_counters".into(),
                    serde_json::to_value(&status.counters)?,
                );
            }
            HookKind::Baseline => {}
        }
    }
    Ok(json.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn variant(vars: &[(&str, &str)]) -> Result<Variant> {
        variant_from(|name| {
            vars.iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| (*v).to_owned())
        })
    }

    #[test]
    fn the_variant_comes_from_the_environment() {
        assert_eq!(variant(&[]).unwrap(), Variant::default());
        let v = variant(&[
            ("KOVN_BENCH_KUBE_PROXY", "nftables"),
            ("KOVN_BENCH_IPTABLES", "legacy"),
            ("KOVN_BENCH_PREFIX_LENGTHS", "16"),
        ])
        .unwrap();
        assert_eq!(v.kube_proxy, KubeProxyMode::Nftables);
        assert_eq!(v.backend, IptablesBackend::Legacy);
        assert_eq!(v.prefix_lengths, 16);
        assert_eq!(v.id(), "kp-nftables+legacy+prefixes-16");
        for bad in [
            ("KOVN_BENCH_KUBE_PROXY", "userspace"),
            ("KOVN_BENCH_IPTABLES", "xtables"),
            ("KOVN_BENCH_PREFIX_LENGTHS", "0"),
            ("KOVN_BENCH_PREFIX_LENGTHS", "17"),
        ] {
            assert!(variant(&[bad]).is_err(), "{bad:?} accepted");
        }
    }
}
