//! The store contract: what every [`Store`] must do, written once and run unchanged against each backend.
//!
//! A backend's test module implements [`Backend`] (a fresh, empty store per case) and expands
//! [`contract_suite!`](crate::contract_suite) with that type, which generates one `#[tokio::test]` per case.
//! Cases build events by hand (ids `<ms>-<seq>/<n>` choose the order) and assert only what the trait promises.

use std::collections::HashSet;
use std::sync::Arc;

use ferry_core::{
    Backoff, DEFAULT_MAX_ATTEMPTS, Event, EventType, JobId, JobInfo, JobSpec, JobState, Kind,
    NewJob, Priority, QueueName,
};
use ferry_store::{JobQuery, Store};
use serde_json::{Value, json};
use uuid::Uuid;

/// A backend under test.
#[async_trait::async_trait]
pub trait Backend: Send + Sync + Sized + 'static {
    /// A fresh, empty store, kept alive for the whole case.
    async fn start() -> Self;
    fn store(&self) -> Arc<dyn Store>;
}

/// One `#[tokio::test]` per contract case, each running `contract::<case>::<$backend>()`.
#[macro_export]
macro_rules! contract_suite {
    ($backend:ty) => {
        $crate::contract_suite!(@cases $backend;
            record_and_get,
            unknown_job_is_none,
            duplicate_events_are_skipped,
            same_event_id_of_two_jobs_is_two_events,
            out_of_order_never_moves_backwards_but_fills_spec,
            retrying_then_active_then_completed,
            dead_with_error,
            scheduled_has_run_at,
            batch_with_several_events_of_one_job,
            listing_filters,
            owner_and_tenant_scoping,
            pagination_returns_every_job_once,
            created_after_and_before,
            events_trail_in_order,
            second_completion_is_a_duplicate,
            unfinished_lists_stale_open_jobs,
            retention_removes_exactly_the_old_finished_jobs,
            batches_of_new_and_older_jobs,
        );
    };
    (@cases $backend:ty; $($case:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $case() {
                $crate::contract::$case::<$backend>().await;
            }
        )*
    };
}

// ---------------------------------------------------------------------------------------------------------------
// Helpers

/// A realistic base time (2023-11-14), so times need all their digits.
const T0: u64 = 1_700_000_000_123;

/// A UUIDv7 created at `ms`, distinct per `n`.
pub fn id_at(ms: u64, n: u64) -> JobId {
    let bits = (u128::from(ms) << 80) | (0x7 << 76) | (0b10 << 62) | u128::from(n);
    JobId(Uuid::from_u128(bits))
}

fn created(id: JobId) -> u64 {
    (id.0.as_u128() >> 80) as u64
}

fn q(name: &str) -> QueueName {
    QueueName::parse(name).unwrap()
}

fn k(name: &str) -> Kind {
    Kind::parse(name).unwrap()
}

/// An event of job `job` in queue `emails`, kind `send`, with id `id` at time `at`.
pub fn ev(job: JobId, id: &str, ty: EventType, state: JobState, attempt: u32, at: u64) -> Event {
    Event {
        id: id.to_owned(),
        ty,
        job,
        queue: q("emails"),
        kind: k("send"),
        state,
        attempt,
        at,
        owner: None,
        tenant: None,
        data: None,
        correlation_id: None,
        actor: None,
        spec: None,
    }
}

fn spec(job: JobId) -> JobSpec {
    let mut n = NewJob::new(k("send"), json!({"to": "a@example.com"}));
    n.priority = Priority::High;
    n.max_attempts = Some(5);
    n.timeout_ms = Some(9_000);
    n.backoff = Some(Backoff {
        base_ms: 10,
        max_ms: 100,
    });
    n.owner = Some("alice".into());
    n.tenant = Some("acme".into());
    n.correlation_id = Some("req-1".into());
    n.into_spec(created(job))
}

/// `job.queued` with the spec of [`spec`].
pub fn queued(job: JobId, id: &str, at: u64) -> Event {
    let s = spec(job);
    Event {
        owner: s.owner.clone(),
        tenant: s.tenant.clone(),
        correlation_id: s.correlation_id.clone(),
        actor: Some("alice".into()),
        spec: Some(Box::new(s)),
        ..ev(job, id, EventType::Queued, JobState::Queued, 0, at)
    }
}

fn with_data(mut e: Event, data: Value) -> Event {
    e.data = Some(data);
    e
}

async fn get(s: &Arc<dyn Store>, id: JobId) -> JobInfo {
    s.job(id).await.unwrap().expect("job recorded")
}

fn query(f: impl FnOnce(&mut JobQuery)) -> JobQuery {
    let mut q = JobQuery {
        limit: 100,
        ..JobQuery::default()
    };
    f(&mut q);
    q
}

