//! A minimal kube-proxy: the parts Kube-OVN's marks interact with, in each of its modes.
//!
//! **IPVS mode is emulated.** The kernels this runs on are built without `CONFIG_IP_VS`, so there
//! are no virtual servers. What the spec relies on is kept:
//! - kube-proxy's sets (`KUBE[-6]-CLUSTER-IP`, `KUBE[-6]-NODE-PORT-LOCAL-{TCP,UDP}`, …) exist and
//!   hold what kube-proxy would put there — Kube-OVN switches to R1a/R2/R3 and the REJECT guard
//!   because they exist;
//! - every ClusterIP is a local address on `kube-ipvs0` (a veth pair left down, since the kernel
//!   has no dummy driver either; local routes exist for addresses on a down link), so `addrtype
//!   LOCAL` sees them and traffic to a ClusterIP port no Service lists goes to filter `INPUT`,
//!   where Kube-OVN's guard rejects it;
//! - `KUBE-SERVICES` (jumped to from nat `PREROUTING` with the comment Kube-OVN looks for) ends
//!   nat traversal for Service traffic, as its `ACCEPT` on `KUBE-CLUSTER-IP` does: here the
//!   virtual servers are DNAT rules in the chain `KOVN-E2E-IPVS`. A rule that runs after
//!   `KUBE-SERVICES` still never sees the packet — the ordering fight of spec §3 is real here.
//!
//! One difference is compensated: real IPVS forwards only after filter `INPUT`, so Kube-OVN's
//! guard also rejects an *unmarked* connection to a listed ClusterIP port; with DNAT in
//! PREROUTING that packet goes through `FORWARD` instead. [`input_guard_mirror`] is the same
//! guard placed in `FORWARD`, matching the original destination; Kube-OVN's installer adds it
//! next to the real guard.
//!
//! **iptables mode** is kube-proxy's own shape: per-Service DNAT chains, `KUBE-NODEPORTS` last,
//! `KUBE-MARK-MASQ` for `externalTrafficPolicy: Cluster` node ports. kube-proxy runs without
//! `--cluster-cidr` here, so it does not mark pod → ClusterIP traffic itself: Kube-OVN's R1b is
//! what makes it masquerade.
//!
//! **nftables mode** is kube-proxy's `kube-proxy` table per family (Kubernetes v1.33,
//! `pkg/proxy/nftables/proxier.go`): base chains at `dstnat`/`srcnat`, one verdict-map lookup
//! (`service-ips`: address . protocol . port → the Service's chain) instead of a rule per
//! Service, `service-nodeports` for local destinations, per-Service and per-endpoint chains, the
//! `mark-for-masquerade`/`masquerading` pair on 0x4000 and the `cluster-ips` reject check in
//! `filter-forward`. Kube-OVN's nat rules stay in iptables. Of two nat base chains at the same
//! priority (`dstnat`) netfilter runs the one registered last first, and skips the rest once one
//! has bound a DNAT: kube-proxy's table is created before iptables' nat table exists
//! ([`install_nftables`]), so Kube-OVN's R1b sees the ClusterIP before kube-proxy rewrites it, as
//! the spec's mode B needs. The traffic benchmark fails if R1b then counts no packet.
//!
//! The iptables and IPVS modes masquerade 0x4000 in `KUBE-POSTROUTING` and accept it in
//! `KUBE-FORWARD`.

use std::{fmt::Write as _, net::IpAddr, time::Duration};

use anyhow::{Context as _, Result};

use super::{Family, KubeProxyMode, L4, cluster::Cluster, exec, netns::NetNs};

/// The emulated IPVS virtual servers.
pub const IPVS_EMULATION_CHAIN: &str = "KOVN-E2E-IPVS";
/// The emulated "filter INPUT runs before IPVS" guard in `FORWARD`.
pub const GUARD_MIRROR_CHAIN: &str = "KOVN-E2E-IPVS-GUARD";

/// kube-proxy's jump from nat `PREROUTING` (and `OUTPUT`), as `iptables -S` prints it.
pub const SERVICES_JUMP: &str =
    "-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES";

