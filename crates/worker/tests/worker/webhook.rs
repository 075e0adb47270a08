//! The webhook executor against a real HTTP server on 127.0.0.1:0, driven through the runtime.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::Result;
use axum::Json;
use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use axum::routing::post;
use ferry_core::{JobState, Kind, now_ms};
use ferry_worker::{HandlerRegistry, WebhookConfig};
use serde_json::{Value, json};

use crate::common::*;

const T: Duration = Duration::from_secs(10);

#[derive(Clone, Default)]
struct Hits(Arc<AtomicUsize>);

/// Start the test server; returns its base URL.
async fn server(hits: Hits) -> String {
    let app = Router::new()
        .route(
            "/ok",
            post(|headers: HeaderMap, Json(body): Json<Value>| async move {
                let auth = headers
                    .get("authorization")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("")
                    .to_owned();
                Json(json!({"received": body, "auth": auth}))
            }),
        )
        .route("/empty", post(|| async { StatusCode::NO_CONTENT }))
        .route(
            "/bad",
            post(|| async { (StatusCode::UNPROCESSABLE_ENTITY, "missing field x") }),
        )
        .route(
            "/boom",
            post(|State(hits): State<Hits>| async move {
                hits.0.fetch_add(1, Ordering::SeqCst);
                (StatusCode::INTERNAL_SERVER_ERROR, "database on fire")
            }),
        )
        .route(
            "/busy",
            post(|| async {
                (
                    StatusCode::TOO_MANY_REQUESTS,
                    [("retry-after", "7")],
                    "slow down",
                )
                    .into_response()
            }),
        )
        .route(
            "/slow",
            post(|| async {
                tokio::time::sleep(Duration::from_secs(5)).await;
                "late"
            }),
        )
        .with_state(hits);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        axum::serve(listener, app).await.unwrap();
    });
    format!("http://{addr}")
}

fn hook(base: &str, path: &str) -> WebhookConfig {
    WebhookConfig {
        url: format!("{base}{path}"),
        timeout: Duration::from_millis(300),
        headers: vec![("Authorization".into(), "Bearer test-token".into())],
    }
}

#[tokio::test]
async fn webhook_outcomes_follow_the_status() -> Result<()> {
    let hits = Hits::default();
    let base = server(hits.clone()).await;
    let mut registry = HandlerRegistry::new();
    for path in ["ok", "empty", "bad", "boom", "busy", "slow"] {
        registry.register_webhook(
            Kind::parse(format!("hook.{path}"))?,
            hook(&base, &format!("/{path}")),
        )?;
    }
    let broker = memory();
    let q = queue("hooks");
    let b: &dyn ferry_broker::Broker = &*broker;
    let with_retries = |kind: &str| {
        let mut j = job(kind, json!({"n": 1}));
        j.max_attempts = Some(3);
        // Long backoff: a retried job stays `retrying` while we look at it.
        j.backoff = Some(ferry_core::Backoff {
            base_ms: 60_000,
            max_ms: 60_000,
        });
        j
    };
    let ok = enqueue(b, &q, job("hook.ok", json!({"to": "a@b.c"}))).await;
    let empty = enqueue(b, &q, job("hook.empty", Value::Null)).await;
    let bad = enqueue(b, &q, with_retries("hook.bad")).await;
    let boom = enqueue(b, &q, with_retries("hook.boom")).await;
    let busy = enqueue(b, &q, with_retries("hook.busy")).await;
    let slow = enqueue(b, &q, with_retries("hook.slow")).await;
    let before = now_ms();
    let w = Running::start(broker.clone(), registry, config(&q));

    // 2xx: the JSON body is the result; the job went out with id, queue, kind, attempt and payload.
    let info = wait_state(b, ok, JobState::Completed, T).await?;
    let result = info.result.unwrap();
    assert_eq!(
        result["received"],
        json!({"id": ok, "queue": "hooks", "kind": "hook.ok", "attempt": 1, "payload": {"to": "a@b.c"}})
    );
    assert_eq!(result["auth"], "Bearer test-token");
    // 2xx with no body: null.
    assert_eq!(
        wait_state(b, empty, JobState::Completed, T).await?.result,
        Some(Value::Null)
    );
    // 4xx: permanent, whatever attempts are left.
    let info = wait_state(b, bad, JobState::Dead, T).await?;
    assert_eq!(info.attempts, 1);
    assert_eq!(
        info.error.as_deref(),
        Some("webhook returned 422 Unprocessable Entity: missing field x")
    );
    // 5xx: retried with the job's backoff.
    let info = wait_state(b, boom, JobState::Retrying, T).await?;
    assert_eq!(
        info.error.as_deref(),
        Some("webhook returned 500 Internal Server Error: database on fire")
    );
    assert_eq!(hits.0.load(Ordering::SeqCst), 1);
    // 429 + Retry-After: 7 → retried no sooner than 7 s later.
    let info = wait_state(b, busy, JobState::Retrying, T).await?;
    let run_at = info.run_at.expect("a retrying job has run_at");
    assert!(
        run_at >= before + 7_000,
        "run_at {run_at} honours Retry-After"
    );
    assert!(
        run_at <= now_ms() + 7_000 + 1_000,
        "run_at {run_at} not the long backoff"
    );
    // No answer within the webhook timeout: retried.
    let info = wait_state(b, slow, JobState::Retrying, T).await?;
    assert_eq!(
        info.error.as_deref(),
        Some("webhook timed out after 300 ms")
    );
    w.stop().await;
    Ok(())
}

#[tokio::test]
async fn webhook_connection_refused_is_retryable() -> Result<()> {
    // Bind then drop, so nothing listens on the port.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0")?;
        l.local_addr()?.port()
    };
    let mut registry = HandlerRegistry::new();
    registry.register_webhook(
        Kind::parse("hook.down")?,
        WebhookConfig::new(format!("http://127.0.0.1:{port}/x")),
    )?;
    let broker = memory();
    let q = queue("hooks-down");
    let mut j = job("hook.down", Value::Null);
    j.max_attempts = Some(2);
    let id = enqueue(&*broker, &q, j).await;
    let w = Running::start(broker.clone(), registry, config(&q));
    let info = wait_state(&*broker, id, JobState::Dead, T).await?;
    assert_eq!(info.attempts, 2, "retried once before dying");
    assert!(info.error.unwrap().starts_with("webhook request failed"));
    w.stop().await;
    Ok(())
}
