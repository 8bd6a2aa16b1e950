//! `kube-ovn-agent probe`: a bounded traffic generator that gives `verify` something to compare
//! on a node where no traffic hits Kube-OVN's rules. Run it in an ordinary pod on the node (not
//! hostNetwork): its packets then enter the node through `ovn0`, as every pod's do, and pass the
//! datapath on ovn0's TC ingress and Kube-OVN's nat `OVN-PREROUTING` alike.
//!
//! It sends TCP connection attempts (a SYN; a connection that opens is closed at once) and
//! single UDP datagrams, round-robin over a list of targets, at most `rate` per second, for at
//! most `duration` and `count` probes. The targets are given, or chosen from the cluster's
//! Services, Nodes and Subnets ([`select`]) so that every rule a pod's traffic can reach gets
//! hits, next to near-misses that must hit nothing:
//!
//! | kind | target | Kube-OVN marks it by (docs/spec.md §1.2) |
//! |---|---|---|
//! | `cluster-ip` | a Service's ClusterIP and port | R1a (IPVS kube-proxy) or R1b |
//! | `cluster-ip-other-port` | a ClusterIP on a port the Service does not have | R1b only |
//! | `outside-service-cidr` | the address just past the Service CIDR | nothing |
//! | `node-port` | an `externalTrafficPolicy: Local` NodePort on this node's InternalIP | R2t / R2u |
//! | `join-ip-node-port` | the same on this node's join address (ovn0's) | R2t / R2u |
//! | `cluster-policy-node-port` | an `externalTrafficPolicy: Cluster` NodePort on this node | nothing |
//! | `node-ip-other-port` | this node's InternalIP on a port no Service uses | nothing |
//! | `other-node-node-port` | a Local NodePort on another node's InternalIP | nothing here |
//! | `other-subnet` | the first address of each default-VPC subnet | nothing |
//!
//! R3t and R3u cannot be reached from a pod on the node: they match a *source* among the other
//! nodes' InternalIPs, and a pod's packets carry the pod's own address (OVN's port security
//! drops any other). A probe on another node whose subnet masquerades to its node's address
//! (`natOutgoing`) reaches them *there*, with its `other-node-node-port` targets. Traffic that
//! arrives from outside on the NodePort interfaces (eth0, `br-*`) is out of a pod's reach too:
//! the probe exercises R2 through ovn0 only.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::{self, Write as _},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::Path,
    str::FromStr,
    sync::Arc,
    time::{Duration, Instant},
};

use ipnet::IpNet;
use k8s_openapi::api::{
    core::v1::{Node, Service},
    networking::v1::ServiceCIDR,
};
use kube_ovn_ebpf_common::rule;
use serde::Serialize;
use tokio::task::JoinSet;

use crate::{
    cluster::{IP_ADDRESS_ANNOTATION, KUBE_PROXY_SERVICE_SELECTOR, Snapshot, Subnet},
    source::file::parse_objects,
    state::{MapState, Proto},
    translate::{self, KubeProxySets, NodeFacts, ServiceMatch, own_internal_ips},
};

/// The most targets [`select`] returns.
pub const MAX_TARGETS: u16 = 64;
/// The highest rate `probe` accepts, in probes per second.
pub const MAX_RATE: u32 = 200;
/// The longest `probe` runs.
pub const MAX_DURATION: Duration = Duration::from_mins(10);
/// At most this many probes are in flight (TCP attempts waiting for their answer).
const MAX_IN_FLIGHT: usize = 256;
/// What every UDP datagram carries, so a capture tells the probe's traffic apart.
const PAYLOAD: &[u8] = b"kube-ovn-ebpf probe";

#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("reading {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    File(#[from] crate::source::file::FileError),
    #[error("no Kubernetes API: {0}")]
    Api(String),
    #[error("listing {what}: {message}")]
    List { what: &'static str, message: String },
    #[error("node {0:?} is not in the cluster's Nodes")]
    NoNode(String),
    #[error(
        "nothing to probe for node {0:?}: no Service gives a target (or Kube-OVN programs no \
         address family there)"
    )]
    NoTargets(String),
    #[error("waiting for signals: {0}")]
    Signals(std::io::Error),
}

/// The L4 protocols the probe sends.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum L4 {
    Tcp,
    Udp,
}

impl fmt::Display for L4 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Tcp => "tcp",
            Self::Udp => "udp",
        })
    }
}

/// Why a target is in the mix: what Kube-OVN's rules do with it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum TargetKind {
    ClusterIp,
    ClusterIpOtherPort,
    OutsideServiceCidr,
    NodePort,
    JoinIpNodePort,
    ClusterPolicyNodePort,
    NodeIpOtherPort,
    OtherNodeNodePort,
    OtherSubnet,
    /// Given on the command line without a kind.
    Given,
}

