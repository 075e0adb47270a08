//! The in-process engine: every queue, job, lease and idempotency key of one process, in memory, with the same
//! observable semantics as the Redis engine (the contract suite in `tests/broker/contract/` runs against both).
//!
//! It owns job state for `ferry dev`, single-node deployments and fast tests. It must not persist anything, do
//! network I/O or run handlers: a restart loses every job, by design. Its memory stays bounded by the engine
//! settings: finished jobs leave after `finished_retention` (on [`Housekeeping::maintain`]; with
//! `drop_recorded`, as soon as the recorder group has acknowledged their final event), the dead-letter list of a
//! queue holds at most `dead_letter_max` jobs, idempotency keys expire after `idempotency_ttl`, and live events
//! go through a bounded broadcast channel that drops events for lagging subscribers instead of growing.
//!
//! Application channels ([`PubSub::publish`], [`PubSub::channels`]) are one more broadcast channel, outside the
//! state lock; each feed filters it by the channels it subscribed.
//!
//! Recovery ([`PubSub::channel_missed`], [`EventFeed::events_missed`]): offsets are `"0-<n>"`, `n` from a counter
//! (the event sequence for job events, one more counter for channel messages), and the epoch is a UUID drawn
//! when the broker is made (a new process has lost everything). Each application channel keeps a ring of its
//! last `ChannelHistory::size` messages, dropped `ChannelHistory::ttl` after its last publish; job events keep
//! one ring of the last [`EVENT_HISTORY`] events, each for at most the same ttl.
//!
//! Layout: one `State` behind one `std::sync::Mutex`. Every job lives in `State::jobs`; each queue keeps
//! indexes of ids by state (ready deques per priority, scheduled set by due time, active set by lease deadline,
//! dead list, finished list by finish time). Every transition goes through `State::detach` (remove the job from
//! the index of its current state) and then one of the `State::enter_*` methods (set the new state, index it, emit
//! its event), so the indexes never disagree with the jobs.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use ferry_core::{
    Event, EventType, Job, JobId, JobInfo, JobSpec, JobState, Limits, NewJob, QueueName, now_ms,
};
use serde_json::{Value, json};
use tokio::sync::{Notify, broadcast};
use tokio_stream::StreamExt;
use tokio_stream::wrappers::BroadcastStream;

use crate::prelude::*;
use crate::{
    BrokerError, CancelOutcome, ChannelControl, ChannelFeed, ChannelMessage, Completion,
    Confirmation, EngineConfig, Enqueued, EventStream, FailOutcome, Failure, FedEvent, FeedControl,
    JobFeed, JobFeedControl, Lease, Leased, LogEntry, LogPosition, Member, Membership, NodeInfo,
    QueueStats, Reclaimed, Rejected, RetryOutcome, Topic, TopicControl, Via,
};
use crate::{ChannelHistory, EventFilter, EventScope, HistoryEntry, Missed, StreamPos};

/// Live events buffered per subscriber. A subscriber that falls further behind skips the oldest events (it can
/// recover them from the durable record) rather than make the engine wait or buffer without bound.
const EVENT_CAPACITY: usize = 4096;

/// Application channel messages buffered per feed; a feed that falls further behind skips the oldest (pub/sub
/// is at most once on the Redis engine too).
const CHANNEL_CAPACITY: usize = 4096;

/// Job events kept for recovery ([`EventFeed::events_missed`]), newest last.
pub const EVENT_HISTORY: usize = 10_000;

/// In-process broker with the same semantics as the Redis engine.
pub struct MemoryBroker {
    config: EngineConfig,
    /// A std (not tokio) mutex: every critical section is a short, synchronous state change with no `.await`
    /// inside, so a blocking lock is cheaper than an async one and cannot deadlock on a suspended holder. It is
    /// never held across an `.await` (that would block a runtime thread while the holder sleeps, and make the
    /// futures `!Send`); `claim` waits on the queue's `Notify` with the lock released.
    state: Mutex<State>,
    /// Every application channel message of the process; feeds filter it. Not under `state`: publishing has
    /// nothing to do with job state and must not wait for a transition.
    app: broadcast::Sender<ChannelMessage>,
    /// The gateway membership of this process: id → (info, last heartbeat, expiry).
    members: Mutex<HashMap<String, (NodeInfo, Instant, Instant)>>,
    /// Application channel histories; publishes are numbered and sent under this lock, so offsets rise in the
    /// order listeners see.
    app_history: Mutex<AppHistory>,
    history: ChannelHistory,
    /// This broker's epoch: a new one per broker (a new process has no history).
    epoch: String,
}

/// The application channels' histories.
#[derive(Debug, Default)]
struct AppHistory {
    /// The last offset handed out (`"0-<seq>"`).
    seq: u64,
    channels: HashMap<String, ChannelRing>,
    /// The highest offset of any channel history dropped whole (expired): a channel without history reaches
    /// back only to here.
    expired_upto: u64,
    publishes: u64,
}

#[derive(Debug, Default)]
struct ChannelRing {
    /// (offset, when published in ms, payload), oldest first.
    entries: VecDeque<(u64, u64, String)>,
    /// The highest offset dropped from `entries` (trimmed or expired).
    dropped_upto: u64,
    last_at: u64,
}

impl AppHistory {
    /// Drop expired entries and whole channels idle past `ttl`.
    fn expire(&mut self, now: u64, ttl: u64) {
        let mut gone = 0;
        self.channels.retain(|_, ring| {
            if ring.last_at.saturating_add(ttl) < now {
                gone = gone.max(ring.entries.back().map_or(ring.dropped_upto, |e| e.0));
                return false;
            }
            true
        });
        self.expired_upto = self.expired_upto.max(gone);
    }
}

/// The memory engine's offset `"0-<n>"` as `n`.
fn memory_offset(offset: &str) -> Option<u64> {
    match crate::parse_offset(offset)? {
        (0, n) => Some(n),
        _ => None,
    }
}

impl fmt::Debug for MemoryBroker {
    // The state can hold millions of jobs: never dump it into a log line.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryBroker")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl MemoryBroker {
    pub fn new(config: EngineConfig) -> Self {
        let (tx, _) = broadcast::channel(EVENT_CAPACITY);
        Self {
            config: config.clone(),
            state: Mutex::new(State {
                jobs: HashMap::new(),
                queues: BTreeMap::new(),
                events: Events {
                    seq: 0,
                    tx,
                    log: VecDeque::new(),
                    groups: HashMap::new(),
                    appended: Arc::new(Notify::new()),
                    cap: config.event_stream_max,
                    recent: VecDeque::new(),
                    recent_dropped: 0,
                    history_ttl: ms(ChannelHistory::default().ttl),
                },
                actor: None,
                leases: HashMap::new(),
                drop_recorded: config.drop_recorded,
            }),
            app: broadcast::channel(CHANNEL_CAPACITY).0,
            members: Mutex::new(HashMap::new()),
            app_history: Mutex::new(AppHistory::default()),
            history: ChannelHistory::default(),
            epoch: uuid::Uuid::now_v7().to_string(),
        }
    }

