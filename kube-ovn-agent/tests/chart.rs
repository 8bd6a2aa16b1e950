//! Keeps the Helm chart (charts/kube-ovn-ebpf) and the monitoring objects honest, without a
//! cluster: `helm lint` passes for every profile and the schema refuses what the agent would; for
//! the same settings the chart renders the same objects as the Kustomize base with its components
//! and patches (rendered by the pinned `kustomize`), and the same monitoring objects as
//! deploy/monitoring; every rendered `DaemonSet` is a typed object whose args the agent's own CLI
//! parser accepts; the alert rules pass `promtool check rules` and their unit tests; the
//! dashboard and the rules name only metrics the agent registers; the uninstall hook runs
//! deploy/uninstall's `DaemonSet` and waits for it with `get` on that one object as its only
//! permission.
//!
//! Helm and Kustomize are built from the Go module proxy at the versions go/helm/go.mod pins,
//! into `target/tools/` (as `cargo xtask helm build` does). promtool comes from Debian's
//! `prometheus` package (`cargo xtask setup`). A missing tool fails the test under `CI`; elsewhere
//! the affected test says loudly that it was skipped.

mod support;

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Write as _,
    path::{Path, PathBuf},
    process::Command,
    sync::OnceLock,
};

use clap::Parser as _;
use k8s_openapi::api::{apps::v1::DaemonSet, core::v1::ConfigMap};
use kube_ovn_agent::{
    cli::{Cli, Command as AgentCommand},
    metrics::{ErrorKind, InterfaceState, Metrics},
    source::KindStatus,
};
use kube_ovn_ebpf_common::counter;
use kube_ovn_testkit::typed::typed;
use libtest_mimic::{Arguments, Failed, Trial};
use serde_json::Value;

type Test = fn() -> Result<(), Failed>;

fn main() {
    let args = Arguments::from_args();
    let tests: Vec<(&str, Test)> = vec![
        ("helm_lint_passes_for_every_profile", helm_lint),
        (
            "chart_renders_what_kustomize_renders_for_the_same_settings",
            chart_equals_kustomize,
        ),
        (
            "rendered_daemonsets_are_typed_and_their_args_pass_the_agents_cli",
            daemonsets_pass_the_cli,
        ),
        (
            "schema_and_templates_refuse_what_the_agent_would",
            bad_values_refused,
        ),
        ("chart_version_follows_the_workspace", chart_version_matches),
        (
            "uninstall_hook_detaches_every_node_and_waits_with_least_rbac",
            uninstall_hook,
        ),
        (
            "uninstall_wait_with_the_hooks_rbac_on_a_real_api_server",
            uninstall_wait_on_real_api_server,
        ),
        (
            "every_chart_render_passes_server_dry_run",
            renders_pass_server_dry_run,
        ),
        (
            "alert_rules_pass_promtool_check_and_unit_tests",
            promtool_rules,
        ),
        (
            "prometheus_rule_and_dashboard_copies_are_equal",
            monitoring_copies_equal,
        ),
        (
            "dashboard_and_rules_name_only_metrics_the_agent_registers",
            queries_name_real_metrics,
        ),
        (
            "promql_name_extraction_catches_a_made_up_metric",
            extractor_catches,
        ),
        ("alert_doc_links_reach_a_heading", alert_links_exist),
        (
            "every_file_under_deploy_monitoring_is_rendered_or_tested",
            monitoring_files_used,
        ),
    ];
    let trials = tests
        .into_iter()
        .map(|(name, f)| Trial::test(name, f))
        .collect();
    libtest_mimic::run(&args, trials).exit();
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

fn chart_dir() -> PathBuf {
    repo().join("charts/kube-ovn-ebpf")
}

fn monitoring_dir() -> PathBuf {
    repo().join("deploy/monitoring")
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn in_ci() -> bool {
    std::env::var_os("CI").is_some_and(|v| !v.is_empty() && v != "false")
}

/// `Ok(None)` when a tool is missing outside CI (the caller skips loudly), an error in CI.
fn missing(tool: &str, why: &str) -> Result<Option<PathBuf>, String> {
    if in_ci() {
        Err(format!("{tool} is needed in CI: {why}"))
    } else {
        eprintln!("\n*** {tool} unavailable ({why}): skipped ***\n");
        Ok(None)
    }
}

// ---------------------------------------------------------------------------------------------
// Tools

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| repo().join("target"), PathBuf::from)
}

/// The version go/helm/go.mod requires of `module`.
fn pinned(module: &str) -> Option<String> {
    read(&repo().join("go/helm/go.mod"))
        .lines()
        .find_map(|line| {
            let mut words = line.split_whitespace();
            (words.next()? == module).then(|| words.next().map(str::to_owned))?
        })
}

/// Builds (once per process, and only when `target/tools/NAME-VERSION` is missing) a Go tool of
/// the go/helm module, as xtask/src/helm.rs does.
fn go_tool(name: &str, package: &str, module: &str) -> Result<PathBuf, String> {
    let version = pinned(module).ok_or_else(|| format!("go/helm/go.mod does not pin {module}"))?;
    let out = target_dir().join("tools").join(format!("{name}-{version}"));
    if out.exists() {
        return Ok(out);
    }
    std::fs::create_dir_all(out.parent().expect("tools dir")).map_err(|e| e.to_string())?;
    let partial = out.with_file_name(format!(".{name}-{version}.{}", std::process::id()));
    let status = Command::new("go")
        .current_dir(repo().join("go/helm"))
        .args(["build", "-trimpath", "-ldflags"])
        .arg(ldflags(name, &version))
        .arg("-o")
        .arg(&partial)
        .arg(package)
        .status()
        .map_err(|e| format!("go: {e}"))?;
    if !status.success() {
        return Err(format!("go build {package}: {status}"));
    }
    std::fs::rename(&partial, &out).map_err(|e| e.to_string())?;
    Ok(out)
}

/// As xtask/src/helm.rs: the version, and for Helm the Kubernetes version it assumes (from the
/// client-go it links, as Helm's Makefile does; unset, Helm assumes 1.20).
fn ldflags(name: &str, version: &str) -> String {
    if name != "helm" {
        return format!("-X sigs.k8s.io/kustomize/api/provenance.version={version}");
    }
    let minor = pinned("k8s.io/client-go")
        .and_then(|v| v.split('.').nth(1).map(str::to_owned))
        .unwrap_or_default();
    let mut flags = format!("-X helm.sh/helm/v3/internal/version.version={version}");
    for package in ["pkg/lint/rules", "pkg/chartutil"] {
        let _ = write!(
            flags,
            " -X helm.sh/helm/v3/{package}.k8sVersionMajor=1 -X helm.sh/helm/v3/{package}.k8sVersionMinor={minor}"
        );
    }
    flags
}

