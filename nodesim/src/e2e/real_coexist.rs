//! `cargo xtask e2e --kube-ovn VERSIONS --kube-ovn-coexist`: the seed's churn reproduced with
//! Kube-OVN's own code. Real kube-ovn-cni (the harness, every 3 s as deployed) shares nat
//! PREROUTING with a Calico-like actor (felix in insert mode: its jump back to position 1 in one
//! `iptables-restore --noflush` transaction, every 3 s ± 50 %) and with a kube-proxy whose
//! service jump it cannot see — as in nftables mode, where that jump is not in iptables at all.
//! In the simulator the service DNAT must still happen, so kube-proxy's jump stays at the end of
//! the chain under another comment (`NFT_STAND_IN`): same traffic, but Kube-OVN's search for
//! `-m comment --comment "kubernetes service portals" -j KUBE-SERVICES` finds nothing, as it
//! finds nothing on an nftables-mode node.
//!
//! Per release, two nodes, the same actors and the same connection mix (coexist's IPVS-mode
//! scenarios):
//! - `iptables`: the release running every 3 s; its own log gives the errors
//!   (`Index of deletion too big`) and writes, a 100 ms sampler the churn (changes of the
//!   position and copy count of its jump in IPv4 nat PREROUTING);
//! - `ebpf`: one pass of the release, its jumps deleted, the agent enforcing — or for `patched`
//!   the patched release running every 3 s with `--prerouting-datapath=external`.

use std::{
    collections::BTreeMap,
    fs,
    path::Path,
    sync::atomic::{AtomicBool, Ordering},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, ensure};

use super::{coexist, real, scenarios};
use crate::{
    kube_ovn::{self, Variant},
    node::{
        Cluster, Family, HookKind, HookOptions, Host, KubeProxyMode, Node, NodeSpec,
        kube_ovn::{PREROUTING_JUMP, list_prerouting},
        kube_proxy::SERVICES_JUMP,
        netns::NetNs,
    },
};

/// kube-proxy's service jump with a comment Kube-OVN does not look for.
const NFT_STAND_IN: &str =
    "-A PREROUTING -m comment --comment \"kube-proxy nftables stand-in\" -j KUBE-SERVICES";
/// Felix's refresh, jittered by ± 50 %: near Kube-OVN's 3 s so that Kube-OVN sees, pass by
/// pass, sometimes Calico's jump on top and sometimes its own.
const CALICO_PERIOD: Duration = Duration::from_secs(3);
const SAMPLE_PERIOD: Duration = Duration::from_millis(100);
const CONNECTIONS_PER_SECOND: u32 = 5;

/// One node's run.
pub struct Side {
    pub hook: HookKind,
    /// Kube-OVN passes that failed with `Index of deletion too big` (its log).
    pub deletion_errors: usize,
    /// Other failed passes in Kube-OVN's log.
    pub other_errors: usize,
    /// Kube-OVN's inserts and deletes of its nat PREROUTING jump, from its log.
    pub inserts: usize,
    pub deletes: usize,
    /// Changes of (position of the first copy, number of copies) of Kube-OVN's IPv4 jump seen
    /// by the sampler.
    pub position_changes: usize,
    pub max_copies: usize,
    /// Times the sampler found the hidden kube-proxy jump deleted (by Kube-OVN's stale-index
    /// deletes) and put it back, either family.
    pub kube_proxy_restores: usize,
    pub calico_passes: usize,
    pub connections: usize,
    pub wrong: BTreeMap<String, usize>,
    pub final_chain: Vec<String>,
}

impl Side {
    fn wrong_total(&self) -> usize {
        self.wrong.values().sum()
    }

    /// Kube-OVN writes plus position changes: the churn of one run.
    fn churn(&self) -> usize {
        self.inserts + self.deletes + self.position_changes
    }
}

