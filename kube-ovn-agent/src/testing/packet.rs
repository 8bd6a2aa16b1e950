//! A frame builder for tests, benchmarks and traffic injection: Ethernet, VLAN tags, IPv4 with
//! options, IPv6 with extension headers, fragments, TCP/UDP/SCTP/ICMP, with valid checksums.

use std::net::IpAddr;

use kube_ovn_ebpf_common::ipproto;

/// IPv6 extension header types the builder can insert.
pub mod ext {
    pub const HOP_BY_HOP: u8 = 0;
    pub const ROUTING: u8 = 43;
    pub const FRAGMENT: u8 = 44;
    pub const AUTH: u8 = 51;
    pub const DEST_OPTS: u8 = 60;
}

pub const TPID_8021Q: u16 = 0x8100;
pub const TPID_8021AD: u16 = 0x88a8;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum L4 {
    Tcp {
        sport: u16,
        dport: u16,
        flags: u8,
    },
    Udp {
        sport: u16,
        dport: u16,
    },
    Sctp {
        sport: u16,
        dport: u16,
    },
    /// ICMP or `ICMPv6` echo request, by family.
    Echo,
    /// Any other protocol number, with an opaque payload.
    Other(u8),
}

pub const TCP_SYN: u8 = 0x02;
pub const TCP_ACK: u8 = 0x10;

impl L4 {
    pub fn proto(self, v6: bool) -> u8 {
        match self {
            Self::Tcp { .. } => ipproto::TCP,
            Self::Udp { .. } => ipproto::UDP,
            Self::Sctp { .. } => ipproto::SCTP,
            Self::Echo if v6 => ipproto::ICMPV6,
            Self::Echo => ipproto::ICMP,
            Self::Other(proto) => proto,
        }
    }
}

#[derive(Clone, Debug)]
pub struct Packet {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub l4: L4,
    /// TPIDs of VLAN tags left in the frame, outermost first.
    pub vlan_tags: Vec<u16>,
    /// IPv4 option bytes (rounded up to a multiple of 4, at most 40).
    pub ipv4_options: usize,
    /// IPv6 extension headers, in order.
    pub ipv6_ext: Vec<u8>,
    /// Fragment offset in 8-byte units; non-zero makes a non-first fragment.
    pub fragment_offset: u16,
    /// The More Fragments flag (IPv4) / M bit (IPv6 fragment header, added if missing).
    pub more_fragments: bool,
    pub payload_len: usize,
}

impl Packet {
    pub fn new(src: IpAddr, dst: IpAddr, l4: L4) -> Self {
        assert_eq!(src.is_ipv4(), dst.is_ipv4(), "mixed address families");
        Self {
            src,
            dst,
            l4,
            vlan_tags: Vec::new(),
            ipv4_options: 0,
            ipv6_ext: Vec::new(),
            fragment_offset: 0,
            more_fragments: false,
            payload_len: 0,
        }
    }

    /// A TCP SYN; addresses are parsed from text for readable test vectors.
    pub fn tcp(src: &str, dst: &str, dport: u16) -> Self {
        Self::new(
            ip(src),
            ip(dst),
            L4::Tcp {
                sport: 40000,
                dport,
                flags: TCP_SYN,
            },
        )
    }

    pub fn udp(src: &str, dst: &str, dport: u16) -> Self {
        Self::new(
            ip(src),
            ip(dst),
            L4::Udp {
                sport: 40000,
                dport,
            },
        )
    }

    pub fn sctp(src: &str, dst: &str, dport: u16) -> Self {
        Self::new(
            ip(src),
            ip(dst),
            L4::Sctp {
                sport: 40000,
                dport,
            },
        )
    }

    pub fn echo(src: &str, dst: &str) -> Self {
        Self::new(ip(src), ip(dst), L4::Echo)
    }

    #[must_use]
    pub fn vlan(mut self, tpid: u16) -> Self {
        self.vlan_tags.push(tpid);
        self
    }

    #[must_use]
    pub fn ext(mut self, header: u8) -> Self {
        self.ipv6_ext.push(header);
        self
    }

    #[must_use]
    pub fn payload(mut self, len: usize) -> Self {
        self.payload_len = len;
        self
    }

