//! Values that cross the [`Broker`](crate::Broker) boundary.

use std::pin::Pin;
use std::sync::Arc;

use ferry_core::{Backoff, Event, Job, JobId, JobState, QueueName, ValidationError};
use futures::Stream;
use serde::Serialize;

/// Live events; see [`EventFeed::subscribe`](crate::EventFeed::subscribe).
pub type EventStream = Pin<Box<dyn Stream<Item = Event> + Send>>;

/// Proof that a consumer holds a job's current attempt. Every fenced call presents it; the engine applies the
/// call only if the lease is still current.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Lease {
    pub queue: QueueName,
    pub job: JobId,
    pub consumer: Arc<str>,
    /// Engine-specific fence (Redis: priority and stream entry id; memory: the lease epoch).
    pub token: String,
    /// The attempt this lease is for (1-based), with the job's retry settings, so a failure can be decided
    /// without another read.
    pub attempt: u32,
    pub max_attempts: u32,
    pub backoff: Backoff,
}

/// A job together with its lease.
#[derive(Debug, Clone)]
pub struct Leased {
    pub job: Job,
    pub lease: Lease,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Enqueued {
    pub id: JobId,
    /// `queued`, or `scheduled` for a delayed job.
    pub state: JobState,
    /// True when an idempotency key matched an earlier job: `id` is that job's.
    pub duplicate: bool,
}

#[derive(Debug, Clone)]
pub struct Completion {
    pub lease: Lease,
    pub result: serde_json::Value,
}

/// How a failed attempt should be retried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retry {
    /// Use the job's backoff (exponential, full jitter).
    Backoff,
    /// Retry no sooner than this many milliseconds from now (a webhook's `Retry-After`).
    After(u64),
    /// A permanent error: dead-letter now, whatever attempts are left.
    Never,
}

impl Retry {
    /// What a failed attempt leads to, the one rule both engines apply: dead when the error is permanent or
    /// `attempt` was the last allowed, otherwise another attempt at `now` plus the backoff (or the asked) delay.
    pub fn outcome(
        self,
        attempt: u32,
        max_attempts: u32,
        backoff: &Backoff,
        now: u64,
    ) -> FailOutcome {
        let delay = match self {
            _ if attempt >= max_attempts => return FailOutcome::Dead,
            Retry::Never => return FailOutcome::Dead,
            Retry::Backoff => backoff.delay_ms(attempt),
            Retry::After(ms) => ms,
        };
        FailOutcome::Retrying {
            run_at: now.saturating_add(delay),
        }
    }
}

