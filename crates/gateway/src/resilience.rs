//! How the gateway stays responsive when a dependency is not: every broker (Redis) call made for a request goes
//! through [`Resilience::broker`] and every store (PostgreSQL) call through [`Resilience::store`], which bound
//! the call with a timeout and put a circuit breaker ([`ferry_core::breaker`]) in front of it. A call refused by
//! an open breaker, timed out, or failed as unavailable is answered 503 `unavailable` with `Retry-After`; only
//! those outcomes count as failures of the breaker (an invalid request or an internal error proves the
//! dependency answered).
//!
//! It also sheds load: a background task ([`Resilience::poll_backlog`]) watches how far the recorder is behind
//! the event log, and above the high-water mark new submissions are refused with 503 `overloaded`
//! ([`Resilience::admit_submission`]) while everything else keeps working.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use ferry_broker::{BrokerError, EventLog};
use ferry_core::breaker::{Breaker, BreakerState};
use ferry_store::StoreError;
use tokio_util::sync::CancellationToken;

use crate::config::ResilienceConfig;
use crate::error::ApiError;

/// What the gateway tells a client while Redis is unreachable (no internals).
const BROKER_DOWN: &str = "the job store is unavailable, retry later";
/// The same for the database.
const STORE_DOWN: &str = "the job database is unavailable, retry later";

/// The breakers, the last known backlog and the shedding counters, shared by every handler.
#[derive(Debug)]
pub struct Resilience {
    pub config: ResilienceConfig,
    /// The breaker in front of the broker (`dependency="redis"` in metrics).
    pub redis: Breaker,
    /// The breaker in front of the store (`dependency="postgres"`).
    pub postgres: Breaker,
    backlog: AtomicU64,
    shed: AtomicU64,
    /// `ferry_dependency_call_seconds{dependency}`: every guarded call that reached the dependency.
    call_seconds: ferry_telemetry::prometheus::HistogramVec,
}

/// An error of a dependency call: what the client sees, and whether it says the dependency is unavailable (a
/// breaker failure).
pub trait DependencyError {
    fn classify(self) -> (ApiError, bool);
}

impl DependencyError for BrokerError {
    fn classify(self) -> (ApiError, bool) {
        let down = matches!(self, BrokerError::Unavailable(_));
        (self.into(), down)
    }
}

impl DependencyError for StoreError {
    fn classify(self) -> (ApiError, bool) {
        let down = matches!(self, StoreError::Unavailable(_));
        (self.into(), down)
    }
}

/// For calls that already translate their errors (the hub's publish).
impl DependencyError for ApiError {
    fn classify(self) -> (ApiError, bool) {
        let down = matches!(self, ApiError::Unavailable { .. });
        (self, down)
    }
}

/// Whole seconds for `Retry-After`, rounded up, at least 1.
fn retry_secs(d: Duration) -> u64 {
    d.as_secs_f64().ceil().max(1.0) as u64
}

async fn guarded<T, E: DependencyError>(
    call_seconds: &ferry_telemetry::prometheus::HistogramVec,
    breaker: &Breaker,
    timeout: Duration,
    dependency: &'static str,
    detail: &'static str,
    fut: impl Future<Output = Result<T, E>>,
) -> Result<T, ApiError> {
    let unavailable = |retry_after_secs| ApiError::Unavailable {
        detail: detail.into(),
        retry_after_secs,
    };
    let permit = breaker
        .try_acquire()
        .map_err(|open| unavailable(retry_secs(open.retry_after)))?;
    // The redis client may wait for a reconnect for a long time: the timeout drops the call instead.
    let started = std::time::Instant::now();
    let outcome = tokio::time::timeout(timeout, fut).await;
    call_seconds
        .with_label_values(&[dependency])
        .observe(started.elapsed().as_secs_f64());
    let failed = |permit: ferry_core::breaker::Permit| {
        permit.failure();
        // When this failure opened the breaker, clients may as well wait until it lets a probe through.
        let secs = if breaker.state() == BreakerState::Open {
            retry_secs(breaker.config().open_for)
        } else {
            1
        };
        unavailable(secs)
    };
    match outcome {
        Ok(Ok(v)) => {
            permit.success();
            Ok(v)
        }
        Ok(Err(e)) => match e.classify() {
            (_, true) => Err(failed(permit)),
            (e, false) => {
                // The dependency answered, so it is up.
                permit.success();
                Err(e)
            }
        },
        Err(_) => {
            tracing::warn!(
                dependency,
                timeout_ms = timeout.as_millis() as u64,
                "dependency call timed out"
            );
            Err(failed(permit))
        }
    }
}

