//! The job engine: the [`Broker`] traits and their two engines, behind one contract.
//!
//! [`Broker`] is the union of seven role-facing traits, so a role can take only what it uses: [`Jobs`]
//! (submitters), [`Leasing`] (workers), [`Housekeeping`] (the scheduler loop, the reconciler), [`Operations`]
//! (queue API, health, autoscaler), [`EventFeed`] (live job events and their replay), [`PubSub`] (application
//! channels, gateway membership) and [`EventLog`] (the recorder). [`prelude`] brings them all into scope.
//!
//! * [`memory`]: everything in-process, for `ferry dev`, single nodes and fast tests.
//! * [`redis`]: Redis 7 Streams with consumer groups, Lua scripts for every multi-key transition, queues spread
//!   by rendezvous hashing ([`shard`]) over N standalone Redis shards, or over the virtual shards of one Redis
//!   Cluster.
//!
//! The behaviour both engines must show is one contract suite (`tests/broker/contract/`) that runs unchanged against
//! each engine.
//!
//! This crate owns job state and its transitions. It must not run handlers, speak HTTP or decide policy that
//! belongs to a role (how many jobs to claim, when to retry a webhook): callers pass those in.

pub mod membership;
pub mod memory;
pub mod placement;
pub mod redis;
pub mod shard;
mod types;

pub use membership::{Member, Membership};
pub use memory::MemoryBroker;
pub use placement::NodeInfo;
pub use redis::{DEFAULT_VSHARDS, RedisBroker, RedisOptions, RedisTls};
pub use shard::ShardRing;
pub use types::*;

use std::collections::BTreeMap;
use std::time::Duration;

use async_trait::async_trait;
use ferry_core::{Event, JobId, JobInfo, NewJob, QueueName};

/// The job engine, whole: every role-facing trait below, which both engines (and wrappers around an engine)
/// implement. Every method is one atomic step: a transition either happens whole or not at all, and a transition
/// fenced by a [`Lease`] is applied only while that lease is still the job's current one.
///
/// Nothing implements it by hand: any type with all seven parts is a `Broker`, so a node builds one
/// `Arc<dyn Broker>` and hands each role the part it needs (`Arc<dyn Broker>` upcasts to `Arc<dyn EventLog>` and
/// the others). A role that uses most parts (the gateway's state, the worker runtime) keeps the whole.
///
/// | trait | methods | used by |
/// |---|---|---|
/// | [`Jobs`] | 4 | submitters: the gateway's job API (HTTP, WebSocket), `ferry enqueue`, load tests |
/// | [`Leasing`] | 6 | the worker runtime and its handlers (progress) |
/// | [`Housekeeping`] | 5 | the worker's scheduler loop, the reconciler |
/// | [`Operations`] | 9 | the gateway's queue and dead-letter API, readiness checks, worker gauges, the autoscaler |
/// | [`EventFeed`] | 4 | the gateway hub's job topics and their replay, tools and tests |
/// | [`PubSub`] | 6 | the gateway hub's application channels, the gateway cluster's membership |
/// | [`EventLog`] | 4 | the recorder; the gateway's shedding on the recorder's backlog |
pub trait Broker:
    Jobs
    + Leasing
    + Housekeeping
    + Operations
    + EventFeed
    + PubSub
    + EventLog
    + Send
    + Sync
    + std::fmt::Debug
    + 'static
{
}

impl<T> Broker for T where
    T: Jobs + Leasing + Housekeeping + Operations + EventFeed + PubSub + EventLog + ?Sized
{
}

