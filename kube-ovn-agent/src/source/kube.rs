//! `--source kube`: kube-rs watchers feeding stores, one task per kind.
//!
//! Each kind is listed and then watched with kube-rs' default backoff; watch errors are counted
//! and retried, never fatal. Objects are trimmed in `.modify()` to the fields the translation (and,
//! for Pods, the TPROXY replacement) reads, so the stores stay small on large clusters; Services,
//! the many, are decoded straight into that projection ([`StoredService`]) and kept in a store
//! of our own ([`services`]); the other kinds in kube-rs reflector stores. A kind is
//! `listed` from its first complete list on; an optional API the server does not serve
//! (ServiceCIDR before Kubernetes 1.33) counts as listed and empty.

use std::{collections::BTreeMap, fmt::Debug, pin::pin, sync::Arc, time::Duration};

use ::kube::{
    Api, Client,
    runtime::{
        WatchStreamExt,
        reflector::{self, ObjectRef, Store, store::Writer},
        watcher::{self, Event},
    },
};
use futures::StreamExt;
use k8s_openapi::{
    api::{
        core::v1::{
            Container, Node, NodeStatus, Pod, PodSpec, PodStatus, Service, ServicePort, ServiceSpec,
        },
        networking::v1::ServiceCIDR,
    },
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use serde::{Deserialize, de::DeserializeOwned};
use tokio::task::JoinSet;
use tracing::{debug, info, warn};

use super::{Changes, ClusterSource, Feed, Journal, Running, SourceStatus};
use crate::{
    cluster::{
        HEADLESS_LABEL, IP_ADDRESS_ANNOTATION, KUBE_PROXY_SERVICE_SELECTOR, Kind,
        SERVICE_PROXY_NAME_LABEL, Snapshot, Subnet, Watched, object_name,
    },
    translate::ServiceView,
};

/// The Pod annotation naming the pod's Subnet (Kube-OVN's `ovn.kubernetes.io/logical_switch`).
pub use crate::cluster::LOGICAL_SWITCH_ANNOTATION;

#[derive(Debug, thiserror::Error)]
pub enum KubeError {
    #[error("no Kubernetes client configuration (in-cluster or kubeconfig): {source}")]
    Config {
        #[source]
        source: ::kube::Error,
    },
    #[error("the kube source must be started from within a tokio runtime")]
    NoRuntime,
}

pub type Result<T, E = KubeError> = std::result::Result<T, E>;

/// What to watch.
#[derive(Clone, Debug)]
pub struct KubeOptions {
    /// This node's name: Pods are watched with `spec.nodeName=<node_name>`.
    pub node_name: String,
    /// Watch this node's Pods (needed by the TPROXY replacement only).
    pub watch_pods: bool,
    /// How long to wait before asking again for an optional API the server did not serve.
    pub absent_api_recheck: Duration,
    /// How long a list may go unanswered before it is reported (an API server that accepts
    /// connections and never answers produces no error of its own for minutes).
    pub list_stall: Duration,
}

impl KubeOptions {
    pub fn new(node_name: impl Into<String>) -> Self {
        Self {
            node_name: node_name.into(),
            watch_pods: false,
            absent_api_recheck: Duration::from_mins(5),
            list_stall: Duration::from_secs(30),
        }
    }
}

/// The kinds a kube source with these options delivers.
pub fn kinds(options: &KubeOptions) -> Vec<Kind> {
    Kind::ALL
        .into_iter()
        .filter(|k| *k != Kind::Pod || options.watch_pods)
        .collect()
}

/// Connects with in-cluster configuration or the kubeconfig (`Client::try_default`) and starts
/// watching.
pub async fn start(options: &KubeOptions) -> Result<Running> {
    let client = Client::try_default()
        .await
        .map_err(|source| KubeError::Config { source })?;
    start_with_client(client, options)
}

/// Starts one watcher task per kind on the current tokio runtime.
pub fn start_with_client(client: Client, options: &KubeOptions) -> Result<Running> {
    let runtime = tokio::runtime::Handle::try_current().map_err(|_| KubeError::NoRuntime)?;
    let (feed, changes) = Feed::new(&kinds(options));
    let journal = Arc::new(Journal::default());
    let mut spawner = Spawner {
        runtime,
        feed: feed.clone(),
        journal: journal.clone(),
        recheck: options.absent_api_recheck,
        stall: options.list_stall,
        tasks: JoinSet::new(),
    };
    // Lists served from the API server's watch cache (resourceVersion=0), not a quorum read of
    // etcd: a DaemonSet's many agents restarting together must not each read every object
    // from etcd; the watch that follows brings the view up to date.
    let all = watcher::Config::default().any_semantic();
    let subnets = spawner.reflect(
        Kind::Subnet,
        Api::all(client.clone()),
        &all,
        trim_subnet,
        |s| s.decode_error.as_deref(),
    );
    // The Services kube-proxy sees: the same label selector as its informers. Decoded straight
    // into what is stored: nothing to trim.
    let proxied = all.clone().labels(KUBE_PROXY_SERVICE_SELECTOR);
    let (services, service_writer) = ServiceStore::new();
    spawner.watch(
        Kind::Service,
        Api::all(client.clone()),
        &proxied,
        |_| {},
        decodes,
        service_writer,
    );
    // Decoded straight into what is stored, like Services: nothing to trim.
    let nodes = spawner.reflect(Kind::Node, Api::all(client.clone()), &all, |_| {}, decodes);
    let service_cidrs = spawner.reflect(
        Kind::ServiceCidr,
        Api::all(client.clone()),
        &all,
        trim_service_cidr,
        decodes,
    );
    let pods = options.watch_pods.then(|| {
        let this_node = all
            .clone()
            .fields(&format!("spec.nodeName={}", options.node_name));
        spawner.reflect(Kind::Pod, Api::all(client), &this_node, trim_pod, decodes)
    });
    let source = KubeSource {
        subnets,
        services,
        nodes,
        service_cidrs,
        pods,
        feed,
        journal,
        _tasks: spawner.tasks,
    };
    Ok(Running {
        source: Arc::new(source),
        changes,
    })
}

struct Spawner {
    runtime: tokio::runtime::Handle,
    feed: Arc<Feed>,
    journal: Arc<Journal>,
    recheck: Duration,
    stall: Duration,
    tasks: JoinSet<()>,
}

impl Spawner {
    /// Spawns the watcher of one kind into a reflector store; returns the store.
    fn reflect<K>(
        &mut self,
        kind: Kind,
        api: Api<K>,
        config: &watcher::Config,
        trim: fn(&mut K),
        problem: fn(&K) -> Option<&str>,
    ) -> Store<K>
    where
        K: ::kube::Resource<DynamicType = ()>
            + Watched
            + Clone
            + DeserializeOwned
            + Debug
            + Send
            + Sync
            + 'static,
    {
        let (reader, writer) = reflector::store();
        let store = Reflected {
            writer,
            reader: reader.clone(),
        };
        self.watch(kind, api, config, trim, problem, store);
        reader
    }

    /// Spawns the watcher of one kind, feeding `store`.
    fn watch<K, S>(
        &mut self,
        kind: Kind,
        api: Api<K>,
        config: &watcher::Config,
        trim: fn(&mut K),
        problem: fn(&K) -> Option<&str>,
        store: S,
    ) where
        K: ::kube::Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug + Send + 'static,
        S: KindStore<K>,
    {
        let watch = Watch {
            kind,
            api,
            config: config.clone(),
            trim,
            problem,
            // Clusters before Kubernetes 1.33 (or with the API disabled) have no ServiceCIDRs.
            optional: kind == Kind::ServiceCidr,
            recheck: self.recheck,
            stall: self.stall,
        };
        self.tasks.spawn_on(
            run(watch, store, self.feed.clone(), self.journal.clone()),
            &self.runtime,
        );
    }
}

/// Where one kind's watch events are kept.
trait KindStore<K>: Send + 'static {
    /// Applies `event` and records it in `journal`: an upsert with the object as stored, a
    /// delete by name, a completed list as a change of the whole view.
    fn apply(&mut self, event: Event<K>, journal: &Journal);
    /// Objects stored.
    fn len(&self) -> usize;
    /// The stored version of `object` (by its name), as the watcher gives it.
    fn stored(&self, object: &K) -> Option<K>;
}

