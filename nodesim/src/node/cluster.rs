//! The cluster the simulated node belongs to — Subnets, Nodes, Services (with the endpoints a
//! kube-proxy would program) — as plain data. Everything else is derived from it: Kube-OVN's
//! ipset contents (spec §2, computed here independently of the agent), kube-proxy's IPVS sets,
//! and the kubectl-style YAML the agent reads with `--source file:PATH`. One source of truth, so
//! the iptables oracle and the agent are fed the same facts.
//!
//! [`Cluster::fixture`] is spec §5.1 plus what a working node needs on top (endpoints, NodePort
//! Services' own ClusterIPs, IPv6 halves of the join and centralized subnets); `docs/e2e.md`
//! lists the additions.

use std::{
    fmt::{self, Write as _},
    net::IpAddr,
    str::FromStr,
};

use anyhow::{Context as _, Result, bail};

use super::{Family, L4, topology::addr};

/// An address prefix, e.g. `10.16.0.0/16`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cidr {
    pub addr: IpAddr,
    pub len: u8,
}

impl Cidr {
    pub fn family(&self) -> Family {
        Family::of(self.addr)
    }
}

impl FromStr for Cidr {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<Self> {
        let (addr, len) = s.split_once('/').context("CIDR without a prefix length")?;
        let addr: IpAddr = addr.parse().with_context(|| format!("address in {s:?}"))?;
        let len: u8 = len
            .parse()
            .with_context(|| format!("prefix length in {s:?}"))?;
        if len > Family::of(addr).bits() {
            bail!("prefix length too long in {s:?}");
        }
        Ok(Self { addr, len })
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

fn cidrs(list: &str) -> Vec<Cidr> {
    list.split(',')
        .map(|c| c.parse().expect("fixture CIDR"))
        .collect()
}

/// `kubeovn.io/v1` Subnet, the fields spec §2 reads.
#[derive(Clone, Debug)]
pub struct Subnet {
    pub name: String,
    /// `spec.cidrBlock`, one entry per family.
    pub cidr_block: Vec<Cidr>,
    pub vpc: String,
    /// `IPv4`, `IPv6` or `Dual`.
    pub protocol: &'static str,
    /// `distributed`, `centralized`, or empty (unset).
    pub gateway_type: &'static str,
    pub nat_outgoing: bool,
    pub vlan: &'static str,
    pub logical_gateway: bool,
    pub u2o_interconnection: bool,
}

impl Subnet {
    fn new(name: &str, cidr_block: &str, protocol: &'static str) -> Self {
        Self {
            name: name.into(),
            cidr_block: cidrs(cidr_block),
            vpc: DEFAULT_VPC.into(),
            protocol,
            gateway_type: "",
            nat_outgoing: false,
            vlan: "",
            logical_gateway: false,
            u2o_interconnection: false,
        }
    }

    fn default_vpc_overlay(&self) -> bool {
        self.vpc == DEFAULT_VPC && (self.vlan.is_empty() || self.logical_gateway)
    }

    fn protocol_has(&self, family: Family) -> bool {
        self.protocol == "Dual" || self.protocol == family.kube_ovn_protocol()
    }

    fn cidr(&self, family: Family) -> Option<Cidr> {
        self.cidr_block
            .iter()
            .copied()
            .find(|c| c.family() == family)
    }
}

/// Kube-OVN's default `--cluster-router`.
pub const DEFAULT_VPC: &str = "ovn-cluster";

#[derive(Clone, Debug)]
pub struct Node {
    pub name: String,
    pub internal_ips: Vec<IpAddr>,
}

#[derive(Clone, Debug)]
pub struct ServicePort {
    pub name: &'static str,
    pub proto: L4,
    pub port: u16,
    /// Where the endpoints listen.
    pub target_port: u16,
    pub node_port: Option<u16>,
}

#[derive(Clone, Debug)]
pub struct Service {
    pub namespace: &'static str,
    pub name: String,
    /// `None` for ClusterIP Services; `Some(local)` for NodePort ones, `local` meaning
    /// `externalTrafficPolicy: Local`.
    pub node_port_local: Option<bool>,
    pub cluster_ips: Vec<IpAddr>,
    pub ports: Vec<ServicePort>,
    /// One endpoint address per family (the simulated node has one backend per Service).
    pub endpoints: Vec<IpAddr>,
    /// The caller runs the servers behind these endpoints itself (a benchmark's own request
    /// handlers); the node starts no backend for this Service.
    pub own_backend: bool,
}

impl Service {
    pub fn endpoint(&self, family: Family) -> Option<IpAddr> {
        self.endpoints
            .iter()
            .copied()
            .find(|a| Family::of(*a) == family)
    }

