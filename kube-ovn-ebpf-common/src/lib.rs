//! Map keys, values and constants shared by the eBPF datapath and the agent.
//!
//! Every type here crosses the kernel boundary: `#[repr(C)]`, explicit padding, a size assert,
//! and (with the `user` feature) `bytemuck::Pod` derives that refuse hidden padding.
#![no_std]

use core::mem::size_of;

/// `skb->mark` bits. These are a contract with Kube-OVN's POSTROUTING rules, kube-proxy and the
/// TPROXY policy routes (spec §1.4): never change them.
pub mod mark {
    /// Masquerade bit (kube-proxy's bit 14), set by R1a, R1b and R3; consumed by Kube-OVN's P1/P2,
    /// the IPVS-mode REJECT guard and kube-proxy's KUBE-POSTROUTING.
    pub const MASQUERADE: u32 = 0x4000;
    /// ETP=Local NodePort bit, set by R2; consumed by Kube-OVN's P4/P5.
    pub const NODEPORT_LOCAL: u32 = 0x8_0000;
    /// TPROXY prerouting mark; consumed by `ip rule fwmark 0x90004/0x90004 lookup 10001`.
    pub const TPROXY: u32 = 0x9_0004;
    /// Every bit this datapath may set. It only ever ORs these in.
    pub const ALL: u32 = MASQUERADE | NODEPORT_LOCAL | TPROXY;
}

/// Kube-OVN's transparent probe listener port (`util.TProxyListenPort`).
pub const TPROXY_LISTEN_PORT: u16 = 8102;

/// Rule ids. `1 << id` is a rule's bit in [`Config`]'s per-family rule masks (pinned, so ids
/// are fixed like counter slots: a new rule takes the next id) and in a classification result;
/// `counter::of_rule(id)` is its hit counter.
pub mod rule {
    /// `-i ovn0`, src in subnets, (dst, proto, dport) in KUBE-CLUSTER-IP (kube-proxy IPVS mode).
    pub const R1A: u32 = 0;
    /// `-i ovn0`, src in subnets, dst in the Service CIDR (kube-proxy iptables mode / none).
    pub const R1B: u32 = 1;
    /// tcp, dst is local, dport in KUBE-NODE-PORT-LOCAL-TCP.
    pub const R2T: u32 = 2;
    /// udp, dst is local, dport in KUBE-NODE-PORT-LOCAL-UDP.
    pub const R2U: u32 = 3;
    /// tcp, src is another node, dport in KUBE-NODE-PORT-LOCAL-TCP.
    pub const R3T: u32 = 4;
    /// udp, src is another node, dport in KUBE-NODE-PORT-LOCAL-UDP.
    pub const R3U: u32 = 5;
    /// Custom-VPC probe port steered to the transparent listener.
    pub const TPROXY: u32 = 6;

    /// Number of rules; ids are `0..COUNT`.
    pub const COUNT: u32 = 7;

    pub const fn bit(rule: u32) -> u32 {
        1 << rule
    }

    /// Rules whose match sets [`super::mark::MASQUERADE`].
    pub const MASQUERADE_RULES: u32 = bit(R1A) | bit(R1B) | bit(R3T) | bit(R3U);
    /// Rules whose match sets [`super::mark::NODEPORT_LOCAL`].
    pub const NODEPORT_LOCAL_RULES: u32 = bit(R2T) | bit(R2U);
    /// Every rule the NAT-table hook has (everything but TPROXY).
    pub const NAT_RULES: u32 = MASQUERADE_RULES | NODEPORT_LOCAL_RULES;

    /// The mark bits a set of rule hits adds to `skb->mark`.
    pub const fn mark_for(hits: u32) -> u32 {
        let mut mark = 0;
        if hits & MASQUERADE_RULES != 0 {
            mark |= super::mark::MASQUERADE;
        }
        if hits & NODEPORT_LOCAL_RULES != 0 {
            mark |= super::mark::NODEPORT_LOCAL;
        }
        if hits & bit(TPROXY) != 0 {
            mark |= super::mark::TPROXY;
        }
        mark
    }

