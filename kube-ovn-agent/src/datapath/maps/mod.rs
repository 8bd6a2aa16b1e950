//! Writing a [`MapState`] state into the datapath maps by difference.
//!
//! Each map is a [`MapTable`]: typed keys and values in human terms (CIDRs, addresses, ports),
//! encoded to the `#[repr(C)]` types of the common crate at the boundary. [`Synced`] keeps a
//! mirror of what the kernel map holds, adopted from the (possibly pinned) map at start, and
//! writes only the difference; it never clears a map to refill it. A failed write (map full,
//! rejected key) is reported with context and retried on the next sync; it never stops the
//! other entries or maps from syncing.
//!
//! By concern: [`error`] (what a write can fail with, and fault summaries), [`codec`] (human
//! keys ↔ kernel bytes), [`synced`] (the table trait and the diffing mirror), [`kernel`] (each
//! kernel map type as a table); this file puts the datapath's maps together.

mod array_front;
mod codec;
mod error;
mod front;
mod kernel;
mod synced;
mod touched;

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{Ipv4Addr, Ipv6Addr},
};

use aya::maps::Map;
use ipnet::{Ipv4Net, Ipv6Net};
use kube_ovn_ebpf_common::{Config, config_flag, names};

pub(crate) use self::kernel::take;
pub use self::{
    codec::{Codec, Ipv6Prefix64, Prefix},
    error::{MapError, MapFault, Result},
    front::Fronts,
    kernel::{ConfigTable, HashTable, IfaceTable, PortArrayTable, PrefixTable, read_counters},
    synced::{MapTable, MemTable, Synced, TableReport},
};
use crate::{
    datapath::dir::DirTable,
    state::{FamilyState, MapState, ProbeTarget, ServicePort},
};

