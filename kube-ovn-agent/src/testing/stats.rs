//! Summaries of benchmark samples, one definition for every benchmark's JSON.

use serde::Serialize;

/// Median and range over rounds.
#[derive(Serialize, Clone, Copy)]
pub struct Spread {
    pub median: f64,
    pub min: f64,
    pub max: f64,
}

/// Median (the upper one of an even count), minimum and maximum.
pub fn spread(mut samples: Vec<f64>) -> Spread {
    samples.sort_by(f64::total_cmp);
    Spread {
        median: samples[samples.len() / 2],
        min: samples[0],
        max: samples[samples.len() - 1],
    }
}

#[derive(Serialize, Clone, Copy)]
/// Nearest-rank p50 and p99, and the maximum.
pub struct Percentiles {
    pub p50: f64,
    pub p99: f64,
    pub max: f64,
}

pub fn percentiles(mut samples: Vec<f64>) -> Percentiles {
    samples.sort_by(f64::total_cmp);
    // Nearest rank: the smallest sample with at least `percent` % of the samples at or below it.
    let at = |percent: usize| samples[(samples.len() * percent).div_ceil(100).max(1) - 1];
    Percentiles {
        p50: at(50),
        p99: at(99),
        max: samples[samples.len() - 1],
    }
}