#[derive(Debug, Clone)]
pub struct Failure {
    pub lease: Lease,
    pub error: String,
    pub retry: Retry,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailOutcome {
    /// Will run again at `run_at` (ms since the epoch).
    Retrying {
        run_at: u64,
    },
    Dead,
}

/// A fenced call whose lease is no longer held: the job was reclaimed after a missed heartbeat, or cancelled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("lease no longer held")]
pub struct Rejected;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CancelOutcome {
    /// Cancelled; the state it was in.
    Cancelled(JobState),
    /// Already completed, dead or cancelled.
    AlreadyFinal(JobState),
    NotFound,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetryOutcome {
    Requeued,
    /// The job exists but is not dead.
    NotDead(JobState),
    NotFound,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Reclaimed {
    pub requeued: usize,
    pub dead: usize,
}

/// A queue's figures.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct QueueStats {
    pub queue: QueueName,
    /// Jobs waiting to be claimed (the consumer-group lag, summed over priorities).
    pub depth: u64,
    /// Jobs leased to a worker (pending entries).
    pub active: u64,
    /// Delayed and retrying jobs not yet due.
    pub scheduled: u64,
    /// Jobs in the dead-letter list.
    pub dead: u64,
    /// Age of the oldest waiting job in milliseconds (0 when none waits).
    pub lag_ms: u64,
    pub paused: bool,
    /// Jobs handed to workers since the queue was created (a counter: its rate is the queue's claim
    /// throughput; redeliveries count again).
    pub delivered: u64,
}

/// Errors of the engine itself (a job's own failure is not one).
#[derive(Debug, Clone, thiserror::Error)]
pub enum BrokerError {
    #[error(transparent)]
    Invalid(#[from] ValidationError),
    /// The backing store did not answer; the call may be retried.
    #[error("broker unavailable: {0}")]
    Unavailable(String),
    /// A bug or corrupted data; not retried.
    #[error("broker internal error: {0}")]
    Internal(String),
}

/// A message published on an application channel (see [`PubSub::publish`](crate::PubSub::publish)).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChannelMessage {
    /// The channel name as given to `publish`, without any engine prefix.
    pub channel: String,
    pub payload: String,
    /// Where the message sits in the channel's history; `None` for a message from a publisher that keeps no
    /// history (an older ferry during a rolling upgrade).
    pub position: Option<StreamPos>,
}

/// A place in a channel's history, as pushed frames carry it: `offset` is a Redis stream id `"<ms>-<seq>"`
/// (the memory engine: `"0-<n>"`), rising within the channel; `epoch` changes when the history was lost.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamPos {
    pub offset: String,
    pub epoch: String,
}

/// A stream id `"<ms>-<seq>"` as a comparable pair; `None` when it is not one.
pub fn parse_offset(offset: &str) -> Option<(u64, u64)> {
    let (ms, seq) = offset.split_once('-')?;
    let digits = |s: &str| !s.is_empty() && s.len() <= 20 && s.bytes().all(|b| b.is_ascii_digit());
    if !digits(ms) || !digits(seq) {
        return None;
    }
    Some((ms.parse().ok()?, seq.parse().ok()?))
}

/// The offset of a job event in its channels: its entry id in the shard's event stream (the part of the event
/// id before `/`). The memory engine's numeric sequence `n` is written `"0-<n>"`, its offset form.
pub fn event_offset(e: &ferry_core::Event) -> Option<String> {
    let sid = e.id.split('/').next().filter(|s| !s.is_empty())?;
    if sid.contains('-') {
        parse_offset(sid).map(|_| sid.to_owned())
    } else {
        sid.parse::<u64>().ok().map(|n| format!("0-{n}"))
    }
}

/// How much history an application channel keeps (`--history-size`, `--history-ttl-ms`), and how far back a
/// job-event channel may be recovered (the same age).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChannelHistory {
    /// Messages kept per application channel (Redis: `XADD MAXLEN ~`, so up to about twice as many stay).
    pub size: usize,
    /// A channel's history is dropped this long after its last publish, and no recovery reaches further back.
    pub ttl: std::time::Duration,
}

impl Default for ChannelHistory {
    fn default() -> Self {
        Self {
            size: 100,
            ttl: std::time::Duration::from_millis(300_000),
        }
    }
}

/// One application channel message read back from its history.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HistoryEntry {
    pub offset: String,
    pub payload: String,
}

/// What a channel missed since a position ([`PubSub::channel_missed`](crate::PubSub::channel_missed),
/// [`EventFeed::events_missed`](crate::EventFeed::events_missed)).
#[derive(Debug, Clone)]
pub struct Missed<T> {
    /// Everything published after the position, oldest first, when `recovered`; empty otherwise.
    pub entries: Vec<T>,
    /// True only when the history reaches back to the position: same epoch, nothing after it trimmed or expired,
    /// and all of it within the read's bound.
    pub recovered: bool,
    /// The channel's current epoch; `None` when the channel has none (a `user:` channel over several shards).
    pub epoch: Option<String>,
}

impl<T> Missed<T> {
    /// Not recoverable: nothing to replay.
    pub fn lost(epoch: Option<String>) -> Self {
        Self {
            entries: Vec::new(),
            recovered: false,
            epoch,
        }
    }
}

