//! Which interfaces the agent attaches to, against real links in private network namespaces.
//!
//! Kube-OVN's NodePort rules (R2/R3) carry no `-i`: a NodePort SYN is marked on whatever
//! interface it arrives. These tests send SYNs over a second NIC that holds no InternalIP, to a
//! node address on `lo` (BGP style), over a macvlan device whose lower device carries traffic
//! of its own, with VLAN tags, and over a tun device (no Ethernet header at TC ingress), and
//! count in netfilter which arrive with R2/R3's bits. Needs root.

use std::{
    net::{SocketAddr, TcpStream},
    time::Duration,
};

use kube_ovn_agent::testing::{
    agent::{Agent, Node, wait_for},
    netns::{NetNs, send_frames, veth},
    packet::Packet,
};
use libtest_mimic::{Failed, Trial};

const AGENT: &str = env!("CARGO_BIN_EXE_kube-ovn-agent");
/// spec §5.1's ETP=Local TCP NodePort.
const NODE_PORT: u16 = 30080;
/// R2's bit (ETP=Local NodePort to a local address).
const R2_MARK: u32 = 0x8_0000;
/// R2's and R3's bits (R3: the source is another node's InternalIP).
const R2_R3_MARK: u32 = 0x8_4000;
const SYNS: u64 = 5;

fn main() {
    let trials = vec![
        Trial::test(
            "nodeport_syns_are_marked_on_every_interface_they_arrive_on",
            every_interface,
        ),
        Trial::test(
            "a_tun_device_without_an_ethernet_header_is_classified_from_the_ip_header",
            tun_device,
        ),
    ];
    kube_ovn_testkit::privileged::main("interface tests", trials);
}

/// Counts, in mangle PREROUTING, NodePort SYNs arriving on `ifname` (IPv4 and IPv6): all of
/// them, and those carrying `mark` (rules without a target only count).
fn count_syns(node: &Node, ifname: &str, mark: u32) {
    for tool in ["iptables", "ip6tables"] {
        node.ns
            .sh(&format!(
                "{tool} -t mangle -A PREROUTING -i {ifname} -p tcp --dport {NODE_PORT} --syn \
             -m comment --comment all-{ifname}; \
             {tool} -t mangle -A PREROUTING -i {ifname} -p tcp --dport {NODE_PORT} --syn \
             -m mark --mark {mark:#x}/{mark:#x} -m comment --comment marked-{ifname}"
            ))
            .expect("shell in namespace");
    }
}

/// (SYNs seen on `ifname`, of which marked), over both families.
fn syns(node: &Node, ifname: &str) -> (u64, u64) {
    let count = |comment: String| {
        node.rule_packets("iptables", "PREROUTING", &comment)
            + node.rule_packets("ip6tables", "PREROUTING", &comment)
    };
    (
        count(format!("all-{ifname}")),
        count(format!("marked-{ifname}")),
    )
}

fn ensure(condition: bool, message: impl FnOnce() -> String) -> Result<(), Failed> {
    if condition {
        Ok(())
    } else {
        Err(message().into())
    }
}

/// `SYNS` connection attempts from `client` to `target` (refused: nothing listens), each one SYN.
fn send_syns(client: &NetNs, target: SocketAddr) {
    client
        .enter(|| {
            for _ in 0..SYNS {
                let _ = TcpStream::connect_timeout(&target, Duration::from_millis(500));
            }
        })
        .expect("enter namespace");
}

/// Every SYN counted on `ifname` carries `mark`, and at least `SYNS` arrived.
fn all_marked(node: &Node, ifname: &str, agent: &Agent) -> Result<(), Failed> {
    let (all, marked) = syns(node, ifname);
    ensure(all >= SYNS && marked == all, || {
        format!(
            "{ifname}: {marked} of {all} NodePort SYNs carried R2/R3's mark\n{}",
            agent.log_text()
        )
    })
}

