//! Cluster snapshot + node facts → desired datapath state. Pure: no I/O, no clock.
//!
//! Every filter mirrors Kube-OVN v1.13.15 (spec §2) or kube-proxy's IPVS proxier for the sets
//! it owns; the comments name the rule each one reproduces.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    sync::Arc,
};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use k8s_openapi::api::core::v1::{Node, Service};
use kube_ovn_ebpf_common::rule;
use serde::Serialize;

use crate::{
    cluster::{
        IP_ADDRESS_ANNOTATION, Kind, LOGICAL_SWITCH_ANNOTATION, Snapshot, Subnet,
        ignored_by_kube_proxy, object_name,
    },
    state::{FamilyState, MapState, ProbeTarget, Proto, ServicePort},
};

/// How R1 decides that a packet goes to a Service (`--service-match`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ServiceMatch {
    /// As Kube-OVN: exact ClusterIP+port (R1a) plus the NodePort rules when kube-proxy's IPVS
    /// sets exist for the family, the Service CIDR (R1b) otherwise.
    #[default]
    Auto,
    /// Always R1a plus R2/R3.
    IpPort,
    /// Always R1b, no R2/R3.
    Cidr,
}

/// Which of kube-proxy's IPVS-mode ipsets exist, per family (Kube-OVN tests their existence
/// with `ipset list -n` every pass and builds R1a/R2/R3 only when they do).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct KubeProxySets {
    pub v4: FamilySets,
    pub v6: FamilySets,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct FamilySets {
    /// `KUBE-CLUSTER-IP` / `KUBE-6-CLUSTER-IP`.
    pub cluster_ip: bool,
    /// `KUBE[-6]-NODE-PORT-LOCAL-TCP`.
    pub nodeport_local_tcp: bool,
    /// `KUBE[-6]-NODE-PORT-LOCAL-UDP`.
    pub nodeport_local_udp: bool,
}

impl FamilySets {
    pub const ALL: Self = Self {
        cluster_ip: true,
        nodeport_local_tcp: true,
        nodeport_local_udp: true,
    };
}

impl KubeProxySets {
    /// kube-proxy in IPVS mode, both families.
    pub const IPVS: Self = Self {
        v4: FamilySets::ALL,
        v6: FamilySets::ALL,
    };
}

/// Settings that shape the translation.
#[derive(Clone, Debug)]
pub struct Options {
    /// Kube-OVN's `--cluster-router`: the default VPC's name.
    pub cluster_router: String,
    /// Kube-OVN's `--service-cluster-ip-range`, used unless ready ServiceCIDR objects exist.
    pub service_cluster_ip_range: Vec<IpNet>,
    pub service_match: ServiceMatch,
    pub kube_proxy_sets: KubeProxySets,
    pub shadow: bool,
    /// `--enable-tproxy`: the transparent listener's port (Kube-OVN's `--on-port`).
    pub tproxy_port: Option<u16>,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            cluster_router: "ovn-cluster".into(),
            service_cluster_ip_range: vec!["10.96.0.0/12".parse().expect("valid default")],
            service_match: ServiceMatch::Auto,
            kube_proxy_sets: KubeProxySets::default(),
            shadow: false,
            tproxy_port: None,
        }
    }
}

/// Facts about this node that do not come from the API.
#[derive(Clone, Debug, Default)]
pub struct NodeFacts {
    pub node_name: String,
    /// The kernel's local routing table (what `addrtype --dst-type LOCAL` consults).
    pub local_v4: BTreeSet<Ipv4Net>,
    pub local_v6: BTreeSet<Ipv6Net>,
    /// ifindex → roles of the interfaces the program is attached to.
    pub ifaces: BTreeMap<u32, u32>,
}

/// An object the translation had to skip or partly ignore.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Issue {
    pub kind: &'static str,
    pub object: String,
    pub message: String,
}

impl std::fmt::Display for Issue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}: {}", self.kind, self.object, self.message)
    }
}

#[derive(Clone, Debug, Default)]
pub struct Translation {
    pub desired: MapState,
    pub issues: Vec<Issue>,
}

/// The desired content of every map.
pub fn translate(snapshot: &Snapshot, node: &NodeFacts, options: &Options) -> Translation {
    translate_inner(snapshot, node, options, None)
}

/// [`translate`], reusing per-object results from earlier calls with the same `memo`.
pub fn translate_with(
    memo: &mut Memo,
    snapshot: &Snapshot,
    node: &NodeFacts,
    options: &Options,
) -> Translation {
    translate_inner(snapshot, node, options, Some(memo))
}

