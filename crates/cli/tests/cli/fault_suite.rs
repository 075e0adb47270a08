//! The fault suite: one scenario per test, each a small cluster of real processes — redis-server (append-only
//! file, `appendfsync always`), PostgreSQL, two `ferry worker`s each with a recorder — fed a steady stream of
//! jobs while one fault strikes. The ground truth is PostgreSQL: after the feed ends and the cluster recovers,
//! every job the engine accepted must be completed in the record exactly once.
//!
//! Each scenario prints one row, `FAULT-ROW | scenario | jobs | lost | doubled | stuck | recovery | restored`, where
//! *lost* is an accepted job that is not completed and that Redis no longer knows, *doubled* one with more than
//! one `job.completed` row, *stuck* one still unfinished that Redis knows, and *recovery* the time from the end of
//! the fault until every job accepted before that moment is completed in the record; *restored* counts the jobs
//! the reconciler put back from the record because Redis had lost them. `scripts/faults.sh` runs
//! the suite longer and prints the rows as a table (the partition scenario needs root and `ip`, as in CI, and
//! fails elsewhere); the test suite runs the short version
//! (`FERRY_FAULT_FEED_SECS`, default 8 s of feed at `FERRY_FAULT_RATE`, default 40 jobs/s).

use std::collections::{HashMap, HashSet};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use ferry_broker::{EngineConfig, RedisBroker, prelude::*};
use ferry_core::{JobId, Kind, NewJob, QueueName};
use ferry_testkit::{Netns, NetnsError, PostgresServer, RedisCluster, RedisServer};
use serde_json::json;

use crate::support::{Proc, ferry, migrated_database};

const QUEUE: &str = "faults";
/// The workers' visibility timeout: a lease not heartbeated for this long is reclaimed by the other worker.
const VISIBILITY_MS: u64 = 2_000;
/// Each job sleeps this long, so faults hit work in flight.
const JOB_MS: u64 = 40;

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Where the scenario's Redis runs.
enum Backend {
    Standalone(RedisServer),
    /// A Redis Cluster (three masters, a replica each), reached with `--redis-cluster`.
    Cluster(RedisCluster),
}

/// Redis, PostgreSQL (migrated) and the workers of one scenario.
struct Cluster {
    backend: Backend,
    pg: PostgresServer,
    db: String,
    workers: Vec<Proc>,
    /// The network namespace worker-a runs in, for the partition scenario.
    netns: Option<Netns>,
    /// Set by a fault that needs the feed to stop for a moment.
    feed_paused: Arc<AtomicBool>,
    /// Jobs may run twice (Redis lost their completion): counted, not a failure.
    reruns_expected: bool,
}

impl Cluster {
    fn start() -> Result<Self> {
        Self::start_with(None)
    }

    /// With `netns`, worker-a runs inside it and reaches Redis over its veth link (without a recorder: the
    /// database listens on loopback only; worker-b records everything).
    fn start_with(netns: Option<Netns>) -> Result<Self> {
        let mut args = vec!["--appendonly", "yes", "--appendfsync", "always"];
        let host = netns.as_ref().map(|ns| ns.host_ip().to_string());
        if let Some(host) = &host {
            args.extend(["--bind", "127.0.0.1", host, "--protected-mode", "no"]);
        }
        let redis = RedisServer::start_with(&args)?;
        Self::start_on(Backend::Standalone(redis), netns)
    }

    /// The scenario's Redis is a Redis Cluster of three masters with a replica each.
    fn start_on_redis_cluster() -> Result<Self> {
        let cluster = RedisCluster::start_with(3, 1, &["--appendfsync", "always"])?;
        Self::start_on(Backend::Cluster(cluster), None)
    }

    fn start_on(backend: Backend, netns: Option<Netns>) -> Result<Self> {
        let pg = PostgresServer::start()?;
        let db = migrated_database(&pg, "faults")?;
        let mut c = Self {
            backend,
            pg,
            db,
            workers: Vec::new(),
            netns,
            feed_paused: Arc::default(),
            reruns_expected: false,
        };
        if c.netns.is_some() {
            c.add_worker_in_netns("worker-a")?;
        } else {
            c.add_worker("worker-a")?;
        }
        c.add_worker("worker-b")?;
        Ok(c)
    }