/// A second NIC (`eth1`, its own public address, no InternalIP), a BGP-style node address on
/// `lo` reached through it, a macvlan device (`mv0`) over a lower device (`eth2`) that has an
/// address of its own, and VLAN-tagged frames: every NodePort SYN the stack receives carries
/// R2's mark; a frame is classified once, on the interface the stack receives it on (not also
/// on the macvlan's lower device, and not at all when tagged for a VLAN no device takes); the
/// host end of a pod's veth pair and a bridge port are left alone; links that appear are
/// attached and links that go away are forgotten.
#[expect(clippy::too_many_lines, reason = "one topology, checked step by step")]
fn every_interface() -> Result<(), Failed> {
    let node = Node::new("kovn-ifn-");
    let peer = NetNs::new("kovn-ifpeer-").expect("create namespace");
    let public = NetNs::new("kovn-ifpub-").expect("create namespace");
    let lower = NetNs::new("kovn-iflow-").expect("create namespace");
    let pod = NetNs::new("kovn-ifpod-").expect("create namespace");
    veth(&node.ns, "eth0", &peer, "eth0").expect("veth pair");
    veth(&node.ns, "eth1", &public, "eth0").expect("veth pair");
    veth(&node.ns, "eth2", &lower, "eth0").expect("veth pair");
    veth(&node.ns, "vethpod1", &pod, "eth0").expect("veth pair");
    node.ns
        .sh("sysctl -qw net.ipv4.conf.all.arp_ignore=1; \
         ip addr add 192.168.0.11/24 dev eth0; \
         ip addr add 172.31.0.1/24 dev eth1; \
         ip addr add 10.255.0.11/32 dev lo; \
         ip addr add 172.30.0.1/24 dev eth2; \
         ip link add link eth2 name mv0 type macvlan mode bridge; ip link set mv0 up; \
         ip addr add 172.30.100.1/24 dev mv0; \
         ip link add cni0 type bridge; ip link set cni0 up; ip addr add 10.42.0.1/24 dev cni0; \
         ip tuntap add dev tap0 mode tap; ip link set tap0 master cni0; ip link set tap0 up")
        .expect("shell in namespace");
    peer.sh("ip addr add 192.168.0.12/24 dev eth0")
        .expect("shell in namespace");
    public
        .sh("ip addr add 172.31.0.2/24 dev eth0; ip route add default via 172.31.0.1")
        .expect("shell in namespace");
    lower
        .sh(
            "ip addr add 172.30.0.2/24 dev eth0; ip addr add 172.30.100.2/24 dev eth0; \
         ip route add 192.168.0.11/32 via 172.30.100.1",
        )
        .expect("shell in namespace");
    for ifname in ["eth1", "eth2", "mv0"] {
        count_syns(&node, ifname, R2_MARK);
    }
    let mut agent = node.example_agent(AGENT, &[]);
    node.wait_ready(
        AGENT,
        &mut agent,
        &["eth0", "eth1", "lo", "eth2", "mv0", "cni0"],
    )?;
    let attached = node.attached(AGENT);
    for left_alone in ["vethpod1", "tap0"] {
        ensure(!attached.iter().any(|a| a == left_alone), || {
            format!("attached to {left_alone}: {attached:?}")
        })?;
    }

    // The second NIC: to the InternalIP, and to the node address on lo.
    send_syns(&public, SocketAddr::from(([192, 168, 0, 11], NODE_PORT)));
    send_syns(&public, SocketAddr::from(([10, 255, 0, 11], NODE_PORT)));
    all_marked(&node, "eth1", &agent)?;

    // The lower device's own traffic, then the macvlan's: each SYN counted once.
    send_syns(&lower, SocketAddr::from(([172, 30, 0, 1], NODE_PORT)));
    all_marked(&node, "eth2", &agent)?;
    let r2t_before = node.counter(AGENT, "R2t");
    send_syns(&lower, SocketAddr::from(([192, 168, 0, 11], NODE_PORT)));
    all_marked(&node, "mv0", &agent)?;
    let r2t = node.counter(AGENT, "R2t") - r2t_before;
    let (on_macvlan, _) = syns(&node, "mv0");
    ensure(r2t == on_macvlan, || {
        format!(
            "{on_macvlan} SYNs through the macvlan were counted {r2t} times as R2t: \
             the lower device classified them too"
        )
    })?;

    // Tagged frames: VLAN 100 has no device here, so the stack drops them (not classified,
    // counted other_host); priority-tagged (VLAN 0) ones are received on eth2 (classified).
    let mac: Vec<u8> = node
        .ns
        .sh("cat /sys/class/net/eth2/address")
        .expect("shell in namespace")
        .trim()
        .split(':')
        .map(|b| u8::from_str_radix(b, 16).expect("MAC"))
        .collect();
    let tagged = |vid: u16| {
        let mut frame = Packet::tcp("172.30.0.2", "172.30.0.1", NODE_PORT)
            .vlan(0x8100)
            .frame();
        frame[..6].copy_from_slice(&mac);
        frame[14..16].copy_from_slice(&vid.to_be_bytes());
        frame
    };
    let (other_host, r2t, (eth2_before, _)) = (
        node.counter(AGENT, "other_host"),
        node.counter(AGENT, "R2t"),
        syns(&node, "eth2"),
    );
    lower
        .enter(|| send_frames(&vec![tagged(100); 3], "eth0"))
        .expect("enter namespace");
    lower
        .enter(|| send_frames(&vec![tagged(0); 2], "eth0"))
        .expect("enter namespace");
    wait_for(Duration::from_secs(5), || {
        syns(&node, "eth2").0 >= eth2_before + 2
    })
    .map_err(|e| format!("priority-tagged SYNs not received: {e}"))?;
    std::thread::sleep(Duration::from_millis(100));
    let (other_host, r2t) = (
        node.counter(AGENT, "other_host") - other_host,
        node.counter(AGENT, "R2t") - r2t,
    );
    ensure(other_host == 3 && r2t == 2, || {
        format!("tagged frames: other_host +{other_host} (want 3), R2t +{r2t} (want 2)")
    })?;
    all_marked(&node, "eth2", &agent)?;

    // A link that appears later is attached; one that goes away is forgotten.
    node.ns
        .sh("ip tuntap add dev tap1 mode tap; ip link set tap1 up")
        .expect("shell in namespace");
    wait_for(Duration::from_secs(5), || {
        node.attached(AGENT).iter().any(|a| a == "tap1")
    })
    .map_err(|e| format!("tap1 not attached: {e}\n{}", agent.log_text()))?;
    node.ns.sh("ip link del tap1").expect("shell in namespace");
    wait_for(Duration::from_secs(5), || {
        let pinned = node.root().join("links/tap1").exists();
        !pinned && !node.attached(AGENT).iter().any(|a| a == "tap1")
    })
    .map_err(|e| {
        format!(
            "tap1 still attached or pinned after removal: {e}\n{}",
            agent.log_text()
        )
    })?;
    ensure(
        !agent.log_text().contains("detaching from tap1 failed"),
        || agent.log_text(),
    )
}