impl TargetKind {
    const ALL: [Self; 10] = [
        Self::ClusterIp,
        Self::ClusterIpOtherPort,
        Self::OutsideServiceCidr,
        Self::NodePort,
        Self::JoinIpNodePort,
        Self::ClusterPolicyNodePort,
        Self::NodeIpOtherPort,
        Self::OtherNodeNodePort,
        Self::OtherSubnet,
        Self::Given,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Self::ClusterIp => "cluster-ip",
            Self::ClusterIpOtherPort => "cluster-ip-other-port",
            Self::OutsideServiceCidr => "outside-service-cidr",
            Self::NodePort => "node-port",
            Self::JoinIpNodePort => "join-ip-node-port",
            Self::ClusterPolicyNodePort => "cluster-policy-node-port",
            Self::NodeIpOtherPort => "node-ip-other-port",
            Self::OtherNodeNodePort => "other-node-node-port",
            Self::OtherSubnet => "other-subnet",
            Self::Given => "given",
        }
    }

    /// The rules (`rule::bit` mask) Kube-OVN marks such a packet from a pod of this node by;
    /// for `cluster-ip` one of R1a and R1b, whichever kube-proxy's mode gives.
    pub fn expects(self, l4: L4) -> u32 {
        let nodeport = match l4 {
            L4::Tcp => rule::bit(rule::R2T),
            L4::Udp => rule::bit(rule::R2U),
        };
        match self {
            Self::ClusterIp => rule::bit(rule::R1A) | rule::bit(rule::R1B),
            Self::ClusterIpOtherPort => rule::bit(rule::R1B),
            Self::NodePort | Self::JoinIpNodePort => nodeport,
            _ => 0,
        }
    }
}

/// One destination: `PROTO/ADDRESS:PORT[/KIND]` on the command line.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Target {
    pub l4: L4,
    pub addr: SocketAddr,
    pub kind: TargetKind,
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.l4, self.addr)?;
        if self.kind != TargetKind::Given {
            write!(f, "/{}", self.kind.name())?;
        }
        Ok(())
    }
}

impl FromStr for Target {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, String> {
        let mut parts = text.split('/');
        let (Some(l4), Some(addr)) = (parts.next(), parts.next()) else {
            return Err(format!("{text:?}: expected PROTO/ADDRESS:PORT[/KIND]"));
        };
        let l4 = match l4 {
            "tcp" => L4::Tcp,
            "udp" => L4::Udp,
            other => return Err(format!("{text:?}: protocol {other:?} is not tcp or udp")),
        };
        let addr: SocketAddr = addr.parse().map_err(|_| {
            format!("{text:?}: {addr:?} is not ADDRESS:PORT (an IPv6 address in brackets)")
        })?;
        if addr.port() == 0 {
            return Err(format!("{text:?}: port 0"));
        }
        let kind = match parts.next() {
            None => TargetKind::Given,
            Some(name) => TargetKind::ALL
                .into_iter()
                .find(|k| k.name() == name)
                .ok_or_else(|| format!("{text:?}: unknown kind {name:?}"))?,
        };
        if parts.next().is_some() {
            return Err(format!("{text:?}: expected PROTO/ADDRESS:PORT[/KIND]"));
        }
        Ok(Self { l4, addr, kind })
    }
}

/// What [`select`] chooses from.
#[derive(Clone, Debug)]
pub struct SelectOptions {
    /// The node the probe runs on.
    pub node_name: String,
    /// Kube-OVN's `--cluster-router` (the default VPC).
    pub cluster_router: String,
    /// Kube-OVN's `--service-cluster-ip-range`, unless ready ServiceCIDR objects exist.
    pub service_cluster_ip_range: Vec<IpNet>,
    pub max_targets: usize,
}

/// The probe mix for a pod on `options.node_name`: one target of each kind in turn (see the
/// module's table) until `max_targets`, so a small cap still gets every kind. The sets are
/// the ones the agent's own translation gives, so a target is what the datapath and Kube-OVN
/// hold, not a guess.
pub fn select(snapshot: &Snapshot, options: &SelectOptions) -> Result<Vec<Target>, ProbeError> {
    let facts = Facts::new(snapshot, options)?;
    let mut targets = interleave(&[
        facts.cluster_ips(),
        facts.cluster_ip_other_ports(),
        facts.outside_service_cidrs(),
        facts.node_ports(TargetKind::NodePort, &facts.own_ips),
        first_per_l4(&facts.node_ports(TargetKind::JoinIpNodePort, &facts.join_ips)),
        first_per_l4(&facts.cluster_policy_node_ports()),
        facts.node_ip_other_ports(),
        facts.other_node_node_ports(),
        facts.other_subnets(),
    ]);
    let mut seen = BTreeSet::new();
    targets.retain(|t| seen.insert((t.l4, t.addr)));
    targets.truncate(options.max_targets.clamp(1, usize::from(MAX_TARGETS)));
    if !targets.iter().any(|t| t.kind.expects(t.l4) != 0) {
        return Err(ProbeError::NoTargets(options.node_name.clone()));
    }
    Ok(targets)
}

/// What the mix is chosen from: the sets of this node as the translation gives them.
struct Facts<'a> {
    snapshot: &'a Snapshot,
    node: &'a str,
    /// The sets of R1a and R2/R3 (`--service-match ip-port`, kube-proxy in IPVS mode).
    exact: MapState,
    /// (ClusterIP, protocol, port), TCP and UDP.
    service_ports: Vec<(IpAddr, L4, u16)>,
    /// `ovnX0services` (R1b's).
    service_cidrs: Vec<IpNet>,
    own_ips: Vec<IpAddr>,
    /// The node's join addresses (ovn0's), from Kube-OVN's annotation.
    join_ips: Vec<IpAddr>,
    /// The port near-misses use where any port does.
    first_port: u16,
}

