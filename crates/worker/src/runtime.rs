//! The worker itself: per-queue claim loops bounded by a semaphore, one task per running job, one heartbeat
//! task for every lease held, the acker, the scheduler, and the drain that ties them together on shutdown.
//!
//! Life of a job here: the claim loop takes a concurrency permit, claims, and spawns the job's task with the
//! permit; the task registers the lease in the in-flight map (so it is heartbeated), runs the handler under
//! its timeout and cancellation, and hands the outcome to the acker; the acker reports the outcome and removes
//! the lease from the map. A failure or release gives its permit back at hand-over; a completion's permit rides
//! with it, and the acker's completion call leases the next job into it (or drops it if none was ready). So a
//! permit is held from claim to ack, and the number of jobs a worker holds per queue never exceeds that queue's
//! concurrency, whatever the broker does.

use std::collections::HashMap;
use std::fmt;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use ferry_broker::{Broker, Lease, Leased, Retry};
use ferry_core::{Job, JobId, QueueName};
use futures::FutureExt;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::acker::{self, Ack, AckOp};
use crate::handler::JobSlot;
use crate::retry::{Health, backoff};
use crate::{HandlerRegistry, JobContext, WorkerConfig, WorkerError};

/// Most claim loops per queue (each may hold a blocking connection while the queue is empty).
const MAX_CLAIM_LOOPS: usize = 8;

/// Most leases sent in one heartbeat call; a worker holding more sends several calls per round.
const HEARTBEAT_CHUNK: usize = 1000;

/// A claim that comes back empty faster than this is treated as "no waiting happened" (a zero `claim_wait`,
/// or a spurious wake-up), and the loop pauses briefly instead of spinning on the broker.
const MIN_EMPTY_CLAIM: Duration = Duration::from_millis(2);
const EMPTY_CLAIM_PAUSE: Duration = Duration::from_millis(10);

/// A worker, ready to [`run`](Worker::run).
#[derive(Debug)]
pub struct Worker {
    core: Arc<Core>,
}

/// What the parts of a running worker share.
pub(crate) struct Core {
    pub(crate) broker: Arc<dyn Broker>,
    pub(crate) registry: HandlerRegistry,
    pub(crate) config: WorkerConfig,
    pub(crate) consumer: Arc<str>,
    /// One semaphore per queue, sized by its concurrency.
    slots: HashMap<QueueName, Arc<Semaphore>>,
    pub(crate) inflight: InFlight,
    pub(crate) counters: Counters,
    pub(crate) metrics: crate::metrics::WorkerMetrics,
    /// Cancelled once shutdown begins; set by `run`.
    draining: CancellationToken,
}

impl fmt::Debug for Core {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Core")
            .field("consumer", &self.consumer)
            .field("queues", &self.config.queues)
            .field("in_flight", &self.inflight.len())
            .finish_non_exhaustive()
    }
}

impl Core {
    pub(crate) fn draining(&self) -> bool {
        self.draining.is_cancelled()
    }
}

/// Leases currently held by this worker, keyed by job and lease token (the same job can be held twice in a
/// row under different leases if it was reclaimed and claimed again by us while a stale attempt still ran).
#[derive(Debug, Default)]
pub(crate) struct InFlight {
    // A std mutex: every critical section is a map operation, never held across an await.
    map: Mutex<HashMap<(JobId, String), Arc<JobSlot>>>,
}

impl InFlight {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<(JobId, String), Arc<JobSlot>>> {
        // A panic cannot leave the map half-updated (each operation is one call), so poisoning is ignored.
        self.map.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn insert(&self, slot: Arc<JobSlot>) {
        let key = (slot.lease.job, slot.lease.token.clone());
        self.lock().insert(key, slot);
    }

    pub(crate) fn remove(&self, lease: &Lease) {
        self.lock().remove(&(lease.job, lease.token.clone()));
    }

    fn snapshot(&self) -> Vec<Arc<JobSlot>> {
        self.lock()
            .values()
            .filter(|s| !s.is_lost())
            .cloned()
            .collect()
    }

