//! The HTTP API against a real gateway on an ephemeral port, over real HTTP (reqwest): one gateway per test,
//! the memory engine unless the test is about Redis going away.

use std::sync::Arc;
use std::time::Duration;

use ferry_broker::prelude::*;
use ferry_broker::redis::RedisOptions;
use ferry_broker::{Completion, EngineConfig, MemoryBroker, RedisBroker};
use ferry_core::QueueName;
use ferry_testkit::RedisServer;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use crate::support::{Reply, SECRET, TestApp, token};

const USER: &str = "jobs:submit jobs:read jobs:cancel";

fn is_problem(r: &Reply, status: u16) {
    assert_eq!(r.status.as_u16(), status, "{:?}", r.body);
    assert_eq!(
        r.headers["content-type"], "application/problem+json",
        "{:?}",
        r.body
    );
    assert_eq!(r.body["status"], status);
}

#[tokio::test]
async fn submit_get_and_cancel_a_job() {
    let (app, _) = TestApp::memory().await;
    let alice = token("alice", USER, None);
    let r = app
        .client
        .post(format!("{}/v1/queues/emails/jobs", app.base))
        .bearer_auth(&alice)
        .header("x-request-id", "req-42")
        .json(
            &json!({"kind": "send", "payload": {"to": "x"}, "priority": "high", "max_attempts": 5}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    assert_eq!(r.headers()["x-request-id"], "req-42");
    let sub: Value = r.json().await.unwrap();
    assert_eq!(
        (sub["queue"].as_str(), sub["state"].as_str()),
        (Some("emails"), Some("queued"))
    );
    assert!(sub.get("duplicate").is_none());
    let id = sub["id"].as_str().unwrap().to_owned();

    let job = app.get(&format!("/v1/jobs/{id}"), &alice).await;
    assert_eq!(job.status, 200, "{:?}", job.body);
    let j = &job.body;
    assert_eq!(j["id"], id.as_str());
    assert_eq!(j["kind"], "send");
    assert_eq!(j["state"], "queued");
    assert_eq!(j["payload"], json!({"to": "x"}));
    assert_eq!(
        (j["attempts"].as_u64(), j["max_attempts"].as_u64()),
        (Some(0), Some(5))
    );
    assert!(
        j["created_at"].as_u64().unwrap() > 1_700_000_000_000,
        "ms since the epoch"
    );
    assert!(j["updated_at"].is_u64());
    assert!(j["result"].is_null() && j["error"].is_null());

    let c = app
        .send(
            Method::DELETE,
            &format!("/v1/jobs/{id}"),
            Some(&alice),
            None,
        )
        .await;
    assert_eq!(c.status, 200, "{:?}", c.body);
    assert_eq!(c.body["state"], "cancelled");
    let again = app
        .send(
            Method::DELETE,
            &format!("/v1/jobs/{id}"),
            Some(&alice),
            None,
        )
        .await;
    is_problem(&again, 409);
    let unknown = app
        .get("/v1/jobs/0190a5f4-0000-7000-8000-000000000000", &alice)
        .await;
    is_problem(&unknown, 404);
    let bad_id = app.get("/v1/jobs/not-a-uuid", &alice).await;
    is_problem(&bad_id, 400);
    assert_eq!(bad_id.field(), "id");
}

#[tokio::test]
async fn idempotent_submits_report_the_duplicate() {
    let (app, _) = TestApp::memory().await;
    let alice = token("alice", USER, None);
    let body = json!({"kind": "k", "idempotency_key": "once"});
    let a = app.post("/v1/queues/q/jobs", &alice, body.clone()).await;
    let b = app.post("/v1/queues/q/jobs", &alice, body).await;
    assert_eq!(
        (a.status, b.status),
        (StatusCode::ACCEPTED, StatusCode::ACCEPTED)
    );
    assert_eq!(a.body["id"], b.body["id"]);
    assert_eq!(b.body["duplicate"], true);
}

/// Two subjects of one tenant using the same idempotency key: each gets their own job, and neither learns the
/// other's id, whoever submits first; on both engines.
#[tokio::test]
async fn idempotency_keys_are_per_subject() {
    let redis = RedisServer::start().expect("redis-server starts");
    let on_redis = RedisBroker::connect(&[redis.url()], EngineConfig::default())
        .await
        .expect("connects");
    let engines: [Arc<dyn Broker>; 2] = [
        Arc::new(MemoryBroker::new(EngineConfig::default())),
        Arc::new(on_redis),
    ];
    for broker in engines {
        let app = TestApp::start(broker, |_| {}).await;
        let alice = token("alice", USER, Some("acme"));
        let bob = token("bob", USER, Some("acme"));
        let once = json!({"kind": "k", "idempotency_key": "order-42"});
        let submit = |t: String| {
            let (app, once) = (&app, once.clone());
            async move { app.post("/v1/queues/q/jobs", &t, once).await }
        };

        // Bob first: alice's submit must create her job, not hand her bob's id.
        let by_bob = submit(bob.clone()).await;
        let by_alice = submit(alice.clone()).await;
        for r in [&by_bob, &by_alice] {
            assert_eq!(r.status, StatusCode::ACCEPTED, "{:?}", r.body);
            assert!(r.body.get("duplicate").is_none(), "{:?}", r.body);
        }
        assert_ne!(by_alice.body["id"], by_bob.body["id"]);
        let id = by_alice.body["id"].as_str().unwrap();
        let got = app.get(&format!("/v1/jobs/{id}"), &alice).await;
        assert_eq!(got.status, StatusCode::OK, "{:?}", got.body);
        // Bob's reuse (also in a batch) is his own duplicate: it never names alice's job.
        let again = submit(bob.clone()).await;
        assert_eq!(again.body["id"], by_bob.body["id"]);
        assert_eq!(again.body["duplicate"], true);
        let batch = app
            .post(
                "/v1/queues/q/jobs/batch",
                &bob,
                json!({"jobs": [once.clone()]}),
            )
            .await;
        assert_eq!(
            batch.body["ids"],
            json!([by_bob.body["id"]]),
            "{:?}",
            batch.body
        );
        let again = submit(alice.clone()).await;
        assert_eq!(again.body["id"], by_alice.body["id"]);
        assert_eq!(again.body["duplicate"], true);
    }
}

#[tokio::test]
async fn batch_submit_with_its_limits() {
    let broker = Arc::new(MemoryBroker::new(EngineConfig::default()));
    let app = TestApp::start(broker, |c| c.limits.max_batch = 3).await;
    let alice = token("alice", USER, None);
    let jobs = json!({"jobs": [{"kind": "a"}, {"kind": "b", "payload": 1}, {"kind": "c"}]});
    let r = app.post("/v1/queues/q/jobs/batch", &alice, jobs).await;
    assert_eq!(r.status, 202, "{:?}", r.body);
    let ids = r.body["ids"].as_array().unwrap();
    assert_eq!(ids.len(), 3);
    let second = app
        .get(&format!("/v1/jobs/{}", ids[1].as_str().unwrap()), &alice)
        .await;
    assert_eq!(second.body["kind"], "b", "ids keep input order");

    let four = json!({"jobs": [{"kind": "a"}, {"kind": "a"}, {"kind": "a"}, {"kind": "a"}]});
    let r = app.post("/v1/queues/q/jobs/batch", &alice, four).await;
    is_problem(&r, 400);
    assert_eq!(r.field(), "jobs");
    let r = app
        .post(
            "/v1/queues/q/jobs/batch",
            &alice,
            json!({"jobs": [{"kind": "a"}, {"kind": "no good"}]}),
        )
        .await;
    is_problem(&r, 400);
    assert_eq!(r.field(), "jobs[1].kind");
    let r = app
        .post(
            "/v1/queues/q/jobs/batch",
            &alice,
            json!({"jobs": [{"kind": "a", "max_attempts": 0}]}),
        )
        .await;
    assert_eq!(r.field(), "jobs[0].max_attempts");
}

#[tokio::test]
async fn bad_requests_name_the_field() {
    let (app, _) = TestApp::memory().await;
    let alice = token("alice", USER, None);
    let r = app
        .raw_post("/v1/queues/q/jobs", &alice, "{\"kind\": ")
        .await;
    is_problem(&r, 400);
    assert_eq!(r.field(), "body");
    let r = app
        .post(
            "/v1/queues/q/jobs",
            &alice,
            json!({"kind": "k", "colour": "red"}),
        )
        .await;
    is_problem(&r, 400);
    assert_eq!(r.field(), "colour");
    let r = app
        .post(
            "/v1/queues/q/jobs",
            &alice,
            json!({"kind": "k", "owner": "mallory"}),
        )
        .await;
    assert_eq!(
        (r.status.as_u16(), r.field()),
        (400, "owner"),
        "owner is set by the gateway"
    );
    let r = app
        .post("/v1/queues/q/jobs", &alice, json!({"payload": {}}))
        .await;
    assert_eq!(r.field(), "kind");
    let r = app
        .post(
            "/v1/queues/q/jobs",
            &alice,
            json!({"kind": "k", "delay_ms": "soon"}),
        )
        .await;
    assert_eq!(r.field(), "delay_ms");
    let r = app
        .post("/v1/queues/bad%20name/jobs", &alice, json!({"kind": "k"}))
        .await;
    is_problem(&r, 400);
    assert_eq!(r.field(), "queue");
    let r = app
        .post("/v1/queues/someone:else/jobs", &alice, json!({"kind": "k"}))
        .await;
    assert_eq!(
        (r.status.as_u16(), r.field()),
        (400, "queue"),
        "':' is reserved for tenants"
    );
}

#[tokio::test]
async fn tokens_are_required_valid_and_scoped() {
    let (app, _) = TestApp::memory().await;
    let body = json!({"kind": "k"});
    let r = app
        .send(Method::POST, "/v1/queues/q/jobs", None, Some(&body))
        .await;
    is_problem(&r, 401);
    assert_eq!(r.headers["www-authenticate"], "Bearer");
    let r = app
        .post("/v1/queues/q/jobs", "not.a.token", body.clone())
        .await;
    is_problem(&r, 401);
    let expired = jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &json!({"sub": "alice", "scope": USER, "exp": ferry_core::now_ms() / 1000 - 3600}),
        &jsonwebtoken::EncodingKey::from_secret(SECRET).unwrap(),
    )
    .unwrap();
    let r = app.post("/v1/queues/q/jobs", &expired, body.clone()).await;
    is_problem(&r, 401);
    let reader = token("alice", "jobs:read", None);
    let r = app.post("/v1/queues/q/jobs", &reader, body).await;
    is_problem(&r, 403);
    assert!(r.body["detail"].as_str().unwrap().contains("jobs:submit"));
}

#[tokio::test]
async fn other_peoples_jobs_are_not_found() {
    let (app, _) = TestApp::memory().await;
    let alice = token("alice", USER, Some("acme"));
    let id = app
        .post("/v1/queues/q/jobs", &alice, json!({"kind": "k"}))
        .await
        .body["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let path = format!("/v1/jobs/{id}");
    for other in [
        token("bob", USER, Some("acme")),
        token("alice", USER, Some("globex")),
        token("alice", USER, None),
    ] {
        is_problem(&app.get(&path, &other).await, 404);
        is_problem(
            &app.send(Method::DELETE, &path, Some(&other), None).await,
            404,
        );
    }
    let admin = token("root", "admin", Some("acme"));
    let r = app.get(&path, &admin).await;
    assert_eq!(
        (r.status.as_u16(), r.body["queue"].as_str()),
        (200, Some("q"))
    );
    let global = token("root", "admin", None);
    assert_eq!(app.get(&path, &global).await.body["queue"], "acme:q");
}

#[tokio::test]
async fn cancelling_a_completed_job_conflicts() {
    let (app, broker) = TestApp::memory().await;
    let alice = token("alice", USER, None);
    let id = app
        .post("/v1/queues/work/jobs", &alice, json!({"kind": "k"}))
        .await
        .body["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let q = QueueName::parse("work").unwrap();
    let leased = broker
        .claim(&q, "w1", 1, Duration::from_secs(1))
        .await
        .unwrap();
    assert_eq!(leased.len(), 1);
    let done = broker
        .complete(vec![Completion {
            lease: leased[0].lease.clone(),
            result: json!({"sent": true}),
        }])
        .await
        .unwrap();
    assert!(done[0].is_ok());
    let job = app.get(&format!("/v1/jobs/{id}"), &alice).await;
    assert_eq!(
        (job.body["state"].as_str(), &job.body["result"]),
        (Some("completed"), &json!({"sent": true}))
    );
    let r = app
        .send(
            Method::DELETE,
            &format!("/v1/jobs/{id}"),
            Some(&alice),
            None,
        )
        .await;
    is_problem(&r, 409);
}

#[tokio::test]
async fn bodies_over_the_limit_are_413() {
    let broker = Arc::new(MemoryBroker::new(EngineConfig::default()));
    let app = TestApp::start(broker, |c| c.limits.max_body_bytes = 1024).await;
    let alice = token("alice", USER, None);
    let big = json!({"kind": "k", "payload": "x".repeat(2048)});
    let r = app.post("/v1/queues/q/jobs", &alice, big).await;
    is_problem(&r, 413);
    let small = json!({"kind": "k", "payload": "x".repeat(100)});
    assert_eq!(
        app.post("/v1/queues/q/jobs", &alice, small).await.status,
        202
    );
}

#[tokio::test]
async fn a_burst_over_the_rate_is_429_with_retry_after() {
    let broker = Arc::new(MemoryBroker::new(EngineConfig::default()));
    let app = TestApp::start(broker, |c| {
        c.limits.http_rate_per_sec = 1;
        c.limits.http_burst = 3;
    })
    .await;
    let alice = token("alice", USER, None);
    for _ in 0..3 {
        assert_eq!(
            app.get("/v1/queues/q", &token("x", "queues:read", None))
                .await
                .status,
            200
        );
    }
    for _ in 0..3 {
        assert_eq!(
            app.post("/v1/queues/q/jobs", &alice, json!({"kind": "k"}))
                .await
                .status,
            202
        );
    }
    let r = app
        .post("/v1/queues/q/jobs", &alice, json!({"kind": "k"}))
        .await;
    is_problem(&r, 429);
    let secs: u64 = r.headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=2).contains(&secs), "{secs}");
    // Health routes are not rate limited.
    assert_eq!(
        app.send(Method::GET, "/healthz", None, None).await.status,
        200
    );
}

#[tokio::test]
async fn queues_stats_pause_resume_dead_and_retry() {
    let (app, broker) = TestApp::memory().await;
    let alice = token("alice", USER, Some("acme"));
    let ops = token("ops", "queues:read queues:admin", Some("acme"));
    let other = token("eve", "queues:read queues:admin", Some("globex"));
    let sub = app
        .post(
            "/v1/queues/mail/jobs",
            &alice,
            json!({"kind": "k", "max_attempts": 1}),
        )
        .await;
    let id = sub.body["id"].as_str().unwrap().to_owned();
    app.post("/v1/queues/mail/jobs", &alice, json!({"kind": "k"}))
        .await;

    let list = app.get("/v1/queues", &ops).await;
    assert_eq!(list.status, 200, "{:?}", list.body);
    assert_eq!(list.body["queues"][0]["queue"], "mail");
    assert_eq!(list.body["queues"][0]["depth"], 2);
    assert_eq!(
        app.get("/v1/queues", &other).await.body["queues"],
        json!([])
    );
    is_problem(&app.get("/v1/queues", &alice).await, 403);

    let r = app.post("/v1/queues/mail/pause", &ops, json!(null)).await;
    assert_eq!((r.status.as_u16(), &r.body["paused"]), (200, &json!(true)));
    assert_eq!(app.get("/v1/queues/mail", &ops).await.body["paused"], true);
    assert_eq!(
        app.get("/v1/queues/mail", &other).await.body["paused"],
        false
    );
    app.post("/v1/queues/mail/resume", &ops, json!(null)).await;
    assert_eq!(app.get("/v1/queues/mail", &ops).await.body["paused"], false);

    // Kill the first job: one attempt, failed permanently.
    let q = QueueName::parse("acme:mail").unwrap();
    let leased = broker
        .claim(&q, "w", 1, Duration::from_secs(1))
        .await
        .unwrap();
    broker
        .fail(vec![ferry_broker::Failure {
            lease: leased[0].lease.clone(),
            error: "boom".into(),
            retry: ferry_broker::Retry::Never,
        }])
        .await
        .unwrap();
    let dead = app.get("/v1/queues/mail/dead", &ops).await;
    assert_eq!(dead.status, 200, "{:?}", dead.body);
    assert_eq!(dead.body["jobs"][0]["id"], id.as_str());
    assert_eq!(dead.body["jobs"][0]["error"], "boom");
    is_problem(
        &app.post(&format!("/v1/jobs/{id}/retry"), &other, json!(null))
            .await,
        404,
    );
    let r = app
        .post(&format!("/v1/jobs/{id}/retry"), &ops, json!(null))
        .await;
    assert_eq!(r.status, 202, "{:?}", r.body);
    is_problem(
        &app.post(&format!("/v1/jobs/{id}/retry"), &ops, json!(null))
            .await,
        409,
    );
    assert_eq!(
        app.get(&format!("/v1/jobs/{id}"), &alice).await.body["state"],
        "queued"
    );
}

#[tokio::test]
async fn health_openapi_and_metrics() {
    let (app, _) = TestApp::memory().await;
    let h = app.send(Method::GET, "/healthz", None, None).await;
    assert_eq!((h.status.as_u16(), &h.body), (200, &json!("ok")));
    let r = app.send(Method::GET, "/readyz", None, None).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body["status"], "ready");
    assert_eq!(r.body["checks"]["redis"]["ok"], true);
    assert!(r.body["checks"]["redis"]["error"].is_null());
    assert!(
        r.body["checks"].get("postgres").is_none(),
        "no store configured"
    );

    let doc = app.send(Method::GET, "/v1/openapi.json", None, None).await;
    assert_eq!(doc.status, 200);
    assert!(doc.body["openapi"].as_str().unwrap().starts_with("3.1"));
    let paths = doc.body["paths"].as_object().unwrap();
    for p in [
        "/healthz",
        "/readyz",
        "/metrics",
        "/v1/openapi.json",
        "/v1/queues",
        "/v1/queues/{queue}",
        "/v1/queues/{queue}/jobs",
        "/v1/queues/{queue}/jobs/batch",
        "/v1/queues/{queue}/pause",
        "/v1/queues/{queue}/resume",
        "/v1/queues/{queue}/dead",
        "/v1/jobs",
        "/v1/jobs/{id}",
        "/v1/jobs/{id}/events",
        "/v1/jobs/{id}/retry",
        "/v1/channels/{channel}/publish",
        "/v1/ws",
    ] {
        assert!(
            paths.contains_key(p),
            "{p} missing from the OpenAPI document"
        );
    }
    assert!(paths["/v1/jobs/{id}"].get("delete").is_some());

    is_problem(&app.send(Method::GET, "/v1/nothing", None, None).await, 404);
    // Two accepted jobs and a duplicate (not counted), on a tenant's queue: counted by broker queue.
    let acme = token("alice", USER, Some("acme"));
    let once = json!({"kind": "k", "idempotency_key": "m1"});
    for body in [json!({"kind": "k"}), once.clone(), once] {
        assert_eq!(
            app.post("/v1/queues/mq/jobs", &acme, body).await.status,
            202
        );
    }
    let m = app.send(Method::GET, "/metrics", None, None).await;
    let text = m.body.as_str().unwrap();
    assert!(
        text.contains(
            "ferry_http_requests_total{method=\"GET\",route=\"/healthz\",status=\"200\"} 1"
        ),
        "{text}"
    );
    assert!(
        text.contains("route=\"unmatched\",status=\"404\""),
        "{text}"
    );
    for name in [
        "ferry_http_request_duration_seconds_bucket{method=\"GET\",route=\"/healthz\",le=",
        "ferry_http_request_duration_seconds_count{method=\"GET\",route=\"/healthz\"} 1",
        "process_resident_memory_bytes",
        "process_cpu_seconds_total",
        "ferry_tokio_workers",
        "ferry_build_info{version=",
        "ferry_ws_connections 0",
        "ferry_ws_connections_max",
        "ferry_breaker_state{dependency=\"redis\"} 0",
        "ferry_jobs_enqueued_total{queue=\"acme:mq\"} 2",
        "ferry_dependency_call_seconds_count{dependency=\"redis\"} 3",
    ] {
        assert!(text.contains(name), "{name} missing:\n{text}");
    }
}

