//! The rules of Kube-OVN's nat `OVN-PREROUTING` chain (spec §1.2) as map lookups. Pure apart
//! from the lookups: returns the set of rules hit, as `rule::bit` flags; `act` turns them into
//! marks and counters.

use aya_ebpf::{
    btf_maps::{Array, LpmTrie},
    maps::lpm_trie::Key,
};
use kube_ovn_ebpf_common::{
    DirChunk, ServicePortV4, ServicePortV6, dir, ipproto, nodeport, role, rule,
};

use crate::{
    maps::{
        LOCAL_ADDRS_V4, LOCAL_ADDRS_V4_EXACT, LOCAL_ADDRS_V6, LOCAL_ADDRS_V6_EXACT, NODEPORT_LOCAL,
        OTHER_NODES_V4, OTHER_NODES_V6, SERVICE_CIDRS_V4, SERVICE_CIDRS_V6, SERVICE_PORTS_V4,
        SERVICE_PORTS_V6, SUBNETS_V4, SUBNETS_V4_L16, SUBNETS_V4_L24, SUBNETS_V6, SUBNETS_V6_EXACT,
    },
    parse::Tuple,
};

/// Membership of `addr` in an IPv4 prefix set with a direct-indexed front
/// (`kube_ovn_ebpf_common::dir`): two inlined array reads decide most addresses; `TRIE` (zero,
/// also what an unfilled array holds) sends the address to the trie, which holds the whole set.
#[inline(always)]
fn dir_member<const T: usize, const S: usize, const C: usize>(
    trie: &LpmTrie<[u8; 4], u8, T>,
    l16: &Array<u32, S>,
    l24: &Array<DirChunk, C>,
    addr: [u8; 4],
) -> bool {
    let slot = u32::from(addr[0]) << 8 | u32::from(addr[1]);
    let byte = match l16.get(slot).copied() {
        Some(value) => match dir::chunk(value) {
            // A u8 index into 256 bytes: no bounds check survives.
            Some(chunk) => l24
                .get(chunk)
                .map_or(dir::TRIE, |c| c.0[usize::from(addr[2])]),
            #[expect(clippy::cast_possible_truncation, reason = "below CHUNK_BASE: a u8")]
            None => value as u8,
        },
        None => dir::TRIE,
    };
    match byte {
        dir::HIT => true,
        dir::MISS => false,
        _ => trie.get(&Key::new(32, addr)).is_some(),
    }
}

/// The per-family sets (ipsets `ovn40*`/`ovn60*`, `KUBE-*`/`KUBE-6-*`).
pub trait Family {
    type Addr: Copy;
    const NODEPORT_TCP: u8;
    const NODEPORT_UDP: u8;

    fn in_subnets(addr: Self::Addr) -> bool;
    fn in_service_cidrs(addr: Self::Addr) -> bool;
    fn is_service_port(addr: Self::Addr, proto: u8, port: u16) -> bool;
    fn is_local(addr: Self::Addr) -> bool;
    fn is_other_node(addr: Self::Addr) -> bool;
}

pub struct V4;
pub struct V6;

impl Family for V4 {
    type Addr = [u8; 4];
    const NODEPORT_TCP: u8 = nodeport::TCP_V4;
    const NODEPORT_UDP: u8 = nodeport::UDP_V4;

    #[inline(always)]
    fn in_subnets(addr: [u8; 4]) -> bool {
        dir_member(&SUBNETS_V4, &SUBNETS_V4_L16, &SUBNETS_V4_L24, addr)
    }
    #[inline(always)]
    fn in_service_cidrs(addr: [u8; 4]) -> bool {
        SERVICE_CIDRS_V4.get(&Key::new(32, addr)).is_some()
    }
    #[inline(always)]
    fn is_service_port(addr: [u8; 4], proto: u8, port: u16) -> bool {
        let key = ServicePortV4 {
            addr,
            port,
            proto,
            pad: 0,
        };
        SERVICE_PORTS_V4.get_ptr(key).is_some()
    }
    #[inline(always)]
    fn is_local(addr: [u8; 4]) -> bool {
        // The exact-match front answers host addresses with one hash lookup; the trie (which
        // holds the whole set) answers the rest (`kube_ovn_ebpf_common::exact`).
        LOCAL_ADDRS_V4_EXACT.get_ptr(addr).is_some()
            || LOCAL_ADDRS_V4.get(&Key::new(32, addr)).is_some()
    }
    #[inline(always)]
    fn is_other_node(addr: [u8; 4]) -> bool {
        OTHER_NODES_V4.get_ptr(addr).is_some()
    }
}