    /// The standalone Redis (every scenario but the cluster's).
    fn redis(&mut self) -> &mut RedisServer {
        match &mut self.backend {
            Backend::Standalone(r) => r,
            Backend::Cluster(_) => panic!("this scenario runs on a standalone Redis"),
        }
    }

    /// How a worker is told where Redis is.
    fn redis_flags(&self) -> [String; 2] {
        match &self.backend {
            Backend::Standalone(r) => ["--redis".into(), r.url()],
            Backend::Cluster(c) => ["--redis-cluster".into(), c.urls().join(",")],
        }
    }

    fn add_worker_in_netns(&mut self, consumer: &str) -> Result<()> {
        let port = self.redis().port();
        let ns = self.netns.as_ref().context("no namespace")?;
        let url = format!("redis://{}:{}", ns.host_ip(), port);
        let mut cmd = ns.command(env!("CARGO_BIN_EXE_ferry"));
        // Short call timeouts, so claims time out within the cut; no recorder (the database listens on
        // loopback only, and worker-b records everything).
        cmd.args(["worker", "--redis", &url, "--no-recorder"])
            .args([
                "--redis-timeout-ms",
                "1000",
                "--redis-connect-timeout-ms",
                "1000",
            ])
            .args(["--broker-call-timeout-ms", "1000"]);
        self.spawn_worker(cmd, consumer)
    }

    fn add_worker(&mut self, consumer: &str) -> Result<()> {
        let mut cmd = ferry();
        cmd.arg("worker")
            .args(self.redis_flags())
            .args(["--database-url", &self.db])
            // The reconciler puts back jobs Redis lost, from the record: quick here, so a scenario that
            // loses Redis writes recovers within its wait.
            .args([
                "--reconcile-grace-ms",
                "3000",
                "--reconcile-interval-ms",
                "1000",
            ]);
        self.spawn_worker(cmd, consumer)
    }

    /// `cmd` (`ferry worker` with where it connects) with the settings every worker of the suite shares.
    fn spawn_worker(&mut self, mut cmd: std::process::Command, consumer: &str) -> Result<()> {
        let visibility = VISIBILITY_MS.to_string();
        let w = Proc::spawn_logged(
            cmd.args([
                "--queues",
                QUEUE,
                "--consumer",
                consumer,
                "--concurrency",
                "20",
            ])
            .args(["--visibility-timeout-ms", &visibility])
            .args(["--admin-listen", "127.0.0.1:0"])
            .env("FERRY_LOG", "warn,ferry_cli=info")
            .env_remove("FERRY_LOG_FORMAT")
            .env_remove("FERRY_DATABASE_URL")
            .stdin(Stdio::null())
            .stdout(Stdio::null()),
        )?;
        self.workers.push(w);
        Ok(())
    }

    async fn broker(&self) -> Result<RedisBroker> {
        let engine = EngineConfig {
            visibility_timeout: Duration::from_millis(VISIBILITY_MS),
            ..EngineConfig::default()
        };
        Ok(match &self.backend {
            Backend::Standalone(r) => RedisBroker::connect(&[r.url()], engine).await?,
            Backend::Cluster(c) => {
                RedisBroker::connect_cluster(
                    &c.urls(),
                    ferry_broker::DEFAULT_VSHARDS,
                    engine,
                    ferry_broker::RedisOptions::default(),
                )
                .await?
            }
        })
    }

    /// Per job in the record: its state and how many completions it has (`job.completed` rows, and
    /// `job.duplicate_completion` rows: the job ran again after a first completion).
    fn record(&self) -> Result<HashMap<JobId, (String, u64)>> {
        let out = ferry_testkit::psql(
            &self.db,
            "select j.id, j.state, (select count(*) from job_events e
                                    where e.job_id = j.id
                                      and e.type in ('job.completed', 'job.duplicate_completion'))
             from jobs j",
        )?;
        let mut record = HashMap::new();
        for line in out.lines().filter(|l| !l.is_empty()) {
            let mut cols = line.split('|');
            let (Some(id), Some(state), Some(n)) = (cols.next(), cols.next(), cols.next()) else {
                bail!("unexpected psql line {line:?}");
            };
            let id = JobId(id.parse().with_context(|| format!("job id {id:?}"))?);
            record.insert(id, (state.to_owned(), n.parse()?));
        }
        Ok(record)
    }
}