    pub const NAMES: [&str; COUNT as usize] = ["R1a", "R1b", "R2t", "R2u", "R3t", "R3u", "TPROXY"];
}

/// Slots of the per-CPU counter array.
///
/// The counter map is pinned and adopted, values included, by every later build (an upgrade
/// keeps counting where the old program left off), so a slot's meaning is fixed forever: every
/// counter has a literal slot, a new counter (or a new rule's hit counter) takes the next unused
/// slot, and no slot is renumbered or reused. Rule ids are not slots; [`of_rule`] maps them.
pub mod counter {
    /// Hits of `rule::R1A`.
    pub const R1A: u32 = 0;
    /// Hits of `rule::R1B`.
    pub const R1B: u32 = 1;
    /// Hits of `rule::R2T`.
    pub const R2T: u32 = 2;
    /// Hits of `rule::R2U`.
    pub const R2U: u32 = 3;
    /// Hits of `rule::R3T`.
    pub const R3T: u32 = 4;
    /// Hits of `rule::R3U`.
    pub const R3U: u32 = 5;
    /// Probes handed to a transparent socket (`rule::TPROXY`).
    pub const TPROXY: u32 = 6;
    /// Parsed IP packet that matched no rule.
    pub const PASSED: u32 = 7;
    /// Truncated or malformed IP packet, or one past the IPv6 extension-header walk limit.
    pub const NOT_PARSED: u32 = 8;
    /// Not IPv4/IPv6 (ARP, LLDP, …).
    pub const NOT_IP: u32 = 9;
    /// Non-first fragment: carries no ports, so it is never classified (the reassembled packet
    /// takes the mark of the offset-0 fragment).
    pub const FRAGMENT: u32 = 10;
    /// Packet seen on an interface that has no role in the interface map.
    pub const NO_ROLE: u32 = 11;
    /// Packets that matched at least one rule (marked, or would be in shadow mode).
    pub const MARKED: u32 = 12;
    /// A probe-port packet on `lo` for which no transparent socket (established, or the
    /// listener unless the agent found it without `IP_TRANSPARENT`) was found: dropped, as
    /// Kube-OVN's TPROXY target drops it.
    pub const TPROXY_NO_SOCKET: u32 = 13;
    /// A packet the stack does not receive on this interface as itself, so netfilter never
    /// sees it here: addressed to another MAC (a macvlan above takes it, or `ip_rcv` drops
    /// it), or tagged for a VLAN (the VLAN device takes it, or it is dropped). It is
    /// classified where it is received, if anywhere: once.
    pub const OTHER_HOST: u32 = 14;
    /// A TCP segment without SYN, not classified because the program was loaded with
    /// [`super::frozen::SYN_ONLY`]: the node's `nf_conntrack_tcp_loose` is 0, so conntrack
    /// never starts a connection (and nat never sees a packet) without a SYN.
    pub const TCP_NO_SYN: u32 = 15;

    /// Slots in use: `0..USED`. The next new counter gets slot `USED`.
    pub const USED: u32 = 16;
    /// Size of the counter array (the pinned map's `max_entries`): room to append counters
    /// without changing the map layout.
    pub const SLOTS: u32 = 16;

    /// The hit counter of rule id `rule`; [`SLOTS`] (no slot: counting is a no-op) for an id
    /// that is not a rule.
    pub const fn of_rule(rule: u32) -> u32 {
        match rule {
            super::rule::R1A => R1A,
            super::rule::R1B => R1B,
            super::rule::R2T => R2T,
            super::rule::R2U => R2U,
            super::rule::R3T => R3T,
            super::rule::R3U => R3U,
            super::rule::TPROXY => TPROXY,
            _ => SLOTS,
        }
    }

