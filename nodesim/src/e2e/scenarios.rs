//! The outcome scenarios (issue 4 §2) and what each must produce, in one table.
//!
//! Each scenario says, per kube-proxy mode, which of Kube-OVN's bits its first packet carries
//! (spec §5.2) and what the receiver sees with those bits (`marked`: what Kube-OVN's iptables
//! rules produce, so what the eBPF datapath must produce) and without them (`unmarked`: what a
//! node without the PREROUTING hook produces). Where the two differ, the scenario proves that the
//! mark reached its consumer; where they agree it still proves nothing else broke. The reasoning
//! for each cell is the consumer rules of spec §1.4 applied in order; `docs/e2e.md` walks through
//! them.

use crate::node::{
    HookKind, Host, KubeProxyMode, Outcome, Probe,
    topology::addr::{
        CENTRAL_POD_V4, EXT_V4, EXT_V6, JOIN_V4, JOIN_V6, KUBE_DNS_V4, KUBERNETES_V4,
        KUBERNETES_V6, NODE_V4, NODE_V6, OTHER_V4, OTHER_V6, OVN0_V4, OVN0_V6, POD_V4, POD_V6,
        U2O_POD_V4, VPC_POD_V4,
    },
};

/// The masquerade bit (R1, R3, kube-proxy) and the ETP=Local NodePort bit (R2).
const MASQ: u32 = 0x4000;
const NODEPORT_LOCAL: u32 = 0x8_0000;
/// What Calico's raw `cali-PREROUTING` clears (spec §1.4).
pub const CALICO_RAW_CLEARED: u32 = 0xf_0000;

#[derive(Clone, Debug)]
pub struct Expect {
    /// Kube-OVN bits on the first packet (0: none).
    pub mark: u32,
    pub marked: Outcome,
    pub unmarked: Outcome,
}

impl Expect {
    /// What `hook` must produce. With Calico's raw rule clearing 0xf0000, marks set in nat (the
    /// iptables hook) are set after it and survive, while marks set at TC ingress are cleared
    /// before nat: a scenario that relies on 0x80000 alone then behaves as unmarked (spec §6.8).
    /// 0x4000 is outside the cleared range, and where it is set it decides (P2 precedes P4/P5).
    pub fn for_hook(&self, hook: HookKind, calico_raw: bool) -> &Outcome {
        match hook {
            HookKind::Baseline => &self.unmarked,
            HookKind::Ebpf
                if calico_raw && self.mark & MASQ == 0 && self.mark & CALICO_RAW_CLEARED != 0 =>
            {
                &self.unmarked
            }
            HookKind::Iptables | HookKind::Ebpf => &self.marked,
        }
    }

    /// Whether the outcome depends on the mark at all.
    pub fn sensitive(&self) -> bool {
        self.marked != self.unmarked
    }
}

#[derive(Clone, Debug)]
pub struct Scenario {
    /// Spec §5.2 vector number, or "—" for scenarios the spec has no vector for.
    pub vector: &'static str,
    pub what: &'static str,
    pub probe: Probe,
    pub ipvs: Option<Expect>,
    pub iptables: Option<Expect>,
    /// Part of the coexistence traffic mix.
    pub coexist: bool,
}

impl Scenario {
    pub fn expect(&self, mode: KubeProxyMode) -> Option<&Expect> {
        match mode {
            KubeProxyMode::Ipvs => self.ipvs.as_ref(),
            KubeProxyMode::Iptables | KubeProxyMode::Nftables => self.iptables.as_ref(),
        }
    }
}

fn seen(addr: impl Into<std::net::IpAddr>) -> Outcome {
    Outcome::Seen(addr.into())
}

#[expect(
    clippy::unnecessary_wraps,
    reason = "a table cell; `None` marks a mode it does not apply to"
)]
fn expect(mark: u32, marked: Outcome, unmarked: Outcome) -> Option<Expect> {
    Some(Expect {
        mark,
        marked,
        unmarked,
    })
}

/// Unmarked packets in IPVS mode that reach Kube-OVN's REJECT guard.
fn refused() -> Outcome {
    Outcome::Refused
}

fn scenario(
    vector: &'static str,
    what: &'static str,
    probe: Probe,
    ipvs: Option<Expect>,
    iptables: Option<Expect>,
) -> Scenario {
    Scenario {
        vector,
        what,
        probe,
        ipvs,
        iptables,
        coexist: false,
    }
}

impl Scenario {
    fn in_coexistence_mix(mut self) -> Self {
        self.coexist = true;
        self
    }
}

