//! Keeps deploy/ honest, without a cluster or root: every manifest parses into its typed
//! Kubernetes object with no field the type does not know; the `ClusterRole` grants exactly what
//! the agent's watchers read (derived from the code); the `DaemonSet`'s args pass the agent's own
//! CLI parser and its probes hit the metrics port; the Kustomize base and components list every
//! file and their patches apply; the Containerfile builds with the toolchain pins the repository
//! uses. When `kubectl` is installed, its embedded Kustomize renders the base and each component
//! and must produce what these tests check.

mod support;

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Write as _,
    path::{Path, PathBuf},
    process::Command,
};

use clap::Parser as _;
use k8s_openapi::api::{
    apps::v1::DaemonSet,
    core::v1::{Node, Service, ServiceAccount},
    rbac::v1::{ClusterRole, ClusterRoleBinding},
};
use kube_ovn_agent::{
    cli::{Cli, Command as AgentCommand, Mode, RunArgs},
    source::kube::{KubeOptions, kinds},
};
use kube_ovn_testkit::typed::typed;
use libtest_mimic::{Arguments, Failed, Trial};
use serde::Deserialize;
use serde_json::{Value, json};

type Test = fn() -> Result<(), Failed>;

fn main() {
    let args = Arguments::from_args();
    let tests: Vec<(&str, Test)> = vec![
        (
            "every_manifest_parses_into_its_typed_object_without_unknown_fields",
            manifests_are_typed,
        ),
        ("the_unknown_field_check_catches_a_typo", typo_is_caught),
        (
            "cluster_role_grants_exactly_what_the_watchers_read",
            cluster_role_matches_the_code,
        ),
        (
            "binding_ties_the_role_to_the_daemonsets_service_account",
            binding_matches,
        ),
        (
            "daemonset_args_pass_the_cli_and_probes_use_the_metrics_port",
            daemonset_matches_the_cli,
        ),
        (
            "daemonset_runs_everywhere_unprivileged_with_the_host_mounts",
            daemonset_shape,
        ),
        (
            "kustomizations_list_every_file_and_components_patch_the_daemonset",
            kustomize_layout,
        ),
        (
            "components_give_valid_daemonsets_alone_and_combined",
            components_apply,
        ),
        (
            "kubectl_kustomize_renders_what_the_tests_check",
            kubectl_agrees,
        ),
        (
            "containerfile_uses_the_repositorys_pins_and_members",
            containerfile_pins,
        ),
        (
            "doc_links_in_the_code_and_docs_reach_a_heading",
            doc_anchors_exist,
        ),
        (
            "version_names_the_commit_the_binary_was_built_from",
            version_names_the_commit,
        ),
        (
            "uninstall_daemonset_detaches_the_agents_root_with_the_agents_privileges",
            uninstall_matches_the_agent,
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

fn deploy() -> PathBuf {
    repo().join("deploy")
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The YAML documents of a file, as untyped values.
fn documents(path: &Path) -> Vec<Value> {
    serde_saphyr::from_multiple::<Value>(&read(path))
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .into_iter()
        .filter(|d| !d.is_null())
        .collect()
}

fn document(path: &Path) -> Value {
    let mut docs = documents(path);
    assert_eq!(docs.len(), 1, "{}: one document expected", path.display());
    docs.remove(0)
}

/// Checks one Kubernetes object by its apiVersion/kind; `Ok(false)` for kinds k8s-openapi does
/// not type (Kube-OVN's Subnet in the example cluster).
fn check_object(raw: &Value, what: &str) -> Result<bool, String> {
    let api_version = raw["apiVersion"].as_str().unwrap_or_default();
    let kind = raw["kind"].as_str().unwrap_or_default();
    match (api_version, kind) {
        ("v1", "ServiceAccount") => typed::<ServiceAccount>(raw, what).map(drop),
        ("v1", "Node") => typed::<Node>(raw, what).map(drop),
        ("v1", "Service") => typed::<Service>(raw, what).map(drop),
        ("rbac.authorization.k8s.io/v1", "ClusterRole") => {
            typed::<ClusterRole>(raw, what).map(drop)
        }
        ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding") => {
            typed::<ClusterRoleBinding>(raw, what).map(drop)
        }
        ("apps/v1", "DaemonSet") => typed::<DaemonSet>(raw, what).map(drop),
        ("kubeovn.io/v1", "Subnet") => return Ok(false),
        _ => Err(format!("{what}: no typed check for {api_version} {kind}")),
    }?;
    Ok(true)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Kustomization {
    api_version: String,
    kind: String,
    #[serde(default)]
    namespace: Option<String>,
    #[serde(default)]
    resources: Vec<String>,
    #[serde(default)]
    components: Vec<String>,
    #[serde(default)]
    images: Vec<Image>,
    #[serde(default)]
    patches: Vec<PatchRef>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Image {
    name: String,
    #[serde(default)]
    new_name: Option<String>,
    #[serde(default)]
    new_tag: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PatchRef {
    path: String,
    target: Target,
}

#[derive(Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
struct Target {
    group: String,
    version: String,
    kind: String,
    name: String,
}

/// One RFC 6902 operation.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PatchOp {
    op: String,
    path: String,
    #[serde(default)]
    value: Option<Value>,
}

fn kustomization(dir: &Path) -> Kustomization {
    let path = dir.join("kustomization.yaml");
    serde_saphyr::from_str(&read(&path)).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn components() -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(deploy().join("components"))
        .expect("deploy/components")
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.is_dir())
        .collect();
    dirs.sort();
    dirs
}

fn base_dir() -> PathBuf {
    deploy().join("base")
}

/// The base's resources, untyped, in kustomization order.
fn base_objects() -> Vec<Value> {
    let base = kustomization(&base_dir());
    base.resources
        .iter()
        .flat_map(|r| documents(&base_dir().join(r)))
        .collect()
}

fn base_daemonset() -> Value {
    base_objects()
        .into_iter()
        .find(|o| o["kind"] == "DaemonSet")
        .expect("a DaemonSet in the base")
}

/// JSON Pointer (RFC 6901) tokens.
fn pointer_tokens(path: &str) -> Vec<String> {
    path.split('/')
        .skip(1)
        .map(|t| t.replace("~1", "/").replace("~0", "~"))
        .collect()
}

/// Applies RFC 6902 operations (add, remove, replace, test) as Kustomize does.
fn apply_patch(doc: &mut Value, ops: &[PatchOp]) -> Result<(), String> {
    for op in ops {
        let mut tokens = pointer_tokens(&op.path);
        let last = tokens
            .pop()
            .ok_or_else(|| format!("{}: empty path", op.path))?;
        let parent_path = tokens.iter().fold(String::new(), |mut p, t| {
            p.push('/');
            p.push_str(t);
            p
        });
        let parent = doc
            .pointer_mut(&parent_path)
            .ok_or_else(|| format!("{}: no parent {parent_path}", op.path))?;
        let value = || {
            op.value
                .clone()
                .ok_or_else(|| format!("{} {}: no value", op.op, op.path))
        };
        match (op.op.as_str(), parent) {
            ("test", parent) => {
                let current = match parent {
                    Value::Array(items) => last.parse::<usize>().ok().and_then(|i| items.get(i)),
                    Value::Object(map) => map.get(&last),
                    _ => None,
                };
                if current != Some(&value()?) {
                    return Err(format!("test {} failed: found {current:?}", op.path));
                }
            }
            ("add", Value::Array(items)) => {
                let at = if last == "-" {
                    items.len()
                } else {
                    last.parse()
                        .map_err(|_| format!("{}: bad index", op.path))?
                };
                if at > items.len() {
                    return Err(format!("{}: index out of range", op.path));
                }
                items.insert(at, value()?);
            }
            ("add", Value::Object(map)) => {
                map.insert(last, value()?);
            }
            ("replace", Value::Array(items)) => {
                let slot = last
                    .parse::<usize>()
                    .ok()
                    .and_then(|i| items.get_mut(i))
                    .ok_or_else(|| format!("{}: nothing to replace", op.path))?;
                *slot = value()?;
            }
            ("replace", Value::Object(map)) => {
                let slot = map
                    .get_mut(&last)
                    .ok_or_else(|| format!("{}: nothing to replace", op.path))?;
                *slot = value()?;
            }
            ("remove", Value::Array(items)) => {
                let i = last
                    .parse::<usize>()
                    .ok()
                    .filter(|i| *i < items.len())
                    .ok_or_else(|| format!("{}: nothing to remove", op.path))?;
                items.remove(i);
            }
            ("remove", Value::Object(map)) => {
                map.remove(&last)
                    .ok_or_else(|| format!("{}: nothing to remove", op.path))?;
            }
            (other, _) => return Err(format!("{other} {}: unsupported here", op.path)),
        }
    }
    Ok(())
}

/// The base `DaemonSet` with these components' patches applied in order.
fn patched_daemonset(components: &[PathBuf]) -> Result<Value, String> {
    let mut ds = base_daemonset();
    for dir in components {
        let k = kustomization(dir);
        for patch in &k.patches {
            let ops: Vec<PatchOp> = serde_saphyr::from_str(&read(&dir.join(&patch.path)))
                .map_err(|e| format!("{}/{}: {e}", dir.display(), patch.path))?;
            apply_patch(&mut ds, &ops).map_err(|e| format!("{}: {e}", dir.display()))?;
        }
    }
    Ok(ds)
}

fn agent_container(ds: &DaemonSet) -> &k8s_openapi::api::core::v1::Container {
    let pod = ds
        .spec
        .as_ref()
        .and_then(|s| s.template.spec.as_ref())
        .expect("pod spec");
    assert_eq!(pod.containers.len(), 1, "one container");
    &pod.containers[0]
}

/// The agent's own parse of the container's args.
fn run_args(ds: &DaemonSet) -> Result<Box<RunArgs>, String> {
    let container = agent_container(ds);
    if container.command.is_some() {
        return Err("the image's entrypoint is the agent: set args, not command".into());
    }
    let args = support::expanded_args(container);
    let cli = Cli::try_parse_from(std::iter::once("kube-ovn-agent".to_owned()).chain(args))
        .map_err(|e| format!("the agent's CLI rejects the DaemonSet's args: {e}"))?;
    match cli.command {
        AgentCommand::Run(run) => Ok(run),
        other => Err(format!("the DaemonSet must `run` the agent, not {other:?}")),
    }
}

fn capabilities(ds: &DaemonSet) -> (BTreeSet<String>, BTreeSet<String>) {
    let caps = agent_container(ds)
        .security_context
        .as_ref()
        .and_then(|s| s.capabilities.as_ref())
        .expect("capabilities");
    let set = |v: &Option<Vec<String>>| v.iter().flatten().cloned().collect::<BTreeSet<_>>();
    (set(&caps.add), set(&caps.drop))
}

/// What the API server's validation would reject about the container's security context.
fn security_problems(ds: &DaemonSet) -> Vec<String> {
    let sc = agent_container(ds)
        .security_context
        .as_ref()
        .expect("securityContext");
    let mut problems = Vec::new();
    if sc.privileged == Some(true) {
        problems.push("privileged".to_owned());
    }
    let (add, drop) = capabilities(ds);
    // Pod validation: allowPrivilegeEscalation false with CAP_SYS_ADMIN (or privileged) is
    // rejected.
    if sc.allow_privilege_escalation == Some(false) && add.contains("SYS_ADMIN") {
        problems.push("allowPrivilegeEscalation: false together with SYS_ADMIN".into());
    }
    if !drop.contains("ALL") {
        problems.push("capabilities are not dropped to a known set".into());
    }
    problems
}

fn manifests_are_typed() -> Result<(), Failed> {
    let mut problems = Vec::new();
    let mut checked = 0;
    let base = kustomization(&base_dir());
    for resource in &base.resources {
        let path = base_dir().join(resource);
        for doc in documents(&path) {
            match check_object(&doc, &path.display().to_string()) {
                Ok(true) => checked += 1,
                Ok(false) => problems.push(format!("{}: untyped kind in the base", path.display())),
                Err(e) => problems.push(e),
            }
        }
    }
    // The example cluster's Kubernetes objects must be real object shapes too.
    let example = deploy().join("examples/cluster.yaml");
    for (i, doc) in documents(&example).iter().enumerate() {
        match check_object(doc, &format!("{} document {i}", example.display())) {
            Ok(typed) => checked += usize::from(typed),
            Err(e) => problems.push(e),
        }
    }
    // Each component's result is a DaemonSet without unknown fields.
    for dir in components() {
        match patched_daemonset(std::slice::from_ref(&dir)) {
            Ok(ds) => match typed::<DaemonSet>(&ds, &dir.display().to_string()) {
                Ok(_) => checked += 1,
                Err(e) => problems.push(e),
            },
            Err(e) => problems.push(e),
        }
    }
    if problems.is_empty() && checked >= 4 {
        Ok(())
    } else {
        Err(format!(
            "{checked} objects checked; problems:\n{}",
            problems.join("\n")
        )
        .into())
    }
}

fn typo_is_caught() -> Result<(), Failed> {
    let mut misspelt = base_daemonset();
    misspelt["spec"]["template"]["spec"]["containers"][0]["securityContext"]["privilged"] =
        json!(true);
    let error = typed::<DaemonSet>(&misspelt, "typo")
        .err()
        .unwrap_or_default();
    if !error.contains("securityContext.privilged: unknown field") {
        return Err(format!("a misspelt field went unnoticed: {error:?}").into());
    }
    let mut misplaced = base_daemonset();
    misplaced["spec"]["template"]["hostNetwork"] = json!(true);
    let error = typed::<DaemonSet>(&misplaced, "misplaced")
        .err()
        .unwrap_or_default();
    if !error.contains("spec.template.hostNetwork: unknown field") {
        return Err(format!("a misplaced field went unnoticed: {error:?}").into());
    }
    let mut wrong_type = base_daemonset();
    wrong_type["spec"]["template"]["spec"]["hostNetwork"] = json!("yes");
    if typed::<DaemonSet>(&wrong_type, "wrong type").is_ok() {
        return Err("a string where a boolean belongs went unnoticed".into());
    }
    Ok(())
}

/// Verbs a watcher needs (list, watch) plus get, as design §4 specifies for each kind read.
const VERBS: [&str; 3] = ["get", "list", "watch"];

fn cluster_role_matches_the_code() -> Result<(), Failed> {
    let raw = document(&base_dir().join("clusterrole.yaml"));
    let role: ClusterRole = typed(&raw, "clusterrole.yaml")?;
    // Every kind a kube source can watch, TPROXY's Pods included.
    let options = KubeOptions {
        watch_pods: true,
        ..KubeOptions::new("n1")
    };
    let expected: BTreeSet<(String, String, String)> = kinds(&options)
        .into_iter()
        .flat_map(|kind| {
            let (group, resource) = kind.api_resource();
            VERBS
                .iter()
                .map(move |verb| (group.to_owned(), resource.to_owned(), (*verb).to_owned()))
        })
        .collect();
    let mut granted = BTreeSet::new();
    for rule in role.rules.iter().flatten() {
        if rule.resource_names.is_some() || rule.non_resource_urls.is_some() {
            return Err(format!("unexpected rule shape: {rule:?}").into());
        }
        for group in rule.api_groups.iter().flatten() {
            for resource in rule.resources.iter().flatten() {
                for verb in &rule.verbs {
                    granted.insert((group.clone(), resource.clone(), verb.clone()));
                }
            }
        }
    }
    let missing: Vec<_> = expected.difference(&granted).collect();
    let extra: Vec<_> = granted.difference(&expected).collect();
    if missing.is_empty() && extra.is_empty() {
        Ok(())
    } else {
        Err(
            format!("ClusterRole drifted from the watchers: missing {missing:?}, extra {extra:?}")
                .into(),
        )
    }
}

fn binding_matches() -> Result<(), Failed> {
    let binding: ClusterRoleBinding = typed(
        &document(&base_dir().join("clusterrolebinding.yaml")),
        "binding",
    )?;
    let role: ClusterRole = typed(&document(&base_dir().join("clusterrole.yaml")), "role")?;
    let account: ServiceAccount = typed(
        &document(&base_dir().join("serviceaccount.yaml")),
        "account",
    )?;
    let ds: DaemonSet = typed(&base_daemonset(), "daemonset")?;
    let pod = ds.spec.as_ref().and_then(|s| s.template.spec.as_ref());
    let ds_account = pod.and_then(|p| p.service_account_name.clone());
    let subjects = binding.subjects.unwrap_or_default();
    let ok = binding.role_ref.kind == "ClusterRole"
        && Some(&binding.role_ref.name) == role.metadata.name.as_ref()
        && subjects.len() == 1
        && subjects[0].kind == "ServiceAccount"
        && Some(&subjects[0].name) == account.metadata.name.as_ref()
        && subjects[0].namespace == account.metadata.namespace
        && account.metadata.namespace == ds.metadata.namespace
        && ds_account == account.metadata.name;
    if ok {
        Ok(())
    } else {
        Err(format!(
            "binding {:?} → {subjects:?}; role {:?}; account {:?}/{:?}; DaemonSet uses {ds_account:?} in {:?}",
            binding.role_ref, role.metadata.name, account.metadata.namespace,
            account.metadata.name, ds.metadata.namespace
        )
        .into())
    }
}

/// The port of a probe's httpGet, resolving a named port through the container's ports.
fn probe_port(
    container: &k8s_openapi::api::core::v1::Container,
    probe: Option<&k8s_openapi::api::core::v1::Probe>,
    what: &str,
) -> Result<(i32, String), String> {
    use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
    let get = probe
        .and_then(|p| p.http_get.as_ref())
        .ok_or_else(|| format!("{what}: no httpGet probe"))?;
    let port = match &get.port {
        IntOrString::Int(p) => *p,
        IntOrString::String(name) => container
            .ports
            .iter()
            .flatten()
            .find(|p| p.name.as_deref() == Some(name))
            .map(|p| p.container_port)
            .ok_or_else(|| format!("{what}: no container port named {name}"))?,
    };
    Ok((port, get.path.clone().unwrap_or_default()))
}

/// kubelet probes a hostNetwork pod on the node's address; binding only that address keeps the
/// unauthenticated endpoint off the node's other interfaces.
fn metrics_bind_problem(container: &k8s_openapi::api::core::v1::Container) -> Option<String> {
    let host_ip = container.env.iter().flatten().any(|e| {
        e.name == "HOST_IP"
            && e.value_from
                .as_ref()
                .and_then(|v| v.field_ref.as_ref())
                .is_some_and(|f| f.field_path == "status.hostIP")
    });
    let metrics_arg = container
        .args
        .iter()
        .flatten()
        .find(|a| a.starts_with("--metrics-addr"));
    (!host_ip || metrics_arg.is_none_or(|a| !a.contains("$(HOST_IP):"))).then(|| {
        format!(
            "{metrics_arg:?}: --metrics-addr must be $(HOST_IP):PORT with HOST_IP from \
             status.hostIP, where kubelet probes a hostNetwork pod"
        )
    })
}

fn daemonset_matches_the_cli() -> Result<(), Failed> {
    let ds: DaemonSet = typed(&base_daemonset(), "daemonset")?;
    let run = run_args(&ds)?;
    let container = agent_container(&ds);
    let metrics = run
        .metrics_addr
        .0
        .ok_or("--metrics-addr none leaves the probes nothing to ask")?;
    let port = i32::from(metrics.port());
    let mut problems = Vec::new();
    for (probe, path, what) in [
        (container.liveness_probe.as_ref(), "/healthz", "liveness"),
        (container.startup_probe.as_ref(), "/healthz", "startup"),
        (container.readiness_probe.as_ref(), "/readyz", "readiness"),
    ] {
        match probe_port(container, probe, what) {
            Ok((p, got)) if p == port && got == path => {}
            Ok((p, got)) => problems.push(format!(
                "{what}: probes {got} on port {p}; the agent serves {path} on {port}"
            )),
            Err(e) if what == "startup" && probe.is_none() => drop(e),
            Err(e) => problems.push(e),
        }
    }
    let declared = container
        .ports
        .iter()
        .flatten()
        .any(|p| p.container_port == port);
    if !declared {
        problems.push(format!("container port {port} is not declared"));
    }
    problems.extend(metrics_bind_problem(container));
    if run.mode != Mode::Shadow {
        problems.push("the base must start in shadow mode (docs/migration.md)".into());
    }
    let node_name = container
        .env
        .iter()
        .flatten()
        .find(|e| e.name == "NODE_NAME")
        .and_then(|e| e.value_from.as_ref())
        .and_then(|v| v.field_ref.as_ref())
        .map(|f| f.field_path.clone());
    if node_name.as_deref() != Some("spec.nodeName") {
        problems.push(format!(
            "NODE_NAME must come from spec.nodeName, got {node_name:?}"
        ));
    }
    // --bpffs-root must lie on the mounted host bpffs.
    let pod = ds
        .spec
        .as_ref()
        .and_then(|s| s.template.spec.as_ref())
        .expect("pod spec");
    let host_path = |mount_path: &str| {
        container
            .volume_mounts
            .iter()
            .flatten()
            .filter(|m| Path::new(mount_path).starts_with(&m.mount_path))
            .find_map(|m| {
                pod.volumes
                    .iter()
                    .flatten()
                    .find(|v| v.name == m.name)
                    .and_then(|v| v.host_path.as_ref())
                    .map(|h| (m.mount_path.clone(), h.path.clone()))
            })
    };
    match host_path(&run.root.bpffs_root.to_string_lossy()) {
        Some((_, host)) if host == "/sys/fs/bpf" => {}
        other => problems.push(format!(
            "--bpffs-root {} is not on the host's /sys/fs/bpf: {other:?}",
            run.root.bpffs_root.display()
        )),
    }
    match host_path("/run/xtables.lock") {
        Some((mount, host)) if mount == "/run/xtables.lock" && host == "/run/xtables.lock" => {}
        other => problems.push(format!("/run/xtables.lock is not the host's: {other:?}")),
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems.join("\n").into())
    }
}

fn daemonset_shape() -> Result<(), Failed> {
    let ds: DaemonSet = typed(&base_daemonset(), "daemonset")?;
    let spec = ds.spec.as_ref().expect("spec");
    let pod = spec.template.spec.as_ref().expect("pod spec");
    let container = agent_container(&ds);
    let mut problems = security_problems(&ds);
    if pod.host_network != Some(true) {
        problems.push("hostNetwork must be true".into());
    }
    let (add, _) = capabilities(&ds);
    let want: BTreeSet<String> = ["BPF", "NET_ADMIN", "PERFMON", "NET_RAW"]
        .into_iter()
        .map(str::to_owned)
        .collect();
    if add != want {
        problems.push(format!("capabilities {add:?}, want {want:?}"));
    }
    let tolerates_all =
        pod.tolerations.iter().flatten().any(|t| {
            t.operator.as_deref() == Some("Exists") && t.key.is_none() && t.effect.is_none()
        });
    if !tolerates_all {
        problems.push("must tolerate every taint to run on every node".into());
    }
    let strategy = spec.update_strategy.as_ref();
    let max_unavailable = strategy
        .and_then(|s| s.rolling_update.as_ref())
        .and_then(|r| r.max_unavailable.as_ref());
    if strategy.and_then(|s| s.type_.as_deref()) != Some("RollingUpdate")
        || max_unavailable
            != Some(&k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(1))
    {
        problems.push(format!("update strategy {strategy:?}"));
    }
    let resources = container.resources.as_ref();
    for (what, list) in [
        ("requests", resources.and_then(|r| r.requests.as_ref())),
        ("limits", resources.and_then(|r| r.limits.as_ref())),
    ] {
        for key in ["cpu", "memory"] {
            if !list.is_some_and(|l| l.contains_key(key)) {
                problems.push(format!("resources.{what}.{key} missing"));
            }
        }
    }
    let selector = spec.selector.match_labels.clone().unwrap_or_default();
    let labels = spec
        .template
        .metadata
        .as_ref()
        .and_then(|m| m.labels.clone())
        .unwrap_or_default();
    if selector.is_empty() || !selector.iter().all(|(k, v)| labels.get(k) == Some(v)) {
        problems.push("the selector does not select the pod template".into());
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems.join("\n").into())
    }
}

/// YAML files in `dir` (not recursive).
fn yaml_files(dir: &Path) -> BTreeSet<String> {
    std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| {
            Path::new(n)
                .extension()
                .is_some_and(|e| e == "yaml" || e == "yml")
        })
        .collect()
}

fn kustomize_layout() -> Result<(), Failed> {
    let mut problems = Vec::new();
    let base = kustomization(&base_dir());
    if (base.api_version.as_str(), base.kind.as_str())
        != ("kustomize.config.k8s.io/v1beta1", "Kustomization")
    {
        problems.push(format!("base: {} {}", base.api_version, base.kind));
    }
    if !base.components.is_empty() {
        problems.push("the base stays component-free; overlays add components".into());
    }
    let mut listed: BTreeSet<String> = base.resources.iter().cloned().collect();
    listed.insert("kustomization.yaml".into());
    let present = yaml_files(&base_dir());
    if listed != present {
        problems.push(format!(
            "base lists {listed:?}, the directory holds {present:?}"
        ));
    }
    let namespaces: BTreeSet<Option<String>> = base_objects()
        .iter()
        .filter(|o| o["kind"] != "ClusterRole" && o["kind"] != "ClusterRoleBinding")
        .map(|o| o["metadata"]["namespace"].as_str().map(str::to_owned))
        .collect();
    if namespaces != BTreeSet::from([base.namespace.clone()]) {
        problems.push(format!(
            "namespaced objects use {namespaces:?}, the kustomization {:?}",
            base.namespace
        ));
    }
    let ds = base_daemonset();
    let image = ds["spec"]["template"]["spec"]["containers"][0]["image"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    if !base.images.iter().any(|i| {
        image.split(':').next() == Some(i.name.as_str())
            && (i.new_name.is_some() || i.new_tag.is_some())
    }) {
        problems.push(format!("the images transformer does not name {image}"));
    }
    if components().is_empty() {
        problems.push("no components".into());
    }
    for dir in components() {
        let k = kustomization(&dir);
        if (k.api_version.as_str(), k.kind.as_str())
            != ("kustomize.config.k8s.io/v1alpha1", "Component")
        {
            problems.push(format!("{}: {} {}", dir.display(), k.api_version, k.kind));
        }
        let mut referenced: BTreeSet<String> = k.patches.iter().map(|p| p.path.clone()).collect();
        referenced.insert("kustomization.yaml".into());
        if referenced != yaml_files(&dir) {
            problems.push(format!(
                "{}: references {referenced:?}, holds {:?}",
                dir.display(),
                yaml_files(&dir)
            ));
        }
        for patch in &k.patches {
            let want = Target {
                group: "apps".into(),
                version: "v1".into(),
                kind: "DaemonSet".into(),
                name: ds["metadata"]["name"].as_str().unwrap_or_default().into(),
            };
            if patch.target != want {
                problems.push(format!("{}: targets {:?}", dir.display(), patch.target));
            }
        }
    }
    // Every YAML file under deploy/ is one of the above or the example cluster.
    let mut known: BTreeSet<PathBuf> = present.iter().map(|f| base_dir().join(f)).collect();
    for dir in components() {
        known.extend(yaml_files(&dir).iter().map(|f| dir.join(f)));
    }
    known.insert(deploy().join("examples/cluster.yaml"));
    // Checked by uninstall_matches_the_agent.
    known.insert(deploy().join("uninstall/kustomization.yaml"));
    known.insert(deploy().join("uninstall/daemonset.yaml"));
    let mut stack = vec![deploy()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).expect("read deploy/").flatten() {
            let path = entry.path();
            // deploy/monitoring/ is checked by tests/chart.rs (against the chart and promtool).
            if path.is_dir() && path != deploy().join("monitoring") {
                stack.push(path);
            } else if path.is_file()
                && path.extension().is_some_and(|e| e == "yaml" || e == "yml")
                && !known.contains(&path)
            {
                problems.push(format!("{} is checked by no test", path.display()));
            }
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems.join("\n").into())
    }
}

fn component(name: &str) -> PathBuf {
    deploy().join("components").join(name)
}

/// (components, mode, capabilities it must add, capabilities it must not add).
type Variant = (
    Vec<PathBuf>,
    Option<Mode>,
    &'static [&'static str],
    &'static [&'static str],
);