fn translate_inner(
    snapshot: &Snapshot,
    node: &NodeFacts,
    options: &Options,
    memo: Option<&mut Memo>,
) -> Translation {
    let mut issues = Vec::new();
    let mut desired = MapState {
        ifaces: node.ifaces.clone(),
        shadow: options.shadow,
        ..MapState::default()
    };
    let own_node = snapshot
        .nodes
        .iter()
        .find(|n| n.metadata.name.as_deref() == Some(node.node_name.as_str()));
    let node_ip = own_node.map(|n| node_internal_ip(n)).unwrap_or_default();
    let families = own_node.map_or(Families::default(), |n| kube_ovn_families(n, &mut issues));
    let service_cidrs = service_cidrs(snapshot, options, &mut issues);
    let subnets = default_vpc_subnets(snapshot, options, &mut issues);
    let rules_v4 = if families.v4 {
        family_rules(
            options.kube_proxy_sets.v4,
            node_ip.v4.is_some(),
            options.service_match,
        )
    } else {
        0
    };
    let rules_v6 = if families.v6 {
        family_rules(
            options.kube_proxy_sets.v6,
            node_ip.v6.is_some(),
            options.service_match,
        )
    } else {
        0
    };
    // One pass over the Services feeds both families, and only when a rule reads the result.
    let service_rules = rule::bit(rule::R1A) | rule::NODEPORT_LOCAL_RULES;
    let services = if (rules_v4 | rules_v6) & service_rules == 0 {
        ServiceSets::default()
    } else {
        services(snapshot, &mut issues, memo)
    };

    // A family Kube-OVN does not run on the node gets no state at all (no ip6tables rules and
    // no ovn60* sets on an IPv4-only Kube-OVN).
    desired.v4 = family(
        FamilyInput {
            rules: rules_v4,
            subnets: if families.v4 {
                subnets.iter().filter_map(as_v4).collect()
            } else {
                BTreeSet::new()
            },
            service_cidrs: service_cidrs.iter().filter_map(as_v4).collect(),
            local: node.local_v4.clone(),
            services: services.v4,
        },
        snapshot,
        node,
    );
    desired.v6 = family(
        FamilyInput {
            rules: rules_v6,
            subnets: if families.v6 {
                subnets.iter().filter_map(as_v6).collect()
            } else {
                BTreeSet::new()
            },
            service_cidrs: service_cidrs.iter().filter_map(as_v6).collect(),
            local: node.local_v6.clone(),
            services: services.v6,
        },
        snapshot,
        node,
    );
    if let Some(port) = options.tproxy_port {
        tproxy(
            snapshot,
            node,
            options,
            NodeInternalIp {
                v4: node_ip.v4.filter(|_| families.v4),
                v6: node_ip.v6.filter(|_| families.v6),
            },
            &mut desired,
            &mut issues,
        );
        desired.tproxy_port = port;
    }
    issues.sort_by(|a, b| (a.kind, &a.object, &a.message).cmp(&(b.kind, &b.object, &b.message)));
    issues.dedup();
    Translation { desired, issues }
}

/// Kube-OVN's TPROXY rules (GL:930-986, `getTProxyConditionPod` G:254-291, `getProbePorts`
/// TP:64-98): for each pod on this node that is not on the host network and whose subnet (the
/// `ovn.kubernetes.io/logical_switch` annotation) is in a custom VPC, every liveness/readiness
/// probe port of every IP, steered to the listener on the node's IP of the family.
fn tproxy(
    snapshot: &Snapshot,
    node: &NodeFacts,
    options: &Options,
    node_ip: NodeInternalIp,
    desired: &mut MapState,
    issues: &mut Vec<Issue>,
) {
    // TPROXY is on for a family when the node has an address of it for the listener: Kube-OVN's
    // `--on-ip` is `util.GetNodeInternalIP` of the node
    // (https://github.com/kubeovn/kube-ovn/blob/v1.16.2/pkg/daemon/config.go#L259).
    desired.v4.tproxy_listener = node_ip.v4;
    desired.v6.tproxy_listener = node_ip.v6;
    if desired.v4.tproxy_listener.is_some() {
        desired.v4.rules |= rule::bit(rule::TPROXY);
    }
    if desired.v6.tproxy_listener.is_some() {
        desired.v6.rules |= rule::bit(rule::TPROXY);
    }
    let subnets: BTreeMap<&str, &Subnet> = snapshot
        .subnets
        .iter()
        .filter_map(|s| Some((s.metadata.name.as_deref()?, s.as_ref())))
        .collect();
    for pod in &snapshot.pods {
        let Some(spec) = &pod.spec else { continue };
        let on_this_node = spec
            .node_name
            .as_deref()
            .is_none_or(|n| n == node.node_name);
        if !on_this_node || spec.host_network == Some(true) {
            continue;
        }
        let Some(subnet_name) = pod
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(LOGICAL_SWITCH_ANNOTATION))
        else {
            continue;
        };
        let Some(subnet) = subnets.get(subnet_name.as_str()) else {
            issues.push(Issue {
                kind: Kind::Pod.name(),
                object: object_name(&pod.metadata),
                message: format!("subnet {subnet_name:?} of its {LOGICAL_SWITCH_ANNOTATION} annotation does not exist; no TPROXY for it"),
            });
            continue;
        };
        if subnet.spec.vpc == options.cluster_router {
            continue;
        }
        let ports = probe_ports(spec);
        let ips = pod
            .status
            .as_ref()
            .and_then(|s| s.pod_ips.as_ref())
            .into_iter()
            .flatten()
            .filter_map(|ip| ip.ip.parse::<IpAddr>().ok());
        for ip in ips {
            for port in &ports {
                match ip {
                    IpAddr::V4(addr) if desired.v4.tproxy_listener.is_some() => {
                        desired
                            .v4
                            .probe_targets
                            .insert(ProbeTarget { addr, port: *port });
                    }
                    IpAddr::V6(addr) if desired.v6.tproxy_listener.is_some() => {
                        desired
                            .v6
                            .probe_targets
                            .insert(ProbeTarget { addr, port: *port });
                    }
                    _ => {}
                }
            }
        }
    }
}

