//! `loadtest`: ferry's benchmark runner.
//!
//! `loadtest jobs [--peer bullmq]` enqueues N no-op jobs, processes them with one `ferry worker` process,
//! measures enqueue→complete latency at fixed offered rates, and — with `--peer bullmq` — does the same with
//! BullMQ on a redis-server of the same version (`--redis standalone,cluster` runs ferry's phases on a Redis
//! Cluster too). `loadtest ws` measures the gateway's WebSocket fan-out (RSS per
//! idle connection, deliveries/s and latency at rising broadcast rates) beside a Node `ws` server, and
//! `loadtest api` HTTP submits with completion over WebSocket. `loadtest autoscale` runs `ferry autoscaler` with
//! the `local` actuator under a burst of jobs and samples backlog and workers until the pool is back at its
//! minimum (JSON, CSV and a PNG plot). Each prints one JSON document (and writes it to `--out`).
//! See loadtest/README.md for what each figure means.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand, ValueEnum};
use loadtest::server::Topology;
use loadtest::{
    api, autoscale, bullmq, ferry, procs, proxies, rebalance, redis_cpu, report, soak, submit,
    wsbench,
};
use serde_json::{Value, json};

#[derive(Debug, Parser)]
#[command(
    name = "loadtest",
    about = "ferry's load generator and peer comparisons"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// No-op jobs: enqueue throughput, processing throughput with one worker process, latency at fixed rates.
    Jobs(JobsArgs),
    /// WebSocket fan-out: C idle authenticated connections (gateway RSS per connection), then broadcasts at
    /// rising rates (deliveries/s, latency), beside a Node `ws` broadcast server under the same clients.
    Ws(WsArgs),
    /// HTTP submits (single and batch) with completion observed over WebSocket: jobs/s and latency.
    Api(ApiArgs),
    /// Single-job HTTP submits with no worker, at the maximum (wrk) and at half of it: jobs/s, server and
    /// Redis CPU per job, latency; ferry's gateway beside Fastify + JWT + BullMQ `queue.add`.
    Submit(SubmitArgs),
    /// `ferry autoscaler` (local actuator) under a burst: backlog and workers over time until the pool is
    /// back at its minimum; JSON, CSV and a PNG plot.
    Autoscale(AutoscaleArgs),
    /// A whole cluster under mixed load for a set time (submits of every kind, cancels, WebSocket churn,
    /// publishes): RSS, open files and Redis/PostgreSQL memory sampled, then every accepted job checked in the
    /// record (none lost, none doubled, none in the wrong final state).
    Soak(SoakArgs),
    /// The gateway tier scaling out behind a front (`ferry balancer` with rebalancing, HAProxy leastconn as the
    /// peer): N gateways and C WebSocket clients of distinct subjects, then one more gateway joins; connections
    /// per gateway over time into a CSV and a plot.
    Rebalance(RebalanceArgs),
    /// Internal: one process of WebSocket clients for `ws` (driven over stdin/stdout).
    #[command(hide = true)]
    WsClient(WsClientArgs),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum WsPeer {
    NodeWs,
    None,
}

#[derive(Debug, clap::Args)]
struct WsArgs {
    /// Idle authenticated connections, each subscribed to `app:bench`.
    #[arg(long, default_value_t = 10_000)]
    connections: usize,
    /// Sockets per client process (the open-file limit is ~20,000 per process).
    #[arg(long, default_value_t = 2_500)]
    per_process: usize,
    /// Connections per token subject (the gateway allows 100 per subject).
    #[arg(long, default_value_t = 50)]
    per_subject: usize,
    /// Offered deliveries/s of the broadcast phases (messages/s = rate / connections), rising.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "10000,25000,50000,75000,100000,150000,200000,250000,300000"
    )]
    rates: Vec<u64>,
    /// Length of each broadcast phase in seconds (the first tenth, at most 2 s, is warm-up).
    #[arg(long, default_value_t = 10)]
    phase_secs: u64,
    /// Seconds between the last connection and the idle RSS reading.
    #[arg(long, default_value_t = 3)]
    settle_secs: u64,
    /// Open the connections in two halves and read the RSS after each: the second half's growth per
    /// connection is the marginal cost, without what the first connections cost once (it spreads between
    /// runs too; loadtest/README.md).
    #[arg(long)]
    halves: bool,
    /// Stop rising after this many rates in a row that were not sustained.
    #[arg(long, default_value_t = 2)]
    stop_after: usize,
    /// Run the Node `ws` peer too (`node-ws`) or not (`none`).
    #[arg(long, value_enum, default_value = "node-ws")]
    peer: WsPeer,
    /// How the clients reach ferry's gateway, each in turn in one run: `direct`, through `ferry balancer`,
    /// through HAProxy (/usr/sbin/haproxy); e.g. `--via direct,balancer,haproxy` for the proxies' overhead.
    #[arg(long, value_enum, value_delimiter = ',', default_value = "direct")]
    via: Vec<loadtest::proxies::Via>,
    /// Skip ferry (measure the peer alone).
    #[arg(long)]
    only_peer: bool,
    /// The folder with server.mjs (default loadtest/ws-peer).
    #[arg(long)]
    peer_dir: Option<PathBuf>,
    #[arg(long)]
    ferry_bin: Option<PathBuf>,
    #[arg(long)]
    out: Option<PathBuf>,
    #[arg(long, default_value_t = 0)]
    wait_quiet: u64,
}

