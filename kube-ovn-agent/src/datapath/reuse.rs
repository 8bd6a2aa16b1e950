//! Restarting without loading: the pinned program is reused when it is exactly what this build
//! would load, so a restart skips the verifier (the bulk of a cold start) and never swaps the
//! program under live traffic.
//!
//! "Exactly" is an [`Identity`]: a hash of the embedded object's bytes and of everything
//! [`object::load`] is given besides them: the values frozen into the program's `.rodata`
//! ([`object::LoadConfig`]) and the test-only `max_entries` overrides. The kernel's program tag
//! cannot serve: it hashes the instructions only, not the read-only data a load freezes.
//!
//! The identity is recorded as a second pin of the program, `programs/kovn_ingress-identity-<hex>`
//! (bpffs holds pins only, no files). A start reuses the pinned program when the pin for its
//! own identity exists **and** names the same kernel program as `programs/kovn_ingress` (the one
//! the attachments and `status` use), and every map is pinned with this build's layout. Any
//! doubt — no identity pin, another identity, two different programs (someone re-pinned
//! `kovn_ingress`), a map missing or unreadable, a map-layout migration — falls back to a
//! normal load, which removes the stale identity pins and records the new one once the program
//! is pinned. Only file-descriptor operations on pins are used (`BPF_OBJ_GET`, info by fd), so
//! the `DaemonSet`'s capabilities (no `CAP_SYS_ADMIN`) suffice.

use std::{
    collections::BTreeMap,
    hash::{Hash as _, Hasher as _},
    path::PathBuf,
};

use aya::{
    maps::{Map, MapData},
    programs::{ProgramInfo, SchedClassifier},
};
use kube_ovn_ebpf_common::names;

use super::{object, pins::PinRoot};

/// What makes a loaded program this build's: see the module docs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Identity(u64);

impl Identity {
    /// The identity of `object` loaded with `config` (the load-time configuration, serialised).
    pub fn of(object: &[u8], config: &[u8]) -> Self {
        // SipHash with fixed keys: stable for a given toolchain; another toolchain at worst
        // gives another identity, i.e. one fresh load.
        let mut hasher = std::hash::DefaultHasher::new();
        object.hash(&mut hasher);
        config.hash(&mut hasher);
        Self(hasher.finish())
    }

    /// This build's identity loaded with `load_config` (and the `max_entries` overrides of
    /// this process).
    pub fn current(load_config: &object::LoadConfig) -> Self {
        let config = format!(
            "max_entries={:?};frozen={load_config:?}",
            object::max_entries_overrides()
        );
        Self::of(object::OBJECT, config.as_bytes())
    }

    /// The pin recording it, under `pins`.
    pub fn pin(self, pins: &PinRoot) -> PathBuf {
        pins.program(&format!("{PREFIX}{:016x}", self.0))
    }
}

/// Pins named so are identity pins (also what `detach` recognises as ours).
pub const PREFIX: &str = "kovn_ingress-identity-";

/// A pinned program found identical to this build's, and the pinned maps it uses.
pub struct Reused {
    pub program: SchedClassifier,
    pub program_id: u32,
    pub maps: BTreeMap<&'static str, Map>,
}

/// Why a start loads instead of reusing (logged; every case is safe).
#[derive(Debug, thiserror::Error)]
pub enum NotReused {
    #[error("no pinned program of this build and configuration")]
    NoIdentity,
    #[error("reading {path}: {source}")]
    Program {
        path: PathBuf,
        #[source]
        source: Box<aya::programs::ProgramError>,
    },
    #[error(
        "the identity pin names program {recorded} but kovn_ingress is program {pinned} (re-pinned)"
    )]
    Replaced { recorded: u32, pinned: u32 },
    #[error("opening pinned map {path}: {source}")]
    Map {
        path: PathBuf,
        #[source]
        source: Box<aya::maps::MapError>,
    },
}

