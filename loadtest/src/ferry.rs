//! ferry's side of the `jobs` scenario: enqueue, processing by one `ferry worker` process, latency at fixed
//! offered rates — on a redis-server of its own with persistence off, or on a Redis Cluster of its own, with the
//! jobs spread over one queue or several.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use ferry_broker::{Broker, EngineConfig};
use ferry_core::{EventType, JobId, Kind, NewJob, QueueName};
use futures::StreamExt;
use serde::Serialize;
use tokio::process::{Child, Command};
use tokio::task::JoinSet;

use crate::procs;
use crate::redis_cpu::{self, Admin, Meter, PhaseCost, round};
use crate::server::{BenchRedis, Node, Topology};
use crate::stats::Latency;

/// Parameters of one ferry run.
#[derive(Debug, Clone)]
pub struct Params {
    pub jobs: u64,
    pub concurrency: u32,
    pub batch_size: u32,
    pub rates: Vec<u64>,
    pub latency_secs: u64,
    pub enqueue_chunk: usize,
    pub enqueue_tasks: usize,
    pub queue: String,
    /// Queues the jobs are spread over (round robin by enqueue call): `queue` itself when 1, else `queue-0`…
    pub queues: usize,
    /// A standalone Redis or a Redis Cluster.
    pub topology: Topology,
    pub ferry_bin: PathBuf,
    /// Extra `ferry worker` arguments (tuning experiments).
    pub worker_args: Vec<String>,
    /// Run the worker's recorder against a PostgreSQL of its own (durable settings: fsync and synchronous
    /// commit on), and report how fast and how far behind it records.
    pub record: bool,
    /// With `record`: seed two finished days 40 days back and, 1.5 s into the processing phase, drop them through
    /// the store's retention pass while the recorder writes (the recorder's longest stall meanwhile).
    pub record_drop: bool,
    /// With `record`: the processing worker runs without a recorder; once every job is processed, a worker that
    /// only records starts, and the recorded jobs/s count from its start (the recorder alone on the machine).
    pub recorder_alone: bool,
    /// `ferry gateway` processes attached to the run's Redis for the whole run, with no clients (the
    /// gateways-attached scenario: what idle gateways cost Redis per job).
    pub gateways: usize,
}