async fn ids(s: &Arc<dyn Store>, q: JobQuery) -> Vec<JobId> {
    let page = s.jobs(&q).await.unwrap();
    page.jobs.iter().map(|j| j.id).collect()
}

// ---------------------------------------------------------------------------------------------------------------
// Cases

pub async fn record_and_get<B: Backend>() {
    let b = B::start().await;
    let s = b.store();
    s.ping().await.unwrap();
    let id = JobId::new();
    assert_eq!(s.record(&[queued(id, "5-0/0", T0)]).await.unwrap(), 1);
    let j = get(&s, id).await;
    let mut expected = spec(id);
    expected.created_at = created(id);
    assert_eq!(j.id, id);
    assert_eq!(j.queue, q("emails"));
    assert_eq!(j.state, JobState::Queued);
    assert_eq!(j.attempts, 0);
    assert_eq!(j.spec, expected);
    assert_eq!(j.updated_at, T0, "milliseconds survive exactly");
    assert_eq!((j.result, j.error, j.run_at), (None, None, None));
    let trail = s.events(id, 10).await.unwrap();
    assert_eq!(trail.len(), 1);
    let e = &trail[0];
    assert_eq!(
        (e.id.as_str(), e.job_id, e.ty, e.state, e.attempt, e.at),
        ("5-0/0", id, EventType::Queued, JobState::Queued, 0, T0)
    );
    assert_eq!(e.correlation_id.as_deref(), Some("req-1"));
    assert_eq!(e.actor.as_deref(), Some("alice"));
    assert!(e.recorded_at >= ferry_core::now_ms() - 60_000);
}

pub async fn unknown_job_is_none<B: Backend>() {
    let b = B::start().await;
    let s = b.store();
    assert_eq!(s.job(JobId::new()).await.unwrap(), None);
    assert!(s.events(JobId::new(), 10).await.unwrap().is_empty());
    assert_eq!(s.record(&[]).await.unwrap(), 0);
    assert!(s.jobs(&query(|_| {})).await.unwrap().jobs.is_empty());
}

pub async fn duplicate_events_are_skipped<B: Backend>() {
    let b = B::start().await;
    let s = b.store();
    let id = JobId::new();
    let batch = [
        queued(id, "1-0/0", T0),
        ev(id, "2-0/0", EventType::Active, JobState::Active, 1, T0 + 1),
    ];
    assert_eq!(s.record(&batch).await.unwrap(), 2);
    assert_eq!(s.record(&batch).await.unwrap(), 0, "redelivery is harmless");
    let dup = ev(
        id,
        "3-0/0",
        EventType::Completed,
        JobState::Completed,
        1,
        T0 + 2,
    );
    assert_eq!(s.record(&[dup.clone(), dup]).await.unwrap(), 1);
    assert_eq!(s.events(id, 100).await.unwrap().len(), 3);
    assert_eq!(get(&s, id).await.state, JobState::Completed);
}

/// Stream entry ids are unique per shard only: two jobs on two shards may have events with the same id.
pub async fn same_event_id_of_two_jobs_is_two_events<B: Backend>() {
    let b = B::start().await;
    let s = b.store();
    let (a, c) = (JobId::new(), JobId::new());
    let n = s
        .record(&[queued(a, "7-0/0", T0), queued(c, "7-0/0", T0)])
        .await
        .unwrap();
    assert_eq!(n, 2);
    assert_eq!(s.events(a, 10).await.unwrap().len(), 1);
    assert_eq!(s.events(c, 10).await.unwrap().len(), 1);
}

