//! The broker contract: what every [`Broker`] engine must do, written once and run unchanged against each engine.
//!
//! An engine's test module implements [`Engine`] (start a fresh, isolated engine; hand out its broker) and expands
//! [`contract_suite!`](crate::contract_suite) with that type, which generates one `#[tokio::test]` per case:
//!
//! ```ignore
//! use crate::{contract, contract_suite};
//! struct Mem(Arc<MemoryBroker>);
//! #[async_trait::async_trait]
//! impl contract::Engine for Mem { /* start, broker */ }
//! contract_suite!(Mem);
//! ```
//!
//! This module owns the observable semantics only. It must not look inside an engine (no Redis keys, no memory
//! internals), nor assert on speed: cases may sleep or poll until a lease expires or a delay comes due, always
//! with a deadline, and assert what happened, never how fast. Each case uses its own queue, so an engine may
//! also share one backing store between cases.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use ferry_broker::{
    Broker, BrokerError, CancelOutcome, ChannelHistory, Completion, EngineConfig, EventScope,
    EventStream, FailOutcome, Failure, Lease, Leased, Reclaimed, Rejected, Retry, RetryOutcome,
    StreamPos, event_offset, parse_offset,
};
use ferry_core::{
    Backoff, Event, EventType, JobId, JobInfo, JobState, Kind, NewJob, Priority, QueueName, now_ms,
};
use futures::StreamExt;
use serde_json::{Value, json};
use tokio::time::{Instant, sleep, timeout};

/// An engine under test.
#[async_trait::async_trait]
pub trait Engine: Send + Sync + Sized + 'static {
    /// Every queue and channel shares one event log and one epoch (the memory engine, one Redis). False where
    /// they are spread over shards with logs and epochs of their own (the virtual shards of a Redis Cluster):
    /// there, a position of one shard means nothing on another, and events spread over several logs are not
    /// recovered by one position (the client refetches).
    const ONE_LOG: bool = true;

    /// A fresh, isolated engine (the Redis one starts its own redis-server). Kept alive for the whole case.
    async fn start(config: EngineConfig) -> Self;
    /// [`Engine::start`] with this application channel history (and recovery horizon).
    async fn start_with_history(config: EngineConfig, history: ChannelHistory) -> Self;
    fn broker(&self) -> Arc<dyn Broker>;
}

/// One `#[tokio::test]` per contract case, each running `contract::<case>::<$engine>()`.
#[macro_export]
macro_rules! contract_suite {
    ($engine:ty) => {
        $crate::contract_suite!(@cases $engine;
            ping_answers,
            lifecycle_queued_active_completed,
            complete_and_claim_settles_then_leases,
            enqueue_batch_keeps_order_and_ids,
            invalid_input_names_the_field,
            priorities_high_normal_low_fifo_within,
            delayed_job_waits_until_due,
            blocked_claim_wakes_on_enqueue,
            backoff_delay_within_jitter_bounds,
            retry_after_is_honoured,
            max_attempts_exhausted_goes_dead,
            permanent_error_goes_dead,
            idempotency_key_returns_first_job,
            idempotency_key_expires_after_ttl,
            idempotency_key_is_scoped_to_the_subject,
            cancel_queued_job,
            depth_counts_only_jobs_left_after_cancels,
            cancel_scheduled_and_retrying_jobs,
            cancel_active_job_revokes_lease,
            pause_and_resume,
            dead_letters_list_and_retry,
            dead_letter_list_is_capped,
            lease_expiry_reclaims_and_fences_stale_worker,
            lease_expiry_on_last_attempt_goes_dead,
            heartbeat_keeps_long_job_leased,
            release_returns_job_without_counting_attempt,
            stats_and_queues,
            leases_by_consumer_counts_held_jobs,
            finished_jobs_expire_after_retention,
            recorded_finished_jobs_leave_once_acknowledged,
            concurrent_claimers_never_share_a_job,
            slow_subscriber_never_blocks_engine,
            channel_publish_reaches_subscriber,
            channel_unsubscribed_is_not_delivered,
            job_feed_delivers_what_it_watches,
            log_holds_every_event_with_spec_and_actor,
            log_unacknowledged_entries_are_taken_over,
            restore_puts_back_lost_jobs_as_recorded,
            restore_leaves_every_job_the_engine_knows,
            lease_has_one_holder_until_it_expires,
            channel_offsets_rise_and_history_returns_exactly_the_missed,
            channel_history_trimmed_or_expired_is_not_recovered,
            job_events_recover_exactly_the_missed,
            job_event_history_expired_or_cut_is_not_recovered,
            another_epoch_is_not_recovered,
            membership_lists_live_gateways_until_they_expire_or_leave,
        );
    };
    (@cases $engine:ty; $($case:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $case() {
                $crate::contract::$case::<$engine>().await;
            }
        )*
    };
}

pub async fn membership_lists_live_gateways_until_they_expire_or_leave<E: Engine>() {
    use ferry_broker::NodeInfo;
    let c = setup::<E>("membership").await;
    let m = c.b.membership().expect("the engine keeps a membership");
    let node = |id: &str, connections: u64| NodeInfo {
        region: Some("eu".into()),
        connections,
        partitions: 3,
        started_at_ms: 42,
        ..NodeInfo::new(id, format!("http://{id}:8080"))
    };
    let ids = |v: &[NodeInfo]| {
        let mut ids: Vec<String> = v.iter().map(|n| n.id.clone()).collect();
        ids.sort();
        ids
    };
    assert!(m.members().await.unwrap().is_empty());
    let a = node("a", 7);
    let live = m.heartbeat(&a, Duration::from_secs(30)).await.unwrap();
    assert_eq!(live, vec![a.clone()], "the heartbeat answers with itself");
    // A short-lived member: listed until its ttl passes, then gone (and dropped by the next heartbeat).
    let b = node("b", 1);
    let live = m.heartbeat(&b, Duration::from_millis(300)).await.unwrap();
    assert_eq!(ids(&live), ["a", "b"]);
    let aged = m.live_members().await.unwrap();
    assert!(aged.iter().all(|x| x.age_ms < 5_000), "{aged:?}");
    // A heartbeat replaces the node's entry.
    let a2 = NodeInfo {
        draining: true,
        connections: 9,
        ..a.clone()
    };
    m.heartbeat(&a2, Duration::from_secs(30)).await.unwrap();
    let listed = m.members().await.unwrap();
    assert!(listed.contains(&a2), "{listed:?}");
    assert!(!listed.contains(&a), "{listed:?}");
    sleep(Duration::from_millis(400)).await;
    assert_eq!(ids(&m.members().await.unwrap()), ["a"], "b expired");
    let live = m.heartbeat(&a2, Duration::from_secs(30)).await.unwrap();
    assert_eq!(ids(&live), ["a"]);
    // The age grows between heartbeats.
    sleep(Duration::from_millis(150)).await;
    let aged = m.live_members().await.unwrap();
    assert!(aged[0].age_ms >= 100, "{aged:?}");
    m.leave("a").await.unwrap();
    assert!(m.members().await.unwrap().is_empty());
    assert!(
        m.heartbeat(&a, Duration::ZERO).await.is_err(),
        "a zero ttl is refused"
    );
}

// ---------------------------------------------------------------------------------------------------------------
// Helpers

/// The engine settings of most cases: a short visibility timeout so lease cases run in about a second.
pub fn cfg() -> EngineConfig {
    EngineConfig {
        visibility_timeout: Duration::from_millis(500),
        finished_retention: Duration::from_secs(3600),
        dead_letter_max: 1_000,
        event_stream_max: 10_000,
        idempotency_ttl: Duration::from_secs(3600),
        drop_recorded: false,
    }
}

/// How long a case waits for something that must happen (a lease to expire, an event to arrive) before failing.
/// Generous, because two shared cores may be busy compiling; cases normally finish far sooner.
const PATIENCE: Duration = Duration::from_secs(10);

/// A case's engine, broker and queue. The engine is held so it lives as long as the case.
pub struct Ctx<E> {
    _engine: E,
    pub b: Arc<dyn Broker>,
    pub q: QueueName,
}

pub async fn setup<E: Engine>(case: &str) -> Ctx<E> {
    setup_with(case, cfg()).await
}

pub async fn setup_with<E: Engine>(case: &str, config: EngineConfig) -> Ctx<E> {
    let engine = E::start(config).await;
    let b = engine.broker();
    Ctx {
        _engine: engine,
        b,
        q: unique_queue(case),
    }
}

/// A queue name no other case (nor an earlier run against a shared store) uses.
pub fn unique_queue(case: &str) -> QueueName {
    let suffix = JobId::new().0.simple().to_string();
    QueueName::parse(format!("ct.{case}.{}", &suffix[suffix.len() - 12..])).unwrap()
}

pub fn job(kind: &str) -> NewJob {
    NewJob::new(Kind::parse(kind).unwrap(), json!({ "kind": kind }))
}

pub fn with_priority(kind: &str, p: Priority) -> NewJob {
    NewJob {
        priority: p,
        ..job(kind)
    }
}

/// Polls until the deadline, then fails the case naming what never happened.
pub struct Patience {
    until: Instant,
    what: &'static str,
}

impl Patience {
    pub fn new(what: &'static str) -> Self {
        Self {
            until: Instant::now() + PATIENCE,
            what,
        }
    }

    pub async fn tick(&self) {
        assert!(
            Instant::now() < self.until,
            "timed out waiting for {}",
            self.what
        );
        sleep(Duration::from_millis(20)).await;
    }
}

/// Claim exactly one job (waiting for it).
pub async fn claim_one(b: &Arc<dyn Broker>, q: &QueueName, consumer: &str) -> Leased {
    let mut got = b.claim(q, consumer, 1, PATIENCE).await.unwrap();
    assert_eq!(got.len(), 1, "expected one job from {q}");
    got.pop().unwrap()
}

/// Claim with a short wait and expect nothing.
pub async fn claim_none(b: &Arc<dyn Broker>, q: &QueueName) {
    let got = b
        .claim(q, "nobody", 10, Duration::from_millis(100))
        .await
        .unwrap();
    assert!(got.is_empty(), "expected nothing claimable, got {got:?}");
}

pub async fn complete(b: &Arc<dyn Broker>, lease: &Lease, result: Value) -> Result<(), Rejected> {
    let mut r = b
        .complete(vec![Completion {
            lease: lease.clone(),
            result,
        }])
        .await
        .unwrap();
    assert_eq!(r.len(), 1);
    r.pop().unwrap()
}

pub async fn fail(
    b: &Arc<dyn Broker>,
    lease: &Lease,
    error: &str,
    retry: Retry,
) -> Result<FailOutcome, Rejected> {
    let mut r = b
        .fail(vec![Failure {
            lease: lease.clone(),
            error: error.into(),
            retry,
        }])
        .await
        .unwrap();
    assert_eq!(r.len(), 1);
    r.pop().unwrap()
}

pub async fn state(b: &Arc<dyn Broker>, id: JobId) -> JobState {
    b.job(id).await.unwrap().expect("job is held").state
}

/// A subscription that hands out events job by job: events of other jobs read along the way are kept for their
/// own turn, so a case can follow several jobs through one feed.
pub struct Feed {
    stream: EventStream,
    backlog: Vec<Event>,
}

impl Feed {
    pub async fn subscribe(b: &Arc<dyn Broker>) -> Self {
        Self {
            stream: b.subscribe().await.unwrap(),
            backlog: Vec::new(),
        }
    }

    /// The next `n` events of `job`, in order.
    pub async fn next_for(&mut self, job: JobId, n: usize) -> Vec<Event> {
        let mut out = Vec::new();
        let mut i = 0;
        while out.len() < n && i < self.backlog.len() {
            if self.backlog[i].job == job {
                out.push(self.backlog.remove(i));
            } else {
                i += 1;
            }
        }
        let until = Instant::now() + PATIENCE;
        while out.len() < n {
            match tokio::time::timeout_at(until, self.stream.next()).await {
                Ok(Some(e)) if e.job == job => out.push(e),
                Ok(Some(e)) => self.backlog.push(e),
                Ok(None) => panic!("event stream ended after {out:?}"),
                Err(_) => panic!("timed out waiting for {n} events of {job}, got {out:?}"),
            }
        }
        out
    }

    /// Assert `job` emits nothing more: enqueue a marker job in the same queue (so the same ordered feed) and
    /// check that no event of `job` arrives before the marker's.
    pub async fn assert_quiet(&mut self, b: &Arc<dyn Broker>, q: &QueueName, job: JobId) {
        assert!(
            self.backlog.iter().all(|e| e.job != job),
            "unexpected event of {job}: {:?}",
            self.backlog
        );
        let marker = b.enqueue(q, self::job("marker")).await.unwrap().id;
        let until = Instant::now() + PATIENCE;
        loop {
            let e = tokio::time::timeout_at(until, self.stream.next())
                .await
                .expect("marker event")
                .expect("event stream open");
            assert_ne!(e.job, job, "unexpected event {e:?}");
            if e.job == marker {
                return;
            }
            self.backlog.push(e);
        }
    }
}