/// Jobs the engine accepted, with when each was accepted.
type Accepted = Arc<Mutex<Vec<(JobId, Instant)>>>;

/// Enqueues `rate` jobs a second for `secs` seconds, in batches every 100 ms. A batch the engine refuses (Redis
/// down) is not accepted and not counted; the feed goes on.
fn feed(
    broker: RedisBroker,
    secs: u64,
    rate: u64,
    paused: Arc<AtomicBool>,
) -> (Accepted, tokio::task::JoinHandle<()>) {
    let accepted: Accepted = Arc::default();
    let out = accepted.clone();
    let task = tokio::spawn(async move {
        let q = QueueName::parse(QUEUE).unwrap();
        let job = NewJob::new(Kind::parse("ferry.sleep").unwrap(), json!({ "ms": JOB_MS }));
        let per_tick = (rate / 10).max(1) as usize;
        let start = Instant::now();
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        while start.elapsed() < Duration::from_secs(secs) {
            tick.tick().await;
            if paused.load(Ordering::Relaxed) {
                continue;
            }
            let batch = vec![job.clone(); per_tick];
            let Ok(Ok(done)) =
                tokio::time::timeout(Duration::from_secs(2), broker.enqueue_batch(&q, batch)).await
            else {
                continue;
            };
            let now = Instant::now();
            out.lock()
                .unwrap()
                .extend(done.into_iter().map(|e| (e.id, now)));
        }
    });
    (accepted, task)
}

/// One row of the table.
#[derive(Debug)]
struct Row {
    scenario: &'static str,
    jobs: usize,
    lost: usize,
    doubled: usize,
    stuck: usize,
    recovery: Duration,
    /// Jobs the reconciler put back from the record (Redis had lost them).
    restored: u64,
}

