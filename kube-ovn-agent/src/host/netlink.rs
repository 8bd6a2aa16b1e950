//! Facts about this node from the kernel, over rtnetlink: interfaces, their addresses, and the
//! local routing table (`addrtype LOCAL`). [`watch`] re-reads them on every link, address or
//! route event.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    time::Duration,
};

use futures::{StreamExt, TryStreamExt};
use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use kube_ovn_ebpf_common::{iface_flag, role};
use netlink_packet_route::{
    address::AddressAttribute,
    link::{InfoKind, LinkAttribute, LinkFlags, LinkInfo, LinkLayerType},
    route::{RouteAddress, RouteAttribute, RouteType},
};
use rtnetlink::{Handle, MulticastGroup, RouteMessageBuilder};
use serde::Serialize;
use tokio::sync::watch;

/// `RT_TABLE_LOCAL`.
const LOCAL_TABLE: u32 = 255;

#[derive(Debug, thiserror::Error)]
pub enum NetlinkError {
    #[error("opening an rtnetlink socket: {0}")]
    Socket(#[source] std::io::Error),
    #[error("dumping {what} over rtnetlink: {source}")]
    Dump {
        what: &'static str,
        #[source]
        source: rtnetlink::Error,
    },
}

/// One network interface.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Link {
    pub index: u32,
    pub name: String,
    /// `IFLA_INFO_KIND` (`veth`, `openvswitch`, `bridge`, …), empty for physical devices.
    pub kind: String,
    pub addrs: Vec<IpNet>,
    /// `IFF_UP`.
    pub up: bool,
    /// `IFLA_MASTER`: the bond, bridge, OVS datapath or VRF this link is enslaved to.
    pub master: Option<u32>,
    /// Whether packets carry an Ethernet header at TC ingress (`ARPHRD_ETHER`, and `lo`, which
    /// frames its packets as Ethernet). Tunnels, `wg0`, tun and other non-Ethernet links
    /// do not.
    pub ethernet: bool,
}

/// Interfaces and the local routing table.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeNet {
    pub links: BTreeMap<u32, Link>,
    pub local_v4: BTreeSet<Ipv4Net>,
    pub local_v6: BTreeSet<Ipv6Net>,
}

impl NodeNet {
    pub fn link_by_name(&self, name: &str) -> Option<&Link> {
        self.links.values().find(|l| l.name == name)
    }
}

