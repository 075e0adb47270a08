//! Redis data loss repaired from the durable record, with real processes: jobs are accepted and recorded in
//! PostgreSQL, Redis loses them (FLUSHALL stands for an AOF that lost its last second, or a failover to a replica
//! that lagged), and `ferry worker`s with a short `--reconcile-grace-ms` put every one back and run it exactly
//! once. And the other side: a job Redis still knows (waiting in a paused queue, running longer than the grace)
//! is never restored.

use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use ferry_broker::{RedisBroker, prelude::*};
use ferry_core::{JobState, Kind, NewJob, QueueName};
use ferry_testkit::{PostgresServer, RedisServer, eventually};
use serde_json::json;

use crate::support::{Proc, enqueue_many, ferry, migrated_database};

/// Redis + a migrated database.
struct Cluster {
    redis: RedisServer,
    _pg: PostgresServer,
    db: String,
}

impl Cluster {
    fn start() -> Result<Self> {
        let redis = RedisServer::start()?;
        let pg = PostgresServer::start()?;
        let db = migrated_database(&pg, "reconcile")?;
        Ok(Self { redis, _pg: pg, db })
    }

    /// A worker serving `queues` with a recorder, its admin listener on an ephemeral port.
    fn worker(&self, queues: &str, extra: &[&str]) -> Result<Proc> {
        let url = self.redis.url();
        let mut args = vec![
            "worker",
            "--redis",
            &url,
            "--queues",
            queues,
            "--database-url",
            &self.db,
            "--admin-listen",
            "127.0.0.1:0",
        ];
        args.extend_from_slice(extra);
        Proc::spawn_logged(
            ferry()
                .args(&args)
                .env("FERRY_LOG", "warn,ferry_store=debug,ferry_cli=info")
                .env_remove("FERRY_LOG_FORMAT")
                .env_remove("FERRY_DATABASE_URL")
                .stdin(Stdio::null())
                .stdout(Stdio::null()),
        )
    }

    fn count(&self, q: &str) -> Result<u64> {
        let s = ferry_testkit::psql(&self.db, q)?.trim().to_owned();
        s.parse().with_context(|| format!("{q} answered {s:?}"))
    }

    async fn broker(&self) -> Result<RedisBroker> {
        crate::support::test_broker(&self.redis.url()).await
    }
}

fn noop() -> NewJob {
    NewJob::new(Kind::parse("ferry.noop").unwrap(), json!({ "n": 1 }))
}

fn queue(name: &str) -> QueueName {
    QueueName::parse(name).unwrap()
}