/// A kube-rs reflector store.
struct Reflected<K: ::kube::Resource<DynamicType = ()> + Clone + 'static> {
    writer: Writer<K>,
    reader: Store<K>,
}

impl<K> KindStore<K> for Reflected<K>
where
    K: ::kube::Resource<DynamicType = ()> + Watched + Clone + Send + Sync + 'static,
{
    fn apply(&mut self, event: Event<K>, journal: &Journal) {
        self.writer.apply_watcher_event(&event);
        record(journal, &self.reader, &event);
    }

    fn len(&self) -> usize {
        self.reader.len()
    }

    fn stored(&self, object: &K) -> Option<K> {
        self.reader
            .get(&ObjectRef::from_obj(object))
            .map(|o| (*o).clone())
    }
}

/// The stores of a running kube source. Dropping it stops the watchers.
pub struct KubeSource {
    subnets: Store<Subnet>,
    services: ServiceStore,
    nodes: Store<StoredNode>,
    service_cidrs: Store<ServiceCIDR>,
    pods: Option<Store<Pod>>,
    feed: Arc<Feed>,
    journal: Arc<Journal>,
    /// The watcher tasks, held only so that dropping the source aborts them.
    _tasks: JoinSet<()>,
}

impl KubeSource {
    /// Every kind but Services.
    fn others(&self) -> Snapshot {
        Snapshot {
            subnets: self.subnets.state(),
            services: Vec::new(),
            nodes: self.nodes.state().iter().map(|n| n.0.clone()).collect(),
            service_cidrs: self.service_cidrs.state(),
            pods: self.pods.as_ref().map(Store::state).unwrap_or_default(),
        }
    }
}

