//! The recorder against a real Redis event log (ferry-testkit): entries a recorder read and never acknowledged (it
//! died) are recorded by another recorder within its configured takeover bound.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use ferry_broker::{EngineConfig, RECORDER_GROUP, RedisBroker, prelude::*};
use ferry_core::{Kind, NewJob, QueueName};
use ferry_store::recorder::{Recorder, RecorderConfig};
use ferry_store::{MemoryStore, Store};
use ferry_testkit::RedisServer;
use tokio_util::sync::CancellationToken;

/// A recorder read the log and died holding it: a second recorder records every event within
/// `reclaim_idle + reclaim_idle / 4` of the dead one's read (small settings; the bound is the setting relation
/// `RecorderConfig::takeover_within`, plus the write itself).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_recorders_entries_are_recorded_within_the_takeover_bound() {
    let (_redis, broker) = redis_broker().await;
    let config = RecorderConfig {
        reclaim_idle: Duration::from_millis(2000),
        write_timeout: Duration::from_millis(200),
        max_delay: Duration::from_millis(20),
        ..RecorderConfig::new("live")
    };
    config.check().expect("consistent test settings");
    // The dead recorder reads everything the enqueue logged and never writes it.
    let q = QueueName::parse("takeover").unwrap();
    let job = NewJob::new(Kind::parse("k").unwrap(), serde_json::json!({}));
    let ids = broker.enqueue_batch(&q, vec![job; 50]).await.unwrap();
    let read_at = Instant::now();
    let entries = broker
        .read_log(0, RECORDER_GROUP, "dead", 1000, Duration::ZERO, None)
        .await
        .unwrap();
    let held: usize = entries.iter().map(|e| e.events.len()).sum();
    let expected = ids.len() as u64;
    assert_eq!(held as u64, expected, "one job.queued event per job");

    // A live recorder: it must not take them before they are `reclaim_idle` old, and must within
    // `takeover_within` (then one write).
    let store = Arc::new(MemoryStore::new());
    let live = Recorder::new(broker.clone(), store.clone(), config.clone());
    let stats = live.stats().clone();
    let stop = CancellationToken::new();
    let task = tokio::spawn(live.run(stop.clone()));
    let bound = config.takeover_within() + config.write_timeout + Duration::from_millis(500);
    loop {
        if stats.recorded.load(Ordering::Relaxed) >= expected {
            break;
        }
        assert!(
            read_at.elapsed() < bound,
            "{} of {expected} events recorded {:?} after the dead recorder read {held}; bound {bound:?}",
            stats.recorded.load(Ordering::Relaxed),
            read_at.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Not taken before they were `reclaim_idle` old: the live recorder leaves entries that may still be written.
    assert!(read_at.elapsed() >= config.reclaim_idle);
    for e in ids {
        assert!(
            store.job(e.id).await.unwrap().is_some(),
            "{} recorded",
            e.id
        );
    }
    stop.cancel();
    task.await.unwrap();
}

/// The memory store, noting the largest batch any one transaction was handed.
#[derive(Debug, Default)]
struct Watching {
    inner: MemoryStore,
    largest: std::sync::atomic::AtomicUsize,
}

#[async_trait::async_trait]
impl Store for Watching {
    async fn record(&self, events: &[ferry_core::Event]) -> Result<u64, ferry_store::StoreError> {
        self.largest.fetch_max(events.len(), Ordering::Relaxed);
        self.inner.record(events).await
    }
    async fn unfinished(
        &self,
        updated_before: u64,
        after: Option<ferry_core::JobId>,
        limit: usize,
    ) -> Result<Vec<ferry_core::JobInfo>, ferry_store::StoreError> {
        self.inner.unfinished(updated_before, after, limit).await
    }
    async fn job(
        &self,
        id: ferry_core::JobId,
    ) -> Result<Option<ferry_core::JobInfo>, ferry_store::StoreError> {
        self.inner.job(id).await
    }
    async fn jobs(
        &self,
        q: &ferry_store::JobQuery,
    ) -> Result<ferry_store::JobPage, ferry_store::StoreError> {
        self.inner.jobs(q).await
    }
    async fn events(
        &self,
        id: ferry_core::JobId,
        limit: usize,
    ) -> Result<Vec<ferry_store::EventRecord>, ferry_store::StoreError> {
        self.inner.events(id, limit).await
    }
    async fn maintain(
        &self,
        config: &ferry_store::maintenance::MaintenanceConfig,
        now_ms: u64,
    ) -> Result<ferry_store::maintenance::MaintenanceReport, ferry_store::StoreError> {
        self.inner.maintain(config, now_ms).await
    }
    async fn ping(&self) -> Result<(), ferry_store::StoreError> {
        self.inner.ping().await
    }
}

/// A redis-server of the test's own and a broker on it (the server stops when dropped).
async fn redis_broker() -> (RedisServer, Arc<RedisBroker>) {
    let redis = RedisServer::start().expect("redis-server starts");
    let broker = RedisBroker::connect(&[redis.url()], EngineConfig::default())
        .await
        .expect("connects");
    (redis, Arc::new(broker))
}

/// Run a recorder into a [`Watching`] store until it has recorded `events` (at most 30 s), then stop it.
async fn record_all(
    broker: Arc<RedisBroker>,
    config: RecorderConfig,
    events: usize,
) -> Arc<Watching> {
    let store = Arc::new(Watching::default());
    let recorder = Recorder::new(broker, store.clone(), config);
    let stats = recorder.stats().clone();
    let stop = CancellationToken::new();
    let task = tokio::spawn(recorder.run(stop.clone()));
    let deadline = Instant::now() + Duration::from_secs(30);
    while stats.recorded.load(Ordering::Relaxed) < events as u64 {
        assert!(
            Instant::now() < deadline,
            "{} of {events} events recorded after 30 s",
            stats.recorded.load(Ordering::Relaxed),
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop.cancel();
    task.await.unwrap();
    store
}

/// Batch enqueues log one entry per call, holding every job's event (500 here). The recorder asks for as many
/// entries as fit its batch and writes at most `batch_max` events per transaction, so a backlog of big entries
/// cannot become one transaction too large to finish within the write timeout (which was retried forever).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn big_log_entries_are_written_in_transactions_of_at_most_batch_max() {
    let (_redis, broker) = redis_broker().await;
    let q = QueueName::parse("big").unwrap();
    let job = NewJob::new(Kind::parse("k").unwrap(), serde_json::json!({"n": 1}));
    let mut ids = Vec::new();
    for _ in 0..20 {
        ids.extend(
            broker
                .enqueue_batch(&q, vec![job.clone(); 500])
                .await
                .unwrap(),
        );
    }
    let config = RecorderConfig {
        batch_max: 1_000,
        ..RecorderConfig::new("big")
    };
    let store = record_all(broker, config, ids.len()).await;
    let largest = store.largest.load(Ordering::Relaxed);
    assert!(largest <= 1_000, "a transaction of {largest} events");
    assert!(largest >= 500, "entries are 500 events each: {largest}");
    for e in [ids[0].id, ids[ids.len() - 1].id] {
        assert!(store.job(e).await.unwrap().is_some(), "{e} recorded");
    }
}

/// `job.queued` events carry their job's payload, so a batch is also bounded in bytes: it is written once it
/// holds `batch_max_bytes` of entries, however few events that is, and reads are sized so that it gathers less
/// than one entry more. Here 40 single-job enqueues of 64 KiB payloads, a bound of 256 KiB and a `max_delay` of
/// a minute: only the byte bound writes anything before the test's deadline, in batches of 4 entries.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_are_bounded_in_bytes() {
    let (_redis, broker) = redis_broker().await;
    let q = QueueName::parse("heavy").unwrap();
    let job = NewJob::new(
        Kind::parse("k").unwrap(),
        serde_json::json!({"blob": "x".repeat(64 * 1024)}),
    );
    let mut ids = Vec::new();
    for _ in 0..40 {
        ids.extend(broker.enqueue_batch(&q, vec![job.clone()]).await.unwrap());
    }
    let config = RecorderConfig {
        batch_max_bytes: 256 * 1024,
        max_delay: Duration::from_secs(60),
        reclaim_idle: Duration::from_secs(120),
        ..RecorderConfig::new("heavy")
    };
    config.check().expect("consistent test settings");
    // Without the byte bound, nothing is written before `max_delay`: the wait below runs out first.
    let store = record_all(broker, config, ids.len()).await;
    let largest = store.largest.load(Ordering::Relaxed);
    assert!(
        largest <= 4,
        "a batch of {largest} events of over 64 KiB each, past the 256 KiB bound by more than one entry"
    );
    assert!(
        store.job(ids[39].id).await.unwrap().is_some(),
        "last job recorded"
    );
}