pub fn types(events: &[Event]) -> Vec<EventType> {
    events.iter().map(|e| e.ty).collect()
}

/// Wait until the wall clock is past `t` (ms since the epoch).
pub async fn sleep_past(t: u64) {
    let now = now_ms();
    if now <= t {
        sleep(Duration::from_millis(t - now + 5)).await;
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Cases

pub async fn ping_answers<E: Engine>() {
    let c = setup::<E>("ping").await;
    c.b.ping().await.unwrap();
}

/// queued → active → (progress) → completed: events in order with every field, the lease and job handed to the
/// worker, and the lookup afterwards.
/// A worker's settling step: the completions are fenced as `complete`'s (a revoked lease is rejected), and the
/// same step leases up to `max` more jobs of the queue, in order, like a claim; with nothing ready it leases
/// nothing, and with `max` 0 it only completes.
pub async fn complete_and_claim_settles_then_leases<E: Engine>() {
    let c = setup::<E>("settle").await;
    let (b, q) = (&c.b, &c.q);
    let mut events = Feed::subscribe(b).await;
    let mut ids = Vec::new();
    for _ in 0..5 {
        ids.push(b.enqueue(q, job("report.build")).await.unwrap().id);
    }
    let first = b.claim(q, "w", 2, Duration::ZERO).await.unwrap();
    assert_eq!(first.iter().map(|l| l.job.id).collect::<Vec<_>>(), ids[..2]);
    b.cancel(ids[1], Some("admin")).await.unwrap();
    let done = |leased: &[Leased]| -> Vec<Completion> {
        leased
            .iter()
            .map(|l| Completion {
                lease: l.lease.clone(),
                result: json!({ "rows": 3 }),
            })
            .collect()
    };

    let (settled, next) = b.complete_and_claim(done(&first), q, "w", 2).await.unwrap();
    assert_eq!(
        settled,
        [Ok(()), Err(Rejected)],
        "the cancelled job's lease is gone"
    );
    assert_eq!(next.iter().map(|l| l.job.id).collect::<Vec<_>>(), ids[2..4]);
    for l in &next {
        assert_eq!(l.job.attempt, 1);
        assert_eq!(&*l.lease.consumer, "w");
        assert_eq!(state(b, l.job.id).await, JobState::Active);
    }
    assert_eq!(state(b, ids[0]).await, JobState::Completed);
    assert_eq!(state(b, ids[1]).await, JobState::Cancelled);
    let completed = events.next_for(ids[0], 3).await;
    assert_eq!(
        types(&completed),
        [EventType::Queued, EventType::Active, EventType::Completed]
    );
    assert_eq!(completed[2].data, Some(json!({ "rows": 3 })));
    for id in &ids[2..4] {
        let evs = events.next_for(*id, 2).await;
        assert_eq!(types(&evs), [EventType::Queued, EventType::Active]);
        assert_eq!(evs[1].attempt, 1);
    }

    // More room than jobs: the last one; then nothing ready, which leases nothing and still completes.
    let (settled, last) = b.complete_and_claim(done(&next), q, "w", 5).await.unwrap();
    assert_eq!(settled, [Ok(()), Ok(())]);
    assert_eq!(last.iter().map(|l| l.job.id).collect::<Vec<_>>(), ids[4..]);
    let (settled, none) = b.complete_and_claim(done(&last), q, "w", 5).await.unwrap();
    assert_eq!(settled, [Ok(())]);
    assert!(none.is_empty(), "{none:?}");
    for id in &ids[2..] {
        assert_eq!(state(b, *id).await, JobState::Completed);
    }

    // `max` 0 completes only, even with jobs ready.
    let more = b.enqueue(q, job("report.build")).await.unwrap().id;
    let held = b.claim(q, "w", 1, Duration::ZERO).await.unwrap();
    b.enqueue(q, job("report.build")).await.unwrap();
    let (settled, none) = b.complete_and_claim(done(&held), q, "w", 0).await.unwrap();
    assert_eq!(settled, [Ok(())]);
    assert!(none.is_empty());
    assert_eq!(state(b, more).await, JobState::Completed);
    assert_eq!(b.stats(q).await.unwrap().depth, 1);
}

pub async fn lifecycle_queued_active_completed<E: Engine>() {
    let c = setup::<E>("lifecycle").await;
    let (b, q) = (&c.b, &c.q);
    let mut events = Feed::subscribe(b).await;
    let mut new = job("email.send");
    new.payload = json!({ "to": "a@example.org" });
    new.max_attempts = Some(4);
    new.owner = Some("user-1".into());
    new.tenant = Some("acme".into());
    let before = now_ms();
    let enq = b.enqueue(q, new).await.unwrap();
    assert_eq!(enq.state, JobState::Queued);
    assert!(!enq.duplicate);
    assert_eq!(enq.id.0.get_version_num(), 7, "job ids are UUIDv7");

    let queued = b.job(enq.id).await.unwrap().unwrap();
    assert_eq!(queued.state, JobState::Queued);
    assert_eq!(queued.attempts, 0);
    assert_eq!(queued.queue, *q);
    assert!(queued.spec.created_at >= before && queued.spec.created_at <= now_ms());

    let leased = claim_one(b, q, "worker-1").await;
    assert_eq!(leased.job.id, enq.id);
    assert_eq!(leased.job.queue, *q);
    assert_eq!(leased.job.attempt, 1);
    assert_eq!(leased.job.spec.kind.as_str(), "email.send");
    assert_eq!(leased.job.spec.payload, json!({ "to": "a@example.org" }));
    assert_eq!(leased.job.spec.max_attempts, 4);
    assert_eq!(leased.lease.queue, *q);
    assert_eq!(leased.lease.job, enq.id);
    assert_eq!(&*leased.lease.consumer, "worker-1");
    assert!(!leased.lease.token.is_empty());
    assert_eq!(leased.lease.attempt, 1);
    assert_eq!(leased.lease.max_attempts, 4);
    assert_eq!(leased.lease.backoff, Backoff::default());
    assert_eq!(state(b, enq.id).await, JobState::Active);

    assert!(
        b.progress(&leased.lease, json!({ "pct": 50 }))
            .await
            .unwrap()
    );
    complete(b, &leased.lease, json!({ "sent": true }))
        .await
        .unwrap();

    let evs = events.next_for(enq.id, 4).await;
    assert_eq!(
        types(&evs),
        [
            EventType::Queued,
            EventType::Active,
            EventType::Progress,
            EventType::Completed
        ]
    );
    let states: Vec<_> = evs.iter().map(|e| e.state).collect();
    assert_eq!(
        states,
        [
            JobState::Queued,
            JobState::Active,
            JobState::Active,
            JobState::Completed
        ]
    );
    for e in &evs {
        assert_eq!(e.queue, *q);
        assert_eq!(e.kind.as_str(), "email.send");
        assert_eq!(e.owner.as_deref(), Some("user-1"));
        assert_eq!(e.tenant.as_deref(), Some("acme"));
        assert!(e.at >= before && e.at <= now_ms(), "{e:?}");
    }
    assert_eq!(evs[1].attempt, 1);
    assert_eq!(evs[3].attempt, 1);
    assert_eq!(evs[2].data, Some(json!({ "pct": 50 })));
    assert_eq!(evs[3].data, Some(json!({ "sent": true })));
    let ids: HashSet<_> = evs.iter().map(|e| e.id.clone()).collect();
    assert_eq!(ids.len(), evs.len(), "event ids are unique: {evs:?}");
    assert!(ids.iter().all(|id| !id.is_empty()));

    let done = b.job(enq.id).await.unwrap().unwrap();
    assert_eq!(done.state, JobState::Completed);
    assert_eq!(done.attempts, 1);
    assert_eq!(done.result, Some(json!({ "sent": true })));
    assert_eq!(done.error, None);
    assert_eq!(done.spec.owner.as_deref(), Some("user-1"));
    assert_eq!(done.spec.tenant.as_deref(), Some("acme"));
    assert_eq!(done.spec.priority, Priority::Normal);
    assert!(done.updated_at >= done.spec.created_at);
    // Housekeeping keeps a finished job for its retention (an hour here).
    b.maintain(q).await.unwrap();
    assert_eq!(state(b, enq.id).await, JobState::Completed);

    // Nothing fenced applies to a finished job.
    assert_eq!(complete(b, &leased.lease, json!(null)).await, Err(Rejected));
    assert_eq!(
        b.heartbeat(std::slice::from_ref(&leased.lease))
            .await
            .unwrap(),
        [false]
    );
    assert!(b.job(JobId::new()).await.unwrap().is_none());
}

pub async fn enqueue_batch_keeps_order_and_ids<E: Engine>() {
    let c = setup::<E>("batch").await;
    let (b, q) = (&c.b, &c.q);
    let mut events = Feed::subscribe(b).await;
    let jobs: Vec<NewJob> = (0..10)
        .map(|i| NewJob {
            payload: json!({ "i": i }),
            ..job("batch")
        })
        .collect();
    let out = b.enqueue_batch(q, jobs).await.unwrap();
    assert_eq!(out.len(), 10);
    assert!(
        out.iter()
            .all(|e| e.state == JobState::Queued && !e.duplicate)
    );
    let ids: Vec<JobId> = out.iter().map(|e| e.id).collect();
    assert!(
        ids.windows(2).all(|w| w[0] < w[1]),
        "ids are UUIDv7 in input order: {ids:?}"
    );
    for id in &ids {
        let e = events.next_for(*id, 1).await;
        assert_eq!(e[0].ty, EventType::Queued);
    }
    let leased = b.claim(q, "w", 100, PATIENCE).await.unwrap();
    let claimed: Vec<JobId> = leased.iter().map(|l| l.job.id).collect();
    assert_eq!(claimed, ids, "claimed in submission order");
    for (i, l) in leased.iter().enumerate() {
        assert_eq!(l.job.spec.payload, json!({ "i": i }));
    }
    assert!(b.enqueue_batch(q, Vec::new()).await.unwrap().is_empty());
}

pub async fn invalid_input_names_the_field<E: Engine>() {
    let c = setup::<E>("invalid").await;
    let (b, q) = (&c.b, &c.q);
    fn field_of<T>(r: Result<T, BrokerError>) -> String {
        match r {
            Err(BrokerError::Invalid(v)) => v.errors[0].field.clone(),
            Err(e) => panic!("expected Invalid, got {e}"),
            Ok(_) => panic!("expected Invalid, got Ok"),
        }
    }
    let bad_attempts = NewJob {
        max_attempts: Some(0),
        ..job("k")
    };
    assert_eq!(
        field_of(b.enqueue(q, bad_attempts.clone()).await),
        "max_attempts"
    );
    let empty_key = NewJob {
        idempotency_key: Some(String::new()),
        ..job("k")
    };
    assert_eq!(field_of(b.enqueue(q, empty_key).await), "idempotency_key");
    let inverted = NewJob {
        backoff: Some(Backoff {
            base_ms: 10,
            max_ms: 1,
        }),
        ..job("k")
    };
    assert_eq!(field_of(b.enqueue(q, inverted).await), "backoff.max_ms");
    let too_far = NewJob {
        delay_ms: Some(u64::MAX),
        ..job("k")
    };
    assert_eq!(field_of(b.enqueue(q, too_far).await), "delay_ms");
    let huge = NewJob {
        payload: json!("x".repeat(600 * 1024)),
        ..job("k")
    };
    assert_eq!(field_of(b.enqueue(q, huge).await), "payload");

    // A batch names the item, and stores nothing when any item is bad.
    let r = b.enqueue_batch(q, vec![job("k"), bad_attempts]).await;
    assert_eq!(field_of(r), "jobs[1].max_attempts");
    let s = b.stats(q).await.unwrap();
    assert_eq!((s.depth, s.scheduled), (0, 0), "nothing stored: {s:?}");
}

pub async fn priorities_high_normal_low_fifo_within<E: Engine>() {
    let c = setup::<E>("priorities").await;
    let (b, q) = (&c.b, &c.q);
    let order = [
        Priority::Low,
        Priority::Normal,
        Priority::High,
        Priority::Low,
        Priority::High,
        Priority::Normal,
    ];
    let mut ids = Vec::new();
    for p in order {
        ids.push((p, b.enqueue(q, with_priority("p", p)).await.unwrap().id));
    }
    let of = |p: Priority| -> Vec<JobId> {
        ids.iter()
            .filter(|(q, _)| *q == p)
            .map(|(_, id)| *id)
            .collect()
    };
    let (high, normal, low) = (of(Priority::High), of(Priority::Normal), of(Priority::Low));

    let first: Vec<JobId> = b
        .claim(q, "w", 3, PATIENCE)
        .await
        .unwrap()
        .iter()
        .map(|l| l.job.id)
        .collect();
    assert_eq!(first, [high[0], high[1], normal[0]]);
    let rest: Vec<JobId> = b
        .claim(q, "w", 10, PATIENCE)
        .await
        .unwrap()
        .iter()
        .map(|l| l.job.id)
        .collect();
    assert_eq!(rest, [normal[1], low[0], low[1]]);

    // A high job submitted later still goes before waiting low ones.
    let late_low = b
        .enqueue(q, with_priority("p", Priority::Low))
        .await
        .unwrap()
        .id;
    let late_high = b
        .enqueue(q, with_priority("p", Priority::High))
        .await
        .unwrap()
        .id;
    assert_eq!(claim_one(b, q, "w").await.job.id, late_high);
    let last = claim_one(b, q, "w").await;
    assert_eq!(last.job.id, late_low);
    assert_eq!(last.job.spec.priority, Priority::Low);
}

pub async fn delayed_job_waits_until_due<E: Engine>() {
    let c = setup::<E>("delayed").await;
    let (b, q) = (&c.b, &c.q);
    let mut events = Feed::subscribe(b).await;

    // Far in the future: never due during the case.
    let before = now_ms();
    let far = b
        .enqueue(
            q,
            NewJob {
                delay_ms: Some(600_000),
                ..job("later")
            },
        )
        .await
        .unwrap();
    let after = now_ms();
    assert_eq!(far.state, JobState::Scheduled);
    let info = b.job(far.id).await.unwrap().unwrap();
    assert_eq!(info.state, JobState::Scheduled);
    let run_at = info.run_at.expect("scheduled job has run_at");
    assert!(
        run_at >= before + 600_000 && run_at <= after + 600_000,
        "{run_at}"
    );
    let e = events.next_for(far.id, 1).await;
    assert_eq!(e[0].ty, EventType::Scheduled);
    assert_eq!(e[0].state, JobState::Scheduled);
    assert_eq!(b.promote_due(q, 100).await.unwrap(), 0);
    claim_none(b, q).await;
    let s = b.stats(q).await.unwrap();
    assert_eq!((s.depth, s.scheduled), (0, 1));

    // Three soon-due jobs: promoted once due, `max` respected, then claimable.
    let soon: Vec<JobId> = b
        .enqueue_batch(
            q,
            (0..3)
                .map(|_| NewJob {
                    delay_ms: Some(200),
                    ..job("soon")
                })
                .collect(),
        )
        .await
        .unwrap()
        .iter()
        .map(|e| e.id)
        .collect();
    let mut latest = 0;
    for id in &soon {
        latest = latest.max(b.job(*id).await.unwrap().unwrap().run_at.unwrap());
    }
    sleep_past(latest).await;
    assert_eq!(b.promote_due(q, 2).await.unwrap(), 2);
    assert_eq!(b.promote_due(q, 100).await.unwrap(), 1);
    assert_eq!(b.promote_due(q, 100).await.unwrap(), 0);
    for id in &soon {
        let e = events.next_for(*id, 2).await;
        assert_eq!(types(&e), [EventType::Scheduled, EventType::Queued]);
        assert_eq!(e[1].state, JobState::Queued);
        let info = b.job(*id).await.unwrap().unwrap();
        assert_eq!(info.state, JobState::Queued);
    }
    let leased = b.claim(q, "w", 10, PATIENCE).await.unwrap();
    let got: HashSet<JobId> = leased.iter().map(|l| l.job.id).collect();
    assert_eq!(got, soon.iter().copied().collect());
    assert_eq!(state(b, far.id).await, JobState::Scheduled);
}

pub async fn blocked_claim_wakes_on_enqueue<E: Engine>() {
    let c = setup::<E>("wake").await;
    let (b, q) = (c.b.clone(), c.q.clone());
    // The claim may wait a minute; it must return with the job as soon as one arrives, long before that.
    let waiter = {
        let (b, q) = (b.clone(), q.clone());
        tokio::spawn(async move { b.claim(&q, "w", 5, Duration::from_secs(60)).await })
    };
    sleep(Duration::from_millis(200)).await;
    let id = b.enqueue(&q, job("wake")).await.unwrap().id;
    let got = timeout(PATIENCE, waiter)
        .await
        .expect("the blocked claim woke on enqueue")
        .unwrap()
        .unwrap();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].job.id, id);

    // A claim with nothing to take returns empty once its wait is over.
    let got = b
        .claim(&q, "w", 5, Duration::from_millis(150))
        .await
        .unwrap();
    assert!(got.is_empty());
}

