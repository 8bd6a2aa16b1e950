//! `kubectl kovn` end to end against a scripted `kubectl` ($KUBECTL): what it asks kubectl for,
//! the per-node lines and exit status of `status` and `verify`, and the files `bundle` packs.
//! Pod discovery also runs against the real kube-apiserver of docs/testbed.md (agent pods
//! created there as objects); `kubectl exec` is still scripted, since the test bed has no
//! kubelet to exec through — exec into a real agent is not exercised here.

use std::{path::Path, process::Command};

const PLUGIN: &str = env!("CARGO_BIN_EXE_kubectl-kovn");
const AGENT: &str = env!("CARGO_BIN_EXE_kube-ovn-agent");

/// A fake kubectl: two agent pods; n1's agent is ready, n2's is not; `nft` fails on every node.
/// Every invocation is appended to `calls.log`.
fn fake_kubectl(dir: &Path) -> std::path::PathBuf {
    let script = dir.join("kubectl");
    let status = |ready: bool, reason: &str| {
        serde_json::json!({
            "version": "0.1.0 (commit 0123456789ab)",
            "agent": {
                "version": "0.1.0", "commit": "0123456789ab", "node": "n", "mode": "enforce",
                "mode_from": "flag", "ready": ready,
                "not_ready": if reason.is_empty() { vec![] } else { vec![reason] },
                "last_sync_unix": 1, "source": [],
                "interfaces": [{"name": "ovn0", "role": "ovn0", "attached": true},
                               {"name": "eth1", "role": "nic", "attached": ready}]
            },
            "agent_error": null
        })
        .to_string()
    };
    let text = format!(
        r#"#!/bin/sh
echo "$*" >> '{calls}'
[ "$1" = -n ] && [ "$2" = kube-system ] || {{ echo "namespace not given" >&2; exit 9; }}
shift 2
case "$*" in
  "get pods -l app.kubernetes.io/name=kube-ovn-ebpf -o json")
    echo '{{"items":[{{"metadata":{{"name":"agent-b"}},"spec":{{"nodeName":"n2"}}}},{{"metadata":{{"name":"agent-a"}},"spec":{{"nodeName":"n1"}}}}]}}' ;;
  "exec agent-a -- kube-ovn-agent status --json") echo '{ready}' ;;
  "exec agent-b -- kube-ovn-agent status --json") echo '{unready}' ;;
  "exec agent-a -- kube-ovn-agent verify --json --window 1s --tolerance 1") echo '{agree}' ;;
  "exec agent-b -- kube-ovn-agent verify --json --window 1s --tolerance 1")
    echo '{disagree}'; echo "command terminated with exit code 2" >&2; exit 2 ;;
  "get daemonset -l app.kubernetes.io/name=kube-ovn-ebpf -o json") echo '{daemonset}' ;;
  "get services --all-namespaces -l !service.kubernetes.io/service-proxy-name,!service.kubernetes.io/headless -o json") echo '{services}' ;;
  "get nodes -o json") echo '{nodes}' ;;
  "get subnets.kubeovn.io -o json"|"get servicecidrs.networking.k8s.io -o json")
    echo "error: the server doesn't have a resource type" >&2; exit 1 ;;
  "create -f -")
    manifest=$(cat)
    name=$(echo "$manifest" | sed -n 's/.*"name":"\(kovn-probe-[^"]*\)".*/\1/p')
    echo "$manifest" > '{dir}'/"pod-$name.json"; echo "pod/$name created" ;;
  "get pod kovn-probe-"*" -o json")
    if grep -q '"nodeName":"n2"' '{dir}'/"pod-$3.json"; then
      echo '{{"status":{{"phase":"Pending","containerStatuses":[{{"state":{{"waiting":{{"reason":"ImagePullBackOff","message":"no such image"}}}}}}]}}}}'
    else echo '{{"status":{{"phase":"Succeeded"}}}}'; fi ;;
  "logs kovn-probe-"*) echo '{probe}' ;;
  exec*nft*) echo "nft: not found" >&2; exit 1 ;;
  exec*) echo "output of $*" ;;
  logs*) echo "log line" ;;
  *) echo "$*" ;;
