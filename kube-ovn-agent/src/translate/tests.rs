//! The translation against the spec's fixture cluster and hand-built objects.

#![expect(
    clippy::field_reassign_with_default,
    reason = "tests fill one part of an otherwise empty snapshot"
)]

use std::sync::Arc;

use kube_ovn_ebpf_common::role;

use super::*;
use crate::testing::{
    fixture::{self, Mode},
    objects::{
        Port, ProbeOn, Probes, node, node_with_join, pod, service, service_cidr, spec_cluster,
        subnet, subnet_with,
    },
};

fn net4(s: &str) -> Ipv4Net {
    s.parse().expect("test CIDR")
}
fn net6(s: &str) -> Ipv6Net {
    s.parse().expect("test CIDR")
}

/// Node n1 of spec §5.1 with its local table; its role map has the test-run device.
fn n1(roles: u32) -> NodeFacts {
    let fixture = fixture::desired(Mode::A, roles);
    NodeFacts {
        node_name: "n1".into(),
        local_v4: fixture.v4.local.clone(),
        local_v6: fixture.v6.local.clone(),
        ifaces: fixture.ifaces,
    }
}

fn ipvs() -> Options {
    Options {
        service_cluster_ip_range: vec![
            "10.96.0.0/12".parse().unwrap(),
            "fd00:10:96::/112".parse().unwrap(),
        ],
        kube_proxy_sets: KubeProxySets::IPVS,
        ..Options::default()
    }
}

fn iptables() -> Options {
    Options {
        kube_proxy_sets: KubeProxySets::default(),
        ..ipvs()
    }
}

/// Translates for node n1; a snapshot without n1 gets it (no InternalIP, a dual-stack
/// Kube-OVN), as the agent only prunes once the Nodes are listed.
fn run(snapshot: &Snapshot, options: &Options) -> Translation {
    let mut snapshot = snapshot.clone();
    if !snapshot
        .nodes
        .iter()
        .any(|n| n.metadata.name.as_deref() == Some("n1"))
    {
        snapshot.nodes.push(Arc::new(node("n1", &[])));
    }
    translate(&snapshot, &n1(role::NODE_NIC), options)
}

fn nodeport_rules() -> u32 {
    rule::NODEPORT_LOCAL_RULES | rule::bit(rule::R3T) | rule::bit(rule::R3U)
}

/// Spec §9.1: `util.GetNodeInternalIP` joins every InternalIP and runs `CheckProtocol`.
#[test]
fn several_internal_ips_follow_kube_ovns_get_node_internal_ip() {
    let r1a = rule::bit(rule::R1A);
    let rules = |ips: &[&str]| {
        let mut snapshot = spec_cluster();
        snapshot.nodes[0] = Arc::new(node("n1", ips));
        let t = run(&snapshot, &tproxy_options());
        (
            t.desired.v4.rules & rule::NAT_RULES,
            t.desired.v6.rules & rule::NAT_RULES,
            t.desired.v4.tproxy_listener,
            t.desired.v6.tproxy_listener,
        )
    };
    let both = r1a | nodeport_rules();
    let v4: Ipv4Addr = "192.168.0.11".parse().unwrap();
    let v6: Ipv6Addr = "fd00::11".parse().unwrap();
    // One address, or one of each family in either order, work.
    assert_eq!(rules(&["192.168.0.11"]), (both, r1a, Some(v4), None));
    assert_eq!(
        rules(&["fd00::11", "192.168.0.11"]),
        (both, both, Some(v4), Some(v6))
    );
    // Two of one family, or three: "" for both families, so R1 only, no listener.
    for ips in [
        &["192.168.0.11", "192.168.0.21"][..],
        &["fd00::11", "fd00::21"],
        &["192.168.0.11", "fd00::11", "192.168.0.21"],
        &["192.168.0.11", "fd00::11", "fd00::21"],
    ] {
        assert_eq!(rules(ips), (r1a, r1a, None, None), "{ips:?}");
    }
    // An IPv4-mapped IPv6 address is IPv4 to Go's `To4()`.
    assert_eq!(rules(&["192.168.0.11", "::ffff:192.168.0.21"]).0, r1a);
}

/// `getOtherNodes` checks other nodes' InternalIPs one by one: all of them count.
#[test]
fn other_nodes_take_every_internal_ip_one_by_one() {
    let mut snapshot = spec_cluster();
    snapshot.nodes[1] = Arc::new(node(
        "n2",
        &[
            "192.168.0.12",
            "192.168.0.22",
            "fd00::12",
            "fd00::22",
            "::ffff:192.168.0.32",
            "192.168.0.42,fd00::42",
        ],
    ));
    let t = run(&snapshot, &ipvs());
    let v4: Vec<String> = t
        .desired
        .v4
        .other_nodes
        .iter()
        .map(ToString::to_string)
        .collect();
    let v6: Vec<String> = t
        .desired
        .v6
        .other_nodes
        .iter()
        .map(ToString::to_string)
        .collect();
    assert_eq!(v4, ["192.168.0.12", "192.168.0.13", "192.168.0.22"]);
    assert_eq!(v6, ["fd00::12", "fd00::22"]);
}