/// `TUNSETIFF`, `IFF_TUN`, `IFF_NO_PI` from `<linux/if_tun.h>`.
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const IFF_TUN: libc::c_short = 0x0001;
const IFF_NO_PI: libc::c_short = 0x1000;

/// `struct ifreq` as `TUNSETIFF` reads it: the name and the flags.
#[repr(C)]
struct IfReq {
    name: [u8; 16],
    flags: libc::c_short,
    pad: [u8; 22],
}

/// Writes raw IP packets into the tun device `ifname` of the current namespace: the kernel
/// receives each on `ifname`, starting at the IP header (`ARPHRD_NONE`, no link-layer header).
fn tun_inject(ifname: &str, packets: &[Vec<u8>]) {
    use std::io::Write as _;
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")
        .expect("open /dev/net/tun");
    let mut request = IfReq {
        name: [0; 16],
        flags: IFF_TUN | IFF_NO_PI,
        pad: [0; 22],
    };
    request.name[..ifname.len()].copy_from_slice(ifname.as_bytes());
    // SAFETY: TUNSETIFF reads a struct ifreq, which IfReq lays out (40 bytes).
    let rc = unsafe {
        use std::os::fd::AsRawFd as _;
        libc::ioctl(file.as_raw_fd(), TUNSETIFF, &raw mut request)
    };
    assert_eq!(rc, 0, "TUNSETIFF: {}", std::io::Error::last_os_error());
    for packet in packets {
        file.write_all(packet).expect("write to tun");
    }
    // Received asynchronously (backlog): give the stack a moment before the fd goes away.
    std::thread::sleep(Duration::from_millis(200));
}

/// A tun device (`ARPHRD_NONE`: at TC ingress the packet starts at the IP header). Another
/// node's NodePort SYNs, IPv4 and IPv6, written into it are marked R2+R3 as iptables would,
/// and none is counted as not parsed or not IP.
fn tun_device() -> Result<(), Failed> {
    let node = Node::new("kovn-ifn-");
    let peer = NetNs::new("kovn-iftun-").expect("create namespace");
    veth(&node.ns, "eth0", &peer, "eth0").expect("veth pair");
    node.ns
        .sh(
            "ip addr add 192.168.0.11/24 dev eth0; ip addr add fd00::11/64 dev eth0 nodad; \
         ip tuntap add dev tun0 mode tun; ip link set tun0 up",
        )
        .expect("shell in namespace");
    count_syns(&node, "tun0", R2_R3_MARK);
    // Named explicitly too, so a build whose discovery skips it still attaches it.
    let mut agent = node.example_agent(AGENT, &["--iface", "tun0=nic"]);
    node.wait_ready(AGENT, &mut agent, &["eth0", "tun0"])?;
    let (not_parsed, not_ip) = (
        node.counter(AGENT, "not_parsed"),
        node.counter(AGENT, "not_ip"),
    );
    let v4 = Packet::tcp("192.168.0.12", "192.168.0.11", NODE_PORT).ip_packet();
    let v6 = Packet::tcp("fd00::12", "fd00::11", NODE_PORT).ip_packet();
    let packets: Vec<Vec<u8>> = std::iter::repeat_n(v4, 3)
        .chain(std::iter::repeat_n(v6, 3))
        .collect();
    node.ns
        .enter(|| tun_inject("tun0", &packets))
        .expect("enter namespace");
    let v4_only = (
        node.rule_packets("iptables", "PREROUTING", "all-tun0"),
        node.rule_packets("iptables", "PREROUTING", "marked-tun0"),
    );
    let (all, marked) = syns(&node, "tun0");
    let skipped = (
        node.counter(AGENT, "not_parsed") - not_parsed,
        node.counter(AGENT, "not_ip") - not_ip,
    );
    ensure(
        v4_only == (3, 3) && (all, marked) == (6, 6) && skipped == (0, 0),
        || {
            format!(
                "IPv4 (seen, marked) {v4_only:?}, both families ({all}, {marked}), want 3 and 6 \
                 all marked; not parsed/not IP: {skipped:?}\n{}",
                agent.log_text()
            )
        },
    )
}
