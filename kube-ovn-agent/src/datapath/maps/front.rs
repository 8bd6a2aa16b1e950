//! The exact-match fronts of the prefix sets whose entries are mostly of one length
//! (`kube_ovn_ebpf_common::exact`): a hash the program looks up before the LPM trie. A front
//! holds only prefixes its trie holds, so a hit is always a member and a miss asks the trie,
//! the authority; it is not part of the state (`Tables::current` reads the tries).
//!
//! Order: a front takes a prefix after its trie did (the fill pass) and drops it before its
//! trie does (the prune pass keeps only what the new state still wants), so no packet sees a
//! front hit for a prefix that is not in the trie.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{Ipv4Addr, Ipv6Addr},
};

use aya::maps::Map;
use ipnet::{Ipv4Net, Ipv6Net};
use kube_ovn_ebpf_common::{exact, names};

use super::{
    FamilyTables, HashTable, MapError, MemTable, Result, Synced, array_front::ArrayFront,
    codec::Ipv6Prefix64,
};
use crate::state::{MapState, ServicePort, Touched};

pub struct Fronts {
    /// /32s of the IPv4 local-address trie.
    pub local_v4: Synced<Ipv4Addr, ()>,
    /// /128s of the IPv6 local-address trie.
    pub local_v6: Synced<Ipv6Addr, ()>,
    /// /64s of the IPv6 subnet trie.
    pub subnets_v6: Synced<Ipv6Prefix64, ()>,
    /// The array fronts (`array_front`): ClusterIP ports, local /32s, other nodes (IPv4).
    pub service_ports_v4_array: ArrayFront<ServicePort<Ipv4Addr>>,
    pub local_v4_array: ArrayFront<Ipv4Addr>,
    pub other_nodes_v4_array: ArrayFront<Ipv4Addr>,
}

impl Fronts {
    /// Takes the front maps out of a loaded object and adopts what they hold.
    pub fn from_maps(maps: &mut BTreeMap<&'static str, Map>) -> Result<Self> {
        Ok(Self {
            local_v4: Synced::adopt(Box::new(HashTable::<Ipv4Addr, ()>::new(
                maps,
                names::LOCAL_ADDRS_V4_EXACT,
            )?))?,
            local_v6: Synced::adopt(Box::new(HashTable::<Ipv6Addr, ()>::new(
                maps,
                names::LOCAL_ADDRS_V6_EXACT,
            )?))?,
            subnets_v6: Synced::adopt(Box::new(HashTable::<Ipv6Prefix64, ()>::new(
                maps,
                names::SUBNETS_V6_EXACT,
            )?))?,
            service_ports_v4_array: ArrayFront::from_maps(maps, names::SERVICE_PORTS_V4_FRONT)?,
            local_v4_array: ArrayFront::from_maps(maps, names::LOCAL_ADDRS_V4_FRONT)?,
            other_nodes_v4_array: ArrayFront::from_maps(maps, names::OTHER_NODES_V4_FRONT)?,
        })
    }