    pub(crate) fn len(&self) -> usize {
        self.lock().len()
    }
}

/// Running totals, for the drain report and for monitoring.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    claimed: AtomicU64,
    completed: AtomicU64,
    failed: AtomicU64,
    released: AtomicU64,
    lost: AtomicU64,
    undelivered: AtomicU64,
    completed_draining: AtomicU64,
    failed_draining: AtomicU64,
}

impl Counters {
    fn add(c: &AtomicU64, n: usize) {
        c.fetch_add(n as u64, Ordering::Relaxed);
    }
    pub(crate) fn completed(&self, draining: bool) {
        Self::add(&self.completed, 1);
        if draining {
            Self::add(&self.completed_draining, 1);
        }
    }
    pub(crate) fn failed(&self, draining: bool) {
        Self::add(&self.failed, 1);
        if draining {
            Self::add(&self.failed_draining, 1);
        }
    }
    pub(crate) fn released(&self, n: usize) {
        Self::add(&self.released, n);
    }
    pub(crate) fn lost(&self, n: usize) {
        Self::add(&self.lost, n);
    }
    pub(crate) fn undelivered(&self, n: usize) {
        Self::add(&self.undelivered, n);
    }
    fn snapshot(&self) -> WorkerCounters {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        WorkerCounters {
            claimed: get(&self.claimed),
            completed: get(&self.completed),
            failed: get(&self.failed),
            released: get(&self.released),
            lost: get(&self.lost),
            undelivered: get(&self.undelivered),
        }
    }
}

/// Totals since the worker was built.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WorkerCounters {
    /// Jobs leased from the broker.
    pub claimed: u64,
    /// Completions the broker accepted.
    pub completed: u64,
    /// Failures the broker accepted (retrying or dead).
    pub failed: u64,
    /// Leases handed back (drain).
    pub released: u64,
    /// Jobs whose lease was gone by the time their outcome arrived (cancelled, or reclaimed after missed
    /// heartbeats): the outcome was discarded or rejected.
    pub lost: u64,
    /// Outcomes given up because the broker stayed unreachable; those jobs are redelivered.
    pub undelivered: u64,
}

/// What the drain did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DrainReport {
    /// Jobs that completed after shutdown was requested.
    pub completed_during_drain: u64,
    /// Jobs whose attempt failed (and were retried or dead-lettered) after shutdown was requested.
    pub failed_during_drain: u64,
    /// Leases handed back for immediate pickup by another worker.
    pub released: u64,
    /// Outcomes that could not be delivered before the shutdown deadline; their jobs are redelivered once
    /// their leases expire.
    pub undelivered: u64,
    /// True when `drain_timeout` passed with jobs still running.
    pub timed_out: bool,
}

/// A read-only view of a worker, usable while it runs (tests, metrics).
#[derive(Debug, Clone)]
pub struct WorkerMonitor {
    core: Arc<Core>,
}

impl WorkerMonitor {
    /// This worker's consumer name in the broker.
    pub fn consumer(&self) -> &str {
        &self.core.consumer
    }

    /// Leases held: jobs running or waiting for their outcome to be delivered.
    pub fn in_flight(&self) -> usize {
        self.core.inflight.len()
    }

    /// Concurrency slots of `queue` taken right now (running jobs, undelivered outcomes, and slots reserved by
    /// a claim call in progress). `None` for a queue the worker does not serve.
    pub fn busy_slots(&self, queue: &QueueName) -> Option<usize> {
        let sem = self.core.slots.get(queue)?;
        Some(self.core.config.concurrency_of(queue) - sem.available_permits())
    }

    pub fn counters(&self) -> WorkerCounters {
        self.core.counters.snapshot()
    }

    /// True from the moment shutdown was requested (the drain started): the worker claims no more work.
    pub fn draining(&self) -> bool {
        self.core.draining()
    }