#[derive(Debug, clap::Args)]
struct RebalanceArgs {
    /// Gateways at the start (one more joins).
    #[arg(long, default_value_t = 3)]
    gateways: usize,
    /// WebSocket clients, one subject each (they live in this process: keep under the open-file limit).
    #[arg(long, default_value_t = 600)]
    clients: usize,
    /// When the extra gateway joins, in seconds from the first client.
    #[arg(long, default_value_t = 10)]
    join_after_secs: u64,
    /// Length of the run, in seconds.
    #[arg(long, default_value_t = 60)]
    secs: u64,
    /// Sampling period of the membership.
    #[arg(long, default_value_t = 500)]
    sample_ms: u64,
    #[arg(long, default_value_t = 0.1)]
    balance_epsilon: f64,
    #[arg(long, default_value_t = 100)]
    rebalance_rate: u32,
    /// Short by default so a 60 s run shows the move (the gateway's default is 30 s).
    #[arg(long, default_value_t = 5_000)]
    rebalance_cooldown_ms: u64,
    #[arg(long, default_value_t = 2_000)]
    ws_close_spread_ms: u64,
    /// Clients leaving on their own (and reconnecting at once) per second, for the whole population.
    #[arg(long, default_value_t = 5.0)]
    churn: f64,
    /// Fronts to run, one after the other: `balancer` (ferry balancer, gateways rebalancing) and `haproxy`
    /// (HAProxy leastconn, no rebalancing: the peer).
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "balancer,haproxy"
    )]
    via: Vec<proxies::Via>,
    /// Draw connections per gateway over time, one panel per front, to this PNG (needs fonts-dejavu-core).
    #[arg(long)]
    plot: Option<PathBuf>,
    /// Connections per gateway over time.
    #[arg(long)]
    csv: Option<PathBuf>,
    #[arg(long)]
    ferry_bin: Option<PathBuf>,
    #[arg(long)]
    out: Option<PathBuf>,
}

#[derive(Debug, clap::Args)]
struct SoakArgs {
    /// How long the load runs, in seconds.
    #[arg(long, default_value_t = 300)]
    secs: u64,
    /// Submit requests per second (a batch of 10 counts as one).
    #[arg(long, default_value_t = 200)]
    rate: u64,
    /// WebSocket clients, each reconnecting every 2-10 s.
    #[arg(long, default_value_t = 200)]
    ws_clients: usize,
    /// Publishes per second on `app:soak`.
    #[arg(long, default_value_t = 20)]
    publish_rate: u64,
    /// Share of submits followed by a cancel, in percent.
    #[arg(long, default_value_t = 5)]
    cancel_percent: u32,
    /// Largest `ferry.echo` payload, in KiB.
    #[arg(long, default_value_t = 20)]
    max_payload_kib: usize,
    /// Seconds between samples.
    #[arg(long, default_value_t = 10)]
    sample_secs: u64,
    #[arg(long)]
    ferry_bin: Option<PathBuf>,
    #[arg(long)]
    out: Option<PathBuf>,
}

#[derive(Debug, clap::Args)]
struct SubmitArgs {
    /// Systems, each in turn on a fresh redis-server: `ferry` and/or `fastify-bullmq`.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "ferry,fastify-bullmq"
    )]
    systems: Vec<submit::System>,
    /// wrk connections; as many tokens, one subject each.
    #[arg(long, default_value_t = 200)]
    connections: usize,
    /// wrk threads.
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// Length of the maximum-rate phase.
    #[arg(long, default_value_t = 10)]
    secs: u64,
    /// wrk warm-up before it (not measured).
    #[arg(long, default_value_t = 2)]
    warmup_secs: u64,
    /// Length of the phase at half the measured maximum (0 skips it).
    #[arg(long, default_value_t = 10)]
    half_rate_secs: u64,
    /// Connections of the paced phases (keep-alive, one request at a time each, the rate spread over them).
    #[arg(long, default_value_t = 512)]
    in_flight: usize,
    /// Paced phases at these rates (jobs/s), `--half-rate-secs` each, after the half-rate one: the latency of
    /// every system at the same offered load, e.g. `5000,10000`.
    #[arg(long, value_delimiter = ',')]
    fixed_rates: Vec<u64>,
    #[arg(long, default_value = "bench")]
    queue: String,
    /// Extra `ferry gateway` flags, space-separated.
    #[arg(long, allow_hyphen_values = true, default_value = "")]
    gateway_args: String,
    /// The folder with the peer's server.mjs (default loadtest/submit-peer).
    #[arg(long)]
    peer_dir: Option<PathBuf>,
    #[arg(long)]
    ferry_bin: Option<PathBuf>,
    #[arg(long)]
    out: Option<PathBuf>,
    #[arg(long, default_value_t = 0)]
    wait_quiet: u64,
}

#[derive(Debug, clap::Args)]
struct ApiArgs {
    /// Token subjects the load is spread over (the gateway allows 100 requests/s per subject).
    #[arg(long, default_value_t = 200)]
    subjects: usize,
    /// Offered rates (single POSTs, jobs/s) of the latency phases.
    #[arg(long, value_delimiter = ',', default_value = "2000,5000")]
    rates: Vec<u64>,
    #[arg(long, default_value_t = 10)]
    latency_secs: u64,
    /// Length of each max-throughput phase (single, then batch).
    #[arg(long, default_value_t = 5)]
    throughput_secs: u64,
    /// Jobs per batch POST.
    #[arg(long, default_value_t = 100)]
    batch_size: usize,
    /// Requests in flight at most (latency phases; the single max-throughput phase uses up to 128).
    #[arg(long, default_value_t = 512)]
    in_flight: usize,
    #[arg(long, default_value_t = 50)]
    worker_concurrency: u32,
    #[arg(long, default_value_t = 100)]
    worker_batch: u32,
    #[arg(long, default_value = "bench")]
    queue: String,
    #[arg(long)]
    ferry_bin: Option<PathBuf>,
    #[arg(long)]
    out: Option<PathBuf>,
    #[arg(long, default_value_t = 0)]
    wait_quiet: u64,
}