/// Liveness and readiness probe ports (not startup probes), named ports resolved against the
/// probing container's ports; port 0 dropped.
fn probe_ports(spec: &k8s_openapi::api::core::v1::PodSpec) -> BTreeSet<u16> {
    use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
    let mut ports = BTreeSet::new();
    for container in &spec.containers {
        for probe in [&container.liveness_probe, &container.readiness_probe]
            .into_iter()
            .flatten()
        {
            let port = if let Some(tcp) = &probe.tcp_socket {
                tcp.port.clone()
            } else if let Some(http) = &probe.http_get {
                http.port.clone()
            } else if let Some(grpc) = &probe.grpc {
                IntOrString::Int(grpc.port)
            } else {
                continue;
            };
            let number = match port {
                IntOrString::Int(n) => Some(n),
                IntOrString::String(name) => container
                    .ports
                    .iter()
                    .flatten()
                    .find(|p| p.name.as_deref() == Some(name.as_str()))
                    .map(|p| p.container_port),
            };
            if let Some(port) = number
                .and_then(|n| u16::try_from(n).ok())
                .filter(|p| *p != 0)
            {
                ports.insert(port);
            }
        }
    }
    ports
}

/// Every problem `translate` would report for `snapshot` under any options (it only reports
/// issues for the sets the active rules need). The file source rejects a file with any.
pub fn validate(snapshot: &Snapshot) -> Vec<Issue> {
    let options = Options {
        service_match: ServiceMatch::IpPort,
        ..Options::default()
    };
    let mut issues = Vec::new();
    default_vpc_subnets(snapshot, &options, &mut issues);
    service_cidrs(snapshot, &options, &mut issues);
    services(snapshot, &mut issues, None);
    issues.sort_by(|a, b| (a.kind, &a.object, &a.message).cmp(&(b.kind, &b.object, &b.message)));
    issues.dedup();
    issues
}

/// Inputs for one family that were already split by family.
struct FamilyInput<N: Ord, A: Ord> {
    rules: u32,
    subnets: BTreeSet<N>,
    service_cidrs: BTreeSet<N>,
    local: BTreeSet<N>,
    services: FamilyServices<A>,
}

/// kube-proxy's Service-derived sets for one family.
struct FamilyServices<A: Ord> {
    ports: BTreeSet<ServicePort<A>>,
    local_tcp: BTreeSet<u16>,
    local_udp: BTreeSet<u16>,
}

impl<A: Ord> Default for FamilyServices<A> {
    fn default() -> Self {
        Self {
            ports: BTreeSet::new(),
            local_tcp: BTreeSet::new(),
            local_udp: BTreeSet::new(),
        }
    }
}

#[derive(Default)]
struct ServiceSets {
    v4: FamilyServices<Ipv4Addr>,
    v6: FamilyServices<Ipv6Addr>,
}

/// Address-family plumbing for the generic per-family translation.
trait Addr: Copy + Ord {
    fn of(ip: IpAddr) -> Option<Self>;
}

impl Addr for Ipv4Addr {
    fn of(ip: IpAddr) -> Option<Self> {
        match ip {
            IpAddr::V4(a) => Some(a),
            IpAddr::V6(_) => None,
        }
    }
}