    /// Names by slot, as `status` and the metrics show them.
    pub const NAMES: [&str; USED as usize] = [
        "R1a",
        "R1b",
        "R2t",
        "R2u",
        "R3t",
        "R3u",
        "TPROXY",
        "passed",
        "not_parsed",
        "not_ip",
        "fragment",
        "no_role",
        "marked",
        "tproxy_no_socket",
        "other_host",
        "tcp_no_syn",
    ];

    const _: () = {
        assert!(USED <= SLOTS);
        // Every rule has its own slot, inside the used range.
        let mut r = 0;
        while r < super::rule::COUNT {
            assert!(of_rule(r) < USED);
            let mut other = 0;
            while other < r {
                assert!(of_rule(other) != of_rule(r));
                other += 1;
            }
            r += 1;
        }
    };
}

/// Interface roles, ORed into [`Iface::roles`]. They decide which rules a packet arriving on
/// that interface can hit.
pub mod role {
    /// Kube-OVN's `ovn0`: R1 (`-i ovn0`) and R2/R3.
    pub const OVN0: u32 = 1 << 0;
    /// Any other interface the host stack receives on (NICs with or without a node address,
    /// VLAN devices, bonds, bridges, tunnels, `lo` with a node address): R2/R3.
    pub const NODE_NIC: u32 = 1 << 1;
    /// An underlay `br-<provider>` bridge holding the NIC's addresses: R2/R3.
    pub const PROVIDER_BRIDGE: u32 = 1 << 2;
    /// `lo` for the TPROXY replacement.
    pub const LOOPBACK: u32 = 1 << 3;

    /// Roles on which the NodePort rules (R2, R3) apply: iptables has no `-i` on them, so every
    /// interface the host stack receives on has one of these.
    pub const NODEPORT_ROLES: u32 = OVN0 | NODE_NIC | PROVIDER_BRIDGE;
    pub const ALL: u32 = OVN0 | NODE_NIC | PROVIDER_BRIDGE | LOOPBACK;

    pub const NAMES: [(u32, &str); 4] = [
        (OVN0, "ovn0"),
        (NODE_NIC, "nic"),
        (PROVIDER_BRIDGE, "bridge"),
        (LOOPBACK, "lo"),
    ];
}

/// Interface flags, kept in the high half of [`Iface::roles`] so the pinned interface map keeps
/// its layout.
pub mod iface_flag {
    /// At TC ingress this interface's packets carry no Ethernet header (tun, `wg0`, IP
    /// tunnels, anything but `ARPHRD_ETHER` and `lo`): the program reads them from the network
    /// header the kernel set, by `skb->protocol`, whatever precedes it.
    pub const NO_ETHERNET: u32 = 1 << 16;
    /// Every flag bit.
    pub const ALL: u32 = NO_ETHERNET;
    const _: () = assert!(ALL & super::role::ALL == 0);
}

/// Configuration frozen into the program when it is loaded: `.rodata` globals the agent sets
/// (aya's `override_global`) before the verifier sees the program. The verifier knows their
/// values, so a branch they disable is pruned, not taken per packet. Only what is constant for
/// an agent's lifetime belongs here (its flags, and the node's `nf_conntrack_tcp_loose`, on
/// whose change the agent loads and swaps in a new program); everything that follows the
/// cluster stays in [`Config`]. The ELF's defaults are the unfrozen behaviour: every rule
/// possible, every packet classified.
pub mod frozen {
    /// Symbol of the `u32` global: the rules that can ever be active on this node (`rule::bit`
    /// mask), combined (AND) with [`super::Config`]'s per-family masks. `--service-match ip-port` rules
    /// out R1b, `cidr` R1a and R2/R3, no `--enable-tproxy` TPROXY.
    pub const RULES: &str = "KOVN_FROZEN_RULES";
    /// Symbol of the `u32` global holding the flag bits below.
    pub const FLAGS: &str = "KOVN_FROZEN_FLAGS";
    /// Every rule: the default of [`RULES`].
    pub const ALL_RULES: u32 = (1 << super::rule::COUNT) - 1;
    /// Classify TCP only when it carries SYN (the NAT rules; TPROXY on `lo` still sees every
    /// segment). Exact only while the node's `nf_conntrack_tcp_loose` is 0: conntrack then
    /// marks a segment without SYN that starts no known connection INVALID, and the nat table
    /// (where Kube-OVN's rules live) never sees it; a known connection's segments are not NEW
    /// either. With the default 1, a mid-stream segment is picked up as NEW and must be
    /// classified (docs/design.md §1).
    pub const SYN_ONLY: u32 = 1 << 0;
}

