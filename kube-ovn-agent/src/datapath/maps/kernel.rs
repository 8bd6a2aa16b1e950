//! The kernel maps as [`MapTable`]s: BPF hashes, LPM tries and arrays, written in batches
//! where the kernel supports them.

use std::{
    collections::BTreeMap,
    io,
    os::fd::{AsFd as _, OwnedFd},
};

use aya::maps::{
    Array, HashMap, IterableMap as _, LpmTrie, Map, MapData, PerCpuArray, lpm_trie::Key,
};
use kube_ovn_ebpf_common::{Config, Iface, PRESENT, counter, iface_slot, names};

use super::{
    Result,
    codec::{Codec, Prefix},
    error::{MapError, errno},
    synced::MapTable,
};
use crate::datapath::sys;

/// A kernel map's batch-update handle: a duplicate of its fd (so single writes through the aya
/// handle can interleave) and whether the kernel accepted batches for it so far.
struct Batcher {
    fd: OwnedFd,
    supported: bool,
    /// The map's `max_entries`, for reports.
    capacity: usize,
}

impl Batcher {
    fn new(map: &MapData) -> Self {
        let fd = map
            .fd()
            .as_fd()
            .try_clone_to_owned()
            .expect("duplicating a map fd");
        let capacity = map
            .info()
            .map_or(usize::MAX, |info| info.max_entries() as usize);
        Self {
            fd,
            supported: true,
            capacity,
        }
    }

    /// Every raw entry of the map by batch lookups, or through `one_by_one` (aya's iterator)
    /// where the kernel lacks them or a batch fails midway.
    fn read_all<KR: aya::Pod, VR: aya::Pod>(
        &self,
        one_by_one: impl FnOnce() -> Result<Vec<(KR, VR)>>,
    ) -> Result<Vec<(KR, VR)>> {
        if self.supported
            && let Ok(entries) = sys::lookup_all(self.fd.as_fd())
        {
            return Ok(entries);
        }
        one_by_one()
    }

    /// Writes `keys[i] → values[i]` by batches, falling back to `single(i)` for an entry a batch
    /// stopped at (so its error is the typed one of a single write) and for every entry once the
    /// kernel turns out to lack batch updates for this map type.
    fn write<KR: aya::Pod, VR: aya::Pod>(
        &mut self,
        keys: &[KR],
        values: &[VR],
        mut single: impl FnMut(usize) -> Result<()>,
    ) -> Vec<Result<()>> {
        let mut results = Vec::with_capacity(keys.len());
        let mut next = 0;
        while next < keys.len() {
            if !self.supported {
                results.push(single(next));
                next += 1;
                continue;
            }
            match sys::update(self.fd.as_fd(), &keys[next..], &values[next..]) {
                Ok(()) => {
                    results.resize_with(keys.len(), || Ok(()));
                    next = keys.len();
                }
                Err(sys::Stopped::Unsupported) => {
                    let result = single(next);
                    // The entry itself is fine, so the kernel lacks the command, not our data.
                    if result.is_ok() {
                        self.supported = false;
                    }
                    results.push(result);
                    next += 1;
                }
                Err(sys::Stopped::At { at, .. }) => {
                    debug_assert!(
                        at < keys.len() - next,
                        "`update` reports an entry it was given"
                    );
                    results.resize_with(results.len() + at, || Ok(()));
                    next += at;
                    results.push(single(next));
                    next += 1;
                }
            }
        }
        results
    }
}

pub(crate) fn take(maps: &mut BTreeMap<&'static str, Map>, name: &'static str) -> Result<Map> {
    maps.remove(name).ok_or(MapError::Missing { map: name })
}

/// A BPF hash map.
pub struct HashTable<K: Codec, V: Codec> {
    name: &'static str,
    map: HashMap<MapData, K::Raw, V::Raw>,
    batcher: Batcher,
}

impl<K: Codec, V: Codec> HashTable<K, V> {
    pub fn new(maps: &mut BTreeMap<&'static str, Map>, name: &'static str) -> Result<Self> {
        let map: HashMap<MapData, K::Raw, V::Raw> =
            take(maps, name)?
                .try_into()
                .map_err(|source| MapError::Layout {
                    map: name,
                    source: Box::new(source),
                })?;
        let batcher = Batcher::new(map.map());
        Ok(Self { name, map, batcher })
    }

