//! The kube source's Services: decoded straight into a compact projection ([`StoredService`])
//! and kept in a store of our own ([`ServiceStore`]), keyed by `namespace/name`.
//!
//! At 100 000 Services this store is the agent's largest structure. A kube-rs reflector store
//! would keep, beside each projection, the full `ObjectMeta` (`kube::Resource` hands out
//! `&ObjectMeta`: 300 bytes and more inline, whatever is set) and an `ObjectRef` key with its
//! own copies of the name and namespace, together more than the projection itself. This store
//! keeps the key text and the projection only, and applies the watcher's events as kube-rs'
//! reflector writer does (`reflector::store::Writer::apply_watcher_event`, kube-runtime 5.0): a
//! relist fills a second map, which replaces the first whole at `InitDone`, so the objects
//! deleted while the watch was down go with the old map.

use std::{
    collections::{BTreeMap, HashMap},
    net::IpAddr,
    sync::{Arc, PoisonError, RwLock, RwLockReadGuard},
};

use ::kube::runtime::watcher::Event;
use k8s_openapi::{
    api::core::v1::{Service, ServicePort, ServiceSpec},
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use serde::Deserialize;

use super::{KindStore, trim_meta};
use crate::{
    cluster::{HEADLESS_LABEL, Kind, Object, SERVICE_PROXY_NAME_LABEL, object_name},
    source::Journal,
    translate::{ClusterIp, PortView, ServiceView},
};

/// A Service as the watcher yields it: its [`StoredService`] and the metadata the watcher and
/// the store read (the resourceVersion to resume from, the name and namespace). Decoded straight
/// from the API's JSON, while the rest (managedFields, annotations, other labels, the uid, the
/// selector, status, port names, …) is skipped by the decoder without being built. Transient:
/// the store keeps the projection under its `namespace/name`.
#[derive(Clone, Debug, Deserialize)]
#[serde(from = "DecodedService")]
pub struct WatchedService {
    metadata: ObjectMeta,
    service: StoredService,
}

/// A Service as the kube source stores it: the fields the translation reads, kept compactly —
/// the values Kubernetes defines (type, traffic policy, protocol) as indices, a canonical
/// address as an address, only the effective ClusterIP list, and any other text verbatim — so
/// that the translation reads it ([`ServiceView`]) exactly as it reads the API's `Service`.
#[derive(Clone, Debug)]
pub struct StoredService {
    /// The labels kube-proxy filters on, if any (the watch's label selector leaves out the
    /// Services that have them, so this is almost always `None`).
    #[expect(
        clippy::box_collection,
        reason = "8 bytes per Service instead of a map's 24, for a map almost never there"
    )]
    labels: Option<Box<BTreeMap<String, String>>>,
    spec: Option<StoredSpec>,
}

