//! Turning a classification into effects: per-rule counters and, in enforce mode, Kube-OVN's
//! bits ORed into `skb->mark`. Other components' bits are never cleared.

use aya_ebpf::programs::TcContext;
use kube_ovn_ebpf_common::{config_flag, counter, rule};

use crate::maps::COUNTERS;

#[inline(always)]
pub fn count(slot: u32) {
    if let Some(value) = COUNTERS.get_ptr_mut(slot) {
        // SAFETY: per-CPU slot, and the program is not preempted on this CPU while it runs.
        unsafe { *value += 1 };
    }
}

#[inline(always)]
pub fn apply(ctx: &TcContext, hits: u32, config_flags: u32) {
    if hits == 0 {
        count(counter::PASSED);
        return;
    }
    for r in 0..rule::COUNT {
        if hits & rule::bit(r) != 0 {
            count(counter::of_rule(r));
        }
    }
    count(counter::MARKED);
    if config_flags & config_flag::SHADOW == 0 {
        // SAFETY: ctx.skb.skb is the context pointer the kernel passed to the program.
        let current = unsafe { (*ctx.skb.skb).mark };
        ctx.set_mark(current | rule::mark_for(hits));
    }
}
