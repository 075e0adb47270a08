//! Every error a client can get is problem+json (issue 11, findings 5 and 18): one test provokes each row of
//! the error table over real sockets, another walks the OpenAPI document and checks that each documented route
//! exists and answers its documented errors as problems.

use std::sync::Arc;
use std::time::Duration;

use ferry_broker::{Broker, Completion, EngineConfig, MemoryBroker};
use ferry_core::QueueName;
use ferry_gateway::error::ApiError;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::support::{Reply, SECRET, TestApp, USER, switched, token};
use ferry_testkit::eventually;
use ferry_testkit::faulty::{Fault, Method as Call};

/// Asserts a problem+json answer of this status and problem type.
fn problem(r: &Reply, status: u16, slug: &str) {
    assert_eq!(r.status.as_u16(), status, "{slug}: {:?}", r.body);
    assert_eq!(
        r.headers
            .get("content-type")
            .map(|v| v.to_str().unwrap_or("")),
        Some("application/problem+json"),
        "{slug}: {:?}",
        r.body
    );
    assert_eq!(r.body["status"], status, "{slug}: {:?}", r.body);
    assert_eq!(
        r.body["type"],
        format!("urn:ferry:problem:{slug}"),
        "{:?}",
        r.body
    );
    assert!(r.body["title"].is_string() && r.body["detail"].is_string());
}

/// Send `request` as is on a fresh connection and read the answer (until the body's length or the close).
async fn raw(app: &TestApp, request: &[u8]) -> Reply {
    let mut s = tokio::net::TcpStream::connect(app.addr).await.unwrap();
    // The peer may answer and close before the whole request is written; what it answered is what counts.
    let _ = s.write_all(request).await;
    let mut buf = Vec::new();
    let read = async {
        let mut chunk = [0u8; 8192];
        loop {
            match s.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
            if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
                let len = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .and_then(|v| v.trim().parse::<usize>().ok());
                if len.is_some_and(|n| buf.len() >= end + 4 + n) {
                    break;
                }
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(10), read)
        .await
        .expect("an answer in time");
    let end = buf
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("a response head");
    let head = String::from_utf8_lossy(&buf[..end]).into_owned();
    let mut lines = head.split("\r\n");
    let status: u16 = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|c| c.parse().ok())
        .expect("a status line");
    let mut headers = reqwest::header::HeaderMap::new();
    for l in lines {
        if let Some((k, v)) = l.split_once(':') {
            headers.insert(
                reqwest::header::HeaderName::from_bytes(k.trim().as_bytes()).unwrap(),
                v.trim().parse().unwrap(),
            );
        }
    }
    let body = serde_json::from_slice(&buf[end + 4..])
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&buf[end + 4..]).into()));
    Reply {
        status: StatusCode::from_u16(status).unwrap(),
        headers,
        body,
    }
}

/// A submitted job that is then completed, so cancelling it conflicts.
async fn completed_job(app: &TestApp, broker: &dyn Broker, tok: &str) -> String {
    let r = app
        .post("/v1/queues/done/jobs", tok, json!({"kind": "k"}))
        .await;
    let id = r.body["id"].as_str().unwrap().to_owned();
    let q = QueueName::parse("done").unwrap();
    let leased = broker
        .claim(&q, "w1", 1, Duration::from_secs(1))
        .await
        .unwrap();
    broker
        .complete(vec![Completion {
            lease: leased[0].lease.clone(),
            result: json!(null),
        }])
        .await
        .unwrap();
    id
}