/// Flags in [`Config::flags`].
pub mod config_flag {
    /// Classify and count, but write no mark.
    pub const SHADOW: u32 = 1 << 0;
    /// The agent found the IPv4 probe listener (the socket the kernel picks for
    /// `tproxy_ip_v4:tproxy_port`) without `IP_TRANSPARENT`: probes are not handed to it.
    pub const TPROXY_OPAQUE_V4: u32 = 1 << 1;
    /// The same for IPv6.
    pub const TPROXY_OPAQUE_V6: u32 = 1 << 2;
}

/// Bits of the NodePort-local array value: which of kube-proxy's `KUBE[-6]-NODE-PORT-LOCAL-{TCP,UDP}`
/// bitmap sets hold the port.
pub mod nodeport {
    pub const TCP_V4: u8 = 1 << 0;
    pub const UDP_V4: u8 = 1 << 1;
    pub const TCP_V6: u8 = 1 << 2;
    pub const UDP_V6: u8 = 1 << 3;
    /// The array is indexed by port, so it covers every port.
    pub const PORTS: u32 = 65_536;
}

/// IP protocol numbers the datapath looks at.
pub mod ipproto {
    pub const ICMP: u8 = 1;
    pub const TCP: u8 = 6;
    pub const UDP: u8 = 17;
    pub const ICMPV6: u8 = 58;
    pub const SCTP: u8 = 132;
}

/// Kernel object names. Each fits the 15-character `BPF_OBJ_NAME_LEN` limit and carries the
/// `kovn_` prefix; the eBPF crate spells the same literals in its `#[btf_map(name = …)]`.
pub mod names {
    pub const PROGRAM: &str = "kovn_ingress";

    pub const CONFIG: &str = "kovn_config";
    pub const IFACES: &str = "kovn_ifaces";
    pub const COUNTERS: &str = "kovn_counters";
    pub const SUBNETS_V4: &str = "kovn_subnets4";
    pub const SUBNETS_V6: &str = "kovn_subnets6";
    pub const SERVICE_CIDRS_V4: &str = "kovn_svccidr4";
    pub const SERVICE_CIDRS_V6: &str = "kovn_svccidr6";
    pub const SERVICE_PORTS_V4: &str = "kovn_svcport4";
    pub const SERVICE_PORTS_V6: &str = "kovn_svcport6";
    pub const OTHER_NODES_V4: &str = "kovn_othernode4";
    pub const OTHER_NODES_V6: &str = "kovn_othernode6";
    pub const LOCAL_ADDRS_V4: &str = "kovn_local4";
    pub const LOCAL_ADDRS_V6: &str = "kovn_local6";
    pub const NODEPORT_LOCAL: &str = "kovn_nplocal";
    pub const TPROXY_V4: &str = "kovn_tproxy4";
    pub const TPROXY_V6: &str = "kovn_tproxy6";
    pub const SUBNETS_V4_L16: &str = "kovn_sub4_l16";
    pub const SUBNETS_V4_L24: &str = "kovn_sub4_l24";
    pub const LOCAL_ADDRS_V4_EXACT: &str = "kovn_local4_32";
    pub const LOCAL_ADDRS_V6_EXACT: &str = "kovn_local6_128";
    pub const SUBNETS_V6_EXACT: &str = "kovn_sub6_64";
    pub const SERVICE_PORTS_V4_FRONT: &str = "kovn_svc4_front";
    pub const LOCAL_ADDRS_V4_FRONT: &str = "kovn_loc4_front";
    pub const OTHER_NODES_V4_FRONT: &str = "kovn_oth4_front";