impl Resilience {
    pub fn new(config: ResilienceConfig) -> Arc<Self> {
        Arc::new(Self {
            redis: Breaker::new(config.broker_breaker),
            postgres: Breaker::new(config.store_breaker),
            config,
            backlog: AtomicU64::new(0),
            shed: AtomicU64::new(0),
            call_seconds: ferry_telemetry::prometheus::HistogramVec::new(
                ferry_telemetry::prometheus::HistogramOpts::new(
                    "ferry_dependency_call_seconds",
                    "Latency of Redis / PostgreSQL calls made for requests (timeouts included).",
                )
                .buckets(ferry_telemetry::metrics::SECONDS_BUCKETS.to_vec()),
                &["dependency"],
            )
            .expect("valid metric"),
        })
    }

    /// Run one broker call with the timeout and the Redis breaker.
    pub async fn broker<T, E: DependencyError>(
        &self,
        fut: impl Future<Output = Result<T, E>>,
    ) -> Result<T, ApiError> {
        guarded(
            &self.call_seconds,
            &self.redis,
            self.config.broker_timeout,
            "redis",
            BROKER_DOWN,
            fut,
        )
        .await
    }

    /// Run one store call with the timeout and the PostgreSQL breaker.
    pub async fn store<T, E: DependencyError>(
        &self,
        fut: impl Future<Output = Result<T, E>>,
    ) -> Result<T, ApiError> {
        guarded(
            &self.call_seconds,
            &self.postgres,
            self.config.store_timeout,
            "postgres",
            STORE_DOWN,
            fut,
        )
        .await
    }

    fn high_water(&self) -> Option<u64> {
        self.config.backlog_high_water.filter(|&n| n > 0)
    }

    /// The last backlog the poller saw.
    pub fn backlog(&self) -> u64 {
        self.backlog.load(Ordering::Relaxed)
    }

    /// `Err(Overloaded)` while the backlog is above the high-water mark: called before every new submission.
    pub fn admit_submission(&self) -> Result<(), ApiError> {
        let Some(mark) = self.high_water() else {
            return Ok(());
        };
        let backlog = self.backlog();
        if backlog <= mark {
            return Ok(());
        }
        self.shed.fetch_add(1, Ordering::Relaxed);
        Err(ApiError::Overloaded {
            detail: format!(
                "not accepting new jobs: the event log backlog is {backlog} entries, above the high-water mark of \
                 {mark}; retry later"
            ),
            retry_after_secs: retry_secs(self.config.backlog_poll),
        })
    }

    /// Poll the recorder's backlog every `backlog_poll` until `shutdown` (at once when shedding is disabled). A
    /// failed or timed-out poll keeps the last known value.
    pub async fn poll_backlog(
        self: Arc<Self>,
        broker: Arc<dyn EventLog>,
        shutdown: CancellationToken,
    ) {
        if self.high_water().is_none() {
            return;
        }
        let every = self.config.backlog_poll.max(Duration::from_millis(10));
        loop {
            let poll = broker.log_backlog(ferry_broker::RECORDER_GROUP);
            tokio::select! {
                _ = shutdown.cancelled() => return,
                r = tokio::time::timeout(self.config.broker_timeout, poll) => match r {
                    Ok(Ok(n)) => self.backlog.store(n, Ordering::Relaxed),
                    Ok(Err(e)) => tracing::debug!(error = %e, "event log backlog poll failed"),
                    Err(_) => tracing::debug!("event log backlog poll timed out"),
                },
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(every) => {}
            }
        }
    }

