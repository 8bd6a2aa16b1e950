//! `kovn_ingress`: a TC-ingress classifier that sets Kube-OVN's PREROUTING marks before netfilter
//! runs. Parse → look up → act; anything it does not understand passes untouched, and every
//! packet continues to the next TC program (`TC_ACT_UNSPEC`, which tcx treats as "next").
#![no_std]
#![no_main]
#![expect(
    clippy::inline_always,
    reason = "one flat program: no BPF-to-BPF calls for the verifier to track per call site"
)]

mod act;
mod classify;
mod family;
mod maps;
mod parse;
mod tproxy;

use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT, TC_ACT_UNSPEC},
    macros::classifier,
    programs::TcContext,
};
use kube_ovn_ebpf_common::{
    Config, config_flag, counter, frozen, iface_flag, iface_slot, ipproto, role, rule,
};

use crate::{
    classify::classify,
    family::{Family, V4, V6},
    maps::{CONFIG, IFACES},
    parse::{Packet, Parsed, Skip, TCP_SYN, Tuple, parse, tcp_flags},
    tproxy::Steer,
};

/// `kube_ovn_ebpf_common::frozen::RULES`, set by the agent at load. A plain `u32` rather than
/// `aya_ebpf::Global`, whose `MaybeUninit` wrapper the kernel's BTF check refuses; [`frozen`]
/// reads it volatile so the compiler cannot fold in the default.
#[unsafe(no_mangle)]
static KOVN_FROZEN_RULES: u32 = frozen::ALL_RULES;
/// `kube_ovn_ebpf_common::frozen::FLAGS`, set by the agent at load.
#[unsafe(no_mangle)]
static KOVN_FROZEN_FLAGS: u32 = 0;

/// A frozen value as the loader left it.
#[inline(always)]
fn frozen(value: &'static u32) -> u32 {
    // SAFETY: a valid, aligned static.
    unsafe { core::ptr::read_volatile(value) }
}

#[classifier]
#[expect(
    clippy::needless_pass_by_value,
    reason = "the #[classifier] entry signature"
)]
pub fn kovn_ingress(ctx: TcContext) -> i32 {
    // A test build's salt (`KOVN_EBPF_SALT`, compile time): one store of a constant to the
    // stack, so the program has another tag and the same behaviour (the e2e suite's in-place
    // upgrade). Absent in every other build.
    if let Some(salt) = option_env!("KOVN_EBPF_SALT") {
        let mut slot = 0u64;
        // SAFETY: a volatile store to a local, kept so the instruction stays.
        unsafe { core::ptr::write_volatile(&raw mut slot, salt.len() as u64) };
    }
    match try_kovn_ingress(&ctx) {
        Ok(verdict) => verdict,
        Err(skip) => {
            act::count(match skip {
                Stop::NoRole => counter::NO_ROLE,
                Stop::OtherHost => counter::OTHER_HOST,
                Stop::Parse(Skip::NotIp) => counter::NOT_IP,
                Stop::Parse(Skip::Malformed) => counter::NOT_PARSED,
                Stop::Parse(Skip::Fragment) => counter::FRAGMENT,
                Stop::TcpNoSyn => counter::TCP_NO_SYN,
            });
            TC_ACT_UNSPEC
        }
    }
}

enum Stop {
    NoRole,
    OtherHost,
    Parse(Skip),
    TcpNoSyn,
}

/// `PACKET_OTHERHOST`: addressed to a MAC that is not this interface's.
const PACKET_OTHERHOST: u32 = 3;
const VLAN_VID_MASK: u32 = 0x0fff;

