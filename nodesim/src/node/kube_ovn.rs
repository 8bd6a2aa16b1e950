//! Kube-OVN's side of the node, with the real `ipset` and `iptables`/`ip6tables` (iptables-nft on
//! Debian 12): its ipsets (spec §2), the rules that consume its marks (spec §1.4), and — for the
//! `iptables` hook only — its nat PREROUTING rules (spec §1.1/§1.2) and the three generations of
//! its "keep the jump first" logic (spec §3.1).
//!
//! Like Kube-OVN, the installer decides R1a vs R1b, R2/R3 and the REJECT guard by asking whether
//! kube-proxy's sets exist (`ipset list -n`), not from a flag.

use std::{fmt::Write as _, time::Duration};

use anyhow::{Context as _, Result};

use super::{Family, cluster::Cluster, kube_proxy, netns::NetNs};

/// The jump Kube-OVN keeps in nat `PREROUTING`, as `iptables -S` prints it.
pub const PREROUTING_JUMP: &str =
    "-A PREROUTING -m comment --comment \"kube-ovn prerouting rules\" -j OVN-PREROUTING";
/// [`PREROUTING_JUMP`]'s rule spec after the chain, as `iptables -I/-D` take it.
pub const PREROUTING_JUMP_ARGS: &[&str] = &[
    "-m",
    "comment",
    "--comment",
    "kube-ovn prerouting rules",
    "-j",
    "OVN-PREROUTING",
];

/// felix/ipsets creates every set with this limit.
const MAXELEM: u32 = 1_048_576;

/// Creates `ovn40*`/`ovn60*` with the cluster's contents.
pub fn install_ipsets(ns: &NetNs, cluster: &Cluster) -> Result<()> {
    let mut s = String::new();
    for family in Family::ALL {
        let sets = cluster.ovn_sets(family);
        let hosts: Vec<String> = sets.other_node.iter().map(|a| Family::host(*a)).collect();
        let strings =
            |v: &[super::cluster::Cidr]| v.iter().map(ToString::to_string).collect::<Vec<_>>();
        for (id, kind, members) in [
            ("subnets", "hash:net", strings(&sets.subnets)),
            ("services", "hash:net", strings(&sets.services)),
            ("subnets-nat", "hash:net", strings(&sets.subnets_nat)),
            (
                "subnets-distributed-gw",
                "hash:net",
                strings(&sets.subnets_distributed_gw),
            ),
            ("other-node", "hash:net", hosts),
            // Legacy set no rule reads; always empty (spec §2).
            ("local-pod-ip-nat", "hash:ip", Vec::new()),
            ("subnets-nat-policy", "hash:net", Vec::new()),
        ] {
            let name = family.ovn_set(id);
            let _ = writeln!(
                s,
                "create {name} {kind} family {} maxelem {MAXELEM}",
                family.ipset_family()
            );
            for member in members {
                let _ = writeln!(s, "add {name} {member}");
            }
        }
    }
    ns.run_stdin("ipset", &["restore"], &s)?;
    Ok(())
}

/// The names of the node's ipsets.
fn ipset_names(ns: &NetNs) -> Result<Vec<String>> {
    Ok(ns
        .run("ipset", &["list", "-n"])?
        .lines()
        .map(str::to_owned)
        .collect())
}

