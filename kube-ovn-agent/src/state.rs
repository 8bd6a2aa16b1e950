//! The desired content of every datapath map, in human terms (CIDRs, addresses, ports).
//!
//! `translate` produces it from the cluster and the node, `maps` writes it, `testing::oracle`
//! evaluates it as the reference model, and `dump` decodes the kernel maps back into it.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    net::{Ipv4Addr, Ipv6Addr},
};

use ipnet::{Ipv4Net, Ipv6Net};
use kube_ovn_ebpf_common::{config_flag, iface_flag, ipproto, nodeport, role, rule};
use serde::Serialize;

/// An entry of kube-proxy's `KUBE[-6]-CLUSTER-IP` set: `ip,proto:port`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct ServicePort<A> {
    pub addr: A,
    pub proto: Proto,
    pub port: u16,
}

impl<A: fmt::Display> fmt::Display for ServicePort<A> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{},{}:{}", self.addr, self.proto, self.port)
    }
}

/// A custom-VPC pod's probe port: `-d <addr> -p tcp --dport <port>` of Kube-OVN's TPROXY rule.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct ProbeTarget<A> {
    pub addr: A,
    pub port: u16,
}

impl<A: fmt::Display> fmt::Display for ProbeTarget<A> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{},tcp:{}", self.addr, self.port)
    }
}

/// The L4 protocols a Service port can declare.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Proto {
    Tcp,
    Udp,
    Sctp,
}

impl Proto {
    /// A Service port's `protocol` as Kubernetes spells it (absent means TCP); `None` for any
    /// other value, which kube-proxy does not program.
    pub fn from_service_port(protocol: Option<&str>) -> Option<Self> {
        match protocol.unwrap_or("TCP") {
            "TCP" => Some(Self::Tcp),
            "UDP" => Some(Self::Udp),
            "SCTP" => Some(Self::Sctp),
            _ => None,
        }
    }

    pub fn number(self) -> u8 {
        match self {
            Self::Tcp => ipproto::TCP,
            Self::Udp => ipproto::UDP,
            Self::Sctp => ipproto::SCTP,
        }
    }

    pub fn from_number(number: u8) -> Option<Self> {
        match number {
            ipproto::TCP => Some(Self::Tcp),
            ipproto::UDP => Some(Self::Udp),
            ipproto::SCTP => Some(Self::Sctp),
            _ => None,
        }
    }
}

impl fmt::Display for Proto {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Tcp => "tcp",
            Self::Udp => "udp",
            Self::Sctp => "sctp",
        })
    }
}

/// The sets of one address family: Kube-OVN's `ovnX0*` ipsets, kube-proxy's `KUBE[-6]-*` sets and
/// the node's local addresses, plus the rules Kube-OVN would install for this family.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct FamilyState<Net: Ord, Addr: Ord> {
    /// `rule::bit` mask of the rules active for this family.
    #[serde(serialize_with = "serialize_rules")]
    pub rules: u32,
    /// `ovnX0subnets`.
    pub subnets: BTreeSet<Net>,
    /// `ovnX0services`.
    pub service_cidrs: BTreeSet<Net>,
    /// `KUBE[-6]-CLUSTER-IP`.
    pub service_ports: BTreeSet<ServicePort<Addr>>,
    /// `ovnX0other-node`.
    pub other_nodes: BTreeSet<Addr>,
    /// The kernel's local routing table (`addrtype LOCAL`).
    pub local: BTreeSet<Net>,
    /// `KUBE[-6]-NODE-PORT-LOCAL-TCP`.
    pub nodeport_local_tcp: BTreeSet<u16>,
    /// `KUBE[-6]-NODE-PORT-LOCAL-UDP`.
    pub nodeport_local_udp: BTreeSet<u16>,
    /// Kube-OVN's mangle `OVN-PREROUTING` TPROXY targets (with `--enable-tproxy`).
    pub probe_targets: BTreeSet<ProbeTarget<Addr>>,
    /// The transparent listener's address (Kube-OVN's `--on-ip`, the node's IP of the family).
    pub tproxy_listener: Option<Addr>,
    /// The agent found the listener the kernel picks for this family without
    /// `IP_TRANSPARENT`: probes are dropped rather than handed to it.
    pub tproxy_listener_opaque: bool,
}

