//! The agent binary against real interfaces in private network namespaces: attach (tcx and
//! netlink), real packets marked, fail-static on SIGTERM and kill -9, restart adoption, upgrade
//! of interfaces re-created under it, foreign tc objects left alone, detach. Needs root.

use std::{
    fmt::Write as _,
    io::Write as _,
    net::UdpSocket,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use kube_ovn_agent::testing::{
    netns::{NetNs, TempPath, example_cluster, send_frames, veth},
    packet::{L4, Packet, TCP_ACK, TCP_SYN},
    scaled,
    topology::N1,
};
use kube_ovn_testkit::agent::{AgentCli, AgentProcess, Dump, Privilege, Status};
use libtest_mimic::{Failed, Trial};

const AGENT: &str = env!("CARGO_BIN_EXE_kube-ovn-agent");

type Test = fn() -> Result<(), Failed>;

fn main() {
    let tests: Vec<(&str, Test)> = vec![
        (
            "tcx_marks_real_packets_survives_sigterm_and_detaches_cleanly",
            || lifecycle("tcx"),
        ),
        (
            "netlink_marks_real_packets_survives_sigterm_and_detaches_cleanly",
            || lifecycle("netlink"),
        ),
        (
            "restart_after_kill_keeps_links_and_maps_and_prunes_once",
            restart,
        ),
        (
            "restart_reloads_the_program_on_any_doubt_about_its_identity",
            identity_doubts,
        ),
        (
            "recreated_ovn0_is_reattached_within_a_second",
            recreated_ovn0,
        ),
        (
            "foreign_filter_at_our_priority_and_handle_is_refused_not_replaced",
            foreign_conflict,
        ),
        (
            "frames_too_short_for_their_ip_header_pass_and_are_counted",
            short_frames,
        ),
        ("auto_mode_follows_kube_proxy_ipsets", kube_proxy_auto),
        (
            "auto_mode_restarts_and_mode_switches_leave_no_cluster_ip_packet_unmarked",
            restarts_never_unmark,
        ),
        (
            "nftables_kube_proxy_is_detected_and_native_mark_rules_are_reported",
            nftables_kube_proxy,
        ),
        ("bad_cluster_file_keeps_the_programmed_state", bad_file),
        (
            "tproxy_hands_kubelet_probes_to_the_transparent_listener",
            tproxy,
        ),
        (
            "tcp_without_syn_follows_nf_conntrack_tcp_loose_and_its_changes",
            tcp_loose,
        ),
    ];
    let tcx = kube_ovn_agent::datapath::attach::tcx_supported();
    if !tcx && kube_ovn_testkit::privileged::missing_privilege().is_none() {
        eprintln!(
            "\n*** SKIPPING the tcx variant: it needs tcx (Linux >= 6.6); this kernel has netlink clsact only ***\n"
        );
    }
    let trials = tests
        .into_iter()
        .map(|(name, f)| {
            let needs_tcx = name.starts_with("tcx_");
            Trial::test(name, f).with_ignored_flag(needs_tcx && !tcx)
        })
        .collect();
    kube_ovn_testkit::privileged::main("network-namespace tests", trials);
}

/// Spec §5.1's node n1 with IPv6 on `eth0` (the kit's [`N1`]) and this suite's agent.
struct Topology(N1);

impl std::ops::Deref for Topology {
    type Target = N1;
    fn deref(&self) -> &N1 {
        &self.0
    }
}

impl Topology {
    fn new() -> Self {
        Self(N1::new("kovn-", true))
    }

    /// The agent's commands in the node namespace, on this topology's bpffs.
    fn handle(&self) -> AgentCli {
        AgentCli::new(&self.node, AGENT, self.root(), Privilege::from_env())
    }

    fn agent(&self, attach: &str, cluster: &Path, extra: &[&str]) -> Agent {
        let log = TempPath::new("kovn-agent-", "log");
        let args: Vec<String> = [
            "--node-name",
            "n1",
            "--metrics-addr",
            "none",
            "--attach",
            attach,
        ]
        .into_iter()
        .map(str::to_owned)
        .chain([format!("--source=file:{}", cluster.display())])
        .chain(extra.iter().map(|a| (*a).to_owned()))
        .collect();
        let process = self.handle().spawn(&args, &log).expect("start the agent");
        Agent { process, log }
    }

    /// `status --json`, or `None` when it fails (nothing pinned); panics when its output is
    /// not the JSON the kit reads.
    fn status(&self) -> Option<Status> {
        match self.handle().status() {
            Ok(status) => Some(status),
            Err(e @ kube_ovn_testkit::agent::Error::Json { .. }) => panic!("{e}"),
            Err(_) => None,
        }
    }

    fn dump(&self) -> Dump {
        self.handle().dump().unwrap_or_else(|e| panic!("dump: {e}"))
    }

    /// Waits until the agent attached to `ifaces` and programmed the maps.
    fn wait_ready(&self, agent: &mut Agent, ifaces: &[&str]) -> Result<Status, Failed> {
        wait(scaled(Duration::from_secs(20)), || {
            if let Ok(Some(status)) = agent.process.try_wait() {
                return Err(format!("agent exited with {status}:\n{}", agent.log_text()));
            }
            let Some(status) = self.status() else {
                return Ok(None);
            };
            let attached = status.attached();
            let programmed = map_size(&status, "kovn_svcport4") > 0;
            Ok((ifaces.iter().all(|i| attached.contains(i)) && programmed).then_some(status))
        })
        .map_err(|e| format!("{e}\nagent log:\n{}", agent.log_text()).into())
    }
}

struct Agent {
    process: AgentProcess,
    log: TempPath,
}

impl Agent {
    fn log_text(&self) -> String {
        std::fs::read_to_string(&*self.log).unwrap_or_default()
    }

    /// SIGTERM, as a pod deletion sends; panics unless it exits in time.
    fn terminate(&mut self) {
        if let Err(e) = self.process.terminate(scaled(Duration::from_secs(10))) {
            panic!("agent did not exit on SIGTERM: {e}\n{}", self.log_text());
        }
    }

    /// SIGKILL, as a crash or an OOM kill would.
    fn kill(&mut self) {
        self.process.kill().expect("SIGKILL the agent");
    }
}

/// Polls `f` every 50 ms until it returns `Some`, an error, or `timeout` passes.
fn wait<T>(
    timeout: Duration,
    mut f: impl FnMut() -> Result<Option<T>, String>,
) -> Result<T, String> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = f()? {
            return Ok(value);
        }
        if Instant::now() > deadline {
            return Err(format!("timed out after {timeout:?}"));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn map_size(status: &Status, map: &str) -> u64 {
    status
        .maps
        .iter()
        .find(|(name, _)| name == map)
        .map_or(0, |(_, size)| *size)
}

fn counter(status: &Status, name: &str) -> u64 {
    status
        .counter(name)
        .unwrap_or_else(|| panic!("no counter {name} in {:?}", status.counters))
}

/// The dump without the local-address sets, which move on their own (IPv6 link-local
/// addresses appear a moment after an interface comes up).
fn cluster_state(mut dump: Dump) -> Dump {
    dump.v4.local.clear();
    dump.v6.local.clear();
    dump
}

/// Per interface: the mode and the tcx link id, or the netlink filter's priority and handle.
type LinkId = (String, Option<u32>, Option<(u16, u32)>);

fn link_ids(status: &Status) -> Vec<(String, LinkId)> {
    let mut ids: Vec<(String, LinkId)> = status
        .attachments
        .iter()
        .map(|a| (a.ifname.clone(), (a.mode.clone(), a.link_id, a.filter)))
        .collect();
    ids.sort_by(|a, b| a.0.cmp(&b.0));
    ids
}

/// Whether IPv4's first rule is R1a (IPVS mode's ClusterIP rule).
fn first_rule_is_r1a(status: &Status) -> bool {
    status.rules_v4.first().is_some_and(|r| r == "R1a")
}

fn ensure(condition: bool, message: impl FnOnce() -> String) -> Result<(), Failed> {
    if condition {
        Ok(())
    } else {
        Err(message().into())
    }
}

/// Foreign objects another component might own: a u32 filter and a classic-BPF filter on
/// `eth0`, and (with tcx) a tcx program. The agent must never touch them.
fn add_foreign(t: &Topology) {
    t.node
        .sh("tc qdisc add dev eth0 clsact 2>/dev/null || true; \
         tc filter add dev eth0 ingress prio 7 protocol all u32 match u32 0 0 flowid 1:1; \
         tc filter add dev eth0 ingress prio 9 handle 0x77 bpf bytecode '1,6 0 0 4294967295'")
        .expect("shell in namespace");
}

fn foreign_present(t: &Topology) -> Result<(), Failed> {
    let filters = t
        .node
        .sh("tc filter show dev eth0 ingress")
        .expect("shell in namespace");
    ensure(filters.contains("pref 7 u32"), || {
        format!("foreign u32 filter gone:\n{filters}")
    })?;
    ensure(filters.contains("handle 0x77"), || {
        format!("foreign cBPF filter gone:\n{filters}")
    })
}

fn lifecycle(attach: &str) -> Result<(), Failed> {
    let t = Topology::new();
    add_foreign(&t);
    let mut agent = t.agent(attach, &example_cluster(), &["--kube-proxy-mode", "ipvs"]);
    let status = t.wait_ready(&mut agent, &["eth0", "ovn0"])?;
    let modes: Vec<&str> = status.attachments.iter().map(|a| a.mode.as_str()).collect();
    ensure(modes.iter().all(|m| *m == attach), || {
        format!("attach modes {modes:?}")
    })?;

    t.send(10);
    let after_run = t.marked();
    ensure(after_run == (10, 10), || {
        format!("marked {after_run:?}, want (10, 10)")
    })?;
    let status = t.status().ok_or("status failed")?;
    for (name, min) in [("R2u", 10), ("R3u", 10), ("R1a", 10)] {
        let value = counter(&status, name);
        ensure(value >= min, || {
            format!("counter {name} = {value}, want ≥ {min}")
        })?;
    }

    agent.terminate();
    t.send(10);
    let after_stop = t.marked();
    ensure(after_stop == (20, 20), || {
        format!("after SIGTERM marked {after_stop:?}, want (20, 20): the datapath must stay")
    })?;

    t.handle().detach()?;
    t.send(10);
    let after_detach = t.marked();
    ensure(after_detach == (20, 20), || {
        format!("after detach marked {after_detach:?}")
    })?;
    ensure(t.status().is_none(), || {
        "status still finds pins after detach".into()
    })?;
    let leftovers: Vec<_> = walk(&t.root());
    ensure(leftovers.is_empty(), || {
        format!("pins left after detach: {leftovers:?}")
    })?;
    let our_filters = t
        .node
        .sh("tc filter show dev eth0 ingress; tc filter show dev ovn0 ingress 2>/dev/null || true")
        .expect("shell in namespace");
    ensure(!our_filters.contains("kovn_ingress"), || {
        format!("our filter left:\n{our_filters}")
    })?;
    foreign_present(&t)
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                found.extend(walk(&path));
            } else {
                found.push(path);
            }
        }
    }
    found
}

