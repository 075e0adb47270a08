//! Retrying broker calls while the broker is unreachable: capped exponential backoff with jitter, and log
//! lines that say when a loop started failing and when it recovered without repeating the same warning on
//! every attempt of a long outage.

use std::fmt::Display;
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};

/// Delays for successive retries: from 50 ms, doubling, never above `max`.
pub(crate) fn backoff(max: Duration) -> impl Iterator<Item = Duration> + Send {
    // backon's jitter adds up to 100% of the current delay, so the base is capped at half of `max`.
    let half = (max / 2).max(Duration::from_millis(1));
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(50).min(half))
        .with_max_delay(half)
        .with_jitter()
        .without_max_times()
        .build()
}

/// Tracks consecutive failures of one loop for logging.
#[derive(Debug)]
pub(crate) struct Health {
    what: String,
    failures: u64,
}

/// After the first warning, repeat one every this many failures (about a minute at the 2 s cap).
const WARN_EVERY: u64 = 30;

impl Health {
    pub(crate) fn new(what: impl Into<String>) -> Self {
        Self {
            what: what.into(),
            failures: 0,
        }
    }

    pub(crate) fn failed(&mut self, error: &dyn Display, retry_in: Duration) {
        self.failures += 1;
        let retry_in_ms = retry_in.as_millis() as u64;
        if self.failures == 1 || self.failures.is_multiple_of(WARN_EVERY) {
            tracing::warn!(
                what = %self.what,
                failures = self.failures,
                retry_in_ms,
                error = %error,
                "broker call failed, retrying"
            );
        } else {
            tracing::debug!(what = %self.what, failures = self.failures, retry_in_ms, error = %error, "broker call failed, retrying");
        }
    }

    pub(crate) fn ok(&mut self) {
        if self.failures > 0 {
            tracing::info!(what = %self.what, failures = self.failures, "broker reachable again");
            self.failures = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_stays_capped() {
        let max = Duration::from_secs(2);
        let delays: Vec<_> = backoff(max).take(50).collect();
        assert_eq!(delays.len(), 50, "never runs out");
        assert!(delays.iter().all(|d| *d <= max), "{delays:?}");
        assert!(delays[0] <= Duration::from_millis(100));
        assert!(delays[49] >= Duration::from_secs(1));
    }
}
