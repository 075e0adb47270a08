//! The runtime end to end on the memory engine: built-ins, dispatch, bounds, cancellation, drain, outages.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::Result;
use ferry_broker::prelude::*;
use ferry_core::{EventType, JobState, Kind};
use ferry_testkit::eventually;
use ferry_testkit::faulty::{Fault, FaultyBroker, Method};
use ferry_worker::{HandlerRegistry, JobError, Worker, WorkerConfig, WorkerError, handler_fn};
use futures::StreamExt;
use serde_json::{Value, json};

use crate::common::*;

const T: Duration = Duration::from_secs(10);

#[tokio::test]
async fn builtins_behave_as_documented() -> Result<()> {
    let broker = memory();
    let q = queue("builtins");
    let b: &dyn Broker = &*broker;
    let noop = enqueue(b, &q, job("ferry.noop", Value::Null)).await;
    let echo = enqueue(b, &q, job("ferry.echo", json!({"hello": [1, 2]}))).await;
    let sleep = enqueue(b, &q, job("ferry.sleep", json!({"ms": 50}))).await;
    let bad_sleep = enqueue(b, &q, job("ferry.sleep", json!({"ms": "soon"}))).await;
    let fail_twice = enqueue(b, &q, job("ferry.fail", json!({"times": 2}))).await;
    let mut always = job("ferry.fail", json!({}));
    always.max_attempts = Some(2);
    let fail_always = enqueue(b, &q, always).await;

    let w = Running::start(broker.clone(), HandlerRegistry::with_builtins(), config(&q));
    let info = wait_state(b, noop, JobState::Completed, T).await?;
    assert_eq!(info.result, Some(Value::Null));
    let info = wait_state(b, echo, JobState::Completed, T).await?;
    assert_eq!(info.result, Some(json!({"hello": [1, 2]})));
    wait_state(b, sleep, JobState::Completed, T).await?;
    let info = wait_state(b, bad_sleep, JobState::Dead, T).await?;
    assert_eq!(info.attempts, 1, "a bad payload is a permanent error");
    assert!(info.error.unwrap().contains("invalid payload"));
    let info = wait_state(b, fail_twice, JobState::Completed, T).await?;
    assert_eq!(info.attempts, 3, "failed twice, then succeeded");
    let info = wait_state(b, fail_always, JobState::Dead, T).await?;
    assert_eq!(info.attempts, 2);
    assert!(info.error.unwrap().contains("failing on purpose"));
    w.stop().await;
    Ok(())
}

