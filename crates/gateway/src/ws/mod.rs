//! WebSockets (`GET /v1/ws`, in [`conn`]) and the per-node [`Hub`] that fans job events and application channel
//! messages out to this node's connections.
//!
//! The hub consumes two feeds from the broker: the job lifecycle events of the topics this node watches
//! ([`EventFeed::job_feed`]) and the application channels this node's clients subscribed to
//! ([`PubSub::channels`], one broker subscription per channel per node, taken on the first local subscriber and
//! dropped after the last). Each message is routed
//! through per-channel subscriber sets and handed to each connection's bounded send queue with `try_send`: the
//! hub never waits for a connection, and a connection whose queue is full is closed with 4009 (slow consumer).
//!
//! # Channels and tenants
//!
//! Clients name channels `user:<sub>`, `job:<id>`, `queue:<name>` and `app:<name>`. Inside the hub every channel
//! is a *hub key* that carries the tenant, so two tenants can never meet on one key:
//!
//! * `user:<tenant>/<sub>` (`user:/<sub>` without a tenant): a tenant is `[A-Za-z0-9._-]` (see
//!   [`crate::http::tenancy`]), so the first `/` ends it whatever the subject holds;
//! * `queue:<broker queue>` and `app:<broker name>`: names are mapped exactly as the HTTP API maps queues, the
//!   queue `emails` of tenant `acme` being `acme:emails`; events carry the broker queue, so they land on the key
//!   of the right tenant;
//! * `job:<id>`: ids are global; a subscription is allowed only to the job's owner (same tenant) or an admin.
//!
//! Pushed frames use the name the client subscribed with, and the queue as the client names it.
//!
//! # Which job events reach this node
//!
//! Only those it has a subscriber for. Each hub key with local subscribers holds one [`Topic`] of the job feed,
//! counted per topic and unwatched when the last key holding it goes: `user:` keys the partition of their
//! subject ([`partition_of`]; every connection joins its own on connect), `job:` keys the partition of the job's
//! owner (known from the lookup that authorizes the subscription), `queue:` keys their queue. The legacy topic
//! (jobs enqueued by an older ferry, whose events carry no partition) is watched for the node's life. An event
//! comes once through the owner's partition (or the legacy topic) and once through its queue; the first copy
//! goes to `user:` and `job:` subscribers only, the second to `queue:` subscribers only ([`Via`]), so no one
//! gets it twice.
//!
//! # Pushed frames
//!
//! `{"channel": "user:alice", "event": "job.completed", "data": {"id", "queue", "kind", "state", "attempt",
//! "at", "result" | "error" | "progress"}}` for job events (`result` for completed, `error` for retrying and
//! dead: the error text, a string as in `GET /v1/jobs/{id}`, with `run_at` for retrying; `progress` for
//! progress), and `{"channel": "app:chat", "event": "message", "data": <published JSON>}`
//! for application messages. A frame is rendered once per message and shared by every connection that gets it.
//!
//! Pushes are bounded so that no message can fail a subscriber's write (which would drop it for someone else's
//! doing): a publish whose `data` is over `max_publish_bytes` is refused at its sender ([`Hub::prepare_publish`])
//! and one from elsewhere is not forwarded; a job event's `result` / `error` / `progress` over it is left out and
//! replaced by `"<field>_omitted": true`. Every connection's write buffer ([`write_buffer_cap`]) takes the
//! largest frame that leaves.
//!
//! # Token refresh
//!
//! A connection closes with 4001 when its token's `exp` passes. `{"id", "op": "refresh", "token"}` before then
//! replaces the token: it must verify like any token (`unauthorized` otherwise) and carry the same `sub` and
//! `tenant` (`forbidden` otherwise: a connection never changes identity, and its subscriptions were authorized
//! for that identity). A refused refresh changes nothing, so the old `exp` still applies. An accepted one
//! answers `{"id", "ok": true, "exp"}`; the new token's `exp` and scopes apply from then on (subscriptions already
//! made are kept).
//!
//! # Closing
//!
//! The hub ends a connection through its `ConnHandle`: 4009 when its send queue (`send_queue` frames) is full,
//! whether the peer stopped reading or only reads too slowly, and 1001 to every connection when the node shuts
//! down (the hub marks and wakes every connection it holds). The connection itself closes with
//! 1008 on a binary frame, 1009 on a frame over `max_frame_bytes`, 4001 on expiry, 4008 on a sustained flood
//! (text, ping and pong frames all count against the rate), 4009 when a write finds its write buffer full and
//! 1013 when it was over the connection limits. A close frame gets 1 s to go out; a peer that does not read by
//! then loses it and sees the socket closed.
//!
//! # Draining
//!
//! A node that shuts down first reports itself draining ([`Hub::start_draining`]: `/readyz` answers 503), then
//! calls [`Hub::goaway`]: new upgrades are refused with 503, and every connection is sent
//! `{"type": "goaway", "reason": "shutdown", "reconnect_after_ms": N}` and closed with 1001 N ms later, N drawn
//! uniformly from `[0, ws_close_spread)` per connection so clients do not reconnect in lockstep. Frames keep
//! flowing until the close. The hub's own shutdown (the token given to [`Hub::run`]) still closes whatever is
//! left at once.
//!
//! Rebalancing ([`crate::cluster`]) moves single connections the same way: [`Hub::move_away`] wakes the
//! connection, which sends `{"type": "goaway", "reason": "rebalance", …}` and closes 1001 (reason `rebalance`)
//! after its own delay. The hub keeps every connection's handle by id ([`Hub::movable`]), with its subject's
//! placement partition and admission time.
//!
//! # Pub/sub canary
//!
//! The hub holds one subscription of its own, kept open, on node-private application channels
//! `ferry.canary.<node>.<k>`: one channel per shard when the engine says which shard carries a channel
//! ([`PubSub::channel_shard`]), one channel otherwise. [`Hub::probe_pubsub`] publishes a unique payload on each
//! through [`PubSub::publish`] and waits for it to come back through this node's channel feed, the same feed
//! that serves clients, so a silently stuck subscription makes the node unready. Concurrent probes share one.
//!
//! [`EventFeed::job_feed`]: ferry_broker::EventFeed::job_feed
//! [`PubSub::channels`]: ferry_broker::PubSub::channels
//! [`PubSub::channel_shard`]: ferry_broker::PubSub::channel_shard
//! [`PubSub::publish`]: ferry_broker::PubSub::publish

pub mod conn;
mod outbox;
mod replay;

use std::collections::HashMap;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, RwLock};
use std::time::{Duration, Instant};

use axum::extract::ws::Utf8Bytes;
use ferry_broker::placement::partition_of;
use ferry_broker::{
    Broker, ChannelControl, ChannelMessage, Confirmation, FedEvent, JobFeedControl, Topic, Via,
};
use ferry_core::{Event, EventType};
use ferry_telemetry::prometheus;
use futures::StreamExt;
use futures::future::{BoxFuture, FutureExt, Shared};
use governor::{DefaultKeyedRateLimiter, Quota};
use serde_json::{Value, json};
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

pub use conn::upgrade;

use crate::config::LimitsConfig;
use crate::error::ApiError;

/// Close codes the gateway uses.
pub mod close {
    pub const GOING_AWAY: u16 = 1001;
    pub const POLICY: u16 = 1008;
    pub const TOO_BIG: u16 = 1009;
    pub const TRY_AGAIN_LATER: u16 = 1013;
    pub const TOKEN_EXPIRED: u16 = 4001;
    pub const RATE_LIMITED: u16 = 4008;
    pub const SLOW_CONSUMER: u16 = 4009;
}

/// What the hub shares with one connection: its send queue and a way to close it from outside.
#[derive(Debug)]
pub(crate) struct ConnHandle {
    id: u64,
    pub(crate) outbox: outbox::Outbox,
    /// Close code asked for by the hub (0: none); set before `killed`.
    close_code: AtomicU16,
    /// Set by [`ConnHandle::close`], which wakes the connection through its outbox (see [`ConnHandle::signal`]),
    /// even while it waits on a blocked write.
    killed: AtomicBool,
    /// Set by [`Hub::move_away`]: the connection says `goaway` (`"reason": "rebalance"`) and closes.
    moved: AtomicBool,
    /// The placement partition of the connection's subject.
    pub(crate) partition: u16,
    /// When it was admitted, in ms since the hub's start (a `u32` would do for 49 days; 8 bytes is no cost
    /// beside the rest).
    since_ms: u64,
}

/// What a connection waiting on its [`ConnHandle`] must do next.
#[derive(Debug)]
pub(crate) enum Signal {
    /// Close now: [`ConnHandle::ending`] says with what.
    Kill,
    /// Placement moved it to another node: say `goaway` and close after a delay.
    Move,
    /// The node drains ([`Hub::goaway`]): say `goaway` and close after a delay.
    Goaway,
    /// Something to write (see [`outbox::Outbox::take_next`]).
    Write(outbox::Next),
}

impl ConnHandle {
    /// Ask the connection to close with `code` (the first request wins).
    pub(crate) fn close(&self, code: u16) {
        let _ = self
            .close_code
            .compare_exchange(0, code, Ordering::AcqRel, Ordering::Acquire);
        self.killed.store(true, Ordering::Release);
        self.outbox.wake();
    }

