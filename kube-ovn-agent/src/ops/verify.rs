//! `kube-ovn-agent verify`: does the datapath classify what Kube-OVN's own iptables rules
//! classify? Over a window, per rule (R1a … R3u), it compares the datapath's counters with the
//! counters the kernel keeps for Kube-OVN's nat `OVN-PREROUTING` rules.
//!
//! The two do not count the same thing. A nat rule is traversed only by the first packet of a
//! connection (the one that sets up its NAT binding), so its counter counts *new connections*;
//! the datapath is stateless and counts *every packet* it classifies (design §1). Two
//! comparisons make that meaningful, and each can fail:
//!
//! - **connections**, from Kube-OVN's counters, read-only: each connection Kube-OVN marked began
//!   with a packet that passed TC ingress before netfilter, so the datapath's count can never be
//!   lower. A shortfall is traffic Kube-OVN marks and we would not.
//! - **packets**, exact: for the window, each Kube-OVN rule's match text (read from the kernel,
//!   target dropped) is copied into a counting-only chain `KOVN-VERIFY` that raw PREROUTING
//!   jumps to first. raw sees every packet, as TC does, so these counters must equal the
//!   datapath's; this catches traffic we would mark and Kube-OVN would not, which connection
//!   counts cannot show. The copies skip `lo` (locally originated traffic never traverses nat
//!   PREROUTING, and the program is not attached there). `connections-only` leaves iptables
//!   untouched and skips this comparison.
//!
//! Reads are bracketed: the datapath is read just before and just after each iptables read, so
//! its delta is an interval that must contain the iptables delta (TC and netfilter handle a
//! packet in the same softirq). The tolerance, a share of the datapath's count rounded down (so
//! small counts must match exactly), absorbs what legitimately differs on a busy node: frames a
//! later TC program drops, frames for another host on a promiscuous interface (dropped before
//! PREROUTING), fragments whose datagram never completes.
//!
//! `verify` sends nothing; on a quiet node `kube-ovn-agent probe` (`ops::probe`), run in a pod
//! there, gives it traffic through ovn0 to compare.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Write as _,
    path::PathBuf,
    time::{Duration, Instant},
};

use kube_ovn_ebpf_common::rule;
use serde::Serialize;

use crate::{
    datapath::pins::PinRoot,
    host::xtables::{self, IpFamily, JUMP_SPEC, OVN_PREROUTING, Ruleset, Tool, XtablesError},
    ops::pinned::{PinnedError, PinnedView},
    state::{FamilyState, MapState},
};

/// The counting-only chain in raw holding the copies of Kube-OVN's rules.
pub const COPY_CHAIN: &str = "KOVN-VERIFY";
/// raw PREROUTING's jump to it; removed with the chain when `verify` ends.
pub const COPY_JUMP: [&str; 6] = [
    "-m",
    "comment",
    "--comment",
    "kube-ovn-ebpf verify",
    "-j",
    COPY_CHAIN,
];
const COPY_COMMENT: &str = "kovn-verify";

/// The rules compared: Kube-OVN's nat hook. Kube-OVN's TPROXY rules (mangle) steer kubelet
/// probes rather than mark; `verify` only reports that they exist and whether the datapath
/// replaces them (`run --enable-tproxy`).
pub const RULES: [u32; 6] = [
    rule::R1A,
    rule::R1B,
    rule::R2T,
    rule::R2U,
    rule::R3T,
    rule::R3U,
];

#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error(transparent)]
    Pinned(#[from] PinnedError),
    #[error("no iptables tools found (iptables-nft-save, iptables-legacy-save or iptables-save)")]
    NoIptables,
    #[error("no iptables backend could be read: {errors}")]
    NoBackendReadable { errors: String },
    #[error("installing the per-packet copies of Kube-OVN's rules with {tool}: {source}")]
    PacketCopies {
        tool: Tool,
        #[source]
        source: XtablesError,
    },
    #[error("interrupted; the per-packet copies were removed")]
    Interrupted,
    #[error("waiting for signals: {source}")]
    Signals {
        #[source]
        source: std::io::Error,
    },
}

pub type Result<T, E = VerifyError> = std::result::Result<T, E>;

/// What `verify` compares and how.
#[derive(Clone, Debug)]
pub struct Options {
    pub root: PathBuf,
    pub window: Duration,
    /// Allowed difference in hundredths of a percent of the datapath's count.
    pub tolerance_bp: u32,
    /// Install the per-packet copies (false: Kube-OVN's connection counters only).
    pub per_packet: bool,
}