#[tokio::test]
async fn unknown_kind_is_dead_with_the_documented_message() -> Result<()> {
    let broker = memory();
    let q = queue("unknown");
    let id = enqueue(&*broker, &q, job("no.such.kind", json!({}))).await;
    let w = Running::start(broker.clone(), HandlerRegistry::with_builtins(), config(&q));
    let info = wait_state(&*broker, id, JobState::Dead, T).await?;
    assert_eq!(
        info.error.as_deref(),
        Some(r#"no handler for kind "no.such.kind""#)
    );
    assert_eq!(info.attempts, 1);
    w.stop().await;
    Ok(())
}

#[tokio::test]
async fn concurrency_bound_is_never_exceeded() -> Result<()> {
    let broker = memory();
    let q = queue("bounded");
    let running = Arc::new(AtomicUsize::new(0));
    let peak = Arc::new(AtomicUsize::new(0));
    let mut registry = HandlerRegistry::new();
    {
        let (running, peak) = (running.clone(), peak.clone());
        registry.register(
            Kind::parse("count")?,
            handler_fn(move |_ctx| {
                let (running, peak) = (running.clone(), peak.clone());
                async move {
                    let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                    peak.fetch_max(now, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(15)).await;
                    running.fetch_sub(1, Ordering::SeqCst);
                    Ok(Value::Null)
                }
            }),
        );
    }
    let jobs: Vec<_> = (0..60).map(|_| job("count", Value::Null)).collect();
    let ids: Vec<_> = broker
        .enqueue_batch(&q, jobs)
        .await?
        .into_iter()
        .map(|e| e.id)
        .collect();
    let mut cfg = config(&q);
    cfg.concurrency = 4;
    cfg.batch_size = 3;
    let w = Running::start(broker.clone(), registry, cfg);
    for id in ids {
        wait_state(&*broker, id, JobState::Completed, T).await?;
    }
    let first = peak.load(Ordering::SeqCst);
    assert!(first <= 4, "peak concurrency {first} exceeded 4");
    assert!(first >= 2, "jobs ran in parallel (peak {first})");
    // Completions carry their slots into the call that leases the next jobs. Once nothing is left, the slots
    // are back with the claim loops, none lost: a later burst runs four at a time again.
    eventually(T, "nothing held", || async {
        Ok((w.monitor.in_flight() == 0).then_some(()))
    })
    .await?;
    peak.store(0, Ordering::SeqCst);
    let burst: Vec<_> = (0..8).map(|_| job("count", Value::Null)).collect();
    for e in broker.enqueue_batch(&q, burst).await? {
        wait_state(&*broker, e.id, JobState::Completed, T).await?;
    }
    assert_eq!(peak.load(Ordering::SeqCst), 4, "every slot is usable again");
    eventually(T, "every completion counted", || async {
        let c = w.monitor.counters();
        Ok((c.claimed == 68 && c.completed == 68).then_some(()))
    })
    .await?;
    w.stop().await;
    Ok(())
}

#[tokio::test]
async fn per_queue_concurrency_overrides_the_default() -> Result<()> {
    let broker = memory();
    let (a, b) = (queue("qa"), queue("qb"));
    let mut cfg = config(&a);
    cfg.queues = vec![a.clone(), b.clone()];
    cfg.concurrency = 3;
    cfg.queue_concurrency.insert(b.clone(), 1);
    cfg.drain_timeout = Duration::from_millis(100);
    for _ in 0..5 {
        enqueue(&*broker, &a, job("ferry.sleep", json!({"ms": 2000}))).await;
        enqueue(&*broker, &b, job("ferry.sleep", json!({"ms": 2000}))).await;
    }
    let w = Running::start(broker.clone(), HandlerRegistry::with_builtins(), cfg);
    eventually(T, "both queues busy", || async {
        Ok((broker.stats(&a).await.unwrap().active == 3
            && broker.stats(&b).await.unwrap().active == 1)
            .then_some(()))
    })
    .await?;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(broker.stats(&a).await?.active, 3);
    assert_eq!(broker.stats(&b).await?.active, 1);
    assert_eq!(w.monitor.in_flight(), 4);
    let report = w.stop().await;
    assert_eq!(report.released, 4);
    Ok(())
}

#[tokio::test]
async fn cancelling_an_active_job_fires_ctx_cancelled() -> Result<()> {
    let broker = memory();
    let q = queue("cancel");
    let saw_cancel = Arc::new(AtomicBool::new(false));
    let mut registry = HandlerRegistry::new();
    {
        let saw = saw_cancel.clone();
        registry.register(
            Kind::parse("wait")?,
            handler_fn(move |ctx| {
                let saw = saw.clone();
                async move {
                    ctx.cancelled().cancelled().await;
                    saw.store(true, Ordering::SeqCst);
                    Err(JobError::retry("stopped"))
                }
            }),
        );
    }
    let id = enqueue(&*broker, &q, job("wait", Value::Null)).await;
    let mut cfg = config(&q);
    cfg.heartbeat_interval = Some(Duration::from_millis(50));
    let w = Running::start(broker.clone(), registry, cfg);
    wait_state(&*broker, id, JobState::Active, T).await?;
    broker.cancel(id, None).await?;
    eventually(
        Duration::from_secs(3),
        "handler sees cancellation",
        || async { Ok(saw_cancel.load(Ordering::SeqCst).then_some(())) },
    )
    .await?;
    eventually(T, "lease dropped", || async {
        Ok((w.monitor.in_flight() == 0).then_some(()))
    })
    .await?;
    let info = broker.job(id).await?.unwrap();
    assert_eq!(
        info.state,
        JobState::Cancelled,
        "the stale outcome did not overwrite it"
    );
    assert_eq!(w.monitor.counters().lost, 1);
    w.stop().await;
    Ok(())
}

#[tokio::test]
async fn lost_lease_cancels_the_handler_and_discards_its_result() -> Result<()> {
    let inner = memory();
    let faulty = FaultyBroker::new(inner.clone());
    let q = queue("lost");
    let saw_cancel = Arc::new(AtomicBool::new(false));
    let mut registry = HandlerRegistry::new();
    {
        let saw = saw_cancel.clone();
        registry.register(
            Kind::parse("slow")?,
            handler_fn(move |ctx| {
                let saw = saw.clone();
                async move {
                    ctx.cancelled().cancelled().await;
                    saw.store(true, Ordering::SeqCst);
                    Ok(json!("stale"))
                }
            }),
        );
    }
    let id = enqueue(&*inner, &q, job("slow", Value::Null)).await;
    let mut cfg = config(&q);
    // This worker must not reclaim or re-claim the job itself: the "thief" below does.
    cfg.run_scheduler = false;
    cfg.heartbeat_interval = Some(Duration::from_millis(50));
    let w = Running::start(faulty.clone(), registry, cfg);
    wait_state(&*inner, id, JobState::Active, T).await?;
    // The worker's heartbeats stop reaching the broker (a pause, a partition) until its lease expires and
    // another consumer takes the job over.
    faulty.switch(Method::Heartbeat, Fault::Unavailable, true);
    tokio::time::sleep(VISIBILITY + Duration::from_millis(100)).await;
    assert_eq!(inner.reclaim_expired(&q, 10).await?.requeued, 1);
    let thief = inner.claim(&q, "thief", 1, Duration::from_secs(1)).await?;
    assert_eq!(thief.len(), 1);
    faulty.switch(Method::Heartbeat, Fault::Unavailable, false);
    eventually(Duration::from_secs(3), "handler cancelled", || async {
        Ok(saw_cancel.load(Ordering::SeqCst).then_some(()))
    })
    .await?;
    eventually(T, "discarded", || async {
        Ok((w.monitor.counters().lost == 1).then_some(()))
    })
    .await?;
    assert_eq!(w.monitor.in_flight(), 0);
    // The new holder's outcome is the one that counts.
    let done = inner
        .complete(vec![ferry_broker::Completion {
            lease: thief[0].lease.clone(),
            result: json!("thief"),
        }])
        .await?;
    assert!(done[0].is_ok());
    assert_eq!(inner.job(id).await?.unwrap().result, Some(json!("thief")));
    assert_eq!(w.monitor.counters().completed, 0);
    w.stop().await;
    Ok(())
}

#[tokio::test]
async fn attempt_timeout_is_a_retryable_failure() -> Result<()> {
    let broker = memory();
    let q = queue("timeout");
    let mut j = job("ferry.sleep", json!({"ms": 10_000}));
    j.timeout_ms = Some(100);
    j.max_attempts = Some(1);
    let id = enqueue(&*broker, &q, j).await;
    let w = Running::start(broker.clone(), HandlerRegistry::with_builtins(), config(&q));
    let info = wait_state(&*broker, id, JobState::Dead, T).await?;
    assert_eq!(info.error.as_deref(), Some("timed out after 100 ms"));

    // The worker's default applies to jobs without their own timeout, and a retry follows.
    let mut cfg = config(&q);
    cfg.default_job_timeout = Duration::from_millis(80);
    w.stop().await;
    let w = Running::start(broker.clone(), HandlerRegistry::with_builtins(), cfg);
    let mut j = job("ferry.sleep", json!({"ms": 10_000}));
    j.max_attempts = Some(2);
    let id = enqueue(&*broker, &q, j).await;
    let info = wait_state(&*broker, id, JobState::Dead, T).await?;
    assert_eq!(info.attempts, 2, "retried after the first timeout");
    assert_eq!(info.error.as_deref(), Some("timed out after 80 ms"));
    w.stop().await;
    Ok(())
}

#[tokio::test]
async fn progress_and_panics() -> Result<()> {
    let broker = memory();
    let q = queue("progress");
    let mut registry = HandlerRegistry::new();
    registry.register(
        Kind::parse("report")?,
        handler_fn(|ctx| async move {
            assert!(ctx.progress(json!({"pct": 50})).await?);
            Ok(json!("done"))
        }),
    );
    registry.register(
        Kind::parse("boom")?,
        handler_fn(|_ctx| async move {
            if true {
                panic!("kaboom");
            }
            Ok(Value::Null)
        }),
    );
    let mut events = broker.subscribe().await?;
    let id = enqueue(&*broker, &q, job("report", Value::Null)).await;
    let mut boom = job("boom", Value::Null);
    boom.max_attempts = Some(1);
    let boom = enqueue(&*broker, &q, boom).await;
    let w = Running::start(broker.clone(), registry, config(&q));
    wait_state(&*broker, id, JobState::Completed, T).await?;
    let info = wait_state(&*broker, boom, JobState::Dead, T).await?;
    assert_eq!(info.error.as_deref(), Some("handler panicked: kaboom"));
    let progress = tokio::time::timeout(T, async {
        while let Some(e) = events.next().await {
            if e.ty == EventType::Progress && e.job == id {
                return Some(e);
            }
        }
        None
    })
    .await?
    .expect("progress event");
    assert_eq!(progress.data, Some(json!({"pct": 50})));
    w.stop().await;
    Ok(())
}

#[tokio::test]
async fn drain_finishes_in_flight_jobs() -> Result<()> {
    let broker = memory();
    let q = queue("drain-finish");
    let mut ids = Vec::new();
    for _ in 0..3 {
        ids.push(enqueue(&*broker, &q, job("ferry.sleep", json!({"ms": 300}))).await);
    }
    let w = Running::start(broker.clone(), HandlerRegistry::with_builtins(), config(&q));
    eventually(T, "all three running", || async {
        Ok((broker.stats(&q).await.unwrap().active == 3).then_some(()))
    })
    .await?;
    // Enqueued after shutdown begins: must not be claimed.
    let report = {
        w.shutdown.cancel();
        let late = enqueue(&*broker, &q, job("ferry.noop", Value::Null)).await;
        let report = w.stop().await;
        // A claim already waiting when shutdown began may have picked it up: then it was handed straight back.
        let info = broker.job(late).await?.unwrap();
        assert_eq!((info.state, info.attempts), (JobState::Queued, 0));
        report
    };
    assert_eq!(report.completed_during_drain, 3, "{report:?}");
    assert!(report.released <= 1, "{report:?}");
    assert!(!report.timed_out);
    for id in ids {
        assert_eq!(broker.job(id).await?.unwrap().state, JobState::Completed);
    }
    Ok(())
}

#[tokio::test]
async fn drain_timeout_releases_the_rest_for_immediate_pickup() -> Result<()> {
    let broker = memory();
    let q = queue("drain-release");
    let quick = enqueue(&*broker, &q, job("ferry.sleep", json!({"ms": 50}))).await;
    let mut slow = Vec::new();
    for _ in 0..2 {
        slow.push(enqueue(&*broker, &q, job("ferry.sleep", json!({"ms": 60_000}))).await);
    }
    let mut cfg = config(&q);
    cfg.drain_timeout = Duration::from_millis(300);
    let w = Running::start(broker.clone(), HandlerRegistry::with_builtins(), cfg);
    eventually(T, "slow jobs running", || async {
        Ok((broker.stats(&q).await.unwrap().active == 2).then_some(()))
    })
    .await?;
    wait_state(&*broker, quick, JobState::Completed, T).await?;
    let started = std::time::Instant::now();
    let report = w.stop().await;
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "drain is bounded"
    );
    assert!(report.timed_out);
    assert_eq!(report.released, 2, "{report:?}");
    assert_eq!(report.completed_during_drain, 0);
    for id in slow {
        let info = broker.job(id).await?.unwrap();
        assert_eq!(
            info.state,
            JobState::Queued,
            "released, not waiting for lease expiry"
        );
        assert_eq!(info.attempts, 0, "a released attempt does not count");
    }
    Ok(())
}