esac
"#,
        calls = dir.join("calls.log").display(),
        dir = dir.display(),
        daemonset = serde_json::json!({"items": [{"spec": {"template": {"spec": {"containers": [
            {"name": "agent", "image": "kube-ovn-ebpf:9.9.9",
             "args": ["run", "--service-cluster-ip-range=10.96.0.0/12"]}]}}}}]}),
        services = serde_json::json!({"items": [
            {"apiVersion": "v1", "kind": "Service",
             "metadata": {"name": "kube-dns", "namespace": "kube-system"},
             "spec": {"type": "ClusterIP", "clusterIP": "10.96.0.10", "clusterIPs": ["10.96.0.10"],
                      "ports": [{"protocol": "UDP", "port": 53}, {"protocol": "TCP", "port": 53}]}},
            {"apiVersion": "v1", "kind": "Service",
             "metadata": {"name": "np-local", "namespace": "default"},
             "spec": {"type": "NodePort", "clusterIP": "10.96.0.100", "clusterIPs": ["10.96.0.100"],
                      "externalTrafficPolicy": "Local",
                      "ports": [{"protocol": "TCP", "port": 80, "nodePort": 30080}]}}]}),
        nodes = serde_json::json!({"items": (["n1", "n2"].iter().enumerate().map(|(i, n)| serde_json::json!({
            "apiVersion": "v1", "kind": "Node",
            "metadata": {"name": n, "annotations": {"ovn.kubernetes.io/ip_address": format!("100.64.0.{}", i + 2)}},
            "status": {"addresses": [{"type": "InternalIP", "address": format!("192.168.0.{}", i + 11)}]}
        })).collect::<Vec<_>>())}),
        probe = serde_json::json!({"summary": "sent 220 in 11.0s to 9 targets (tcp 150: 0 connected, 150 refused, 0 timed out, 0 failed; udp 70); covers R1a R1b R2t; cannot reach R2u R3t R3u"}),
        ready = status(true, ""),
        unready = status(false, "not attached to eth1 (role nic)"),
        agree = verify_report("agree", "agree", ""),
        disagree = verify_report(
            "disagree",
            "disagree",
            "per packet: the Kube-OVN rule matched 9, the datapath 3"
        ),
    );
    std::fs::write(&script, text).unwrap();
    Command::new("chmod")
        .arg("+x")
        .arg(&script)
        .status()
        .unwrap();
    script
}

/// `kube-ovn-agent verify --json` as recorded from an agent (one rule, R1b).
fn verify_report(verdict: &str, rule_verdict: &str, reason: &str) -> String {
    serde_json::json!({
        "window_seconds": 1.0, "mode": "shadow", "tolerance_percent": 1.0, "per_packet": true,
        "backends": [{"tool": "iptables-nft", "jumps": 1, "rules": ["R1b"], "tproxy_rules": 0}],
        "rules": [{"rule": "R1b", "kube_ovn": ["IPv4"], "ebpf": ["IPv4"], "ebpf_can_match": ["IPv4"],
                   "connections": 3, "packets": 9, "ebpf_packets": [3, 3],
                   "verdict": rule_verdict,
                   "reasons": if reason.is_empty() { vec![] } else { vec![reason] }}],
        "notes": [], "verdict": verdict
    })
    .to_string()
}

