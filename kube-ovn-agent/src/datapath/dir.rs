//! The direct-indexed front of an IPv4 prefix set (DIR-16-8, `kube_ovn_ebpf_common::dir`):
//! derived from the prefixes the set's LPM trie holds, never from anything else, so the trie
//! stays the one authority and the arrays only answer faster.
//!
//! Every write keeps each intermediate state an answer of the old or the new set (or "ask the
//! trie", zero): a chunk is filled before the first-level slot points at it, a freed chunk is
//! zeroed only after no slot points at it, and a chunk freed in a pass is not reused in the
//! same pass. Per-byte values mean a reader racing an in-place chunk rewrite sees, per address,
//! the old or the new byte.

use std::{
    collections::{BTreeMap, BTreeSet},
    os::fd::AsFd as _,
};

use aya::maps::{Array, IterableMap as _, Map, MapData};
use ipnet::Ipv4Net;
use kube_ovn_ebpf_common::{DirChunk, dir};

use crate::datapath::{
    maps::{MapError, Result, take},
    sys,
};

const SLOTS: usize = dir::SLOTS as usize;

/// What the two arrays should hold for a set of prefixes.
#[derive(Debug, PartialEq, Eq)]
pub struct Layout {
    /// One value per /16 slot.
    pub l16: Vec<u32>,
    /// The chunks in use, by index.
    pub chunks: BTreeMap<u32, DirChunk>,
}

/// The layout for `prefixes`, reusing the chunk each slot had in `current` (so an unchanged
/// /16 is not rewritten) and giving new chunks only indexes `current` does not use.
pub fn layout<'a>(
    prefixes: impl IntoIterator<Item = &'a Ipv4Net>,
    current: &[u32],
    capacity: u32,
) -> Layout {
    let mut l16 = vec![u32::from(dir::MISS); SLOTS];
    let mut long: BTreeMap<usize, Vec<Ipv4Net>> = BTreeMap::new();
    for net in prefixes {
        let net = net.trunc();
        let first = slot(net);
        if net.prefix_len() <= 16 {
            let count = 1usize << (16 - net.prefix_len());
            l16[first..first + count].fill(u32::from(dir::HIT));
        } else {
            long.entry(first).or_default().push(net);
        }
    }
    let used: BTreeSet<u32> = current.iter().filter_map(|&v| dir::chunk(v)).collect();
    let mut free = (0..capacity).filter(|i| !used.contains(i));
    let mut chunks = BTreeMap::new();
    for (s, nets) in long {
        if l16[s] == u32::from(dir::HIT) {
            continue; // a /16 or shorter covers the whole slot
        }
        let mut bytes = [dir::MISS; 256];
        for net in &nets {
            let third = usize::from(net.network().octets()[2]);
            if net.prefix_len() <= 24 {
                let count = 1usize << (24 - net.prefix_len());
                bytes[third..third + count].fill(dir::HIT);
            }
        }
        for net in &nets {
            let third = usize::from(net.network().octets()[2]);
            if net.prefix_len() > 24 && bytes[third] != dir::HIT {
                bytes[third] = dir::TRIE;
            }
        }
        let index = dir::chunk(current[s]).or_else(|| free.next());
        l16[s] = match index {
            Some(index) => {
                chunks.insert(index, DirChunk(bytes));
                dir::CHUNK_BASE + index
            }
            // Out of chunks: this /16 asks the trie.
            None => u32::from(dir::TRIE),
        };
    }
    Layout { l16, chunks }
}

fn slot(net: Ipv4Net) -> usize {
    let [a, b, ..] = net.network().octets();
    usize::from(a) << 8 | usize::from(b)
}

/// The two kernel arrays of one set (absent for in-memory tables) and what they hold.
pub struct DirTable {
    names: (&'static str, &'static str),
    maps: Option<(Array<MapData, u32>, Array<MapData, DirChunk>)>,
    capacity: u32,
    l16: Vec<u32>,
    chunks: BTreeMap<u32, DirChunk>,
    /// The prefixes the arrays were last brought to without an error: an unchanged set is not
    /// laid out again.
    synced: Option<Vec<Ipv4Net>>,
}

impl DirTable {
    /// Takes the two arrays out of a loaded object and adopts what they hold.
    pub fn new(
        maps: &mut BTreeMap<&'static str, Map>,
        l16_name: &'static str,
        l24_name: &'static str,
    ) -> Result<Self> {
        let layout = |name, source| MapError::Layout {
            map: name,
            source: Box::new(source),
        };
        let l16: Array<MapData, u32> = take(maps, l16_name)?
            .try_into()
            .map_err(|e| layout(l16_name, e))?;
        let l24: Array<MapData, DirChunk> = take(maps, l24_name)?
            .try_into()
            .map_err(|e| layout(l24_name, e))?;
        let mut table = Self {
            names: (l16_name, l24_name),
            capacity: l24.len(),
            maps: Some((l16, l24)),
            l16: vec![0; SLOTS],
            chunks: BTreeMap::new(),
            synced: None,
        };
        table.refresh()?;
        Ok(table)
    }