/// Which of Kube-OVN's nat rules a rule of its `OVN-PREROUTING` chain is, from its match text
/// (spec §1.2), or why it is none of them.
pub fn identify(family: IpFamily, words: &[String]) -> std::result::Result<u32, String> {
    let mut iface = None;
    let mut proto = None;
    let mut sets: Vec<(String, String)> = Vec::new();
    let mut local = false;
    let mut mark = None;
    let mut i = 0;
    let word = |i: usize| words.get(i).map(String::as_str);
    while i < words.len() {
        match (word(i), word(i + 1)) {
            (Some("-i"), Some(name)) => {
                iface = Some(name);
                i += 2;
            }
            (Some("-p"), Some(p)) => {
                proto = Some(p);
                i += 2;
            }
            (Some("-m"), Some("set")) => match (word(i + 2), word(i + 3), word(i + 4)) {
                (Some("--match-set"), Some(name), Some(flags)) => {
                    sets.push((name.to_owned(), flags.to_owned()));
                    i += 5;
                }
                _ => return Err("a set match this datapath does not implement".into()),
            },
            (Some("-m"), Some("addrtype")) => match (word(i + 2), word(i + 3)) {
                (Some("--dst-type"), Some("LOCAL")) => {
                    local = true;
                    i += 4;
                }
                _ => return Err("an addrtype match other than --dst-type LOCAL".into()),
            },
            // `-m tcp`/`-m udp` without options: implied by `-p`.
            (Some("-m"), Some(m @ ("tcp" | "udp")))
                if word(i + 2).is_none_or(|w| !w.starts_with("--")) && proto == Some(m) =>
            {
                i += 2;
            }
            (Some("-j"), Some("MARK")) => match (word(i + 2), word(i + 3)) {
                (Some("--set-xmark"), Some(value)) if i + 4 == words.len() => {
                    mark = Some(value);
                    i += 4;
                }
                _ => return Err("a MARK target other than --set-xmark V/M".into()),
            },
            (Some(other), _) => return Err(format!("`{other}` is not part of any rule R1–R3")),
            (None, _) => break,
        }
    }
    let sets: Vec<(&str, &str)> = sets.iter().map(|(n, f)| (n.as_str(), f.as_str())).collect();
    let subnets = family.ovn_set("subnets");
    let masquerade = Some("0x4000/0x4000");
    let nodeport_local = Some("0x80000/0x80000");
    let nodeport_set = |p: &str| family.kube_set(&format!("NODE-PORT-LOCAL-{}", p.to_uppercase()));
    let found = match (iface, proto, local, mark) {
        (Some(_), None, false, m) if m == masquerade => {
            if sets
                == [
                    (&*subnets, "src"),
                    (&*family.kube_set("CLUSTER-IP"), "dst,dst"),
                ]
            {
                Some(rule::R1A)
            } else if sets == [(&*subnets, "src"), (&*family.ovn_set("services"), "dst")] {
                Some(rule::R1B)
            } else {
                None
            }
        }
        (None, Some(p @ ("tcp" | "udp")), true, m)
            if m == nodeport_local && sets == [(&*nodeport_set(p), "dst")] =>
        {
            Some(if p == "tcp" { rule::R2T } else { rule::R2U })
        }
        (None, Some(p @ ("tcp" | "udp")), false, m)
            if m == masquerade
                && sets
                    == [
                        (&*family.ovn_set("other-node"), "src"),
                        (&*nodeport_set(p), "dst"),
                    ] =>
        {
            Some(if p == "tcp" { rule::R3T } else { rule::R3U })
        }
        _ => None,
    };
    found.ok_or_else(|| "its matches are none of R1a, R1b, R2t, R2u, R3t, R3u".into())
}

/// The words of a rule without its target: what the per-packet copy matches on.
fn matches_only(words: &[String]) -> &[String] {
    let end = words.iter().position(|w| w == "-j").unwrap_or(words.len());
    &words[..end]
}

/// What one snapshot of one iptables backend shows.
#[derive(Clone, Debug, Default)]
struct View {
    /// Copies of Kube-OVN's jump in nat PREROUTING.
    jumps: usize,
    has_chain: bool,
    /// Recognised rules of nat `OVN-PREROUTING`: (rule id, match words, packets).
    rules: Vec<(u32, Vec<String>, u64)>,
    /// Rules of that chain that are none of R1–R3, with the reason.
    unknown: Vec<(String, String)>,
    /// Packets counted by our per-packet copy of each rule.
    copies: BTreeMap<u32, u64>,
    copy_chain: bool,
    copy_jumps: usize,
    /// Rules in mangle `OVN-PREROUTING` (Kube-OVN's TPROXY, with --enable-tproxy).
    tproxy: usize,
}

impl View {
    fn of(tool: Tool, tables: &Ruleset) -> Self {
        let mut view = Self::default();
        if let Some(nat) = tables.get("nat") {
            view.jumps = nat
                .get("PREROUTING")
                .into_iter()
                .flatten()
                .filter(|r| r.is(&JUMP_SPEC))
                .count();
            if let Some(chain) = nat.get(OVN_PREROUTING) {
                view.has_chain = true;
                for r in chain {
                    match identify(tool.family, &r.words) {
                        Ok(id) => view.rules.push((id, r.words.clone(), r.packets)),
                        Err(why) => view.unknown.push((r.spec.clone(), why)),
                    }
                }
            }
        }
        if let Some(raw) = tables.get("raw") {
            view.copy_jumps = raw
                .get("PREROUTING")
                .into_iter()
                .flatten()
                .filter(|r| r.is(&COPY_JUMP))
                .count();
            if let Some(chain) = raw.get(COPY_CHAIN) {
                view.copy_chain = true;
                for r in chain {
                    let name = r
                        .words
                        .windows(2)
                        .find(|w| w[0] == "--comment")
                        .and_then(|w| w[1].strip_prefix(COPY_COMMENT))
                        .map(str::trim);
                    if let Some(id) = name.and_then(rule_id) {
                        *view.copies.entry(id).or_default() += r.packets;
                    }
                }
            }
        }
        view.tproxy = tables
            .get("mangle")
            .and_then(|m| m.get(OVN_PREROUTING))
            .map_or(0, Vec::len);
        view
    }