    pub fn cluster_ip(&self, family: Family) -> Option<IpAddr> {
        self.cluster_ips
            .iter()
            .copied()
            .find(|a| Family::of(*a) == family)
    }
}

#[derive(Clone, Debug)]
pub struct Cluster {
    /// The node the agent runs for (`--node-name`).
    pub local_node: String,
    /// `--service-cluster-ip-range`.
    pub service_cidrs: Vec<Cidr>,
    pub subnets: Vec<Subnet>,
    pub nodes: Vec<Node>,
    pub services: Vec<Service>,
}

/// What the node's Kube-OVN sets hold for one family (spec §2).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct OvnSets {
    pub subnets: Vec<Cidr>,
    pub services: Vec<Cidr>,
    pub subnets_nat: Vec<Cidr>,
    pub subnets_distributed_gw: Vec<Cidr>,
    pub other_node: Vec<IpAddr>,
}

/// What kube-proxy's IPVS-mode sets hold for one family.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KubeProxySets {
    /// `KUBE[-6]-CLUSTER-IP`: (ClusterIP, protocol, port).
    pub cluster_ip: Vec<(IpAddr, L4, u16)>,
    /// `KUBE[-6]-NODE-PORT-LOCAL-{TCP,UDP}`.
    pub node_port_local_tcp: Vec<u16>,
    pub node_port_local_udp: Vec<u16>,
    /// `KUBE[-6]-NODE-PORT-{TCP,UDP}`: every node port.
    pub node_port_tcp: Vec<u16>,
    pub node_port_udp: Vec<u16>,
}

impl Cluster {
    /// Spec §5.1's cluster, with the endpoints and extra Services listed in `docs/e2e.md`.
    pub fn fixture() -> Self {
        let mut ovn_default = Subnet::new("ovn-default", "10.16.0.0/16,fd00:10:16::/64", "Dual");
        ovn_default.gateway_type = "distributed";
        ovn_default.nat_outgoing = true;
        let join = Subnet::new("join", "100.64.0.0/16,fd00:100:64::/64", "Dual");
        let mut central = Subnet::new("central", "10.17.0.0/16,fd00:10:17::/64", "Dual");
        central.gateway_type = "centralized";
        central.nat_outgoing = true;
        let mut ul = Subnet::new("ul", "172.18.0.0/24", "IPv4");
        ul.vlan = "vlan10";
        ul.u2o_interconnection = true;
        let mut vpc1 = Subnet::new("vpc1-sub", "10.0.1.0/24", "IPv4");
        vpc1.vpc = "vpc1".into();

        let node = |name: &str, ips: &[IpAddr]| Node {
            name: name.into(),
            internal_ips: ips.to_vec(),
        };
        Self {
            local_node: "node1".into(),
            service_cidrs: cidrs("10.96.0.0/12,fd00:10:96::/112"),
            subnets: vec![ovn_default, join, central, ul, vpc1],
            nodes: vec![
                node("node1", &[addr::NODE_V4.into(), addr::NODE_V6.into()]),
                node("node2", &[addr::OTHER_V4.into(), addr::OTHER_V6.into()]),
                node("node3", &[addr::THIRD_NODE_V4.into()]),
            ],
            services: fixture_services(),
        }
    }

    pub fn local_internal_ip(&self, family: Family) -> Option<IpAddr> {
        self.nodes
            .iter()
            .find(|n| n.name == self.local_node)?
            .internal_ips
            .iter()
            .copied()
            .find(|a| Family::of(*a) == family)
    }

    /// Kube-OVN's `ovn40*`/`ovn60*` contents (spec §2, v1.13.15 filters).
    pub fn ovn_sets(&self, family: Family) -> OvnSets {
        let overlay = || self.subnets.iter().filter(|s| s.default_vpc_overlay());
        OvnSets {
            subnets: overlay().filter_map(|s| s.cidr(family)).collect(),
            services: self
                .service_cidrs
                .iter()
                .copied()
                .filter(|c| c.family() == family)
                .collect(),
            subnets_nat: overlay()
                .filter(|s| s.nat_outgoing && s.protocol_has(family))
                .filter_map(|s| s.cidr(family))
                .collect(),
            subnets_distributed_gw: overlay()
                .filter(|s| s.gateway_type == "distributed" && s.protocol_has(family))
                .filter_map(|s| s.cidr(family))
                .collect(),
            other_node: self
                .nodes
                .iter()
                .filter(|n| n.name != self.local_node)
                .flat_map(|n| n.internal_ips.iter().copied())
                .filter(|a| Family::of(*a) == family)
                .collect(),
        }
    }

