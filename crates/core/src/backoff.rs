//! Retry backoff: exponential with full jitter ("Exponential Backoff and Jitter", AWS architecture blog):
//! the delay before attempt n+1 is uniform in `[0, min(max, base · 2^(n-1))]`. Full jitter spreads the retries of
//! jobs that failed together (a dependency outage) instead of sending them back in one wave.

use serde::{Deserialize, Serialize};

use crate::ValidationError;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Backoff {
    /// Cap of the first retry's delay.
    pub base_ms: u64,
    /// Cap of any retry's delay.
    pub max_ms: u64,
}

impl Default for Backoff {
    /// 1 s base, 30 s cap (the original application's `BACKOFF_MS` / `MAX_BACKOFF_MS`).
    fn default() -> Self {
        Self {
            base_ms: 1_000,
            max_ms: 30_000,
        }
    }
}

impl Backoff {
    pub fn validate(&self) -> Result<(), ValidationError> {
        if self.max_ms < self.base_ms {
            return Err(ValidationError::field(
                "backoff.max_ms",
                "must be at least backoff.base_ms",
            ));
        }
        Ok(())
    }

    /// The upper bound of the delay after `attempt` (1-based) failed.
    pub fn cap(&self, attempt: u32) -> u64 {
        let exp = attempt.saturating_sub(1).min(63);
        self.base_ms
            .saturating_mul(1u64 << exp.min(40))
            .min(self.max_ms)
    }

    /// A delay drawn uniformly from `[0, cap(attempt)]`.
    pub fn delay_ms(&self, attempt: u32) -> u64 {
        let cap = self.cap(attempt);
        if cap == 0 {
            0
        } else {
            rand::random_range(0..=cap)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_grow_exponentially_and_saturate() {
        let b = Backoff {
            base_ms: 100,
            max_ms: 1_000,
        };
        assert_eq!(b.cap(1), 100);
        assert_eq!(b.cap(2), 200);
        assert_eq!(b.cap(4), 800);
        assert_eq!(b.cap(5), 1_000);
        assert_eq!(b.cap(500), 1_000);
    }

    #[test]
    fn delays_stay_within_bounds_and_spread() {
        let b = Backoff::default();
        let draws: Vec<u64> = (0..2_000).map(|_| b.delay_ms(3)).collect();
        assert!(draws.iter().all(|&d| d <= 4_000));
        // Full jitter: both halves of the range are used.
        assert!(draws.iter().any(|&d| d < 1_000));
        assert!(draws.iter().any(|&d| d > 3_000));
    }

    #[test]
    fn rejects_inverted_bounds() {
        let b = Backoff {
            base_ms: 10,
            max_ms: 1,
        };
        assert_eq!(b.validate().unwrap_err().errors[0].field, "backoff.max_ms");
    }
}