pub fn install(ns: &NetNs, cluster: &Cluster, mode: KubeProxyMode) -> Result<()> {
    if mode == KubeProxyMode::Ipvs {
        ns.run_stdin("ipset", &["restore"], &ipvs_sets(cluster))
            .context("creating kube-proxy's IPVS-mode ipsets")?;
        kube_ipvs0(ns, cluster)?;
    }
    if mode == KubeProxyMode::Nftables {
        return install_nftables(ns, cluster);
    }
    for family in Family::ALL {
        let script = match mode {
            KubeProxyMode::Ipvs => ipvs_rules(cluster, family),
            KubeProxyMode::Iptables => iptables_rules(cluster, family),
            KubeProxyMode::Nftables => unreachable!("returned above"),
        };
        restore(
            ns,
            family.iptables_restore(),
            &["--noflush"],
            &script,
            cluster,
        )
        .with_context(|| format!("kube-proxy {family} rules"))?;
    }
    Ok(())
}

fn ipvs_sets(cluster: &Cluster) -> String {
    let mut s = String::new();
    for family in Family::ALL {
        let sets = cluster.kube_proxy_sets(family);
        let cluster_ip = family.kube_set("CLUSTER-IP");
        // kube-proxy creates its sets with ipset's defaults (hashsize 1024, maxelem 65536), so a
        // real IPVS node cannot list more than 65 536 ClusterIP ports; benchmarks that go beyond
        // get a larger limit here rather than a failed restore (BENCHMARKS.md notes it).
        let maxelem = sets.cluster_ip.len().next_power_of_two().max(65_536);
        let _ = writeln!(
            s,
            "create {cluster_ip} hash:ip,port family {} hashsize 1024 maxelem {maxelem}",
            family.ipset_family()
        );
        for (ip, proto, port) in &sets.cluster_ip {
            let _ = writeln!(s, "add {cluster_ip} {ip},{}:{port}", proto.name());
        }
        for (id, ports) in [
            ("NODE-PORT-LOCAL-TCP", &sets.node_port_local_tcp),
            ("NODE-PORT-LOCAL-UDP", &sets.node_port_local_udp),
            ("NODE-PORT-TCP", &sets.node_port_tcp),
            ("NODE-PORT-UDP", &sets.node_port_udp),
        ] {
            let name = family.kube_set(id);
            let _ = writeln!(s, "create {name} bitmap:port range 0-65535");
            for port in ports {
                let _ = writeln!(s, "add {name} {port}");
            }
        }
    }
    s
}

/// kube-proxy's dummy link holding every ClusterIP, so they are local addresses.
fn kube_ipvs0(ns: &NetNs, cluster: &Cluster) -> Result<()> {
    let mut batch = String::from("link add kube-ipvs0 type veth peer name kube-ipvs0-p\n");
    let mut addresses = 0u32;
    for service in &cluster.services {
        for ip in &service.cluster_ips {
            addresses += 1;
            let nodad = if ip.is_ipv6() { " nodad" } else { "" };
            let _ = writeln!(
                batch,
                "addr add {} dev kube-ipvs0{nodad}",
                Family::host(*ip)
            );
        }
    }
    // Adding an IPv4 address walks the link's address list, so a large cluster's batch takes
    // minutes, not seconds (benchmarks go to 100 000 ClusterIPs).
    ns.ip_batch_bounded(
        &batch,
        exec::DEFAULT_TIMEOUT + Duration::from_millis(5) * addresses,
    )
    .context("adding the ClusterIPs to kube-ipvs0")
}

fn endpoint(addr: IpAddr, port: u16) -> String {
    match addr {
        IpAddr::V4(a) => format!("{a}:{port}"),
        IpAddr::V6(a) => format!("[{a}]:{port}"),
    }
}

/// Chains and jumps both modes share.
fn common_head(s: &mut String, extra_chains: &[&str]) {
    s.push_str("*nat\n");
    for chain in ["KUBE-SERVICES", "KUBE-POSTROUTING", "KUBE-MARK-MASQ"]
        .iter()
        .chain(extra_chains)
    {
        let _ = writeln!(s, ":{chain} - [0:0]");
    }
    s.push_str(
        "-A KUBE-MARK-MASQ -j MARK --or-mark 0x4000\n\
         -A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN\n\
         -A KUBE-POSTROUTING -j MARK --xor-mark 0x4000\n\
         -A KUBE-POSTROUTING -m comment --comment \"kubernetes service traffic requiring SNAT\" \
         -j MASQUERADE --random-fully\n",
    );
}

