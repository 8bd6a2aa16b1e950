//! Where the time from process start to the first ready goes, phase by phase: logged once and
//! served on `/status` (`startup`), which the control-plane benchmark reads.

use std::time::{Duration, Instant};

use crate::metrics::{Startup, StartupPhase};

/// Collects [`Startup`]'s phases against the process's start.
#[derive(Clone, Debug)]
pub struct StartupClock {
    origin: Instant,
    /// The end of the last sequential phase.
    last: Instant,
    record: Startup,
}

impl StartupClock {
    /// A clock started at `origin` (the first thing `main` does).
    pub fn new(origin: Instant) -> Self {
        Self {
            origin,
            last: origin,
            record: Startup::default(),
        }
    }

    /// Ends a sequential phase now: it began where the previous one ended.
    pub fn phase(&mut self, name: &str) {
        let now = Instant::now();
        self.span(name, self.last, now);
    }

    /// A phase with its own start and end (one that overlapped others, or a part of a pass).
    pub fn span(&mut self, name: &str, start: Instant, end: Instant) {
        let us = |d: Duration| u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        self.record.phases.push(StartupPhase {
            name: name.to_owned(),
            start_us: us(start.saturating_duration_since(self.origin)),
            took_us: us(end.saturating_duration_since(start)),
        });
        self.last = self.last.max(end);
    }

    /// How the program came to run (`Loaded::as_str`).
    pub fn program(&mut self, how: &str) {
        how.clone_into(&mut self.record.program);
    }

    pub fn last(&self) -> Instant {
        self.last
    }

    pub fn record(&self) -> &Startup {
        &self.record
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phases_are_timed_from_the_origin_and_chain() {
        let origin = Instant::now();
        let mut clock = StartupClock::new(origin);
        std::thread::sleep(Duration::from_millis(2));
        clock.phase("a");
        let b_start = clock.last();
        std::thread::sleep(Duration::from_millis(2));
        clock.phase("b");
        clock.span("overlap", origin, b_start);
        let p = &clock.record().phases;
        assert_eq!(
            p.iter().map(|p| p.name.as_str()).collect::<Vec<_>>(),
            ["a", "b", "overlap"]
        );
        assert_eq!(p[0].start_us, 0);
        assert!(p[0].took_us >= 2_000, "{p:?}");
        assert_eq!(p[1].start_us, p[0].took_us, "b starts where a ended");
        assert!(p[1].took_us >= 2_000, "{p:?}");
        assert_eq!((p[2].start_us, p[2].took_us), (0, p[0].took_us));
        // An overlapping span ending earlier does not move the chain back.
        assert!(clock.last() >= b_start + Duration::from_micros(p[1].took_us));
    }
}