impl Family for V6 {
    type Addr = [u8; 16];
    const NODEPORT_TCP: u8 = nodeport::TCP_V6;
    const NODEPORT_UDP: u8 = nodeport::UDP_V6;

    #[inline(always)]
    fn in_subnets(addr: [u8; 16]) -> bool {
        let [a0, a1, a2, a3, a4, a5, a6, a7, ..] = addr;
        SUBNETS_V6_EXACT
            .get_ptr([a0, a1, a2, a3, a4, a5, a6, a7])
            .is_some()
            || SUBNETS_V6.get(&Key::new(128, addr)).is_some()
    }
    #[inline(always)]
    fn in_service_cidrs(addr: [u8; 16]) -> bool {
        SERVICE_CIDRS_V6.get(&Key::new(128, addr)).is_some()
    }
    #[inline(always)]
    fn is_service_port(addr: [u8; 16], proto: u8, port: u16) -> bool {
        let key = ServicePortV6 {
            addr,
            port,
            proto,
            pad: 0,
        };
        SERVICE_PORTS_V6.get_ptr(key).is_some()
    }
    #[inline(always)]
    fn is_local(addr: [u8; 16]) -> bool {
        LOCAL_ADDRS_V6_EXACT.get_ptr(addr).is_some()
            || LOCAL_ADDRS_V6.get(&Key::new(128, addr)).is_some()
    }
    #[inline(always)]
    fn is_other_node(addr: [u8; 16]) -> bool {
        OTHER_NODES_V6.get_ptr(addr).is_some()
    }
}

/// Rules hit by a packet of family `F` arriving on an interface with `roles`, given the rules
/// active for the family. Cheap checks come first so a miss costs as few lookups as possible.
#[inline(always)]
pub fn classify<F: Family>(t: &Tuple<F::Addr>, roles: u32, active: u32) -> u32 {
    service_rules::<F>(t, roles, active) | nodeport_rules::<F>(t, roles, active)
}

/// R1a / R1b: `-i ovn0 -m set --match-set ovnX0subnets src` and then the service match.
/// The destination test runs first: most traffic leaving pods is not for a Service, and the
/// exact-match lookup is cheaper than the source prefix match it saves.
#[inline(always)]
fn service_rules<F: Family>(t: &Tuple<F::Addr>, roles: u32, active: u32) -> u32 {
    if roles & role::OVN0 == 0 {
        return 0;
    }
    let r1a = rule::bit(rule::R1A);
    let r1b = rule::bit(rule::R1B);
    let mut hits = 0;
    if active & r1a != 0
        && let Some(dport) = t.dport
        && F::is_service_port(t.dst, t.proto, dport)
    {
        hits |= r1a;
    }
    if active & r1b != 0 && F::in_service_cidrs(t.dst) {
        hits |= r1b;
    }
    if hits != 0 && F::in_subnets(t.src) {
        hits
    } else {
        0
    }
}

/// R2 (dst LOCAL) and R3 (src another node), both gated on the destination port being in the
/// protocol's ETP=Local NodePort set. Kube-OVN builds them for tcp and udp only.
#[inline(always)]
fn nodeport_rules<F: Family>(t: &Tuple<F::Addr>, roles: u32, active: u32) -> u32 {
    if roles & role::NODEPORT_ROLES == 0 {
        return 0;
    }
    let Some(dport) = t.dport else {
        return 0;
    };
    let (r2, r3, set) = match t.proto {
        ipproto::TCP => (rule::R2T, rule::R3T, F::NODEPORT_TCP),
        ipproto::UDP => (rule::R2U, rule::R3U, F::NODEPORT_UDP),
        _ => return 0,
    };
    let (r2, r3) = (rule::bit(r2), rule::bit(r3));
    if active & (r2 | r3) == 0 {
        return 0;
    }
    match NODEPORT_LOCAL.get(u32::from(dport)) {
        Some(sets) if sets & set != 0 => {}
        _ => return 0,
    }
    let mut hits = 0;
    if active & r2 != 0 && F::is_local(t.dst) {
        hits |= r2;
    }
    if active & r3 != 0 && F::is_other_node(t.src) {
        hits |= r3;
    }
    hits
}