fn components_apply() -> Result<(), Failed> {
    let mut problems = Vec::new();
    let variants: Vec<Variant> = vec![
        (
            vec![component("enforce")],
            Some(Mode::Enforce),
            &["BPF", "PERFMON"],
            &["SYS_ADMIN"],
        ),
        (
            vec![component("kernel-5.10")],
            Some(Mode::Shadow),
            &["BPF", "PERFMON", "SYS_RESOURCE"],
            &["SYS_ADMIN"],
        ),
        (
            vec![component("cap-sys-admin")],
            Some(Mode::Shadow),
            &["SYS_ADMIN", "NET_ADMIN", "NET_RAW", "SYS_RESOURCE"],
            &["BPF", "PERFMON"],
        ),
        (
            vec![component("enforce"), component("kernel-5.10")],
            Some(Mode::Enforce),
            &["BPF", "SYS_RESOURCE"],
            &["SYS_ADMIN"],
        ),
        (
            vec![component("enforce"), component("cap-sys-admin")],
            Some(Mode::Enforce),
            &["SYS_ADMIN"],
            &["BPF"],
        ),
    ];
    for (dirs, mode, with, without) in variants {
        let name = dirs
            .iter()
            .map(|d| {
                d.file_name()
                    .unwrap_or_default()
                    .to_string_lossy()
                    .into_owned()
            })
            .collect::<Vec<_>>()
            .join("+");
        let ds = match patched_daemonset(&dirs).and_then(|raw| typed::<DaemonSet>(&raw, &name)) {
            Ok(ds) => ds,
            Err(e) => {
                problems.push(e);
                continue;
            }
        };
        match run_args(&ds) {
            Ok(run) if Some(run.mode) == mode => {}
            Ok(run) => problems.push(format!("{name}: mode {:?}, want {mode:?}", run.mode)),
            Err(e) => problems.push(format!("{name}: {e}")),
        }
        let (add, _) = capabilities(&ds);
        for cap in with {
            if !add.contains(*cap) {
                problems.push(format!("{name}: lacks {cap}: {add:?}"));
            }
        }
        for cap in without {
            if add.contains(*cap) {
                problems.push(format!("{name}: must not add {cap}: {add:?}"));
            }
        }
        for p in security_problems(&ds) {
            problems.push(format!("{name}: {p}"));
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems.join("\n").into())
    }
}

