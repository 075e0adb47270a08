//! The reconciler: puts back jobs the durable record holds and Redis has lost.
//!
//! Redis acknowledges a write before it is on disk (`appendfsync everysec`) or on a replica (asynchronous
//! replication), so a machine crash or a failover can lose the last second of accepted jobs and transitions.
//! PostgreSQL still holds every job the recorder copied. Every `interval`, one node (whichever takes the broker
//! lease [`LEASE`] first; leader-free, like the reaper) walks the jobs whose record is not final and has not
//! moved for `grace` ([`Store::unfinished`]) and hands them to [`Housekeeping::restore`], which puts back exactly
//! those the engine does not know, atomically, and leaves the rest alone. So the lease only saves work: two passes
//! at once (a pass longer than the lease) still cannot double a job. The reconciler needs no more of the engine
//! than [`Housekeeping`] (the lease and the restore).
//!
//! The grace period keeps the pass off jobs whose record is merely behind (the recorder lags) and off the
//! in-between moments of a transition; the restore's own check is what makes it safe. This module must not
//! change job state itself: it only asks the engine.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use ferry_broker::{BrokerError, Housekeeping};
use ferry_core::{JobId, now_ms};
use tokio_util::sync::CancellationToken;

use crate::{Store, StoreError};

/// The broker lease one reconciler pass holds.
pub const LEASE: &str = "reconcile";

/// Settings of a [`Reconciler`].
#[derive(Debug, Clone)]
pub struct ReconcilerConfig {
    /// Who holds the lease (the worker's consumer name), for operators reading Redis.
    pub holder: String,
    /// Time between passes, and the lease's length. Default 60 s.
    pub interval: Duration,
    /// A job is a candidate once its record has not moved for this long. Default 5 min.
    pub grace: Duration,
    /// Candidates read and restored per round trip. Default 500.
    pub page: usize,
}

impl ReconcilerConfig {
    pub fn new(holder: impl Into<String>) -> Self {
        Self {
            holder: holder.into(),
            interval: Duration::from_secs(60),
            grace: Duration::from_secs(300),
            page: 500,
        }
    }
}

/// What the reconciler has done, for metrics and tests.
#[derive(Debug, Default)]
pub struct ReconcilerStats {
    /// Jobs put back into the engine.
    pub restored: AtomicU64,
    /// Passes run (lease taken).
    pub passes: AtomicU64,
    /// Passes that failed (retried next interval).
    pub failures: AtomicU64,
}

#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    #[error(transparent)]
    Broker(#[from] BrokerError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The reconciler of one process. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Reconciler {
    broker: Arc<dyn Housekeeping>,
    store: Arc<dyn Store>,
    config: Arc<ReconcilerConfig>,
    stats: Arc<ReconcilerStats>,
}

impl Reconciler {
    pub fn new(
        broker: Arc<dyn Housekeeping>,
        store: Arc<dyn Store>,
        config: ReconcilerConfig,
    ) -> Self {
        Self {
            broker,
            store,
            config: Arc::new(config),
            stats: Arc::default(),
        }
    }

    pub fn stats(&self) -> &Arc<ReconcilerStats> {
        &self.stats
    }

    /// Register `ferry_jobs_reconciled_total` and `ferry_reconcile_failures_total`, read at scrape time.
    pub fn register_metrics(
        &self,
        registry: &ferry_telemetry::prometheus::Registry,
    ) -> ferry_telemetry::prometheus::Result<()> {
        use ferry_telemetry::metrics::{FnCollector, FnKind};
        let s = self.stats.clone();
        registry.register(Box::new(FnCollector::single(
            "ferry_jobs_reconciled_total",
            "Jobs the durable record held and Redis had lost, put back by this node's reconciler.",
            FnKind::Counter,
            move || s.restored.load(Ordering::Relaxed) as f64,
        )?))?;
        let s = self.stats.clone();
        registry.register(Box::new(FnCollector::single(
            "ferry_reconcile_failures_total",
            "Reconciler passes that failed (retried at the next interval).",
            FnKind::Counter,
            move || s.failures.load(Ordering::Relaxed) as f64,
        )?))?;
        Ok(())
    }

    /// A pass now, then one every interval, until `shutdown`.
    pub async fn run(self, shutdown: CancellationToken) {
        tracing::info!(
            interval_ms = self.config.interval.as_millis() as u64,
            grace_ms = self.config.grace.as_millis() as u64,
            "reconciler started"
        );
        loop {
            tokio::select! {
                r = self.pass() => match r {
                    Ok(Some(0)) => tracing::debug!("reconcile pass: nothing lost"),
                    Ok(Some(n)) => tracing::warn!(restored = n, "reconcile pass: restored jobs Redis had lost"),
                    Ok(None) => tracing::debug!("reconcile pass: another node holds the lease"),
                    Err(e) => {
                        self.stats.failures.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(error = %e, "reconcile pass failed; retried at the next interval");
                    }
                },
                _ = shutdown.cancelled() => return,
            }
            tokio::select! {
                _ = tokio::time::sleep(self.config.interval) => {}
                _ = shutdown.cancelled() => return,
            }
        }
    }

    /// One pass: `None` when another node holds the lease, else how many jobs were restored.
    pub async fn pass(&self) -> Result<Option<u64>, ReconcileError> {
        let c = &self.config;
        if !self.broker.try_lease(LEASE, &c.holder, c.interval).await? {
            return Ok(None);
        }
        self.stats.passes.fetch_add(1, Ordering::Relaxed);
        let before =
            now_ms().saturating_sub(u64::try_from(c.grace.as_millis()).unwrap_or(u64::MAX));
        let page = c.page.max(1);
        let mut after: Option<JobId> = None;
        let mut restored = 0;
        loop {
            let jobs = self.store.unfinished(before, after, page).await?;
            let Some(last) = jobs.last() else { break };
            after = Some(last.id);
            let full = jobs.len() == page;
            let ids: Vec<(JobId, &'static str)> =
                jobs.iter().map(|j| (j.id, j.state.as_str())).collect();
            let done = self.broker.restore(jobs).await?;
            for ((id, state), put_back) in ids.into_iter().zip(done) {
                if put_back {
                    restored += 1;
                    self.stats.restored.fetch_add(1, Ordering::Relaxed);
                    tracing::info!(job = %id, recorded_state = %state, "restored a job Redis had lost");
                }
            }
            if !full {
                break;
            }
        }
        Ok(Some(restored))
    }
}
