//! `--source kube` against a local API server that speaks the real list/watch protocol
//! (`kube_ovn_agent::testing::apiserver`): lists, watch events, bookmarks, `410 Gone`, dropped connections and
//! an API the cluster does not serve. In each case the maps programmed from the source's snapshot
//! must converge to what the same cluster, built with `testing::objects`, programs.

mod support;

use std::{sync::Arc, time::Duration};

use k8s_openapi::{
    api::core::v1::{Container, Pod, PodSpec},
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use kube_ovn_agent::testing::apiserver::{self, ApiServer, End, Resource};
use kube_ovn_agent::{
    cluster::{Snapshot, object_name},
    source::{
        Running,
        kube::{self, KubeOptions},
    },
    testing::objects::{Port, node, service, service_cidr, spec_cluster, subnet},
    translate::{KubeProxySets, Options},
};
use support::{converge, converge_with, errors, expected, expected_with, wait_until};

/// Loads every object of `snapshot` into the server.
fn load(server: &ApiServer, snapshot: &Snapshot) {
    let mut cluster = server.cluster();
    for o in &snapshot.subnets {
        cluster.apply(Resource::Subnets, &**o);
    }
    for o in &snapshot.services {
        cluster.apply(Resource::Services, &**o);
    }
    for o in &snapshot.nodes {
        cluster.apply(Resource::Nodes, &**o);
    }
    for o in &snapshot.service_cidrs {
        cluster.apply(Resource::ServiceCidrs, &**o);
    }
}

fn pod(name: &str, node: &str) -> Pod {
    Pod {
        metadata: ObjectMeta {
            name: Some(name.into()),
            namespace: Some("default".into()),
            ..ObjectMeta::default()
        },
        spec: Some(PodSpec {
            node_name: Some(node.into()),
            containers: vec![Container {
                name: "c".into(),
                image: Some("busybox".into()),
                ..Container::default()
            }],
            ..PodSpec::default()
        }),
        status: None,
    }
}

fn start(server: &ApiServer, options: &KubeOptions) -> Running {
    kube::start_with_client(server.client(), options).expect("starting the kube source")
}

/// Waits until the source listed every kind and watches every served resource.
async fn listed_and_watching(server: &ApiServer, running: &Running, resources: &[Resource]) {
    wait_until("every kind listed", || running.source.status().all_listed()).await;
    wait_until("a watch on every resource", || {
        resources.iter().all(|r| server.live_watches(*r) > 0)
    })
    .await;
}

const WATCHED: [Resource; 3] = [Resource::Subnets, Resource::Services, Resource::Nodes];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lists_then_follows_added_modified_deleted_and_bookmarks() {
    let server = ApiServer::start(&[Resource::ServiceCidrs]).await;
    load(&server, &spec_cluster());
    let mut running = start(&server, &KubeOptions::new("n1"));
    listed_and_watching(&server, &running, &WATCHED).await;
    converge(&*running.source, &expected(&spec_cluster()), "initial list").await;

    let status = running.source.status();
    let cidrs = &status.kinds["ServiceCIDR"];
    assert!(
        cidrs.listed && cidrs.objects == 0,
        "an unserved API is listed and empty: {cidrs:?}"
    );
    assert_eq!(
        errors(&status),
        0,
        "an unserved optional API is no error: {status:?}"
    );
    assert_eq!(status.kinds["Service"].objects, 4);
    assert!(!status.kinds.contains_key("Pod"), "Pods only on request");
    assert!(
        server
            .requests()
            .iter()
            .all(|r| r.resource != Some(Resource::Pods))
    );
    // Trimmed in `.modify()`: managedFields and last-applied annotations are not kept.
    for s in &running.source.snapshot().services {
        assert!(s.metadata.managed_fields.is_none() && s.metadata.annotations.is_none());
    }
    running.changes.borrow_and_update();

    // Watch events: ADDED, MODIFIED, DELETED, with a BOOKMARK in between.
    let mut want = spec_cluster();
    {
        let mut cluster = server.cluster();
        let web = service(
            "default/web",
            "NodePort",
            &["10.96.0.50"],
            &[Port("UDP", 5000, Some(30500))],
            true,
        );
        cluster.apply(Resource::Services, &web);
        want.services.push(Arc::new(web));
        cluster.bookmark();
        let n3 = node("n3", &["192.168.0.13", "fd00::13"]);
        cluster.apply(Resource::Nodes, &n3);
        want.nodes[2] = Arc::new(n3);
        cluster.delete(Resource::Subnets, "central");
        want.subnets
            .retain(|s| object_name(&s.metadata) != "central");
    }
    converge(&*running.source, &expected(&want), "after watch events").await;
    assert!(
        running.changes.has_changed().unwrap(),
        "no change notification"
    );

    // No relist was needed, nothing failed.
    for r in WATCHED {
        assert_eq!(server.lists(r), 1, "{r:?} listed again");
    }
    let status = running.source.status();
    assert_eq!(errors(&status), 0, "{status:?}");
    assert_eq!(status.kinds["Service"].objects, 5);
    assert_eq!(status.kinds["Subnet"].objects, 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pods_are_watched_on_this_node_only() {
    let server = ApiServer::start(&[Resource::ServiceCidrs]).await;
    load(&server, &spec_cluster());
    {
        let mut cluster = server.cluster();
        cluster.apply(Resource::Pods, &pod("here", "n1"));
        cluster.apply(Resource::Pods, &pod("elsewhere", "n2"));
    }
    let options = KubeOptions {
        watch_pods: true,
        ..KubeOptions::new("n1")
    };
    let running = start(&server, &options);
    listed_and_watching(&server, &running, &[Resource::Pods]).await;
    let pod_watch = &server.watches(Resource::Pods)[0];
    assert_eq!(
        pod_watch.field_selector.as_deref(),
        Some("spec.nodeName=n1")
    );
    let names = || -> Vec<String> {
        let mut n: Vec<String> = running
            .source
            .snapshot()
            .pods
            .iter()
            .map(|p| object_name(&p.metadata))
            .collect();
        n.sort();
        n
    };
    assert_eq!(names(), ["default/here"]);
    // Trimmed: containers keep ports and probes only.
    let snapshot = running.source.snapshot();
    let container = &snapshot.pods[0].spec.as_ref().unwrap().containers[0];
    assert!(container.image.is_none());

    {
        let mut cluster = server.cluster();
        cluster.apply(Resource::Pods, &pod("new-here", "n1"));
        cluster.apply(Resource::Pods, &pod("new-elsewhere", "n3"));
        // A pod moving away leaves the selection: a DELETED event for this watch.
        cluster.apply(Resource::Pods, &pod("here", "n2"));
    }
    wait_until("pod events", || names() == ["default/new-here"]).await;
    assert_eq!(running.source.status().kinds["Pod"].objects, 1);
    assert_eq!(server.lists(Resource::Pods), 1);
    // Pods do not change the maps.
    converge(&*running.source, &expected(&spec_cluster()), "with pods").await;
}

/// Changes the server makes while the client is disconnected, mirrored into `want`.
fn offline_changes(cluster: &mut apiserver::Cluster, want: &mut Snapshot) {
    cluster.delete(Resource::Services, "default/np-cluster");
    want.services
        .retain(|s| object_name(&s.metadata) != "default/np-cluster");
    cluster.delete(Resource::Nodes, "n3");
    want.nodes.retain(|n| object_name(&n.metadata) != "n3");
    let extra = subnet("extra", "10.18.0.0/16");
    cluster.apply(Resource::Subnets, &extra);
    want.subnets.push(Arc::new(extra));
}

fn add_service(cluster: &mut apiserver::Cluster, want: &mut Snapshot, name: &str, ip: &str) {
    let s = service(name, "ClusterIP", &[ip], &[Port("TCP", 80, None)], false);
    cluster.apply(Resource::Services, &s);
    want.services.push(Arc::new(s));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_410_gone_on_resume_makes_the_client_relist() {
    let server = ApiServer::start(&[Resource::ServiceCidrs]).await;
    load(&server, &spec_cluster());
    let running = start(&server, &KubeOptions::new("n1"));
    listed_and_watching(&server, &running, &WATCHED).await;
    converge(&*running.source, &expected(&spec_cluster()), "initial list").await;

    // The connection breaks, the cluster changes and the server compacts its history: resuming
    // from the last resourceVersion gets an ERROR event with a 410 Expired Status.
    let mut want = spec_cluster();
    {
        let mut cluster = server.cluster();
        cluster.end_watches(End::Drop);
        offline_changes(&mut cluster, &mut want);
        cluster.compact();
    }
    converge(&*running.source, &expected(&want), "after 410 and relist").await;

    for r in WATCHED {
        assert_eq!(server.lists(r), 2, "{r:?} must relist after 410");
        let resumed = &server.watches(r)[1];
        assert_eq!(
            resumed.resource_version.as_deref().map(str::parse::<u64>),
            Some(Ok(server.last_disconnect(r).unwrap())),
            "{r:?} resumed from its last resourceVersion first"
        );
    }
    let status = running.source.status();
    assert!(
        status.kinds["Service"].errors >= 1,
        "the 410 is counted: {status:?}"
    );
    assert!(status.all_listed());
    // The source keeps watching after the error.
    add_service(
        &mut server.cluster(),
        &mut want,
        "default/late",
        "10.96.0.70",
    );
    converge(&*running.source, &expected(&want), "after recovery").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_410_gone_error_event_on_an_open_watch_makes_the_client_relist() {
    let server = ApiServer::start(&[Resource::ServiceCidrs]).await;
    load(&server, &spec_cluster());
    let running = start(&server, &KubeOptions::new("n1"));
    listed_and_watching(&server, &running, &WATCHED).await;
    converge(&*running.source, &expected(&spec_cluster()), "initial list").await;

    let mut want = spec_cluster();
    {
        let mut cluster = server.cluster();
        // `410 Expired` on the open watches, then changes the client only sees by relisting.
        cluster.end_watches(End::Expire);
        offline_changes(&mut cluster, &mut want);
        cluster.compact();
    }
    converge(
        &*running.source,
        &expected(&want),
        "after ERROR 410 and relist",
    )
    .await;
    for r in WATCHED {
        assert_eq!(server.lists(r), 2, "{r:?} must relist after 410");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_connection_resumes_from_the_last_resource_version() {
    let server = ApiServer::start(&[Resource::ServiceCidrs]).await;
    load(&server, &spec_cluster());
    let running = start(&server, &KubeOptions::new("n1"));
    listed_and_watching(&server, &running, &WATCHED).await;
    converge(&*running.source, &expected(&spec_cluster()), "initial list").await;

    let mut want = spec_cluster();
    for (round, how) in [End::Drop, End::Close].into_iter().enumerate() {
        // A live event first, so the resume point is an event's resourceVersion, not the list's.
        let live = format!("default/live-{round}");
        add_service(
            &mut server.cluster(),
            &mut want,
            &live,
            &format!("10.96.1.{round}"),
        );
        converge(&*running.source, &expected(&want), "a live event").await;
        let before: Vec<usize> = WATCHED.iter().map(|r| server.watches(*r).len()).collect();
        {
            let mut cluster = server.cluster();
            cluster.end_watches(how);
            // Changes while disconnected stay in the history and are replayed on resume.
            if round == 0 {
                offline_changes(&mut cluster, &mut want);
            } else {
                cluster.delete(Resource::Services, "default/live-0");
                want.services
                    .retain(|s| object_name(&s.metadata) != "default/live-0");
                cluster.delete(Resource::Subnets, "central");
                want.subnets
                    .retain(|s| object_name(&s.metadata) != "central");
            }
        }
        converge(
            &*running.source,
            &expected(&want),
            &format!("after {how:?}"),
        )
        .await;
        for (r, before) in WATCHED.into_iter().zip(before) {
            wait_until("a new watch", || server.watches(r).len() > before).await;
            let resumed = &server.watches(r)[before];
            assert_eq!(
                resumed.resource_version.as_deref().map(str::parse::<u64>),
                Some(Ok(server.last_disconnect(r).unwrap())),
                "{how:?}: {r:?} resumes where its watch stopped"
            );
            assert_eq!(server.lists(r), 1, "{how:?}: {r:?} must not relist");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bookmark_moves_the_resume_point_past_a_compaction() {
    let server = ApiServer::start(&[Resource::ServiceCidrs]).await;
    load(&server, &spec_cluster());
    let running = start(&server, &KubeOptions::new("n1"));
    listed_and_watching(&server, &running, &WATCHED).await;
    converge(&*running.source, &expected(&spec_cluster()), "initial list").await;

    // Nodes change; Subnets and Services do not, so their watches' last resourceVersion is the
    // list's. A bookmark carries them forward; after the compaction only that avoids a 410.
    let mut want = spec_cluster();
    for i in 0..5 {
        let n = node(&format!("extra-{i}"), &[&format!("192.168.1.{i}")]);
        server.cluster().apply(Resource::Nodes, &n);
        want.nodes.push(Arc::new(n));
    }
    converge(&*running.source, &expected(&want), "node events").await;
    let bookmark = {
        let mut cluster = server.cluster();
        cluster.bookmark();
        cluster.end_watches(End::Close);
        cluster.compact();
        cluster.resource_version()
    };
    for r in WATCHED {
        wait_until("the resumed watch", || server.watches(r).len() >= 2).await;
        assert_eq!(
            server.watches(r)[1].resource_version.as_deref(),
            Some(bookmark.to_string().as_str()),
            "{r:?} resumes at the bookmark"
        );
    }
    let n = node("after", &["192.168.2.1"]);
    server.cluster().apply(Resource::Nodes, &n);
    want.nodes.push(Arc::new(n));
    converge(
        &*running.source,
        &expected(&want),
        "after the bookmark resume",
    )
    .await;
    for r in WATCHED {
        assert_eq!(
            server.lists(r),
            1,
            "{r:?} relisted although the bookmark was current"
        );
        assert!(server.watches(r).iter().all(|w| w.status == 200));
    }
    assert_eq!(errors(&running.source.status()), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_continue_token_restarts_a_paged_list() {
    let server = ApiServer::start(&[Resource::ServiceCidrs]).await;
    let mut want = spec_cluster();
    // More Services than the watcher's page size (500).
    for i in 0..600u16 {
        want.services.push(Arc::new(service(
            &format!("bulk/svc-{i:03}"),
            "ClusterIP",
            &[&format!("10.97.{}.{}", i / 250, i % 250 + 1)],
            &[Port("TCP", 80, None), Port("UDP", 53, None)],
            false,
        )));
    }
    load(&server, &want);
    server.cluster().expire_next_continue();
    let running = start(&server, &KubeOptions::new("n1"));
    wait_until("every kind listed", || running.source.status().all_listed()).await;
    converge(&*running.source, &expected(&want), "paged list after 410").await;

    let requests = server.requests();
    let services: Vec<_> = requests
        .iter()
        .filter(|r| r.resource == Some(Resource::Services) && !r.watch)
        .map(|r| (r.continue_token.is_some(), r.status))
        .collect();
    // First page, expired continue (HTTP 410), then a complete list from scratch.
    assert_eq!(
        services,
        [(false, 200), (true, 410), (false, 200), (true, 200)]
    );
    assert_eq!(running.source.status().kinds["Service"].objects, 604);
    assert!(running.source.status().kinds["Service"].errors >= 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn service_cidrs_are_used_once_the_api_is_served() {
    // R1b reads ovnX0services: ServiceCIDR objects when ready ones exist, the flag otherwise.
    let iptables = Options {
        kube_proxy_sets: KubeProxySets::default(),
        ..support::options()
    };
    let server = ApiServer::start(&[Resource::ServiceCidrs]).await;
    load(&server, &spec_cluster());
    let options = KubeOptions {
        absent_api_recheck: Duration::from_millis(200),
        ..KubeOptions::new("n1")
    };
    let running = start(&server, &options);
    listed_and_watching(&server, &running, &WATCHED).await;
    converge_with(
        &*running.source,
        &expected_with(&spec_cluster(), &iptables),
        &iptables,
        "flag range",
    )
    .await;
    assert_eq!(errors(&running.source.status()), 0);

    // The cluster is upgraded: the API appears with a ready ServiceCIDR.
    let mut want = spec_cluster();
    let cidr = service_cidr("kubernetes", &["10.96.0.0/16", "fd00:10:96::/112"], true);
    {
        let mut cluster = server.cluster();
        cluster.serve(Resource::ServiceCidrs, true);
        cluster.apply(Resource::ServiceCidrs, &cidr);
    }
    want.service_cidrs.push(Arc::new(cidr));
    let with_cidr = expected_with(&want, &iptables);
    assert_ne!(with_cidr, expected_with(&spec_cluster(), &iptables));
    converge_with(
        &*running.source,
        &with_cidr,
        &iptables,
        "ServiceCIDR from the API",
    )
    .await;

    // And follows it: a not-ready ServiceCIDR no longer counts.
    let not_ready = service_cidr("kubernetes", &["10.96.0.0/16", "fd00:10:96::/112"], false);
    server.cluster().apply(Resource::ServiceCidrs, &not_ready);
    converge_with(
        &*running.source,
        &expected_with(&spec_cluster(), &iptables),
        &iptables,
        "not ready",
    )
    .await;
    assert_eq!(errors(&running.source.status()), 0);
}

/// Spec §9.4: kube-proxy lists Services with
/// `!service.kubernetes.io/service-proxy-name,!service.kubernetes.io/headless`; so does the
/// source, and a Service that gains or loses such a label leaves or joins the maps.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn services_kube_proxy_ignores_by_label_are_not_programmed() {
    fn labelled(name: &str, label: &str, ip: &str) -> k8s_openapi::api::core::v1::Service {
        let mut s = service(
            name,
            "NodePort",
            &[ip],
            &[Port("TCP", 80, Some(31080))],
            true,
        );
        s.metadata.labels = Some([(label.to_owned(), "x".to_owned())].into());
        s
    }
    let server = ApiServer::start(&[Resource::ServiceCidrs]).await;
    load(&server, &spec_cluster());
    {
        let mut cluster = server.cluster();
        cluster.apply(
            Resource::Services,
            &labelled(
                "default/other-proxy",
                "service.kubernetes.io/service-proxy-name",
                "10.96.5.1",
            ),
        );
        cluster.apply(
            Resource::Services,
            &labelled(
                "default/headless",
                "service.kubernetes.io/headless",
                "10.96.5.2",
            ),
        );
    }
    let running = start(&server, &KubeOptions::new("n1"));
    listed_and_watching(&server, &running, &WATCHED).await;
    converge(&*running.source, &expected(&spec_cluster()), "initial list").await;
    assert_eq!(running.source.status().kinds["Service"].objects, 4);
    let selectors: Vec<Option<String>> = server
        .requests()
        .iter()
        .filter(|r| r.resource == Some(Resource::Services))
        .map(|r| r.label_selector.clone())
        .collect();
    assert!(
        !selectors.is_empty()
            && selectors.iter().all(|s| s.as_deref()
                == Some(
                    "!service.kubernetes.io/service-proxy-name,!service.kubernetes.io/headless"
                )),
        "{selectors:?}"
    );

    // np-local gets another proxy's label: it leaves kube-proxy's sets, and ours.
    let mut np_local = spec_cluster()
        .services
        .iter()
        .find(|s| object_name(&s.metadata) == "default/np-local")
        .map(|s| (**s).clone())
        .expect("fixture Service");
    np_local.metadata.labels = Some(
        [(
            "service.kubernetes.io/service-proxy-name".to_owned(),
            "other".to_owned(),
        )]
        .into(),
    );
    server.cluster().apply(Resource::Services, &np_local);
    let mut want = spec_cluster();
    want.services
        .retain(|s| object_name(&s.metadata) != "default/np-local");
    converge(&*running.source, &expected(&want), "after labelling").await;

    np_local.metadata.labels = None;
    server.cluster().apply(Resource::Services, &np_local);
    converge(
        &*running.source,
        &expected(&spec_cluster()),
        "after unlabelling",
    )
    .await;
}

/// A Subnet whose spec does not decode is rejected alone and named: the rest of the list and
/// later events of every kind are applied; an edit that breaks a Subnet in force keeps its last
/// good version, across a relist too; fixing it takes the fix.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_undecodable_subnet_is_rejected_alone() {
    let server = ApiServer::start(&[Resource::ServiceCidrs]).await;
    let mut want = spec_cluster();
    load(&server, &want);
    // Before the first list: a Subnet the CRD schema let through but our types refuse.
    let bad = serde_json::json!({
        "metadata": {"name": "bad"},
        "spec": {"vpc": "ovn-cluster", "cidrBlock": "10.40.0.0/16", "natOutgoing": "yes"},
    });
    server.cluster().apply(Resource::Subnets, &bad);
    let running = start(&server, &KubeOptions::new("n1"));
    listed_and_watching(&server, &running, &WATCHED).await;
    let subnet_status = || running.source.status().kinds["Subnet"].clone();
    let status = subnet_status();
    assert!(
        status.listed,
        "one bad Subnet must not block the kind: {status:?}"
    );
    assert_eq!(status.rejected, 1, "{status:?}");
    let error = status.last_error.clone().unwrap_or_default();
    assert!(
        error.contains("Subnet bad") && error.contains("expected a boolean"),
        "{error}"
    );
    assert_eq!(status.state_at(apiserver_now()), "watching", "{status:?}");
    converge(
        &*running.source,
        &expected(&want),
        "the list without the bad Subnet",
    )
    .await;

    // Break a Subnet in force, and add a Service: the Service is applied, the Subnet keeps its
    // last good version.
    let central = want
        .subnets
        .iter()
        .find(|s| s.metadata.name.as_deref() == Some("central"))
        .expect("the spec cluster has central")
        .clone();
    let mut broken = serde_json::to_value(&*central).unwrap();
    broken["spec"]["cidrBlock"] = serde_json::json!(["10.17.0.0/16"]);
    {
        let mut cluster = server.cluster();
        cluster.apply(Resource::Subnets, &broken);
        add_service(&mut cluster, &mut want, "web", "10.96.0.50");
    }
    converge(
        &*running.source,
        &expected(&want),
        "the Service despite the broken Subnet",
    )
    .await;
    wait_until("the broken Subnet counted", || {
        subnet_status().rejected == 2
    })
    .await;
    assert!(
        subnet_status()
            .last_error
            .is_some_and(|e| e.contains("Subnet central")),
        "{:?}",
        subnet_status()
    );

    // A relist lists the broken version again: the last good one stays.
    let lists = server.lists(Resource::Subnets);
    server.cluster().end_watches(End::Expire);
    wait_until("a relist", || server.lists(Resource::Subnets) > lists).await;
    listed_and_watching(&server, &running, &WATCHED).await;
    assert_eq!(subnet_status().rejected, 2);
    converge(&*running.source, &expected(&want), "after the relist").await;

    // Fixing it applies the fix.
    let moved = subnet("central", "10.19.0.0/16");
    server.cluster().apply(Resource::Subnets, &moved);
    want.subnets
        .retain(|s| s.metadata.name.as_deref() != Some("central"));
    want.subnets.push(Arc::new(moved));
    converge(&*running.source, &expected(&want), "the fixed Subnet").await;
    assert_eq!(subnet_status().rejected, 1, "only `bad` is left");
    // Deleting the bad one clears it.
    server.cluster().delete(Resource::Subnets, "bad");
    wait_until("no rejected Subnet", || subnet_status().rejected == 0).await;
    assert!(errors(&running.source.status()) >= 2);
}

fn apiserver_now() -> u64 {
    kube_ovn_agent::source::unix_now()
}

/// An API server that accepts connections and never answers is reported after `list_stall`,
/// per kind, instead of minutes of silence; the kinds stay unlisted (nothing is pruned).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_list_that_is_never_answered_is_reported() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    // Accept and hold every connection, answering nothing.
    let holder = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            held.push(socket);
        }
    });
    let client = ::kube::Client::try_from(::kube::Config::new(url.parse().unwrap())).unwrap();
    let options = KubeOptions {
        list_stall: Duration::from_millis(500),
        ..KubeOptions::new("n1")
    };
    let running = kube::start_with_client(client, &options).expect("starting the kube source");
    wait_until("every kind reported as unanswered", || {
        running.source.status().kinds.values().all(|k| {
            k.last_error
                .as_deref()
                .is_some_and(|e| e.contains("no answer to the list for"))
        })
    })
    .await;
    let status = running.source.status();
    assert!(!status.all_listed(), "{status:?}");
    assert!(
        status.kinds.values().all(|k| k.errors >= 1 && !k.listed),
        "{status:?}"
    );
    holder.abort();
}

/// A kind whose list keeps failing is retried with growing, jittered delays (0.8 s doubling to
/// 30 s, up to half again at random), not at a fixed rate; every failure is counted. Failed
/// before the agent had its own retry: kube-rs' backoff restarted at every list attempt, ~1/s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_list_backs_off() {
    // No Subnet CRD: every Subnet list is a 404, an error for a kind that is not optional.
    let server = ApiServer::start(&[Resource::Subnets, Resource::ServiceCidrs]).await;
    load(&server, &Snapshot::default());
    let running = start(&server, &KubeOptions::new("n1"));
    let started = std::time::Instant::now();
    tokio::time::sleep(Duration::from_secs(6)).await;
    let lists = server
        .requests()
        .iter()
        .filter(|r| r.resource == Some(Resource::Subnets) && !r.watch && r.status == 404)
        .count();
    let elapsed = started.elapsed().as_secs_f64();
    // At a fixed ~1 s: 5 or more in 6 s. Backing off (0.8, 1.6, 3.2 s, each up to 1.5×): the
    // fourth attempt comes at 5.6–8.4 s.
    assert!(
        (3..=4).contains(&lists),
        "{lists} Subnet lists in {elapsed:.1} s"
    );
    let subnet = running.source.status().kinds["Subnet"].clone();
    assert!(!subnet.listed, "{subnet:?}");
    assert!(subnet.errors >= 2, "{subnet:?}");
    assert!(running.source.status().kinds["Service"].listed);
}
