//! The cluster every mode of one scale step shares: the e2e fixture, two Services whose
//! backends the benchmark serves itself, and `entries` padding Services, Subnets and Nodes that
//! no benchmark packet matches — so every lookup (ipset or BPF map) walks filled sets, as on a
//! large cluster. Also: reading the state back from each node, and the baseline node's guard.

use std::{
    net::{IpAddr, Ipv4Addr},
    path::Path,
    process::Command,
};

use anyhow::{Context as _, Result, bail, ensure};

use crate::node::{
    Cluster, Family, L4,
    cluster::{Cidr, DEFAULT_VPC, Node as ClusterNode, Service, ServicePort, Subnet},
    exec,
    kube_proxy::GUARD_MIRROR_CHAIN,
    netns::NetNs,
    topology::addr,
};

/// The benchmark's TCP Service: ClusterIP, port, NodePort (`externalTrafficPolicy: Local`).
pub const TCP_CLUSTER_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 40);
pub const TCP_PORT: u16 = 8080;
pub const TCP_NODE_PORT: u16 = 30090;
/// The benchmark's UDP Service.
pub const UDP_CLUSTER_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 41);
pub const UDP_PORT: u16 = 9000;
pub const UDP_NODE_PORT: u16 = 30091;
/// Where both Services' endpoints live (the fixture's backend pod, distributed subnet).
pub const BACKEND: Ipv4Addr = addr::BACKEND_V4;

/// Padding ranges, all outside every prefix a benchmark packet uses: ClusterIPs inside the
/// Service CIDR but above the fixture's, Subnets in 20.0.0.0/7 (/24 each), other nodes in
/// 22.0.0.0/8.
const PAD_CLUSTER_IP_BASE: Ipv4Addr = Ipv4Addr::new(10, 100, 0, 0);
const PAD_SUBNET_BASE: Ipv4Addr = Ipv4Addr::new(20, 0, 0, 0);
const PAD_NODE_BASE: Ipv4Addr = Ipv4Addr::new(22, 0, 0, 0);

/// The agent's file source rejects larger files unless told otherwise
/// (`FileOptions::max_bytes`, `kube-ovn-agent/src/source/file.rs`).
pub const AGENT_FILE_LIMIT: usize = 8 * 1024 * 1024;

fn offset(base: Ipv4Addr, n: usize) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(base) + u32::try_from(n).expect("padding fits in IPv4"))
}

fn bench_service(name: &str, ip: Ipv4Addr, proto: L4, port: u16, node_port: u16) -> Service {
    Service {
        namespace: "kovn-bench",
        name: name.into(),
        node_port_local: Some(true),
        cluster_ips: vec![IpAddr::V4(ip)],
        ports: vec![ServicePort {
            name: "bench",
            proto,
            port,
            target_port: port,
            node_port: Some(node_port),
        }],
        endpoints: vec![IpAddr::V4(BACKEND)],
        own_backend: true,
    }
}

/// The padding only (no fixture), `entries` of each kind.
fn padding(entries: usize) -> (Vec<Service>, Vec<Subnet>, Vec<ClusterNode>) {
    let services = (0..entries)
        .map(|i| Service {
            namespace: "kovn-pad",
            name: format!("pad-{i}"),
            node_port_local: None,
            cluster_ips: vec![IpAddr::V4(offset(PAD_CLUSTER_IP_BASE, i))],
            ports: vec![ServicePort {
                name: "http",
                proto: L4::Tcp,
                port: 80,
                target_port: 80,
                node_port: None,
            }],
            // No endpoints: kube-proxy's sets still list the ClusterIP port (as for any Service),
            // but the IPVS emulation gets no DNAT rule for it, so its chain stays as short as the
            // fixture's (real IPVS looks virtual servers up in a hash, not a rule list).
            endpoints: Vec::new(),
            own_backend: false,
        })
        .collect();
    let subnets = (0..entries)
        .map(|i| Subnet {
            name: format!("pad-{i}"),
            cidr_block: vec![Cidr {
                addr: IpAddr::V4(offset(PAD_SUBNET_BASE, i * 256)),
                len: 24,
            }],
            vpc: DEFAULT_VPC.into(),
            protocol: "IPv4",
            gateway_type: "distributed",
            nat_outgoing: true,
            vlan: "",
            logical_gateway: false,
            u2o_interconnection: false,
        })
        .collect();
    let nodes = (0..entries)
        .map(|i| ClusterNode {
            name: format!("pad-{i}"),
            internal_ips: vec![IpAddr::V4(offset(PAD_NODE_BASE, i + 1))],
        })
        .collect();
    (services, subnets, nodes)
}