fn restart() -> Result<(), Failed> {
    let t = Topology::new();
    let cluster = TempPath::new("kovn-cluster-", "yaml");
    std::fs::copy(example_cluster(), &*cluster).expect("copy cluster file");
    let mut agent = t.agent("auto", &cluster, &["--kube-proxy-mode", "ipvs"]);
    let first = t.wait_ready(&mut agent, &["eth0", "ovn0"])?;
    let dump_before = cluster_state(t.dump());
    agent.kill();

    let mut agent = t.agent("auto", &cluster, &["--kube-proxy-mode", "ipvs"]);
    let second = t.wait_ready(&mut agent, &["eth0", "ovn0"])?;
    ensure(link_ids(&first) == link_ids(&second), || {
        format!(
            "links changed across restart: {:?} → {:?}",
            link_ids(&first),
            link_ids(&second)
        )
    })?;
    let program_id = |s: &Status| s.program.as_ref().map(|p| p.id);
    ensure(program_id(&first) == program_id(&second), || {
        "an identical program must be adopted, not reloaded".into()
    })?;
    // Neither loaded nor verified: the pinned program of this build is reused as it is.
    ensure(program_how(&agent)? == "reused", || {
        format!(
            "the restart did not reuse the pinned program:\n{}",
            agent.log_text()
        )
    })?;
    ensure(cluster_state(t.dump()) == dump_before, || {
        "map contents changed across restart".into()
    })?;
    agent.kill();

    // While the agent is down a Service disappears; the restarted agent prunes exactly it.
    let text = std::fs::read_to_string(&*cluster).expect("read cluster");
    let without: Vec<&str> = text
        .split("\n---\n")
        .filter(|doc| !doc.contains("name: np-cluster"))
        .collect();
    std::fs::write(&*cluster, without.join("\n---\n")).expect("write cluster");
    t.send(5);
    let mut agent = t.agent("auto", &cluster, &["--kube-proxy-mode", "ipvs"]);
    t.wait_ready(&mut agent, &["eth0", "ovn0"])?;
    let ports_of = |dump: &Dump| -> Vec<String> {
        dump.v4
            .service_ports
            .iter()
            .map(|p| format!("{}:{}", p.addr, p.port))
            .collect()
    };
    let pruned = wait(scaled(Duration::from_secs(5)), || {
        let ports = ports_of(&t.dump());
        Ok((!ports.contains(&"10.96.0.101:80".to_owned())).then_some(ports))
    })?;
    let mut expected = ports_of(&dump_before);
    expected.retain(|p| p != "10.96.0.101:80");
    ensure(pruned == expected, || {
        format!("after prune {pruned:?}, want {expected:?}")
    })?;
    Ok(())
}

