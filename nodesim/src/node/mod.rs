//! A Kube-OVN node simulated in private network namespaces, for the end-to-end suite, the
//! benchmarks and the demo: [`Node::build`] wires the topology (`topology`), kube-proxy
//! (`kube_proxy`, IPVS, iptables or nftables mode), Kube-OVN's ipsets and the rules that consume
//! its marks (`kube_ovn`), and backends that report the source address they saw (`traffic`); then
//! [`Node::install_hook`] adds one implementation of the PREROUTING hook under test
//! (`hook`: none, Kube-OVN's iptables rules, or the eBPF agent).
//!
//! Nothing is created in the root network namespace. Every namespace, mount and process is
//! removed on drop, on panic and on Ctrl-C (`cleanup`).

pub mod agent;
pub mod bpf;
pub mod cleanup;
pub mod cluster;
pub mod hook;
pub mod kube_ovn;
pub mod kube_proxy;
pub mod topology;
pub mod traffic;

pub use kube_ovn_testkit::{exec, netns};

use std::{
    fmt,
    net::IpAddr,
    sync::atomic::{AtomicBool, Ordering},
    time::Duration,
};

use anyhow::{Context as _, Result, ensure};

pub use self::{
    cluster::Cluster,
    hook::{Hook, HookKind, HookOptions},
    traffic::{Outcome, Probe},
};
use self::{netns::NetNs, topology::Namespaces, traffic::Backends};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    pub const ALL: [Family; 2] = [Family::V4, Family::V6];

    pub fn of(addr: IpAddr) -> Self {
        if addr.is_ipv4() { Self::V4 } else { Self::V6 }
    }

    pub fn bits(self) -> u8 {
        match self {
            Self::V4 => 32,
            Self::V6 => 128,
        }
    }

    /// The iptables command of this family in the process's backend ([`IptablesBackend`]).
    pub fn iptables(self) -> &'static str {
        match (self, IptablesBackend::current()) {
            (Self::V4, IptablesBackend::System) => "iptables",
            (Self::V6, IptablesBackend::System) => "ip6tables",
            (Self::V4, IptablesBackend::Legacy) => "iptables-legacy",
            (Self::V6, IptablesBackend::Legacy) => "ip6tables-legacy",
        }
    }

    pub fn iptables_restore(self) -> &'static str {
        match (self, IptablesBackend::current()) {
            (Self::V4, IptablesBackend::System) => "iptables-restore",
            (Self::V6, IptablesBackend::System) => "ip6tables-restore",
            (Self::V4, IptablesBackend::Legacy) => "iptables-legacy-restore",
            (Self::V6, IptablesBackend::Legacy) => "ip6tables-legacy-restore",
        }
    }

    /// Kube-OVN's set name for this family: `ovn40<id>` / `ovn60<id>`.
    pub fn ovn_set(self, id: &str) -> String {
        match self {
            Self::V4 => format!("ovn40{id}"),
            Self::V6 => format!("ovn60{id}"),
        }
    }

    /// kube-proxy's set name for this family: `KUBE-<id>` / `KUBE-6-<id>`.
    pub fn kube_set(self, id: &str) -> String {
        match self {
            Self::V4 => format!("KUBE-{id}"),
            Self::V6 => format!("KUBE-6-{id}"),
        }
    }

    pub fn ipset_family(self) -> &'static str {
        match self {
            Self::V4 => "inet",
            Self::V6 => "inet6",
        }
    }

    /// Kube-OVN's `spec.protocol` value.
    pub fn kube_ovn_protocol(self) -> &'static str {
        match self {
            Self::V4 => "IPv4",
            Self::V6 => "IPv6",
        }
    }

    /// Kubernetes' `spec.ipFamilies` value.
    pub fn kube_ip_family(self) -> &'static str {
        self.kube_ovn_protocol()
    }

    /// `addr/len` of a single host.
    pub fn host(addr: IpAddr) -> String {
        format!("{addr}/{}", Self::of(addr).bits())
    }
}

impl fmt::Display for Family {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.kube_ovn_protocol())
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum L4 {
    Tcp,
    Udp,
}

