//! `ferry autoscaler` with the `local` actuator, as real processes: the autoscaler binary starts and stops real
//! `ferry worker` processes against real redis-servers (ferry-testkit), and is observed through its `/metrics`.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use ferry_autoscaler::Actuator;
use ferry_autoscaler::actuator::{Held, Local};
use ferry_autoscaler::config::{ActuatorConfig, RegionsFile};
use ferry_broker::{RedisBroker, prelude::*};
use ferry_core::{JobState, Kind, NewJob, QueueName};
use ferry_testkit::RedisServer;
use serde_json::json;

use crate::support::{Proc, ferry};

/// `ferry autoscaler` on `regions`, deciding every 500 ms, its admin listener on `port`, with `extra` flags; its
/// log captured (read with [`Proc::log`], printed if the test fails).
/// A `ferry autoscaler` whose admin listener is on port 0, once it listens: the process and that port.
async fn autoscaler_with(regions: &std::path::Path, extra: &[&str]) -> Result<(Proc, u16)> {
    let mut cmd = ferry();
    cmd.args(["autoscaler", "--regions"])
        .arg(regions)
        .args(["--interval-ms", "500", "--admin-listen", "127.0.0.1:0"])
        .args(extra)
        .env("FERRY_LOG", "warn,ferry_autoscaler=info,ferry_cli=info")
        .env_remove("FERRY_CONFIG")
        .env_remove("FERRY_LOG_FORMAT")
        .stdin(Stdio::null())
        .stdout(Stdio::null());
    let (proc, line) = Proc::spawn_listening(&mut cmd, "admin listening").await?;
    let port = crate::support::announced(&line, "admin")?
        .rsplit_once(':')
        .and_then(|(_, p)| p.parse().ok())
        .context("a port")?;
    Ok((proc, port))
}

async fn autoscaler(regions: &std::path::Path) -> Result<(Proc, u16)> {
    autoscaler_with(regions, &[]).await
}