/// What Kube-OVN finds on the node that decides its rule set, per family.
struct Facts {
    kube_cluster_ip: bool,
    node_port_local: Vec<(&'static str, String)>,
    node_ip: Option<std::net::IpAddr>,
}

fn facts(ns: &NetNs, cluster: &Cluster, family: Family) -> Result<Facts> {
    let names = ipset_names(ns)?;
    let exists = |set: &str| names.iter().any(|n| n == set);
    let mut node_port_local = Vec::new();
    for proto in ["tcp", "udp"] {
        let set = family.kube_set(&format!("NODE-PORT-LOCAL-{}", proto.to_uppercase()));
        if exists(&set) {
            node_port_local.push((proto, set));
        }
    }
    Ok(Facts {
        kube_cluster_ip: exists(&family.kube_set("CLUSTER-IP")),
        node_port_local,
        node_ip: cluster.local_internal_ip(family),
    })
}

/// `OVN-POSTROUTING` (P1–P11 that apply; no centralized egress IP on this node), `OVN-MASQUERADE`,
/// the empty `OVN-NAT-POLICY`, the filter accept rules, and in IPVS mode the REJECT guard (plus
/// its mirror for the IPVS emulation, see `kube_proxy`). Rule text is Kube-OVN's, with
/// `--random-fully` as iptables 1.8.9 supports it.
pub fn install_consumers(ns: &NetNs, cluster: &Cluster) -> Result<()> {
    for family in Family::ALL {
        let f = facts(ns, cluster, family)?;
        let script = consumer_rules(cluster, family, &f);
        ns.run_stdin(family.iptables_restore(), &["--noflush"], &script)
            .with_context(|| format!("Kube-OVN {family} consumer rules:\n{script}"))?;
    }
    Ok(())
}

fn consumer_rules(cluster: &Cluster, family: Family, f: &Facts) -> String {
    let subnets = family.ovn_set("subnets");
    let services = family.ovn_set("services");
    let mut s = String::from("*filter\n");
    // createIptablesRule inserts each missing filter rule at position 1, so they end up in
    // reverse order with the guard (added last) first.
    let mut filter = Vec::new();
    for chain in ["INPUT", "FORWARD"] {
        for (set, dir) in [
            (&subnets, "src"),
            (&subnets, "dst"),
            (&services, "src"),
            (&services, "dst"),
        ] {
            filter.push(format!("{chain} -m set --match-set {set} {dir} -j ACCEPT"));
        }
    }
    if f.kube_cluster_ip {
        for chain in ["INPUT", "OUTPUT"] {
            filter.push(format!(
                "{chain} -p tcp -m mark ! --mark 0x4000/0x4000 -m set --match-set {services} dst \
                 -m conntrack --ctstate NEW -j REJECT"
            ));
        }
    }
    for rule in &filter {
        let _ = writeln!(s, "-I {}", rule.replacen(' ', " 1 ", 1));
    }
    // IPVS is emulated on these kernels (see `kube_proxy`): the guard needs its FORWARD mirror.
    if f.kube_cluster_ip {
        let cidrs: Vec<String> = cluster
            .ovn_sets(family)
            .services
            .iter()
            .map(ToString::to_string)
            .collect();
        s.push_str(&kube_proxy::input_guard_mirror(&cidrs));
    }
    s.push_str(
        "COMMIT\n*nat\n:OVN-POSTROUTING - [0:0]\n:OVN-MASQUERADE - [0:0]\n:OVN-NAT-POLICY - [0:0]\n\
         -A OVN-MASQUERADE -j MARK --set-xmark 0x0/0xffffffff\n\
         -A OVN-MASQUERADE -j MASQUERADE --random-fully\n",
    );
    for rule in postrouting_rules(family, f.node_ip) {
        let _ = writeln!(s, "-A OVN-POSTROUTING {rule}");
    }
    s.push_str(
        "-I POSTROUTING 1 -m comment --comment \"kube-ovn postrouting rules\" -j OVN-POSTROUTING\n\
         COMMIT\n",
    );
    s
}

/// P1–P11 of spec §1.4, in order (P(c) does not apply: no centralized egress IP on this node).
fn postrouting_rules(family: Family, node_ip: Option<std::net::IpAddr>) -> Vec<String> {
    let set = |id: &str| family.ovn_set(id);
    let (subnets, services) = (set("subnets"), set("services"));
    let mut rules = Vec::new();
    if let Some(ip) = node_ip {
        rules.push(format!(
            "-m set --match-set {services} src -m set --match-set {subnets} dst -m mark --mark \
             0x4000/0x4000 -j SNAT --to-source {ip} --random-fully"
        ));
    }
    rules.extend([
        "-m mark --mark 0x4000/0x4000 -j OVN-MASQUERADE".to_owned(),
        format!(
            "-m set --match-set {subnets} src -m set --match-set {subnets} dst -j OVN-MASQUERADE"
        ),
        format!(
            "-m mark --mark 0x80000/0x80000 -m set --match-set {} dst -j RETURN",
            set("subnets-distributed-gw")
        ),
        "-m mark --mark 0x80000/0x80000 -j OVN-MASQUERADE".to_owned(),
        "-p tcp -m tcp --tcp-flags SYN NONE -m conntrack --ctstate NEW -j RETURN".to_owned(),
        format!(
            "-m set ! --match-set {subnets} src -m set ! --match-set {} src -m set --match-set {} \
             dst -j RETURN",
            set("other-node"),
            set("subnets-nat")
        ),
        format!(
            "-m set --match-set {} src -m set ! --match-set {subnets} dst -j OVN-NAT-POLICY",
            set("subnets-nat-policy")
        ),
        "-m mark --mark 0x90001/0x90001 -j OVN-MASQUERADE".to_owned(),
        "-m mark --mark 0x90002/0x90002 -j RETURN".to_owned(),
        format!(
            "-m set --match-set {} src -m set ! --match-set {subnets} dst -j OVN-MASQUERADE",
            set("subnets-nat")
        ),
    ]);
    rules
}

/// The rules of nat `OVN-PREROUTING` Kube-OVN would install on this node (spec §1.2), in order.
fn prerouting_rules(family: Family, f: &Facts) -> Vec<String> {
    let subnets = family.ovn_set("subnets");
    let mut rules = vec![if f.kube_cluster_ip {
        format!(
            "-i ovn0 -m set --match-set {subnets} src -m set --match-set {} dst,dst -j MARK \
             --set-xmark 0x4000/0x4000",
            family.kube_set("CLUSTER-IP")
        )
    } else {
        format!(
            "-i ovn0 -m set --match-set {subnets} src -m set --match-set {} dst -j MARK \
             --set-xmark 0x4000/0x4000",
            family.ovn_set("services")
        )
    }];
    if f.node_ip.is_some() {
        for (proto, set) in &f.node_port_local {
            rules.push(format!(
                "-p {proto} -m addrtype --dst-type LOCAL -m set --match-set {set} dst -j MARK \
                 --set-xmark 0x80000/0x80000"
            ));
            rules.push(format!(
                "-p {proto} -m set --match-set {} src -m set --match-set {set} dst -j MARK \
                 --set-xmark 0x4000/0x4000",
                family.ovn_set("other-node")
            ));
        }
    }
    rules
}

/// Installs nat `OVN-PREROUTING` and its jump the way Kube-OVN's `updateIptablesChain` does on a
/// fresh node: create the chain, insert the missing jump at position 1, insert each rule at its
/// index — one `iptables` command each.
pub fn install_prerouting(ns: &NetNs, cluster: &Cluster) -> Result<()> {
    for family in Family::ALL {
        let f = facts(ns, cluster, family)?;
        let ipt = family.iptables();
        ns.run(ipt, &["-t", "nat", "-N", "OVN-PREROUTING"])?;
        ns.run(
            ipt,
            &[
                &["-t", "nat", "-I", "PREROUTING", "1"],
                PREROUTING_JUMP_ARGS,
            ]
            .concat(),
        )?;
        for (i, rule) in prerouting_rules(family, &f).iter().enumerate() {
            let position = (i + 1).to_string();
            let mut args = vec!["-t", "nat", "-I", "OVN-PREROUTING", &position];
            args.extend(rule.split(' '));
            ns.run(ipt, &args)?;
        }
    }
    Ok(())
}

/// Which generation of Kube-OVN's nat PREROUTING jump positioning to reproduce (spec §3.1).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Positioning {
    /// v1.13.0–v1.13.12 `createIptablesRule`: list once; if index 1 is not ours insert at 1 and
    /// stop; otherwise delete every later copy by its index in that (stale) listing.
    V1_13_0,
    /// v1.13.13–v1.13.14 (#5232): insert before kube-proxy's jump unless a copy is strictly
    /// above it; delete duplicates bottom-up. Re-inserts at 1 each pass without kube-proxy (#5420).
    V1_13_13,
    /// v1.13.15+ (#5421): as v1.13.13 with "at or above".
    V1_13_15,
}

