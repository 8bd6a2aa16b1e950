//! Coexistence (issue 4 §4): other components write nat PREROUTING while traffic runs.
//!
//! Actors, each a thread that runs one pass, sleeps 100 ms ± 50 % (jitter, so every
//! interleaving of the writers occurs) and stops by itself at the deadline:
//! - **Calico** (felix "insert" mode): removes its `cali-PREROUTING` jump and inserts it again at
//!   position 1, in one `iptables-restore --noflush` transaction, on every pass;
//! - **kube-proxy**: `-C` its `KUBE-SERVICES` jump and `-A` it when missing (`EnsureRule`);
//! - **Kube-OVN** (iptables hook only): one pass of the chosen generation's jump positioning
//!   ([`kube_ovn::ensure_prerouting_jump`]). Kube-OVN runs it every 3 s; here it runs at the same
//!   100 ms ± 50 % as the others, so a short run sees the interleavings hours of a real node would.
//!
//! The control-plane vectors C1–C6 (spec §5.4) run first, one pass each on a fixed chain, to show
//! the reproduction is faithful before it is let loose.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    sync::atomic::{AtomicBool, Ordering},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, ensure};

use super::scenarios::{self, Scenario};
use crate::node::{
    Cluster, Family, HookKind, HookOptions, Host, KubeProxyMode, Node, NodeSpec, cleanup,
    kube_ovn::{self, PREROUTING_JUMP, Positioning},
    kube_proxy::SERVICES_JUMP,
    netns::NetNs,
};

pub const CALI_JUMP: &str =
    "-A PREROUTING -m comment --comment \"cali:6gwbT8clXdHdC1b1\" -j cali-PREROUTING";
pub const CNI_JUMP: &str = "-A PREROUTING -m addrtype --dst-type LOCAL -j CNI-HOSTPORT-DNAT";

/// The rule spec of a `-A PREROUTING …` line, for `-I`/`-D`/`-C`.
fn spec(line: &str) -> &str {
    line.strip_prefix("-A PREROUTING ")
        .expect("a PREROUTING rule line")
}

/// Calico's and the CNI hostport plugin's nat chains and jumps, as on a Canal/RKE2 node: Calico
/// first, hostport last. The chains hold nothing that matches the scenarios' traffic.
pub fn install_neighbours(ns: &NetNs) -> Result<()> {
    let script = format!(
        "*nat\n:cali-PREROUTING - [0:0]\n:cali-fip-dnat - [0:0]\n:CNI-HOSTPORT-DNAT - [0:0]\n\
         -A cali-PREROUTING -m comment --comment \"cali:r6XmIziWUJsdOK6Z\" -j cali-fip-dnat\n\
         -I PREROUTING 1 {}\n{CNI_JUMP}\nCOMMIT\n",
        spec(CALI_JUMP)
    );
    for family in Family::ALL {
        ns.run_stdin(family.iptables_restore(), &["--noflush"], &script)?;
    }
    Ok(())
}

/// Calico's raw `cali-PREROUTING`, which starts by clearing its mark bits (spec §1.4).
pub fn install_calico_raw_clobber(ns: &NetNs) -> Result<()> {
    let script = format!(
        "*raw\n:cali-PREROUTING - [0:0]\n\
         -A cali-PREROUTING -m comment --comment \"cali:XFX5xbM8B9qR10JG\" -j MARK \
         --set-xmark 0x0/{:#x}\n-I PREROUTING 1 {}\nCOMMIT\n",
        scenarios::CALICO_RAW_CLEARED,
        spec(CALI_JUMP)
    );
    for family in Family::ALL {
        ns.run_stdin(family.iptables_restore(), &["--noflush"], &script)?;
    }
    Ok(())
}

/// One control-plane vector of spec §5.4.
pub struct VectorResult {
    pub id: &'static str,
    pub family: Family,
    pub version: Positioning,
    pub start: Vec<&'static str>,
    pub expected: Vec<&'static str>,
    pub got: Vec<String>,
    pub expected_error: Option<&'static str>,
    pub error: Option<String>,
    pub ok: bool,
}

