//! [`eventually`]: the one "poll until it holds" of the workspace's tests.

use std::future::Future;
use std::time::Duration;

use anyhow::{Result, bail};

/// The first pause between two checks; it doubles after each miss up to [`MAX_PAUSE`].
const FIRST_PAUSE: Duration = Duration::from_millis(10);
/// The longest pause between two checks: a condition that holds is seen at most this late, and a costly check
/// (a `psql` process, a metrics scrape) runs at most ten times a second.
const MAX_PAUSE: Duration = Duration::from_millis(100);

/// Polls `check` until it yields `Ok(Some(value))` and returns that value; after `within`, an error naming
/// `what`, how many checks ran, and the last error a check returned.
///
/// `Ok(None)` means "not yet"; an `Err` also means "not yet" (a server still starting refuses connections), and
/// is kept as the state to report. So a check that wants the failure to say what it last saw returns that as an
/// error instead of `Ok(None)`, e.g. `anyhow::ensure!(n == 3, "{n} events recorded")`. A condition on a `bool`
/// is `Ok(done.then_some(()))`.
///
/// The check runs at once, then after pauses growing from 10 ms to 100 ms. Time is tokio's clock, and the
/// check's future need not be `Send`.
pub async fn eventually<T, F, Fut>(within: Duration, what: &str, mut check: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<Option<T>>>,
{
    let deadline = tokio::time::Instant::now() + within;
    let mut pause = FIRST_PAUSE;
    let mut checks = 0u32;
    loop {
        checks += 1;
        let last_error = match check().await {
            Ok(Some(v)) => return Ok(v),
            Ok(None) => None,
            Err(e) => Some(e),
        };
        let now = tokio::time::Instant::now();
        if now >= deadline {
            match last_error {
                Some(e) => bail!(
                    "timed out after {within:?} waiting for {what} ({checks} checks; the last one said: {e:#})"
                ),
                None => bail!("timed out after {within:?} waiting for {what} ({checks} checks)"),
            }
        }
        // The last check runs at the deadline, not a pause past it.
        tokio::time::sleep(pause.min(deadline - now)).await;
        pause = (pause * 2).min(MAX_PAUSE);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn returns_the_first_value() {
        let mut n = 0;
        let v = eventually(Duration::from_secs(5), "three calls", || {
            n += 1;
            let n = n;
            async move { Ok((n == 3).then_some(n)) }
        })
        .await
        .unwrap();
        assert_eq!(v, 3);
    }

    #[tokio::test]
    async fn a_timeout_names_what_and_the_last_error() {
        let e = eventually::<(), _, _>(Duration::from_millis(50), "the answer", || async {
            anyhow::bail!("saw 41")
        })
        .await
        .unwrap_err()
        .to_string();
        assert!(e.contains("the answer"), "{e}");
        assert!(e.contains("saw 41"), "{e}");
    }

    #[tokio::test]
    async fn a_success_after_errors_is_a_success() {
        let mut n = 0;
        eventually(Duration::from_secs(5), "a recovery", || {
            n += 1;
            let n = n;
            async move {
                anyhow::ensure!(n > 2, "attempt {n}");
                Ok(Some(()))
            }
        })
        .await
        .unwrap();
    }

    #[tokio::test]
    async fn a_not_yet_after_an_error_forgets_the_error() {
        let mut n = 0;
        let e = eventually::<(), _, _>(Duration::from_millis(50), "nothing", || {
            n += 1;
            let n = n;
            async move {
                anyhow::ensure!(n > 1, "first attempt");
                Ok(None)
            }
        })
        .await
        .unwrap_err()
        .to_string();
        assert!(!e.contains("first attempt"), "{e}");
    }
}