impl Addr for Ipv6Addr {
    fn of(ip: IpAddr) -> Option<Self> {
        match ip {
            IpAddr::V6(a) => Some(a),
            IpAddr::V4(_) => None,
        }
    }
}

/// The rules Kube-OVN installs for a family (GL:737-799).
fn family_rules(sets: FamilySets, has_internal_ip: bool, service_match: ServiceMatch) -> u32 {
    let ipvs_like = match service_match {
        ServiceMatch::Auto => sets,
        ServiceMatch::IpPort => FamilySets::ALL,
        ServiceMatch::Cidr => FamilySets::default(),
    };
    let r1 = if ipvs_like.cluster_ip {
        rule::R1A
    } else {
        rule::R1B
    };
    let mut rules = rule::bit(r1);
    // R2/R3 only when the node has an InternalIP of the family and the set exists.
    if has_internal_ip && ipvs_like.nodeport_local_tcp {
        rules |= rule::bit(rule::R2T) | rule::bit(rule::R3T);
    }
    if has_internal_ip && ipvs_like.nodeport_local_udp {
        rules |= rule::bit(rule::R2U) | rule::bit(rule::R3U);
    }
    rules
}

fn family<N: Ord, A: Addr>(
    input: FamilyInput<N, A>,
    snapshot: &Snapshot,
    node: &NodeFacts,
) -> FamilyState<N, A> {
    let rules = input.rules;
    let on = |r: u32| rules & rule::bit(r) != 0;
    let mut state = FamilyState {
        rules,
        subnets: input.subnets,
        ..FamilyState::default()
    };
    // Only the sets an active rule reads are filled, as only those exist on a Kube-OVN node.
    if on(rule::R1B) {
        state.service_cidrs = input.service_cidrs;
    }
    if on(rule::R1A) {
        state.service_ports = input.services.ports;
    }
    if on(rule::R2T) {
        state.nodeport_local_tcp = input.services.local_tcp;
    }
    if on(rule::R2U) {
        state.nodeport_local_udp = input.services.local_udp;
    }
    if on(rule::R2T) || on(rule::R2U) {
        state.local = input.local;
    }
    if on(rule::R3T) || on(rule::R3U) {
        state.other_nodes = other_nodes::<A>(snapshot, &node.node_name);
    }
    state
}

fn as_v4(net: &IpNet) -> Option<Ipv4Net> {
    match net {
        IpNet::V4(n) => Some(*n),
        IpNet::V6(_) => None,
    }
}

fn as_v6(net: &IpNet) -> Option<Ipv6Net> {
    match net {
        IpNet::V6(n) => Some(*n),
        IpNet::V4(_) => None,
    }
}

/// Go's `net.ParseCIDR` (Go ≥ 1.22): an address `netip.ParseAddr` accepts (no zone, no leading
/// zeros) and a decimal prefix length (leading zeros allowed, no sign) within its bits. Host bits
/// are cleared, as ipset's hash:net does.
fn go_parse_cidr(text: &str) -> Option<IpNet> {
    let (addr, prefix) = text.split_once('/')?;
    let addr: IpAddr = addr.parse().ok()?;
    if prefix.is_empty() || prefix.len() > 8 || !prefix.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let prefix: u8 = prefix.parse::<u32>().ok()?.try_into().ok()?;
    IpNet::new(addr, prefix).ok().map(|n| n.trunc())
}

/// Kube-OVN's `util.CheckProtocol` for one address or CIDR: the part before any `/` parsed with
/// Go's `net.ParseIP`; an IPv4-mapped IPv6 address counts as IPv4 (`To4() != nil`).
/// (<https://github.com/kubeovn/kube-ovn/blob/v1.16.2/pkg/util/net.go#L189>)
fn go_address_family(text: &str) -> Option<IpAddr> {
    let ip: IpAddr = text.split('/').next()?.parse().ok()?;
    Some(match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        IpAddr::V4(_) => ip,
    })
}

/// What `util.CheckProtocol` says about a comma-separated address list.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Families {
    v4: bool,
    v6: bool,
}

