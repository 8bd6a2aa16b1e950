//! Cluster snapshot + node facts → desired datapath state. Pure: no I/O, no clock.
//!
//! Every filter mirrors Kube-OVN v1.13.15 (spec §2) or kube-proxy's IPVS proxier for the sets
//! it owns; the comments name the rule each one reproduces.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use k8s_openapi::api::core::v1::{Node, Service};
use kube_ovn_ebpf_common::rule;
use serde::Serialize;

mod incremental;
mod nodes;
mod parse;
mod rules;
mod services;
mod subnets;
mod tproxy;

pub use self::{
    incremental::{Incremental, Step},
    nodes::own_internal_ips,
    services::{ClusterIp, PortView, ServiceView},
};
use self::{
    nodes::other_nodes,
    parse::{go_address_family, go_parse_cidr, parse_ip_sloppy},
    rules::{Families, NodeInternalIp, family_rules, kube_ovn_families, node_internal_ip},
    services::services,
    subnets::{default_vpc_subnets, service_cidrs},
    tproxy::tproxy,
};
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
#[derive(Clone, Debug, PartialEq, Eq)]
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
#[derive(Clone, Debug, Default, PartialEq, Eq)]
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
    translate_inner(snapshot, node, options)
}

fn translate_inner(snapshot: &Snapshot, node: &NodeFacts, options: &Options) -> Translation {
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
        services(snapshot, &mut issues)
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
    services(snapshot, &mut issues);
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

#[cfg(test)]
mod tests;
