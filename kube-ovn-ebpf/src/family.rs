//! What one address family contributes: its sets (ipsets `ovn40*`/`ovn60*`, `KUBE-*`/`KUBE-6-*`)
//! as map lookups, its NodePort bits, and the TPROXY probe targets and socket tuple layout. One
//! trait per family, so classification and the TPROXY replacement share one type parameter.

use aya_ebpf::{
    bindings::{
        bpf_sock_tuple, bpf_sock_tuple__bindgen_ty_1, bpf_sock_tuple__bindgen_ty_1__bindgen_ty_1,
        bpf_sock_tuple__bindgen_ty_1__bindgen_ty_2,
    },
    btf_maps::{Array, LpmTrie},
    maps::lpm_trie::Key,
};
use kube_ovn_ebpf_common::{
    Config, DirChunk, FrontSet, ProbeTargetV4, ProbeTargetV6, ServicePortV4, ServicePortV6,
    config_flag, dir, front4, nodeport,
};

use crate::maps::{
    LOCAL_ADDRS_V4, LOCAL_ADDRS_V4_EXACT, LOCAL_ADDRS_V4_FRONT, LOCAL_ADDRS_V6,
    LOCAL_ADDRS_V6_EXACT, OTHER_NODES_V4, OTHER_NODES_V4_FRONT, OTHER_NODES_V6, SERVICE_CIDRS_V4,
    SERVICE_CIDRS_V6, SERVICE_PORTS_V4, SERVICE_PORTS_V4_FRONT, SERVICE_PORTS_V6, SUBNETS_V4,
    SUBNETS_V4_L16, SUBNETS_V4_L24, SUBNETS_V6, SUBNETS_V6_EXACT, TPROXY_V4, TPROXY_V6,
};

pub trait Family {
    type Addr: Copy;
    const NODEPORT_TCP: u8;
    const NODEPORT_UDP: u8;
    /// `config_flag` bit saying this family's probe listener lacks `IP_TRANSPARENT`.
    const OPAQUE: u32;

    fn in_subnets(addr: Self::Addr) -> bool;
    fn in_service_cidrs(addr: Self::Addr) -> bool;
    fn is_service_port(addr: Self::Addr, proto: u8, port: u16) -> bool;
    fn is_local(addr: Self::Addr) -> bool;
    fn is_other_node(addr: Self::Addr) -> bool;
    fn is_probe_target(addr: Self::Addr, port: u16) -> bool;
    fn tuple(src: Self::Addr, dst: Self::Addr, sport: u16, dport: u16) -> (bpf_sock_tuple, u32);
    fn listener(config: &Config) -> Self::Addr;
}

pub struct V4;
pub struct V6;

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

/// Whether `word` is in `addr`'s set of a [`front4`] array: one inlined array lookup and a
/// compare per way. Each way is read with one 8-byte load, which the agent's atomic stores
/// never tear. Not found means "ask the authority".
#[inline(always)]
fn in_front<const S: usize, const F: usize>(
    front: &Array<FrontSet, S, F>,
    addr: [u8; 4],
    word: u64,
) -> bool {
    const _: () = assert!(front4::WAYS == 4, "one compare per way below");
    front.get(front4::set(addr)).is_some_and(|set| {
        // SAFETY: aligned u64s inside the map value the lookup returned.
        let way = |i: usize| unsafe { core::ptr::read_volatile(&raw const set.0[i]) };
        way(0) == word || way(1) == word || way(2) == word || way(3) == word
    })
}

/// `front4::addr_word(addr)`, made as the program makes a port word: the bytes of a
/// [`ServicePortV4`] with port and protocol zero and `VALID` in the pad.
#[inline(always)]
fn addr_word(addr: [u8; 4]) -> u64 {
    let key = ServicePortV4 {
        addr,
        port: 0,
        proto: 0,
        pad: front4::VALID,
    };
    // SAFETY: 8 bytes either way, and every bit pattern is a u64.
    unsafe { core::mem::transmute::<ServicePortV4, u64>(key) }
}

