//! The set-associative array fronts of the IPv4 exact-match sets (`kube_ovn_ebpf_common::front4`):
//! ClusterIP ports, local /32s and other nodes. A front holds only keys its authority (the
//! set's hash or trie) holds, so a word the program finds is always a member, and a key it does
//! not find is asked of the authority; a key whose set has no free way stays there only. Like
//! the exact-match fronts it is not state (`Tables::current` reads the authorities).
//!
//! The words are written through a shared mapping of the array (`BPF_F_MMAPABLE`), one aligned
//! 8-byte atomic store each, and the program reads each with one 8-byte load, so a reader sees
//! a way's old or new word, never a mix of two keys (`bpf_map_update_elem` copies a value with
//! `memcpy`, which promises no such thing). Every word names its whole key, so ways need no
//! ordering among themselves: a way is cleared (the key is being removed) or set (the key is in
//! the authority already) on its own, and a way cleared in a pass may take another key in the
//! same pass.

use std::{
    collections::BTreeMap,
    io,
    net::Ipv4Addr,
    os::fd::{AsFd as _, AsRawFd as _},
    ptr::NonNull,
    sync::atomic::{AtomicU64, Ordering},
};

use aya::maps::{Map, MapData};
use kube_ovn_ebpf_common::{FrontSet, front4};

use super::{MapError, Result, take};
use crate::state::{Proto, ServicePort};

const WAYS: usize = front4::WAYS;
const WORDS: usize = front4::SETS as usize * WAYS;

/// A key a front can hold: its address (which picks the set) and its self-describing word.
pub trait FrontKey: Ord + Copy {
    fn addr(&self) -> [u8; 4];
    fn word(&self) -> u64;
    /// The key a stored word names; `None` for a word no key of this front encodes to.
    fn from_word(word: u64) -> Option<Self>;
}

impl FrontKey for Ipv4Addr {
    fn addr(&self) -> [u8; 4] {
        self.octets()
    }
    fn word(&self) -> u64 {
        front4::addr_word(self.octets())
    }
    fn from_word(word: u64) -> Option<Self> {
        let [a0, a1, a2, a3, 0, 0, 0, front4::VALID] = word.to_ne_bytes() else {
            return None;
        };
        Some(Self::from([a0, a1, a2, a3]))
    }
}

impl FrontKey for ServicePort<Ipv4Addr> {
    fn addr(&self) -> [u8; 4] {
        self.addr.octets()
    }
    fn word(&self) -> u64 {
        front4::port_word(self.addr.octets(), self.port, self.proto.number())
    }
    fn from_word(word: u64) -> Option<Self> {
        let [a0, a1, a2, a3, p0, p1, proto, front4::VALID] = word.to_ne_bytes() else {
            return None;
        };
        Some(Self {
            addr: Ipv4Addr::from([a0, a1, a2, a3]),
            proto: Proto::from_number(proto)?,
            port: u16::from_ne_bytes([p0, p1]),
        })
    }
}

/// A shared read-write mapping of a front array's values.
struct Mapping {
    base: NonNull<AtomicU64>,
}

// SAFETY: the mapping is plain shared memory, only accessed through atomics.
unsafe impl Send for Mapping {}

impl Mapping {
    const BYTES: usize = WORDS * size_of::<u64>();

    /// The mapping, or `None` when the map was opened read-only.
    fn new(map: &MapData, name: &'static str) -> Result<Option<Self>> {
        let layout = |source: aya::maps::MapError| MapError::Layout {
            map: name,
            source: Box::new(source),
        };
        let info = map.info().map_err(layout)?;
        let value_size = info.value_size() as usize;
        if value_size != size_of::<FrontSet>() {
            return Err(layout(aya::maps::MapError::InvalidValueSize {
                size: value_size,
                expected: size_of::<FrontSet>(),
            }));
        }
        if info.max_entries() != front4::SETS {
            return Err(layout(aya::maps::MapError::OutOfBounds {
                index: front4::SETS - 1,
                max_entries: info.max_entries(),
            }));
        }
        // SAFETY: a fresh shared mapping of the map's values (the kernel refuses it unless the
        // array is BPF_F_MMAPABLE and at least this large); nothing else aliases it in Rust.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                Self::BYTES,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                map.fd().as_fd().as_raw_fd(),
                0,
            )
        };
        if base == libc::MAP_FAILED {
            let io_error = io::Error::last_os_error();
            // A map opened read-only (`status`, `dump`, `verify`) refuses a writable shared
            // mapping, and a shared one at all (the kernel drops VM_SHARED for a file opened
            // read-only); those views do not read the fronts, which are not state.
            if matches!(io_error.raw_os_error(), Some(libc::EACCES | libc::EPERM)) {
                return Ok(None);
            }
            return Err(layout(aya::maps::MapError::SyscallError(
                aya::sys::SyscallError {
                    call: "mmap",
                    io_error,
                },
            )));
        }
        Ok(Some(Self {
            base: NonNull::new(base.cast()).expect("mmap returned a mapping"),
        }))
    }

    fn word(&self, i: usize) -> &AtomicU64 {
        assert!(i < WORDS, "way {i} outside the front");
        // SAFETY: inside the mapping, which is page-aligned and lives as long as `self`.
        unsafe { &*self.base.as_ptr().add(i) }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: the mapping `new` made, unmapped once.
        unsafe { libc::munmap(self.base.as_ptr().cast(), Self::BYTES) };
    }
}

