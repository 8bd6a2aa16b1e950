//! `kubectl kovn`: the fleet view of kube-ovn-ebpf, as a kubectl plugin (install this binary on
//! `PATH` as `kubectl-kovn`). It drives `kubectl` itself — so the user's kubeconfig, context and
//! RBAC apply unchanged — and reaches every agent through the API server (`kubectl exec`):
//!
//! - `kubectl kovn status`: one line per node from each agent pod's `kube-ovn-agent status
//!   --json`; exit status 1 when an agent is not ready or does not answer.
//! - `kubectl kovn verify`: one line per node from each agent pod's `kube-ovn-agent verify
//!   --json`, all nodes counting over the same window at once. With `--probe`, a short-lived
//!   probe pod per node (`kube-ovn-agent probe` with targets chosen here for that node) sends
//!   the traffic, each node's window starting when its probe runs; the pods are deleted
//!   afterwards, also on failure or Ctrl-C.
//! - `kubectl kovn bundle [FILE]`: a support tarball with, per node, `status`, `dump`, the pod's
//!   log, `iptables-save`, `ip6tables-save` and `nft list ruleset`, plus the `DaemonSet` and
//!   `kubectl version`.
//!
//! `-n NAMESPACE` (default `kube-system`) and `$KUBECTL` (default `kubectl`) select where and how.

use std::{
    fmt::Write as _,
    path::{Path, PathBuf},
    process::{Command, ExitCode},
    sync::Arc,
    time::{Duration, Instant},
};

use clap::{Parser, Subcommand};
use kube_ovn_agent::{
    cluster::{KUBE_PROXY_SERVICE_SELECTOR, Snapshot},
    host::exec,
    metrics::AgentStatus,
    ops::probe::{self, Target},
};
use serde_json::Value;