#[tokio::test]
async fn every_status_of_the_error_table_is_problem_json() {
    let memory: Arc<dyn Broker> = Arc::new(MemoryBroker::new(EngineConfig::default()));
    let broker = switched(memory.clone());
    let app = TestApp::start(broker.clone(), |c| {
        // Low enough that a burst of concurrent requests of one subject is sure to go over it.
        c.limits.http_rate_per_sec = 20;
        c.limits.http_burst = 60;
        c.limits.max_body_bytes = 4096;
        c.resilience.backlog_poll = Duration::from_millis(20);
        c.resilience.backlog_high_water = Some(1000);
    })
    .await;
    let alice = token("alice", USER, None);
    let missing = "/v1/jobs/0190c5d2-0000-7000-8000-000000000000";
    let mut provoked = Vec::new();
    for e in ApiError::examples() {
        let (status, slug, _, _) = e.row();
        let replies: Vec<Reply> = match slug {
            "bad-request" => vec![
                app.raw_post("/v1/queues/q/jobs", &alice, "{").await,
                // A plain GET of the WebSocket route with a bad handshake header.
                raw(
                    &app,
                    format!(
                        "GET /v1/ws HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {alice}\r\nConnection: \
                         Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 8\r\n\
                         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
                    )
                    .as_bytes(),
                )
                .await,
                raw(
                    &app,
                    format!(
                        "GET /v1/ws HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {alice}\r\nConnection: \
                         Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\n\r\n"
                    )
                    .as_bytes(),
                )
                .await,
            ],
            "unauthorized" => vec![
                app.send(Method::POST, "/v1/queues/q/jobs", None, Some(&json!({})))
                    .await,
                app.anon("/v1/ws").await,
                app.anon("/debug/pprof/profile").await,
            ],
            "forbidden" => vec![
                app.post(
                    "/v1/queues/q/jobs",
                    &token("bob", "jobs:read", None),
                    json!({"kind": "k"}),
                )
                .await,
                app.get(missing, &forged_tenant("")).await,
                app.get("/debug/pprof/profile", &alice).await,
            ],
            "not-found" => vec![
                app.get(missing, &alice).await,
                app.get("/v1/nowhere", &alice).await,
            ],
            "method-not-allowed" => vec![
                app.send(Method::PUT, missing, Some(&alice), None).await,
                app.send(Method::POST, "/v1/ws", Some(&alice), None).await,
            ],
            "conflict" => {
                let id = completed_job(&app, memory.as_ref(), &alice).await;
                vec![app.delete(&format!("/v1/jobs/{id}"), &alice).await]
            }
            "payload-too-large" => vec![
                app.raw_post("/v1/queues/q/jobs", &alice, "x".repeat(8192))
                    .await,
            ],
            "uri-too-long" => {
                let long = "a".repeat(64 * 1024);
                vec![
                    raw(
                        &app,
                        format!("GET /v1/ws?token={long} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes(),
                    )
                    .await,
                ]
            }
            "upgrade-required" => vec![app.get("/v1/ws", &alice).await],
            "rate-limited" => {
                let flood = token("flood", USER, None);
                let burst = (0..200).map(|_| app.get("/v1/queues", &flood));
                let r = futures::future::join_all(burst)
                    .await
                    .into_iter()
                    .find(|r| r.status == 429)
                    .expect("a 429 past the burst");
                assert!(r.retry_after().is_some());
                vec![r]
            }
            "headers-too-large" => {
                let big = "b".repeat(1024 * 1024);
                vec![
                    raw(
                        &app,
                        format!("GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: {big}\r\n\r\n").as_bytes(),
                    )
                    .await,
                ]
            }
            "unavailable" => {
                broker.set(Call::Job, Fault::Unavailable);
                let r = app.get(missing, &alice).await;
                broker.clear(Call::Job);
                vec![r]
            }
            "overloaded" => {
                broker.set_backlog(Some(5000));
                let r = eventually(Duration::from_secs(10), "shedding", || async {
                    let r = app
                        .post("/v1/queues/q/jobs", &alice, json!({"kind": "k"}))
                        .await;
                    Ok((r.status == 503).then_some(r))
                })
                .await
.unwrap();
                broker.set_backlog(Some(0));
                vec![r]
            }
            "no-store" => vec![app.get("/v1/jobs", &alice).await],
            "internal" => {
                broker.set(Call::Job, Fault::Internal);
                let r = app.get(missing, &alice).await;
                broker.clear(Call::Job);
                vec![r]
            }
            // Connection-level rows need their own connection settings (a short body timeout, a budget of one
            // connection per address): connections.rs provokes each over raw sockets and checks its
            // problem body (a_partial_body_is_answered_408_within_the_body_timeout,
            // unauthenticated_connections_per_address_are_capped_and_health_still_answers).
            "request-timeout" | "too-many-connections" => vec![],
            other => panic!("row {other} has no way to provoke it here: add one"),
        };
        for r in &replies {
            problem(r, status.as_u16(), slug);
        }
        provoked.push(slug);
    }
    assert_eq!(provoked.len(), ApiError::examples().len());
}

/// A token whose tenant claim is `tenant`, signed with the test secret (mint refuses bad tenants).
fn forged_tenant(tenant: &str) -> String {
    jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &json!({"sub": "eve", "scope": USER, "tenant": tenant, "exp": ferry_core::now_ms() / 1000 + 600}),
        &jsonwebtoken::EncodingKey::from_secret(SECRET).unwrap(),
    )
    .unwrap()
}

#[tokio::test]
async fn the_websocket_route_authenticates_before_the_handshake() {
    let (app, _) = TestApp::memory().await;
    let alice = token("alice", USER, None);
    let r = app.anon("/v1/ws").await;
    problem(&r, 401, "unauthorized");
    let r = app.get("/v1/ws", &alice).await;
    problem(&r, 426, "upgrade-required");
    assert_eq!(r.headers["upgrade"], "websocket");
    let r = raw(
        &app,
        format!(
            "GET /v1/ws HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {alice}\r\nConnection: Upgrade\r\n\
             Upgrade: websocket\r\nSec-WebSocket-Version: 8\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
        )
        .as_bytes(),
    )
    .await;
    problem(&r, 400, "bad-request");
    assert_eq!(r.field(), "Sec-WebSocket-Version");
    let r = app.send(Method::POST, "/v1/ws", Some(&alice), None).await;
    problem(&r, 405, "method-not-allowed");
    assert!(
        r.headers
            .get("allow")
            .is_some_and(|v| v.to_str().unwrap().contains("GET")),
        "{:?}",
        r.headers
    );
}

