//! Shared by the test binaries (source tests, deploy and chart checks): the maps a snapshot programs, bounded waits, temporary files.
#![allow(
    dead_code,
    reason = "each test binary uses a different part of these helpers"
)]

use std::{
    future::Future,
    path::{Path, PathBuf},
    sync::atomic::{AtomicU32, Ordering},
    time::Duration,
};

use kube_ovn_agent::{
    cluster::Snapshot,
    datapath::maps::Tables,
    source::{ClusterSource, SourceStatus},
    state::MapState,
    translate::{KubeProxySets, NodeFacts, Options, translate},
};

/// Upper bound of every wait: the kube watcher's first retry backs off up to ~1.6 s.
pub const TIMEOUT: Duration = Duration::from_secs(30);

/// Node n1 of spec §5.1, kube-proxy in IPVS mode (R1a, R2, R3: every Service-derived set).
pub fn options() -> Options {
    Options {
        service_cluster_ip_range: vec![
            "10.96.0.0/12".parse().expect("CIDR"),
            "fd00:10:96::/112".parse().expect("CIDR"),
        ],
        kube_proxy_sets: KubeProxySets::IPVS,
        ..Options::default()
    }
}

pub fn node_facts() -> NodeFacts {
    NodeFacts {
        node_name: "n1".into(),
        ..NodeFacts::default()
    }
}

/// The desired map state for a snapshot built with `testing::objects`.
pub fn expected(snapshot: &Snapshot) -> MapState {
    expected_with(snapshot, &options())
}

pub fn expected_with(snapshot: &Snapshot, options: &Options) -> MapState {
    let translation = translate(snapshot, &node_facts(), options);
    assert!(
        translation.issues.is_empty(),
        "expected cluster has issues: {:?}",
        translation.issues
    );
    translation.desired
}

/// What fresh in-memory maps hold after syncing what a source delivered.
pub fn programmed(snapshot: &Snapshot, options: &Options) -> MapState {
    let translation = translate(snapshot, &node_facts(), options);
    let mut tables = Tables::in_memory();
    let report = tables.apply(&translation.desired, true);
    assert!(report.errors.is_empty(), "map sync: {:?}", report.errors);
    tables.current()
}

/// Waits until the maps programmed from `source` equal `want`.
pub async fn converge(source: &dyn ClusterSource, want: &MapState, what: &str) {
    converge_with(source, want, &options(), what).await;
}

pub async fn converge_with(
    source: &dyn ClusterSource,
    want: &MapState,
    options: &Options,
    what: &str,
) {
    let reached = within(async {
        loop {
            if programmed(&source.snapshot(), options) == *want {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(
        reached.is_some(),
        "{what}: maps did not converge within {TIMEOUT:?}\n want: {want:?}\n have: {:?}\n status: {:?}",
        programmed(&source.snapshot(), options),
        source.status()
    );
}

/// Waits until `condition` holds; panics naming `what` after [`TIMEOUT`].
pub async fn wait_until(what: &str, mut condition: impl FnMut() -> bool) {
    let reached = within(async {
        while !condition() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(
        reached.is_some(),
        "timed out after {TIMEOUT:?} waiting for {what}"
    );
}

pub async fn within<T>(future: impl Future<Output = T>) -> Option<T> {
    tokio::time::timeout(TIMEOUT, future).await.ok()
}

/// Errors counted over every kind.
pub fn errors(status: &SourceStatus) -> u64 {
    status.kinds.values().map(|k| k.errors).sum()
}

/// A directory removed when dropped.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(name: &str) -> Self {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let path = std::env::temp_dir().join(format!(
            "kovn-{name}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        Self(path)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// An example value of a `fieldRef` the kubelet fills in.
pub fn example_field(path: &str) -> Option<&'static str> {
    match path {
        "status.hostIP" => Some("192.168.0.11"),
        "spec.nodeName" => Some("n1"),
        _ => None,
    }
}

/// The container's args as the kubelet passes them: each `$(NAME)` of an env var set from a
/// `fieldRef` replaced by an example of that field.
pub fn expanded_args(container: &k8s_openapi::api::core::v1::Container) -> Vec<String> {
    let values: Vec<(String, &str)> = container
        .env
        .iter()
        .flatten()
        .filter_map(|e| {
            let path = &e.value_from.as_ref()?.field_ref.as_ref()?.field_path;
            Some((format!("$({})", e.name), example_field(path)?))
        })
        .collect();
    container
        .args
        .iter()
        .flatten()
        .map(|arg| {
            values
                .iter()
                .fold(arg.clone(), |arg, (name, value)| arg.replace(name, value))
        })
        .collect()
}