/// How the agent came by its program (`program=` of its "datapath ready" log line), once it
/// logged it: the status of the pins can look ready before a restarted agent got that far.
fn program_how(agent: &Agent) -> Result<String, Failed> {
    wait(scaled(Duration::from_secs(10)), || {
        Ok(agent
            .log_text()
            .lines()
            .find(|l| l.contains("datapath ready"))
            .and_then(|l| l.split("program=\"").nth(1))
            .and_then(|rest| rest.split('"').next())
            .map(str::to_owned))
    })
    .map_err(|e| format!("{e}: no \"datapath ready\" line\n{}", agent.log_text()).into())
}

/// The identity pins (`programs/kovn_ingress-identity-*`) under the topology's root.
fn identity_pins(t: &Topology) -> Vec<PathBuf> {
    walk(&t.root().join("programs"))
        .into_iter()
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("kovn_ingress-identity-"))
        })
        .collect()
}

/// Changes an identity pin behind the agent's back.
type Tamper<'a> = &'a dyn Fn(&Path);

/// A restart reuses the pinned program only when its identity pin is this build's and names
/// the pinned program: without it (an older build, a removed pin) or with another identity
/// (another build or configuration), the program is loaded again and swapped in place, and
/// marking goes on throughout.
fn identity_doubts() -> Result<(), Failed> {
    let t = Topology::new();
    let cluster = TempPath::new("kovn-cluster-", "yaml");
    std::fs::copy(example_cluster(), &*cluster).expect("copy cluster file");
    let start = |t: &Topology| t.agent("auto", &cluster, &["--kube-proxy-mode", "ipvs"]);
    let mut agent = start(&t);
    let first = t.wait_ready(&mut agent, &["eth0", "ovn0"])?;
    ensure(program_how(&agent)? == "loaded", || {
        format!("a first start loads:\n{}", agent.log_text())
    })?;
    let pins = identity_pins(&t);
    ensure(pins.len() == 1, || {
        format!("one identity pin after a load, found {pins:?}")
    })?;
    let program_id = |s: &Status| s.program.as_ref().map(|p| p.id);
    let mut last_id = program_id(&first);
    agent.kill();

    let doubts: [(&str, Tamper); 2] = [
        ("no identity pin", &|pin| {
            std::fs::remove_file(pin).expect("remove the identity pin");
        }),
        ("another identity", &|pin| {
            std::fs::rename(
                pin,
                pin.with_file_name("kovn_ingress-identity-0123456789abcdef"),
            )
            .expect("rename the identity pin");
        }),
    ];
    for (doubt, tamper) in doubts {
        let pins = identity_pins(&t);
        ensure(pins.len() == 1, || {
            format!("{doubt}: identity pins {pins:?}")
        })?;
        tamper(&pins[0]);
        let before = t.marked().1;
        let mut agent = start(&t);
        // The pins look ready before the restarted agent replaced the program: its log first.
        let how = program_how(&agent)?;
        let status = t.wait_ready(&mut agent, &["eth0", "ovn0"])?;
        let log = agent.log_text();
        ensure(how == "replacing", || {
            format!("{doubt}: the program must be loaded again:\n{log}")
        })?;
        ensure(program_id(&status) != last_id, || {
            format!("{doubt}: still program {last_id:?}")
        })?;
        last_id = program_id(&status);
        let pins = identity_pins(&t);
        ensure(pins.len() == 1, || {
            format!("{doubt}: the stale identity pin must go, found {pins:?}")
        })?;
        t.send(5);
        ensure(t.marked().1 >= before + 5, || {
            format!("{doubt}: packets unmarked after the reload\n{log}")
        })?;
        agent.kill();
    }
    // With the identity recorded again, the next restart reuses.
    let mut agent = start(&t);
    let how = program_how(&agent)?;
    let status = t.wait_ready(&mut agent, &["eth0", "ovn0"])?;
    ensure(how == "reused" && program_id(&status) == last_id, || {
        format!("the identity was not recorded again:\n{}", agent.log_text())
    })?;
    agent.terminate();
    Ok(())
}