    /// The Ethernet frame.
    pub fn frame(&self) -> Vec<u8> {
        let mut frame = Vec::with_capacity(128 + self.payload_len);
        // The test-run device's (lo's) address, so the kernel classes the frame PACKET_HOST as
        // it does a frame addressed to the receiving interface; senders on a real link put
        // that link's MAC here.
        frame.extend_from_slice(&[0; 6]); // dst MAC
        frame.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x01]); // src MAC
        for (i, tpid) in self.vlan_tags.iter().enumerate() {
            if i == 0 {
                frame.extend_from_slice(&tpid.to_be_bytes());
            }
            let next = self
                .vlan_tags
                .get(i + 1)
                .copied()
                .unwrap_or(self.ethertype());
            frame.extend_from_slice(&(100 + u16::try_from(i).expect("few tags")).to_be_bytes());
            frame.extend_from_slice(&next.to_be_bytes());
        }
        if self.vlan_tags.is_empty() {
            frame.extend_from_slice(&self.ethertype().to_be_bytes());
        }
        frame.extend_from_slice(&self.ip_packet());
        frame
    }

    fn ethertype(&self) -> u16 {
        if self.src.is_ipv4() { 0x0800 } else { 0x86dd }
    }

    /// The IP packet, without the Ethernet header.
    pub fn ip_packet(&self) -> Vec<u8> {
        match (self.src, self.dst) {
            (IpAddr::V4(src), IpAddr::V4(dst)) => self.ipv4(src.octets(), dst.octets()),
            (IpAddr::V6(src), IpAddr::V6(dst)) => self.ipv6(src.octets(), dst.octets()),
            _ => unreachable!("checked in new"),
        }
    }

    fn transport(&self, v6: bool, src: &[u8], dst: &[u8]) -> Vec<u8> {
        let payload = vec![0xab; self.payload_len];
        let mut segment = match self.l4 {
            L4::Tcp {
                sport,
                dport,
                flags,
            } => {
                let mut h = Vec::with_capacity(20);
                h.extend_from_slice(&sport.to_be_bytes());
                h.extend_from_slice(&dport.to_be_bytes());
                h.extend_from_slice(&1u32.to_be_bytes()); // seq
                h.extend_from_slice(&u32::from(flags & TCP_ACK != 0).to_be_bytes());
                h.extend_from_slice(&[5 << 4, flags, 0xff, 0xff, 0, 0, 0, 0]);
                h
            }
            L4::Udp { sport, dport } => {
                let len = u16::try_from(8 + payload.len()).expect("small payload");
                let mut h = Vec::with_capacity(8);
                h.extend_from_slice(&sport.to_be_bytes());
                h.extend_from_slice(&dport.to_be_bytes());
                h.extend_from_slice(&len.to_be_bytes());
                h.extend_from_slice(&[0, 0]);
                h
            }
            L4::Sctp { sport, dport } => {
                let mut h = Vec::with_capacity(12);
                h.extend_from_slice(&sport.to_be_bytes());
                h.extend_from_slice(&dport.to_be_bytes());
                h.extend_from_slice(&[0; 8]); // verification tag, checksum (CRC32c not needed)
                h
            }
            L4::Echo => vec![if v6 { 128 } else { 8 }, 0, 0, 0, 0, 1, 0, 1],
            L4::Other(_) => Vec::new(),
        };
        segment.extend_from_slice(&payload);
        let proto = self.l4.proto(v6);
        let checksum_at = match self.l4 {
            L4::Tcp { .. } => Some(16),
            L4::Udp { .. } => Some(6),
            L4::Echo => Some(2),
            _ => None,
        };
        if let Some(at) = checksum_at {
            let mut sum = 0u32;
            // ICMPv4 has no pseudo-header; TCP, UDP and ICMPv6 do.
            if v6 || proto != ipproto::ICMP {
                sum = pseudo_header_sum(src, dst, proto, segment.len());
            }
            let mut checksum = fold(sum + ones_sum(&segment));
            if checksum == 0 && proto == ipproto::UDP {
                checksum = 0xffff;
            }
            segment[at..at + 2].copy_from_slice(&checksum.to_be_bytes());
        }
        segment
    }

    fn ipv4(&self, src: [u8; 4], dst: [u8; 4]) -> Vec<u8> {
        let options = self.ipv4_options.div_ceil(4) * 4;
        assert!(options <= 40, "IPv4 options are at most 40 bytes");
        let body = if self.fragment_offset == 0 {
            self.transport(false, &src, &dst)
        } else {
            vec![0xcd; self.payload_len.max(8)]
        };
        let header_len = 20 + options;
        let total = u16::try_from(header_len + body.len()).expect("fits an IPv4 packet");
        let mut flags_fragment = self.fragment_offset & 0x1fff;
        if self.more_fragments {
            flags_fragment |= 0x2000;
        }
        let mut h = vec![
            0x40 | u8::try_from(header_len / 4).expect("small header"),
            0,
        ];
        h.extend_from_slice(&total.to_be_bytes());
        h.extend_from_slice(&0x1234u16.to_be_bytes());
        h.extend_from_slice(&flags_fragment.to_be_bytes());
        h.extend_from_slice(&[64, self.l4.proto(false), 0, 0]);
        h.extend_from_slice(&src);
        h.extend_from_slice(&dst);
        // NOP options then End of Options.
        h.extend(std::iter::repeat_n(1u8, options.saturating_sub(1)));
        if options > 0 {
            h.push(0);
        }
        let checksum = fold(ones_sum(&h));
        h[10..12].copy_from_slice(&checksum.to_be_bytes());
        h.extend_from_slice(&body);
        h
    }

    fn ipv6(&self, src: [u8; 16], dst: [u8; 16]) -> Vec<u8> {
        let mut ext_headers = self.ipv6_ext.clone();
        let fragmented = self.fragment_offset != 0 || self.more_fragments;
        if fragmented && !ext_headers.contains(&ext::FRAGMENT) {
            ext_headers.push(ext::FRAGMENT);
        }
        let upper = self.l4.proto(true);
        let body = if self.fragment_offset == 0 {
            self.transport(true, &src, &dst)
        } else {
            vec![0xcd; self.payload_len.max(8)]
        };
        let mut extensions = Vec::new();
        for (i, header) in ext_headers.iter().enumerate() {
            let next = ext_headers.get(i + 1).copied().unwrap_or(upper);
            match *header {
                ext::FRAGMENT => {
                    let mut offset_flags = self.fragment_offset << 3;
                    if self.more_fragments {
                        offset_flags |= 1;
                    }
                    extensions.extend_from_slice(&[next, 0]);
                    extensions.extend_from_slice(&offset_flags.to_be_bytes());
                    extensions.extend_from_slice(&0x1234_5678u32.to_be_bytes());
                }
                ext::AUTH => {
                    // 12 bytes: length field 1 means (1 + 2) * 4.
                    extensions.extend_from_slice(&[next, 1, 0, 0]);
                    extensions.extend_from_slice(&[0; 8]);
                }
                other => {
                    // 8 bytes with a PadN option (or an empty type-0 routing header).
                    let _ = other;
                    extensions.extend_from_slice(&[next, 0, 1, 4, 0, 0, 0, 0]);
                }
            }
        }
        let payload_len = u16::try_from(extensions.len() + body.len()).expect("fits");
        let first = ext_headers.first().copied().unwrap_or(upper);
        let mut h = vec![0x60, 0, 0, 0];
        h.extend_from_slice(&payload_len.to_be_bytes());
        h.extend_from_slice(&[first, 64]);
        h.extend_from_slice(&src);
        h.extend_from_slice(&dst);
        h.extend_from_slice(&extensions);
        h.extend_from_slice(&body);
        h
    }
}

