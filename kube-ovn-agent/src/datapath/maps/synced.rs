//! The table abstraction every map implements, an in-memory table, and [`Synced`]: a table
//! plus a mirror of what it holds, written by difference.

use std::collections::BTreeMap;

use super::{
    Result,
    error::{FULL, MapError},
};

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
            self.remove_stale(stale, &mut report);
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

    /// Removes `stale` keys from the map and the mirror, counting into `report`.
    fn remove_stale(&mut self, stale: Vec<K>, report: &mut TableReport) {
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

    /// Brings only `keys` to `desired` (`None`: the key should be absent) and leaves the rest
    /// of the map alone: O(keys), for incremental updates. Without `prune` it only writes.
    pub fn sync_keys<'a>(
        &mut self,
        keys: impl IntoIterator<Item = &'a K>,
        desired: impl Fn(&K) -> Option<V>,
        prune: bool,
    ) -> TableReport
    where
        K: 'a,
    {
        let mut report = TableReport::default();
        let (mut writes, mut stale) = (Vec::new(), Vec::new());
        for key in keys {
            match (desired(key), self.mirror.get(key)) {
                (Some(value), Some(old)) if *old == value => {}
                (Some(value), _) => writes.push((*key, value)),
                (None, Some(_)) => stale.push(*key),
                (None, None) => {}
            }
        }
        let results = self.table.write_many(&writes);
        for ((key, value), result) in writes.into_iter().zip(results) {
            match result {
                Ok(()) => {
                    self.mirror.insert(key, value);
                    report.written += 1;
                }
                Err(e) => report.errors.push(e),
            }
        }
        if prune {
            self.remove_stale(stale, &mut report);
        }
        report
    }
}