/// Short names for chain listings.
pub fn short(line: &str) -> &str {
    match line {
        l if l == PREROUTING_JUMP => "ovn",
        l if l == CALI_JUMP => "cali",
        l if l == SERVICES_JUMP => "KUBE",
        l if l == CNI_JUMP => "CNI",
        l => l,
    }
}

pub fn line(name: &str) -> &'static str {
    match name {
        "ovn" => PREROUTING_JUMP,
        "cali" => CALI_JUMP,
        "KUBE" => SERVICES_JUMP,
        "CNI" => CNI_JUMP,
        _ => unreachable!("vector rule name"),
    }
}

type VectorDef = (
    &'static str,
    Positioning,
    &'static [&'static str],
    &'static [&'static str],
    Option<&'static str>,
);

const VECTORS: &[VectorDef] = &[
    (
        "C1",
        Positioning::V1_13_15,
        &["cali", "KUBE", "CNI"],
        &["ovn", "cali", "KUBE", "CNI"],
        None,
    ),
    (
        "C2",
        Positioning::V1_13_15,
        &["cali", "ovn", "KUBE", "CNI"],
        &["cali", "ovn", "KUBE", "CNI"],
        None,
    ),
    (
        "C3",
        Positioning::V1_13_15,
        &["cali", "KUBE", "ovn", "CNI"],
        &["cali", "ovn", "KUBE", "CNI"],
        None,
    ),
    ("C4", Positioning::V1_13_13, &["ovn"], &["ovn"], None),
    ("C4", Positioning::V1_13_15, &["ovn"], &["ovn"], None),
    (
        "C5",
        Positioning::V1_13_0,
        &["ovn", "cali", "ovn", "ovn"],
        &["ovn", "cali", "ovn"],
        Some("Index of deletion too big"),
    ),
    (
        "C6",
        Positioning::V1_13_0,
        &["ovn", "cali", "ovn", "ovn", "KUBE", "CNI"],
        &["ovn", "cali", "ovn", "CNI"],
        None,
    ),
];

/// Runs C1–C6 with the real iptables in a scratch namespace, both families.
pub fn control_plane_vectors() -> Result<Vec<VectorResult>> {
    let ns = NetNs::create(&format!("{}-cvec", cleanup::unique_stem()))?;
    for family in Family::ALL {
        let ipt = family.iptables();
        for chain in [
            "OVN-PREROUTING",
            "cali-PREROUTING",
            "KUBE-SERVICES",
            "CNI-HOSTPORT-DNAT",
        ] {
            ns.run(ipt, &["-t", "nat", "-N", chain])?;
        }
    }
    let mut results = Vec::new();
    for family in Family::ALL {
        for &(id, version, start, expected, expected_error) in VECTORS {
            ns.run(family.iptables(), &["-t", "nat", "-F", "PREROUTING"])?;
            let mut script = String::from("*nat\n");
            for name in start {
                let _ = writeln!(script, "{}", line(name));
            }
            script.push_str("COMMIT\n");
            ns.run_stdin(family.iptables_restore(), &["--noflush"], &script)?;
            let log = kube_ovn::ensure_prerouting_jump(&ns, family, version)?;
            let got: Vec<String> = kube_ovn::list_prerouting(&ns, family)?
                .iter()
                .skip(1)
                .map(|l| short(l).to_owned())
                .collect();
            let error_ok = match (expected_error, &log.error) {
                (None, None) => true,
                (Some(want), Some(e)) => e.contains(want),
                _ => false,
            };
            results.push(VectorResult {
                id,
                family,
                version,
                start: start.to_vec(),
                expected: expected.to_vec(),
                ok: error_ok && got == expected,
                got,
                expected_error,
                error: log.error,
            });
        }
    }
    Ok(results)
}

#[derive(Clone, Copy, Debug)]
enum Actor {
    Calico,
    KubeProxy,
    KubeOvn(Positioning),
}

impl Actor {
    fn name(self) -> String {
        match self {
            Self::Calico => "Calico (felix insert mode)".into(),
            Self::KubeProxy => "kube-proxy".into(),
            Self::KubeOvn(v) => v.label().into(),
        }
    }
}