    /// The same broker with application channel history `history` (`--history-size`, `--history-ttl-ms`).
    pub fn with_channel_history(mut self, history: ChannelHistory) -> Self {
        self.history = ChannelHistory {
            size: history.size.max(1),
            ttl: history.ttl.max(Duration::from_millis(1)),
        };
        if let Ok(mut st) = self.state.lock() {
            st.events.history_ttl = ms(self.history.ttl);
        }
        self
    }

    fn lock(&self) -> Result<MutexGuard<'_, State>, BrokerError> {
        // A panic inside a transition may have left the indexes half-updated: refuse to serve rather than hand
        // out inconsistent state.
        self.state
            .lock()
            .map_err(|_| BrokerError::Internal("memory engine state poisoned by a panic".into()))
    }

    fn visibility_ms(&self) -> u64 {
        ms(self.config.visibility_timeout)
    }

    /// Store already-validated jobs.
    fn insert(&self, queue: &QueueName, jobs: Vec<NewJob>) -> Result<Vec<Enqueued>, BrokerError> {
        let now = now_ms();
        let ttl = ms(self.config.idempotency_ttl);
        let mut guard = self.lock()?;
        let st = &mut *guard;
        st.queue(queue).received = true;
        // The submitter: the gateway submits one caller's jobs per call.
        st.actor = jobs.first().and_then(|j| j.owner.as_deref()).map(Arc::from);
        let mut out = Vec::with_capacity(jobs.len());
        let mut any_ready = false;
        for mut job in jobs {
            // Scoped to the submitter: a key shared across subjects would let one subject learn (or take) the
            // id of another's job.
            let idem_key = job
                .idempotency_key
                .take()
                .map(|key| (job.tenant.clone(), job.owner.clone(), key));
            if let Some(key) = &idem_key
                && let Some(seen) = st.queue(queue).idempotency.get(key)
                && seen.expires_at > now
            {
                let (id, first_state) = (seen.id, seen.state);
                let state = st.jobs.get(&id).map_or(first_state, |e| e.state);
                out.push(Enqueued {
                    id,
                    state,
                    duplicate: true,
                });
                continue;
            }
            let delay = job.delay_ms.unwrap_or(0);
            let id = JobId::new();
            st.jobs.insert(
                id,
                Entry {
                    queue: queue.clone(),
                    spec: job.into_spec(now),
                    // Placeholder: `enter_queued` / `enter_scheduled` below set the real state and index the job.
                    state: JobState::Scheduled,
                    attempts: 0,
                    epoch: 0,
                    result: None,
                    error: None,
                    run_at: None,
                    lease_deadline: 0,
                    holder: None,
                    updated_at: now,
                },
            );
            let state = if delay > 0 {
                st.enter_scheduled(id, now.saturating_add(delay), now);
                JobState::Scheduled
            } else {
                st.enter_queued(id, now, None);
                any_ready = true;
                JobState::Queued
            };
            if let Some(key) = idem_key {
                let expires_at = now.saturating_add(ttl);
                let q = st.queue(queue);
                q.idempotency_expiry.push_back((expires_at, key.clone()));
                q.idempotency.insert(
                    key,
                    Seen {
                        id,
                        state,
                        expires_at,
                    },
                );
            }
            out.push(Enqueued {
                id,
                state,
                duplicate: false,
            });
        }
        st.actor = None;
        if any_ready {
            st.queue(queue).notify.notify_waiters();
        }
        Ok(out)
    }
}

/// `Duration` → whole milliseconds, saturating (a configured "forever" must not wrap around).
fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Everything the engine holds.
#[derive(Debug)]
struct State {
    jobs: HashMap<JobId, Entry>,
    /// A BTreeMap so `queues()` comes out sorted.
    queues: BTreeMap<QueueName, Queue>,
    events: Events,
    /// The actor of the transition being made (set by the caller for the length of one critical section).
    actor: Option<Arc<str>>,
    /// [`Housekeeping::try_lease`]: name → (holder, until).
    leases: HashMap<String, (String, tokio::time::Instant)>,
    /// [`EngineConfig::drop_recorded`].
    drop_recorded: bool,
}

/// One job as the engine holds it.
#[derive(Debug)]
struct Entry {
    queue: QueueName,
    spec: JobSpec,
    state: JobState,
    attempts: u32,
    /// The lease fence: bumped on every claim and every move out of `active`, so a lease token names exactly
    /// one attempt and is dead as soon as that attempt is over.
    epoch: u64,
    result: Option<Value>,
    error: Option<String>,
    run_at: Option<u64>,
    /// While `active`: when the lease expires unless heartbeated.
    lease_deadline: u64,
    /// While `active`: the consumer holding the lease.
    holder: Option<Arc<str>>,
    updated_at: u64,
}

/// One idempotency key's first job.
#[derive(Debug)]
struct Seen {
    id: JobId,
    /// The state at submission, answered for duplicates once the job itself has left the engine.
    state: JobState,
    expires_at: u64,
}

/// (tenant, owner, key): a key is one submitter's, never shared by the subjects of a tenant.
type IdemKey = (Option<String>, Option<String>, String);

/// One queue's indexes. Each job id appears in at most one of them: the one matching its state.
#[derive(Debug, Default)]
struct Queue {
    /// Has ever received a job (`queues()` lists only those; `claim`/`pause` on a name create the entry too).
    received: bool,
    paused: bool,
    /// Queued jobs per priority, FIFO, with the time each became queued (non-decreasing, so the front is the
    /// oldest: that is the lag).
    ready: [VecDeque<(JobId, u64)>; 3],
    /// Scheduled and retrying jobs by (run_at, id).
    scheduled: BTreeSet<(u64, JobId)>,
    /// Active jobs by (lease deadline, id): expired leases are a prefix.
    active: BTreeSet<(u64, JobId)>,
    /// Dead jobs, newest first, at most `dead_letter_max`.
    dead: VecDeque<JobId>,
    /// Completed and cancelled jobs by finish time, for retention.
    finished: VecDeque<(u64, JobId)>,
    /// With `drop_recorded`: completed and cancelled jobs whose final event went to the log, by its sequence,
    /// to drop once the recorder has acknowledged it.
    recorded_wait: VecDeque<(u64, JobId)>,
    idempotency: HashMap<IdemKey, Seen>,
    /// Keys in expiry order (one TTL for all, so insertion order); an entry whose key was re-used after it
    /// expired is skipped when popped.
    idempotency_expiry: VecDeque<(u64, IdemKey)>,
    /// Wakes `claim` calls blocked on this queue when jobs become ready or the queue is resumed.
    notify: Arc<Notify>,
    /// Jobs handed to workers so far (`QueueStats::delivered`).
    delivered: u64,
}