pub async fn out_of_order_never_moves_backwards_but_fills_spec<B: Backend>() {
    let b = B::start().await;
    let s = b.store();
    let id = JobId::new();
    let mut done = with_data(
        ev(
            id,
            "30-0/0",
            EventType::Completed,
            JobState::Completed,
            1,
            T0 + 30,
        ),
        json!({"sent": true}),
    );
    done.owner = Some("alice".into());
    done.tenant = Some("acme".into());
    s.record(&[done]).await.unwrap();

    // The spec is not known yet: kind/queue/owner/tenant from the event, defaults for the rest.
    let j = get(&s, id).await;
    assert_eq!(j.state, JobState::Completed);
    assert_eq!(j.spec.payload, Value::Null);
    assert_eq!(j.spec.priority, Priority::Normal);
    assert_eq!(j.spec.max_attempts, DEFAULT_MAX_ATTEMPTS);
    assert_eq!(j.spec.kind, k("send"));
    assert_eq!(j.spec.owner.as_deref(), Some("alice"));
    assert_eq!(j.spec.tenant.as_deref(), Some("acme"));
    assert_eq!(j.spec.created_at, created(id));

    // The older queued event fills the spec but does not move the record.
    s.record(&[queued(id, "10-0/0", T0 + 10)]).await.unwrap();
    // An active event older than completed (delivered late) changes nothing.
    s.record(&[ev(
        id,
        "20-0/0",
        EventType::Active,
        JobState::Active,
        1,
        T0 + 20,
    )])
    .await
    .unwrap();
    let j = get(&s, id).await;
    assert_eq!(j.state, JobState::Completed);
    assert_eq!(j.attempts, 1);
    assert_eq!(j.result, Some(json!({"sent": true})));
    assert_eq!(j.updated_at, T0 + 30);
    let mut expected = spec(id);
    expected.created_at = created(id);
    assert_eq!(j.spec, expected, "spec filled in from the older event");

    // An older event of equal id prefix but lower seq, and a numerically (not lexically) older id.
    s.record(&[ev(
        id,
        "9-99/0",
        EventType::Active,
        JobState::Active,
        2,
        T0 + 40,
    )])
    .await
    .unwrap();
    assert_eq!(get(&s, id).await.state, JobState::Completed);
    let trail: Vec<_> = s
        .events(id, 10)
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.id)
        .collect();
    assert_eq!(trail, ["9-99/0", "10-0/0", "20-0/0", "30-0/0"]);
}

pub async fn retrying_then_active_then_completed<B: Backend>() {
    let b = B::start().await;
    let s = b.store();
    let id = JobId::new();
    s.record(&[
        queued(id, "1-0/0", T0),
        ev(id, "2-0/0", EventType::Active, JobState::Active, 1, T0 + 1),
    ])
    .await
    .unwrap();
    s.record(&[with_data(
        ev(
            id,
            "3-0/0",
            EventType::Retrying,
            JobState::Retrying,
            1,
            T0 + 2,
        ),
        json!({"error": "smtp timeout", "run_at": T0 + 1_000}),
    )])
    .await
    .unwrap();
    let j = get(&s, id).await;
    assert_eq!(j.state, JobState::Retrying);
    assert_eq!(j.error.as_deref(), Some("smtp timeout"));
    assert_eq!(j.run_at, Some(T0 + 1_000));
    assert_eq!(j.attempts, 1);

    s.record(&[ev(
        id,
        "4-0/0",
        EventType::Active,
        JobState::Active,
        2,
        T0 + 1_001,
    )])
    .await
    .unwrap();
    let j = get(&s, id).await;
    assert_eq!((j.state, j.attempts), (JobState::Active, 2));
    assert_eq!(
        (j.error, j.run_at),
        (None, None),
        "cleared by a newer event"
    );

    s.record(&[
        with_data(
            ev(
                id,
                "4-1/0",
                EventType::Progress,
                JobState::Active,
                2,
                T0 + 1_002,
            ),
            json!(50),
        ),
        with_data(
            ev(
                id,
                "5-0/0",
                EventType::Completed,
                JobState::Completed,
                2,
                T0 + 1_003,
            ),
            json!({"id": "m-1"}),
        ),
    ])
    .await
    .unwrap();
    let j = get(&s, id).await;
    assert_eq!(j.state, JobState::Completed);
    assert_eq!(j.result, Some(json!({"id": "m-1"})));
    assert_eq!(j.updated_at, T0 + 1_003);
}