    pub const ALL_MAPS: [&str; 24] = [
        CONFIG,
        IFACES,
        COUNTERS,
        SUBNETS_V4,
        SUBNETS_V6,
        SERVICE_CIDRS_V4,
        SERVICE_CIDRS_V6,
        SERVICE_PORTS_V4,
        SERVICE_PORTS_V6,
        OTHER_NODES_V4,
        OTHER_NODES_V6,
        LOCAL_ADDRS_V4,
        LOCAL_ADDRS_V6,
        NODEPORT_LOCAL,
        TPROXY_V4,
        TPROXY_V6,
        SUBNETS_V4_L16,
        SUBNETS_V4_L24,
        LOCAL_ADDRS_V4_EXACT,
        LOCAL_ADDRS_V6_EXACT,
        SUBNETS_V6_EXACT,
        SERVICE_PORTS_V4_FRONT,
        LOCAL_ADDRS_V4_FRONT,
        OTHER_NODES_V4_FRONT,
    ];
}

/// The direct-indexed front of an IPv4 prefix set (DIR-16-8): a 65 536-slot array indexed by
/// the address's first two bytes and 256-byte chunks indexed by the third. The LPM trie stays
/// the authority; the arrays answer most lookups with two inlined array reads and send the
/// rest to the trie. A zero anywhere means "ask the trie", so empty or half-written arrays are
/// always correct, only slower.
pub mod dir {
    /// Not known here: look the address up in the trie.
    pub const TRIE: u8 = 0;
    /// Some prefix of the set covers every address behind this slot/byte.
    pub const HIT: u8 = 1;
    /// No prefix of the set covers any address behind this slot/byte.
    pub const MISS: u8 = 2;
    /// First-level values from this one up name chunk `value - CHUNK_BASE`.
    pub const CHUNK_BASE: u32 = 3;
    /// First-level slots: one per /16.
    pub const SLOTS: u32 = 65_536;
    /// Chunks per set: /16s holding prefixes longer than /16. A /16 past this many falls back
    /// to the trie (its slot stays `TRIE`).
    pub const CHUNKS: u32 = 4_096;

    /// The chunk index a first-level value names, if it names one.
    pub const fn chunk(value: u32) -> Option<u32> {
        if value >= CHUNK_BASE {
            Some(value - CHUNK_BASE)
        } else {
            None
        }
    }
}

/// Exact-match fronts of prefix sets: a hash of the set's prefixes of one length `L`, keyed by
/// the address's first `L` bits, looked up before the set's LPM trie. A hit answers "member"
/// (that prefix covers the address); a miss asks the trie, which stays the authority and holds
/// the whole set. The agent derives a front from its trie only, so a front never answers
/// anything the trie would not; a prefix the full front cannot take is answered by the trie.
pub mod exact {
    /// The local-address set (`addrtype LOCAL`) is mostly host addresses: its /32s (IPv4) and
    /// /128s (IPv6), e.g. every ClusterIP IPVS binds to `kube-ipvs0`.
    pub const LOCAL_V4_LEN: u8 = 32;
    pub const LOCAL_V6_LEN: u8 = 128;
    /// IPv6 pod subnets are /64s as a rule.
    pub const SUBNETS_V6_LEN: u8 = 64;
    /// Entries per front. A hash allocates its bucket array (16 bytes per slot) up front, so
    /// fronts are sized like the ClusterIP-port hash rather than like the tries.
    pub const CAPACITY: u32 = 262_144;
}

