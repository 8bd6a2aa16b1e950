//! The loaded datapath of a running agent: maps adopted from (or created under) the pin root,
//! and the program instance attachments should run.
//!
//! Restart-safe by construction: pinned maps are reused with their content; if the pinned
//! program is this build's with this configuration ([`reuse`]), it is neither loaded nor
//! verified again and stays attached untouched; otherwise this build's program replaces it in
//! place on every attachment (`bpf_link_update` / filter replace), which never leaves an
//! interface unmarked.
//!
//! A build whose map layout differs from the pinned maps (type, key or value size,
//! `max_entries`) migrates them instead of refusing to start:
//!
//! 1. `open`: the differing maps are created anew under `maps-next/` (a staged map left by an
//!    interrupted attempt is reused if it has this build's layout, else removed); the maps that
//!    match are adopted as usual. This build's program is loaded on that set but not pinned,
//!    and attachments of ours keep running the old program on the old maps
//!    ([`attach::Existing::Keep`]).
//! 2. The agent writes the complete view (every kind listed) into the tables, i.e. into the new
//!    maps and the shared ones.
//! 3. [`Datapath::finish_migration`]: the program is swapped in place on every attachment
//!    (`bpf_link_update` / filter replace: no interface is ever without a program), pinned as
//!    `kovn_ingress-next` and renamed over `kovn_ingress`, and each staged map is renamed over
//!    its canonical pin (atomic on bpffs). The old maps go with the old program's last
//!    reference.
//!
//! A restart at any point converges: until the last rename, some canonical pin still has the
//! old layout, so the next start migrates again, reusing the staged maps (and swapping again any
//! attachment that already ran an interrupted attempt's program, which used those same maps).
//! After the last rename the layouts match and a leftover `maps-next/` is removed.
//!
//! The program also carries values frozen at load ([`object::LoadConfig`]), which its tag does
//! not cover: they are part of its identity ([`reuse::Identity`]), so a start with other values
//! loads a new program, and they are pinned next to it (`programs/kovn_ingress-frozen`; bpffs
//! allows no dot in a name) for operators to read. When one of them changes while the agent
//! runs (the node's `nf_conntrack_tcp_loose`),
//! [`Datapath::reload`] loads a program with the new values on the same maps and swaps it in
//! place on every attachment, as step 3 does.

pub mod attach;
pub mod dir;
pub mod maps;
pub mod object;
pub mod pins;
pub mod reuse;
pub mod sys;

use std::{collections::BTreeMap, path::PathBuf};

use aya::{
    Ebpf,
    maps::{Map, MapData, PerCpuArray},
    programs::SchedClassifier,
};
use kube_ovn_ebpf_common::names;

use self::{
    attach::AttachConfig,
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
    #[error("{op} {path}: {source}")]
    Staging {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("map-layout migration: swapping the program on {ifname}: {source}")]
    Swap {
        ifname: String,
        #[source]
        source: attach::AttachError,
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
    /// The program this start loaded.
    Loaded,
    /// The identical program pinned by an earlier run ([`reuse`]).
    Pinned(Box<SchedClassifier>),
}

/// How this start came by its program (logged, and on `/status` in the startup phases).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Loaded {
    /// The pinned program is this build's with this configuration: not loaded, not verified.
    Reused,
    /// Loaded and verified; nothing was pinned.
    Fresh,
    /// Loaded and verified; it replaces the pinned program (another build or configuration,
    /// or an identity that could not be confirmed) in place on every attachment.
    Replacing,
    /// Loaded and verified on staged maps (a map-layout migration).
    Migrating,
}

impl Loaded {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Reused => "reused",
            Self::Fresh => "loaded",
            Self::Replacing => "replacing",
            Self::Migrating => "migrating",
        }
    }
}

pub struct Datapath {
    /// The object this start loaded; `None` when the pinned program was reused.
    ebpf: Option<Ebpf>,
    active: Active,
    pub program_id: u32,
    /// Whether this start replaces an older pinned program.
    pub upgrading: bool,
    pub loaded: Loaded,
    /// This build's program identity ([`reuse::Identity`]), recorded once its program is pinned.
    identity: reuse::Identity,
    pub tables: Tables,
    /// Maps the tables do not manage (the counters).
    pub other_maps: BTreeMap<&'static str, Map>,
    /// Maps being migrated to this build's layout (staged under `maps-next/`); empty when none.
    pub migrating: Vec<&'static str>,
    /// The values frozen into the program that runs (or will, once a migration finishes).
    pub load_config: object::LoadConfig,
}