fn temp_dir() -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "kovn-plugin-{}-{:?}",
        std::process::id(),
        std::thread::current().id()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn status_prints_one_line_per_node_and_fails_when_one_is_not_ready() {
    let dir = temp_dir();
    let out = Command::new(PLUGIN)
        .arg("status")
        .env("KUBECTL", fake_kubectl(&dir))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 3, "{stdout}");
    assert!(lines[0].starts_with("NODE"), "{stdout}");
    assert!(lines[1].starts_with("n1") && lines[1].contains(" ready ") && lines[1].contains("2/2"));
    assert!(lines[2].starts_with("n2") && lines[2].contains("NOT-READY"));
    assert!(
        lines[2].contains("not attached to eth1 (role nic)"),
        "{stdout}"
    );
    assert_eq!(
        out.status.code(),
        Some(1),
        "a node not ready fails the command"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn bundle_packs_every_nodes_files_and_keeps_failures_as_error_files() {
    let dir = temp_dir();
    let tarball = dir.join("b.tar.gz");
    let out = Command::new(PLUGIN)
        .arg("bundle")
        .arg(&tarball)
        .env("KUBECTL", fake_kubectl(&dir))
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(1),
        "nft failed, so the bundle is incomplete: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let listing = Command::new("tar")
        .arg("-tzf")
        .arg(&tarball)
        .output()
        .unwrap();
    let listing = String::from_utf8_lossy(&listing.stdout);
    for file in [
        "kube-ovn-ebpf-bundle/kubectl-version.txt",
        "kube-ovn-ebpf-bundle/daemonset.yaml",
        "kube-ovn-ebpf-bundle/n1/status.json",
        "kube-ovn-ebpf-bundle/n1/dump.json",
        "kube-ovn-ebpf-bundle/n1/agent.log",
        "kube-ovn-ebpf-bundle/n1/iptables-save.txt",
        "kube-ovn-ebpf-bundle/n1/ip6tables-save.txt",
        "kube-ovn-ebpf-bundle/n1/nft-ruleset.error",
        "kube-ovn-ebpf-bundle/n2/status.json",
        "kube-ovn-ebpf-bundle/n2/version.txt",
    ] {
        assert!(
            listing.lines().any(|l| l == file),
            "{file} missing from\n{listing}"
        );
    }
    let calls = std::fs::read_to_string(dir.join("calls.log")).unwrap();
    assert!(calls.contains("exec agent-b -- iptables-save"), "{calls}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn verify_runs_every_agents_verify_and_exits_with_the_worst_verdict() {
    let dir = temp_dir();
    let out = Command::new(PLUGIN)
        .args(["verify", "--window", "1s"])
        .env("KUBECTL", fake_kubectl(&dir))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 3, "{stdout}");
    assert!(
        lines[0].starts_with("NODE") && lines[0].contains("VERDICT"),
        "{stdout}"
    );
    assert!(
        lines[1].starts_with("n1") && lines[1].contains(" agree ") && lines[1].contains("shadow"),
        "{stdout}"
    );
    assert!(
        lines[2].starts_with("n2")
            && lines[2].contains("DISAGREE")
            && lines[2].contains("R1b: per packet: the Kube-OVN rule matched 9"),
        "{stdout}"
    );
    assert_eq!(out.status.code(), Some(2), "n2 disagrees");
    // A window the agent would refuse is refused before any pod is asked.
    let calls_before = std::fs::read_to_string(dir.join("calls.log")).unwrap();
    let bad = Command::new(PLUGIN)
        .args(["verify", "--window", "5d"])
        .env("KUBECTL", fake_kubectl(&dir))
        .output()
        .unwrap();
    assert_eq!(bad.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("5d"));
    assert_eq!(
        std::fs::read_to_string(dir.join("calls.log")).unwrap(),
        calls_before
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// `verify --probe`: a probe pod per node, built for that node, created before `verify` runs
/// there; a node whose pod does not start is reported and not verified; every pod of the run
/// is deleted at the end.
#[test]
fn verify_probe_runs_a_pod_per_node_and_deletes_them() {
    let dir = temp_dir();
    let out = Command::new(PLUGIN)
        .args([
            "verify",
            "--window",
            "1s",
            "--probe",
            "--probe-start-timeout",
            "2",
        ])
        .env("KUBECTL", fake_kubectl(&dir))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(
        lines.len(),
        5,
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        lines[1].starts_with("n1") && lines[1].contains(" agree "),
        "{stdout}"
    );
    assert!(
        lines[2].starts_with("  probe: sent 220 ") && lines[2].contains("covers R1a R1b R2t"),
        "{stdout}"
    );
    assert!(
        lines[3].starts_with("n2")
            && lines[3].contains("ERROR")
            && lines[3].contains("not verified"),
        "{stdout}"
    );
    assert!(
        lines[4].starts_with("  probe: FAILED") && lines[4].contains("ImagePullBackOff"),
        "{stdout}"
    );
    assert_eq!(out.status.code(), Some(1), "n2 could not be verified");

    let calls = std::fs::read_to_string(dir.join("calls.log")).unwrap();
    // verify ran on n1 only, after its pod was created; the run's pods were deleted last.
    assert!(
        calls.contains("exec agent-a -- kube-ovn-agent verify --json --window 1s"),
        "{calls}"
    );
    assert!(!calls.contains("exec agent-b"), "{calls}");
    let last = calls.lines().last().unwrap();
    assert!(
        last.contains("delete pods -l kube-ovn-ebpf.io/probe-run=")
            && last.contains("--ignore-not-found"),
        "{calls}"
    );
    let run = last
        .split("probe-run=")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .unwrap();
    let manifest = |i: usize| -> serde_json::Value {
        let path = dir.join(format!("pod-kovn-probe-{run}-{i}.json"));
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap()
    };
    let n1 = manifest(0);
    assert_eq!(n1["spec"]["nodeName"], "n1");
    assert_eq!(n1["metadata"]["labels"]["kube-ovn-ebpf.io/probe-run"], run);
    let container = &n1["spec"]["containers"][0];
    assert_eq!(
        container["image"], "kube-ovn-ebpf:9.9.9",
        "the agent DaemonSet's image"
    );
    let command: Vec<&str> = container["command"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w.as_str().unwrap())
        .collect();
    for target in [
        "udp/10.96.0.10:53/cluster-ip",
        "tcp/192.168.0.11:30080/node-port",
        "tcp/100.64.0.2:30080/join-ip-node-port",
        "tcp/192.168.0.12:30080/other-node-node-port",
    ] {
        assert!(
            command.contains(&target),
            "{target} missing from {command:?}"
        );
    }
    // The window (1 s) plus the margin; n2's pod gets n2's own addresses.
    assert!(
        command.windows(2).any(|w| w == ["--duration", "11s"]),
        "{command:?}"
    );
    assert_eq!(manifest(1)["spec"]["nodeName"], "n2");
    assert!(
        manifest(1)["spec"]["containers"][0]["command"]
            .to_string()
            .contains("tcp/192.168.0.12:30080/node-port")
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// Ctrl-C while a probe pod is still starting: the run's pods are deleted before the plugin
/// exits (130).
#[test]
fn verify_probe_deletes_its_pods_when_interrupted() {
    let dir = temp_dir();
    let mut child = Command::new(PLUGIN)
        .args([
            "verify",
            "--window",
            "1s",
            "--probe",
            "--probe-start-timeout",
            "60",
        ])
        .env("KUBECTL", fake_kubectl(&dir))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // n2's pod never starts: wait until the plugin polls it, then interrupt.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let calls = std::fs::read_to_string(dir.join("calls.log")).unwrap_or_default();
        if calls.matches("get pod kovn-probe-").count() >= 3 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no probe pod polled:\n{calls}"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let calls_before = std::fs::read_to_string(dir.join("calls.log")).unwrap();
    assert!(!calls_before.contains("delete pods"), "{calls_before}");
    let status = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let code = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status.code();
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("the plugin did not exit after SIGINT");
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    assert_eq!(code, Some(130), "{stderr}");
    assert!(stderr.contains("deleting the probe pods"), "{stderr}");
    let calls = std::fs::read_to_string(dir.join("calls.log")).unwrap();
    let deletes: Vec<&str> = calls
        .lines()
        .filter(|l| l.contains("delete pods -l kube-ovn-ebpf.io/probe-run="))
        .collect();
    assert_eq!(deletes.len(), 1, "{calls}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn help_lists_every_subcommand_and_bad_arguments_exit_2() {
    let help = Command::new(PLUGIN).arg("--help").output().unwrap();
    assert!(help.status.success());
    let help = String::from_utf8_lossy(&help.stdout);
    for word in ["status", "verify", "bundle", "--namespace"] {
        assert!(help.contains(word), "{word} missing in\n{help}");
    }
    let wrong = Command::new(PLUGIN).arg("frobnicate").output().unwrap();
    assert_eq!(wrong.status.code(), Some(2));
}

fn in_ci() -> bool {
    ["CI", "KOVN_REQUIRE_PRIVILEGED"]
        .iter()
        .any(|v| std::env::var(v).is_ok_and(|v| !v.is_empty() && v != "false" && v != "0"))
}

/// Pod discovery against the real kube-apiserver: agent pods (bound to nodes by `nodeName`, as
/// the `DaemonSet` controller does) are found by their label in the namespace given, other pods
/// are not; only `exec` goes to a script, since no kubelet runs there.
#[test]
fn verify_and_status_find_the_agent_pods_on_a_real_api_server() {
    use kube_ovn_testkit::control_plane::{Binaries, ControlPlane, Options};
    let binaries = match Binaries::from_env() {
        Ok(binaries) => binaries,
        Err(e) => {
            assert!(!in_ci(), "a real kube-apiserver is needed in CI: {e}");
            eprintln!("\n*** no real kube-apiserver ({e}): skipped ***\n");
            return;
        }
    };
    let kubectl = binaries.kubectl.clone();
    let plane = ControlPlane::start(Options::new(binaries)).expect("control plane");
    let pod = |name: &str, node: &str, app: &str| {
        serde_json::json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": "kube-system",
                         "labels": {"app.kubernetes.io/name": app}},
            "spec": {"nodeName": node, "serviceAccountName": "kovn-plugin-test",
                     "automountServiceAccountToken": false,
                     "containers": [{"name": "agent", "image": "kube-ovn-ebpf:0.1.0"}]}
        })
    };
    // No controller manager runs there to create `default` service accounts.
    let list = serde_json::json!({"apiVersion": "v1", "kind": "List", "items": [
        {"apiVersion": "v1", "kind": "ServiceAccount",
         "metadata": {"name": "kovn-plugin-test", "namespace": "kube-system"}},
        pod("kube-ovn-ebpf-zz", "node-b", "kube-ovn-ebpf"),
        pod("kube-ovn-ebpf-yy", "node-a", "kube-ovn-ebpf"),
        pod("kube-ovn-cni-xx", "node-a", "kube-ovn-cni"),
    ]});
    plane
        .kubectl_stdin(&["apply", "-f", "-"], &list.to_string())
        .expect("create pods");
    let dir = temp_dir();
    // kubectl itself for everything but exec; exec answers as an agent would.
    let script = dir.join("kubectl");
    let text = format!(
        r#"#!/bin/sh
echo "$*" >> '{calls}'
case "$3" in
  exec) echo '{agree}' ;;
  *) exec '{kubectl}' --kubeconfig '{kubeconfig}' "$@" ;;
esac
"#,
        calls = dir.join("calls.log").display(),
        agree = verify_report("agree", "agree", ""),
        kubeconfig = plane.kubeconfig_path().display(),
        kubectl = kubectl.display(),
    );
    std::fs::write(&script, text).unwrap();
    Command::new("chmod")
        .arg("+x")
        .arg(&script)
        .status()
        .unwrap();
    let out = Command::new(PLUGIN)
        .args(["verify", "--window", "1s"])
        .env("KUBECTL", &script)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 3, "{stdout}");
    assert!(
        lines[1].starts_with("node-a") && lines[1].contains("kube-ovn-ebpf-yy"),
        "{stdout}"
    );
    assert!(
        lines[2].starts_with("node-b") && lines[2].contains("kube-ovn-ebpf-zz"),
        "{stdout}"
    );
    let calls = std::fs::read_to_string(dir.join("calls.log")).unwrap();
    assert!(!calls.contains("kube-ovn-cni-xx"), "{calls}");
    // Another namespace has no agents: a clear error, not an empty table.
    let other = Command::new(PLUGIN)
        .args(["-n", "default", "status"])
        .env("KUBECTL", &script)
        .output()
        .unwrap();
    assert_eq!(other.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&other.stderr).contains("no pods labelled"),
        "{}",
        String::from_utf8_lossy(&other.stderr)
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// `verify --probe` against the real kube-apiserver: the probe pods it creates are accepted
/// (validation, admission, the `restricted` Pod Security Standard enforced on the namespace),
/// pinned to each agent's node with limits, a deadline and the run's label; with no kubelet
/// there they never start, so each node is reported as not verified and every pod is deleted.
/// The recorded manifests also pass a server-side dry run with strict field validation, and a
/// hostNetwork variant of one is refused (the check can fail).
#[test]
fn verify_probe_pods_pass_the_real_api_server_and_restricted_pod_security() {
    use kube_ovn_testkit::control_plane::{Binaries, ControlPlane, Options};
    let binaries = match Binaries::from_env() {
        Ok(binaries) => binaries,
        Err(e) => {
            assert!(!in_ci(), "a real kube-apiserver is needed in CI: {e}");
            eprintln!("\n*** no real kube-apiserver ({e}): skipped ***\n");
            return;
        }
    };
    let kubectl = binaries.kubectl.clone();
    let plane = ControlPlane::start(Options::new(binaries)).expect("control plane");
    let ns = "kovn-probe";
    let list = probe_test_objects(ns);
    plane
        .kubectl_stdin(&["apply", "-f", "-"], &list.to_string())
        .expect("create objects");
    // From here on, only pods meeting the restricted standard are admitted in the namespace.
    plane
        .kubectl(&[
            "label",
            "namespace",
            ns,
            "pod-security.kubernetes.io/enforce=restricted",
        ])
        .expect("label namespace");
    let dir = temp_dir();
    let script = dir.join("kubectl");
    let text = format!(
        r#"#!/bin/sh
echo "$*" >> '{calls}'
case "$3" in
  exec) echo '{agree}' ;;
  create) tee '{dir}'/manifest-$$.json | exec '{kubectl}' --kubeconfig '{kubeconfig}' "$@" ;;
  *) exec '{kubectl}' --kubeconfig '{kubeconfig}' "$@" ;;