    pub fn in_memory(l16_name: &'static str, l24_name: &'static str) -> Self {
        Self {
            names: (l16_name, l24_name),
            maps: None,
            capacity: dir::CHUNKS,
            l16: vec![0; SLOTS],
            chunks: BTreeMap::new(),
            synced: None,
        }
    }

    /// Re-reads both arrays (heals writes made behind our back on the next sync).
    pub fn refresh(&mut self) -> Result<()> {
        let Some((l16, l24)) = &self.maps else {
            return Ok(());
        };
        let read = |name, source| MapError::Read {
            map: name,
            source: Box::new(source),
        };
        let first: Vec<(u32, u32)> = sys::lookup_all(l16.fd_ref()).or_else(|_| {
            (0..)
                .zip(l16.iter())
                .map(|(i, v)| v.map(|v| (i, v)).map_err(|e| read(self.names.0, e)))
                .collect()
        })?;
        let second: Vec<(u32, DirChunk)> = sys::lookup_all(l24.fd_ref()).or_else(|_| {
            (0..)
                .zip(l24.iter())
                .map(|(i, v)| v.map(|v| (i, v)).map_err(|e| read(self.names.1, e)))
                .collect()
        })?;
        self.l16 = vec![0; SLOTS];
        for (i, v) in first {
            if let Some(slot) = self.l16.get_mut(i as usize) {
                *slot = v;
            }
        }
        self.chunks = second
            .into_iter()
            .filter(|(_, c)| c.0 != [0; 256])
            .collect();
        self.synced = None;
        Ok(())
    }

    /// First-level slots that are not "ask the trie", and chunks in use: for tests and status.
    pub fn counts(&self) -> (usize, usize) {
        (
            self.l16.iter().filter(|&&v| v != 0).count(),
            self.chunks.len(),
        )
    }

    /// The first-level value of `addr`'s /16 and, through a chunk, the byte for `addr`: what
    /// the datapath would read.
    pub fn value(&self, addr: std::net::Ipv4Addr) -> u8 {
        let [first, second, third, _] = addr.octets();
        let value = self.l16[usize::from(first) << 8 | usize::from(second)];
        match dir::chunk(value) {
            Some(index) => self
                .chunks
                .get(&index)
                .map_or(dir::TRIE, |chunk| chunk.0[usize::from(third)]),
            None => u8::try_from(value).unwrap_or(dir::TRIE),
        }
    }

    /// Brings the arrays to the layout of `prefixes` (what the trie holds now). Errors leave
    /// the affected entries at their old value, or at "ask the trie", and are retried next time.
    pub fn sync(&mut self, prefixes: impl IntoIterator<Item = Ipv4Net>) -> Vec<MapError> {
        let now: Vec<Ipv4Net> = prefixes.into_iter().collect();
        if self.synced.as_ref() == Some(&now) {
            return Vec::new();
        }
        let mut want = layout(&now, &self.l16, self.capacity);
        let mut errors = Vec::new();
        // 1. Chunks, before any slot points at them; a slot whose chunk failed asks the trie.
        for (&index, chunk) in &want.chunks {
            if self.chunks.get(&index) == Some(chunk) {
                continue;
            }
            match self.write_chunk(index, chunk) {
                Ok(()) => {
                    self.chunks.insert(index, *chunk);
                }
                Err(e) => {
                    errors.push(e);
                    for v in &mut want.l16 {
                        if *v == dir::CHUNK_BASE + index {
                            *v = u32::from(dir::TRIE);
                        }
                    }
                }
            }
        }
        // 2. The first level, by difference.
        let changed: Vec<u32> = (0..dir::SLOTS)
            .filter(|&i| want.l16[i as usize] != self.l16[i as usize])
            .collect();
        errors.extend(self.write_l16(&changed, &want.l16));
        // 3. Chunks no slot points at any more: zeroed ("ask the trie") once unreferenced.
        let referenced: BTreeSet<u32> = self.l16.iter().filter_map(|&v| dir::chunk(v)).collect();
        let stale: Vec<u32> = self
            .chunks
            .keys()
            .copied()
            .filter(|i| !referenced.contains(i))
            .collect();
        for index in stale {
            match self.write_chunk(index, &DirChunk([0; 256])) {
                Ok(()) => {
                    self.chunks.remove(&index);
                }
                Err(e) => errors.push(e),
            }
        }
        self.synced = errors.is_empty().then_some(now);
        errors
    }

    fn write_chunk(&mut self, index: u32, chunk: &DirChunk) -> Result<()> {
        let name = self.names.1;
        let Some((_, l24)) = &mut self.maps else {
            return Ok(());
        };
        l24.set(index, chunk, 0).map_err(|source| MapError::Entry {
            op: "set",
            map: name,
            key: index.to_string(),
            source: Box::new(source),
        })
    }