/// The live event feed, and the durable log's in-process stand-in.
#[derive(Debug)]
struct Events {
    /// Global sequence: event ids are `"<seq>/0"`, the shape of the Redis engine's `<entry>/<index>` ids.
    seq: u64,
    tx: broadcast::Sender<Event>,
    /// Events by sequence, kept while a log group exists and has not acknowledged them (at most `cap`). Only
    /// kept once some group reads the log, so a node without a recorder holds nothing.
    log: VecDeque<(u64, Event)>,
    groups: HashMap<String, LogGroup>,
    /// Wakes `read_log` calls waiting for new entries.
    appended: Arc<Notify>,
    cap: usize,
    /// The last [`EVENT_HISTORY`] events (sequence, when emitted, event), for recovery.
    recent: VecDeque<(u64, u64, Event)>,
    /// The highest sequence dropped from `recent`.
    recent_dropped: u64,
    history_ttl: u64,
}

/// One consumer group of the log.
#[derive(Debug, Default)]
struct LogGroup {
    /// The last sequence handed out.
    delivered: u64,
    /// Handed out and not acknowledged: sequence → (consumer, when delivered).
    pending: BTreeMap<u64, (String, tokio::time::Instant)>,
}

impl LogGroup {
    /// The oldest sequence the group still needs: every event below it was acknowledged.
    fn floor(&self) -> u64 {
        self.pending
            .keys()
            .next()
            .copied()
            .unwrap_or(self.delivered + 1)
    }
}

impl Events {
    fn append(&mut self, seq: u64, event: Event) {
        if self.groups.is_empty() {
            return;
        }
        self.log.push_back((seq, event));
        if self.log.len() > self.cap {
            self.log.pop_front();
        }
        self.appended.notify_waiters();
    }

    /// Keep `event` for recovery, dropping what is over the size or past the ttl.
    fn remember(&mut self, seq: u64, event: Event) {
        let now = now_ms();
        self.recent.push_back((seq, now, event));
        if self.recent.len() > EVENT_HISTORY
            && let Some((s, _, _)) = self.recent.pop_front()
        {
            self.recent_dropped = s;
        }
        self.expire_recent(now);
    }

    fn expire_recent(&mut self, now: u64) {
        while let Some((s, at, _)) = self.recent.front() {
            if at.saturating_add(self.history_ttl) >= now {
                break;
            }
            self.recent_dropped = *s;
            self.recent.pop_front();
        }
    }

    /// Drop entries every group has acknowledged.
    fn trim(&mut self) {
        let floor = self
            .groups
            .values()
            .map(LogGroup::floor)
            .min()
            .unwrap_or(u64::MAX);
        while self.log.front().is_some_and(|(seq, _)| *seq < floor) {
            self.log.pop_front();
        }
    }

    fn entry(&self, seq: u64) -> Option<&Event> {
        let first = self.log.front()?.0;
        let (s, e) = self
            .log
            .get(usize::try_from(seq.checked_sub(first)?).ok()?)?;
        (*s == seq).then_some(e)
    }
}

impl State {
    fn queue(&mut self, name: &QueueName) -> &mut Queue {
        // Look up before inserting, so the common case (the queue exists) clones no key.
        if !self.queues.contains_key(name) {
            self.queues.insert(name.clone(), Queue::default());
        }
        self.queues.get_mut(name).expect("inserted above")
    }

    /// The entry behind a lease, if that lease is still the job's current one.
    fn fenced(&mut self, lease: &Lease) -> Option<&mut Entry> {
        let epoch: u64 = lease.token.parse().ok()?;
        self.jobs
            .get_mut(&lease.job)
            .filter(|e| e.state == JobState::Active && e.epoch == epoch && e.queue == lease.queue)
    }

    /// Emit the event of the transition `id` just made. Sent while the caller holds the lock, so subscribers see
    /// events in the order the transitions happened; `send` never blocks (a full channel overwrites the oldest
    /// event), so this cannot stall the engine.
    fn emit(&mut self, id: JobId, ty: EventType, data: Option<Value>) {
        let Some(e) = self.jobs.get(&id) else { return };
        self.events.seq += 1;
        let event = Event {
            id: format!("{}/0", self.events.seq),
            ty,
            job: id,
            queue: e.queue.clone(),
            kind: e.spec.kind.clone(),
            state: e.state,
            attempt: e.attempts,
            at: e.updated_at,
            owner: e.spec.owner.clone(),
            tenant: e.spec.tenant.clone(),
            data,
            correlation_id: e.spec.correlation_id.clone(),
            actor: self.actor.as_deref().map(str::to_owned),
            spec: None,
        };
        let seq = self.events.seq;
        self.events.remember(seq, event.clone());
        if !self.events.groups.is_empty() {
            let mut logged = event.clone();
            if matches!(ty, EventType::Queued | EventType::Scheduled) {
                logged.spec = Some(Box::new(e.spec.clone()));
            }
            let seq = self.events.seq;
            self.events.append(seq, logged);
        }
        // No subscriber is not an error: the event simply has no audience.
        let _ = self.events.tx.send(event);
    }

    /// Remove `id` from the index of its current state (the first half of every transition).
    fn detach(&mut self, id: JobId) {
        let Some(e) = self.jobs.get_mut(&id) else {
            return;
        };
        let Some(q) = self.queues.get_mut(&e.queue) else {
            return;
        };
        match e.state {
            JobState::Queued => {
                // O(depth), but only cancellation removes a queued job out of order; claims pop the front.
                q.ready[e.spec.priority.index()].retain(|(j, _)| *j != id);
            }
            JobState::Scheduled | JobState::Retrying => {
                if let Some(run_at) = e.run_at {
                    q.scheduled.remove(&(run_at, id));
                }
            }
            JobState::Active => {
                q.active.remove(&(e.lease_deadline, id));
                // Whatever comes next, the current lease is over.
                e.epoch += 1;
            }
            JobState::Dead => q.dead.retain(|j| *j != id),
            // Final states never transition again (cancel and retry_dead check first); nothing to unindex.
            JobState::Completed | JobState::Cancelled => {}
        }
    }

    fn enter_queued(&mut self, id: JobId, now: u64, data: Option<Value>) {
        let Some(e) = self.jobs.get_mut(&id) else {
            return;
        };
        e.state = JobState::Queued;
        e.run_at = None;
        e.updated_at = now;
        let prio = e.spec.priority.index();
        let q = self.queues.get_mut(&e.queue).expect("a job's queue exists");
        q.ready[prio].push_back((id, now));
        self.emit(id, EventType::Queued, data);
    }

    fn enter_scheduled(&mut self, id: JobId, run_at: u64, now: u64) {
        let Some(e) = self.jobs.get_mut(&id) else {
            return;
        };
        e.state = JobState::Scheduled;
        e.run_at = Some(run_at);
        e.updated_at = now;
        let q = self.queues.get_mut(&e.queue).expect("a job's queue exists");
        q.scheduled.insert((run_at, id));
        self.emit(id, EventType::Scheduled, None);
    }

    fn enter_retrying(&mut self, id: JobId, error: String, run_at: u64, now: u64) {
        let Some(e) = self.jobs.get_mut(&id) else {
            return;
        };
        e.state = JobState::Retrying;
        e.run_at = Some(run_at);
        e.updated_at = now;
        let data = json!({ "error": error, "run_at": run_at });
        e.error = Some(error);
        let q = self.queues.get_mut(&e.queue).expect("a job's queue exists");
        q.scheduled.insert((run_at, id));
        self.emit(id, EventType::Retrying, Some(data));
    }

