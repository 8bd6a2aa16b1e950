//! The translation kept up to date one object change at a time.
//!
//! Services (tens of thousands on a large cluster) are held only as their contribution
//! ([`service_entries`], a function of the object alone) and reference-counted into the sets
//! they feed: two Services can contribute the same key (the same ClusterIP:port, the same
//! NodePort), and the key goes only when its last contributor does. A Service change costs that
//! object: its old contribution out, its new one in, and the keys whose count crossed zero are
//! what the maps get written.
//!
//! Everything else (Subnets, Nodes, ServiceCIDRs, this node's Pods: thousands at most, and
//! their sets are not counted per object in Kube-OVN either) is translated by the pure
//! [`translate`] over those objects alone whenever one of them, the node facts or the options
//! change, and diffed set by set against the previous result. When that changes the rules or
//! the interfaces — this node's InternalIP or join annotation, kube-proxy's sets, `--mode` —
//! every set is re-derived and the caller owes a full write ([`Step::full`]).
//!
//! Pure like the rest of `translate`: `Incremental` after any sequence of changes describes
//! exactly what [`translate`] gives for the snapshot of the objects it was handed
//! (property-tested in `tests.rs`).

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, hash_map::Entry},
    hash::Hash,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    sync::Arc,
};

use k8s_openapi::api::{
    core::v1::{Node, Pod},
    networking::v1::ServiceCIDR,
};
use kube_ovn_ebpf_common::rule;

use super::{
    Issue, NodeFacts, Options, Translation,
    services::{ServiceEntries, ServiceView, service_entries},
    translate,
};
use crate::{
    cluster::{Kind, Object, ObjectChange, Snapshot, Subnet},
    state::{FamilyState, FamilyTouched, MapState, ServicePort, Touched},
};

/// How many contributors each key of the Service-derived sets has.
#[derive(Debug, Default)]
struct Counts {
    ports4: HashMap<ServicePort<Ipv4Addr>, u32>,
    ports6: HashMap<ServicePort<Ipv6Addr>, u32>,
    tcp4: HashMap<u16, u32>,
    udp4: HashMap<u16, u32>,
    tcp6: HashMap<u16, u32>,
    udp6: HashMap<u16, u32>,
}

/// Service-derived keys whose count changed since the last [`Incremental::translate`].
#[derive(Debug, Default)]
struct ServiceTouched {
    ports4: BTreeSet<ServicePort<Ipv4Addr>>,
    ports6: BTreeSet<ServicePort<Ipv6Addr>>,
    node_ports: BTreeSet<u16>,
}

/// A Service's contribution as the engine keeps it between events (at 100 000 Services this is
/// the engine's largest structure): its IPv4 keys in one exact-size allocation, and the rarer
/// keys (IPv6, `externalTrafficPolicy: Local` NodePorts) boxed apart, only when there are any.
/// Its issues are kept in [`Incremental::service_issues`].
#[derive(Debug)]
struct Kept {
    ports4: Box<[ServicePort<Ipv4Addr>]>,
    rare: Option<Box<Rare>>,
}

#[derive(Debug)]
struct Rare {
    ports6: Box<[ServicePort<Ipv6Addr>]>,
    local_tcp4: Box<[u16]>,
    local_udp4: Box<[u16]>,
    local_tcp6: Box<[u16]>,
    local_udp6: Box<[u16]>,
}

impl From<ServiceEntries> for Kept {
    fn from(e: ServiceEntries) -> Self {
        let rare = [
            e.local_tcp4.len(),
            e.local_udp4.len(),
            e.local_tcp6.len(),
            e.local_udp6.len(),
            e.ports6.len(),
        ]
        .iter()
        .any(|n| *n > 0)
        .then(|| {
            Box::new(Rare {
                ports6: e.ports6.into(),
                local_tcp4: e.local_tcp4.into(),
                local_udp4: e.local_udp4.into(),
                local_tcp6: e.local_tcp6.into(),
                local_udp6: e.local_udp6.into(),
            })
        });
        Self {
            ports4: e.ports4.into(),
            rare,
        }
    }
}

/// The non-Service translation and the node facts and options it was made with.
#[derive(Debug)]
struct Base {
    node: NodeFacts,
    options: Options,
    translation: Translation,
}

/// What one [`Incremental::translate`] changed.
#[derive(Debug, Default)]
pub struct Step {
    /// The rules, the interfaces or the source of the objects changed: write the whole
    /// [`Incremental::desired`] (a diff against the maps), not just `touched`.
    pub full: bool,
    /// Otherwise, the keys that may differ from the previous step's state.
    pub touched: Touched,
}