impl Positioning {
    pub fn label(self) -> &'static str {
        match self {
            Self::V1_13_0 => "Kube-OVN v1.13.0–v1.13.12",
            Self::V1_13_13 => "Kube-OVN v1.13.13–v1.13.14",
            Self::V1_13_15 => "Kube-OVN v1.13.15+",
        }
    }
}

/// What one pass did, in Kube-OVN's own log words where it has them.
#[derive(Debug, Default)]
pub struct PassLog {
    pub inserted: usize,
    pub deleted: usize,
    pub actions: Vec<String>,
    /// iptables' error text when a command failed (the pass stops there, as Kube-OVN's does).
    pub error: Option<String>,
    /// Copies of the jump in the listing this pass acted on.
    pub copies_seen: usize,
}

const IPT_TIMEOUT: Duration = Duration::from_secs(10);

/// `iptables -t nat -S PREROUTING` as lines; index 0 is the `-P` policy line, so rule `i` is at
/// index `i`, as in go-iptables' `List`.
pub fn list_prerouting(ns: &NetNs, family: Family) -> Result<Vec<String>> {
    Ok(ns
        .run(family.iptables(), &["-t", "nat", "-S", "PREROUTING"])?
        .lines()
        .map(str::to_owned)
        .collect())
}

/// Runs one iptables command; its failure is returned as iptables' own stderr text.
fn ipt(ns: &NetNs, family: Family, args: &[&str]) -> Result<std::result::Result<(), String>> {
    let out = ns.output(family.iptables(), args, IPT_TIMEOUT)?;
    Ok(if out.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).trim().to_owned())
    })
}

