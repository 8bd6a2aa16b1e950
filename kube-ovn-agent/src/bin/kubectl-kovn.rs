//! `kubectl kovn`: the fleet view of kube-ovn-ebpf, as a kubectl plugin (install this binary on
//! `PATH` as `kubectl-kovn`). It drives `kubectl` itself — so the user's kubeconfig, context and
//! RBAC apply unchanged — and reaches every agent through the API server (`kubectl exec`):
//!
//! - `kubectl kovn status`: one line per node from each agent pod's `kube-ovn-agent status
//!   --json`; exit status 1 when an agent is not ready or does not answer.
//! - `kubectl kovn verify`: one line per node from each agent pod's `kube-ovn-agent verify
//!   --json`, all nodes counting over the same window at once.
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

use clap::{Parser, Subcommand};
use kube_ovn_agent::metrics::AgentStatus;
use serde_json::Value;

/// The label every agent pod carries (deploy/base, the chart).
const SELECTOR: &str = "app.kubernetes.io/name=kube-ovn-ebpf";

#[derive(Parser, Debug)]
#[command(
    name = "kubectl-kovn",
    bin_name = "kubectl kovn",
    version = kube_ovn_agent::cli::LONG_VERSION,
    about = "kube-ovn-ebpf across the cluster: one line per node, through the API server \
             (kubectl exec into each agent pod; $KUBECTL names the kubectl to run)"
)]
struct Cli {
    /// Namespace of the agent pods (those labelled app.kubernetes.io/name=kube-ovn-ebpf).
    #[arg(short = 'n', long, global = true, default_value = "kube-system")]
    namespace: String,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand, Debug, PartialEq, Eq)]
enum Cmd {
    /// Each agent's readiness, mode, version and attachments. Exit status 1 when an agent is not
    /// ready or does not answer.
    Status,
    /// `kube-ovn-agent verify` in every agent pod at once (the same window everywhere; traffic
    /// must flow meanwhile: verify counts, it sends nothing). Exit status: 0 every node agrees,
    /// 2 a node disagrees, 1 a node could not be verified, 3 otherwise inconclusive.
    Verify(VerifyArgs),
    /// A support tarball: per node status, dump, log, iptables-save, ip6tables-save and nft
    /// ruleset; the `DaemonSet` and kubectl version. Exit status 1 when something could not be
    /// collected (kept as NAME.error in the tarball).
    Bundle {
        /// Where to write the tarball.
        #[arg(default_value = "kube-ovn-ebpf-bundle.tar.gz")]
        file: PathBuf,
    },
}

/// The agent's `verify` flags, passed on unchanged (and checked by the agent's own parser first).
#[derive(clap::Args, Debug, PartialEq, Eq)]
struct VerifyArgs {
    /// How long each agent counts: `30s`, `5m`, …
    #[arg(long, default_value = "30s")]
    window: String,
    /// Allowed difference in percent of the datapath's count.
    #[arg(long, default_value = "1", value_name = "PERCENT")]
    tolerance: String,
    /// Compare with Kube-OVN's new-connection counters only (iptables untouched).
    #[arg(long)]
    connections_only: bool,
}

impl VerifyArgs {
    /// The command run in each agent pod.
    fn command(&self) -> Vec<String> {
        let mut command: Vec<String> = [
            "kube-ovn-agent",
            "verify",
            "--json",
            "--window",
            &self.window,
            "--tolerance",
            &self.tolerance,
        ]
        .map(str::to_owned)
        .to_vec();
        if self.connections_only {
            command.push("--connections-only".to_owned());
        }
        command
    }