/// The label every agent pod carries (deploy/base, the chart).
const SELECTOR: &str = "app.kubernetes.io/name=kube-ovn-ebpf";
/// The label every probe pod carries (not the agents': `SELECTOR` must not find them).
const PROBE_APP: &str = "kube-ovn-ebpf-probe";
/// The label naming one `verify --probe` run's pods, which cleanup deletes by.
const PROBE_RUN_LABEL: &str = "kube-ovn-ebpf.io/probe-run";
/// How much longer than the window a probe sends: its node's window starts once the pod is
/// seen running (a poll and an exec away).
const PROBE_MARGIN: Duration = Duration::from_secs(10);

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
    /// must flow meanwhile: verify counts, it sends nothing — unless --probe, which runs a
    /// probe pod per node and starts each node's window when its probe runs). Exit status: 0
    /// every node agrees, 2 a node disagrees, 1 a node could not be verified (or its probe did
    /// not run), 3 otherwise inconclusive.
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
    /// Send probe traffic meanwhile: per node a pod (not hostNetwork, no privileges, no
    /// service account token) runs `kube-ovn-agent probe` for the window plus 10 s, to
    /// targets chosen here from the cluster's Services, Nodes and Subnets; deleted afterwards.
    #[arg(long)]
    probe: bool,
    /// With --probe: probes per second on each node (at most 200).
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..=200))]
    probe_rate: u32,
    /// With --probe: the probe pods' image (default: the agent `DaemonSet`'s).
    #[arg(long, value_name = "IMAGE")]
    probe_image: Option<String>,
    /// With --probe: how long a probe pod may take to start (image pull included), in
    /// seconds; a node whose pod does not start is reported and not verified.
    #[arg(long, default_value_t = 120, value_name = "SECONDS")]
    probe_start_timeout: u64,
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
        self.window().map(|_| ())
    }

    /// The window as the agent parses it.
    fn window(&self) -> Result<Duration, String> {
        match kube_ovn_agent::cli::Cli::try_parse_from(self.command()) {
            Ok(kube_ovn_agent::cli::Cli {
                command: kube_ovn_agent::cli::Command::Verify(verify),
                ..
            }) => Ok(verify.window),
            Ok(_) => Err("not a verify command".into()),
            Err(e) => Err(e.to_string().trim().to_owned()),
        }
    }

    /// How long each probe sends: the window and the margin, within the probe's own cap.
    fn probe_duration(&self) -> Result<Duration, String> {
        let duration = self.window()? + PROBE_MARGIN;
        if duration > probe::MAX_DURATION {
            return Err(format!(
                "--probe sends for the window plus {}s, at most {}s: use a shorter --window",
                PROBE_MARGIN.as_secs(),
                probe::MAX_DURATION.as_secs()
            ));
        }
        Ok(duration)
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

#[derive(Clone)]
struct Kubectl {
    program: String,
    namespace: String,
}

impl Kubectl {
    /// Runs `kubectl -n NS ARGS`: stdout, or stderr as the error.
    fn run(&self, args: &[&str]) -> Result<Vec<u8>, String> {
        self.run_with_input(args, None)
    }

    /// [`Kubectl::run`] with `input` on its stdin.
    fn run_with_input(&self, args: &[&str], input: Option<&[u8]>) -> Result<Vec<u8>, String> {
        let out = exec::run(
            Command::new(&self.program)
                .args(["-n", &self.namespace])
                .args(args),
            input,
            None,
        )
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
    if args.probe {
        return verify_with_probes(kubectl, args);
    }
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

/// The agent `DaemonSet`'s image and the flags the probe mix depends on.
#[derive(Debug, Default, PartialEq, Eq)]
struct AgentDaemonSet {
    image: Option<String>,
    service_cluster_ip_range: Option<String>,
    cluster_router: Option<String>,
}

/// The agent container (`agent`, else the first) of the first `DaemonSet` in a `kubectl get
/// daemonset -o json` list.
fn agent_daemonset(list: &Value) -> AgentDaemonSet {
    let containers = list["items"][0]["spec"]["template"]["spec"]["containers"]
        .as_array()
        .map_or(&[][..], Vec::as_slice);
    let Some(container) = containers
        .iter()
        .find(|c| c["name"] == "agent")
        .or_else(|| containers.first())
    else {
        return AgentDaemonSet::default();
    };
    let args: Vec<String> = container["args"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .map(str::to_owned)
        .collect();
    let flag = |name| kube_ovn_agent::ops::preflight::flag_value(&args, name, false);
    AgentDaemonSet {
        image: container["image"].as_str().map(str::to_owned),
        service_cluster_ip_range: flag("service-cluster-ip-range"),
        cluster_router: flag("cluster-router"),
    }
}

impl Kubectl {
    /// The `items` of `kubectl get ARGS -o json`, each decoded as `T`.
    fn list<T: serde::de::DeserializeOwned>(&self, args: &[&str]) -> Result<Vec<Arc<T>>, String> {
        let mut command = args.to_vec();
        command.extend(["-o", "json"]);
        let out = self.run(&command)?;
        let list: Value =
            serde_json::from_slice(&out).map_err(|e| format!("kubectl {}: {e}", args.join(" ")))?;
        list["items"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|item| {
                serde_json::from_value(item.clone())
                    .map(Arc::new)
                    .map_err(|e| format!("kubectl {}: {e}", args.join(" ")))
            })
            .collect()
    }

    /// What the probe mix is chosen from. Subnets and ServiceCIDRs are optional: a cluster
    /// without Kube-OVN's CRD or the ServiceCIDR API (or a user not allowed to list them) gets
    /// no `other-subnet` targets and the agent's --service-cluster-ip-range.
    fn cluster(&self) -> Result<Snapshot, String> {
        Ok(Snapshot {
            services: self.list(&[
                "get",
                "services",
                "--all-namespaces",
                "-l",
                KUBE_PROXY_SERVICE_SELECTOR,
            ])?,
            nodes: self.list(&["get", "nodes"])?,
            subnets: self
                .list(&["get", "subnets.kubeovn.io"])
                .unwrap_or_default(),
            service_cidrs: self
                .list(&["get", "servicecidrs.networking.k8s.io"])
                .unwrap_or_default(),
            pods: Vec::new(),
        })
    }

    /// Polls pod `name` until its phase is one of `wanted` (then `Ok(phase)`), it ended
    /// otherwise, or `timeout` passed (then `Err` with what the pod shows).
    fn wait_phase(&self, name: &str, wanted: &[&str], timeout: Duration) -> Result<String, String> {
        let deadline = Instant::now() + timeout;
        loop {
            let pod: Value = self
                .run(&["get", "pod", name, "-o", "json"])
                .and_then(|out| serde_json::from_slice(&out).map_err(|e| e.to_string()))?;
            let phase = pod["status"]["phase"].as_str().unwrap_or("Pending");
            if wanted.contains(&phase) {
                return Ok(phase.to_owned());
            }
            if matches!(phase, "Succeeded" | "Failed") {
                return Err(format!("pod {name} ended: {}", pod_state(&pod)));
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "pod {name} not {} within {}s: {}",
                    wanted.join(" or "),
                    timeout.as_secs(),
                    pod_state(&pod)
                ));
            }
            std::thread::sleep(Duration::from_secs(1));
        }
    }
}

/// What a pod shows of itself: its phase and the first container's waiting or terminated
/// reason and message, else the first condition that is not true.
fn pod_state(pod: &Value) -> String {
    let status = &pod["status"];
    let mut text = status["phase"].as_str().unwrap_or("Pending").to_owned();
    let container = &status["containerStatuses"][0]["state"];
    let detail = ["waiting", "terminated"]
        .iter()
        .map(|s| &container[s])
        .find(|s| s.is_object())
        .or_else(|| {
            status["conditions"]
                .as_array()?
                .iter()
                .find(|c| c["status"] != "True")
        });
    if let Some(detail) = detail {
        for key in ["reason", "message"] {
            if let Some(value) = detail[key].as_str().filter(|v| !v.is_empty()) {
                let _ = write!(text, ", {}", value.trim());
            }
        }
    }
    text
}

/// The probe pod for `node`: pinned there by `nodeName` (tolerating every taint, as the agent
/// does), an ordinary pod network (not hostNetwork) so its packets enter the node through
/// ovn0, unprivileged (non-root, no capabilities, no service account token: its targets come
/// on its command line), bounded in CPU and memory, `restartPolicy: Never` and an
/// `activeDeadlineSeconds` that ends it even if nobody deletes it.
fn probe_pod(
    name: &str,
    node: &str,
    image: &str,
    run: &str,
    command: &[String],
    deadline: Duration,
) -> Value {
    serde_json::json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "labels": {
                "app.kubernetes.io/name": PROBE_APP,
                "app.kubernetes.io/component": "probe",
                PROBE_RUN_LABEL: run,
            },
        },
        "spec": {
            "nodeName": node,
            "restartPolicy": "Never",
            "activeDeadlineSeconds": deadline.as_secs(),
            "terminationGracePeriodSeconds": 5,
            "automountServiceAccountToken": false,
            "enableServiceLinks": false,
            "tolerations": [{"operator": "Exists"}],
            "securityContext": {
                "runAsNonRoot": true,
                "runAsUser": 65534,
                "runAsGroup": 65534,
                "seccompProfile": {"type": "RuntimeDefault"},
            },
            "containers": [{
                "name": "probe",
                "image": image,
                "imagePullPolicy": "IfNotPresent",
                "command": command,
                "resources": {
                    "requests": {"cpu": "50m", "memory": "32Mi"},
                    "limits": {"cpu": "200m", "memory": "64Mi"},
                },
                "securityContext": {
                    "allowPrivilegeEscalation": false,
                    "readOnlyRootFilesystem": true,
                    "capabilities": {"drop": ["ALL"]},
                },
            }],
        },
    })
}

