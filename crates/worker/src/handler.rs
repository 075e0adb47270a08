//! What a job runs: the [`Handler`] trait, the [`JobContext`] a handler receives, the [`JobError`] that decides
//! whether a failed attempt is retried, and the [`HandlerRegistry`] that maps a job's kind to its handler.
//!
//! Handlers know nothing about leases, batching or acks: the runtime owns those. A handler only returns a
//! result or an error, reports progress, and watches [`JobContext::cancelled`].

use std::collections::BTreeMap;
use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use ferry_broker::{BrokerError, Lease, Leasing, Retry};
use ferry_core::{Job, JobId, Kind};
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use crate::WorkerError;
use crate::webhook::{WebhookConfig, WebhookHandler};

/// Why an attempt failed, and so what happens next.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JobError {
    /// Try again: after the job's backoff, or no sooner than `retry_after` (a webhook's `Retry-After`). The job
    /// is dead once its attempts are used up.
    #[error("{message}")]
    Retry {
        message: String,
        retry_after: Option<Duration>,
    },
    /// Retrying cannot help (bad payload, a 4xx answer): dead now, whatever attempts are left.
    #[error("{message}")]
    Permanent { message: String },
}

impl JobError {
    pub fn retry(message: impl Into<String>) -> Self {
        Self::Retry {
            message: message.into(),
            retry_after: None,
        }
    }

    pub fn retry_after(message: impl Into<String>, after: Duration) -> Self {
        Self::Retry {
            message: message.into(),
            retry_after: Some(after),
        }
    }

    pub fn permanent(message: impl Into<String>) -> Self {
        Self::Permanent {
            message: message.into(),
        }
    }

    pub fn message(&self) -> &str {
        match self {
            Self::Retry { message, .. } | Self::Permanent { message } => message,
        }
    }

    /// The broker's retry decision for this error.
    pub fn retry_policy(&self) -> Retry {
        match self {
            Self::Retry {
                retry_after: None, ..
            } => Retry::Backoff,
            // Round up so "retry after 1.5 s" never becomes an earlier retry than asked for.
            Self::Retry {
                retry_after: Some(d),
                ..
            } => Retry::After(d.as_nanos().div_ceil(1_000_000).min(u64::MAX as u128) as u64),
            Self::Permanent { .. } => Retry::Never,
        }
    }
}

/// A broker hiccup inside a handler (say, while reporting progress) is worth another attempt.
impl From<BrokerError> for JobError {
    fn from(e: BrokerError) -> Self {
        Self::retry(e.to_string())
    }
}

/// State shared between a running job and the runtime: the lease it runs under and its cancellation.
#[derive(Debug)]
pub(crate) struct JobSlot {
    pub(crate) lease: Lease,
    /// The metric handles of the job's (queue, kind).
    pub(crate) metrics: Arc<crate::metrics::JobMetrics>,
    pub(crate) cancel: CancellationToken,
    /// Set when the engine reported the lease gone (reclaimed after a missed heartbeat, or the job cancelled).
    /// From then on the job's outcome is discarded: the engine would reject it anyway.
    lost: AtomicBool,
}

impl JobSlot {
    pub(crate) fn new(
        lease: Lease,
        cancel: CancellationToken,
        metrics: Arc<crate::metrics::JobMetrics>,
    ) -> Self {
        Self {
            lease,
            metrics,
            cancel,
            lost: AtomicBool::new(false),
        }
    }

    pub(crate) fn mark_lost(&self) {
        self.lost.store(true, Ordering::Release);
        self.cancel.cancel();
    }

    pub(crate) fn is_lost(&self) -> bool {
        self.lost.load(Ordering::Acquire)
    }
}

/// What a handler gets for one attempt of one job.
#[derive(Clone)]
pub struct JobContext {
    job: Arc<Job>,
    slot: Arc<JobSlot>,
    /// Only for [`progress`](Self::progress), the one engine call a handler makes.
    broker: Arc<dyn Leasing>,
}

impl fmt::Debug for JobContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JobContext")
            .field("job", &self.job.id)
            .field("kind", &self.job.spec.kind)
            .field("attempt", &self.job.attempt)
            .finish_non_exhaustive()
    }
}

impl JobContext {
    /// A context outside the runtime, to drive a handler directly (tests, embedding). `cancel` is the token
    /// [`cancelled`](Self::cancelled) returns.
    pub fn new(
        job: Job,
        lease: Lease,
        broker: Arc<dyn Leasing>,
        cancel: CancellationToken,
    ) -> Self {
        Self {
            job: Arc::new(job),
            slot: Arc::new(JobSlot::new(
                lease,
                cancel,
                crate::metrics::JobMetrics::detached(),
            )),
            broker,
        }
    }

    pub(crate) fn from_slot(job: Arc<Job>, slot: Arc<JobSlot>, broker: Arc<dyn Leasing>) -> Self {
        Self { job, slot, broker }
    }

    pub fn job(&self) -> &Job {
        &self.job
    }

    pub fn id(&self) -> JobId {
        self.job.id
    }

    pub fn kind(&self) -> &Kind {
        &self.job.spec.kind
    }