    /// Move to `completed` or `cancelled`; the job stays for lookups until retention expires it.
    fn enter_finished(&mut self, id: JobId, state: JobState, result: Option<Value>, now: u64) {
        let Some(e) = self.jobs.get_mut(&id) else {
            return;
        };
        e.state = state;
        e.run_at = None;
        e.updated_at = now;
        e.result = result.clone();
        let queue = e.queue.clone();
        let ty = if state == JobState::Completed {
            EventType::Completed
        } else {
            EventType::Cancelled
        };
        self.emit(id, ty, result);
        // The event is in the log only while some group reads it.
        let logged = self.drop_recorded && !self.events.groups.is_empty();
        let seq = self.events.seq;
        let q = self.queues.get_mut(&queue).expect("a job's queue exists");
        q.finished.push_back((now, id));
        if logged {
            q.recorded_wait.push_back((seq, id));
        }
    }

    /// Dead-letter a job; the oldest dead job of the queue leaves the engine when the list is over `max`.
    fn enter_dead(&mut self, id: JobId, error: String, now: u64, max: usize) {
        let Some(e) = self.jobs.get_mut(&id) else {
            return;
        };
        e.state = JobState::Dead;
        e.run_at = None;
        e.updated_at = now;
        let data = json!({ "error": error });
        e.error = Some(error);
        let q = self.queues.get_mut(&e.queue).expect("a job's queue exists");
        q.dead.push_front(id);
        let mut evicted = Vec::new();
        while q.dead.len() > max {
            evicted.extend(q.dead.pop_back());
        }
        self.emit(id, EventType::Dead, Some(data));
        for old in evicted {
            self.jobs.remove(&old);
        }
    }

    /// Lease up to `max` ready jobs of `queue`, high priority first, FIFO within a priority.
    fn take_ready(
        &mut self,
        queue: &QueueName,
        consumer: &Arc<str>,
        max: usize,
        now: u64,
        visibility_ms: u64,
    ) -> Vec<Leased> {
        let deadline = now.saturating_add(visibility_ms);
        let mut out = Vec::new();
        self.actor = Some(consumer.clone());
        let q = self.queue(queue);
        if q.paused {
            return out;
        }
        let mut ids = Vec::new();
        for ready in &mut q.ready {
            while ids.len() < max {
                let Some((id, _)) = ready.pop_front() else {
                    break;
                };
                q.active.insert((deadline, id));
                q.delivered += 1;
                ids.push(id);
            }
        }
        for id in ids {
            let Some(e) = self.jobs.get_mut(&id) else {
                continue;
            };
            e.state = JobState::Active;
            e.attempts += 1;
            e.epoch += 1;
            e.lease_deadline = deadline;
            e.holder = Some(consumer.clone());
            e.run_at = None;
            e.updated_at = now;
            out.push(Leased {
                job: Job {
                    id,
                    queue: e.queue.clone(),
                    spec: e.spec.clone(),
                    attempt: e.attempts,
                },
                lease: Lease {
                    queue: e.queue.clone(),
                    job: id,
                    consumer: consumer.clone(),
                    token: e.epoch.to_string(),
                    attempt: e.attempts,
                    max_attempts: e.spec.max_attempts,
                    backoff: e.spec.backoff,
                },
            });
            self.emit(id, EventType::Active, None);
        }
        self.actor = None;
        out
    }

    fn info(&self, id: JobId) -> Option<JobInfo> {
        let e = self.jobs.get(&id)?;
        Some(JobInfo {
            id,
            queue: e.queue.clone(),
            state: e.state,
            attempts: e.attempts,
            spec: e.spec.clone(),
            result: e.result.clone(),
            error: e.error.clone(),
            run_at: e.run_at,
            updated_at: e.updated_at,
        })
    }
}

#[async_trait]
impl Jobs for MemoryBroker {
    async fn enqueue(&self, queue: &QueueName, job: NewJob) -> Result<Enqueued, BrokerError> {
        // Validated here, not through `enqueue_batch`, so a single job's error names `kind`, not `jobs[0].kind`.
        job.validate(&Limits::default())?;
        self.insert(queue, vec![job])?
            .pop()
            .ok_or_else(|| BrokerError::Internal("enqueue stored nothing".into()))
    }

    async fn enqueue_batch(
        &self,
        queue: &QueueName,
        jobs: Vec<NewJob>,
    ) -> Result<Vec<Enqueued>, BrokerError> {
        // All or nothing: every job is checked before any is stored.
        let limits = Limits::default();
        for (i, job) in jobs.iter().enumerate() {
            job.validate(&limits)
                .map_err(|e| e.within(&format!("jobs[{i}]")))?;
        }
        self.insert(queue, jobs)
    }

    async fn cancel(&self, id: JobId, by: Option<&str>) -> Result<CancelOutcome, BrokerError> {
        let now = now_ms();
        let mut st = self.lock()?;
        let Some(e) = st.jobs.get(&id) else {
            return Ok(CancelOutcome::NotFound);
        };
        let previous = e.state;
        if previous.is_final() {
            return Ok(CancelOutcome::AlreadyFinal(previous));
        }
        // Detaching an active job bumps its epoch: its worker's lease is dead from here on.
        st.detach(id);
        st.actor = by.map(Arc::from);
        st.enter_finished(id, JobState::Cancelled, None, now);
        st.actor = None;
        Ok(CancelOutcome::Cancelled(previous))
    }

    async fn job(&self, id: JobId) -> Result<Option<JobInfo>, BrokerError> {
        Ok(self.lock()?.info(id))
    }
}