pub async fn dead_with_error<B: Backend>() {
    let b = B::start().await;
    let s = b.store();
    let (a, c, d) = (JobId::new(), JobId::new(), JobId::new());
    s.record(&[
        queued(a, "1-0/0", T0),
        with_data(
            ev(a, "2-0/0", EventType::Dead, JobState::Dead, 5, T0 + 5),
            json!({"error": "mailbox gone"}),
        ),
        with_data(
            ev(c, "2-0/1", EventType::Dead, JobState::Dead, 1, T0 + 5),
            json!({"error": {"code": 550}}),
        ),
        with_data(
            ev(d, "2-0/2", EventType::Dead, JobState::Dead, 1, T0 + 5),
            json!("plain"),
        ),
    ])
    .await
    .unwrap();
    let j = get(&s, a).await;
    assert_eq!((j.state, j.attempts), (JobState::Dead, 5));
    assert_eq!(j.error.as_deref(), Some("mailbox gone"));
    assert_eq!((j.result, j.run_at), (None, None));
    assert_eq!(get(&s, c).await.error.as_deref(), Some(r#"{"code":550}"#));
    assert_eq!(get(&s, d).await.error.as_deref(), Some("plain"));
}

pub async fn scheduled_has_run_at<B: Backend>() {
    let b = B::start().await;
    let s = b.store();
    let id = JobId::new();
    let sched = Event {
        ty: EventType::Scheduled,
        state: JobState::Scheduled,
        data: Some(json!({"run_at": T0 + 60_000})),
        ..queued(id, "1-0/0", T0)
    };
    s.record(&[sched]).await.unwrap();
    let j = get(&s, id).await;
    assert_eq!(j.state, JobState::Scheduled);
    assert_eq!(j.run_at, Some(T0 + 60_000));
    assert_eq!(j.spec.max_attempts, 5, "job.scheduled carries the spec");
    s.record(&[ev(
        id,
        "2-0/0",
        EventType::Queued,
        JobState::Queued,
        0,
        T0 + 60_000,
    )])
    .await
    .unwrap();
    assert_eq!(get(&s, id).await.run_at, None);
}

pub async fn batch_with_several_events_of_one_job<B: Backend>() {
    let b = B::start().await;
    let s = b.store();
    let id = JobId::new();
    // Shuffled: the newest event wins whatever its position in the batch.
    let batch = [
        with_data(
            ev(
                id,
                "3-0/0",
                EventType::Progress,
                JobState::Active,
                1,
                T0 + 3,
            ),
            json!({"pct": 50}),
        ),
        with_data(
            ev(
                id,
                "4-0/0",
                EventType::Completed,
                JobState::Completed,
                1,
                T0 + 4,
            ),
            json!("ok"),
        ),
        queued(id, "1-0/0", T0),
        ev(id, "2-0/0", EventType::Active, JobState::Active, 1, T0 + 2),
    ];
    assert_eq!(s.record(&batch).await.unwrap(), 4);
    let j = get(&s, id).await;
    assert_eq!((j.state, j.attempts), (JobState::Completed, 1));
    assert_eq!(j.result, Some(json!("ok")));
    assert_eq!(j.updated_at, T0 + 4);
    assert_eq!(j.spec.priority, Priority::High);
    let trail: Vec<_> = s
        .events(id, 10)
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.ty)
        .collect();
    use EventType::*;
    assert_eq!(trail, [Queued, Active, Progress, Completed]);
}

/// Four jobs differing in queue, kind, state, owner and tenant.
async fn mixed(s: &Arc<dyn Store>) -> [JobId; 4] {
    let ids = [JobId::new(), JobId::new(), JobId::new(), JobId::new()];
    let mut batch = Vec::new();
    for (i, id) in ids.iter().enumerate() {
        let mut e = queued(*id, &format!("1-{i}/0"), T0);
        let sp = e.spec.as_mut().unwrap();
        if i % 2 == 1 {
            e.queue = q("reports");
        }
        if i >= 2 {
            e.kind = k("render");
            sp.kind = k("render");
            sp.owner = Some("bob".into());
        }
        if i == 3 {
            sp.tenant = Some("globex".into());
        }
        batch.push(e);
    }
    batch.push(ev(
        ids[0],
        "2-0/0",
        EventType::Active,
        JobState::Active,
        1,
        T0 + 1,
    ));
    let mut dead = ev(ids[3], "2-1/0", EventType::Dead, JobState::Dead, 1, T0 + 1);
    dead.queue = q("reports");
    dead.kind = k("render");
    batch.push(dead);
    s.record(&batch).await.unwrap();
    ids
}

pub async fn listing_filters<B: Backend>() {
    let b = B::start().await;
    let s = b.store();
    let [a, c, d, e] = mixed(&s).await;
    assert_eq!(ids(&s, query(|_| {})).await, [e, d, c, a], "newest first");
    assert_eq!(
        ids(&s, query(|x| x.queue = Some(q("reports")))).await,
        [e, c]
    );
    assert_eq!(ids(&s, query(|x| x.queue = Some(q("none")))).await, []);
    assert_eq!(
        ids(&s, query(|x| x.state = Some(JobState::Active))).await,
        [a]
    );
    assert_eq!(
        ids(&s, query(|x| x.state = Some(JobState::Queued))).await,
        [d, c]
    );
    assert_eq!(ids(&s, query(|x| x.kind = Some(k("render")))).await, [e, d]);
    let both = query(|x| {
        x.queue = Some(q("reports"));
        x.state = Some(JobState::Dead);
        x.kind = Some(k("render"));
    });
    assert_eq!(ids(&s, both).await, [e]);
    let page = s
        .jobs(&query(|x| x.state = Some(JobState::Dead)))
        .await
        .unwrap();
    assert_eq!(page.next, None);
    assert_eq!(page.jobs[0].queue, q("reports"));
}

pub async fn owner_and_tenant_scoping<B: Backend>() {
    let b = B::start().await;
    let s = b.store();
    let [a, c, d, e] = mixed(&s).await;
    assert_eq!(
        ids(&s, query(|x| x.owner = Some("alice".into()))).await,
        [c, a]
    );
    assert_eq!(
        ids(&s, query(|x| x.owner = Some("bob".into()))).await,
        [e, d]
    );
    assert_eq!(ids(&s, query(|x| x.owner = Some("eve".into()))).await, []);
    assert_eq!(
        ids(&s, query(|x| x.tenant = Some("acme".into()))).await,
        [d, c, a]
    );
    let scoped = query(|x| {
        x.owner = Some("bob".into());
        x.tenant = Some("globex".into());
    });
    assert_eq!(ids(&s, scoped).await, [e]);
}

pub async fn pagination_returns_every_job_once<B: Backend>() {
    let b = B::start().await;
    let s = b.store();
    let all: Vec<JobId> = (0..25).map(|_| JobId::new()).collect();
    let batch: Vec<Event> = all
        .iter()
        .enumerate()
        .map(|(i, id)| queued(*id, &format!("1-{i}/0"), T0))
        .collect();
    assert_eq!(s.record(&batch).await.unwrap(), 25);
    // Another queue's job must not show up.
    let other = JobId::new();
    let mut e = queued(other, "2-0/0", T0);
    e.queue = q("other");
    s.record(&[e]).await.unwrap();

    let mut seen = Vec::new();
    let mut after = None;
    let mut pages = 0;
    loop {
        let page = s
            .jobs(&query(|x| {
                x.queue = Some(q("emails"));
                x.limit = 10;
                x.after = after;
            }))
            .await
            .unwrap();
        pages += 1;
        assert!(page.jobs.len() <= 10);
        seen.extend(page.jobs.iter().map(|j| j.id));
        match page.next {
            Some(n) => {
                assert_eq!(Some(n), page.jobs.last().map(|j| j.id));
                after = Some(n);
            }
            None => break,
        }
        assert!(pages < 10, "pagination does not end");
    }
    assert_eq!(pages, 3);
    let mut expected = all.clone();
    expected.reverse();
    assert_eq!(seen, expected, "every job once, newest first");
    assert_eq!(seen.iter().collect::<HashSet<_>>().len(), 25);

    // A page that is exactly full reports a cursor only when more may follow.
    let page = s.jobs(&query(|x| x.limit = 26)).await.unwrap();
    assert_eq!((page.jobs.len(), page.next), (26, None));
    let page = s.jobs(&query(|x| x.limit = 25)).await.unwrap();
    assert_eq!(page.next, Some(all[1]), "the 25th newest of 26");
}

pub async fn created_after_and_before<B: Backend>() {
    let b = B::start().await;
    let s = b.store();
    let ms = [T0, T0 + 1_000, T0 + 2_000];
    let ids: Vec<JobId> = ms
        .iter()
        .flat_map(|m| [id_at(*m, 1), id_at(*m, 2)])
        .collect();
    let batch: Vec<Event> = ids
        .iter()
        .enumerate()
        .map(|(i, id)| queued(*id, &format!("1-{i}/0"), T0))
        .collect();
    s.record(&batch).await.unwrap();
    assert_eq!(get(&s, ids[2]).await.spec.created_at, T0 + 1_000);
    let got = |a: Option<u64>, z: Option<u64>| {
        let s = s.clone();
        async move {
            let q = query(|x| {
                x.created_after = a;
                x.created_before = z;
            });
            let mut v = self::ids(&s, q).await;
            v.reverse();
            v
        }
    };
    assert_eq!(got(Some(T0 + 1_000), None).await, ids[2..]);
    assert_eq!(got(Some(T0 + 1_001), None).await, ids[4..]);
    assert_eq!(got(None, Some(T0 + 2_000)).await, ids[..4]);
    assert_eq!(got(None, Some(T0 + 1_999)).await, ids[..4]);
    assert_eq!(got(Some(T0 + 1_000), Some(T0 + 2_000)).await, ids[2..4]);
    assert_eq!(got(Some(T0 + 2_000), Some(T0 + 1_000)).await, []);
    // Bounds and a cursor together: the tighter upper bound wins.
    let q = query(|x| {
        x.created_before = Some(T0 + 2_001);
        x.after = Some(ids[3]);
    });
    assert_eq!(self::ids(&s, q).await, [ids[2], ids[1], ids[0]]);
}

pub async fn events_trail_in_order<B: Backend>() {
    let b = B::start().await;
    let s = b.store();
    let id = JobId::new();
    // Recorded newest first and in separate batches; ids compare as numbers, not text.
    let order = ["9/0", "9/1", "10-2/0", "10-10/0", "10-10/3", "100-0/0"];
    for (i, eid) in order.iter().enumerate().rev() {
        let e = ev(
            id,
            eid,
            EventType::Progress,
            JobState::Active,
            1,
            T0 + i as u64,
        );
        s.record(&[e]).await.unwrap();
    }
    let trail = s.events(id, 100).await.unwrap();
    let got: Vec<_> = trail.iter().map(|e| e.id.as_str()).collect();
    assert_eq!(got, order);
    assert!(trail.iter().enumerate().all(|(i, e)| e.at == T0 + i as u64));
    let first: Vec<_> = s
        .events(id, 2)
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.id)
        .collect();
    assert_eq!(first, ["9/0", "9/1"]);
    // Another job's events are not part of this trail.
    s.record(&[ev(
        JobId::new(),
        "1/0",
        EventType::Queued,
        JobState::Queued,
        0,
        T0,
    )])
    .await
    .unwrap();
    assert_eq!(s.events(id, 100).await.unwrap().len(), order.len());
}