/// The pinned program and maps when the program is this build's (`identity`); otherwise why
/// not. The caller has checked the maps' layouts (`object::mismatched_pins`).
pub fn adopt(pins: &PinRoot, identity: Identity) -> Result<Reused, NotReused> {
    let recorded_pin = identity.pin(pins);
    if !recorded_pin.exists() {
        return Err(NotReused::NoIdentity);
    }
    let canonical = pins.program(names::PROGRAM);
    let info = |path: &PathBuf| {
        ProgramInfo::from_pin(path).map_err(|source| NotReused::Program {
            path: path.clone(),
            source: Box::new(source),
        })
    };
    let recorded = info(&recorded_pin)?.id();
    let pinned = info(&canonical)?.id();
    same_program(recorded, pinned)?;
    let program = SchedClassifier::from_pin(&canonical).map_err(|source| NotReused::Program {
        path: canonical.clone(),
        source: Box::new(source),
    })?;
    let mut maps = BTreeMap::new();
    for name in names::ALL_MAPS {
        let path = pins.maps().join(name);
        let map_error = |source| NotReused::Map {
            path: path.clone(),
            source: Box::new(source),
        };
        let data = MapData::from_pin(&path).map_err(map_error)?;
        maps.insert(name, Map::from_map_data(data).map_err(map_error)?);
    }
    Ok(Reused {
        program,
        program_id: pinned,
        maps,
    })
}

/// The identity pin must name the program the canonical pin does: a program re-pinned as
/// `kovn_ingress` by anyone else is not what the identity describes.
fn same_program(recorded: u32, pinned: u32) -> Result<(), NotReused> {
    if recorded == pinned {
        Ok(())
    } else {
        Err(NotReused::Replaced { recorded, pinned })
    }
}

/// Removes every identity pin: the pinned program is about to be replaced (each pin holds a
/// reference to its program, so a stale one would also keep the old program alive).
pub fn forget(pins: &PinRoot) {
    let Ok(entries) = std::fs::read_dir(pins.programs()) else {
        return;
    };
    for entry in entries.flatten() {
        if entry.file_name().to_string_lossy().starts_with(PREFIX) {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

/// Records `program` (pinned as `kovn_ingress`) as this build's: its identity pin, replacing
/// any other. A failure only costs the next start a fresh load.
pub fn record(pins: &PinRoot, identity: Identity, program: &mut SchedClassifier) {
    forget(pins);
    let path = identity.pin(pins);
    if let Err(e) = program.pin(&path) {
        tracing::warn!(
            path = %path.display(),
            error = %e,
            "could not record the program's identity; the next start loads it afresh"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_identity_covers_the_object_and_the_load_configuration() {
        let base = Identity::of(b"object", b"config");
        assert_eq!(base, Identity::of(b"object", b"config"), "deterministic");
        assert_ne!(base, Identity::of(b"object2", b"config"), "another object");
        assert_ne!(
            base,
            Identity::of(b"object", b"config2"),
            "another configuration"
        );
        // Length-prefixed: moving bytes between the two parts is another identity.
        assert_ne!(
            Identity::of(b"objectc", b"onfig"),
            base,
            "the boundary counts"
        );
        let config = object::LoadConfig::default();
        assert_eq!(Identity::current(&config), Identity::current(&config));
        let strict = object::LoadConfig {
            syn_only: true,
            ..object::LoadConfig::default()
        };
        assert_ne!(
            Identity::current(&config),
            Identity::current(&strict),
            "other frozen values are another identity"
        );
    }

    #[test]
    fn identity_pins_are_named_with_the_prefix_and_no_dot() {
        let pins = PinRoot::new("/sys/fs/bpf/x");
        let pin = Identity::of(b"o", b"c").pin(&pins);
        let name = pin.file_name().unwrap().to_string_lossy().into_owned();
        assert!(name.starts_with(PREFIX), "{name}");
        assert!(!name.contains('.'), "bpffs refuses dots: {name}");
        assert_eq!(pin.parent(), Some(pins.programs().as_path()));
    }

    #[test]
    fn a_program_pinned_over_kovn_ingress_is_not_reused() {
        assert!(same_program(7, 7).is_ok());
        assert!(matches!(
            same_program(7, 8),
            Err(NotReused::Replaced {
                recorded: 7,
                pinned: 8
            })
        ));
    }
}
