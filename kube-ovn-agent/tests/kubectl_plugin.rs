//! `kubectl kovn` end to end against a scripted `kubectl` ($KUBECTL): what it asks kubectl for,
//! the per-node lines and exit status of `status`, and the files `bundle` packs. A real cluster
//! is not used: the test bed's API server has no kubelet, so `kubectl exec` cannot work there.

use std::{path::Path, process::Command};

const PLUGIN: &str = env!("CARGO_BIN_EXE_kubectl-kovn");

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
  exec*nft*) echo "nft: not found" >&2; exit 1 ;;
  exec*) echo "output of $*" ;;
  logs*) echo "log line" ;;
  *) echo "$*" ;;
esac
"#,
        calls = dir.join("calls.log").display(),
        ready = status(true, ""),
        unready = status(false, "not attached to eth1 (role nic)"),
    );
    std::fs::write(&script, text).unwrap();
    Command::new("chmod")
        .arg("+x")
        .arg(&script)
        .status()
        .unwrap();
    script
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