/// What the decoder builds of a Service, turned into a [`WatchedService`] at once.
#[derive(Deserialize)]
struct DecodedService {
    #[serde(deserialize_with = "stored_meta")]
    metadata: ObjectMeta,
    #[serde(default)]
    spec: Option<DecodedSpec>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct DecodedSpec {
    #[serde(default, rename = "type")]
    type_: Option<String>,
    #[serde(default, rename = "clusterIP")]
    cluster_ip: Option<String>,
    #[serde(default, rename = "clusterIPs")]
    cluster_ips: Option<Vec<String>>,
    #[serde(default)]
    external_traffic_policy: Option<String>,
    #[serde(default)]
    ports: Option<Vec<DecodedPort>>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct DecodedPort {
    #[serde(default)]
    protocol: Option<String>,
    /// Required, as in k8s-openapi's `ServicePort`.
    port: i32,
    #[serde(default)]
    node_port: Option<i32>,
}

#[derive(Clone, Debug)]
struct StoredSpec {
    type_: Text,
    external_traffic_policy: Text,
    /// `clusterIPs`, or `clusterIP` when that list is absent or empty (what the translation
    /// reads); `None` when neither is set.
    cluster_ips: Option<Box<[StoredIp]>>,
    ports: Option<Box<[StoredPort]>>,
}

#[derive(Clone, Debug)]
struct StoredPort {
    protocol: Text,
    port: i32,
    node_port: Option<i32>,
}

/// An optional string field: absent or one of the values Kubernetes defines for it (an index
/// into [`KNOWN_TEXT`]), without an allocation, or any other text as it came. Two variants, so
/// that it takes no more room than the text's box.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Text {
    Known(u8),
    Other(Box<str>),
}

/// Every value [`Text::Known`] stands for: absence, Service types, traffic policies, port
/// protocols.
const KNOWN_TEXT: [Option<&str>; 10] = [
    None,
    Some("ClusterIP"),
    Some("NodePort"),
    Some("LoadBalancer"),
    Some("ExternalName"),
    Some("Cluster"),
    Some("Local"),
    Some("TCP"),
    Some("UDP"),
    Some("SCTP"),
];

impl Text {
    fn new(text: Option<String>) -> Self {
        let known = KNOWN_TEXT.iter().position(|k| *k == text.as_deref());
        match (known.and_then(|i| u8::try_from(i).ok()), text) {
            (Some(i), _) => Self::Known(i),
            (None, Some(t)) => Self::Other(t.into_boxed_str()),
            (None, None) => unreachable!("absence is known"),
        }
    }

    fn get(&self) -> Option<&str> {
        match self {
            Self::Known(i) => KNOWN_TEXT[usize::from(*i)],
            Self::Other(t) => Some(t),
        }
    }
}

/// A ClusterIP as the API gave it: an address when the text is the address's canonical form
/// (printing it gives the same text back), the text otherwise ("None", a malformed value).
#[derive(Clone, Debug)]
enum StoredIp {
    Addr(IpAddr),
    Text(Box<str>),
}

impl StoredIp {
    fn new(text: String) -> Self {
        match text.parse::<IpAddr>() {
            Ok(ip) if ip.to_string() == text => Self::Addr(ip),
            _ => Self::Text(text.into_boxed_str()),
        }
    }

    fn string(&self) -> String {
        match self {
            Self::Addr(ip) => ip.to_string(),
            Self::Text(t) => t.to_string(),
        }
    }
}

impl From<DecodedService> for WatchedService {
    fn from(decoded: DecodedService) -> Self {
        let spec = decoded.spec.map(|spec| {
            let listed = match (spec.cluster_ips, spec.cluster_ip) {
                (Some(list), _) if !list.is_empty() => Some(list),
                (_, Some(one)) => Some(vec![one]),
                (list, None) => list,
            };
            StoredSpec {
                type_: Text::new(spec.type_),
                external_traffic_policy: Text::new(spec.external_traffic_policy),
                cluster_ips: listed.map(|l| l.into_iter().map(StoredIp::new).collect()),
                ports: spec.ports.map(|ports| {
                    ports
                        .into_iter()
                        .map(|p| StoredPort {
                            protocol: Text::new(p.protocol),
                            port: p.port,
                            node_port: p.node_port,
                        })
                        .collect()
                }),
            }
        });
        let mut metadata = decoded.metadata;
        Self {
            service: StoredService {
                labels: metadata.labels.take().map(Box::new),
                spec,
            },
            metadata,
        }
    }
}

/// The metadata a Service is watched and stored by (name, namespace, resourceVersion) and the
/// labels kube-proxy filters on, decoded without the rest.
fn stored_meta<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<ObjectMeta, D::Error> {
    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Meta {
        #[serde(default)]
        name: Option<String>,
        #[serde(default)]
        namespace: Option<String>,
        // uid is not kept: nothing reads it, and it is the longest string of the metadata.
        // resourceVersion is: the watcher resumes from the last one it saw.
        #[serde(default)]
        resource_version: Option<String>,
        #[serde(default)]
        labels: Option<BTreeMap<String, String>>,
    }
    let meta = Meta::deserialize(deserializer)?;
    let mut kept = ObjectMeta {
        name: meta.name,
        namespace: meta.namespace,
        resource_version: meta.resource_version,
        labels: meta.labels,
        ..ObjectMeta::default()
    };
    trim_meta(&mut kept, &[], &[SERVICE_PROXY_NAME_LABEL, HEADLESS_LABEL]);
    Ok(kept)
}

impl WatchedService {
    /// The store's key: `namespace/name`.
    fn key(&self) -> Box<str> {
        object_name(&self.metadata).into_boxed_str()
    }