/// Which job events a channel gets, for [`EventFeed::events_missed`](crate::EventFeed::events_missed).
pub type EventFilter<'a> = dyn Fn(&Event) -> bool + Send + Sync + 'a;

/// Where a job-event channel's events come from, for [`EventFeed::events_missed`](crate::EventFeed::events_missed).
#[derive(Debug, Clone, Copy)]
pub enum EventScope<'a> {
    /// The shard carrying this queue (`queue:` and `job:` channels).
    Queue(&'a QueueName),
    /// Every shard (`user:` channels: a subject's jobs may be in any queue).
    All,
}

/// The messages of application channels, as a stream.
pub type ChannelStream = Pin<Box<dyn Stream<Item = ChannelMessage> + Send>>;

/// A subscription command, confirmed once the engine listens to the channel (Redis: the SUBSCRIBE was
/// answered). A subscribe that fails is still remembered: the engine subscribes again after a reconnect.
pub type Confirmation = futures::future::BoxFuture<'static, Result<(), BrokerError>>;

/// What an engine implements to steer a [`ChannelFeed`]. Commands take effect in call order (each is queued
/// synchronously before the call returns), so a caller that serialises its own bookkeeping under a lock gets
/// the same order at the engine.
pub trait FeedControl: Send + Sync + std::fmt::Debug {
    fn subscribe(&self, channel: &str) -> Confirmation;
    fn unsubscribe(&self, channel: &str);
}

/// Subscribes and unsubscribes a [`ChannelFeed`]; cheap to clone and usable while the feed is being read.
#[derive(Debug, Clone)]
pub struct ChannelControl(Arc<dyn FeedControl>);

impl ChannelControl {
    pub fn new(inner: Arc<dyn FeedControl>) -> Self {
        Self(inner)
    }

    /// Start receiving `channel`. The command is queued before this returns; the returned future resolves once
    /// the engine confirmed it (messages published after that are delivered). Subscribing twice is harmless.
    pub fn subscribe(&self, channel: &str) -> Confirmation {
        self.0.subscribe(channel)
    }

    /// Stop receiving `channel` (queued before this returns).
    pub fn unsubscribe(&self, channel: &str) {
        self.0.unsubscribe(channel)
    }
}

/// This node's view of application channels: the channels it listens to (one engine subscription per channel,
/// whatever the number of local listeners, which the caller counts) and their messages, in one stream. The
/// Redis engine resubscribes every channel after a reconnect; messages published while disconnected are lost
/// (pub/sub is at most once). Dropping the feed ends its subscriptions.
pub struct ChannelFeed {
    control: ChannelControl,
    messages: ChannelStream,
}

impl std::fmt::Debug for ChannelFeed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChannelFeed")
            .field("control", &self.control)
            .finish_non_exhaustive()
    }
}

impl ChannelFeed {
    /// For engines: a feed from its control and its message stream.
    pub fn new(control: ChannelControl, messages: ChannelStream) -> Self {
        Self { control, messages }
    }

    pub fn control(&self) -> ChannelControl {
        self.control.clone()
    }

    /// The control (to share with whoever subscribes) and the stream (for the one reader).
    pub fn into_parts(self) -> (ChannelControl, ChannelStream) {
        (self.control, self.messages)
    }
}

impl Stream for ChannelFeed {
    type Item = ChannelMessage;

    fn poll_next(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<ChannelMessage>> {
        self.messages.as_mut().poll_next(cx)
    }
}

/// A set of job events a [`JobFeed`] can be told to deliver (see [`EventFeed::job_feed`](crate::EventFeed::job_feed)).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Topic {
    /// Events of the jobs whose owner is in this partition ([`crate::placement::partition_of`] of the job's
    /// tenant and owner, `""` for no owner).
    Partition(u16),
    /// Every event of this queue (the broker's name, tenant prefix included).
    Queue(QueueName),
    /// Events of jobs enqueued by a ferry that did not yet record the owner's partition in the job.
    Legacy,
}