impl ClusterSource for KubeSource {
    fn snapshot(&self) -> Snapshot {
        Snapshot {
            // Built on demand: what is stored stays compact.
            services: self.services.services(),
            ..self.others()
        }
    }

    fn read(&self, service: &mut dyn FnMut(&str, &dyn ServiceView)) -> Snapshot {
        self.services.read(service);
        self.others()
    }

    fn status(&self) -> SourceStatus {
        self.feed.status()
    }

    fn take_changes(&self) -> Changes {
        self.journal.take()
    }
}

/// `kube::Resource` for a projection of a core/v1 kind (`kind`, plural `plural`, `scope`), whose
/// metadata `meta`/`meta_mut` reach: the watcher lists and watches the kind's API with it.
macro_rules! core_v1_resource {
    ($ty:ty, $kind:literal, $plural:literal, $scope:ident, $meta:expr, $meta_mut:expr) => {
        impl ::kube::Resource for $ty {
            type DynamicType = ();
            type Scope = ::kube::core::$scope;

            fn kind((): &()) -> std::borrow::Cow<'_, str> {
                $kind.into()
            }
            fn group((): &()) -> std::borrow::Cow<'_, str> {
                "".into()
            }
            fn version((): &()) -> std::borrow::Cow<'_, str> {
                "v1".into()
            }
            fn plural((): &()) -> std::borrow::Cow<'_, str> {
                $plural.into()
            }
            fn meta(&self) -> &ObjectMeta {
                let meta: fn(&Self) -> &ObjectMeta = $meta;
                meta(self)
            }
            fn meta_mut(&mut self) -> &mut ObjectMeta {
                let meta_mut: fn(&mut Self) -> &mut ObjectMeta = $meta_mut;
                meta_mut(self)
            }
        }
    };
}

// After the macro, which it uses.
mod services;

pub use self::services::{ServiceStore, StoredService, WatchedService};

/// A Node as the kube source stores it: decoded straight from the API's JSON into what
/// [`trim_node`] keeps (name, identity, the join-address annotation, the mode label,
/// `status.addresses`), while the rest — a kubelet's image list (up to 50 images, each with its
/// digests), conditions, capacity, managedFields — is skipped by the decoder without being
/// built. Nodes are the largest objects a cluster serves (12 KB each in the control-plane
/// benchmark), so this is most of what listing them costs.
#[derive(Clone, Debug)]
pub struct StoredNode(Arc<Node>);

impl<'de> Deserialize<'de> for StoredNode {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        struct Wire {
            #[serde(deserialize_with = "node_meta")]
            metadata: ObjectMeta,
            #[serde(default)]
            status: Option<WireStatus>,
        }
        #[derive(Deserialize)]
        struct WireStatus {
            #[serde(default)]
            addresses: Option<Vec<k8s_openapi::api::core::v1::NodeAddress>>,
        }
        let wire = Wire::deserialize(deserializer)?;
        Ok(Self(Arc::new(Node {
            metadata: wire.metadata,
            spec: None,
            status: wire.status.map(|status| NodeStatus {
                addresses: status.addresses,
                ..NodeStatus::default()
            }),
        })))
    }
}

/// The metadata [`trim_node`] keeps of a Node, decoded without the rest.
fn node_meta<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<ObjectMeta, D::Error> {
    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Meta {
        #[serde(default)]
        name: Option<String>,
        #[serde(default)]
        namespace: Option<String>,
        #[serde(default)]
        uid: Option<String>,
        #[serde(default)]
        resource_version: Option<String>,
        #[serde(default)]
        deletion_timestamp: Option<k8s_openapi::apimachinery::pkg::apis::meta::v1::Time>,
        #[serde(default)]
        labels: Option<BTreeMap<String, String>>,
        #[serde(default)]
        annotations: Option<BTreeMap<String, String>>,
    }
    let meta = Meta::deserialize(deserializer)?;
    let mut kept = ObjectMeta {
        name: meta.name,
        namespace: meta.namespace,
        uid: meta.uid,
        resource_version: meta.resource_version,
        deletion_timestamp: meta.deletion_timestamp,
        labels: meta.labels,
        annotations: meta.annotations,
        ..ObjectMeta::default()
    };
    trim_meta(
        &mut kept,
        &[IP_ADDRESS_ANNOTATION],
        &[crate::cli::MODE_LABEL],
    );
    Ok(kept)
}

core_v1_resource!(
    StoredNode,
    "Node",
    "nodes",
    ClusterResourceScope,
    |n| &n.0.metadata,
    |n| &mut Arc::make_mut(&mut n.0).metadata
);