esac
"#,
        calls = dir.join("calls.log").display(),
        dir = dir.display(),
        agree = verify_report("agree", "agree", ""),
        kubeconfig = plane.kubeconfig_path().display(),
        kubectl = kubectl.display(),
    );
    std::fs::write(&script, text).unwrap();
    Command::new("chmod")
        .arg("+x")
        .arg(&script)
        .status()
        .unwrap();
    let out = Command::new(PLUGIN)
        .args(["-n", ns, "verify", "--window", "1s", "--probe"])
        .args(["--probe-start-timeout", "3"])
        .env("KUBECTL", &script)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stdout}{stderr}");
    let failed: Vec<&str> = stdout
        .lines()
        .filter(|l| l.starts_with("  probe: FAILED"))
        .collect();
    assert_eq!(failed.len(), 2, "{stdout}{stderr}");
    for line in failed {
        // Created (not refused by the server), then never started: no kubelet.
        assert!(
            line.contains("within 3s: Pending"),
            "{line}\n{stdout}{stderr}"
        );
    }
    let calls = std::fs::read_to_string(dir.join("calls.log")).unwrap();
    assert!(
        calls.contains("delete pods -l kube-ovn-ebpf.io/probe-run="),
        "{calls}"
    );

    check_held_pods(&plane, ns);
    probe_chooses_from_the_api(&plane);
    assert_eq!(check_recorded_manifests(&plane, &dir, ns), 2);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Two agent pods on two Nodes and the agent `DaemonSet`, in namespace `ns` with its `default`
