//! The gateway when a dependency is not there or the recorder falls behind: a real redis-server stopped and
//! started again under a running gateway, and load shedding on the event-log backlog.

use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_broker::{Broker, EngineConfig, MemoryBroker, RedisBroker, RedisOptions};
use ferry_core::breaker::BreakerConfig;
use ferry_testkit::faulty::{FaultyBroker, Method};
use ferry_testkit::{RedisServer, eventually};
use serde_json::json;

use crate::support::{TestApp, USER, is_problem, switched, token, ws_call};

/// Generous: the test machine may be compiling on every core.
const RECOVERY: Duration = Duration::from_secs(20);

#[tokio::test]
async fn redis_stopped_answers_503_within_the_timeout_and_recovers_by_itself() {
    let mut redis = RedisServer::start().expect("redis-server starts");
    let broker = RedisBroker::connect(&[redis.url()], EngineConfig::default())
        .await
        .expect("connects");
    let app = TestApp::start(Arc::new(broker), |c| {
        c.resilience.broker_timeout = Duration::from_secs(1);
        c.resilience.broker_breaker = BreakerConfig {
            failure_threshold: 3,
            open_for: Duration::from_secs(1),
            half_open_probes: 1,
        };
    })
    .await;
    let alice = token("alice", USER, None);
    let ok = app
        .post("/v1/queues/q/jobs", &alice, json!({"kind": "k"}))
        .await;
    assert_eq!(ok.status, 202, "{:?}", ok.body);
    let id = ok.body["id"].as_str().unwrap().to_owned();
    let ready = app.anon("/readyz").await;
    assert_eq!(ready.status, 200, "{:?}", ready.body);
    assert_eq!(ready.body["status"], "ready");
    assert_eq!(ready.body["checks"]["redis"]["ok"], true);
    assert!(ready.body["checks"]["redis"]["ms"].is_u64());
    assert!(ready.body["checks"].get("postgres").is_none());
    let mut ws = app.ws(&alice).await;

    redis.stop().expect("redis-server stops");

    // Every kind of call is answered 503, never left hanging, until the breaker opens and after. Answered at
    // all is the point: the test client gives up after 20 s, so a call left hanging fails the test. How fast
    // an answer comes is not asserted here (a loaded CI machine stretches any bound); the cut-off at the
    // timeout is `a_redis_that_does_not_answer_is_cut_off_at_the_broker_timeout`.
    for _ in 0..4 {
        let r = app
            .post("/v1/queues/q/jobs", &alice, json!({"kind": "k"}))
            .await;
        is_problem(&r, 503, "unavailable");
        assert!(r.retry_after().is_some_and(|s| s >= 1), "{:?}", r.headers);
        assert!(!r.body["detail"].as_str().unwrap().contains("127.0.0.1"));
    }
    let r = app.get(&format!("/v1/jobs/{id}"), &alice).await;
    is_problem(&r, 503, "unavailable");
    let r = app.delete(&format!("/v1/jobs/{id}"), &alice).await;
    is_problem(&r, 503, "unavailable");
    let ready = app.anon("/readyz").await;
    assert_eq!(ready.status, 503, "{:?}", ready.body);
    assert_eq!(ready.body["status"], "unready");
    assert_eq!(ready.body["checks"]["redis"]["ok"], false);
    assert!(ready.body["checks"]["redis"]["error"].is_string());
    assert!(ready.headers.contains_key("retry-after"));
    // `ws_call` waits 15 s for the reply: a submit left hanging fails there.
    let frame = ws_call(
        &mut ws,
        json!({"id": "s1", "op": "submit", "queue": "q", "job": {"kind": "k"}}),
    )
    .await;
    assert_eq!(frame["ok"], false, "{frame}");
    assert_eq!(frame["error"]["code"], "unavailable", "{frame}");
    assert!(frame["error"]["message"].is_string());
    let metrics = app.metrics().await;
    assert!(
        metrics.contains("ferry_breaker_opened_total{dependency=\"redis\"} ")
            && !metrics.contains("ferry_breaker_opened_total{dependency=\"redis\"} 0"),
        "{metrics}"
    );
    assert!(
        metrics.contains("# TYPE ferry_breaker_state gauge"),
        "{metrics}"
    );

    redis.restart().expect("redis-server starts again");

    let submitted = eventually(RECOVERY, "submissions recover", || async {
        let r = app
            .post("/v1/queues/q/jobs", &alice, json!({"kind": "k"}))
            .await;
        Ok((r.status == 202).then_some(r))
    })
    .await
    .unwrap();
    assert_eq!(submitted.body["state"], "queued");
    eventually(RECOVERY, "readiness recovers", || async {
        let r = app.anon("/readyz").await;
        Ok((r.status == 200).then_some(()))
    })
    .await
    .unwrap();
    // The job submitted before the outage survived the graceful stop (append-only file).
    assert_eq!(app.get(&format!("/v1/jobs/{id}"), &alice).await.status, 200);
    let metrics = app.metrics().await;
    assert!(
        metrics.contains("ferry_breaker_state{dependency=\"redis\"} 0"),
        "{metrics}"
    );
    let frame = ws_call(
        &mut ws,
        json!({"id": "s2", "op": "submit", "queue": "q", "job": {"kind": "k"}}),
    )
    .await;
    assert_eq!(frame["ok"], true, "{frame}");
}