impl Watched for StoredNode {
    const KIND: Kind = Kind::Node;
    fn object(this: Arc<Self>) -> crate::cluster::Object {
        crate::cluster::Object::Node(this.0.clone())
    }
    fn meta(&self) -> &ObjectMeta {
        &self.0.metadata
    }
}

/// The k8s-openapi kinds decode whole or fail the list: the API server validated them.
fn decodes<K>(_: &K) -> Option<&str> {
    None
}

/// One kind's watch.
struct Watch<K: ::kube::Resource + Clone> {
    kind: Kind,
    api: Api<K>,
    config: watcher::Config,
    trim: fn(&mut K),
    /// Why an object that decoded cannot be used (see [`Subnet::decode_error`]): it is
    /// rejected alone.
    problem: fn(&K) -> Option<&str>,
    /// The server may not serve this API at all; that is not an error.
    optional: bool,
    recheck: Duration,
    stall: Duration,
}

/// Feeds `writer` from a watcher until the task is aborted.
async fn run<K, S>(w: Watch<K>, mut store: S, feed: Arc<Feed>, journal: Arc<Journal>)
where
    K: ::kube::Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug + Send + 'static,
    S: KindStore<K>,
{
    let kind = w.kind;
    let mut last_error: Option<String> = None;
    let mut announced_absent = false;
    let mut rejects = Rejects::default();
    let mut retry = Retry::default();
    loop {
        let mut stream = pin!(watcher::watcher(w.api.clone(), w.config.clone()).modify(w.trim));
        let mut absent = false;
        // Until a list completes, silence is reported: each `stall` without an answer.
        let mut listing = true;
        loop {
            let item = if listing {
                next_or_report_stall(&mut stream, w.stall, kind, &feed, &mut last_error).await
            } else {
                stream.next().await
            };
            let Some(item) = item else { break };
            match item {
                Ok(event) => {
                    let screen = Screen {
                        kind,
                        problem: w.problem,
                    };
                    match apply_event(event, screen, &mut store, &mut rejects, &feed, &journal) {
                        Some(Applied::Listed) => {
                            listing = false;
                            retry = Retry::default();
                            if announced_absent {
                                info!(kind = kind.name(), "the API server now serves this kind");
                                announced_absent = false;
                            }
                            if last_error.take().is_some() {
                                info!(kind = kind.name(), "watch recovered");
                            }
                        }
                        Some(Applied::Changed) => retry = Retry::default(),
                        Some(Applied::Relisting) => listing = true,
                        Some(Applied::Listing) | None => {}
                    }
                }
                Err(error) if w.optional && not_served(&error) => {
                    if !announced_absent {
                        info!(
                            kind = kind.name(),
                            "the API server does not serve this kind; treating it as empty and \
                             asking again every {:?}",
                            w.recheck
                        );
                        announced_absent = true;
                    }
                    // An empty relist: clears whatever the store held if the API went away.
                    store.apply(Event::Init, &journal);
                    store.apply(Event::InitDone, &journal);
                    feed.update(kind, |s| {
                        s.listed = true;
                        s.objects = 0;
                    });
                    feed.changed();
                    absent = true;
                    break;
                }
                Err(error) => {
                    let message = error.to_string();
                    if is_expired(&error) {
                        info!(kind = kind.name(), "{message}; relisting");
                    } else if last_error.as_deref() == Some(message.as_str()) {
                        debug!(kind = kind.name(), "watch error (repeated): {message}");
                    } else {
                        warn!(kind = kind.name(), "watch error, retrying: {message}");
                    }
                    last_error = Some(message.clone());
                    feed.error(kind, message);
                    if !is_expired(&error) {
                        tokio::time::sleep(retry.delay()).await;
                    }
                }
            }
        }
        if !absent {
            // The watcher stream never ends by itself; if it ever does, start over.
            warn!(kind = kind.name(), "watch stream ended; restarting");
        }
        tokio::time::sleep(if absent {
            w.recheck
        } else {
            Duration::from_secs(1)
        })
        .await;
    }
}

/// What an event did, for the watch loop.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Applied {
    /// A list starts (`Init`).
    Relisting,
    /// An object of the list under way.
    Listing,
    /// A list completed: the store holds what it listed.
    Listed,
    /// An object was created, changed or deleted.
    Changed,
}

/// How the objects of one kind are screened ([`Rejects::screen`]).
struct Screen<K> {
    kind: Kind,
    /// Why an object that decoded cannot be used (see [`Subnet::decode_error`]).
    problem: fn(&K) -> Option<&str>,
}

// Not derived: a derive would ask `K: Copy`.
impl<K> Clone for Screen<K> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<K> Copy for Screen<K> {}

