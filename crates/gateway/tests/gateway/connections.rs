//! Connections that stall or pile up, driven over raw sockets against a gateway on 127.0.0.1:0 with short
//! timeouts: a silent socket, partial headers, a partial body, an idle keep-alive, the budget of
//! unauthenticated connections per address (health still answered), and failed authentication over HTTP.

use std::time::Duration;

use ferry_gateway::GatewayConfig;
use ferry_gateway::config::ConnectionConfig;
use ferry_testkit::eventually;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::support::{self, ADMIN, TestApp, is_problem, token};

/// Far above every configured timeout here: a connection still open after it was never going to close.
const PATIENCE: Duration = Duration::from_secs(10);

fn short(c: &mut GatewayConfig) {
    c.connections = ConnectionConfig {
        header_timeout: Duration::from_millis(500),
        body_timeout: Duration::from_millis(500),
        idle_timeout: Duration::from_millis(700),
        ..ConnectionConfig::default()
    };
}

async fn start(tweak: impl FnOnce(&mut GatewayConfig)) -> TestApp {
    let broker = std::sync::Arc::new(ferry_broker::MemoryBroker::new(
        ferry_broker::EngineConfig::default(),
    ));
    TestApp::start(broker, tweak).await
}

async fn connect(app: &TestApp) -> TcpStream {
    TcpStream::connect(app.addr).await.expect("connects")
}