fn common_tail(s: &mut String) {
    s.push_str(
        "-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
         -A OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
         -A POSTROUTING -m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING\n\
         COMMIT\n\
         *filter\n\
         :KUBE-FORWARD - [0:0]\n\
         -A KUBE-FORWARD -m comment --comment \"kubernetes forwarding rules\" \
         -m mark --mark 0x4000/0x4000 -j ACCEPT\n\
         -A FORWARD -m comment --comment \"kubernetes forwarding rules\" -j KUBE-FORWARD\n\
         COMMIT\n",
    );
}

fn ipvs_rules(cluster: &Cluster, family: Family) -> String {
    let mut s = String::new();
    common_head(&mut s, &["KUBE-NODE-PORT", IPVS_EMULATION_CHAIN]);
    for proto in [L4::Tcp, L4::Udp] {
        let upper = proto.kube_name();
        let _ = writeln!(
            s,
            "-A KUBE-NODE-PORT -p {p} -m comment --comment \"Kubernetes nodeport {upper} port with \
             externalTrafficPolicy=local\" -m set --match-set {local} dst -j RETURN\n\
             -A KUBE-NODE-PORT -p {p} -m comment --comment \"Kubernetes nodeport {upper} port for \
             masquerade purpose\" -m set --match-set {all} dst -j KUBE-MARK-MASQ",
            p = proto.name(),
            local = family.kube_set(&format!("NODE-PORT-LOCAL-{upper}")),
            all = family.kube_set(&format!("NODE-PORT-{upper}")),
        );
    }
    let _ = writeln!(
        s,
        "-A KUBE-SERVICES -m addrtype --dst-type LOCAL -j KUBE-NODE-PORT\n\
         -A KUBE-SERVICES -m comment --comment \"Kubernetes service cluster ip + port for \
         masquerade purpose\" -m set --match-set {} dst,dst -j {IPVS_EMULATION_CHAIN}\n\
         -A KUBE-SERVICES -m addrtype --dst-type LOCAL -j {IPVS_EMULATION_CHAIN}",
        family.kube_set("CLUSTER-IP")
    );
    for service in &cluster.services {
        let (Some(cluster_ip), Some(backend)) =
            (service.cluster_ip(family), service.endpoint(family))
        else {
            continue;
        };
        for port in &service.ports {
            let to = endpoint(backend, port.target_port);
            let _ = writeln!(
                s,
                "-A {IPVS_EMULATION_CHAIN} -d {} -p {p} -m {p} --dport {} -j DNAT --to-destination {to}",
                Family::host(cluster_ip),
                port.port,
                p = port.proto.name(),
            );
            if let Some(node_port) = port.node_port {
                let _ = writeln!(
                    s,
                    "-A {IPVS_EMULATION_CHAIN} -m addrtype --dst-type LOCAL -p {p} -m {p} --dport \
                     {node_port} -j DNAT --to-destination {to}",
                    p = port.proto.name(),
                );
            }
        }
    }
    common_tail(&mut s);
    s
}

fn iptables_rules(cluster: &Cluster, family: Family) -> String {
    let mut chains = vec!["KUBE-NODEPORTS".to_owned()];
    let mut body = String::new();
    let mut nodeports = String::new();
    for (i, service) in cluster.services.iter().enumerate() {
        let (Some(cluster_ip), Some(backend)) =
            (service.cluster_ip(family), service.endpoint(family))
        else {
            continue;
        };
        for (j, port) in service.ports.iter().enumerate() {
            let p = port.proto.name();
            let chain = format!("KUBE-SEP-E2E{i}X{j}");
            let comment = format!("{}/{}:{}", service.namespace, service.name, port.name);
            let _ = writeln!(
                body,
                "-A KUBE-SERVICES -d {} -p {p} -m comment --comment \"{comment} cluster IP\" \
                 -m {p} --dport {} -j {chain}\n\
                 -A {chain} -p {p} -m comment --comment \"{comment}\" -j DNAT --to-destination {}",
                Family::host(cluster_ip),
                port.port,
                endpoint(backend, port.target_port),
            );
            if let Some(node_port) = port.node_port {
                if service.node_port_local == Some(false) {
                    let _ = writeln!(
                        nodeports,
                        "-A KUBE-NODEPORTS -p {p} -m comment --comment \"{comment}\" -m {p} \
                         --dport {node_port} -j KUBE-MARK-MASQ"
                    );
                }
                let _ = writeln!(
                    nodeports,
                    "-A KUBE-NODEPORTS -p {p} -m comment --comment \"{comment}\" -m {p} \
                     --dport {node_port} -j {chain}"
                );
            }
            chains.push(chain);
        }
    }
    let mut s = String::new();
    let chain_refs: Vec<&str> = chains.iter().map(String::as_str).collect();
    common_head(&mut s, &chain_refs);
    s.push_str(&body);
    s.push_str(&nodeports);
    s.push_str(
        "-A KUBE-SERVICES -m comment --comment \"kubernetes service nodeports; NOTE: this must be \
         the last rule in this chain\" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS\n",
    );
    common_tail(&mut s);
    s
}