/// Reads everything once.
#[expect(
    clippy::too_many_lines,
    reason = "three sequential dumps, each a short loop"
)]
pub async fn read(handle: &Handle) -> Result<NodeNet, NetlinkError> {
    let mut net = NodeNet::default();
    let mut links = handle.link().get().execute();
    while let Some(message) = links
        .try_next()
        .await
        .map_err(|source| NetlinkError::Dump {
            what: "links",
            source,
        })?
    {
        let mut link = Link {
            index: message.header.index,
            name: String::new(),
            kind: String::new(),
            addrs: Vec::new(),
            up: message.header.flags.contains(LinkFlags::Up),
            master: None,
            ethernet: matches!(
                message.header.link_layer_type,
                LinkLayerType::Ether | LinkLayerType::Loopback
            ),
        };
        for attribute in message.attributes {
            match attribute {
                LinkAttribute::IfName(name) => link.name = name,
                LinkAttribute::Controller(index) if index != 0 => link.master = Some(index),
                LinkAttribute::LinkInfo(infos) => {
                    for info in infos {
                        if let LinkInfo::Kind(kind) = info {
                            link.kind = info_kind_name(&kind);
                        }
                    }
                }
                _ => {}
            }
        }
        net.links.insert(link.index, link);
    }

    let mut addresses = handle.address().get().execute();
    while let Some(message) = addresses
        .try_next()
        .await
        .map_err(|source| NetlinkError::Dump {
            what: "addresses",
            source,
        })?
    {
        let prefix = message.header.prefix_len;
        let address = message.attributes.iter().find_map(|a| match a {
            // For point-to-point links IFA_LOCAL is the local end; IFA_ADDRESS the peer.
            AddressAttribute::Local(ip) => Some(*ip),
            _ => None,
        });
        let address = address.or_else(|| {
            message.attributes.iter().find_map(|a| match a {
                AddressAttribute::Address(ip) => Some(*ip),
                _ => None,
            })
        });
        if let (Some(ip), Some(link)) = (address, net.links.get_mut(&message.header.index))
            && let Ok(net) = IpNet::new(ip, prefix)
        {
            link.addrs.push(net);
        }
    }

    for ipv6 in [false, true] {
        let request = if ipv6 {
            RouteMessageBuilder::<std::net::Ipv6Addr>::new()
                .table_id(LOCAL_TABLE)
                .build()
        } else {
            RouteMessageBuilder::<std::net::Ipv4Addr>::new()
                .table_id(LOCAL_TABLE)
                .build()
        };
        let mut routes = handle.route().get(request).execute();
        while let Some(route) = routes
            .try_next()
            .await
            .map_err(|source| NetlinkError::Dump {
                what: "routes",
                source,
            })?
        {
            let table = route
                .attributes
                .iter()
                .find_map(|a| match a {
                    RouteAttribute::Table(t) => Some(*t),
                    _ => None,
                })
                .unwrap_or(u32::from(route.header.table));
            // addrtype LOCAL is exactly RTN_LOCAL (broadcast and anycast entries are not).
            if table != LOCAL_TABLE || route.header.kind != RouteType::Local {
                continue;
            }
            let len = route.header.destination_prefix_length;
            for attribute in &route.attributes {
                match attribute {
                    RouteAttribute::Destination(RouteAddress::Inet(a)) => {
                        if let Ok(n) = Ipv4Net::new(*a, len) {
                            net.local_v4.insert(n.trunc());
                        }
                    }
                    RouteAttribute::Destination(RouteAddress::Inet6(a)) => {
                        if let Ok(n) = Ipv6Net::new(*a, len) {
                            net.local_v6.insert(n.trunc());
                        }
                    }
                    _ => {}
                }
            }
        }
    }
    Ok(net)
}

fn info_kind_name(kind: &InfoKind) -> String {
    match kind {
        InfoKind::Other(name) => name.clone(),
        known => format!("{known:?}").to_lowercase(),
    }
}

/// An rtnetlink handle whose connection task runs on the current tokio runtime.
pub fn connect() -> std::io::Result<Handle> {
    let (connection, handle, _) = rtnetlink::new_connection()?;
    tokio::spawn(connection);
    Ok(handle)
}

/// A task that keeps the latest [`NodeNet`] in a watch channel, re-reading after every burst of
/// link/address/route events (and every `resync` in case an event was lost).
pub fn watch(resync: Duration) -> Result<watch::Receiver<Option<NodeNet>>, NetlinkError> {
    let groups = [
        MulticastGroup::Link,
        MulticastGroup::Ipv4Ifaddr,
        MulticastGroup::Ipv6Ifaddr,
        MulticastGroup::Ipv4Route,
        MulticastGroup::Ipv6Route,
    ];
    let (events_conn, _events_handle, mut events) =
        rtnetlink::new_multicast_connection(&groups).map_err(NetlinkError::Socket)?;
    let handle = connect().map_err(NetlinkError::Socket)?;
    tokio::spawn(events_conn);
    let (tx, rx) = watch::channel(None);
    tokio::spawn(async move {
        loop {
            match read(&handle).await {
                Ok(net) => {
                    tx.send_if_modified(|current| {
                        let changed = current.as_ref() != Some(&net);
                        *current = Some(net);
                        changed
                    });
                }
                Err(e) => {
                    tracing::warn!(error = %e, "reading interfaces and local routes failed; keeping the last view");
                }
            }
            // Wait for an event (or the resync period), then let the burst settle.
            if tokio::time::timeout(resync, events.next()).await == Ok(None) {
                tracing::error!("rtnetlink event stream ended; falling back to periodic reads");
                tokio::time::sleep(resync).await;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
            while let Ok(Some(_)) = tokio::time::timeout(Duration::ZERO, events.next()).await {}
            if tx.is_closed() {
                break;
            }
        }
    });
    Ok(rx)
}

/// `--iface PATTERN=ROLE`: `ovn0`, `nic`, `bridge`, `lo`, or `none` to exclude. `PATTERN` is an
/// interface name in which `*` matches any run of characters (`cali*`, `eth*`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IfaceOverride {
    pub name: String,
    pub roles: u32,
}