/// `util.CheckProtocol`: one address of either family, or exactly two of different families;
/// anything else (two of one family, three or more, an unparsable one) is `""`, no family.
fn check_protocol(text: &str) -> Families {
    let parts: Vec<&str> = text.split(',').collect();
    match parts.as_slice() {
        [""] => Families::default(),
        [one] => match go_address_family(one) {
            Some(IpAddr::V4(_)) => Families {
                v4: true,
                v6: false,
            },
            Some(IpAddr::V6(_)) => Families {
                v4: false,
                v6: true,
            },
            None => Families::default(),
        },
        [a, b] => match (go_address_family(a), go_address_family(b)) {
            (Some(IpAddr::V4(_)), Some(IpAddr::V6(_)))
            | (Some(IpAddr::V6(_)), Some(IpAddr::V4(_))) => Families { v4: true, v6: true },
            _ => Families::default(),
        },
        // Three or more: Go parses the whole text before the first '/' as one address.
        _ => Families::default(),
    }
}

/// The node's addresses per family as Kube-OVN's `util.GetNodeInternalIP` gives them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct NodeInternalIp {
    v4: Option<Ipv4Addr>,
    v6: Option<Ipv6Addr>,
}

/// `util.GetNodeInternalIP` (<https://github.com/kubeovn/kube-ovn/blob/v1.16.2/pkg/util/k8s.go#L88>,
/// the same in v1.13.x): all InternalIPs joined with "," and split by `SplitStringIP`, which
/// trusts `CheckProtocol` of the whole list. One address, or one of each family, work; two of one
/// family, or three and more, give `""` for both families, so such a node has no R2/R3 (and no
/// TPROXY listener) in either family.
fn node_internal_ip(node: &Node) -> NodeInternalIp {
    let joined = node
        .status
        .as_ref()
        .and_then(|s| s.addresses.as_ref())
        .into_iter()
        .flatten()
        .filter(|a| a.type_ == "InternalIP")
        .map(|a| a.address.as_str())
        .collect::<Vec<_>>()
        .join(",");
    let families = check_protocol(&joined);
    let mut out = NodeInternalIp::default();
    if !(families.v4 || families.v6) {
        return out;
    }
    for part in joined.split(',') {
        match go_address_family(part) {
            Some(IpAddr::V4(a)) => out.v4 = Some(a),
            Some(IpAddr::V6(a)) => out.v6 = Some(a),
            None => {}
        }
    }
    out
}

/// The families kube-ovn-cni programs on this node: `CheckProtocol` of its
/// `ovn.kubernetes.io/ip_address` annotation. Kube-OVN's daemon does not start its gateway loop
/// before the annotation exists, so a node without a usable one gets nothing.
fn kube_ovn_families(node: &Node, issues: &mut Vec<Issue>) -> Families {
    let annotation = node
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(IP_ADDRESS_ANNOTATION))
        .map_or("", String::as_str);
    let families = check_protocol(annotation);
    if !(families.v4 || families.v6) {
        issues.push(Issue {
            kind: Kind::Node.name(),
            object: object_name(&node.metadata),
            message: format!(
                "annotation {IP_ADDRESS_ANNOTATION}={annotation:?} names no address family; \
                 Kube-OVN programs nothing on this node, neither do we"
            ),
        });
    }
    families
}

/// ipset's hash:net refuses a zero prefix (`IPSET_ERR_INVALID_CIDR`); Kube-OVN's ipset update
/// then fails as a whole (felix retries and panics), so such a CIDR never matches there.
fn programmable(net: &IpNet) -> bool {
    net.prefix_len() > 0
}

fn unprogrammable_issue(kind: Kind, object: String, net: &IpNet) -> Issue {
    Issue {
        kind: kind.name(),
        object,
        message: format!(
            "CIDR {net} has prefix length 0, which ipset hash:net refuses; not programmed"
        ),
    }
}

/// `getCidrByProtocol` for both families
/// (<https://github.com/kubeovn/kube-ovn/blob/v1.16.2/pkg/daemon/gateway.go#L206>):
/// `util.CheckCidrs` splits `cidrBlock` on "," without trimming and `net.ParseCIDR`s every
/// element — one bad element (a space, an empty element) drops the Subnet in both families —
/// then the first element of each family is used.
fn subnet_cidrs(block: &str) -> Result<(Option<IpNet>, Option<IpNet>), String> {
    let mut parsed = Vec::new();
    for element in block.split(',') {
        let net = go_parse_cidr(element).ok_or_else(|| format!("invalid CIDR {element:?}"))?;
        parsed.push((go_address_family(element), net));
    }
    let first = |v4: bool| {
        parsed
            .iter()
            .find(|(family, _)| family.is_some_and(|f| f.is_ipv4() == v4))
            .map(|(_, net)| *net)
    };
    // An IPv4-mapped IPv6 CIDR takes the IPv4 slot, and ipset then filters it out as the wrong
    // version.
    Ok((first(true).filter(|n| n.addr().is_ipv4()), first(false)))
}