/// Each retry's delay is drawn from [0, cap(attempt)] and the retry is queued once due; the last attempt's
/// failure is final.
pub async fn backoff_delay_within_jitter_bounds<E: Engine>() {
    let c = setup::<E>("backoff").await;
    let (b, q) = (&c.b, &c.q);
    let mut events = Feed::subscribe(b).await;
    let backoff = Backoff {
        base_ms: 100,
        max_ms: 250,
    };
    let id = b
        .enqueue(
            q,
            NewJob {
                max_attempts: Some(3),
                backoff: Some(backoff),
                ..job("flaky")
            },
        )
        .await
        .unwrap()
        .id;
    for attempt in 1..=2u32 {
        let leased = claim_one(b, q, "w").await;
        assert_eq!(leased.job.attempt, attempt);
        assert_eq!(leased.lease.backoff, backoff);
        let before = now_ms();
        let out = fail(b, &leased.lease, "boom", Retry::Backoff)
            .await
            .unwrap();
        let after = now_ms();
        let FailOutcome::Retrying { run_at } = out else {
            panic!("attempt {attempt} of 3 should retry, got {out:?}");
        };
        let cap = backoff.cap(attempt);
        assert!(
            run_at >= before && run_at <= after + cap,
            "attempt {attempt}: run_at {run_at} outside [{before}, {after} + {cap}]"
        );
        let info = b.job(id).await.unwrap().unwrap();
        assert_eq!(info.state, JobState::Retrying);
        assert_eq!(info.run_at, Some(run_at));
        assert_eq!(info.error.as_deref(), Some("boom"));
        let evs = events.next_for(id, if attempt == 1 { 3 } else { 2 }).await;
        let retrying = evs.last().unwrap();
        assert_eq!(retrying.ty, EventType::Retrying);
        assert_eq!(retrying.state, JobState::Retrying);
        assert_eq!(retrying.attempt, attempt);
        assert_eq!(
            retrying.data,
            Some(json!({ "error": "boom", "run_at": run_at }))
        );

        sleep_past(run_at).await;
        assert_eq!(b.promote_due(q, 10).await.unwrap(), 1);
        let e = events.next_for(id, 1).await;
        assert_eq!(e[0].ty, EventType::Queued);
    }
    let leased = claim_one(b, q, "w").await;
    assert_eq!(leased.job.attempt, 3);
    assert_eq!(
        fail(b, &leased.lease, "boom", Retry::Backoff).await,
        Ok(FailOutcome::Dead)
    );
    assert_eq!(state(b, id).await, JobState::Dead);

    // Full jitter: delays of jobs failing together spread over the range instead of one fixed value.
    let many = b
        .enqueue_batch(
            q,
            (0..20)
                .map(|_| NewJob {
                    backoff: Some(Backoff {
                        base_ms: 10_000,
                        max_ms: 10_000,
                    }),
                    ..job("many")
                })
                .collect(),
        )
        .await
        .unwrap();
    let leased = b.claim(q, "w", 20, PATIENCE).await.unwrap();
    assert_eq!(leased.len(), many.len());
    let mut delays = HashSet::new();
    for l in &leased {
        let before = now_ms();
        let Ok(FailOutcome::Retrying { run_at }) = fail(b, &l.lease, "x", Retry::Backoff).await
        else {
            panic!("should retry");
        };
        assert!(run_at >= before && run_at <= now_ms() + 10_000);
        delays.insert((run_at - before) / 100);
    }
    assert!(delays.len() > 1, "jittered delays: {delays:?}");
}

pub async fn retry_after_is_honoured<E: Engine>() {
    let c = setup::<E>("retry_after").await;
    let (b, q) = (&c.b, &c.q);
    let id = b.enqueue(q, job("webhook")).await.unwrap().id;
    let leased = claim_one(b, q, "w").await;
    let before = now_ms();
    let out = fail(b, &leased.lease, "503", Retry::After(600_000))
        .await
        .unwrap();
    let after = now_ms();
    let FailOutcome::Retrying { run_at } = out else {
        panic!("expected a retry, got {out:?}");
    };
    assert!(run_at >= before + 600_000 && run_at <= after + 600_000);
    let info = b.job(id).await.unwrap().unwrap();
    assert_eq!(info.state, JobState::Retrying);
    assert_eq!(info.run_at, Some(run_at));
    assert_eq!(b.promote_due(q, 10).await.unwrap(), 0);
    claim_none(b, q).await;
    assert_eq!(b.stats(q).await.unwrap().scheduled, 1);

    // A short Retry-After comes due and runs again as attempt 2.
    let id = b.enqueue(q, job("webhook")).await.unwrap().id;
    let leased = claim_one(b, q, "w").await;
    assert_eq!(leased.job.id, id);
    let Ok(FailOutcome::Retrying { run_at }) =
        fail(b, &leased.lease, "429", Retry::After(150)).await
    else {
        panic!("expected a retry");
    };
    sleep_past(run_at).await;
    assert_eq!(b.promote_due(q, 10).await.unwrap(), 1);
    let again = claim_one(b, q, "w").await;
    assert_eq!((again.job.id, again.job.attempt), (id, 2));
}

pub async fn max_attempts_exhausted_goes_dead<E: Engine>() {
    let c = setup::<E>("max_attempts").await;
    let (b, q) = (&c.b, &c.q);
    let mut events = Feed::subscribe(b).await;
    let id = b
        .enqueue(
            q,
            NewJob {
                max_attempts: Some(2),
                // No delay between attempts, so the retry is due at once.
                backoff: Some(Backoff {
                    base_ms: 0,
                    max_ms: 0,
                }),
                ..job("flaky")
            },
        )
        .await
        .unwrap()
        .id;
    let first = claim_one(b, q, "w").await;
    assert!(matches!(
        fail(b, &first.lease, "e1", Retry::Backoff).await,
        Ok(FailOutcome::Retrying { .. })
    ));
    assert_eq!(b.promote_due(q, 10).await.unwrap(), 1);
    let second = claim_one(b, q, "w").await;
    assert_eq!(second.job.attempt, 2);
    assert_eq!(
        fail(b, &second.lease, "e2", Retry::Backoff).await,
        Ok(FailOutcome::Dead)
    );
    let evs = events.next_for(id, 6).await;
    assert_eq!(
        types(&evs),
        [
            EventType::Queued,
            EventType::Active,
            EventType::Retrying,
            EventType::Queued,
            EventType::Active,
            EventType::Dead
        ]
    );
    assert_eq!(evs[4].attempt, 2);
    assert_eq!(evs[5].state, JobState::Dead);
    assert_eq!(evs[5].data, Some(json!({ "error": "e2" })));
    let info = b.job(id).await.unwrap().unwrap();
    assert_eq!(info.state, JobState::Dead);
    assert_eq!(info.attempts, 2);
    assert_eq!(info.error.as_deref(), Some("e2"));
    // A dead job is not promoted or claimed again.
    assert_eq!(b.promote_due(q, 10).await.unwrap(), 0);
    claim_none(b, q).await;
}

pub async fn permanent_error_goes_dead<E: Engine>() {
    let c = setup::<E>("permanent").await;
    let (b, q) = (&c.b, &c.q);
    let mut events = Feed::subscribe(b).await;
    let id = b
        .enqueue(
            q,
            NewJob {
                max_attempts: Some(10),
                ..job("bad")
            },
        )
        .await
        .unwrap()
        .id;
    let leased = claim_one(b, q, "w").await;
    assert_eq!(
        fail(b, &leased.lease, "invalid address", Retry::Never).await,
        Ok(FailOutcome::Dead)
    );
    let evs = events.next_for(id, 3).await;
    assert_eq!(
        types(&evs),
        [EventType::Queued, EventType::Active, EventType::Dead]
    );
    assert_eq!(evs[2].data, Some(json!({ "error": "invalid address" })));
    let info = b.job(id).await.unwrap().unwrap();
    assert_eq!((info.state, info.attempts), (JobState::Dead, 1));
    assert_eq!(info.error.as_deref(), Some("invalid address"));
    let dead = b.dead_letters(q, 10).await.unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].id, id);
    // The attempt is over: its lease applies no more.
    assert_eq!(
        fail(b, &leased.lease, "again", Retry::Never).await,
        Err(Rejected)
    );
}