/// The cluster as the translation needs it, and the translation of it, kept current.
#[derive(Debug, Default)]
pub struct Incremental {
    subnets: HashMap<String, Arc<Subnet>>,
    nodes: HashMap<String, Arc<Node>>,
    service_cidrs: HashMap<String, Arc<ServiceCIDR>>,
    pods: HashMap<String, Arc<Pod>>,
    /// Each Service's contribution; the Service itself is not kept.
    services: HashMap<String, Kept>,
    counts: Counts,
    /// The issues of the Services that have any.
    service_issues: BTreeMap<String, Vec<Issue>>,
    /// `None` when a non-Service object changed since it was made.
    base: Option<Base>,
    touched: ServiceTouched,
    issues_stale: bool,
    /// Set by [`Self::reset`]: the next step is full.
    reset: bool,
    desired: MapState,
    issues: Vec<Issue>,
}

impl Incremental {
    /// Starts over from a complete view (a first list, a relist, a new file version). Keeps
    /// its allocations.
    pub fn reset(&mut self, snapshot: &Snapshot) {
        self.clear();
        self.services.reserve(snapshot.services.len());
        for change in snapshot.changes() {
            self.apply(change);
        }
        self.base = None;
    }

    /// [`Self::reset`] from a view that `read` returns and whose Services it hands, one by
    /// one, to the function it is given, by `namespace/name`, instead of putting them in the
    /// snapshot: each is translated where it is stored (see [`ServiceView`]), no `Service` is
    /// built for it.
    pub fn reset_with(
        &mut self,
        read: impl FnOnce(&mut dyn FnMut(&str, &dyn ServiceView)) -> Snapshot,
    ) {
        self.clear();
        let snapshot = read(&mut |key, service| {
            self.service(key.to_owned(), Some(service_entries(service)));
        });
        for change in snapshot.changes() {
            self.apply(change);
        }
        self.base = None;
    }

    /// Forgets every object; the next step is full.
    fn clear(&mut self) {
        self.subnets.clear();
        self.nodes.clear();
        self.service_cidrs.clear();
        self.pods.clear();
        self.services.clear();
        self.counts = Counts::default();
        self.service_issues.clear();
        self.touched = ServiceTouched::default();
        // The next step is full (a rebuild from the counts): which keys each Service touched
        // is not needed, and recording it was a sorted insert per key of every Service.
        self.reset = true;
    }

    /// Takes one object change in: O(that object) for a Service.
    pub fn apply(&mut self, change: ObjectChange) {
        let ObjectChange { kind, key, object } = change;
        match object {
            Some(Object::Service(service)) => self.service(key, Some(service_entries(&*service))),
            None if kind == Kind::Service => self.service(key, None),
            Some(Object::Subnet(o)) => upsert(&mut self.subnets, key, o, &mut self.base),
            Some(Object::Node(o)) => upsert(&mut self.nodes, key, o, &mut self.base),
            Some(Object::ServiceCidr(o)) => upsert(&mut self.service_cidrs, key, o, &mut self.base),
            Some(Object::Pod(o)) => upsert(&mut self.pods, key, o, &mut self.base),
            None => {
                let removed = match kind {
                    Kind::Subnet => self.subnets.remove(&key).is_some(),
                    Kind::Node => self.nodes.remove(&key).is_some(),
                    Kind::ServiceCidr => self.service_cidrs.remove(&key).is_some(),
                    Kind::Pod => self.pods.remove(&key).is_some(),
                    Kind::Service => unreachable!("matched above"),
                };
                if removed {
                    self.base = None;
                }
            }
        }
    }

    fn service(&mut self, key: String, entries: Option<ServiceEntries>) {
        let old = if let Some(new) = entries {
            if new.issues.is_empty() {
                self.service_issues.remove(&key);
            } else {
                self.service_issues.insert(key.clone(), new.issues.clone());
            }
            let new = Kept::from(new);
            self.count(&new, 1);
            self.services.insert(key, new)
        } else {
            self.service_issues.remove(&key);
            self.services.remove(&key)
        };
        if let Some(old) = old {
            self.count(&old, -1);
        }
        self.issues_stale = true;
    }

    /// Adds (`delta` 1) or withdraws (-1) one Service's contribution; the keys whose count
    /// crossed zero are touched, unless the next step rebuilds everything anyway.
    fn count(&mut self, entries: &Kept, delta: i8) {
        let track = !self.reset;
        let (c, t) = (&mut self.counts, &mut self.touched);
        adjust(
            &mut c.ports4,
            &entries.ports4,
            delta,
            track.then_some(&mut t.ports4),
        );
        let Some(rare) = &entries.rare else {
            return;
        };
        adjust(
            &mut c.ports6,
            &rare.ports6,
            delta,
            track.then_some(&mut t.ports6),
        );
        for (counts, ports) in [
            (&mut c.tcp4, &rare.local_tcp4),
            (&mut c.udp4, &rare.local_udp4),
            (&mut c.tcp6, &rare.local_tcp6),
            (&mut c.udp6, &rare.local_udp6),
        ] {
            adjust(counts, ports, delta, track.then_some(&mut t.node_ports));
        }
    }