    /// The leases held right now, oldest attempt first by job id: what a shutdown deadline reports as still
    /// running.
    pub fn running(&self) -> Vec<RunningJob> {
        let mut jobs: Vec<RunningJob> = self
            .core
            .inflight
            .snapshot()
            .iter()
            .map(|s| RunningJob {
                id: s.lease.job,
                queue: s.lease.queue.clone(),
                attempt: s.lease.attempt,
            })
            .collect();
        jobs.sort_by_key(|j| j.id);
        jobs
    }
}

/// A job this worker holds a lease for (see [`WorkerMonitor::running`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunningJob {
    pub id: JobId,
    pub queue: QueueName,
    pub attempt: u32,
}

impl fmt::Display for RunningJob {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({}, attempt {})", self.id, self.queue, self.attempt)
    }
}

/// What one run shares with its claim loops and job tasks. Dropping the last one closes the acker's channel
/// (the acker holds it weakly, to start the jobs its completion calls lease).
pub(crate) struct RunCtx {
    core: Arc<Core>,
    shutdown: CancellationToken,
    /// Cancelled when the drain timeout passes: every running job's token is a child of it.
    force: CancellationToken,
    acks: mpsc::Sender<Ack>,
    jobs: TaskTracker,
}

impl Worker {
    /// Check `config` and build the worker. Nothing is contacted until [`run`](Self::run).
    pub fn new(
        broker: Arc<dyn Broker>,
        registry: HandlerRegistry,
        config: WorkerConfig,
    ) -> Result<Self, WorkerError> {
        config.validate()?;
        let consumer: Arc<str> = config
            .consumer
            .clone()
            .unwrap_or_else(default_consumer)
            .into();
        let slots = config
            .queues
            .iter()
            .map(|q| {
                (
                    q.clone(),
                    Arc::new(Semaphore::new(config.concurrency_of(q))),
                )
            })
            .collect();
        Ok(Self {
            core: Arc::new(Core {
                broker,
                registry,
                config,
                consumer,
                slots,
                inflight: InFlight::default(),
                counters: Counters::default(),
                metrics: crate::metrics::WorkerMetrics::new(),
                draining: CancellationToken::new(),
            }),
        })
    }

    /// Register this worker's metrics (`ferry_jobs_*`, `ferry_job_*`, `ferry_queue_*`) in `registry`; the queue
    /// gauges are then polled while the worker runs. Call before [`run`](Self::run), at most once per registry.
    pub fn register_metrics(
        &self,
        registry: &ferry_telemetry::prometheus::Registry,
    ) -> Result<(), ferry_telemetry::prometheus::Error> {
        self.core.metrics.register(registry)
    }

    pub fn monitor(&self) -> WorkerMonitor {
        WorkerMonitor {
            core: self.core.clone(),
        }
    }

