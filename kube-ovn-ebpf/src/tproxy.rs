//! The TPROXY replacement (Kube-OVN's mangle `OVN-PREROUTING`, spec §1.3). A kubelet probe to a
//! custom-VPC pod's liveness/readiness port is rerouted through `lo` by the 0x90003 mark Kube-OVN
//! sets in mangle OUTPUT; here, at `lo` ingress, it is handed to the node's transparent listener
//! (or to the established transparent socket of its connection) with `bpf_sk_assign`, and the
//! caller marks it 0x90004 so the `fwmark 0x90004 lookup 10001` rule delivers it locally.

use aya_ebpf::{
    bindings::{BPF_F_CURRENT_NETNS, BPF_TCP_LISTEN, bpf_sock},
    helpers::{bpf_sk_assign, bpf_sk_lookup_tcp, bpf_sk_release, bpf_skc_lookup_tcp},
    programs::TcContext,
};
use kube_ovn_ebpf_common::{Config, ipproto};

use crate::{family::Family, parse::Tuple};

pub enum Steer {
    /// Not a probe to a custom-VPC pod's probe port.
    NotProbe,
    /// A probe packet; `assigned` when a transparent socket now owns it.
    Probe { assigned: bool },
}

/// Whether `t` is a probe to a custom-VPC pod, and if so (unless `shadow`) hands it to its
/// transparent socket: the established one of its connection (later packets of a probe, spec
/// vector T7), else the listener on `tproxy_ip:tproxy_port` unless the agent found it without
/// `IP_TRANSPARENT`.
#[inline(always)]
pub fn steer<F: Family>(
    ctx: &TcContext,
    t: &Tuple<F::Addr>,
    config: &Config,
    shadow: bool,
) -> Steer {
    let Some(dport) = t.dport else {
        return Steer::NotProbe;
    };
    if t.proto != ipproto::TCP || !F::is_probe_target(t.dst, dport) {
        return Steer::NotProbe;
    }
    if shadow {
        // Shadow mode observes only; whether a socket would be found is not checked.
        return Steer::Probe { assigned: true };
    }
    let skb = ctx.skb.skb.cast();
    let (mut tuple, size) = F::tuple(t.src, t.dst, t.sport, dport);
    // SAFETY: helpers on the program's own context with a tuple on the stack; every socket
    // reference obtained is released on every path.
    unsafe {
        // The kernel reads a negative (as s32) netns id as "the packet's own namespace".
        let netns = i64::from(BPF_F_CURRENT_NETNS).cast_unsigned();
        // The "skc" lookup also returns request sockets (a handshake in progress), which the
        // final ACK must reach; the plain lookup would turn them into their listener.
        let mut sk: *mut bpf_sock = bpf_skc_lookup_tcp(skb, &raw mut tuple, size, netns, 0);
        if !sk.is_null() && (*sk).state == BPF_TCP_LISTEN {
            // A listener bound to the pod address itself is not the transparent one.
            bpf_sk_release(sk.cast());
            sk = core::ptr::null_mut();
        }
        // The program cannot read a socket's transparent bit; the agent checks the listener
        // (sock_diag) and says when the one the kernel picks lacks it. Kube-OVN's TPROXY
        // target never hands a packet to such a socket.
        if sk.is_null() && config.flags & F::OPAQUE == 0 {
            let (mut listener, size) =
                F::tuple(t.src, F::listener(config), t.sport, config.tproxy_port);
            sk = bpf_sk_lookup_tcp(skb, &raw mut listener, size, netns, 0);
        }
        if sk.is_null() {
            return Steer::Probe { assigned: false };
        }
        let assigned = bpf_sk_assign(skb, sk.cast(), 0) == 0;
        bpf_sk_release(sk.cast());
        Steer::Probe { assigned }
    }
}