impl<'a> Facts<'a> {
    fn new(snapshot: &'a Snapshot, options: &'a SelectOptions) -> Result<Self, ProbeError> {
        let node = options.node_name.as_str();
        let own = snapshot
            .nodes
            .iter()
            .find(|n| n.metadata.name.as_deref() == Some(node))
            .ok_or_else(|| ProbeError::NoNode(node.to_owned()))?;
        let translate = |service_match| {
            translate::translate(
                snapshot,
                &NodeFacts {
                    node_name: node.to_owned(),
                    ..NodeFacts::default()
                },
                &translate::Options {
                    cluster_router: options.cluster_router.clone(),
                    service_cluster_ip_range: options.service_cluster_ip_range.clone(),
                    service_match,
                    kube_proxy_sets: KubeProxySets::IPVS,
                    ..translate::Options::default()
                },
            )
            .desired
        };
        let exact = translate(ServiceMatch::IpPort);
        let cidrs = translate(ServiceMatch::Cidr);
        let service_ports: Vec<(IpAddr, L4, u16)> = exact
            .v4
            .service_ports
            .iter()
            .map(|p| (IpAddr::V4(p.addr), p.proto, p.port))
            .chain(
                exact
                    .v6
                    .service_ports
                    .iter()
                    .map(|p| (IpAddr::V6(p.addr), p.proto, p.port)),
            )
            .filter_map(|(addr, proto, port)| Some((addr, l4_of(proto)?, port)))
            .collect();
        let service_cidrs = cidrs
            .v4
            .service_cidrs
            .iter()
            .map(|n| IpNet::V4(*n))
            .chain(cidrs.v6.service_cidrs.iter().map(|n| IpNet::V6(*n)))
            .collect();
        let join_ips = own
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(IP_ADDRESS_ANNOTATION))
            .into_iter()
            .flat_map(|v| v.split(','))
            .filter_map(|a| a.trim().parse().ok())
            .collect();
        Ok(Self {
            snapshot,
            node,
            first_port: service_ports.first().map_or(80, |(_, _, port)| *port),
            service_ports,
            service_cidrs,
            own_ips: own_internal_ips(snapshot, node),
            join_ips,
            exact,
        })
    }

    /// `KUBE[-6]-NODE-PORT-LOCAL-{TCP,UDP}` of the family of `addr`.
    fn local_ports(&self, addr: IpAddr, l4: L4) -> &BTreeSet<u16> {
        match (addr.is_ipv4(), l4) {
            (true, L4::Tcp) => &self.exact.v4.nodeport_local_tcp,
            (true, L4::Udp) => &self.exact.v4.nodeport_local_udp,
            (false, L4::Tcp) => &self.exact.v6.nodeport_local_tcp,
            (false, L4::Udp) => &self.exact.v6.nodeport_local_udp,
        }
    }

    /// TCP and UDP alternately, each spread over the ClusterIPs.
    fn cluster_ips(&self) -> Vec<Target> {
        let by_l4 =
            |l4: L4| {
                spread(self.service_ports.iter().filter(|(_, p, _)| *p == l4).map(
                    |(addr, l4, port)| (*addr, target(TargetKind::ClusterIp, *l4, *addr, *port)),
                ))
            };
        interleave(&[by_l4(L4::Tcp), by_l4(L4::Udp)])
    }

    /// Per family, the first ClusterIP on a port none of its Services has.
    fn cluster_ip_other_ports(&self) -> Vec<Target> {
        let mut targets = Vec::new();
        for v4 in [true, false] {
            let Some((addr, _, _)) = self
                .service_ports
                .iter()
                .find(|(a, _, _)| a.is_ipv4() == v4)
            else {
                continue;
            };
            let used: BTreeSet<u16> = self
                .service_ports
                .iter()
                .filter(|(a, _, _)| a == addr)
                .map(|(_, _, p)| *p)
                .collect();
            if let Some(port) = free_port(used.first().copied().unwrap_or(1), &used) {
                targets.push(target(TargetKind::ClusterIpOtherPort, L4::Tcp, *addr, port));
            }
        }
        targets
    }

    /// The address after each Service CIDR, unless another one holds it.
    fn outside_service_cidrs(&self) -> Vec<Target> {
        self.service_cidrs
            .iter()
            .filter_map(|cidr| next_address(cidr.broadcast()))
            .filter(|a| !self.service_cidrs.iter().any(|c| c.contains(a)))
            .map(|a| target(TargetKind::OutsideServiceCidr, L4::Tcp, a, self.first_port))
            .collect()
    }

    /// Local NodePorts on `addrs`, TCP and UDP alternately.
    fn node_ports(&self, kind: TargetKind, addrs: &[IpAddr]) -> Vec<Target> {
        let lists = [L4::Tcp, L4::Udp].map(|l4| {
            spread(addrs.iter().flat_map(|a| {
                self.local_ports(*a, l4)
                    .iter()
                    .map(move |p| (*a, target(kind, l4, *a, *p)))
            }))
        });
        interleave(&lists)
    }

    /// NodePorts outside the Local sets, on this node's InternalIPs.
    fn cluster_policy_node_ports(&self) -> Vec<Target> {
        let mut targets = Vec::new();
        for spec in self
            .snapshot
            .services
            .iter()
            .filter_map(|s| s.spec.as_ref())
        {
            for port in spec.ports.iter().flatten() {
                let (Some(node_port), Some(l4)) = (
                    port.node_port.and_then(|n| u16::try_from(n).ok()),
                    Proto::from_service_port(port.protocol.as_deref()).and_then(l4_of),
                ) else {
                    continue;
                };
                for addr in &self.own_ips {
                    if !self.local_ports(*addr, l4).contains(&node_port) {
                        targets.push(target(
                            TargetKind::ClusterPolicyNodePort,
                            l4,
                            *addr,
                            node_port,
                        ));
                    }
                }
            }
        }
        targets
    }

    /// This node's InternalIPs on a port in the NodePort range that no Service has.
    fn node_ip_other_ports(&self) -> Vec<Target> {
        let node_ports: BTreeSet<u16> = self
            .snapshot
            .services
            .iter()
            .filter_map(|s| s.spec.as_ref())
            .flat_map(|spec| spec.ports.iter().flatten())
            .filter_map(|p| p.node_port.and_then(|n| u16::try_from(n).ok()))
            .collect();
        let Some(port) = free_port(30000, &node_ports) else {
            return Vec::new();
        };
        self.own_ips
            .iter()
            .map(|a| target(TargetKind::NodeIpOtherPort, L4::Tcp, *a, port))
            .collect()
    }

    /// The first other node of each family, one Local NodePort per protocol.
    fn other_node_node_ports(&self) -> Vec<Target> {
        let mut targets = Vec::new();
        for v4 in [true, false] {
            let other = self
                .snapshot
                .nodes
                .iter()
                .filter_map(|n| n.metadata.name.as_deref())
                .filter(|name| *name != self.node)
                .flat_map(|name| own_internal_ips(self.snapshot, name))
                .find(|a| a.is_ipv4() == v4 && !self.own_ips.contains(a));
            if let Some(addr) = other {
                targets.extend(first_per_l4(
                    &self.node_ports(TargetKind::OtherNodeNodePort, &[addr]),
                ));
            }
        }
        targets
    }

    /// The first address of each default-VPC subnet.
    fn other_subnets(&self) -> Vec<Target> {
        self.exact
            .v4
            .subnets
            .iter()
            .map(|n| IpNet::V4(*n))
            .chain(self.exact.v6.subnets.iter().map(|n| IpNet::V6(*n)))
            .filter_map(|n| next_address(n.network()))
            .map(|a| target(TargetKind::OtherSubnet, L4::Tcp, a, self.first_port))
            .collect()
    }
}

