//! Reference model of the datapath: the same rules written as plain Rust over a [`MapState`]
//! state and a raw frame. It shares no code with the eBPF program (it has its own parser), so
//! tests can use it as the oracle for the program, and `verify`-style tooling can explain a
//! verdict without a kernel.

use std::net::{Ipv4Addr, Ipv6Addr};

use ipnet::{Ipv4Net, Ipv6Net};
use kube_ovn_ebpf_common::{ipproto, role, rule};

use crate::state::{FamilyState, MapState, ProbeTarget, Proto, ServicePort};

/// Walk limit for IPv6 extension headers; the datapath uses the same bound.
pub const MAX_IPV6_EXT_HEADERS: usize = 6;

/// What the datapath does with a frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Classified; `rule::bit` mask of the rules hit (possibly none).
    Classified(u32),
    NotIp,
    Malformed,
    Fragment,
    NoRole,
}

impl Verdict {
    pub fn hits(self) -> u32 {
        match self {
            Self::Classified(hits) => hits,
            _ => 0,
        }
    }

    /// Bits the datapath ORs into `skb->mark` in enforce mode.
    pub fn mark(self) -> u32 {
        rule::mark_for(self.hits())
    }
}

/// Header fields the rules look at.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tuple<A> {
    pub src: A,
    pub dst: A,
    pub proto: u8,
    pub dport: Option<u16>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Parsed {
    V4(Tuple<Ipv4Addr>),
    V6(Tuple<Ipv6Addr>),
}

/// Evaluates `frame` arriving on an interface with `ifindex` against `desired`.
pub fn evaluate(desired: &MapState, ifindex: u32, frame: &[u8]) -> Verdict {
    let roles = match desired.ifaces.get(&ifindex) {
        Some(&roles) if roles & role::ALL != 0 => roles,
        _ => return Verdict::NoRole,
    };
    match parse(frame) {
        Ok(Parsed::V4(t)) => Verdict::Classified(classify(&desired.v4, roles, &t)),
        Ok(Parsed::V6(t)) => Verdict::Classified(classify(&desired.v6, roles, &t)),
        Err(verdict) => verdict,
    }
}

/// Address-family operations the rules need.
pub trait FamilyAddr: Copy + Ord {
    type Net: Ord;
    fn net_contains(net: &Self::Net, addr: &Self) -> bool;
}

impl FamilyAddr for Ipv4Addr {
    type Net = Ipv4Net;
    fn net_contains(net: &Ipv4Net, addr: &Self) -> bool {
        net.contains(addr)
    }
}

impl FamilyAddr for Ipv6Addr {
    type Net = Ipv6Net;
    fn net_contains(net: &Ipv6Net, addr: &Self) -> bool {
        net.contains(addr)
    }
}

fn in_nets<A: FamilyAddr>(nets: &std::collections::BTreeSet<A::Net>, addr: &A) -> bool {
    nets.iter().any(|net| A::net_contains(net, addr))
}

/// The chain `OVN-PREROUTING` of spec §1.2, evaluated rule by rule.
pub fn classify<A: FamilyAddr>(state: &FamilyState<A::Net, A>, roles: u32, t: &Tuple<A>) -> u32 {
    let active = state.rules;
    let mut hits = 0;
    let on = |r: u32| active & rule::bit(r) != 0;

    // R1: -i ovn0 -m set --match-set ovnX0subnets src …
    if roles & role::OVN0 != 0 && in_nets(&state.subnets, &t.src) {
        // R1a: … -m set --match-set KUBE-CLUSTER-IP dst,dst
        if on(rule::R1A)
            && let (Some(proto), Some(port)) = (Proto::from_number(t.proto), t.dport)
            && state.service_ports.contains(&ServicePort {
                addr: t.dst,
                proto,
                port,
            })
        {
            hits |= rule::bit(rule::R1A);
        }
        // R1b: … -m set --match-set ovnX0services dst
        if on(rule::R1B) && in_nets(&state.service_cidrs, &t.dst) {
            hits |= rule::bit(rule::R1B);
        }
    }

    // R2/R3 for tcp then udp; no -i match, but only on the interfaces NodePort traffic uses.
    if roles & role::NODEPORT_ROLES != 0
        && let Some(dport) = t.dport
    {
        let per_proto = [
            (
                ipproto::TCP,
                &state.nodeport_local_tcp,
                rule::R2T,
                rule::R3T,
            ),
            (
                ipproto::UDP,
                &state.nodeport_local_udp,
                rule::R2U,
                rule::R3U,
            ),
        ];
        for (proto, ports, r2, r3) in per_proto {
            if t.proto != proto || !ports.contains(&dport) {
                continue;
            }
            if on(r2) && in_nets(&state.local, &t.dst) {
                hits |= rule::bit(r2);
            }
            if on(r3) && state.other_nodes.contains(&t.src) {
                hits |= rule::bit(r3);
            }
        }
    }

    // mangle OVN-PREROUTING: -d <podIP> -p tcp --dport <probePort> -j TPROXY, on `lo` only
    // (where kubelet's probes arrive; design §1). Whether a transparent socket is found is
    // kernel state: the model assumes one is.
    if roles & role::LOOPBACK != 0
        && on(rule::TPROXY)
        && t.proto == ipproto::TCP
        && let Some(port) = t.dport
        && state
            .probe_targets
            .contains(&ProbeTarget { addr: t.dst, port })
    {
        hits |= rule::bit(rule::TPROXY);
    }
    hits
}