    /// Must the connection end now: [`ConnHandle::close`] was called or the hub shut down?
    fn must_end(&self, hub: &Hub) -> bool {
        self.killed.load(Ordering::Acquire) || hub.shutdown.is_cancelled()
    }

    /// Resolves once the connection must end: [`ConnHandle::close`] was called or the hub shut down.
    pub(crate) async fn killed(&self, hub: &Hub) {
        while !self.must_end(hub) {
            self.outbox.woken().await;
        }
    }

    /// What the connection's task must do next, waiting until there is something: end ([`Signal::Kill`]),
    /// then (only while `open`, i.e. not already saying goodbye) leave ([`Signal::Move`], [`Signal::Goaway`]),
    /// then write ([`Signal::Write`]).
    ///
    /// Everything that concerns the task wakes it through one `Notify`, its outbox's: a close, a move, the
    /// hub's goaway and shutdown, a queued frame. The wake stores a permit when the task is not waiting, and
    /// every wait checks all of the state above first, so a wake meant for something else (taken by a blocked
    /// write's [`ConnHandle::killed`]) is never lost. One small future instead of one per source: each is part
    /// of every idle connection's task, which is also why this is an async block rather than an `async fn`
    /// (see [`conn::run`]).
    #[allow(clippy::manual_async_fn)] // On purpose, see above.
    pub(crate) fn signal<'a>(
        &'a self,
        hub: &'a Hub,
        open: bool,
    ) -> impl Future<Output = Signal> + Send + 'a {
        async move {
            loop {
                if self.must_end(hub) {
                    return Signal::Kill;
                }
                if open {
                    if self.moved() {
                        return Signal::Move;
                    }
                    if hub.closing() {
                        return Signal::Goaway;
                    }
                }
                if let Some(next) = self.outbox.take_next() {
                    return Signal::Write(next);
                }
                self.outbox.woken().await;
            }
        }
    }

    /// True once the hub moved this connection away.
    pub(crate) fn moved(&self) -> bool {
        self.moved.load(Ordering::Acquire)
    }

    /// The reason of the 1001 close that ends a `goaway`.
    pub(crate) fn going_away(&self) -> (u16, &'static str) {
        if self.moved() {
            (close::GOING_AWAY, "rebalance")
        } else {
            (close::GOING_AWAY, "server shutting down")
        }
    }

    /// Why `kill` was cancelled, as the close frame to send: the code asked for by [`ConnHandle::close`], or
    /// 1001 when no one asked (the node is shutting down).
    pub(crate) fn ending(&self) -> (u16, &'static str) {
        match self.close_code.load(Ordering::Acquire) {
            0 => (close::GOING_AWAY, "server shutting down"),
            close::SLOW_CONSUMER => (close::SLOW_CONSUMER, "slow consumer"),
            code => (code, "closed by the server"),
        }
    }
}

/// One subscriber of a hub key: the connection and the name it subscribed with (what pushed frames say).
#[derive(Debug)]
struct Sub {
    conn: Arc<ConnHandle>,
    view: Arc<View>,
    /// Only around a recovery, so boxed: every idle connection holds a `Sub` in its `user:` key's map (a map of
    /// one entry allocates four slots), and inline this state made each slot 48 bytes larger.
    recovery: Option<Box<Recovery>>,
}

/// A subscriber's state around a recovery (see [`replay`]).
#[derive(Debug, Default)]
struct Recovery {
    /// While its missed frames are being read back: its live frames, held with their offsets, to be sent after
    /// the replayed ones.
    hold: Option<Vec<Positioned>>,
    /// After a recovery: the last offset replayed. The live feed may still bring frames the history read already
    /// had (it lags behind a read on another connection); those are dropped until the first later one passes
    /// (a channel's frames come in offset order, so none at or below it can follow).
    floor: Option<(u64, u64)>,
}

/// A rendered frame with its offset (parsed), when it has one.
type Positioned = (Option<(u64, u64)>, Utf8Bytes);

/// How one client sees a hub key.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct View {
    /// The channel as the client named it.
    pub channel: String,
    /// The client's tenant: stripped from queue names in pushed frames.
    pub tenant: Option<String>,
}

/// Fans events and channel messages out to this node's connections.
pub struct Hub {
    broker: Arc<dyn Broker>,
    limits: LimitsConfig,
    /// Hub key → subscribers by connection id. A std mutex: held only for map updates and `try_send`s, never
    /// across an await.
    channels: Mutex<HashMap<String, HashMap<u64, Sub>>>,
    /// The control of the broker's application channel feed while `run` has one open. Replaced when the feed is
    /// reopened; always taken after `channels` when both are held, so a reopen resubscribes exactly the keys
    /// that have local subscribers.
    feed: RwLock<Option<ChannelControl>>,
    /// The control of the broker's job event feed while `run` has one open; like `feed`, replaced when the feed
    /// is reopened and taken after `channels` (and `watching`) when they are held together. A watch channel,
    /// so a subscription made while the feed is (re)opening can wait for it ([`Hub::subscribe`]).
    job_feed: tokio::sync::watch::Sender<Option<JobFeedControl>>,
    /// The job feed topics the hub keys with local subscribers hold. Taken after `channels`.
    watching: Mutex<Watching>,
    connections: AtomicUsize,
    /// Rejections and closes, for `/metrics`.
    counters: WsCounters,
    per_subject: Mutex<HashMap<String, usize>>,
    next_id: AtomicU64,
    /// Failed upgrades per IP, so token guessing costs the guesser.
    unauth: DefaultKeyedRateLimiter<IpAddr>,
    /// Cancelled when `run` sees shutdown: every connection closes with 1001.
    shutdown: CancellationToken,
    /// Set when the node starts draining: `/readyz` answers 503.
    draining: AtomicBool,
    /// The node's shutdown token (see [`Hub::drain_on`]): cancelled means draining, with no task in between.
    drain_token: OnceLock<CancellationToken>,
    /// Cancelled by [`Hub::goaway`]: connections say goodbye and close within `close_spread_ms`.
    goaway: CancellationToken,
    close_spread_ms: AtomicU64,
    canary: Canary,
    /// Every open connection by id, for rebalancing (its partition and age are in the handle).
    conns: Mutex<HashMap<u64, Arc<ConnHandle>>>,
    /// Connections moved away ([`Hub::move_away`]) and not closed yet.
    moving: AtomicUsize,
    /// Connection ages are counted from here.
    started: Instant,
    /// With an in-process engine: the highest channel message sequence this node has handed to its
    /// subscribers, which a local publisher waits for ([`Hub::publish`]).
    handed: tokio::sync::watch::Sender<u64>,
}

/// Which hub keys hold which job feed topic, and how many keys hold each topic.
#[derive(Debug, Default)]
struct Watching {
    /// Hub key (with local subscribers) → its topic, for `job:` keys only: a `user:` or `queue:` key's topic
    /// is [`key_topic`] of the key, and storing it would cost every idle connection about 100 bytes.
    of_key: HashMap<String, Topic>,
    /// Topic → keys holding it (never 0: a topic no key holds is removed and unwatched).
    keys: HashMap<Topic, usize>,
    /// How many of `keys` are partitions (the `ferry_gateway_partitions` gauge).
    partitions: usize,
}

impl Watching {
    /// `key` (just given its first subscriber) holds `topic`; true when the topic was not watched yet.
    fn hold(&mut self, key: &str, topic: Topic) -> bool {
        match key_topic(key) {
            Some(derived) => debug_assert_eq!(derived, topic, "{key} holds its own topic"),
            None => {
                self.of_key.insert(key.to_owned(), topic.clone());
            }
        }
        let n = self.keys.entry(topic.clone()).or_insert(0);
        *n += 1;
        let first = *n == 1;
        if first && matches!(topic, Topic::Partition(_)) {
            self.partitions += 1;
        }
        first
    }

    /// `key` lost its last subscriber: the topic it held when no other key holds it any more.
    fn release(&mut self, key: &str) -> Option<Topic> {
        let topic = match key_topic(key) {
            Some(t) => t,
            None => self.of_key.remove(key)?,
        };
        let n = self.keys.get_mut(&topic)?;
        *n -= 1;
        if *n > 0 {
            return None;
        }
        self.keys.remove(&topic);
        if matches!(topic, Topic::Partition(_)) {
            self.partitions -= 1;
        }
        Some(topic)
    }
}

/// The job feed topic a `user:` or `queue:` hub key holds (a `job:` key's comes from the job's lookup).
pub(crate) fn key_topic(key: &str) -> Option<Topic> {
    if let Some(rest) = key.strip_prefix("user:") {
        // `user:<tenant>/<sub>`: a tenant holds no `/`, so the first one ends it.
        let (tenant, sub) = rest.split_once('/')?;
        return Some(Topic::Partition(partition_of(Some(tenant), sub)));
    }
    let q = key.strip_prefix("queue:")?;
    ferry_core::QueueName::parse(q).ok().map(Topic::Queue)
}

/// The job feed topic of a `job:` key: the partition of the job's owner.
pub(crate) fn job_topic(owner: Option<&str>, tenant: Option<&str>) -> Topic {
    Topic::Partition(partition_of(tenant, owner.unwrap_or("")))
}