#[tokio::test]
async fn a_backlog_above_the_high_water_mark_sheds_submissions_only() {
    let broker = switched(Arc::new(MemoryBroker::new(EngineConfig::default())));
    let app = TestApp::start(broker.clone(), |c| {
        c.resilience.backlog_poll = Duration::from_millis(50);
        c.resilience.backlog_high_water = Some(1000);
    })
    .await;
    let alice = token("alice", USER, None);
    let before = app
        .post("/v1/queues/q/jobs", &alice, json!({"kind": "k"}))
        .await;
    assert_eq!(before.status, 202);
    let id = before.body["id"].as_str().unwrap().to_owned();
    let mut ws = app.ws(&alice).await;

    // At the mark is still fine, once the gateway has seen it.
    broker.set_backlog(Some(1000));
    backlog_polled(&broker).await;
    assert_eq!(
        app.post("/v1/queues/q/jobs", &alice, json!({"kind": "k"}))
            .await
            .status,
        202
    );

    broker.set_backlog(Some(1001));
    let shed = eventually(RECOVERY, "shedding starts", || async {
        let r = app
            .post("/v1/queues/q/jobs", &alice, json!({"kind": "k"}))
            .await;
        Ok((r.status == 503).then_some(r))
    })
    .await
    .unwrap();
    is_problem(&shed, 503, "overloaded");
    assert!(shed.retry_after().is_some_and(|s| s >= 1));
    let detail = shed.body["detail"].as_str().unwrap();
    assert!(
        detail.contains("1001") && detail.contains("1000"),
        "{detail}"
    );
    let batch = app
        .post(
            "/v1/queues/q/jobs/batch",
            &alice,
            json!({"jobs": [{"kind": "k"}]}),
        )
        .await;
    is_problem(&batch, 503, "overloaded");
    let frame = ws_call(
        &mut ws,
        json!({"id": "s", "op": "submit", "queue": "q", "job": {"kind": "k"}}),
    )
    .await;
    assert_eq!(frame["error"]["code"], "overloaded", "{frame}");

    // Everything else still works.
    let job = app.get(&format!("/v1/jobs/{id}"), &alice).await;
    assert_eq!(job.status, 200, "{:?}", job.body);
    let frame = ws_call(
        &mut ws,
        json!({"id": "sub", "op": "subscribe", "channel": format!("job:{id}")}),
    )
    .await;
    assert_eq!(frame["ok"], true, "{frame}");
    let cancel = app.delete(&format!("/v1/jobs/{id}"), &alice).await;
    assert_eq!(cancel.status, 200, "{:?}", cancel.body);
    let metrics = app.metrics().await;
    assert!(metrics.contains("ferry_event_backlog 1001"), "{metrics}");
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("ferry_submissions_shed_total ")
                && l != "ferry_submissions_shed_total 0"),
        "{metrics}"
    );

    broker.set_backlog(Some(10));
    eventually(RECOVERY, "shedding stops", || async {
        let r = app
            .post("/v1/queues/q/jobs", &alice, json!({"kind": "k"}))
            .await;
        Ok((r.status == 202).then_some(()))
    })
    .await
    .unwrap();
    let frame = ws_call(
        &mut ws,
        json!({"id": "s2", "op": "submit", "queue": "q", "job": {"kind": "k"}}),
    )
    .await;
    assert_eq!(frame["ok"], true, "{frame}");
}