/// Parses a frame the way the datapath does (see `kube-ovn-ebpf/src/parse.rs`), written
/// independently over a byte slice.
pub fn parse(frame: &[u8]) -> Result<Parsed, Verdict> {
    let mut ethertype = read_be16(frame, 12).ok_or(Verdict::Malformed)?;
    let mut l3 = 14;
    for _ in 0..2 {
        if !is_vlan(ethertype) {
            break;
        }
        ethertype = read_be16(frame, l3 + 2).ok_or(Verdict::Malformed)?;
        l3 += 4;
    }
    match ethertype {
        _ if is_vlan(ethertype) => Err(Verdict::NotIp),
        0x0800 => parse_ipv4(frame, l3).map(Parsed::V4),
        0x86dd => parse_ipv6(frame, l3).map(Parsed::V6),
        _ => Err(Verdict::NotIp),
    }
}

fn is_vlan(ethertype: u16) -> bool {
    ethertype == 0x8100 || ethertype == 0x88a8
}

fn parse_ipv4(frame: &[u8], l3: usize) -> Result<Tuple<Ipv4Addr>, Verdict> {
    let hdr = frame.get(l3..l3 + 20).ok_or(Verdict::Malformed)?;
    let ihl = usize::from(hdr[0] & 0xf) * 4;
    let total = usize::from(u16::from_be_bytes([hdr[2], hdr[3]]));
    if hdr[0] >> 4 != 4 || ihl < 20 || total < ihl || l3 + total > frame.len() {
        return Err(Verdict::Malformed);
    }
    if u16::from_be_bytes([hdr[6], hdr[7]]) & 0x1fff != 0 {
        return Err(Verdict::Fragment);
    }
    let proto = hdr[9];
    Ok(Tuple {
        src: Ipv4Addr::new(hdr[12], hdr[13], hdr[14], hdr[15]),
        dst: Ipv4Addr::new(hdr[16], hdr[17], hdr[18], hdr[19]),
        proto,
        dport: dport(frame, proto, l3 + ihl)?,
    })
}

fn parse_ipv6(frame: &[u8], l3: usize) -> Result<Tuple<Ipv6Addr>, Verdict> {
    let hdr = frame.get(l3..l3 + 40).ok_or(Verdict::Malformed)?;
    let payload = usize::from(u16::from_be_bytes([hdr[4], hdr[5]]));
    if hdr[0] >> 4 != 6 || (payload != 0 && l3 + 40 + payload > frame.len()) {
        return Err(Verdict::Malformed);
    }
    let src: [u8; 16] = hdr[8..24].try_into().expect("16 bytes");
    let dst: [u8; 16] = hdr[24..40].try_into().expect("16 bytes");
    let mut next = hdr[6];
    let mut offset = l3 + 40;
    let mut walked = 0;
    while matches!(next, 0 | 43 | 44 | 51 | 60) {
        if walked == MAX_IPV6_EXT_HEADERS {
            return Err(Verdict::Malformed);
        }
        let header_len = match next {
            0 | 43 | 60 => {
                let len = *frame.get(offset + 1).ok_or(Verdict::Malformed)?;
                (usize::from(len) + 1) * 8
            }
            51 => {
                let len = *frame.get(offset + 1).ok_or(Verdict::Malformed)?;
                (usize::from(len) + 2) * 4
            }
            44 => {
                let fragment = frame.get(offset..offset + 4).ok_or(Verdict::Malformed)?;
                if u16::from_be_bytes([fragment[2], fragment[3]]) & 0xfff8 != 0 {
                    return Err(Verdict::Fragment);
                }
                8
            }
            _ => unreachable!("loop condition lists every extension header"),
        };
        next = frame[offset];
        offset += header_len;
        walked += 1;
    }
    Ok(Tuple {
        src: src.into(),
        dst: dst.into(),
        proto: next,
        dport: dport(frame, next, offset)?,
    })
}

fn dport(frame: &[u8], proto: u8, l4: usize) -> Result<Option<u16>, Verdict> {
    match proto {
        ipproto::TCP | ipproto::UDP | ipproto::SCTP => read_be16(frame, l4 + 2)
            .filter(|_| frame.len() >= l4 + 4)
            .map(Some)
            .ok_or(Verdict::Malformed),
        _ => Ok(None),
    }
}

fn read_be16(frame: &[u8], offset: usize) -> Option<u16> {
    let bytes = frame.get(offset..offset + 2)?;
    Some(u16::from_be_bytes([bytes[0], bytes[1]]))
}