/// A job that ran again after the engine lost its completion (Redis data loss) gets a second `job.completed`
/// with another event id: it is stored as `job.duplicate_completion`, counted, and the record keeps its first
/// completion; the rerun's other events are in the trail but do not move the record. Redelivery of either is
/// still harmless, and two completions in one batch are told apart by order key.
pub async fn second_completion_is_a_duplicate<B: Backend>() {
    let b = B::start().await;
    let s = b.store();
    let (id, other) = (JobId::new(), JobId::new());
    let done = |job, eid: &str, at, result: Value| {
        with_data(
            ev(job, eid, EventType::Completed, JobState::Completed, 1, at),
            result,
        )
    };
    s.record(&[
        queued(id, "1-0/0", T0),
        ev(id, "2-0/0", EventType::Active, JobState::Active, 1, T0 + 1),
        done(id, "3-0/0", T0 + 2, json!("first")),
    ])
    .await
    .unwrap();
    assert_eq!(s.duplicate_completions(), 0);
    let rerun = [
        ev(id, "7-0/0", EventType::Active, JobState::Active, 1, T0 + 7),
        done(id, "8-0/0", T0 + 8, json!("second")),
    ];
    assert_eq!(s.record(&rerun).await.unwrap(), 2);
    assert_eq!(s.record(&rerun).await.unwrap(), 0, "redelivery");
    assert_eq!(s.duplicate_completions(), 1, "counted once");
    let types: Vec<(String, EventType)> = s
        .events(id, 100)
        .await
        .unwrap()
        .into_iter()
        .map(|e| (e.id, e.ty))
        .collect();
    assert_eq!(
        types,
        [
            ("1-0/0".to_owned(), EventType::Queued),
            ("2-0/0".to_owned(), EventType::Active),
            ("3-0/0".to_owned(), EventType::Completed),
            ("7-0/0".to_owned(), EventType::Active),
            ("8-0/0".to_owned(), EventType::DuplicateCompletion),
        ]
    );
    let j = get(&s, id).await;
    assert_eq!(j.state, JobState::Completed);
    assert_eq!(
        j.result,
        Some(json!("first")),
        "the first completion stands"
    );
    assert_eq!(j.updated_at, T0 + 2);

    // Both completions in one batch, the later one first: the earlier by order key is the completion.
    s.record(&[
        queued(other, "1-0/0", T0),
        done(other, "9-0/0", T0 + 9, json!("late")),
        done(other, "4-0/0", T0 + 4, json!("early")),
    ])
    .await
    .unwrap();
    let trail = s.events(other, 100).await.unwrap();
    let kinds: Vec<EventType> = trail.iter().map(|e| e.ty).collect();
    assert_eq!(
        kinds,
        [
            EventType::Queued,
            EventType::Completed,
            EventType::DuplicateCompletion
        ]
    );
    assert_eq!(get(&s, other).await.result, Some(json!("early")));
    assert_eq!(s.duplicate_completions(), 2);
}

