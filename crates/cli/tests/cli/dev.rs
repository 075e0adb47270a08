//! `ferry dev` as a newcomer runs it: one process, embedded engine; a token from `ferry token`; a job submitted
//! over HTTP is run by the embedded worker and its result read back.

use std::process::Stdio;
use std::time::{Duration, Instant};

use crate::support::{Proc, ferry, poll_json, remaining, submit, until_completed, until_healthy};

const SECRET: &str = "0123456789abcdef0123456789abcdef-dev-test";

#[tokio::test]
async fn dev_runs_a_submitted_job_end_to_end() {
    let (_dev, listen) = Proc::spawn_gateway(
        ferry()
            .args(["dev"])
            .env("FERRY_JWT_SECRET", SECRET)
            .env("FERRY_LOG", "warn,ferry_cli=info")
            .stdout(Stdio::null()),
    )
    .await
    .expect("ferry dev starts");
    let out = ferry()
        .args([
            "token",
            "--sub",
            "alice",
            "--scope",
            "jobs:submit jobs:read",
            "--ttl",
            "10m",
        ])
        .env("FERRY_JWT_SECRET", SECRET)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let token = String::from_utf8(out.stdout).unwrap().trim().to_owned();

    let http = reqwest::Client::new();
    let base = format!("http://{listen}");
    let deadline = Instant::now() + Duration::from_secs(20);
    until_healthy(&http, &base, remaining(deadline))
        .await
        .expect("ferry dev never listened");
    let (id, _) = submit(
        &http,
        &base,
        &token,
        "default",
        &serde_json::json!({"kind": "ferry.echo", "payload": {"hello": "world"}}),
        &[],
    )
    .await
    .unwrap();
    let job = until_completed(&http, &base, &token, &id, remaining(deadline))
        .await
        .unwrap();
    assert_eq!(job["result"], serde_json::json!({"hello": "world"}));
    // The embedded record: the job's audit trail and the listing (the recorder writes within a moment).
    let types = |trail: &serde_json::Value| -> Vec<String> {
        trail["events"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|e| e["type"].as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default()
    };
    let trail = poll_json(
        &http,
        &format!("{base}/v1/jobs/{id}/events"),
        &token,
        remaining(deadline),
        "trail never complete",
        |t| types(t) == ["job.queued", "job.active", "job.completed"],
    )
    .await
    .unwrap();
    assert_eq!(trail["events"][0]["actor"], "alice");
    let list: serde_json::Value = http
        .get(format!("{base}/v1/jobs?state=completed"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(list["jobs"][0]["id"], id.as_str(), "{list}");
    // One registry for the process: `/metrics` shows the embedded worker and recorder beside the gateway.
    let metrics = http
        .get(format!("{base}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for series in [
        "ferry_http_requests_total",
        r#"ferry_jobs_completed_total{kind="ferry.echo",queue="default"} 1"#,
        "ferry_queue_depth",
        "ferry_recorder_",
        "process_resident_memory_bytes",
    ] {
        assert!(
            metrics.contains(series),
            "{series} missing from:\n{metrics}"
        );
    }
    // And Prometheus reads it without a complaint: the gateway and the recorder both export the breaker
    // families, written once.
    let mut check = std::process::Command::new(crate::support::promtool())
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool runs");
    std::io::Write::write_all(&mut check.stdin.take().unwrap(), metrics.as_bytes()).unwrap();
    let out = check.wait_with_output().unwrap();
    let said =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "promtool check metrics refuses ferry dev's /metrics: {said}"
    );
    // Without a token: a problem+json 401.
    let res = http
        .get(format!("{base}/v1/jobs/{id}"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 401);
}

#[test]
fn token_rejects_bad_input_naming_the_flag() {
    let out = ferry()
        .args([
            "token",
            "--sub",
            "a",
            "--scope",
            "jobs:everything",
            "--secret",
            SECRET,
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--scope"));
    let out = ferry()
        .args(["token", "--sub", "a", "--secret", "short"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--secret"));
}

/// What a newcomer sees of `ferry dev` beyond the happy path: the printed curl line ends its output with a
/// newline; `/readyz` checks what dev has (the embedded engine, pub/sub, the in-memory store), not Redis and
/// PostgreSQL; a job of a kind with no handler dies, and its `job.dead` frame on the `user:` channel carries
/// the same error string as `GET /v1/jobs/{id}`; a signal says how long the drain takes and how to skip it.
#[tokio::test]
async fn dev_reports_what_it_has_and_says_how_it_stops() {
    use futures::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;

    let port = ferry_testkit::free_port();
    let listen = format!("127.0.0.1:{port}");
    let dir = tempfile::tempdir().unwrap();
    let stdout = dir.path().join("stdout");
    let mut dev = Proc::spawn_logged(
        ferry()
            .args(["dev", "--listen", &listen, "--drain-delay-ms", "300"])
            .env_remove("FERRY_JWT_SECRET")
            .env("FERRY_LOG", "info")
            .stdout(std::fs::File::create(&stdout).unwrap()),
    )
    .expect("ferry dev starts");
    let http = reqwest::Client::new();
    let base = format!("http://{listen}");
    let deadline = Instant::now() + Duration::from_secs(20);
    until_healthy(&http, &base, remaining(deadline))
        .await
        .expect("ferry dev never listened");
    let printed = std::fs::read_to_string(&stdout).unwrap();
    assert!(printed.contains("curl -s -w '\\n' -X POST"), "{printed}");
    let token = printed
        .lines()
        .find_map(|l| l.trim().strip_prefix("export FERRY_TOKEN="))
        .expect("an admin token")
        .to_owned();

    let ready: serde_json::Value = http
        .get(format!("{base}/readyz"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let checks: Vec<&String> = ready["checks"].as_object().unwrap().keys().collect();
    assert_eq!(checks, ["engine", "pubsub", "store"], "{ready}");
    assert_eq!(ready["status"], "ready", "{ready}");

    // Connect first, then submit: the `user:` channel carries every event of the subject's jobs.
    let (mut ws, _) =
        tokio_tungstenite::connect_async(format!("ws://{listen}/v1/ws?token={token}"))
            .await
            .unwrap();
    ws.send(Message::text(r#"{"id":1,"op":"ping"}"#))
        .await
        .unwrap();
    let (id, _) = submit(
        &http,
        &base,
        &token,
        "default",
        &serde_json::json!({"kind": "email.send", "payload": {}, "max_attempts": 1}),
        &[],
    )
    .await
    .unwrap();
    let dead = loop {
        let frame = tokio::time::timeout(remaining(deadline), ws.next())
            .await
            .expect("no job.dead frame")
            .unwrap()
            .unwrap();
        let Message::Text(text) = frame else { continue };
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        if v["event"] == "job.dead" && v["data"]["id"] == id.as_str() {
            break v;
        }
    };
    let job = poll_json(
        &http,
        &format!("{base}/v1/jobs/{id}"),
        &token,
        remaining(deadline),
        "job never dead",
        |j| j["state"] == "dead",
    )
    .await
    .unwrap();
    assert!(job["error"].is_string(), "{job}");
    assert_eq!(dead["data"]["error"], job["error"], "{dead}\n{job}");

    dev.sigterm().unwrap();
    let status = dev.wait_exit(Duration::from_secs(20)).await.unwrap();
    assert!(status.success(), "{status:?}\n{}", dev.log());
    let log = dev.log();
    assert!(
        log.contains("draining for 0.3 s") && log.contains("a second Ctrl-C exits at once"),
        "{log}"
    );
}

/// `ferry token --help` lists what minting a token uses, not the process-wide logging and tracing flags.
#[test]
fn token_help_lists_only_its_own_flags() {
    let out = ferry().args(["token", "--help"]).output().unwrap();
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for flag in ["--sub", "--scope", "--ttl", "--secret"] {
        assert!(help.contains(flag), "{flag} missing:\n{help}");
    }
    for flag in [
        "--log",
        "--otlp-endpoint",
        "--otlp-service-name",
        "--log-format",
    ] {
        assert!(!help.contains(flag), "{flag} listed:\n{help}");
    }
    // Still accepted (a shared environment or script may pass them), and ignored.
    let out = ferry()
        .args(["token", "--sub", "a", "--log", "debug", "--secret", SECRET])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