/// Set-associative array fronts of the IPv4 exact-match sets the hot paths ask: ClusterIP ports
/// (R1a), local /32s (R2) and other nodes (R3). An array of [`FrontSet`]s indexed by the
/// address's last two bytes ([`set`]); each holds up to [`WAYS`] self-describing 8-byte words
/// (the whole key and a [`VALID`] byte, so a word is never mistaken for another key) and zero
/// for a free way. An array lookup is inlined by the verifier, so a hit costs a few loads and
/// compares instead of a hash; a key not found asks the set's hash (or trie), which stays the
/// authority and holds every member: a key its set has no free way for is answered there.
///
/// The agent writes the words through a shared memory mapping of the array
/// (`BPF_F_MMAPABLE`), one aligned 8-byte atomic store per word, and the program reads each
/// with one 8-byte load: a reader sees a word's old or new value, never a mix of two keys. A
/// word is stored after the authority holds its key and cleared before the authority drops it,
/// so a word the program finds is always a member.
pub mod front4 {
    /// Sets per front: one per value of the address's last two bytes. Consecutive ClusterIPs
    /// (and node addresses) land in distinct sets; addresses 65 536 apart share one.
    pub const SETS: u32 = 65_536;
    /// Words per set.
    pub const WAYS: usize = 4;
    /// The last byte of every stored word: a free way (zero) is never a key.
    pub const VALID: u8 = 1;

    /// The set `addr` (network byte order) belongs to: its last two bytes, read in the host's
    /// order (one load on either side of the map).
    pub const fn set(addr: [u8; 4]) -> u32 {
        u16::from_ne_bytes([addr[2], addr[3]]) as u32
    }

    /// The word of a ClusterIP port (`proto`, host-order `port`): the bytes of its
    /// [`super::ServicePortV4`] key with `VALID` in the pad, which is how the program makes it.
    pub const fn port_word(addr: [u8; 4], port: u16, proto: u8) -> u64 {
        let [p0, p1] = port.to_ne_bytes();
        u64::from_ne_bytes([addr[0], addr[1], addr[2], addr[3], p0, p1, proto, VALID])
    }

    /// The word of an address.
    pub const fn addr_word(addr: [u8; 4]) -> u64 {
        u64::from_ne_bytes([addr[0], addr[1], addr[2], addr[3], 0, 0, 0, VALID])
    }
}

/// One set of a [`front4`] array.
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct FrontSet(pub [u64; front4::WAYS]);
const _: () = assert!(size_of::<FrontSet>() == 32);

/// One second-level chunk of a [`dir`] set: a [`dir`] value per third address byte.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct DirChunk(pub [u8; 256]);
const _: () = assert!(size_of::<DirChunk>() == 256);

/// Capacities. LPM tries and the large hashes are `BPF_F_NO_PREALLOC`, so entries cost memory
/// only when used; a hash still allocates its bucket array (16 bytes per slot) up front, which
/// is why the hashes are sized for realistic clusters rather than Kube-OVN's 1 048 576-entry
/// ipset limit: 262 144 ClusterIP ports (100 000 Services × 2 ports fit) and 131 072 other
/// nodes (Kubernetes supports 5 000).
pub mod capacity {
    pub const IFACE_SLOTS: u32 = 65_536;
    pub const SUBNETS: u32 = 1_048_576;
    pub const SERVICE_CIDRS: u32 = 256;
    pub const SERVICE_PORTS: u32 = 262_144;
    pub const OTHER_NODES: u32 = 131_072;
    /// On IPVS nodes every ClusterIP is a local address (kube-ipvs0).
    pub const LOCAL_ADDRS: u32 = 1_048_576;
    /// Probe ports of the custom-VPC pods on one node.
    pub const PROBE_TARGETS: u32 = 16_384;
}

