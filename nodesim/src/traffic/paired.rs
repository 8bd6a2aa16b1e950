//! Paired comparison of two modes over the rounds of one scale step.
//!
//! Every round measures every mode once, close together in time, so the round is the unit: the
//! ratio `a[r] / b[r]` cancels what the machine did during that round (a neighbour's build, a
//! cache state) far better than comparing medians or min–max ranges of independent columns.
//! Two summaries of those per-round ratios:
//! - a percentile bootstrap 95 % confidence interval of their median (rounds resampled with
//!   replacement, [`RESAMPLES`] times, from a fixed seed so a report is reproducible);
//! - an exact two-sided sign test of "ratio > 1 as often as < 1" (ties dropped), which assumes
//!   nothing about the distribution.
//!
//! With 5–9 rounds the interval's ends are order statistics of few values: it is coarse, and
//! says so by being wide. A verdict is only "met" or "missed" when the whole interval is on one
//! side of the threshold.

use serde_json::{Value, json};

/// Bootstrap resamples per interval.
const RESAMPLES: usize = 4_000;
/// Seed of the resampling generator (xorshift64*).
const SEED: u64 = 0x9e37_79b9_7f4a_7c15;

/// The per-round ratios of two modes and what they say.
#[derive(Clone, Debug)]
pub struct Paired {
    pub ratios: Vec<f64>,
    pub median: f64,
    pub ci95: (f64, f64),
    /// Rounds with ratio > 1, < 1 (ties excluded from the sign test).
    pub above: usize,
    pub below: usize,
    pub sign_p: f64,
}

/// `a[r] / b[r]` for every round where both are finite and `b[r]` is non-zero.
pub fn paired(a: &[f64], b: &[f64]) -> Paired {
    let ratios: Vec<f64> = a
        .iter()
        .zip(b)
        .filter(|(x, y)| x.is_finite() && y.is_finite() && **y != 0.0)
        .map(|(x, y)| x / y)
        .collect();
    let above = ratios.iter().filter(|r| **r > 1.0).count();
    let below = ratios.iter().filter(|r| **r < 1.0).count();
    Paired {
        median: median(&ratios),
        ci95: bootstrap_ci(&ratios),
        sign_p: sign_test(above, below),
        above,
        below,
        ratios,
    }
}

impl Paired {
    pub fn json(&self) -> Value {
        json!({
            "ratios": self.ratios,
            "median": self.median,
            "ci95": [self.ci95.0, self.ci95.1],
            "above_1": self.above,
            "below_1": self.below,
            "sign_test_p": self.sign_p,
        })
    }
}

pub(super) fn median(values: &[f64]) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        f64::midpoint(v[n / 2 - 1], v[n / 2])
    }
}

/// xorshift64*: enough for resampling indices, and no dependency.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        let x = self.0.wrapping_mul(0x2545_f491_4f6c_dd1d);
        // The modulo bias is below 2^-50 for n ≤ a few thousand.
        usize::try_from(x % u64::try_from(n).expect("usize fits u64")).expect("below n")
    }
}

/// Percentile bootstrap 95 % interval of the median.
pub(super) fn bootstrap_ci(values: &[f64]) -> (f64, f64) {
    if values.is_empty() {
        return (f64::NAN, f64::NAN);
    }
    let mut rng = Rng(SEED);
    let mut sample = vec![0.0; values.len()];
    let mut medians: Vec<f64> = (0..RESAMPLES)
        .map(|_| {
            for slot in &mut sample {
                *slot = values[rng.below(values.len())];
            }
            median(&sample)
        })
        .collect();
    medians.sort_by(f64::total_cmp);
    let at = |q: f64| {
        #[expect(
            clippy::cast_possible_truncation,
            clippy::cast_sign_loss,
            clippy::cast_precision_loss,
            reason = "an index into RESAMPLES values"
        )]
        let i = ((RESAMPLES - 1) as f64 * q).round() as usize;
        medians[i]
    };
    (at(0.025), at(0.975))
}