/// Submitting and looking up jobs: what a client-facing role needs (the gateway's HTTP and WebSocket job calls,
/// `ferry enqueue`, load generators).
#[async_trait]
pub trait Jobs: Send + Sync + std::fmt::Debug + 'static {
    /// Submit one job. A job with an `idempotency_key` already used in the same queue by the same tenant and
    /// owner (the submitting subject) returns the first job's id with `duplicate: true`, and nothing new is
    /// stored. Another subject's identical key is another job.
    async fn enqueue(&self, queue: &QueueName, job: NewJob) -> Result<Enqueued, BrokerError> {
        let mut v = self.enqueue_batch(queue, vec![job]).await?;
        v.pop()
            .ok_or_else(|| BrokerError::Internal("enqueue returned nothing".into()))
    }

    /// Submit several jobs to one queue in one round trip; results are in input order.
    async fn enqueue_batch(
        &self,
        queue: &QueueName,
        jobs: Vec<NewJob>,
    ) -> Result<Vec<Enqueued>, BrokerError>;

    /// Look a job up by id while the engine still holds it (finished jobs are kept for the configured
    /// retention).
    async fn job(&self, id: JobId) -> Result<Option<JobInfo>, BrokerError>;

    /// Cancel a job in any non-final state. An active job's lease is revoked: its worker sees `false` on its
    /// next heartbeat and its completion is rejected. `by` is the actor recorded on the `job.cancelled` event
    /// (the caller's subject).
    async fn cancel(&self, id: JobId, by: Option<&str>) -> Result<CancelOutcome, BrokerError>;
}

/// Leasing jobs and settling them: the worker runtime (claim, heartbeat, ack) and its handlers (progress).
#[async_trait]
pub trait Leasing: Send + Sync + std::fmt::Debug + 'static {
    /// Lease up to `max` jobs for `consumer`, high priority first. Waits up to `wait` when none is ready; a
    /// paused queue hands out nothing. Each returned job's attempt counter has been incremented.
    ///
    /// A call that does not return its jobs (the caller dropped it, its reply timed out or was lost) leaves none
    /// of them leased: the engine hands back whatever it took, at once and without counting the attempt, as soon
    /// as its store answers again (Redis: `lua/abandon.lua`).
    async fn claim(
        &self,
        queue: &QueueName,
        consumer: &str,
        max: usize,
        wait: Duration,
    ) -> Result<Vec<Leased>, BrokerError>;

    /// Extend leases; `false` for each lease that is no longer held (expired and reclaimed, or cancelled): the
    /// holder must stop working on that job.
    async fn heartbeat(&self, leases: &[Lease]) -> Result<Vec<bool>, BrokerError>;

    /// Report progress for a leased job (a `job.progress` event). `false` when the lease is no longer held.
    async fn progress(&self, lease: &Lease, data: serde_json::Value) -> Result<bool, BrokerError>;

    /// Finish jobs successfully. Each result is `Err(Rejected)` when its lease is no longer held.
    async fn complete(
        &self,
        items: Vec<Completion>,
    ) -> Result<Vec<Result<(), Rejected>>, BrokerError>;

    /// Finish jobs successfully, as [`complete`](Self::complete), and lease up to `max` more jobs of `queue`
    /// for `consumer`, as [`claim`](Self::claim) without waiting: what a worker does when a batch of completions
    /// frees as many slots. The Redis engine sends the completions of `queue` held by `consumer` and the claim as
    /// one script call (one round trip and one event log entry for both); the default completes, then claims.
    async fn complete_and_claim(
        &self,
        items: Vec<Completion>,
        queue: &QueueName,
        consumer: &str,
        max: usize,
    ) -> Result<(Vec<Result<(), Rejected>>, Vec<Leased>), BrokerError> {
        let done = self.complete(items).await?;
        let leased = if max == 0 {
            Vec::new()
        } else {
            self.claim(queue, consumer, max, Duration::ZERO).await?
        };
        Ok((done, leased))
    }

    /// Fail attempts: retry later (with backoff), or dead-letter when the error is permanent or attempts are
    /// used up.
    async fn fail(
        &self,
        items: Vec<Failure>,
    ) -> Result<Vec<Result<FailOutcome, Rejected>>, BrokerError>;

    /// Give leased jobs back without counting the attempt, for immediate pickup (graceful drain).
    async fn release(&self, leases: &[Lease]) -> Result<Vec<bool>, BrokerError>;
}

