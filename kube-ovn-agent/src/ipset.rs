//! Does an ipset exist? Kube-OVN asks `ipset list -n` every pass to learn whether kube-proxy runs
//! in IPVS mode; we ask the kernel the same question over nfnetlink (`IPSET_CMD_HEADER`), so
//! the agent's image needs no `ipset` binary.

use std::io;

use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_NETFILTER};

use crate::translate::{FamilySets, KubeProxySets};

const NFNL_SUBSYS_IPSET: u16 = 6;
const IPSET_CMD_HEADER: u16 = 12;
/// The oldest protocol version the kernel's `ip_set_header` accepts.
const IPSET_PROTOCOL: u8 = 6;
const IPSET_ATTR_PROTOCOL: u16 = 1;
const IPSET_ATTR_SETNAME: u16 = 2;
const NFNETLINK_V0: u8 = 0;
const NLMSG_ERROR: u16 = 2;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_ACK: u16 = 4;

/// Whether the set `name` exists in the current network namespace.
pub fn exists(name: &str) -> io::Result<bool> {
    let mut socket = Socket::new(NETLINK_NETFILTER)?;
    socket.bind_auto()?;
    socket.connect(&SocketAddr::new(0, 0))?;
    socket.send(&header_request(name, 1), 0)?;
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

fn header_request(name: &str, seq: u32) -> Vec<u8> {
    let mut attrs = Vec::new();
    push_attr(&mut attrs, IPSET_ATTR_PROTOCOL, &[IPSET_PROTOCOL]);
    let mut set_name = name.as_bytes().to_vec();
    set_name.push(0);
    push_attr(&mut attrs, IPSET_ATTR_SETNAME, &set_name);

    let len = 16 + 4 + attrs.len();
    let mut msg = Vec::with_capacity(len);
    msg.extend_from_slice(&u32::try_from(len).expect("small message").to_ne_bytes());
    msg.extend_from_slice(&((NFNL_SUBSYS_IPSET << 8) | IPSET_CMD_HEADER).to_ne_bytes());
    msg.extend_from_slice(&(NLM_F_REQUEST | NLM_F_ACK).to_ne_bytes());
    msg.extend_from_slice(&seq.to_ne_bytes());
    msg.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel fills it
    // struct nfgenmsg: family, version, res_id (big endian).
    let family = u8::try_from(libc::AF_INET).expect("AF_INET fits a byte");
    msg.extend_from_slice(&[family, NFNETLINK_V0, 0, 0]);
    msg.extend_from_slice(&attrs);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_is_a_well_formed_netlink_message() {
        let msg = header_request("KUBE-CLUSTER-IP", 7);
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