/// `path` relative to `from` (both absolute).
fn relative(from: &Path, path: &Path) -> PathBuf {
    let up = from.components().count() - 1;
    let mut rel: PathBuf = std::iter::repeat_n("..", up).collect();
    rel.push(path.strip_prefix("/").unwrap_or(path));
    rel
}

fn kustomize(dir: &Path) -> Result<Vec<Value>, String> {
    let out = Command::new("kubectl")
        .arg("kustomize")
        .arg(dir)
        .output()
        .map_err(|e| format!("kubectl: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "kubectl kustomize {}: {}",
            dir.display(),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    serde_saphyr::from_multiple::<Value>(&text).map_err(|e| e.to_string())
}

fn kubectl_agrees() -> Result<(), Failed> {
    if Command::new("kubectl")
        .args(["version", "--client"])
        .output()
        .is_err()
    {
        eprintln!(
            "\n*** kubectl not installed: the Kustomize rendering cross-check is skipped; the \
             other deploy tests apply the same patches themselves ***\n"
        );
        return Ok(());
    }
    let rendered = kustomize(&base_dir())?;
    let by_kind = |objects: &[Value]| -> BTreeMap<String, Value> {
        objects
            .iter()
            .map(|o| (o["kind"].as_str().unwrap_or_default().to_owned(), o.clone()))
            .collect()
    };
    if by_kind(&rendered) != by_kind(&base_objects()) {
        return Err(
            format!("kubectl kustomize renders the base differently:\n{rendered:#?}").into(),
        );
    }
    let tmp = std::env::temp_dir().join(format!("kovn-kustomize-{}", std::process::id()));
    let mut problems = Vec::new();
    for dirs in [
        vec![component("enforce")],
        vec![component("kernel-5.10")],
        vec![component("cap-sys-admin")],
        vec![component("enforce"), component("cap-sys-admin")],
    ] {
        std::fs::create_dir_all(&tmp).map_err(|e| e.to_string())?;
        let list = |paths: &[PathBuf]| -> String {
            paths.iter().fold(String::new(), |mut out, p| {
                let _ = writeln!(out, "- {}", relative(&tmp, p).display());
                out
            })
        };
        let overlay = format!(
            "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nresources:\n{}components:\n{}",
            list(&[base_dir()]),
            list(&dirs)
        );
        std::fs::write(tmp.join("kustomization.yaml"), overlay).map_err(|e| e.to_string())?;
        let result = kustomize(&tmp).and_then(|objects| {
            let got = by_kind(&objects)
                .remove("DaemonSet")
                .ok_or("no DaemonSet")?;
            let want = patched_daemonset(&dirs)?;
            (got == want).then_some(()).ok_or_else(|| {
                format!("{dirs:?}: kubectl renders\n{got:#}\nthe tests expect\n{want:#}")
            })
        });
        if let Err(e) = result {
            problems.push(e);
        }
    }
    let _ = std::fs::remove_dir_all(&tmp);
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems.join("\n").into())
    }
}