/// Read until the peer closes; `Err` with what was read when it is still open after `PATIENCE`.
async fn until_closed(s: &mut TcpStream) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    let read = tokio::time::timeout(PATIENCE, async {
        let mut buf = [0u8; 4096];
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => out.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    match read {
        Ok(()) => Ok(out),
        Err(_) => Err(format!(
            "still open after {PATIENCE:?}; read {:?}",
            String::from_utf8_lossy(&out)
        )),
    }
}

/// One HTTP/1.1 response: status, lowercase head, JSON body (or the body as a string).
struct Raw {
    status: u16,
    head: String,
    body: Value,
}

async fn response(s: &mut TcpStream) -> Raw {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let n = tokio::time::timeout(PATIENCE, s.read(&mut chunk))
            .await
            .expect("a response in time")
            .expect("read");
        assert!(
            n > 0,
            "closed before a response: {:?}",
            String::from_utf8_lossy(&buf)
        );
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_lowercase();
    let status = head[9..12].parse().expect("status code");
    let len: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .map(|v| v.trim().parse().expect("length"))
        .unwrap_or(0);
    while buf.len() < head_end + len {
        let n = tokio::time::timeout(PATIENCE, s.read(&mut chunk))
            .await
            .expect("the body in time")
            .expect("read");
        assert!(n > 0, "closed inside the body");
        buf.extend_from_slice(&chunk[..n]);
    }
    let text = String::from_utf8_lossy(&buf[head_end..head_end + len]).into_owned();
    let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
    Raw { status, head, body }
}

async fn get(s: &mut TcpStream, path: &str, token: Option<&str>) -> Raw {
    let auth = token
        .map(|t| format!("authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    let req = format!("GET {path} HTTP/1.1\r\nhost: ferry\r\n{auth}\r\n");
    s.write_all(req.as_bytes()).await.expect("write");
    response(s).await
}

/// The gateway counted a connection it closed for `reason`.
async fn closed_for(app: &TestApp, reason: &str) {
    let metrics = app.metrics().await;
    let line = format!("ferry_http_connections_closed_total{{reason=\"{reason}\"}} ");
    assert!(metrics.contains(&line), "{line}in {metrics}");
}

fn problem(r: &Raw, status: u16, slug: &str) {
    assert_eq!(r.status, status, "{:?}", r.body);
    assert!(
        r.head.contains("content-type: application/problem+json"),
        "{}",
        r.head
    );
    assert_eq!(r.body["type"], format!("urn:ferry:problem:{slug}"));
}

#[tokio::test]
async fn a_silent_socket_is_closed_after_the_header_timeout() {
    let app = start(short).await;
    let mut s = connect(&app).await;
    until_closed(&mut s).await.expect("closed");
    closed_for(&app, "header_timeout").await;
}

#[tokio::test]
async fn partial_headers_are_closed_after_the_header_timeout() {
    let app = start(short).await;
    let mut s = connect(&app).await;
    s.write_all(b"GET /healthz HTTP/1.1\r\nhost: ferry\r\nx-slow: ")
        .await
        .unwrap();
    until_closed(&mut s).await.expect("closed");

    // The same after a first request on a kept-alive connection: its header timer starts with the first byte.
    let mut s = connect(&app).await;
    assert_eq!(get(&mut s, "/healthz", None).await.status, 200);
    s.write_all(b"GET /healthz HTTP/1.1\r\nhost: fe")
        .await
        .unwrap();
    until_closed(&mut s).await.expect("closed");
}

#[tokio::test]
async fn a_partial_body_is_answered_408_within_the_body_timeout() {
    let app = start(short).await;
    let alice = token("alice", ADMIN, None);
    let mut s = connect(&app).await;
    let head = format!(
        "POST /v1/queues/q/jobs HTTP/1.1\r\nhost: ferry\r\nauthorization: Bearer {alice}\r\n\
         content-type: application/json\r\ncontent-length: 100\r\n\r\n{{\"kind\":"
    );
    s.write_all(head.as_bytes()).await.unwrap();
    let r = response(&mut s).await;
    problem(&r, 408, "request-timeout");
    assert!(r.head.contains("connection: close"), "{}", r.head);
    until_closed(&mut s).await.expect("closed after the 408");
    closed_for(&app, "body_timeout").await;
}

#[tokio::test]
async fn a_declared_body_over_the_limit_is_refused_without_reading_it() {
    let app = start(|c| {
        short(c);
        // Long enough that only an early answer can beat it.
        c.connections.body_timeout = Duration::from_secs(60);
    })
    .await;
    let alice = token("alice", ADMIN, None);
    let mut s = connect(&app).await;
    let head = format!(
        "POST /v1/queues/q/jobs HTTP/1.1\r\nhost: ferry\r\nauthorization: Bearer {alice}\r\n\
         content-length: 10000000\r\n\r\n"
    );
    s.write_all(head.as_bytes()).await.unwrap();
    problem(&response(&mut s).await, 413, "payload-too-large");
}

#[tokio::test]
async fn an_idle_keep_alive_connection_is_closed_after_the_idle_timeout() {
    let app = start(|c| {
        short(c);
        c.connections.header_timeout = Duration::from_secs(60);
    })
    .await;
    let alice = token("alice", ADMIN, None);
    let mut s = connect(&app).await;
    let r = get(&mut s, "/v1/queues", Some(&alice)).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert!(!r.head.contains("connection: close"), "{}", r.head);
    until_closed(&mut s).await.expect("closed when idle");
    closed_for(&app, "idle_timeout").await;
}

#[tokio::test]
async fn a_websocket_outlives_the_http_timeouts() {
    let app = start(short).await;
    let alice = token("alice", ADMIN, None);
    let mut ws = app.ws(&alice).await;
    // Well past the header, body and idle timeouts: the WebSocket has its own pings instead.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let frame = support::ws_call(
        &mut ws,
        serde_json::json!({"id": "s", "op": "submit", "queue": "q", "job": {"kind": "k"}}),
    )
    .await;
    assert_eq!(frame["ok"], true, "{frame}");
}

#[tokio::test]
async fn unauthenticated_connections_per_address_are_capped_and_health_still_answers() {
    const CAP: usize = 3;
    let app = start(|c| {
        c.connections.header_timeout = Duration::from_secs(60);
        c.connections.max_unauthenticated_per_ip = CAP;
    })
    .await;
    let alice = token("alice", ADMIN, None);
    // Silent sockets fill the address's budget (the test client's own pooled connection may hold a slot too).
    let mut silent = Vec::new();
    for _ in 0..CAP {
        silent.push(connect(&app).await);
    }
    // Let the gateway accept them all before the next one.
    tokio::time::sleep(Duration::from_millis(200)).await;

    let mut extra = connect(&app).await;
    let r = get(&mut extra, "/v1/queues", Some(&alice)).await;
    problem(&r, 429, "too-many-connections");
    assert!(r.head.contains("retry-after: 1"), "{}", r.head);
    until_closed(&mut extra)
        .await
        .expect("limited connection closed");

    for path in ["/healthz", "/readyz", "/metrics"] {
        let mut probe = connect(&app).await;
        let r = get(&mut probe, path, None).await;
        assert_eq!(r.status, 200, "{path}: {:?}", r.body);
    }

    // The silent ones gone, a new connection is served again; once authenticated it no longer counts.
    drop(silent);
    let mut s = eventually(PATIENCE, "budget given back", || async {
        let mut s = connect(&app).await;
        Ok((get(&mut s, "/v1/queues", Some(&alice)).await.status == 200).then_some(s))
    })
    .await
    .unwrap();
    let mut more: Vec<TcpStream> = Vec::new();
    for _ in 0..CAP - 1 {
        let mut c = connect(&app).await;
        assert_eq!(get(&mut c, "/v1/queues", Some(&alice)).await.status, 200);
        more.push(c);
    }
    assert_eq!(get(&mut s, "/v1/queues", Some(&alice)).await.status, 200);
    let mut c = connect(&app).await;
    assert_eq!(get(&mut c, "/v1/queues", Some(&alice)).await.status, 200);
}

#[tokio::test]
async fn failed_authentication_over_http_is_limited_per_address() {
    let app = start(|c| c.limits.unauth_upgrades_per_sec_per_ip = 1).await;
    let mut statuses = Vec::new();
    for _ in 0..5 {
        let r = app.get("/v1/queues", "not-a-token").await;
        statuses.push(r.status.as_u16());
        if r.status == 429 {
            is_problem(&r, 429, "rate-limited");
            assert_eq!(r.retry_after(), Some(1));
        }
    }
    assert_eq!(statuses[0], 401, "{statuses:?}");
    assert!(statuses.contains(&429), "{statuses:?}");
    // No token at all is a failure too.
    let mut anon = Vec::new();
    for _ in 0..3 {
        anon.push(app.anon("/v1/queues").await.status.as_u16());
    }
    assert!(anon.contains(&429), "{anon:?}");
    // A valid token from the same address is still served.
    let alice = token("alice", ADMIN, None);
    assert_eq!(app.get("/v1/queues", &alice).await.status, 200);
    let metrics = app.metrics().await;
    assert!(
        metrics.contains("ferry_http_auth_failures_total{outcome=\"too_many_failures\"}"),
        "{metrics}"
    );
}