#[async_trait]
impl Leasing for MemoryBroker {
    async fn claim(
        &self,
        queue: &QueueName,
        consumer: &str,
        max: usize,
        wait: Duration,
    ) -> Result<Vec<Leased>, BrokerError> {
        let deadline = tokio::time::Instant::now() + wait;
        let consumer: Arc<str> = consumer.into();
        let notify = self.lock()?.queue(queue).notify.clone();
        loop {
            // Register for a wake-up *before* looking at the queue: a job enqueued between the look and the wait
            // then still wakes us (`notify_waiters` only reaches registered waiters).
            let notified = notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let got =
                self.lock()?
                    .take_ready(queue, &consumer, max, now_ms(), self.visibility_ms());
            if !got.is_empty() || max == 0 {
                return Ok(got);
            }
            // Woken without a job for us (another claimer won it, or a resume found nothing): look again until
            // the deadline.
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return Ok(Vec::new());
            }
        }
    }

    async fn heartbeat(&self, leases: &[Lease]) -> Result<Vec<bool>, BrokerError> {
        let deadline = now_ms().saturating_add(self.visibility_ms());
        let mut st = self.lock()?;
        let mut out = Vec::with_capacity(leases.len());
        for lease in leases {
            let Some(e) = st.fenced(lease) else {
                out.push(false);
                continue;
            };
            let old = std::mem::replace(&mut e.lease_deadline, deadline);
            let q = st.queue(&lease.queue);
            q.active.remove(&(old, lease.job));
            q.active.insert((deadline, lease.job));
            out.push(true);
        }
        Ok(out)
    }

    async fn progress(&self, lease: &Lease, data: Value) -> Result<bool, BrokerError> {
        let now = now_ms();
        let mut st = self.lock()?;
        let Some(e) = st.fenced(lease) else {
            return Ok(false);
        };
        e.updated_at = now;
        st.actor = Some(lease.consumer.clone());
        st.emit(lease.job, EventType::Progress, Some(data));
        st.actor = None;
        Ok(true)
    }

    async fn complete(
        &self,
        items: Vec<Completion>,
    ) -> Result<Vec<Result<(), Rejected>>, BrokerError> {
        let now = now_ms();
        let mut st = self.lock()?;
        let mut out = Vec::with_capacity(items.len());
        for item in items {
            if st.fenced(&item.lease).is_none() {
                out.push(Err(Rejected));
                continue;
            }
            st.detach(item.lease.job);
            st.actor = Some(item.lease.consumer.clone());
            st.enter_finished(item.lease.job, JobState::Completed, Some(item.result), now);
            st.actor = None;
            out.push(Ok(()));
        }
        Ok(out)
    }

    async fn fail(
        &self,
        items: Vec<Failure>,
    ) -> Result<Vec<Result<FailOutcome, Rejected>>, BrokerError> {
        let now = now_ms();
        let dead_max = self.config.dead_letter_max;
        let mut st = self.lock()?;
        let mut out = Vec::with_capacity(items.len());
        for item in items {
            let Some(e) = st.fenced(&item.lease) else {
                out.push(Err(Rejected));
                continue;
            };
            let outcome = item
                .retry
                .outcome(e.attempts, e.spec.max_attempts, &e.spec.backoff, now);
            let id = item.lease.job;
            st.detach(id);
            st.actor = Some(item.lease.consumer.clone());
            match outcome {
                FailOutcome::Dead => st.enter_dead(id, item.error, now, dead_max),
                FailOutcome::Retrying { run_at } => st.enter_retrying(id, item.error, run_at, now),
            }
            st.actor = None;
            out.push(Ok(outcome));
        }
        Ok(out)
    }

    async fn release(&self, leases: &[Lease]) -> Result<Vec<bool>, BrokerError> {
        let now = now_ms();
        let mut st = self.lock()?;
        let mut out = Vec::with_capacity(leases.len());
        let mut queues = Vec::new();
        for lease in leases {
            let Some(e) = st.fenced(lease) else {
                out.push(false);
                continue;
            };
            // A released attempt was never really made (the worker is draining), so it does not count.
            e.attempts = e.attempts.saturating_sub(1);
            st.detach(lease.job);
            st.actor = Some(lease.consumer.clone());
            st.enter_queued(lease.job, now, Some(json!({ "released": true })));
            st.actor = None;
            queues.push(lease.queue.clone());
            out.push(true);
        }
        for q in queues {
            st.queue(&q).notify.notify_waiters();
        }
        Ok(out)
    }
}

#[async_trait]
impl Housekeeping for MemoryBroker {
    async fn promote_due(&self, queue: &QueueName, max: usize) -> Result<usize, BrokerError> {
        let now = now_ms();
        let mut st = self.lock()?;
        let q = st.queue(queue);
        let due: Vec<JobId> = q
            .scheduled
            .iter()
            .take_while(|(run_at, _)| *run_at <= now)
            .take(max)
            .map(|(_, id)| *id)
            .collect();
        for &id in &due {
            st.detach(id);
            st.enter_queued(id, now, None);
        }
        if !due.is_empty() {
            st.queue(queue).notify.notify_waiters();
        }
        Ok(due.len())
    }

    async fn reclaim_expired(
        &self,
        queue: &QueueName,
        max: usize,
    ) -> Result<Reclaimed, BrokerError> {
        let now = now_ms();
        let dead_max = self.config.dead_letter_max;
        let mut st = self.lock()?;
        let expired: Vec<JobId> = st
            .queue(queue)
            .active
            .iter()
            .take_while(|(deadline, _)| *deadline <= now)
            .take(max)
            .map(|(_, id)| *id)
            .collect();
        let mut counts = Reclaimed::default();
        for id in expired {
            let Some(e) = st.jobs.get(&id) else { continue };
            let (attempts, max_attempts) = (e.attempts, e.spec.max_attempts);
            st.detach(id);
            if attempts >= max_attempts {
                let error = format!("lease expired after {attempts} attempts");
                st.enter_dead(id, error, now, dead_max);
                counts.dead += 1;
            } else {
                st.enter_queued(id, now, Some(json!({ "reclaimed": true })));
                counts.requeued += 1;
            }
        }
        if counts.requeued > 0 {
            st.queue(queue).notify.notify_waiters();
        }
        Ok(counts)
    }

    async fn restore(&self, jobs: Vec<JobInfo>) -> Result<Vec<bool>, BrokerError> {
        let now = now_ms();
        let mut guard = self.lock()?;
        let st = &mut *guard;
        st.actor = Some(Arc::from(crate::RESTORE_ACTOR));
        let mut out = Vec::with_capacity(jobs.len());
        for job in jobs {
            if st.jobs.contains_key(&job.id) {
                out.push(false);
                continue;
            }
            // The same rules as the Redis engine's restore script.
            let attempts = match job.state {
                JobState::Active => job.attempts.saturating_sub(1),
                _ => job.attempts,
            };
            let waiting = match (job.state, job.run_at) {
                (s @ (JobState::Scheduled | JobState::Retrying), Some(t)) if t > now => {
                    Some((s, t))
                }
                _ => None,
            };
            let error = job
                .error
                .filter(|_| waiting.is_some_and(|(s, _)| s == JobState::Retrying));
            st.queue(&job.queue).received = true;
            st.jobs.insert(
                job.id,
                Entry {
                    queue: job.queue.clone(),
                    spec: job.spec,
                    state: JobState::Queued,
                    attempts,
                    epoch: 0,
                    result: None,
                    error: error.clone(),
                    run_at: None,
                    lease_deadline: 0,
                    holder: None,
                    updated_at: now,
                },
            );
            match waiting {
                None => {
                    st.enter_queued(job.id, now, Some(json!({"restored": true})));
                    st.queue(&job.queue).notify.notify_waiters();
                }
                Some((state, run_at)) => {
                    if let Some(e) = st.jobs.get_mut(&job.id) {
                        e.state = state;
                        e.run_at = Some(run_at);
                    }
                    st.queue(&job.queue).scheduled.insert((run_at, job.id));
                    let (ty, data) = if state == JobState::Retrying {
                        let data = json!({"error": error, "run_at": run_at, "restored": true});
                        (EventType::Retrying, data)
                    } else {
                        let data = json!({"run_at": run_at, "restored": true});
                        (EventType::Scheduled, data)
                    };
                    st.emit(job.id, ty, Some(data));
                }
            }
            out.push(true);
        }
        st.actor = None;
        Ok(out)
    }

