//! The readiness checks every role's `/readyz` is made of: one dependency's real round trip within a budget,
//! and the rule that decides what a failed check means.
//!
//! A node is *ready* when it can serve its traffic. Redis carries all of it (submissions, claims, events), so a
//! Redis check that fails makes the node unready (503). PostgreSQL holds the record: while it is down jobs keep
//! running and submissions keep being accepted (the event log holds what the recorder has not written), so a
//! failed PostgreSQL check leaves the node ready and *degraded*: 200, `"status": "degraded"`, the check false in
//! the body, `ferry_dependency_up{dependency="postgres"} 0` and the `FerryPostgresDown` alert. A load balancer
//! following `/readyz` therefore keeps every gateway in rotation through a database outage.

use std::future::Future;
use std::time::{Duration, Instant};

use prometheus::{IntGaugeVec, Opts, Registry};
use serde_json::{Value, json};

/// Whether `ping` answered within `budget`, and the check as `/readyz` reports it:
/// `{"ok", "ms", "error"}`. The error says "unavailable" (the cause is logged, not exposed) or names the budget.
pub async fn check<E: std::fmt::Display>(
    budget: Duration,
    ping: impl Future<Output = Result<(), E>>,
) -> (bool, Value) {
    let started = Instant::now();
    let (ok, error) = match tokio::time::timeout(budget, ping).await {
        Ok(Ok(())) => (true, None),
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "readiness: ping failed");
            (false, Some("unavailable".to_owned()))
        }
        Err(_) => (
            false,
            Some(format!("no answer within {} ms", budget.as_millis())),
        ),
    };
    let ms = started.elapsed().as_millis() as u64;
    (ok, json!({"ok": ok, "ms": ms, "error": error}))
}

/// What a failed check of a dependency does to readiness.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Need {
    /// The node cannot serve without it (Redis, the pub/sub canary, not draining): unready, 503.
    Required,
    /// The node serves without it, less well (PostgreSQL: the record and its history): degraded, still 200.
    Degraded,
}

/// The readiness verdict over named checks: `(ready, status)`, the status being `ready`, `degraded` (ready, a
/// [`Need::Degraded`] check failed) or `unready` (a [`Need::Required`] check failed).
pub fn verdict(checks: impl IntoIterator<Item = (Need, bool)>) -> (bool, &'static str) {
    let (mut ready, mut degraded) = (true, false);
    for (need, ok) in checks {
        match need {
            Need::Required => ready &= ok,
            Need::Degraded => degraded |= !ok,
        }
    }
    match (ready, degraded) {
        (false, _) => (false, "unready"),
        (true, true) => (true, "degraded"),
        (true, false) => (true, "ready"),
    }
}

/// `ferry_dependency_up{dependency}`: 1 when the dependency answered its last check, 0 when it did not. Set by
/// every `/readyz` and every `/metrics` scrape (which runs the round trips itself, so the gauge is as fresh as
/// the scrape even where nothing probes readiness).
#[derive(Debug, Clone)]
pub struct DependencyUp(IntGaugeVec);

impl DependencyUp {
    /// The gauge, registered in `registry` (a second registration is logged, and the gauge still works).
    pub fn register(registry: &Registry) -> Self {
        let g = IntGaugeVec::new(
            Opts::new(
                "ferry_dependency_up",
                "1 when the dependency (redis, postgres) answered the last readiness round trip, 0 when not.",
            ),
            &["dependency"],
        )
        .expect("valid metric");
        crate::metrics::register_or_log(registry, Box::new(g.clone()));
        Self(g)
    }

    pub fn set(&self, dependency: &str, up: bool) {
        self.0.with_label_values(&[dependency]).set(i64::from(up));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_degrading_check_keeps_the_node_ready() {
        use Need::*;
        assert_eq!(
            verdict([(Required, true), (Degraded, true)]),
            (true, "ready")
        );
        assert_eq!(
            verdict([(Required, true), (Degraded, false)]),
            (true, "degraded")
        );
        assert_eq!(
            verdict([(Required, false), (Degraded, true)]),
            (false, "unready")
        );
        assert_eq!(
            verdict([(Required, false), (Degraded, false)]),
            (false, "unready")
        );
        assert_eq!(verdict([]), (true, "ready"));
    }

    #[test]
    fn dependency_up_is_exported() {
        let r = Registry::new();
        let up = DependencyUp::register(&r);
        up.set("postgres", false);
        up.set("redis", true);
        let text = crate::metrics::render(&r);
        assert!(
            text.contains("ferry_dependency_up{dependency=\"postgres\"} 0"),
            "{text}"
        );
        assert!(
            text.contains("ferry_dependency_up{dependency=\"redis\"} 1"),
            "{text}"
        );
    }
}