fn target(kind: TargetKind, l4: L4, addr: IpAddr, port: u16) -> Target {
    Target {
        l4,
        addr: SocketAddr::new(addr, port),
        kind,
    }
}

fn l4_of(proto: Proto) -> Option<L4> {
    match proto {
        Proto::Tcp => Some(L4::Tcp),
        Proto::Udp => Some(L4::Udp),
        Proto::Sctp => None,
    }
}

/// The first port from `start` up not in `used`.
fn free_port(start: u16, used: &BTreeSet<u16>) -> Option<u16> {
    (start.max(1)..=u16::MAX).find(|p| !used.contains(p))
}

fn next_address(addr: IpAddr) -> Option<IpAddr> {
    match addr {
        IpAddr::V4(a) => u32::from(a)
            .checked_add(1)
            .map(|n| Ipv4Addr::from(n).into()),
        IpAddr::V6(a) => u128::from(a)
            .checked_add(1)
            .map(|n| Ipv6Addr::from(n).into()),
    }
}

/// Round-robin over the groups (by address), keeping each group's order.
fn spread(items: impl Iterator<Item = (IpAddr, Target)>) -> Vec<Target> {
    let mut groups: BTreeMap<IpAddr, Vec<Target>> = BTreeMap::new();
    for (key, target) in items {
        groups.entry(key).or_default().push(target);
    }
    interleave(&groups.into_values().collect::<Vec<_>>())
}

/// One of each list in turn until all are used up.
fn interleave(lists: &[Vec<Target>]) -> Vec<Target> {
    let longest = lists.iter().map(Vec::len).max().unwrap_or(0);
    (0..longest)
        .flat_map(|i| lists.iter().filter_map(move |l| l.get(i).copied()))
        .collect()
}

fn first_per_l4(targets: &[Target]) -> Vec<Target> {
    [L4::Tcp, L4::Udp]
        .into_iter()
        .filter_map(|l4| targets.iter().find(|t| t.l4 == l4).copied())
        .collect()
}

/// The cluster objects the mix is chosen from: a kubectl-style YAML file, or the API server.
pub async fn read_cluster(source: &crate::source::SourceSpec) -> Result<Snapshot, ProbeError> {
    match source {
        crate::source::SourceSpec::File(path) => read_file(path),
        crate::source::SourceSpec::Kube => read_api().await,
    }
}

fn read_file(path: &Path) -> Result<Snapshot, ProbeError> {
    let text = std::fs::read_to_string(path).map_err(|source| ProbeError::Read {
        path: path.display().to_string(),
        source,
    })?;
    Ok(parse_objects(&text, path)?.snapshot)
}