#[tokio::test]
async fn failed_ack_batch_releases_everything_it_held() -> Result<()> {
    let inner = memory();
    let faulty = FaultyBroker::new(inner.clone());
    let q = queue("ack-outage");
    faulty.switch(Method::Complete, Fault::Unavailable, true);
    let first: Vec<_> = {
        let mut v = Vec::new();
        for _ in 0..2 {
            v.push(enqueue(&*inner, &q, job("ferry.noop", Value::Null)).await);
        }
        v
    };
    let mut cfg = config(&q);
    cfg.concurrency = 2;
    cfg.ack_retry_timeout = Some(Duration::from_millis(300));
    let w = Running::start(faulty.clone(), HandlerRegistry::with_builtins(), cfg);
    // The completions are retried (kept, not dropped) while the broker refuses them...
    eventually(T, "retries", || async {
        Ok((faulty.calls(Method::Complete) >= 2).then_some(()))
    })
    .await?;
    assert_eq!(w.monitor.in_flight(), 2, "held while retrying");
    // ...and given up after ack_retry_timeout, releasing their leases and slots.
    eventually(T, "given up", || async {
        Ok((w.monitor.counters().undelivered == 2).then_some(()))
    })
    .await?;
    assert_eq!(w.monitor.in_flight(), 0);
    faulty.switch(Method::Complete, Fault::Unavailable, false);
    // The slots came back: with concurrency 2, new work runs at once...
    let fresh = enqueue(&*inner, &q, job("ferry.noop", Value::Null)).await;
    wait_state(&*inner, fresh, JobState::Completed, T).await?;
    // ...and the given-up jobs are redelivered after their leases expire (at least once, never lost).
    for id in first {
        let info = wait_state(&*inner, id, JobState::Completed, T).await?;
        assert_eq!(info.attempts, 2);
    }
    w.stop().await;
    Ok(())
}