    /// Breaker, shedding and dependency latency metrics. The PostgreSQL breaker is listed only when the gateway
    /// has a store.
    pub fn metric_families(
        &self,
        with_store: bool,
    ) -> Vec<ferry_telemetry::prometheus::proto::MetricFamily> {
        use ferry_telemetry::metrics::{FnCollector, FnKind};
        use ferry_telemetry::prometheus::core::Collector;
        let mut breakers = vec![("redis", self.redis.clone())];
        if with_store {
            breakers.push(("postgres", self.postgres.clone()));
        }
        let states: Vec<_> = breakers
            .iter()
            .map(|(d, b)| (vec![(*d).to_owned()], f64::from(b.state_code())))
            .collect();
        let opened: Vec<_> = breakers
            .iter()
            .map(|(d, b)| (vec![(*d).to_owned()], b.opened_total() as f64))
            .collect();
        let backlog = self.backlog() as f64;
        let shed = self.shed.load(Ordering::Relaxed) as f64;
        let collectors = [
            FnCollector::new(
                "ferry_breaker_state",
                "Circuit breaker state by dependency: 0 closed, 1 half-open, 2 open.",
                FnKind::Gauge,
                &["dependency"],
                move |out| out.extend(states.iter().cloned()),
            ),
            FnCollector::new(
                "ferry_breaker_opened_total",
                "Times the circuit breaker opened, by dependency.",
                FnKind::Counter,
                &["dependency"],
                move |out| out.extend(opened.iter().cloned()),
            ),
            FnCollector::single(
                "ferry_event_backlog",
                "Event log entries the recorder has not acknowledged yet (last poll).",
                FnKind::Gauge,
                move || backlog,
            ),
            FnCollector::single(
                "ferry_submissions_shed_total",
                "Submissions refused because the event log backlog was too high.",
                FnKind::Counter,
                move || shed,
            ),
        ];
        let mut out: Vec<_> = collectors
            .into_iter()
            .flatten()
            .flat_map(|c| c.collect())
            .collect();
        out.extend(self.call_seconds.collect());
        out
    }

    /// [`Resilience::metric_families`] in the Prometheus text format.
    pub fn render_metrics(&self, with_store: bool) -> String {
        ferry_telemetry::metrics::render_families(&self.metric_families(with_store))
    }
}

#[cfg(test)]
mod tests {
    use ferry_core::breaker::BreakerConfig;

    use super::*;

    fn resilience(timeout_ms: u64, threshold: u32) -> Arc<Resilience> {
        Resilience::new(ResilienceConfig {
            broker_timeout: Duration::from_millis(timeout_ms),
            broker_breaker: BreakerConfig {
                failure_threshold: threshold,
                open_for: Duration::from_millis(1500),
                half_open_probes: 1,
            },
            backlog_high_water: Some(10),
            ..ResilienceConfig::default()
        })
    }

    #[tokio::test]
    async fn timeouts_and_unavailable_open_the_breaker_but_invalid_does_not() {
        let r = resilience(20, 2);
        let invalid = || async {
            Err::<(), _>(BrokerError::Invalid(ferry_core::ValidationError::field(
                "x", "bad",
            )))
        };
        for _ in 0..3 {
            assert_eq!(r.broker(invalid()).await.unwrap_err().status(), 400);
        }
        assert_eq!(r.redis.state(), BreakerState::Closed);
        let e = r
            .broker(std::future::pending::<Result<(), BrokerError>>())
            .await
            .unwrap_err();
        assert_eq!((e.status().as_u16(), e.retry_after_secs()), (503, Some(1)));
        let e = r
            .broker(async { Err::<(), _>(BrokerError::Unavailable("refused".into())) })
            .await
            .unwrap_err();
        // This failure opened the breaker: retry once it lets a probe through.
        assert_eq!(e.retry_after_secs(), Some(2));
        assert_eq!(r.redis.state(), BreakerState::Open);
        // Open: refused without calling.
        let e = r
            .broker(async { Ok::<_, BrokerError>(()) })
            .await
            .unwrap_err();
        assert_eq!((e.status().as_u16(), e.retry_after_secs()), (503, Some(2)));
        assert!(
            r.render_metrics(false)
                .contains("ferry_breaker_state{dependency=\"redis\"} 2")
        );
        assert!(
            r.render_metrics(false)
                .contains("ferry_breaker_opened_total{dependency=\"redis\"} 1")
        );
    }

    #[test]
    fn sheds_above_the_high_water_mark_only() {
        let r = resilience(20, 2);
        r.backlog.store(10, Ordering::Relaxed);
        assert!(r.admit_submission().is_ok());
        r.backlog.store(11, Ordering::Relaxed);
        let e = r.admit_submission().unwrap_err();
        assert_eq!(e.problem()["type"], "urn:ferry:problem:overloaded");
        assert!(e.to_string().contains("11") && e.to_string().contains("10"));
        let text = r.render_metrics(true);
        assert!(text.contains("ferry_submissions_shed_total 1"), "{text}");
        assert!(text.contains("ferry_event_backlog 11"), "{text}");
        assert!(
            text.contains("ferry_breaker_state{dependency=\"postgres\"} 0"),
            "{text}"
        );
        let off = Resilience::new(ResilienceConfig {
            backlog_high_water: Some(0),
            ..ResilienceConfig::default()
        });
        off.backlog.store(u64::MAX, Ordering::Relaxed);
        assert!(off.admit_submission().is_ok());
    }
}