/// Spec §9.2: kube-ovn-cni programs only the families of `ovn.kubernetes.io/ip_address`.
#[test]
fn families_follow_the_ip_address_annotation() {
    let with_join = |join: Option<&str>| {
        let mut snapshot = spec_cluster();
        snapshot.nodes[0] = Arc::new(node_with_join("n1", &["192.168.0.11", "fd00::11"], join));
        run(&snapshot, &tproxy_options())
    };
    let (empty4, empty6) = (FamilyState::default(), FamilyState::default());
    let t = with_join(Some("100.64.0.2"));
    assert_ne!(t.desired.v4.rules, 0);
    assert_eq!(
        t.desired.v6, empty6,
        "an IPv4-only Kube-OVN has no IPv6 state"
    );
    assert!(t.issues.is_empty(), "{:?}", t.issues);
    let t = with_join(Some("fd00:100:64::2"));
    assert_eq!(t.desired.v4, empty4);
    assert_ne!(t.desired.v6.rules, 0);
    let t = with_join(Some("100.64.0.2,fd00:100:64::2"));
    assert_ne!(t.desired.v4.rules & t.desired.v6.rules, 0);
    for join in [None, Some(""), Some("100.64.0.2,100.64.0.3"), Some("bogus")] {
        let t = with_join(join);
        assert_eq!(
            (&t.desired.v4, &t.desired.v6),
            (&empty4, &empty6),
            "{join:?}"
        );
        assert_eq!(t.issues.len(), 1, "{join:?}: {:?}", t.issues);
        assert_eq!(
            (t.issues[0].kind, t.issues[0].object.as_str()),
            ("Node", "n1")
        );
    }
}

/// Spec §9.3: `CheckCidrs` splits on "," without trimming; any bad element drops the Subnet;
/// the first CIDR of each family counts; ipset refuses /0.
#[test]
fn subnet_cidr_blocks_parse_as_kube_ovn_does() {
    let mut snapshot = Snapshot::default();
    snapshot.subnets = [
        subnet("space", "10.9.0.0/16, fd00:9::/64"),
        subnet("trailing-comma", "10.10.0.0/16,"),
        subnet("leading-zero-octet", "010.15.0.0/16"),
        subnet("signed-prefix", "10.16.0.0/+16"),
        subnet(
            "first-per-family",
            "10.11.0.0/16,10.12.0.0/16,fd00:11::/64,fd00:12::/64",
        ),
        subnet("leading-zero-prefix", "10.14.0.0/016"),
        subnet("v4-default", "0.0.0.0/0"),
        subnet("v6-default", "::/0,10.13.0.0/16"),
    ]
    .into_iter()
    .map(Arc::new)
    .collect();
    let t = run(&snapshot, &ipvs());
    assert_eq!(
        t.desired.v4.subnets,
        ["10.11.0.0/16", "10.13.0.0/16", "10.14.0.0/16"]
            .map(net4)
            .into()
    );
    assert_eq!(t.desired.v6.subnets, [net6("fd00:11::/64")].into());
    let skipped: Vec<&str> = t.issues.iter().map(|i| i.object.as_str()).collect();
    assert_eq!(
        skipped,
        [
            "leading-zero-octet",
            "signed-prefix",
            "space",
            "trailing-comma",
            "v4-default",
            "v6-default"
        ],
        "{:?}",
        t.issues
    );
    // The Service CIDR flag: a /0 is not programmed either.
    let options = Options {
        service_cluster_ip_range: vec![
            "0.0.0.0/0".parse().unwrap(),
            "fd00:10:96::/112".parse().unwrap(),
        ],
        ..iptables()
    };
    let t = run(&Snapshot::default(), &options);
    assert!(t.desired.v4.service_cidrs.is_empty());
    assert_eq!(
        t.desired.v6.service_cidrs,
        [net6("fd00:10:96::/112")].into()
    );
    assert_eq!(t.issues.len(), 1, "{:?}", t.issues);
}

/// kube-proxy parses ClusterIPs with `ParseIPSloppy`: legacy leading zeros are decimal; no
/// trimming.
#[test]
fn legacy_cluster_ips_parse_as_kube_proxy_does() {
    let mut snapshot = Snapshot::default();
    snapshot.services = [
        service(
            "a/legacy",
            "ClusterIP",
            &["010.096.000.010"],
            &[Port("UDP", 53, None)],
            false,
        ),
        service(
            "a/legacy6",
            "ClusterIP",
            &["fd00:10:96::0a", "64:ff9b::010.096.0.12"],
            &[Port("TCP", 80, None)],
            false,
        ),
        service(
            "a/padded",
            "ClusterIP",
            &[" 10.96.0.11"],
            &[Port("TCP", 80, None)],
            false,
        ),
        service(
            "a/overflow",
            "ClusterIP",
            &["10.96.0.256"],
            &[Port("TCP", 80, None)],
            false,
        ),
    ]
    .into_iter()
    .map(Arc::new)
    .collect();
    let t = run(&snapshot, &ipvs());
    let v4: Vec<String> = t
        .desired
        .v4
        .service_ports
        .iter()
        .map(ToString::to_string)
        .collect();
    assert_eq!(v4, ["10.96.0.10,udp:53"]);
    let v6: Vec<Ipv6Addr> = t.desired.v6.service_ports.iter().map(|p| p.addr).collect();
    let want: Vec<Ipv6Addr> = ["64:ff9b::10.96.0.12", "fd00:10:96::a"]
        .map(|a| a.parse().unwrap())
        .into();
    assert_eq!(v6, want);
    let skipped: Vec<&str> = t.issues.iter().map(|i| i.object.as_str()).collect();
    assert_eq!(skipped, ["a/overflow", "a/padded"], "{:?}", t.issues);
}