/// What one pub/sub canary probe found.
#[derive(Debug, Clone)]
pub struct PubSubCheck {
    pub ok: bool,
    pub ms: u64,
    pub error: Option<String>,
}

/// The hub's own subscription on node-private channels, and the probes waiting for their echo.
#[derive(Debug)]
struct Canary {
    /// `ferry.canary.<node>.`: every canary channel starts with it.
    prefix: String,
    /// The channels, each with the shard carrying it (when the engine says).
    channels: Vec<(Option<usize>, String)>,
    /// Payload → the probe waiting for it.
    waiting: Mutex<HashMap<String, oneshot::Sender<()>>>,
    seq: AtomicU64,
    /// The probe in flight, shared by concurrent callers, with when it started.
    inflight: Mutex<Option<(Instant, Shared<BoxFuture<'static, PubSubCheck>>)>>,
}

impl Canary {
    fn new(broker: &dyn Broker) -> Self {
        let prefix = format!("ferry.canary.{:016x}.", rand::random::<u64>());
        let shards = broker.log_shards().max(1);
        let mut channels: Vec<(Option<usize>, String)> = Vec::new();
        match broker.channel_shard(&format!("{prefix}0")) {
            None => channels.push((None, format!("{prefix}0"))),
            Some(_) => {
                // Rendezvous hashing spreads names evenly: a few names per shard cover every shard.
                for k in 0..shards * 64 {
                    let name = format!("{prefix}{k}");
                    let shard = broker.channel_shard(&name);
                    if !channels.iter().any(|(s, _)| *s == shard) {
                        channels.push((shard, name));
                    }
                    if channels.len() == shards {
                        break;
                    }
                }
                channels.sort();
            }
        }
        Self {
            prefix,
            channels,
            waiting: Mutex::new(HashMap::new()),
            seq: AtomicU64::new(0),
            inflight: Mutex::new(None),
        }
    }

    fn waiting(&self) -> MutexGuard<'_, HashMap<String, oneshot::Sender<()>>> {
        self.waiting.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl std::fmt::Debug for Hub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hub")
            .field("connections", &self.connections.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl Hub {
    pub fn new(broker: Arc<dyn Broker>, limits: LimitsConfig) -> Arc<Self> {
        let per_ip = NonZeroU32::new(limits.unauth_upgrades_per_sec_per_ip.max(1))
            .unwrap_or(NonZeroU32::MIN);
        Arc::new(Self {
            unauth: DefaultKeyedRateLimiter::keyed(Quota::per_second(per_ip)),
            limits,
            channels: Mutex::new(HashMap::new()),
            feed: RwLock::new(None),
            job_feed: tokio::sync::watch::Sender::new(None),
            watching: Mutex::new(Watching::default()),
            connections: AtomicUsize::new(0),
            counters: WsCounters::default(),
            per_subject: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
            shutdown: CancellationToken::new(),
            draining: AtomicBool::new(false),
            drain_token: OnceLock::new(),
            goaway: CancellationToken::new(),
            close_spread_ms: AtomicU64::new(0),
            canary: Canary::new(broker.as_ref()),
            conns: Mutex::new(HashMap::new()),
            moving: AtomicUsize::new(0),
            started: Instant::now(),
            handed: tokio::sync::watch::Sender::new(0),
            broker,
        })
    }

    /// Report this node as draining: `/readyz` answers 503 from now on.
    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::Release);
    }

    /// Report this node as draining as soon as `token` is cancelled (the first token given wins).
    pub fn drain_on(&self, token: CancellationToken) {
        let _ = self.drain_token.set(token);
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
            || self.drain_token.get().is_some_and(|t| t.is_cancelled())
    }

    /// Refuse new upgrades, send every connection a `goaway` frame and close each with 1001 after a delay drawn
    /// uniformly from `[0, spread)`.
    pub fn goaway(&self, spread: Duration) {
        self.start_draining();
        self.close_spread_ms
            .store(spread.as_millis() as u64, Ordering::Release);
        self.goaway.cancel();
        self.wake_all();
    }

    /// Wake every connection's task, to look at the hub's state (after a goaway or shutdown). A connection
    /// admitted after this sees that state before its first wait.
    fn wake_all(&self) {
        for c in self
            .conns
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
        {
            c.outbox.wake();
        }
    }

    /// The spread of `goaway` closes before [`Hub::goaway`] sets it (rebalancing uses it too).
    pub fn set_close_spread(&self, spread: Duration) {
        self.close_spread_ms
            .store(spread.as_millis() as u64, Ordering::Release);
    }

    /// Connections by partition of their subject and age, for rebalancing: up to `max` of those `pick`
    /// accepts (given partition and age), skipping connections already moving or closing.
    pub(crate) fn movable(
        &self,
        max: usize,
        mut pick: impl FnMut(u16, Duration) -> bool,
    ) -> Vec<Arc<ConnHandle>> {
        if max == 0 {
            return Vec::new();
        }
        let now = self.started.elapsed().as_millis() as u64;
        let conns = self.conns.lock().unwrap_or_else(|p| p.into_inner());
        let mut out = Vec::new();
        for c in conns.values() {
            if c.moved() || c.killed.load(Ordering::Acquire) {
                continue;
            }
            if pick(
                c.partition,
                Duration::from_millis(now.saturating_sub(c.since_ms)),
            ) {
                out.push(c.clone());
                if out.len() >= max {
                    break;
                }
            }
        }
        out
    }

    /// Move one connection to another node: it gets `{"type": "goaway", "reason": "rebalance", …}` and is
    /// closed with 1001 after its own delay within the close spread. `false` when it was already moving.
    pub(crate) fn move_away(&self, conn: &ConnHandle) -> bool {
        if conn.moved.swap(true, Ordering::AcqRel) {
            return false;
        }
        self.moving.fetch_add(1, Ordering::AcqRel);
        conn.outbox.wake();
        true
    }

    /// Connections moved away and still open (they no longer count as this node's load).
    pub(crate) fn moving(&self) -> usize {
        self.moving.load(Ordering::Acquire)
    }

    /// True once [`Hub::goaway`] was called.
    pub(crate) fn closing(&self) -> bool {
        self.goaway.is_cancelled()
    }

    /// One connection's delay between its `goaway` frame and its close.
    pub(crate) fn close_delay(&self) -> Duration {
        let spread = self.close_spread_ms.load(Ordering::Acquire);
        if spread == 0 {
            return Duration::ZERO;
        }
        Duration::from_millis(rand::random_range(0..spread))
    }

    /// The names of the canary channels (for tests and logs).
    pub fn canary_channels(&self) -> Vec<String> {
        self.canary
            .channels
            .iter()
            .map(|(_, c)| c.clone())
            .collect()
    }

    /// Publish a unique message on every canary channel and wait, up to `budget`, for each to come back through
    /// this node's channel feed. A probe already in flight is shared.
    pub async fn probe_pubsub(self: &Arc<Self>, budget: Duration) -> PubSubCheck {
        let probe = {
            let mut inflight = self
                .canary
                .inflight
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            match &*inflight {
                // Still running (and not abandoned by callers that went away long ago): join it.
                Some((started, p)) if p.peek().is_none() && started.elapsed() < budget => p.clone(),
                _ => {
                    let hub = self.clone();
                    let p = async move { hub.run_probe(budget).await }.boxed().shared();
                    *inflight = Some((Instant::now(), p.clone()));
                    p
                }
            }
        };
        probe.await
    }

    async fn run_probe(&self, budget: Duration) -> PubSubCheck {
        let started = Instant::now();
        let result = if self.feed_control().is_none() {
            Err("the channel feed is not open".to_owned())
        } else if self.job_feed_control().is_none() {
            Err("the job event feed is not open".to_owned())
        } else {
            let echoes = self
                .canary
                .channels
                .iter()
                .map(|(shard, channel)| self.echo(*shard, channel, budget));
            let errors: Vec<String> = futures::future::join_all(echoes)
                .await
                .into_iter()
                .filter_map(Result::err)
                .collect();
            if errors.is_empty() {
                Ok(())
            } else {
                Err(errors.join("; "))
            }
        };
        let ms = started.elapsed().as_millis() as u64;
        match result {
            Ok(()) => PubSubCheck {
                ok: true,
                ms,
                error: None,
            },
            Err(e) => {
                tracing::warn!(error = %e, "readiness: pub/sub canary failed");
                PubSubCheck {
                    ok: false,
                    ms,
                    error: Some(e),
                }
            }
        }
    }

    /// One round trip on one canary channel.
    async fn echo(
        &self,
        shard: Option<usize>,
        channel: &str,
        budget: Duration,
    ) -> Result<(), String> {
        let label = match shard {
            Some(s) => format!("shard {s}: "),
            None => String::new(),
        };
        let nonce = format!(
            "{}{}",
            self.canary.prefix,
            self.canary.seq.fetch_add(1, Ordering::Relaxed)
        );
        let payload = json!({ "canary": nonce }).to_string();
        let (tx, rx) = oneshot::channel();
        self.canary.waiting().insert(payload.clone(), tx);
        let round_trip = async {
            self.broker
                .publish(channel, payload.clone())
                .await
                .map_err(|e| format!("{label}publish failed: {e}"))?;
            rx.await
                .map_err(|_| format!("{label}the canary was dropped"))
        };
        let r = match tokio::time::timeout(budget, round_trip).await {
            Ok(r) => r,
            Err(_) => Err(format!("{label}no echo within {} ms", budget.as_millis())),
        };
        self.canary.waiting().remove(&payload);
        r
    }