    /// Writes `slots` to `want` (batched where the kernel can), updating the mirror per success.
    fn write_l16(&mut self, slots: &[u32], want: &[u32]) -> Vec<MapError> {
        let name = self.names.0;
        let values: Vec<u32> = slots.iter().map(|&i| want[i as usize]).collect();
        let mut errors = Vec::new();
        if let Some((l16, _)) = &mut self.maps
            && !slots.is_empty()
            && sys::update(l16.fd_ref(), slots, &values).is_err()
        {
            // One by one, so each failure is typed and the rest still lands.
            for (&i, &v) in slots.iter().zip(&values) {
                if let Err(source) = l16.set(i, v, 0) {
                    errors.push(MapError::Entry {
                        op: "set",
                        map: name,
                        key: i.to_string(),
                        source: Box::new(source),
                    });
                    continue;
                }
                self.l16[i as usize] = v;
            }
            return errors;
        }
        for (&i, &v) in slots.iter().zip(&values) {
            self.l16[i as usize] = v;
        }
        errors
    }
}

/// A borrowed fd of an aya array, for the batch syscalls.
trait FdRef {
    fn fd_ref(&self) -> std::os::fd::BorrowedFd<'_>;
}

impl<V: aya::Pod> FdRef for Array<MapData, V> {
    fn fd_ref(&self) -> std::os::fd::BorrowedFd<'_> {
        self.map().fd().as_fd()
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;

    fn nets(list: &[&str]) -> BTreeSet<Ipv4Net> {
        list.iter().map(|s| s.parse().expect("net")).collect()
    }

    /// What the datapath decides for `addr`: the array's answer, or the trie's for `TRIE`.
    fn member(t: &DirTable, set: &BTreeSet<Ipv4Net>, addr: Ipv4Addr) -> bool {
        match t.value(addr) {
            dir::HIT => true,
            dir::MISS => false,
            _ => set.iter().any(|n| n.contains(&addr)),
        }
    }

    #[test]
    fn arrays_agree_with_the_prefix_set_and_send_long_prefixes_to_the_trie() {
        let set = nets(&[
            "10.16.0.0/16",
            "100.64.0.0/10",
            "10.17.4.0/22",
            "10.17.9.0/24",
            "10.17.10.128/25",
            "192.168.0.11/32",
            "10.18.0.0/24",
            "10.18.0.7/32",
        ]);
        let mut t = DirTable::in_memory("l16", "l24");
        assert!(t.sync(set.iter().copied()).is_empty());
        assert_eq!(t.value("10.16.200.1".parse().expect("ip")), dir::HIT);
        assert_eq!(t.value("100.127.0.1".parse().expect("ip")), dir::HIT);
        assert_eq!(t.value("10.17.6.1".parse().expect("ip")), dir::HIT);
        assert_eq!(t.value("10.17.8.1".parse().expect("ip")), dir::MISS);
        assert_eq!(t.value("10.17.10.1".parse().expect("ip")), dir::TRIE);
        assert_eq!(
            t.value("10.18.0.7".parse().expect("ip")),
            dir::HIT,
            "/24 covers the /32"
        );
        assert_eq!(t.value("11.0.0.1".parse().expect("ip")), dir::MISS);
        for a in 0..=u8::MAX {
            for c in [0u8, 4, 7, 9, 10, 255] {
                for d in [0u8, 7, 11, 127, 128, 255] {
                    for (x, y) in [(10u8, 16u8), (10, 17), (10, 18), (192, 168), (100, a)] {
                        let addr = Ipv4Addr::new(x, y, c, d);
                        assert_eq!(
                            member(&t, &set, addr),
                            set.iter().any(|n| n.contains(&addr)),
                            "{addr}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn a_change_keeps_chunks_and_frees_them_after_the_slot_moves() {
        let mut t = DirTable::in_memory("l16", "l24");
        assert!(t.sync(nets(&["10.17.1.0/24", "10.18.1.0/24"])).is_empty());
        let before = t.l16[0x0a11];
        assert_eq!(t.counts().1, 2);
        assert!(
            t.sync(nets(&["10.17.1.0/24", "10.17.2.0/24", "10.18.0.0/16"]))
                .is_empty()
        );
        assert_eq!(
            t.l16[0x0a11], before,
            "the chunk index of an existing slot is kept"
        );
        assert_eq!(t.l16[0x0a12], u32::from(dir::HIT));
        assert_eq!(t.counts().1, 1, "the chunk of 10.18/16 is freed");
        assert!(t.sync(nets(&[])).is_empty());
        assert_eq!(t.counts(), (SLOTS, 0), "every slot MISS, no chunk");
    }

    #[test]
    fn out_of_chunks_slots_ask_the_trie() {
        let set: BTreeSet<Ipv4Net> = (0..5u8)
            .map(|i| Ipv4Net::new(Ipv4Addr::new(10, i, 1, 0), 24).expect("net"))
            .collect();
        let want = layout(&set, &vec![0; SLOTS], 3);
        assert_eq!(want.chunks.len(), 3);
        let trie = want
            .l16
            .iter()
            .filter(|&&v| v == u32::from(dir::TRIE))
            .count();
        assert_eq!(trie, 2);
    }
}