/// Spec §9.4: kube-proxy does not see Services labelled with a proxy name or as headless.
#[test]
fn services_kube_proxy_ignores_by_label_are_left_out() {
    let labelled = |name: &str, label: &str, ip: &str| {
        let mut s = service(
            name,
            "NodePort",
            &[ip],
            &[Port("TCP", 80, Some(31080))],
            true,
        );
        s.metadata.labels = Some([(label.to_owned(), String::new())].into());
        s
    };
    let mut snapshot = spec_cluster();
    snapshot.services = vec![
        Arc::new(labelled(
            "a/other-proxy",
            "service.kubernetes.io/service-proxy-name",
            "10.96.5.1",
        )),
        Arc::new(labelled(
            "a/headless-label",
            "service.kubernetes.io/headless",
            "10.96.5.2",
        )),
        Arc::new(labelled("a/unrelated", "app", "10.96.5.3")),
        // A Service kube-proxy ignores cannot be wrong for it either.
        Arc::new(labelled(
            "a/ignored-bad",
            "service.kubernetes.io/headless",
            "bogus",
        )),
    ];
    let t = run(&snapshot, &ipvs());
    let v4: Vec<String> = t
        .desired
        .v4
        .service_ports
        .iter()
        .map(ToString::to_string)
        .collect();
    assert_eq!(v4, ["10.96.5.3,tcp:80"]);
    assert_eq!(t.desired.v4.nodeport_local_tcp, [31080].into());
    assert!(t.issues.is_empty(), "{:?}", t.issues);
    assert!(validate(&snapshot).is_empty());
    snapshot.services.truncate(2);
    let t = run(&snapshot, &ipvs());
    assert!(t.desired.v4.service_ports.is_empty() && t.desired.v4.nodeport_local_tcp.is_empty());
}

#[test]
fn spec_fixture_in_ipvs_mode_gives_the_spec_sets() {
    let t = run(&spec_cluster(), &ipvs());
    assert!(t.issues.is_empty(), "{:?}", t.issues);
    let mut expected = fixture::desired(Mode::A, role::NODE_NIC);
    // The NodePort Services of the fixture have ClusterIPs too.
    let sp4 = |a: &str, proto, port| ServicePort {
        addr: a.parse().unwrap(),
        proto,
        port,
    };
    expected.v4.service_ports.extend([
        sp4("10.96.0.100", Proto::Tcp, 80),
        sp4("10.96.0.100", Proto::Udp, 53),
        sp4("10.96.0.101", Proto::Tcp, 80),
    ]);
    expected.v6.service_ports.insert(ServicePort {
        addr: "fd00:10:96::100".parse().unwrap(),
        proto: Proto::Tcp,
        port: 80,
    });
    expected.v6.service_ports.insert(ServicePort {
        addr: "fd00:10:96::100".parse().unwrap(),
        proto: Proto::Udp,
        port: 53,
    });
    // Sets no active rule reads are left empty.
    expected.v4.service_cidrs.clear();
    expected.v6.service_cidrs.clear();
    assert_eq!(t.desired, expected);
}

#[test]
fn spec_fixture_in_iptables_mode_has_only_r1b() {
    let t = run(&spec_cluster(), &iptables());
    let mut expected = fixture::desired(Mode::B, role::NODE_NIC);
    expected.v4.other_nodes.clear();
    expected.v6.other_nodes.clear();
    expected.v4.local.clear();
    expected.v6.local.clear();
    assert_eq!(t.desired, expected);
}

#[test]
fn subnets_follow_kube_ovns_default_vpc_filter() {
    let mut snapshot = Snapshot::default();
    snapshot.subnets = [
        subnet("plain", "10.1.0.0/16"),
        subnet_with("other-vpc", "10.2.0.0/16", |s| s.spec.vpc = "vpc1".into()),
        subnet_with("underlay", "10.3.0.0/16", |s| s.spec.vlan = "v1".into()),
        subnet_with("underlay-u2o", "10.4.0.0/16", |s| {
            s.spec.vlan = "v1".into();
            s.spec.u2o_interconnection = true;
        }),
        subnet_with("underlay-lgw", "10.5.0.0/16", |s| {
            s.spec.vlan = "v1".into();
            s.spec.logical_gateway = true;
        }),
        subnet_with("deleting", "10.6.0.0/16", |s| {
            s.metadata.deletion_timestamp =
                Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                    k8s_openapi::jiff::Timestamp::UNIX_EPOCH,
                ));
        }),
        subnet_with("empty", "", |_| {}),
        subnet_with("wrong-protocol", "10.7.0.0/16", |s| {
            s.spec.protocol = "IPv6".into();
        }),
        subnet("host-bits", "10.8.1.1/16"),
        subnet("dual", "10.9.0.0/16,fd00:9::/64"),
    ]
    .into_iter()
    .map(Arc::new)
    .collect();
    let t = run(&snapshot, &ipvs());
    assert!(t.issues.is_empty(), "{:?}", t.issues);
    let want4: BTreeSet<_> = [
        "10.1.0.0/16",
        "10.5.0.0/16",
        "10.6.0.0/16",
        "10.7.0.0/16",
        "10.8.0.0/16",
        "10.9.0.0/16",
    ]
    .map(net4)
    .into();
    assert_eq!(t.desired.v4.subnets, want4);
    assert_eq!(t.desired.v6.subnets, [net6("fd00:9::/64")].into());
}

