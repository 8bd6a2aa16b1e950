//! The namespaces, links, addresses and routes of a Kube-OVN node and its neighbours (spec §5.1
//! addresses). Nothing here touches the root namespace: every link is created from inside a
//! namespace, and veth peers are created directly in their target namespace.
//!
//! ```text
//!  pods ns (OVN router + pods)        node ns                        lan ns              ext ns
//!  ovn-lr 100.64.0.1  ───────────── ovn0 100.64.0.2             ┌─ br0 192.168.0.1 ─┐
//!   10.16.0.5 10.16.0.20 10.17.0.9    eth0 192.168.0.11 ──────── │ to-node           │ to-ext 203.0.113.1 ── eth0 203.0.113.7
//!   100.64.0.3 10.0.1.5 172.18.0.5    kube-ipvs0 (IPVS mode:     │ to-other          │
//!   (+ IPv6 halves)                    ClusterIPs, link down)    └───────────────────┘
//!                                                                        │
//!                                                      other ns: eth0 192.168.0.12 (apiserver :6443)
//! ```
//!
//! Interface names (`ovn0`, `eth0`) are the ones a real node has, which the agent's `--iface`
//! flags and the spec's rules name; they are private to each run's namespaces, whose names are
//! unique per run, so concurrent runs cannot collide.

use std::{fmt::Write as _, net::IpAddr};

use anyhow::{Context as _, Result};

use super::{Host, cleanup, netns::NetNs};

/// The fixture's addresses (spec §5.1 where it names them).
pub mod addr {
    use std::net::{Ipv4Addr, Ipv6Addr};

    const fn v6(a: u16, b: u16, c: u16, h: u16) -> Ipv6Addr {
        Ipv6Addr::new(a, b, c, 0, 0, 0, 0, h)
    }

    pub const NODE_V4: Ipv4Addr = Ipv4Addr::new(192, 168, 0, 11);
    pub const NODE_V6: Ipv6Addr = v6(0xfd00, 0, 0, 0x11);
    pub const OTHER_V4: Ipv4Addr = Ipv4Addr::new(192, 168, 0, 12);
    pub const OTHER_V6: Ipv6Addr = v6(0xfd00, 0, 0, 0x12);
    /// A second other node: only an ipset entry, no namespace.
    pub const THIRD_NODE_V4: Ipv4Addr = Ipv4Addr::new(192, 168, 0, 13);
    pub const LAN_GW_V4: Ipv4Addr = Ipv4Addr::new(192, 168, 0, 1);
    pub const LAN_GW_V6: Ipv6Addr = v6(0xfd00, 0, 0, 1);

    pub const OVN0_V4: Ipv4Addr = Ipv4Addr::new(100, 64, 0, 2);
    pub const OVN0_V6: Ipv6Addr = v6(0xfd00, 0x100, 0x64, 2);
    /// The OVN cluster router's port on the join switch: the node's next hop to every pod.
    pub const OVN_LR_V4: Ipv4Addr = Ipv4Addr::new(100, 64, 0, 1);
    pub const OVN_LR_V6: Ipv6Addr = v6(0xfd00, 0x100, 0x64, 1);

