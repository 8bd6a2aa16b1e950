//! Where cluster state comes from: the Kubernetes API (`kube`) or a kubectl-style YAML file
//! (`file:PATH`). Both keep a current [`Snapshot`] and wake the reconciler on every change.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
    time::Instant,
};

use serde::Serialize;
use tokio::sync::watch;

use crate::cluster::{Kind, Snapshot};

pub mod file;
pub mod kube;

/// `--source` values: `kube` or `file:PATH`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SourceSpec {
    Kube,
    File(std::path::PathBuf),
}

impl std::str::FromStr for SourceSpec {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, String> {
        match text.split_once(':') {
            None if text == "kube" => Ok(Self::Kube),
            Some(("file", path)) if !path.is_empty() => Ok(Self::File(path.into())),
            _ => Err(format!("expected `kube` or `file:PATH`, got {text:?}")),
        }
    }
}

/// Health of one kind's feed.
#[derive(Clone, Debug, Default, Serialize)]
pub struct KindStatus {
    /// A complete list has been received at least once (an API the cluster does not serve
    /// counts as listed and empty).
    pub listed: bool,
    pub objects: usize,
    /// Errors since start (watch failures, rejected files, …).
    pub errors: u64,
    pub last_error: Option<String>,
}

/// What a source reports about itself.
#[derive(Clone, Debug, Default, Serialize)]
pub struct SourceStatus {
    pub kinds: BTreeMap<&'static str, KindStatus>,
}

impl SourceStatus {
    /// Every watched kind has listed once: only then may stale map entries be pruned.
    pub fn all_listed(&self) -> bool {
        !self.kinds.is_empty() && self.kinds.values().all(|k| k.listed)
    }
}

/// A change notification; `received` is when the source saw the (latest) event, for the
/// event-to-map-write latency metric.
#[derive(Clone, Copy, Debug)]
pub struct Change {
    pub seq: u64,
    pub received: Instant,
}

/// The shared, current view of a running source.
pub trait ClusterSource: Send + Sync {
    /// The current objects (cheap: `Arc` clones).
    fn snapshot(&self) -> Snapshot;
    fn status(&self) -> SourceStatus;
}

/// A started source: its view and its change notifications.
pub struct Running {
    pub source: Arc<dyn ClusterSource>,
    pub changes: watch::Receiver<Change>,
}

/// Bookkeeping shared by source implementations: status per kind and the change channel.
pub struct Feed {
    status: Mutex<SourceStatus>,
    changes: watch::Sender<Change>,
}

impl Feed {
    pub fn new(kinds: &[Kind]) -> (Arc<Self>, watch::Receiver<Change>) {
        let (changes, receiver) = watch::channel(Change {
            seq: 0,
            received: Instant::now(),
        });
        let status = SourceStatus {
            kinds: kinds
                .iter()
                .map(|k| (k.name(), KindStatus::default()))
                .collect(),
        };
        (
            Arc::new(Self {
                status: Mutex::new(status),
                changes,
            }),
            receiver,
        )
    }

    /// Records that `kind` changed (or finished listing) and wakes the reconciler.
    pub fn changed(&self) {
        let received = Instant::now();
        self.changes.send_modify(|c| {
            c.seq += 1;
            c.received = received;
        });
    }

    pub fn update(&self, kind: Kind, f: impl FnOnce(&mut KindStatus)) {
        let mut status = self.status.lock().expect("status lock");
        f(status.kinds.entry(kind.name()).or_default());
    }

    pub fn error(&self, kind: Kind, message: String) {
        self.update(kind, |s| {
            s.errors += 1;
            s.last_error = Some(message);
        });
    }

    pub fn status(&self) -> SourceStatus {
        self.status.lock().expect("status lock").clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn source_flag_parses() {
        assert_eq!("kube".parse::<SourceSpec>(), Ok(SourceSpec::Kube));
        assert_eq!(
            "file:/etc/cluster.yaml".parse::<SourceSpec>(),
            Ok(SourceSpec::File("/etc/cluster.yaml".into()))
        );
        assert!("file:".parse::<SourceSpec>().is_err());
        assert!("http://x".parse::<SourceSpec>().is_err());
    }

    #[test]
    fn prune_waits_for_every_kind() {
        let (feed, _rx) = Feed::new(&[Kind::Subnet, Kind::Node]);
        assert!(!feed.status().all_listed());
        feed.update(Kind::Subnet, |s| s.listed = true);
        assert!(!feed.status().all_listed());
        feed.update(Kind::Node, |s| s.listed = true);
        assert!(feed.status().all_listed());
    }
}