/// One series of the autoscaler's `/metrics` (labels as written, e.g. `region="a"`), or `None` before it exists.
async fn metric(http: &reqwest::Client, port: u16, name: &str, labels: &str) -> Option<f64> {
    let text = http
        .get(format!("http://127.0.0.1:{port}/metrics"))
        .send()
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    let prefix = format!("{name}{{{labels}}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .and_then(|v| v.trim().parse().ok())
}

/// Poll the workers the autoscaler reports for `region` (every 100 ms) until they are `want`; `what` is the
/// failure after `limit`.
async fn until_workers(
    http: &reqwest::Client,
    port: u16,
    region: &str,
    want: f64,
    limit: Duration,
    what: &str,
) {
    let labels = format!(r#"region="{region}""#);
    let deadline = Instant::now() + limit;
    while metric(http, port, "ferry_autoscaler_current_workers", &labels).await != Some(want) {
        assert!(Instant::now() < deadline, "{what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Poll `id` until the broker has it completed; `what` is the failure after `limit`.
async fn until_job_completed(
    broker: &RedisBroker,
    id: ferry_core::JobId,
    limit: Duration,
    what: impl Fn() -> String,
) -> Result<()> {
    let deadline = Instant::now() + limit;
    while !broker
        .job(id)
        .await?
        .is_some_and(|j| j.state == ferry_core::JobState::Completed)
    {
        assert!(Instant::now() < deadline, "{}", what());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

async fn enqueue_sleeps(broker: &RedisBroker, q: &QueueName, n: usize, ms: u64) -> Result<()> {
    let job = NewJob::new(Kind::parse("ferry.sleep")?, json!({ "ms": ms }));
    for _ in 0..n / 1000 {
        broker.enqueue_batch(q, vec![job.clone(); 1000]).await?;
    }
    Ok(())
}

/// The issue's burst: 20,000 jobs of 10 ms on one queue. Workers scale up from 1 at once (by steps), the
/// backlog drains, nothing is lost while workers are stopped, and the pool returns to its minimum once the
/// stabilization window (here 5 s) has passed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_scales_local_workers_up_then_back_to_the_minimum() -> Result<()> {
    let redis = RedisServer::start()?;
    let url = redis.url();
    let broker = crate::support::test_broker(&url).await?;
    let q = QueueName::parse("burst")?;
    let regions = redis.dir().join("regions.toml");
    std::fs::write(
        &regions,
        format!(
            r#"
[[regions]]
name = "local"
redis = ["{url}"]
queues = ["burst"]
[regions.policy]
min-workers = 1
max-workers = 6
target-drain-seconds = 5
backlog-per-worker = 500
scale-down-stabilization-seconds = 5
[regions.actuator]
kind = "local"
worker-args = ["--concurrency", "20", "--batch-size", "20"]
"#
        ),
    )?;
    let (mut scaler, port) = autoscaler(&regions).await?;
    let http = reqwest::Client::new();
    let current = |http: reqwest::Client| async move {
        metric(
            &http,
            port,
            "ferry_autoscaler_current_workers",
            r#"region="local""#,
        )
        .await
    };

    // Idle: the minimum.
    until_workers(
        &http,
        port,
        "local",
        1.0,
        Duration::from_secs(30),
        "never reached 1 worker",
    )
    .await;

    let completed = crate::support::count_completions(&broker).await?;
    let t0 = Instant::now();
    enqueue_sleeps(&broker, &q, 20_000, 10).await?;
    let mut peak = 1.0_f64;
    let mut samples = Vec::new();
    let drained_at = loop {
        let s = broker.stats(&q).await?;
        let workers = current(http.clone()).await.unwrap_or(0.0);
        peak = peak.max(workers);
        samples.push((t0.elapsed().as_secs_f64(), s.depth, workers));
        if s.depth == 0 && s.active == 0 {
            break t0.elapsed();
        }
        assert!(
            t0.elapsed() < Duration::from_secs(180),
            "backlog not drained: {s:?}, samples {samples:?}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    assert!(peak >= 3.0, "scaled up: peak {peak}, samples {samples:?}");
    eprintln!("drained 20,000 in {drained_at:?}, peak {peak} workers");
    // The target is 5 s; a debug build sharing 2 cores with the rest of the suite gets room for the ramp-up
    // (one decision per 500 ms, steps of 4 or 100 %) and for the machine.
    assert!(
        drained_at < Duration::from_secs(30),
        "drained in {drained_at:?}: samples {samples:?}"
    );

    // Back to the minimum after the window; nothing lost or left behind while workers were stopped.
    until_workers(
        &http,
        port,
        "local",
        1.0,
        Duration::from_secs(60),
        "never scaled back to 1",
    )
    .await;
    let s = broker.stats(&q).await?;
    assert_eq!(
        (s.depth, s.active, s.dead, s.scheduled),
        (0, 0, 0, 0),
        "{s:?}"
    );
    // A worker stopped while the backlog lasts (a scale-down decided on a slow machine) releases the jobs it had
    // claimed but not started, which are delivered again: every job completes exactly once all the same.
    assert!(s.delivered >= 20_000, "{s:?}");
    let completed = completed.lock().unwrap().clone();
    assert_eq!(completed.len(), 20_000, "every job completed");
    assert!(
        completed.values().all(|&n| n == 1),
        "each job completed once: {} twice or more",
        completed.values().filter(|&&n| n > 1).count()
    );
    assert!(
        metric(
            &http,
            port,
            "ferry_autoscaler_decisions_total",
            r#"direction="down",region="local""#
        )
        .await
        .unwrap_or(0.0)
            >= 1.0
    );

    assert_eq!(scaler.stop(Duration::from_secs(60)).await?.code(), Some(0));
    Ok(())
}

/// Two regions, each with its own Redis and workers. Region "busy" may have 1 worker and gets a backlog it
/// cannot drain within its target; region "idle" has room and helps: it runs spill-over workers on busy's
/// Redis until the backlog is gone, then stops them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_region_at_its_maximum_borrows_workers_from_another() -> Result<()> {
    let (busy_redis, idle_redis) = (RedisServer::start()?, RedisServer::start()?);
    let (busy_url, idle_url) = (busy_redis.url(), idle_redis.url());
    let busy = crate::support::test_broker(&busy_url).await?;
    let q = QueueName::parse("work")?;
    let regions = busy_redis.dir().join("regions.toml");
    std::fs::write(
        &regions,
        format!(
            r#"
[[regions]]
name = "busy"
redis = ["{busy_url}"]
queues = ["work"]
helps-others = false
[regions.policy]
min-workers = 1
max-workers = 1
target-drain-seconds = 2
backlog-per-worker = 100
[regions.actuator]
kind = "local"
worker-args = ["--concurrency", "5"]

[[regions]]
name = "idle"
redis = ["{idle_url}"]
queues = ["work"]
[regions.policy]
min-workers = 0
max-workers = 4
scale-down-stabilization-seconds = 2
[regions.actuator]
kind = "local"
worker-args = ["--concurrency", "5"]
"#
        ),
    )?;
    let (mut scaler, port) = autoscaler(&regions).await?;
    let http = reqwest::Client::new();
    // 3,000 jobs of 20 ms: one worker with 5 slots needs about 12 s, far above the 2 s target.
    enqueue_sleeps(&busy, &q, 3_000, 20).await?;
    let spill = |http: reqwest::Client| async move {
        metric(
            &http,
            port,
            "ferry_autoscaler_spillover_workers",
            r#"from="idle",to="busy""#,
        )
        .await
        .unwrap_or(0.0)
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut lent = 0.0_f64;
    while lent < 1.0 {
        assert!(Instant::now() < deadline, "idle never helped busy");
        tokio::time::sleep(Duration::from_millis(200)).await;
        lent = spill(http.clone()).await;
    }
    assert!(lent <= 4.0, "within the helper's maximum: {lent}");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let s = busy.stats(&q).await?;
        if s.depth == 0 && s.active == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "busy's backlog not drained: {s:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Normal-priority jobs live in the queue's p1 stream; its consumers are the workers that claimed from it.
    let consumers = busy_redis.cli(&["XINFO", "CONSUMERS", "ferry:{work}:p1", "workers"])?;
    assert!(
        consumers.contains("idle-local-"),
        "spill workers consumed busy's queue:\n{consumers}"
    );
    // With the backlog gone, the loan ends.
    let deadline = Instant::now() + Duration::from_secs(30);
    while spill(http.clone()).await != 0.0 {
        assert!(Instant::now() < deadline, "the loan never ended");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let s = busy.stats(&q).await?;
    assert_eq!((s.depth, s.active, s.dead), (0, 0, 0), "{s:?}");
    assert_eq!(scaler.stop(Duration::from_secs(60)).await?.code(), Some(0));
    Ok(())
}

/// Scale to zero, and the first waiting job wakes the queue: with `min-workers = 0` an idle region runs no
/// worker; one job starts one, the job completes, and the region goes back to zero after the window.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queue_at_zero_wakes_on_its_first_job_and_returns_to_zero() -> Result<()> {
    let redis = RedisServer::start()?;
    let url = redis.url();
    let broker = crate::support::test_broker(&url).await?;
    let q = QueueName::parse("sparse")?;
    let regions = redis.dir().join("regions.toml");
    std::fs::write(
        &regions,
        format!(
            "[[regions]]\nname = \"z\"\nredis = [\"{url}\"]\nqueues = [\"sparse\"]\n[regions.policy]\n\
             min-workers = 0\nmax-workers = 2\nscale-down-stabilization-seconds = 2\n\
             [regions.actuator]\nkind = \"local\"\n"
        ),
    )?;
    let (mut scaler, port) = autoscaler(&regions).await?;
    let http = reqwest::Client::new();
    let workers = |http: reqwest::Client| async move {
        metric(
            &http,
            port,
            "ferry_autoscaler_current_workers",
            r#"region="z""#,
        )
        .await
    };
    // Idle for a few rounds: zero workers.
    let deadline = Instant::now() + Duration::from_secs(20);
    while workers(http.clone()).await.is_none() {
        assert!(Instant::now() < deadline, "no decision exported");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(workers(http.clone()).await, Some(0.0));

    let id = broker
        .enqueue(&q, NewJob::new(Kind::parse("ferry.echo")?, json!({"n": 1})))
        .await?
        .id;
    until_job_completed(&broker, id, Duration::from_secs(30), || {
        "the job never ran".to_owned()
    })
    .await?;
    until_workers(
        &http,
        port,
        "z",
        0.0,
        Duration::from_secs(30),
        "never went back to zero",
    )
    .await;
    assert_eq!(scaler.stop(Duration::from_secs(30)).await?.code(), Some(0));
    Ok(())
}

/// `--dry-run` decides and exports, and logs each decision with its inputs, but starts nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dry_run_logs_decisions_and_acts_on_none() -> Result<()> {
    let redis = RedisServer::start()?;
    let url = redis.url();
    let broker = crate::support::test_broker(&url).await?;
    let q = QueueName::parse("dry")?;
    enqueue_sleeps(&broker, &q, 3_000, 10).await?;
    let regions = redis.dir().join("regions.toml");
    std::fs::write(
        &regions,
        format!(
            "[[regions]]\nname = \"d\"\nredis = [\"{url}\"]\nqueues = [\"dry\"]\n\
             [regions.actuator]\nkind = \"local\"\n"
        ),
    )?;
    // The log is read afterwards.
    let (mut scaler, port) = autoscaler_with(&regions, &["--dry-run"]).await?;
    let http = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let desired = metric(
            &http,
            port,
            "ferry_autoscaler_desired_workers",
            r#"queue="all",region="d""#,
        )
        .await;
        if desired.is_some_and(|d| d >= 2.0) {
            break;
        }
        assert!(Instant::now() < deadline, "no decision: {desired:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    // Nothing acted: no worker took a job.
    let s = broker.stats(&q).await?;
    assert_eq!((s.depth, s.delivered), (3_000, 0), "{s:?}");
    assert_eq!(scaler.stop(Duration::from_secs(30)).await?.code(), Some(0));
    let text = scaler.log();
    let line = text
        .lines()
        .find(|l| l.contains("scaling decision"))
        .with_context(|| format!("no decision logged:\n{text}"))?;
    for want in ["dry_run=true", "waiting=3000", "region=d", "need="] {
        assert!(line.contains(want), "{want} missing: {line}");
    }
    Ok(())
}

/// Workers started by the local actuator do not outlive the autoscaler: killed with SIGKILL (no chance to
/// stop them), its workers notice they were re-parented, drain and exit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_workers_exit_when_the_autoscaler_is_killed() -> Result<()> {
    let redis = RedisServer::start()?;
    let url = redis.url();
    let regions = redis.dir().join("regions.toml");
    std::fs::write(
        &regions,
        format!(
            "[[regions]]\nname = \"k\"\nredis = [\"{url}\"]\nqueues = [\"q\"]\n[regions.policy]\n\
             min-workers = 2\nmax-workers = 2\n[regions.actuator]\nkind = \"local\"\n"
        ),
    )?;
    let (mut scaler, port) = autoscaler(&regions).await?;
    let http = reqwest::Client::new();
    until_workers(
        &http,
        port,
        "k",
        2.0,
        Duration::from_secs(20),
        "never reached 2 workers",
    )
    .await;
    let children = String::from_utf8(
        Command::new("pgrep")
            .args(["-P", &scaler.pid().to_string()])
            .output()?
            .stdout,
    )?;
    let pids: Vec<String> = children.split_whitespace().map(str::to_owned).collect();
    assert_eq!(pids.len(), 2, "two worker children: {children:?}");
    scaler.kill9();
    let alive = |pid: &str| std::path::Path::new(&format!("/proc/{pid}")).exists();
    let deadline = Instant::now() + Duration::from_secs(20);
    while pids.iter().any(|p| alive(p)) {
        assert!(
            Instant::now() < deadline,
            "orphaned workers still running: {pids:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

/// A scale-down stops the workers holding the fewest jobs, whatever their age. Here the newest worker is the
/// only busy one (stopping the newest, as before, would have stopped it): it is the one kept, and its job
/// finishes there on its first attempt.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scale_down_stops_the_idlest_worker_not_the_newest() -> Result<()> {
    let redis = RedisServer::start()?;
    let url = redis.url();
    let broker = crate::support::test_broker(&url).await?;
    let q = QueueName::parse("idle")?;
    let mut file = RegionsFile::parse(&format!(
        "[[regions]]\nname = \"i\"\nredis = [\"{url}\"]\nqueues = [\"idle\"]\n[regions.actuator]\n\
         kind = \"local\"\nferry-bin = \"{}\"\nworker-args = [\"--concurrency\", \"1\", \"--batch-size\", \"1\"]\n",
        env!("CARGO_BIN_EXE_ferry")
    ))
    .map_err(anyhow::Error::msg)?;
    let region = file.regions.remove(0);
    let ActuatorConfig::Local(config) = region.actuator.clone() else {
        unreachable!("a local actuator")
    };
    let local = Local::new(region, config)?;
    let sleep_job = |ms: u64| NewJob::new(Kind::parse("ferry.sleep").unwrap(), json!({ "ms": ms }));
    // Wait until the broker's leases are exactly `want` (consumer → jobs).
    let leases_become = |want: Held| {
        let broker = &broker;
        let q = &q;
        async move {
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                let now = broker.leases_by_consumer(q).await?;
                if now == want {
                    return Ok::<_, anyhow::Error>(());
                }
                assert!(Instant::now() < deadline, "leases {now:?}, never {want:?}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    let one = |c: &str| Held::from([(c.to_owned(), 1)]);

    // The older worker takes a long job; the newer one (the first is full: concurrency 1) a short one.
    local.scale(1, &Held::new()).await?;
    let long = broker.enqueue(&q, sleep_job(60_000)).await?.id;
    let older = local.consumers()[0].clone();
    leases_become(one(&older)).await?;
    local.scale(2, &Held::new()).await?;
    let newer = local.consumers()[1].clone();
    let short = broker.enqueue(&q, sleep_job(3_000)).await?.id;
    leases_become(Held::from([(older.clone(), 1), (newer.clone(), 1)])).await?;
    // The long job is cancelled: the older worker is idle now.
    broker.cancel(long, Some("test")).await?;
    leases_become(one(&newer)).await?;

    local
        .scale(1, &broker.leases_by_consumer(&q).await?)
        .await?;
    assert_eq!(local.consumers(), vec![newer], "the busy worker is kept");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let info = broker.job(short).await?.context("the short job")?;
        if info.state == JobState::Completed {
            assert_eq!(info.attempts, 1, "finished where it started: {info:?}");
            break;
        }
        assert_eq!(info.state, JobState::Active, "{info:?}");
        assert!(Instant::now() < deadline, "never completed: {info:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    local.shutdown().await;
    Ok(())
}

/// A gateway pointed at the autoscaler (`--autoscaler-url`) shows its last round at `GET /v1/autoscaler` (what
/// the dashboard's autoscaler page reads), and an autoscaler it cannot reach as such; the route needs
/// `queues:read`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_shows_the_autoscalers_last_decisions() -> Result<()> {
    const SECRET: &str = "autoscaler-view-secret-autoscaler-view!";
    let redis = RedisServer::start()?;
    let url = redis.url();
    let broker = crate::support::test_broker(&url).await?;
    enqueue_sleeps(&broker, &QueueName::parse("seen")?, 2_000, 10).await?;
    let regions = redis.dir().join("regions.toml");
    std::fs::write(
        &regions,
        format!(
            "[[regions]]\nname = \"r1\"\nredis = [\"{url}\"]\nqueues = [\"seen\"]\n\
             [regions.policy]\nmax-workers = 3\nbacklog-per-worker = 100\n\
             [regions.actuator]\nkind = \"local\"\n"
        ),
    )?;
    let (_scaler, port) = autoscaler_with(&regions, &["--dry-run"]).await?;
    // The second URL has nothing listening.
    let urls = format!("http://127.0.0.1:{port},http://user:pw@127.0.0.1:1");
    let (_gw, addr) = Proc::spawn_gateway(
        ferry()
            .args(["gateway", "--redis", &url, "--jwt-secret", SECRET])
            .args(["--autoscaler-url", &urls])
            .env("FERRY_LOG", "warn,ferry_cli=info")
            .env_remove("FERRY_LOG_FORMAT")
            .env_remove("FERRY_CONFIG")
            .stdin(Stdio::null())
            .stdout(Stdio::null()),
    )
    .await?;
    let http = reqwest::Client::new();
    let reader = crate::support::token(SECRET, "ops", &["queues:read"], Duration::from_secs(60));
    let view = ferry_testkit::eventually(Duration::from_secs(20), "a round", || {
        let r = http
            .get(format!("http://{addr}/v1/autoscaler"))
            .bearer_auth(&reader)
            .send();
        async move {
            let v: serde_json::Value = r.await?.error_for_status()?.json().await?;
            Ok((!v["autoscalers"][0]["at"].is_null()).then_some(v))
        }
    })
    .await?;
    let [seen, gone] = view["autoscalers"].as_array().context("a list")?.as_slice() else {
        panic!("two entries: {view}");
    };
    assert_eq!(seen["url"], format!("http://127.0.0.1:{port}"));
    assert_eq!(seen["ok"], true);
    assert_eq!(seen["dry_run"], true);
    let region = &seen["regions"][0];
    assert_eq!(region["region"], "r1", "{view}");
    assert_eq!(
        region["desired"], 3,
        "2,000 waiting at 100 per worker, at most 3: {view}"
    );
    assert_eq!(region["need"], 20, "{view}");
    let q = &region["queues"][0];
    assert_eq!(
        (&q["queue"], &q["waiting"]),
        (&json!("seen"), &json!(2_000)),
        "{view}"
    );
    assert_eq!(q["reason"], "bound", "{view}");
    assert_eq!(gone["ok"], false);
    assert_eq!(gone["url"], "http://user:<redacted>@127.0.0.1:1");
    assert!(
        gone["error"]
            .as_str()
            .is_some_and(|e| e.starts_with("cannot read it")),
        "{view}"
    );
    // Without queues:read: 403.
    let other = crate::support::token(SECRET, "ops", &["jobs:read"], Duration::from_secs(60));
    let r = http
        .get(format!("http://{addr}/v1/autoscaler"))
        .bearer_auth(&other)
        .send()
        .await?;
    assert_eq!(r.status(), 403);
    Ok(())
}

/// A region on a Redis Cluster (`redis-cluster` in the regions file): the autoscaler reads the queue's depth
/// from the cluster, starts a local worker with `--redis-cluster`, the job runs, and the pool returns to zero.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_region_on_a_redis_cluster_scales_its_workers() -> Result<()> {
    let cluster = ferry_testkit::RedisCluster::start(3, 0)?;
    let seeds = cluster.urls();
    let broker = RedisBroker::connect_cluster(
        &seeds,
        ferry_broker::DEFAULT_VSHARDS,
        ferry_broker::EngineConfig::default(),
        ferry_broker::RedisOptions::default(),
    )
    .await?;
    let q = QueueName::parse("clustered")?;
    let dir = tempfile::tempdir()?;
    let regions = dir.path().join("regions.toml");
    std::fs::write(
        &regions,
        format!(
            "[[regions]]\nname = \"c\"\nredis-cluster = [\"{}\"]\nqueues = [\"clustered\"]\n\
             [regions.policy]\nmin-workers = 0\nmax-workers = 1\nscale-down-stabilization-seconds = 2\n\
             [regions.actuator]\nkind = \"local\"\n",
            seeds[1]
        ),
    )?;
    let (mut scaler, port) = autoscaler(&regions).await?;
    let http = reqwest::Client::new();
    until_workers(
        &http,
        port,
        "c",
        0.0,
        Duration::from_secs(20),
        "no decision exported",
    )
    .await;
    let id = broker
        .enqueue(&q, NewJob::new(Kind::parse("ferry.echo")?, json!({"n": 1})))
        .await?
        .id;
    until_job_completed(&broker, id, Duration::from_secs(30), || {
        format!("the job never ran\n{}", scaler.log())
    })
    .await?;
    until_workers(
        &http,
        port,
        "c",
        0.0,
        Duration::from_secs(30),
        "never went back to zero",
    )
    .await;
    assert_eq!(scaler.stop(Duration::from_secs(30)).await?.code(), Some(0));
    drop(cluster);
    Ok(())
}