/// What one actor did and saw.
#[derive(Debug, Default)]
pub struct ActorStats {
    pub name: String,
    pub passes: usize,
    pub counts: BTreeMap<&'static str, usize>,
    /// iptables error text → occurrences.
    pub errors: BTreeMap<String, usize>,
    /// The first notable events, with the time since the start.
    pub samples: Vec<String>,
    pub max_ovn_copies: usize,
}

impl ActorStats {
    fn note(&mut self, started: Instant, what: &'static str, detail: &str) {
        *self.counts.entry(what).or_default() += 1;
        if self.samples.len() < 6 {
            self.samples.push(format!(
                "t={:6.3}s {}: {what}{detail}",
                started.elapsed().as_secs_f64(),
                self.name
            ));
        }
    }

    /// Counts `text` by iptables' own message (the part after the command line), so "Index of
    /// deletion too big" at different positions is one entry; the full text goes to the samples.
    fn error(&mut self, started: Instant, text: &str) {
        let last_line = text.lines().last().unwrap_or(text);
        let message = last_line
            .rsplit("]: ")
            .next()
            .unwrap_or(last_line)
            .trim()
            .to_owned();
        *self.errors.entry(message).or_default() += 1;
        if self.samples.len() < 12 {
            self.samples.push(format!(
                "t={:6.3}s {}: ERROR {text}",
                started.elapsed().as_secs_f64(),
                self.name
            ));
        }
    }
}

/// A small xorshift generator: jitter only, no need for a crate.
pub(super) struct Jitter(u64);

impl Jitter {
    pub(super) fn new(seed: u64) -> Self {
        Self(seed | 1)
    }

    /// `period` × a uniform factor in [0.5, 1.5).
    pub(super) fn around(&mut self, period: Duration) -> Duration {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        #[expect(clippy::cast_precision_loss, reason = "a jitter fraction")]
        let unit = (self.0 >> 11) as f64 / (1u64 << 53) as f64;
        period.mul_f64(0.5 + unit)
    }
}

const ACTOR_PERIOD: Duration = Duration::from_millis(100);
const IPT_TIMEOUT: Duration = Duration::from_secs(10);

fn actor_loop(
    ns: &NetNs,
    actor: Actor,
    stop: &AtomicBool,
    deadline: Instant,
    seed: u64,
) -> ActorStats {
    let started = Instant::now();
    let mut stats = ActorStats {
        name: actor.name(),
        ..ActorStats::default()
    };
    let mut jitter = Jitter::new(seed);
    while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
        thread::sleep(jitter.around(ACTOR_PERIOD));
        stats.passes += 1;
        for family in Family::ALL {
            if let Err(e) = actor_pass(ns, family, actor, &mut stats, started) {
                stats.error(started, &format!("{e:#}"));
            }
        }
    }
    stats
}

fn actor_pass(
    ns: &NetNs,
    family: Family,
    actor: Actor,
    stats: &mut ActorStats,
    started: Instant,
) -> Result<()> {
    match actor {
        Actor::Calico => calico_pass(ns, family, stats, started),
        Actor::KubeProxy => kube_proxy_pass(ns, family, stats, started),
        Actor::KubeOvn(version) => {
            let log = kube_ovn::ensure_prerouting_jump(ns, family, version)?;
            stats.max_ovn_copies = stats.max_ovn_copies.max(log.copies_seen);
            *stats.counts.entry("jump inserted").or_default() += log.inserted;
            *stats.counts.entry("deleted by position").or_default() += log.deleted;
            if let Some(e) = &log.error {
                stats.error(started, &format!("{family}: {e}"));
            } else if log.deleted > 0 && stats.samples.len() < 6 {
                stats.samples.push(format!(
                    "t={:6.3}s {}: {family}: {}",
                    started.elapsed().as_secs_f64(),
                    stats.name,
                    log.actions.join("; ")
                ));
            }
            Ok(())
        }
    }
}

