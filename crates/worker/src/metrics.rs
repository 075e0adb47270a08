//! The worker's Prometheus metrics (names from `docs/metrics.md`): per (queue, kind) job counters and
//! histograms, and per-queue gauges polled from [`Operations::stats`](ferry_broker::Operations::stats) every
//! [`WorkerConfig::queue_metrics_interval`](crate::WorkerConfig::queue_metrics_interval).
//!
//! Counting is cheap on the job path: each (queue, kind) pair resolves its labelled children once and caches
//! them ([`JobMetrics`]); a job carries an `Arc` to its pair's handles, so an outcome is an atomic add.
//!
//! A lease that is gone before its outcome counts ([`lease_gone`]) is told apart by asking the broker for the
//! job: cancelled by someone (`ferry_jobs_cancelled_while_running_total`, ordinary use) or lost to a reclaim
//! after missed heartbeats (`ferry_jobs_lost_total`, worth an alert).
//!
//! `ferry_job_queue_wait_seconds` is observed for first attempts only, from the job's `spec.created_at` to the
//! start of the attempt: the worker does not know when a retried job became due, and counting its backoff as
//! waiting would make failing queues look congested. A job submitted with a delay includes its delay.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use ferry_broker::Lease;
use ferry_core::{JobState, Kind, QueueName, now_ms};
use ferry_telemetry::metrics::JOB_SECONDS_BUCKETS;
use ferry_telemetry::prometheus::{
    Gauge, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, Opts,
    Registry,
};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::runtime::Core;

/// The labelled children of one (queue, kind) pair.
#[derive(Debug)]
pub(crate) struct JobMetrics {
    pub(crate) started: IntCounter,
    pub(crate) completed: IntCounter,
    pub(crate) retried: IntCounter,
    pub(crate) dead: IntCounter,
    lost: IntCounter,
    cancelled_running: IntCounter,
    pub(crate) processing: Histogram,
    pub(crate) wait: Histogram,
}

impl JobMetrics {
    /// Handles attached to no registry, for job slots made outside a worker (tests of handlers).
    pub(crate) fn detached() -> Arc<Self> {
        WorkerMetrics::new().job(
            &QueueName::parse("detached").expect("valid queue name"),
            &Kind::parse("detached").expect("valid kind"),
        )
    }

    /// An attempt starts now: count it, and for a first attempt how long it waited since creation.
    pub(crate) fn start(&self, attempt: u32, created_at_ms: u64) {
        self.started.inc();
        if attempt <= 1 {
            let waited = now_ms().saturating_sub(created_at_ms);
            self.wait.observe(waited as f64 / 1000.0);
        }
    }
}

#[derive(Debug, Clone)]
struct QueueGauges {
    depth: GaugeVec,
    active: GaugeVec,
    scheduled: GaugeVec,
    dead: GaugeVec,
    oldest: GaugeVec,
    paused: GaugeVec,
}

type Handles = HashMap<QueueName, HashMap<Kind, Arc<JobMetrics>>>;

/// Every metric of one worker.
#[derive(Debug)]
pub(crate) struct WorkerMetrics {
    started: IntCounterVec,
    completed: IntCounterVec,
    retried: IntCounterVec,
    dead: IntCounterVec,
    lost: IntCounterVec,
    cancelled_running: IntCounterVec,
    processing: HistogramVec,
    wait: HistogramVec,
    queues: QueueGauges,
    /// (queue, kind) → handles. A std mutex, held for one lookup per claimed job.
    handles: Mutex<Handles>,
    /// Set once registered: the queue poller runs only then.
    registered: AtomicBool,
    /// Bounds the job lookups of [`lease_gone`] in flight, so a mass cancel costs the broker a few lookups at a
    /// time rather than one per job at once.
    lookups: Arc<Semaphore>,
}

/// Job lookups [`lease_gone`] makes at once.
const LOOKUPS_IN_FLIGHT: usize = 8;

