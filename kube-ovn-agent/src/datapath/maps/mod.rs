//! Writing a [`MapState`] state into the datapath maps by difference.
//!
//! Each map is a [`MapTable`]: typed keys and values in human terms (CIDRs, addresses, ports),
//! encoded to the `#[repr(C)]` types of the common crate at the boundary. [`Synced`] keeps a
//! mirror of what the kernel map holds, adopted from the (possibly pinned) map at start, and
//! writes only the difference; it never clears a map to refill it. A failed write (map full,
//! rejected key) is reported with context and retried on the next sync; it never stops the
//! other entries or maps from syncing.

use std::{
    collections::BTreeMap,
    io,
    net::{Ipv4Addr, Ipv6Addr},
    os::fd::{AsFd as _, OwnedFd},
};

use aya::maps::{
    Array, HashMap, IterableMap as _, LpmTrie, Map, MapData, PerCpuArray, lpm_trie::Key,
};
use ipnet::{Ipv4Net, Ipv6Net};
use kube_ovn_ebpf_common::{
    Config, Iface, PRESENT, ProbeTargetV4, ProbeTargetV6, ServicePortV4, ServicePortV6,
    config_flag, counter, iface_slot, names,
};

use crate::{
    datapath::{dir::DirTable, sys},
    state::{FamilyState, MapState, ProbeTarget, Proto, ServicePort},
};

#[derive(Debug, thiserror::Error)]
pub enum MapError {
    #[error("{op} {map}[{key}]: {source}")]
    Entry {
        op: &'static str,
        map: &'static str,
        key: String,
        #[source]
        source: Box<aya::maps::MapError>,
    },
    #[error("reading map {map}: {source}")]
    Read {
        map: &'static str,
        #[source]
        source: Box<aya::maps::MapError>,
    },
    #[error("map {map} is missing from the eBPF object")]
    Missing { map: &'static str },
    #[error("map {map} has an unexpected type or layout: {source}")]
    Layout {
        map: &'static str,
        #[source]
        source: Box<aya::maps::MapError>,
    },
    #[error("{op} {map}[{key}]: {reason}")]
    Rejected {
        op: &'static str,
        map: &'static str,
        key: String,
        reason: &'static str,
    },
}

impl MapError {
    /// The map is at capacity (`E2BIG` from hash maps, `ENOSPC` from LPM tries).
    pub fn is_full(&self) -> bool {
        match self {
            Self::Entry { source, .. } => {
                errno(source).is_some_and(|e| e == libc::E2BIG || e == libc::ENOSPC)
            }
            Self::Rejected { reason, .. } => *reason == FULL,
            _ => false,
        }
    }

    /// A short label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            _ if self.is_full() => "map_full",
            Self::Entry { .. } | Self::Rejected { .. } => "map_write",
            Self::Read { .. } => "map_read",
            Self::Missing { .. } | Self::Layout { .. } => "map_layout",
        }
    }

    /// The errno the kernel returned, when it returned one.
    pub fn errno(&self) -> Option<i32> {
        match self {
            Self::Entry { source, .. } | Self::Read { source, .. } => errno(source),
            _ => None,
        }
    }

    pub fn map(&self) -> &'static str {
        match self {
            Self::Entry { map, .. }
            | Self::Read { map, .. }
            | Self::Missing { map }
            | Self::Layout { map, .. }
            | Self::Rejected { map, .. } => map,
        }
    }
}

const FULL: &str = "map is full";

fn errno(error: &aya::maps::MapError) -> Option<i32> {
    match error {
        aya::maps::MapError::SyscallError(e) => e.io_error.raw_os_error(),
        aya::maps::MapError::IoError(e) => e.raw_os_error(),
        _ => None,
    }
}

pub type Result<T, E = MapError> = std::result::Result<T, E>;