/// service account (no controller manager runs in the test bed to make it).
fn probe_test_objects(ns: &str) -> serde_json::Value {
    let agent = |name: &str, node: &str| {
        serde_json::json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": ns,
                         "labels": {"app.kubernetes.io/name": "kube-ovn-ebpf"}},
            "spec": {"nodeName": node, "serviceAccountName": "default",
                     "automountServiceAccountToken": false,
                     "containers": [{"name": "agent", "image": "kube-ovn-ebpf:0.1.0"}]}
        })
    };
    let node = |name: &str, join: &str| {
        serde_json::json!({"apiVersion": "v1", "kind": "Node",
            "metadata": {"name": name, "annotations": {"ovn.kubernetes.io/ip_address": join}}})
    };
    serde_json::json!({"apiVersion": "v1", "kind": "List", "items": [
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}},
        {"apiVersion": "v1", "kind": "ServiceAccount",
         "metadata": {"name": "default", "namespace": ns}},
        {"apiVersion": "apps/v1", "kind": "DaemonSet",
         "metadata": {"name": "kube-ovn-ebpf", "namespace": ns,
                      "labels": {"app.kubernetes.io/name": "kube-ovn-ebpf"}},
         "spec": {"selector": {"matchLabels": {"app.kubernetes.io/name": "kube-ovn-ebpf"}},
                  "template": {"metadata": {"labels": {"app.kubernetes.io/name": "kube-ovn-ebpf"}},
                               "spec": {"containers": [{"name": "agent",
                                   "image": "kube-ovn-ebpf:7.7.7",
                                   "args": ["run", "--service-cluster-ip-range=10.0.0.0/24"]}]}}}},
        node("node-a", "100.64.0.2"),
        node("node-b", "100.64.0.3"),
        agent("kube-ovn-ebpf-aa", "node-a"),
        agent("kube-ovn-ebpf-bb", "node-b"),
    ]})
}