#[tokio::test]
async fn shedding_can_be_disabled() {
    let broker = switched(Arc::new(MemoryBroker::new(EngineConfig::default())));
    broker.set_backlog(Some(u64::MAX));
    let inner: Arc<dyn Broker> = broker.clone();
    let app = TestApp::start(inner, |c| {
        c.resilience.backlog_poll = Duration::from_millis(20);
        c.resilience.backlog_high_water = None;
    })
    .await;
    let alice = token("alice", USER, None);
    let r = app
        .post("/v1/queues/q/jobs", &alice, json!({"kind": "k"}))
        .await;
    assert_eq!(r.status, 202, "{:?}", r.body);
    // Not by luck of timing: with no high-water mark the gateway never asks for the backlog at all.
    assert_eq!(broker.calls(Method::LogBacklog), 0);
}

#[tokio::test]
async fn a_redis_that_does_not_answer_is_cut_off_at_the_broker_timeout() {
    let redis = RedisServer::start().expect("redis-server starts");
    // The engine itself waits a minute for a reply, longer than the test client (20 s): an answer to a call
    // Redis never replied to can only come from the gateway's own timeout.
    let options = RedisOptions {
        response_timeout: Duration::from_secs(60),
        ..RedisOptions::default()
    };
    let broker = RedisBroker::connect_with(&[redis.url()], EngineConfig::default(), options)
        .await
        .expect("connects");
    let app = TestApp::start(Arc::new(broker), |c| {
        c.resilience.broker_timeout = Duration::from_millis(500);
    })
    .await;
    let alice = token("alice", USER, None);
    assert_eq!(
        app.post("/v1/queues/q/jobs", &alice, json!({"kind": "k"}))
            .await
            .status,
        202
    );
    // Redis stops answering: the process is frozen (SIGSTOP), its connections stay up, nothing is refused,
    // and it stays so until the checks below are done, however long a loaded machine takes over them.
    let frozen = Frozen::new(redis.pid().expect("redis-server runs"));
    let r = app
        .post("/v1/queues/q/jobs", &alice, json!({"kind": "k"}))
        .await;
    is_problem(&r, 503, "unavailable");
    assert!(r.retry_after().is_some_and(|s| s >= 1));
    let ready = app.anon("/readyz").await;
    assert_eq!(ready.status, 503, "{:?}", ready.body);
    // The check failed at the gateway's timeout, not the engine's.
    assert!(
        ready.body["checks"]["redis"]["error"]
            .as_str()
            .unwrap()
            .contains("500 ms"),
        "{:?}",
        ready.body
    );
    drop(frozen);
    eventually(RECOVERY, "submissions recover after the pause", || async {
        let r = app
            .post("/v1/queues/q/jobs", &alice, json!({"kind": "k"}))
            .await;
        Ok((r.status == 202).then_some(()))
    })
    .await
    .unwrap();
}

/// Waits until the gateway has polled the backlog twice more: the second poll starts only after the first
/// was applied, so the gateway acts on what the broker reports now.
async fn backlog_polled(broker: &FaultyBroker) {
    let polls = broker.calls(Method::LogBacklog);
    eventually(RECOVERY, "two more backlog polls", || async {
        Ok((broker.calls(Method::LogBacklog) >= polls + 2).then_some(()))
    })
    .await
    .unwrap();
}

/// A process stopped with SIGSTOP until this is dropped (SIGCONT), so a failing test does not leave it frozen.
struct Frozen(String);

impl Frozen {
    fn new(pid: u32) -> Self {
        let pid = pid.to_string();
        let stopped = std::process::Command::new("kill")
            .args(["-STOP", &pid])
            .status()
            .expect("kill runs");
        assert!(stopped.success(), "kill -STOP {pid}");
        Self(pid)
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        let _ = std::process::Command::new("kill")
            .args(["-CONT", &self.0])
            .status();
    }
}