pub fn run(variants: &[Variant], options: &HookOptions, duration: Duration) -> Result<()> {
    let mut lines = Vec::new();
    let mut failed = 0;
    let mut json = Vec::new();
    for variant in variants {
        let binary = kube_ovn::build(variant)?;
        let release = kube_ovn::build(&Variant::release(&variant.version))?;
        let iptables = if variant.patched {
            None
        } else {
            Some(
                run_side(variant, &binary, HookKind::Iptables, options, duration)
                    .with_context(|| format!("{}: iptables", variant.name()))?,
            )
        };
        let ebpf_binary = if variant.patched { &binary } else { &release };
        let ebpf = run_side(variant, ebpf_binary, HookKind::Ebpf, options, duration)
            .with_context(|| format!("{}: ebpf", variant.name()))?;
        println!(
            "\n== kube-ovn {} coexistence (Calico insert mode, kube-proxy service jump invisible) ==",
            variant.name()
        );
        for side in iptables.iter().chain([&ebpf]) {
            print_side(side);
        }
        // The agent's side must be clean whatever Kube-OVN does next to it.
        let ebpf_bad = ebpf.wrong_total()
            + ebpf.deletion_errors
            + ebpf.other_errors
            + ebpf.churn()
            + ebpf.kube_proxy_restores;
        failed += usize::from(ebpf_bad > 0);
        let summary = |s: &Side| {
            format!(
                "{} errors ({} Index of deletion too big), {} churn ({} inserts, {} deletes, {} \
                 position changes), {} wrong of {}, hidden kube-proxy jump restored {} times",
                s.deletion_errors + s.other_errors,
                s.deletion_errors,
                s.churn(),
                s.inserts,
                s.deletes,
                s.position_changes,
                s.wrong_total(),
                s.connections,
                s.kube_proxy_restores
            )
        };
        lines.push(format!(
            "kube-ovn {} coexist: iptables {}; ebpf {}",
            variant.name(),
            iptables
                .as_ref()
                .map_or_else(|| "n/a (patched)".to_owned(), summary),
            summary(&ebpf)
        ));
        json.push(serde_json::json!({
            "variant": variant.name(),
            "iptables": iptables.as_ref().map(side_json),
            "ebpf": side_json(&ebpf),
        }));
    }
    real::write_report("kube-ovn-coexist.json", &json, &lines)?;
    ensure!(
        failed == 0,
        "{failed} variants had errors, churn or wrong outcomes with the agent enforcing"
    );
    Ok(())
}

fn run_side(
    variant: &Variant,
    binary: &Path,
    hook: HookKind,
    options: &HookOptions,
    duration: Duration,
) -> Result<Side> {
    let cluster = Cluster::fixture();
    let run = real::RunDir::new("kube-ovn-coexist", &cluster)?;
    let cluster_file = run.cluster_file.as_path();
    let log = run.dir.join("kovn-harness.log");
    let mut node = Node::build_without_kube_ovn(NodeSpec {
        cluster: cluster.clone(),
        kube_proxy: KubeProxyMode::Ipvs,
    })?;
    let ns = node.ns(Host::Node);
    coexist::install_neighbours(ns)?;
    hide_services_jump(ns)?;
    let running = if hook == HookKind::Iptables || variant.patched {
        Some(kube_ovn::spawn(ns, binary, cluster_file, &cluster, &log)?)
    } else {
        kube_ovn::run_once(ns, binary, cluster_file, &cluster)
            .context("Kube-OVN's gateway pass")?;
        real::delete_prerouting_jumps(&node)?;
        None
    };
    real::guard_mirror(&node, &cluster, KubeProxyMode::Ipvs, &Family::ALL)?;
    if hook == HookKind::Ebpf {
        node.install_hook(HookKind::Ebpf, options)?;
    }

    let mix: Vec<scenarios::Scenario> =
        scenarios::all().into_iter().filter(|s| s.coexist).collect();
    let config = coexist::CoexistConfig {
        connections: usize::try_from(duration.as_secs() * u64::from(CONNECTIONS_PER_SECOND))
            .unwrap_or(usize::MAX),
        duration,
        probe_timeout: super::PROBE_TIMEOUT,
    };
    let deadline = Instant::now() + duration * 2 + Duration::from_secs(30);
    let stop = AtomicBool::new(false);
    let (traffic, calico, samples) = thread::scope(|s| {
        let ns = node.ns(Host::Node);
        let stop = &stop;
        let calico = s.spawn(move || calico_loop(ns, stop, deadline));
        let sampler = s.spawn(move || sample_loop(ns, stop, deadline));
        let traffic = coexist::traffic_loop(&node, &mix, &config);
        stop.store(true, Ordering::Relaxed);
        (
            traffic,
            calico
                .join()
                .unwrap_or_else(|p| std::panic::resume_unwind(p)),
            sampler
                .join()
                .unwrap_or_else(|p| std::panic::resume_unwind(p)),
        )
    });
    let (connections, wrong) = traffic?;
    let (position_changes, max_copies, kube_proxy_restores) = samples?;
    let calico = calico?;
    drop(running);
    if let Some(h) = node.hook_mut() {
        h.check().context("after the coexistence traffic")?;
        real::no_kube_ovn_prerouting(&node)?;
    }
    // No log when no kube-ovn-cni ran next to the agent.
    let text = fs::read_to_string(&log).unwrap_or_default();
    let count = |pats: &[&str]| {
        text.lines()
            .filter(|l| pats.iter().any(|p| l.contains(p)))
            .count()
    };
    let (deletion_errors, other_errors) = failed_passes(&text);
    Ok(Side {
        hook,
        deletion_errors,
        other_errors,
        // v1.13.0–v1.13.12 and v1.13.13+ log these in their own words.
        inserts: count(&[
            "insert nat prerouting rule",
            "inserting nat prerouting rule",
        ]),
        deletes: count(&[
            "deleting duplicate nat prerouting rule",
            "delete iptables rule by pos",
        ]),
        position_changes,
        max_copies,
        kube_proxy_restores,
        calico_passes: calico,
        connections,
        wrong,
        final_chain: list_prerouting(node.ns(Host::Node), Family::V4)?
            .iter()
            .skip(1)
            .map(|l| {
                if l == NFT_STAND_IN {
                    "KUBE(hidden)".to_owned()
                } else {
                    coexist::short(l).to_owned()
                }
            })
            .collect(),
    })
}

