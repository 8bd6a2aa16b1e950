//! The embedded eBPF object and loading it, optionally with its maps pinned under a directory
//! (pinned maps that already exist are reused with their content).

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader, VerifierLogLevel,
    maps::{Map, MapInfo},
    programs::SchedClassifier,
};
use kube_ovn_ebpf_common::names;

/// The datapath object, built by `build.rs` from the `kube-ovn-ebpf` crate.
pub static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/kube-ovn-ebpf"));

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("parsing the embedded eBPF object: {0}")]
    Parse(#[from] aya_obj::ParseError),
    #[error("loading the eBPF object: {0}")]
    Object(#[from] aya::EbpfError),
    #[error("program {name}: {source}")]
    Program {
        name: &'static str,
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error("program {name} is missing from the eBPF object")]
    MissingProgram { name: &'static str },
    #[error("reading pinned map {path}: {source}")]
    PinnedInfo {
        path: PathBuf,
        #[source]
        source: aya::maps::MapError,
    },
}

/// Where [`load`] pins the maps: each at `dir/<name>`, except the `staged` ones, at
/// `staging/<name>` (a map-layout migration builds the new maps there).
pub struct MapPins<'a> {
    pub dir: &'a Path,
    pub staging: &'a Path,
    pub staged: &'a [&'static str],
}

/// Loads the object. With `pins`, each map is pinned where [`MapPins`] says; maps already pinned
/// there are reused with their content. The caller makes sure those match this build's layout
/// ([`mismatched_pins`]).
pub fn load(pins: Option<&MapPins<'_>>) -> Result<Ebpf, LoadError> {
    raise_memlock_limit();
    let mut loader = EbpfLoader::new();
    loader.verifier_log_level(VerifierLogLevel::STATS);
    for (name, max_entries) in max_entries_overrides() {
        loader.map_max_entries(name, max_entries);
    }
    if let Some(pins) = pins {
        for name in names::ALL_MAPS {
            let dir = if pins.staged.contains(&name) {
                pins.staging
            } else {
                pins.dir
            };
            loader.map_pin_path(name, dir.join(name));
        }
    }
    let mut ebpf = loader.load(OBJECT)?;
    program(&mut ebpf)?
        .load()
        .map_err(|source| LoadError::Program {
            name: names::PROGRAM,
            source,
        })?;
    Ok(ebpf)
}

/// The classifier program of a loaded object.
pub fn program(ebpf: &mut Ebpf) -> Result<&mut SchedClassifier, LoadError> {
    let name = names::PROGRAM;
    ebpf.program_mut(name)
        .ok_or(LoadError::MissingProgram { name })?
        .try_into()
        .map_err(|source| LoadError::Program { name, source })
}

/// Takes every datapath map out of a loaded object, by name.
pub fn take_maps(ebpf: &mut Ebpf) -> BTreeMap<&'static str, Map> {
    names::ALL_MAPS
        .iter()
        .filter_map(|name| ebpf.take_map(name).map(|map| (*name, map)))
        .collect()
}

/// The maps pinned under `dir` whose type, key or value size or `max_entries` differ from this
/// build's definition (the program would read them with the wrong layout), each with what
/// differs.
pub fn mismatched_pins(dir: &Path) -> Result<Vec<(&'static str, String)>, LoadError> {
    let object = aya_obj::Object::parse(OBJECT)?;
    let mut mismatched = Vec::new();
    for name in names::ALL_MAPS {
        let (Some(def), path) = (object.maps.get(name), dir.join(name)) else {
            continue;
        };
        if !path.exists() {
            continue;
        }
        let info = MapInfo::from_pin(&path).map_err(|source| LoadError::PinnedInfo {
            path: path.clone(),
            source,
        })?;
        let max_entries = max_entries_overrides()
            .into_iter()
            .find(|(n, _)| *n == name)
            .map_or(def.max_entries(), |(_, m)| m);
        let want = (
            def.map_type(),
            def.key_size(),
            def.value_size(),
            max_entries,
        );
        let have = (
            info.map_type().map_or(u32::MAX, |t| t as u32),
            info.key_size(),
            info.value_size(),
            info.max_entries(),
        );
        if want != have {
            mismatched.push((
                name,
                format!("type/key/value/max_entries {have:?} pinned, {want:?} in this build"),
            ));
        }
    }
    Ok(mismatched)
}

/// `KOVN_TEST_MAP_MAX_ENTRIES=name=N,…`: another `max_entries` for some maps, so the tests can
/// run "an older build" whose map layout differs from this one's (a map-layout migration).
/// Only in builds with the `testing` feature; release builds have no such knob.
#[cfg(feature = "testing")]
pub(crate) fn max_entries_overrides() -> Vec<(&'static str, u32)> {
    let spec = std::env::var("KOVN_TEST_MAP_MAX_ENTRIES").unwrap_or_default();
    spec.split(',')
        .filter_map(|item| {
            let (name, value) = item.split_once('=')?;
            let name = names::ALL_MAPS.iter().find(|n| **n == name)?;
            Some((*name, value.parse().ok()?))
        })
        .collect()
}

#[cfg(not(feature = "testing"))]
pub(crate) fn max_entries_overrides() -> Vec<(&'static str, u32)> {
    Vec::new()
}

/// Kernels before 5.11 charge BPF memory to `RLIMIT_MEMLOCK`; later ones use memcg and ignore it.
fn raise_memlock_limit() {
    let unlimited = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: setrlimit with a valid, fully initialised struct.
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &raw const unlimited) } != 0 {
        tracing::debug!(
            error = %std::io::Error::last_os_error(),
            "could not raise RLIMIT_MEMLOCK; fine on kernels >= 5.11"
        );
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    /// Every map the built object defines is pinned (`names::ALL_MAPS` is the pin list), so no
    /// state is lost when the agent restarts or upgrades, and every pinned name exists in the
    /// object, so `status`/`dump` can open them all. Read-only data sections (`.rodata*`) are
    /// constants of the object itself, not state.
    #[test]
    fn the_pin_list_is_exactly_the_objects_maps() {
        let object = aya_obj::Object::parse(OBJECT).expect("parsing the embedded object");
        let in_object: BTreeSet<&str> = object
            .maps
            .keys()
            .map(String::as_str)
            .filter(|name| !name.starts_with(".rodata"))
            .collect();
        let pinned: BTreeSet<&str> = names::ALL_MAPS.iter().copied().collect();
        assert_eq!(
            in_object, pinned,
            "maps in the object vs names::ALL_MAPS (the pin list)"
        );
        assert_eq!(pinned.len(), names::ALL_MAPS.len(), "a name listed twice");
    }
}