#[tokio::test]
async fn an_empty_tenant_claim_is_forbidden_not_unauthorized() {
    let (app, _) = TestApp::memory().await;
    let r = app
        .post(
            "/v1/queues/q/jobs",
            &forged_tenant(""),
            json!({"kind": "k"}),
        )
        .await;
    problem(&r, 403, "forbidden");
}

#[tokio::test]
async fn request_ids_over_the_documented_length_are_refused() {
    let (app, _) = TestApp::memory().await;
    let alice = token("alice", USER, None);
    let send = |id: String| {
        app.client
            .post(format!("{}/v1/queues/q/jobs", app.base))
            .bearer_auth(&alice)
            .header("x-request-id", id)
            .json(&json!({"kind": "k", "max_attempts": 5.0, "backoff": {"base_ms": 10, "max_ms": 20}}))
            .send()
    };
    let ok = send("r".repeat(128)).await.unwrap();
    assert_eq!(ok.status(), 202);
    assert_eq!(ok.headers()["x-request-id"], "r".repeat(128).as_str());
    let res = send("r".repeat(129)).await.unwrap();
    assert_eq!(res.status(), 400);
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["errors"][0]["field"], "X-Request-Id", "{body}");
}

/// The OpenAPI document and the server agree: every documented operation is served (no 404 "no such route",
/// no 405), and every documented error response it gives is problem+json.
#[tokio::test]
async fn every_documented_operation_is_served_and_its_errors_are_problems() {
    // Every operation is called once without a token: more failed authentications from one address than the
    // per-address budget allows, which would turn the 401s under test into 429s.
    let broker: Arc<dyn Broker> = Arc::new(MemoryBroker::new(EngineConfig::default()));
    let app = TestApp::start(broker, |c| c.limits.unauth_upgrades_per_sec_per_ip = 10_000).await;
    let doc = app.anon("/v1/openapi.json").await.body;
    let paths = doc["paths"].as_object().expect("paths");
    let no_token_ok = ["/healthz", "/readyz", "/metrics", "/v1/openapi.json"];
    let mut operations = 0;
    for (path, item) in paths {
        let concrete = path
            .replace("{queue}", "q")
            .replace("{channel}", "app:c")
            .replace("{id}", "0190c5d2-0000-7000-8000-000000000000");
        for (method, op) in item.as_object().unwrap() {
            let Ok(m) = Method::from_bytes(method.to_ascii_uppercase().as_bytes()) else {
                continue;
            };
            if method == "parameters" {
                continue;
            }
            operations += 1;
            let documented: Vec<&String> = op["responses"].as_object().unwrap().keys().collect();
            // Without a token: every /v1 route (and the profile) answers a documented 401 problem.
            let r = app.send(m.clone(), &concrete, None, None).await;
            assert_ne!(r.status, 405, "{method} {path} is not served");
            if no_token_ok.contains(&path.as_str()) {
                assert!(
                    documented.iter().any(|s| *s == r.status.as_str()),
                    "{method} {path} answered an undocumented {}",
                    r.status
                );
                continue;
            }
            problem(&r, 401, "unauthorized");
            assert!(
                documented.iter().any(|s| *s == "401"),
                "{method} {path}: 401 undocumented"
            );
            // With a token but a body or parameters that are wrong: a documented status, as a problem.
            let reader = token("reader", "jobs:read", None);
            let r = app
                .send(m.clone(), &concrete, Some(&reader), Some(&json!([])))
                .await;
            assert_ne!(r.body["detail"], "no such route", "{method} {path}");
            assert!(
                documented.iter().any(|s| *s == r.status.as_str()),
                "{method} {path} answered an undocumented {}: {:?}",
                r.status,
                r.body
            );
            if r.status.is_client_error() || r.status.is_server_error() {
                assert_eq!(
                    r.headers["content-type"], "application/problem+json",
                    "{method} {path}"
                );
                // Each documented error response points at the Problem schema.
                let schema = &op["responses"][r.status.as_str()];
                let text = schema.to_string();
                assert!(
                    text.contains("problem+json") || text.contains("#/components/responses/"),
                    "{method} {path} {}: {text}",
                    r.status
                );
            }
        }
    }
    assert!(operations >= 19, "{operations} operations");
}