#[tokio::test]
async fn redis_down_is_503_with_retry_after() {
    let mut redis = RedisServer::start().expect("redis-server starts");
    let options = RedisOptions {
        response_timeout: Duration::from_millis(500),
        connection_timeout: Duration::from_millis(300),
        cluster_vshards: None,
    };
    let broker = RedisBroker::connect_with(&[redis.url()], EngineConfig::default(), options)
        .await
        .expect("connects");
    let app = TestApp::start(Arc::new(broker), |_| {}).await;
    let alice = token("alice", USER, None);
    assert_eq!(
        app.post("/v1/queues/q/jobs", &alice, json!({"kind": "k"}))
            .await
            .status,
        202
    );
    assert_eq!(
        app.send(Method::GET, "/readyz", None, None).await.status,
        200
    );

    redis.kill();
    let r = app
        .post("/v1/queues/q/jobs", &alice, json!({"kind": "k"}))
        .await;
    is_problem(&r, 503);
    assert!(r.headers.contains_key("retry-after"));
    assert!(
        !r.body["detail"].as_str().unwrap().contains("127.0.0.1"),
        "no internals"
    );
    let ready = app.send(Method::GET, "/readyz", None, None).await;
    assert_eq!(ready.status, 503);
    assert_eq!(ready.body["status"], "unready");
    assert_eq!(ready.body["checks"]["redis"]["ok"], false);
    assert!(ready.headers.contains_key("retry-after"));
}