    pub fn payload(&self) -> &Value {
        &self.job.spec.payload
    }

    /// Which attempt this is, from 1.
    pub fn attempt(&self) -> u32 {
        self.job.attempt
    }

    pub fn lease(&self) -> &Lease {
        &self.slot.lease
    }

    /// Fires when the job is cancelled, its lease is lost, its timeout passes, or the worker stops without
    /// waiting for it. Once it has fired the attempt's outcome is ignored, so a handler should stop soon; the
    /// runtime drops it after a short grace period.
    pub fn cancelled(&self) -> &CancellationToken {
        &self.slot.cancel
    }

    pub fn is_cancelled(&self) -> bool {
        self.slot.cancel.is_cancelled()
    }

    /// Report progress (a `job.progress` event carrying `data`). `Ok(false)` means the lease is no longer held:
    /// the job was cancelled or reclaimed, and [`cancelled`](Self::cancelled) now fires.
    pub async fn progress(&self, data: Value) -> Result<bool, BrokerError> {
        let held = self.broker.progress(&self.slot.lease, data).await?;
        if !held {
            self.slot.mark_lost();
        }
        Ok(held)
    }
}

/// Runs jobs of one or more kinds. Implementations must be cheap to share: one instance serves every job of
/// its kind, concurrently.
#[async_trait]
pub trait Handler: Send + Sync + 'static {
    async fn run(&self, ctx: JobContext) -> Result<Value, JobError>;
}

/// A handler from an async closure: `handler_fn(|ctx| async move { Ok(json!(null)) })`.
pub fn handler_fn<F, Fut>(f: F) -> FnHandler<F>
where
    F: Fn(JobContext) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<Value, JobError>> + Send + 'static,
{
    FnHandler(f)
}

/// See [`handler_fn`].
pub struct FnHandler<F>(F);

impl<F> fmt::Debug for FnHandler<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("FnHandler")
    }
}

#[async_trait]
impl<F, Fut> Handler for FnHandler<F>
where
    F: Fn(JobContext) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<Value, JobError>> + Send + 'static,
{
    async fn run(&self, ctx: JobContext) -> Result<Value, JobError> {
        (self.0)(ctx).await
    }
}

/// Kind → handler. Cheap to clone (the handlers are shared).
#[derive(Clone, Default)]
pub struct HandlerRegistry {
    handlers: BTreeMap<Kind, Arc<dyn Handler>>,
    /// One HTTP client for every webhook kind, so they share a connection pool.
    http: Option<reqwest::Client>,
}

impl fmt::Debug for HandlerRegistry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HandlerRegistry")
            .field("kinds", &self.handlers.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl HandlerRegistry {
    /// No handlers at all.
    pub fn new() -> Self {
        Self::default()
    }

    /// The built-in kinds: `ferry.noop`, `ferry.sleep`, `ferry.echo`, `ferry.fail`.
    pub fn with_builtins() -> Self {
        let mut r = Self::new();
        crate::builtins::register(&mut r);
        r
    }

    /// Add or replace the handler of `kind`.
    pub fn register(&mut self, kind: Kind, handler: impl Handler) -> &mut Self {
        self.handlers.insert(kind, Arc::new(handler));
        self
    }

    pub fn register_arc(&mut self, kind: Kind, handler: Arc<dyn Handler>) -> &mut Self {
        self.handlers.insert(kind, handler);
        self
    }

    /// Run jobs of `kind` by POSTing them to a webhook (see [`WebhookConfig`]).
    pub fn register_webhook(
        &mut self,
        kind: Kind,
        config: WebhookConfig,
    ) -> Result<&mut Self, WorkerError> {
        let client = match &self.http {
            Some(c) => c.clone(),
            None => {
                let c = reqwest::Client::builder()
                    .build()
                    .map_err(|e| WorkerError::Webhook {
                        kind: kind.to_string(),
                        message: format!("cannot build the HTTP client: {e}"),
                    })?;
                self.http = Some(c.clone());
                c
            }
        };
        let handler = WebhookHandler::new(&kind, config, client)?;
        self.handlers.insert(kind, Arc::new(handler));
        Ok(self)
    }

    pub fn get(&self, kind: &Kind) -> Option<&Arc<dyn Handler>> {
        self.handlers.get(kind)
    }

    pub fn kinds(&self) -> impl Iterator<Item = &Kind> {
        self.handlers.keys()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_map_to_retry_policies() {
        assert_eq!(JobError::retry("x").retry_policy(), Retry::Backoff);
        assert_eq!(
            JobError::retry_after("x", Duration::from_micros(1_500)).retry_policy(),
            Retry::After(2)
        );
        assert_eq!(JobError::permanent("x").retry_policy(), Retry::Never);
        assert_eq!(JobError::permanent("bad input").to_string(), "bad input");
    }

    #[test]
    fn builtins_are_registered() {
        let r = HandlerRegistry::with_builtins();
        let kinds: Vec<_> = r.kinds().map(|k| k.as_str()).collect();
        assert_eq!(
            kinds,
            ["ferry.echo", "ferry.fail", "ferry.noop", "ferry.sleep"]
        );
    }
}
