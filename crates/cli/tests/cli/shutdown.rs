//! Graceful shutdown and readiness with real processes: `ferry gateway` and `ferry worker` binaries against a
//! real `redis-server` (ferry-testkit), signalled as an orchestrator would.

use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use ferry_broker::prelude::*;
use ferry_core::{JobId, JobState, Kind, NewJob, QueueName};
use ferry_testkit::{RedisServer, eventually};
use futures::StreamExt;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

use crate::support::{
    self, Proc, assert_completed_once, count_completions, enqueue_many, ferry, readyz,
    redis_and_broker, states, until_drained, until_ready,
};

const SECRET: &str = "shutdown-test-secret-shutdown-test-secret";

/// A `ferry` child process, its log inherited, so the test runner shows it next to a failure.
fn spawn(args: &[&str]) -> Result<Proc> {
    spawn_to(args, Stdio::inherit())
}

/// With the log going to `stderr` instead of the test's own.
fn spawn_to(args: &[&str], stderr: impl Into<Stdio>) -> Result<Proc> {
    Proc::spawn(command(args).stderr(stderr))
}

fn command(args: &[&str]) -> Command {
    let mut cmd = ferry();
    cmd.args(args)
        .env(
            "FERRY_LOG",
            "warn,ferry_gateway=info,ferry_worker=info,ferry_cli=info",
        )
        .env_remove("FERRY_LOG_FORMAT")
        .env_remove("FERRY_CONFIG")
        // Two workers on one machine: no fixed admin port to fight over.
        .env("FERRY_ADMIN_LISTEN", "off")
        .stdin(Stdio::null())
        .stdout(Stdio::null());
    cmd
}

/// A readiness probe: when (since the signal) and the status, `None` when the connection was refused.
type Sample = (Duration, Option<u16>);

fn token() -> String {
    token_for("alice")
}

fn token_for(sub: &str) -> String {
    support::token(
        SECRET,
        sub,
        &["jobs:submit", "jobs:read", "subscribe"],
        Duration::from_secs(3600),
    )
}

/// A `ferry gateway` on port 0, once it listens: the process (its log goes on to the test's) and its address.
async fn spawn_gateway(redis: &str, extra: &[&str]) -> Result<(Proc, String)> {
    let mut args = vec!["gateway", "--redis", redis, "--jwt-secret", SECRET];
    args.extend_from_slice(extra);
    Proc::spawn_gateway(&mut command(&args)).await
}

