//! deploy/ and the agent against a real etcd + kube-apiserver (`kube_ovn_testkit::control_plane`,
//! pinned upstream builds from `cargo xtask testbed build`; docs/testbed.md):
//!
//! - every Kustomize render of deploy/ and the example cluster pass `kubectl apply
//!   --dry-run=server`, with Kube-OVN's real Subnet CRD installed;
//! - the agent's `ServiceAccount` can do exactly what docs/install.md claims, and nothing else;
//! - the kube source, authenticated with that `ServiceAccount`'s token, lists and follows creates,
//!   changes and deletes of every kind, odd-but-valid objects translate as the unit tests say,
//!   and it survives an etcd compaction (410 → relist), an apiserver restart and an etcd restart
//!   with its store intact;
//! - the agent binary (`run --source kube`, root, in a private network namespace with the
//!   control plane inside) programs the maps from the API, keeps them through the same outages,
//!   and resumes without re-programming.
//!
//! Needs `$KUBE_APISERVER` and `$ETCD`: without them the suite skips loudly, and fails when `CI` or
//! `KOVN_REQUIRE_PRIVILEGED` is set.

mod support;

use std::{
    fmt::Write as _,
    io::{Read as _, Write as _},
    net::TcpStream,
    path::{Path, PathBuf},
    process::{Child, Stdio},
    sync::Arc,
    time::{Duration, Instant},
};

use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::networking::v1::ServiceCIDR;
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube_ovn_agent::{
    cluster::{Snapshot, Subnet, object_name},
    source::{
        Running,
        kube::{self as kube_source, KubeOptions},
    },
    state::MapState,
    testing::{
        missing_privilege,
        netns::{Bpffs, NetNs, TempPath, veth},
        objects::{Port, node, service, service_cidr, spec_cluster, subnet},
    },
    translate::{KubeProxySets, Options as TranslateOptions},
};
use kube_ovn_testkit::control_plane::{Binaries, ControlPlane, Options};
use libtest_mimic::{Arguments, Trial};
use serde::Serialize;
use serde_json::{Value, json};
use support::{converge_with, errors, expected, expected_with, wait_until};

const AGENT: &str = env!("CARGO_BIN_EXE_kube-ovn-agent");
/// The agent's `ServiceAccount` as deploy/base names it.
const SA_NAMESPACE: &str = "kube-system";
const SA_NAME: &str = "kube-ovn-ebpf";

type Test = fn(&Binaries);

