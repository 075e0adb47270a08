//! A fixed-bucket latency histogram (10 µs buckets up to 100 ms, 1 ms buckets up to 60 s, then one overflow
//! bucket) that client processes
//! fill lock-free and ship to the coordinator as `[bucket, count]` pairs, so percentiles can be taken over the
//! deliveries of every client process together. Percentiles are nearest-rank, reported as the bucket's upper
//! edge (10 µs resolution below 100 ms, 1 ms above).

use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};

use crate::redis_cpu::round;

/// Fine buckets: 10 µs wide, up to 100 ms.
const FINE_US: u64 = 10;
const FINE: usize = 10_000;
/// Coarse buckets: 1 ms wide, from 100 ms up to 60 s.
const COARSE_US: u64 = 1_000;
pub const BUCKETS: usize = FINE + 59_900;

fn bucket_of(us: u64) -> usize {
    let fine_end = FINE as u64 * FINE_US;
    if us < fine_end {
        (us / FINE_US) as usize
    } else {
        FINE + ((us - fine_end) / COARSE_US) as usize
    }
}

/// Upper edge of bucket `b`, µs.
fn upper_edge(b: usize) -> u64 {
    if b < FINE {
        (b as u64 + 1) * FINE_US
    } else {
        FINE as u64 * FINE_US + (b - FINE) as u64 * COARSE_US + COARSE_US
    }
}

/// Shared, lock-free recording side.
#[derive(Debug)]
pub struct AtomicHist {
    counts: Vec<AtomicU64>,
    overflow: AtomicU64,
    max_us: AtomicU64,
}

impl Default for AtomicHist {
    fn default() -> Self {
        Self {
            counts: (0..BUCKETS).map(|_| AtomicU64::new(0)).collect(),
            overflow: AtomicU64::new(0),
            max_us: AtomicU64::new(0),
        }
    }
}

impl AtomicHist {
    pub fn record(&self, us: u64) {
        let b = bucket_of(us);
        if b < BUCKETS {
            self.counts[b].fetch_add(1, Ordering::Relaxed);
        } else {
            self.overflow.fetch_add(1, Ordering::Relaxed);
        }
        self.max_us.fetch_max(us, Ordering::Relaxed);
    }

    /// Take the contents and reset.
    pub fn take(&self) -> Hist {
        let mut buckets = Vec::new();
        for (i, c) in self.counts.iter().enumerate() {
            let n = c.swap(0, Ordering::Relaxed);
            if n > 0 {
                buckets.push((i as u32, n));
            }
        }
        Hist {
            buckets,
            overflow: self.overflow.swap(0, Ordering::Relaxed),
            max_us: self.max_us.swap(0, Ordering::Relaxed),
        }
    }
}

/// Sparse form: non-empty buckets.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Hist {
    pub buckets: Vec<(u32, u64)>,
    pub overflow: u64,
    pub max_us: u64,
}

/// Percentiles in milliseconds.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub samples: u64,
    pub p50_ms: Option<f64>,
    pub p90_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    pub p999_ms: Option<f64>,
    pub max_ms: Option<f64>,
}

impl Hist {
    pub fn merge(&mut self, other: &Hist) {
        let mut dense = vec![0u64; BUCKETS];
        for &(b, n) in self.buckets.iter().chain(other.buckets.iter()) {
            if let Some(slot) = dense.get_mut(b as usize) {
                *slot += n;
            }
        }
        self.buckets = dense
            .iter()
            .enumerate()
            .filter(|(_, n)| **n > 0)
            .map(|(i, n)| (i as u32, *n))
            .collect();
        self.overflow += other.overflow;
        self.max_us = self.max_us.max(other.max_us);
    }

    pub fn count(&self) -> u64 {
        self.buckets.iter().map(|(_, n)| n).sum::<u64>() + self.overflow
    }

    pub fn summary(&self) -> Summary {
        let n = self.count();
        let ms = |us: u64| round(us as f64 / 1e3, 3);
        let at = |p: f64| -> Option<f64> {
            if n == 0 {
                return None;
            }
            let rank = (((p / 100.0) * n as f64).ceil() as u64).clamp(1, n);
            let mut seen = 0;
            for &(b, c) in &self.buckets {
                seen += c;
                if seen >= rank {
                    return Some(ms(upper_edge(b as usize).min(self.max_us)));
                }
            }
            Some(ms(self.max_us))
        };
        Summary {
            samples: n,
            p50_ms: at(50.0),
            p90_ms: at(90.0),
            p99_ms: at(99.0),
            p999_ms: at(99.9),
            max_ms: (n > 0).then(|| ms(self.max_us)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_across_merged_histograms() {
        let a = AtomicHist::default();
        let b = AtomicHist::default();
        for us in 1..=50u64 {
            a.record(us * 100);
        }
        for us in 51..=100u64 {
            b.record(us * 100);
        }
        let mut h = a.take();
        h.merge(&b.take());
        let s = h.summary();
        assert_eq!(s.samples, 100);
        assert_eq!(s.p50_ms, Some(5.01));
        assert_eq!(s.p99_ms, Some(9.91));
        assert_eq!(s.max_ms, Some(10.0));
        assert_eq!(a.take().count(), 0);
        a.record(2_500_400);
        a.record(70_000_000);
        let s = a.take().summary();
        assert_eq!(s.samples, 2);
        assert_eq!(s.p50_ms, Some(2501.0));
        assert_eq!(s.max_ms, Some(70_000.0));
    }
}