/// One pass of Kube-OVN's `createIptablesRule` for the nat PREROUTING jump (spec §3.1).
/// `Err` only for failures to run iptables at all; iptables' own errors land in the log.
pub fn ensure_prerouting_jump(ns: &NetNs, family: Family, version: Positioning) -> Result<PassLog> {
    let mut log = PassLog::default();
    let exists = ipt(
        ns,
        family,
        &[&["-t", "nat", "-C", "PREROUTING"], PREROUTING_JUMP_ARGS].concat(),
    )?
    .is_ok();
    if !exists {
        insert_jump(ns, family, 1, &mut log)?;
        return Ok(log);
    }
    match version {
        Positioning::V1_13_0 => legacy_pass(ns, family, &mut log)?,
        Positioning::V1_13_13 | Positioning::V1_13_15 => {
            current_pass(ns, family, version, &mut log)?;
        }
    }
    Ok(log)
}

fn insert_jump(ns: &NetNs, family: Family, position: usize, log: &mut PassLog) -> Result<bool> {
    let pos = position.to_string();
    log.actions
        .push(format!("insert nat prerouting rule at position {pos}"));
    match ipt(
        ns,
        family,
        &[
            &["-t", "nat", "-I", "PREROUTING", &pos],
            PREROUTING_JUMP_ARGS,
        ]
        .concat(),
    )? {
        Ok(()) => {
            log.inserted += 1;
            Ok(true)
        }
        Err(e) => {
            log.error = Some(e);
            Ok(false)
        }
    }
}

fn delete_at(ns: &NetNs, family: Family, position: usize, log: &mut PassLog) -> Result<bool> {
    let pos = position.to_string();
    log.actions
        .push(format!("delete iptables rule by pos {pos}"));
    match ipt(ns, family, &["-t", "nat", "-D", "PREROUTING", &pos])? {
        Ok(()) => {
            log.deleted += 1;
            Ok(true)
        }
        Err(e) => {
            log.error = Some(format!(
                "failed to delete iptables PREROUTING rule \"{}\": running [{} -t nat -D \
                 PREROUTING {pos}]: {e}",
                PREROUTING_JUMP_ARGS.join(" "),
                family.iptables()
            ));
            Ok(false)
        }
    }
}

fn legacy_pass(ns: &NetNs, family: Family, log: &mut PassLog) -> Result<()> {
    let rules = list_prerouting(ns, family)?;
    log.copies_seen = rules.iter().filter(|r| *r == PREROUTING_JUMP).count();
    if rules.get(1).map(String::as_str) != Some(PREROUTING_JUMP) {
        insert_jump(ns, family, 1, log)?;
        return Ok(());
    }
    // The bug: positions come from the listing taken before the first delete.
    for (i, rule) in rules.iter().enumerate().skip(2) {
        if rule == PREROUTING_JUMP && !delete_at(ns, family, i, log)? {
            return Ok(());
        }
    }
    Ok(())
}

/// Positions of `line` in `rules`, bottom-up (as `findRulePositions` returns them).
fn positions(rules: &[String], line: &str) -> Vec<usize> {
    (1..rules.len())
        .rev()
        .filter(|&i| rules[i] == line)
        .collect()
}

fn current_pass(ns: &NetNs, family: Family, version: Positioning, log: &mut PassLog) -> Result<()> {
    // ensureNatPreroutingRulePosition
    let rules = list_prerouting(ns, family)?;
    log.copies_seen = positions(&rules, PREROUTING_JUMP).len();
    let insert_position = positions(&rules, kube_proxy::SERVICES_JUMP)
        .last()
        .copied()
        .unwrap_or(1);
    let top = positions(&rules, PREROUTING_JUMP).last().copied();
    let in_place = top.is_some_and(|pos| match version {
        Positioning::V1_13_13 => pos < insert_position,
        _ => pos <= insert_position,
    });
    if !in_place && !insert_jump(ns, family, insert_position, log)? {
        return Ok(());
    }
    // ensureNatPreroutingRuleNoDuplicate lists again (v1.13.15 lists per function).
    let rules = list_prerouting(ns, family)?;
    let copies = positions(&rules, PREROUTING_JUMP);
    for &pos in &copies[..copies.len().saturating_sub(1)] {
        log.actions.push(format!(
            "deleting duplicate nat prerouting rule at position {pos}"
        ));
        if !delete_at(ns, family, pos, log)? {
            return Ok(());
        }
    }
    Ok(())
}