/// deploy/uninstall: a typed `DaemonSet` whose init container's args pass the agent's CLI as
/// `detach --if-present` on the base's `--bpffs-root`, mounts the same host bpffs, runs on every
/// node, and holds no capability the agent's container lacks.
fn uninstall_matches_the_agent() -> Result<(), Failed> {
    let dir = deploy().join("uninstall");
    let kustomization = kustomization(&dir);
    let mut problems = Vec::new();
    if kustomization.resources != ["daemonset.yaml"] {
        problems.push(format!("resources {:?}", kustomization.resources));
    }
    let raw = documents(&dir.join("daemonset.yaml"))
        .pop()
        .ok_or("no document")?;
    let ds: DaemonSet = typed(&raw, "deploy/uninstall/daemonset.yaml")?;
    let agent: DaemonSet = typed(&base_daemonset(), "base DaemonSet")?;
    let spec = ds.spec.and_then(|s| s.template.spec).ok_or("no pod spec")?;
    let agent_spec = agent
        .spec
        .and_then(|s| s.template.spec)
        .ok_or("no pod spec")?;
    let init = spec.init_containers.clone().unwrap_or_default();
    let [detach] = &init[..] else {
        return Err(format!("want one init container, got {}", init.len()).into());
    };
    let args = detach.args.clone().unwrap_or_default();
    let parsed = Cli::try_parse_from(std::iter::once("kube-ovn-agent".to_owned()).chain(args))
        .map_err(|e| format!("init container args: {e}"))?;
    let AgentCommand::Detach(detach_args) = parsed.command else {
        return Err("the init container does not run `detach`".into());
    };
    let agent_args = agent_spec.containers[0].args.clone().unwrap_or_default();
    let agent_root = agent_args
        .iter()
        .find_map(|a| a.strip_prefix("--bpffs-root="))
        .ok_or("the base has no --bpffs-root")?;
    if detach_args.root.bpffs_root != Path::new(agent_root)
        || !detach_args.if_present
        || detach_args.force
    {
        problems.push(format!(
            "detach args {detach_args:?}, agent root {agent_root}"
        ));
    }
    let host_paths = |spec: &k8s_openapi::api::core::v1::PodSpec| {
        spec.volumes
            .iter()
            .flatten()
            .filter_map(|v| Some((v.name.clone(), v.host_path.as_ref()?.path.clone())))
            .collect::<BTreeSet<_>>()
    };
    let ours = host_paths(&spec);
    if ours.is_empty() || !ours.is_subset(&host_paths(&agent_spec)) {
        problems.push(format!("hostPath volumes {ours:?} are not the agent's"));
    }
    let caps = |c: &k8s_openapi::api::core::v1::Container| -> BTreeSet<String> {
        c.security_context
            .as_ref()
            .and_then(|s| s.capabilities.as_ref())
            .and_then(|c| c.add.clone())
            .unwrap_or_default()
            .into_iter()
            .collect()
    };
    if !caps(detach).is_subset(&caps(&agent_spec.containers[0])) {
        problems.push(format!(
            "capabilities beyond the agent's: {:?}",
            caps(detach)
        ));
    }
    if spec.host_network != Some(true) || spec.tolerations != agent_spec.tolerations {
        problems.push("hostNetwork and tolerations must be the agent's".into());
    }
    if spec.automount_service_account_token != Some(false) {
        problems.push("no API access is needed: automountServiceAccountToken false".into());
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems.join("\n").into())
    }
}

