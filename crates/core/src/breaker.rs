//! A circuit breaker around one dependency (Redis, PostgreSQL): after `failure_threshold` consecutive failures
//! it opens and refuses calls for `open_for`, then half-opens and lets up to `half_open_probes` calls through at
//! once; a probe that succeeds closes it, a probe that fails opens it again.
//!
//! Pure and thread-safe: a std mutex and [`Instant`]s, no I/O, no tasks. The caller decides what a failure is
//! (a refused connection or a timeout is one; an invalid request is not) and reports it on the [`Permit`].
//!
//! ```
//! use ferry_core::breaker::{Breaker, BreakerConfig};
//! let b = Breaker::new(BreakerConfig::default());
//! match b.try_acquire() {
//!     Ok(permit) => permit.success(),
//!     Err(open) => assert!(open.retry_after.as_millis() > 0),
//! }
//! ```

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Breaker settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BreakerConfig {
    /// Consecutive failures that open the breaker (default 5; 0 is treated as 1).
    pub failure_threshold: u32,
    /// How long the breaker stays open before it lets probes through (default 5 s).
    pub open_for: Duration,
    /// How many calls may probe at once while half-open (default 1; 0 is treated as 1).
    pub half_open_probes: u32,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        Self {
            failure_threshold: 5,
            open_for: Duration::from_secs(5),
            half_open_probes: 1,
        }
    }
}

/// The state of a breaker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    /// Calls go through; consecutive failures are counted.
    Closed,
    /// `open_for` has passed: a limited number of probes go through.
    HalfOpen,
    /// Calls are refused until `open_for` has passed.
    Open,
}

impl BreakerState {
    /// The metrics code: 0 closed, 1 half-open, 2 open.
    pub fn code(self) -> u8 {
        match self {
            Self::Closed => 0,
            Self::HalfOpen => 1,
            Self::Open => 2,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Closed => "closed",
            Self::HalfOpen => "half-open",
            Self::Open => "open",
        }
    }
}

/// The breaker refused the call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("circuit open, retry in {retry_after:?}")]
pub struct OpenError {
    /// How long until the breaker lets a probe through (zero when half-open with every probe slot taken).
    pub retry_after: Duration,
}

#[derive(Debug)]
enum Inner {
    Closed { failures: u32 },
    Open { until: Instant },
    HalfOpen { probes: u32 },
}

#[derive(Debug)]
struct Shared {
    config: BreakerConfig,
    inner: Mutex<Inner>,
    opened: AtomicU64,
}

/// A circuit breaker. Cheap to clone: clones share one state.
#[derive(Debug, Clone)]
pub struct Breaker {
    shared: Arc<Shared>,
}

/// Permission for one call. Report the outcome with [`Permit::success`] or [`Permit::failure`]; a permit dropped
/// without either counts as neither (and frees its probe slot when half-open).
#[derive(Debug)]
#[must_use = "report the call's outcome with success() or failure()"]
pub struct Permit {
    shared: Arc<Shared>,
    probe: bool,
    done: bool,
}

impl Breaker {
    pub fn new(config: BreakerConfig) -> Self {
        Self {
            shared: Arc::new(Shared {
                config,
                inner: Mutex::new(Inner::Closed { failures: 0 }),
                opened: AtomicU64::new(0),
            }),
        }
    }

    pub fn config(&self) -> &BreakerConfig {
        &self.shared.config
    }

    /// Ask to make a call.
    pub fn try_acquire(&self) -> Result<Permit, OpenError> {
        let max_probes = self.shared.config.half_open_probes.max(1);
        let mut inner = self.shared.lock();
        let now = Instant::now();
        if let Inner::Open { until } = *inner {
            if now < until {
                return Err(OpenError {
                    retry_after: until - now,
                });
            }
            *inner = Inner::HalfOpen { probes: 0 };
        }
        let probe = match &mut *inner {
            Inner::Closed { .. } => false,
            Inner::HalfOpen { probes } if *probes < max_probes => {
                *probes += 1;
                true
            }
            Inner::HalfOpen { .. } => {
                return Err(OpenError {
                    retry_after: Duration::ZERO,
                });
            }
            Inner::Open { .. } => {
                unreachable!("an expired open state was moved to half-open above")
            }
        };
        drop(inner);
        Ok(Permit {
            shared: self.shared.clone(),
            probe,
            done: false,
        })
    }

    /// The current state (an open breaker whose time is up reports half-open).
    pub fn state(&self) -> BreakerState {
        match *self.shared.lock() {
            Inner::Closed { .. } => BreakerState::Closed,
            Inner::HalfOpen { .. } => BreakerState::HalfOpen,
            Inner::Open { until } if Instant::now() >= until => BreakerState::HalfOpen,
            Inner::Open { .. } => BreakerState::Open,
        }
    }

    /// The state as a metrics code: 0 closed, 1 half-open, 2 open.
    pub fn state_code(&self) -> u8 {
        self.state().code()
    }

    /// How many times the breaker has opened.
    pub fn opened_total(&self) -> u64 {
        self.shared.opened.load(Ordering::Relaxed)
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        // No invariant can be broken half-way by a panic: every update is a single assignment.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn open(&self, inner: &mut Inner) {
        *inner = Inner::Open {
            until: Instant::now() + self.config.open_for,
        };
        self.opened.fetch_add(1, Ordering::Relaxed);
    }
}

impl Permit {
    /// The call succeeded: a probe closes the breaker, and a closed breaker forgets its failures.
    pub fn success(mut self) {
        self.done = true;
        let mut inner = self.shared.lock();
        match &mut *inner {
            Inner::Closed { failures } => *failures = 0,
            Inner::HalfOpen { .. } if self.probe => *inner = Inner::Closed { failures: 0 },
            // A call admitted before the breaker opened, finishing late: it proves little either way.
            _ => {}
        }
    }