    async fn try_lease(
        &self,
        name: &str,
        holder: &str,
        ttl: Duration,
    ) -> Result<bool, BrokerError> {
        let now = tokio::time::Instant::now();
        let mut st = self.lock()?;
        match st.leases.get(name) {
            Some((_, until)) if *until > now => Ok(false),
            _ => {
                st.leases
                    .insert(name.to_owned(), (holder.to_owned(), now + ttl));
                Ok(true)
            }
        }
    }

    async fn maintain(&self, queue: &QueueName) -> Result<(), BrokerError> {
        let now = now_ms();
        let retention = ms(self.config.finished_retention);
        let mut st = self.lock()?;
        let st = &mut *st;
        // Everything below the recorder's floor is in the store.
        let recorded_below = st
            .events
            .groups
            .get(crate::RECORDER_GROUP)
            .map(LogGroup::floor);
        let Some(q) = st.queues.get_mut(queue) else {
            return Ok(());
        };
        // A job's id can come back (restored from the record): only a finished job goes.
        let jobs = &mut st.jobs;
        let mut forget = |id: &JobId| {
            if jobs
                .get(id)
                .is_some_and(|e| matches!(e.state, JobState::Completed | JobState::Cancelled))
            {
                jobs.remove(id);
            }
        };
        while let Some(&(seq, id)) = q.recorded_wait.front() {
            if recorded_below.is_none_or(|floor| seq >= floor) {
                break;
            }
            q.recorded_wait.pop_front();
            forget(&id);
        }
        while let Some(&(finished_at, id)) = q.finished.front() {
            if finished_at.saturating_add(retention) > now {
                break;
            }
            q.finished.pop_front();
            forget(&id);
        }
        while let Some((expires_at, _)) = q.idempotency_expiry.front() {
            if *expires_at > now {
                break;
            }
            let Some((expires_at, key)) = q.idempotency_expiry.pop_front() else {
                break;
            };
            // The key may have been taken again after it expired: only the matching record goes.
            if q.idempotency
                .get(&key)
                .is_some_and(|s| s.expires_at == expires_at)
            {
                q.idempotency.remove(&key);
            }
        }
        Ok(())
    }
}

#[async_trait]
impl Operations for MemoryBroker {
    async fn dead_letters(
        &self,
        queue: &QueueName,
        limit: usize,
    ) -> Result<Vec<JobInfo>, BrokerError> {
        let st = self.lock()?;
        let Some(q) = st.queues.get(queue) else {
            return Ok(Vec::new());
        };
        Ok(q.dead
            .iter()
            .take(limit)
            .filter_map(|id| st.info(*id))
            .collect())
    }

    async fn retry_dead(&self, id: JobId) -> Result<RetryOutcome, BrokerError> {
        let now = now_ms();
        let mut st = self.lock()?;
        let Some(e) = st.jobs.get_mut(&id) else {
            return Ok(RetryOutcome::NotFound);
        };
        if e.state != JobState::Dead {
            return Ok(RetryOutcome::NotDead(e.state));
        }
        e.attempts = 0;
        let queue = e.queue.clone();
        st.detach(id);
        st.enter_queued(id, now, None);
        st.queue(&queue).notify.notify_waiters();
        Ok(RetryOutcome::Requeued)
    }

    async fn stats(&self, queue: &QueueName) -> Result<QueueStats, BrokerError> {
        let now = now_ms();
        let st = self.lock()?;
        let mut stats = QueueStats {
            queue: queue.clone(),
            depth: 0,
            active: 0,
            scheduled: 0,
            dead: 0,
            lag_ms: 0,
            paused: false,
            delivered: 0,
        };
        let Some(q) = st.queues.get(queue) else {
            return Ok(stats);
        };
        stats.depth = q.ready.iter().map(|r| r.len() as u64).sum();
        stats.active = q.active.len() as u64;
        stats.scheduled = q.scheduled.len() as u64;
        stats.dead = q.dead.len() as u64;
        stats.lag_ms = q
            .ready
            .iter()
            .filter_map(|r| r.front().map(|(_, since)| *since))
            .min()
            .map_or(0, |oldest| now.saturating_sub(oldest));
        stats.paused = q.paused;
        stats.delivered = q.delivered;
        Ok(stats)
    }

    async fn scheduled_due(&self, queue: &QueueName, within: Duration) -> Result<u64, BrokerError> {
        let until = now_ms().saturating_add(within.as_millis() as u64);
        let st = self.lock()?;
        Ok(st.queues.get(queue).map_or(0, |q| {
            q.scheduled
                .iter()
                .take_while(|(run_at, _)| *run_at <= until)
                .count() as u64
        }))
    }

    async fn leases_by_consumer(
        &self,
        queue: &QueueName,
    ) -> Result<BTreeMap<String, u64>, BrokerError> {
        let st = self.lock()?;
        let mut out = BTreeMap::new();
        let Some(q) = st.queues.get(queue) else {
            return Ok(out);
        };
        for (_, id) in &q.active {
            if let Some(holder) = st.jobs.get(id).and_then(|e| e.holder.as_deref()) {
                *out.entry(holder.to_owned()).or_insert(0) += 1;
            }
        }
        Ok(out)
    }

    async fn queues(&self) -> Result<Vec<QueueName>, BrokerError> {
        let st = self.lock()?;
        Ok(st
            .queues
            .iter()
            .filter(|(_, q)| q.received)
            .map(|(name, _)| name.clone())
            .collect())
    }

    async fn pause(&self, queue: &QueueName) -> Result<(), BrokerError> {
        self.lock()?.queue(queue).paused = true;
        Ok(())
    }

    async fn resume(&self, queue: &QueueName) -> Result<(), BrokerError> {
        let mut st = self.lock()?;
        let q = st.queue(queue);
        q.paused = false;
        // Claims that waited through the pause take the backlog now rather than at their deadline.
        q.notify.notify_waiters();
        Ok(())
    }

    async fn ping(&self) -> Result<(), BrokerError> {
        self.lock().map(drop)
    }
}

#[async_trait]
impl EventFeed for MemoryBroker {
    async fn subscribe(&self) -> Result<EventStream, BrokerError> {
        // Subscribed under the lock, so the stream starts exactly after the last transition already made.
        let rx = self.lock()?.events.tx.subscribe();
        // A lagging receiver gets `Lagged` (events it lost) before the retained ones: skip it and go on.
        Ok(Box::pin(BroadcastStream::new(rx).filter_map(Result::ok)))
    }

    async fn job_feed(&self) -> Result<JobFeed, BrokerError> {
        // One process: every event is already here, so the feed yields all of them whatever is watched.
        let events = self.subscribe().await?.map(|event| FedEvent {
            via: Via::All,
            event,
        });
        Ok(JobFeed::new(
            JobFeedControl::new(Arc::new(WatchAll)),
            Box::pin(events),
        ))
    }