    /// The agent's parser on the same arguments, so a bad window fails here, not on every node.
    fn check(&self) -> Result<(), String> {
        kube_ovn_agent::cli::Cli::try_parse_from(self.command())
            .map(|_| ())
            .map_err(|e| e.to_string().trim().to_owned())
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let kubectl = Kubectl {
        program: std::env::var("KUBECTL").unwrap_or_else(|_| "kubectl".to_owned()),
        namespace: cli.namespace,
    };
    let result = match &cli.command {
        Cmd::Status => status(&kubectl).map(|ok| u8::from(!ok)),
        Cmd::Verify(args) => verify(&kubectl, args),
        Cmd::Bundle { file } => bundle(&kubectl, file).map(|ok| u8::from(!ok)),
    };
    match result {
        Ok(code) => ExitCode::from(code),
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

    /// `kubectl exec` whose stdout counts whatever the exit status (kubectl exits with the
    /// remote command's status, and `verify` says disagree or inconclusive with 2 and 3):
    /// stdout when it is non-empty, else stderr as the error.
    fn exec_any_status(&self, pod: &str, command: &[String]) -> Result<Vec<u8>, String> {
        let out = Command::new(&self.program)
            .args(["-n", &self.namespace, "exec", pod, "--"])
            .args(command)
            .output()
            .map_err(|e| format!("cannot run {}: {e}", self.program))?;
        if out.stdout.iter().any(|b| !b.is_ascii_whitespace()) {
            Ok(out.stdout)
        } else {
            Err(format!(
                "kubectl exec: {} ({})",
                String::from_utf8_lossy(&out.stderr).trim(),
                out.status
            ))
        }
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

/// How one node's `verify` ended, in the order that decides the plugin's exit status.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum NodeVerdict {
    Agree,
    Inconclusive,
    Error,
    Disagree,
}

impl NodeVerdict {
    /// The exit status when this is the worst node's verdict (as the agent's `verify`, plus 1
    /// for a node that could not be verified).
    fn exit_code(self) -> u8 {
        match self {
            Self::Agree => 0,
            Self::Disagree => 2,
            Self::Error => 1,
            Self::Inconclusive => 3,
        }
    }
}

/// One node's line of `kubectl kovn verify`. `reply` is the output of `kube-ovn-agent verify
/// --json` in the pod, or why it could not be had.
fn verify_line(node: &str, pod: &str, reply: Result<&[u8], &str>) -> (String, NodeVerdict) {
    let report = match reply.and_then(|bytes| {
        serde_json::from_slice::<Value>(bytes).map_err(|_| "verify --json is not JSON")
    }) {
        Ok(report) => report,
        Err(error) => {
            return (
                format!("{node:<20} {pod:<24} ERROR        {error}"),
                NodeVerdict::Error,
            );
        }
    };
    let verdict = match report["verdict"].as_str() {
        Some("agree") => NodeVerdict::Agree,
        Some("disagree") => NodeVerdict::Disagree,
        Some("inconclusive") => NodeVerdict::Inconclusive,
        _ => {
            return (
                format!("{node:<20} {pod:<24} ERROR        verify --json has no verdict"),
                NodeVerdict::Error,
            );
        }
    };
    let rules = report["rules"].as_array().map_or(&[][..], Vec::as_slice);
    let named = |wanted: &str| {
        rules
            .iter()
            .filter(|r| r["verdict"] == wanted)
            .filter_map(|r| r["rule"].as_str())
            .collect::<Vec<_>>()
    };
    let (agree, disagree, idle) = (named("agree"), named("disagree"), named("idle"));
    let mut line = format!(
        "{node:<20} {pod:<24} {:<12} {:<8} agree {}, disagree {}, idle {}",
        match verdict {
            NodeVerdict::Agree => "agree",
            NodeVerdict::Disagree => "DISAGREE",
            NodeVerdict::Inconclusive => "INCONCLUSIVE",
            NodeVerdict::Error => unreachable!("returned above"),
        },
        report["mode"].as_str().unwrap_or("?"),
        agree.len(),
        disagree.len(),
        idle.len()
    );
    // The first reason is enough to say where to look; `verify` on the node has them all.
    let why = rules
        .iter()
        .find(|r| r["verdict"] == "disagree")
        .and_then(|r| {
            Some(format!(
                "{}: {}",
                r["rule"].as_str()?,
                r["reasons"][0].as_str()?
            ))
        })
        .or_else(|| {
            (verdict == NodeVerdict::Inconclusive)
                .then(|| report["notes"][0].as_str().map(str::to_owned))
                .flatten()
        });
    if let Some(why) = why {
        let _ = write!(line, "  {why}");
    }
    (line, verdict)
}

fn verify(kubectl: &Kubectl, args: &VerifyArgs) -> Result<u8, String> {
    args.check()?;
    let pods = kubectl.pods()?;
    let command = args.command();
    // Every node counts over the same window: one exec per pod, all at once.
    let replies: Vec<Result<Vec<u8>, String>> = std::thread::scope(|scope| {
        let handles: Vec<_> = pods
            .iter()
            .map(|(pod, _)| scope.spawn(|| kubectl.exec_any_status(pod, &command)))
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err("exec thread panicked".into()))
            })
            .collect()
    });
    println!(
        "{:<20} {:<24} {:<12} {:<8} RULES",
        "NODE", "POD", "VERDICT", "MODE"
    );
    let mut worst = NodeVerdict::Agree;
    for ((pod, node), reply) in pods.iter().zip(&replies) {
        let (line, verdict) = verify_line(node, pod, reply.as_deref().map_err(String::as_str));
        println!("{line}");
        worst = worst.max(verdict);
    }
    Ok(worst.exit_code())
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

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("kubectl-kovn").chain(args.iter().copied()))
    }

    #[test]
    fn arguments_parse_as_documented() {
        let cli = parse(&["status"]).unwrap();
        assert_eq!(
            (cli.namespace.as_str(), cli.command),
            ("kube-system", Cmd::Status)
        );
        // -n before or after the subcommand, as kubectl's own.
        for args in [
            &["-n", "ovn", "status"][..],
            &["status", "--namespace", "ovn"],
        ] {
            assert_eq!(parse(args).unwrap().namespace, "ovn", "{args:?}");
        }
        assert_eq!(
            parse(&["bundle"]).unwrap().command,
            Cmd::Bundle {
                file: "kube-ovn-ebpf-bundle.tar.gz".into()
            }
        );
        let Cmd::Verify(verify) = parse(&["verify", "--window", "2m", "--connections-only"])
            .unwrap()
            .command
        else {
            panic!("not verify")
        };
        assert_eq!(
            verify.command(),
            [
                "kube-ovn-agent",
                "verify",
                "--json",
                "--window",
                "2m",
                "--tolerance",
                "1",
                "--connections-only"
            ]
        );
        assert!(verify.check().is_ok());
        let Cmd::Verify(bad) = parse(&["verify", "--window", "5d"]).unwrap().command else {
            panic!("not verify")
        };
        assert!(
            bad.check().unwrap_err().contains("5d"),
            "the agent's parser says why"
        );
        for wrong in [&["frobnicate"][..], &[], &["status", "extra"], &["-n"]] {
            assert_eq!(parse(wrong).unwrap_err().exit_code(), 2, "{wrong:?}");
        }
    }

    /// `verify --json` as the agent prints it: its own report type, serialised.
    fn recorded_verify(verdict: &str, rules: &[(&'static str, &str, &[&str])]) -> Vec<u8> {
        use kube_ovn_agent::ops::verify::{Observation, Report, RuleReport, RuleVerdict, Verdict};
        let rule_verdict = |v: &str| match v {
            "agree" => RuleVerdict::Agree,
            "disagree" => RuleVerdict::Disagree,
            _ => RuleVerdict::Idle,
        };
        let report = Report {
            window_seconds: 30.0,
            mode: "shadow",
            tolerance_percent: 1.0,
            per_packet: true,
            backends: vec![],
            rules: rules
                .iter()
                .map(|(rule, v, reasons)| RuleReport {
                    rule,
                    observation: Observation::default(),
                    verdict: rule_verdict(v),
                    reasons: reasons.iter().map(|r| (*r).to_owned()).collect(),
                })
                .collect(),
            notes: vec!["no traffic hit any rule".into()],
            verdict: match verdict {
                "agree" => Verdict::Agree,
                "disagree" => Verdict::Disagree,
                _ => Verdict::Inconclusive,
            },
        };
        serde_json::to_vec_pretty(&report).unwrap()
    }

    #[test]
    fn a_verify_line_per_node_says_the_verdict_counts_and_the_first_reason() {
        let agree = recorded_verify("agree", &[("R1a", "agree", &[]), ("R2t", "idle", &[])]);
        let (line, verdict) = verify_line("n1", "pod-a", Ok(&agree));
        assert_eq!(verdict, NodeVerdict::Agree);
        for needle in [
            "n1",
            "pod-a",
            "agree",
            "shadow",
            "agree 1, disagree 0, idle 1",
        ] {
            assert!(line.contains(needle), "{needle:?} missing in {line:?}");
        }
        let disagree = recorded_verify(
            "disagree",
            &[
                ("R1a", "agree", &[]),
                (
                    "R1b",
                    "disagree",
                    &["per packet: Kube-OVN's rule matched 10, the datapath 4"],
                ),
            ],
        );
        let (line, verdict) = verify_line("n2", "pod-b", Ok(&disagree));
        assert_eq!(verdict, NodeVerdict::Disagree);
        assert!(
            line.contains("DISAGREE") && line.contains("R1b: per packet"),
            "{line}"
        );
        let idle = recorded_verify("inconclusive", &[("R1a", "idle", &[])]);
        let (line, verdict) = verify_line("n3", "pod-c", Ok(&idle));
        assert_eq!(verdict, NodeVerdict::Inconclusive);
        assert!(
            line.contains("INCONCLUSIVE") && line.contains("no traffic"),
            "{line}"
        );
        let (line, verdict) = verify_line("n4", "pod-d", Err("kubectl exec: pod not found"));
        assert_eq!(verdict, NodeVerdict::Error);
        assert!(line.contains("ERROR") && line.contains("pod not found"));
        let (_, verdict) = verify_line("n4", "pod-d", Ok(b"error: no pins"));
        assert_eq!(verdict, NodeVerdict::Error);
        // The worst node decides the exit status: disagree over error over inconclusive.
        let worst = |v: &[NodeVerdict]| v.iter().copied().max().unwrap().exit_code();
        assert_eq!(worst(&[NodeVerdict::Agree, NodeVerdict::Agree]), 0);
        assert_eq!(worst(&[NodeVerdict::Agree, NodeVerdict::Inconclusive]), 3);
        assert_eq!(worst(&[NodeVerdict::Inconclusive, NodeVerdict::Error]), 1);
        assert_eq!(worst(&[NodeVerdict::Error, NodeVerdict::Disagree]), 2);
    }
}