#[tokio::test]
async fn claim_outage_is_retried_and_the_worker_resumes() -> Result<()> {
    let inner = memory();
    let faulty = FaultyBroker::new(inner.clone());
    let q = queue("claim-outage");
    faulty.switch(Method::Claim, Fault::Unavailable, true);
    let w = Running::start(faulty.clone(), HandlerRegistry::with_builtins(), config(&q));
    let id = enqueue(&*inner, &q, job("ferry.noop", Value::Null)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !w.handle.is_finished(),
        "an outage does not stop the worker"
    );
    assert_eq!(inner.job(id).await?.unwrap().state, JobState::Queued);
    faulty.switch(Method::Claim, Fault::Unavailable, false);
    wait_state(&*inner, id, JobState::Completed, T).await?;
    w.stop().await;
    Ok(())
}

#[tokio::test]
async fn scheduler_promotes_delayed_jobs() -> Result<()> {
    let broker = memory();
    let q = queue("delayed");
    let mut j = job("ferry.noop", Value::Null);
    j.delay_ms = Some(200);
    let id = enqueue(&*broker, &q, j).await;
    assert_eq!(broker.job(id).await?.unwrap().state, JobState::Scheduled);
    let w = Running::start(broker.clone(), HandlerRegistry::with_builtins(), config(&q));
    wait_state(&*broker, id, JobState::Completed, T).await?;
    w.stop().await;
    Ok(())
}

