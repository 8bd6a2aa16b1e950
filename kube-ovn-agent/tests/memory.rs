//! Memory at scale (issue 13 item 7): what the sources keep per Service, and that new versions of
//! a cluster file leave no more behind than the first.
//!
//! Heap bytes are counted exactly by a counting global allocator (this test binary's own), so
//! the per-Service bounds do not depend on the machine; resident memory (`VmRSS`) is checked as
//! well, because glibc's allocator may keep memory that was freed (the five-reload growth the
//! issue measured).

mod support;

use std::{
    alloc::{GlobalAlloc, Layout, System},
    path::Path,
    sync::Arc,
    sync::{
        Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{FieldsV1, ManagedFieldsEntry};
use kube_ovn_agent::{
    cluster::Snapshot,
    source::{
        file::{self, FileOptions},
        kube::{self, KubeOptions},
    },
    testing::{
        apiserver::{ApiServer, Resource},
        objects::{Port, cluster_file, node, service, subnet},
    },
    translate::{Incremental, KubeProxySets, NodeFacts, Options},
};
use support::{TempDir, wait_until};

/// Live heap bytes of this process.
static LIVE: AtomicUsize = AtomicUsize::new(0);

struct Counting;

// SAFETY: every call is forwarded to the system allocator unchanged; only a counter is kept.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller's contract is passed on.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            LIVE.fetch_add(layout.size(), Ordering::Relaxed);
        }
        p
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller's contract is passed on.
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            LIVE.fetch_add(layout.size(), Ordering::Relaxed);
        }
        p
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: the caller's contract is passed on.
        unsafe { System.dealloc(ptr, layout) };
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: the caller's contract is passed on.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            LIVE.fetch_add(new_size, Ordering::Relaxed);
            LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        }
        p
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// The tests count one process-wide heap: one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

/// Services per test: what CI affords in seconds (a debug build parses YAML slowly: some
/// seconds per version at this size on a loaded machine).
const SERVICES: usize = 5_000;

/// New versions of the cluster file the file source reads after the first.
const RELOADS: u16 = 3;

/// Heap bytes the file source may keep per Service (two ports, one ClusterIP): a k8s-openapi
/// `Service` trimmed to what the translation reads.
const FILE_MAX_BYTES_PER_SERVICE: usize = 1_300;

/// Heap bytes the kube source may keep per Service (two ports, one ClusterIP): its projection
/// (`StoredService`) under its `namespace/name` in the source's own Service store. 170 measured
/// (226 once, with the client's buffers counted at a fuller moment); 718 when a kube-rs
/// reflector store held it, with a full `ObjectMeta` and an `ObjectRef` key beside it (940
/// before the projection kept known values as variants, addresses as addresses and dropped port
/// names and the uid).
const KUBE_MAX_BYTES_PER_SERVICE: usize = 300;

fn live() -> usize {
    LIVE.load(Ordering::Relaxed)
}

fn rss_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("VmRSS");
    kib / 1024.0
}

