//! The object changes a source saw since the reconciler last asked, so one change costs one
//! object downstream instead of a whole [`Snapshot`](crate::cluster::Snapshot).

use std::sync::{Arc, Mutex};

use crate::cluster::{Kind, ObjectChange, Watched, object_name};

/// Changes held at most before the journal gives up and asks for a full re-read (a reconciler
/// that fell far behind re-reads the snapshot instead of replaying a long history).
pub const CAPACITY: usize = 65_536;

/// What the reconciler gets from [`Journal::take`].
#[derive(Debug)]
pub enum Changes {
    /// The changes since the last take, in the order they happened.
    Objects(Vec<ObjectChange>),
    /// The view changed as a whole (a relist, a new file version, an overflow): re-read the
    /// snapshot. Changes recorded at the same time are in that snapshot too.
    Reset,
}

/// Object changes, appended by a source and taken by the reconciler.
#[derive(Debug)]
pub struct Journal {
    inner: Mutex<Inner>,
}

#[derive(Debug)]
struct Inner {
    changes: Vec<ObjectChange>,
    reset: bool,
}

impl Default for Journal {
    /// A new journal asks for a full read first.
    fn default() -> Self {
        Self {
            inner: Mutex::new(Inner {
                changes: Vec::new(),
                reset: true,
            }),
        }
    }
}

impl Journal {
    /// Records that an object was created or changed (`Some`) or deleted (`None`); `key` names
    /// it ([`object_name`]).
    pub fn record(&self, kind: Kind, key: String, object: Option<crate::cluster::Object>) {
        let mut inner = self.lock();
        if inner.reset {
            return;
        }
        if inner.changes.len() >= CAPACITY {
            inner.changes = Vec::new();
            inner.reset = true;
            return;
        }
        inner.changes.push(ObjectChange { kind, key, object });
    }

    /// Records an upsert of a watched object.
    pub fn upsert<T: Watched>(&self, object: Arc<T>) {
        let key = object_name(object.meta());
        self.record(T::KIND, key, Some(T::object(object)));
    }

    /// The whole view changed.
    pub fn reset(&self) {
        let mut inner = self.lock();
        inner.changes = Vec::new();
        inner.reset = true;
    }

    /// Everything since the last take. Take it before reading the snapshot on a reset, so a
    /// change that comes in between is replayed rather than lost.
    pub fn take(&self) -> Changes {
        let mut inner = self.lock();
        if std::mem::take(&mut inner.reset) {
            inner.changes.clear();
            Changes::Reset
        } else {
            Changes::Objects(std::mem::take(&mut inner.changes))
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::objects::subnet;

    #[test]
    fn starts_with_a_reset_then_hands_out_changes_in_order() {
        let journal = Journal::default();
        journal.record(Kind::Service, "a/b".into(), None);
        assert!(
            matches!(journal.take(), Changes::Reset),
            "first read is full"
        );
        journal.upsert(Arc::new(subnet("s1", "10.0.0.0/24")));
        journal.record(Kind::Service, "a/b".into(), None);
        let Changes::Objects(changes) = journal.take() else {
            panic!("no reset since");
        };
        let keys: Vec<_> = changes.iter().map(|c| (c.kind, c.key.as_str())).collect();
        assert_eq!(keys, [(Kind::Subnet, "s1"), (Kind::Service, "a/b")]);
        assert!(matches!(journal.take(), Changes::Objects(c) if c.is_empty()));
        journal.reset();
        assert!(matches!(journal.take(), Changes::Reset));
    }

    #[test]
    fn overflow_turns_into_a_reset() {
        let journal = Journal::default();
        let _ = journal.take();
        for i in 0..=CAPACITY {
            journal.record(Kind::Service, format!("ns/s{i}"), None);
        }
        assert!(matches!(journal.take(), Changes::Reset));
        assert!(matches!(journal.take(), Changes::Objects(c) if c.is_empty()));
    }
}