#[test]
fn cluster_router_option_names_the_default_vpc() {
    let mut snapshot = Snapshot::default();
    snapshot.subnets = vec![Arc::new(subnet_with("s", "10.1.0.0/16", |s| {
        s.spec.vpc = "my-router".into();
    }))];
    assert!(run(&snapshot, &ipvs()).desired.v4.subnets.is_empty());
    let options = Options {
        cluster_router: "my-router".into(),
        ..ipvs()
    };
    assert_eq!(run(&snapshot, &options).desired.v4.subnets.len(), 1);
}

#[test]
fn invalid_cidr_is_reported_with_the_object_and_skipped() {
    let mut snapshot = Snapshot::default();
    snapshot.subnets = vec![
        Arc::new(subnet("bad", "10.1.0.0/33")),
        Arc::new(subnet("good", "10.2.0.0/16")),
    ];
    let t = run(&snapshot, &ipvs());
    assert_eq!(t.desired.v4.subnets, [net4("10.2.0.0/16")].into());
    assert_eq!(t.issues.len(), 1);
    assert_eq!(t.issues[0].kind, "Subnet");
    assert_eq!(t.issues[0].object, "bad");
    assert!(
        t.issues[0].message.contains("10.1.0.0/33"),
        "{}",
        t.issues[0]
    );
}

#[test]
fn other_nodes_exclude_this_node_and_split_by_family() {
    let t = run(&spec_cluster(), &ipvs());
    assert_eq!(
        t.desired.v4.other_nodes,
        [
            "192.168.0.12".parse::<Ipv4Addr>().unwrap(),
            "192.168.0.13".parse().unwrap()
        ]
        .into()
    );
    assert_eq!(
        t.desired.v6.other_nodes,
        ["fd00::12".parse::<Ipv6Addr>().unwrap()].into()
    );
}

#[test]
fn node_without_an_internal_ip_of_a_family_gets_no_nodeport_rules_for_it() {
    let mut snapshot = spec_cluster();
    snapshot.nodes[0] = Arc::new(node("n1", &["fd00::11"]));
    let t = run(&snapshot, &ipvs());
    assert_eq!(
        t.desired.v4.rules,
        fixture::desired(Mode::ANoV4InternalIp, 0).v4.rules
    );
    assert!(t.desired.v4.nodeport_local_tcp.is_empty());
    assert!(t.desired.v4.other_nodes.is_empty());
    assert_eq!(t.desired.v6.rules, fixture::desired(Mode::A, 0).v6.rules);
    // Without this node's own entry (not listed yet) neither its InternalIPs nor the
    // families Kube-OVN runs are known: nothing is programmed.
    snapshot.nodes.remove(0);
    let t = translate(&snapshot, &n1(role::NODE_NIC), &ipvs());
    assert_eq!((t.desired.v4.rules, t.desired.v6.rules), (0, 0));
}

#[test]
fn services_feed_a_family_only_with_a_cluster_ip_of_it() {
    let mut snapshot = Snapshot::default();
    snapshot.services = [
        service(
            "a/v4only",
            "NodePort",
            &["10.96.1.1"],
            &[Port("TCP", 80, Some(31000))],
            true,
        ),
        service(
            "a/v6only",
            "NodePort",
            &["fd00:10:96::5"],
            &[Port("UDP", 53, Some(31001))],
            true,
        ),
        service(
            "a/headless",
            "ClusterIP",
            &["None"],
            &[Port("TCP", 80, None)],
            false,
        ),
        service(
            "a/external-name",
            "ExternalName",
            &[],
            &[Port("TCP", 80, None)],
            false,
        ),
        service(
            "a/lb",
            "LoadBalancer",
            &["10.96.1.2"],
            &[Port("TCP", 443, Some(31002)), Port("TCP", 444, Some(0))],
            true,
        ),
        service(
            "a/sctp",
            "NodePort",
            &["10.96.1.3"],
            &[Port("SCTP", 3868, Some(31003))],
            true,
        ),
        service(
            "a/etp-cluster",
            "NodePort",
            &["10.96.1.4"],
            &[Port("TCP", 80, Some(31004))],
            false,
        ),
    ]
    .into_iter()
    .map(Arc::new)
    .collect();
    snapshot.nodes = vec![Arc::new(node("n1", &["192.168.0.11", "fd00::11"]))];
    let t = run(&snapshot, &ipvs());
    let d = &t.desired;
    assert_eq!(d.v4.nodeport_local_tcp, [31000, 31002].into());
    assert!(d.v4.nodeport_local_udp.is_empty());
    assert_eq!(d.v6.nodeport_local_udp, [31001].into());
    assert!(d.v6.nodeport_local_tcp.is_empty());
    let v4: Vec<String> = d.v4.service_ports.iter().map(ToString::to_string).collect();
    assert_eq!(
        v4,
        [
            "10.96.1.1,tcp:80",
            "10.96.1.2,tcp:443",
            "10.96.1.2,tcp:444",
            "10.96.1.3,sctp:3868",
            "10.96.1.4,tcp:80"
        ]
    );
    assert_eq!(d.v6.service_ports.len(), 1);
    assert!(t.issues.is_empty(), "{:?}", t.issues);
}