/// The loops that keep job state moving and repair it, safe to run on many nodes at once: the worker's
/// scheduler (promote, reclaim, maintain) and the reconciler (a leader-free lease, restore).
#[async_trait]
pub trait Housekeeping: Send + Sync + std::fmt::Debug + 'static {
    /// Move due scheduled and retrying jobs to their queue. Safe to run on many nodes at once.
    async fn promote_due(&self, queue: &QueueName, max: usize) -> Result<usize, BrokerError>;

    /// Requeue jobs whose lease expired (not heartbeated within the visibility timeout); a job whose attempts
    /// are used up goes to dead-letter instead. Safe to run on many nodes at once.
    async fn reclaim_expired(
        &self,
        queue: &QueueName,
        max: usize,
    ) -> Result<Reclaimed, BrokerError>;

    /// Housekeeping for one queue: trim acknowledged stream entries, expire finished jobs past retention.
    async fn maintain(&self, queue: &QueueName) -> Result<(), BrokerError>;

    /// Take the lease `name` for `ttl` as `holder` unless someone holds it (Redis: `SET … NX PX` on the shard
    /// the name hashes to). `true` when taken. Leader-free loops use it so one node at a time does work that is
    /// safe but wasteful in parallel; it expires on its own, so a node that dies holding it blocks nobody.
    async fn try_lease(
        &self,
        _name: &str,
        _holder: &str,
        _ttl: Duration,
    ) -> Result<bool, BrokerError> {
        Err(BrokerError::Internal(
            "leases are not implemented by this engine".into(),
        ))
    }

    /// Put back jobs the durable record holds and the engine has lost (Redis data loss: an AOF that missed its
    /// last second, a failover to a replica that lagged), each as the record has it: same id, queue, spec,
    /// priority and attempts used (an `active` job's attempt in flight is given back: its outcome never
    /// reached the engine). A job is queued now, or scheduled / retrying again when it was and its `run_at` is
    /// still ahead. A job the engine still knows (any record or entry of its id) is left alone: `false`. The
    /// check and the restore are one atomic step, so a job in the middle of a transition is never doubled. The
    /// events (`job.queued`, `job.scheduled`, `job.retrying`) carry `"restored": true` in their data and the
    /// actor [`RESTORE_ACTOR`].
    async fn restore(&self, _jobs: Vec<JobInfo>) -> Result<Vec<bool>, BrokerError> {
        Err(BrokerError::Internal(
            "restore is not implemented by this engine".into(),
        ))
    }
}

/// Watching and operating queues: the gateway's queue and dead-letter API, health checks (`ping`), the worker's
/// queue gauges and the autoscaler (which only reads).
#[async_trait]
pub trait Operations: Send + Sync + std::fmt::Debug + 'static {
    /// A queue's figures now: jobs waiting, leased, scheduled and dead, the oldest wait, whether it is paused.
    async fn stats(&self, queue: &QueueName) -> Result<QueueStats, BrokerError>;

    /// Scheduled and retrying jobs of `queue` due within `within` from now, those already due included: work
    /// that will be waiting soon (the autoscaler counts it as backlog).
    async fn scheduled_due(&self, queue: &QueueName, within: Duration) -> Result<u64, BrokerError>;

    /// Jobs of `queue` leased and not yet finished, per consumer holding them; consumers holding none are absent.
    /// The autoscaler reads it to stop the idlest workers first.
    async fn leases_by_consumer(
        &self,
        queue: &QueueName,
    ) -> Result<BTreeMap<String, u64>, BrokerError>;

    /// Every queue that has received a job.
    async fn queues(&self) -> Result<Vec<QueueName>, BrokerError>;

    /// Stop handing out `queue`'s jobs (claims get nothing); submitting still works.
    async fn pause(&self, queue: &QueueName) -> Result<(), BrokerError>;

    /// Hand out `queue`'s jobs again after [`Operations::pause`].
    async fn resume(&self, queue: &QueueName) -> Result<(), BrokerError>;

    /// Dead-lettered jobs of a queue, newest first.
    async fn dead_letters(
        &self,
        queue: &QueueName,
        limit: usize,
    ) -> Result<Vec<JobInfo>, BrokerError>;

    /// Put a dead job back in its queue with a fresh attempt budget.
    async fn retry_dead(&self, id: JobId) -> Result<RetryOutcome, BrokerError>;

    /// A real round trip to every backing store.
    async fn ping(&self) -> Result<(), BrokerError>;
}