impl Datapath {
    /// Reuses the pinned program and maps when the program is this build's ([`reuse`]);
    /// otherwise loads this build's object with its maps pinned under `pins`, adopting what is
    /// there and staging new maps for those whose layout differs (see the module docs).
    pub fn open(pins: &PinRoot, load_config: object::LoadConfig) -> Result<Self, DatapathError> {
        let migrating: Vec<&'static str> = object::mismatched_pins(&pins.maps())?
            .into_iter()
            .map(|(name, detail)| {
                tracing::warn!(
                    map = name,
                    %detail,
                    "pinned map's layout differs from this build's: migrating it (the old program \
                     keeps marking on the old maps until the new ones hold the complete view)"
                );
                name
            })
            .collect();
        let identity = reuse::Identity::current(&load_config);
        let program_pin = pins.program(names::PROGRAM);
        if migrating.is_empty() && !pins.staging().exists() {
            match reuse::adopt(pins, identity) {
                Ok(reused) => {
                    let mut maps = reused.maps;
                    let tables = Tables::from_maps(&mut maps)?;
                    return Ok(Self {
                        ebpf: None,
                        active: Active::Pinned(Box::new(reused.program)),
                        program_id: reused.program_id,
                        upgrading: false,
                        loaded: Loaded::Reused,
                        tables,
                        other_maps: maps,
                        migrating,
                        identity,
                        load_config,
                    });
                }
                Err(reuse::NotReused::NoIdentity) if !program_pin.exists() => {}
                Err(why) => tracing::info!(
                    reason = %why,
                    "not reusing the pinned program: loading this build's"
                ),
            }
        }
        // Whatever is pinned is about to be replaced (or, migrating, replaced once the new maps
        // are complete): its identity no longer describes what will run.
        reuse::forget(pins);
        prepare_staging(pins, &migrating)?;
        let mut ebpf = object::load(
            Some(&object::MapPins {
                dir: &pins.maps(),
                staging: &pins.staging(),
                staged: &migrating,
            }),
            load_config,
        )?;
        let loaded = object::program(&mut ebpf)?;
        let loaded_info = loaded.info().map_err(|source| DatapathError::Program {
            op: "reading info of",
            path: program_pin.clone(),
            source: Box::new(source),
        })?;
        let previous = program_pin.exists();
        let (program_id, kind) = if migrating.is_empty() {
            if previous {
                // The old program stays alive as long as attachments reference it; they get
                // this one in place (`bpf_link_update` / filter replace).
                let _ = std::fs::remove_file(&program_pin);
            }
            loaded
                .pin(&program_pin)
                .map_err(|source| DatapathError::Pin {
                    path: program_pin.clone(),
                    source,
                })?;
            reuse::record(pins, identity, loaded);
            pin_frozen(pins, &ebpf)?;
            tracing::info!(?load_config, "program loaded with these frozen values");
            let kind = if previous {
                Loaded::Replacing
            } else {
                Loaded::Fresh
            };
            (loaded_info.id(), kind)
        } else {
            // Pinned by `finish_migration`, once the new maps hold the complete view.
            (loaded_info.id(), Loaded::Migrating)
        };
        let mut maps = object::take_maps(&mut ebpf);
        let tables = Tables::from_maps(&mut maps)?;
        Ok(Self {
            ebpf: Some(ebpf),
            active: Active::Loaded,
            program_id,
            upgrading: previous,
            loaded: kind,
            tables,
            other_maps: maps,
            migrating,
            identity,
            load_config,
        })
    }

    /// Loads this build's program with `load_config` frozen into it on the pinned maps and
    /// swaps it in place on every attachment (`bpf_link_update` / filter replace: no interface
    /// is ever without a program), then pins it and its frozen values over the old ones. Used
    /// when a frozen value changes while the agent runs. Not during a map-layout migration
    /// (the program then runs on staged maps; `finish_migration` comes first): returns false.
    pub async fn reload(
        &mut self,
        pins: &PinRoot,
        load_config: object::LoadConfig,
        config: AttachConfig,
        rtnl: &rtnetlink::Handle,
    ) -> Result<bool, DatapathError> {
        if !self.migrating.is_empty() {
            return Ok(false);
        }
        let mut ebpf = object::load(
            Some(&object::MapPins {
                dir: &pins.maps(),
                staging: &pins.staging(),
                staged: &[],
            }),
            load_config,
        )?;
        let program_pin = pins.program(names::PROGRAM);
        let program_id = object::program(&mut ebpf)?
            .info()
            .map_err(|source| DatapathError::Program {
                op: "reading info of",
                path: program_pin.clone(),
                source: Box::new(source),
            })?
            .id();
        swap_everywhere(object::program(&mut ebpf)?, program_id, pins, config, rtnl).await?;
        pin_program(pins, object::program(&mut ebpf)?)?;
        pin_frozen(pins, &ebpf)?;
        let identity = reuse::Identity::current(&load_config);
        reuse::record(pins, identity, object::program(&mut ebpf)?);
        let old = self.ebpf.replace(ebpf);
        self.active = Active::Loaded;
        self.program_id = program_id;
        self.loaded = Loaded::Replacing;
        self.identity = identity;
        self.load_config = load_config;
        drop(old);
        tracing::info!(
            program_id,
            ?load_config,
            "frozen configuration changed: every attachment now runs a program loaded with it"
        );
        Ok(true)
    }

