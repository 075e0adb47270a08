//! [`FaultyBroker`] (feature `faults`): a real broker behind a switch per method, the one test double of the
//! workspace. It implements each of the traits that make up [`Broker`] and delegates every method to the engine it
//! wraps — the defaulted ones too, so a wrapper never answers with a trait default the engine overrides — and a
//! test turns faults on and off by [`Method`]: an outage, an internal error, a stall (the call hangs until the
//! switch is cleared) or a delay. It also counts calls per method, records the channels published to, can report
//! a recorder backlog of the test's choosing, and can stall or end the channel feeds (a subscription stuck while
//! the connection still answers PING; a feed whose engine task died).
//!
//! Nothing here imitates an engine: every answer that is not an injected fault is the wrapped engine's.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use ferry_broker::prelude::*;
use ferry_broker::{
    BrokerError, CancelOutcome, ChannelFeed, ChannelHistory, Completion, Enqueued, EventFilter,
    EventScope, EventStream, FailOutcome, Failure, HistoryEntry, JobFeed, Lease, Leased, LogEntry,
    LogPosition, Membership, Missed, QueueStats, Reclaimed, Rejected, RetryOutcome, StreamPos,
};
use ferry_core::{Event, JobId, JobInfo, NewJob, QueueName};
use futures::StreamExt;

/// A [`Broker`] method that goes to the engine (the synchronous accessors are never switched).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[allow(missing_docs)]
pub enum Method {
    Enqueue,
    Claim,
    Heartbeat,
    Progress,
    Complete,
    Fail,
    Release,
    Cancel,
    PromoteDue,
    ReclaimExpired,
    DeadLetters,
    RetryDead,
    Restore,
    TryLease,
    Stats,
    ScheduledDue,
    LeasesByConsumer,
    Queues,
    Pause,
    Resume,
    Job,
    Subscribe,
    JobFeed,
    Publish,
    ChannelMissed,
    EventsMissed,
    Channels,
    Maintain,
    Ping,
    ReadLog,
    AckLog,
    LogBacklog,
}

/// What a switched-on method does instead of (or before) calling the engine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// `BrokerError::Unavailable` after 5 ms (an outage answers after a moment, as a refused connection does).
    Unavailable,
    /// `BrokerError::Internal` at once.
    Internal,
    /// The call hangs until the switch is cleared, then goes to the engine.
    Stall,
    /// The call waits this long, then goes to the engine.
    Delay(Duration),
}

/// See the module documentation.
#[derive(Debug)]
pub struct FaultyBroker {
    inner: Arc<dyn Broker>,
    faults: Mutex<HashMap<Method, Fault>>,
    calls: Mutex<HashMap<Method, u64>>,
    published: Mutex<Vec<String>>,
    /// What `log_backlog` answers instead of the engine, when set.
    backlog: Mutex<Option<u64>>,
    feeds_stalled: Arc<AtomicBool>,
    feeds_opened: AtomicU64,
    feeds_ended: Arc<AtomicU64>,
}

impl FaultyBroker {
    pub fn new(inner: Arc<dyn Broker>) -> Arc<Self> {
        Arc::new(Self {
            inner,
            faults: Mutex::default(),
            calls: Mutex::default(),
            published: Mutex::default(),
            backlog: Mutex::default(),
            feeds_stalled: Arc::default(),
            feeds_opened: AtomicU64::new(0),
            feeds_ended: Arc::default(),
        })
    }

    /// The engine behind the switches.
    pub fn inner(&self) -> &Arc<dyn Broker> {
        &self.inner
    }

    /// Switch `fault` on for `method` (replacing any other).
    pub fn set(&self, method: Method, fault: Fault) {
        lock(&self.faults).insert(method, fault);
    }

    /// Switch `method` back to the engine; a stalled call goes on.
    pub fn clear(&self, method: Method) {
        lock(&self.faults).remove(&method);
    }

    /// `set` when `on`, `clear` otherwise.
    pub fn switch(&self, method: Method, fault: Fault, on: bool) {
        if on {
            self.set(method, fault)
        } else {
            self.clear(method)
        }
    }

    /// Calls of `method` so far, faulted or not.
    pub fn calls(&self, method: Method) -> u64 {
        lock(&self.calls).get(&method).copied().unwrap_or(0)
    }

    /// Channels published to so far, in order.
    pub fn published(&self) -> Vec<String> {
        lock(&self.published).clone()
    }