/// Live job events and what a listener missed of them: the gateway hub's job topics (partitions, queues) and
/// their replay after a reconnect; tools and tests that watch every event.
#[async_trait]
pub trait EventFeed: Send + Sync + std::fmt::Debug + 'static {
    /// Every live lifecycle event from now on, whatever any [`EventFeed::job_feed`] watches. Slow subscribers
    /// lose events (they can recover from the durable log) rather than slow the engine down.
    async fn subscribe(&self) -> Result<EventStream, BrokerError>;

    /// A feed of job events for this node, limited to the [`Topic`]s its [`JobFeedControl`] watches: the
    /// partitions of the subjects its clients are, the queues they follow. The Redis engine publishes each call's
    /// events per partition of the jobs' owners, per queue, and (jobs enqueued by an older ferry) on the legacy
    /// channel, so a node receives only what it watches; each event comes tagged with the kind of topic it came
    /// through ([`Via`]). An engine with a single process may deliver everything ([`Via::All`]).
    async fn job_feed(&self) -> Result<JobFeed, BrokerError>;

    /// The job events after `since` that `keep` selects, from the event log of `scope` (Redis: the shard's
    /// `ferry:events` stream; the memory engine: a ring of recent events), oldest first. At most `scan` log
    /// entries are read: a channel that missed more is reported as not recovered, as is one whose `since` is from
    /// another epoch, trimmed from the log or older than `ChannelHistory::ttl`. `EventScope::All` with several
    /// shards has no single order: never recovered.
    async fn events_missed(
        &self,
        _scope: EventScope<'_>,
        _since: &StreamPos,
        _scan: usize,
        _keep: &EventFilter<'_>,
    ) -> Result<Missed<Event>, BrokerError> {
        Ok(Missed::lost(None))
    }

    /// The epoch of the event log carrying `queue`'s events, as this node last read it (Redis: the shard's
    /// `ferry:epoch`, read when the event feed (re)connects to it and on every history read). `None` until known.
    fn events_epoch(&self, _queue: &QueueName) -> Option<String> {
        None
    }
}

/// Application channels and the gateway tier around them: the gateway hub's publish, channel feed and history
/// replay, and the membership the gateway cluster and balancers share.
#[async_trait]
pub trait PubSub: Send + Sync + std::fmt::Debug + 'static {
    /// Publish `payload` on the application channel `channel` to every node listening to it (through a
    /// [`ChannelFeed`]), this one included. At most once: a node that is not subscribed (or is disconnected)
    /// at that moment does not get it. The message is also appended to the channel's bounded history
    /// ([`PubSub::channel_history`]) in the same step, and delivered with its [`StreamPos`], so a listener that
    /// missed it can read it back ([`PubSub::channel_missed`]).
    async fn publish(&self, channel: &str, payload: String) -> Result<(), BrokerError>;

    /// [`PubSub::publish`], returning the message's sequence number when every listener of the engine lives in
    /// this process (the memory engine): its [`ChannelFeed`]s yield messages in rising sequence across channels,
    /// at offset `"0-<n>"`, so a publisher can wait until its own node has handed the message on, as an
    /// in-process broadcast does before it answers. `None` for an engine that delivers through a server (Redis):
    /// there the answer means "accepted", and waiting for this node's copy would only add a round trip.
    async fn publish_in_process(
        &self,
        channel: &str,
        payload: String,
    ) -> Result<Option<u64>, BrokerError> {
        self.publish(channel, payload).await.map(|()| None)
    }

    /// A feed of application channel messages for this node: it [`ChannelControl::subscribe`]s the channels
    /// local listeners want and yields their messages. One per node is enough; the Redis engine holds one
    /// subscription per channel per feed.
    async fn channels(&self) -> Result<ChannelFeed, BrokerError>;

    /// How much history application channels keep, and how far back recovery reaches (both engines take it
    /// from their constructor's caller: `--history-size`, `--history-ttl-ms`).
    fn channel_history(&self) -> ChannelHistory {
        ChannelHistory::default()
    }

    /// What the application channel `channel` missed after `since`: the messages published after it, oldest
    /// first, at most `max` (more is reported as not recovered). `recovered` is false when the epoch differs, when
    /// the history was trimmed past `since` (more than `ChannelHistory::size` messages since) or when `since` is
    /// older than `ChannelHistory::ttl`.
    async fn channel_missed(
        &self,
        _channel: &str,
        _since: &StreamPos,
        _max: usize,
    ) -> Result<Missed<HistoryEntry>, BrokerError> {
        Ok(Missed::lost(None))
    }

    /// Which shard (an index below [`EventLog::log_shards`]) carries the application channel `channel`, when the
    /// engine spreads channels over shards; `None` when it does not (one shard, or no such notion). A readiness
    /// canary uses it to pick one channel per shard.
    fn channel_shard(&self, _channel: &str) -> Option<usize> {
        None
    }

    /// The gateway membership this engine keeps (Redis: `ferry:gw`; memory: in-process), or `None` when it
    /// keeps none. Wrappers around an engine should pass their inner engine's on.
    fn membership(&self) -> Option<&dyn Membership> {
        None
    }
}