pub async fn idempotency_key_returns_first_job<E: Engine>() {
    let c = setup::<E>("idempotency").await;
    let (b, q) = (&c.b, &c.q);
    let mut events = Feed::subscribe(b).await;
    let keyed = |tenant: Option<&str>| NewJob {
        idempotency_key: Some("order-42".into()),
        tenant: tenant.map(str::to_owned),
        ..job("charge")
    };
    let first = b.enqueue(q, keyed(Some("acme"))).await.unwrap();
    assert!(!first.duplicate);
    events.next_for(first.id, 1).await;
    let again = b.enqueue(q, keyed(Some("acme"))).await.unwrap();
    assert_eq!(again.id, first.id);
    assert!(again.duplicate);
    // In a batch too, including twice within the same batch.
    let batch = b
        .enqueue_batch(q, vec![keyed(Some("acme")), keyed(Some("acme"))])
        .await
        .unwrap();
    assert!(batch.iter().all(|e| e.id == first.id && e.duplicate));
    assert_eq!(b.stats(q).await.unwrap().depth, 1, "nothing new stored");
    events.assert_quiet(b, q, first.id).await;

    // The same key in another tenant, or in no tenant, or in another queue, is another job.
    let other_tenant = b.enqueue(q, keyed(Some("globex"))).await.unwrap();
    assert!(!other_tenant.duplicate);
    assert_ne!(other_tenant.id, first.id);
    let no_tenant = b.enqueue(q, keyed(None)).await.unwrap();
    assert!(!no_tenant.duplicate);
    assert_ne!(no_tenant.id, first.id);
    assert_ne!(no_tenant.id, other_tenant.id);
    let other_queue = unique_queue("idempotency.other");
    let elsewhere = b.enqueue(&other_queue, keyed(Some("acme"))).await.unwrap();
    assert!(!elsewhere.duplicate);
    assert_ne!(elsewhere.id, first.id);

    // Still the first job after it finished (while the key is remembered).
    let leased = claim_one(b, q, "w").await;
    assert_eq!(leased.job.id, first.id);
    complete(b, &leased.lease, json!(1)).await.unwrap();
    let after = b.enqueue(q, keyed(Some("acme"))).await.unwrap();
    assert_eq!((after.id, after.duplicate), (first.id, true));
}

/// Two subjects of one tenant using the same key get a job each: neither learns nor takes the other's id,
/// whoever comes first.
pub async fn idempotency_key_is_scoped_to_the_subject<E: Engine>() {
    let c = setup::<E>("idempotency_subject").await;
    let (b, q) = (&c.b, &c.q);
    let keyed = |owner: Option<&str>| NewJob {
        idempotency_key: Some("order-42".into()),
        tenant: Some("acme".into()),
        owner: owner.map(str::to_owned),
        ..job("charge")
    };
    let alice = b.enqueue(q, keyed(Some("alice"))).await.unwrap();
    assert!(!alice.duplicate);
    let bob = b.enqueue(q, keyed(Some("bob"))).await.unwrap();
    assert!(!bob.duplicate, "bob's submit must not be alice's duplicate");
    assert_ne!(bob.id, alice.id);
    // In a batch as well, and each subject still finds their own job.
    let again = b
        .enqueue_batch(q, vec![keyed(Some("bob")), keyed(Some("bob"))])
        .await
        .unwrap();
    assert!(again.iter().all(|e| e.duplicate && e.id == bob.id));
    let again = b.enqueue(q, keyed(Some("alice"))).await.unwrap();
    assert_eq!((again.id, again.duplicate), (alice.id, true));
    // A job submitted without an owner (an operator's `ferry enqueue`) is nobody's duplicate either.
    let anonymous = b.enqueue(q, keyed(None)).await.unwrap();
    assert!(!anonymous.duplicate);
    assert!(anonymous.id != alice.id && anonymous.id != bob.id);
    // Both jobs exist, each with its own owner.
    for (id, owner) in [(alice.id, "alice"), (bob.id, "bob")] {
        let info = b.job(id).await.unwrap().expect("the job was stored");
        assert_eq!(info.spec.owner.as_deref(), Some(owner));
    }
    assert_eq!(b.stats(q).await.unwrap().depth, 3);
}

pub async fn idempotency_key_expires_after_ttl<E: Engine>() {
    let config = EngineConfig {
        idempotency_ttl: Duration::from_millis(300),
        ..cfg()
    };
    let c = setup_with::<E>("idempotency_ttl", config).await;
    let (b, q) = (&c.b, &c.q);
    let keyed = || NewJob {
        idempotency_key: Some("k".into()),
        ..job("once")
    };
    let first = b.enqueue(q, keyed()).await.unwrap();
    let patience = Patience::new("the idempotency key to expire");
    loop {
        b.maintain(q).await.unwrap();
        let e = b.enqueue(q, keyed()).await.unwrap();
        if !e.duplicate {
            assert_ne!(e.id, first.id);
            break;
        }
        assert_eq!(e.id, first.id);
        patience.tick().await;
    }
}

/// Cancelled queued jobs never count as waiting, however the cancels and claims interleave, and a drained
/// queue is at depth 0. (Redis 7.0's consumer-group lag stays too high after a cancelled entry is skipped.)
pub async fn depth_counts_only_jobs_left_after_cancels<E: Engine>() {
    let c = setup::<E>("depth_cancels").await;
    let (b, q) = (&c.b, &c.q);
    let depth = || async { b.stats(q).await.unwrap() };
    let ids: Vec<JobId> = b
        .enqueue_batch(q, (0..6).map(|_| job("d")).collect())
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.id)
        .collect();
    let first = claim_one(b, q, "w").await;
    assert_eq!(first.job.id, ids[0]);
    let mut leases = vec![first.lease];
    // Cancel the next queued job, then claim past it; twice.
    for (cancelled, next, waiting) in [(ids[1], ids[2], 3), (ids[3], ids[4], 1)] {
        assert_eq!(
            b.cancel(cancelled, None).await.unwrap(),
            CancelOutcome::Cancelled(JobState::Queued)
        );
        assert_eq!(depth().await.depth, waiting + 1);
        let l = claim_one(b, q, "w").await;
        assert_eq!(l.job.id, next);
        leases.push(l.lease);
        let s = depth().await;
        assert_eq!((s.depth, s.active), (waiting, leases.len() as u64), "{s:?}");
    }
    // The newest job cancelled too: nothing waits, though the stream's newest entry was never read.
    b.cancel(ids[5], None).await.unwrap();
    let s = depth().await;
    assert_eq!((s.depth, s.lag_ms), (0, 0), "{s:?}");
    for l in &leases {
        complete(b, l, json!(null)).await.unwrap();
    }
    b.maintain(q).await.unwrap();
    let s = depth().await;
    assert_eq!((s.depth, s.active, s.lag_ms), (0, 0, 0), "drained: {s:?}");
    // New work after the cancels is counted exactly.
    b.enqueue_batch(q, (0..2).map(|_| job("d")).collect())
        .await
        .unwrap();
    let l = claim_one(b, q, "w").await;
    assert_eq!(depth().await.depth, 1);
    complete(b, &l.lease, json!(null)).await.unwrap();
    claim_one(b, q, "w").await;
    assert_eq!(depth().await.depth, 0);
}

pub async fn cancel_queued_job<E: Engine>() {
    let c = setup::<E>("cancel_queued").await;
    let (b, q) = (&c.b, &c.q);
    let mut events = Feed::subscribe(b).await;
    let id = b.enqueue(q, job("c")).await.unwrap().id;
    assert_eq!(
        b.cancel(id, None).await.unwrap(),
        CancelOutcome::Cancelled(JobState::Queued)
    );
    let evs = events.next_for(id, 2).await;
    assert_eq!(types(&evs), [EventType::Queued, EventType::Cancelled]);
    assert_eq!(evs[1].state, JobState::Cancelled);
    assert_eq!(state(b, id).await, JobState::Cancelled);
    assert_eq!(b.stats(q).await.unwrap().depth, 0);
    claim_none(b, q).await;
    assert_eq!(
        b.cancel(id, None).await.unwrap(),
        CancelOutcome::AlreadyFinal(JobState::Cancelled)
    );
    assert_eq!(
        b.cancel(JobId::new(), None).await.unwrap(),
        CancelOutcome::NotFound
    );

    // A completed job cannot be cancelled.
    let done = b.enqueue(q, job("c")).await.unwrap().id;
    let leased = claim_one(b, q, "w").await;
    complete(b, &leased.lease, json!(null)).await.unwrap();
    assert_eq!(
        b.cancel(done, None).await.unwrap(),
        CancelOutcome::AlreadyFinal(JobState::Completed)
    );
}

pub async fn cancel_scheduled_and_retrying_jobs<E: Engine>() {
    let c = setup::<E>("cancel_scheduled").await;
    let (b, q) = (&c.b, &c.q);
    let scheduled = b
        .enqueue(
            q,
            NewJob {
                delay_ms: Some(200),
                ..job("c")
            },
        )
        .await
        .unwrap()
        .id;
    assert_eq!(
        b.cancel(scheduled, None).await.unwrap(),
        CancelOutcome::Cancelled(JobState::Scheduled)
    );
    assert_eq!(b.stats(q).await.unwrap().scheduled, 0);
    // Not promoted when its time comes.
    let run_at = now_ms() + 200;
    sleep_past(run_at).await;
    assert_eq!(b.promote_due(q, 10).await.unwrap(), 0);
    assert_eq!(state(b, scheduled).await, JobState::Cancelled);

    let retrying = b.enqueue(q, job("c")).await.unwrap().id;
    let leased = claim_one(b, q, "w").await;
    let Ok(FailOutcome::Retrying { run_at }) = fail(b, &leased.lease, "e", Retry::After(200)).await
    else {
        panic!("expected a retry");
    };
    assert_eq!(
        b.cancel(retrying, None).await.unwrap(),
        CancelOutcome::Cancelled(JobState::Retrying)
    );
    sleep_past(run_at).await;
    assert_eq!(b.promote_due(q, 10).await.unwrap(), 0);
    claim_none(b, q).await;
    assert_eq!(state(b, retrying).await, JobState::Cancelled);
    let s = b.stats(q).await.unwrap();
    assert_eq!((s.depth, s.scheduled, s.active), (0, 0, 0));
}

pub async fn cancel_active_job_revokes_lease<E: Engine>() {
    let c = setup::<E>("cancel_active").await;
    let (b, q) = (&c.b, &c.q);
    let mut events = Feed::subscribe(b).await;
    let id = b.enqueue(q, job("c")).await.unwrap().id;
    let leased = claim_one(b, q, "w").await;
    assert_eq!(
        b.cancel(id, None).await.unwrap(),
        CancelOutcome::Cancelled(JobState::Active)
    );
    let lease = std::slice::from_ref(&leased.lease);
    assert_eq!(b.heartbeat(lease).await.unwrap(), [false]);
    assert!(!b.progress(&leased.lease, json!(1)).await.unwrap());
    assert_eq!(
        complete(b, &leased.lease, json!("late")).await,
        Err(Rejected)
    );
    assert_eq!(
        fail(b, &leased.lease, "late", Retry::Backoff).await,
        Err(Rejected)
    );
    assert_eq!(b.release(lease).await.unwrap(), [false]);
    let info = b.job(id).await.unwrap().unwrap();
    assert_eq!(info.state, JobState::Cancelled);
    assert_eq!(info.result, None);
    let evs = events.next_for(id, 3).await;
    assert_eq!(
        types(&evs),
        [EventType::Queued, EventType::Active, EventType::Cancelled]
    );
    events.assert_quiet(b, q, id).await;
    assert_eq!(b.stats(q).await.unwrap().active, 0);
    // The reaper does not resurrect it either.
    sleep(Duration::from_millis(600)).await;
    assert_eq!(
        b.reclaim_expired(q, 10).await.unwrap(),
        Reclaimed::default()
    );
    assert_eq!(state(b, id).await, JobState::Cancelled);
}

pub async fn pause_and_resume<E: Engine>() {
    let c = setup::<E>("pause").await;
    let (b, q) = (c.b.clone(), c.q.clone());
    b.pause(&q).await.unwrap();
    assert!(b.stats(&q).await.unwrap().paused);
    let id = b.enqueue(&q, job("p")).await.unwrap().id;
    assert_eq!(
        b.stats(&q).await.unwrap().depth,
        1,
        "enqueue works while paused"
    );
    claim_none(&b, &q).await;

    // A claim blocked on the paused queue gets the job once the queue resumes.
    let waiter = {
        let (b, q) = (b.clone(), q.clone());
        tokio::spawn(async move { b.claim(&q, "w", 5, Duration::from_secs(60)).await })
    };
    sleep(Duration::from_millis(200)).await;
    b.resume(&q).await.unwrap();
    let got = timeout(PATIENCE, waiter)
        .await
        .expect("the blocked claim woke on resume")
        .unwrap()
        .unwrap();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].job.id, id);
    let s = b.stats(&q).await.unwrap();
    assert!(!s.paused);
    assert_eq!((s.depth, s.active), (0, 1));
}

