//! Shared helpers: an engine, a worker running in the background, and a wait for a job's state (built on
//! `ferry_testkit::eventually`, the workspace's one poll-until-it-holds helper). Faults are injected with
//! `ferry_testkit::faulty::FaultyBroker`, the workspace's one broker double.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, ensure};
use ferry_broker::{Broker, EngineConfig, MemoryBroker};
use ferry_core::{Backoff, JobId, JobInfo, JobState, Kind, NewJob, QueueName};
use ferry_testkit::eventually;
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

/// Wait until job `id` is in `state`; returns its record. A timeout says the state it was last in.
pub async fn wait_state(
    broker: &dyn Broker,
    id: JobId,
    state: JobState,
    within: Duration,
) -> anyhow::Result<JobInfo> {
    eventually(within, &format!("job {id} {state}"), || async {
        let info = broker.job(id).await?.context("job exists")?;
        ensure!(
            info.state == state,
            "job {id} is {} (error {:?})",
            info.state,
            info.error
        );
        Ok(Some(info))
    })
    .await
}
