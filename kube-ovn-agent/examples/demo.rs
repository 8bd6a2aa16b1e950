//! `cargo xtask demo`: a throw-away Kube-OVN node in private network namespaces, the agent
//! running against `deploy/examples/cluster.yaml` (spec §5.1), one packet of each kind injected
//! on the wire, and for each the mark netfilter saw (read back from conntrack) and the rule
//! counters that moved. Then the `bpftool` view, and everything is removed — also on Ctrl-C.

use std::{
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use kube_ovn_agent::testing::{
    missing_privilege,
    netns::{Bpffs, NetNs, send_frames, veth},
    packet::{Packet, TCP_SYN},
};

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_interrupt(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

struct Probe {
    what: &'static str,
    /// Namespace the frame is injected from: "pods" (arrives on ovn0) or "lan" (on eth0).
    from: &'static str,
    packet: Packet,
    expect: &'static str,
}

fn probes() -> Vec<Probe> {
    let tcp = Packet::tcp;
    let udp = Packet::udp;
    vec![
        Probe {
            what: "pod → ClusterIP 10.96.0.1:443/tcp",
            from: "pods",
            packet: tcp("10.16.0.5", "10.96.0.1", 443),
            expect: "R1a → 0x4000",
        },
        Probe {
            what: "pod → ClusterIP 10.96.0.10:53/udp",
            from: "pods",
            packet: udp("10.16.0.5", "10.96.0.10", 53),
            expect: "R1a → 0x4000",
        },
        Probe {
            what: "pod → ClusterIP, unlisted port 8443",
            from: "pods",
            packet: tcp("10.16.0.5", "10.96.0.1", 8443),
            expect: "none (Kube-OVN's guard rejects it)",
        },
        Probe {
            what: "custom-VPC pod 10.0.1.5 → ClusterIP",
            from: "pods",
            packet: tcp("10.0.1.5", "10.96.0.1", 443),
            expect: "none",
        },
        Probe {
            what: "external → NodePort 30080 (ETP=Local)",
            from: "lan",
            packet: tcp("203.0.113.7", "192.168.0.11", 30080),
            expect: "R2t → 0x80000",
        },
        Probe {
            what: "other node → NodePort 30080",
            from: "lan",
            packet: tcp("192.168.0.12", "192.168.0.11", 30080),
            expect: "R2t+R3t → 0x84000",
        },
        Probe {
            what: "external → NodePort 30081 (ETP=Cluster)",
            from: "lan",
            packet: tcp("203.0.113.7", "192.168.0.11", 30081),
            expect: "none",
        },
        Probe {
            what: "external → NodePort 30053/udp",
            from: "lan",
            packet: udp("203.0.113.7", "192.168.0.11", 30053),
            expect: "R2u → 0x80000",
        },
        Probe {
            what: "other node → NodePort 30080 (IPv6)",
            from: "lan",
            packet: tcp("fd00::12", "fd00::11", 30080),
            expect: "R2t+R3t → 0x84000",
        },
    ]
}

fn main() {
    if let Some(why) = missing_privilege() {
        eprintln!("the demo needs root: {why}");
        std::process::exit(1);
    }
    let args: Vec<String> = std::env::args().collect();
    let agent = args
        .iter()
        .position(|a| a == "--agent")
        .and_then(|i| args.get(i + 1))
        .map(PathBuf::from)
        .expect("--agent PATH (cargo xtask demo passes it)");
    let cluster = PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../deploy/examples/cluster.yaml"
    ));
    // SAFETY: the handler only stores to an atomic.
    unsafe {
        let handler = on_interrupt as extern "C" fn(libc::c_int);
        libc::signal(libc::SIGINT, handler as libc::sighandler_t);
        libc::signal(libc::SIGTERM, handler as libc::sighandler_t);
    }
    let outcome = std::panic::catch_unwind(|| demo(&agent, &cluster));
    if outcome.is_err() {
        eprintln!("\nthe demo failed; everything it created has been removed");
        std::process::exit(1);
    }
}

struct Demo {
    node: NetNs,
    pods: NetNs,
    lan: NetNs,
    bpffs: Bpffs,
}

impl Demo {
    fn ns(&self, name: &str) -> &NetNs {
        match name {
            "pods" => &self.pods,
            "lan" => &self.lan,
            _ => &self.node,
        }
    }
}