/// The durable event log read as a consumer group: the recorder copies it into the durable store; the gateway
/// sheds load when the recorder falls behind ([`EventLog::log_backlog`]).
#[async_trait]
pub trait EventLog: Send + Sync + std::fmt::Debug + 'static {
    /// How many shards the durable event log has (each is read on its own: [`EventLog::read_log`]).
    fn log_shards(&self) -> usize;

    /// Read shard `shard` of the durable event log as consumer `consumer` of the consumer group `group`
    /// (created on first use, from the oldest entry still held). With `reclaim_idle`, entries delivered to a
    /// consumer of the group longer ago than that and never acknowledged (their reader died) come first and
    /// move to `consumer`; then new entries. Up to `max` entries, waiting up to `wait` when there are none. An
    /// entry stays pending until [`EventLog::ack_log`].
    async fn read_log(
        &self,
        shard: usize,
        group: &str,
        consumer: &str,
        max: usize,
        wait: Duration,
        reclaim_idle: Option<Duration>,
    ) -> Result<Vec<LogEntry>, BrokerError>;

    /// Acknowledge log entries read by [`EventLog::read_log`]: they will not be delivered to `group` again.
    async fn ack_log(&self, group: &str, entries: &[LogPosition]) -> Result<(), BrokerError>;

    /// How far `group` is behind: log entries not yet acknowledged by it (delivered or not), summed over shards.
    /// 0 when the group does not exist.
    async fn log_backlog(&self, group: &str) -> Result<u64, BrokerError>;
}

/// The broker traits, for `use ferry_broker::prelude::*`: a trait's methods can be called only where it is in
/// scope (except through a `dyn` of it or of [`Broker`]).
pub mod prelude {
    pub use crate::{Broker, EventFeed, EventLog, Housekeeping, Jobs, Leasing, Operations, PubSub};
}

/// The actor of the events of [`Housekeeping::restore`].
pub const RESTORE_ACTOR: &str = "reconciler";

/// The consumer group of the recorder, which copies the event log into the durable store.
pub const RECORDER_GROUP: &str = "recorder";

/// Engine settings shared by both engines.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// A leased job not heartbeated for this long is reclaimed by any worker's reaper.
    pub visibility_timeout: Duration,
    /// How long finished (completed, cancelled) jobs stay in the engine for lookups.
    pub finished_retention: Duration,
    /// Longest dead-letter list per queue; older dead jobs are dropped from the engine.
    pub dead_letter_max: usize,
    /// Hard cap of the durable event log per shard, in entries (each entry packs one call's events): the
    /// oldest entries go past it even if the recorder has not copied them, so keep the gateway's backlog
    /// high-water mark well below it. Entries the recorder has acknowledged are trimmed sooner.
    pub event_stream_max: usize,
    /// How long an idempotency key is remembered.
    pub idempotency_ttl: Duration,
    /// Finished jobs (completed, cancelled) leave the engine as soon as the recorder (consumer group
    /// [`RECORDER_GROUP`] of the event log) has acknowledged their final event, instead of after
    /// `finished_retention`: for processes whose lookups fall back to the durable store, which then holds them.
    /// Dead jobs stay (they can be retried). Jobs finished while this is off leave by `finished_retention`.
    pub drop_recorded: bool,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            visibility_timeout: Duration::from_secs(30),
            finished_retention: Duration::from_secs(3600),
            dead_letter_max: 10_000,
            event_stream_max: 1_000_000,
            idempotency_ttl: Duration::from_secs(24 * 3600),
            drop_recorded: false,
        }
    }
}

pub use ferry_core::Job;
