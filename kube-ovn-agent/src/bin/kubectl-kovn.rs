//! `kubectl kovn`: the fleet view of kube-ovn-ebpf, as a kubectl plugin (install this binary on
//! `PATH` as `kubectl-kovn`). It drives `kubectl` itself — so the user's kubeconfig, context and
//! RBAC apply unchanged — and reaches every agent through the API server (`kubectl exec`):
//!
//! - `kubectl kovn status`: one line per node from each agent pod's `kube-ovn-agent status
//!   --json`; exit status 1 when an agent is not ready or does not answer.
//! - `kubectl kovn bundle [FILE]`: a support tarball with, per node, `status`, `dump`, the pod's
//!   log, `iptables-save`, `ip6tables-save` and `nft list ruleset`, plus the `DaemonSet` and
//!   `kubectl version`.
//!
//! `-n NAMESPACE` (default `kube-system`) and `$KUBECTL` (default `kubectl`) select where and how.

use std::{
    fmt::Write as _,
    path::{Path, PathBuf},
    process::{Command, ExitCode},
};

use kube_ovn_agent::metrics::AgentStatus;
use serde_json::Value;

/// The label every agent pod carries (deploy/base, the chart).
const SELECTOR: &str = "app.kubernetes.io/name=kube-ovn-ebpf";
const USAGE: &str = "usage: kubectl kovn [-n NAMESPACE] status | bundle [FILE.tar.gz]";

fn main() -> ExitCode {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let mut namespace = "kube-system".to_owned();
    if let Some(at) = args.iter().position(|a| a == "-n" || a == "--namespace") {
        if at + 1 >= args.len() {
            eprintln!("{USAGE}");
            return ExitCode::from(2);
        }
        namespace = args.remove(at + 1);
        args.remove(at);
    }
    let kubectl = Kubectl {
        program: std::env::var("KUBECTL").unwrap_or_else(|_| "kubectl".to_owned()),
        namespace,
    };
    let result = match args.iter().map(String::as_str).collect::<Vec<_>>()[..] {
        ["status"] => status(&kubectl),
        ["bundle"] => bundle(&kubectl, Path::new("kube-ovn-ebpf-bundle.tar.gz")),
        ["bundle", file] => bundle(&kubectl, Path::new(file)),
        _ => {
            eprintln!("{USAGE}");
            return ExitCode::from(2);
        }
    };
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(error) => {
            eprintln!("error: {error}");
            ExitCode::FAILURE
        }
    }
}

struct Kubectl {
    program: String,
    namespace: String,
}

impl Kubectl {
    /// Runs `kubectl -n NS ARGS`: stdout, or stderr as the error.
    fn run(&self, args: &[&str]) -> Result<Vec<u8>, String> {
        let out = Command::new(&self.program)
            .args(["-n", &self.namespace])
            .args(args)
            .output()
            .map_err(|e| format!("cannot run {}: {e}", self.program))?;
        if out.status.success() {
            Ok(out.stdout)
        } else {
            Err(format!(
                "{} {}: {}",
                self.program,
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            ))
        }
    }

    /// The agent pods as (pod, node), sorted by node.
    fn pods(&self) -> Result<Vec<(String, String)>, String> {
        let list = self.run(&["get", "pods", "-l", SELECTOR, "-o", "json"])?;
        let list: Value =
            serde_json::from_slice(&list).map_err(|e| format!("kubectl get pods: {e}"))?;
        let pods = agent_pods(&list);
        if pods.is_empty() {
            return Err(format!(
                "no pods labelled {SELECTOR} in namespace {}",
                self.namespace
            ));
        }
        Ok(pods)
    }

    fn exec(&self, pod: &str, command: &[&str]) -> Result<Vec<u8>, String> {
        let mut args = vec!["exec", pod, "--"];
        args.extend_from_slice(command);
        self.run(&args)
    }
}

/// (pod, node) of every pod in a `kubectl get pods -o json` list, sorted by node.
fn agent_pods(list: &Value) -> Vec<(String, String)> {
    let mut pods: Vec<(String, String)> = list["items"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|pod| {
            let name = pod["metadata"]["name"].as_str()?;
            let node = pod["spec"]["nodeName"].as_str().unwrap_or("(unscheduled)");
            Some((name.to_owned(), node.to_owned()))
        })
        .collect();
    pods.sort_by(|a, b| (&a.1, &a.0).cmp(&(&b.1, &b.0)));
    pods
}

