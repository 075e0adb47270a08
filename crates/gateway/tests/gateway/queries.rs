//! Queries answered by the durable record: `GET /v1/jobs`, `GET /v1/jobs/{id}/events`, and `GET /v1/jobs/{id}`
//! falling back to the store for a job the broker no longer holds. The store is the in-memory [`MemoryStore`],
//! filled the way the recorder fills it ([`Store::record`] with lifecycle events).

use std::collections::HashSet;
use std::sync::Arc;

use ferry_broker::{EngineConfig, MemoryBroker, RedisBroker};
use ferry_core::{Event, EventType, JobId, JobSpec, JobState, Kind, QueueName};
use ferry_store::{MemoryStore, Store};
use ferry_testkit::RedisServer;
use serde_json::{Value, json};

use crate::support::{ADMIN, TestApp, USER, is_problem, token};

/// 2023-11-14T22:13:20Z.
const T: u64 = 1_700_000_000_000;

/// A UUIDv7 job id created at `ms`.
fn id_at(ms: u64) -> JobId {
    let ts =
        uuid::Timestamp::from_unix(uuid::NoContext, ms / 1000, ((ms % 1000) * 1_000_000) as u32);
    JobId(uuid::Uuid::new_v7(ts))
}

struct Seed {
    id: JobId,
    queue: &'static str,
    kind: &'static str,
    owner: &'static str,
    tenant: Option<&'static str>,
    created: u64,
    /// The final event after `job.queued`, if any.
    then: Option<(EventType, JobState)>,
}

fn events(s: &Seed) -> Vec<Event> {
    let spec = JobSpec {
        kind: Kind::parse(s.kind).unwrap(),
        payload: json!({"n": s.created}),
        priority: Default::default(),
        max_attempts: 3,
        timeout_ms: None,
        backoff: Default::default(),
        owner: Some(s.owner.into()),
        tenant: s.tenant.map(Into::into),
        correlation_id: Some(format!("corr-{}", s.created)),
        traceparent: None,
        created_at: s.created,
    };
    let queued = Event {
        id: format!("{}-0/0", s.created),
        ty: EventType::Queued,
        job: s.id,
        queue: QueueName::parse(s.queue).unwrap(),
        kind: spec.kind.clone(),
        state: JobState::Queued,
        attempt: 0,
        at: s.created,
        owner: spec.owner.clone(),
        tenant: spec.tenant.clone(),
        data: None,
        correlation_id: spec.correlation_id.clone(),
        actor: Some(format!("user:{}", s.owner)),
        spec: Some(Box::new(spec)),
    };
    let mut out = vec![queued.clone()];
    if let Some((ty, state)) = s.then {
        out.push(Event {
            id: format!("{}-0/0", s.created + 10),
            ty,
            state,
            attempt: 1,
            at: s.created + 10,
            data: Some(json!({"result": "done"})),
            actor: Some("worker-1".into()),
            spec: None,
            ..queued
        });
    }
    out
}

struct Data {
    store: Arc<MemoryStore>,
    /// By name: a1..a8 (alice), b1 (bob), t1 (alice in tenant acme), t2 (carol in acme).
    ids: std::collections::HashMap<&'static str, JobId>,
}

async fn seed() -> Data {
    let completed = Some((EventType::Completed, JobState::Completed));
    let mut seeds = vec![
        ("a1", "emails", "send", "alice", None, T, completed),
        ("a2", "emails", "send", "alice", None, T + 1000, None),
        (
            "a3",
            "sms",
            "text",
            "alice",
            None,
            T + 2000,
            Some((EventType::Dead, JobState::Dead)),
        ),
        ("b1", "emails", "send", "bob", None, T + 500, None),
        (
            "t1",
            "acme:emails",
            "send",
            "alice",
            Some("acme"),
            T + 800,
            completed,
        ),
        (
            "t2",
            "acme:emails",
            "send",
            "carol",
            Some("acme"),
            T + 900,
            None,
        ),
    ];
    let bulk = ["a4", "a5", "a6", "a7", "a8"];
    for (i, name) in bulk.iter().enumerate() {
        seeds.push((
            name,
            "bulk",
            "bulk",
            "alice",
            None,
            T + 3000 + 1000 * i as u64,
            None,
        ));
    }
    let store = Arc::new(MemoryStore::new());
    let mut ids = std::collections::HashMap::new();
    let mut all = Vec::new();
    for (name, queue, kind, owner, tenant, created, then) in seeds {
        let s = Seed {
            id: id_at(created),
            queue,
            kind,
            owner,
            tenant,
            created,
            then,
        };
        ids.insert(name, s.id);
        all.extend(events(&s));
    }
    store.record(&all).await.expect("recorded");
    Data { store, ids }
}