/// One datapath map as a typed key → value table.
pub trait MapTable<K, V>: Send {
    fn name(&self) -> &'static str;
    /// Entries the map can hold (`max_entries`).
    fn capacity(&self) -> usize;
    fn read_all(&self) -> Result<Vec<(K, V)>>;
    fn write(&mut self, key: K, value: V) -> Result<()>;
    fn remove(&mut self, key: K) -> Result<()>;
    /// Writes every entry; one result per entry, in order. Kernel tables override this with
    /// batch updates.
    fn write_many(&mut self, entries: &[(K, V)]) -> Vec<Result<()>>
    where
        K: Copy,
        V: Copy,
    {
        entries.iter().map(|&(k, v)| self.write(k, v)).collect()
    }
}

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

/// Conversion between a human key/value and the raw `#[repr(C)]` form stored in the kernel.
pub trait Codec: Sized {
    type Raw: aya::Pod;
    fn encode(&self) -> Self::Raw;
    fn decode(raw: &Self::Raw) -> Option<Self>;
}

impl Codec for Ipv4Addr {
    type Raw = [u8; 4];
    fn encode(&self) -> [u8; 4] {
        self.octets()
    }
    fn decode(raw: &[u8; 4]) -> Option<Self> {
        Some((*raw).into())
    }
}

impl Codec for Ipv6Addr {
    type Raw = [u8; 16];
    fn encode(&self) -> [u8; 16] {
        self.octets()
    }
    fn decode(raw: &[u8; 16]) -> Option<Self> {
        Some((*raw).into())
    }
}

impl Codec for ServicePort<Ipv4Addr> {
    type Raw = ServicePortV4;
    fn encode(&self) -> ServicePortV4 {
        ServicePortV4 {
            addr: self.addr.octets(),
            port: self.port,
            proto: self.proto.number(),
            pad: 0,
        }
    }
    fn decode(raw: &ServicePortV4) -> Option<Self> {
        Some(Self {
            addr: raw.addr.into(),
            proto: Proto::from_number(raw.proto)?,
            port: raw.port,
        })
    }
}

impl Codec for ServicePort<Ipv6Addr> {
    type Raw = ServicePortV6;
    fn encode(&self) -> ServicePortV6 {
        ServicePortV6 {
            addr: self.addr.octets(),
            port: self.port,
            proto: self.proto.number(),
            pad: 0,
        }
    }
    fn decode(raw: &ServicePortV6) -> Option<Self> {
        Some(Self {
            addr: raw.addr.into(),
            proto: Proto::from_number(raw.proto)?,
            port: raw.port,
        })
    }
}

impl Codec for ProbeTarget<Ipv4Addr> {
    type Raw = ProbeTargetV4;
    fn encode(&self) -> ProbeTargetV4 {
        ProbeTargetV4 {
            addr: self.addr.octets(),
            port: self.port,
            pad: 0,
        }
    }
    fn decode(raw: &ProbeTargetV4) -> Option<Self> {
        Some(Self {
            addr: raw.addr.into(),
            port: raw.port,
        })
    }
}

impl Codec for ProbeTarget<Ipv6Addr> {
    type Raw = ProbeTargetV6;
    fn encode(&self) -> ProbeTargetV6 {
        ProbeTargetV6 {
            addr: self.addr.octets(),
            port: self.port,
            pad: 0,
        }
    }
    fn decode(raw: &ProbeTargetV6) -> Option<Self> {
        Some(Self {
            addr: raw.addr.into(),
            port: raw.port,
        })
    }
}

/// Set membership: the value of set-like maps.
impl Codec for () {
    type Raw = u8;
    fn encode(&self) -> u8 {
        PRESENT
    }
    fn decode(_: &u8) -> Option<Self> {
        Some(())
    }
}

/// A CIDR as an LPM-trie key.
pub trait Prefix: Sized {
    type Data: aya::Pod;
    fn to_key(&self) -> Key<Self::Data>;
    fn from_key(key: &Key<Self::Data>) -> Option<Self>;
}

impl Prefix for Ipv4Net {
    type Data = [u8; 4];
    fn to_key(&self) -> Key<[u8; 4]> {
        Key::new(u32::from(self.prefix_len()), self.network().octets())
    }
    fn from_key(key: &Key<[u8; 4]>) -> Option<Self> {
        Self::new(
            Ipv4Addr::from(key.data()),
            u8::try_from(key.prefix_len()).ok()?,
        )
        .ok()
    }
}

