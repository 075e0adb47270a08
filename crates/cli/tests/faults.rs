//! Fault tests with real processes: real `ferry worker` binaries against a real `redis-server` (ferry-testkit),
//! killed, restarted and signalled as an operator or a crash would.

use std::collections::HashMap;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use ferry_broker::{Broker, EngineConfig, RedisBroker};
use ferry_core::{EventType, JobId, JobState, Kind, NewJob, QueueName};
use ferry_testkit::RedisServer;
use futures::StreamExt;
use serde_json::json;

/// A `ferry worker` child process, SIGKILLed if the test ends without stopping it.
struct WorkerProc {
    child: Child,
}

impl WorkerProc {
    fn spawn(redis_url: &str, queue: &str, extra: &[&str]) -> Result<Self> {
        let child = Command::new(env!("CARGO_BIN_EXE_ferry"))
            .args(["worker", "--redis", redis_url, "--queues", queue])
            .args(extra)
            .env("FERRY_LOG", "warn,ferry_worker=info,ferry_cli=info")
            .env_remove("FERRY_LOG_FORMAT")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            // Inherited, so the test runner shows the worker's log next to a failure.
            .stderr(Stdio::inherit())
            .spawn()
            .context("spawn ferry worker")?;
        Ok(Self { child })
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    fn sigterm(&self) -> Result<()> {
        let ok = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status()?
            .success();
        if !ok {
            bail!("kill -TERM {} failed", self.pid());
        }
        Ok(())
    }

    async fn wait_exit(&mut self, within: Duration) -> Result<ExitStatus> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status);
            }
            if tokio::time::Instant::now() >= deadline {
                bail!("worker {} did not exit within {within:?}", self.pid());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for WorkerProc {
    fn drop(&mut self) {
        self.kill9();
    }
}

async fn wait_for<F, Fut>(within: Duration, what: &str, mut check: F) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<bool>>,
{
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if check().await? {
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            bail!("timed out after {within:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn sleep_job(ms: u64) -> NewJob {
    NewJob::new(Kind::parse("ferry.sleep").unwrap(), json!({ "ms": ms }))
}

async fn enqueue_many(
    broker: &dyn Broker,
    q: &QueueName,
    n: usize,
    job: NewJob,
) -> Result<Vec<JobId>> {
    let mut ids = Vec::with_capacity(n);
    while ids.len() < n {
        let batch = (n - ids.len()).min(500);
        let done = broker.enqueue_batch(q, vec![job.clone(); batch]).await?;
        ids.extend(done.into_iter().map(|e| e.id));
    }
    Ok(ids)
}

async fn states(broker: &dyn Broker, ids: &[JobId]) -> Result<HashMap<JobState, usize>> {
    let mut out = HashMap::new();
    for id in ids {
        let info = broker
            .job(*id)
            .await?
            .with_context(|| format!("job {id} exists"))?;
        *out.entry(info.state).or_default() += 1;
    }
    Ok(out)
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
    let completed: Arc<Mutex<HashMap<JobId, u32>>> = Arc::default();
    let mut events = broker.subscribe().await?;
    {
        let completed = completed.clone();
        tokio::spawn(async move {
            while let Some(e) = events.next().await {
                if e.ty == EventType::Completed {
                    *completed.lock().unwrap().entry(e.job).or_default() += 1;
                }
            }
        });
    }

    let ids = enqueue_many(&broker, &q, 1000, sleep_job(3_000)).await?;
    let args = [
        "--concurrency",
        "1000",
        "--batch-size",
        "100",
        "--visibility-timeout-ms",
        "2000",
    ];
    let mut first = WorkerProc::spawn(&url, q.as_str(), &args)?;
    wait_for(
        Duration::from_secs(30),
        "the first worker to hold all 1000 jobs",
        || async { Ok(broker.stats(&q).await?.active == 1000) },
    )
    .await?;
    first.kill9();

    let mut second = WorkerProc::spawn(&url, q.as_str(), &args)?;
    wait_for(
        Duration::from_secs(90),
        "all 1000 jobs to complete",
        || async {
            let s = broker.stats(&q).await?;
            Ok(s.depth == 0 && s.active == 0 && s.scheduled == 0 && s.dead == 0)
        },
    )
    .await?;
    let by_state = states(&broker, &ids).await?;
    assert_eq!(
        by_state.get(&JobState::Completed),
        Some(&1000),
        "{by_state:?}"
    );

    // Exactly one job.completed per job: none lost, none completed twice.
    wait_for(
        Duration::from_secs(10),
        "1000 completion events",
        || async { Ok(completed.lock().unwrap().len() == 1000) },
    )
    .await?;
    // Anything late would show up as a second completion; give it a moment.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let counts = completed.lock().unwrap().clone();
    let twice: Vec<_> = counts.iter().filter(|(_, n)| **n != 1).collect();
    assert!(twice.is_empty(), "completed more than once: {twice:?}");
    assert!(ids.iter().all(|id| counts.contains_key(id)));

    assert!(second.alive());
    second.sigterm()?;
    let status = second.wait_exit(Duration::from_secs(30)).await?;
    assert_eq!(status.code(), Some(0));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_survives_a_redis_restart_and_resumes() -> Result<()> {
    let mut redis = RedisServer::start()?;
    let url = redis.url();
    let broker = RedisBroker::connect(std::slice::from_ref(&url), EngineConfig::default()).await?;
    let q = QueueName::parse("faults-restart")?;
    let noop = NewJob::new(Kind::parse("ferry.noop")?, json!(null));

    let mut worker = WorkerProc::spawn(&url, q.as_str(), &["--concurrency", "20"])?;
    let before = enqueue_many(&broker, &q, 50, noop.clone()).await?;
    wait_for(
        Duration::from_secs(30),
        "jobs before the restart",
        || async { Ok(states(&broker, &before).await?.get(&JobState::Completed) == Some(&50)) },
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
    wait_for(
        Duration::from_secs(60),
        "jobs after the restart",
        || async { Ok(states(&broker, &after).await?.get(&JobState::Completed) == Some(&50)) },
    )
    .await?;
    // Data written before the restart survived it (AOF).
    assert_eq!(
        states(&broker, &before).await?.get(&JobState::Completed),
        Some(&50)
    );

    assert!(worker.alive());
    worker.sigterm()?;
    assert_eq!(
        worker.wait_exit(Duration::from_secs(30)).await?.code(),
        Some(0)
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_in_flight_jobs_and_exits_0() -> Result<()> {
    let redis = RedisServer::start()?;
    let url = redis.url();
    let broker = RedisBroker::connect(std::slice::from_ref(&url), EngineConfig::default()).await?;
    let q = QueueName::parse("faults-sigterm")?;
    let ids = enqueue_many(&broker, &q, 20, sleep_job(1_500)).await?;

    let mut worker = WorkerProc::spawn(
        &url,
        q.as_str(),
        &["--concurrency", "5", "--drain-timeout-ms", "10000"],
    )?;
    wait_for(Duration::from_secs(30), "5 running jobs", || async {
        Ok(broker.stats(&q).await?.active == 5)
    })
    .await?;
    worker.sigterm()?;
    let status = worker.wait_exit(Duration::from_secs(20)).await?;
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