    /// Work until `shutdown` is cancelled, then drain: stop claiming, let in-flight jobs finish for up to
    /// `drain_timeout`, cancel and release the rest, deliver the outstanding outcomes, and report.
    ///
    /// Broker outages never end this function: every loop logs and retries with capped backoff.
    pub async fn run(self, shutdown: CancellationToken) -> Result<DrainReport, WorkerError> {
        let core = self.core;
        let cfg = &core.config;
        let abort = CancellationToken::new();
        let heartbeat_stop = CancellationToken::new();
        // Bounded: a job task waits here for room before it frees its concurrency slot, so a slow broker slows
        // the worker down instead of piling up outcomes.
        let (ack_tx, ack_rx) = mpsc::channel(cfg.ack_batch_size.saturating_mul(2).max(16));
        let jobs = TaskTracker::new();
        let run = Arc::new(RunCtx {
            core: core.clone(),
            shutdown: shutdown.clone(),
            force: CancellationToken::new(),
            acks: ack_tx,
            jobs: jobs.clone(),
        });

        let acker = tokio::spawn(acker::run(
            core.clone(),
            ack_rx,
            abort.clone(),
            Arc::downgrade(&run),
        ));
        let heartbeat = tokio::spawn(heartbeat_loop(core.clone(), heartbeat_stop.clone()));
        let queue_poll = core.metrics.registered().then(|| {
            tokio::spawn(crate::metrics::poll_queues(
                core.clone(),
                heartbeat_stop.clone(),
            ))
        });
        let scheduler = cfg
            .run_scheduler
            .then(|| tokio::spawn(crate::scheduler::run(core.clone(), shutdown.clone())));
        // Several claim loops per queue when the concurrency is larger than a batch, so that one claim's round
        // trip does not cap the queue's throughput at batch_size per round trip.
        let claimers: Vec<_> = cfg
            .queues
            .iter()
            .flat_map(|q| {
                let loops = cfg
                    .concurrency_of(q)
                    .div_ceil(cfg.batch_size)
                    .clamp(1, MAX_CLAIM_LOOPS);
                (0..loops).map(|_| q.clone()).collect::<Vec<_>>()
            })
            .map(|q| tokio::spawn(claim_loop(run.clone(), q)))
            .collect();
        tracing::info!(
            consumer = %core.consumer,
            queues = ?cfg.queues.iter().map(|q| q.as_str()).collect::<Vec<_>>(),
            concurrency = cfg.concurrency,
            batch_size = cfg.batch_size,
            "worker started"
        );

        shutdown.cancelled().await;
        core.draining.cancel();
        let before = core.counters.snapshot();
        tracing::info!(
            in_flight = core.inflight.len(),
            drain_timeout_ms = cfg.drain_timeout.as_millis() as u64,
            "draining"
        );
        // Armed first, so that whatever hangs below, the acker stops retrying by this deadline and the
        // process can exit.
        let hard_deadline = cfg.drain_timeout + cfg.cancel_grace + cfg.flush_timeout;
        let deadline = {
            let abort = abort.clone();
            tokio::spawn(async move {
                tokio::time::sleep(hard_deadline).await;
                abort.cancel();
            })
        };

        let mut task_error = None;
        for c in claimers {
            if let Err(e) = c.await {
                task_error = Some(format!("claim loop: {e}"));
            }
        }
        if let Some(s) = scheduler
            && let Err(e) = s.await
        {
            task_error = Some(format!("scheduler: {e}"));
        }

        jobs.close();
        let timed_out = tokio::time::timeout(cfg.drain_timeout, jobs.wait())
            .await
            .is_err();
        if timed_out {
            tracing::warn!(
                running = jobs.len(),
                "drain timeout passed: cancelling the remaining jobs and releasing their leases"
            );
            run.force.cancel();
            // Bounded: a cancelled job is dropped after `cancel_grace`, and its ack send by the abort deadline.
            jobs.wait().await;
        }
        // The last sender goes with `run`: the acker flushes what is left and stops. Nothing runs any more, so
        // outcomes the broker still refuses get `flush_timeout`, not the full `ack_retry_timeout`: a worker
        // stopped during an outage exits promptly and its jobs are redelivered.
        drop(run);
        let mut acker = acker;
        let flushed = tokio::time::timeout(cfg.flush_timeout, &mut acker).await;
        let acker_result = match flushed {
            Ok(r) => r,
            Err(_) => {
                abort.cancel();
                acker.await
            }
        };
        if let Err(e) = acker_result {
            task_error = Some(format!("acker: {e}"));
        }
        heartbeat_stop.cancel();
        if let Err(e) = heartbeat.await {
            task_error = Some(format!("heartbeat: {e}"));
        }
        deadline.abort();
        if let Some(p) = queue_poll {
            let _ = p.await;
        }

        let after = core.counters.snapshot();
        let report = DrainReport {
            completed_during_drain: core.counters.completed_draining.load(Ordering::Relaxed),
            failed_during_drain: core.counters.failed_draining.load(Ordering::Relaxed),
            released: after.released - before.released,
            undelivered: after.undelivered - before.undelivered,
            timed_out,
        };
        tracing::info!(?report, "worker stopped");
        match task_error {
            Some(e) => Err(WorkerError::Task(e)),
            None => Ok(report),
        }
    }
}