impl Prefix for Ipv6Net {
    type Data = [u8; 16];
    fn to_key(&self) -> Key<[u8; 16]> {
        Key::new(u32::from(self.prefix_len()), self.network().octets())
    }
    fn from_key(key: &Key<[u8; 16]>) -> Option<Self> {
        Self::new(
            Ipv6Addr::from(key.data()),
            u8::try_from(key.prefix_len()).ok()?,
        )
        .ok()
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

/// An in-memory table, for tests and for planning without a kernel. `capacity` makes writes
/// beyond it fail like a full BPF map.
pub struct MemTable<K, V> {
    pub name: &'static str,
    pub entries: BTreeMap<K, V>,
    pub capacity: usize,
}

impl<K: Ord, V> MemTable<K, V> {
    pub fn new(name: &'static str) -> Self {
        Self {
            name,
            entries: BTreeMap::new(),
            capacity: usize::MAX,
        }
    }
}

impl<K, V> MapTable<K, V> for MemTable<K, V>
where
    K: Ord + Copy + std::fmt::Debug + Send,
    V: Copy + Send,
{
    fn name(&self) -> &'static str {
        self.name
    }
    fn capacity(&self) -> usize {
        self.capacity
    }
    fn read_all(&self) -> Result<Vec<(K, V)>> {
        Ok(self.entries.iter().map(|(k, v)| (*k, *v)).collect())
    }
    fn write(&mut self, key: K, value: V) -> Result<()> {
        if !self.entries.contains_key(&key) && self.entries.len() >= self.capacity {
            return Err(MapError::Rejected {
                op: "insert",
                map: self.name,
                key: format!("{key:?}"),
                reason: FULL,
            });
        }
        self.entries.insert(key, value);
        Ok(())
    }
    fn remove(&mut self, key: K) -> Result<()> {
        self.entries.remove(&key);
        Ok(())
    }
}

/// What one sync of one table did.
#[derive(Debug, Default)]
pub struct TableReport {
    pub written: usize,
    pub removed: usize,
    pub errors: Vec<MapError>,
}

/// A table plus a mirror of its kernel content.
pub struct Synced<K, V> {
    table: Box<dyn MapTable<K, V>>,
    mirror: BTreeMap<K, V>,
}

impl<K: Ord + Copy, V: Copy + PartialEq> Synced<K, V> {
    /// Adopts whatever the map already holds (a pinned map keeps its content across restarts).
    pub fn adopt(table: Box<dyn MapTable<K, V>>) -> Result<Self> {
        let mirror = table.read_all()?.into_iter().collect();
        Ok(Self { table, mirror })
    }

    pub fn name(&self) -> &'static str {
        self.table.name()
    }

    pub fn len(&self) -> usize {
        self.mirror.len()
    }

    pub fn capacity(&self) -> usize {
        self.table.capacity()
    }

    pub fn is_empty(&self) -> bool {
        self.mirror.is_empty()
    }

    pub fn entries(&self) -> &BTreeMap<K, V> {
        &self.mirror
    }

    /// Re-reads the kernel map, e.g. after someone else wrote to it.
    pub fn refresh(&mut self) -> Result<()> {
        self.mirror = self.table.read_all()?.into_iter().collect();
        Ok(())
    }