    pub const EXT_V4: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 7);
    pub const EXT_V6: Ipv6Addr = v6(0x2001, 0xdb8, 0, 7);
    pub const EXT_GW_V4: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 1);
    pub const EXT_GW_V6: Ipv6Addr = v6(0x2001, 0xdb8, 0, 1);

    /// Client pod in `ovn-default` (distributed gateway).
    pub const POD_V4: Ipv4Addr = Ipv4Addr::new(10, 16, 0, 5);
    pub const POD_V6: Ipv6Addr = v6(0xfd00, 0x10, 0x16, 5);
    /// Backend pod in `ovn-default`.
    pub const BACKEND_V4: Ipv4Addr = Ipv4Addr::new(10, 16, 0, 20);
    pub const BACKEND_V6: Ipv6Addr = v6(0xfd00, 0x10, 0x16, 0x20);
    /// Pod in the centralized subnet: client (vector 10) and backend of `web-central`.
    pub const CENTRAL_POD_V4: Ipv4Addr = Ipv4Addr::new(10, 17, 0, 9);
    pub const CENTRAL_POD_V6: Ipv6Addr = v6(0xfd00, 0x10, 0x17, 9);
    /// A join-subnet address that is not the node's own (vector 9).
    pub const JOIN_V4: Ipv4Addr = Ipv4Addr::new(100, 64, 0, 3);
    pub const JOIN_V6: Ipv6Addr = v6(0xfd00, 0x100, 0x64, 3);
    /// Custom-VPC pod (vector 8).
    pub const VPC_POD_V4: Ipv4Addr = Ipv4Addr::new(10, 0, 1, 5);
    /// Underlay pod with u2o interconnection (vector 7).
    pub const U2O_POD_V4: Ipv4Addr = Ipv4Addr::new(172, 18, 0, 5);

    pub const KUBERNETES_V4: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 1);
    pub const KUBERNETES_V6: Ipv6Addr = v6(0xfd00, 0x10, 0x96, 1);
    pub const KUBE_DNS_V4: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
    pub const WEB_LOCAL_V4: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 20);
    pub const WEB_LOCAL_V6: Ipv6Addr = v6(0xfd00, 0x10, 0x96, 0x20);
    pub const WEB_CENTRAL_V4: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 21);
    pub const WEB_CENTRAL_V6: Ipv6Addr = v6(0xfd00, 0x10, 0x96, 0x21);
    pub const WEB_CLUSTER_V4: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 22);
    pub const WEB_CLUSTER_V6: Ipv6Addr = v6(0xfd00, 0x10, 0x96, 0x22);
}

/// Pod-side addresses the pods namespace holds (as /32 and /128 on the router port).
const POD_ADDRESSES: &[IpAddr] = &[
    IpAddr::V4(addr::POD_V4),
    IpAddr::V6(addr::POD_V6),
    IpAddr::V4(addr::BACKEND_V4),
    IpAddr::V6(addr::BACKEND_V6),
    IpAddr::V4(addr::CENTRAL_POD_V4),
    IpAddr::V6(addr::CENTRAL_POD_V6),
    IpAddr::V4(addr::JOIN_V4),
    IpAddr::V6(addr::JOIN_V6),
    IpAddr::V4(addr::VPC_POD_V4),
    IpAddr::V4(addr::U2O_POD_V4),
];

/// Prefixes the node routes to the OVN router over `ovn0`, as Kube-OVN does for every
/// default-VPC subnet (and u2o underlay subnets). `10.0.1.0/24` (custom VPC) is a test
/// affordance a real node lacks: it lets a wrongly marked custom-VPC packet come back, so over-
/// marking shows up as a different source address instead of a timeout.
const OVN0_ROUTES: &[&str] = &[
    "10.16.0.0/16",
    "10.17.0.0/16",
    "172.18.0.0/24",
    "10.0.1.0/24",
    "fd00:10:16::/64",
    "fd00:10:17::/64",
];

/// The other node reaches pods and join addresses through the overlay; here, through node1.
const OTHER_NODE_ROUTES: &[&str] = &[
    "10.16.0.0/16",
    "10.17.0.0/16",
    "100.64.0.0/16",
    "10.0.1.0/24",
    "172.18.0.0/24",
    "fd00:10:16::/64",
    "fd00:10:17::/64",
    "fd00:100:64::/64",
];

/// The run's namespaces, one per [`Host`].
pub struct Namespaces {
    pub node: NetNs,
    pub pods: NetNs,
    pub lan: NetNs,
    pub ext: NetNs,
    pub other: NetNs,
}

impl Namespaces {
    pub fn get(&self, host: Host) -> &NetNs {
        match host {
            Host::Node => &self.node,
            Host::Pods => &self.pods,
            Host::Lan => &self.lan,
            Host::Ext => &self.ext,
            Host::Other => &self.other,
        }
    }
}