#[derive(Debug, clap::Args)]
struct AutoscaleArgs {
    /// Jobs of the burst (`ferry.sleep`), enqueued at once.
    #[arg(long, default_value_t = 20_000)]
    jobs: u64,
    /// Each job's sleep (payload `{"ms": N}`).
    #[arg(long, default_value_t = 10)]
    job_ms: u64,
    #[arg(long, default_value = "burst")]
    queue: String,
    /// Policy: fewest workers.
    #[arg(long, default_value_t = 1)]
    min_workers: u32,
    /// Policy: most workers.
    #[arg(long, default_value_t = 8)]
    max_workers: u32,
    /// Policy: drain the backlog within this long.
    #[arg(long, default_value_t = 10.0)]
    target_drain_seconds: f64,
    /// Policy: a scale-down uses the highest recommendation of this window.
    #[arg(long, default_value_t = 30.0)]
    scale_down_stabilization_seconds: f64,
    /// Arguments of every `ferry worker` the local actuator starts, space-separated.
    #[arg(
        long,
        allow_hyphen_values = true,
        default_value = "--concurrency 20 --batch-size 20"
    )]
    worker_args: String,
    /// The autoscaler's decision interval (`--interval-ms`).
    #[arg(long, default_value_t = 1000)]
    interval_ms: u64,
    /// How often backlog and workers are sampled.
    #[arg(long, default_value_t = 250)]
    sample_ms: u64,
    /// Give up (and fail) when the backlog is not drained and the pool not back at its minimum by then.
    #[arg(long, default_value_t = 180)]
    max_secs: u64,
    /// Jobs per enqueue call of the burst.
    #[arg(long, default_value_t = 1000)]
    enqueue_chunk: usize,
    /// The JSON document (params, summary, samples).
    #[arg(long)]
    out: Option<PathBuf>,
    /// The samples as CSV (default: `--out` with the extension .csv).
    #[arg(long)]
    csv: Option<PathBuf>,
    /// A PNG of backlog and workers over time (needs /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf,
    /// Debian package fonts-dejavu-core).
    #[arg(long)]
    plot: Option<PathBuf>,
    #[arg(long)]
    ferry_bin: Option<PathBuf>,
    #[arg(long, default_value_t = 0)]
    wait_quiet: u64,
}

#[derive(Debug, clap::Args)]
struct WsClientArgs {
    #[arg(long)]
    url: String,
    #[arg(long)]
    count: usize,
    #[arg(long, default_value_t = 0)]
    first: usize,
    #[arg(long, default_value_t = 50)]
    per_subject: usize,
    #[arg(long, default_value = "app:bench")]
    channel: String,
    #[arg(long, default_value_t = 200)]
    connect_concurrency: usize,
    #[arg(long, default_value_t = 3600)]
    max_secs: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Peer {
    Bullmq,
    None,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum RedisKind {
    Standalone,
    Cluster,
}

#[derive(Debug, clap::Args)]
struct JobsArgs {
    /// Jobs to enqueue and then process.
    #[arg(long, default_value_t = 200_000)]
    jobs: u64,
    /// The worker's concurrency (both systems).
    #[arg(long, default_value_t = 50)]
    concurrency: u32,
    /// ferry worker claim batch sizes, one full run each (the first is compared with BullMQ; 10 is the
    /// worker's own default).
    #[arg(long, value_delimiter = ',', default_value = "100,10")]
    batch_size: Vec<u32>,
    /// Offered rates (jobs/s) for the latency phase.
    #[arg(long, value_delimiter = ',', default_value = "2000,5000")]
    rates: Vec<u64>,
    /// Length of each latency phase in seconds (0 skips the latency phases).
    #[arg(long, default_value_t = 10)]
    latency_secs: u64,
    /// Run the same phases with a peer system too.
    #[arg(long, value_enum, default_value = "none")]
    peer: Peer,
    /// BullMQ configurations: `default` (completed jobs kept) and/or `remove-on-complete`.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "default,remove-on-complete"
    )]
    peer_variants: Vec<String>,
    /// Skip ferry's phases (measure the peer alone).
    #[arg(long)]
    only_peer: bool,
    /// Also write the JSON document here.
    #[arg(long)]
    out: Option<PathBuf>,
    /// The `ferry` binary (default: the workspace's release build, built first if missing).
    #[arg(long)]
    ferry_bin: Option<PathBuf>,
    /// Extra arguments for `ferry worker`, space-separated (e.g. "--ack-max-delay-ms 1").
    #[arg(long, allow_hyphen_values = true, default_value = "")]
    worker_args: String,
    /// The folder with bench.mjs and package.json.
    #[arg(long)]
    bullmq_dir: Option<PathBuf>,
    /// Queue name used by both systems.
    #[arg(long, default_value = "bench")]
    queue: String,
    /// ferry spreads the jobs over this many queues (`<queue>-0`, `<queue>-1`…, one enqueue call to each in
    /// turn); the worker serves them all, `--concurrency` per queue. On a Redis Cluster the queues are what
    /// spreads the load over the masters.
    #[arg(long, default_value_t = 1)]
    queue_count: usize,
    /// ferry's Redis, one full set of runs each, in one invocation: `standalone` (one redis-server) and/or
    /// `cluster` (a Redis Cluster of `--cluster-masters` masters, no replicas).
    #[arg(long, value_enum, value_delimiter = ',', default_value = "standalone")]
    redis: Vec<RedisKind>,
    #[arg(long, default_value_t = 3)]
    cluster_masters: usize,
    /// Virtual shards of the cluster runs (`ferry --redis-cluster-vshards`).
    #[arg(long, default_value_t = ferry_broker::DEFAULT_VSHARDS)]
    cluster_vshards: usize,
    /// ferry runs without (`off`) and/or with (`on`) the recorder writing every event to a durable
    /// PostgreSQL of the run's own; one full run each per batch size.
    #[arg(long, value_delimiter = ',', default_value = "off")]
    recorder: Vec<String>,
    /// With `--recorder on`: seed two finished days 40 days back and drop them with the store's retention pass
    /// 1.5 s into the processing phase, while the recorder writes (schema with partitions only).
    #[arg(long)]
    record_drop: bool,
    /// With `--recorder on`: the recorder alone on the machine. The processing worker runs with `--no-recorder`,
    /// and once every job is processed a second worker that runs only a recorder starts; the recorded jobs/s
    /// are counted from its start.
    #[arg(long)]
    recorder_alone: bool,
    /// Gateways-attached scenario: for each count, one more ferry run (the first batch size, recorder off,
    /// no latency phases) with that many `ferry gateway` processes attached to its Redis and no clients, e.g.
    /// `1,4,8,16`. Reports Redis CPU per job and jobs/s per count (and against BullMQ with `--peer bullmq`).
    #[arg(long, value_delimiter = ',')]
    gateways: Vec<usize>,
    /// Skip the ordinary ferry runs (with `--gateways`: only the gateways-attached runs and the peer).
    #[arg(long)]
    only_gateways: bool,
    /// Jobs per enqueue batch in the enqueue phase.
    #[arg(long, default_value_t = 1000)]
    enqueue_chunk: usize,
    /// Concurrent enqueue tasks in the enqueue phase.
    #[arg(long, default_value_t = 4)]
    enqueue_tasks: usize,
    /// Before each run, wait up to this many seconds for the machine to be quiet (under half a core busy
    /// over 2 s), so that a compile elsewhere does not skew the figures. 0 = do not wait.
    #[arg(long, default_value_t = 0)]
    wait_quiet: u64,
}