async fn app_with(data: &Data) -> TestApp {
    let store: Arc<dyn Store> = data.store.clone();
    TestApp::start(
        Arc::new(MemoryBroker::new(EngineConfig::default())),
        move |c| c.store = Some(store),
    )
    .await
}

fn ids_of(body: &Value) -> Vec<String> {
    body["jobs"]
        .as_array()
        .unwrap_or_else(|| panic!("a job list: {body}"))
        .iter()
        .map(|j| j["id"].as_str().unwrap().to_owned())
        .collect()
}

impl Data {
    fn names(&self, names: &[&str]) -> Vec<String> {
        names.iter().map(|n| self.ids[n].to_string()).collect()
    }
}

#[tokio::test]
async fn without_a_store_the_query_routes_are_503_no_store() {
    let app = TestApp::start(Arc::new(MemoryBroker::new(EngineConfig::default())), |_| {}).await;
    let alice = token("alice", USER, None);
    let r = app.get("/v1/jobs", &alice).await;
    is_problem(&r, 503, "no-store");
    assert!(
        r.body["detail"]
            .as_str()
            .unwrap()
            .contains("--database-url")
    );
    assert!(r.retry_after().is_none());
    let r = app
        .get(&format!("/v1/jobs/{}/events", JobId::new()), &alice)
        .await;
    is_problem(&r, 503, "no-store");
    // Unauthenticated or unscoped callers learn nothing about the configuration.
    assert_eq!(app.anon("/v1/jobs").await.status, 401);
    let r = app.get("/v1/jobs", &token("svc", "publish", None)).await;
    is_problem(&r, 403, "forbidden");
}

