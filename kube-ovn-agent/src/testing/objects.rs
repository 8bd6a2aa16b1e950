//! Builders for the Kubernetes objects the agent reads, and the cluster of spec §5.1.

use std::{fmt::Write as _, sync::Arc};

use k8s_openapi::{
    api::{
        core::v1::{
            Container, ContainerPort, GRPCAction, HTTPGetAction, Node, NodeAddress, NodeStatus,
            Pod, PodIP, PodSpec, PodStatus, Probe, Service, ServicePort, ServiceSpec,
            TCPSocketAction,
        },
        networking::v1::{ServiceCIDR, ServiceCIDRSpec, ServiceCIDRStatus},
    },
    apimachinery::pkg::apis::meta::v1::{Condition, ObjectMeta, Time},
};

use crate::cluster::{Snapshot, Subnet, SubnetSpec};

fn meta(name: &str) -> ObjectMeta {
    let (namespace, name) = match name.split_once('/') {
        Some((ns, n)) => (Some(ns.to_owned()), n),
        None => (None, name),
    };
    ObjectMeta {
        name: Some(name.to_owned()),
        namespace,
        ..ObjectMeta::default()
    }
}

/// A distributed, overlay Subnet of the default VPC.
pub fn subnet(name: &str, cidr_block: &str) -> Subnet {
    Subnet {
        metadata: meta(name),
        spec: SubnetSpec {
            vpc: "ovn-cluster".into(),
            cidr_block: cidr_block.into(),
            protocol: if cidr_block.contains(',') {
                "Dual".into()
            } else if cidr_block.contains(':') {
                "IPv6".into()
            } else {
                "IPv4".into()
            },
            gateway_type: "distributed".into(),
            ..SubnetSpec::default()
        },
        decode_error: None,
    }
}

/// `subnet` with a change applied.
pub fn subnet_with(name: &str, cidr_block: &str, change: impl FnOnce(&mut Subnet)) -> Subnet {
    let mut s = subnet(name, cidr_block);
    change(&mut s);
    s
}

/// A Node with these InternalIPs (and a Hostname address) on a dual-stack Kube-OVN: its
/// `ovn.kubernetes.io/ip_address` annotation holds a join address of each family.
pub fn node(name: &str, internal_ips: &[&str]) -> Node {
    let mut metadata = meta(name);
    metadata.annotations = Some(
        [(
            crate::cluster::IP_ADDRESS_ANNOTATION.to_owned(),
            DUAL_STACK_JOIN.to_owned(),
        )]
        .into(),
    );
    Node {
        metadata,
        status: Some(NodeStatus {
            addresses: Some(
                internal_ips
                    .iter()
                    .map(|ip| NodeAddress {
                        type_: "InternalIP".into(),
                        address: (*ip).into(),
                    })
                    .chain([NodeAddress {
                        type_: "Hostname".into(),
                        address: name.into(),
                    }])
                    .collect(),
            ),
            ..NodeStatus::default()
        }),
        ..Node::default()
    }
}

/// The `ovn.kubernetes.io/ip_address` annotation `node` writes.
pub const DUAL_STACK_JOIN: &str = "100.64.0.2,fd00:100:64::2";

/// `node` with the `ovn.kubernetes.io/ip_address` annotation set to `join` (`None`: absent).
pub fn node_with_join(name: &str, internal_ips: &[&str], join: Option<&str>) -> Node {
    let mut n = node(name, internal_ips);
    n.metadata.annotations = join.map(|j| {
        [(
            crate::cluster::IP_ADDRESS_ANNOTATION.to_owned(),
            j.to_owned(),
        )]
        .into()
    });
    n
}