/// `kube-ovn-agent probe` for the pod: the rate, the duration and as many probes as they
/// allow, and the targets.
fn probe_command(targets: &[Target], rate: u32, duration: Duration) -> Vec<String> {
    // Logs off but errors: the pod's log is the report, read back as JSON.
    let mut command: Vec<String> = ["kube-ovn-agent", "--log-level", "error", "probe", "--json"]
        .map(str::to_owned)
        .to_vec();
    command.extend([
        "--rate".to_owned(),
        rate.to_string(),
        "--duration".to_owned(),
        format!("{}s", duration.as_secs()),
        "--count".to_owned(),
        (u64::from(rate) * duration.as_secs()).to_string(),
    ]);
    for target in targets {
        command.extend(["--target".to_owned(), target.to_string()]);
    }
    command
}

/// Deletes one run's probe pods by their label, once (at the end, on an error or on Ctrl-C).
struct ProbeCleanup {
    kubectl: Kubectl,
    run: String,
    done: std::sync::atomic::AtomicBool,
}

impl ProbeCleanup {
    fn delete(&self) -> Result<(), String> {
        if self.done.swap(true, std::sync::atomic::Ordering::SeqCst) {
            return Ok(());
        }
        let selector = format!("{PROBE_RUN_LABEL}={}", self.run);
        self.kubectl
            .run(&[
                "delete",
                "pods",
                "-l",
                &selector,
                "--ignore-not-found",
                "--wait=false",
            ])
            .map(|_| ())
    }

