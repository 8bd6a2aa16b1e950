//! Faults (issue 4 §5) on one IPVS-mode node with the eBPF agent, in order:
//!
//! 1. **kill -9** of the agent while new connections of the mark-dependent scenarios flow; it is
//!    restarted on the same pins. No connection may get the unmarked outcome, neither while the
//!    agent is gone nor after it is back, and the attachments (tcx link ids) must not change.
//! 2. **upgrade**: SIGTERM, then a rebuilt agent whose program differs only in code generation
//!    (`KOVN_EBPF_SALT=1`: same behaviour, another tag) starts on the same pins and swaps
//!    its program into the existing attachments (`bpf_link_update`, or a netlink filter
//!    replace). Zero wrong connections, a new program id, the same link ids, the old program
//!    freed. Then the **downgrade**, the same way.
//! 3. **`ovn0` deleted and re-created** (same name, addresses and routes, as kube-ovn-cni's
//!    `loopOvn0Check` does): marking must resume within 1 s of the re-creation.
//! 4. **detach** with another component's tc filters and tcx programs on `eth0` (added before the
//!    agent started) and `ovn0`: every scenario gives the no-hook outcome afterwards, the foreign
//!    objects are untouched, and nothing is left pinned under the agent's bpffs root.
//!
//! Connections are judged by what the receiver saw, exactly as in the differential tables. Every
//! loop is bounded in count and time.

use std::{
    collections::{BTreeMap, HashMap},
    fmt::{self, Write as _},
    path::{Path, PathBuf},
    sync::atomic::{AtomicBool, AtomicUsize, Ordering},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, ensure};
use kube_ovn_ebpf_common::names;
use kube_ovn_testkit::agent::{Attachment, Program};

use super::scenarios::{self, Expect, Scenario};
use crate::node::{
    Cluster, Hook, HookKind, HookOptions, Host, KubeProxyMode, Node, NodeSpec, Outcome,
    agent::Agent,
    bpf::{self, ForeignTcx},
    netns::{self, NetNs},
    traffic,
};

/// The program's name as the kernel reports it.
const OUR_PROGRAM: &str = names::PROGRAM;

/// One new connection every 10 ms: 100 per second, from one thread.
const PACE: Duration = Duration::from_millis(10);
/// The most any steady-traffic window may run, whatever the fault does.
const TRAFFIC_LIMIT: Duration = Duration::from_secs(90);
/// Fewer connections than this inside a fault window would prove nothing.
const MIN_IN_WINDOW: usize = 20;
/// Marking must resume this soon after `ovn0` is re-created (issue 4 §5).
const OVN0_BUDGET: Duration = Duration::from_secs(1);
/// How long the resume probe keeps trying before giving up (to report the time anyway).
const OVN0_GIVE_UP: Duration = Duration::from_secs(5);

/// How the agent attaches (`--attach`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Attach {
    Tcx,
    Netlink,
}

impl fmt::Display for Attach {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Tcx => "tcx",
            Self::Netlink => "netlink",
        })
    }
}

/// How long each part of the faults runs.
pub struct FaultConfig {
    pub quick: bool,
    pub probe_timeout: Duration,
}

impl FaultConfig {
    /// Steady traffic before a fault, so the fault hits a flowing stream.
    fn lead_in(&self) -> Duration {
        Duration::from_millis(if self.quick { 300 } else { 1000 })
    }

    /// How long the agent stays dead after kill -9 (its restart comes on top).
    fn down(&self) -> Duration {
        Duration::from_secs(if self.quick { 1 } else { 3 })
    }

    /// Steady traffic after a fault.
    fn tail(&self) -> Duration {
        Duration::from_secs(if self.quick { 1 } else { 3 })
    }

    fn kill_cycles(&self) -> usize {
        if self.quick { 1 } else { 3 }
    }
}

/// One row of the fault table.
pub struct FaultRow {
    pub fault: String,
    pub connections: String,
    pub wrong: usize,
    pub links_kept: String,
    pub resume: String,
    /// Printed under the table.
    pub notes: Vec<String>,
    pub failures: Vec<String>,
}

impl FaultRow {
    fn new(fault: impl Into<String>) -> Self {
        Self {
            fault: fault.into(),
            connections: String::new(),
            wrong: 0,
            links_kept: "—".into(),
            resume: "—".into(),
            notes: Vec::new(),
            failures: Vec::new(),
        }
    }