pub fn ip(text: &str) -> IpAddr {
    text.parse()
        .unwrap_or_else(|e| panic!("bad address {text:?} in a test vector: {e}"))
}

fn pseudo_header_sum(src: &[u8], dst: &[u8], proto: u8, len: usize) -> u32 {
    let len = u32::try_from(len).expect("small segment");
    ones_sum(src) + ones_sum(dst) + u32::from(proto) + (len >> 16) + (len & 0xffff)
}

fn ones_sum(bytes: &[u8]) -> u32 {
    bytes
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum()
}

fn fold(mut sum: u32) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !u16::try_from(sum).expect("folded")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv4_header_checksum_verifies() {
        let packet = Packet::tcp("10.16.0.5", "10.96.0.1", 443).ip_packet();
        assert_eq!(fold(ones_sum(&packet[..20])), 0);
    }

    #[test]
    fn tcp_checksum_verifies_with_pseudo_header() {
        let p = Packet::tcp("10.16.0.5", "10.96.0.1", 443).payload(5);
        let ip = p.ip_packet();
        let segment = &ip[20..];
        let sum = pseudo_header_sum(&ip[12..16], &ip[16..20], 6, segment.len()) + ones_sum(segment);
        assert_eq!(fold(sum), 0);
    }

    #[test]
    fn vlan_tags_chain_ethertypes() {
        let f = Packet::udp("10.0.0.1", "10.0.0.2", 53)
            .vlan(TPID_8021AD)
            .vlan(TPID_8021Q)
            .frame();
        assert_eq!(&f[12..14], &[0x88, 0xa8]);
        assert_eq!(&f[16..18], &[0x81, 0x00]);
        assert_eq!(&f[20..22], &[0x08, 0x00]);
        assert_eq!(f[22] >> 4, 4);
    }

    #[test]
    fn ipv6_extension_headers_chain() {
        let f = Packet::tcp("fd00::12", "fd00::11", 30080)
            .ext(ext::HOP_BY_HOP)
            .ext(ext::DEST_OPTS)
            .frame();
        assert_eq!(f[14 + 6], ext::HOP_BY_HOP);
        assert_eq!(f[54], ext::DEST_OPTS);
        assert_eq!(f[62], ipproto::TCP);
        assert_eq!(u16::from_be_bytes([f[72], f[73]]), 30080);
    }
}