impl JobsArgs {
    fn validate(&self) -> anyhow::Result<()> {
        if self.jobs == 0 || self.jobs > 10_000_000 {
            bail!("--jobs must be 1..=10000000");
        }
        if self.concurrency == 0 || self.concurrency > 10_000 {
            bail!("--concurrency must be 1..=10000");
        }
        if self.batch_size.is_empty() || self.batch_size.iter().any(|&b| b == 0 || b > 10_000) {
            bail!("--batch-size values must be 1..=10000");
        }
        if self.rates.iter().any(|&r| r == 0 || r > 200_000) {
            bail!("--rates values must be 1..=200000 jobs/s");
        }
        if self.latency_secs > 600 {
            bail!("--latency-secs must be at most 600");
        }
        if self.enqueue_chunk == 0 || self.enqueue_chunk > 100_000 {
            bail!("--enqueue-chunk must be 1..=100000");
        }
        if self.wait_quiet > 3600 {
            bail!("--wait-quiet must be at most 3600 seconds");
        }
        if self.enqueue_tasks == 0 || self.enqueue_tasks > 64 {
            bail!("--enqueue-tasks must be 1..=64");
        }
        for v in &self.peer_variants {
            bullmq::Variant::parse(v)?;
        }
        if self.recorder.is_empty() || self.recorder.iter().any(|r| r != "off" && r != "on") {
            bail!("--recorder values must be off and/or on");
        }
        if self.recorder_alone && (!self.recorder.iter().any(|r| r == "on") || self.record_drop) {
            bail!(
                "--recorder-alone needs --recorder on, and not --record-drop (nothing records during the drop)"
            );
        }
        if self.gateways.len() > 16 || self.gateways.iter().any(|&g| g > 64) {
            bail!("--gateways takes at most 16 counts of 0..=64 gateways");
        }
        if self.only_gateways && self.gateways.is_empty() {
            bail!("--only-gateways needs --gateways");
        }
        if self.queue_count == 0 || self.queue_count > 1_000 {
            bail!("--queue-count must be 1..=1000");
        }
        if self.redis.is_empty() || self.redis.len() > 4 {
            bail!("--redis takes standalone and/or cluster (at most 4 entries)");
        }
        if !(3..=16).contains(&self.cluster_masters) {
            bail!("--cluster-masters must be 3..=16 (redis-cli --cluster create needs 3)");
        }
        if self.cluster_vshards == 0 || self.cluster_vshards > 16_384 {
            bail!("--cluster-vshards must be 1..=16384");
        }
        Ok(())
    }
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    if let Cmd::WsClient(a) = cli.command {
        // One thread per client process: the coordinator runs several of them beside the server.
        return tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
            .block_on(wsbench::client_main(wsbench::ClientArgs {
                url: a.url,
                count: a.count,
                first: a.first,
                per_subject: a.per_subject,
                channel: a.channel,
                connect_concurrency: a.connect_concurrency,
                max_secs: a.max_secs,
            }));
    }
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(async {
            match cli.command {
                Cmd::Jobs(args) => jobs(args).await,
                Cmd::Ws(args) => ws(args).await,
                Cmd::Api(args) => api_cmd(args).await,
                Cmd::Submit(args) => submit_cmd(args).await,
                Cmd::Autoscale(args) => autoscale_cmd(args).await,
                Cmd::Soak(args) => soak_cmd(args).await,
                Cmd::Rebalance(args) => rebalance_cmd(args).await,
                Cmd::WsClient(_) => unreachable!("handled above"),
            }
        })
}

fn write_out(out: Option<&PathBuf>, text: &str) -> anyhow::Result<()> {
    if let Some(out) = out {
        if let Some(parent) = out.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("creating {}", parent.display()))?;
        }
        std::fs::write(out, format!("{text}\n"))
            .with_context(|| format!("writing {}", out.display()))?;
        eprintln!("[loadtest] wrote {}", out.display());
    }
    Ok(())
}

