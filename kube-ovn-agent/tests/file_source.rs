//! `--source file:PATH` as the agent runs it: the first read, re-reads after each way a file can
//! be replaced, bad versions that must leave the last good state programmed, and bad objects
//! that are rejected alone.

mod support;

use std::{
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use kube_ovn_agent::{
    cluster::Snapshot,
    source::{
        Running, SourceStatus,
        file::{self, FileError, FileOptions},
    },
    testing::objects::{Port, service, spec_cluster},
};
use support::{TempDir, converge, errors, expected, programmed, wait_until, within};

const EXAMPLE: &str = include_str!("../../deploy/examples/cluster.yaml");

/// A Service the example does not have, as YAML and as the builders make it.
const WEB: &str = "---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: default}
spec:
  type: ClusterIP
  clusterIPs: [10.96.0.50]
  ports: [{name: http, protocol: TCP, port: 8080, targetPort: 80}]
";

fn with_web() -> Snapshot {
    let mut snapshot = spec_cluster();
    snapshot.services.push(Arc::new(service(
        "default/web",
        "ClusterIP",
        &["10.96.0.50"],
        &[Port("TCP", 8080, None)],
        false,
    )));
    snapshot
}

fn options(path: &Path) -> FileOptions {
    FileOptions {
        poll_interval: Duration::from_millis(50),
        ..FileOptions::new(path)
    }
}

fn start(path: &Path) -> Running {
    file::start(options(path)).unwrap_or_else(|e| panic!("starting the file source: {e}"))
}

/// Replaces `path` the way `kubectl`-driven tooling should: write a temporary file, rename it.
fn replace(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap_or_else(|e| panic!("{}: {e}", tmp.display()));
    std::fs::rename(&tmp, path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
}

async fn next_change(running: &mut Running, what: &str) {
    let changed = within(running.changes.changed()).await;
    assert!(
        matches!(changed, Some(Ok(()))),
        "no change notification after {what}"
    );
    running.changes.borrow_and_update();
}

fn objects(snapshot: &Snapshot) -> serde_json::Value {
    serde_json::json!({
        "subnets": snapshot.subnets.iter().map(|o| serde_json::to_value(&**o).unwrap()).collect::<Vec<_>>(),
        "services": snapshot.services.iter().map(|o| serde_json::to_value(&**o).unwrap()).collect::<Vec<_>>(),
        "nodes": snapshot.nodes.iter().map(|o| serde_json::to_value(&**o).unwrap()).collect::<Vec<_>>(),
        "serviceCidrs": snapshot.service_cidrs.iter().map(|o| serde_json::to_value(&**o).unwrap()).collect::<Vec<_>>(),
        "pods": snapshot.pods.iter().map(|o| serde_json::to_value(&**o).unwrap()).collect::<Vec<_>>(),
    })
}

#[tokio::test]
async fn the_example_cluster_is_listed_and_programs_the_spec_sets() {
    let dir = TempDir::new("file-example");
    let path = dir.path().join("cluster.yaml");
    std::fs::write(&path, EXAMPLE).unwrap();
    let running = start(&path);

    let status = running.source.status();
    assert!(status.all_listed(), "{status:?}");
    let objects: Vec<(&str, usize)> = status.kinds.iter().map(|(k, s)| (*k, s.objects)).collect();
    assert_eq!(
        objects,
        [
            ("Node", 3),
            ("Pod", 0),
            ("Service", 4),
            ("ServiceCIDR", 0),
            ("Subnet", 5)
        ]
    );
    assert_eq!(errors(&status), 0);
    let want = expected(&spec_cluster());
    assert_eq!(
        programmed(&running.source.snapshot(), &support::options()),
        want
    );
}

#[tokio::test]
async fn a_new_version_is_read_after_rename_rewrite_and_configmap_swap() {
    let dir = TempDir::new("file-reread");
    let path = dir.path().join("cluster.yaml");
    std::fs::write(&path, EXAMPLE).unwrap();
    let mut running = start(&path);
    running.changes.borrow_and_update();

    // Atomic rename (new inode).
    replace(&path, &format!("{EXAMPLE}{WEB}"));
    next_change(&mut running, "a rename").await;
    converge(&*running.source, &expected(&with_web()), "after a rename").await;

    // In-place rewrite (same inode, new mtime and size).
    std::fs::write(&path, EXAMPLE).unwrap();
    next_change(&mut running, "an in-place write").await;
    converge(
        &*running.source,
        &expected(&spec_cluster()),
        "after a rewrite",
    )
    .await;

    // A ConfigMap volume: `cluster.yaml -> ..data/cluster.yaml`, `..data -> ..<version>`; the
    // kubelet swaps `..data` with a rename.
    let volume = TempDir::new("file-configmap");
    let version = |name: &str, text: &str| -> PathBuf {
        let dir = volume.path().join(name);
        std::fs::create_dir(&dir).unwrap();
        std::fs::write(dir.join("cluster.yaml"), text).unwrap();
        dir
    };
    let first = version("..2025_01_01_00_00_00.1", EXAMPLE);
    std::os::unix::fs::symlink(first.file_name().unwrap(), volume.path().join("..data")).unwrap();
    let mounted = volume.path().join("cluster.yaml");
    std::os::unix::fs::symlink("..data/cluster.yaml", &mounted).unwrap();
    let mut running = start(&mounted);
    running.changes.borrow_and_update();
    converge(&*running.source, &expected(&spec_cluster()), "ConfigMap v1").await;

    let second = version("..2025_01_01_00_00_01.2", &format!("{EXAMPLE}{WEB}"));
    let tmp = volume.path().join("..data_tmp");
    std::os::unix::fs::symlink(second.file_name().unwrap(), &tmp).unwrap();
    std::fs::rename(&tmp, volume.path().join("..data")).unwrap();
    std::fs::remove_dir_all(&first).unwrap();
    next_change(&mut running, "a ConfigMap update").await;
    converge(&*running.source, &expected(&with_web()), "ConfigMap v2").await;
    assert_eq!(errors(&running.source.status()), 0);
}

/// Each version unusable as a whole: the substrings its error must contain.
fn bad_files() -> Vec<(&'static str, String, Vec<&'static str>)> {
    let padding = format!("# {}\n", "x".repeat(10_000_000));
    vec![
        (
            "invalid YAML",
            format!("{EXAMPLE}---\napiVersion: v1\nkind: Service\nmetadata:\n  name: [web\n"),
            vec!["invalid YAML", "unclosed bracket", "at line"],
        ),
        (
            "10 MB file",
            format!("{EXAMPLE}{WEB}{padding}"),
            vec!["bytes is more than the limit of 8388608 bytes"],
        ),
    ]
}

/// Each version that adds one bad object to the example: the substrings its error must contain.
fn bad_objects() -> Vec<(&'static str, String, Vec<&'static str>)> {
    vec![
        (
            "unknown kind",
            format!(
                "{EXAMPLE}---\napiVersion: apps/v1\nkind: Deployment\nmetadata: {{name: web, namespace: default}}\n"
            ),
            vec!["document 13", "Deployment default/web", "unknown kind"],
        ),
        (
            "invalid CIDR",
            format!(
                "{EXAMPLE}---\napiVersion: kubeovn.io/v1\nkind: Subnet\nmetadata: {{name: typo}}\nspec: {{vpc: ovn-cluster, cidrBlock: 10.18.0.0/61}}\n"
            ),
            vec![
                "document 13",
                "Subnet typo",
                "invalid CIDR \"10.18.0.0/61\"",
            ],
        ),
        (
            "missing name",
            format!(
                "{EXAMPLE}---\napiVersion: v1\nkind: Service\nmetadata: {{namespace: default}}\nspec: {{clusterIP: 10.96.0.60, ports: [{{port: 80}}]}}\n"
            ),
            vec![
                "document 13",
                "Service <unnamed>",
                "metadata.name is missing",
            ],
        ),
        (
            "bad clusterIP",
            format!("{}{}", EXAMPLE, WEB.replace("10.96.0.50", "10.96.0.500")),
            vec![
                "document 13",
                "Service default/web",
                "invalid clusterIP \"10.96.0.500\"",
            ],
        ),
        (
            "unknown protocol",
            format!(
                "{}{}",
                EXAMPLE,
                WEB.replace("protocol: TCP", "protocol: QUIC")
            ),
            vec!["Service default/web", "unknown port protocol \"QUIC\""],
        ),
    ]
}

/// The last error on any kind that contains every needle.
fn error_with(status: &SourceStatus, needles: &[&str], case: &str) -> String {
    status
        .kinds
        .values()
        .filter_map(|k| k.last_error.clone())
        .find(|m| needles.iter().all(|n| m.contains(n)))
        .unwrap_or_else(|| panic!("{case}: no error containing {needles:?}: {status:?}"))
}

#[tokio::test]
async fn bad_versions_are_rejected_and_the_last_good_state_stays() {
    let dir = TempDir::new("file-bad");
    let path = dir.path().join("cluster.yaml");
    std::fs::write(&path, EXAMPLE).unwrap();
    let mut running = start(&path);
    running.changes.borrow_and_update();
    let good = objects(&running.source.snapshot());
    let want = expected(&spec_cluster());

    for (case, text, needles) in bad_files() {
        let before = errors(&running.source.status());
        replace(&path, &text);
        wait_until(&format!("the {case} version to be rejected"), || {
            errors(&running.source.status()) > before
        })
        .await;
        let status = running.source.status();
        let message = error_with(&status, &needles, case);
        assert!(
            message.starts_with(&path.display().to_string()),
            "{case}: {message}"
        );
        assert!(!message.contains('\n'), "{case}: one line: {message}");
        assert!(status.all_listed(), "{case}: {status:?}");
        assert_eq!(
            objects(&running.source.snapshot()),
            good,
            "{case}: snapshot changed"
        );
        assert_eq!(
            programmed(&running.source.snapshot(), &support::options()),
            want
        );
        assert!(
            !running.changes.has_changed().unwrap(),
            "{case}: spurious change"
        );
    }

    // A good version after the bad ones is taken.
    replace(&path, &format!("{EXAMPLE}{WEB}"));
    next_change(&mut running, "a good version").await;
    converge(&*running.source, &expected(&with_web()), "after recovery").await;
}

/// One bad object is rejected alone (Kube-OVN's controller, too, skips one bad Subnet and carries
/// on): it is named in the error, the rest of its version is applied, and an object that was in
/// force keeps its last good version.
#[tokio::test]
async fn one_bad_object_is_rejected_alone() {
    let dir = TempDir::new("file-bad-object");
    let path = dir.path().join("cluster.yaml");
    std::fs::write(&path, EXAMPLE).unwrap();
    let mut running = start(&path);
    running.changes.borrow_and_update();
    let good = objects(&running.source.snapshot());
    let want = expected(&spec_cluster());

    for (case, text, needles) in bad_objects() {
        let before = errors(&running.source.status());
        replace(&path, &text);
        next_change(&mut running, case).await;
        let status = running.source.status();
        assert!(errors(&status) > before, "{case}: not counted: {status:?}");
        let message = error_with(&status, &needles, case);
        assert!(
            message.starts_with(&path.display().to_string()),
            "{case}: {message}"
        );
        assert!(!message.contains('\n'), "{case}: one line: {message}");
        assert!(status.all_listed(), "{case}: {status:?}");
        assert_eq!(
            objects(&running.source.snapshot()),
            good,
            "{case}: the new bad object is left out, the rest applied"
        );
        assert_eq!(
            programmed(&running.source.snapshot(), &support::options()),
            want,
            "{case}"
        );
    }

    // A bad edit of a Subnet in force, in the same version as a new good Service: the Service
    // is applied and the Subnet keeps programming its last good CIDR.
    let broken = EXAMPLE.replace("cidrBlock: 10.17.0.0/16", "cidrBlock: 10.17.0.0/61");
    assert_ne!(broken, EXAMPLE, "the example has the central Subnet");
    let before = errors(&running.source.status());
    replace(&path, &format!("{broken}{WEB}"));
    next_change(&mut running, "a bad Subnet edit beside a new Service").await;
    let status = running.source.status();
    assert!(errors(&status) > before, "{status:?}");
    error_with(
        &status,
        &["Subnet central", "invalid CIDR \"10.17.0.0/61\""],
        "bad edit",
    );
    converge(
        &*running.source,
        &expected(&with_web()),
        "the good Service applied, the bad Subnet edit not",
    )
    .await;

    // Fixing it takes the new version.
    let moved = EXAMPLE.replace("cidrBlock: 10.17.0.0/16", "cidrBlock: 10.19.0.0/16");
    replace(&path, &moved);
    next_change(&mut running, "the fixed Subnet").await;
    let snapshot = running.source.snapshot();
    let central = snapshot
        .subnets
        .iter()
        .find(|s| s.metadata.name.as_deref() == Some("central"))
        .expect("central");
    assert_eq!(central.spec.cidr_block, "10.19.0.0/16");
}

#[tokio::test]
async fn an_unusable_file_at_start_is_an_error() {
    let dir = TempDir::new("file-start");
    let path = dir.path().join("cluster.yaml");

    let error = file::start(options(&path))
        .err()
        .expect("a missing file is an error");
    assert!(
        matches!(error, FileError::Io { op: "open", .. }),
        "{error:?}"
    );
    assert!(
        error.to_string().starts_with(&path.display().to_string()),
        "{error}"
    );

    std::fs::write(&path, format!("{EXAMPLE}# {}\n", "x".repeat(10_000_000))).unwrap();
    let error = file::start(options(&path))
        .err()
        .expect("10 MB is too large");
    assert!(
        matches!(error, FileError::TooLarge { limit: file::DEFAULT_MAX_BYTES, size, .. } if size > 10_000_000),
        "{error:?}"
    );

    // The limit is a parameter.
    std::fs::write(&path, EXAMPLE).unwrap();
    let small = FileOptions {
        max_bytes: 1024,
        ..options(&path)
    };
    let error = file::start(small).err().expect("over the limit");
    assert!(
        error
            .to_string()
            .ends_with("is more than the limit of 1024 bytes"),
        "{error}"
    );

    std::fs::write(&path, format!("{EXAMPLE}---\nkind: [\n")).unwrap();
    let error = file::start(options(&path)).err().expect("invalid YAML");
    assert!(matches!(error, FileError::Yaml { .. }), "{error:?}");
}

#[tokio::test]
async fn only_this_nodes_pods_are_kept() {
    let dir = TempDir::new("file-pods");
    let path = dir.path().join("cluster.yaml");
    let pod = |name: &str, node: &str| {
        format!(
            "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: default}}\n\
             spec: {{nodeName: {node}, containers: [{{name: c}}]}}\n"
        )
    };
    std::fs::write(
        &path,
        format!("{EXAMPLE}{}{}", pod("a", "n1"), pod("b", "n2")),
    )
    .unwrap();
    let running = file::start(FileOptions {
        node_name: Some("n1".into()),
        ..options(&path)
    })
    .unwrap();
    let pods = running.source.snapshot().pods;
    assert_eq!(pods.len(), 1);
    assert_eq!(pods[0].metadata.name.as_deref(), Some("a"));
    assert_eq!(running.source.status().kinds["Pod"].objects, 1);
}

/// Spec §9.4: Services kube-proxy's label selector leaves out are left out of the file too.
#[tokio::test]
async fn services_kube_proxy_ignores_by_label_are_left_out() {
    let dir = TempDir::new("file-labels");
    let path = dir.path().join("cluster.yaml");
    let labelled = |name: &str, label: &str, ip: &str| {
        format!(
            "---\napiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: default, \
             labels: {{{label}: x}}}}\nspec: {{type: NodePort, externalTrafficPolicy: Local, \
             clusterIPs: [{ip}], ports: [{{port: 80, nodePort: 31080}}]}}\n"
        )
    };
    std::fs::write(
        &path,
        format!(
            "{EXAMPLE}{}{}",
            labelled("a", "service.kubernetes.io/service-proxy-name", "10.96.5.1"),
            labelled("b", "service.kubernetes.io/headless", "10.96.5.2"),
        ),
    )
    .unwrap();
    let running = start(&path);
    assert_eq!(running.source.status().kinds["Service"].objects, 4);
    assert_eq!(
        programmed(&running.source.snapshot(), &support::options()),
        expected(&spec_cluster())
    );
}
