//! Logging lasting faults once, forgetting them when they clear, and keeping text that comes from
//! outside (object names, file contents, kernel messages) from forging log lines.
//!
//! A fault seen on every pass (a full map, a bad object) is logged when it appears and when it
//! clears, not every pass. The memory is bounded by the faults present now: each category
//! remembers only what its last pass reported, so a fault that clears and comes back is logged
//! again.

use std::{
    borrow::Cow,
    collections::{BTreeMap, BTreeSet},
    fmt::Write as _,
};

/// New faults of one category logged per pass; the rest are summarised in one line.
pub const MAX_LINES_PER_PASS: usize = 20;

/// One fault: `key` says which fault it is (the same fault on the next pass has the same key),
/// `message` what to log about it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fault {
    pub key: String,
    pub message: String,
}

impl Fault {
    /// A fault whose message is its identity.
    pub fn new(message: impl Into<String>) -> Self {
        let message = message.into();
        Self {
            key: message.clone(),
            message,
        }
    }

    pub fn keyed(key: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            key: key.into(),
            message: message.into(),
        }
    }
}

/// What one pass changed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PassOutcome {
    /// Faults not present on the category's previous pass, as logged (escaped).
    pub new: Vec<String>,
    /// Keys of faults the previous pass had and this one has not.
    pub cleared: Vec<String>,
}

/// The faults present now, by category.
#[derive(Debug, Default)]
pub struct FaultLog {
    current: BTreeMap<&'static str, BTreeSet<String>>,
}

impl FaultLog {
    /// Records the complete list of `category`'s faults for one pass: logs the new ones at warn
    /// level (at most [`MAX_LINES_PER_PASS`] lines) and the cleared ones at info level.
    pub fn pass(
        &mut self,
        category: &'static str,
        faults: impl IntoIterator<Item = Fault>,
    ) -> PassOutcome {
        let previous = self.current.remove(category).unwrap_or_default();
        let mut now = BTreeSet::new();
        let mut outcome = PassOutcome::default();
        for fault in faults {
            if !previous.contains(&fault.key) && !now.contains(&fault.key) {
                outcome.new.push(escape(&fault.message).into_owned());
            }
            now.insert(fault.key);
        }
        outcome.cleared = previous.difference(&now).cloned().collect();
        for line in outcome.new.iter().take(MAX_LINES_PER_PASS) {
            tracing::warn!("{line}");
        }
        if outcome.new.len() > MAX_LINES_PER_PASS {
            tracing::warn!(
                "… and {} more new {category} faults not shown (the metrics count them)",
                outcome.new.len() - MAX_LINES_PER_PASS
            );
        }
        for key in outcome.cleared.iter().take(MAX_LINES_PER_PASS) {
            tracing::info!("resolved: {}", escape(key));
        }
        if outcome.cleared.len() > MAX_LINES_PER_PASS {
            tracing::info!(
                "… and {} more {category} faults resolved",
                outcome.cleared.len() - MAX_LINES_PER_PASS
            );
        }
        if !now.is_empty() {
            self.current.insert(category, now);
        }
        outcome
    }

    /// How many faults are remembered, over all categories.
    pub fn len(&self) -> usize {
        self.current.values().map(BTreeSet::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.current.is_empty()
    }
}

/// `text` with every control character written as an escape (`\n`, `\r`, `\t`, `\u{1b}`), so
/// a name holding a newline or a terminal sequence stays inside its own log line.
pub fn escape(text: &str) -> Cow<'_, str> {
    if !text.chars().any(char::is_control) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        if c.is_control() {
            let _ = write!(out, "{}", c.escape_default());
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn faults(keys: &[&str]) -> Vec<Fault> {
        keys.iter().map(|k| Fault::new(*k)).collect()
    }

    #[test]
    fn a_lasting_fault_is_new_once_and_a_returning_one_again() {
        let mut log = FaultLog::default();
        assert_eq!(log.pass("maps", faults(&["a", "b"])).new, ["a", "b"]);
        let again = log.pass("maps", faults(&["a", "b"]));
        assert!(again.new.is_empty() && again.cleared.is_empty());
        let cleared = log.pass("maps", faults(&["b"]));
        assert_eq!(cleared.cleared, ["a"]);
        assert_eq!(log.pass("maps", faults(&["a", "b"])).new, ["a"]);
        // Other categories are independent.
        assert_eq!(log.pass("attach", faults(&["a"])).new, ["a"]);
        assert_eq!(log.len(), 3);
    }

    #[test]
    fn memory_is_bounded_by_the_faults_present_now() {
        let mut log = FaultLog::default();
        for pass in 0..1000 {
            let keys: Vec<Fault> = (0..10).map(|i| Fault::new(format!("{pass}-{i}"))).collect();
            log.pass("translate", keys);
        }
        assert_eq!(log.len(), 10, "only the last pass's faults are remembered");
        log.pass("translate", []);
        assert!(log.is_empty());
    }

    #[test]
    fn duplicates_within_a_pass_count_once() {
        let mut log = FaultLog::default();
        let outcome = log.pass(
            "maps",
            [Fault::keyed("k", "first"), Fault::keyed("k", "second")],
        );
        assert_eq!(outcome.new, ["first"]);
    }

    #[test]
    fn control_characters_are_escaped() {
        assert_eq!(escape("plain name"), "plain name");
        assert!(matches!(escape("plain"), Cow::Borrowed(_)));
        assert_eq!(
            escape("evil\nFORGED line\r\t\u{1b}[31m"),
            "evil\\nFORGED line\\r\\t\\u{1b}[31m"
        );
        assert_eq!(escape("ünïcode ok"), "ünïcode ok");
    }

    #[test]
    fn new_faults_are_logged_escaped() {
        let mut log = FaultLog::default();
        let outcome = log.pass("source", [Fault::new("Subnet evil\nFORGED")]);
        assert_eq!(outcome.new, ["Subnet evil\\nFORGED"]);
    }
}