fn recreated_ovn0() -> Result<(), Failed> {
    let t = Topology::new();
    let mut agent = t.agent("auto", &example_cluster(), &["--kube-proxy-mode", "ipvs"]);
    t.wait_ready(&mut agent, &["eth0", "ovn0"])?;
    t.node.sh("ip link del ovn0").expect("shell in namespace");
    let started = Instant::now();
    veth(&t.node, "ovn0", &t.pod, "eth0").expect("veth pair");
    t.node
        .sh("ip addr add 100.64.0.2/16 dev ovn0; ip route add 10.16.0.0/16 dev ovn0")
        .expect("shell in namespace");
    t.pod.sh("ip addr add 10.16.0.5/16 dev eth0; ip route add 100.64.0.2 dev eth0; ip route add default via 100.64.0.2").expect("shell in namespace");
    let new_index: u32 = t
        .node
        .sh("cat /sys/class/net/ovn0/ifindex")
        .expect("shell in namespace")
        .trim()
        .parse()
        .expect("ifindex");
    let before = t.marked().1;
    let elapsed = wait(scaled(Duration::from_secs(5)), || {
        t.pod
            .enter(|| {
                let socket = UdpSocket::bind("10.16.0.5:0").expect("bind");
                socket.send_to(b"x", "10.96.0.10:53").expect("send");
            })
            .expect("enter namespace");
        std::thread::sleep(Duration::from_millis(20));
        Ok((t.marked().1 > before).then(|| started.elapsed()))
    })
    .map_err(|e| format!("{e}\n{}", agent.log_text()))?;
    let dump = t.dump();
    ensure(dump.ifaces.contains_key(&new_index), || {
        format!(
            "ifaces map lacks the new ovn0 ifindex {new_index}: {:?}",
            dump.ifaces
        )
    })?;
    eprintln!("marking resumed {elapsed:?} after ovn0 was re-created");
    // One second on real hardware (issue 4); stretched under emulation.
    ensure(elapsed <= scaled(Duration::from_secs(1)), || {
        format!("marking resumed only after {elapsed:?}")
    })
}

fn foreign_conflict() -> Result<(), Failed> {
    let t = Topology::new();
    t.node
        .sh("tc qdisc add dev eth0 clsact; \
         tc filter add dev eth0 ingress prio 1 handle 0x4b4f bpf bytecode '1,6 0 0 4294967295'")
        .expect("shell in namespace");
    let mut agent = t.agent(
        "netlink",
        &example_cluster(),
        &["--kube-proxy-mode", "ipvs"],
    );
    t.wait_ready(&mut agent, &["ovn0"])?;
    let log = wait(scaled(Duration::from_secs(10)), || {
        let log = agent.log_text();
        Ok(log.contains("foreign tc filter").then_some(log))
    })?;
    ensure(log.contains("eth0"), || {
        format!("the error must name the interface:\n{log}")
    })?;
    let filters = t
        .node
        .sh("tc filter show dev eth0 ingress")
        .expect("shell in namespace");
    ensure(filters.contains("bytecode"), || {
        format!("the foreign filter was replaced:\n{filters}")
    })?;
    ensure(!filters.contains("kovn_ingress"), || {
        format!("we attached anyway:\n{filters}")
    })
}

/// Frames whose Ethernet header says IPv4/IPv6 but that end before the IP header: the kernel's
/// test-run refuses them, so they are injected on the wire here.
fn short_frames() -> Result<(), Failed> {
    let t = Topology::new();
    let mut agent = t.agent("auto", &example_cluster(), &["--kube-proxy-mode", "ipvs"]);
    t.wait_ready(&mut agent, &["eth0"])?;
    let mac = t
        .node
        .sh("cat /sys/class/net/eth0/address")
        .expect("shell in namespace");
    let mac: Vec<u8> = mac
        .trim()
        .split(':')
        .map(|b| u8::from_str_radix(b, 16).expect("MAC"))
        .collect();
    let before = counter(&t.status().ok_or("status")?, "not_parsed");
    let mut frames = Vec::new();
    for (ethertype, lengths) in [([0x08, 0x00], 15..34), ([0x86, 0xdd], 15..54)] {
        for len in lengths {
            let mut frame = mac.clone();
            frame.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x12]);
            frame.extend_from_slice(&ethertype);
            frame.resize(len, 0x45);
            frames.push(frame);
        }
    }
    let sent = frames.len() as u64;
    t.client
        .enter(|| send_frames(&frames, "eth0"))
        .expect("enter namespace");
    let after = wait(scaled(Duration::from_secs(5)), || {
        let now = counter(&t.status().ok_or("status")?, "not_parsed");
        Ok((now >= before + sent).then_some(now))
    })?;
    ensure(after == before + sent, || {
        format!("not_parsed moved by {}, sent {sent}", after - before)
    })
}

fn kube_proxy_auto() -> Result<(), Failed> {
    let t = Topology::new();
    // kube-proxy in nftables mode: reported as such, rules as in iptables mode.
    t.node
        .sh("nft add table ip kube-proxy")
        .expect("shell in namespace");
    let agent = t.agent("auto", &example_cluster(), &["--kube-proxy-mode", "auto"]);
    // No kube-proxy sets yet: Kube-OVN's iptables-mode chain, R1b only.
    let status = wait(scaled(Duration::from_secs(20)), || {
        Ok(t.status().filter(|s| s.rules_v4 == ["R1b"]))
    })
    .map_err(|e| format!("{e}\n{}", agent.log_text()))?;
    ensure(map_size(&status, "kovn_svccidr4") == 1, || {
        format!("{status:?}")
    })?;
    let log = agent.log_text();
    ensure(
        log.lines()
            .any(|l| l.contains("kube-proxy detected") && l.contains("nftables")),
        || format!("nftables mode not reported:\n{log}"),
    )?;
    t.node
        .sh("nft delete table ip kube-proxy")
        .expect("shell in namespace");
    t.node
        .sh("ipset create KUBE-CLUSTER-IP hash:ip,port; \
         ipset create KUBE-NODE-PORT-LOCAL-TCP bitmap:port range 0-65535; \
         ipset create KUBE-NODE-PORT-LOCAL-UDP bitmap:port range 0-65535")
        .expect("shell in namespace");
    let want = ["R1a", "R2t", "R2u", "R3t", "R3u"];
    wait(scaled(Duration::from_secs(10)), || {
        Ok(t.status().filter(|s| s.rules_v4 == want))
    })
    .map_err(|e| format!("IPVS sets not picked up: {e}\n{}", agent.log_text()))?;
    let v6 = t.status().ok_or("status")?.rules_v6;
    ensure(v6 == ["R1b"], || format!("IPv6 has no sets, got {v6:?}"))?;
    drop(agent);
    Ok(())
}