fn counter(name: &str, help: &str) -> IntCounterVec {
    IntCounterVec::new(Opts::new(name, help), &["queue", "kind"]).expect("valid metric")
}

fn histogram(name: &str, help: &str) -> HistogramVec {
    HistogramVec::new(
        HistogramOpts::new(name, help).buckets(JOB_SECONDS_BUCKETS.to_vec()),
        &["queue", "kind"],
    )
    .expect("valid metric")
}

fn gauge(name: &str, help: &str) -> GaugeVec {
    GaugeVec::new(Opts::new(name, help), &["queue"]).expect("valid metric")
}

impl WorkerMetrics {
    pub(crate) fn new() -> Self {
        Self {
            started: counter("ferry_jobs_started_total", "Job attempts started."),
            completed: counter(
                "ferry_jobs_completed_total",
                "Job completions the broker accepted.",
            ),
            retried: counter(
                "ferry_jobs_retried_total",
                "Failed attempts scheduled for retry.",
            ),
            dead: counter("ferry_jobs_dead_total", "Jobs dead-lettered."),
            lost: counter(
                "ferry_jobs_lost_total",
                "Attempts whose lease was lost (reclaimed after missed heartbeats): outcome discarded.",
            ),
            cancelled_running: counter(
                "ferry_jobs_cancelled_while_running_total",
                "Attempts stopped because their job was cancelled while running: outcome discarded.",
            ),
            processing: histogram(
                "ferry_job_processing_seconds",
                "Handler run time of an attempt.",
            ),
            wait: histogram(
                "ferry_job_queue_wait_seconds",
                "Job creation to the start of its first attempt.",
            ),
            queues: QueueGauges {
                depth: gauge("ferry_queue_depth", "Jobs waiting (all priorities)."),
                active: gauge("ferry_queue_active", "Jobs leased to workers."),
                scheduled: gauge(
                    "ferry_queue_scheduled",
                    "Scheduled and retrying jobs not yet due.",
                ),
                dead: gauge("ferry_queue_dead", "Dead-lettered jobs held."),
                oldest: gauge(
                    "ferry_queue_oldest_waiting_seconds",
                    "Age of the oldest waiting job (0 when none).",
                ),
                paused: gauge("ferry_queue_paused", "1 while the queue is paused."),
            },
            handles: Mutex::new(HashMap::new()),
            registered: AtomicBool::new(false),
            lookups: Arc::new(Semaphore::new(LOOKUPS_IN_FLIGHT)),
        }
    }

    /// The handles of a (queue, kind) pair, resolved on first use. Resolving creates every child, so the pair's
    /// counters show up at 0 before anything happens to them.
    pub(crate) fn job(&self, queue: &QueueName, kind: &Kind) -> Arc<JobMetrics> {
        let mut map = self.handles.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(h) = map.get(queue).and_then(|k| k.get(kind)) {
            return h.clone();
        }
        let labels = [queue.as_str(), kind.as_str()];
        let h = Arc::new(JobMetrics {
            started: self.started.with_label_values(&labels),
            completed: self.completed.with_label_values(&labels),
            retried: self.retried.with_label_values(&labels),
            dead: self.dead.with_label_values(&labels),
            lost: self.lost.with_label_values(&labels),
            cancelled_running: self.cancelled_running.with_label_values(&labels),
            processing: self.processing.with_label_values(&labels),
            wait: self.wait.with_label_values(&labels),
        });
        map.entry(queue.clone())
            .or_default()
            .insert(kind.clone(), h.clone());
        h
    }