/// Declares the per-family maps once: each line is a field of [`FamilyTables`], named like the
/// [`FamilyState`] set it holds, with the kind of kernel map it opens (`prefix`: an LPM trie of
/// CIDRs; `hash`: a hash of exact keys) and its kernel names for IPv4 and IPv6. Opening (kernel
/// or in memory), refreshing, syncing, reading back and the fill report all follow from it.
macro_rules! family_tables {
    ($($field:ident: $kind:ident<$key:ty> = ($v4:ident, $v6:ident);)*) => {
        /// The maps of one address family.
        pub struct FamilyTables<N, A> {
            $(pub $field: Synced<$key, ()>,)*
        }

        impl FamilyTables<Ipv4Net, Ipv4Addr> {
            fn open(opener: &mut impl Opener) -> Result<Self> {
                Ok(Self { $($field: opener.$kind(names::$v4)?,)* })
            }
        }

        impl FamilyTables<Ipv6Net, Ipv6Addr> {
            fn open(opener: &mut impl Opener) -> Result<Self> {
                Ok(Self { $($field: opener.$kind(names::$v6)?,)* })
            }
        }

        impl<N: Ord + Copy, A: Ord + Copy> FamilyTables<N, A> {
            fn refresh(&mut self) -> Result<()> {
                $(self.$field.refresh()?;)*
                Ok(())
            }

            fn sync(&mut self, desired: &FamilyState<N, A>, prune: bool, report: &mut SyncReport) {
                $(report.add(self.$field.sync(desired.$field.iter().map(member), prune));)*
            }

            /// Copies what the maps hold into the sets of `state`.
            fn read_into(&self, state: &mut FamilyState<N, A>) {
                $(state.$field = self.$field.entries().keys().copied().collect();)*
            }

            fn fill(&self, out: &mut Vec<(&'static str, usize, usize)>) {
                $(out.push((self.$field.name(), self.$field.len(), self.$field.capacity()));)*
            }
        }
    };
}

family_tables! {
    subnets: prefix<N> = (SUBNETS_V4, SUBNETS_V6);
    service_cidrs: prefix<N> = (SERVICE_CIDRS_V4, SERVICE_CIDRS_V6);
    service_ports: hash<ServicePort<A>> = (SERVICE_PORTS_V4, SERVICE_PORTS_V6);
    other_nodes: hash<A> = (OTHER_NODES_V4, OTHER_NODES_V6);
    local: prefix<N> = (LOCAL_ADDRS_V4, LOCAL_ADDRS_V6);
    probe_targets: hash<ProbeTarget<A>> = (TPROXY_V4, TPROXY_V6);
}

/// Where [`FamilyTables`] get their tables: the loaded object's maps, or memory.
trait Opener {
    fn prefix<N>(&mut self, name: &'static str) -> Result<Synced<N, ()>>
    where
        N: Prefix + Ord + Copy + std::fmt::Debug + std::fmt::Display + Send + 'static,
        N::Data: Send;
    fn hash<K>(&mut self, name: &'static str) -> Result<Synced<K, ()>>
    where
        K: Codec + Ord + Copy + std::fmt::Debug + Send + 'static,
        K::Raw: Send;
}

/// Opens kernel maps, taking them out of a loaded object, and adopts their content.
struct Kernel<'a>(&'a mut BTreeMap<&'static str, Map>);

impl Opener for Kernel<'_> {
    fn prefix<N>(&mut self, name: &'static str) -> Result<Synced<N, ()>>
    where
        N: Prefix + Ord + Copy + std::fmt::Debug + std::fmt::Display + Send + 'static,
        N::Data: Send,
    {
        Synced::adopt(Box::new(PrefixTable::<N>::new(self.0, name)?))
    }
    fn hash<K>(&mut self, name: &'static str) -> Result<Synced<K, ()>>
    where
        K: Codec + Ord + Copy + std::fmt::Debug + Send + 'static,
        K::Raw: Send,
    {
        Synced::adopt(Box::new(HashTable::<K, ()>::new(self.0, name)?))
    }
}

/// Opens empty in-memory tables.
struct Memory;

impl Memory {
    fn table<K, V>(name: &'static str) -> Synced<K, V>
    where
        K: Ord + Copy + std::fmt::Debug + Send + 'static,
        V: Copy + PartialEq + Send + 'static,
    {
        Synced::adopt(Box::new(MemTable::new(name))).expect("memory tables read infallibly")
    }
}

impl Opener for Memory {
    fn prefix<N>(&mut self, name: &'static str) -> Result<Synced<N, ()>>
    where
        N: Prefix + Ord + Copy + std::fmt::Debug + std::fmt::Display + Send + 'static,
        N::Data: Send,
    {
        Ok(Self::table(name))
    }
    fn hash<K>(&mut self, name: &'static str) -> Result<Synced<K, ()>>
    where
        K: Codec + Ord + Copy + std::fmt::Debug + Send + 'static,
        K::Raw: Send,
    {
        Ok(Self::table(name))
    }
}

/// Every datapath map the agent writes.
pub struct Tables {
    pub config: Synced<(), Config>,
    pub ifaces: Synced<u32, u32>,
    pub nodeport_local: Synced<u16, u8>,
    pub v4: FamilyTables<Ipv4Net, Ipv4Addr>,
    pub v6: FamilyTables<Ipv6Net, Ipv6Addr>,
    /// The direct-indexed front of the IPv4 subnet trie, derived from what the trie holds
    /// (`datapath::dir`).
    pub subnets_v4_dir: DirTable,
    /// The exact-match fronts of the local-address tries and the IPv6 subnet trie, derived
    /// from what the tries hold (`front`).
    pub fronts: Fronts,
}

/// The outcome of syncing every table.
#[derive(Debug, Default)]
pub struct SyncReport {
    pub written: usize,
    pub removed: usize,
    pub errors: Vec<MapError>,
}

impl SyncReport {
    fn add(&mut self, table: TableReport) {
        self.written += table.written;
        self.removed += table.removed;
        self.errors.extend(table.errors);
    }
}

impl Tables {
    /// Takes the maps out of a loaded object and adopts their content.
    pub fn from_maps(maps: &mut BTreeMap<&'static str, Map>) -> Result<Self> {
        fn adopt<K: Ord + Copy, V: Copy + PartialEq>(
            table: impl MapTable<K, V> + 'static,
        ) -> Result<Synced<K, V>> {
            Synced::adopt(Box::new(table))
        }
        Ok(Self {
            config: adopt(ConfigTable::new(maps)?)?,
            ifaces: adopt(IfaceTable::new(maps)?)?,
            nodeport_local: adopt(PortArrayTable::new(maps)?)?,
            v4: FamilyTables::<Ipv4Net, Ipv4Addr>::open(&mut Kernel(maps))?,
            v6: FamilyTables::<Ipv6Net, Ipv6Addr>::open(&mut Kernel(maps))?,
            subnets_v4_dir: DirTable::new(maps, names::SUBNETS_V4_L16, names::SUBNETS_V4_L24)?,
            fronts: Fronts::from_maps(maps)?,
        })
    }

    /// In-memory tables, for tests.
    pub fn in_memory() -> Self {
        let open = "memory tables open infallibly";
        Self {
            config: Memory::table(names::CONFIG),
            ifaces: Memory::table(names::IFACES),
            nodeport_local: Memory::table(names::NODEPORT_LOCAL),
            v4: FamilyTables::<Ipv4Net, Ipv4Addr>::open(&mut Memory).expect(open),
            v6: FamilyTables::<Ipv6Net, Ipv6Addr>::open(&mut Memory).expect(open),
            subnets_v4_dir: DirTable::in_memory(names::SUBNETS_V4_L16, names::SUBNETS_V4_L24),
            fronts: Fronts::in_memory(),
        }
    }

    /// Brings every map to `desired`. Without `prune`, entries that are no longer desired stay
    /// (used until every source has listed once, so a partial view never deletes state).
    pub fn apply(&mut self, desired: &MapState, prune: bool) -> SyncReport {
        let mut report = SyncReport::default();
        // Fill, switch the rules, prune: a rule switched on never runs against half-filled sets,
        // and a rule switched off is off before its sets are emptied (tested in
        // testing::sync_order). NodePort ports keep their old bits until the prune.
        let ports = desired.nodeport_local();
        let filled: BTreeMap<u16, u8> = ports
            .iter()
            .map(|(port, bits)| {
                let old = self.nodeport_local.entries().get(port).copied();
                (*port, bits | old.unwrap_or(0))
            })
            .collect();
        let ifaces = || desired.ifaces.iter().map(|(i, roles)| (*i, *roles));
        self.v4.sync(&desired.v4, false, &mut report);
        self.sync_dirs(&mut report);
        self.v6.sync(&desired.v6, false, &mut report);
        self.sync_fronts(desired, false, &mut report);
        report.add(self.nodeport_local.sync(filled, false));
        report.add(self.ifaces.sync(ifaces(), false));
        if prune {
            // A map too full to take the new entries before the stale ones go is retried by the
            // pruning pass, which reports what still fails.
            report.errors.retain(|e| !e.is_full());
        }
        report.add(self.config.sync([((), desired.config())], true));
        if prune {
            // The fronts drop what the tries are about to lose first, and take what the
            // pruning pass's retries wrote after.
            self.sync_fronts(desired, true, &mut report);
            self.v4.sync(&desired.v4, true, &mut report);
            self.sync_dirs(&mut report);
            self.v6.sync(&desired.v6, true, &mut report);
            self.sync_fronts(desired, false, &mut report);
            report.add(self.nodeport_local.sync(ports, true));
            report.add(self.ifaces.sync(ifaces(), true));
        }
        report
    }

    /// Brings the direct-indexed front to what its trie holds now (after the trie's writes, so
    /// an address the front calls a hit is in the trie, and one it sends to the trie finds the
    /// trie's answer). Its writes are not counted in `written`/`removed`, which count set
    /// entries; its failures are reported like any map's.
    fn sync_dirs(&mut self, report: &mut SyncReport) {
        report.errors.extend(
            self.subnets_v4_dir
                .sync(self.v4.subnets.entries().keys().copied()),
        );
    }

    /// Brings the exact-match fronts to what their tries hold and `desired` keeps. Like the
    /// direct-indexed front's, their writes are not counted in `written`/`removed`.
    fn sync_fronts(&mut self, desired: &MapState, prune: bool, report: &mut SyncReport) {
        report
            .errors
            .extend(self.fronts.sync(&self.v4, &self.v6, desired, prune));
    }

    /// The state the maps hold now, decoded.
    pub fn current(&self) -> MapState {
        fn family<N: Ord + Copy, A: Ord + Copy>(
            t: &FamilyTables<N, A>,
            rules: u32,
            tproxy_listener: Option<A>,
            tproxy_listener_opaque: bool,
        ) -> FamilyState<N, A> {
            let mut state = FamilyState {
                rules,
                subnets: BTreeSet::new(),
                service_cidrs: BTreeSet::new(),
                service_ports: BTreeSet::new(),
                other_nodes: BTreeSet::new(),
                local: BTreeSet::new(),
                nodeport_local_tcp: BTreeSet::new(),
                nodeport_local_udp: BTreeSet::new(),
                probe_targets: BTreeSet::new(),
                tproxy_listener,
                tproxy_listener_opaque,
            };
            t.read_into(&mut state);
            state
        }
        let config = self.config.entries().get(&()).copied().unwrap_or_default();
        let listener_v4 = Some(Ipv4Addr::from(config.tproxy_ip_v4)).filter(|a| !a.is_unspecified());
        let listener_v6 = Some(Ipv6Addr::from(config.tproxy_ip_v6)).filter(|a| !a.is_unspecified());
        let mut desired = MapState {
            v4: family(
                &self.v4,
                config.rules_v4,
                listener_v4,
                config.flags & config_flag::TPROXY_OPAQUE_V4 != 0,
            ),
            v6: family(
                &self.v6,
                config.rules_v6,
                listener_v6,
                config.flags & config_flag::TPROXY_OPAQUE_V6 != 0,
            ),
            ifaces: self
                .ifaces
                .entries()
                .iter()
                .map(|(i, roles)| (*i, *roles))
                .collect(),
            shadow: config.flags & config_flag::SHADOW != 0,
            tproxy_port: config.tproxy_port,
        };
        desired.set_nodeport_local(self.nodeport_local.entries());
        desired
    }

    /// Re-reads every kernel map into its mirror (heals writes made behind our back).
    pub fn refresh_all(&mut self) -> Result<()> {
        self.config.refresh()?;
        self.ifaces.refresh()?;
        self.nodeport_local.refresh()?;
        self.v4.refresh()?;
        self.v6.refresh()?;
        self.subnets_v4_dir.refresh()?;
        self.fronts.refresh()?;
        Ok(())
    }

    /// Entry counts per map name.
    pub fn sizes(&self) -> Vec<(&'static str, usize)> {
        self.fill()
            .into_iter()
            .map(|(name, len, _)| (name, len))
            .collect()
    }

    /// Capacities (`max_entries`) per map name, in the order of [`Self::sizes`].
    pub fn capacities(&self) -> Vec<(&'static str, usize)> {
        self.fill()
            .into_iter()
            .map(|(name, _, capacity)| (name, capacity))
            .collect()
    }

    /// (name, entries, capacity) of every map but the config.
    fn fill(&self) -> Vec<(&'static str, usize, usize)> {
        fn of<K: Ord + Copy, V: Copy + PartialEq>(
            t: &Synced<K, V>,
        ) -> (&'static str, usize, usize) {
            (t.name(), t.len(), t.capacity())
        }
        let mut fill = vec![of(&self.ifaces), of(&self.nodeport_local)];
        self.v4.fill(&mut fill);
        self.v6.fill(&mut fill);
        fill
    }

    /// One summary per map and kind of failure for the errors of a sync pass, with the map's
    /// fill and capacity: a full map refuses every entry past its capacity, which must make
    /// one line, not one per entry.
    pub fn faults(&self, errors: &[MapError]) -> Vec<MapFault> {
        let fill = self.fill();
        let mut faults: Vec<MapFault> = Vec::new();
        for error in errors {
            let (map, kind, errno) = (error.map(), error.kind(), error.errno());
            if let Some(fault) = faults
                .iter_mut()
                .find(|f| (f.map, f.kind, f.errno) == (map, kind, errno))
            {
                fault.refused += 1;
                continue;
            }
            let (entries, capacity) = fill
                .iter()
                .find(|(name, ..)| *name == map)
                .map_or((0, 1), |(_, len, capacity)| (*len, *capacity));
            faults.push(MapFault {
                map,
                kind,
                errno,
                refused: 1,
                entries,
                capacity,
                first: error.to_string(),
            });
        }
        faults
    }
}

fn member<K: Copy>(key: &K) -> (K, ()) {
    (*key, ())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::fixture::{self, Mode};

    fn table(entries: &[(u16, u8)], capacity: usize) -> Box<dyn MapTable<u16, u8>> {
        let mut t = MemTable::new("test");
        t.entries = entries.iter().copied().collect();
        t.capacity = capacity;
        Box::new(t)
    }

    #[test]
    fn adopts_existing_content_and_writes_only_the_difference() {
        let mut synced = Synced::adopt(table(&[(1, 1), (2, 2)], usize::MAX)).unwrap();
        let report = synced.sync([(1, 1), (2, 2)], true);
        assert_eq!(
            (report.written, report.removed),
            (0, 0),
            "unchanged content is not rewritten"
        );
        let report = synced.sync([(1, 1), (2, 5), (3, 3)], true);
        assert_eq!((report.written, report.removed), (2, 0));
        assert_eq!(synced.entries(), &BTreeMap::from([(1, 1), (2, 5), (3, 3)]));
    }

    #[test]
    fn stale_entries_stay_until_pruning_is_allowed() {
        let mut synced = Synced::adopt(table(&[(1, 1), (9, 9)], usize::MAX)).unwrap();
        let report = synced.sync([(1, 1)], false);
        assert_eq!(report.removed, 0);
        assert!(synced.entries().contains_key(&9));
        let report = synced.sync([(1, 1)], true);
        assert_eq!(report.removed, 1);
        assert_eq!(synced.entries(), &BTreeMap::from([(1, 1)]));
    }

    #[test]
    fn a_full_map_is_reported_the_rest_is_written_and_the_write_is_retried() {
        let mut synced = Synced::adopt(table(&[(9, 9)], 2)).unwrap();
        let report = synced.sync([(1, 1), (2, 2), (9, 9)], false);
        assert_eq!(report.written, 1, "one slot was free");
        assert_eq!(report.errors.len(), 1);
        assert!(report.errors[0].is_full(), "{}", report.errors[0]);
        assert_eq!(report.errors[0].kind(), crate::metrics::ErrorKind::MapFull);
        assert!(
            report.errors[0].to_string().contains("test"),
            "names the map"
        );
        // The failed entry is not in the mirror, so the next pass retries it; once pruning may
        // free room, the same pass removes the stale entry and then writes it.
        let report = synced.sync([(1, 1), (2, 2)], true);
        assert!(report.errors.is_empty(), "{:?}", report.errors);
        assert_eq!((report.written, report.removed), (1, 1));
        assert_eq!(synced.entries(), &BTreeMap::from([(1, 1), (2, 2)]));
    }

    #[test]
    fn tables_round_trip_a_desired_state() {
        let mut tables = Tables::in_memory();
        let desired = fixture::desired(Mode::A, kube_ovn_ebpf_common::role::OVN0);
        let report = tables.apply(&desired, true);
        assert!(report.errors.is_empty());
        assert!(report.written > 0);
        assert_eq!(tables.current(), desired);
        let again = tables.apply(&desired, true);
        assert_eq!((again.written, again.removed), (0, 0));
        let mode_b = fixture::desired(Mode::B, kube_ovn_ebpf_common::role::OVN0);
        tables.apply(&mode_b, true);
        assert_eq!(tables.current(), mode_b);
    }

    #[test]
    fn a_full_map_makes_one_fault_with_count_and_capacity() {
        let mut tables = Tables::in_memory();
        let mut small = MemTable::new(names::SERVICE_CIDRS_V4);
        small.capacity = 10;
        tables.v4.service_cidrs = Synced::adopt(Box::new(small)).unwrap();
        let mut desired = MapState::default();
        for i in 0..300u32 {
            let net = Ipv4Net::new(Ipv4Addr::from(0x0a00_0000 + (i << 8)), 24).unwrap();
            desired.v4.service_cidrs.insert(net);
        }
        let report = tables.apply(&desired, true);
        assert_eq!(report.errors.len(), 290, "one error per refused entry");
        let faults = tables.faults(&report.errors);
        assert_eq!(faults.len(), 1, "{faults:?}");
        let fault = &faults[0];
        assert_eq!(
            (
                fault.map,
                fault.kind,
                fault.refused,
                fault.capacity,
                fault.entries
            ),
            (
                names::SERVICE_CIDRS_V4,
                crate::metrics::ErrorKind::MapFull,
                290,
                10,
                10
            )
        );
        let line = fault.to_string();
        assert!(line.contains("290 entries refused"), "{line}");
        assert!(line.contains("capacity 10"), "{line}");
        assert_eq!(fault.key(), "map kovn_svccidr4 full (no errno)");
    }
}