fn bad_file() -> Result<(), Failed> {
    let t = Topology::new();
    let cluster = TempPath::new("kovn-cluster-", "yaml");
    std::fs::copy(example_cluster(), &*cluster).expect("copy cluster file");
    let mut agent = t.agent("auto", &cluster, &["--kube-proxy-mode", "ipvs"]);
    t.wait_ready(&mut agent, &["eth0", "ovn0"])?;
    let before = cluster_state(t.dump());
    let mut file = std::fs::OpenOptions::new()
        .append(true)
        .open(&*cluster)
        .expect("open");
    writeln!(
        file,
        "---\napiVersion: kubeovn.io/v1\nkind: Subnet\nmetadata:\n  name: broken\nspec:\n  cidrBlock: 10.300.0.0/16\n  vpc: ovn-cluster"
    )
    .expect("append");
    drop(file);
    let log = wait(scaled(Duration::from_secs(10)), || {
        let log = agent.log_text();
        Ok(log.contains("broken").then_some(log))
    })?;
    ensure(log.contains("10.300.0.0/16"), || {
        format!("the error must show the bad value:\n{log}")
    })?;
    ensure(cluster_state(t.dump()) == before, || {
        "a rejected file changed the maps".into()
    })?;
    t.send(3);
    let marked = t.marked();
    ensure(marked == (3, 3), || {
        format!("marking stopped after a bad file: {marked:?}")
    })?;
    Ok(())
}

/// Spec §5.3's custom-VPC pod p1 (10.0.1.5 on n1): readiness tcp 8080, liveness http "http"
/// (8081), startup tcp 9000.
const P1: &str = "apiVersion: v1
kind: Pod
metadata:
  name: p1
  namespace: default
  annotations:
    ovn.kubernetes.io/logical_switch: vpc1-sub
spec:
  nodeName: n1
  containers:
  - name: app
    image: registry.example/app
    ports:
    - name: http
      containerPort: 8081
    readinessProbe:
      tcpSocket:
        port: 8080
    livenessProbe:
      httpGet:
        port: http
    startupProbe:
      tcpSocket:
        port: 9000
status:
  podIPs:
  - ip: 10.0.1.5
  - ip: fd00:1::5
";

/// A listening TCP socket with `IP_TRANSPARENT`, as Kube-OVN's probe proxy opens it.
fn transparent_listener(port: u16) -> std::net::TcpListener {
    use std::os::fd::FromRawFd as _;
    // SAFETY: plain socket syscalls; the fd is handed to the TcpListener, which owns it.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        assert!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
        let one: libc::c_int = 1;
        let size = u32::try_from(size_of::<libc::c_int>()).expect("fits");
        for (level, option) in [
            (libc::SOL_IP, libc::IP_TRANSPARENT),
            (libc::SOL_SOCKET, libc::SO_REUSEADDR),
        ] {
            let rc = libc::setsockopt(fd, level, option, (&raw const one).cast(), size);
            assert_eq!(rc, 0, "setsockopt: {}", std::io::Error::last_os_error());
        }
        let addr = libc::sockaddr_in {
            sin_family: u16::try_from(libc::AF_INET).expect("fits"),
            sin_port: port.to_be(),
            sin_addr: libc::in_addr { s_addr: 0 },
            sin_zero: [0; 8],
        };
        let len = u32::try_from(size_of::<libc::sockaddr_in>()).expect("fits");
        assert_eq!(
            libc::bind(fd, (&raw const addr).cast(), len),
            0,
            "bind: {}",
            std::io::Error::last_os_error()
        );
        assert_eq!(
            libc::listen(fd, 16),
            0,
            "listen: {}",
            std::io::Error::last_os_error()
        );
        std::net::TcpListener::from_raw_fd(fd)
    }
}

/// Spec §5.3 T1/T2/T7 with real sockets: Kube-OVN's mangle OUTPUT mark and policy routes loop
/// kubelet's probe through `lo`, where the agent (not an iptables TPROXY rule) hands it to the
/// transparent listener; the accepted connection carries the pod's address, and later packets
/// reach the established socket. T3: the startup-probe port is not steered.
fn tproxy() -> Result<(), Failed> {
    use std::io::{Read as _, Write as _};
    let t = Topology::new();
    t.node.sh(
        "ip route add 10.0.1.0/24 dev ovn0; \
         iptables -t mangle -A OUTPUT -d 10.0.1.5/32 -p tcp --dport 8080 -j MARK --set-xmark 0x90003/0x90003; \
         iptables -t mangle -A OUTPUT -d 10.0.1.5/32 -p tcp --dport 8081 -j MARK --set-xmark 0x90003/0x90003; \
         ip rule add fwmark 0x90003/0x90003 lookup 10001; \
         ip rule add fwmark 0x90004/0x90004 lookup 10001; \
         ip route replace local 0.0.0.0/0 dev lo table 10001",
    ).expect("shell in namespace");
    let cluster = TempPath::new("kovn-cluster-", "yaml");
    let mut text = std::fs::read_to_string(example_cluster()).expect("example cluster");
    text.push_str("\n---\n");
    text.push_str(P1);
    std::fs::write(&*cluster, text).expect("cluster file");
    let mut agent = t.agent(
        "auto",
        &cluster,
        &["--kube-proxy-mode", "ipvs", "--enable-tproxy"],
    );
    let status = t.wait_ready(&mut agent, &["eth0", "ovn0", "lo"])?;
    ensure(map_size(&status, "kovn_tproxy4") == 2, || {
        format!("probe targets: {status:?}")
    })?;

    let outcome = t
        .node
        .enter(|| -> Result<Vec<String>, String> {
            let listener = transparent_listener(8102);
            listener.set_nonblocking(false).map_err(|e| e.to_string())?;
            let mut seen = Vec::new();
            for port in [8080u16, 8081] {
                let target = std::net::SocketAddr::from(([10, 0, 1, 5], port));
                let mut kubelet =
                    std::net::TcpStream::connect_timeout(&target, Duration::from_secs(3))
                        .map_err(|e| format!("kubelet probe to {target}: {e}"))?;
                let (mut proxied, _) = listener.accept().map_err(|e| e.to_string())?;
                let local = proxied.local_addr().map_err(|e| e.to_string())?;
                // T7: data after the handshake reaches the established transparent socket.
                kubelet
                    .write_all(b"GET /healthz")
                    .map_err(|e| e.to_string())?;
                proxied
                    .set_read_timeout(Some(Duration::from_secs(3)))
                    .map_err(|e| e.to_string())?;
                let mut buffer = [0u8; 12];
                proxied
                    .read_exact(&mut buffer)
                    .map_err(|e| format!("data after the SYN: {e}"))?;
                seen.push(format!("{local} {}", String::from_utf8_lossy(&buffer)));
            }
            Ok(seen)
        })
        .expect("enter namespace");
    let seen = outcome.map_err(|e| {
        let counters = t
            .status()
            .map(|s| format!("{:?}", s.counters))
            .unwrap_or_default();
        format!("{e}\ncounters {counters}\n{}", agent.log_text())
    })?;
    ensure(
        seen == ["10.0.1.5:8080 GET /healthz", "10.0.1.5:8081 GET /healthz"],
        || format!("the listener saw {seen:?}"),
    )?;
    let status = t.status().ok_or("status")?;
    ensure(counter(&status, "TPROXY") >= 4, || {
        format!("TPROXY counter: {status:?}")
    })?;
    Ok(())
}

