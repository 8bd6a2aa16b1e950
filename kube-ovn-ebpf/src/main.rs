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
mod maps;
mod parse;
mod tproxy;

use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_UNSPEC},
    macros::classifier,
    programs::TcContext,
};
use kube_ovn_ebpf_common::{Config, config_flag, counter, iface_slot, role, rule};

use crate::{
    classify::classify,
    maps::{CONFIG, IFACES},
    parse::{Packet, Parsed, Skip, Tuple, parse},
    tproxy::{ProbeFamily, Steer},
};

#[classifier]
#[expect(
    clippy::needless_pass_by_value,
    reason = "the #[classifier] entry signature"
)]
pub fn kovn_ingress(ctx: TcContext) -> i32 {
    match try_kovn_ingress(&ctx) {
        Ok(verdict) => verdict,
        Err(skip) => {
            act::count(match skip {
                Stop::NoRole => counter::NO_ROLE,
                Stop::Parse(Skip::NotIp) => counter::NOT_IP,
                Stop::Parse(Skip::Malformed) => counter::NOT_PARSED,
                Stop::Parse(Skip::Fragment) => counter::FRAGMENT,
            });
            TC_ACT_UNSPEC
        }
    }
}

enum Stop {
    NoRole,
    Parse(Skip),
}

#[inline(always)]
fn try_kovn_ingress(ctx: &TcContext) -> Result<i32, Stop> {
    // SAFETY: ctx.skb.skb is the context pointer the kernel passed to the program.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    let roles = match IFACES.get(iface_slot(ifindex)) {
        Some(iface) if iface.ifindex == ifindex && iface.roles != 0 => iface.roles,
        _ => return Err(Stop::NoRole),
    };
    let config = CONFIG.get(0).copied().unwrap_or_default();
    let (hits, verdict) = match parse(&Packet::new(ctx)).map_err(Stop::Parse)? {
        Parsed::V4(t) => {
            evaluate::<classify::V4, tproxy::V4>(ctx, &t, roles, config.rules_v4, &config)
        }
        Parsed::V6(t) => {
            evaluate::<classify::V6, tproxy::V6>(ctx, &t, roles, config.rules_v6, &config)
        }
    };
    act::apply(ctx, hits, config.flags);
    Ok(verdict)
}

/// The rules hit and the verdict. Everything only classifies and continues (`TC_ACT_UNSPEC`),
/// except a probe handed to a transparent socket: that packet now belongs to the socket, and a
/// later TC program that redirected or dropped it would break the kubelet probe, so TC
/// processing ends there (`TC_ACT_OK`).
#[inline(always)]
fn evaluate<C, P>(
    ctx: &TcContext,
    t: &Tuple<C::Addr>,
    roles: u32,
    active: u32,
    config: &Config,
) -> (u32, i32)
where
    C: classify::Family,
    P: ProbeFamily<Addr = C::Addr>,
{
    let mut hits = classify::<C>(t, roles, active);
    let mut verdict = TC_ACT_UNSPEC;
    if roles & role::LOOPBACK != 0 && active & rule::bit(rule::TPROXY) != 0 {
        let shadow = config.flags & config_flag::SHADOW != 0;
        match tproxy::steer::<P>(ctx, t, config, shadow) {
            Steer::NotProbe => {}
            Steer::Probe { assigned: true } => {
                hits |= rule::bit(rule::TPROXY);
                if !shadow {
                    verdict = TC_ACT_OK;
                }
            }
            Steer::Probe { assigned: false } => act::count(counter::TPROXY_NO_SOCKET),
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