async fn ws(a: WsArgs) -> anyhow::Result<()> {
    if a.connections == 0 || a.connections > 60_000 {
        bail!("--connections must be 1..=60000");
    }
    if a.per_process == 0 || a.per_process > 15_000 {
        bail!("--per-process must be 1..=15000 (the open-file limit is ~20,000 per process)");
    }
    if a.via.iter().any(|v| *v != loadtest::proxies::Via::Direct) && a.connections > 9_000 {
        bail!(
            "--connections must be at most 9000 with --via balancer or haproxy: a proxy holds two sockets per \
             connection and the open-file limit is ~20,000 per process"
        );
    }
    if a.per_subject == 0 || a.per_subject > 100 {
        bail!("--per-subject must be 1..=100 (the gateway's per-subject connection limit)");
    }
    if a.phase_secs == 0 || a.phase_secs > 120 || a.rates.is_empty() || a.rates.len() > 32 {
        bail!("--phase-secs must be 1..=120 and --rates 1..=32 values");
    }
    let machine = report::Machine::probe();
    let ferry_bin = if a.only_peer {
        PathBuf::new()
    } else {
        ferry_bin(a.ferry_bin.clone()).await?
    };
    let peer_dir = a.peer_dir.clone().unwrap_or_else(loadtest::gw::ws_peer_dir);
    if a.peer == WsPeer::NodeWs && !wsbench::peer_dir_ok(&peer_dir) {
        bail!("{} has no server.mjs", peer_dir.display());
    }
    let quiet = quiet_before(a.wait_quiet).await?;
    let p = wsbench::Params {
        connections: a.connections,
        per_process: a.per_process,
        per_subject: a.per_subject,
        rates: a.rates.clone(),
        phase_secs: a.phase_secs,
        settle_secs: a.settle_secs,
        ferry_bin,
        peer_dir,
        stop_after_failures: a.stop_after,
        via: a.via.clone(),
        halves: a.halves,
    };
    let r = wsbench::run(&p, !a.only_peer, a.peer == WsPeer::NodeWs).await?;
    let doc = json!({
        "scenario": "ws",
        "params": {
            "connections": a.connections,
            "per_process": a.per_process,
            "per_subject": a.per_subject,
            "rates_deliveries_per_sec": a.rates,
            "phase_secs": a.phase_secs,
            "fd_limit": "children start via sh -c 'ulimit -n \"$(ulimit -Hn)\"; exec …'",
            "node_auth": "none (the Node peer verifies no token; ferry verifies a JWT per connection)",
            "via": a.via.iter().map(|v| v.as_str()).collect::<Vec<_>>(),
        },
        "machine": machine,
        "busy_cores_before": quiet,
        "loadavg_after": report::loadavg(),
        "result": r,
    });
    let text = serde_json::to_string_pretty(&doc)?;
    println!("{text}");
    write_out(a.out.as_ref(), &text)
}

async fn soak_cmd(a: SoakArgs) -> anyhow::Result<()> {
    let p = soak::Params {
        secs: a.secs,
        rate: a.rate,
        ws_clients: a.ws_clients,
        publish_rate: a.publish_rate,
        cancel_percent: a.cancel_percent.min(100),
        max_payload_kib: a.max_payload_kib.min(512),
        sample_secs: a.sample_secs.max(1),
        ferry_bin: ferry_bin(a.ferry_bin.clone()).await?,
    };
    let r = soak::run(&p).await?;
    let text = serde_json::to_string_pretty(&r)?;
    write_out(a.out.as_ref(), &text)?;
    println!("{}", serde_json::to_string_pretty(&r["summary"])?);
    let s = &r["summary"];
    if s["lost"] != 0 || s["doubled"] != 0 || s["wrong_final_state"] != 0 {
        bail!("the soak lost, doubled or misplaced jobs (see the summary)");
    }
    if s["lookups"]["wrong"] != 0 {
        bail!("lookups through the gateway disagreed with the record (see the summary)");
    }
    Ok(())
}

async fn api_cmd(a: ApiArgs) -> anyhow::Result<()> {
    if a.subjects == 0 || a.subjects > 2_000 {
        bail!("--subjects must be 1..=2000");
    }
    if a.rates.iter().any(|&r| r == 0 || r > 100_000) || a.latency_secs > 120 {
        bail!("--rates must be 1..=100000 jobs/s and --latency-secs at most 120");
    }
    if a.throughput_secs == 0 || a.throughput_secs > 120 || a.in_flight == 0 || a.in_flight > 4096 {
        bail!("--throughput-secs must be 1..=120 and --in-flight 1..=4096");
    }
    let machine = report::Machine::probe();
    let bin = ferry_bin(a.ferry_bin.clone()).await?;
    let quiet = quiet_before(a.wait_quiet).await?;
    let p = api::Params {
        subjects: a.subjects,
        rates: a.rates.clone(),
        latency_secs: a.latency_secs,
        throughput_secs: a.throughput_secs,
        batch_size: a.batch_size,
        in_flight: a.in_flight,
        worker_concurrency: a.worker_concurrency,
        worker_batch: a.worker_batch,
        queue: a.queue.clone(),
        ferry_bin: bin,
    };
    let r = api::run(&p).await?;
    let doc = json!({
        "scenario": "api",
        "machine": machine,
        "busy_cores_before": quiet,
        "loadavg_after": report::loadavg(),
        "result": r,
    });
    let text = serde_json::to_string_pretty(&doc)?;
    println!("{text}");
    write_out(a.out.as_ref(), &text)
}