fn have_go() -> bool {
    Command::new("go")
        .arg("version")
        .output()
        .is_ok_and(|o| o.status.success())
}

fn helm() -> Result<Option<PathBuf>, String> {
    static HELM: OnceLock<Result<Option<PathBuf>, String>> = OnceLock::new();
    HELM.get_or_init(|| {
        if !have_go() {
            return missing("helm", "no `go` to build it from go/helm");
        }
        go_tool("helm", "helm.sh/helm/v3/cmd/helm", "helm.sh/helm/v3").map(Some)
    })
    .clone()
}

fn kustomize() -> Result<Option<PathBuf>, String> {
    static KUSTOMIZE: OnceLock<Result<Option<PathBuf>, String>> = OnceLock::new();
    KUSTOMIZE
        .get_or_init(|| {
            if !have_go() {
                return missing("kustomize", "no `go` to build it from go/helm");
            }
            go_tool(
                "kustomize",
                "sigs.k8s.io/kustomize/kustomize/v5",
                "sigs.k8s.io/kustomize/kustomize/v5",
            )
            .map(Some)
        })
        .clone()
}

fn promtool() -> Result<Option<PathBuf>, String> {
    let found = Command::new("promtool")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if found {
        Ok(Some(PathBuf::from("promtool")))
    } else {
        missing(
            "promtool",
            "apt-get install prometheus, or `cargo xtask setup`",
        )
    }
}