    /// Kube-OVN's packets for `id` (summed if the chain repeats the rule).
    fn packets(&self, id: u32) -> Option<u64> {
        let mut matched = self.rules.iter().filter(|(r, _, _)| *r == id).peekable();
        matched.peek()?;
        Some(matched.map(|(_, _, p)| *p).sum())
    }
}

fn rule_id(name: &str) -> Option<u32> {
    rule::NAMES
        .iter()
        .position(|n| *n == name)
        .and_then(|i| u32::try_from(i).ok())
}

fn rule_name(id: u32) -> &'static str {
    rule::NAMES[id as usize]
}

/// Saves every tool; a backend that cannot be read is noted and skipped.
fn snapshot(tools: &[Tool], notes: &mut BTreeSet<String>) -> Result<BTreeMap<Tool, View>> {
    let mut views = BTreeMap::new();
    let mut errors = Vec::new();
    for &tool in tools {
        match xtables::save(tool) {
            Ok(tables) => {
                views.insert(tool, View::of(tool, &tables));
            }
            Err(e) => {
                notes.insert(format!("{tool}: not read ({e})"));
                errors.push(e.to_string());
            }
        }
    }
    if views.is_empty() {
        return Err(VerifyError::NoBackendReadable {
            errors: errors.join("; "),
        });
    }
    Ok(views)
}

/// The per-packet copies, removed on drop (also when `verify` fails or is interrupted).
struct PacketCopies {
    tools: Vec<Tool>,
    errors: Vec<String>,
}

impl PacketCopies {
    fn install(views: &BTreeMap<Tool, View>) -> Result<Self> {
        let mut copies = Self {
            tools: Vec::new(),
            errors: Vec::new(),
        };
        for (&tool, view) in views {
            if view.rules.is_empty() {
                continue;
            }
            let mut script = format!("*raw\n:{COPY_CHAIN} - [0:0]\n-F {COPY_CHAIN}\n");
            let mut seen = BTreeSet::new();
            for (id, words, _) in &view.rules {
                if !seen.insert(*id) {
                    continue;
                }
                let matches = matches_only(words);
                let local_skip = if matches.iter().any(|w| w == "-i") {
                    ""
                } else {
                    "! -i lo "
                };
                let _ = writeln!(
                    script,
                    "-A {COPY_CHAIN} {local_skip}{} -m comment --comment \"{COPY_COMMENT} {}\"",
                    xtables::join_words(matches),
                    rule_name(*id)
                );
            }
            if view.copy_jumps == 0 {
                let _ = writeln!(
                    script,
                    "-I PREROUTING 1 {}",
                    xtables::join_words(&COPY_JUMP)
                );
            }
            script.push_str("COMMIT\n");
            // Registered first, so a half-done install is still removed.
            copies.tools.push(tool);
            xtables::restore(tool, &script)
                .map_err(|source| VerifyError::PacketCopies { tool, source })?;
        }
        Ok(copies)
    }

    /// Removes the jump (every copy) and the chain from each tool's raw table.
    fn remove(&mut self) {
        for tool in std::mem::take(&mut self.tools) {
            if let Err(e) = remove_copies(tool) {
                self.errors
                    .push(format!("removing {COPY_CHAIN} with {tool}: {e}"));
            }
        }
    }
}

impl Drop for PacketCopies {
    fn drop(&mut self) {
        self.remove();
        for e in &self.errors {
            tracing::error!("{e}");
        }
    }
}

fn remove_copies(tool: Tool) -> xtables::Result<()> {
    let view = View::of(tool, &xtables::save(tool)?);
    if !view.copy_chain && view.copy_jumps == 0 {
        return Ok(());
    }
    let mut script = String::from("*raw\n");
    for _ in 0..view.copy_jumps {
        let _ = writeln!(script, "-D PREROUTING {}", xtables::join_words(&COPY_JUMP));
    }
    if view.copy_chain {
        let _ = writeln!(script, "-F {COPY_CHAIN}\n-X {COPY_CHAIN}");
    }
    script.push_str("COMMIT\n");
    xtables::restore(tool, &script)
}

