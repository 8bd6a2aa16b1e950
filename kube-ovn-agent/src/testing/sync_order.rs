//! Watches every intermediate state of a map sync: [`observed_tables`] builds [`Tables`] whose
//! every write and removal is mirrored into one shared view, checked after each operation.
//! Used to show that no rule is ever in force over a set that is being pruned or not yet filled.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::{Arc, Mutex},
};

use kube_ovn_ebpf_common::{Config, names, rule};

use crate::{
    datapath::maps::{MapTable, Result, Synced, Tables},
    state::{FamilyState, MapState},
};

/// The datapath as a packet would see it after each single map operation, and what went wrong.
#[derive(Default)]
pub struct World {
    /// The maps' current content, decoded.
    pub now: MapState,
    /// The transition being checked: (from, to). `None`: no checking (while seeding).
    pub transition: Option<(MapState, MapState)>,
    /// Every violation, with the operation count it happened at.
    pub violations: Vec<String>,
    pub operations: usize,
}

type Shared = Arc<Mutex<World>>;

/// Writes one table's content into the shared view.
type Project<K, V> = fn(&mut MapState, &BTreeMap<K, V>);

struct Observed<K, V> {
    name: &'static str,
    entries: BTreeMap<K, V>,
    world: Shared,
    project: Project<K, V>,
}

impl<K: Ord + Copy + Send, V: Copy + Send> Observed<K, V> {
    fn changed(&self) {
        let mut world = self.world.lock().expect("world lock");
        (self.project)(&mut world.now, &self.entries);
        world.operations += 1;
        let Some((from, to)) = world.transition.clone() else {
            return;
        };
        let mut found = Vec::new();
        check_family("v4", &from.v4, &to.v4, &world.now.v4, &mut found);
        check_family("v6", &from.v6, &to.v6, &world.now.v6, &mut found);
        let at = world.operations;
        world.violations.extend(
            found
                .into_iter()
                .map(|v| format!("after operation {at} ({}): {v}", self.name)),
        );
    }
}

impl<K, V> MapTable<K, V> for Observed<K, V>
where
    K: Ord + Copy + Send,
    V: Copy + Send,
{
    fn name(&self) -> &'static str {
        self.name
    }
    fn capacity(&self) -> usize {
        usize::MAX
    }
    fn read_all(&self) -> Result<Vec<(K, V)>> {
        Ok(self.entries.iter().map(|(k, v)| (*k, *v)).collect())
    }
    fn write(&mut self, key: K, value: V) -> Result<()> {
        self.entries.insert(key, value);
        self.changed();
        Ok(())
    }
    fn remove(&mut self, key: K) -> Result<()> {
        self.entries.remove(&key);
        self.changed();
        Ok(())
    }
}

/// Whether `now` (a set a rule in force reads) holds every entry the rule needs: for a rule on
/// before and after, what both states share; for a rule going off, all it had; for a rule coming
/// on, all it will have.
fn covers<T: Ord>(
    from: &BTreeSet<T>,
    to: &BTreeSet<T>,
    now: &BTreeSet<T>,
    on: (bool, bool),
) -> bool {
    match on {
        (true, true) => from.intersection(to).all(|e| now.contains(e)),
        (true, false) => from.is_subset(now),
        (false, true) => to.is_subset(now),
        (false, false) => false,
    }
}

