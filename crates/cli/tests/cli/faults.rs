//! Fault tests with real processes: real `ferry worker` binaries against a real `redis-server` (ferry-testkit),
//! killed, restarted and signalled as an operator or a crash would.

use std::process::Stdio;
use std::time::Duration;

use anyhow::Result;
use ferry_broker::{EngineConfig, RedisBroker, prelude::*};
use ferry_core::{JobState, Kind, NewJob, QueueName};
use ferry_testkit::{RedisServer, eventually};
use serde_json::json;

use crate::support::{
    Proc, announced, assert_completed_once, count_completions, enqueue_many, ferry,
    redis_and_broker, sample, states, until_drained,
};

/// A `ferry worker` on `queue`, its log inherited, so the test runner shows it next to a failure.
fn spawn_worker(redis_url: &str, queue: &str, extra: &[&str]) -> Result<Proc> {
    Proc::spawn(
        ferry()
            .args(["worker", "--redis", redis_url, "--queues", queue])
            .args(extra)
            .env("FERRY_LOG", "warn,ferry_worker=info,ferry_cli=info")
            .env_remove("FERRY_LOG_FORMAT")
            // Several workers on one machine: no fixed admin port to fight over.
            .env("FERRY_ADMIN_LISTEN", "off")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit()),
    )
}

fn sleep_job(ms: u64) -> NewJob {
    NewJob::new(Kind::parse("ferry.sleep").unwrap(), json!({ "ms": ms }))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_worker_holding_1000_jobs_loses_none_and_completes_none_twice() -> Result<()> {
    let redis = RedisServer::start()?;
    let url = redis.url();
    let engine = EngineConfig {
        visibility_timeout: Duration::from_secs(2),
        ..EngineConfig::default()
    };
    let broker = RedisBroker::connect(std::slice::from_ref(&url), engine).await?;
    let q = QueueName::parse("faults-kill")?;

    // Count job.completed events per job, from before the first enqueue.
    let completed = count_completions(&broker).await?;

    let ids = enqueue_many(&broker, &q, 1000, sleep_job(3_000)).await?;
    let args = [
        "--concurrency",
        "1000",
        "--batch-size",
        "100",
        "--visibility-timeout-ms",
        "2000",
    ];
    let mut first = spawn_worker(&url, q.as_str(), &args)?;
    eventually(
        Duration::from_secs(30),
        "the first worker to hold all 1000 jobs",
        || async { Ok((broker.stats(&q).await?.active == 1000).then_some(())) },
    )
    .await?;
    first.kill9();

    let mut second = spawn_worker(&url, q.as_str(), &args)?;
    until_drained(
        &broker,
        &q,
        Duration::from_secs(90),
        "all 1000 jobs to complete",
    )
    .await?;
    let by_state = states(&broker, &ids).await?;
    assert_eq!(
        by_state.get(&JobState::Completed),
        Some(&1000),
        "{by_state:?}"
    );

    // Exactly one job.completed per job: none lost, none completed twice. Anything late would show up as a
    // second completion; give it a moment.
    assert_completed_once(&completed, &ids, Duration::from_millis(500)).await?;

    assert!(second.alive());
    let status = second.stop(Duration::from_secs(30)).await?;
    assert_eq!(status.code(), Some(0));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_survives_a_redis_restart_and_resumes() -> Result<()> {
    let (mut redis, url, broker) = redis_and_broker().await?;
    let q = QueueName::parse("faults-restart")?;
    let noop = NewJob::new(Kind::parse("ferry.noop")?, json!(null));

    let mut worker = spawn_worker(&url, q.as_str(), &["--concurrency", "20"])?;
    let before = enqueue_many(&broker, &q, 50, noop.clone()).await?;
    eventually(
        Duration::from_secs(30),
        "jobs before the restart",
        || async {
            Ok(
                (states(&broker, &before).await?.get(&JobState::Completed) == Some(&50))
                    .then_some(()),
            )
        },
    )
    .await?;

    redis.stop()?;
    // The worker is now failing every call: it must keep retrying, not exit.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(worker.alive(), "the worker exited while redis was down");
    redis.restart()?;

    // Our own client reconnects too; retry its first call until it does.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let after = loop {
        match enqueue_many(&broker, &q, 50, noop.clone()).await {
            Ok(ids) => break ids,
            Err(e) if tokio::time::Instant::now() >= deadline => {
                return Err(e.context("enqueue after the restart"));
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    };
    eventually(
        Duration::from_secs(60),
        "jobs after the restart",
        || async {
            Ok(
                (states(&broker, &after).await?.get(&JobState::Completed) == Some(&50))
                    .then_some(()),
            )
        },
    )
    .await?;
    // Data written before the restart survived it (AOF).
    assert_eq!(
        states(&broker, &before).await?.get(&JobState::Completed),
        Some(&50)
    );

    assert!(worker.alive());
    assert_eq!(worker.stop(Duration::from_secs(30)).await?.code(), Some(0));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_in_flight_jobs_and_exits_0() -> Result<()> {
    let (_redis, url, broker) = redis_and_broker().await?;
    let q = QueueName::parse("faults-sigterm")?;
    let ids = enqueue_many(&broker, &q, 20, sleep_job(1_500)).await?;

    let mut cmd = ferry();
    cmd.args(["worker", "--redis", &url, "--queues", q.as_str()])
        .args(["--concurrency", "5", "--drain-timeout-ms", "10000"])
        .args(["--admin-listen", "127.0.0.1:0"])
        .env("FERRY_LOG", "warn,ferry_worker=info,ferry_cli=info")
        .env_remove("FERRY_LOG_FORMAT")
        .stdin(Stdio::null())
        .stdout(Stdio::null());
    let (mut worker, line) = Proc::spawn_listening(&mut cmd, "admin listening").await?;
    let metrics = format!("http://{}/metrics", announced(&line, "admin")?);
    // Claimed is not yet running: a lease the worker has not handed to a handler when the drain starts is
    // released, not run. Wait for the handlers themselves.
    let started = r#"ferry_jobs_started_total{kind="ferry.sleep",queue="faults-sigterm"}"#;
    eventually(Duration::from_secs(30), "5 running jobs", || async {
        let text = reqwest::get(&metrics).await?.text().await?;
        Ok((sample(&text, started) == Some(5.0)).then_some(()))
    })
    .await?;
    assert_eq!(broker.stats(&q).await?.active, 5);
    let status = worker.stop(Duration::from_secs(20)).await?;
    assert_eq!(status.code(), Some(0), "graceful drain exits 0");

    // The running jobs were finished, not abandoned; the rest wait for the next worker.
    let s = broker.stats(&q).await?;
    assert_eq!(s.active, 0, "no lease left behind: {s:?}");
    let by_state = states(&broker, &ids).await?;
    let done = by_state.get(&JobState::Completed).copied().unwrap_or(0);
    let queued = by_state.get(&JobState::Queued).copied().unwrap_or(0);
    assert!(done >= 5, "{by_state:?}");
    assert_eq!(done + queued, 20, "{by_state:?}");
    Ok(())
}