fn main() {
    let args = Arguments::from_args();
    let binaries = match Binaries::from_env() {
        Ok(b) => Some(b),
        Err(e) => {
            eprintln!("\n*** SKIPPING the real API server tests: {e} ***\n");
            let ci = std::env::var_os("CI").is_some_and(|v| !v.is_empty() && v != "false");
            if ci || kube_ovn_agent::testing::privilege_required() {
                eprintln!("CI or KOVN_REQUIRE_PRIVILEGED is set: refusing to skip");
                std::process::exit(1);
            }
            None
        }
    };
    let root = missing_privilege();
    if let (Some(why), Some(_)) = (&root, &binaries) {
        eprintln!("\n*** SKIPPING the agent binary test: {why} ***\n");
        if kube_ovn_agent::testing::privilege_required() {
            eprintln!("KOVN_REQUIRE_PRIVILEGED is set: refusing to skip");
            std::process::exit(1);
        }
    }
    let tests: Vec<(&str, Test, bool)> = vec![
        (
            "every_kustomize_render_and_the_example_cluster_pass_server_dry_run",
            manifests_pass_server_dry_run,
            false,
        ),
        (
            "service_account_can_do_exactly_what_the_docs_claim",
            rbac_is_exactly_the_docs,
            false,
        ),
        (
            "kube_source_with_the_agents_token_follows_every_kind",
            source_follows_every_kind,
            false,
        ),
        (
            "odd_but_valid_objects_translate_as_the_unit_tests_say",
            odd_objects,
            false,
        ),
        (
            "compaction_and_restarts_keep_the_store_and_converge",
            source_survives_outages,
            false,
        ),
        (
            "agent_binary_programs_from_the_api_and_stays_fail_static_through_outages",
            agent_binary,
            true,
        ),
    ];
    let trials = tests
        .into_iter()
        .map(|(name, f, needs_root)| {
            let ignored = binaries.is_none() || (needs_root && root.is_some());
            let b = binaries.clone();
            Trial::test(name, move || {
                f(b.as_ref().expect("not ignored"));
                Ok(())
            })
            .with_ignored_flag(ignored)
        })
        .collect();
    libtest_mimic::run(&args, trials).exit();
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn start(binaries: &Binaries, netns: Option<&str>) -> ControlPlane {
    let mut options = Options::new(binaries.clone());
    options.netns = netns.map(str::to_owned);
    let started = Instant::now();
    let plane = ControlPlane::start(options).unwrap_or_else(|e| panic!("control plane: {e}"));
    eprintln!("control plane ready in {:.1?}", started.elapsed());
    plane
}

fn kubectl(plane: &ControlPlane, args: &[&str]) -> String {
    plane
        .kubectl(args)
        .unwrap_or_else(|e| panic!("kubectl {args:?}: {e}"))
}

/// `kubectl apply` of a typed object; its `status` (which `apply` does not write) is patched
/// through the status subresource, as a controller or the kubelet would.
fn apply<T: Serialize + kube::Resource<DynamicType = ()>>(plane: &ControlPlane, object: &T) {
    let mut value = serde_json::to_value(object).expect("serializable");
    value["apiVersion"] = T::api_version(&()).into();
    value["kind"] = T::kind(&()).into();
    let status = value.as_object_mut().and_then(|o| o.remove("status"));
    plane
        .kubectl_stdin(&["apply", "-f", "-"], &value.to_string())
        .unwrap_or_else(|e| panic!("apply {value}: {e}"));
    if let Some(status) = status.filter(|s| !s.is_null()) {
        let resource = format!(
            "{}/{}",
            T::plural(&()),
            value["metadata"]["name"].as_str().unwrap()
        );
        let mut args = vec![
            "patch",
            &resource,
            "--subresource=status",
            "--type=merge",
            "-p",
        ];
        let patch = json!({ "status": status }).to_string();
        args.push(&patch);
        let ns;
        if let Some(namespace) = value["metadata"]["namespace"].as_str() {
            ns = namespace.to_owned();
            args.extend(["--namespace", &ns]);
        }
        kubectl(plane, &args);
    }
}

fn delete(plane: &ControlPlane, what: &str, namespace: Option<&str>) {
    let mut args = vec!["delete", what, "--wait=false"];
    if let Some(ns) = namespace {
        args.extend(["--namespace", ns]);
    }
    kubectl(plane, &args);
}

/// A Service as the API accepts it: two cluster IPs need a dual-stack policy, `ExternalName`
/// needs a name, and ports need names when there are several (`testing::objects::service` leaves
/// them out; the translation does not read them).
fn api_service(mut s: Service) -> Service {
    let spec = s.spec.as_mut().expect("spec");
    let ports = spec.ports.iter_mut().flatten();
    for port in ports {
        let protocol = port.protocol.as_deref().unwrap_or("TCP").to_lowercase();
        port.name
            .get_or_insert_with(|| format!("{protocol}-{}", port.port));
    }
    if spec.cluster_ips.as_ref().is_some_and(|ips| ips.len() == 2) {
        spec.ip_family_policy = Some("RequireDualStack".into());
    }
    if spec.type_.as_deref() == Some("ExternalName") {
        spec.external_name = Some("example.com".into());
        spec.cluster_ips = None;
    }
    s
}

/// Objects of one kind as the API holds them.
fn list<T: serde::de::DeserializeOwned>(plane: &ControlPlane, resource: &str) -> Vec<Arc<T>> {
    let text = kubectl(plane, &["get", resource, "--all-namespaces", "-o", "json"]);
    let list: Value = serde_json::from_str(&text).expect("kubectl -o json");
    list["items"]
        .as_array()
        .expect("items")
        .iter()
        .map(|item| Arc::new(serde_json::from_value(item.clone()).expect("typed object")))
        .collect()
}

/// The cluster as the API holds it: what the source must deliver.
fn api_snapshot(plane: &ControlPlane) -> Snapshot {
    Snapshot {
        subnets: list::<Subnet>(plane, "subnets.kubeovn.io"),
        services: list::<Service>(plane, "services"),
        nodes: list::<Node>(plane, "nodes"),
        service_cidrs: list::<ServiceCIDR>(plane, "servicecidrs.networking.k8s.io"),
        pods: Vec::new(),
    }
}

/// The spec cluster through the API; `default/kubernetes` is the apiserver's own.
fn load_spec_cluster(plane: &ControlPlane) {
    let cluster = spec_cluster();
    for s in &cluster.subnets {
        apply(plane, &**s);
    }
    for n in &cluster.nodes {
        apply(plane, &**n);
    }
    for s in &cluster.services {
        if object_name(&s.metadata) != "default/kubernetes" {
            apply(plane, &api_service((**s).clone()));
        }
    }
}

/// deploy/base applied for real, and a kubeconfig with its `ServiceAccount`'s token.
fn agent_kubeconfig(plane: &ControlPlane) -> PathBuf {
    kubectl(
        plane,
        &[
            "apply",
            "-k",
            &repo().join("deploy/base").display().to_string(),
        ],
    );
    let token = plane
        .token_for_service_account(SA_NAMESPACE, SA_NAME)
        .unwrap_or_else(|e| panic!("token: {e}"));
    assert!(token.split('.').count() == 3, "a JWT: {token}");
    plane
        .kubeconfig_with_token("agent", &token)
        .unwrap_or_else(|e| panic!("kubeconfig: {e}"))
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime")
}

fn start_source(rt: &tokio::runtime::Runtime, kubeconfig: &Path) -> Running {
    rt.block_on(async {
        let config = kube::Config::from_custom_kubeconfig(
            Kubeconfig::read_from(kubeconfig).expect("kubeconfig"),
            &KubeConfigOptions::default(),
        )
        .await
        .expect("client config");
        let client = kube::Client::try_from(config).expect("client");
        kube_source::start_with_client(client, &KubeOptions::new("n1")).expect("kube source")
    })
}

/// Waits until the source's maps equal what the API's objects program.
fn converge_to_api(
    rt: &tokio::runtime::Runtime,
    plane: &ControlPlane,
    running: &Running,
    what: &str,
) -> MapState {
    converge_to_api_with(rt, plane, running, &support::options(), what)
}

fn converge_to_api_with(
    rt: &tokio::runtime::Runtime,
    plane: &ControlPlane,
    running: &Running,
    options: &TranslateOptions,
    what: &str,
) -> MapState {
    let want = expected_with(&api_snapshot(plane), options);
    rt.block_on(converge_with(&*running.source, &want, options, what));
    want
}

/// kube-proxy in iptables mode: Kube-OVN's R1b matches `ovnX0services`, which ServiceCIDRs feed.
fn iptables() -> TranslateOptions {
    TranslateOptions {
        kube_proxy_sets: KubeProxySets::default(),
        ..support::options()
    }
}

fn relative(from: &Path, path: &Path) -> PathBuf {
    let up = from.components().count() - 1;
    let mut rel: PathBuf = std::iter::repeat_n("..", up).collect();
    rel.push(path.strip_prefix("/").unwrap_or(path));
    rel
}

// ---------------------------------------------------------------------------------------------

fn manifests_pass_server_dry_run(b: &Binaries) {
    let plane = start(b, None);
    let deploy = repo().join("deploy").canonicalize().expect("deploy/");
    let components: Vec<PathBuf> = {
        let mut c: Vec<PathBuf> = std::fs::read_dir(deploy.join("components"))
            .expect("deploy/components")
            .flatten()
            .map(|e| e.path())
            .collect();
        c.sort();
        c
    };
    assert!(!components.is_empty());
    // The base, each component alone, and the combination docs/install.md shows.
    let mut overlays: Vec<Vec<PathBuf>> = vec![Vec::new()];
    overlays.extend(components.iter().map(|c| vec![c.clone()]));
    overlays.push(vec![
        deploy.join("components/enforce"),
        deploy.join("components/cap-sys-admin"),
    ]);
    let tmp = support::TempDir::new("dry-run");
    let mut problems = Vec::new();
    for dirs in &overlays {
        let list = |paths: &[PathBuf]| -> String {
            paths.iter().fold(String::new(), |mut out, p| {
                let _ = writeln!(out, "- {}", relative(tmp.path(), p).display());
                out
            })
        };
        std::fs::write(
            tmp.path().join("kustomization.yaml"),
            format!(
                "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nresources:\n{}components:\n{}",
                list(&[deploy.join("base")]),
                list(dirs)
            ),
        )
        .expect("overlay");
        let dir = tmp.path().display().to_string();
        match plane.kubectl(&["apply", "--dry-run=server", "-k", &dir]) {
            // One line per object: ServiceAccount, ClusterRole, ClusterRoleBinding, DaemonSet.
            Ok(out)
                if out
                    .lines()
                    .filter(|l| l.contains("(server dry run)"))
                    .count()
                    == 4 => {}
            Ok(out) => problems.push(format!("{dirs:?}: unexpected output\n{out}")),
            Err(e) => problems.push(format!("{dirs:?}: {e}")),
        }
    }
    // The example cluster: Nodes, Kube-OVN Subnets (validated by the real CRD schema), Services,
    // ServiceCIDRs.
    let example = deploy.join("examples/cluster.yaml").display().to_string();
    match plane.kubectl(&["apply", "--dry-run=server", "-f", &example]) {
        Ok(out) if out.contains("subnet.kubeovn.io/") => {}
        Ok(out) => problems.push(format!("example cluster: no Subnet in\n{out}")),
        Err(e) => problems.push(format!("example cluster: {e}")),
    }
    // And the server does reject what is invalid: a Subnet whose spec breaks the CRD's schema.
    let bad = json!({"apiVersion": "kubeovn.io/v1", "kind": "Subnet", "metadata": {"name": "bad"},
                     "spec": {"cidrBlock": 42}});
    if plane
        .kubectl_stdin(&["apply", "--dry-run=server", "-f", "-"], &bad.to_string())
        .is_ok()
    {
        problems.push("a Subnet with a numeric cidrBlock passed the dry run".into());
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

/// `kubectl auth can-i --list` rows: (resource, sorted verbs).
fn can_i_list(plane: &ControlPlane, user: &str) -> Vec<(String, Vec<String>)> {
    let out = kubectl(plane, &["auth", "can-i", "--list", "--as", user]);
    eprintln!("kubectl auth can-i --list --as={user}\n{out}");
    let mut rows = Vec::new();
    for line in out.lines().skip(1) {
        // Resources  Non-Resource URLs  Resource Names  Verbs; URL rows have no resource.
        let Some((left, verbs)) = line.rsplit_once('[') else {
            continue;
        };
        let resource = left.split_whitespace().next().unwrap_or_default();
        if resource.is_empty() || left.starts_with(' ') {
            continue;
        }
        let mut verbs: Vec<String> = verbs
            .trim_end_matches(']')
            .split_whitespace()
            .map(str::to_owned)
            .collect();
        verbs.sort();
        rows.push((resource.to_owned(), verbs));
    }
    rows.sort();
    rows
}

fn rbac_is_exactly_the_docs(b: &Binaries) {
    let plane = start(b, None);
    let kubeconfig = agent_kubeconfig(&plane);
    let user = format!("system:serviceaccount:{SA_NAMESPACE}:{SA_NAME}");
    // Objects to be denied access to.
    load_spec_cluster(&plane);
    let rows = can_i_list(&plane, &user);
    let read = vec!["get".to_owned(), "list".to_owned(), "watch".to_owned()];
    // docs/install.md: "get/list/watch on exactly the kinds the agent watches: nodes, services,
    // pods, subnets.kubeovn.io, servicecidrs.networking.k8s.io".
    let mut want: Vec<(String, Vec<String>)> = [
        "nodes",
        "pods",
        "services",
        "subnets.kubeovn.io",
        "servicecidrs.networking.k8s.io",
    ]
    .into_iter()
    .map(|r| (r.to_owned(), read.clone()))
    .collect();
    // What Kubernetes grants every authenticated user (system:basic-user: review one's own
    // access) and every ServiceAccount (system:cluster-trust-bundle-discovery).
    want.extend(
        [
            "selfsubjectaccessreviews.authorization.k8s.io",
            "selfsubjectreviews.authentication.k8s.io",
            "selfsubjectrulesreviews.authorization.k8s.io",
        ]
        .into_iter()
        .map(|r| (r.to_owned(), vec!["create".to_owned()])),
    );
    want.push((
        "clustertrustbundles.certificates.k8s.io".to_owned(),
        read.clone(),
    ));
    want.sort();
    assert_eq!(
        rows, want,
        "can-i --list (left) against what the docs claim (right)"
    );
    // With the token itself (not impersonation): allowed reads work, everything else is 403.
    let as_agent = |args: &[&str]| {
        plane
            .kubectl_command_with(&kubeconfig, args)
            .output()
            .expect("kubectl")
    };
    for args in [
        &["get", "services", "--all-namespaces"][..],
        &["get", "subnets.kubeovn.io"],
        &["get", "servicecidrs.networking.k8s.io"],
        &["get", "nodes"],
        &["get", "pods", "--all-namespaces"],
    ] {
        let out = as_agent(args);
        assert!(
            out.status.success(),
            "{args:?} denied: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    for args in [
        &["get", "secrets", "--all-namespaces"][..],
        &["get", "configmaps", "--namespace", "kube-system"],
        &["create", "service", "clusterip", "x", "--tcp=80:80"],
        &["delete", "node", "n1"],
        &["label", "subnets.kubeovn.io", "ovn-default", "x=y"],
        &["get", "endpointslices.discovery.k8s.io", "--all-namespaces"],
    ] {
        let out = as_agent(args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && stderr.contains("forbidden"),
            "{args:?} not forbidden: {stderr}"
        );
    }
}

fn source_follows_every_kind(b: &Binaries) {
    let plane = start(b, None);
    let kubeconfig = agent_kubeconfig(&plane);
    load_spec_cluster(&plane);
    let rt = runtime();
    let running = start_source(&rt, &kubeconfig);
    rt.block_on(wait_until("every kind listed", || {
        running.source.status().all_listed()
    }));
    let listed = converge_to_api(&rt, &plane, &running, "initial list");

    // The real API's defaulting changes nothing the translation reads: the fixture with the
    // apiserver's own `default/kubernetes` and ServiceCIDR programs the same maps.
    let api = api_snapshot(&plane);
    let mut fixture = spec_cluster();
    fixture
        .services
        .retain(|s| object_name(&s.metadata) != "default/kubernetes");
    fixture.services.extend(
        api.services
            .iter()
            .filter(|s| object_name(&s.metadata) == "default/kubernetes")
            .cloned(),
    );
    fixture.service_cidrs.clone_from(&api.service_cidrs);
    assert_eq!(
        expected(&fixture),
        listed,
        "the fixture's meaning after the API's defaulting"
    );

    // Creates, changes and deletes of every kind.
    apply(
        &plane,
        &api_service(service(
            "default/web",
            "NodePort",
            &["10.96.0.50"],
            &[Port("UDP", 5000, Some(30500))],
            true,
        )),
    );
    apply(&plane, &node("n3", &["192.168.0.13", "fd00::13"]));
    apply(&plane, &node("n4", &["192.168.0.14"]));
    apply(&plane, &subnet("extra", "10.18.0.0/16"));
    delete(&plane, "subnets.kubeovn.io/central", None);
    apply(&plane, &service_cidr("extra", &["10.100.0.0/16"], true));
    let changed = converge_to_api(&rt, &plane, &running, "after creates, changes and deletes");
    let cidrs = converge_to_api_with(&rt, &plane, &running, &iptables(), "ServiceCIDRs");
    assert_ne!(changed, listed);
    assert!(
        changed
            .v4
            .service_ports
            .iter()
            .any(|p| p.to_string() == "10.96.0.50,udp:5000")
    );
    assert!(
        changed
            .v4
            .subnets
            .iter()
            .any(|s| s.to_string() == "10.18.0.0/16")
    );
    assert!(
        !changed
            .v4
            .subnets
            .iter()
            .any(|s| s.to_string() == "10.17.0.0/16")
    );
    assert!(
        cidrs
            .v4
            .service_cidrs
            .iter()
            .any(|s| s.to_string() == "10.100.0.0/16")
    );

    delete(&plane, "service/web", Some("default"));
    delete(&plane, "node/n4", None);
    delete(&plane, "servicecidrs.networking.k8s.io/extra", None);
    let deleted = converge_to_api(&rt, &plane, &running, "after deletes");
    assert!(
        !deleted
            .v4
            .service_ports
            .iter()
            .any(|p| p.to_string() == "10.96.0.50,udp:5000")
    );
    assert_eq!(
        errors(&running.source.status()),
        0,
        "{:?}",
        running.source.status()
    );
}

fn odd_objects(b: &Binaries) {
    let plane = start(b, None);
    let kubeconfig = agent_kubeconfig(&plane);
    apply(&plane, &node("n1", &["192.168.0.11", "fd00::11"]));
    // translate.rs `services_feed_a_family_only_with_a_cluster_ip_of_it`, through the API.
    let odd = [
        service(
            "a/v4only",
            "NodePort",
            &["10.96.1.1"],
            &[Port("TCP", 80, Some(31000))],
            true,
        ),
        service(
            "a/v6only",
            "NodePort",
            &["fd00:10:96::5"],
            &[Port("UDP", 53, Some(31001))],
            true,
        ),
        service(
            "a/headless",
            "ClusterIP",
            &["None"],
            &[Port("TCP", 80, None)],
            false,
        ),
        service(
            "a/external-name",
            "ExternalName",
            &[],
            &[Port("TCP", 80, None)],
            false,
        ),
        service(
            "a/sctp",
            "NodePort",
            &["10.96.1.3"],
            &[Port("SCTP", 3868, Some(31003))],
            true,
        ),
        service(
            "a/etp-cluster",
            "NodePort",
            &["10.96.1.4"],
            &[Port("TCP", 80, Some(31004))],
            false,
        ),
    ];
    kubectl(&plane, &["create", "namespace", "a"]);
    for s in &odd {
        apply(&plane, &api_service(s.clone()));
    }
    let rt = runtime();
    let running = start_source(&rt, &kubeconfig);
    let d = converge_to_api(&rt, &plane, &running, "odd services");
    let v4: Vec<String> = d.v4.service_ports.iter().map(ToString::to_string).collect();
    let v6: Vec<String> = d.v6.service_ports.iter().map(ToString::to_string).collect();
    // Only the apiserver's own `kubernetes` Service (443) besides ours.
    assert_eq!(
        v4,
        [
            "10.96.0.1,tcp:443",
            "10.96.1.1,tcp:80",
            "10.96.1.3,sctp:3868",
            "10.96.1.4,tcp:80"
        ],
        "headless and ExternalName Services have no address"
    );
    assert_eq!(v6, ["fd00:10:96::5,udp:53"]);
    assert_eq!(d.v4.nodeport_local_tcp, [31000].into());
    assert_eq!(d.v6.nodeport_local_udp, [31001].into());
    assert!(d.v6.nodeport_local_tcp.is_empty());

    // ipFamilyPolicy SingleStack → PreferDualStack: the API allocates an IPv6 cluster IP, and the
    // Service now feeds the IPv6 sets too.
    kubectl(
        &plane,
        &[
            "patch",
            "service",
            "v4only",
            "--namespace",
            "a",
            "--type=merge",
            "-p",
            r#"{"spec":{"ipFamilyPolicy":"PreferDualStack","ipFamilies":["IPv4","IPv6"]}}"#,
        ],
    );
    let d = converge_to_api(&rt, &plane, &running, "after the ipFamilyPolicy change");
    assert_eq!(d.v6.service_ports.len(), 2, "{:?}", d.v6.service_ports);
    assert_eq!(d.v6.nodeport_local_tcp, [31000].into());

    // Several ServiceCIDRs: ready ones count, a not-ready one does not, and API CIDRs replace
    // the flag for both families (translate.rs `ready_service_cidrs_replace_the_flag`).
    // The apiserver's own `kubernetes` ServiceCIDR (from --service-cluster-ip-range) is ready.
    apply(&plane, &service_cidr("extra", &["10.100.0.0/16"], true));
    apply(&plane, &service_cidr("pending", &["10.200.0.0/16"], false));
    let d = converge_to_api_with(&rt, &plane, &running, &iptables(), "several ServiceCIDRs");
    let v4: Vec<String> = d.v4.service_cidrs.iter().map(ToString::to_string).collect();
    let v6: Vec<String> = d.v6.service_cidrs.iter().map(ToString::to_string).collect();
    assert_eq!(v4, ["10.96.0.0/16", "10.100.0.0/16"], "ready ones only");
    assert_eq!(v6, ["fd00:10:96::/112"]);
    assert_eq!(
        errors(&running.source.status()),
        0,
        "{:?}",
        running.source.status()
    );
}

fn source_survives_outages(b: &Binaries) {
    let mut plane = start(b, None);
    let kubeconfig = agent_kubeconfig(&plane);
    load_spec_cluster(&plane);
    let rt = runtime();
    let running = start_source(&rt, &kubeconfig);
    let before = converge_to_api(&rt, &plane, &running, "initial list");
    let snapshot_len = |r: &Running| {
        let s = r.source.snapshot();
        (
            s.subnets.len(),
            s.services.len(),
            s.nodes.len(),
            s.service_cidrs.len(),
        )
    };
    let objects = snapshot_len(&running);

    // 1. apiserver down: the store keeps everything; back up: same maps, then live again.
    plane.stop_apiserver();
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(
        snapshot_len(&running),
        objects,
        "the store kept its objects"
    );
    assert_eq!(
        support::programmed(&running.source.snapshot(), &support::options()),
        before
    );
    plane.start_apiserver().unwrap_or_else(|e| panic!("{e}"));
    apply(&plane, &subnet("after-restart", "10.19.0.0/16"));
    converge_to_api(&rt, &plane, &running, "after the apiserver restart");

    // 2. The resourceVersion the watches hold is compacted away while they are down: resuming
    // gets 410 Gone and the source relists. Unwatched writes move etcd's revision past it.
    let errors_before = errors(&running.source.status());
    for i in 0..5 {
        kubectl(
            &plane,
            &[
                "create",
                "configmap",
                &format!("churn-{i}"),
                "--namespace",
                "default",
            ],
        );
    }
    plane.stop_apiserver();
    let revision = plane
        .compact_etcd()
        .unwrap_or_else(|e| panic!("compaction: {e}"));
    eprintln!("etcd compacted at revision {revision}");
    assert_eq!(
        snapshot_len(&running).1,
        objects.1,
        "the store kept its Services"
    );
    plane.start_apiserver().unwrap_or_else(|e| panic!("{e}"));
    rt.block_on(wait_until("the 410 counted", || {
        errors(&running.source.status()) > errors_before
    }));
    apply(&plane, &subnet("after-compaction", "10.20.0.0/16"));
    converge_to_api(&rt, &plane, &running, "after 410 and relist");
    let status = running.source.status();
    assert!(status.all_listed(), "{status:?}");
    assert!(
        status.kinds.values().any(
            |k| k.last_error.as_deref().is_some_and(|e| e.contains("410")
                || e.contains("too old")
                || e.contains("Expired")
                || e.contains("expired"))
        ),
        "a 410 was seen: {status:?}"
    );

    // 3. etcd restart under a running apiserver: the store keeps everything, then live again.
    plane.restart_etcd().unwrap_or_else(|e| panic!("{e}"));
    assert!(snapshot_len(&running).1 >= objects.1);
    apply(&plane, &subnet("after-etcd", "10.21.0.0/16"));
    converge_to_api(&rt, &plane, &running, "after the etcd restart");
}

// ---------------------------------------------------------------------------------------------

/// The agent binary: a node namespace with `eth0` (192.168.0.11) and `ovn0` (100.64.0.2), the
/// control plane inside it on loopback, and the agent run with the `ServiceAccount`'s token.
struct Node1 {
    node: NetNs,
    _peer: NetNs,
    bpffs: Bpffs,
}

impl Node1 {
    fn new() -> Self {
        let node = NetNs::new("kovn-rapi-node-").expect("create namespace");
        let peer = NetNs::new("kovn-rapi-peer-").expect("create namespace");
        // No IPv6 link-local addresses: they would arrive on their own and write the maps'
        // local sets, and the test counts writing passes.
        node.sh("sysctl -qw net.ipv6.conf.default.addr_gen_mode=1")
            .expect("shell in namespace");
        veth(&node, "eth0", &peer, "eth0").expect("veth pair");
        veth(&node, "ovn0", &peer, "pod0").expect("veth pair");
        node.sh(
            "ip addr add 192.168.0.11/24 dev eth0; ip addr add fd00::11/64 dev eth0 nodad; \
             ip addr add 100.64.0.2/16 dev ovn0",
        )
        .expect("shell in namespace");
        Self {
            node,
            _peer: peer,
            bpffs: Bpffs::mount(),
        }
    }

    fn cli(&self, args: &[&str]) -> Value {
        let out = self
            .node
            .command(AGENT)
            .args(args)
            .arg("--bpffs-root")
            .arg(self.bpffs.root())
            .output()
            .expect("agent CLI");
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("JSON")
    }

    /// `GET /metrics` from the agent inside the namespace.
    fn metric(&self, name: &str) -> f64 {
        let text = self
            .node
            .enter(|| {
                let mut s = TcpStream::connect(("127.0.0.1", METRICS_PORT)).expect("metrics port");
                s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n")
                    .expect("request");
                let mut text = String::new();
                s.read_to_string(&mut text).expect("response");
                text
            })
            .expect("enter namespace");
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in\n{text}"))
    }
}

const METRICS_PORT: u16 = 10669;

struct AgentProcess {
    child: Child,
    log: TempPath,
}

impl AgentProcess {
    fn log(&self) -> String {
        std::fs::read_to_string(&*self.log).unwrap_or_default()
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Polls `f` every 100 ms for up to 30 s.
fn eventually(what: &str, agent: &AgentProcess, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if f() {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("timed out waiting for {what}\nagent log:\n{}", agent.log());
}

fn service_ports(dump: &Value) -> Vec<String> {
    dump["v4"]["service_ports"]
        .as_array()
        .into_iter()
        .flatten()
        .map(ToString::to_string)
        .collect()
}

/// The dump without the local-address sets and interfaces (they follow the kernel, not the API).
fn cluster_state(mut dump: Value) -> Value {
    for family in ["v4", "v6"] {
        if let Some(f) = dump.get_mut(family).and_then(Value::as_object_mut) {
            f.remove("local");
        }
    }
    dump
}

#[expect(clippy::too_many_lines, reason = "one scenario, step by step")]
fn agent_binary(b: &Binaries) {
    let n1 = Node1::new();
    let mut plane = start(b, Some(n1.node.name()));
    let kubeconfig = agent_kubeconfig(&plane);
    load_spec_cluster(&plane);
    let log = TempPath::new("kovn-rapi-agent-", "log");
    let child = n1
        .node
        .command(AGENT)
        .args([
            "run",
            "--node-name",
            "n1",
            "--source",
            "kube",
            "--attach",
            "netlink",
            // IPVS: every Service-derived set is programmed (as netns.rs runs it).
            "--kube-proxy-mode",
            "ipvs",
        ])
        .arg(format!("--metrics-addr=127.0.0.1:{METRICS_PORT}"))
        .arg("--bpffs-root")
        .arg(n1.bpffs.root())
        .env("KUBECONFIG", &kubeconfig)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&*log).expect("log"))
        .spawn()
        .expect("agent");
    let agent = AgentProcess { child, log };
    eventually("the first full sync", &agent, || {
        agent.log().contains("first full sync done")
    });
    let dump = n1.cli(&["dump", "--json"]);
    let ports = service_ports(&dump);
    assert!(
        ports
            .iter()
            .any(|p| p.contains("10.96.0.10") && p.contains("53")),
        "{ports:?}"
    );

    // A Service created and deleted through the API reaches the maps.
    apply(
        &plane,
        &api_service(service(
            "default/web",
            "ClusterIP",
            &["10.96.0.50"],
            &[Port("UDP", 5000, None)],
            false,
        )),
    );
    eventually("the new Service in the maps", &agent, || {
        service_ports(&n1.cli(&["dump", "--json"]))
            .iter()
            .any(|p| p.contains("10.96.0.50"))
    });
    delete(&plane, "service/web", Some("default"));
    eventually("the deleted Service gone from the maps", &agent, || {
        !service_ports(&n1.cli(&["dump", "--json"]))
            .iter()
            .any(|p| p.contains("10.96.0.50"))
    });
    let steady = cluster_state(n1.cli(&["dump", "--json"]));
    let writes = || n1.metric("kovn_event_to_map_write_seconds_count");
    let writes_before = writes();

    // The apiserver goes away and etcd's history is compacted: the maps stay as they are.
    plane.stop_apiserver();
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(
        cluster_state(n1.cli(&["dump", "--json"])),
        steady,
        "fail-static while the API is down"
    );
    plane.compact_etcd().unwrap_or_else(|e| panic!("{e}"));
    plane.start_apiserver().unwrap_or_else(|e| panic!("{e}"));
    // etcd restarts under the running apiserver.
    plane.restart_etcd().unwrap_or_else(|e| panic!("{e}"));
    // Resumed (a change lands) without re-programming: exactly one pass wrote, for that change.
    apply(
        &plane,
        &api_service(service(
            "default/late",
            "ClusterIP",
            &["10.96.0.70"],
            &[Port("TCP", 80, None)],
            false,
        )),
    );
    eventually(
        "a Service created after the outages in the maps",
        &agent,
        || {
            service_ports(&n1.cli(&["dump", "--json"]))
                .iter()
                .any(|p| p.contains("10.96.0.70"))
        },
    );
    std::thread::sleep(Duration::from_secs(1));
    let mut after = cluster_state(n1.cli(&["dump", "--json"]));
    let added = writes() - writes_before;
    assert!(
        (added - 1.0).abs() < f64::EPSILON,
        "{added} writing passes across the outages; only the new Service's was due\nagent log:\n{}",
        agent.log()
    );
    if let Some(ports) = after["v4"]["service_ports"].as_array_mut() {
        ports.retain(|p| !p.to_string().contains("10.96.0.70"));
    }
    assert_eq!(
        after, steady,
        "the maps are what they were, plus the new Service"
    );
    let log = agent.log();
    assert_eq!(log.matches("first full sync done").count(), 1, "{log}");
    // The watches resumed from a compacted resourceVersion: 410 Gone, relist.
    assert!(log.contains("relisting"), "no 410 relist:\n{log}");
    // A restarting apiserver is not an API that went away.
    assert!(!log.contains("does not serve this kind"), "{log}");
    drop(agent);
    drop(plane);
}