impl L4 {
    pub fn name(self) -> &'static str {
        match self {
            Self::Tcp => "tcp",
            Self::Udp => "udp",
        }
    }

    pub fn kube_name(self) -> &'static str {
        match self {
            Self::Tcp => "TCP",
            Self::Udp => "UDP",
        }
    }
}

/// The namespaces of a simulated node (see `topology`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Host {
    /// The Kube-OVN node: `ovn0`, `eth0`, netfilter, the hook under test.
    Node,
    /// The OVN router and every pod address (clients and backends).
    Pods,
    /// The switch/router between nodes and the outside.
    Lan,
    /// An external client (`203.0.113.7`, `2001:db8::7`).
    Ext,
    /// Another cluster node (`192.168.0.12`, `fd00::12`), also running the apiserver.
    Other,
}

/// kube-proxy's mode: spec mode A (IPVS) or B (iptables; nftables is B too for Kube-OVN: it
/// creates no `KUBE-*` ipsets either).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum KubeProxyMode {
    Ipvs,
    Iptables,
    Nftables,
}

impl KubeProxyMode {
    /// The agent's `--kube-proxy-mode` value.
    pub fn flag(self) -> &'static str {
        match self {
            Self::Ipvs => "ipvs",
            Self::Iptables => "iptables",
            Self::Nftables => "nftables",
        }
    }
}

impl fmt::Display for KubeProxyMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Ipvs => "kube-proxy IPVS mode (spec mode A)",
            Self::Iptables => "kube-proxy iptables mode (spec mode B)",
            Self::Nftables => "kube-proxy nftables mode (spec mode B)",
        })
    }
}

/// Which iptables the node's rules go through — kube-proxy's, Kube-OVN's and every listing —
/// as on a real node, where all of them use one backend. Process-wide: a benchmark run measures
/// one backend ([`IptablesBackend::set`] before any node is built).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum IptablesBackend {
    /// The commands named `iptables`, `ip6tables`, … (iptables-nft on Debian 12).
    System,
    /// `iptables-legacy`, `ip6tables-legacy`, …: `x_tables`, rules walked linearly in the kernel.
    Legacy,
}

static LEGACY_IPTABLES: AtomicBool = AtomicBool::new(false);

impl IptablesBackend {
    pub fn current() -> Self {
        if LEGACY_IPTABLES.load(Ordering::Relaxed) {
            Self::Legacy
        } else {
            Self::System
        }
    }

    pub fn set(self) {
        LEGACY_IPTABLES.store(self == Self::Legacy, Ordering::Relaxed);
    }
}

#[derive(Clone, Debug)]
pub struct NodeSpec {
    pub cluster: Cluster,
    pub kube_proxy: KubeProxyMode,
}

pub struct Node {
    pub spec: NodeSpec,
    // Field order is drop order: the hook (agent process) goes first, then the backends' threads,
    // then the namespaces.
    hook: Option<Hook>,
    _backends: Vec<Backends>,
    ns: Namespaces,
}

impl Node {
    /// Builds the node with everything but the PREROUTING hook.
    pub fn build(spec: NodeSpec) -> Result<Self> {
        Self::build_with(spec, true)
    }

    /// Builds the node without any of Kube-OVN's state (sets, consumers), for a caller that
    /// runs Kube-OVN's own code on it (`e2e --kube-ovn`).
    pub fn build_without_kube_ovn(spec: NodeSpec) -> Result<Self> {
        Self::build_with(spec, false)
    }

    fn build_with(spec: NodeSpec, kube_ovn_transcription: bool) -> Result<Self> {
        let stem = cleanup::unique_stem();
        let ns = topology::build(&stem).context("building the namespaces")?;
        kube_proxy::install(&ns.node, &spec.cluster, spec.kube_proxy)
            .context("installing the kube-proxy emulation")?;
        if kube_ovn_transcription {
            kube_ovn::install_ipsets(&ns.node, &spec.cluster)
                .context("creating Kube-OVN's ipsets")?;
            kube_ovn::install_consumers(&ns.node, &spec.cluster)
                .context("installing Kube-OVN's mark consumers")?;
        }
        let mut backends = Vec::new();
        for host in [Host::Pods, Host::Other] {
            let (tcp, udp) = listeners(&spec.cluster, host);
            backends.push(Backends::start(ns.get(host), &tcp, &udp)?);
        }
        topology::wait_links_up(&ns)?;
        Ok(Self {
            spec,
            hook: None,
            _backends: backends,
            ns,
        })
    }

