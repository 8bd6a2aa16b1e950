//! Pacing a program swap that keeps failing.
//!
//! When `nf_conntrack_tcp_loose` changes, the agent loads a program with the new frozen value
//! and swaps it in. A load runs the verifier (hundreds of milliseconds of CPU), and a swap that
//! fails once usually fails again (a memlock limit, a kernel that refuses the new value), so the
//! retries are spaced out, and the failure is logged when it starts, when its error changes and
//! when it clears, not on every poll.

use std::time::{Duration, Instant};

/// The state of the swap's retries.
#[derive(Debug)]
pub struct SwapRetry {
    /// The last error, while the swap fails.
    failing: Option<String>,
    not_before: Option<Instant>,
    delay: Duration,
}

/// What to log about an attempt's outcome.
#[derive(Debug, PartialEq, Eq)]
pub enum Report {
    /// Nothing new: the same failure as before, or success without a failure before.
    Quiet,
    /// The swap started failing, or fails with a different error.
    Failing,
    /// It succeeded after failing.
    Recovered,
}

impl SwapRetry {
    pub const FIRST: Duration = Duration::from_secs(3);
    pub const MAX: Duration = Duration::from_mins(5);

    /// Whether an attempt may run at `now`.
    pub fn due(&self, now: Instant) -> bool {
        self.not_before.is_none_or(|at| now >= at)
    }

    /// Records a failed attempt at `now`; the next is due after a delay that doubles up to
    /// [`Self::MAX`].
    pub fn failed(&mut self, now: Instant, error: String) -> Report {
        self.not_before = Some(now + self.delay);
        self.delay = (self.delay * 2).min(Self::MAX);
        let report = if self.failing.as_deref() == Some(error.as_str()) {
            Report::Quiet
        } else {
            Report::Failing
        };
        self.failing = Some(error);
        report
    }

    /// Records a successful attempt (or no attempt needed any more): retries start over.
    pub fn succeeded(&mut self) -> Report {
        let was_failing = self.failing.take().is_some();
        *self = Self::default();
        if was_failing {
            Report::Recovered
        } else {
            Report::Quiet
        }
    }
}

impl Default for SwapRetry {
    fn default() -> Self {
        Self {
            failing: None,
            not_before: None,
            delay: Self::FIRST,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lasting_failure_is_reported_once_and_retried_ever_later() {
        let start = Instant::now();
        let mut retry = SwapRetry::default();
        assert!(retry.due(start));
        assert_eq!(retry.failed(start, "EPERM".into()), Report::Failing);
        assert!(!retry.due(start + Duration::from_secs(2)));
        assert!(retry.due(start + Duration::from_secs(3)));
        let mut at = start + Duration::from_secs(3);
        let mut gaps = Vec::new();
        for _ in 0..10 {
            assert_eq!(retry.failed(at, "EPERM".into()), Report::Quiet);
            let mut next = at;
            while !retry.due(next) {
                next += Duration::from_secs(1);
            }
            gaps.push((next - at).as_secs());
            at = next;
        }
        assert_eq!(gaps, [6, 12, 24, 48, 96, 192, 300, 300, 300, 300]);
    }

    #[test]
    fn a_changed_error_and_the_recovery_are_reported() {
        let now = Instant::now();
        let mut retry = SwapRetry::default();
        assert_eq!(retry.succeeded(), Report::Quiet);
        assert_eq!(retry.failed(now, "EPERM".into()), Report::Failing);
        assert_eq!(retry.failed(now, "ENOMEM".into()), Report::Failing);
        assert_eq!(retry.succeeded(), Report::Recovered);
        assert!(retry.due(now), "a success starts the retries over");
        assert_eq!(retry.failed(now, "ENOMEM".into()), Report::Failing);
    }
}