pub async fn dead_letters_list_and_retry<E: Engine>() {
    let c = setup::<E>("dead_letters").await;
    let (b, q) = (&c.b, &c.q);
    let mut events = Feed::subscribe(b).await;
    let one_shot = || NewJob {
        max_attempts: Some(1),
        ..job("d")
    };
    let first = b.enqueue(q, one_shot()).await.unwrap().id;
    let leased = claim_one(b, q, "w").await;
    assert_eq!(
        fail(b, &leased.lease, "first", Retry::Backoff).await,
        Ok(FailOutcome::Dead)
    );
    let second = b.enqueue(q, one_shot()).await.unwrap().id;
    let leased = claim_one(b, q, "w").await;
    assert_eq!(
        fail(b, &leased.lease, "second", Retry::Never).await,
        Ok(FailOutcome::Dead)
    );

    let dead = b.dead_letters(q, 10).await.unwrap();
    let ids: Vec<JobId> = dead.iter().map(|j| j.id).collect();
    assert_eq!(ids, [second, first], "newest first");
    assert!(dead.iter().all(|j| j.state == JobState::Dead));
    assert_eq!(dead[0].error.as_deref(), Some("second"));
    assert_eq!(dead[1].error.as_deref(), Some("first"));
    assert_eq!(b.dead_letters(q, 1).await.unwrap().len(), 1);
    assert_eq!(b.stats(q).await.unwrap().dead, 2);

    assert_eq!(b.retry_dead(first).await.unwrap(), RetryOutcome::Requeued);
    let info = b.job(first).await.unwrap().unwrap();
    assert_eq!((info.state, info.attempts), (JobState::Queued, 0));
    let evs = events.next_for(first, 4).await;
    assert_eq!(
        types(&evs),
        [
            EventType::Queued,
            EventType::Active,
            EventType::Dead,
            EventType::Queued
        ]
    );
    let ids: Vec<JobId> = b
        .dead_letters(q, 10)
        .await
        .unwrap()
        .iter()
        .map(|j| j.id)
        .collect();
    assert_eq!(ids, [second]);
    assert_eq!(b.stats(q).await.unwrap().dead, 1);

    // A fresh attempt budget: it runs again as attempt 1 and can succeed.
    let again = claim_one(b, q, "w").await;
    assert_eq!((again.job.id, again.job.attempt), (first, 1));
    assert_eq!(
        b.retry_dead(first).await.unwrap(),
        RetryOutcome::NotDead(JobState::Active)
    );
    complete(b, &again.lease, json!("ok")).await.unwrap();
    assert_eq!(state(b, first).await, JobState::Completed);
    assert_eq!(
        b.retry_dead(first).await.unwrap(),
        RetryOutcome::NotDead(JobState::Completed)
    );
    // A job untouched since it was enqueued is not dead either.
    let fresh = b.enqueue(q, job("fresh")).await.unwrap().id;
    assert_eq!(
        b.retry_dead(fresh).await.unwrap(),
        RetryOutcome::NotDead(JobState::Queued)
    );
    assert_eq!(
        b.retry_dead(JobId::new()).await.unwrap(),
        RetryOutcome::NotFound
    );
}

pub async fn dead_letter_list_is_capped<E: Engine>() {
    let config = EngineConfig {
        dead_letter_max: 3,
        ..cfg()
    };
    let c = setup_with::<E>("dead_cap", config).await;
    let (b, q) = (&c.b, &c.q);
    let mut ids = Vec::new();
    for i in 0..5 {
        ids.push(b.enqueue(q, job("d")).await.unwrap().id);
        let leased = claim_one(b, q, "w").await;
        fail(b, &leased.lease, &format!("e{i}"), Retry::Never)
            .await
            .unwrap();
    }
    let kept: Vec<JobId> = b
        .dead_letters(q, 10)
        .await
        .unwrap()
        .iter()
        .map(|j| j.id)
        .collect();
    assert_eq!(kept, [ids[4], ids[3], ids[2]], "the newest three remain");
    assert_eq!(b.stats(q).await.unwrap().dead, 3);
}

/// The heart of fencing: a worker that lost its lease can no longer change the job.
pub async fn lease_expiry_reclaims_and_fences_stale_worker<E: Engine>() {
    let c = setup::<E>("lease_expiry").await;
    let (b, q) = (&c.b, &c.q);
    let mut events = Feed::subscribe(b).await;
    let id = b.enqueue(q, job("slow")).await.unwrap().id;
    let stale = claim_one(b, q, "worker-a").await;
    assert_eq!(stale.job.attempt, 1);

    let patience = Patience::new("the lease to expire and be reclaimed");
    loop {
        let r = b.reclaim_expired(q, 10).await.unwrap();
        if r.requeued == 1 {
            assert_eq!(r.dead, 0);
            break;
        }
        assert_eq!(r, Reclaimed::default());
        patience.tick().await;
    }
    let evs = events.next_for(id, 3).await;
    assert_eq!(
        types(&evs),
        [EventType::Queued, EventType::Active, EventType::Queued]
    );
    assert_eq!(evs[2].data, Some(json!({ "reclaimed": true })));
    assert_eq!(state(b, id).await, JobState::Queued);
    let stale_lease = std::slice::from_ref(&stale.lease);
    assert_eq!(b.heartbeat(stale_lease).await.unwrap(), [false]);

    let fresh = claim_one(b, q, "worker-b").await;
    assert_eq!((fresh.job.id, fresh.job.attempt), (id, 2));
    assert_ne!(fresh.lease.token, stale.lease.token);
    assert_eq!(b.heartbeat(stale_lease).await.unwrap(), [false]);
    assert!(!b.progress(&stale.lease, json!(1)).await.unwrap());
    assert_eq!(
        complete(b, &stale.lease, json!("stale")).await,
        Err(Rejected)
    );
    assert_eq!(
        fail(b, &stale.lease, "stale", Retry::Never).await,
        Err(Rejected)
    );
    assert_eq!(b.release(stale_lease).await.unwrap(), [false]);
    assert_eq!(state(b, id).await, JobState::Active);

    complete(b, &fresh.lease, json!("fresh")).await.unwrap();
    assert_eq!(
        complete(b, &stale.lease, json!("stale")).await,
        Err(Rejected)
    );
    let info = b.job(id).await.unwrap().unwrap();
    assert_eq!(info.state, JobState::Completed);
    assert_eq!(info.result, Some(json!("fresh")));
    assert_eq!(info.attempts, 2);
    let evs = events.next_for(id, 2).await;
    assert_eq!(types(&evs), [EventType::Active, EventType::Completed]);
    assert_eq!(evs[1].data, Some(json!("fresh")));
    // Exactly one completion.
    events.assert_quiet(b, q, id).await;
}

pub async fn lease_expiry_on_last_attempt_goes_dead<E: Engine>() {
    let c = setup::<E>("lease_expiry_dead").await;
    let (b, q) = (&c.b, &c.q);
    let id = b
        .enqueue(
            q,
            NewJob {
                max_attempts: Some(1),
                ..job("poison")
            },
        )
        .await
        .unwrap()
        .id;
    let stale = claim_one(b, q, "w").await;
    let patience = Patience::new("the lease to expire");
    loop {
        let r = b.reclaim_expired(q, 10).await.unwrap();
        if r.dead == 1 {
            assert_eq!(r.requeued, 0);
            break;
        }
        patience.tick().await;
    }
    let info = b.job(id).await.unwrap().unwrap();
    assert_eq!(info.state, JobState::Dead);
    let error = info.error.unwrap_or_default();
    assert!(error.contains("lease expired"), "{error}");
    assert_eq!(b.dead_letters(q, 10).await.unwrap()[0].id, id);
    assert_eq!(complete(b, &stale.lease, json!(1)).await, Err(Rejected));
    claim_none(b, q).await;
}

pub async fn heartbeat_keeps_long_job_leased<E: Engine>() {
    // A longer timeout than the other cases, so a busy machine delaying one heartbeat does not fail the case.
    let config = EngineConfig {
        visibility_timeout: Duration::from_millis(1_000),
        ..cfg()
    };
    let c = setup_with::<E>("heartbeat", config).await;
    let (b, q) = (&c.b, &c.q);
    let id = b.enqueue(q, job("long")).await.unwrap().id;
    let leased = claim_one(b, q, "w").await;
    let lease = std::slice::from_ref(&leased.lease);
    // Run for 2.5 visibility timeouts, heartbeating every 100 ms.
    let until = Instant::now() + Duration::from_millis(2_500);
    while Instant::now() < until {
        sleep(Duration::from_millis(100)).await;
        assert_eq!(b.heartbeat(lease).await.unwrap(), [true]);
        assert_eq!(
            b.reclaim_expired(q, 10).await.unwrap(),
            Reclaimed::default()
        );
    }
    assert_eq!(state(b, id).await, JobState::Active);
    complete(b, &leased.lease, json!("done")).await.unwrap();
    let info = b.job(id).await.unwrap().unwrap();
    assert_eq!((info.state, info.attempts), (JobState::Completed, 1));
}

pub async fn release_returns_job_without_counting_attempt<E: Engine>() {
    let c = setup::<E>("release").await;
    let (b, q) = (&c.b, &c.q);
    let mut events = Feed::subscribe(b).await;
    let id = b.enqueue(q, job("r")).await.unwrap().id;
    let first = claim_one(b, q, "w").await;
    let lease = std::slice::from_ref(&first.lease);
    assert_eq!(b.release(lease).await.unwrap(), [true]);
    let info = b.job(id).await.unwrap().unwrap();
    assert_eq!((info.state, info.attempts), (JobState::Queued, 0));
    let evs = events.next_for(id, 3).await;
    assert_eq!(
        types(&evs),
        [EventType::Queued, EventType::Active, EventType::Queued]
    );
    assert_eq!(evs[2].data, Some(json!({ "released": true })));
    assert_eq!(evs[2].state, JobState::Queued);
    let s = b.stats(q).await.unwrap();
    assert_eq!((s.depth, s.active), (1, 0));

    // Released once, over: the old lease no longer applies; the next claim is attempt 1 again.
    assert_eq!(b.release(lease).await.unwrap(), [false]);
    let again = claim_one(b, q, "w2").await;
    assert_eq!((again.job.id, again.job.attempt), (id, 1));
    assert_eq!(complete(b, &first.lease, json!(1)).await, Err(Rejected));
    complete(b, &again.lease, json!(2)).await.unwrap();
    assert_eq!(state(b, id).await, JobState::Completed);
}

pub async fn stats_and_queues<E: Engine>() {
    let c = setup::<E>("stats").await;
    let (b, q) = (&c.b, &c.q);
    let empty = b.stats(q).await.unwrap();
    assert_eq!(empty.queue, *q);
    assert_eq!(
        (
            empty.depth,
            empty.active,
            empty.scheduled,
            empty.dead,
            empty.lag_ms,
            empty.paused
        ),
        (0, 0, 0, 0, 0, false)
    );

    b.enqueue_batch(q, (0..5).map(|_| job("s")).collect())
        .await
        .unwrap();
    b.enqueue(
        q,
        NewJob {
            delay_ms: Some(600_000),
            ..job("s")
        },
    )
    .await
    .unwrap();
    let leased = b.claim(q, "w", 2, PATIENCE).await.unwrap();
    assert_eq!(leased.len(), 2);
    fail(b, &leased[1].lease, "x", Retry::Never).await.unwrap();
    // A retrying job counts as scheduled.
    let r = b
        .enqueue(q, with_priority("s", Priority::High))
        .await
        .unwrap()
        .id;
    let retry = claim_one(b, q, "w").await;
    assert_eq!(retry.job.id, r);
    fail(b, &retry.lease, "later", Retry::After(600_000))
        .await
        .unwrap();

    sleep(Duration::from_millis(50)).await;
    let s = b.stats(q).await.unwrap();
    assert_eq!(s.depth, 3, "{s:?}");
    assert_eq!(s.active, 1, "{s:?}");
    assert_eq!(s.scheduled, 2, "{s:?}");
    assert_eq!(s.dead, 1, "{s:?}");
    assert!(s.lag_ms >= 50 && s.lag_ms < 600_000, "{s:?}");
    assert!(!s.paused);
    assert_eq!(s.delivered, 3, "claims so far: {s:?}");
    // Work coming due: both scheduled jobs are 10 minutes away; one due in 200 ms counts within a second.
    let soon = Duration::from_secs(1);
    assert_eq!(b.scheduled_due(q, soon).await.unwrap(), 0);
    assert_eq!(
        b.scheduled_due(q, Duration::from_secs(700)).await.unwrap(),
        2
    );
    b.enqueue(
        q,
        NewJob {
            delay_ms: Some(200),
            ..job("s")
        },
    )
    .await
    .unwrap();
    assert_eq!(b.scheduled_due(q, soon).await.unwrap(), 1);

    // `queues()` lists queues that received a job, sorted; a queue only claimed from or paused is not one.
    let second = unique_queue("stats.second");
    b.enqueue(&second, job("s")).await.unwrap();
    let idle = unique_queue("stats.idle");
    claim_none(b, &idle).await;
    b.pause(&idle).await.unwrap();
    let all = b.queues().await.unwrap();
    assert!(all.windows(2).all(|w| w[0] < w[1]), "sorted: {all:?}");
    assert!(all.contains(q) && all.contains(&second), "{all:?}");
    assert!(!all.contains(&idle), "{all:?}");
}