    fn check(&mut self, ok: bool, failure: impl FnOnce() -> String) {
        if !ok {
            let failure = failure();
            self.failures.push(format!("{}: {failure}", self.fault));
        }
    }

    /// Records a traffic window: the total, the connections in the fault's own phase (which
    /// must be enough to show something) and every wrong outcome as a failure.
    fn traffic(&mut self, names: &[&str], counts: &[PhaseCount], window: usize, min: usize) {
        let total: usize = counts.iter().map(|c| c.connections).sum();
        self.connections = format!("{total} ({} {})", counts[window].connections, names[window]);
        for (name, count) in names.iter().zip(counts) {
            for (what, n) in &count.wrong {
                self.failures
                    .push(format!("{}: {name}: ×{n} {what}", self.fault));
            }
            self.wrong += count.wrong_total();
        }
        self.check(counts[window].connections >= min, || {
            format!(
                "only {} connections {}: too few to show anything",
                counts[window].connections, names[window]
            )
        });
    }

    /// The attachments must be the very same objects as before.
    fn same_attachments(&mut self, before: &View, after: &View) {
        let kept = before.idents() == after.idents();
        self.links_kept = if kept {
            format!("yes ({})", after.idents_text())
        } else {
            format!("NO ({} → {})", before.idents_text(), after.idents_text())
        };
        self.check(kept, || {
            format!(
                "attachments changed: {} → {}",
                before.idents_text(),
                after.idents_text()
            )
        });
    }
}

pub struct FaultResults {
    pub attach: Attach,
    pub rows: Vec<FaultRow>,
    /// A step that could not run at all; the rows before it stand.
    pub error: Option<String>,
    pub elapsed: Duration,
}

/// Builds the node, runs the faults in order with the agent attaching as `attach`, and reports
/// every row it got to.
pub fn run(
    options: &HookOptions,
    rebuilt: &Result<PathBuf, String>,
    config: &FaultConfig,
    attach: Attach,
) -> Result<FaultResults> {
    let started = Instant::now();
    let mut options = options.clone();
    if let Some(agent) = options.agent.as_mut() {
        agent
            .extra_args
            .extend(["--attach".to_owned(), attach.to_string()]);
    }
    let mut node = Node::build(NodeSpec {
        cluster: Cluster::fixture(),
        kube_proxy: KubeProxyMode::Ipvs,
    })?;
    // Another component's objects on the NIC, there before the agent starts.
    let foreign_eth0 = Foreign::install(node.ns(Host::Node), "eth0")?;
    node.install_hook(HookKind::Ebpf, &options)?;
    let mut rows = Vec::new();
    let error = steps(&mut node, rebuilt, config, &foreign_eth0, &mut rows)
        .err()
        .map(|e| format!("{e:#}"));
    Ok(FaultResults {
        attach,
        rows,
        error,
        elapsed: started.elapsed(),
    })
}

fn steps(
    node: &mut Node,
    rebuilt: &Result<PathBuf, String>,
    config: &FaultConfig,
    foreign_eth0: &Foreign,
    rows: &mut Vec<FaultRow>,
) -> Result<()> {
    let mix: Vec<Scenario> = scenarios::all().into_iter().filter(|s| s.coexist).collect();
    rows.push(kill9(node, &mix, config)?);
    match rebuilt {
        Ok(rebuilt) => {
            let original = agent(node)?.binary().to_owned();
            let first = View::read(agent(node)?)?;
            let upgrade = Switch {
                label: "upgrade: rebuilt program (salted)",
                binary: rebuilt,
                tag: None,
            };
            rows.push(switch(node, &mix, config, &upgrade)?);
            let downgrade = Switch {
                label: "downgrade: original program",
                binary: &original,
                tag: Some(&first.tag),
            };
            rows.push(switch(node, &mix, config, &downgrade)?);
        }
        Err(e) => {
            let mut row = FaultRow::new("upgrade / downgrade");
            row.connections = "— not run".into();
            row.failures
                .push(format!("upgrade: no rebuilt agent: {}", first_line(e)));
            rows.push(row);
        }
    }
    rows.push(ovn0(node, &mix, config)?);
    rows.push(detach(node, foreign_eth0)?);
    Ok(())
}

