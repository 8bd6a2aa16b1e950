//! The rules of Kube-OVN's nat `OVN-PREROUTING` chain (spec §1.2) as map lookups. Pure apart
//! from the lookups: returns the set of rules hit, as `rule::bit` flags; `act` turns them into
//! marks and counters.

use kube_ovn_ebpf_common::{ipproto, role, rule};

use crate::{family::Family, maps::NODEPORT_LOCAL, parse::Tuple};

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