impl<Net: Ord, Addr: Ord> Default for FamilyState<Net, Addr> {
    fn default() -> Self {
        Self {
            rules: 0,
            subnets: BTreeSet::new(),
            service_cidrs: BTreeSet::new(),
            service_ports: BTreeSet::new(),
            other_nodes: BTreeSet::new(),
            local: BTreeSet::new(),
            nodeport_local_tcp: BTreeSet::new(),
            nodeport_local_udp: BTreeSet::new(),
            probe_targets: BTreeSet::new(),
            tproxy_listener: None,
            tproxy_listener_opaque: false,
        }
    }
}

pub type V4State = FamilyState<Ipv4Net, Ipv4Addr>;
pub type V6State = FamilyState<Ipv6Net, Ipv6Addr>;

/// Everything the datapath maps should contain.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct MapState {
    pub v4: V4State,
    pub v6: V6State,
    /// ifindex → `role` bits.
    #[serde(serialize_with = "serialize_ifaces")]
    pub ifaces: BTreeMap<u32, u32>,
    /// Shadow mode: classify and count, write no mark.
    pub shadow: bool,
    /// The transparent listener's port (Kube-OVN's `--on-port`), 0 without TPROXY.
    pub tproxy_port: u16,
}

impl MapState {
    pub fn config(&self) -> kube_ovn_ebpf_common::Config {
        kube_ovn_ebpf_common::Config {
            rules_v4: self.v4.rules,
            rules_v6: self.v6.rules,
            flags: [
                (self.shadow, config_flag::SHADOW),
                (
                    self.v4.tproxy_listener_opaque,
                    config_flag::TPROXY_OPAQUE_V4,
                ),
                (
                    self.v6.tproxy_listener_opaque,
                    config_flag::TPROXY_OPAQUE_V6,
                ),
            ]
            .iter()
            .filter(|(on, _)| *on)
            .fold(0, |flags, (_, bit)| flags | bit),
            tproxy_port: self.tproxy_port,
            pad: 0,
            tproxy_ip_v4: self.v4.tproxy_listener.map_or([0; 4], |a| a.octets()),
            tproxy_ip_v6: self.v6.tproxy_listener.map_or([0; 16], |a| a.octets()),
        }
    }

    /// The NodePort-local array: port → `nodeport` bits, only ports with some bit set.
    pub fn nodeport_local(&self) -> BTreeMap<u16, u8> {
        let mut ports = BTreeMap::new();
        for (set, bit) in [
            (&self.v4.nodeport_local_tcp, nodeport::TCP_V4),
            (&self.v4.nodeport_local_udp, nodeport::UDP_V4),
            (&self.v6.nodeport_local_tcp, nodeport::TCP_V6),
            (&self.v6.nodeport_local_udp, nodeport::UDP_V6),
        ] {
            for port in set {
                *ports.entry(*port).or_insert(0) |= bit;
            }
        }
        ports
    }

    /// The NodePort-local array's value for one port (0: no entry).
    pub fn nodeport_bits(&self, port: u16) -> u8 {
        [
            (&self.v4.nodeport_local_tcp, nodeport::TCP_V4),
            (&self.v4.nodeport_local_udp, nodeport::UDP_V4),
            (&self.v6.nodeport_local_tcp, nodeport::TCP_V6),
            (&self.v6.nodeport_local_udp, nodeport::UDP_V6),
        ]
        .iter()
        .filter(|(set, _)| set.contains(&port))
        .fold(0, |bits, (_, bit)| bits | bit)
    }

    /// Splits the NodePort-local array back into the four per-family, per-protocol sets.
    pub fn set_nodeport_local(&mut self, ports: &BTreeMap<u16, u8>) {
        for (port, bits) in ports {
            for (set, bit) in [
                (&mut self.v4.nodeport_local_tcp, nodeport::TCP_V4),
                (&mut self.v4.nodeport_local_udp, nodeport::UDP_V4),
                (&mut self.v6.nodeport_local_tcp, nodeport::TCP_V6),
                (&mut self.v6.nodeport_local_udp, nodeport::UDP_V6),
            ] {
                if bits & bit != 0 {
                    set.insert(*port);
                }
            }
        }
    }
}

