//! Which rules a family gets, from the node's addresses and kube-proxy's sets.

use super::{
    FamilySets, IP_ADDRESS_ANNOTATION, IpAddr, Ipv4Addr, Ipv6Addr, Issue, Kind, Node, ServiceMatch,
    go_address_family, object_name, rule,
};

/// The rules Kube-OVN installs for a family (GL:737-799).
pub(super) fn family_rules(
    sets: FamilySets,
    has_internal_ip: bool,
    service_match: ServiceMatch,
) -> u32 {
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

/// What `util.CheckProtocol` says about a comma-separated address list.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(super) struct Families {
    pub(super) v4: bool,
    pub(super) v6: bool,
}

/// `util.CheckProtocol`: one address of either family, or exactly two of different families;
/// anything else (two of one family, three or more, an unparsable one) is `""`, no family.
pub(super) fn check_protocol(text: &str) -> Families {
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
pub(super) struct NodeInternalIp {
    pub(super) v4: Option<Ipv4Addr>,
    pub(super) v6: Option<Ipv6Addr>,
}

/// `util.GetNodeInternalIP` (<https://github.com/kubeovn/kube-ovn/blob/v1.16.2/pkg/util/k8s.go#L88>,
/// the same in v1.13.x): all InternalIPs joined with "," and split by `SplitStringIP`, which
/// trusts `CheckProtocol` of the whole list. One address, or one of each family, work; two of one
/// family, or three and more, give `""` for both families, so such a node has no R2/R3 (and no
/// TPROXY listener) in either family.
pub(super) fn node_internal_ip(node: &Node) -> NodeInternalIp {
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
pub(super) fn kube_ovn_families(node: &Node, issues: &mut Vec<Issue>) -> Families {
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
