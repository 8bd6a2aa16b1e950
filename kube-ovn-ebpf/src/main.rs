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

use aya_ebpf::{bindings::TC_ACT_UNSPEC, macros::classifier, programs::TcContext};
use kube_ovn_ebpf_common::{counter, iface_slot};

use crate::{
    classify::{V4, V6, classify},
    maps::{CONFIG, IFACES},
    parse::{Packet, Parsed, Skip, parse},
};

#[classifier]
#[expect(
    clippy::needless_pass_by_value,
    reason = "the #[classifier] entry signature"
)]
pub fn kovn_ingress(ctx: TcContext) -> i32 {
    if let Err(skip) = try_kovn_ingress(&ctx) {
        act::count(match skip {
            Stop::NoRole => counter::NO_ROLE,
            Stop::Parse(Skip::NotIp) => counter::NOT_IP,
            Stop::Parse(Skip::Malformed) => counter::NOT_PARSED,
            Stop::Parse(Skip::Fragment) => counter::FRAGMENT,
        });
    }
    TC_ACT_UNSPEC
}

enum Stop {
    NoRole,
    Parse(Skip),
}

#[inline(always)]
fn try_kovn_ingress(ctx: &TcContext) -> Result<(), Stop> {
    // SAFETY: ctx.skb.skb is the context pointer the kernel passed to the program.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    let roles = match IFACES.get(iface_slot(ifindex)) {
        Some(iface) if iface.ifindex == ifindex && iface.roles != 0 => iface.roles,
        _ => return Err(Stop::NoRole),
    };
    let config = CONFIG.get(0).copied().unwrap_or_default();
    let hits = match parse(&Packet::new(ctx)).map_err(Stop::Parse)? {
        Parsed::V4(t) => classify::<V4>(&t, roles, config.rules_v4),
        Parsed::V6(t) => classify::<V6>(&t, roles, config.rules_v6),
    };
    act::apply(ctx, hits, config.flags);
    Ok(())
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