    /// Writes entries of `desired` (sorted by key, as from a `BTreeSet`/`BTreeMap`) that differ
    /// from the mirror; with `prune`, removes entries not in `desired`. Additions go first so a
    /// replaced entry is never briefly missing.
    pub fn sync(&mut self, desired: impl IntoIterator<Item = (K, V)>, prune: bool) -> TableReport {
        let mut report = TableReport::default();
        let mut stale: Vec<K> = Vec::new();
        let mut current = self.mirror.iter().peekable();
        let mut writes: Vec<(K, V)> = Vec::new();
        for (key, value) in desired {
            while let Some((k, _)) = current.next_if(|(k, _)| **k < key) {
                stale.push(*k);
            }
            match current.next_if(|(k, _)| **k == key) {
                Some((_, v)) if *v == value => {}
                _ => writes.push((key, value)),
            }
        }
        stale.extend(current.map(|(k, _)| *k));

        // Additions go first so a replaced entry is never briefly missing; writes refused for a
        // full map are retried once the stale entries are gone.
        let mut refused = Vec::new();
        let results = self.table.write_many(&writes);
        for ((key, value), result) in writes.into_iter().zip(results) {
            match result {
                Ok(()) => {
                    self.mirror.insert(key, value);
                    report.written += 1;
                }
                Err(e) if e.is_full() && prune && !stale.is_empty() => refused.push((key, value)),
                Err(e) => report.errors.push(e),
            }
        }
        if prune {
            for key in stale {
                match self.table.remove(key) {
                    Ok(()) => {
                        self.mirror.remove(&key);
                        report.removed += 1;
                    }
                    Err(e) => report.errors.push(e),
                }
            }
        }
        for (key, value) in refused {
            match self.table.write(key, value) {
                Ok(()) => {
                    self.mirror.insert(key, value);
                    report.written += 1;
                }
                Err(e) => report.errors.push(e),
            }
        }
        report
    }
}