fn demo(agent_bin: &std::path::Path, cluster: &std::path::Path) {
    let d = Demo {
        node: NetNs::new("kovn-demo-node-").expect("create namespace"),
        pods: NetNs::new("kovn-demo-pods-").expect("create namespace"),
        lan: NetNs::new("kovn-demo-lan-").expect("create namespace"),
        bpffs: Bpffs::mount(),
    };
    veth(&d.node, "eth0", &d.lan, "eth0").expect("veth pair");
    veth(&d.node, "ovn0", &d.pods, "eth0").expect("veth pair");
    d.node
        .sh(
            "ip addr add 192.168.0.11/24 dev eth0; ip addr add fd00::11/64 dev eth0 nodad; \
         ip addr add 100.64.0.2/16 dev ovn0; ip route add 10.16.0.0/16 dev ovn0; \
         ip route add 10.0.1.0/24 dev ovn0; \
         ip link add name kube-ipvs0 type veth peer name kube-ipvs1; \
         ip addr add 10.96.0.1/32 dev kube-ipvs0; ip addr add 10.96.0.10/32 dev kube-ipvs0; \
         iptables -t mangle -A PREROUTING -j CONNMARK --save-mark; \
         ip6tables -t mangle -A PREROUTING -j CONNMARK --save-mark; \
         iptables -t raw -A OUTPUT -p tcp --tcp-flags RST RST -j DROP; \
         ip6tables -t raw -A OUTPUT -p tcp --tcp-flags RST RST -j DROP",
        )
        .expect("shell in namespace");
    println!(
        "kube-ovn-ebpf demo — node n1 of spec §5.1 in namespaces {}, {}, {}",
        d.node.name(),
        d.pods.name(),
        d.lan.name()
    );
    println!(
        "  node: eth0 192.168.0.11 fd00::11 · ovn0 100.64.0.2 · ClusterIPs local on kube-ipvs0 (kube-proxy IPVS mode)"
    );
    println!(
        "  pods: 10.16.0.5 (default VPC), 10.0.1.5 (custom VPC) behind ovn0 · lan: external clients and other nodes on eth0"
    );

    let root = d.bpffs.root();
    let args = [
        "run",
        "--node-name",
        "n1",
        "--kube-proxy-mode",
        "ipvs",
        "--metrics-addr",
        "none",
        "--log-level",
        "warn",
    ];
    println!(
        "\n$ kube-ovn-agent {} --source file:{} --bpffs-root {}",
        args.join(" "),
        cluster.display(),
        root.display()
    );
    let started = Instant::now();
    let mut agent = Agent(
        d.node
            .command(agent_bin)
            .args(args)
            .arg(format!("--source=file:{}", cluster.display()))
            .arg("--bpffs-root")
            .arg(&root)
            .stdout(Stdio::null())
            .spawn()
            .expect("start the agent"),
    );
    let status = wait_status(&d, agent_bin, &mut agent);
    println!("  ready in {} ms", started.elapsed().as_millis());
    for a in status["attachments"].as_array().into_iter().flatten() {
        println!(
            "  attached to {} ({})",
            a["ifname"].as_str().unwrap_or("?"),
            a["mode"].as_str().unwrap_or("?")
        );
    }

    run_probes(&d, agent_bin);
    if !interrupted() {
        show_bpftool_view(&d, agent_bin, &root);
    }

    agent.stop();
    let out = d
        .node
        .command(agent_bin)
        .args(["detach", "--bpffs-root"])
        .arg(&root)
        .output()
        .expect("detach");
    let detached = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.starts_with("detached"))
        .count();
    println!(
        "\ncleaned up: agent stopped, {detached} attachments detached, pins removed, namespaces {} deleted",
        [d.node.name(), d.pods.name(), d.lan.name()].join(", ")
    );
}

/// Injects each probe and prints the mark netfilter saw and the rule counters that moved.
fn run_probes(d: &Demo, agent_bin: &std::path::Path) {
    println!(
        "\n{:<42} {:<10} {:<36} {:<12} rules counted",
        "packet", "arrives on", "expected", "mark seen"
    );
    for probe in probes() {
        if interrupted() {
            break;
        }
        let before = counters(d, agent_bin);
        let frame = probe_frame(d, &probe);
        d.ns(probe.from)
            .enter(|| send_frames(&[frame], "eth0"))
            .expect("enter namespace");
        std::thread::sleep(Duration::from_millis(150));
        let after = counters(d, agent_bin);
        let moved: Vec<String> = before
            .iter()
            .zip(&after)
            .filter(|((name, b), (_, a))| a > b && name.starts_with('R'))
            .map(|((name, _), _)| name.clone())
            .collect();
        println!(
            "{:<42} {:<10} {:<36} {:<12} {}",
            probe.what,
            if probe.from == "pods" { "ovn0" } else { "eth0" },
            probe.expect,
            conntrack_mark(d, &probe.packet).map_or("(no entry)".into(), |m| format!("{m:#x}")),
            if moved.is_empty() {
                "—".into()
            } else {
                moved.join("+")
            },
        );
    }
}