    /// A stored Service as the watcher would give it (without a resourceVersion): for putting
    /// the last good version of an object back into a relist.
    fn from_stored(key: &str, service: &StoredService) -> Self {
        let (namespace, name) = split_key(key);
        Self {
            metadata: ObjectMeta {
                namespace,
                name: Some(name),
                ..ObjectMeta::default()
            },
            service: service.clone(),
        }
    }
}

/// `namespace/name` or `name` back into its parts.
fn split_key(key: &str) -> (Option<String>, String) {
    match key.split_once('/') {
        Some((namespace, name)) => (Some(namespace.to_owned()), name.to_owned()),
        None => (None, key.to_owned()),
    }
}

impl StoredService {
    /// The `Service` stored under `key`: what [`super::trim_service`] leaves of the API's, less
    /// what the translation does not read (resourceVersion, port names, `clusterIP` beside a
    /// `clusterIPs` list). Built for one changed Service at a time; a full read goes through
    /// [`ServiceStore::read`] and builds none.
    pub fn service(&self, key: &str) -> Service {
        let (namespace, name) = split_key(key);
        let string = |t: &Text| t.get().map(str::to_owned);
        Service {
            metadata: ObjectMeta {
                namespace,
                name: Some(name),
                labels: self.labels.as_deref().cloned(),
                ..ObjectMeta::default()
            },
            spec: self.spec.as_ref().map(|spec| {
                let cluster_ips: Option<Vec<String>> = spec
                    .cluster_ips
                    .as_ref()
                    .map(|ips| ips.iter().map(StoredIp::string).collect());
                ServiceSpec {
                    type_: string(&spec.type_),
                    cluster_ip: cluster_ips.as_ref().and_then(|ips| ips.first().cloned()),
                    cluster_ips,
                    external_traffic_policy: string(&spec.external_traffic_policy),
                    ports: spec.ports.as_ref().map(|ports| {
                        ports
                            .iter()
                            .map(|p| ServicePort {
                                protocol: string(&p.protocol),
                                port: p.port,
                                node_port: p.node_port,
                                ..ServicePort::default()
                            })
                            .collect()
                    }),
                    ..ServiceSpec::default()
                }
            }),
            status: None,
        }
    }
}

/// A [`StoredService`] with its key, as the translation reads it.
pub struct KeyedService<'a> {
    pub key: &'a str,
    pub service: &'a StoredService,
}