    async fn events_missed(
        &self,
        _scope: EventScope<'_>,
        since: &StreamPos,
        scan: usize,
        keep: &EventFilter<'_>,
    ) -> Result<Missed<Event>, BrokerError> {
        let epoch = Some(self.epoch.clone());
        let Some(from) = memory_offset(&since.offset).filter(|_| since.epoch == self.epoch) else {
            return Ok(Missed::lost(epoch));
        };
        let mut st = self.lock()?;
        st.events.expire_recent(now_ms());
        if from < st.events.recent_dropped {
            return Ok(Missed::lost(epoch));
        }
        let mut scanned = 0;
        let mut entries: Vec<Event> = Vec::new();
        for (seq, _, e) in &st.events.recent {
            if *seq <= from {
                continue;
            }
            scanned += 1;
            if scanned > scan {
                return Ok(Missed::lost(epoch));
            }
            if keep(e) {
                entries.push(e.clone());
            }
        }
        drop(st);
        Ok(Missed {
            entries,
            recovered: true,
            epoch,
        })
    }

    fn events_epoch(&self, _queue: &QueueName) -> Option<String> {
        Some(self.epoch.clone())
    }
}

#[async_trait]
impl PubSub for MemoryBroker {
    async fn publish(&self, channel: &str, payload: String) -> Result<(), BrokerError> {
        self.publish_in_process(channel, payload).await.map(|_| ())
    }

    async fn publish_in_process(
        &self,
        channel: &str,
        payload: String,
    ) -> Result<Option<u64>, BrokerError> {
        let now = now_ms();
        let ttl = ms(self.history.ttl);
        let mut h = self
            .app_history
            .lock()
            .map_err(|_| BrokerError::Internal("channel history poisoned by a panic".into()))?;
        h.publishes += 1;
        if h.publishes % 1024 == 0 {
            h.expire(now, ttl);
        }
        h.seq += 1;
        let seq = h.seq;
        let expired_upto = h.expired_upto;
        // A channel new to the map may have had a history that expired: reach back no further than that.
        let ring = h
            .channels
            .entry(channel.to_owned())
            .or_insert_with(|| ChannelRing {
                dropped_upto: expired_upto,
                ..ChannelRing::default()
            });
        // A ring idle past its ttl has expired: what it held is gone.
        if ring.last_at.saturating_add(ttl) < now
            && let Some(last) = ring.entries.back().map(|e| e.0)
        {
            ring.dropped_upto = last;
            ring.entries.clear();
        }
        ring.entries.push_back((seq, now, payload.clone()));
        ring.last_at = now;
        while ring.entries.len() > self.history.size {
            if let Some((s, _, _)) = ring.entries.pop_front() {
                ring.dropped_upto = s;
            }
        }
        // No feed at all is not an error: nobody listens, as with a Redis PUBLISH that reaches no one. Sent under
        // the lock, so listeners see offsets in order.
        let _ = self.app.send(ChannelMessage {
            channel: channel.to_owned(),
            payload,
            position: Some(StreamPos {
                offset: format!("0-{seq}"),
                epoch: self.epoch.clone(),
            }),
        });
        Ok(Some(seq))
    }

    fn channel_history(&self) -> ChannelHistory {
        self.history
    }

    async fn channel_missed(
        &self,
        channel: &str,
        since: &StreamPos,
        max: usize,
    ) -> Result<Missed<HistoryEntry>, BrokerError> {
        let epoch = Some(self.epoch.clone());
        let Some(from) = memory_offset(&since.offset).filter(|_| since.epoch == self.epoch) else {
            return Ok(Missed::lost(epoch));
        };
        let now = now_ms();
        let ttl = ms(self.history.ttl);
        let mut h = self
            .app_history
            .lock()
            .map_err(|_| BrokerError::Internal("channel history poisoned by a panic".into()))?;
        let expired_upto = h.expired_upto;
        let Some(ring) = h.channels.get_mut(channel) else {
            return Ok(if from >= expired_upto {
                Missed {
                    entries: Vec::new(),
                    recovered: true,
                    epoch,
                }
            } else {
                Missed::lost(epoch)
            });
        };
        if ring.last_at.saturating_add(ttl) < now {
            if let Some(last) = ring.entries.back().map(|e| e.0) {
                ring.dropped_upto = last;
            }
            ring.entries.clear();
        }
        while ring
            .entries
            .front()
            .is_some_and(|e| e.1.saturating_add(ttl) < now)
        {
            if let Some((s, _, _)) = ring.entries.pop_front() {
                ring.dropped_upto = s;
            }
        }
        if from < ring.dropped_upto {
            return Ok(Missed::lost(epoch));
        }
        let entries: Vec<HistoryEntry> = ring
            .entries
            .iter()
            .filter(|e| e.0 > from)
            .map(|(s, _, p)| HistoryEntry {
                offset: format!("0-{s}"),
                payload: p.clone(),
            })
            .collect();
        if entries.len() > max {
            return Ok(Missed::lost(epoch));
        }
        Ok(Missed {
            entries,
            recovered: true,
            epoch,
        })
    }

    async fn channels(&self) -> Result<ChannelFeed, BrokerError> {
        let wanted = Arc::new(MemoryFeed::default());
        let filter = wanted.clone();
        let messages = BroadcastStream::new(self.app.subscribe())
            .filter_map(Result::ok)
            .filter(move |m| filter.wants(&m.channel));
        Ok(ChannelFeed::new(
            ChannelControl::new(wanted),
            Box::pin(messages),
        ))
    }

    fn membership(&self) -> Option<&dyn Membership> {
        Some(self)
    }
}

#[async_trait]
impl EventLog for MemoryBroker {
    fn log_shards(&self) -> usize {
        1
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
        if shard != 0 {
            return Err(BrokerError::Internal(format!("no log shard {shard}")));
        }
        let deadline = tokio::time::Instant::now() + wait;
        let max = max.max(1);
        loop {
            let appended = {
                let mut st = self.lock()?;
                let ev = &mut st.events;
                if !ev.groups.contains_key(group) {
                    // A new group starts at the oldest entry held (nothing is held before the first group).
                    let start = ev.log.front().map_or(ev.seq, |(s, _)| s - 1);
                    ev.groups.insert(
                        group.to_owned(),
                        LogGroup {
                            delivered: start,
                            ..LogGroup::default()
                        },
                    );
                }
                let now = tokio::time::Instant::now();
                let mut picked = Vec::new();
                let g = ev.groups.get(group).expect("inserted above");
                if let Some(idle) = reclaim_idle {
                    picked.extend(
                        g.pending
                            .iter()
                            .filter(|(_, (_, at))| now.duration_since(*at) >= idle)
                            .map(|(seq, _)| *seq)
                            .take(max),
                    );
                }
                let from = g.delivered;
                let fresh: Vec<u64> = if picked.is_empty() {
                    // Sequences are consecutive in the log, so the first undelivered one is found by offset.
                    let first = ev.log.front().map_or(0, |(s, _)| *s);
                    let start = usize::try_from((from + 1).saturating_sub(first))
                        .unwrap_or(usize::MAX)
                        .min(ev.log.len());
                    ev.log
                        .range(start..)
                        .map(|(seq, _)| *seq)
                        .take(max)
                        .collect()
                } else {
                    Vec::new()
                };
                let mut out = Vec::with_capacity(picked.len() + fresh.len());
                for seq in picked.iter().chain(&fresh) {
                    // An entry pushed out by the hard cap is gone; it is dropped from pending below.
                    if let Some(e) = ev.entry(*seq) {
                        out.push(LogEntry {
                            position: LogPosition {
                                shard: 0,
                                sid: seq.to_string(),
                            },
                            bytes: serde_json::to_vec(e).map_or(0, |v| v.len()),
                            events: vec![e.clone()],
                        });
                    }
                }
                let g = ev.groups.get_mut(group).expect("inserted above");
                for seq in picked.iter().chain(&fresh) {
                    g.pending.insert(*seq, (consumer.to_owned(), now));
                }
                if let Some(last) = fresh.last() {
                    g.delivered = *last;
                }
                let first = ev.log.front().map_or(u64::MAX, |(s, _)| *s);
                ev.groups
                    .get_mut(group)
                    .expect("inserted above")
                    .pending
                    .retain(|seq, _| *seq >= first);
                if !out.is_empty() {
                    return Ok(out);
                }
                ev.appended.clone()
            };
            let notified = appended.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            // Look once more with the waiter registered, so an append in between is not missed.
            {
                let st = self.lock()?;
                let g = &st.events.groups[group];
                if st.events.log.back().is_some_and(|(s, _)| *s > g.delivered) {
                    continue;
                }
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return Ok(Vec::new());
            }
        }
    }