    /// On SIGINT or SIGTERM: delete, then exit 130. Returns once the handlers are in place.
    fn on_interrupt(self: &Arc<Self>) -> Result<(), String> {
        let this = Arc::clone(self);
        let (ready, installed) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            use tokio::signal::unix::{SignalKind, signal};
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build();
            let waited = runtime.map_err(|e| e.to_string()).and_then(|runtime| {
                runtime.block_on(async {
                    let mut term = signal(SignalKind::terminate()).map_err(|e| e.to_string())?;
                    let mut int = signal(SignalKind::interrupt()).map_err(|e| e.to_string())?;
                    let _ = ready.send(Ok(()));
                    tokio::select! {
                        _ = term.recv() => {}
                        _ = int.recv() => {}
                    }
                    Ok(())
                })
            });
            match waited {
                Ok(()) => {
                    eprintln!("interrupted: deleting the probe pods");
                    if let Err(e) = this.delete() {
                        eprintln!("error: {e}");
                    }
                    std::process::exit(130);
                }
                Err(e) => {
                    let _ = ready.send(Err(e));
                }
            }
        });
        installed
            .recv()
            .map_err(|_| "the signal thread ended".to_owned())?
            .map_err(|e| format!("waiting for signals: {e}"))
    }
}

/// One node of `verify --probe`: `verify`'s reply, and the probe's summary or why it failed.
type NodeResult = (Result<Vec<u8>, String>, Result<String, String>);

/// Creates the probe pod, waits for it to run, runs `verify` there, waits for the probe to
/// end and reads its report.
fn probe_node(
    kubectl: &Kubectl,
    agent_pod: &str,
    probe_pod_name: &str,
    manifest: Result<Value, String>,
    verify: &[String],
    start_timeout: Duration,
) -> NodeResult {
    let not_verified = || Err("not verified: its probe did not run".to_owned());
    let manifest = match manifest {
        Ok(manifest) => manifest.to_string(),
        Err(e) => return (not_verified(), Err(e)),
    };
    if let Err(e) = kubectl.run_with_input(&["create", "-f", "-"], Some(manifest.as_bytes())) {
        return (not_verified(), Err(e));
    }
    if let Err(e) = kubectl.wait_phase(probe_pod_name, &["Running", "Succeeded"], start_timeout) {
        return (not_verified(), Err(e));
    }
    let reply = kubectl.exec_any_status(agent_pod, verify);
    let ended = kubectl.wait_phase(
        probe_pod_name,
        &["Succeeded", "Failed"],
        PROBE_MARGIN + Duration::from_secs(30),
    );
    let logs = kubectl.run(&["logs", probe_pod_name]);
    let summary = match (ended, logs) {
        (Ok(phase), Ok(logs)) => probe_summary(&logs).ok_or_else(|| {
            format!(
                "pod {probe_pod_name} {phase}: {}",
                String::from_utf8_lossy(&logs).trim()
            )
        }),
        (Err(e), _) | (_, Err(e)) => Err(e),
    };
    (reply, summary)
}

