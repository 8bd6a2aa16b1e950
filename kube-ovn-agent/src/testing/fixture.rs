//! The node of spec §5.1 as datapath state, and the vectors of spec §5.2 against it.

use std::collections::BTreeMap;

use kube_ovn_ebpf_common::{counter, role, rule};

use super::packet::{Packet, TCP_ACK, ext};
use crate::state::{MapState, Proto, ServicePort};

/// kube-proxy mode of the fixture: A = IPVS (its sets exist), B = iptables (they do not).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    A,
    B,
    /// Mode A on a node without an IPv4 InternalIP (vector 32).
    ANoV4InternalIp,
}

/// The ifindex `BPF_PROG_TEST_RUN` runs packets on (loopback).
pub const TEST_RUN_IFINDEX: u32 = 1;

const R2R3: u32 =
    rule::bit(rule::R2T) | rule::bit(rule::R3T) | rule::bit(rule::R2U) | rule::bit(rule::R3U);

/// The sets of spec §5.1 ("Resulting sets") for `mode`, with `roles` on the test-run device.
pub fn desired(mode: Mode, roles: u32) -> MapState {
    let mut d = MapState::default();
    let net4 = |s: &str| s.parse().expect("fixture CIDR");
    let net6 = |s: &str| s.parse().expect("fixture CIDR");

    d.v4.subnets
        .extend(["10.16.0.0/16", "100.64.0.0/16", "10.17.0.0/16"].map(net4));
    d.v6.subnets.insert(net6("fd00:10:16::/64"));
    d.v4.service_cidrs.insert(net4("10.96.0.0/12"));
    d.v6.service_cidrs.insert(net6("fd00:10:96::/112"));
    d.v4.other_nodes.extend(
        ["192.168.0.12", "192.168.0.13"]
            .map(|a| a.parse::<std::net::Ipv4Addr>().expect("fixture address")),
    );
    d.v6.other_nodes
        .insert("fd00::12".parse().expect("fixture address"));
    d.v4.local.extend(
        [
            "192.168.0.11/32",
            "100.64.0.2/32",
            "127.0.0.0/8",
            "10.96.0.1/32",
            "10.96.0.10/32",
        ]
        .map(net4),
    );
    d.v6.local
        .extend(["fd00::11/128", "fd00:100:64::2/128", "::1/128"].map(net6));

    match mode {
        Mode::A | Mode::ANoV4InternalIp => {
            let port4 = |a: &str, proto, port| ServicePort {
                addr: a.parse().expect("fixture address"),
                proto,
                port,
            };
            d.v4.service_ports.extend([
                port4("10.96.0.1", Proto::Tcp, 443),
                port4("10.96.0.10", Proto::Udp, 53),
                port4("10.96.0.10", Proto::Tcp, 53),
            ]);
            d.v6.service_ports.insert(ServicePort {
                addr: "fd00:10:96::1".parse().expect("fixture address"),
                proto: Proto::Tcp,
                port: 443,
            });
            for family in [&mut d.v4.nodeport_local_tcp, &mut d.v6.nodeport_local_tcp] {
                family.insert(30080);
            }
            for family in [&mut d.v4.nodeport_local_udp, &mut d.v6.nodeport_local_udp] {
                family.insert(30053);
            }
            d.v4.rules = rule::bit(rule::R1A) | R2R3;
            d.v6.rules = rule::bit(rule::R1A) | R2R3;
            if mode == Mode::ANoV4InternalIp {
                d.v4.rules = rule::bit(rule::R1A);
            }
        }
        Mode::B => {
            d.v4.rules = rule::bit(rule::R1B);
            d.v6.rules = rule::bit(rule::R1B);
        }
    }
    d.ifaces = BTreeMap::from([(TEST_RUN_IFINDEX, roles)]);
    d
}