impl IfaceOverride {
    pub fn matches(&self, ifname: &str) -> bool {
        glob_match(&self.name, ifname)
    }
}

/// `*` matches any run of characters (also none); everything else matches itself.
fn glob_match(pattern: &str, name: &str) -> bool {
    let Some((head, rest)) = pattern.split_once('*') else {
        return pattern == name;
    };
    let Some(mut remaining) = name.strip_prefix(head) else {
        return false;
    };
    let mut parts = rest.split('*').peekable();
    while let Some(part) = parts.next() {
        if parts.peek().is_none() {
            // The last part must end the name (an empty one matches whatever is left).
            return remaining.ends_with(part);
        }
        match remaining.find(part) {
            Some(at) => remaining = &remaining[at + part.len()..],
            None => return false,
        }
    }
    true
}

impl std::str::FromStr for IfaceOverride {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, String> {
        let (name, role_name) = text
            .split_once('=')
            .ok_or_else(|| format!("expected NAME=ROLE, got {text:?}"))?;
        if name.is_empty() || name.len() > 15 {
            return Err(format!(
                "interface name {name:?} must have 1 to 15 characters"
            ));
        }
        let roles = if role_name == "none" {
            0
        } else {
            role::NAMES
                .iter()
                .find(|(_, n)| *n == role_name)
                .map(|(bit, _)| *bit)
                .ok_or_else(|| {
                    format!("unknown role {role_name:?} (expected ovn0, nic, bridge, lo or none)")
                })?
        };
        Ok(Self {
            name: name.into(),
            roles,
        })
    }
}

/// Kube-OVN's node interface (`util.NodeNic`).
pub const OVN0: &str = "ovn0";

/// Which interfaces get the program, with which roles (and [`iface_flag`]s).
///
/// Kube-OVN's R2/R3 have no `-i`: they see NodePort traffic on whatever interface it arrives,
/// so every interface the host stack receives on gets the NodePort role:
/// - `ovn0` gets R1 too;
/// - a `br-*` OVS bridge holding a node InternalIP is the underlay provider bridge;
/// - every other link that is up or holds an address (link-local ones do not count): NICs
///   with or without the InternalIP, VLAN devices, bonds, bridges (`cni0`), tunnels
///   (`flannel.1`, `wg0`, `ipip`), dummies;
/// - `lo` only when it holds an address outside 127.0.0.0/8 and `::1` (a BGP-announced node
///   address), and for the TPROXY replacement.
///
/// Left out: a link enslaved to a bond, bridge or OVS datapath (the host stack receives its
/// packets on the master; an OVS *internal* port such as `ovn0` or `br-*` is a host interface
/// and stays in), and a veth without addresses — the host end of a pod's veth pair. Kube-OVN's
/// are OVS ports; a routed CNI's (Calico's `cali*`) do hand pod traffic to the host, and are
/// left to `overrides`, as one attachment per pod is a cost to opt into. `overrides` then add,
/// change or (`none`) remove entries, in order, by name pattern.
pub fn iface_roles(
    net: &NodeNet,
    node_ips: &[IpAddr],
    overrides: &[IfaceOverride],
    tproxy: bool,
) -> BTreeMap<String, (u32, u32)> {
    let mut roles: BTreeMap<String, (u32, u32)> = BTreeMap::new();
    for link in net.links.values() {
        let role = discovered_role(net, link, node_ips, tproxy);
        if role != 0 {
            roles.insert(link.name.clone(), (link.index, role));
        }
    }
    for o in overrides {
        for link in net.links.values().filter(|l| o.matches(&l.name)) {
            if o.roles == 0 {
                roles.remove(&link.name);
            } else {
                roles.insert(link.name.clone(), (link.index, o.roles));
            }
        }
    }
    for (name, (_, bits)) in &mut roles {
        if net.link_by_name(name).is_some_and(|l| !l.ethernet) {
            *bits |= iface_flag::NO_ETHERNET;
        }
    }
    roles
}

