//! Where cluster state comes from: the Kubernetes API (`kube`) or a kubectl-style YAML file
//! (`file:PATH`). Both keep a current [`Snapshot`] and wake the reconciler on every change.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
    time::Instant,
};

use serde::Serialize;
use tokio::sync::watch;

use crate::{
    cluster::{Kind, Snapshot, object_name},
    translate::ServiceView,
};

pub mod file;
pub mod journal;
pub mod kube;

pub use self::journal::{Changes, Journal};

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
    /// Complete lists received, the first included: more than one means relists (a watch that
    /// expired or broke off and started over).
    pub relists: u64,
    /// Unix seconds of the last complete list or watch event.
    pub last_event_unix: Option<u64>,
    /// Unix seconds of the last error since the last complete list or event (`None` once one
    /// came after it).
    pub last_error_unix: Option<u64>,
    /// Objects of this kind rejected alone (undecodable or invalid), named in `last_error` and
    /// the log. Their last good version, if any, stays in force; the rest of the kind is
    /// applied, so this does not make the kind `failing`.
    pub rejected: usize,
}

/// How long after its last error, with no list or event since, a kind counts as failing. A
/// watch that keeps failing reports an error at least every 45 s (the retry cap, 30 s, plus its
/// jitter); a watch
/// that reconnected quietly (no event to show it) counts as watching again after this.
pub const FAILING_WINDOW_SECS: u64 = 120;

impl KindStatus {
    /// Whether, at `now` (Unix seconds), the last report was an error less than
    /// [`FAILING_WINDOW_SECS`] old: the view of this kind is stale.
    pub fn failing_at(&self, now: u64) -> bool {
        self.last_error_unix
            .is_some_and(|error| now.saturating_sub(error) < FAILING_WINDOW_SECS)
    }

    /// `listing` until the first complete list, then `watching`, or `failing` while the watch
    /// reports errors ([`KindStatus::failing_at`]).
    pub fn state_at(&self, now: u64) -> &'static str {
        if !self.listed {
            "listing"
        } else if self.failing_at(now) {
            "failing"
        } else {
            "watching"
        }
    }
}

/// Every value of [`KindStatus::state`].
pub const KIND_STATES: [&str; 3] = ["listing", "watching", "failing"];

/// Hands the heap memory the process freed back to the kernel.
///
/// glibc keeps what a thread frees in that thread's arena for reuse. A complete list or a new
/// file version frees at once what it decoded and dropped (the list pages, managedFields, a
/// whole YAML tree: several times what is kept) and, on a relist or a reload, the previous
/// view: without this the agent's resident memory keeps the peak of every such pass. Called
/// after those passes only (it walks every arena: milliseconds on a large heap).
pub fn release_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns free pages of the allocator's own arenas; it takes the
    // arena locks like malloc does and has no precondition.
    unsafe {
        libc::malloc_trim(0);
    }
}

pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default()
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
    /// The current objects for a full read: [`Self::snapshot`] with its Services handed one by
    /// one to `service` (by `namespace/name`) instead. A source that keeps Services as a
    /// projection hands out the projection in place and builds no `Service` per object.
    fn read(&self, service: &mut dyn FnMut(&str, &dyn ServiceView)) -> Snapshot {
        let mut snapshot = self.snapshot();
        for s in std::mem::take(&mut snapshot.services) {
            service(&object_name(&s.metadata), &*s);
        }
        snapshot
    }
    fn status(&self) -> SourceStatus;
    /// The object changes since the last call, for an incremental translation; the default
    /// (a source without a journal) always asks for a full re-read of [`Self::snapshot`].
    fn take_changes(&self) -> Changes {
        Changes::Reset
    }
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
            s.last_error_unix = Some(unix_now());
        });
    }

    /// Records that one object of `kind` was rejected alone: counted as an error and named in
    /// `last_error`, without marking the whole kind as failing.
    pub fn rejected(&self, kind: Kind, message: String) {
        self.update(kind, |s| {
            s.errors += 1;
            s.last_error = Some(message);
        });
    }

    /// Records how many objects of `kind` are currently rejected.
    pub fn rejected_now(&self, kind: Kind, count: usize) {
        self.update(kind, |s| s.rejected = count);
    }

    /// Records a complete list of `kind` holding `objects`.
    pub fn listed(&self, kind: Kind, objects: usize) {
        self.update(kind, |s| {
            s.listed = true;
            s.objects = objects;
            s.relists += 1;
            s.last_event_unix = Some(unix_now());
            s.last_error_unix = None;
        });
    }

    /// Records a watch event of `kind`; `objects` is the count after it.
    pub fn event(&self, kind: Kind, objects: usize) {
        self.update(kind, |s| {
            s.objects = objects;
            s.last_event_unix = Some(unix_now());
            s.last_error_unix = None;
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

    #[test]
    fn kind_state_follows_lists_errors_and_events() {
        let (feed, _rx) = Feed::new(&[Kind::Service]);
        let now = unix_now();
        let state = |feed: &Feed| feed.status().kinds["Service"].clone();
        assert_eq!(state(&feed).state_at(now), "listing");
        feed.error(Kind::Service, "connection refused".into());
        assert_eq!(state(&feed).state_at(now), "listing", "no list yet");
        feed.listed(Kind::Service, 3);
        let listed = state(&feed);
        assert_eq!(
            (listed.state_at(now), listed.relists, listed.objects),
            ("watching", 1, 3)
        );
        assert!(listed.last_event_unix.is_some());
        feed.error(Kind::Service, "watch broke".into());
        let failing = state(&feed);
        assert_eq!(failing.state_at(now), "failing");
        assert_eq!(failing.errors, 2);
        assert_eq!(
            failing.state_at(now + FAILING_WINDOW_SECS),
            "watching",
            "a quiet reconnect counts as watching once no error came for the window"
        );
        feed.event(Kind::Service, 4);
        assert_eq!(
            state(&feed).state_at(now),
            "watching",
            "an event clears the failure"
        );
        feed.listed(Kind::Service, 4);
        assert_eq!(state(&feed).relists, 2);
    }
}
