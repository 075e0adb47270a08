//! The readiness check every role's `/readyz` is made of: one dependency's real round trip within a budget.

use std::future::Future;
use std::time::{Duration, Instant};

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