    /// kube-proxy's IPVS-mode sets. As in kube-proxy, a Service feeds a family's sets only when
    /// it has a ClusterIP of that family.
    pub fn kube_proxy_sets(&self, family: Family) -> KubeProxySets {
        let mut sets = KubeProxySets::default();
        for service in &self.services {
            let Some(cluster_ip) = service.cluster_ip(family) else {
                continue;
            };
            for port in &service.ports {
                sets.cluster_ip.push((cluster_ip, port.proto, port.port));
                let Some(node_port) = port.node_port else {
                    continue;
                };
                let (all, local) = match port.proto {
                    L4::Tcp => (&mut sets.node_port_tcp, &mut sets.node_port_local_tcp),
                    L4::Udp => (&mut sets.node_port_udp, &mut sets.node_port_local_udp),
                };
                all.push(node_port);
                if service.node_port_local == Some(true) {
                    local.push(node_port);
                }
            }
        }
        sets
    }

    /// kubectl-style multi-document YAML of every object, for the agent's `--source file:PATH`.
    pub fn to_yaml(&self) -> String {
        let mut out = String::new();
        for subnet in &self.subnets {
            subnet_yaml(&mut out, subnet);
        }
        for node in &self.nodes {
            node_yaml(&mut out, node);
        }
        for service in &self.services {
            service_yaml(&mut out, service);
        }
        out
    }

    /// The `--service-cluster-ip-range` value.
    pub fn service_cidr_flag(&self) -> String {
        join(self.service_cidrs.iter())
    }
}

fn join<T: fmt::Display>(items: impl Iterator<Item = T>) -> String {
    items.map(|i| i.to_string()).collect::<Vec<_>>().join(",")
}

fn fixture_services() -> Vec<Service> {
    let port = |name, proto, port, target_port, node_port| ServicePort {
        name,
        proto,
        port,
        target_port,
        node_port,
    };
    let service = |namespace,
                   name: &str,
                   node_port_local,
                   cluster_ips: &[IpAddr],
                   ports,
                   endpoints: &[IpAddr]| Service {
        namespace,
        name: name.into(),
        node_port_local,
        cluster_ips: cluster_ips.to_vec(),
        ports,
        endpoints: endpoints.to_vec(),
        own_backend: false,
    };
    vec![
        // The apiserver runs host-network on the other node, as in most clusters.
        service(
            "default",
            "kubernetes",
            None,
            &[addr::KUBERNETES_V4.into(), addr::KUBERNETES_V6.into()],
            vec![port("https", L4::Tcp, 443, 6443, None)],
            &[addr::OTHER_V4.into(), addr::OTHER_V6.into()],
        ),
        service(
            "kube-system",
            "kube-dns",
            None,
            &[addr::KUBE_DNS_V4.into()],
            vec![
                port("dns", L4::Udp, 53, 53, None),
                port("dns-tcp", L4::Tcp, 53, 53, None),
            ],
            &[addr::BACKEND_V4.into()],
        ),
        service(
            "default",
            "web-local",
            Some(true),
            &[addr::WEB_LOCAL_V4.into(), addr::WEB_LOCAL_V6.into()],
            vec![
                port("http", L4::Tcp, 80, 80, Some(30080)),
                port("dns", L4::Udp, 53, 53, Some(30053)),
            ],
            &[addr::BACKEND_V4.into(), addr::BACKEND_V6.into()],
        ),
        service(
            "default",
            "web-central",
            Some(true),
            &[addr::WEB_CENTRAL_V4.into(), addr::WEB_CENTRAL_V6.into()],
            vec![port("http", L4::Tcp, 80, 80, Some(30082))],
            &[addr::CENTRAL_POD_V4.into(), addr::CENTRAL_POD_V6.into()],
        ),
        service(
            "default",
            "web-cluster",
            Some(false),
            &[addr::WEB_CLUSTER_V4.into(), addr::WEB_CLUSTER_V6.into()],
            vec![port("http", L4::Tcp, 80, 80, Some(30081))],
            &[addr::BACKEND_V4.into(), addr::BACKEND_V6.into()],
        ),
    ]
}

fn subnet_yaml(out: &mut String, s: &Subnet) {
    let cidr_block = join(s.cidr_block.iter());
    let _ = write!(
        out,
        "---\napiVersion: kubeovn.io/v1\nkind: Subnet\nmetadata:\n  name: {}\nspec:\n  \
         cidrBlock: \"{cidr_block}\"\n  vpc: {}\n  protocol: {}\n  natOutgoing: {}\n",
        s.name, s.vpc, s.protocol, s.nat_outgoing
    );
    if !s.gateway_type.is_empty() {
        let _ = writeln!(out, "  gatewayType: {}", s.gateway_type);
    }
    if !s.vlan.is_empty() {
        let _ = writeln!(
            out,
            "  vlan: {}\n  logicalGateway: {}\n  u2oInterconnection: {}",
            s.vlan, s.logical_gateway, s.u2o_interconnection
        );
    }
}