pub async fn leases_by_consumer_counts_held_jobs<E: Engine>() {
    let c = setup::<E>("leases.by.consumer").await;
    let (b, q) = (&c.b, &c.q);
    let held = |pairs: &[(&str, u64)]| -> BTreeMap<String, u64> {
        pairs.iter().map(|(c, n)| ((*c).to_owned(), *n)).collect()
    };
    // A queue nothing was ever sent to holds no leases (and is not an error).
    assert_eq!(b.leases_by_consumer(q).await.unwrap(), held(&[]));
    // Leases on every priority count, summed per consumer.
    for p in [
        Priority::High,
        Priority::Normal,
        Priority::Low,
        Priority::Normal,
    ] {
        b.enqueue(q, with_priority("l", p)).await.unwrap();
    }
    let a = b.claim(q, "a", 3, PATIENCE).await.unwrap();
    assert_eq!(a.len(), 3, "{a:?}");
    let other = claim_one(b, q, "b").await;
    assert_eq!(
        b.leases_by_consumer(q).await.unwrap(),
        held(&[("a", 3), ("b", 1)])
    );
    // Finishing or releasing a job frees its lease; a consumer holding nothing is absent.
    complete(b, &a[0].lease, json!(1)).await.unwrap();
    fail(b, &a[1].lease, "x", Retry::Backoff).await.unwrap();
    assert_eq!(b.release(&[other.lease]).await.unwrap(), vec![true]);
    assert_eq!(b.leases_by_consumer(q).await.unwrap(), held(&[("a", 1)]));
    // The released job taken again counts for its new holder.
    let again = claim_one(b, q, "c").await;
    assert_eq!(
        b.leases_by_consumer(q).await.unwrap(),
        held(&[("a", 1), ("c", 1)])
    );
    complete(b, &again.lease, json!(1)).await.unwrap();
    complete(b, &a[2].lease, json!(1)).await.unwrap();
    assert_eq!(b.leases_by_consumer(q).await.unwrap(), held(&[]));
}

pub async fn finished_jobs_expire_after_retention<E: Engine>() {
    let config = EngineConfig {
        finished_retention: Duration::from_millis(300),
        ..cfg()
    };
    let c = setup_with::<E>("retention", config).await;
    let (b, q) = (&c.b, &c.q);
    let done = b.enqueue(q, job("done")).await.unwrap().id;
    let cancelled = b.enqueue(q, job("cancelled")).await.unwrap().id;
    let leased = claim_one(b, q, "w").await;
    assert_eq!(leased.job.id, done);
    complete(b, &leased.lease, json!(1)).await.unwrap();
    b.cancel(cancelled, None).await.unwrap();
    let waiting = b.enqueue(q, job("waiting")).await.unwrap().id;

    let patience = Patience::new("finished jobs to expire");
    loop {
        b.maintain(q).await.unwrap();
        if b.job(done).await.unwrap().is_none() && b.job(cancelled).await.unwrap().is_none() {
            break;
        }
        patience.tick().await;
    }
    // Retention is for finished jobs only.
    assert_eq!(state(b, waiting).await, JobState::Queued);
    assert_eq!(claim_one(b, q, "w").await.job.id, waiting);
}

/// Read every shard of the log as the recorder group until nothing new comes: the positions read, unacked.
async fn read_as_recorder(b: &Arc<dyn Broker>) -> Vec<ferry_broker::LogPosition> {
    let mut positions = Vec::new();
    loop {
        let before = positions.len();
        for shard in 0..b.log_shards() {
            let got = b
                .read_log(
                    shard,
                    ferry_broker::RECORDER_GROUP,
                    "recorder",
                    1000,
                    Duration::from_millis(50),
                    None,
                )
                .await
                .unwrap();
            positions.extend(got.into_iter().map(|e| e.position));
        }
        if positions.len() == before {
            return positions;
        }
    }
}

pub async fn recorded_finished_jobs_leave_once_acknowledged<E: Engine>() {
    let config = EngineConfig {
        drop_recorded: true,
        ..cfg()
    };
    let c = setup_with::<E>("drop-recorded", config).await;
    let (b, q) = (&c.b, &c.q);
    // The recorder's group exists before anything is written, as it does once a recorder ran.
    read_as_recorder(b).await;
    let done = b.enqueue(q, job("done")).await.unwrap().id;
    let cancelled = b.enqueue(q, job("cancelled")).await.unwrap().id;
    let dead = b.enqueue(q, job("dead")).await.unwrap().id;
    let leased = claim_one(b, q, "w").await;
    assert_eq!(leased.job.id, done);
    complete(b, &leased.lease, json!({"answer": 42}))
        .await
        .unwrap();
    b.cancel(cancelled, None).await.unwrap();
    let leased = claim_one(b, q, "w").await;
    assert_eq!(leased.job.id, dead);
    fail(b, &leased.lease, "no", Retry::Never).await.unwrap();
    let waiting = b.enqueue(q, job("waiting")).await.unwrap().id;

    // Read but not acknowledged: not recorded yet, so everything stays.
    let read = read_as_recorder(b).await;
    assert!(!read.is_empty());
    b.maintain(q).await.unwrap();
    assert_eq!(state(b, done).await, JobState::Completed);
    assert_eq!(
        b.job(done).await.unwrap().unwrap().result,
        Some(json!({"answer": 42}))
    );
    assert_eq!(state(b, cancelled).await, JobState::Cancelled);

    // Acknowledged: the completed and the cancelled job leave; the dead one stays (it can be retried), and so
    // does the one still queued.
    b.ack_log(ferry_broker::RECORDER_GROUP, &read)
        .await
        .unwrap();
    b.maintain(q).await.unwrap();
    assert!(b.job(done).await.unwrap().is_none(), "completed job kept");
    assert!(
        b.job(cancelled).await.unwrap().is_none(),
        "cancelled job kept"
    );
    assert_eq!(state(b, dead).await, JobState::Dead);
    assert_eq!(state(b, waiting).await, JobState::Queued);
    assert_eq!(b.stats(q).await.unwrap().depth, 1);

    // A job finished after the last acknowledgement waits for its own.
    let more: Vec<JobId> = b
        .enqueue_batch(q, (0..3).map(|_| job("more")).collect())
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.id)
        .collect();
    let leased = claim_one(b, q, "w").await;
    assert_eq!(leased.job.id, waiting);
    complete(b, &leased.lease, json!(1)).await.unwrap();
    b.maintain(q).await.unwrap();
    assert_eq!(state(b, waiting).await, JobState::Completed);
    // The queue's depth stays exact after its streams lost acknowledged entries.
    assert_eq!(b.stats(q).await.unwrap().depth, 3);
    let read = read_as_recorder(b).await;
    b.ack_log(ferry_broker::RECORDER_GROUP, &read)
        .await
        .unwrap();
    b.maintain(q).await.unwrap();
    assert!(b.job(waiting).await.unwrap().is_none());
    assert_eq!(b.stats(q).await.unwrap().depth, 3);
    for id in more {
        assert_eq!(claim_one(b, q, "w").await.job.id, id);
    }
    assert_eq!(b.stats(q).await.unwrap().depth, 0);
}

pub async fn concurrent_claimers_never_share_a_job<E: Engine>() {
    const JOBS: usize = 500;
    let c = setup::<E>("concurrent").await;
    let (b, q) = (c.b.clone(), c.q.clone());
    let mut ids = HashSet::new();
    for _ in 0..JOBS / 100 {
        let batch = b
            .enqueue_batch(&q, (0..100).map(|_| job("c")).collect())
            .await
            .unwrap();
        ids.extend(batch.iter().map(|e| e.id));
    }
    assert_eq!(ids.len(), JOBS);

    let done = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for w in 0..4 {
        let (b, q, done) = (b.clone(), q.clone(), done.clone());
        tasks.push(tokio::spawn(async move {
            let consumer = format!("worker-{w}");
            let mut mine = Vec::new();
            let until = Instant::now() + Duration::from_secs(30);
            while done.load(Ordering::SeqCst) < JOBS && Instant::now() < until {
                let leased = b
                    .claim(&q, &consumer, 10, Duration::from_millis(50))
                    .await
                    .unwrap();
                let items = leased
                    .iter()
                    .map(|l| Completion {
                        lease: l.lease.clone(),
                        result: json!(null),
                    })
                    .collect();
                let results = b.complete(items).await.unwrap();
                assert!(results.iter().all(Result::is_ok), "own leases complete");
                done.fetch_add(leased.len(), Ordering::SeqCst);
                mine.extend(leased.iter().map(|l| l.job.id));
            }
            mine
        }));
    }
    let mut seen = Vec::new();
    for t in tasks {
        seen.extend(t.await.unwrap());
    }
    assert_eq!(seen.len(), JOBS, "every job claimed exactly once in total");
    let unique: HashSet<JobId> = seen.iter().copied().collect();
    assert_eq!(unique, ids, "no job claimed twice, none missed");
    let s = b.stats(&q).await.unwrap();
    assert_eq!((s.depth, s.active), (0, 0));
}

pub async fn slow_subscriber_never_blocks_engine<E: Engine>() {
    let c = setup::<E>("slow_subscriber").await;
    let (b, q) = (&c.b, &c.q);
    // Subscribed, never read while the engine works.
    let mut lagging = b.subscribe().await.unwrap();
    let work = async {
        for _ in 0..12 {
            b.enqueue_batch(q, (0..500).map(|_| job("flood")).collect())
                .await
                .unwrap();
        }
        let leased = b.claim(q, "w", 100, PATIENCE).await.unwrap();
        let items = leased
            .iter()
            .map(|l| Completion {
                lease: l.lease.clone(),
                result: json!(null),
            })
            .collect();
        b.complete(items).await.unwrap();
    };
    timeout(Duration::from_secs(60), work)
        .await
        .expect("the engine kept working with a subscriber that never reads");
    assert_eq!(b.stats(q).await.unwrap().depth, 5_900);
    // The lagging subscriber resumes with later events instead of failing.
    let e = timeout(PATIENCE, lagging.next())
        .await
        .expect("an event")
        .expect("stream open");
    assert_eq!(e.queue, *q);
}

// ---------------------------------------------------------------------------------------------------------------
// Job feed