    fn insert(
        map: &mut HashMap<MapData, K::Raw, V::Raw>,
        name: &'static str,
        key: &K,
        value: &V,
    ) -> Result<()>
    where
        K: std::fmt::Debug,
    {
        map.insert(key.encode(), value.encode(), 0)
            .map_err(|source| MapError::Entry {
                op: "insert",
                map: name,
                key: format!("{key:?}"),
                source: Box::new(source),
            })
    }
}

impl<K, V> MapTable<K, V> for HashTable<K, V>
where
    K: Codec + std::fmt::Debug + Send,
    V: Codec + Send,
    K::Raw: Send,
    V::Raw: Send,
{
    fn name(&self) -> &'static str {
        self.name
    }
    fn capacity(&self) -> usize {
        self.batcher.capacity
    }
    fn read_all(&self) -> Result<Vec<(K, V)>> {
        let raw = self.batcher.read_all(|| {
            self.map
                .iter()
                .map(|entry| {
                    entry.map_err(|source| MapError::Read {
                        map: self.name,
                        source: Box::new(source),
                    })
                })
                .collect()
        })?;
        // Entries we cannot decode were not written by us; leaving them out of the mirror
        // means they are pruned like any other stale entry.
        Ok(raw
            .iter()
            .filter_map(|(k, v)| Some((K::decode(k)?, V::decode(v)?)))
            .collect())
    }
    fn write(&mut self, key: K, value: V) -> Result<()> {
        Self::insert(&mut self.map, self.name, &key, &value)
    }
    fn write_many(&mut self, entries: &[(K, V)]) -> Vec<Result<()>>
    where
        K: Copy,
        V: Copy,
    {
        let keys: Vec<K::Raw> = entries.iter().map(|(k, _)| k.encode()).collect();
        let values: Vec<V::Raw> = entries.iter().map(|(_, v)| v.encode()).collect();
        let (map, name) = (&mut self.map, self.name);
        self.batcher.write(&keys, &values, |i| {
            Self::insert(map, name, &entries[i].0, &entries[i].1)
        })
    }
    fn remove(&mut self, key: K) -> Result<()> {
        match self.map.remove(&key.encode()) {
            Err(aya::maps::MapError::KeyNotFound) => Ok(()),
            Err(e) if errno(&e) == Some(libc::ENOENT) => Ok(()),
            other => other.map_err(|source| MapError::Entry {
                op: "remove",
                map: self.name,
                key: format!("{key:?}"),
                source: Box::new(source),
            }),
        }
    }
}

/// A BPF LPM trie holding a set of CIDRs.
pub struct PrefixTable<N: Prefix> {
    name: &'static str,
    map: LpmTrie<MapData, N::Data, u8>,
    batcher: Batcher,
}

impl<N: Prefix> PrefixTable<N> {
    pub fn new(maps: &mut BTreeMap<&'static str, Map>, name: &'static str) -> Result<Self> {
        let map: LpmTrie<MapData, N::Data, u8> =
            take(maps, name)?
                .try_into()
                .map_err(|source| MapError::Layout {
                    map: name,
                    source: Box::new(source),
                })?;
        let batcher = Batcher::new(map.map());
        Ok(Self { name, map, batcher })
    }