/// The maps of one address family.
pub struct FamilyTables<N, A> {
    pub subnets: Synced<N, ()>,
    pub service_cidrs: Synced<N, ()>,
    pub service_ports: Synced<ServicePort<A>, ()>,
    pub other_nodes: Synced<A, ()>,
    pub local: Synced<N, ()>,
    pub probe_targets: Synced<ProbeTarget<A>, ()>,
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
            v4: FamilyTables {
                subnets: adopt(PrefixTable::<Ipv4Net>::new(maps, names::SUBNETS_V4)?)?,
                service_cidrs: adopt(PrefixTable::<Ipv4Net>::new(maps, names::SERVICE_CIDRS_V4)?)?,
                service_ports: adopt(HashTable::<ServicePort<Ipv4Addr>, ()>::new(
                    maps,
                    names::SERVICE_PORTS_V4,
                )?)?,
                other_nodes: adopt(HashTable::<Ipv4Addr, ()>::new(maps, names::OTHER_NODES_V4)?)?,
                local: adopt(PrefixTable::<Ipv4Net>::new(maps, names::LOCAL_ADDRS_V4)?)?,
                probe_targets: adopt(HashTable::<ProbeTarget<Ipv4Addr>, ()>::new(
                    maps,
                    names::TPROXY_V4,
                )?)?,
            },
            v6: FamilyTables {
                subnets: adopt(PrefixTable::<Ipv6Net>::new(maps, names::SUBNETS_V6)?)?,
                service_cidrs: adopt(PrefixTable::<Ipv6Net>::new(maps, names::SERVICE_CIDRS_V6)?)?,
                service_ports: adopt(HashTable::<ServicePort<Ipv6Addr>, ()>::new(
                    maps,
                    names::SERVICE_PORTS_V6,
                )?)?,
                other_nodes: adopt(HashTable::<Ipv6Addr, ()>::new(maps, names::OTHER_NODES_V6)?)?,
                local: adopt(PrefixTable::<Ipv6Net>::new(maps, names::LOCAL_ADDRS_V6)?)?,
                probe_targets: adopt(HashTable::<ProbeTarget<Ipv6Addr>, ()>::new(
                    maps,
                    names::TPROXY_V6,
                )?)?,
            },
            subnets_v4_dir: DirTable::new(maps, names::SUBNETS_V4_L16, names::SUBNETS_V4_L24)?,
        })
    }

    /// In-memory tables, for tests.
    pub fn in_memory() -> Self {
        fn mem<K, V>(name: &'static str) -> Synced<K, V>
        where
            K: Ord + Copy + std::fmt::Debug + Send + 'static,
            V: Copy + PartialEq + Send + 'static,
        {
            Synced::adopt(Box::new(MemTable::new(name))).expect("memory tables read infallibly")
        }
        Self {
            config: mem(names::CONFIG),
            ifaces: mem(names::IFACES),
            nodeport_local: mem(names::NODEPORT_LOCAL),
            v4: FamilyTables {
                subnets: mem(names::SUBNETS_V4),
                service_cidrs: mem(names::SERVICE_CIDRS_V4),
                service_ports: mem(names::SERVICE_PORTS_V4),
                other_nodes: mem(names::OTHER_NODES_V4),
                local: mem(names::LOCAL_ADDRS_V4),
                probe_targets: mem(names::TPROXY_V4),
            },
            v6: FamilyTables {
                subnets: mem(names::SUBNETS_V6),
                service_cidrs: mem(names::SERVICE_CIDRS_V6),
                service_ports: mem(names::SERVICE_PORTS_V6),
                other_nodes: mem(names::OTHER_NODES_V6),
                local: mem(names::LOCAL_ADDRS_V6),
                probe_targets: mem(names::TPROXY_V6),
            },
            subnets_v4_dir: DirTable::in_memory(names::SUBNETS_V4_L16, names::SUBNETS_V4_L24),
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
        sync_family(&mut self.v4, &desired.v4, false, &mut report);
        self.sync_dirs(&mut report);
        sync_family(&mut self.v6, &desired.v6, false, &mut report);
        report.add(self.nodeport_local.sync(filled, false));
        report.add(self.ifaces.sync(ifaces(), false));
        if prune {
            // A map too full to take the new entries before the stale ones go is retried by the
            // pruning pass, which reports what still fails.
            report.errors.retain(|e| !e.is_full());
        }
        report.add(self.config.sync([((), desired.config())], true));
        if prune {
            sync_family(&mut self.v4, &desired.v4, true, &mut report);
            self.sync_dirs(&mut report);
            sync_family(&mut self.v6, &desired.v6, true, &mut report);
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

    /// The state the maps hold now, decoded.
    pub fn current(&self) -> MapState {
        fn family<N: Ord + Copy, A: Ord + Copy>(
            t: &FamilyTables<N, A>,
            rules: u32,
            tproxy_listener: Option<A>,
            tproxy_listener_opaque: bool,
        ) -> FamilyState<N, A> {
            FamilyState {
                rules,
                subnets: t.subnets.entries().keys().copied().collect(),
                service_cidrs: t.service_cidrs.entries().keys().copied().collect(),
                service_ports: t.service_ports.entries().keys().copied().collect(),
                other_nodes: t.other_nodes.entries().keys().copied().collect(),
                local: t.local.entries().keys().copied().collect(),
                nodeport_local_tcp: std::collections::BTreeSet::default(),
                nodeport_local_udp: std::collections::BTreeSet::default(),
                probe_targets: t.probe_targets.entries().keys().copied().collect(),
                tproxy_listener,
                tproxy_listener_opaque,
            }
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
        for family in [
            &mut self.v4.subnets,
            &mut self.v4.service_cidrs,
            &mut self.v4.local,
        ] {
            family.refresh()?;
        }
        self.v4.service_ports.refresh()?;
        self.v4.other_nodes.refresh()?;
        self.v4.probe_targets.refresh()?;
        for family in [
            &mut self.v6.subnets,
            &mut self.v6.service_cidrs,
            &mut self.v6.local,
        ] {
            family.refresh()?;
        }
        self.v6.service_ports.refresh()?;
        self.v6.other_nodes.refresh()?;
        self.v6.probe_targets.refresh()?;
        self.subnets_v4_dir.refresh()?;
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
        vec![
            of(&self.ifaces),
            of(&self.nodeport_local),
            of(&self.v4.subnets),
            of(&self.v4.service_cidrs),
            of(&self.v4.service_ports),
            of(&self.v4.other_nodes),
            of(&self.v4.local),
            of(&self.v6.subnets),
            of(&self.v6.service_cidrs),
            of(&self.v6.service_ports),
            of(&self.v6.other_nodes),
            of(&self.v6.local),
            of(&self.v4.probe_targets),
            of(&self.v6.probe_targets),
        ]
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

/// The failures of one sync pass on one map, of one kind.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MapFault {
    pub map: &'static str,
    /// [`MapError::kind`]: `map_full`, `map_write`, ….
    pub kind: &'static str,
    pub errno: Option<i32>,
    /// Entries refused (or removals failed) in the pass.
    pub refused: usize,
    /// Entries in the map after the pass.
    pub entries: usize,
    pub capacity: usize,
    /// The first failure in full (its key, the operation).
    pub first: String,
}

impl MapFault {
    /// Which fault this is, across passes: the same map failing the same way.
    pub fn key(&self) -> String {
        let what = if self.kind == "map_full" {
            "full"
        } else {
            self.kind
        };
        format!("map {} {what} ({})", self.map, errno_name(self.errno))
    }
}

impl std::fmt::Display for MapFault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let errno = errno_name(self.errno);
        if self.kind == "map_full" {
            write!(
                f,
                "map {} is full: {} entries refused ({errno}), capacity {}, {} in the map; the \
                 rest is programmed and the refused entries are retried every pass \
                 (docs/operations.md#map-full)",
                self.map, self.refused, self.capacity, self.entries
            )
        } else {
            write!(
                f,
                "map {}: {} writes failed ({errno}), the first: {}; retried every pass",
                self.map, self.refused, self.first
            )
        }
    }
}

/// `E2BIG`, `ENOSPC`, …: the symbolic name of the errnos map writes return.
fn errno_name(errno: Option<i32>) -> String {
    let Some(errno) = errno else {
        return "no errno".into();
    };
    let name = match errno {
        libc::E2BIG => "E2BIG",
        libc::ENOSPC => "ENOSPC",
        libc::ENOMEM => "ENOMEM",
        libc::EPERM => "EPERM",
        libc::EACCES => "EACCES",
        libc::EINVAL => "EINVAL",
        libc::EBUSY => "EBUSY",
        libc::EEXIST => "EEXIST",
        libc::ENOENT => "ENOENT",
        libc::EFAULT => "EFAULT",
        _ => return format!("errno {errno}"),
    };
    let text = io::Error::from_raw_os_error(errno).to_string();
    let text = text.split(" (os error").next().unwrap_or_default();
    format!("{name}: {text}")
}

fn sync_family<N: Ord + Copy, A: Ord + Copy>(
    tables: &mut FamilyTables<N, A>,
    desired: &FamilyState<N, A>,
    prune: bool,
    report: &mut SyncReport,
) {
    report.add(
        tables
            .subnets
            .sync(desired.subnets.iter().map(member), prune),
    );
    report.add(
        tables
            .service_cidrs
            .sync(desired.service_cidrs.iter().map(member), prune),
    );
    report.add(
        tables
            .service_ports
            .sync(desired.service_ports.iter().map(member), prune),
    );
    report.add(
        tables
            .other_nodes
            .sync(desired.other_nodes.iter().map(member), prune),
    );
    report.add(tables.local.sync(desired.local.iter().map(member), prune));
    report.add(
        tables
            .probe_targets
            .sync(desired.probe_targets.iter().map(member), prune),
    );
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
        assert_eq!(report.errors[0].kind(), "map_full");
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
            (names::SERVICE_CIDRS_V4, "map_full", 290, 10, 10)
        );
        let line = fault.to_string();
        assert!(line.contains("290 entries refused"), "{line}");
        assert!(line.contains("capacity 10"), "{line}");
        assert_eq!(fault.key(), "map kovn_svccidr4 full (no errno)");
    }

    #[test]
    fn errno_names_are_symbolic() {
        assert!(errno_name(Some(libc::ENOSPC)).starts_with("ENOSPC"));
        assert!(errno_name(Some(libc::E2BIG)).starts_with("E2BIG"));
        assert_eq!(errno_name(Some(4095)), "errno 4095");
    }
}
