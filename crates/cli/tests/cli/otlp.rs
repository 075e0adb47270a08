//! OpenTelemetry export, end to end: a real `ferry dev` process with `--otlp-endpoint` pointing at an OTLP/HTTP
//! receiver run by the test, a job submitted with a `traceparent`, and the spans the receiver decodes: the
//! gateway's span joins the caller's trace, the worker's job span is the gateway span's child, and the resource
//! names the service. Without an endpoint nothing is sent. Bad `--otlp-endpoint` and `--log` values exit 64.

use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
use prost::Message;

use crate::support::{self, Proc, remaining, submit, until_completed, until_healthy};

const SECRET: &str = "0123456789abcdef0123456789abcdef-otlp-test";
const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const PARENT_ID: &str = "00f067aa0ba902b7";

/// One received span, flattened with its resource's `service.name`.
#[derive(Debug, Clone)]
struct Span {
    service: Option<String>,
    name: String,
    trace_id: String,
    span_id: String,
    parent_span_id: String,
    /// OTLP's SpanKind: 2 is SERVER.
    kind: i32,
    attributes: Vec<(String, String)>,
}

impl Span {
    fn attr(&self, key: &str) -> Option<&str> {
        self.attributes
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

#[derive(Clone, Default)]
struct Received {
    spans: Arc<Mutex<Vec<Span>>>,
    requests: Arc<Mutex<Vec<String>>>,
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|b| format!("{b:02x}")).collect()
}

fn text(v: &Option<AnyValue>) -> String {
    match v.as_ref().and_then(|v| v.value.as_ref()) {
        Some(any_value::Value::StringValue(s)) => s.clone(),
        Some(any_value::Value::IntValue(i)) => i.to_string(),
        Some(any_value::Value::BoolValue(b)) => b.to_string(),
        Some(any_value::Value::DoubleValue(d)) => d.to_string(),
        other => format!("{other:?}"),
    }
}

fn pairs(kvs: &[KeyValue]) -> Vec<(String, String)> {
    kvs.iter()
        .map(|kv| (kv.key.clone(), text(&kv.value)))
        .collect()
}

/// POST /v1/traces: an OTLP/HTTP protobuf export request.
async fn traces(State(r): State<Received>, headers: HeaderMap, body: Bytes) -> Response {
    let describe = format!(
        "content-type={:?} content-encoding={:?} bytes={}",
        headers.get(header::CONTENT_TYPE),
        headers.get(header::CONTENT_ENCODING),
        body.len()
    );
    r.requests.lock().unwrap().push(describe);
    if headers.get(header::CONTENT_ENCODING).is_some() {
        // The exporter is not configured to compress; refuse rather than guess.
        return StatusCode::UNSUPPORTED_MEDIA_TYPE.into_response();
    }
    let Ok(req) = ExportTraceServiceRequest::decode(body) else {
        return StatusCode::BAD_REQUEST.into_response();
    };
    let mut out = r.spans.lock().unwrap();
    for rs in req.resource_spans {
        let resource = rs
            .resource
            .map(|r| pairs(&r.attributes))
            .unwrap_or_default();
        let service = resource
            .iter()
            .find(|(k, _)| k == "service.name")
            .map(|(_, v)| v.clone());
        for ss in rs.scope_spans {
            for s in ss.spans {
                out.push(Span {
                    service: service.clone(),
                    name: s.name.clone(),
                    trace_id: hex(&s.trace_id),
                    span_id: hex(&s.span_id),
                    parent_span_id: hex(&s.parent_span_id),
                    kind: s.kind,
                    attributes: pairs(&s.attributes),
                });
            }
        }
    }
    (
        [(header::CONTENT_TYPE, "application/x-protobuf")],
        ExportTraceServiceResponse::default().encode_to_vec(),
    )
        .into_response()
}

/// An OTLP/HTTP receiver on 127.0.0.1; its base URL and what it got.
async fn receiver() -> (String, Received) {
    let received = Received::default();
    let app = axum::Router::new()
        .route("/v1/traces", axum::routing::post(traces))
        .with_state(received.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (format!("http://{addr}"), received)
}

/// The binary, with none of the tracing settings a developer's environment might carry.
fn ferry() -> Command {
    let mut c = support::ferry();
    for var in [
        "FERRY_OTLP_ENDPOINT",
        "FERRY_OTLP_SERVICE_NAME",
        "FERRY_LOG",
        "RUST_LOG",
        "FERRY_CONFIG",
    ] {
        c.env_remove(var);
    }
    c
}

/// `ferry dev` on port 0, with `extra` flags, once it listens: the process (its stderr in [`Proc::log`]) and its
/// base URL.
async fn start_dev(extra: &[&str]) -> (Proc, String) {
    let (dev, listen) = Proc::spawn_gateway(
        ferry()
            .args(["dev"])
            .args(extra)
            .env("FERRY_JWT_SECRET", SECRET)
            .env("FERRY_LOG", "info")
            .stdout(Stdio::null()),
    )
    .await
    .expect("ferry dev starts");
    (dev, format!("http://{listen}"))
}

/// Submit one echo job with our traceparent, wait until it completed; the traceparent the gateway returned.
async fn run_one_job(base: &str, dev: &Proc) -> String {
    let http = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    if let Err(e) = until_healthy(&http, base, remaining(deadline)).await {
        panic!("ferry dev never listened ({e}):\n{}", dev.log());
    }
    let token = support::token(
        SECRET,
        "alice",
        &["jobs:submit", "jobs:read"],
        Duration::from_secs(600),
    );
    let traceparent = format!("00-{TRACE_ID}-{PARENT_ID}-01");
    let (id, headers) = submit(
        &http,
        base,
        &token,
        "default",
        &serde_json::json!({"kind": "ferry.echo", "payload": {"x": 1}}),
        &[("traceparent", &traceparent)],
    )
    .await
    .unwrap();
    let returned = headers["traceparent"].to_str().unwrap().to_owned();
    until_completed(&http, base, &token, &id, remaining(deadline))
        .await
        .unwrap();
    // One lookup in the caller's trace as well.
    let res = http
        .get(format!("{base}/v1/jobs/{id}"))
        .bearer_auth(&token)
        .header("traceparent", &traceparent)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    returned
}

/// SIGTERM, then wait (bounded) for a clean exit: its whole log.
async fn stop(mut dev: Proc) -> String {
    let exit = dev
        .stop(Duration::from_secs(30))
        .await
        .unwrap_or_else(|e| panic!("ferry dev did not stop ({e}):\n{}", dev.log()));
    assert!(
        exit.success(),
        "ferry dev exited with {exit}:\n{}",
        dev.log()
    );
    dev.log()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_of_gateway_and_worker_reach_the_collector_in_one_trace() {
    let (endpoint, received) = receiver().await;
    let (dev, base) = start_dev(&["--otlp-endpoint", &endpoint]).await;
    let returned = run_one_job(&base, &dev).await;
    // The traceparent handed back (and stored with the job) is in the caller's trace and names the gateway's
    // span as the parent, not the caller's.
    let parts: Vec<&str> = returned.split('-').collect();
    assert_eq!(parts.len(), 4, "{returned}");
    assert_eq!(parts[1], TRACE_ID, "{returned}");
    assert_ne!(parts[2], PARENT_ID, "{returned}");
    let gateway_span_id = parts[2].to_owned();
    // Shutdown flushes what is still queued: everything is there once the process is gone.
    let log_text = stop(dev).await;
    let spans = received.spans.lock().unwrap().clone();
    let requests = received.requests.lock().unwrap().clone();
    let context = || format!("spans: {spans:#?}\nrequests: {requests:?}\nlog:\n{log_text}");

    let ours: Vec<&Span> = spans.iter().filter(|s| s.trace_id == TRACE_ID).collect();
    // The request's server span, a child of the caller's.
    let request = ours
        .iter()
        .find(|s| s.name == "POST /v1/queues/{queue}/jobs")
        .unwrap_or_else(|| panic!("no request span in our trace; {}", context()));
    assert_eq!(
        request.parent_span_id,
        PARENT_ID,
        "the caller's span is the request span's parent; {}",
        context()
    );
    assert_eq!(request.kind, 2, "a server span; {}", context());
    for (key, want) in [
        ("http.request.method", "POST"),
        ("http.route", "/v1/queues/{queue}/jobs"),
        ("http.response.status_code", "202"),
    ] {
        assert_eq!(request.attr(key), Some(want), "{key}; {}", context());
    }
    let gateway = ours
        .iter()
        .find(|s| s.name == "submit_job")
        .unwrap_or_else(|| panic!("no gateway span in our trace; {}", context()));
    assert_eq!(gateway.span_id, gateway_span_id, "{}", context());
    assert_eq!(
        gateway.parent_span_id,
        request.span_id,
        "the request span is the submit span's parent; {}",
        context()
    );
    assert_eq!(gateway.attr("queue"), Some("default"), "{}", context());
    let job = ours
        .iter()
        .find(|s| s.name == "job")
        .unwrap_or_else(|| panic!("no worker span in our trace; {}", context()));
    assert_eq!(
        job.parent_span_id,
        gateway.span_id,
        "the worker's job span is the gateway span's child; {}",
        context()
    );
    assert_eq!(job.attr("kind"), Some("ferry.echo"), "{}", context());
    for s in [request, gateway, job] {
        assert_eq!(s.service.as_deref(), Some("ferry-dev"), "{}", context());
    }
    // The other routes get their server span too: the job's lookup, in the caller's trace.
    let lookup = ours
        .iter()
        .find(|s| s.name == "GET /v1/jobs/{id}")
        .unwrap_or_else(|| panic!("no lookup span in our trace; {}", context()));
    assert_eq!(lookup.parent_span_id, PARENT_ID, "{}", context());
    assert_eq!(
        lookup.attr("http.response.status_code"),
        Some("200"),
        "{}",
        context()
    );
    for r in &requests {
        assert!(
            r.contains("application/x-protobuf") && r.contains("content-encoding=None"),
            "{r}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_an_endpoint_nothing_is_exported_and_the_traceparent_is_kept() {
    let (endpoint, received) = receiver().await;
    // A receiver is listening, but the process is not told about it.
    let (dev, base) = start_dev(&["--otlp-service-name", "ignored"]).await;
    let returned = run_one_job(&base, &dev).await;
    assert_eq!(returned, format!("00-{TRACE_ID}-{PARENT_ID}-01"));
    stop(dev).await;
    assert!(
        received.requests.lock().unwrap().is_empty(),
        "{endpoint} got requests without --otlp-endpoint"
    );
}

#[test]
fn bad_endpoint_and_bad_log_filter_exit_64_naming_the_setting() {
    for (args, env, needle) in [
        (
            vec!["--otlp-endpoint", "ftp://127.0.0.1:4318", "dev"],
            vec![],
            "--otlp-endpoint",
        ),
        (
            vec!["dev"],
            vec![("FERRY_OTLP_ENDPOINT", "not a url")],
            "--otlp-endpoint",
        ),
        (
            vec!["--log", "info,ferry_worker=loud", "dev"],
            vec![],
            "--log",
        ),
        (vec!["dev"], vec![("FERRY_LOG", "=bad=")], "FERRY_LOG"),
        (vec!["dev"], vec![("RUST_LOG", "info,x=nope")], "RUST_LOG"),
    ] {
        let mut cmd = ferry();
        cmd.args(&args).env("FERRY_JWT_SECRET", SECRET);
        for (k, v) in &env {
            cmd.env(k, v);
        }
        let mut child = cmd
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // Refused before anything starts: a bounded wait, then the verdict.
        let deadline = Instant::now() + Duration::from_secs(20);
        while child.try_wait().unwrap().is_none() {
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("{args:?} {env:?} kept running");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let out = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{args:?} {env:?}: {stderr}");
        assert!(stderr.contains(needle), "{args:?} {env:?}: {stderr}");
    }
}

/// A worker that exits at its hard shutdown deadline (Redis frozen with SIGSTOP, so the drain cannot finish)
/// still sends the spans of the jobs it did finish. The batch delay is set far beyond the test, so only the
/// exit's own flush can have sent them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_exiting_at_its_deadline_still_sends_its_finished_spans() {
    use ferry_broker::prelude::*;
    use ferry_core::{JobState, Kind, NewJob, QueueName};

    let (endpoint, received) = receiver().await;
    let redis = ferry_testkit::RedisServer::start().unwrap();
    let url = redis.url();
    let broker = crate::support::test_broker(&url).await.unwrap();
    let q = QueueName::parse("deadline").unwrap();
    let mut worker = Proc::spawn_logged(
        ferry()
            .args(["--otlp-endpoint", &endpoint, "worker", "--redis", &url])
            .args(["--queues", q.as_str(), "--admin-listen", "off"])
            .args(["--drain-timeout-ms", "300", "--cancel-grace-ms", "100"])
            .args([
                "--flush-timeout-ms",
                "300",
                "--shutdown-deadline-ms",
                "2000",
            ])
            .env("OTEL_BSP_SCHEDULE_DELAY", "600000")
            .stdout(Stdio::null()),
    )
    .unwrap();
    let job = |kind: &str, payload| NewJob::new(Kind::parse(kind).unwrap(), payload);
    let done = broker
        .enqueue(&q, job("ferry.echo", serde_json::json!({"x": 1})))
        .await
        .unwrap()
        .id;
    let deadline = Instant::now() + Duration::from_secs(30);
    while broker.job(done).await.unwrap().map(|j| j.state) != Some(JobState::Completed) {
        assert!(Instant::now() < deadline, "the echo job never completed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // A job that holds the drain, then Redis frozen under it.
    broker
        .enqueue(&q, job("ferry.sleep", serde_json::json!({"ms": 60_000})))
        .await
        .unwrap();
    while broker.stats(&q).await.unwrap().active != 1 {
        assert!(Instant::now() < deadline, "the sleep job never started");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        received.requests.lock().unwrap().is_empty(),
        "nothing is sent before the batch delay"
    );
    let pid = redis.pid().unwrap().to_string();
    let signal = |sig: &str| Command::new("kill").args([sig, &pid]).status().unwrap();
    assert!(signal("-STOP").success());
    worker.sigterm().unwrap();
    let status = worker.wait_exit(Duration::from_secs(20)).await;
    assert!(signal("-CONT").success());
    let log = worker.log();
    assert_eq!(status.unwrap().code(), Some(70), "{log}");
    let spans = received.spans.lock().unwrap().clone();
    assert!(
        spans
            .iter()
            .any(|s| s.name == "job" && s.attr("id") == Some(&done.to_string())),
        "the finished job's span was not sent: {spans:#?}\n{log}"
    );
}