/// Which of a node's subscriptions an event from a [`JobFeed`] is for. The Redis engine delivers an event once
/// per kind of topic that carries it (its owner's partition or [`Topic::Legacy`], and its queue), so a reader
/// routes each copy to one kind of subscriber and never delivers an event twice.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Via {
    /// Through the owner's partition (or the legacy topic): for the owner's and the job's subscribers.
    Owner,
    /// Through the queue's topic: for the queue's subscribers.
    Queue,
    /// The engine delivers every event once, whatever is watched (the memory engine): for every subscriber.
    All,
}

/// One event of a [`JobFeed`].
#[derive(Debug, Clone)]
pub struct FedEvent {
    pub via: Via,
    pub event: Event,
}

/// The events of a [`JobFeed`], as a stream.
pub type FedEventStream = Pin<Box<dyn Stream<Item = FedEvent> + Send>>;

/// What an engine implements to steer a [`JobFeed`]. Commands take effect in call order (each is queued
/// synchronously before the call returns).
pub trait TopicControl: Send + Sync + std::fmt::Debug {
    fn watch(&self, topic: &Topic) -> Confirmation;
    fn unwatch(&self, topic: &Topic);
}

/// Watches and unwatches the topics of a [`JobFeed`]; cheap to clone and usable while the feed is being read.
#[derive(Debug, Clone)]
pub struct JobFeedControl(Arc<dyn TopicControl>);

impl JobFeedControl {
    pub fn new(inner: Arc<dyn TopicControl>) -> Self {
        Self(inner)
    }

    /// Start receiving `topic`'s events. The command is queued before this returns; the returned future
    /// resolves once the engine confirmed it (events published after that are delivered), and not before an
    /// earlier watch of the same topic was confirmed. Watching twice is harmless; a failed watch is remembered
    /// and made again after a reconnect.
    pub fn watch(&self, topic: &Topic) -> Confirmation {
        self.0.watch(topic)
    }

    /// Stop receiving `topic` (queued before this returns). The engine keeps no count: one unwatch undoes any
    /// number of watches, so the caller counts its own interest.
    pub fn unwatch(&self, topic: &Topic) {
        self.0.unwatch(topic)
    }
}

/// This node's job events, limited to the [`Topic`]s it watches (one engine subscription per topic, whatever
/// the number of local listeners, which the caller counts). The Redis engine resubscribes every topic after a
/// reconnect; events published while disconnected are lost (pub/sub is at most once). Dropping the feed ends
/// its subscriptions.
pub struct JobFeed {
    control: JobFeedControl,
    events: FedEventStream,
}

impl std::fmt::Debug for JobFeed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JobFeed")
            .field("control", &self.control)
            .finish_non_exhaustive()
    }
}

impl JobFeed {
    /// For engines: a feed from its control and its event stream.
    pub fn new(control: JobFeedControl, events: FedEventStream) -> Self {
        Self { control, events }
    }

    pub fn control(&self) -> JobFeedControl {
        self.control.clone()
    }

    /// The control (to share with whoever watches) and the stream (for the one reader).
    pub fn into_parts(self) -> (JobFeedControl, FedEventStream) {
        (self.control, self.events)
    }
}

impl Stream for JobFeed {
    type Item = FedEvent;

    fn poll_next(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<FedEvent>> {
        self.events.as_mut().poll_next(cx)
    }
}

/// Where a log entry is: its shard and its stream entry id (the memory engine has one shard and numeric ids).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct LogPosition {
    pub shard: usize,
    pub sid: String,
}

/// One entry of the durable event log: the events one transition call wrote, in order.
#[derive(Debug, Clone)]
pub struct LogEntry {
    pub position: LogPosition,
    pub events: Vec<ferry_core::Event>,
    /// The entry's size as logged (its encoded events), for readers that bound what they hold in bytes.
    pub bytes: usize,
}