/// Screens one watch event ([`Rejects`]), applies it to `store` and the journal, and reports it
/// in the kind's status. `None` when the event was dropped.
fn apply_event<K, S>(
    event: Event<K>,
    screen: Screen<K>,
    store: &mut S,
    rejects: &mut Rejects,
    feed: &Feed,
    journal: &Journal,
) -> Option<Applied>
where
    K: ::kube::Resource<DynamicType = ()> + Clone,
    S: KindStore<K>,
{
    let event = rejects.screen(event, screen, &*store, feed)?;
    let applied = match &event {
        Event::Init => Applied::Relisting,
        Event::InitApply(_) => Applied::Listing,
        Event::InitDone => Applied::Listed,
        Event::Apply(_) | Event::Delete(_) => Applied::Changed,
    };
    store.apply(event, journal);
    let kind = screen.kind;
    match applied {
        Applied::Listed => {
            let objects = store.len();
            debug!(kind = kind.name(), objects, "listed");
            feed.listed(kind, objects);
            feed.changed();
        }
        Applied::Changed => {
            feed.event(kind, store.len());
            feed.changed();
        }
        Applied::Relisting | Applied::Listing => {}
    }
    Some(applied)
}

/// Records an applied event in the journal of changes: the stored object of an upsert, the
/// name of a delete; a completed relist replaces the kind as a whole.
fn record<K>(journal: &Journal, reader: &Store<K>, event: &Event<K>)
where
    K: ::kube::Resource<DynamicType = ()> + Watched + Clone,
{
    match event {
        Event::Apply(object) => {
            if let Some(stored) = reader.get(&ObjectRef::from_obj(object)) {
                journal.upsert(stored);
            }
        }
        Event::Delete(object) => {
            journal.record(K::KIND, object_name(Watched::meta(object)), None);
        }
        Event::InitDone => {
            journal.reset();
            // The list's pages, what trimming dropped of each object and, on a relist, the
            // previous store are garbage now.
            super::release_freed_memory();
        }
        Event::Init | Event::InitApply(_) => {}
    }
}

/// The next item of a stream still listing; each `stall` without one is logged (once per
/// distinct message) and counted: an API server that accepts connections and never answers
/// gives no error of its own for minutes.
async fn next_or_report_stall<S>(
    stream: &mut S,
    stall: Duration,
    kind: Kind,
    feed: &Feed,
    last_error: &mut Option<String>,
) -> Option<S::Item>
where
    S: futures::Stream + Unpin,
{
    loop {
        if let Ok(item) = tokio::time::timeout(stall, stream.next()).await {
            return item;
        }
        let message = format!(
            "no answer to the list for {stall:?}: the API server accepts connections but does \
             not answer (overloaded or hung?); still waiting"
        );
        if last_error.as_deref() != Some(message.as_str()) {
            warn!(kind = kind.name(), "{message}");
        }
        *last_error = Some(message.clone());
        feed.error(kind, message);
    }
}

/// The delays between retries of a failing list or watch: 0.8 s doubling to 30 s, each stretched
/// by up to half again at random so the agents of many nodes do not retry in step; back to the
/// start after progress (a complete list or an event). Ours, not kube-rs' `default_backoff()`: that
/// one starts over on every item of the stream, and the watcher yields `Init` before each list
/// attempt, so a list that kept failing was retried about every second forever.
struct Retry {
    next: Duration,
}

impl Retry {
    const FIRST: Duration = Duration::from_millis(800);
    const MAX: Duration = Duration::from_secs(30);

    fn delay(&mut self) -> Duration {
        let base = self.next;
        self.next = (self.next * 2).min(Self::MAX);
        // A fresh `RandomState` is randomly keyed: enough randomness for a jitter.
        let random =
            std::hash::BuildHasher::hash_one(&std::collections::hash_map::RandomState::new(), base);
        #[expect(clippy::cast_precision_loss, reason = "a fraction for a jitter")]
        let fraction = (random % 1_000) as f64 / 1_000.0;
        base.mul_f64(1.0 + fraction / 2.0)
    }
}

impl Default for Retry {
    fn default() -> Self {
        Self { next: Self::FIRST }
    }
}

/// The objects of one kind rejected alone, by `namespace/name`, with their problem.
#[derive(Default)]
struct Rejects {
    now: BTreeMap<String, String>,
    /// Those of before the relist under way: reported again only if their problem changed.
    before_relist: BTreeMap<String, String>,
}