impl ServiceView for KeyedService<'_> {
    fn name(&self) -> String {
        self.key.to_owned()
    }
    fn ignored_by_kube_proxy(&self) -> bool {
        // As `cluster::ignored_by_kube_proxy` on the metadata these labels came from.
        self.service.labels.as_deref().is_some_and(|labels| {
            labels.contains_key(SERVICE_PROXY_NAME_LABEL) || labels.contains_key(HEADLESS_LABEL)
        })
    }
    fn has_spec(&self) -> bool {
        self.service.spec.is_some()
    }
    fn type_(&self) -> Option<&str> {
        self.service.spec.as_ref()?.type_.get()
    }
    fn external_traffic_policy(&self) -> Option<&str> {
        self.service.spec.as_ref()?.external_traffic_policy.get()
    }
    fn cluster_ips(&self, each: &mut dyn FnMut(ClusterIp<'_>)) {
        let ips = self
            .service
            .spec
            .as_ref()
            .and_then(|s| s.cluster_ips.as_deref());
        for ip in ips.into_iter().flatten() {
            each(match ip {
                StoredIp::Addr(ip) => ClusterIp::Addr(*ip),
                StoredIp::Text(text) => ClusterIp::Text(text),
            });
        }
    }
    fn ports(&self, each: &mut dyn FnMut(PortView<'_>)) {
        let ports = self.service.spec.as_ref().and_then(|s| s.ports.as_deref());
        for port in ports.into_iter().flatten() {
            each(PortView {
                protocol: port.protocol.get(),
                port: port.port,
                node_port: port.node_port,
            });
        }
    }
}

core_v1_resource!(
    WatchedService,
    "Service",
    "services",
    NamespaceResourceScope,
    |s| &s.metadata,
    |s| &mut s.metadata
);

type Map = HashMap<Box<str>, Box<StoredService>>;

/// The Services of a running kube source, by `namespace/name`: read by the reconciler, written
/// by the Service watch's [`ServiceWriter`].
#[derive(Clone, Default)]
pub struct ServiceStore {
    map: Arc<RwLock<Map>>,
}

impl ServiceStore {
    /// A store and its writer.
    pub fn new() -> (Self, ServiceWriter) {
        let store = Self::default();
        let writer = ServiceWriter {
            store: store.clone(),
            relist: None,
        };
        (store, writer)
    }

    fn read_map(&self) -> RwLockReadGuard<'_, Map> {
        self.map.read().unwrap_or_else(PoisonError::into_inner)
    }

    pub fn len(&self) -> usize {
        self.read_map().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The Service stored under `key`.
    pub fn get(&self, key: &str) -> Option<StoredService> {
        self.read_map().get(key).map(|s| (**s).clone())
    }

    /// Hands every stored Service to `each`, in place. The store is read-locked meanwhile: the
    /// Service watch waits to apply its next event (a change that comes in during a full read is
    /// in the journal after it and applied again, which is harmless).
    pub fn read(&self, each: &mut dyn FnMut(&str, &dyn ServiceView)) {
        for (key, service) in self.read_map().iter() {
            each(key, &KeyedService { key, service });
        }
    }

    /// Every stored Service as a `Service` (for tests and tools; the reconciler uses
    /// [`Self::read`]).
    pub fn services(&self) -> Vec<Arc<Service>> {
        self.read_map()
            .iter()
            .map(|(key, s)| Arc::new(s.service(key)))
            .collect()
    }
}

/// Applies the Service watch's events to its [`ServiceStore`].
pub struct ServiceWriter {
    store: ServiceStore,
    /// The relist under way, from `Init` to `InitDone`.
    relist: Option<Map>,
}

impl KindStore<WatchedService> for ServiceWriter {
    fn apply(&mut self, event: Event<WatchedService>, journal: &Journal) {
        match event {
            Event::Apply(object) => {
                let key = object.key();
                // The journal's reader translates a `Service`: one is built per change.
                let changed = Object::Service(Arc::new(object.service.service(&key)));
                self.store
                    .map
                    .write()
                    .unwrap_or_else(PoisonError::into_inner)
                    .insert(key.clone(), Box::new(object.service));
                journal.record(Kind::Service, key.into(), Some(changed));
            }
            Event::Delete(object) => {
                let key = object.key();
                self.store
                    .map
                    .write()
                    .unwrap_or_else(PoisonError::into_inner)
                    .remove(&key);
                journal.record(Kind::Service, key.into(), None);
            }
            Event::Init => self.relist = Some(Map::new()),
            Event::InitApply(object) => {
                let key = object.key();
                self.relist
                    .get_or_insert_default()
                    .insert(key, Box::new(object.service));
            }
            Event::InitDone => {
                let listed = self.relist.take().unwrap_or_default();
                let before = std::mem::replace(
                    &mut *self
                        .store
                        .map
                        .write()
                        .unwrap_or_else(PoisonError::into_inner),
                    listed,
                );
                // Freed outside the lock: 100 000 boxes take a while.
                drop(before);
                journal.reset();
                super::super::release_freed_memory();
            }
        }
    }

    fn len(&self) -> usize {
        self.store.len()
    }

    fn stored(&self, object: &WatchedService) -> Option<WatchedService> {
        let key = object.key();
        let stored = self.store.get(&key)?;
        Some(WatchedService::from_stored(&key, &stored))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use k8s_openapi::api::core::v1::{Service, ServiceSpec};

    use super::*;
    use crate::{
        cluster::Snapshot,
        source::{
            Changes, Feed,
            kube::{
                Applied, Rejects, Screen, apply_event,
                tests::{node_n1_ipvs, noisy},
                trim_service,
            },
        },
        testing::objects::{Port, service, spec_cluster},
        translate::{Incremental, translate},
    };

    /// The spec cluster's Services, and variants with every odd value a stored Service keeps.
    fn odd_services() -> Vec<Service> {
        let mut services: Vec<Service> = spec_cluster()
            .services
            .iter()
            .map(|s| (**s).clone())
            .collect();
        let odd = |name: &str, change: &dyn Fn(&mut ServiceSpec)| {
            let mut s = services[0].clone();
            s.metadata.name = Some(name.into());
            change(s.spec.as_mut().unwrap());
            s
        };
        let variants = [
            odd("dual-local", &|spec| {
                spec.cluster_ips = Some(vec!["10.96.0.9".into(), "fd00:10:96::9".into()]);
                spec.type_ = Some("NodePort".into());
                spec.external_traffic_policy = Some("Local".into());
                spec.selector = Some(BTreeMap::from([("a".into(), "b".into())]));
                for (i, port) in spec.ports.iter_mut().flatten().enumerate() {
                    port.node_port = Some(30_100 + i32::try_from(i).unwrap());
                }
            }),
            odd("one-ip-only", &|spec| {
                spec.cluster_ips = Some(Vec::new());
                spec.cluster_ip = Some("10.96.0.19".into());
            }),
            // Not canonical: kept as text, so the translation parses (and accepts) it as it would.
            odd("leading-zeros", &|spec| {
                spec.cluster_ips = Some(vec!["010.096.000.029".into()]);
            }),
            odd("malformed-and-headless", &|spec| {
                spec.cluster_ips = Some(vec!["10.96.0.300".into(), "None".into()]);
            }),
            odd("unknown-values", &|spec| {
                spec.type_ = Some("Weird".into());
                spec.external_traffic_policy = Some("Sometimes".into());
                for port in spec.ports.iter_mut().flatten() {
                    port.protocol = Some("QUIC".into());
                }
            }),
            // Canonical IPv6 forms, IPv4-mapped included: kept as addresses.
            odd("mapped-v6", &|spec| {
                spec.cluster_ips = Some(vec!["::ffff:10.96.0.39".into(), "fd00::27".into()]);
            }),
            // Not canonical (upper case): kept as text.
            odd("upper-v6", &|spec| {
                spec.cluster_ips = Some(vec!["FD00::28".into()]);
            }),
            odd("no-protocol", &|spec| {
                for port in spec.ports.iter_mut().flatten() {
                    port.protocol = None;
                    port.name = Some("named".into());
                }
            }),
        ];
        services.extend(variants);
        services.push(Service {
            metadata: ObjectMeta {
                name: Some("no-spec".into()),
                namespace: Some("ns".into()),
                ..ObjectMeta::default()
            },
            ..Service::default()
        });
        services
    }

    /// A Service as the API serves it, decoded as the watcher decodes it.
    fn watched(service: &Service) -> WatchedService {
        let mut json = serde_json::to_value(service).unwrap();
        json["apiVersion"] = "v1".into();
        json["kind"] = "Service".into();
        json["status"] = serde_json::json!({"loadBalancer": {}});
        serde_json::from_value(json).unwrap()
    }

    /// The translation of a stored Service, three ways, equals that of the full one: as the
    /// `Service` a journal change carries ([`StoredService::service`]), and read in place by
    /// the engine's full read ([`Incremental::reset_with`]).
    #[test]
    fn a_stored_service_translates_as_the_trimmed_service() {
        let services = odd_services();
        let (node, options) = node_n1_ipvs();
        let translated = |service: Service| {
            let mut cluster = spec_cluster();
            cluster.services = vec![Arc::new(service)];
            translate(&cluster, &node, &options)
        };
        let mut programmed = 0;
        for (i, mut full) in services.into_iter().enumerate() {
            noisy(&mut full.metadata);
            full.metadata.uid = Some(format!("5f1c2a4e-0000-4000-8000-{i:012}"));
            let v6 = full
                .metadata
                .name
                .as_deref()
                .is_some_and(|n| n.ends_with("-v6"));
            if i % 2 == 1 && !v6 {
                // Kept, and honoured alike.
                full.metadata
                    .labels
                    .get_or_insert_default()
                    .insert(SERVICE_PROXY_NAME_LABEL.into(), "other".into());
            }
            let decoded = watched(&full);
            assert_eq!(decoded.metadata.resource_version.as_deref(), Some("42"));
            assert!(decoded.metadata.uid.is_none() && decoded.metadata.managed_fields.is_none());
            let key = decoded.key();
            let stored = decoded.service;
            let mut trimmed = full;
            trim_service(&mut trimmed);
            let name = object_name(&trimmed.metadata);
            assert_eq!(&*key, name);
            let ours = stored.service(&key);
            assert_eq!(object_name(&ours.metadata), name);
            assert_eq!(ours.metadata.labels, trimmed.metadata.labels, "{name}");
            let theirs = translated(trimmed);
            let ours = translated(ours);
            assert_eq!(ours.desired, theirs.desired, "{name}");
            assert_eq!(ours.issues, theirs.issues, "{name}");
            // The full read: the spec cluster without its Services, and this one in place.
            let mut engine = Incremental::default();
            engine.reset_with(|each| {
                each(
                    &key,
                    &KeyedService {
                        key: &key,
                        service: &stored,
                    },
                );
                Snapshot {
                    services: Vec::new(),
                    ..spec_cluster()
                }
            });
            engine.translate(&node, &options);
            assert_eq!(*engine.desired(), theirs.desired, "{name}");
            assert_eq!(engine.issues(), theirs.issues, "{name}");
            let d = &theirs.desired;
            programmed +=
                usize::from(!(d.v4.service_ports.is_empty() && d.v6.service_ports.is_empty()));
        }
        assert!(programmed >= 6, "most variants program ports: {programmed}");
        let missing_port = serde_json::json!({
            "metadata": {"name": "x"},
            "spec": {"ports": [{"protocol": "TCP"}]}
        });
        assert!(
            serde_json::from_value::<WatchedService>(missing_port).is_err(),
            "a port without its number is refused, as k8s-openapi refuses it"
        );
    }

    /// A Service store with the watch loop's bookkeeping, fed events as the watcher yields them.
    struct Rig {
        store: ServiceStore,
        writer: ServiceWriter,
        rejects: Rejects,
        feed: Arc<Feed>,
        journal: Journal,
        screen: Screen<WatchedService>,
    }

    impl Rig {
        fn new(problem: fn(&WatchedService) -> Option<&str>) -> Self {
            let (store, writer) = ServiceStore::new();
            let (feed, _) = Feed::new(&[Kind::Service]);
            let journal = Journal::default();
            // A new journal asks for a full read first.
            assert!(matches!(journal.take(), Changes::Reset));
            Self {
                store,
                writer,
                rejects: Rejects::default(),
                feed,
                journal,
                screen: Screen {
                    kind: Kind::Service,
                    problem,
                },
            }
        }

        fn event(&mut self, event: Event<WatchedService>) -> Option<Applied> {
            apply_event(
                event,
                self.screen,
                &mut self.writer,
                &mut self.rejects,
                &self.feed,
                &self.journal,
            )
        }

        fn list(&mut self, services: &[WatchedService]) {
            assert_eq!(self.event(Event::Init), Some(Applied::Relisting));
            for s in services {
                self.event(Event::InitApply(s.clone()));
            }
            assert_eq!(self.event(Event::InitDone), Some(Applied::Listed));
        }

        /// The stored Services' names, sorted.
        fn names(&self) -> Vec<String> {
            let mut names = Vec::new();
            self.store.read(&mut |key, view| {
                assert_eq!(view.name(), key);
                names.push(key.to_owned());
            });
            names.sort();
            names
        }

        /// The journal's changes since the last take: `(key, upsert)`, or `None` for a reset.
        fn changes(&self) -> Option<Vec<(String, bool)>> {
            match self.journal.take() {
                Changes::Reset => None,
                Changes::Objects(changes) => Some(
                    changes
                        .into_iter()
                        .map(|c| {
                            assert_eq!(c.kind, Kind::Service);
                            (c.key, c.object.is_some())
                        })
                        .collect(),
                ),
            }
        }
    }

    fn svc(name: &str, ip: &str, port: i32) -> WatchedService {
        let mut s = service(name, "ClusterIP", &[ip], &[Port("TCP", port, None)], false);
        s.metadata.resource_version = Some("1".into());
        watched(&s)
    }

    /// The stored Service's one ClusterIP:port.
    fn port_of(store: &ServiceStore, key: &str) -> Option<String> {
        let s = store.get(key)?.service(key);
        let spec = s.spec.unwrap();
        Some(format!(
            "{}:{}",
            spec.cluster_ips.unwrap()[0],
            spec.ports.unwrap()[0].port
        ))
    }

    #[test]
    fn a_relist_replaces_the_store_whole_when_it_completes() {
        let mut rig = Rig::new(|_| None);
        rig.list(&[svc("ns/a", "10.96.0.1", 80), svc("ns/b", "10.96.0.2", 80)]);
        assert_eq!(rig.names(), ["ns/a", "ns/b"]);
        assert_eq!(
            rig.changes(),
            None,
            "a completed list is a change of the whole view"
        );
        let status = rig.feed.status().kinds["Service"].clone();
        assert!(status.listed);
        assert_eq!((status.objects, status.relists), (2, 1));

        // Watch events: one object each, in the journal in order.
        assert_eq!(
            rig.event(Event::Apply(svc("ns/c", "10.96.0.3", 80))),
            Some(Applied::Changed)
        );
        rig.event(Event::Apply(svc("ns/b", "10.96.0.2", 8080)));
        rig.event(Event::Delete(svc("ns/a", "10.96.0.1", 80)));
        assert_eq!(rig.names(), ["ns/b", "ns/c"]);
        assert_eq!(
            port_of(&rig.store, "ns/b").as_deref(),
            Some("10.96.0.2:8080")
        );
        assert_eq!(
            rig.changes(),
            Some(vec![
                ("ns/c".into(), true),
                ("ns/b".into(), true),
                ("ns/a".into(), false)
            ])
        );
        assert_eq!(rig.feed.status().kinds["Service"].objects, 2);

        // The watch broke; meanwhile c was deleted, b changed and d created. Until the relist
        // completes, the store still holds the previous view.
        assert_eq!(rig.event(Event::Init), Some(Applied::Relisting));
        assert_eq!(
            rig.event(Event::InitApply(svc("ns/b", "10.96.0.2", 443))),
            Some(Applied::Listing)
        );
        rig.event(Event::InitApply(svc("ns/d", "10.96.0.4", 80)));
        assert_eq!(rig.names(), ["ns/b", "ns/c"]);
        assert_eq!(
            port_of(&rig.store, "ns/b").as_deref(),
            Some("10.96.0.2:8080")
        );
        assert_eq!(
            rig.changes(),
            Some(Vec::new()),
            "nothing journaled mid-list"
        );
        assert_eq!(rig.event(Event::InitDone), Some(Applied::Listed));
        assert_eq!(
            rig.names(),
            ["ns/b", "ns/d"],
            "c, gone during the outage, is pruned"
        );
        assert_eq!(
            port_of(&rig.store, "ns/b").as_deref(),
            Some("10.96.0.2:443")
        );
        assert_eq!(rig.changes(), None);
        let status = rig.feed.status().kinds["Service"].clone();
        assert_eq!((status.objects, status.relists), (2, 2));

        // An empty relist empties the store.
        rig.list(&[]);
        assert!(rig.store.is_empty());
        assert!(rig.store.services().is_empty());
    }

    #[test]
    fn a_deleted_service_leaves_the_store_and_the_translation() {
        let mut rig = Rig::new(|_| None);
        rig.list(&[svc("ns/a", "10.96.0.1", 80), svc("ns/b", "10.96.0.2", 81)]);
        rig.event(Event::Delete(svc("ns/a", "10.96.0.1", 80)));
        // Deleting what is not stored is harmless (a watch replays the last event on resume).
        rig.event(Event::Delete(svc("ns/x", "10.96.0.9", 80)));
        assert_eq!(rig.names(), ["ns/b"]);
        let (node, options) = node_n1_ipvs();
        let mut engine = Incremental::default();
        engine.reset_with(|each| {
            rig.store.read(each);
            spec_cluster_without_services()
        });
        engine.translate(&node, &options);
        let ports: Vec<String> = engine
            .desired()
            .v4
            .service_ports
            .iter()
            .map(|p| format!("{}:{}", p.addr, p.port))
            .collect();
        assert_eq!(ports, ["10.96.0.2:81"]);
    }

    fn spec_cluster_without_services() -> Snapshot {
        Snapshot {
            services: Vec::new(),
            ..spec_cluster()
        }
    }

    /// The kind's "one bad object" handling, with a problem the test makes up (an API server
    /// validates Services, so none is decoded that cannot be used): a bad version of a stored
    /// Service keeps its last good one in force, across a relist too; a new bad one is left
    /// out; both are named; a good version clears it.
    #[test]
    fn one_bad_service_is_skipped_and_named() {
        fn port_9999_is_bad(s: &WatchedService) -> Option<&str> {
            let ports = s.service.spec.as_ref()?.ports.as_deref()?;
            ports
                .iter()
                .any(|p| p.port == 9999)
                .then_some("port 9999 is cursed")
        }
        let mut rig = Rig::new(port_9999_is_bad);
        rig.list(&[
            svc("ns/a", "10.96.0.1", 80),
            svc("ns/new", "10.96.0.5", 9999),
        ]);
        assert_eq!(rig.names(), ["ns/a"], "a new bad Service is left out");
        let status = rig.feed.status().kinds["Service"].clone();
        assert_eq!(status.rejected, 1);
        assert!(
            status.last_error.as_deref().unwrap().contains("ns/new"),
            "{:?}",
            status.last_error
        );
        assert_eq!(status.state_at(super::super::super::unix_now()), "watching");
        let _ = rig.changes();

        assert_eq!(
            rig.event(Event::Apply(svc("ns/a", "10.96.0.1", 9999))),
            None
        );
        assert_eq!(port_of(&rig.store, "ns/a").as_deref(), Some("10.96.0.1:80"));
        assert_eq!(rig.changes(), Some(Vec::new()), "nothing to translate");
        assert_eq!(rig.feed.status().kinds["Service"].rejected, 2);

        // A relist lists the bad version: the last good one is listed instead.
        rig.list(&[svc("ns/a", "10.96.0.1", 9999), svc("ns/b", "10.96.0.2", 80)]);
        assert_eq!(rig.names(), ["ns/a", "ns/b"]);
        assert_eq!(port_of(&rig.store, "ns/a").as_deref(), Some("10.96.0.1:80"));
        assert_eq!(rig.feed.status().kinds["Service"].rejected, 1);
        assert_eq!(rig.changes(), None);

        // Fixed: accepted again.
        rig.event(Event::Apply(svc("ns/a", "10.96.0.1", 81)));
        assert_eq!(port_of(&rig.store, "ns/a").as_deref(), Some("10.96.0.1:81"));
        assert_eq!(rig.feed.status().kinds["Service"].rejected, 0);
        assert_eq!(rig.changes(), Some(vec![("ns/a".into(), true)]));
    }
}