/// 100 accepted jobs (and 5 delayed by an hour) are recorded, then Redis loses everything before any worker ran.
/// Two workers with a 2 s grace and a 1 s interval put every job back: each of the 100 completes exactly once
/// (one `job.completed` row, final state completed, restored by the `reconciler`), within the grace plus one
/// interval (with room for slow machines); the delayed ones wait again, scheduled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_redis_lost_before_any_worker_ran_complete_exactly_once() -> Result<()> {
    let c = Cluster::start()?;
    let broker = c.broker().await?;
    let q = queue("lost");
    let ids = enqueue_many(&broker, &q, 100, noop()).await?;
    let mut later = noop();
    later.delay_ms = Some(3_600_000);
    let delayed = enqueue_many(&broker, &q, 5, later).await?;

    // A recorder (in a worker serving another queue, reconciler off) copies the submissions to PostgreSQL.
    let mut recorder = c.worker("elsewhere", &["--reconcile-interval-ms", "0"])?;
    eventually(Duration::from_secs(30), "105 recorded jobs", || async {
        Ok((c.count("select count(*) from jobs where payload is not null")? == 105).then_some(()))
    })
    .await?;
    recorder.stop(Duration::from_secs(20)).await?;

    c.redis.cli(&["FLUSHALL"])?;
    assert_eq!(broker.job(ids[0]).await?, None, "Redis lost the job");

    let (grace, interval) = (Duration::from_secs(2), Duration::from_secs(1));
    let started = Instant::now();
    let reconcile = [
        "--reconcile-grace-ms",
        "2000",
        "--reconcile-interval-ms",
        "1000",
    ];
    let _a = c.worker("lost", &reconcile)?;
    let _b = c.worker("lost", &reconcile)?;
    // Slow machines: room for the processes to start and the jobs to run, on top of grace plus one interval.
    let slack = Duration::from_secs(30);
    eventually(grace + interval + slack, "100 completed jobs", || async {
        Ok((c.count("select count(*) from jobs where state = 'completed'")? == 100).then_some(()))
    })
    .await?;
    eprintln!(
        "all restored jobs completed {:?} after the workers started",
        started.elapsed()
    );

    // Passes keep running after the repair: give them time to double something, then check nothing was.
    tokio::time::sleep(interval * 3).await;
    let completions = c.count(
        "select count(*) from (select job_id from job_events where type = 'job.completed'
         group by job_id having count(*) = 1) s",
    )?;
    assert_eq!(completions, 100, "one job.completed per job");
    assert_eq!(
        c.count("select count(*) from job_events where type = 'job.completed'")?,
        100
    );
    assert_eq!(
        c.count("select count(*) from job_events where type = 'job.duplicate_completion'")?,
        0
    );
    assert_eq!(
        c.count(
            "select count(*) from job_events where actor = 'reconciler' and type = 'job.queued'
             and data = '{\"restored\": true}'"
        )?,
        100,
        "each job restored once, audited"
    );
    assert_eq!(
        c.count(
            "select count(*) from job_events where actor = 'reconciler' and type = 'job.scheduled'"
        )?,
        5
    );
    assert_eq!(
        c.count("select count(*) from jobs where state = 'scheduled'")?,
        5
    );
    for id in &delayed {
        let info = broker.job(*id).await?.context("restored delayed job")?;
        assert_eq!(info.state, JobState::Scheduled);
    }
    for id in &ids {
        let info = broker.job(*id).await?.context("restored job")?;
        assert_eq!(info.state, JobState::Completed);
        assert_eq!(info.attempts, 1);
    }
    Ok(())
}

/// Jobs Redis still holds are never restored, however long their record has not moved: 20 jobs waiting in a
/// paused queue and 2 jobs running for 4 s, under a reconciler with a 500 ms grace passing every 500 ms. Once
/// resumed, every job runs once; no event is the reconciler's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_redis_still_knows_are_never_restored() -> Result<()> {
    let c = Cluster::start()?;
    let broker = c.broker().await?;
    let (held, slow) = (queue("held"), queue("slow"));
    broker.pause(&held).await?;
    enqueue_many(&broker, &held, 20, noop()).await?;
    let sleep = NewJob::new(Kind::parse("ferry.sleep").unwrap(), json!({ "ms": 4_000 }));
    enqueue_many(&broker, &slow, 2, sleep).await?;

    let w = c.worker(
        "held,slow",
        &[
            "--reconcile-grace-ms",
            "500",
            "--reconcile-interval-ms",
            "500",
        ],
    )?;
    eventually(
        Duration::from_secs(30),
        "the slow jobs to complete",
        || async {
            Ok(
                (c.count("select count(*) from jobs where state = 'completed'")? == 2)
                    .then_some(()),
            )
        },
    )
    .await?;
    let passes = w.log().matches("reconcile pass: nothing lost").count();
    assert!(
        passes >= 3,
        "the reconciler ran while the jobs were held ({passes} passes):\n{}",
        w.log()
    );
    assert_eq!(
        c.count("select count(*) from jobs where state = 'queued'")?,
        20
    );

    broker.resume(&held).await?;
    eventually(Duration::from_secs(30), "22 completed jobs", || async {
        Ok((c.count("select count(*) from jobs where state = 'completed'")? == 22).then_some(()))
    })
    .await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        c.count("select count(*) from job_events where actor = 'reconciler'")?,
        0,
        "nothing restored"
    );
    for ty in ["job.queued", "job.active", "job.completed"] {
        assert_eq!(
            c.count(&format!(
                "select count(*) from job_events where type = '{ty}'"
            ))?,
            22,
            "one {ty} per job"
        );
    }
    assert!(!w.log().contains("restored a job"), "{}", w.log());
    Ok(())
}