/// How long listing may take, connection included.
const API_TIMEOUT: Duration = Duration::from_secs(20);

async fn read_api() -> Result<Snapshot, ProbeError> {
    use kube::api::{Api, ListParams};
    let read = async {
        let client = kube::Client::try_default()
            .await
            .map_err(|e| ProbeError::Api(e.to_string()))?;
        let list_error = |what| {
            move |e: kube::Error| ProbeError::List {
                what,
                message: e.to_string(),
            }
        };
        // An API the server does not serve (no Kube-OVN CRD, no ServiceCIDR API) is empty.
        let optional = |e: &kube::Error| matches!(e, kube::Error::Api(s) if s.is_not_found());
        let services = Api::<Service>::all(client.clone())
            .list(&ListParams::default().labels(KUBE_PROXY_SERVICE_SELECTOR))
            .await
            .map_err(list_error("Services"))?;
        let nodes = Api::<Node>::all(client.clone())
            .list(&ListParams::default())
            .await
            .map_err(list_error("Nodes"))?;
        let subnets = match Api::<Subnet>::all(client.clone())
            .list(&ListParams::default())
            .await
        {
            Ok(list) => list.items,
            Err(e) if optional(&e) => Vec::new(),
            Err(e) => return Err(list_error("Subnets")(e)),
        };
        let service_cidrs = match Api::<ServiceCIDR>::all(client)
            .list(&ListParams::default())
            .await
        {
            Ok(list) => list.items,
            Err(e) if optional(&e) => Vec::new(),
            Err(e) => return Err(list_error("ServiceCIDRs")(e)),
        };
        Ok(Snapshot {
            subnets: subnets.into_iter().map(Arc::new).collect(),
            services: services.items.into_iter().map(Arc::new).collect(),
            nodes: nodes.items.into_iter().map(Arc::new).collect(),
            service_cidrs: service_cidrs.into_iter().map(Arc::new).collect(),
            pods: Vec::new(),
        })
    };
    tokio::time::timeout(API_TIMEOUT, read)
        .await
        .unwrap_or_else(|_| Err(ProbeError::Api(format!("no answer within {API_TIMEOUT:?}"))))
}

/// The caps of one run.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Probes per second, at most.
    pub rate: u32,
    pub duration: Duration,
    /// Probes in all, at most.
    pub count: u64,
    /// How long a TCP attempt waits for its answer.
    pub connect_timeout: Duration,
}

/// What happened to the probes of one target.
#[derive(Clone, Debug, Default, Serialize)]
pub struct TargetReport {
    pub target: String,
    pub kind: &'static str,
    pub proto: &'static str,
    /// The rules Kube-OVN marks it by (one of R1a/R1b for `cluster-ip`).
    pub expects: Vec<&'static str>,
    pub sent: u64,
    /// TCP: the connection opened (and was closed at once).
    pub connected: u64,
    /// TCP: answered with a reset.
    pub refused: u64,
    /// TCP: no answer within the connect timeout.
    pub timed_out: u64,
    /// The attempt failed locally or with an ICMP error (unreachable, …).
    pub failed: u64,
    pub last_error: Option<String>,
}

/// A rule the mix does not reach, and why.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Uncovered {
    pub rule: &'static str,
    pub why: String,
}

#[derive(Clone, Debug, Serialize)]
pub struct Report {
    /// One line: what was sent and what it covers (`kubectl kovn verify --probe` prints it).
    pub summary: String,
    pub sent: u64,
    pub tcp: u64,
    pub udp: u64,
    pub elapsed_seconds: f64,
    /// `duration`, `count` or `interrupted`.
    pub stopped_by: &'static str,
    pub rate_limit: u32,
    /// The rules the mix's targets are marked by (R1a and R1b: whichever Kube-OVN has).
    pub covers: Vec<&'static str>,
    pub not_covered: Vec<Uncovered>,
    pub targets: Vec<TargetReport>,
}

/// The rules `targets` reach from a pod on the node, and the others with the reason.
pub fn coverage(targets: &[Target]) -> (Vec<&'static str>, Vec<Uncovered>) {
    let reached = targets
        .iter()
        .fold(0, |mask, t| mask | t.kind.expects(t.l4));
    let mut covers = Vec::new();
    let mut not_covered = Vec::new();
    for id in crate::ops::verify::RULES {
        let name = rule::NAMES[id as usize];
        if reached & rule::bit(id) != 0 {
            covers.push(name);
            continue;
        }
        let unknown = targets.iter().any(|t| t.kind == TargetKind::Given);
        let why = match id {
            rule::R3T | rule::R3U => "matches a source among the other nodes' InternalIPs; a \
                                      pod's packets carry its own address, so no pod on this \
                                      node reaches it (another node's probe can, when its \
                                      subnet masquerades to its node's address)"
                .to_owned(),
            rule::R2T | rule::R2U if !unknown => format!(
                "no externalTrafficPolicy: Local NodePort Service with a {} port on this \
                 node's addresses",
                if id == rule::R2T { "TCP" } else { "UDP" }
            ),
            _ if unknown => "no target is known to be marked by it (targets given without a \
                             /KIND are not counted)"
                .to_owned(),
            _ => "no TCP or UDP ClusterIP Service port".to_owned(),
        };
        not_covered.push(Uncovered { rule: name, why });
    }
    (covers, not_covered)
}