    /// Brings [`Self::desired`] and [`Self::issues`] up to date for `node` and `options`.
    pub fn translate(&mut self, node: &NodeFacts, options: &Options) -> Step {
        let mut step = Step {
            full: std::mem::take(&mut self.reset),
            touched: Touched::default(),
        };
        let current = self
            .base
            .as_ref()
            .is_some_and(|b| b.node == *node && b.options == *options);
        if !current {
            let translation = translate(&self.base_snapshot(), node, options);
            let old = self.base.take();
            let same_frame = old.as_ref().is_some_and(|old| {
                let (a, b) = (&old.translation.desired, &translation.desired);
                a.v4.rules == b.v4.rules && a.v6.rules == b.v6.rules && a.ifaces == b.ifaces
            });
            if same_frame && !step.full {
                let new = &translation.desired;
                step.touched.v4 = base_touched(&self.desired.v4, &new.v4);
                step.touched.v6 = base_touched(&self.desired.v6, &new.v6);
                replace_base(&mut self.desired.v4, &new.v4);
                replace_base(&mut self.desired.v6, &new.v6);
                self.desired.shadow = new.shadow;
                self.desired.tproxy_port = new.tproxy_port;
            } else {
                step.full = true;
            }
            self.base = Some(Base {
                node: node.clone(),
                options: options.clone(),
                translation,
            });
            self.issues_stale = true;
        }
        let touched = std::mem::take(&mut self.touched);
        if step.full {
            self.rebuild();
        } else {
            self.follow_services(&touched, &mut step.touched);
        }
        if self.issues_stale {
            self.collect_issues();
        }
        step
    }

    /// The desired map content as of the last [`Self::translate`].
    pub fn desired(&self) -> &MapState {
        &self.desired
    }

    pub fn desired_mut(&mut self) -> &mut MapState {
        &mut self.desired
    }

    /// The translation's issues as of the last [`Self::translate`], sorted.
    pub fn issues(&self) -> &[Issue] {
        &self.issues
    }

    /// Every InternalIP of the named node ([`super::own_internal_ips`]).
    pub fn own_internal_ips(&self, node_name: &str) -> Vec<IpAddr> {
        let snapshot = Snapshot {
            nodes: self.nodes.get(node_name).cloned().into_iter().collect(),
            ..Snapshot::default()
        };
        super::own_internal_ips(&snapshot, node_name)
    }

    /// The named Node, if it exists.
    pub fn node(&self, name: &str) -> Option<&Node> {
        self.nodes.get(name).map(AsRef::as_ref)
    }

    /// Services held (as contributions).
    pub fn services(&self) -> usize {
        self.services.len()
    }

    fn base_snapshot(&self) -> Snapshot {
        Snapshot {
            subnets: self.subnets.values().cloned().collect(),
            services: Vec::new(),
            nodes: self.nodes.values().cloned().collect(),
            service_cidrs: self.service_cidrs.values().cloned().collect(),
            pods: self.pods.values().cloned().collect(),
        }
    }

    /// The whole desired state from the base and every count: O(Services).
    fn rebuild(&mut self) {
        let base = self.base.as_ref().expect("translated above");
        let mut desired = base.translation.desired.clone();
        let c = &self.counts;
        fill(&mut desired.v4, &c.ports4, &c.tcp4, &c.udp4);
        fill(&mut desired.v6, &c.ports6, &c.tcp6, &c.udp6);
        desired.v4.tproxy_listener_opaque = self.desired.v4.tproxy_listener_opaque;
        desired.v6.tproxy_listener_opaque = self.desired.v6.tproxy_listener_opaque;
        self.desired = desired;
    }

    /// Applies the Service-derived keys whose count changed to the desired sets: O(keys).
    fn follow_services(&mut self, service: &ServiceTouched, touched: &mut Touched) {
        let (c, d) = (&self.counts, &mut self.desired);
        let (r4, r6) = (d.v4.rules, d.v6.rules);
        let on = |rules: u32, r: u32| rules & rule::bit(r) != 0;
        for key in &service.ports4 {
            set(
                &mut d.v4.service_ports,
                *key,
                on(r4, rule::R1A) && c.ports4.contains_key(key),
            );
            touched.v4.service_ports.insert(*key);
        }
        for key in &service.ports6 {
            set(
                &mut d.v6.service_ports,
                *key,
                on(r6, rule::R1A) && c.ports6.contains_key(key),
            );
            touched.v6.service_ports.insert(*key);
        }
        for port in &service.node_ports {
            set(
                &mut d.v4.nodeport_local_tcp,
                *port,
                on(r4, rule::R2T) && c.tcp4.contains_key(port),
            );
            set(
                &mut d.v4.nodeport_local_udp,
                *port,
                on(r4, rule::R2U) && c.udp4.contains_key(port),
            );
            set(
                &mut d.v6.nodeport_local_tcp,
                *port,
                on(r6, rule::R2T) && c.tcp6.contains_key(port),
            );
            set(
                &mut d.v6.nodeport_local_udp,
                *port,
                on(r6, rule::R2U) && c.udp6.contains_key(port),
            );
            touched.nodeport_local.insert(*port);
        }
    }

