//! Spec §5.1's node n1 for the privileged suites that send real packets through the agent: a
//! node namespace with `eth0` to a client (another node, 192.168.0.12) and `ovn0` to a pod
//! (10.16.0.5), netfilter counting the packets that arrive with our marks, and a bpffs for the
//! agent's pins. Everything is removed on drop.

use std::{net::UdpSocket, path::PathBuf, time::Duration};

use super::netns::{Bpffs, NetNs, veth};

pub struct N1 {
    pub node: NetNs,
    pub client: NetNs,
    pub pod: NetNs,
    pub bpffs: Bpffs,
}

impl N1 {
    /// The namespaces are named `{prefix}node-…`, `{prefix}client-…`, `{prefix}pod-…`; `ipv6`
    /// also gives node and client an address on `eth0` (`fd00::11`, `fd00::12`).
    pub fn new(prefix: &str, ipv6: bool) -> Self {
        let node = NetNs::new(&format!("{prefix}node-")).expect("create namespace");
        let client = NetNs::new(&format!("{prefix}client-")).expect("create namespace");
        let pod = NetNs::new(&format!("{prefix}pod-")).expect("create namespace");
        veth(&node, "eth0", &client, "eth0").expect("veth pair");
        veth(&node, "ovn0", &pod, "eth0").expect("veth pair");
        let v6 = |addr: &str| {
            if ipv6 {
                format!("ip addr add {addr}/64 dev eth0 nodad; ")
            } else {
                String::new()
            }
        };
        node.sh(&format!(
            "ip addr add 192.168.0.11/24 dev eth0; {}ip addr add 100.64.0.2/16 dev ovn0; \
             ip route add 10.16.0.0/16 dev ovn0",
            v6("fd00::11")
        ))
        .expect("node addresses");
        client
            .sh(&format!(
                "ip addr add 192.168.0.12/24 dev eth0; {}",
                v6("fd00::12")
            ))
            .expect("client addresses");
        pod.sh(
            "ip addr add 10.16.0.5/16 dev eth0; ip route add 100.64.0.2 dev eth0; \
             ip route add default via 100.64.0.2",
        )
        .expect("pod addresses");
        // Counting rules: which packets netfilter sees with our bits.
        node.sh(
            "iptables -t mangle -A PREROUTING -p udp --dport 30053 -m mark --mark 0x84000/0x84000 -j RETURN; \
             iptables -t mangle -A PREROUTING -p udp --dport 53 -d 10.96.0.10 -m mark --mark 0x4000/0x4000 -j RETURN",
        )
        .expect("counting rules");
        Self {
            node,
            client,
            pod,
            bpffs: Bpffs::mount(),
        }
    }

    /// The agent's `--bpffs-root`.
    pub fn root(&self) -> PathBuf {
        self.bpffs.root()
    }

    /// Sends `n` UDP datagrams from the client to the node's ETP=Local NodePort (R2u + R3u,
    /// marked 0x84000) and from the pod to kube-dns' ClusterIP (R1a, marked 0x4000).
    pub fn send(&self, n: usize) {
        self.client
            .enter(|| {
                let socket = UdpSocket::bind("192.168.0.12:0").expect("bind");
                for _ in 0..n {
                    socket.send_to(b"x", "192.168.0.11:30053").expect("send");
                }
            })
            .expect("enter namespace");
        self.pod
            .enter(|| {
                let socket = UdpSocket::bind("10.16.0.5:0").expect("bind");
                for _ in 0..n {
                    socket.send_to(b"x", "10.96.0.10:53").expect("send");
                }
            })
            .expect("enter namespace");
        std::thread::sleep(Duration::from_millis(100));
    }

    /// (NodePort marked 0x84000, ClusterIP marked 0x4000) as counted by netfilter.
    pub fn marked(&self) -> (u64, u64) {
        let listing = self
            .node
            .sh("iptables -t mangle -nvxL PREROUTING")
            .expect("shell in namespace");
        let count = |needle: &str| -> u64 {
            listing
                .lines()
                .find(|l| l.contains(needle))
                .and_then(|l| l.split_whitespace().next())
                .and_then(|n| n.parse().ok())
                .unwrap_or_else(|| panic!("no rule {needle:?} in\n{listing}"))
        };
        (count("dpt:30053"), count("dpt:53"))
    }
}