    pub(crate) fn limits(&self) -> &LimitsConfig {
        &self.limits
    }

    /// Number of open WebSocket connections on this node.
    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::Relaxed)
    }

    /// Count a failed authentication from `ip`, over HTTP or an upgrade (one budget for both, so alternating
    /// does not double it); `false` once the IP is over its budget.
    pub(crate) fn auth_failure_allowed(&self, ip: IpAddr) -> bool {
        self.unauth.check_key(&ip).is_ok()
    }

    /// Count a failed upgrade from `ip`; `false` once the IP is over its budget.
    pub(crate) fn unauth_allowed(&self, ip: IpAddr) -> bool {
        let allowed = self.auth_failure_allowed(ip);
        let reason = if allowed {
            "unauthorized"
        } else {
            "too_many_failures"
        };
        self.counters
            .refused_upgrades
            .with_label_values(&[reason])
            .inc();
        allowed
    }

    /// Forward from the broker until `shutdown`, then close every connection with 1001.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        let mut backoff = Duration::from_millis(100);
        let mut events = None;
        let mut messages = None;
        loop {
            if events.is_none() {
                match self.broker.job_feed().await {
                    Ok(feed) => {
                        let (control, stream) = feed.into_parts();
                        // Confirmations not awaited: the commands are queued, and a failure shows in the
                        // engine's own log and reconnect loop (which subscribes them again).
                        drop(control.watch(&Topic::Legacy));
                        // A reopened feed watches nothing: give it every topic that local keys still hold,
                        // under the locks so no (un)subscribe slips in between.
                        {
                            let _channels = self.lock();
                            let watching = self.watching();
                            for topic in watching.keys.keys() {
                                drop(control.watch(topic));
                            }
                            self.job_feed.send_replace(Some(control));
                        }
                        events = Some(stream);
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot open the job event feed, retrying")
                    }
                }
            }
            if messages.is_none() {
                match self.broker.channels().await {
                    Ok(feed) => {
                        let (control, stream) = feed.into_parts();
                        // The canary's own subscription, kept open for the node's life (the engine
                        // resubscribes it after a reconnect).
                        for (_, channel) in &self.canary.channels {
                            let confirm = control.subscribe(channel);
                            tokio::spawn(async move {
                                if let Err(e) = confirm.await {
                                    tracing::warn!(error = %e, "canary subscription not confirmed yet");
                                }
                            });
                        }
                        // A reopened feed starts with no subscriptions: give it every channel that still
                        // has local subscribers, under the map's lock so no (un)subscribe slips in between.
                        {
                            let channels = self.lock();
                            for name in channels.keys().filter_map(|k| k.strip_prefix("app:")) {
                                // Confirmation not awaited: the command is queued, and a failure shows in
                                // the engine's own log and reconnect loop.
                                drop(control.subscribe(name));
                            }
                            *self.feed_slot() = Some(control);
                        }
                        messages = Some(stream);
                    }
                    Err(e) => tracing::warn!(error = %e, "cannot open the channel feed, retrying"),
                }
            }
            if let (Some(ev), Some(msgs)) = (events.as_mut(), messages.as_mut()) {
                backoff = Duration::from_millis(100);
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    e = ev.next() => match e {
                        Some(e) => self.dispatch_event(&e).await,
                        // The job feed ended: open a new one, which watches everything still wanted.
                        None => {
                            tracing::warn!("job event feed ended, reopening");
                            let _channels = self.lock();
                            self.job_feed.send_replace(None);
                            events = None;
                        }
                    },
                    m = msgs.next() => match m {
                        Some(m) => {
                            self.dispatch_message(&m).await;
                            self.handed_on(&m);
                        }
                        None => {
                            tracing::warn!("channel feed ended, reopening");
                            // Until the new one is open, subscribing to a channel is refused (503).
                            let _channels = self.lock();
                            *self.feed_slot() = None;
                            messages = None;
                        }
                    },
                }
                continue;
            }
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
        self.shutdown.cancel();
        self.wake_all();
    }

    /// Check a message for [`Hub::publish`]: the channel must be an `app:` hub channel (as
    /// [`crate::http::channels::app_channel`] maps it) and `data`, as compact JSON, at most `max_publish_bytes`.
    /// Checked before anything reaches the broker, so an oversized message is refused at its sender (413,
    /// `too_large`) and never delivered: a subscriber's write buffer is sized for pushes within the limit.
    pub fn prepare_publish(&self, channel: &str, data: &Value) -> Result<Publication, ApiError> {
        let Some(name) = channel.strip_prefix("app:") else {
            return Err(ApiError::bad_request(format!(
                "only app: channels can be published to, not {channel:?}"
            )));
        };
        let max = self.limits.max_publish_bytes;
        if json_len_over(data, max) {
            return Err(ApiError::PayloadTooLarge(format!(
                "a published message's data may be at most {max} bytes of JSON"
            )));
        }
        Ok(Publication {
            name: name.to_owned(),
            payload: data.to_string(),
        })
    }

    /// Publish a checked message to the subscribers of its channel on every node.
    ///
    /// With an in-process engine (`ferry dev`), the call returns once this node's subscribers have the message,
    /// as an in-process broadcast (Node's `ws`, Centrifugo's memory engine) does before it answers: there is no
    /// other node, so "accepted" can mean "handed on". The wait is bounded by [`LOCAL_HANDOFF_WAIT`]; a channel
    /// without local subscribers is not waited for. Through Redis the answer means "accepted", as before.
    pub async fn publish(&self, p: Publication) -> Result<(), ApiError> {
        let name = p.name.clone();
        let Some(seq) = self.broker.publish_in_process(&name, p.payload).await? else {
            return Ok(());
        };
        // Only an in-process engine gets here, so a publish through Redis pays for no lookup.
        if self.lock().contains_key(&format!("app:{name}")) {
            let mut handed = self.handed.subscribe();
            // Elapsed only when the subscribers left meanwhile (the feed then skips the message) or the feed is
            // reopening: the message is accepted either way.
            let _ = tokio::time::timeout(LOCAL_HANDOFF_WAIT, handed.wait_for(|h| *h >= seq)).await;
        }
        Ok(())
    }

    fn feed_slot(&self) -> std::sync::RwLockWriteGuard<'_, Option<ChannelControl>> {
        self.feed.write().unwrap_or_else(|p| p.into_inner())
    }

    fn job_feed_control(&self) -> Option<JobFeedControl> {
        self.job_feed.borrow().clone()
    }

    /// Waits (up to [`FEED_OPEN_WAIT`]) for the job feed while it is (re)opening, then has it confirm `topic`
    /// when `conn` still subscribes `key`. The reopen watches every held topic itself but does not wait for
    /// the confirmations; this gives a subscription made in between (a client connecting as the node starts)
    /// one to wait for, so events published after it returns still reach it.
    async fn watch_when_open(&self, conn: u64, key: &str, topic: &Topic) -> Option<Confirmation> {
        let mut open = self.job_feed.subscribe();
        tokio::time::timeout(FEED_OPEN_WAIT, open.wait_for(Option::is_some))
            .await
            .ok()?
            .ok()?;
        let channels = self.lock();
        // Gone meanwhile (closed or unsubscribed): its release already unwatched what it held.
        channels.get(key)?.get(&conn)?;
        self.job_feed_control().map(|feed| feed.watch(topic))
    }

    fn watching(&self) -> MutexGuard<'_, Watching> {
        self.watching.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Partitions whose job events this node receives (the `ferry_gateway_partitions` gauge).
    pub fn partitions(&self) -> usize {
        self.watching().partitions
    }

    /// The open channel feed's control, if any.
    fn feed_control(&self) -> Option<ChannelControl> {
        self.feed.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<String, HashMap<u64, Sub>>> {
        // The map holds no invariant a panic could break halfway: keep serving.
        self.channels.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Subscribe a connection to a hub key. For an `app:` key, the first local subscriber subscribes this node
    /// at the broker, and the call returns once that is confirmed. A key holding a job feed `topic`
    /// ([`key_topic`], [`job_topic`]) has it watched, and the call returns once the feed confirmed it (or
    /// failed to: the engine watches it again after its reconnect, and job events were never more than at most
    /// once); while the feed is (re)opening, it waits for it first, up to [`FEED_OPEN_WAIT`]. With `hold`, the
    /// connection's live frames of this key are held until [`Hub::end_hold`] (a recovery).
    pub(crate) async fn subscribe(
        &self,
        conn: &Arc<ConnHandle>,
        key: &str,
        view: View,
        topic: Option<Topic>,
        hold: bool,
    ) -> Result<(), ApiError> {
        let app = key.strip_prefix("app:");
        let mut watched = None;
        let mut reopening = None;
        let confirm = {
            let mut channels = self.lock();
            let subs = channels.entry(key.to_owned()).or_default();
            let first = subs.is_empty();
            subs.insert(
                conn.id,
                Sub {
                    conn: conn.clone(),
                    view: Arc::new(view),
                    recovery: hold.then(|| {
                        Box::new(Recovery {
                            hold: Some(Vec::new()),
                            floor: None,
                        })
                    }),
                },
            );
            if let Some(topic) = topic {
                if first {
                    self.watching().hold(key, topic.clone());
                }
                // Every subscriber asks (a round trip only for the first): the engine confirms in order, so
                // none returns before the topic is watched. Queued under the lock, like app subscriptions.
                watched = self.job_feed_control().map(|feed| feed.watch(&topic));
                if watched.is_none() {
                    reopening = Some(topic);
                }
            }
            match app {
                // Queued under the lock so broker (un)subscribes reach the engine in the order of local counts.
                Some(name) if first => match self.feed_control() {
                    Some(feed) => Some(feed.subscribe(name)),
                    None => {
                        Self::remove(&mut channels, key, conn.id);
                        return Err(unavailable());
                    }
                },
                _ => None,
            }
        };
        if let Some(confirm) = confirm
            && let Err(e) = confirm.await
        {
            tracing::warn!(error = %e, "channel subscription failed");
            self.unsubscribe(conn.id, key);
            return Err(unavailable());
        }
        if let Some(topic) = reopening {
            watched = self.watch_when_open(conn.id, key, &topic).await;
        }
        if let Some(confirm) = watched
            && let Err(e) = confirm.await
        {
            tracing::warn!(error = %e, key, "job event topic not confirmed yet");
        }
        Ok(())
    }

    /// Remove a connection from a hub key; the last local subscriber of an `app:` key unsubscribes this node.
    /// The last local subscriber of a key holding a job feed topic releases it, and the last key holding the
    /// topic unwatches it.
    pub(crate) fn unsubscribe(&self, conn: u64, key: &str) {
        let mut channels = self.lock();
        if !Self::remove(&mut channels, key, conn) {
            return;
        }
        if let Some(topic) = self.watching().release(key)
            && let Some(feed) = self.job_feed_control()
        {
            feed.unwatch(&topic);
        }
        if let Some(name) = key.strip_prefix("app:")
            && let Some(feed) = self.feed_control()
        {
            feed.unsubscribe(name);
        }
    }

    /// True when the key has no subscriber left.
    fn remove(channels: &mut HashMap<String, HashMap<u64, Sub>>, key: &str, conn: u64) -> bool {
        let Some(subs) = channels.get_mut(key) else {
            return false;
        };
        if subs.remove(&conn).is_none() {
            return false;
        }
        if subs.is_empty() {
            channels.remove(key);
            return true;
        }
        false
    }

    /// Take a connection slot for `subject`; `None` over the node or subject limit.
    pub(crate) fn admit(self: &Arc<Self>, subject: String, partition: u16) -> Option<ConnSlot> {
        let n = self.connections.fetch_add(1, Ordering::AcqRel);
        if n >= self.limits.max_connections {
            self.connections.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        let mut per = self.per_subject.lock().unwrap_or_else(|p| p.into_inner());
        let count = per.entry(subject.clone()).or_insert(0);
        if *count >= self.limits.max_connections_per_subject {
            drop(per);
            self.connections.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        *count += 1;
        let handle = Arc::new(ConnHandle {
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            outbox: outbox::Outbox::new(self.limits.send_queue),
            close_code: AtomicU16::new(0),
            killed: AtomicBool::new(false),
            moved: AtomicBool::new(false),
            partition,
            since_ms: self.started.elapsed().as_millis() as u64,
        });
        self.conns
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(handle.id, handle.clone());
        self.counters.connects.inc();
        Some(ConnSlot {
            hub: self.clone(),
            subject,
            handle,
            // Room for the `user:` key every connection has and one subscription: without it the first push
            // allocates four slots (96 bytes) on every connection.
            keys: Vec::with_capacity(2),
        })
    }

    async fn dispatch_event(&self, fed: &FedEvent) {
        let e = &fed.event;
        let mut keys = Vec::with_capacity(3);
        // Each copy of an event goes to one kind of subscriber (see "Which job events reach this node").
        let (owner, queue) = match fed.via {
            Via::Owner => (true, false),
            Via::Queue => (false, true),
            Via::All => (true, true),
        };
        if owner {
            // Observed once per event: the owner's copy is the one every event has.
            let lag_ms = ferry_core::now_ms().saturating_sub(e.at);
            self.counters.pubsub_lag.observe(lag_ms as f64 / 1000.0);
            if let Some(owner) = &e.owner {
                keys.push(user_key(e.tenant.as_deref(), owner));
            }
            keys.push(format!("job:{}", e.job));
        }
        if queue {
            keys.push(format!("queue:{}", e.queue));
        }
        let payload = Payload::of(e, self.limits.max_publish_bytes);
        let pos = self.event_position(e);
        let offset = pos
            .as_ref()
            .and_then(|p| ferry_broker::parse_offset(&p.offset));
        let mut pushed = false;
        for key in &keys {
            pushed |= self
                .fan_out(key, offset, |view| {
                    render_event(view, e, payload, pos.as_ref())
                })
                .await;
        }
        if pushed && matches!(payload, Payload::Omitted(_)) {
            self.counters.oversized.with_label_values(&["event"]).inc();
        }
    }

    async fn dispatch_message(&self, m: &ChannelMessage) {
        if m.channel.starts_with(&self.canary.prefix) {
            if let Some(tx) = self.canary.waiting().remove(&m.payload) {
                let _ = tx.send(());
            }
            return;
        }
        // Other publishers share Redis: anything that is not JSON is not forwarded.
        let Ok(data) = serde_json::from_str::<&serde_json::value::RawValue>(&m.payload) else {
            tracing::debug!(channel = %m.channel, "non-JSON channel message dropped");
            return;
        };
        // This node's publishers are held to the limit; another node with a larger one, or another publisher on
        // the same Redis, is not. Forwarding it could overflow every subscriber's write buffer.
        if data.get().len() > self.limits.max_publish_bytes {
            self.counters
                .oversized
                .with_label_values(&["message"])
                .inc();
            tracing::debug!(channel = %m.channel, bytes = data.get().len(), "oversized channel message dropped");
            return;
        }
        let key = format!("app:{}", m.channel);
        let offset = m
            .position
            .as_ref()
            .and_then(|p| ferry_broker::parse_offset(&p.offset));
        self.fan_out(&key, offset, |view| {
            render_message(view, data.get(), m.position.as_ref())
        })
        .await;
    }

    /// Record that an in-process engine's message (offset `"0-<n>"`, see
    /// [`ferry_broker::PubSub::publish_in_process`]) was handed to every local subscriber.
    fn handed_on(&self, m: &ChannelMessage) {
        if let Some((0, seq)) = m
            .position
            .as_ref()
            .and_then(|p| ferry_broker::parse_offset(&p.offset))
        {
            self.handed.send_if_modified(|h| {
                let newer = seq > *h;
                if newer {
                    *h = seq;
                }
                newer
            });
        }
    }

    /// The position of a job event in its channels: its entry id, and the epoch of the log it came from.
    fn event_position(&self, e: &Event) -> Option<ferry_broker::StreamPos> {
        Some(ferry_broker::StreamPos {
            offset: ferry_broker::event_offset(e)?,
            epoch: self.broker.events_epoch(&e.queue)?,
        })
    }

    /// Hand one frame to every subscriber of `key`, oldest connection first, rendering it once per distinct
    /// view; a subscriber being recovered gets it held (see [`replay`]). False when the key has no subscriber.
    ///
    /// In connection order rather than the map's (random) order: deliveries are then as fair as the order of
    /// arrival, the same from one message to the next, and cheaper to receive for a process that holds many of
    /// the sockets, which reads them in the order it opened them (one Node client holding 2,000 sockets spent
    /// about a fifth more CPU per delivery in random order, loadtest/README.md).
    ///
    /// Each frame is written straight to the subscriber's socket when nothing is ahead of it (see [`outbox`]),
    /// so a fan-out is a loop of writes. A large audience is served [`FAN_OUT_TURN`] subscribers at a time: the
    /// turn's frames are picked under the lock and written after it, and the runtime gets a turn in between. A
    /// subscriber that leaves meanwhile is skipped; one that joins meanwhile is not served this frame (it
    /// subscribed after it, as far as this node can tell; its `since` recovers it).
    async fn fan_out(
        &self,
        key: &str,
        offset: Option<(u64, u64)>,
        render: impl Fn(&View) -> String,
    ) -> bool {
        let mut rendered: Vec<(Arc<View>, Utf8Bytes)> = Vec::with_capacity(1);
        let order: Vec<u64> = {
            let mut channels = self.lock();
            let Some(subs) = channels.get_mut(key) else {
                return false;
            };
            if subs.len() == 1 {
                // A `user:` or `job:` key's usual audience: nothing to order, nothing to allocate.
                for sub in subs.values_mut() {
                    if let Some(frame) = self.frame_for(sub, offset, &mut rendered, &render) {
                        self.send(&sub.conn, frame);
                    }
                }
                return true;
            }
            let mut order: Vec<u64> = subs.keys().copied().collect();
            order.sort_unstable();
            order
        };
        // The frames of a turn are picked under the lock and written after it, so that subscribing and
        // unsubscribing never wait for a turn's writes.
        let mut turn_frames: Vec<(Arc<ConnHandle>, Utf8Bytes)> =
            Vec::with_capacity(order.len().min(FAN_OUT_TURN));
        for (i, turn) in order.chunks(FAN_OUT_TURN).enumerate() {
            if i > 0 {
                tokio::task::yield_now().await;
            }
            {
                let mut channels = self.lock();
                let Some(subs) = channels.get_mut(key) else {
                    break;
                };
                for id in turn {
                    if let Some(sub) = subs.get_mut(id)
                        && let Some(frame) = self.frame_for(sub, offset, &mut rendered, &render)
                    {
                        turn_frames.push((sub.conn.clone(), frame));
                    }
                }
            }
            for (conn, frame) in turn_frames.drain(..) {
                self.send(&conn, frame);
            }
        }
        true
    }

    /// The frame [`Hub::fan_out`] sends one subscriber: `None` when it is held for a recovery (see [`replay`])
    /// or dropped as already replayed.
    fn frame_for(
        &self,
        sub: &mut Sub,
        offset: Option<(u64, u64)>,
        rendered: &mut Vec<(Arc<View>, Utf8Bytes)>,
        render: &impl Fn(&View) -> String,
    ) -> Option<Utf8Bytes> {
        let frame = match rendered.iter().find(|(v, _)| **v == *sub.view) {
            Some((_, f)) => f.clone(),
            None => {
                let f = Utf8Bytes::from(render(&sub.view));
                rendered.push((sub.view.clone(), f.clone()));
                f
            }
        };
        if let Some(r) = &mut sub.recovery {
            if let (Some(floor), Some(o)) = (r.floor, offset) {
                if o <= floor {
                    return None;
                }
                r.floor = None;
            }
            if let Some(held) = &mut r.hold {
                // Bounded like the send queue: a recovery that takes that long makes a slow consumer.
                if held.len() < self.limits.send_queue.max(1) {
                    held.push((offset, frame));
                } else {
                    sub.conn.close(close::SLOW_CONSUMER);
                }
                return None;
            }
            if r.floor.is_none() {
                // Recovered and past the floor: back to the plain subscriber.
                sub.recovery = None;
            }
        }
        Some(frame)
    }

    /// Hand `frame` to a connection (see [`outbox`]): false when its send queue is full, and the connection is
    /// closed as a slow consumer, since buffering more would let one slow client grow the node's memory without
    /// bound.
    fn send(&self, conn: &ConnHandle, frame: Utf8Bytes) -> bool {
        if conn.outbox.push(frame) == outbox::Pushed::Full {
            conn.close(close::SLOW_CONSUMER);
            false
        } else {
            self.counters.frames_out.inc();
            true
        }
    }
}

/// Subscribers served per turn of a large fan-out (see [`Hub::fan_out`]): 256 writes take about a
/// millisecond, short enough to give the runtime back often, and fewer turns than 64 at a time measured less CPU
/// (fan-out benchmark, loadtest/README.md).
const FAN_OUT_TURN: usize = 256;

/// How long a job event subscription made while the job feed is (re)opening waits for it at most (see
/// [`Hub::subscribe`]). The feed opens within milliseconds of the node's start; an engine that cannot be reached
/// makes the subscription go ahead unconfirmed (the reopen watches it) rather than hold the client longer.
const FEED_OPEN_WAIT: Duration = Duration::from_secs(5);

/// How long a publisher on an in-process engine waits for this node's hand-off ([`Hub::publish`]) at most.
const LOCAL_HANDOFF_WAIT: Duration = Duration::from_millis(100);

fn unavailable() -> ApiError {
    ApiError::Unavailable {
        detail: "channel subscriptions are unavailable, retry later".into(),
        retry_after_secs: 1,
    }
}

/// The hub key of a subject's own jobs.
pub(crate) fn user_key(tenant: Option<&str>, sub: &str) -> String {
    format!("user:{}/{sub}", tenant.unwrap_or(""))
}

/// A queue name as a client of `tenant` names it.
fn client_queue<'a>(tenant: Option<&str>, queue: &'a str) -> &'a str {
    tenant
        .and_then(|t| queue.strip_prefix(t))
        .and_then(|q| q.strip_prefix(':'))
        .unwrap_or(queue)
}

/// A message checked by [`Hub::prepare_publish`]: the broker channel name and the payload.
#[derive(Debug)]
pub struct Publication {
    name: String,
    payload: String,
}

/// Room in a pushed frame for everything but its payload: the channel name, the event name and a job event's
/// short fields (id, queue, kind, state, attempt, time). Names are at most a few hundred bytes.
pub(crate) const PUSH_ENVELOPE_BYTES: usize = 4 * 1024;

/// The most a connection's write buffer may hold (tungstenite's `max_write_buffer_size`): what is left of a
/// write abandoned half-way (a close interrupting it, at most one frame) plus the frame being written. Every
/// frame the server writes fits: a push is at most `max_publish_bytes` plus its envelope, a reply at most about
/// a client frame (it echoes the frame's `id`). Were a write to fail anyway, the connection is closed 4009 (the
/// peer holds that much unread), with a close frame.
pub(crate) fn write_buffer_cap(limits: &LimitsConfig) -> usize {
    let frame = limits.max_frame_bytes.max(limits.max_publish_bytes) + PUSH_ENVELOPE_BYTES;
    (limits.send_queue.max(1) * 1024).max(2 * frame) + frame
}

/// True when `v` as compact JSON is over `max` bytes; serializes no further than that.
fn json_len_over(v: &Value, max: usize) -> bool {
    struct Count {
        n: usize,
        max: usize,
    }
    impl std::io::Write for Count {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.n += b.len();
            if self.n > self.max {
                // Stops the serializer: the answer is known.
                return Err(std::io::Error::other("over"));
            }
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut c = Count { n: 0, max };
    serde_json::to_writer(&mut c, v).is_err()
}

/// The payload field of a job event's pushed `data`, decided once per event (not once per subscriber).
#[derive(Debug, Clone, Copy)]
enum Payload<'a> {
    None,
    /// `result`, `error` or `progress`, and its value.
    Field(&'static str, &'a Value),
    /// Over `max_publish_bytes`: left out, and `<field>_omitted: true` says so (the client reads the job).
    Omitted(&'static str),
}

impl<'a> Payload<'a> {
    fn of(e: &'a Event, max: usize) -> Self {
        let field = match e.ty {
            EventType::Completed => "result",
            EventType::Retrying | EventType::Dead => "error",
            EventType::Progress => "progress",
            _ => return Self::None,
        };
        // A failure's data is `{"error": "<text>", "run_at": ms}` in the engines; clients get the text as
        // `error`, the same string `GET /v1/jobs/{id}` shows (and `run_at` beside it, see `render_event`).
        let value = |d: &'a Value| match field {
            "error" => d.get("error").unwrap_or(d),
            _ => d,
        };
        match e.data.as_ref().map(value) {
            None => Self::None,
            Some(d) if json_len_over(d, max) => Self::Omitted(field),
            Some(d) => Self::Field(field, d),
        }
    }
}

/// An application message as pushed: `{"channel", "event": "message", "data", "offset", "epoch"}` (no position
/// for a message from a publisher that keeps no history).
fn render_message(view: &View, data: &str, pos: Option<&ferry_broker::StreamPos>) -> String {
    let channel = serde_json::to_string(&view.channel).unwrap_or_default();
    match pos {
        Some(p) => {
            let offset = serde_json::to_string(&p.offset).unwrap_or_default();
            let epoch = serde_json::to_string(&p.epoch).unwrap_or_default();
            format!(
                r#"{{"channel":{channel},"event":"message","data":{data},"offset":{offset},"epoch":{epoch}}}"#
            )
        }
        None => format!(r#"{{"channel":{channel},"event":"message","data":{data}}}"#),
    }
}

fn render_event(
    view: &View,
    e: &Event,
    payload: Payload<'_>,
    pos: Option<&ferry_broker::StreamPos>,
) -> String {
    let mut data = json!({
        "id": e.job,
        "queue": client_queue(view.tenant.as_deref(), e.queue.as_str()),
        "kind": e.kind,
        "state": e.state,
        "attempt": e.attempt,
        "at": e.at,
    });
    match payload {
        Payload::None => {}
        Payload::Field(field, d) => data[field] = d.clone(),
        Payload::Omitted(field) => data[format!("{field}_omitted")] = Value::Bool(true),
    }
    // When a retrying job runs again, as `GET /v1/jobs/{id}` has it.
    if e.ty == EventType::Retrying
        && let Some(run_at) = e.data.as_ref().and_then(|d| d.get("run_at"))
    {
        data["run_at"] = run_at.clone();
    }
    let mut frame = json!({"channel": view.channel, "event": e.ty.as_str(), "data": data});
    if let Some(p) = pos {
        frame["offset"] = Value::String(p.offset.clone());
        frame["epoch"] = Value::String(p.epoch.clone());
    }
    frame.to_string()
}

/// A connection's place in the hub: counted against the limits, subscribed to keys; all of it is given back
/// when dropped, however the connection ends.
#[derive(Debug)]
pub(crate) struct ConnSlot {
    hub: Arc<Hub>,
    subject: String,
    pub(crate) handle: Arc<ConnHandle>,
    /// Hub keys this connection is subscribed to (few: bounded by `max_subscriptions`).
    pub(crate) keys: Vec<String>,
}

impl Drop for ConnSlot {
    fn drop(&mut self) {
        for key in &self.keys {
            self.hub.unsubscribe(self.handle.id, key);
        }
        let mut per = self
            .hub
            .per_subject
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(n) = per.get_mut(&self.subject) {
            *n -= 1;
            if *n == 0 {
                per.remove(&self.subject);
            }
        }
        drop(per);
        self.hub
            .conns
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.handle.id);
        if self.handle.moved() {
            self.hub.moving.fetch_sub(1, Ordering::AcqRel);
        }
        self.hub.connections.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_broker::Jobs;
    use ferry_core::{JobId, JobState, Kind, NewJob, QueueName};

    #[cfg(target_pointer_width = "64")]
    #[test]
    fn a_connection_handle_fits_the_512_byte_size_class() {
        // Every idle connection holds one (in an `Arc`: two counters more); 513 bytes would cost 640.
        let size = std::mem::size_of::<ConnHandle>() + 16;
        assert!(size <= 512, "{size}");
    }

    #[test]
    fn user_keys_cannot_collide_across_tenants() {
        assert_ne!(user_key(Some("acme"), "bob"), user_key(None, "acme/bob"));
        assert_ne!(user_key(Some("acme"), "bob"), user_key(None, "acme:bob"));
    }

    #[test]
    fn event_frames_use_the_clients_names() {
        let e = Event {
            id: String::new(),
            ty: EventType::Completed,
            job: JobId::new(),
            queue: QueueName::parse("acme:emails").unwrap(),
            kind: Kind::parse("k").unwrap(),
            state: JobState::Completed,
            attempt: 1,
            at: 5,
            owner: Some("bob".into()),
            tenant: Some("acme".into()),
            data: Some(json!({"ok": true})),
            correlation_id: None,
            actor: None,
            spec: None,
        };
        let view = View {
            channel: "queue:emails".into(),
            tenant: Some("acme".into()),
        };
        let v: Value =
            serde_json::from_str(&render_event(&view, &e, Payload::of(&e, 1024), None)).unwrap();
        assert_eq!(v["channel"], "queue:emails");
        assert_eq!(v["event"], "job.completed");
        assert_eq!(v["data"]["queue"], "emails");
        assert_eq!(v["data"]["result"], json!({"ok": true}));
        assert!(v["data"].get("result_omitted").is_none(), "{v}");

        // `{"ok":true}` is 11 bytes: at the limit it is sent, one byte under the limit it is left out.
        assert!(matches!(Payload::of(&e, 11), Payload::Field("result", _)));
        let pos = ferry_broker::StreamPos {
            offset: "5-1".into(),
            epoch: "e".into(),
        };
        let v: Value =
            serde_json::from_str(&render_event(&view, &e, Payload::of(&e, 10), Some(&pos)))
                .unwrap();
        assert_eq!(
            (v["offset"].as_str(), v["epoch"].as_str()),
            (Some("5-1"), Some("e"))
        );
        assert!(v["data"].get("result").is_none(), "{v}");
        assert_eq!(v["data"]["result_omitted"], true);
        assert_eq!(v["data"]["id"], json!(e.job));
    }

    #[test]
    fn failure_frames_carry_the_error_as_the_job_does() {
        let mut e = Event {
            id: String::new(),
            ty: EventType::Dead,
            job: JobId::new(),
            queue: QueueName::parse("q").unwrap(),
            kind: Kind::parse("k").unwrap(),
            state: JobState::Dead,
            attempt: 3,
            at: 5,
            owner: None,
            tenant: None,
            data: Some(json!({"error": "no handler for kind"})),
            correlation_id: None,
            actor: None,
            spec: None,
        };
        let view = View {
            channel: "user:alice".into(),
            tenant: None,
        };
        let frame = |e: &Event, max| -> Value {
            serde_json::from_str(&render_event(&view, e, Payload::of(e, max), None)).unwrap()
        };
        let v = frame(&e, 1024);
        assert_eq!(v["data"]["error"], "no handler for kind", "{v}");
        assert!(v["data"].get("run_at").is_none(), "{v}");
        e.ty = EventType::Retrying;
        e.state = JobState::Retrying;
        e.data = Some(json!({"error": "boom", "run_at": 1234}));
        let v = frame(&e, 1024);
        assert_eq!(
            (&v["data"]["error"], &v["data"]["run_at"]),
            (&json!("boom"), &json!(1234)),
            "{v}"
        );
        // The limit applies to the text: `"boom"` is 6 bytes.
        assert!(matches!(Payload::of(&e, 6), Payload::Field("error", _)));
        assert_eq!(frame(&e, 5)["data"]["error_omitted"], true);
    }

    #[tokio::test]
    async fn a_message_reaches_subscribers_oldest_connection_first() {
        let broker = Arc::new(ferry_broker::MemoryBroker::new(Default::default()));
        let hub = Hub::new(broker, LimitsConfig::default());
        // Small and large audiences: all at once, and in turns.
        for n in [5, 3 * FAN_OUT_TURN + 7] {
            let key = format!("app:fan-{n}");
            let slots: Vec<ConnSlot> = (0..n)
                .map(|i| hub.admit(format!("u{n}-{i}"), 0).expect("admitted"))
                .collect();
            let subs: HashMap<u64, Sub> = slots
                .iter()
                .map(|s| {
                    // A view of its own for each, so that `render` runs once per subscriber, in delivery
                    // order.
                    let view = View {
                        channel: s.handle.id.to_string(),
                        tenant: None,
                    };
                    let sub = Sub {
                        conn: s.handle.clone(),
                        view: Arc::new(view),
                        recovery: None,
                    };
                    (s.handle.id, sub)
                })
                .collect();
            hub.lock().insert(key.clone(), subs);
            let order = std::sync::Mutex::new(Vec::new());
            let served = hub
                .fan_out(&key, None, |view| {
                    order
                        .lock()
                        .unwrap()
                        .push(view.channel.parse::<u64>().unwrap());
                    String::from("{}")
                })
                .await;
            assert!(served);
            let admitted: Vec<u64> = slots.iter().map(|s| s.handle.id).collect();
            assert_eq!(order.into_inner().unwrap(), admitted, "{n} subscribers");
            for s in &slots {
                match s.handle.outbox.next().await {
                    outbox::Next::Frame(f) => assert_eq!(f.as_str(), "{}"),
                    outbox::Next::Flush => panic!("no socket, nothing written"),
                }
                s.handle.outbox.done();
            }
        }
        assert!(!hub.fan_out("app:nobody", None, |_| String::new()).await);
    }

    /// With the in-process engine a publish answers once this node's subscribers have the message (as an
    /// in-process broadcast does); without subscribers here it does not wait at all.
    #[tokio::test]
    async fn an_in_process_publish_returns_once_local_subscribers_have_it() {
        let broker = Arc::new(ferry_broker::MemoryBroker::new(Default::default()));
        let hub = Hub::new(broker, LimitsConfig::default());
        let stop = CancellationToken::new();
        let run = tokio::spawn(hub.clone().run(stop.clone()));
        let slot = hub.admit("alice".into(), 0).expect("admitted");
        let view = || View {
            channel: "app:news".into(),
            tenant: None,
        };
        // The feed opens in `run`: retry until it does.
        let deadline = Instant::now() + Duration::from_secs(5);
        while hub
            .subscribe(&slot.handle, "app:news", view(), None, false)
            .await
            .is_err()
        {
            assert!(Instant::now() < deadline, "the channel feed never opened");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        for n in 0..3 {
            let m = hub.prepare_publish("app:news", &json!({"n": n})).unwrap();
            hub.publish(m).await.unwrap();
            // No yield in between: on this one-thread runtime the hub's task has run only if publish waited.
            match futures::FutureExt::now_or_never(slot.handle.outbox.next()) {
                Some(outbox::Next::Frame(f)) => {
                    let v: Value = serde_json::from_str(f.as_str()).unwrap();
                    assert_eq!(v["data"]["n"], n, "{v}");
                }
                Some(outbox::Next::Flush) => panic!("no socket, nothing written"),
                None => panic!("publish {n} answered before the subscriber had the message"),
            }
            slot.handle.outbox.done();
        }
        // Nobody here: answered at once, without waiting on anything.
        let m = hub.prepare_publish("app:empty", &json!(1)).unwrap();
        let answered = futures::FutureExt::now_or_never(hub.publish(m));
        assert!(matches!(answered, Some(Ok(()))), "{answered:?}");
        stop.cancel();
        drop(slot);
        run.await.unwrap();
    }

    /// A subscription made before the job feed is open (a client connecting as the node starts) waits for it,
    /// and the events published once it returned reach it.
    #[tokio::test]
    async fn a_subscription_before_the_job_feed_opens_waits_for_it() {
        let broker = Arc::new(ferry_broker::MemoryBroker::new(Default::default()));
        let hub = Hub::new(broker.clone(), LimitsConfig::default());
        let slot = hub.admit("alice".into(), 0).expect("admitted");
        let view = View {
            channel: "queue:early".into(),
            tenant: None,
        };
        let topic = key_topic("queue:early");
        let stop = CancellationToken::new();
        let run = {
            let mut subscribed =
                std::pin::pin!(hub.subscribe(&slot.handle, "queue:early", view, topic, false));
            assert!(
                futures::FutureExt::now_or_never(subscribed.as_mut()).is_none(),
                "answered before the job feed was open"
            );
            let run = tokio::spawn(hub.clone().run(stop.clone()));
            subscribed.await.expect("subscribed");
            run
        };
        let job = NewJob::new(Kind::parse("ferry.noop").unwrap(), json!({}));
        let queue = QueueName::parse("early").unwrap();
        let id = broker.enqueue(&queue, job).await.unwrap().id.to_string();
        let frame = tokio::time::timeout(Duration::from_secs(5), slot.handle.outbox.next())
            .await
            .expect("the job.queued event reached the subscriber");
        match frame {
            outbox::Next::Frame(f) => {
                let v: Value = serde_json::from_str(f.as_str()).unwrap();
                assert_eq!(
                    (v["event"].as_str(), v["data"]["id"].as_str()),
                    (Some("job.queued"), Some(id.as_str())),
                    "{v}"
                );
            }
            outbox::Next::Flush => panic!("no socket, nothing written"),
        }
        stop.cancel();
        drop(slot);
        run.await.unwrap();
    }

    #[test]
    fn json_length_is_measured_compact_and_stops_early() {
        let v = json!({"a": [1, 2, 3]});
        let n = v.to_string().len();
        assert!(!json_len_over(&v, n));
        assert!(json_len_over(&v, n - 1));
        assert!(json_len_over(&json!("x".repeat(1 << 20)), 10));
    }

    #[test]
    fn the_write_buffer_takes_the_largest_push() {
        for limits in [
            LimitsConfig::default(),
            LimitsConfig {
                send_queue: 1,
                max_frame_bytes: 1024,
                max_publish_bytes: 1 << 20,
                ..LimitsConfig::default()
            },
        ] {
            let push = limits.max_publish_bytes + PUSH_ENVELOPE_BYTES;
            // After a write abandoned half-way (up to one frame left), a maximal push still fits.
            assert!(write_buffer_cap(&limits) >= 2 * push, "{limits:?}");
        }
    }
}

/// The hub's WebSocket metrics, rendered by `GET /metrics` (names in `docs/metrics.md`).
#[derive(Debug)]
struct WsCounters {
    /// Close frames sent by the server, by code.
    closes: prometheus::IntCounterVec,
    rate_limited_frames: prometheus::IntCounter,
    /// By reason: `unauthorized`, `too_many_failures`, `connection_limit`.
    refused_upgrades: prometheus::IntCounterVec,
    connects: prometheus::IntCounter,
    /// Client frames received. Counted by [`Hub::count_frame_in`]; the connection task must call it.
    frames_in: prometheus::IntCounter,
    /// Frames the hub handed to connections (pushed events and channel messages), plus any counted by
    /// [`Hub::count_frame_out`].
    frames_out: prometheus::IntCounter,
    slow_consumer_closes: prometheus::IntCounter,
    /// Pushes over `max_publish_bytes`, by kind: `event` (sent with its payload left out), `message` (dropped).
    oversized: prometheus::IntCounterVec,
    /// Connections dropped because a write failed (the peer is gone), with no close frame.
    write_errors: prometheus::IntCounter,
    /// Recoveries (`since`) by outcome: `recovered`, `not_recovered`.
    recoveries: prometheus::IntCounterVec,
    /// Event time (`at`) to fan-out on this node.
    pubsub_lag: prometheus::Histogram,
}

impl Default for WsCounters {
    fn default() -> Self {
        use prometheus::{Histogram, HistogramOpts, IntCounter, IntCounterVec, Opts};
        let counter = |name: &str, help: &str| IntCounter::new(name, help).expect("valid metric");
        Self {
            closes: IntCounterVec::new(
                Opts::new(
                    "ferry_ws_closes_total",
                    "Connections closed by the server, by close code (1013 connection limit, 4001 token \
                     expired, 4008 rate limited, 4009 slow consumer, ...).",
                ),
                &["code"],
            )
            .expect("valid metric"),
            rate_limited_frames: counter(
                "ferry_ws_rate_limited_frames_total",
                "Frames answered rate_limited.",
            ),
            refused_upgrades: IntCounterVec::new(
                Opts::new(
                    "ferry_ws_refused_upgrades_total",
                    "Refused upgrades by reason: unauthorized (401), too_many_failures (429 after repeated bad \
                     tokens from one address), connection_limit (closed 1013).",
                ),
                &["reason"],
            )
            .expect("valid metric"),
            connects: counter("ferry_ws_connects_total", "Accepted WebSocket upgrades."),
            frames_in: counter("ferry_ws_frames_in_total", "WebSocket frames received."),
            frames_out: counter("ferry_ws_frames_out_total", "WebSocket frames sent."),
            slow_consumer_closes: counter(
                "ferry_ws_slow_consumer_closes_total",
                "Connections closed 4009 (slow consumer).",
            ),
            oversized: IntCounterVec::new(
                Opts::new(
                    "ferry_ws_oversized_pushes_total",
                    "Pushes over max-publish-bytes: event (a job event sent with its result, error or progress \
                     left out), message (a channel message from another publisher, dropped).",
                ),
                &["kind"],
            )
            .expect("valid metric"),
            write_errors: counter(
                "ferry_ws_write_errors_total",
                "Connections dropped because a write to the peer failed.",
            ),
            recoveries: IntCounterVec::new(
                Opts::new(
                    "ferry_ws_recoveries_total",
                    "Subscriptions with since, by outcome: recovered (the missed frames were replayed), \
                     not_recovered (the history did not reach back; the client refetches).",
                ),
                &["outcome"],
            )
            .expect("valid metric"),
            pubsub_lag: Histogram::with_opts(
                HistogramOpts::new(
                    "ferry_pubsub_lag_seconds",
                    "Job event time to fan-out on this node.",
                )
                .buckets(ferry_telemetry::metrics::SECONDS_BUCKETS.to_vec()),
            )
            .expect("valid metric"),
        }
    }
}

impl Hub {
    pub(crate) fn count_close(&self, code: u16) {
        self.counters
            .closes
            .with_label_values(&[code.to_string().as_str()])
            .inc();
        match code {
            close::SLOW_CONSUMER => self.counters.slow_consumer_closes.inc(),
            // 1013 is sent only to a connection over the node or subject limit.
            close::TRY_AGAIN_LATER => self
                .counters
                .refused_upgrades
                .with_label_values(&["connection_limit"])
                .inc(),
            _ => {}
        }
    }

    /// A write to a peer failed and the connection was dropped without a close frame.
    pub(crate) fn count_write_error(&self) {
        self.counters.write_errors.inc();
    }

    pub(crate) fn count_rate_limited_frame(&self) {
        self.counters.rate_limited_frames.inc();
    }

    /// A frame received from a client.
    pub fn count_frame_in(&self) {
        self.counters.frames_in.inc();
    }

    /// A frame sent to a client that did not go through the hub (a reply).
    pub fn count_frame_out(&self) {
        self.counters.frames_out.inc();
    }

    /// The hub's metrics (connections, limit, counters, pub/sub lag).
    pub fn metric_families(&self) -> Vec<prometheus::proto::MetricFamily> {
        use ferry_telemetry::metrics::{FnCollector, FnKind};
        use prometheus::core::Collector;
        let mut out = Vec::new();
        let gauges = [
            (
                "ferry_ws_connections",
                "Open WebSocket connections on this node.",
                self.connections.load(Ordering::Relaxed) as f64,
            ),
            (
                "ferry_ws_connections_max",
                "The node's WebSocket connection limit.",
                self.limits.max_connections as f64,
            ),
            (
                "ferry_gateway_partitions",
                "Subject partitions whose job events this node receives (those of its clients' subjects and of \
                 the jobs they follow).",
                self.partitions() as f64,
            ),
        ];
        for (name, help, v) in gauges {
            if let Ok(c) = FnCollector::single(name, help, FnKind::Gauge, move || v) {
                out.extend(c.collect());
            }
        }
        let c = &self.counters;
        out.extend(c.closes.collect());
        out.extend(c.rate_limited_frames.collect());
        out.extend(c.refused_upgrades.collect());
        out.extend(c.connects.collect());
        out.extend(c.frames_in.collect());
        out.extend(c.frames_out.collect());
        out.extend(c.slow_consumer_closes.collect());
        out.extend(c.oversized.collect());
        out.extend(c.write_errors.collect());
        out.extend(c.recoveries.collect());
        out.extend(c.pubsub_lag.collect());
        out
    }

    /// The hub's figures in the Prometheus text format.
    pub fn render_metrics(&self) -> String {
        ferry_telemetry::metrics::render_families(&self.metric_families())
    }
}