    /// Empty in-memory fronts, for tests.
    pub fn in_memory() -> Self {
        fn table<K: Ord + Copy + std::fmt::Debug + Send + 'static>(
            name: &'static str,
        ) -> Synced<K, ()> {
            Synced::adopt(Box::new(MemTable::new(name))).expect("memory tables read infallibly")
        }
        Self {
            local_v4: table(names::LOCAL_ADDRS_V4_EXACT),
            local_v6: table(names::LOCAL_ADDRS_V6_EXACT),
            subnets_v6: table(names::SUBNETS_V6_EXACT),
            service_ports_v4_array: ArrayFront::in_memory(names::SERVICE_PORTS_V4_FRONT),
            local_v4_array: ArrayFront::in_memory(names::LOCAL_ADDRS_V4_FRONT),
            other_nodes_v4_array: ArrayFront::in_memory(names::OTHER_NODES_V4_FRONT),
        }
    }

    /// Brings every front to the prefixes of its length that its trie holds now and `desired`
    /// still wants. With `prune`, run before the tries are pruned. A front that is full is not
    /// an error: the prefixes it could not take are answered by the trie.
    pub fn sync(
        &mut self,
        v4: &FamilyTables<Ipv4Net, Ipv4Addr>,
        v6: &FamilyTables<Ipv6Net, Ipv6Addr>,
        desired: &MapState,
        prune: bool,
    ) -> Vec<MapError> {
        let mut reports = [
            self.local_v4.sync(
                kept(&v4.local, &desired.v4.local, |n| {
                    (n.prefix_len() == exact::LOCAL_V4_LEN).then(|| n.addr())
                }),
                prune,
            ),
            self.local_v6.sync(
                kept(&v6.local, &desired.v6.local, |n| {
                    (n.prefix_len() == exact::LOCAL_V6_LEN).then(|| n.addr())
                }),
                prune,
            ),
            self.subnets_v6.sync(
                kept(&v6.subnets, &desired.v6.subnets, |n| {
                    (n.prefix_len() == exact::SUBNETS_V6_LEN).then(|| Ipv6Prefix64::of(n.network()))
                }),
                prune,
            ),
        ];
        let mut local_v4: Vec<Ipv4Addr> = kept(&v4.local, &desired.v4.local, |n| {
            (n.prefix_len() == exact::LOCAL_V4_LEN).then(|| n.addr())
        })
        .into_iter()
        .map(|(a, ())| a)
        .collect();
        local_v4.sort_unstable();
        local_v4.dedup();
        self.local_v4_array.sync(&local_v4, prune);
        self.service_ports_v4_array
            .sync(&both(&v4.service_ports, &desired.v4.service_ports), prune);
        self.other_nodes_v4_array
            .sync(&both(&v4.other_nodes, &desired.v4.other_nodes), prune);
        reports
            .iter_mut()
            .flat_map(|r| std::mem::take(&mut r.errors))
            .filter(|e| !e.is_full())
            .collect()
    }

    /// [`Self::sync`] for only the keys an incremental step touched (`Tables::apply_touched`):
    /// O(touched). Like a full sync, with `prune` it runs before the tries lose anything.
    pub fn sync_touched(
        &mut self,
        v4: &FamilyTables<Ipv4Net, Ipv4Addr>,
        v6: &FamilyTables<Ipv6Net, Ipv6Addr>,
        desired: &MapState,
        touched: &Touched,
        prune: bool,
    ) -> Vec<MapError> {
        let local_v4 = touched_keys(&touched.v4.local, &v4.local, &desired.v4.local, |n| {
            (n.prefix_len() == exact::LOCAL_V4_LEN).then(|| n.addr())
        });
        let local_v6 = touched_keys(&touched.v6.local, &v6.local, &desired.v6.local, |n| {
            (n.prefix_len() == exact::LOCAL_V6_LEN).then(|| n.addr())
        });
        let subnets_v6 = touched_keys(&touched.v6.subnets, &v6.subnets, &desired.v6.subnets, |n| {
            (n.prefix_len() == exact::SUBNETS_V6_LEN).then(|| Ipv6Prefix64::of(n.network()))
        });
        let mut reports = [
            self.local_v4
                .sync_keys(local_v4.keys(), wanted(&local_v4), prune),
            self.local_v6
                .sync_keys(local_v6.keys(), wanted(&local_v6), prune),
            self.subnets_v6
                .sync_keys(subnets_v6.keys(), wanted(&subnets_v6), prune),
        ];
        self.local_v4_array.sync_keys(&local_v4, prune);
        self.service_ports_v4_array.sync_keys(
            &touched_keys(
                &touched.v4.service_ports,
                &v4.service_ports,
                &desired.v4.service_ports,
                |k| Some(*k),
            ),
            prune,
        );
        self.other_nodes_v4_array.sync_keys(
            &touched_keys(
                &touched.v4.other_nodes,
                &v4.other_nodes,
                &desired.v4.other_nodes,
                |k| Some(*k),
            ),
            prune,
        );
        reports
            .iter_mut()
            .flat_map(|r| std::mem::take(&mut r.errors))
            .filter(|e| !e.is_full())
            .collect()
    }

    /// Re-reads the front maps.
    pub fn refresh(&mut self) -> Result<()> {
        self.service_ports_v4_array.refresh();
        self.local_v4_array.refresh();
        self.other_nodes_v4_array.refresh();
        self.local_v4.refresh()?;
        self.local_v6.refresh()?;
        self.subnets_v6.refresh()
    }
}

/// The front keys of the prefixes both in `trie` and in `desired`.
fn kept<N: Ord + Copy, K>(
    trie: &Synced<N, ()>,
    desired: &BTreeSet<N>,
    key: impl Fn(&N) -> Option<K>,
) -> Vec<(K, ())> {
    trie.entries()
        .keys()
        .filter(|n| desired.contains(n))
        .filter_map(|n| key(n).map(|k| (k, ())))
        .collect()
}

