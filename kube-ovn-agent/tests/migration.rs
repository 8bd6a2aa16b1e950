//! The migration commands against the real kernel, iptables and the agent binary, in private
//! network namespaces: `verify` next to Kube-OVN's real nat OVN-PREROUTING rules (spec §1.2) on
//! real traffic, agreeing and disagreeing; `cleanup-iptables` in a namespace full of Calico- and
//! kube-proxy-style rules that must survive. Needs root.

use std::{
    net::{SocketAddr, TcpStream, UdpSocket},
    process::{Child, Output, Stdio},
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use kube_ovn_agent::testing::{
    agent::n1_run_args,
    netns::{NetNs, TempPath, example_cluster},
    topology::N1,
};
use kube_ovn_testkit::agent::{AgentCli, AgentProcess, Privilege};
use libtest_mimic::{Failed, Trial};
use serde_json::Value;

const AGENT: &str = env!("CARGO_BIN_EXE_kube-ovn-agent");

type Test = fn() -> Result<(), Failed>;

fn main() {
    let tests: Vec<(&str, Test)> = vec![
        (
            "verify_agrees_with_kube_ovns_rules_on_real_traffic",
            verify_agrees,
        ),
        (
            "verify_disagrees_when_a_datapath_map_is_broken",
            verify_broken_map,
        ),
        (
            "verify_disagrees_when_a_kube_ovn_rule_is_missing",
            verify_broken_rule,
        ),
        ("verify_without_traffic_is_inconclusive", verify_idle),
        (
            "verify_agrees_on_the_probe_mix_a_pod_sends",
            verify_probe_agrees,
        ),
        (
            "verify_on_the_probe_mix_disagrees_when_a_datapath_map_is_broken",
            verify_probe_broken_map,
        ),
        (
            "verify_covers_r3_with_another_nodes_probe",
            verify_probe_from_two_nodes,
        ),
        (
            "shadow_verify_enforce_cleanup_verify_in_one_namespace",
            full_migration,
        ),
        (
            "cleanup_removes_only_kube_ovns_jumps_and_is_idempotent",
            cleanup_among_calico_and_kube_proxy,
        ),
        (
            "cleanup_keeps_the_mangle_jump_while_tproxy_rules_exist",
            cleanup_keeps_tproxy,
        ),
    ];
    let trials = tests
        .into_iter()
        .map(|(name, f)| Trial::test(name, f))
        .collect();
    kube_ovn_testkit::privileged::main("migration tests (verify, cleanup-iptables)", trials);
}

/// Spec §1.2's rules as Kube-OVN v1.13 builds them with kube-proxy in IPVS mode, in chain order
/// (R1a, R2t, R3t, R2u, R3u), for IPv4 (`ovn40…`, `KUBE-…`) and IPv6 (`ovn60…`, `KUBE-6-…`).
fn kube_ovn_rules(v6: bool) -> Vec<String> {
    let (ovn, kube) = if v6 {
        ("ovn60", "KUBE-6-")
    } else {
        ("ovn40", "KUBE-")
    };
    let mut rules = vec![format!(
        "-i ovn0 -m set --match-set {ovn}subnets src -m set --match-set {kube}CLUSTER-IP dst,dst \
         -j MARK --set-xmark 0x4000/0x4000"
    )];
    for proto in ["tcp", "udp"] {
        let set = format!("{kube}NODE-PORT-LOCAL-{}", proto.to_uppercase());
        rules.push(format!(
            "-p {proto} -m addrtype --dst-type LOCAL -m set --match-set {set} dst -j MARK \
             --set-xmark 0x80000/0x80000"
        ));
        rules.push(format!(
            "-p {proto} -m set --match-set {ovn}other-node src -m set --match-set {set} dst -j \
             MARK --set-xmark 0x4000/0x4000"
        ));
    }
    rules
}

const JUMP: &str = "-m comment --comment \"kube-ovn prerouting rules\" -j OVN-PREROUTING";

/// Node n1 of spec §5.1 (the kit's [`N1`], with IPv6 on `eth0`) with kube-proxy in IPVS mode
/// (its sets; ClusterIPs local, on `lo` as this kernel has no dummy driver for kube-ipvs0) and
/// Kube-OVN's ipsets and nat OVN-PREROUTING rules with the jump.
struct Topology(N1);

impl std::ops::Deref for Topology {
    type Target = N1;
    fn deref(&self) -> &N1 {
        &self.0
    }
}

impl Topology {
    fn new() -> Self {
        let n1 = N1::new("kovn-m", true);
        let node = &n1.node;
        node.sh("for a in 10.96.0.1 10.96.0.10 10.96.0.100 10.96.0.101; do \
               ip addr add $a/32 dev lo; done")
            .expect("shell in namespace");
        // kube-proxy's IPVS sets and Kube-OVN's own, filled as for the example cluster.
        node.sh(
            "ipset create KUBE-CLUSTER-IP hash:ip,port; \
             for e in 10.96.0.1,tcp:443 10.96.0.10,udp:53 10.96.0.10,tcp:53 10.96.0.100,tcp:80 \
                      10.96.0.100,udp:53 10.96.0.101,tcp:80; do ipset add KUBE-CLUSTER-IP $e; done; \
             ipset create KUBE-6-CLUSTER-IP hash:ip,port family inet6; \
             for e in fd00:10:96::1,tcp:443 fd00:10:96::100,tcp:80 fd00:10:96::100,udp:53; do \
               ipset add KUBE-6-CLUSTER-IP $e; done; \
             for s in KUBE-NODE-PORT-LOCAL KUBE-6-NODE-PORT-LOCAL; do \
               ipset create $s-TCP bitmap:port range 0-65535; ipset add $s-TCP 30080; \
               ipset create $s-UDP bitmap:port range 0-65535; ipset add $s-UDP 30053; done; \
             ipset create ovn40subnets hash:net; \
             for c in 10.16.0.0/16 100.64.0.0/16 10.17.0.0/16; do ipset add ovn40subnets $c; done; \
             ipset create ovn40services hash:net; ipset add ovn40services 10.96.0.0/12; \
             ipset create ovn40other-node hash:net; \
             ipset add ovn40other-node 192.168.0.12; ipset add ovn40other-node 192.168.0.13; \
             ipset create ovn60subnets hash:net family inet6; ipset add ovn60subnets fd00:10:16::/64; \
             ipset create ovn60services hash:net family inet6; \
             ipset create ovn60other-node hash:net family inet6; ipset add ovn60other-node fd00::12",
        ).expect("shell in namespace");
        for (ipt, v6) in [("iptables", false), ("ip6tables", true)] {
            // As updateIptablesChain does on a fresh node: chain, jump at 1, rules by index.
            node.sh(&format!(
                "{ipt} -t nat -N OVN-PREROUTING; {ipt} -t nat -I PREROUTING 1 {JUMP}"
            ))
            .expect("shell in namespace");
            // Kube-OVN's P6 in nat OVN-POSTROUTING. Its conntrack match is what switches
            // connection tracking on in a fresh namespace (design §5); without it nat
            // PREROUTING is never traversed and Kube-OVN's counters stay at zero.
            node.sh(&format!(
                "{ipt} -t nat -N OVN-POSTROUTING; \
                 {ipt} -t nat -A OVN-POSTROUTING -p tcp -m tcp --tcp-flags SYN NONE \
                   -m conntrack --ctstate NEW -j RETURN; \
                 {ipt} -t nat -I POSTROUTING 1 -m comment --comment \"kube-ovn postrouting rules\" \
                   -j OVN-POSTROUTING"
            ))
            .expect("shell in namespace");
            for (i, rule) in kube_ovn_rules(v6).iter().enumerate() {
                node.sh(&format!("{ipt} -t nat -I OVN-PREROUTING {} {rule}", i + 1))
                    .expect("shell in namespace");
            }
        }
        Self(n1)
    }

    /// The agent's commands in the node namespace, on this node's bpffs, with the capabilities
    /// `KOVN_TEST_AGENT_CAPS` names (`cargo xtask test`: the `DaemonSet`'s, which is also what
    /// `cleanup-iptables` and `verify` get when an operator runs them in the agent's pod).
    fn handle(&self) -> AgentCli {
        AgentCli::new(&self.node, AGENT, self.root(), Privilege::from_env())
    }

    fn agent(&self, mode: &str) -> Agent {
        let log = TempPath::new("kovn-magent-", "log");
        let args = n1_run_args(&example_cluster(), &["--mode", mode]);
        let process = self.handle().spawn(&args, &log).expect("start the agent");
        let mut agent = Agent { process, log };
        self.wait_ready(&mut agent, mode);
        agent
    }

    /// Waits until the agent attached to eth0 and ovn0 and programmed its maps in `mode`.
    fn wait_ready(&self, agent: &mut Agent, mode: &str) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(Some(status)) = agent.process.try_wait() {
                panic!("agent exited with {status}:\n{}", agent.log_text());
            }
            match self.handle().status() {
                Ok(status) => {
                    let attached = status.attached();
                    let programmed = status.rules_v6.iter().any(|n| n == "R3u");
                    if attached.contains(&"eth0")
                        && attached.contains(&"ovn0")
                        && programmed
                        && status.mode == mode
                    {
                        return;
                    }
                }
                Err(e @ kube_ovn_testkit::agent::Error::Json { .. }) => panic!("{e}"),
                Err(_) => {}
            }
            assert!(
                Instant::now() < deadline,
                "agent not ready in {mode} mode after 20 s:\n{}",
                agent.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Runs an agent subcommand in the node namespace with this node's `--bpffs-root`.
    fn cli(&self, args: &[&str]) -> Output {
        self.handle()
            .command()
            .args(args)
            .arg("--bpffs-root")
            .arg(self.root())
            .output()
            .expect("run the agent CLI")
    }

    /// Runs `verify --json` for `window` while real traffic flows: every 10 ms new UDP
    /// "connections" of 3 datagrams each from the client to the ETP=Local NodePort 30053 over
    /// IPv4 and IPv6 (R2u + R3u) and from the pod to kube-dns' ClusterIP (R1a), and a TCP
    /// connection attempt to NodePort 30080 (R2t + R3t). Returns (exit code, report).
    fn verify_with_traffic(&self, window: &str, traffic: bool) -> (i32, Value) {
        let stop = AtomicBool::new(false);
        let output = std::thread::scope(|scope| {
            if traffic {
                scope.spawn(|| {
                    self.client
                        .enter(|| client_traffic(&stop))
                        .expect("enter namespace");
                });
                scope.spawn(|| {
                    self.pod
                        .enter(|| pod_traffic(&stop))
                        .expect("enter namespace");
                });
            }
            let child = self
                .handle()
                .command()
                .args(["verify", "--json", "--window", window])
                .arg("--bpffs-root")
                .arg(self.root())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("start verify");
            let output = wait_output(child, Duration::from_mins(1));
            stop.store(true, Ordering::Relaxed);
            output
        });
        let code = output.status.code().unwrap_or(-1);
        let report = serde_json::from_slice(&output.stdout).unwrap_or_else(|e| {
            panic!(
                "verify printed no JSON ({e}), exit {code}:\n{}\n{}",
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            )
        });
        (code, report)
    }

    /// Runs `verify --json` for `window` while `kube-ovn-agent probe` runs in the pod namespace
    /// with the mix it chooses from the example cluster for n1 (the agent's own `--source`):
    /// its packets enter the node through ovn0. With `other_node`, a second probe runs in the
    /// client namespace (n2's address) to this node's NodePorts: what n2's probe pod sends to
    /// n1's once n2 masquerades it (`natOutgoing`). Returns (verify's exit code, its report, the
    /// pod probe's report).
    fn verify_with_probe(&self, window: &str, other_node: bool) -> (i32, Value, Value) {
        let (verify, probe) = std::thread::scope(|scope| {
            let remote = other_node.then(|| {
                scope.spawn(|| {
                    let child = self
                        .client
                        .command(AGENT)
                        .args(["probe", "--json", "--rate", "100", "--duration", "3s"])
                        .args(["--connect-timeout", "100ms"])
                        .args(["--target", "tcp/192.168.0.11:30080/other-node-node-port"])
                        .args(["--target", "udp/192.168.0.11:30053/other-node-node-port"])
                        .args(["--target", "udp/[fd00::11]:30053/other-node-node-port"])
                        .stdout(Stdio::piped())
                        .stderr(Stdio::piped())
                        .spawn()
                        .expect("start probe");
                    wait_output(child, Duration::from_secs(30))
                })
            });
            let probe = scope.spawn(|| {
                let child = self
                    .pod
                    .command(AGENT)
                    .args(["probe", "--json", "--node-name", "n1", "--rate", "100"])
                    .args(["--duration", "3s", "--connect-timeout", "100ms"])
                    .arg(format!("--source=file:{}", example_cluster().display()))
                    .stdout(Stdio::piped())
                    .stderr(Stdio::piped())
                    .spawn()
                    .expect("start probe");
                wait_output(child, Duration::from_secs(30))
            });
            let child = self
                .handle()
                .command()
                .args(["verify", "--json", "--window", window])
                .arg("--bpffs-root")
                .arg(self.root())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("start verify");
            let verify = wait_output(child, Duration::from_mins(1));
            if let Some(remote) = remote {
                let out = remote.join().expect("probe thread");
                assert!(out.status.success(), "probe from n2's address: {out:?}");
            }
            (verify, probe.join().expect("probe thread"))
        });
        let json = |what: &str, out: &Output| -> Value {
            serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
                panic!(
                    "{what} printed no JSON ({e}), exit {:?}:\n{}\n{}",
                    out.status.code(),
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                )
            })
        };
        assert!(probe.status.success(), "probe: {probe:?}");
        (
            verify.status.code().unwrap_or(-1),
            json("verify", &verify),
            json("probe", &probe),
        )
    }

    /// The per-packet copies `verify` installs must be gone afterwards.
    fn assert_no_verify_chain(&self) {
        for ipt in ["iptables", "ip6tables"] {
            let raw = self
                .node
                .sh(&format!("{ipt}-save -t raw"))
                .expect("shell in namespace");
            assert!(
                !raw.contains("KOVN-VERIFY"),
                "{ipt}: verify left its chain behind:\n{raw}"
            );
        }
    }

    /// nat PREROUTING of both families, as `iptables -S` prints it.
    fn prerouting(&self) -> String {
        self.node
            .sh("iptables -t nat -S PREROUTING; ip6tables -t nat -S PREROUTING")
            .expect("shell in namespace")
    }
}

