//! The `submit` scenario: single-job HTTP submits with no worker running, ferry's gateway beside the stack it
//! replaces (Fastify + a JWT verifier + BullMQ `queue.add` in one Node process, `loadtest/submit-peer`), each on
//! a fresh redis-server of its own.
//!
//! Per system: a short warm-up, then the **maximum**: `wrk` (an independent load tool, Debian's package) with C
//! connections for S seconds, each request carrying the next of C tokens (one subject each); then **half of
//! that rate**, paced by this process (an open-loop client on bare connections, see `paced.rs`), for the
//! submit latency a system shows with headroom. Over each phase the server's CPU and Redis's CPU come from
//! `/proc` and are divided by the accepted jobs; the client's own CPU per request, and for ferry the gateway's
//! own request histogram over the phase, tell a slow server from a slow client.

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::ValueEnum;
use serde_json::{Value, json};

use crate::api::SINGLE_BODY;
use crate::gw::{self, SECRET_ENV, Server};
use crate::redis_cpu::{Meter, round};
use crate::server::BenchRedis;

/// The systems `submit` can run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum System {
    /// `ferry gateway` on the run's Redis.
    Ferry,
    /// Fastify + @fastify/jwt + BullMQ `queue.add`, one Node process (`loadtest/submit-peer`).
    FastifyBullmq,
}

impl System {
    fn label(self) -> &'static str {
        match self {
            Self::Ferry => "ferry",
            Self::FastifyBullmq => "fastify-bullmq",
        }
    }
}

#[derive(Debug, Clone)]
pub struct Params {
    pub systems: Vec<System>,
    /// wrk connections, and tokens (one subject each).
    pub connections: usize,
    /// wrk threads.
    pub threads: usize,
    pub secs: u64,
    pub warmup_secs: u64,
    /// Length of the half-rate phase (0 skips it) and of each fixed-rate one.
    pub half_rate_secs: u64,
    /// Paced phases at these rates after the half-rate one, the same for every system.
    pub fixed_rates: Vec<u64>,
    /// Connections of the paced phases (one request at a time each).
    pub in_flight: usize,
    pub queue: String,
    pub ferry_bin: PathBuf,
    /// Extra `ferry gateway` flags (tuning experiments).
    pub gateway_args: Vec<String>,
    pub peer_dir: PathBuf,
}

/// The folder of the Fastify + BullMQ peer.
pub fn default_peer_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("submit-peer")
}

fn wrk_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("submit.lua")
}

/// `npm ci` in the peer folder unless its dependencies are there.
async fn ensure_peer_deps(dir: &Path) -> anyhow::Result<()> {
    if dir.join("node_modules/fastify/package.json").exists() {
        return Ok(());
    }
    if !crate::procs::exists("node").await || !crate::procs::exists("npm").await {
        bail!("node and npm are needed for the Fastify + BullMQ peer (Node.js 20 or newer)");
    }
    eprintln!(
        "[loadtest] installing the submit peer: npm ci in {}",
        dir.display()
    );
    crate::procs::run_to_end(
        "npm",
        &["ci", "--no-audit", "--no-fund"],
        dir,
        Duration::from_secs(600),
    )
    .await
}

/// Run every system in turn; one JSON document with each system's phases and the ratios.
pub async fn run(p: &Params) -> anyhow::Result<Value> {
    // `wrk -v` prints its version and exits 1, so only whether it starts is checked.
    let wrk_runs = tokio::process::Command::new("wrk")
        .arg("-v")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .await
        .is_ok();
    if !wrk_runs {
        bail!("wrk is needed for the maximum-rate phase (Debian package `wrk`)");
    }
    if p.systems.contains(&System::FastifyBullmq) {
        ensure_peer_deps(&p.peer_dir).await?;
    }
    let mut runs = Vec::new();
    for &sys in &p.systems {
        eprintln!("[loadtest] submit: {}", sys.label());
        match run_one(p, sys).await {
            Ok(v) => runs.push(v),
            Err(e) => {
                eprintln!("[loadtest] submit: {} failed: {e:#}", sys.label());
                runs.push(json!({"system": sys.label(), "error": format!("{e:#}")}));
            }
        }
    }
    let find = |s: System| {
        runs.iter()
            .find(|r| r["system"] == s.label() && r.get("error").is_none())
    };
    let comparison = match (find(System::Ferry), find(System::FastifyBullmq)) {
        (Some(f), Some(b)) => {
            let at = |r: &Value, path: &[&str]| {
                path.iter()
                    .try_fold(r, |v, k| v.get(k))
                    .and_then(Value::as_f64)
            };
            let ratio = |path: &[&str]| {
                at(f, path)
                    .zip(at(b, path))
                    .map(|(x, y)| round(x / y.max(1e-9), 3))
            };
            // The p99 of both at each fixed rate, side by side.
            let p99_at: Vec<Value> = p
                .fixed_rates
                .iter()
                .enumerate()
                .map(|(i, rate)| {
                    let p99 = |r: &Value| r["fixed_rates"][i]["latency"]["p99_ms"].as_f64();
                    json!({"rate": rate, "ferry": p99(f), "peer": p99(b)})
                })
                .collect();
            json!({
                "p99_ms_at_fixed_rates": p99_at,
                "throughput_ratio": ratio(&["max", "accepted_jobs_per_sec"]),
                "server_cpu_ratio": ratio(&["max", "server_cpu_usec_per_job"]),
                "redis_cpu_ratio": ratio(&["max", "redis_cpu_usec_per_job"]),
                "targets": {
                    "throughput_at_least_3x": ratio(&["max", "accepted_jobs_per_sec"]).map(|r| r >= 3.0),
                    "gateway_cpu_at_most_30_usec": at(f, &["max", "server_cpu_usec_per_job"]).map(|c| c <= 30.0),
                    "redis_cpu_at_most_10_usec": at(f, &["max", "redis_cpu_usec_per_job"]).map(|c| c <= 10.0),
                },
            })
        }
        _ => Value::Null,
    };
    Ok(json!({ "runs": runs, "comparison": comparison }))
}