/// One node's line of `kubectl kovn status`, and whether that node is healthy. `reply` is the
/// output of `kube-ovn-agent status --json` in the pod, or why it could not be had.
fn status_line(node: &str, pod: &str, reply: Result<&[u8], &str>) -> (String, bool) {
    let parsed = reply.and_then(|bytes| {
        serde_json::from_slice::<Value>(bytes).map_err(|_| "status --json is not JSON")
    });
    let status = match parsed {
        Ok(status) => status,
        Err(error) => return (format!("{node:<20} {pod:<24} ERROR     {error}"), false),
    };
    let Some(agent) = status
        .get("agent")
        .filter(|a| !a.is_null())
        .and_then(|a| serde_json::from_value::<AgentStatus>(a.clone()).ok())
    else {
        let why = status["agent_error"].as_str().unwrap_or("no agent section");
        return (format!("{node:<20} {pod:<24} NO-AGENT  {why}"), false);
    };
    let attached = agent.interfaces.iter().filter(|i| i.attached).count();
    let mut line = format!(
        "{node:<20} {pod:<24} {:<9} {:<8} {:<22} {attached}/{}",
        if agent.ready { "ready" } else { "NOT-READY" },
        agent.mode,
        format!("{} {}", agent.version, agent.commit),
        agent.interfaces.len()
    );
    if !agent.not_ready.is_empty() {
        let _ = write!(line, "  {}", agent.not_ready.join("; "));
    }
    (line, agent.ready)
}

fn status(kubectl: &Kubectl) -> Result<bool, String> {
    let pods = kubectl.pods()?;
    println!(
        "{:<20} {:<24} {:<9} {:<8} {:<22} ATTACHED",
        "NODE", "POD", "READY", "MODE", "VERSION"
    );
    let mut healthy = true;
    for (pod, node) in &pods {
        let reply = kubectl.exec(pod, &["kube-ovn-agent", "status", "--json"]);
        let (line, ok) = status_line(node, pod, reply.as_deref().map_err(String::as_str));
        println!("{line}");
        healthy &= ok;
    }
    Ok(healthy)
}

/// What the bundle collects from each agent pod: (file name, command in the pod).
const PER_POD: &[(&str, &[&str])] = &[
    ("status.json", &["kube-ovn-agent", "status", "--json"]),
    ("dump.json", &["kube-ovn-agent", "dump", "--json"]),
    ("version.txt", &["kube-ovn-agent", "--version"]),
    ("iptables-save.txt", &["iptables-save"]),
    ("ip6tables-save.txt", &["ip6tables-save"]),
    ("nft-ruleset.txt", &["nft", "list", "ruleset"]),
];