/// The example cluster plus `n` ClusterIP Services (10.97.0.0/16, tcp/80): a large
/// `KUBE-CLUSTER-IP`, so a prune of it takes a while.
fn large_cluster(n: usize) -> TempPath {
    use std::fmt::Write as _;
    let mut text = std::fs::read_to_string(example_cluster()).expect("read example");
    for i in 0..n {
        let ip = format!("10.97.{}.{}", i / 250, i % 250 + 1);
        write!(
            text,
            "\n---\napiVersion: v1\nkind: Service\nmetadata: {{name: s{i}, namespace: bulk}}\n\
             spec: {{type: ClusterIP, clusterIP: {ip}, clusterIPs: [{ip}], ports: [{{port: 80}}]}}\n"
        )
        .expect("format");
    }
    let path = TempPath::new("kovn-cluster-", "yaml");
    std::fs::write(&*path, text).expect("write cluster");
    path
}

const IPVS_SETS: [&str; 3] = [
    "KUBE-CLUSTER-IP hash:ip,port",
    "KUBE-NODE-PORT-LOCAL-TCP bitmap:port range 0-65535",
    "KUBE-NODE-PORT-LOCAL-UDP bitmap:port range 0-65535",
];

fn create_ipvs_sets(t: &Topology) {
    for set in IPVS_SETS {
        t.node
            .sh(&format!("ipset create {set}"))
            .expect("shell in namespace");
    }
}