/// Batches holding both jobs they start and later events of older jobs, as under sustained load: each job's
/// row ends as its newest event says, with its spec, and only open jobs are candidates of the reconciler. One new
/// job's row already exists (its completion was recorded first), and one batch is delivered twice.
pub async fn batches_of_new_and_older_jobs<B: Backend>() {
    let b = B::start().await;
    let s = b.store();
    let [old, early, n1, n2, n3, n4] = [0, 1, 2, 3, 4, 5].map(|n| id_at(T0, n));
    let done = |id, eid: &str, at| ev(id, eid, EventType::Completed, JobState::Completed, 1, at);
    let active = |id, eid: &str, at| ev(id, eid, EventType::Active, JobState::Active, 1, at);
    s.record(&[queued(old, "1-0/0", T0)]).await.unwrap();
    s.record(&[done(early, "5-1/0", T0 + 5)]).await.unwrap();
    s.record(&[
        done(old, "5-0/0", T0 + 5),
        queued(early, "2-0/0", T0 + 2),
        queued(n1, "3-0/0", T0 + 3),
        queued(n2, "3-1/0", T0 + 3),
        active(n2, "4-0/0", T0 + 4),
        done(n2, "6-0/0", T0 + 6),
    ])
    .await
    .unwrap();
    let third = [
        active(n1, "7-0/0", T0 + 7),
        queued(n3, "7-1/0", T0 + 7),
        queued(n4, "7-2/0", T0 + 7),
        done(n4, "8-0/0", T0 + 8),
    ];
    assert_eq!(s.record(&third).await.unwrap(), 4);
    assert_eq!(s.record(&third).await.unwrap(), 0, "redelivery is harmless");
    let want = [
        (old, JobState::Completed),
        (early, JobState::Completed),
        (n1, JobState::Active),
        (n2, JobState::Completed),
        (n3, JobState::Queued),
        (n4, JobState::Completed),
    ];
    for (id, state) in want {
        let j = get(&s, id).await;
        assert_eq!(j.state, state, "{id}");
        let mut expected = spec(id);
        expected.created_at = created(id);
        assert_eq!(j.spec, expected, "{id} has its spec");
    }
    let open: Vec<JobId> = s
        .unfinished(T0 + 60_000, None, 100)
        .await
        .unwrap()
        .iter()
        .map(|j| j.id)
        .collect();
    assert_eq!(open, [n1, n3]);
    assert_eq!(s.events(n2, 10).await.unwrap().len(), 3);
    assert_eq!(s.events(n4, 10).await.unwrap().len(), 2);
}