    /// Installs the PREROUTING implementation under test. One per node.
    pub fn install_hook(&mut self, kind: HookKind, options: &HookOptions) -> Result<()> {
        ensure!(self.hook.is_none(), "the node already has a hook");
        self.hook = Some(Hook::install(kind, &self.ns.node, &self.spec, options)?);
        Ok(())
    }

    /// For fault injection (kill the agent, upgrade, detach).
    pub fn hook_mut(&mut self) -> Option<&mut Hook> {
        self.hook.as_mut()
    }

    /// The installed hook, to read from (the agent's pid and pins).
    pub fn hook(&self) -> Option<&Hook> {
        self.hook.as_ref()
    }

    pub fn ns(&self, host: Host) -> &NetNs {
        self.ns.get(host)
    }

    /// Opens one connection (or sends one datagram) as `probe` describes and reports what the
    /// receiver saw.
    pub fn probe(&self, probe: &Probe, timeout: Duration) -> Result<Outcome> {
        Ok(self
            .ns(probe.from)
            .enter(|| traffic::probe(probe, timeout))?)
    }

    /// Deletes `ovn0` (and the OVN router's end of it): fault injection.
    pub fn delete_ovn0(&self) -> Result<()> {
        topology::delete_ovn0(&self.ns)
    }

    /// Re-creates `ovn0` with its addresses and routes, as kube-ovn-cni does after a deletion;
    /// returns once the links exist (they may not report carrier yet).
    pub fn recreate_ovn0(&self) -> Result<()> {
        topology::recreate_ovn0(&self.ns)
    }

    /// Whether the re-created `ovn0` carries traffic yet (both ends operationally UP).
    pub fn ovn0_up(&self) -> Result<bool> {
        topology::ovn0_up(&self.ns)
    }

    /// Conntrack entries in the node namespace. Zero after traffic means connection tracking is
    /// off there and every nat rule silently matches nothing (design §5).
    pub fn conntrack_entries(&self) -> Result<usize> {
        self.ns.node.enter(|| {
            std::fs::read_to_string("/proc/thread-self/net/nf_conntrack")
                .map(|s| s.lines().count())
                .context("reading /proc/net/nf_conntrack in the node namespace")
        })?
    }

    /// Kernel counter of locally created fragments on `host` (`FragCreates`), to prove a probe
    /// really left as fragments.
    pub fn frag_creates(&self, host: Host, family: Family) -> Result<u64> {
        self.ns(host).enter(move || traffic::frag_creates(family))?
    }
}

/// Where a Service endpoint lives: the other node's addresses are host-network endpoints there
/// (the apiserver); everything else is a pod.
fn endpoint_host(addr: IpAddr) -> Host {
    if addr == IpAddr::from(topology::addr::OTHER_V4)
        || addr == IpAddr::from(topology::addr::OTHER_V6)
    {
        Host::Other
    } else {
        Host::Pods
    }
}

/// The TCP ports and UDP addresses `host`'s backends serve: every endpoint of every Service.
fn listeners(cluster: &Cluster, host: Host) -> (Vec<u16>, Vec<std::net::SocketAddr>) {
    let mut tcp = Vec::new();
    let mut udp = Vec::new();
    for service in cluster.services.iter().filter(|s| !s.own_backend) {
        for endpoint in service
            .endpoints
            .iter()
            .filter(|a| endpoint_host(**a) == host)
        {
            for port in &service.ports {
                match port.proto {
                    L4::Tcp => tcp.push(port.target_port),
                    L4::Udp => udp.push(std::net::SocketAddr::new(*endpoint, port.target_port)),
                }
            }
        }
    }
    tcp.sort_unstable();
    tcp.dedup();
    udp.sort_unstable();
    udp.dedup();
    (tcp, udp)
}