/// `--version` of the built agent names the checkout's commit (or `$KOVN_GIT_COMMIT` when the
/// build was given one), as build.rs promises; `unknown` only without git.
fn version_names_the_commit() -> Result<(), Failed> {
    let out = Command::new(env!("CARGO_BIN_EXE_kube-ovn-agent"))
        .arg("--version")
        .output()
        .map_err(|e| format!("running the agent: {e}"))?;
    let printed = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    let expected = match std::env::var("KOVN_GIT_COMMIT") {
        Ok(commit) if !commit.trim().is_empty() => commit.trim().to_owned(),
        _ => Command::new("git")
            .args(["rev-parse", "--short=12", "HEAD"])
            .current_dir(repo())
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map_or_else(
                || "unknown".to_owned(),
                |o| String::from_utf8_lossy(&o.stdout).trim().to_owned(),
            ),
    };
    let want = format!(
        "kube-ovn-agent {} (commit {expected})",
        env!("CARGO_PKG_VERSION")
    );
    if printed == want {
        Ok(())
    } else {
        Err(format!("--version printed {printed:?}, expected {want:?}").into())
    }
}

/// `ARG NAME=value` of the Containerfile.
fn containerfile_arg(text: &str, name: &str) -> Option<String> {
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("ARG "))
        .filter_map(|a| a.split_once('='))
        .find(|(n, _)| *n == name)
        .map(|(_, v)| v.trim().to_owned())
}

