//! The cluster every mode of one scale step shares: the e2e fixture, two Services whose
//! backends the benchmark serves itself, and `entries` padding Services, Subnets and Nodes that
//! no benchmark packet matches — so every lookup (ipset or BPF map) walks filled sets, as on a
//! large cluster. Also: reading the state back from each node, and the baseline node's guard.

use std::{
    collections::BTreeSet,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::Path,
    process::Command,
};

use anyhow::{Context as _, Result, bail, ensure};

use crate::node::{
    Cluster, Family, IptablesBackend, KubeProxyMode, L4,
    cluster::{Cidr, DEFAULT_VPC, Node as ClusterNode, Service, ServicePort, Subnet},
    exec,
    kube_proxy::{GUARD_MIRROR_CHAIN, IPVS_EMULATION_CHAIN},
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
/// The benchmark Services are dual-stack: their IPv6 ClusterIPs and backend.
pub const TCP_CLUSTER_IP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0x96, 0, 0, 0, 0, 0x40);
pub const UDP_CLUSTER_IP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0x96, 0, 0, 0, 0, 0x41);
pub const BACKEND6: Ipv6Addr = addr::BACKEND_V6;

/// Padding ranges, all outside every prefix a benchmark packet uses: ClusterIPs inside the
/// Service CIDR but above the fixture's, Subnets in 20.0.0.0/7 (/24 each), other nodes in
/// 22.0.0.0/8, padding endpoints (kube-proxy iptables/nftables variants) in 23.0.0.0/8, and the
/// Subnets of many prefix lengths from 32.0.0.0 up (at most 32.0.0.0/3 at 100 000 entries).
const PAD_CLUSTER_IP_BASE: Ipv4Addr = Ipv4Addr::new(10, 100, 0, 0);
const PAD_SUBNET_BASE: Ipv4Addr = Ipv4Addr::new(20, 0, 0, 0);
const PAD_NODE_BASE: Ipv4Addr = Ipv4Addr::new(22, 0, 0, 0);
const PAD_ENDPOINT_BASE: Ipv4Addr = Ipv4Addr::new(23, 0, 0, 0);
const PAD_PREFIX_BASE: Ipv4Addr = Ipv4Addr::new(32, 0, 0, 0);
/// IPv6 padding (dual-stack variant): ClusterIPs in the Service CIDR `fd00:10:96::/112` from
/// `::100` (so at most [`MAX_IPV6_ENTRIES`]), one /64 per Subnet under `fd20::/16`, other nodes
/// in `fd22::/64` (from `::1`) with the padding endpoints of the kube-proxy iptables/nftables
/// variants after them (from `fd22::1:0:0`).
const PAD_CLUSTER_IP6_BASE: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0x96, 0, 0, 0, 0, 0x100);
const PAD_SUBNET6_BASE: Ipv6Addr = Ipv6Addr::new(0xfd20, 0, 0, 0, 0, 0, 0, 0);
const PAD_NODE6_BASE: Ipv6Addr = Ipv6Addr::new(0xfd22, 0, 0, 0, 0, 0, 0, 0);
/// The IPv6 Service CIDR (a /112) holds this many padding ClusterIPs above the fixture's.
pub const MAX_IPV6_ENTRIES: usize = 0xffff - 0x100;

/// The longest prefix of the many-lengths padding: with `n` lengths the Subnets are /(33 − n)
/// … /32, in turn.
const LONGEST_PREFIX: u8 = 32;
/// Most distinct padding prefix lengths: /17 … /32 (wider blocks would not fit 100 000 Subnets
/// into IPv4).
pub const MAX_PREFIX_LENGTHS: u8 = 16;

/// What a run measures besides the hooks: kube-proxy's mode, the iptables backend of every
/// rule on the node, and how many distinct prefix lengths the padding Subnets have. The default
/// is the variant of the cited runs: IPVS, the system's iptables (nft), all padding /24.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Variant {
    pub kube_proxy: KubeProxyMode,
    pub backend: IptablesBackend,
    /// 1: every padding Subnet is a /24; n > 1: /(33 − n) … /32 in turn.
    pub prefix_lengths: u8,
    /// The padding is dual-stack (set when an IPv6 workload runs): every padding Service,
    /// Subnet and Node has an IPv6 address too, so the IPv6 lookups walk filled sets as well.
    pub ipv6: bool,
}

impl Default for Variant {
    fn default() -> Self {
        Self {
            kube_proxy: KubeProxyMode::Ipvs,
            backend: IptablesBackend::System,
            prefix_lengths: 1,
            ipv6: false,
        }
    }
}