#[test]
fn cluster_ip_fallback_default_protocol_and_bad_values() {
    let mut legacy = service(
        "a/legacy",
        "ClusterIP",
        &[],
        &[Port("TCP", 80, None)],
        false,
    );
    let spec = legacy.spec.as_mut().unwrap();
    spec.cluster_ip = Some("10.96.2.1".into());
    spec.ports.as_mut().unwrap()[0].protocol = None;
    let bad = service(
        "a/bad",
        "ClusterIP",
        &["10.96.300.1"],
        &[Port("QUIC", 80, None), Port("TCP", 70000, None)],
        false,
    );
    let snapshot = Snapshot {
        services: vec![Arc::new(legacy), Arc::new(bad)],
        ..Snapshot::default()
    };
    let t = run(&snapshot, &ipvs());
    let v4: Vec<String> = t
        .desired
        .v4
        .service_ports
        .iter()
        .map(ToString::to_string)
        .collect();
    assert_eq!(v4, ["10.96.2.1,tcp:80"]);
    assert_eq!(t.issues.len(), 1, "{:?}", t.issues);
    assert!(t.issues[0].to_string().contains("a/bad"), "{}", t.issues[0]);
    let good_ip_bad_ports = service(
        "a/ports",
        "ClusterIP",
        &["10.96.2.2"],
        &[Port("QUIC", 80, None), Port("TCP", 70000, None)],
        false,
    );
    let t = run(
        &Snapshot {
            services: vec![Arc::new(good_ip_bad_ports)],
            ..Snapshot::default()
        },
        &ipvs(),
    );
    assert!(t.desired.v4.service_ports.is_empty());
    let messages: Vec<String> = t.issues.iter().map(ToString::to_string).collect();
    assert_eq!(messages.len(), 2, "{messages:?}");
    assert!(
        messages.iter().any(|m| m.contains("QUIC")) && messages.iter().any(|m| m.contains("70000"))
    );
}

#[test]
fn validate_reports_problems_translate_would_skip_silently_in_this_mode() {
    let mut snapshot = spec_cluster();
    snapshot.services.push(Arc::new(service(
        "a/bad",
        "ClusterIP",
        &["10.96.0.300"],
        &[Port("TCP", 80, None)],
        false,
    )));
    // iptables mode fills no ClusterIP set, so translate does not look at the Service…
    assert!(run(&snapshot, &iptables()).issues.is_empty());
    // …but the object is still invalid.
    let issues = validate(&snapshot);
    assert_eq!(issues.len(), 1, "{issues:?}");
    assert_eq!(issues[0].object, "a/bad");
}

#[test]
fn ready_service_cidrs_replace_the_flag() {
    let mut snapshot = Snapshot::default();
    let t = run(&snapshot, &iptables());
    assert_eq!(t.desired.v4.service_cidrs, [net4("10.96.0.0/12")].into());
    assert_eq!(
        t.desired.v6.service_cidrs,
        [net6("fd00:10:96::/112")].into()
    );

    snapshot.service_cidrs = vec![
        Arc::new(service_cidr("kubernetes", &["10.96.0.0/12"], true)),
        Arc::new(service_cidr("extra", &["10.100.0.0/16"], true)),
        Arc::new(service_cidr("pending", &["10.200.0.0/16"], false)),
    ];
    let t = run(&snapshot, &iptables());
    assert_eq!(
        t.desired.v4.service_cidrs,
        ["10.96.0.0/12", "10.100.0.0/16"].map(net4).into()
    );
    // As in Kube-OVN's ServiceCIDRStore, API CIDRs replace the flag for both families.
    assert!(t.desired.v6.service_cidrs.is_empty());
}

#[test]
fn service_match_overrides_kube_proxy_detection() {
    let r1a = rule::bit(rule::R1A);
    let r1b = rule::bit(rule::R1B);
    let nodeport = rule::NODEPORT_LOCAL_RULES | rule::bit(rule::R3T) | rule::bit(rule::R3U);
    let rules = |options: &Options| run(&spec_cluster(), options).desired.v4.rules;
    assert_eq!(rules(&ipvs()), r1a | nodeport);
    assert_eq!(rules(&iptables()), r1b);
    assert_eq!(
        rules(&Options {
            service_match: ServiceMatch::IpPort,
            ..iptables()
        }),
        r1a | nodeport
    );
    assert_eq!(
        rules(&Options {
            service_match: ServiceMatch::Cidr,
            ..ipvs()
        }),
        r1b
    );
    let only_tcp = KubeProxySets {
        v4: FamilySets {
            cluster_ip: true,
            nodeport_local_tcp: true,
            nodeport_local_udp: false,
        },
        ..KubeProxySets::IPVS
    };
    let t = run(
        &spec_cluster(),
        &Options {
            kube_proxy_sets: only_tcp,
            ..ipvs()
        },
    );
    assert_eq!(
        t.desired.v4.rules,
        r1a | rule::bit(rule::R2T) | rule::bit(rule::R3T)
    );
    assert!(t.desired.v4.nodeport_local_udp.is_empty());
    assert_eq!(t.desired.v4.nodeport_local_tcp, [30080].into());
}