fn containerfile_pins() -> Result<(), Failed> {
    let text = read(&deploy().join("Containerfile"));
    let cargo = read(&repo().join("Cargo.toml"));
    let setup = read(&repo().join("xtask/src/setup.rs"));
    let mut problems = Vec::new();
    let quoted_after = |haystack: &str, key: &str| -> Option<String> {
        let line = haystack.lines().find(|l| l.trim_start().starts_with(key))?;
        line.split('"').nth(1).map(str::to_owned)
    };
    let rust = quoted_after(&cargo, "rust-version");
    if containerfile_arg(&text, "RUST_VERSION") != rust {
        problems.push(format!(
            "RUST_VERSION must be the workspace rust-version {rust:?}"
        ));
    }
    let linker = quoted_after(&setup, "pub const BPF_LINKER_VERSION");
    if containerfile_arg(&text, "BPF_LINKER_VERSION") != linker {
        problems.push(format!("BPF_LINKER_VERSION must be xtask's {linker:?}"));
    }
    let nightly = containerfile_arg(&text, "EBPF_TOOLCHAIN").unwrap_or_default();
    let date = nightly.strip_prefix("nightly-").unwrap_or_default();
    if date.len() != 10 || !date.bytes().all(|b| b.is_ascii_digit() || b == b'-') {
        problems.push(format!(
            "EBPF_TOOLCHAIN must pin a dated nightly, got {nightly:?}"
        ));
    }
    let pin = read(&repo().join("kube-ovn-ebpf/rust-toolchain.toml"));
    if quoted_after(&pin, "channel").as_deref() != Some(nightly.as_str()) {
        problems.push(format!(
            "EBPF_TOOLCHAIN {nightly:?} must be kube-ovn-ebpf/rust-toolchain.toml's channel"
        ));
    }
    if !text.contains("KOVN_EBPF_TOOLCHAIN=${EBPF_TOOLCHAIN}") {
        problems.push("the agent's build.rs reads KOVN_EBPF_TOOLCHAIN: set it".into());
    }
    // Every workspace member must be copied in, or cargo cannot load the workspace.
    // `members = [ … ]`, on one line or several.
    let members = cargo
        .split_once("\nmembers")
        .and_then(|(_, rest)| rest.split_once('['))
        .and_then(|(_, rest)| rest.split_once(']'))
        .map(|(list, _)| {
            list.split('"')
                .skip(1)
                .step_by(2)
                .map(str::to_owned)
                .collect::<Vec<_>>()
        })
        .unwrap_or_default();
    if members.is_empty() {
        problems.push("no workspace members found in Cargo.toml".into());
    }
    for member in members {
        if !text
            .lines()
            .any(|l| l.trim() == format!("COPY {member} {member}"))
        {
            problems.push(format!(
                "workspace member {member} is not copied into the build"
            ));
        }
    }
    if !text.contains("--locked") {
        problems.push("build with --locked".into());
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems.join("\n").into())
    }
}