impl Variant {
    /// A short name for file names and headings: `default`, or the non-default parts joined by
    /// `+` (`kp-nftables+legacy+prefixes-16`).
    pub fn id(self) -> String {
        let mut parts = Vec::new();
        if self.kube_proxy != KubeProxyMode::Ipvs {
            parts.push(format!("kp-{}", self.kube_proxy.flag()));
        }
        if self.backend == IptablesBackend::Legacy {
            parts.push("legacy".to_owned());
        }
        if self.prefix_lengths > 1 {
            parts.push(format!("prefixes-{}", self.prefix_lengths));
        }
        if self.ipv6 {
            parts.push("ipv6".to_owned());
        }
        if parts.is_empty() {
            "default".to_owned()
        } else {
            parts.join("+")
        }
    }

    /// Whether kube-proxy's mode is IPVS (kube-proxy's sets exist; Kube-OVN installs R1a–R3u).
    pub fn ipvs(self) -> bool {
        self.kube_proxy == KubeProxyMode::Ipvs
    }
}

/// The agent's file source rejects larger files unless told otherwise
/// (`FileOptions::max_bytes`, `kube-ovn-agent/src/source/file.rs`).
pub const AGENT_FILE_LIMIT: usize = 8 * 1024 * 1024;

fn offset(base: Ipv4Addr, n: usize) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(base) + u32::try_from(n).expect("padding fits in IPv4"))
}

fn bench_service(
    name: &str,
    ip: Ipv4Addr,
    ip6: Ipv6Addr,
    proto: L4,
    port: u16,
    node_port: u16,
) -> Service {
    Service {
        namespace: "kovn-bench",
        name: name.into(),
        node_port_local: Some(true),
        cluster_ips: vec![IpAddr::V4(ip), IpAddr::V6(ip6)],
        ports: vec![ServicePort {
            name: "bench",
            proto,
            port,
            target_port: port,
            node_port: Some(node_port),
        }],
        endpoints: vec![IpAddr::V4(BACKEND), IpAddr::V6(BACKEND6)],
        own_backend: true,
    }
}

/// The `i`-th padding Subnet: a /24 in 20.0.0.0/7, or with `lengths` > 1 the blocks of
/// [`prefix_blocks`].
fn padding_subnet(i: usize, block: Option<Cidr>) -> Subnet {
    Subnet {
        name: format!("pad-{i}"),
        cidr_block: vec![block.unwrap_or(Cidr {
            addr: IpAddr::V4(offset(PAD_SUBNET_BASE, i * 256)),
            len: 24,
        })],
        vpc: DEFAULT_VPC.into(),
        protocol: "IPv4",
        gateway_type: "distributed",
        nat_outgoing: true,
        vlan: "",
        logical_gateway: false,
        u2o_interconnection: false,
    }
}

/// `entries` disjoint IPv4 blocks from 32.0.0.0 up, of `lengths` distinct prefix lengths
/// (/(33 − lengths) … /32, the `i`-th block /(33 − lengths + i mod lengths)): each block starts at
/// the next multiple of its size, so none overlaps another.
pub fn prefix_blocks(entries: usize, lengths: u8) -> Vec<Cidr> {
    assert!((1..=MAX_PREFIX_LENGTHS).contains(&lengths));
    let shortest = LONGEST_PREFIX + 1 - lengths;
    let mut next = u64::from(u32::from(PAD_PREFIX_BASE));
    (0..entries)
        .map(|i| {
            let len = shortest + u8::try_from(i % usize::from(lengths)).expect("< 16");
            let size = 1u64 << (32 - u32::from(len));
            let start = next.div_ceil(size) * size;
            next = start + size;
            let addr = u32::try_from(start).expect("padding blocks fit in IPv4");
            Cidr {
                addr: IpAddr::V4(Ipv4Addr::from(addr)),
                len,
            }
        })
        .collect()
}

fn offset6(base: Ipv6Addr, n: u128) -> Ipv6Addr {
    Ipv6Addr::from(u128::from(base) + n)
}

