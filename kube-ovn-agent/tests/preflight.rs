//! `kube-ovn-agent preflight` against the real kube-apiserver of docs/testbed.md: it finds
//! Kube-OVN's kube-ovn-cni `DaemonSet` (created there as an object, as Kube-OVN's chart renders
//! it; no kubelet is needed for it to exist), reads its version and flags, and reports each
//! mismatch with ours; a missing `DaemonSet` is a warning naming it, `--kube-ovn-cni none`
//! skips the checks. The node checks (kernel, capabilities, bpffs) are unit-tested in
//! src/ops/preflight.rs and are not asserted here.

use std::process::Command;

use serde_json::Value;

const AGENT: &str = env!("CARGO_BIN_EXE_kube-ovn-agent");

fn in_ci() -> bool {
    ["CI", "KOVN_REQUIRE_PRIVILEGED"]
        .iter()
        .any(|v| std::env::var(v).is_ok_and(|v| !v.is_empty() && v != "false" && v != "0"))
}

/// kube-ovn-cni as Kube-OVN v1.13.13's chart renders it, trimmed to what the API requires.
fn kube_ovn_cni(name: &str, image: &str, args: &[&str]) -> Value {
    serde_json::json!({
        "apiVersion": "apps/v1", "kind": "DaemonSet",
        "metadata": {"name": name, "namespace": "kube-system"},
        "spec": {
            "selector": {"matchLabels": {"app": name}},
            "template": {
                "metadata": {"labels": {"app": name}},
                "spec": {"hostNetwork": true, "containers": [
                    {"name": "cni-server", "image": image,
                     "command": ["bash", "/kube-ovn/start-cniserver.sh"], "args": args}
                ]}
            }
        }
    })
}

/// The Kube-OVN checks of one `preflight --json` run, by name, and its exit status.
fn preflight(
    kubeconfig: &std::path::Path,
    args: &[&str],
) -> (Vec<(String, String, String)>, Option<i32>) {
    let scratch = std::env::temp_dir().join(format!("kovn-preflight-{}", std::process::id()));
    let out = Command::new(AGENT)
        .args(["preflight", "--json", "--bpffs-root"])
        .arg(&scratch)
        .args(args)
        .env("KUBECONFIG", kubeconfig)
        .env_remove("KUBERNETES_SERVICE_HOST")
        .output()
        .expect("run the agent");
    let checks: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "preflight --json: {e}\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    let kube_ovn = ["kube-ovn", "service-cidr", "cluster-router", "tproxy"];
    let found = checks
        .iter()
        .filter(|c| kube_ovn.contains(&c["name"].as_str().unwrap_or_default()))
        .map(|c| {
            let text = |k: &str| c[k].as_str().unwrap_or_default().to_owned();
            (text("name"), text("verdict"), text("detail"))
        })
        .collect();
    (found, out.status.code())
}

#[test]
fn preflight_reads_kube_ovn_cni_from_the_api_server_and_names_each_mismatch() {
    use kube_ovn_testkit::control_plane::{Binaries, ControlPlane, Options};
    let binaries = match Binaries::from_env() {
        Ok(binaries) => binaries,
        Err(e) => {
            assert!(!in_ci(), "a real kube-apiserver is needed in CI: {e}");
            eprintln!("\n*** no real kube-apiserver ({e}): skipped ***\n");
            return;
        }
    };
    let plane = ControlPlane::start(Options::new(binaries)).expect("control plane");
    let objects = serde_json::json!({"apiVersion": "v1", "kind": "List", "items": [
        kube_ovn_cni("kube-ovn-cni", "docker.io/kubeovn/kube-ovn:v1.13.13", &[
            "--enable-mirror=false",
            "--service-cluster-ip-range=10.233.0.0/18",
            "--cluster-router=vpc-main",
            "--enable-tproxy=true",
        ]),
        kube_ovn_cni("kube-ovn-cni-next", "docker.io/kubeovn/kube-ovn:v1.15.0", &[]),
    ]});
    plane
        .kubectl_stdin(&["apply", "-f", "-"], &objects.to_string())
        .expect("create the DaemonSets");
    let kubeconfig = plane.kubeconfig_path().to_owned();

    let (checks, status) = preflight(
        &kubeconfig,
        &[
            "--service-cluster-ip-range",
            "10.233.0.0/18",
            "--enable-tproxy",
        ],
    );
    let verdict = |name: &str| {
        checks
            .iter()
            .find(|c| c.0 == name)
            .unwrap_or_else(|| panic!("no {name} check in {checks:?}"))
            .clone()
    };
    assert_eq!(checks.len(), 4, "{checks:?}");
    assert_eq!(verdict("kube-ovn").1, "ok", "{checks:?}");
    assert!(verdict("kube-ovn").2.contains("v1.13.13"));
    assert_eq!(verdict("service-cidr").1, "ok", "{checks:?}");
    assert_eq!(verdict("tproxy").1, "ok", "{checks:?}");
    let (_, v, detail) = verdict("cluster-router");
    assert_eq!(v, "fail");
    assert!(
        detail.contains("vpc-main") && detail.contains("ovn-cluster"),
        "{detail}"
    );
    assert_eq!(status, Some(1), "a mismatch fails preflight");

    // Another DaemonSet by flag: an untested version warns; its defaults meet ours.
    let (checks, _) = preflight(
        &kubeconfig,
        &["--kube-ovn-cni", "kube-system/kube-ovn-cni-next"],
    );
    let by = |name: &str| checks.iter().find(|c| c.0 == name).cloned().unwrap();
    assert_eq!(by("kube-ovn").1, "warn", "{checks:?}");
    assert!(by("kube-ovn").2.contains("v1.15.0"));
    for name in ["service-cidr", "cluster-router", "tproxy"] {
        assert_eq!(by(name).1, "ok", "{checks:?}");
    }

    // No such DaemonSet: one warning that names it.
    let (checks, _) = preflight(&kubeconfig, &["--kube-ovn-cni", "kube-system/absent"]);
    assert_eq!(checks.len(), 1, "{checks:?}");
    assert_eq!(checks[0].1, "warn");
    assert!(checks[0].2.contains("kube-system/absent"), "{checks:?}");

    let (checks, _) = preflight(&kubeconfig, &["--kube-ovn-cni", "none"]);
    assert!(checks.is_empty(), "{checks:?}");
}