/// Sends UDP from the pod to kube-dns' ClusterIP (R1a, or R1b) at about 50 000 packets/s until
/// `stop`; returns how many it sent.
fn pod_to_cluster_ip(t: &Topology, stop: &std::sync::atomic::AtomicBool) -> u64 {
    use std::sync::atomic::Ordering;
    // 50 datagrams a millisecond on the host; under the VM matrix's TCG a tenth of that, or the
    // flood (every datagram emulated through the stack and the program) starves the agent whose
    // restarts the test times.
    let burst = (50 / kube_ovn_agent::testing::time_scale()).max(1);
    t.pod
        .enter(|| {
            let socket = UdpSocket::bind("10.16.0.5:0").expect("bind");
            let mut sent = 0u64;
            while !stop.load(Ordering::Relaxed) {
                for _ in 0..burst {
                    if socket.send_to(b"x", "10.96.0.10:53").is_ok() {
                        sent += 1;
                    }
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            sent
        })
        .expect("enter namespace")
}

/// Issue 12, item 1. An IPVS node (kube-proxy's sets exist) with the deployed default
/// `--kube-proxy-mode auto`: agent restarts, and kube-proxy's sets disappearing and coming back,
/// must never leave a pod → ClusterIP packet without 0x4000 (in IPVS mode Kube-OVN's filter
/// REJECT guard refuses such a TCP SYN). Before the fix the first sync after a restart ran in
/// iptables mode and pruned `KUBE-CLUSTER-IP` under R1a, and a mode switch pruned a rule's set
/// before switching the rule off.
fn restarts_never_unmark() -> Result<(), Failed> {
    use std::sync::atomic::{AtomicBool, Ordering};
    // 10 000 on the host; under the VM matrix's TCG (time scale 10) a tenth, so the suite fits
    // its per-binary budget there: the ordering under test does not depend on the count.
    let services: usize = (10_000 / kube_ovn_agent::testing::time_scale() as usize).max(500);
    let t = Topology::new();
    create_ipvs_sets(&t);
    // After the marked-packet counter (which RETURNs), this one counts the rest: unmarked.
    t.node
        .sh("iptables -t mangle -A PREROUTING -p udp --dport 53 -d 10.96.0.10 -j RETURN")?;
    let cluster = large_cluster(services);
    // The example cluster has six IPv4 (ClusterIP, protocol, port) entries.
    let want_ports = 6 + services as u64;
    // A first sync in the wrong mode is recorded (and the test waits for the poll to correct
    // it), so the packet count below shows what it cost.
    let problems = std::cell::RefCell::new(Vec::new());
    let start = |t: &Topology| -> Result<Agent, Failed> {
        let mut agent = t.agent("auto", &cluster, &["--kube-proxy-mode", "auto"]);
        wait(scaled(Duration::from_mins(1)), || {
            if let Ok(Some(status)) = agent.process.try_wait() {
                return Err(format!("agent exited with {status}"));
            }
            Ok(agent
                .log_text()
                .contains("first full sync done")
                .then_some(()))
        })
        .map_err(|e| format!("{e}\n{}", agent.log_text()))?;
        let status = t.status().ok_or("status")?;
        if map_size(&status, "kovn_svcport4") != want_ports || !first_rule_is_r1a(&status) {
            problems.borrow_mut().push(format!(
                "first sync: rules {:?} with {} service ports",
                status.rules_v4,
                map_size(&status, "kovn_svcport4")
            ));
            wait(scaled(Duration::from_secs(15)), || {
                Ok(t.status()
                    .filter(|s| map_size(s, "kovn_svcport4") == want_ports && first_rule_is_r1a(s)))
            })?;
        }
        Ok(agent)
    };
    let mut agent = start(&t)?;
    let counts = |t: &Topology| -> (u64, u64) {
        let listing = t
            .node
            .sh("iptables -t mangle -nvxL PREROUTING")
            .expect("shell in namespace");
        let mut rows = listing
            .lines()
            .filter(|l| l.contains("10.96.0.10") && l.contains("dpt:53"))
            .map(|l| {
                l.split_whitespace()
                    .next()
                    .and_then(|n| n.parse().ok())
                    .unwrap_or(0)
            });
        (rows.next().unwrap_or(0), rows.next().unwrap_or(0))
    };
    let before = counts(&t);
    let stop = AtomicBool::new(false);
    let (sent, outcome) = std::thread::scope(|scope| {
        let sender = scope.spawn(|| pod_to_cluster_ip(&t, &stop));
        let outcome = (|| -> Result<(), Failed> {
            std::thread::sleep(Duration::from_millis(300));
            for _ in 0..3 {
                agent.kill();
                agent = start(&t)?;
                std::thread::sleep(Duration::from_millis(300));
            }
            // kube-proxy's sets go away (R1a → R1b) and come back (R1b → R1a).
            for set in IPVS_SETS {
                let name = set.split_whitespace().next().expect("set name");
                t.node.sh(&format!("ipset destroy {name}"))?;
            }
            wait(scaled(Duration::from_secs(15)), || {
                Ok(t.status().filter(|s| s.rules_v4 == ["R1b"]))
            })?;
            std::thread::sleep(Duration::from_millis(300));
            create_ipvs_sets(&t);
            wait(scaled(Duration::from_secs(15)), || {
                Ok(t.status()
                    .filter(|s| map_size(s, "kovn_svcport4") == want_ports && first_rule_is_r1a(s)))
            })?;
            std::thread::sleep(Duration::from_millis(300));
            Ok(())
        })();
        stop.store(true, Ordering::Relaxed);
        (sender.join().expect("sender"), outcome)
    });
    outcome.map_err(|e| format!("{}\n{}", e.message().unwrap_or_default(), agent.log_text()))?;
    let after = counts(&t);
    let (marked, unmarked) = (after.0 - before.0, after.1 - before.1);
    eprintln!(
        "{services} Services, 3 restarts and 2 mode switches: sent {sent}, marked {marked}, unmarked {unmarked}"
    );
    let problems = problems.into_inner();
    ensure(marked > 0 && unmarked == 0 && problems.is_empty(), || {
        format!(
            "pod → ClusterIP packets: {sent} sent, {marked} marked, {unmarked} unmarked; {problems:?}\n{}",
            agent.log_text()
        )
    })?;
    Ok(())
}

/// Issue 12, item 8: kube-proxy's nftables tables are recognised (the rules stay R1b-only, as
/// Kube-OVN sees no KUBE-* ipsets), and native nftables rules that clear our mark bits on an
/// early prerouting chain are reported by the clobber check.
fn nftables_kube_proxy() -> Result<(), Failed> {
    use kube_ovn_agent::{
        host::clobber,
        host::ipset::{DetectedMode, detect_kube_proxy},
        translate::KubeProxySets,
    };
    let node = NetNs::new("kovn-nft-").expect("create namespace");
    let detect = || {
        node.enter(detect_kube_proxy)
            .expect("enter namespace")
            .map_err(|e| e.to_string())
    };
    ensure(detect()?.mode == DetectedMode::IptablesOrNone, || {
        "an empty namespace".into()
    })?;
    for family in ["ip", "ip6"] {
        node.sh(&format!("nft add table {family} kube-proxy"))
            .expect("shell in namespace");
        let found = detect()?;
        ensure(
            found.mode == DetectedMode::Nftables && found.sets == KubeProxySets::default(),
            || format!("table {family} kube-proxy: {found:?}"),
        )?;
        node.sh(&format!("nft delete table {family} kube-proxy"))
            .expect("shell in namespace");
    }
    // A table of another name is not kube-proxy's.
    node.sh("nft add table ip kube-proxy-other")
        .expect("shell in namespace");
    ensure(detect()?.mode == DetectedMode::IptablesOrNone, || {
        "another table".into()
    })?;
    // IPVS sets win: Kube-OVN only looks at them.
    node.sh("nft add table ip kube-proxy; ipset create KUBE-CLUSTER-IP hash:ip,port")
        .expect("shell in namespace");
    let found = detect()?;
    ensure(
        found.mode == DetectedMode::Ipvs && found.sets.v4.cluster_ip,
        || format!("{found:?}"),
    )?;

    // Calico-style native rules: a raw-priority prerouting chain clearing 0xf0000, a jump to a
    // chain clearing 0x4000, and a chain after nat that cannot matter.
    node.sh("nft -f - <<'EOF'
table inet felix {
  chain pre {
    type filter hook prerouting priority raw; policy accept;
    meta mark set meta mark & 0xfff0ffff
    jump sub
  }
  chain sub {
    meta mark set meta mark & 0xffffbfff
  }
  chain late {
    type filter hook prerouting priority dstnat + 10; policy accept;
    meta mark set 0
  }
}
EOF")
        .expect("shell in namespace");
    let report = node
        .enter(|| clobber::check(Duration::from_secs(10)))
        .expect("enter namespace");
    let native: Vec<(String, u32)> = report
        .findings
        .iter()
        .filter(|f| f.source == "nft")
        .map(|f| (f.chain.clone(), f.cleared_bits))
        .collect();
    ensure(report.checked.iter().any(|c| c == "nft"), || {
        format!("nft not run: {report:?}")
    })?;
    ensure(
        native == [("sub".to_owned(), 0x4000), ("pre".to_owned(), 0x9_0000)]
            || native == [("pre".to_owned(), 0x9_0000), ("sub".to_owned(), 0x4000)],
        || format!("native findings {native:?} in {report:#?}"),
    )?;
    Ok(())
}

/// Counting rules for pod → kube-dns TCP (10.96.0.10:53, R1a) segments, by conntrack state and
/// our mark, in mangle PREROUTING (after conntrack, before nat): what iptables' nat table would
/// see (NEW) and what it never sees (INVALID).
const TCP_LOOSE_RULES: [(&str, &str); 5] = [
    (
        "kovn-syn-marked",
        "--tcp-flags SYN SYN -m mark --mark 0x4000/0x4000",
    ),
    (
        "kovn-new-marked",
        "--tcp-flags SYN NONE -m conntrack --ctstate NEW -m mark --mark 0x4000/0x4000",
    ),
    (
        "kovn-new-unmarked",
        "--tcp-flags SYN NONE -m conntrack --ctstate NEW",
    ),
    (
        "kovn-invalid-unmarked",
        "--tcp-flags SYN NONE -m conntrack --ctstate INVALID -m mark --mark 0/0x4000",
    ),
    (
        "kovn-invalid-marked",
        "--tcp-flags SYN NONE -m conntrack --ctstate INVALID",
    ),
];

fn tcp_loose_counts(t: &Topology) -> Vec<u64> {
    let listing = t
        .node
        .sh("iptables -t mangle -nvxL PREROUTING")
        .expect("shell in namespace");
    TCP_LOOSE_RULES
        .iter()
        .map(|(comment, _)| {
            listing
                .lines()
                .find(|l| l.contains(&format!("/* {comment} */")))
                .and_then(|l| l.split_whitespace().next())
                .and_then(|n| n.parse().ok())
                .unwrap_or_else(|| panic!("no rule {comment} in\n{listing}"))
        })
        .collect()
}

/// `n` pod → 10.96.0.10:53 TCP segments with `flags`, each of its own connection (source ports
/// from `first_port`), as raw frames into `ovn0`: mid-stream segments when `flags` lacks SYN.
fn send_tcp(t: &Topology, flags: u8, first_port: u16, n: u16) {
    let mac = t
        .node
        .sh("cat /sys/class/net/ovn0/address")
        .expect("shell in namespace");
    let mac: Vec<u8> = mac
        .trim()
        .split(':')
        .map(|b| u8::from_str_radix(b, 16).expect("MAC"))
        .collect();
    let frames: Vec<Vec<u8>> = (first_port..first_port + n)
        .map(|sport| {
            let mut frame = Packet::new(
                "10.16.0.5".parse().expect("address"),
                "10.96.0.10".parse().expect("address"),
                L4::Tcp {
                    sport,
                    dport: 53,
                    flags,
                },
            )
            .frame();
            frame[..6].copy_from_slice(&mac);
            frame
        })
        .collect();
    t.pod
        .enter(|| send_frames(&frames, "eth0"))
        .expect("enter namespace");
    std::thread::sleep(Duration::from_millis(100));
}

/// Waits until every attachment runs the pinned program and it is not `old`; returns its id.
fn wait_swapped(t: &Topology, agent: &Agent, old: u32) -> Result<u32, Failed> {
    wait(scaled(Duration::from_secs(15)), || {
        let Some(status) = t.status() else {
            return Ok(None);
        };
        let Some(program) = &status.program else {
            return Ok(None);
        };
        let swapped = program.id != old
            && !status.attachments.is_empty()
            && status
                .attachments
                .iter()
                .all(|a| a.program_id == program.id);
        Ok(swapped.then_some(program.id))
    })
    .map_err(|e| {
        format!(
            "{e}: the program was not swapped\nagent log:\n{}",
            agent.log_text()
        )
        .into()
    })
}

/// Conntrack with `nf_conntrack_tcp_loose=1` (the default) picks a mid-stream segment up as a
/// NEW connection, which Kube-OVN's nat rules would mark: the agent classifies it. With 0 such
/// a segment is INVALID and never translated: the agent, which reads the sysctl at start and follows
/// its changes by swapping the program, leaves it unmarked (counted `tcp_no_syn`). SYNs are
/// marked either way.
fn tcp_loose() -> Result<(), Failed> {
    let t = Topology::new();
    let mut rules = String::from("sysctl -qw net.netfilter.nf_conntrack_tcp_loose=1; ");
    for (comment, matches) in TCP_LOOSE_RULES {
        let _ = write!(
            rules,
            "iptables -t mangle -A PREROUTING -p tcp -d 10.96.0.10 --dport 53 {matches} \
             -m comment --comment {comment} -j RETURN; "
        );
    }
    t.node.sh(&rules).expect("sysctl and counting rules");
    let mut agent = t.agent("auto", &example_cluster(), &["--kube-proxy-mode", "ipvs"]);
    let status = t.wait_ready(&mut agent, &["eth0", "ovn0"])?;
    let loose_program = status.program.as_ref().ok_or("no program")?.id;

    let n = 10;
    send_tcp(&t, TCP_ACK, 41000, n);
    send_tcp(&t, TCP_SYN, 42000, n);
    let loose = tcp_loose_counts(&t);
    ensure(loose == [10, 10, 0, 0, 0], || {
        format!(
            "tcp_loose=1: (SYN marked, NEW marked, NEW unmarked, INVALID unmarked, INVALID \
             marked) = {loose:?}, want [10, 10, 0, 0, 0]: every mid-stream segment is NEW and \
             must be marked as Kube-OVN's nat rules mark it"
        )
    })?;

    t.node
        .sh("sysctl -qw net.netfilter.nf_conntrack_tcp_loose=0")
        .expect("sysctl");
    let strict_program = wait_swapped(&t, &agent, loose_program)?;
    let skipped_before = counter(&t.status().ok_or("status")?, "tcp_no_syn");
    send_tcp(&t, TCP_ACK, 43000, n);
    send_tcp(&t, TCP_SYN, 44000, n);
    let strict = tcp_loose_counts(&t);
    let skipped = counter(&t.status().ok_or("status")?, "tcp_no_syn") - skipped_before;
    ensure(strict == [20, 10, 0, 10, 0] && skipped == 10, || {
        format!(
            "tcp_loose=0: counts {strict:?}, want [20, 10, 0, 10, 0] (mid-stream segments \
             INVALID and unmarked, SYNs marked); tcp_no_syn moved by {skipped}, want 10"
        )
    })?;

    t.node
        .sh("sysctl -qw net.netfilter.nf_conntrack_tcp_loose=1")
        .expect("sysctl");
    wait_swapped(&t, &agent, strict_program)?;
    send_tcp(&t, TCP_ACK, 45000, n);
    let back = tcp_loose_counts(&t);
    ensure(back == [20, 20, 0, 10, 0], || {
        format!("tcp_loose back to 1: counts {back:?}, want [20, 20, 0, 10, 0]")
    })?;
    agent.terminate();
    Ok(())
}
