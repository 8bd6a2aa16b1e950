//! The loaded datapath of a running agent: maps adopted from (or created under) the pin root,
//! and the program instance attachments should run.
//!
//! Restart-safe by construction: pinned maps are reused with their content; if the pinned
//! program is identical (same tag) to this build's, it stays attached untouched; otherwise this
//! build's program replaces it in place on every attachment (`bpf_link_update` / filter replace),
//! which never leaves an interface unmarked.

pub mod attach;
pub mod dir;
pub mod maps;
pub mod object;
pub mod pins;
pub mod sys;

use std::{collections::BTreeMap, path::PathBuf};

use aya::{
    Ebpf,
    maps::{Map, MapData, PerCpuArray},
    programs::{ProgramInfo, SchedClassifier},
};
use kube_ovn_ebpf_common::names;

use self::{
    maps::{MapError, Tables},
    object::LoadError,
    pins::PinRoot,
};

#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    #[error(transparent)]
    Load(#[from] LoadError),
    #[error(transparent)]
    Map(#[from] MapError),
    #[error("{op} {path}: {source}")]
    Program {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: Box<aya::programs::ProgramError>,
    },
    #[error("pinning {path}: {source}")]
    Pin {
        path: PathBuf,
        #[source]
        source: aya::pin::PinError,
    },
    #[error("opening pinned map {path}: {source}")]
    PinnedMap {
        path: PathBuf,
        #[source]
        source: Box<aya::maps::MapError>,
    },
}

/// Which program instance runs on the interfaces.
enum Active {
    /// This build's program (it differs from what was pinned, or nothing was).
    Loaded,
    /// The identical program pinned by an earlier run.
    Pinned(Box<SchedClassifier>),
}

pub struct Datapath {
    ebpf: Ebpf,
    active: Active,
    pub program_id: u32,
    /// Whether this start replaces an older pinned program.
    pub upgrading: bool,
    pub tables: Tables,
    /// Maps the tables do not manage (the counters).
    pub other_maps: BTreeMap<&'static str, Map>,
}

impl Datapath {
    /// Loads this build's object with its maps pinned under `pins`, adopting what is there.
    pub fn open(pins: &PinRoot) -> Result<Self, DatapathError> {
        let mut ebpf = object::load(Some(&pins.maps()))?;
        let program_pin = pins.program(names::PROGRAM);
        let loaded = object::program(&mut ebpf)?;
        let loaded_info = loaded.info().map_err(|source| DatapathError::Program {
            op: "reading info of",
            path: program_pin.clone(),
            source: Box::new(source),
        })?;
        let pinned = ProgramInfo::from_pin(&program_pin).ok();
        let (active, program_id, upgrading) = match pinned {
            Some(info) if info.tag() == loaded_info.tag() => {
                let program = SchedClassifier::from_pin(&program_pin).map_err(|source| {
                    DatapathError::Program {
                        op: "adopting",
                        path: program_pin.clone(),
                        source: Box::new(source),
                    }
                })?;
                (Active::Pinned(Box::new(program)), info.id(), false)
            }
            previous => {
                if previous.is_some() {
                    // The old program stays alive as long as attachments reference it.
                    let _ = std::fs::remove_file(&program_pin);
                }
                loaded
                    .pin(&program_pin)
                    .map_err(|source| DatapathError::Pin {
                        path: program_pin.clone(),
                        source,
                    })?;
                (Active::Loaded, loaded_info.id(), previous.is_some())
            }
        };
        let mut maps = object::take_maps(&mut ebpf);
        let tables = Tables::from_maps(&mut maps)?;
        Ok(Self {
            ebpf,
            active,
            program_id,
            upgrading,
            tables,
            other_maps: maps,
        })
    }

    /// The program to attach.
    pub fn program(&mut self) -> &mut SchedClassifier {
        match &mut self.active {
            Active::Pinned(program) => program,
            Active::Loaded => object::program(&mut self.ebpf).expect("loaded in open"),
        }
    }

    /// The attached program's tag (hex) for `kovn_build_info`, or `unknown`: from the program's
    /// own fd, so `CAP_BPF` suffices.
    pub fn program_tag(&mut self) -> String {
        self.program().info().map_or_else(
            |_| "unknown".to_owned(),
            |info| format!("{:016x}", info.tag()),
        )
    }

    /// The per-CPU counter map, if still here.
    pub fn take_counters(&mut self) -> Option<PerCpuArray<MapData, u64>> {
        self.other_maps
            .remove(names::COUNTERS)
            .and_then(|m| m.try_into().ok())
    }
}

/// Opens the pinned maps read-only for `status`/`dump` (no program is loaded); works on a
/// read-only bpffs mount too.
pub fn open_pinned_maps(pins: &PinRoot) -> Result<BTreeMap<&'static str, Map>, DatapathError> {
    let mut maps = BTreeMap::new();
    for name in names::ALL_MAPS {
        let path = pins.maps().join(name);
        let map_error = |source| DatapathError::PinnedMap {
            path: path.clone(),
            source: Box::new(source),
        };
        let fd = sys::open_pin_read_only(&path).map_err(|io_error| {
            map_error(aya::maps::MapError::SyscallError(aya::sys::SyscallError {
                call: "BPF_OBJ_GET",
                io_error,
            }))
        })?;
        let data = MapData::from_fd(fd).map_err(map_error)?;
        maps.insert(name, Map::from_map_data(data).map_err(map_error)?);
    }
    Ok(maps)
}