fn check_family<N: Ord, A: Ord>(
    family: &str,
    from: &FamilyState<N, A>,
    to: &FamilyState<N, A>,
    now: &FamilyState<N, A>,
    found: &mut Vec<String>,
) {
    let r1 = rule::bit(rule::R1A) | rule::bit(rule::R1B);
    if from.rules & r1 != 0 && to.rules & r1 != 0 && now.rules & r1 == 0 {
        found.push(format!(
            "{family}: no R1 rule in force between two states that have one"
        ));
    }
    for r in 0..rule::COUNT {
        let bit = rule::bit(r);
        if now.rules & bit == 0 {
            continue;
        }
        let on = (from.rules & bit != 0, to.rules & bit != 0);
        let name = rule::NAMES[r as usize];
        let mut sets: Vec<(&str, bool)> = Vec::new();
        match r {
            rule::R1A => {
                sets.push((
                    "subnets",
                    covers(&from.subnets, &to.subnets, &now.subnets, on),
                ));
                sets.push((
                    "service_ports",
                    covers(
                        &from.service_ports,
                        &to.service_ports,
                        &now.service_ports,
                        on,
                    ),
                ));
            }
            rule::R1B => {
                sets.push((
                    "subnets",
                    covers(&from.subnets, &to.subnets, &now.subnets, on),
                ));
                sets.push((
                    "service_cidrs",
                    covers(
                        &from.service_cidrs,
                        &to.service_cidrs,
                        &now.service_cidrs,
                        on,
                    ),
                ));
            }
            rule::R2T | rule::R3T => sets.push((
                "nodeport_local_tcp",
                covers(
                    &from.nodeport_local_tcp,
                    &to.nodeport_local_tcp,
                    &now.nodeport_local_tcp,
                    on,
                ),
            )),
            rule::R2U | rule::R3U => sets.push((
                "nodeport_local_udp",
                covers(
                    &from.nodeport_local_udp,
                    &to.nodeport_local_udp,
                    &now.nodeport_local_udp,
                    on,
                ),
            )),
            rule::TPROXY => sets.push((
                "probe_targets",
                covers(
                    &from.probe_targets,
                    &to.probe_targets,
                    &now.probe_targets,
                    on,
                ),
            )),
            _ => {}
        }
        if matches!(r, rule::R2T | rule::R2U) {
            sets.push(("local", covers(&from.local, &to.local, &now.local, on)));
        }
        if matches!(r, rule::R3T | rule::R3U) {
            sets.push((
                "other_nodes",
                covers(&from.other_nodes, &to.other_nodes, &now.other_nodes, on),
            ));
        }
        if on == (false, false) {
            found.push(format!(
                "{family}: {name} in force, but neither state has it"
            ));
        }
        for (set, ok) in sets {
            if !ok && on != (false, false) {
                found.push(format!(
                    "{family}: {name} in force over an incomplete {set}"
                ));
            }
        }
    }
}