async fn submit_cmd(a: SubmitArgs) -> anyhow::Result<()> {
    if a.systems.is_empty() || a.connections == 0 || a.connections > 10_000 {
        bail!("--systems must name at least one system and --connections be 1..=10000");
    }
    if a.threads == 0 || a.threads > 16 || a.threads > a.connections {
        bail!("--threads must be 1..=16 and at most --connections");
    }
    if a.secs == 0 || a.secs > 600 || a.warmup_secs > 60 || a.half_rate_secs > 600 {
        bail!("--secs must be 1..=600, --warmup-secs at most 60, --half-rate-secs at most 600");
    }
    if a.in_flight == 0 || a.in_flight > 4096 {
        bail!("--in-flight must be 1..=4096");
    }
    if a.fixed_rates.iter().any(|r| *r == 0 || *r > 200_000) {
        bail!("--fixed-rates must each be 1..=200000 jobs/s");
    }
    if !a.fixed_rates.is_empty() && a.half_rate_secs == 0 {
        bail!("--fixed-rates needs --half-rate-secs above 0 (the length of each paced phase)");
    }
    let machine = report::Machine::probe();
    let bin = if a.systems.contains(&submit::System::Ferry) {
        ferry_bin(a.ferry_bin.clone()).await?
    } else {
        PathBuf::new()
    };
    let quiet = quiet_before(a.wait_quiet).await?;
    let p = submit::Params {
        systems: a.systems.clone(),
        connections: a.connections,
        threads: a.threads,
        secs: a.secs,
        warmup_secs: a.warmup_secs,
        half_rate_secs: a.half_rate_secs,
        fixed_rates: a.fixed_rates.clone(),
        in_flight: a.in_flight,
        queue: a.queue.clone(),
        ferry_bin: bin,
        gateway_args: a
            .gateway_args
            .split_whitespace()
            .map(str::to_owned)
            .collect(),
        peer_dir: a.peer_dir.clone().unwrap_or_else(submit::default_peer_dir),
    };
    let r = submit::run(&p).await?;
    let doc = json!({
        "scenario": "submit",
        "machine": machine,
        "busy_cores_before": quiet,
        "loadavg_after": report::loadavg(),
        "params": {
            "connections": a.connections,
            "threads": a.threads,
            "secs": a.secs,
            "half_rate_secs": a.half_rate_secs,
            "fixed_rates": a.fixed_rates,
            "gateway_args": a.gateway_args,
        },
        "result": r,
    });
    let text = serde_json::to_string_pretty(&doc)?;
    println!("{text}");
    write_out(a.out.as_ref(), &text)
}

async fn rebalance_cmd(a: RebalanceArgs) -> anyhow::Result<()> {
    if a.gateways == 0 || a.gateways > 16 || a.clients == 0 || a.clients > 5_000 {
        bail!("--gateways must be 1..=16 and --clients 1..=5000");
    }
    if a.secs == 0 || a.secs > 3600 || a.join_after_secs >= a.secs || a.sample_ms < 50 {
        bail!("--secs must be 1..=3600, --join-after-secs below it, --sample-ms at least 50");
    }
    if !(0.0..=1000.0).contains(&a.churn) {
        bail!("--churn must be 0..=1000 leaves per second");
    }
    if a.via.is_empty() || a.via.contains(&proxies::Via::Direct) {
        bail!("--via takes balancer and/or haproxy (the scenario needs a front)");
    }
    let bin = ferry_bin(a.ferry_bin.clone()).await?;
    let p = rebalance::Params {
        gateways: a.gateways,
        clients: a.clients,
        join_after: Duration::from_secs(a.join_after_secs),
        run_for: Duration::from_secs(a.secs),
        sample: Duration::from_millis(a.sample_ms),
        epsilon: a.balance_epsilon,
        rebalance_rate: a.rebalance_rate,
        cooldown_ms: a.rebalance_cooldown_ms,
        close_spread_ms: a.ws_close_spread_ms,
        churn_per_sec: a.churn,
        fronts: a.via.clone(),
    };
    let csv = a.csv.clone().unwrap_or_else(rebalance::default_csv);
    let v = rebalance::run(&bin, &p, &csv, a.plot.as_deref()).await?;
    let text = serde_json::to_string_pretty(&v)?;
    println!("{text}");
    write_out(a.out.as_ref(), &text)
}

async fn autoscale_cmd(a: AutoscaleArgs) -> anyhow::Result<()> {
    if a.jobs == 0 || a.jobs > 1_000_000 || a.job_ms > 60_000 {
        bail!("--jobs must be 1..=1000000 and --job-ms at most 60000");
    }
    if a.min_workers > a.max_workers || a.max_workers == 0 || a.max_workers > 64 {
        bail!("--max-workers must be 1..=64 and --min-workers at most --max-workers");
    }
    let positive = |v: f64| v.is_finite() && v > 0.0;
    if !positive(a.target_drain_seconds) || !positive(a.scale_down_stabilization_seconds) {
        bail!("--target-drain-seconds and --scale-down-stabilization-seconds must be positive");
    }
    if a.interval_ms == 0 || a.interval_ms > 60_000 || a.sample_ms < 10 || a.sample_ms > 10_000 {
        bail!("--interval-ms must be 1..=60000 and --sample-ms 10..=10000");
    }
    if a.max_secs == 0 || a.max_secs > 3600 || a.enqueue_chunk == 0 || a.enqueue_chunk > 100_000 {
        bail!("--max-secs must be 1..=3600 and --enqueue-chunk 1..=100000");
    }
    // Fail before the run when the plot cannot be drawn.
    if a.plot.is_some() {
        autoscale::plot::load_font()?;
    }
    let machine = report::Machine::probe();
    let bin = ferry_bin(a.ferry_bin.clone()).await?;
    let quiet = quiet_before(a.wait_quiet).await?;
    let p = autoscale::Params {
        jobs: a.jobs,
        job_ms: a.job_ms,
        queue: a.queue.clone(),
        min_workers: a.min_workers,
        max_workers: a.max_workers,
        target_drain_seconds: a.target_drain_seconds,
        scale_down_stabilization_seconds: a.scale_down_stabilization_seconds,
        worker_args: a
            .worker_args
            .split_whitespace()
            .map(str::to_owned)
            .collect(),
        interval_ms: a.interval_ms,
        sample_ms: a.sample_ms,
        max_secs: a.max_secs,
        enqueue_chunk: a.enqueue_chunk,
        ferry_bin: bin,
    };
    let dir = tempfile::tempdir().context("creating a temp dir for the regions file")?;
    let r = autoscale::run(&p, dir.path()).await?;
    let doc = json!({
        "scenario": "autoscale",
        "machine": machine,
        "busy_cores_before": quiet,
        "loadavg_after": report::loadavg(),
        "result": r,
    });
    write_out(a.out.as_ref(), &serde_json::to_string_pretty(&doc)?)?;
    let csv_path = a
        .csv
        .clone()
        .or_else(|| a.out.as_ref().map(|o| o.with_extension("csv")));
    if let Some(path) = &csv_path {
        std::fs::write(path, autoscale::csv(&r.samples))
            .with_context(|| format!("writing {}", path.display()))?;
        eprintln!("[loadtest] wrote {}", path.display());
    }
    if let Some(path) = &a.plot {
        autoscale::plot::draw(&r, path)?;
        eprintln!("[loadtest] wrote {}", path.display());
    }
    let summary = json!({
        "scenario": "autoscale",
        "params": r.params,
        "summary": r.summary,
        "samples": r.samples.len(),
        "error": r.error,
    });
    println!("{}", serde_json::to_string_pretty(&summary)?);
    eprint!("{}", autoscale::summary_text(&r));
    if let Some(e) = &r.error {
        bail!("autoscale run failed: {e}");
    }
    Ok(())
}