/// SIGTERM with a WebSocket client connected: /readyz goes 503 while the listener still answers, a batch of
/// 1000 jobs submitted during the drain delay is accepted, the client gets `goaway` then 1001 within the
/// spread, and the process exits 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_gateway_drains_websockets_and_http_then_exits_0() -> Result<()> {
    const DELAY: u64 = 1_500;
    const SPREAD: u64 = 1_000;
    let redis = RedisServer::start()?;
    let (mut gw, addr) = spawn_gateway(
        &redis.url(),
        &[
            "--drain-delay-ms",
            &DELAY.to_string(),
            "--ws-close-spread-ms",
            &SPREAD.to_string(),
            "--shutdown-deadline-ms",
            "15000",
        ],
    )
    .await?;
    let base = format!("http://{addr}");
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()?;
    let ready = until_ready(&http, &base, Duration::from_secs(20)).await?;
    assert_eq!(ready["checks"]["pubsub"]["ok"], true, "{ready}");

    let (mut ws, _) =
        tokio_tungstenite::connect_async(format!("ws://{addr}/v1/ws?token={}", token()))
            .await
            .context("upgrade")?;

    // Times are from the signal on.
    let t0 = Instant::now();
    // The client reads all along, as a client does. (The batch below is submitted by another subject: had it
    // been this client's, its 1000 `submitted` events on the client's own `user:` channel could overflow the
    // 256-frame send queue of a client on a loaded machine, which is rightly closed 4009 before any goaway.)
    let reader = tokio::spawn(async move {
        let mut goaway_at = None;
        let code = loop {
            let m = tokio::time::timeout(Duration::from_secs(10), ws.next())
                .await
                .context("a frame in time")?
                .context("stream open")??;
            match m {
                Message::Text(t) => {
                    let v: Value = serde_json::from_str(t.as_str())?;
                    if v["type"] == "goaway" {
                        assert!(v["reconnect_after_ms"].as_u64().unwrap() < SPREAD, "{v}");
                        goaway_at = Some(t0.elapsed());
                    }
                }
                Message::Close(Some(f)) => break u16::from(f.code),
                Message::Close(None) => bail!("closed without a code"),
                _ => {}
            }
        };
        anyhow::Ok((goaway_at, code, t0.elapsed()))
    });

    // Probe readiness every 20 ms from the signal on: (time since the signal, status or None if refused).
    let samples: Arc<Mutex<Vec<Sample>>> = Arc::default();
    gw.sigterm()?;
    let prober = {
        let (samples, http, base) = (samples.clone(), http.clone(), base.clone());
        tokio::spawn(async move {
            let mut refused = 0;
            while refused < 10 {
                let status = readyz(&http, &base).await.ok().map(|(s, _)| s);
                refused = if status.is_none() { refused + 1 } else { 0 };
                samples.lock().unwrap().push((t0.elapsed(), status));
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };

    // A slow request issued during the drain delay still completes.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let jobs: Vec<Value> = (0..1000)
        .map(|i| json!({"kind": "ferry.noop", "payload": {"i": i}}))
        .collect();
    let res = http
        .post(format!("{base}/v1/queues/drain/jobs/batch"))
        .bearer_auth(token_for("bob"))
        .json(&json!({ "jobs": jobs }))
        .send()
        .await
        .context("batch submit during the drain delay")?;
    assert!(res.status().is_success(), "{}", res.status());

    // goaway, then 1001.
    let (goaway_at, code, closed_at) = reader.await??;
    let goaway_at =
        goaway_at.with_context(|| format!("a goaway frame before the close (closed {code})"))?;
    assert_eq!(code, 1001);
    assert!(
        goaway_at >= Duration::from_millis(DELAY - 100),
        "goaway only after the drain delay: {goaway_at:?}"
    );
    assert!(
        closed_at <= goaway_at + Duration::from_millis(SPREAD + 500),
        "closed within the spread: goaway {goaway_at:?}, close {closed_at:?}"
    );

    let status = gw.wait_exit(Duration::from_secs(10)).await?;
    assert_eq!(status.code(), Some(0), "a clean drain exits 0");
    prober.await?;

    let samples = samples.lock().unwrap().clone();
    let first_503 = samples
        .iter()
        .position(|(_, s)| *s == Some(503))
        .context("readyz answered 503")?;
    let first_refused = samples
        .iter()
        .position(|(_, s)| s.is_none())
        .context("the listener closed")?;
    assert!(first_503 < first_refused, "{samples:?}");
    // A probe that reaches the process before the signal has been handled may still be answered 200 (the
    // signal is asynchronous; a loaded machine has measured 8 ms); from the first 503 on, never ready again.
    assert!(
        samples[first_503..].iter().all(|(_, s)| *s != Some(200)),
        "never ready again once draining: {samples:?}"
    );
    assert!(
        samples[first_503].0 < Duration::from_millis(DELAY / 2),
        "readiness turned at once: {samples:?}"
    );
    assert!(
        samples[first_refused].0 >= Duration::from_millis(DELAY - 100),
        "the listener stayed open through the drain delay: {samples:?}"
    );

    // The batch accepted during the drain is all there.
    let broker = support::test_broker(&redis.url()).await?;
    assert_eq!(broker.stats(&QueueName::parse("drain")?).await?.depth, 1000);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_flags_are_validated_naming_the_flag() -> Result<()> {
    let out = ferry()
        .args([
            "gateway",
            "--redis",
            "redis://127.0.0.1:1",
            "--jwt-secret",
            SECRET,
            "--drain-delay-ms",
            "5000",
            "--ws-close-spread-ms",
            "10000",
            "--shutdown-deadline-ms",
            "15000",
        ])
        .env_remove("FERRY_CONFIG")
        .output()?;
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--shutdown-deadline-ms"), "{err}");
    assert!(err.contains("--drain-delay-ms"), "{err}");
    Ok(())
}

/// SIGTERM to one of two workers under load (2,000 × 20 ms sleeps, concurrency 50 each): it exits 0, and once
/// the other has drained the rest every job completed exactly once, none lost, none left active.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_worker_under_load_loses_no_job() -> Result<()> {
    let (_redis, url, broker) = redis_and_broker().await?;
    let q = QueueName::parse("shutdown-load")?;

    let completed = count_completions(&broker).await?;
    let job = NewJob::new(Kind::parse("ferry.sleep")?, json!({"ms": 20}));
    let ids = enqueue_many(&broker, &q, 2000, job).await?;

    let worker = |extra: &[&str]| {
        let mut args = vec!["worker", "--redis", &url, "--queues", q.as_str()];
        args.extend_from_slice(extra);
        spawn(&args)
    };
    let mut first = worker(&["--concurrency", "50", "--drain-timeout-ms", "20000"])?;
    let mut second = worker(&["--concurrency", "50"])?;
    // Mid-load: some jobs done, plenty still waiting.
    eventually(Duration::from_secs(30), "100 completions", || async {
        Ok((completed.lock().unwrap().len() >= 100).then_some(()))
    })
    .await?;
    first.sigterm()?;
    let at_signal = broker.stats(&q).await?;
    assert!(
        at_signal.depth + at_signal.active > 0,
        "the signal landed under load: {at_signal:?}"
    );
    let status = first.wait_exit(Duration::from_secs(30)).await?;
    assert_eq!(status.code(), Some(0), "graceful drain exits 0");

    until_drained(
        &broker,
        &q,
        Duration::from_secs(60),
        "the second worker to drain the rest",
    )
    .await?;
    // Every job's own record says completed (a sample: a lookup costs tens of milliseconds on a debug build;
    // the completion events below cover all 2,000).
    let sample: Vec<JobId> = ids.iter().step_by(10).copied().collect();
    let by_state = states(&broker, &sample).await?;
    assert_eq!(
        by_state.get(&JobState::Completed),
        Some(&sample.len()),
        "{by_state:?}"
    );
    assert_completed_once(&completed, &ids, Duration::from_millis(300)).await?;

    assert_eq!(second.stop(Duration::from_secs(30)).await?.code(), Some(0));
    Ok(())
}

/// `ferry dev` runs the jobs accepted during its gateway's drain delay: its embedded worker drains only after
/// the gateway has, so nothing accepted is left in the in-memory engine when the process exits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_dev_runs_jobs_accepted_during_the_drain_delay() -> Result<()> {
    let (mut dev, line) = Proc::spawn_listening(
        ferry()
            .args(["dev", "--listen", "127.0.0.1:0"])
            .args(["--drain-delay-ms", "4000", "--ws-close-spread-ms", "100"])
            .env("FERRY_JWT_SECRET", SECRET)
            .env_remove("FERRY_CONFIG")
            .env("FERRY_LOG", "warn,ferry_cli=info")
            .stdin(Stdio::null())
            .stdout(Stdio::null()),
        "gateway listening",
    )
    .await?;
    let base = format!("http://{}", support::announced(&line, "listen")?);
    let http = reqwest::Client::new();
    until_ready(&http, &base, Duration::from_secs(30)).await?;
    dev.sigterm()?;
    eventually(Duration::from_secs(5), "readyz 503", || async {
        Ok((readyz(&http, &base).await.map(|(s, _)| s).ok() == Some(503)).then_some(()))
    })
    .await?;
    let t = token();
    let (id, _) = support::submit(
        &http,
        &base,
        &t,
        "default",
        &json!({"kind": "ferry.echo", "payload": {"late": true}}),
        &[],
    )
    .await?;
    let job = support::until_completed(&http, &base, &t, &id, Duration::from_secs(3))
        .await
        .with_context(|| dev.log())?;
    assert_eq!(job["result"], json!({"late": true}), "{job}");
    let status = dev.wait_exit(Duration::from_secs(30)).await?;
    assert!(status.success(), "{status}\n{}", dev.log());
    Ok(())
}

/// A worker whose drain hangs (Redis frozen with SIGSTOP: the claim in progress and the lease release cannot
/// finish) still exits at `--shutdown-deadline-ms`, with 70, naming the job it still held.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_past_its_shutdown_deadline_exits_70_naming_the_jobs_it_held() -> Result<()> {
    let (redis, url, broker) = redis_and_broker().await?;
    let q = QueueName::parse("stuck")?;
    let id = broker
        .enqueue(
            &q,
            NewJob::new(Kind::parse("ferry.sleep")?, json!({"ms": 60_000})),
        )
        .await?
        .id;
    let log_path = redis.dir().join("worker.log");
    let log = std::fs::File::create(&log_path)?;
    let mut worker = spawn_to(
        &[
            "worker",
            "--redis",
            &url,
            "--queues",
            q.as_str(),
            "--drain-timeout-ms",
            "300",
            "--cancel-grace-ms",
            "100",
            "--flush-timeout-ms",
            "300",
            "--shutdown-deadline-ms",
            "2000",
        ],
        log,
    )?;
    eventually(Duration::from_secs(20), "the job to start", || async {
        Ok((broker.stats(&q).await?.active == 1).then_some(()))
    })
    .await?;
    let pid = redis.pid().context("redis pid")?.to_string();
    let signal = |sig: &str| Command::new("kill").args([sig, &pid]).status();
    assert!(signal("-STOP")?.success());
    let stopped_at = Instant::now();
    worker.sigterm()?;
    let status = worker.wait_exit(Duration::from_secs(15)).await;
    assert!(signal("-CONT")?.success());
    let status = status?;
    let took = stopped_at.elapsed();
    let log = std::fs::read_to_string(&log_path)?;
    assert_eq!(status.code(), Some(70), "{log}");
    assert!(
        took >= Duration::from_secs(2),
        "not before the deadline: {took:?}"
    );
    let line = log
        .lines()
        .find(|l| l.contains("shutdown deadline passed"))
        .with_context(|| format!("no deadline line in:\n{log}"))?;
    assert!(line.contains(&id.to_string()), "{line}");
    assert!(line.contains("jobs_held=1"), "{line}");
    // Nothing was lost: the job is still held by the dead worker's lease, to be reclaimed when it expires.
    assert_eq!(broker.stats(&q).await?.active, 1);
    Ok(())
}