/// Failed passes in the harness's log: (those failing with `Index of deletion too big`, the
/// others). A pass's error is its `kovn-harness: pass N failed: …` line and the continuation
/// lines of that joined error, up to the next klog or harness line.
fn failed_passes(text: &str) -> (usize, usize) {
    let is_head = |l: &str| {
        l.starts_with("kovn-harness:")
            || (l.len() > 5
                && l.starts_with(['I', 'W', 'E', 'F'])
                && l[1..5].bytes().all(|b| b.is_ascii_digit()))
    };
    let lines: Vec<&str> = text.lines().collect();
    let (mut deletion, mut other) = (0, 0);
    for (i, line) in lines.iter().enumerate() {
        if !(line.starts_with("kovn-harness: pass ") && line.contains(" failed: ")) {
            continue;
        }
        let block_end = lines[i + 1..]
            .iter()
            .position(|l| is_head(l))
            .map_or(lines.len(), |n| i + 1 + n);
        if lines[i..block_end]
            .iter()
            .any(|l| l.contains("Index of deletion too big"))
        {
            deletion += 1;
        } else {
            other += 1;
        }
    }
    (deletion, other)
}

/// Replaces kube-proxy's service jump by [`NFT_STAND_IN`] at the end of nat PREROUTING.
fn hide_services_jump(ns: &NetNs) -> Result<()> {
    let strip = |l: &'static str| l.strip_prefix("-A PREROUTING ").expect("a PREROUTING rule");
    let script = format!(
        "*nat\n-D PREROUTING {}\n-A PREROUTING {}\nCOMMIT\n",
        strip(SERVICES_JUMP),
        strip(NFT_STAND_IN)
    );
    for family in Family::ALL {
        ns.run_stdin(family.iptables_restore(), &["--noflush"], &script)
            .with_context(|| format!("{family}: hiding kube-proxy's service jump"))?;
    }
    Ok(())
}

/// The Calico actor at felix's pace; returns its passes.
fn calico_loop(ns: &NetNs, stop: &AtomicBool, deadline: Instant) -> Result<usize> {
    let started = Instant::now();
    let mut stats = coexist::ActorStats::default();
    let mut jitter = coexist::Jitter::new(u64::from(started.elapsed().subsec_nanos()) | 7);
    let mut passes = 0;
    while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
        sleep_until_stop(jitter.around(CALICO_PERIOD), stop);
        passes += 1;
        for family in Family::ALL {
            coexist::calico_pass(ns, family, &mut stats, started)?;
        }
    }
    ensure!(
        stats.errors.is_empty(),
        "the Calico actor failed: {:?}",
        stats.errors
    );
    Ok(passes)
}

fn sleep_until_stop(total: Duration, stop: &AtomicBool) {
    let until = Instant::now() + total;
    while !stop.load(Ordering::Relaxed) && Instant::now() < until {
        thread::sleep(SAMPLE_PERIOD.min(until.saturating_duration_since(Instant::now())));
    }
}