#[test]
fn invalid_config_is_rejected_before_running() {
    let broker = memory();
    let cfg = WorkerConfig {
        batch_size: 0,
        ..WorkerConfig::for_queues([queue("x")])
    };
    let err = Worker::new(broker, HandlerRegistry::new(), cfg).unwrap_err();
    assert!(
        matches!(
            err,
            WorkerError::Config {
                field: "batch_size",
                ..
            }
        ),
        "{err}"
    );
}

#[tokio::test]
async fn stopping_during_an_outage_gives_up_outcomes_after_flush_timeout() -> Result<()> {
    let inner = memory();
    let faulty = FaultyBroker::new(inner.clone());
    let q = queue("stop-in-outage");
    faulty.switch(Method::Complete, Fault::Unavailable, true);
    let mut cfg = config(&q);
    // Long enough that only the shutdown path can end the retries.
    cfg.ack_retry_timeout = Some(Duration::from_secs(60));
    cfg.flush_timeout = Duration::from_millis(500);
    let w = Running::start(faulty.clone(), HandlerRegistry::with_builtins(), cfg);
    let id = enqueue(&*inner, &q, job("ferry.noop", Value::Null)).await;
    eventually(T, "completion attempted", || async {
        Ok((faulty.calls(Method::Complete) >= 1).then_some(()))
    })
    .await?;
    let started = std::time::Instant::now();
    let report = w.stop().await;
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "took {:?}",
        started.elapsed()
    );
    assert_eq!(report.undelivered, 1, "{report:?}");
    // Not completed by us; it is redelivered after its lease expires.
    assert_eq!(inner.job(id).await?.unwrap().state, JobState::Active);
    Ok(())
}