/// Exact two-sided sign test: the probability, if above and below were equally likely, of a
/// split at least as uneven as the one seen.
fn sign_test(above: usize, below: usize) -> f64 {
    let n = above + below;
    if n == 0 {
        return 1.0;
    }
    let k = above.min(below);
    // P(X ≤ k) for X ~ Binomial(n, 1/2), doubled.
    let mut term = 0.5f64.powi(i32::try_from(n).expect("few rounds"));
    let mut tail = 0.0;
    for i in 0..=k {
        tail += term;
        #[expect(clippy::cast_precision_loss, reason = "few rounds")]
        let next = (n - i) as f64 / (i + 1) as f64;
        term *= next;
    }
    (2.0 * tail).min(1.0)
}

/// What the interval says about `ratio ≥ threshold` (or `≤` where lower is better).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// The whole interval is on the good side.
    Met,
    /// The whole interval is on the bad side.
    Missed,
    /// The interval contains the threshold: this run cannot tell.
    Inconclusive,
}

impl Verdict {
    pub fn of(p: &Paired, threshold: f64, higher_is_better: bool) -> Self {
        let (lo, hi) = p.ci95;
        if !(lo.is_finite() && hi.is_finite()) {
            return Self::Inconclusive;
        }
        let (good, bad) = if higher_is_better {
            (lo >= threshold, hi < threshold)
        } else {
            (hi <= threshold, lo > threshold)
        };
        if good {
            Self::Met
        } else if bad {
            Self::Missed
        } else {
            Self::Inconclusive
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Met => "met",
            Self::Missed => "missed",
            Self::Inconclusive => "inconclusive",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sign_test_matches_the_binomial_tables() {
        // 5 of 5 one way: 2 × 1/32.
        assert!((sign_test(5, 0) - 0.0625).abs() < 1e-12);
        // 6 of 7: 2 × 8/128.
        assert!((sign_test(6, 1) - 0.125).abs() < 1e-12);
        // An even split cannot be surprising.
        assert!((sign_test(3, 3) - 1.0).abs() < 1e-12);
        assert!((sign_test(0, 0) - 1.0).abs() < 1e-12);
    }

    #[test]
    fn ratios_are_per_round_and_skip_missing_values() {
        let p = paired(&[2.0, 3.0, f64::NAN, 4.0], &[1.0, 3.0, 1.0, 0.0]);
        assert_eq!(p.ratios, vec![2.0, 1.0]);
        assert_eq!((p.above, p.below), (1, 0));
    }

    #[test]
    fn the_interval_brackets_the_median_and_collapses_without_spread() {
        let same = paired(&[1.1; 7], &[1.0; 7]);
        assert!((same.ci95.0 - 1.1).abs() < 1e-12 && (same.ci95.1 - 1.1).abs() < 1e-12);
        let spread = paired(&[0.90, 0.95, 1.00, 1.05, 1.10, 1.15, 1.20], &[1.0; 7]);
        assert!(spread.ci95.0 < spread.median && spread.median < spread.ci95.1);
        assert!(spread.ci95.0 >= 0.90 && spread.ci95.1 <= 1.20);
    }

    #[test]
    fn verdicts_come_from_the_interval_not_the_median() {
        // Median 1.05 but the rounds disagree: the interval spans 1.
        let mixed = paired(&[0.90, 0.97, 1.05, 1.08, 1.12], &[1.0; 5]);
        assert_eq!(Verdict::of(&mixed, 1.0, true), Verdict::Inconclusive);
        let better = paired(&[1.10, 1.12, 1.15, 1.11, 1.13], &[1.0; 5]);
        assert_eq!(Verdict::of(&better, 1.0, true), Verdict::Met);
        assert_eq!(Verdict::of(&better, 1.0, false), Verdict::Missed);
        let worse = paired(&[0.80, 0.82, 0.85, 0.81, 0.83], &[1.0; 5]);
        assert_eq!(Verdict::of(&worse, 1.0, true), Verdict::Missed);
        assert_eq!(Verdict::of(&worse, 1.0, false), Verdict::Met);
    }
}