fn discovered_role(net: &NodeNet, link: &Link, node_ips: &[IpAddr], tproxy: bool) -> u32 {
    let holds_node_ip = link.addrs.iter().any(|a| node_ips.contains(&a.addr()));
    if link.name == OVN0 {
        return role::OVN0;
    }
    if link.name == "lo" {
        let node_address = link.addrs.iter().any(|a| !a.addr().is_loopback());
        return if tproxy { role::LOOPBACK } else { 0 }
            | if node_address { role::NODE_NIC } else { 0 };
    }
    let enslaved = link.master.is_some_and(|master| {
        let master_kind = net.links.get(&master).map_or("", |m| m.kind.as_str());
        // A VRF's members are still where the host stack receives; an OVS internal port is a
        // host interface although the OVS datapath is its master.
        master_kind != "vrf" && link.kind != "openvswitch"
    });
    // IPv6 gives every link that comes up a link-local address; it says nothing about the
    // link's use.
    let addressed = link.addrs.iter().any(|a| match a.addr() {
        IpAddr::V4(ip) => !ip.is_link_local(),
        IpAddr::V6(ip) => !ip.is_unicast_link_local(),
    });
    if enslaved || (link.kind == "veth" && !addressed) || (!link.up && !addressed) {
        return 0;
    }
    if holds_node_ip && link.name.starts_with("br-") && link.kind == "openvswitch" {
        role::PROVIDER_BRIDGE
    } else {
        role::NODE_NIC
    }
}

/// What the agent knows about the transparent probe listener of each family: whether the
/// socket the kernel would pick for `--on-ip`:`--on-port` lacks `IP_TRANSPARENT`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TproxyListeners {
    pub v4_opaque: bool,
    pub v6_opaque: bool,
}

/// One listening TCP socket as `sock_diag` reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Listener {
    pub addr: IpAddr,
    pub port: u16,
    /// `IPV6_V6ONLY` (false for IPv4 sockets).
    pub v6only: bool,
    /// `IP_TRANSPARENT` / `IPV6_TRANSPARENT` (one bit in the kernel); `None` when the kernel
    /// does not report socket options (`INET_DIAG_SOCKOPT`, Linux 5.10).
    pub transparent: Option<bool>,
}

impl TproxyListeners {
    /// Decides from the node's listeners on `port`, the way the kernel's listener lookup
    /// (which both `bpf_sk_lookup_tcp` and Kube-OVN's TPROXY target use) picks among them: a
    /// socket bound to the address itself wins over a wildcard one, and an IPv4 lookup also
    /// finds dual-stack (`V6ONLY` off) IPv6 sockets on `::` or the v4-mapped address. A family
    /// is opaque when any socket of the winning group lacks `IP_TRANSPARENT` (which of a
    /// group the kernel picks is not knowable here, so one is enough). A socket whose option
    /// the kernel does not report counts as transparent: not knowing must not stop probes.
    pub fn decide(
        listeners: &[Listener],
        port: u16,
        v4: Option<std::net::Ipv4Addr>,
        v6: Option<std::net::Ipv6Addr>,
    ) -> Self {
        let opaque = |exact: &dyn Fn(&Listener) -> bool, wildcard: &dyn Fn(&Listener) -> bool| {
            let on_port = || listeners.iter().filter(|l| l.port == port);
            let group: Vec<&Listener> = if on_port().any(exact) {
                on_port().filter(|l| exact(l)).collect()
            } else {
                on_port().filter(|l| wildcard(l)).collect()
            };
            group.iter().any(|l| l.transparent == Some(false))
        };
        let v4_opaque = v4.is_some_and(|ip| {
            opaque(
                &|l| match l.addr {
                    IpAddr::V4(a) => a == ip,
                    IpAddr::V6(a) => !l.v6only && a.to_ipv4_mapped() == Some(ip),
                },
                &|l| match l.addr {
                    IpAddr::V4(a) => a.is_unspecified(),
                    IpAddr::V6(a) => !l.v6only && a.is_unspecified(),
                },
            )
        });
        let v6_opaque = v6.is_some_and(|ip| {
            opaque(
                &|l| l.addr == IpAddr::V6(ip),
                &|l| matches!(l.addr, IpAddr::V6(a) if a.is_unspecified()),
            )
        });
        Self {
            v4_opaque,
            v6_opaque,
        }
    }
}