/// `/readyz` fails when pub/sub is broken while PING still works, and recovers.
///
/// Broken for real, deterministically: `ACL SETUSER default resetchannels` takes every pub/sub channel away
/// from the user the gateway connects as. Redis disconnects its subscribers and refuses their resubscription
/// and every PUBLISH (NOPERM), while PING, which touches no channel, still answers. Restoring `allchannels`
/// lets the engine's reconnect loop resubscribe. Then `CLIENT KILL TYPE pubsub` drops the node's pub/sub
/// connections outright: the engine resubscribes, and readiness must come back on its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_fails_while_pubsub_is_broken_and_ping_works() -> Result<()> {
    let redis = RedisServer::start()?;
    let (_gw, addr) = spawn_gateway(&redis.url(), &["--drain-delay-ms", "0"]).await?;
    let base = format!("http://{addr}");
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()?;
    let ready = until_ready(&http, &base, Duration::from_secs(20)).await?;
    assert_eq!(ready["checks"]["pubsub"]["ok"], true, "{ready}");

    redis.cli(&["ACL", "SETUSER", "default", "resetchannels"])?;
    let (status, body) = readyz(&http, &base).await?;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["status"], "unready", "{body}");
    assert_eq!(
        body["checks"]["redis"]["ok"], true,
        "PING still works: {body}"
    );
    assert_eq!(body["checks"]["pubsub"]["ok"], false, "{body}");
    assert!(body["checks"]["pubsub"]["error"].is_string(), "{body}");

    redis.cli(&["ACL", "SETUSER", "default", "allchannels"])?;
    let ready = until_ready(&http, &base, Duration::from_secs(20)).await?;
    assert_eq!(ready["checks"]["pubsub"]["ok"], true, "{ready}");

    let killed = redis.cli(&["CLIENT", "KILL", "TYPE", "pubsub"])?;
    assert!(killed.trim().parse::<u32>()? >= 1, "killed {killed:?}");
    let ready = until_ready(&http, &base, Duration::from_secs(20)).await?;
    assert_eq!(ready["checks"]["pubsub"]["ok"], true, "{ready}");
    Ok(())
}