/// Every scenario, in table order.
#[expect(clippy::too_many_lines, reason = "one table, one entry per scenario")]
pub fn all() -> Vec<Scenario> {
    use Host::{Ext, Other, Pods};
    vec![
        // pod → ClusterIP. IPVS: marked passes the guard and P2 masquerades (egress eth0);
        // unmarked is rejected. iptables mode: P11 (natOutgoing) masquerades either way.
        scenario(
            "1",
            "pod → ClusterIP",
            Probe::tcp(Pods, POD_V4, KUBERNETES_V4, 443),
            expect(MASQ, seen(NODE_V4), refused()),
            expect(MASQ, seen(NODE_V4), seen(NODE_V4)),
        )
        .in_coexistence_mix(),
        scenario(
            "28",
            "pod → ClusterIP (IPv6)",
            Probe::tcp(Pods, POD_V6, KUBERNETES_V6, 443),
            expect(MASQ, seen(NODE_V6), refused()),
            expect(MASQ, seen(NODE_V6), seen(NODE_V6)),
        )
        .in_coexistence_mix(),
        // The join subnet is not natOutgoing: only the mark (P2) masquerades it.
        scenario(
            "9",
            "join address → ClusterIP",
            Probe::tcp(Pods, JOIN_V4, KUBERNETES_V4, 443),
            expect(MASQ, seen(NODE_V4), refused()),
            expect(MASQ, seen(NODE_V4), seen(JOIN_V4)),
        )
        .in_coexistence_mix(),
        scenario(
            "9 v6",
            "join address → ClusterIP (IPv6)",
            Probe::tcp(Pods, JOIN_V6, KUBERNETES_V6, 443),
            expect(MASQ, seen(NODE_V6), refused()),
            expect(MASQ, seen(NODE_V6), seen(JOIN_V6)),
        ),
        scenario(
            "2",
            "pod → ClusterIP, port no Service lists",
            Probe::tcp(Pods, POD_V4, KUBERNETES_V4, 8443),
            expect(0, refused(), refused()),
            None,
        ),
        scenario(
            "2 v6",
            "pod → ClusterIP, unlisted port (IPv6)",
            Probe::tcp(Pods, POD_V6, KUBERNETES_V6, 8443),
            expect(0, refused(), refused()),
            None,
        ),
        // UDP has no guard; backend is a pod, so P3 masquerades (egress ovn0) either way.
        scenario(
            "4",
            "pod → ClusterIP DNS/udp",
            Probe::udp(Pods, POD_V4, KUBE_DNS_V4, 53),
            expect(MASQ, seen(OVN0_V4), seen(OVN0_V4)),
            expect(MASQ, seen(OVN0_V4), seen(OVN0_V4)),
        ),
        scenario(
            "10",
            "centralized-subnet pod → ClusterIP",
            Probe::tcp(Pods, CENTRAL_POD_V4, KUBE_DNS_V4, 53),
            expect(MASQ, seen(OVN0_V4), refused()),
            expect(MASQ, seen(OVN0_V4), seen(OVN0_V4)),
        ),
        // Not marked by anyone: rejected in IPVS mode, not masqueraded in iptables mode. A wrong
        // 0x4000 would show as the node's address.
        scenario(
            "8",
            "custom-VPC pod → ClusterIP (never marked)",
            Probe::tcp(Pods, VPC_POD_V4, KUBERNETES_V4, 443),
            expect(0, refused(), refused()),
            expect(0, seen(VPC_POD_V4), seen(VPC_POD_V4)),
        ),
        scenario(
            "7",
            "u2o underlay pod → ClusterIP (never marked)",
            Probe::tcp(Pods, U2O_POD_V4, KUBERNETES_V4, 443),
            expect(0, refused(), refused()),
            expect(0, seen(U2O_POD_V4), seen(U2O_POD_V4)),
        ),
        // ETP=Local, distributed subnet: P4 (marked) or P7 (unmarked) keeps the client address.
        scenario(
            "11",
            "external → NodePort ETP=Local, distributed subnet",
            Probe::tcp(Ext, EXT_V4, NODE_V4, 30080),
            expect(NODEPORT_LOCAL, seen(EXT_V4), seen(EXT_V4)),
            expect(0, seen(EXT_V4), seen(EXT_V4)),
        )
        .in_coexistence_mix(),
        scenario(
            "29",
            "external → NodePort ETP=Local, distributed (IPv6)",
            Probe::tcp(Ext, EXT_V6, NODE_V6, 30080),
            expect(NODEPORT_LOCAL, seen(EXT_V6), seen(EXT_V6)),
            expect(0, seen(EXT_V6), seen(EXT_V6)),
        ),
        // ETP=Local, centralized subnet: only 0x80000 (P5) masquerades; without it P7 keeps the
        // client address. No R2 in iptables mode.
        scenario(
            "—",
            "external → NodePort ETP=Local, centralized subnet",
            Probe::tcp(Ext, EXT_V4, NODE_V4, 30082),
            expect(NODEPORT_LOCAL, seen(OVN0_V4), seen(EXT_V4)),
            expect(0, seen(EXT_V4), seen(EXT_V4)),
        )
        .in_coexistence_mix(),
        scenario(
            "—",
            "external → NodePort ETP=Local, centralized (IPv6)",
            Probe::tcp(Ext, EXT_V6, NODE_V6, 30082),
            expect(NODEPORT_LOCAL, seen(OVN0_V6), seen(EXT_V6)),
            expect(0, seen(EXT_V6), seen(EXT_V6)),
        )
        .in_coexistence_mix(),
        // From another node: 0x4000 (R3) makes P2 masquerade; unmarked, nothing does.
        scenario(
            "13",
            "other node → NodePort ETP=Local",
            Probe::tcp(Other, OTHER_V4, NODE_V4, 30080),
            expect(MASQ | NODEPORT_LOCAL, seen(OVN0_V4), seen(OTHER_V4)),
            expect(0, seen(OTHER_V4), seen(OTHER_V4)),
        )
        .in_coexistence_mix(),
        scenario(
            "30",
            "other node → NodePort ETP=Local (IPv6)",
            Probe::tcp(Other, OTHER_V6, NODE_V6, 30080),
            expect(MASQ | NODEPORT_LOCAL, seen(OVN0_V6), seen(OTHER_V6)),
            expect(0, seen(OTHER_V6), seen(OTHER_V6)),
        )
        .in_coexistence_mix(),
        scenario(
            "16",
            "external → NodePort/udp ETP=Local",
            Probe::udp(Ext, EXT_V4, NODE_V4, 30053),
            expect(NODEPORT_LOCAL, seen(EXT_V4), seen(EXT_V4)),
            expect(0, seen(EXT_V4), seen(EXT_V4)),
        ),
        scenario(
            "18",
            "other node → NodePort/udp ETP=Local",
            Probe::udp(Other, OTHER_V4, NODE_V4, 30053),
            expect(MASQ | NODEPORT_LOCAL, seen(OVN0_V4), seen(OTHER_V4)),
            expect(0, seen(OTHER_V4), seen(OTHER_V4)),
        ),
        // First packet split in fragments: the consumers see the reassembled packet, which must
        // carry the mark (design §1).
        scenario(
            "27",
            "other node → NodePort/udp, fragmented",
            Probe::udp(Other, OTHER_V4, NODE_V4, 30053).with_payload(3000),
            expect(MASQ | NODEPORT_LOCAL, seen(OVN0_V4), seen(OTHER_V4)),
            expect(0, seen(OTHER_V4), seen(OTHER_V4)),
        ),
        scenario(
            "27 v6",
            "other node → NodePort/udp, fragmented (IPv6)",
            Probe::udp(Other, OTHER_V6, NODE_V6, 30053).with_payload(3000),
            expect(MASQ | NODEPORT_LOCAL, seen(OVN0_V6), seen(OTHER_V6)),
            expect(0, seen(OTHER_V6), seen(OTHER_V6)),
        ),
        // kube-proxy marks ETP=Cluster node ports itself; the hook must not disturb that bit.
        scenario(
            "12",
            "external → NodePort ETP=Cluster (kube-proxy's 0x4000)",
            Probe::tcp(Ext, EXT_V4, NODE_V4, 30081),
            expect(0, seen(OVN0_V4), seen(OVN0_V4)),
            expect(0, seen(OVN0_V4), seen(OVN0_V4)),
        ),
        // R2 on ovn0; P3 (pod → pod through the host) masquerades anyway.
        scenario(
            "19",
            "pod → node IP NodePort ETP=Local",
            Probe::tcp(Pods, POD_V4, NODE_V4, 30080),
            expect(NODEPORT_LOCAL, seen(OVN0_V4), seen(OVN0_V4)),
            expect(0, seen(OVN0_V4), seen(OVN0_V4)),
        ),
    ]
}