/// Kube-OVN's REJECT guard (spec §1.4) restated for the emulated IPVS path: in `FORWARD`, an
/// unmarked new TCP connection whose *original* destination is in the Service CIDR is rejected,
/// as filter `INPUT` would have rejected it before real IPVS forwarded it. `services` is the
/// content of `ovn40services`/`ovn60services`.
pub fn input_guard_mirror(services: &[String]) -> String {
    let mut s = format!(":{GUARD_MIRROR_CHAIN} - [0:0]\n-I FORWARD 1 -j {GUARD_MIRROR_CHAIN}\n");
    for cidr in services {
        let _ = writeln!(
            s,
            "-A {GUARD_MIRROR_CHAIN} -p tcp -m mark ! --mark 0x4000/0x4000 -m conntrack \
             --ctstate NEW --ctorigdst {cidr} -j REJECT"
        );
    }
    s
}

/// The `kube-proxy` tables of both families (nftables mode). The node is built with them before
/// any iptables nat table exists, so iptables' nat chains register later and run first (see the
/// module docs).
fn install_nftables(ns: &NetNs, cluster: &Cluster) -> Result<()> {
    let mut script = String::new();
    for family in Family::ALL {
        script.push_str(&nftables_rules(cluster, family));
    }
    restore(ns, "nft", &["-f", "/dev/stdin"], &script, cluster)
        .context("kube-proxy's nftables tables")?;
    Ok(())
}

/// Feeds `script` to `program` in the namespace, with a deadline that grows with the cluster:
/// a benchmark's 10 000 Services with endpoints are 20 000 chains, which take longer than the
/// default deadline on a loaded machine. Errors quote the script's first lines only.
fn restore(
    ns: &NetNs,
    program: &str,
    args: &[&str],
    script: &str,
    cluster: &Cluster,
) -> Result<()> {
    let timeout = exec::DEFAULT_TIMEOUT
        + Duration::from_millis(5) * cluster.services.len().try_into().unwrap_or(u32::MAX);
    let out = exec::run_bounded(ns.command(program).args(args), Some(script), timeout)?;
    anyhow::ensure!(
        out.status.success(),
        "{program} {}: {}\nscript begins:\n{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim(),
        script.lines().take(20).collect::<Vec<_>>().join("\n")
    );
    Ok(())
}

/// How many elements one `add element` statement carries (keeps each statement small).
const NFT_BATCH: usize = 1000;