fn first_line(s: &str) -> &str {
    s.lines().next().unwrap_or(s)
}

fn agent(node: &Node) -> Result<&Agent> {
    node.hook().and_then(Hook::agent).context("no agent")
}

fn agent_mut(node: &mut Node) -> Result<&mut Agent> {
    node.hook_mut()
        .and_then(Hook::agent_mut)
        .context("no agent")
}

/// What `status --json` says about the program and its attachments.
#[derive(Clone, Debug, PartialEq, Eq)]
struct View {
    program_id: u64,
    tag: String,
    /// ifname → (the attachment's identity, attached program id). The identity is the tcx link
    /// id, or the netlink filter's priority and handle.
    attachments: BTreeMap<String, (String, u64)>,
}

impl View {
    fn read(agent: &Agent) -> Result<Self> {
        let status = agent.status()?;
        Self::new(status.program.as_ref(), &status.attachments)
    }

    fn new(program: Option<&Program>, attached: &[Attachment]) -> Result<Self> {
        let program = program.context("no program in `status --json`")?;
        let attachments = attached
            .iter()
            .map(|a| {
                let ident = match (a.link_id, a.filter) {
                    (Some(link), _) => format!("link {link}"),
                    (None, Some((priority, handle))) => format!("filter {priority}/{handle:#x}"),
                    (None, None) => "?".into(),
                };
                (a.ifname.clone(), (ident, u64::from(a.program_id)))
            })
            .collect::<BTreeMap<_, _>>();
        for ifname in ["eth0", "ovn0"] {
            ensure!(
                attachments.contains_key(ifname),
                "`status --json` shows no attachment on {ifname}: {attached:?}"
            );
        }
        Ok(Self {
            program_id: u64::from(program.id),
            tag: program.tag.clone(),
            attachments,
        })
    }

    fn idents(&self) -> BTreeMap<&str, &str> {
        self.attachments
            .iter()
            .map(|(k, (ident, _))| (k.as_str(), ident.as_str()))
            .collect()
    }

