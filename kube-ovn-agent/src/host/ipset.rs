//! What kube-proxy runs as on this node, read from the kernel. Kube-OVN asks `ipset list -n`
//! every pass whether kube-proxy's IPVS-mode sets exist; we ask the kernel the same question
//! over nfnetlink (`IPSET_CMD_HEADER`), and whether kube-proxy's nftables-mode tables exist
//! (`NFT_MSG_GETTABLE`), so the agent's image needs neither `ipset` nor `nft`.

use std::{fmt, io};

use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_NETFILTER};
use serde::Serialize;

use crate::translate::{FamilySets, KubeProxySets};

const NFNL_SUBSYS_IPSET: u16 = 6;
const IPSET_CMD_HEADER: u16 = 12;
/// The oldest protocol version the kernel's `ip_set_header` accepts.
const IPSET_PROTOCOL: u8 = 6;
const IPSET_ATTR_PROTOCOL: u16 = 1;
const IPSET_ATTR_SETNAME: u16 = 2;
const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFT_MSG_GETTABLE: u16 = 1;
const NFTA_TABLE_NAME: u16 = 1;
const NFPROTO_IPV4: u8 = 2;
const NFPROTO_IPV6: u8 = 10;
const NFNETLINK_V0: u8 = 0;
const NLMSG_ERROR: u16 = 2;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_ACK: u16 = 4;

/// kube-proxy's nftables-mode table, in the `ip` and `ip6` families
/// (<https://github.com/kubernetes/kubernetes/blob/v1.33.0/pkg/proxy/nftables/proxier.go#L63>).
pub const KUBE_PROXY_NFT_TABLE: &str = "kube-proxy";

/// Whether the set `name` exists in the current network namespace.
pub fn exists(name: &str) -> io::Result<bool> {
    let mut attrs = Vec::new();
    push_attr(&mut attrs, IPSET_ATTR_PROTOCOL, &[IPSET_PROTOCOL]);
    push_attr(&mut attrs, IPSET_ATTR_SETNAME, &nul_terminated(name));
    let family = u8::try_from(libc::AF_INET).expect("AF_INET fits a byte");
    ask(&request(
        (NFNL_SUBSYS_IPSET << 8) | IPSET_CMD_HEADER,
        family,
        &attrs,
        1,
    ))
}