/// Every listening TCP socket of this network namespace, from `NETLINK_SOCK_DIAG`
/// (`INET_DIAG_SOCKOPT`, Linux ≥ 5.10, carries the transparent bit).
pub fn tcp_listeners() -> std::io::Result<Vec<Listener>> {
    let mut found = Vec::new();
    for family in [libc::AF_INET, libc::AF_INET6] {
        found.extend(sock_diag::dump_listeners(family)?);
    }
    Ok(found)
}

mod sock_diag {
    //! Just enough of `<linux/inet_diag.h>` to list TCP listeners with their socket options.

    use std::{
        io,
        net::{IpAddr, Ipv4Addr, Ipv6Addr},
        os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    };

    use super::Listener;

    const NETLINK_SOCK_DIAG: libc::c_int = 4;
    const SOCK_DIAG_BY_FAMILY: u16 = 20;
    const NLMSG_ERROR: u16 = 2;
    const NLMSG_DONE: u16 = 3;
    const TCP_LISTEN: u32 = 10;
    const INET_DIAG_SKV6ONLY: u16 = 11;
    const INET_DIAG_SOCKOPT: u16 = 22;
    /// `struct inet_diag_sockopt`'s first byte: `recverr`, `is_icsk`, `freebind`, `hdrincl`, `mc_loop`,
    /// transparent, … as bit-fields from the least significant bit.
    const SOCKOPT_TRANSPARENT: u8 = 1 << 5;
    const NLMSG_HDRLEN: usize = 16;
    /// `struct inet_diag_msg`.
    const DIAG_MSG_LEN: usize = 72;

    pub fn dump_listeners(family: libc::c_int) -> io::Result<Vec<Listener>> {
        // SAFETY: a plain socket call; the fd is owned below.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
                NETLINK_SOCK_DIAG,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd was just returned by socket() and is owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // nlmsghdr + inet_diag_req_v2 { family, protocol, ext, pad, states, inet_diag_sockid }.
        let mut request = [0u8; NLMSG_HDRLEN + 56];
        let len = u32::try_from(request.len()).expect("small");
        request[0..4].copy_from_slice(&len.to_ne_bytes());
        request[4..6].copy_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
        let flags = u16::try_from(libc::NLM_F_REQUEST | libc::NLM_F_DUMP).expect("fits");
        request[6..8].copy_from_slice(&flags.to_ne_bytes());
        request[16] = u8::try_from(family).expect("AF_INET or AF_INET6");
        request[17] = u8::try_from(libc::IPPROTO_TCP).expect("fits");
        request[20..24].copy_from_slice(&(1u32 << TCP_LISTEN).to_ne_bytes());
        // SAFETY: sending an initialised buffer on our socket (the kernel is the default peer).
        let sent = unsafe { libc::send(fd.as_raw_fd(), request.as_ptr().cast(), request.len(), 0) };
        if sent < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut listeners = Vec::new();
        let mut buffer = vec![0u8; 64 * 1024];
        // Bounded: a dump ends with NLMSG_DONE; a namespace with this many receives of
        // listeners is not one this check can help anyway.
        for _ in 0..10_000 {
            // SAFETY: receiving into our own buffer of the given length.
            let n =
                unsafe { libc::recv(fd.as_raw_fd(), buffer.as_mut_ptr().cast(), buffer.len(), 0) };
            let n = usize::try_from(n).map_err(|_| io::Error::last_os_error())?;
            let mut messages = &buffer[..n];
            while messages.len() >= NLMSG_HDRLEN {
                let len = read_u32(messages, 0) as usize;
                let kind = u16::from_ne_bytes([messages[4], messages[5]]);
                if len < NLMSG_HDRLEN || len > messages.len() {
                    return Err(io::Error::other("truncated sock_diag message"));
                }
                match kind {
                    NLMSG_DONE => return Ok(listeners),
                    NLMSG_ERROR => {
                        let errno =
                            i32::from_ne_bytes(messages[16..20].try_into().expect("4 bytes"));
                        return Err(io::Error::from_raw_os_error(-errno));
                    }
                    SOCK_DIAG_BY_FAMILY => {
                        if let Some(l) = parse(&messages[NLMSG_HDRLEN..len]) {
                            listeners.push(l);
                        }
                    }
                    _ => {}
                }
                messages = &messages[len.next_multiple_of(4).min(messages.len())..];
            }
        }
        Err(io::Error::other("sock_diag dump did not end"))
    }