/// The table of `verify --probe`: each node's line, then what its probe sent; the worst
/// verdict (a node whose probe failed counts as not verified).
fn print_probe_results(pods: &[(String, String)], results: &[NodeResult]) -> NodeVerdict {
    println!(
        "{:<20} {:<24} {:<12} {:<8} RULES",
        "NODE", "POD", "VERDICT", "MODE"
    );
    let mut worst = NodeVerdict::Agree;
    for ((pod, node), (reply, summary)) in pods.iter().zip(results) {
        let (line, verdict) = verify_line(node, pod, reply.as_deref().map_err(String::as_str));
        println!("{line}");
        worst = worst.max(verdict);
        match summary {
            Ok(summary) => println!("  probe: {summary}"),
            Err(e) => {
                println!("  probe: FAILED {e}");
                worst = worst.max(NodeVerdict::Error);
            }
        }
    }
    worst
}

/// The `summary` of the probe's JSON report in its pod's log (stdout and stderr interleaved:
/// the report is the object that starts on a line of its own).
fn probe_summary(log: &[u8]) -> Option<String> {
    let start = log
        .windows(2)
        .position(|w| w == b"\n{")
        .map(|at| at + 1)
        .or_else(|| log.starts_with(b"{").then_some(0))?;
    let report: Value = serde_json::Deserializer::from_slice(&log[start..])
        .into_iter()
        .next()?
        .ok()?;
    report["summary"].as_str().map(str::to_owned)
}

/// A short id for one run's pods: from the clock and the process id.
fn run_id() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| {
            d.subsec_nanos() ^ u32::try_from(d.as_secs() & 0xffff_ffff).unwrap_or(0)
        });
    format!("{:08x}", nanos ^ std::process::id().rotate_left(16))
}