/// `<hostname>-<pid>-<8 random hex>`: readable in `XINFO CONSUMERS`, unique even for two workers of one pod.
fn default_consumer() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "worker".into());
    let random = uuid::Uuid::now_v7().simple().to_string();
    // The tail of a v7 UUID is random; its head is the clock.
    format!("{host}-{}-{}", std::process::id(), &random[24..])
}

/// Claim for one queue while there is room and until shutdown.
async fn claim_loop(run: Arc<RunCtx>, queue: QueueName) {
    let core = &run.core;
    let cfg = &core.config;
    let sem = core.slots[&queue].clone();
    let mut delays = backoff(cfg.retry_max_delay);
    let mut health = Health::new(format!("claim {queue}"));
    loop {
        // At least one free slot before asking for work, then as many more as are free, up to the batch size.
        let first = tokio::select! {
            biased;
            _ = run.shutdown.cancelled() => break,
            p = sem.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
        };
        let mut permits = vec![first];
        while permits.len() < cfg.batch_size {
            match sem.clone().try_acquire_owned() {
                Ok(p) => permits.push(p),
                Err(_) => break,
            }
        }
        let started = Instant::now();
        // Not raced against shutdown: dropping a claim mid-flight could strand leases until they expire, and
        // the call returns within `claim_wait` anyway.
        let claimed = tokio::time::timeout(
            cfg.claim_wait + cfg.broker_call_timeout,
            core.broker
                .claim(&queue, &core.consumer, permits.len(), cfg.claim_wait),
        )
        .await;
        let error = match claimed {
            Ok(Ok(jobs)) => {
                health.ok();
                delays = backoff(cfg.retry_max_delay);
                let empty = jobs.is_empty();
                for leased in start_jobs(&run, &queue, jobs, &mut permits).await {
                    release_claimed(&run, leased).await;
                }
                // Unused permits go back to the semaphore here.
                drop(permits);
                if empty && started.elapsed() < MIN_EMPTY_CLAIM {
                    tokio::select! {
                        _ = run.shutdown.cancelled() => break,
                        _ = tokio::time::sleep(EMPTY_CLAIM_PAUSE) => {}
                    }
                }
                continue;
            }
            Ok(Err(e)) => e.to_string(),
            Err(_) => format!(
                "no answer within {} ms",
                (cfg.claim_wait + cfg.broker_call_timeout).as_millis()
            ),
        };
        drop(permits);
        let delay = delays.next().unwrap_or(cfg.retry_max_delay);
        health.failed(&error, delay);
        tokio::select! {
            _ = run.shutdown.cancelled() => break,
            _ = tokio::time::sleep(delay) => {}
        }
    }
}