/// The probe-pod manifests recorded in `dir`: a server-side dry run with strict field
/// validation accepts each (renamed: the originals may still be terminating); a hostNetwork
/// variant is refused. Returns how many there were.
fn check_recorded_manifests(
    plane: &kube_ovn_testkit::control_plane::ControlPlane,
    dir: &Path,
    ns: &str,
) -> usize {
    let mut manifests = 0;
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if !path
            .file_name()
            .unwrap()
            .to_string_lossy()
            .starts_with("manifest-")
        {
            continue;
        }
        manifests += 1;
        let mut pod: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        pod["metadata"]["name"] =
            format!("{}-dry", pod["metadata"]["name"].as_str().unwrap()).into();
        let dry = |pod: &serde_json::Value| {
            plane.kubectl_stdin(
                &[
                    "-n",
                    ns,
                    "create",
                    "--dry-run=server",
                    "--validate=strict",
                    "-f",
                    "-",
                ],
                &pod.to_string(),
            )
        };
        dry(&pod).unwrap_or_else(|e| panic!("refused: {e}\n{pod:#}"));
        pod["spec"]["hostNetwork"] = true.into();
        let refused = dry(&pod).expect_err("a hostNetwork pod violates restricted");
        assert!(refused.to_string().contains("PodSecurity"), "{refused}");
    }
    manifests
}