/// Recorder lag: from an event's time (`at`) to its row's commit (`recorded_at`), over a phase's events.
#[derive(Debug, Serialize)]
pub struct Lag {
    pub events: u64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

#[derive(Debug, Serialize)]
pub struct RecorderResult {
    /// From spawning the worker until every job's row is `completed` in PostgreSQL.
    pub secs_until_recorded: f64,
    pub jobs_recorded_per_sec: f64,
    /// `job_events` rows committed during the processing phase, per second of it.
    pub event_rows_per_sec: f64,
    pub processing_lag: Lag,
    /// WAL written from the migrated, empty record to the last job's commit (enqueue phase included), per job.
    pub wal_bytes_per_job: f64,
    /// CPU of the whole PostgreSQL server from spawning the worker until every row is committed, per job: the
    /// recording of the enqueue phase and of the processing phase.
    pub postgres_cpu_usec_per_job: f64,
    /// `jobs_open` entries of finished jobs at the end (reconciler candidates that are not: 0 expected).
    pub jobs_open_of_finished_jobs: u64,
    /// `jobs`, `job_events` and `jobs_open` (every partition), tables and indexes, per million jobs recorded.
    pub table_and_index_mib_per_million_jobs: f64,
    /// Longest time without a commit of the recorder during the processing phase (the gap between consecutive
    /// `recorded_at`), outside a retention drop's window.
    pub longest_commit_gap_ms: f64,
    /// With `--record-drop`: the retention drop during the processing phase.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub drop: Option<DropResult>,
    pub postgres: &'static str,
}

/// A retention drop while the recorder writes.
#[derive(Debug, Serialize)]
pub struct DropResult {
    /// Slots (a `jobs` and a `job_events` partition each) dropped, and the rows they held.
    pub slots: u64,
    pub jobs_dropped: u64,
    pub events_dropped: u64,
    /// The longest drop transaction (it holds the tables' exclusive locks).
    pub longest_drop_ms: f64,
    /// The recorder's longest time without a commit from 1 s before the pass to 1 s after.
    pub longest_commit_gap_ms: f64,
}

#[derive(Debug, Serialize)]
pub struct EnqueueResult {
    pub jobs: u64,
    /// Jobs enqueued on each queue (the processing phase works them all).
    #[serde(skip)]
    pub per_queue: Vec<u64>,
    pub chunk: usize,
    pub tasks: usize,
    pub jobs_per_sec: f64,
    pub redis: PhaseCost,
}

#[derive(Debug, Serialize)]
pub struct ProcessingResult {
    pub jobs: u64,
    pub concurrency: u32,
    pub batch_size: u32,
    /// From spawning the worker process until no job is waiting or active.
    pub secs: f64,
    pub jobs_per_sec: f64,
    /// When the first job was seen finished, from the spawn (worker start-up included).
    pub first_completion_ms: Option<f64>,
    /// Jobs over the time from the first finished job to the last (start-up excluded).
    pub steady_jobs_per_sec: Option<f64>,
    pub worker_cpu_usec_per_job: f64,
    /// Fraction of one core the worker process used.
    pub worker_cpu_utilisation: f64,
    pub dead: u64,
    pub scheduled: u64,
    pub redis_used_memory_bytes: Option<u64>,
    pub redis_used_memory_bytes_per_job: Option<f64>,
    pub redis: PhaseCost,
    /// With `--recorder on`.
    pub recorder: Option<RecorderResult>,
    #[serde(skip)]
    pub spawned_at_ms: u64,
}

#[derive(Debug, Serialize)]
pub struct LatencyResult {
    pub offered_rate: u64,
    pub achieved_send_rate: f64,
    pub secs: u64,
    /// Jobs sent in the first part of the phase are not in the percentiles.
    pub warmup_ms_excluded: f64,
    pub sent: u64,
    pub completed: u64,
    pub missing: u64,
    pub enqueue_errors: u64,
    pub ticks: u64,
    pub max_batches_in_flight: usize,
    pub latency: Latency,
    pub worker_cpu_usec_per_job: f64,
    pub worker_cpu_utilisation: f64,
    /// This process (paced producer + event listener), fraction of one core.
    pub producer_cpu_utilisation: f64,
    pub redis: PhaseCost,
    /// With `--recorder on`: lag of this phase's events.
    pub recorder_lag: Option<Lag>,
    /// With `--recorder on`: CPU of the whole PostgreSQL server from the phase's start until the recorder has
    /// committed all of its events, per job.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub postgres_cpu_usec_per_job: Option<f64>,
    /// With `--recorder on`: WAL written over the same span, per job.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub wal_bytes_per_job: Option<f64>,
    #[serde(skip)]
    pub started_at_ms: u64,
}

/// The gateways attached to a run.
#[derive(Debug, Serialize)]
pub struct GatewaysResult {
    pub count: usize,
    /// CPU of all the gateway processes together over the processing phase, per job: what receiving (or
    /// not receiving) the job events costs them.
    pub cpu_usec_per_job_processing: f64,
    /// Partitions the gateways were subscribed to at the end (`ferry_gateway_partitions`, summed).
    pub partitions: f64,
}

/// Where the run's queues lived.
#[derive(Debug, Serialize)]
pub struct ServerPlacement {
    #[serde(flatten)]
    pub node: Node,
    /// Queues whose keys are on this server.
    pub queues: usize,
}

#[derive(Debug, Serialize)]
pub struct RunResult {
    pub system: &'static str,
    pub redis: Topology,
    pub queues: usize,
    /// The servers holding data (one, or each master of the cluster) and the queues on each.
    pub servers: Vec<ServerPlacement>,
    pub batch_size: u32,
    /// With `--gateways`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gateways: Option<GatewaysResult>,
    pub recorder: bool,
    /// `--recorder-alone`: the recorder ran after the processing, alone.
    pub recorder_alone: bool,
    pub worker_args: Vec<String>,
    pub enqueue: EnqueueResult,
    pub processing: ProcessingResult,
    pub latency: Vec<LatencyResult>,
}

/// Check that `bin` is a ferry binary with a `worker` subcommand.
pub async fn check_worker_bin(bin: &Path) -> anyhow::Result<()> {
    let out = tokio::time::timeout(
        Duration::from_secs(20),
        Command::new(bin)
            .args(["worker", "--help"])
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .context("`ferry worker --help` hung")?
    .with_context(|| format!("running {}", bin.display()))?;
    if !out.status.success() {
        bail!(
            "{} has no working `worker` subcommand ({}): {}",
            bin.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// The whole scenario for one worker batch size, on a fresh redis-server.
pub async fn run(p: &Params) -> anyhow::Result<RunResult> {
    let redis = BenchRedis::start_topology(p.topology).await?;
    // ferry's Redis engine with its default configuration (events and fencing on, as in production).
    let broker: Arc<dyn Broker> = Arc::new(redis.broker(EngineConfig::default()).await?);
    let mut admin = redis.admins().await?;
    let names = queue_names(p);
    let queues = names
        .iter()
        .map(|q| QueueName::parse(q.as_str()))
        .collect::<Result<Vec<_>, _>>()?;
    let placement = Placement {
        server_of: redis.placement(&names).await?,
        servers: redis.nodes().len(),
    };
    let servers = redis
        .nodes()
        .iter()
        .enumerate()
        .map(|(i, n)| ServerPlacement {
            node: n.clone(),
            queues: placement.server_of.iter().filter(|&&s| s == i).count(),
        })
        .collect::<Vec<_>>();
    eprintln!(
        "[loadtest] ferry: {} queue(s) on {}: {:?} per server",
        queues.len(),
        p.topology.label(),
        servers.iter().map(|s| s.queues).collect::<Vec<_>>()
    );
    let logdir = tempfile::tempdir()?;
    let pg = if p.record {
        Some(BenchPostgres::start(&p.ferry_bin).await?)
    } else {
        None
    };

    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()?;
    let mut gateways = Vec::with_capacity(p.gateways);
    for i in 0..p.gateways {
        let dir = logdir.path().join(format!("gateway-{i}"));
        std::fs::create_dir_all(&dir)?;
        gateways.push(
            crate::gw::start_gateway(&p.ferry_bin, &redis.ferry_args(), &dir, &http)
                .await
                .with_context(|| format!("starting gateway {i}"))?,
        );
    }
    if p.gateways > 0 {
        eprintln!("[loadtest] ferry: {} gateways attached", p.gateways);
    }
    let gateways_cpu = || -> anyhow::Result<u64> {
        gateways
            .iter()
            .map(|g| redis_cpu::proc_cpu_micros(g.pid).map_err(anyhow::Error::from))
            .sum()
    };

    if pg.is_some() && p.recorder_alone {
        // The recorder group, made before anything is logged, so it starts at the log's first entry and the log
        // keeps every entry until the recorder that starts after the processing has read it.
        for shard in 0..broker.log_shards() {
            let read = broker
                .read_log(
                    shard,
                    ferry_broker::RECORDER_GROUP,
                    "loadtest",
                    1,
                    Duration::from_millis(1),
                    None,
                )
                .await?;
            if !read.is_empty() {
                bail!("the event log of a fresh Redis already holds entries");
            }
        }
    }
    eprintln!("[loadtest] ferry: enqueue {} jobs", p.jobs);
    let enqueue = enqueue_phase(&broker, &queues, &placement, &mut admin, p).await?;
    eprintln!(
        "[loadtest] ferry: enqueue {} jobs/s, Redis {} us/job",
        enqueue.jobs_per_sec, enqueue.redis.redis_cpu_usec_per_job
    );

    let log = logdir.path().join("worker.log");
    let gw_cpu0 = gateways_cpu()?;
    let drop_task = match (&pg, p.record_drop) {
        (Some(pg), true) => {
            let seeded = pg.seed_expired().await?;
            let store = pg.store()?;
            Some(tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(1500)).await;
                let config = ferry_store::maintenance::MaintenanceConfig {
                    retention: Some(Duration::from_secs(30 * 86_400)),
                    ..Default::default()
                };
                let from = ferry_core::now_ms();
                let r = ferry_store::Store::maintain(&store, &config, from).await;
                (seeded, from, ferry_core::now_ms(), r)
            }))
        }
        _ => None,
    };
    let pg_cpu0 = pg.as_ref().map(BenchPostgres::cpu_micros).transpose()?;
    let (mut processing, mut worker) = processing_phase(
        &broker,
        (&queues, &placement, &enqueue.per_queue),
        &mut admin,
        &redis,
        p,
        pg.as_ref(),
        &log,
    )
    .await?;
    let gateways_result = if p.gateways > 0 {
        let cpu = gateways_cpu()?.saturating_sub(gw_cpu0);
        let mut partitions = 0.0;
        for g in &gateways {
            partitions += gateway_partitions(&http, g.port).await.unwrap_or(f64::NAN);
        }
        Some(GatewaysResult {
            count: p.gateways,
            cpu_usec_per_job_processing: round(cpu as f64 / p.jobs as f64, 3),
            partitions,
        })
    } else {
        None
    };
    // With `--recorder-alone`: the worker that records, from now on (kept for the latency phases).
    let mut recorder = None;
    if let Some(pg) = &pg {
        let (since_ms, cpu0) = if p.recorder_alone {
            let cpu0 = pg.cpu_micros()?;
            let since_ms = ferry_core::now_ms();
            recorder = Some(spawn_recorder(
                p,
                &redis,
                &pg.url,
                &logdir.path().join("recorder.log"),
            )?);
            eprintln!("[loadtest] ferry: every job processed; a worker that only records started");
            (since_ms, cpu0)
        } else {
            (processing.spawned_at_ms, pg_cpu0.unwrap_or(0))
        };
        let mut r = pg.await_recorded(&broker, p.jobs, since_ms, cpu0).await?;
        if let Some(task) = drop_task {
            let ((slots, jobs, events), from, to, report) = task.await?;
            let report = report.context("retention pass")?;
            if report.dropped != slots {
                bail!(
                    "the retention pass dropped {} of {slots} seeded slots",
                    report.dropped
                );
            }
            let gap = pg.longest_gap(from - 1_000, to + 1_000).await?;
            eprintln!(
                "[loadtest] ferry: dropped {slots} slots ({jobs} jobs) in {} ms, recorder gap {gap} ms meanwhile",
                report.longest_drop.as_millis()
            );
            r.drop = Some(DropResult {
                slots,
                jobs_dropped: jobs,
                events_dropped: events,
                longest_drop_ms: round(report.longest_drop.as_secs_f64() * 1e3, 1),
                longest_commit_gap_ms: gap,
            });
            r.longest_commit_gap_ms = pg
                .longest_gap_outside(processing.spawned_at_ms, from - 1_000, to + 1_000)
                .await?;
        }
        eprintln!(
            "[loadtest] ferry: recorded {} jobs/s, lag p50 {} ms p99 {} ms, PostgreSQL {} us/job, {} WAL bytes/job",
            r.jobs_recorded_per_sec,
            r.processing_lag.p50_ms,
            r.processing_lag.p99_ms,
            r.postgres_cpu_usec_per_job,
            r.wal_bytes_per_job
        );
        processing.recorder = Some(r);
    }
    eprintln!(
        "[loadtest] ferry: processing {} jobs/s (batch {}), Redis {} us/job, worker {} us/job",
        processing.jobs_per_sec,
        p.batch_size,
        processing.redis.redis_cpu_usec_per_job,
        processing.worker_cpu_usec_per_job
    );

    let mut latency = Vec::new();
    let worker_pid = worker.id().context("worker pid")?;
    for &rate in &p.rates {
        if p.latency_secs == 0 {
            break;
        }
        eprintln!(
            "[loadtest] ferry: latency at {rate} jobs/s for {}s",
            p.latency_secs
        );
        let record0 = match &pg {
            Some(pg) => Some((pg.cpu_micros()?, pg.wal_lsn().await?)),
            None => None,
        };
        let l = latency_phase(
            &broker, &queues, &placement, &mut admin, worker_pid, rate, p,
        )
        .await;
        let l = match l {
            Ok(mut l) => {
                if let (Some(pg), Some((cpu0, wal0))) = (&pg, &record0) {
                    pg.until_log_recorded(&broker).await?;
                    let cpu = pg.cpu_micros()?.saturating_sub(*cpu0);
                    let wal = pg.wal_since(wal0).await?;
                    let jobs = l.completed.max(1) as f64;
                    l.postgres_cpu_usec_per_job = Some(round(cpu as f64 / jobs, 2));
                    l.wal_bytes_per_job = Some(round(wal / jobs, 1));
                    l.recorder_lag = Some(pg.lag_since(l.started_at_ms).await?);
                }
                l
            }
            Err(e) => {
                procs::stop(&mut worker, Duration::from_secs(15)).await?;
                return Err(e.context(format!(
                    "latency phase; worker log tail:\n{}",
                    procs::tail(&log, 2000)
                )));
            }
        };
        eprintln!(
            "[loadtest] ferry: latency at {rate}: p50 {:?} ms, p99 {:?} ms, missing {}",
            l.latency.p50_ms, l.latency.p99_ms, l.missing
        );
        if let (Some(lag), Some(cpu), Some(wal)) = (
            &l.recorder_lag,
            l.postgres_cpu_usec_per_job,
            l.wal_bytes_per_job,
        ) {
            eprintln!(
                "[loadtest] ferry: recorder at {rate}: lag p50 {} ms p99 {} ms, PostgreSQL {cpu} us/job, {wal} WAL bytes/job",
                lag.p50_ms, lag.p99_ms
            );
        }
        latency.push(l);
    }
    procs::stop(&mut worker, Duration::from_secs(15)).await?;
    if let Some(r) = &mut recorder {
        procs::stop(r, Duration::from_secs(15)).await?;
    }
    for g in &mut gateways {
        g.stop().await?;
    }
    Ok(RunResult {
        system: "ferry",
        redis: p.topology,
        queues: queues.len(),
        servers,
        batch_size: p.batch_size,
        gateways: gateways_result,
        recorder: p.record,
        recorder_alone: p.record && p.recorder_alone,
        worker_args: p.worker_args.clone(),
        enqueue,
        processing,
        latency,
    })
}

/// A gateway's `ferry_gateway_partitions` from its `/metrics`.
async fn gateway_partitions(http: &reqwest::Client, port: u16) -> anyhow::Result<f64> {
    let text = http
        .get(format!("http://127.0.0.1:{port}/metrics"))
        .send()
        .await?
        .text()
        .await?;
    text.lines()
        .find_map(|l| l.strip_prefix("ferry_gateway_partitions ")?.parse().ok())
        .context("no ferry_gateway_partitions in /metrics")
}

/// The run's queue names: `queue`, or `queue-0`, `queue-1`… for several.
fn queue_names(p: &Params) -> Vec<String> {
    if p.queues <= 1 {
        vec![p.queue.clone()]
    } else {
        (0..p.queues).map(|i| format!("{}-{i}", p.queue)).collect()
    }
}

/// Which server each queue lives on, to attribute a phase's jobs to the servers.
#[derive(Debug)]
struct Placement {
    /// Index into the run's servers, per queue.
    server_of: Vec<usize>,
    servers: usize,
}

impl Placement {
    /// Jobs per server from jobs per queue.
    fn per_server(&self, per_queue: &[u64]) -> Vec<u64> {
        let mut out = vec![0; self.servers];
        for (&s, &n) in self.server_of.iter().zip(per_queue) {
            out[s] += n;
        }
        out
    }
}

/// Depth, dead and scheduled summed over the run's queues.
async fn stats(broker: &Arc<dyn Broker>, queues: &[QueueName]) -> anyhow::Result<QueueTotals> {
    let mut t = QueueTotals::default();
    for q in queues {
        let s = broker.stats(q).await?;
        t.depth += s.depth;
        t.dead += s.dead;
        t.scheduled += s.scheduled;
    }
    Ok(t)
}

#[derive(Debug, Default, Clone, Copy)]
struct QueueTotals {
    depth: u64,
    dead: u64,
    scheduled: u64,
}

/// `used_memory` summed over the servers.
async fn used_memory(admin: &mut [Admin]) -> anyhow::Result<Option<u64>> {
    let mut total = 0;
    for a in admin.iter_mut() {
        match redis_cpu::info_field(&mut a.con, "memory", "used_memory")
            .await?
            .and_then(|v| v.parse::<u64>().ok())
        {
            Some(m) => total += m,
            None => return Ok(None),
        }
    }
    Ok(Some(total))
}

fn noop_job() -> anyhow::Result<NewJob> {
    Ok(NewJob::new(
        Kind::parse("ferry.noop")?,
        serde_json::json!({}),
    ))
}

async fn enqueue_phase(
    broker: &Arc<dyn Broker>,
    queues: &[QueueName],
    placement: &Placement,
    admin: &mut [Admin],
    p: &Params,
) -> anyhow::Result<EnqueueResult> {
    let template = noop_job()?;
    let chunks = p.jobs.div_ceil(p.enqueue_chunk as u64);
    let next = Arc::new(AtomicU64::new(0));
    let per_queue: Arc<Vec<AtomicU64>> =
        Arc::new(queues.iter().map(|_| AtomicU64::new(0)).collect());
    let meter = Meter::start(admin, None).await?;
    let started = Instant::now();
    let mut tasks = JoinSet::new();
    for _ in 0..p.enqueue_tasks.max(1) {
        let (broker, queues, next, template, per_queue) = (
            broker.clone(),
            queues.to_vec(),
            next.clone(),
            template.clone(),
            per_queue.clone(),
        );
        let (jobs, chunk) = (p.jobs, p.enqueue_chunk as u64);
        tasks.spawn(async move {
            loop {
                let c = next.fetch_add(1, Ordering::Relaxed);
                if c >= chunks {
                    return anyhow::Ok(());
                }
                let n = chunk.min(jobs - c * chunk) as usize;
                let batch = vec![template.clone(); n];
                let q = (c % queues.len() as u64) as usize;
                let got = broker.enqueue_batch(&queues[q], batch).await?;
                per_queue[q].fetch_add(n as u64, Ordering::Relaxed);
                if got.len() != n {
                    bail!("enqueue_batch returned {} results for {n} jobs", got.len());
                }
            }
        });
    }
    while let Some(r) = tasks.join_next().await {
        r??;
    }
    let secs = started.elapsed().as_secs_f64();
    let mut redis = meter.stop(admin, p.jobs).await?;
    let per_queue: Vec<u64> = per_queue
        .iter()
        .map(|n| n.load(Ordering::Relaxed))
        .collect();
    redis.attribute(&placement.per_server(&per_queue));
    Ok(EnqueueResult {
        per_queue,
        jobs: p.jobs,
        chunk: p.enqueue_chunk,
        tasks: p.enqueue_tasks,
        jobs_per_sec: round(p.jobs as f64 / secs, 1),
        redis,
    })
}

fn spawn_worker(
    p: &Params,
    redis: &BenchRedis,
    database_url: Option<&str>,
    log: &Path,
) -> anyhow::Result<Child> {
    worker_command(p, redis, log)?
        .args(["--queues", &queue_names(p).join(",")])
        .args(["--concurrency", &p.concurrency.to_string()])
        .args(["--batch-size", &p.batch_size.to_string()])
        .args((database_url.is_some() && p.recorder_alone).then_some("--no-recorder"))
        .args(
            database_url
                .map(|u| vec!["--database-url", u])
                .unwrap_or_default(),
        )
        .spawn()
        .with_context(|| format!("starting {} worker", p.ferry_bin.display()))
}

/// A worker that only records (`--recorder-alone`): its queue gets no jobs. `--worker-args` apply to it too.
fn spawn_recorder(
    p: &Params,
    redis: &BenchRedis,
    database_url: &str,
    log: &Path,
) -> anyhow::Result<Child> {
    worker_command(p, redis, log)?
        .args(["--queues", "loadtest-recorder-only"])
        .args(["--database-url", database_url])
        .spawn()
        .with_context(|| format!("starting {} worker (recorder)", p.ferry_bin.display()))
}

/// `ferry worker` on the run's Redis with `--worker-args`, logging to `log` at warn level, no admin listener.
fn worker_command(p: &Params, redis: &BenchRedis, log: &Path) -> anyhow::Result<Command> {
    let out = std::fs::File::create(log)?;
    let err = out.try_clone()?;
    let mut cmd = Command::new(&p.ferry_bin);
    if std::env::var_os("FERRY_LOG").is_none() {
        // Per-job logging is not what is measured; startup and errors still show in the log.
        cmd.env("FERRY_LOG", "warn");
    }
    // Nothing here reads the worker's admin listener, and a taken default port would stop the worker.
    cmd.env("FERRY_ADMIN_LISTEN", "off");
    cmd.arg("worker")
        .args(redis.ferry_args())
        .args(&p.worker_args)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .kill_on_drop(true);
    Ok(cmd)
}

/// The run's queues, where they live, and the jobs enqueued on each.
type Work<'a> = (&'a [QueueName], &'a Placement, &'a [u64]);

async fn processing_phase(
    broker: &Arc<dyn Broker>,
    (queues, placement, per_queue): Work<'_>,
    admin: &mut [Admin],
    redis: &BenchRedis,
    p: &Params,
    pg: Option<&BenchPostgres>,
    log: &Path,
) -> anyhow::Result<(ProcessingResult, Child)> {
    let before = stats(broker, queues).await?;
    if before.depth != p.jobs {
        eprintln!(
            "[loadtest] warning: queue depth before processing is {}, expected {}",
            before.depth, p.jobs
        );
    }
    let mut meter = Meter::start(admin, None).await?;
    let started = Instant::now();
    let spawned_at_ms = ferry_core::now_ms();
    let mut worker = spawn_worker(p, redis, pg.map(|pg| pg.url.as_str()), log)?;
    meter.count_from_zero(worker.id().context("worker pid")?);
    let deadline = started + Duration::from_secs(120 + p.jobs / 1_000);
    let mut first = None;
    // Jobs left (waiting or active) per queue, as last seen. One queue is polled per tick, the first not yet
    // seen empty (a drained queue stays empty: nothing is enqueued meanwhile), so the poll costs Redis the same
    // whatever the number of queues.
    let mut left: Vec<u64> = per_queue.to_vec();
    let mut next = 0;
    let finished = loop {
        let s = broker.stats(&queues[next]).await?;
        left[next] = s.depth + s.active;
        if first.is_none() && left[next] < per_queue[next] {
            first = Some(started.elapsed());
        }
        if left[next] == 0 {
            next += 1;
            if next == queues.len() {
                break Some(started.elapsed());
            }
            continue;
        }
        if let Some(status) = worker.try_wait()? {
            bail!(
                "ferry worker exited ({status}) with {} jobs left; log tail:\n{}",
                left.iter().sum::<u64>(),
                procs::tail(log, 2000)
            );
        }
        if Instant::now() > deadline {
            break None;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let Some(elapsed) = finished else {
        procs::stop(&mut worker, Duration::from_secs(15)).await?;
        bail!(
            "processing timed out with {} jobs left on {} at the last look; worker log tail:\n{}",
            left[next],
            queues[next],
            procs::tail(log, 2000)
        );
    };
    let mut cost = meter.stop(admin, p.jobs).await?;
    cost.attribute(&placement.per_server(per_queue));
    let after = stats(broker, queues).await?;
    let used_memory = used_memory(admin).await?;
    let secs = elapsed.as_secs_f64();
    let worker_cpu = cost.other_cpu_usec.unwrap_or(0);
    Ok((
        ProcessingResult {
            jobs: p.jobs,
            concurrency: p.concurrency,
            batch_size: p.batch_size,
            secs: round(secs, 4),
            jobs_per_sec: round(p.jobs as f64 / secs, 1),
            first_completion_ms: first.map(|d| round(d.as_secs_f64() * 1e3, 1)),
            steady_jobs_per_sec: first
                .map(|f| round(p.jobs as f64 / (elapsed - f).as_secs_f64().max(1e-6), 1)),
            worker_cpu_usec_per_job: round(worker_cpu as f64 / p.jobs as f64, 3),
            worker_cpu_utilisation: round(worker_cpu as f64 / 1e6 / secs, 3),
            dead: after.dead,
            scheduled: after.scheduled,
            redis_used_memory_bytes: used_memory,
            redis_used_memory_bytes_per_job: used_memory
                .map(|m| round(m as f64 / p.jobs as f64, 1)),
            redis: cost,
            recorder: None,
            spawned_at_ms,
        },
        worker,
    ))
}

/// Ids and send times of one batch, or the error it got.
type Sent = (Instant, anyhow::Result<Vec<JobId>>);

#[allow(clippy::too_many_arguments)]
async fn latency_phase(
    broker: &Arc<dyn Broker>,
    queues: &[QueueName],
    placement: &Placement,
    admin: &mut [Admin],
    worker_pid: u32,
    rate: u64,
    p: &Params,
) -> anyhow::Result<LatencyResult> {
    let template = noop_job()?;
    let started_at_ms = ferry_core::now_ms();
    // Completion times, recorded by a task that reads the live event stream.
    let mut events = broker.subscribe().await?;
    let done_count = Arc::new(AtomicU64::new(0));
    let (stop_tx, mut stop_rx) = tokio::sync::oneshot::channel::<()>();
    let counter = done_count.clone();
    let collector = tokio::spawn(async move {
        let mut done: HashMap<JobId, Instant> = HashMap::new();
        loop {
            tokio::select! {
                ev = events.next() => match ev {
                    Some(ev) if ev.ty == EventType::Completed => {
                        done.entry(ev.job).or_insert_with(Instant::now);
                        counter.fetch_add(1, Ordering::Relaxed);
                    }
                    Some(_) => {}
                    None => break,
                },
                _ = &mut stop_rx => break,
            }
        }
        done
    });
    // Let the subscription settle before the first job goes out.
    tokio::time::sleep(Duration::from_millis(200)).await;

    let duration = Duration::from_secs(p.latency_secs);
    let warmup = (duration / 10).min(Duration::from_secs(1));
    let target = rate * p.latency_secs;
    let meter = Meter::start(admin, Some(worker_pid)).await?;
    let producer_cpu0 = redis_cpu::proc_cpu_micros(std::process::id())?;
    let started = Instant::now();
    let mut sent: HashMap<JobId, Instant> = HashMap::with_capacity(target as usize);
    let mut in_flight: JoinSet<Sent> = JoinSet::new();
    let (mut issued, mut ticks, mut max_in_flight, mut errors) = (0u64, 0u64, 0usize, 0u64);
    let (mut per_queue, mut batches) = (vec![0u64; queues.len()], 0u64);
    let mut collect = |r: Sent, sent: &mut HashMap<JobId, Instant>| match r {
        (t, Ok(ids)) => sent.extend(ids.into_iter().map(|id| (id, t))),
        (_, Err(e)) => {
            errors += 1;
            eprintln!("[loadtest] enqueue error during latency phase: {e:#}");
        }
    };
    while issued < target {
        let elapsed = started.elapsed();
        if elapsed > duration + Duration::from_secs(5) {
            break; // far behind the offered rate: stop and report what was sent
        }
        while let Some(r) = in_flight.try_join_next() {
            collect(r?, &mut sent);
        }
        let due = (elapsed.as_micros() as u64 * rate / 1_000_000).min(target) - issued;
        if due > 0 && in_flight.len() < 256 {
            let n = due.min(1000);
            let q = (batches % queues.len() as u64) as usize;
            batches += 1;
            issued += n;
            per_queue[q] += n;
            let batch = vec![template.clone(); n as usize];
            let (broker, queue) = (broker.clone(), queues[q].clone());
            let t = Instant::now();
            in_flight.spawn(async move {
                let r = broker.enqueue_batch(&queue, batch).await;
                (
                    t,
                    r.map(|v| v.into_iter().map(|e| e.id).collect())
                        .map_err(Into::into),
                )
            });
            max_in_flight = max_in_flight.max(in_flight.len());
        }
        ticks += 1;
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let send_secs = started.elapsed().as_secs_f64();
    while let Some(r) = in_flight.join_next().await {
        collect(r?, &mut sent);
    }
    let drain_deadline = Instant::now() + Duration::from_secs(15);
    while done_count.load(Ordering::Relaxed) < sent.len() as u64 && Instant::now() < drain_deadline
    {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let completed_events = done_count.load(Ordering::Relaxed);
    let _ = stop_tx.send(());
    let done = collector.await?;
    let mut cost = meter.stop(admin, completed_events.max(1)).await?;
    cost.attribute(&placement.per_server(&per_queue));
    let producer_cpu =
        redis_cpu::proc_cpu_micros(std::process::id())?.saturating_sub(producer_cpu0);

    let mut samples = Vec::with_capacity(sent.len());
    let mut completed = 0;
    for (id, t_sent) in &sent {
        if let Some(t_done) = done.get(id) {
            completed += 1;
            if t_sent.duration_since(started) >= warmup {
                samples.push(t_done.saturating_duration_since(*t_sent));
            }
        }
    }
    let worker_cpu = cost.other_cpu_usec.unwrap_or(0);
    Ok(LatencyResult {
        offered_rate: rate,
        achieved_send_rate: round(issued as f64 / send_secs, 1),
        secs: p.latency_secs,
        warmup_ms_excluded: round(warmup.as_secs_f64() * 1e3, 1),
        sent: issued,
        completed,
        missing: issued - completed,
        enqueue_errors: errors,
        ticks,
        max_batches_in_flight: max_in_flight,
        latency: Latency::from_samples(samples),
        worker_cpu_usec_per_job: round(worker_cpu as f64 / completed.max(1) as f64, 3),
        worker_cpu_utilisation: round(worker_cpu as f64 / 1e6 / cost.secs.max(1e-9), 3),
        producer_cpu_utilisation: round(producer_cpu as f64 / 1e6 / cost.secs.max(1e-9), 3),
        redis: cost,
        recorder_lag: None,
        postgres_cpu_usec_per_job: None,
        wal_bytes_per_job: None,
        started_at_ms,
    })
}

/// A PostgreSQL of the run's own, durable (fsync and synchronous commit on, as a production database), with
/// the schema migrated by `ferry migrate`.
#[allow(missing_debug_implementations)]
pub struct BenchPostgres {
    _server: ferry_testkit::PostgresServer,
    pub url: String,
    /// `pg_current_wal_lsn()` once migrated.
    wal_start: String,
    /// The postmaster's pid: the server's CPU is that of its process tree.
    postmaster: u32,
}

impl BenchPostgres {
    pub async fn start(ferry_bin: &Path) -> anyhow::Result<Self> {
        let (server, url) = tokio::task::spawn_blocking(|| {
            let server = ferry_testkit::PostgresServer::start_with(
                "fsync = on\nsynchronous_commit = on\nfull_page_writes = on\nshared_buffers = '256MB'",
            )?;
            let url = server.create_database("bench")?;
            anyhow::Ok((server, url))
        })
        .await??;
        let out = Command::new(ferry_bin)
            .args(["migrate", "--database-url", &url])
            .output()
            .await?;
        if !out.status.success() {
            bail!("ferry migrate: {}", String::from_utf8_lossy(&out.stderr));
        }
        let wal_start = crate::soak::psql(&url, "select pg_current_wal_lsn()").await?;
        let pid_file = server.dir().join("data/postmaster.pid");
        let postmaster = std::fs::read_to_string(&pid_file)
            .with_context(|| format!("cannot read {}", pid_file.display()))?
            .lines()
            .next()
            .and_then(|l| l.trim().parse().ok())
            .with_context(|| format!("no pid in {}", pid_file.display()))?;
        Ok(Self {
            _server: server,
            url,
            wal_start,
            postmaster,
        })
    }

    /// The postmaster's pid.
    pub fn postmaster(&self) -> u32 {
        self.postmaster
    }

    /// CPU used by the whole server so far, in µs.
    pub fn cpu_micros(&self) -> anyhow::Result<u64> {
        Ok(redis_cpu::tree_cpu_micros(self.postmaster)?)
    }

    /// `pg_current_wal_lsn()` now.
    pub async fn wal_lsn(&self) -> anyhow::Result<String> {
        self.sql("select pg_current_wal_lsn()".into()).await
    }

    /// WAL bytes written since `lsn`.
    pub async fn wal_since(&self, lsn: &str) -> anyhow::Result<f64> {
        Ok(self
            .sql(format!(
                "select pg_wal_lsn_diff(pg_current_wal_lsn(), '{lsn}')"
            ))
            .await?
            .parse()?)
    }

    /// Wait (up to 600 s) until the recorder group has acknowledged the whole event log: every event the engine
    /// logged so far is committed, since the recorder acknowledges after its commit. Asked of Redis, so
    /// waiting costs PostgreSQL nothing.
    pub async fn until_log_recorded(&self, broker: &Arc<dyn Broker>) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(600);
        loop {
            let behind = broker.log_backlog(ferry_broker::RECORDER_GROUP).await?;
            if behind == 0 {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("the recorder is {behind} log entries behind after 600 s");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// A store on this database (for the retention pass of `--record-drop`).
    pub fn store(&self) -> anyhow::Result<ferry_store::PgStore> {
        Ok(ferry_store::PgStore::connect(ferry_store::PgConfig::new(
            self.url.clone(),
        ))?)
    }

    /// Two daily slots 41 and 40 days back holding 100,000 finished jobs each with three events: what a retention
    /// of 30 days drops. Returns (slots, jobs, events).
    async fn seed_expired(&self) -> anyhow::Result<(u64, u64, u64)> {
        let store = self.store()?;
        let day = 86_400_000;
        let now = ferry_core::now_ms();
        let first = (now - 41 * day) / day * day;
        store
            .create_partitions(
                first,
                first + 2 * day,
                Duration::from_secs(86_400),
                Duration::from_secs(5),
            )
            .await?
            .context("partitions for the seeded days")?;
        let per_day = 100_000u64;
        for d in [41u64, 40] {
            // Ids: the day's start plus i ms, in that day's slot.
            let start = (now - d * day) / day * day;
            self.sql(format!(
                "insert into jobs (id, queue, kind, state, attempts, payload, priority, max_attempts, owner, \
                 result, created_at, updated_at, finished_at, ord_ms, ord_seq, ord_n) \
                 select ferry_uuid_floor(to_timestamp(({start} + i) / 1000.0)), 'old', 'k', 'completed', 1, \
                 '{{\"n\": 1}}', 'normal', 3, 'seed', '{{\"ok\": true}}', to_timestamp(({start} + i) / 1000.0), \
                 to_timestamp(({start} + i) / 1000.0), to_timestamp(({start} + i) / 1000.0), {start} + i, 0, 0 \
                 from generate_series(1, {per_day}) i"
            ))
            .await?;
            self.sql(format!(
                "insert into job_events (id, job_id, type, state, attempt, at, actor, ord_ms, ord_seq, ord_n) \
                 select ({start} + i) || '-' || t.n || '/0', ferry_uuid_floor(to_timestamp(({start} + i) / 1000.0)), \
                 t.ty, t.st, 1, to_timestamp(({start} + i) / 1000.0), 'seed', {start} + i, t.n, 0 \
                 from generate_series(1, {per_day}) i, (values (0, 'job.queued', 'queued'), \
                 (1, 'job.active', 'active'), (2, 'job.completed', 'completed')) t(n, ty, st)"
            ))
            .await?;
        }
        // A checkpoint now, so the seeding's dirty pages are not flushed during the measured phase.
        self.sql("analyze jobs; analyze job_events; checkpoint".into())
            .await?;
        Ok((2, 2 * per_day, 6 * per_day))
    }

    /// The longest time between consecutive commits (distinct `recorded_at` of rows written from `from_ms` to
    /// `to_ms`), in ms.
    async fn longest_gap(&self, from_ms: u64, to_ms: u64) -> anyhow::Result<f64> {
        self.gap_where(format!(
            "recorded_at between to_timestamp({from_ms} / 1000.0) and to_timestamp({to_ms} / 1000.0)"
        ))
        .await
    }

    /// [`longest_gap`](Self::longest_gap) over everything recorded since `since_ms` except `[from_ms, to_ms]`.
    async fn longest_gap_outside(
        &self,
        since_ms: u64,
        from_ms: u64,
        to_ms: u64,
    ) -> anyhow::Result<f64> {
        self.gap_where(format!(
            "recorded_at >= to_timestamp({since_ms} / 1000.0) and recorded_at not between \
             to_timestamp({from_ms} / 1000.0) and to_timestamp({to_ms} / 1000.0) and actor is distinct from 'seed'"
        ))
        .await
    }

    async fn gap_where(&self, filter: String) -> anyhow::Result<f64> {
        let v = self
            .sql(format!(
                "select coalesce(max(extract(epoch from g) * 1000), 0) from (select recorded_at - \
                 lag(recorded_at) over (order by recorded_at) as g from job_events where {filter}) x"
            ))
            .await?;
        Ok(round(v.parse()?, 1))
    }

    async fn sql(&self, q: String) -> anyhow::Result<String> {
        crate::soak::psql(&self.url, &q).await
    }

    /// Wait until `jobs` rows are completed (all jobs are, in the engine); rate and lag of everything since
    /// `since_ms`.
    ///
    /// Every job is finished in the engine, so all its events are in the log: the wait is
    /// [`until_log_recorded`](Self::until_log_recorded), the CPU is read then, and a count confirms it once. The
    /// rate is measured by the last commit's time, not by the wait.
    async fn await_recorded(
        &self,
        broker: &Arc<dyn Broker>,
        jobs: u64,
        since_ms: u64,
        cpu_since: u64,
    ) -> anyhow::Result<RecorderResult> {
        self.until_log_recorded(broker).await?;
        let cpu = self.cpu_micros()?.saturating_sub(cpu_since);
        let done: u64 = self
            .sql("select count(*) from jobs where state = 'completed'".into())
            .await?
            .parse()?;
        if done < jobs {
            bail!(
                "the whole log is recorded, but {done} of {jobs} jobs are completed in the record"
            );
        }
        let last_ms: f64 = self
            .sql(
                "select (extract(epoch from max(recorded_at)) * 1000)::float8 from job_events"
                    .into(),
            )
            .await?
            .parse()?;
        let secs = ((last_ms - since_ms as f64) / 1e3).max(1e-6);
        let processing_lag = self.lag_since(since_ms).await?;
        let wal = self.wal_since(&self.wal_start).await?;
        // Every relation of the record, both schemas (V2's tables, V3's partitions and default partitions),
        // without the seeded days of `--record-drop` (dropped by then).
        let bytes: f64 = self
            .sql(
                "select coalesce(sum(pg_total_relation_size(oid)), 0) from pg_class where relkind = 'r' \
                 and (relname ~ '^jobs(_p[0-9t]+|_default|_open)?$' or relname ~ '^job_events(_p[0-9t]+|_default)?$')"
                    .into(),
            )
            .await?
            .parse()?;
        let rows: f64 = self
            .sql(format!(
                "select count(*) from job_events where recorded_at >= to_timestamp({since_ms} / 1000.0)"
            ))
            .await?
            .parse()?;
        Ok(RecorderResult {
            secs_until_recorded: round(secs, 3),
            jobs_recorded_per_sec: round(jobs as f64 / secs, 1),
            event_rows_per_sec: round(rows / secs, 1),
            processing_lag,
            wal_bytes_per_job: round(wal / jobs as f64, 1),
            table_and_index_mib_per_million_jobs: round(bytes / 1_048_576.0 / jobs as f64 * 1e6, 1),
            longest_commit_gap_ms: self.longest_gap_outside(since_ms, 0, 0).await?,
            postgres_cpu_usec_per_job: round(cpu as f64 / jobs as f64, 2),
            jobs_open_of_finished_jobs: self
                .sql(
                    "select count(*) from jobs_open o join jobs j using (id) where j.finished_at is not null"
                        .into(),
                )
                .await?
                .parse()?,
            drop: None,
            postgres: "PostgreSQL 15 on this machine, fsync on, synchronous_commit on",
        })
    }

    /// Lag of the events since `since_ms`, once they are all in (waits for the count to settle).
    async fn lag_since(&self, since_ms: u64) -> anyhow::Result<Lag> {
        let filter = format!("at >= to_timestamp({since_ms} / 1000.0)");
        let mut last = u64::MAX;
        for _ in 0..600 {
            tokio::time::sleep(Duration::from_millis(500)).await;
            let n: u64 = self
                .sql(format!("select count(*) from job_events where {filter}"))
                .await?
                .parse()?;
            if n == last {
                break;
            }
            last = n;
        }
        let row = self
            .sql(format!(
                "select count(*), \
                 percentile_cont(0.5) within group (order by ms), \
                 percentile_cont(0.99) within group (order by ms), max(ms) \
                 from (select extract(epoch from recorded_at - at) * 1000 as ms from job_events where {filter}) l"
            ))
            .await?;
        let f: Vec<&str> = row.split('|').map(str::trim).collect();
        let num = |i: usize| -> f64 { f.get(i).and_then(|v| v.parse().ok()).unwrap_or(f64::NAN) };
        Ok(Lag {
            events: num(0) as u64,
            p50_ms: round(num(1), 2),
            p99_ms: round(num(2), 2),
            max_ms: round(num(3), 2),
        })
    }
}