/// Samples IPv4 nat PREROUTING; returns the changes of (first position, copies) of Kube-OVN's
/// jump, the most copies seen, and how often the hidden kube-proxy jump had to be put back.
///
/// On an nftables-mode node kube-proxy's jump is not an iptables rule, so Kube-OVN's stale-index
/// deletes cannot remove it; here the stand-in is one, and they can. The sampler plays
/// kube-proxy's side: a missing stand-in is appended again within one sample period (either
/// family), and counted, so the outcomes measure Kube-OVN's churn rather than a deletion that
/// cannot happen on a real node, and the count shows how often the stand-in was hit.
fn sample_loop(ns: &NetNs, stop: &AtomicBool, deadline: Instant) -> Result<(usize, usize, usize)> {
    let mut last: Option<(Option<usize>, usize)> = None;
    let (mut changes, mut max_copies, mut restores) = (0, 0, 0);
    let stand_in = NFT_STAND_IN
        .strip_prefix("-A PREROUTING ")
        .expect("a PREROUTING rule");
    while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
        for family in [Family::V6, Family::V4] {
            if !list_prerouting(ns, family)?
                .iter()
                .any(|r| r == NFT_STAND_IN)
            {
                ns.run_stdin(
                    family.iptables_restore(),
                    &["--noflush"],
                    &format!("*nat\n-A PREROUTING {stand_in}\nCOMMIT\n"),
                )
                .with_context(|| format!("{family}: restoring kube-proxy's hidden jump"))?;
                restores += 1;
            }
        }
        let rules = list_prerouting(ns, Family::V4)?;
        let first = rules.iter().position(|r| r == PREROUTING_JUMP);
        let copies = rules.iter().filter(|r| *r == PREROUTING_JUMP).count();
        max_copies = max_copies.max(copies);
        let now = (first, copies);
        if last.is_some_and(|l| l != now) {
            changes += 1;
        }
        last = Some(now);
        thread::sleep(SAMPLE_PERIOD);
    }
    Ok((changes, max_copies, restores))
}

fn print_side(s: &Side) {
    println!(
        "  {:<8} {} connections, {} wrong; Kube-OVN: {} `Index of deletion too big`, {} other \
         failed passes, {} inserts, {} deletes; {} position changes (max {} copies); hidden \
         kube-proxy jump restored {} times; {} Calico passes; final IPv4 chain [{}]",
        s.hook.to_string(),
        s.connections,
        s.wrong_total(),
        s.deletion_errors,
        s.other_errors,
        s.inserts,
        s.deletes,
        s.position_changes,
        s.max_copies,
        s.kube_proxy_restores,
        s.calico_passes,
        s.final_chain.join(", ")
    );
    for (what, n) in &s.wrong {
        println!("           WRONG x{n}: {what}");
    }
}

fn side_json(s: &Side) -> serde_json::Value {
    serde_json::json!({
        "hook": s.hook.to_string(),
        "connections": s.connections,
        "wrong": s.wrong,
        "deletion_errors": s.deletion_errors,
        "other_errors": s.other_errors,
        "inserts": s.inserts,
        "deletes": s.deletes,
        "position_changes": s.position_changes,
        "max_copies": s.max_copies,
        "kube_proxy_restores": s.kube_proxy_restores,
        "calico_passes": s.calico_passes,
        "final_chain": s.final_chain,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failed_passes_are_split_by_their_error() {
        let log = "I1206 07:00:00.000000 1 gateway_linux.go:445] insert nat prerouting rule\n\
                   kovn-harness: pass 1 ok (protocol Dual, cluster reloaded: true)\n\
                   E1206 07:00:03.000000 1 gateway_linux.go:1070] failed to delete\n\
                   kovn-harness: pass 2 failed: setIptables: running [iptables -t nat -D \
                   PREROUTING 5]: exit status 1:\n\
                   iptables: Index of deletion too big.\n\
                   I1206 07:00:06.000000 1 gateway_linux.go:445] insert nat prerouting rule\n\
                   kovn-harness: pass 3 failed: setIPSet: boom\n\
                   second line\n\
                   kovn-harness: pass 4 ok (protocol Dual, cluster reloaded: false)\n";
        let log = log
            .lines()
            .map(str::trim_start)
            .collect::<Vec<_>>()
            .join("\n");
        assert_eq!(failed_passes(&log), (1, 1));
    }
}