#[derive(Clone, Copy, Debug)]
enum Outcome {
    Sent,
    Connected,
    Refused,
    TimedOut,
    Failed,
}

/// A finished probe: the target's index, what happened, the error's text.
type Done = (usize, Outcome, Option<String>);

async fn probe_once(target: Target, connect_timeout: Duration) -> (Outcome, Option<String>) {
    match target.l4 {
        L4::Tcp => {
            match tokio::time::timeout(connect_timeout, tokio::net::TcpStream::connect(target.addr))
                .await
            {
                Ok(Ok(_stream)) => (Outcome::Connected, None),
                Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                    (Outcome::Refused, None)
                }
                Ok(Err(e)) => (Outcome::Failed, Some(e.to_string())),
                Err(_) => (Outcome::TimedOut, None),
            }
        }
        L4::Udp => {
            let bind: SocketAddr = if target.addr.is_ipv4() {
                (Ipv4Addr::UNSPECIFIED, 0).into()
            } else {
                (Ipv6Addr::UNSPECIFIED, 0).into()
            };
            // A new socket each time: a new source port, so a new connection for conntrack.
            let sent = async {
                let socket = tokio::net::UdpSocket::bind(bind).await?;
                socket.send_to(PAYLOAD, target.addr).await
            };
            match sent.await {
                Ok(_) => (Outcome::Sent, None),
                Err(e) => (Outcome::Failed, Some(e.to_string())),
            }
        }
    }
}

/// Sends the probes: round-robin over `targets`, paced to `limits.rate`, until the duration or
/// the count is reached or SIGTERM/SIGINT arrive; then waits for the attempts in flight.
pub async fn run(targets: &[Target], limits: &Limits) -> Result<Report, ProbeError> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).map_err(ProbeError::Signals)?;
    let mut int = signal(SignalKind::interrupt()).map_err(ProbeError::Signals)?;
    let rate = limits.rate.clamp(1, MAX_RATE);
    let duration = limits.duration.min(MAX_DURATION);
    let mut reports: Vec<TargetReport> = targets
        .iter()
        .map(|t| TargetReport {
            target: t.to_string(),
            kind: t.kind.name(),
            proto: match t.l4 {
                L4::Tcp => "tcp",
                L4::Udp => "udp",
            },
            expects: names(t.kind.expects(t.l4)),
            ..TargetReport::default()
        })
        .collect();
    let started = Instant::now();
    let deadline = tokio::time::Instant::now() + duration;
    let mut tick = tokio::time::interval(Duration::from_secs(1) / rate);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut in_flight: JoinSet<Done> = JoinSet::new();
    let record = |reports: &mut [TargetReport], (i, outcome, error): Done| {
        let r = &mut reports[i];
        match outcome {
            Outcome::Sent => {}
            Outcome::Connected => r.connected += 1,
            Outcome::Refused => r.refused += 1,
            Outcome::TimedOut => r.timed_out += 1,
            Outcome::Failed => r.failed += 1,
        }
        if error.is_some() {
            r.last_error = error;
        }
    };
    let mut sent = 0u64;
    let stopped_by = loop {
        if sent >= limits.count || targets.is_empty() {
            break "count";
        }
        tokio::select! {
            _ = tick.tick() => {}
            () = tokio::time::sleep_until(deadline) => break "duration",
            _ = term.recv() => break "interrupted",
            _ = int.recv() => break "interrupted",
        }
        if tokio::time::Instant::now() >= deadline {
            break "duration";
        }
        while in_flight.len() >= MAX_IN_FLIGHT {
            if let Some(Ok(done)) = in_flight.join_next().await {
                record(&mut reports, done);
            }
        }
        let i = usize::try_from(sent % targets.len() as u64).unwrap_or(0);
        let target = targets[i];
        reports[i].sent += 1;
        sent += 1;
        let timeout = limits.connect_timeout;
        in_flight.spawn(async move {
            let (outcome, error) = probe_once(target, timeout).await;
            (i, outcome, error)
        });
    };
    while let Some(done) = in_flight.join_next().await {
        if let Ok(done) = done {
            record(&mut reports, done);
        }
    }
    let count = |l4: L4| {
        targets
            .iter()
            .zip(&reports)
            .filter(|(t, _)| t.l4 == l4)
            .map(|(_, r)| r.sent)
            .sum()
    };
    let (covers, not_covered) = coverage(targets);
    let mut report = Report {
        summary: String::new(),
        sent,
        tcp: count(L4::Tcp),
        udp: count(L4::Udp),
        elapsed_seconds: started.elapsed().as_secs_f64(),
        stopped_by,
        rate_limit: rate,
        covers,
        not_covered,
        targets: reports,
    };
    report.summary = report.summarise();
    Ok(report)
}

fn names(mask: u32) -> Vec<&'static str> {
    crate::ops::verify::RULES
        .into_iter()
        .filter(|id| mask & rule::bit(*id) != 0)
        .map(|id| rule::NAMES[id as usize])
        .collect()
}

