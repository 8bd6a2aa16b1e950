//! Packet parsing: Ethernet (+ up to two VLAN tags still in the frame) → IPv4/IPv6 (options,
//! bounded extension-header walk, fragments) → the destination port of TCP/UDP/SCTP. On
//! interfaces without an Ethernet header, from the network header by `skb->protocol`.
//!
//! Everything is read through [`Packet::load`], the one bounds-checked way to touch the packet.

use aya_ebpf::{
    bindings::bpf_hdr_start_off::BPF_HDR_START_NET, helpers::bpf_skb_load_bytes_relative,
    programs::TcContext,
};
use kube_ovn_ebpf_common::ipproto;

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86DD;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88A8;
const VLAN_HLEN: usize = 4;
/// 802.1ad outer + 802.1Q inner is the deepest stacking seen in practice.
const MAX_VLAN_TAGS: usize = 2;

const IPV4_MIN_HLEN: usize = 20;
const IPV4_FRAG_OFFSET_MASK: u16 = 0x1fff;
const IPV6_HLEN: usize = 40;

const NEXTHDR_HOP: u8 = 0;
const NEXTHDR_ROUTING: u8 = 43;
const NEXTHDR_FRAGMENT: u8 = 44;
const NEXTHDR_AUTH: u8 = 51;
const NEXTHDR_DEST: u8 = 60;
/// Extension headers walked before giving up. Real traffic carries at most two or three; the
/// bound keeps the verifier's work fixed. A packet with more is passed unclassified (counted
/// as not parsed) — ip6tables would walk further; see docs/datapath.md.
pub const MAX_IPV6_EXT_HEADERS: usize = 6;

/// Why a packet was not classified. Each maps to a counter; none changes the packet.
#[derive(Clone, Copy)]
pub enum Skip {
    /// Not IPv4/IPv6.
    NotIp,
    /// Truncated, inconsistent lengths, or past the extension-header walk limit.
    Malformed,
    /// A non-first fragment: no ports to classify by.
    Fragment,
}

pub type ParseResult<T> = Result<T, Skip>;

/// Read-only, bounds-checked view of the packet.
pub struct Packet<'a> {
    ctx: &'a TcContext,
    /// Offsets count from the network header, not from the start of the data.
    from_network_header: bool,
}

impl<'a> Packet<'a> {
    /// A packet that starts with an Ethernet header (what TC ingress shows on Ethernet links).
    pub fn new(ctx: &'a TcContext) -> Self {
        Self {
            ctx,
            from_network_header: false,
        }
    }

    /// A packet on a link without an Ethernet header. Whatever the link puts before the
    /// network header at TC ingress (nothing on tun or `wg` devices, the outer headers on some
    /// tunnels), the kernel set the network header at the IP header when it received the
    /// packet, so offsets count from there.
    pub fn from_network_header(ctx: &'a TcContext) -> Self {
        Self {
            ctx,
            from_network_header: true,
        }
    }

    /// `T` read from `offset` bytes into the frame (or the network header), or `None` if the
    /// packet is shorter.
    ///
    /// Reads straight from the linear area when the bytes are there (the common case: drivers
    /// and GRO put the headers in it), and otherwise through `bpf_skb_load_bytes`, which also
    /// reaches paged data. Either way nothing is pulled, so no pointer needs revalidating.
    #[inline(always)]
    pub fn load<T>(&self, offset: usize) -> Option<T> {
        if self.from_network_header {
            return self.load_from_network_header(offset);
        }
        let start = self.ctx.data();
        let end = self.ctx.data_end();
        if start + offset + size_of::<T>() <= end {
            // SAFETY: the bytes lie within [data, data_end), checked just above; the read is
            // unaligned-safe and T is plain bytes.
            return Some(unsafe { core::ptr::read_unaligned((start + offset) as *const T) });
        }
        self.ctx.load::<T>(offset).ok()
    }

    #[inline(always)]
    fn load_from_network_header<T>(&self, offset: usize) -> Option<T> {
        let mut value = core::mem::MaybeUninit::<T>::uninit();
        let offset = u32::try_from(offset).ok()?;
        #[expect(clippy::cast_possible_truncation, reason = "header-sized reads")]
        let len = size_of::<T>() as u32;
        // SAFETY: the helper writes exactly `len` bytes into `value` or fails; on success
        // every byte of T is initialised and T is plain bytes.
        unsafe {
            let rc = bpf_skb_load_bytes_relative(
                self.ctx.skb.skb.cast(),
                offset,
                value.as_mut_ptr().cast(),
                len,
                BPF_HDR_START_NET,
            );
            (rc == 0).then(|| value.assume_init())
        }
    }