#[inline(always)]
fn try_kovn_ingress(ctx: &TcContext) -> Result<i32, Stop> {
    let skb = ctx.skb.skb;
    // SAFETY: ctx.skb.skb is the context pointer the kernel passed to the program.
    let (ifindex, pkt_type, vlan_present, vlan_tci) = unsafe {
        (
            (*skb).ifindex,
            (*skb).pkt_type,
            (*skb).vlan_present,
            (*skb).vlan_tci,
        )
    };
    let roles = match IFACES.get(iface_slot(ifindex)) {
        Some(iface) if iface.ifindex == ifindex && iface.roles & role::ALL != 0 => iface.roles,
        _ => return Err(Stop::NoRole),
    };
    // Netfilter never sees these on this interface: a frame for another MAC goes to the
    // macvlan that owns it (classified there) or is dropped by ip_rcv; one tagged for a VLAN
    // (the outer tag is in vlan_tci by now) goes to the VLAN device or is dropped. Classifying
    // them here too would count one packet twice. Priority tags (VLAN 0) stay here.
    if pkt_type == PACKET_OTHERHOST || (vlan_present != 0 && vlan_tci & VLAN_VID_MASK != 0) {
        return Err(Stop::OtherHost);
    }
    let packet = if roles & iface_flag::NO_ETHERNET != 0 {
        Packet::from_network_header(ctx)
    } else {
        Packet::new(ctx)
    };
    let parsed = parse(&packet).map_err(Stop::Parse)?;
    // Constants to the verifier: without SYN_ONLY this test is pruned, and so is a rule the
    // node can never have. The skip comes before the config read: it needs nothing else.
    if frozen(&KOVN_FROZEN_FLAGS) & frozen::SYN_ONLY != 0
        && match &parsed {
            Parsed::V4(t) => not_syn(&packet, t, roles),
            Parsed::V6(t) => not_syn(&packet, t, roles),
        }
    {
        return Err(Stop::TcpNoSyn);
    }
    let possible = frozen(&KOVN_FROZEN_RULES);
    let config = CONFIG.get(0).copied().unwrap_or_default();
    let (hits, verdict) = match parsed {
        Parsed::V4(t) => evaluate::<V4>(ctx, &t, roles, config.rules_v4 & possible, &config),
        Parsed::V6(t) => evaluate::<V6>(ctx, &t, roles, config.rules_v6 & possible, &config),
    };
    act::apply(ctx, hits, config.flags);
    Ok(verdict)
}

/// A TCP segment without SYN that no rule needs to see once conntrack never starts a
/// connection without SYN (`frozen::SYN_ONLY`). Not on `lo`: the TPROXY replacement hands every
/// segment of a probe connection to its socket, as Kube-OVN's mangle rule sees every segment.
/// A header cut before its flags is classified on its ports as without the flag.
#[inline(always)]
fn not_syn<A>(packet: &Packet, t: &Tuple<A>, roles: u32) -> bool {
    t.proto == ipproto::TCP
        && roles & role::LOOPBACK == 0
        && tcp_flags(packet, t).is_some_and(|flags| flags & TCP_SYN == 0)
}

/// The rules hit and the verdict. Everything only classifies and continues (`TC_ACT_UNSPEC`),
/// except probes: one handed to a transparent socket now belongs to the socket, and a later TC
/// program that redirected or dropped it would break the kubelet probe, so TC processing ends
/// there (`TC_ACT_OK`); one that no transparent socket takes is dropped (`TC_ACT_SHOT`), as
/// Kube-OVN's TPROXY target drops it. Shadow mode never ends processing.
#[inline(always)]
fn evaluate<F: Family>(
    ctx: &TcContext,
    t: &Tuple<F::Addr>,
    roles: u32,
    active: u32,
    config: &Config,
) -> (u32, i32) {
    let mut hits = classify::<F>(t, roles, active);
    let mut verdict = TC_ACT_UNSPEC;
    if roles & role::LOOPBACK != 0 && active & rule::bit(rule::TPROXY) != 0 {
        let shadow = config.flags & config_flag::SHADOW != 0;
        match tproxy::steer::<F>(ctx, t, config, shadow) {
            Steer::NotProbe => {}
            Steer::Probe { assigned: true } => {
                hits |= rule::bit(rule::TPROXY);
                if !shadow {
                    verdict = TC_ACT_OK;
                }
            }
            Steer::Probe { assigned: false } => {
                // Kube-OVN's TPROXY target drops a probe no transparent socket takes (spec
                // §1.3); passed on, it would reach the local stack and be refused instead.
                act::count(counter::TPROXY_NO_SOCKET);
                verdict = TC_ACT_SHOT;
            }
        }
    }
    (hits, verdict)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