    async fn ack_log(&self, group: &str, entries: &[LogPosition]) -> Result<(), BrokerError> {
        let mut st = self.lock()?;
        let ev = &mut st.events;
        if let Some(g) = ev.groups.get_mut(group) {
            for p in entries {
                if let Ok(seq) = p.sid.parse::<u64>() {
                    g.pending.remove(&seq);
                }
            }
        }
        ev.trim();
        Ok(())
    }

    async fn log_backlog(&self, group: &str) -> Result<u64, BrokerError> {
        let st = self.lock()?;
        let ev = &st.events;
        Ok(ev.groups.get(group).map_or(0, |g| {
            let unread = ev
                .log
                .back()
                .map_or(0, |(last, _)| last.saturating_sub(g.delivered));
            unread + g.pending.len() as u64
        }))
    }
}

/// The control of a memory job feed: the feed already yields everything.
#[derive(Debug)]
struct WatchAll;

impl TopicControl for WatchAll {
    fn watch(&self, _topic: &Topic) -> Confirmation {
        Box::pin(async { Ok(()) })
    }

    fn unwatch(&self, _topic: &Topic) {}
}

/// The channels one memory feed listens to.
#[derive(Debug, Default)]
struct MemoryFeed {
    // A std mutex: held for one set operation, never across an await.
    channels: Mutex<HashSet<String>>,
}

impl MemoryFeed {
    fn wants(&self, channel: &str) -> bool {
        self.channels
            .lock()
            .map(|c| c.contains(channel))
            .unwrap_or(false)
    }
}

impl FeedControl for MemoryFeed {
    fn subscribe(&self, channel: &str) -> Confirmation {
        if let Ok(mut c) = self.channels.lock() {
            c.insert(channel.to_owned());
        }
        Box::pin(async { Ok(()) })
    }

    fn unsubscribe(&self, channel: &str) {
        if let Ok(mut c) = self.channels.lock() {
            c.remove(channel);
        }
    }
}

impl MemoryBroker {
    fn members_now(&self, beat: Option<(&NodeInfo, Duration)>) -> Result<Vec<Member>, BrokerError> {
        let now = Instant::now();
        // Nothing in the map can be half-updated by a panic: keep serving.
        let mut m = self.members.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((info, ttl)) = beat {
            m.insert(info.id.clone(), (info.clone(), now, now + ttl));
            m.retain(|_, (_, _, expiry)| *expiry > now);
        }
        let mut out: Vec<Member> = m
            .values()
            .filter(|(_, _, expiry)| *expiry > now)
            .map(|(info, at, _)| Member {
                info: info.clone(),
                age_ms: now.duration_since(*at).as_millis() as u64,
            })
            .collect();
        out.sort_by(|a, b| a.info.id.cmp(&b.info.id));
        Ok(out)
    }
}

#[async_trait]
impl Membership for MemoryBroker {
    async fn heartbeat_members(
        &self,
        info: &NodeInfo,
        ttl: Duration,
    ) -> Result<Vec<Member>, BrokerError> {
        crate::membership::check_ttl(ttl)?;
        self.members_now(Some((info, ttl)))
    }

    async fn live_members(&self) -> Result<Vec<Member>, BrokerError> {
        self.members_now(None)
    }

    async fn leave(&self, id: &str) -> Result<(), BrokerError> {
        self.members
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    //! Memory-engine internals the contract suite cannot see: event id shape and that housekeeping really frees
    //! memory. Behaviour shared with the Redis engine is tested in `tests/broker/contract/`.

    use super::*;
    use crate::Retry;
    use ferry_core::Kind;

    fn config() -> EngineConfig {
        EngineConfig {
            finished_retention: Duration::ZERO,
            idempotency_ttl: Duration::ZERO,
            dead_letter_max: 2,
            ..EngineConfig::default()
        }
    }

    fn job(key: Option<&str>) -> NewJob {
        let mut j = NewJob::new(Kind::parse("k").unwrap(), json!(null));
        j.idempotency_key = key.map(str::to_owned);
        j
    }

    #[tokio::test]
    async fn event_ids_are_a_global_sequence() {
        let b = MemoryBroker::new(EngineConfig::default());
        let q = QueueName::parse("q").unwrap();
        let mut events = b.subscribe().await.unwrap();
        b.enqueue(&q, job(None)).await.unwrap();
        b.enqueue(&q, job(None)).await.unwrap();
        assert_eq!(events.next().await.unwrap().id, "1/0");
        assert_eq!(events.next().await.unwrap().id, "2/0");
    }

    #[tokio::test]
    async fn maintain_and_the_dead_cap_free_memory() {
        let b = MemoryBroker::new(config());
        let q = QueueName::parse("q").unwrap();
        b.enqueue(&q, job(Some("a"))).await.unwrap();
        for _ in 0..3 {
            b.enqueue(&q, job(None)).await.unwrap();
        }
        let leased = b.claim(&q, "c", 4, Duration::ZERO).await.unwrap();
        let (first, rest) = leased.split_first().unwrap();
        b.complete(vec![Completion {
            lease: first.lease.clone(),
            result: json!(1),
        }])
        .await
        .unwrap();
        let failures = rest
            .iter()
            .map(|l| Failure {
                lease: l.lease.clone(),
                error: "x".into(),
                retry: Retry::Never,
            })
            .collect();
        b.fail(failures).await.unwrap();
        b.maintain(&q).await.unwrap();

        let st = b.lock().unwrap();
        // Two dead jobs (the cap) remain; the completed one and the third dead one are gone, and so is the key.
        assert_eq!(st.jobs.len(), 2);
        let q = &st.queues[&q];
        assert_eq!(q.dead.len(), 2);
        assert!(q.finished.is_empty());
        assert!(q.idempotency.is_empty() && q.idempotency_expiry.is_empty());
        assert!(q.active.is_empty() && q.ready.iter().all(VecDeque::is_empty));
    }
}