#[tokio::test]
async fn listing_filters_and_scopes_like_a_lookup() {
    let data = seed().await;
    let app = app_with(&data).await;
    let alice = token("alice", USER, None);

    let all = app.get("/v1/jobs", &alice).await;
    assert_eq!(all.status, 200, "{:?}", all.body);
    assert_eq!(
        ids_of(&all.body),
        data.names(&["a8", "a7", "a6", "a5", "a4", "a3", "a2", "a1"]),
        "own jobs only, newest first"
    );
    assert!(all.body["next_cursor"].is_null());
    let a1 = all.body["jobs"].as_array().unwrap().last().unwrap();
    assert_eq!(a1["queue"], "emails");
    assert_eq!(a1["kind"], "send");
    assert_eq!(a1["state"], "completed");
    assert_eq!(a1["created_at"], T);
    assert_eq!(a1["max_attempts"], 3);
    assert_eq!(a1["payload"], json!({"n": T}));

    let q = app.get("/v1/jobs?queue=emails", &alice).await;
    assert_eq!(ids_of(&q.body), data.names(&["a2", "a1"]));
    let q = app.get("/v1/jobs?state=completed", &alice).await;
    assert_eq!(ids_of(&q.body), data.names(&["a1"]));
    let q = app.get("/v1/jobs?kind=text", &alice).await;
    assert_eq!(ids_of(&q.body), data.names(&["a3"]));
    assert_eq!(q.body["jobs"][0]["state"], "dead");
    let q = app
        .get("/v1/jobs?queue=emails&state=queued&kind=send", &alice)
        .await;
    assert_eq!(ids_of(&q.body), data.names(&["a2"]));
    // created_after is inclusive, created_before exclusive; milliseconds or RFC 3339.
    let window = data.names(&["a3", "a2"]);
    let q = app
        .get(
            &format!(
                "/v1/jobs?created_after={}&created_before={}",
                T + 1000,
                T + 3000
            ),
            &alice,
        )
        .await;
    assert_eq!(ids_of(&q.body), window);
    let q = app
        .get(
            "/v1/jobs?created_after=2023-11-14T22:13:21Z&created_before=2023-11-14T23:13:23%2B01:00",
            &alice,
        )
        .await;
    assert_eq!(ids_of(&q.body), window, "{:?}", q.body);

    // Another owner sees only its own job; an admin without a tenant sees every job.
    let bob = app.get("/v1/jobs", &token("bob", USER, None)).await;
    assert_eq!(ids_of(&bob.body), data.names(&["b1"]));
    let nobody = app.get("/v1/jobs", &token("mallory", USER, None)).await;
    assert_eq!(ids_of(&nobody.body), Vec::<String>::new());
    let admin = app
        .get("/v1/jobs?limit=500", &token("root", ADMIN, None))
        .await;
    let seen: HashSet<String> = ids_of(&admin.body).into_iter().collect();
    let every: HashSet<String> = data.ids.values().map(ToString::to_string).collect();
    assert_eq!(seen, every);
    let t1 = admin.body["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|j| j["id"] == data.ids["t1"].to_string())
        .unwrap();
    assert_eq!(t1["queue"], "acme:emails", "an admin sees broker names");

    // A tenant sees its namespace only, with the queue names it uses.
    let acme = token("alice", USER, Some("acme"));
    let t = app.get("/v1/jobs", &acme).await;
    assert_eq!(ids_of(&t.body), data.names(&["t1"]));
    assert_eq!(t.body["jobs"][0]["queue"], "emails");
    let t = app.get("/v1/jobs?queue=emails", &acme).await;
    assert_eq!(ids_of(&t.body), data.names(&["t1"]));
    let t = app
        .get("/v1/jobs", &token("boss", ADMIN, Some("acme")))
        .await;
    assert_eq!(ids_of(&t.body), data.names(&["t2", "t1"]));
    let other = app
        .get("/v1/jobs", &token("root", ADMIN, Some("globex")))
        .await;
    assert_eq!(ids_of(&other.body), Vec::<String>::new());
}

#[tokio::test]
async fn bad_parameters_are_400_naming_the_field() {
    let data = seed().await;
    let app = app_with(&data).await;
    let alice = token("alice", USER, None);
    for (query, field) in [
        ("limit=0", "limit"),
        ("limit=501", "limit"),
        ("limit=ten", "limit"),
        ("state=asleep", "state"),
        ("kind=no%20spaces", "kind"),
        ("created_after=soon", "created_after"),
        ("created_before=2023-13-01T00:00:00Z", "created_before"),
        ("cursor=not-a-cursor", "cursor"),
        ("queue=bad%20name", "queue"),
        ("queue=acme:emails", "queue"),
        ("colour=blue", "colour"),
    ] {
        let r = app.get(&format!("/v1/jobs?{query}"), &alice).await;
        is_problem(&r, 400, "bad-request");
        assert_eq!(r.field(), field, "{query}: {:?}", r.body);
    }
    let r = app.get("/v1/jobs?limit=0&state=asleep", &alice).await;
    is_problem(&r, 400, "bad-request");
    assert_eq!(
        r.body["errors"].as_array().unwrap().len(),
        2,
        "{:?}",
        r.body
    );
    assert_eq!(app.get("/v1/jobs?limit=500", &alice).await.status, 200);
}

#[tokio::test]
async fn pagination_returns_each_job_once() {
    let data = seed().await;
    let app = app_with(&data).await;
    let alice = token("alice", USER, None);
    let mut seen = Vec::new();
    let mut path = "/v1/jobs?limit=3".to_owned();
    for _ in 0..10 {
        let page = app.get(&path, &alice).await;
        assert_eq!(page.status, 200, "{:?}", page.body);
        let ids = ids_of(&page.body);
        assert!(ids.len() <= 3);
        seen.extend(ids);
        match page.body["next_cursor"].as_str() {
            Some(c) => path = format!("/v1/jobs?limit=3&cursor={c}"),
            None => break,
        }
    }
    assert_eq!(
        seen,
        data.names(&["a8", "a7", "a6", "a5", "a4", "a3", "a2", "a1"])
    );
    // Filters carry across pages.
    let first = app.get("/v1/jobs?limit=2&queue=bulk", &alice).await;
    let cursor = first.body["next_cursor"].as_str().unwrap();
    let second = app
        .get(
            &format!("/v1/jobs?limit=2&queue=bulk&cursor={cursor}"),
            &alice,
        )
        .await;
    assert_eq!(ids_of(&second.body), data.names(&["a6", "a5"]));
}

#[tokio::test]
async fn events_are_the_audit_trail_scoped_like_the_job() {
    let data = seed().await;
    let app = app_with(&data).await;
    let alice = token("alice", USER, None);
    let a1 = data.ids["a1"];
    let r = app.get(&format!("/v1/jobs/{a1}/events"), &alice).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(r.body["id"], a1.to_string());
    let ev = r.body["events"].as_array().unwrap();
    assert_eq!(ev.len(), 2, "{ev:?}");
    assert_eq!(ev[0]["type"], "job.queued");
    assert_eq!(ev[0]["state"], "queued");
    assert_eq!(ev[0]["attempt"], 0);
    assert_eq!(ev[0]["at"], T);
    assert_eq!(ev[0]["id"], format!("{T}-0/0"));
    assert_eq!(ev[0]["correlation_id"], format!("corr-{T}"));
    assert_eq!(ev[0]["actor"], "user:alice");
    assert!(ev[0]["data"].is_null());
    assert!(ev[0]["recorded_at"].as_u64().unwrap() >= T);
    assert_eq!(ev[1]["type"], "job.completed");
    assert_eq!(ev[1]["state"], "completed");
    assert_eq!(ev[1]["attempt"], 1);
    assert_eq!(ev[1]["actor"], "worker-1");
    assert_eq!(ev[1]["data"], json!({"result": "done"}));
    for key in [
        "id",
        "type",
        "state",
        "attempt",
        "at",
        "recorded_at",
        "correlation_id",
        "actor",
        "data",
    ] {
        assert!(ev[0].get(key).is_some(), "{key} missing");
    }

    let hidden = [token("bob", USER, None), token("alice", USER, Some("acme"))];
    for t in &hidden {
        let r = app.get(&format!("/v1/jobs/{a1}/events"), t).await;
        is_problem(&r, 404, "not-found");
    }
    let admin = app
        .get(
            &format!("/v1/jobs/{a1}/events"),
            &token("root", ADMIN, None),
        )
        .await;
    assert_eq!(admin.body["events"].as_array().unwrap().len(), 2);
    let r = app
        .get(&format!("/v1/jobs/{}/events", JobId::new()), &alice)
        .await;
    is_problem(&r, 404, "not-found");
    let r = app.get("/v1/jobs/nope/events", &alice).await;
    is_problem(&r, 400, "bad-request");
    let t1 = data.ids["t1"];
    let r = app
        .get(
            &format!("/v1/jobs/{t1}/events"),
            &token("alice", USER, Some("acme")),
        )
        .await;
    assert_eq!(r.body["events"].as_array().unwrap().len(), 2);
}

#[tokio::test]
async fn lookups_fall_back_to_the_store_when_redis_lost_the_job() {
    let redis = RedisServer::start().expect("redis-server starts");
    let broker = RedisBroker::connect(&[redis.url()], EngineConfig::default())
        .await
        .expect("connects");
    let data = seed().await;
    let store: Arc<dyn Store> = data.store.clone();
    let app = TestApp::start(Arc::new(broker), {
        let store = store.clone();
        move |c| c.store = Some(store)
    })
    .await;
    let alice = token("alice", USER, None);

    // Recorded in the store, never in Redis.
    let a1 = data.ids["a1"];
    let r = app.get(&format!("/v1/jobs/{a1}"), &alice).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(r.body["state"], "completed");
    assert_eq!(r.body["queue"], "emails");
    assert_eq!(r.body["kind"], "send");
    is_problem(
        &app.get(&format!("/v1/jobs/{a1}"), &token("bob", USER, None))
            .await,
        404,
        "not-found",
    );
    let t1 = data.ids["t1"];
    let r = app
        .get(
            &format!("/v1/jobs/{t1}"),
            &token("alice", USER, Some("acme")),
        )
        .await;
    assert_eq!(
        (r.status.as_u16(), &r.body["queue"]),
        (200, &json!("emails"))
    );
    is_problem(
        &app.get(&format!("/v1/jobs/{}", JobId::new()), &alice).await,
        404,
        "not-found",
    );

    // Live in Redis: Redis answers, even when the store has a (stale or different) record.
    let sub = app
        .post("/v1/queues/live/jobs", &alice, json!({"kind": "k"}))
        .await;
    assert_eq!(sub.status, 202, "{:?}", sub.body);
    let id: JobId = JobId::parse(sub.body["id"].as_str().unwrap()).unwrap();
    let r = app.get(&format!("/v1/jobs/{id}"), &alice).await;
    assert_eq!(r.body["state"], "queued");
    // Not recorded yet: the trail is empty but the job is visible to its owner (the broker knows it).
    let r = app.get(&format!("/v1/jobs/{id}/events"), &alice).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(r.body["events"], json!([]));
    is_problem(
        &app.get(&format!("/v1/jobs/{id}/events"), &token("bob", USER, None))
            .await,
        404,
        "not-found",
    );
    let fake = Seed {
        id,
        queue: "live",
        kind: "k",
        owner: "alice",
        tenant: None,
        created: T,
        then: Some((EventType::Completed, JobState::Completed)),
    };
    store.record(&events(&fake)).await.unwrap();
    let r = app.get(&format!("/v1/jobs/{id}"), &alice).await;
    assert_eq!(r.body["state"], "queued", "Redis is the live state");

    // Readiness checks both; metrics show both breakers.
    let ready = app.anon("/readyz").await;
    assert_eq!(ready.status, 200, "{:?}", ready.body);
    assert_eq!(ready.body["checks"]["redis"]["ok"], true);
    assert_eq!(ready.body["checks"]["postgres"]["ok"], true);
    let metrics = app.metrics().await;
    assert!(
        metrics.contains("ferry_breaker_state{dependency=\"postgres\"} 0"),
        "{metrics}"
    );
    assert!(
        metrics.contains("ferry_breaker_state{dependency=\"redis\"} 0"),
        "{metrics}"
    );
}