    pub(crate) fn register(&self, r: &Registry) -> ferry_telemetry::prometheus::Result<()> {
        let q = &self.queues;
        r.register(Box::new(self.started.clone()))?;
        r.register(Box::new(self.completed.clone()))?;
        r.register(Box::new(self.retried.clone()))?;
        r.register(Box::new(self.dead.clone()))?;
        r.register(Box::new(self.lost.clone()))?;
        r.register(Box::new(self.cancelled_running.clone()))?;
        r.register(Box::new(self.processing.clone()))?;
        r.register(Box::new(self.wait.clone()))?;
        for g in [
            &q.depth,
            &q.active,
            &q.scheduled,
            &q.dead,
            &q.oldest,
            &q.paused,
        ] {
            r.register(Box::new(g.clone()))?;
        }
        self.registered.store(true, Ordering::Release);
        Ok(())
    }

    pub(crate) fn registered(&self) -> bool {
        self.registered.load(Ordering::Acquire)
    }
}

/// The lease of an attempt this worker ran is gone, so its outcome was discarded or rejected: count it as
/// cancelled while running or as lost. The broker answers both the same way (a heartbeat `false`, a
/// `Rejected`), so the job tells them apart: cancelled with no attempt after this one is a cancellation;
/// anything else (queued or active again after a reclaim, dead after one on its last attempt, or cancelled
/// only after another attempt started) a lost lease. A lookup that fails or times out counts as lost, the
/// side that gets looked at. Runs in its own task, bounded by `broker_call_timeout`, so neither the acker nor
/// a job slot waits for it.
pub(crate) fn lease_gone(core: &Core, lease: &Lease, metrics: &Arc<JobMetrics>) {
    let broker = core.broker.clone();
    let lookups = core.metrics.lookups.clone();
    let timeout = core.config.broker_call_timeout;
    let (job, attempt, metrics) = (lease.job, lease.attempt, metrics.clone());
    tokio::spawn(async move {
        // Never closed, so acquiring fails only if that changes; count the lease in any case.
        let _permit = lookups.acquire_owned().await;
        let cancelled = match tokio::time::timeout(timeout, broker.job(job)).await {
            Ok(Ok(info)) => {
                info.is_some_and(|i| i.state == JobState::Cancelled && i.attempts <= attempt)
            }
            Ok(Err(e)) => {
                tracing::debug!(%job, error = %e, "lease gone: job lookup failed; counted as lost");
                false
            }
            Err(_) => false,
        };
        if cancelled {
            metrics.cancelled_running.inc();
        } else {
            metrics.lost.inc();
        }
    });
}

/// Refresh the queue gauges of the worker's queues every `queue_metrics_interval` (at once first) until `stop`. A failed
/// poll keeps the last values.
pub(crate) async fn poll_queues(core: Arc<Core>, stop: CancellationToken) {
    let m = &core.metrics;
    // Resolved once per queue.
    let gauges: Vec<(QueueName, [Gauge; 6])> = core
        .config
        .queues
        .iter()
        .map(|queue| {
            let l = [queue.as_str()];
            let q = &m.queues;
            (
                queue.clone(),
                [
                    q.depth.with_label_values(&l),
                    q.active.with_label_values(&l),
                    q.scheduled.with_label_values(&l),
                    q.dead.with_label_values(&l),
                    q.oldest.with_label_values(&l),
                    q.paused.with_label_values(&l),
                ],
            )
        })
        .collect();
    let timeout = core.config.broker_call_timeout;
    loop {
        for (queue, g) in &gauges {
            let stats = tokio::select! {
                _ = stop.cancelled() => return,
                s = tokio::time::timeout(timeout, core.broker.stats(queue)) => s,
            };
            match stats {
                Ok(Ok(s)) => {
                    g[0].set(s.depth as f64);
                    g[1].set(s.active as f64);
                    g[2].set(s.scheduled as f64);
                    g[3].set(s.dead as f64);
                    g[4].set(s.lag_ms as f64 / 1000.0);
                    g[5].set(if s.paused { 1.0 } else { 0.0 });
                }
                Ok(Err(e)) => {
                    tracing::debug!(queue = %queue, error = %e, "queue stats poll failed")
                }
                Err(_) => tracing::debug!(queue = %queue, "queue stats poll timed out"),
            }
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(core.config.queue_metrics_interval) => {}
        }
    }
}