/// What was seen of one rule over the window.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Observation {
    /// Families whose Kube-OVN chain has the rule.
    pub kube_ovn: BTreeSet<IpFamily>,
    /// Families the datapath has the rule in force for.
    pub ebpf: BTreeSet<IpFamily>,
    /// Of those, families whose maps give the rule something to match.
    pub ebpf_can_match: BTreeSet<IpFamily>,
    /// New connections Kube-OVN's rule counted (None: no backend has its jump in place).
    pub connections: Option<u64>,
    /// Packets the per-packet copy counted (None: not installed).
    pub packets: Option<u64>,
    /// Packets the datapath classified: at least the first, at most the second.
    pub ebpf_packets: (u64, u64),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RuleVerdict {
    Agree,
    Disagree,
    /// Nothing hit the rule on either side during the window.
    Idle,
}

/// Compares one rule's observation; the reasons say what disagreed.
pub fn judge(o: &Observation, tolerance_bp: u32) -> (RuleVerdict, Vec<String>) {
    let mut reasons = Vec::new();
    for family in &o.kube_ovn {
        if !o.ebpf.contains(family) {
            reasons.push(format!(
                "{family}: Kube-OVN has this rule, the datapath does not have it in force"
            ));
        }
    }
    for family in &o.ebpf_can_match {
        if !o.kube_ovn.contains(family) {
            reasons.push(format!(
                "{family}: the datapath has this rule in force, Kube-OVN's chain does not"
            ));
        }
    }
    let (lo, hi) = o.ebpf_packets;
    let allowed =
        u64::try_from(u128::from(hi) * u128::from(tolerance_bp) / 10_000).unwrap_or(u64::MAX);
    if let Some(packets) = o.packets
        && (packets.saturating_add(allowed) < lo || packets > hi.saturating_add(allowed))
    {
        reasons.push(format!(
            "per packet: Kube-OVN's rule matched {packets}, the datapath {}",
            range(lo, hi)
        ));
    }
    if let Some(connections) = o.connections
        && connections > hi.saturating_add(allowed)
    {
        reasons.push(format!(
            "Kube-OVN marked {connections} new connections, but the datapath classified only {} \
             packets",
            range(lo, hi)
        ));
    }
    let verdict = if !reasons.is_empty() {
        RuleVerdict::Disagree
    } else if hi == 0 && o.packets.unwrap_or(0) == 0 && o.connections.unwrap_or(0) == 0 {
        RuleVerdict::Idle
    } else {
        RuleVerdict::Agree
    };
    (verdict, reasons)
}

fn range(lo: u64, hi: u64) -> String {
    if lo == hi {
        lo.to_string()
    } else {
        format!("{lo}..{hi}")
    }
}