    /// `skb->len`: at TC ingress it counts from the start of the data (the Ethernet header).
    /// From the network header it is an upper bound (any link-layer bytes are included), so
    /// the length checks there only reject what is surely too short.
    #[inline(always)]
    pub fn len(&self) -> usize {
        self.ctx.len() as usize
    }

    /// `skb->protocol`: the L3 protocol the link (or `eth_type_trans`) found.
    #[inline(always)]
    fn protocol(&self) -> u16 {
        // SAFETY: ctx.skb.skb is the context pointer the kernel passed to the program.
        let protocol = unsafe { (*self.ctx.skb.skb).protocol };
        // A __be16 in a 32-bit field.
        #[expect(clippy::cast_possible_truncation, reason = "the low 16 bits hold it")]
        u16::from_be(protocol as u16)
    }
}

/// The fields the rules look at, for one address family.
#[derive(Clone, Copy)]
pub struct Tuple<A> {
    pub src: A,
    pub dst: A,
    pub proto: u8,
    /// Host byte order; `None` for protocols without ports (ICMP, …).
    pub dport: Option<u16>,
    /// Host byte order; 0 for protocols without ports.
    pub sport: u16,
    /// Offset of the transport header (for [`tcp_flags`]).
    pub l4: usize,
}

/// SYN in TCP's flags byte.
pub const TCP_SYN: u8 = 0x02;

/// TCP's flags byte (offset 13 of its header), `None` when the header is cut before it. Read
/// only where it is needed, so a program that never needs it does not pay for it.
#[inline(always)]
pub fn tcp_flags<A>(pkt: &Packet, t: &Tuple<A>) -> Option<u8> {
    pkt.load::<u8>(t.l4 + 13)
}

pub enum Parsed {
    V4(Tuple<[u8; 4]>),
    V6(Tuple<[u8; 16]>),
}

#[inline(always)]
pub fn parse(pkt: &Packet) -> ParseResult<Parsed> {
    let (ethertype, l3) = if pkt.from_network_header {
        (pkt.protocol(), 0)
    } else {
        ethernet(pkt)?
    };
    match ethertype {
        ETH_P_IP => ipv4(pkt, l3).map(Parsed::V4),
        ETH_P_IPV6 => ipv6(pkt, l3).map(Parsed::V6),
        _ => Err(Skip::NotIp),
    }
}

/// Returns the ethertype after any VLAN tags still in the frame, and the L3 offset. Tags the
/// driver moved into `skb->vlan_tci` are already gone from the data.
#[inline(always)]
fn ethernet(pkt: &Packet) -> ParseResult<(u16, usize)> {
    let mut ethertype = be16(pkt.load::<[u8; 2]>(12).ok_or(Skip::Malformed)?);
    let mut offset = ETH_HLEN;
    for _ in 0..MAX_VLAN_TAGS {
        if ethertype != ETH_P_8021Q && ethertype != ETH_P_8021AD {
            break;
        }
        // The tag's own TPID is followed by TCI (2 bytes) and the next ethertype (2 bytes).
        ethertype = be16(pkt.load::<[u8; 2]>(offset + 2).ok_or(Skip::Malformed)?);
        offset += VLAN_HLEN;
    }
    if ethertype == ETH_P_8021Q || ethertype == ETH_P_8021AD {
        // Deeper stacking than we walk: not something we understand.
        return Err(Skip::NotIp);
    }
    Ok((ethertype, offset))
}

#[repr(C)]
struct Ipv4Header {
    version_ihl: u8,
    tos: u8,
    total_len: [u8; 2],
    id: [u8; 2],
    flags_fragment: [u8; 2],
    ttl: u8,
    proto: u8,
    checksum: [u8; 2],
    src: [u8; 4],
    dst: [u8; 4],
}

