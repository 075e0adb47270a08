//! A real network partition between a `ferry worker` and Redis (issue 11, ghost claims): the worker runs inside
//! a network namespace the test creates (`ferry_testkit::Netns`), Redis in the test's own, reached over a veth
//! link that is cut for a few seconds and restored. Claims sent as the link went down stay in the worker's TCP
//! connection and reach Redis when it heals, after the worker gave up on them; they must not leave jobs leased
//! to nobody (waiting out the visibility timeout) nor charge attempts for runs that never happened.
//!
//! Needs root and `ip` (CI has both): elsewhere the test fails saying so, never passes without having run.

use std::collections::{BTreeMap, HashMap};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Result;
use ferry_broker::prelude::*;
use ferry_core::{EventType, JobId, Kind, NewJob, QueueName};
use ferry_testkit::{Netns, NetnsError, RedisServer, eventually};
use futures::StreamExt;
use serde_json::json;

use crate::support::{Proc, enqueue_many};

fn noop() -> NewJob {
    NewJob::new(Kind::parse("ferry.noop").unwrap(), json!({}))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partitioned_worker_leaves_no_ghost_claims_requires_netns() -> Result<()> {
    let ns = match Netns::create() {
        Ok(ns) => ns,
        // A test that cannot run fails, saying why, rather than passing without having run.
        Err(NetnsError::Unavailable(why)) => {
            anyhow::bail!(
                "this test needs network namespaces (root and `ip`, as in CI) and cannot run here: {why}"
            )
        }
        Err(e) => return Err(e.into()),
    };
    let host = ns.host_ip().to_string();
    // Reachable from inside the namespace only through the veth link; the test itself uses loopback, which the
    // cut does not touch.
    let redis = RedisServer::start_with(&["--bind", "127.0.0.1", &host, "--protected-mode", "no"])?;
    let url_inside = format!("redis://{host}:{}", redis.port());
    // The default visibility timeout (30 s): what a ghost claim's jobs would wait after the heal.
    let broker = crate::support::test_broker(&redis.url()).await?;
    let q = QueueName::parse("partition")?;

    // Short call timeouts, so claims time out well within a cut of a few seconds. Eight claim loops
    // (concurrency ÷ batch), each with a claim on the wire when the link goes down.
    let mut worker = Proc::spawn_logged(
        ns.command(env!("CARGO_BIN_EXE_ferry"))
            .args(["worker", "--redis", &url_inside, "--queues", q.as_str()])
            .args(["--concurrency", "80", "--batch-size", "10"])
            .args(["--claim-wait-ms", "200", "--retry-max-delay-ms", "300"])
            .args([
                "--redis-timeout-ms",
                "1000",
                "--redis-connect-timeout-ms",
                "1000",
            ])
            .args(["--broker-call-timeout-ms", "1000"])
            .env("FERRY_LOG", "warn,ferry_worker=info,ferry_broker=info")
            .env_remove("FERRY_LOG_FORMAT")
            .stdin(Stdio::null())
            .stdout(Stdio::null()),
    )?;
    // The attempt of every job.completed event, per job, from the live feed.
    let completed: Arc<Mutex<HashMap<JobId, Vec<u32>>>> = Arc::default();
    let mut events = broker.subscribe().await?;
    let feed = completed.clone();
    tokio::spawn(async move {
        while let Some(e) = events.next().await {
            if e.ty == EventType::Completed {
                feed.lock()
                    .unwrap()
                    .entry(e.job)
                    .or_default()
                    .push(e.attempt);
            }
        }
    });
    let count = |ids: &[JobId]| {
        let done = completed.lock().unwrap();
        ids.iter().filter(|id| done.contains_key(id)).count()
    };

    let warm = enqueue_many(&broker, &q, 1, noop()).await?;
    eventually(
        Duration::from_secs(30),
        "the worker in the namespace to complete a first job",
        || async { Ok((count(&warm) == 1).then_some(())) },
    )
    .await?;

    ns.cut()?;
    // Claims time out (1 s) and are retried while the link is down; jobs arrive meanwhile, so claims held up
    // in the worker's connection find work when they finally reach Redis.
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let ids = enqueue_many(&broker, &q, 200, noop()).await?;
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    ns.heal()?;
    let healed = Instant::now();

    // Every job completes well before a visibility timeout (30 s) has passed since the heal: none waits out a
    // lease taken by a claim nobody was waiting for.
    let done = eventually(
        Duration::from_secs(15),
        "every job to complete after the heal",
        || async { Ok((count(&ids) == ids.len()).then_some(())) },
    )
    .await;
    if let Err(e) = done {
        panic!(
            "{e:#}: {} of {} completed {} ms after the heal; leases held: {:?}",
            count(&ids),
            ids.len(),
            healed.elapsed().as_millis(),
            broker.leases_by_consumer(&q).await?
        );
    }
    // Late duplicates would show up here.
    tokio::time::sleep(Duration::from_millis(500)).await;
    // Each ran once, at its first attempt: no attempt was charged for a claim that never ran.
    let mut attempts: BTreeMap<Vec<u32>, usize> = BTreeMap::new();
    {
        let done = completed.lock().unwrap();
        for id in &ids {
            *attempts.entry(done[id].clone()).or_default() += 1;
        }
    }
    assert_eq!(
        attempts,
        BTreeMap::from([(vec![1], ids.len())]),
        "attempts of each job's job.completed events → jobs"
    );
    worker.stop(Duration::from_secs(20)).await?;
    Ok(())
}