/// Whether the datapath's maps give `id` anything to match in one family.
fn can_match<N: Ord, A: Ord>(id: u32, f: &FamilyState<N, A>) -> bool {
    if f.rules & rule::bit(id) == 0 {
        return false;
    }
    match id {
        rule::R1A => !f.subnets.is_empty() && !f.service_ports.is_empty(),
        rule::R1B => !f.subnets.is_empty() && !f.service_cidrs.is_empty(),
        rule::R2T => !f.nodeport_local_tcp.is_empty(),
        rule::R2U => !f.nodeport_local_udp.is_empty(),
        rule::R3T => !f.other_nodes.is_empty() && !f.nodeport_local_tcp.is_empty(),
        rule::R3U => !f.other_nodes.is_empty() && !f.nodeport_local_udp.is_empty(),
        _ => false,
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    Agree,
    Disagree,
    /// No traffic hit any rule, or there were no Kube-OVN rules to compare with.
    Inconclusive,
}

impl Verdict {
    /// The process exit status `verify` ends with.
    pub fn exit_code(self) -> i32 {
        match self {
            Self::Agree => 0,
            Self::Disagree => 2,
            Self::Inconclusive => 3,
        }
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct RuleReport {
    pub rule: &'static str,
    #[serde(flatten)]
    pub observation: Observation,
    pub verdict: RuleVerdict,
    pub reasons: Vec<String>,
}

#[derive(Clone, Debug, Serialize)]
pub struct BackendReport {
    pub tool: String,
    /// Copies of Kube-OVN's jump in nat PREROUTING.
    pub jumps: usize,
    /// Rules of nat OVN-PREROUTING, by name.
    pub rules: Vec<&'static str>,
    /// Rules of mangle OVN-PREROUTING (TPROXY): not compared.
    pub tproxy_rules: usize,
}

#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub window_seconds: f64,
    pub mode: &'static str,
    pub tolerance_percent: f64,
    pub per_packet: bool,
    pub backends: Vec<BackendReport>,
    pub rules: Vec<RuleReport>,
    pub notes: Vec<String>,
    pub verdict: Verdict,
}

/// Runs the comparison: snapshot, wait `window` (Ctrl-C or SIGTERM end it early, cleanly),
/// snapshot again, judge.
pub async fn run(options: &Options) -> Result<Report> {
    let pinned = PinnedView::open(&PinRoot::new(&options.root))?;
    let state = pinned.tables.current();
    let tools = xtables::available();
    if tools.is_empty() {
        return Err(VerifyError::NoIptables);
    }
    let mut notes = BTreeSet::new();
    let mut first = snapshot(&tools, &mut notes)?;
    // A copy left by an interrupted run (kill -9) is ours: remove it before anything else.
    let leftovers: Vec<Tool> = first
        .iter()
        .filter(|(_, v)| v.copy_chain || v.copy_jumps > 0)
        .map(|(t, _)| *t)
        .collect();
    if !leftovers.is_empty() {
        let mut old = PacketCopies {
            tools: leftovers,
            errors: Vec::new(),
        };
        old.remove();
        notes.extend(old.errors.drain(..));
        notes.insert(format!(
            "removed a {COPY_CHAIN} chain left by an earlier, interrupted verify"
        ));
        first = snapshot(&tools, &mut notes)?;
    }
    let mut copies = if options.per_packet {
        Some(PacketCopies::install(&first)?)
    } else {
        None
    };

    let e0 = pinned.counters()?;
    let before = snapshot(&tools, &mut notes)?;
    let e1 = pinned.counters()?;
    let started = Instant::now();
    wait(options.window).await?;
    let e2 = pinned.counters()?;
    let after = snapshot(&tools, &mut notes)?;
    let e3 = pinned.counters()?;
    let elapsed = started.elapsed();
    if let Some(m) = copies.as_mut() {
        m.remove();
        notes.extend(m.errors.drain(..));
    }

    let ebpf = [e0, e1, e2, e3];
    Ok(report(
        options, &state, &before, &after, &ebpf, elapsed, notes,
    ))
}

async fn wait(window: Duration) -> Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let signal_error = |source| VerifyError::Signals { source };
    let mut term = signal(SignalKind::terminate()).map_err(signal_error)?;
    let mut int = signal(SignalKind::interrupt()).map_err(signal_error)?;
    tokio::select! {
        () = tokio::time::sleep(window) => Ok(()),
        _ = term.recv() => Err(VerifyError::Interrupted),
        _ = int.recv() => Err(VerifyError::Interrupted),
    }
}

fn report(
    options: &Options,
    state: &MapState,
    before: &BTreeMap<Tool, View>,
    after: &BTreeMap<Tool, View>,
    ebpf: &[Vec<u64>; 4],
    elapsed: Duration,
    mut notes: BTreeSet<String>,
) -> Report {
    let replaces_tproxy = (state.v4.rules | state.v6.rules) & rule::bit(rule::TPROXY) != 0;
    let backends = describe_backends(after, replaces_tproxy, &mut notes);
    let kube_ovn_rules = after.values().any(|v| v.has_chain);
    let mut rules = Vec::new();
    let mut disagree = !after.values().all(|v| v.unknown.is_empty());
    let mut active = false;
    for id in RULES {
        let Some(o) = observe(id, options, state, before, after, ebpf, &mut notes) else {
            continue;
        };
        let (verdict, reasons) = judge(&o, options.tolerance_bp);
        disagree |= verdict == RuleVerdict::Disagree;
        active |= verdict == RuleVerdict::Agree;
        rules.push(RuleReport {
            rule: rule_name(id),
            observation: o,
            verdict,
            reasons,
        });
    }
    if !kube_ovn_rules {
        notes.insert(
            "no nat OVN-PREROUTING chain in any iptables backend: there are no Kube-OVN rules to \
             compare with"
                .into(),
        );
    }
    let verdict = if !kube_ovn_rules {
        Verdict::Inconclusive
    } else if disagree {
        Verdict::Disagree
    } else if active {
        Verdict::Agree
    } else {
        Verdict::Inconclusive
    };
    Report {
        window_seconds: elapsed.as_secs_f64(),
        mode: if state.shadow { "shadow" } else { "enforce" },
        tolerance_percent: f64::from(options.tolerance_bp) / 100.0,
        per_packet: options.per_packet,
        backends,
        rules,
        notes: notes.into_iter().collect(),
        verdict,
    }
}

/// The backends holding Kube-OVN's rules, and what is worth noting about each.
fn describe_backends(
    after: &BTreeMap<Tool, View>,
    replaces_tproxy: bool,
    notes: &mut BTreeSet<String>,
) -> Vec<BackendReport> {
    let mut backends = Vec::new();
    for (tool, view) in after {
        if view.has_chain || view.jumps > 0 || view.tproxy > 0 {
            backends.push(BackendReport {
                tool: tool.to_string(),
                jumps: view.jumps,
                rules: view.rules.iter().map(|(id, _, _)| rule_name(*id)).collect(),
                tproxy_rules: view.tproxy,
            });
        }
        for (spec, why) in &view.unknown {
            notes.insert(format!(
                "{tool}: OVN-PREROUTING rule `{spec}` is not compared: {why}"
            ));
        }
        if view.has_chain && view.jumps == 0 {
            notes.insert(format!(
                "{tool}: Kube-OVN's jump is not in nat PREROUTING, so its rules count nothing \
                 (after cleanup-iptables?); new-connection counts unavailable"
            ));
        }
        if view.tproxy > 0 {
            let datapath = if replaces_tproxy {
                "the datapath replaces them (run --enable-tproxy)"
            } else {
                "the datapath does not replace them (run the agent with --enable-tproxy to)"
            };
            notes.insert(format!(
                "{tool}: mangle OVN-PREROUTING holds {} TPROXY rules (Kube-OVN --enable-tproxy); \
                 {datapath}; they are not compared",
                view.tproxy
            ));
        }
    }
    backends
}

/// Everything seen of rule `id`; `None` when neither side has it.
fn observe(
    id: u32,
    options: &Options,
    state: &MapState,
    before: &BTreeMap<Tool, View>,
    after: &BTreeMap<Tool, View>,
    ebpf: &[Vec<u64>; 4],
    notes: &mut BTreeSet<String>,
) -> Option<Observation> {
    let mut o = Observation::default();
    for (tool, view) in after {
        if view.packets(id).is_some() {
            o.kube_ovn.insert(tool.family);
        }
    }
    for (family, f) in [
        (IpFamily::V4, state.v4.rules),
        (IpFamily::V6, state.v6.rules),
    ] {
        if f & rule::bit(id) != 0 {
            o.ebpf.insert(family);
        }
    }
    if can_match(id, &state.v4) {
        o.ebpf_can_match.insert(IpFamily::V4);
    }
    if can_match(id, &state.v6) {
        o.ebpf_can_match.insert(IpFamily::V6);
    }
    if o.kube_ovn.is_empty() && o.ebpf.is_empty() {
        return None;
    }
    o.connections = delta(before, after, id, |v, id| {
        (v.jumps > 0).then(|| v.packets(id)).flatten()
    })
    .unwrap_or_else(|partial| {
        notes.insert(format!(
            "{}: Kube-OVN's counters went backwards (rule re-created during the window)",
            rule_name(id)
        ));
        partial
    });
    if options.per_packet {
        o.packets = delta(before, after, id, |v, id| v.copies.get(&id).copied())
            .unwrap_or_else(|partial| partial);
    }
    let at = |i: usize| ebpf[i].get(id as usize).copied().unwrap_or(0);
    o.ebpf_packets = (at(2).saturating_sub(at(1)), at(3).saturating_sub(at(0)));
    Some(o)
}

/// Sum over backends of `after - before` for the counter `get` picks. `Err` carries the partial
/// sum when some counter went backwards (its rule was re-created).
fn delta(
    before: &BTreeMap<Tool, View>,
    after: &BTreeMap<Tool, View>,
    id: u32,
    get: impl Fn(&View, u32) -> Option<u64>,
) -> std::result::Result<Option<u64>, Option<u64>> {
    let mut total = None;
    let mut reset = false;
    for (tool, view) in after {
        let Some(now) = get(view, id) else {
            continue;
        };
        let then = before.get(tool).and_then(|v| get(v, id)).unwrap_or(0);
        if now < then {
            reset = true;
        }
        *total.get_or_insert(0) += now.saturating_sub(then);
    }
    if reset { Err(total) } else { Ok(total) }
}

impl Report {
    pub fn text(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "window {:.1}s, datapath in {} mode, tolerance {}%{}",
            self.window_seconds,
            self.mode,
            self.tolerance_percent,
            if self.per_packet {
                ""
            } else {
                ", connection counts only"
            }
        );
        for b in &self.backends {
            let _ = writeln!(
                out,
                "{:<17} jump ×{}, OVN-PREROUTING: {}{}",
                b.tool,
                b.jumps,
                if b.rules.is_empty() {
                    "no rules".to_owned()
                } else {
                    b.rules.join(" ")
                },
                if b.tproxy_rules > 0 {
                    format!(", mangle TPROXY rules: {}", b.tproxy_rules)
                } else {
                    String::new()
                }
            );
        }
        let _ = writeln!(
            out,
            "\n{:<5} {:<11} {:<11} {:>16} {:>16} {:>16}  verdict",
            "rule", "Kube-OVN", "eBPF", "new conns (ipt)", "packets (ipt)", "packets (eBPF)"
        );
        let families = |s: &BTreeSet<IpFamily>| {
            if s.is_empty() {
                "-".to_owned()
            } else {
                s.iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(",")
            }
        };
        let count = |c: Option<u64>| c.map_or_else(|| "-".to_owned(), |c| c.to_string());
        for r in &self.rules {
            let o = &r.observation;
            let _ = writeln!(
                out,
                "{:<5} {:<11} {:<11} {:>16} {:>16} {:>16}  {}",
                r.rule,
                families(&o.kube_ovn),
                families(&o.ebpf),
                count(o.connections),
                count(o.packets),
                range(o.ebpf_packets.0, o.ebpf_packets.1),
                match r.verdict {
                    RuleVerdict::Agree => "agree",
                    RuleVerdict::Disagree => "DISAGREE",
                    RuleVerdict::Idle => "idle (no traffic hit it)",
                }
            );
            for reason in &r.reasons {
                let _ = writeln!(out, "      {reason}");
            }
        }
        for note in &self.notes {
            let _ = writeln!(out, "note: {note}");
        }
        let _ = writeln!(
            out,
            "\nresult: {}",
            match self.verdict {
                Verdict::Agree => "AGREE — every rule that saw traffic matched Kube-OVN's",
                Verdict::Disagree => "DISAGREE — see the rules above before switching to enforce",
                Verdict::Inconclusive =>
                    "INCONCLUSIVE — nothing to compare (no traffic hit any rule, or no Kube-OVN \
                     rules); lengthen --window or send traffic",
            }
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::xtables::split_words;

    fn id(family: IpFamily, spec: &str) -> std::result::Result<u32, String> {
        identify(family, &split_words(spec))
    }

    #[test]
    fn kube_ovns_rules_are_recognised_in_both_families() {
        let cases = [
            (
                IpFamily::V4,
                "-i ovn0 -m set --match-set ovn40subnets src -m set --match-set KUBE-CLUSTER-IP dst,dst -j MARK --set-xmark 0x4000/0x4000",
                rule::R1A,
            ),
            (
                IpFamily::V6,
                "-i ovn0 -m set --match-set ovn60subnets src -m set --match-set ovn60services dst -j MARK --set-xmark 0x4000/0x4000",
                rule::R1B,
            ),
            (
                IpFamily::V4,
                "-p tcp -m addrtype --dst-type LOCAL -m set --match-set KUBE-NODE-PORT-LOCAL-TCP dst -j MARK --set-xmark 0x80000/0x80000",
                rule::R2T,
            ),
            (
                IpFamily::V6,
                "-p udp -m addrtype --dst-type LOCAL -m set --match-set KUBE-6-NODE-PORT-LOCAL-UDP dst -j MARK --set-xmark 0x80000/0x80000",
                rule::R2U,
            ),
            (
                IpFamily::V4,
                "-p tcp -m set --match-set ovn40other-node src -m set --match-set KUBE-NODE-PORT-LOCAL-TCP dst -j MARK --set-xmark 0x4000/0x4000",
                rule::R3T,
            ),
            (
                IpFamily::V6,
                "-p udp -m udp -m set --match-set ovn60other-node src -m set --match-set KUBE-6-NODE-PORT-LOCAL-UDP dst -j MARK --set-xmark 0x4000/0x4000",
                rule::R3U,
            ),
        ];
        for (family, spec, want) in cases {
            assert_eq!(id(family, spec), Ok(want), "{spec}");
        }
    }

    #[test]
    fn anything_else_is_refused_with_a_reason() {
        for (family, spec) in [
            // Wrong family's set names.
            (
                IpFamily::V6,
                "-i ovn0 -m set --match-set ovn40subnets src -m set --match-set ovn40services dst -j MARK --set-xmark 0x4000/0x4000",
            ),
            // Wrong mark for the rule.
            (
                IpFamily::V4,
                "-p tcp -m addrtype --dst-type LOCAL -m set --match-set KUBE-NODE-PORT-LOCAL-TCP dst -j MARK --set-xmark 0x4000/0x4000",
            ),
            // An extra match.
            (
                IpFamily::V4,
                "-p tcp -m tcp --dport 80 -m set --match-set ovn40other-node src -m set --match-set KUBE-NODE-PORT-LOCAL-TCP dst -j MARK --set-xmark 0x4000/0x4000",
            ),
            // A negation.
            (
                IpFamily::V4,
                "! -i ovn0 -m set --match-set ovn40subnets src -m set --match-set ovn40services dst -j MARK --set-xmark 0x4000/0x4000",
            ),
            // R3 with the TCP set but UDP.
            (
                IpFamily::V4,
                "-p udp -m set --match-set ovn40other-node src -m set --match-set KUBE-NODE-PORT-LOCAL-TCP dst -j MARK --set-xmark 0x4000/0x4000",
            ),
            // The older generation's target.
            (
                IpFamily::V4,
                "-i ovn0 -m set --match-set ovn40subnets src -m set --match-set ovn40services dst -j MARK --set-xmark 0x40000/0x40000",
            ),
        ] {
            let result = id(family, spec);
            assert!(result.is_err(), "{spec} → {result:?}");
        }
    }

    #[test]
    fn copies_match_without_the_target() {
        let words = split_words(
            "-p udp -m set --match-set ovn40other-node src -m set --match-set KUBE-NODE-PORT-LOCAL-UDP dst -j MARK --set-xmark 0x4000/0x4000",
        );
        assert_eq!(
            xtables::join_words(matches_only(&words)),
            "-p udp -m set --match-set ovn40other-node src -m set --match-set KUBE-NODE-PORT-LOCAL-UDP dst"
        );
    }

    fn both() -> BTreeSet<IpFamily> {
        IpFamily::ALL.into_iter().collect()
    }

    fn seen(connections: u64, packets: u64, ebpf: (u64, u64)) -> Observation {
        Observation {
            kube_ovn: both(),
            ebpf: both(),
            ebpf_can_match: both(),
            connections: Some(connections),
            packets: Some(packets),
            ebpf_packets: ebpf,
        }
    }

    #[test]
    fn per_connection_and_per_packet_counts_agree_when_consistent() {
        // 10 connections of 3 packets: Kube-OVN counts 10, its per-packet copy 30, we 30.
        assert_eq!(judge(&seen(10, 30, (30, 30)), 0).0, RuleVerdict::Agree);
        // The bracket: iptables' count may fall anywhere inside the datapath's interval.
        assert_eq!(judge(&seen(10, 31, (30, 33)), 0).0, RuleVerdict::Agree);
        assert_eq!(judge(&seen(0, 0, (0, 0)), 0).0, RuleVerdict::Idle);
        // Only packets of established connections: no new connection, still consistent.
        assert_eq!(judge(&seen(0, 5, (5, 5)), 0).0, RuleVerdict::Agree);
    }

    #[test]
    fn a_datapath_that_misses_or_overmatches_disagrees() {
        let (verdict, reasons) = judge(&seen(10, 30, (0, 0)), 0);
        assert_eq!(verdict, RuleVerdict::Disagree);
        assert_eq!(reasons.len(), 2, "{reasons:?}");
        // Over-matching: invisible to connection counts, caught per packet.
        let (verdict, reasons) = judge(&seen(0, 0, (40, 40)), 0);
        assert_eq!(verdict, RuleVerdict::Disagree);
        assert!(reasons[0].contains("per packet"), "{reasons:?}");
        // Connection counts alone still catch a miss.
        let mut o = seen(10, 0, (3, 3));
        o.packets = None;
        assert_eq!(judge(&o, 0).0, RuleVerdict::Disagree);
    }

    #[test]
    fn tolerance_is_a_share_of_the_datapath_count_rounded_down() {
        // 1% of 1000 = 10 packets.
        assert_eq!(
            judge(&seen(5, 990, (1000, 1000)), 100).0,
            RuleVerdict::Agree
        );
        assert_eq!(
            judge(&seen(5, 989, (1000, 1000)), 100).0,
            RuleVerdict::Disagree
        );
        // 1% of 99 rounds down to 0: small counts must match exactly.
        assert_eq!(judge(&seen(5, 98, (99, 99)), 100).0, RuleVerdict::Disagree);
    }

    #[test]
    fn rule_sets_must_match_per_family() {
        let mut o = seen(0, 0, (0, 0));
        o.ebpf.remove(&IpFamily::V6);
        o.ebpf_can_match.remove(&IpFamily::V6);
        let (verdict, reasons) = judge(&o, 0);
        assert_eq!(verdict, RuleVerdict::Disagree);
        assert!(reasons[0].starts_with("IPv6: Kube-OVN has"), "{reasons:?}");
        // In force but with empty maps (e.g. no IPv6 ETP=Local Service): nothing to match, and
        // Kube-OVN lacking the rule is no disagreement.
        let mut o = seen(0, 0, (0, 0));
        o.kube_ovn.remove(&IpFamily::V6);
        o.ebpf_can_match.remove(&IpFamily::V6);
        assert_eq!(judge(&o, 0).0, RuleVerdict::Idle);
        o.ebpf_can_match.insert(IpFamily::V6);
        assert_eq!(judge(&o, 0).0, RuleVerdict::Disagree);
    }

    #[test]
    fn views_read_jumps_rules_copies_and_tproxy() {
        let tool = Tool {
            family: IpFamily::V4,
            backend: xtables::Backend::Nft,
        };
        let saved = xtables::parse_save(
            "*nat\n:PREROUTING ACCEPT [0:0]\n:OVN-PREROUTING - [0:0]\n\
             [9:0] -A PREROUTING -m comment --comment \"kube-ovn prerouting rules\" -j OVN-PREROUTING\n\
             [4:0] -A OVN-PREROUTING -p udp -m addrtype --dst-type LOCAL -m set --match-set KUBE-NODE-PORT-LOCAL-UDP dst -j MARK --set-xmark 0x80000/0x80000\n\
             [1:0] -A OVN-PREROUTING -p sctp -j MARK --set-xmark 0x4000/0x4000\nCOMMIT\n\
             *raw\n:PREROUTING ACCEPT [0:0]\n:KOVN-VERIFY - [0:0]\n\
             [0:0] -A PREROUTING -m comment --comment \"kube-ovn-ebpf verify\" -j KOVN-VERIFY\n\
             [12:0] -A KOVN-VERIFY ! -i lo -p udp -m addrtype --dst-type LOCAL -m set --match-set KUBE-NODE-PORT-LOCAL-UDP dst -m comment --comment \"kovn-verify R2u\"\nCOMMIT\n\
             *mangle\n:OVN-PREROUTING - [0:0]\n\
             -A OVN-PREROUTING -d 10.0.1.5/32 -p tcp -m tcp --dport 8080 -j TPROXY --on-port 8102 --on-ip 192.168.0.11 --tproxy-mark 0x90004/0x90004\nCOMMIT\n",
        );
        let view = View::of(tool, &saved);
        assert_eq!(view.jumps, 1);
        assert_eq!(view.packets(rule::R2U), Some(4));
        assert_eq!(view.packets(rule::R2T), None);
        assert_eq!(view.unknown.len(), 1);
        assert_eq!(view.copies.get(&rule::R2U), Some(&12));
        assert_eq!((view.copy_chain, view.copy_jumps), (true, 1));
        assert_eq!(view.tproxy, 1);
    }
}
