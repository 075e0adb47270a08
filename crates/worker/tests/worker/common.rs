//! Shared helpers: an engine, a fault-injecting broker wrapper, a worker running in the background, and
//! polling helpers with deadlines.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::{Context, bail};
use async_trait::async_trait;
use ferry_broker::{
    Broker, BrokerError, CancelOutcome, Completion, EngineConfig, Enqueued, EventStream,
    FailOutcome, Failure, Lease, Leased, MemoryBroker, QueueStats, Reclaimed, Rejected,
    RetryOutcome,
};
use ferry_core::{Backoff, JobId, JobInfo, JobState, Kind, NewJob, QueueName};
use ferry_worker::{
    DrainReport, HandlerRegistry, Worker, WorkerConfig, WorkerError, WorkerMonitor,
};
use serde_json::Value;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub const VISIBILITY: Duration = Duration::from_millis(600);

pub fn queue(name: &str) -> QueueName {
    QueueName::parse(name).unwrap()
}

pub fn memory() -> Arc<MemoryBroker> {
    Arc::new(MemoryBroker::new(EngineConfig {
        visibility_timeout: VISIBILITY,
        ..EngineConfig::default()
    }))
}

/// A worker config with short intervals so tests run in well under a second per job.
pub fn config(q: &QueueName) -> WorkerConfig {
    WorkerConfig {
        claim_wait: Duration::from_millis(100),
        visibility_timeout: VISIBILITY,
        scheduler_interval: Duration::from_millis(50),
        drain_timeout: Duration::from_secs(5),
        cancel_grace: Duration::from_millis(200),
        flush_timeout: Duration::from_secs(2),
        retry_max_delay: Duration::from_millis(100),
        ..WorkerConfig::for_queues([q.clone()])
    }
}

pub fn job(kind: &str, payload: Value) -> NewJob {
    let mut j = NewJob::new(Kind::parse(kind).unwrap(), payload);
    // Fast retries, so multi-attempt tests stay short.
    j.backoff = Some(Backoff {
        base_ms: 10,
        max_ms: 20,
    });
    j
}

pub async fn enqueue(broker: &dyn Broker, q: &QueueName, j: NewJob) -> JobId {
    broker.enqueue(q, j).await.unwrap().id
}

/// A worker running in a background task.
pub struct Running {
    pub shutdown: CancellationToken,
    pub handle: JoinHandle<Result<DrainReport, WorkerError>>,
    pub monitor: WorkerMonitor,
}

impl Running {
    pub fn start(broker: Arc<dyn Broker>, registry: HandlerRegistry, config: WorkerConfig) -> Self {
        let worker = Worker::new(broker, registry, config).unwrap();
        let monitor = worker.monitor();
        let shutdown = CancellationToken::new();
        let handle = tokio::spawn(worker.run(shutdown.clone()));
        Self {
            shutdown,
            handle,
            monitor,
        }
    }

    /// Request shutdown and wait for the drain report.
    pub async fn stop(self) -> DrainReport {
        self.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(20), self.handle)
            .await
            .expect("worker stops in time")
            .expect("worker task")
            .expect("worker run")
    }
}