#[tokio::test]
async fn publish_to_an_app_channel() {
    let (app, _) = TestApp::memory().await;
    let publisher = token("svc", "publish", Some("acme"));
    let r = app
        .post(
            "/v1/channels/chat/publish",
            &publisher,
            json!({"text": "hi"}),
        )
        .await;
    assert_eq!(r.status, 202, "{:?}", r.body);
    let r = app
        .post("/v1/channels/no%20good/publish", &publisher, json!(1))
        .await;
    is_problem(&r, 400);
    assert_eq!(r.field(), "channel");
    let r = app
        .post(
            "/v1/channels/chat/publish",
            &token("svc", USER, None),
            json!(1),
        )
        .await;
    is_problem(&r, 403);
}

/// CORS: with an allowed origin a preflight is answered before authentication, naming the headers the API reads
/// and the methods it serves, and real answers carry `Access-Control-Allow-Origin`; another origin gets none.
#[tokio::test]
async fn cors_preflight_for_allowed_origins_only() {
    let page = "http://127.0.0.1:5173";
    let broker = Arc::new(MemoryBroker::new(EngineConfig::default()));
    let app = TestApp::start(broker, |c| c.cors_origin = vec![page.to_owned()]).await;
    let preflight = |origin: &str| {
        app.client
            .request(
                Method::OPTIONS,
                format!("{}/v1/queues/emails/jobs", app.base),
            )
            .header("origin", origin)
            .header("access-control-request-method", "POST")
            .header(
                "access-control-request-headers",
                "authorization,content-type,x-request-id",
            )
            .send()
    };
    let res = preflight(page).await.unwrap();
    assert!(res.status().is_success(), "{}", res.status());
    let h = res.headers();
    assert_eq!(h["access-control-allow-origin"], page);
    let allowed = h["access-control-allow-headers"]
        .to_str()
        .unwrap()
        .to_owned();
    for name in ["authorization", "content-type", "x-request-id"] {
        assert!(allowed.contains(name), "{name} not in {allowed}");
    }
    let methods = h["access-control-allow-methods"]
        .to_str()
        .unwrap()
        .to_owned();
    for m in ["GET", "POST", "DELETE"] {
        assert!(methods.contains(m), "{m} not in {methods}");
    }
    // Another origin: no grant.
    let res = preflight("http://evil.example").await.unwrap();
    assert!(res.headers().get("access-control-allow-origin").is_none());
    // A real request from the page's origin carries the grant (an unauthenticated one too, so the page can
    // read the problem).
    let res = app
        .client
        .get(format!("{}/v1/queues", app.base))
        .header("origin", page)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 401);
    assert_eq!(res.headers()["access-control-allow-origin"], page);

    // `*`: any origin.
    let broker = Arc::new(MemoryBroker::new(EngineConfig::default()));
    let any = TestApp::start(broker, |c| c.cors_origin = vec!["*".to_owned()]).await;
    let res = any
        .client
        .get(format!("{}/healthz", any.base))
        .header("origin", "http://evil.example")
        .send()
        .await
        .unwrap();
    assert_eq!(res.headers()["access-control-allow-origin"], "*");
}

