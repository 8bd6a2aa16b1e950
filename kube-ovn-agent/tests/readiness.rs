//! Readiness and the per-node mode of a real agent in a private network namespace (root; a
//! skip is a failure under `KOVN_REQUIRE_PRIVILEGED`). `/readyz` is driven both ways: 503 while
//! no interface has a role (the cluster applied, nothing to mark), 200 once the node's NIC comes
//! and the program is attached to it, 503 again when `detach --force` removes the pins. The
//! node's `kube-ovn-ebpf.io/mode` label switches the pinned mode and `/status` says so.
//! `preflight` runs under the `DaemonSet`'s capability set (`setpriv`), on and off a bpffs.

use std::time::{Duration, Instant};

use kube_ovn_agent::{
    metrics::{AgentStatus, fetch_status},
    testing::{
        agent::Node,
        netns::{TempPath, example_cluster},
        scaled,
    },
};
use kube_ovn_testkit::agent::{AgentProcess, CLI_TIMEOUT, daemonset_caps};
use libtest_mimic::{Failed, Trial};

const AGENT: &str = env!("CARGO_BIN_EXE_kube-ovn-agent");
const ADDR: &str = "127.0.0.1:10669";

fn main() {
    let trials = vec![
        Trial::test(
            "readyz_follows_listing_attachment_and_pins_and_the_node_label_sets_the_mode",
            readiness_both_ways,
        ),
        Trial::test(
            "detach_if_present_succeeds_on_a_node_without_our_pins",
            detach_if_present,
        ),
        Trial::test(
            "preflight_passes_with_the_daemonsets_capabilities_on_a_bpffs_and_names_what_is_missing",
            preflight,
        ),
    ];
    kube_ovn_testkit::privileged::main("readiness tests", trials);
}

/// The agent process, killed on drop.
struct Running {
    process: AgentProcess,
    log: TempPath,
}

impl Running {
    fn log(&self) -> String {
        std::fs::read_to_string(&*self.log).unwrap_or_default()
    }
}

/// `GET path` inside the node namespace: (status code, body), or `None` when nothing answers.
fn get(node: &Node, path: &str) -> Option<(u16, String)> {
    node.ns
        .enter(|| kube_ovn_agent::testing::http::get(ADDR.parse().expect("address"), path))
        .expect("enter namespace")
}

fn agent_status(node: &Node) -> Option<AgentStatus> {
    node.ns
        .enter(|| fetch_status(ADDR.parse().expect("address"), Duration::from_secs(2)).ok())
        .expect("enter namespace")
}