/// Wait up to `limit` for a 2-second window in which the machine used under half a core; returns the busy
/// cores of the last window.
async fn wait_quiet(limit: Duration) -> anyhow::Result<f64> {
    let deadline = std::time::Instant::now() + limit;
    loop {
        let (b0, _) = redis_cpu::system_cpu_ticks()?;
        tokio::time::sleep(Duration::from_secs(2)).await;
        let (b1, _) = redis_cpu::system_cpu_ticks()?;
        let busy = (b1 - b0) as f64 / redis_cpu::clock_ticks() as f64 / 2.0;
        if busy < 0.5 || std::time::Instant::now() >= deadline {
            if busy >= 0.5 {
                eprintln!("[loadtest] machine still busy ({busy:.2} cores): running anyway");
            }
            return Ok(redis_cpu::round(busy, 2));
        }
        eprintln!("[loadtest] machine busy ({busy:.2} cores): waiting");
    }
}

async fn quiet_before(limit_secs: u64) -> anyhow::Result<Option<f64>> {
    if limit_secs == 0 {
        return Ok(None);
    }
    wait_quiet(Duration::from_secs(limit_secs)).await.map(Some)
}

/// One ferry run of `jobs` after waiting for a quiet machine: its JSON and true, or, when it failed, `about`
/// (what the run was) with its topology and the error, and false.
async fn ferry_run(
    p: &ferry::Params,
    wait_quiet: u64,
    about: Value,
) -> anyhow::Result<(Value, bool)> {
    let quiet = quiet_before(wait_quiet).await?;
    match ferry::run(p).await {
        Ok(r) => {
            let mut v = serde_json::to_value(r)?;
            v["busy_cores_before"] = json!(quiet);
            Ok((v, true))
        }
        Err(e) => {
            eprintln!(
                "[loadtest] ferry run ({about}, {}) failed: {e:#}",
                p.topology.label()
            );
            let mut v = about;
            v["system"] = json!("ferry");
            v["redis"] = json!(p.topology);
            v["error"] = json!(format!("{e:#}"));
            Ok((v, false))
        }
    }
}

/// Find or build the ferry binary and check it has a `worker` subcommand.
async fn ferry_bin(given: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    let bin = match given {
        Some(b) => b,
        None => {
            let bin = procs::release_dir().join("ferry");
            if !bin.exists() {
                eprintln!(
                    "[loadtest] building the ferry binary: cargo build --release -p ferry-cli"
                );
                procs::run_to_end(
                    "cargo",
                    &["build", "--release", "-p", "ferry-cli"],
                    &procs::workspace_root(),
                    Duration::from_secs(3600),
                )
                .await?;
            }
            bin
        }
    };
    ferry::check_worker_bin(&bin).await?;
    Ok(bin)
}