fn tproxy_options() -> Options {
    Options {
        tproxy_port: Some(8102),
        ..ipvs()
    }
}

/// Spec §5.3: custom-VPC pod p1 = 10.0.1.5 on n1, readiness tcp 8080, liveness http "http"
/// (→ 8081), startup tcp 9000 (ignored).
fn p1() -> k8s_openapi::api::core::v1::Pod {
    pod(
        "default/p1",
        "n1",
        "vpc1-sub",
        &["10.0.1.5", "fd00:1::5"],
        &Probes {
            readiness: Some(ProbeOn::Tcp(8080)),
            liveness: Some(ProbeOn::HttpNamed("http")),
            startup: Some(ProbeOn::Tcp(9000)),
        },
        &[("http", 8081), ("other", 7000)],
    )
}

#[test]
fn tproxy_targets_follow_kube_ovns_pod_and_probe_rules() {
    let mut snapshot = spec_cluster();
    snapshot.pods = vec![
        Arc::new(p1()),
        // Default-VPC pod (spec T6): not hijacked.
        Arc::new(pod(
            "default/p2",
            "n1",
            "ovn-default",
            &["10.16.0.5"],
            &Probes::ready(ProbeOn::Tcp(8080)),
            &[],
        )),
        // gRPC probe; a named port that does not resolve; port 0.
        Arc::new(pod(
            "default/p3",
            "n1",
            "vpc1-sub",
            &["10.0.1.6"],
            &Probes {
                readiness: Some(ProbeOn::Grpc(9090)),
                liveness: Some(ProbeOn::HttpNamed("missing")),
                startup: None,
            },
            &[],
        )),
        Arc::new(pod(
            "default/p4",
            "n1",
            "vpc1-sub",
            &["10.0.1.7"],
            &Probes::ready(ProbeOn::Tcp(0)),
            &[],
        )),
        // Another node's pod.
        Arc::new(pod(
            "default/p5",
            "n2",
            "vpc1-sub",
            &["10.0.1.8"],
            &Probes::ready(ProbeOn::Tcp(8080)),
            &[],
        )),
    ];
    let mut host = pod(
        "default/p6",
        "n1",
        "vpc1-sub",
        &["192.168.0.11"],
        &Probes::ready(ProbeOn::Tcp(8080)),
        &[],
    );
    host.spec.as_mut().unwrap().host_network = Some(true);
    snapshot.pods.push(Arc::new(host));

    let t = run(&snapshot, &tproxy_options());
    assert!(t.issues.is_empty(), "{:?}", t.issues);
    let v4: Vec<String> = t
        .desired
        .v4
        .probe_targets
        .iter()
        .map(ToString::to_string)
        .collect();
    assert_eq!(
        v4,
        [
            "10.0.1.5,tcp:8080",
            "10.0.1.5,tcp:8081",
            "10.0.1.6,tcp:9090"
        ]
    );
    let v6: Vec<String> = t
        .desired
        .v6
        .probe_targets
        .iter()
        .map(ToString::to_string)
        .collect();
    assert_eq!(v6, ["fd00:1::5,tcp:8080", "fd00:1::5,tcp:8081"]);
    assert_eq!(
        t.desired.v4.tproxy_listener,
        Some("192.168.0.11".parse().unwrap())
    );
    assert_eq!(
        t.desired.v6.tproxy_listener,
        Some("fd00::11".parse().unwrap())
    );
    assert_eq!(t.desired.tproxy_port, 8102);
    assert_ne!(t.desired.v4.rules & rule::bit(rule::TPROXY), 0);
    assert_ne!(t.desired.v6.rules & rule::bit(rule::TPROXY), 0);
    // The NAT rules are unchanged by TPROXY.
    let without = run(&snapshot, &ipvs());
    assert_eq!(
        t.desired.v4.rules & rule::NAT_RULES,
        without.desired.v4.rules
    );
    assert!(without.desired.v4.probe_targets.is_empty());
    assert_eq!(
        without.desired.v4.rules & rule::bit(rule::TPROXY),
        0,
        "spec T9: off unless enabled"
    );
}

#[test]
fn tproxy_needs_a_node_address_of_the_family_and_a_known_subnet() {
    let mut snapshot = spec_cluster();
    snapshot.nodes[0] = Arc::new(node("n1", &["192.168.0.11"]));
    snapshot.pods = vec![
        Arc::new(p1()),
        Arc::new(pod(
            "default/orphan",
            "n1",
            "no-such-subnet",
            &["10.0.9.9"],
            &Probes::ready(ProbeOn::Tcp(80)),
            &[],
        )),
    ];
    let t = run(&snapshot, &tproxy_options());
    assert_eq!(
        t.desired.v6.rules & rule::bit(rule::TPROXY),
        0,
        "no IPv6 node address, no IPv6 listener"
    );
    assert!(t.desired.v6.probe_targets.is_empty());
    assert_eq!(t.desired.v4.probe_targets.len(), 2);
    assert_eq!(t.issues.len(), 1, "{:?}", t.issues);
    assert_eq!(t.issues[0].object, "default/orphan");
}

#[test]
fn shadow_and_interfaces_pass_through() {
    let options = Options {
        shadow: true,
        ..ipvs()
    };
    let t = translate(&spec_cluster(), &n1(role::OVN0), &options);
    assert!(t.desired.shadow);
    assert_eq!(
        t.desired.ifaces,
        [(fixture::TEST_RUN_IFINDEX, role::OVN0)].into()
    );
}