/// The keys of one family's sets an incremental step may have changed: each is either in the
/// desired [`FamilyState`] now (write it) or not (remove it). Named like the sets.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FamilyTouched<Net: Ord, Addr: Ord> {
    pub subnets: BTreeSet<Net>,
    pub service_cidrs: BTreeSet<Net>,
    pub service_ports: BTreeSet<ServicePort<Addr>>,
    pub other_nodes: BTreeSet<Addr>,
    pub local: BTreeSet<Net>,
    pub probe_targets: BTreeSet<ProbeTarget<Addr>>,
}

impl<Net: Ord, Addr: Ord> Default for FamilyTouched<Net, Addr> {
    fn default() -> Self {
        Self {
            subnets: BTreeSet::new(),
            service_cidrs: BTreeSet::new(),
            service_ports: BTreeSet::new(),
            other_nodes: BTreeSet::new(),
            local: BTreeSet::new(),
            probe_targets: BTreeSet::new(),
        }
    }
}

impl<Net: Ord + Copy, Addr: Ord + Copy> FamilyTouched<Net, Addr> {
    pub fn len(&self) -> usize {
        self.subnets.len()
            + self.service_cidrs.len()
            + self.service_ports.len()
            + self.other_nodes.len()
            + self.local.len()
            + self.probe_targets.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// What an incremental step may have changed in a [`MapState`] whose rules, interfaces and
/// config fields stayed the same: the touched keys of every set, and the NodePort-local ports
/// whose bits may differ.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Touched {
    pub v4: FamilyTouched<Ipv4Net, Ipv4Addr>,
    pub v6: FamilyTouched<Ipv6Net, Ipv6Addr>,
    pub nodeport_local: BTreeSet<u16>,
}

impl Touched {
    pub fn len(&self) -> usize {
        self.v4.len() + self.v6.len() + self.nodeport_local.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Human names of the rules in a `rule::bit` mask.
pub fn rule_names(mask: u32) -> Vec<&'static str> {
    (0..rule::COUNT)
        .filter(|r| mask & rule::bit(*r) != 0)
        .map(|r| rule::NAMES[r as usize])
        .collect()
}

/// Human names of the roles (and interface flags) in a `role` mask.
pub fn role_names(mask: u32) -> Vec<&'static str> {
    let flags = [(iface_flag::NO_ETHERNET, "no-ethernet")];
    role::NAMES
        .iter()
        .chain(flags.iter())
        .filter(|(bit, _)| mask & bit != 0)
        .map(|(_, name)| *name)
        .collect()
}

#[expect(
    clippy::trivially_copy_pass_by_ref,
    reason = "serde's serialize_with signature"
)]
fn serialize_rules<S: serde::Serializer>(mask: &u32, s: S) -> Result<S::Ok, S::Error> {
    s.collect_seq(rule_names(*mask))
}

fn serialize_ifaces<S: serde::Serializer>(
    ifaces: &BTreeMap<u32, u32>,
    s: S,
) -> Result<S::Ok, S::Error> {
    s.collect_map(ifaces.iter().map(|(i, r)| (i, role_names(*r))))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nodeport_array_round_trips_through_the_four_sets() {
        let mut desired = MapState::default();
        desired.v4.nodeport_local_tcp.extend([30080, 30081]);
        desired.v4.nodeport_local_udp.insert(30053);
        desired.v6.nodeport_local_tcp.insert(30080);
        let array = desired.nodeport_local();
        assert_eq!(
            array,
            BTreeMap::from([
                (30053, nodeport::UDP_V4),
                (30080, nodeport::TCP_V4 | nodeport::TCP_V6),
                (30081, nodeport::TCP_V4),
            ])
        );
        let mut back = MapState::default();
        back.set_nodeport_local(&array);
        assert_eq!(back, desired);
    }

    #[test]
    fn names_decode_masks() {
        assert_eq!(
            rule_names(rule::bit(rule::R1A) | rule::bit(rule::R3U)),
            ["R1a", "R3u"]
        );
        assert_eq!(role_names(role::OVN0 | role::LOOPBACK), ["ovn0", "lo"]);
        assert_eq!(
            role_names(role::NODE_NIC | iface_flag::NO_ETHERNET),
            ["nic", "no-ethernet"]
        );
    }
}
