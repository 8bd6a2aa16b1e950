//! Go's and kube-proxy's address and CIDR parsers, as the Kube-OVN and kube-proxy code we
//! mirror parse them.

use super::{IpAddr, IpNet, Ipv4Addr, Ipv6Addr};

/// Go's `net.ParseCIDR` (Go ≥ 1.22): an address `netip.ParseAddr` accepts (no zone, no leading
/// zeros) and a decimal prefix length (leading zeros allowed, no sign) within its bits. Host bits
/// are cleared, as ipset's hash:net does.
pub(super) fn go_parse_cidr(text: &str) -> Option<IpNet> {
    let (addr, prefix) = text.split_once('/')?;
    let addr: IpAddr = addr.parse().ok()?;
    if prefix.is_empty() || prefix.len() > 8 || !prefix.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let prefix: u8 = prefix.parse::<u32>().ok()?.try_into().ok()?;
    IpNet::new(addr, prefix).ok().map(|n| n.trunc())
}

/// Kube-OVN's `util.CheckProtocol` for one address or CIDR: the part before any `/` parsed with
/// Go's `net.ParseIP`; an IPv4-mapped IPv6 address counts as IPv4 (`To4() != nil`).
/// (<https://github.com/kubeovn/kube-ovn/blob/v1.16.2/pkg/util/net.go#L189>)
pub(super) fn go_address_family(text: &str) -> Option<IpAddr> {
    let ip: IpAddr = text.split('/').next()?.parse().ok()?;
    Some(match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        IpAddr::V4(_) => ip,
    })
}

/// k8s.io/utils' `ParseIPSloppy`, which kube-proxy parses ClusterIPs with
/// (<https://github.com/kubernetes/kubernetes/blob/v1.33.0/pkg/proxy/serviceport.go#L186>): Go's
/// `net.ParseIP` from before Go 1.17, so IPv4 parts may have leading zeros and are still read as
/// decimal (`010.096.000.010` is 10.96.0.10), kept for objects stored by old API servers.
pub(super) fn parse_ip_sloppy(text: &str) -> Option<IpAddr> {
    fn v4(text: &str) -> Option<Ipv4Addr> {
        let mut octets = [0u8; 4];
        let mut parts = text.split('.');
        for octet in &mut octets {
            let part = parts.next()?;
            // Go's dtoi: at least one digit, all digits; the value must fit a byte.
            if part.is_empty() || !part.bytes().all(|b| b.is_ascii_digit()) {
                return None;
            }
            let value = part.trim_start_matches('0');
            *octet = if value.is_empty() {
                0
            } else {
                value.parse().ok()?
            };
        }
        parts.next().is_none().then(|| Ipv4Addr::from(octets))
    }
    // As Go: the first '.' or ':' decides the family.
    match text.find(['.', ':']).map(|i| &text[i..=i]) {
        Some(".") => v4(text).map(IpAddr::V4),
        Some(":") => {
            if let Ok(ip) = text.parse::<Ipv6Addr>() {
                return Some(IpAddr::V6(ip));
            }
            // An embedded IPv4 tail is parsed sloppily too.
            let (head, tail) = text.rsplit_once(':')?;
            let tail = v4(tail)?;
            format!("{head}:{tail}").parse().ok().map(IpAddr::V6)
        }
        _ => None,
    }
}