fn bundle(kubectl: &Kubectl, file: &Path) -> Result<bool, String> {
    let pods = kubectl.pods()?;
    let dir = std::env::temp_dir().join(format!("kube-ovn-ebpf-bundle-{}", std::process::id()));
    let top = dir.join("kube-ovn-ebpf-bundle");
    let result = collect(kubectl, &pods, &top).and_then(|complete| {
        let out = Command::new("tar")
            .arg("-czf")
            .arg(absolute(file))
            .arg("-C")
            .arg(&dir)
            .arg("kube-ovn-ebpf-bundle")
            .output()
            .map_err(|e| format!("cannot run tar: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "tar: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        Ok(complete)
    });
    let _ = std::fs::remove_dir_all(&dir);
    let complete = result?;
    println!(
        "{} ({} nodes{})",
        file.display(),
        pods.len(),
        if complete {
            ""
        } else {
            "; some commands failed: see the .error files"
        }
    );
    Ok(complete)
}

fn absolute(file: &Path) -> PathBuf {
    std::env::current_dir().map_or_else(|_| file.to_owned(), |cwd| cwd.join(file))
}

/// Writes every file of the bundle under `top`; false when a command failed (its error is kept
/// as `NAME.error` and the rest is still collected).
fn collect(kubectl: &Kubectl, pods: &[(String, String)], top: &Path) -> Result<bool, String> {
    let write = |path: PathBuf, bytes: &[u8]| {
        std::fs::write(&path, bytes).map_err(|e| format!("writing {}: {e}", path.display()))
    };
    std::fs::create_dir_all(top).map_err(|e| format!("creating {}: {e}", top.display()))?;
    let mut complete = true;
    let mut keep = |path: PathBuf, result: Result<Vec<u8>, String>| -> Result<(), String> {
        match result {
            Ok(bytes) => write(path, &bytes),
            Err(error) => {
                complete = false;
                write(path.with_extension("error"), error.as_bytes())
            }
        }
    };
    keep(top.join("kubectl-version.txt"), kubectl.run(&["version"]))?;
    keep(
        top.join("daemonset.yaml"),
        kubectl.run(&["get", "daemonset", "-l", SELECTOR, "-o", "yaml"]),
    )?;
    for (pod, node) in pods {
        let dir = top.join(node);
        std::fs::create_dir_all(&dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
        keep(dir.join("pod.txt"), Ok(format!("{pod}\n").into_bytes()))?;
        keep(
            dir.join("agent.log"),
            kubectl.run(&["logs", pod, "--timestamps", "--tail=20000"]),
        )?;
        for (name, command) in PER_POD {
            keep(dir.join(name), kubectl.exec(pod, command))?;
        }
    }
    Ok(complete)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pods_come_sorted_by_node_with_their_names() {
        let list = serde_json::json!({"items": [
            {"metadata": {"name": "kube-ovn-ebpf-b"}, "spec": {"nodeName": "n2"}},
            {"metadata": {"name": "kube-ovn-ebpf-a"}, "spec": {"nodeName": "n1"}},
            {"metadata": {"name": "kube-ovn-ebpf-c"}, "spec": {}},
        ]});
        assert_eq!(
            agent_pods(&list),
            [
                ("kube-ovn-ebpf-c".to_owned(), "(unscheduled)".to_owned()),
                ("kube-ovn-ebpf-a".to_owned(), "n1".to_owned()),
                ("kube-ovn-ebpf-b".to_owned(), "n2".to_owned()),
            ]
        );
        assert!(agent_pods(&serde_json::json!({})).is_empty());
    }

    fn reply(agent: &AgentStatus) -> Vec<u8> {
        serde_json::to_vec(&serde_json::json!({"version": "x", "agent": agent, "kernel": "6.1"}))
            .unwrap()
    }

    #[test]
    fn a_status_line_per_node_says_ready_mode_version_and_attachments() {
        let mut agent = AgentStatus {
            version: "0.1.0".into(),
            commit: "0123456789ab".into(),
            node: "n1".into(),
            mode: "shadow".into(),
            ready: true,
            interfaces: vec![
                kube_ovn_agent::metrics::InterfaceState {
                    name: "ovn0".into(),
                    role: "ovn0".into(),
                    attached: true,
                },
                kube_ovn_agent::metrics::InterfaceState {
                    name: "eth1".into(),
                    role: "nic".into(),
                    attached: false,
                },
            ],
            ..AgentStatus::default()
        };
        let (line, ok) = status_line("n1", "pod-a", Ok(&reply(&agent)));
        assert!(ok);
        for needle in [
            "n1",
            "pod-a",
            "ready",
            "shadow",
            "0.1.0 0123456789ab",
            "1/2",
        ] {
            assert!(line.contains(needle), "{needle:?} missing in {line:?}");
        }
        agent.ready = false;
        agent.not_ready = vec!["not attached to eth1 (role nic)".into()];
        let (line, ok) = status_line("n1", "pod-a", Ok(&reply(&agent)));
        assert!(!ok);
        assert!(line.contains("NOT-READY") && line.contains("not attached to eth1"));
        let unreachable = serde_json::to_vec(&serde_json::json!({
            "agent": null, "agent_error": "no agent answered on 10.0.0.1:10669"
        }))
        .unwrap();
        let (line, ok) = status_line("n2", "pod-b", Ok(&unreachable));
        assert!(!ok && line.contains("NO-AGENT") && line.contains("no agent answered"));
        let (line, ok) = status_line("n3", "pod-c", Err("kubectl exec: container not found"));
        assert!(!ok && line.contains("ERROR") && line.contains("container not found"));
    }
}
