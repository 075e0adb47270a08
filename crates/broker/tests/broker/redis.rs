//! The shared contract suite against the Redis Streams engine, each case on its own redis-server.

use std::sync::Arc;

use ferry_broker::{Broker, ChannelHistory, EngineConfig, RedisBroker};
use ferry_testkit::RedisServer;

use crate::{contract, contract_suite};

struct Redis {
    _server: RedisServer,
    broker: Arc<RedisBroker>,
}

#[async_trait::async_trait]
impl contract::Engine for Redis {
    async fn start(config: EngineConfig) -> Self {
        let server = RedisServer::start().expect("redis-server starts");
        let broker = RedisBroker::connect(&[server.url()], config)
            .await
            .expect("connects");
        Self {
            _server: server,
            broker: Arc::new(broker),
        }
    }

    async fn start_with_history(config: EngineConfig, history: ChannelHistory) -> Self {
        let mut e = Self::start(config).await;
        let b = Arc::try_unwrap(e.broker).expect("not shared yet");
        e.broker = Arc::new(b.with_channel_history(history));
        e
    }

    fn broker(&self) -> Arc<dyn Broker> {
        self.broker.clone()
    }
}

contract_suite!(Redis);

/// FLUSHALL loses every history and the epoch with it: positions from before are not recovered, and the event
/// feed and the publishes after it carry the new epoch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flushall_changes_the_epoch() {
    use ferry_broker::{EventScope, StreamPos, event_offset};
    use ferry_core::{Kind, NewJob, QueueName};
    use futures::StreamExt;
    use std::time::Duration;

    let e = <Redis as contract::Engine>::start(contract::cfg()).await;
    let b: Arc<dyn Broker> = e.broker.clone();
    let q = QueueName::parse("flush").unwrap();
    let mut feed = b.channels().await.unwrap();
    feed.control().subscribe("room").await.unwrap();
    let mut events = b.subscribe().await.unwrap();
    b.publish("room", "1".into()).await.unwrap();
    let before = tokio::time::timeout(Duration::from_secs(10), feed.next())
        .await
        .unwrap()
        .unwrap()
        .position
        .unwrap();
    let job = || NewJob::new(Kind::parse("k").unwrap(), serde_json::json!(null));
    b.enqueue(&q, job()).await.unwrap();
    let ev = tokio::time::timeout(Duration::from_secs(10), events.next())
        .await
        .unwrap()
        .unwrap();
    let ev_before = StreamPos {
        offset: event_offset(&ev).unwrap(),
        epoch: b.events_epoch(&q).unwrap(),
    };
    assert_eq!(ev_before.epoch, before.epoch);

    e._server.cli(&["FLUSHALL"]).unwrap();
    b.publish("room", "2".into()).await.unwrap();
    let after = tokio::time::timeout(Duration::from_secs(10), feed.next())
        .await
        .unwrap()
        .unwrap()
        .position
        .unwrap();
    assert_ne!(after.epoch, before.epoch, "a new epoch after the flush");
    let m = b.channel_missed("room", &before, 100).await.unwrap();
    assert!(!m.recovered && m.entries.is_empty());
    assert_eq!(m.epoch.as_deref(), Some(after.epoch.as_str()));
    let all = |_: &ferry_core::Event| true;
    let m = b
        .events_missed(EventScope::Queue(&q), &ev_before, 100, &all)
        .await
        .unwrap();
    assert!(!m.recovered && m.entries.is_empty());
    // The history read refreshed this node's cached epoch for live job events.
    assert_eq!(b.events_epoch(&q).as_deref(), Some(after.epoch.as_str()));
}

/// The event log trimmed past a position (the recorder's `XTRIM MINID`, or the `MAXLEN ~` cap) is not recovered
/// from it; a position after the trim still is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trimmed_event_log_is_not_recovered() {
    use ferry_broker::{EventScope, StreamPos, event_offset};
    use ferry_core::{Kind, NewJob, QueueName};
    use futures::StreamExt;
    use std::time::Duration;

    let e = <Redis as contract::Engine>::start(contract::cfg()).await;
    let b: Arc<dyn Broker> = e.broker.clone();
    let q = QueueName::parse("trim").unwrap();
    let mut events = b.subscribe().await.unwrap();
    let mut seen = Vec::new();
    for _ in 0..4 {
        b.enqueue(
            &q,
            NewJob::new(Kind::parse("k").unwrap(), serde_json::json!(null)),
        )
        .await
        .unwrap();
        let ev = tokio::time::timeout(Duration::from_secs(10), events.next())
            .await
            .unwrap()
            .unwrap();
        seen.push(event_offset(&ev).unwrap());
    }
    let epoch = b.events_epoch(&q).unwrap();
    let pos = |o: &str| StreamPos {
        offset: o.to_owned(),
        epoch: epoch.clone(),
    };
    let all = |_: &ferry_core::Event| true;
    // Trim the first two entries away, as the recorder's trim does once it has copied them.
    e._server
        .cli(&["XTRIM", "ferry:events", "MINID", &seen[2]])
        .unwrap();
    let m = b
        .events_missed(EventScope::Queue(&q), &pos(&seen[0]), 100, &all)
        .await
        .unwrap();
    assert!(!m.recovered && m.entries.is_empty(), "entry 2 is gone");
    let m = b
        .events_missed(EventScope::Queue(&q), &pos(&seen[2]), 100, &all)
        .await
        .unwrap();
    assert!(m.recovered, "after the trim");
    assert_eq!(m.entries.len(), 1);
}