pub(super) fn calico_pass(
    ns: &NetNs,
    family: Family,
    stats: &mut ActorStats,
    started: Instant,
) -> Result<()> {
    let rules = kube_ovn::list_prerouting(ns, family)?;
    let ovn_copies = rules.iter().filter(|r| *r == PREROUTING_JUMP).count();
    stats.max_ovn_copies = stats.max_ovn_copies.max(ovn_copies);
    let copies = rules.iter().filter(|r| *r == CALI_JUMP).count();
    if copies == 0 {
        stats.note(
            started,
            "cali-PREROUTING jump found deleted",
            &format!(" ({family})"),
        );
    } else if rules.get(1).map(String::as_str) != Some(CALI_JUMP) {
        *stats.counts.entry("found below position 1").or_default() += 1;
    }
    // Re-insert at 1 on every pass, whatever it found: the most churn a felix in insert mode
    // can cause, in one atomic transaction as felix writes.
    let mut script = String::from("*nat\n");
    for _ in 0..copies {
        let _ = writeln!(script, "-D PREROUTING {}", spec(CALI_JUMP));
    }
    let _ = writeln!(script, "-I PREROUTING 1 {}\nCOMMIT", spec(CALI_JUMP));
    let out = crate::node::exec::run_bounded(
        ns.command(family.iptables_restore()).arg("--noflush"),
        Some(&script),
        IPT_TIMEOUT,
    )?;
    if out.status.success() {
        *stats.counts.entry("re-inserted at position 1").or_default() += 1;
    } else {
        stats.error(
            started,
            &format!("{family}: {}", String::from_utf8_lossy(&out.stderr).trim()),
        );
    }
    Ok(())
}

fn kube_proxy_pass(
    ns: &NetNs,
    family: Family,
    stats: &mut ActorStats,
    started: Instant,
) -> Result<()> {
    let rule: Vec<&str> = ["-t", "nat", "-C", "PREROUTING"]
        .into_iter()
        .chain(shell_words(spec(SERVICES_JUMP)))
        .collect();
    if ns
        .output(family.iptables(), &rule, IPT_TIMEOUT)?
        .status
        .success()
    {
        return Ok(());
    }
    stats.note(
        started,
        "KUBE-SERVICES jump found deleted, re-appended",
        &format!(" ({family})"),
    );
    let mut append = rule;
    append[2] = "-A";
    let out = ns.output(family.iptables(), &append, IPT_TIMEOUT)?;
    if !out.status.success() {
        stats.error(
            started,
            &format!("{family}: {}", String::from_utf8_lossy(&out.stderr).trim()),
        );
    }
    Ok(())
}

/// Splits a rule spec on spaces, keeping a double-quoted comment whole (without the quotes).
fn shell_words(spec: &str) -> Vec<&str> {
    let mut words = Vec::new();
    let mut rest = spec;
    while !rest.is_empty() {
        rest = rest.trim_start();
        if let Some(quoted) = rest.strip_prefix('"') {
            let end = quoted.find('"').expect("closing quote");
            words.push(&quoted[..end]);
            rest = &quoted[end + 1..];
        } else {
            let end = rest.find(' ').unwrap_or(rest.len());
            words.push(&rest[..end]);
            rest = &rest[end..];
        }
    }
    words
}

/// One coexistence run's numbers.
pub struct CoexistResult {
    pub hook: HookKind,
    /// Connections made; fewer than `requested` if the run hit its deadline.
    pub connections: usize,
    pub requested: usize,
    /// "scenario: want X, got Y" → occurrences.
    pub wrong: BTreeMap<String, usize>,
    pub actors: Vec<ActorStats>,
    /// nat PREROUTING (IPv4) when the run ended.
    pub final_chain: Vec<String>,
    pub elapsed: Duration,
}

impl CoexistResult {
    pub fn wrong_total(&self) -> usize {
        self.wrong.values().sum()
    }
}

pub struct CoexistConfig {
    pub connections: usize,
    /// Connections are spread over this long, so the actors get many passes in.
    pub duration: Duration,
    pub probe_timeout: Duration,
}