fn output(command: &mut Command) -> Result<String, String> {
    let shown = format!("{command:?}");
    let out = command.output().map_err(|e| format!("{shown}: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "{shown}: {}\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// A scratch directory removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new(what: &str) -> Self {
        static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir =
            std::env::temp_dir().join(format!("kovn-chart-{what}-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("scratch dir");
        Self(dir)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

// ---------------------------------------------------------------------------------------------
// Profiles: the same settings as chart values and as a Kustomize overlay

/// One configuration an operator might choose, said both ways.
struct Profile {
    name: &'static str,
    /// Helm values (YAML).
    values: &'static str,
    /// Kustomize directories under deploy/ the overlay lists as resources.
    resources: &'static [&'static str],
    /// Kustomize components under deploy/components/.
    components: &'static [&'static str],
    /// The overlay's `images:` and `patches:` sections (YAML, may be empty).
    overlay: &'static str,
}

const PROFILES: &[Profile] = &[
    Profile {
        name: "default",
        values: "",
        resources: &["base"],
        components: &[],
        overlay: "",
    },
    Profile {
        name: "enforce",
        values: "mode: enforce\n",
        resources: &["base"],
        components: &["enforce"],
        overlay: "",
    },
    Profile {
        name: "kernel-5.10",
        values: "kernelProfile: kernel-5.10\n",
        resources: &["base"],
        components: &["kernel-5.10"],
        overlay: "",
    },
    Profile {
        name: "cap-sys-admin",
        values: "kernelProfile: cap-sys-admin\n",
        resources: &["base"],
        components: &["cap-sys-admin"],
        overlay: "",
    },
    Profile {
        name: "enforce-cap-sys-admin",
        values: "mode: enforce\nkernelProfile: cap-sys-admin\n",
        resources: &["base"],
        components: &["enforce", "cap-sys-admin"],
        overlay: "",
    },
    // Every other setting at once, and how a Kustomize user says the same.
    Profile {
        name: "custom",
        values: r#"
image:
  repository: registry.example.com/kube-ovn-ebpf
  tag: 0.1.0-rc1
serviceClusterIPRange: [10.233.0.0/18, "fd00:10:96::/112"]
clusterRouter: vpc-main
kubeProxyMode: ipvs
serviceMatch: ip-port
tproxy:
  enabled: true
  port: 8102
attach: netlink
interfaces:
  bond1: nic
  eth9: none
log:
  format: json
  level: debug
extraArgs: [--resync-interval=10m]
resources:
  limits:
    cpu: "2"
    memory: 1Gi
  requests:
    cpu: 50m
    memory: 128Mi
"#,
        resources: &["base"],
        components: &[],
        overlay: r#"
images:
- name: kube-ovn-ebpf
  newName: registry.example.com/kube-ovn-ebpf
  newTag: 0.1.0-rc1
patches:
- target: {group: apps, version: v1, kind: DaemonSet, name: kube-ovn-ebpf}
  patch: |-
    - op: test
      path: /spec/template/spec/containers/0/args/5
      value: --service-cluster-ip-range=10.96.0.0/12
    - op: replace
      path: /spec/template/spec/containers/0/args/5
      value: --service-cluster-ip-range=10.233.0.0/18,fd00:10:96::/112
    - op: test
      path: /spec/template/spec/containers/0/args/6
      value: --cluster-router=ovn-cluster
    - op: replace
      path: /spec/template/spec/containers/0/args/6
      value: --cluster-router=vpc-main
    - {op: add, path: /spec/template/spec/containers/0/args/-, value: --kube-proxy-mode=ipvs}
    - {op: add, path: /spec/template/spec/containers/0/args/-, value: --service-match=ip-port}
    - {op: add, path: /spec/template/spec/containers/0/args/-, value: --enable-tproxy}
    - {op: add, path: /spec/template/spec/containers/0/args/-, value: --tproxy-port=8102}
    - {op: add, path: /spec/template/spec/containers/0/args/-, value: --attach=netlink}
    - {op: add, path: /spec/template/spec/containers/0/args/-, value: --iface=bond1=nic}
    - {op: add, path: /spec/template/spec/containers/0/args/-, value: --iface=eth9=none}
    - {op: add, path: /spec/template/spec/containers/0/args/-, value: --log-json}
    - {op: add, path: /spec/template/spec/containers/0/args/-, value: --log-level=debug}
    - {op: add, path: /spec/template/spec/containers/0/args/-, value: --resync-interval=10m}
    - op: replace
      path: /spec/template/spec/containers/0/resources
      value: {limits: {cpu: "2", memory: 1Gi}, requests: {cpu: 50m, memory: 128Mi}}
"#,
    },
    Profile {
        name: "monitoring-servicemonitor",
        values: r"
metrics:
  serviceMonitor: {enabled: true}
  prometheusRule: {enabled: true}
  dashboard: {enabled: true}
",
        resources: &["base", "monitoring"],
        components: &[],
        overlay: "",
    },
    Profile {
        name: "monitoring-podmonitor",
        values: r"
metrics:
  podMonitor: {enabled: true}
  prometheusRule: {enabled: true}
  dashboard: {enabled: true}
",
        resources: &[
            "base",
            "monitoring/pod-monitor",
            "monitoring/rules",
            "monitoring/dashboard",
        ],
        components: &[],
        overlay: "",
    },
];

const RELEASE: &str = "kube-ovn-ebpf";
const NAMESPACE: &str = "kube-system";

/// `helm template` of the chart with `values`.
fn helm_template(helm: &Path, values: &str) -> Result<String, String> {
    let scratch = Scratch::new("values");
    let file = scratch.0.join("values.yaml");
    std::fs::write(&file, values).map_err(|e| e.to_string())?;
    output(
        Command::new(helm)
            .args(["template", RELEASE])
            .arg(chart_dir())
            .args(["--namespace", NAMESPACE, "--values"])
            .arg(&file),
    )
}

/// Every profile's `helm template` output, by profile name: what a server-side dry run or any
/// other whole-chart check can iterate over. `Ok(None)` when helm is unavailable outside CI.
fn renders() -> Result<Option<Vec<(String, String)>>, String> {
    let Some(helm) = helm()? else {
        return Ok(None);
    };
    PROFILES
        .iter()
        .map(|p| Ok((p.name.to_owned(), helm_template(&helm, p.values)?)))
        .collect::<Result<Vec<_>, String>>()
        .map(Some)
}

/// Every profile's render against the real kube-apiserver of docs/testbed.md (`$KUBE_APISERVER`,
/// `$ETCD`, built by `cargo xtask testbed build`): `kubectl apply --dry-run=server` accepts each
/// object. The Prometheus Operator's kinds (`ServiceMonitor`, `PodMonitor`, `PrometheusRule`) are left
/// out: their CRDs are not installed there; promtool checks the rules and a trial below the names.
fn renders_pass_server_dry_run() -> Result<(), Failed> {
    use kube_ovn_testkit::control_plane::{Binaries, ControlPlane, Options};
    let binaries = match Binaries::from_env() {
        Ok(binaries) => binaries,
        Err(e) => {
            missing("a real kube-apiserver", &e.to_string())?;
            return Ok(());
        }
    };
    let Some(mut renders) = renders()? else {
        return Ok(());
    };
    // deploy/uninstall's DaemonSet (no chart counterpart) goes through the same check.
    renders.push((
        "deploy/uninstall".to_owned(),
        read(&repo().join("deploy/uninstall/daemonset.yaml")),
    ));
    let plane = ControlPlane::start(Options::new(binaries)).map_err(|e| e.to_string())?;
    let mut problems = Vec::new();
    for (profile, yaml) in renders {
        let kept: Vec<Value> = parse_objects(&yaml, &profile)?
            .into_iter()
            .filter(|o| {
                !o["apiVersion"]
                    .as_str()
                    .is_some_and(|v| v.starts_with("monitoring.coreos.com/"))
            })
            .collect();
        let list = serde_json::json!({"apiVersion": "v1", "kind": "List", "items": kept});
        match plane.kubectl_stdin(&["apply", "--dry-run=server", "-f", "-"], &list.to_string()) {
            Ok(out) if out.matches("(server dry run)").count() == kept.len() => {}
            Ok(out) => problems.push(format!("{profile}: {} objects, output:\n{out}", kept.len())),
            Err(e) => problems.push(format!("{profile}: {e}")),
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems.join("\n").into())
    }
}

/// `kustomize build` of the profile's overlay.
fn kustomize_build(kustomize: &Path, profile: &Profile) -> Result<String, String> {
    let scratch = Scratch::new("overlay");
    // Kustomize wants relative paths from the overlay to the bases.
    let up = "../".repeat(scratch.0.components().count() - 1);
    let deploy = format!(
        "{up}{}",
        repo()
            .join("deploy")
            .display()
            .to_string()
            .trim_start_matches('/')
    );
    let mut text = String::from(
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nresources:\n",
    );
    for r in profile.resources {
        let _ = writeln!(text, "- {deploy}/{r}");
    }
    if !profile.components.is_empty() {
        text.push_str("components:\n");
        for c in profile.components {
            let _ = writeln!(text, "- {deploy}/components/{c}");
        }
    }
    text.push_str(profile.overlay);
    std::fs::write(scratch.0.join("kustomization.yaml"), text).map_err(|e| e.to_string())?;
    output(Command::new(kustomize).arg("build").arg(&scratch.0))
}

fn parse_objects(text: &str, what: &str) -> Result<Vec<Value>, String> {
    serde_saphyr::from_multiple::<Value>(text)
        .map(|docs| docs.into_iter().filter(|d| !d.is_null()).collect())
        .map_err(|e| format!("{what}: {e}"))
}

/// Labels Helm's conventions add that a Kustomize install does not carry.
const HELM_LABELS: [&str; 4] = [
    "app.kubernetes.io/instance",
    "app.kubernetes.io/managed-by",
    "app.kubernetes.io/version",
    "helm.sh/chart",
];

/// An object as the comparison sees it: Helm's bookkeeping labels dropped, the dashboard's JSON
/// parsed (whitespace differs between the two renderings).
fn normalised(mut object: Value) -> Value {
    for labels in ["/metadata/labels", "/spec/template/metadata/labels"] {
        if let Some(Value::Object(map)) = object.pointer_mut(labels) {
            for key in HELM_LABELS {
                map.remove(key);
            }
        }
    }
    if object["kind"] == "ConfigMap"
        && let Some(Value::Object(data)) = object.get_mut("data")
    {
        for value in data.values_mut() {
            if let Some(parsed) = value.as_str().and_then(|s| serde_json::from_str(s).ok()) {
                *value = parsed;
            }
        }
    }
    object
}

fn by_kind_and_name(objects: Vec<Value>) -> BTreeMap<(String, String), Value> {
    objects
        .into_iter()
        .map(|o| {
            let key = (
                o["kind"].as_str().unwrap_or_default().to_owned(),
                o["metadata"]["name"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned(),
            );
            (key, normalised(o))
        })
        .collect()
}

/// The paths where two values differ (for a readable failure).
fn differences(chart: &Value, kust: &Value, path: &str, out: &mut Vec<String>) {
    match (chart, kust) {
        (Value::Object(ours), Value::Object(theirs)) => {
            let keys: BTreeSet<&String> = ours.keys().chain(theirs.keys()).collect();
            for key in keys {
                let here = format!("{path}/{key}");
                match (ours.get(key), theirs.get(key)) {
                    (Some(left), Some(right)) => differences(left, right, &here, out),
                    (left, right) => {
                        out.push(format!("{here}: chart {left:?}, kustomize {right:?}"));
                    }
                }
            }
        }
        (Value::Array(ours), Value::Array(theirs)) if ours.len() == theirs.len() => {
            for (i, (left, right)) in ours.iter().zip(theirs).enumerate() {
                differences(left, right, &format!("{path}/{i}"), out);
            }
        }
        (left, right) if left == right => {}
        (left, right) => out.push(format!("{path}: chart {left}, kustomize {right}")),
    }
}

fn chart_equals_kustomize() -> Result<(), Failed> {
    let (Some(helm), Some(kustomize)) = (helm()?, kustomize()?) else {
        return Ok(());
    };
    let mut problems = Vec::new();
    for profile in PROFILES {
        // The uninstall hook has no place in a Kustomize install (deploy/uninstall is applied
        // on its own afterwards); uninstall_hook compares it with that.
        let chart = helm_template(&helm, profile.values)
            .and_then(|t| parse_objects(&t, "helm template"))
            .map(|objects| objects.into_iter().filter(|o| hook(o).is_none()).collect())
            .map(by_kind_and_name);
        let kust = kustomize_build(&kustomize, profile)
            .and_then(|t| parse_objects(&t, "kustomize build"))
            .map(by_kind_and_name);
        let (chart, kust) = match (chart, kust) {
            (Ok(c), Ok(k)) => (c, k),
            (c, k) => {
                problems.push(format!("{}: {:?} {:?}", profile.name, c.err(), k.err()));
                continue;
            }
        };
        let chart_keys: BTreeSet<_> = chart.keys().collect();
        let kust_keys: BTreeSet<_> = kust.keys().collect();
        if chart_keys != kust_keys {
            problems.push(format!(
                "{}: chart renders {chart_keys:?}, kustomize {kust_keys:?}",
                profile.name
            ));
            continue;
        }
        for (key, object) in &chart {
            let mut diffs = Vec::new();
            differences(object, &kust[key], "", &mut diffs);
            for d in diffs {
                problems.push(format!("{} {}/{}: {d}", profile.name, key.0, key.1));
            }
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems.join("\n").into())
    }
}

fn helm_lint() -> Result<(), Failed> {
    let Some(helm) = helm()? else {
        return Ok(());
    };
    let mut problems = Vec::new();
    for profile in PROFILES {
        let scratch = Scratch::new("lint");
        let file = scratch.0.join("values.yaml");
        std::fs::write(&file, profile.values).map_err(|e| e.to_string())?;
        if let Err(e) = output(
            Command::new(&helm)
                .args(["lint", "--strict", "--namespace", NAMESPACE])
                .arg(chart_dir())
                .arg("--values")
                .arg(&file),
        ) {
            problems.push(format!("{}: {e}", profile.name));
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems.join("\n").into())
    }
}

// ---------------------------------------------------------------------------------------------
// Typed objects and the agent's CLI

fn daemonsets_pass_the_cli() -> Result<(), Failed> {
    let Some(renders) = renders()? else {
        return Ok(());
    };
    let mut problems = Vec::new();
    for (name, text) in renders {
        let objects = parse_objects(&text, &name)?;
        let Some(raw) = objects
            .iter()
            .find(|o| o["kind"] == "DaemonSet" && hook(o).is_none())
        else {
            problems.push(format!("{name}: no DaemonSet"));
            continue;
        };
        let ds: DaemonSet = match typed(raw, &name) {
            Ok(ds) => ds,
            Err(e) => {
                problems.push(e);
                continue;
            }
        };
        let container = &ds
            .spec
            .as_ref()
            .and_then(|s| s.template.spec.as_ref())
            .expect("pod spec")
            .containers[0];
        // As the kubelet passes them: `$(HOST_IP)` and friends filled in.
        let args = support::expanded_args(container);
        match Cli::try_parse_from(std::iter::once("kube-ovn-agent".to_owned()).chain(args)) {
            Ok(Cli {
                command: AgentCommand::Run(_),
                ..
            }) => {}
            Ok(other) => problems.push(format!("{name}: runs {:?}", other.command)),
            Err(e) => problems.push(format!("{name}: the agent rejects the args: {e}")),
        }
        for object in objects.iter().filter(|o| o["kind"] == "ConfigMap") {
            if let Err(e) = typed::<ConfigMap>(object, &name) {
                problems.push(e);
            }
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems.join("\n").into())
    }
}

/// The Helm hook an object is (`helm.sh/hook`), if any.
fn hook(object: &Value) -> Option<&str> {
    object["metadata"]["annotations"]["helm.sh/hook"].as_str()
}

/// The hook's weight.
fn hook_weight(object: &Value) -> i64 {
    object["metadata"]["annotations"]["helm.sh/hook-weight"]
        .as_str()
        .and_then(|w| w.parse().ok())
        .unwrap_or(0)
}

/// The chart's uninstall hook: post-delete (a pre-delete hook would run while the agent still
/// runs, and `detach` refuses then), RBAC before the `DaemonSet` before the waiting Job; the
/// `DaemonSet` is deploy/uninstall's; the Job's only permission is `get` on it and its args are
/// the agent's `uninstall-wait` on it; `uninstall.enabled: false` renders none of it.
fn uninstall_hook() -> Result<(), Failed> {
    let Some(helm) = helm()? else {
        return Ok(());
    };
    let objects = parse_objects(&helm_template(&helm, "")?, "helm template")?;
    let hooks: Vec<&Value> = objects.iter().filter(|o| hook(o).is_some()).collect();
    let mut problems = Vec::new();
    let kinds: Vec<(&str, i64)> = hooks
        .iter()
        .map(|o| (o["kind"].as_str().unwrap_or_default(), hook_weight(o)))
        .collect();
    for (kind, weight) in [
        ("ServiceAccount", -10),
        ("Role", -10),
        ("RoleBinding", -10),
        ("DaemonSet", 0),
        ("Job", 10),
    ] {
        if !kinds.contains(&(kind, weight)) {
            problems.push(format!("no {kind} hook of weight {weight} in {kinds:?}"));
        }
    }
    if hooks.len() != 5 {
        problems.push(format!("expected 5 hook objects, got {kinds:?}"));
    }
    for object in &hooks {
        if hook(object) != Some("post-delete") {
            problems.push(format!("{} is a {:?} hook", object["kind"], hook(object)));
        }
    }
    let of = |kind: &str| hooks.iter().find(|o| o["kind"] == kind).copied();
    let (Some(ds), Some(role), Some(binding), Some(job), Some(sa)) = (
        of("DaemonSet"),
        of("Role"),
        of("RoleBinding"),
        of("Job"),
        of("ServiceAccount"),
    ) else {
        return Err(problems.join("\n").into());
    };
    let ds_name = ds["metadata"]["name"].as_str().unwrap_or_default();
    // deploy/uninstall's DaemonSet, Helm's bookkeeping (labels, hook annotations) aside.
    let mut chart_ds = normalised(ds.clone());
    if let Some(Value::Object(meta)) = chart_ds.get_mut("metadata") {
        meta.remove("annotations");
    }
    let kust_ds = normalised(
        parse_objects(
            &read(&repo().join("deploy/uninstall/daemonset.yaml")),
            "deploy/uninstall",
        )?
        .remove(0),
    );
    let mut diffs = Vec::new();
    differences(&chart_ds, &kust_ds, "", &mut diffs);
    problems.extend(
        diffs
            .into_iter()
            .map(|d| format!("hook DaemonSet vs deploy/uninstall: {d}")),
    );
    let expected_rules = serde_json::json!([{
        "apiGroups": ["apps"], "resources": ["daemonsets"],
        "resourceNames": [ds_name], "verbs": ["get"]
    }]);
    if role["rules"] != expected_rules {
        problems.push(format!(
            "the Role grants {}, not only get on {ds_name}",
            role["rules"]
        ));
    }
    let sa_name = &sa["metadata"]["name"];
    if binding["roleRef"]["name"] != role["metadata"]["name"]
        || binding["subjects"][0]["name"] != *sa_name
        || job["spec"]["template"]["spec"]["serviceAccountName"] != *sa_name
    {
        problems.push("the RoleBinding does not bind the Role to the Job's account".into());
    }
    problems.extend(hook_args_problems(ds, job, ds_name));
    let off = parse_objects(
        &helm_template(&helm, "uninstall: {enabled: false}\n")?,
        "helm template",
    )?;
    if off.iter().any(|o| hook(o).is_some()) {
        problems.push("uninstall.enabled: false still renders hooks".into());
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems.join("\n").into())
    }
}

/// What is wrong with the hook's commands: the Job must run `uninstall-wait` on the hook's
/// `DaemonSet`, whose init container must run `detach --if-present`.
fn hook_args_problems(ds: &Value, job: &Value, ds_name: &str) -> Vec<String> {
    let mut problems = Vec::new();
    let args: Vec<String> = job["spec"]["template"]["spec"]["containers"][0]["args"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|a| a.as_str().map(str::to_owned))
        .collect();
    match Cli::try_parse_from(std::iter::once("kube-ovn-agent".to_owned()).chain(args)) {
        Ok(Cli {
            command: AgentCommand::UninstallWait(wait),
            ..
        }) if wait.daemonset.to_string() == format!("{NAMESPACE}/{ds_name}") => {}
        other => problems.push(format!(
            "the Job does not run uninstall-wait on {ds_name}: {other:?}"
        )),
    }
    let init: Vec<String> = ds["spec"]["template"]["spec"]["initContainers"][0]["args"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|a| a.as_str().map(str::to_owned))
        .collect();
    if !matches!(
        Cli::try_parse_from(std::iter::once("kube-ovn-agent".to_owned()).chain(init)),
        Ok(Cli { command: AgentCommand::Detach(ref d), .. }) if d.if_present && !d.force
    ) {
        problems.push("the DaemonSet's init container does not run detach --if-present".into());
    }
    problems
}

/// The hook's RBAC objects and `DaemonSet` applied on the real kube-apiserver (no controller
/// manager runs there, so the test plays the `DaemonSet` controller by writing its status): the
/// agent's `uninstall-wait`, with a token of the hook's own service account, keeps waiting while
/// not every node is done, times out with the progress, and returns once all are; the account can
/// do nothing else.
fn uninstall_wait_on_real_api_server() -> Result<(), Failed> {
    use kube_ovn_testkit::control_plane::{Binaries, ControlPlane, Options};
    let binaries = match Binaries::from_env() {
        Ok(binaries) => binaries,
        Err(e) => {
            missing("a real kube-apiserver", &e.to_string())?;
            return Ok(());
        }
    };
    let Some(helm) = helm()? else {
        return Ok(());
    };
    let hooks: Vec<Value> = parse_objects(&helm_template(&helm, "")?, "helm template")?
        .into_iter()
        .filter(|o| hook(o).is_some() && o["kind"] != "Job")
        .collect();
    let plane = ControlPlane::start(Options::new(binaries)).map_err(|e| e.to_string())?;
    let list = serde_json::json!({"apiVersion": "v1", "kind": "List", "items": hooks});
    plane
        .kubectl_stdin(&["apply", "-f", "-"], &list.to_string())
        .map_err(|e| e.to_string())?;
    let name = "kube-ovn-ebpf-uninstall";
    let token = plane
        .token_for_service_account(NAMESPACE, name)
        .map_err(|e| e.to_string())?;
    let kubeconfig = plane
        .kubeconfig_with_token("uninstall-hook", &token)
        .map_err(|e| e.to_string())?;
    let wait = |timeout: &str| {
        Command::new(env!("CARGO_BIN_EXE_kube-ovn-agent"))
            .args([
                "uninstall-wait",
                &format!("{NAMESPACE}/{name}"),
                "--timeout",
                timeout,
            ])
            .env("KUBECONFIG", &kubeconfig)
            .env_remove("KUBERNETES_SERVICE_HOST")
            .output()
            .map_err(|e| e.to_string())
    };
    let set_status = |ready: u32| {
        let status = serde_json::json!({"status": {
            "observedGeneration": 1, "desiredNumberScheduled": 2, "currentNumberScheduled": 2,
            "updatedNumberScheduled": 2, "numberReady": ready, "numberMisscheduled": 0
        }});
        plane
            .kubectl(&[
                "-n",
                NAMESPACE,
                "patch",
                "daemonset",
                name,
                "--subresource=status",
                "--type=merge",
                "-p",
                &status.to_string(),
            ])
            .map_err(|e| e.to_string())
    };
    let mut problems = Vec::new();
    set_status(1)?;
    let out = wait("3s")?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    if out.status.code() != Some(1) || !stderr.contains("1 of 2 nodes detached") {
        problems.push(format!("one node of two: {:?} {stderr}", out.status.code()));
    }
    set_status(2)?;
    let out = wait("30s")?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() || !stdout.contains("detached on all 2 nodes") {
        problems.push(format!(
            "every node: {:?} {stdout}{}",
            out.status.code(),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    // Least privilege: the account may read that DaemonSet and nothing else.
    let user = format!("system:serviceaccount:{NAMESPACE}:{name}");
    for (verb, what, allowed) in [
        ("get", format!("daemonsets.apps/{name}"), true),
        ("get", "daemonsets.apps/kube-ovn-ebpf".to_owned(), false),
        ("list", "daemonsets.apps".to_owned(), false),
        ("delete", format!("daemonsets.apps/{name}"), false),
        ("get", "pods".to_owned(), false),
    ] {
        let out = plane
            .kubectl_command(&["auth", "can-i", verb, &what, "-n", NAMESPACE, "--as", &user])
            .output()
            .map_err(|e| e.to_string())?;
        let answer = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        if (answer == "yes") != allowed {
            problems.push(format!("can-i {verb} {what}: {answer}"));
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems.join("\n").into())
    }
}

/// Values `helm template` must refuse, and what its error must say.
const REFUSED: &[(&str, &str)] = &[
    ("mode: enforcing\n", "mode"),
    ("kernelProfile: kernel-4.19\n", "kernelProfile"),
    ("kubeProxyMode: nftables\n", "kubeProxyMode"),
    ("log: {format: logfmt}\n", "format"),
    (
        "serviceClusterIPRange: 10.96.0.0\n",
        "serviceClusterIPRange",
    ),
    ("interfaces: {eth0: uplink}\n", "eth0"),
    ("extraArgs: [\"run\"]\n", "extraArgs"),
    ("modes: enforce\n", "modes"),
    ("uninstall: {timeout: 5}\n", "timeout"),
    ("uninstall: {timeout: 5d}\n", "timeout"),
    (
        "metrics: {serviceMonitor: {enabled: true}, podMonitor: {enabled: true}}\n",
        "enable one",
    ),
];

fn bad_values_refused() -> Result<(), Failed> {
    let Some(helm) = helm()? else {
        return Ok(());
    };
    let mut problems = Vec::new();
    for (values, needle) in REFUSED {
        match helm_template(&helm, values) {
            Ok(_) => problems.push(format!("accepted {values:?}")),
            Err(e) if e.contains(needle) => {}
            Err(e) => problems.push(format!("{values:?} refused without naming {needle}: {e}")),
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems.join("\n").into())
    }
}

fn chart_version_matches() -> Result<(), Failed> {
    let cargo = read(&repo().join("Cargo.toml"));
    let workspace = cargo
        .lines()
        .find_map(|l| l.trim().strip_prefix("version = "))
        .map(|v| v.trim_matches('"').to_owned())
        .ok_or("no workspace version")?;
    let chart: Value = serde_saphyr::from_str(&read(&chart_dir().join("Chart.yaml")))
        .map_err(|e| e.to_string())?;
    let base: Value = serde_saphyr::from_str(&read(&repo().join("deploy/base/kustomization.yaml")))
        .map_err(|e| e.to_string())?;
    let mut problems = Vec::new();
    for (what, got) in [
        ("Chart.yaml version", &chart["version"]),
        ("Chart.yaml appVersion", &chart["appVersion"]),
        ("deploy/base image tag", &base["images"][0]["newTag"]),
    ] {
        if got.as_str() != Some(workspace.as_str()) {
            problems.push(format!("{what} is {got}, the workspace {workspace}"));
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems.join("\n").into())
    }
}

// ---------------------------------------------------------------------------------------------
// Alerts and the dashboard

fn rules_file() -> PathBuf {
    chart_dir().join("files/kube-ovn-ebpf.rules.yaml")
}

fn dashboard_file() -> PathBuf {
    chart_dir().join("files/kube-ovn-ebpf-dashboard.json")
}

fn promtool_rules() -> Result<(), Failed> {
    let Some(promtool) = promtool()? else {
        return Ok(());
    };
    output(
        Command::new(&promtool)
            .args(["check", "rules"])
            .arg(rules_file()),
    )?;
    let tests = monitoring_dir().join("rules/kube-ovn-ebpf.rules.test.yaml");
    let report = output(
        Command::new(&promtool)
            .current_dir(tests.parent().expect("rules dir"))
            .args(["test", "rules"])
            .arg(&tests),
    )?;
    // Every alert has at least one firing case in the unit tests.
    let rules: Value = serde_saphyr::from_str(&read(&rules_file())).map_err(|e| e.to_string())?;
    let test_text = read(&tests);
    let mut untested = Vec::new();
    for rule in rules["groups"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|g| g["rules"].as_array().into_iter().flatten())
    {
        let alert = rule["alert"].as_str().unwrap_or_default();
        if !test_text.contains(&format!("alertname: {alert}\n")) {
            untested.push(alert.to_owned());
        }
    }
    if !untested.is_empty() {
        return Err(format!("alerts without a unit test: {untested:?}").into());
    }
    if !report.contains("SUCCESS") {
        return Err(format!("promtool test rules: {report}").into());
    }
    Ok(())
}

fn monitoring_copies_equal() -> Result<(), Failed> {
    let mut problems = Vec::new();
    let rules: Value = serde_saphyr::from_str(&read(&rules_file())).map_err(|e| e.to_string())?;
    let cr: Value =
        serde_saphyr::from_str(&read(&monitoring_dir().join("rules/prometheusrule.yaml")))
            .map_err(|e| e.to_string())?;
    if cr["spec"] != rules {
        problems.push(
            "deploy/monitoring/rules/prometheusrule.yaml's spec differs from \
             charts/kube-ovn-ebpf/files/kube-ovn-ebpf.rules.yaml"
                .to_owned(),
        );
    }
    if read(&monitoring_dir().join("dashboard/kube-ovn-ebpf.json")) != read(&dashboard_file()) {
        problems.push(
            "deploy/monitoring/dashboard/kube-ovn-ebpf.json differs from \
             charts/kube-ovn-ebpf/files/kube-ovn-ebpf-dashboard.json"
                .to_owned(),
        );
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems.join("\n").into())
    }
}

/// Sample names the agent's registry exposes, every family populated in process. The datapath
/// counter family (`kovn_datapath_packets`) is only encoded while a real pinned counter map is
/// open, which needs a loaded program; its name is taken from the collector's source instead.
fn exported_names() -> BTreeSet<String> {
    let metrics = Metrics::new();
    metrics.error(ErrorKind::MapFull);
    metrics.sync_duration.observe(0.001);
    metrics.event_to_write.observe(0.001);
    metrics
        .live
        .map_sizes
        .lock()
        .expect("map sizes")
        .push(("kovn_subnets4", 1));
    metrics.live.source.lock().expect("source").kinds.insert(
        "Service",
        KindStatus {
            last_event_unix: Some(1),
            ..KindStatus::default()
        },
    );
    metrics.set_build_info("0123456789abcdef");
    metrics.set_mode(false);
    metrics
        .live
        .interfaces
        .lock()
        .expect("interfaces")
        .push(InterfaceState::default());
    let mut names: BTreeSet<String> = metrics
        .render()
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| l.split(['{', ' ']).next())
        .map(str::to_owned)
        .collect();
    let source = read(&repo().join("kube-ovn-agent/src/metrics.rs"));
    // The collector's family: its name, its help, then its type.
    let metric_type = source
        .split("\"kovn_datapath_packets\",")
        .nth(1)
        .and_then(|rest| rest.split("MetricType::").nth(1));
    if metric_type.is_some_and(|t| t.starts_with("Counter")) {
        names.insert("kovn_datapath_packets_total".to_owned());
    }
    names
}

/// `PromQL` words that are neither metrics nor followed by `(`: operators, modifiers and
/// aggregations written as `sum by (…) (…)`.
const PROMQL_WORDS: [&str; 23] = [
    "and",
    "or",
    "unless",
    "bool",
    "offset",
    "inf",
    "nan",
    "atan2",
    "sum",
    "avg",
    "min",
    "max",
    "count",
    "stddev",
    "stdvar",
    "topk",
    "bottomk",
    "quantile",
    "count_values",
    "group",
    "limitk",
    "limit_ratio",
    "start",
];

/// Words followed by a parenthesised list of label names.
const PROMQL_GROUPING: [&str; 6] = [
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
];

/// The index just past the first `close` at or after `from` (the end if there is none).
fn past(chars: &[char], from: usize, close: char) -> usize {
    chars[from.min(chars.len())..]
        .iter()
        .position(|&c| c == close)
        .map_or(chars.len(), |p| from + p + 1)
}

/// The index of the first char at or after `from` that `keep` refuses.
fn skip_while(chars: &[char], from: usize, keep: impl Fn(char) -> bool) -> usize {
    chars[from..]
        .iter()
        .position(|&c| !keep(c))
        .map_or(chars.len(), |p| from + p)
}

/// Metric names in a `PromQL` expression, with the label matchers written on each.
fn promql_metrics(expr: &str) -> Vec<(String, Vec<(String, String)>)> {
    let chars: Vec<char> = expr.chars().collect();
    let mut out: Vec<(String, Vec<(String, String)>)> = Vec::new();
    let mut i = 0;
    let mut last_was_metric = false;
    while i < chars.len() {
        let c = chars[i];
        let metric_before = std::mem::replace(&mut last_was_metric, false);
        if c == '"' || c == '\'' || c == '`' {
            i += 1;
            while i < chars.len() && chars[i] != c {
                i += if chars[i] == '\\' { 2 } else { 1 };
            }
            i += 1;
        } else if c == '[' {
            i = past(&chars, i, ']');
        } else if c == '{' {
            let end = past(&chars, i, '}');
            let body: String = chars[i + 1..end.saturating_sub(1)].iter().collect();
            if metric_before && let Some(last) = out.last_mut() {
                last.1 = label_matchers(&body);
            }
            i = end;
        } else if c.is_ascii_digit() || c == '.' {
            i = skip_while(&chars, i, |c| c.is_ascii_alphanumeric() || c == '.');
        } else if c == '$' {
            i = skip_while(&chars, i + 1, |c| c.is_ascii_alphanumeric() || c == '_');
        } else if c.is_ascii_alphabetic() || c == '_' || c == ':' {
            let start = i;
            i = skip_while(&chars, i, |c| {
                c.is_ascii_alphanumeric() || c == '_' || c == ':'
            });
            let word: String = chars[start..i].iter().collect();
            let next = skip_while(&chars, i, char::is_whitespace);
            let call = chars.get(next) == Some(&'(');
            if PROMQL_GROUPING.contains(&word.as_str()) {
                if call {
                    i = past(&chars, next, ')');
                }
            } else if !call && !PROMQL_WORDS.contains(&word.as_str()) {
                out.push((word, Vec::new()));
                last_was_metric = true;
            }
        } else {
            last_was_metric = metric_before && c.is_whitespace();
            i += 1;
        }
    }
    out
}

/// `a="x", b=~"y|z"` → (label, value) pairs; a regex's alternatives are listed one by one.
fn label_matchers(body: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for part in body.split(',') {
        let Some(op) = part.find(['=', '!']) else {
            continue;
        };
        let label = part[..op].trim().to_owned();
        let rest = &part[op..];
        if rest.starts_with('!') {
            continue; // negative matchers name nothing that must exist
        }
        let value = rest.trim_start_matches(['=', '~']).trim().trim_matches('"');
        for alternative in value.split('|') {
            out.push((label.clone(), alternative.to_owned()));
        }
    }
    out
}

/// Every `PromQL` expression in the rules and the dashboard, with where it came from.
fn queries() -> Result<Vec<(String, String)>, String> {
    let mut out = Vec::new();
    let rules: Value = serde_saphyr::from_str(&read(&rules_file())).map_err(|e| e.to_string())?;
    for rule in rules["groups"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|g| g["rules"].as_array().into_iter().flatten())
    {
        let name = rule["alert"]
            .as_str()
            .or(rule["record"].as_str())
            .unwrap_or("?");
        out.push((
            format!("rule {name}"),
            rule["expr"].as_str().unwrap_or_default().to_owned(),
        ));
    }
    let dashboard: Value =
        serde_json::from_str(&read(&dashboard_file())).map_err(|e| e.to_string())?;
    walk(&dashboard, "dashboard", &mut out);
    Ok(out)
}

/// Collects the dashboard's `PromQL`: panel `expr`s, and the metric of `label_values(METRIC, LABEL)`
/// template variables.
fn walk(v: &Value, path: &str, out: &mut Vec<(String, String)>) {
    match v {
        Value::Object(map) => {
            for (k, child) in map {
                let here = format!("{path}/{k}");
                match (k.as_str(), child) {
                    ("expr", Value::String(e)) => out.push((here, e.clone())),
                    // Template variables: label_values(METRIC, LABEL) names one metric.
                    ("query" | "definition", Value::String(q)) => {
                        if let Some(args) = q.strip_prefix("label_values(") {
                            let metric = args.split(',').next().unwrap_or_default();
                            out.push((here, metric.trim().to_owned()));
                        }
                    }
                    _ => walk(child, &here, out),
                }
            }
        }
        Value::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                walk(item, &format!("{path}/{i}"), out);
            }
        }
        _ => {}
    }
}

/// Prometheus's own series, which the agent does not export.
const PROMETHEUS_SERIES: [&str; 1] = ["up"];

fn check_names(exported: &BTreeSet<String>, queries: &[(String, String)]) -> (usize, Vec<String>) {
    let mut problems = Vec::new();
    let mut seen = 0;
    for (origin, expr) in queries {
        for (metric, matchers) in promql_metrics(expr) {
            seen += 1;
            if !exported.contains(&metric) && !PROMETHEUS_SERIES.contains(&metric.as_str()) {
                problems.push(format!("{origin}: {metric} is not exported by the agent"));
            }
            if metric == "kovn_datapath_packets_total" {
                for (label, value) in matchers.iter().filter(|(l, _)| l == "counter") {
                    if !counter::NAMES.contains(&value.as_str()) {
                        problems.push(format!("{origin}: no datapath counter {label}={value:?}"));
                    }
                }
            }
        }
    }
    (seen, problems)
}

fn queries_name_real_metrics() -> Result<(), Failed> {
    let exported = exported_names();
    let queries = queries()?;
    let (seen, problems) = check_names(&exported, &queries);
    let mut problems = problems;
    if queries.len() < 20 || seen < queries.len() {
        problems.push(format!(
            "{} queries, {seen} metric references: the extraction is broken",
            queries.len()
        ));
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(format!("exported: {exported:?}\n{}", problems.join("\n")).into())
    }
}

fn extractor_catches() -> Result<(), Failed> {
    let exported = exported_names();
    let got = promql_metrics(
        r#"histogram_quantile(0.99, sum by (le, node) (rate(kovn_sync_duration_seconds_bucket{node=~"$node"}[$__rate_interval]))) > 1e3
           and on (instance) kovn_bogus_total{kind="x"} offset 5m"#,
    );
    let names: Vec<&str> = got.iter().map(|(n, _)| n.as_str()).collect();
    if names != ["kovn_sync_duration_seconds_bucket", "kovn_bogus_total"] {
        return Err(format!("extracted {got:?}").into());
    }
    let bad = [(
        "test".to_owned(),
        r#"rate(kovn_datapath_packets_total{counter=~"marked|no_such"}[5m]) + kovn_bogus_total"#
            .to_owned(),
    )];
    let (_, problems) = check_names(&exported, &bad);
    if problems.len() != 2 {
        return Err(format!("a made-up metric or counter went unnoticed: {problems:?}").into());
    }
    Ok(())
}

/// GitHub's anchor for a Markdown heading, as kube-ovn-agent/tests/deploy.rs computes it.
fn slug(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter_map(|c| match c {
            ' ' => Some('-'),
            c if c.is_alphanumeric() || c == '-' || c == '_' => Some(c),
            _ => None,
        })
        .collect()
}

fn alert_links_exist() -> Result<(), Failed> {
    let text = read(&rules_file());
    let mut problems = Vec::new();
    let mut checked = 0;
    for (i, _) in text.match_indices("docs/") {
        let link: String = text[i..]
            .chars()
            .take_while(|c| c.is_alphanumeric() || "/-_.#".contains(*c))
            .collect();
        let link = link.trim_end_matches('.');
        let Some((file, anchor)) = link.split_once('#') else {
            continue;
        };
        checked += 1;
        let Ok(doc) = std::fs::read_to_string(repo().join(file)) else {
            problems.push(format!("{link}: no such file"));
            continue;
        };
        let found = doc
            .lines()
            .filter_map(|l| l.strip_prefix('#'))
            .any(|h| slug(h.trim_start_matches('#')) == anchor);
        if !found {
            problems.push(format!("{link}: no such heading"));
        }
    }
    if checked == 0 {
        problems.push("no doc links in the rules: the scan is broken".into());
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems.join("\n").into())
    }
}

/// deploy/monitoring/ is left to this file by tests/deploy.rs: each YAML file in it must be a
/// kustomization, a resource one lists (so the comparison with the chart renders it), or the
/// rules' unit tests.
fn monitoring_files_used() -> Result<(), Failed> {
    let mut problems = Vec::new();
    let mut stack = vec![monitoring_dir()];
    while let Some(dir) = stack.pop() {
        let listed: BTreeSet<String> = std::fs::read_to_string(dir.join("kustomization.yaml"))
            .ok()
            .and_then(|t| serde_saphyr::from_str::<Value>(&t).ok())
            .map(|k| {
                k["resources"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|r| r.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default();
        for entry in std::fs::read_dir(&dir)
            .map_err(|e| e.to_string())?
            .flatten()
        {
            let path = entry.path();
            let name = entry.file_name().to_string_lossy().into_owned();
            if path.is_dir() {
                if !listed.contains(&name)
                    && !PROFILES
                        .iter()
                        .flat_map(|p| p.resources)
                        .any(|r| repo().join("deploy").join(r) == path)
                {
                    problems.push(format!("{}: rendered by no profile", path.display()));
                }
                stack.push(path);
            } else if Path::new(&name)
                .extension()
                .is_some_and(|e| e == "yaml" || e == "yml")
                && name != "kustomization.yaml"
                && name != "kube-ovn-ebpf.rules.test.yaml"
                && !listed.contains(&name)
            {
                problems.push(format!("{}: listed by no kustomization", path.display()));
            }
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems.join("\n").into())
    }
}