    /// The base's issues plus, when a rule reads the Service sets, the Services' (as
    /// [`translate`] reports them).
    fn collect_issues(&mut self) {
        let base = self.base.as_ref().expect("translated above");
        let mut issues = base.translation.issues.clone();
        let rules = base.translation.desired.v4.rules | base.translation.desired.v6.rules;
        if rules & (rule::bit(rule::R1A) | rule::NODEPORT_LOCAL_RULES) != 0 {
            issues.extend(self.service_issues.values().flatten().cloned());
        }
        issues
            .sort_by(|a, b| (a.kind, &a.object, &a.message).cmp(&(b.kind, &b.object, &b.message)));
        issues.dedup();
        self.issues = issues;
        self.issues_stale = false;
    }
}

fn upsert<T>(
    map: &mut HashMap<String, Arc<T>>,
    key: String,
    object: Arc<T>,
    base: &mut Option<Base>,
) {
    map.insert(key, object);
    *base = None;
}

fn adjust<K: Hash + Eq + Ord + Copy>(
    counts: &mut HashMap<K, u32>,
    keys: &[K],
    delta: i8,
    mut touched: Option<&mut BTreeSet<K>>,
) {
    for key in keys {
        let crossed = match (counts.entry(*key), delta > 0) {
            (Entry::Occupied(mut e), true) => {
                *e.get_mut() += 1;
                false
            }
            (Entry::Vacant(e), true) => {
                e.insert(1);
                true
            }
            (Entry::Occupied(mut e), false) => {
                *e.get_mut() -= 1;
                let zero = *e.get() == 0;
                if zero {
                    e.remove();
                }
                zero
            }
            (Entry::Vacant(_), false) => {
                debug_assert!(false, "withdrawn more than added");
                false
            }
        };
        if crossed && let Some(touched) = touched.as_deref_mut() {
            touched.insert(*key);
        }
    }
}

fn set<K: Ord>(set: &mut BTreeSet<K>, key: K, present: bool) {
    if present {
        set.insert(key);
    } else {
        set.remove(&key);
    }
}

/// The Service-derived sets of `family` from the counts, as the rules in force select them.
fn fill<N: Ord, A: Ord + Copy + Hash>(
    family: &mut FamilyState<N, A>,
    ports: &HashMap<ServicePort<A>, u32>,
    tcp: &HashMap<u16, u32>,
    udp: &HashMap<u16, u32>,
) {
    let on = |r: u32| family.rules & rule::bit(r) != 0;
    if on(rule::R1A) {
        family.service_ports = ports.keys().copied().collect();
    }
    if on(rule::R2T) {
        family.nodeport_local_tcp = tcp.keys().copied().collect();
    }
    if on(rule::R2U) {
        family.nodeport_local_udp = udp.keys().copied().collect();
    }
}

/// The keys of the sets the base feeds (all but the Service-derived ones) that differ.
fn base_touched<N: Ord + Copy, A: Ord + Copy>(
    old: &FamilyState<N, A>,
    new: &FamilyState<N, A>,
) -> FamilyTouched<N, A> {
    fn diff<T: Ord + Copy>(a: &BTreeSet<T>, b: &BTreeSet<T>) -> BTreeSet<T> {
        a.symmetric_difference(b).copied().collect()
    }
    FamilyTouched {
        subnets: diff(&old.subnets, &new.subnets),
        service_cidrs: diff(&old.service_cidrs, &new.service_cidrs),
        other_nodes: diff(&old.other_nodes, &new.other_nodes),
        local: diff(&old.local, &new.local),
        probe_targets: diff(&old.probe_targets, &new.probe_targets),
        ..FamilyTouched::default()
    }
}

/// Takes the base's sets and listener from `new`, keeping the Service-derived sets.
fn replace_base<N: Ord + Clone, A: Ord + Clone>(
    family: &mut FamilyState<N, A>,
    new: &FamilyState<N, A>,
) {
    family.subnets.clone_from(&new.subnets);
    family.service_cidrs.clone_from(&new.service_cidrs);
    family.other_nodes.clone_from(&new.other_nodes);
    family.local.clone_from(&new.local);
    family.probe_targets.clone_from(&new.probe_targets);
    family.tproxy_listener.clone_from(&new.tproxy_listener);
}