/// With Redis down, a job the record knows is still answered (from PostgreSQL's stand-in here).
#[tokio::test]
async fn redis_down_job_lookups_fall_back_to_the_record() {
    use ferry_core::{Event, EventType, JobId, JobState, Kind, QueueName, now_ms};
    use ferry_store::{MemoryStore, Store};
    let mut redis = RedisServer::start().expect("redis-server starts");
    let broker = RedisBroker::connect(&[redis.url()], EngineConfig::default())
        .await
        .expect("connects");
    let store = Arc::new(MemoryStore::new());
    let id = JobId::new();
    store
        .record(&[Event {
            id: "1-0/0".into(),
            ty: EventType::Completed,
            job: id,
            queue: QueueName::parse("q").unwrap(),
            kind: Kind::parse("k").unwrap(),
            state: JobState::Completed,
            attempt: 1,
            at: now_ms(),
            owner: Some("alice".into()),
            tenant: None,
            data: Some(json!({"ok": true})),
            correlation_id: None,
            actor: Some("w".into()),
            spec: None,
        }])
        .await
        .unwrap();
    let store: Arc<dyn Store> = store;
    let app = TestApp::start(Arc::new(broker), |c| {
        c.resilience.broker_timeout = Duration::from_secs(1);
        c.store = Some(store);
    })
    .await;
    let alice = token("alice", USER, None);
    redis.stop().expect("redis-server stops");
    let r = app.get(&format!("/v1/jobs/{id}"), &alice).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(r.body["state"], "completed");
    assert_eq!(r.body["result"], json!({"ok": true}));
    // A job the record does not know is still the outage, not a 404.
    let r = app.get(&format!("/v1/jobs/{}", JobId::new()), &alice).await;
    is_problem(&r, 503, "unavailable");
}

/// A channel feed that ends (its engine task died) is reopened, and every channel that still has local
/// subscribers is subscribed again on the new feed: messages reach the old subscribers again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_channel_feed_that_ends_is_reopened_with_its_subscriptions() {
    use futures::StreamExt;
    use tokio_tungstenite::tungstenite::Message;

    let broker = switched(Arc::new(MemoryBroker::new(EngineConfig::default())));
    let app = TestApp::start(broker.clone(), |_| {}).await;
    let mut ws = app.ws(&token("alice", USER, None)).await;
    let r = ws_call(
        &mut ws,
        json!({"id": "s", "op": "subscribe", "channel": "app:news"}),
    )
    .await;
    assert_eq!(r["ok"], true, "{r}");

    broker.end_feeds();
    // The next message ends the feed (and is lost with it: pub/sub is at most once).
    broker
        .inner()
        .publish("news", "\"lost\"".into())
        .await
        .unwrap();
    eventually(
        Duration::from_secs(10),
        "the hub to reopen its feed",
        || async { Ok((broker.feeds_opened() >= 2).then_some(())) },
    )
    .await
    .unwrap();

    // Published until one arrives: the resubscription is queued, not awaited, by the reopen.
    let deadline = Instant::now() + Duration::from_secs(10);
    let got = loop {
        assert!(
            Instant::now() < deadline,
            "no message after the feed was reopened"
        );
        broker
            .inner()
            .publish("news", "\"after\"".into())
            .await
            .unwrap();
        match tokio::time::timeout(Duration::from_millis(200), ws.next()).await {
            Ok(Some(Ok(Message::Text(t)))) => {
                let v: serde_json::Value = serde_json::from_str(t.as_str()).unwrap();
                if v["channel"] == "app:news" {
                    break v;
                }
            }
            Ok(other) => panic!("connection ended: {other:?}"),
            Err(_) => {}
        }
    };
    assert_eq!(got["data"], "after", "{got}");
    // A new subscriber of another channel works too (the control is the new feed's).
    let r = ws_call(
        &mut ws,
        json!({"id": "s2", "op": "subscribe", "channel": "app:other"}),
    )
    .await;
    assert_eq!(r["ok"], true, "{r}");
}
