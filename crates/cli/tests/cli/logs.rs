//! No secret ever reaches a log line: real `ferry gateway` and `ferry worker` processes at `debug` level, in JSON,
//! given a JWT secret, tokens (good and bad) and a database URL with a password, doing real work.

use std::process::Stdio;
use std::time::{Duration, Instant};

use ferry_testkit::{PostgresServer, RedisServer};
use serde_json::json;

use crate::support::{self, Proc, ferry, poll_json, remaining, submit, until_ready};

const SECRET: &str = "log-test-secret-0123456789abcdefghij";
const DB_PASSWORD: &str = "db-pass-Zq8w";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_never_appear_in_logs() {
    let redis = RedisServer::start().unwrap();
    let pg = PostgresServer::start().unwrap();
    let db = pg.create_database("logs").unwrap();
    // Trust auth accepts any password, so the URL works and still carries one.
    let db = db.replacen(
        "postgres://postgres@",
        &format!("postgres://postgres:{DB_PASSWORD}@"),
        1,
    );
    assert!(db.contains(DB_PASSWORD), "{db}");
    let dir = tempfile::tempdir().unwrap();
    let command = |name: &str, args: &[&str]| {
        let mut cmd = ferry();
        cmd.args(args)
            .env("FERRY_LOG", "debug")
            .env("FERRY_LOG_FORMAT", "json")
            // No fixed admin port to fight over with the other tests.
            .env("FERRY_ADMIN_LISTEN", "off")
            .stdout(Stdio::from(
                std::fs::File::create(dir.path().join(format!("{name}.out"))).unwrap(),
            ));
        cmd
    };
    let spawn = |name: &str, args: &[&str]| {
        let log = dir.path().join(format!("{name}.log"));
        let child = Proc::spawn(
            command(name, args).stderr(Stdio::from(std::fs::File::create(&log).unwrap())),
        )
        .unwrap();
        (child, log)
    };
    let url = redis.url();
    // The gateway on port 0: its stderr is read (Proc::log) for the address it bound.
    let (mut gw, line) = Proc::spawn_listening(
        &mut command(
            "gateway",
            &[
                "gateway",
                "--redis",
                &url,
                "--listen",
                "127.0.0.1:0",
                "--jwt-secret",
                SECRET,
                "--database-url",
                &db,
                "--migrate",
            ],
        ),
        "gateway listening",
    )
    .await
    .unwrap();
    let listen = support::announced(&line, "listen").unwrap();
    let (mut wk, wk_log) = spawn(
        "worker",
        &[
            "worker",
            "--redis",
            &url,
            "--queues",
            "q",
            "--database-url",
            &db,
        ],
    );
    let token = support::token(
        SECRET,
        "alice",
        &["jobs:submit", "jobs:read"],
        Duration::from_secs(600),
    );
    let http = reqwest::Client::new();
    let base = format!("http://{listen}");
    let deadline = Instant::now() + Duration::from_secs(30);
    until_ready(&http, &base, remaining(deadline))
        .await
        .expect("gateway never ready");
    let trace = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let (id, _) = submit(
        &http,
        &base,
        &token,
        "q",
        &json!({"kind": "ferry.echo", "payload": {"x": 1}}),
        &[("x-request-id", "req-logs-1"), ("traceparent", trace)],
    )
    .await
    .unwrap();
    // A tampered token, and a token in the query string of a WebSocket upgrade.
    let bad = format!("{token}x");
    let r = http
        .get(format!("{base}/v1/jobs/{id}"))
        .bearer_auth(&bad)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let _ = http.get(format!("{base}/v1/ws?token={bad}")).send().await;
    // Let the job run and be recorded, then read it back from the record.
    poll_json(
        &http,
        &format!("{base}/v1/jobs/{id}/events"),
        &token,
        remaining(deadline),
        "job never recorded",
        |v| v["events"].as_array().is_some_and(|a| a.len() == 3),
    )
    .await
    .unwrap();
    for p in [&gw, &wk] {
        let _ = p.sigterm();
    }
    for p in [&mut gw, &mut wk] {
        let _ = p.wait_exit(Duration::from_secs(30)).await;
    }
    // One id follows the job into the worker: its attempt's log line carries the correlation and trace ids.
    let worker_text = std::fs::read_to_string(&wk_log).unwrap();
    let line = worker_text
        .lines()
        .find(|l| l.contains("attempt finished") && l.contains(&id))
        .unwrap_or_else(|| panic!("no attempt line for {id}:\n{worker_text}"));
    let v: serde_json::Value = serde_json::from_str(line).unwrap();
    let span = v["span"].clone();
    assert_eq!(span["correlation_id"], "req-logs-1", "{line}");
    assert_eq!(
        span["trace_id"], "4bf92f3577b34da6a3ce929d0e0e4736",
        "{line}"
    );
    let logs = [
        ("the gateway's stderr", gw.log()),
        (
            "the worker's stderr",
            std::fs::read_to_string(&wk_log).unwrap(),
        ),
    ];
    for (log, text) in logs {
        assert!(
            text.lines().count() > 3,
            "debug logging produced lines: {text}"
        );
        for secret in [SECRET, DB_PASSWORD, token.as_str(), bad.as_str()] {
            assert!(
                !text.contains(secret),
                "{} leaked into {log}:\n{text}",
                &secret[..8],
            );
        }
        // The token's signature alone must not show either.
        let sig = token.rsplit('.').next().unwrap();
        assert!(!text.contains(sig), "a token signature leaked into {log}");
    }
}