async fn start_server(
    p: &Params,
    sys: System,
    redis: &BenchRedis,
    logdir: &Path,
    http: &reqwest::Client,
) -> anyhow::Result<Server> {
    match sys {
        System::Ferry => {
            let mut args = redis.ferry_args();
            // The per-subject limit (100/s by default) is checked on every request but must not be what caps
            // the run: C subjects at the maximum rate each send far more.
            args.extend(["--http-rate".to_owned(), "1000000".to_owned()]);
            args.extend(p.gateway_args.iter().cloned());
            gw::start_gateway(&p.ferry_bin, &args, logdir, http).await
        }
        System::FastifyBullmq => {
            let port = gw::free_port()?;
            let log = logdir.join("submit-peer.log");
            let f = std::fs::File::create(&log)?;
            let args = vec![
                p.peer_dir.join("server.mjs").display().to_string(),
                port.to_string(),
                redis.url(),
            ];
            let mut child = gw::raised_nofile(Path::new("node"), &args)
                .current_dir(&p.peer_dir)
                .env(SECRET_ENV, gw::BENCH_SECRET)
                .stdout(f.try_clone()?)
                .stderr(f)
                .spawn()
                .context("spawning node server.mjs")?;
            let pid = child.id().context("node pid")?;
            gw::wait_healthy(http, port, &mut child, &log, Duration::from_secs(30)).await?;
            Ok(Server {
                child,
                pid,
                port,
                log,
            })
        }
    }
}