    /// Make `log_backlog` answer `n` (the recorder's backlog, for shedding tests); `None`: the engine's.
    pub fn set_backlog(&self, n: Option<u64>) {
        *lock(&self.backlog) = n;
    }

    /// Drop every channel message silently while on (the feeds stay open).
    pub fn stall_feeds(&self, on: bool) {
        self.feeds_stalled.store(on, Ordering::SeqCst);
    }

    /// Channel feeds opened so far.
    pub fn feeds_opened(&self) -> u64 {
        self.feeds_opened.load(Ordering::SeqCst)
    }

    /// End every channel feed opened so far, at its next message (as a feed whose engine task died would).
    pub fn end_feeds(&self) {
        self.feeds_ended
            .store(self.feeds_opened.load(Ordering::SeqCst), Ordering::SeqCst);
    }

    /// Count the call and apply the method's fault, if any.
    async fn enter(&self, method: Method) -> Result<(), BrokerError> {
        *lock(&self.calls).entry(method).or_default() += 1;
        loop {
            let fault = lock(&self.faults).get(&method).copied();
            match fault {
                None => return Ok(()),
                Some(Fault::Unavailable) => {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    return Err(BrokerError::Unavailable(format!(
                        "injected fault: {method:?}"
                    )));
                }
                Some(Fault::Internal) => {
                    return Err(BrokerError::Internal(format!("injected fault: {method:?}")));
                }
                Some(Fault::Delay(d)) => {
                    tokio::time::sleep(d).await;
                    return Ok(());
                }
                Some(Fault::Stall) => tokio::time::sleep(Duration::from_millis(10)).await,
            }
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[async_trait]
impl Jobs for FaultyBroker {
    async fn enqueue(&self, queue: &QueueName, job: NewJob) -> Result<Enqueued, BrokerError> {
        self.enter(Method::Enqueue).await?;
        self.inner.enqueue(queue, job).await
    }
    async fn enqueue_batch(
        &self,
        queue: &QueueName,
        jobs: Vec<NewJob>,
    ) -> Result<Vec<Enqueued>, BrokerError> {
        self.enter(Method::Enqueue).await?;
        self.inner.enqueue_batch(queue, jobs).await
    }
    async fn cancel(&self, id: JobId, by: Option<&str>) -> Result<CancelOutcome, BrokerError> {
        self.enter(Method::Cancel).await?;
        self.inner.cancel(id, by).await
    }
    async fn job(&self, id: JobId) -> Result<Option<JobInfo>, BrokerError> {
        self.enter(Method::Job).await?;
        self.inner.job(id).await
    }
}

#[async_trait]
impl Leasing for FaultyBroker {
    async fn claim(
        &self,
        queue: &QueueName,
        consumer: &str,
        max: usize,
        wait: Duration,
    ) -> Result<Vec<Leased>, BrokerError> {
        self.enter(Method::Claim).await?;
        self.inner.claim(queue, consumer, max, wait).await
    }
    async fn heartbeat(&self, leases: &[Lease]) -> Result<Vec<bool>, BrokerError> {
        self.enter(Method::Heartbeat).await?;
        self.inner.heartbeat(leases).await
    }
    async fn progress(&self, lease: &Lease, data: serde_json::Value) -> Result<bool, BrokerError> {
        self.enter(Method::Progress).await?;
        self.inner.progress(lease, data).await
    }
    async fn complete(
        &self,
        items: Vec<Completion>,
    ) -> Result<Vec<Result<(), Rejected>>, BrokerError> {
        self.enter(Method::Complete).await?;
        self.inner.complete(items).await
    }
    async fn fail(
        &self,
        items: Vec<Failure>,
    ) -> Result<Vec<Result<FailOutcome, Rejected>>, BrokerError> {
        self.enter(Method::Fail).await?;
        self.inner.fail(items).await
    }
    async fn release(&self, leases: &[Lease]) -> Result<Vec<bool>, BrokerError> {
        self.enter(Method::Release).await?;
        self.inner.release(leases).await
    }
}

#[async_trait]
impl Housekeeping for FaultyBroker {
    async fn promote_due(&self, queue: &QueueName, max: usize) -> Result<usize, BrokerError> {
        self.enter(Method::PromoteDue).await?;
        self.inner.promote_due(queue, max).await
    }
    async fn reclaim_expired(
        &self,
        queue: &QueueName,
        max: usize,
    ) -> Result<Reclaimed, BrokerError> {
        self.enter(Method::ReclaimExpired).await?;
        self.inner.reclaim_expired(queue, max).await
    }
    async fn restore(&self, jobs: Vec<JobInfo>) -> Result<Vec<bool>, BrokerError> {
        self.enter(Method::Restore).await?;
        self.inner.restore(jobs).await
    }
    async fn try_lease(
        &self,
        name: &str,
        holder: &str,
        ttl: Duration,
    ) -> Result<bool, BrokerError> {
        self.enter(Method::TryLease).await?;
        self.inner.try_lease(name, holder, ttl).await
    }
    async fn maintain(&self, queue: &QueueName) -> Result<(), BrokerError> {
        self.enter(Method::Maintain).await?;
        self.inner.maintain(queue).await
    }
}

#[async_trait]
impl Operations for FaultyBroker {
    async fn dead_letters(
        &self,
        queue: &QueueName,
        limit: usize,
    ) -> Result<Vec<JobInfo>, BrokerError> {
        self.enter(Method::DeadLetters).await?;
        self.inner.dead_letters(queue, limit).await
    }
    async fn retry_dead(&self, id: JobId) -> Result<RetryOutcome, BrokerError> {
        self.enter(Method::RetryDead).await?;
        self.inner.retry_dead(id).await
    }
    async fn stats(&self, queue: &QueueName) -> Result<QueueStats, BrokerError> {
        self.enter(Method::Stats).await?;
        self.inner.stats(queue).await
    }
    async fn scheduled_due(&self, queue: &QueueName, within: Duration) -> Result<u64, BrokerError> {
        self.enter(Method::ScheduledDue).await?;
        self.inner.scheduled_due(queue, within).await
    }
    async fn leases_by_consumer(
        &self,
        queue: &QueueName,
    ) -> Result<BTreeMap<String, u64>, BrokerError> {
        self.enter(Method::LeasesByConsumer).await?;
        self.inner.leases_by_consumer(queue).await
    }
    async fn queues(&self) -> Result<Vec<QueueName>, BrokerError> {
        self.enter(Method::Queues).await?;
        self.inner.queues().await
    }
    async fn pause(&self, queue: &QueueName) -> Result<(), BrokerError> {
        self.enter(Method::Pause).await?;
        self.inner.pause(queue).await
    }
    async fn resume(&self, queue: &QueueName) -> Result<(), BrokerError> {
        self.enter(Method::Resume).await?;
        self.inner.resume(queue).await
    }
    async fn ping(&self) -> Result<(), BrokerError> {
        self.enter(Method::Ping).await?;
        self.inner.ping().await
    }
}

#[async_trait]
impl EventFeed for FaultyBroker {
    async fn subscribe(&self) -> Result<EventStream, BrokerError> {
        self.enter(Method::Subscribe).await?;
        self.inner.subscribe().await
    }
    async fn job_feed(&self) -> Result<JobFeed, BrokerError> {
        self.enter(Method::JobFeed).await?;
        self.inner.job_feed().await
    }
    async fn events_missed(
        &self,
        scope: EventScope<'_>,
        since: &StreamPos,
        scan: usize,
        keep: &EventFilter<'_>,
    ) -> Result<Missed<Event>, BrokerError> {
        self.enter(Method::EventsMissed).await?;
        self.inner.events_missed(scope, since, scan, keep).await
    }
    fn events_epoch(&self, queue: &QueueName) -> Option<String> {
        self.inner.events_epoch(queue)
    }
}

#[async_trait]
impl PubSub for FaultyBroker {
    async fn publish(&self, channel: &str, payload: String) -> Result<(), BrokerError> {
        lock(&self.published).push(channel.to_owned());
        self.enter(Method::Publish).await?;
        self.inner.publish(channel, payload).await
    }
    async fn publish_in_process(
        &self,
        channel: &str,
        payload: String,
    ) -> Result<Option<u64>, BrokerError> {
        lock(&self.published).push(channel.to_owned());
        self.enter(Method::Publish).await?;
        self.inner.publish_in_process(channel, payload).await
    }
    fn channel_history(&self) -> ChannelHistory {
        self.inner.channel_history()
    }
    async fn channel_missed(
        &self,
        channel: &str,
        since: &StreamPos,
        max: usize,
    ) -> Result<Missed<HistoryEntry>, BrokerError> {
        self.enter(Method::ChannelMissed).await?;
        self.inner.channel_missed(channel, since, max).await
    }
    async fn channels(&self) -> Result<ChannelFeed, BrokerError> {
        self.enter(Method::Channels).await?;
        let (control, stream) = self.inner.channels().await?.into_parts();
        let stalled = self.feeds_stalled.clone();
        let n = self.feeds_opened.fetch_add(1, Ordering::SeqCst) + 1;
        let ended = self.feeds_ended.clone();
        let stream = stream
            .take_while(move |_| std::future::ready(ended.load(Ordering::SeqCst) < n))
            .filter(move |_| std::future::ready(!stalled.load(Ordering::SeqCst)));
        Ok(ChannelFeed::new(control, Box::pin(stream)))
    }
    fn channel_shard(&self, channel: &str) -> Option<usize> {
        self.inner.channel_shard(channel)
    }
    fn membership(&self) -> Option<&dyn Membership> {
        self.inner.membership()
    }
}

#[async_trait]
impl EventLog for FaultyBroker {
    fn log_shards(&self) -> usize {
        self.inner.log_shards()
    }
    async fn read_log(
        &self,
        shard: usize,
        group: &str,
        consumer: &str,
        max: usize,
        wait: Duration,
        reclaim_idle: Option<Duration>,
    ) -> Result<Vec<LogEntry>, BrokerError> {
        self.enter(Method::ReadLog).await?;
        self.inner
            .read_log(shard, group, consumer, max, wait, reclaim_idle)
            .await
    }
    async fn ack_log(&self, group: &str, entries: &[LogPosition]) -> Result<(), BrokerError> {
        self.enter(Method::AckLog).await?;
        self.inner.ack_log(group, entries).await
    }
    async fn log_backlog(&self, group: &str) -> Result<u64, BrokerError> {
        self.enter(Method::LogBacklog).await?;
        let set = *lock(&self.backlog);
        match set {
            Some(n) => Ok(n),
            None => self.inner.log_backlog(group).await,
        }
    }
}

#[cfg(test)]
mod tests {
    //! Every method of every broker trait goes through its switch, and the accessors that are never switched
    //! answer as the engine does.

    use ferry_broker::{EngineConfig, MemoryBroker};
    use ferry_core::Kind;

    use super::*;

    /// Every [`Method`], each at its [`index`].
    const ALL: [Method; 32] = [
        Method::Enqueue,
        Method::Claim,
        Method::Heartbeat,
        Method::Progress,
        Method::Complete,
        Method::Fail,
        Method::Release,
        Method::Cancel,
        Method::PromoteDue,
        Method::ReclaimExpired,
        Method::DeadLetters,
        Method::RetryDead,
        Method::Restore,
        Method::TryLease,
        Method::Stats,
        Method::ScheduledDue,
        Method::LeasesByConsumer,
        Method::Queues,
        Method::Pause,
        Method::Resume,
        Method::Job,
        Method::Subscribe,
        Method::JobFeed,
        Method::Publish,
        Method::ChannelMissed,
        Method::EventsMissed,
        Method::Channels,
        Method::Maintain,
        Method::Ping,
        Method::ReadLog,
        Method::AckLog,
        Method::LogBacklog,
    ];

    /// Exhaustive, so a new [`Method`] does not compile until it is in [`ALL`].
    fn index(m: Method) -> usize {
        match m {
            Method::Enqueue => 0,
            Method::Claim => 1,
            Method::Heartbeat => 2,
            Method::Progress => 3,
            Method::Complete => 4,
            Method::Fail => 5,
            Method::Release => 6,
            Method::Cancel => 7,
            Method::PromoteDue => 8,
            Method::ReclaimExpired => 9,
            Method::DeadLetters => 10,
            Method::RetryDead => 11,
            Method::Restore => 12,
            Method::TryLease => 13,
            Method::Stats => 14,
            Method::ScheduledDue => 15,
            Method::LeasesByConsumer => 16,
            Method::Queues => 17,
            Method::Pause => 18,
            Method::Resume => 19,
            Method::Job => 20,
            Method::Subscribe => 21,
            Method::JobFeed => 22,
            Method::Publish => 23,
            Method::ChannelMissed => 24,
            Method::EventsMissed => 25,
            Method::Channels => 26,
            Method::Maintain => 27,
            Method::Ping => 28,
            Method::ReadLog => 29,
            Method::AckLog => 30,
            Method::LogBacklog => 31,
        }
    }

    fn injected<T>(r: Result<T, BrokerError>) -> bool {
        matches!(r, Err(BrokerError::Internal(m)) if m.starts_with("injected fault"))
    }

    #[tokio::test]
    async fn every_method_goes_through_its_switch() {
        for (i, m) in ALL.iter().enumerate() {
            assert_eq!(index(*m), i, "{m:?}");
        }
        let engine: Arc<dyn Broker> = Arc::new(MemoryBroker::new(EngineConfig::default()));
        let q = QueueName::parse("faulty").unwrap();
        let job = || NewJob::new(Kind::parse("ferry.noop").unwrap(), serde_json::json!({}));
        let id = engine.enqueue(&q, job()).await.unwrap().id;
        let leased = engine
            .claim(&q, "c", 1, Duration::ZERO)
            .await
            .unwrap()
            .pop()
            .unwrap();
        let lease = leased.lease;
        let info = engine.job(id).await.unwrap().unwrap();
        let since = StreamPos {
            offset: "0-0".into(),
            epoch: "e".into(),
        };
        let keep = |_: &Event| true;

        let f = FaultyBroker::new(engine.clone());
        for m in ALL {
            f.set(m, Fault::Internal);
        }
        // Through the whole `Broker`, as the roles that keep it call it.
        let b: &dyn Broker = f.as_ref();
        assert!(injected(b.enqueue(&q, job()).await));
        assert!(injected(b.enqueue_batch(&q, vec![job()]).await));
        assert!(injected(b.job(id).await));
        assert!(injected(b.cancel(id, None).await));
        assert!(injected(b.claim(&q, "c", 1, Duration::ZERO).await));
        assert!(injected(b.heartbeat(std::slice::from_ref(&lease)).await));
        assert!(injected(b.progress(&lease, serde_json::json!(1)).await));
        assert!(injected(b.complete(Vec::new()).await));
        assert!(injected(b.fail(Vec::new()).await));
        assert!(injected(b.release(std::slice::from_ref(&lease)).await));
        assert!(injected(b.promote_due(&q, 1).await));
        assert!(injected(b.reclaim_expired(&q, 1).await));
        assert!(injected(b.maintain(&q).await));
        assert!(injected(
            b.try_lease("l", "h", Duration::from_secs(1)).await
        ));
        assert!(injected(b.restore(vec![info]).await));
        assert!(injected(b.stats(&q).await));
        assert!(injected(b.scheduled_due(&q, Duration::ZERO).await));
        assert!(injected(b.leases_by_consumer(&q).await));
        assert!(injected(b.queues().await));
        assert!(injected(b.pause(&q).await));
        assert!(injected(b.resume(&q).await));
        assert!(injected(b.dead_letters(&q, 1).await));
        assert!(injected(b.retry_dead(id).await));
        assert!(injected(b.ping().await));
        assert!(injected(b.subscribe().await));
        assert!(injected(b.job_feed().await));
        assert!(injected(
            b.events_missed(EventScope::All, &since, 1, &keep).await
        ));
        assert!(injected(b.publish("ch", "p".into()).await));
        assert!(injected(b.channels().await));
        assert!(injected(b.channel_missed("ch", &since, 1).await));
        assert!(injected(
            b.read_log(0, "g", "c", 1, Duration::ZERO, None).await
        ));
        assert!(injected(b.ack_log("g", &[]).await));
        assert!(injected(b.log_backlog("g").await));
        for m in ALL {
            let want = if m == Method::Enqueue { 2 } else { 1 };
            assert_eq!(f.calls(m), want, "{m:?}");
        }

        // Through one part, as a role handed only that part of the whole calls it.
        let whole: Arc<dyn Broker> = f.clone();
        let log: Arc<dyn EventLog> = whole;
        assert!(injected(log.log_backlog("g").await));
        assert_eq!(f.calls(Method::LogBacklog), 2);

        // The accessors are the engine's.
        assert_eq!(b.channel_history(), engine.channel_history());
        assert_eq!(b.events_epoch(&q), engine.events_epoch(&q));
        assert_eq!(b.channel_shard("ch"), engine.channel_shard("ch"));
        assert_eq!(b.membership().is_some(), engine.membership().is_some());
        assert_eq!(b.log_shards(), engine.log_shards());

        // Cleared, a call reaches the engine again.
        f.clear(Method::Stats);
        assert_eq!(b.stats(&q).await.unwrap().active, 1);
    }
}
