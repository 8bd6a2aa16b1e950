//! `ovnX0subnets` and `ovnX0services`: default-VPC Subnets and ServiceCIDRs.

use super::{
    BTreeSet, IpNet, Issue, Kind, Options, Snapshot, Subnet, go_address_family, go_parse_cidr,
    object_name,
};

/// ipset's hash:net refuses a zero prefix (`IPSET_ERR_INVALID_CIDR`); Kube-OVN's ipset update
/// then fails as a whole (felix retries and panics), so such a CIDR never matches there.
pub(super) fn programmable(net: &IpNet) -> bool {
    net.prefix_len() > 0
}

pub(super) fn unprogrammable_issue(kind: Kind, object: String, net: &IpNet) -> Issue {
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
pub(super) fn subnet_cidrs(block: &str) -> Result<(Option<IpNet>, Option<IpNet>), String> {
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
pub(super) fn default_vpc_subnets(
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

pub(super) fn is_default_vpc_overlay(subnet: &Subnet, cluster_router: &str) -> bool {
    subnet.spec.vpc == cluster_router
        && (subnet.spec.vlan.is_empty() || subnet.spec.logical_gateway)
}

/// `ovnX0services`: the ready ServiceCIDR objects' CIDRs when there are any (master's
/// `ServiceCIDRStore`), otherwise `--service-cluster-ip-range`.
pub(super) fn service_cidrs(
    snapshot: &Snapshot,
    options: &Options,
    issues: &mut Vec<Issue>,
) -> Vec<IpNet> {
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