/// Spawn a task per claimed job, each taking one of `permits` (the rest stay in `permits`). Returns the jobs
/// not started because shutdown began: the caller hands them back.
pub(crate) async fn start_jobs(
    run: &Arc<RunCtx>,
    queue: &QueueName,
    jobs: Vec<Leased>,
    permits: &mut Vec<OwnedSemaphorePermit>,
) -> Vec<Leased> {
    let core = &run.core;
    core.counters
        .claimed
        .fetch_add(jobs.len() as u64, Ordering::Relaxed);
    let mut excess = Vec::new();
    let mut stopped = Vec::new();
    for leased in jobs {
        let Some(permit) = permits.pop() else {
            excess.push(leased.lease);
            continue;
        };
        if run.shutdown.is_cancelled() {
            // Claimed as shutdown began: hand it straight back rather than start work we may not finish. Its
            // slot stays with the caller.
            permits.push(permit);
            stopped.push(leased);
            continue;
        }
        let job = leased.job;
        let span = tracing::info_span!(
            "job",
            id = %job.id,
            queue = %queue,
            kind = %job.spec.kind,
            attempt = job.attempt,
            correlation_id = job.spec.correlation_id.as_deref().unwrap_or(""),
            // The W3C trace the submitting request belonged to (its trace id, as log pipelines index it).
            trace_id = job
                .spec
                .traceparent
                .as_deref()
                .and_then(|t| t.split('-').nth(1))
                .unwrap_or(""),
        );
        // With span export on, the job's span is a child of the submitting request's span.
        if let Some(tp) = job.spec.traceparent.as_deref() {
            ferry_telemetry::set_remote_parent(&span, tp);
        }
        let metrics = core.metrics.job(queue, &job.spec.kind);
        metrics.start(job.attempt, job.spec.created_at);
        let slot = Arc::new(JobSlot::new(leased.lease, run.force.child_token(), metrics));
        core.inflight.insert(slot.clone());
        run.jobs
            .spawn(run_job(run.clone(), job, slot, permit).instrument(span));
    }
    if !excess.is_empty() {
        // An engine bug: it returned more than asked. We have no room for them, so give them back.
        tracing::error!(
            queue = %queue,
            excess = excess.len(),
            "broker returned more jobs than requested; releasing the excess"
        );
        if let Err(e) = core.broker.release(&excess).await {
            tracing::warn!(error = %e, "releasing excess jobs failed; they will be reclaimed");
        }
    }
    stopped
}

/// Hand a job claimed as shutdown began back through the acker (a `release`, the attempt not counted).
async fn release_claimed(run: &RunCtx, leased: Leased) {
    let core = &run.core;
    let metrics = core.metrics.job(&leased.lease.queue, &leased.job.spec.kind);
    let slot = Arc::new(JobSlot::new(
        leased.lease,
        CancellationToken::new(),
        metrics,
    ));
    core.inflight.insert(slot.clone());
    send_ack(
        run,
        Ack {
            op: AckOp::Release,
            slot,
            permit: None,
        },
    )
    .await;
}

async fn send_ack(run: &RunCtx, ack: Ack) {
    if let Err(mpsc::error::SendError(ack)) = run.acks.send(ack).await {
        // Only possible if the acker died; the lease will expire and the job be redelivered.
        run.core.inflight.remove(&ack.slot.lease);
        run.core.counters.undelivered(1);
    }
}

async fn run_job(run: Arc<RunCtx>, job: Job, slot: Arc<JobSlot>, permit: OwnedSemaphorePermit) {
    let core = &run.core;
    let started = Instant::now();
    let op = execute(core, job, &slot).await;
    let took = started.elapsed();
    slot.metrics.processing.observe(took.as_secs_f64());
    // Inside the job's span: with the span's id, queue, kind, correlation and trace ids.
    tracing::debug!(
        ms = took.as_millis() as u64,
        outcome = match &op {
            Some(AckOp::Complete(_)) => "completed",
            Some(AckOp::Fail { .. }) => "failed",
            Some(AckOp::Release) => "released",
            None => "lease lost",
        },
        "attempt finished"
    );
    match op {
        Some(op @ AckOp::Complete(_)) => {
            // The slot goes with a completion: the acker's call that completes it leases the next job into it
            // (one call for both), or frees it when the queue has nothing ready.
            let permit = Some(permit);
            send_ack(&run, Ack { op, slot, permit }).await;
        }
        Some(op) => {
            send_ack(
                &run,
                Ack {
                    op,
                    slot,
                    permit: None,
                },
            )
            .await;
            // The slot is free once the outcome is handed over: the round trip to the broker no longer holds
            // back the next job, and the bounded channel keeps the outcomes in memory bounded.
            drop(permit);
        }
        None => {
            // The lease is gone (cancelled, or reclaimed by another worker): nothing to report.
            tracing::info!("lease no longer held; outcome discarded");
            core.inflight.remove(&slot.lease);
            core.counters.lost(1);
            crate::metrics::lease_gone(core, &slot.lease, &slot.metrics);
            drop(permit);
        }
    }
}