/// One family's `kube-proxy` table (nftables mode): everything kube-proxy's nftables proxier
/// puts there for this cluster, with one endpoint per Service.
pub fn nftables_rules(cluster: &Cluster, family: Family) -> String {
    let (table, addr_type, daddr, saddr, loopback) = match family {
        Family::V4 => ("ip", "ipv4_addr", "ip daddr", "ip saddr", "127.0.0.0/8"),
        Family::V6 => ("ip6", "ipv6_addr", "ip6 daddr", "ip6 saddr", "::1"),
    };
    let mut s = format!(
        "table {table} kube-proxy {{\n\
         \tset cluster-ips {{ type {addr_type}; }}\n\
         \tmap service-ips {{ type {addr_type} . inet_proto . inet_service : verdict; }}\n\
         \tmap service-nodeports {{ type inet_proto . inet_service : verdict; }}\n\
         \tchain mark-for-masquerade {{ meta mark set meta mark | 0x4000; }}\n\
         \tchain masquerading {{\n\
         \t\tmeta mark & 0x4000 == 0 return\n\
         \t\tmeta mark set meta mark ^ 0x4000\n\
         \t\tmasquerade fully-random\n\t}}\n\
         \tchain services {{\n\
         \t\t{daddr} . meta l4proto . th dport vmap @service-ips\n\
         \t\tfib daddr type local {daddr} != {loopback} meta l4proto . th dport vmap @service-nodeports\n\t}}\n\
         \tchain cluster-ips-check {{\n\
         \t\t{daddr} @cluster-ips reject comment \"Reject traffic to invalid ports of ClusterIPs\"\n\t}}\n\
         \tchain nat-prerouting {{ type nat hook prerouting priority dstnat; policy accept; jump services; }}\n\
         \tchain nat-output {{ type nat hook output priority -100; policy accept; jump services; }}\n\
         \tchain nat-postrouting {{ type nat hook postrouting priority srcnat; policy accept; jump masquerading; }}\n\
         \tchain filter-forward {{ type filter hook forward priority -110; policy accept; ct state new jump cluster-ips-check; }}\n\
         }}\n"
    );
    let mut ips = Vec::new();
    let mut service_ips = Vec::new();
    let mut node_ports = Vec::new();
    for (i, service) in cluster.services.iter().enumerate() {
        let Some(cluster_ip) = service.cluster_ip(family) else {
            continue;
        };
        ips.push(cluster_ip.to_string());
        let Some(backend) = service.endpoint(family) else {
            continue;
        };
        for (j, port) in service.ports.iter().enumerate() {
            let p = port.proto.name();
            let svc = format!("service-e2e{i}x{j}");
            let ep = format!("endpoint-e2e{i}x{j}");
            let _ = writeln!(
                s,
                "add chain {table} kube-proxy {ep} {{ {saddr} {backend} jump mark-for-masquerade; \
                 meta l4proto {p} dnat to {}; }}\n\
                 add chain {table} kube-proxy {svc} {{ numgen random mod 1 vmap {{ 0 : goto {ep} }}; }}",
                endpoint(backend, port.target_port),
            );
            service_ips.push(format!("{cluster_ip} . {p} . {} : goto {svc}", port.port));
            if let Some(node_port) = port.node_port {
                let ext = format!("external-e2e{i}x{j}");
                let masq = if service.node_port_local == Some(false) {
                    "jump mark-for-masquerade; "
                } else {
                    ""
                };
                let _ = writeln!(
                    s,
                    "add chain {table} kube-proxy {ext} {{ {masq}goto {svc}; }}"
                );
                node_ports.push(format!("{p} . {node_port} : goto {ext}"));
            }
        }
    }
    for (name, elements) in [
        ("cluster-ips", &ips),
        ("service-ips", &service_ips),
        ("service-nodeports", &node_ports),
    ] {
        for chunk in elements.chunks(NFT_BATCH) {
            let _ = writeln!(
                s,
                "add element {table} kube-proxy {name} {{ {} }}",
                chunk.join(", ")
            );
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nftables_mode_has_one_map_element_and_chain_pair_per_service_port() {
        let cluster = Cluster::fixture();
        for family in Family::ALL {
            let script = nftables_rules(&cluster, family);
            let served: usize = cluster
                .services
                .iter()
                .filter(|s| s.cluster_ip(family).is_some() && s.endpoint(family).is_some())
                .map(|s| s.ports.len())
                .sum();
            assert!(served > 0);
            let elements: usize = script
                .lines()
                .filter_map(|l| {
                    l.strip_prefix(&format!(
                        "add element {} kube-proxy service-ips {{ ",
                        if family == Family::V4 { "ip" } else { "ip6" }
                    ))
                })
                .map(|l| l.matches(" : goto service-").count())
                .sum();
            assert_eq!(elements, served, "{script}");
            // A chain is declared before the chain that jumps to it (nft resolves as it reads).
            for (i, line) in script.lines().enumerate() {
                if let Some(target) = line.split("goto endpoint-").nth(1) {
                    let name = format!("endpoint-{}", target.split_whitespace().next().unwrap());
                    let declared = script
                        .lines()
                        .position(|l| l.contains(&format!("kube-proxy {name} {{")))
                        .unwrap_or(usize::MAX);
                    assert!(declared < i, "{name} used before it is declared");
                }
            }
            assert!(script.contains("type nat hook prerouting priority dstnat"));
            assert!(script.contains("masquerade fully-random"));
        }
    }

    #[test]
    fn iptables_mode_has_a_kube_services_rule_per_service_port() {
        let cluster = Cluster::fixture();
        let script = iptables_rules(&cluster, Family::V4);
        let served: usize = cluster
            .services
            .iter()
            .filter(|s| s.cluster_ip(Family::V4).is_some() && s.endpoint(Family::V4).is_some())
            .map(|s| s.ports.len())
            .sum();
        let rules = script
            .lines()
            .filter(|l| l.starts_with("-A KUBE-SERVICES -d ") && l.contains("-j KUBE-SEP-"))
            .count();
        assert_eq!(rules, served);
    }
}