/// Creates the namespaces and wires them as in the module diagram.
pub fn build(stem: &str) -> Result<Namespaces> {
    // Registered with `cleanup` the moment it exists (so also removed on a signal). IPv6
    // duplicate address detection is switched off before any link exists, so addresses
    // (including link-local ones NDP uses) are usable at once.
    let ns = |role: &str| -> Result<NetNs> {
        let ns = NetNs::create_guarded(&format!("{stem}-{role}"), cleanup::netns)?;
        ns.sysctl(&[
            ("net/ipv6/conf/all/accept_dad", "0"),
            ("net/ipv6/conf/default/accept_dad", "0"),
        ])?;
        Ok(ns)
    };
    let ns = Namespaces {
        node: ns("node")?,
        pods: ns("pods")?,
        lan: ns("lan")?,
        ext: ns("ext")?,
        other: ns("other")?,
    };
    let routers = [&ns.node, &ns.lan];
    for router in routers {
        router.sysctl(&[
            ("net/ipv4/ip_forward", "1"),
            ("net/ipv6/conf/all/forwarding", "1"),
            // Replies to masqueraded or DNATed traffic may come back on another interface
            // than a strict reverse-path check expects; Kube-OVN nodes run with it loose too.
            ("net/ipv4/conf/all/rp_filter", "0"),
            ("net/ipv4/conf/default/rp_filter", "0"),
        ])?;
    }
    ns.node
        .ip_batch(&node_batch(&ns))
        .context("wiring the node namespace")?;
    ns.other.ip_batch(&other_batch(&ns))?;
    ns.ext.ip_batch(&ext_batch(&ns))?;
    ns.lan.ip_batch(&lan_batch())?;
    ns.pods.ip_batch(&pods_batch())?;
    Ok(ns)
}

fn node_batch(ns: &Namespaces) -> String {
    use addr::{LAN_GW_V4, LAN_GW_V6, NODE_V4, NODE_V6};
    let mut b = format!(
        "link set lo up\n\
         link add eth0 type veth peer name to-node netns {lan}\n\
         addr add {NODE_V4}/24 dev eth0\n\
         addr add {NODE_V6}/64 dev eth0 nodad\n\
         link set eth0 up\n\
         route add default via {LAN_GW_V4} dev eth0\n\
         route add ::/0 via {LAN_GW_V6} dev eth0\n",
        lan = ns.lan.name(),
    );
    b.push_str(&ovn0_batch(ns));
    b
}

/// `ovn0` (with its peer, the OVN router's port in the pods namespace), its addresses and the
/// routes Kube-OVN puts on it.
fn ovn0_batch(ns: &Namespaces) -> String {
    use addr::{OVN_LR_V4, OVN_LR_V6, OVN0_V4, OVN0_V6};
    let mut b = format!(
        "link add ovn0 type veth peer name ovn-lr netns {pods}\n\
         addr add {OVN0_V4}/16 dev ovn0\n\
         addr add {OVN0_V6}/64 dev ovn0 nodad\n\
         link set ovn0 up\n",
        pods = ns.pods.name()
    );
    for prefix in OVN0_ROUTES {
        let via = if prefix.contains(':') {
            OVN_LR_V6.to_string()
        } else {
            OVN_LR_V4.to_string()
        };
        let _ = writeln!(b, "route add {prefix} via {via} dev ovn0");
    }
    b
}

fn other_batch(ns: &Namespaces) -> String {
    use addr::{LAN_GW_V4, LAN_GW_V6, NODE_V4, NODE_V6, OTHER_V4, OTHER_V6};
    let mut b = format!(
        "link set lo up\n\
         link add eth0 type veth peer name to-other netns {lan}\n\
         addr add {OTHER_V4}/24 dev eth0\n\
         addr add {OTHER_V6}/64 dev eth0 nodad\n\
         link set eth0 up\n\
         route add default via {LAN_GW_V4} dev eth0\n\
         route add ::/0 via {LAN_GW_V6} dev eth0\n",
        lan = ns.lan.name()
    );
    for prefix in OTHER_NODE_ROUTES {
        let via = if prefix.contains(':') {
            NODE_V6.to_string()
        } else {
            NODE_V4.to_string()
        };
        let _ = writeln!(b, "route add {prefix} via {via} dev eth0");
    }
    b
}

fn ext_batch(ns: &Namespaces) -> String {
    use addr::{EXT_GW_V4, EXT_GW_V6, EXT_V4, EXT_V6};
    format!(
        "link set lo up\n\
         link add eth0 type veth peer name to-ext netns {lan}\n\
         addr add {EXT_V4}/24 dev eth0\n\
         addr add {EXT_V6}/64 dev eth0 nodad\n\
         link set eth0 up\n\
         route add default via {EXT_GW_V4} dev eth0\n\
         route add ::/0 via {EXT_GW_V6} dev eth0\n",
        lan = ns.lan.name()
    )
}