/// Run the handler of `job` and decide what to tell the broker; `None` when the outcome must be discarded.
async fn execute(core: &Arc<Core>, job: Job, slot: &Arc<JobSlot>) -> Option<AckOp> {
    let Some(handler) = core.registry.get(&job.spec.kind).cloned() else {
        return Some(AckOp::Fail {
            error: format!("no handler for kind \"{}\"", job.spec.kind),
            retry: Retry::Never,
        });
    };
    let limit = job
        .spec
        .timeout_ms
        .map(Duration::from_millis)
        .unwrap_or(core.config.default_job_timeout);
    let ctx = JobContext::from_slot(Arc::new(job), slot.clone(), core.broker.clone());
    // A panicking handler fails its attempt instead of taking the task (and the job's slot) down with it.
    let work = AssertUnwindSafe(handler.run(ctx)).catch_unwind();
    tokio::pin!(work);
    tokio::select! {
        biased;
        finished = &mut work => {
            // A handler that stopped because it was told to (a cancelled `ferry.sleep` returns at once) is
            // treated like one that was stopped: once the token fires, the outcome no longer counts.
            if slot.is_lost() {
                return None;
            }
            if slot.cancel.is_cancelled() {
                return Some(AckOp::Release);
            }
            Some(match finished {
                Ok(Ok(result)) => AckOp::Complete(result),
                Ok(Err(e)) => AckOp::Fail { retry: e.retry_policy(), error: e.message().to_owned() },
                Err(panic) => AckOp::Fail { error: format!("handler panicked: {}", panic_message(&*panic)), retry: Retry::Backoff },
            })
        }
        _ = slot.cancel.cancelled() => {
            // Give the handler a moment to notice and clean up; its result no longer counts.
            let _ = tokio::time::timeout(core.config.cancel_grace, &mut work).await;
            if slot.is_lost() { None } else { Some(AckOp::Release) }
        }
        _ = tokio::time::sleep(limit) => {
            // Tell anything the handler spawned to stop too.
            slot.cancel.cancel();
            Some(AckOp::Fail {
                error: format!("timed out after {} ms", limit.as_millis()),
                retry: Retry::Backoff,
            })
        }
    }
}

fn panic_message(panic: &(dyn std::any::Any + Send)) -> &str {
    panic
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| panic.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("(non-string panic payload)")
}

/// Every `heartbeat_interval`, extend every lease held in batched calls; a lease the broker no longer
/// recognises cancels its job.
async fn heartbeat_loop(core: Arc<Core>, stop: CancellationToken) {
    let cfg = &core.config;
    let mut tick = tokio::time::interval(cfg.effective_heartbeat_interval());
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    // The first tick fires at once; nothing is held yet.
    tick.tick().await;
    let mut health = Health::new("heartbeat");
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tick.tick() => {}
        }
        let slots = core.inflight.snapshot();
        let mut error = None;
        for chunk in slots.chunks(HEARTBEAT_CHUNK) {
            let leases: Vec<Lease> = chunk.iter().map(|s| s.lease.clone()).collect();
            match tokio::time::timeout(cfg.broker_call_timeout, core.broker.heartbeat(&leases))
                .await
            {
                Ok(Ok(held)) if held.len() == leases.len() => {
                    for (slot, held) in chunk.iter().zip(held) {
                        if !held && !slot.is_lost() {
                            tracing::info!(job = %slot.lease.job, queue = %slot.lease.queue, "lease lost (job cancelled or reclaimed); cancelling it");
                            slot.mark_lost();
                        }
                    }
                }
                Ok(Ok(held)) => {
                    error = Some(format!(
                        "heartbeat answered {} results for {} leases",
                        held.len(),
                        leases.len()
                    ));
                }
                Ok(Err(e)) => error = Some(e.to_string()),
                Err(_) => {
                    error = Some(format!(
                        "no answer within {} ms",
                        cfg.broker_call_timeout.as_millis()
                    ))
                }
            }
        }
        match error {
            Some(e) => health.failed(&e, cfg.effective_heartbeat_interval()),
            None => health.ok(),
        }
    }
}