fn mib(bytes: usize) -> f64 {
    #[expect(clippy::cast_precision_loss, reason = "a figure for a message")]
    let bytes = bytes as f64;
    bytes / (1024.0 * 1024.0)
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

/// Replaces `path` by renaming a complete new file over it.
fn replace(path: &Path, text: &str) {
    let next = path.with_extension("next");
    std::fs::write(&next, text).expect("write the next version");
    std::fs::rename(&next, path).expect("rename it over the file");
}

#[test]
fn the_file_source_keeps_a_compact_projection_and_reloads_in_place() {
    let _serial = SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let dir = TempDir::new("memory-file");
    let path = dir.path().join("cluster.yaml");
    replace(&path, &cluster_file(SERVICES, 0));
    let runtime = runtime();
    runtime.block_on(async {
        let before = live();
        let running = file::start(FileOptions {
            poll_interval: Duration::from_millis(50),
            max_bytes: 64 << 20,
            ..FileOptions::new(&path)
        })
        .expect("starting the file source");
        assert_eq!(running.source.snapshot().services.len(), SERVICES);
        let held = live() - before;
        let per_service = held / SERVICES;
        let rss_first = rss_mib();
        eprintln!(
            "file source: {:.1} MiB held ({per_service} B per Service), RSS {rss_first:.1} MiB",
            mib(held)
        );
        assert!(
            per_service <= FILE_MAX_BYTES_PER_SERVICE,
            "the file source keeps {per_service} B per Service (at most \
             {FILE_MAX_BYTES_PER_SERVICE}): it stores more of each object than the translation \
             reads"
        );
        let mut rss_after = rss_first;
        for version in 1..=RELOADS {
            replace(&path, &cluster_file(SERVICES, version));
            // Longer than `support::TIMEOUT`: a debug build parses slowly.
            let applied = tokio::time::timeout(Duration::from_mins(2), async {
                while running.source.status().kinds["Service"].relists <= u64::from(version) {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            })
            .await;
            assert!(applied.is_ok(), "version {version} was not applied");
            let now = live() - before;
            rss_after = rss_mib();
            eprintln!(
                "after reload {version}: {:.1} MiB held, RSS {rss_after:.1} MiB",
                mib(now)
            );
            assert!(
                now <= held + held / 10,
                "reload {version}: {:.1} MiB held against {:.1} MiB after the first read",
                mib(now),
                mib(held)
            );
        }
        // What glibc keeps of the parse garbage of the versions read must not pile up: at most a
        // quarter of the first version's parse again (a version's text and YAML tree are
        // several times the objects it leaves).
        assert!(
            rss_after - rss_first <= 0.25 * rss_first.max(mib(held) * 4.0),
            "RSS grew from {rss_first:.1} MiB to {rss_after:.1} MiB over {RELOADS} reloads"
        );
    });
}

#[test]
fn the_kube_source_keeps_a_compact_projection() {
    let _serial = SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let runtime = runtime();
    runtime.block_on(async {
        let server = ApiServer::start(&[Resource::ServiceCidrs]).await;
        {
            let mut cluster = server.cluster();
            cluster.apply(Resource::Subnets, &subnet("ovn-default", "10.16.0.0/16"));
            cluster.apply(Resource::Nodes, &node("n1", &["192.168.0.11"]));
            for i in 0..SERVICES {
                let [_, a, b, c] = u32::try_from(i).expect("small").to_be_bytes();
                let mut svc = service(
                    &format!("bench/svc-{i}"),
                    "ClusterIP",
                    &[&format!("10.{}.{b}.{c}", 96 + a)],
                    &[Port("TCP", 80, None), Port("TCP", 443, None)],
                    false,
                );
                // What the API serves and the source must drop.
                svc.metadata.uid = Some(format!("5f1c2a4e-0000-4000-8000-{i:012}"));
                svc.metadata.labels = Some([("app".into(), format!("svc-{i}"))].into());
                svc.metadata.managed_fields = Some(vec![ManagedFieldsEntry {
                    manager: Some("kubectl".into()),
                    operation: Some("Update".into()),
                    fields_v1: Some(FieldsV1(serde_json::json!({
                        "f:spec": {"f:ports": {}, "f:selector": {}, "f:type": {}}
                    }))),
                    ..ManagedFieldsEntry::default()
                }]);
                let spec = svc.spec.as_mut().expect("spec");
                spec.selector = Some([("app".into(), format!("svc-{i}"))].into());
                spec.session_affinity = Some("None".into());
                spec.ip_families = Some(vec!["IPv4".into()]);
                cluster.apply(Resource::Services, &svc);
            }
            // The server's encoded list items are the server's memory, not the source's.
            cluster.warm_lists();
        }
        let before = live();
        let running = kube::start_with_client(server.client(), &KubeOptions::new("n1"))
            .expect("starting the kube source");
        wait_until("every kind listed", || running.source.status().all_listed()).await;
        // The list pages and their decoded objects are released once the watch runs.
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(running.source.snapshot().services.len(), SERVICES);
        // The client, the watch tasks and their buffers, whatever the count.
        let fixed = 1 << 20;
        let held = live().saturating_sub(before);
        let per_service = held.saturating_sub(fixed) / SERVICES;
        eprintln!(
            "kube source: {:.1} MiB held ({per_service} B per Service over a fixed 1 MiB), \
             RSS {:.1} MiB",
            mib(held),
            rss_mib()
        );
        assert!(
            per_service <= KUBE_MAX_BYTES_PER_SERVICE,
            "the kube source keeps {per_service} B per Service (at most \
             {KUBE_MAX_BYTES_PER_SERVICE}): its store holds more of each object than the \
             translation reads"
        );
        drop(running);
    });
}

/// Heap bytes the incremental translation may keep per Service (two ports): its contribution,
/// the contributor counts of its keys and the desired map state they make. 175 measured; 427
/// when each contribution was kept as seven vectors.
const ENGINE_MAX_BYTES_PER_SERVICE: usize = 250;

#[test]
fn the_translation_engine_keeps_little_per_service() {
    let _serial = SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let mut snapshot = Snapshot {
        subnets: vec![Arc::new(subnet("ovn-default", "10.16.0.0/16"))],
        nodes: vec![Arc::new(node("n1", &["192.168.0.11"]))],
        ..Snapshot::default()
    };
    for i in 0..SERVICES {
        let [_, a, b, c] = u32::try_from(i).expect("small").to_be_bytes();
        snapshot.services.push(Arc::new(service(
            &format!("bench/svc-{i}"),
            "ClusterIP",
            &[&format!("10.{}.{b}.{c}", 96 + a)],
            &[Port("TCP", 80, None), Port("TCP", 443, None)],
            false,
        )));
    }
    let facts = NodeFacts {
        node_name: "n1".into(),
        local_v4: ["192.168.0.11/32".parse().expect("CIDR")].into(),
        ..NodeFacts::default()
    };
    let options = Options {
        kube_proxy_sets: KubeProxySets::IPVS,
        ..Options::default()
    };
    let before = live();
    let mut engine = Incremental::default();
    engine.reset(&snapshot);
    engine.translate(&facts, &options);
    let held = live() - before;
    assert_eq!(
        engine.desired().v4.service_ports.len(),
        2 * SERVICES,
        "every port is programmed"
    );
    let per_service = held / SERVICES;
    eprintln!(
        "translation engine: {:.1} MiB held ({per_service} B per Service)",
        mib(held)
    );
    assert!(
        per_service <= ENGINE_MAX_BYTES_PER_SERVICE,
        "the incremental translation keeps {per_service} B per Service (at most \
         {ENGINE_MAX_BYTES_PER_SERVICE})"
    );
}