    fn read_u32(bytes: &[u8], at: usize) -> u32 {
        u32::from_ne_bytes(bytes[at..at + 4].try_into().expect("4 bytes"))
    }

    /// One `inet_diag_msg` and its attributes.
    fn parse(message: &[u8]) -> Option<Listener> {
        if message.len() < DIAG_MSG_LEN {
            return None;
        }
        let family = libc::c_int::from(message[0]);
        let port = u16::from_be_bytes([message[4], message[5]]);
        let src: [u8; 16] = message[8..24].try_into().ok()?;
        let addr = if family == libc::AF_INET {
            IpAddr::V4(Ipv4Addr::new(src[0], src[1], src[2], src[3]))
        } else {
            IpAddr::V6(Ipv6Addr::from(src))
        };
        let mut listener = Listener {
            addr,
            port,
            v6only: false,
            transparent: None,
        };
        let mut attributes = &message[DIAG_MSG_LEN..];
        while attributes.len() >= 4 {
            let len = usize::from(u16::from_ne_bytes([attributes[0], attributes[1]]));
            let kind = u16::from_ne_bytes([attributes[2], attributes[3]]);
            if len < 4 || len > attributes.len() {
                break;
            }
            let payload = &attributes[4..len];
            match kind {
                INET_DIAG_SKV6ONLY => listener.v6only = payload.first() == Some(&1),
                INET_DIAG_SOCKOPT => {
                    listener.transparent = payload.first().map(|b| b & SOCKOPT_TRANSPARENT != 0);
                }
                _ => {}
            }
            attributes = &attributes[len.next_multiple_of(4).min(attributes.len())..];
        }
        Some(listener)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn link(index: u32, name: &str, kind: &str, addrs: &[&str]) -> Link {
        Link {
            index,
            name: name.into(),
            kind: kind.into(),
            addrs: addrs.iter().map(|a| a.parse().unwrap()).collect(),
            up: true,
            master: None,
            ethernet: true,
        }
    }

    /// A Kube-OVN node with Canal-style extras: the InternalIP NIC, a public NIC, a bond with
    /// a slave, a VLAN device over a NIC without addresses, an underlay provider bridge whose
    /// NIC is an OVS port, pods' veths (Kube-OVN's on OVS, Calico's routed), flannel, cni0 with
    /// a port, `wg0`, a down NIC and `kube-ipvs0`.
    fn net() -> NodeNet {
        let mut links = vec![
            link(1, "lo", "", &["127.0.0.1/8", "::1/128"]),
            link(2, "eth0", "", &["192.168.0.11/24", "fd00::11/64"]),
            link(3, "eth1", "", &["203.0.113.5/24"]),
            link(4, "ovn0", "openvswitch", &["100.64.0.2/16"]),
            link(5, "br-ext", "openvswitch", &["192.168.1.11/24"]),
            link(6, "br-1234abcd", "bridge", &["192.168.1.11/24"]),
            link(7, "veth1", "veth", &[]),
            link(8, "ovs-system", "openvswitch", &[]),
            link(9, "eth2", "", &[]),
            link(10, "eth2.100", "vlan", &[]),
            link(11, "bond0", "bond", &["10.0.0.5/24"]),
            link(12, "eth3", "", &[]),
            link(13, "eth4", "", &[]),
            link(14, "3f2a_h", "veth", &["fe80::1/64"]),
            link(15, "cali1234", "veth", &["fe80::ecee:eeff:feee:eeee/64"]),
            link(16, "flannel.1", "vxlan", &["10.42.0.0/32"]),
            link(17, "cni0", "bridge", &["10.42.0.1/24"]),
            link(18, "vethcni", "veth", &[]),
            link(19, "wg0", "wireguard", &["10.99.0.1/24"]),
            link(20, "eth5", "", &["169.254.3.3/16"]),
            link(21, "kube-ipvs0", "dummy", &["10.96.0.1/32"]),
        ];
        let set = |links: &mut Vec<Link>, index: u32, f: &dyn Fn(&mut Link)| {
            f(links.iter_mut().find(|l| l.index == index).unwrap());
        };
        // OVS: internal ports (ovn0, br-ext) and other ports (eth4, Kube-OVN's pod veth).
        for index in [4, 5, 13, 14] {
            set(&mut links, index, &|l| l.master = Some(8));
        }
        set(&mut links, 8, &|l| l.up = false);
        set(&mut links, 12, &|l| l.master = Some(11));
        set(&mut links, 18, &|l| l.master = Some(17));
        set(&mut links, 19, &|l| l.ethernet = false);
        set(&mut links, 20, &|l| l.up = false);
        set(&mut links, 21, &|l| l.up = false);
        NodeNet {
            links: links.into_iter().map(|l| (l.index, l)).collect(),
            ..NodeNet::default()
        }
    }

    fn ips() -> Vec<IpAddr> {
        ["192.168.0.11", "192.168.1.11"]
            .map(|a| a.parse().unwrap())
            .into()
    }

    #[test]
    fn nodeport_roles_go_wherever_the_host_stack_receives() {
        let roles = iface_roles(&net(), &ips(), &[], false);
        let nic = role::NODE_NIC;
        assert_eq!(
            roles,
            BTreeMap::from([
                ("bond0".into(), (11, nic)),
                ("br-1234abcd".into(), (6, nic)),
                ("br-ext".into(), (5, role::PROVIDER_BRIDGE)),
                ("cni0".into(), (17, nic)),
                ("eth0".into(), (2, nic)),
                ("eth1".into(), (3, nic)),
                ("eth2".into(), (9, nic)),
                ("eth2.100".into(), (10, nic)),
                ("flannel.1".into(), (16, nic)),
                ("kube-ipvs0".into(), (21, nic)),
                ("ovn0".into(), (4, role::OVN0)),
                ("wg0".into(), (19, nic | iface_flag::NO_ETHERNET)),
            ])
        );
        let with_lo = iface_roles(&net(), &ips(), &[], true);
        assert_eq!(with_lo.get("lo"), Some(&(1, role::LOOPBACK)));
    }

    #[test]
    fn lo_gets_the_nodeport_role_only_with_a_node_address() {
        let mut net = net();
        net.links
            .get_mut(&1)
            .unwrap()
            .addrs
            .push("10.255.0.11/32".parse().unwrap());
        let roles = iface_roles(&net, &ips(), &[], false);
        assert_eq!(roles.get("lo"), Some(&(1, role::NODE_NIC)));
        let roles = iface_roles(&net, &ips(), &[], true);
        assert_eq!(roles.get("lo"), Some(&(1, role::NODE_NIC | role::LOOPBACK)));
    }

    #[test]
    fn overrides_add_change_and_remove_by_pattern() {
        let overrides: Vec<IfaceOverride> = [
            "cali*=nic",
            "eth*=none",
            "eth1=nic",
            "ovn0=bridge",
            "missing=nic",
            "*ipvs*=none",
        ]
        .iter()
        .map(|s| s.parse().unwrap())
        .collect();
        let roles = iface_roles(&net(), &ips(), &overrides, false);
        let names: Vec<&str> = roles.keys().map(String::as_str).collect();
        assert_eq!(
            names,
            [
                "bond0",
                "br-1234abcd",
                "br-ext",
                "cali1234",
                "cni0",
                "eth1",
                "flannel.1",
                "ovn0",
                "wg0"
            ]
        );
        assert_eq!(roles["ovn0"], (4, role::PROVIDER_BRIDGE));
        assert_eq!(roles["cali1234"], (15, role::NODE_NIC));
    }

    #[test]
    fn patterns_match_like_shell_globs() {
        for (pattern, name, matches) in [
            ("eth0", "eth0", true),
            ("eth0", "eth01", false),
            ("eth*", "eth", true),
            ("eth*", "eth2.100", true),
            ("*", "anything", true),
            ("*.100", "eth2.100", true),
            ("*.100", "eth2.1000", false),
            ("e*h*0", "eth0", true),
            ("e*h*0", "eth1", false),
            ("cali*", "calx1", false),
        ] {
            let o = IfaceOverride {
                name: pattern.into(),
                roles: role::NODE_NIC,
            };
            assert_eq!(o.matches(name), matches, "{pattern} vs {name}");
        }
    }

    fn listener(addr: &str, v6only: bool, transparent: bool) -> Listener {
        Listener {
            addr: addr.parse().unwrap(),
            port: 8102,
            v6only,
            transparent: Some(transparent),
        }
    }

    #[test]
    fn the_listener_the_kernel_would_pick_decides_each_family() {
        let v4 = Some("192.168.0.11".parse().unwrap());
        let v6 = Some("fd00::11".parse().unwrap());
        let decide = |ls: &[Listener]| TproxyListeners::decide(ls, 8102, v4, v6);
        let both = |o: bool| TproxyListeners {
            v4_opaque: o,
            v6_opaque: o,
        };
        // Kube-OVN's default: one dual-stack [::] socket serves both families.
        assert_eq!(decide(&[listener("::", false, true)]), both(false));
        assert_eq!(decide(&[listener("::", false, false)]), both(true));
        // A V6ONLY socket leaves IPv4 alone.
        assert_eq!(
            decide(&[
                listener("::", true, false),
                listener("0.0.0.0", false, true)
            ]),
            TproxyListeners {
                v4_opaque: false,
                v6_opaque: true
            }
        );
        // An address-bound socket wins over the wildcard one.
        assert_eq!(
            decide(&[
                listener("192.168.0.11", false, false),
                listener("0.0.0.0", false, true)
            ]),
            TproxyListeners {
                v4_opaque: true,
                v6_opaque: false
            }
        );
        assert_eq!(
            decide(&[
                listener("::ffff:192.168.0.11", false, true),
                listener("::", false, false)
            ]),
            TproxyListeners {
                v4_opaque: false,
                v6_opaque: true
            }
        );
        // Other ports, other addresses and no listener at all do not make a family opaque.
        let mut other_port = listener("::", false, false);
        other_port.port = 8103;
        assert_eq!(
            decide(&[other_port, listener("10.0.0.1", false, false)]),
            both(false)
        );
        assert_eq!(decide(&[]), both(false));
        // A kernel that does not report the option: assumed transparent.
        let mut unknown = listener("::", false, false);
        unknown.transparent = None;
        assert_eq!(decide(&[unknown]), both(false));
        // No listener address of a family: nothing to decide there.
        assert_eq!(
            TproxyListeners::decide(&[listener("::", false, false)], 8102, v4, None),
            TproxyListeners {
                v4_opaque: true,
                v6_opaque: false
            }
        );
    }

    #[test]
    fn sock_diag_lists_listeners_with_the_transparent_bit() {
        // Needs no privilege to list; setting IP_TRANSPARENT needs CAP_NET_ADMIN, so only a
        // plain listener is checked here (the transparent one in tests/tproxy.rs).
        let socket = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = socket.local_addr().unwrap().port();
        let found = tcp_listeners().expect("sock_diag dump");
        assert!(
            found.contains(&Listener {
                addr: "127.0.0.1".parse().unwrap(),
                port,
                v6only: false,
                transparent: Some(false)
            }),
            "{found:?}"
        );
    }

    #[test]
    fn override_syntax_is_checked() {
        assert!("eth0".parse::<IfaceOverride>().is_err());
        assert!("eth0=router".parse::<IfaceOverride>().is_err());
        assert!("=nic".parse::<IfaceOverride>().is_err());
        assert!(
            "a-very-long-interface-name=nic"
                .parse::<IfaceOverride>()
                .is_err()
        );
        assert_eq!(
            "lo=lo".parse::<IfaceOverride>(),
            Ok(IfaceOverride {
                name: "lo".into(),
                roles: role::LOOPBACK
            })
        );
    }
}