impl Report {
    fn summarise(&self) -> String {
        let sum = |f: fn(&TargetReport) -> u64| self.targets.iter().map(f).sum::<u64>();
        let mut line = format!(
            "sent {} in {:.1}s to {} targets (tcp {}: {} connected, {} refused, {} timed out, \
             {} failed; udp {}); covers {}",
            self.sent,
            self.elapsed_seconds,
            self.targets.len(),
            self.tcp,
            sum(|r| r.connected),
            sum(|r| r.refused),
            sum(|r| r.timed_out),
            sum(|r| r.failed),
            self.udp,
            if self.covers.is_empty() {
                "no rule".to_owned()
            } else {
                self.covers.join(" ")
            }
        );
        if !self.not_covered.is_empty() {
            let rules: Vec<&str> = self.not_covered.iter().map(|u| u.rule).collect();
            let _ = write!(line, "; cannot reach {}", rules.join(" "));
        }
        line
    }

    pub fn text(&self) -> String {
        let mut out = format!(
            "{} (at most {}/s, stopped by {})\n\n{:<48} {:>7} {:>9} {:>8} {:>9} {:>7}  expects\n",
            self.summary,
            self.rate_limit,
            self.stopped_by,
            "target",
            "sent",
            "connected",
            "refused",
            "timed out",
            "failed"
        );
        for r in &self.targets {
            let _ = writeln!(
                out,
                "{:<48} {:>7} {:>9} {:>8} {:>9} {:>7}  {}",
                r.target,
                r.sent,
                r.connected,
                r.refused,
                r.timed_out,
                r.failed,
                if r.expects.is_empty() {
                    "nothing".to_owned()
                } else {
                    r.expects.join(" or ")
                }
            );
        }
        for u in &self.not_covered {
            let _ = writeln!(out, "not covered: {}: {}", u.rule, u.why);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn example() -> Snapshot {
        let text = include_str!("../../../deploy/examples/cluster.yaml");
        let parsed = parse_objects(text, Path::new("cluster.yaml")).expect("example parses");
        assert!(parsed.rejected.is_empty());
        parsed.snapshot
    }

    fn options(node: &str, max: usize) -> SelectOptions {
        SelectOptions {
            node_name: node.into(),
            cluster_router: "ovn-cluster".into(),
            service_cluster_ip_range: vec!["10.96.0.0/12".parse().unwrap()],
            max_targets: max,
        }
    }

    fn texts(targets: &[Target]) -> Vec<String> {
        targets.iter().map(ToString::to_string).collect()
    }

    #[test]
    fn the_example_cluster_gives_every_kind_with_near_misses() {
        let targets = select(&example(), &options("n1", 64)).unwrap();
        let all = texts(&targets);
        for want in [
            "tcp/10.96.0.1:443/cluster-ip",
            "udp/10.96.0.10:53/cluster-ip",
            "tcp/[fd00:10:96::1]:443/cluster-ip",
            // 10.96.0.1 has only 443.
            "tcp/10.96.0.1:444/cluster-ip-other-port",
            // Right past 10.96.0.0/12.
            "tcp/10.112.0.0:443/outside-service-cidr",
            "tcp/192.168.0.11:30080/node-port",
            "udp/192.168.0.11:30053/node-port",
            "tcp/[fd00::11]:30080/node-port",
            "udp/[fd00::11]:30053/node-port",
            "tcp/100.64.0.2:30080/join-ip-node-port",
            "udp/100.64.0.2:30053/join-ip-node-port",
            // np-cluster's NodePort is no Local one.
            "tcp/192.168.0.11:30081/cluster-policy-node-port",
            // 30000 is no Service's NodePort.
            "tcp/192.168.0.11:30000/node-ip-other-port",
            "tcp/192.168.0.12:30080/other-node-node-port",
            "udp/[fd00::12]:30053/other-node-node-port",
            "tcp/10.16.0.1:443/other-subnet",
        ] {
            assert!(
                all.iter().any(|t| t == want),
                "{want} missing from {all:#?}"
            );
        }
        // Underlay without a logical gateway and other VPCs are not default-VPC subnets.
        assert!(
            !all.iter()
                .any(|t| t.contains("172.18.0.1") || t.contains("10.0.1.1"))
        );
        // Nothing twice.
        let unique: BTreeSet<_> = targets.iter().map(|t| (t.l4, t.addr)).collect();
        assert_eq!(unique.len(), targets.len());
        let (covers, not_covered) = coverage(&targets);
        assert_eq!(covers, ["R1a", "R1b", "R2t", "R2u"]);
        assert_eq!(
            not_covered.iter().map(|u| u.rule).collect::<Vec<_>>(),
            ["R3t", "R3u"]
        );
    }

    #[test]
    fn a_small_cap_still_takes_one_of_each_kind_first() {
        let targets = select(&example(), &options("n1", 9)).unwrap();
        let kinds: BTreeSet<_> = targets.iter().map(|t| t.kind).collect();
        assert_eq!(kinds.len(), 9, "{:#?}", texts(&targets));
        let (covers, _) = coverage(&targets);
        // One node-port target: TCP first.
        assert!(
            covers.contains(&"R1a") && covers.contains(&"R2t"),
            "{covers:?}"
        );
    }

    #[test]
    fn another_node_gets_its_own_addresses_and_only_its_families() {
        // n3 has no IPv6 InternalIP: no IPv6 NodePort target on it.
        let all = texts(&select(&example(), &options("n3", 64)).unwrap());
        assert!(
            all.iter().any(|t| t == "tcp/192.168.0.13:30080/node-port"),
            "{all:#?}"
        );
        assert!(
            all.iter()
                .any(|t| t == "tcp/100.64.0.4:30080/join-ip-node-port")
        );
        assert!(!all.iter().any(|t| t.contains("fd00::13")));
        assert!(
            all.iter()
                .any(|t| t == "tcp/192.168.0.11:30080/other-node-node-port")
        );
        assert!(
            !all.iter()
                .any(|t| t.contains("192.168.0.13") && t.ends_with("other-node-node-port"))
        );
    }

    #[test]
    fn without_local_node_ports_or_services_the_gaps_are_named() {
        let mut snapshot = example();
        snapshot
            .services
            .retain(|s| s.metadata.name.as_deref() == Some("kube-dns"));
        let targets = select(&snapshot, &options("n1", 64)).unwrap();
        let (covers, not_covered) = coverage(&targets);
        assert_eq!(covers, ["R1a", "R1b"]);
        let r2u = not_covered.iter().find(|u| u.rule == "R2u").unwrap();
        assert!(r2u.why.contains("UDP"), "{r2u:?}");
        snapshot.services.clear();
        assert!(matches!(
            select(&snapshot, &options("n1", 64)),
            Err(ProbeError::NoTargets(_))
        ));
        assert!(matches!(
            select(&example(), &options("n9", 64)),
            Err(ProbeError::NoNode(_))
        ));
    }

    #[test]
    fn given_targets_without_a_kind_cover_nothing_known() {
        let targets = ["tcp/10.96.0.10:53".parse().unwrap()];
        let (covers, not_covered) = coverage(&targets);
        assert!(covers.is_empty());
        let r2t = not_covered.iter().find(|u| u.rule == "R2t").unwrap();
        assert!(r2t.why.contains("/KIND"), "{r2t:?}");
    }

    #[test]
    fn targets_parse_and_print_alike() {
        for text in [
            "tcp/10.96.0.10:53",
            "udp/[fd00:10:96::10]:53/cluster-ip",
            "tcp/192.168.0.11:30080/node-port",
        ] {
            let target: Target = text.parse().unwrap();
            assert_eq!(target.to_string(), text);
        }
        for bad in [
            "sctp/10.0.0.1:1",
            "tcp/10.0.0.1",
            "tcp/fd00::1:53",
            "tcp/10.0.0.1:0",
            "tcp/10.0.0.1:1/bogus",
            "tcp/10.0.0.1:1/node-port/x",
            "10.0.0.1:1",
        ] {
            assert!(bad.parse::<Target>().is_err(), "{bad} accepted");
        }
    }

    #[tokio::test]
    async fn run_stops_at_the_count_and_counts_per_outcome() {
        // Loopback only: a listener that accepts, a closed port, and a UDP sink.
        let open = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let closed_addr = closed.local_addr().unwrap();
        drop(closed);
        let sink = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let targets = [
            Target {
                l4: L4::Tcp,
                addr: open.local_addr().unwrap(),
                kind: TargetKind::Given,
            },
            Target {
                l4: L4::Tcp,
                addr: closed_addr,
                kind: TargetKind::Given,
            },
            Target {
                l4: L4::Udp,
                addr: sink.local_addr().unwrap(),
                kind: TargetKind::NodePort,
            },
        ];
        let report = run(
            &targets,
            &Limits {
                rate: MAX_RATE,
                duration: Duration::from_secs(30),
                count: 7,
                connect_timeout: Duration::from_secs(1),
            },
        )
        .await
        .unwrap();
        assert_eq!((report.sent, report.tcp, report.udp), (7, 5, 2));
        assert_eq!(report.stopped_by, "count");
        assert_eq!(report.targets[0].connected, 3);
        assert_eq!(report.targets[1].refused, 2);
        assert_eq!(report.targets[2].sent, 2);
        assert_eq!(report.targets[2].expects, ["R2u"]);
        let mut buf = [0u8; 64];
        let (n, _) = sink.recv_from(&mut buf).unwrap();
        assert_eq!(&buf[..n], PAYLOAD);
        assert!(report.summary.starts_with("sent 7 "), "{}", report.summary);
        // The rate cap: 5 probes at 10/s take at least 0.4 s.
        let report = run(
            &targets[2..],
            &Limits {
                rate: 10,
                duration: Duration::from_secs(30),
                count: 5,
                connect_timeout: Duration::from_secs(1),
            },
        )
        .await
        .unwrap();
        assert!(report.elapsed_seconds >= 0.39, "{}", report.elapsed_seconds);
        // The duration cap.
        let report = run(
            &targets[2..],
            &Limits {
                rate: 10,
                duration: Duration::from_millis(350),
                count: 1000,
                connect_timeout: Duration::from_secs(1),
            },
        )
        .await
        .unwrap();
        assert_eq!(report.stopped_by, "duration");
        assert!((3..=5).contains(&report.sent), "{}", report.sent);
    }
}