/// The keys of `from` that `other` lacks; both sorted ascending.
fn sorted_difference<'a, K: Ord + Copy + 'a>(
    from: impl Iterator<Item = &'a K>,
    other: impl Iterator<Item = &'a K>,
) -> Vec<K> {
    let mut other = other.peekable();
    let mut out = Vec::new();
    for key in from {
        while other.next_if(|o| *o < key).is_some() {}
        if other.peek() != Some(&key) {
            out.push(*key);
        }
    }
    out
}

/// The ways of a front: the kernel array's, memory (tests), or none (a read-only view).
enum Words {
    Mapped(Mapping),
    Memory(Vec<u64>),
    Unmapped,
}

impl Words {
    fn load(&self, i: usize) -> u64 {
        match self {
            Self::Mapped(m) => m.word(i).load(Ordering::Acquire),
            Self::Memory(v) => v[i],
            Self::Unmapped => unreachable!("a read-only view holds no ways"),
        }
    }

    fn store(&mut self, i: usize, word: u64) {
        match self {
            Self::Mapped(m) => m.word(i).store(word, Ordering::Release),
            Self::Memory(v) => v[i] = word,
            Self::Unmapped => unreachable!("a read-only view is never synced"),
        }
    }
}

/// One array front and where each key it holds sits.
pub struct ArrayFront<K> {
    name: &'static str,
    words: Words,
    placed: BTreeMap<K, usize>,
}

impl<K: FrontKey> ArrayFront<K> {
    /// Takes the front array out of a loaded object, maps it and adopts what it holds.
    pub fn from_maps(maps: &mut BTreeMap<&'static str, Map>, name: &'static str) -> Result<Self> {
        let Map::Array(data) = take(maps, name)? else {
            return Err(MapError::Layout {
                map: name,
                source: Box::new(aya::maps::MapError::InvalidName { name: name.into() }),
            });
        };
        let mut front = Self {
            name,
            words: Mapping::new(&data, name)?.map_or(Words::Unmapped, Words::Mapped),
            placed: BTreeMap::new(),
        };
        front.refresh();
        Ok(front)
    }

    /// An empty in-memory front, for tests.
    pub fn in_memory(name: &'static str) -> Self {
        Self {
            name,
            words: Words::Memory(vec![0; WORDS]),
            placed: BTreeMap::new(),
        }
    }