/// The padding only (no fixture), `entries` of each kind.
fn padding(entries: usize, variant: Variant) -> (Vec<Service>, Vec<Subnet>, Vec<ClusterNode>) {
    let (mut services, mut subnets, mut nodes) = padding4(entries, variant);
    if variant.ipv6 {
        assert!(
            entries <= MAX_IPV6_ENTRIES,
            "IPv6 padding beyond the Service CIDR"
        );
        for (i, ((service, subnet), node)) in services
            .iter_mut()
            .zip(&mut subnets)
            .zip(&mut nodes)
            .enumerate()
        {
            let i = i as u128;
            service
                .cluster_ips
                .push(IpAddr::V6(offset6(PAD_CLUSTER_IP6_BASE, i)));
            if !service.endpoints.is_empty() {
                service
                    .endpoints
                    .push(IpAddr::V6(offset6(PAD_NODE6_BASE, (1 << 32) + i + 1)));
            }
            subnet.cidr_block.push(Cidr {
                addr: IpAddr::V6(offset6(PAD_SUBNET6_BASE, i << 64)),
                len: 64,
            });
            subnet.protocol = "Dual";
            node.internal_ips
                .push(IpAddr::V6(offset6(PAD_NODE6_BASE, i + 1)));
        }
    }
    (services, subnets, nodes)
}

/// The IPv4 padding, `entries` of each kind.
fn padding4(entries: usize, variant: Variant) -> (Vec<Service>, Vec<Subnet>, Vec<ClusterNode>) {
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
            // IPVS: no endpoints. kube-proxy's sets still list the ClusterIP port (as for any
            // Service), but the IPVS emulation gets no DNAT rule for it, so its chain stays as
            // short as the fixture's (real IPVS looks virtual servers up in a hash, not a rule
            // list). iptables and nftables modes: one endpoint each (never contacted), so
            // kube-proxy holds a rule (iptables) or map element (nftables) and chains per
            // Service, as on a cluster whose Services have endpoints.
            endpoints: if variant.ipvs() {
                Vec::new()
            } else {
                vec![IpAddr::V4(offset(PAD_ENDPOINT_BASE, i + 1))]
            },
            // Nothing serves the padding endpoints: no packet goes there.
            own_backend: true,
        })
        .collect();
    let blocks =
        (variant.prefix_lengths > 1).then(|| prefix_blocks(entries, variant.prefix_lengths));
    let subnets = (0..entries)
        .map(|i| padding_subnet(i, blocks.as_ref().map(|b| b[i])))
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
        TCP_CLUSTER_IP6,
        L4::Tcp,
        TCP_PORT,
        TCP_NODE_PORT,
    ));
    cluster.services.push(bench_service(
        "bench-udp",
        UDP_CLUSTER_IP,
        UDP_CLUSTER_IP6,
        L4::Udp,
        UDP_PORT,
        UDP_NODE_PORT,
    ));
    cluster
}