/// The reconciler's candidates: open (not final) jobs with their spec, not moved since the cutoff, by id.
pub async fn unfinished_lists_stale_open_jobs<B: Backend>() {
    let b = B::start().await;
    let s = b.store();
    let ids: Vec<JobId> = (0..6).map(|n| id_at(T0, n)).collect();
    s.record(&[
        // 0: queued long ago; 1: active long ago; 2: retrying long ago.
        queued(ids[0], "1-0/0", T0),
        queued(ids[1], "1-1/0", T0),
        ev(
            ids[1],
            "2-0/0",
            EventType::Active,
            JobState::Active,
            1,
            T0 + 1,
        ),
        queued(ids[2], "1-2/0", T0),
        with_data(
            ev(
                ids[2],
                "3-0/0",
                EventType::Retrying,
                JobState::Retrying,
                1,
                T0 + 2,
            ),
            json!({"error": "e", "run_at": T0 + 50}),
        ),
        // 3: completed; 4: queued recently; 5: no spec recorded (only its job.active).
        queued(ids[3], "1-3/0", T0),
        ev(
            ids[3],
            "4-0/0",
            EventType::Completed,
            JobState::Completed,
            1,
            T0 + 3,
        ),
        queued(ids[4], "5-0/0", T0 + 1_000),
        ev(ids[5], "6-0/0", EventType::Active, JobState::Active, 1, T0),
    ])
    .await
    .unwrap();
    let all = s.unfinished(T0 + 500, None, 100).await.unwrap();
    let got: Vec<(JobId, JobState, u32)> =
        all.iter().map(|j| (j.id, j.state, j.attempts)).collect();
    assert_eq!(
        got,
        [
            (ids[0], JobState::Queued, 0),
            (ids[1], JobState::Active, 1),
            (ids[2], JobState::Retrying, 1),
        ]
    );
    assert_eq!(all[0].spec.payload, json!({"to": "a@example.com"}));
    assert_eq!(all[0].spec.priority, Priority::High);
    assert_eq!(all[0].spec.tenant.as_deref(), Some("acme"));
    assert_eq!(all[2].run_at, Some(T0 + 50));
    let page = s.unfinished(T0 + 500, Some(ids[0]), 1).await.unwrap();
    assert_eq!(page.iter().map(|j| j.id).collect::<Vec<_>>(), [ids[1]]);
    assert!(s.unfinished(T0, None, 100).await.unwrap().is_empty());
}

/// A day in milliseconds.
pub const DAY: u64 = 86_400_000;

/// The jobs of [`retention_scenario`], by what retention must do with them.
pub struct Retention {
    /// Finished more than the retention ago: gone, with their events.
    pub expired: Vec<JobId>,
    /// Not finished, or finished within the retention, or recent: kept, with their events. Newest first.
    pub kept: Vec<JobId>,
    /// Kept because they finished within the retention (1 day and 1 hour before `now`): expired once the
    /// clock passes `now` + 3 days.
    pub finished_lately: Vec<JobId>,
    /// Not finished (created 10 days and 0 days before `now`): kept whatever the clock. Newest first.
    pub open: Vec<JobId>,
}

