//! Kube-OVN's TPROXY probe redirection: per-pod probe targets on this node.

use super::{
    BTreeMap, BTreeSet, IpAddr, Issue, Kind, LOGICAL_SWITCH_ANNOTATION, MapState, NodeFacts,
    NodeInternalIp, Options, ProbeTarget, Snapshot, Subnet, object_name, rule,
};

/// Kube-OVN's TPROXY rules (GL:930-986, `getTProxyConditionPod` G:254-291, `getProbePorts`
/// TP:64-98): for each pod on this node that is not on the host network and whose subnet (the
/// `ovn.kubernetes.io/logical_switch` annotation) is in a custom VPC, every liveness/readiness
/// probe port of every IP, steered to the listener on the node's IP of the family.
pub(super) fn tproxy(
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
pub(super) fn probe_ports(spec: &k8s_openapi::api::core::v1::PodSpec) -> BTreeSet<u16> {
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