#[inline(always)]
fn ipv4(pkt: &Packet, l3: usize) -> ParseResult<Tuple<[u8; 4]>> {
    let hdr: Ipv4Header = pkt.load(l3).ok_or(Skip::Malformed)?;
    if hdr.version_ihl >> 4 != 4 {
        return Err(Skip::Malformed);
    }
    let header_len = usize::from(hdr.version_ihl & 0x0f) * 4;
    let total_len = usize::from(be16(hdr.total_len));
    // ip_rcv drops these before netfilter would see them.
    if header_len < IPV4_MIN_HLEN || total_len < header_len || l3 + total_len > pkt.len() {
        return Err(Skip::Malformed);
    }
    if be16(hdr.flags_fragment) & IPV4_FRAG_OFFSET_MASK != 0 {
        return Err(Skip::Fragment);
    }
    let l4 = l3 + header_len;
    let (sport, dport) = l4_ports(pkt, hdr.proto, l4)?;
    Ok(Tuple {
        src: hdr.src,
        dst: hdr.dst,
        proto: hdr.proto,
        dport,
        sport,
        l4,
    })
}

#[repr(C)]
struct Ipv6Header {
    version_class_flow: [u8; 4],
    payload_len: [u8; 2],
    next_header: u8,
    hop_limit: u8,
    src: [u8; 16],
    dst: [u8; 16],
}

#[inline(always)]
fn ipv6(pkt: &Packet, l3: usize) -> ParseResult<Tuple<[u8; 16]>> {
    let hdr: Ipv6Header = pkt.load(l3).ok_or(Skip::Malformed)?;
    if hdr.version_class_flow[0] >> 4 != 6 {
        return Err(Skip::Malformed);
    }
    let payload_len = usize::from(be16(hdr.payload_len));
    // Zero means a jumbogram / BIG TCP aggregate whose length is not in this field.
    if payload_len != 0 && l3 + IPV6_HLEN + payload_len > pkt.len() {
        return Err(Skip::Malformed);
    }
    let (proto, l4) = ipv6_upper_layer(pkt, hdr.next_header, l3 + IPV6_HLEN)?;
    let (sport, dport) = l4_ports(pkt, proto, l4)?;
    Ok(Tuple {
        src: hdr.src,
        dst: hdr.dst,
        proto,
        dport,
        sport,
        l4,
    })
}

/// Skips extension headers as `ipv6_find_hdr` (what ip6tables `-p` uses) does, and returns the
/// upper-layer protocol and its offset.
#[inline(always)]
fn ipv6_upper_layer(pkt: &Packet, mut next: u8, mut offset: usize) -> ParseResult<(u8, usize)> {
    for _ in 0..MAX_IPV6_EXT_HEADERS {
        match next {
            NEXTHDR_HOP | NEXTHDR_ROUTING | NEXTHDR_DEST => {
                let [nh, len]: [u8; 2] = pkt.load(offset).ok_or(Skip::Malformed)?;
                next = nh;
                offset += (usize::from(len) + 1) * 8;
            }
            NEXTHDR_AUTH => {
                let [nh, len]: [u8; 2] = pkt.load(offset).ok_or(Skip::Malformed)?;
                next = nh;
                offset += (usize::from(len) + 2) * 4;
            }
            NEXTHDR_FRAGMENT => {
                let [nh, _reserved, off_hi, off_lo]: [u8; 4] =
                    pkt.load(offset).ok_or(Skip::Malformed)?;
                if be16([off_hi, off_lo]) & !0x7 != 0 {
                    return Err(Skip::Fragment);
                }
                next = nh;
                offset += 8;
            }
            _ => return Ok((next, offset)),
        }
    }
    if is_ipv6_extension(next) {
        return Err(Skip::Malformed);
    }
    Ok((next, offset))
}

#[inline(always)]
fn is_ipv6_extension(next: u8) -> bool {
    matches!(
        next,
        NEXTHDR_HOP | NEXTHDR_ROUTING | NEXTHDR_DEST | NEXTHDR_AUTH | NEXTHDR_FRAGMENT
    )
}

/// Source and destination port for protocols that carry them in bytes 0..4 of their header.
#[inline(always)]
fn l4_ports(pkt: &Packet, proto: u8, l4: usize) -> ParseResult<(u16, Option<u16>)> {
    match proto {
        ipproto::TCP | ipproto::UDP | ipproto::SCTP => {
            let [s_hi, s_lo, d_hi, d_lo]: [u8; 4] = pkt.load(l4).ok_or(Skip::Malformed)?;
            Ok((be16([s_hi, s_lo]), Some(be16([d_hi, d_lo]))))
        }
        _ => Ok((0, None)),
    }
}

#[inline(always)]
fn be16(bytes: [u8; 2]) -> u16 {
    u16::from_be_bytes(bytes)
}
