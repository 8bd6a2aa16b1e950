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
use kube_ovn_ebpf_common::{frozen, names, rule};

use crate::translate::ServiceMatch;

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

/// The configuration frozen into the program at load (`kube_ovn_ebpf_common::frozen`): `.rodata`
/// values the verifier sees as constants, so what they rule out is pruned rather than tested per
/// packet. Two programs differ when their `LoadConfig`s do, even with the same tag (the tag does
/// not cover `.rodata`): they are part of the program's identity (`datapath::reuse`), so a
/// pinned program is reused only when they match, and the agent pins them next to the program
/// ([`FROZEN_MAP`]) for operators to read.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct LoadConfig {
    /// The rules that can ever be active on this node (`rule::bit` mask): what the agent's
    /// flags leave possible (`--service-match`, `--enable-tproxy`); what the cluster decides
    /// stays in the config map.
    pub rules: u32,
    /// Classify TCP only when it carries SYN: the node's `nf_conntrack_tcp_loose` is 0
    /// (`frozen::SYN_ONLY`, docs/design.md §1).
    pub syn_only: bool,
}

impl Default for LoadConfig {
    /// The ELF's own values: every rule possible, every packet classified.
    fn default() -> Self {
        Self {
            rules: frozen::ALL_RULES,
            syn_only: false,
        }
    }
}

impl LoadConfig {
    /// The load configuration for the agent's flags and the node's `nf_conntrack_tcp_loose`
    /// (`None`: unreadable, e.g. conntrack not loaded yet; its default, 1, is assumed).
    pub fn new(service_match: ServiceMatch, tproxy: bool, tcp_loose: Option<bool>) -> Self {
        let nat = match service_match {
            ServiceMatch::Auto => rule::NAT_RULES,
            ServiceMatch::IpPort => rule::NAT_RULES & !rule::bit(rule::R1B),
            ServiceMatch::Cidr => rule::bit(rule::R1B),
        };
        Self {
            rules: nat | if tproxy { rule::bit(rule::TPROXY) } else { 0 },
            syn_only: false,
        }
        .with_tcp_loose(tcp_loose)
    }

    /// This configuration for a node whose `nf_conntrack_tcp_loose` is `tcp_loose`.
    #[must_use]
    pub fn with_tcp_loose(self, tcp_loose: Option<bool>) -> Self {
        Self {
            syn_only: tcp_loose == Some(false),
            ..self
        }
    }

    fn flags(self) -> u32 {
        if self.syn_only { frozen::SYN_ONLY } else { 0 }
    }
}

/// `net.netfilter.nf_conntrack_tcp_loose` of the agent's network namespace (the node's: the
/// agent runs with the host network): `Some(true)` for 1, `Some(false)` for 0, `None` when it
/// cannot be read (`nf_conntrack` not loaded: it starts at its default, 1, when it loads).
pub fn tcp_loose() -> Option<bool> {
    tcp_loose_from(&std::fs::read_to_string(TCP_LOOSE).ok()?)
}

const TCP_LOOSE: &str = "/proc/sys/net/netfilter/nf_conntrack_tcp_loose";

fn tcp_loose_from(text: &str) -> Option<bool> {
    text.trim().parse::<u32>().ok().map(|v| v != 0)
}

/// The object's map of frozen values (its `.rodata` section). Pinned next to the program
/// ([`super::pins::PinRoot::frozen`]) so an operator can read which values the running program
/// was loaded with; whether a later start reuses that program is decided by its identity
/// (`datapath::reuse`), which covers these values.
pub const FROZEN_MAP: &str = ".rodata";

/// Where [`load`] pins the maps: each at `dir/<name>`, except the `staged` ones, at
/// `staging/<name>` (a map-layout migration builds the new maps there).
pub struct MapPins<'a> {
    pub dir: &'a Path,
    pub staging: &'a Path,
    pub staged: &'a [&'static str],
}

/// Loads the object with `config` frozen into it. With `pins`, each map is pinned where
/// [`MapPins`] says; maps already pinned there are reused with their content. The caller makes
/// sure those match this build's layout ([`mismatched_pins`]).
pub fn load(pins: Option<&MapPins<'_>>, config: LoadConfig) -> Result<Ebpf, LoadError> {
    raise_memlock_limit();
    let flags = config.flags();
    let mut loader = EbpfLoader::new();
    loader.verifier_log_level(VerifierLogLevel::STATS);
    loader.override_global(frozen::RULES, &config.rules, true);
    loader.override_global(frozen::FLAGS, &flags, true);
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

/// `KOVN_TEST_CRASH_AT=<point>`: the process aborts at that named point of a map-layout
/// migration, as a `kill -9` there would, so the tests can restart from every state an
/// interrupted migration leaves (`tests/reliability.rs`). Only in builds with the `testing`
/// feature; elsewhere a no-op.
#[cfg(feature = "testing")]
pub(crate) fn crash_point(point: &str) {
    if std::env::var_os("KOVN_TEST_CRASH_AT").is_some_and(|at| at == point) {
        eprintln!("KOVN_TEST_CRASH_AT={point}: aborting");
        std::process::abort();
    }
}

#[cfg(not(feature = "testing"))]
pub(crate) fn crash_point(_point: &str) {}

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

    #[test]
    fn the_flags_leave_only_their_rules_possible() {
        let all_nat = rule::NAT_RULES;
        let tproxy = rule::bit(rule::TPROXY);
        let r1b = rule::bit(rule::R1B);
        assert_eq!(
            LoadConfig::new(ServiceMatch::Auto, false, None).rules,
            all_nat
        );
        assert_eq!(
            LoadConfig::new(ServiceMatch::Auto, true, None).rules,
            all_nat | tproxy
        );
        assert_eq!(all_nat | tproxy, frozen::ALL_RULES);
        assert_eq!(
            LoadConfig::new(ServiceMatch::IpPort, true, None).rules,
            frozen::ALL_RULES & !r1b
        );
        assert_eq!(LoadConfig::new(ServiceMatch::Cidr, false, None).rules, r1b);
    }

    /// Only a node whose conntrack never picks up a mid-stream segment gets the SYN-only
    /// program; unreadable means the kernel default (loose).
    #[test]
    fn syn_only_needs_tcp_loose_zero() {
        let syn_only = |loose| LoadConfig::new(ServiceMatch::Auto, false, loose).syn_only;
        assert!(syn_only(Some(false)));
        assert!(!syn_only(Some(true)));
        assert!(!syn_only(None));
        assert_eq!(tcp_loose_from("0\n"), Some(false));
        assert_eq!(tcp_loose_from("1\n"), Some(true));
        assert_eq!(tcp_loose_from("2"), Some(true));
        assert_eq!(tcp_loose_from(""), None);
        assert_eq!(LoadConfig::default().flags(), 0);
    }

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
