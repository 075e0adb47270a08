//! `ferry dev` as a newcomer runs it: one process, embedded engine; a token from `ferry token`; a job submitted
//! over HTTP is run by the embedded worker and its result read back.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const SECRET: &str = "0123456789abcdef0123456789abcdef-dev-test";

fn ferry() -> Command {
    Command::new(env!("CARGO_BIN_EXE_ferry"))
}

struct Killed(std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test]
async fn dev_runs_a_submitted_job_end_to_end() {
    let port = ferry_testkit::free_port();
    let listen = format!("127.0.0.1:{port}");
    let _dev = Killed(
        ferry()
            .args(["dev", "--listen", &listen])
            .env("FERRY_JWT_SECRET", SECRET)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("ferry dev starts"),
    );
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
    while http.get(format!("{base}/healthz")).send().await.is_err() {
        assert!(Instant::now() < deadline, "ferry dev never listened");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let res = http
        .post(format!("{base}/v1/queues/default/jobs"))
        .bearer_auth(&token)
        .json(&serde_json::json!({"kind": "ferry.echo", "payload": {"hello": "world"}}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 202);
    let id = res.json::<serde_json::Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    loop {
        let job: serde_json::Value = http
            .get(format!("{base}/v1/jobs/{id}"))
            .bearer_auth(&token)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if job["state"] == "completed" {
            assert_eq!(job["result"], serde_json::json!({"hello": "world"}));
            break;
        }
        assert!(Instant::now() < deadline, "job never completed: {job}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The embedded record: the job's audit trail and the listing (the recorder writes within a moment).
    loop {
        let trail: serde_json::Value = http
            .get(format!("{base}/v1/jobs/{id}/events"))
            .bearer_auth(&token)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let types: Vec<&str> = trail["events"]
            .as_array()
            .map(|a| a.iter().filter_map(|e| e["type"].as_str()).collect())
            .unwrap_or_default();
        if types == ["job.queued", "job.active", "job.completed"] {
            assert_eq!(trail["events"][0]["actor"], "alice");
            break;
        }
        assert!(Instant::now() < deadline, "trail never complete: {trail}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
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