async fn jobs(a: JobsArgs) -> anyhow::Result<()> {
    a.validate()?;
    let machine = report::Machine::probe();
    let mut failed = false;

    let mut ferry_runs: Vec<Value> = Vec::new();
    let mut gateway_runs: Vec<Value> = Vec::new();
    if !a.only_peer {
        match ferry_bin(a.ferry_bin.clone()).await {
            Err(e) => {
                eprintln!("[loadtest] ferry phases skipped: {e:#}");
                ferry_runs.push(json!({ "system": "ferry", "error": format!("{e:#}") }));
                failed = true;
            }
            Ok(bin) => {
                let ordinary = if a.only_gateways {
                    &[][..]
                } else {
                    &a.batch_size[..]
                };
                let topologies = a.redis.iter().map(|k| match k {
                    RedisKind::Standalone => Topology::Standalone,
                    RedisKind::Cluster => Topology::Cluster {
                        masters: a.cluster_masters,
                        vshards: a.cluster_vshards,
                    },
                });
                for topology in topologies {
                    // What every ferry run shares; each run below overrides what it varies.
                    let base = ferry::Params {
                        jobs: a.jobs,
                        concurrency: a.concurrency,
                        batch_size: a.batch_size[0],
                        rates: a.rates.clone(),
                        latency_secs: a.latency_secs,
                        enqueue_chunk: a.enqueue_chunk,
                        enqueue_tasks: a.enqueue_tasks,
                        queue: a.queue.clone(),
                        queues: a.queue_count,
                        topology,
                        ferry_bin: bin.clone(),
                        worker_args: a
                            .worker_args
                            .split_whitespace()
                            .map(str::to_owned)
                            .collect(),
                        record: false,
                        record_drop: a.record_drop,
                        recorder_alone: a.recorder_alone,
                        gateways: 0,
                    };
                    for (&batch_size, record) in ordinary
                        .iter()
                        .flat_map(|b| a.recorder.iter().map(move |r| (b, r == "on")))
                    {
                        let p = ferry::Params {
                            batch_size,
                            record,
                            ..base.clone()
                        };
                        let (v, ok) = ferry_run(
                            &p,
                            a.wait_quiet,
                            json!({"batch_size": batch_size, "recorder": record}),
                        )
                        .await?;
                        ferry_runs.push(v);
                        failed |= !ok;
                    }
                    for &gateways in &a.gateways {
                        let p = ferry::Params {
                            rates: Vec::new(),
                            latency_secs: 0,
                            gateways,
                            ..base.clone()
                        };
                        eprintln!(
                            "[loadtest] ferry with {gateways} gateways attached ({})",
                            topology.label()
                        );
                        let (v, ok) =
                            ferry_run(&p, a.wait_quiet, json!({"gateways": {"count": gateways}}))
                                .await?;
                        gateway_runs.push(v);
                        failed |= !ok;
                    }
                }
            }
        }
    }

    let ferry_binary = if a.only_peer {
        Value::Null
    } else {
        let bin = a
            .ferry_bin
            .clone()
            .unwrap_or_else(|| procs::release_dir().join("ferry"));
        let modified = std::fs::metadata(&bin)
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map(|d| d.as_secs());
        json!({ "path": bin.display().to_string(), "modified_unix_secs": modified })
    };

    let mut peer_runs: Vec<Value> = Vec::new();
    if a.peer == Peer::Bullmq {
        let dir = a.bullmq_dir.clone().unwrap_or_else(bullmq::default_dir);
        let params = bullmq::Params {
            jobs: a.jobs,
            concurrency: a.concurrency,
            rates: a.rates.clone(),
            latency_secs: a.latency_secs,
            enqueue_chunk: a.enqueue_chunk,
            enqueue_tasks: a.enqueue_tasks,
        };
        match bullmq::ensure_deps(&dir).await {
            Err(e) => {
                eprintln!("[loadtest] BullMQ skipped: {e:#}");
                peer_runs.push(json!({ "system": "bullmq", "error": format!("{e:#}") }));
                failed = true;
            }
            Ok(()) => {
                for v in &a.peer_variants {
                    let variant = bullmq::Variant::parse(v)?;
                    eprintln!("[loadtest] BullMQ ({})", variant.label());
                    let quiet = quiet_before(a.wait_quiet).await?;
                    match bullmq::run(&dir, &params, variant).await {
                        Ok(mut doc) => {
                            doc["busy_cores_before"] = json!(quiet);
                            peer_runs.push(doc);
                        }
                        Err(e) => {
                            eprintln!("[loadtest] BullMQ ({}) failed: {e:#}", variant.label());
                            peer_runs.push(json!({
                                "system": "bullmq",
                                "variant_label": variant.label(),
                                "error": format!("{e:#}"),
                            }));
                            failed = true;
                        }
                    }
                }
            }
        }
    }

    for run in ferry_runs
        .iter_mut()
        .chain(gateway_runs.iter_mut())
        .chain(peer_runs.iter_mut())
    {
        let p = report::problems(run);
        for line in &p {
            eprintln!(
                "[loadtest] SUSPECT {}: {line}",
                run["system"].as_str().unwrap_or("?")
            );
        }
        run["problems"] = json!(p);
    }
    let ok = |v: &&Value| v.get("error").is_none();
    let bullmq_default = peer_runs
        .iter()
        .filter(ok)
        .find(|r| r.get("variant_label") == Some(&json!("default")))
        .or_else(|| peer_runs.iter().find(ok));
    let comparison = match (ferry_runs.iter().find(ok), bullmq_default) {
        (Some(f), Some(b)) => report::compare(f, b),
        _ => Value::Null,
    };
    let gateways = if gateway_runs.is_empty() {
        Value::Null
    } else {
        report::compare_gateways(&gateway_runs, bullmq_default)
    };
    let topologies: Vec<Value> = ferry_runs.iter().chain(&gateway_runs).cloned().collect();

    let doc = json!({
        "scenario": "jobs",
        "params": {
            "jobs": a.jobs,
            "concurrency": a.concurrency,
            "batch_sizes": a.batch_size,
            "rates": a.rates,
            "latency_secs": a.latency_secs,
            "enqueue_chunk": a.enqueue_chunk,
            "enqueue_tasks": a.enqueue_tasks,
            "queue": a.queue,
            "queue_count": a.queue_count,
            "redis": a.redis.iter().map(|k| format!("{k:?}").to_lowercase()).collect::<Vec<_>>(),
            "cluster_masters": a.cluster_masters,
            "cluster_vshards": a.cluster_vshards,
            "worker_args": a.worker_args,
            "peer": format!("{:?}", a.peer).to_lowercase(),
            "gateways": a.gateways,
            "redis_persistence": "off (--appendonly no, no RDB)",
        },
        "machine": machine,
        "ferry_binary": ferry_binary,
        "loadavg_after": report::loadavg(),
        "ferry": ferry_runs,
        "ferry_with_gateways": gateway_runs,
        "peer": peer_runs,
        "comparison": comparison,
        "gateways": gateways,
        "topologies": report::compare_topologies(&topologies),
    });
    let text = serde_json::to_string_pretty(&doc)?;
    println!("{text}");
    if let Some(out) = &a.out {
        if let Some(parent) = out.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("creating {}", parent.display()))?;
        }
        std::fs::write(out, format!("{text}\n"))
            .with_context(|| format!("writing {}", out.display()))?;
        eprintln!("[loadtest] wrote {}", out.display());
    }
    if failed {
        bail!("some runs failed (see \"error\" in the report)");
    }
    Ok(())
}