/// The incremental translation changes cost, never results: over random histories of
/// upserts and deletes of every kind (valid and invalid objects, Services sharing keys, this
/// node's InternalIP and join annotation changing, Pods and their Subnets), with the node facts
/// and options changing now and then, its state after every step is exactly what the pure
/// translation of the objects it was handed gives, issues included; and maps written with
/// [`crate::datapath::maps::Tables::apply_touched`] (or a full apply when it says so) hold
/// exactly that state.
#[test]
#[expect(
    clippy::too_many_lines,
    reason = "object generators local to the property"
)]
fn incremental_translation_equals_the_pure_one_over_random_histories() {
    use std::collections::BTreeMap;

    use rand::{Rng, SeedableRng, rngs::StdRng};

    use crate::{
        cluster::{Object, ObjectChange},
        datapath::maps::Tables,
        testing::objects::{ProbeOn, Probes},
    };

    fn random_service(rng: &mut StdRng, i: usize) -> Service {
        let ip4 = format!("10.96.{}.{}", i / 250, i % 250);
        let ip6 = format!("fd00:10:96::{i:x}");
        let ips: Vec<&str> = match rng.random_range(0..10) {
            0 => vec![&ip6],
            1 => vec![&ip4, &ip6],
            2 => vec!["not-an-ip"],
            3 => vec!["None"],
            _ => vec![&ip4],
        };
        let protocol = ["TCP", "UDP", "SCTP", "QUIC"][rng.random_range(0..4)];
        let port = [80, 443, 70_000, rng.random_range(1..65_536)][rng.random_range(0..4)];
        let node_port = rng
            .random_bool(0.5)
            .then(|| rng.random_range(30_000..30_100));
        let type_ = ["ClusterIP", "NodePort", "LoadBalancer"][rng.random_range(0..3)];
        service(
            &format!("ns/svc-{i}"),
            type_,
            &ips,
            &[Port(protocol, port, node_port), Port("TCP", 8080, None)],
            rng.random_bool(0.5),
        )
    }

    fn random_object(rng: &mut StdRng) -> (Kind, String, Option<Object>) {
        let kind = [
            Kind::Service,
            Kind::Service,
            Kind::Service,
            Kind::Subnet,
            Kind::Node,
            Kind::ServiceCidr,
            Kind::Pod,
        ][rng.random_range(0..7)];
        let delete = rng.random_bool(0.25);
        let i = rng.random_range(0..12);
        let (key, object) = match kind {
            Kind::Service => {
                // Few addresses, so Services share ClusterIP:port keys and NodePorts.
                let address = rng.random_range(0..4);
                let mut svc = random_service(rng, address);
                let key = format!("ns/svc-{i}");
                svc.metadata.name = Some(format!("svc-{i}"));
                (key, Object::Service(Arc::new(svc)))
            }
            Kind::Subnet => {
                let cidr = [
                    "10.16.0.0/16",
                    "10.17.0.0/16,fd00:10:17::/64",
                    "fd00:10:18::/64",
                    "10.16.0.0/16",
                    "bad",
                    "0.0.0.0/0",
                    "",
                ][rng.random_range(0..7)];
                let vpc = if rng.random_bool(0.2) {
                    "vpc1"
                } else {
                    "ovn-cluster"
                };
                let key = format!("sub-{}", i % 6);
                (
                    key.clone(),
                    Object::Subnet(Arc::new(subnet_with(&key, cidr, |s| {
                        s.spec.vpc = vpc.into();
                        if rng.random_bool(0.1) {
                            s.spec.vlan = "vlan10".into();
                        }
                    }))),
                )
            }
            Kind::Node => {
                let name = ["n1", "n2", "n3", "n4"][i % 4];
                let ips: &[&str] = [
                    &["192.168.0.11", "fd00::11"][..],
                    &["192.168.0.12"],
                    &["192.168.0.13", "192.168.0.14"],
                    &["fd00::13"],
                    &[],
                ][rng.random_range(0..5)];
                let join = [
                    Some(crate::testing::objects::DUAL_STACK_JOIN),
                    Some("100.64.0.3"),
                    None,
                    Some("fd00:100:64::3"),
                ][rng.random_range(0..4)];
                (
                    name.to_owned(),
                    Object::Node(Arc::new(node_with_join(name, ips, join))),
                )
            }
            Kind::ServiceCidr => {
                let cidrs: &[&str] = [
                    &["10.96.0.0/16"][..],
                    &["fd00:10:96::/112", "10.97.0.0/16"],
                    &["nope"],
                    &["::/0"],
                ][rng.random_range(0..4)];
                let key = format!("cidr-{}", i % 3);
                (
                    key.clone(),
                    Object::ServiceCidr(Arc::new(service_cidr(&key, cidrs, rng.random_bool(0.7)))),
                )
            }
            Kind::Pod => {
                let sub = ["sub-0", "sub-1", "sub-2", "missing"][rng.random_range(0..4)];
                let ips: &[&str] =
                    [&["10.0.1.5"][..], &["10.0.1.6", "fd00:1::6"], &[]][rng.random_range(0..3)];
                let key = format!("default/pod-{}", i % 4);
                let probes = Probes::ready(ProbeOn::Tcp(rng.random_range(8000..8004)));
                let node = if rng.random_bool(0.8) { "n1" } else { "n2" };
                (
                    key.clone(),
                    Object::Pod(Arc::new(pod(&key, node, sub, ips, &probes, &[]))),
                )
            }
        };
        (kind, key, (!delete).then_some(object))
    }

    fn snapshot_of(model: &BTreeMap<(Kind, String), Object>) -> Snapshot {
        let mut s = Snapshot::default();
        for object in model.values() {
            match object.clone() {
                Object::Subnet(o) => s.subnets.push(o),
                Object::Service(o) => s.services.push(o),
                Object::Node(o) => s.nodes.push(o),
                Object::ServiceCidr(o) => s.service_cidrs.push(o),
                Object::Pod(o) => s.pods.push(o),
            }
        }
        s
    }

    for seed in 0..40u64 {
        let mut rng = StdRng::seed_from_u64(0x6b6f_766e + seed);
        let mut model: BTreeMap<(Kind, String), Object> = BTreeMap::new();
        let mut engine = Incremental::default();
        let mut tables = Tables::in_memory();
        let mut node = n1(role::NODE_NIC);
        let mut options = ipvs();
        // Sometimes start from a snapshot (a first list), else from nothing.
        if rng.random_bool(0.5) {
            let snapshot = spec_cluster();
            for change in snapshot.changes() {
                model.insert((change.kind, change.key), change.object.expect("upsert"));
            }
        }
        engine.reset(&snapshot_of(&model));
        for step in 0..120 {
            // A burst of changes between two passes.
            for _ in 0..rng.random_range(1..4) {
                let (kind, key, object) = random_object(&mut rng);
                match &object {
                    Some(o) => model.insert((kind, key.clone()), o.clone()),
                    None => model.remove(&(kind, key.clone())),
                };
                engine.apply(ObjectChange { kind, key, object });
            }
            match rng.random_range(0..40) {
                0 => options = iptables(),
                1 => options = ipvs(),
                2 => options.tproxy_port = options.tproxy_port.xor(Some(8102)),
                3 => options.shadow = !options.shadow,
                4 => node.local_v4 = [net4("192.168.0.11/32"), net4("10.16.0.1/32")].into(),
                5 => node.ifaces = [(2, role::OVN0)].into(),
                6 => engine.reset(&snapshot_of(&model)),
                // A full read with the Services handed out one by one, as the kube source
                // hands out its store.
                7 => engine.reset_with(|each| {
                    let mut snapshot = snapshot_of(&model);
                    for s in std::mem::take(&mut snapshot.services) {
                        each(&object_name(&s.metadata), &*s);
                    }
                    snapshot
                }),
                _ => {}
            }
            let step_out = engine.translate(&node, &options);
            let pure = translate(&snapshot_of(&model), &node, &options);
            assert_eq!(*engine.desired(), pure.desired, "seed {seed} step {step}");
            assert_eq!(engine.issues(), pure.issues, "seed {seed} step {step}");
            let report = if step_out.full {
                tables.apply(engine.desired(), true)
            } else {
                tables.apply_touched(engine.desired(), &step_out.touched)
            };
            assert!(report.errors.is_empty(), "{:?}", report.errors);
            assert_eq!(
                tables.current(),
                pure.desired,
                "maps, seed {seed} step {step}"
            );
            if let Err(e) = fronts_within_authorities(&tables) {
                panic!("fronts, seed {seed} step {step}: {e}");
            }
        }
    }
}