/// `ovnX0subnets` (G:162-182 `getDefaultVpcSubnetsCIDR`): every Subnet of the default VPC that is
/// not underlay (or has a logical gateway) with a non-empty cidrBlock. Deleting subnets are
/// included, and `protocol`, `excludeIps`, `u2oInterconnection`, `natOutgoing` do not matter.
fn default_vpc_subnets(
    snapshot: &Snapshot,
    options: &Options,
    issues: &mut Vec<Issue>,
) -> BTreeSet<IpNet> {
    let mut nets = BTreeSet::new();
    for subnet in &snapshot.subnets {
        if !is_default_vpc_overlay(subnet, &options.cluster_router)
            || subnet.spec.cidr_block.is_empty()
        {
            continue;
        }
        match subnet_cidrs(&subnet.spec.cidr_block) {
            Ok((v4, v6)) => {
                for net in [v4, v6].into_iter().flatten() {
                    if programmable(&net) {
                        nets.insert(net);
                    } else {
                        issues.push(unprogrammable_issue(
                            Kind::Subnet,
                            object_name(&subnet.metadata),
                            &net,
                        ));
                    }
                }
            }
            Err(message) => issues.push(Issue {
                kind: Kind::Subnet.name(),
                object: object_name(&subnet.metadata),
                message: format!("spec.cidrBlock: {message}; subnet skipped"),
            }),
        }
    }
    nets
}

fn is_default_vpc_overlay(subnet: &Subnet, cluster_router: &str) -> bool {
    subnet.spec.vpc == cluster_router
        && (subnet.spec.vlan.is_empty() || subnet.spec.logical_gateway)
}

/// `ovnX0services`: the ready ServiceCIDR objects' CIDRs when there are any (master's
/// `ServiceCIDRStore`), otherwise `--service-cluster-ip-range`.
fn service_cidrs(snapshot: &Snapshot, options: &Options, issues: &mut Vec<Issue>) -> Vec<IpNet> {
    let mut from_api = BTreeSet::new();
    for object in &snapshot.service_cidrs {
        let ready = object
            .status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
        if !ready || object.metadata.deletion_timestamp.is_some() {
            continue;
        }
        let cidrs = object.spec.as_ref().and_then(|s| s.cidrs.as_ref());
        for cidr in cidrs.into_iter().flatten() {
            match go_parse_cidr(cidr) {
                Some(net) if programmable(&net) => {
                    from_api.insert(net);
                }
                Some(net) => issues.push(unprogrammable_issue(
                    Kind::ServiceCidr,
                    object_name(&object.metadata),
                    &net,
                )),
                None => issues.push(Issue {
                    kind: Kind::ServiceCidr.name(),
                    object: object_name(&object.metadata),
                    message: format!("spec.cidrs: invalid CIDR {cidr:?}; entry skipped"),
                }),
            }
        }
    }
    if from_api.is_empty() {
        let mut nets = Vec::new();
        for net in options.service_cluster_ip_range.iter().map(IpNet::trunc) {
            if programmable(&net) {
                nets.push(net);
            } else {
                issues.push(unprogrammable_issue(
                    Kind::ServiceCidr,
                    "--service-cluster-ip-range".into(),
                    &net,
                ));
            }
        }
        nets
    } else {
        from_api.into_iter().collect()
    }
}

fn internal_ips(node: &Node) -> impl Iterator<Item = IpAddr> + '_ {
    node.status
        .as_ref()
        .and_then(|s| s.addresses.as_ref())
        .into_iter()
        .flatten()
        .filter(|a| a.type_ == "InternalIP")
        .filter_map(|a| a.address.trim().parse().ok())
}

/// Every InternalIP of this node (the interfaces holding them get the NIC role).
pub fn own_internal_ips(snapshot: &Snapshot, node_name: &str) -> Vec<IpAddr> {
    snapshot
        .nodes
        .iter()
        .filter(|n| n.metadata.name.as_deref() == Some(node_name))
        .flat_map(|n| internal_ips(n).collect::<Vec<_>>())
        .collect()
}

/// `ovnX0other-node` (`getOtherNodes`,
/// <https://github.com/kubeovn/kube-ovn/blob/v1.16.2/pkg/daemon/gateway.go#L184>): every other
/// node's InternalIPs, one by one (not through `GetNodeInternalIP`: a node with several
/// addresses of a family contributes all of them), each kept when `CheckProtocol` of it names
/// the family.
fn other_nodes<A: Addr>(snapshot: &Snapshot, node_name: &str) -> BTreeSet<A> {
    snapshot
        .nodes
        .iter()
        .filter(|n| n.metadata.name.as_deref() != Some(node_name))
        .flat_map(|n| {
            n.status
                .as_ref()
                .and_then(|s| s.addresses.as_ref())
                .into_iter()
                .flatten()
        })
        .filter(|a| a.type_ == "InternalIP" && !a.address.contains(','))
        .filter_map(|a| {
            // felix drops a member whose text is of the other version (an IPv4-mapped IPv6
            // address `CheckProtocol` calls IPv4).
            let ip = go_address_family(&a.address)?;
            (a.address.contains(':') == ip.is_ipv6()).then_some(ip)
        })
        .filter_map(A::of)
        .collect()
}