fn node_yaml(out: &mut String, n: &Node) {
    let _ = write!(
        out,
        // The join-address annotation names the families kube-ovn-cni runs (dual stack here).
        "---\napiVersion: v1\nkind: Node\nmetadata:\n  name: {}\n  annotations:\n    \
         ovn.kubernetes.io/ip_address: 100.64.0.2,fd00:100:64::2\nstatus:\n  addresses:\n",
        n.name
    );
    for ip in &n.internal_ips {
        let _ = writeln!(out, "  - type: InternalIP\n    address: \"{ip}\"");
    }
    let _ = writeln!(out, "  - type: Hostname\n    address: {}", n.name);
}

fn service_yaml(out: &mut String, s: &Service) {
    let families: Vec<&str> = s
        .cluster_ips
        .iter()
        .map(|a| Family::of(*a).kube_ip_family())
        .collect();
    let _ = write!(
        out,
        "---\napiVersion: v1\nkind: Service\nmetadata:\n  name: {}\n  namespace: {}\nspec:\n  \
         type: {}\n  clusterIP: \"{}\"\n  clusterIPs: [{}]\n  ipFamilies: [{}]\n  \
         ipFamilyPolicy: {}\n",
        s.name,
        s.namespace,
        if s.node_port_local.is_some() {
            "NodePort"
        } else {
            "ClusterIP"
        },
        s.cluster_ips[0],
        join(s.cluster_ips.iter().map(|a| format!("\"{a}\""))),
        families.join(", "),
        if s.cluster_ips.len() > 1 {
            "RequireDualStack"
        } else {
            "SingleStack"
        },
    );
    if let Some(local) = s.node_port_local {
        let _ = writeln!(
            out,
            "  externalTrafficPolicy: {}",
            if local { "Local" } else { "Cluster" }
        );
    }
    out.push_str("  ports:\n");
    for p in &s.ports {
        let _ = write!(
            out,
            "  - name: {}\n    protocol: {}\n    port: {}\n    targetPort: {}\n",
            p.name,
            p.proto.kube_name(),
            p.port,
            p.target_port
        );
        if let Some(node_port) = p.node_port {
            let _ = writeln!(out, "    nodePort: {node_port}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings<T: fmt::Display>(v: &[T]) -> Vec<String> {
        v.iter().map(ToString::to_string).collect()
    }

    /// The derived sets are spec §5.1's "Resulting sets".
    #[test]
    fn fixture_sets_match_the_spec() {
        let c = Cluster::fixture();
        let v4 = c.ovn_sets(Family::V4);
        assert_eq!(
            strings(&v4.subnets),
            ["10.16.0.0/16", "100.64.0.0/16", "10.17.0.0/16"]
        );
        assert_eq!(strings(&v4.services), ["10.96.0.0/12"]);
        assert_eq!(strings(&v4.subnets_nat), ["10.16.0.0/16", "10.17.0.0/16"]);
        assert_eq!(strings(&v4.subnets_distributed_gw), ["10.16.0.0/16"]);
        assert_eq!(strings(&v4.other_node), ["192.168.0.12", "192.168.0.13"]);
        let v6 = c.ovn_sets(Family::V6);
        assert_eq!(strings(&v6.services), ["fd00:10:96::/112"]);
        assert_eq!(strings(&v6.other_node), ["fd00::12"]);
        let kp = c.kube_proxy_sets(Family::V4);
        for entry in [
            ("10.96.0.1", L4::Tcp, 443),
            ("10.96.0.10", L4::Udp, 53),
            ("10.96.0.10", L4::Tcp, 53),
        ] {
            let entry = (entry.0.parse().unwrap(), entry.1, entry.2);
            assert!(kp.cluster_ip.contains(&entry), "{entry:?}");
        }
        assert_eq!(kp.node_port_local_tcp, [30080, 30082]);
        assert_eq!(kp.node_port_local_udp, [30053]);
        assert_eq!(c.kube_proxy_sets(Family::V6).node_port_local_udp, [30053]);
    }

    #[test]
    fn yaml_names_every_object() {
        let yaml = Cluster::fixture().to_yaml();
        assert_eq!(yaml.matches("kind: Subnet").count(), 5);
        assert_eq!(yaml.matches("kind: Node").count(), 3);
        assert_eq!(
            yaml.matches("\n  annotations:\n    ovn.kubernetes.io/ip_address: 100.64.0.2,fd00:100:64::2\nstatus:").count(),
            3,
            "every Node names both families"
        );
        assert_eq!(yaml.matches("kind: Service").count(), 5);
        assert!(yaml.contains("cidrBlock: \"10.16.0.0/16,fd00:10:16::/64\""));
        assert!(yaml.contains("externalTrafficPolicy: Local"));
        assert!(yaml.contains("nodePort: 30053"));
    }
}