/// What the server holds of the probe pods: deletion requested (a pod bound to a node waits
/// for its kubelet to confirm), and the fields as sent.
fn check_held_pods(plane: &kube_ovn_testkit::control_plane::ControlPlane, ns: &str) {
    let held: serde_json::Value = serde_json::from_str(
        &plane
            .kubectl(&[
                "-n",
                ns,
                "get",
                "pods",
                "-l",
                "app.kubernetes.io/name=kube-ovn-ebpf-probe",
                "-o",
                "json",
            ])
            .expect("list probe pods"),
    )
    .unwrap();
    let mut nodes = Vec::new();
    for pod in held["items"].as_array().unwrap() {
        assert!(
            pod["metadata"]["deletionTimestamp"].is_string(),
            "not deleted: {pod:#}"
        );
        nodes.push(pod["spec"]["nodeName"].as_str().unwrap().to_owned());
        assert!(pod["spec"]["activeDeadlineSeconds"].as_u64().unwrap() > 0);
        assert!(
            pod["metadata"]["labels"]["kube-ovn-ebpf.io/probe-run"].is_string(),
            "{pod:#}"
        );
        let container = &pod["spec"]["containers"][0];
        assert_eq!(container["image"], "kube-ovn-ebpf:7.7.7");
        assert_eq!(container["resources"]["limits"]["cpu"], "200m");
    }
    nodes.sort();
    assert!(nodes == ["node-a", "node-b"], "{nodes:?}");
}

/// `kube-ovn-agent probe --source kube` (what a probe pod with the agent's service account
/// would do) lists the cluster through the real API server: the `kubernetes` Service's
/// ClusterIP is a target, the CIDR comes from the server's ServiceCIDR, and Kube-OVN's Subnet
/// API, absent there, counts as empty.
fn probe_chooses_from_the_api(plane: &kube_ovn_testkit::control_plane::ControlPlane) {
    let cluster_ip = plane
        .kubectl(&[
            "-n",
            "default",
            "get",
            "service",
            "kubernetes",
            "-o",
            "jsonpath={.spec.clusterIP}",
        ])
        .expect("the kubernetes Service");
    let out = Command::new(AGENT)
        .args([
            "probe",
            "--dry-run",
            "--source",
            "kube",
            "--node-name",
            "node-a",
        ])
        .env("KUBECONFIG", plane.kubeconfig_path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let wanted = format!("tcp/{}:443/cluster-ip", cluster_ip.trim());
    assert!(
        stdout.lines().any(|l| l == wanted),
        "{wanted} missing:\n{stdout}"
    );
    assert!(
        stdout.lines().any(|l| l.ends_with("/outside-service-cidr")),
        "{stdout}"
    );
    let missing = Command::new(AGENT)
        .args([
            "probe",
            "--dry-run",
            "--source",
            "kube",
            "--node-name",
            "node-z",
        ])
        .env("KUBECONFIG", plane.kubeconfig_path())
        .output()
        .unwrap();
    assert!(!missing.status.success());
    assert!(
        String::from_utf8_lossy(&missing.stderr)
            .contains("\"node-z\" is not in the cluster's Nodes"),
        "{}",
        String::from_utf8_lossy(&missing.stderr)
    );
}