    fn insert(map: &mut LpmTrie<MapData, N::Data, u8>, name: &'static str, key: &N) -> Result<()>
    where
        N: std::fmt::Display,
    {
        map.insert(&key.to_key(), PRESENT, 0)
            .map_err(|source| MapError::Entry {
                op: "insert",
                map: name,
                key: key.to_string(),
                source: Box::new(source),
            })
    }
}

impl<N> MapTable<N, ()> for PrefixTable<N>
where
    N: Prefix + std::fmt::Display + Send,
    N::Data: Send,
{
    fn name(&self) -> &'static str {
        self.name
    }
    fn capacity(&self) -> usize {
        self.batcher.capacity
    }
    fn read_all(&self) -> Result<Vec<(N, ())>> {
        let raw = self.batcher.read_all(|| {
            self.map
                .iter()
                .map(|entry| {
                    entry.map_err(|source| MapError::Read {
                        map: self.name,
                        source: Box::new(source),
                    })
                })
                .collect()
        })?;
        Ok(raw
            .iter()
            .filter_map(|(key, _): &(Key<N::Data>, u8)| Some((N::from_key(key)?, ())))
            .collect())
    }
    fn write(&mut self, key: N, (): ()) -> Result<()> {
        Self::insert(&mut self.map, self.name, &key)
    }
    fn write_many(&mut self, entries: &[(N, ())]) -> Vec<Result<()>>
    where
        N: Copy,
    {
        let keys: Vec<Key<N::Data>> = entries.iter().map(|(k, ())| k.to_key()).collect();
        let values = vec![PRESENT; entries.len()];
        let (map, name) = (&mut self.map, self.name);
        self.batcher
            .write(&keys, &values, |i| Self::insert(map, name, &entries[i].0))
    }
    fn remove(&mut self, key: N) -> Result<()> {
        match self.map.remove(&key.to_key()) {
            Err(aya::maps::MapError::KeyNotFound) => Ok(()),
            Err(e) if errno(&e) == Some(libc::ENOENT) => Ok(()),
            other => other.map_err(|source| MapError::Entry {
                op: "remove",
                map: self.name,
                key: key.to_string(),
                source: Box::new(source),
            }),
        }
    }
}

/// The NodePort-local array: port → `nodeport` bits; zero means absent.
pub struct PortArrayTable {
    map: Array<MapData, u8>,
    batcher: Batcher,
}

impl PortArrayTable {
    pub fn new(maps: &mut BTreeMap<&'static str, Map>) -> Result<Self> {
        let name = names::NODEPORT_LOCAL;
        let map: Array<MapData, u8> =
            take(maps, name)?
                .try_into()
                .map_err(|source| MapError::Layout {
                    map: name,
                    source: Box::new(source),
                })?;
        let batcher = Batcher::new(map.map());
        Ok(Self { map, batcher })
    }

    fn set(map: &mut Array<MapData, u8>, port: u16, bits: u8) -> Result<()> {
        map.set(u32::from(port), bits, 0)
            .map_err(|source| MapError::Entry {
                op: "set",
                map: names::NODEPORT_LOCAL,
                key: port.to_string(),
                source: Box::new(source),
            })
    }
}

impl MapTable<u16, u8> for PortArrayTable {
    fn name(&self) -> &'static str {
        names::NODEPORT_LOCAL
    }
    fn capacity(&self) -> usize {
        self.batcher.capacity
    }
    fn read_all(&self) -> Result<Vec<(u16, u8)>> {
        let raw: Vec<(u32, u8)> = self.batcher.read_all(|| {
            (0..)
                .zip(self.map.iter())
                .map(|(port, bits)| {
                    bits.map(|bits| (port, bits))
                        .map_err(|source| MapError::Read {
                            map: names::NODEPORT_LOCAL,
                            source: Box::new(source),
                        })
                })
                .collect()
        })?;
        Ok(raw
            .into_iter()
            .filter(|&(_, bits)| bits != 0)
            .map(|(port, bits)| (u16::try_from(port).expect("array has 65536 slots"), bits))
            .collect())
    }
    fn write(&mut self, port: u16, bits: u8) -> Result<()> {
        Self::set(&mut self.map, port, bits)
    }
    fn remove(&mut self, port: u16) -> Result<()> {
        self.write(port, 0)
    }
    fn write_many(&mut self, entries: &[(u16, u8)]) -> Vec<Result<()>> {
        let keys: Vec<u32> = entries.iter().map(|&(port, _)| u32::from(port)).collect();
        let values: Vec<u8> = entries.iter().map(|&(_, bits)| bits).collect();
        let map = &mut self.map;
        self.batcher.write(&keys, &values, |i| {
            Self::set(map, entries[i].0, entries[i].1)
        })
    }
}

/// The interface array: ifindex → roles, each at `iface_slot(ifindex)`.
pub struct IfaceTable {
    map: Array<MapData, Iface>,
    batcher: Batcher,
}