/// The cluster of one scale step: [`base_cluster`] plus `entries` padding objects of each kind.
/// kube-proxy's iptables mode walks `KUBE-SERVICES` rule by rule in the order the Services come,
/// so there the benchmark's Services sit in the middle of the padding — where a Service lands on
/// average in kube-proxy's (map-ordered) rules — not first.
pub fn cluster(entries: usize, variant: Variant) -> Cluster {
    let mut cluster = base_cluster();
    let (services, subnets, nodes) = padding(entries, variant);
    if variant.ipvs() {
        cluster.services.extend(services);
    } else {
        let fixture = cluster.services.len() - 2;
        let bench = cluster.services.split_off(fixture);
        let mut services = services;
        let rest = services.split_off(entries / 2);
        cluster.services.extend(services);
        cluster.services.extend(bench);
        cluster.services.extend(rest);
    }
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

/// The distinct prefix lengths of a `hash:net` set's members in the node namespace (`ipset list`
/// prints a host entry without its `/32`).
pub fn ipset_prefix_lengths(ns: &NetNs, set: &str) -> Result<BTreeSet<u8>> {
    let out = ns.run("ipset", &["list", set])?;
    parse_prefix_lengths(&out).with_context(|| format!("ipset list {set}"))
}

fn parse_prefix_lengths(listing: &str) -> Result<BTreeSet<u8>> {
    let members = listing
        .split_once("Members:")
        .context("no Members: line")?
        .1;
    members
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(|member| {
            let net = member.split_whitespace().next().unwrap_or(member);
            match net.split_once('/') {
                Some((_, len)) => len.parse().with_context(|| format!("member {member:?}")),
                None => Ok(if net.contains(':') { 128 } else { 32 }),
            }
        })
        .collect()
}

/// Service ports kube-proxy serves by DNAT in the node namespace: rules in nat `KUBE-SERVICES`
/// that jump to a Service (iptables mode), elements of the `service-ips` verdict map (nftables
/// mode), DNAT rules of the emulated virtual servers (IPVS mode: endpoint-less Services have
/// none).
pub fn kube_proxy_services(ns: &NetNs, mode: KubeProxyMode) -> Result<usize> {
    Ok(match mode {
        KubeProxyMode::Ipvs => ns
            .run(
                Family::V4.iptables(),
                &["-t", "nat", "-S", IPVS_EMULATION_CHAIN],
            )?
            .lines()
            .filter(|l| l.contains("-j DNAT"))
            .count(),
        KubeProxyMode::Iptables => ns
            .run(Family::V4.iptables(), &["-t", "nat", "-S", "KUBE-SERVICES"])?
            .lines()
            .filter(|l| l.contains("-j KUBE-SEP-"))
            .count(),
        KubeProxyMode::Nftables => {
            let out = ns.run(
                "nft",
                &["-j", "list", "map", "ip", "kube-proxy", "service-ips"],
            )?;
            nft_map_elements(&out)?
        }
    })
}

fn nft_map_elements(json: &str) -> Result<usize> {
    let v: serde_json::Value = serde_json::from_str(json).context("parsing nft -j")?;
    v["nftables"]
        .as_array()
        .and_then(|items| items.iter().find_map(|i| i["map"]["elem"].as_array()))
        .map_or(Ok(0), |elements| Ok(elements.len()))
}

/// The netfilter tables of the node namespace, per backend: `x_tables` (`iptables-legacy`) list
/// theirs in `/proc/net/ip_tables_names` once instantiated; iptables-nft's are nftables tables of
/// family `ip` named like them. Read without touching either (listing with `iptables-legacy`
/// would instantiate the table it lists).
pub struct Tables {
    pub legacy: Vec<String>,
    pub nft: Vec<String>,
}

impl Tables {
    pub fn json(&self) -> serde_json::Value {
        serde_json::json!({ "legacy": self.legacy, "nftables": self.nft })
    }
}

pub fn iptables_tables(ns: &NetNs) -> Result<Tables> {
    let legacy = ns.enter(|| {
        std::fs::read_to_string("/proc/thread-self/net/ip_tables_names").unwrap_or_default()
    })?;
    let nft = ns.run("nft", &["list", "tables"])?;
    Ok(Tables {
        legacy: legacy.lines().map(str::to_owned).collect(),
        nft: nft
            .lines()
            .filter_map(|l| l.strip_prefix("table "))
            .map(str::to_owned)
            .collect(),
    })
}

/// The node's nat table is in `backend` and not in the other one.
pub fn check_backend(tables: &Tables, backend: IptablesBackend) -> Result<()> {
    let legacy_nat = tables.legacy.iter().any(|t| t == "nat");
    let nft_nat = tables.nft.iter().any(|t| t == "ip nat");
    match backend {
        IptablesBackend::Legacy => ensure!(
            legacy_nat && !nft_nat,
            "iptables-legacy asked for, but the nat table is in {}",
            if nft_nat {
                "nftables (iptables-nft)"
            } else {
                "neither backend"
            }
        ),
        IptablesBackend::System => ensure!(
            nft_nat && !legacy_nat,
            "iptables-nft asked for, but the nat table is in {}",
            if legacy_nat {
                "x_tables (iptables-legacy)"
            } else {
                "neither backend"
            }
        ),
    }
    Ok(())
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

#[cfg(test)]
mod tests {
    use super::*;

    fn v4(c: &Cidr) -> (u32, u32) {
        let IpAddr::V4(a) = c.addr else {
            panic!("IPv4 padding")
        };
        let start = u32::from(a);
        (
            start,
            start + u32::MAX.checked_shr(u32::from(c.len)).unwrap_or(0),
        )
    }

    #[test]
    fn prefix_blocks_have_the_lengths_asked_for_and_never_overlap() {
        for lengths in [2, 8, MAX_PREFIX_LENGTHS] {
            let blocks = prefix_blocks(1000, lengths);
            let distinct: BTreeSet<u8> = blocks.iter().map(|c| c.len).collect();
            assert_eq!(distinct.len(), usize::from(lengths));
            assert_eq!(*distinct.last().unwrap(), 32);
            let mut ranges: Vec<(u32, u32)> = blocks.iter().map(v4).collect();
            for (c, (start, _)) in blocks.iter().zip(&ranges) {
                let size = 1u64 << (32 - u32::from(c.len));
                assert_eq!(u64::from(*start) % size, 0, "{c} is not aligned");
            }
            ranges.sort_unstable();
            for pair in ranges.windows(2) {
                assert!(pair[0].1 < pair[1].0, "{pair:?} overlap");
            }
            // Clear of every range a benchmark packet or another padding kind uses.
            assert!(ranges[0].0 >= u32::from(PAD_PREFIX_BASE));
        }
        // 100 000 Subnets of 16 lengths still fit below 64.0.0.0.
        let last = *prefix_blocks(100_000, MAX_PREFIX_LENGTHS).last().unwrap();
        assert!(v4(&last).1 < u32::from(Ipv4Addr::new(64, 0, 0, 0)));
    }

    #[test]
    fn the_cluster_carries_the_variant() {
        let default = cluster(100, Variant::default());
        let lengths = |c: &Cluster| -> BTreeSet<u8> {
            c.ovn_sets(Family::V4)
                .subnets
                .iter()
                .map(|s| s.len)
                .collect()
        };
        let many = Variant {
            prefix_lengths: 16,
            ..Variant::default()
        };
        assert!(lengths(&default).len() < 4, "{:?}", lengths(&default));
        assert!(lengths(&cluster(100, many)).len() >= 16);
        assert_eq!(many.id(), "prefixes-16");
        assert_eq!(Variant::default().id(), "default");

        // IPVS: endpoint-less padding, the benchmark's Services before it.
        let names =
            |c: &Cluster| -> Vec<String> { c.services.iter().map(|s| s.name.clone()).collect() };
        assert!(
            default
                .services
                .iter()
                .filter(|s| s.namespace == "kovn-pad")
                .all(|s| s.endpoints.is_empty())
        );
        // iptables mode: every padding Service has an endpoint, the benchmark's sit mid-way.
        let iptables = Variant {
            kube_proxy: KubeProxyMode::Iptables,
            backend: IptablesBackend::Legacy,
            ..Variant::default()
        };
        assert_eq!(iptables.id(), "kp-iptables+legacy");
        let c = cluster(100, iptables);
        assert!(
            c.services
                .iter()
                .all(|s| !s.endpoints.is_empty() || s.namespace != "kovn-pad")
        );
        let n = names(&c);
        let bench = n.iter().position(|s| s == "bench-tcp").unwrap();
        let pads = n.iter().filter(|s| s.starts_with("pad-")).count();
        let pads_before = n[..bench].iter().filter(|s| s.starts_with("pad-")).count();
        assert_eq!((pads, pads_before), (100, 50));
        assert_eq!(n.len(), names(&default).len());
    }

    #[test]
    fn prefix_lengths_are_read_from_an_ipset_listing() {
        let listing = "Name: ovn40subnets\nType: hash:net\nHeader: family inet hashsize 1024 \
                       maxelem 1048576\nNumber of entries: 4\nMembers:\n10.16.0.0/16\n\
                       32.0.0.0/17\n32.0.128.5\n32.1.0.0/17\n";
        assert_eq!(
            parse_prefix_lengths(listing).unwrap(),
            BTreeSet::from([16, 17, 32])
        );
        assert!(parse_prefix_lengths("Name: x\n").is_err());
        assert!(parse_prefix_lengths("Members:\n1.2.3.0/x\n").is_err());
    }

    #[test]
    fn nft_map_elements_counts_the_maps_elements() {
        let json = r#"{"nftables": [{"metainfo": {"version": "1.0.6"}}, {"map": {"family": "ip",
            "name": "service-ips", "table": "kube-proxy", "elem": [[{"concat": []},
            {"goto": {"target": "a"}}], [{"concat": []}, {"goto": {"target": "b"}}]]}}]}"#;
        assert_eq!(nft_map_elements(json).unwrap(), 2);
        let empty = r#"{"nftables": [{"map": {"name": "service-ips"}}]}"#;
        assert_eq!(nft_map_elements(empty).unwrap(), 0);
    }

    #[test]
    fn a_nat_table_in_the_other_backend_fails_the_check() {
        let tables = |legacy: &[&str], nft: &[&str]| Tables {
            legacy: legacy.iter().map(ToString::to_string).collect(),
            nft: nft.iter().map(ToString::to_string).collect(),
        };
        let nft = tables(&[], &["ip nat", "ip filter", "ip kube-proxy"]);
        let legacy = tables(&["filter", "nat"], &["ip kube-proxy"]);
        assert!(check_backend(&nft, IptablesBackend::System).is_ok());
        assert!(check_backend(&nft, IptablesBackend::Legacy).is_err());
        assert!(check_backend(&legacy, IptablesBackend::Legacy).is_ok());
        assert!(check_backend(&legacy, IptablesBackend::System).is_err());
        assert!(check_backend(&tables(&["nat"], &["ip nat"]), IptablesBackend::System).is_err());
    }
}
