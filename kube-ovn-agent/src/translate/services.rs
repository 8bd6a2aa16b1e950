//! kube-proxy's Service-derived sets: one Service's contribution at a time.

use super::{
    FamilyServices, IpAddr, Ipv4Addr, Ipv6Addr, Issue, Kind, Proto, Service, ServicePort,
    ServiceSets, Snapshot, ignored_by_kube_proxy, object_name, parse_ip_sloppy,
};

/// What one Service adds to kube-proxy's `KUBE[-6]-CLUSTER-IP` and
/// `KUBE[-6]-NODE-PORT-LOCAL-{TCP,UDP}`: a function of that object alone, so the incremental
/// translation keeps it instead of the object. As in kube-proxy's per-family proxier, a Service
/// contributes to a family only if it has a ClusterIP of that family.
#[derive(Debug, Default)]
pub(super) struct ServiceEntries {
    pub(super) ports4: Vec<ServicePort<Ipv4Addr>>,
    pub(super) ports6: Vec<ServicePort<Ipv6Addr>>,
    pub(super) local_tcp4: Vec<u16>,
    pub(super) local_udp4: Vec<u16>,
    pub(super) local_tcp6: Vec<u16>,
    pub(super) local_udp6: Vec<u16>,
    pub(super) issues: Vec<Issue>,
}

/// The sets of every Service of the snapshot. Entries are gathered in vectors and bulk-built
/// into sets, which is several times faster than inserting one by one.
pub(super) fn services(snapshot: &Snapshot, issues: &mut Vec<Issue>) -> ServiceSets {
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
    for service in &snapshot.services {
        add(&service_entries(service), issues);
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

pub(super) fn service_entries(service: &Service) -> ServiceEntries {
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
        let Some(proto) = Proto::from_service_port(port.protocol.as_deref()) else {
            let other = port.protocol.as_deref().unwrap_or_default();
            out.issues.push(Issue {
                kind: Kind::Service.name(),
                object: object_name(&service.metadata),
                message: format!("unknown port protocol {other:?}; port skipped"),
            });
            continue;
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
pub(super) fn cluster_ips(service: &Service, issues: &mut Vec<Issue>, ips: &mut Vec<IpAddr>) {
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