    fn idents_text(&self) -> String {
        self.attachments
            .iter()
            .map(|(ifname, (ident, _))| format!("{ifname} {ident}"))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// New connections in one phase of a fault, and those whose outcome was not the marked one.
#[derive(Clone, Debug, Default)]
pub(super) struct PhaseCount {
    pub(super) connections: usize,
    /// "scenario [probe]: want X, got Y" → occurrences.
    pub(super) wrong: BTreeMap<String, usize>,
}

impl PhaseCount {
    fn wrong_total(&self) -> usize {
        self.wrong.values().sum()
    }
}

/// Runs `body` (the fault) while a thread opens one new connection of `mix` every [`PACE`],
/// round robin, and attributes each to the phase `body` had set when the connection started.
/// The traffic stops when `body` returns, or after [`TRAFFIC_LIMIT`].
pub(super) fn with_traffic<R>(
    node: &mut Node,
    mix: &[Scenario],
    phases: usize,
    timeout: Duration,
    body: impl FnOnce(&mut Node, &dyn Fn(usize)) -> R,
) -> (R, Result<Vec<PhaseCount>>) {
    let paths: HashMap<Host, String> = [Host::Pods, Host::Ext, Host::Other]
        .into_iter()
        .map(|h| (h, format!("/run/netns/{}", node.ns(h).name())))
        .collect();
    let phase = AtomicUsize::new(0);
    let stop = AtomicBool::new(false);
    thread::scope(|s| {
        let traffic = s.spawn(|| steady(&paths, mix, phases, timeout, &phase, &stop));
        let set_phase = |p: usize| phase.store(p, Ordering::SeqCst);
        let result = body(node, &set_phase);
        stop.store(true, Ordering::SeqCst);
        let counts = traffic
            .join()
            .unwrap_or_else(|p| std::panic::resume_unwind(p));
        (result, counts)
    })
}

fn steady(
    paths: &HashMap<Host, String>,
    mix: &[Scenario],
    phases: usize,
    timeout: Duration,
    phase: &AtomicUsize,
    stop: &AtomicBool,
) -> Result<Vec<PhaseCount>> {
    ensure!(!mix.is_empty(), "empty traffic mix");
    let mut counts = vec![PhaseCount::default(); phases];
    let started = Instant::now();
    let mut inside: Option<Host> = None;
    let mut i = 0usize;
    while !stop.load(Ordering::SeqCst) && started.elapsed() < TRAFFIC_LIMIT {
        let scenario = &mix[i % mix.len()];
        let from = scenario.probe.from;
        // A thread may switch namespaces at will; sockets stay in the one they were made in.
        if inside != Some(from) {
            netns::join(paths.get(&from).context("no namespace for the probe")?)?;
            inside = Some(from);
        }
        let want = &scenario
            .expect(KubeProxyMode::Ipvs)
            .context("fault scenarios are IPVS-mode scenarios")?
            .marked;
        let at = phase.load(Ordering::SeqCst).min(phases - 1);
        let got = traffic::probe(&scenario.probe, timeout);
        counts[at].connections += 1;
        if &got != want {
            *counts[at]
                .wrong
                .entry(format!(
                    "{} [{}]: want {want}, got {got}",
                    scenario.what, scenario.probe
                ))
                .or_default() += 1;
        }
        i += 1;
        let due = PACE * u32::try_from(i).unwrap_or(u32::MAX);
        if let Some(wait) = due.checked_sub(started.elapsed()) {
            thread::sleep(wait);
        }
    }
    Ok(counts)
}

fn seconds(d: Duration) -> String {
    format!("{:.2} s", d.as_secs_f64())
}

fn per_phase(names: &[&str], counts: &[PhaseCount]) -> String {
    names
        .iter()
        .zip(counts)
        .map(|(n, c)| format!("{n} {}", c.connections))
        .collect::<Vec<_>>()
        .join(", ")
}

fn kill9(node: &mut Node, mix: &[Scenario], config: &FaultConfig) -> Result<FaultRow> {
    const PHASES: [&str; 3] = ["agent running", "while down", "agent back"];
    let mut row = FaultRow::new(format!(
        "kill -9 ×{} under traffic, restart",
        config.kill_cycles()
    ));
    let before = View::read(agent(node)?)?;
    let mut downtimes = Vec::new();
    let (result, counts) = with_traffic(
        node,
        mix,
        PHASES.len(),
        config.probe_timeout,
        |node, phase| -> Result<()> {
            thread::sleep(config.lead_in());
            for _ in 0..config.kill_cycles() {
                let agent = agent_mut(node)?;
                phase(1);
                let killed = Instant::now();
                agent.kill9()?;
                thread::sleep(config.down());
                agent
                    .spawn()
                    .context("restarting the agent after kill -9")?;
                downtimes.push(killed.elapsed());
                phase(2);
                thread::sleep(config.tail());
            }
            Ok(())
        },
    );
    result?;
    let counts = counts?;
    let after = View::read(agent(node)?)?;
    row.traffic(&PHASES, &counts, 1, MIN_IN_WINDOW);
    row.same_attachments(&before, &after);
    row.check(before.program_id == after.program_id, || {
        format!(
            "the same binary reloaded its program ({} → {}) instead of adopting it",
            before.program_id, after.program_id
        )
    });
    row.resume = "never stopped".into();
    row.notes.push(format!(
        "{}: connections per phase: {}; agent down (SIGKILL → new agent ready) {}; program {} \
         adopted",
        row.fault,
        per_phase(&PHASES, &counts),
        downtimes
            .iter()
            .map(|d| seconds(*d))
            .collect::<Vec<_>>()
            .join(", "),
        after.program_id
    ));
    Ok(row)
}

/// An upgrade or downgrade: SIGTERM, then `binary` on the same pins.
struct Switch<'a> {
    label: &'static str,
    binary: &'a Path,
    /// The tag the new program must have (downgrade: the original's); `None`: any but the
    /// running one (upgrade).
    tag: Option<&'a str>,
}

fn switch(
    node: &mut Node,
    mix: &[Scenario],
    config: &FaultConfig,
    to: &Switch,
) -> Result<FaultRow> {
    const PHASES: [&str; 3] = ["old agent", "while switching", "new agent"];
    let mut row = FaultRow::new(to.label);
    let before = View::read(agent(node)?)?;
    let mut switched = Duration::ZERO;
    let (result, counts) = with_traffic(
        node,
        mix,
        PHASES.len(),
        config.probe_timeout,
        |node, phase| -> Result<()> {
            thread::sleep(config.lead_in());
            let agent = agent_mut(node)?;
            phase(1);
            let t0 = Instant::now();
            agent.terminate()?;
            agent.set_binary(to.binary.to_owned());
            agent
                .spawn()
                .with_context(|| format!("starting {}", to.binary.display()))?;
            switched = t0.elapsed();
            phase(2);
            thread::sleep(config.tail());
            Ok(())
        },
    );
    result?;
    let counts = counts?;
    let after = View::read(agent(node)?)?;
    row.traffic(&PHASES, &counts, 1, MIN_IN_WINDOW / 2);
    row.same_attachments(&before, &after);
    let freed = check_replaced(&mut row, node, &before, &after, to.tag)?;
    row.resume = format!("never stopped (switch {})", seconds(switched));
    row.notes.push(format!(
        "{}: connections per phase: {}; program {} tag {} → {} tag {}; old program freed: {}; \
         where our program runs (tcx query, tc filter dump): {}",
        row.fault,
        per_phase(&PHASES, &counts),
        before.program_id,
        before.tag,
        after.program_id,
        after.tag,
        if freed { "yes" } else { "NO" },
        running_text(&our_programs(node.ns(Host::Node))?)
    ));
    Ok(row)
}

/// After a switch: a new program with the expected tag runs on every attachment (per the agent
/// and per the kernel), and the old one is freed. Returns whether it was freed.
fn check_replaced(
    row: &mut FaultRow,
    node: &Node,
    before: &View,
    after: &View,
    tag: Option<&str>,
) -> Result<bool> {
    row.check(after.program_id != before.program_id, || {
        format!(
            "program id unchanged ({}): the new binary did not replace the program",
            after.program_id
        )
    });
    match tag {
        None => row.check(after.tag != before.tag, || {
            format!(
                "the rebuilt program has the running one's tag {}: nothing was upgraded",
                after.tag
            )
        }),
        Some(tag) => row.check(after.tag == tag, || {
            format!("tag {} after the switch, want {tag}", after.tag)
        }),
    }
    for (ifname, (_, prog)) in &after.attachments {
        row.check(*prog == after.program_id, || {
            format!(
                "the agent reports program {prog} on {ifname}, not the new {}",
                after.program_id
            )
        });
    }
    let running = our_programs(node.ns(Host::Node))?;
    let mut places: Vec<&str> = running.iter().map(|(i, _)| i.as_str()).collect();
    places.sort_unstable();
    row.check(
        places == ["eth0", "ovn0"]
            && running
                .iter()
                .all(|(_, id)| u64::from(*id) == after.program_id),
        || {
            format!(
                "the kernel runs {} in the node namespace, want program {} on eth0 and ovn0",
                running_text(&running),
                after.program_id
            )
        },
    );
    let old = u32::try_from(before.program_id).context("program id")?;
    let freed = wait_until(Duration::from_secs(2), || Ok(!bpf::prog_exists(old)?))?;
    row.check(freed, || {
        format!("the old program {old} is still loaded 2 s after the switch")
    });
    Ok(freed)
}

/// Polls `done` every 20 ms until it holds or `limit` passes; whether it held.
fn wait_until(limit: Duration, mut done: impl FnMut() -> Result<bool>) -> Result<bool> {
    let deadline = Instant::now() + limit;
    loop {
        if done()? {
            return Ok(true);
        }
        if Instant::now() > deadline {
            return Ok(false);
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// Where the kernel runs our program at ingress in the node namespace — (ifname, program id) —
/// from its own tables, not from the agent: tcx programs named `kovn_ingress` and tc filters
/// naming it. Independent of global program listings, which other runs' programs share.
fn our_programs(ns: &NetNs) -> Result<Vec<(String, u32)>> {
    let mut found = Vec::new();
    for ifname in ["eth0", "ovn0"] {
        for (prog, _) in ns
            .enter(move || bpf::tcx_ingress(ifname))?
            .with_context(|| format!("querying tcx ingress of {ifname}"))?
        {
            if bpf::prog_name(prog)?.as_deref() == Some(OUR_PROGRAM) {
                found.push((ifname.to_owned(), prog));
            }
        }
        let filters = ns.run("tc", &["filter", "show", "dev", ifname, "ingress"])?;
        // "filter protocol all pref 1 bpf chain 0 handle 0x4b4f kovn_ingress direct-action
        // not_in_hw id 1234 tag … jited"
        for line in filters.lines().filter(|l| l.contains(OUR_PROGRAM)) {
            let words: Vec<&str> = line.split_whitespace().collect();
            let id = words
                .windows(2)
                .find(|w| w[0] == "id")
                .and_then(|w| w[1].parse().ok())
                .with_context(|| format!("no program id in {line:?}"))?;
            found.push((ifname.to_owned(), id));
        }
    }
    Ok(found)
}

fn running_text(running: &[(String, u32)]) -> String {
    if running.is_empty() {
        return "nothing".into();
    }
    running
        .iter()
        .map(|(ifname, id)| format!("{ifname} {id}"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn ovn0(node: &mut Node, mix: &[Scenario], config: &FaultConfig) -> Result<FaultRow> {
    const PHASES: [&str; 1] = ["after resuming"];
    let mut row = FaultRow::new("ovn0 deleted and re-created");
    let before = View::read(agent(node)?)?;
    node.delete_ovn0()?;
    // Let the agent see the deletion before the interface comes back, as it would on a node
    // (kube-ovn-cni re-creates ovn0 on its next check, seconds later).
    thread::sleep(Duration::from_millis(200));
    let created = Instant::now();
    node.recreate_ovn0()?;
    // The clock for the agent starts when the new link can carry traffic: a veth's queue is
    // activated only when the kernel's link watcher (which needs RTNL) processes the carrier,
    // which can lag on a busy machine, and a packet that cannot flow cannot be marked.
    let up = wait_until(OVN0_GIVE_UP, || node.ovn0_up())?;
    let link_up = created.elapsed();
    row.check(up, || {
        format!("the re-created ovn0 was not UP after {OVN0_GIVE_UP:?}")
    });
    let (attempts, seen, resumed) = wait_for_marking(node, Instant::now())?;
    let Some(resumed) = resumed else {
        row.resume = format!("> {}", seconds(OVN0_GIVE_UP));
        row.connections = attempts.to_string();
        row.failures.push(format!(
            "{}: marking did not resume within {OVN0_GIVE_UP:?} of ovn0 being up ({attempts} \
             probes: {seen}); agent log:\n{}",
            row.fault,
            agent(node)?.log_tail()
        ));
        return Ok(row);
    };
    row.resume = format!(
        "{} ms (+{} ms link up)",
        resumed.as_millis(),
        link_up.as_millis()
    );
    row.check(resumed <= OVN0_BUDGET, || {
        format!("marking resumed only {resumed:?} after the re-created ovn0 was up (budget 1 s)")
    });
    let ((), counts) = with_traffic(node, mix, 1, config.probe_timeout, |_, _| {
        thread::sleep(config.tail());
    });
    let counts = counts?;
    let after = View::read(agent(node)?)?;
    row.traffic(&PHASES, &counts, 0, MIN_IN_WINDOW);
    row.connections = format!(
        "{} ({attempts} until resumed)",
        attempts + counts[0].connections
    );
    let eth0_kept = before.idents().get("eth0") == after.idents().get("eth0");
    row.check(eth0_kept, || {
        format!(
            "eth0's attachment changed: {} → {}",
            before.idents_text(),
            after.idents_text()
        )
    });
    row.links_kept = format!(
        "eth0 {}; ovn0 new ({})",
        if eth0_kept { "yes" } else { "NO" },
        after.idents_text()
    );
    row.notes.push(format!(
        "{}: the new ovn0 was up {} ms after `ip link add`, marking resumed {} ms after that \
         ({} ms in all); earlier probes (ms after link up): {seen}; then {} connections of the \
         mix, {} wrong",
        row.fault,
        link_up.as_millis(),
        resumed.as_millis(),
        (link_up + resumed).as_millis(),
        counts[0].connections,
        row.wrong
    ));
    Ok(row)
}

/// Probes pod → ClusterIP every [`PACE`] until it gets the marked outcome (the node's address,
/// R1a → P2; unmarked, Kube-OVN's guard refuses it). Returns the probes made, the timeline of
/// what they saw before (outcomes with their times since `since`), and the time from `since` to
/// the first marked outcome (`None`: not within [`OVN0_GIVE_UP`]).
fn wait_for_marking(node: &Node, since: Instant) -> Result<(usize, String, Option<Duration>)> {
    let scenario = scenarios::all()
        .into_iter()
        .find(|s| s.vector == "1")
        .context("scenario 1")?;
    let want = &scenario
        .expect(KubeProxyMode::Ipvs)
        .context("IPVS expectation")?
        .marked;
    let mut attempts = 0usize;
    // Consecutive equal outcomes coalesced: (outcome, count, first ms, last ms).
    let mut timeline: Vec<(String, usize, u128, u128)> = Vec::new();
    let mut resumed = None;
    while since.elapsed() < OVN0_GIVE_UP {
        let at = since.elapsed().as_millis();
        // A short deadline: a SYN lost while the new link comes up is retried by the next
        // probe, not by TCP a second later.
        let got = node.probe(&scenario.probe, Duration::from_millis(100))?;
        attempts += 1;
        if &got == want {
            resumed = Some(since.elapsed());
            break;
        }
        let got = got.to_string();
        match timeline.last_mut() {
            Some((last, n, _, to)) if *last == got => {
                *n += 1;
                *to = at;
            }
            _ => timeline.push((got, 1, at, at)),
        }
        thread::sleep(PACE);
    }
    let timeline = if timeline.is_empty() {
        "nothing".to_owned()
    } else {
        timeline
            .iter()
            .map(|(o, n, from, to)| {
                if *n == 1 {
                    format!("{o} at {from} ms")
                } else {
                    format!("{o} ×{n} at {from}–{to} ms")
                }
            })
            .collect::<Vec<_>>()
            .join(", ")
    };
    Ok((attempts, timeline, resumed))
}

/// Another component's objects at ingress of one interface: a u32 filter matching everything
/// (prio 7), a classic-BPF filter (prio 9, handle 0x77) and a tcx program. All let the packet
/// continue.
struct Foreign {
    ifname: &'static str,
    tcx: ForeignTcx,
}

impl Foreign {
    fn install(ns: &NetNs, ifname: &'static str) -> Result<Self> {
        ns.run("tc", &["qdisc", "replace", "dev", ifname, "clsact"])?;
        ns.run(
            "tc",
            &[
                "filter", "add", "dev", ifname, "ingress", "prio", "7", "protocol", "all", "u32",
                "match", "u32", "0", "0", "flowid", "1:1",
            ],
        )?;
        ns.run(
            "tc",
            &[
                "filter",
                "add",
                "dev",
                ifname,
                "ingress",
                "prio",
                "9",
                "handle",
                "0x77",
                "bpf",
                "bytecode",
                "1,6 0 0 4294967295",
            ],
        )?;
        let tcx = ns
            .enter(|| ForeignTcx::attach(ifname))?
            .with_context(|| format!("linking a foreign tcx program on {ifname}"))?;
        Ok(Self { ifname, tcx })
    }

    /// What is missing or changed of this component's objects (empty: all there).
    fn check(&self, ns: &NetNs) -> Result<Vec<String>> {
        let mut problems = Vec::new();
        let filters = ns.run("tc", &["filter", "show", "dev", self.ifname, "ingress"])?;
        if !filters.contains("pref 7 u32") {
            problems.push(format!(
                "{}: foreign u32 filter gone:\n{filters}",
                self.ifname
            ));
        }
        if !filters.contains("handle 0x77") {
            problems.push(format!(
                "{}: foreign classic-BPF filter gone:\n{filters}",
                self.ifname
            ));
        }
        let ifname = self.ifname;
        let tcx = ns.enter(move || bpf::tcx_ingress(ifname))??;
        if !tcx.contains(&(self.tcx.prog_id, self.tcx.link_id)) {
            problems.push(format!(
                "{}: foreign tcx program {} (link {}) gone: tcx ingress now {tcx:?}",
                self.ifname, self.tcx.prog_id, self.tcx.link_id
            ));
        }
        Ok(problems)
    }

    fn describe(&self) -> String {
        format!(
            "{}: u32 prio 7, cBPF prio 9 handle 0x77, tcx {} prog {} link {}",
            self.ifname,
            bpf::FOREIGN_PROG_NAME,
            self.tcx.prog_id,
            self.tcx.link_id
        )
    }
}

/// Runs every IPVS-mode scenario once: how many ran, and those whose outcome was not
/// `want(expectation)`.
pub(super) fn all_scenarios(
    node: &Node,
    want: impl Fn(&Expect) -> &Outcome,
) -> Result<(usize, Vec<String>)> {
    let mut wrong = Vec::new();
    let mut made = 0;
    for scenario in scenarios::all() {
        let Some(expect) = scenario.expect(KubeProxyMode::Ipvs) else {
            continue;
        };
        let got = super::probe(node, &scenario.probe)?;
        made += 1;
        let want = want(expect);
        if &got != want {
            wrong.push(format!(
                "vector {} {} [{}]: want {want}, got {got}",
                scenario.vector, scenario.what, scenario.probe
            ));
        }
    }
    Ok((made, wrong))
}

fn detach(node: &mut Node, foreign_eth0: &Foreign) -> Result<FaultRow> {
    let mut row = FaultRow::new("detach (foreign filters/programs present)");
    let foreign_ovn0 = Foreign::install(node.ns(Host::Node), "ovn0")?;
    let foreign = [foreign_eth0, &foreign_ovn0];
    let (attached, wrong_attached) = all_scenarios(node, |e| &e.marked)?;
    let running = our_programs(node.ns(Host::Node))?;
    row.check(running.len() == 2, || {
        format!(
            "before detach our program runs on {}",
            running_text(&running)
        )
    });
    let agent = agent_mut(node)?;
    // As an operator removes the DaemonSet first: SIGTERM leaves the datapath (fail-static),
    // `detach` removes it.
    agent.terminate()?;
    let t0 = Instant::now();
    agent.detach()?;
    let took = t0.elapsed();
    let status_gone = agent.status().is_err();
    let bpffs = agent.bpffs().to_owned();
    let pins = agent.pins();
    let (detached, wrong_detached) = all_scenarios(node, |e| &e.unmarked)?;
    let left = our_programs(node.ns(Host::Node))?;
    let mut problems = Vec::new();
    for f in foreign {
        problems.extend(f.check(node.ns(Host::Node))?);
    }
    row.connections = format!(
        "{} ({attached} attached, {detached} after)",
        attached + detached
    );
    row.wrong = wrong_attached.len() + wrong_detached.len();
    for w in &wrong_attached {
        row.failures.push(format!("{}: attached: {w}", row.fault));
    }
    for w in &wrong_detached {
        row.failures.push(format!(
            "{}: after detach (want the no-hook outcome): {w}",
            row.fault
        ));
    }
    for p in &problems {
        row.failures.push(format!("{}: {p}", row.fault));
    }
    row.check(status_gone, || {
        "`status` still finds our pins after detach".into()
    });
    row.check(pins.is_empty(), || {
        format!("pins left under {}: {pins:?}", bpffs.display())
    });
    row.check(left.is_empty(), || {
        format!("our program still runs on {}", running_text(&left))
    });
    row.resume = format!("detach {:.0} ms", took.as_secs_f64() * 1000.0);
    let mut summary = format!(
        "{}: every scenario marked with the agent attached next to the foreign objects, the \
         no-hook outcome after detach; our program runs on: {}; foreign objects kept: {}; pins \
         left: {}",
        row.fault,
        running_text(&left),
        if problems.is_empty() {
            "all"
        } else {
            "NOT all"
        },
        pins.len()
    );
    for f in foreign {
        let _ = write!(summary, "\n      {}", f.describe());
    }
    row.notes.push(summary);
    Ok(row)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn view_identifies_tcx_links_and_netlink_filters() {
        let program = Program {
            name: "kovn_ingress".into(),
            id: 42,
            tag: "00ff".into(),
            verified_instructions: Some(1),
        };
        let attached = |ifname: &str, mode: &str, link_id, filter| Attachment {
            ifname: ifname.into(),
            mode: mode.into(),
            program_id: 42,
            link_id,
            filter,
        };
        let attachments = [
            attached("ovn0", "tcx", Some(7), None),
            attached("eth0", "netlink", None, Some((1, 19279))),
        ];
        let view = View::new(Some(&program), &attachments).expect("parses");
        assert_eq!(view.program_id, 42);
        assert_eq!(view.tag, "00ff");
        assert_eq!(view.idents_text(), "eth0 filter 1/0x4b4f, ovn0 link 7");
        assert!(
            View::new(Some(&program), &[]).is_err(),
            "eth0 and ovn0 must be attached"
        );
        assert!(View::new(None, &attachments).is_err(), "no program");
    }
}