/// One row of spec §5.2.
#[derive(Clone, Debug)]
pub struct Vector {
    pub id: &'static str,
    /// Role of the interface the packet arrives on.
    pub roles: u32,
    pub mode: Mode,
    pub packet: Packet,
    /// Rules expected to match (`rule::bit` mask); the mark follows from them.
    pub rules: u32,
    /// For packets that are not classified: the counter that must move instead.
    pub skipped: Option<u32>,
    pub note: &'static str,
}

const OVN0: u32 = role::OVN0;
const ETH0: u32 = role::NODE_NIC;
const BR_EXT: u32 = role::PROVIDER_BRIDGE;
const LO: u32 = role::LOOPBACK;

fn v(
    id: &'static str,
    roles: u32,
    mode: Mode,
    packet: Packet,
    hits: &[u32],
    note: &'static str,
) -> Vector {
    Vector {
        id,
        roles,
        mode,
        packet,
        rules: hits.iter().fold(0, |m, r| m | rule::bit(*r)),
        skipped: None,
        note,
    }
}

/// Every vector of spec §5.2, in order. Where design.md deviates from iptables (25, 27) the
/// expectation is our documented behaviour, and the note says so.
#[allow(
    clippy::too_many_lines,
    reason = "one line per spec vector reads best as a table"
)]
pub fn vectors() -> Vec<Vector> {
    use Mode::{A, ANoV4InternalIp, B};
    use rule::{R1A, R1B, R2T, R2U, R3T, R3U};
    let t = Packet::tcp;
    let u = Packet::udp;
    let mut established = t("192.168.0.12", "192.168.0.11", 30080);
    if let super::packet::L4::Tcp { flags, .. } = &mut established.l4 {
        *flags = TCP_ACK;
    }
    let mut first_fragment = t("192.168.0.12", "192.168.0.11", 30080).payload(64);
    first_fragment.more_fragments = true;
    let mut later_fragment = t("192.168.0.12", "192.168.0.11", 30080).payload(64);
    later_fragment.fragment_offset = 4;

    let mut vectors = vec![
        v(
            "1",
            OVN0,
            A,
            t("10.16.0.5", "10.96.0.1", 443),
            &[R1A],
            "pod → ClusterIP",
        ),
        v(
            "2",
            OVN0,
            A,
            t("10.16.0.5", "10.96.0.1", 8443),
            &[],
            "unlisted port: REJECT downstream",
        ),
        v(
            "3",
            OVN0,
            B,
            t("10.16.0.5", "10.96.0.1", 8443),
            &[R1B],
            "any port in the CIDR",
        ),
        v(
            "4",
            OVN0,
            A,
            u("10.16.0.5", "10.96.0.10", 53),
            &[R1A],
            "udp ClusterIP",
        ),
        v(
            "5A",
            OVN0,
            A,
            Packet::echo("10.16.0.5", "10.96.0.10"),
            &[],
            "icmp has no port",
        ),
        v(
            "5B",
            OVN0,
            B,
            Packet::echo("10.16.0.5", "10.96.0.10"),
            &[R1B],
            "icmp in the CIDR",
        ),
        v(
            "6",
            ETH0,
            A,
            t("10.16.0.5", "10.96.0.1", 443),
            &[],
            "wrong interface",
        ),
        v(
            "7",
            OVN0,
            A,
            t("172.18.0.5", "10.96.0.1", 443),
            &[],
            "underlay src",
        ),
        v(
            "8",
            OVN0,
            A,
            t("10.0.1.5", "10.96.0.1", 443),
            &[],
            "custom-VPC src",
        ),
        v(
            "9",
            OVN0,
            A,
            t("100.64.0.3", "10.96.0.1", 443),
            &[R1A],
            "join subnet src",
        ),
        v(
            "10",
            OVN0,
            A,
            t("10.17.0.9", "10.96.0.10", 53),
            &[R1A],
            "centralized subnet",
        ),
        v(
            "11",
            ETH0,
            A,
            t("203.0.113.7", "192.168.0.11", 30080),
            &[R2T],
            "ETP=Local NodePort",
        ),
        v(
            "12",
            ETH0,
            A,
            t("203.0.113.7", "192.168.0.11", 30081),
            &[],
            "ETP=Cluster port",
        ),
        v(
            "13",
            ETH0,
            A,
            t("192.168.0.12", "192.168.0.11", 30080),
            &[R2T, R3T],
            "other node",
        ),
        v(
            "14",
            ETH0,
            A,
            t("192.168.0.12", "10.16.0.9", 30080),
            &[R3T],
            "transit, not local",
        ),
        v(
            "15",
            ETH0,
            A,
            t("203.0.113.7", "10.16.0.9", 30080),
            &[],
            "neither",
        ),
        v(
            "16",
            ETH0,
            A,
            u("203.0.113.7", "192.168.0.11", 30053),
            &[R2U],
            "udp NodePort",
        ),
        v(
            "17",
            ETH0,
            A,
            u("203.0.113.7", "192.168.0.11", 30080),
            &[],
            "sets are per protocol",
        ),
        v(
            "18",
            ETH0,
            A,
            u("192.168.0.12", "192.168.0.11", 30053),
            &[R2U, R3U],
            "udp other node",
        ),
        v(
            "19",
            OVN0,
            A,
            t("10.16.0.5", "192.168.0.11", 30080),
            &[R2T],
            "pod → node IP",
        ),
        v(
            "20",
            OVN0,
            A,
            t("10.16.0.5", "100.64.0.2", 30080),
            &[R2T],
            "pod → ovn0 IP",
        ),
        v(
            "21",
            BR_EXT,
            A,
            t("203.0.113.7", "192.168.0.11", 30080),
            &[R2T],
            "underlay bridge",
        ),
        v(
            "22",
            ETH0,
            A,
            t("203.0.113.7", "10.96.0.10", 30080),
            &[R2T],
            "ClusterIP is LOCAL (quirk)",
        ),
        v(
            "23",
            ETH0,
            A,
            Packet::sctp("203.0.113.7", "192.168.0.11", 30080),
            &[],
            "no sctp rules",
        ),
        v(
            "24",
            ETH0,
            B,
            t("203.0.113.7", "192.168.0.11", 30080),
            &[],
            "rules absent in mode B",
        ),
        v(
            "25",
            ETH0,
            A,
            established,
            &[R2T, R3T],
            "DEVIATION: stateless, iptables sets none",
        ),
        v(
            "26",
            LO,
            A,
            t("127.0.0.1", "127.0.0.1", 30080),
            &[],
            "lo has no NodePort role",
        ),
        v(
            "27a",
            ETH0,
            A,
            first_fragment,
            &[R2T, R3T],
            "offset-0 fragment is marked",
        ),
        v(
            "28",
            OVN0,
            A,
            t("fd00:10:16::5", "fd00:10:96::1", 443),
            &[R1A],
            "IPv6 R1a",
        ),
        v(
            "29",
            ETH0,
            A,
            t("2001:db8::7", "fd00::11", 30080),
            &[R2T],
            "IPv6 R2t",
        ),
        v(
            "30",
            ETH0,
            A,
            t("fd00::12", "fd00::11", 30080),
            &[R2T, R3T],
            "IPv6 R2t+R3t",
        ),
        v(
            "31",
            ETH0,
            A,
            t("fd00::12", "fd00::11", 30080)
                .ext(ext::HOP_BY_HOP)
                .ext(ext::DEST_OPTS),
            &[R2T, R3T],
            "extension headers skipped",
        ),
        v(
            "32",
            ETH0,
            ANoV4InternalIp,
            t("192.168.0.13", "192.168.0.11", 30080),
            &[],
            "no IPv4 InternalIP",
        ),
    ];
    vectors.push(Vector {
        skipped: Some(counter::FRAGMENT),
        ..v(
            "27b",
            ETH0,
            A,
            later_fragment,
            &[],
            "non-first fragment: never classified",
        )
    });
    vectors
}