/// One port of a Service: protocol, port, optional nodePort.
pub struct Port(pub &'static str, pub i32, pub Option<i32>);

/// A Service of `type_` (`ClusterIP`, `NodePort`, `LoadBalancer`, `ExternalName`).
pub fn service(
    name: &str,
    type_: &str,
    cluster_ips: &[&str],
    ports: &[Port],
    etp_local: bool,
) -> Service {
    Service {
        metadata: meta(name),
        spec: Some(ServiceSpec {
            type_: Some(type_.into()),
            cluster_ip: cluster_ips.first().map(|ip| (*ip).into()),
            cluster_ips: Some(cluster_ips.iter().map(|ip| (*ip).into()).collect()),
            external_traffic_policy: (type_ == "NodePort" || type_ == "LoadBalancer")
                .then(|| if etp_local { "Local" } else { "Cluster" }.into()),
            ports: Some(
                ports
                    .iter()
                    .map(|Port(protocol, port, node_port)| ServicePort {
                        protocol: Some((*protocol).into()),
                        port: *port,
                        node_port: *node_port,
                        ..ServicePort::default()
                    })
                    .collect(),
            ),
            ..ServiceSpec::default()
        }),
        ..Service::default()
    }
}

pub fn service_cidr(name: &str, cidrs: &[&str], ready: bool) -> ServiceCIDR {
    ServiceCIDR {
        metadata: meta(name),
        spec: Some(ServiceCIDRSpec {
            cidrs: Some(cidrs.iter().map(|c| (*c).into()).collect()),
        }),
        status: Some(ServiceCIDRStatus {
            conditions: Some(vec![Condition {
                type_: "Ready".into(),
                status: if ready { "True" } else { "False" }.into(),
                last_transition_time: Time(k8s_openapi::jiff::Timestamp::UNIX_EPOCH),
                message: String::new(),
                reason: "Test".into(),
                observed_generation: None,
            }]),
        }),
    }
}

/// A probe of a pod's container: what it connects to.
pub enum ProbeOn {
    Tcp(i32),
    /// A named container port.
    HttpNamed(&'static str),
    Grpc(i32),
}

fn probe(on: &ProbeOn) -> Probe {
    use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
    match on {
        ProbeOn::Tcp(port) => Probe {
            tcp_socket: Some(TCPSocketAction {
                port: IntOrString::Int(*port),
                ..TCPSocketAction::default()
            }),
            ..Probe::default()
        },
        ProbeOn::HttpNamed(name) => Probe {
            http_get: Some(HTTPGetAction {
                port: IntOrString::String((*name).into()),
                ..HTTPGetAction::default()
            }),
            ..Probe::default()
        },
        ProbeOn::Grpc(port) => Probe {
            grpc: Some(GRPCAction {
                port: *port,
                service: None,
            }),
            ..Probe::default()
        },
    }
}

/// The probes of a pod's container.
#[derive(Default)]
pub struct Probes {
    pub readiness: Option<ProbeOn>,
    pub liveness: Option<ProbeOn>,
    pub startup: Option<ProbeOn>,
}

impl Probes {
    /// Only a readiness probe.
    pub fn ready(on: ProbeOn) -> Self {
        Self {
            readiness: Some(on),
            ..Self::default()
        }
    }
}

/// A pod on `node` in `subnet` (the `ovn.kubernetes.io/logical_switch` annotation) with one
/// container: its probes and its named ports.
pub fn pod(
    name: &str,
    node: &str,
    subnet: &str,
    ips: &[&str],
    probes: &Probes,
    named_ports: &[(&str, i32)],
) -> Pod {
    let mut metadata = meta(name);
    metadata.annotations = Some(
        [(
            crate::cluster::LOGICAL_SWITCH_ANNOTATION.to_owned(),
            subnet.to_owned(),
        )]
        .into(),
    );
    Pod {
        metadata,
        spec: Some(PodSpec {
            node_name: Some(node.into()),
            containers: vec![Container {
                name: "app".into(),
                readiness_probe: probes.readiness.as_ref().map(probe),
                liveness_probe: probes.liveness.as_ref().map(probe),
                startup_probe: probes.startup.as_ref().map(probe),
                ports: Some(
                    named_ports
                        .iter()
                        .map(|(n, p)| ContainerPort {
                            name: Some((*n).into()),
                            container_port: *p,
                            ..ContainerPort::default()
                        })
                        .collect(),
                ),
                ..Container::default()
            }],
            ..PodSpec::default()
        }),
        status: Some(PodStatus {
            pod_ips: Some(ips.iter().map(|ip| PodIP { ip: (*ip).into() }).collect()),
            ..PodStatus::default()
        }),
    }
}

/// The cluster of spec §5.1. Besides the fixture's `kubernetes` and `kube-dns` Services it has
/// the NodePort Services vectors 11–30 hit: `np-local` (ETP=Local, tcp 30080 / udp 30053,
/// ClusterIPs `10.96.0.100` and `fd00:10:96::100`) and `np-cluster` (ETP=Cluster, tcp 30081).
pub fn spec_cluster() -> Snapshot {
    Snapshot {
        subnets: [
            subnet("ovn-default", "10.16.0.0/16,fd00:10:16::/64"),
            subnet("join", "100.64.0.0/16"),
            subnet_with("central", "10.17.0.0/16", |s| {
                s.spec.gateway_type = "centralized".into();
                s.spec.nat_outgoing = true;
            }),
            subnet_with("ul", "172.18.0.0/24", |s| {
                s.spec.vlan = "vlan10".into();
                s.spec.u2o_interconnection = true;
            }),
            subnet_with("vpc1-sub", "10.0.1.0/24", |s| s.spec.vpc = "vpc1".into()),
        ]
        .into_iter()
        .map(Arc::new)
        .collect(),
        nodes: [
            node("n1", &["192.168.0.11", "fd00::11"]),
            node("n2", &["192.168.0.12", "fd00::12"]),
            node("n3", &["192.168.0.13"]),
        ]
        .into_iter()
        .map(Arc::new)
        .collect(),
        services: [
            service(
                "default/kubernetes",
                "ClusterIP",
                &["10.96.0.1", "fd00:10:96::1"],
                &[Port("TCP", 443, None)],
                false,
            ),
            service(
                "kube-system/kube-dns",
                "ClusterIP",
                &["10.96.0.10"],
                &[Port("UDP", 53, None), Port("TCP", 53, None)],
                false,
            ),
            service(
                "default/np-local",
                "NodePort",
                &["10.96.0.100", "fd00:10:96::100"],
                &[Port("TCP", 80, Some(30080)), Port("UDP", 53, Some(30053))],
                true,
            ),
            service(
                "default/np-cluster",
                "NodePort",
                &["10.96.0.101"],
                &[Port("TCP", 80, Some(30081))],
                false,
            ),
        ]
        .into_iter()
        .map(Arc::new)
        .collect(),
        service_cidrs: Vec::new(),
        pods: Vec::new(),
    }
}

/// A cluster file (`--source file:`) of `services` Services as `kubectl get -o yaml` prints them
/// (uid, resourceVersion, labels, a selector, IP families, status), Subnet `ovn-default` and Node
/// `n1` (192.168.0.11, IPv4 join address 100.64.0.2), so the Services are programmed. `variant` changes the first port of
/// every hundredth Service, so each variant is a new version with the same objects.
pub fn cluster_file(services: usize, variant: u16) -> String {
    let mut text = String::from(
        "apiVersion: v1\nkind: List\nitems:\n\
         - apiVersion: kubeovn.io/v1\n  kind: Subnet\n  metadata: {name: ovn-default}\n  \
         spec: {vpc: ovn-cluster, cidrBlock: 10.16.0.0/16, protocol: IPv4}\n\
         - apiVersion: v1\n  kind: Node\n  metadata:\n    name: n1\n    \
         annotations: {ovn.kubernetes.io/ip_address: 100.64.0.2}\n  status:\n    \
         addresses: [{type: InternalIP, address: 192.168.0.11}]\n",
    );
    for i in 0..services {
        let [_, a, b, c] = u32::try_from(i).expect("small").to_be_bytes();
        let ip = format!("10.{}.{b}.{c}", 96 + a);
        let port = 80 + if i % 100 == 0 { variant } else { 0 };
        writeln!(
            text,
            "- apiVersion: v1\n  kind: Service\n  metadata:\n    name: svc-{i}\n    \
             namespace: bench\n    uid: 5f1c2a4e-0000-4000-8000-{i:012}\n    \
             resourceVersion: \"{rv}\"\n    creationTimestamp: \"2026-01-01T00:00:00Z\"\n    \
             labels: {{app: svc-{i}, tier: backend}}\n  spec:\n    type: ClusterIP\n    \
             clusterIP: {ip}\n    clusterIPs: [{ip}]\n    ipFamilies: [IPv4]\n    \
             ipFamilyPolicy: SingleStack\n    internalTrafficPolicy: Cluster\n    \
             sessionAffinity: None\n    selector: {{app: svc-{i}}}\n    ports:\n    \
             - {{name: http, port: {port}, protocol: TCP, targetPort: 8080}}\n    \
             - {{name: https, port: 443, protocol: TCP, targetPort: 8443}}\n  \
             status:\n    loadBalancer: {{}}",
            rv = 100_000 + i,
        )
        .expect("write to a String");
    }
    text
}