/// Records, relative to `now`, jobs created 10, 9, 1 and 0 days ago in every finished state and open, for a
/// retention of 3 days. Each has its `job.queued` event and, when finished, its final event.
pub async fn retention_scenario(s: &Arc<dyn Store>, now: u64) -> Retention {
    let a = id_at(now - 10 * DAY, 1); // completed 10 days ago
    let b = id_at(now - 10 * DAY, 2); // still queued
    let c = id_at(now - 10 * DAY, 3); // dead 9 days ago
    let e = id_at(now - 10 * DAY, 4); // completed an hour ago
    let f = id_at(now - 9 * DAY, 5); // cancelled 9 days ago
    let g = id_at(now - DAY, 6); // completed a day ago
    let h = id_at(now, 7); // queued now
    let mut events = Vec::new();
    for (job, at) in [a, b, c, e, f, g, h].map(|j| (j, created(j))) {
        events.push(queued(job, &format!("{at}-0/0"), at));
    }
    let done = |job: JobId, ty: EventType, state: JobState, at: u64| {
        ev(job, &format!("{at}-1/0"), ty, state, 1, at)
    };
    events.push(done(
        a,
        EventType::Completed,
        JobState::Completed,
        now - 10 * DAY + 1_000,
    ));
    events.push(done(c, EventType::Dead, JobState::Dead, now - 9 * DAY));
    events.push(done(
        e,
        EventType::Completed,
        JobState::Completed,
        now - 3_600_000,
    ));
    events.push(done(
        f,
        EventType::Cancelled,
        JobState::Cancelled,
        now - 9 * DAY + 1_000,
    ));
    events.push(done(
        g,
        EventType::Completed,
        JobState::Completed,
        now - DAY + 1_000,
    ));
    s.record(&events).await.unwrap();
    Retention {
        expired: vec![a, c, f],
        kept: vec![h, g, e, b],
        finished_lately: vec![g, e],
        open: vec![h, b],
    }
}

/// Checks that `r.expired` are gone (record and trail) and `kept` are whole, listed newest first.
pub async fn assert_retained(s: &Arc<dyn Store>, expired: &[JobId], kept: &[JobId]) {
    for id in expired {
        assert!(s.job(*id).await.unwrap().is_none(), "{id} should be gone");
        assert!(
            s.events(*id, 10).await.unwrap().is_empty(),
            "{id}'s trail should be gone"
        );
    }
    for id in kept {
        let j = get(s, *id).await;
        assert_eq!(
            j.spec.payload,
            json!({"to": "a@example.com"}),
            "{id} kept whole"
        );
        let trail = s.events(*id, 10).await.unwrap();
        let want = if j.state.is_final() { 2 } else { 1 };
        assert_eq!(trail.len(), want, "{id}'s trail kept whole");
    }
    assert_eq!(ids(s, query(|_| {})).await, kept, "listing");
    // A listing scoped like a user's still finds them all.
    assert_eq!(
        ids(s, query(|q| q.owner = Some("alice".into()))).await,
        kept
    );
}

/// Retention removes the jobs that finished more than the retention ago, with their events, and keeps every job
/// not finished, whatever its age, and those finished within the retention.
pub async fn retention_removes_exactly_the_old_finished_jobs<B: Backend>() {
    use ferry_store::maintenance::MaintenanceConfig;
    let b = B::start().await;
    let s = b.store();
    let now = ferry_core::now_ms();
    let r = retention_scenario(&s, now).await;
    // Without a retention nothing goes.
    s.maintain(&MaintenanceConfig::default(), now)
        .await
        .unwrap();
    let all: Vec<JobId> = r.kept.iter().chain(&r.expired).copied().collect();
    assert_eq!(ids(&s, query(|_| {})).await.len(), all.len());
    let config = MaintenanceConfig {
        retention: Some(std::time::Duration::from_millis(3 * DAY)),
        ..MaintenanceConfig::default()
    };
    s.maintain(&config, now).await.unwrap();
    assert_retained(&s, &r.expired, &r.kept).await;
    // A second pass changes nothing; four days later the jobs that finished within the retention have expired
    // too, and the open ones are still there.
    s.maintain(&config, now).await.unwrap();
    assert_retained(&s, &r.expired, &r.kept).await;
    s.maintain(&config, now + 4 * DAY).await.unwrap();
    assert_retained(&s, &r.finished_lately, &r.open).await;
    for id in &r.open {
        assert_eq!(get(&s, *id).await.state, JobState::Queued);
    }
}