/// Polls `check` until it returns `Some`, or fails with `what` and the agent's log.
fn wait<T>(
    agent: &mut Running,
    what: &str,
    mut check: impl FnMut() -> Option<T>,
) -> Result<T, Failed> {
    let deadline = Instant::now() + scaled(Duration::from_secs(30));
    loop {
        if let Some(value) = check() {
            return Ok(value);
        }
        if let Ok(Some(status)) = agent.process.try_wait() {
            return Err(format!(
                "agent exited with {status} waiting for {what}\n{}",
                agent.log()
            )
            .into());
        }
        if Instant::now() > deadline {
            return Err(format!("timed out waiting for {what}\n{}", agent.log()).into());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Writes `text` to `path` through a rename, as docs/operations.md asks of cluster-file writers.
fn write_atomically(path: &TempPath, text: &str) {
    let staging = path.with_extension("new");
    std::fs::write(&staging, text).expect("write the cluster file");
    std::fs::rename(&staging, &**path).expect("rename the cluster file");
}

fn cli(node: &Node, args: &[&str]) -> std::process::Output {
    node.cli(AGENT)
        .output(args, CLI_TIMEOUT)
        .unwrap_or_else(|e| panic!("{e}"))
}

/// `/metrics` of a ready agent in shadow mode attached to eth0.
fn metrics_say_ready_and_shadow(node: &Node) -> Result<(), Failed> {
    let metrics = get(node, "/metrics").ok_or("no /metrics")?.1;
    for needle in [
        "kovn_ready 1",
        "kovn_mode{mode=\"shadow\"} 1",
        "kovn_interface_attached{interface=\"eth0\",role=\"nic\"} 1",
        "kovn_build_info{version=",
        "kovn_source_state{kind=\"Service\",state=\"watching\"} 1",
    ] {
        if !metrics.contains(needle) {
            return Err(format!("/metrics lacks {needle:?}:\n{metrics}").into());
        }
    }
    Ok(())
}

fn readiness_both_ways() -> Result<(), Failed> {
    let node = Node::new("kovn-ready-");
    let example = std::fs::read_to_string(example_cluster()).expect("example cluster");
    let cluster = TempPath::new("kovn-ready-cluster-", "yaml");
    write_atomically(&cluster, &example);
    let log = TempPath::new("kovn-ready-agent-", "log");
    let args = [
        "--node-name",
        "n1",
        "--kube-proxy-mode",
        "ipvs",
        "--metrics-addr",
        ADDR,
        &format!("--source=file:{}", cluster.display()),
    ]
    .map(str::to_owned);
    let process = node
        .cli(AGENT)
        .spawn(&args, &log)
        .unwrap_or_else(|e| panic!("{e}"));
    let mut agent = Running { process, log };

    // 1. The cluster is applied, but only `lo` (no role) exists: nothing would be marked.
    let (code, body) = wait(&mut agent, "a 503 once the view is applied", || {
        get(&node, "/readyz").filter(|(_, body)| body.contains("no interface has a role"))
    })?;
    if code != 503 || body.contains("first complete list") {
        return Err(format!("/readyz {code} with no interface: {body}").into());
    }

    // 2. eth0 comes with n1's InternalIP (the NodePort role; its veth peer has no address: a
    // pod's host end, no role), and n1 is labelled shadow: ready once eth0 is attached.
    node.ns
        .sh(
            "ip link add eth0 type veth peer name eth0p && ip addr add 192.168.0.11/16 dev eth0 \
         && ip link set eth0 up && ip link set eth0p up",
        )
        .expect("shell in namespace");
    let labelled = example.replacen(
        "    kubernetes.io/hostname: n1\n",
        "    kubernetes.io/hostname: n1\n    kube-ovn-ebpf.io/mode: shadow\n",
        1,
    );
    if labelled == example {
        return Err("the example cluster's n1 labels moved; update this test".into());
    }
    write_atomically(&cluster, &labelled);
    wait(&mut agent, "/readyz 200", || {
        get(&node, "/readyz").filter(|(code, _)| *code == 200)
    })?;
    // The file source applies a new version after two identical polls: readiness may come
    // first, on the unlabelled version.
    let status = wait(&mut agent, "shadow from the node label", || {
        agent_status(&node).filter(|s| s.mode_from == "node label")
    })?;
    let eth0 = status.interfaces.iter().find(|i| i.name == "eth0");
    if !status.ready
        || !status.not_ready.is_empty()
        || !eth0.is_some_and(|i| i.attached && i.role.contains("nic"))
        || status.interfaces.iter().any(|i| i.name == "eth0p")
    {
        return Err(format!("ready, but /status says {status:?}").into());
    }
    if (status.mode.as_str(), status.mode_from.as_str()) != ("shadow", "node label") {
        return Err(format!("the node label did not set the mode: {status:?}").into());
    }
    let pinned = node.status(AGENT).ok_or("status --json failed")?;
    if pinned.mode != "shadow" {
        return Err(format!("the pinned config is not shadow: {}", pinned.mode).into());
    }
    metrics_say_ready_and_shadow(&node)?;
    // `status` (text) reads the same through --agent.
    let text = cli(&node, &["status", "--agent", ADDR]);
    let text = String::from_utf8_lossy(&text.stdout).into_owned();
    if !text.contains("agent         ready on node n1") || !text.contains("(from node label)") {
        return Err(format!("status text:\n{text}").into());
    }

    // 3. The label goes: back to --mode (enforce), still ready.
    write_atomically(&cluster, &example);
    wait(&mut agent, "enforce from the flag", || {
        agent_status(&node).filter(|s| s.mode == "enforce" && s.mode_from == "flag" && s.ready)
    })?;
    wait(&mut agent, "the pinned config back to enforce", || {
        node.status(AGENT).filter(|s| s.mode == "enforce")
    })?;

    // 4. detach --force removes the pins: not ready again, with the reason.
    let forced = cli(&node, &["detach", "--force"]);
    if !forced.status.success() {
        return Err(format!(
            "detach --force: {}",
            String::from_utf8_lossy(&forced.stderr)
        )
        .into());
    }
    let (_, body) = wait(&mut agent, "/readyz 503 after detach --force", || {
        get(&node, "/readyz").filter(|(code, _)| *code == 503)
    })?;
    if !body.contains("pins were removed") {
        return Err(format!("/readyz 503 body: {body}").into());
    }
    Ok(())
}

/// `preflight` under `setpriv` with `caps` as the bounding set (so the effective set of root
/// after exec), on `root`: (exit code, stdout).
fn preflight_with(caps: &str, root: &std::path::Path) -> (Option<i32>, String) {
    let out = std::process::Command::new("setpriv")
        .arg(format!("--bounding-set=-all,{caps}"))
        .args([AGENT, "preflight", "--bpffs-root"])
        .arg(root)
        .output()
        .expect("run setpriv (util-linux)");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

fn preflight() -> Result<(), Failed> {
    let bpffs = kube_ovn_agent::testing::netns::Bpffs::mount();
    // The DaemonSet's set (deploy/base/daemonset.yaml), plus SYS_RESOURCE where the kernel-5.10
    // component adds it.
    let daemonset = daemonset_caps();
    let (code, out) = preflight_with(&daemonset, &bpffs.root());
    if code != Some(0) || out.contains("FAIL") {
        return Err(format!("preflight with the DaemonSet's capabilities: {code:?}\n{out}").into());
    }
    let (code, out) = preflight_with("+net_admin,+perfmon,+net_raw", &bpffs.root());
    if code != Some(1) || !out.contains("missing CAP_BPF") {
        return Err(format!("preflight without CAP_BPF: {code:?}\n{out}").into());
    }
    let not_bpffs = TempPath::new("kovn-preflight-", "d");
    let (code, out) = preflight_with(&daemonset, &not_bpffs);
    if code != Some(1) || !out.contains("is not on a bpffs") {
        return Err(format!("preflight off a bpffs: {code:?}\n{out}").into());
    }
    Ok(())
}

/// What deploy/uninstall's init container runs, on a node the agent never ran on: success with
/// `--if-present`, exit status 1 without.
fn detach_if_present() -> Result<(), Failed> {
    let bpffs = kube_ovn_agent::testing::netns::Bpffs::mount();
    let run = |extra: &[&str]| {
        let out = std::process::Command::new(AGENT)
            .arg("detach")
            .args(extra)
            .arg("--bpffs-root")
            .arg(bpffs.root())
            .output()
            .expect("run detach");
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    };
    let (code, out) = run(&["--if-present"]);
    if code != Some(0) || !out.contains("nothing of ours") {
        return Err(format!("detach --if-present: {code:?} {out}").into());
    }
    let (code, _) = run(&[]);
    if code != Some(1) {
        return Err(format!("detach without --if-present: {code:?}, want 1").into());
    }
    Ok(())
}
