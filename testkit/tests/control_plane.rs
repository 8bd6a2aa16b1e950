//! The control plane's own promises, against the real binaries (`cargo xtask testbed build`):
//! admin and `ServiceAccount` access, restarts that keep the data, a compaction that really
//! expires old resourceVersions, a network namespace of its own, and nothing left behind.
//! Without `$KUBE_APISERVER`/`$ETCD` each test skips loudly, and fails when `CI` or
//! `KOVN_REQUIRE_PRIVILEGED` is set.

use std::{path::Path, process::Command};

use kube_ovn_testkit::{
    control_plane::{Binaries, ControlPlane, Options},
    netns::{NetNs, unique},
    privileged::required,
};

fn binaries() -> Option<Binaries> {
    match Binaries::from_env() {
        Ok(b) => Some(b),
        Err(e) if required() => panic!("{e}"),
        Err(e) => {
            eprintln!("\n*** SKIPPING: {e} ***\n");
            None
        }
    }
}

fn kubectl(plane: &ControlPlane, args: &[&str]) -> String {
    plane
        .kubectl(args)
        .unwrap_or_else(|e| panic!("kubectl {args:?}: {e}"))
}

/// The resourceVersion of a fresh list of namespaces.
fn list_revision(plane: &ControlPlane) -> String {
    let list: serde_json::Value =
        serde_json::from_str(&kubectl(plane, &["get", "--raw", "/api/v1/namespaces"])).unwrap();
    list["metadata"]["resourceVersion"]
        .as_str()
        .unwrap()
        .to_owned()
}

#[test]
fn admin_and_service_account_access_restarts_and_compaction() {
    let Some(binaries) = binaries() else {
        return;
    };
    let mut plane = ControlPlane::start(Options::new(binaries)).unwrap();
    let dir = plane.dir().to_path_buf();
    assert!(plane.server_url().starts_with("https://127.0.0.1:"));
    assert!(plane.ca_pem().starts_with("-----BEGIN CERTIFICATE-----"));
    // Kube-OVN's Subnet CRD is served.
    kubectl(&plane, &["get", "subnets.kubeovn.io"]);

    // A ServiceAccount token authenticates as that ServiceAccount and RBAC applies to it.
    kubectl(
        &plane,
        &[
            "create",
            "serviceaccount",
            "probe",
            "--namespace",
            "default",
        ],
    );
    let token = plane.token_for_service_account("default", "probe").unwrap();
    let kubeconfig = plane.kubeconfig_with_token("probe", &token).unwrap();
    let whoami = plane
        .kubectl_command_with(
            &kubeconfig,
            &[
                "auth",
                "whoami",
                "-o",
                "jsonpath={.status.userInfo.username}",
            ],
        )
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&whoami.stdout),
        "system:serviceaccount:default:probe"
    );
    let denied = plane
        .kubectl_command_with(&kubeconfig, &["get", "secrets"])
        .output()
        .unwrap();
    assert!(!denied.status.success());
    assert!(String::from_utf8_lossy(&denied.stderr).contains("forbidden"));

    // Restarts keep the data, the certificate and the ServiceAccount key.
    kubectl(
        &plane,
        &["create", "configmap", "kept", "--namespace", "default"],
    );
    plane.restart_apiserver().unwrap();
    plane.restart_etcd().unwrap();
    kubectl(
        &plane,
        &["get", "configmap", "kept", "--namespace", "default"],
    );
    let whoami = plane
        .kubectl_command_with(&kubeconfig, &["auth", "whoami"])
        .output()
        .unwrap();
    assert!(whoami.status.success(), "the token survives restarts");

    // Compaction expires every older resourceVersion in etcd: an exact read at one is 410 Gone.
    let old = list_revision(&plane);
    kubectl(
        &plane,
        &["create", "configmap", "newer", "--namespace", "default"],
    );
    let exact = format!("/api/v1/namespaces?resourceVersion={old}&resourceVersionMatch=Exact");
    kubectl(&plane, &["get", "--raw", &exact]);
    let compacted = plane.compact_etcd().unwrap();
    assert!(compacted > old.parse::<u64>().unwrap());
    // The running apiserver's watch cache still holds that revision; a new one reads etcd.
    plane.restart_apiserver().unwrap();
    let gone = plane
        .kubectl_command(&["get", "--raw", &exact])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&gone.stderr);
    assert!(
        !gone.status.success() && (stderr.contains("410") || stderr.contains("Expired")),
        "{stderr}"
    );

    plane.stop();
    assert!(!dir.exists(), "the directory is removed");
}

#[test]
fn inside_a_network_namespace_only_its_loopback_reaches_it() {
    let Some(binaries) = binaries() else {
        return;
    };
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        assert!(!required(), "creating a network namespace needs root");
        eprintln!("\n*** SKIPPING the network-namespace control plane: needs root ***\n");
        return;
    }
    let ns = NetNs::create(&unique("kovn-cp-test-")).expect("create namespace");
    let mut options = Options::new(binaries.clone());
    options.netns = Some(ns.name().to_owned());
    let plane = ControlPlane::start(options).unwrap();
    assert_eq!(plane.netns(), Some(ns.name()));
    kubectl(&plane, &["get", "namespaces"]);
    // From the caller's namespace the same address is not the server.
    let outside = Command::new(&binaries.kubectl)
        .arg("--kubeconfig")
        .arg(plane.kubeconfig_path())
        .args(["get", "namespaces", "--request-timeout=3s"])
        .output()
        .unwrap();
    assert!(!outside.status.success());
    let pids: Vec<String> = Command::new("ip")
        .args(["netns", "pids", ns.name()])
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .map(str::to_owned)
                .collect()
        })
        .unwrap();
    assert_eq!(
        pids.len(),
        2,
        "etcd and kube-apiserver run in the namespace: {pids:?}"
    );
    let dir = plane.dir().to_path_buf();
    drop(plane);
    assert!(!Path::new(&dir).exists());
    let left = Command::new("ip")
        .args(["netns", "pids", ns.name()])
        .output()
        .unwrap();
    assert!(left.stdout.is_empty(), "no process left in the namespace");
}