/// A job feed watching a subject's partition gets that subject's job events (for owner subscribers), and one
/// watching a queue that queue's (for queue subscribers); an engine may deliver more (the memory engine
/// delivers everything, as [`ferry_broker::Via::All`]).
pub async fn job_feed_delivers_what_it_watches<E: Engine>() {
    use ferry_broker::{Topic, Via, placement::partition_of};
    let c = setup::<E>("job_feed").await;
    let (b, q) = (&c.b, &c.q);
    let (owners, mut owners_feed) = b.job_feed().await.unwrap().into_parts();
    owners
        .watch(&Topic::Partition(partition_of(Some("acme"), "alice")))
        .await
        .unwrap();
    let (queues, mut queues_feed) = b.job_feed().await.unwrap().into_parts();
    queues.watch(&Topic::Queue(q.clone())).await.unwrap();
    let mut j = job("watched");
    j.owner = Some("alice".into());
    j.tenant = Some("acme".into());
    let id = b.enqueue(q, j).await.unwrap().id;
    for (feed, via) in [
        (&mut owners_feed, Via::Owner),
        (&mut queues_feed, Via::Queue),
    ] {
        let e = loop {
            let e = timeout(PATIENCE, feed.next())
                .await
                .expect("the event in time")
                .expect("feed open");
            if e.event.job == id {
                break e;
            }
        };
        assert!(e.via == via || e.via == Via::All, "{e:?}");
        assert_eq!(e.event.ty, EventType::Queued);
        assert_eq!(
            (e.event.owner.as_deref(), e.event.tenant.as_deref()),
            (Some("alice"), Some("acme"))
        );
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Application channels

/// The next message of `feed`, or `None` after `wait`.
async fn next_message(
    feed: &mut ferry_broker::ChannelFeed,
    wait: Duration,
) -> Option<ferry_broker::ChannelMessage> {
    timeout(wait, feed.next()).await.ok().flatten()
}

pub async fn channel_publish_reaches_subscriber<E: Engine>() {
    let c = setup::<E>("channel_publish").await;
    let b = &c.b;
    // Two feeds stand for two nodes: each gets the message once, whatever the number of its subscribe calls.
    let mut a = b.channels().await.unwrap();
    let mut other = b.channels().await.unwrap();
    a.control().subscribe("room-1").await.unwrap();
    a.control().subscribe("room-1").await.unwrap();
    other.control().subscribe("room-1").await.unwrap();
    b.publish("room-1", r#"{"hello":1}"#.into()).await.unwrap();
    for feed in [&mut a, &mut other] {
        let m = next_message(feed, PATIENCE)
            .await
            .expect("message delivered");
        assert_eq!(
            (m.channel.as_str(), m.payload.as_str()),
            ("room-1", r#"{"hello":1}"#)
        );
    }
    assert_eq!(
        next_message(&mut a, Duration::from_millis(200)).await,
        None,
        "delivered once"
    );
}

pub async fn channel_unsubscribed_is_not_delivered<E: Engine>() {
    let c = setup::<E>("channel_unsubscribed").await;
    let b = &c.b;
    let mut feed = b.channels().await.unwrap();
    let control = feed.control();
    control.subscribe("keep").await.unwrap();
    control.subscribe("drop").await.unwrap();
    control.unsubscribe("drop");
    // Published after the unsubscribe and before a channel still wanted, so once "keep" arrives, "drop" (had
    // it been delivered) would have come first.
    b.publish("drop", "1".into()).await.unwrap();
    b.publish("never-subscribed", "2".into()).await.unwrap();
    b.publish("keep", "3".into()).await.unwrap();
    let m = next_message(&mut feed, PATIENCE)
        .await
        .expect("kept channel delivered");
    assert_eq!((m.channel.as_str(), m.payload.as_str()), ("keep", "3"));
    assert_eq!(
        next_message(&mut feed, Duration::from_millis(200)).await,
        None
    );
}

// ---------------------------------------------------------------------------------------------------------------
// The durable event log (what the recorder reads)

const GROUP: &str = "contract-recorder";

/// Read every shard of the log as `consumer` until `want` events came (or PATIENCE passes); entries unacked.
async fn read_events(
    b: &Arc<dyn Broker>,
    consumer: &str,
    want: usize,
    reclaim: Option<Duration>,
) -> (Vec<ferry_broker::LogPosition>, Vec<Event>) {
    let deadline = Instant::now() + PATIENCE;
    let (mut positions, mut events) = (Vec::new(), Vec::new());
    // At least one pass: the first read creates the group.
    loop {
        for shard in 0..b.log_shards() {
            let got = b
                .read_log(
                    shard,
                    GROUP,
                    consumer,
                    100,
                    Duration::from_millis(100),
                    reclaim,
                )
                .await
                .unwrap();
            for e in got {
                positions.push(e.position);
                events.extend(e.events);
            }
        }
        if events.len() >= want || Instant::now() >= deadline {
            break;
        }
    }
    (positions, events)
}

pub async fn log_holds_every_event_with_spec_and_actor<E: Engine>() {
    let c = setup::<E>("log").await;
    let (b, q) = (&c.b, &c.q);
    // The group exists before anything is written (as the recorder's does), so it sees everything after.
    assert!(read_events(b, "rec-1", 0, None).await.1.is_empty());
    assert_eq!(b.log_backlog(GROUP).await.unwrap(), 0);
    let mut new = job("log.kind");
    new.payload = json!({ "n": 1 });
    new.owner = Some("alice".into());
    new.correlation_id = Some("req-42".into());
    let id = b.enqueue(q, new).await.unwrap().id;
    let leased = claim_one(b, q, "worker-7").await;
    complete(b, &leased.lease, json!({ "ok": true }))
        .await
        .unwrap();

    let (positions, events) = read_events(b, "rec-1", 3, None).await;
    let mine: Vec<&Event> = events.iter().filter(|e| e.job == id).collect();
    assert_eq!(
        mine.iter().map(|e| e.ty).collect::<Vec<_>>(),
        [EventType::Queued, EventType::Active, EventType::Completed]
    );
    let spec = mine[0]
        .spec
        .as_ref()
        .expect("job.queued carries the spec in the log");
    assert_eq!(spec.payload, json!({ "n": 1 }));
    assert_eq!(mine[0].actor.as_deref(), Some("alice"));
    assert_eq!(mine[1].actor.as_deref(), Some("worker-7"));
    assert_eq!(mine[2].actor.as_deref(), Some("worker-7"));
    assert!(mine[1].spec.is_none());
    for e in &mine {
        assert_eq!(e.correlation_id.as_deref(), Some("req-42"));
    }
    let keys: Vec<_> = mine.iter().map(|e| e.order_key().unwrap()).collect();
    assert!(
        keys.windows(2).all(|w| w[0] < w[1]),
        "order keys follow the log: {keys:?}"
    );
    assert_eq!(mine[2].data, Some(json!({ "ok": true })));

    assert!(
        b.log_backlog(GROUP).await.unwrap() >= 1,
        "read but unacknowledged is behind"
    );
    b.ack_log(GROUP, &positions).await.unwrap();
    assert_eq!(b.log_backlog(GROUP).await.unwrap(), 0);
    assert!(
        read_events(b, "rec-1", 0, Some(Duration::ZERO))
            .await
            .1
            .is_empty()
    );

    // A cancellation names who cancelled.
    let other = b.enqueue(q, job("log.kind")).await.unwrap().id;
    b.cancel(other, Some("bob")).await.unwrap();
    let (positions, events) = read_events(b, "rec-1", 2, None).await;
    let cancelled: Vec<&Event> = events
        .iter()
        .filter(|e| e.job == other && e.ty == EventType::Cancelled)
        .collect();
    assert_eq!(cancelled.len(), 1, "{events:?}");
    assert_eq!(cancelled[0].actor.as_deref(), Some("bob"));
    b.ack_log(GROUP, &positions).await.unwrap();
}

pub async fn log_unacknowledged_entries_are_taken_over<E: Engine>() {
    let c = setup::<E>("log-takeover").await;
    let (b, q) = (&c.b, &c.q);
    read_events(b, "dead-reader", 0, None).await;
    let ids: HashSet<JobId> = b
        .enqueue_batch(q, (0..5).map(|_| job("k")).collect())
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.id)
        .collect();
    // The first reader takes the entries and dies without acknowledging.
    let (_, first) = read_events(b, "dead-reader", 5, None).await;
    assert_eq!(first.iter().map(|e| e.job).collect::<HashSet<_>>(), ids);
    assert!(b.log_backlog(GROUP).await.unwrap() >= 1);
    // Not idle long enough: nothing to take over, nothing new.
    let none = b
        .read_log(
            0,
            GROUP,
            "survivor",
            100,
            Duration::ZERO,
            Some(Duration::from_secs(3600)),
        )
        .await
        .unwrap();
    assert!(none.is_empty());
    sleep(Duration::from_millis(50)).await;
    let (positions, again) = read_events(b, "survivor", 5, Some(Duration::from_millis(10))).await;
    assert_eq!(again.iter().map(|e| e.job).collect::<HashSet<_>>(), ids);
    assert_eq!(again.len(), first.len(), "each event once more, no more");
    b.ack_log(GROUP, &positions).await.unwrap();
    assert_eq!(b.log_backlog(GROUP).await.unwrap(), 0);
}

/// A job as the durable record would hold it after the engine lost it.
fn recorded(q: &QueueName, state: JobState, attempts: u32, priority: Priority) -> JobInfo {
    let mut n = with_priority("lost", priority);
    n.payload = json!({"n": attempts, "p": format!("{priority:?}")});
    n.max_attempts = Some(4);
    n.owner = Some("alice".into());
    n.tenant = Some("acme".into());
    let id = JobId::new();
    let now = now_ms();
    JobInfo {
        id,
        queue: q.clone(),
        state,
        attempts,
        spec: n.into_spec(now),
        result: None,
        error: None,
        run_at: None,
        updated_at: now,
    }
}

/// Jobs the engine has never heard of (as after a Redis data loss) come back as the record has them: same id,
/// spec, priority and attempts (an active job's attempt in flight given back), queued now, or still waiting when
/// their run_at is ahead; `job.queued` / `job.scheduled` / `job.retrying` with `restored: true` by `reconciler`.
/// A second restore of the same job is refused: it is known now.
pub async fn restore_puts_back_lost_jobs_as_recorded<E: Engine>() {
    let c = setup::<E>("restore").await;
    let mut feed = Feed::subscribe(&c.b).await;
    let low = recorded(&c.q, JobState::Queued, 1, Priority::Low);
    let high = recorded(&c.q, JobState::Active, 2, Priority::High);
    let mut later = recorded(&c.q, JobState::Scheduled, 0, Priority::Normal);
    later.run_at = Some(now_ms() + 3_600_000);
    let mut retry = recorded(&c.q, JobState::Retrying, 1, Priority::Normal);
    retry.run_at = Some(now_ms() + 3_600_000);
    retry.error = Some("smtp timeout".into());
    let mut due = recorded(&c.q, JobState::Retrying, 1, Priority::Normal);
    due.run_at = Some(now_ms() - 1);
    let all = vec![
        low.clone(),
        high.clone(),
        later.clone(),
        retry.clone(),
        due.clone(),
    ];
    assert_eq!(c.b.restore(all.clone()).await.unwrap(), [true; 5]);

    let e = feed.next_for(low.id, 1).await;
    assert_eq!(types(&e), [EventType::Queued]);
    assert_eq!(e[0].data, Some(json!({"restored": true})));
    assert_eq!(e[0].actor.as_deref(), Some(ferry_broker::RESTORE_ACTOR));
    assert_eq!(e[0].attempt, 1);
    assert_eq!(e[0].tenant.as_deref(), Some("acme"));
    let e = feed.next_for(later.id, 1).await;
    assert_eq!(types(&e), [EventType::Scheduled]);
    assert_eq!(e[0].data.as_ref().unwrap()["restored"], json!(true));
    let e = feed.next_for(retry.id, 1).await;
    assert_eq!(types(&e), [EventType::Retrying]);
    assert_eq!(e[0].data.as_ref().unwrap()["error"], json!("smtp timeout"));
    assert_eq!(state(&c.b, later.id).await, JobState::Scheduled);
    assert_eq!(state(&c.b, retry.id).await, JobState::Retrying);
    assert_eq!(state(&c.b, low.id).await, JobState::Queued);

    // Claimed by priority, with the recorded spec and the attempts the record had used.
    let first = claim_one(&c.b, &c.q, "w1").await;
    assert_eq!(first.job.id, high.id);
    assert_eq!(first.job.attempt, 2, "the attempt in flight is given back");
    assert_eq!(first.job.spec, high.spec);
    let second = claim_one(&c.b, &c.q, "w1").await;
    assert_eq!(second.job.id, due.id, "a retry already due is queued");
    assert_eq!(second.job.attempt, 2);
    let third = claim_one(&c.b, &c.q, "w1").await;
    assert_eq!(third.job.id, low.id);
    assert_eq!(third.job.attempt, 2);
    assert_eq!(third.job.spec, low.spec);
    claim_none(&c.b, &c.q).await;
    complete(&c.b, &third.lease, json!("done")).await.unwrap();
    assert_eq!(state(&c.b, low.id).await, JobState::Completed);

    assert_eq!(c.b.restore(all).await.unwrap(), [false; 5], "known now");
    claim_none(&c.b, &c.q).await;
}

/// Whatever state a job is in, a restore of it changes nothing and emits nothing: the engine knows it. (The
/// queued job has had no transition since its enqueue, so only its stream entry tells.)
pub async fn restore_leaves_every_job_the_engine_knows<E: Engine>() {
    let c = setup::<E>("restore_known").await;
    let b = &c.b;
    let queued = b
        .enqueue(&c.q, with_priority("queued", Priority::Low))
        .await
        .unwrap()
        .id;
    let mut delayed = job("delayed");
    delayed.delay_ms = Some(3_600_000);
    let scheduled = b.enqueue(&c.q, delayed).await.unwrap().id;
    let cancelled = b.enqueue(&c.q, job("cancelled")).await.unwrap().id;
    b.cancel(cancelled, None).await.unwrap();
    for kind in ["active", "completed", "retrying", "dead"] {
        b.enqueue(&c.q, with_priority(kind, Priority::High))
            .await
            .unwrap();
    }
    let leased = b.claim(&c.q, "w", 4, PATIENCE).await.unwrap();
    assert_eq!(leased.len(), 4);
    let by_kind = |k: &str| {
        leased
            .iter()
            .find(|l| l.job.spec.kind.as_str() == k)
            .unwrap()
            .lease
            .clone()
    };
    complete(b, &by_kind("completed"), json!(1)).await.unwrap();
    fail(b, &by_kind("retrying"), "again", Retry::After(3_600_000))
        .await
        .unwrap();
    fail(b, &by_kind("dead"), "no", Retry::Never).await.unwrap();
    let ids = [
        queued,
        scheduled,
        cancelled,
        by_kind("active").job,
        by_kind("completed").job,
        by_kind("retrying").job,
        by_kind("dead").job,
    ];
    let mut infos = Vec::new();
    for id in ids {
        infos.push(b.job(id).await.unwrap().expect("held"));
    }
    let before: Vec<JobState> = infos.iter().map(|i| i.state).collect();
    assert_eq!(
        before,
        [
            JobState::Queued,
            JobState::Scheduled,
            JobState::Cancelled,
            JobState::Active,
            JobState::Completed,
            JobState::Retrying,
            JobState::Dead
        ]
    );
    let mut feed = Feed::subscribe(b).await;
    assert_eq!(b.restore(infos).await.unwrap(), [false; 7]);
    for id in ids {
        feed.assert_quiet(b, &c.q, id).await;
    }
    let mut after = Vec::new();
    for id in ids {
        after.push(state(b, id).await);
    }
    assert_eq!(after, before);
    // The queued job is in line once, not twice (the quiet checks' markers are in line too).
    let rest = b
        .claim(&c.q, "w2", 100, Duration::from_millis(200))
        .await
        .unwrap();
    let ours = rest.iter().filter(|l| l.job.id == queued).count();
    assert_eq!(ours, 1);
}

/// One holder at a time; free again once the ttl has passed.
pub async fn lease_has_one_holder_until_it_expires<E: Engine>() {
    let c = setup::<E>("lease").await;
    let name = format!("reconcile.{}", c.q);
    let ttl = Duration::from_millis(300);
    assert!(c.b.try_lease(&name, "a", ttl).await.unwrap());
    assert!(!c.b.try_lease(&name, "b", ttl).await.unwrap());
    assert!(!c.b.try_lease(&name, "a", ttl).await.unwrap());
    let p = Patience::new("the lease to expire");
    while !c.b.try_lease(&name, "b", ttl).await.unwrap() {
        p.tick().await;
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Recovery of missed messages and events

/// Publish `n` messages `{"n": i}` (from `first`) on `channel` and collect them from `feed` with their positions.
async fn publish_and_collect(
    b: &Arc<dyn Broker>,
    feed: &mut ferry_broker::ChannelFeed,
    channel: &str,
    first: usize,
    n: usize,
) -> Vec<(StreamPos, String)> {
    for i in first..first + n {
        b.publish(channel, json!({ "n": i }).to_string())
            .await
            .unwrap();
    }
    let mut out = Vec::new();
    while out.len() < n {
        let m = next_message(feed, PATIENCE)
            .await
            .expect("every published message delivered");
        assert_eq!(m.channel, channel);
        let pos = m.position.expect("a message with a position");
        out.push((pos, m.payload));
    }
    out
}

fn history(size: usize, ttl_ms: u64) -> ChannelHistory {
    ChannelHistory {
        size,
        ttl: Duration::from_millis(ttl_ms),
    }
}

async fn setup_history<E: Engine>(case: &str, h: ChannelHistory) -> Ctx<E> {
    let engine = E::start_with_history(cfg(), h).await;
    let b = engine.broker();
    Ctx {
        _engine: engine,
        b,
        q: unique_queue(case),
    }
}

pub async fn channel_offsets_rise_and_history_returns_exactly_the_missed<E: Engine>() {
    let c = setup::<E>("channel_offsets").await;
    let b = &c.b;
    let mut feed = b.channels().await.unwrap();
    feed.control().subscribe("room").await.unwrap();
    let got = publish_and_collect(b, &mut feed, "room", 0, 6).await;
    let epoch = &got[0].0.epoch;
    let offsets: Vec<(u64, u64)> = got
        .iter()
        .map(|(p, _)| parse_offset(&p.offset).expect("a stream id"))
        .collect();
    assert!(offsets.windows(2).all(|w| w[0] < w[1]), "{offsets:?}");
    assert!(got.iter().all(|(p, _)| &p.epoch == epoch), "one epoch");
    assert_eq!(b.channel_history().size, 100, "the default size");

    // A listener that saw the first two missed exactly the last four, in order, with the same offsets.
    let since = got[1].0.clone();
    let missed = b.channel_missed("room", &since, 100).await.unwrap();
    assert!(missed.recovered);
    assert_eq!(missed.epoch.as_deref(), Some(epoch.as_str()));
    let want: Vec<(String, String)> = got[2..]
        .iter()
        .map(|(p, d)| (p.offset.clone(), d.clone()))
        .collect();
    let have: Vec<(String, String)> = missed
        .entries
        .iter()
        .map(|e| (e.offset.clone(), e.payload.clone()))
        .collect();
    assert_eq!(have, want);

    // Up to date: nothing missed, and that is a recovery.
    let last = got[5].0.clone();
    let none = b.channel_missed("room", &last, 100).await.unwrap();
    assert!(none.recovered && none.entries.is_empty());
    // More than the caller's bound: not recovered (the client refetches).
    let cut = b.channel_missed("room", &got[0].0, 3).await.unwrap();
    assert!(!cut.recovered && cut.entries.is_empty());
    // Another channel's history is its own: nothing of "room" comes back. With one epoch that is a recovery;
    // on another shard, whose epoch differs, the position is not recognised at all.
    let other = b.channel_missed("other-room", &since, 100).await.unwrap();
    assert!(other.entries.is_empty());
    assert!(other.recovered || !E::ONE_LOG);
}

pub async fn channel_history_trimmed_or_expired_is_not_recovered<E: Engine>() {
    let c = setup_history::<E>("channel_trimmed", history(3, 1_500)).await;
    let b = &c.b;
    let mut feed = b.channels().await.unwrap();
    feed.control().subscribe("busy").await.unwrap();
    // Redis trims `MAXLEN ~` by whole stream nodes (100 entries): publish well past that.
    let got = publish_and_collect(b, &mut feed, "busy", 0, 250).await;
    let trimmed = b.channel_missed("busy", &got[0].0, 1000).await.unwrap();
    assert!(!trimmed.recovered, "the first message was trimmed away");
    assert!(trimmed.entries.is_empty());
    let recent = b.channel_missed("busy", &got[246].0, 1000).await.unwrap();
    assert!(recent.recovered, "the last messages are still held");
    assert_eq!(
        recent
            .entries
            .iter()
            .map(|e| &e.payload)
            .collect::<Vec<_>>(),
        got[247..].iter().map(|(_, d)| d).collect::<Vec<_>>()
    );

    // Past the ttl the history is gone, and a position from before it is not recovered.
    feed.control().subscribe("quiet").await.unwrap();
    let quiet = publish_and_collect(b, &mut feed, "quiet", 0, 2).await;
    sleep(Duration::from_millis(2_000)).await;
    let expired = b.channel_missed("quiet", &quiet[0].0, 100).await.unwrap();
    assert!(!expired.recovered, "older than the ttl");
    assert!(expired.entries.is_empty());
}

/// The live events of `q` until `n` arrived.
async fn collect_events(events: &mut EventStream, q: &QueueName, n: usize) -> Vec<Event> {
    let mut out = Vec::new();
    while out.len() < n {
        let e = timeout(PATIENCE, events.next())
            .await
            .expect("an event in time")
            .expect("stream open");
        if e.queue == *q {
            out.push(e);
        }
    }
    out
}

fn owned(owner: &str) -> NewJob {
    NewJob {
        owner: Some(owner.into()),
        ..job("owned")
    }
}

pub async fn job_events_recover_exactly_the_missed<E: Engine>() {
    let c = setup::<E>("events_missed").await;
    let (b, q) = (&c.b, &c.q);
    let mut events = b.subscribe().await.unwrap();
    b.enqueue(q, owned("alice")).await.unwrap();
    let first = collect_events(&mut events, q, 1).await.remove(0);
    let since = StreamPos {
        offset: event_offset(&first).expect("an event offset"),
        epoch: b
            .events_epoch(q)
            .expect("the epoch is known once subscribed"),
    };
    // Missed: one call per job, alternating owners, then a batch (one log entry, several events).
    for owner in ["bob", "alice", "bob", "alice"] {
        b.enqueue(q, owned(owner)).await.unwrap();
    }
    b.enqueue_batch(q, vec![owned("alice"), owned("bob"), owned("alice")])
        .await
        .unwrap();
    let live = collect_events(&mut events, q, 7).await;
    let offsets: Vec<(u64, u64)> = std::iter::once(&first)
        .chain(&live)
        .map(|e| parse_offset(&event_offset(e).unwrap()).unwrap())
        .collect();
    assert!(
        offsets.windows(2).all(|w| w[0] <= w[1]),
        "offsets never go back: {offsets:?}"
    );
    assert!(offsets[0] < offsets[1]);
    let alice = |e: &Event| e.owner.as_deref() == Some("alice");
    let want: Vec<&str> = live
        .iter()
        .filter(|e| alice(e))
        .map(|e| e.id.as_str())
        .collect();
    for scope in [EventScope::Queue(q), EventScope::All] {
        let missed = b.events_missed(scope, &since, 1000, &alice).await.unwrap();
        if !E::ONE_LOG && matches!(scope, EventScope::All) {
            // A subject's jobs may sit on any shard, and the shards' offsets are not one order.
            assert!(!missed.recovered && missed.entries.is_empty(), "{scope:?}");
            continue;
        }
        assert!(missed.recovered, "{scope:?}");
        assert_eq!(missed.epoch.as_deref(), Some(since.epoch.as_str()));
        let have: Vec<&str> = missed.entries.iter().map(|e| e.id.as_str()).collect();
        assert_eq!(
            have, want,
            "{scope:?}: exactly alice's missed events, in order"
        );
        assert!(missed.entries.iter().all(|e| e.spec.is_none()));
    }
    // From the last event on: nothing missed.
    let last = StreamPos {
        offset: event_offset(live.last().unwrap()).unwrap(),
        epoch: since.epoch.clone(),
    };
    let none = b
        .events_missed(EventScope::Queue(q), &last, 1000, &alice)
        .await
        .unwrap();
    assert!(none.recovered && none.entries.is_empty());
}

pub async fn job_event_history_expired_or_cut_is_not_recovered<E: Engine>() {
    let c = setup_history::<E>("events_expired", history(100, 1_500)).await;
    let (b, q) = (&c.b, &c.q);
    let mut events = b.subscribe().await.unwrap();
    b.enqueue(q, job("a")).await.unwrap();
    let first = collect_events(&mut events, q, 1).await.remove(0);
    let since = StreamPos {
        offset: event_offset(&first).unwrap(),
        epoch: b.events_epoch(q).unwrap(),
    };
    for _ in 0..3 {
        b.enqueue(q, job("b")).await.unwrap();
    }
    collect_events(&mut events, q, 3).await;
    let all = |_: &Event| true;
    let fine = b
        .events_missed(EventScope::Queue(q), &since, 10, &all)
        .await
        .unwrap();
    assert!(fine.recovered);
    assert_eq!(fine.entries.len(), 3);
    // More log entries than the caller scans: not recovered.
    let cut = b
        .events_missed(EventScope::Queue(q), &since, 2, &all)
        .await
        .unwrap();
    assert!(!cut.recovered && cut.entries.is_empty());
    // Older than the ttl: not recovered.
    sleep(Duration::from_millis(2_000)).await;
    let old = b
        .events_missed(EventScope::Queue(q), &since, 10, &all)
        .await
        .unwrap();
    assert!(!old.recovered && old.entries.is_empty());
    // A position that is no offset at all is not recovered either (the gateway refuses it before asking).
    let junk = StreamPos {
        offset: "yesterday".into(),
        epoch: since.epoch.clone(),
    };
    let junk = b
        .events_missed(EventScope::Queue(q), &junk, 10, &all)
        .await
        .unwrap();
    assert!(!junk.recovered);
}

pub async fn another_epoch_is_not_recovered<E: Engine>() {
    let c = setup::<E>("epoch").await;
    let (b, q) = (&c.b, &c.q);
    let mut feed = b.channels().await.unwrap();
    feed.control().subscribe("room").await.unwrap();
    let got = publish_and_collect(b, &mut feed, "room", 0, 2).await;
    let mut events = b.subscribe().await.unwrap();
    b.enqueue(q, job("a")).await.unwrap();
    let e = collect_events(&mut events, q, 1).await.remove(0);
    let ev_since = StreamPos {
        offset: event_offset(&e).unwrap(),
        epoch: b.events_epoch(q).unwrap(),
    };
    if E::ONE_LOG {
        assert_eq!(ev_since.epoch, got[0].0.epoch, "one epoch per store");
    }

    // A fresh engine (a new Redis, a new process) has another epoch: nothing from before it is recoverable, even
    // with offsets it holds too.
    let fresh = E::start(cfg()).await;
    let b2 = fresh.broker();
    let mut feed2 = b2.channels().await.unwrap();
    feed2.control().subscribe("room").await.unwrap();
    let got2 = publish_and_collect(&b2, &mut feed2, "room", 0, 3).await;
    assert_ne!(got2[0].0.epoch, got[0].0.epoch);
    let m = b2.channel_missed("room", &got[0].0, 100).await.unwrap();
    assert!(!m.recovered && m.entries.is_empty());
    assert_eq!(m.epoch.as_deref(), Some(got2[0].0.epoch.as_str()));
    let all = |_: &Event| true;
    let m = b2
        .events_missed(EventScope::Queue(q), &ev_since, 100, &all)
        .await
        .unwrap();
    assert!(!m.recovered && m.entries.is_empty());
    // The first engine still recovers its own.
    let m = b.channel_missed("room", &got[0].0, 100).await.unwrap();
    assert!(m.recovered && m.entries.len() == 1);
}
