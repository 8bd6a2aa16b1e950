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
        add(&service_entries(&**service), issues);
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

/// A Service as the translation reads it: a `Service`, or a source's projection of one read in
/// place (the kube source's store), so a full read of the cluster costs no `Service` per object.
/// Both are translated by the one [`service_entries`].
pub trait ServiceView {
    /// `namespace/name` ([`object_name`]), for issues.
    fn name(&self) -> String;
    /// Whether kube-proxy ignores the Service for its labels ([`ignored_by_kube_proxy`]).
    fn ignored_by_kube_proxy(&self) -> bool;
    fn has_spec(&self) -> bool;
    /// `spec.type`.
    fn type_(&self) -> Option<&str>;
    /// `spec.externalTrafficPolicy`.
    fn external_traffic_policy(&self) -> Option<&str>;
    /// Each address kube-proxy reads, in order: `spec.clusterIPs`, or `spec.clusterIP` when
    /// that list is absent or empty.
    fn cluster_ips(&self, each: &mut dyn FnMut(ClusterIp<'_>));
    /// Each of `spec.ports`, in order.
    fn ports(&self, each: &mut dyn FnMut(PortView<'_>));
}

/// One ClusterIP of a [`ServiceView`].
#[derive(Clone, Copy, Debug)]
pub enum ClusterIp<'a> {
    /// The address whose canonical text (`Display`) the API gave: what parsing that text gives.
    Addr(IpAddr),
    /// The text as the API gave it, parsed as kube-proxy parses it.
    Text(&'a str),
}

/// One port of a [`ServiceView`].
#[derive(Clone, Copy, Debug)]
pub struct PortView<'a> {
    pub protocol: Option<&'a str>,
    pub port: i32,
    pub node_port: Option<i32>,
}

impl ServiceView for Service {
    fn name(&self) -> String {
        object_name(&self.metadata)
    }
    fn ignored_by_kube_proxy(&self) -> bool {
        ignored_by_kube_proxy(&self.metadata)
    }
    fn has_spec(&self) -> bool {
        self.spec.is_some()
    }
    fn type_(&self) -> Option<&str> {
        self.spec.as_ref()?.type_.as_deref()
    }
    fn external_traffic_policy(&self) -> Option<&str> {
        self.spec.as_ref()?.external_traffic_policy.as_deref()
    }
    fn cluster_ips(&self, each: &mut dyn FnMut(ClusterIp<'_>)) {
        let Some(spec) = &self.spec else {
            return;
        };
        let listed: &[String] = match (&spec.cluster_ips, &spec.cluster_ip) {
            (Some(list), _) if !list.is_empty() => list,
            (_, Some(one)) => std::slice::from_ref(one),
            _ => &[],
        };
        for text in listed {
            each(ClusterIp::Text(text));
        }
    }
    fn ports(&self, each: &mut dyn FnMut(PortView<'_>)) {
        let ports = self.spec.as_ref().and_then(|spec| spec.ports.as_ref());
        for port in ports.into_iter().flatten() {
            each(PortView {
                protocol: port.protocol.as_deref(),
                port: port.port,
                node_port: port.node_port,
            });
        }
    }
}

pub(super) fn service_entries<S: ServiceView + ?Sized>(service: &S) -> ServiceEntries {
    let mut out = ServiceEntries::default();
    if !service.has_spec() || service.ignored_by_kube_proxy() {
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
    let etp_local = service.external_traffic_policy() == Some("Local")
        && matches!(service.type_(), Some("NodePort" | "LoadBalancer"));
    service.ports(&mut |port| {
        let Some(proto) = Proto::from_service_port(port.protocol) else {
            let other = port.protocol.unwrap_or_default();
            out.issues.push(Issue {
                kind: Kind::Service.name(),
                object: service.name(),
                message: format!("unknown port protocol {other:?}; port skipped"),
            });
            return;
        };
        let Ok(number) = u16::try_from(port.port) else {
            out.issues.push(Issue {
                kind: Kind::Service.name(),
                object: service.name(),
                message: format!("port {} out of range; port skipped", port.port),
            });
            return;
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
                Proto::Sctp => return,
            };
            if has_v4 {
                v4.push(node_port);
            }
            if has_v6 {
                v6.push(node_port);
            }
        }
    });
    out
}

/// The Service's ClusterIPs ([`ServiceView::cluster_ips`]) appended to `ips`; `None` (headless)
/// is no address, and an unparsable value is reported and skipped.
pub(super) fn cluster_ips<S: ServiceView + ?Sized>(
    service: &S,
    issues: &mut Vec<Issue>,
    ips: &mut Vec<IpAddr>,
) {
    service.cluster_ips(&mut |ip| match ip {
        ClusterIp::Addr(ip) => ips.push(ip),
        ClusterIp::Text(text) if text.is_empty() || text == "None" => {}
        ClusterIp::Text(text) => match parse_ip_sloppy(text) {
            Some(ip) => ips.push(ip),
            None => issues.push(Issue {
                kind: Kind::Service.name(),
                object: service.name(),
                message: format!("invalid clusterIP {text:?}; address skipped"),
            }),
        },
    });
}