/// kube-proxy's `KUBE[-6]-CLUSTER-IP` and `KUBE[-6]-NODE-PORT-LOCAL-{TCP,UDP}`. As in
/// kube-proxy's per-family proxier, a Service contributes to a family only if it has a
/// ClusterIP of that family. Entries are gathered in vectors and bulk-built into sets, which
/// is several times faster than inserting one by one (this runs on every change).
/// What one Service adds to the sets: a function of that object alone, so it can be reused
/// while the object is unchanged.
#[derive(Debug, Default)]
struct ServiceEntries {
    ports4: Vec<ServicePort<Ipv4Addr>>,
    ports6: Vec<ServicePort<Ipv6Addr>>,
    local_tcp4: Vec<u16>,
    local_udp4: Vec<u16>,
    local_tcp6: Vec<u16>,
    local_udp6: Vec<u16>,
    issues: Vec<Issue>,
}

/// Per-object results carried from one translation to the next.
///
/// Reflector stores hand out the same `Arc` for an object until it changes, so a Service whose
/// `Arc` was seen last pass is not read again; a single change costs one object plus merging,
/// not re-parsing every Service. The memo holds the `Arc`s it keys on, so an address cannot be
/// reused by another object while its entry exists. It changes cost only: `translate_with`
/// returns exactly what `translate` does (tested).
#[derive(Debug, Default)]
pub struct Memo {
    services: HashMap<usize, Memoised>,
    /// Counts translations; entries not seen in the latest one are dropped.
    pass: u64,
}

#[derive(Debug)]
struct Memoised {
    /// Keeps the keyed address owned by this object.
    _object: Arc<Service>,
    entries: ServiceEntries,
    seen: u64,
}

fn services(snapshot: &Snapshot, issues: &mut Vec<Issue>, memo: Option<&mut Memo>) -> ServiceSets {
    let (mut ports4, mut ports6) = (Vec::new(), Vec::new());
    let (mut tcp4, mut udp4, mut tcp6, mut udp6) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut add = |entries: &ServiceEntries, issues: &mut Vec<Issue>| {
        ports4.extend_from_slice(&entries.ports4);
        ports6.extend_from_slice(&entries.ports6);
        tcp4.extend_from_slice(&entries.local_tcp4);
        udp4.extend_from_slice(&entries.local_udp4);
        tcp6.extend_from_slice(&entries.local_tcp6);
        udp6.extend_from_slice(&entries.local_udp6);
        issues.extend(entries.issues.iter().cloned());
    };
    match memo {
        None => {
            for service in &snapshot.services {
                add(&service_entries(service), issues);
            }
        }
        Some(memo) => {
            memo.pass += 1;
            let pass = memo.pass;
            for service in &snapshot.services {
                let memoised = memo
                    .services
                    .entry(Arc::as_ptr(service) as usize)
                    .or_insert_with(|| Memoised {
                        _object: Arc::clone(service),
                        entries: service_entries(service),
                        seen: pass,
                    });
                memoised.seen = pass;
                add(&memoised.entries, issues);
            }
            memo.services.retain(|_, m| m.seen == pass);
        }
    }
    ServiceSets {
        v4: FamilyServices {
            ports: ports4.into_iter().collect(),
            local_tcp: tcp4.into_iter().collect(),
            local_udp: udp4.into_iter().collect(),
        },
        v6: FamilyServices {
            ports: ports6.into_iter().collect(),
            local_tcp: tcp6.into_iter().collect(),
            local_udp: udp6.into_iter().collect(),
        },
    }
}