/// The fixture plus the benchmark's Services and no padding.
pub fn base_cluster() -> Cluster {
    let mut cluster = Cluster::fixture();
    cluster.services.push(bench_service(
        "bench-tcp",
        TCP_CLUSTER_IP,
        L4::Tcp,
        TCP_PORT,
        TCP_NODE_PORT,
    ));
    cluster.services.push(bench_service(
        "bench-udp",
        UDP_CLUSTER_IP,
        L4::Udp,
        UDP_PORT,
        UDP_NODE_PORT,
    ));
    cluster
}

/// The cluster of one scale step: [`base_cluster`] plus `entries` padding objects of each kind.
pub fn cluster(entries: usize) -> Cluster {
    let mut cluster = base_cluster();
    let (services, subnets, nodes) = padding(entries);
    cluster.services.extend(services);
    cluster.subnets.extend(subnets);
    cluster.nodes.extend(nodes);
    cluster
}

/// Number of elements in a pinned map (`bpftool --json map dump`: one array element each).
pub fn map_entries(bpffs: &Path, map: &str) -> Result<usize> {
    let path = bpffs.join("maps").join(map);
    let out = exec::run_bounded(
        Command::new("bpftool")
            .args(["--json", "map", "dump", "pinned"])
            .arg(&path),
        None,
        std::time::Duration::from_mins(2),
    )?;
    ensure!(
        out.status.success(),
        "bpftool map dump {}: {}",
        path.display(),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    let dump: serde_json::Value = serde_json::from_slice(&out.stdout)
        .with_context(|| format!("parsing bpftool's dump of {}", path.display()))?;
    dump.as_array()
        .map(Vec::len)
        .with_context(|| format!("bpftool's dump of {} is not a list", path.display()))
}

/// Members of an ipset in the node namespace (`ipset list -t` header).
pub fn ipset_entries(ns: &NetNs, set: &str) -> Result<usize> {
    let out = ns.run("ipset", &["list", "-t", set])?;
    out.lines()
        .find_map(|l| l.strip_prefix("Number of entries: "))
        .and_then(|n| n.trim().parse().ok())
        .with_context(|| format!("no entry count for ipset {set}"))
}

/// In the baseline node, Kube-OVN's IPVS-mode guard (its FORWARD mirror, where connections
/// meet it after DNAT) returns instead of rejecting. With no PREROUTING logic at all, the real
/// guard refuses every pod → ClusterIP connection, so a baseline that keeps it measures
/// refusals, not the datapath. The rule is still evaluated, so its cost stays in the baseline.
pub fn neutralise_guard(node: &NetNs) -> Result<()> {
    for family in Family::ALL {
        let ipt = family.iptables();
        let rules = node.run(ipt, &["-S", GUARD_MIRROR_CHAIN])?;
        let mut replaced = 0;
        for (index, rule) in rules.lines().filter(|l| l.starts_with("-A ")).enumerate() {
            let Some((matches, _)) = rule.split_once(" -j REJECT") else {
                continue;
            };
            let matches = matches
                .strip_prefix(&format!("-A {GUARD_MIRROR_CHAIN} "))
                .context("guard rule in another chain")?;
            let position = (index + 1).to_string();
            let mut args = vec!["-R", GUARD_MIRROR_CHAIN, &position];
            args.extend(matches.split_whitespace());
            args.extend(["-j", "RETURN"]);
            node.run(ipt, &args)?;
            replaced += 1;
        }
        if replaced == 0 {
            bail!("{ipt}: no REJECT rule in {GUARD_MIRROR_CHAIN} (is kube-proxy in IPVS mode?)");
        }
    }
    Ok(())
}