/// Poll until `check` holds or `within` passes.
pub async fn eventually<F, Fut>(within: Duration, what: &str, mut check: F) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if check().await {
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            bail!("timed out waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Wait until job `id` is in `state`; returns its record.
pub async fn wait_state(
    broker: &dyn Broker,
    id: JobId,
    state: JobState,
    within: Duration,
) -> anyhow::Result<JobInfo> {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let info = broker.job(id).await?.context("job exists")?;
        if info.state == state {
            return Ok(info);
        }
        if tokio::time::Instant::now() >= deadline {
            bail!(
                "job {id} is {} (error {:?}), expected {state}",
                info.state,
                info.error
            );
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A broker that forwards to a real one, except for the faults switched on.
#[derive(Debug)]
pub struct Faulty {
    pub inner: Arc<dyn Broker>,
    pub fail_claim: AtomicBool,
    pub fail_heartbeat: AtomicBool,
    pub fail_complete: AtomicBool,
    pub complete_calls: AtomicUsize,
    pub heartbeat_calls: AtomicUsize,
}

impl Faulty {
    pub fn new(inner: Arc<dyn Broker>) -> Arc<Self> {
        Arc::new(Self {
            inner,
            fail_claim: AtomicBool::new(false),
            fail_heartbeat: AtomicBool::new(false),
            fail_complete: AtomicBool::new(false),
            complete_calls: AtomicUsize::new(0),
            heartbeat_calls: AtomicUsize::new(0),
        })
    }

    fn down(flag: &AtomicBool) -> Result<(), BrokerError> {
        if flag.load(Ordering::SeqCst) {
            Err(BrokerError::Unavailable("injected fault".into()))
        } else {
            Ok(())
        }
    }
}

#[async_trait]
impl Broker for Faulty {
    async fn enqueue_batch(
        &self,
        q: &QueueName,
        jobs: Vec<NewJob>,
    ) -> Result<Vec<Enqueued>, BrokerError> {
        self.inner.enqueue_batch(q, jobs).await
    }
    async fn claim(
        &self,
        q: &QueueName,
        c: &str,
        max: usize,
        wait: Duration,
    ) -> Result<Vec<Leased>, BrokerError> {
        if Self::down(&self.fail_claim).is_err() {
            // An outage answers after a moment, not instantly, like a refused connection would.
            tokio::time::sleep(Duration::from_millis(5)).await;
            return Err(BrokerError::Unavailable("injected fault".into()));
        }
        self.inner.claim(q, c, max, wait).await
    }
    async fn heartbeat(&self, leases: &[Lease]) -> Result<Vec<bool>, BrokerError> {
        self.heartbeat_calls.fetch_add(1, Ordering::SeqCst);
        Self::down(&self.fail_heartbeat)?;
        self.inner.heartbeat(leases).await
    }
    async fn progress(&self, lease: &Lease, data: Value) -> Result<bool, BrokerError> {
        self.inner.progress(lease, data).await
    }
    async fn complete(
        &self,
        items: Vec<Completion>,
    ) -> Result<Vec<Result<(), Rejected>>, BrokerError> {
        self.complete_calls.fetch_add(1, Ordering::SeqCst);
        Self::down(&self.fail_complete)?;
        self.inner.complete(items).await
    }
    async fn fail(
        &self,
        items: Vec<Failure>,
    ) -> Result<Vec<Result<FailOutcome, Rejected>>, BrokerError> {
        self.inner.fail(items).await
    }
    async fn release(&self, leases: &[Lease]) -> Result<Vec<bool>, BrokerError> {
        self.inner.release(leases).await
    }
    async fn cancel(&self, id: JobId, by: Option<&str>) -> Result<CancelOutcome, BrokerError> {
        self.inner.cancel(id, by).await
    }
    async fn promote_due(&self, q: &QueueName, max: usize) -> Result<usize, BrokerError> {
        self.inner.promote_due(q, max).await
    }
    async fn reclaim_expired(&self, q: &QueueName, max: usize) -> Result<Reclaimed, BrokerError> {
        self.inner.reclaim_expired(q, max).await
    }
    async fn dead_letters(&self, q: &QueueName, limit: usize) -> Result<Vec<JobInfo>, BrokerError> {
        self.inner.dead_letters(q, limit).await
    }
    async fn retry_dead(&self, id: JobId) -> Result<RetryOutcome, BrokerError> {
        self.inner.retry_dead(id).await
    }
    async fn stats(&self, q: &QueueName) -> Result<QueueStats, BrokerError> {
        self.inner.stats(q).await
    }
    async fn scheduled_due(
        &self,
        q: &QueueName,
        within: std::time::Duration,
    ) -> Result<u64, BrokerError> {
        self.inner.scheduled_due(q, within).await
    }
    async fn leases_by_consumer(
        &self,
        q: &QueueName,
    ) -> Result<std::collections::BTreeMap<String, u64>, BrokerError> {
        self.inner.leases_by_consumer(q).await
    }
    async fn queues(&self) -> Result<Vec<QueueName>, BrokerError> {
        self.inner.queues().await
    }
    async fn pause(&self, q: &QueueName) -> Result<(), BrokerError> {
        self.inner.pause(q).await
    }
    async fn resume(&self, q: &QueueName) -> Result<(), BrokerError> {
        self.inner.resume(q).await
    }
    async fn job(&self, id: JobId) -> Result<Option<JobInfo>, BrokerError> {
        self.inner.job(id).await
    }
    async fn subscribe(&self) -> Result<EventStream, BrokerError> {
        self.inner.subscribe().await
    }
    async fn job_feed(&self) -> Result<ferry_broker::JobFeed, BrokerError> {
        self.inner.job_feed().await
    }
    async fn maintain(&self, q: &QueueName) -> Result<(), BrokerError> {
        self.inner.maintain(q).await
    }
    async fn ping(&self) -> Result<(), BrokerError> {
        self.inner.ping().await
    }

    fn log_shards(&self) -> usize {
        self.inner.log_shards()
    }
    fn membership(&self) -> Option<&dyn ferry_broker::Membership> {
        self.inner.membership()
    }

    async fn read_log(
        &self,
        shard: usize,
        group: &str,
        consumer: &str,
        max: usize,
        wait: Duration,
        reclaim_idle: Option<Duration>,
    ) -> Result<Vec<ferry_broker::LogEntry>, BrokerError> {
        self.inner
            .read_log(shard, group, consumer, max, wait, reclaim_idle)
            .await
    }

    async fn ack_log(
        &self,
        group: &str,
        entries: &[ferry_broker::LogPosition],
    ) -> Result<(), BrokerError> {
        self.inner.ack_log(group, entries).await
    }

    async fn log_backlog(&self, group: &str) -> Result<u64, BrokerError> {
        self.inner.log_backlog(group).await
    }

    async fn publish(&self, channel: &str, payload: String) -> Result<(), BrokerError> {
        self.inner.publish(channel, payload).await
    }

    async fn channels(&self) -> Result<ferry_broker::ChannelFeed, BrokerError> {
        self.inner.channels().await
    }
}