/// A front answers for its authority (the program takes a key it finds there as a member), so
/// it may hold less than the authority, never more.
fn fronts_within_authorities(tables: &crate::datapath::maps::Tables) -> Result<(), String> {
    use crate::datapath::maps::Ipv6Prefix64;
    fn within<K: std::fmt::Debug>(
        front: &str,
        keys: impl IntoIterator<Item = K>,
        held: impl Fn(&K) -> bool,
    ) -> Result<(), String> {
        match keys.into_iter().find(|k| !held(k)) {
            Some(k) => Err(format!("{front} holds {k:?}, which its authority does not")),
            None => Ok(()),
        }
    }
    let (f, v4, v6) = (&tables.fronts, &tables.v4, &tables.v6);
    let net4 = |a: &Ipv4Addr| Ipv4Net::new(*a, 32).expect("/32");
    within("svc4 array", f.service_ports_v4_array.keys(), |k| {
        v4.service_ports.entries().contains_key(*k)
    })?;
    within("oth4 array", f.other_nodes_v4_array.keys(), |k| {
        v4.other_nodes.entries().contains_key(*k)
    })?;
    within("loc4 array", f.local_v4_array.keys(), |k| {
        v4.local.entries().contains_key(&net4(k))
    })?;
    within("loc4 exact", f.local_v4.entries().keys(), |k| {
        v4.local.entries().contains_key(&net4(k))
    })?;
    within("loc6 exact", f.local_v6.entries().keys(), |k| {
        v6.local
            .entries()
            .contains_key(&Ipv6Net::new(**k, 128).expect("/128"))
    })?;
    within("subnets6 exact", f.subnets_v6.entries().keys(), |k| {
        v6.subnets
            .entries()
            .keys()
            .any(|n| n.prefix_len() == 64 && Ipv6Prefix64::of(n.network()) == **k)
    })
}