/// Feeds the cluster, strikes with `fault` once a third of the feed has gone by (it returns when the fault is
/// over: the process restarted, the signal sent), then measures and prints the row and asserts nothing was
/// lost, doubled or stuck.
async fn scenario<F, Fut>(name: &'static str, fault: F) -> Result<Row>
where
    F: FnOnce(Cluster) -> Fut,
    Fut: Future<Output = Result<Cluster>>,
{
    scenario_on(name, Cluster::start()?, fault).await
}

async fn scenario_on<F, Fut>(name: &'static str, c: Cluster, fault: F) -> Result<Row>
where
    F: FnOnce(Cluster) -> Fut,
    Fut: Future<Output = Result<Cluster>>,
{
    let secs = env_u64("FERRY_FAULT_FEED_SECS", 8);
    let rate = env_u64("FERRY_FAULT_RATE", 40);
    let (accepted, feeder) = feed(c.broker().await?, secs, rate, c.feed_paused.clone());
    tokio::time::sleep(Duration::from_millis(secs * 1000 / 3)).await;
    let c = fault(c).await?;
    let fault_over = Instant::now();
    feeder.await?;
    let accepted: Vec<(JobId, Instant)> = accepted.lock().unwrap().clone();
    let before_fault: HashSet<JobId> = accepted
        .iter()
        .filter(|(_, at)| *at <= fault_over)
        .map(|(id, _)| *id)
        .collect();
    let all: HashSet<JobId> = accepted.iter().map(|(id, _)| *id).collect();

    // Recovery: every job accepted before the fault ended is completed in the record.
    let mut recovery = None;
    let within = Duration::from_secs(60 + secs);
    let deadline = Instant::now() + within;
    let done = |record: &HashMap<JobId, (String, u64)>, ids: &HashSet<JobId>| {
        ids.iter()
            .filter(|id| record.get(id).is_some_and(|(s, _)| s == "completed"))
            .count()
            == ids.len()
    };
    let res = loop {
        // PostgreSQL may be starting again; an error here is a poll that did not answer, not a failure.
        if let Ok(record) = c.record() {
            if recovery.is_none() && done(&record, &before_fault) {
                recovery = Some(fault_over.elapsed());
            }
            if done(&record, &all) {
                break Ok(());
            }
        }
        if Instant::now() >= deadline {
            break Err(anyhow::anyhow!(
                "not every accepted job was completed in the record within {within:?}"
            ));
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    // Late duplicates show up after the last completion; give them a moment.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let record = c.record()?;
    let broker = c.broker().await?;
    let reruns_expected = c.reruns_expected;
    let (mut lost, mut stuck, mut doubled) = (0, 0, 0);
    for id in &all {
        let (state, completions) = record
            .get(id)
            .cloned()
            .unwrap_or_else(|| ("absent".into(), 0));
        if completions > 1 {
            doubled += 1;
        }
        if state != "completed" {
            match broker.job(*id).await? {
                Some(_) => stuck += 1,
                None => lost += 1,
            }
        }
    }
    let restored = ferry_testkit::psql(
        &c.db,
        "select count(distinct job_id) from job_events where actor = 'reconciler'",
    )?
    .trim()
    .parse()
    .unwrap_or(0);
    let row = Row {
        restored,
        scenario: name,
        jobs: all.len(),
        lost,
        doubled,
        stuck,
        recovery: recovery.unwrap_or(within),
    };
    println!(
        "FAULT-ROW | {} | {} | {} | {} | {} | {:.1} s | {}",
        row.scenario,
        row.jobs,
        row.lost,
        row.doubled,
        row.stuck,
        row.recovery.as_secs_f64(),
        row.restored
    );
    if let Err(e) = res {
        for (i, w) in c.workers.iter().enumerate() {
            eprintln!("--- worker {i} ---\n{}", w.log());
        }
        return Err(e.context(format!("{row:?}")));
    }
    assert!(row.jobs > 0, "the feed was accepted: {row:?}");
    assert_eq!(
        (row.lost, row.stuck),
        (0, 0),
        "nothing lost or stuck: {row:?}"
    );
    if !reruns_expected {
        assert_eq!(row.doubled, 0, "nothing ran twice: {row:?}");
    }
    Ok(row)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_worker_kill_9() -> Result<()> {
    scenario("worker kill -9", async |mut c| {
        c.workers[0].kill9();
        Ok(c)
    })
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_worker_sigstop_past_the_lease() -> Result<()> {
    scenario("worker SIGSTOP past the lease", async |c| {
        let pid = c.workers[0].pid().to_string();
        signal("-STOP", &pid)?;
        tokio::time::sleep(Duration::from_millis(3 * VISIBILITY_MS)).await;
        signal("-CONT", &pid)?;
        Ok(c)
    })
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_redis_kill_9_and_restart() -> Result<()> {
    scenario("redis kill -9 + restart", async |mut c| {
        c.redis().kill();
        tokio::time::sleep(Duration::from_secs(2)).await;
        c.redis().restart()?;
        Ok(c)
    })
    .await?;
    Ok(())
}

/// Issue 15: on a Redis Cluster, the master serving the scenario's queue is killed; its replica takes over
/// without help from ferry, and what asynchronous replication dropped is put back by the reconciler.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_redis_cluster_master_kill_9() -> Result<()> {
    let mut c = Cluster::start_on_redis_cluster()?;
    // Completions the old master took but did not pass on may run again: counted, not a failure.
    c.reruns_expected = true;
    scenario_on("redis cluster master kill -9", c, async |mut c| {
        let Backend::Cluster(cluster) = &mut c.backend else {
            unreachable!("started on a cluster")
        };
        let tags = RedisBroker::vshard_tags(ferry_broker::DEFAULT_VSHARDS);
        let ring = ferry_broker::ShardRing::with_ids(&tags);
        let tag = &tags[ring.shard_for(QUEUE)];
        let slot = cluster.slot_of(tag)?;
        let master = cluster.master_of_slot(slot)?;
        let i = cluster
            .index_of(master)
            .context("the master is one of ours")?;
        cluster.node(i).kill();
        cluster.wait_settled()?;
        let promoted = cluster.master_of_slot(slot)?;
        assert_ne!(promoted, master, "a replica took over slot {slot}");
        Ok(c)
    })
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_redis_graceful_restart() -> Result<()> {
    scenario("redis graceful restart", async |mut c| {
        c.redis().stop()?;
        tokio::time::sleep(Duration::from_secs(2)).await;
        c.redis().restart()?;
        Ok(c)
    })
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_postgres_stopped() -> Result<()> {
    scenario("postgres stopped 10 s", async |mut c| {
        c.pg.stop()?;
        tokio::time::sleep(Duration::from_secs(10)).await;
        c.pg.start_again()?;
        Ok(c)
    })
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_worker_sigterm_under_load() -> Result<()> {
    scenario("worker SIGTERM under load", async |mut c| {
        let status = c.workers[0].stop(Duration::from_secs(60)).await?;
        assert!(status.success(), "the worker drains and exits 0: {status}");
        Ok(c)
    })
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_network_partition_of_a_worker() -> Result<()> {
    let ns = match Netns::create() {
        Ok(ns) => ns,
        // A test that cannot run fails, saying why, rather than passing without having run.
        Err(NetnsError::Unavailable(why)) => {
            bail!("this scenario needs network namespaces (root and `ip`, as in CI): {why}")
        }
        Err(e) => return Err(e.into()),
    };
    let c = Cluster::start_with(Some(ns))?;
    scenario_on("network partition of a worker 10 s", c, async |c| {
        let ns = c.netns.as_ref().context("namespace")?;
        ns.cut()?;
        tokio::time::sleep(Duration::from_secs(10)).await;
        ns.heal()?;
        Ok(c)
    })
    .await?;
    Ok(())
}

/// A machine crash with `appendfsync everysec`. Claims are paused for a moment first, so a backlog of queued
/// jobs is in the record (and in the newest part of the file); then the feed stops briefly (so the recorder has
/// copied every accepted job: a job Redis loses before the recorder copied it cannot be repaired, see
/// docs/architecture.md), Redis is killed, the newest 40 % of its append-only file is cut off, and it starts
/// again from what is left. Jobs whose enqueue was lost come back through the reconciler (same id, from the
/// record: *restored*); jobs whose completion was lost run again, recorded once as `job.completed` and then as
/// `job.duplicate_completion`, and counted as *doubled*: the price of `everysec`, which the record makes
/// visible.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_redis_aof_tail_lost() -> Result<()> {
    let mut c = Cluster::start()?;
    c.redis()
        .cli(&["CONFIG", "SET", "appendfsync", "everysec"])?;
    c.reruns_expected = true;
    scenario_on("redis crash, AOF tail lost", c, async |mut c| {
        let q = QueueName::parse(QUEUE)?;
        c.broker().await?.pause(&q).await?;
        tokio::time::sleep(Duration::from_millis(1500)).await;
        c.feed_paused.store(true, Ordering::Relaxed);
        tokio::time::sleep(Duration::from_millis(1000)).await;
        c.redis().kill();
        let cut = cut_aof_tail(c.redis().dir(), 0.4)?;
        eprintln!("cut {cut} bytes off the append-only file");
        c.redis().restart()?;
        // The pause may or may not have survived the cut.
        c.broker().await?.resume(&q).await?;
        c.feed_paused.store(false, Ordering::Relaxed);
        Ok(c)
    })
    .await?;
    Ok(())
}

/// Cuts the last `share` of the newest incremental append-only file (Redis 7's `appendonlydir`), as a crash
/// loses what was written but not yet on disk; Redis loads a file cut mid-command (`aof-load-truncated`).
fn cut_aof_tail(dir: &std::path::Path, share: f64) -> Result<u64> {
    let aof_dir = dir.join("appendonlydir");
    let incr = std::fs::read_dir(&aof_dir)
        .with_context(|| format!("{}", aof_dir.display()))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.to_string_lossy().ends_with(".incr.aof"))
        .max_by_key(|p| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0))
        .context("an incremental append-only file")?;
    let len = std::fs::metadata(&incr)?.len();
    let keep = len - (len as f64 * share) as u64;
    std::fs::OpenOptions::new()
        .write(true)
        .open(&incr)?
        .set_len(keep)?;
    Ok(len - keep)
}

fn signal(sig: &str, pid: &str) -> Result<()> {
    let ok = std::process::Command::new("kill")
        .args([sig, pid])
        .status()?
        .success();
    if !ok {
        bail!("kill {sig} {pid} failed");
    }
    Ok(())
}