/// Whether the nftables table `name` of the `ip` (IPv4) or `ip6` family exists in the current
/// network namespace. A kernel without `nf_tables` has none.
pub fn nft_table_exists(ipv6: bool, name: &str) -> io::Result<bool> {
    let mut attrs = Vec::new();
    push_attr(&mut attrs, NFTA_TABLE_NAME, &nul_terminated(name));
    let family = if ipv6 { NFPROTO_IPV6 } else { NFPROTO_IPV4 };
    match ask(&request(
        (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_GETTABLE,
        family,
        &attrs,
        1,
    )) {
        Err(e)
            if matches!(
                e.raw_os_error(),
                Some(libc::EOPNOTSUPP | libc::EAFNOSUPPORT | libc::EPROTONOSUPPORT)
            ) =>
        {
            Ok(false)
        }
        other => other,
    }
}

fn nul_terminated(name: &str) -> Vec<u8> {
    let mut bytes = name.as_bytes().to_vec();
    bytes.push(0);
    bytes
}

/// Sends one acknowledged nfnetlink request: true on success, false on `ENOENT`.
fn ask(message: &[u8]) -> io::Result<bool> {
    let mut socket = Socket::new(NETLINK_NETFILTER)?;
    socket.bind_auto()?;
    socket.connect(&SocketAddr::new(0, 0))?;
    socket.send(message, 0)?;
    let mut buffer = vec![0u8; 8192];
    loop {
        let len = socket.recv(&mut &mut buffer[..], 0)?;
        let mut offset = 0;
        while offset + 16 <= len {
            let msg_len =
                u32::from_ne_bytes(buffer[offset..offset + 4].try_into().expect("4 bytes"))
                    as usize;
            let msg_type =
                u16::from_ne_bytes(buffer[offset + 4..offset + 6].try_into().expect("2 bytes"));
            if msg_type == NLMSG_ERROR {
                let code = i32::from_ne_bytes(
                    buffer[offset + 16..offset + 20]
                        .try_into()
                        .expect("4 bytes"),
                );
                return match -code {
                    0 => Ok(true),
                    libc::ENOENT => Ok(false),
                    errno => Err(io::Error::from_raw_os_error(errno)),
                };
            }
            if msg_len < 16 {
                break;
            }
            offset += msg_len.next_multiple_of(4);
        }
    }
}

/// An nfnetlink request: netlink header, `struct nfgenmsg`, attributes.
fn request(msg_type: u16, family: u8, attrs: &[u8], seq: u32) -> Vec<u8> {
    let len = 16 + 4 + attrs.len();
    let mut msg = Vec::with_capacity(len);
    msg.extend_from_slice(&u32::try_from(len).expect("small message").to_ne_bytes());
    msg.extend_from_slice(&msg_type.to_ne_bytes());
    msg.extend_from_slice(&(NLM_F_REQUEST | NLM_F_ACK).to_ne_bytes());
    msg.extend_from_slice(&seq.to_ne_bytes());
    msg.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel fills it
    // struct nfgenmsg: family, version, res_id (big endian).
    msg.extend_from_slice(&[family, NFNETLINK_V0, 0, 0]);
    msg.extend_from_slice(attrs);
    msg
}

fn push_attr(buffer: &mut Vec<u8>, kind: u16, payload: &[u8]) {
    let len = 4 + payload.len();
    buffer.extend_from_slice(&u16::try_from(len).expect("small attribute").to_ne_bytes());
    buffer.extend_from_slice(&kind.to_ne_bytes());
    buffer.extend_from_slice(payload);
    buffer.resize(buffer.len().next_multiple_of(4), 0);
}

/// Which of kube-proxy's IPVS-mode sets exist, as Kube-OVN checks them (GL:737, 781).
pub fn detect_kube_proxy_sets() -> io::Result<KubeProxySets> {
    Ok(KubeProxySets {
        v4: FamilySets {
            cluster_ip: exists("KUBE-CLUSTER-IP")?,
            nodeport_local_tcp: exists("KUBE-NODE-PORT-LOCAL-TCP")?,
            nodeport_local_udp: exists("KUBE-NODE-PORT-LOCAL-UDP")?,
        },
        v6: FamilySets {
            cluster_ip: exists("KUBE-6-CLUSTER-IP")?,
            nodeport_local_tcp: exists("KUBE-6-NODE-PORT-LOCAL-TCP")?,
            nodeport_local_udp: exists("KUBE-6-NODE-PORT-LOCAL-UDP")?,
        },
    })
}

/// The kube-proxy mode a node's kernel state shows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum DetectedMode {
    /// Some of its IPVS-mode ipsets exist.
    Ipvs,
    /// No ipsets, but its `kube-proxy` nftables table (ip or ip6).
    Nftables,
    /// Neither: iptables mode, or no kube-proxy. Kube-OVN cannot tell these apart either.
    IptablesOrNone,
}

impl fmt::Display for DetectedMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Ipvs => "ipvs",
            Self::Nftables => "nftables",
            Self::IptablesOrNone => "iptables-or-none",
        })
    }
}

/// What `--kube-proxy-mode auto` found.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Detection {
    pub mode: DetectedMode,
    /// What the rules follow: Kube-OVN only looks at the ipsets, so nftables mode (no ipsets)
    /// gets R1b only, as iptables mode does.
    pub sets: KubeProxySets,
}

/// Detects kube-proxy's ipsets, and its nftables tables when there are none.
pub fn detect_kube_proxy() -> io::Result<Detection> {
    let sets = detect_kube_proxy_sets()?;
    let mode = if sets != KubeProxySets::default() {
        DetectedMode::Ipvs
    } else if nft_table_exists(false, KUBE_PROXY_NFT_TABLE)?
        || nft_table_exists(true, KUBE_PROXY_NFT_TABLE)?
    {
        DetectedMode::Nftables
    } else {
        DetectedMode::IptablesOrNone
    };
    Ok(Detection { mode, sets })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_is_a_well_formed_netlink_message() {
        let mut attrs = Vec::new();
        push_attr(&mut attrs, IPSET_ATTR_PROTOCOL, &[IPSET_PROTOCOL]);
        push_attr(
            &mut attrs,
            IPSET_ATTR_SETNAME,
            &nul_terminated("KUBE-CLUSTER-IP"),
        );
        let msg = request((6 << 8) | 0x0c, 2, &attrs, 7);
        assert_eq!(msg.len() % 4, 0);
        assert_eq!(
            u32::from_ne_bytes(msg[0..4].try_into().unwrap()) as usize,
            msg.len()
        );
        assert_eq!(
            u16::from_ne_bytes(msg[4..6].try_into().unwrap()),
            (6 << 8) | 0x0c
        );
        assert_eq!(u32::from_ne_bytes(msg[8..12].try_into().unwrap()), 7);
        // protocol attribute, then the NUL-terminated name.
        assert_eq!(&msg[20..25], &[5, 0, 1, 0, 6]);
        assert_eq!(&msg[28 + 4..28 + 4 + 16], b"KUBE-CLUSTER-IP\0");
    }
}
