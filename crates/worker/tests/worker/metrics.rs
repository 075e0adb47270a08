//! Prometheus metrics after a real workload on a real Redis, and the admin listener over HTTP.

use std::sync::Arc;
use std::time::Duration;

use ferry_broker::prelude::*;
use ferry_broker::redis::RedisOptions;
use ferry_broker::{EngineConfig, RedisBroker};
use ferry_core::JobState;
use ferry_testkit::RedisServer;
use ferry_testkit::faulty::{Fault, FaultyBroker, Method};
use ferry_worker::{HandlerRegistry, Worker, WorkerDeps, WorkerNode, WorkerNodeConfig};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use crate::common::{config, enqueue, job, memory, queue, wait_state};
use ferry_testkit::eventually;

async fn redis_broker(redis: &RedisServer) -> Arc<dyn Broker> {
    let options = RedisOptions {
        response_timeout: Duration::from_millis(500),
        connection_timeout: Duration::from_millis(300),
        cluster_vshards: None,
    };
    Arc::new(
        RedisBroker::connect_with(&[redis.url()], EngineConfig::default(), options)
            .await
            .expect("connects"),
    )
}

/// The value of the sample line starting with `prefix` (name and labels).
fn value(text: &str, prefix: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(prefix)?.trim().parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_workload_metrics_and_admin_listener() -> anyhow::Result<()> {
    let mut redis = RedisServer::start()?;
    let broker = redis_broker(&redis).await;
    let q = queue("metrics");
    for _ in 0..20 {
        broker.enqueue(&q, job("ferry.noop", json!({}))).await?;
    }
    for _ in 0..3 {
        let mut j = job("ferry.fail", json!({}));
        j.max_attempts = Some(2);
        broker.enqueue(&q, j).await?;
    }
    // The whole node, as `ferry worker` runs it: its admin routes over the node's own registry.
    let node = WorkerNode::build(
        WorkerNodeConfig::new(config(&q)),
        HandlerRegistry::with_builtins(),
        WorkerDeps {
            broker: broker.clone(),
            store: None,
            registry: ferry_telemetry::metrics::registry(),
        },
    )?;
    let admin = node.admin();
    let shutdown = CancellationToken::new();
    let run = tokio::spawn(node.run(shutdown.clone()));

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let base = format!("http://{}", listener.local_addr()?);
    let admin_stop = CancellationToken::new();
    let server = tokio::spawn(ferry_telemetry::admin::serve(
        listener,
        admin,
        admin_stop.clone(),
    ));
    let http = reqwest::Client::new();
    let scrape = || async {
        http.get(format!("{base}/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    };

    let done = "ferry_jobs_completed_total{kind=\"ferry.noop\",queue=\"metrics\"}";
    let dead = "ferry_jobs_dead_total{kind=\"ferry.fail\",queue=\"metrics\"}";
    eventually(Duration::from_secs(20), "all jobs finished", || async {
        let t = scrape().await;
        Ok((value(&t, done) == Some(20.0) && value(&t, dead) == Some(3.0)).then_some(()))
    })
    .await?;
    let text = scrape().await;
    let labels_noop = "{kind=\"ferry.noop\",queue=\"metrics\"}";
    let labels_fail = "{kind=\"ferry.fail\",queue=\"metrics\"}";
    assert_eq!(
        value(&text, &format!("ferry_jobs_started_total{labels_noop}")),
        Some(20.0),
        "{text}"
    );
    assert_eq!(
        value(&text, &format!("ferry_jobs_started_total{labels_fail}")),
        Some(6.0),
        "{text}"
    );
    assert_eq!(
        value(&text, &format!("ferry_jobs_retried_total{labels_fail}")),
        Some(3.0)
    );
    for name in [
        "ferry_jobs_lost_total",
        "ferry_jobs_cancelled_while_running_total",
    ] {
        assert_eq!(
            value(&text, &format!("{name}{labels_noop}")),
            Some(0.0),
            "{text}"
        );
    }
    assert_eq!(
        value(
            &text,
            &format!("ferry_job_processing_seconds_count{labels_noop}")
        ),
        Some(20.0)
    );
    // First attempts only.
    assert_eq!(
        value(
            &text,
            &format!("ferry_job_queue_wait_seconds_count{labels_fail}")
        ),
        Some(3.0)
    );
    for name in [
        "# TYPE ferry_job_processing_seconds histogram",
        "ferry_job_queue_wait_seconds_bucket{kind=\"ferry.noop\",queue=\"metrics\",le=\"+Inf\"} 20",
        "process_resident_memory_bytes",
        "process_cpu_seconds_total",
        "process_open_fds",
        "process_max_fds",
        "ferry_tokio_workers 2",
        "ferry_tokio_alive_tasks",
        "ferry_tokio_global_queue_depth",
        "ferry_tokio_busy_ratio",
        "ferry_build_info{version=",
    ] {
        assert!(text.contains(name), "{name} missing:\n{text}");
    }
    // Queue gauges: polled at start and every 5 s; after the next poll the queue is empty and 3 jobs are dead.
    eventually(Duration::from_secs(12), "queue gauges", || async {
        let t = scrape().await;
        Ok(
            (value(&t, "ferry_queue_dead{queue=\"metrics\"}") == Some(3.0)
                && value(&t, "ferry_queue_depth{queue=\"metrics\"}") == Some(0.0)
                && value(&t, "ferry_queue_active{queue=\"metrics\"}") == Some(0.0)
                && value(&t, "ferry_queue_scheduled{queue=\"metrics\"}") == Some(0.0)
                && value(&t, "ferry_queue_paused{queue=\"metrics\"}") == Some(0.0)
                && value(&t, "ferry_queue_oldest_waiting_seconds{queue=\"metrics\"}") == Some(0.0))
            .then_some(()),
        )
    })
    .await?;

    // Health and readiness.
    let get = |path: &'static str| {
        let http = http.clone();
        let base = base.clone();
        async move {
            let r = http.get(format!("{base}{path}")).send().await.unwrap();
            let status = r.status().as_u16();
            (status, r.text().await.unwrap())
        }
    };
    assert_eq!(get("/healthz").await.0, 200);
    let (status, body) = get("/readyz").await;
    assert_eq!(status, 200, "{body}");
    let v: Value = serde_json::from_str(&body)?;
    assert_eq!(v["status"], "ready");
    assert_eq!(v["checks"]["redis"]["ok"], true);

    redis.stop()?;
    let (status, body) = get("/readyz").await;
    assert_eq!(status, 503, "{body}");
    let v: Value = serde_json::from_str(&body)?;
    assert_eq!(v["status"], "unready");
    assert_eq!(v["checks"]["redis"]["ok"], false);
    assert_eq!(get("/healthz").await.0, 200);

    redis.restart()?;
    eventually(Duration::from_secs(10), "ready again", || async {
        Ok((get("/readyz").await.0 == 200).then_some(()))
    })
    .await?;

    // Draining: unready at once, while the listener still answers.
    shutdown.cancel();
    eventually(Duration::from_secs(5), "unready while draining", || async {
        let (status, body) = get("/readyz").await;
        Ok((status == 503 && body.contains("draining")).then_some(()))
    })
    .await?;
    tokio::time::timeout(Duration::from_secs(20), run).await???;
    admin_stop.cancel();
    tokio::time::timeout(Duration::from_secs(5), server).await???;
    Ok(())
}

/// A running job that someone cancels is counted as cancelled while running, never as lost; a lease lost to
/// the reaper (heartbeats not reaching the broker past the visibility timeout) is counted as lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancels_of_running_jobs_are_not_lost_leases() -> anyhow::Result<()> {
    let inner = memory();
    let faulty = FaultyBroker::new(inner.clone());
    let q = queue("cancel-vs-lost");
    let registry = Arc::new(ferry_telemetry::metrics::registry());
    let worker = Worker::new(faulty.clone(), HandlerRegistry::with_builtins(), config(&q))?;
    worker.register_metrics(&registry)?;
    let shutdown = CancellationToken::new();
    let run = tokio::spawn(worker.run(shutdown.clone()));
    let sample = |name: &str| {
        let labels = "{kind=\"ferry.sleep\",queue=\"cancel-vs-lost\"}";
        let text = ferry_telemetry::metrics::render(&registry);
        value(&text, &format!("{name}{labels}")).unwrap_or(0.0)
    };
    let (cancelled, lost) = (
        "ferry_jobs_cancelled_while_running_total",
        "ferry_jobs_lost_total",
    );
    let long = || job("ferry.sleep", json!({"ms": 60_000}));
    let patience = Duration::from_secs(10);

    // Cancelled while running: ordinary use.
    let id = enqueue(&*inner, &q, long()).await;
    wait_state(&*inner, id, JobState::Active, patience).await?;
    inner.cancel(id, Some("alice")).await?;
    eventually(patience, "the cancel counted", || async {
        Ok((sample(cancelled) == 1.0).then_some(()))
    })
    .await?;
    assert_eq!(sample(lost), 0.0);

    // Lost: heartbeats fail until the reaper has requeued the job and it runs again.
    faulty.switch(Method::Heartbeat, Fault::Unavailable, true);
    let mut j = long();
    j.max_attempts = Some(10);
    let id = enqueue(&*inner, &q, j).await;
    eventually(
        patience,
        "the lease reclaimed and the job claimed again",
        || async {
            Ok((inner
                .job(id)
                .await
                .unwrap()
                .is_some_and(|j| j.attempts >= 2))
            .then_some(()))
        },
    )
    .await?;
    faulty.switch(Method::Heartbeat, Fault::Unavailable, false);
    // The attempt running now keeps its lease; every earlier one was lost. Cancel it to end the case.
    wait_state(&*inner, id, JobState::Active, patience).await?;
    inner.cancel(id, Some("alice")).await?;
    let attempts = inner.job(id).await?.expect("job kept").attempts;
    eventually(
        patience,
        "the lost leases and the cancel counted",
        || async {
            Ok((sample(lost) == f64::from(attempts - 1) && sample(cancelled) == 2.0).then_some(()))
        },
    )
    .await
    .map_err(|e| {
        anyhow::anyhow!(
            "{e}: lost {}, cancelled {}",
            sample(lost),
            sample(cancelled)
        )
    })?;

    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(20), run).await???;
    Ok(())
}

/// A library user gets the recorder's rules checked by `build`, as `ferry worker` does before it connects.
#[tokio::test]
async fn build_refuses_a_recorder_that_breaks_a_rule() {
    let q = queue("node-config");
    let mut config = WorkerNodeConfig::new(config(&q));
    let mut recorder = ferry_store::recorder::RecorderConfig::new("c");
    recorder.writers = 0;
    config.recorder = Some(recorder);
    let deps = WorkerDeps {
        broker: memory(),
        store: Some(Arc::new(ferry_store::MemoryStore::new())),
        registry: ferry_telemetry::metrics::registry(),
    };
    let Err(err) = WorkerNode::build(config, HandlerRegistry::with_builtins(), deps) else {
        panic!("a recorder with no writers was accepted");
    };
    assert_eq!(
        err.to_string(),
        "invalid worker config: recorder writers: must be at least 1"
    );
}