fn service_entries(service: &Service) -> ServiceEntries {
    let mut out = ServiceEntries::default();
    let Some(spec) = &service.spec else {
        return out;
    };
    if ignored_by_kube_proxy(&service.metadata) {
        return out;
    }
    let mut ips = Vec::new();
    cluster_ips(service, &mut out.issues, &mut ips);
    if ips.is_empty() {
        return out;
    }
    let (has_v4, has_v6) = (
        ips.iter().any(IpAddr::is_ipv4),
        ips.iter().any(IpAddr::is_ipv6),
    );
    let etp_local = spec.external_traffic_policy.as_deref() == Some("Local")
        && matches!(spec.type_.as_deref(), Some("NodePort" | "LoadBalancer"));
    for port in spec.ports.iter().flatten() {
        let protocol = port.protocol.as_deref().unwrap_or("TCP");
        let proto = match protocol {
            "TCP" => Proto::Tcp,
            "UDP" => Proto::Udp,
            "SCTP" => Proto::Sctp,
            other => {
                out.issues.push(Issue {
                    kind: Kind::Service.name(),
                    object: object_name(&service.metadata),
                    message: format!("unknown port protocol {other:?}; port skipped"),
                });
                continue;
            }
        };
        let Ok(number) = u16::try_from(port.port) else {
            out.issues.push(Issue {
                kind: Kind::Service.name(),
                object: object_name(&service.metadata),
                message: format!("port {} out of range; port skipped", port.port),
            });
            continue;
        };
        for ip in &ips {
            match *ip {
                IpAddr::V4(addr) => out.ports4.push(ServicePort {
                    addr,
                    proto,
                    port: number,
                }),
                IpAddr::V6(addr) => out.ports6.push(ServicePort {
                    addr,
                    proto,
                    port: number,
                }),
            }
        }
        let node_port = port
            .node_port
            .and_then(|p| u16::try_from(p).ok())
            .filter(|p| *p != 0);
        if let (true, Some(node_port)) = (etp_local, node_port) {
            // kube-proxy keeps SCTP in a hash:ip,port set Kube-OVN never matches.
            let (v4, v6) = match proto {
                Proto::Tcp => (&mut out.local_tcp4, &mut out.local_tcp6),
                Proto::Udp => (&mut out.local_udp4, &mut out.local_udp6),
                Proto::Sctp => continue,
            };
            if has_v4 {
                v4.push(node_port);
            }
            if has_v6 {
                v6.push(node_port);
            }
        }
    }
    out
}

/// `spec.clusterIPs`, falling back to `spec.clusterIP`, appended to `ips`; `None` (headless) is
/// no address, and an unparsable value is reported and skipped.
fn cluster_ips(service: &Service, issues: &mut Vec<Issue>, ips: &mut Vec<IpAddr>) {
    let Some(spec) = &service.spec else {
        return;
    };
    let listed: &[String] = match (&spec.cluster_ips, &spec.cluster_ip) {
        (Some(list), _) if !list.is_empty() => list,
        (_, Some(one)) => std::slice::from_ref(one),
        _ => &[],
    };
    for text in listed
        .iter()
        .filter(|ip| !ip.is_empty() && ip.as_str() != "None")
    {
        match parse_ip_sloppy(text) {
            Some(ip) => ips.push(ip),
            None => issues.push(Issue {
                kind: Kind::Service.name(),
                object: object_name(&service.metadata),
                message: format!("invalid clusterIP {text:?}; address skipped"),
            }),
        }
    }
}

/// k8s.io/utils' `ParseIPSloppy`, which kube-proxy parses ClusterIPs with
/// (<https://github.com/kubernetes/kubernetes/blob/v1.33.0/pkg/proxy/serviceport.go#L186>): Go's
/// `net.ParseIP` from before Go 1.17, so IPv4 parts may have leading zeros and are still read as
/// decimal (`010.096.000.010` is 10.96.0.10), kept for objects stored by old API servers.
fn parse_ip_sloppy(text: &str) -> Option<IpAddr> {
    fn v4(text: &str) -> Option<Ipv4Addr> {
        let mut octets = [0u8; 4];
        let mut parts = text.split('.');
        for octet in &mut octets {
            let part = parts.next()?;
            // Go's dtoi: at least one digit, all digits; the value must fit a byte.
            if part.is_empty() || !part.bytes().all(|b| b.is_ascii_digit()) {
                return None;
            }
            let value = part.trim_start_matches('0');
            *octet = if value.is_empty() {
                0
            } else {
                value.parse().ok()?
            };
        }
        parts.next().is_none().then(|| Ipv4Addr::from(octets))
    }
    // As Go: the first '.' or ':' decides the family.
    match text.find(['.', ':']).map(|i| &text[i..=i]) {
        Some(".") => v4(text).map(IpAddr::V4),
        Some(":") => {
            if let Ok(ip) = text.parse::<Ipv6Addr>() {
                return Some(IpAddr::V6(ip));
            }
            // An embedded IPv4 tail is parsed sloppily too.
            let (head, tail) = text.rsplit_once(':')?;
            let tail = v4(tail)?;
            format!("{head}:{tail}").parse().ok().map(IpAddr::V6)
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests;
