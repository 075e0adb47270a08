//! Per-subject HTTP rate limiting: one token bucket (governor's GCRA) per `(tenant, sub)`, so a subject's
//! requests share one budget whichever gateway route they hit. The state is per node; with N gateways behind a
//! balancer a subject may get up to N times the rate, which is the accepted trade-off for not paying a Redis
//! round trip per request.

use std::num::NonZeroU32;

use governor::clock::Clock;
use governor::{DefaultKeyedRateLimiter, Quota};

use crate::auth::Principal;
use crate::config::LimitsConfig;
use crate::error::ApiError;

/// Buckets kept before idle ones are swept: a full bucket carries no information, so dropping it is free, and
/// the sweep bounds memory when many subjects come and go.
const SWEEP_ABOVE: usize = 10_000;

type Key = (Option<String>, String);

#[derive(Debug)]
pub struct RateLimit {
    limiter: DefaultKeyedRateLimiter<Key>,
}

impl RateLimit {
    pub fn new(limits: &LimitsConfig) -> Self {
        // Zero would mean "never allow"; the config layer rejects it, this only keeps the constructor total.
        let rate = NonZeroU32::new(limits.http_rate_per_sec).unwrap_or(NonZeroU32::MIN);
        let burst = NonZeroU32::new(limits.http_burst).unwrap_or(rate);
        Self {
            limiter: DefaultKeyedRateLimiter::keyed(Quota::per_second(rate).allow_burst(burst)),
        }
    }

    /// Spend one request of `p`'s budget, or say how long to wait (at least one second, as Retry-After has
    /// whole seconds).
    pub fn check(&self, p: &Principal) -> Result<(), ApiError> {
        let key = (p.tenant.clone(), p.sub.clone());
        let outcome = self.limiter.check_key(&key);
        if self.limiter.len() > SWEEP_ABOVE {
            self.limiter.retain_recent();
        }
        outcome.map_err(|not_until| {
            let wait = not_until.wait_time_from(self.limiter.clock().now());
            ApiError::RateLimited {
                retry_after_secs: wait.as_secs_f64().ceil().max(1.0) as u64,
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::Scopes;

    #[test]
    fn burst_then_limited_per_subject() {
        let limits = LimitsConfig {
            http_rate_per_sec: 1,
            http_burst: 2,
            ..LimitsConfig::default()
        };
        let rl = RateLimit::new(&limits);
        let p = |sub: &str, tenant: Option<&str>| Principal {
            sub: sub.into(),
            tenant: tenant.map(str::to_owned),
            scopes: Scopes::default(),
            exp: 0,
        };
        let alice = p("alice", None);
        assert!(rl.check(&alice).is_ok());
        assert!(rl.check(&alice).is_ok());
        let e = rl.check(&alice).unwrap_err();
        assert_eq!(e.retry_after_secs(), Some(1));
        // Another subject, or the same name in another tenant, has its own bucket.
        assert!(rl.check(&p("bob", None)).is_ok());
        assert!(rl.check(&p("alice", Some("t"))).is_ok());
    }
}