    /// Step 3 of a map-layout migration, once the tables hold the complete view: this build's
    /// program on every attachment, then the new program and maps under the canonical names.
    /// On an error nothing is renamed yet and the next call starts over (attachments already
    /// swapped stay swapped: their program uses the staged maps, which stay pinned).
    pub async fn finish_migration(
        &mut self,
        pins: &PinRoot,
        config: AttachConfig,
        rtnl: &rtnetlink::Handle,
    ) -> Result<(), DatapathError> {
        let program_id = self.program_id;
        swap_everywhere(self.program(), program_id, pins, config, rtnl).await?;
        object::crash_point("migration-swapped");
        pin_program(pins, self.program())?;
        if let Some(ebpf) = &self.ebpf {
            pin_frozen(pins, ebpf)?;
        }
        object::crash_point("migration-program-pinned");
        for name in &self.migrating {
            rename(&pins.staging().join(name), &pins.maps().join(name))?;
            object::crash_point("migration-renamed-first");
        }
        let _ = std::fs::remove_dir(pins.staging());
        let identity = self.identity;
        reuse::record(pins, identity, self.program());
        let migrated = std::mem::take(&mut self.migrating);
        tracing::info!(
            maps = ?migrated,
            program_id,
            "map layout migrated: every attachment runs this build's program on the new maps; \
             the old maps are freed with the old program"
        );
        Ok(())
    }

    /// The program to attach.
    pub fn program(&mut self) -> &mut SchedClassifier {
        match &mut self.active {
            Active::Pinned(program) => program,
            Active::Loaded => object::program(self.ebpf.as_mut().expect("loaded in open"))
                .expect("loaded in open"),
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

/// `program` on every attachment of ours, in place.
async fn swap_everywhere(
    program: &mut SchedClassifier,
    program_id: u32,
    pins: &PinRoot,
    config: AttachConfig,
    rtnl: &rtnetlink::Handle,
) -> Result<(), DatapathError> {
    for found in attach::list(pins, rtnl).await {
        let (priority, handle) = found.filter.unwrap_or((config.priority, config.handle));
        let config = AttachConfig {
            mode: found.mode,
            priority,
            handle,
            ..config
        };
        attach::ensure(
            program,
            program_id,
            pins,
            config,
            rtnl,
            &found.ifname,
            attach::Existing::Replace,
        )
        .await
        .map_err(|source| DatapathError::Swap {
            ifname: found.ifname.clone(),
            source,
        })?;
        object::crash_point("swapped-first-attachment");
    }
    Ok(())
}

/// Pins `program` as `kovn_ingress-next` and renames it over `kovn_ingress` (atomic on bpffs).
fn pin_program(pins: &PinRoot, program: &mut SchedClassifier) -> Result<(), DatapathError> {
    let next = pins.program_next(names::PROGRAM);
    let _ = std::fs::remove_file(&next);
    program.pin(&next).map_err(|source| DatapathError::Pin {
        path: next.clone(),
        source,
    })?;
    rename(&next, &pins.program(names::PROGRAM))
}

/// Pins the loaded object's frozen values (`object::FROZEN_MAP`) next to the program, through
/// a rename, so an operator (and `dump`) can read what the running program was loaded with.
/// Whether a pinned program is reused is decided by its identity ([`reuse`]), which covers
/// these values.
fn pin_frozen(pins: &PinRoot, ebpf: &Ebpf) -> Result<(), DatapathError> {
    let next = pins.frozen_next(names::PROGRAM);
    let Some(map) = ebpf.map(object::FROZEN_MAP) else {
        return Ok(());
    };
    let _ = std::fs::remove_file(&next);
    map.pin(&next).map_err(|source| DatapathError::Pin {
        path: next.clone(),
        source,
    })?;
    rename(&next, &pins.frozen(names::PROGRAM))
}

fn rename(from: &std::path::Path, to: &std::path::Path) -> Result<(), DatapathError> {
    std::fs::rename(from, to).map_err(|source| DatapathError::Staging {
        op: "renaming",
        path: from.to_path_buf(),
        source,
    })
}

/// Makes `maps-next/` hold only staged maps this build can adopt for `migrating`: created when
/// a migration starts, cleared of maps with another layout (an older attempt's), and removed
/// when nothing migrates (a finished migration's empty directory, or a downgrade's leftovers).
fn prepare_staging(pins: &PinRoot, migrating: &[&'static str]) -> Result<(), DatapathError> {
    let staging = pins.staging();
    let io = |op, path: &std::path::Path| {
        let path = path.to_path_buf();
        move |source| DatapathError::Staging { op, path, source }
    };
    if !migrating.is_empty() {
        std::fs::create_dir_all(&staging).map_err(io("creating", &staging))?;
    }
    let unusable: Vec<&str> = object::mismatched_pins(&staging)?
        .into_iter()
        .map(|(name, _)| name)
        .collect();
    for name in names::ALL_MAPS {
        let path = staging.join(name);
        if path.exists() && (!migrating.contains(&name) || unusable.contains(&name)) {
            std::fs::remove_file(&path).map_err(io("removing stale staged map", &path))?;
        }
    }
    if migrating.is_empty() {
        let _ = std::fs::remove_dir(&staging);
    }
    Ok(())
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