/// The LAN: a switch between the nodes plus the router to the outside world. STP and multicast
/// snooping are off so ports forward at once and NDP is never filtered.
fn lan_batch() -> String {
    use addr::{EXT_GW_V4, EXT_GW_V6, LAN_GW_V4, LAN_GW_V6};
    format!(
        "link set lo up\n\
         link add br0 type bridge forward_delay 0 mcast_snooping 0\n\
         link set to-node master br0\n\
         link set to-other master br0\n\
         link set to-node up\n\
         link set to-other up\n\
         addr add {LAN_GW_V4}/24 dev br0\n\
         addr add {LAN_GW_V6}/64 dev br0 nodad\n\
         link set br0 up\n\
         addr add {EXT_GW_V4}/24 dev to-ext\n\
         addr add {EXT_GW_V6}/64 dev to-ext nodad\n\
         link set to-ext up\n"
    )
}

fn pods_batch() -> String {
    use addr::{OVN_LR_V4, OVN_LR_V6, OVN0_V4, OVN0_V6};
    let mut b = format!(
        "link set lo up\n\
         addr add {OVN_LR_V4}/16 dev ovn-lr\n\
         addr add {OVN_LR_V6}/64 dev ovn-lr nodad\n"
    );
    for address in POD_ADDRESSES {
        let (len, flags) = if address.is_ipv6() {
            (128, " nodad")
        } else {
            (32, "")
        };
        let _ = writeln!(b, "addr add {address}/{len} dev ovn-lr{flags}");
    }
    let _ = write!(
        b,
        "link set ovn-lr up\n\
         route add default via {OVN0_V4} dev ovn-lr\n\
         route add ::/0 via {OVN0_V6} dev ovn-lr\n"
    );
    b
}

/// Deletes `ovn0`, as happens when ovs-vswitchd loses the port or someone removes it.
///
/// `ovn0` here is a veth pair, so the OVN router's port (`ovn-lr`, which holds the pod
/// addresses) goes with it; [`recreate_ovn0`] puts both back.
pub fn delete_ovn0(ns: &Namespaces) -> Result<()> {
    Ok(ns.node.ip_batch("link del ovn0\n")?)
}

/// Creates `ovn0` again as kube-ovn-cni's `loopOvn0Check` does — same name, same addresses, same
/// routes — and the pods side of the pair with its addresses and routes.
pub fn recreate_ovn0(ns: &Namespaces) -> Result<()> {
    ns.node
        .ip_batch(&ovn0_batch(ns))
        .context("re-creating ovn0")?;
    ns.pods
        .ip_batch(&pods_batch())
        .context("re-creating the OVN router's port")
}

/// Whether `ovn0` and its peer both report operational state UP: only then do they carry
/// traffic (a veth's queue is activated when the kernel's link watcher processes the carrier
/// change, a work item that needs RTNL and can lag on a busy machine).
pub fn ovn0_up(ns: &Namespaces) -> Result<bool> {
    for (netns, link) in [(&ns.node, "ovn0"), (&ns.pods, "ovn-lr")] {
        if !netns
            .run("ip", &["-o", "link", "show", "dev", link])?
            .contains("state UP")
        {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Interfaces that must be up before traffic: a veth or bridge port whose carrier is not yet
/// seen by the link watcher (up to a second after creation) silently drops what it is given.
const LINKS: &[(Host, &str)] = &[
    (Host::Node, "eth0"),
    (Host::Node, "ovn0"),
    (Host::Pods, "ovn-lr"),
    (Host::Lan, "br0"),
    (Host::Lan, "to-node"),
    (Host::Lan, "to-other"),
    (Host::Lan, "to-ext"),
    (Host::Ext, "eth0"),
    (Host::Other, "eth0"),
];

/// Waits (at most 5 s) until every link in [`LINKS`] reports operational state UP.
pub fn wait_links_up(ns: &Namespaces) -> Result<()> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        let mut down = Vec::new();
        for &(host, link) in LINKS {
            let shown = ns
                .get(host)
                .run("ip", &["-o", "link", "show", "dev", link])?;
            if !shown.contains("state UP") {
                down.push(format!("{host:?}/{link}"));
            }
        }
        if down.is_empty() {
            return Ok(());
        }
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "links still not up after 5 s: {}",
            down.join(", ")
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}