    /// The call failed: a probe reopens the breaker; the `failure_threshold`-th consecutive failure opens it.
    pub fn failure(mut self) {
        self.done = true;
        let threshold = self.shared.config.failure_threshold.max(1);
        let mut inner = self.shared.lock();
        match &mut *inner {
            Inner::Closed { failures } => {
                *failures += 1;
                if *failures >= threshold {
                    self.shared.open(&mut inner);
                }
            }
            Inner::HalfOpen { .. } if self.probe => self.shared.open(&mut inner),
            _ => {}
        }
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        if self.done || !self.probe {
            return;
        }
        if let Inner::HalfOpen { probes } = &mut *self.shared.lock() {
            *probes = probes.saturating_sub(1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn breaker(threshold: u32, open_ms: u64, probes: u32) -> Breaker {
        Breaker::new(BreakerConfig {
            failure_threshold: threshold,
            open_for: Duration::from_millis(open_ms),
            half_open_probes: probes,
        })
    }

    fn fail(b: &Breaker, n: u32) {
        for _ in 0..n {
            b.try_acquire().expect("admitted").failure();
        }
    }

    #[test]
    fn defaults() {
        let c = BreakerConfig::default();
        assert_eq!(
            (c.failure_threshold, c.open_for, c.half_open_probes),
            (5, Duration::from_secs(5), 1)
        );
        let b = Breaker::new(c);
        assert_eq!(
            (b.state(), b.state_code(), b.opened_total()),
            (BreakerState::Closed, 0, 0)
        );
    }

    #[test]
    fn opens_after_n_consecutive_failures() {
        let b = breaker(3, 10_000, 1);
        fail(&b, 2);
        assert_eq!(b.state(), BreakerState::Closed);
        fail(&b, 1);
        assert_eq!((b.state(), b.state_code()), (BreakerState::Open, 2));
        assert_eq!(b.opened_total(), 1);
        assert!(b.try_acquire().is_err());
    }

    #[test]
    fn success_resets_the_failure_count() {
        let b = breaker(3, 10_000, 1);
        fail(&b, 2);
        b.try_acquire().unwrap().success();
        fail(&b, 2);
        assert_eq!(b.state(), BreakerState::Closed);
        fail(&b, 1);
        assert_eq!(b.state(), BreakerState::Open);
    }

    #[test]
    fn a_dropped_permit_counts_as_neither() {
        let b = breaker(2, 10_000, 1);
        fail(&b, 1);
        drop(b.try_acquire().unwrap());
        assert_eq!(b.state(), BreakerState::Closed);
        fail(&b, 1);
        assert_eq!(b.state(), BreakerState::Open);
    }

    #[test]
    fn open_rejects_with_a_decreasing_retry_after() {
        let b = breaker(1, 500, 1);
        fail(&b, 1);
        let first = b.try_acquire().unwrap_err().retry_after;
        assert!(first <= Duration::from_millis(500) && first > Duration::from_millis(300));
        std::thread::sleep(Duration::from_millis(30));
        let second = b.try_acquire().unwrap_err().retry_after;
        assert!(second < first, "{second:?} < {first:?}");
    }

    #[test]
    fn half_open_lets_limited_probes_through() {
        let b = breaker(1, 20, 2);
        fail(&b, 1);
        std::thread::sleep(Duration::from_millis(30));
        assert_eq!((b.state(), b.state_code()), (BreakerState::HalfOpen, 1));
        let p1 = b.try_acquire().expect("first probe");
        let p2 = b.try_acquire().expect("second probe");
        let refused = b.try_acquire().unwrap_err();
        assert_eq!(refused.retry_after, Duration::ZERO);
        // A probe dropped without an outcome frees its slot.
        drop(p1);
        let p3 = b.try_acquire().expect("slot freed");
        assert!(b.try_acquire().is_err());
        drop((p2, p3));
        assert_eq!(b.state(), BreakerState::HalfOpen);
    }

    #[test]
    fn probe_success_closes() {
        let b = breaker(2, 20, 1);
        fail(&b, 2);
        std::thread::sleep(Duration::from_millis(30));
        b.try_acquire().expect("probe").success();
        assert_eq!(b.state(), BreakerState::Closed);
        // Closed again with a fresh count: one failure does not reopen it.
        fail(&b, 1);
        assert_eq!(b.state(), BreakerState::Closed);
        assert_eq!(b.opened_total(), 1);
    }

    #[test]
    fn probe_failure_reopens() {
        let b = breaker(5, 20, 1);
        fail(&b, 5);
        std::thread::sleep(Duration::from_millis(30));
        b.try_acquire().expect("probe").failure();
        assert_eq!(b.state(), BreakerState::Open);
        assert_eq!(b.opened_total(), 2);
        let retry = b.try_acquire().unwrap_err().retry_after;
        assert!(retry > Duration::from_millis(10));
    }

    #[test]
    fn late_outcomes_of_calls_admitted_while_closed_do_not_flip_a_probe() {
        let b = breaker(1, 20, 1);
        let early = b.try_acquire().unwrap();
        fail(&b, 1);
        std::thread::sleep(Duration::from_millis(30));
        let probe = b.try_acquire().expect("probe");
        early.success();
        assert_eq!(b.state(), BreakerState::HalfOpen);
        probe.success();
        assert_eq!(b.state(), BreakerState::Closed);
    }

    #[test]
    fn shared_between_threads() {
        let b = breaker(1000, 10_000, 1);
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let b = b.clone();
                std::thread::spawn(move || fail(&b, 250))
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!((b.state(), b.opened_total()), (BreakerState::Open, 1));
    }
}