/// One wrk run against `url`; its JSON line.
async fn wrk(p: &Params, url: &str, tokens: &Path, secs: u64) -> anyhow::Result<Value> {
    let out = tokio::time::timeout(
        Duration::from_secs(secs + 60),
        tokio::process::Command::new("sh")
            .arg("-c")
            .arg(r#"ulimit -n "$(ulimit -Hn)" 2>/dev/null; exec "$@""#)
            .arg("sh")
            .arg("wrk")
            .args(["-t", &p.threads.to_string()])
            .args(["-c", &p.connections.to_string()])
            .args(["-d", &format!("{secs}s")])
            .args(["--timeout", "10s"])
            .arg("-s")
            .arg(wrk_script())
            .arg(url)
            .arg("--")
            .arg(tokens)
            .kill_on_drop(true)
            .output(),
    )
    .await
    .context("wrk hung")??;
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .find_map(|l| l.strip_prefix("WRK_JSON "))
        .with_context(|| {
            format!(
                "no result line from wrk ({}): {}{}",
                out.status,
                text,
                String::from_utf8_lossy(&out.stderr)
            )
        })?;
    Ok(serde_json::from_str(line)?)
}

async fn run_one(p: &Params, sys: System) -> anyhow::Result<Value> {
    let logdir = tempfile::tempdir()?;
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(p.in_flight)
        .timeout(Duration::from_secs(30))
        .build()?;
    let redis = BenchRedis::start().await?;
    let mut admin = redis.admins().await?;
    let tokens: Vec<String> = (0..p.connections)
        .map(|i| gw::token(&format!("submitter-{i}"), &["jobs:submit"]))
        .collect::<anyhow::Result<_>>()?;
    let token_file = logdir.path().join("tokens.txt");
    std::fs::write(&token_file, tokens.join("\n") + "\n")?;
    let mut server = start_server(p, sys, &redis, logdir.path(), &http).await?;
    let url = format!(
        "http://127.0.0.1:{}/v1/queues/{}/jobs",
        server.port, p.queue
    );
    let result = phases(p, &url, &tokens, &token_file, &server, &mut admin, &http).await;
    server.stop().await?;
    let (max, half, fixed) = result.with_context(|| {
        format!(
            "{} log tail:\n{}",
            sys.label(),
            crate::procs::tail(&server.log, 2000)
        )
    })?;
    Ok(json!({ "system": sys.label(), "max": max, "half_rate": half, "fixed_rates": fixed }))
}

#[allow(clippy::too_many_arguments)]
async fn phases(
    p: &Params,
    url: &str,
    tokens: &[String],
    token_file: &Path,
    server: &Server,
    admin: &mut [crate::redis_cpu::Admin],
    http: &reqwest::Client,
) -> anyhow::Result<(Value, Value, Vec<Value>)> {
    if p.warmup_secs > 0 {
        wrk(p, url, token_file, p.warmup_secs).await?;
    }
    let meter = Meter::start(admin, Some(server.pid)).await?;
    let w = wrk(p, url, token_file, p.secs).await?;
    let f = |k: &str| w[k].as_u64().unwrap_or(0);
    let accepted = f("requests").saturating_sub(f("non_2xx"));
    let cost = meter.stop(admin, accepted).await?;
    let secs = f("duration_us") as f64 / 1e6;
    let max_rate = accepted as f64 / secs.max(1e-9);
    let server_cpu = cost.other_cpu_usec.unwrap_or(0);
    eprintln!(
        "[loadtest] submit: {max_rate:.0} jobs/s, server {:.1} us/job, Redis {:.1} us/job, p99 {} us",
        server_cpu as f64 / accepted.max(1) as f64,
        cost.redis_cpu_usec_per_job,
        f("p99_us")
    );
    let max = json!({
        "connections": p.connections,
        "threads": p.threads,
        "accepted_jobs_per_sec": round(max_rate, 1),
        "accepted": accepted,
        "wrk": w,
        "server_cpu_usec_per_job": round(server_cpu as f64 / accepted.max(1) as f64, 2),
        "server_cpu_utilisation": round(server_cpu as f64 / 1e6 / cost.secs.max(1e-9), 3),
        "redis_cpu_usec_per_job": cost.redis_cpu_usec_per_job,
        "redis": cost,
    });
    if p.half_rate_secs == 0 {
        return Ok((max, Value::Null, Vec::new()));
    }
    let half = paced_phase(
        p,
        url,
        tokens,
        server,
        admin,
        http,
        ((max_rate / 2.0) as u64).max(1),
    )
    .await?;
    let mut fixed = Vec::new();
    for rate in &p.fixed_rates {
        fixed.push(paced_phase(p, url, tokens, server, admin, http, *rate).await?);
    }
    Ok((max, half, fixed))
}

/// One paced phase at `rate`: latency, and server and Redis CPU per accepted job.
async fn paced_phase(
    p: &Params,
    url: &str,
    tokens: &[String],
    server: &Server,
    admin: &mut [crate::redis_cpu::Admin],
    http: &reqwest::Client,
    rate: u64,
) -> anyhow::Result<Value> {
    let route = "/v1/queues/{queue}/jobs";
    let scrape = || async {
        let text = crate::autoscale::fetch_metrics(http, server.port).await?;
        let b = crate::paced::post_buckets(&text, route);
        (!b.is_empty()).then_some(b)
    };
    let buckets_before = scrape().await;
    let meter = Meter::start(admin, Some(server.pid)).await?;
    let client_before = crate::redis_cpu::proc_cpu_micros(std::process::id()).ok();
    let (addr, path) = url
        .strip_prefix("http://")
        .and_then(|r| r.split_once('/'))
        .context("a paced URL is http://host:port/path")?;
    let (lat, tally, sent, send_secs) = crate::paced::run(
        addr,
        &format!("/{path}"),
        tokens,
        SINGLE_BODY,
        rate,
        p.half_rate_secs,
        p.in_flight,
    )
    .await?;
    let client_cpu = crate::redis_cpu::proc_cpu_micros(std::process::id())
        .ok()
        .zip(client_before)
        .map(|(after, before)| after.saturating_sub(before));
    let accepted = tally.accepted.load(Ordering::Relaxed);
    let cost = meter.stop(admin, accepted).await?;
    let server_cpu = cost.other_cpu_usec.unwrap_or(0);
    // ferry's gateway times each request itself: its histogram tells a slow server from a slow client.
    let server_view = match (buckets_before, scrape().await) {
        (Some(b), Some(a)) => crate::paced::server_view(&b, &a),
        _ => Value::Null,
    };
    let client_per_request = client_cpu.map(|c| round(c as f64 / sent.max(1) as f64, 2));
    eprintln!(
        "[loadtest] submit at {rate}/s: p50 {:?} ms, p99 {:?} ms (client {client_per_request:?} us/request; \
         server's own histogram: {server_view})",
        lat.p50_ms, lat.p99_ms
    );
    Ok(json!({
        "offered_jobs_per_sec": rate,
        "achieved_jobs_per_sec": round(sent as f64 / send_secs.max(1e-9), 1),
        "http": tally.json(),
        "latency": lat,
        "client_cpu_usec_per_request": client_per_request,
        "server_histogram": server_view,
        "server_cpu_usec_per_job": round(server_cpu as f64 / accepted.max(1) as f64, 2),
        "redis_cpu_usec_per_job": cost.redis_cpu_usec_per_job,
        "redis": cost,
    }))
}
