//! Map errors, and the per-map fault summaries a sync pass reports.

use std::io;

use crate::metrics::ErrorKind;

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

    /// Its `kovn_errors_total` kind.
    pub fn kind(&self) -> ErrorKind {
        match self {
            _ if self.is_full() => ErrorKind::MapFull,
            Self::Entry { .. } | Self::Rejected { .. } => ErrorKind::MapWrite,
            Self::Read { .. } => ErrorKind::MapRead,
            Self::Missing { .. } | Self::Layout { .. } => ErrorKind::MapLayout,
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

pub(super) const FULL: &str = "map is full";

pub(super) fn errno(error: &aya::maps::MapError) -> Option<i32> {
    match error {
        aya::maps::MapError::SyscallError(e) => e.io_error.raw_os_error(),
        aya::maps::MapError::IoError(e) => e.raw_os_error(),
        _ => None,
    }
}

pub type Result<T, E = MapError> = std::result::Result<T, E>;

/// The failures of one sync pass on one map, of one kind.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MapFault {
    pub map: &'static str,
    /// [`MapError::kind`].
    pub kind: ErrorKind,
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
        let what = if self.kind == ErrorKind::MapFull {
            "full"
        } else {
            self.kind.label()
        };
        format!("map {} {what} ({})", self.map, errno_name(self.errno))
    }
}

impl std::fmt::Display for MapFault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let errno = errno_name(self.errno);
        if self.kind == ErrorKind::MapFull {
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
pub(super) fn errno_name(errno: Option<i32>) -> String {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errno_names_are_symbolic() {
        assert!(errno_name(Some(libc::ENOSPC)).starts_with("ENOSPC"));
        assert!(errno_name(Some(libc::E2BIG)).starts_with("E2BIG"));
        assert_eq!(errno_name(Some(4095)), "errno 4095");
    }
}