fn client_traffic(stop: &AtomicBool) {
    let deadline = Instant::now() + Duration::from_mins(1);
    while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
        for (bind, to) in [
            ("192.168.0.12:0", "192.168.0.11:30053"),
            ("[fd00::12]:0", "[fd00::11]:30053"),
        ] {
            let socket = UdpSocket::bind(bind).expect("bind");
            for _ in 0..3 {
                socket.send_to(b"x", to).expect("send");
            }
        }
        let to: SocketAddr = "192.168.0.11:30080".parse().expect("address");
        // No listener: the node answers with a RST, the SYN has been counted.
        let _ = TcpStream::connect_timeout(&to, Duration::from_millis(200));
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn pod_traffic(stop: &AtomicBool) {
    let deadline = Instant::now() + Duration::from_mins(1);
    while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
        let socket = UdpSocket::bind("10.16.0.5:0").expect("bind");
        for _ in 0..3 {
            socket.send_to(b"x", "10.96.0.10:53").expect("send");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Collects a child's output, killing it after `timeout`.
fn wait_output(mut child: Child, timeout: Duration) -> Output {
    let deadline = Instant::now() + timeout;
    while child.try_wait().ok().flatten().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().expect("collect output")
}

struct Agent {
    process: AgentProcess,
    log: TempPath,
}

impl Agent {
    fn log_text(&self) -> String {
        std::fs::read_to_string(&*self.log).unwrap_or_default()
    }

    /// SIGTERM, up to 10 s to exit, then SIGKILL.
    fn stop(&mut self) {
        let _ = self.process.terminate(Duration::from_secs(10));
    }
}

fn ensure(condition: bool, message: impl FnOnce() -> String) -> Result<(), Failed> {
    if condition {
        Ok(())
    } else {
        Err(message().into())
    }
}

fn rule<'a>(report: &'a Value, name: &str) -> &'a Value {
    report["rules"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|r| r["rule"] == name)
        .unwrap_or_else(|| panic!("no rule {name} in {report:#}"))
}

fn count(value: &Value) -> u64 {
    value
        .as_u64()
        .unwrap_or_else(|| panic!("not a count: {value}"))
}

fn verify_agrees() -> Result<(), Failed> {
    let n = Topology::new();
    let _agent = n.agent("shadow");
    // What a verify killed with -9 leaves behind: the next run must clear and redo it.
    n.node.sh(
        "iptables -t raw -N KOVN-VERIFY; iptables -t raw -A KOVN-VERIFY -p udp; \
         iptables -t raw -I PREROUTING 1 -m comment --comment \"kube-ovn-ebpf verify\" -j KOVN-VERIFY",
    ).expect("shell in namespace");
    let (code, report) = n.verify_with_traffic("3s", true);
    n.assert_no_verify_chain();
    ensure(code == 0 && report["verdict"] == "agree", || {
        format!("verify exited {code}:\n{report:#}")
    })?;
    ensure(
        report["notes"].to_string().contains("interrupted verify"),
        || format!("the leftover chain must be reported: {report:#}"),
    )?;
    ensure(report["mode"] == "shadow", || format!("{report:#}"))?;
    for name in ["R1a", "R2t", "R2u", "R3t", "R3u"] {
        let r = rule(&report, name);
        ensure(r["verdict"] == "agree", || format!("{name}: {r:#}"))?;
        ensure(
            r["kube_ovn"] == serde_json::json!(["IPv4", "IPv6"])
                && r["ebpf"] == serde_json::json!(["IPv4", "IPv6"]),
            || format!("{name} must be in force on both sides, both families: {r:#}"),
        )?;
    }
    // The semantics the comparison accounts for: Kube-OVN's nat rule counts each connection
    // once, the datapath and the per-packet copy count every datagram (3 per connection).
    let r2u = rule(&report, "R2u");
    let connections = count(&r2u["connections"]);
    let packets = count(&r2u["packets"]);
    let (lo, hi) = (
        count(&r2u["ebpf_packets"][0]),
        count(&r2u["ebpf_packets"][1]),
    );
    ensure(connections > 10, || format!("too little traffic: {r2u:#}"))?;
    ensure(packets >= 2 * connections, || {
        format!("per-packet count should be ~3× the connection count: {r2u:#}")
    })?;
    ensure(lo <= packets && packets <= hi, || {
        format!("per-packet counts must match exactly: {r2u:#}")
    })?;
    // R1a's traffic is delivered locally (the ClusterIPs are local), so it is tracked too.
    let r1a = rule(&report, "R1a");
    ensure(
        count(&r1a["packets"]) >= 2 * count(&r1a["connections"]),
        || format!("{r1a:#}"),
    )
}

fn verify_broken_map() -> Result<(), Failed> {
    let n = Topology::new();
    let _agent = n.agent("shadow");
    // Behind the agent's back, NodePort 30053 leaves the datapath's NodePort-local array (the
    // agent heals such edits only at its next full resync, 5 min away).
    let path = n.root().join("maps/kovn_nplocal");
    let data = aya::maps::MapData::from_pin(&path).expect("open kovn_nplocal");
    let mut array: aya::maps::Array<_, u8> = aya::maps::Map::Array(data)
        .try_into()
        .expect("kovn_nplocal is an array of u8");
    array.set(30053, 0, 0).expect("clear port 30053");
    let (code, report) = n.verify_with_traffic("3s", true);
    n.assert_no_verify_chain();
    ensure(code == 2 && report["verdict"] == "disagree", || {
        format!("verify exited {code}:\n{report:#}")
    })?;
    for name in ["R2u", "R3u"] {
        let r = rule(&report, name);
        ensure(r["verdict"] == "disagree", || format!("{name}: {r:#}"))?;
        let reasons = r["reasons"].to_string();
        ensure(
            reasons.contains("new connections") && reasons.contains("per packet"),
            || format!("{name} must fail both comparisons: {r:#}"),
        )?;
    }
    for name in ["R1a", "R2t", "R3t"] {
        let r = rule(&report, name);
        ensure(r["verdict"] == "agree", || {
            format!("{name} is unaffected: {r:#}")
        })?;
    }
    Ok(())
}

fn verify_broken_rule() -> Result<(), Failed> {
    let n = Topology::new();
    let _agent = n.agent("shadow");
    // Kube-OVN's IPv4 R3u goes: the datapath now marks traffic Kube-OVN does not. Connection
    // counts cannot show that; the rule-set and the per-packet comparisons must.
    let r3u = &kube_ovn_rules(false)[4];
    n.node
        .sh(&format!("iptables -t nat -D OVN-PREROUTING {r3u}"))
        .expect("shell in namespace");
    let (code, report) = n.verify_with_traffic("3s", true);
    n.assert_no_verify_chain();
    ensure(code == 2 && report["verdict"] == "disagree", || {
        format!("verify exited {code}:\n{report:#}")
    })?;
    let r = rule(&report, "R3u");
    let reasons = r["reasons"].to_string();
    ensure(
        r["verdict"] == "disagree"
            && reasons.contains("IPv4: the datapath has this rule in force")
            && reasons.contains("per packet"),
        || format!("R3u: {r:#}"),
    )?;
    ensure(rule(&report, "R2u")["verdict"] == "agree", || {
        format!("{report:#}")
    })
}

fn verify_idle() -> Result<(), Failed> {
    let n = Topology::new();
    let _agent = n.agent("shadow");
    let (code, report) = n.verify_with_traffic("1s", false);
    n.assert_no_verify_chain();
    ensure(code == 3 && report["verdict"] == "inconclusive", || {
        format!("verify exited {code}:\n{report:#}")
    })?;
    let idle = report["rules"]
        .as_array()
        .into_iter()
        .flatten()
        .all(|r| r["verdict"] == "idle");
    ensure(idle, || format!("{report:#}"))
}

/// The probe alone makes `verify` conclusive: every rule its mix covers that is in force here
/// (R1a, R2t, R2u; R1b is not, kube-proxy being in IPVS mode) saw new connections and packets
/// on both sides, and they agree; R3t/R3u, which no pod reaches, stay idle. The near-misses
/// (a ClusterIP's other port, another node's NodePort, …) crossed ovn0 as well: an over-match
/// on them would show as a per-packet disagreement.
fn verify_probe_agrees() -> Result<(), Failed> {
    let n = Topology::new();
    let _agent = n.agent("shadow");
    let (code, report, probe) = n.verify_with_probe("4s", false);
    n.assert_no_verify_chain();
    ensure(code == 0 && report["verdict"] == "agree", || {
        format!("verify exited {code}:\n{report:#}\nprobe:\n{probe:#}")
    })?;
    ensure(
        probe["covers"] == serde_json::json!(["R1a", "R1b", "R2t", "R2u"])
            && probe["not_covered"][0]["rule"] == "R3t"
            && probe["not_covered"][1]["rule"] == "R3u",
        || format!("{probe:#}"),
    )?;
    ensure(count(&probe["sent"]) >= 100, || format!("{probe:#}"))?;
    for name in ["R1a", "R2t", "R2u"] {
        let r = rule(&report, name);
        ensure(
            r["verdict"] == "agree"
                && count(&r["connections"]) > 0
                && count(&r["packets"]) > 0
                && count(&r["ebpf_packets"][0]) > 0,
            || format!("{name} must see the probe's traffic on both sides: {r:#}"),
        )?;
    }
    for name in ["R3t", "R3u"] {
        let r = rule(&report, name);
        ensure(r["verdict"] == "idle", || {
            format!("{name} is out of a pod's reach: {r:#}")
        })?;
    }
    Ok(())
}

/// The pod's mix plus the probe of another node (from n2's address, as n2's probe pod's
/// packets arrive once masqueraded): now every rule in force saw traffic, R3t and R3u
/// included, and verify agrees on all five.
fn verify_probe_from_two_nodes() -> Result<(), Failed> {
    let n = Topology::new();
    let _agent = n.agent("shadow");
    let (code, report, probe) = n.verify_with_probe("4s", true);
    n.assert_no_verify_chain();
    ensure(code == 0 && report["verdict"] == "agree", || {
        format!("verify exited {code}:\n{report:#}\nprobe:\n{probe:#}")
    })?;
    for name in ["R1a", "R2t", "R2u", "R3t", "R3u"] {
        let r = rule(&report, name);
        ensure(
            r["verdict"] == "agree" && count(&r["connections"]) > 0 && count(&r["packets"]) > 0,
            || format!("{name} must see traffic on both sides: {r:#}"),
        )?;
    }
    Ok(())
}

/// The same mix with NodePort 30053 cleared from the datapath's NodePort-local array behind
/// the agent's back: R2u, which the probe covers, disagrees.
fn verify_probe_broken_map() -> Result<(), Failed> {
    let n = Topology::new();
    let _agent = n.agent("shadow");
    let path = n.root().join("maps/kovn_nplocal");
    let data = aya::maps::MapData::from_pin(&path).expect("open kovn_nplocal");
    let mut array: aya::maps::Array<_, u8> = aya::maps::Map::Array(data)
        .try_into()
        .expect("kovn_nplocal is an array of u8");
    array.set(30053, 0, 0).expect("clear port 30053");
    let (code, report, probe) = n.verify_with_probe("4s", false);
    n.assert_no_verify_chain();
    ensure(code == 2 && report["verdict"] == "disagree", || {
        format!("verify exited {code}:\n{report:#}\nprobe:\n{probe:#}")
    })?;
    let r2u = rule(&report, "R2u");
    ensure(
        r2u["verdict"] == "disagree" && r2u["reasons"].to_string().contains("per packet"),
        || format!("R2u: {r2u:#}"),
    )?;
    for name in ["R1a", "R2t"] {
        let r = rule(&report, name);
        ensure(r["verdict"] == "agree", || {
            format!("{name} is unaffected: {r:#}")
        })?;
    }
    Ok(())
}

/// docs/migration.md's procedure, end to end: shadow → verify → enforce → cleanup-iptables
/// (refused while shadow) → verify again (per packet only, the jump is gone).
fn full_migration() -> Result<(), Failed> {
    let n = Topology::new();
    let mut agent = n.agent("shadow");
    let (code, report) = n.verify_with_traffic("2s", true);
    ensure(code == 0, || format!("shadow verify: {report:#}"))?;

    let before = n.prerouting();
    let refused = n.cli(&["cleanup-iptables"]);
    let stderr = String::from_utf8_lossy(&refused.stderr);
    ensure(
        !refused.status.success() && stderr.contains("shadow"),
        || format!("cleanup must refuse while the datapath is in shadow mode: {stderr}"),
    )?;
    ensure(n.prerouting() == before, || {
        "a refused cleanup changed the rules".into()
    })?;

    agent.stop();
    let _agent = n.agent("enforce");
    let out = n.cli(&["cleanup-iptables"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    ensure(out.status.success(), || {
        format!("{stdout}{}", String::from_utf8_lossy(&out.stderr))
    })?;
    ensure(stdout.matches("removed       ").count() == 2, || {
        format!("one nat jump per family:\n{stdout}")
    })?;
    let after = n.prerouting();
    ensure(!after.contains("OVN-PREROUTING"), || after.clone())?;

    let (code, report) = n.verify_with_traffic("2s", true);
    n.assert_no_verify_chain();
    ensure(code == 0, || format!("verify after cleanup: {report:#}"))?;
    let r2u = rule(&report, "R2u");
    ensure(
        r2u["connections"].is_null() && count(&r2u["packets"]) > 0,
        || format!("without the jump only the per-packet comparison remains: {r2u:#}"),
    )?;
    ensure(
        report["notes"].to_string().contains("jump is not in nat"),
        || format!("{report:#}"),
    )
}

/// Calico-style, kube-proxy-style and CNI-portmap-style rules around several copies of
/// Kube-OVN's jump, in nat and mangle, IPv4 and IPv6, both iptables backends; plus near-misses
/// that are not Kube-OVN's jump.
const NEIGHBOURS: &str = r#"
*nat
:PREROUTING ACCEPT [0:0]
:cali-PREROUTING - [0:0]
:KUBE-SERVICES - [0:0]
:CNI-HOSTPORT-DNAT - [0:0]
:OVN-PREROUTING - [0:0]
:OVN-PREROUTING2 - [0:0]
-A PREROUTING -m comment --comment "cali:6gwbT8clXdHdC1b1" -j cali-PREROUTING
-A PREROUTING -m comment --comment "kube-ovn prerouting rules" -j OVN-PREROUTING
-A PREROUTING -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
-A PREROUTING -m comment --comment "kube-ovn prerouting rules" -j OVN-PREROUTING
-A PREROUTING -m addrtype --dst-type LOCAL -j CNI-HOSTPORT-DNAT
-A PREROUTING -i eth0 -m comment --comment "kube-ovn prerouting rules" -j OVN-PREROUTING
-A PREROUTING -m comment --comment "kube-ovn prerouting rules" -j OVN-PREROUTING2
-A PREROUTING -m comment --comment "kube-ovn prerouting rules" -j OVN-PREROUTING
COMMIT
*mangle
:PREROUTING ACCEPT [0:0]
:cali-PREROUTING - [0:0]
:OVN-PREROUTING - [0:0]
-A PREROUTING -m comment --comment "kube-ovn prerouting rules" -j OVN-PREROUTING
-A PREROUTING -m comment --comment "cali:6gwbT8clXdHdC1b1" -j cali-PREROUTING
-A PREROUTING -m comment --comment "kube-ovn prerouting rules" -j OVN-PREROUTING
COMMIT
*raw
:PREROUTING ACCEPT [0:0]
:cali-PREROUTING - [0:0]
-A PREROUTING -m comment --comment "cali:6gwbT8clXdHdC1b1" -j cali-PREROUTING
-A cali-PREROUTING -m comment --comment "cali:6BJqBjBC7crtA-7-" -j MARK --set-xmark 0x0/0xf0000
COMMIT
"#;

/// Every rule of every table in the namespace, both backends, both families.
fn all_rules(ns: &NetNs) -> String {
    ns.sh(
        "for t in iptables-nft ip6tables-nft iptables-legacy ip6tables-legacy; do \
           echo \"# $t\"; $t-save | grep -v '^#'; done",
    )
    .expect("shell in namespace")
}

/// Rules minus Kube-OVN's exact jump.
fn without_kube_ovn_jumps(rules: &str) -> Vec<String> {
    rules
        .lines()
        .filter(|l| *l != format!("-A PREROUTING {JUMP}"))
        .map(str::to_owned)
        .collect()
}

/// A namespace holding [`NEIGHBOURS`] in both backends and both families.
fn neighbours() -> NetNs {
    let ns = NetNs::new("kovn-mclean-").expect("create namespace");
    for restore in [
        "iptables-nft-restore",
        "ip6tables-nft-restore",
        "iptables-legacy-restore",
        "ip6tables-legacy-restore",
    ] {
        let mut child = ns
            .command(restore)
            .stdin(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("restore");
        std::io::Write::write_all(child.stdin.as_mut().expect("stdin"), NEIGHBOURS.as_bytes())
            .expect("write rules");
        let out = child.wait_with_output().expect("restore");
        assert!(
            out.status.success(),
            "{restore}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    ns
}

/// `cleanup-iptables ARGS` in `ns`, pointed at a bpffs root where nothing is pinned.
fn cleanup(ns: &NetNs, args: &[&str]) -> (bool, String) {
    let out = ns
        .command(AGENT)
        .arg("cleanup-iptables")
        .args(args)
        .arg("--bpffs-root")
        .arg(format!("/run/{}-none", ns.name()))
        .output()
        .expect("cleanup-iptables");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

fn cleanup_among_calico_and_kube_proxy() -> Result<(), Failed> {
    let ns = neighbours();
    let before = all_rules(&ns);
    let jump_line = format!("-A PREROUTING {JUMP}");
    let jumps = before.lines().filter(|l| *l == jump_line).count();
    // 3 in nat + 2 in mangle, per backend and family.
    ensure(jumps == 5 * 4, || {
        format!("fixture has {jumps} jumps:\n{before}")
    })?;

    // No enforcing datapath here: refused, nothing changed.
    let (ok, text) = cleanup(&ns, &[]);
    ensure(!ok && text.contains("refusing"), || text)?;
    ensure(all_rules(&ns) == before, || {
        "a refused cleanup changed rules".into()
    })?;

    let (ok, text) = cleanup(&ns, &["--dry-run"]);
    ensure(ok && text.matches("would remove  ").count() == 20, || text)?;
    ensure(all_rules(&ns) == before, || {
        "--dry-run changed rules".into()
    })?;

    let (ok, text) = cleanup(&ns, &["--force"]);
    ensure(ok && text.matches("removed       ").count() == 20, || {
        text.clone()
    })?;
    for tool in [
        "iptables-nft ",
        "ip6tables-nft ",
        "iptables-legacy ",
        "ip6tables-legacy ",
    ] {
        let removed = |table: &str| {
            text.lines()
                .filter(|l| l.contains(tool) && l.contains(table))
                .count()
        };
        ensure((removed(" nat "), removed(" mangle ")) == (3, 2), || {
            format!("{tool}: 3 nat and 2 mangle copies expected:\n{text}")
        })?;
    }
    let after = all_rules(&ns);
    ensure(
        after.lines().map(str::to_owned).collect::<Vec<_>>() == without_kube_ovn_jumps(&before),
        || {
            format!(
                "only Kube-OVN's jumps may go, the rest in order:\nbefore:\n{before}\nafter:\n{after}"
            )
        },
    )?;
    for survivor in [
        "-A PREROUTING -m comment --comment \"cali:6gwbT8clXdHdC1b1\" -j cali-PREROUTING",
        "-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES",
        "-A PREROUTING -m addrtype --dst-type LOCAL -j CNI-HOSTPORT-DNAT",
        "-A PREROUTING -i eth0 -m comment --comment \"kube-ovn prerouting rules\" -j OVN-PREROUTING",
        "-A PREROUTING -m comment --comment \"kube-ovn prerouting rules\" -j OVN-PREROUTING2",
        ":OVN-PREROUTING - [0:0]",
    ] {
        let copies = after.lines().filter(|l| *l == survivor).count();
        ensure(copies >= 4, || {
            format!("{survivor:?} survived {copies}× of ≥4:\n{after}")
        })?;
    }

    let (ok, text) = cleanup(&ns, &["--force"]);
    ensure(ok && text.starts_with("nothing to remove"), || text)?;
    ensure(all_rules(&ns) == after, || {
        "the second run changed rules".into()
    })
}

fn cleanup_keeps_tproxy() -> Result<(), Failed> {
    let ns = NetNs::new("kovn-mtproxy-").expect("create namespace");
    ns.sh(&format!(
        "iptables -t mangle -N OVN-PREROUTING; \
         iptables -t mangle -A OVN-PREROUTING -d 10.0.1.5/32 -p tcp -m tcp --dport 8080 -j TPROXY \
           --on-port 8102 --on-ip 192.168.0.11 --tproxy-mark 0x90004/0x90004; \
         iptables -t mangle -I PREROUTING 1 {JUMP}; \
         iptables -t nat -N OVN-PREROUTING; iptables -t nat -I PREROUTING 1 {JUMP}; \
         ip6tables -t mangle -N OVN-PREROUTING; ip6tables -t mangle -I PREROUTING 1 {JUMP}"
    ))
    .expect("shell in namespace");
    let (ok, text) = cleanup(&ns, &["--force"]);
    ensure(ok, || text.clone())?;
    ensure(text.contains("kept") && text.contains("TPROXY"), || {
        text.clone()
    })?;
    let mangle = ns
        .sh("iptables -t mangle -S PREROUTING")
        .expect("shell in namespace");
    ensure(mangle.contains("OVN-PREROUTING"), || {
        format!("the IPv4 mangle jump leads to TPROXY rules and must stay:\n{mangle}")
    })?;
    let rest = ns
        .sh("iptables -t nat -S PREROUTING; ip6tables -t mangle -S PREROUTING")
        .expect("shell in namespace");
    ensure(!rest.contains("OVN-PREROUTING"), || {
        format!("the nat jump and the IPv6 mangle jump (empty chain) must go:\n{rest}")
    })
}