/// Builds an IPVS-mode node with `hook`, starts the actors and runs `connections` connections of
/// the coexistence mix, counting every outcome that differs from the marked expectation.
pub fn run(
    hook: HookKind,
    positioning: Option<Positioning>,
    options: &HookOptions,
    config: &CoexistConfig,
) -> Result<CoexistResult> {
    let started = Instant::now();
    let mut node = Node::build(NodeSpec {
        cluster: Cluster::fixture(),
        kube_proxy: KubeProxyMode::Ipvs,
    })?;
    install_neighbours(node.ns(Host::Node))?;
    node.install_hook(hook, options)?;
    let mix: Vec<Scenario> = scenarios::all().into_iter().filter(|s| s.coexist).collect();
    let mut actors = vec![Actor::Calico, Actor::KubeProxy];
    actors.extend(positioning.map(Actor::KubeOvn));
    // Actors stop themselves at this deadline even if the traffic loop never returns.
    let deadline = Instant::now() + config.duration * 2 + Duration::from_secs(30);
    let stop = AtomicBool::new(false);
    let (traffic, actor_stats) = thread::scope(|s| {
        let node_ns = node.ns(Host::Node);
        let handles: Vec<_> = actors
            .iter()
            .enumerate()
            .map(|(i, &actor)| {
                let stop = &stop;
                let seed = u64::from(started.elapsed().subsec_nanos()) ^ ((i as u64 + 1) << 32);
                s.spawn(move || actor_loop(node_ns, actor, stop, deadline, seed))
            })
            .collect();
        let traffic = traffic_loop(&node, &mix, config);
        stop.store(true, Ordering::Relaxed);
        let stats: Vec<ActorStats> = handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
            .collect();
        (traffic, stats)
    });
    let (connections, wrong) = traffic?;
    if let Some(hook) = node.hook_mut() {
        hook.check().context("after the coexistence traffic")?;
    }
    let final_chain = kube_ovn::list_prerouting(node.ns(Host::Node), Family::V4)?
        .iter()
        .skip(1)
        .map(|l| short(l).to_owned())
        .collect();
    Ok(CoexistResult {
        hook,
        connections,
        requested: config.connections,
        wrong,
        actors: actor_stats,
        final_chain,
        elapsed: started.elapsed(),
    })
}

pub(super) type Traffic = Result<(usize, BTreeMap<String, usize>)>;

pub(super) fn traffic_loop(node: &Node, mix: &[Scenario], config: &CoexistConfig) -> Traffic {
    ensure!(!mix.is_empty(), "empty coexistence mix");
    let interval = config.duration / u32::try_from(config.connections.max(1)).unwrap_or(u32::MAX);
    let started = Instant::now();
    // Slow failures (timeouts) must not stretch the run without bound.
    let deadline = started + config.duration * 3 + Duration::from_secs(30);
    let mut wrong: BTreeMap<String, usize> = BTreeMap::new();
    let mut made = 0;
    for i in 0..config.connections {
        if Instant::now() > deadline {
            break;
        }
        let scenario = &mix[i % mix.len()];
        let want = &scenario
            .expect(KubeProxyMode::Ipvs)
            .context("coexistence scenarios are IPVS-mode scenarios")?
            .marked;
        let got = node.probe(&scenario.probe, config.probe_timeout)?;
        made += 1;
        if &got != want {
            *wrong
                .entry(format!(
                    "{} [{}]: want {want}, got {got}",
                    scenario.what, scenario.probe
                ))
                .or_default() += 1;
        }
        // Pace the connections over the configured duration.
        let due = interval * u32::try_from(i + 1).unwrap_or(u32::MAX);
        if let Some(wait) = due.checked_sub(started.elapsed()) {
            thread::sleep(wait);
        }
    }
    Ok((made, wrong))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shell_words_keeps_quoted_comments() {
        assert_eq!(
            shell_words(spec(SERVICES_JUMP)),
            [
                "-m",
                "comment",
                "--comment",
                "kubernetes service portals",
                "-j",
                "KUBE-SERVICES"
            ]
        );
    }

    #[test]
    fn jitter_stays_within_half_a_period() {
        let mut j = Jitter::new(42);
        for _ in 0..1000 {
            let d = j.around(Duration::from_millis(100));
            assert!(
                d >= Duration::from_millis(50) && d < Duration::from_millis(150),
                "{d:?}"
            );
        }
    }
}
