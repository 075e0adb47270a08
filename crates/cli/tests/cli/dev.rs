//! `ferry dev` as a newcomer runs it: one process, embedded engine; a token from `ferry token`; a job submitted
//! over HTTP is run by the embedded worker and its result read back.

use std::process::Stdio;
use std::time::{Duration, Instant};

use crate::support::{
    Proc, announced, ferry, poll_json, remaining, submit, until_completed, until_healthy,
};

const SECRET: &str = "0123456789abcdef0123456789abcdef-dev-test";

#[tokio::test]
async fn dev_runs_a_submitted_job_end_to_end() {
    let (_dev, line) = Proc::spawn_listening(
        ferry()
            .args(["dev", "--listen", "127.0.0.1:0"])
            .env("FERRY_JWT_SECRET", SECRET)
            .env("FERRY_LOG", "warn,ferry_cli=info")
            .stdout(Stdio::null()),
        "gateway listening",
    )
    .await
    .expect("ferry dev starts");
    let listen = announced(&line, "listen").unwrap();
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