/// The single entry of the config array.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct Config {
    /// Rules active for IPv4 packets, as `rule::bit` masks. The agent decides them the way
    /// Kube-OVN does (R1a vs R1b; R2/R3 only with kube-proxy's IPVS sets and an InternalIP of
    /// the family).
    pub rules_v4: u32,
    /// Rules active for IPv6 packets.
    pub rules_v6: u32,
    /// `config_flag` bits.
    pub flags: u32,
    /// The transparent listener probe connections are steered to (Kube-OVN's
    /// `--on-port 8102 --on-ip <NodeIP>`), host byte order; 0 when TPROXY is off.
    pub tproxy_port: u16,
    pub pad: u16,
    /// Kube-OVN's `NodeIPv4`, network byte order.
    pub tproxy_ip_v4: [u8; 4],
    /// Kube-OVN's `NodeIPv6`.
    pub tproxy_ip_v6: [u8; 16],
}
const _: () = assert!(size_of::<Config>() == 36);

/// Key of the TPROXY maps: a custom-VPC pod's address and one of its liveness/readiness probe
/// ports (the `-d <podIP> -p tcp --dport <port>` of Kube-OVN's mangle `OVN-PREROUTING`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct ProbeTargetV4 {
    pub addr: [u8; 4],
    /// Host byte order.
    pub port: u16,
    pub pad: u16,
}
const _: () = assert!(size_of::<ProbeTargetV4>() == 8);

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct ProbeTargetV6 {
    pub addr: [u8; 16],
    pub port: u16,
    pub pad: u16,
}
const _: () = assert!(size_of::<ProbeTargetV6>() == 20);

/// A slot of the interface array. The array is indexed by `iface_slot(ifindex)` rather than
/// hashed by ifindex: an array lookup is inlined by the verifier, a hash lookup costs a helper
/// call on every packet. The stored ifindex tells a slot's owner from another interface that
/// maps to the same slot.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct Iface {
    pub ifindex: u32,
    /// `role` bits, plus `iface_flag` bits in the high half; zero means the slot is free.
    pub roles: u32,
}
const _: () = assert!(size_of::<Iface>() == 8);

/// The slot of `ifindex` in the interface array. Two attached interfaces whose indexes differ
/// by a multiple of `capacity::IFACE_SLOTS` would share one; the agent refuses the second.
pub const fn iface_slot(ifindex: u32) -> u32 {
    ifindex % capacity::IFACE_SLOTS
}

/// Key of the IPv4 ClusterIP map, the equivalent of kube-proxy's `KUBE-CLUSTER-IP`
/// (`hash:ip,port`, matched `dst,dst`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct ServicePortV4 {
    /// ClusterIP, network byte order (as in the packet).
    pub addr: [u8; 4],
    /// Port, host byte order (readable in `bpftool map dump`).
    pub port: u16,
    /// IP protocol number (`ipproto`).
    pub proto: u8,
    pub pad: u8,
}
const _: () = assert!(size_of::<ServicePortV4>() == 8);

/// Key of the IPv6 ClusterIP map (`KUBE-6-CLUSTER-IP`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct ServicePortV6 {
    pub addr: [u8; 16],
    pub port: u16,
    pub proto: u8,
    pub pad: u8,
}
const _: () = assert!(size_of::<ServicePortV6>() == 20);

/// Value stored in the set-like maps (subnets, Service CIDRs, ClusterIP ports, other nodes,
/// local addresses): presence is what matters.
pub const PRESENT: u8 = 1;

#[cfg(feature = "user")]
mod user {
    // SAFETY: each type is #[repr(C)], has no padding (bytemuck::Pod derive proves it) and every
    // bit pattern is valid.
    unsafe impl aya::Pod for super::Config {}
    unsafe impl aya::Pod for super::Iface {}
    unsafe impl aya::Pod for super::ServicePortV4 {}
    unsafe impl aya::Pod for super::ServicePortV6 {}
    unsafe impl aya::Pod for super::ProbeTargetV4 {}
    unsafe impl aya::Pod for super::ProbeTargetV6 {}
    unsafe impl aya::Pod for super::DirChunk {}
    unsafe impl aya::Pod for super::FrontSet {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_are_kube_ovns() {
        assert_eq!(mark::MASQUERADE, 0x4000);
        assert_eq!(mark::NODEPORT_LOCAL, 0x80000);
        assert_eq!(mark::TPROXY, 0x90004);
    }