fn verify_with_probes(kubectl: &Kubectl, args: &VerifyArgs) -> Result<u8, String> {
    let duration = args.probe_duration()?;
    let pods = kubectl.pods()?;
    let daemonset = kubectl
        .run(&["get", "daemonset", "-l", SELECTOR, "-o", "json"])
        .and_then(|out| serde_json::from_slice(&out).map_err(|e| e.to_string()))
        .map(|list| agent_daemonset(&list))?;
    let image = args
        .probe_image
        .clone()
        .or(daemonset.image)
        .ok_or_else(|| format!("no agent DaemonSet labelled {SELECTOR}: give --probe-image"))?;
    let service_cluster_ip_range = daemonset
        .service_cluster_ip_range
        .as_deref()
        .unwrap_or("10.96.0.0/12")
        .split(',')
        .map(|c| {
            c.trim()
                .parse()
                .map_err(|e| format!("the agent's --service-cluster-ip-range {c:?}: {e}"))
        })
        .collect::<Result<Vec<_>, String>>()?;
    let snapshot = kubectl.cluster()?;
    let run = run_id();
    let start_timeout = Duration::from_secs(args.probe_start_timeout);
    // Bounds the pod even if this process is killed before it deletes it.
    let deadline = start_timeout + duration + Duration::from_mins(1);
    let cleanup = Arc::new(ProbeCleanup {
        kubectl: kubectl.clone(),
        run: run.clone(),
        done: std::sync::atomic::AtomicBool::new(false),
    });
    cleanup.on_interrupt()?;
    let verify_command = args.command();
    let names: Vec<String> = (0..pods.len())
        .map(|i| format!("kovn-probe-{run}-{i}"))
        .collect();
    let manifests: Vec<Result<Value, String>> = pods
        .iter()
        .zip(&names)
        .map(|((_, node), name)| {
            let targets = probe::select(
                &snapshot,
                &probe::SelectOptions {
                    node_name: node.clone(),
                    cluster_router: daemonset
                        .cluster_router
                        .clone()
                        .unwrap_or_else(|| "ovn-cluster".to_owned()),
                    service_cluster_ip_range: service_cluster_ip_range.clone(),
                    max_targets: 24,
                },
            )
            .map_err(|e| e.to_string())?;
            let command = probe_command(&targets, args.probe_rate, duration);
            Ok(probe_pod(name, node, &image, &run, &command, deadline))
        })
        .collect();
    let results: Vec<NodeResult> = std::thread::scope(|scope| {
        let handles: Vec<_> = pods
            .iter()
            .zip(&names)
            .zip(manifests)
            .map(|(((pod, _), name), manifest)| {
                let verify_command = &verify_command;
                scope.spawn(move || {
                    probe_node(kubectl, pod, name, manifest, verify_command, start_timeout)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join().unwrap_or_else(|_| {
                    (
                        Err("verify thread panicked".into()),
                        Err("probe thread panicked".into()),
                    )
                })
            })
            .collect()
    });
    let cleaned = cleanup.delete();
    let mut worst = print_probe_results(&pods, &results);
    if let Err(e) = cleaned {
        eprintln!("error: deleting the probe pods (label {PROBE_RUN_LABEL}={run}): {e}");
        worst = worst.max(NodeVerdict::Error);
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

    #[test]
    fn probe_flags_parse_and_the_probe_runs_past_the_window() {
        let Cmd::Verify(verify) =
            parse(&["verify", "--probe", "--window", "20s", "--probe-rate", "50"])
                .unwrap()
                .command
        else {
            panic!("not verify")
        };
        assert!(verify.probe);
        assert_eq!(verify.probe_rate, 50);
        assert_eq!(verify.probe_start_timeout, 120, "the default");
        assert_eq!(verify.probe_duration(), Ok(Duration::from_secs(30)));
        // The verify command in the agent pods is unchanged by --probe.
        assert_eq!(
            verify.command()[..3],
            ["kube-ovn-agent", "verify", "--json"]
        );
        assert!(!verify.command().iter().any(|w| w.contains("probe")));
        let Cmd::Verify(long) = parse(&["verify", "--probe", "--window", "10m"])
            .unwrap()
            .command
        else {
            panic!("not verify")
        };
        assert!(
            long.probe_duration()
                .unwrap_err()
                .contains("shorter --window")
        );
        assert!(parse(&["verify", "--probe-rate", "201"]).is_err());
    }

    #[test]
    fn the_probe_pod_is_pinned_bounded_unprivileged_and_labelled() {
        let targets: Vec<Target> = [
            "tcp/10.96.0.10:53/cluster-ip",
            "udp/[fd00::11]:30053/node-port",
        ]
        .iter()
        .map(|t| t.parse().unwrap())
        .collect();
        let command = probe_command(&targets, 20, Duration::from_secs(40));
        // The agent's own parser accepts what the pod will run.
        let parsed = kube_ovn_agent::cli::Cli::try_parse_from(&command).expect("agent parses it");
        let kube_ovn_agent::cli::Command::Probe(probe) = parsed.command else {
            panic!("not probe")
        };
        assert_eq!(probe.targets, targets);
        assert_eq!((probe.rate, probe.count), (20, 800));
        assert_eq!(probe.duration, Duration::from_secs(40));
        assert!(probe.json);
        let pod = probe_pod(
            "kovn-probe-ab-0",
            "n1",
            "img:1",
            "ab",
            &command,
            Duration::from_mins(5),
        );
        assert_eq!(pod["spec"]["nodeName"], "n1");
        assert_eq!(pod["spec"]["restartPolicy"], "Never");
        assert_eq!(pod["spec"]["activeDeadlineSeconds"], 300);
        assert_eq!(pod["spec"]["automountServiceAccountToken"], false);
        assert!(
            pod["spec"]["hostNetwork"].is_null(),
            "pod network: through ovn0"
        );
        assert_eq!(pod["metadata"]["labels"][PROBE_RUN_LABEL], "ab");
        assert_eq!(
            pod["metadata"]["labels"]["app.kubernetes.io/name"],
            PROBE_APP
        );
        assert_ne!(
            format!("app.kubernetes.io/name={PROBE_APP}"),
            SELECTOR,
            "agent discovery must not find probe pods"
        );
        let container = &pod["spec"]["containers"][0];
        assert_eq!(container["image"], "img:1");
        assert_eq!(container["resources"]["limits"]["memory"], "64Mi");
        assert_eq!(
            container["securityContext"]["capabilities"]["drop"][0],
            "ALL"
        );
        assert_eq!(container["command"][3], "probe");
    }

    #[test]
    fn the_probe_report_is_found_in_a_log_with_other_lines() {
        let report = br#"{
  "summary": "sent 3 in 0.1s to 1 targets",
  "sent": 3
}
"#;
        assert_eq!(
            probe_summary(report).as_deref(),
            Some("sent 3 in 0.1s to 1 targets")
        );
        let mut mixed = b"2026-01-01T00:00:00Z WARN something {odd}\n".to_vec();
        mixed.extend_from_slice(report);
        mixed.extend_from_slice(b"trailing line\n");
        assert_eq!(
            probe_summary(&mixed).as_deref(),
            Some("sent 3 in 0.1s to 1 targets")
        );
        assert_eq!(probe_summary(b"error: no targets\n"), None);
    }

    #[test]
    fn the_agent_daemonset_gives_image_and_flags() {
        let list = serde_json::json!({"items": [{"spec": {"template": {"spec": {"containers": [
            {"name": "sidecar", "image": "other:1"},
            {"name": "agent", "image": "kube-ovn-ebpf:0.2.0",
             "args": ["run", "--service-cluster-ip-range=10.233.0.0/18,fd00::/112",
                      "--cluster-router", "my-vpc", "--service-cluster-ip-range-extra=x"]}
        ]}}}}]});
        assert_eq!(
            agent_daemonset(&list),
            AgentDaemonSet {
                image: Some("kube-ovn-ebpf:0.2.0".into()),
                service_cluster_ip_range: Some("10.233.0.0/18,fd00::/112".into()),
                cluster_router: Some("my-vpc".into()),
            }
        );
        assert_eq!(
            agent_daemonset(&serde_json::json!({"items": []})),
            AgentDaemonSet::default()
        );
    }

    #[test]
    fn a_pod_that_does_not_start_says_why() {
        let pulling = serde_json::json!({"status": {"phase": "Pending", "containerStatuses": [
            {"state": {"waiting": {"reason": "ImagePullBackOff", "message": "no such image"}}}]}});
        assert_eq!(
            pod_state(&pulling),
            "Pending, ImagePullBackOff, no such image"
        );
        let unscheduled = serde_json::json!({"status": {"phase": "Pending", "conditions": [
            {"type": "Initialized", "status": "True"},
            {"type": "Ready", "status": "False", "reason": "ContainersNotReady"}]}});
        assert_eq!(pod_state(&unscheduled), "Pending, ContainersNotReady");
        assert_eq!(pod_state(&serde_json::json!({})), "Pending");
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