/// GitHub's anchor for a Markdown heading: lower case, spaces to dashes, punctuation dropped.
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

/// `docs/NAME.md#anchor` references (and relative `NAME.md#anchor` ones inside docs/) in `text`.
fn doc_links(text: &str, relative_to_docs: bool) -> Vec<(String, String)> {
    let mut links = Vec::new();
    for (i, _) in text.match_indices(".md#") {
        let start = text[..i]
            .rfind(|c: char| !(c.is_alphanumeric() || c == '/' || c == '-' || c == '_'))
            .map_or(0, |p| p + 1);
        let file = &text[start..i];
        let anchor: String = text[i + 4..]
            .chars()
            .take_while(|c| c.is_alphanumeric() || *c == '-' || *c == '_')
            .collect();
        let file = match (file.strip_prefix("docs/"), relative_to_docs) {
            (Some(name), _) => format!("{name}.md"),
            (None, true) if !file.is_empty() && !file.contains('/') => format!("{file}.md"),
            _ => continue,
        };
        links.push((file, anchor));
    }
    links
}

fn doc_anchors_exist() -> Result<(), Failed> {
    let docs = repo().join("docs");
    let mut sources: Vec<(PathBuf, bool)> = vec![(repo().join("README.md"), false)];
    for dir in [repo().join("kube-ovn-agent/src"), docs.clone()] {
        for entry in std::fs::read_dir(&dir).expect("read dir").flatten() {
            let path = entry.path();
            let in_docs = dir == docs;
            if path.extension().is_some_and(|e| e == "rs" || e == "md") {
                sources.push((path, in_docs));
            }
        }
    }
    let mut problems = Vec::new();
    let mut checked = 0;
    for (source, in_docs) in sources {
        for (file, anchor) in doc_links(&read(&source), in_docs) {
            let target = docs.join(&file);
            let Ok(text) = std::fs::read_to_string(&target) else {
                problems.push(format!("{}: links to missing {file}", source.display()));
                continue;
            };
            let found = text
                .lines()
                .filter_map(|l| l.strip_prefix('#'))
                .map(|h| slug(h.trim_start_matches('#')))
                .any(|s| s == anchor);
            checked += 1;
            if !found {
                problems.push(format!(
                    "{}: {file}#{anchor} has no heading",
                    source.display()
                ));
            }
        }
    }
    if checked == 0 {
        problems.push("no doc links found: the scan is broken".into());
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems.join("\n").into())
    }
}
