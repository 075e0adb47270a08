//! Latency summaries: exact percentiles over all samples (a sorted vector), nearest-rank definition — the
//! same as the BullMQ side's `bench.mjs`, so both columns of a comparison are computed alike.

use std::time::Duration;

use serde::Serialize;

use crate::redis_cpu::round;

/// Percentiles of a set of latencies, in milliseconds.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Latency {
    pub samples: usize,
    pub p50_ms: Option<f64>,
    pub p90_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    pub p999_ms: Option<f64>,
    pub max_ms: Option<f64>,
    pub mean_ms: Option<f64>,
}

impl Latency {
    pub fn from_samples(mut samples: Vec<Duration>) -> Self {
        samples.sort_unstable();
        let n = samples.len();
        let ms = |d: Duration| round(d.as_secs_f64() * 1e3, 3);
        let at = |p: f64| {
            if n == 0 {
                return None;
            }
            // Nearest rank: the smallest sample with at least p% of the samples at or below it.
            let rank = ((p / 100.0) * n as f64).ceil() as usize;
            Some(ms(samples[rank.clamp(1, n) - 1]))
        };
        let mean = (n > 0).then(|| {
            let total: f64 = samples.iter().map(|d| d.as_secs_f64()).sum();
            round(total / n as f64 * 1e3, 3)
        });
        Self {
            samples: n,
            p50_ms: at(50.0),
            p90_ms: at(90.0),
            p99_ms: at(99.0),
            p999_ms: at(99.9),
            max_ms: samples.last().map(|&d| ms(d)),
            mean_ms: mean,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let v: Vec<Duration> = (1..=100).rev().map(Duration::from_millis).collect();
        let l = Latency::from_samples(v);
        assert_eq!(l.samples, 100);
        assert_eq!(l.p50_ms, Some(50.0));
        assert_eq!(l.p99_ms, Some(99.0));
        assert_eq!(l.p999_ms, Some(100.0));
        assert_eq!(l.max_ms, Some(100.0));
        assert_eq!(l.mean_ms, Some(50.5));
    }

    #[test]
    fn empty_and_single() {
        let l = Latency::from_samples(vec![]);
        assert_eq!(l.samples, 0);
        assert_eq!(l.p99_ms, None);
        let l = Latency::from_samples(vec![Duration::from_micros(1500)]);
        assert_eq!(l.p50_ms, Some(1.5));
        assert_eq!(l.p99_ms, Some(1.5));
    }
}
