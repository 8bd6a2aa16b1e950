//! The read-only view of a pinned datapath that `status`, `dump`, `verify` and
//! `cleanup-iptables` share: the map tables and the counter map, opened from their pins without
//! loading a program.

use std::path::PathBuf;

use aya::maps::{MapData, PerCpuArray};
use kube_ovn_ebpf_common::names;

use crate::datapath::{
    DatapathError,
    maps::{MapError, Tables, read_counters},
    open_pinned_maps,
    pins::PinRoot,
};

#[derive(Debug, thiserror::Error)]
pub enum PinnedError {
    #[error("nothing pinned under {} (is the agent running with this --bpffs-root?)", .root.display())]
    NotPinned { root: PathBuf },
    #[error(transparent)]
    Datapath(#[from] DatapathError),
    #[error(transparent)]
    Maps(#[from] MapError),
    #[error("the pinned counter map {name}: {source}")]
    CounterMap {
        name: &'static str,
        #[source]
        source: Box<aya::maps::MapError>,
    },
    #[error("the counter map {name} is not among the pinned maps")]
    NoCounterMap { name: &'static str },
    #[error("reading the datapath counters: {source}")]
    Counters {
        #[source]
        source: std::io::Error,
    },
}

/// The maps pinned under a root, as they are now.
pub struct PinnedView {
    pub tables: Tables,
    counters: PerCpuArray<MapData, u64>,
}

impl PinnedView {
    /// Opens the maps under `pins`; an error when nothing is pinned there.
    pub fn open(pins: &PinRoot) -> Result<Self, PinnedError> {
        if !pins.exists() {
            return Err(PinnedError::NotPinned {
                root: pins.root.clone(),
            });
        }
        let mut maps = open_pinned_maps(pins)?;
        let counters = maps
            .remove(names::COUNTERS)
            .ok_or(PinnedError::NoCounterMap {
                name: names::COUNTERS,
            })?
            .try_into()
            .map_err(|source| PinnedError::CounterMap {
                name: names::COUNTERS,
                source: Box::new(source),
            })?;
        let tables = Tables::from_maps(&mut maps)?;
        Ok(Self { tables, counters })
    }

    /// The counters now, summed over CPUs, indexed by `counter` slot.
    pub fn counters(&self) -> Result<Vec<u64>, PinnedError> {
        read_counters(&self.counters).map_err(|source| PinnedError::Counters { source })
    }
}