fn observed<K, V>(world: &Shared, name: &'static str, project: Project<K, V>) -> Synced<K, V>
where
    K: Ord + Copy + Send + 'static,
    V: Copy + PartialEq + Send + 'static,
{
    Synced::adopt(Box::new(Observed {
        name,
        entries: BTreeMap::new(),
        world: world.clone(),
        project,
    }))
    .expect("observed tables read infallibly")
}

fn keys<K: Ord + Copy, V>(entries: &BTreeMap<K, V>) -> BTreeSet<K> {
    entries.keys().copied().collect()
}

/// Empty tables that report every intermediate state to the returned [`World`].
pub fn observed_tables() -> (Tables, Shared) {
    let world: Shared = Arc::default();
    let tables = Tables {
        config: observed(&world, names::CONFIG, |d, e: &BTreeMap<(), Config>| {
            let config = e.get(&()).copied().unwrap_or_default();
            d.v4.rules = config.rules_v4;
            d.v6.rules = config.rules_v6;
        }),
        ifaces: observed(&world, names::IFACES, |d, e| d.ifaces.clone_from(e)),
        nodeport_local: observed(&world, names::NODEPORT_LOCAL, |d, e| {
            for set in [
                &mut d.v4.nodeport_local_tcp,
                &mut d.v4.nodeport_local_udp,
                &mut d.v6.nodeport_local_tcp,
                &mut d.v6.nodeport_local_udp,
            ] {
                set.clear();
            }
            d.set_nodeport_local(e);
        }),
        v4: crate::datapath::maps::FamilyTables {
            subnets: observed(&world, names::SUBNETS_V4, |d, e| d.v4.subnets = keys(e)),
            service_cidrs: observed(&world, names::SERVICE_CIDRS_V4, |d, e| {
                d.v4.service_cidrs = keys(e);
            }),
            service_ports: observed(&world, names::SERVICE_PORTS_V4, |d, e| {
                d.v4.service_ports = keys(e);
            }),
            other_nodes: observed(&world, names::OTHER_NODES_V4, |d, e| {
                d.v4.other_nodes = keys(e);
            }),
            local: observed(&world, names::LOCAL_ADDRS_V4, |d, e| d.v4.local = keys(e)),
            probe_targets: observed(&world, names::TPROXY_V4, |d, e| {
                d.v4.probe_targets = keys(e);
            }),
        },
        v6: crate::datapath::maps::FamilyTables {
            subnets: observed(&world, names::SUBNETS_V6, |d, e| d.v6.subnets = keys(e)),
            service_cidrs: observed(&world, names::SERVICE_CIDRS_V6, |d, e| {
                d.v6.service_cidrs = keys(e);
            }),
            service_ports: observed(&world, names::SERVICE_PORTS_V6, |d, e| {
                d.v6.service_ports = keys(e);
            }),
            other_nodes: observed(&world, names::OTHER_NODES_V6, |d, e| {
                d.v6.other_nodes = keys(e);
            }),
            local: observed(&world, names::LOCAL_ADDRS_V6, |d, e| d.v6.local = keys(e)),
            probe_targets: observed(&world, names::TPROXY_V6, |d, e| {
                d.v6.probe_targets = keys(e);
            }),
        },
        // Derived from the v4 subnet trie after its writes: what the observer sees of the trie
        // is what it answers.
        subnets_v4_dir: crate::datapath::dir::DirTable::in_memory(
            names::SUBNETS_V4_L16,
            names::SUBNETS_V4_L24,
        ),
        fronts: crate::datapath::maps::Fronts::in_memory(),
    };
    (tables, world)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use kube_ovn_ebpf_common::role;
    use rand::{Rng, SeedableRng, rngs::StdRng};

    use super::*;
    use crate::{
        testing::{
            fixture::{self, Mode},
            objects::{Port, service, spec_cluster},
        },
        translate::{KubeProxySets, NodeFacts, Options, translate},
    };

    /// Applies `from`, then `to`, checking every state in between; returns the violations.
    fn transition(from: &MapState, to: &MapState) -> Vec<String> {
        let (mut tables, world) = observed_tables();
        let report = tables.apply(from, true);
        assert!(report.errors.is_empty(), "{:?}", report.errors);
        world.lock().unwrap().transition = Some((from.clone(), to.clone()));
        let report = tables.apply(to, true);
        assert!(report.errors.is_empty(), "{:?}", report.errors);
        assert_eq!(&tables.current(), to, "the sync reaches its target");
        std::mem::take(&mut world.lock().unwrap().violations)
    }

    /// The agent restarting on an IPVS node and meeting the iptables-mode rule set (or kube-proxy
    /// switching modes): R1a must never be in force over an emptied `service_ports`, R1b never
    /// over an unfilled `service_cidrs`, and some R1 rule must be in force throughout.
    #[test]
    fn a_mode_switch_never_leaves_a_rule_over_a_pruned_or_unfilled_set() {
        let ipvs = fixture::desired(Mode::A, role::OVN0);
        let iptables = fixture::desired(Mode::B, role::OVN0);
        for (from, to, what) in [
            (&ipvs, &iptables, "IPVS → iptables"),
            (&iptables, &ipvs, "iptables → IPVS"),
        ] {
            let violations = transition(from, to);
            assert!(violations.is_empty(), "{what}:\n{}", violations.join("\n"));
        }
    }

    /// Random transitions between translations of random clusters (Services, ETP=Local ports,
    /// kube-proxy modes): no intermediate state violates the ordering.
    #[test]
    fn random_transitions_keep_every_rule_over_complete_sets() {
        let mut rng = StdRng::seed_from_u64(0x6f72_6465);
        let node = NodeFacts {
            node_name: "n1".into(),
            local_v4: fixture::desired(Mode::A, 0).v4.local,
            local_v6: fixture::desired(Mode::A, 0).v6.local,
            ifaces: [(3, role::OVN0)].into(),
        };
        let random_state = |rng: &mut StdRng| {
            let mut snapshot = spec_cluster();
            for i in 0..rng.random_range(0..40) {
                let node_port = rng
                    .random_bool(0.5)
                    .then(|| rng.random_range(30_000..30_010));
                snapshot.services.push(Arc::new(service(
                    &format!("ns/s{i}"),
                    "NodePort",
                    &[&format!("10.96.1.{}", rng.random_range(1..20))],
                    &[Port(["TCP", "UDP"][rng.random_range(0..2)], 80, node_port)],
                    rng.random_bool(0.5),
                )));
            }
            let sets = match rng.random_range(0..3) {
                0 => KubeProxySets::default(),
                _ => KubeProxySets::IPVS,
            };
            let options = Options {
                service_cluster_ip_range: vec!["10.96.0.0/12".parse().unwrap()],
                kube_proxy_sets: sets,
                ..Options::default()
            };
            translate(&snapshot, &node, &options).desired
        };
        for step in 0..200 {
            let from = random_state(&mut rng);
            let to = random_state(&mut rng);
            let violations = transition(&from, &to);
            assert!(
                violations.is_empty(),
                "step {step}:\n{}",
                violations.join("\n")
            );
        }
    }
}
