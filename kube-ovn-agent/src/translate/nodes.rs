//! Node addresses: this node's InternalIPs and `ovnX0other-node`.

use super::{Addr, BTreeSet, IpAddr, Node, Snapshot, go_address_family};

pub(super) fn internal_ips(node: &Node) -> impl Iterator<Item = IpAddr> + '_ {
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
pub(super) fn other_nodes<A: Addr>(snapshot: &Snapshot, node_name: &str) -> BTreeSet<A> {
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