impl Rejects {
    /// Passes `event` on, or replaces or drops it when it carries an object that cannot be
    /// used: a new one is left out, a changed one keeps its last good version (the store's; a
    /// relist puts that back), as Kube-OVN's controller leaves one bad Subnet unprocessed.
    fn screen<K, S>(
        &mut self,
        event: Event<K>,
        screen: Screen<K>,
        store: &S,
        feed: &Feed,
    ) -> Option<Event<K>>
    where
        K: ::kube::Resource<DynamicType = ()> + Clone,
        S: KindStore<K> + ?Sized,
    {
        let kind = screen.kind;
        let object = match &event {
            Event::Init => {
                self.before_relist = std::mem::take(&mut self.now);
                return Some(event);
            }
            Event::InitDone => {
                self.before_relist.clear();
                feed.rejected_now(kind, self.now.len());
                return Some(event);
            }
            Event::Delete(object) => {
                if self.now.remove(&object_name(object.meta())).is_some() {
                    feed.rejected_now(kind, self.now.len());
                }
                return Some(event);
            }
            Event::Apply(object) | Event::InitApply(object) => object,
        };
        let problem = (screen.problem)(object);
        if problem.is_none() && self.now.is_empty() {
            // The common case, every event of every kind: no name built.
            return Some(event);
        }
        let name = object_name(object.meta());
        let Some(problem) = problem else {
            if self.now.remove(&name).is_some() {
                info!(
                    kind = kind.name(),
                    object = %crate::faults::escape(&name),
                    "accepted again after it was rejected"
                );
                feed.rejected_now(kind, self.now.len());
            }
            return Some(event);
        };
        let previous = store.stored(object);
        let message = format!("{} {name}: {problem}", kind.name());
        let reported = self.now.get(&name).or(self.before_relist.get(&name));
        if reported.map(String::as_str) != Some(problem) {
            let outcome = if previous.is_some() {
                "its last good version stays in force"
            } else {
                "left out"
            };
            // Names and messages come from the cluster: escaped, one log line each.
            warn!(
                kind = kind.name(),
                "{}; rejected this object alone: {outcome}",
                crate::faults::escape(&message)
            );
            feed.rejected(kind, message);
        }
        self.now.insert(name, problem.to_owned());
        feed.rejected_now(kind, self.now.len());
        match (event, previous) {
            // A relist rebuilds the store from what it lists: list the last good version.
            (Event::InitApply(_), Some(previous)) => Some(Event::InitApply(previous)),
            _ => None,
        }
    }
}

/// The server does not serve this API (404 on list or watch).
fn not_served(error: &watcher::Error) -> bool {
    matches!(
        error,
        watcher::Error::InitialListFailed(::kube::Error::Api(status))
            | watcher::Error::WatchStartFailed(::kube::Error::Api(status))
            if status.is_not_found()
    )
}

/// `410 Gone`: the watch's resourceVersion is too old, the watcher relists.
fn is_expired(error: &watcher::Error) -> bool {
    let (watcher::Error::WatchError(status)
    | watcher::Error::InitialListFailed(::kube::Error::Api(status))) = error
    else {
        return false;
    };
    status.code == 410
}

/// Keeps the identity of an object (and the annotations and labels listed); drops the rest of
/// its metadata (managedFields, other labels, last-applied and other annotations, owners, …).
fn trim_meta(meta: &mut ObjectMeta, keep_annotations: &[&str], keep_labels: &[&str]) {
    fn only(
        map: Option<BTreeMap<String, String>>,
        keep: &[&str],
    ) -> Option<BTreeMap<String, String>> {
        map.and_then(|all| {
            let kept: BTreeMap<String, String> = all
                .into_iter()
                .filter(|(k, _)| keep.contains(&k.as_str()))
                .collect();
            (!kept.is_empty()).then_some(kept)
        })
    }
    *meta = ObjectMeta {
        name: meta.name.take(),
        namespace: meta.namespace.take(),
        uid: meta.uid.take(),
        resource_version: meta.resource_version.take(),
        deletion_timestamp: meta.deletion_timestamp.take(),
        annotations: only(meta.annotations.take(), keep_annotations),
        labels: only(meta.labels.take(), keep_labels),
        ..ObjectMeta::default()
    };
}

/// A Subnet as the translation reads it: identity and the typed spec (already reduced to the
/// fields of spec §2 when it was decoded).
pub fn trim_subnet(subnet: &mut Subnet) {
    trim_meta(&mut subnet.metadata, &[], &[]);
}

/// A Service as the translation reads it: the labels kube-proxy filters on, type, ClusterIPs,
/// externalTrafficPolicy and the ports' protocol, port and nodePort.
pub fn trim_service(service: &mut Service) {
    trim_meta(
        &mut service.metadata,
        &[],
        &[SERVICE_PROXY_NAME_LABEL, HEADLESS_LABEL],
    );
    service.status = None;
    service.spec = service.spec.take().map(|spec| ServiceSpec {
        type_: spec.type_,
        cluster_ip: spec.cluster_ip,
        cluster_ips: spec.cluster_ips,
        external_traffic_policy: spec.external_traffic_policy,
        ports: spec.ports.map(|ports| {
            ports
                .into_iter()
                .map(|p| ServicePort {
                    name: p.name,
                    protocol: p.protocol,
                    port: p.port,
                    node_port: p.node_port,
                    ..ServicePort::default()
                })
                .collect()
        }),
        ..ServiceSpec::default()
    });
}

/// A Node as the translation reads it: name, Kube-OVN's join-address annotation (the families
/// it runs), the per-node mode label and `status.addresses` (no images, conditions, capacity,
/// …).
pub fn trim_node(node: &mut Node) {
    // The mode label lets an operator canary enforce/shadow per node.
    trim_meta(
        &mut node.metadata,
        &[IP_ADDRESS_ANNOTATION],
        &[crate::cli::MODE_LABEL],
    );
    node.spec = None;
    node.status = node.status.take().map(|status| NodeStatus {
        addresses: status.addresses,
        ..NodeStatus::default()
    });
}