/// Whether `keys` says a key belongs in the front, as [`Synced::sync_keys`] asks it.
fn wanted<K: Ord>(keys: &BTreeMap<K, bool>) -> impl Fn(&K) -> Option<()> + '_ {
    |k| keys.get(k).copied().unwrap_or(false).then_some(())
}

/// The front keys of the `touched` entries, each with whether it belongs in the front: held by
/// `table` (the authority, as written so far) and kept by `desired`.
fn touched_keys<N: Ord + Copy, K: Ord>(
    touched: &BTreeSet<N>,
    table: &Synced<N, ()>,
    desired: &BTreeSet<N>,
    key: impl Fn(&N) -> Option<K>,
) -> BTreeMap<K, bool> {
    touched
        .iter()
        .filter_map(|n| key(n).map(|k| (k, desired.contains(n) && table.entries().contains_key(n))))
        .collect()
}

/// The keys both in `table` and in `desired`, in order: one linear merge of the two sorted
/// sets.
fn both<K: Ord + Copy>(table: &Synced<K, ()>, desired: &BTreeSet<K>) -> Vec<K> {
    let mut wanted = desired.iter().peekable();
    let mut out = Vec::new();
    for key in table.entries().keys() {
        while wanted.next_if(|w| *w < key).is_some() {}
        if wanted.peek() == Some(&key) {
            out.push(*key);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::datapath::maps::Tables;

    fn v4(s: &str) -> Ipv4Net {
        s.parse().unwrap()
    }
    fn v6(s: &str) -> Ipv6Net {
        s.parse().unwrap()
    }
    fn keys<K: Copy + Ord>(s: &Synced<K, ()>) -> Vec<K> {
        s.entries().keys().copied().collect()
    }

    #[test]
    fn fronts_hold_the_tries_prefixes_of_their_length_only() {
        let mut tables = Tables::in_memory();
        let mut desired = MapState::default();
        desired.v4.local = [v4("10.96.0.1/32"), v4("127.0.0.0/8"), v4("10.0.0.7/32")].into();
        desired.v6.local = [v6("fd00::1/128"), v6("fd00:1::/64")].into();
        desired.v6.subnets = [
            v6("fd00:10:16::/64"),
            v6("fd00:20::/48"),
            v6("fd00:30::/80"),
        ]
        .into();
        let report = tables.apply(&desired, true);
        assert!(report.errors.is_empty(), "{:?}", report.errors);
        assert_eq!(
            keys(&tables.fronts.local_v4),
            vec![
                "10.0.0.7".parse::<Ipv4Addr>().unwrap(),
                "10.96.0.1".parse().unwrap()
            ]
        );
        assert_eq!(
            keys(&tables.fronts.local_v6),
            vec!["fd00::1".parse::<Ipv6Addr>().unwrap()]
        );
        assert_eq!(
            keys(&tables.fronts.subnets_v6),
            vec![Ipv6Prefix64([0xfd, 0, 0, 0x10, 0, 0x16, 0, 0])]
        );
        // The fronts are not state: what the tables read back is what was desired.
        assert_eq!(tables.current().v4.local, desired.v4.local);

        // Removing a prefix drops it from the front; one never in the trie never enters it.
        desired.v4.local.remove(&v4("10.96.0.1/32"));
        desired.v6.subnets.clear();
        tables.apply(&desired, true);
        assert_eq!(
            keys(&tables.fronts.local_v4),
            vec!["10.0.0.7".parse::<Ipv4Addr>().unwrap()]
        );
        assert!(tables.fronts.subnets_v6.entries().is_empty());
    }

    #[test]
    fn a_prefix_the_trie_refused_stays_out_of_the_front() {
        let mut tables = Tables::in_memory();
        let mut small = MemTable::new(names::LOCAL_ADDRS_V4);
        small.capacity = 1;
        tables.v4.local = Synced::adopt(Box::new(small)).unwrap();
        let mut desired = MapState::default();
        desired.v4.local = [v4("10.0.0.1/32"), v4("10.0.0.2/32")].into();
        let report = tables.apply(&desired, true);
        assert_eq!(report.errors.len(), 1, "the trie refused one");
        assert_eq!(
            tables
                .fronts
                .local_v4
                .entries()
                .keys()
                .copied()
                .collect::<Vec<_>>(),
            tables
                .v4
                .local
                .entries()
                .keys()
                .map(Ipv4Net::addr)
                .collect::<Vec<_>>(),
            "the front holds exactly what the trie holds"
        );
    }
}