impl IfaceTable {
    pub fn new(maps: &mut BTreeMap<&'static str, Map>) -> Result<Self> {
        let name = names::IFACES;
        let map: Array<MapData, Iface> =
            take(maps, name)?
                .try_into()
                .map_err(|source| MapError::Layout {
                    map: name,
                    source: Box::new(source),
                })?;
        let batcher = Batcher::new(map.map());
        Ok(Self { map, batcher })
    }

    fn slot(&self, ifindex: u32) -> Result<Iface> {
        self.map
            .get(&iface_slot(ifindex), 0)
            .map_err(|source| MapError::Read {
                map: names::IFACES,
                source: Box::new(source),
            })
    }
}

impl MapTable<u32, u32> for IfaceTable {
    fn name(&self) -> &'static str {
        names::IFACES
    }
    fn capacity(&self) -> usize {
        self.batcher.capacity
    }
    fn read_all(&self) -> Result<Vec<(u32, u32)>> {
        let raw: Vec<(u32, Iface)> = self.batcher.read_all(|| {
            (0..)
                .zip(self.map.iter())
                .map(|(slot, iface)| {
                    iface
                        .map(|iface| (slot, iface))
                        .map_err(|source| MapError::Read {
                            map: names::IFACES,
                            source: Box::new(source),
                        })
                })
                .collect()
        })?;
        Ok(raw
            .into_iter()
            .filter(|(_, iface)| iface.roles != 0)
            .map(|(_, iface)| (iface.ifindex, iface.roles))
            .collect())
    }
    fn write(&mut self, ifindex: u32, roles: u32) -> Result<()> {
        let current = self.slot(ifindex)?;
        if current.roles != 0 && current.ifindex != ifindex {
            return Err(MapError::Rejected {
                op: "set",
                map: names::IFACES,
                key: ifindex.to_string(),
                reason: "its slot belongs to another attached interface (ifindexes 65536 apart)",
            });
        }
        self.map
            .set(iface_slot(ifindex), Iface { ifindex, roles }, 0)
            .map_err(|source| MapError::Entry {
                op: "set",
                map: names::IFACES,
                key: ifindex.to_string(),
                source: Box::new(source),
            })
    }
    fn remove(&mut self, ifindex: u32) -> Result<()> {
        // Only clear the slot if it is still this interface's.
        if self.slot(ifindex)?.ifindex != ifindex {
            return Ok(());
        }
        self.map
            .set(iface_slot(ifindex), Iface::default(), 0)
            .map_err(|source| MapError::Entry {
                op: "clear",
                map: names::IFACES,
                key: ifindex.to_string(),
                source: Box::new(source),
            })
    }
}

/// The single-entry config array; its "key" is `()`.
pub struct ConfigTable {
    map: Array<MapData, Config>,
}

impl ConfigTable {
    pub fn new(maps: &mut BTreeMap<&'static str, Map>) -> Result<Self> {
        let name = names::CONFIG;
        let map = take(maps, name)?
            .try_into()
            .map_err(|source| MapError::Layout {
                map: name,
                source: Box::new(source),
            })?;
        Ok(Self { map })
    }
}

impl MapTable<(), Config> for ConfigTable {
    fn name(&self) -> &'static str {
        names::CONFIG
    }
    fn capacity(&self) -> usize {
        1
    }
    fn read_all(&self) -> Result<Vec<((), Config)>> {
        let config = self.map.get(&0, 0).map_err(|source| MapError::Read {
            map: names::CONFIG,
            source: Box::new(source),
        })?;
        Ok(vec![((), config)])
    }
    fn write(&mut self, (): (), config: Config) -> Result<()> {
        self.map
            .set(0, config, 0)
            .map_err(|source| MapError::Entry {
                op: "set",
                map: names::CONFIG,
                key: "0".into(),
                source: Box::new(source),
            })
    }
    fn remove(&mut self, (): ()) -> Result<()> {
        self.write((), Config::default())
    }
}

/// Per-CPU counters summed over CPUs, indexed by `counter` slot.
pub fn read_counters(map: &PerCpuArray<MapData, u64>) -> io::Result<Vec<u64>> {
    // One value per named counter, so a new counter needs no edit here.
    (0u32..)
        .zip(counter::NAMES)
        .map(|(slot, _)| {
            map.get(&slot, 0)
                .map(|per_cpu| per_cpu.iter().sum())
                .map_err(io::Error::other)
        })
        .collect()
}