/// No CORS origin configured (the default): no CORS headers, preflight or not.
#[tokio::test]
async fn no_cors_headers_by_default() {
    let (app, _) = TestApp::memory().await;
    let res = app
        .client
        .request(
            Method::OPTIONS,
            format!("{}/v1/queues/emails/jobs", app.base),
        )
        .header("origin", "http://127.0.0.1:5173")
        .header("access-control-request-method", "POST")
        .header("access-control-request-headers", "authorization")
        .send()
        .await
        .unwrap();
    let cors: Vec<_> = res
        .headers()
        .keys()
        .filter(|k| k.as_str().starts_with("access-control-"))
        .collect();
    assert!(cors.is_empty(), "{cors:?}");
    let res = app
        .client
        .get(format!("{}/healthz", app.base))
        .header("origin", "http://127.0.0.1:5173")
        .send()
        .await
        .unwrap();
    assert!(res.headers().get("access-control-allow-origin").is_none());
}

/// The dashboard's embedded assets: each with its content type, the strict CSP, `nosniff` and an `ETag` that
/// revalidates; `/ui` and `/ui/` are the page; anything else under `/ui/` is a 404 problem, and no token is asked.
#[tokio::test]
async fn dashboard_assets_are_served_with_types_and_csp() {
    let (app, _) = TestApp::memory().await;
    for (path, content_type) in [
        ("/ui", "text/html; charset=utf-8"),
        ("/ui/", "text/html; charset=utf-8"),
        ("/ui/index.html", "text/html; charset=utf-8"),
        ("/ui/app.js", "text/javascript; charset=utf-8"),
        ("/ui/api.js", "text/javascript; charset=utf-8"),
        ("/ui/dom.js", "text/javascript; charset=utf-8"),
        ("/ui/app.css", "text/css; charset=utf-8"),
    ] {
        let r = app.anon(path).await;
        assert_eq!(r.status, 200, "{path}");
        assert_eq!(r.headers["content-type"], content_type, "{path}");
        assert_eq!(
            r.headers["content-security-policy"],
            ferry_gateway::ui::CSP,
            "{path}"
        );
        let csp = r.headers["content-security-policy"].to_str().unwrap();
        for directive in [
            "default-src 'none'",
            "script-src 'self'",
            "style-src 'self'",
            "connect-src 'self'",
            "frame-ancestors 'none'",
        ] {
            assert!(csp.contains(directive), "{path}: {csp}");
        }
        assert!(!csp.contains("unsafe"), "{path}: {csp}");
        assert_eq!(r.headers["x-content-type-options"], "nosniff", "{path}");
        assert_eq!(r.headers["cache-control"], "no-cache", "{path}");
        let etag = r.headers["etag"].clone();
        let again = app
            .client
            .get(format!("{}{path}", app.base))
            .header("if-none-match", etag)
            .send()
            .await
            .unwrap();
        assert_eq!(again.status(), 304, "{path}");
    }
    let page = app.anon("/ui/").await;
    let html = page.body.as_str().unwrap();
    assert!(html.contains(r#"<script type="module" src="/ui/app.js">"#));
    for path in ["/ui/nope.js", "/ui/../Cargo.toml", "/ui/app.js/x"] {
        let r = app.anon(path).await;
        is_problem(&r, 404);
    }
    let r = app.send(Method::POST, "/ui/app.js", None, None).await;
    is_problem(&r, 405);
}