fn show_bpftool_view(d: &Demo, agent_bin: &std::path::Path, root: &std::path::Path) {
    println!("\nthe bpftool view:");
    for command in [
        "bpftool prog show name kovn_ingress".to_owned(),
        "bpftool link show".to_owned(),
        format!(
            "bpftool map dump pinned {}/maps/kovn_svcport4",
            root.display()
        ),
        format!(
            "bpftool map dump pinned {}/maps/kovn_config",
            root.display()
        ),
    ] {
        println!("$ {command}");
        let output = d
            .node
            .command("sh")
            .args(["-c", &command])
            .output()
            .expect("bpftool");
        let text = String::from_utf8_lossy(&output.stdout);
        for line in text.lines().take(14) {
            println!("  {line}");
        }
    }
    println!("\n$ kube-ovn-agent status");
    let out = d
        .node
        .command(agent_bin)
        .args(["status", "--bpffs-root"])
        .arg(root)
        .output()
        .expect("status");
    print!("{}", String::from_utf8_lossy(&out.stdout));
}

/// Kills the agent when dropped (so also on panic).
struct Agent(Child);

impl Agent {
    fn stop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.0.id().to_string()])
            .status();
        let _ = self.0.wait();
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn status(d: &Demo, agent: &std::path::Path) -> Option<serde_json::Value> {
    let out = d
        .node
        .command(agent)
        .args(["status", "--json", "--bpffs-root"])
        .arg(d.bpffs.root())
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| serde_json::from_slice(&out.stdout).ok())
        .flatten()
}

fn wait_status(d: &Demo, agent_bin: &std::path::Path, agent: &mut Agent) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        assert!(!interrupted(), "interrupted");
        assert!(
            Instant::now() < deadline,
            "the agent did not attach within 30 s"
        );
        if let Ok(Some(exit)) = agent.0.try_wait() {
            panic!("the agent exited: {exit}");
        }
        if let Some(s) = status(d, agent_bin)
            && s["attachments"].as_array().is_some_and(|a| a.len() >= 2)
            && s["maps"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|m| m[0] == "kovn_svcport4" && m[1].as_u64() > Some(0))
        {
            return s;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn counters(d: &Demo, agent: &std::path::Path) -> Vec<(String, u64)> {
    status(d, agent)
        .and_then(|s| {
            s["counters"].as_array().map(|c| {
                c.iter()
                    .map(|p| {
                        (
                            p[0].as_str().unwrap_or("").to_owned(),
                            p[1].as_u64().unwrap_or(0),
                        )
                    })
                    .collect()
            })
        })
        .unwrap_or_default()
}

/// The probe as an Ethernet frame addressed to the node's interface it arrives on.
fn probe_frame(d: &Demo, probe: &Probe) -> Vec<u8> {
    let ifname = if probe.from == "pods" { "ovn0" } else { "eth0" };
    let mac = d
        .node
        .sh(&format!("cat /sys/class/net/{ifname}/address"))
        .expect("shell in namespace");
    let mac: Vec<u8> = mac
        .trim()
        .split(':')
        .map(|b| u8::from_str_radix(b, 16).expect("MAC"))
        .collect();
    let mut packet = probe.packet.clone();
    if let kube_ovn_agent::testing::packet::L4::Tcp { flags, .. } = &mut packet.l4 {
        *flags = TCP_SYN;
    }
    let mut frame = packet.frame();
    frame[..6].copy_from_slice(&mac);
    frame
}

/// The mark netfilter recorded for the probe's connection (`CONNMARK --save-mark` in mangle
/// PREROUTING copies the packet's mark to its conntrack entry; the node's TCP resets are dropped
/// so that no reply ends the entry before it is read).
fn conntrack_mark(d: &Demo, packet: &Packet) -> Option<u32> {
    let family = if packet.src.is_ipv4() { "ipv4" } else { "ipv6" };
    let (proto, dport) = match packet.l4 {
        kube_ovn_agent::testing::packet::L4::Tcp { dport, .. } => ("tcp", dport),
        kube_ovn_agent::testing::packet::L4::Udp { dport, .. } => ("udp", dport),
        _ => return None,
    };
    let text = d
        .node
        .command("conntrack")
        .args([
            "-L",
            "-f",
            family,
            "-p",
            proto,
            "--dport",
            &dport.to_string(),
        ])
        .args(["-s", &packet.src.to_string(), "-d", &packet.dst.to_string()])
        .stderr(Stdio::null())
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&text.stdout);
    text.split_whitespace()
        .find_map(|w| w.strip_prefix("mark="))
        .and_then(|m| m.parse().ok())
}