    pub fn name(&self) -> &'static str {
        self.name
    }

    /// The keys the front holds.
    pub fn keys(&self) -> impl Iterator<Item = &K> {
        self.placed.keys()
    }

    /// Re-reads the ways. A word that names no key of this front, sits in another key's set or
    /// repeats a key is cleared: a front only ever answers faster, so dropping a word is
    /// always safe. A read-only view holds nothing.
    pub fn refresh(&mut self) {
        self.placed.clear();
        if matches!(self.words, Words::Unmapped) {
            return;
        }
        for i in 0..WORDS {
            let word = self.words.load(i);
            if word == 0 {
                continue;
            }
            match K::from_word(word) {
                Some(key)
                    if front4::set(key.addr()) as usize == i / WAYS
                        && !self.placed.contains_key(&key) =>
                {
                    self.placed.insert(key, i);
                }
                _ => self.words.store(i, 0),
            }
        }
    }

    /// Brings the front towards `target` (keys its authority holds and the state keeps, in
    /// order, without repeats): with `prune` (run before the authority loses anything) it first
    /// drops every key not in `target`; then it places every key of `target` it lacks whose set
    /// has a free way. The placements and `target` are both sorted, so each step is one linear
    /// merge over them (200 000 keys on a large node), not a lookup per key.
    pub fn sync(&mut self, target: &[K], prune: bool) {
        debug_assert!(
            target.is_sorted_by(|a, b| a < b),
            "target sorted, no repeats"
        );
        if prune {
            for key in &sorted_difference(self.placed.keys(), target.iter()) {
                self.remove(key);
            }
        }
        for key in sorted_difference(target.iter(), self.placed.keys()) {
            self.place(key);
        }
    }

    /// [`Self::sync`] for only the keys of `keys`, each with whether it belongs in the front
    /// (its authority holds it and the state keeps it): O(keys), for incremental updates.
    pub fn sync_keys(&mut self, keys: &BTreeMap<K, bool>, prune: bool) {
        for (key, &wanted) in keys {
            if wanted {
                self.place(*key);
            } else if prune {
                self.remove(key);
            }
        }
    }

    fn remove(&mut self, key: &K) {
        if let Some(i) = self.placed.remove(key) {
            self.words.store(i, 0);
        }
    }

    /// Places `key` in a free way of its set, if it is not there and one is free.
    fn place(&mut self, key: K) {
        if self.placed.contains_key(&key) {
            return;
        }
        let first = front4::set(key.addr()) as usize * WAYS;
        if let Some(i) = (first..first + WAYS).find(|&i| self.words.load(i) == 0) {
            self.words.store(i, key.word());
            self.placed.insert(key, i);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    fn sorted<K: Copy>(set: &BTreeSet<K>) -> Vec<K> {
        set.iter().copied().collect()
    }

    #[test]
    fn sorted_difference_is_the_set_difference() {
        let cases: [(&[u32], &[u32], &[u32]); 5] = [
            (&[1, 2, 3], &[], &[1, 2, 3]),
            (&[], &[1, 2], &[]),
            (&[1, 3, 5, 7], &[2, 3, 4, 7, 9], &[1, 5]),
            (&[5, 6], &[1, 2, 3], &[5, 6]),
            (&[1, 2], &[1, 2], &[]),
        ];
        for (from, other, want) in cases {
            assert_eq!(
                sorted_difference(from.iter(), other.iter()),
                want,
                "{from:?} - {other:?}"
            );
        }
    }

    fn port(addr: [u8; 4], port: u16) -> ServicePort<Ipv4Addr> {
        ServicePort {
            addr: addr.into(),
            proto: Proto::Tcp,
            port,
        }
    }

    #[test]
    fn words_name_their_whole_key_and_nothing_else() {
        let p = ServicePort {
            addr: Ipv4Addr::new(10, 96, 0, 10),
            proto: Proto::Udp,
            port: 53,
        };
        assert_eq!(ServicePort::from_word(p.word()), Some(p));
        let a = Ipv4Addr::new(172, 18, 0, 3);
        assert_eq!(Ipv4Addr::from_word(a.word()), Some(a));
        // The two kinds never read as each other, and a free way is no key.
        assert_eq!(Ipv4Addr::from_word(p.word()), None);
        assert_eq!(ServicePort::<Ipv4Addr>::from_word(a.word()), None);
        assert_eq!(Ipv4Addr::from_word(0), None);
        assert_eq!(ServicePort::<Ipv4Addr>::from_word(0), None);
        // The program builds its probe word with the same function.
        assert_eq!(
            p.word(),
            front4::port_word([10, 96, 0, 10], 53, kube_ovn_ebpf_common::ipproto::UDP)
        );
    }

    #[test]
    fn keys_past_a_sets_ways_stay_with_the_authority_until_a_way_frees() {
        let mut front = ArrayFront::in_memory("test");
        // Five ports of one ClusterIP and one ClusterIP 65 536 addresses on: one set.
        let mut target: BTreeSet<_> = (1..=5).map(|p| port([10, 96, 0, 1], p)).collect();
        target.insert(port([10, 97, 0, 1], 80));
        front.sync(&sorted(&target), false);
        assert_eq!(front.keys().count(), WAYS, "one set, {WAYS} ways");
        let overflow: Vec<_> = target
            .iter()
            .filter(|k| !front.placed.contains_key(k))
            .copied()
            .collect();
        assert_eq!(overflow.len(), 2);
        // Without pruning nothing leaves; with it, a removed key frees its way for another.
        let removed = *front.keys().next().unwrap();
        target.remove(&removed);
        front.sync(&sorted(&target), false);
        assert!(front.placed.contains_key(&removed));
        front.sync(&sorted(&target), true);
        assert!(!front.placed.contains_key(&removed));
        assert_eq!(
            front.keys().count(),
            WAYS,
            "the freed way took a waiting key"
        );
        assert!(front.keys().all(|k| target.contains(k)));
        // Emptying the target clears every way.
        front.sync(&[], true);
        assert_eq!(front.keys().count(), 0);
        assert!((0..WORDS).all(|i| front.words.load(i) == 0));
    }

    #[test]
    fn refresh_adopts_placed_words_and_clears_anything_else() {
        let mut front: ArrayFront<Ipv4Addr> = ArrayFront::in_memory("test");
        let a = Ipv4Addr::new(10, 0, 1, 2);
        let set = front4::set(a.octets()) as usize;
        front.words.store(set * WAYS + 2, a.word());
        // A repeat of the same key, a word in the wrong set, and garbage.
        front.words.store(set * WAYS + 3, a.word());
        front.words.store(7 * WAYS, a.word());
        front.words.store(9 * WAYS + 1, 0xdead_beef);
        front.refresh();
        assert_eq!(front.keys().copied().collect::<Vec<_>>(), vec![a]);
        let held: Vec<usize> = (0..WORDS).filter(|&i| front.words.load(i) != 0).collect();
        assert_eq!(held, vec![set * WAYS + 2]);
    }
}