    #[test]
    fn rule_hits_map_to_marks() {
        assert_eq!(rule::mark_for(0), 0);
        assert_eq!(rule::mark_for(rule::bit(rule::R1A)), 0x4000);
        assert_eq!(rule::mark_for(rule::bit(rule::R1B)), 0x4000);
        assert_eq!(rule::mark_for(rule::bit(rule::R2U)), 0x80000);
        assert_eq!(
            rule::mark_for(rule::bit(rule::R2T) | rule::bit(rule::R3T)),
            0x84000
        );
        assert_eq!(rule::mark_for(rule::bit(rule::TPROXY)), 0x90004);
    }

    #[test]
    fn rule_counters_are_named_like_rules() {
        for (r, name) in (0u32..).zip(rule::NAMES) {
            assert_eq!(counter::NAMES[counter::of_rule(r) as usize], name);
        }
    }

    /// The pinned counter map is adopted, values and all, by every later build: a slot must
    /// keep its meaning forever. This is today's numbering; a new counter appends.
    #[test]
    fn counter_slots_are_frozen() {
        let frozen: [(u32, &str); 16] = [
            (0, "R1a"),
            (1, "R1b"),
            (2, "R2t"),
            (3, "R2u"),
            (4, "R3t"),
            (5, "R3u"),
            (6, "TPROXY"),
            (7, "passed"),
            (8, "not_parsed"),
            (9, "not_ip"),
            (10, "fragment"),
            (11, "no_role"),
            (12, "marked"),
            (13, "tproxy_no_socket"),
            (14, "other_host"),
            (15, "tcp_no_syn"),
        ];
        for (slot, name) in frozen {
            assert_eq!(counter::NAMES[slot as usize], name, "slot {slot}");
        }
        let rule_slots: [u32; 7] =
            core::array::from_fn(|r| counter::of_rule(u32::try_from(r).unwrap()));
        assert_eq!(rule_slots, [0, 1, 2, 3, 4, 5, 6]);
        assert_eq!(
            [
                counter::PASSED,
                counter::NOT_PARSED,
                counter::NOT_IP,
                counter::FRAGMENT,
                counter::NO_ROLE,
                counter::MARKED,
                counter::TPROXY_NO_SOCKET,
                counter::OTHER_HOST,
                counter::TCP_NO_SYN,
            ],
            [7, 8, 9, 10, 11, 12, 13, 14, 15]
        );
        assert_eq!(counter::SLOTS, 16, "the pinned map's max_entries");
    }

    #[test]
    fn a_port_word_is_the_key_with_valid_in_its_pad() {
        let key = ServicePortV4 {
            addr: [10, 96, 0, 10],
            port: 53,
            proto: ipproto::UDP,
            pad: front4::VALID,
        };
        // SAFETY: 8 bytes either way; every bit pattern is a u64.
        let raw = unsafe { core::mem::transmute::<ServicePortV4, u64>(key) };
        assert_eq!(front4::port_word(key.addr, key.port, key.proto), raw);
        assert_ne!(front4::addr_word(key.addr), 0, "a free way is never a key");
        // The program makes an address word as the port word of port 0, protocol 0.
        assert_eq!(
            front4::addr_word(key.addr),
            front4::port_word(key.addr, 0, 0)
        );
        assert_eq!(front4::set([10, 96, 1, 2]), front4::set([10, 97, 1, 2]));
        assert_ne!(front4::set([10, 96, 1, 2]), front4::set([10, 96, 1, 3]));
    }

    #[test]
    fn kernel_names_fit_and_are_prefixed() {
        for name in names::ALL_MAPS.iter().chain([names::PROGRAM].iter()) {
            assert!(name.len() <= 15, "{name} exceeds BPF_OBJ_NAME_LEN");
            assert!(name.starts_with("kovn_"), "{name} lacks the kovn_ prefix");
        }
    }
}