/// A ServiceCIDR as the translation reads it: CIDRs and conditions.
pub fn trim_service_cidr(object: &mut ServiceCIDR) {
    trim_meta(&mut object.metadata, &[], &[]);
}

/// A Pod as the TPROXY replacement reads it: its Subnet annotation, node, hostNetwork, pod IPs
/// and each container's ports and liveness/readiness probes (startup probes do not count).
pub fn trim_pod(pod: &mut Pod) {
    trim_meta(&mut pod.metadata, &[LOGICAL_SWITCH_ANNOTATION], &[]);
    pod.spec = pod.spec.take().map(|spec| PodSpec {
        node_name: spec.node_name,
        host_network: spec.host_network,
        containers: spec
            .containers
            .into_iter()
            .map(|c| Container {
                name: c.name,
                ports: c.ports,
                liveness_probe: c.liveness_probe,
                readiness_probe: c.readiness_probe,
                ..Container::default()
            })
            .collect(),
        ..PodSpec::default()
    });
    pod.status = pod.status.take().map(|status| PodStatus {
        phase: status.phase,
        pod_ip: status.pod_ip,
        pod_ips: status.pod_ips,
        ..PodStatus::default()
    });
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use k8s_openapi::{
        api::core::v1::{
            ContainerImage, ContainerPort, NodeCondition, PodIP, Probe, TCPSocketAction,
        },
        apimachinery::pkg::{apis::meta::v1::ManagedFieldsEntry, util::intstr::IntOrString},
    };

    use super::*;
    use crate::{
        testing::objects::spec_cluster,
        translate::{KubeProxySets, NodeFacts, Options, translate},
    };

    pub(super) fn noisy(meta: &mut ObjectMeta) {
        meta.managed_fields = Some(vec![ManagedFieldsEntry {
            manager: Some("kubectl".into()),
            ..ManagedFieldsEntry::default()
        }]);
        meta.annotations.get_or_insert_default().insert(
            "kubectl.kubernetes.io/last-applied-configuration".into(),
            "{…}".into(),
        );
        meta.labels
            .get_or_insert_default()
            .insert("app".into(), "x".into());
        meta.resource_version = Some("42".into());
    }

    #[test]
    fn trimming_keeps_the_nodes_mode_label_only() {
        let mut node = Node::default();
        noisy(&mut node.metadata);
        node.metadata
            .labels
            .get_or_insert_default()
            .insert(crate::cli::MODE_LABEL.into(), "shadow".into());
        trim_node(&mut node);
        assert_eq!(
            node.metadata.labels,
            Some(BTreeMap::from([(
                crate::cli::MODE_LABEL.to_owned(),
                "shadow".to_owned()
            )]))
        );
    }

    #[test]
    fn trimming_keeps_what_the_translation_reads() {
        let cluster = spec_cluster();
        let mut trimmed = cluster.clone();
        trimmed.subnets = cluster
            .subnets
            .iter()
            .map(|s| {
                let mut s = (**s).clone();
                noisy(&mut s.metadata);
                trim_subnet(&mut s);
                assert!(s.metadata.managed_fields.is_none() && s.metadata.annotations.is_none());
                Arc::new(s)
            })
            .collect();
        trimmed.services = cluster
            .services
            .iter()
            .map(|s| {
                let mut s = (**s).clone();
                noisy(&mut s.metadata);
                s.spec.as_mut().unwrap().selector =
                    Some(BTreeMap::from([("a".into(), "b".into())]));
                s.metadata
                    .labels
                    .get_or_insert_default()
                    .insert(HEADLESS_LABEL.into(), String::new());
                trim_service(&mut s);
                assert!(s.spec.as_ref().unwrap().selector.is_none());
                assert_eq!(
                    s.metadata.labels,
                    Some(BTreeMap::from([(HEADLESS_LABEL.into(), String::new())])),
                    "kube-proxy's filter labels are kept, others dropped"
                );
                // Without the label again, so both sides translate alike.
                s.metadata.labels = None;
                assert_eq!(s.metadata.resource_version.as_deref(), Some("42"));
                Arc::new(s)
            })
            .collect();
        trimmed.nodes = cluster
            .nodes
            .iter()
            .map(|n| {
                let mut n = (**n).clone();
                noisy(&mut n.metadata);
                let status = n.status.as_mut().unwrap();
                status.images = Some(vec![ContainerImage::default(); 3]);
                status.conditions = Some(vec![NodeCondition::default()]);
                trim_node(&mut n);
                assert_eq!(
                    n.metadata.annotations.as_ref().map(BTreeMap::len),
                    Some(1),
                    "only the join-address annotation is kept"
                );
                assert!(n.metadata.labels.is_none());
                let status = n.status.as_ref().unwrap();
                assert!(status.images.is_none() && status.conditions.is_none());
                Arc::new(n)
            })
            .collect();

        let (node, options) = node_n1_ipvs();
        assert_eq!(
            translate(&trimmed, &node, &options).desired,
            translate(&cluster, &node, &options).desired
        );
    }

    /// Node n1's facts and kube-proxy in IPVS mode, for translating the spec cluster.
    pub(super) fn node_n1_ipvs() -> (NodeFacts, Options) {
        let node = NodeFacts {
            node_name: "n1".into(),
            ..NodeFacts::default()
        };
        let options = Options {
            kube_proxy_sets: KubeProxySets::IPVS,
            ..Options::default()
        };
        (node, options)
    }

    #[test]
    fn a_stored_node_is_the_trimmed_node() {
        for full in spec_cluster().nodes.iter().map(|n| (**n).clone()) {
            let mut full = full;
            noisy(&mut full.metadata);
            full.metadata
                .labels
                .get_or_insert_default()
                .insert(crate::cli::MODE_LABEL.into(), "shadow".into());
            let status = full.status.get_or_insert_default();
            status.images = Some(vec![
                ContainerImage {
                    names: Some(vec!["registry/x@sha256:00".into()]),
                    size_bytes: Some(1),
                };
                3
            ]);
            status.conditions = Some(vec![NodeCondition::default()]);
            // As the API serves it.
            let mut json = serde_json::to_value(&full).unwrap();
            json["apiVersion"] = "v1".into();
            json["kind"] = "Node".into();
            json["spec"] = serde_json::json!({"podCIDR": "10.244.0.0/24"});
            let stored: StoredNode = serde_json::from_value(json).unwrap();
            let mut trimmed = full;
            trim_node(&mut trimmed);
            assert_eq!(*stored.0, trimmed);
            assert_eq!(
                stored.0.metadata.labels.as_ref().map(BTreeMap::len),
                Some(1),
                "the mode label is kept"
            );
        }
        let bare: StoredNode =
            serde_json::from_value(serde_json::json!({"metadata": {"name": "n"}})).unwrap();
        assert_eq!(
            *bare.0,
            Node {
                metadata: ObjectMeta {
                    name: Some("n".into()),
                    ..ObjectMeta::default()
                },
                ..Node::default()
            }
        );
    }

    #[test]
    fn pods_keep_subnet_ips_and_probe_ports() {
        let probe = Probe {
            tcp_socket: Some(TCPSocketAction {
                port: IntOrString::String("health".into()),
                host: None,
            }),
            ..Probe::default()
        };
        let mut pod = Pod {
            metadata: ObjectMeta {
                name: Some("p".into()),
                namespace: Some("ns".into()),
                annotations: Some(BTreeMap::from([
                    (LOGICAL_SWITCH_ANNOTATION.into(), "vpc1-sub".into()),
                    (
                        "ovn.kubernetes.io/mac_address".into(),
                        "00:00:00:00:00:01".into(),
                    ),
                ])),
                ..ObjectMeta::default()
            },
            spec: Some(PodSpec {
                node_name: Some("n1".into()),
                containers: vec![Container {
                    name: "c".into(),
                    image: Some("busybox".into()),
                    ports: Some(vec![ContainerPort {
                        name: Some("health".into()),
                        container_port: 8080,
                        ..ContainerPort::default()
                    }]),
                    liveness_probe: Some(probe.clone()),
                    readiness_probe: Some(probe.clone()),
                    startup_probe: Some(probe),
                    ..Container::default()
                }],
                ..PodSpec::default()
            }),
            status: Some(PodStatus {
                pod_ips: Some(vec![PodIP {
                    ip: "10.0.1.5".into(),
                }]),
                container_statuses: Some(Vec::new()),
                ..PodStatus::default()
            }),
        };
        trim_pod(&mut pod);
        assert_eq!(
            pod.metadata.annotations,
            Some(BTreeMap::from([(
                LOGICAL_SWITCH_ANNOTATION.into(),
                "vpc1-sub".into()
            )]))
        );
        let container = &pod.spec.as_ref().unwrap().containers[0];
        assert!(container.image.is_none() && container.startup_probe.is_none());
        assert!(container.liveness_probe.is_some() && container.readiness_probe.is_some());
        assert_eq!(container.ports.as_ref().unwrap()[0].container_port, 8080);
        let status = pod.status.as_ref().unwrap();
        assert_eq!(status.pod_ips.as_ref().unwrap()[0].ip, "10.0.1.5");
        assert!(status.container_statuses.is_none());
    }

    #[test]
    fn pods_are_watched_only_on_request() {
        let mut options = KubeOptions::new("n1");
        assert!(!kinds(&options).contains(&Kind::Pod));
        options.watch_pods = true;
        assert_eq!(kinds(&options), Kind::ALL.to_vec());
    }
}
