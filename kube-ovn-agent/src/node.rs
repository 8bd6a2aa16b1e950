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
use kube_ovn_ebpf_common::role;
use netlink_packet_route::{
    address::AddressAttribute,
    link::{InfoKind, LinkAttribute, LinkInfo},
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
        };
        for attribute in message.attributes {
            match attribute {
                LinkAttribute::IfName(name) => link.name = name,
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
    let (conn, handle, _) = rtnetlink::new_connection().map_err(NetlinkError::Socket)?;
    tokio::spawn(events_conn);
    tokio::spawn(conn);
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

/// `--iface NAME=ROLE`: `ovn0`, `nic`, `bridge`, `lo`, or `none` to exclude a discovered one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IfaceOverride {
    pub name: String,
    pub roles: u32,
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

/// Which interfaces get the program, with which roles: `ovn0`; every other interface holding
/// one of this node's InternalIPs (a `br-*` OVS bridge counts as the provider bridge); `lo`
/// only for TPROXY; then `overrides` add, change or (`none`) remove entries by name.
pub fn iface_roles(
    net: &NodeNet,
    node_ips: &[IpAddr],
    overrides: &[IfaceOverride],
    tproxy: bool,
) -> BTreeMap<String, (u32, u32)> {
    let mut roles: BTreeMap<String, (u32, u32)> = BTreeMap::new();
    for link in net.links.values() {
        let holds_node_ip = link.addrs.iter().any(|a| node_ips.contains(&a.addr()));
        let role = if link.name == OVN0 {
            role::OVN0
        } else if link.name == "lo" {
            if tproxy { role::LOOPBACK } else { 0 }
        } else if holds_node_ip && link.name.starts_with("br-") && link.kind == "openvswitch" {
            role::PROVIDER_BRIDGE
        } else if holds_node_ip {
            role::NODE_NIC
        } else {
            0
        };
        if role != 0 {
            roles.insert(link.name.clone(), (link.index, role));
        }
    }
    for o in overrides {
        if o.roles == 0 {
            roles.remove(&o.name);
        } else if let Some(link) = net.link_by_name(&o.name) {
            roles.insert(o.name.clone(), (link.index, o.roles));
        }
    }
    roles
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
        }
    }

    fn net() -> NodeNet {
        let links = [
            link(1, "lo", "", &["127.0.0.1/8", "::1/128"]),
            link(2, "eth0", "", &["192.168.0.11/24", "fd00::11/64"]),
            link(3, "eth1", "", &["172.31.0.5/24"]),
            link(4, "ovn0", "openvswitch", &["100.64.0.2/16"]),
            link(5, "br-ext", "openvswitch", &["192.168.1.11/24"]),
            link(6, "br-1234abcd", "bridge", &["192.168.1.11/24"]),
            link(7, "veth1", "veth", &[]),
        ];
        NodeNet {
            links: links.into_iter().map(|l| (l.index, l)).collect(),
            ..NodeNet::default()
        }
    }

    #[test]
    fn discovery_picks_ovn0_nics_with_node_ips_and_provider_bridges() {
        let ips: Vec<IpAddr> = ["192.168.0.11", "192.168.1.11"]
            .map(|a| a.parse().unwrap())
            .into();
        let roles = iface_roles(&net(), &ips, &[], false);
        assert_eq!(
            roles,
            BTreeMap::from([
                ("br-1234abcd".into(), (6, role::NODE_NIC)),
                ("br-ext".into(), (5, role::PROVIDER_BRIDGE)),
                ("eth0".into(), (2, role::NODE_NIC)),
                ("ovn0".into(), (4, role::OVN0)),
            ])
        );
        let with_lo = iface_roles(&net(), &ips, &[], true);
        assert_eq!(with_lo.get("lo"), Some(&(1, role::LOOPBACK)));
    }

    #[test]
    fn overrides_add_change_and_remove() {
        let ips: Vec<IpAddr> = vec!["192.168.0.11".parse().unwrap()];
        let overrides: Vec<IfaceOverride> = ["eth1=nic", "eth0=none", "ovn0=bridge", "missing=nic"]
            .iter()
            .map(|s| s.parse().unwrap())
            .collect();
        let roles = iface_roles(&net(), &ips, &overrides, false);
        assert_eq!(
            roles,
            BTreeMap::from([
                ("eth1".into(), (3, role::NODE_NIC)),
                ("ovn0".into(), (4, role::PROVIDER_BRIDGE)),
            ])
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