impl Family for V4 {
    type Addr = [u8; 4];
    const NODEPORT_TCP: u8 = nodeport::TCP_V4;
    const NODEPORT_UDP: u8 = nodeport::UDP_V4;
    const OPAQUE: u32 = config_flag::TPROXY_OPAQUE_V4;

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
            pad: front4::VALID,
        };
        // SAFETY: 8 bytes either way, and every bit pattern is a u64: the key with `VALID` in
        // its pad is `front4::port_word`.
        let word = unsafe { core::mem::transmute::<ServicePortV4, u64>(key) };
        in_front(&SERVICE_PORTS_V4_FRONT, addr, word)
            || SERVICE_PORTS_V4
                .get_ptr(ServicePortV4 { pad: 0, ..key })
                .is_some()
    }
    #[inline(always)]
    fn is_local(addr: [u8; 4]) -> bool {
        // The array front answers most host addresses with one inlined array read, the
        // exact-match front the /32s it had no room for with one hash lookup, and the trie
        // (which holds the whole set) the rest (`kube_ovn_ebpf_common::{front4, exact}`).
        in_front(&LOCAL_ADDRS_V4_FRONT, addr, addr_word(addr))
            || LOCAL_ADDRS_V4_EXACT.get_ptr(addr).is_some()
            || LOCAL_ADDRS_V4.get(&Key::new(32, addr)).is_some()
    }
    #[inline(always)]
    fn is_other_node(addr: [u8; 4]) -> bool {
        in_front(&OTHER_NODES_V4_FRONT, addr, addr_word(addr))
            || OTHER_NODES_V4.get_ptr(addr).is_some()
    }
    #[inline(always)]
    fn is_probe_target(addr: [u8; 4], port: u16) -> bool {
        TPROXY_V4
            .get_ptr(ProbeTargetV4 { addr, port, pad: 0 })
            .is_some()
    }
    #[inline(always)]
    fn tuple(src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16) -> (bpf_sock_tuple, u32) {
        let ipv4 = bpf_sock_tuple__bindgen_ty_1__bindgen_ty_1 {
            saddr: u32::from_ne_bytes(src),
            daddr: u32::from_ne_bytes(dst),
            sport: sport.to_be(),
            dport: dport.to_be(),
        };
        #[expect(clippy::cast_possible_truncation, reason = "a 12- or 36-byte struct")]
        let size = size_of::<bpf_sock_tuple__bindgen_ty_1__bindgen_ty_1>() as u32;
        (
            bpf_sock_tuple {
                __bindgen_anon_1: bpf_sock_tuple__bindgen_ty_1 { ipv4 },
            },
            size,
        )
    }
    #[inline(always)]
    fn listener(config: &Config) -> [u8; 4] {
        config.tproxy_ip_v4
    }
}

impl Family for V6 {
    type Addr = [u8; 16];
    const NODEPORT_TCP: u8 = nodeport::TCP_V6;
    const NODEPORT_UDP: u8 = nodeport::UDP_V6;
    const OPAQUE: u32 = config_flag::TPROXY_OPAQUE_V6;

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
    #[inline(always)]
    fn is_probe_target(addr: [u8; 16], port: u16) -> bool {
        TPROXY_V6
            .get_ptr(ProbeTargetV6 { addr, port, pad: 0 })
            .is_some()
    }
    #[inline(always)]
    fn tuple(src: [u8; 16], dst: [u8; 16], sport: u16, dport: u16) -> (bpf_sock_tuple, u32) {
        let words = |a: [u8; 16]| {
            [
                u32::from_ne_bytes([a[0], a[1], a[2], a[3]]),
                u32::from_ne_bytes([a[4], a[5], a[6], a[7]]),
                u32::from_ne_bytes([a[8], a[9], a[10], a[11]]),
                u32::from_ne_bytes([a[12], a[13], a[14], a[15]]),
            ]
        };
        let ipv6 = bpf_sock_tuple__bindgen_ty_1__bindgen_ty_2 {
            saddr: words(src),
            daddr: words(dst),
            sport: sport.to_be(),
            dport: dport.to_be(),
        };
        #[expect(clippy::cast_possible_truncation, reason = "a 12- or 36-byte struct")]
        let size = size_of::<bpf_sock_tuple__bindgen_ty_1__bindgen_ty_2>() as u32;
        (
            bpf_sock_tuple {
                __bindgen_anon_1: bpf_sock_tuple__bindgen_ty_1 { ipv6 },
            },
            size,
        )
    }
    #[inline(always)]
    fn listener(config: &Config) -> [u8; 16] {
        config.tproxy_ip_v6
    }
}
