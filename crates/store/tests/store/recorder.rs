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
    let redis = RedisServer::start().expect("redis-server starts");
    let broker = Arc::new(
        RedisBroker::connect(&[redis.url()], EngineConfig::default())
            .await
            .expect("connects"),
    );
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
